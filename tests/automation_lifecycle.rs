//! The alert lifecycle against a real store: ids, one active alert per kind and subject, the
//! `alert_raised` / `alert_cleared` events, and restarts (the store closed and reopened) in the
//! middle: an active alert is neither repeated nor forgotten, and a zone relay is switched off
//! on time, also when the gateway was down past its off time.

use chrono::{DateTime, Duration, TimeZone, Utc};
use gatehouse::automation::lifecycle::{Lifecycle, RelayOp};
use gatehouse::automation::{Millis, RawFact, Rules, SECOND, Settings, resolve};
use gatehouse::store::Store;
use gatehouse::sync;
use serde_json::json;

fn snapshot() -> sync::SyncMessage {
    let doc = json!({
        "schema_version": 1, "kind": "snapshot", "version": 1,
        "facility": {"time_zone": "UTC", "zone_triggers": true},
        "zones": [{"id": "z-a", "triggers": [{"device": "board", "channel": 3, "on_seconds": 60}]}],
        "entries": [{"id": "door-a", "kind": "door", "zone": "z-a", "held_open_seconds": 30}],
        "users": [{"id": "alice", "role": "tenant"}]
    });
    sync::parse(doc.to_string().as_bytes()).unwrap()
}

fn wall(sec: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap() + Duration::seconds(sec)
}

/// One run of the gateway: the store, the rules and the lifecycle, driven by hand.
struct Run {
    store: Store,
    rules: Rules,
    life: Lifecycle,
}

impl Run {
    /// Opens (or reopens) at lived second `lived` and wall second `wall_s`; returns the relay
    /// operations due at once.
    fn open(dir: &std::path::Path, run: u32, lived: u64, wall_s: i64) -> (Run, Vec<RelayOp>) {
        let store = Store::open(dir, 10_000).unwrap();
        if !store.has_snapshot() {
            store.apply(&snapshot()).unwrap();
        }
        let mut rules = Rules::default();
        let (life, due) = Lifecycle::restore(
            &store,
            &mut rules,
            format!("e-{run}"),
            lived * SECOND,
            wall(wall_s),
        )
        .unwrap();
        (Run { store, rules, life }, due)
    }

    fn fact(&mut self, raw: RawFact<'_>, lived: u64, wall_s: i64) -> Vec<RelayOp> {
        let site = self.store.site();
        let s = Settings::from_facility(&site.tables.facility.wire);
        let f = resolve(&site.tables, &raw).expect("known");
        let actions = self.rules.step(&site.tables, &s, &f, lived * SECOND);
        drop(site);
        self.life
            .apply(&self.store, actions, lived * SECOND, wall(wall_s))
            .unwrap()
    }

    fn tick(&mut self, lived: u64, wall_s: i64) -> Vec<RelayOp> {
        let site = self.store.site();
        let s = Settings::from_facility(&site.tables.facility.wire);
        let now: Millis = lived * SECOND;
        let actions = self.rules.tick(&site.tables, &s, now);
        drop(site);
        self.life
            .apply(&self.store, actions, now, wall(wall_s))
            .unwrap()
    }

    fn alert_events(&self) -> Vec<(String, serde_json::Value)> {
        // Alert events go through the group commit: wait until they are visible.
        self.store.drain_recorded();
        self.store
            .events()
            .read_from(0, 1000)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind.starts_with("alert_"))
            .map(|e| (e.kind, e.payload))
            .collect()
    }
}

fn off() -> RelayOp {
    RelayOp::Off {
        device: "board".into(),
        channel: 3,
    }
}

#[test]
fn restart_neither_repeats_nor_forgets_and_relays_go_off_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let (mut r, due) = Run::open(dir.path(), 1, 0, 0);
    assert!(due.is_empty());
    assert!(
        r.fact(RawFact::DoorOpened { entry: "door-a" }, 0, 0)
            .is_empty()
    );
    let grant = RawFact::Granted {
        user: Some("alice"),
        entry: Some("door-a"),
        unit: None,
        leaving: false,
    };
    assert_eq!(
        r.fact(grant, 0, 0),
        vec![RelayOp::On {
            device: "board".into(),
            channel: 3
        }]
    );
    assert!(r.tick(29, 29).is_empty());
    r.tick(30, 30);
    r.tick(31, 31); // no repeat while held
    let events = r.alert_events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, "alert_raised");
    assert_eq!(events[0].1["kind"], "door_held_open");
    assert_eq!(
        events[0].1["subject"],
        json!({"type": "entry", "id": "door-a"})
    );
    let id = events[0].1["id"].as_str().unwrap().to_string();
    assert_eq!(r.life.active().count(), 1);
    drop(r);

    // Down 10 s of wall time; the lived clock does not count it.
    let (mut r, due) = Run::open(dir.path(), 2, 40, 50);
    assert!(due.is_empty());
    assert_eq!(
        r.life.active().map(|a| a.id.clone()).collect::<Vec<_>>(),
        vec![id.clone()]
    );
    assert!(r.tick(45, 55).is_empty());
    assert_eq!(
        r.alert_events().len(),
        1,
        "the active alert is not raised again"
    );
    // The relay was due off 60 s after the grant: 10 s after the restart by the wall clock
    // (lived: 20 s): the earlier wins.
    assert!(r.tick(49, 59).is_empty());
    assert_eq!(r.tick(50, 60), vec![off()]);
    assert!(r.tick(51, 61).is_empty());
    // The door closes: cleared, with the id it was raised with.
    r.fact(RawFact::DoorClosed { entry: "door-a" }, 52, 62);
    let events = r.alert_events();
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].0, "alert_cleared");
    assert_eq!(events[1].1["id"], id.as_str());
    assert_eq!(r.life.active().count(), 0);
    drop(r);

    // Nothing left to restore.
    let (r, due) = Run::open(dir.path(), 3, 60, 70);
    assert!(due.is_empty());
    assert_eq!(r.life.active().count(), 0);
}

#[test]
fn a_relay_due_during_the_downtime_goes_off_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (mut r, _) = Run::open(dir.path(), 1, 0, 0);
    let grant = RawFact::Granted {
        user: Some("alice"),
        entry: Some("door-a"),
        unit: None,
        leaving: false,
    };
    assert_eq!(r.fact(grant.clone(), 5, 5).len(), 1);
    // Extended by a second grant: the stored off time moves.
    assert_eq!(r.fact(grant, 20, 20).len(), 1);
    drop(r);
    // Back 2 minutes later (wall): the relay was due at wall 80.
    let (mut r, due) = Run::open(dir.path(), 2, 21, 141);
    assert_eq!(due, vec![off()]);
    assert!(r.tick(200, 320).is_empty(), "switched off once");
    drop(r);
    let (_r, due) = Run::open(dir.path(), 3, 201, 321);
    assert!(due.is_empty(), "the timer is gone once done");
}

/// The lifecycle itself keeps one active alert per kind and subject, whatever the rules say,
/// and a clear of an alert that is not active records nothing.
#[test]
fn one_active_alert_per_kind_and_subject() {
    use gatehouse::automation::{Action, AlertKind, Subject};
    let dir = tempfile::tempdir().unwrap();
    let (mut r, _) = Run::open(dir.path(), 1, 0, 0);
    let raise = |id: &str| Action::Raise {
        kind: AlertKind::ManualUnlock,
        subject: Subject::Entry(id.into()),
        detail: json!({}),
    };
    let clear = |id: &str| Action::Clear {
        kind: AlertKind::ManualUnlock,
        subject: Subject::Entry(id.into()),
    };
    r.life
        .apply(
            &r.store,
            vec![
                raise("door-a"),
                raise("door-a"),
                raise("gate"),
                clear("nowhere"),
            ],
            0,
            wall(0),
        )
        .unwrap();
    let kinds: Vec<String> = r.alert_events().into_iter().map(|e| e.0).collect();
    assert_eq!(kinds, ["alert_raised", "alert_raised"]);
    let ids: Vec<String> = r.life.active().map(|a| a.id.clone()).collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
}
