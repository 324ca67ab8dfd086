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
    Ok(c)
}
