//! Telemetry at bus speed through the daemon (a child process): four simulated Modbus sensors
//! on a PTY (a thread of this test) polled every 10 ms, every poll recording readings through
//! the group commit, a real mosquitto over mutual TLS playing the cloud.
//!
//! - Killed (SIGKILL) at random moments while batches are in flight: nothing the cloud received
//!   is lost or renumbered (every delivered seq is below the reopened log's next number, and
//!   one still held has the same contents), and every access decision (one demo attempt per
//!   run, flushed before it is answered) is in the log or was delivered.
//! - Stopped with SIGTERM: the outbox is empty afterwards, `gateway_stopped` was delivered and
//!   the retained status says offline.
//!
//! Rounds: 3 kills by default; `GATEHOUSE_FAULT_SCALE=N` multiplies them.

#[path = "support/broker.rs"]
mod broker;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use broker::{Broker, Received, Subscriber};
use common::gatehouse_bin;
use gatehouse::cloud::messages::Topics;
use gatehouse::rs485::sim::{Pty, request_len};
use gatehouse::rs485::wire::{modbus_crc, modbus_frame};
use gatehouse::store::Store;
use serde_json::Value;
use serialport::SerialPort as _;

const WAIT: Duration = Duration::from_secs(60);

fn scale() -> u64 {
    std::env::var("GATEHOUSE_FAULT_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// Four XY-MD02 sensors (addresses 1–4) on one PTY; every read answers a value far from the
/// last, so every poll records readings.
struct Sensors {
    path: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sensors {
    fn start() -> Sensors {
        let pty = Pty::open().unwrap();
        let path = pty.path.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut master = pty.master.try_clone_native().unwrap();
            master.set_timeout(Duration::from_millis(2)).unwrap();
            let mut toggles = [false; 16];
            let mut buf = Vec::new();
            let mut chunk = [0u8; 256];
            while !st.load(Ordering::Relaxed) {
                match master.read(&mut chunk) {
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    // Timeouts, and the daemon closing its end between runs.
                    Err(_) => continue,
                }
                while buf.len() >= 4 {
                    let Some(len) = request_len(&buf) else { break };
                    if buf.len() < len {
                        break;
                    }
                    let frame: Vec<u8> = buf.drain(..len).collect();
                    if modbus_crc(&frame[..len - 2]).to_le_bytes() != frame[len - 2..]
                        || !(1..=4).contains(&frame[0])
                    {
                        continue;
                    }
                    // Per sensor and register: each read differs from that register's last.
                    let t = &mut toggles[usize::from(frame[0] & 3) * 4 + usize::from(frame[3] & 3)];
                    *t = !*t;
                    let v: u16 = if *t { 100 } else { 0 };
                    let [hi, lo] = v.to_be_bytes();
                    let out = if frame[1] == 0x04 {
                        modbus_frame(frame[0], 0x04, &[2, hi, lo])
                    } else {
                        modbus_frame(frame[0], frame[1] | 0x80, &[2])
                    };
                    let _ = master.write_all(&out);
                }
            }
        });
        Sensors {
            path,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Sensors {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_config(dir: &Path, b: &Broker, port: &Path) -> std::path::PathBuf {
    let f = b.client("gw-1");
    let signer = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    let cfg = dir.join("gatehouse.toml");
    let mut devices = String::new();
    for a in 1..=4 {
        devices.push_str(&format!(
            "[[bus.device]]\nid = \"sensor-{a}\"\nprofile = \"xy-md02\"\naddress = {a}\n\
             poll_interval_ms = 10\n"
        ));
    }
    std::fs::write(
        &cfg,
        format!(
            "[site]\nid = \"site-1\"\ngateway_id = \"gw-1\"\n[storage]\ndata_dir = \"data\"\n\
             [shutdown]\ndrain_timeout_secs = 30\n\
             [cloud]\nhost = \"127.0.0.1\"\nport = {}\nca_file = \"{}\"\ncert_file = \"{}\"\n\
             key_file = \"{}\"\nkeep_alive_secs = 5\nreconnect_min_ms = 200\n\
             command_public_key = \"{}\"\n\
             [[demo.attempts]]\nfob = \"FOB-DEAD01\"\nentry = \"gate-1\"\n\
             [[bus]]\nid = \"sensors\"\nport = \"{}\"\nprotocol = \"modbus\"\ntimeout_ms = 50\n{devices}",
            b.port(),
            f.ca.display(),
            f.cert.display(),
            f.key.display(),
            hex::encode(signer.verifying_key().to_bytes()),
            port.display(),
        ),
    )
    .unwrap();
    cfg
}

fn daemon(cfg: &Path) -> Child {
    Command::new(gatehouse_bin())
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "error")
        .env_remove("GATEHOUSE_CRASH_AT")
        .env_remove("GATEHOUSE_FLUSH_DELAY_MS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// seq -> the delivered event without `historical`; panics on a seq delivered with two
/// different contents.
fn delivered(msgs: &[Received], t: &Topics) -> BTreeMap<u64, Value> {
    let mut out = BTreeMap::new();
    for m in msgs.iter().filter(|m| m.topic == t.events()) {
        let mut v: Value = serde_json::from_slice(&m.payload).unwrap();
        let seq = v["seq"].as_u64().unwrap();
        if let Some(o) = v.as_object_mut() {
            o.remove("historical");
            o.remove("id");
        }
        if let Some(prev) = out.insert(seq, v.clone()) {
            assert_eq!(prev, v, "seq {seq} delivered with two different contents");
        }
    }
    out
}

fn event_value(e: &gatehouse::store::Event) -> Value {
    serde_json::to_value(e).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn kills_during_batches_lose_nothing_published_nor_any_decision() {
    let b = Broker::start();
    let t = Topics::new("gatehouse", "site-1", "gw-1");
    let dir = tempfile::tempdir().unwrap();
    let sensors = Sensors::start();
    let cfg = write_config(dir.path(), &b, &sensors.path);
    let cloud = Subscriber::connect(&b, "cloud", &t.events()).await;
    let rounds = 3 * scale();
    let mut seed = 0x2545_f491_4f6c_dd1du64 ^ u64::from(std::process::id());
    for _ in 0..rounds {
        let mut child = daemon(&cfg);
        // Readings are flowing and being published: then a random moment.
        let before = cloud.messages().len();
        cloud.wait_for(|m| m.len() >= before + 50, WAIT).await;
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(seed % 300)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        let got = delivered(&cloud.messages(), &t);
        let store = Store::open(&dir.path().join("data"), 10_000_000).unwrap();
        let next = store.events().next_seq();
        let held: BTreeMap<u64, Value> = store
            .events()
            .read_from(0, usize::MAX)
            .unwrap()
            .iter()
            .map(|e| (e.seq, event_value(e)))
            .collect();
        for (seq, v) in &got {
            assert!(
                *seq < next,
                "delivered seq {seq} is not durable (next {next})"
            );
            if let Some(h) = held.get(seq) {
                for k in ["kind", "at", "local", "payload"] {
                    assert_eq!(
                        h[k], v[k],
                        "seq {seq}: the log and the cloud disagree on {k}"
                    );
                }
            }
        }
    }
    // Every run decided one attempt: each decision is in the log or was delivered.
    let got = delivered(&cloud.messages(), &t);
    let store = Store::open(&dir.path().join("data"), 10_000_000).unwrap();
    let mut decisions: BTreeSet<u64> = got
        .iter()
        .filter(|(_, v)| v["kind"] == "access_denied")
        .map(|(s, _)| *s)
        .collect();
    decisions.extend(
        store
            .events()
            .read_from(0, usize::MAX)
            .unwrap()
            .iter()
            .filter(|e| e.kind == "access_denied")
            .map(|e| e.seq),
    );
    assert_eq!(decisions.len() as u64, rounds, "a decision was lost");
    println!(
        "faults: kill during group-commit batches x{rounds}: {} events delivered, none \
         undurable or changed; {rounds} decisions all kept",
        got.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_the_outbox_and_delivers_gateway_stopped() {
    let b = Broker::start();
    let t = Topics::new("gatehouse", "site-1", "gw-1");
    let dir = tempfile::tempdir().unwrap();
    let sensors = Sensors::start();
    let cfg = write_config(dir.path(), &b, &sensors.path);
    let cloud = Subscriber::connect(&b, "cloud", &t.events()).await;
    let status = Subscriber::connect(&b, "cloud-status", &t.status()).await;
    let mut child = daemon(&cfg);
    cloud.wait_for(|m| m.len() >= 200, WAIT).await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let st = child.wait().unwrap();
    assert!(st.success(), "clean stop: {st:?}");
    let got = cloud
        .wait_for(
            |m| {
                delivered(m, &t)
                    .values()
                    .any(|v| v["kind"] == "gateway_stopped")
            },
            WAIT,
        )
        .await;
    let got = delivered(&got, &t);
    let store = Store::open(&dir.path().join("data"), 10_000_000).unwrap();
    let left = store.events().read_from(0, usize::MAX).unwrap();
    assert!(
        left.is_empty(),
        "{} events left in the outbox after a clean stop with the broker up: {:?}",
        left.len(),
        left.iter().take(3).collect::<Vec<_>>()
    );
    status
        .wait_for(
            |m| {
                m.last().is_some_and(|l| {
                    serde_json::from_slice::<Value>(&l.payload)
                        .is_ok_and(|v| v["online"] == Value::Bool(false))
                })
            },
            WAIT,
        )
        .await;
    println!(
        "faults: SIGTERM with the broker up: {} events delivered, gateway_stopped among them, \
         outbox empty, status offline",
        got.len()
    );
}
