//! Motion alert: `motion_alert_events` motion facts from one unit's sensors within
//! `motion_alert_minutes` raise `motion_alert`, unless the unit was opened by a grant or a
//! remote unlock within `motion_quiet_minutes` (then `Suppressed` with `tenant_present`), or
//! its `alarm_enabled` is off, or the sensor is the front one and `front_motion` is off. The
//! alert clears after `motion_clear_minutes` without motion; while it is active, motion only
//! extends it (no repeat). Truth table: docs/automation.md.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde_json::json;

use super::{Action, AlertKind, Fact, Millis, Settings, Subject};

#[derive(Debug, Default)]
struct UnitState {
    /// Motion instants inside the window, oldest first; never more than the threshold.
    recent: VecDeque<Millis>,
    opened: Option<Millis>,
    /// Active alert: the last motion seen.
    alerted: Option<Millis>,
}

impl UnitState {
    fn idle(&self) -> bool {
        self.recent.is_empty() && self.opened.is_none() && self.alerted.is_none()
    }
}

#[derive(Debug, Default)]
pub struct Motion {
    units: HashMap<Arc<str>, UnitState>,
}

impl Motion {
    /// Units with state (for tests and the bench: bounded by the site's units).
    pub fn tracked(&self) -> usize {
        self.units.len()
    }

    /// Restores an active alert (after a restart): motion extends it from `now`.
    pub fn restore_active(&mut self, unit: Arc<str>, now: Millis) {
        self.units.entry(unit).or_default().alerted = Some(now);
    }

    pub fn step(&mut self, fact: &Fact, s: &Settings, now: Millis, out: &mut Vec<Action>) {
        match fact {
            Fact::Granted {
                target: Subject::Unit(u),
                leaving: false,
                ..
            }
            | Fact::RemoteUnlock { unit: u }
                if s.motion.is_some() =>
            {
                self.units.entry(u.clone()).or_default().opened = Some(now);
            }
            Fact::Motion {
                unit,
                front,
                alarm_enabled,
                front_motion,
                device,
            } => {
                let Some((events, window)) = s.motion else {
                    return;
                };
                if !alarm_enabled || (*front && !front_motion) {
                    return;
                }
                let st = self.units.entry(unit.clone()).or_default();
                if let Some(last) = &mut st.alerted {
                    *last = now;
                    return;
                }
                while st
                    .recent
                    .front()
                    .is_some_and(|&t| now.saturating_sub(t) >= window)
                {
                    st.recent.pop_front();
                }
                st.recent.push_back(now);
                while st.recent.len() > events as usize {
                    st.recent.pop_front();
                }
                if st.recent.len() < events as usize {
                    return;
                }
                let first = st.recent.front().copied().unwrap_or(now);
                st.recent.clear();
                let subject = Subject::Unit(unit.clone());
                let tenant = st
                    .opened
                    .is_some_and(|o| now.saturating_sub(o) < s.motion_quiet);
                if tenant {
                    out.push(Action::Suppressed {
                        kind: AlertKind::MotionAlert,
                        subject,
                        reason: "tenant_present",
                    });
                } else {
                    st.alerted = Some(now);
                    out.push(Action::Raise {
                        kind: AlertKind::MotionAlert,
                        subject,
                        detail: json!({
                            "events": events,
                            "window_ms": window,
                            "first_ms_ago": now.saturating_sub(first),
                            "device": &**device,
                            "tenant_present": false,
                        }),
                    });
                }
            }
            _ => {}
        }
    }

    pub fn tick(&mut self, s: &Settings, now: Millis, out: &mut Vec<Action>) {
        let window = s.motion.map_or(0, |(_, w)| w);
        self.units.retain(|unit, st| {
            if let Some(last) = st.alerted
                && now.saturating_sub(last) >= s.motion_clear
            {
                st.alerted = None;
                out.push(Action::Clear {
                    kind: AlertKind::MotionAlert,
                    subject: Subject::Unit(unit.clone()),
                });
            }
            if st
                .opened
                .is_some_and(|o| now.saturating_sub(o) >= s.motion_quiet)
            {
                st.opened = None;
            }
            while st
                .recent
                .front()
                .is_some_and(|&t| now.saturating_sub(t) >= window)
            {
                st.recent.pop_front();
            }
            !st.idle()
        });
    }
}
