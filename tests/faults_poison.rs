//! Poison-input campaign: the daemon (a child process, simulated BLE so that it also listens on
//! `ble/unlock_response`) behind a real mosquitto with mutual TLS. On every topic the gateway
//! subscribes to, poison payloads at every size boundary and of every bad shape; after each, a
//! canary must still get through: a signed `ping` answered, and a fresh event (the
//! `command_refused` of a signed `unlock` for a unit that does not exist) delivered, with the
//! daemon alive.
//!
//! Short by default; `GATEHOUSE_FAULT_SCALE=N` adds N × 8 random mutations per topic.

#[path = "support/broker.rs"]
mod broker;
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use broker::{Broker, Subscriber};
use chrono::Utc;
use common::gatehouse_bin;
use ed25519_dalek::SigningKey;
use gatehouse::cloud::commands::{sign, sign_payload};
use gatehouse::cloud::messages::{Command as Cmd, CommandTarget, Topics};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
/// `cloud.max_message_bytes` of the daemon under test.
const MAX_MESSAGE: usize = 4096;
/// The largest packet the gateway takes in: 2 × max(max_message_bytes, 16 MiB).
const INCOMING_LIMIT: usize = 32 << 20;
/// Most parts a snapshot may announce.
const MAX_PARTS: u64 = 65_536;
const COMMANDS: [&str; 10] = [
    "unlock",
    "emergency_unlock",
    "lock",
    "locate",
    "relay",
    "install_mode",
    "resync",
    "ping",
    "adopt",
    "remove",
];

fn scale() -> usize {
    std::env::var("GATEHOUSE_FAULT_SCALE")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 1)
        .unwrap_or(0)
}

fn write_config(dir: &Path, b: &Broker, signer: &SigningKey) -> std::path::PathBuf {
    b.write_gateway_config(
        dir,
        "data",
        &signer.verifying_key(),
        &format!(
            "reconnect_min_ms = 50\nreconnect_max_ms = 1000\nmax_message_bytes = {MAX_MESSAGE}\n"
        ),
        "[ble]\nadapter = \"sim\"\n[demo]\nsimulate_devices = true\n",
    )
}

fn command(name: &str, id: &str, target: Option<CommandTarget>) -> Cmd {
    let now = Utc::now();
    Cmd {
        v: 2,
        site: "site-1".into(),
        gateway: "gw-1".into(),
        id: id.into(),
        name: name.into(),
        issued_at: now,
        expires_at: now + chrono::Duration::seconds(120),
        target,
        args: Value::Null,
    }
}

/// A JSON envelope of exactly `n` bytes (n ≥ 14): `{"payload":"AAA…"}`.
fn envelope_of(n: usize) -> Vec<u8> {
    let mut v = br#"{"payload":""#.to_vec();
    v.resize(n - 2, b'A');
    v.extend_from_slice(br#""}"#);
    assert_eq!(v.len(), n);
    v
}

fn nested(depth: usize) -> Vec<u8> {
    let mut v = vec![b'['; depth];
    v.extend(std::iter::repeat_n(b']', depth));
    v
}

fn nested_objects(depth: usize) -> Vec<u8> {
    let mut s = String::new();
    for _ in 0..depth {
        s.push_str(r#"{"payload":"#);
    }
    s.push('1');
    s.push_str(&"}".repeat(depth));
    s.into_bytes()
}

fn chunk(id: Value, index: Value, count: Value, sha: Value, data: Value) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"id": id, "index": index, "count": count, "sha256": sha, "data": data}),
    )
    .unwrap()
}

/// Poison for one topic: `(label, payload)`. `kind` is `cmd:<name>`, `snapshot`, `delta` or
/// `ble`; `topic_len` fixes the payload sizes at the packet limit.
fn poison(kind: &str, topic_len: usize, signer: &SigningKey) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        ("1 byte".into(), b"{".to_vec()),
        ("1 byte NUL".into(), vec![0]),
        (
            format!("max_message_bytes-1 ({})", MAX_MESSAGE - 1),
            envelope_of(MAX_MESSAGE - 1),
        ),
        (
            format!("max_message_bytes ({MAX_MESSAGE})"),
            envelope_of(MAX_MESSAGE),
        ),
        (
            format!("max_message_bytes+1 ({})", MAX_MESSAGE + 1),
            envelope_of(MAX_MESSAGE + 1),
        ),
        (
            "invalid UTF-8".into(),
            b"\xff\xfe{\"payload\":\"\xc3\x28\",\"id\":\"\xed\xa0\x80\"}".to_vec(),
        ),
        ("NUL bytes".into(), b"{\"payload\":\"\0\0\0\"}\0\0".to_vec()),
        ("deeply nested arrays".into(), nested(100_000)),
        ("deeply nested objects".into(), nested_objects(20_000)),
        (
            "huge numbers".into(),
            br#"{"v":1e400,"index":18446744073709551616,"count":-1e999,"payload":123456789012345678901234567890}"#.to_vec(),
        ),
        (
            "wrong types".into(),
            br#"{"payload":5,"signature":[],"id":{},"index":"0","request_id":null,"schema_version":"1","kind":7}"#.to_vec(),
        ),
        (
            "duplicated keys".into(),
            br#"{"payload":"eyJ2IjoxfQ","payload":"eyJ2IjoyfQ","signature":"a","signature":"b"}"#.to_vec(),
        ),
        ("a JSON string".into(), br#""hello""#.to_vec()),
        ("a JSON array".into(), b"[1,2,3]".to_vec()),
        ("null".into(), b"null".to_vec()),
    ];
    // At the packet limit (3.1.1: remaining length = topic + 2 + packet id 2 + payload).
    let at_limit = INCOMING_LIMIT - 4 - topic_len;
    for (label, n) in [("-1", at_limit - 1), ("", at_limit), ("+1", at_limit + 1)] {
        v.push((format!("packet limit{label}"), vec![b'{'; n]));
    }
    match kind {
        "snapshot" => {
            let sha = json!("0".repeat(64));
            let data = json!(base64::engine::general_purpose::STANDARD.encode(b"{}"));
            for (label, count) in [
                ("parts max", json!(MAX_PARTS)),
                ("parts max+1", json!(MAX_PARTS + 1)),
                ("parts 0", json!(0)),
                ("parts u32::MAX", json!(u32::MAX)),
                ("parts 2^64", json!(18446744073709551616.0)),
            ] {
                v.push((
                    format!("chunk {label}"),
                    chunk(json!("p"), json!(0), count, sha.clone(), data.clone()),
                ));
            }
            v.push((
                "chunk index = count".into(),
                chunk(json!("p"), json!(3), json!(3), sha.clone(), data.clone()),
            ));
            v.push((
                "chunk last index of max parts".into(),
                chunk(
                    json!("q"),
                    json!(MAX_PARTS - 1),
                    json!(MAX_PARTS),
                    sha.clone(),
                    data.clone(),
                ),
            ));
            v.push((
                "chunk bad base64".into(),
                chunk(json!("p"), json!(0), json!(1), sha.clone(), json!("@@@")),
            ));
            v.push((
                "chunk sha mismatch".into(),
                chunk(json!("p"), json!(0), json!(1), sha, data),
            ));
            v.push((
                "chunk unknown field".into(),
                br#"{"id":"p","index":0,"count":1,"sha256":"","data":"","x":1}"#.to_vec(),
            ));
        }
        "delta" => {
            v.push((
                "a snapshot on sync/delta".into(),
                br#"{"schema_version":1,"kind":"snapshot","version":5,"facility":{"time_zone":"UTC"}}"#.to_vec(),
            ));
            v.push((
                "delta with huge version".into(),
                br#"{"schema_version":1,"kind":"delta","base_version":0,"version":1e30}"#.to_vec(),
            ));
            v.push((
                "delta of another schema".into(),
                br#"{"schema_version":99,"kind":"delta"}"#.to_vec(),
            ));
            v.push((
                "delta with duplicated keys".into(),
                br#"{"schema_version":1,"kind":"delta","kind":"snapshot","base_version":0,"version":1}"#.to_vec(),
            ));
        }
        "ble" => {
            v.push((
                "unknown request".into(),
                br#"{"request_id":"nope","commands":"7E"}"#.to_vec(),
            ));
            v.push((
                "both commands and error".into(),
                br#"{"request_id":"x","commands":"","error":"e"}"#.to_vec(),
            ));
        }
        cmd => {
            let name = cmd.trim_start_matches("cmd:");
            let signed =
                |label: &str, payload: &[u8]| (label.to_string(), sign_payload(payload, signer));
            let long = "x".repeat(200);
            v.extend([
                signed("signed: not JSON", b"\xff\x00"),
                signed("signed: nested", &nested(10_000)),
                signed("signed: huge v", br#"{"v":1e99999,"id":"a"}"#),
                signed(
                    "signed: duplicated id",
                    format!(r#"{{"v":2,"site":"site-1","gateway":"gw-1","id":"a","id":"b","name":"{name}","issued_at":"2026-01-01T00:00:00Z","expires_at":"2099-01-01T00:00:00Z"}}"#).as_bytes(),
                ),
                signed(
                    "signed: id with NUL",
                    format!(r#"{{"v":2,"site":"site-1","gateway":"gw-1","id":"a\u0000b","name":"{name}","issued_at":"2026-01-01T00:00:00Z","expires_at":"2099-01-01T00:00:00Z","target":{{"unit":"\u0000"}},"args":{{"x":[[[[1]]]]}}}}"#).as_bytes(),
                ),
                signed(
                    "signed: id over 128 characters",
                    format!(r#"{{"v":2,"site":"site-1","gateway":"gw-1","id":"{long}","name":"{name}","issued_at":"2026-01-01T00:00:00Z","expires_at":"2099-01-01T00:00:00Z"}}"#).as_bytes(),
                ),
                signed(
                    "signed: wrong types",
                    format!(r#"{{"v":2,"site":"site-1","gateway":"gw-1","id":7,"name":["{name}"],"issued_at":0,"expires_at":true,"target":"A-101","args":5}}"#).as_bytes(),
                ),
                signed(
                    "signed: far times",
                    format!(r#"{{"v":2,"site":"site-1","gateway":"gw-1","id":"far","name":"{name}","issued_at":"-262143-01-01T00:00:00Z","expires_at":"+262142-12-31T23:59:59Z"}}"#).as_bytes(),
                ),
                (
                    "signed: over max_message_bytes".into(),
                    sign(
                        &Cmd {
                            args: json!({"pad": "z".repeat(MAX_MESSAGE)}),
                            ..command(name, "pad", None)
                        },
                        signer,
                    ),
                ),
            ]);
        }
    }
    v
}

/// Random mutations of a valid message: bytes flipped, cut, repeated.
fn mutations(base: &[u8], n: usize, seed: &mut u64) -> Vec<(String, Vec<u8>)> {
    let mut next = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    };
    (0..n)
        .map(|i| {
            let mut m = base.to_vec();
            match next() % 3 {
                0 => {
                    for _ in 0..1 + next() % 8 {
                        let at = (next() as usize) % m.len().max(1);
                        if let Some(b) = m.get_mut(at) {
                            *b = next() as u8;
                        }
                    }
                }
                1 => m.truncate((next() as usize) % m.len().max(1)),
                _ => {
                    let at = (next() as usize) % m.len().max(1);
                    let piece = m[at..].to_vec();
                    m.extend_from_slice(&piece);
                }
            }
            (format!("mutation {i}"), m)
        })
        .collect()
}

struct Gateway {
    child: Child,
    log: std::path::PathBuf,
}

impl Gateway {
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
    /// Connections the daemon dropped for a message over its packet limit (its log).
    fn dropped_too_large(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("larger than the gateway takes in")
            .count()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cloud {
    results: Subscriber,
    events: Subscriber,
    publisher: rumqttc::AsyncClient,
    /// Keeps the publisher's event loop polled.
    _task: tokio::task::JoinHandle<()>,
    t: Topics,
    signer: SigningKey,
    n: u64,
}

impl Cloud {
    async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.publisher
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// A signed ping answered and a fresh event delivered. Sent again (new ids) while the
    /// gateway is reconnecting (a clean session loses what is sent meanwhile).
    async fn canary(&mut self, gw: &mut Gateway, what: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            self.n += 1;
            let (ping, unlock) = (
                format!("canary-{}", self.n),
                format!("canary-ev-{}", self.n),
            );
            let none = Some(CommandTarget {
                unit: Some("no-such-unit".into()),
                entry: None,
                device: None,
                channel: None,
            });
            self.publish(
                &format!("{}/cmd/ping", self.t.base()),
                sign(&command("ping", &ping, None), &self.signer),
            )
            .await;
            self.publish(
                &format!("{}/cmd/unlock", self.t.base()),
                sign(&command("unlock", &unlock, none), &self.signer),
            )
            .await;
            let answered = self
                .results
                .try_wait_for(
                    |m| {
                        m.iter().any(|x| {
                            let v: Value = serde_json::from_slice(&x.payload).unwrap_or_default();
                            v["id"] == ping.as_str() && v["status"] == "done"
                        })
                    },
                    Duration::from_secs(3),
                )
                .await
                .is_some();
            let delivered = answered
                && self
                    .events
                    .try_wait_for(
                        |m| {
                            m.iter().any(|x| {
                                let v: Value =
                                    serde_json::from_slice(&x.payload).unwrap_or_default();
                                v["kind"] == "command_refused"
                                    && v["payload"]["id"] == unlock.as_str()
                            })
                        },
                        Duration::from_secs(10),
                    )
                    .await
                    .is_some();
            assert!(
                gw.alive(),
                "the daemon died after {what}:\n{}",
                gw.log_tail()
            );
            if answered && delivered {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no canary through after {what}:\n{}",
                gw.log_tail()
            );
        }
        self.results.clear();
        self.events.clear();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_on_every_topic_leaves_the_gateway_answering() {
    let b = Broker::start_with(broker::BrokerOptions {
        extra_config: vec!["max_queued_messages 0".into()],
        ..Default::default()
    });
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = Topics::new("gatehouse", "site-1", "gw-1");
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &b, &signer);
    let log = dir.path().join("daemon.log");
    let mut gw = Gateway {
        child: Command::new(gatehouse_bin())
            .args(["run", "--config", cfg.to_str().unwrap()])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        log,
    };
    let results =
        Subscriber::connect(&b, "cloud-results", &format!("{}/cmd/+/result", t.base())).await;
    results.wait_subscribed(1, WAIT).await;
    let events = Subscriber::connect(&b, "cloud-events", &t.events()).await;
    events.wait_subscribed(1, WAIT).await;
    let mut opts = b.mqtt_options("cloud-poison");
    opts.set_max_packet_size(64 << 20, 64 << 20);
    let (publisher, mut el) = rumqttc::AsyncClient::new(opts, 64);
    let task = tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let mut cloud = Cloud {
        results,
        events,
        publisher,
        _task: task,
        t: t.clone(),
        signer: signer.clone(),
        n: 0,
    };
    cloud.canary(&mut gw, "start").await;
    let mut topics: Vec<(String, String)> = COMMANDS
        .iter()
        .map(|c| (format!("cmd:{c}"), format!("{}/cmd/{c}", t.base())))
        .collect();
    topics.push(("snapshot".into(), t.sync_snapshot()));
    topics.push(("delta".into(), t.sync_delta()));
    topics.push(("ble".into(), t.ble_unlock_response()));
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut cases = 0;
    for (kind, topic) in &topics {
        let mut list = poison(kind, topic.len(), &signer);
        let valid = match kind.as_str() {
            "snapshot" => chunk(
                json!("m"),
                json!(0),
                json!(1),
                json!("0".repeat(64)),
                json!("e30="),
            ),
            "delta" => {
                br#"{"schema_version":1,"kind":"delta","base_version":0,"version":1}"#.to_vec()
            }
            "ble" => {
                br#"{"request_id":"r-1","commands":"7E100230A230000000001122334455667788990A"}"#
                    .to_vec()
            }
            c => sign(&command(c.trim_start_matches("cmd:"), "m", None), &signer),
        };
        list.extend(mutations(&valid, scale() * 8, &mut seed));
        for (label, payload) in list {
            let bytes = payload.len();
            let dropped = gw.dropped_too_large();
            cloud.publish(topic, payload).await;
            let what = format!("{label} on {topic}");
            cloud.canary(&mut gw, &what).await;
            cases += 1;
            // Exactly the message over the packet limit cost a connection (MQTT 3.1.1).
            let over = usize::from(label == "packet limit+1");
            assert_eq!(gw.dropped_too_large(), dropped + over, "{what}");
            let short = topic.trim_start_matches(t.base());
            let conn = if over == 1 {
                "connection dropped and back"
            } else {
                "same connection"
            };
            println!(
                "faults: poison {short} {label} ({bytes} bytes): {conn}, a signed ping answered, a fresh event delivered, the daemon alive"
            );
        }
    }
    println!("faults: poison: {cases} cases on {} topics", topics.len());
}
