//! BLE device-family profiles: `devices/*.toml` with `protocol = "ble-lock" | "bthome" |
//! "ble-fob"`, embedded at build time. A site database device (`devices[]` of the sync
//! contract) gets the profile of its `kind`.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use serde::Deserialize;

use crate::sync::DeviceKind;

/// The BLE profile files of `devices/`, embedded.
pub const FILES: &[(&str, &str)] = &[
    (
        "noke-padlock.toml",
        include_str!("../../devices/noke-padlock.toml"),
    ),
    (
        "noke-unit-controller.toml",
        include_str!("../../devices/noke-unit-controller.toml"),
    ),
    (
        "bthome-sensor.toml",
        include_str!("../../devices/bthome-sensor.toml"),
    ),
    ("ble-fob.toml", include_str!("../../devices/ble-fob.toml")),
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProfile {
    id: String,
    name: String,
    protocol: String,
    kind: DeviceKind,
    hardware_codes: Vec<String>,
    sleeps: bool,
    awake_for_s: u64,
    offline_after_s: u64,
    connect_timeout_ms: u64,
    session_valid_s: u64,
    low_battery_mv: u16,
    #[serde(default)]
    low_battery_percent: Option<u8>,
    #[serde(default)]
    report_delta: Option<f64>,
    #[serde(default)]
    report_every_s: Option<u64>,
}

/// One BLE device family.
#[derive(Debug, Clone)]
pub struct Profile {
    pub id: String,
    pub name: String,
    pub kind: DeviceKind,
    pub hardware_codes: Vec<String>,
    /// Sleeps and answers only when woken: commands for it wait (`queued`).
    pub sleeps: bool,
    /// After an advertisement the device is taken as awake this long.
    pub awake_for: Duration,
    /// Silence after which it is reported offline (`None`: never).
    pub offline_after: Option<Duration>,
    pub connect_timeout: Duration,
    pub session_valid: Duration,
    /// Lock battery (session bytes 2–3) below this: `battery_low` (0: not checked).
    pub low_battery_mv: u16,
    /// BTHome battery object below this percentage: `battery_low`.
    pub low_battery_percent: Option<u8>,
    /// BTHome readings: reported when they move this much, or this often.
    pub report_delta: f64,
    pub report_every: Duration,
}

fn parse(file: &str, text: &str) -> Result<Profile, String> {
    let stem = file.strip_suffix(".toml").unwrap_or(file);
    match crate::profiles::parse_text(std::path::Path::new(file), stem, text) {
        Ok(crate::profiles::Parsed::Ble(p)) => Ok(p),
        Ok(crate::profiles::Parsed::Modbus(_)) => Err(format!("devices/{file}: not a BLE profile")),
        Err(e) => Err(format!("devices/{e}")),
    }
}

/// The protocol a device kind's profile must name.
pub fn protocol_of(kind: DeviceKind) -> &'static str {
    match kind {
        DeviceKind::Padlock | DeviceKind::Controller => "ble-lock",
        DeviceKind::Sensor => "bthome",
        DeviceKind::Fob => "ble-fob",
    }
}

impl RawProfile {
    /// Checks a parsed file into a profile: `(key, why)` of the first problem.
    pub(crate) fn check(self) -> Result<Profile, (String, String)> {
        let raw = self;
        let want = protocol_of(raw.kind);
        if raw.protocol != want {
            return Err((
                "protocol".into(),
                format!(
                    "`{}` does not fit kind {:?} (expected `{want}`)",
                    raw.protocol, raw.kind
                ),
            ));
        }
        if raw.name.trim().is_empty() {
            return Err(("name".into(), "is empty".into()));
        }
        if let Some(p) = raw.low_battery_percent
            && p > 100
        {
            return Err(("low_battery_percent".into(), "must be 0 to 100".into()));
        }
        if let Some(d) = raw.report_delta
            && !(d.is_finite() && d >= 0.0)
        {
            return Err((
                "report_delta".into(),
                "must be a number ≥ 0 (0: every reading is reported)".into(),
            ));
        }
        Ok(Profile {
            id: raw.id,
            name: raw.name,
            kind: raw.kind,
            hardware_codes: raw.hardware_codes,
            sleeps: raw.sleeps,
            awake_for: Duration::from_secs(raw.awake_for_s),
            offline_after: (raw.offline_after_s > 0)
                .then(|| Duration::from_secs(raw.offline_after_s)),
            connect_timeout: Duration::from_millis(raw.connect_timeout_ms),
            session_valid: Duration::from_secs(raw.session_valid_s),
            low_battery_mv: raw.low_battery_mv,
            low_battery_percent: raw.low_battery_percent,
            report_delta: raw.report_delta.unwrap_or(0.5),
            report_every: Duration::from_secs(raw.report_every_s.unwrap_or(300)),
        })
    }
}

/// The id of the built-in profile a site database device of `kind` gets (a file of the
/// profiles directory with this id replaces it).
pub fn id_for_kind(kind: DeviceKind) -> &'static str {
    match kind {
        DeviceKind::Padlock => "noke-padlock",
        DeviceKind::Controller => "noke-unit-controller",
        DeviceKind::Sensor => "bthome-sensor",
        DeviceKind::Fob => "ble-fob",
    }
}

/// The embedded profiles by id. Panics only if a file in `devices/` is malformed, which the
/// unit test below catches at build time.
pub fn builtin() -> &'static BTreeMap<String, Profile> {
    static P: OnceLock<BTreeMap<String, Profile>> = OnceLock::new();
    P.get_or_init(|| {
        FILES
            .iter()
            .map(|(f, t)| {
                let p = parse(f, t).unwrap_or_else(|e| panic!("embedded BLE profile: {e}"));
                (p.id.clone(), p)
            })
            .collect()
    })
}

/// The profile of a site database device kind.
pub fn for_kind(kind: DeviceKind) -> &'static Profile {
    &builtin()[id_for_kind(kind)]
}

/// The profile each device kind gets: the built-in ones, or the files of the profiles
/// directory that replace them (`crate::profiles::Profiles::ble_kinds`).
#[derive(Debug, Clone)]
pub struct KindProfiles(std::sync::Arc<[Profile; 4]>);

impl KindProfiles {
    pub(crate) fn new(get: impl Fn(&str) -> Profile) -> KindProfiles {
        KindProfiles(std::sync::Arc::new(
            [
                DeviceKind::Padlock,
                DeviceKind::Controller,
                DeviceKind::Sensor,
                DeviceKind::Fob,
            ]
            .map(|k| get(id_for_kind(k))),
        ))
    }

    /// The profile of a site database device kind.
    pub fn get(&self, kind: DeviceKind) -> &Profile {
        &self.0[match kind {
            DeviceKind::Padlock => 0,
            DeviceKind::Controller => 1,
            DeviceKind::Sensor => 2,
            DeviceKind::Fob => 3,
        }]
    }
}

impl Default for KindProfiles {
    /// The built-in profiles.
    fn default() -> Self {
        KindProfiles::new(|id| builtin()[id].clone())
    }
}

/// The profile whose hardware codes include `code` (discovery of devices not yet in the site
/// database).
pub fn for_hardware_code(code: &str) -> Option<&'static Profile> {
    builtin()
        .values()
        .find(|p| p.hardware_codes.iter().any(|c| c == code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_profiles_parse_and_cover_every_kind() {
        let all = builtin();
        assert_eq!(all.len(), FILES.len());
        for k in [
            DeviceKind::Padlock,
            DeviceKind::Controller,
            DeviceKind::Sensor,
            DeviceKind::Fob,
        ] {
            assert_eq!(for_kind(k).kind, k);
        }
        assert!(for_kind(DeviceKind::Padlock).sleeps);
        assert_eq!(for_kind(DeviceKind::Padlock).offline_after, None);
        assert_eq!(
            for_kind(DeviceKind::Controller).offline_after,
            Some(Duration::from_secs(120))
        );
        assert_eq!(for_hardware_code("1A").unwrap().id, "noke-padlock");
        assert_eq!(for_hardware_code("3E").unwrap().id, "noke-unit-controller");
        assert!(for_hardware_code("ZZ").is_none());
    }

    #[test]
    fn a_profile_of_the_wrong_protocol_is_refused() {
        let t = FILES[0]
            .1
            .replace("protocol = \"ble-lock\"", "protocol = \"bthome\"");
        let e = parse("noke-padlock.toml", &t).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
    }
}
