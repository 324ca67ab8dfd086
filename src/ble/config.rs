//! The `[ble]` section: the BLE adapter and how the gateway uses it.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBle {
    /// BlueZ adapter name (`hci0`); default: BlueZ's default adapter. `sim` = simulated radio
    /// with simulated devices (only with `demo.simulate_devices = true`).
    #[serde(default)]
    pub adapter: Option<Spanned<String>>,
    /// Connections at once (adapters handle few).
    #[serde(default)]
    pub max_connections: Option<Spanned<u64>>,
    /// Entries that open for a BLE fob the gateway hears (a gate next to the gateway).
    #[serde(default)]
    pub fob_entries: Vec<Spanned<String>>,
    /// Fobs heard weaker than this (dBm) are ignored: too far from the gate.
    #[serde(default)]
    pub fob_min_rssi: Option<Spanned<i64>>,
    /// One decision per fob and entry per this many seconds (a fob advertises many times a
    /// second).
    #[serde(default)]
    pub fob_repeat_s: Option<Spanned<u64>>,
    /// How long a remote unlock waits for the cloud's command packets before it falls back to
    /// the offline unlock.
    #[serde(default)]
    pub online_unlock_timeout_ms: Option<Spanned<u64>>,
    /// BLE devices the gateway runs besides the site database's `devices[]` (BTHome sensors
    /// put in by an installer; what `gatehouse devices export` prints for adopted devices).
    #[serde(default)]
    pub device: Vec<RawBleDevice>,
}

/// One `[[ble.device]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBleDevice {
    pub id: Spanned<String>,
    /// `sensor` (BTHome), `padlock` or `controller` (driven with the site database's keys for
    /// that MAC; the table only binds it to its unit).
    pub kind: Spanned<String>,
    pub mac: Spanned<String>,
    #[serde(default)]
    pub unit: Option<Spanned<String>>,
    #[serde(default)]
    pub zone: Option<Spanned<String>>,
    /// Encrypted BTHome sensor: its bind key (32 hex digits). A secret: never quoted back.
    #[serde(default)]
    pub key: Option<Spanned<String>>,
    /// Marks an encrypted sensor whose key is kept in the gateway's database (an adopted
    /// sensor; `key` is then absent).
    #[serde(default)]
    pub encrypted: Option<bool>,
    #[serde(default)]
    pub offline_after_s: Option<Spanned<u64>>,
}

/// A checked `[[ble.device]]`: a BLE device run besides the site database's.
#[derive(Clone, PartialEq, Eq)]
pub struct BleDevice {
    pub id: String,
    pub kind: crate::sync::DeviceKind,
    /// Upper case.
    pub mac: String,
    pub unit: Option<String>,
    pub zone: Option<String>,
    /// Encrypted sensor: the bind key (hex, upper case), when known here.
    pub key: Option<String>,
    /// Encrypted sensor whose key is in the store (`Store::ble_key`).
    pub stored_key: bool,
    pub offline_after_s: Option<u64>,
}

impl std::fmt::Debug for BleDevice {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BleDevice")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("mac", &self.mac)
            .field("unit", &self.unit)
            .field("zone", &self.zone)
            .field("key", &self.key.as_ref().map(|k| key_fingerprint(k)))
            .field("stored_key", &self.stored_key)
            .field("offline_after_s", &self.offline_after_s)
            .finish()
    }
}

/// A short fingerprint of a key (so that a change shows in a diff, never the key).
pub fn key_fingerprint(key: &str) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(key.as_bytes());
    format!("sha256:{}", hex::encode(&d[..4]))
}

/// `AA:BB:CC:DD:EE:FF` (any case) upper-cased, or `None`.
pub fn normalize_mac(s: &str) -> Option<String> {
    let s = s.trim();
    let parts: Vec<&str> = s.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| s.to_ascii_uppercase())
}

/// A 16-byte key in hex (32 digits), or `None`.
pub fn parse_key(s: &str) -> Option<[u8; 16]> {
    hex::decode(s.trim()).ok()?.try_into().ok()
}

#[derive(Debug, Clone, PartialEq)]
pub enum Adapter {
    /// BlueZ's default adapter.
    Default,
    Named(String),
    Simulated,
}

#[derive(Debug, Clone)]
pub struct BleConfig {
    pub adapter: Adapter,
    pub max_connections: usize,
    pub fob_entries: Vec<String>,
    pub fob_min_rssi: i16,
    pub fob_repeat: Duration,
    pub online_unlock_timeout: Duration,
    /// The profile each device kind gets (built in, or replaced from the profiles directory).
    pub profiles: super::profile::KindProfiles,
    /// `[[ble.device]]`: devices run besides the site database's.
    pub devices: Vec<BleDevice>,
}

impl Default for BleConfig {
    fn default() -> Self {
        BleConfig {
            adapter: Adapter::Default,
            max_connections: 2,
            fob_entries: Vec::new(),
            fob_min_rssi: -80,
            fob_repeat: Duration::from_secs(10),
            online_unlock_timeout: Duration::from_secs(5),
            profiles: Default::default(),
            devices: Vec::new(),
        }
    }
}

use crate::config::ErrFn;

pub fn check(
    raw: &RawBle,
    err: &ErrFn,
    simulate_devices: bool,
    profiles: &crate::profiles::Profiles,
) -> Result<BleConfig, ConfigError> {
    let mut c = BleConfig {
        profiles: profiles.ble_kinds(),
        ..BleConfig::default()
    };
    let range = |v: &Option<Spanned<u64>>, key: &str, default: u64, lo: u64, hi: u64| {
        crate::config::in_range(err, v, key, default, lo, hi)
    };
    if let Some(a) = &raw.adapter {
        let name = a.get_ref().trim();
        c.adapter = if name == "sim" {
            if !simulate_devices {
                return Err(err(
                    a.span(),
                    "ble.adapter",
                    "`sim` (simulated devices) needs demo.simulate_devices = true".into(),
                ));
            }
            Adapter::Simulated
        } else if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(err(
                a.span(),
                "ble.adapter",
                format!("`{name}` is not an adapter name (expected e.g. hci0, or sim)"),
            ));
        } else {
            Adapter::Named(name.to_string())
        };
    }
    c.max_connections = range(&raw.max_connections, "ble.max_connections", 2, 1, 8)? as usize;
    c.fob_entries = raw
        .fob_entries
        .iter()
        .map(|e| e.get_ref().clone())
        .collect();
    if let Some(r) = &raw.fob_min_rssi {
        if !(-127..=20).contains(r.get_ref()) {
            return Err(err(
                r.span(),
                "ble.fob_min_rssi",
                format!("{} is out of range (expected -127 to 20 dBm)", r.get_ref()),
            ));
        }
        c.fob_min_rssi = *r.get_ref() as i16;
    }
    c.fob_repeat = Duration::from_secs(range(&raw.fob_repeat_s, "ble.fob_repeat_s", 10, 1, 3600)?);
    c.online_unlock_timeout = Duration::from_millis(range(
        &raw.online_unlock_timeout_ms,
        "ble.online_unlock_timeout_ms",
        5000,
        100,
        60_000,
    )?);
    c.devices = check_devices(&raw.device, err)?;
    Ok(c)
}

fn check_devices(raw: &[RawBleDevice], err: &ErrFn) -> Result<Vec<BleDevice>, ConfigError> {
    use crate::sync::DeviceKind;
    let mut out: Vec<BleDevice> = Vec::new();
    for (i, d) in raw.iter().enumerate() {
        let key = |k: &str| format!("ble.device[{i}].{k}");
        let id = d.id.get_ref().trim();
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(err(
                d.id.span(),
                &key("id"),
                format!(
                    "{} is not a device id (letters, digits, - _ .)",
                    crate::redact::excerpt(id)
                ),
            ));
        }
        if out.iter().any(|o| o.id == id) {
            return Err(err(
                d.id.span(),
                &key("id"),
                format!("`{id}` is used by another [[ble.device]]"),
            ));
        }
        let kind = match d.kind.get_ref().as_str() {
            "sensor" => DeviceKind::Sensor,
            "padlock" => DeviceKind::Padlock,
            "controller" => DeviceKind::Controller,
            other => {
                return Err(err(
                    d.kind.span(),
                    &key("kind"),
                    format!(
                        "{} is not a kind here (expected sensor, padlock or controller; fobs \
                         are credentials in the site database)",
                        crate::redact::excerpt(other)
                    ),
                ));
            }
        };
        let Some(mac) = normalize_mac(d.mac.get_ref()) else {
            return Err(err(
                d.mac.span(),
                &key("mac"),
                "not a MAC address (expected AA:BB:CC:DD:EE:FF)".into(),
            ));
        };
        if let Some(o) = out.iter().find(|o| o.mac == mac) {
            return Err(err(
                d.mac.span(),
                &key("mac"),
                format!("{mac} is also the MAC of `{}`", o.id),
            ));
        }
        let text = |v: &Option<Spanned<String>>| v.as_ref().map(|s| s.get_ref().trim().to_string());
        let (unit, zone) = (text(&d.unit), text(&d.zone));
        match kind {
            DeviceKind::Sensor if unit.is_some() == zone.is_some() => {
                return Err(err(
                    d.id.span(),
                    &key("unit"),
                    "a sensor needs exactly one of `unit` or `zone`".into(),
                ));
            }
            DeviceKind::Padlock | DeviceKind::Controller if unit.is_none() || zone.is_some() => {
                return Err(err(
                    d.id.span(),
                    &key("unit"),
                    "a padlock or controller needs its `unit` (and no `zone`)".into(),
                ));
            }
            _ => {}
        }
        let bind = match &d.key {
            None => None,
            Some(_) if kind != DeviceKind::Sensor => {
                return Err(err(
                    d.id.span(),
                    &key("key"),
                    "only an encrypted sensor has a `key` (a lock's keys come from the site \
                     database)"
                        .into(),
                ));
            }
            // Never quoted: a key.
            Some(k) => match parse_key(k.get_ref()) {
                Some(_) => Some(k.get_ref().trim().to_ascii_uppercase()),
                None => {
                    return Err(err(
                        k.span(),
                        &key("key"),
                        "not a bind key (expected 32 hex digits)".into(),
                    ));
                }
            },
        };
        let stored_key = d.encrypted == Some(true) && bind.is_none();
        if stored_key && kind != DeviceKind::Sensor {
            return Err(err(
                d.id.span(),
                &key("encrypted"),
                "only a sensor is encrypted".into(),
            ));
        }
        let offline_after_s = match &d.offline_after_s {
            Some(_) => Some(crate::config::in_range(
                err,
                &d.offline_after_s,
                &key("offline_after_s"),
                0,
                10,
                7 * 86_400,
            )?),
            None => None,
        };
        out.push(BleDevice {
            id: id.to_string(),
            kind,
            mac,
            unit,
            zone,
            key: bind,
            stored_key,
            offline_after_s,
        });
    }
    Ok(out)
}
