//! The event log's own rules: visibility after flush, size bound, trim cost and folding, age
//! in lived time.

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
fn an_append_reads_only_a_few_records_for_a_trim_and_the_background_trim_finishes_it() {
    let (_d, db) = open_db();
    let log = EventLog::open(&db, limits(1_000)).unwrap();
    // Security and ordinary events alternating (seq 1 security, 2 ordinary, ...).
    let pairs: Vec<NewEvent> = (0..500)
        .flat_map(|_| [ev(EventKind::AccessDenied), ev(EventKind::AccessGranted)])
        .collect();
    log.append(&pairs).unwrap();
    assert_eq!(log.trim_reads(), 0, "at the bound, not over it");
    // Over the bound by one: 51 events must go, but the append reads only 64 + 2 records (and
    // drops the 33 ordinary ones among them).
    log.append(&[ev(EventKind::AccessGranted)]).unwrap();
    assert_eq!(log.trim_reads(), 66);
    assert_eq!(log.len(), 1_001 - 33 + 1);
    assert!(log.over_bounds(), "the trim is unfinished");
    // The daemon's background trim (every second) finishes it from where the append stopped.
    assert_eq!(log.trim_pending(at(), "").unwrap(), 18);
    assert!(!log.over_bounds());
    assert_eq!(log.len(), 950 + 1);
    assert_eq!(
        log.trim_reads(),
        66 + 35 + 1,
        "each record read once, and where it stopped"
    );
    let overflow = overflow_records(&log);
    assert_eq!(overflow.len(), 1);
    assert_eq!(overflow[0].payload["dropped"], 51);
    assert_eq!(
        (
            overflow[0].payload["first_seq"].as_u64(),
            overflow[0].payload["last_seq"].as_u64()
        ),
        (Some(2), Some(102))
    );
    assert_eq!(log.trim_pending(at(), "").unwrap(), 0);
}

/// The counters a reopen rebuilds from disk, to compare with those kept while running.
fn counters(log: &EventLog) -> (u64, u64, u64, u64, u64, u64, Option<u64>, u64) {
    let st = log.lock();
    (
        st.next,
        st.count,
        st.bytes,
        st.droppable,
        st.droppable_bytes,
        st.scan_from,
        st.overflow,
        st.dropped_total,
    )
}

fn mixed(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| NewEvent {
            payload: json!({"i": i}),
            ..ev(if i % 10 == 0 {
                EventKind::AccessDenied
            } else {
                EventKind::AccessGranted
            })
        })
        .collect()
}

#[test]
fn a_large_log_is_a_few_keys_per_block_and_a_reopen_finds_the_same_state() {
    let (_d, db) = open_db();
    let log = EventLog::open(&db, limits(2_000)).unwrap();
    log.append(&mixed(1_500)).unwrap();
    for _ in 0..300 {
        log.append(&mixed(1)).unwrap();
    }
    // Over the bound: a trim dropped (and compacted) the oldest ordinary events.
    assert!(log.append(&mixed(400)).is_ok());
    assert!(!overflow_records(&log).is_empty());
    // Acknowledged: some whole blocks, some records inside blocks, some loose.
    let held: Vec<u64> = log
        .read_from(0, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    let acked: Vec<u64> = held
        .iter()
        .copied()
        .filter(|s| s % 3 == 0 || *s < 700)
        .collect();
    log.remove_delivered(&acked).unwrap();
    log.flush().unwrap();
    let running = counters(&log);
    let left: Vec<Event> = log.read_from(0, usize::MAX).unwrap();
    assert_eq!(left.len() as u64, log.len());
    assert!(left.iter().all(|e| !acked.contains(&e.seq)));
    assert_eq!(
        log.bytes(),
        left.iter()
            .map(|e| serde_json::to_vec(e).unwrap().len() as u64)
            .sum::<u64>()
    );
    // Sled holds a block and a summary per 128 numbers, plus the open block's loose records.
    let keys = db.open_tree(EVENTS_TREE).unwrap().len() as u64;
    assert!(
        keys <= 2 * (log.next_seq() / BLOCK + 1) + BLOCK + 3,
        "{keys} keys"
    );
    drop(log);
    let log = EventLog::open(&db, limits(2_000)).unwrap();
    // The trim cursor is a lower bound (every record below it is a security event or gone):
    // the reopen finds it exactly, the running log may lag behind acknowledgements.
    let reopened = counters(&log);
    assert!(reopened.5 >= running.5);
    assert_eq!(
        reopened,
        (
            running.0, running.1, running.2, running.3, running.4, reopened.5, running.6, running.7
        )
    );
    assert_eq!(log.read_from(0, usize::MAX).unwrap(), left);
    assert_eq!(
        log.bounds(),
        (left.first().map(|e| e.seq), left.last().map(|e| e.seq))
    );
    // Reading from the middle of a block, in windows, sees each record once.
    let mut seen = Vec::new();
    let mut cursor = left[left.len() / 2].seq + 1;
    loop {
        let w = log.read_raw_from(cursor, 7).unwrap();
        let Some((last, _)) = w.last() else { break };
        cursor = last + 1;
        seen.extend(w.into_iter().map(|(s, _)| s));
    }
    let want: Vec<u64> = left
        .iter()
        .map(|e| e.seq)
        .filter(|s| *s > left[left.len() / 2].seq)
        .collect();
    assert_eq!(seen, want);
    // Everything delivered: only the high-water and counter keys are left, and numbers go on.
    let next = log.next_seq();
    log.remove_delivered(&left.iter().map(|e| e.seq).collect::<Vec<_>>())
        .unwrap();
    assert!(log.is_empty());
    assert_eq!(log.bytes(), 0);
    assert!(
        db.open_tree(EVENTS_TREE)
            .unwrap()
            .iter()
            .keys()
            .all(|k| k.unwrap().len() < 8),
        "every block deleted"
    );
    assert_eq!(log.append(&mixed(1)).unwrap(), [next]);
}

/// Writes a log as versions before blocks did: one key per event, `<seq:u64be>` → JSON.
fn write_old_layout(db: &sled::Db, events: &[Event], next: u64) {
    let t = db.open_tree(EVENTS_TREE).unwrap();
    for e in events {
        t.insert(e.seq.to_be_bytes(), serde_json::to_vec(e).unwrap())
            .unwrap();
    }
    t.insert(HIGH_WATER, &next.to_be_bytes()).unwrap();
    t.insert(DROPPED_TOTAL, &7u64.to_be_bytes()).unwrap();
    db.flush().unwrap();
}

fn old_events(n: u64) -> Vec<Event> {
    (1..=n)
        .map(|seq| Event {
            seq,
            at: at(),
            local: "2026-11-23T16:00:00+01:00".into(),
            kind: match seq {
                s if s == n - 5 => "outbox_overflow",
                s if s % 10 == 0 => "access_denied",
                _ => "access_granted",
            }
            .into(),
            payload: if seq == n - 5 {
                json!({"dropped": 7, "dropped_total": 7, "first_seq": 1, "last_seq": 0})
            } else {
                json!({"i": seq})
            },
        })
        .collect()
}

#[test]
fn a_log_of_one_key_per_event_opens_is_sealed_once_and_is_delivered() {
    let (_d, db) = open_db();
    let old = old_events(1_000);
    write_old_layout(&db, &old[1..], 1_001);
    let log = EventLog::open(&db, limits(1_000)).unwrap();
    assert_eq!(log.read_from(0, usize::MAX).unwrap(), old[1..]);
    assert_eq!(log.len(), 999);
    assert_eq!(log.next_seq(), 1_001);
    let (next, count, bytes, droppable, _, scan_from, overflow, dropped_total) = counters(&log);
    assert_eq!(
        (next, count, scan_from, overflow, dropped_total),
        (1_001, 999, 2, Some(995), 7)
    );
    let ordinary: Vec<&Event> = old[1..]
        .iter()
        .filter(|e| e.kind == "access_granted")
        .collect();
    assert_eq!(droppable, ordinary.len() as u64);
    assert_eq!(
        bytes,
        old[1..]
            .iter()
            .map(|e| serde_json::to_vec(e).unwrap().len() as u64)
            .sum::<u64>()
    );
    let keys = db.open_tree(EVENTS_TREE).unwrap().len();
    assert!(
        keys < 1_000 / 128 * 2 + 128 + 4,
        "sealed into blocks: {keys} keys"
    );
    // A trim folds the old version's overflow record into its own.
    log.append(&mixed(60)).unwrap();
    let o = overflow_records(&log);
    assert_eq!(o.len(), 1);
    assert!(o[0].seq > 1_000);
    assert_eq!(o[0].payload["first_seq"], 1);
    // The folded record counted 7; the total counts them once.
    assert_eq!(o[0].payload["dropped_total"], o[0].payload["dropped"]);
    // Delivered like any other record.
    let all: Vec<u64> = log
        .read_from(0, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    log.remove_delivered(&all).unwrap();
    assert!(log.is_empty());
}

#[test]
fn a_migration_interrupted_half_way_finishes_at_the_next_open() {
    let (_d, db) = open_db();
    let old = old_events(700);
    write_old_layout(&db, &old, 701);
    // A crash after two blocks were sealed (each is one batch).
    let t = db.open_tree(EVENTS_TREE).unwrap();
    blocks::seal(&t, 1).unwrap();
    blocks::seal(&t, 3).unwrap();
    db.flush().unwrap();
    let log = EventLog::open(&db, limits(1_000)).unwrap();
    assert_eq!(log.read_from(0, usize::MAX).unwrap(), old);
    assert_eq!(counters(&log).6, Some(695));
    drop(log);
    let log = EventLog::open(&db, limits(1_000)).unwrap();
    assert_eq!(log.read_from(0, usize::MAX).unwrap(), old);
    assert_eq!(log.len(), 700);
}

/// A seal moves a block's records from loose keys into the block while readers read (the cloud
/// link reads as the bus threads append). Every read must be the contiguous run of held records
/// from its cursor up to the watermark it saw: a record missed there would be skipped by the link.
#[test]
fn a_reader_never_misses_the_records_a_seal_moves() {
    let (_d, db) = open_db();
    let log = Arc::new(EventLog::open(&db, limits(1_000_000)).unwrap());
    const N: u64 = 40 * BLOCK;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Readers read the block being filled, from its start, again and again: the block a seal
    // is about to move.
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (log, done) = (log.clone(), done.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let end = log.durable_seq();
                    let from = (end.saturating_sub(1) / BLOCK * BLOCK).max(1);
                    let got = log.read_raw_from(from, 1_000).unwrap();
                    let want = end.saturating_sub(from) as usize;
                    assert!(
                        got.len() >= want,
                        "read {reads} from {from}: {} of {want}",
                        got.len()
                    );
                    for (i, (seq, _)) in got.iter().enumerate() {
                        assert_eq!(*seq, from + i as u64, "read {reads} from {from}: a gap");
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for _ in 0..N {
        log.append_unflushed(&[ev(EventKind::SensorReading)])
            .unwrap();
        log.flush_pending().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    assert_eq!(log.read_from(1, usize::MAX).unwrap().len() as u64, N);
}
