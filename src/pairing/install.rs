//! Install mode as a state: [`Pairing`] holds whether it is active and until when (a deadline on
//! the monotonic clock; the wall-clock `until` is only for people), who started it, the
//! candidates the drivers reported (deduplicated by id, at most [`MAX_CANDIDATES`]) and the scan
//! progress. It implements [`Scan`] for the drivers.
//!
//! - Started by the signed `install_mode` command, the local control socket, or (tests, bench)
//!   [`Pairing::start_for`]; `install_mode_started` is flushed before the state says active.
//! - Ends at its deadline ([`Pairing::run`] is the timer), on `stop`, or at daemon stop
//!   (`install_mode_ended` with `reason` `expired`, `stopped`, `shutdown`); it is never resumed
//!   after a restart (it lives in memory only). Candidates not adopted are forgotten then.
//! - A candidate is published (`pairing/discovered`, retained) only after its
//!   `device_discovered` event is flushed: the drivers' calls never block, the recording is done
//!   by [`Pairing::run`].
//! - The cloud link publishes [`Pairing::documents`] retained on `pairing/state` and
//!   `pairing/discovered` when [`Pairing::take_changed`] says so, and after every reconnect.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::registry::InUse;
use super::{Candidate, Provisioner, Registered, Scan, ScanOptions};
use crate::events::EventKind;
use crate::store::Store;

/// Candidates held at most per install mode; more are counted as `dropped`.
pub const MAX_CANDIDATES: usize = 64;
/// Scan sources (bus@baud, BLE) whose progress is kept at most.
pub const MAX_SOURCES: usize = 32;
/// Largest `identity` kept for a candidate, as JSON bytes (a larger one is replaced by a marker).
pub const MAX_IDENTITY_BYTES: usize = 1024;
/// Longest candidate id accepted from a driver.
pub const MAX_CANDIDATE_ID: usize = 128;
/// Bounds of install mode, in minutes (the same as the signed command's).
pub const MINUTES: std::ops::RangeInclusive<u32> = 1..=240;

/// Why install mode ended (`install_mode_ended` `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Expired,
    Stopped,
    Shutdown,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Expired => "expired",
            EndReason::Stopped => "stopped",
            EndReason::Shutdown => "shutdown",
        }
    }
}

/// Why an installer's request was not carried out: [`PairReason::as_str`] is the stable
/// `reason` of a command result or a control-socket answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairReason {
    /// Install mode is not active (adoption needs it).
    NotInInstallMode,
    /// No candidate of that id (never seen, forgotten, or not yet recorded).
    UnknownCandidate,
    /// The candidate is adopted already, or being adopted.
    AlreadyAdopted,
    /// The device id, bus address or MAC is used by the config or the registry.
    InUse,
    /// `remove`: no adopted device of that id; `replaces`: no adopted or configured device of
    /// that id (or a configured one already replaced).
    UnknownDevice,
    /// `remove` names a device of the TOML config: edit the config instead.
    Configured,
    /// The request does not fit the candidate (missing entry, bad id, …).
    BadSpec,
    /// Install mode cannot start (minutes out of range). Refused.
    BadArgs,
    /// No provisioner adopts that family on this gateway (failed).
    NoProvisioner,
    /// The driver could not provision the device (failed; nothing changed).
    Provisioning,
    /// The registry or an event could not be written (failed; nothing changed).
    Storage,
}

impl PairReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PairReason::NotInInstallMode => "not_in_install_mode",
            PairReason::UnknownCandidate => "unknown_candidate",
            PairReason::AlreadyAdopted => "already_adopted",
            PairReason::InUse => "in_use",
            PairReason::UnknownDevice => "unknown_device",
            PairReason::Configured => "configured",
            PairReason::BadSpec => "bad_spec",
            PairReason::BadArgs => "bad_args",
            PairReason::NoProvisioner => "no_provisioner",
            PairReason::Provisioning => "provisioning_failed",
            PairReason::Storage => "storage",
        }
    }

    /// `refused` (checked before anything was done) or `failed` (tried, undone).
    pub fn status(self) -> &'static str {
        match self {
            PairReason::NoProvisioner | PairReason::Provisioning | PairReason::Storage => "failed",
            _ => "refused",
        }
    }
}

/// A refused or failed installer request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} ({}): {detail}", .reason.status(), .reason.as_str())]
pub struct PairError {
    pub reason: PairReason,
    /// For people; never quotes a secret.
    pub detail: String,
}

impl PairError {
    pub fn new(reason: PairReason, detail: impl Into<String>) -> Self {
        PairError {
            reason,
            detail: detail.into(),
        }
    }
}

pub(super) struct Found {
    pub(super) candidate: Candidate,
    /// `device_discovered` is flushed: published, adoptable.
    pub(super) recorded: bool,
}

pub(super) struct Session {
    until: DateTime<Utc>,
    deadline: Instant,
    started_by: String,
    options: ScanOptions,
    pub(super) found: BTreeMap<String, Found>,
    progress: BTreeMap<String, (u32, u32)>,
    dropped: u64,
    pub(super) adopted: u32,
}

pub(super) struct Inner {
    pub(super) session: Option<Session>,
    /// Adoptions under way: candidate id → the device id, address and MAC it will use (so two
    /// adoptions at once cannot take the same ones).
    pub(super) adopting: HashMap<String, InUse>,
    /// The store's registry, as last written.
    pub(super) registry: Vec<Registered>,
    dirty: bool,
}

impl Inner {
    /// The session, while its deadline has not passed.
    pub(super) fn live(&mut self) -> Option<&mut Session> {
        self.session
            .as_mut()
            .filter(|s| s.deadline > Instant::now())
    }
    pub(super) fn touch(&mut self) {
        self.dirty = true;
    }
}

/// Install mode, the candidates, and the registry of adopted devices (see the module docs).
pub struct Pairing {
    pub(super) inner: Mutex<Inner>,
    pub(super) store: Arc<Store>,
    pub(super) provisioners: std::sync::RwLock<Vec<Arc<dyn Provisioner>>>,
    /// The config's devices (replaced by a reload: [`ReloadCheck`]).
    configured: std::sync::RwLock<Vec<InUse>>,
    changed: Notify,
    timer: Notify,
    found_tx: tokio::sync::mpsc::Sender<String>,
    found_rx: Mutex<Option<tokio::sync::mpsc::Receiver<String>>>,
    pub(super) rt: Option<tokio::runtime::Handle>,
}

impl Pairing {
    /// Reads the registry, checks it against the configured devices (a conflict is an error
    /// naming both places: the daemon does not start; a configured device an adopted one
    /// replaces is left out, with a warning), and hands each provisioner the adopted devices of
    /// its families.
    pub fn open(
        store: Arc<Store>,
        configured: Vec<InUse>,
        provisioners: Vec<Arc<dyn Provisioner>>,
    ) -> anyhow::Result<Arc<Pairing>> {
        let registry = store.registry_list()?;
        super::registry::merge(&configured, &registry).map_err(|e| {
            anyhow::anyhow!("the registry of adopted devices conflicts with the config: {e}")
        })?;
        for w in super::registry::replaced_warnings(&configured, &registry) {
            tracing::warn!("{w}");
        }
        let (found_tx, found_rx) = tokio::sync::mpsc::channel(MAX_CANDIDATES);
        let p = Arc::new(Pairing {
            inner: Mutex::new(Inner {
                session: None,
                adopting: HashMap::new(),
                registry,
                dirty: true,
            }),
            store,
            provisioners: std::sync::RwLock::new(Vec::new()),
            configured: std::sync::RwLock::new(configured),
            changed: Notify::new(),
            timer: Notify::new(),
            found_tx,
            found_rx: Mutex::new(Some(found_rx)),
            rt: tokio::runtime::Handle::try_current().ok(),
        });
        for prov in provisioners {
            p.register(prov)
                .map_err(|e| anyhow::anyhow!("starting the adopted devices: {e}"))?;
        }
        Ok(p)
    }

    /// Adds a driver's provisioner (a driver started after [`Pairing::open`], which checked the
    /// registry against the config before anything started) and hands it the adopted devices of
    /// its families.
    pub fn register(&self, prov: Arc<dyn Provisioner>) -> Result<(), String> {
        self.run_provisioner(prov.as_ref())?;
        self.provisioners
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(prov);
        Ok(())
    }

    /// The config's devices, as of the last start or reload.
    pub(super) fn configured(&self) -> Vec<InUse> {
        self.configured
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn notify(&self) {
        self.changed.notify_one();
    }

    /// Hands `prov` the full set of adopted devices of its families.
    pub(super) fn run_provisioner(&self, prov: &dyn Provisioner) -> Result<(), String> {
        let mine: Vec<Registered> = self
            .lock()
            .registry
            .iter()
            .filter(|r| prov.families().contains(&r.family))
            .cloned()
            .collect();
        prov.run(&mine)
    }

    /// The adopted devices.
    pub fn registered(&self) -> Vec<Registered> {
        self.lock().registry.clone()
    }

    /// Starts install mode for `minutes` (1 to 240), or moves the end of the running one.
    /// `by` is `command:<id>` or `local:<user>`. Blocking (a flush). Returns the end time.
    pub fn start(
        &self,
        minutes: u32,
        by: &str,
        options: ScanOptions,
    ) -> Result<DateTime<Utc>, PairError> {
        if !MINUTES.contains(&minutes) {
            return Err(PairError::new(
                PairReason::BadArgs,
                format!(
                    "minutes must be from {} to {} (got {minutes})",
                    MINUTES.start(),
                    MINUTES.end()
                ),
            ));
        }
        self.start_for(Duration::from_secs(u64::from(minutes) * 60), by, options)
    }

    /// [`Pairing::start`] for any duration (tests and the bench; the installer's paths take
    /// minutes).
    pub fn start_for(
        &self,
        length: Duration,
        by: &str,
        options: ScanOptions,
    ) -> Result<DateTime<Utc>, PairError> {
        // One that ran out but whose timer has not fired yet ends first (`expired`).
        self.expire_if_due();
        let until = chrono::Duration::from_std(length)
            .ok()
            .and_then(|d| Utc::now().checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let running = self.lock().live().is_some();
        // Durable before visible: the event is on disk before any driver scans.
        self.store
            .record_flushed(
                EventKind::InstallModeStarted,
                json!({"until": until, "started_by": by, "seconds": length.as_secs(),
                       "extended": running}),
            )
            .map_err(|e| {
                PairError::new(
                    PairReason::Storage,
                    format!("install mode not started: recording it failed: {e:#}"),
                )
            })?;
        let deadline = Instant::now()
            .checked_add(length)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
        {
            let mut g = self.lock();
            match g.live() {
                Some(s) => {
                    s.until = until;
                    s.deadline = deadline;
                    s.started_by = by.to_string();
                    s.options = options;
                }
                None => {
                    g.session = Some(Session {
                        until,
                        deadline,
                        started_by: by.to_string(),
                        options,
                        found: BTreeMap::new(),
                        progress: BTreeMap::new(),
                        dropped: 0,
                        adopted: 0,
                    })
                }
            }
            g.touch();
        }
        tracing::info!(until = %until.to_rfc3339(), started_by = by, "install mode started");
        self.timer.notify_one();
        self.notify();
        Ok(until)
    }

    /// Ends install mode (`stop`): returns whether it was active.
    pub fn stop(&self, by: &str) -> bool {
        self.end(EndReason::Stopped, Some(by))
    }

    /// Ends install mode for `reason`, forgetting the candidates; records `install_mode_ended`
    /// (flushed). Returns whether it was active. Blocking.
    pub fn end(&self, reason: EndReason, by: Option<&str>) -> bool {
        let session = {
            let mut g = self.lock();
            let s = g.session.take();
            if s.is_some() {
                g.touch();
            }
            s
        };
        let Some(s) = session else { return false };
        self.notify();
        self.timer.notify_one();
        let mut payload = json!({
            "reason": reason.as_str(),
            "started_by": s.started_by,
            "candidates": s.found.len(),
            "adopted": s.adopted,
        });
        if let Some(by) = by {
            payload["stopped_by"] = json!(by);
        }
        tracing::info!(reason = reason.as_str(), "install mode ended");
        if let Err(e) = self
            .store
            .record_flushed(EventKind::InstallModeEnded, payload)
        {
            tracing::error!("recording install_mode_ended: {e:#}");
        }
        true
    }

    /// Ends install mode if its deadline has passed (`expired`). Blocking.
    pub fn expire_if_due(&self) -> bool {
        let due = self
            .lock()
            .session
            .as_ref()
            .is_some_and(|s| s.deadline <= Instant::now());
        due && self.end(EndReason::Expired, None)
    }

    fn deadline(&self) -> Option<Instant> {
        self.lock().session.as_ref().map(|s| s.deadline)
    }

    /// The timer and the recorder: ends install mode at its deadline, records each new
    /// candidate's `device_discovered` (then it is published), and ends install mode with
    /// reason `shutdown` when `stop` is cancelled.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let Some(mut found) = self
            .found_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        loop {
            let deadline = self.deadline();
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.timer.notified() => {}
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let me = self.clone();
                    let _ = tokio::task::spawn_blocking(move || me.expire_if_due()).await;
                }
                Some(id) = found.recv() => {
                    let me = self.clone();
                    let _ = tokio::task::spawn_blocking(move || me.record_found(&id)).await;
                }
            }
        }
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.end(EndReason::Shutdown, None)).await;
    }

    pub(super) fn record_found(&self, id: &str) {
        let candidate = {
            let mut g = self.lock();
            match g.live().and_then(|s| s.found.get(id)) {
                Some(f) if !f.recorded => f.candidate.clone(),
                _ => return,
            }
        };
        match self
            .store
            .record_flushed(EventKind::DeviceDiscovered, json!(candidate))
        {
            Ok(_) => {
                let mut g = self.lock();
                if let Some(f) = g.live().and_then(|s| s.found.get_mut(id)) {
                    f.recorded = true;
                }
                g.touch();
                drop(g);
                self.notify();
            }
            Err(e) => tracing::warn!(candidate = id, "recording device_discovered: {e:#}"),
        }
    }

    /// Waits until the published documents changed.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// The documents to publish if they changed since the last call (and clears the mark).
    pub fn take_changed(&self) -> Option<(Value, Value)> {
        let mut g = self.lock();
        if !std::mem::take(&mut g.dirty) {
            return None;
        }
        Some(documents(&mut g))
    }

    /// Marks the documents changed (a publish that did not go out).
    pub fn mark_changed(&self) {
        self.lock().touch();
    }

    /// `pairing/state` and `pairing/discovered`, now.
    pub fn documents(&self) -> (Value, Value) {
        documents(&mut self.lock())
    }

    /// The candidates (recorded ones), for the control socket.
    pub fn candidates(&self) -> Vec<Candidate> {
        let mut g = self.lock();
        match g.live() {
            Some(s) => s
                .found
                .values()
                .filter(|f| f.recorded)
                .map(|f| f.candidate.clone())
                .collect(),
            None => Vec::new(),
        }
    }
}

fn documents(g: &mut Inner) -> (Value, Value) {
    let registered = g.registry.len();
    let Some(s) = g.live() else {
        return (
            json!({"active": false, "registered": registered}),
            json!({"active": false, "candidates": []}),
        );
    };
    let mut by_family = BTreeMap::<&str, u32>::new();
    let mut shown = Vec::new();
    for f in s.found.values().filter(|f| f.recorded) {
        *by_family.entry(f.candidate.family.as_str()).or_default() += 1;
        shown.push(f.candidate.clone());
    }
    let scans: Vec<Value> = s
        .progress
        .iter()
        .map(|(source, (done, total))| json!({"source": source, "done": done, "total": total}))
        .collect();
    (
        json!({
            "active": true,
            "until": s.until,
            "started_by": s.started_by,
            "candidates": {"total": shown.len(), "by_family": by_family},
            "dropped": s.dropped,
            "adopted": s.adopted,
            "scans": scans,
            "registered": registered,
        }),
        json!({"active": true, "candidates": shown}),
    )
}

/// `identity`, or a marker when it is larger than [`MAX_IDENTITY_BYTES`].
fn bounded_identity(v: Value) -> Value {
    match serde_json::to_vec(&v) {
        Ok(b) if b.len() <= MAX_IDENTITY_BYTES => v,
        Ok(b) => json!({"truncated": true, "bytes": b.len()}),
        Err(_) => Value::Null,
    }
}

impl Scan for Pairing {
    fn active(&self) -> Option<ScanOptions> {
        self.lock().live().map(|s| s.options.clone())
    }

    fn discovered(&self, mut candidate: Candidate) {
        if candidate.id.is_empty() || candidate.id.chars().count() > MAX_CANDIDATE_ID {
            return;
        }
        candidate.identity = bounded_identity(std::mem::take(&mut candidate.identity));
        // A configured device is never a candidate (a driver should not report one anyway); one
        // an adopted device replaces is not run, and its address is free.
        let running = super::registry::running(&self.configured(), &self.registered());
        let configured = running.iter().any(|c| {
            (c.bus.is_some() && c.bus == candidate.bus && c.address == candidate.address)
                || (c.mac.is_some()
                    && c.mac.as_deref()
                        == candidate
                            .mac
                            .as_ref()
                            .map(|m| m.to_ascii_uppercase())
                            .as_deref())
        });
        if configured {
            return;
        }
        let mut g = self.lock();
        if g.registry.iter().any(|r| r.candidate == candidate.id) {
            return;
        }
        let Some(s) = g.live() else { return };
        if let Some(f) = s.found.get_mut(&candidate.id) {
            let changed = f.candidate.identity != candidate.identity && f.recorded;
            f.candidate.last_seen = candidate.last_seen.max(f.candidate.last_seen);
            f.candidate.rssi = candidate.rssi.or(f.candidate.rssi);
            f.candidate.identity = candidate.identity;
            if changed {
                g.touch();
                drop(g);
                self.notify();
            }
            return;
        }
        if s.found.len() >= MAX_CANDIDATES {
            s.dropped += 1;
            if s.dropped == 1 {
                tracing::warn!(
                    max = MAX_CANDIDATES,
                    "too many candidates: more are dropped"
                );
            }
            g.touch();
            return;
        }
        let id = candidate.id.clone();
        s.found.insert(
            id.clone(),
            Found {
                candidate,
                recorded: false,
            },
        );
        drop(g);
        // At most MAX_CANDIDATES ids per install mode go through: the channel never fills.
        let _ = self.found_tx.try_send(id);
    }

    fn progress(&self, source: &str, done: u32, total: u32) {
        let mut g = self.lock();
        let Some(s) = g.live() else { return };
        if !s.progress.contains_key(source) && s.progress.len() >= MAX_SOURCES {
            return;
        }
        let before = s.progress.insert(source.to_string(), (done, total));
        // Published at the start, every 16 probes and at the end; `pair list` reads it live.
        if before.is_none() || done == total || done % 16 == 0 {
            g.touch();
            drop(g);
            self.notify();
        }
    }
}

/// A configuration reload ([`crate::reload::Part`]): a new config that conflicts with an adopted
/// device (same id, bus and address, or MAC) is refused whole, naming both places; an accepted
/// one becomes what adoptions are checked against (a device in it that an adopted one replaces
/// is left out again, with the start's warning).
pub struct ReloadCheck(pub Arc<Pairing>);

impl crate::reload::Part for ReloadCheck {
    fn check(
        &self,
        _old: &crate::config::Config,
        new: &crate::config::Config,
    ) -> anyhow::Result<()> {
        super::registry::merge(&super::registry::configured(new), &self.0.registered()).map_err(
            |e| anyhow::anyhow!("the config conflicts with the registry of adopted devices: {e}"),
        )
    }

    fn apply(
        &self,
        _old: &crate::config::Config,
        new: &crate::config::Config,
    ) -> anyhow::Result<Vec<String>> {
        let configured = super::registry::configured(new);
        for w in super::registry::replaced_warnings(&configured, &self.0.registered()) {
            tracing::warn!("{w}");
        }
        *self.0.configured.write().unwrap_or_else(|e| e.into_inner()) = configured;
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod reload_tests {
    use super::*;
    use crate::config::Config;
    use crate::pairing::Family;
    use crate::reload::Part as _;

    fn config(dir: &std::path::Path, address: u8) -> Config {
        let text = format!(
            "[site]\nid = \"s\"\ngateway_id = \"gw\"\n[storage]\ndata_dir = \"data\"\n\
             [[bus]]\nid = \"bus-2\"\nport = \"/dev/null\"\nprotocol = \"modbus\"\n\
             [[bus.device]]\nid = \"climate\"\nprofile = \"xy-md02\"\naddress = {address}\n"
        );
        Config::parse(&dir.join("g.toml"), &text).unwrap()
    }

    #[test]
    fn a_reload_taking_an_adopted_devices_address_is_refused_and_an_accepted_one_counts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("db"), 1000).unwrap());
        store
            .registry_put(&Registered {
                id: "board".into(),
                candidate: "modbus:bus-2:7".into(),
                family: Family::ModbusDevice,
                bus: Some("bus-2".into()),
                settings: json!({"id": "board", "profile": "xy-md02", "address": 7}),
                adopted_at: Utc::now(),
                adopted_by: "local:root".into(),
                replaces: None,
            })
            .unwrap();
        let old = config(dir.path(), 4);
        let p = Pairing::open(store, super::super::registry::configured(&old), Vec::new()).unwrap();
        let check = ReloadCheck(p.clone());
        let e = check
            .check(&old, &config(dir.path(), 7))
            .unwrap_err()
            .to_string();
        assert!(e.contains("registry of adopted devices"), "{e}");
        assert!(p.configured().iter().any(|c| c.address == Some(4)));
        let fine = config(dir.path(), 5);
        check.check(&old, &fine).unwrap();
        check.apply(&old, &fine).unwrap();
        let now: Vec<_> = p.configured().iter().map(|c| c.address).collect();
        assert_eq!(now, vec![Some(5)]);
    }
}
