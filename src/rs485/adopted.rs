//! The devices adopted in install mode as the buses run them: a registry record checked as the
//! configuration's own `[[bus.reader]]`/`[[bus.device]]` table ([`adopted_from`]), the merge
//! with the configured buses ([`merge`]: added to their bus, the configured devices they
//! replace left out, a conflict refused naming both), and the buses' start with them already
//! merged ([`start`]). The provisioner that adopts them is `provision.rs`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;

use super::Rs485;
use super::config::{BusConfig, BusKind, DeviceConfig, RawBus, ReaderConfig};
use crate::pairing::{Family, Registered};
use crate::profiles::Profiles;

/// A device adopted in install mode, as its bus runs it.
#[derive(Debug, Clone)]
pub enum AdoptedDevice {
    Reader(ReaderConfig),
    Device(DeviceConfig),
}

#[derive(Debug, Clone)]
pub struct Adopted {
    pub bus: String,
    pub device: AdoptedDevice,
    /// The configured device it stands in for ([`Registered::replaces`]): left out of the
    /// configured buses while this one runs.
    pub replaces: Option<String>,
}

impl Adopted {
    /// The device's id.
    pub fn id(&self) -> &str {
        match &self.device {
            AdoptedDevice::Reader(r) => &r.id,
            AdoptedDevice::Device(d) => &d.id,
        }
    }
}

/// The configured buses without the devices `replaced` names (a name the configuration no
/// longer has is ignored).
pub(super) fn without(base: &[BusConfig], replaced: &HashSet<&str>) -> Vec<BusConfig> {
    let mut out = base.to_vec();
    if replaced.is_empty() {
        return out;
    }
    for bus in &mut out {
        match &mut bus.kind {
            BusKind::Osdp(readers) => readers.retain(|r| !replaced.contains(r.id.as_str())),
            BusKind::Modbus { devices, .. } => {
                devices.retain(|d| !replaced.contains(d.id.as_str()))
            }
        }
    }
    out
}

/// The configured buses with the adopted devices added to theirs, and without the configured
/// devices they replace. Refused (nothing merged) when an adopted device's bus is gone, its id
/// is used by the configuration (or twice), or its address is taken on its bus.
pub fn merge(base: &[BusConfig], adopted: &[Adopted]) -> Result<Vec<BusConfig>, String> {
    let replaced: HashSet<&str> = adopted
        .iter()
        .filter_map(|a| a.replaces.as_deref())
        .collect();
    let mut out = without(base, &replaced);
    let mut ids: HashSet<String> = out
        .iter()
        .flat_map(|b| {
            std::iter::once(b.id.clone()).chain(b.device_ids().into_iter().map(String::from))
        })
        .collect();
    for a in adopted {
        let id = a.id();
        let Some(bus) = out.iter_mut().find(|b| b.id == a.bus) else {
            return Err(format!(
                "adopted device `{id}` is on bus `{}`, which the configuration does not have",
                a.bus
            ));
        };
        if !ids.insert(id.to_string()) {
            return Err(format!(
                "device id `{id}` is both in the configuration (or adopted twice) and in the \
                 registry of adopted devices"
            ));
        }
        match (&mut bus.kind, &a.device) {
            (BusKind::Osdp(readers), AdoptedDevice::Reader(r)) => {
                if let Some(x) = readers.iter().find(|x| x.address == r.address) {
                    return Err(format!(
                        "OSDP address {} on bus `{}` is used by reader `{}` and by adopted reader `{id}`",
                        r.address, a.bus, x.id
                    ));
                }
                readers.push(r.clone());
            }
            (BusKind::Modbus { devices, .. }, AdoptedDevice::Device(d)) => {
                if let Some(x) = devices.iter().find(|x| x.address == d.address) {
                    return Err(format!(
                        "unit id {} on bus `{}` is used by device `{}` and by adopted device `{id}`",
                        d.address, a.bus, x.id
                    ));
                }
                devices.push(d.clone());
            }
            _ => {
                return Err(format!(
                    "adopted device `{id}` does not speak the protocol of bus `{}`",
                    a.bus
                ));
            }
        }
    }
    Ok(out)
}

/// A registered device's settings checked as the configuration's own `[[bus.reader]]` /
/// `[[bus.device]]` table would be.
pub fn adopted_from(reg: &Registered, profiles: &Profiles) -> Result<Adopted, String> {
    let bus = reg
        .bus
        .clone()
        .ok_or_else(|| format!("adopted device `{}` names no bus", reg.id))?;
    let (protocol, table) = match reg.family {
        Family::OsdpReader => ("osdp", "reader"),
        Family::ModbusDevice => ("modbus", "device"),
        f => return Err(format!("`{}` is not an RS-485 device", f.as_str())),
    };
    let settings = toml::Value::try_from(&reg.settings)
        .map_err(|e| format!("adopted device `{}`: settings: {e}", reg.id))?;
    let doc = json!({"bus": [{"id": bus, "port": "/dev/null", "protocol": protocol}]});
    let mut doc = toml::Value::try_from(&doc).map_err(|e| e.to_string())?;
    if let Some(b) = doc
        .get_mut("bus")
        .and_then(|b| b.as_array_mut())
        .and_then(|a| a.first_mut())
        .and_then(|b| b.as_table_mut())
    {
        b.insert(table.into(), toml::Value::Array(vec![settings]));
    }
    let text = toml::to_string(&doc).map_err(|e| e.to_string())?;
    #[derive(serde::Deserialize)]
    struct Doc {
        bus: Vec<RawBus>,
    }
    let raw: Doc = toml::from_str(&text)
        .map_err(|e| format!("adopted device `{}`: {}", reg.id, e.message()))?;
    let err = |_: std::ops::Range<usize>, key: &str, message: String| crate::config::ConfigError {
        file: PathBuf::from("registry"),
        line: 0,
        key: Some(key.to_string()),
        message,
    };
    let checked = super::config::check(&raw.bus, &|p| PathBuf::from(p), &err, false, profiles)
        .map_err(|e| {
            let key = e.key.unwrap_or_default();
            let key = key.split_once("].").map_or(key.as_str(), |k| k.1);
            format!("adopted device `{}`: {key}: {}", reg.id, e.message)
        })?;
    let device = match checked.into_iter().next().map(|b| b.kind) {
        Some(BusKind::Osdp(mut r)) if r.len() == 1 => AdoptedDevice::Reader(r.remove(0)),
        Some(BusKind::Modbus { mut devices, .. }) if devices.len() == 1 => {
            AdoptedDevice::Device(devices.remove(0))
        }
        _ => {
            return Err(format!(
                "adopted device `{}`: no device in its settings",
                reg.id
            ));
        }
    };
    Ok(Adopted {
        bus,
        device,
        replaces: reg.replaces.clone(),
    })
}

/// The RS-485 devices of `registered` (the registry), checked as the configuration's own.
pub fn adopted_of(registered: &[Registered], profiles: &Profiles) -> Result<Vec<Adopted>, String> {
    registered
        .iter()
        .filter(|r| matches!(r.family, Family::OsdpReader | Family::ModbusDevice))
        .map(|r| adopted_from(r, profiles))
        .collect()
}

/// Starts the buses with the registry's adopted devices already merged in, so that registering
/// the provisioner afterwards (which runs the same set) restarts no bus: the configured devices
/// come online once. When the adopted devices cannot be merged (a bus gone, a bad record) the
/// buses start with the configured devices only and the reason is logged (the registry was
/// checked against the config before: `Pairing::open`).
pub fn start(
    buses: &[BusConfig],
    registered: &[Registered],
    profiles: &Profiles,
    engine: Arc<crate::access::AccessEngine>,
) -> anyhow::Result<Rs485> {
    let adopted = match adopted_of(registered, profiles).and_then(|a| merge(buses, &a).map(|_| a)) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("adopted RS-485 devices not started: {e}");
            Vec::new()
        }
    };
    Rs485::start_adopted(buses, adopted, super::Shared::new(engine))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::Utc;
    use serde_json::Value;

    use super::*;

    fn reg(family: Family, bus: &str, settings: Value) -> Registered {
        Registered {
            id: settings["id"].as_str().unwrap_or("x").to_string(),
            candidate: "c".into(),
            family,
            bus: Some(bus.into()),
            settings,
            adopted_at: Utc::now(),
            adopted_by: "local:test".into(),
            replaces: None,
        }
    }

    fn base() -> Vec<BusConfig> {
        let p = Profiles::embedded();
        let reader = reg(
            Family::OsdpReader,
            "readers",
            json!({"id": "keypad-1", "address": 0, "entry": "gate-1"}),
        );
        let device = reg(
            Family::ModbusDevice,
            "io",
            json!({"id": "relay-1", "profile": "waveshare-relay-8ch", "address": 1}),
        );
        let bus = |a: Adopted, kind: BusKind| BusConfig {
            id: a.bus,
            port: PathBuf::from("/dev/null"),
            baud: 9600,
            kind,
            realtime: crate::rs485::rt::Realtime::default(),
        };
        let r = adopted_from(&reader, &p).unwrap();
        let AdoptedDevice::Reader(rc) = r.device.clone() else {
            panic!()
        };
        let d = adopted_from(&device, &p).unwrap();
        let AdoptedDevice::Device(dc) = d.device.clone() else {
            panic!()
        };
        vec![
            bus(r, BusKind::Osdp(vec![rc])),
            bus(
                d,
                BusKind::Modbus {
                    parity: super::super::profile::Parity::None,
                    timeout: Duration::from_millis(200),
                    devices: vec![dc],
                },
            ),
        ]
    }

    fn check(family: Family, bus: &str, settings: Value, expected: &str) {
        let p = Profiles::embedded();
        let r = adopted_from(&reg(family, bus, settings), &p).and_then(|a| merge(&base(), &[a]));
        match r {
            Ok(_) => assert_eq!("ok", expected),
            Err(e) => assert!(e.contains(expected), "`{e}` lacks `{expected}`"),
        }
    }

    #[test]
    fn adopted_devices_merge_unless_they_conflict_with_the_configuration() {
        use Family::{ModbusDevice as M, OsdpReader as O};
        check(
            O,
            "readers",
            json!({"id": "k2", "address": 5, "entry": "gate-1"}),
            "ok",
        );
        check(
            O,
            "readers",
            json!({"id": "k2", "address": 0, "entry": "gate-1"}),
            "OSDP address 0 on bus `readers` is used by reader `keypad-1` and by adopted reader `k2`",
        );
        check(
            O,
            "readers",
            json!({"id": "relay-1", "address": 5, "entry": "gate-1"}),
            "device id `relay-1` is both in the configuration",
        );
        check(
            O,
            "gone",
            json!({"id": "k2", "address": 5, "entry": "gate-1"}),
            "bus `gone`, which the configuration does not have",
        );
        check(
            O,
            "io",
            json!({"id": "k2", "address": 5, "entry": "gate-1"}),
            "does not speak the protocol",
        );
        check(
            O,
            "readers",
            json!({"id": "k2", "address": 200, "entry": "gate-1"}),
            "out of range",
        );
        check(
            O,
            "readers",
            json!({"id": "k2", "address": 5, "entry": "gate-1", "secure": "maybe"}),
            "expected key, install or none",
        );
        check(
            O,
            "readers",
            json!({"id": "k2", "address": 5, "entry": "gate-1", "surprise": 1}),
            "surprise",
        );
        check(
            M,
            "io",
            json!({"id": "b2", "profile": "xy-md02", "address": 7}),
            "ok",
        );
        check(
            M,
            "io",
            json!({"id": "b2", "profile": "xy-md02", "address": 1}),
            "unit id 1 on bus `io` is used by device `relay-1`",
        );
        check(
            M,
            "io",
            json!({"id": "b2", "profile": "nope", "address": 7}),
            "no profile `nope`",
        );
        check(
            M,
            "io",
            json!({"id": "b2", "profile": "waveshare-relay-8ch-d", "address": 7,
                   "inputs": [{"channel": 0, "role": "door_contact"}]}),
            "needs an entry",
        );
        check(
            Family::BleLock,
            "io",
            json!({"id": "b2"}),
            "not an RS-485 device",
        );
    }

    #[test]
    fn an_adopted_device_replacing_a_configured_one_takes_its_place() {
        let p = Profiles::embedded();
        let mut r = reg(
            Family::OsdpReader,
            "readers",
            json!({"id": "keypad-1", "address": 3, "entry": "gate-1"}),
        );
        // The configured keypad's id: a conflict unless it replaces it.
        let e = merge(&base(), &[adopted_from(&r, &p).unwrap()]).unwrap_err();
        assert!(e.contains("device id `keypad-1`"), "{e}");
        r.replaces = Some("keypad-1".into());
        let merged = merge(&base(), &[adopted_from(&r, &p).unwrap()]).unwrap();
        let BusKind::Osdp(readers) = &merged[0].kind else {
            panic!()
        };
        let ids: Vec<_> = readers.iter().map(|r| (r.id.as_str(), r.address)).collect();
        assert_eq!(ids, vec![("keypad-1", 3)]);
        // The other bus is untouched; a name the configuration no longer has is ignored.
        assert_eq!(format!("{:?}", merged[1]), format!("{:?}", base()[1]));
        r.replaces = Some("gone".into());
        let merged = merge(&base(), &[adopted_from(&r, &p).unwrap()]);
        assert!(merged.unwrap_err().contains("device id `keypad-1`"));
    }
}
