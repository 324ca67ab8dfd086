//! The pace of an OSDP bus: how long its thread may leave LibOSDP alone.
//!
//! LibOSDP polls a reader at a refresh when more than 50 ms have passed since its last command or
//! reply (`OSDP_PD_POLL_TIMEOUT_MS`, fixed in the library), so the bus thread sets the poll rate
//! by when it refreshes: at [`ACTIVE_DUE`] after the last exchange ended the next poll goes
//! out (picked by one refresh of the wake's burst, sent by the next). Each poll cycle of two readers costs three wakes of the thread (the timer, then
//! each reader's reply), which made OSDP the daemon's biggest source of wakeups at rest.
//!
//! So the bus polls at LibOSDP's rate only while something happens — for [`ACTIVE_FOR`] after a
//! reader reported anything (a key, a card, a status), after a job (LED, buzzer, output) and
//! after the session started (pairing, secure channel set-up) — and otherwise every
//! [`IDLE_DUE`]: a reader that has been quiet for a while is polled five times a second. The first
//! key or card after a quiet spell therefore waits up to [`IDLE_DUE`] for its poll instead of
//! 50 ms; the rest of a code, and the reader's answer, go at the full rate. Nothing else in
//! LibOSDP needs a faster refresh: a reply is read when its bytes arrive (the port wakes the
//! thread), and its other timers (reply timeout 200 ms, retry waits of 800 ms and more, the
//! secure channel's 8 s) are longer.

use std::time::{Duration, Instant};

/// After the last byte on the wire, while the bus is active: LibOSDP's 50 ms, plus a
/// millisecond (its comparison is strict).
pub const ACTIVE_DUE: Duration = Duration::from_millis(51);
/// After the last byte on the wire, while the bus is quiet.
pub const IDLE_DUE: Duration = Duration::from_millis(201);
/// How long the bus stays active after the last sign of use.
pub const ACTIVE_FOR: Duration = Duration::from_secs(10);

/// When the bus polls at LibOSDP's full rate.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    active_until: Instant,
}

impl Pace {
    /// A session starting at `now` is active (readers come online, secure channels set up).
    pub fn new(now: Instant) -> Pace {
        Pace {
            active_until: now + ACTIVE_FOR,
        }
    }

    /// Something happened on the bus (a reader's event, a job).
    pub fn used(&mut self, now: Instant) {
        self.active_until = self.active_until.max(now + ACTIVE_FOR);
    }

    pub fn active(&self, now: Instant) -> bool {
        now < self.active_until
    }

    /// When the thread should next refresh LibOSDP, at the latest: the next poll's time after
    /// `last_io` (the last byte sent or received), never more than the pace's own interval from
    /// `now` (a wake with no byte in between: LibOSDP's waits still advance).
    pub fn next_refresh(&self, now: Instant, last_io: Option<Instant>) -> Instant {
        let due = if self.active(now) {
            ACTIVE_DUE
        } else {
            IDLE_DUE
        };
        let cap = now + due;
        last_io
            .map(|t| t + due)
            .filter(|&at| at > now)
            .map_or(cap, |at| at.min(cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_bus_polls_at_the_idle_pace_and_use_restores_the_full_rate() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = Pace::new(t0);
        // A new session: LibOSDP's rate, from the last byte.
        assert!(p.active(t0));
        assert_eq!(
            p.next_refresh(t0 + ms(10), Some(t0 + ms(5))),
            t0 + ms(5) + ACTIVE_DUE
        );
        // No byte yet: at most one pace from now.
        assert_eq!(p.next_refresh(t0, None), t0 + ACTIVE_DUE);
        // A poll already due (last byte long ago): wait one pace from now, not zero.
        assert_eq!(
            p.next_refresh(t0 + ms(200), Some(t0)),
            t0 + ms(200) + ACTIVE_DUE
        );
        // Quiet for ACTIVE_FOR: the idle pace.
        let quiet = t0 + ACTIVE_FOR;
        assert!(!p.active(quiet));
        assert_eq!(
            p.next_refresh(quiet, Some(quiet - ms(1))),
            quiet - ms(1) + IDLE_DUE
        );
        assert_eq!(p.next_refresh(quiet, None), quiet + IDLE_DUE);
        // A key: the full rate again, for ACTIVE_FOR from then.
        let key = quiet + ms(300);
        p.used(key);
        assert!(p.active(key) && p.active(key + ACTIVE_FOR - ms(1)));
        assert!(!p.active(key + ACTIVE_FOR));
        assert_eq!(p.next_refresh(key, Some(key)), key + ACTIVE_DUE);
        // An older sign of use never shortens it.
        p.used(t0);
        assert!(p.active(key + ACTIVE_FOR - ms(1)));
    }
}
