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
use super::profile::Profile;
use super::transport::{BleError, Link, Radio, Seen};
use super::{bthome, rpc::CloudRpc};

mod live;
mod ops;
mod pairing;
use crate::access::{AccessEngine, Attempt};
use crate::cloud::commands::{Execution, Online, RelayOp, Relays, UnitAction, UnitControllers};
use crate::devstate::DeviceStates;
use crate::events::EventKind;
use crate::pairing::{NoScan, Scan};
use crate::policy::{Direction, Presented, Request, Target};
use crate::site::Tables;
use crate::store::Store;
use crate::sync::{Device, DeviceKind};
pub use live::LivePart;

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
    /// The last offline unlock the lock took: which key (a hash) and when.
    offline_worked: Option<(u64, DateTime<Utc>)>,
}

/// The site's BLE devices by MAC, rebuilt when the site database or the extra devices change:
/// the site database's first, then `[[ble.device]]` and adopted ones.
struct Index {
    tables: Option<Arc<Tables>>,
    extra_gen: u64,
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
    cfg: std::sync::RwLock<Arc<BleConfig>>,
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
    /// Devices run besides the site database's: `[[ble.device]]` and adopted ones.
    extra: Mutex<live::Extra>,
    /// Install mode, as the pairing module says it (discovery of unknown devices).
    scan: std::sync::RwLock<Arc<dyn Scan>>,
    /// Unknown devices heard in install mode (bounded; cleared when it ends).
    heard: Mutex<HashMap<String, pairing::Heard>>,
    handle: tokio::runtime::Handle,
    started: Instant,
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
        let m = Arc::new_cyclic(|me| Manager {
            me: me.clone(),
            radio,
            cfg: std::sync::RwLock::new(Arc::new(cfg)),
            store: engine.store().clone(),
            engine,
            states,
            rpc,
            relays: Mutex::new(None),
            wakes: Mutex::new(None),
            live: Mutex::new(HashMap::new()),
            index: Mutex::new(Index {
                tables: None,
                extra_gen: 0,
                by_mac: HashMap::new(),
            }),
            extra: Mutex::new(live::Extra::default()),
            scan: std::sync::RwLock::new(Arc::new(NoScan)),
            heard: Mutex::new(HashMap::new()),
            fobs: Mutex::new(HashMap::new()),
            serial: Mutex::new(HashMap::new()),
            pool: tokio::sync::Semaphore::new(max),
            counters: Mutex::new(Counters::default()),
            handle: tokio::runtime::Handle::current(),
            started: Instant::now(),
        });
        m.load_configured();
        m
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

    /// The configuration running now (`[ble]`; a reload replaces it: [`Self::apply_config`]).
    pub fn cfg(&self) -> Arc<BleConfig> {
        self.cfg.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Install mode's view for discovery (default: never active).
    pub fn set_scan(&self, scan: Arc<dyn Scan>) {
        *self.scan.write().unwrap_or_else(|e| e.into_inner()) = scan;
    }

    fn scan(&self) -> Arc<dyn Scan> {
        self.scan.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Links open now (operations in progress, or draining the lock's last server packets).
    pub fn links_open(&self) -> usize {
        self.cfg()
            .max_connections
            .saturating_sub(self.pool.available_permits())
    }

    pub fn counters(&self) -> Counters {
        *lock(&self.counters)
    }

    /// Records an event through the store's group commit ([`Store::record`]): it does not wait
    /// for the disk (only for room when the commit queue is full).
    fn record(&self, kind: EventKind, payload: Value) {
        lock(&self.counters).events += 1;
        self.store.record(kind, payload);
    }

    /// The device with this MAC (upper case), from an index rebuilt when the site or the extra
    /// devices change.
    fn device_by_mac(&self, mac: &str) -> Option<Arc<Device>> {
        let tables = self.store.site().tables.clone();
        let gen_ = lock(&self.extra).generation;
        let mut idx = lock(&self.index);
        if !idx.tables.as_ref().is_some_and(|t| Arc::ptr_eq(t, &tables)) || idx.extra_gen != gen_ {
            let (gen_, extra) = {
                let e = lock(&self.extra);
                (e.generation, e.devices())
            };
            let mut by_mac: HashMap<String, Arc<Device>> = HashMap::new();
            for d in extra {
                by_mac.insert(d.mac.to_ascii_uppercase(), Arc::new(d));
            }
            for d in tables.devices.values() {
                by_mac.insert(d.mac.to_ascii_uppercase(), Arc::new(d.clone()));
            }
            idx.by_mac = by_mac;
            idx.tables = Some(tables);
            idx.extra_gen = gen_;
        }
        idx.by_mac.get(mac).cloned()
    }

    /// A device by id: the site database's, else an extra one.
    fn device(&self, id: &str) -> Option<Device> {
        if let Some(d) = self.store.site().tables.devices.get(id) {
            return Some(d.clone());
        }
        lock(&self.extra).device(id)
    }

    // -----------------------------------------------------------------------------------------
    // Adverts

    /// Handles one advertisement. Blocking (events are flushed): call it from the advert thread.
    pub fn on_advert(&self, seen: &Seen, now: Instant, wall: DateTime<Utc>) {
        lock(&self.counters).adverts += 1;
        self.engine.metrics().ble_advert();
        let mac = seen.mac.to_ascii_uppercase();
        let Some(dev) = self.device_by_mac(&mac) else {
            self.on_unknown(&mac, seen, now, wall);
            return;
        };
        let cfg = self.cfg();
        let prof = cfg.profiles.get(dev.kind);
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
            self.engine.metrics().device_online(&dev.id, "ble", true);
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
        self.discover(mac, seen, now, wall);
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
            use crate::automation::facts::Observed;
            let device = dev.id.clone();
            self.engine.facts().send(if locked {
                Observed::LockLocked { device }
            } else {
                Observed::LockUnlocked { device }
            });
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
        let mut facts = Vec::new();
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
                    facts.push(crate::automation::facts::Observed::Motion {
                        device: dev.id.clone(),
                        channel: None,
                    });
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
                if name == "temperature" && v.is_finite() {
                    facts.push(crate::automation::facts::Observed::Temperature {
                        device: dev.id.clone(),
                        channel: None,
                        celsius: v,
                    });
                }
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
        // An installer's sensor (not named by the site database's units) says where it is.
        let place = lock(&self.extra).place(&dev.id);
        for (k, mut p) in events {
            if let Some((what, id)) = &place {
                p[*what] = json!(id);
            }
            self.record(k, p);
        }
        for f in facts {
            self.engine.facts().send(f);
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
        let cfg = self.cfg();
        if cfg.fob_entries.is_empty() || rssi.is_some_and(|r| r < cfg.fob_min_rssi) {
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
        for entry in &cfg.fob_entries {
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
                fobs.insert(key, now + cfg.fob_repeat);
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
                    let next = now + cfg.fob_repeat.max(DENIED_FOB_REPEAT);
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
                store.record(
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
        let cfg = self.cfg();
        // The site database's devices, then the extra ones it does not name.
        let extra: Vec<Device> = lock(&self.extra)
            .devices()
            .into_iter()
            .filter(|d| !tables.devices.contains_key(&d.id))
            .collect();
        let devices = tables
            .devices
            .iter()
            .chain(extra.iter().map(|d| (&d.id, d)));
        let get = |id: &str| {
            tables
                .devices
                .get(id)
                .or_else(|| extra.iter().find(|d| d.id == id))
        };
        let after_of = |dev: &Device| {
            dev.offline_after_s
                .map(Duration::from_secs)
                .or(cfg.profiles.get(dev.kind).offline_after)
        };
        let mut gone = Vec::new();
        {
            let mut live = lock(&self.live);
            // A device not heard since the gateway started counts as silent since then.
            for (id, dev) in devices {
                if !live.contains_key(id) {
                    let after = after_of(dev);
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
                let Some(dev) = get(id) else {
                    continue;
                };
                if let (Some(after), Some(seen), Some(true)) =
                    (after_of(dev), l.last_seen, l.online)
                    && now.saturating_duration_since(seen) > after
                {
                    l.online = Some(false);
                    gone.push((id.clone(), now.saturating_duration_since(seen).as_secs()));
                }
            }
        }
        for (id, silent) in gone {
            self.engine.metrics().device_online(&id, "ble", false);
            self.states.set(&id, &[("online", json!(false))]);
            self.record(
                EventKind::DeviceOffline,
                json!({"device": id, "silent_s": silent, "source": "ble"}),
            );
        }
    }
}

/// What the daemon needs of a manager, whatever its radio: commands for locks, install mode
/// (discovery through [`Control::set_scan`], adoption as a [`crate::pairing::Provisioner`]) and
/// reloads ([`Control::apply_config`]).
pub trait Control: UnitControllers + crate::pairing::Provisioner {
    fn set_relays(&self, relays: Arc<dyn Relays>);
    fn set_wakes(&self, tx: tokio::sync::mpsc::Sender<String>);
    fn set_scan(&self, scan: Arc<dyn Scan>);
    fn apply_config(&self, cfg: &BleConfig) -> Vec<String>;
    fn config_conflict(&self, devices: &[super::config::BleDevice]) -> Option<String>;
}

impl<R: Radio> Control for Manager<R> {
    fn set_relays(&self, relays: Arc<dyn Relays>) {
        Manager::set_relays(self, relays)
    }
    fn set_wakes(&self, tx: tokio::sync::mpsc::Sender<String>) {
        Manager::set_wakes(self, tx)
    }
    fn set_scan(&self, scan: Arc<dyn Scan>) {
        Manager::set_scan(self, scan)
    }
    fn apply_config(&self, cfg: &BleConfig) -> Vec<String> {
        Manager::apply_config(self, cfg)
    }
    fn config_conflict(&self, devices: &[super::config::BleDevice]) -> Option<String> {
        Manager::config_conflict(self, devices)
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
