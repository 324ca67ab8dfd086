//! The cloud link against a real mosquitto with mutual TLS, started per test (tests/support).

#[path = "support/broker.rs"]
mod broker;
mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use broker::{Broker, Subscriber};
use chrono::{TimeZone, Utc};
use common::*;
use ed25519_dalek::SigningKey;
use gatehouse::cloud::commands::{
    CommandConfig, Router, SimulatedRelays, SimulatedUnits, sign, sign_payload,
};
use gatehouse::cloud::link::{CloudLink, Commands};
use gatehouse::cloud::messages::{Command as Cmd, CommandTarget, SnapshotChunk, Topics};
use gatehouse::config::{CloudConfig, Protocol, Transport};
use gatehouse::events::EventKind;
use gatehouse::store::{NewEvent, Store};
use serde_json::{Value, json};
use sha2::Digest;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// A broker that never drops QoS 1 messages queued for a slow subscriber (mosquitto's default
/// drops beyond 1,000): the tests count at the subscriber what the gateway delivered.
fn broker() -> Broker {
    Broker::start_with(broker::BrokerOptions {
        extra_config: vec!["max_queued_messages 0".into()],
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
        reconnect_min: Duration::from_millis(1500),
        reconnect_max: Duration::from_millis(3000),
        command_public: signer.verifying_key(),
        command_max_skew: Duration::from_secs(30),
        max_message_bytes: 16 * 1024,
        inflight: 50,
    }
}

/// Waits until the link says it is online (it subscribes before it publishes that).
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

fn topics() -> Topics {
    Topics::new("gatehouse", "site-1", "gw-1")
}

fn ev(i: u64) -> NewEvent {
    NewEvent {
        at: Utc::now(),
        local: String::new(),
        kind: EventKind::AccessGranted,
        payload: json!({"i": i}),
    }
}

/// Sequence numbers of the events received, in order of arrival.
fn seqs(msgs: &[broker::Received], t: &Topics) -> Vec<u64> {
    msgs.iter()
        .filter(|m| m.topic == t.events())
        .map(|m| {
            serde_json::from_slice::<Value>(&m.payload).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// Has every expected event arrived? Cheap first (a count), exact only when it could be true:
/// the subscriber polls this every few milliseconds over tens of thousands of messages.
fn all_arrived(m: &[broker::Received], t: &Topics, expected: &BTreeSet<u64>) -> bool {
    m.len() >= expected.len() && expected.is_subset(&seqs(m, t).into_iter().collect())
}

/// Every sequence number in `expected` arrived, and first arrivals are in increasing order.
fn check_in_order(got: &[u64], expected: &BTreeSet<u64>) {
    let mut seen = BTreeSet::new();
    let mut last = 0;
    for &s in got {
        if seen.insert(s) {
            assert!(s > last, "first delivery of {s} after {last}: out of order");
            last = s;
        }
    }
    let missing: Vec<&u64> = expected.difference(&seen).collect();
    assert!(missing.is_empty(), "lost events: {missing:?}");
}

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start_link(
    store: Arc<Store>,
    cfg: CloudConfig,
    session: u64,
    commands: Option<Arc<Commands>>,
) -> Running {
    let shutdown = CancellationToken::new();
    let link = CloudLink::new(cfg, "site-1", "gw-1", store.clone(), session, commands);
    let task = tokio::spawn(link.run(shutdown.child_token()));
    Running { shutdown, task }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn events_flow_in_order_over_mutual_tls_and_leave_the_outbox_on_puback() {
    for protocol in [Protocol::V311, Protocol::V5] {
        let b = broker();
        let signer = SigningKey::from_bytes(&[1; 32]);
        let t = topics();
        let sub = Subscriber::connect(&b, "cloud", "gatehouse/site-1/gw-1/#").await;
        sub.wait_subscribed(1, WAIT).await;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 100_000).unwrap());
        let first = store
            .events()
            .append(&(0..200).map(ev).collect::<Vec<_>>())
            .unwrap();
        let link = start_link(store.clone(), cloud_config(&b, protocol, &signer), 7, None);
        let later = store
            .events()
            .append(&(200..300).map(ev).collect::<Vec<_>>())
            .unwrap();
        let expected: BTreeSet<u64> = first.iter().chain(later.iter()).copied().collect();
        let msgs = sub
            .wait_for(
                |m| seqs(m, &t).iter().collect::<BTreeSet<_>>().len() >= 300,
                WAIT,
            )
            .await;
        check_in_order(&seqs(&msgs, &t), &expected);
        // Shape: unique id, original time, historical for what was recorded before connecting.
        let events: Vec<Value> = msgs
            .iter()
            .filter(|m| m.topic == t.events())
            .map(|m| serde_json::from_slice(&m.payload).unwrap())
            .collect();
        let e0 = &events[0];
        assert_eq!(e0["id"], format!("{}-{}", store.epoch(), e0["seq"]));
        assert_eq!(
            e0["historical"], true,
            "{protocol:?}: recorded before the connection"
        );
        assert_eq!(e0["kind"], "access_granted");
        // The outbox empties only as PUBACKs arrive.
        for _ in 0..300 {
            if store.events().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(store.events().is_empty(), "{} left", store.events().len());
        // The status is retained with the session number.
        let late = Subscriber::connect(&b, "late", &t.status()).await;
        let st = late.wait_for(|m| !m.is_empty(), WAIT).await;
        let status: Value = serde_json::from_slice(&st[0].payload).unwrap();
        assert!(st[0].retain);
        assert_eq!(
            (status["online"].clone(), status["session"].clone()),
            (json!(true), json!(7))
        );
        link.stop().await;
        // A clean stop leaves `offline` retained.
        let after = Subscriber::connect(&b, "after", &t.status()).await;
        let st = after.wait_for(|m| !m.is_empty(), WAIT).await;
        assert_eq!(
            serde_json::from_slice::<Value>(&st[0].payload).unwrap()["online"],
            false
        );
    }
}

/// The broker goes away twice: stopped (SIGTERM) mid-stream with events in flight, and killed
/// (SIGKILL) with events appended while it is away. The cloud's subscriber keeps a persistent
/// session on a broker with persistence, so what the broker acknowledged reaches it after the
/// restart too. A SIGKILLed mosquitto can lose what it acknowledged but had not yet saved or
/// delivered (the broker's loss, which no client can prevent), so before the kill the test lets
/// the subscriber catch up.
#[tokio::test(flavor = "multi_thread")]
async fn broker_restarted_mid_stream_loses_nothing_and_keeps_order() {
    let mut b = Broker::start_with(broker::BrokerOptions {
        persistence: true,
        extra_config: vec!["max_queued_messages 0".into()],
        ..Default::default()
    });
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = topics();
    let mut opts = b.mqtt_options_as("cloud", "cloud-persistent");
    opts.set_clean_session(false);
    let sub = Subscriber::with_options(opts, &t.events()).await;
    sub.wait_subscribed(1, WAIT).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 100_000).unwrap());
    let link = start_link(
        store.clone(),
        cloud_config(&b, Protocol::V311, &signer),
        1,
        None,
    );
    let mut expected = BTreeSet::new();
    for round in 0..40u64 {
        if round == 30 {
            // SIGKILL: everything so far delivered, then the broker dies and events go on
            // being appended while it is away.
            sub.wait_for(|m| all_arrived(m, &t, &expected), WAIT).await;
            b.kill();
        }
        let batch: Vec<NewEvent> = (0..50).map(|i| ev(round * 50 + i)).collect();
        expected.extend(store.events().append(&batch).unwrap());
        if round == 15 {
            // SIGTERM mid-stream: events are in flight and unacknowledged.
            b.terminate();
        }
        if round == 15 || round == 30 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            b.restart();
            sub.wait_subscribed(if round == 15 { 2 } else { 3 }, WAIT)
                .await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let msgs = sub.wait_for(|m| all_arrived(m, &t, &expected), WAIT).await;
    check_in_order(&seqs(&msgs, &t), &expected);
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_compressed_in_time_drains_its_backlog_as_historical_with_original_times() {
    // The cloud's subscriber keeps a persistent session on a broker with persistence, so that
    // whatever the link sends before the subscriber is back is queued for it, not missed.
    let mut b = Broker::start_with(broker::BrokerOptions {
        persistence: true,
        extra_config: vec!["max_queued_messages 0".into()],
        ..Default::default()
    });
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = topics();
    let mut opts = b.mqtt_options_as("cloud", "cloud-persistent");
    opts.set_clean_session(false);
    let sub = Subscriber::with_options(opts, &t.events()).await;
    sub.wait_subscribed(1, WAIT).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 100_000).unwrap());
    b.terminate();
    let link = start_link(
        store.clone(),
        cloud_config(&b, Protocol::V311, &signer),
        1,
        None,
    );
    // Six hours of site activity while the cloud is unreachable, one event a second, compressed.
    let start = Utc.with_ymd_and_hms(2026, 11, 23, 3, 0, 0).unwrap();
    let backlog: Vec<NewEvent> = (0..21_600)
        .map(|i| NewEvent {
            at: start + chrono::Duration::seconds(i),
            local: String::new(),
            kind: EventKind::AccessDenied,
            payload: json!({"i": i}),
        })
        .collect();
    let expected: BTreeSet<u64> = store
        .events()
        .append(&backlog)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        store.events().len(),
        21_600,
        "queued while the cloud is away"
    );
    b.restart();
    let msgs = sub
        .wait_for(|m| all_arrived(m, &t, &expected), Duration::from_secs(120))
        .await;
    check_in_order(&seqs(&msgs, &t), &expected);
    let last: Value = serde_json::from_slice(&msgs.last().unwrap().payload).unwrap();
    assert_eq!(last["historical"], true);
    assert_eq!(last["at"], json!(start + chrono::Duration::seconds(21_599)));
    link.stop().await;
}

fn write_daemon_config(dir: &Path, b: &Broker, signer: &SigningKey) -> std::path::PathBuf {
    b.write_gateway_config(
        dir,
        "data",
        &signer.verifying_key(),
        "reconnect_min_ms = 200\n",
        "",
    )
}

fn daemon(cfg: &Path) -> Child {
    Command::new(gatehouse_bin())
        .args(["run", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_killed_mid_stream_loses_no_appended_event() {
    let b = broker();
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = topics();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_daemon_config(dir.path(), &b, &signer);
    // Events appended before the daemon runs (as by a previous run that never reached the cloud).
    let expected: BTreeSet<u64> = {
        let store = Store::open(&dir.path().join("data"), 1_000_000).unwrap();
        let mut all = BTreeSet::new();
        for k in 0..20 {
            all.extend(
                store
                    .events()
                    .append(&(0..1000).map(|i| ev(k * 1000 + i)).collect::<Vec<_>>())
                    .unwrap(),
            );
        }
        all
    };
    let sub = Subscriber::connect(&b, "cloud", &t.events()).await;
    sub.wait_subscribed(1, WAIT).await;
    let mut child = daemon(&cfg);
    // Kill it with SIGKILL once part of the stream went through.
    sub.wait_for(|m| m.len() >= 2_000, WAIT).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = seqs(&sub.messages(), &t).len();
    assert!(
        partial < expected.len() + 10,
        "killed mid-stream ({partial} received)"
    );
    let mut child = daemon(&cfg);
    let msgs = match sub
        .try_wait_for(|m| all_arrived(m, &t, &expected), Duration::from_secs(60))
        .await
    {
        Some(m) => m,
        None => {
            let got: BTreeSet<u64> = seqs(&sub.messages(), &t).into_iter().collect();
            let missing: Vec<&u64> = expected.difference(&got).collect();
            let log = b.log();
            let dropped: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("dropped") || l.contains("drop"))
                .take(3)
                .collect();
            panic!(
                "missing {} events: {:?}; broker: {dropped:?}",
                missing.len(),
                &missing[..missing.len().min(10)]
            );
        }
    };
    let got = seqs(&msgs, &t);
    let distinct: BTreeSet<u64> = got.iter().copied().collect();
    assert!(expected.is_subset(&distinct));
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_last_will_marks_the_gateway_offline_after_an_unclean_disconnect() {
    let b = broker();
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = topics();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_daemon_config(dir.path(), &b, &signer);
    let sub = Subscriber::connect(&b, "cloud", &t.status()).await;
    sub.wait_subscribed(1, WAIT).await;
    let mut child = daemon(&cfg);
    let status = |m: &broker::Received| serde_json::from_slice::<Value>(&m.payload).unwrap();
    let msgs = sub
        .wait_for(|m| m.iter().any(|x| status(x)["online"] == true), WAIT)
        .await;
    let online = status(msgs.iter().find(|x| status(x)["online"] == true).unwrap());
    let session = online["session"].as_u64().unwrap();
    assert!(online["started_at"].is_string() && online["site_version"].is_u64());
    child.kill().unwrap(); // no DISCONNECT: the broker sends the will
    child.wait().unwrap();
    let msgs = sub
        .wait_for(|m| status(m.last().unwrap())["online"] == false, WAIT)
        .await;
    let will = status(msgs.last().unwrap());
    assert_eq!(
        will["session"], session,
        "the will names the session it belongs to"
    );
    // Retained: a newcomer learns the gateway is offline.
    let late = Subscriber::connect(&b, "late", &t.status()).await;
    let st = late.wait_for(|m| !m.is_empty(), WAIT).await;
    assert!(st[0].retain);
    assert_eq!(status(&st[0])["online"], false);
    // Back: online again with the next session number (persisted across restarts).
    let mut child = daemon(&cfg);
    sub.wait_for(
        |m| {
            let s = status(m.last().unwrap());
            s["online"] == true && s["session"] == session + 1
        },
        WAIT,
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
}

fn command(
    name: &str,
    id: &str,
    target: Option<CommandTarget>,
    args: Value,
    issued: i64,
    lifetime: i64,
) -> Cmd {
    let now = Utc::now();
    Cmd {
        v: 2,
        site: "site-1".into(),
        gateway: "gw-1".into(),
        id: id.into(),
        name: name.into(),
        issued_at: now + chrono::Duration::seconds(issued),
        expires_at: now + chrono::Duration::seconds(issued + lifetime),
        target,
        args,
    }
}

fn unit(id: &str) -> Option<CommandTarget> {
    Some(CommandTarget {
        unit: Some(id.into()),
        entry: None,
        device: None,
        channel: None,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_run_exactly_once_and_every_refusal_is_answered_with_its_reason() {
    let b = broker();
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = topics();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 100_000).unwrap());
    store
        .apply(&gatehouse::sync::parse(include_bytes!("../config/demo-snapshot.json")).unwrap())
        .unwrap();
    let units = Arc::new(SimulatedUnits::new(["lock-a101", "lock-a102", "lock-b201"]));
    let relays = Arc::new(SimulatedRelays::new(["relay-board-1"]));
    let commands = Arc::new(Commands {
        router: Arc::new(Router::new(units.clone(), relays)),
        cfg: CommandConfig {
            public: signer.verifying_key(),
            site: "site-1".into(),
            gateway: "gw-1".into(),
            max_skew: chrono::Duration::seconds(30),
            max_bytes: 16 * 1024,
        },
    });
    let link = start_link(
        store.clone(),
        cloud_config(&b, Protocol::V311, &signer),
        1,
        Some(commands),
    );
    let results = Subscriber::connect(&b, "cloud", "gatehouse/site-1/gw-1/cmd/+/result").await;
    results.wait_subscribed(1, WAIT).await;
    let events = Subscriber::connect(&b, "cloud-events", &t.events()).await;
    events.wait_subscribed(1, WAIT).await;
    let cloud = Subscriber::connect(&b, "cloud-pub", "none/#").await;
    // Wait for the link to subscribe (its online status is published after it subscribed).
    wait_online(&b, &t).await;
    let send = |name: &str, bytes: Vec<u8>| {
        let topic = format!("{}/cmd/{name}", t.base());
        cloud
            .client
            .try_publish(topic, rumqttc::QoS::AtLeastOnce, false, bytes)
            .unwrap();
    };
    let other = SigningKey::from_bytes(&[2; 32]);
    let ok = sign(
        &command("unlock", "c-1", unit("A-101"), Value::Null, 0, 60),
        &signer,
    );
    // The same signed command delivered twice.
    send("unlock", ok.clone());
    send("unlock", ok);
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "unlock",
            br#"{"payload":"eyJ2IjoxfQ"}"#.to_vec(),
            "refused",
            "unsigned",
        ),
        (
            "unlock",
            sign(
                &command("unlock", "c-2", unit("A-101"), Value::Null, 0, 60),
                &other,
            ),
            "refused",
            "bad_signature",
        ),
        (
            "unlock",
            sign(
                &command("unlock", "c-3", unit("A-101"), Value::Null, -120, 60),
                &signer,
            ),
            "refused",
            "expired",
        ),
        (
            "unlock",
            sign(
                &command("unlock", "c-4", unit("A-101"), Value::Null, 600, 60),
                &signer,
            ),
            "refused",
            "issued_in_future",
        ),
        (
            "unlock",
            sign(
                &command("unlock", "c-5", unit("Z-9"), Value::Null, 0, 60),
                &signer,
            ),
            "refused",
            "unknown_target",
        ),
        (
            "unlock",
            sign(
                &command("unlock", "c-6", unit("A-103"), Value::Null, 0, 60),
                &signer,
            ),
            "refused",
            "no_controller",
        ),
        (
            "locate",
            sign(
                &command("locate", "c-7", unit("B-201"), Value::Null, 0, 60),
                &signer,
            ),
            "done",
            "",
        ),
        (
            "emergency_unlock",
            sign(
                &command(
                    "emergency_unlock",
                    "c-8",
                    unit("A-102"),
                    json!({"reason": "tenant_locked_phone_in_unit"}),
                    0,
                    60,
                ),
                &signer,
            ),
            "done",
            "",
        ),
        (
            "emergency_unlock",
            sign(
                &command(
                    "emergency_unlock",
                    "c-9",
                    unit("A-102"),
                    json!({"reason": "boredom"}),
                    0,
                    60,
                ),
                &signer,
            ),
            "refused",
            "bad_reason",
        ),
        (
            "unlock",
            b"this is not json".to_vec(),
            "malformed",
            "not_json",
        ),
        (
            "unlock",
            sign_payload(
                &[
                    b'{', b'"', b'i', b'd', b'"', b':', b'"', b'c', b'-', b'x', b'"', b',',
                ]
                .iter()
                .copied()
                .chain(std::iter::repeat_n(b' ', 20_000))
                .collect::<Vec<u8>>(),
                &signer,
            ),
            "malformed",
            "too_large",
        ),
    ];
    for (name, bytes, _, _) in &cases {
        send(name, bytes.clone());
    }
    let results_of = |m: &[broker::Received]| -> Vec<Value> {
        m.iter()
            .map(|x| serde_json::from_slice(&x.payload).unwrap())
            .collect()
    };
    let msgs = results.wait_for(|m| m.len() >= 2 + cases.len(), WAIT).await;
    let all = results_of(&msgs);
    // Exactly once: two identical answers, one execution.
    let first: Vec<&Value> = all.iter().filter(|r| r["id"] == "c-1").collect();
    assert_eq!(first.len(), 2, "{all:?}");
    assert_eq!(first[0]["status"], "done");
    assert_eq!(
        first[0], first[1],
        "the duplicate is answered with the first result"
    );
    let unlocks = units
        .executed()
        .iter()
        .filter(|(d, _)| d == "lock-a101")
        .count();
    assert_eq!(unlocks, 1, "executed once");
    for (name, _, status, reason) in &cases {
        let hit = all.iter().find(|r| {
            r["name"] == *name
                && r["status"] == *status
                && (reason.is_empty() || r["reason"] == *reason)
        });
        assert!(
            hit.is_some(),
            "no `{status}` `{reason}` result for {name}: {all:?}"
        );
    }
    // Offline target: the device stops answering.
    units.set_online("lock-b201", gatehouse::cloud::commands::Online::No);
    send(
        "unlock",
        sign(
            &command("unlock", "c-10", unit("B-201"), Value::Null, 0, 60),
            &signer,
        ),
    );
    results
        .wait_for(
            |m| {
                results_of(m)
                    .iter()
                    .any(|r| r["id"] == "c-10" && r["reason"] == "target_offline")
            },
            WAIT,
        )
        .await;
    // The override unlock, the remote unlock and the refusals reach the cloud as events.
    let kinds = |m: &[broker::Received]| -> Vec<Value> {
        m.iter()
            .map(|x| serde_json::from_slice::<Value>(&x.payload).unwrap())
            .collect()
    };
    events
        .wait_for(
            |m| {
                let k = kinds(m);
                k.iter().any(|e| {
                    e["kind"] == "override_unlock"
                        && e["payload"]["emergency"]["reason"] == "tenant_locked_phone_in_unit"
                }) && k
                    .iter()
                    .any(|e| e["kind"] == "remote_unlock" && e["payload"]["command_id"] == "c-1")
                    && k.iter().any(|e| {
                        e["kind"] == "command_refused" && e["payload"]["reason"] == "bad_signature"
                    })
            },
            WAIT,
        )
        .await;
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_in_chunks_and_deltas_apply_over_mqtt() {
    let b = broker();
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = topics();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 100_000).unwrap());
    let link = start_link(
        store.clone(),
        cloud_config(&b, Protocol::V5, &signer),
        1,
        None,
    );
    let results = Subscriber::connect(&b, "cloud", &t.sync_result()).await;
    results.wait_subscribed(1, WAIT).await;
    let cloud = Subscriber::connect(&b, "cloud-pub", "none/#").await;
    wait_online(&b, &t).await;
    let doc = serde_json::to_vec(&tenants_snapshot(40, 3_000, 100_000)).unwrap();
    let sha = hex::encode(sha2::Sha256::digest(&doc));
    let parts: Vec<&[u8]> = doc.chunks(doc.len() / 3 + 1).collect();
    let publish = |topic: String, v: Vec<u8>| {
        cloud
            .client
            .try_publish(topic, rumqttc::QoS::AtLeastOnce, false, v)
            .unwrap();
    };
    // Parts out of order, one of them twice.
    for i in [2usize, 0, 0, 1] {
        let chunk = SnapshotChunk {
            id: "snap-1".into(),
            index: i as u32,
            count: parts.len() as u32,
            sha256: sha.clone(),
            data: base64::engine::general_purpose::STANDARD.encode(parts[i]),
        };
        publish(t.sync_snapshot(), serde_json::to_vec(&chunk).unwrap());
    }
    let msgs = results.wait_for(|m| !m.is_empty(), WAIT).await;
    let r: Value = serde_json::from_slice(&msgs[0].payload).unwrap();
    assert_eq!(
        (r["status"].clone(), r["id"].clone(), r["version"].clone()),
        (json!("applied"), json!("snap-1"), json!(40))
    );
    assert_eq!(store.stats().counts.credentials, 3_000);
    // A delta on the current version, then one on a stale base.
    let delta = |base: u64, v: u64| {
        serde_json::to_vec(
            &json!({"schema_version": 1, "kind": "delta", "base_version": base, "version": v,
            "delete": {"credentials": ["c0"]}}),
        )
        .unwrap()
    };
    publish(t.sync_delta(), delta(40, 41));
    results.wait_for(|m| m.len() >= 2, WAIT).await;
    publish(t.sync_delta(), delta(40, 42));
    let msgs = results.wait_for(|m| m.len() >= 3, WAIT).await;
    let r1: Value = serde_json::from_slice(&msgs[1].payload).unwrap();
    let r2: Value = serde_json::from_slice(&msgs[2].payload).unwrap();
    assert_eq!(
        (r1["status"].clone(), r1["current_version"].clone()),
        (json!("applied"), json!(41))
    );
    assert_eq!(
        (r2["status"].clone(), r2["current_version"].clone()),
        (json!("resync_needed"), json!(41))
    );
    // A snapshot whose parts do not match their checksum changes nothing.
    let bad = SnapshotChunk {
        id: "snap-2".into(),
        index: 0,
        count: 1,
        sha256: "00".repeat(32),
        data: base64::engine::general_purpose::STANDARD.encode(&doc),
    };
    publish(t.sync_snapshot(), serde_json::to_vec(&bad).unwrap());
    let msgs = results.wait_for(|m| m.len() >= 4, WAIT).await;
    let r3: Value = serde_json::from_slice(&msgs[3].payload).unwrap();
    assert_eq!(r3["status"], "refused");
    assert!(r3["reason"].as_str().unwrap().contains("sha256"), "{r3}");
    assert_eq!(store.stats().version, 41);
    link.stop().await;
}

/// A unit controller whose `lock-a101` answers only when the test lets it (a padlock out of
/// range, retried); the others at once.
struct GatedUnits {
    gate: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    executed: std::sync::Mutex<Vec<String>>,
}

impl gatehouse::cloud::commands::UnitControllers for GatedUnits {
    fn online(&self, _device: &str) -> gatehouse::cloud::commands::Online {
        gatehouse::cloud::commands::Online::Yes
    }
    fn execute(
        &self,
        device: &str,
        _action: gatehouse::cloud::commands::UnitAction,
    ) -> gatehouse::cloud::commands::Execution {
        if device == "lock-a101" {
            let _ = self.gate.lock().unwrap().recv();
        }
        self.executed.lock().unwrap().push(device.to_string());
        gatehouse::cloud::commands::Execution::Done("unlocked".into())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_device_holds_up_only_its_own_commands() {
    let b = broker();
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = topics();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 100_000).unwrap());
    store
        .apply(&gatehouse::sync::parse(include_bytes!("../config/demo-snapshot.json")).unwrap())
        .unwrap();
    let (release, gate) = std::sync::mpsc::channel();
    let units = Arc::new(GatedUnits {
        gate: std::sync::Mutex::new(gate),
        executed: std::sync::Mutex::new(Vec::new()),
    });
    let commands = Arc::new(Commands {
        router: Arc::new(Router::new(
            units.clone(),
            Arc::new(SimulatedRelays::new(["relay-board-1"])),
        )),
        cfg: CommandConfig {
            public: signer.verifying_key(),
            site: "site-1".into(),
            gateway: "gw-1".into(),
            max_skew: chrono::Duration::seconds(30),
            max_bytes: 16 * 1024,
        },
    });
    let link = start_link(
        store.clone(),
        cloud_config(&b, Protocol::V311, &signer),
        1,
        Some(commands),
    );
    let results = Subscriber::connect(&b, "cloud", "gatehouse/site-1/gw-1/cmd/+/result").await;
    let cloud = Subscriber::connect(&b, "cloud-pub", "none/#").await;
    wait_online(&b, &t).await;
    let send = |name: &str, bytes: Vec<u8>| {
        let topic = format!("{}/cmd/{name}", t.base());
        cloud
            .client
            .try_publish(topic, rumqttc::QoS::AtLeastOnce, false, bytes)
            .unwrap();
    };
    let slow = sign(
        &command("unlock", "slow", unit("A-101"), Value::Null, 0, 60),
        &signer,
    );
    send("unlock", slow.clone());
    send("unlock", slow);
    send(
        "unlock",
        sign(
            &command("unlock", "fast", unit("A-102"), Value::Null, 0, 60),
            &signer,
        ),
    );
    send(
        "ping",
        sign(&command("ping", "p-1", None, Value::Null, 0, 60), &signer),
    );
    let result_of = |m: &broker::Received| serde_json::from_slice::<Value>(&m.payload).unwrap();
    // The other unit's unlock and the ping are answered while A-101's padlock still hangs.
    let got = results
        .wait_for(
            |m| {
                let ids: Vec<Value> = m.iter().map(|x| result_of(x)["id"].clone()).collect();
                ids.contains(&json!("fast")) && ids.contains(&json!("p-1"))
            },
            WAIT,
        )
        .await;
    assert!(
        !got.iter().any(|m| result_of(m)["id"] == "slow"),
        "the slow command cannot have finished yet"
    );
    assert_eq!(
        *units.executed.lock().unwrap(),
        vec!["lock-a102".to_string()]
    );
    // Released: done once; its duplicate, queued behind it in the same lane, gets its result.
    release.send(()).unwrap();
    let got = results
        .wait_for(
            |m| m.iter().filter(|x| result_of(x)["id"] == "slow").count() == 2,
            WAIT,
        )
        .await;
    for m in got.iter().filter(|x| result_of(x)["id"] == "slow") {
        assert_eq!(result_of(m)["status"], "done", "{}", m.text());
    }
    assert_eq!(
        units
            .executed
            .lock()
            .unwrap()
            .iter()
            .filter(|d| *d == "lock-a101")
            .count(),
        1
    );
    link.stop().await;
}
