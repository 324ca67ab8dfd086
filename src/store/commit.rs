//! Group commit of the events drivers record: the recording API of the store.
//!
//! Device threads (RS-485 buses, BLE) record readings, door and device events at bus speed. A
//! flush of the event log costs a disk write; one per reading would make the bus wait on the
//! disk. So [`Store::record`] stamps the event (`at` in UTC, `local` in the facility's time zone)
//! and queues it to one committer thread per store, which takes everything queued, appends it
//! with [`EventLog::append_unflushed`] and flushes once with [`EventLog::flush_pending`]: at most
//! one flush per [`WINDOW`], and an event waits at most [`WINDOW`] plus one flush before it is on
//! disk and visible to the cloud link. The queue is bounded ([`QUEUE`]): when it is full the
//! recording thread waits for room (back-pressure); nothing is dropped.
//!
//! What this trades: an event still in the queue, or appended but not flushed, is lost in a power
//! cut or a kill. It was never visible, so never published. Access decisions do not go through
//! here: [`crate::access::AccessEngine`] appends and flushes them before the door opens, and
//! [`Store::record_flushed`] does the same for other events that must be on disk before the
//! caller goes on (gateway_started/gateway_stopped, cloud command effects).
//!
//! [`Store::drain_recorded`] waits until everything recorded before the call is flushed (the
//! daemon calls it at shutdown after stopping the drivers); dropping the store drains too.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::Utc;

use super::{Core, EventLog, NewEvent, Store};
use crate::events::EventKind;

/// At most one flush of recorded events per window; an event waits at most this long plus one
/// flush before it is durable.
pub const WINDOW: Duration = Duration::from_millis(10);
/// Events queued for the committer before recording threads wait.
pub const QUEUE: usize = 8192;
/// Events appended in one `append_unflushed` call.
const BATCH: usize = 1024;

enum Msg {
    Event(NewEvent),
    /// Flush everything queued before this, then answer.
    Drain(SyncSender<()>),
}

/// The committer: a bounded queue and the thread that empties it.
pub(super) struct Committer {
    tx: Mutex<Option<SyncSender<Msg>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    flushes: Arc<std::sync::atomic::AtomicU64>,
}

impl Committer {
    /// The thread reaches the event log through the store's core, for each batch only: after
    /// a disk-full recovery the core holds a new log, and no handle of the old one may be kept
    /// (sled's file lock), so the committer never keeps one between batches.
    fn start(core: Weak<Core>) -> std::io::Result<Committer> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let flushes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let f = flushes.clone();
        let thread = std::thread::Builder::new()
            .name("event-commit".into())
            .spawn(move || run(&core, &rx, &f))?;
        Ok(Committer {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            flushes,
        })
    }

    fn sender(&self) -> Option<SyncSender<Msg>> {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Committer {
    /// Closes the queue and waits for the thread to flush what was queued.
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn run(core: &Weak<Core>, rx: &Receiver<Msg>, flushes: &std::sync::atomic::AtomicU64) {
    // Long enough ago that the first event is flushed at once.
    let mut last_flush = Instant::now()
        .checked_sub(WINDOW)
        .unwrap_or_else(Instant::now);
    let mut open = true;
    while open {
        let first = match rx.recv() {
            Ok(m) => m,
            Err(_) => break,
        };
        let mut batch = vec![first];
        // Collect until the window since the last flush is over.
        let due = last_flush + WINDOW;
        loop {
            let now = Instant::now();
            if now >= due {
                break;
            }
            match rx.recv_timeout(due - now) {
                Ok(m) => batch.push(m),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        loop {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        match core.upgrade() {
            Some(core) => {
                let ok = commit(&core.events(), batch, flushes);
                if !ok {
                    core.report_error("recording device events");
                }
            }
            // The store is gone: nothing to record into.
            None => break,
        }
        last_flush = Instant::now();
    }
}

/// Appends the batch's events, flushes once, then answers the drains in it. False when the
/// disk refused something (the store's health is told).
fn commit(log: &EventLog, batch: Vec<Msg>, flushes: &std::sync::atomic::AtomicU64) -> bool {
    let mut ok = true;
    let mut events = Vec::with_capacity(batch.len());
    let mut drains = Vec::new();
    for m in batch {
        match m {
            Msg::Event(e) => events.push(e),
            Msg::Drain(reply) => drains.push(reply),
        }
    }
    for chunk in events.chunks(BATCH) {
        if let Err(e) = log.append_unflushed(chunk) {
            // Sled refused the whole batch (nothing changed): one by one, so that one bad event
            // does not take the others with it.
            tracing::warn!(
                "appending {} recorded events: {e:#}; one by one",
                chunk.len()
            );
            for ev in chunk {
                if let Err(e) = log.append_unflushed(std::slice::from_ref(ev)) {
                    ok = false;
                    tracing::error!(kind = ev.kind.as_str(), "could not record an event: {e:#}");
                }
            }
        }
    }
    if log.has_pending() {
        flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A failed flush leaves the events applied but invisible; the next flush (this thread's
        // or the daemon's every second) covers them.
        if let Err(e) = log.flush_pending() {
            ok = false;
            tracing::error!("flushing recorded events: {e:#}");
        }
    }
    for d in drains {
        let _ = d.send(());
    }
    ok
}

impl Store {
    /// An event stamped now: `at` in UTC and `local` in the facility's time zone.
    pub fn stamp(&self, kind: EventKind, payload: serde_json::Value) -> NewEvent {
        let at = Utc::now();
        let tz = self.site().tables.facility.tz;
        NewEvent {
            at,
            local: at.with_timezone(&tz).to_rfc3339(),
            kind,
            payload,
        }
    }

    /// Records an event through the group commit (see the module documentation): returns at
    /// once, or waits for room when the queue is full. The event is durable and visible to the
    /// cloud link within [`WINDOW`] plus one flush. For device events (readings, doors, device
    /// state): never for access decisions.
    pub fn record(&self, kind: EventKind, payload: serde_json::Value) {
        let ev = self.stamp(kind, payload);
        let ev = match self.committer() {
            Some(tx) => match tx.send(Msg::Event(ev)) {
                Ok(()) => return,
                Err(std::sync::mpsc::SendError(Msg::Event(ev))) => ev,
                Err(_) => return,
            },
            None => ev,
        };
        // No committer (it could not start, or the store is closing): append and flush here.
        if let Err(e) = self.events().append(&[ev]) {
            self.report_error("recording a device event");
            tracing::error!(kind = kind.as_str(), "could not record an event: {e:#}");
        }
    }

    /// Appends an event stamped now and flushes it before returning its sequence number.
    pub fn record_flushed(
        &self,
        kind: EventKind,
        payload: serde_json::Value,
    ) -> anyhow::Result<u64> {
        let seqs = self.events().append(&[self.stamp(kind, payload)])?;
        Ok(seqs[0])
    }

    /// Waits until every event recorded (by any thread) before this call is on disk and visible.
    /// Blocks on the disk: call it off the async workers.
    pub fn drain_recorded(&self) {
        let Some(tx) = self.committer_if_started() else {
            return;
        };
        let (reply, done) = std::sync::mpsc::sync_channel(1);
        if tx.send(Msg::Drain(reply)).is_ok() {
            let _ = done.recv();
        }
    }

    /// A ticket answered once every event recorded (by any thread) before this call is on disk
    /// and visible, together with every store write made before it (the committer's flush
    /// covers every tree). Never blocks: poll it with `try_recv` (a closed ticket means the
    /// committer is gone or was never started, so nothing recorded is waiting).
    pub fn recorded_ticket(&self) -> std::sync::mpsc::Receiver<()> {
        let (reply, done) = std::sync::mpsc::sync_channel(1);
        if let Some(tx) = self.committer() {
            // Full queue: the committer is behind; the ticket then waits its turn on this
            // thread only as long as `record` would.
            let _ = tx.send(Msg::Drain(reply));
        }
        done
    }

    /// Flushes the committer has made (for tests and the benchmark).
    pub fn recorder_flushes(&self) -> u64 {
        self.recorder
            .get()
            .and_then(Option::as_ref)
            .map_or(0, |c| c.flushes.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn committer_if_started(&self) -> Option<SyncSender<Msg>> {
        self.recorder.get()?.as_ref()?.sender()
    }

    /// Starts the committer thread now (otherwise the first [`Store::record`] starts it). The
    /// RS-485 buses call this before their threads start: a thread inherits its creator's
    /// scheduling, and the committer must not run at a bus thread's real-time priority.
    pub fn start_recording(&self) {
        let _ = self.committer();
    }

    fn committer(&self) -> Option<SyncSender<Msg>> {
        self.recorder
            .get_or_init(|| match Committer::start(Arc::downgrade(&self.core)) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::error!("could not start the event committer: {e}; recording directly");
                    None
                }
            })
            .as_ref()?
            .sender()
    }
}
