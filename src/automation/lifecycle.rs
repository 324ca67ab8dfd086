//! The alert lifecycle, at the I/O edge of the rules: alert ids, one active alert per kind and
//! subject, `alert_raised` / `alert_cleared` events, and the durable state a restart restores
//! (the active alerts and the pending relay offs, through [`Store::automation_put`]).
//!
//! Order of writes: each [`Lifecycle::apply`] is one call of [`Store::automation_write`]:
//! an alert's record is written before its `alert_raised` event is recorded through the group
//! commit, and removed before `alert_cleared`, and the events become visible to the cloud only
//! after the committer's flush, which carries both. A relay's first off time is on disk before the relay
//! is switched on. A crash before the flush loses the raise (or the clear) together with its
//! event: the rules decide it again from the next facts. sled may write part of a batch
//! before the flush on its own, in write order: then a record can be on disk without its event
//! (an active alert whose raise was never sent: it is in the active set published on `alerts`
//! and is cleared with an `alert_cleared` naming its id), never an event without its record.
//! Nothing is repeated.
//!
//! Times: the rules run on the store's lived clock ([`crate::store::LivedClock`], monotonic,
//! counting only time the gateway lived). A relay's off time is stored on both clocks; after a
//! restart it is switched off at the earlier of the two (downtime counts on the wall clock,
//! a wall-clock step back cannot keep it on longer than planned on the lived clock).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Action, AlertKind, Millis, Rules, Subject};
use crate::events::EventKind;
use crate::store::{AutomationSet, AutomationWrite, Store};

/// An active alert as stored and published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveAlert {
    pub id: String,
    pub kind: AlertKind,
    pub subject: Subject,
    pub raised_at: DateTime<Utc>,
    pub detail: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredTimer {
    device: String,
    channel: u16,
    off_lived_ms: Millis,
    off_at: DateTime<Utc>,
}

/// A relay operation for the edge to carry out (through the `Relays` routing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayOp {
    On {
        device: Arc<str>,
        channel: u16,
    },
    Off {
        device: Arc<str>,
        channel: u16,
    },
    Pulse {
        device: Arc<str>,
        channel: u16,
        ms: u32,
    },
}

fn alert_key(kind: AlertKind, subject: &Subject) -> String {
    let (t, id) = match subject {
        Subject::Unit(x) => ("unit", x),
        Subject::Entry(x) => ("entry", x),
        Subject::User(x) => ("user", x),
        Subject::Device(x) => ("device", x),
    };
    format!("{}/{t}/{id}", kind.as_str())
}

fn timer_key(device: &str, channel: u16) -> String {
    format!("{channel:05}/{device}")
}

/// The active alerts and the id counter of this run.
#[derive(Debug)]
pub struct Lifecycle {
    active: BTreeMap<(AlertKind, Subject), ActiveAlert>,
    /// Relays whose off time is stored (on disk at least once).
    timers: HashSet<(Arc<str>, u16)>,
    id_prefix: String,
    next: u64,
    /// Raises and clears so far (the runner publishes the set when it moves).
    changes: u64,
}

impl Lifecycle {
    /// Restores the active alerts and the pending relay offs from the store into `rules`.
    /// `id_prefix` must be unique per run (the daemon uses `<epoch>-<run>`, the run from
    /// `Store::automation_run`); `now` is the lived clock, `wall` the wall clock. Relays whose off time has passed are in the returned
    /// list to switch off now.
    pub fn restore(
        store: &Store,
        rules: &mut Rules,
        id_prefix: String,
        now: Millis,
        wall: DateTime<Utc>,
    ) -> anyhow::Result<(Lifecycle, Vec<RelayOp>)> {
        let mut active = BTreeMap::new();
        for (_, a) in store.automation_load::<ActiveAlert>(AutomationSet::Alerts)? {
            match (&a.kind, &a.subject) {
                (AlertKind::MotionAlert, Subject::Unit(u)) => {
                    rules.motion.restore_active(u.clone(), now)
                }
                (AlertKind::TemperatureHigh | AlertKind::TemperatureLow, s) => {
                    rules.temperature.restore_active(a.kind, s.clone())
                }
                (AlertKind::DoorHeldOpen, Subject::Entry(e)) => {
                    rules.held_open.restore_active(e.clone(), now)
                }
                (AlertKind::ManualUnlock, s) => rules.manual.restore_active(s, now),
                (AlertKind::UserLoitering, Subject::User(u)) => {
                    rules.loitering.restore_active(u.clone(), now)
                }
                _ => {}
            }
            active.insert((a.kind, a.subject.clone()), a);
        }
        let mut due = Vec::new();
        let mut timers = HashSet::new();
        let mut gone = Vec::new();
        for (key, t) in store.automation_load::<StoredTimer>(AutomationSet::Timers)? {
            let by_lived = t.off_lived_ms.saturating_sub(now);
            let by_wall = u64::try_from((t.off_at - wall).num_milliseconds()).unwrap_or(0);
            let left = by_lived.min(by_wall);
            let device: Arc<str> = Arc::from(t.device.as_str());
            if left == 0 {
                gone.push(AutomationWrite {
                    set: AutomationSet::Timers,
                    key,
                    value: None,
                });
                due.push(RelayOp::Off {
                    device,
                    channel: t.channel,
                });
            } else {
                timers.insert((device.clone(), t.channel));
                rules.zone.restore(device, t.channel, now + left);
            }
        }
        // Removed without a flush: a crash before the next one switches them off again.
        store.automation_write(&gone, Vec::new(), false)?;
        Ok((
            Lifecycle {
                active,
                timers,
                id_prefix,
                next: 1,
                changes: 0,
            },
            due,
        ))
    }

    /// How many raises and clears this lifecycle has applied (grows on each).
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The active alerts, in kind and subject order.
    pub fn active(&self) -> impl Iterator<Item = &ActiveAlert> {
        self.active.values()
    }

    /// Carries out the rules' actions: alerts through the store and the event log (at most one
    /// active per kind and subject), relay timers stored; returns the relay operations to run.
    ///
    /// One store write per call (no flush), its events through the group commit, and one flush only when a
    /// relay goes from off to on (its off time on disk before the relay is switched;
    /// [`Store::automation_write`]). An alert's record is written before its event, and the
    /// event is visible only after a flush that carries both. An extension of
    /// a relay already on (a later off time) and a relay's removal after its off are written
    /// without a flush: a crash loses at most that change, and the restart then switches the
    /// relay off at the earlier stored time, or switches an off relay off again.
    pub fn apply(
        &mut self,
        store: &Store,
        actions: Vec<Action>,
        now: Millis,
        wall: DateTime<Utc>,
    ) -> anyhow::Result<Vec<RelayOp>> {
        let mut ops = Vec::new();
        let mut writes = Vec::new();
        let mut events = Vec::new();
        let mut flush = false;
        // What changed in memory, undone when the store refuses the write (disk full): the
        // active set never holds an alert whose record and event were not written.
        let mut inserted = Vec::new();
        let mut removed = Vec::new();
        let mut new_timers = Vec::new();
        for a in actions {
            match a {
                Action::Raise {
                    kind,
                    subject,
                    detail,
                } => {
                    let slot = (kind, subject.clone());
                    if self.active.contains_key(&slot) {
                        continue;
                    }
                    let alert = ActiveAlert {
                        id: format!("{}-{}", self.id_prefix, self.next),
                        kind,
                        subject,
                        raised_at: wall,
                        detail,
                    };
                    self.next += 1;
                    tracing::info!(id = %alert.id, kind = kind.as_str(), subject = ?alert.subject, "alert raised");
                    let v = serde_json::to_value(&alert)?;
                    writes.push(AutomationWrite {
                        set: AutomationSet::Alerts,
                        key: alert_key(kind, &alert.subject),
                        value: Some(v.clone()),
                    });
                    events.push((EventKind::AlertRaised, v));
                    self.active.insert(slot.clone(), alert);
                    inserted.push(slot);
                    self.changes += 1;
                }
                Action::Clear { kind, subject } => {
                    let Some(alert) = self.active.remove(&(kind, subject)) else {
                        continue;
                    };
                    removed.push(alert.clone());
                    self.changes += 1;
                    tracing::info!(id = %alert.id, kind = kind.as_str(), subject = ?alert.subject, "alert cleared");
                    writes.push(AutomationWrite {
                        set: AutomationSet::Alerts,
                        key: alert_key(kind, &alert.subject),
                        value: None,
                    });
                    events.push((
                        EventKind::AlertCleared,
                        json!({
                            "id": alert.id,
                            "kind": kind,
                            "subject": alert.subject,
                            "raised_at": alert.raised_at,
                            "cleared_at": wall,
                        }),
                    ));
                }
                Action::Suppressed {
                    kind,
                    subject,
                    reason,
                } => {
                    tracing::info!(kind = kind.as_str(), ?subject, reason, "alert suppressed");
                }
                Action::RelayOn {
                    device,
                    channel,
                    off_at,
                } => {
                    let t = StoredTimer {
                        device: device.to_string(),
                        channel,
                        off_lived_ms: off_at,
                        off_at: wall
                            + chrono::Duration::milliseconds(
                                i64::try_from(off_at.saturating_sub(now)).unwrap_or(i64::MAX / 2),
                            ),
                    };
                    if self.timers.insert((device.clone(), channel)) {
                        flush = true;
                        new_timers.push((device.clone(), channel));
                    }
                    writes.push(AutomationWrite {
                        set: AutomationSet::Timers,
                        key: timer_key(&device, channel),
                        value: Some(serde_json::to_value(&t)?),
                    });
                    ops.push(RelayOp::On { device, channel });
                }
                Action::RelayOff { device, channel } => {
                    self.timers.remove(&(device.clone(), channel));
                    writes.push(AutomationWrite {
                        set: AutomationSet::Timers,
                        key: timer_key(&device, channel),
                        value: None,
                    });
                    ops.push(RelayOp::Off { device, channel });
                }
                Action::RelayPulse {
                    device,
                    channel,
                    ms,
                } => {
                    ops.push(RelayOp::Pulse {
                        device,
                        channel,
                        ms,
                    });
                }
            }
        }
        if let Err(e) = store.automation_write(&writes, events, flush) {
            for slot in inserted {
                self.active.remove(&slot);
            }
            for a in removed {
                self.active.insert((a.kind, a.subject.clone()), a);
            }
            // Not on disk: the next switch-on flushes again.
            for t in new_timers {
                self.timers.remove(&t);
            }
            return Err(e);
        }
        Ok(ops)
    }
}
