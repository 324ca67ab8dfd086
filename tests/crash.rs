//! A snapshot import killed with SIGKILL at any moment leaves the old site or the new one,
//! never a mix. The import runs as a real child process (`gatehouse db import`).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use common::*;
use gatehouse::policy::{self, Context, Direction, Presented, Reason, Request, Target};
use gatehouse::store::Store;

const N1: usize = 20_000;
const N2: usize = 30_000;

fn write_snapshot(path: &std::path::Path, version: u64, n: usize, base: u64) {
    let snap = tenants_snapshot(version, n, base);
    std::fs::write(path, serde_json::to_vec(&snap).unwrap()).unwrap();
}

fn import(dir: &std::path::Path, file: &std::path::Path) -> std::process::Child {
    import_crashing_at(dir, file, None)
}

/// `crash_at`: a named crash point in the store (`GATEHOUSE_CRASH_AT`) where the child aborts.
fn import_crashing_at(
    dir: &std::path::Path,
    file: &std::path::Path,
    crash_at: Option<&str>,
) -> std::process::Child {
    let mut cmd = Command::new(gatehouse_bin());
    match crash_at {
        Some(point) => cmd.env("GATEHOUSE_CRASH_AT", point),
        None => cmd.env_remove("GATEHOUSE_CRASH_AT"),
    };
    cmd.args(["db", "import", "--db"])
        .arg(dir)
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Opens the store and checks it holds exactly version 1 or exactly version 2.
fn check_consistent(dir: &std::path::Path) -> (u64, usize) {
    let store = Store::open(dir, 10_000).expect("reopens after SIGKILL");
    let stats = store.stats();
    let site = store.site();
    let ctx = Context {
        code_key: store.code_key(),
        digital_key_public: None,
    };
    let at = Utc.with_ymd_and_hms(2026, 11, 23, 15, 0, 0).unwrap();
    let decide = |code: String| {
        policy::decide(
            &site,
            &ctx,
            &Request {
                credential: Presented::Code(&code),
                target: Target::Entry("gate-1"),
                direction: Direction::In,
            },
            at,
        )
        .reason
    };
    let sample = [0usize, 777, N1 - 1];
    match stats.version {
        1 => {
            assert_eq!(stats.counts.credentials, N1);
            assert_eq!(stats.counts.units, N1);
            for i in sample {
                assert_eq!(decide(format!("{}", 100_000 + i)), Reason::Tenant);
                assert_eq!(
                    decide(format!("{}", 300_000 + i)),
                    Reason::UnknownCredential
                );
            }
        }
        2 => {
            assert_eq!(stats.counts.credentials, N2);
            assert_eq!(stats.counts.units, N2);
            for i in sample {
                assert_eq!(
                    decide(format!("{}", 100_000 + i)),
                    Reason::UnknownCredential
                );
                assert_eq!(decide(format!("{}", 300_000 + i)), Reason::Tenant);
            }
        }
        v => panic!("reopened at version {v}"),
    }
    (stats.version, stats.recovered_keys_at_open)
}

#[test]
fn sigkill_during_snapshot_import_leaves_old_or_new() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, f1, f2) = (
        tmp.path().join("data"),
        tmp.path().join("v1.json"),
        tmp.path().join("v2.json"),
    );
    write_snapshot(&f1, 1, N1, 100_000);
    write_snapshot(&f2, 2, N2, 300_000);
    assert!(import(&dir, &f1).wait().unwrap().success());
    // How long a whole import of v2 takes here; kills are spread across that time.
    let started = Instant::now();
    assert!(import(&dir, &f2).wait().unwrap().success());
    let full = started.elapsed();
    assert_eq!(check_consistent(&dir).0, 2);

    // The two windows that matter, hit exactly: the process dies (abort, nothing flushed on the
    // way out) with the new generation wholly on disk but not yet current, and with it current
    // but the old generation not yet removed. Either way the reopened store is one version, and
    // the leftover generation is found and removed at open.
    for (point, file, expect) in [
        ("generation_written", &f1, 2),
        ("generation_switched", &f1, 1),
        ("generation_written", &f2, 1),
        ("generation_switched", &f2, 2),
    ] {
        let status = import_crashing_at(&dir, file, Some(point)).wait().unwrap();
        assert!(!status.success(), "{point}: the import was meant to die");
        let (version, removed) = check_consistent(&dir);
        assert_eq!(version, expect, "{point}");
        assert!(
            removed > 0,
            "{point}: the leftover generation was removed at open"
        );
        // Reopening again finds nothing left to remove.
        assert_eq!(check_consistent(&dir), (expect, 0), "{point}: second open");
    }

    let (mut olds, mut news) = (0, 0);
    let rounds = 24;
    for round in 0..rounds {
        // Alternate the direction of the import so that "old" is sometimes v1, sometimes v2.
        let file = if round % 2 == 0 { &f1 } else { &f2 };
        let target = if round % 2 == 0 { 1 } else { 2 };
        let baseline = dir_size(&dir.join("db"));
        let mut child = import(&dir, file);
        if round % 3 == 0 {
            // Anywhere in the import: parsing, checking, writing, switching.
            let frac = 0.1 + 0.85 * (round as f64 / rounds as f64);
            std::thread::sleep(full.mul_f64(frac));
        } else {
            // Right after the new generation starts reaching the disk.
            let deadline = Instant::now() + full * 3;
            while dir_size(&dir.join("db")) <= baseline && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(Duration::from_millis((round as u64 * 7) % 40));
        }
        // SIGKILL: no destructor, no flush.
        let _ = child.kill();
        let status = child.wait().unwrap();
        let (version, _) = check_consistent(&dir);
        if status.success() || version == target {
            news += 1;
        } else {
            olds += 1;
        }
    }
    eprintln!("rounds {rounds}: old {olds}, new {news} (import took {full:?})");
    assert!(
        olds > 0 && news > 0,
        "kills landed on both sides: old {olds}, new {news}"
    );
}

fn dir_size(p: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
