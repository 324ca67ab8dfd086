//! The event log's own rules: visibility after flush, size bound, trim cost and folding, age
//! in lived time, reattach.

use chrono::{TimeZone, Utc};
use serde_json::json;

use super::*;

fn open_db() -> (tempfile::TempDir, sled::Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("db"))
        .flush_every_ms(None)
        .open()
        .unwrap();
    (dir, db)
}

fn at() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 15, 0, 0).unwrap()
}

fn ev(kind: EventKind) -> NewEvent {
    NewEvent {
        at: at(),
        local: String::new(),
        kind,
        payload: json!({"i": 1}),
    }
}

fn limits(max_events: u64) -> LogLimits {
    LogLimits {
        max_events,
        max_bytes: 1 << 30,
        max_age: chrono::Duration::days(30),
    }
}

fn overflow_records(log: &EventLog) -> Vec<Event> {
    log.read_from(0, usize::MAX)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "outbox_overflow")
        .collect()
}

#[test]
fn a_record_is_not_visible_before_its_flush() {
    let (_d, db) = open_db();
    let log = EventLog::open(&db, limits(1_000)).unwrap();
    let notified = log.appended();
    let seqs = log
        .append_unflushed(&[ev(EventKind::AccessGranted)])
        .unwrap();
    assert_eq!(seqs, [1]);
    assert!(log.has_pending());
    assert!(log.read_raw_from(0, 10).unwrap().is_empty());
    assert!(log.read_from(0, 10).unwrap().is_empty());
    assert_eq!(log.bounds(), (None, None));
    assert_eq!(log.len(), 1, "held, not yet visible");
    // The link is not woken for a record it cannot read.
    assert!(
        futures::FutureExt::now_or_never(notified.notified()).is_none(),
        "woken before the flush"
    );
    assert_eq!(log.flush_pending().unwrap(), 2);
    assert!(!log.has_pending());
    assert!(futures::FutureExt::now_or_never(notified.notified()).is_some());
    assert_eq!(log.read_from(0, 10).unwrap()[0].seq, 1);
    assert_eq!(log.bounds(), (Some(1), Some(1)));
    // A flushed append is visible when it returns.
    log.append(&[ev(EventKind::AccessDenied)]).unwrap();
    assert_eq!(log.bounds(), (Some(1), Some(2)));
}

#[test]
fn every_record_is_bounded_in_size_and_the_append_never_fails_for_size() {
    let (_d, db) = open_db();
    let log = EventLog::open(&db, limits(1_000)).unwrap();
    let huge = "d".repeat(32 << 20);
    log.append(&[NewEvent {
        payload: json!({"reason": format!("delta refused: {huge}"), "version": 9}),
        ..ev(EventKind::SyncRefused)
    }])
    .unwrap();
    let (_, raw) = log.read_raw_from(0, 1).unwrap().remove(0);
    assert!(raw.len() <= MAX_RECORD_BYTES, "{}", raw.len());
    let e: Event = serde_json::from_slice(&raw).unwrap();
    assert!(
        e.payload["reason"]
            .as_str()
            .unwrap()
            .ends_with(&format!("…[cut, {} bytes]", huge.len() + 15))
    );
    assert_eq!(e.payload["version"], 9);
    assert_eq!(log.bytes(), raw.len() as u64);
}

#[test]
fn overflow_with_security_events_over_the_bound_stays_one_record_and_trims_rarely() {
    let (_d, db) = open_db();
    let log = EventLog::open(&db, limits(100)).unwrap();
    // Security events alone are over the bound.
    log.append(&vec![ev(EventKind::AccessDenied); 150]).unwrap();
    let (mut total, appended) = (0u64, 1_500u64);
    for _ in 0..appended {
        log.append(&[ev(EventKind::AccessGranted)]).unwrap();
    }
    let held = log.read_from(0, usize::MAX).unwrap();
    let ordinary = held.iter().filter(|e| e.kind == "access_granted").count() as u64;
    let overflow = overflow_records(&log);
    assert_eq!(overflow.len(), 1, "earlier overflow records are folded");
    let o = &overflow[0];
    total += o.payload["dropped_total"].as_u64().unwrap();
    assert_eq!(total + ordinary, appended, "every dropped event counted");
    assert_eq!(o.payload["dropped"], o.payload["dropped_total"]);
    // Trims only when droppable events reach 5 % of the bound: one overflow seq per trim.
    let trims = log.next_seq() - 1 - 150 - appended;
    assert!(trims <= appended / 5 + 1, "{trims} trims");
    // Each record is read once by the trims (the 150 security ones at the front are skipped by
    // the cursor after the first trim).
    assert!(
        log.trim_reads() <= appended + 150 + trims,
        "{} records read",
        log.trim_reads()
    );
    assert_eq!(log.len(), held.len() as u64);
}

#[test]
fn a_delivered_overflow_record_is_not_folded_and_totals_stay_cumulative() {
    let (_d, db) = open_db();
    let log = EventLog::open(&db, limits(20)).unwrap();
    log.append(&vec![ev(EventKind::AccessGranted); 30]).unwrap();
    let first = overflow_records(&log);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].payload["dropped"], 11);
    assert_eq!(first[0].payload["dropped_total"], 11);
    log.remove_delivered(&[first[0].seq]).unwrap();
    log.append(&vec![ev(EventKind::AccessGranted); 30]).unwrap();
    let second = overflow_records(&log);
    assert_eq!(second.len(), 1);
    assert!(
        second[0].seq > first[0].seq,
        "a new number, never new contents"
    );
    assert_eq!(second[0].payload["dropped"], 30);
    assert_eq!(second[0].payload["dropped_total"], 41);
    // A further trim folds the held record: the count covers both, the total is cumulative.
    log.append(&vec![ev(EventKind::AccessGranted); 5]).unwrap();
    let third = overflow_records(&log);
    assert_eq!(third.len(), 1);
    assert_eq!(third[0].payload["dropped"], 35);
    assert_eq!(third[0].payload["dropped_total"], 46);
    assert_eq!(
        third[0].payload["first_seq"],
        second[0].payload["first_seq"]
    );
}

#[test]
fn age_counts_lived_time_not_the_wall_clock() {
    let (_d, db) = open_db();
    let lim = LogLimits {
        max_age: chrono::Duration::days(1),
        ..limits(1_000)
    };
    let log = EventLog::open(&db, lim).unwrap();
    const DAY: u64 = 86_400_000;
    log.append(&[ev(EventKind::AccessGranted), ev(EventKind::KeypadLockedOut)])
        .unwrap();
    // The wall clock jumps 31 days ahead (and back): nothing undelivered goes.
    let ahead = at() + chrono::Duration::days(31);
    assert_eq!(log.trim(60_000, ahead, "").unwrap(), 0);
    log.append(&[NewEvent {
        at: ahead,
        ..ev(EventKind::AccessGranted)
    }])
    .unwrap();
    assert_eq!(
        log.trim(120_000, at() - chrono::Duration::days(400), "")
            .unwrap(),
        0
    );
    assert_eq!(log.len(), 3);
    // Lived time past the bound: the events appended before the first mark go (security
    // events stay); the one appended later is younger.
    assert_eq!(log.trim(60_000 + DAY, ahead, "").unwrap(), 1);
    let kinds: Vec<String> = log
        .read_from(0, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        ["keypad_locked_out", "access_granted", "outbox_overflow"]
    );
    assert_eq!(log.trim(120_000 + DAY, ahead, "").unwrap(), 1);
    assert_eq!(log.len(), 2);
}

#[test]
fn reattach_reads_the_state_back_from_the_new_database() {
    let (_d, db) = open_db();
    let log = EventLog::open(&db, limits(1_000)).unwrap();
    log.append(&vec![ev(EventKind::AccessGranted); 3]).unwrap();
    log.append_unflushed(&[ev(EventKind::AccessGranted)])
        .unwrap();
    // Another database, as reopened after a disk-full recovery: 5 events and a high-water of 9.
    let (_d2, other) = open_db();
    {
        let log2 = EventLog::open(&other, limits(1_000)).unwrap();
        log2.append(&vec![ev(EventKind::AccessDenied); 8]).unwrap();
        log2.remove_delivered(&[1, 2, 8]).unwrap();
        log2.flush().unwrap();
    }
    log.reattach(&other).unwrap();
    assert_eq!(log.len(), 5);
    assert_eq!(log.next_seq(), 9);
    assert!(!log.has_pending());
    assert_eq!(log.bounds(), (Some(3), Some(7)));
    assert_eq!(log.append(&[ev(EventKind::AccessGranted)]).unwrap(), [9]);
    assert_eq!(log.read_from(0, 100).unwrap().len(), 6);
}

#[test]
fn an_append_reads_only_a_few_records_for_a_trim_and_the_background_trim_finishes_it() {
    let (_d, db) = open_db();
    let log = EventLog::open(&db, limits(1_000)).unwrap();
    log.append(&vec![ev(EventKind::AccessDenied); 500]).unwrap();
    log.append(&vec![ev(EventKind::AccessGranted); 500])
        .unwrap();
    assert_eq!(log.trim_reads(), 0, "at the bound, not over it");
    // Over the bound: the append reads at most 64 + 2 records (all security events here).
    log.append(&[ev(EventKind::AccessGranted)]).unwrap();
    assert_eq!(log.trim_reads(), 66);
    assert_eq!(log.len(), 1_001);
    assert!(log.over_bounds());
    // The daemon's background trim (every second) finishes it, from where the append stopped.
    assert_eq!(log.trim_pending(at(), "").unwrap(), 51);
    assert!(!log.over_bounds());
    assert_eq!(log.len(), 950 + 1);
    assert_eq!(
        log.trim_reads(),
        500 + 51 + 1,
        "each record read once, and where it stopped"
    );
    assert_eq!(overflow_records(&log).len(), 1);
    assert_eq!(log.trim_pending(at(), "").unwrap(), 0);
}
