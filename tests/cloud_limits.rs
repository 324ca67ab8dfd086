//! The cloud link at its limits, against a real mosquitto with mutual TLS: messages over the
//! packet limit both ways, the return after a long broker outage, what the topic accepts, empty
//! (retained-clearing) messages, over-long command ids (docs/mqtt-api.md, docs/guarantees.md).

#[path = "support/broker.rs"]
mod broker;
mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use broker::{Broker, Subscriber};
use chrono::Utc;
use common::*;
use ed25519_dalek::SigningKey;
use gatehouse::cloud::commands::{CommandConfig, NoDevices, Router, sign, sign_payload};
use gatehouse::cloud::link::{CloudLink, Commands, LinkState};
use gatehouse::cloud::messages::{Command as Cmd, SnapshotChunk, Topics};
use gatehouse::config::{CloudConfig, Protocol, Transport};
use gatehouse::events::EventKind;
use gatehouse::store::{NewEvent, Store};
use serde_json::{Value, json};
use sha2::Digest;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);
/// What the gateway takes in with the test's `max_message_bytes` (16 KiB): 2 × 16 MiB.
const INCOMING_LIMIT: usize = 32 << 20;

fn broker_with(extra: &[&str]) -> Broker {
    let mut extra_config = vec!["max_queued_messages 0".to_string()];
    extra_config.extend(extra.iter().map(|s| s.to_string()));
    Broker::start_with(broker::BrokerOptions {
        extra_config,
        ..Default::default()
    })
}

fn cloud_config(b: &Broker, protocol: Protocol, signer: &SigningKey) -> CloudConfig {
    let files = b.client("gw-1");
    CloudConfig {
        host: "127.0.0.1".into(),
        port: b.port(),
        transport: Transport::Tls {
            ca_file: Some(files.ca),
            use_system_roots: false,
            cert_file: files.cert,
            key_file: files.key,
        },
        protocol,
        client_id: "site-1-gw-1".into(),
        topic_prefix: "gatehouse".into(),
        keep_alive: Duration::from_secs(5),
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_millis(800),
        command_public: signer.verifying_key(),
        command_max_skew: Duration::from_secs(30),
        max_message_bytes: 16 * 1024,
        inflight: 50,
    }
}

fn topics() -> Topics {
    Topics::new("gatehouse", "site-1", "gw-1")
}

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    state: Arc<LinkState>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

fn start_link(store: Arc<Store>, cfg: CloudConfig, signer: &SigningKey) -> Running {
    let commands = Arc::new(Commands {
        router: Arc::new(Router::new(Arc::new(NoDevices), Arc::new(NoDevices))),
        cfg: CommandConfig {
            public: signer.verifying_key(),
            site: "site-1".into(),
            gateway: "gw-1".into(),
            max_skew: chrono::Duration::seconds(30),
            max_bytes: cfg.max_message_bytes,
        },
    });
    let shutdown = CancellationToken::new();
    let link = CloudLink::new(cfg, "site-1", "gw-1", store, 1, Some(commands));
    let state = link.state.clone();
    let task = tokio::spawn(link.run(shutdown.child_token()));
    Running {
        shutdown,
        task,
        state,
    }
}

async fn wait_online(b: &Broker, t: &Topics) {
    let st = Subscriber::connect(b, "st", &t.status()).await;
    st.wait_for(
        |m| {
            m.iter()
                .any(|x| serde_json::from_slice::<Value>(&x.payload).unwrap()["online"] == true)
        },
        WAIT,
    )
    .await;
}

fn ping(id: &str) -> Cmd {
    let now = Utc::now();
    Cmd {
        v: 2,
        site: "site-1".into(),
        gateway: "gw-1".into(),
        id: id.into(),
        name: "ping".into(),
        issued_at: now,
        expires_at: now + chrono::Duration::seconds(120),
        target: None,
        args: Value::Null,
    }
}

fn json_of(m: &broker::Received) -> Value {
    serde_json::from_slice(&m.payload).unwrap()
}

/// Waits for a condition on the link's side (the store, the link state).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every event recorded so far, by seq: those still in the outbox and those the subscriber
/// received (delivered ones leave the outbox).
fn recorded(store: &Store, sub: &Subscriber) -> std::collections::BTreeMap<u64, (String, Value)> {
    let mut all: std::collections::BTreeMap<u64, (String, Value)> = sub
        .messages()
        .iter()
        .map(json_of)
        .map(|v| {
            let kind = v["kind"].as_str().unwrap_or_default().to_string();
            (v["seq"].as_u64().unwrap(), (kind, v["payload"].clone()))
        })
        .collect();
    for e in store.events().read_from(0, 100_000).unwrap() {
        all.insert(e.seq, (e.kind, e.payload));
    }
    all
}

/// The payloads of the events of `kind` recorded so far (waits until every event appended so far
/// is accounted for).
async fn recorded_kinds(store: &Store, sub: &Subscriber, kind: &str) -> Vec<Value> {
    let appended = store.events().next_seq() - 1;
    until("every event accounted for", || {
        recorded(store, sub).len() as u64 >= appended
    })
    .await;
    recorded(store, sub)
        .into_values()
        .filter(|(k, _)| k == kind)
        .map(|(_, p)| p)
        .collect()
}

/// A client that may publish packets over the test harness's usual 16 MiB.
fn big_publisher(b: &Broker, name: &str) -> rumqttc::MqttOptions {
    let mut o = b.mqtt_options(name);
    o.set_max_packet_size(64 << 20, 64 << 20);
    o
}

/// An event of `big` bytes of reason: over the connection's packet limit it goes out as an
/// `event_unpublishable` marker (`marker`); otherwise as itself (the event log bounds every
/// record to 16 KiB, so on 3.1.1, whose limit is 128 KiB, only a record written by an older
/// version could be over it: a big event arrives cut at append).
async fn event_over_the_limit_is_a_marker(
    protocol: Protocol,
    broker: Broker,
    big: usize,
    marker: bool,
) {
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = topics();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 100_000).unwrap());
    let ev = |kind: EventKind, payload: Value| NewEvent {
        at: Utc::now(),
        local: String::new(),
        kind,
        payload,
    };
    store
        .events()
        .append(&[
            ev(EventKind::GatewayStarted, json!({"i": 1})),
            ev(
                EventKind::SyncRefused,
                json!({"reason": "y".repeat(big), "source": "mqtt"}),
            ),
            ev(EventKind::GatewayStopped, json!({"i": 3})),
        ])
        .unwrap();
    let sub = Subscriber::connect(&broker, "cloud", &t.events()).await;
    sub.wait_subscribed(1, WAIT).await;
    let link = start_link(
        store.clone(),
        cloud_config(&broker, protocol, &signer),
        &signer,
    );
    let msgs = sub
        .wait_for(|m| m.iter().any(|x| json_of(x)["seq"] == 3), WAIT)
        .await;
    let by_seq = |s: u64| {
        msgs.iter()
            .map(json_of)
            .find(|v| v["seq"] == s)
            .unwrap_or_else(|| panic!("seq {s} not received"))
    };
    assert_eq!(by_seq(1)["kind"], "gateway_started");
    let second = by_seq(2);
    assert!(second["id"].as_str().unwrap().ends_with("-2"));
    if marker {
        assert_eq!(second["kind"], "event_unpublishable", "{second}");
        assert_eq!(second["payload"]["original_kind"], "sync_refused");
        assert!(second["payload"]["original_bytes"].as_u64().unwrap() > big as u64);
    } else {
        // Cut at append to a marked excerpt: small enough to publish as itself.
        assert_eq!(second["kind"], "sync_refused", "{second}");
        assert!(second.to_string().len() <= 16 * 1024 + 256, "{second}");
        assert!(
            second["payload"]["reason"]
                .as_str()
                .unwrap()
                .contains("[cut, ")
        );
    }
    assert_eq!(by_seq(3)["kind"], "gateway_stopped");
    // The marker was acknowledged and deleted like any event: the outbox empties, on one
    // connection (no reconnection loop).
    until("the outbox to empty", || store.events().is_empty()).await;
    assert_eq!(link.state.attempts.load(Ordering::Relaxed), 1);
    println!(
        "limits: {protocol:?}: an event of {big} bytes went out {} with its seq, the next one \
         followed, one connection",
        if marker {
            "as event_unpublishable"
        } else {
            "cut at append"
        }
    );
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_over_the_packet_limit_is_sent_as_a_marker_and_the_rest_flows() {
    // 3.1.1: the gateway's own limit (128 KiB) is above every record (16 KiB): a 200 KiB event
    // is cut when appended and goes out as itself.
    event_over_the_limit_is_a_marker(Protocol::V311, broker_with(&[]), 200 * 1024, false).await;
    // 5: the broker announces 4,000 bytes in its CONNACK: a 10 KiB record goes out as a marker.
    event_over_the_limit_is_a_marker(
        Protocol::V5,
        broker_with(&["max_packet_size 4000"]),
        10 * 1024,
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_over_the_packet_limit_on_311_is_recorded_once_and_retried_with_a_growing_wait() {
    let b = broker_with(&[]);
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = topics();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 100_000).unwrap());
    let topic = format!("{}/cmd/ping", t.base());
    // Retained: delivered again at every connection.
    broker::publish_qos1(
        big_publisher(&b, "cloud-big"),
        &topic,
        vec![b'x'; INCOMING_LIMIT + 1],
        true,
    )
    .await
    .unwrap();
    let events = Subscriber::connect(&b, "cloud-events", &t.events()).await;
    events.wait_subscribed(1, WAIT).await;
    let cfg = cloud_config(&b, Protocol::V311, &signer);
    let (min, max) = (cfg.reconnect_min, cfg.reconnect_max);
    let link = start_link(store.clone(), cfg, &signer);
    until("five connections", || {
        link.state.attempts.load(Ordering::Relaxed) >= 5
    })
    .await;
    // Each drop doubled the wait (100, 200, 400, 800 ms): it was never reset to the minimum.
    let delay = link.state.delay_ms.load(Ordering::Relaxed);
    assert_eq!(
        delay,
        max.as_millis() as u64,
        "wait not grown to the cap ({min:?}..{max:?})"
    );
    // Recorded once (coalesced), with the size and never the content.
    let recorded = recorded_kinds(&store, &events, "message_too_large").await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["limit"], INCOMING_LIMIT);
    assert!(recorded[0]["bytes"].as_u64().unwrap() > INCOMING_LIMIT as u64);
    assert_eq!(recorded[0]["protocol"], "3.1.1");
    assert!(!recorded[0].to_string().contains("xxxx"));
    // The cloud clears the retained message: the gateway connects and stays, the event goes
    // out and commands are answered.
    let results = Subscriber::connect(&b, "cloud-results", &format!("{topic}/result")).await;
    results.wait_subscribed(1, WAIT).await;
    broker::publish_qos1(b.mqtt_options("cloud-clear"), &topic, Vec::new(), true)
        .await
        .unwrap();
    events
        .wait_for(
            |m| m.iter().any(|x| json_of(x)["kind"] == "message_too_large"),
            WAIT,
        )
        .await;
    let cloud = Subscriber::connect(&b, "cloud-pub", "none/#").await;
    // The event may have gone out on a connection before the clear, and the link may be in
    // its (capped) wait between two connections when the cloud sends: a command sent while it
    // is away is not kept for it. So the cloud sends again, a new id each time, until one is
    // answered on a connection made after the clear.
    let mut answered = None;
    for i in 1..=20 {
        cloud
            .client
            .try_publish(
                &topic,
                rumqttc::QoS::AtLeastOnce,
                false,
                sign(&ping(&format!("p-{i}")), &signer),
            )
            .unwrap();
        if let Some(r) = results
            .try_wait_for(|m| !m.is_empty(), Duration::from_secs(3))
            .await
        {
            answered = Some(r);
            break;
        }
    }
    let r = answered.expect("no command answered within 60 s of the clear");
    assert_eq!(json_of(&r[0])["status"], "done");
    println!(
        "limits: 3.1.1: a retained message over {INCOMING_LIMIT} bytes: one message_too_large \
         event for {} connections, wait grown to {delay} ms; cleared by an empty retained message",
        link.state.attempts.load(Ordering::Relaxed)
    );
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_over_the_packet_limit_on_5_is_not_sent_by_the_broker() {
    let b = broker_with(&[]);
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = topics();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 100_000).unwrap());
    let link = start_link(
        store.clone(),
        cloud_config(&b, Protocol::V5, &signer),
        &signer,
    );
    let topic = format!("{}/cmd/ping", t.base());
    let results = Subscriber::connect(&b, "cloud-results", &format!("{topic}/result")).await;
    results.wait_subscribed(1, WAIT).await;
    let events = Subscriber::connect(&b, "cloud-events", &t.events()).await;
    events.wait_subscribed(1, WAIT).await;
    wait_online(&b, &t).await;
    broker::publish_qos1(
        big_publisher(&b, "cloud-big"),
        &topic,
        vec![b'x'; INCOMING_LIMIT + 1],
        false,
    )
    .await
    .unwrap();
    let cloud = Subscriber::connect(&b, "cloud-pub", "none/#").await;
    cloud
        .client
        .try_publish(
            &topic,
            rumqttc::QoS::AtLeastOnce,
            false,
            sign(&ping("p-1"), &signer),
        )
        .unwrap();
    let r = results.wait_for(|m| !m.is_empty(), WAIT).await;
    assert_eq!(json_of(&r[0])["id"], "p-1");
    // The large message never reached the gateway: same connection, nothing recorded.
    assert_eq!(link.state.attempts.load(Ordering::Relaxed), 1);
    assert!(
        recorded_kinds(&store, &events, "message_too_large")
            .await
            .is_empty()
    );
    println!(
        "limits: 5: a message over the announced maximum packet size was dropped by the broker; the link stayed up"
    );
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_messages_are_ignored_and_a_snapshot_on_sync_delta_is_refused() {
    let b = broker_with(&[]);
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = topics();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 100_000).unwrap());
    let link = start_link(
        store.clone(),
        cloud_config(&b, Protocol::V311, &signer),
        &signer,
    );
    let results =
        Subscriber::connect(&b, "cloud-results", &format!("{}/cmd/+/result", t.base())).await;
    results.wait_subscribed(1, WAIT).await;
    let sync = Subscriber::connect(&b, "cloud-sync", &t.sync_result()).await;
    sync.wait_subscribed(1, WAIT).await;
    let events = Subscriber::connect(&b, "cloud-events", &t.events()).await;
    events.wait_subscribed(1, WAIT).await;
    wait_online(&b, &t).await;
    let cloud = Subscriber::connect(&b, "cloud-pub", "none/#").await;
    let send = |topic: String, v: Vec<u8>, retain: bool| {
        cloud
            .client
            .try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, v)
            .unwrap();
    };
    // Empty (retained-clearing) messages on every kind of topic, then canaries behind them in
    // the same lanes and on the same sync thread.
    for name in ["unlock", "ping", "resync"] {
        send(format!("{}/cmd/{name}", t.base()), Vec::new(), true);
    }
    send(t.sync_delta(), Vec::new(), true);
    send(t.sync_snapshot(), Vec::new(), true);
    send(
        format!("{}/cmd/ping", t.base()),
        sign(&ping("p-after-empty"), &signer),
        false,
    );
    let snapshot = serde_json::to_vec(&tenants_snapshot(9, 3, 100_000)).unwrap();
    send(t.sync_delta(), snapshot.clone(), false);
    let r = results.wait_for(|m| !m.is_empty(), WAIT).await;
    let s = sync.wait_for(|m| !m.is_empty(), WAIT).await;
    // The canaries' answers are the only ones: nothing for the empty messages.
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(json_of(&r[0])["id"], "p-after-empty");
    assert!(
        recorded_kinds(&store, &events, "command_refused")
            .await
            .is_empty()
    );
    // The snapshot on sync/delta: refused, with the reason; nothing applied.
    assert_eq!(s.len(), 1);
    let refused = json_of(&s[0]);
    assert_eq!(
        (&refused["status"], &refused["kind"]),
        (&json!("refused"), &json!("snapshot"))
    );
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("sync/snapshot")
    );
    assert_eq!(store.site().version, 0);
    let refusals = recorded_kinds(&store, &events, "sync_refused").await;
    assert_eq!(refusals.len(), 1);
    assert!(
        refusals[0]["reason"]
            .as_str()
            .unwrap()
            .contains("sync/delta")
    );
    // The same document in parts on sync/snapshot applies.
    let chunk = SnapshotChunk {
        id: "snap-1".into(),
        index: 0,
        count: 1,
        sha256: hex::encode(sha2::Sha256::digest(&snapshot)),
        data: base64::engine::general_purpose::STANDARD.encode(&snapshot),
    };
    send(
        t.sync_snapshot(),
        serde_json::to_vec(&chunk).unwrap(),
        false,
    );
    let s = sync.wait_for(|m| m.len() >= 2, WAIT).await;
    assert_eq!(json_of(&s[1])["status"], "applied");
    assert_eq!(store.site().version, 9);
    println!(
        "limits: empty messages on cmd/+ and sync/* ignored (no result, no event); a snapshot on sync/delta refused, in parts applied"
    );
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn over_long_and_too_large_commands_are_answered_with_an_id_the_cloud_can_match() {
    let b = broker_with(&[]);
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = topics();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 100_000).unwrap());
    let link = start_link(
        store.clone(),
        cloud_config(&b, Protocol::V311, &signer),
        &signer,
    );
    let results =
        Subscriber::connect(&b, "cloud-results", &format!("{}/cmd/+/result", t.base())).await;
    results.wait_subscribed(1, WAIT).await;
    wait_online(&b, &t).await;
    let cloud = Subscriber::connect(&b, "cloud-pub", "none/#").await;
    let long_id = format!("é{}", "x".repeat(300));
    let mut padded = ping("big-1");
    padded.args = json!({"pad": "z".repeat(40_000)});
    let mut long_padded = ping(&long_id);
    long_padded.args = json!({"pad": "z".repeat(40_000)});
    let other = SigningKey::from_bytes(&[9; 32]);
    let cases: Vec<(Vec<u8>, &str, &str, String, bool)> = vec![
        // Signed, id over 128 characters: check 7.
        (
            sign(&ping(&long_id), &signer),
            "malformed",
            "bad_payload",
            long_id.clone(),
            true,
        ),
        // Over max_message_bytes (16 KiB), id readable: check 1.
        (
            sign(&padded, &signer),
            "malformed",
            "too_large",
            "big-1".into(),
            false,
        ),
        (
            sign(&long_padded, &signer),
            "malformed",
            "too_large",
            long_id.clone(),
            true,
        ),
        // Not authentic, long id: check 5.
        (
            sign(&ping(&long_id), &other),
            "refused",
            "bad_signature",
            long_id.clone(),
            true,
        ),
        // The payload cut short after the id: check 3.
        (
            sign_payload(
                format!(r#"{{"v":2,"id":"{long_id}","na"#).as_bytes(),
                &signer,
            ),
            "malformed",
            "bad_payload",
            long_id.clone(),
            true,
        ),
    ];
    for (msg, ..) in &cases {
        cloud
            .client
            .try_publish(
                format!("{}/cmd/ping", t.base()),
                rumqttc::QoS::AtLeastOnce,
                false,
                msg.clone(),
            )
            .unwrap();
    }
    let got = results.wait_for(|m| m.len() >= cases.len(), WAIT).await;
    for ((_, status, reason, id, cut), m) in cases.iter().zip(&got) {
        let r = json_of(m);
        assert_eq!(
            (&r["status"], &r["reason"]),
            (&json!(status), &json!(reason)),
            "{r}"
        );
        let echoed = r["id"].as_str().unwrap_or_else(|| panic!("no id in {r}"));
        if *cut {
            // The limit counts characters (as the schema's maxLength): the first 128 of them.
            assert!(echoed.chars().count() == 128 && id.starts_with(echoed));
            assert_eq!(r["id_truncated"], true);
        } else {
            assert_eq!(echoed, id);
            assert!(r.get("id_truncated").is_none());
        }
        println!(
            "limits: {status}/{reason}: result id {} ({} bytes sent)",
            if *cut { "cut, id_truncated" } else { "whole" },
            id.len()
        );
    }
    link.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Reconnection after a long outage (the daemon as a child process, default reconnect settings).

fn write_config(dir: &Path, b: &Broker, signer: &SigningKey) -> std::path::PathBuf {
    b.write_gateway_config(dir, "data", &signer.verifying_key(), "", "")
}

/// The text of a log line without its colours.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The waits the daemon logged (`retry_in_ms=`), as they come.
fn watch_waits(child: &mut std::process::Child) -> Arc<Mutex<Vec<u64>>> {
    let waits = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let w = waits.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let line = strip_ansi(&line);
            if let Some(rest) = line.split("retry_in_ms=").nth(1) {
                let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if let Ok(ms) = n.parse() {
                    w.lock().unwrap().push(ms);
                }
            }
        }
    });
    waits
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_broker_outage_is_followed_by_a_reconnection_within_the_wait_bound() {
    let mut b = broker_with(&[]);
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = topics();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &b, &signer);
    let cfg = gatehouse::config::Config::load(&path).unwrap();
    let cloud = cfg.cloud.as_ref().expect("[cloud]");
    let (min, max) = (
        cloud.reconnect_min.as_millis() as u64,
        cloud.reconnect_max.as_millis() as u64,
    );
    let mut child = Command::new(gatehouse_bin())
        .args(["run", "--config", path.to_str().unwrap()])
        .env("RUST_LOG", "gatehouse=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let waits = watch_waits(&mut child);
    wait_online(&b, &t).await;
    // The outage: long enough for the wait to reach its cap and stay there three times.
    b.kill();
    let doublings = (max / min).ilog2() as usize + 1;
    let outage = doublings + 3;
    let deadline = Instant::now() + Duration::from_secs(120);
    while waits.lock().unwrap().len() < outage {
        assert!(Instant::now() < deadline, "the daemon stopped retrying");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.restart();
    wait_online(&b, &t).await;
    let seen = waits.lock().unwrap().clone();
    // Every wait is in [50 %, 100 %] of min × 2^k capped at max: never longer than the
    // configured maximum, however long the outage.
    for (k, &w) in seen.iter().enumerate() {
        let d = min.saturating_mul(1u64 << k.min(32)).min(max);
        assert!(
            (d / 2..=d).contains(&w),
            "wait {k} was {w} ms, outside [{}, {d}] (min {min}, max {max}); waits {seen:?}",
            d / 2
        );
    }
    assert!(seen.iter().filter(|&&w| w > max / 2).count() >= 3);
    assert!(max <= 4_000, "the default cap is {max} ms");
    println!(
        "limits: broker down for {} attempts: waits {seen:?} ms, all within [50 %, 100 %] of \
         min({min} × 2^k, {max}); back after the restart",
        seen.len()
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_for_another_site_or_gateway_is_refused_over_the_broker_and_its_id_stays_free() {
    let b = broker_with(&[]);
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = topics();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 100_000).unwrap());
    let link = start_link(
        store.clone(),
        cloud_config(&b, Protocol::V311, &signer),
        &signer,
    );
    let results =
        Subscriber::connect(&b, "cloud-results", &format!("{}/cmd/+/result", t.base())).await;
    results.wait_subscribed(1, WAIT).await;
    let events = Subscriber::connect(&b, "cloud-events", &t.events()).await;
    events.wait_subscribed(1, WAIT).await;
    wait_online(&b, &t).await;
    let cloud = Subscriber::connect(&b, "cloud-pub", "none/#").await;
    let send = |cmd: &Cmd| {
        cloud
            .client
            .try_publish(
                format!("{}/cmd/ping", t.base()),
                rumqttc::QoS::AtLeastOnce,
                false,
                sign(cmd, &signer),
            )
            .unwrap();
    };
    // Captured at another site (or for another gateway of this site), replayed here: refused
    // before anything is done, the id not claimed.
    send(&Cmd {
        site: "site-2".into(),
        ..ping("aud-1")
    });
    send(&Cmd {
        gateway: "gw-9".into(),
        ..ping("aud-1")
    });
    let got = results.wait_for(|m| m.len() >= 2, WAIT).await;
    for m in &got[..2] {
        let r = json_of(m);
        assert_eq!(
            (&r["status"], &r["reason"]),
            (&json!("refused"), &json!("wrong_gateway")),
            "{r}"
        );
        assert_eq!(r["id"], "aud-1");
    }
    assert!(store.commands().get("aud-1").unwrap().is_none());
    // The genuine command with the same id still runs.
    send(&ping("aud-1"));
    let got = results.wait_for(|m| m.len() >= 3, WAIT).await;
    let r = json_of(&got[2]);
    assert_eq!(r["status"], "done", "{r}");
    let refused = recorded_kinds(&store, &events, "command_refused").await;
    assert_eq!(refused.len(), 2, "{refused:?}");
    println!(
        "limits: a signed ping for site-2 and for gw-9 refused wrong_gateway over the broker ({} command_refused), the id then ran here",
        refused.len()
    );
    link.stop().await;
}
