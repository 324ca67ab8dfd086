//! Temperature: a reading above `temperature_max` (below `temperature_min`) that stays outside
//! for `temperature_minutes` raises `temperature_high` (`temperature_low`); the alert clears
//! once a reading is back inside by `temperature_hysteresis` (at or below max − h, at or above
//! min + h). Readings between the bound and the bound ∓ h keep the alert. Truth table:
//! docs/automation.md.

use std::collections::HashMap;

use serde_json::json;

use super::{Action, AlertKind, Fact, Millis, Settings, Subject};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Outside since, with the last reading.
    Pending(AlertKind, Millis, f64),
    Alerted(AlertKind),
}

#[derive(Debug, Default)]
pub struct Temperature {
    subjects: HashMap<Subject, Phase>,
}

fn outside(s: &Settings, v: f64) -> Option<AlertKind> {
    if s.temperature_max.is_some_and(|hi| v > hi) {
        Some(AlertKind::TemperatureHigh)
    } else if s.temperature_min.is_some_and(|lo| v < lo) {
        Some(AlertKind::TemperatureLow)
    } else {
        None
    }
}

fn back_inside(s: &Settings, kind: AlertKind, v: f64) -> bool {
    let h = s.temperature_hysteresis;
    match kind {
        AlertKind::TemperatureHigh => s.temperature_max.is_none_or(|hi| v <= hi - h),
        _ => s.temperature_min.is_none_or(|lo| v >= lo + h),
    }
}

fn raise(
    kind: AlertKind,
    subject: Subject,
    since: Millis,
    v: f64,
    s: &Settings,
    now: Millis,
) -> Action {
    let bound = if kind == AlertKind::TemperatureHigh {
        s.temperature_max
    } else {
        s.temperature_min
    };
    Action::Raise {
        kind,
        subject,
        detail: json!({"celsius": v, "bound": bound, "outside_ms": now.saturating_sub(since)}),
    }
}

impl Temperature {
    pub fn restore_active(&mut self, kind: AlertKind, subject: Subject) {
        self.subjects.insert(subject, Phase::Alerted(kind));
    }

    pub fn step(&mut self, fact: &Fact, s: &Settings, now: Millis, out: &mut Vec<Action>) {
        let Fact::Temperature {
            subject,
            celsius: v,
            monitored,
        } = fact
        else {
            return;
        };
        let v = *v;
        if !monitored || (s.temperature_min.is_none() && s.temperature_max.is_none()) {
            return;
        }
        let phase = self.subjects.get(subject).copied();
        let next = match phase {
            Some(Phase::Alerted(kind)) => {
                if back_inside(s, kind, v) {
                    out.push(Action::Clear {
                        kind,
                        subject: subject.clone(),
                    });
                    // Straight to the other side: that one starts pending.
                    outside(s, v).map(|k| Phase::Pending(k, now, v))
                } else {
                    Some(Phase::Alerted(kind))
                }
            }
            Some(Phase::Pending(kind, since, _)) if outside(s, v) == Some(kind) => {
                Some(Phase::Pending(kind, since, v))
            }
            _ => outside(s, v).map(|k| Phase::Pending(k, now, v)),
        };
        let next = match next {
            Some(Phase::Pending(kind, since, v))
                if now.saturating_sub(since) >= s.temperature_for =>
            {
                out.push(raise(kind, subject.clone(), since, v, s, now));
                Some(Phase::Alerted(kind))
            }
            n => n,
        };
        match next {
            Some(p) => {
                self.subjects.insert(subject.clone(), p);
            }
            None => {
                self.subjects.remove(subject);
            }
        }
    }

    pub fn tick(&mut self, s: &Settings, now: Millis, out: &mut Vec<Action>) {
        for (subject, phase) in self.subjects.iter_mut() {
            if let Phase::Pending(kind, since, v) = *phase
                && now.saturating_sub(since) >= s.temperature_for
            {
                out.push(raise(kind, subject.clone(), since, v, s, now));
                *phase = Phase::Alerted(kind);
            }
        }
    }
}
