//! Installer pairing (install mode): discover, adopt and provision new devices on BLE, OSDP and
//! Modbus. The installer's guide and the MQTT contract are in docs/pairing.md.
//!
//! The parts, and who owns what:
//! - **Install mode** is a state held here: started by the signed `install_mode` command or the
//!   local control socket, ended at its `until` (monotonic), on `stop`, or when the daemon stops
//!   (never resumed after a restart). Whatever was not adopted is forgotten when it ends.
//! - **Discovery** is done by the drivers (RS-485 buses, BLE manager), only while
//!   [`Scan::active`] says so, through the [`Scan`] handle they are given: each answering or
//!   advertising device becomes a [`Candidate`] with a stable id.
//! - **Adoption** is asked of this module (signed `adopt`/`remove`/`replace`, or locally); it
//!   checks the request against the candidates and the registry, then hands it to the driver's
//!   [`Provisioner`], which provisions the device and returns the [`Registered`] record that the
//!   store keeps (the registry of adopted devices, merged with the TOML config at start).
//!
//! This file is the contract between those parts; the implementations live beside it
//! (pairing), in `rs485/` and `ble/` (discovery and provisioning) and in `store/` (registry).

use std::ops::RangeInclusive;

mod adopt;
pub mod control;
mod install;
pub mod registry;

pub use adopt::default_device_id;
pub use install::{
    EndReason, MAX_CANDIDATES, MINUTES, PairError, PairReason, Pairing, ReloadCheck,
};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// The kinds of device a candidate can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// An OSDP keypad or card reader (PD) on an OSDP bus.
    OsdpReader,
    /// A Modbus RTU device (relay/input board, sensor) on a Modbus bus.
    ModbusDevice,
    /// A BLE padlock or unit controller.
    BleLock,
    /// A BLE sensor (BTHome: motion, temperature, door).
    BleSensor,
    /// A BLE fob.
    BleFob,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::OsdpReader => "osdp_reader",
            Family::ModbusDevice => "modbus_device",
            Family::BleLock => "ble_lock",
            Family::BleSensor => "ble_sensor",
            Family::BleFob => "ble_fob",
        }
    }
}

/// A device found while install mode is active and not (yet) adopted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Stable: [`Candidate::osdp_id`], [`Candidate::modbus_id`], [`Candidate::ble_id`].
    pub id: String,
    pub family: Family,
    /// The RS-485 bus it answered on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    /// OSDP address or Modbus unit id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<u8>,
    /// The baud rate it answered at (RS-485).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baud: Option<u32>,
    /// `AA:BB:CC:DD:EE:FF` (BLE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rssi: Option<i16>,
    /// What the device says of itself: OSDP `pdid` (vendor OUI, model, version, serial,
    /// firmware) and `pdcap`; Modbus `profiles` it matches and the identity registers read;
    /// BLE `name`, service, whether its data is encrypted. Never a secret.
    #[serde(default)]
    pub identity: serde_json::Value,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
}

impl Candidate {
    pub fn osdp_id(bus: &str, address: u8) -> String {
        format!("osdp:{bus}:{address}")
    }
    pub fn modbus_id(bus: &str, unit: u8) -> String {
        format!("modbus:{bus}:{unit}")
    }
    /// `mac` in any case; the id has it upper case.
    pub fn ble_id(mac: &str) -> String {
        format!("ble:{}", mac.to_ascii_uppercase())
    }
}

/// How to scan, given when install mode starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanOptions {
    /// OSDP: also probe at the other standard bauds (9600, 19200, 38400, 57600, 115200).
    pub all_bauds: bool,
    /// Modbus: the unit ids to probe (default 1..=247), minus those in use.
    pub modbus_units: RangeInclusive<u8>,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            all_bauds: false,
            modbus_units: 1..=247,
        }
    }
}

/// The drivers' view of install mode. Cheap enough to call on a bus thread every cycle; never
/// blocks.
pub trait Scan: Send + Sync {
    /// `Some(options)` while install mode is active, `None` otherwise.
    fn active(&self) -> Option<ScanOptions>;
    /// A device answered or advertised. The first report of an id is published on
    /// `pairing/discovered` and recorded as `device_discovered`; later ones update
    /// `last_seen`/`rssi`/`identity`. Ignored when install mode is not active, and for ids
    /// already adopted.
    fn discovered(&self, candidate: Candidate);
    /// Scan progress for `pair list` and `pairing/state`: e.g. source `osdp:bus-1@9600`,
    /// `done` of `total` probes.
    fn progress(&self, source: &str, done: u32, total: u32);
}

/// A `Scan` that is never active (tests, and drivers started without pairing).
pub struct NoScan;

impl Scan for NoScan {
    fn active(&self) -> Option<ScanOptions> {
        None
    }
    fn discovered(&self, _candidate: Candidate) {}
    fn progress(&self, _source: &str, _done: u32, _total: u32) {}
}

/// What the installer asks for when adopting a candidate (signed `adopt`, or locally).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdoptSpec {
    /// The candidate's id.
    pub candidate: String,
    /// The device id it gets (unique across the config and the registry); derived from the
    /// candidate when absent.
    #[serde(default)]
    pub device: Option<String>,
    /// OSDP reader: the entry it opens and `in`/`out`.
    #[serde(default)]
    pub entry: Option<String>,
    #[serde(default)]
    pub direction: Option<String>,
    /// BLE lock/controller or sensor: the unit; BLE sensor: or the zone.
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
    /// Modbus: the profile (one the candidate matched, unless given).
    #[serde(default)]
    pub profile: Option<String>,
    /// A new OSDP address / Modbus unit id, written to the device and read back.
    #[serde(default)]
    pub address: Option<u8>,
    /// A new OSDP baud (COMSET).
    #[serde(default)]
    pub baud: Option<u32>,
    /// Modbus: what the discrete inputs are wired to (as `[[bus.device.inputs]]`).
    #[serde(default)]
    pub inputs: Vec<serde_json::Value>,
    /// BTHome: the bind key of an encrypted sensor (hex). A secret: never echoed or logged.
    #[serde(default)]
    pub bind_key: Option<String>,
    /// BLE lock: an offline test unlock as part of the adoption.
    #[serde(default)]
    pub test_unlock: bool,
    /// `replace`: the adopted device, or the device of the TOML config, this one takes over
    /// (entry/unit, settings; by default its id).
    #[serde(default)]
    pub replaces: Option<String>,
}

/// An adopted device as the registry keeps it: enough for its driver to run it after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registered {
    /// The device id (unique across the TOML config and the registry).
    pub id: String,
    /// The candidate it was adopted from.
    pub candidate: String,
    pub family: Family,
    /// The RS-485 bus, for OSDP and Modbus devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    /// The driver's settings in the TOML config's own shape: a `[[bus.reader]]` or
    /// `[[bus.device]]` table for RS-485 devices, the BLE device's table for BLE. Never holds a
    /// secret in clear (keys go through the store's key handling).
    pub settings: serde_json::Value,
    pub adopted_at: DateTime<Utc>,
    /// `command:<id>` or `local:<user>`.
    pub adopted_by: String,
    /// The device of the TOML config this one stands in for (an adoption that `replaces` a
    /// configured device, or an adopted device that did): while this record is in the registry,
    /// every merge with the config (start, reload) leaves that device out: it is not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

/// Adopts candidates of some families: implemented by the RS-485 buses and the BLE manager.
/// Each call leaves the device and the running configuration as they were when it fails.
pub trait Provisioner: Send + Sync {
    /// The families this provisioner adopts.
    fn families(&self) -> &'static [Family];
    /// Provisions `candidate` as `spec` asks (address change written and read back, secure
    /// channel keyed, …) and returns the record to store. The device is not run yet.
    fn adopt<'a>(
        &'a self,
        candidate: &'a Candidate,
        spec: &'a AdoptSpec,
    ) -> BoxFuture<'a, Result<Registered, String>>;
    /// Runs the registered devices of its families from now on (after an adoption, a removal,
    /// and at start): the full set, so a device missing from it stops, and a configured device
    /// a record [`Registered::replaces`] is not run. A device already running as given is left
    /// alone (not restarted).
    fn run(&self, registered: &[Registered]) -> Result<(), String>;
}
