//! `[[bus]]` sections: one per serial port, each with one protocol and its devices.

use std::collections::HashSet;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::profile::{Parity, Profile};
use crate::config::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBus {
    pub id: Spanned<String>,
    /// The serial device, best a stable `/dev/serial/by-id/...` path.
    pub port: Spanned<String>,
    /// `osdp` or `modbus`.
    pub protocol: Spanned<String>,
    #[serde(default)]
    pub baud: Option<Spanned<u32>>,
    /// Modbus: `none` (default), `even`, `odd`.
    #[serde(default)]
    pub parity: Option<Spanned<String>>,
    /// Modbus: how long to wait for a reply.
    #[serde(default)]
    pub timeout_ms: Option<Spanned<u64>>,
    /// OSDP keypads and readers.
    #[serde(default)]
    pub reader: Vec<RawReader>,
    /// Modbus devices.
    #[serde(default)]
    pub device: Vec<RawDevice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReader {
    pub id: Spanned<String>,
    pub address: Spanned<u8>,
    /// The entry (site database id) this reader opens.
    pub entry: Spanned<String>,
    /// `in` (default) or `out`.
    #[serde(default)]
    pub direction: Option<Spanned<String>>,
    /// `key` (default: the key kept in the site database, set by install mode), `install`
    /// (accept the install-mode default key once and give the reader its own with KEYSET), or
    /// `none` (no secure channel: only for readers that cannot do it).
    #[serde(default)]
    pub secure: Option<Spanned<String>>,
    #[serde(default)]
    pub inter_digit_timeout_ms: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDevice {
    pub id: Spanned<String>,
    pub profile: Spanned<String>,
    #[serde(default)]
    pub address: Option<Spanned<u8>>,
    #[serde(default)]
    pub poll_interval_ms: Option<Spanned<u64>>,
    /// What the discrete inputs are wired to.
    #[serde(default)]
    pub inputs: Vec<Spanned<RawInput>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInput {
    pub channel: u16,
    /// `door_contact`, `motion`, `exit_button` (request to exit: pulses the entry's relay),
    /// `manual_release`, `tamper`.
    pub role: String,
    /// The entry the input belongs to (door contacts and exit buttons need one).
    #[serde(default)]
    pub entry: Option<String>,
    /// Inverts the input (for normally-closed contacts wired so that "on" means closed).
    #[serde(default)]
    pub invert: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secure {
    Key,
    Install,
    None,
}

#[derive(Debug, Clone)]
pub struct ReaderConfig {
    pub id: String,
    pub address: u8,
    pub entry: String,
    pub direction: crate::policy::Direction,
    pub secure: Secure,
    pub inter_digit_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputRole {
    DoorContact,
    Motion,
    ExitButton,
    /// A manual release (key switch, fire alarm release): recorded, and the door may open.
    ManualRelease,
    Tamper,
}

#[derive(Debug, Clone)]
pub struct InputConfig {
    pub channel: u16,
    pub role: InputRole,
    pub entry: Option<String>,
    pub invert: bool,
}

#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub id: String,
    pub address: u8,
    pub profile: Profile,
    pub poll_interval: Duration,
    pub inputs: Vec<InputConfig>,
}

#[derive(Debug, Clone)]
pub enum BusKind {
    Osdp(Vec<ReaderConfig>),
    Modbus {
        parity: Parity,
        timeout: Duration,
        devices: Vec<DeviceConfig>,
    },
}

#[derive(Debug, Clone)]
pub struct BusConfig {
    pub id: String,
    pub port: PathBuf,
    pub baud: u32,
    pub kind: BusKind,
    /// How the bus thread is scheduled (`[rs485] realtime`, shared by every bus; a change
    /// restarts the buses on a reload).
    pub realtime: super::rt::Realtime,
}

impl BusConfig {
    /// Whether the port is a simulated device (`sim:<name>`).
    pub fn simulated(&self) -> bool {
        self.port.to_string_lossy().starts_with(SIM_PREFIX)
    }

    /// Whether the bus has no devices: it only listens, for install mode to find its first one.
    pub fn is_empty(&self) -> bool {
        match &self.kind {
            BusKind::Osdp(r) => r.is_empty(),
            BusKind::Modbus { devices, .. } => devices.is_empty(),
        }
    }

    /// Every device id on this bus (readers or Modbus devices).
    pub fn device_ids(&self) -> Vec<&str> {
        match &self.kind {
            BusKind::Osdp(r) => r.iter().map(|r| r.id.as_str()).collect(),
            BusKind::Modbus { devices, .. } => devices.iter().map(|d| d.id.as_str()).collect(),
        }
    }
}

/// Port names starting with this are simulated devices (demo only).
pub const SIM_PREFIX: &str = "sim:";

pub(crate) type ErrFn<'a> = dyn Fn(Range<usize>, &str, String) -> ConfigError + 'a;

/// Checks every `[[bus]]`: ids unique across buses and devices, ports unique, values in range.
/// `simulate`: `demo.simulate_devices`, which allows `port = "sim:<name>"` (a simulated device
/// on a PTY, started by the daemon; see [`super::sim`]).
pub fn check(
    raw: &[RawBus],
    resolve: &dyn Fn(&str) -> PathBuf,
    err: &ErrFn,
    simulate: bool,
    profiles: &crate::profiles::Profiles,
) -> Result<Vec<BusConfig>, ConfigError> {
    let mut ids = HashSet::new();
    let mut ports = HashSet::new();
    let mut out = Vec::new();
    for (bi, b) in raw.iter().enumerate() {
        let key = |k: &str| format!("bus[{bi}].{k}");
        let mut unique = |id: &Spanned<String>, k: &str| -> Result<String, ConfigError> {
            let v = id.get_ref();
            if !crate::config::valid_id(v) {
                return Err(err(
                    id.span(),
                    k,
                    format!("`{v}` is not a valid id (expected 1 to 64 of A-Z a-z 0-9 - _ .)"),
                ));
            }
            if !ids.insert(v.clone()) {
                return Err(err(id.span(), k, format!("id `{v}` is used twice")));
            }
            Ok(v.clone())
        };
        let id = unique(&b.id, &key("id"))?;
        if b.port.get_ref().trim().is_empty() {
            return Err(err(
                b.port.span(),
                &key("port"),
                "is empty (expected a serial device path)".into(),
            ));
        }
        let port = match b.port.get_ref().strip_prefix(SIM_PREFIX) {
            Some(_) if !simulate => {
                return Err(err(
                    b.port.span(),
                    &key("port"),
                    "`sim:` ports (simulated devices) need demo.simulate_devices = true".into(),
                ));
            }
            Some(_) => PathBuf::from(b.port.get_ref()),
            None => resolve(b.port.get_ref()),
        };
        if !ports.insert(port.clone()) {
            return Err(err(
                b.port.span(),
                &key("port"),
                format!("port `{}` is used by two buses", port.display()),
            ));
        }
        let baud = match &b.baud {
            None => 9600,
            Some(v)
                if [
                    1200, 2400, 4800, 9600, 19200, 38400, 57600, 115_200, 230_400,
                ]
                .contains(v.get_ref()) =>
            {
                *v.get_ref()
            }
            Some(v) => {
                return Err(err(
                    v.span(),
                    &key("baud"),
                    format!("{} is not a standard rate (1200 to 230400)", v.get_ref()),
                ));
            }
        };
        let kind = match b.protocol.get_ref().as_str() {
            "osdp" => {
                if let Some(d) = b.device.first() {
                    return Err(err(
                        d.id.span(),
                        &key("device"),
                        "Modbus devices on an OSDP bus (one protocol per bus)".into(),
                    ));
                }
                for (k, v) in [
                    ("parity", b.parity.as_ref().map(|p| p.span())),
                    ("timeout_ms", b.timeout_ms.as_ref().map(|t| t.span())),
                ] {
                    if let Some(span) = v {
                        return Err(err(span, &key(k), "applies to Modbus buses only".into()));
                    }
                }
                if baud < 9600 {
                    let span = b.baud.as_ref().map_or(b.id.span(), |v| v.span());
                    return Err(err(
                        span,
                        &key("baud"),
                        format!("{baud} is too slow for OSDP (9600 to 230400)"),
                    ));
                }
                let mut addrs = HashSet::new();
                let mut readers = Vec::new();
                for (ri, r) in b.reader.iter().enumerate() {
                    let rk = |k: &str| format!("bus[{bi}].reader[{ri}].{k}");
                    let rid = unique(&r.id, &rk("id"))?;
                    let a = *r.address.get_ref();
                    if a > 0x7E || !addrs.insert(a) {
                        return Err(err(
                            r.address.span(),
                            &rk("address"),
                            format!("{a} is out of range (0 to 126) or used twice on this bus"),
                        ));
                    }
                    if r.entry.get_ref().trim().is_empty() {
                        return Err(err(r.entry.span(), &rk("entry"), "is empty".into()));
                    }
                    let direction = match r.direction.as_ref().map(|d| d.get_ref().as_str()) {
                        None | Some("in") => crate::policy::Direction::In,
                        Some("out") => crate::policy::Direction::Out,
                        Some(o) => {
                            let span = r.direction.as_ref().map(|d| d.span()).unwrap_or(0..0);
                            return Err(err(
                                span,
                                &rk("direction"),
                                format!("`{o}` (expected in or out)"),
                            ));
                        }
                    };
                    let secure = match r.secure.as_ref().map(|d| d.get_ref().as_str()) {
                        None | Some("key") => Secure::Key,
                        Some("install") => Secure::Install,
                        Some("none") => Secure::None,
                        Some(o) => {
                            let span = r.secure.as_ref().map(|d| d.span()).unwrap_or(0..0);
                            return Err(err(
                                span,
                                &rk("secure"),
                                format!("`{o}` (expected key, install or none)"),
                            ));
                        }
                    };
                    let idt = match &r.inter_digit_timeout_ms {
                        None => 5000,
                        Some(v) if (500..=60_000).contains(v.get_ref()) => *v.get_ref(),
                        Some(v) => {
                            return Err(err(
                                v.span(),
                                &rk("inter_digit_timeout_ms"),
                                format!("{} is out of range (500 to 60000)", v.get_ref()),
                            ));
                        }
                    };
                    readers.push(ReaderConfig {
                        id: rid,
                        address: a,
                        entry: r.entry.get_ref().clone(),
                        direction,
                        secure,
                        inter_digit_timeout: Duration::from_millis(idt),
                    });
                }
                BusKind::Osdp(readers)
            }
            "modbus" => {
                if let Some(r) = b.reader.first() {
                    return Err(err(
                        r.id.span(),
                        &key("reader"),
                        "OSDP readers on a Modbus bus (one protocol per bus)".into(),
                    ));
                }
                let parity = match b.parity.as_ref().map(|p| p.get_ref().as_str()) {
                    None | Some("none") => Parity::None,
                    Some("even") => Parity::Even,
                    Some("odd") => Parity::Odd,
                    Some(o) => {
                        let span = b.parity.as_ref().map(|d| d.span()).unwrap_or(0..0);
                        return Err(err(
                            span,
                            &key("parity"),
                            format!("`{o}` (expected none, even or odd)"),
                        ));
                    }
                };
                let timeout = match &b.timeout_ms {
                    None => 200,
                    Some(v) if (20..=5000).contains(v.get_ref()) => *v.get_ref(),
                    Some(v) => {
                        return Err(err(
                            v.span(),
                            &key("timeout_ms"),
                            format!("{} is out of range (20 to 5000)", v.get_ref()),
                        ));
                    }
                };
                let mut addrs = HashSet::new();
                let mut devices = Vec::new();
                for (di, d) in b.device.iter().enumerate() {
                    let dk = |k: &str| format!("bus[{bi}].device[{di}].{k}");
                    let did = unique(&d.id, &dk("id"))?;
                    let Some(profile) = profiles.modbus(d.profile.get_ref()) else {
                        let known: Vec<&str> = profiles.modbus_ids().collect();
                        return Err(err(
                            d.profile.span(),
                            &dk("profile"),
                            format!(
                                "no profile `{}` (known: {})",
                                d.profile.get_ref(),
                                known.join(", ")
                            ),
                        ));
                    };
                    let address = d
                        .address
                        .as_ref()
                        .map_or(profile.default_address, |a| *a.get_ref());
                    if !(1..=247).contains(&address) || !addrs.insert(address) {
                        let span = d.address.as_ref().map_or(d.id.span(), |a| a.span());
                        return Err(err(
                            span,
                            &dk("address"),
                            format!(
                                "{address} is out of range (1 to 247) or used twice on this bus"
                            ),
                        ));
                    }
                    let poll = match &d.poll_interval_ms {
                        None => profile.poll_interval_ms,
                        Some(v) if (10..=3_600_000).contains(v.get_ref()) => *v.get_ref(),
                        Some(v) => {
                            return Err(err(
                                v.span(),
                                &dk("poll_interval_ms"),
                                format!("{} is out of range (10 to 3600000)", v.get_ref()),
                            ));
                        }
                    };
                    let mut inputs = Vec::new();
                    let mut channels = HashSet::new();
                    for (ii, i) in d.inputs.iter().enumerate() {
                        let ik = dk(&format!("inputs[{ii}]"));
                        let v = i.get_ref();
                        let count = profile.inputs.as_ref().map_or(0, |p| p.count);
                        if v.channel >= count || !channels.insert(v.channel) {
                            return Err(err(
                                i.span(),
                                &ik,
                                format!(
                                    "channel {} does not exist on `{}` ({count} inputs) or is \
                                     used twice",
                                    v.channel, profile.id
                                ),
                            ));
                        }
                        let role = match v.role.as_str() {
                            "door_contact" => InputRole::DoorContact,
                            "motion" => InputRole::Motion,
                            "exit_button" => InputRole::ExitButton,
                            "manual_release" => InputRole::ManualRelease,
                            "tamper" => InputRole::Tamper,
                            o => {
                                return Err(err(
                                    i.span(),
                                    &ik,
                                    format!(
                                        "role `{o}` (expected door_contact, motion, exit_button, \
                                         manual_release or tamper)"
                                    ),
                                ));
                            }
                        };
                        if matches!(role, InputRole::DoorContact | InputRole::ExitButton)
                            && v.entry.is_none()
                        {
                            return Err(err(
                                i.span(),
                                &ik,
                                format!("role `{}` needs an entry", v.role),
                            ));
                        }
                        inputs.push(InputConfig {
                            channel: v.channel,
                            role,
                            entry: v.entry.clone(),
                            invert: v.invert,
                        });
                    }
                    if profile.baud != baud || profile.parity != parity {
                        tracing::warn!(
                            device = %did,
                            profile = %profile.id,
                            "the bus's serial settings differ from the profile's factory settings"
                        );
                    }
                    devices.push(DeviceConfig {
                        id: did,
                        address,
                        profile: profile.clone(),
                        poll_interval: Duration::from_millis(poll),
                        inputs,
                    });
                }
                BusKind::Modbus {
                    parity,
                    timeout: Duration::from_millis(timeout),
                    devices,
                }
            }
            o => {
                return Err(err(
                    b.protocol.span(),
                    &key("protocol"),
                    format!("`{o}` (expected osdp or modbus)"),
                ));
            }
        };
        // A bus with no devices is allowed: it only listens, for install mode to find its
        // first device (docs/rs485.md, *A bus with no devices*). A simulated one has nothing
        // to simulate.
        if b.reader.is_empty()
            && b.device.is_empty()
            && port.to_string_lossy().starts_with(SIM_PREFIX)
        {
            return Err(err(
                b.port.span(),
                &key("port"),
                "a simulated bus (`sim:` port) needs its one device".into(),
            ));
        }
        out.push(BusConfig {
            id,
            port,
            baud,
            kind,
            realtime: super::rt::Realtime::default(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn parse(buses: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "[site]\nid = \"s\"\ngateway_id = \"gw\"\n[storage]\ndata_dir = \"data\"\n{buses}"
        );
        Config::parse(std::path::Path::new("/etc/gatehouse/g.toml"), &text)
    }

    #[test]
    fn a_bus_with_no_devices_is_accepted_for_either_protocol() {
        let cfg = parse(
            "[[bus]]\nid = \"entrance\"\nport = \"/dev/ttyUSB0\"\nprotocol = \"osdp\"\n\
             [[bus]]\nid = \"io\"\nport = \"/dev/ttyUSB1\"\nprotocol = \"modbus\"\n\
             parity = \"even\"\n",
        )
        .unwrap();
        assert_eq!(cfg.buses.len(), 2);
        for b in &cfg.buses {
            assert!(b.is_empty(), "{b:?}");
            assert!(b.device_ids().is_empty());
        }
        assert!(matches!(&cfg.buses[0].kind, BusKind::Osdp(r) if r.is_empty()));
        assert!(matches!(
            &cfg.buses[1].kind,
            BusKind::Modbus { parity: Parity::Even, devices, .. } if devices.is_empty()
        ));
        // The bus's own settings are still checked.
        let e = parse(
            "[[bus]]\nid = \"entrance\"\nport = \"/dev/ttyUSB0\"\nprotocol = \"osdp\"\n\
             baud = 4800\n",
        )
        .unwrap_err();
        assert!(e.message.contains("too slow for OSDP"), "{e:?}");
        let e = parse(
            "[[bus]]\nid = \"entrance\"\nport = \"/dev/ttyUSB0\"\nprotocol = \"osdp\"\n\
             timeout_ms = 100\n",
        )
        .unwrap_err();
        assert!(e.message.contains("Modbus buses only"), "{e:?}");
        // A bus with devices is not empty.
        let cfg = parse(
            "[[bus]]\nid = \"io\"\nport = \"/dev/ttyUSB1\"\nprotocol = \"modbus\"\n\
             [[bus.device]]\nid = \"climate\"\nprofile = \"xy-md02\"\naddress = 7\n",
        )
        .unwrap();
        assert!(!cfg.buses[0].is_empty());
    }

    #[test]
    fn a_simulated_bus_with_no_devices_is_refused() {
        let e = parse(
            "[demo]\nsimulate_devices = true\n\
             [[bus]]\nid = \"entrance\"\nport = \"sim:keypad\"\nprotocol = \"osdp\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("bus[0].port"));
        assert!(e.message.contains("needs its one device"), "{e:?}");
    }
}
