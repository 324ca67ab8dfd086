//! Fault campaign: the daemon killed at every named crash point of the event path (append,
//! flush, publish, acknowledgement, delete) and at random moments, with and without a slow disk,
//! against a real mosquitto over mutual TLS. A subscriber plays the cloud and records every
//! event it receives. After the rounds the daemon drains its outbox, and the test checks the
//! promise of docs/guarantees.md: no sequence number is ever delivered with two different
//! contents, and none is missing between the first and the last delivered (trims are off: the
//! bound is far above what the test appends).
//!
//! Events are made in the running daemon by publishing refusable sync deltas (each one appends a
//! `sync_refused` event, flushed, on the sync thread) plus the daemon's own `gateway_started`.
//! Rounds: the named points once each and 4 random kills by default; `GATEHOUSE_FAULT_SCALE=N`
//! multiplies them. `GATEHOUSE_FAULT_SEED` replays a run (the seed is printed).

#[path = "support/broker.rs"]
mod broker;
mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use broker::{Broker, Received, Subscriber};
use common::gatehouse_bin;
use gatehouse::cloud::messages::Topics;
use gatehouse::store::Store;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

fn scale() -> u64 {
    std::env::var("GATEHOUSE_FAULT_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// xorshift64*: enough to pick moments; the seed is printed so a run can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

fn write_config(dir: &Path, b: &Broker) -> std::path::PathBuf {
    let signer = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    b.write_gateway_config(
        dir,
        "data",
        &signer.verifying_key(),
        "reconnect_min_ms = 200\n",
        "",
    )
}

fn daemon(cfg: &Path, crash_at: Option<&str>, flush_delay_ms: Option<u64>) -> Child {
    let mut cmd = Command::new(gatehouse_bin());
    cmd.args(["run", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    match crash_at {
        Some(p) => cmd.env("GATEHOUSE_CRASH_AT", p),
        None => cmd.env_remove("GATEHOUSE_CRASH_AT"),
    };
    match flush_delay_ms {
        Some(ms) => cmd.env("GATEHOUSE_FLUSH_DELAY_MS", ms.to_string()),
        None => cmd.env_remove("GATEHOUSE_FLUSH_DELAY_MS"),
    };
    cmd.spawn().unwrap()
}

/// Waits for the child to end by itself (an abort at its crash point).
async fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// What the cloud saw: seq -> the event message without `historical` (which depends on the
/// connection that sent it), and every sequence number with two different contents.
#[derive(Default)]
struct Seen {
    first: BTreeMap<u64, Value>,
    conflicts: Vec<(u64, Value, Value)>,
    deliveries: usize,
}

fn tally(msgs: &[Received], t: &Topics) -> Seen {
    let mut seen = Seen::default();
    for m in msgs.iter().filter(|m| m.topic == t.events()) {
        let mut v: Value = serde_json::from_slice(&m.payload).expect("event message is JSON");
        let seq = v["seq"].as_u64().expect("event has a seq");
        if let Some(o) = v.as_object_mut() {
            o.remove("historical");
        }
        seen.deliveries += 1;
        match seen.first.get(&seq) {
            Some(prev) if *prev != v => seen.conflicts.push((seq, prev.clone(), v)),
            Some(_) => {}
            None => {
                seen.first.insert(seq, v);
            }
        }
    }
    seen
}

fn missing(seen: &Seen, upto: u64) -> Vec<u64> {
    let Some(&lo) = seen.first.keys().next() else {
        return vec![];
    };
    (lo..=upto)
        .filter(|s| !seen.first.contains_key(s))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kills_at_every_crash_point_never_publish_one_seq_twice_differently_nor_lose_one() {
    let b = Broker::start_with(broker::BrokerOptions {
        extra_config: vec!["max_queued_messages 0".into()],
        ..Default::default()
    });
    let t = Topics::new("gatehouse", "site-1", "gw-1");
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &b);
    let cloud = Subscriber::connect(&b, "cloud", &t.events()).await;
    // The feeder: a refusable delta every 15 ms while the test runs (one event each).
    let feeder = Subscriber::connect(&b, "cloud", &t.sync_result()).await;
    let feeding = Arc::new(AtomicBool::new(true));
    let feed_task = {
        let (client, topic, feeding) = (feeder.client.clone(), t.sync_delta(), feeding.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while feeding.load(Ordering::Relaxed) {
                n += 1;
                let doc = json!({"schema_version": 1, "kind": "delta", "base_version": 1_000 + n,
                                 "version": 1_001 + n, "delete": {"credentials": [format!("c{n}")]}});
                let _ = client.try_publish(
                    topic.clone(),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    serde_json::to_vec(&doc).unwrap(),
                );
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    let seed = std::env::var("GATEHOUSE_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            let mut b = [0u8; 8];
            getrandom::getrandom(&mut b).unwrap();
            u64::from_le_bytes(b) | 1
        });
    println!("faults: seed {seed} (GATEHOUSE_FAULT_SEED replays)");
    let mut rng = Rng(seed);
    let points = [
        "event_applied",
        "event_flushed",
        "event_published",
        "event_acked",
        "event_deleted",
    ];
    let rounds = scale();
    let mut kills = 0u64;
    for round in 0..rounds {
        for point in points {
            // The n-th time the point is reached in this run of the daemon.
            let nth = 1 + rng.below(if point == "event_deleted" { 4 } else { 25 });
            let slow = rng.below(2) == 0;
            let at = format!("{point}@{nth}");
            let mut child = daemon(&cfg, Some(&at), slow.then_some(40));
            let status = match wait_exit(&mut child, WAIT).await {
                Some(st) => st,
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("round {round}: the daemon never reached {at}");
                }
            };
            assert_eq!(
                status.signal(),
                Some(6),
                "round {round}: {at} should abort the daemon: {status:?}"
            );
            kills += 1;
        }
        for _ in 0..4 {
            let slow = rng.below(2) == 0;
            let mut child = daemon(&cfg, None, slow.then_some(40));
            // A random moment: after it connected and sent something, or while it starts.
            if rng.below(4) != 0 {
                let (before, more) = (cloud.messages().len(), 1 + rng.below(8) as usize);
                cloud.wait_for(|m| m.len() >= before + more, WAIT).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
            child.kill().unwrap();
            child.wait().unwrap();
            kills += 1;
        }
    }
    // Drain: a clean run, stopped; then what is left in the log must all arrive on the next run.
    feeding.store(false, Ordering::Relaxed);
    feed_task.await.unwrap();
    let mut child = daemon(&cfg, None, None);
    let before = cloud.messages().len();
    cloud.wait_for(|m| m.len() > before, WAIT).await;
    terminate(&mut child);
    let (left, upto) = {
        let store = Store::open(&dir.path().join("data"), 1_000_000).unwrap();
        let left: Vec<u64> = store
            .events()
            .read_from(0, usize::MAX)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        (left, store.events().next_seq())
    };
    let mut child = daemon(&cfg, None, None);
    // This run's `gateway_started` is numbered `upto`: everything up to it must arrive.
    let arrived = cloud
        .try_wait_for(
            |m| {
                let seen = tally(m, &t);
                missing(&seen, upto).is_empty() && seen.first.contains_key(&upto)
            },
            WAIT,
        )
        .await;
    let _ = child.kill();
    let _ = child.wait();
    let seen = tally(&cloud.messages(), &t);
    assert!(
        seen.conflicts.is_empty(),
        "{} seqs delivered with two different contents, e.g. {:?}",
        seen.conflicts.len(),
        seen.conflicts.first()
    );
    let gaps = missing(&seen, upto);
    assert!(
        arrived.is_some() && gaps.is_empty(),
        "{} seqs never delivered (of {} up to {upto}; {} were left in the log at the end): {:?}",
        gaps.len(),
        upto,
        left.len(),
        &gaps[..gaps.len().min(20)]
    );
    assert!(
        seen.first.len() > 50,
        "too few events to mean anything: {}",
        seen.first.len()
    );
    println!(
        "faults: kill at {} x{rounds} + 4 random x{rounds} ({kills} kills, slow disk in about half): \
         {} events, {} deliveries: no seq delivered twice with different contents, none missing",
        points.join(", "),
        seen.first.len(),
        seen.deliveries
    );
}

/// Stops the daemon with SIGTERM (a clean stop) and waits for it.
fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().unwrap();
}
