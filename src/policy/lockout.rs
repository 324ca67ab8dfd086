//! Keypad lockout: N invalid codes within M minutes at one keypad make that keypad refuse
//! everything for a cool-down. Pure state: the caller passes the time and the thresholds.
//! State lives in memory only (a restart clears it; see ARCHITECTURE.md).
//!
//! The window and the cool-down are durations, so they are measured on the monotonic clock
//! ([`Instant`]), never on the wall clock: a wall-clock step (NTP correcting a wrong RTC, an
//! operator setting the time) neither shortens nor lengthens a lockout.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::sync::KeypadLockout;

#[derive(Debug, Default)]
struct KeypadState {
    failures: VecDeque<Instant>,
    locked_until: Option<Instant>,
}

/// Failure counts and lockouts per keypad.
#[derive(Debug, Default)]
pub struct Lockouts {
    keypads: HashMap<String, KeypadState>,
}

fn minutes(m: u32) -> Duration {
    Duration::from_secs(u64::from(m) * 60)
}

impl Lockouts {
    /// Whether the keypad is locked out at monotonic instant `now`.
    pub fn is_locked(&self, keypad: &str, now: Instant) -> bool {
        self.keypads
            .get(keypad)
            .and_then(|k| k.locked_until)
            .is_some_and(|until| now < until)
    }

    /// Records an invalid code at monotonic instant `now`. Returns `Some(cool-down)` when this
    /// failure starts a lockout (once per lockout, so that exactly one `keypad_locked_out` event
    /// is raised).
    pub fn record_failure(
        &mut self,
        keypad: &str,
        now: Instant,
        policy: KeypadLockout,
    ) -> Option<Duration> {
        if self.is_locked(keypad, now) {
            return None;
        }
        let window = minutes(policy.window_minutes);
        let k = self.keypads.entry(keypad.to_string()).or_default();
        k.locked_until = None;
        while k.failures.front().is_some_and(|&t| t + window <= now) {
            k.failures.pop_front();
        }
        k.failures.push_back(now);
        if k.failures.len() >= policy.max_failures as usize {
            k.failures.clear();
            let cooldown = minutes(policy.cooldown_minutes);
            k.locked_until = Some(now + cooldown);
            return Some(cooldown);
        }
        None
    }

    /// Drops keypads with nothing left to remember, keeping the map bounded.
    pub fn prune(&mut self, now: Instant, policy: KeypadLockout) {
        let window = minutes(policy.window_minutes);
        self.keypads.retain(|_, k| {
            k.locked_until.is_some_and(|u| now < u)
                || k.failures.back().is_some_and(|&t| now < t + window)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: KeypadLockout = KeypadLockout {
        max_failures: 3,
        window_minutes: 10,
        cooldown_minutes: 5,
    };

    #[test]
    fn a_lockout_lasts_its_cooldown_in_monotonic_time() {
        let t0 = Instant::now();
        let mut l = Lockouts::default();
        assert_eq!(l.record_failure("kp", t0, POLICY), None);
        assert_eq!(l.record_failure("kp", t0, POLICY), None);
        assert_eq!(
            l.record_failure("kp", t0 + minutes(1), POLICY),
            Some(minutes(5))
        );
        assert!(l.is_locked("kp", t0 + minutes(6) - Duration::from_millis(1)));
        assert!(!l.is_locked("kp", t0 + minutes(6)));
        assert!(!l.is_locked("other", t0 + minutes(1)));
        l.prune(t0 + minutes(6), POLICY);
        assert!(l.keypads.is_empty(), "nothing left to remember");
    }
}
