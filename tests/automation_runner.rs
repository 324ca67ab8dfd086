//! The automation runner (src/automation/runner.rs) on a real store, with a relay board that
//! refuses to switch off at first (`FlakyBoard`, behind the command router's `Relays` trait):
//! a grant into the zone switches the trigger relay on, its off is retried until the board
//! takes it (never left on); facts from unknown devices are counted and ignored; a full fact
//! queue drops and counts, never blocks; the alerts set reaches the board only once durable.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gatehouse::automation::facts::{DropCounter, FactSink, Observed};
use gatehouse::automation::runner::{self, AlertBoard, RunnerCounters};
use gatehouse::cloud::commands::{Execution, Online, RelayOp, Relays};
use gatehouse::store::Store;
use gatehouse::sync;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// A relay board whose first `fail_offs` offs fail (a bus not answering yet).
#[derive(Default)]
struct FlakyBoard {
    fail_offs: AtomicU32,
    done: Mutex<Vec<(String, u16, RelayOp)>>,
    refused: AtomicU32,
}

impl Relays for FlakyBoard {
    fn online(&self, device: &str) -> Online {
        if device == "board" {
            Online::Yes
        } else {
            Online::Unknown
        }
    }

    fn execute(&self, device: &str, channel: u16, op: RelayOp) -> Execution {
        if op == RelayOp::Off
            && self
                .fail_offs
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Execution::Failed("no answer from the bus".into());
        }
        self.done
            .lock()
            .unwrap()
            .push((device.to_string(), channel, op));
        Execution::Done("ok".into())
    }
}

fn site() -> sync::SyncMessage {
    let doc = json!({
        "schema_version": 1, "kind": "snapshot", "version": 1,
        "facility": {"time_zone": "UTC", "zone_triggers": true},
        "zones": [{"id": "z-a", "triggers": [{"device": "board", "channel": 3, "on_seconds": 1}]}],
        "entries": [{"id": "door-a", "kind": "door", "zone": "z-a", "held_open_seconds": 5}],
        "users": [{"id": "alice", "role": "tenant"}]
    });
    sync::parse(doc.to_string().as_bytes()).unwrap()
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < end, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_failed_trigger_off_is_retried_until_the_relay_is_off_and_unknown_facts_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 10_000).unwrap());
    store.apply(&site()).unwrap();
    let board = Arc::new(FlakyBoard::default());
    board.fail_offs.store(2, Ordering::SeqCst);
    let (sink, rx) = FactSink::bounded(16, DropCounter::default());
    let counters = RunnerCounters::default();
    let alerts = AlertBoard::new();
    let stop = CancellationToken::new();
    let running = runner::start(
        store.clone(),
        board.clone(),
        rx,
        sink.placements().clone(),
        alerts.clone(),
        counters.clone(),
        stop.clone(),
    )
    .unwrap();
    // The restored (empty) set is published at once.
    assert_eq!(alerts.snapshot().0, 1);
    assert!(alerts.snapshot().1.is_empty());

    // Unknown device and entry: counted, nothing else.
    sink.send(Observed::Motion {
        device: "nobody".into(),
        channel: None,
    });
    sink.send(Observed::DoorOpened {
        entry: "no-such-door".into(),
    });
    eventually("two unknown facts counted", || counters.unknown.get() == 2);

    // A grant into z-a: on, then the off (after 1 s) fails twice and is retried.
    sink.send(Observed::Granted {
        user: Some("alice".into()),
        entry: Some("door-a".into()),
        unit: None,
        leaving: false,
    });
    eventually("relay on", || {
        board
            .done
            .lock()
            .unwrap()
            .contains(&("board".into(), 3, RelayOp::On))
    });
    eventually("relay off after the retries", || {
        board
            .done
            .lock()
            .unwrap()
            .contains(&("board".into(), 3, RelayOp::Off))
    });
    assert_eq!(board.refused.load(Ordering::SeqCst), 2);

    // A door held open: raised, and on the board only after its records and event are
    // durable (the event is in the log, visible, when the board shows the alert).
    sink.send(Observed::DoorOpened {
        entry: "door-a".into(),
    });
    eventually("door_held_open on the board", || {
        alerts
            .snapshot()
            .1
            .iter()
            .any(|a| a.kind.as_str() == "door_held_open")
    });
    let seen = store.events().read_from(0, 1000).unwrap();
    assert!(
        seen.iter().any(|e| e.kind == "alert_raised"),
        "the alert was on the board before its event was visible"
    );
    sink.send(Observed::DoorClosed {
        entry: "door-a".into(),
    });
    eventually("cleared on the board", || alerts.snapshot().1.is_empty());
    assert!(counters.facts.get() >= 5);

    stop.cancel();
    running.join();
}

#[test]
fn a_full_fact_queue_drops_and_counts_without_blocking() {
    let dropped = DropCounter::default();
    let (sink, rx) = FactSink::bounded(8, dropped.clone());
    let start = Instant::now();
    for i in 0..10_000 {
        sink.send(Observed::Motion {
            device: format!("pir-{i}"),
            channel: None,
        });
    }
    assert_eq!(dropped.get(), 10_000 - 8);
    assert_eq!(rx.try_iter().count(), 8);
    // Generous: 10,000 refused sends cost microseconds each at most; a blocking send would
    // never return at all.
    assert!(start.elapsed() < WAIT);
}

#[test]
fn the_automation_counters_are_exported_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 10_000).unwrap();
    let m = gatehouse::metrics::Metrics::new();
    let (sink, _rx) = FactSink::bounded(1, m.facts_dropped());
    sink.send(Observed::LockLocked { device: "a".into() });
    sink.send(Observed::LockLocked { device: "b".into() });
    m.automation().unknown.inc();
    m.automation().active.set(3);
    let text = m.encode(&store);
    for line in [
        "gatehouse_automation_facts_dropped_total 1",
        "gatehouse_automation_facts_unknown_total 1",
        "gatehouse_automation_alerts_active 3",
        "gatehouse_automation_facts_total 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
    let h = m.health();
    assert_eq!(
        (h.facts_dropped, h.facts_unknown, h.alerts_active),
        (1, 1, 3)
    );
}
