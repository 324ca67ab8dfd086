//! The registry of adopted devices against the TOML config: what is in use (ids, bus addresses,
//! MACs) and where it comes from, the merge at start (a conflict is refused naming both
//! places), and `gatehouse devices export` (the registry as TOML to paste into the config).
//! Pure: the records are read and written by the store (`store/devices.rs`).

use std::fmt::Write as _;

use super::{Family, Registered};
use crate::config::Config;
use crate::rs485::config::BusKind;

/// One device in use, and where it is declared (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InUse {
    pub id: String,
    pub bus: Option<String>,
    pub address: Option<u8>,
    /// Upper case.
    pub mac: Option<String>,
    /// What kind of device it is (a replacement must be of the same family).
    pub family: Option<Family>,
    /// `config `/etc/gatehouse/gatehouse.toml`, [[bus]] `bus-1`, reader `r1`` or
    /// `registry (adopted … by …)`.
    pub place: String,
}

/// The devices the TOML config declares.
pub fn configured(cfg: &Config) -> Vec<InUse> {
    let file = cfg.path.display();
    let mut out = Vec::new();
    for bus in &cfg.buses {
        let (kind, family, devices): (&str, Family, Vec<(&str, u8)>) = match &bus.kind {
            BusKind::Osdp(readers) => (
                "[[bus.reader]]",
                Family::OsdpReader,
                readers.iter().map(|r| (r.id.as_str(), r.address)).collect(),
            ),
            BusKind::Modbus { devices, .. } => (
                "[[bus.device]]",
                Family::ModbusDevice,
                devices.iter().map(|d| (d.id.as_str(), d.address)).collect(),
            ),
        };
        for (id, address) in devices {
            out.push(InUse {
                id: id.to_string(),
                bus: Some(bus.id.clone()),
                address: Some(address),
                mac: None,
                family: Some(family),
                place: format!("config `{file}`, [[bus]] `{}`, {kind} `{id}`", bus.id),
            });
        }
    }
    for d in cfg.ble.iter().flat_map(|b| b.devices.iter()) {
        out.push(InUse {
            id: d.id.clone(),
            bus: None,
            address: None,
            mac: Some(d.mac.to_ascii_uppercase()),
            family: Some(match d.kind {
                crate::sync::DeviceKind::Sensor => Family::BleSensor,
                crate::sync::DeviceKind::Fob => Family::BleFob,
                _ => Family::BleLock,
            }),
            place: format!("config `{file}`, [[ble.device]] `{}`", d.id),
        });
    }
    out
}

/// The MAC of a BLE record: its settings' `mac`, else its candidate id (`ble:<MAC>`).
fn mac_of(r: &Registered) -> Option<String> {
    r.settings
        .get("mac")
        .and_then(|m| m.as_str())
        .map(str::to_string)
        .or_else(|| r.candidate.strip_prefix("ble:").map(str::to_string))
        .map(|m| m.to_ascii_uppercase())
}

/// An adopted device as [`InUse`].
pub fn of_registered(r: &Registered) -> InUse {
    let rs485 = matches!(r.family, Family::OsdpReader | Family::ModbusDevice);
    InUse {
        id: r.id.clone(),
        bus: r.bus.clone(),
        address: r
            .settings
            .get("address")
            .and_then(|a| a.as_u64())
            .and_then(|a| u8::try_from(a).ok()),
        mac: if rs485 { None } else { mac_of(r) },
        family: Some(r.family),
        place: format!(
            "registry (`{}`, adopted {} by {})",
            r.id,
            r.adopted_at.to_rfc3339(),
            r.adopted_by
        ),
    }
}

/// What `a` and `b` share, if anything: `id`, `bus address` or `MAC`.
pub fn clash(a: &InUse, b: &InUse) -> Option<&'static str> {
    if a.id == b.id {
        return Some("device id");
    }
    if a.bus.is_some() && a.bus == b.bus && a.address.is_some() && a.address == b.address {
        return Some("bus address");
    }
    if a.mac.is_some() && a.mac == b.mac {
        return Some("MAC");
    }
    None
}

/// The error of a clash: both places named.
pub fn clash_message(what: &str, a: &InUse, b: &InUse) -> String {
    let value = match what {
        "device id" => format!("`{}`", a.id),
        "bus address" => format!(
            "{} on bus `{}`",
            a.address.unwrap_or_default(),
            a.bus.as_deref().unwrap_or_default()
        ),
        _ => format!("`{}`", a.mac.as_deref().unwrap_or_default()),
    };
    format!(
        "{what} {value} is used twice: by {} and by {}",
        a.place, b.place
    )
}

/// The configured devices that run beside the registry: those an adopted device
/// [`Registered::replaces`] are left out.
pub fn running(configured: &[InUse], registered: &[Registered]) -> Vec<InUse> {
    configured
        .iter()
        .filter(|c| {
            !registered
                .iter()
                .any(|r| r.replaces.as_ref() == Some(&c.id))
        })
        .cloned()
        .collect()
}

/// One warning per configured device an adopted device replaces: the TOML still lists it, it is
/// not run, and how to clean it up.
pub fn replaced_warnings(configured: &[InUse], registered: &[Registered]) -> Vec<String> {
    configured
        .iter()
        .filter_map(|c| {
            let r = registered
                .iter()
                .find(|r| r.replaces.as_ref() == Some(&c.id))?;
            Some(format!(
                "{} is replaced by the adopted device `{}` (adopted {} by {}): it is not run. \
                 Remove it from the config; `gatehouse devices export` prints the adopted \
                 devices as tables to paste in its place (then `gatehouse pair remove` them)",
                c.place,
                r.id,
                r.adopted_at.to_rfc3339(),
                r.adopted_by
            ))
        })
        .collect()
}

/// Checks the registry against the config and itself: `Ok` when every adopted device can run
/// beside the configured ones it does not replace ([`running`]); else the first conflict,
/// naming both places (the daemon refuses to start: remove the device from one of them). Two
/// adopted devices replacing the same configured one are a conflict too. A record replacing a
/// device the config no longer has is fine (the config was cleaned up).
pub fn merge(configured: &[InUse], registered: &[Registered]) -> Result<(), String> {
    let mut seen: Vec<InUse> = running(configured, registered);
    let mut replacing: Vec<&Registered> = Vec::new();
    for r in registered {
        if let Some(old) = &r.replaces {
            if let Some(other) = replacing.iter().find(|o| o.replaces.as_ref() == Some(old)) {
                return Err(format!(
                    "configured device `{old}` is replaced twice: by {} and by {}",
                    of_registered(other).place,
                    of_registered(r).place
                ));
            }
            replacing.push(r);
        }
    }
    for r in registered {
        let mine = of_registered(r);
        if let Some((what, other)) = seen
            .iter()
            .find_map(|o| clash(o, &mine).map(|what| (what, o)))
        {
            return Err(clash_message(what, other, &mine));
        }
        seen.push(mine);
    }
    Ok(())
}

fn toml_value(v: &serde_json::Value) -> Option<toml::Value> {
    Some(match v {
        serde_json::Value::Null => return None,
        serde_json::Value::Bool(b) => toml::Value::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        serde_json::Value::String(s) => toml::Value::String(s.clone()),
        serde_json::Value::Array(a) => {
            toml::Value::Array(a.iter().filter_map(toml_value).collect())
        }
        serde_json::Value::Object(m) => toml::Value::Table(
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), toml_value(v)?)))
                .collect(),
        ),
    })
}

/// One table `[[name]]` with the record's settings (the id first).
fn table(out: &mut String, name: &str, r: &Registered) {
    let mut t = match toml_value(&r.settings) {
        Some(toml::Value::Table(t)) => t,
        _ => toml::map::Map::new(),
    };
    t.remove("id");
    if let Some(old) = &r.replaces {
        let _ = writeln!(
            out,
            "# replaces `{old}` of the config: remove that table when pasting this one"
        );
    }
    let _ = writeln!(out, "[[{name}]]");
    let _ = writeln!(out, "id = {}", toml::Value::String(r.id.clone()));
    // Plain keys first, then sub-tables (`[[bus.device.inputs]]`), as TOML wants.
    let (plain, nested): (Vec<_>, Vec<_>) = t.into_iter().partition(|(_, v)| match v {
        toml::Value::Table(_) => false,
        toml::Value::Array(a) => !a.iter().any(|x| x.is_table()),
        _ => true,
    });
    for (k, v) in plain {
        let _ = writeln!(out, "{k} = {v}");
    }
    for (k, v) in nested {
        match v {
            toml::Value::Array(items) => {
                for item in items {
                    let _ = writeln!(out, "[[{name}.{k}]]");
                    if let toml::Value::Table(t) = item {
                        for (k2, v2) in t {
                            let _ = writeln!(out, "{k2} = {v2}");
                        }
                    }
                }
            }
            toml::Value::Table(t2) => {
                let _ = writeln!(out, "[{name}.{k}]");
                for (k2, v2) in t2 {
                    let _ = writeln!(out, "{k2} = {v2}");
                }
            }
            _ => {}
        }
    }
    let _ = writeln!(out);
}

/// The registry as TOML for the config: RS-485 devices as `[[bus.reader]]` / `[[bus.device]]`
/// tables grouped by bus (paste each group under its `[[bus]]` table), BLE devices in their own
/// section. Adopted devices and the same devices in the config are refused together at start
/// (a conflict): after pasting, remove them from the registry (`gatehouse pair remove`).
pub fn export_toml(registered: &[Registered]) -> String {
    let mut out = String::from(
        "# Devices adopted through install mode (gatehouse devices export).\n\
         # Paste each group under its [[bus]] table, then `gatehouse pair remove <id>` each one:\n\
         # a device both in the config and in the registry is refused at start.\n\n",
    );
    let mut buses: std::collections::BTreeMap<&str, Vec<&Registered>> = Default::default();
    let mut ble = Vec::new();
    for r in registered {
        match (r.family, r.bus.as_deref()) {
            (Family::OsdpReader | Family::ModbusDevice, Some(bus)) => {
                buses.entry(bus).or_default().push(r)
            }
            _ => ble.push(r),
        }
    }
    for (bus, records) in buses {
        let _ = writeln!(out, "# ---- under [[bus]] id = \"{bus}\"\n");
        for r in records {
            let name = match r.family {
                Family::OsdpReader => "bus.reader",
                _ => "bus.device",
            };
            table(&mut out, name, r);
        }
    }
    if !ble.is_empty() {
        let _ = writeln!(
            out,
            "# ---- BLE devices (locks and controllers are named by the site data's devices[]; \
             kept here for reference)\n"
        );
        for r in ble {
            let _ = writeln!(out, "# family: {}", r.family.as_str());
            table(&mut out, "ble.device", r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reg(id: &str, family: Family, bus: Option<&str>, settings: serde_json::Value) -> Registered {
        Registered {
            id: id.into(),
            candidate: format!("c:{id}"),
            family,
            bus: bus.map(str::to_string),
            settings,
            adopted_at: chrono::DateTime::UNIX_EPOCH,
            adopted_by: "local:root".into(),
            replaces: None,
        }
    }

    fn cfg(id: &str, bus: &str, address: u8) -> InUse {
        InUse {
            id: id.into(),
            bus: Some(bus.into()),
            address: Some(address),
            mac: None,
            family: Some(Family::OsdpReader),
            place: format!("config `g.toml`, [[bus]] `{bus}`, [[bus.reader]] `{id}`"),
        }
    }

    #[test]
    fn merge_refuses_a_clash_naming_both_places() {
        let c = [cfg("r1", "bus-1", 1)];
        let same_id = reg(
            "r1",
            Family::OsdpReader,
            Some("bus-2"),
            json!({"address": 5}),
        );
        let e = merge(&c, &[same_id]).unwrap_err();
        assert!(e.contains("device id `r1`"), "{e}");
        assert!(
            e.contains("config `g.toml`") && e.contains("registry (`r1`"),
            "{e}"
        );
        let same_addr = reg(
            "r9",
            Family::OsdpReader,
            Some("bus-1"),
            json!({"address": 1}),
        );
        let e = merge(&c, &[same_addr]).unwrap_err();
        assert!(e.contains("bus address 1 on bus `bus-1`"), "{e}");
        let other_bus = reg(
            "r9",
            Family::OsdpReader,
            Some("bus-2"),
            json!({"address": 1}),
        );
        merge(&c, &[other_bus]).unwrap();
        let a = reg(
            "l1",
            Family::BleLock,
            None,
            json!({"mac": "aa:bb:cc:dd:ee:ff"}),
        );
        let b = reg(
            "l2",
            Family::BleLock,
            None,
            json!({"mac": "AA:BB:CC:DD:EE:FF"}),
        );
        let e = merge(&[], &[a, b]).unwrap_err();
        assert!(e.contains("MAC `AA:BB:CC:DD:EE:FF`"), "{e}");
    }

    #[test]
    fn export_is_toml_with_tables_under_their_bus() {
        let r = reg(
            "board-2",
            Family::ModbusDevice,
            Some("bus-2"),
            json!({"profile": "waveshare-relay-8", "address": 7,
                   "inputs": [{"channel": 1, "role": "door_contact", "entry": "gate-1"}]}),
        );
        let text = export_toml(&[r]);
        let parsed: toml::Value = toml::from_str(&text).expect(&text);
        let d = &parsed["bus"]["device"][0];
        assert_eq!(d["id"].as_str(), Some("board-2"));
        assert_eq!(d["address"].as_integer(), Some(7));
        assert_eq!(d["inputs"][0]["role"].as_str(), Some("door_contact"));
        assert!(text.contains("# ---- under [[bus]] id = \"bus-2\""));
    }

    #[test]
    fn a_configured_device_an_adopted_one_replaces_is_left_out_with_a_warning() {
        let c = [cfg("r1", "bus-1", 1), cfg("r2", "bus-1", 2)];
        // The same id and address as `r1`: a conflict, unless it replaces `r1`.
        let mut new = reg(
            "r1",
            Family::OsdpReader,
            Some("bus-1"),
            json!({"address": 1}),
        );
        assert!(merge(&c, std::slice::from_ref(&new)).is_err());
        new.replaces = Some("r1".into());
        merge(&c, std::slice::from_ref(&new)).unwrap();
        let run: Vec<_> = running(&c, std::slice::from_ref(&new))
            .into_iter()
            .map(|u| u.id)
            .collect();
        assert_eq!(run, vec!["r2"]);
        let w = replaced_warnings(&c, std::slice::from_ref(&new));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("[[bus.reader]] `r1` is replaced by the adopted device `r1`")
                && w[0].contains("Remove it from the config")
                && w[0].contains("gatehouse devices export"),
            "{w:?}"
        );
        // Still a conflict with the devices it does not replace.
        let mut at_r2 = reg(
            "r9",
            Family::OsdpReader,
            Some("bus-1"),
            json!({"address": 2}),
        );
        at_r2.replaces = Some("r1".into());
        assert!(
            merge(&c, &[at_r2.clone()])
                .unwrap_err()
                .contains("bus address 2")
        );
        // Two replacing the same device: refused, both named.
        let mut other = reg(
            "r8",
            Family::OsdpReader,
            Some("bus-1"),
            json!({"address": 8}),
        );
        other.replaces = Some("r1".into());
        let e = merge(&c, &[new.clone(), other]).unwrap_err();
        assert!(
            e.contains("`r1` is replaced twice") && e.contains("registry (`r8`"),
            "{e}"
        );
        // The config cleaned up (no `r1` any more): fine, and no warning.
        merge(&c[1..], std::slice::from_ref(&new)).unwrap();
        assert!(replaced_warnings(&c[1..], std::slice::from_ref(&new)).is_empty());
        // The export says what to remove.
        let text = export_toml(&[new]);
        assert!(text.contains("# replaces `r1` of the config"), "{text}");
        toml::from_str::<toml::Value>(&text).unwrap();
    }
}
