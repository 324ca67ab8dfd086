//! A simulated radio with simulated padlocks, sensors and fobs, in memory. The padlock speaks
//! the legacy protocol: it checks an offline unlock packet's encryption, checksum and time
//! (through [`noke::open_offline_packet`]), accepts the online command packets it was given,
//! answers with the protocol's notifications, and sleeps (unreachable, silent) until woken.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::noke;
use super::transport::{BleError, Link, Radio, Seen};

/// A simulated padlock.
#[derive(Debug, Clone)]
pub struct SimLock {
    pub name: String,
    pub offline_key: [u8; 16],
    pub asleep: bool,
    pub battery_mv: u16,
    /// Online command packets it accepts (each answered with success).
    pub accepted: Vec<[u8; 20]>,
    /// A server packet (0x50) to notify after the last accepted packet of a sequence.
    pub server_packet: Option<[u8; 20]>,
    /// How many unlocks it performed.
    pub unlocks: u32,
    /// Every packet written to it.
    pub written: Vec<[u8; 20]>,
    /// Allowed clock difference for offline packets, in seconds.
    pub time_window_s: i64,
    /// The lock's clock minus the real time, in seconds (a battery change resets a clock).
    pub clock_offset_s: i64,
    /// On the next connection, right after the session is read, the lock goes to sleep (its
    /// idle timeout): with a shutdown notification (0x64) first (`Some(true)`) or by just
    /// dropping the link (`Some(false)`). Once.
    pub falls_asleep: Option<bool>,
}

impl SimLock {
    pub fn new(name: &str, offline_key: [u8; 16]) -> Self {
        SimLock {
            name: name.to_string(),
            offline_key,
            asleep: false,
            battery_mv: 3000,
            accepted: Vec::new(),
            server_packet: None,
            unlocks: 0,
            written: Vec::new(),
            time_window_s: 300,
            clock_offset_s: 0,
            falls_asleep: None,
        }
    }
}

#[derive(Default)]
struct State {
    locks: HashMap<String, SimLock>,
    scanners: Vec<tokio::sync::mpsc::Sender<Seen>>,
    sessions: u64,
}

/// The simulated radio. Clones share the same devices.
#[derive(Clone, Default)]
pub struct SimRadio {
    state: Arc<Mutex<State>>,
}

impl SimRadio {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_lock(&self, mac: &str, lock: SimLock) {
        self.lock().locks.insert(mac.to_string(), lock);
    }

    /// Changes a lock (sleep, wake, accepted packets, …).
    pub fn with_lock<R>(&self, mac: &str, f: impl FnOnce(&mut SimLock) -> R) -> Option<R> {
        self.lock().locks.get_mut(mac).map(f)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Delivers an advertisement to every scanner (dropped when a scanner is full, as a radio
    /// drops what nobody reads in time).
    pub fn advertise(&self, seen: Seen) {
        let mut st = self.lock();
        st.scanners.retain(|tx| !tx.is_closed());
        for tx in &st.scanners {
            let _ = tx.try_send(seen.clone());
        }
    }

    /// A padlock's advertisement (nothing while it sleeps).
    pub fn advertise_lock(&self, mac: &str, rssi: i16) {
        let name = {
            let st = self.lock();
            match st.locks.get(mac) {
                Some(l) if !l.asleep => l.name.clone(),
                _ => return,
            }
        };
        self.advertise(Seen {
            mac: mac.to_string(),
            name: Some(name),
            rssi: Some(rssi),
            manufacturer: vec![(0xFFFF, vec![0x00, 0x02, 0x0A])],
            service_data: Vec::new(),
        });
    }
}

impl Radio for SimRadio {
    type Link = SimLink;

    async fn scan(&self) -> Result<tokio::sync::mpsc::Receiver<Seen>, BleError> {
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        self.lock().scanners.push(tx);
        Ok(rx)
    }

    async fn connect(&self, mac: &str, _timeout: Duration) -> Result<SimLink, BleError> {
        let mut st = self.lock();
        st.sessions += 1;
        let n = st.sessions;
        let Some(lock) = st.locks.get_mut(mac) else {
            return Err(BleError::Unreachable(format!(
                "{mac}: no such device in range"
            )));
        };
        if lock.asleep {
            return Err(BleError::Unreachable(format!(
                "{mac}: le-connection-abort-by-local"
            )));
        }
        let mut session = [0u8; 20];
        for (i, b) in session.iter_mut().enumerate() {
            *b = (n as u8).wrapping_mul(31).wrapping_add(i as u8 * 7);
        }
        session[2..4].copy_from_slice(&lock.battery_mv.to_le_bytes());
        let mut queue = VecDeque::new();
        if let Some(shutdown) = lock.falls_asleep.take() {
            lock.asleep = true;
            if shutdown {
                let sleep = noke::AppResult::Shutdown {
                    locked: true,
                    timed_out: true,
                };
                queue.push_back(sleep.to_packet().to_vec());
            }
        }
        Ok(SimLink {
            radio: self.clone(),
            mac: mac.to_string(),
            session,
            queue,
        })
    }
}

pub struct SimLink {
    radio: SimRadio,
    mac: String,
    session: [u8; 20],
    queue: VecDeque<Vec<u8>>,
}

impl Link for SimLink {
    fn session(&self) -> [u8; 20] {
        self.session
    }

    async fn write(&mut self, packet: &[u8; 20]) -> Result<(), BleError> {
        let session = self.session;
        let real = chrono::Utc::now().timestamp();
        let replies = self
            .radio
            .with_lock(&self.mac, |lock| {
                lock.written.push(*packet);
                if lock.asleep {
                    return Err(BleError::Disconnected("the lock went to sleep".into()));
                }
                let mut out = Vec::new();
                if let Some(pos) = lock.accepted.iter().position(|p| p == packet) {
                    out.push(noke::app_packet(noke::result_code::SUCCESS, &[packet[3]]).to_vec());
                    if pos + 1 == lock.accepted.len() {
                        lock.unlocks += 1;
                        if let Some(sp) = lock.server_packet {
                            out.push(sp.to_vec());
                        }
                    }
                    return Ok(out);
                }
                let now = real + lock.clock_offset_s;
                match noke::open_offline_packet(&lock.offline_key, &session, packet) {
                    Ok((header, _, t)) if (i64::from(t) - now).abs() <= lock.time_window_s => {
                        lock.unlocks += 1;
                        out.push(
                            noke::app_packet(noke::result_code::SUCCESS, &[header[3]]).to_vec(),
                        );
                    }
                    _ => out.push(noke::app_packet(noke::result_code::INVALID_KEY, &[]).to_vec()),
                }
                Ok(out)
            })
            .ok_or_else(|| BleError::Disconnected(format!("{}: gone", self.mac)))??;
        self.queue.extend(replies);
        Ok(())
    }

    async fn notification(&mut self, timeout: Duration) -> Result<Vec<u8>, BleError> {
        match self.queue.pop_front() {
            Some(n) => Ok(n),
            // Asleep: the link is gone (after what the lock said before it went).
            None if self.radio.with_lock(&self.mac, |l| l.asleep) != Some(false) => Err(
                BleError::Disconnected(format!("{}: the lock dropped the connection", self.mac)),
            ),
            None => {
                tokio::time::sleep(timeout).await;
                Err(BleError::Timeout("no notification".into()))
            }
        }
    }

    async fn disconnect(self) {}
}

// ---------------------------------------------------------------------------------------------
// Sensors and fobs (advertising only)

impl SimRadio {
    /// A BTHome v2 advertisement (service data as given: plain or encrypted).
    pub fn advertise_bthome(&self, mac: &str, name: &str, service_data: Vec<u8>, rssi: i16) {
        self.advertise(Seen {
            mac: mac.to_string(),
            name: Some(name.to_string()),
            rssi: Some(rssi),
            manufacturer: Vec::new(),
            service_data: vec![(super::bthome::SERVICE_UUID.to_string(), service_data)],
        });
    }

    /// A fob's advertisement (`FOB1F_<mac hex>`).
    pub fn advertise_fob(&self, mac: &str, rssi: i16) {
        let hex: String = mac.chars().filter(|c| *c != ':').collect();
        self.advertise(Seen {
            mac: mac.to_string(),
            name: Some(format!("FOB1F_{hex}")),
            rssi: Some(rssi),
            manufacturer: Vec::new(),
            service_data: Vec::new(),
        });
    }

    /// Whether a scanner listens (adverts before that are lost, as on air).
    pub fn scanning(&self) -> bool {
        let mut st = self.lock();
        st.scanners.retain(|tx| !tx.is_closed());
        !st.scanners.is_empty()
    }

    /// How many unlocks a simulated lock performed.
    pub fn unlocks(&self, mac: &str) -> u32 {
        self.with_lock(mac, |l| l.unlocks).unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// The demo site's BLE devices

/// Simulated devices for every padlock and controller of the site database (`devices[]`); the
/// padlocks whose id ends in `2` sleep (the demo shows a queued unlock delivered on wake-up).
pub fn demo_radio(tables: &crate::site::Tables) -> SimRadio {
    use crate::sync::DeviceKind;
    let radio = SimRadio::new();
    for d in tables.devices.values() {
        if !matches!(d.kind, DeviceKind::Padlock | DeviceKind::Controller) {
            continue;
        }
        let key = d
            .offline_key
            .as_deref()
            .and_then(|k| hex::decode(k).ok())
            .and_then(|k| <[u8; 16]>::try_from(k).ok())
            .unwrap_or([0; 16]);
        let mac = d.mac.to_ascii_uppercase();
        let code = if d.kind == DeviceKind::Padlock {
            "3P"
        } else {
            "3E"
        };
        let mut lock = SimLock::new(&format!("NOKE{code}_{}", mac.replace(':', "")), key);
        lock.asleep = d.kind == DeviceKind::Padlock && d.id.ends_with('2');
        radio.add_lock(&mac, lock);
    }
    radio
}

/// The demo: adverts every two seconds (locks, BTHome sensors with a temperature that drifts
/// and motion now and then, fobs near the gate), an installer's offline unlock, and an unlock
/// for a sleeping padlock that waits until the padlock is woken.
/// With `pair`, the unadopted padlock and sensor advertise too (the padlock only while the
/// site database does not name it: then it is one of the site's locks above).
pub async fn demo_script(
    manager: std::sync::Arc<super::Manager<SimRadio>>,
    pair: Option<PairSims>,
    stop: tokio_util::sync::CancellationToken,
) {
    use crate::cloud::commands::{Execution, UnitAction};
    use crate::sync::DeviceKind;
    let radio = manager.radio().clone();
    let devices: Vec<crate::sync::Device> = {
        let site = manager.store().site();
        let mut v: Vec<_> = site.tables.devices.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    };
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut round: u32 = 0;
    let awake_lock = devices
        .iter()
        .find(|d| d.kind == DeviceKind::Padlock && !d.id.ends_with('2'))
        .map(|d| d.id.clone());
    let sleeping_lock = devices
        .iter()
        .find(|d| d.kind == DeviceKind::Padlock && d.id.ends_with('2'))
        .cloned();
    let mut waiting: Option<tokio::task::JoinHandle<Execution>> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        round += 1;
        for d in &devices {
            let mac = d.mac.to_ascii_uppercase();
            match d.kind {
                DeviceKind::Padlock | DeviceKind::Controller => radio.advertise_lock(&mac, -60),
                DeviceKind::Sensor => {
                    let temp = 2150 + (round % 10) as i16 * 20;
                    let motion = u8::from(round % 7 == 0);
                    let mut objects = vec![0x00, round as u8, 0x01, 90, 0x02];
                    objects.extend_from_slice(&temp.to_le_bytes());
                    objects.extend_from_slice(&[0x21, motion]);
                    let key = d
                        .key
                        .as_deref()
                        .and_then(|k| hex::decode(k).ok())
                        .and_then(|k| <[u8; 16]>::try_from(k).ok());
                    let data = bthome_data(&objects, key.as_ref(), &mac, round);
                    radio.advertise_bthome(&mac, "SBMO-003Z", data, -70);
                }
                DeviceKind::Fob => {
                    if round % 15 == 3 {
                        radio.advertise_fob(&mac, -55);
                    }
                }
            }
        }
        if let Some(p) = &pair {
            p.advertise(round, &devices);
        }
        if round == 2
            && let Some(id) = &awake_lock
        {
            tracing::info!(device = %id, "demo: an installer tests the offline unlock");
            let r = manager.operate(id, UnitAction::Unlock, true).await;
            tracing::info!(device = %id, outcome = ?r, "demo: offline unlock");
        }
        if round == 3
            && let Some(d) = &sleeping_lock
        {
            let (m, id) = (manager.clone(), d.id.clone());
            tracing::info!(device = %id, "demo: unlock for a sleeping padlock: it waits until the padlock wakes");
            waiting = Some(tokio::spawn(async move {
                loop {
                    match m.operate(&id, UnitAction::Unlock, true).await {
                        Execution::Queued => {
                            while m.online(&id) != crate::cloud::commands::Online::Yes {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                        other => return other,
                    }
                }
            }));
        }
        if round == 8
            && let Some(d) = &sleeping_lock
        {
            tracing::info!(device = %d.id, "demo: someone touches the sleeping padlock: it wakes");
            radio.with_lock(&d.mac.to_ascii_uppercase(), |l| l.asleep = false);
        }
        if let Some(h) = &waiting
            && h.is_finished()
            && let Some(h) = waiting.take()
            && let Ok(r) = h.await
        {
            tracing::info!(outcome = ?r, "demo: the sleeping padlock's unlock was delivered");
        }
    }
}

/// A BTHome v2 service data for `objects`: encrypted with `key` (counter `round`), else plain.
fn bthome_data(objects: &[u8], key: Option<&[u8; 16]>, mac: &str, round: u32) -> Vec<u8> {
    match key {
        Some(key) => {
            let mac_b = super::bthome::parse_mac(mac).unwrap_or([0; 6]);
            super::bthome::encrypt(objects, key, mac_b, round, false).unwrap_or_default()
        }
        None => super::bthome::encode_plain(objects, false),
    }
}

// ---------------------------------------------------------------------------------------------
// The demo's unadopted BLE devices (installer pairing, docs/pairing.md, *The demo*)

/// The unadopted padlock: a MAC the demo site database does not name (until the demo's cloud
/// assigns it to a unit), and its offline key. Fixed, public demo values.
pub const PAIR_LOCK_MAC: &str = "D0:1F:A6:44:B3:04";
pub const PAIR_LOCK_KEY: [u8; 16] = *b"demo-new-padlock";
/// The unadopted BTHome thermometer (encrypted) and its bind key, "printed on its box".
pub const PAIR_SENSOR_MAC: &str = "3C:2E:F5:00:00:C3";
pub const PAIR_SENSOR_KEY: [u8; 16] = *b"demo-bind-key-c3";

/// The demo's unadopted BLE devices on the simulated radio. No `Debug`: it holds keys.
#[derive(Clone)]
pub struct PairSims {
    radio: SimRadio,
    pub lock_mac: String,
    pub sensor_mac: String,
}

impl PairSims {
    /// Puts the unadopted padlock on `radio` (awake; the sensor only advertises).
    pub fn add(radio: &SimRadio) -> PairSims {
        let mac = PAIR_LOCK_MAC.to_string();
        let lock = SimLock::new(&format!("NOKE3P_{}", mac.replace(':', "")), PAIR_LOCK_KEY);
        radio.add_lock(&mac, lock);
        PairSims {
            radio: radio.clone(),
            lock_mac: mac,
            sensor_mac: PAIR_SENSOR_MAC.to_string(),
        }
    }

    /// The padlock's offline key, as the cloud gives it with the lock's record (hex). A secret.
    pub fn lock_key_hex(&self) -> String {
        hex::encode_upper(PAIR_LOCK_KEY)
    }

    /// The sensor's bind key (hex), as the installer reads it off the box. A secret.
    pub fn bind_key_hex(&self) -> String {
        hex::encode_upper(PAIR_SENSOR_KEY)
    }

    /// How many unlocks the padlock performed (the adoption's test unlock is one).
    pub fn lock_unlocks(&self) -> u32 {
        self.radio.unlocks(&self.lock_mac)
    }

    /// One round of adverts: the padlock (unless `site` names it: then it advertises as one of
    /// the site's) and the thermometer (a temperature that drifts, its battery; encrypted).
    fn advertise(&self, round: u32, site: &[crate::sync::Device]) {
        if !site
            .iter()
            .any(|d| d.mac.eq_ignore_ascii_case(&self.lock_mac))
        {
            self.radio.advertise_lock(&self.lock_mac, -62);
        }
        let temp = 1840 + (round % 8) as i16 * 15;
        let mut objects = vec![0x01, 87, 0x02];
        objects.extend_from_slice(&temp.to_le_bytes());
        let data = bthome_data(&objects, Some(&PAIR_SENSOR_KEY), &self.sensor_mac, round);
        self.radio
            .advertise_bthome(&self.sensor_mac, "SBTH-001Z", data, -68);
    }
}
