//! RS-485: OSDP keypads and card readers, Modbus RTU relay boards, I/O boards and sensors.
//!
//! Each `[[bus]]` is one serial port with one protocol, driven by its own OS thread: one
//! transaction at a time on the wire, and nothing another bus does (a silent device, a stuck
//! adapter) can delay it. A bus whose port fails or disappears (USB adapter unplugged) records
//! `bus_disconnected`, marks its devices offline, and reopens the port with capped backoff;
//! `bus_connected` follows when it is back.
//!
//! - [`osdp`]: a LibOSDP control panel per bus. Key presses assemble into codes, card bits into
//!   card numbers ([`wire`]); each goes to the [`AccessEngine`] for the reader's entry (the
//!   decision is on disk before the reader is answered); the reader shows green/red and beeps;
//!   on a grant the entry's relay pulses.
//! - [`modbus`]: a tokio-modbus RTU master per bus (every call under a timeout) polling the
//!   devices of [`profile`]s, driving relays, mapping inputs to door/motion/exit/tamper events
//!   and readings to `sensor_reading` events.
//! - [`Rs485`] owns the buses and routes relay jobs (grants, exit buttons, the cloud's `unlock`
//!   and `relay` commands through [`Relays`]) to the bus that has the device.
//! - [`sim`]: a simulated keypad and relay board on PTYs for the demo and the benchmark, spoken
//!   to through the same bus code as real devices.

pub mod adopted;
pub mod config;
pub mod modbus;
pub mod osdp;
pub mod pace;
pub mod pairing;
pub mod profile;
pub mod provision;
pub mod rt;
pub mod sim;
pub mod sim_demo;
pub mod sim_line;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::access::AccessEngine;
use crate::cloud::commands::{Execution, Online, RelayOp, Relays};
use crate::events::EventKind;
use crate::store::Store;
use config::{BusConfig, BusKind};

/// A grant's pulse not run within this is dropped (the tenant has walked away).
const GRANT_DEADLINE: Duration = Duration::from_secs(3);
/// How long a relay command from the cloud waits for the bus to answer.
const RELAY_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// After a release (grant, exit button, remote unlock) a door contact may open without it being
/// forced, for the pulse plus this long.
const DOOR_GRACE: Duration = Duration::from_secs(10);

/// A relay operation for a bus thread.
#[derive(Debug)]
pub struct Job {
    pub device: String,
    pub channel: u16,
    pub op: RelayOp,
    /// After this the bus answers `Err` without running the job (a late unlock must not open a
    /// door the cloud was told failed). `None`: no deadline.
    pub deadline: Option<Instant>,
    /// The answer: `Ok(detail)` or `Err(device error)`. `None`: nobody waits (a grant's pulse;
    /// a failure is recorded as `device_error`).
    pub reply: Option<std::sync::mpsc::SyncSender<Result<String, String>>>,
}

pub type JobSender = tokio::sync::mpsc::UnboundedSender<Job>;

/// What every bus shares: relay routing, device liveness, entry releases.
#[derive(Default)]
struct Common {
    routes: Mutex<HashMap<String, JobSender>>,
    online: Mutex<HashMap<String, bool>>,
    released: Mutex<HashMap<String, Instant>>,
    /// Install mode: the scan handle and the provisioner's asks ([`pairing::Hub`]).
    pairing: pairing::Hub,
}

/// What a bus thread sees: the access engine, the store for events, what all buses share, and
/// two stop flags: the daemon's (every bus) and its own (a reload that removes or restarts it).
pub struct Shared {
    pub engine: Arc<AccessEngine>,
    pub store: Arc<Store>,
    common: Arc<Common>,
    stop: Arc<AtomicBool>,
    own_stop: AtomicBool,
}

/// Why a stopped bus answers the relay jobs it still held.
const STOPPING: &str = "gatehouse is stopping";
const RELOADED: &str = "the bus was removed or restarted by a configuration reload";

impl Shared {
    pub fn new(engine: Arc<AccessEngine>) -> Arc<Self> {
        Arc::new(Shared {
            store: engine.store().clone(),
            engine,
            common: Arc::new(Common::default()),
            stop: Arc::new(AtomicBool::new(false)),
            own_stop: AtomicBool::new(false),
        })
    }

    /// The view of one more bus: same routes, liveness and daemon stop; its own stop flag.
    fn for_bus(&self) -> Arc<Self> {
        Arc::new(Shared {
            engine: self.engine.clone(),
            store: self.store.clone(),
            common: self.common.clone(),
            stop: self.stop.clone(),
            own_stop: AtomicBool::new(false),
        })
    }

    /// Install mode's shared state (scan handle, profiles, the provisioner's asks).
    pub fn pairing(&self) -> &pairing::Hub {
        &self.common.pairing
    }

    /// Why this bus stops (what its pending relay jobs are answered with).
    pub fn stop_reason(&self) -> &'static str {
        if self.stop.load(Ordering::Relaxed) {
            STOPPING
        } else {
            RELOADED
        }
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.own_stop.load(Ordering::Relaxed)
    }

    /// Sleeps up to `d`, returning early (true) when stopping.
    pub fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if self.stopping() {
                return true;
            }
            std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
        }
        self.stopping()
    }

    /// Records an event through the store's group commit ([`Store::record`]): the bus thread
    /// does not wait for the disk (decisions go through the [`AccessEngine`], flushed). A failure
    /// to write is logged by the committer: a device thread must go on.
    pub fn record(&self, kind: EventKind, payload: serde_json::Value) {
        self.store.record(kind, payload);
    }

    /// Sets a device's liveness; records `device_online`/`device_offline` on a change.
    pub fn set_online(&self, device: &str, bus: &str, online: bool, detail: Option<String>) {
        let changed = {
            let mut m = self.common.online.lock().unwrap_or_else(|e| e.into_inner());
            m.insert(device.to_string(), online) != Some(online)
        };
        if changed {
            self.engine.metrics().device_online(device, bus, online);
            let mut p = json!({"device": device, "bus": bus});
            if let Some(d) = detail {
                p["detail"] = json!(d);
            }
            tracing::info!(device, bus, online, "device state");
            self.record(
                if online {
                    EventKind::DeviceOnline
                } else {
                    EventKind::DeviceOffline
                },
                p,
            );
        }
    }

    /// Devices on the buses: (online, total).
    pub fn online_counts(&self) -> (usize, usize) {
        let routes = self.common.routes.lock().unwrap_or_else(|e| e.into_inner());
        let online = self.common.online.lock().unwrap_or_else(|e| e.into_inner());
        let up = routes
            .keys()
            .filter(|d| online.get(*d) == Some(&true))
            .count();
        (up, routes.len())
    }

    pub fn is_online(&self, device: &str) -> Option<bool> {
        self.common
            .online
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(device)
            .copied()
    }

    /// Sends a relay job to the bus that has `device`. False if no bus has it or it stopped.
    pub fn send(&self, job: Job) -> bool {
        let routes = self.common.routes.lock().unwrap_or_else(|e| e.into_inner());
        match routes.get(&job.device) {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        }
    }

    /// Releases an entry: pulses its relay (from the site database) and notes the release so
    /// that its door contact opening is not taken for a forced door. Returns what was done.
    pub fn release_entry(&self, entry: &str, why: &str) -> Result<(), String> {
        let relay = {
            let site = self.store.site();
            match site.tables.entries.get(entry) {
                None => return Err(format!("no entry `{entry}` in the site database")),
                Some(e) => e.relay.clone(),
            }
        };
        let Some(relay) = relay else {
            return Err(format!("entry `{entry}` has no relay"));
        };
        self.note_release(
            entry,
            Duration::from_millis(u64::from(relay.pulse_ms)) + DOOR_GRACE,
        );
        let job = Job {
            device: relay.device.clone(),
            channel: relay.channel,
            op: RelayOp::Pulse { ms: relay.pulse_ms },
            deadline: Some(Instant::now() + GRANT_DEADLINE),
            reply: None,
        };
        if self.send(job) {
            tracing::debug!(entry, why, device = %relay.device, "relay pulse sent");
            Ok(())
        } else {
            let msg = format!("relay device `{}` is not on any bus", relay.device);
            self.record(
                EventKind::DeviceError,
                json!({"device": relay.device, "entry": entry, "error": msg}),
            );
            Err(msg)
        }
    }

    /// A manual release (key switch, fire release) holds the entry open for an hour as far as
    /// the door contact is concerned.
    pub fn note_manual_release(&self, entry: &str) {
        self.note_release(entry, Duration::from_secs(3600));
    }

    fn note_release(&self, entry: &str, for_: Duration) {
        self.common
            .released
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(entry.to_string(), Instant::now() + for_);
    }

    /// Whether the entry was released recently enough for its door to open.
    pub fn recently_released(&self, entry: &str) -> bool {
        self.common
            .released
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(entry)
            .is_some_and(|&until| Instant::now() <= until)
    }

    /// Notes a release made outside this module (the cloud's `unlock` of an entry).
    pub fn released_by_relay(&self, device: &str, channel: u16, ms: u32) {
        let entries: Vec<String> = {
            let site = self.store.site();
            site.tables
                .entries
                .values()
                .filter(|e| {
                    e.relay
                        .as_ref()
                        .is_some_and(|r| r.device == device && r.channel == channel)
                })
                .map(|e| e.id.clone())
                .collect()
        };
        for e in entries {
            // Off: the door is shut again; only a short grace for it to close.
            self.note_release(&e, Duration::from_millis(u64::from(ms)) + DOOR_GRACE);
        }
    }
}

/// The running buses. Buses can be started and stopped one by one while the others go on
/// ([`Rs485::apply`], a configuration reload).
pub struct Rs485 {
    shared: Arc<Shared>,
    buses: Mutex<Vec<Running>>,
    /// The configured buses ([`Rs485::apply`]) and the devices adopted in install mode on top
    /// (`provision.rs`): what runs is both, merged.
    base: Mutex<Vec<BusConfig>>,
    adopted: Mutex<Vec<provision::Adopted>>,
}

/// One bus thread.
struct Running {
    cfg: BusConfig,
    shared: Arc<Shared>,
    tx: JobSender,
    thread: JoinHandle<()>,
}

/// What [`Rs485::apply`] did, by bus id.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BusChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub restarted: Vec<String>,
}

impl BusChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.restarted.is_empty()
    }
}

/// Whether two bus sections differ in anything (port, protocol, settings, devices).
fn same_bus(a: &BusConfig, b: &BusConfig) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

impl Rs485 {
    /// Starts one thread per bus.
    pub fn start(buses: &[BusConfig], engine: Arc<AccessEngine>) -> anyhow::Result<Rs485> {
        Self::start_with(buses, Shared::new(engine))
    }

    pub fn start_with(buses: &[BusConfig], shared: Arc<Shared>) -> anyhow::Result<Rs485> {
        Self::start_adopted(buses, Vec::new(), shared)
    }

    /// Starts one thread per bus, each already running the devices adopted in install mode on
    /// it ([`provision::merge`]; a conflict is an error and nothing starts): registering the
    /// provisioner afterwards with the same devices then restarts nothing
    /// ([`provision::start`]).
    pub fn start_adopted(
        buses: &[BusConfig],
        adopted: Vec<provision::Adopted>,
        shared: Arc<Shared>,
    ) -> anyhow::Result<Rs485> {
        let merged = provision::merge(buses, &adopted).map_err(|e| anyhow::anyhow!(e))?;
        // Not from a bus thread, which may run at real-time priority (rt.rs): threads inherit it.
        shared.store.start_recording();
        let rs = Rs485 {
            shared,
            buses: Mutex::new(Vec::new()),
            base: Mutex::new(buses.to_vec()),
            adopted: Mutex::new(adopted),
        };
        for bus in &merged {
            rs.start_bus(bus)?;
        }
        Ok(rs)
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Vec<Running>> {
        self.buses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts one bus: its thread, and routes for its devices.
    fn start_bus(&self, bus: &BusConfig) -> anyhow::Result<()> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let shared = self.shared.for_bus();
        let (b, s) = (bus.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name(format!("bus-{}", bus.id))
            .spawn(move || {
                rt::raise(&b.id, b.realtime);
                match &b.kind {
                    BusKind::Osdp(_) => osdp::run(&b, &s, rx),
                    BusKind::Modbus { .. } => modbus::run(&b, &s, rx),
                }
            })?;
        {
            let mut routes = self
                .shared
                .common
                .routes
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for d in bus.device_ids() {
                routes.insert(d.to_string(), tx.clone());
            }
        }
        tracing::info!(
            bus = %bus.id,
            port = %bus.port.display(),
            protocol = match bus.kind { BusKind::Osdp(_) => "osdp", BusKind::Modbus { .. } => "modbus" },
            devices = bus.device_ids().len(),
            "bus started"
        );
        if bus.is_empty() {
            tracing::warn!(
                bus = %bus.id,
                "bus {} has no devices: it only listens for install mode",
                bus.id
            );
        }
        self.running().push(Running {
            cfg: bus.clone(),
            shared,
            tx,
            thread,
        });
        Ok(())
    }

    /// Stops one running bus: no more jobs routed to it, its thread told to stop (the jobs it
    /// held are answered with a failure), waited for up to `deadline`, its devices that were
    /// online marked offline.
    fn stop_bus(&self, r: Running, deadline: Duration) {
        {
            let mut routes = self
                .shared
                .common
                .routes
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            routes.retain(|_, tx| !tx.same_channel(&r.tx));
        }
        r.shared.own_stop.store(true, Ordering::Relaxed);
        drop(r.tx);
        let end = Instant::now() + deadline;
        while !r.thread.is_finished() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        if r.thread.is_finished() {
            let _ = r.thread.join();
        } else {
            tracing::warn!(bus = %r.cfg.id, "bus thread did not stop in time");
        }
        // Only the devices seen online go offline: a bus restarted before its devices answered
        // reports nothing for them.
        for d in r.cfg.device_ids() {
            if self.shared.is_online(d) == Some(true) {
                self.shared
                    .set_online(d, &r.cfg.id, false, Some(RELOADED.to_string()));
            }
        }
        self.shared
            .common
            .online
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|d, _| !r.cfg.device_ids().contains(&d.as_str()));
        tracing::info!(bus = %r.cfg.id, "bus stopped");
    }

    /// Brings the running buses to `buses` (the configuration's) plus the devices adopted in
    /// install mode ([`provision::merge`]; a conflict between the two is refused and nothing
    /// changes): a bus whose id is gone is stopped, a new id is started, a bus whose section
    /// changed is restarted; the others are not touched (their threads go on polling). Stops
    /// come first, so that a device moved from one bus to another is never routed to both.
    pub fn apply(&self, buses: &[BusConfig], deadline: Duration) -> anyhow::Result<BusChanges> {
        let adopted = self
            .adopted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let merged = provision::merge(buses, &adopted).map_err(|e| anyhow::anyhow!(e))?;
        *self.base.lock().unwrap_or_else(|e| e.into_inner()) = buses.to_vec();
        self.apply_merged(&merged, deadline)
    }

    /// Runs the configured buses with `adopted` on top (the provisioner's `run`); on a
    /// conflict nothing changes. A bus that already runs exactly that is not touched (at start,
    /// the buses run the registry's devices already: [`Rs485::start_adopted`]).
    pub(crate) fn apply_adopted(
        &self,
        adopted: Vec<provision::Adopted>,
        deadline: Duration,
    ) -> anyhow::Result<BusChanges> {
        let base = self.base.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let merged = provision::merge(&base, &adopted).map_err(|e| anyhow::anyhow!(e))?;
        *self.adopted.lock().unwrap_or_else(|e| e.into_inner()) = adopted;
        self.apply_merged(&merged, deadline)
    }

    /// The configured buses (without adopted devices).
    pub(crate) fn base(&self) -> Vec<BusConfig> {
        self.base.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The devices adopted in install mode that run now.
    pub(crate) fn adopted(&self) -> Vec<provision::Adopted> {
        self.adopted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Install mode: the handle the scans follow ([`crate::pairing::NoScan`] until set) and the
    /// profiles Modbus candidates are matched against (the embedded ones until set).
    pub fn set_pairing(
        &self,
        scan: Arc<dyn crate::pairing::Scan>,
        profiles: Arc<crate::profiles::Profiles>,
    ) {
        self.shared.pairing().set_scan(scan);
        self.shared.pairing().set_profiles(profiles);
    }

    fn apply_merged(&self, buses: &[BusConfig], deadline: Duration) -> anyhow::Result<BusChanges> {
        let mut changes = BusChanges::default();
        let mut to_stop = Vec::new();
        {
            let mut running = self.running();
            let mut keep = Vec::new();
            for r in running.drain(..) {
                match buses.iter().find(|b| b.id == r.cfg.id) {
                    None => {
                        changes.removed.push(r.cfg.id.clone());
                        to_stop.push(r);
                    }
                    Some(b) if !same_bus(b, &r.cfg) => {
                        changes.restarted.push(r.cfg.id.clone());
                        to_stop.push(r);
                    }
                    Some(_) => keep.push(r),
                }
            }
            *running = keep;
        }
        // Devices no bus runs any more leave the counts (a restarted bus's come back).
        let gone: Vec<String> = to_stop
            .iter()
            .flat_map(|r| r.cfg.device_ids())
            .filter(|d| !buses.iter().any(|b| b.device_ids().contains(d)))
            .map(String::from)
            .collect();
        for r in to_stop {
            self.stop_bus(r, deadline);
        }
        for d in gone {
            self.shared.engine.metrics().device_removed(&d);
        }
        for b in buses {
            let running = self.running().iter().any(|r| r.cfg.id == b.id);
            if !running {
                if !changes.restarted.contains(&b.id) {
                    changes.added.push(b.id.clone());
                }
                self.start_bus(b)?;
            }
        }
        Ok(changes)
    }

    /// The configured section of a running bus (for a demo bus: its port is the simulator's
    /// PTY), without the devices adopted in install mode.
    pub fn bus_config(&self, id: &str) -> Option<BusConfig> {
        if !self.running().iter().any(|r| r.cfg.id == id) {
            return None;
        }
        self.base
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|b| b.id == id)
            .cloned()
    }

    /// What a running bus runs: its configured section plus the devices adopted on it.
    pub fn running_config(&self, id: &str) -> Option<BusConfig> {
        self.running()
            .iter()
            .find(|r| r.cfg.id == id)
            .map(|r| r.cfg.clone())
    }

    /// The ids of the running buses.
    pub fn bus_ids(&self) -> Vec<String> {
        self.running().iter().map(|r| r.cfg.id.clone()).collect()
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The relay outputs of every bus, for the command router.
    pub fn relays(&self) -> Arc<dyn Relays> {
        Arc::new(BusRelays {
            shared: self.shared.clone(),
        })
    }

    /// Stops every bus (pending software-timed pulses are switched off) and waits up to
    /// `deadline` for the threads.
    pub fn stop(&self, deadline: Duration) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wake threads waiting for jobs.
        self.shared
            .common
            .routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let running: Vec<Running> = self.running().drain(..).collect();
        let end = Instant::now() + deadline;
        for r in running {
            drop(r.tx);
            while !r.thread.is_finished() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
            if r.thread.is_finished() {
                let _ = r.thread.join();
            } else {
                tracing::warn!(bus = %r.cfg.id, "bus thread did not stop in time");
            }
        }
    }
}

/// [`Relays`] over the buses: the cloud's `unlock` (entries) and `relay` commands.
struct BusRelays {
    shared: Arc<Shared>,
}

impl Relays for BusRelays {
    fn online(&self, device: &str) -> Online {
        let known = self
            .shared
            .common
            .routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(device);
        match (known, self.shared.is_online(device)) {
            (false, _) => Online::Unknown,
            (true, Some(true)) => Online::Yes,
            (true, _) => Online::No,
        }
    }

    fn execute(&self, device: &str, channel: u16, op: RelayOp) -> Execution {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job = Job {
            device: device.to_string(),
            channel,
            op,
            // Past this the caller has been told "no answer": the bus must not run it later.
            deadline: Some(Instant::now() + RELAY_REPLY_TIMEOUT - Duration::from_millis(250)),
            reply: Some(tx),
        };
        if !self.shared.send(job) {
            return Execution::Failed(format!("device `{device}` is not on any bus"));
        }
        match rx.recv_timeout(RELAY_REPLY_TIMEOUT) {
            Ok(Ok(detail)) => {
                match op {
                    RelayOp::Pulse { ms } => self.shared.released_by_relay(device, channel, ms),
                    RelayOp::On => self.shared.released_by_relay(device, channel, 3_600_000),
                    RelayOp::Off => self.shared.released_by_relay(device, channel, 0),
                }
                Execution::Done(detail)
            }
            Ok(Err(e)) => Execution::Failed(e),
            // The bus thread ended with the job unanswered (stopped by a reload or the daemon's
            // stop between the job's routing and its run).
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Execution::Failed(format!("device `{device}`: {}", self.shared.stop_reason()))
            }
            Err(_) => Execution::Failed(format!(
                "no answer from the bus within {} s",
                RELAY_REPLY_TIMEOUT.as_secs()
            )),
        }
    }
}

/// Answers a job (if someone waits) and records a failure as `device_error` when nobody does.
pub(crate) fn answer(shared: &Shared, job: Job, result: Result<String, String>) {
    match job.reply {
        Some(tx) => {
            let _ = tx.send(result);
        }
        None => {
            if let Err(e) = &result {
                shared.record(
                    EventKind::DeviceError,
                    json!({"device": job.device, "channel": job.channel, "error": e}),
                );
            }
        }
    }
}

/// The serial settings of a bus: 8 data bits, the given parity, 1 stop bit, no flow control.
/// OSDP opens it blocking with a zero timeout (LibOSDP polls); Modbus opens it async.
pub fn port_builder(
    path: &std::path::Path,
    baud: u32,
    parity: profile::Parity,
    timeout: Duration,
) -> tokio_serial::SerialPortBuilder {
    let p = match parity {
        profile::Parity::None => tokio_serial::Parity::None,
        profile::Parity::Even => tokio_serial::Parity::Even,
        profile::Parity::Odd => tokio_serial::Parity::Odd,
    };
    tokio_serial::new(path.to_string_lossy(), baud)
        .data_bits(tokio_serial::DataBits::Eight)
        .parity(p)
        .stop_bits(tokio_serial::StopBits::One)
        .flow_control(tokio_serial::FlowControl::None)
        .timeout(timeout)
}

/// Port state shared by both bus kinds: records `bus_disconnected` once per outage and
/// `bus_connected` when the port is back, with capped exponential backoff between attempts.
/// A bus thread's watch over its port (outages recorded once, backoff) and its liveness beat
/// (`bus <id>`, ticked by [`PortWatch::alive`] at each turn and through the backoff waits).
pub(crate) struct PortWatch {
    beat: crate::liveness::Beat,
    bus: String,
    port: String,
    /// `Some(since)` while the port is away.
    down_since: Option<Instant>,
    backoff: Duration,
}

impl PortWatch {
    pub(crate) fn new(bus: &BusConfig) -> Self {
        PortWatch {
            beat: crate::liveness::register(format!("bus {}", bus.id)),
            bus: bus.id.clone(),
            port: bus.port.display().to_string(),
            down_since: None,
            backoff: Duration::from_millis(250),
        }
    }

    /// The bus thread made a turn of its loop.
    pub(crate) fn alive(&self) {
        self.beat.tick();
        crate::liveness::stall_if_asked(&self.beat);
    }

    /// The port opened.
    pub(crate) fn up(&mut self, shared: &Shared) {
        if let Some(since) = self.down_since.take() {
            tracing::info!(bus = %self.bus, port = %self.port, "serial port is back");
            shared.record(
                EventKind::BusConnected,
                json!({"bus": self.bus, "port": self.port,
                       "down_s": since.elapsed().as_secs()}),
            );
        }
        self.backoff = Duration::from_millis(250);
    }

    /// The port failed to open or broke: records the outage once, then waits the backoff.
    /// True when the daemon is stopping.
    pub(crate) fn down(&mut self, shared: &Shared, error: &str) -> bool {
        if self.down_since.is_none() {
            tracing::warn!(bus = %self.bus, port = %self.port, error, "serial port unavailable");
            shared.record(
                EventKind::BusDisconnected,
                json!({"bus": self.bus, "port": self.port, "error": error}),
            );
            self.down_since = Some(Instant::now());
        }
        let end = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
        loop {
            self.beat.tick();
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return shared.stopping();
            }
            if shared.sleep(left.min(Duration::from_secs(1))) {
                return true;
            }
        }
    }
}
