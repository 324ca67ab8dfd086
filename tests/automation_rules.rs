//! The automation rules (src/automation/), one table family per rule through one `check`:
//! a site, settings, and a script of `(seconds, input)` where an input is a raw fact as the
//! drivers report it (resolved against the site first, as the daemon does) or a tick of the
//! timers; the expected output is the list of actions in a short text form. The truth tables
//! in docs/automation.md are these rows.

use gatehouse::automation::{Action, Millis, RawFact, Rules, SECOND, Settings, resolve};
use gatehouse::site::{CodeKey, Site};
use gatehouse::sync::{self, SyncMessage};
use serde_json::json;

fn site(facility: serde_json::Value) -> Site {
    let mut f = json!({"time_zone": "UTC"});
    f.as_object_mut()
        .unwrap()
        .extend(facility.as_object().unwrap().clone());
    let doc = json!({
        "schema_version": 1, "kind": "snapshot", "version": 1,
        "facility": f,
        "zones": [
            {"id": "z-a", "triggers": [{"device": "board", "channel": 3, "on_seconds": 60},
                                       {"device": "board", "channel": 4, "pulse_ms": 500}]},
            {"id": "z-b"}
        ],
        "entries": [
            {"id": "gate", "kind": "gate"},
            {"id": "door-a", "kind": "door", "zone": "z-a", "held_open_seconds": 30},
            {"id": "door-b", "kind": "door", "zone": "z-b"},
            {"id": "exit", "kind": "exit"}
        ],
        "users": [{"id": "alice", "role": "tenant"}, {"id": "bob", "role": "tenant"}],
        "units": [
            {"id": "A-1", "status": "occupied", "tenant": "alice", "controller": "lock-1",
             "sensors": [{"device": "pir-1"}, {"device": "pir-1f", "front": true},
                         {"device": "board", "channel": 7}]},
            {"id": "A-2", "status": "occupied", "tenant": "bob", "alarm_enabled": false,
             "monitor_temperature": false, "front_motion": false, "controller": "lock-2",
             "sensors": [{"device": "pir-2"}, {"device": "pir-2f", "front": true}]}
        ],
        "devices": [{"id": "thermo-hall", "kind": "sensor", "mac": "AA:BB:CC:DD:EE:01"}]
    });
    let SyncMessage::Snapshot(s) = sync::parse(doc.to_string().as_bytes()).unwrap() else {
        unreachable!()
    };
    Site::from_snapshot(&s, &CodeKey::from_bytes([7; 32])).expect("test site is valid")
}

enum In {
    F(RawFact<'static>),
    Tick,
}
use In::*;

fn motion(device: &'static str) -> In {
    F(RawFact::Motion {
        device,
        channel: None,
    })
}
fn temp(device: &'static str, celsius: f64) -> In {
    F(RawFact::Temperature {
        device,
        channel: None,
        celsius,
    })
}
fn grant_unit(unit: &'static str) -> In {
    F(RawFact::Granted {
        user: Some("alice"),
        entry: None,
        unit: Some(unit),
        leaving: false,
    })
}
fn grant_entry(user: &'static str, entry: &'static str, leaving: bool) -> In {
    F(RawFact::Granted {
        user: Some(user),
        entry: Some(entry),
        unit: None,
        leaving,
    })
}

fn short(a: &Action) -> String {
    let subj = |s: &gatehouse::automation::Subject| {
        let v = serde_json::to_value(s).unwrap();
        format!(
            "{}:{}",
            v["type"].as_str().unwrap(),
            v["id"].as_str().unwrap()
        )
    };
    match a {
        Action::Raise { kind, subject, .. } => format!("raise {} {}", kind.as_str(), subj(subject)),
        Action::Clear { kind, subject } => format!("clear {} {}", kind.as_str(), subj(subject)),
        Action::Suppressed {
            kind,
            subject,
            reason,
        } => format!("suppress {} {} {reason}", kind.as_str(), subj(subject)),
        Action::RelayOn {
            device,
            channel,
            off_at,
        } => format!("on {device}/{channel} until {}", off_at / SECOND),
        Action::RelayOff { device, channel } => format!("off {device}/{channel}"),
        Action::RelayPulse {
            device,
            channel,
            ms,
        } => format!("pulse {device}/{channel} {ms}"),
    }
}

/// Runs the script (times in seconds from 0) and compares every action produced, in order,
/// each prefixed with the second it happened at.
fn check(facility: serde_json::Value, script: &[(u64, In)], expected: &[&str]) {
    let site = site(facility);
    let settings = Settings::from_facility(&site.tables.facility.wire);
    let mut rules = Rules::default();
    let mut got = Vec::new();
    for (sec, input) in script {
        let now: Millis = sec * SECOND;
        let actions = match input {
            F(raw) => match resolve(&site.tables, raw) {
                Some(fact) => rules.step(&site.tables, &settings, &fact, now),
                None => vec![],
            },
            Tick => rules.tick(&site.tables, &settings, now),
        };
        got.extend(actions.iter().map(|a| format!("{sec}: {}", short(a))));
    }
    assert_eq!(got, expected, "script with settings {settings:?}");
}

const MOTION: fn() -> serde_json::Value = || {
    json!({"motion_alert_events": 3, "motion_alert_minutes": 5,
           "motion_quiet_minutes": 30, "motion_clear_minutes": 10})
};

#[test]
fn motion_counts_n_events_in_m_minutes() {
    // Three within five minutes: one alert.
    check(
        MOTION(),
        &[
            (0, motion("pir-1")),
            (60, motion("pir-1")),
            (120, motion("pir-1")),
        ],
        &["120: raise motion_alert unit:A-1"],
    );
    // Spread over more than the window: never three inside it.
    check(
        MOTION(),
        &[
            (0, motion("pir-1")),
            (200, motion("pir-1")),
            (400, motion("pir-1")),
            (600, motion("pir-1")),
        ],
        &[],
    );
    // Exactly on the window's edge the oldest has left it.
    check(
        MOTION(),
        &[
            (0, motion("pir-1")),
            (150, motion("pir-1")),
            (300, motion("pir-1")),
        ],
        &[],
    );
    // Sensors of one unit count together; a Modbus input of the unit counts too.
    check(
        MOTION(),
        &[
            (0, motion("pir-1")),
            (10, motion("pir-1f")),
            (
                20,
                F(RawFact::Motion {
                    device: "board",
                    channel: Some(7),
                }),
            ),
        ],
        &["20: raise motion_alert unit:A-1"],
    );
    // The controller is a sensor of its unit.
    check(
        MOTION(),
        &[
            (0, motion("lock-1")),
            (1, motion("lock-1")),
            (2, motion("lock-1")),
        ],
        &["2: raise motion_alert unit:A-1"],
    );
}

#[test]
fn motion_settings_absent_or_off_mean_no_alert() {
    // Absent settings: today's behaviour.
    check(
        json!({}),
        &[
            (0, motion("pir-1")),
            (1, motion("pir-1")),
            (2, motion("pir-1")),
        ],
        &[],
    );
    // Unit Alarm off.
    check(
        MOTION(),
        &[
            (0, motion("pir-2")),
            (1, motion("pir-2")),
            (2, motion("pir-2")),
        ],
        &[],
    );
    // A unit's front sensor with Front Motion off is ignored, the other counts (A-2 has its
    // alarm off too, so use A-1's front sensor with front_motion on as the contrast).
    check(
        MOTION(),
        &[
            (0, motion("pir-2f")),
            (1, motion("pir-2f")),
            (2, motion("pir-2f")),
        ],
        &[],
    );
    // Unknown devices are dropped by resolve, never counted.
    check(
        MOTION(),
        &[
            (0, motion("nobody")),
            (1, motion("nobody")),
            (2, motion("nobody")),
        ],
        &[],
    );
}

#[test]
fn motion_after_the_tenants_grant_is_suppressed() {
    check(
        MOTION(),
        &[
            (0, grant_unit("A-1")),
            (100, motion("pir-1")),
            (110, motion("pir-1")),
            (120, motion("pir-1")),
        ],
        &["120: suppress motion_alert unit:A-1 tenant_present"],
    );
    // A remote unlock explains it too.
    check(
        MOTION(),
        &[
            (0, F(RawFact::RemoteUnlock { unit: "A-1" })),
            (1, motion("pir-1")),
            (2, motion("pir-1")),
            (3, motion("pir-1")),
        ],
        &["3: suppress motion_alert unit:A-1 tenant_present"],
    );
    // Outside the quiet window: an alert.
    check(
        MOTION(),
        &[
            (0, grant_unit("A-1")),
            (1800, motion("pir-1")),
            (1801, motion("pir-1")),
            (1802, motion("pir-1")),
        ],
        &["1802: raise motion_alert unit:A-1"],
    );
}

#[test]
fn motion_alert_is_not_repeated_and_clears_after_quiet() {
    check(
        MOTION(),
        &[
            (0, motion("pir-1")),
            (1, motion("pir-1")),
            (2, motion("pir-1")),
            // More motion while active: no second alert, the clear moves out.
            (3, motion("pir-1")),
            (4, motion("pir-1")),
            (5, motion("pir-1")),
            (300, motion("pir-1")),
            (899, Tick), // 599 s after the last motion
            (900, Tick), // 600 s: cleared
            (901, Tick),
            (902, motion("pir-1")),
            (903, motion("pir-1")),
            (904, motion("pir-1")),
        ],
        &[
            "2: raise motion_alert unit:A-1",
            "900: clear motion_alert unit:A-1",
            "904: raise motion_alert unit:A-1",
        ],
    );
}

#[test]
fn a_motion_flood_keeps_state_bounded() {
    let site = site(MOTION());
    let settings = Settings::from_facility(&site.tables.facility.wire);
    let mut rules = Rules::default();
    let mut raised = 0;
    for i in 0..200_000u64 {
        let device = ["pir-1", "pir-2", "nobody", "pir-1f"][(i % 4) as usize];
        if let Some(f) = resolve(
            &site.tables,
            &RawFact::Motion {
                device,
                channel: None,
            },
        ) {
            raised += rules.step(&site.tables, &settings, &f, i).len();
        }
    }
    assert_eq!(raised, 1, "one alert for A-1, none for the others");
    // Only A-1 has state (A-2's alarm is off; unknown devices never get any).
    assert_eq!(rules.motion.tracked(), 1);
}

const TEMP: fn() -> serde_json::Value = || {
    json!({"temperature_min": 2.0, "temperature_max": 30.0, "temperature_hysteresis": 1.0,
           "temperature_minutes": 5})
};

#[test]
fn temperature_needs_the_minimum_duration() {
    check(
        TEMP(),
        &[
            (0, temp("lock-1", 31.0)),
            (200, temp("lock-1", 31.5)),
            (299, Tick),
            (300, Tick),
            (400, temp("lock-1", 32.0)),
        ],
        &["300: raise temperature_high unit:A-1"],
    );
    // Back inside before the duration: nothing.
    check(
        TEMP(),
        &[
            (0, temp("lock-1", 31.0)),
            (200, temp("lock-1", 29.0)),
            (400, Tick),
        ],
        &[],
    );
    // Exactly at the bound is inside.
    check(
        TEMP(),
        &[
            (0, temp("lock-1", 30.0)),
            (400, temp("lock-1", 30.0)),
            (401, Tick),
        ],
        &[],
    );
    // Low side; a hallway sensor of the site's devices is its own subject.
    check(
        TEMP(),
        &[
            (0, temp("thermo-hall", 1.0)),
            (300, temp("thermo-hall", 1.5)),
        ],
        &["300: raise temperature_low device:thermo-hall"],
    );
    // A Modbus reading nobody maps to a unit: the device is the subject.
    check(
        TEMP(),
        &[
            (
                0,
                F(RawFact::Temperature {
                    device: "io",
                    channel: Some(1),
                    celsius: 40.0,
                }),
            ),
            (300, Tick),
        ],
        &["300: raise temperature_high device:io"],
    );
}

#[test]
fn temperature_clears_by_the_hysteresis() {
    check(
        TEMP(),
        &[
            (0, temp("lock-1", 31.0)),
            (300, Tick),
            (310, temp("lock-1", 29.5)), // inside, but not by the hysteresis: still active
            (320, temp("lock-1", 30.5)), // outside again: no repeat
            (330, temp("lock-1", 29.0)), // max − h: cleared
            (340, temp("lock-1", 29.9)),
        ],
        &[
            "300: raise temperature_high unit:A-1",
            "330: clear temperature_high unit:A-1",
        ],
    );
    check(
        TEMP(),
        &[
            (0, temp("lock-1", 0.0)),
            (300, Tick),
            (310, temp("lock-1", 2.5)),
            (320, temp("lock-1", 3.0)),
        ],
        &[
            "300: raise temperature_low unit:A-1",
            "320: clear temperature_low unit:A-1",
        ],
    );
    // From high straight to low: cleared, and low starts its own duration.
    check(
        TEMP(),
        &[
            (0, temp("lock-1", 31.0)),
            (300, Tick),
            (310, temp("lock-1", 1.0)),
            (609, Tick),
            (610, Tick),
        ],
        &[
            "300: raise temperature_high unit:A-1",
            "310: clear temperature_high unit:A-1",
            "610: raise temperature_low unit:A-1",
        ],
    );
}

#[test]
fn temperature_off_unmonitored_or_bad_readings() {
    check(json!({}), &[(0, temp("lock-1", 80.0)), (9999, Tick)], &[]);
    // Monitor Temperature off.
    check(TEMP(), &[(0, temp("lock-2", 80.0)), (9999, Tick)], &[]);
    // Not a number: dropped.
    check(
        TEMP(),
        &[
            (0, temp("lock-1", f64::NAN)),
            (0, temp("lock-1", f64::INFINITY)),
            (9999, Tick),
        ],
        &[],
    );
    // Only a max: the low side never alerts.
    check(
        json!({"temperature_max": 30.0, "temperature_minutes": 0}),
        &[(0, temp("lock-1", -40.0)), (1, temp("lock-1", 30.5))],
        &["1: raise temperature_high unit:A-1"],
    );
}

#[test]
fn door_held_open_once_while_held_cleared_at_close() {
    let opened = |e| F(RawFact::DoorOpened { entry: e });
    let closed = |e| F(RawFact::DoorClosed { entry: e });
    check(
        json!({}),
        &[
            (0, opened("door-a")),
            (29, Tick),
            (30, Tick),
            (31, Tick),
            (90, Tick),
            (100, closed("door-a")),
            (101, Tick),
        ],
        &[
            "30: raise door_held_open entry:door-a",
            "100: clear door_held_open entry:door-a",
        ],
    );
    // Closed in time: nothing.
    check(
        json!({}),
        &[(0, opened("door-a")), (20, closed("door-a")), (40, Tick)],
        &[],
    );
    // No held_open_seconds on the entry: not watched.
    check(json!({}), &[(0, opened("door-b")), (9999, Tick)], &[]);
    // The time counts from the first opening (a repeated open report does not restart it).
    check(
        json!({}),
        &[(0, opened("door-a")), (20, opened("door-a")), (30, Tick)],
        &["30: raise door_held_open entry:door-a"],
    );
}

#[test]
fn manual_unlock_without_an_explanation() {
    let unlocked = |d| F(RawFact::LockUnlocked { device: d });
    let locked = |d| F(RawFact::LockLocked { device: d });
    check(
        json!({}),
        &[
            (0, unlocked("lock-1")),
            (5, unlocked("lock-1")),
            (10, locked("lock-1")),
        ],
        &[
            "0: raise manual_unlock unit:A-1",
            "10: clear manual_unlock unit:A-1",
        ],
    );
    // Explained by a grant or a remote unlock within 60 s.
    check(
        json!({}),
        &[
            (0, grant_unit("A-1")),
            (59, unlocked("lock-1")),
            (70, locked("lock-1")),
        ],
        &[],
    );
    check(
        json!({}),
        &[
            (0, F(RawFact::RemoteUnlock { unit: "A-1" })),
            (10, unlocked("lock-1")),
        ],
        &[],
    );
    check(
        json!({}),
        &[(0, grant_unit("A-1")), (60, unlocked("lock-1"))],
        &["60: raise manual_unlock unit:A-1"],
    );
    // Unit Alarm off.
    check(json!({}), &[(0, unlocked("lock-2"))], &[]);
    // The manual-release input of an entry; cleared at the door's close or after 5 minutes.
    check(
        json!({}),
        &[
            (0, F(RawFact::ManualRelease { entry: "gate" })),
            (1, F(RawFact::ManualRelease { entry: "gate" })),
            (20, F(RawFact::DoorClosed { entry: "gate" })),
        ],
        &[
            "0: raise manual_unlock entry:gate",
            "20: clear manual_unlock entry:gate",
        ],
    );
    check(
        json!({}),
        &[
            (0, F(RawFact::ManualRelease { entry: "gate" })),
            (299, Tick),
            (300, Tick),
        ],
        &[
            "0: raise manual_unlock entry:gate",
            "300: clear manual_unlock entry:gate",
        ],
    );
}

#[test]
fn zone_triggers_switch_relays_and_off_on_time() {
    let on = json!({"zone_triggers": true});
    check(
        on.clone(),
        &[
            (0, grant_entry("alice", "door-a", false)),
            (59, Tick),
            (60, Tick),
        ],
        &[
            "0: on board/3 until 60",
            "0: pulse board/4 500",
            "60: off board/3",
        ],
    );
    // A second grant extends the on time (`on` again with the new off time), pulses again.
    check(
        on.clone(),
        &[
            (0, grant_entry("alice", "door-a", false)),
            (30, grant_entry("bob", "door-a", false)),
            (60, Tick),
            (90, Tick),
        ],
        &[
            "0: on board/3 until 60",
            "0: pulse board/4 500",
            "30: on board/3 until 90",
            "30: pulse board/4 500",
            "90: off board/3",
        ],
    );
    // Leaving, another zone, an entry without zone: nothing.
    check(
        on,
        &[
            (0, grant_entry("alice", "door-a", true)),
            (1, grant_entry("alice", "door-b", false)),
            (2, grant_entry("alice", "gate", false)),
            (100, Tick),
        ],
        &[],
    );
    // Zone Triggers off: nothing.
    check(
        json!({}),
        &[(0, grant_entry("alice", "door-a", false)), (100, Tick)],
        &[],
    );
}

#[test]
fn loitering_after_the_hours_until_seen_leaving() {
    let s = json!({"loitering_alert_hours": 3});
    let h = 3600;
    check(
        s.clone(),
        &[
            (0, grant_entry("alice", "gate", false)),
            (3 * h - 1, Tick),
            (3 * h, Tick),
            (4 * h, Tick),
            (5 * h, grant_entry("alice", "exit", false)),
        ],
        &[
            "10800: raise user_loitering user:alice",
            "18000: clear user_loitering user:alice",
        ],
    );
    // Seen leaving (a grant out, or at an exit) in time: nothing.
    check(
        s.clone(),
        &[
            (0, grant_entry("alice", "gate", false)),
            (h, grant_entry("alice", "gate", true)),
            (4 * h, Tick),
        ],
        &[],
    );
    // Every grant in restarts the count.
    check(
        s,
        &[
            (0, grant_entry("bob", "gate", false)),
            (2 * h, grant_entry("bob", "door-a", false)),
            (3 * h, Tick),
            (5 * h, Tick),
        ],
        &["18000: raise user_loitering user:bob"],
    );
    // Off by default.
    check(
        json!({}),
        &[(0, grant_entry("alice", "gate", false)), (100 * h, Tick)],
        &[],
    );
}
