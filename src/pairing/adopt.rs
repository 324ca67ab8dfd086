//! Adoption and removal (signed `adopt`/`remove`, or the local control socket): the checks,
//! then the family's [`Provisioner::adopt`], the registry write (flushed), the provisioner run
//! with the full set, and the `device_adopted` / `device_removed` security events (flushed)
//! before the answer. Each request gets exactly one answer; a refusal or a failure leaves the
//! registry and the running devices as they were.

use std::sync::Arc;

use chrono::Utc;
use serde_json::json;

use super::install::{Inner, PairError, PairReason, Pairing};
use super::registry::{InUse, clash, clash_message, of_registered, running};
use super::{AdoptSpec, Candidate, Family, Provisioner, Registered};
use crate::events::EventKind;

/// The device id a candidate gets when the request names none: its id with `:` as `-`
/// (`osdp:bus-1:5` → `osdp-bus-1-5`; a MAC's colons too).
pub fn default_device_id(candidate: &str) -> String {
    candidate.replace(':', "-")
}

/// Removes the candidate from the adopting set when the adoption ends, however it ends.
struct Adopting<'a> {
    pairing: &'a Pairing,
    candidate: String,
}

impl Drop for Adopting<'_> {
    fn drop(&mut self) {
        self.pairing.lock().adopting.remove(&self.candidate);
    }
}

impl Pairing {
    fn provisioner(&self, family: Family) -> Option<Arc<dyn Provisioner>> {
        self.provisioners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|p| p.families().contains(&family))
            .cloned()
    }

    /// What `mine` would clash with (the configured devices that run — not those an adopted
    /// device replaces —, the registry, both outside `except` — the device it replaces —, and
    /// the other adoptions under way, outside `candidate`'s own).
    fn in_use(
        &self,
        g: &Inner,
        mine: &InUse,
        except: Option<&str>,
        candidate: &str,
    ) -> Option<String> {
        let registry: Vec<InUse> = g.registry.iter().map(of_registered).collect();
        let configured = running(&self.configured(), &g.registry);
        configured
            .iter()
            .chain(registry.iter())
            .filter(|o| Some(o.id.as_str()) != except)
            .chain(
                g.adopting
                    .iter()
                    .filter(|(c, _)| c.as_str() != candidate)
                    .map(|(_, u)| u),
            )
            .find_map(|o| clash(o, mine).map(|what| clash_message(what, o, mine)))
    }

    /// Checks an adoption before anything is done: install mode, the candidate, the device
    /// id, the address, what it replaces. Returns the candidate, the device id and the
    /// configured device the new record stands in for ([`Registered::replaces`]).
    fn check_adopt(
        &self,
        spec: &AdoptSpec,
    ) -> Result<(Candidate, String, Option<String>), PairError> {
        let refuse = |r: PairReason, d: String| Err(PairError::new(r, d));
        let cand = crate::redact::name(&spec.candidate);
        let mut g = self.lock();
        if g.registry.iter().any(|r| r.candidate == spec.candidate) {
            return refuse(
                PairReason::AlreadyAdopted,
                format!("candidate {cand} is adopted already"),
            );
        }
        if g.adopting.contains_key(&spec.candidate) {
            return refuse(
                PairReason::AlreadyAdopted,
                format!("candidate {cand} is being adopted"),
            );
        }
        let Some(session) = g.live() else {
            return refuse(
                PairReason::NotInInstallMode,
                "install mode is not active: start it first".into(),
            );
        };
        let candidate = match session.found.get(&spec.candidate) {
            Some(f) if f.recorded => f.candidate.clone(),
            _ => {
                return refuse(
                    PairReason::UnknownCandidate,
                    format!("no candidate {cand} (see `pair list` or pairing/discovered)"),
                );
            }
        };
        // What it replaces: an adopted device, or a configured one that runs (one an adopted
        // device replaces already is not: that one is named instead). `toml` is the configured
        // device the new record stands in for (inherited through an adopted one).
        let (replaced, toml) = match &spec.replaces {
            None => (None, None),
            Some(old) => {
                let name = crate::redact::name(old);
                let (family, toml) = if let Some(r) = g.registry.iter().find(|r| &r.id == old) {
                    (Some(r.family), r.replaces.clone())
                } else if let Some(c) = running(&self.configured(), &g.registry)
                    .into_iter()
                    .find(|c| &c.id == old)
                {
                    (c.family, Some(c.id))
                } else {
                    let by = g
                        .registry
                        .iter()
                        .find(|r| r.replaces.as_ref() == Some(old))
                        .map(|r| format!("`{}`", r.id));
                    drop(g);
                    return refuse(
                        PairReason::UnknownDevice,
                        match by {
                            Some(by) => format!(
                                "device {name} of the TOML config is replaced by {by} already: \
                                 replace that one"
                            ),
                            None => format!("no adopted or configured device {name}"),
                        },
                    );
                };
                if family != Some(candidate.family) {
                    return refuse(
                        PairReason::BadSpec,
                        format!(
                            "a {} cannot replace a {}",
                            candidate.family.as_str(),
                            family.map_or("device of another kind", |f| f.as_str())
                        ),
                    );
                }
                (Some(old.clone()), toml)
            }
        };
        drop(g);
        let device = spec
            .device
            .clone()
            .or_else(|| replaced.clone())
            .unwrap_or_else(|| default_device_id(&candidate.id));
        if !crate::config::valid_id(&device) {
            return refuse(
                PairReason::BadSpec,
                format!(
                    "device id {} is not valid (1 to 64 of A-Z a-z 0-9 - _ .)",
                    crate::redact::name(&device)
                ),
            );
        }
        let mine = InUse {
            id: device.clone(),
            bus: candidate.bus.clone(),
            address: spec.address.or(candidate.address),
            mac: candidate.mac.as_ref().map(|m| m.to_ascii_uppercase()),
            family: Some(candidate.family),
            place: format!("the adoption of {cand}"),
        };
        // Checked and reserved under one lock: a concurrent adoption sees the reservation.
        let mut g = self.lock();
        if g.adopting.contains_key(&spec.candidate) {
            return refuse(
                PairReason::AlreadyAdopted,
                format!("candidate {cand} is being adopted"),
            );
        }
        if let Some(msg) = self.in_use(&g, &mine, replaced.as_deref(), &spec.candidate) {
            return refuse(PairReason::InUse, msg);
        }
        g.adopting.insert(spec.candidate.clone(), mine);
        Ok((candidate, device, toml))
    }

    /// Adopts a candidate as `spec` asks; `by` is `command:<id>` or `local:<user>`. Blocking
    /// (the provisioner's work, flushes): call it from a blocking thread.
    pub fn adopt(&self, spec: &AdoptSpec, by: &str) -> Result<Registered, PairError> {
        let (candidate, device, toml) = self.check_adopt(spec)?;
        let _adopting = Adopting {
            pairing: self,
            candidate: spec.candidate.clone(),
        };
        let Some(prov) = self.provisioner(candidate.family) else {
            return Err(PairError::new(
                PairReason::NoProvisioner,
                format!(
                    "this gateway does not provision {} devices",
                    candidate.family.as_str()
                ),
            ));
        };
        let mut spec = spec.clone();
        spec.device = Some(device.clone());
        let fut = prov.adopt(&candidate, &spec);
        let provisioned = match &self.rt {
            Some(rt) => rt.block_on(fut),
            None => futures::executor::block_on(fut),
        };
        let mut record = provisioned.map_err(|e| {
            PairError::new(
                PairReason::Provisioning,
                format!("provisioning {} failed: {e}", candidate.id),
            )
        })?;
        record.id = device.clone();
        record.candidate = candidate.id.clone();
        record.family = candidate.family;
        record.adopted_by = by.to_string();
        record.adopted_at = Utc::now();
        record.replaces = toml.clone();
        // The record as the driver returned it must not clash either (a new address), and no
        // other adoption may have replaced the same configured device meanwhile.
        let clash = {
            let g = self.lock();
            let twice = toml.as_ref().and_then(|t| {
                g.registry
                    .iter()
                    .find(|r| {
                        r.replaces.as_ref() == Some(t) && spec.replaces.as_ref() != Some(&r.id)
                    })
                    .map(|r| format!("configured device `{t}` is replaced by `{}` already", r.id))
            });
            twice.or_else(|| {
                self.in_use(
                    &g,
                    &of_registered(&record),
                    spec.replaces.as_deref(),
                    &candidate.id,
                )
            })
        };
        if let Some(msg) = clash {
            return Err(PairError::new(PairReason::InUse, msg));
        }
        let replaced = spec
            .replaces
            .as_ref()
            .and_then(|old| self.lock().registry.iter().find(|r| &r.id == old).cloned());
        let storage = |e: anyhow::Error| {
            PairError::new(
                PairReason::Storage,
                format!("the registry could not be written: {e:#}"),
            )
        };
        if let Some(old) = &replaced
            && old.id != record.id
        {
            self.store.registry_remove(&old.id).map_err(storage)?;
        }
        if let Err(e) = self.store.registry_put(&record) {
            if let Some(old) = &replaced {
                let _ = self.store.registry_put(old);
            }
            return Err(storage(e));
        }
        {
            let mut g = self.lock();
            g.registry
                .retain(|r| r.id != record.id && Some(&r.id) != replaced.as_ref().map(|o| &o.id));
            g.registry.push(record.clone());
            g.registry.sort_by(|a, b| a.id.cmp(&b.id));
        }
        if let Err(e) = self.run_provisioner(prov.as_ref()) {
            // Undo: the registry as it was, the devices as they ran.
            let _ = self.store.registry_remove(&record.id);
            if let Some(old) = &replaced {
                let _ = self.store.registry_put(old);
            }
            {
                let mut g = self.lock();
                g.registry.retain(|r| r.id != record.id);
                if let Some(old) = &replaced {
                    g.registry.push(old.clone());
                    g.registry.sort_by(|a, b| a.id.cmp(&b.id));
                }
            }
            let _ = self.run_provisioner(prov.as_ref());
            return Err(PairError::new(
                PairReason::Provisioning,
                format!("running {} failed: {e}", record.id),
            ));
        }
        // The device replaced leaves: an adopted one, or a configured one (no longer run).
        let gone = match (&replaced, &spec.replaces) {
            (Some(old), _) => Some((old.id.clone(), old.family)),
            (None, Some(old)) => Some((old.clone(), record.family)),
            (None, None) => None,
        };
        if let Some((old, family)) = &gone {
            let payload = json!({"device": old, "family": family, "removed_by": by,
                                 "replaced_by": record.id});
            if let Err(e) = self.store.record_flushed(EventKind::DeviceRemoved, payload) {
                tracing::error!("recording device_removed: {e:#}");
            }
            if replaced.is_none() {
                tracing::warn!(
                    device = %record.id,
                    replaces = %old,
                    "the adopted device replaces a device of the TOML config, which is no longer \
                     run: remove it from the config (`gatehouse devices export` prints the \
                     adopted devices as tables to paste)"
                );
            }
        }
        let mut payload = json!({
            "device": record.id, "candidate": record.candidate, "family": record.family,
            "adopted_by": by, "settings": record.settings,
        });
        if let Some(bus) = &record.bus {
            payload["bus"] = json!(bus);
        }
        if let Some((old, _)) = &gone {
            payload["replaces"] = json!(old);
        }
        self.store
            .record_flushed(EventKind::DeviceAdopted, payload)
            .map_err(|e| {
                tracing::error!("recording device_adopted: {e:#}");
                PairError::new(
                    PairReason::Storage,
                    format!(
                        "device `{}` is adopted but its event could not be recorded: {e:#}",
                        record.id
                    ),
                )
            })?;
        {
            let mut g = self.lock();
            if let Some(s) = g.live() {
                s.found.remove(&candidate.id);
                s.adopted += 1;
            }
            g.touch();
        }
        self.notify();
        tracing::info!(device = %record.id, candidate = %candidate.id, by, "device adopted");
        Ok(record)
    }

    /// Removes an adopted device: the registry record (flushed), then its provisioner runs the
    /// rest, then `device_removed`. Devices of the TOML config are refused (`configured`); a
    /// configured device the removed one replaced runs again (if the config still has it).
    pub fn remove(&self, device: &str, by: &str) -> Result<Registered, PairError> {
        let found = self
            .lock()
            .registry
            .iter()
            .find(|r| r.id == device)
            .cloned();
        let Some(record) = found else {
            let name = crate::redact::name(device);
            return Err(if self.configured().iter().any(|c| c.id == device) {
                PairError::new(
                    PairReason::Configured,
                    format!("device {name} is in the TOML config: remove it there"),
                )
            } else {
                PairError::new(
                    PairReason::UnknownDevice,
                    format!("no adopted device {name}"),
                )
            });
        };
        self.store.registry_remove(device).map_err(|e| {
            PairError::new(
                PairReason::Storage,
                format!("the registry could not be written: {e:#}"),
            )
        })?;
        {
            let mut g = self.lock();
            g.registry.retain(|r| r.id != device);
            g.touch();
        }
        self.notify();
        if let Some(prov) = self.provisioner(record.family)
            && let Err(e) = self.run_provisioner(prov.as_ref())
        {
            tracing::warn!(device, "the driver did not take the removal: {e}");
        }
        let payload = json!({"device": record.id, "family": record.family, "removed_by": by});
        if let Err(e) = self.store.record_flushed(EventKind::DeviceRemoved, payload) {
            tracing::error!("recording device_removed: {e:#}");
        }
        tracing::info!(device, by, "device removed");
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::mpsc::{Receiver, Sender, channel};
    use std::time::Duration;

    use futures::future::BoxFuture;

    use super::*;
    use crate::pairing::{Scan as _, ScanOptions};
    use crate::store::Store;

    /// Waits in `adopt` until told to go on; `run` fails when asked to.
    struct Gated {
        entered: Mutex<Sender<()>>,
        go: Mutex<Receiver<()>>,
        fail_run: std::sync::atomic::AtomicBool,
        runs: Mutex<Vec<usize>>,
    }

    impl Provisioner for Gated {
        fn families(&self) -> &'static [Family] {
            &[Family::ModbusDevice]
        }
        fn adopt<'a>(
            &'a self,
            c: &'a Candidate,
            spec: &'a AdoptSpec,
        ) -> BoxFuture<'a, Result<Registered, String>> {
            Box::pin(async move {
                let _ = self.entered.lock().unwrap().send(());
                let _ = self
                    .go
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(30));
                Ok(Registered {
                    id: spec.device.clone().unwrap_or_default(),
                    candidate: c.id.clone(),
                    family: c.family,
                    bus: c.bus.clone(),
                    settings: json!({"address": c.address, "profile": "p"}),
                    adopted_at: Utc::now(),
                    adopted_by: String::new(),
                    replaces: None,
                })
            })
        }
        fn run(&self, registered: &[Registered]) -> Result<(), String> {
            self.runs.lock().unwrap().push(registered.len());
            if self.fail_run.load(std::sync::atomic::Ordering::SeqCst) {
                return Err("the bus did not take it".into());
            }
            Ok(())
        }
    }

    fn candidate(unit: u8) -> Candidate {
        Candidate {
            id: Candidate::modbus_id("bus-2", unit),
            family: Family::ModbusDevice,
            bus: Some("bus-2".into()),
            address: Some(unit),
            baud: None,
            mac: None,
            rssi: None,
            identity: json!({}),
            first_seen: Utc::now(),
            last_seen: Utc::now(),
        }
    }

    /// The directory, the store, pairing with two candidates, the provisioner, its gate.
    type Rig = (
        tempfile::TempDir,
        Arc<Store>,
        Arc<Pairing>,
        Arc<Gated>,
        Receiver<()>,
        Sender<()>,
    );

    fn setup() -> Rig {
        setup_with(Vec::new())
    }

    /// The config declares `board-1` (Modbus, unit 1 on `bus-2`) and `r1` (OSDP reader).
    fn configured() -> Vec<InUse> {
        let dev = |id: &str, address, family, kind: &str| InUse {
            id: id.into(),
            bus: Some("bus-2".into()),
            address: Some(address),
            mac: None,
            family: Some(family),
            place: format!("config `g.toml`, [[bus]] `bus-2`, {kind} `{id}`"),
        };
        vec![
            dev("board-1", 1, Family::ModbusDevice, "[[bus.device]]"),
            dev("r1", 2, Family::OsdpReader, "[[bus.reader]]"),
        ]
    }

    fn setup_with(configured: Vec<InUse>) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 100_000).unwrap());
        let (entered_tx, entered_rx) = channel();
        let (go_tx, go_rx) = channel();
        let prov = Arc::new(Gated {
            entered: Mutex::new(entered_tx),
            go: Mutex::new(go_rx),
            fail_run: false.into(),
            runs: Mutex::new(Vec::new()),
        });
        let p = Pairing::open(store.clone(), configured, vec![prov.clone()]).unwrap();
        p.start_for(Duration::from_secs(600), "local:t", ScanOptions::default())
            .unwrap();
        for unit in [7, 8] {
            p.discovered(candidate(unit));
            p.record_found(&Candidate::modbus_id("bus-2", unit));
        }
        (dir, store, p, prov, entered_rx, go_tx)
    }

    fn replacing(unit: u8, device: Option<&str>, old: &str) -> AdoptSpec {
        AdoptSpec {
            candidate: Candidate::modbus_id("bus-2", unit),
            device: device.map(str::to_string),
            replaces: Some(old.into()),
            ..Default::default()
        }
    }

    fn events(store: &Store, kind: &str) -> Vec<serde_json::Value> {
        store
            .events()
            .read_from(0, 10_000)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.payload)
            .collect()
    }

    fn spec(unit: u8, device: &str) -> AdoptSpec {
        AdoptSpec {
            candidate: Candidate::modbus_id("bus-2", unit),
            device: Some(device.into()),
            ..Default::default()
        }
    }

    #[test]
    fn two_adoptions_at_once_cannot_take_the_same_device_id() {
        let (_dir, store, p, _prov, entered, go) = setup();
        let first = {
            let p = p.clone();
            std::thread::spawn(move || p.adopt(&spec(7, "board"), "local:a"))
        };
        entered.recv_timeout(Duration::from_secs(30)).unwrap();
        // While the first provisions: the same id is reserved, the same candidate busy.
        let e = p.adopt(&spec(8, "board"), "local:b").unwrap_err();
        assert_eq!(e.reason, PairReason::InUse, "{e}");
        let e = p.adopt(&spec(7, "other"), "local:b").unwrap_err();
        assert_eq!(e.reason, PairReason::AlreadyAdopted, "{e}");
        go.send(()).unwrap();
        assert_eq!(first.join().unwrap().unwrap().id, "board");
        assert_eq!(store.registry_list().unwrap().len(), 1);
        // The reservation is gone with the adoption: another id works.
        go.send(()).unwrap();
        assert_eq!(
            p.adopt(&spec(8, "board-8"), "local:b").unwrap().id,
            "board-8"
        );
    }

    #[test]
    fn a_run_that_fails_undoes_the_adoption() {
        let (_dir, store, p, prov, _entered, go) = setup();
        prov.fail_run
            .store(true, std::sync::atomic::Ordering::SeqCst);
        go.send(()).unwrap();
        let e = p.adopt(&spec(7, "board"), "local:a").unwrap_err();
        assert_eq!(e.reason, PairReason::Provisioning, "{e}");
        assert!(store.registry_list().unwrap().is_empty());
        assert!(p.registered().is_empty());
        // Run with the set (1), then again with the old one (0).
        assert_eq!(*prov.runs.lock().unwrap(), vec![0, 1, 0]);
        // The candidate can be adopted again once the bus takes it.
        prov.fail_run
            .store(false, std::sync::atomic::Ordering::SeqCst);
        go.send(()).unwrap();
        p.adopt(&spec(7, "board"), "local:a").unwrap();
        assert_eq!(store.registry_list().unwrap().len(), 1);
    }

    #[test]
    fn a_configured_device_is_replaced_and_left_out_until_its_replacement_goes() {
        let (_dir, store, p, prov, _entered, go) = setup_with(configured());
        // `remove` of a configured device stays refused; a reader cannot replace a board.
        let e = p.remove("board-1", "local:a").unwrap_err();
        assert_eq!(e.reason, PairReason::Configured, "{e}");
        let e = p.adopt(&replacing(7, None, "r1"), "local:a").unwrap_err();
        assert_eq!(e.reason, PairReason::BadSpec, "{e}");
        assert!(e.detail.contains("cannot replace a osdp_reader"), "{e}");
        let e = p.adopt(&replacing(7, None, "nope"), "local:a").unwrap_err();
        assert_eq!(e.reason, PairReason::UnknownDevice, "{e}");

        // Replaced: the new board takes the configured one's id; the record names it.
        go.send(()).unwrap();
        let r = p.adopt(&replacing(7, None, "board-1"), "local:a").unwrap();
        assert_eq!(
            (r.id.as_str(), r.replaces.as_deref()),
            ("board-1", Some("board-1"))
        );
        assert_eq!(p.registered()[0].replaces.as_deref(), Some("board-1"));
        let adopted = events(&store, "device_adopted");
        assert_eq!(adopted[0]["replaces"], "board-1");
        let removed = events(&store, "device_removed");
        assert_eq!(
            (&removed[0]["device"], &removed[0]["replaced_by"]),
            (&json!("board-1"), &json!("board-1"))
        );
        assert_eq!(*prov.runs.lock().unwrap(), vec![0, 1]);
        // Its address (unit 1) is free now: another device may take it.
        assert!(
            p.in_use(&p.lock(), &in_use("other", 1), None, "x")
                .is_none()
        );
        // The replacement replaced: the configured device stays left out (inherited).
        go.send(()).unwrap();
        let r = p
            .adopt(&replacing(8, Some("board-8"), "board-1"), "local:a")
            .unwrap();
        assert_eq!(r.replaces.as_deref(), Some("board-1"));
        let reg = store.registry_list().unwrap();
        assert_eq!(reg.len(), 1);
        assert_eq!(
            (reg[0].id.as_str(), reg[0].replaces.as_deref()),
            ("board-8", Some("board-1"))
        );
        // The configured device's id is free now (it is not run); naming it again is refused:
        // its replacement is named instead.
        assert!(
            p.in_use(&p.lock(), &in_use("board-1", 9), None, "x")
                .is_none()
        );
        p.discovered(candidate(9));
        p.record_found(&Candidate::modbus_id("bus-2", 9));
        let e = p
            .adopt(&replacing(9, None, "board-1"), "local:a")
            .unwrap_err();
        assert_eq!(e.reason, PairReason::UnknownDevice, "{e}");
        assert!(e.detail.contains("replaced by `board-8` already"), "{e}");

        // After a restart the merge leaves it out again (no conflict at its address or id).
        drop(p);
        let p = Pairing::open(store.clone(), configured(), vec![prov.clone()]).unwrap();
        assert_eq!(p.registered().len(), 1);
        assert_eq!(prov.runs.lock().unwrap().last(), Some(&1));
        // The config edited to drop the device: nothing breaks.
        drop(p);
        let cleaned: Vec<InUse> = configured()
            .into_iter()
            .filter(|c| c.id != "board-1")
            .collect();
        Pairing::open(store.clone(), cleaned, vec![]).unwrap();

        // Its replacement removed: the configured device is back in use (runs again).
        let p = Pairing::open(store.clone(), configured(), vec![prov.clone()]).unwrap();
        p.remove("board-8", "local:a").unwrap();
        assert!(
            p.in_use(&p.lock(), &in_use("other", 1), None, "x")
                .is_some()
        );
    }

    fn in_use(id: &str, unit: u8) -> InUse {
        InUse {
            id: id.into(),
            bus: Some("bus-2".into()),
            address: Some(unit),
            mac: None,
            family: Some(Family::ModbusDevice),
            place: "test".into(),
        }
    }
}
