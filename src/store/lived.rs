//! Time the gateway has lived through: a monotonic clock that survives restarts.
//!
//! The wall clock can be stepped (NTP, an operator, a dead RTC battery) forwards or backwards;
//! durations that decide what to delete or what to accept again (the outbox's age bound, how
//! long a command id is remembered) must not follow it. `LivedClock` counts milliseconds of
//! [`Instant`] (monotonic) time, summed over every run of the daemon on this database: the total
//! is kept in the `state` tree under `lived_ms` and saved by [`LivedClock::persist`] (the daemon
//! does it every minute and at shutdown). A crash loses at most the time since the last save,
//! so lived time only ever *under*-counts: what is kept by its age is kept a little longer.
//! A reopen of the database (after a storage failure) keeps counting: the clock is detached
//! from the old `state` tree and attached to the new one without re-reading the total.

use std::sync::RwLock;
use std::time::Instant;

const KEY: &[u8] = b"lived_ms";

pub struct LivedClock {
    base_ms: u64,
    started: Instant,
    state: RwLock<Option<sled::Tree>>,
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
            state: RwLock::new(Some(state)),
        })
    }

    /// Milliseconds lived by this database, this run included.
    pub fn now_ms(&self) -> u64 {
        self.base_ms
            .saturating_add(u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// Saves the total (not flushed: the next flush of the database makes it durable).
    pub fn persist(&self) -> anyhow::Result<()> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let state = state
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("storage: the database is being reopened"))?;
        state.insert(KEY, &self.now_ms().to_be_bytes())?;
        Ok(())
    }

    /// Drops the tree handle (before a reopen).
    pub(super) fn detach(&self) {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Uses `state` from now on.
    pub(super) fn attach(&self, state: sled::Tree) {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = Some(state);
    }
}
