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
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
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
