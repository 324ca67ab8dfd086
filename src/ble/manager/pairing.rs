//! Install mode on BLE (docs/ble.md, *Pairing*): discovery of devices the gateway does not
//! know, and their adoption ([`crate::pairing::Provisioner`]).
//!
//! - **Discovery** ([`Manager::discover`]): while [`Scan::active`] says so, an advert from a MAC
//!   that neither the site database, `[[ble.device]]` nor the adopted devices name, and that is
//!   of a known family — a lock, controller or fob by the hardware code in its name (`NOKE3P_…`,
//!   `FOB…`) that a BLE profile lists, a BTHome v2 sensor by its service data — is reported as a candidate `ble:<MAC>` with its RSSI and
//!   identity (name, service, whether its data is encrypted), at most once a second per MAC.
//!   The last BTHome data of each is kept (at most [`MAX_HEARD`] devices, forgotten when install
//!   mode ends) to check a bind key against. Fobs the site knows as credentials are not new
//!   devices and are not reported.
//! - **Adoption**: a lock or controller goes to the unit whose site-database controller has its
//!   MAC (the cloud assigns locks and gives their keys; the installer confirms the lock on the
//!   door), with an optional offline test unlock; a BTHome sensor goes to a unit or a zone, with
//!   its bind key when it encrypts (checked by decrypting its last advert; stored through the
//!   store, never in the registry's settings, never logged or echoed). Fobs are credentials:
//!   refused with the reason.

use futures::future::BoxFuture;

use super::*;
use crate::ble::config::{BleDevice, normalize_mac, parse_key};
use crate::cloud::commands::UnitAction;
use crate::pairing::{AdoptSpec, Candidate, Family, Provisioner, Registered};

/// Unknown devices remembered in install mode at most (a crowd of passers-by's phones and fobs
/// must not grow memory).
pub(super) const MAX_HEARD: usize = 1024;
/// A candidate is reported (seen again, RSSI) at most this often.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// An unknown device heard in install mode.
pub(super) struct Heard {
    last_report: Option<Instant>,
    /// Its last BTHome service data.
    bthome: Option<Vec<u8>>,
}

/// An adopted device's `Registered::settings`: its `[[ble.device]]` table.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    id: String,
    kind: DeviceKind,
    mac: String,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    encrypted: bool,
    #[serde(default)]
    offline_after_s: Option<u64>,
}

/// What an unknown advert is, if of a known family: family, identity, BTHome data.
fn classify(seen: &Seen) -> Option<(Family, Value, Option<Vec<u8>>)> {
    if let Some((_, data)) = seen
        .service_data
        .iter()
        .find(|(u, _)| u.eq_ignore_ascii_case(bthome::SERVICE_UUID))
    {
        let info = *data.first()?;
        if info & 0xE0 != bthome::INFO_VERSION_2 {
            return None;
        }
        let identity = json!({
            "name": seen.name,
            "service": "bthome",
            "encrypted": info & bthome::INFO_ENCRYPTED != 0,
            "trigger_based": info & bthome::INFO_TRIGGER_BASED != 0,
        });
        return Some((Family::BleSensor, identity, Some(data.clone())));
    }
    let name = seen.name.as_deref()?;
    let a = noke::parse_advert(name, first_manufacturer(seen), seen.rssi)?;
    let firmware = a.firmware.map(|(major, minor)| format!("{major}.{minor}"));
    // The family profile whose hardware codes name it (devices/*.toml); a fob by its name.
    let profile = crate::ble::profile::for_hardware_code(&a.hardware_code);
    let (family, service, kind) = match (&a.hardware, profile.map(|p| p.kind)) {
        (noke::HardwareKind::Fob, _) | (_, Some(DeviceKind::Fob)) => {
            (Family::BleFob, None, DeviceKind::Fob)
        }
        (_, Some(k @ (DeviceKind::Padlock | DeviceKind::Controller))) => {
            (Family::BleLock, Some(noke::SERVICE_UUID), k)
        }
        // Codes no profile lists are not driven, so not adopted.
        _ => return None,
    };
    let identity = json!({
        "name": name,
        "service": service,
        "hardware": a.hardware_code,
        "kind": kind,
        "profile": profile.map(|p| p.id.as_str()),
        "firmware": firmware,
        "encrypted": false,
    });
    Some((family, identity, None))
}

fn fail<T>(why: impl Into<String>) -> Result<T, String> {
    Err(why.into())
}

impl<R: Radio> Manager<R> {
    /// An advert from a device nobody named: a candidate while install mode is active.
    pub(super) fn discover(&self, mac: &str, seen: &Seen, now: Instant, wall: DateTime<Utc>) {
        let scan = self.scan();
        if scan.active().is_none() {
            let mut heard = lock(&self.heard);
            if !heard.is_empty() {
                heard.clear();
            }
            return;
        }
        let Some((family, identity, data)) = classify(seen) else {
            return;
        };
        if family == Family::BleFob {
            let site = self.store.site();
            let id = fob_id(mac);
            if site
                .creds
                .get_by_value(&crate::site::CredValue::Fob(id.as_str().into()))
                .is_some()
                || site.tables.blacklisted_fobs.contains(&id)
            {
                return;
            }
        }
        {
            let mut heard = lock(&self.heard);
            if heard.len() >= MAX_HEARD && !heard.contains_key(mac) {
                return;
            }
            let h = heard.entry(mac.to_string()).or_insert(Heard {
                last_report: None,
                bthome: None,
            });
            if data.is_some() {
                h.bthome = data;
            }
            if h.last_report
                .is_some_and(|t| now.saturating_duration_since(t) < REPORT_EVERY)
            {
                return;
            }
            h.last_report = Some(now);
        }
        scan.discovered(Candidate {
            id: Candidate::ble_id(mac),
            family,
            bus: None,
            address: None,
            baud: None,
            mac: Some(mac.to_string()),
            rssi: seen.rssi,
            identity,
            first_seen: wall,
            last_seen: wall,
        });
    }

    async fn adopt_ble(
        &self,
        candidate: &Candidate,
        spec: &AdoptSpec,
    ) -> Result<Registered, String> {
        let Some(mac) = candidate.mac.as_deref().and_then(normalize_mac) else {
            return fail(format!("candidate `{}` has no MAC address", candidate.id));
        };
        for (given, name) in [
            (spec.entry.is_some(), "entry"),
            (spec.direction.is_some(), "direction"),
            (spec.profile.is_some(), "profile"),
            (spec.address.is_some(), "address"),
            (spec.baud.is_some(), "baud"),
            (!spec.inputs.is_empty(), "inputs"),
        ] {
            if given {
                return fail(format!("`{name}` does not apply to a BLE device"));
            }
        }
        let (kind, settings) = match candidate.family {
            Family::BleLock => self.adopt_lock(&mac, spec).await?,
            Family::BleSensor => self.adopt_sensor(&mac, spec).await?,
            Family::BleFob => {
                return fail(format!(
                    "a BLE fob is not adopted: give it to a user as a fob credential in the \
                     cloud (its tracking id is {})",
                    fob_id(&mac)
                ));
            }
            other => {
                return fail(format!(
                    "`{}` is a {} candidate, not a BLE one",
                    candidate.id,
                    other.as_str()
                ));
            }
        };
        Ok(Registered {
            id: settings["id"].as_str().unwrap_or_default().to_string(),
            candidate: candidate.id.clone(),
            family: kind,
            bus: None,
            settings,
            adopted_at: Utc::now(),
            // Who asked is the pairing module's to say (it has the command id or local user).
            adopted_by: String::new(),
            replaces: None,
        })
    }

    /// A lock or controller: the unit's site-database controller must have this MAC.
    async fn adopt_lock(&self, mac: &str, spec: &AdoptSpec) -> Result<(Family, Value), String> {
        let Some(unit) = spec.unit.as_deref() else {
            return fail("a lock or controller is adopted to its `unit`");
        };
        if spec.zone.is_some() || spec.bind_key.is_some() || spec.replaces.is_some() {
            return fail(
                "a lock or controller takes only `unit` (and `test_unlock`): its keys, and a \
                 replacement, come from the site database",
            );
        }
        let (device, kind) = {
            let site = self.store.site();
            let Some(u) = site.tables.units.get(unit) else {
                return fail(format!("unit `{unit}` is not in the site database"));
            };
            let Some(ctrl) = u.controller.clone() else {
                return fail(format!(
                    "unit `{unit}` names no padlock or controller in the site database: assign \
                     {mac} to it in the cloud first"
                ));
            };
            match site.tables.devices.get(&ctrl) {
                Some(d) if d.mac.eq_ignore_ascii_case(mac) => (ctrl, d.kind),
                Some(d) => {
                    return fail(format!(
                        "unit `{unit}`'s lock in the site database is `{ctrl}` with MAC {}, not \
                         {mac}: this is not the unit's lock",
                        d.mac.to_ascii_uppercase()
                    ));
                }
                None => {
                    return fail(format!(
                        "unit `{unit}` names `{ctrl}`, which is not a BLE device of the site \
                         database"
                    ));
                }
            }
        };
        if spec.device.as_deref().is_some_and(|d| d != device) {
            return fail(format!(
                "the lock is `{device}` in the site database: leave `device` out or give that id"
            ));
        }
        if spec.test_unlock {
            match self.operate(&device, UnitAction::Unlock, true).await {
                Execution::Done(d) => tracing::info!(device, "test unlock: {d}"),
                Execution::Queued => {
                    return fail(
                        "test unlock: the padlock is asleep; touch it to wake it and adopt again",
                    );
                }
                Execution::Failed(e) => return fail(format!("test unlock failed: {e}")),
            }
        }
        Ok((
            Family::BleLock,
            json!({"id": device, "kind": kind, "mac": mac, "unit": unit}),
        ))
    }

    /// A BTHome sensor: a unit or a zone, its bind key checked against its last advert.
    async fn adopt_sensor(&self, mac: &str, spec: &AdoptSpec) -> Result<(Family, Value), String> {
        let data = lock(&self.heard).get(mac).and_then(|h| h.bthome.clone());
        let Some(data) = data else {
            return fail(format!(
                "no BTHome advertisement of {mac} was heard in this install mode: wait until \
                 the sensor advertises (press its button) and adopt again"
            ));
        };
        let mut place = match (&spec.unit, &spec.zone) {
            (Some(u), None) => Some(("unit", u.clone())),
            (None, Some(z)) => Some(("zone", z.clone())),
            (Some(_), Some(_)) => return fail("a sensor goes to a `unit` or a `zone`, not both"),
            (None, None) => None,
        };
        if place.is_none()
            && let Some(old) = &spec.replaces
        {
            place = lock(&self.extra).place(old).map(|(what, at)| match what {
                "zone" => ("zone", at),
                _ => ("unit", at),
            });
        }
        let Some((what, at)) = place else {
            return fail("a sensor is adopted to a `unit` or a `zone`");
        };
        {
            let site = self.store.site();
            let known = match what {
                "unit" => site.tables.units.contains_key(&at),
                _ => site.tables.zones.contains_key(&at),
            };
            if !known {
                return fail(format!("{what} `{at}` is not in the site database"));
            }
        }
        let id = spec
            .device
            .clone()
            .unwrap_or_else(|| format!("sensor-{}", fob_id(mac).to_ascii_lowercase()));
        if self.store.site().tables.devices.contains_key(&id)
            || (lock(&self.extra).has_id(&id) && spec.replaces.as_deref() != Some(id.as_str()))
        {
            return fail(format!("device id `{id}` is already in use"));
        }
        let Some(mac_bytes) = bthome::parse_mac(mac) else {
            return fail(format!("{mac} is not a MAC address"));
        };
        let encrypted = data
            .first()
            .is_some_and(|i| i & bthome::INFO_ENCRYPTED != 0);
        // The key is a secret: no error below quotes it.
        let key = match (encrypted, spec.bind_key.as_deref()) {
            (true, None) => {
                return fail("the sensor encrypts its data: give its `bind_key` (32 hex digits)");
            }
            (false, Some(_)) => {
                return fail(
                    "the sensor sends plain data: it has no bind key (leave `bind_key` out)",
                );
            }
            (true, Some(k)) => {
                let Some(key) = parse_key(k) else {
                    return fail("`bind_key` is not a bind key (expected 32 hex digits)");
                };
                match bthome::parse(&data, Some(&key), mac_bytes) {
                    Ok(r) if r.encrypted => Some(key),
                    _ => {
                        return fail(
                            "the bind key does not decrypt the sensor's advertisement (a wrong \
                             key?)",
                        );
                    }
                }
            }
            (false, None) => {
                if let Err(e) = bthome::parse(&data, None, mac_bytes) {
                    return fail(format!("the sensor's advertisement is not readable: {e}"));
                }
                None
            }
        };
        if let Some(key) = key {
            let (store, id2) = (self.store.clone(), id.clone());
            tokio::task::spawn_blocking(move || store.set_ble_key(&id2, &key))
                .await
                .map_err(|e| format!("storing the bind key: {e}"))?
                .map_err(|e| format!("storing the bind key: {e:#}"))?;
        }
        let mut settings = json!({"id": id, "kind": "sensor", "mac": mac, "encrypted": encrypted});
        settings[what] = json!(at);
        Ok((Family::BleSensor, settings))
    }

    /// Runs the adopted BLE devices given (the full set of its families).
    fn run_registered(&self, registered: &[Registered]) -> Result<(), String> {
        let mut errors = Vec::new();
        let mut devices: Vec<BleDevice> = Vec::new();
        for r in registered
            .iter()
            .filter(|r| matches!(r.family, Family::BleLock | Family::BleSensor))
        {
            let s: Settings = match serde_json::from_value(r.settings.clone()) {
                Ok(s) => s,
                Err(e) => {
                    errors.push(format!("adopted device `{}`: {e}", r.id));
                    continue;
                }
            };
            let Some(mac) = normalize_mac(&s.mac) else {
                errors.push(format!("adopted device `{}`: bad MAC", r.id));
                continue;
            };
            devices.push(BleDevice {
                id: s.id,
                kind: s.kind,
                mac,
                unit: s.unit,
                zone: s.zone,
                key: None,
                stored_key: s.encrypted,
                offline_after_s: s.offline_after_s,
            });
        }
        let replaced = registered
            .iter()
            .filter(|r| matches!(r.family, Family::BleLock | Family::BleSensor))
            .filter_map(|r| r.replaces.clone())
            .collect();
        errors.extend(self.set_registered(devices, replaced));
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

impl<R: Radio> Provisioner for Manager<R> {
    fn families(&self) -> &'static [Family] {
        &[Family::BleLock, Family::BleSensor, Family::BleFob]
    }

    fn adopt<'a>(
        &'a self,
        candidate: &'a Candidate,
        spec: &'a AdoptSpec,
    ) -> BoxFuture<'a, Result<Registered, String>> {
        Box::pin(self.adopt_ble(candidate, spec))
    }

    fn run(&self, registered: &[Registered]) -> Result<(), String> {
        self.run_registered(registered)
    }
}
