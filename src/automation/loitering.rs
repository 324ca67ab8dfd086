//! Loitering: a user granted in (not at an exit, not leaving) and not granted out within
//! `loitering_alert_hours` raises `user_loitering`, once; their next grant out clears it (and
//! a grant in restarts the count). `loitering_alert_hours` 0: nothing is tracked.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;

use super::{Action, AlertKind, Fact, Millis, Settings, Subject};

#[derive(Debug, Clone, Copy)]
struct Inside {
    since: Millis,
    alerted: bool,
}

#[derive(Debug, Default)]
pub struct Loitering {
    inside: HashMap<Arc<str>, Inside>,
}

impl Loitering {
    pub fn inside(&self) -> usize {
        self.inside.len()
    }

    pub fn restore_active(&mut self, user: Arc<str>, now: Millis) {
        self.inside.insert(
            user,
            Inside {
                since: now,
                alerted: true,
            },
        );
    }

    pub fn step(&mut self, fact: &Fact, s: &Settings, now: Millis, out: &mut Vec<Action>) {
        let Fact::Granted {
            user: Some(user),
            target: Subject::Entry(_),
            leaving,
            ..
        } = fact
        else {
            return;
        };
        if s.loitering_after.is_none() && !self.inside.contains_key(user) {
            return;
        }
        if let Some(was) = self.inside.remove(user)
            && was.alerted
        {
            out.push(Action::Clear {
                kind: AlertKind::UserLoitering,
                subject: Subject::User(user.clone()),
            });
        }
        if !leaving && s.loitering_after.is_some() {
            self.inside.insert(
                user.clone(),
                Inside {
                    since: now,
                    alerted: false,
                },
            );
        }
    }

    pub fn tick(&mut self, s: &Settings, now: Millis, out: &mut Vec<Action>) {
        let Some(after) = s.loitering_after else {
            return;
        };
        for (user, i) in self.inside.iter_mut() {
            if !i.alerted && now.saturating_sub(i.since) >= after {
                i.alerted = true;
                out.push(Action::Raise {
                    kind: AlertKind::UserLoitering,
                    subject: Subject::User(user.clone()),
                    detail: json!({"inside_ms": now.saturating_sub(i.since)}),
                });
            }
        }
    }
}
