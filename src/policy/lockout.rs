//! Keypad lockout: N invalid codes within M minutes at one keypad make that keypad refuse
//! everything for a cool-down. Pure state: the caller passes the time and the thresholds.
//! State lives in memory only (a restart clears it; see ARCHITECTURE.md).

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Duration, Utc};

use crate::sync::KeypadLockout;

#[derive(Debug, Default)]
struct KeypadState {
    failures: VecDeque<DateTime<Utc>>,
    locked_until: Option<DateTime<Utc>>,
}

/// Failure counts and lockouts per keypad.
#[derive(Debug, Default)]
pub struct Lockouts {
    keypads: HashMap<String, KeypadState>,
}

impl Lockouts {
    /// `Some(until)` while the keypad is locked out at `at`.
    pub fn locked_until(&self, keypad: &str, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.keypads
            .get(keypad)
            .and_then(|k| k.locked_until)
            .filter(|&until| at < until)
    }

    /// Records an invalid code. Returns `Some(until)` when this failure starts a lockout (once
    /// per lockout, so that exactly one `keypad_locked_out` event is raised).
    pub fn record_failure(
        &mut self,
        keypad: &str,
        at: DateTime<Utc>,
        policy: KeypadLockout,
    ) -> Option<DateTime<Utc>> {
        if self.locked_until(keypad, at).is_some() {
            return None;
        }
        let window = Duration::minutes(policy.window_minutes as i64);
        let k = self.keypads.entry(keypad.to_string()).or_default();
        k.locked_until = None;
        while k.failures.front().is_some_and(|&t| t + window <= at) {
            k.failures.pop_front();
        }
        k.failures.push_back(at);
        if k.failures.len() >= policy.max_failures as usize {
            k.failures.clear();
            let until = at + Duration::minutes(policy.cooldown_minutes as i64);
            k.locked_until = Some(until);
            return Some(until);
        }
        None
    }

    /// Drops keypads with nothing left to remember, keeping the map bounded.
    pub fn prune(&mut self, at: DateTime<Utc>, policy: KeypadLockout) {
        let window = Duration::minutes(policy.window_minutes as i64);
        self.keypads.retain(|_, k| {
            k.locked_until.is_some_and(|u| at < u)
                || k.failures.back().is_some_and(|&t| at < t + window)
        });
    }
}
