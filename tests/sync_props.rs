//! Properties of the sync path (snapshot, deltas, export, import) through the real [`Store`]:
//!
//! 1. *Applying deltas one by one equals applying the final snapshot.* A random small site is
//!    kept as a [`Model`] (BTreeMaps of wire records); random modifications produce a chain of
//!    models, and each delta is the diff between two consecutive models. Store A gets the first
//!    snapshot and then every delta; store B gets only the snapshot of the last model. Both must
//!    hold the same data (counts, version, small tables, credentials up to their code hashes, and
//!    the model itself) and decide every request the same way.
//! 2. *Decisions are identical after export → import.* Store A's export, written to JSON and
//!    read back with [`gatehouse::sync::parse`], is imported by store C that shares A's
//!    `code.key` (a backup restored on the same gateway): same data, same decisions. A store with
//!    another code key refuses the same export and stays empty.
//!
//! Decisions are compared for every credential of the model (codes in clear, fobs, cards), a few
//! unknown ones, blacklisted fobs and the temporary code of the day, at every entry and unit plus
//! an unknown one of each, in both directions, at three instants of Monday 2026-11-23 in
//! America/New_York: inside gate hours, 10 minutes after closing (inside the 30-minute grace
//! period) and at night.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Duration, Utc};
use gatehouse::policy::{Context, Decision, Direction, Presented, Request, Target, decide};
use gatehouse::site::parse_time;
use gatehouse::store::Store;
use gatehouse::sync::{
    self, BlacklistEntry, Card, Credential, Deletes, Delta, DeltaKind, Facility, Role, Share,
    Snapshot, SnapshotKind, SyncMessage, Transfer, Unit, UnitStatus, Upserts, User,
};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::json;

const TEMP_SECRET_HEX: &str = "64656d6f2d74656d706f726172792d636f64652d736563726574";
const STATUSES: [UnitStatus; 6] = [
    UnitStatus::Occupied,
    UnitStatus::Available,
    UnitStatus::Overlock,
    UnitStatus::PendingAuction,
    UnitStatus::Gatelocked,
    UnitStatus::PreLet,
];
const ROLES: [Role; 6] = [
    Role::Tenant,
    Role::SharedUser,
    Role::Employee,
    Role::Manager,
    Role::Vendor,
    Role::AuctionWinner,
];
/// A user's schedule: the facility default, or one of these.
const SCHEDULES: [Option<&str>; 4] = [None, Some("always"), Some("gate-hours"), Some("office")];
const ZONES: [&str; 2] = ["zone-a", "zone-b"];
const ENTRIES: [&str; 4] = ["gate-1", "exit-1", "door-a", "elevator-b"];
/// Facility-local midnight starting Monday 2026-11-23 (EST); generated times are hours after it.
const BASE: &str = "2026-11-23T00:00:00-05:00";
/// Inside gate hours (06:00-22:00), 10 minutes after closing (grace 30), at night.
const INSTANTS: [&str; 3] = [
    "2026-11-23T10:00:00-05:00",
    "2026-11-23T22:10:00-05:00",
    "2026-11-24T03:00:00-05:00",
];

fn time(s: &str) -> DateTime<Utc> {
    parse_time(s).unwrap_or_else(|| panic!("`{s}` is not RFC 3339"))
}

fn hours_after_base(h: i64) -> DateTime<Utc> {
    time(BASE) + Duration::hours(h)
}

// ------------------------------------------------------------------------------------------------
// The model: the site as BTreeMaps of wire records
// ------------------------------------------------------------------------------------------------

/// A small site. Zones, schedules and entries are fixed ([`fixed_tables`]); everything else is
/// generated and modified. `serial` only names new records (it is not site data).
#[derive(Debug, Clone, PartialEq)]
struct Model {
    facility: Facility,
    units: BTreeMap<String, Unit>,
    users: BTreeMap<String, User>,
    credentials: BTreeMap<String, Credential>,
    shares: BTreeMap<String, Share>,
    transfers: BTreeMap<String, Transfer>,
    blacklist: BTreeMap<String, BlacklistEntry>,
    serial: u32,
}

/// A credential value to add.
#[derive(Debug, Clone)]
enum CredGen {
    Code(String),
    Fob(String),
    Card(Option<u32>, u64),
}

#[derive(Debug, Clone)]
struct UserGen {
    role: usize,
    schedule: usize,
    zones: Vec<usize>,
    /// Hours after [`BASE`].
    expires: Option<i64>,
}

#[derive(Debug, Clone)]
struct UnitGen {
    status: usize,
    tenant: Option<usize>,
    winner: Option<usize>,
    zone: Option<usize>,
}

#[derive(Debug, Clone)]
struct ShareGen {
    unit: usize,
    user: usize,
    /// (start, length) in hours after [`BASE`]; none: indefinite.
    frame: Option<(i64, i64)>,
}

#[derive(Debug, Clone)]
struct TransferGen {
    user: usize,
    from: usize,
    to: usize,
    /// Hours after [`BASE`].
    expires: i64,
}

/// A blacklist entry to add: a fob or card some credential holds, or one nobody holds.
#[derive(Debug, Clone)]
enum BlacklistGen {
    CredentialFob(usize),
    FreshFob(String),
    CredentialCard(usize),
    CardAnyFacilityCode(u64),
}

#[derive(Debug, Clone)]
struct Init {
    units: Vec<UnitGen>,
    users: Vec<UserGen>,
    /// Every initial site has at least one keypad code (user 0's).
    first_code: String,
    credentials: Vec<(usize, CredGen)>,
    shares: Vec<ShareGen>,
    transfers: Vec<TransferGen>,
    blacklist: Vec<BlacklistGen>,
    restrict: bool,
    use_blacklist: bool,
    fob_schedule: bool,
    temporary_code: bool,
}

/// One modification of the model. Indices are taken modulo the current table sizes; a
/// modification that cannot apply (nothing to remove, a value already held) changes nothing,
/// and its delta is then empty.
#[derive(Debug, Clone)]
enum Op {
    UnitStatus {
        unit: usize,
        status: usize,
    },
    UnitHolders {
        unit: usize,
        tenant: Option<usize>,
        winner: Option<usize>,
    },
    AddCredential {
        user: usize,
        value: CredGen,
    },
    RemoveCredential {
        n: usize,
    },
    /// The same value under a new id (a delete and an upsert of one value in one delta).
    ReissueCredential {
        n: usize,
    },
    /// The same id given to another user.
    MoveCredential {
        n: usize,
        user: usize,
    },
    AddShare(ShareGen),
    RemoveShare {
        n: usize,
    },
    AddTransfer(TransferGen),
    RemoveTransfer {
        n: usize,
    },
    AddBlacklist(BlacklistGen),
    RemoveBlacklist {
        n: usize,
    },
    AddUser(UserGen),
    ToggleRestrictOverlockedEntry,
    ToggleUseBlacklist,
    ToggleFobSchedule,
    ToggleTemporaryCode,
}

fn nth_key<T>(map: &BTreeMap<String, T>, n: usize) -> Option<String> {
    if map.is_empty() {
        None
    } else {
        map.keys().nth(n % map.len()).cloned()
    }
}

fn cred_value_eq(a: &Credential, b: &Credential) -> bool {
    (a.code.is_some() && a.code == b.code)
        || (a.fob.is_some() && a.fob == b.fob)
        || (a.card.is_some() && a.card == b.card)
}

impl Model {
    fn new(init: &Init) -> Model {
        let mut m = Model {
            facility: Facility {
                name: Some("Sync Props Storage".into()),
                time_zone: "America/New_York".into(),
                default_schedule: Some("gate-hours".into()),
                grace_period_minutes: 30,
                restrict_overlocked_entry: init.restrict,
                use_blacklist: init.use_blacklist,
                fob_schedule_enabled: init.fob_schedule,
                fob_schedule: Some("fob-hours".into()),
                offline_key_expiration_minutes: 1440,
                keypad_lockout: Default::default(),
                temporary_code_enabled: init.temporary_code,
                temporary_code_secret: Some(TEMP_SECRET_HEX.into()),
                ..Facility::new("UTC")
            },
            units: BTreeMap::new(),
            users: BTreeMap::new(),
            credentials: BTreeMap::new(),
            shares: BTreeMap::new(),
            transfers: BTreeMap::new(),
            blacklist: BTreeMap::new(),
            serial: 0,
        };
        for u in &init.users {
            m.add_user(u);
        }
        for (i, u) in init.units.iter().enumerate() {
            let unit = Unit {
                id: format!("U-{i}"),
                name: None,
                status: STATUSES[u.status],
                tenant: u.tenant.and_then(|t| nth_key(&m.users, t)),
                auction_winner: u.winner.and_then(|w| nth_key(&m.users, w)),
                zone: u.zone.map(|z| ZONES[z].to_string()),
                controller: None,
                ..Unit::new("", STATUSES[u.status])
            };
            m.units.insert(unit.id.clone(), unit);
        }
        m.add_credential(0, &CredGen::Code(init.first_code.clone()));
        for (user, value) in &init.credentials {
            m.add_credential(*user, value);
        }
        for s in &init.shares {
            m.add_share(s);
        }
        for t in &init.transfers {
            m.add_transfer(t);
        }
        for b in &init.blacklist {
            m.add_blacklist(b);
        }
        m
    }

    fn next_id(&mut self, prefix: &str) -> String {
        self.serial += 1;
        format!("{prefix}-{}", self.serial)
    }

    fn add_user(&mut self, g: &UserGen) {
        let role = ROLES[g.role];
        let mut zones: Vec<String> = g.zones.iter().map(|&z| ZONES[z].to_string()).collect();
        zones.sort();
        zones.dedup();
        let expires_at = match (g.expires, role) {
            (Some(h), _) => Some(hours_after_base(h)),
            // Vendors need an expiry date.
            (None, Role::Vendor) => Some(hours_after_base(24 * 30)),
            (None, _) => None,
        };
        let id = self.next_id("user");
        self.users.insert(
            id.clone(),
            User {
                id,
                name: None,
                role,
                schedule: SCHEDULES[g.schedule].map(String::from),
                zones,
                expires_at,
            },
        );
    }

    fn add_credential(&mut self, user: usize, g: &CredGen) {
        let Some(user) = nth_key(&self.users, user) else {
            return;
        };
        let mut c = Credential {
            id: String::new(),
            user,
            code: None,
            code_hmac: None,
            fob: None,
            card: None,
            key_id: None,
        };
        match g {
            CredGen::Code(s) => c.code = Some(s.clone()),
            CredGen::Fob(s) => c.fob = Some(s.clone()),
            CredGen::Card(fc, n) => {
                c.card = Some(Card {
                    facility_code: *fc,
                    number: *n,
                })
            }
        }
        // Credentials are unique by value.
        if self.credentials.values().any(|o| cred_value_eq(o, &c)) {
            return;
        }
        c.id = self.next_id("c");
        self.credentials.insert(c.id.clone(), c);
    }

    fn add_share(&mut self, g: &ShareGen) {
        let (Some(unit), Some(user)) = (nth_key(&self.units, g.unit), nth_key(&self.users, g.user))
        else {
            return;
        };
        let id = self.next_id("s");
        let (starts_at, ends_at) = match g.frame {
            Some((start, length)) => (
                Some(hours_after_base(start)),
                Some(hours_after_base(start + length)),
            ),
            None => (None, None),
        };
        self.shares.insert(
            id.clone(),
            Share {
                id,
                unit,
                user,
                starts_at,
                ends_at,
            },
        );
    }

    fn add_transfer(&mut self, g: &TransferGen) {
        let (Some(from_unit), Some(to_unit), Some(user)) = (
            nth_key(&self.units, g.from),
            nth_key(&self.units, g.to),
            nth_key(&self.users, g.user),
        ) else {
            return;
        };
        if from_unit == to_unit {
            return;
        }
        let id = self.next_id("t");
        self.transfers.insert(
            id.clone(),
            Transfer {
                id,
                user,
                from_unit,
                to_unit,
                expires_at: hours_after_base(g.expires),
            },
        );
    }

    fn add_blacklist(&mut self, g: &BlacklistGen) {
        let mut e = BlacklistEntry {
            id: String::new(),
            fob: None,
            card: None,
            key_id: None,
            reason: Some("delinquent".into()),
        };
        let fobs: Vec<String> = self
            .credentials
            .values()
            .filter_map(|c| c.fob.clone())
            .collect();
        let cards: Vec<Card> = self.credentials.values().filter_map(|c| c.card).collect();
        match g {
            BlacklistGen::CredentialFob(n) if !fobs.is_empty() => {
                e.fob = Some(fobs[n % fobs.len()].clone())
            }
            BlacklistGen::CredentialFob(_) => return,
            BlacklistGen::FreshFob(s) => e.fob = Some(s.clone()),
            BlacklistGen::CredentialCard(n) if !cards.is_empty() => {
                e.card = Some(cards[n % cards.len()])
            }
            BlacklistGen::CredentialCard(_) => return,
            BlacklistGen::CardAnyFacilityCode(n) => {
                e.card = Some(Card {
                    facility_code: None,
                    number: *n,
                })
            }
        }
        e.id = self.next_id("bl");
        self.blacklist.insert(e.id.clone(), e);
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::UnitStatus { unit, status } => {
                if let Some(id) = nth_key(&self.units, *unit) {
                    self.units.get_mut(&id).expect("unit").status = STATUSES[*status];
                }
            }
            Op::UnitHolders {
                unit,
                tenant,
                winner,
            } => {
                if let Some(id) = nth_key(&self.units, *unit) {
                    let tenant = tenant.and_then(|t| nth_key(&self.users, t));
                    let winner = winner.and_then(|w| nth_key(&self.users, w));
                    let u = self.units.get_mut(&id).expect("unit");
                    u.tenant = tenant;
                    u.auction_winner = winner;
                }
            }
            Op::AddCredential { user, value } => self.add_credential(*user, value),
            Op::RemoveCredential { n } => {
                if let Some(id) = nth_key(&self.credentials, *n) {
                    self.credentials.remove(&id);
                }
            }
            Op::ReissueCredential { n } => {
                if let Some(id) = nth_key(&self.credentials, *n) {
                    let mut c = self.credentials.remove(&id).expect("credential");
                    c.id = self.next_id("c");
                    self.credentials.insert(c.id.clone(), c);
                }
            }
            Op::MoveCredential { n, user } => {
                if let (Some(id), Some(user)) =
                    (nth_key(&self.credentials, *n), nth_key(&self.users, *user))
                {
                    self.credentials.get_mut(&id).expect("credential").user = user;
                }
            }
            Op::AddShare(g) => self.add_share(g),
            Op::RemoveShare { n } => {
                if let Some(id) = nth_key(&self.shares, *n) {
                    self.shares.remove(&id);
                }
            }
            Op::AddTransfer(g) => self.add_transfer(g),
            Op::RemoveTransfer { n } => {
                if let Some(id) = nth_key(&self.transfers, *n) {
                    self.transfers.remove(&id);
                }
            }
            Op::AddBlacklist(g) => self.add_blacklist(g),
            Op::RemoveBlacklist { n } => {
                if let Some(id) = nth_key(&self.blacklist, *n) {
                    self.blacklist.remove(&id);
                }
            }
            Op::AddUser(g) => self.add_user(g),
            Op::ToggleRestrictOverlockedEntry => {
                self.facility.restrict_overlocked_entry ^= true;
            }
            Op::ToggleUseBlacklist => self.facility.use_blacklist ^= true,
            Op::ToggleFobSchedule => self.facility.fob_schedule_enabled ^= true,
            Op::ToggleTemporaryCode => self.facility.temporary_code_enabled ^= true,
        }
    }

    fn snapshot(&self, version: u64) -> Snapshot {
        let (zones, schedules, entries) = fixed_tables();
        Snapshot {
            schema_version: sync::SCHEMA_VERSION,
            kind: SnapshotKind::Snapshot,
            version,
            code_key_id: None,
            facility: self.facility.clone(),
            zones,
            schedules,
            entries,
            units: self.units.values().cloned().collect(),
            users: self.users.values().cloned().collect(),
            credentials: self.credentials.values().cloned().collect(),
            shares: self.shares.values().cloned().collect(),
            transfers: self.transfers.values().cloned().collect(),
            blacklist: self.blacklist.values().cloned().collect(),
            devices: Vec::new(),
        }
    }
}

/// Zones, schedules and entries, the same in every model.
fn fixed_tables() -> (Vec<sync::Zone>, Vec<sync::Schedule>, Vec<sync::Entry>) {
    let zones = serde_json::from_value(json!([{ "id": "zone-a" }, { "id": "zone-b" }]));
    let schedules = serde_json::from_value(json!([
        { "id": "always", "always_open": true },
        { "id": "fob-hours", "windows": [
            { "days": ["mon","tue","wed","thu","fri","sat","sun"], "start": "07:00", "end": "21:00" } ] },
        { "id": "gate-hours", "windows": [
            { "days": ["mon","tue","wed","thu","fri","sat","sun"], "start": "06:00", "end": "22:00" } ] },
        { "id": "office", "windows": [
            { "days": ["mon","tue","wed","thu","fri"], "start": "09:00", "end": "17:00" } ] }
    ]));
    let entries = serde_json::from_value(json!([
        { "id": "door-a", "kind": "door", "zone": "zone-a" },
        { "id": "elevator-b", "kind": "elevator", "zone": "zone-b" },
        { "id": "exit-1", "kind": "exit" },
        { "id": "gate-1", "kind": "gate" }
    ]));
    (
        zones.expect("zones"),
        schedules.expect("schedules"),
        entries.expect("entries"),
    )
}

/// Records of `new` that are not in `old` or differ, and ids of `old` missing from `new`.
fn diff<T: Clone + PartialEq>(
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
) -> (Vec<T>, Vec<String>) {
    let upserts = new
        .iter()
        .filter(|(id, v)| old.get(*id) != Some(*v))
        .map(|(_, v)| v.clone())
        .collect();
    let deletes = old
        .keys()
        .filter(|id| !new.contains_key(*id))
        .cloned()
        .collect();
    (upserts, deletes)
}

/// The delta taking a site from `old` (at `base`) to `new` (at `base + 1`).
fn delta(old: &Model, new: &Model, base: u64) -> Delta {
    let mut upsert = Upserts::default();
    let mut delete = Deletes::default();
    if old.facility != new.facility {
        upsert.facility = Some(new.facility.clone());
    }
    (upsert.units, delete.units) = diff(&old.units, &new.units);
    (upsert.users, delete.users) = diff(&old.users, &new.users);
    (upsert.credentials, delete.credentials) = diff(&old.credentials, &new.credentials);
    (upsert.shares, delete.shares) = diff(&old.shares, &new.shares);
    (upsert.transfers, delete.transfers) = diff(&old.transfers, &new.transfers);
    (upsert.blacklist, delete.blacklist) = diff(&old.blacklist, &new.blacklist);
    Delta {
        schema_version: sync::SCHEMA_VERSION,
        kind: DeltaKind::Delta,
        base_version: base,
        version: base + 1,
        code_key_id: None,
        upsert,
        delete,
    }
}

// ------------------------------------------------------------------------------------------------
// Strategies
// ------------------------------------------------------------------------------------------------

fn cred_gen() -> impl Strategy<Value = CredGen> {
    prop_oneof![
        "[0-9]{4,12}".prop_map(CredGen::Code),
        // A few short codes so that values collide now and then.
        "[0-3]{4}".prop_map(CredGen::Code),
        "[A-C0-2]{1,3}".prop_map(|s| CredGen::Fob(format!("FOB-{s}"))),
        (proptest::option::of(0u32..3), 0u64..8).prop_map(|(fc, n)| CredGen::Card(fc, n)),
    ]
}

fn user_gen() -> impl Strategy<Value = UserGen> {
    (
        0..ROLES.len(),
        0..SCHEDULES.len(),
        proptest::collection::vec(0..ZONES.len(), 0..=2),
        // Some users expire before, between or after the instants decisions are asked at.
        proptest::option::weighted(0.3, -24i64..72),
    )
        .prop_map(|(role, schedule, zones, expires)| UserGen {
            role,
            schedule,
            zones,
            expires,
        })
}

fn status_gen() -> impl Strategy<Value = usize> {
    // Occupied half of the time, so that tenants and shared users get in often enough.
    prop_oneof![1 => Just(0usize), 1 => 0..STATUSES.len()]
}

fn unit_gen() -> impl Strategy<Value = UnitGen> {
    (
        status_gen(),
        proptest::option::of(0usize..8),
        proptest::option::weighted(0.3, 0usize..8),
        proptest::option::of(0..ZONES.len()),
    )
        .prop_map(|(status, tenant, winner, zone)| UnitGen {
            status,
            tenant,
            winner,
            zone,
        })
}

fn share_gen() -> impl Strategy<Value = ShareGen> {
    (
        0usize..8,
        0usize..8,
        proptest::option::of((-48i64..48, 1i64..96)),
    )
        .prop_map(|(unit, user, frame)| ShareGen { unit, user, frame })
}

fn transfer_gen() -> impl Strategy<Value = TransferGen> {
    (0usize..8, 0usize..8, 0usize..8, 0i64..40).prop_map(|(user, from, to, expires)| TransferGen {
        user,
        from,
        to,
        expires,
    })
}

fn blacklist_gen() -> impl Strategy<Value = BlacklistGen> {
    prop_oneof![
        3 => (0usize..16).prop_map(BlacklistGen::CredentialFob),
        1 => "[A-C0-2]{1,3}".prop_map(|s| BlacklistGen::FreshFob(format!("FOB-{s}"))),
        1 => (0usize..16).prop_map(BlacklistGen::CredentialCard),
        1 => (0u64..8).prop_map(BlacklistGen::CardAnyFacilityCode),
    ]
}

fn init_gen() -> impl Strategy<Value = Init> {
    (
        proptest::collection::vec(unit_gen(), 2..=6),
        proptest::collection::vec(user_gen(), 2..=6),
        "[0-9]{4,12}",
        proptest::collection::vec((0usize..8, cred_gen()), 0..10),
        proptest::collection::vec(share_gen(), 0..4),
        proptest::collection::vec(transfer_gen(), 0..2),
        proptest::collection::vec(blacklist_gen(), 0..3),
        any::<[bool; 4]>(),
    )
        .prop_map(
            |(units, users, first_code, credentials, shares, transfers, blacklist, flags)| Init {
                units,
                users,
                first_code,
                credentials,
                shares,
                transfers,
                blacklist,
                restrict: flags[0],
                use_blacklist: flags[1],
                fob_schedule: flags[2],
                temporary_code: flags[3],
            },
        )
}

fn op_gen() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..8, status_gen()).prop_map(|(unit, status)| Op::UnitStatus { unit, status }),
        2 => (0usize..8, proptest::option::of(0usize..8), proptest::option::weighted(0.3, 0usize..8))
            .prop_map(|(unit, tenant, winner)| Op::UnitHolders { unit, tenant, winner }),
        3 => (0usize..8, cred_gen()).prop_map(|(user, value)| Op::AddCredential { user, value }),
        2 => (0usize..16).prop_map(|n| Op::RemoveCredential { n }),
        1 => (0usize..16).prop_map(|n| Op::ReissueCredential { n }),
        1 => (0usize..16, 0usize..8).prop_map(|(n, user)| Op::MoveCredential { n, user }),
        2 => share_gen().prop_map(Op::AddShare),
        1 => (0usize..8).prop_map(|n| Op::RemoveShare { n }),
        1 => transfer_gen().prop_map(Op::AddTransfer),
        1 => (0usize..8).prop_map(|n| Op::RemoveTransfer { n }),
        2 => blacklist_gen().prop_map(Op::AddBlacklist),
        1 => (0usize..8).prop_map(|n| Op::RemoveBlacklist { n }),
        1 => user_gen().prop_map(Op::AddUser),
        1 => Just(Op::ToggleRestrictOverlockedEntry),
        1 => Just(Op::ToggleUseBlacklist),
        1 => Just(Op::ToggleFobSchedule),
        1 => Just(Op::ToggleTemporaryCode),
    ]
}

/// An initial model and the models after each of 1 to 8 modifications.
#[derive(Debug, Clone)]
struct History {
    models: Vec<Model>,
    /// Not read: shown when proptest reports a failing case.
    #[allow(dead_code)]
    ops: Vec<Op>,
}

fn history_gen() -> impl Strategy<Value = History> {
    (init_gen(), proptest::collection::vec(op_gen(), 1..=8)).prop_map(|(init, ops)| {
        let mut models = vec![Model::new(&init)];
        for op in &ops {
            let mut next = models.last().expect("initial model").clone();
            next.apply(op);
            models.push(next);
        }
        History { models, ops }
    })
}

impl History {
    fn last(&self) -> &Model {
        self.models.last().expect("initial model")
    }

    /// The version the site is at after the last delta (the first snapshot is version 1).
    fn last_version(&self) -> u64 {
        self.models.len() as u64
    }

    /// The snapshot of the first model, then one delta per modification.
    fn messages(&self) -> Vec<SyncMessage> {
        let mut msgs = vec![SyncMessage::Snapshot(Box::new(self.models[0].snapshot(1)))];
        for (i, pair) in self.models.windows(2).enumerate() {
            let base = i as u64 + 1;
            msgs.push(SyncMessage::Delta(Box::new(delta(
                &pair[0], &pair[1], base,
            ))));
        }
        msgs
    }
}

// ------------------------------------------------------------------------------------------------
// Stores and comparisons
// ------------------------------------------------------------------------------------------------

fn open(dir: &Path) -> Store {
    Store::open(dir, 1_000).expect("store opens")
}

/// Applies every message; `Err` names the one refused.
fn apply_all(store: &Store, msgs: &[SyncMessage]) -> Result<(), String> {
    for (i, m) in msgs.iter().enumerate() {
        store
            .apply(m)
            .map_err(|e| format!("message {i} (version {}) refused: {e}", m.version()))?;
    }
    Ok(())
}

/// The export of the small tables, without what depends on the store's code key.
fn small_tables(store: &Store) -> serde_json::Value {
    let mut s = store.export();
    s.credentials.clear();
    s.code_key_id = None;
    serde_json::to_value(&s).expect("snapshot serialises")
}

/// The exported credentials with every code hash replaced by a marker.
fn credentials_up_to_code_hashes(store: &Store) -> Vec<Credential> {
    let mut creds = store.export().credentials;
    for c in &mut creds {
        if c.code_hmac.is_some() {
            c.code_hmac = Some("<code hash>".into());
        }
    }
    creds
}

/// What a model's credentials look like once exported (codes hashed).
fn model_credentials_up_to_code_hashes(m: &Model) -> Vec<Credential> {
    m.credentials
        .values()
        .cloned()
        .map(|mut c| {
            if c.code.take().is_some() {
                c.code_hmac = Some("<code hash>".into());
            }
            c
        })
        .collect()
}

/// Everything presented to both stores.
#[derive(Debug, Clone)]
enum Probe {
    Code(String),
    Fob(String),
    Card(Card),
}

fn probes(m: &Model) -> Vec<Probe> {
    let mut p = Vec::new();
    for c in m.credentials.values() {
        if let Some(code) = &c.code {
            p.push(Probe::Code(code.clone()));
        }
        if let Some(fob) = &c.fob {
            p.push(Probe::Fob(fob.clone()));
        }
        if let Some(card) = c.card {
            p.push(Probe::Card(card));
            // A card without facility code matches any: present it with one too.
            if card.facility_code.is_none() {
                p.push(Probe::Card(Card {
                    facility_code: Some(77),
                    ..card
                }));
            }
        }
    }
    for b in m.blacklist.values() {
        if let Some(fob) = &b.fob {
            p.push(Probe::Fob(fob.clone()));
        }
        if let Some(card) = b.card {
            p.push(Probe::Card(Card {
                facility_code: Some(5),
                ..card
            }));
        }
    }
    // Unknown ones (no generated value has these shapes), and the temporary codes of the days.
    p.push(Probe::Code("123".into()));
    p.push(Probe::Code("9876543210987".into()));
    p.push(Probe::Fob("FOB-UNKNOWN".into()));
    p.push(Probe::Card(Card {
        facility_code: Some(999),
        number: 999_999,
    }));
    let secret = hex::decode(TEMP_SECRET_HEX).expect("hex");
    for at in INSTANTS {
        let code =
            gatehouse::policy::tempcode::code_at(&secret, chrono_tz::America::New_York, time(at));
        p.push(Probe::Code(code));
    }
    p
}

fn ask(
    store: &Store,
    probe: &Probe,
    target: Target,
    direction: Direction,
    at: DateTime<Utc>,
) -> Decision {
    let site = store.site();
    let ctx = Context {
        code_key: store.code_key(),
        digital_key_public: None,
    };
    let credential = match probe {
        Probe::Code(c) => Presented::Code(c),
        Probe::Fob(f) => Presented::Fob(f),
        Probe::Card(c) => Presented::Card(*c),
    };
    decide(
        &site,
        &ctx,
        &Request {
            credential,
            target,
            direction,
        },
        at,
    )
}

/// Asks both stores every probe at every target, direction and instant. `Err` lists the
/// requests (at most 10) on which they disagree.
fn same_decisions(a: &Store, b: &Store, m: &Model) -> Result<usize, String> {
    let mut targets: Vec<Target> = ENTRIES.iter().map(|e| Target::Entry(e)).collect();
    targets.push(Target::Entry("gate-9"));
    targets.extend(m.units.keys().map(|u| Target::Unit(u)));
    targets.push(Target::Unit("Z-999"));
    let mut asked = 0;
    let mut wrong = Vec::new();
    for probe in probes(m) {
        for &target in &targets {
            for direction in [Direction::In, Direction::Out] {
                for at in INSTANTS {
                    let (da, db) = (
                        ask(a, &probe, target, direction, time(at)),
                        ask(b, &probe, target, direction, time(at)),
                    );
                    asked += 1;
                    if da != db && wrong.len() < 10 {
                        wrong.push(format!(
                            "{probe:?} at {target:?} {direction:?} {at}:\n      {da:?}\n   vs {db:?}"
                        ));
                    }
                }
            }
        }
    }
    if wrong.is_empty() {
        Ok(asked)
    } else {
        Err(format!("decisions differ:\n  {}", wrong.join("\n  ")))
    }
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// "code key" in the words of the message (`code_key` or `code key`).
fn mentions_code_key(msg: &str) -> bool {
    msg.replace('_', " ").to_lowercase().contains("code key")
}

proptest! {
    #![proptest_config(config(48))]

    /// Applying deltas one by one equals applying the final snapshot.
    #[test]
    fn deltas_one_by_one_equal_the_final_snapshot(h in history_gen()) {
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (open(dir_a.path()), open(dir_b.path()));
        let version = h.last_version();
        if let Err(e) = apply_all(&a, &h.messages()) {
            return Err(TestCaseError::fail(format!("store A: {e}")));
        }
        let last = SyncMessage::Snapshot(Box::new(h.last().snapshot(version)));
        if let Err(e) = apply_all(&b, &[last]) {
            return Err(TestCaseError::fail(format!("store B: {e}")));
        }
        let (sa, sb) = (a.stats(), b.stats());
        prop_assert_eq!(sa.version, version);
        prop_assert_eq!(sb.version, version);
        prop_assert_eq!(&sa.counts, &sb.counts);
        prop_assert_eq!(sa.counts.credentials, h.last().credentials.len());
        prop_assert_eq!(small_tables(&a), small_tables(&b));
        // Both hold the model itself, not merely the same thing.
        let expected = {
            let mut s = h.last().snapshot(version);
            s.credentials.clear();
            serde_json::to_value(&s).expect("snapshot serialises")
        };
        prop_assert_eq!(small_tables(&a), expected);
        prop_assert_eq!(credentials_up_to_code_hashes(&a), credentials_up_to_code_hashes(&b));
        prop_assert_eq!(credentials_up_to_code_hashes(&a), model_credentials_up_to_code_hashes(h.last()));
        if let Err(e) = same_decisions(&a, &b, h.last()) {
            return Err(TestCaseError::fail(e));
        }
        // Reopened, A replays its stored deltas and B reads its generation back: still equal.
        let before = serde_json::to_value(a.export()).unwrap();
        drop((a, b));
        let (a, b) = (open(dir_a.path()), open(dir_b.path()));
        prop_assert_eq!(a.stats().version, version);
        prop_assert_eq!(serde_json::to_value(a.export()).unwrap(), before);
        prop_assert_eq!(&b.stats().counts, &sb.counts);
        if let Err(e) = same_decisions(&a, &b, h.last()) {
            return Err(TestCaseError::fail(format!("after reopening: {e}")));
        }
    }
}

proptest! {
    #![proptest_config(config(32))]

    /// Decisions are identical after export → import on the same gateway (same code key); a
    /// gateway with another code key refuses the export and changes nothing.
    #[test]
    fn export_then_import_keeps_decisions(h in history_gen()) {
        let dir_a = tempfile::tempdir().unwrap();
        let a = open(dir_a.path());
        if let Err(e) = apply_all(&a, &h.messages()) {
            return Err(TestCaseError::fail(format!("store A: {e}")));
        }
        let export = a.export();
        let file = dir_a.path().join("export.json");
        std::fs::write(&file, serde_json::to_vec_pretty(&export).unwrap()).unwrap();
        let bytes = std::fs::read(&file).unwrap();
        let parsed = match sync::parse(&bytes) {
            Ok(m) => m,
            Err(e) => return Err(TestCaseError::fail(format!("the export does not parse: {e}"))),
        };

        // A backup restored on the same gateway: copy A's code key first.
        let dir_c = tempfile::tempdir().unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let key = dir_c.path().join("code.key");
            std::fs::copy(dir_a.path().join("code.key"), &key).unwrap();
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let c = open(dir_c.path());
        prop_assert_eq!(c.code_key().id(), a.code_key().id());
        if let Err(e) = c.apply(&parsed) {
            return Err(TestCaseError::fail(format!("store C refused the export: {e}")));
        }
        let (sa, sc) = (a.stats(), c.stats());
        prop_assert_eq!(sc.version, h.last_version());
        prop_assert_eq!(sa.version, sc.version);
        prop_assert_eq!(&sa.counts, &sc.counts);
        prop_assert_eq!(
            serde_json::to_value(c.export()).unwrap(),
            serde_json::to_value(&export).unwrap()
        );
        if let Err(e) = same_decisions(&a, &c, h.last()) {
            return Err(TestCaseError::fail(e));
        }
        // And C reads the imported site back from disk.
        drop(c);
        let c = open(dir_c.path());
        prop_assert_eq!(
            serde_json::to_value(c.export()).unwrap(),
            serde_json::to_value(&export).unwrap()
        );
        if let Err(e) = same_decisions(&a, &c, h.last()) {
            return Err(TestCaseError::fail(format!("after reopening C: {e}")));
        }

        // Another gateway (its own, new code key) refuses the same export as a whole.
        let has_code_hashes = export.credentials.iter().any(|c| c.code_hmac.is_some());
        let dir_d = tempfile::tempdir().unwrap();
        let d = open(dir_d.path());
        prop_assert_ne!(d.code_key().id(), a.code_key().id());
        let before = serde_json::to_value(d.export()).unwrap();
        match d.apply(&parsed) {
            Ok(applied) => {
                prop_assert!(
                    !has_code_hashes,
                    "a store with another code key accepted an export holding code hashes: {:?}",
                    applied
                );
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(mentions_code_key(&msg), "refusal does not mention the code key: {}", msg);
                prop_assert_eq!(d.stats().version, 0);
                prop_assert!(!d.stats().has_snapshot);
                prop_assert_eq!(d.stats().counts.credentials, 0);
                prop_assert_eq!(serde_json::to_value(d.export()).unwrap(), before);
            }
        }
        prop_assert!(
            !has_code_hashes || d.stats().version == 0,
            "a store with another code key imported code hashes"
        );
    }
}
