//! The sync contract with the cloud: the JSON shapes of a *snapshot* (full replacement) and a
//! *delta* (upserts and deletes against a base version). `docs/sync.md` and
//! `docs/schemas/sync-*.schema.json` describe the same shapes for the cloud team; keep the three
//! in step.
//!
//! These types are the wire format only. They are checked and normalised into the domain types of
//! [`crate::site`] (codes hashed, times parsed, references resolved) before anything is stored.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

mod incoming;
pub use incoming::{
    CompactCredential, CredentialList, CredentialValue, Incoming, IncomingSnapshot, parse_for_apply,
};

/// The only schema version this gateway reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// A parsed sync message.
#[derive(Debug, Clone)]
pub enum SyncMessage {
    Snapshot(Box<Snapshot>),
    Delta(Box<Delta>),
}

impl SyncMessage {
    pub fn version(&self) -> u64 {
        match self {
            SyncMessage::Snapshot(s) => s.version,
            SyncMessage::Delta(d) => d.version,
        }
    }
}

/// Why a sync message could not be read. Each variant's message names what and where, and never
/// quotes a value of the input (see [`crate::redact`]): the document may carry keypad codes in
/// any field and in any shape.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not JSON, or JSON of the wrong shape. Fix the producer; nothing was applied. `message`
    /// is structural: the path (`credentials[3].code`), what was expected and the kind of value
    /// found, e.g. `credentials[3].code: expected a string, found a number`.
    #[error("line {line}, column {column}: {message}")]
    Json {
        line: usize,
        column: usize,
        message: String,
    },
    /// A schema this gateway does not know. Upgrade the gateway or downgrade the producer. The
    /// number is shown only when it is below 1000 (a version, not a misplaced code).
    #[error(
        "unsupported schema_version {} (this gateway reads {SCHEMA_VERSION})",
        if *.found < 1000 { found.to_string() } else { "(not shown)".to_string() }
    )]
    SchemaVersion { found: u32 },
    /// `kind` is neither `snapshot` nor `delta` (the word is shown only when it is a plain name).
    #[error("unknown kind {} (expected snapshot or delta)", crate::redact::name(.0))]
    Kind(String),
}

fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> ParseError {
    let mut message = crate::redact::serde_with_path(&e);
    if e.path().iter().next().is_none() && message.ends_with("found a string") {
        message.push_str(" (is the document JSON encoded twice?)");
    }
    ParseError::Json {
        line: e.inner().line(),
        column: e.inner().column(),
        message,
    }
}

fn from_slice<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ParseError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let v = serde_path_to_error::deserialize(&mut *de).map_err(json_error)?;
    de.end().map_err(|e| ParseError::Json {
        line: e.line(),
        column: e.column(),
        message: crate::redact::serde(&e),
    })?;
    Ok(v)
}

/// Reads a snapshot or a delta from JSON bytes. The header (`schema_version`, `kind`) is checked
/// first so that a message from a newer schema is refused with that reason rather than with
/// whatever field it happens to trip over. [`parse_for_apply`] reads the same documents with the
/// same refusals, a snapshot's credentials kept compact (what the gateway applies).
pub fn parse(bytes: &[u8]) -> Result<SyncMessage, ParseError> {
    match parse_header(bytes)? {
        Kind::Snapshot => Ok(SyncMessage::Snapshot(Box::new(from_slice(bytes)?))),
        Kind::Delta => Ok(SyncMessage::Delta(Box::new(from_slice(bytes)?))),
    }
}

enum Kind {
    Snapshot,
    Delta,
}

/// Checks `schema_version` and `kind`, before the body is read.
fn parse_header(bytes: &[u8]) -> Result<Kind, ParseError> {
    #[derive(Deserialize)]
    struct Header {
        schema_version: u32,
        kind: String,
    }
    let header: Header = from_slice(bytes)?;
    if header.schema_version != SCHEMA_VERSION {
        return Err(ParseError::SchemaVersion {
            found: header.schema_version,
        });
    }
    match header.kind.as_str() {
        "snapshot" => Ok(Kind::Snapshot),
        "delta" => Ok(Kind::Delta),
        other => Err(ParseError::Kind(other.to_string())),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    Snapshot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaKind {
    Delta,
}

/// Full replacement of the site's access data.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub schema_version: u32,
    pub kind: SnapshotKind,
    /// The version the site is at once this snapshot is applied. Any u64; deltas chain from it.
    pub version: u64,
    /// Set by `db export`: the fingerprint of the key its `code_hmac` values were made with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_key_id: Option<String>,
    pub facility: Facility,
    #[serde(default)]
    pub zones: Vec<Zone>,
    #[serde(default)]
    pub schedules: Vec<Schedule>,
    #[serde(default)]
    pub entries: Vec<Entry>,
    #[serde(default)]
    pub units: Vec<Unit>,
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub credentials: Vec<Credential>,
    #[serde(default)]
    pub shares: Vec<Share>,
    #[serde(default)]
    pub transfers: Vec<Transfer>,
    #[serde(default)]
    pub blacklist: Vec<BlacklistEntry>,
    /// BLE devices of the site (padlocks, unit controllers, sensors, fobs) with the secrets the
    /// gateway needs offline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<Device>,
}

/// What a BLE device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Padlock,
    Controller,
    Sensor,
    Fob,
}

/// A BLE device of the site. Units name padlocks and controllers by `id` (`controller`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub id: String,
    pub kind: DeviceKind,
    /// `AA:BB:CC:DD:EE:FF`.
    pub mac: String,
    /// Padlocks and controllers: the 16-byte offline key (32 hex digits) for offline unlocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_key: Option<String>,
    /// Padlocks and controllers: the 20-byte unlock command (40 hex digits) the offline
    /// unlock is made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlock_command: Option<String>,
    /// Encrypted BTHome sensors: the 16-byte AES key (32 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Seconds without an advertisement before the device is reported offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_after_s: Option<u64>,
}

/// Changes from `base_version` to `version`. Applied only when the site is at `base_version`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delta {
    pub schema_version: u32,
    pub kind: DeltaKind,
    pub base_version: u64,
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_key_id: Option<String>,
    #[serde(default)]
    pub upsert: Upserts,
    #[serde(default)]
    pub delete: Deletes,
}

/// Records to insert or replace, matched by `id`. `facility` replaces the settings whole.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upserts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facility: Option<Facility>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<Zone>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<Schedule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<Entry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<Unit>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<Credential>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<Share>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transfers: Vec<Transfer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blacklist: Vec<BlacklistEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<Device>,
}

/// Ids of records to delete. Deleting an id that does not exist is an error (the delta was made
/// against different data).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deletes {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transfers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blacklist: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
}

/// Facility-wide settings (the portal's Settings > Facility page, as far as access goes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Facility {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// IANA time zone, e.g. `America/New_York`. Schedules and the temporary code follow it.
    pub time_zone: String,
    /// The facility's gate hours; absent means open 24/7. Users without a schedule follow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_schedule: Option<String>,
    /// Minutes after a schedule closes during which users may still exit.
    #[serde(default)]
    pub grace_period_minutes: u32,
    /// ON: one overlocked unit keeps the tenant out of the facility altogether.
    #[serde(default)]
    pub restrict_overlocked_entry: bool,
    /// ON: blacklisted fobs and cards are refused. OFF: fob/card blacklist entries are ignored.
    #[serde(default)]
    pub use_blacklist: bool,
    /// ON: fobs follow `fob_schedule` instead of their user's schedule.
    #[serde(default)]
    pub fob_schedule_enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fob_schedule: Option<String>,
    /// Upper bound on how long an offline digital key is honoured after it was issued.
    #[serde(default = "default_offline_key_minutes")]
    pub offline_key_expiration_minutes: u32,
    #[serde(default)]
    pub keypad_lockout: KeypadLockout,
    /// ON: one code per facility-local day works at every keypad (see docs/sync.md for how it
    /// is derived from `temporary_code_secret`).
    #[serde(default)]
    pub temporary_code_enabled: bool,
    /// Hex, at least 16 bytes. Shared with the cloud so that the portal can show the day's code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temporary_code_secret: Option<String>,
    /// Motion alert: this many motion facts from one unit's sensors (1..=1000) within
    /// `motion_alert_minutes` count as motion. Absent (both): no motion alerts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub motion_alert_events: Option<u32>,
    /// Motion alert: the counting window in minutes (1..=1440), with `motion_alert_events`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub motion_alert_minutes: Option<u32>,
    /// Motion within this many minutes (0..=1440) after the unit's own grant or remote unlock is
    /// the tenant: no alert (`motion_suppressed` is not an event; see docs/automation.md).
    #[serde(default = "default_motion_quiet_minutes")]
    pub motion_quiet_minutes: u32,
    /// A motion alert clears after this many minutes (1..=1440) without motion; another one
    /// for the same unit can be raised only after that (the cooldown).
    #[serde(default = "default_motion_clear_minutes")]
    pub motion_clear_minutes: u32,
    /// Temperature alert bounds in °C (-60..=100). Absent: no alert on that side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_max: Option<f64>,
    /// A temperature alert clears once the reading is back inside by this many °C (0..=20).
    #[serde(default = "default_temperature_hysteresis")]
    pub temperature_hysteresis: f64,
    /// A reading must stay outside the bounds this many minutes (0..=1440) before the alert.
    #[serde(default = "default_temperature_minutes")]
    pub temperature_minutes: u32,
    /// A user granted in and not seen leaving within this many hours (0..=168) is loitering.
    /// 0: off (the manual's Idle Users widget uses 3).
    #[serde(default)]
    pub loitering_alert_hours: u32,
    /// ON: a grant into a zone switches that zone's `triggers`.
    #[serde(default)]
    pub zone_triggers: bool,
}

impl Facility {
    /// The settings a document with only `time_zone` would have (every default).
    pub fn new(time_zone: impl Into<String>) -> Facility {
        Facility {
            name: None,
            time_zone: time_zone.into(),
            default_schedule: None,
            grace_period_minutes: 0,
            restrict_overlocked_entry: false,
            use_blacklist: false,
            fob_schedule_enabled: false,
            fob_schedule: None,
            offline_key_expiration_minutes: default_offline_key_minutes(),
            keypad_lockout: KeypadLockout::default(),
            temporary_code_enabled: false,
            temporary_code_secret: None,
            motion_alert_events: None,
            motion_alert_minutes: None,
            motion_quiet_minutes: default_motion_quiet_minutes(),
            motion_clear_minutes: default_motion_clear_minutes(),
            temperature_min: None,
            temperature_max: None,
            temperature_hysteresis: default_temperature_hysteresis(),
            temperature_minutes: default_temperature_minutes(),
            loitering_alert_hours: 0,
            zone_triggers: false,
        }
    }
}

fn default_motion_quiet_minutes() -> u32 {
    30
}

fn default_motion_clear_minutes() -> u32 {
    10
}

fn default_temperature_hysteresis() -> f64 {
    1.0
}

fn default_temperature_minutes() -> u32 {
    5
}

fn default_offline_key_minutes() -> u32 {
    1440
}

/// N invalid codes within M minutes at one keypad lock that keypad for a cool-down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeypadLockout {
    pub max_failures: u32,
    pub window_minutes: u32,
    pub cooldown_minutes: u32,
}

impl Default for KeypadLockout {
    fn default() -> Self {
        KeypadLockout {
            max_failures: 5,
            window_minutes: 15,
            cooldown_minutes: 5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Relays switched when someone is granted into the zone (facility `zone_triggers` ON).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<Trigger>,
}

/// A zone trigger: a relay output (a device id from the gateway's config and its channel)
/// switched on for `on_seconds` (1..=86400; the off time is stored, so a restart switches it
/// off on time) or pulsed for `pulse_ms` (100..=60000). Exactly one of the two.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    pub device: String,
    pub channel: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulse_ms: Option<u32>,
}

/// Weekly opening windows in the facility's local time, or 24/7.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// 24/7: `windows` must then be empty.
    #[serde(default)]
    pub always_open: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<Window>,
}

/// Open from `start` (inclusive) to `end` (exclusive) local time on each of `days`.
/// `HH:MM`, 24-hour; `end` may be `24:00`. A window across midnight is written as two windows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub days: Vec<Weekday>,
    pub start: String,
    pub end: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Gate,
    Door,
    Elevator,
    /// Readers on an exit only ever see people leaving: decisions there use the grace period.
    Exit,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub kind: EntryKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<Relay>,
    /// A door contact still open this many seconds (5..=3600) after it opened raises
    /// `door_held_open`. Absent: no held-open alarm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_open_seconds: Option<u32>,
}

/// The output that opens an entry: a device id from the gateway's config and its channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relay {
    pub device: String,
    pub channel: u16,
    #[serde(default = "default_pulse_ms")]
    pub pulse_ms: u32,
}

fn default_pulse_ms() -> u32 {
    3000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitStatus {
    Occupied,
    Available,
    Overlock,
    PendingAuction,
    Gatelocked,
    PreLet,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unit {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub status: UnitStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Only meaningful while the status is `pending_auction`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auction_winner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Device id of the unit's padlock or unit controller, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    /// Unit Alarm: OFF disables alerts for manual unlocks and motion in this unit.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub alarm_enabled: bool,
    /// Monitor Temperature: OFF disables temperature alerts from this unit's sensors.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub monitor_temperature: bool,
    /// Front Motion: OFF ignores the unit's sensors marked `front`.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub front_motion: bool,
    /// The unit's sensors (motion, temperature): BLE devices by id, Modbus inputs and
    /// readings by device id and channel. The controller is the unit's sensor too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sensors: Vec<SensorRef>,
}

impl Unit {
    /// A unit with every optional field at its default.
    pub fn new(id: impl Into<String>, status: UnitStatus) -> Unit {
        Unit {
            id: id.into(),
            name: None,
            status,
            tenant: None,
            auction_winner: None,
            zone: None,
            controller: None,
            alarm_enabled: true,
            monitor_temperature: true,
            front_motion: true,
            sensors: Vec::new(),
        }
    }
}

/// A sensor of a unit: a device id (a BLE sensor of `devices`, or a Modbus device of the
/// gateway's config with the input `channel`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorRef {
    pub device: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<u16>,
    /// The front-facing motion sensor (the unit's `front_motion` switches it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub front: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Tenant,
    SharedUser,
    Employee,
    Manager,
    Vendor,
    AuctionWinner,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub role: Role,
    /// Absent: the facility's default schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Empty: no zone restriction. Vendors are usually limited to zones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<String>,
    /// Required for vendors; optional for everyone else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// A credential names exactly one of `code`, `code_hmac`, `fob`, `card`, `key_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub id: String,
    pub user: String,
    /// A keypad code in clear (4 to 12 digits). Hashed on arrival; never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// A keypad code already hashed by this gateway (as `db export` writes it): hex HMAC-SHA256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_hmac: Option<String>,
    /// A fob's tracking id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fob: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<Card>,
    /// The id of an offline digital key issued to this user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

/// A card number; `facility_code` absent matches a card of that number with any facility code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Card {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facility_code: Option<u32>,
    pub number: u64,
}

/// A tenant's unit shared with another user, for a time frame or indefinitely.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Share {
    pub id: String,
    pub unit: String,
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starts_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_at: Option<DateTime<Utc>>,
}

/// A tenant moving from `from_unit` to `to_unit` holds both until `expires_at` (48 h after the
/// transfer starts unless extended), then only `to_unit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transfer {
    pub id: String,
    pub user: String,
    pub from_unit: String,
    pub to_unit: String,
    pub expires_at: DateTime<Utc>,
}

/// Exactly one of `fob`, `card`, `key_id`. Fob and card entries apply while the facility's
/// *Use Blacklist* is ON; a `key_id` entry revokes an offline digital key whatever the setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlacklistEntry {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fob: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<Card>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
