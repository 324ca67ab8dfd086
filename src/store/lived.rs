//! Time the gateway has lived through: a monotonic clock that survives restarts.
//!
//! The wall clock can be stepped (NTP, an operator, a dead RTC battery) forwards or backwards;
//! durations that decide what to delete or what to accept again (the outbox's age bound, how
//! long a command id is remembered) must not follow it. `LivedClock` counts milliseconds of
//! [`Instant`] (monotonic) time, summed over every run of the daemon on this database: the total
//! is kept in the `state` tree under `lived_ms` and saved by [`LivedClock::persist`] (the daemon
//! does it every minute and at shutdown). A crash loses at most the time since the last save,
//! so lived time only ever *under*-counts: what is kept by its age is kept a little longer.

use std::time::Instant;

const KEY: &[u8] = b"lived_ms";

pub struct LivedClock {
    base_ms: u64,
    started: Instant,
    state: sled::Tree,
}

impl LivedClock {
    pub(super) fn open(state: sled::Tree) -> anyhow::Result<LivedClock> {
        let base_ms = match state.get(KEY)? {
            Some(v) => u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("state `lived_ms` is not 8 bytes"))?,
            ),
            None => 0,
        };
        Ok(LivedClock {
            base_ms,
            started: Instant::now(),
            state,
        })
    }

    /// Milliseconds lived by this database, this run included.
    pub fn now_ms(&self) -> u64 {
        self.base_ms
            .saturating_add(u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// Saves the total (not flushed: the next flush of the database makes it durable).
    pub fn persist(&self) -> anyhow::Result<()> {
        self.state.insert(KEY, &self.now_ms().to_be_bytes())?;
        Ok(())
    }
}
