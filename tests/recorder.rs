//! The group commit of recorded events (`Store::record`): batching from several threads, order,
//! nothing lost at drain or drop, and access decisions still flushed at once.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use gatehouse::access::{AccessEngine, Attempt};
use gatehouse::events::EventKind;
use gatehouse::policy::{Direction, Presented, Request, Target};
use gatehouse::store::{Store, commit};
use serde_json::json;

const THREADS: u64 = 4;
const PER_THREAD: u64 = 500;

#[test]
fn events_from_several_threads_share_few_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 1_000_000).unwrap());
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let store = store.clone();
            s.spawn(move || {
                for i in 0..PER_THREAD {
                    store.record(
                        EventKind::SensorReading,
                        json!({"device": format!("t{t}"), "i": i}),
                    );
                }
            });
        }
    });
    store.drain_recorded();
    let elapsed = started.elapsed();
    let flushes = store.recorder_flushes();
    let n = THREADS * PER_THREAD;
    let evs = store.events().read_from(0, 100_000).unwrap();
    assert_eq!(
        evs.len() as u64,
        n,
        "every recorded event is visible after the drain"
    );
    // Contiguous numbers, and each thread's events in the order it recorded them.
    for w in evs.windows(2) {
        assert_eq!(w[1].seq, w[0].seq + 1);
    }
    for t in 0..THREADS {
        let mine: Vec<u64> = evs
            .iter()
            .filter(|e| e.payload["device"] == format!("t{t}"))
            .map(|e| e.payload["i"].as_u64().unwrap())
            .collect();
        assert_eq!(mine, (0..PER_THREAD).collect::<Vec<_>>());
    }
    // At most one flush per window (plus the drain's), and far fewer flushes than events.
    let windows = elapsed.as_millis() as u64 / commit::WINDOW.as_millis() as u64;
    assert!(
        flushes <= windows + 2,
        "{flushes} flushes in {elapsed:?}: more than one per window"
    );
    assert!(flushes < n, "{flushes} flushes for {n} events");
    println!("recorder: {n} events from {THREADS} threads in {flushes} flushes ({elapsed:?})");
}

#[test]
fn a_decision_is_flushed_at_once_amid_recorded_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 1_000_000).unwrap());
    let engine = AccessEngine::new(store.clone(), None);
    for i in 0..200 {
        store.record(EventKind::SensorReading, json!({"device": "s", "i": i}));
    }
    let attempt = Attempt {
        request: Request {
            credential: Presented::Code("123456"),
            target: Target::Entry("gate-1"),
            direction: Direction::In,
        },
        device: Some("keypad-1"),
    };
    engine.check(&attempt, Utc::now()).unwrap();
    // No drain: the decision is on disk and visible when `check` returns.
    let durable = store.events().durable_seq();
    let evs = store.events().read_from(0, 100_000).unwrap();
    let decision = evs
        .iter()
        .find(|e| e.kind == "access_denied")
        .expect("the decision is visible as soon as check returns");
    assert!(decision.seq < durable);
    // Readings recorded before it are durable too (the decision's flush covers them) or are
    // still queued; after the drain all are there.
    store.drain_recorded();
    let evs = store.events().read_from(0, 100_000).unwrap();
    assert_eq!(
        evs.iter().filter(|e| e.kind == "sensor_reading").count(),
        200
    );
}

#[test]
fn dropping_the_store_flushes_what_was_queued() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), 1_000_000).unwrap();
        for i in 0..1000 {
            store.record(EventKind::SensorReading, json!({"device": "s", "i": i}));
        }
    }
    let store = Store::open(dir.path(), 1_000_000).unwrap();
    let evs = store.events().read_from(0, 100_000).unwrap();
    assert_eq!(
        evs.len(),
        1000,
        "the queue was drained and flushed when the store closed"
    );
    assert!(
        evs.iter().all(|e| !e.local.is_empty()),
        "stamped with local time"
    );
}
