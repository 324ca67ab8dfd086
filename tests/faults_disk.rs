//! Fault campaign: a full disk (issue "make faults"). The data directory is on a small tmpfs
//! (mounted here: CI runs as root), filled with a filler file until writes fail, then emptied.
//! While full, every access decision is refused and every command gets exactly one result
//! (`failed`, reason `storage`); one `storage_failed` alarm is raised; once space returns,
//! decisions and commands work again without a restart and nothing recorded before is lost.

#[path = "support/broker.rs"]
mod broker;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::{Broker, Subscriber};
use chrono::Utc;
use common::*;
use ed25519_dalek::SigningKey;
use gatehouse::access::{AccessEngine, Attempt};
use gatehouse::cloud::commands::sign;
use gatehouse::cloud::messages::{Command as Cmd, Topics};
use gatehouse::events::EventKind;
use gatehouse::policy::{Direction, Presented, Request, Target};
use gatehouse::store::{NewEvent, Store};
use serde_json::{Value, json};

/// Generous deadline for conditions (recovery is expected within 10 s).
const WAIT: Duration = Duration::from_secs(60);

fn scale() -> usize {
    std::env::var("GATEHOUSE_FAULT_SCALE")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|n| *n > 1)
        .unwrap_or(1)
}

/// A tmpfs of `mb` MiB, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` (with the reason printed) when mounting is impossible and the test is not root.
    fn mount(mb: u32) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir.path())
            .output();
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk { dir }),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                assert!(!root, "running as root but cannot mount a tmpfs: {why}");
                println!("faults: disk full: SKIPPED, cannot mount a tmpfs (not root): {why}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a filler file until the file system is full. Returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0xa5u8; 64 * 1024];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        // The last few bytes too.
        while f.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
        while f.write(&[0u8]).is_ok_and(|n| n > 0) {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

fn code_attempt(code: &str) -> Attempt<'_> {
    Attempt {
        request: Request {
            credential: Presented::Code(code),
            target: Target::Entry("gate-1"),
            direction: Direction::In,
        },
        device: Some("keypad-gate-1"),
    }
}

fn ev(i: u64) -> NewEvent {
    let at = Utc::now();
    NewEvent {
        at,
        local: at.to_rfc3339(),
        kind: EventKind::SensorReading,
        payload: json!({ "i": i }),
    }
}

/// In process: an access engine on a store whose disk fills up and empties again.
#[test]
fn a_full_disk_refuses_decisions_then_recovers_without_a_restart() {
    let Some(disk) = SmallDisk::mount(20) else {
        return;
    };
    for round in 0..scale() {
        let data = disk.path().join(format!("data-{round}"));
        let store = Arc::new(Store::open(&data, 100_000).unwrap());
        store
            .apply(&snapshot_msg(tenants_snapshot(1, 50, 100_000)))
            .unwrap();
        let before: Vec<u64> = store
            .events()
            .append(&(0..200).map(ev).collect::<Vec<_>>())
            .unwrap();
        let engine = AccessEngine::new(store.clone(), None);
        let d = engine.check(&code_attempt("100007"), Utc::now()).unwrap();
        assert!(d.granted, "{d:?}");
        let filler = disk.fill();
        // Decisions until one fails to be recorded (sled may still have room in its files).
        let mut granted_while_full = 0usize;
        for _ in 0..100_000 {
            match engine.check(&code_attempt("100007"), Utc::now()) {
                Ok(d) => {
                    assert!(d.granted);
                    granted_while_full += 1;
                }
                Err(_) => break,
            }
        }
        wait_until("the store to report the failure", || {
            !store.health().is_ok()
        });
        // Refused (an error: the device is told no) while full, however often it is asked.
        for _ in 0..20 {
            assert!(engine.check(&code_attempt("100007"), Utc::now()).is_err());
        }
        std::fs::remove_file(&filler).unwrap();
        let took = wait_until("decisions to work again", || {
            engine
                .check(&code_attempt("100007"), Utc::now())
                .is_ok_and(|d| d.granted)
                && store.health().is_ok()
        });
        let events = store.events().read_from(0, 1_000_000).unwrap();
        let seqs: BTreeSet<u64> = events.iter().map(|e| e.seq).collect();
        assert!(
            before.iter().all(|s| seqs.contains(s)),
            "events from before the fill are kept"
        );
        let failed: Vec<_> = events
            .iter()
            .filter(|e| e.kind == "storage_failed")
            .collect();
        assert_eq!(failed.len(), 1, "one storage_failed: {failed:?}");
        assert!(failed[0].payload["since"].is_string());
        assert!(failed[0].payload["what"].is_string());
        let recovered = events
            .iter()
            .position(|e| e.kind == "storage_recovered")
            .expect("storage_recovered recorded");
        assert!(events[recovered].seq > failed[0].seq);
        // The store still works after a reopen, durably: reopen it from disk.
        drop(engine);
        let n = events.len();
        drop(store);
        let store = Store::open(&data, 100_000).unwrap();
        assert_eq!(store.events().len() as usize, n);
        println!(
            "faults: disk full (in process, round {round}): {granted_while_full} decisions \
             recorded after the fill before sled failed, then refused; one storage_failed; \
             decisions work again {} ms after space returned; {} events from before kept",
            took.as_millis(),
            before.len()
        );
        drop(store);
        std::fs::remove_dir_all(&data).unwrap();
    }
}

fn topics() -> Topics {
    Topics::new("gatehouse", "site-1", "gw-1")
}

fn write_daemon_config(dir: &Path, data: &Path, b: &Broker, signer: &SigningKey) -> PathBuf {
    b.write_gateway_config(
        dir,
        &data.display().to_string(),
        &signer.verifying_key(),
        "reconnect_min_ms = 200\n",
        "",
    )
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn json_of(m: &broker::Received) -> Value {
    serde_json::from_slice(&m.payload).unwrap_or(Value::Null)
}

/// The results received for command `id`.
fn results_of(msgs: &[broker::Received], t: &Topics, id: &str) -> Vec<Value> {
    msgs.iter()
        .filter(|m| m.topic == t.command_result("ping"))
        .map(json_of)
        .filter(|v| v["id"] == id)
        .collect()
}

/// Sends a signed `ping` and waits for its result.
async fn ping(b: &Broker, sub: &Subscriber, signer: &SigningKey, id: &str) -> Value {
    let t = topics();
    let now = Utc::now();
    let cmd = Cmd {
        v: 2,
        site: "site-1".into(),
        gateway: "gw-1".into(),
        id: id.into(),
        name: "ping".into(),
        issued_at: now,
        expires_at: now + chrono::Duration::seconds(300),
        target: None,
        args: json!({}),
    };
    broker::publish_qos1(
        b.mqtt_options_as("cloud", &format!("cloud-{id}")),
        &format!("{}/cmd/ping", t.base()),
        sign(&cmd, signer),
        false,
    )
    .await
    .unwrap();
    let msgs = sub
        .wait_for(|m| !results_of(m, &t, id).is_empty(), WAIT)
        .await;
    results_of(&msgs, &t, id).remove(0)
}

fn is_storage_failure(r: &Value) -> bool {
    r["status"] == "failed" && r["reason"] == "storage"
}

/// The daemon as a process, with the cloud on a real mosquitto: commands while the disk is full
/// are answered `failed`/`storage` once each; the retained status says `storage: failed`; after
/// space returns, commands run again, `storage_failed` and `storage_recovered` arrive and every
/// event recorded before the fill is delivered.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_answers_every_command_while_the_disk_is_full_and_recovers() {
    let Some(disk) = SmallDisk::mount(20) else {
        return;
    };
    let b = Broker::start_with(broker::BrokerOptions {
        extra_config: vec!["max_queued_messages 0".into()],
        ..Default::default()
    });
    let signer = SigningKey::from_bytes(&[1; 32]);
    let t = topics();
    let conf = tempfile::tempdir().unwrap();
    for round in 0..scale() {
        let data = disk.path().join(format!("data-{round}"));
        // Events recorded before the daemon runs (and before the disk fills).
        let before: BTreeSet<u64> = {
            let store = Store::open(&data, 100_000).unwrap();
            store
                .events()
                .append(&(0..300).map(ev).collect::<Vec<_>>())
                .unwrap()
                .into_iter()
                .collect()
        };
        let cfg = write_daemon_config(conf.path(), &data, &b, &signer);
        let sub = Subscriber::connect(&b, "cloud", &format!("{}/#", t.base())).await;
        sub.wait_subscribed(1, WAIT).await;
        let log = std::fs::File::create(conf.path().join(format!("daemon-{round}.log"))).unwrap();
        let daemon = Daemon(
            Command::new(gatehouse_bin())
                .args(["run", "--config", cfg.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let status = |m: &broker::Received| {
            (m.topic == t.status())
                .then(|| json_of(m))
                .filter(|s| s["online"] == true)
        };
        sub.wait_for(
            |m| {
                m.iter()
                    .filter_map(status)
                    .any(|s| s["storage"]["state"] == "ok")
            },
            WAIT,
        )
        .await;
        let r = ping(&b, &sub, &signer, &format!("r{round}-before")).await;
        assert_eq!(r["status"], "done", "{r}");

        let filler = disk.fill();
        let mut ids = vec![format!("r{round}-before")];
        // Until sled needs space it does not have, commands still run.
        let mut ran_while_full = 0;
        loop {
            let id = format!("r{round}-full-{}", ids.len());
            let r = ping(&b, &sub, &signer, &id).await;
            ids.push(id);
            if is_storage_failure(&r) {
                break;
            }
            assert_eq!(r["status"], "done", "{r}");
            ran_while_full += 1;
            assert!(
                ran_while_full < 10_000,
                "the full disk never failed a write"
            );
        }
        let refused_while_full = 3 * scale().min(4) + 3;
        for _ in 0..refused_while_full {
            let id = format!("r{round}-full-{}", ids.len());
            let r = ping(&b, &sub, &signer, &id).await;
            assert!(is_storage_failure(&r), "{r}");
            ids.push(id);
        }
        let failed_status = sub
            .wait_for(
                |m| {
                    m.iter()
                        .filter_map(status)
                        .any(|s| s["storage"]["state"] == "failed")
                },
                WAIT,
            )
            .await;
        let st = failed_status
            .iter()
            .filter_map(status)
            .find(|s| s["storage"]["state"] == "failed")
            .unwrap();
        assert!(st["storage"]["since"].is_string(), "{st}");

        std::fs::remove_file(&filler).unwrap();
        let freed = Instant::now();
        let recovered_after = loop {
            let id = format!("r{round}-after-{}", ids.len());
            let r = ping(&b, &sub, &signer, &id).await;
            ids.push(id);
            if r["status"] == "done" {
                break freed.elapsed();
            }
            assert!(is_storage_failure(&r), "{r}");
            assert!(freed.elapsed() < WAIT, "commands still fail");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let kinds = |m: &[broker::Received], kind: &str| -> BTreeSet<String> {
            m.iter()
                .filter(|x| x.topic == t.events())
                .map(json_of)
                .filter(|e| e["kind"] == kind)
                .map(|e| e["id"].as_str().unwrap_or_default().to_string())
                .collect()
        };
        let event_seqs = |m: &[broker::Received]| -> BTreeSet<u64> {
            m.iter()
                .filter(|x| x.topic == t.events())
                .filter_map(|x| json_of(x)["seq"].as_u64())
                .collect()
        };
        let msgs = sub
            .wait_for(
                |m| {
                    !kinds(m, "storage_recovered").is_empty()
                        && before.is_subset(&event_seqs(m))
                        && m.iter()
                            .rev()
                            .find_map(status)
                            .is_some_and(|s| s["storage"]["state"] == "ok")
                },
                WAIT,
            )
            .await;
        assert_eq!(
            kinds(&msgs, "storage_failed").len(),
            1,
            "one storage_failed alarm"
        );
        let failed_ev = msgs
            .iter()
            .filter(|x| x.topic == t.events())
            .map(json_of)
            .find(|e| e["kind"] == "storage_failed")
            .unwrap();
        assert!(failed_ev["payload"]["since"].is_string(), "{failed_ev}");
        assert!(failed_ev["payload"]["what"].is_string(), "{failed_ev}");
        // Exactly one result per command.
        let mut per_id: BTreeMap<&str, usize> = BTreeMap::new();
        for id in &ids {
            per_id.insert(id, results_of(&msgs, &t, id).len());
        }
        assert!(
            per_id.values().all(|n| *n == 1),
            "results per id: {per_id:?}"
        );
        println!(
            "faults: disk full (daemon, round {round}): {ran_while_full} commands ran after the \
             fill until sled failed, then {} answered failed/storage once each; one \
             storage_failed; commands ran again {} ms after space returned; all {} events from \
             before delivered",
            refused_while_full + 1,
            recovered_after.as_millis(),
            before.len()
        );
        drop(daemon);
        drop(sub);
        std::fs::remove_dir_all(&data).unwrap();
    }
}
