//! Emergency / manual release: a unit's lock or controller reporting unlocked with no grant or
//! remote unlock of that unit in the last [`EXPLAINED_FOR`] raises `manual_unlock` on the unit
//! (unless its `alarm_enabled` is off), cleared when it reports locked; an entry's
//! manual-release input raises `manual_unlock` on the entry, cleared at its `door_closed` or
//! after [`ENTRY_CLEAR_AFTER`] (an entry without a door contact).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;

use super::{Action, AlertKind, Fact, MINUTE, Millis, SECOND, Subject};

/// How long a grant or remote unlock explains an unlocked report.
pub const EXPLAINED_FOR: Millis = 60 * SECOND;
/// An entry's manual-release alert without a door contact to clear it.
pub const ENTRY_CLEAR_AFTER: Millis = 5 * MINUTE;

#[derive(Debug, Default)]
pub struct ManualRelease {
    explained: HashMap<Arc<str>, Millis>,
    /// Active alerts: units (until locked) and entries (raised at).
    units: HashMap<Arc<str>, Millis>,
    entries: HashMap<Arc<str>, Millis>,
}

impl ManualRelease {
    pub fn restore_active(&mut self, subject: &Subject, now: Millis) {
        match subject {
            Subject::Unit(u) => {
                self.units.insert(u.clone(), now);
            }
            Subject::Entry(e) => {
                self.entries.insert(e.clone(), now);
            }
            _ => {}
        }
    }

    // The inner `if`s change state (insert/remove): kept out of match guards on purpose.
    #[allow(clippy::collapsible_match)]
    pub fn step(&mut self, fact: &Fact, now: Millis, out: &mut Vec<Action>) {
        match fact {
            Fact::Granted {
                target: Subject::Unit(u),
                ..
            }
            | Fact::RemoteUnlock { unit: u } => {
                self.explained.insert(u.clone(), now);
            }
            Fact::LockUnlocked {
                unit,
                alarm_enabled,
            } => {
                let explained = self
                    .explained
                    .get(unit)
                    .is_some_and(|&t| now.saturating_sub(t) < EXPLAINED_FOR);
                if explained || !alarm_enabled || self.units.contains_key(unit) {
                    return;
                }
                self.units.insert(unit.clone(), now);
                out.push(Action::Raise {
                    kind: AlertKind::ManualUnlock,
                    subject: Subject::Unit(unit.clone()),
                    detail: json!({"source": "lock", "explained_by": null}),
                });
            }
            Fact::LockLocked { unit } => {
                if self.units.remove(unit).is_some() {
                    out.push(Action::Clear {
                        kind: AlertKind::ManualUnlock,
                        subject: Subject::Unit(unit.clone()),
                    });
                }
            }
            Fact::ManualRelease { entry } => {
                if self.entries.insert(entry.clone(), now).is_none() {
                    out.push(Action::Raise {
                        kind: AlertKind::ManualUnlock,
                        subject: Subject::Entry(entry.clone()),
                        detail: json!({"source": "manual_release_input"}),
                    });
                }
            }
            Fact::DoorClosed { entry } => {
                if self.entries.remove(entry).is_some() {
                    out.push(Action::Clear {
                        kind: AlertKind::ManualUnlock,
                        subject: Subject::Entry(entry.clone()),
                    });
                }
            }
            _ => {}
        }
    }

    pub fn tick(&mut self, now: Millis, out: &mut Vec<Action>) {
        self.explained
            .retain(|_, t| now.saturating_sub(*t) < EXPLAINED_FOR);
        self.entries.retain(|entry, t| {
            let keep = now.saturating_sub(*t) < ENTRY_CLEAR_AFTER;
            if !keep {
                out.push(Action::Clear {
                    kind: AlertKind::ManualUnlock,
                    subject: Subject::Entry(entry.clone()),
                });
            }
            keep
        });
    }
}
