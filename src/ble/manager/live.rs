//! What of the BLE manager changes while it runs: the `[ble]` settings a reload applies
//! ([`Manager::apply_config`], [`LivePart`]) and the devices run besides the site database's
//! ([`Extra`]: `[[ble.device]]` tables and devices adopted in install mode, given by the
//! pairing module through `Provisioner::run`).
//!
//! The adapter and `max_connections` are the radio's and the connection pool's: they change
//! only at a restart (the reload lists them in `restart_needed`). Everything else applies to the
//! next advertisement or operation; lock operations in progress finish with the settings they
//! started with.

use super::*;
use crate::ble::config::BleDevice;

/// Devices run besides the site database's. The site database wins a MAC or an id both name
/// (the cloud's record carries the lock's keys); then `[[ble.device]]`, then adopted devices.
#[derive(Default)]
pub(super) struct Extra {
    configured: Vec<BleDevice>,
    registered: Vec<BleDevice>,
    /// The `[[ble.device]]` ids an adopted device replaces: not run.
    replaced: Vec<String>,
    /// Bumped on every change (the MAC index is rebuilt then).
    pub(super) generation: u64,
}

impl Extra {
    /// The `[[ble.device]]` devices that run: those an adopted device replaces are left out.
    fn configured(&self) -> impl Iterator<Item = &BleDevice> {
        self.configured
            .iter()
            .filter(|c| !self.replaced.contains(&c.id))
    }

    fn all(&self) -> impl Iterator<Item = &BleDevice> {
        self.configured().chain(
            self.registered
                .iter()
                .filter(|r| !self.configured().any(|c| c.id == r.id || c.mac == r.mac)),
        )
    }

    /// As site database records (no lock keys: a lock's come from the site database).
    pub(super) fn devices(&self) -> Vec<Device> {
        self.all().map(as_device).collect()
    }

    pub(super) fn device(&self, id: &str) -> Option<Device> {
        self.all().find(|d| d.id == id).map(as_device)
    }

    /// Where an extra device is, as its events say it: `("unit_id", id)` (`unit` is a
    /// reading's unit of measure) or `("zone", id)`.
    pub(super) fn place(&self, id: &str) -> Option<(&'static str, String)> {
        let d = self.all().find(|d| d.id == id)?;
        match (&d.unit, &d.zone) {
            (Some(u), _) => Some(("unit_id", u.clone())),
            (_, Some(z)) => Some(("zone", z.clone())),
            _ => None,
        }
    }

    /// Where the devices that run are, for automation (the site database's devices win there).
    fn placed(&self) -> crate::automation::placed::Placed {
        use crate::automation::placed::{Place, Placed};
        Placed::new(self.all().filter_map(|d| {
            let place = match (&d.unit, &d.zone) {
                (Some(u), _) => Place::Unit(u.as_str().into()),
                (_, Some(z)) => Place::Zone(z.as_str().into()),
                _ => return None,
            };
            Some((d.id.clone(), place))
        }))
    }

    pub(super) fn has_id(&self, id: &str) -> bool {
        self.all().any(|d| d.id == id)
    }

    pub(super) fn registered(&self) -> &[BleDevice] {
        &self.registered
    }
}

fn as_device(d: &BleDevice) -> Device {
    Device {
        id: d.id.clone(),
        kind: d.kind,
        mac: d.mac.clone(),
        offline_key: None,
        unlock_command: None,
        key: d.key.clone(),
        offline_after_s: d.offline_after_s,
    }
}

impl<R: Radio> Manager<R> {
    /// Applies a reloaded `[ble]` section (already checked whole): fob settings, the online
    /// unlock's wait, profiles and `[[ble.device]]` at once; `adapter` and `max_connections`
    /// stay as started. Returns the names of the settings that changed.
    pub fn apply_config(&self, new: &BleConfig) -> Vec<String> {
        let old = self.cfg();
        let mut next = new.clone();
        next.adapter = old.adapter.clone();
        next.max_connections = old.max_connections;
        let mut changed = Vec::new();
        let mut note = |differs: bool, name: &str| {
            if differs {
                changed.push(format!("ble.{name}"));
            }
        };
        note(old.fob_entries != next.fob_entries, "fob_entries");
        note(old.fob_min_rssi != next.fob_min_rssi, "fob_min_rssi");
        note(old.fob_repeat != next.fob_repeat, "fob_repeat_s");
        note(
            old.online_unlock_timeout != next.online_unlock_timeout,
            "online_unlock_timeout_ms",
        );
        note(
            format!("{:?}", old.profiles) != format!("{:?}", next.profiles),
            "profiles",
        );
        let devices_changed = old.devices != next.devices;
        note(devices_changed, "device");
        *self.cfg.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        if devices_changed {
            self.load_configured();
        }
        if !changed.is_empty() {
            tracing::info!(changed = %changed.join(","), "BLE settings applied");
        }
        changed
    }

    /// A `[[ble.device]]` that names an adopted device's id or MAC: the reason, naming both (one
    /// an adopted device replaces is not run, so it conflicts with nothing).
    pub fn config_conflict(&self, devices: &[BleDevice]) -> Option<String> {
        let extra = lock(&self.extra);
        for c in devices.iter().filter(|c| !extra.replaced.contains(&c.id)) {
            if let Some(r) = extra
                .registered()
                .iter()
                .find(|r| r.id == c.id || r.mac == c.mac)
            {
                let what = if r.id == c.id { "id" } else { "MAC" };
                return Some(format!(
                    "[[ble.device]] `{}` ({}) has the {what} of the adopted device `{}` (the \
                     gateway's registry): remove one of them (`gatehouse pair remove`, or the \
                     table)",
                    c.id, c.mac, r.id
                ));
            }
        }
        None
    }

    /// Runs the `[[ble.device]]` devices of the running configuration (at start, and when a
    /// reload changed them).
    pub(super) fn load_configured(&self) {
        let mut errors = Vec::new();
        let devices = self.with_stored_keys(self.cfg().devices.clone(), &mut errors);
        for e in errors {
            tracing::error!("[[ble.device]]: {e}");
        }
        let placed = {
            let mut extra = lock(&self.extra);
            extra.configured = devices;
            extra.generation += 1;
            extra.placed()
        };
        self.place_for_automation(placed);
    }

    /// Tells automation where the extra devices are (a sensor in a unit is that unit's sensor
    /// for its rules): a short mutex, not the bounded fact queue.
    fn place_for_automation(&self, placed: crate::automation::placed::Placed) {
        let facts = self.engine.facts();
        if facts.is_connected() {
            facts.placements().set(placed);
        }
    }

    /// Runs these adopted devices from now on (the full set: one missing stops), and not the
    /// `[[ble.device]]` devices `replaced` names; the bind keys of sensors no longer in it are
    /// forgotten.
    pub(super) fn set_registered(
        &self,
        devices: Vec<BleDevice>,
        replaced: Vec<String>,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        let devices = self.with_stored_keys(devices, &mut errors);
        let (gone, placed): (Vec<String>, _) = {
            let mut extra = lock(&self.extra);
            let gone = extra
                .registered()
                .iter()
                .filter(|o| o.stored_key && !devices.iter().any(|d| d.id == o.id))
                .map(|o| o.id.clone())
                .collect();
            extra.registered = devices;
            extra.replaced = replaced;
            extra.generation += 1;
            (gone, extra.placed())
        };
        self.place_for_automation(placed);
        for id in gone {
            if let Err(e) = self.store.clear_ble_key(&id) {
                errors.push(format!("forgetting the bind key of `{id}`: {e:#}"));
            }
        }
        errors
    }

    /// Fills in the bind keys kept in the store (adopted encrypted sensors). A sensor whose
    /// key cannot be read is still run (its encrypted adverts are then not read) and named in
    /// `errors`.
    fn with_stored_keys(
        &self,
        mut devices: Vec<BleDevice>,
        errors: &mut Vec<String>,
    ) -> Vec<BleDevice> {
        for d in devices
            .iter_mut()
            .filter(|d| d.stored_key && d.key.is_none())
        {
            match self.store.ble_key(&d.id) {
                Ok(Some(k)) => d.key = Some(hex::encode_upper(k)),
                Ok(None) => errors.push(format!(
                    "no bind key is stored for the encrypted sensor `{}`: adopt it again",
                    d.id
                )),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        devices
    }
}

/// The BLE manager as a part of a configuration reload (`reload::Part`): a reloaded `[ble]`
/// section is applied live (see [`Manager::apply_config`]). A section added or removed, or a
/// changed adapter or `max_connections`, waits for a restart (the reload says so).
pub struct LivePart(pub Arc<dyn Control>);

impl crate::reload::Part for LivePart {
    /// Refuses a `[[ble.device]]` that names an adopted device's id or MAC.
    fn check(
        &self,
        _old: &crate::config::Config,
        new: &crate::config::Config,
    ) -> anyhow::Result<()> {
        match new
            .ble
            .as_ref()
            .and_then(|b| self.0.config_conflict(&b.devices))
        {
            Some(why) => Err(anyhow::anyhow!("{}: {why}", new.path.display())),
            None => Ok(()),
        }
    }

    fn apply(
        &self,
        old: &crate::config::Config,
        new: &crate::config::Config,
    ) -> anyhow::Result<Vec<String>> {
        Ok(match (&old.ble, &new.ble) {
            (Some(_), Some(n)) => self.0.apply_config(n),
            _ => Vec::new(),
        })
    }
}
