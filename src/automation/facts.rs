//! The drivers' side of automation: [`FactSink`], a handle that hands what a driver observed
//! (motion, a reading, a door contact, a grant, a lock report, a manual release) to the
//! automation runner (`runner.rs`) over a **bounded** channel.
//!
//! `send` never blocks: a bus thread or the BLE advert thread must keep its timing, so when the
//! runner is behind and the channel is full the fact is dropped and counted
//! (`gatehouse_automation_facts_dropped_total`, `health.automation.facts_dropped`). A sink
//! made with [`FactSink::none`] (no runner: tests, tools) drops everything silently.
//!
//! Drivers get the sink from the access engine they already hold
//! ([`crate::access::AccessEngine::facts`]); nothing here knows the daemon.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use std::sync::Arc;

use super::RawFact;
use super::placed::Placements;

/// How many facts wait for the runner before new ones are dropped.
pub const FACT_QUEUE: usize = 4096;

/// A fact as a driver observed it, owned (it crosses a thread).
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    /// A motion report: a BLE sensor (`channel: None`) or a Modbus input.
    Motion {
        device: String,
        channel: Option<u16>,
    },
    /// A temperature reading in °C: a BLE sensor (`channel: None`) or a Modbus device's
    /// reading (`channel`: the reading's index in the device's profile).
    Temperature {
        device: String,
        channel: Option<u16>,
        celsius: f64,
    },
    DoorOpened {
        entry: String,
    },
    DoorClosed {
        entry: String,
    },
    /// A granted access decision.
    Granted {
        user: Option<String>,
        entry: Option<String>,
        unit: Option<String>,
        leaving: bool,
    },
    /// A padlock or unit controller was told to unlock by a command (it explains the
    /// `LockUnlocked` report that follows).
    UnlockCommanded {
        device: String,
    },
    LockUnlocked {
        device: String,
    },
    LockLocked {
        device: String,
    },
    ManualRelease {
        entry: String,
    },
}

impl Observed {
    /// The fact in the form [`super::resolve`] reads. `UnlockCommanded` is resolved by the
    /// runner (device → unit) and has no raw form.
    pub fn raw(&self) -> Option<RawFact<'_>> {
        Some(match self {
            Observed::Motion { device, channel } => RawFact::Motion {
                device,
                channel: *channel,
            },
            Observed::Temperature {
                device,
                channel,
                celsius,
            } => RawFact::Temperature {
                device,
                channel: *channel,
                celsius: *celsius,
            },
            Observed::DoorOpened { entry } => RawFact::DoorOpened { entry },
            Observed::DoorClosed { entry } => RawFact::DoorClosed { entry },
            Observed::Granted {
                user,
                entry,
                unit,
                leaving,
            } => RawFact::Granted {
                user: user.as_deref(),
                entry: entry.as_deref(),
                unit: unit.as_deref(),
                leaving: *leaving,
            },
            Observed::LockUnlocked { device } => RawFact::LockUnlocked { device },
            Observed::LockLocked { device } => RawFact::LockLocked { device },
            Observed::ManualRelease { entry } => RawFact::ManualRelease { entry },
            Observed::UnlockCommanded { .. } => return None,
        })
    }
}

/// Counts what a sink dropped (a full channel). Shared with the metrics.
pub type DropCounter = prometheus_client::metrics::counter::Counter;

/// The drivers' handle on the runner. Cheap to clone; `send` never blocks.
#[derive(Clone, Default)]
pub struct FactSink {
    tx: Option<SyncSender<Observed>>,
    dropped: DropCounter,
    /// Where the sensors the site database does not list are (adopted ones): shared with the
    /// runner, replaced whole by the BLE manager (never through the bounded queue).
    placements: Arc<Placements>,
}

impl std::fmt::Debug for FactSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FactSink")
            .field("connected", &self.tx.is_some())
            .field("dropped", &self.dropped.get())
            .finish()
    }
}

impl FactSink {
    /// A sink with no runner: every fact is dropped, nothing counted.
    pub fn none() -> FactSink {
        FactSink::default()
    }

    /// A sink and the runner's end of its channel (`capacity` facts; [`FACT_QUEUE`] in the
    /// daemon). `dropped` counts the facts a full channel refused.
    pub fn bounded(capacity: usize, dropped: DropCounter) -> (FactSink, Receiver<Observed>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
        (
            FactSink {
                tx: Some(tx),
                dropped,
                placements: Arc::default(),
            },
            rx,
        )
    }

    /// Hands a fact to the runner, or drops it (counted) when the channel is full. Never blocks.
    pub fn send(&self, fact: Observed) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(fact) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.inc();
            }
            // The runner stopped (the daemon is stopping): nothing to do.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Whether a runner listens (drivers may skip building a fact when not).
    pub fn is_connected(&self) -> bool {
        self.tx.is_some()
    }

    /// The placed sensors this sink's runner reads (give it to [`super::runner::start`]); a
    /// driver that runs sensors the site database does not list sets them here.
    pub fn placements(&self) -> &Arc<Placements> {
        &self.placements
    }

    /// Facts dropped so far because the channel was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_channel_drops_and_counts_never_blocks() {
        let (sink, rx) = FactSink::bounded(2, DropCounter::default());
        for _ in 0..5 {
            sink.send(Observed::DoorOpened { entry: "e".into() });
        }
        assert_eq!(sink.dropped(), 3);
        assert_eq!(rx.try_iter().count(), 2);
        // Room again: accepted.
        sink.send(Observed::DoorClosed { entry: "e".into() });
        assert_eq!(rx.try_iter().count(), 1);
        assert_eq!(sink.dropped(), 3);
    }

    #[test]
    fn a_sink_without_runner_drops_silently() {
        let s = FactSink::none();
        s.send(Observed::LockLocked { device: "x".into() });
        assert_eq!(s.dropped(), 0);
        assert!(!s.is_connected());
    }
}
