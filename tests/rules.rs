//! One table-driven test family per access rule (shared/DOMAIN.md "Access rules"), each named
//! after the rule and each going through the one [`check`] helper.
//!
//! Every family starts from [`fixture`] (a small facility in America/New_York), may tweak it with
//! a closure ([`fixture_with`]), and runs a table of [`Case`]s. A table runs all its cases and
//! then fails once, naming every case that went wrong, so that one wrong row does not hide the
//! others.
//!
//! Times are written as facility-local RFC 3339 strings with an explicit offset (`-05:00` is EST,
//! `-04:00` is EDT) so that the reader sees the wall clock the rule is about.

use std::sync::Arc;

use chrono::NaiveDate;
use ed25519_dalek::{SigningKey, VerifyingKey};
use gatehouse::access::{AccessEngine, Attempt};
use gatehouse::policy::digital_key::{self, KeyPayload};

/// The site id the gateway of these cases serves (keys must name it).
const KEY_SITE: &str = "site-rules";
use gatehouse::policy::tempcode::code_for_date;
use gatehouse::policy::{Context, Direction, Presented, Reason, Request, Target, decide};
use gatehouse::site::{CodeKey, Site, parse_time};
use gatehouse::store::Store;
use gatehouse::sync::{Card, Snapshot, SyncMessage};
use serde_json::json;

use Reason::*;

// ------------------------------------------------------------------------------------------------
// Fixture
// ------------------------------------------------------------------------------------------------

const CODE_KEY: [u8; 32] = [1; 32];
/// Hex of "demo-temporary-code-secret".
const TEMP_SECRET_HEX: &str = "64656d6f2d74656d706f726172792d636f64652d736563726574";

/// A Monday in November (EST, UTC-5): inside gate hours, inside Carol's share, during Tom's
/// transfer.
const MON_10: &str = "2026-11-23T10:00:00-05:00";

/// The facility every family starts from.
///
/// Schedules: `gate-hours` 06:00–22:00 every day (the default), `fob-hours` 07:00–21:00 every day
/// (the fob schedule, off by default), `always` (24/7), `office` Mon–Fri 09:00–17:00.
///
/// | unit  | status          | tenant | other                         | zone   |
/// |-------|-----------------|--------|-------------------------------|--------|
/// | A-101 | occupied        | alice  | shared with carol (time frame) | zone-a |
/// | A-102 | overlock        | bob    |                               | zone-a |
/// | A-103 | occupied        | bob    |                               | zone-a |
/// | A-104 | pre_let         | paula  |                               | zone-a |
/// | A-105 | overlock        | olga   | (olga's only unit)            | zone-a |
/// | A-106 | occupied        | tom    | transfer from; shared sam, mia | zone-a |
/// | A-107 | occupied        | nina   | (nina has schedule `office`)  | zone-a |
/// | B-201 | available       | -      |                               | zone-b |
/// | B-202 | pending_auction | dave   | auction winner wendy          | zone-b |
/// | B-203 | gatelocked      | greg   |                               | zone-b |
/// | B-204 | occupied        | greg   | (greg's other unit)           | zone-b |
/// | B-205 | occupied        | hana   | shared with ian (indefinite)  | zone-b |
/// | B-206 | occupied        | tom    | transfer to                   | zone-b |
///
/// Entries: `gate-1` (gate, no zone), `exit-1` (exit, no zone), `door-a` (door, zone-a),
/// `elevator-b` (elevator, zone-b).
fn fixture() -> Snapshot {
    let v = json!({
        "schema_version": 1,
        "kind": "snapshot",
        "version": 1,
        "facility": {
            "name": "Rules Test Storage",
            "time_zone": "America/New_York",
            "default_schedule": "gate-hours",
            "grace_period_minutes": 30,
            "restrict_overlocked_entry": false,
            "use_blacklist": true,
            "fob_schedule_enabled": false,
            "fob_schedule": "fob-hours",
            "offline_key_expiration_minutes": 1440,
            "keypad_lockout": { "max_failures": 5, "window_minutes": 15, "cooldown_minutes": 5 },
            "temporary_code_enabled": true,
            "temporary_code_secret": TEMP_SECRET_HEX
        },
        "zones": [ { "id": "zone-a" }, { "id": "zone-b" } ],
        "schedules": [
            { "id": "gate-hours", "windows": [
                { "days": ["mon","tue","wed","thu","fri","sat","sun"], "start": "06:00", "end": "22:00" } ] },
            { "id": "fob-hours", "windows": [
                { "days": ["mon","tue","wed","thu","fri","sat","sun"], "start": "07:00", "end": "21:00" } ] },
            { "id": "always", "always_open": true },
            { "id": "office", "windows": [
                { "days": ["mon","tue","wed","thu","fri"], "start": "09:00", "end": "17:00" } ] }
        ],
        "entries": [
            { "id": "gate-1", "kind": "gate" },
            { "id": "exit-1", "kind": "exit" },
            { "id": "door-a", "kind": "door", "zone": "zone-a" },
            { "id": "elevator-b", "kind": "elevator", "zone": "zone-b" }
        ],
        "units": [
            { "id": "A-101", "status": "occupied", "tenant": "alice", "zone": "zone-a" },
            { "id": "A-102", "status": "overlock", "tenant": "bob", "zone": "zone-a" },
            { "id": "A-103", "status": "occupied", "tenant": "bob", "zone": "zone-a" },
            { "id": "A-104", "status": "pre_let", "tenant": "paula", "zone": "zone-a" },
            { "id": "A-105", "status": "overlock", "tenant": "olga", "zone": "zone-a" },
            { "id": "A-106", "status": "occupied", "tenant": "tom", "zone": "zone-a" },
            { "id": "A-107", "status": "occupied", "tenant": "nina", "zone": "zone-a" },
            { "id": "B-201", "status": "available", "zone": "zone-b" },
            { "id": "B-202", "status": "pending_auction", "tenant": "dave", "auction_winner": "wendy", "zone": "zone-b" },
            { "id": "B-203", "status": "gatelocked", "tenant": "greg", "zone": "zone-b" },
            { "id": "B-204", "status": "occupied", "tenant": "greg", "zone": "zone-b" },
            { "id": "B-205", "status": "occupied", "tenant": "hana", "zone": "zone-b" },
            { "id": "B-206", "status": "occupied", "tenant": "tom", "zone": "zone-b" }
        ],
        "users": [
            { "id": "alice", "role": "tenant" },
            { "id": "bob", "role": "tenant" },
            { "id": "olga", "role": "tenant" },
            { "id": "paula", "role": "tenant" },
            { "id": "dave", "role": "tenant" },
            { "id": "greg", "role": "tenant" },
            { "id": "tom", "role": "tenant" },
            { "id": "hana", "role": "tenant" },
            { "id": "nina", "role": "tenant", "schedule": "office" },
            { "id": "wendy", "role": "auction_winner" },
            { "id": "carol", "role": "shared_user" },
            { "id": "sam", "role": "shared_user" },
            { "id": "ian", "role": "shared_user" },
            { "id": "mia", "role": "manager" },
            { "id": "eve", "role": "employee", "schedule": "always" },
            { "id": "emma", "role": "employee" },
            { "id": "victor", "role": "vendor", "zones": ["zone-b"], "expires_at": "2027-06-30T23:59:00-04:00" }
        ],
        "credentials": [
            { "id": "c-alice-code", "user": "alice", "code": "123456" },
            { "id": "c-alice-fob", "user": "alice", "fob": "FOB-ALICE" },
            { "id": "c-alice-card", "user": "alice", "card": { "facility_code": 12, "number": 34567 } },
            { "id": "c-alice-key", "user": "alice", "key_id": "dk-alice-1" },
            { "id": "c-bob-code", "user": "bob", "code": "234567" },
            { "id": "c-bob-fob", "user": "bob", "fob": "FOB-BOB" },
            { "id": "c-bob-card", "user": "bob", "card": { "facility_code": 12, "number": 99999 } },
            { "id": "c-olga-code", "user": "olga", "code": "240001" },
            { "id": "c-paula-code", "user": "paula", "code": "222333" },
            { "id": "c-dave-code", "user": "dave", "code": "240002" },
            { "id": "c-greg-code", "user": "greg", "code": "111222" },
            { "id": "c-tom-code", "user": "tom", "code": "240003" },
            { "id": "c-hana-code", "user": "hana", "code": "240004" },
            { "id": "c-hana-card", "user": "hana", "card": { "number": 55555 } },
            { "id": "c-nina-code", "user": "nina", "code": "240009" },
            { "id": "c-wendy-code", "user": "wendy", "code": "777888" },
            { "id": "c-carol-code", "user": "carol", "code": "345678" },
            { "id": "c-sam-code", "user": "sam", "code": "240005" },
            { "id": "c-ian-code", "user": "ian", "code": "240006" },
            { "id": "c-ian-card", "user": "ian", "card": { "facility_code": 7, "number": 88888 } },
            { "id": "c-mia-code", "user": "mia", "code": "240007" },
            { "id": "c-eve-code", "user": "eve", "code": "999000" },
            { "id": "c-eve-fob", "user": "eve", "fob": "FOB-EVE" },
            { "id": "c-emma-code", "user": "emma", "code": "240008" },
            { "id": "c-victor-code", "user": "victor", "code": "555111" }
        ],
        "shares": [
            { "id": "s-carol-a101", "unit": "A-101", "user": "carol",
              "starts_at": "2026-06-01T00:00:00-04:00", "ends_at": "2027-01-01T00:00:00-05:00" },
            { "id": "s-sam-a106", "unit": "A-106", "user": "sam" },
            { "id": "s-mia-a106", "unit": "A-106", "user": "mia" },
            { "id": "s-ian-b205", "unit": "B-205", "user": "ian" }
        ],
        "transfers": [
            { "id": "t-tom", "user": "tom", "from_unit": "A-106", "to_unit": "B-206",
              "expires_at": "2026-11-25T10:00:00-05:00" }
        ],
        "blacklist": [
            { "id": "bl-bob-fob", "fob": "FOB-BOB", "reason": "delinquent" },
            { "id": "bl-dead-fob", "fob": "FOB-DEAD01", "reason": "moved out" },
            { "id": "bl-bob-card", "card": { "facility_code": 12, "number": 99999 } },
            { "id": "bl-any-fc-card", "card": { "number": 88888 } },
            { "id": "bl-key", "key_id": "dk-revoked" }
        ]
    });
    serde_json::from_value(v).expect("the fixture is a valid snapshot")
}

/// The fixture with changes.
fn fixture_with(tweak: impl FnOnce(&mut Snapshot)) -> Snapshot {
    let mut s = fixture();
    tweak(&mut s);
    s
}

fn user_mut<'a>(s: &'a mut Snapshot, id: &str) -> &'a mut gatehouse::sync::User {
    s.users
        .iter_mut()
        .find(|u| u.id == id)
        .expect("user in fixture")
}

fn unit_mut<'a>(s: &'a mut Snapshot, id: &str) -> &'a mut gatehouse::sync::Unit {
    s.units
        .iter_mut()
        .find(|u| u.id == id)
        .expect("unit in fixture")
}

fn schedule(v: serde_json::Value) -> gatehouse::sync::Schedule {
    serde_json::from_value(v).expect("valid schedule")
}

fn time(s: &str) -> chrono::DateTime<chrono::Utc> {
    parse_time(s).unwrap_or_else(|| panic!("`{s}` is not RFC 3339"))
}

// ------------------------------------------------------------------------------------------------
// The table and the one check helper
// ------------------------------------------------------------------------------------------------

/// What is presented (owned, so that computed codes and signed keys fit in a table).
#[derive(Clone)]
enum Cred {
    Code(String),
    Fob(String),
    Card(Card),
    Key(Vec<u8>),
}

impl std::fmt::Debug for Cred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cred::Code(c) => write!(f, "code {c}"),
            Cred::Fob(x) => write!(f, "fob {x}"),
            Cred::Card(c) => write!(f, "card {:?}/{}", c.facility_code, c.number),
            Cred::Key(b) => write!(f, "digital key ({} bytes)", b.len()),
        }
    }
}

fn code(c: &str) -> Cred {
    Cred::Code(c.to_string())
}
fn fob(f: &str) -> Cred {
    Cred::Fob(f.to_string())
}
fn card(facility_code: Option<u32>, number: u64) -> Cred {
    Cred::Card(Card {
        facility_code,
        number,
    })
}
fn key(bytes: &[u8]) -> Cred {
    Cred::Key(bytes.to_vec())
}

#[derive(Debug, Clone, Copy)]
enum Tgt {
    Entry(&'static str),
    Unit(&'static str),
}
use Tgt::{Entry, Unit};

/// One row: who presents what, where, when, and the expected reason (granted follows from it).
#[derive(Debug, Clone)]
struct Case {
    name: String,
    cred: Cred,
    target: Tgt,
    /// Direction::Out at the request (an `exit` entry forces it anyway).
    exit: bool,
    /// Facility-local RFC 3339 with offset.
    at: &'static str,
    expect: Reason,
    /// When given, the decision's units must be exactly these (any order).
    units: Option<Vec<&'static str>>,
}

fn case(
    name: impl Into<String>,
    cred: Cred,
    target: Tgt,
    at: &'static str,
    expect: Reason,
) -> Case {
    Case {
        name: name.into(),
        cred,
        target,
        exit: false,
        at,
        expect,
        units: None,
    }
}

impl Case {
    /// Asks with Direction::Out.
    fn out(mut self) -> Self {
        self.exit = true;
        self
    }
    fn units(mut self, units: &[&'static str]) -> Self {
        self.units = Some(units.to_vec());
        self
    }
}

/// Runs one case through `gatehouse::policy::decide` and compares. `Err` names the case.
fn check(site: &Site, public: Option<&VerifyingKey>, c: &Case) -> Result<(), String> {
    let at = parse_time(c.at).ok_or_else(|| format!("[{}] `{}` is not RFC 3339", c.name, c.at))?;
    let code_key = CodeKey::from_bytes(CODE_KEY);
    let keys = public.map(|k| digital_key::KeyVerifier::new(*k, KEY_SITE));
    let ctx = Context {
        code_key: &code_key,
        digital_key_public: keys.as_ref(),
    };
    let credential = match &c.cred {
        Cred::Code(s) => Presented::Code(s),
        Cred::Fob(s) => Presented::Fob(s),
        Cred::Card(card) => Presented::Card(*card),
        Cred::Key(b) => Presented::DigitalKey(b),
    };
    let target = match c.target {
        Entry(e) => Target::Entry(e),
        Unit(u) => Target::Unit(u),
    };
    let req = Request {
        credential,
        target,
        direction: if c.exit {
            Direction::Out
        } else {
            Direction::In
        },
    };
    let d = decide(site, &ctx, &req, at);
    let mut wrong = Vec::new();
    if d.reason != c.expect {
        wrong.push(format!("reason `{}`, expected `{}`", d.reason, c.expect));
    }
    if d.granted != c.expect.is_grant() {
        wrong.push(format!(
            "granted {}, expected {}",
            d.granted,
            c.expect.is_grant()
        ));
    }
    if d.granted != d.reason.is_grant() {
        wrong.push(format!(
            "inconsistent decision: granted {} with reason `{}`",
            d.granted, d.reason
        ));
    }
    if let Some(expected) = &c.units {
        let mut got: Vec<&str> = d.units.iter().map(String::as_str).collect();
        let mut want = expected.clone();
        got.sort();
        want.sort();
        if got != want {
            wrong.push(format!("units {got:?}, expected {want:?}"));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "[{}] {:?} at {:?} {}{}: {}",
            c.name,
            c.cred,
            c.target,
            c.at,
            if c.exit { " (out)" } else { "" },
            wrong.join("; ")
        ))
    }
}

/// A rule's family: several tables, one verdict naming every failing case.
struct Family {
    rule: &'static str,
    failures: Vec<String>,
    cases: usize,
}

impl Family {
    fn new(rule: &'static str) -> Self {
        Family {
            rule,
            failures: Vec::new(),
            cases: 0,
        }
    }

    /// Builds the Site from `snap` and checks every case against it.
    fn table(
        &mut self,
        label: &str,
        snap: &Snapshot,
        public: Option<&VerifyingKey>,
        cases: &[Case],
    ) {
        let site = Site::from_snapshot(snap, &CodeKey::from_bytes(CODE_KEY))
            .unwrap_or_else(|e| panic!("{} / {label}: fixture refused: {e}", self.rule));
        for c in cases {
            self.cases += 1;
            if let Err(e) = check(&site, public, c) {
                self.failures.push(format!("{label}: {e}"));
            }
        }
    }

    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "rule `{}`: {} of {} cases failed:\n  {}",
            self.rule,
            self.failures.len(),
            self.cases,
            self.failures.join("\n  ")
        );
    }
}

// ------------------------------------------------------------------------------------------------
// unit_status
// ------------------------------------------------------------------------------------------------

#[test]
#[rustfmt::skip] // one table row per line
fn unit_status() {
    let (alice, bob, olga, paula, dave, greg, wendy) = (
        code("123456"),
        code("234567"),
        code("240001"),
        code("222333"),
        code("240002"),
        code("111222"),
        code("777888"),
    );
    let (carol, ian, mia, eve, emma, victor, hana) = (
        code("345678"),
        code("240006"),
        code("240007"),
        code("999000"),
        code("240008"),
        code("555111"),
        code("240004"),
    );
    let gate = Entry("gate-1");
    let mut f = Family::new("unit_status");
    f.table(
        "default fixture",
        &fixture(),
        None,
        &[
            // Occupied: tenant and their shared users; nobody else (staff need a manager share).
            case("occupied: tenant at unit", alice.clone(), Unit("A-101"), MON_10, Tenant).units(&["A-101"]),
            case("occupied: tenant at gate", alice.clone(), gate, MON_10, Tenant).units(&["A-101"]),
            case("occupied: shared user", carol.clone(), Unit("A-101"), MON_10, SharedUser),
            case("occupied: shared user (indefinite)", ian.clone(), Unit("B-205"), MON_10, SharedUser),
            case("occupied: manager share", mia.clone(), Unit("A-106"), MON_10, SharedUser),
            case("occupied: employee without share", emma.clone(), Unit("A-101"), MON_10, NoAccess),
            case("occupied: 24/7 employee without share", eve.clone(), Unit("B-205"), MON_10, NoAccess),
            case("occupied: manager without share on that unit", mia.clone(), Unit("A-101"), MON_10, NoAccess),
            case("occupied: vendor in zone", victor.clone(), Unit("B-205"), MON_10, NoAccess),
            case("occupied: another tenant", alice.clone(), Unit("A-103"), MON_10, NoAccess),
            case("occupied: auction winner", wendy.clone(), Unit("B-205"), MON_10, NoAccess),
            // Available: employees only.
            case("available: employee", emma.clone(), Unit("B-201"), MON_10, Employee),
            case("available: 24/7 employee", eve.clone(), Unit("B-201"), MON_10, Employee),
            case("available: manager", mia.clone(), Unit("B-201"), MON_10, Employee),
            case("available: tenant", alice.clone(), Unit("B-201"), MON_10, NoAccess),
            case("available: shared user", ian.clone(), Unit("B-201"), MON_10, NoAccess),
            case("available: auction winner", wendy.clone(), Unit("B-201"), MON_10, NoAccess),
            // DOMAIN.md "Available: employees only": vendors are not employees.
            case("available: vendor in zone", victor.clone(), Unit("B-201"), MON_10, NoAccess),
            // Overlock: nobody, employees included.
            case("overlock: tenant at unit", bob.clone(), Unit("A-102"), MON_10, UnitOverlocked),
            case("overlock: only-unit tenant at unit", olga.clone(), Unit("A-105"), MON_10, UnitOverlocked),
            case("overlock: only-unit tenant at gate", olga.clone(), gate, MON_10, Overlocked).units(&["A-105"]),
            case("overlock: employee", emma.clone(), Unit("A-102"), MON_10, UnitOverlocked),
            case("overlock: 24/7 employee", eve.clone(), Unit("A-105"), MON_10, UnitOverlocked),
            case("overlock: manager", mia.clone(), Unit("A-102"), MON_10, UnitOverlocked),
            case("overlock: vendor", victor.clone(), Unit("A-102"), MON_10, UnitOverlocked),
            case("overlock: stranger tenant", alice.clone(), Unit("A-105"), MON_10, UnitOverlocked),
            // Pending auction: employees or the auction winner.
            case("pending auction: winner at unit", wendy.clone(), Unit("B-202"), MON_10, AuctionWinner),
            case("pending auction: winner at gate", wendy.clone(), gate, MON_10, AuctionWinner).units(&["B-202"]),
            case("pending auction: winner at zoned elevator", wendy.clone(), Entry("elevator-b"), MON_10, AuctionWinner),
            case("pending auction: winner at other zone's door", wendy.clone(), Entry("door-a"), MON_10, ZoneNotAllowed),
            case("pending auction: employee", emma.clone(), Unit("B-202"), MON_10, Employee),
            case("pending auction: manager", mia.clone(), Unit("B-202"), MON_10, Employee),
            case("pending auction: former tenant at unit", dave.clone(), Unit("B-202"), MON_10, NoAccess),
            case("pending auction: former tenant at gate", dave.clone(), gate, MON_10, NoAccess),
            case("pending auction: another tenant", alice.clone(), Unit("B-202"), MON_10, NoAccess),
            // DOMAIN.md "Pending Auction: employees or the auction winner": not vendors.
            case("pending auction: vendor in zone", victor.clone(), Unit("B-202"), MON_10, NoAccess),
            // Gatelocked: the tenant is locked out of the whole facility.
            case("gatelocked: tenant at gate", greg.clone(), gate, MON_10, Gatelocked).units(&["B-203"]),
            case("gatelocked: tenant at zoned elevator", greg.clone(), Entry("elevator-b"), MON_10, Gatelocked),
            case("gatelocked: tenant at the gatelocked unit", greg.clone(), Unit("B-203"), MON_10, Gatelocked),
            // DOMAIN.md "Gatelocked: tenant is locked out of the whole facility": his other,
            // occupied unit too.
            case("gatelocked: tenant at his other occupied unit", greg.clone(), Unit("B-204"), MON_10, Gatelocked),
            case("gatelocked: stranger tenant", hana.clone(), Unit("B-203"), MON_10, NoAccess),
            // Pre-let: no tenant access yet.
            case("pre-let: future tenant at unit", paula.clone(), Unit("A-104"), MON_10, PreLet),
            case("pre-let: future tenant at gate", paula.clone(), gate, MON_10, PreLet),
            case("pre-let: employee", emma.clone(), Unit("A-104"), MON_10, Employee),
            case("pre-let: another tenant", alice.clone(), Unit("A-104"), MON_10, NoAccess),
            // Staff at entries do not depend on units.
            case("employee at gate", emma.clone(), gate, MON_10, Employee),
            case("manager at gate", mia.clone(), gate, MON_10, Employee),
            case("vendor at gate", victor.clone(), gate, MON_10, Vendor),
        ],
    );
    f.finish();
}

// ------------------------------------------------------------------------------------------------
// restrict_overlocked_entry
// ------------------------------------------------------------------------------------------------

#[test]
#[rustfmt::skip] // one table row per line
fn restrict_overlocked_entry() {
    // bob: A-102 overlocked + A-103 occupied (both zone-a). olga: only A-105, overlocked.
    let (bob, olga, alice) = (code("234567"), code("240001"), code("123456"));
    let mut f = Family::new("restrict_overlocked_entry");
    f.table(
        "OFF: a unit in good standing lets the tenant in, to Occupied units only",
        &fixture_with(|s| s.facility.restrict_overlocked_entry = false),
        None,
        &[
            case("bob at gate", bob.clone(), Entry("gate-1"), MON_10, Tenant).units(&["A-103"]),
            case("bob at exit", bob.clone(), Entry("exit-1"), MON_10, Tenant),
            case("bob at zone-a door", bob.clone(), Entry("door-a"), MON_10, Tenant).units(&["A-103"]),
            case("bob at zone-b elevator", bob.clone(), Entry("elevator-b"), MON_10, ZoneNotAllowed),
            case("bob at occupied A-103", bob.clone(), Unit("A-103"), MON_10, Tenant),
            case("bob at overlocked A-102", bob.clone(), Unit("A-102"), MON_10, UnitOverlocked),
            case("olga (only overlocked) at gate", olga.clone(), Entry("gate-1"), MON_10, Overlocked).units(&["A-105"]),
            case("olga at A-105", olga.clone(), Unit("A-105"), MON_10, UnitOverlocked),
            case("alice unaffected", alice.clone(), Entry("gate-1"), MON_10, Tenant),
        ],
    );
    f.table(
        "ON: one overlocked unit keeps the tenant out (blacklist off, to try bob's fob too)",
        &fixture_with(|s| {
            s.facility.restrict_overlocked_entry = true;
            s.facility.use_blacklist = false;
        }),
        None,
        &[
            case("bob at gate", bob.clone(), Entry("gate-1"), MON_10, OverlockedRestricted).units(&["A-102"]),
            case("bob at zone-a door", bob.clone(), Entry("door-a"), MON_10, OverlockedRestricted),
            case("bob at zone-b elevator", bob.clone(), Entry("elevator-b"), MON_10, OverlockedRestricted),
            case("bob at occupied A-103", bob.clone(), Unit("A-103"), MON_10, OverlockedRestricted),
            case("bob at overlocked A-102", bob.clone(), Unit("A-102"), MON_10, UnitOverlocked),
            case("bob's fob at gate, blacklist off", fob("FOB-BOB"), Entry("gate-1"), MON_10, OverlockedRestricted),
            case("olga at gate", olga.clone(), Entry("gate-1"), MON_10, OverlockedRestricted),
            case("alice unaffected", alice.clone(), Entry("gate-1"), MON_10, Tenant),
            case("alice at her unit", alice.clone(), Unit("A-101"), MON_10, Tenant),
        ],
    );
    f.finish();
}

// ------------------------------------------------------------------------------------------------
// schedules
// ------------------------------------------------------------------------------------------------

#[test]
#[rustfmt::skip] // one table row per line
fn schedules() {
    let (alice, nina, eve, emma) = (code("123456"), code("240009"), code("999000"), code("240008"));
    let gate = Entry("gate-1");
    let mut f = Family::new("schedules");
    f.table(
        "America/New_York, gate hours 06:00-22:00",
        &fixture(),
        None,
        &[
            case("inside", alice.clone(), gate, MON_10, Tenant),
            case("before opening", alice.clone(), gate, "2026-11-23T05:59:00-05:00", OutsideSchedule),
            case("at opening (inclusive)", alice.clone(), gate, "2026-11-23T06:00:00-05:00", Tenant),
            case("last minute", alice.clone(), gate, "2026-11-23T21:59:59-05:00", Tenant),
            case("at closing (exclusive)", alice.clone(), gate, "2026-11-23T22:00:00-05:00", OutsideSchedule),
            case("night", alice.clone(), gate, "2026-11-24T03:00:00-05:00", OutsideSchedule),
            case("units follow the schedule too", alice.clone(), Unit("A-101"), "2026-11-23T23:00:00-05:00", OutsideSchedule),
            case("summer (EDT) inside", alice.clone(), gate, "2026-07-15T21:30:00-04:00", Tenant),
            case("summer (EDT) outside", alice.clone(), gate, "2026-07-15T05:30:00-04:00", OutsideSchedule),
            // 24/7 user vs default-schedule user.
            case("24/7 employee at night", eve.clone(), gate, "2026-11-24T03:00:00-05:00", Employee),
            case("24/7 employee at a unit at night", eve.clone(), Unit("B-201"), "2026-11-24T03:00:00-05:00", Employee),
            case("default-schedule employee at night", emma.clone(), gate, "2026-11-24T03:00:00-05:00", OutsideSchedule),
            // Per-user schedule (office: Mon-Fri 09:00-17:00) replaces the default.
            case("per-user: inside", nina.clone(), gate, MON_10, Tenant),
            case("per-user: gate hours but before office", nina.clone(), gate, "2026-11-23T08:00:00-05:00", OutsideSchedule),
            case("per-user: gate hours but after office", nina.clone(), gate, "2026-11-23T18:00:00-05:00", OutsideSchedule),
            case("per-user: Saturday", nina.clone(), gate, "2026-11-21T10:00:00-05:00", OutsideSchedule),
            case("per-user: at her unit after office", nina.clone(), Unit("A-107"), "2026-11-23T17:00:00-05:00", OutsideSchedule),
            // The facility's time zone: 21:30 in New York is 02:30 UTC (closed if read as UTC);
            // 05:30 in New York is 10:30 UTC (open if read as UTC).
            case("tz: 21:30 New York = 02:30Z", alice.clone(), gate, "2026-11-23T21:30:00-05:00", Tenant),
            case("tz: 05:30 New York = 10:30Z", alice.clone(), gate, "2026-11-23T05:30:00-05:00", OutsideSchedule),
        ],
    );
    f.table(
        "the same instants at a facility in UTC (contrast)",
        &fixture_with(|s| s.facility.time_zone = "UTC".into()),
        None,
        &[
            case("tz UTC: 02:30Z is closed", alice.clone(), gate, "2026-11-23T21:30:00-05:00", OutsideSchedule),
            case("tz UTC: 10:30Z is open", alice.clone(), gate, "2026-11-23T05:30:00-05:00", Tenant),
        ],
    );
    f.table(
        "no default schedule: open 24/7",
        &fixture_with(|s| s.facility.default_schedule = None),
        None,
        &[
            case("night, no default schedule", alice.clone(), gate, "2026-11-24T03:00:00-05:00", Tenant),
            case("per-user schedule still applies", nina.clone(), gate, "2026-11-24T03:00:00-05:00", OutsideSchedule),
        ],
    );
    f.finish();
}

// ------------------------------------------------------------------------------------------------
// schedules_on_dst_days
// ------------------------------------------------------------------------------------------------

/// Wall-clock semantics (src/policy/schedule.rs): a window is local clock time; on the day clocks
/// go forward a window starting in the gap opens when the clock reaches the window; on the day
/// they go back a window covering 01:00-01:30 is open during both 01:00-01:30 hours. For the
/// grace period, a window end that falls in a gap ends at the first instant after it, and one in
/// a fold ends twice (at 01:30 EDT and again at 01:30 EST), each closing followed by a grace
/// period.
#[test]
#[rustfmt::skip] // one table row per line
fn schedules_on_dst_days() {
    // alice follows schedule `dst-1`, hana follows `dst-2`. Grace period 30 minutes.
    let (alice, hana) = (code("123456"), code("240004"));
    let (gate, exit) = (Entry("gate-1"), Entry("exit-1"));
    let mut f = Family::new("schedules_on_dst_days");

    // 2026-03-08 (Sunday): 02:00 EST becomes 03:00 EDT.
    let spring = fixture_with(|s| {
        s.schedules.push(schedule(json!({ "id": "dst-1", "windows": [
            { "days": ["sun"], "start": "01:00", "end": "02:00" } ] })));
        s.schedules.push(schedule(json!({ "id": "dst-2", "windows": [
            { "days": ["sun"], "start": "02:30", "end": "04:00" } ] })));
        user_mut(s, "alice").schedule = Some("dst-1".into());
        user_mut(s, "hana").schedule = Some("dst-2".into());
    });
    f.table(
        "spring forward 2026-03-08",
        &spring,
        None,
        &[
            case("01:00-02:00: 00:59 EST closed", alice.clone(), gate, "2026-03-08T00:59:00-05:00", OutsideSchedule),
            case("01:00-02:00: 01:00 EST open", alice.clone(), gate, "2026-03-08T01:00:00-05:00", Tenant),
            case("01:00-02:00: 01:59 EST open", alice.clone(), gate, "2026-03-08T01:59:59-05:00", Tenant),
            case("01:00-02:00: 03:00 EDT (next instant) closed", alice.clone(), gate, "2026-03-08T03:00:00-04:00", OutsideSchedule),
            // The end 02:00 does not exist: the window ends at 03:00 EDT for the grace period.
            case("01:00-02:00: exit 03:10 EDT in grace", alice.clone(), exit, "2026-03-08T03:10:00-04:00", ExitGracePeriod),
            case("01:00-02:00: exit 03:29 EDT in grace", alice.clone(), exit, "2026-03-08T03:29:00-04:00", ExitGracePeriod),
            case("01:00-02:00: exit 03:30 EDT after grace", alice.clone(), exit, "2026-03-08T03:30:00-04:00", OutsideSchedule),
            case("02:30-04:00: 01:59 EST closed", hana.clone(), gate, "2026-03-08T01:59:00-05:00", OutsideSchedule),
            case("02:30-04:00: opens at 03:00 EDT (02:30 never happens)", hana.clone(), gate, "2026-03-08T03:00:00-04:00", Tenant),
            case("02:30-04:00: 03:59 EDT open", hana.clone(), gate, "2026-03-08T03:59:00-04:00", Tenant),
            case("02:30-04:00: 04:00 EDT closed", hana.clone(), gate, "2026-03-08T04:00:00-04:00", OutsideSchedule),
            case("02:30-04:00: exit 04:10 EDT in grace", hana.clone(), exit, "2026-03-08T04:10:00-04:00", ExitGracePeriod),
            case("02:30-04:00: the next Sunday 02:45 EDT open", hana.clone(), gate, "2026-03-15T02:45:00-04:00", Tenant),
        ],
    );

    // 2026-11-01 (Sunday): 02:00 EDT becomes 01:00 EST; 01:00-02:00 happens twice.
    let fall = fixture_with(|s| {
        s.schedules.push(schedule(json!({ "id": "dst-1", "windows": [
            { "days": ["sun"], "start": "00:00", "end": "01:30" } ] })));
        s.schedules.push(schedule(json!({ "id": "dst-2", "windows": [
            { "days": ["sun"], "start": "01:30", "end": "03:00" } ] })));
        user_mut(s, "alice").schedule = Some("dst-1".into());
        user_mut(s, "hana").schedule = Some("dst-2".into());
    });
    f.table(
        "fall back 2026-11-01",
        &fall,
        None,
        &[
            case("00:00-01:30: first 01:15 (EDT) open", alice.clone(), gate, "2026-11-01T01:15:00-04:00", Tenant),
            case("00:00-01:30: first 01:30 (EDT) closed", alice.clone(), gate, "2026-11-01T01:30:00-04:00", OutsideSchedule),
            case("00:00-01:30: first 01:59 (EDT) closed", alice.clone(), gate, "2026-11-01T01:59:00-04:00", OutsideSchedule),
            case("00:00-01:30: second 01:00 (EST) open again", alice.clone(), gate, "2026-11-01T01:00:00-05:00", Tenant),
            case("00:00-01:30: second 01:29 (EST) open", alice.clone(), gate, "2026-11-01T01:29:00-05:00", Tenant),
            case("00:00-01:30: second 01:30 (EST) closed", alice.clone(), gate, "2026-11-01T01:30:00-05:00", OutsideSchedule),
            // The end 01:30 happens twice: the window closes at 01:30 EDT and again at 01:30 EST,
            // and each closing is followed by the 30-minute grace period.
            case("00:00-01:30: exit 01:30 EDT (first closing) in grace", alice.clone(), exit, "2026-11-01T01:30:00-04:00", ExitGracePeriod),
            case("00:00-01:30: exit 01:40 EDT (first closing) in grace", alice.clone(), exit, "2026-11-01T01:40:00-04:00", ExitGracePeriod),
            case("00:00-01:30: gate out 01:40 EDT (first closing) in grace", alice.clone(), gate, "2026-11-01T01:40:00-04:00", ExitGracePeriod).out(),
            case("00:00-01:30: entering 01:40 EDT closed", alice.clone(), gate, "2026-11-01T01:40:00-04:00", OutsideSchedule),
            case("00:00-01:30: exit 01:59 EDT (first closing) in grace", alice.clone(), exit, "2026-11-01T01:59:59-04:00", ExitGracePeriod),
            // 02:00 EDT is 01:00 EST: the window is open again, exiting is a plain exit.
            case("00:00-01:30: exit 01:00 EST open again", alice.clone(), exit, "2026-11-01T01:00:00-05:00", Tenant),
            case("00:00-01:30: exit 01:40 EST (second closing) in grace", alice.clone(), exit, "2026-11-01T01:40:00-05:00", ExitGracePeriod),
            case("00:00-01:30: gate out 01:40 EST (second closing) in grace", alice.clone(), gate, "2026-11-01T01:40:00-05:00", ExitGracePeriod).out(),
            case("00:00-01:30: exit 01:59 EST in grace", alice.clone(), exit, "2026-11-01T01:59:00-05:00", ExitGracePeriod),
            case("00:00-01:30: exit 02:00 EST after grace", alice.clone(), exit, "2026-11-01T02:00:00-05:00", OutsideSchedule),
            case("00:00-01:30: exit 02:10 EST after grace", alice.clone(), exit, "2026-11-01T02:10:00-05:00", OutsideSchedule),
            case("00:00-01:30: gate out 02:10 EST after grace", alice.clone(), gate, "2026-11-01T02:10:00-05:00", OutsideSchedule).out(),
            case("01:30-03:00: first 01:15 (EDT) closed", hana.clone(), gate, "2026-11-01T01:15:00-04:00", OutsideSchedule),
            case("01:30-03:00: first 01:45 (EDT) open", hana.clone(), gate, "2026-11-01T01:45:00-04:00", Tenant),
            case("01:30-03:00: second 01:15 (EST) closed again", hana.clone(), gate, "2026-11-01T01:15:00-05:00", OutsideSchedule),
            case("01:30-03:00: second 01:45 (EST) open", hana.clone(), gate, "2026-11-01T01:45:00-05:00", Tenant),
            case("01:30-03:00: 02:59 EST open", hana.clone(), gate, "2026-11-01T02:59:00-05:00", Tenant),
            case("01:30-03:00: 03:00 EST closed", hana.clone(), gate, "2026-11-01T03:00:00-05:00", OutsideSchedule),
            case("01:30-03:00: exit 03:20 EST in grace", hana.clone(), exit, "2026-11-01T03:20:00-05:00", ExitGracePeriod),
            case("01:30-03:00: exit 03:30 EST after grace", hana.clone(), exit, "2026-11-01T03:30:00-05:00", OutsideSchedule),
        ],
    );
    f.finish();
}

// ------------------------------------------------------------------------------------------------
// grace_period
// ------------------------------------------------------------------------------------------------

#[test]
#[rustfmt::skip] // one table row per line
fn grace_period() {
    // Gate hours close at 22:00 (EST); grace 30 minutes.
    let (alice, eve, emma) = (code("123456"), code("999000"), code("240008"));
    let (gate, exit) = (Entry("gate-1"), Entry("exit-1"));
    let mut f = Family::new("grace_period");
    f.table(
        "grace 30",
        &fixture(),
        None,
        &[
            case("exit entry 10 min after close", alice.clone(), exit, "2026-11-23T22:10:00-05:00", ExitGracePeriod),
            case("exit entry forces out (asked In)", alice.clone(), exit, "2026-11-23T22:10:00-05:00", ExitGracePeriod),
            case("exit entry asked Out", alice.clone(), exit, "2026-11-23T22:10:00-05:00", ExitGracePeriod).out(),
            case("exit entry right at close", alice.clone(), exit, "2026-11-23T22:00:00-05:00", ExitGracePeriod),
            case("exit entry 29 min after", alice.clone(), exit, "2026-11-23T22:29:59-05:00", ExitGracePeriod),
            case("exit entry 30 min after", alice.clone(), exit, "2026-11-23T22:30:00-05:00", OutsideSchedule),
            case("exit entry 40 min after", alice.clone(), exit, "2026-11-23T22:40:00-05:00", OutsideSchedule),
            case("exit entry during hours", alice.clone(), exit, "2026-11-23T21:00:00-05:00", Tenant),
            case("exit entry before opening", alice.clone(), exit, "2026-11-23T05:50:00-05:00", OutsideSchedule),
            case("entering 10 min after close", alice.clone(), gate, "2026-11-23T22:10:00-05:00", OutsideSchedule),
            case("gate asked Out 10 min after close", alice.clone(), gate, "2026-11-23T22:10:00-05:00", ExitGracePeriod).out(),
            case("gate asked Out 40 min after close", alice.clone(), gate, "2026-11-23T22:40:00-05:00", OutsideSchedule).out(),
            case("unit after close is never an exit", alice.clone(), Unit("A-101"), "2026-11-23T22:10:00-05:00", OutsideSchedule).out(),
            case("employee on default schedule", emma.clone(), exit, "2026-11-23T22:10:00-05:00", ExitGracePeriod),
            case("24/7 employee keeps own reason", eve.clone(), exit, "2026-11-23T23:30:00-05:00", Employee),
        ],
    );
    f.table(
        "grace 0",
        &fixture_with(|s| s.facility.grace_period_minutes = 0),
        None,
        &[case("exit 1 min after close", alice.clone(), exit, "2026-11-23T22:01:00-05:00", OutsideSchedule)],
    );
    f.table(
        "grace 180 (past midnight)",
        &fixture_with(|s| s.facility.grace_period_minutes = 180),
        None,
        &[
            case("exit 00:30 next day", alice.clone(), exit, "2026-11-24T00:30:00-05:00", ExitGracePeriod),
            case("exit 00:59 next day", alice.clone(), exit, "2026-11-24T00:59:00-05:00", ExitGracePeriod),
            case("exit 01:00 next day", alice.clone(), exit, "2026-11-24T01:00:00-05:00", OutsideSchedule),
        ],
    );
    f.finish();
}

// ------------------------------------------------------------------------------------------------
// exits_by_tenants_not_in_good_standing
// ------------------------------------------------------------------------------------------------

/// Leaving is never blocked by a tenant's standing (src/policy/mod.rs): a tenant whose only unit
/// is overlocked, a gatelocked tenant and (Restrict Overlocked Entry ON) a tenant with one
/// overlocked unit may exit, at an `exit` entry or asking Out at the gate, within the schedule or
/// its grace period; the reason is the way they hold a unit. Entering is still refused, and so is
/// exiting after the grace period. A blacklisted fob is refused at exits too.
#[test]
#[rustfmt::skip] // one table row per line
fn exits_by_tenants_not_in_good_standing() {
    // olga: only A-105 (overlock). greg: B-203 (gatelocked) + B-204 (occupied). bob: A-102
    // (overlock) + A-103 (occupied). Gate hours 06:00-22:00 EST, grace 30 minutes.
    let (olga, greg, bob) = (code("240001"), code("111222"), code("234567"));
    let (wendy, ian, tom) = (code("777888"), code("240006"), code("240003"));
    let (gate, exit) = (Entry("gate-1"), Entry("exit-1"));
    const GRACE: &str = "2026-11-23T22:10:00-05:00";
    const AFTER_GRACE: &str = "2026-11-23T22:40:00-05:00";
    let mut f = Family::new("exits_by_tenants_not_in_good_standing");
    f.table(
        "restrict OFF, use_blacklist ON",
        &fixture(),
        None,
        &[
            // Only unit overlocked.
            case("olga at exit", olga.clone(), exit, MON_10, Tenant).units(&["A-105"]),
            case("olga at gate, out", olga.clone(), gate, MON_10, Tenant).out().units(&["A-105"]),
            case("olga entering at gate", olga.clone(), gate, MON_10, Overlocked).units(&["A-105"]),
            case("olga at exit in grace", olga.clone(), exit, GRACE, ExitGracePeriod).units(&["A-105"]),
            case("olga at gate, out, in grace", olga.clone(), gate, GRACE, ExitGracePeriod).out(),
            case("olga at exit after grace", olga.clone(), exit, AFTER_GRACE, OutsideSchedule),
            case("olga at gate, out, after grace", olga.clone(), gate, AFTER_GRACE, OutsideSchedule).out(),
            case("olga at exit before opening", olga.clone(), exit, "2026-11-23T05:50:00-05:00", OutsideSchedule),
            case("olga still refused at her unit", olga.clone(), Unit("A-105"), MON_10, UnitOverlocked),
            // Gatelocked.
            case("greg at exit", greg.clone(), exit, MON_10, Tenant).units(&["B-203", "B-204"]),
            case("greg at gate, out", greg.clone(), gate, MON_10, Tenant).out(),
            case("greg entering at gate", greg.clone(), gate, MON_10, Gatelocked).units(&["B-203"]),
            case("greg at exit in grace", greg.clone(), exit, GRACE, ExitGracePeriod),
            case("greg at exit after grace", greg.clone(), exit, AFTER_GRACE, OutsideSchedule),
            case("greg at gate, out, after grace", greg.clone(), gate, AFTER_GRACE, OutsideSchedule).out(),
            case("greg still refused at his occupied unit", greg.clone(), Unit("B-204"), MON_10, Gatelocked),
            // Users in good standing exit with the way they hold a unit.
            case("shared user at exit", ian.clone(), exit, MON_10, SharedUser).units(&["B-205"]),
            case("auction winner at exit", wendy.clone(), exit, MON_10, AuctionWinner).units(&["B-202"]),
            case("tenant during a transfer at exit", tom.clone(), exit, MON_10, Transfer).units(&["A-106", "B-206"]),
            // Blacklisted fobs and cards are refused before anything else, exits included.
            case("blacklisted valid fob at exit", fob("FOB-BOB"), exit, MON_10, Blacklisted),
            case("blacklisted valid fob at gate, out", fob("FOB-BOB"), gate, MON_10, Blacklisted).out(),
            case("blacklisted valid fob at exit in grace", fob("FOB-BOB"), exit, GRACE, Blacklisted),
            case("blacklisted unknown fob at exit", fob("FOB-DEAD01"), exit, MON_10, Blacklisted),
            case("blacklisted card at exit", card(Some(12), 99999), exit, MON_10, Blacklisted),
            case("unknown fob at exit", fob("FOB-NOPE"), exit, MON_10, UnknownCredential),
            case("unknown code at exit", code("000000"), exit, MON_10, UnknownCredential),
        ],
    );
    f.table(
        "restrict ON, use_blacklist ON",
        &fixture_with(|s| s.facility.restrict_overlocked_entry = true),
        None,
        &[
            case("bob at exit", bob.clone(), exit, MON_10, Tenant).units(&["A-102", "A-103"]),
            case("bob at gate, out", bob.clone(), gate, MON_10, Tenant).out().units(&["A-102", "A-103"]),
            case("bob entering at gate", bob.clone(), gate, MON_10, OverlockedRestricted).units(&["A-102"]),
            case("bob entering at zone-a door", bob.clone(), Entry("door-a"), MON_10, OverlockedRestricted),
            case("bob at exit in grace", bob.clone(), exit, GRACE, ExitGracePeriod),
            case("bob at gate, out, in grace", bob.clone(), gate, GRACE, ExitGracePeriod).out(),
            case("bob at exit after grace", bob.clone(), exit, AFTER_GRACE, OutsideSchedule),
            case("bob at gate, out, after grace", bob.clone(), gate, AFTER_GRACE, OutsideSchedule).out(),
            case("bob still refused at his occupied unit", bob.clone(), Unit("A-103"), MON_10, OverlockedRestricted),
            case("olga at exit", olga.clone(), exit, MON_10, Tenant),
            case("olga entering at gate", olga.clone(), gate, MON_10, OverlockedRestricted),
            case("bob's blacklisted fob at exit", fob("FOB-BOB"), exit, MON_10, Blacklisted),
            case("bob's blacklisted card at exit", card(Some(12), 99999), exit, MON_10, Blacklisted),
        ],
    );
    f.table(
        "restrict ON, use_blacklist OFF",
        &fixture_with(|s| {
            s.facility.restrict_overlocked_entry = true;
            s.facility.use_blacklist = false;
        }),
        None,
        &[
            case("bob's fob at exit", fob("FOB-BOB"), exit, MON_10, Tenant).units(&["A-102", "A-103"]),
            case("bob's fob entering at gate", fob("FOB-BOB"), gate, MON_10, OverlockedRestricted),
            case("blacklist-only fob at exit is just unknown", fob("FOB-DEAD01"), exit, MON_10, UnknownCredential),
        ],
    );
    f.table(
        "grace 0",
        &fixture_with(|s| s.facility.grace_period_minutes = 0),
        None,
        &[
            case("olga at exit 1 min after close", olga.clone(), exit, "2026-11-23T22:01:00-05:00", OutsideSchedule),
            case("greg at exit 1 min after close", greg.clone(), exit, "2026-11-23T22:01:00-05:00", OutsideSchedule),
        ],
    );
    f.finish();
}

// ------------------------------------------------------------------------------------------------
// vendor_expiry_and_zones
// ------------------------------------------------------------------------------------------------

#[test]
#[rustfmt::skip] // one table row per line
fn vendor_expiry_and_zones() {
    // victor: vendor, zones [zone-b], expires 2027-06-30T23:59:00-04:00, default gate hours.
    let (victor, alice, hana, carol) = (code("555111"), code("123456"), code("240004"), code("345678"));
    let mut f = Family::new("vendor_expiry_and_zones");
    f.table(
        "default fixture",
        &fixture(),
        None,
        &[
            case("vendor at unzoned gate", victor.clone(), Entry("gate-1"), MON_10, Vendor),
            case("vendor at unzoned exit", victor.clone(), Entry("exit-1"), MON_10, Vendor),
            case("vendor at own zone's elevator", victor.clone(), Entry("elevator-b"), MON_10, Vendor),
            case("vendor at other zone's door", victor.clone(), Entry("door-a"), MON_10, ZoneNotAllowed),
            case("vendor at unit in other zone", victor.clone(), Unit("A-101"), MON_10, ZoneNotAllowed),
            case("vendor outside gate hours", victor.clone(), Entry("gate-1"), "2026-11-23T23:00:00-05:00", OutsideSchedule),
            case("vendor on its last day", victor.clone(), Entry("gate-1"), "2027-06-30T21:58:00-04:00", Vendor),
            case("vendor at expiry (exclusive)", victor.clone(), Entry("gate-1"), "2027-06-30T23:59:00-04:00", UserExpired),
            case("vendor after expiry", victor.clone(), Entry("gate-1"), "2027-07-01T10:00:00-04:00", UserExpired),
            case("vendor after expiry, own zone", victor.clone(), Entry("elevator-b"), "2027-07-01T10:00:00-04:00", UserExpired),
            case("vendor after expiry may still leave", victor.clone(), Entry("exit-1"), "2027-07-01T10:00:00-04:00", Vendor),
            case("vendor after expiry, out through the gate", victor.clone(), Entry("gate-1"), "2027-07-01T10:00:00-04:00", Vendor).out(),
            case("vendor after expiry at a unit", victor.clone(), Unit("B-201"), "2027-07-01T10:00:00-04:00", UserExpired),
            // Zones for users holding units: a zoned entry needs a unit in that zone.
            case("tenant at own unit's zone door", alice.clone(), Entry("door-a"), MON_10, Tenant).units(&["A-101"]),
            case("tenant at other zone's elevator", alice.clone(), Entry("elevator-b"), MON_10, ZoneNotAllowed),
            case("zone-b tenant at zone-a door", hana.clone(), Entry("door-a"), MON_10, ZoneNotAllowed),
            case("zone-b tenant at zone-b elevator", hana.clone(), Entry("elevator-b"), MON_10, Tenant),
            case("shared user at shared unit's zone", carol.clone(), Entry("door-a"), MON_10, SharedUser),
            case("shared user at other zone", carol.clone(), Entry("elevator-b"), MON_10, ZoneNotAllowed),
        ],
    );
    f.table(
        "a user (not only vendors) limited to a zone and with an expiry",
        &fixture_with(|s| {
            let emma = user_mut(s, "emma");
            emma.zones = vec!["zone-a".into()];
            emma.expires_at = Some(time("2026-12-01T00:00:00-05:00"));
        }),
        None,
        &[
            case("employee in zone", code("240008"), Entry("door-a"), MON_10, Employee),
            case("employee out of zone", code("240008"), Entry("elevator-b"), MON_10, ZoneNotAllowed),
            case("employee at unit out of zone", code("240008"), Unit("B-201"), MON_10, ZoneNotAllowed),
            case("employee expired", code("240008"), Entry("door-a"), "2026-12-01T10:00:00-05:00", UserExpired),
        ],
    );
    f.finish();
}

// ------------------------------------------------------------------------------------------------
// shares_with_time_frames
// ------------------------------------------------------------------------------------------------

#[test]
#[rustfmt::skip] // one table row per line
fn shares_with_time_frames() {
    // carol: A-101 from 2026-06-01T00:00-04:00 until 2027-01-01T00:00-05:00 (exclusive);
    // ian: B-205 indefinitely. Carol is given the 24/7 schedule so that the boundaries at
    // midnight are about the share, not the gate hours.
    let (carol, ian) = (code("345678"), code("240006"));
    let snap = fixture_with(|s| user_mut(s, "carol").schedule = Some("always".into()));
    let mut f = Family::new("shares_with_time_frames");
    f.table(
        "time frame and indefinite",
        &snap,
        None,
        &[
            case("before start", carol.clone(), Unit("A-101"), "2026-05-31T23:59:59-04:00", ShareNotActive),
            case("before start, at gate", carol.clone(), Entry("gate-1"), "2026-05-31T10:00:00-04:00", ShareNotActive),
            case("at start (inclusive)", carol.clone(), Unit("A-101"), "2026-06-01T00:00:00-04:00", SharedUser).units(&["A-101"]),
            case("during", carol.clone(), Unit("A-101"), MON_10, SharedUser),
            case("during, at gate", carol.clone(), Entry("gate-1"), MON_10, SharedUser).units(&["A-101"]),
            case("last second", carol.clone(), Unit("A-101"), "2026-12-31T23:59:59-05:00", SharedUser),
            case("at end (exclusive)", carol.clone(), Unit("A-101"), "2027-01-01T00:00:00-05:00", ShareNotActive),
            case("after end", carol.clone(), Unit("A-101"), "2027-03-01T10:00:00-05:00", ShareNotActive),
            case("after end, at gate", carol.clone(), Entry("gate-1"), "2027-03-01T10:00:00-05:00", ShareNotActive),
            case("during, a unit not shared", carol.clone(), Unit("A-103"), MON_10, NoAccess),
            case("indefinite, long ago", ian.clone(), Unit("B-205"), "2020-01-06T10:00:00-05:00", SharedUser),
            case("indefinite, far future", ian.clone(), Unit("B-205"), "2035-05-07T10:00:00-04:00", SharedUser),
            case("indefinite, at gate", ian.clone(), Entry("gate-1"), MON_10, SharedUser),
            case("indefinite, a unit not shared", ian.clone(), Unit("A-101"), MON_10, NoAccess),
        ],
    );
    f.table(
        "revoked (share deleted)",
        &fixture_with(|s| s.shares.retain(|x| x.id != "s-ian-b205")),
        None,
        &[case("revoked share", ian.clone(), Unit("B-205"), MON_10, NoAccess)],
    );
    f.table(
        "shared unit no longer occupied",
        &fixture_with(|s| unit_mut(s, "B-205").status = gatehouse::sync::UnitStatus::Overlock),
        None,
        &[case("shared unit overlocked", ian.clone(), Unit("B-205"), MON_10, UnitOverlocked)],
    );
    f.finish();
}

// ------------------------------------------------------------------------------------------------
// transfers
// ------------------------------------------------------------------------------------------------

#[test]
#[rustfmt::skip] // one table row per line
fn transfers() {
    // tom: A-106 (zone-a) -> B-206 (zone-b), transfer expires 2026-11-25T10:00-05:00 (48 h after
    // Mon 10:00). The property-management data still lists tom as tenant of both units.
    // sam shares A-106 (the old unit) indefinitely.
    let (tom, sam) = (code("240003"), code("240005"));
    const DURING: &str = "2026-11-24T10:00:00-05:00";
    const AT_EXPIRY: &str = "2026-11-25T10:00:00-05:00";
    const AFTER: &str = "2026-11-26T10:00:00-05:00";
    let mut f = Family::new("transfers");
    f.table(
        "48 h transfer",
        &fixture(),
        None,
        &[
            case("during: old unit", tom.clone(), Unit("A-106"), DURING, Transfer),
            case("during: new unit", tom.clone(), Unit("B-206"), DURING, Transfer),
            case("during: gate gives both", tom.clone(), Entry("gate-1"), DURING, Transfer).units(&["A-106", "B-206"]),
            case("during: old unit's zone", tom.clone(), Entry("door-a"), DURING, Transfer).units(&["A-106"]),
            case("during: new unit's zone", tom.clone(), Entry("elevator-b"), DURING, Transfer).units(&["B-206"]),
            case("one second before expiry: old unit", tom.clone(), Unit("A-106"), "2026-11-25T09:59:59-05:00", Transfer),
            case("at expiry: old unit", tom.clone(), Unit("A-106"), AT_EXPIRY, TransferExpired),
            case("after: old unit", tom.clone(), Unit("A-106"), AFTER, TransferExpired),
            case("after: new unit", tom.clone(), Unit("B-206"), AFTER, Tenant),
            case("after: gate gives the new unit only", tom.clone(), Entry("gate-1"), AFTER, Tenant).units(&["B-206"]),
            case("after: old unit's zone", tom.clone(), Entry("door-a"), AFTER, ZoneNotAllowed),
            // Shared users of the old unit reach the new unit during the transfer.
            case("during: shared user at old unit", sam.clone(), Unit("A-106"), DURING, SharedUser),
            case("during: shared user at new unit", sam.clone(), Unit("B-206"), DURING, SharedUser),
            case("during: shared user at new unit's zone", sam.clone(), Entry("elevator-b"), DURING, SharedUser),
            case("after: shared user at new unit", sam.clone(), Unit("B-206"), AFTER, NoAccess),
        ],
    );
    f.table(
        "extended transfer",
        &fixture_with(|s| s.transfers[0].expires_at = time("2026-11-27T10:00:00-05:00")),
        None,
        &[case("extended: old unit still held", tom.clone(), Unit("A-106"), AFTER, Transfer)],
    );
    f.table(
        "units in transit in the property-management data",
        &fixture_with(|s| {
            // Old unit already Available, new unit still Pre-Let without tenant.
            let a = unit_mut(s, "A-106");
            a.status = gatehouse::sync::UnitStatus::Available;
            a.tenant = None;
            let b = unit_mut(s, "B-206");
            b.status = gatehouse::sync::UnitStatus::PreLet;
            b.tenant = None;
        }),
        None,
        &[
            case("during: old unit available", tom.clone(), Unit("A-106"), DURING, Transfer),
            case("during: new unit pre-let", tom.clone(), Unit("B-206"), DURING, Transfer),
            case("after: old unit", tom.clone(), Unit("A-106"), AFTER, TransferExpired),
            // After expiry the new unit stays held through the transfer until the cloud's data
            // catches up (it still shows B-206 pre-let without tenant).
            case("after: new unit still pre-let", tom.clone(), Unit("B-206"), AFTER, Transfer),
            case("after: gate gives the new unit", tom.clone(), Entry("gate-1"), AFTER, Transfer).units(&["B-206"]),
        ],
    );
    f.table(
        "expired, property-management data not updated (new unit: available, no tenant)",
        &fixture_with(|s| {
            // A-106 still lists tom as its tenant; B-206 has not been given to him yet.
            let b = unit_mut(s, "B-206");
            b.status = gatehouse::sync::UnitStatus::Available;
            b.tenant = None;
        }),
        None,
        &[
            case("during: old unit", tom.clone(), Unit("A-106"), DURING, Transfer),
            case("during: new unit available", tom.clone(), Unit("B-206"), DURING, Transfer),
            case("after: new unit", tom.clone(), Unit("B-206"), AFTER, Transfer).units(&["B-206"]),
            case("at expiry: new unit", tom.clone(), Unit("B-206"), AT_EXPIRY, Transfer),
            case("after: old unit, still listed as his", tom.clone(), Unit("A-106"), AFTER, TransferExpired).units(&["A-106"]),
            case("at expiry: old unit, still listed as his", tom.clone(), Unit("A-106"), AT_EXPIRY, TransferExpired),
            case("after: gate gives the new unit only", tom.clone(), Entry("gate-1"), AFTER, Transfer).units(&["B-206"]),
            case("after: new unit's zone", tom.clone(), Entry("elevator-b"), AFTER, Transfer).units(&["B-206"]),
            case("after: old unit's zone", tom.clone(), Entry("door-a"), AFTER, ZoneNotAllowed),
            case("after: exit", tom.clone(), Entry("exit-1"), AFTER, Transfer).units(&["B-206"]),
            case("after: new unit outside hours", tom.clone(), Unit("B-206"), "2026-11-26T23:00:00-05:00", OutsideSchedule),
            case("after: shared user of the old unit at the new unit", sam.clone(), Unit("B-206"), AFTER, NoAccess),
        ],
    );
    f.table(
        "overlocked new unit",
        &fixture_with(|s| unit_mut(s, "B-206").status = gatehouse::sync::UnitStatus::Overlock),
        None,
        &[
            case("during: overlocked new unit", tom.clone(), Unit("B-206"), DURING, UnitOverlocked),
            case("during: old unit still", tom.clone(), Unit("A-106"), DURING, Transfer),
        ],
    );
    f.table(
        "expired transfer, new unit re-let to someone else",
        &fixture_with(|s| {
            let b = s.units.iter_mut().find(|u| u.id == "B-206").expect("B-206");
            b.tenant = Some("alice".into());
        }),
        None,
        &[
            case("former transferee at the re-let unit", tom.clone(), Unit("B-206"), AFTER, NoAccess),
            case("during the transfer it was still theirs", tom.clone(), Unit("B-206"), DURING, Transfer),
        ],
    );
    f.finish();
}

// ------------------------------------------------------------------------------------------------
// blacklist
// ------------------------------------------------------------------------------------------------

#[test]
#[rustfmt::skip] // one table row per line
fn blacklist() {
    // FOB-BOB is bob's valid fob and blacklisted; FOB-DEAD01 is blacklisted only. Card {12, 99999}
    // is bob's and blacklisted exactly; card entry {number 88888} (no facility code) blacklists
    // ian's card {7, 88888}.
    let mut f = Family::new("blacklist");
    f.table(
        "use_blacklist ON",
        &fixture_with(|s| s.facility.use_blacklist = true),
        None,
        &[
            case("blacklisted valid fob at gate", fob("FOB-BOB"), Entry("gate-1"), MON_10, Blacklisted),
            case("blacklisted valid fob at zoned door", fob("FOB-BOB"), Entry("door-a"), MON_10, Blacklisted),
            case("blacklisted valid fob at unit", fob("FOB-BOB"), Unit("A-103"), MON_10, Blacklisted),
            case("blacklisted unknown fob", fob("FOB-DEAD01"), Entry("gate-1"), MON_10, Blacklisted),
            case("valid fob not blacklisted", fob("FOB-ALICE"), Entry("gate-1"), MON_10, Tenant),
            case("the blacklisted fob's owner by code", code("234567"), Entry("gate-1"), MON_10, Tenant),
            case("blacklisted card (exact)", card(Some(12), 99999), Entry("gate-1"), MON_10, Blacklisted),
            case("card entry without facility code", card(Some(7), 88888), Entry("gate-1"), MON_10, Blacklisted),
            case("card entry without facility code, other fc", card(Some(200), 88888), Entry("gate-1"), MON_10, Blacklisted),
            case("same number, other facility code", card(Some(13), 99999), Entry("gate-1"), MON_10, UnknownCredential),
            case("valid card not blacklisted", card(Some(12), 34567), Entry("gate-1"), MON_10, Tenant),
        ],
    );
    f.table(
        "use_blacklist OFF",
        &fixture_with(|s| s.facility.use_blacklist = false),
        None,
        &[
            case("valid fob follows normal rules", fob("FOB-BOB"), Entry("gate-1"), MON_10, Tenant).units(&["A-103"]),
            case("valid fob at overlocked unit", fob("FOB-BOB"), Unit("A-102"), MON_10, UnitOverlocked),
            case("valid fob outside hours", fob("FOB-BOB"), Entry("gate-1"), "2026-11-23T23:00:00-05:00", OutsideSchedule),
            case("blacklist-only fob is just unknown", fob("FOB-DEAD01"), Entry("gate-1"), MON_10, UnknownCredential),
            case("valid card follows normal rules", card(Some(12), 99999), Entry("gate-1"), MON_10, Tenant),
            case("valid card (any-fc entry) follows normal rules", card(Some(7), 88888), Entry("gate-1"), MON_10, SharedUser),
        ],
    );
    f.finish();
}

// ------------------------------------------------------------------------------------------------
// fob_schedule
// ------------------------------------------------------------------------------------------------

#[test]
#[rustfmt::skip] // one table row per line
fn fob_schedule() {
    // fob-hours 07:00-21:00; gate-hours (alice's) 06:00-22:00; eve is 24/7. Grace 30.
    let (alice_code, alice_fob, alice_card) = (code("123456"), fob("FOB-ALICE"), card(Some(12), 34567));
    let (eve_code, eve_fob) = (code("999000"), fob("FOB-EVE"));
    let gate = Entry("gate-1");
    let mut f = Family::new("fob_schedule");
    f.table(
        "fob_schedule_enabled ON",
        &fixture_with(|s| s.facility.fob_schedule_enabled = true),
        None,
        &[
            case("fob inside fob hours", alice_fob.clone(), gate, MON_10, Tenant),
            case("fob 06:30 (before fob hours)", alice_fob.clone(), gate, "2026-11-23T06:30:00-05:00", OutsideSchedule),
            case("code 06:30 (user schedule)", alice_code.clone(), gate, "2026-11-23T06:30:00-05:00", Tenant),
            case("fob 21:30 (after fob hours)", alice_fob.clone(), gate, "2026-11-23T21:30:00-05:00", OutsideSchedule),
            case("code 21:30 (user schedule)", alice_code.clone(), gate, "2026-11-23T21:30:00-05:00", Tenant),
            case("fob at unit 06:30", alice_fob.clone(), Unit("A-101"), "2026-11-23T06:30:00-05:00", OutsideSchedule),
            case("fob exit 21:10 (fob hours closed at 21:00, grace)", alice_fob.clone(), Entry("exit-1"), "2026-11-23T21:10:00-05:00", ExitGracePeriod),
            case("fob exit 21:40 (after grace)", alice_fob.clone(), Entry("exit-1"), "2026-11-23T21:40:00-05:00", OutsideSchedule),
            case("24/7 user's fob at night follows fob hours", eve_fob.clone(), gate, "2026-11-24T03:00:00-05:00", OutsideSchedule),
            case("24/7 user's code at night", eve_code.clone(), gate, "2026-11-24T03:00:00-05:00", Employee),
            // Only fobs: a card follows the user's schedule (src/sync.rs Facility doc).
            case("card 06:30 follows user schedule", alice_card.clone(), gate, "2026-11-23T06:30:00-05:00", Tenant),
        ],
    );
    f.table(
        "fob_schedule_enabled OFF",
        &fixture_with(|s| s.facility.fob_schedule_enabled = false),
        None,
        &[
            case("fob 06:30 follows user schedule", alice_fob.clone(), gate, "2026-11-23T06:30:00-05:00", Tenant),
            case("fob 21:30 follows user schedule", alice_fob.clone(), gate, "2026-11-23T21:30:00-05:00", Tenant),
            case("fob 22:30 outside user schedule", alice_fob.clone(), gate, "2026-11-23T22:30:00-05:00", OutsideSchedule),
            case("24/7 user's fob at night", eve_fob.clone(), gate, "2026-11-24T03:00:00-05:00", Employee),
        ],
    );
    f.finish();
}

// ------------------------------------------------------------------------------------------------
// temporary_code
// ------------------------------------------------------------------------------------------------

fn temp_code(date: &str) -> String {
    let secret = hex::decode(TEMP_SECRET_HEX).expect("hex");
    code_for_date(&secret, date.parse::<NaiveDate>().expect("date"))
}

#[test]
#[rustfmt::skip] // one table row per line
fn temporary_code() {
    let dates = ["2026-07-15", "2026-07-16", "2026-11-22", "2026-11-23", "2026-11-24"];
    let codes: Vec<String> = dates.iter().map(|d| temp_code(d)).collect();
    // The test is only meaningful if the day codes differ from each other and from user codes.
    let user_codes: Vec<String> = fixture()
        .credentials
        .iter()
        .filter_map(|c| c.code.clone())
        .collect();
    for (i, c) in codes.iter().enumerate() {
        assert!(!user_codes.contains(c), "temporary code of {} equals a user's code", dates[i]);
        assert_eq!(codes.iter().filter(|x| *x == c).count(), 1, "two dates share a code");
    }
    let (jul15, jul16, nov22, nov23, nov24) = (
        code(&codes[0]),
        code(&codes[1]),
        code(&codes[2]),
        code(&codes[3]),
        code(&codes[4]),
    );
    let gate = Entry("gate-1");
    let mut f = Family::new("temporary_code");
    f.table(
        "enabled, gate hours 06:00-22:00",
        &fixture(),
        None,
        &[
            case("today's code at gate", nov23.clone(), gate, MON_10, TemporaryCode),
            case("today's code at exit", nov23.clone(), Entry("exit-1"), MON_10, TemporaryCode),
            case("today's code at zone-a door", nov23.clone(), Entry("door-a"), MON_10, TemporaryCode),
            case("today's code at zone-b elevator", nov23.clone(), Entry("elevator-b"), MON_10, TemporaryCode),
            case("previous day's code", nov22.clone(), gate, MON_10, UnknownCredential),
            case("next day's code", nov24.clone(), gate, MON_10, UnknownCredential),
            // 20:00 EST is already 2026-11-24 in UTC: the local day counts.
            case("20:00 local: local day's code", nov23.clone(), gate, "2026-11-23T20:00:00-05:00", TemporaryCode),
            case("20:00 local: the UTC day's code", nov24.clone(), gate, "2026-11-23T20:00:00-05:00", UnknownCredential),
            case("refused at a unit", nov23.clone(), Unit("A-101"), MON_10, NoAccess),
            case("refused at an available unit", nov23.clone(), Unit("B-201"), MON_10, NoAccess),
            case("outside gate hours", nov23.clone(), gate, "2026-11-23T23:00:00-05:00", OutsideSchedule),
            case("exit in grace", nov23.clone(), Entry("exit-1"), "2026-11-23T22:10:00-05:00", ExitGracePeriod),
        ],
    );
    f.table(
        "enabled, no gate hours: the change at local midnight",
        &fixture_with(|s| s.facility.default_schedule = None),
        None,
        &[
            case("23:59:59 local: that day's code", nov23.clone(), gate, "2026-11-23T23:59:59-05:00", TemporaryCode),
            case("23:59:59 local: next day's code", nov24.clone(), gate, "2026-11-23T23:59:59-05:00", UnknownCredential),
            case("00:00 local: new day's code", nov24.clone(), gate, "2026-11-24T00:00:00-05:00", TemporaryCode),
            case("00:00 local: old day's code", nov23.clone(), gate, "2026-11-24T00:00:00-05:00", UnknownCredential),
            case("UTC midnight (19:00 local): local day's code", nov23.clone(), gate, "2026-11-23T19:00:00-05:00", TemporaryCode),
            case("UTC midnight (19:00 local): UTC day's code", nov24.clone(), gate, "2026-11-23T19:00:00-05:00", UnknownCredential),
            case("18:59:59 local", nov23.clone(), gate, "2026-11-23T18:59:59-05:00", TemporaryCode),
            case("EDT 20:30 local (00:30Z next day): local day's code", jul15.clone(), gate, "2026-07-15T20:30:00-04:00", TemporaryCode),
            case("EDT 20:30 local: UTC day's code", jul16.clone(), gate, "2026-07-15T20:30:00-04:00", UnknownCredential),
        ],
    );
    f.table(
        "disabled",
        &fixture_with(|s| s.facility.temporary_code_enabled = false),
        None,
        &[case("today's code, feature off", nov23.clone(), gate, MON_10, UnknownCredential)],
    );
    f.finish();
}

// ------------------------------------------------------------------------------------------------
// keypad_lockout (through AccessEngine and the durable event log)
// ------------------------------------------------------------------------------------------------

/// A monotonic clock a test sets by hand: a fixed origin plus an offset.
#[derive(Clone)]
struct ManualClock {
    origin: std::time::Instant,
    offset: Arc<std::sync::Mutex<std::time::Duration>>,
}

impl ManualClock {
    fn new() -> Self {
        ManualClock {
            origin: std::time::Instant::now(),
            offset: Arc::default(),
        }
    }

    fn set(&self, d: std::time::Duration) {
        *self.offset.lock().unwrap() = d;
    }

    fn clock(&self) -> gatehouse::access::MonotonicClock {
        let c = self.clone();
        Arc::new(move || c.origin + *c.offset.lock().unwrap())
    }
}

/// The wall clock steps (forward past the cool-down, back by a day) while no time passes on the
/// monotonic clock: the lockout is unchanged. It ends when the cool-down has passed on the
/// monotonic clock, whatever the wall clock says then.
#[test]
fn keypad_lockout_ignores_wall_clock_steps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), 10_000).expect("store opens");
    store
        .apply(&SyncMessage::Snapshot(Box::new(fixture())))
        .expect("snapshot applies");
    let clock = ManualClock::new();
    let engine = AccessEngine::new(Arc::new(store), None).with_monotonic_clock(clock.clock());
    let attempt = |code: &str, at: &str| {
        let a = Attempt {
            request: Request {
                credential: Presented::Code(code),
                target: Target::Entry("gate-1"),
                direction: Direction::In,
            },
            device: Some("keypad-gate"),
        };
        engine
            .check(&a, time(at))
            .expect("decision recorded")
            .reason
    };
    // Fixture policy: 5 invalid codes within 15 minutes, cool-down 5 minutes.
    for i in 0..5 {
        assert_eq!(
            attempt(&format!("00000{i}"), "2026-11-23T10:00:00-05:00"),
            UnknownCredential
        );
    }
    assert_eq!(
        attempt("123456", "2026-11-23T10:00:01-05:00"),
        KeypadLockedOut
    );
    // Wall clock stepped forward by an hour (past the cool-down), no monotonic time passed.
    assert_eq!(
        attempt("123456", "2026-11-23T11:00:01-05:00"),
        KeypadLockedOut,
        "a forward step must not end the lockout"
    );
    // Wall clock stepped back by a day.
    assert_eq!(
        attempt("123456", "2026-11-22T11:00:01-05:00"),
        KeypadLockedOut
    );
    // 4 min 59 s of monotonic time: still locked (the wall clock back at 10:05).
    clock.set(std::time::Duration::from_secs(299));
    assert_eq!(
        attempt("123456", "2026-11-23T10:05:00-05:00"),
        KeypadLockedOut
    );
    // 5 minutes of monotonic time have passed: unlocked, though the wall clock went back an hour.
    clock.set(std::time::Duration::from_secs(300));
    assert_eq!(
        attempt("123456", "2026-11-23T09:05:00-05:00"),
        Tenant,
        "a backward step must not lengthen the lockout"
    );
    // The window counts monotonic time too: four failures, a wall-clock jump of a day, a fifth
    // failure at the same monotonic instant locks the keypad.
    for i in 0..4 {
        assert_eq!(
            attempt(&format!("00001{i}"), "2026-11-23T10:10:00-05:00"),
            UnknownCredential
        );
    }
    assert_eq!(
        attempt("000019", "2026-11-24T10:10:00-05:00"),
        UnknownCredential
    );
    assert_eq!(
        attempt("123456", "2026-11-24T10:10:01-05:00"),
        KeypadLockedOut,
        "a forward step must not expire the window's failures"
    );
    let events = engine.store().events().read_from(0, 1000).expect("events");
    let starts: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "keypad_locked_out")
        .collect();
    assert_eq!(starts.len(), 2, "one keypad_locked_out per lockout");
    assert_eq!(
        starts[0].payload["until"],
        json!(time("2026-11-23T10:05:00-05:00")),
        "until: the wall time the cool-down was expected to end"
    );
}

#[test]
#[rustfmt::skip] // one table row per line
fn keypad_lockout() {
    // Lockout policy of the fixture: 5 invalid codes within 15 minutes, cool-down 5 minutes.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), 10_000).expect("store opens");
    store
        .apply(&SyncMessage::Snapshot(Box::new(fixture())))
        .expect("snapshot applies");
    // Lockout durations run on the monotonic clock: here it moves as the attempts' wall times do.
    let clock = ManualClock::new();
    let engine = AccessEngine::new(Arc::new(store), None).with_monotonic_clock(clock.clock());
    let today = temp_code("2026-11-23");
    let t0 = time("2026-11-23T10:00:00-05:00");

    let mut failures = Vec::new();
    let mut steps = 0usize;
    let mut step = |name: &str, device: &str, presented: &str, at: &str, expect: Reason| {
        steps += 1;
        clock.set((time(at) - t0).to_std().expect("attempts after t0"));
        let attempt = Attempt {
            request: Request {
                credential: Presented::Code(presented),
                target: Target::Entry("gate-1"),
                direction: Direction::In,
            },
            device: Some(device),
        };
        let d = engine.check(&attempt, time(at)).expect("decision recorded");
        if d.reason != expect || d.granted != expect.is_grant() {
            failures.push(format!(
                "[{name}] {device} at {at}: got `{}` (granted {}), expected `{expect}`",
                d.reason, d.granted
            ));
        }
    };
    let (kp1, kp2, kp3) = ("keypad-gate", "keypad-gate-2", "keypad-door");
    step("bad 1", kp1, "000001", "2026-11-23T10:00:00-05:00", UnknownCredential);
    step("bad 2", kp1, "000002", "2026-11-23T10:00:10-05:00", UnknownCredential);
    step("bad 3", kp1, "000003", "2026-11-23T10:00:20-05:00", UnknownCredential);
    step("bad 4", kp1, "000004", "2026-11-23T10:00:30-05:00", UnknownCredential);
    // The 5th failure starts the lockout (the attempt itself is reported as unknown).
    step("bad 5 starts lockout", kp1, "000005", "2026-11-23T10:00:40-05:00", UnknownCredential);
    step("valid code during lockout", kp1, "123456", "2026-11-23T10:00:50-05:00", KeypadLockedOut);
    step("bad code during lockout", kp1, "000006", "2026-11-23T10:01:00-05:00", KeypadLockedOut);
    step("temporary code during lockout", kp1, &today, "2026-11-23T10:01:10-05:00", KeypadLockedOut);
    step("employee code during lockout", kp1, "999000", "2026-11-23T10:02:00-05:00", KeypadLockedOut);
    step("another keypad unaffected", kp2, "123456", "2026-11-23T10:02:00-05:00", Tenant);
    step("another keypad, bad code", kp2, "000007", "2026-11-23T10:02:10-05:00", UnknownCredential);
    step("last second of cool-down", kp1, "123456", "2026-11-23T10:05:39-05:00", KeypadLockedOut);
    step("after cool-down, valid code", kp1, "123456", "2026-11-23T10:05:40-05:00", Tenant);
    step("after cool-down, one bad code", kp1, "000008", "2026-11-23T10:05:50-05:00", UnknownCredential);
    step("after cool-down, valid again", kp1, "123456", "2026-11-23T10:06:00-05:00", Tenant);
    // Failures older than the 15-minute window do not count.
    for (i, at) in [
        "2026-11-23T11:00:00-05:00",
        "2026-11-23T11:01:00-05:00",
        "2026-11-23T11:02:00-05:00",
        "2026-11-23T11:03:00-05:00",
    ]
    .into_iter()
    .enumerate()
    {
        step(&format!("window: bad {}", i + 1), kp3, "000009", at, UnknownCredential);
    }
    step("window: 5th bad, 16 min later", kp3, "000009", "2026-11-23T11:16:30-05:00", UnknownCredential);
    step("window: not locked", kp3, "123456", "2026-11-23T11:16:40-05:00", Tenant);

    let events = engine.store().events().read_from(0, 1000).expect("events");
    let lockouts: Vec<_> = events.iter().filter(|e| e.kind == "keypad_locked_out").collect();
    if lockouts.len() != 1 {
        failures.push(format!(
            "expected exactly one keypad_locked_out event, found {}",
            lockouts.len()
        ));
    } else {
        let e = lockouts[0];
        if e.payload["device"] != json!(kp1) {
            failures.push(format!("keypad_locked_out names device {}", e.payload["device"]));
        }
        if e.at != time("2026-11-23T10:00:40-05:00") {
            failures.push(format!("keypad_locked_out at {} (expected the 5th failure)", e.at));
        }
        if !e.local.ends_with("-05:00") {
            failures.push(format!("keypad_locked_out local time `{}` is not facility-local", e.local));
        }
    }
    let decisions = events
        .iter()
        .filter(|e| e.kind == "access_granted" || e.kind == "access_denied")
        .count();
    if decisions != steps {
        failures.push(format!("{decisions} access events for {steps} attempts"));
    }
    assert!(
        failures.is_empty(),
        "rule `keypad_lockout`: {} problems:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

// ------------------------------------------------------------------------------------------------
// offline_digital_keys
// ------------------------------------------------------------------------------------------------

fn key_payload(
    key_id: &str,
    user: &str,
    units: &[&str],
    entries: &[&str],
    issued: &str,
    not_before: &str,
    expires: &str,
) -> KeyPayload {
    KeyPayload {
        v: 2,
        site: KEY_SITE.into(),
        key_id: key_id.into(),
        user: user.into(),
        units: units.iter().map(|s| s.to_string()).collect(),
        entries: entries.iter().map(|s| s.to_string()).collect(),
        issued_at: time(issued),
        not_before: time(not_before),
        expires_at: time(expires),
    }
}

#[test]
#[rustfmt::skip] // one table row per line
fn offline_digital_keys() {
    let cloud = SigningKey::from_bytes(&[9; 32]);
    let public = cloud.verifying_key();
    let impostor = SigningKey::from_bytes(&[8; 32]);
    const ISSUED: &str = "2026-11-23T09:00:00-05:00";
    const EXPIRES: &str = "2026-11-23T21:00:00-05:00";

    let alice_p = key_payload("dk-alice-1", "alice", &["A-101"], &["gate-1", "door-a"], ISSUED, ISSUED, EXPIRES);
    let alice = digital_key::sign(&alice_p, &cloud);
    // A week-long key: only the facility's cap (1440 min after issue) ends it.
    let long = digital_key::sign(
        &key_payload("dk-alice-2", "alice", &["A-101"], &["gate-1"], ISSUED, ISSUED, "2026-11-30T09:00:00-05:00"),
        &cloud,
    );
    let later = digital_key::sign(
        &key_payload("dk-alice-3", "alice", &["A-101"], &["gate-1"], ISSUED, "2026-11-23T12:00:00-05:00", EXPIRES),
        &cloud,
    );
    let revoked = digital_key::sign(
        &key_payload("dk-revoked", "alice", &["A-101"], &["gate-1"], ISSUED, ISSUED, EXPIRES),
        &cloud,
    );
    let forged = digital_key::sign(&alice_p, &impostor);
    let bob = digital_key::sign(
        &key_payload("dk-bob-1", "bob", &["A-102", "A-103"], &["gate-1"], ISSUED, ISSUED, EXPIRES),
        &cloud,
    );
    let v1 = digital_key::sign(&KeyPayload { v: 1, ..alice_p.clone() }, &cloud);
    let v3 = digital_key::sign(&KeyPayload { v: 3, ..alice_p.clone() }, &cloud);
    // Issued (by the same cloud key) for another site, or naming no site.
    let elsewhere = digital_key::sign(&KeyPayload { site: "site-b".into(), ..alice_p.clone() }, &cloud);
    let no_site = digital_key::sign(&KeyPayload { site: String::new(), ..alice_p.clone() }, &cloud);
    // A payload swapped under a valid signature.
    let tampered = {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut env: serde_json::Value = serde_json::from_slice(&alice).expect("envelope");
        let other = KeyPayload {
            units: vec!["A-101".into(), "A-103".into()],
            ..alice_p.clone()
        };
        env["payload"] = json!(b64.encode(serde_json::to_vec(&other).expect("json")));
        serde_json::to_vec(&env).expect("json")
    };

    let mut f = Family::new("offline_digital_keys");
    let cases = [
        case("valid at its entry", key(&alice), Entry("gate-1"), MON_10, DigitalKey).units(&["A-101"]),
        case("valid at its zoned entry", key(&alice), Entry("door-a"), MON_10, DigitalKey),
        case("valid at its unit", key(&alice), Unit("A-101"), MON_10, DigitalKey).units(&["A-101"]),
        case("valid from not_before (inclusive)", key(&alice), Unit("A-101"), ISSUED, DigitalKey),
        case("an entry not in the key", key(&alice), Entry("exit-1"), MON_10, KeyNotForTarget),
        case("a unit not in the key", key(&alice), Unit("A-103"), MON_10, KeyNotForTarget),
        case("unknown unit", key(&alice), Unit("Z-999"), MON_10, UnknownUnit),
        case("unknown entry", key(&alice), Entry("gate-9"), MON_10, UnknownEntry),
        case("before its validity", key(&alice), Unit("A-101"), "2026-11-23T08:59:59-05:00", KeyNotYetValid),
        case("not_before later than issue", key(&later), Entry("gate-1"), MON_10, KeyNotYetValid),
        case("not_before reached", key(&later), Entry("gate-1"), "2026-11-23T12:00:00-05:00", DigitalKey),
        case("last second before its expires_at", key(&alice), Unit("A-101"), "2026-11-23T20:59:59-05:00", DigitalKey),
        case("expired by its own expires_at", key(&alice), Unit("A-101"), EXPIRES, KeyExpired),
        case("week-long key within the cap", key(&long), Entry("gate-1"), "2026-11-24T08:59:59-05:00", DigitalKey),
        case("week-long key past the facility cap", key(&long), Entry("gate-1"), "2026-11-24T09:00:00-05:00", KeyExpired),
        case("revoked by blacklist key_id", key(&revoked), Entry("gate-1"), MON_10, KeyRevoked),
        case("signed by another key", key(&forged), Entry("gate-1"), MON_10, KeyBadSignature),
        case("payload swapped under a signature", key(&tampered), Entry("gate-1"), MON_10, KeyBadSignature),
        case("garbage bytes", key(b"not a key at all"), Entry("gate-1"), MON_10, KeyMalformed),
        case("empty json object", key(b"{}"), Entry("gate-1"), MON_10, KeyMalformed),
        case("unknown payload version", key(&v3), Entry("gate-1"), MON_10, KeyMalformed),
        case("version 1 key (no site)", key(&v1), Entry("gate-1"), MON_10, KeyMalformed),
        case("a key for another site", key(&elsewhere), Entry("gate-1"), MON_10, KeyWrongSite),
        case("a key for another site, at its unit", key(&elsewhere), Unit("A-101"), MON_10, KeyWrongSite),
        case("a key naming no site", key(&no_site), Entry("gate-1"), MON_10, KeyWrongSite),
        case("overlocked unit named in the key", key(&bob), Unit("A-102"), MON_10, UnitOverlocked),
        case("occupied unit of the same key", key(&bob), Unit("A-103"), MON_10, DigitalKey),
    ];
    f.table("cloud key configured, use_blacklist ON", &fixture(), Some(&public), &cases);
    f.table(
        "use_blacklist OFF: key revocation still applies",
        &fixture_with(|s| s.facility.use_blacklist = false),
        Some(&public),
        &[
            case("revoked, blacklist off", key(&revoked), Entry("gate-1"), MON_10, KeyRevoked),
            case("valid, blacklist off", key(&alice), Entry("gate-1"), MON_10, DigitalKey),
        ],
    );
    f.table(
        "facility cap 60 minutes",
        &fixture_with(|s| s.facility.offline_key_expiration_minutes = 60),
        Some(&public),
        &[
            case("within the 60-minute cap", key(&alice), Unit("A-101"), "2026-11-23T09:59:59-05:00", DigitalKey),
            case("past the 60-minute cap", key(&alice), Unit("A-101"), MON_10, KeyExpired),
        ],
    );
    f.table(
        "no public key configured",
        &fixture(),
        None,
        &[
            case("valid key, no public key", key(&alice), Entry("gate-1"), MON_10, KeyVerificationUnavailable),
            case("garbage, no public key", key(b"xx"), Entry("gate-1"), MON_10, KeyVerificationUnavailable),
        ],
    );
    f.finish();
}

// ------------------------------------------------------------------------------------------------
// unknown_credentials_and_targets
// ------------------------------------------------------------------------------------------------

#[test]
#[rustfmt::skip] // one table row per line
fn unknown_credentials_and_targets() {
    assert_ne!(temp_code("2026-11-23"), "000000");
    let alice = code("123456");
    let mut f = Family::new("unknown_credentials_and_targets");
    f.table(
        "default fixture",
        &fixture(),
        None,
        &[
            case("unknown code", code("000000"), Entry("gate-1"), MON_10, UnknownCredential),
            case("code one digit longer", code("1234567"), Entry("gate-1"), MON_10, UnknownCredential),
            case("code one digit shorter", code("12345"), Entry("gate-1"), MON_10, UnknownCredential),
            case("empty code", code(""), Entry("gate-1"), MON_10, UnknownCredential),
            case("unknown code at unit", code("000000"), Unit("A-101"), MON_10, UnknownCredential),
            case("unknown fob", fob("FOB-NOPE"), Entry("gate-1"), MON_10, UnknownCredential),
            case("unknown card", card(Some(12), 1), Entry("gate-1"), MON_10, UnknownCredential),
            case("digital-key id presented as a fob", fob("dk-alice-1"), Entry("gate-1"), MON_10, UnknownCredential),
            case("valid code, unknown entry", alice.clone(), Entry("gate-9"), MON_10, UnknownEntry),
            case("valid code, unknown unit", alice.clone(), Unit("Z-999"), MON_10, UnknownUnit),
            case("unknown code, unknown entry", code("000000"), Entry("gate-9"), MON_10, UnknownEntry),
            case("unknown fob, unknown unit", fob("FOB-NOPE"), Unit("Z-999"), MON_10, UnknownUnit),
            case("unit id used as entry", alice.clone(), Entry("A-101"), MON_10, UnknownEntry),
            case("entry id used as unit", alice.clone(), Unit("gate-1"), MON_10, UnknownUnit),
        ],
    );
    f.finish();
}

// ------------------------------------------------------------------------------------------------
// cards
// ------------------------------------------------------------------------------------------------

#[test]
#[rustfmt::skip] // one table row per line
fn cards() {
    // alice: {facility_code 12, number 34567}; hana: {number 55555} (no facility code).
    let mut f = Family::new("cards");
    f.table(
        "default fixture",
        &fixture(),
        None,
        &[
            case("exact facility code", card(Some(12), 34567), Entry("gate-1"), MON_10, Tenant),
            case("exact facility code at unit", card(Some(12), 34567), Unit("A-101"), MON_10, Tenant),
            case("other facility code", card(Some(13), 34567), Entry("gate-1"), MON_10, UnknownCredential),
            case("other number", card(Some(12), 34568), Entry("gate-1"), MON_10, UnknownCredential),
            case("credential without fc, fc 1", card(Some(1), 55555), Entry("gate-1"), MON_10, Tenant),
            case("credential without fc, fc 200", card(Some(200), 55555), Entry("gate-1"), MON_10, Tenant),
            case("credential without fc, card without fc", card(None, 55555), Entry("gate-1"), MON_10, Tenant),
            case("credential without fc, other number", card(Some(1), 55556), Entry("gate-1"), MON_10, UnknownCredential),
            case("card outside hours", card(Some(12), 34567), Entry("gate-1"), "2026-11-23T23:00:00-05:00", OutsideSchedule),
        ],
    );
    f.finish();
}

// ------------------------------------------------------------------------------------------------
// Rules DOMAIN.md does not settle on its own, decided from the reference manual.
// ------------------------------------------------------------------------------------------------

/// reference/smart-entry-manual.txt ("Transferring to a New Unit"): "Shared Managers/Employees
/// will have access to the vacating unit until the transfer period expires (48 hours). However,
/// they will not be able to access the new unit until the tenant ... adds them as shared users
/// again". decide() gives every shared user of the old unit the new unit.
#[test]
#[rustfmt::skip] // one table row per line
fn transfers_manager_share_not_extended_to_new_unit() {
    let mut f = Family::new("transfers (manager share)");
    f.table(
        "48 h transfer",
        &fixture(),
        None,
        &[
            case("manager share: old unit during transfer", code("240007"), Unit("A-106"), "2026-11-24T10:00:00-05:00", SharedUser),
            case("manager share: new unit during transfer", code("240007"), Unit("B-206"), "2026-11-24T10:00:00-05:00", NoAccess),
        ],
    );
    f.finish();
}

/// DOMAIN.md: "Gatelocked: tenant is locked out of the whole facility" and "when ON, one
/// overlocked unit keeps them [a tenant with several units] out of the gate too". decide() counts
/// units *shared with* a user like units they rent, so a tenant in good standing who was given a
/// share of someone else's gatelocked (or, with restrict ON, overlocked) unit is refused at the
/// gate and at their own unit.
#[test]
#[rustfmt::skip] // one table row per line
fn shared_units_do_not_make_a_user_delinquent() {
    // hana rents B-205 (occupied). Restrict OFF: she also holds a share of greg's gatelocked
    // B-203. Restrict ON: she holds a share of bob's overlocked A-102 instead.
    let shared = |restrict: bool| {
        fixture_with(|s| {
            s.facility.restrict_overlocked_entry = restrict;
            let (id, unit) = if restrict { ("s-hana-a102", "A-102") } else { ("s-hana-b203", "B-203") };
            s.shares.push(
                serde_json::from_value(json!({ "id": id, "unit": unit, "user": "hana" }))
                    .expect("share"),
            );
        })
    };
    let hana = code("240004");
    let mut f = Family::new("shared delinquent units");
    f.table(
        "restrict OFF",
        &shared(false),
        None,
        &[
            case("own occupied unit, at gate", hana.clone(), Entry("gate-1"), MON_10, Tenant),
            case("own occupied unit", hana.clone(), Unit("B-205"), MON_10, Tenant),
            case("the shared gatelocked unit", hana.clone(), Unit("B-203"), MON_10, Gatelocked),
        ],
    );
    f.table(
        "restrict ON",
        &shared(true),
        None,
        &[
            case("own occupied unit, at gate", hana.clone(), Entry("gate-1"), MON_10, Tenant),
            case("own occupied unit", hana.clone(), Unit("B-205"), MON_10, Tenant),
            case("the shared overlocked unit", hana.clone(), Unit("A-102"), MON_10, UnitOverlocked),
        ],
    );
    f.finish();
}
