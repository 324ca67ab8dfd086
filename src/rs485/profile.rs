//! Modbus device profiles: `devices/*.toml`, embedded at build time, and files of the profiles
//! directory (`crate::profiles`, which parses and checks both). See `devices/README.md`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

use super::wire::WordType;

/// The profiles shipped in `devices/` (file name, text).
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "waveshare-relay-8ch.toml",
        include_str!("../../devices/waveshare-relay-8ch.toml"),
    ),
    (
        "waveshare-relay-8ch-d.toml",
        include_str!("../../devices/waveshare-relay-8ch-d.toml"),
    ),
    (
        "waveshare-io-8ch.toml",
        include_str!("../../devices/waveshare-io-8ch.toml"),
    ),
    ("xy-md02.toml", include_str!("../../devices/xy-md02.toml")),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub id: String,
    pub name: String,
    pub protocol: String,
    pub baud: u32,
    pub parity: Parity,
    pub default_address: u8,
    pub poll_interval_ms: u64,
    pub offline_after_failures: u32,
    #[serde(default)]
    pub relays: Option<Relays>,
    #[serde(default)]
    pub inputs: Option<Inputs>,
    #[serde(default)]
    pub readings: Vec<Reading>,
    #[serde(default)]
    pub identity: Option<Identity>,
    /// How install mode recognises the device (docs/rs485.md, *Pairing*).
    #[serde(default)]
    pub identify: Option<Identify>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relays {
    pub count: u16,
    pub coil_base: u16,
    #[serde(default)]
    pub pulse: Option<BoardPulse>,
}

/// A pulse the board times itself.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardPulse {
    pub register_base: u16,
    pub unit_ms: u32,
    pub max_units: u16,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inputs {
    pub count: u16,
    pub base: u16,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reading {
    pub name: String,
    pub register: u16,
    #[serde(rename = "type")]
    pub ty: WordType,
    pub scale: f64,
    pub unit: String,
    pub report_delta: f64,
    pub report_every_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub firmware_register: u16,
}

/// How a unit answering a scan is recognised as this profile's device: every read must be
/// answered (without an exception) and hold what it says.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identify {
    /// The holding register that holds the unit address: it must read as the unit's own
    /// address, and adoption writes a new address there (FC06) and reads it back.
    #[serde(default)]
    pub address_register: Option<u16>,
    #[serde(default)]
    pub registers: Vec<IdentifyRegister>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentifyRegister {
    pub register: u16,
    /// `holding` (FC03, default), `input` (FC04), `discrete` (FC02) or `coil` (FC01).
    #[serde(default = "holding")]
    pub function: super::pairing::RegFn,
    /// The value it must hold; absent: any answer.
    #[serde(default)]
    pub equals: Option<u16>,
}

fn holding() -> super::pairing::RegFn {
    super::pairing::RegFn::Holding
}

impl Profile {
    /// Parses and checks one profile (`file` is its file name: the id must match it). The
    /// error names the file and, where it can, the line and the key
    /// (`crate::profiles::parse_file` is the same check with the line and key apart).
    pub fn parse(file: &str, text: &str) -> Result<Profile, String> {
        let stem = file.strip_suffix(".toml").unwrap_or(file);
        match crate::profiles::parse_text(std::path::Path::new(file), stem, text) {
            Ok(crate::profiles::Parsed::Modbus(p)) => Ok(p),
            Ok(crate::profiles::Parsed::Ble(_)) => Err(format!("{file}: not a Modbus profile")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The checks beyond the file's shape: `(key, why)` of the first problem.
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: &str| Err((k.to_string(), m.to_string()));
        if self.protocol != "modbus" {
            return bad(
                "protocol",
                &format!(
                    "`{}` is not a protocol of a Modbus profile (expected modbus)",
                    self.protocol
                ),
            );
        }
        if self.name.trim().is_empty() {
            return bad("name", "is empty");
        }
        if !(1200..=921_600).contains(&self.baud) {
            return bad(
                "baud",
                &format!("{} is out of range (1200 to 921600)", self.baud),
            );
        }
        if !(1..=247).contains(&self.default_address) {
            return bad("default_address", "must be 1 to 247");
        }
        if !(10..=3_600_000).contains(&self.poll_interval_ms) {
            return bad("poll_interval_ms", "must be 10 to 3600000");
        }
        if !(1..=1000).contains(&self.offline_after_failures) {
            return bad("offline_after_failures", "must be 1 to 1000");
        }
        if let Some(r) = &self.relays {
            if r.count == 0 || r.count > 64 {
                return bad("relays.count", "must be 1 to 64");
            }
            if u32::from(r.coil_base) + u32::from(r.count) > 0x1_0000 {
                return bad("relays.coil_base", "the coils run past 0xFFFF");
            }
            if let Some(b) = r.pulse {
                if b.unit_ms == 0 {
                    return bad("relays.pulse.unit_ms", "must be above 0");
                }
                if b.max_units == 0 {
                    return bad("relays.pulse.max_units", "must be above 0");
                }
                if u32::from(b.register_base) + u32::from(r.count) > 0x1_0000 {
                    return bad(
                        "relays.pulse.register_base",
                        "the registers run past 0xFFFF",
                    );
                }
            }
        }
        if let Some(i) = &self.inputs {
            if i.count == 0 || i.count > 64 {
                return bad("inputs.count", "must be 1 to 64");
            }
            if u32::from(i.base) + u32::from(i.count) > 0x1_0000 {
                return bad("inputs.base", "the inputs run past 0xFFFF");
            }
        }
        if let Some(i) = &self.identify {
            if i.address_register.is_none() && i.registers.is_empty() {
                return bad(
                    "identify",
                    "names nothing to read (expected address_register and/or registers)",
                );
            }
            if i.registers.len() > 8 {
                return bad("identify.registers", "at most 8 reads");
            }
        }
        let mut names = std::collections::HashSet::new();
        for (n, r) in self.readings.iter().enumerate() {
            let k = |f: &str| format!("readings[{n}].{f}");
            if !crate::config::valid_id(&r.name) || !names.insert(r.name.as_str()) {
                return bad(
                    &k("name"),
                    "must be 1 to 64 of A-Z a-z 0-9 - _ . and unique in the profile",
                );
            }
            if !(r.scale.is_finite() && r.scale > 0.0) {
                return bad(&k("scale"), "must be a number above 0");
            }
            if !(r.report_delta.is_finite() && r.report_delta >= 0.0) {
                return bad(
                    &k("report_delta"),
                    "must be a number ≥ 0 (0: every poll is reported)",
                );
            }
        }
        Ok(())
    }

    /// The pulse length in board units for `ms`, rounded up, if the board times pulses and the
    /// length fits.
    pub fn board_pulse_units(&self, ms: u32) -> Option<u16> {
        let b = self.relays.as_ref()?.pulse?;
        let units = ms.div_ceil(b.unit_ms).max(1);
        u16::try_from(units).ok().filter(|&u| u <= b.max_units)
    }
}

/// Every built-in profile by id. A broken built-in profile is a build defect: the unit test
/// `builtin_profiles_parse` keeps them valid.
pub fn builtin() -> &'static BTreeMap<String, Profile> {
    static P: OnceLock<BTreeMap<String, Profile>> = OnceLock::new();
    P.get_or_init(|| {
        BUILTIN
            .iter()
            .filter_map(|(f, t)| match Profile::parse(f, t) {
                Ok(p) => Some((p.id.clone(), p)),
                Err(e) => {
                    tracing::error!("built-in profile: {e}");
                    None
                }
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_profiles_parse() {
        for (f, t) in BUILTIN {
            Profile::parse(f, t).unwrap();
        }
        assert_eq!(builtin().len(), BUILTIN.len());
    }

    #[test]
    fn every_file_in_devices_is_built_in() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("devices");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".toml"))
            .collect();
        on_disk.sort();
        // Modbus profiles here, BLE families in `ble::profile`.
        let mut built: Vec<String> = BUILTIN
            .iter()
            .chain(crate::ble::profile::FILES)
            .map(|(f, _)| f.to_string())
            .collect();
        built.sort();
        assert_eq!(on_disk, built);
    }

    #[test]
    fn pulse_units_round_up_and_fit() {
        let p = &builtin()["waveshare-relay-8ch"];
        assert_eq!(p.board_pulse_units(3000), Some(30));
        assert_eq!(p.board_pulse_units(50), Some(1));
        assert_eq!(p.board_pulse_units(u32::MAX), None);
        assert_eq!(builtin()["waveshare-io-8ch"].board_pulse_units(3000), None);
    }

    #[test]
    fn bad_profiles_are_refused() {
        let good = BUILTIN[0].1;
        assert!(Profile::parse("other.toml", good).is_err());
        let bad = good.replace("protocol = \"modbus\"", "protocol = \"osdp\"");
        assert!(Profile::parse(BUILTIN[0].0, &bad).is_err());
        let unknown = format!("{good}\nsurprise = 1\n");
        assert!(Profile::parse(BUILTIN[0].0, &unknown).is_err());
    }
}
