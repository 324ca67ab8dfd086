//! Door held open: an entry's door contact still open `held_open_seconds` after it opened
//! raises `door_held_open`, once while it stays open; `door_closed` clears it. Entries without
//! `held_open_seconds` are not watched. `door_forced` is recorded by the drivers as before.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;

use super::{Action, AlertKind, Fact, Millis, Subject};

#[derive(Debug, Clone, Copy)]
struct Open {
    since: Millis,
    alerted: bool,
}

#[derive(Debug, Default)]
pub struct HeldOpen {
    open: HashMap<Arc<str>, Open>,
}

impl HeldOpen {
    pub fn restore_active(&mut self, entry: Arc<str>, now: Millis) {
        self.open.insert(
            entry,
            Open {
                since: now,
                alerted: true,
            },
        );
    }

    pub fn step(
        &mut self,
        fact: &Fact,
        limit: impl Fn(&str) -> Option<Millis>,
        now: Millis,
        out: &mut Vec<Action>,
    ) {
        match fact {
            Fact::DoorOpened { entry } if limit(entry).is_some() => {
                self.open.entry(entry.clone()).or_insert(Open {
                    since: now,
                    alerted: false,
                });
            }
            Fact::DoorClosed { entry } => {
                if let Some(o) = self.open.remove(entry)
                    && o.alerted
                {
                    out.push(Action::Clear {
                        kind: AlertKind::DoorHeldOpen,
                        subject: Subject::Entry(entry.clone()),
                    });
                }
            }
            _ => {}
        }
    }

    pub fn tick(
        &mut self,
        limit: impl Fn(&str) -> Option<Millis>,
        now: Millis,
        out: &mut Vec<Action>,
    ) {
        for (entry, o) in self.open.iter_mut() {
            if o.alerted {
                continue;
            }
            if let Some(l) = limit(entry)
                && now.saturating_sub(o.since) >= l
            {
                o.alerted = true;
                out.push(Action::Raise {
                    kind: AlertKind::DoorHeldOpen,
                    subject: Subject::Entry(entry.clone()),
                    detail: json!({"held_open_ms": now.saturating_sub(o.since), "limit_ms": l}),
                });
            }
        }
    }
}
