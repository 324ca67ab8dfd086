//! The automation runner: the one thread that runs the rules in the daemon
//! (docs/automation.md, *In the daemon*).
//!
//! ```text
//! drivers, AccessEngine ──FactSink (bounded; full: dropped, counted)──▶ runner thread
//!     resolve against the site ─▶ Rules::step / Rules::tick (every second, lived clock)
//!     ─▶ Lifecycle::apply (records, alert events through the group commit, relay off times)
//!     ─▶ Relays::execute (zone trigger relays)          ─▶ AlertBoard (once durable)
//! ```
//!
//! - **Time** is the store's lived clock (monotonic, survives restarts): timers (held open,
//!   temperature duration, relay offs) are checked every second, and relay offs due while the
//!   gateway was down run at start ([`super::lifecycle::Lifecycle::restore`]).
//! - **Relays** are reached only through the command router's [`Relays`] trait. An off that
//!   fails (bus not up yet after a restart, a device timeout) is retried every few seconds
//!   until it succeeds or the runner stops: a trigger relay is never left on by a failure.
//! - **The active set** goes to the [`AlertBoard`] (the cloud link publishes it retained on
//!   `alerts`) only once durable: after a change, the runner asks the group commit for a drain
//!   ticket ([`Store::recorded_ticket`]) and moves the set to the board when the committer has
//!   flushed everything recorded before it (records and events), never before.
//! - Unknown devices, entries and units are counted (`automation_facts_unknown`) and ignored.

use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::facts::Observed;
use super::lifecycle::{ActiveAlert, Lifecycle, RelayOp as Op};
use super::placed::Placements;
use super::{Action, Fact, Millis, Rules, Settings, Subject, resolve_placed, unit_of_device};
use crate::cloud::commands::{Execution, Online, RelayOp, Relays};
use crate::site::Tables;
use crate::store::Store;

/// How often timers are checked.
const TICK: Duration = Duration::from_secs(1);
/// How often a failed relay off is tried again.
const RETRY: Duration = Duration::from_secs(3);

/// The active alerts as last made durable, for the cloud link (retained `alerts`).
#[derive(Debug, Default)]
pub struct AlertBoard {
    inner: Mutex<(u64, Arc<Vec<ActiveAlert>>)>,
    changed: tokio::sync::Notify,
}

impl AlertBoard {
    pub fn new() -> Arc<AlertBoard> {
        Arc::new(AlertBoard::default())
    }

    /// `(version, alerts)`: version 0 until the runner has published a first set (the link
    /// publishes nothing then); it grows with each durable change.
    pub fn snapshot(&self) -> (u64, Arc<Vec<ActiveAlert>>) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (g.0, g.1.clone())
    }

    fn set(&self, alerts: Vec<ActiveAlert>) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0 += 1;
        g.1 = Arc::new(alerts);
        drop(g);
        // A permit is kept if the link is not waiting now.
        self.changed.notify_one();
    }

    /// Waits until the set changes (the cloud link's session loop).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// Counters the runner keeps (shared with the metrics).
#[derive(Clone, Default)]
pub struct RunnerCounters {
    pub unknown: prometheus_client::metrics::counter::Counter,
    pub facts: prometheus_client::metrics::counter::Counter,
    pub active: prometheus_client::metrics::gauge::Gauge,
}

/// The running thread; [`Running::join`] waits for it after the stop token is cancelled.
pub struct Running {
    thread: JoinHandle<()>,
}

impl Running {
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// Restores the durable state (active alerts into the rules, relay offs due now switched off),
/// publishes the restored set to `board`, and starts the runner thread. Fails when the stored
/// state cannot be read (a damaged record is named): the daemon does not start without it,
/// since a forgotten timer could leave a relay on. `placed`: the sink's
/// ([`super::facts::FactSink::placements`]), read for every fact.
pub fn start(
    store: Arc<Store>,
    relays: Arc<dyn Relays>,
    facts: Receiver<Observed>,
    placed: Arc<Placements>,
    board: Arc<AlertBoard>,
    counters: RunnerCounters,
    stop: CancellationToken,
) -> anyhow::Result<Running> {
    let run = store.automation_run()?;
    let prefix = format!("{}-{run}", store.epoch());
    let mut rules = Rules::default();
    let (life, due) = Lifecycle::restore(
        &store,
        &mut rules,
        prefix,
        store.lived().now_ms(),
        Utc::now(),
    )?;
    let restored: Vec<ActiveAlert> = life.active().cloned().collect();
    tracing::info!(
        active = restored.len(),
        relays_off = due.len(),
        "automation state restored"
    );
    counters.active.set(restored.len() as i64);
    board.set(restored);
    let mut r = Runner {
        store,
        relays,
        board,
        counters,
        rules,
        life,
        placed,
        settings: None,
        changes: 0,
        ticket: None,
        retry: Vec::new(),
        next_retry: Instant::now(),
    };
    let thread = std::thread::Builder::new()
        .name("automation".into())
        .spawn(move || {
            r.relay_ops(due);
            r.run(&facts, &stop);
        })?;
    Ok(Running { thread })
}

struct Runner {
    store: Arc<Store>,
    relays: Arc<dyn Relays>,
    board: Arc<AlertBoard>,
    counters: RunnerCounters,
    rules: Rules,
    life: Lifecycle,
    /// Sensors the site database does not list, placed in a unit or zone (adopted ones).
    placed: Arc<Placements>,
    /// The settings, read again when the site's tables change.
    settings: Option<(Arc<Tables>, Settings)>,
    /// The lifecycle's change count last handed to the board (or waiting for its ticket).
    changes: u64,
    /// Answered once everything recorded before it is durable; then the set goes out.
    ticket: Option<(Receiver<()>, Vec<ActiveAlert>)>,
    /// Relay offs that failed, tried again every [`RETRY`].
    retry: Vec<(Arc<str>, u16)>,
    next_retry: Instant,
}

impl Runner {
    fn run(&mut self, facts: &Receiver<Observed>, stop: &CancellationToken) {
        let mut next_tick = Instant::now() + TICK;
        while !stop.is_cancelled() {
            let wait = next_tick
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200));
            match facts.recv_timeout(wait) {
                Ok(f) => {
                    self.fact(&f);
                    // Everything already queued, without waiting.
                    for f in facts.try_iter().take(1024) {
                        self.fact(&f);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // No driver can send any more; timers still run until the stop.
                    std::thread::sleep(wait);
                }
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + TICK;
                self.tick();
            }
            self.publish();
        }
    }

    fn tables(&mut self) -> (Arc<Tables>, Settings) {
        let tables = self.store.site().tables.clone();
        match &self.settings {
            Some((t, s)) if Arc::ptr_eq(t, &tables) => (tables, s.clone()),
            _ => {
                let s = Settings::from_facility(&tables.facility.wire);
                self.settings = Some((tables.clone(), s.clone()));
                (tables, s)
            }
        }
    }

    fn fact(&mut self, f: &Observed) {
        self.counters.facts.inc();
        let (t, s) = self.tables();
        let fact = match f {
            Observed::UnlockCommanded { device } => {
                unit_of_device(&t, device, None).map(|u| Fact::RemoteUnlock { unit: Arc::from(u) })
            }
            other => other
                .raw()
                .and_then(|raw| resolve_placed(&t, &self.placed.snapshot(), &raw)),
        };
        let Some(fact) = fact else {
            self.counters.unknown.inc();
            return;
        };
        let now = self.store.lived().now_ms();
        let actions = self.rules.step(&t, &s, &fact, now);
        self.apply(actions, now);
    }

    fn tick(&mut self) {
        let (t, s) = self.tables();
        let now = self.store.lived().now_ms();
        let actions = self.rules.tick(&t, &s, now);
        self.apply(actions, now);
        if !self.retry.is_empty() && Instant::now() >= self.next_retry {
            self.next_retry = Instant::now() + RETRY;
            let offs: Vec<Op> = std::mem::take(&mut self.retry)
                .into_iter()
                .map(|(device, channel)| Op::Off { device, channel })
                .collect();
            self.relay_ops(offs);
        }
    }

    fn apply(&mut self, mut actions: Vec<Action>, now: Millis) {
        if actions.is_empty() {
            return;
        }
        // A sensor placed in a zone raises as its own subject: the alert names the zone.
        let placed = self.placed.snapshot();
        if !placed.is_empty() {
            for a in &mut actions {
                if let Action::Raise {
                    subject: Subject::Device(d),
                    detail,
                    ..
                } = a
                    && let Some(z) = placed.zone_of(d)
                    && let Some(o) = detail.as_object_mut()
                {
                    o.insert("zone".into(), serde_json::Value::from(&**z));
                }
            }
        }
        match self.life.apply(&self.store, actions, now, Utc::now()) {
            Ok(ops) => self.relay_ops(ops),
            // The store's health records the failure; the rules decide again from later facts.
            Err(e) => tracing::error!("automation state not stored: {e:#}"),
        }
    }

    fn relay_ops(&mut self, ops: Vec<Op>) {
        for op in ops {
            let (device, channel, what) = match op {
                Op::On { device, channel } => (device, channel, RelayOp::On),
                Op::Off { device, channel } => (device, channel, RelayOp::Off),
                Op::Pulse {
                    device,
                    channel,
                    ms,
                } => (device, channel, RelayOp::Pulse { ms }),
            };
            match self.relays.execute(&device, channel, what) {
                Execution::Done(_) => {
                    tracing::info!(device = %device, channel, op = ?what, "zone trigger relay");
                    self.retry.retain(|(d, c)| !(d == &device && *c == channel));
                }
                Execution::Queued | Execution::Failed(_)
                    if what == RelayOp::Off && self.relays.online(&device) == Online::Unknown =>
                {
                    // Nothing drives such a device (a trigger naming a relay no bus has):
                    // retrying cannot help.
                    tracing::warn!(device = %device, channel, "zone trigger relay off failed: no bus has this device");
                }
                Execution::Queued | Execution::Failed(_) if what == RelayOp::Off => {
                    tracing::warn!(device = %device, channel, "zone trigger relay off failed; retrying");
                    if !self
                        .retry
                        .iter()
                        .any(|(d, c)| d == &device && *c == channel)
                    {
                        self.retry.push((device, channel));
                    }
                }
                other => {
                    tracing::warn!(device = %device, channel, op = ?what, result = ?other, "zone trigger relay failed");
                }
            }
        }
    }

    /// Hands the active set to the board once what changed it is durable: the set as it was
    /// when the ticket was asked for (later changes wait for a ticket of their own).
    fn publish(&mut self) {
        if let Some((t, _)) = &self.ticket {
            if let Err(TryRecvError::Empty) = t.try_recv() {
                return;
            }
            let Some((_, set)) = self.ticket.take() else {
                return;
            };
            if self.store.health().is_ok() {
                self.counters.active.set(set.len() as i64);
                self.board.set(set);
            } else {
                // Not known to be on disk: ask again (after the store's recovery it is).
                self.changes = u64::MAX;
            }
        }
        let c = self.life.changes();
        if c != self.changes {
            self.changes = c;
            let set: Vec<ActiveAlert> = self.life.active().cloned().collect();
            self.ticket = Some((self.store.recorded_ticket(), set));
        }
    }
}
