//! The site's access data in memory: checked, normalised and indexed for decisions.
//!
//! A [`Site`] is built from a snapshot ([`Site::from_snapshot`]) and changed by deltas
//! ([`Site::prepare_delta`] then [`Site::commit`]); both check the whole result before anything
//! changes, so a bad message leaves the site as it was. Keypad codes are turned into keyed hashes
//! here, on the way in, and never kept in clear.
//!
//! Two kinds of table: the *small* ones (facility, zones, schedules, entries, units, users, shares,
//! transfers, blacklist: at most a few hundred thousand records even on a huge site), kept as the
//! wire records in hash maps and copied whole when a delta changes them; and the credential table
//! (up to millions), kept compact ([`CredTable`]) and changed in place.

use hashbrown::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::sync::{self, Card, Role};

/// Why a snapshot or delta was refused. The message names the record and the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SiteError {
    /// The data contradicts itself or the contract (unknown reference, duplicate, bad value).
    /// Nothing was applied; the producer must fix the data.
    #[error("{0}")]
    Invalid(String),
    /// A delta whose base is not the current version. Nothing was applied; send a snapshot.
    #[error("resync needed: delta {version} is based on version {base}, the site is at {current}")]
    ResyncNeeded {
        base: u64,
        version: u64,
        current: u64,
    },
}

/// A refusal: the identifiers it quotes between backticks are cut short
/// ([`crate::redact::cut_quoted`]); no message here quotes a credential value.
fn invalid(msg: impl Into<String>) -> SiteError {
    SiteError::Invalid(crate::redact::cut_quoted(&msg.into()))
}

/// The per-gateway key for keypad-code hashes (HMAC-SHA256). Kept outside the database.
#[derive(Clone)]
pub struct CodeKey {
    key: [u8; 32],
}

impl CodeKey {
    pub fn from_bytes(key: [u8; 32]) -> Self {
        CodeKey { key }
    }

    /// Hash of a keypad code. Codes are digit strings; leading zeros matter.
    pub fn hash(&self, code: &str) -> CodeHash {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("hmac takes any key length");
        mac.update(b"gatehouse-code-v1\0");
        mac.update(code.as_bytes());
        CodeHash(mac.finalize().into_bytes().into())
    }

    /// A fingerprint naming the key (not revealing it), written into exports.
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"gatehouse-code-key-id\0");
        h.update(self.key);
        hex::encode(&h.finalize()[..8])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CodeHash(pub [u8; 32]);

/// What a credential is, in the form decisions look it up by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CredValue {
    Code(CodeHash),
    Fob(Box<str>),
    Card(CardKey),
    DigitalKey(Box<str>),
}

/// A card as looked up and stored (no optional-field skipping: postcard is positional).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CardKey {
    pub facility_code: Option<u32>,
    pub number: u64,
}

impl From<Card> for CardKey {
    fn from(c: Card) -> Self {
        CardKey {
            facility_code: c.facility_code,
            number: c.number,
        }
    }
}

impl From<CardKey> for Card {
    fn from(c: CardKey) -> Self {
        Card {
            facility_code: c.facility_code,
            number: c.number,
        }
    }
}

impl CredValue {
    pub fn kind(&self) -> &'static str {
        match self {
            CredValue::Code(_) => "code",
            CredValue::Fob(_) => "fob",
            CredValue::Card(_) => "card",
            CredValue::DigitalKey(_) => "digital_key",
        }
    }
}

/// One credential as kept in memory ([`StoredCred`] is its form on disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cred {
    pub id: Box<str>,
    pub user: Arc<str>,
    pub value: CredValue,
}

/// The credential table: a slab of records with two hash indexes holding slot numbers only, so
/// that a million credentials cost little more than the records themselves.
#[derive(Clone, Default)]
pub struct CredTable {
    slots: Vec<Option<Cred>>,
    free: Vec<u32>,
    by_value: hashbrown::HashTable<u32>,
    /// Built on first use: decisions never need it, only deltas do, so a daemon starting on a
    /// large site does not pay for it before it can answer.
    by_id: std::sync::OnceLock<hashbrown::HashTable<u32>>,
    hasher: hashbrown::DefaultHashBuilder,
    len: usize,
}

impl CredTable {
    pub fn with_capacity(n: usize) -> Self {
        CredTable {
            slots: Vec::with_capacity(n),
            free: Vec::new(),
            by_value: hashbrown::HashTable::with_capacity(n),
            by_id: std::sync::OnceLock::new(),
            hasher: Default::default(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn hash<T: std::hash::Hash + ?Sized>(&self, v: &T) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(v)
    }

    fn slot(&self, i: u32) -> &Cred {
        self.slots[i as usize]
            .as_ref()
            .expect("indexed slot is occupied")
    }

    pub fn get_by_value(&self, value: &CredValue) -> Option<&Cred> {
        let h = self.hash(value);
        self.by_value
            .find(h, |&i| &self.slot(i).value == value)
            .map(|&i| self.slot(i))
    }

    fn by_id(&self) -> &hashbrown::HashTable<u32> {
        self.by_id.get_or_init(|| {
            use std::hash::BuildHasher;
            let mut t = hashbrown::HashTable::with_capacity(self.len);
            for (i, c) in self.slots.iter().enumerate() {
                if let Some(c) = c {
                    t.insert_unique(self.hash(&*c.id), i as u32, |&j| {
                        self.hasher.hash_one(&*self.slot(j).id)
                    });
                }
            }
            t
        })
    }

    pub fn get_by_id(&self, id: &str) -> Option<&Cred> {
        let h = self.hash(id);
        self.by_id()
            .find(h, |&i| &*self.slot(i).id == id)
            .map(|&i| self.slot(i))
    }

    /// Inserts or replaces by id. The caller has checked that the value is not another
    /// credential's.
    pub fn upsert(&mut self, cred: Cred) {
        self.remove(&cred.id.clone());
        self.insert_new(cred);
    }

    /// Inserts a credential whose id is not in the table (checked by the caller).
    pub fn insert_new(&mut self, cred: Cred) {
        let hv = self.hash(&cred.value);
        self.insert_resolved(ResolvedCred { cred, hv });
    }

    /// The hasher of the indexes, for hashing credentials on another thread.
    pub fn hasher(&self) -> hashbrown::DefaultHashBuilder {
        self.hasher
    }

    /// Inserts a credential hashed with [`Self::hasher`]; its id is not in the table.
    pub fn insert_resolved(&mut self, r: ResolvedCred) {
        use std::hash::BuildHasher;
        let ResolvedCred { cred, hv } = r;
        let hi = self.by_id.get().map(|_| self.hash(&*cred.id));
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(cred);
                i
            }
            None => {
                self.slots.push(Some(cred));
                (self.slots.len() - 1) as u32
            }
        };
        let (slots, hasher) = (&self.slots, &self.hasher);
        let occupied = |j: u32| slots[j as usize].as_ref().expect("occupied");
        self.by_value
            .insert_unique(hv, i, |&j| hasher.hash_one(&occupied(j).value));
        if let (Some(by_id), Some(hi)) = (self.by_id.get_mut(), hi) {
            by_id.insert_unique(hi, i, |&j| hasher.hash_one(&*occupied(j).id));
        }
        self.len += 1;
    }

    pub fn remove(&mut self, id: &str) -> Option<Cred> {
        let hi = self.hash(id);
        self.by_id();
        let slots = &self.slots;
        let entry = self
            .by_id
            .get_mut()
            .expect("built above")
            .find_entry(hi, |&i| {
                &*slots[i as usize].as_ref().expect("occupied").id == id
            })
            .ok()?;
        let (i, _) = entry.remove();
        let hv = self.hash(&self.slot(i).value);
        let slots = &self.slots;
        if let Ok(e) = self.by_value.find_entry(hv, |&j| j == i) {
            e.remove();
        }
        let _ = slots;
        self.free.push(i);
        self.len -= 1;
        self.slots[i as usize].take()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Cred> {
        self.slots.iter().flatten()
    }
}

/// A schedule compiled for evaluation: per weekday (Mon = 0), minute ranges `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledSchedule {
    pub always_open: bool,
    pub days: [Vec<(u16, u16)>; 7],
}

/// The 24/7 schedule, also used where no schedule applies.
pub static ALWAYS_OPEN: CompiledSchedule = CompiledSchedule {
    always_open: true,
    days: [const { Vec::new() }; 7],
};

fn parse_hhmm(s: &str, allow_24: bool) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 || !(h.bytes().chain(m.bytes())).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    if m >= 60 {
        return None;
    }
    match h {
        0..=23 => Some(h * 60 + m),
        24 if allow_24 && m == 0 => Some(1440),
        _ => None,
    }
}

fn compile_schedule(s: &sync::Schedule) -> Result<CompiledSchedule, SiteError> {
    if s.always_open {
        if !s.windows.is_empty() {
            return Err(invalid(format!(
                "schedule `{}` is always_open and also has windows (give one or the other)",
                s.id
            )));
        }
        return Ok(ALWAYS_OPEN.clone());
    }
    let mut days: [Vec<(u16, u16)>; 7] = Default::default();
    for (n, w) in s.windows.iter().enumerate() {
        let start = parse_hhmm(&w.start, false).ok_or_else(|| {
            invalid(format!(
                "schedule `{}` window {n}: start `{}` is not a time HH:MM (00:00 to 23:59)",
                s.id, w.start
            ))
        })?;
        let end = parse_hhmm(&w.end, true).ok_or_else(|| {
            invalid(format!(
                "schedule `{}` window {n}: end `{}` is not a time HH:MM (00:01 to 24:00)",
                s.id, w.end
            ))
        })?;
        if end <= start {
            return Err(invalid(format!(
                "schedule `{}` window {n}: end {} is not after start {} (split a window across \
                 midnight into two)",
                s.id, w.end, w.start
            )));
        }
        if w.days.is_empty() {
            return Err(invalid(format!(
                "schedule `{}` window {n} names no days",
                s.id
            )));
        }
        for d in &w.days {
            days[*d as usize].push((start, end));
        }
    }
    Ok(CompiledSchedule {
        always_open: false,
        days,
    })
}

/// Facility settings, checked.
#[derive(Debug, Clone)]
pub struct Facility {
    pub wire: sync::Facility,
    pub tz: Tz,
    pub temporary_code_secret: Option<Vec<u8>>,
}

fn check_facility(f: &sync::Facility) -> Result<Facility, SiteError> {
    let tz: Tz = f.time_zone.parse().map_err(|_| {
        invalid(format!(
            "facility time_zone `{}` is not an IANA time zone (e.g. America/New_York)",
            f.time_zone
        ))
    })?;
    let secret = match &f.temporary_code_secret {
        Some(s) => {
            let b =
                hex::decode(s).map_err(|_| invalid("facility temporary_code_secret is not hex"))?;
            if b.len() < 16 {
                return Err(invalid(format!(
                    "facility temporary_code_secret is {} bytes (at least 16 expected)",
                    b.len()
                )));
            }
            Some(b)
        }
        None => None,
    };
    if f.temporary_code_enabled && secret.is_none() {
        return Err(invalid(
            "facility temporary_code_enabled is true but temporary_code_secret is missing",
        ));
    }
    if f.fob_schedule_enabled && f.fob_schedule.is_none() {
        return Err(invalid(
            "facility fob_schedule_enabled is true but fob_schedule is missing",
        ));
    }
    let l = f.keypad_lockout;
    if l.max_failures == 0 || l.window_minutes == 0 {
        return Err(invalid(
            "facility keypad_lockout: max_failures and window_minutes must be at least 1",
        ));
    }
    for (name, value, max) in [
        ("grace_period_minutes", f.grace_period_minutes, 1440),
        (
            "offline_key_expiration_minutes",
            f.offline_key_expiration_minutes,
            525_600,
        ),
        ("keypad_lockout.max_failures", l.max_failures, 1000),
        ("keypad_lockout.window_minutes", l.window_minutes, 1440),
        ("keypad_lockout.cooldown_minutes", l.cooldown_minutes, 1440),
        ("motion_quiet_minutes", f.motion_quiet_minutes, 1440),
        ("motion_clear_minutes", f.motion_clear_minutes, 1440),
        ("temperature_minutes", f.temperature_minutes, 1440),
        ("loitering_alert_hours", f.loitering_alert_hours, 168),
    ] {
        if value > max {
            return Err(invalid(format!(
                "facility {name} is {value} (at most {max} expected)"
            )));
        }
    }
    check_automation(f)?;
    Ok(Facility {
        wire: f.clone(),
        tz,
        temporary_code_secret: secret,
    })
}

/// The facility's automation settings (docs/sync.md, *Automation*): ranges and pairs.
fn check_automation(f: &sync::Facility) -> Result<(), SiteError> {
    match (f.motion_alert_events, f.motion_alert_minutes) {
        (None, None) => {}
        (Some(n), Some(m)) => {
            if !(1..=1000).contains(&n) {
                return Err(invalid(format!(
                    "facility motion_alert_events is {n} (1 to 1000 expected)"
                )));
            }
            if !(1..=1440).contains(&m) {
                return Err(invalid(format!(
                    "facility motion_alert_minutes is {m} (1 to 1440 expected)"
                )));
            }
        }
        _ => {
            return Err(invalid(
                "facility motion_alert_events and motion_alert_minutes go together (both or neither)",
            ));
        }
    }
    if f.motion_clear_minutes == 0 {
        return Err(invalid(
            "facility motion_clear_minutes is 0 (1 to 1440 expected)",
        ));
    }
    for (name, v) in [
        ("temperature_min", f.temperature_min),
        ("temperature_max", f.temperature_max),
    ] {
        if let Some(v) = v
            && !(-60.0..=100.0).contains(&v)
        {
            return Err(invalid(format!(
                "facility {name} is out of range (-60 to 100 °C expected)"
            )));
        }
    }
    let h = f.temperature_hysteresis;
    if !(0.0..=20.0).contains(&h) {
        return Err(invalid(
            "facility temperature_hysteresis is out of range (0 to 20 °C expected)",
        ));
    }
    if let (Some(lo), Some(hi)) = (f.temperature_min, f.temperature_max)
        && lo + 2.0 * h >= hi
    {
        return Err(invalid(
            "facility temperature_min must be below temperature_max by more than twice \
             temperature_hysteresis",
        ));
    }
    Ok(())
}

fn check_trigger(zone: &str, i: usize, t: &sync::Trigger) -> Result<(), SiteError> {
    let at = || format!("zone `{zone}` triggers[{i}]");
    if t.device.is_empty() {
        return Err(invalid(format!("{} has an empty device", at())));
    }
    match (t.on_seconds, t.pulse_ms) {
        (Some(s), None) if (1..=86_400).contains(&s) => Ok(()),
        (Some(s), None) => Err(invalid(format!(
            "{} on_seconds is {s} (1 to 86400 expected)",
            at()
        ))),
        (None, Some(ms)) if (100..=60_000).contains(&ms) => Ok(()),
        (None, Some(ms)) => Err(invalid(format!(
            "{} pulse_ms is {ms} (100 to 60000 expected)",
            at()
        ))),
        _ => Err(invalid(format!(
            "{} must name exactly one of on_seconds, pulse_ms",
            at()
        ))),
    }
}

/// The small tables, copied whole on change.
#[derive(Debug, Clone)]
pub struct Tables {
    pub facility: Facility,
    pub zones: HashMap<String, sync::Zone>,
    /// BLE devices by id (with their secrets; never in events or logs).
    pub devices: HashMap<String, sync::Device>,
    pub schedules: HashMap<String, (sync::Schedule, CompiledSchedule)>,
    pub entries: HashMap<String, sync::Entry>,
    pub units: HashMap<String, sync::Unit>,
    pub users: HashMap<Arc<str>, sync::User>,
    pub shares: HashMap<String, sync::Share>,
    pub transfers: HashMap<String, sync::Transfer>,
    pub blacklist: HashMap<String, sync::BlacklistEntry>,
    /// Derived: units a user holds as tenant or auction winner.
    pub units_by_user: HashMap<Arc<str>, Vec<String>>,
    pub shares_by_user: HashMap<Arc<str>, Vec<String>>,
    pub transfers_by_user: HashMap<Arc<str>, Vec<String>>,
    pub blacklisted_fobs: HashSet<String>,
    pub blacklisted_cards: HashSet<Card>,
    pub revoked_keys: HashSet<String>,
    /// Derived: the unit a sensor belongs to (its `sensors`, and its `controller` with no
    /// channel), for the automation rules; the key has `front` false, the value says whether
    /// the sensor is the unit's front one.
    pub unit_by_sensor: HashMap<sync::SensorRef, (String, bool)>,
}

fn insert_unique<T>(
    map: &mut HashMap<String, T>,
    what: &str,
    id: String,
    v: T,
) -> Result<(), SiteError> {
    if id.is_empty() {
        return Err(invalid(format!("a {what} has an empty id")));
    }
    match map.entry(id) {
        hashbrown::hash_map::Entry::Occupied(e) => {
            Err(invalid(format!("{what} `{}` appears twice", e.key())))
        }
        hashbrown::hash_map::Entry::Vacant(e) => {
            e.insert(v);
            Ok(())
        }
    }
}

/// A device record: a MAC address, and keys of the right length in hex.
fn check_device(d: &sync::Device) -> Result<(), SiteError> {
    if d.id.is_empty() {
        return Err(invalid("a device has an empty id"));
    }
    let mac_ok = d.mac.len() == 17
        && d.mac.split(':').count() == 6
        && d.mac
            .split(':')
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if !mac_ok {
        return Err(invalid(format!(
            "device `{}`: mac `{}` is not AA:BB:CC:DD:EE:FF",
            d.id, d.mac
        )));
    }
    for (field, v, len) in [
        ("offline_key", &d.offline_key, 16),
        ("unlock_command", &d.unlock_command, 20),
        ("key", &d.key, 16),
    ] {
        if let Some(v) = v
            && hex::decode(v).map(|b| b.len()) != Ok(len)
        {
            return Err(invalid(format!(
                "device `{}`: {field} is not {} hex digits",
                d.id,
                len * 2
            )));
        }
    }
    Ok(())
}

/// The small tables of a snapshot, by value.
struct SmallParts {
    facility: sync::Facility,
    zones: Vec<sync::Zone>,
    schedules: Vec<sync::Schedule>,
    entries: Vec<sync::Entry>,
    units: Vec<sync::Unit>,
    users: Vec<sync::User>,
    shares: Vec<sync::Share>,
    transfers: Vec<sync::Transfer>,
    blacklist: Vec<sync::BlacklistEntry>,
    devices: Vec<sync::Device>,
}

impl SmallParts {
    fn owned(s: sync::Snapshot) -> Self {
        SmallParts {
            facility: s.facility,
            zones: s.zones,
            schedules: s.schedules,
            entries: s.entries,
            units: s.units,
            users: s.users,
            shares: s.shares,
            transfers: s.transfers,
            blacklist: s.blacklist,
            devices: s.devices,
        }
    }
}

impl Tables {
    fn build(p: SmallParts) -> Result<Tables, SiteError> {
        let mut t = Tables::empty(check_facility(&p.facility)?);
        for z in p.zones {
            insert_unique(&mut t.zones, "zone", z.id.clone(), z)?;
        }
        for x in p.schedules {
            let compiled = compile_schedule(&x)?;
            insert_unique(&mut t.schedules, "schedule", x.id.clone(), (x, compiled))?;
        }
        for x in p.entries {
            insert_unique(&mut t.entries, "entry", x.id.clone(), x)?;
        }
        for x in p.units {
            insert_unique(&mut t.units, "unit", x.id.clone(), x)?;
        }
        t.users.reserve(p.users.len());
        for x in p.users {
            if x.id.is_empty() {
                return Err(invalid("a user has an empty id"));
            }
            let id: Arc<str> = Arc::from(x.id.as_str());
            if let Some(old) = t.users.insert(id, x) {
                return Err(invalid(format!("user `{}` appears twice", old.id)));
            }
        }
        for x in p.shares {
            insert_unique(&mut t.shares, "share", x.id.clone(), x)?;
        }
        for x in p.transfers {
            insert_unique(&mut t.transfers, "transfer", x.id.clone(), x)?;
        }
        for x in p.blacklist {
            insert_unique(&mut t.blacklist, "blacklist entry", x.id.clone(), x)?;
        }
        for x in p.devices {
            check_device(&x)?;
            insert_unique(&mut t.devices, "device", x.id.clone(), x)?;
        }
        t.check_and_index()?;
        Ok(t)
    }

    fn empty(facility: Facility) -> Self {
        Tables {
            facility,
            zones: HashMap::new(),
            schedules: HashMap::new(),
            entries: HashMap::new(),
            units: HashMap::new(),
            users: HashMap::new(),
            shares: HashMap::new(),
            transfers: HashMap::new(),
            blacklist: HashMap::new(),
            devices: HashMap::new(),
            units_by_user: HashMap::new(),
            shares_by_user: HashMap::new(),
            transfers_by_user: HashMap::new(),
            blacklisted_fobs: HashSet::new(),
            blacklisted_cards: HashSet::new(),
            revoked_keys: HashSet::new(),
            unit_by_sensor: HashMap::new(),
        }
    }

    pub fn user_id(&self, id: &str) -> Option<&Arc<str>> {
        self.users.get_key_value(id).map(|(k, _)| k)
    }

    /// Checks every reference and rule across the small tables, then rebuilds the derived
    /// indexes. Called on every snapshot and after every delta.
    fn check_and_index(&mut self) -> Result<(), SiteError> {
        let f = &self.facility.wire;
        let sched = |id: &Option<String>, whose: &dyn Fn() -> String| -> Result<(), SiteError> {
            match id {
                Some(s) if !self.schedules.contains_key(s) => Err(invalid(format!(
                    "{} refers to unknown schedule `{s}`",
                    whose()
                ))),
                _ => Ok(()),
            }
        };
        sched(&f.default_schedule, &|| "facility default_schedule".into())?;
        sched(&f.fob_schedule, &|| "facility fob_schedule".into())?;
        let zone = |id: &Option<String>, whose: &dyn Fn() -> String| -> Result<(), SiteError> {
            match id {
                Some(z) if !self.zones.contains_key(z) => {
                    Err(invalid(format!("{} refers to unknown zone `{z}`", whose())))
                }
                _ => Ok(()),
            }
        };
        let user = |id: &str, whose: &dyn Fn() -> String| -> Result<(), SiteError> {
            if self.users.contains_key(id) {
                Ok(())
            } else {
                Err(invalid(format!(
                    "{} refers to unknown user `{id}`",
                    whose()
                )))
            }
        };
        let unit = |id: &str, whose: &dyn Fn() -> String| -> Result<(), SiteError> {
            if self.units.contains_key(id) {
                Ok(())
            } else {
                Err(invalid(format!(
                    "{} refers to unknown unit `{id}`",
                    whose()
                )))
            }
        };
        for z in self.zones.values() {
            for (i, t) in z.triggers.iter().enumerate() {
                check_trigger(&z.id, i, t)?;
            }
        }
        for e in self.entries.values() {
            zone(&e.zone, &|| format!("entry `{}`", e.id))?;
            if let Some(s) = e.held_open_seconds
                && !(5..=3600).contains(&s)
            {
                return Err(invalid(format!(
                    "entry `{}` held_open_seconds is {s} (5 to 3600 expected)",
                    e.id
                )));
            }
            if let Some(r) = &e.relay
                && r.device.is_empty()
            {
                return Err(invalid(format!(
                    "entry `{}` relay has an empty device",
                    e.id
                )));
            }
        }
        let mut unit_by_sensor: HashMap<sync::SensorRef, (String, bool)> = HashMap::new();
        let mut unit_ids: Vec<&String> = self.units.keys().collect();
        unit_ids.sort();
        for id in unit_ids {
            let u = &self.units[id];
            let controller = u.controller.iter().map(|c| sync::SensorRef {
                device: c.clone(),
                channel: None,
                front: false,
            });
            for (i, s) in u.sensors.iter().enumerate() {
                if s.device.is_empty() {
                    return Err(invalid(format!(
                        "unit `{}` sensors[{i}] has an empty device",
                        u.id
                    )));
                }
            }
            for s in &u.sensors {
                let key = sync::SensorRef {
                    front: false,
                    ..s.clone()
                };
                if let Some((other, _)) =
                    unit_by_sensor.insert(key.clone(), (u.id.clone(), s.front))
                    && other != u.id
                {
                    return Err(invalid(format!(
                        "units `{other}` and `{}` share the sensor `{}`",
                        u.id, key.device
                    )));
                }
            }
            for key in controller {
                unit_by_sensor.entry(key).or_insert((u.id.clone(), false));
            }
        }
        for u in self.units.values() {
            zone(&u.zone, &|| format!("unit `{}`", u.id))?;
            if let Some(t) = &u.tenant {
                user(t, &|| format!("unit `{}` tenant", u.id))?;
            }
            if let Some(w) = &u.auction_winner {
                user(w, &|| format!("unit `{}` auction_winner", u.id))?;
            }
        }
        for u in self.users.values() {
            sched(&u.schedule, &|| format!("user `{}`", u.id))?;
            for z in &u.zones {
                zone(&Some(z.clone()), &|| format!("user `{}`", u.id))?;
            }
            if u.role == Role::Vendor && u.expires_at.is_none() {
                return Err(invalid(format!(
                    "user `{}` is a vendor without expires_at (vendors need an expiry date)",
                    u.id
                )));
            }
        }
        for s in self.shares.values() {
            unit(&s.unit, &|| format!("share `{}`", s.id))?;
            user(&s.user, &|| format!("share `{}`", s.id))?;
            if let (Some(a), Some(b)) = (s.starts_at, s.ends_at)
                && b <= a
            {
                return Err(invalid(format!(
                    "share `{}` ends_at is not after starts_at",
                    s.id
                )));
            }
        }
        for t in self.transfers.values() {
            unit(&t.from_unit, &|| format!("transfer `{}` from_unit", t.id))?;
            unit(&t.to_unit, &|| format!("transfer `{}` to_unit", t.id))?;
            user(&t.user, &|| format!("transfer `{}`", t.id))?;
            if t.from_unit == t.to_unit {
                return Err(invalid(format!(
                    "transfer `{}` moves a unit onto itself",
                    t.id
                )));
            }
        }
        let (mut fobs, mut cards, mut keys) = (HashSet::new(), HashSet::new(), HashSet::new());
        for b in self.blacklist.values() {
            match (&b.fob, &b.card, &b.key_id) {
                (Some(f), None, None) => {
                    fobs.insert(f.clone());
                }
                (None, Some(c), None) => {
                    cards.insert(*c);
                }
                (None, None, Some(k)) => {
                    keys.insert(k.clone());
                }
                _ => {
                    return Err(invalid(format!(
                        "blacklist entry `{}` must name exactly one of fob, card, key_id",
                        b.id
                    )));
                }
            }
        }
        // Derived indexes.
        let uid = |id: &str| {
            self.users
                .get_key_value(id)
                .map(|(k, _)| k.clone())
                .expect("checked")
        };
        let mut units_by_user: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        for u in self.units.values() {
            for holder in u.tenant.iter().chain(u.auction_winner.iter()) {
                units_by_user
                    .entry(uid(holder))
                    .or_default()
                    .push(u.id.clone());
            }
        }
        let mut shares_by_user: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        for s in self.shares.values() {
            shares_by_user
                .entry(uid(&s.user))
                .or_default()
                .push(s.id.clone());
        }
        let mut transfers_by_user: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        for t in self.transfers.values() {
            transfers_by_user
                .entry(uid(&t.user))
                .or_default()
                .push(t.id.clone());
        }
        for v in units_by_user
            .values_mut()
            .chain(shares_by_user.values_mut())
            .chain(transfers_by_user.values_mut())
        {
            v.sort();
            v.dedup();
        }
        self.units_by_user = units_by_user;
        self.shares_by_user = shares_by_user;
        self.transfers_by_user = transfers_by_user;
        self.blacklisted_fobs = fobs;
        self.blacklisted_cards = cards;
        self.revoked_keys = keys;
        self.unit_by_sensor = unit_by_sensor;
        // One device per radio address: adverts are matched to devices by MAC.
        let mut macs: HashMap<String, &str> = HashMap::new();
        let mut ids: Vec<&String> = self.devices.keys().collect();
        ids.sort();
        for id in ids {
            let mac = self.devices[id].mac.to_ascii_uppercase();
            if let Some(other) = macs.insert(mac.clone(), id) {
                return Err(invalid(format!(
                    "devices `{other}` and `{id}` have the same mac `{mac}`"
                )));
            }
        }
        Ok(())
    }

    fn upsert(&mut self, u: &sync::Upserts) -> Result<(), SiteError> {
        fn unique_ids<'a>(what: &str, ids: impl Iterator<Item = &'a str>) -> Result<(), SiteError> {
            let mut seen = HashSet::new();
            for id in ids {
                if id.is_empty() {
                    return Err(invalid(format!("a {what} has an empty id")));
                }
                if !seen.insert(id) {
                    return Err(invalid(format!("{what} `{id}` appears twice in the delta")));
                }
            }
            Ok(())
        }
        unique_ids("zone", u.zones.iter().map(|x| x.id.as_str()))?;
        unique_ids("schedule", u.schedules.iter().map(|x| x.id.as_str()))?;
        unique_ids("entry", u.entries.iter().map(|x| x.id.as_str()))?;
        unique_ids("unit", u.units.iter().map(|x| x.id.as_str()))?;
        unique_ids("user", u.users.iter().map(|x| x.id.as_str()))?;
        unique_ids("share", u.shares.iter().map(|x| x.id.as_str()))?;
        unique_ids("transfer", u.transfers.iter().map(|x| x.id.as_str()))?;
        unique_ids("blacklist entry", u.blacklist.iter().map(|x| x.id.as_str()))?;
        unique_ids("device", u.devices.iter().map(|x| x.id.as_str()))?;
        for x in &u.devices {
            check_device(x)?;
        }
        if let Some(f) = &u.facility {
            self.facility = check_facility(f)?;
        }
        for z in &u.zones {
            self.zones.insert(z.id.clone(), z.clone());
        }
        for s in &u.schedules {
            self.schedules
                .insert(s.id.clone(), (s.clone(), compile_schedule(s)?));
        }
        for e in &u.entries {
            self.entries.insert(e.id.clone(), e.clone());
        }
        for x in &u.units {
            self.units.insert(x.id.clone(), x.clone());
        }
        for x in &u.users {
            self.users.insert(Arc::from(x.id.as_str()), x.clone());
        }
        for x in &u.shares {
            self.shares.insert(x.id.clone(), x.clone());
        }
        for x in &u.transfers {
            self.transfers.insert(x.id.clone(), x.clone());
        }
        for x in &u.blacklist {
            self.blacklist.insert(x.id.clone(), x.clone());
        }
        for x in &u.devices {
            self.devices.insert(x.id.clone(), x.clone());
        }
        Ok(())
    }

    fn delete(&mut self, d: &sync::Deletes) -> Result<(), SiteError> {
        fn del<T>(
            map: &mut HashMap<String, T>,
            what: &str,
            ids: &[String],
        ) -> Result<(), SiteError> {
            for id in ids {
                map.remove(id)
                    .ok_or_else(|| invalid(format!("delete of unknown {what} `{id}`")))?;
            }
            Ok(())
        }
        del(&mut self.zones, "zone", &d.zones)?;
        del(&mut self.schedules, "schedule", &d.schedules)?;
        del(&mut self.entries, "entry", &d.entries)?;
        del(&mut self.units, "unit", &d.units)?;
        del(&mut self.devices, "device", &d.devices)?;
        for id in &d.users {
            self.users
                .remove(id.as_str())
                .ok_or_else(|| invalid(format!("delete of unknown user `{id}`")))?;
        }
        del(&mut self.shares, "share", &d.shares)?;
        del(&mut self.transfers, "transfer", &d.transfers)?;
        del(&mut self.blacklist, "blacklist entry", &d.blacklist)?;
        Ok(())
    }
}

/// Counts of what the site holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub zones: usize,
    pub schedules: usize,
    pub entries: usize,
    pub units: usize,
    pub users: usize,
    pub credentials: usize,
    pub shares: usize,
    pub transfers: usize,
    pub blacklist: usize,
    pub devices: usize,
}

/// The whole site at one version.
#[derive(Clone)]
pub struct Site {
    pub version: u64,
    pub tables: Arc<Tables>,
    pub creds: CredTable,
}

/// A checked delta, ready to commit. Holds the new small tables and the credential changes.
pub struct PreparedDelta {
    pub version: u64,
    tables: Option<Arc<Tables>>,
    cred_deletes: Vec<String>,
    cred_upserts: Vec<Cred>,
    /// The delta as it will be stored: keypad codes replaced by their hashes.
    pub normalized: sync::Delta,
}

/// Turns a credential into the stored form, hashing a clear code. Consumes it: its id and its
/// fob or key id move into the stored record.
fn normalize_cred(
    c: sync::CompactCredential,
    tables: &Tables,
    key: &CodeKey,
    import_key_id: Option<&str>,
) -> Result<Cred, SiteError> {
    let user = tables
        .user_id(&c.user)
        .ok_or_else(|| {
            invalid(format!(
                "credential `{}` refers to unknown user `{}`",
                c.id, c.user
            ))
        })?
        .clone();
    if c.id.is_empty() {
        return Err(invalid("a credential has an empty id"));
    }
    use sync::CredentialValue as W;
    let value = match c.value {
        W::Code(code) => {
            if !(4..=12).contains(&code.len()) || !code.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(format!(
                    "credential `{}`: code must be 4 to 12 digits",
                    c.id
                )));
            }
            CredValue::Code(key.hash(&code))
        }
        W::CodeHmac(h) => {
            match import_key_id {
                Some(k) if k == key.id() => {}
                Some(k) => {
                    return Err(invalid(format!(
                        "credential `{}`: code_hmac was made with code key `{k}`, this gateway's \
                         key is `{}` (send codes in clear instead)",
                        c.id,
                        key.id()
                    )));
                }
                None => {
                    return Err(invalid(format!(
                        "credential `{}` has code_hmac but the message has no code_key_id",
                        c.id
                    )));
                }
            }
            let b = hex::decode(&*h)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok());
            CredValue::Code(CodeHash(b.ok_or_else(|| {
                invalid(format!(
                    "credential `{}`: code_hmac is not 64 hex digits",
                    c.id
                ))
            })?))
        }
        W::Fob(f) if !f.is_empty() => CredValue::Fob(f),
        W::Card(card) => CredValue::Card(card.into()),
        W::KeyId(k) if !k.is_empty() => CredValue::DigitalKey(k),
        W::Fob(_) | W::KeyId(_) | W::NotExactlyOne => {
            return Err(invalid(format!(
                "credential `{}` must name exactly one non-empty of code, code_hmac, fob, card, \
                 key_id",
                c.id
            )));
        }
    };
    Ok(Cred {
        id: c.id,
        user,
        value,
    })
}

fn describe_dup(a: &str, b: &str, v: &CredValue) -> SiteError {
    invalid(format!(
        "credential `{a}` has the same {} as credential `{b}` (credentials must be unique)",
        v.kind()
    ))
}

impl Site {
    /// Checks and indexes a snapshot. Nothing is kept if any part is wrong. Works on a copy of
    /// `s`; [`Site::from_incoming`] consumes the message instead (what the store applies).
    pub fn from_snapshot(s: &sync::Snapshot, key: &CodeKey) -> Result<Site, SiteError> {
        Site::from_incoming(sync::IncomingSnapshot::from_wire(s), key)
    }

    /// Checks and indexes a snapshot, consuming it: each credential is turned into its record
    /// (its strings moved, not copied) and each block of the message freed once done, so that
    /// the message and the new site are not both held whole. Nothing is kept if any part is
    /// wrong.
    pub fn from_incoming(s: sync::IncomingSnapshot, key: &CodeKey) -> Result<Site, SiteError> {
        let sync::IncomingSnapshot { small, credentials } = s;
        let (version, import_key_id) = (small.version, small.code_key_id.clone());
        let tables = Tables::build(SmallParts::owned(small))?;
        let mut creds = CredTable::with_capacity(credentials.len());
        for c in credentials.into_iter_freeing() {
            let cred = normalize_cred(c, &tables, key, import_key_id.as_deref())?;
            if let Some(other) = creds.get_by_id(&cred.id) {
                return Err(invalid(format!("credential `{}` appears twice", other.id)));
            }
            if let Some(other) = creds.get_by_value(&cred.value) {
                return Err(describe_dup(&cred.id, &other.id, &cred.value));
            }
            creds.insert_new(cred);
        }
        Ok(Site {
            version,
            tables: Arc::new(tables),
            creds,
        })
    }

    /// The small tables of a stored generation (a snapshot without credentials, consumed).
    pub fn stored_tables(small: sync::Snapshot) -> Result<Tables, SiteError> {
        Tables::build(SmallParts::owned(small))
    }

    /// Assembles a site from tables and a credential table filled against them.
    pub fn from_parts(version: u64, tables: Arc<Tables>, creds: CredTable) -> Site {
        Site {
            version,
            tables,
            creds,
        }
    }

    /// Checks a delta against this site without changing it.
    pub fn prepare_delta(
        &self,
        d: &sync::Delta,
        key: &CodeKey,
    ) -> Result<PreparedDelta, SiteError> {
        if d.base_version != self.version {
            return Err(SiteError::ResyncNeeded {
                base: d.base_version,
                version: d.version,
                current: self.version,
            });
        }
        if d.version <= d.base_version {
            return Err(invalid(format!(
                "delta version {} is not after its base_version {}",
                d.version, d.base_version
            )));
        }
        let u = &d.upsert;
        let small_changed = u.facility.is_some()
            || !(u.zones.is_empty()
                && u.schedules.is_empty()
                && u.entries.is_empty()
                && u.units.is_empty()
                && u.users.is_empty()
                && u.shares.is_empty()
                && u.transfers.is_empty()
                && u.blacklist.is_empty()
                && u.devices.is_empty())
            || !(d.delete.zones.is_empty()
                && d.delete.schedules.is_empty()
                && d.delete.entries.is_empty()
                && d.delete.units.is_empty()
                && d.delete.users.is_empty()
                && d.delete.shares.is_empty()
                && d.delete.transfers.is_empty()
                && d.delete.blacklist.is_empty()
                && d.delete.devices.is_empty());
        let tables = if small_changed {
            let mut t = (*self.tables).clone();
            t.delete(&d.delete)?;
            t.upsert(&d.upsert)?;
            t.check_and_index()?;
            Some(Arc::new(t))
        } else {
            None
        };
        let t = tables.as_deref().unwrap_or(&self.tables);

        // Credentials: deletes must exist; upserts must point at users that exist after the
        // delta and must not collide with a credential that survives it.
        let mut deleted: HashSet<&str> = HashSet::new();
        for id in &d.delete.credentials {
            if self.creds.get_by_id(id).is_none() || !deleted.insert(id) {
                return Err(invalid(format!("delete of unknown credential `{id}`")));
            }
        }
        let mut upserts = Vec::with_capacity(u.credentials.len());
        let mut new_values: HashMap<&CredValue, &str> = HashMap::new();
        let mut new_ids: HashSet<&str> = HashSet::new();
        for c in &u.credentials {
            upserts.push(normalize_cred(
                sync::CompactCredential::from_credential(c),
                t,
                key,
                d.code_key_id.as_deref(),
            )?);
        }
        for c in &upserts {
            if !new_ids.insert(&c.id) {
                return Err(invalid(format!(
                    "credential `{}` appears twice in the delta",
                    c.id
                )));
            }
        }
        for c in &upserts {
            if let Some(other) = new_values.insert(&c.value, &c.id) {
                return Err(describe_dup(&c.id, other, &c.value));
            }
            // A surviving credential holding this value is a clash; one being deleted or
            // rewritten by this same delta is not.
            if let Some(other) = self.creds.get_by_value(&c.value)
                && other.id != c.id
                && !deleted.contains(&*other.id)
                && !new_ids.contains(&*other.id)
            {
                return Err(describe_dup(&c.id, &other.id, &c.value));
            }
        }
        if !d.delete.users.is_empty() {
            let gone: HashSet<&str> = d.delete.users.iter().map(|s| s.as_str()).collect();
            let survivors_ref = self.creds.iter().find(|c| {
                gone.contains(&*c.user) && !deleted.contains(&*c.id) && !new_ids.contains(&*c.id)
            });
            if let Some(c) = survivors_ref {
                return Err(invalid(format!(
                    "delete of user `{}` leaves credential `{}` pointing at it (delete or \
                     reassign the credential in the same delta)",
                    c.user, c.id
                )));
            }
        }
        drop((new_ids, new_values));
        // Re-point credentials at the user Arcs of the new tables.
        if tables.is_some() {
            for c in &mut upserts {
                c.user = t.user_id(&c.user).expect("checked").clone();
            }
        }
        let mut normalized = d.clone();
        normalized.code_key_id = Some(key.id());
        normalized.upsert.credentials = upserts.iter().map(cred_to_wire).collect();
        Ok(PreparedDelta {
            version: d.version,
            tables,
            cred_deletes: d.delete.credentials.clone(),
            cred_upserts: upserts,
            normalized,
        })
    }

    /// Applies a prepared delta. Cannot fail.
    pub fn commit(&mut self, p: PreparedDelta) {
        if let Some(t) = p.tables {
            // Credentials keep pointing at user Arcs of the old tables; ids are equal, and
            // `Arc<str>` compares by content, so lookups are unaffected.
            self.tables = t;
        }
        for id in &p.cred_deletes {
            self.creds.remove(id);
        }
        for c in p.cred_upserts {
            self.creds.upsert(c);
        }
        self.version = p.version;
    }

    pub fn counts(&self) -> Counts {
        let t = &self.tables;
        Counts {
            zones: t.zones.len(),
            schedules: t.schedules.len(),
            entries: t.entries.len(),
            units: t.units.len(),
            users: t.users.len(),
            credentials: self.creds.len(),
            shares: t.shares.len(),
            transfers: t.transfers.len(),
            blacklist: t.blacklist.len(),
            devices: t.devices.len(),
        }
    }

    /// The small tables as a snapshot without credentials, sorted by id (stable output). It
    /// carries the BLE devices' offline and sensor keys: treat it as a secret.
    pub fn small_snapshot(&self, key: &CodeKey) -> sync::Snapshot {
        fn sorted<T: Clone>(it: impl Iterator<Item = T>, id: impl Fn(&T) -> String) -> Vec<T> {
            let mut v: Vec<T> = it.collect();
            v.sort_by_key(|x| id(x));
            v
        }
        let t = &self.tables;
        sync::Snapshot {
            schema_version: sync::SCHEMA_VERSION,
            kind: sync::SnapshotKind::Snapshot,
            version: self.version,
            code_key_id: Some(key.id()),
            facility: t.facility.wire.clone(),
            zones: sorted(t.zones.values().cloned(), |x| x.id.clone()),
            schedules: sorted(t.schedules.values().map(|(s, _)| s.clone()), |x| {
                x.id.clone()
            }),
            entries: sorted(t.entries.values().cloned(), |x| x.id.clone()),
            units: sorted(t.units.values().cloned(), |x| x.id.clone()),
            users: sorted(t.users.values().cloned(), |x| x.id.clone()),
            credentials: Vec::new(),
            shares: sorted(t.shares.values().cloned(), |x| x.id.clone()),
            transfers: sorted(t.transfers.values().cloned(), |x| x.id.clone()),
            blacklist: sorted(t.blacklist.values().cloned(), |x| x.id.clone()),
            devices: sorted(t.devices.values().cloned(), |x| x.id.clone()),
        }
    }

    /// [`Self::small_snapshot`] as JSON, written from the tables without copying them (the
    /// same bytes as serialising `small_snapshot`).
    pub fn small_snapshot_json(&self, key: &CodeKey) -> serde_json::Result<Vec<u8>> {
        fn sorted<'a, T>(it: impl Iterator<Item = &'a T>, id: impl Fn(&T) -> &str) -> Vec<&'a T> {
            let mut v: Vec<&T> = it.collect();
            v.sort_by(|a, b| id(a).cmp(id(b)));
            v
        }
        /// [`sync::Snapshot`]'s fields in its order, borrowed.
        #[derive(Serialize)]
        struct SmallRef<'a> {
            schema_version: u32,
            kind: sync::SnapshotKind,
            version: u64,
            code_key_id: String,
            facility: &'a sync::Facility,
            zones: Vec<&'a sync::Zone>,
            schedules: Vec<&'a sync::Schedule>,
            entries: Vec<&'a sync::Entry>,
            units: Vec<&'a sync::Unit>,
            users: Vec<&'a sync::User>,
            credentials: [(); 0],
            shares: Vec<&'a sync::Share>,
            transfers: Vec<&'a sync::Transfer>,
            blacklist: Vec<&'a sync::BlacklistEntry>,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            devices: Vec<&'a sync::Device>,
        }
        let t = &self.tables;
        serde_json::to_vec(&SmallRef {
            schema_version: sync::SCHEMA_VERSION,
            kind: sync::SnapshotKind::Snapshot,
            version: self.version,
            code_key_id: key.id(),
            facility: &t.facility.wire,
            zones: sorted(t.zones.values(), |x| &x.id),
            schedules: sorted(t.schedules.values().map(|(s, _)| s), |x| &x.id),
            entries: sorted(t.entries.values(), |x| &x.id),
            units: sorted(t.units.values(), |x| &x.id),
            users: sorted(t.users.values(), |x| &x.id),
            credentials: [],
            shares: sorted(t.shares.values(), |x| &x.id),
            transfers: sorted(t.transfers.values(), |x| &x.id),
            blacklist: sorted(t.blacklist.values(), |x| &x.id),
            devices: sorted(t.devices.values(), |x| &x.id),
        })
    }

    /// The whole site as a snapshot (codes as hashes, with this gateway's key id).
    pub fn export(&self, key: &CodeKey) -> sync::Snapshot {
        let mut s = self.small_snapshot(key);
        let mut creds: Vec<sync::Credential> = self.creds.iter().map(cred_to_wire).collect();
        creds.sort_by(|a, b| a.id.cmp(&b.id));
        s.credentials = creds;
        s
    }
}

/// A credential hashed for the indexes (on a loader thread), waiting for its user.
pub struct ResolvedCred {
    cred: Cred,
    hv: u64,
}

/// The credentials of one user, as stored in a credential chunk (postcard). Grouping by user
/// stores each user id once per chunk and resolves it once at load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredGroup {
    pub user: String,
    pub creds: Vec<(String, CredValue)>,
}

/// A [`StoredGroup`] decoded and hashed on a loader thread; needs no tables.
pub struct LoadedGroup {
    user: String,
    creds: Vec<(Box<str>, CredValue, u64)>,
}

impl LoadedGroup {
    pub fn hash(g: StoredGroup, hasher: &hashbrown::DefaultHashBuilder) -> LoadedGroup {
        use std::hash::BuildHasher;
        LoadedGroup {
            user: g.user,
            creds: g
                .creds
                .into_iter()
                .map(|(id, value)| {
                    let hv = hasher.hash_one(&value);
                    (id.into_boxed_str(), value, hv)
                })
                .collect(),
        }
    }

    /// Inserts the group's credentials, pointing them at the user's id in `tables`.
    pub fn insert_into(self, tables: &Tables, creds: &mut CredTable) -> Result<(), SiteError> {
        let user = tables
            .user_id(&self.user)
            .ok_or_else(|| {
                invalid(format!(
                    "stored credentials refer to unknown user `{}`",
                    self.user
                ))
            })?
            .clone();
        for (id, value, hv) in self.creds {
            creds.insert_resolved(ResolvedCred {
                cred: Cred {
                    id,
                    user: user.clone(),
                    value,
                },
                hv,
            });
        }
        Ok(())
    }
}

/// A [`StoredGroup`] as written: it borrows from the site, so that writing a generation does not
/// copy every credential (postcard encodes it exactly as a `StoredGroup`).
#[derive(Debug, Serialize)]
pub struct StoredGroupRef<'a> {
    pub user: &'a str,
    pub creds: Vec<(&'a str, &'a CredValue)>,
}

/// Groups credentials by user for storage, `per_chunk` credentials at most per chunk. The chunks
/// are made one at a time as the iterator is driven, and borrow from `creds`: writing a
/// generation holds one sorted list of references (8 bytes a credential) and one chunk, not a
/// copy of the table.
pub fn stored_chunks(creds: &CredTable, per_chunk: usize) -> StoredChunks<'_> {
    let mut all: Vec<&Cred> = creds.iter().collect();
    // Credentials of one user share one `Arc`; sorting by its address groups them cheaply.
    all.sort_unstable_by_key(|c| Arc::as_ptr(&c.user) as *const u8 as usize);
    StoredChunks {
        all,
        per_chunk: per_chunk.max(1),
        at: 0,
    }
}

/// The chunks of [`stored_chunks`], in order.
pub struct StoredChunks<'a> {
    all: Vec<&'a Cred>,
    per_chunk: usize,
    at: usize,
}

impl<'a> Iterator for StoredChunks<'a> {
    type Item = Vec<StoredGroupRef<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let end = (self.at + self.per_chunk).min(self.all.len());
        if self.at >= end {
            return None;
        }
        let mut groups: Vec<StoredGroupRef<'a>> = Vec::new();
        for c in &self.all[self.at..end] {
            let c: &'a Cred = c;
            match groups.last_mut() {
                Some(g) if *g.user == *c.user => g.creds.push((&c.id, &c.value)),
                _ => groups.push(StoredGroupRef {
                    user: &c.user,
                    creds: vec![(&c.id, &c.value)],
                }),
            }
        }
        self.at = end;
        Some(groups)
    }
}

pub fn cred_to_wire(c: &Cred) -> sync::Credential {
    let mut w = sync::Credential {
        id: c.id.to_string(),
        user: c.user.to_string(),
        code: None,
        code_hmac: None,
        fob: None,
        card: None,
        key_id: None,
    };
    match &c.value {
        CredValue::Code(h) => w.code_hmac = Some(hex::encode(h.0)),
        CredValue::Fob(f) => w.fob = Some(f.to_string()),
        CredValue::Card(card) => w.card = Some((*card).into()),
        CredValue::DigitalKey(k) => w.key_id = Some(k.to_string()),
    }
    w
}

/// Parses an RFC 3339 time, for the CLI and tests.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod stored_tests {
    use super::*;

    /// The stored base record, written from borrowed tables, is the small snapshot's JSON.
    #[test]
    fn small_snapshot_json_is_the_small_snapshot() {
        let doc = include_str!("../config/demo-snapshot.json");
        let Ok(sync::SyncMessage::Snapshot(s)) = sync::parse(doc.as_bytes()) else {
            panic!("demo snapshot")
        };
        assert!(!s.devices.is_empty() && !s.users.is_empty());
        let key = CodeKey::from_bytes([5; 32]);
        let site = Site::from_snapshot(&s, &key).unwrap();
        assert_eq!(
            site.small_snapshot_json(&key).unwrap(),
            serde_json::to_vec(&site.small_snapshot(&key)).unwrap()
        );
        let mut no_devices = (*s).clone();
        no_devices.devices.clear();
        let site = Site::from_snapshot(&no_devices, &key).unwrap();
        assert_eq!(
            site.small_snapshot_json(&key).unwrap(),
            serde_json::to_vec(&site.small_snapshot(&key)).unwrap()
        );
    }

    /// A borrowed group is written exactly as an owned one is read back.
    #[test]
    fn a_stored_group_ref_encodes_as_a_stored_group() {
        let (code, fob) = (
            CredValue::Code(CodeHash([3; 32])),
            CredValue::Fob("F1".into()),
        );
        let r = vec![StoredGroupRef {
            user: "u1",
            creds: vec![("c1", &code), ("c2", &fob)],
        }];
        let bytes = postcard::to_stdvec(&r).unwrap();
        let back: Vec<StoredGroup> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].user, "u1");
        assert_eq!(back[0].creds.len(), 2);
        assert_eq!(back[0].creds[0].0, "c1");
        assert!(matches!(&back[0].creds[1].1, CredValue::Fob(f) if &**f == "F1"));
    }
}
