//! Site automation: the rules that turn facts (motion, readings, door contacts, grants, lock
//! reports) into alerts and relay actions, on the gateway, with no network (docs/automation.md).
//!
//! Pure core: every rule is a state machine stepped with `(fact, settings, now)` and returning
//! [`Action`]s; no clock, no database, no async. `now` is a [`Millis`] on a monotonic clock
//! (the store's lived clock in the daemon, so that pending timers survive a restart without
//! trusting the wall clock). The I/O edge resolves raw driver facts against the site
//! ([`resolve`]), executes actions, and keeps the alert lifecycle durable.
//!
//! Memory is bounded: state is kept per subject the site knows (units, entries, users, sensors
//! of units, sensors placed by an installer: [`placed`]), never per fact; facts from unknown devices are dropped by [`resolve`] (and counted
//! by the caller); a motion window holds at most `motion_alert_events` (≤ 1000) instants.

pub mod facts;
pub mod held_open;
pub mod lifecycle;
pub mod loitering;
pub mod manual_release;
pub mod motion;
pub mod placed;
pub mod runner;
pub mod temperature;
pub mod zone;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::site::Tables;
use crate::sync;
use placed::{Place, Placed};

/// Milliseconds on a monotonic clock (the rules never read a clock themselves).
pub type Millis = u64;

pub const SECOND: Millis = 1000;
pub const MINUTE: Millis = 60 * SECOND;
pub const HOUR: Millis = 60 * MINUTE;

/// The kinds of alert. Names are stable snake_case strings (docs/automation.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    MotionAlert,
    TemperatureHigh,
    TemperatureLow,
    DoorHeldOpen,
    ManualUnlock,
    UserLoitering,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::MotionAlert => "motion_alert",
            AlertKind::TemperatureHigh => "temperature_high",
            AlertKind::TemperatureLow => "temperature_low",
            AlertKind::DoorHeldOpen => "door_held_open",
            AlertKind::ManualUnlock => "manual_unlock",
            AlertKind::UserLoitering => "user_loitering",
        }
    }
}

/// What an alert is about: one active alert per kind and subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", content = "id", rename_all = "snake_case")]
pub enum Subject {
    Unit(Arc<str>),
    Entry(Arc<str>),
    User(Arc<str>),
    /// A sensor that belongs to no unit (a hallway thermometer): its device id.
    Device(Arc<str>),
}

/// A fact, resolved against the site: subjects are known, flags read from the site.
#[derive(Debug, Clone, PartialEq)]
pub enum Fact {
    /// A motion report from one of the unit's sensors.
    Motion {
        unit: Arc<str>,
        front: bool,
        alarm_enabled: bool,
        front_motion: bool,
        device: Arc<str>,
    },
    /// A temperature reading (°C); `monitored` is false when the unit's `monitor_temperature`
    /// is off.
    Temperature {
        subject: Subject,
        celsius: f64,
        monitored: bool,
    },
    /// An entry's door contact opened (also a forced opening).
    DoorOpened {
        entry: Arc<str>,
    },
    DoorClosed {
        entry: Arc<str>,
    },
    /// A granted access decision (`zone` of the entry, or of the unit).
    Granted {
        user: Option<Arc<str>>,
        target: Subject,
        zone: Option<Arc<str>>,
        leaving: bool,
    },
    /// A remote unlock of a unit (a command from the cloud).
    RemoteUnlock {
        unit: Arc<str>,
    },
    /// A unit's lock or controller reported unlocked.
    LockUnlocked {
        unit: Arc<str>,
        alarm_enabled: bool,
    },
    /// A unit's lock or controller reported locked.
    LockLocked {
        unit: Arc<str>,
    },
    /// A manual-release input (key switch, fire release) of an entry became active.
    ManualRelease {
        entry: Arc<str>,
    },
}

/// What the rules ask the edge to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Raise {
        kind: AlertKind,
        subject: Subject,
        /// The facts that caused it (docs/automation.md per kind).
        detail: Value,
    },
    Clear {
        kind: AlertKind,
        subject: Subject,
    },
    /// Not an alert, for a stated reason (motion while the tenant is there).
    Suppressed {
        kind: AlertKind,
        subject: Subject,
        reason: &'static str,
    },
    /// Switch on until `off_at` (repeated with a later `off_at` when a grant extends it).
    RelayOn {
        device: Arc<str>,
        channel: u16,
        off_at: Millis,
    },
    RelayOff {
        device: Arc<str>,
        channel: u16,
    },
    RelayPulse {
        device: Arc<str>,
        channel: u16,
        ms: u32,
    },
}

/// The facility's automation settings, as the rules read them (defaults: nothing happens).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `(events, window)`; `None`: no motion alerts.
    pub motion: Option<(u32, Millis)>,
    pub motion_quiet: Millis,
    pub motion_clear: Millis,
    pub temperature_min: Option<f64>,
    pub temperature_max: Option<f64>,
    pub temperature_hysteresis: f64,
    pub temperature_for: Millis,
    /// `None`: off.
    pub loitering_after: Option<Millis>,
    pub zone_triggers: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings::from_facility(&sync::Facility::new("UTC"))
    }
}

impl Settings {
    pub fn from_facility(f: &sync::Facility) -> Settings {
        let min = |m: u32| Millis::from(m) * MINUTE;
        Settings {
            motion: f
                .motion_alert_events
                .zip(f.motion_alert_minutes)
                .map(|(n, m)| (n, min(m))),
            motion_quiet: min(f.motion_quiet_minutes),
            motion_clear: min(f.motion_clear_minutes),
            temperature_min: f.temperature_min,
            temperature_max: f.temperature_max,
            temperature_hysteresis: f.temperature_hysteresis,
            temperature_for: min(f.temperature_minutes),
            loitering_after: (f.loitering_alert_hours > 0)
                .then(|| Millis::from(f.loitering_alert_hours) * HOUR),
            zone_triggers: f.zone_triggers,
        }
    }
}

/// A fact as the drivers and the access engine report it, before it is matched to the site.
#[derive(Debug, Clone, PartialEq)]
pub enum RawFact<'a> {
    /// `channel`: a Modbus input; `None` for a BLE sensor or a controller.
    Motion {
        device: &'a str,
        channel: Option<u16>,
    },
    Temperature {
        device: &'a str,
        channel: Option<u16>,
        celsius: f64,
    },
    DoorOpened {
        entry: &'a str,
    },
    DoorClosed {
        entry: &'a str,
    },
    Granted {
        user: Option<&'a str>,
        entry: Option<&'a str>,
        unit: Option<&'a str>,
        leaving: bool,
    },
    RemoteUnlock {
        unit: &'a str,
    },
    LockUnlocked {
        device: &'a str,
    },
    LockLocked {
        device: &'a str,
    },
    ManualRelease {
        entry: &'a str,
    },
}

fn arc(s: &str) -> Arc<str> {
    Arc::from(s)
}

/// The unit whose sensor or controller `device` is (a Modbus input: with its `channel`).
pub fn unit_of_device<'t>(t: &'t Tables, device: &str, channel: Option<u16>) -> Option<&'t str> {
    sensor_unit(t, device, channel).map(|(u, _)| u.id.as_str())
}

fn sensor_unit<'t>(
    t: &'t Tables,
    device: &str,
    channel: Option<u16>,
) -> Option<(&'t sync::Unit, bool)> {
    let key = sync::SensorRef {
        device: device.to_string(),
        channel,
        front: false,
    };
    let (unit, front) = t.unit_by_sensor.get(&key)?;
    Some((t.units.get(unit)?, *front))
}

/// The unit a placed sensor (adopted or `[[ble.device]]`, BLE: no channel) is in, when the
/// site database does not name the device and knows the unit.
fn placed_unit<'t>(
    t: &'t Tables,
    placed: &Placed,
    device: &str,
    channel: Option<u16>,
) -> Option<&'t sync::Unit> {
    if channel.is_some() || t.devices.contains_key(device) {
        return None;
    }
    match placed.get(device)? {
        Place::Unit(u) => t.units.get(&**u),
        Place::Zone(_) => None,
    }
}

/// The unit whose sensor `device` is, and whether it is the front one: the site database's
/// units first; else the unit an installer placed it in (never the front sensor).
fn sensor_or_placed_unit<'t>(
    t: &'t Tables,
    placed: &Placed,
    device: &str,
    channel: Option<u16>,
) -> Option<(&'t sync::Unit, bool)> {
    sensor_unit(t, device, channel)
        .or_else(|| Some((placed_unit(t, placed, device, channel)?, false)))
}

/// Matches a raw fact to the site, with no placed sensors ([`resolve_placed`]).
pub fn resolve(t: &Tables, raw: &RawFact<'_>) -> Option<Fact> {
    resolve_placed(t, &Placed::default(), raw)
}

/// Matches a raw fact to the site. `None`: a device, entry or unit the site does not know (the
/// caller counts it and moves on). A temperature sensor outside every unit is its own subject
/// when it is a BLE device of the site, any Modbus reading (the gateway's config names it), or
/// a sensor `placed` in a zone (or in a unit the site database does not have). A sensor the
/// site database does not name but `placed` puts in a unit is that unit's sensor (motion and
/// temperature), with the unit's settings; the site database wins when it names the device.
pub fn resolve_placed(t: &Tables, placed: &Placed, raw: &RawFact<'_>) -> Option<Fact> {
    Some(match *raw {
        RawFact::Motion { device, channel } => {
            let (u, front) = sensor_or_placed_unit(t, placed, device, channel)?;
            Fact::Motion {
                unit: arc(&u.id),
                front,
                alarm_enabled: u.alarm_enabled,
                front_motion: u.front_motion,
                device: arc(device),
            }
        }
        RawFact::Temperature {
            device,
            channel,
            celsius,
        } => {
            if !celsius.is_finite() {
                return None;
            }
            match sensor_or_placed_unit(t, placed, device, channel) {
                Some((u, _)) => Fact::Temperature {
                    subject: Subject::Unit(arc(&u.id)),
                    celsius,
                    monitored: u.monitor_temperature,
                },
                None if channel.is_some()
                    || t.devices.contains_key(device)
                    || placed.get(device).is_some() =>
                {
                    Fact::Temperature {
                        subject: Subject::Device(arc(device)),
                        celsius,
                        monitored: true,
                    }
                }
                None => return None,
            }
        }
        RawFact::DoorOpened { entry } => Fact::DoorOpened {
            entry: arc(&t.entries.get(entry)?.id),
        },
        RawFact::DoorClosed { entry } => Fact::DoorClosed {
            entry: arc(&t.entries.get(entry)?.id),
        },
        RawFact::Granted {
            user,
            entry,
            unit,
            leaving,
        } => {
            let (target, zone, exit) = match (entry, unit) {
                (Some(e), _) => {
                    let e = t.entries.get(e)?;
                    (
                        Subject::Entry(arc(&e.id)),
                        e.zone.as_deref().map(arc),
                        e.kind == sync::EntryKind::Exit,
                    )
                }
                (None, Some(u)) => {
                    let u = t.units.get(u)?;
                    (Subject::Unit(arc(&u.id)), None, false)
                }
                (None, None) => return None,
            };
            Fact::Granted {
                user: user.filter(|u| t.users.contains_key(*u)).map(arc),
                target,
                zone,
                leaving: leaving || exit,
            }
        }
        RawFact::RemoteUnlock { unit } => Fact::RemoteUnlock {
            unit: arc(&t.units.get(unit)?.id),
        },
        RawFact::LockUnlocked { device } => {
            let (u, _) = sensor_unit(t, device, None)?;
            Fact::LockUnlocked {
                unit: arc(&u.id),
                alarm_enabled: u.alarm_enabled,
            }
        }
        RawFact::LockLocked { device } => Fact::LockLocked {
            unit: arc(&sensor_unit(t, device, None)?.0.id),
        },
        RawFact::ManualRelease { entry } => Fact::ManualRelease {
            entry: arc(&t.entries.get(entry)?.id),
        },
    })
}

/// Every rule's state, stepped together on one thread. `step` for a fact, `tick` for timers
/// (call it at least once a second; it costs only the subjects with something pending).
#[derive(Debug, Default)]
pub struct Rules {
    pub motion: motion::Motion,
    pub temperature: temperature::Temperature,
    pub held_open: held_open::HeldOpen,
    pub manual: manual_release::ManualRelease,
    pub zone: zone::ZoneTriggers,
    pub loitering: loitering::Loitering,
}

impl Rules {
    /// Feeds one resolved fact to every rule that reads it.
    pub fn step(&mut self, t: &Tables, s: &Settings, fact: &Fact, now: Millis) -> Vec<Action> {
        let mut out = Vec::new();
        self.motion.step(fact, s, now, &mut out);
        self.temperature.step(fact, s, now, &mut out);
        self.held_open
            .step(fact, |e| held_open_of(t, e), now, &mut out);
        self.manual.step(fact, now, &mut out);
        self.zone
            .step(fact, s, |z| triggers_of(t, z), now, &mut out);
        self.loitering.step(fact, s, now, &mut out);
        out
    }

    /// Timers due at `now`: alerts raised or cleared by time, relays switched off.
    pub fn tick(&mut self, t: &Tables, s: &Settings, now: Millis) -> Vec<Action> {
        let mut out = Vec::new();
        self.motion.tick(s, now, &mut out);
        self.temperature.tick(s, now, &mut out);
        self.held_open.tick(|e| held_open_of(t, e), now, &mut out);
        self.manual.tick(now, &mut out);
        self.zone.tick(now, &mut out);
        self.loitering.tick(s, now, &mut out);
        out
    }
}

fn held_open_of(t: &Tables, entry: &str) -> Option<Millis> {
    t.entries
        .get(entry)?
        .held_open_seconds
        .map(|s| Millis::from(s) * SECOND)
}

fn triggers_of<'t>(t: &'t Tables, zone: &str) -> &'t [sync::Trigger] {
    t.zones.get(zone).map_or(&[], |z| z.triggers.as_slice())
}
