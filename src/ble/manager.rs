//! The BLE manager: what the gateway does with what it hears and the locks it drives.
//!
//! - **Adverts** ([`Manager::on_advert`]) are handled synchronously on one thread, in arrival
//!   order: the device is looked up by MAC in the site database (`devices[]`), its last-seen
//!   time, signal and state are updated, and events are recorded only for *changes* (online
//!   again, lock state, battery low, a new BTHome packet's motion/door/button, a reading that
//!   moved). A fob heard near a gate goes to the access decision for the configured entries.
//!   A sleeping padlock that advertises again is reported as awake (the cloud link then runs the
//!   commands that waited for it).
//! - **Availability** ([`Manager::check_availability`]): a device silent longer than its
//!   profile's `offline_after` is reported offline (`device_offline` and its retained state).
//! - **Lock operations** ([`Manager::operate`]): per device one at a time, at most
//!   `max_connections` links at once; connect, read the session, get the command packets (from
//!   the cloud for an online operation; made on the gateway from the offline key for an offline
//!   unlock), write them one by one, each after the previous one's success notification, and
//!   upload server packets. Every result code the lock sends becomes a `lock_result` event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::config::BleConfig;
use super::noke::{self, AppResult, Notification, PACKET_LEN};
use super::profile::{self, Profile};
use super::transport::{BleError, Link, Radio, Seen};
use super::{bthome, rpc::CloudRpc};
use crate::access::{AccessEngine, Attempt};
use crate::cloud::commands::{Execution, Online, RelayOp, Relays, UnitAction, UnitControllers};
use crate::devstate::DeviceStates;
use crate::events::EventKind;
use crate::policy::{Direction, Presented, Request, Target};
use crate::site::Tables;
use crate::store::Store;
use crate::sync::{Device, DeviceKind};

/// A safety net only: every step of a lock operation is bounded on its own (connection
/// attempts, the cloud's answer, each packet's answer, the notifications a lock may send).
const OPERATION_TIMEOUT: Duration = Duration::from_secs(300);
/// Notifications that are not the awaited answer (server packets, unreadable ones) accepted per
/// packet written, and after the last one: a device that keeps talking is cut off.
const MAX_EXTRA_NOTIFICATIONS: usize = 16;
/// After the last answer, the link stays up this long for the lock's server packets.
const AFTER_LAST_PACKET: Duration = Duration::from_millis(300);
/// Further connection attempts after a failed one (a sleeping lock's is not retried: it
/// waits for the lock to wake).
const CONNECT_RETRIES: u32 = 2;
/// How long the lock has to answer one packet.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(3);
/// `last_seen` in a device's retained state is refreshed at most this often.
const LAST_SEEN_EVERY: Duration = Duration::from_secs(60);
/// How often an advertising sleeper is reported awake.
const WAKE_EVERY: Duration = Duration::from_secs(1);
/// A refused fob is decided again at most this often.
const DENIED_FOB_REPEAT: Duration = Duration::from_secs(60);
/// Tracked fobs not on the site's list (bounded memory against a crowd of strangers' fobs).
const MAX_FOB_MEMORY: usize = 4096;

/// What the manager knows of one device of the site.
#[derive(Debug, Default)]
struct Live {
    last_seen: Option<Instant>,
    last_seen_published: Option<Instant>,
    online: Option<bool>,
    locked: Option<bool>,
    battery_low: bool,
    packet_id: Option<u8>,
    counter: Option<u32>,
    readings: HashMap<&'static str, (f64, Instant)>,
    motion: Option<bool>,
    door_open: Option<bool>,
    last_wake: Option<Instant>,
    /// Advertised hardware code and firmware, as last put in the device's state.
    identity: Option<(String, Option<(u8, u8)>)>,
}

/// The site's BLE devices by MAC, rebuilt when the site database changes.
struct Index {
    tables: Option<Arc<Tables>>,
    by_mac: HashMap<String, Arc<Device>>,
}

/// Counters, for logs and the benchmark.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub adverts: u64,
    pub unknown: u64,
    pub malformed: u64,
    pub events: u64,
}

pub struct Manager<R: Radio> {
    me: std::sync::Weak<Manager<R>>,
    radio: R,
    cfg: BleConfig,
    store: Arc<Store>,
    engine: Arc<AccessEngine>,
    states: Arc<DeviceStates>,
    rpc: Arc<CloudRpc>,
    relays: Mutex<Option<Arc<dyn Relays>>>,
    wakes: Mutex<Option<tokio::sync::mpsc::Sender<String>>>,
    live: Mutex<HashMap<String, Live>>,
    index: Mutex<Index>,
    fobs: Mutex<HashMap<(String, String), Instant>>,
    serial: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pool: tokio::sync::Semaphore,
    counters: Mutex<Counters>,
    handle: tokio::runtime::Handle,
    started: Instant,
}

/// Why a lock did not take a packet.
#[derive(Debug)]
enum LockError {
    /// It shut down (went to sleep) instead of answering.
    Sleep,
    Other(String),
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Sleep => f.write_str("the lock went to sleep (shutdown)"),
            LockError::Other(e) => f.write_str(e),
        }
    }
}

/// An online operation's packets, or why there are none.
enum Packets {
    Online(Vec<[u8; PACKET_LEN]>),
    Offline([u8; PACKET_LEN]),
}

impl<R: Radio> Manager<R> {
    /// Needs a tokio runtime (its handle runs lock operations for blocking callers).
    pub fn new(
        radio: R,
        cfg: BleConfig,
        engine: Arc<AccessEngine>,
        states: Arc<DeviceStates>,
        rpc: Arc<CloudRpc>,
    ) -> Arc<Self> {
        let max = cfg.max_connections;
        Arc::new_cyclic(|me| Manager {
            me: me.clone(),
            radio,
            cfg,
            store: engine.store().clone(),
            engine,
            states,
            rpc,
            relays: Mutex::new(None),
            wakes: Mutex::new(None),
            live: Mutex::new(HashMap::new()),
            index: Mutex::new(Index {
                tables: None,
                by_mac: HashMap::new(),
            }),
            fobs: Mutex::new(HashMap::new()),
            serial: Mutex::new(HashMap::new()),
            pool: tokio::sync::Semaphore::new(max),
            counters: Mutex::new(Counters::default()),
            handle: tokio::runtime::Handle::current(),
            started: Instant::now(),
        })
    }

    pub fn radio(&self) -> &R {
        &self.radio
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Relay outputs for fob grants (the entries' relays).
    pub fn set_relays(&self, relays: Arc<dyn Relays>) {
        *lock(&self.relays) = Some(relays);
    }

    /// Where to report that a sleeping device woke up (device ids).
    pub fn set_wakes(&self, tx: tokio::sync::mpsc::Sender<String>) {
        *lock(&self.wakes) = Some(tx);
    }

    /// Links open now (operations in progress, or draining the lock's last server packets).
    pub fn links_open(&self) -> usize {
        self.cfg
            .max_connections
            .saturating_sub(self.pool.available_permits())
    }

    pub fn counters(&self) -> Counters {
        *lock(&self.counters)
    }

    /// Appends an event (flushed). On a runtime worker (a lock operation) the flush runs in
    /// `block_in_place`, so the worker's other tasks (the cloud link) move elsewhere meanwhile.
    fn record(&self, kind: EventKind, payload: Value) {
        lock(&self.counters).events += 1;
        let write = || crate::daemon::record(&self.store, kind, payload);
        let in_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let r = if in_worker {
            tokio::task::block_in_place(write)
        } else {
            write()
        };
        if let Err(e) = r {
            tracing::error!(kind = kind.as_str(), "could not record an event: {e:#}");
        }
    }

    /// The site device with this MAC (upper case), from an index rebuilt when the site changes.
    fn device_by_mac(&self, mac: &str) -> Option<Arc<Device>> {
        let tables = self.store.site().tables.clone();
        let mut idx = lock(&self.index);
        if !idx.tables.as_ref().is_some_and(|t| Arc::ptr_eq(t, &tables)) {
            idx.by_mac = tables
                .devices
                .values()
                .map(|d| (d.mac.to_ascii_uppercase(), Arc::new(d.clone())))
                .collect();
            idx.tables = Some(tables);
        }
        idx.by_mac.get(mac).cloned()
    }

    fn device(&self, id: &str) -> Option<Device> {
        self.store.site().tables.devices.get(id).cloned()
    }

    // -----------------------------------------------------------------------------------------
    // Adverts

    /// Handles one advertisement. Blocking (events are flushed): call it from the advert thread.
    pub fn on_advert(&self, seen: &Seen, now: Instant, wall: DateTime<Utc>) {
        lock(&self.counters).adverts += 1;
        let mac = seen.mac.to_ascii_uppercase();
        let Some(dev) = self.device_by_mac(&mac) else {
            self.on_unknown(&mac, seen, now, wall);
            return;
        };
        let prof = profile::for_kind(dev.kind);
        let (was_online, woke, publish_seen) = {
            let mut live = lock(&self.live);
            let l = live.entry(dev.id.clone()).or_default();
            // While a sleeping lock advertises, say so about once a second: commands that
            // waited for it (or were queued while it was falling asleep) run now.
            let woke = prof.sleeps && l.last_wake.is_none_or(|t| now - t >= WAKE_EVERY);
            if woke {
                l.last_wake = Some(now);
            }
            l.last_seen = Some(now);
            let publish_seen = l
                .last_seen_published
                .is_none_or(|t| now - t >= LAST_SEEN_EVERY);
            if publish_seen {
                l.last_seen_published = Some(now);
            }
            let was = l.online.replace(true);
            (was, woke, publish_seen)
        };
        // The state first, then the event (as for offline): whoever sees the event finds the
        // state already saying so.
        if publish_seen || was_online != Some(true) {
            self.states.set(
                &dev.id,
                &[
                    ("online", json!(true)),
                    ("kind", json!(dev.kind)),
                    ("last_seen", json!(wall)),
                    ("rssi", json!(seen.rssi)),
                ],
            );
        }
        if was_online != Some(true) {
            self.record(
                EventKind::DeviceOnline,
                json!({"device": dev.id, "mac": mac, "kind": dev.kind, "rssi": seen.rssi}),
            );
        }
        match dev.kind {
            DeviceKind::Padlock | DeviceKind::Controller => self.lock_advert(&dev, seen),
            DeviceKind::Sensor => self.sensor_advert(&dev, prof, seen, now, wall),
            DeviceKind::Fob => self.fob_seen(&fob_id(&mac), true, seen.rssi, now, wall),
        }
        if woke {
            tracing::debug!(device = %dev.id, "sleeping device advertises: awake");
            // Full (the link is away or busy): dropped; the lock says it again a second later.
            if let Some(tx) = lock(&self.wakes).as_ref() {
                let _ = tx.try_send(dev.id.clone());
            }
        }
    }

    fn on_unknown(&self, mac: &str, seen: &Seen, now: Instant, wall: DateTime<Utc>) {
        let advert = seen
            .name
            .as_deref()
            .and_then(|n| noke::parse_advert(n, first_manufacturer(seen), seen.rssi));
        match advert {
            Some(a) if a.hardware == noke::HardwareKind::Fob => {
                self.fob_seen(&fob_id(mac), false, seen.rssi, now, wall)
            }
            _ => lock(&self.counters).unknown += 1,
        }
    }

    fn lock_advert(&self, dev: &Device, seen: &Seen) {
        let Some(name) = seen.name.as_deref() else {
            return;
        };
        let Some(a) = noke::parse_advert(name, first_manufacturer(seen), seen.rssi) else {
            lock(&self.counters).malformed += 1;
            return;
        };
        let (new_identity, changed) = {
            let mut live = lock(&self.live);
            let l = live.entry(dev.id.clone()).or_default();
            let new_identity = l
                .identity
                .as_ref()
                .is_none_or(|(hw, fw)| *hw != a.hardware_code || *fw != a.firmware);
            if new_identity {
                l.identity = Some((a.hardware_code.clone(), a.firmware));
            }
            let changed = a.locked.is_some() && l.locked != a.locked;
            if changed {
                l.locked = a.locked;
            }
            (new_identity, changed)
        };
        if new_identity {
            let firmware = a.firmware.map(|(major, minor)| format!("{major}.{minor}"));
            self.states.set(
                &dev.id,
                &[
                    ("hardware", json!(a.hardware_code)),
                    ("firmware", json!(firmware)),
                ],
            );
        }
        let Some(locked) = a.locked else { return };
        if changed {
            self.states.set(&dev.id, &[("locked", json!(locked))]);
            self.record(
                EventKind::LockStateChanged,
                json!({"device": dev.id, "locked": locked, "state": a.lock_state}),
            );
        }
    }

    fn sensor_advert(
        &self,
        dev: &Device,
        prof: &Profile,
        seen: &Seen,
        now: Instant,
        wall: DateTime<Utc>,
    ) {
        let Some((_, data)) = seen
            .service_data
            .iter()
            .find(|(u, _)| u.eq_ignore_ascii_case(bthome::SERVICE_UUID))
        else {
            return;
        };
        let key = dev.key.as_deref().and_then(hex16);
        let Some(mac) = bthome::parse_mac(&dev.mac) else {
            return;
        };
        let r = match bthome::parse(data, key.as_ref(), mac) {
            Ok(r) => r,
            Err(e) => {
                lock(&self.counters).malformed += 1;
                tracing::debug!(device = %dev.id, "BTHome advert not read: {e}");
                return;
            }
        };
        if dev.key.is_some() && !r.encrypted {
            // A plain advert from a device that should encrypt: someone else's, or spoofed.
            lock(&self.counters).malformed += 1;
            return;
        }
        // New data only: a repeated packet id (plain) or a counter that does not advance
        // (encrypted: also refuses replays).
        let mut events: Vec<(EventKind, Value)> = Vec::new();
        let mut state: Vec<(&str, Value)> = Vec::new();
        {
            let mut live = lock(&self.live);
            let l = live.entry(dev.id.clone()).or_default();
            if let Some(c) = r.counter {
                if !bthome::counter_advances(l.counter, c) {
                    return;
                }
                l.counter = Some(c);
            } else if let Some(p) = r.packet_id {
                if l.packet_id == Some(p) {
                    return;
                }
                l.packet_id = Some(p);
            }
            if let Some(m) = r.motion {
                if m && (l.motion != Some(true) || r.trigger_based) {
                    events.push((
                        EventKind::Motion,
                        json!({"device": dev.id, "source": "ble"}),
                    ));
                }
                l.motion = Some(m);
                state.push(("motion", json!(m)));
            }
            if let Some(open) = r.door_open {
                if l.door_open != Some(open) {
                    let kind = if open {
                        EventKind::DoorOpened
                    } else {
                        EventKind::DoorClosed
                    };
                    events.push((kind, json!({"device": dev.id, "source": "ble"})));
                }
                l.door_open = Some(open);
                state.push(("door_open", json!(open)));
            }
            if let Some(b) = r.button
                && b != bthome::ButtonEvent::None
            {
                events.push((EventKind::Button, json!({"device": dev.id, "press": b})));
            }
            for (name, value, unit) in [
                ("temperature", r.temperature_c, "celsius"),
                ("humidity", r.humidity, "percent_rh"),
            ] {
                let Some(v) = value else { continue };
                state.push((name, json!(v)));
                let report = l.readings.get(name).is_none_or(|&(last, at)| {
                    (v - last).abs() >= prof.report_delta || now - at >= prof.report_every
                });
                if report {
                    l.readings.insert(name, (v, now));
                    events.push((
                        EventKind::SensorReading,
                        json!({"device": dev.id, "reading": name, "value": v, "unit": unit}),
                    ));
                }
            }
            if let Some(pct) = r.battery {
                state.push(("battery_percent", json!(pct)));
                let low = prof.low_battery_percent.is_some_and(|t| pct < t);
                if low && !l.battery_low {
                    events.push((
                        EventKind::BatteryLow,
                        json!({"device": dev.id, "battery_percent": pct}),
                    ));
                }
                l.battery_low = low;
            }
        }
        let _ = wall;
        if !state.is_empty() {
            self.states.set(&dev.id, &state);
        }
        for (k, p) in events {
            self.record(k, p);
        }
    }

    /// A fob heard near the gateway: one decision per fob and configured entry per
    /// `fob_repeat`; a grant pulses the entry's relay.
    fn fob_seen(
        &self,
        tracking_id: &str,
        listed: bool,
        rssi: Option<i16>,
        now: Instant,
        wall: DateTime<Utc>,
    ) {
        if self.cfg.fob_entries.is_empty() || rssi.is_some_and(|r| r < self.cfg.fob_min_rssi) {
            return;
        }
        // Only fobs the site knows (a device, a credential, a blacklist entry) are decided: the
        // gateway hears every fob that passes by, and anyone can advertise `FOB…` from random
        // addresses; each refusal would be a security event kept forever in the outbox.
        let known = listed || {
            let site = self.store.site();
            site.creds
                .get_by_value(&crate::site::CredValue::Fob(tracking_id.into()))
                .is_some()
                || site.tables.blacklisted_fobs.contains(tracking_id)
        };
        if !known {
            lock(&self.counters).unknown += 1;
            return;
        }
        for entry in &self.cfg.fob_entries {
            {
                let mut fobs = lock(&self.fobs);
                let key = (tracking_id.to_string(), entry.clone());
                if fobs.get(&key).is_some_and(|&next| now < next) {
                    continue;
                }
                if fobs.len() >= MAX_FOB_MEMORY {
                    fobs.retain(|_, next| now < *next);
                }
                if fobs.len() >= MAX_FOB_MEMORY {
                    continue;
                }
                fobs.insert(key, now + self.cfg.fob_repeat);
            }
            let attempt = Attempt {
                request: Request {
                    credential: Presented::Fob(tracking_id),
                    target: Target::Entry(entry),
                    direction: Direction::In,
                },
                device: None,
            };
            match self.engine.check(&attempt, wall) {
                Ok(d) if d.granted => {
                    tracing::info!(fob = tracking_id, entry, "BLE fob granted");
                    self.release(entry);
                }
                Ok(d) => {
                    tracing::info!(fob = tracking_id, entry, reason = %d.reason, "BLE fob denied");
                    // A refused fob lingering near the gate is decided again less often: each
                    // refusal is a security event that is never dropped from the outbox.
                    let next = now + self.cfg.fob_repeat.max(DENIED_FOB_REPEAT);
                    lock(&self.fobs).insert((tracking_id.to_string(), entry.clone()), next);
                }
                Err(e) => tracing::error!("fob decision not recorded: {e:#}"),
            }
        }
    }

    /// Pulses an entry's relay (on a pool thread: a relay board may take a moment).
    fn release(&self, entry: &str) {
        let relay = self
            .store
            .site()
            .tables
            .entries
            .get(entry)
            .and_then(|e| e.relay.clone());
        let relays = lock(&self.relays).clone();
        let (Some(relay), Some(relays)) = (relay, relays) else {
            self.record(
                EventKind::DeviceError,
                json!({"entry": entry, "error": "a BLE fob was granted but the entry has no relay the gateway drives"}),
            );
            return;
        };
        let store = self.store.clone();
        let entry = entry.to_string();
        self.handle.spawn_blocking(move || {
            let r = relays.execute(
                &relay.device,
                relay.channel,
                RelayOp::Pulse { ms: relay.pulse_ms },
            );
            if let Execution::Failed(e) = r {
                let _ = crate::daemon::record(
                    &store,
                    EventKind::DeviceError,
                    json!({"device": relay.device, "entry": entry, "error": e}),
                );
            }
        });
    }

    /// Reports devices silent longer than their profile allows as offline. Call it every
    /// second or so.
    pub fn check_availability(&self, now: Instant) {
        let tables = self.store.site().tables.clone();
        let mut gone = Vec::new();
        {
            let mut live = lock(&self.live);
            // A device not heard since the gateway started counts as silent since then.
            for (id, dev) in &tables.devices {
                if !live.contains_key(id) {
                    let after = dev
                        .offline_after_s
                        .map(Duration::from_secs)
                        .or(profile::for_kind(dev.kind).offline_after);
                    if after.is_some_and(|a| now.saturating_duration_since(self.started) > a) {
                        live.insert(
                            id.clone(),
                            Live {
                                last_seen: Some(self.started),
                                online: Some(true),
                                ..Live::default()
                            },
                        );
                    }
                }
            }
            for (id, l) in live.iter_mut() {
                let Some(dev) = tables.devices.get(id) else {
                    continue;
                };
                let after = dev
                    .offline_after_s
                    .map(Duration::from_secs)
                    .or(profile::for_kind(dev.kind).offline_after);
                if let (Some(after), Some(seen), Some(true)) = (after, l.last_seen, l.online)
                    && now.saturating_duration_since(seen) > after
                {
                    l.online = Some(false);
                    gone.push((id.clone(), now.saturating_duration_since(seen).as_secs()));
                }
            }
        }
        for (id, silent) in gone {
            self.states.set(&id, &[("online", json!(false))]);
            self.record(
                EventKind::DeviceOffline,
                json!({"device": id, "silent_s": silent, "source": "ble"}),
            );
        }
    }

    // -----------------------------------------------------------------------------------------
    // Lock operations

    /// Whether a padlock or unit controller can take a command now.
    pub fn online(&self, device: &str) -> Online {
        let Some(dev) = self.device(device) else {
            return Online::Unknown;
        };
        if !matches!(dev.kind, DeviceKind::Padlock | DeviceKind::Controller) {
            return Online::Unknown;
        }
        let prof = profile::for_kind(dev.kind);
        let (last, reported_offline) = lock(&self.live)
            .get(device)
            .map_or((None, false), |l| (l.last_seen, l.online == Some(false)));
        if reported_offline && !prof.sleeps {
            return Online::No;
        }
        let now = Instant::now();
        if prof.sleeps {
            match last {
                Some(t) if now - t <= prof.awake_for => Online::Yes,
                _ => Online::Asleep,
            }
        } else {
            let after = dev
                .offline_after_s
                .map(Duration::from_secs)
                .or(prof.offline_after)
                .unwrap_or(Duration::MAX);
            match last {
                Some(t) if now - t <= after => Online::Yes,
                _ => Online::No,
            }
        }
    }

    /// Carries out an action on a padlock or unit controller, bounded by `OPERATION_TIMEOUT`.
    /// `offline_only`: do not ask the cloud (an installer's test; the cloud is known to be
    /// away). The outcome is returned as soon as the lock has answered the last packet; the
    /// link then stays up a moment for the server packets the lock sends after it (uploaded),
    /// and the device is not used by anything else until it is closed.
    pub async fn operate(&self, device: &str, action: UnitAction, offline_only: bool) -> Execution {
        let Some(me) = self.me.upgrade() else {
            return Execution::Failed("the BLE module is stopping".into());
        };
        let (tx, rx) = oneshot::channel();
        let device = device.to_string();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                OPERATION_TIMEOUT,
                me.operate_inner(&device, action, offline_only, tx),
            )
            .await;
        });
        match rx.await {
            Ok(e) => e,
            Err(_) => Execution::Failed(format!(
                "no outcome within {} s",
                OPERATION_TIMEOUT.as_secs()
            )),
        }
    }

    async fn operate_inner(
        &self,
        id: &str,
        action: UnitAction,
        offline_only: bool,
        outcome: oneshot::Sender<Execution>,
    ) {
        let Some(dev) = self.device(id) else {
            let _ = outcome.send(Execution::Failed(format!(
                "no device `{id}` in the site database"
            )));
            return;
        };
        let prof = profile::for_kind(dev.kind);
        let serial = lock(&self.serial)
            .entry(id.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone();
        let _one_at_a_time = serial.lock().await;
        let Ok(_permit) = self.pool.acquire().await else {
            let _ = outcome.send(Execution::Failed("the BLE module is stopping".into()));
            return;
        };
        let mac = dev.mac.to_ascii_uppercase();
        let mut retries = 0;
        let mut link = match loop {
            match self.radio.connect(&mac, prof.connect_timeout).await {
                // A busy adapter or a radio hiccup: again, after a pause that doubles.
                Err(BleError::Timeout(_) | BleError::Disconnected(_) | BleError::Adapter(_))
                    if retries < CONNECT_RETRIES =>
                {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(250) * (1 << retries)).await;
                }
                Err(BleError::Unreachable(_)) if !prof.sleeps && retries < CONNECT_RETRIES => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(250) * (1 << retries)).await;
                }
                other => break other,
            }
        } {
            Ok(l) => l,
            Err(BleError::Unreachable(why)) if prof.sleeps => {
                tracing::info!(device = id, "lock asleep ({why}): the command waits for it");
                lock(&self.live)
                    .entry(id.to_string())
                    .or_default()
                    .last_seen = None;
                let _ = outcome.send(Execution::Queued);
                return;
            }
            Err(e) => {
                let _ = outcome.send(Execution::Failed(e.to_string()));
                return;
            }
        };
        let session = link.session();
        self.note_battery(&dev, prof, &session);
        let result = self
            .run_on_link(&dev, &mac, &mut link, &session, action, offline_only)
            .await;
        let _ = outcome.send(result);
        // What the lock still says (server packets after an unlock) is uploaded, within one
        // short window.
        let end = tokio::time::Instant::now() + AFTER_LAST_PACKET;
        for _ in 0..MAX_EXTRA_NOTIFICATIONS {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            match link.notification(left).await {
                Ok(value) if !left.is_zero() => {
                    self.on_notification(&dev, &session, &value, "after");
                }
                _ => break,
            }
        }
        link.disconnect().await;
    }

    fn note_battery(&self, dev: &Device, prof: &Profile, session: &[u8; PACKET_LEN]) {
        let Ok(s) = noke::Session::parse(session) else {
            return;
        };
        let mv = s.battery_mv();
        self.states.set(&dev.id, &[("battery_mv", json!(mv))]);
        let low = prof.low_battery_mv > 0 && mv < prof.low_battery_mv;
        let newly = {
            let mut live = lock(&self.live);
            let l = live.entry(dev.id.clone()).or_default();
            let newly = low && !l.battery_low;
            l.battery_low = low;
            newly
        };
        if newly {
            self.record(
                EventKind::BatteryLow,
                json!({"device": dev.id, "battery_mv": mv}),
            );
        }
    }

    async fn run_on_link(
        &self,
        dev: &Device,
        mac: &str,
        link: &mut R::Link,
        session: &[u8; PACKET_LEN],
        action: UnitAction,
        offline_only: bool,
    ) -> Execution {
        let read_at = tokio::time::Instant::now();
        let packets = match self
            .packets(dev, mac, session, read_at, action, offline_only)
            .await
        {
            Ok(p) => p,
            Err(e) => return Execution::Failed(e),
        };
        let (list, via) = match packets {
            Packets::Online(p) => (p, "online"),
            Packets::Offline(p) => (vec![p], "offline"),
        };
        let n = list.len();
        for (i, p) in list.iter().enumerate() {
            if let Err(e) = link.write(p).await {
                return Execution::Failed(format!("writing packet {} of {n}: {e}", i + 1));
            }
            match self.await_result(dev, session, link, via).await {
                Ok(()) => {}
                // A sleeping lock that shuts down before it took anything: the command waits
                // for it to wake, like one that did not answer the connection.
                Err(LockError::Sleep) if i == 0 && profile::for_kind(dev.kind).sleeps => {
                    lock(&self.live)
                        .entry(dev.id.clone())
                        .or_default()
                        .last_seen = None;
                    return Execution::Queued;
                }
                Err(e) => return Execution::Failed(format!("packet {} of {n}: {e}", i + 1)),
            }
        }
        let what = match action {
            UnitAction::Unlock => "unlocked",
            UnitAction::Lock => "locked",
            UnitAction::Locate => "located",
        };
        Execution::Done(format!("{what} ({via}, {n} packet(s))"))
    }

    /// Waits for the lock's answer to the packet just written: server packets on the way are
    /// uploaded; the first app packet decides.
    async fn await_result(
        &self,
        dev: &Device,
        session: &[u8; PACKET_LEN],
        link: &mut R::Link,
        via: &str,
    ) -> Result<(), LockError> {
        for _ in 0..=MAX_EXTRA_NOTIFICATIONS {
            let value = link
                .notification(NOTIFY_TIMEOUT)
                .await
                .map_err(|e| LockError::Other(e.to_string()))?;
            if let Some(answer) = self.on_notification(dev, session, &value, via) {
                return answer;
            }
        }
        Err(LockError::Other(format!(
            "more than {MAX_EXTRA_NOTIFICATIONS} notifications without an answer"
        )))
    }

    /// Records what a notification says: a server packet is uploaded, an app packet is a
    /// `lock_result` and the answer (`Some`) to the packet written last.
    fn on_notification(
        &self,
        dev: &Device,
        session: &[u8; PACKET_LEN],
        value: &[u8],
        via: &str,
    ) -> Option<Result<(), LockError>> {
        match noke::parse_notification(value) {
            Ok(Notification::Server(p)) => {
                self.record(
                    EventKind::LockUpload,
                    json!({"device": dev.id, "mac": dev.mac.to_ascii_uppercase(),
                           "session": hex::encode_upper(session), "packet": hex::encode_upper(p)}),
                );
                None
            }
            Ok(Notification::App { result, raw }) => {
                self.record(
                    EventKind::LockResult,
                    json!({"device": dev.id, "result": result.event_name(),
                           "code": result.code(), "via": via, "raw": hex::encode_upper(raw)}),
                );
                Some(match result {
                    AppResult::Success { .. } => Ok(()),
                    AppResult::Shutdown { .. } => Err(LockError::Sleep),
                    other => Err(LockError::Other(format!(
                        "the lock answered {}",
                        other.event_name()
                    ))),
                })
            }
            Ok(Notification::Invalid(raw)) => {
                self.record(
                    EventKind::LockResult,
                    json!({"device": dev.id, "result": "invalid", "code": 0xFF, "via": via,
                           "raw": hex::encode_upper(raw)}),
                );
                Some(Err(LockError::Other(
                    "the lock flagged the exchange as invalid".into(),
                )))
            }
            Err(e) => {
                self.record(
                    EventKind::DeviceError,
                    json!({"device": dev.id, "error": format!("unreadable notification: {e}")}),
                );
                None
            }
        }
    }

    /// The packets for an action: the cloud's (online), or the offline unlock made here when
    /// the cloud is away or does not answer in time and the site database has the lock's
    /// offline key.
    async fn packets(
        &self,
        dev: &Device,
        mac: &str,
        session: &[u8; PACKET_LEN],
        read_at: tokio::time::Instant,
        action: UnitAction,
        offline_only: bool,
    ) -> Result<Packets, String> {
        // The cloud's wait ends early enough for the session to be still valid for the offline
        // unlock (a wake-to-answer lock's session lasts ~15 s).
        let valid = profile::for_kind(dev.kind).session_valid;
        let left = valid
            .saturating_sub(read_at.elapsed())
            .saturating_sub(Duration::from_secs(1));
        let wait = self.cfg.online_unlock_timeout.min(left);
        let online_err = if offline_only {
            "offline unlock asked for".to_string()
        } else {
            match self.rpc.request(&dev.id, mac, action, session, wait).await {
                Ok(p) => return Ok(Packets::Online(p)),
                Err(e) => e,
            }
        };
        if action != UnitAction::Unlock {
            return Err(format!("{online_err}; only an unlock can be made offline"));
        }
        let (Some(key), Some(cmd)) = (
            dev.offline_key.as_deref().and_then(hex16),
            dev.unlock_command.as_deref().and_then(hex20),
        ) else {
            return Err(format!(
                "{online_err}; the site database has no offline key for `{}`",
                dev.id
            ));
        };
        tracing::info!(device = %dev.id, "offline unlock ({online_err})");
        let now = Utc::now().timestamp().clamp(0, i64::from(u32::MAX)) as u32;
        Ok(Packets::Offline(noke::offline_unlock_packet(
            &key, &cmd, session, now,
        )))
    }
}

/// Blocking calls from the command router (a blocking thread).
impl<R: Radio> UnitControllers for Manager<R> {
    fn online(&self, device: &str) -> Online {
        Manager::online(self, device)
    }

    fn execute(&self, device: &str, action: UnitAction) -> Execution {
        self.handle.block_on(self.operate(device, action, false))
    }
}

/// What the daemon needs of a manager, whatever its radio.
pub trait Control: UnitControllers {
    fn set_relays(&self, relays: Arc<dyn Relays>);
    fn set_wakes(&self, tx: tokio::sync::mpsc::Sender<String>);
}

impl<R: Radio> Control for Manager<R> {
    fn set_relays(&self, relays: Arc<dyn Relays>) {
        Manager::set_relays(self, relays)
    }
    fn set_wakes(&self, tx: tokio::sync::mpsc::Sender<String>) {
        Manager::set_wakes(self, tx)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn first_manufacturer(seen: &Seen) -> &[u8] {
    seen.manufacturer
        .first()
        .map(|(_, d)| d.as_slice())
        .unwrap_or(&[])
}

/// A fob's tracking id: its MAC without colons, upper case.
pub fn fob_id(mac: &str) -> String {
    mac.chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

fn hex16(s: &str) -> Option<[u8; 16]> {
    hex::decode(s).ok()?.try_into().ok()
}

fn hex20(s: &str) -> Option<[u8; PACKET_LEN]> {
    hex::decode(s).ok()?.try_into().ok()
}
