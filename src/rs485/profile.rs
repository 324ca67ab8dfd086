//! Modbus device profiles: `devices/*.toml`, embedded at build time. See `devices/README.md`.

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

impl Profile {
    /// Parses and checks one profile.
    pub fn parse(file: &str, text: &str) -> Result<Profile, String> {
        let p: Profile = toml::from_str(text).map_err(|e| format!("{file}: {e}"))?;
        let bad = |m: String| Err(format!("{file}: {m}"));
        if Some(p.id.as_str()) != file.strip_suffix(".toml") {
            return bad(format!("id `{}` is not the file name", p.id));
        }
        if p.protocol != "modbus" {
            return bad(format!("protocol `{}` (expected modbus)", p.protocol));
        }
        if !(1..=247).contains(&p.default_address) {
            return bad("default_address must be 1 to 247".into());
        }
        if p.poll_interval_ms < 10 || p.offline_after_failures == 0 {
            return bad("poll_interval_ms must be ≥ 10 and offline_after_failures ≥ 1".into());
        }
        if let Some(r) = &p.relays {
            if r.count == 0 || r.count > 64 {
                return bad("relays.count must be 1 to 64".into());
            }
            if let Some(b) = r.pulse
                && (b.unit_ms == 0 || b.max_units == 0)
            {
                return bad("relays.pulse needs unit_ms and max_units above 0".into());
            }
        }
        if let Some(i) = &p.inputs
            && (i.count == 0 || i.count > 64)
        {
            return bad("inputs.count must be 1 to 64".into());
        }
        for r in &p.readings {
            if !(r.scale.is_finite() && r.scale > 0.0 && r.report_delta >= 0.0) {
                return bad(format!("reading `{}`: scale and report_delta", r.name));
            }
        }
        Ok(p)
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
