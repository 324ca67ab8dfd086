//! Adoption of RS-485 candidates ([`Provisioner`] for the buses; docs/rs485.md, *Pairing*).
//!
//! - OSDP reader: the candidate must still answer its ID; an address or rate change is sent as
//!   COMSET and checked by the reader answering at its new address; then the reader is added to
//!   its bus with `secure = "install"` (the existing install path: a fresh key stored, flushed,
//!   before LibOSDP gives it to the reader with KEYSET over an SCBK-D session) and the adoption
//!   waits for the reader to run a secure channel on its own key (`reader_paired`). A reader
//!   that never does is taken off the bus again, its unused key removed, and the adoption fails.
//! - Modbus device: profile (one the candidate matched unless given), device id, inputs checked
//!   as `[[bus.device]]` would be; a new unit id is written to the profile's address register
//!   and read back at the new id.
//!
//! Every check that needs no device comes first; a failure leaves the running configuration as
//! it was (a device already moved by COMSET or an address write stays where it was moved).
//! `Registered.settings` is the `[[bus.reader]]`/`[[bus.device]]` table as JSON; [`merge`]
//! (`adopted.rs`, re-exported here) refuses an adopted device whose id or address the
//! configuration also uses, naming both, and leaves out the configured devices one replaces.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::Rs485;
use super::adopted::without;
pub use super::adopted::{Adopted, AdoptedDevice, adopted_from, adopted_of, merge, start};
use super::config::{BusConfig, BusKind};
use super::pairing::{Answer, Op, RegFn, pdcap_secure};
use crate::pairing::{AdoptSpec, Candidate, Family, Provisioner, Registered};
use crate::profiles::Profiles;

/// How long a bus thread has to run one of the provisioner's exchanges.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a device has to answer at its new address.
const MOVE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a bus thread has to stop when its bus is restarted with a new device.
const RESTART_DEADLINE: Duration = Duration::from_secs(5);
/// How long a reader has to take its key (KEYSET) and run a secure channel on it.
pub const PAIR_TIMEOUT: Duration = Duration::from_secs(20);

/// Where an adoption goes ([`Rs485Provisioner::place`]).
struct Placed {
    /// The adopted devices that keep running (without the one replaced).
    adopted: Vec<Adopted>,
    /// The candidate's bus as it runs (without the device replaced).
    bus: BusConfig,
    /// The new device's id.
    id: String,
    /// The candidate's address.
    address: u8,
    /// The configured device the new one stands in for.
    replaces: Option<String>,
}

/// Adopts OSDP readers and Modbus devices on the running buses.
pub struct Rs485Provisioner {
    rs: Arc<Rs485>,
    profiles: Arc<Profiles>,
    /// One adoption at a time (each may restart a bus).
    adopting: tokio::sync::Mutex<()>,
    pair_timeout: Duration,
}

impl Rs485Provisioner {
    pub fn new(rs: Arc<Rs485>, profiles: Arc<Profiles>) -> Rs485Provisioner {
        Rs485Provisioner {
            rs,
            profiles,
            adopting: tokio::sync::Mutex::new(()),
            pair_timeout: PAIR_TIMEOUT,
        }
    }

    /// How long a reader has to take its key (tests shorten it).
    pub fn with_pair_timeout(mut self, d: Duration) -> Self {
        self.pair_timeout = d;
        self
    }

    async fn ask(&self, bus: &str, op: Op) -> Result<Answer, String> {
        let rx = self.rs.shared().pairing().ask(bus, op);
        match tokio::time::timeout(OP_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(format!("bus `{bus}` dropped the request")),
            Err(_) => Err(format!(
                "bus `{bus}` did not run the request within {} s (is it running?)",
                OP_TIMEOUT.as_secs()
            )),
        }
    }

    /// Asks `op` until `ok` accepts the answer or `MOVE_TIMEOUT` passes.
    async fn until(&self, bus: &str, op: Op, ok: impl Fn(&Answer) -> bool) -> Result<bool, String> {
        let end = Instant::now() + MOVE_TIMEOUT;
        loop {
            if ok(&self.ask(bus, op.clone()).await?) {
                return Ok(true);
            }
            if Instant::now() >= end {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn apply(&self, adopted: Vec<Adopted>) -> Result<(), String> {
        let rs = self.rs.clone();
        tokio::task::spawn_blocking(move || rs.apply_adopted(adopted, RESTART_DEADLINE))
            .await
            .map_err(|e| format!("bus restart: {e}"))?
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    }

    /// The running buses, the bus of `candidate`, and a device id for it (given or derived),
    /// checked unique; without the device `spec` replaces.
    fn place(
        &self,
        candidate: &Candidate,
        spec: &AdoptSpec,
        derived: String,
    ) -> Result<Placed, String> {
        let bus_id = candidate
            .bus
            .as_deref()
            .ok_or_else(|| format!("candidate `{}` names no bus", candidate.id))?;
        let address = candidate
            .address
            .ok_or_else(|| format!("candidate `{}` has no address", candidate.id))?;
        // What it replaces is left out: the adopted device (the new one stands in for the
        // configured one that one replaced), or the configured device.
        let mut adopted = self.rs.adopted();
        let mut replaces = None;
        if let Some(old) = &spec.replaces {
            match adopted.iter().position(|a| a.id() == old) {
                Some(i) => replaces = adopted.remove(i).replaces,
                None => replaces = Some(old.clone()),
            }
        }
        let gone: HashSet<&str> = replaces.as_deref().into_iter().collect();
        let merged = merge(&without(&self.rs.base(), &gone), &adopted)?;
        let bus = merged
            .iter()
            .find(|b| b.id == bus_id)
            .cloned()
            .ok_or_else(|| format!("no bus `{bus_id}` runs (candidate `{}`)", candidate.id))?;
        let id = spec.device.clone().unwrap_or(derived);
        if !crate::config::valid_id(&id) {
            return Err(format!(
                "device id `{id}` is not valid (expected 1 to 64 of A-Z a-z 0-9 - _ .)"
            ));
        }
        if merged
            .iter()
            .any(|b| b.id == id || b.device_ids().contains(&id.as_str()))
        {
            return Err(format!("device id `{id}` is already used"));
        }
        Ok(Placed {
            adopted,
            bus,
            id,
            address,
            replaces,
        })
    }

    async fn adopt_reader(&self, c: &Candidate, spec: &AdoptSpec) -> Result<Registered, String> {
        let bus_id = c.bus.clone().unwrap_or_default();
        let derived = format!(
            "reader-{bus_id}-{}",
            spec.address.or(c.address).unwrap_or(0)
        );
        // What runs now, to go back to when the reader does not take its key.
        let before = self.rs.adopted();
        let Placed {
            adopted,
            bus,
            id,
            address,
            replaces,
        } = self.place(c, spec, derived)?;
        let BusKind::Osdp(readers) = &bus.kind else {
            return Err(format!("bus `{bus_id}` is not an OSDP bus"));
        };
        let entry = spec
            .entry
            .clone()
            .ok_or("an OSDP reader needs an `entry` to open")?;
        if !self
            .rs
            .shared()
            .store
            .site()
            .tables
            .entries
            .contains_key(&entry)
        {
            return Err(format!("no entry `{entry}` in the site data"));
        }
        if let Some(r) = readers.iter().find(|r| r.address == address) {
            return Err(format!(
                "address {address} on bus `{bus_id}` is reader `{}`: not a candidate",
                r.id
            ));
        }
        let direction = spec.direction.clone().unwrap_or_else(|| "in".into());
        let new_address = spec.address.unwrap_or(address);
        if let Some(r) = readers.iter().find(|r| r.address == new_address) {
            return Err(format!(
                "address {new_address} on bus `{bus_id}` is used by reader `{}`",
                r.id
            ));
        }
        let baud = c.baud.unwrap_or(bus.baud);
        let new_baud = spec.baud.unwrap_or(bus.baud);
        if new_baud != bus.baud {
            return Err(format!(
                "bus `{bus_id}` runs at {} baud: a reader on it must too (baud {new_baud} asked)",
                bus.baud
            ));
        }
        if c.identity.get("pdcap").and_then(pdcap_secure) == Some(false) {
            return Err(
                "the reader does not do the OSDP secure channel (its PDCAP says so)".into(),
            );
        }
        let settings = json!({"id": id, "address": new_address, "entry": entry,
                              "direction": direction, "secure": "install"});
        let reg = Registered {
            id: id.clone(),
            candidate: c.id.clone(),
            family: Family::OsdpReader,
            bus: Some(bus_id.clone()),
            settings,
            adopted_at: Utc::now(),
            adopted_by: String::new(),
            replaces,
        };
        let mut trial = adopted.clone();
        trial.push(adopted_from(&reg, &self.profiles)?);
        merge(&self.rs.base(), &trial)?;
        // The device: still there, then moved if asked.
        match self.ask(&bus_id, Op::OsdpId { address, baud }).await? {
            Answer::Identity(_) => {}
            Answer::Silent => {
                return Err(format!(
                    "the reader at address {address} ({baud} baud) no longer answers"
                ));
            }
            a => {
                return Err(format!(
                    "the reader at address {address} answered {a:?} to ID"
                ));
            }
        }
        if new_address != address || new_baud != baud {
            let op = Op::OsdpId {
                address: new_address,
                baud: new_baud,
            };
            if new_address != address && self.ask(&bus_id, op.clone()).await? != Answer::Silent {
                return Err(format!("a device already answers at address {new_address}"));
            }
            let comset = Op::OsdpComset {
                address,
                baud,
                new_address,
                new_baud,
            };
            match self.ask(&bus_id, comset).await? {
                Answer::Done => {}
                Answer::Silent => return Err("the reader did not answer COMSET".into()),
                a => return Err(format!("the reader refused COMSET: {a:?}")),
            }
            if !self
                .until(&bus_id, op, |a| matches!(a, Answer::Identity(_)))
                .await?
            {
                return Err(format!(
                    "the reader did not answer at address {new_address}, {new_baud} baud after COMSET"
                ));
            }
        }
        // The secure channel: the install path on the bus, until the reader runs on its key.
        let store = self.rs.shared().store.clone();
        // A replacement under the same id: the old reader's key is not the new reader's (the
        // install path keys it afresh); it is put back when the new reader does not take one.
        let old_key = if spec.replaces.as_deref() == Some(id.as_str()) {
            let key = store
                .reader_key(&id)
                .map_err(|e| format!("reading the key of the reader replaced: {e:#}"))?;
            store
                .clear_reader_key(&id)
                .map_err(|e| format!("forgetting the key of the reader replaced: {e:#}"))?;
            key
        } else {
            None
        };
        let restore_key = || {
            let _ = store.clear_reader_key(&id);
            if let Some((key, confirmed)) = &old_key {
                let _ = store.set_reader_key(&id, key, *confirmed);
            }
        };
        if let Err(e) = self.apply(trial).await {
            restore_key();
            return Err(e);
        }
        let end = Instant::now() + self.pair_timeout;
        loop {
            if matches!(store.reader_key(&id), Ok(Some((_, true)))) {
                return Ok(reg);
            }
            if Instant::now() >= end {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        restore_key();
        let back = self.apply(before).await;
        Err(format!(
            "the reader did not take its new key (KEYSET not acknowledged, or no secure channel \
             on it) within {} s; it was taken off the bus{}",
            self.pair_timeout.as_secs(),
            back.err()
                .map(|e| format!(" (restoring the bus failed: {e})"))
                .unwrap_or_default()
        ))
    }

    async fn adopt_device(&self, c: &Candidate, spec: &AdoptSpec) -> Result<Registered, String> {
        let bus_id = c.bus.clone().unwrap_or_default();
        let unit0 = spec.address.or(c.address).unwrap_or(0);
        let Placed {
            adopted,
            bus,
            id,
            address: unit,
            replaces,
        } = self.place(c, spec, format!("modbus-{bus_id}-{unit0}"))?;
        let BusKind::Modbus { devices, .. } = &bus.kind else {
            return Err(format!("bus `{bus_id}` is not a Modbus bus"));
        };
        let matched: Vec<String> = c.identity["profiles"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let profile_id = match (&spec.profile, matched.first()) {
            (Some(p), _) => p.clone(),
            (None, Some(p)) => p.clone(),
            (None, None) => {
                return Err("the device matched no profile: name one with `profile`".into());
            }
        };
        let profile = self
            .profiles
            .modbus(&profile_id)
            .ok_or_else(|| format!("no Modbus profile `{profile_id}`"))?;
        if let Some(d) = devices.iter().find(|d| d.address == unit) {
            return Err(format!(
                "unit id {unit} on bus `{bus_id}` is device `{}`: not a candidate",
                d.id
            ));
        }
        let new_unit = spec.address.unwrap_or(unit);
        if !(1..=247).contains(&new_unit) {
            return Err(format!("unit id {new_unit} is out of range (1 to 247)"));
        }
        if let Some(d) = devices.iter().find(|d| d.address == new_unit) {
            return Err(format!(
                "unit id {new_unit} on bus `{bus_id}` is used by device `{}`",
                d.id
            ));
        }
        let address_register = profile.identify.as_ref().and_then(|i| i.address_register);
        if new_unit != unit && address_register.is_none() {
            return Err(format!(
                "profile `{profile_id}` names no address register: the device cannot be given a new unit id"
            ));
        }
        let mut settings = json!({"id": id, "profile": profile_id, "address": new_unit});
        if !spec.inputs.is_empty() {
            settings["inputs"] = Value::Array(spec.inputs.clone());
        }
        let reg = Registered {
            id,
            candidate: c.id.clone(),
            family: Family::ModbusDevice,
            bus: Some(bus_id.clone()),
            settings,
            adopted_at: Utc::now(),
            adopted_by: String::new(),
            replaces,
        };
        let mut trial = adopted;
        trial.push(adopted_from(&reg, &self.profiles)?);
        merge(&self.rs.base(), &trial)?;
        let reg_no = address_register.unwrap_or(0);
        let read = |unit| Op::ModbusRead {
            unit,
            function: RegFn::Holding,
            register: reg_no,
        };
        if self.ask(&bus_id, read(unit)).await? == Answer::Silent {
            return Err(format!("the device at unit id {unit} no longer answers"));
        }
        if new_unit != unit {
            if self.ask(&bus_id, read(new_unit)).await? != Answer::Silent {
                return Err(format!("a device already answers at unit id {new_unit}"));
            }
            let write = Op::ModbusWrite {
                unit,
                register: reg_no,
                value: u16::from(new_unit),
            };
            match self.ask(&bus_id, write).await? {
                Answer::Done => {}
                Answer::Silent => return Err("the device did not answer the address write".into()),
                a => return Err(format!("the device refused the address write: {a:?}")),
            }
            let want = Answer::Word(u16::from(new_unit));
            if !self.until(&bus_id, read(new_unit), |a| *a == want).await? {
                return Err(format!(
                    "the device did not answer at unit id {new_unit} after the address write"
                ));
            }
        }
        Ok(reg)
    }
}

impl Provisioner for Rs485Provisioner {
    fn families(&self) -> &'static [Family] {
        &[Family::OsdpReader, Family::ModbusDevice]
    }

    fn adopt<'a>(
        &'a self,
        candidate: &'a Candidate,
        spec: &'a AdoptSpec,
    ) -> BoxFuture<'a, Result<Registered, String>> {
        Box::pin(async move {
            let _one = self.adopting.lock().await;
            match candidate.family {
                Family::OsdpReader => self.adopt_reader(candidate, spec).await,
                Family::ModbusDevice => self.adopt_device(candidate, spec).await,
                f => Err(format!(
                    "`{}` is not adopted on the RS-485 buses",
                    f.as_str()
                )),
            }
        })
    }

    fn run(&self, registered: &[Registered]) -> Result<(), String> {
        let adopted = adopted_of(registered, &self.profiles)?;
        self.rs
            .apply_adopted(adopted, RESTART_DEADLINE)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    }
}
