//! `gatehouse-bench automation`: the site automation rules (src/automation/) on a site of
//! 10,000 units (one motion sensor and one controller each) and 100 doors.
//!
//! - `facts_per_s`: mixed facts (motion, temperature readings, door contacts, grants) resolved,
//!   stepped through the rules, alerts carried through the lifecycle (durable), and each fact
//!   recorded as its event through the group commit, until all of it is on disk;
//! - `rule_overhead_p99_us`: what `resolve` + `Rules::step` add per fact (no log write);
//! - `alerts`: alerts raised during the run;
//! - `restart_restore_ms`: reopening the store holding 10,000 active alerts and 10,000 pending
//!   relay offs and restoring them (`Lifecycle::restore`).

use std::time::Instant;

use chrono::Utc;
use serde_json::json;

use gatehouse::automation::lifecycle::Lifecycle;
use gatehouse::automation::{Action, AlertKind, RawFact, Rules, Settings, Subject, resolve};
use gatehouse::events::EventKind;
use gatehouse::store::{AutomationSet, AutomationWrite, Store};
use gatehouse::sync;

const UNITS: usize = 10_000;
const DOORS: usize = 100;
const FACTS: usize = 200_000;

/// Facts in the run: `GATEHOUSE_BENCH_FACTS` (a smaller run under a profiler), else [`FACTS`].
fn facts() -> usize {
    std::env::var("GATEHOUSE_BENCH_FACTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(FACTS)
}
const RESTORE: usize = 10_000;

fn site() -> sync::SyncMessage {
    let units: Vec<_> = (0..UNITS)
        .map(|u| {
            json!({"id": format!("U{u}"), "status": "occupied", "controller": format!("lock-{u}"),
                   "sensors": [{"device": format!("pir-{u}")}]})
        })
        .collect();
    let entries: Vec<_> = (0..DOORS)
        .map(|d| json!({"id": format!("door-{d}"), "kind": "door", "zone": "z", "held_open_seconds": 30}))
        .collect();
    let doc = json!({
        "schema_version": 1, "kind": "snapshot", "version": 1,
        "facility": {"time_zone": "UTC", "motion_alert_events": 3, "motion_alert_minutes": 5,
                     "temperature_max": 30.0, "temperature_minutes": 0, "zone_triggers": true},
        "zones": [{"id": "z", "triggers": [{"device": "board", "channel": 1, "on_seconds": 60}]}],
        "entries": entries, "units": units,
        "users": [{"id": "alice", "role": "tenant"}]
    });
    sync::parse(doc.to_string().as_bytes()).expect("bench site")
}

pub fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path(), 10_000_000)?;
    store.apply(&site())?;
    let mut rules = Rules::default();
    let (mut life, _) = Lifecycle::restore(&store, &mut rules, "bench".into(), 0, Utc::now())?;
    let names: Vec<(String, String, String)> = (0..UNITS)
        .map(|u| {
            (
                format!("pir-{u}"),
                format!("lock-{u}"),
                format!("door-{}", u % DOORS),
            )
        })
        .collect();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let n_facts = facts();
    let mut overhead = Vec::with_capacity(n_facts);
    let mut alerts = 0usize;
    let start = Instant::now();
    for i in 0..n_facts {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let (pir, lock, door) = &names[(rng % UNITS as u64) as usize];
        let now = i as u64; // 1 ms of lived time per fact
        let (raw, kind) = match i % 5 {
            0 | 1 => (
                RawFact::Motion {
                    device: pir,
                    channel: None,
                },
                EventKind::Motion,
            ),
            2 => (
                RawFact::Temperature {
                    device: lock,
                    channel: None,
                    celsius: 20.0 + (rng % 15) as f64,
                },
                EventKind::SensorReading,
            ),
            3 => (
                if rng % 2 == 0 {
                    RawFact::DoorOpened { entry: door }
                } else {
                    RawFact::DoorClosed { entry: door }
                },
                EventKind::DoorOpened,
            ),
            _ => (
                RawFact::Granted {
                    user: Some("alice"),
                    entry: Some(door),
                    unit: None,
                    leaving: false,
                },
                EventKind::AccessGranted,
            ),
        };
        let site = store.site();
        let settings = Settings::from_facility(&site.tables.facility.wire);
        let t = Instant::now();
        let actions = match resolve(&site.tables, &raw) {
            Some(f) => rules.step(&site.tables, &settings, &f, now),
            None => Vec::new(),
        };
        let mut actions = actions;
        if i % 1000 == 0 {
            actions.extend(rules.tick(&site.tables, &settings, now));
        }
        overhead.push(t.elapsed().as_secs_f64() * 1e6);
        drop(site);
        alerts += actions
            .iter()
            .filter(|a| matches!(a, Action::Raise { .. }))
            .count();
        store.record(kind, json!({"bench": i}));
        life.apply(&store, actions, now, Utc::now())?;
    }
    store.drain_recorded();
    let secs = start.elapsed().as_secs_f64();
    overhead.sort_by(|a, b| a.total_cmp(b));
    let p99 = overhead[(overhead.len() as f64 * 0.99) as usize];
    drop(life);
    drop(store);

    // Restore: 10,000 active alerts and 10,000 pending relay offs.
    let dir2 = tempfile::tempdir()?;
    {
        let store = Store::open(dir2.path(), 10_000)?;
        store.apply(&site())?;
        let mut writes = Vec::with_capacity(2 * RESTORE);
        for u in 0..RESTORE {
            let a = json!({"id": format!("x-{u}"), "kind": AlertKind::MotionAlert,
                           "subject": Subject::Unit(format!("U{u}").into()),
                           "raised_at": Utc::now(), "detail": {}});
            writes.push(AutomationWrite {
                set: AutomationSet::Alerts,
                key: format!("motion_alert/unit/U{u}"),
                value: Some(a),
            });
            let t = json!({"device": format!("board-{u}"), "channel": 1,
                           "off_lived_ms": 3_600_000u64, "off_at": Utc::now() + chrono::Duration::hours(1)});
            writes.push(AutomationWrite {
                set: AutomationSet::Timers,
                key: format!("00001/board-{u}"),
                value: Some(t),
            });
        }
        store.automation_write(&writes, Vec::new(), true)?;
    }
    let t = Instant::now();
    let store = Store::open(dir2.path(), 10_000)?;
    let mut rules = Rules::default();
    let (life, due) = Lifecycle::restore(&store, &mut rules, "r".into(), 0, Utc::now())?;
    let restore_ms = t.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(
        life.active().count() == RESTORE && due.is_empty(),
        "restore incomplete"
    );
    anyhow::ensure!(
        rules.zone.pending().count() == RESTORE,
        "timers not restored"
    );

    println!(
        "{}",
        json!({
            "bench": "automation",
            "units": UNITS,
            "facts": n_facts,
            "facts_per_s": (n_facts as f64 / secs).round(),
            "rule_overhead_p99_us": (p99 * 100.0).round() / 100.0,
            "alerts": alerts,
            "restart_restore_ms": (restore_ms * 10.0).round() / 10.0,
            "restored_alerts": RESTORE,
            "restored_timers": RESTORE,
        })
    );
    Ok(())
}
