//! The site database: atomic snapshots, refused deltas change nothing, persistence, the event log.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{TimeZone, Utc};
use common::*;
use gatehouse::access::AccessEngine;
use gatehouse::events::EventKind;
use gatehouse::policy::{Direction, Presented, Reason, Request, Target};
use gatehouse::store::{NewEvent, Store};
use serde_json::json;

fn at() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 15, 0, 0).unwrap()
}

fn code_at_gate(engine: &AccessEngine, code: &str) -> Reason {
    engine
        .evaluate(
            &Request {
                credential: Presented::Code(code),
                target: Target::Entry("gate-1"),
                direction: Direction::In,
            },
            at(),
        )
        .reason
}

#[test]
fn snapshot_is_atomic_for_concurrent_readers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 10_000).unwrap());
    // Version 1: codes 100000.., version 2: codes 200000.. (disjoint, different counts).
    let (n1, n2) = (3_000, 2_000);
    store
        .apply(&snapshot_msg(tenants_snapshot(1, n1, 100_000)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..2 {
        let (store, stop) = (store.clone(), stop.clone());
        readers.push(std::thread::spawn(move || {
            let engine = AccessEngine::new(store.clone(), None);
            let mut seen = [0usize; 3];
            let mut i = r;
            while !stop.load(Ordering::Relaxed) {
                i = (i + 7) % n2;
                let site = store.site();
                let (v, len) = (site.version, site.creds.len());
                drop(site);
                // One guard per observation: version and contents must agree.
                let site = store.site();
                let one = code_at_gate_site(&site, &engine, &format!("{}", 100_000 + i));
                let two = code_at_gate_site(&site, &engine, &format!("{}", 200_000 + i));
                let version = site.version;
                drop(site);
                match version {
                    1 => assert_eq!((one, two), (Reason::Tenant, Reason::UnknownCredential)),
                    2 => assert_eq!((one, two), (Reason::UnknownCredential, Reason::Tenant)),
                    other => panic!("unexpected version {other}"),
                }
                assert!(
                    (v == 1 && len == n1) || (v == 2 && len == n2),
                    "v{v} with {len}"
                );
                seen[version as usize] += 1;
            }
            seen
        }));
    }
    for _ in 0..3 {
        store
            .apply(&snapshot_msg(tenants_snapshot(2, n2, 200_000)))
            .unwrap();
        store
            .apply(&snapshot_msg(tenants_snapshot(1, n1, 100_000)))
            .unwrap();
    }
    store
        .apply(&snapshot_msg(tenants_snapshot(2, n2, 200_000)))
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let mut total = [0usize; 3];
    for r in readers {
        let seen = r.join().expect("reader saw a mix");
        total[1] += seen[1];
        total[2] += seen[2];
    }
    assert!(
        total[1] > 0 && total[2] > 0,
        "readers saw both versions: {total:?}"
    );
}

/// Decides against a site guard already held (so that one observation sees one version).
fn code_at_gate_site(site: &gatehouse::site::Site, engine: &AccessEngine, code: &str) -> Reason {
    let ctx = gatehouse::policy::Context {
        code_key: engine.store().code_key(),
        digital_key_public: None,
    };
    gatehouse::policy::decide(
        site,
        &ctx,
        &Request {
            credential: Presented::Code(code),
            target: Target::Entry("gate-1"),
            direction: Direction::In,
        },
        at(),
    )
    .reason
}

#[test]
fn delta_on_a_different_base_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 10_000).unwrap();
    store
        .apply(&snapshot_msg(tenants_snapshot(5, 3, 100_000)))
        .unwrap();
    let before = store.export();
    let err = store
        .apply(&delta_msg(json!({
            "schema_version": 1, "kind": "delta", "base_version": 4, "version": 6,
            "delete": {"credentials": ["c0"]}
        })))
        .unwrap_err();
    assert!(err.is_resync_needed(), "{err}");
    assert!(err.to_string().contains("resync needed"), "{err}");
    assert_eq!(store.export().credentials, before.credentials);
    assert_eq!(store.stats().version, 5);
}

#[test]
fn a_delta_with_a_bad_reference_changes_nothing_even_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let store = Store::open(dir.path(), 10_000).unwrap();
        store
            .apply(&snapshot_msg(tenants_snapshot(1, 3, 100_000)))
            .unwrap();
        // Valid parts (a credential delete) together with an invalid one (share on unknown
        // unit): the whole delta must be refused.
        let err = store
            .apply(&delta_msg(json!({
                "schema_version": 1, "kind": "delta", "base_version": 1, "version": 2,
                "upsert": {"shares": [{"id": "s1", "unit": "B-104", "user": "t0"}]},
                "delete": {"credentials": ["c1"]}
            })))
            .unwrap_err();
        assert!(err.to_string().contains("unknown unit `B-104`"), "{err}");
        store.export()
    };
    let store = Store::open(dir.path(), 10_000).unwrap();
    let after = store.export();
    assert_eq!(after.version, 1);
    assert_eq!(after.credentials, before.credentials);
    assert_eq!(after.shares, before.shares);
}

#[test]
fn deltas_persist_across_reopen_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let n = gatehouse::store::COMPACT_DELTAS + 5;
    {
        let store = Store::open(dir.path(), 10_000).unwrap();
        store
            .apply(&snapshot_msg(tenants_snapshot(1, 2, 100_000)))
            .unwrap();
        let mut compacted = 0;
        for v in 1..=n {
            let applied = store
                .apply(&delta_msg(json!({
                    "schema_version": 1, "kind": "delta", "base_version": v, "version": v + 1,
                    "upsert": {"credentials": [{"id": format!("k{v}"), "user": "t0", "fob": format!("FOB{v}")}]}
                })))
                .unwrap();
            compacted += applied.compacted as u64;
        }
        assert_eq!(
            compacted,
            1,
            "one compaction after {} deltas",
            gatehouse::store::COMPACT_DELTAS
        );
    }
    let store = Store::open(dir.path(), 10_000).unwrap();
    let stats = store.stats();
    assert_eq!(stats.version, n + 1);
    assert_eq!(stats.counts.credentials as u64, 2 + n);
    assert_eq!(stats.deltas_since_snapshot, 5);
    let engine = AccessEngine::new(Arc::new(store), None);
    let d = engine.evaluate(
        &Request {
            credential: Presented::Fob(&format!("FOB{n}")),
            target: Target::Unit("U0"),
            direction: Direction::In,
        },
        at(),
    );
    assert_eq!(d.reason, Reason::Tenant);
    assert_eq!(code_at_gate(&engine, "100001"), Reason::Tenant);
}

#[test]
fn codes_are_never_stored_in_clear() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), 10_000).unwrap();
        store
            .apply(&snapshot_msg(tenants_snapshot(1, 50, 987_650)))
            .unwrap();
        store
            .apply(&delta_msg(json!({
                "schema_version": 1, "kind": "delta", "base_version": 1, "version": 2,
                "upsert": {"credentials": [{"id": "cx", "user": "t1", "code": "55443322"}]}
            })))
            .unwrap();
        let export = serde_json::to_string(&store.export()).unwrap();
        assert!(!export.contains("987650") && !export.contains("55443322"));
        store.flush().unwrap();
    }
    // Scan every byte under the data directory for the clear codes.
    let mut found = Vec::new();
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        for code in ["987650", "987699", "55443322"] {
            if bytes.windows(code.len()).any(|w| w == code.as_bytes()) {
                found.push((entry.clone(), code));
            }
        }
    }
    assert!(found.is_empty(), "clear codes on disk: {found:?}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("code.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn a_code_key_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), 10_000).unwrap());
    let key = dir.path().join("code.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let err = Store::open(dir.path(), 10_000).err().expect("refused");
    assert!(format!("{err:#}").contains("chmod 600"), "{err:#}");
}

#[test]
fn event_log_appends_reads_from_cursor_and_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let ev = |i: u64, kind: EventKind| NewEvent {
        at: at(),
        local: "2026-11-23T10:00:00-05:00".into(),
        kind,
        payload: json!({"i": i}),
    };
    {
        let store = Store::open(dir.path(), 1_000).unwrap();
        // 10 security events first, then 1,490 ordinary ones: over the bound of 1,000.
        let mut batch: Vec<NewEvent> = (0..10).map(|i| ev(i, EventKind::AccessDenied)).collect();
        batch.extend((10..1_500).map(|i| ev(i, EventKind::AccessGranted)));
        let seqs = store.events().append(&batch).unwrap();
        assert_eq!((seqs[0], seqs[1_499]), (1, 1_500));
        // Trimmed to 95 % of the bound, oldest ordinary events first; security events kept;
        // one outbox_overflow event says what went.
        let all = store.events().read_from(0, 10_000).unwrap();
        assert_eq!(store.events().len(), all.len() as u64);
        assert_eq!(all.len(), 950 + 1);
        assert!(
            all[..10].iter().all(|e| e.kind == "access_denied"),
            "security events kept"
        );
        assert_eq!(all[10].seq, 561, "oldest ordinary events dropped first");
        let overflow = all.last().unwrap();
        assert_eq!(overflow.kind, "outbox_overflow");
        assert_eq!(overflow.seq, 1_501);
        assert_eq!(overflow.payload["dropped"], 550);
        assert_eq!(overflow.payload["first_seq"], 11);
        assert_eq!(overflow.payload["last_seq"], 560);
        let page = store.events().read_from(1_490, 100).unwrap();
        assert_eq!(page.len(), 12);
        assert_eq!(page[0].seq, 1_490);
        assert_eq!(page[0].payload["i"], 1_489);
        // Delivered events leave the log; numbering never goes back.
        store.events().remove_delivered(&[1, 2, 561]).unwrap();
        assert_eq!(store.events().len(), 948);
        assert_eq!(store.events().bounds(), (Some(3), Some(1_501)));
    }
    let store = Store::open(dir.path(), 1_000).unwrap();
    assert_eq!(store.events().len(), 948, "counted again at open");
    let seqs = store
        .events()
        .append(&[ev(0, EventKind::AccessGranted)])
        .unwrap();
    assert_eq!(seqs, vec![1_502]);
    // Even with every event delivered, a restart does not reuse sequence numbers.
    let all: Vec<u64> = store
        .events()
        .read_from(0, 10_000)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    store.events().remove_delivered(&all).unwrap();
    assert!(store.events().is_empty());
    drop(store);
    let store = Store::open(dir.path(), 1_000).unwrap();
    assert_eq!(
        store
            .events()
            .append(&[ev(0, EventKind::AccessGranted)])
            .unwrap(),
        vec![1_503]
    );
}

#[test]
fn old_events_go_after_max_age_in_lived_time_but_security_events_stay() {
    let dir = tempfile::tempdir().unwrap();
    let limits = gatehouse::store::LogLimits {
        max_events: 1_000,
        max_bytes: 1 << 20,
        max_age: chrono::Duration::days(1),
    };
    let store = Store::open_with(dir.path(), limits).unwrap();
    let old = at() - chrono::Duration::days(3);
    let ev = |t, kind| NewEvent {
        at: t,
        local: String::new(),
        kind,
        payload: json!({}),
    };
    store
        .events()
        .append(&[
            ev(old, EventKind::AccessGranted),
            ev(old, EventKind::KeypadLockedOut),
        ])
        .unwrap();
    // Age is lived time (the gateway's monotonic clock across restarts), not `at`: the first
    // tick marks what was appended by then; a day of lived time later those events go, but not
    // the one appended after the mark (even though its `at` is the same).
    assert_eq!(store.events().trim(1_000, at(), "").unwrap(), 0);
    store
        .events()
        .append(&[ev(old, EventKind::AccessGranted)])
        .unwrap();
    assert_eq!(
        store.events().trim(1_000 + 86_400_000, at(), "").unwrap(),
        1
    );
    let kinds: Vec<String> = store
        .events()
        .read_from(0, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        ["keypad_locked_out", "access_granted", "outbox_overflow"]
    );
    // A log over its byte budget keeps trimming the oldest ordinary events.
    let big = json!({"pad": "x".repeat(20_000)});
    for _ in 0..100 {
        store
            .events()
            .append(&[NewEvent {
                at: at(),
                local: String::new(),
                kind: EventKind::AccessGranted,
                payload: big.clone(),
            }])
            .unwrap();
    }
    assert!(
        store.events().bytes() <= 1 << 20,
        "{}",
        store.events().bytes()
    );
}

#[test]
fn decisions_are_recorded_durably_before_they_are_returned() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 10_000).unwrap());
    store
        .apply(&snapshot_msg(tenants_snapshot(1, 2, 100_000)))
        .unwrap();
    let engine = AccessEngine::new(store.clone(), None);
    let attempt = gatehouse::access::Attempt {
        request: Request {
            credential: Presented::Code("100001"),
            target: Target::Entry("gate-1"),
            direction: Direction::In,
        },
        device: Some("keypad-1"),
    };
    let d = engine.check(&attempt, at()).unwrap();
    assert!(d.granted);
    let last = store.events().read_from(0, 100).unwrap().pop().unwrap();
    assert_eq!(last.kind, "access_granted");
    assert_eq!(last.payload["user"], "t1");
    assert_eq!(last.payload["entry"], "gate-1");
    assert_eq!(last.payload["device"], "keypad-1");
    assert_eq!(last.local, "2026-11-23T10:00:00-05:00");
    assert!(
        !serde_json::to_string(&last).unwrap().contains("100001"),
        "no code in events"
    );
}
