//! Properties of `gatehouse::policy::decide` over random facilities:
//!
//! 1. while *Use Blacklist* is ON, a blacklisted fob is never granted, whatever the unit statuses,
//!    roles, schedules, shares, transfers, time and target, even when the fob is also a valid
//!    credential;
//! 2. a unit whose status is overlock is never opened, for any user and any credential (code,
//!    fob, card, temporary code, or a valid digital key naming that unit), at any time.
//!
//! Each random facility has 6 units and 8 users; see [`World`].

use chrono::{DateTime, Duration, Utc};
use ed25519_dalek::SigningKey;
use gatehouse::policy::digital_key::{self, KeyPayload};
use gatehouse::policy::{Context, Decision, Direction, Presented, Reason, Request, Target, decide};
use gatehouse::site::{CodeKey, Site};
use gatehouse::sync::{Card, Snapshot};
use proptest::prelude::*;
use serde_json::{Value, json};

const N_UNITS: usize = 6;
const N_USERS: usize = 8;
const STATUSES: [&str; 6] = [
    "occupied",
    "available",
    "overlock",
    "pending_auction",
    "gatelocked",
    "pre_let",
];
const ROLES: [&str; 6] = [
    "tenant",
    "shared_user",
    "employee",
    "manager",
    "vendor",
    "auction_winner",
];
/// A user's schedule: none (the default), or one of these.
const SCHEDULES: [Option<&str>; 4] = [None, Some("always"), Some("gate-hours"), Some("office")];
const ENTRIES: [&str; 4] = ["gate-1", "exit-1", "door-a", "elevator-b"];
const ZONES: [&str; 2] = ["zone-a", "zone-b"];
const TEMP_SECRET_HEX: &str = "64656d6f2d74656d706f726172792d636f64652d736563726574";
const CODE_KEY: [u8; 32] = [1; 32];
/// 2026-01-01T00:00:00Z; random times fall in the 366 days after it (both DST changes included).
const T0: i64 = 1_767_225_600;
const SPAN: i64 = 366 * 86_400;

#[derive(Debug, Clone)]
struct UnitGen {
    status: usize,
    tenant: Option<usize>,
    winner: Option<usize>,
    zone: Option<usize>,
}

#[derive(Debug, Clone)]
struct UserGen {
    role: usize,
    schedule: usize,
    zones: Vec<usize>,
    expires: Option<i64>,
    fob_blacklisted: bool,
}

#[derive(Debug, Clone)]
struct ShareGen {
    unit: usize,
    user: usize,
    starts: Option<i64>,
    length: Option<i64>,
}

#[derive(Debug, Clone)]
struct TransferGen {
    user: usize,
    from: usize,
    to: usize,
    expires: i64,
}

#[derive(Debug, Clone)]
struct World {
    units: Vec<UnitGen>,
    users: Vec<UserGen>,
    shares: Vec<ShareGen>,
    transfers: Vec<TransferGen>,
    restrict: bool,
    use_blacklist: bool,
    fob_schedule_enabled: bool,
    default_schedule: bool,
    grace: u32,
    temporary_code: bool,
    /// Seconds after T0.
    at: i64,
}

fn unit_gen() -> impl Strategy<Value = UnitGen> {
    (
        0..STATUSES.len(),
        proptest::option::of(0..N_USERS),
        proptest::option::of(0..N_USERS),
        proptest::option::of(0..ZONES.len()),
    )
        .prop_map(|(status, tenant, winner, zone)| UnitGen {
            status,
            tenant,
            winner,
            zone,
        })
}

fn user_gen() -> impl Strategy<Value = UserGen> {
    (
        0..ROLES.len(),
        0..SCHEDULES.len(),
        proptest::collection::vec(0..ZONES.len(), 0..=2),
        proptest::option::of(0..SPAN),
        any::<bool>(),
    )
        .prop_map(
            |(role, schedule, zones, expires, fob_blacklisted)| UserGen {
                role,
                schedule,
                zones,
                expires,
                fob_blacklisted,
            },
        )
}

fn world() -> impl Strategy<Value = World> {
    let shares = proptest::collection::vec(
        (
            0..N_UNITS,
            0..N_USERS,
            proptest::option::of(0..SPAN),
            proptest::option::of(1..SPAN),
        )
            .prop_map(|(unit, user, starts, length)| ShareGen {
                unit,
                user,
                starts,
                length,
            }),
        0..6,
    );
    let transfers = proptest::collection::vec(
        (0..N_USERS, 0..N_UNITS, 0..N_UNITS, 0..SPAN).prop_map(|(user, from, to, expires)| {
            TransferGen {
                user,
                from,
                to,
                expires,
            }
        }),
        0..3,
    );
    (
        proptest::collection::vec(unit_gen(), N_UNITS),
        proptest::collection::vec(user_gen(), N_USERS),
        shares,
        transfers,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(0u32), Just(30), Just(180)],
        any::<bool>(),
        0..SPAN,
    )
        .prop_map(
            |(
                units,
                users,
                shares,
                transfers,
                restrict,
                use_blacklist,
                fob_schedule_enabled,
                default_schedule,
                grace,
                temporary_code,
                at,
            )| World {
                units,
                users,
                shares,
                transfers,
                restrict,
                use_blacklist,
                fob_schedule_enabled,
                default_schedule,
                grace,
                temporary_code,
                at,
            },
        )
}

fn ts(t: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(T0 + t, 0).expect("in range")
}

fn rfc(t: i64) -> String {
    ts(t).to_rfc3339()
}

fn unit_id(i: usize) -> String {
    format!("U-{i}")
}
fn user_id(i: usize) -> String {
    format!("user-{i}")
}
fn user_code(i: usize) -> String {
    format!("{}", 314_150 + i)
}
fn user_fob(i: usize) -> String {
    format!("FOB-{i}")
}
fn user_card(i: usize) -> Card {
    Card {
        facility_code: Some(10),
        number: 1000 + i as u64,
    }
}
const GHOST_FOB: &str = "FOB-GHOST";

impl World {
    fn snapshot(&self) -> Snapshot {
        let units: Vec<Value> = self
            .units
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let mut v = json!({ "id": unit_id(i), "status": STATUSES[u.status] });
                if let Some(t) = u.tenant {
                    v["tenant"] = json!(user_id(t));
                }
                if let Some(w) = u.winner {
                    v["auction_winner"] = json!(user_id(w));
                }
                if let Some(z) = u.zone {
                    v["zone"] = json!(ZONES[z]);
                }
                v
            })
            .collect();
        let users: Vec<Value> = self
            .users
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let mut v = json!({ "id": user_id(i), "role": ROLES[u.role] });
                if let Some(s) = SCHEDULES[u.schedule] {
                    v["schedule"] = json!(s);
                }
                let mut zones: Vec<&str> = u.zones.iter().map(|&z| ZONES[z]).collect();
                zones.sort();
                zones.dedup();
                if !zones.is_empty() {
                    v["zones"] = json!(zones);
                }
                // Vendors need an expiry date.
                let expires = match (u.expires, ROLES[u.role]) {
                    (Some(e), _) => Some(e),
                    (None, "vendor") => Some(SPAN),
                    (None, _) => None,
                };
                if let Some(e) = expires {
                    v["expires_at"] = json!(rfc(e));
                }
                v
            })
            .collect();
        let mut credentials = Vec::new();
        for i in 0..N_USERS {
            let (u, c) = (user_id(i), user_card(i));
            credentials
                .push(json!({ "id": format!("c{i}-code"), "user": u, "code": user_code(i) }));
            credentials.push(json!({ "id": format!("c{i}-fob"), "user": u, "fob": user_fob(i) }));
            credentials.push(json!({ "id": format!("c{i}-card"), "user": u,
                "card": { "facility_code": c.facility_code, "number": c.number } }));
        }
        let shares: Vec<Value> = self
            .shares
            .iter()
            .enumerate()
            .map(|(n, s)| {
                let mut v = json!({ "id": format!("s{n}"), "unit": unit_id(s.unit), "user": user_id(s.user) });
                if let Some(a) = s.starts {
                    v["starts_at"] = json!(rfc(a));
                }
                if let Some(l) = s.length {
                    v["ends_at"] = json!(rfc(s.starts.unwrap_or(0) + l));
                }
                v
            })
            .collect();
        let transfers: Vec<Value> = self
            .transfers
            .iter()
            .enumerate()
            .filter(|(_, t)| t.from != t.to)
            .map(|(n, t)| {
                json!({ "id": format!("t{n}"), "user": user_id(t.user), "from_unit": unit_id(t.from),
                        "to_unit": unit_id(t.to), "expires_at": rfc(t.expires) })
            })
            .collect();
        let mut blacklist = vec![json!({ "id": "bl-ghost", "fob": GHOST_FOB })];
        for (i, u) in self.users.iter().enumerate() {
            if u.fob_blacklisted {
                blacklist.push(json!({ "id": format!("bl{i}"), "fob": user_fob(i) }));
            }
        }
        let v = json!({
            "schema_version": 1,
            "kind": "snapshot",
            "version": 1,
            "facility": {
                "time_zone": "America/New_York",
                "default_schedule": if self.default_schedule { Some("gate-hours") } else { None },
                "grace_period_minutes": self.grace,
                "restrict_overlocked_entry": self.restrict,
                "use_blacklist": self.use_blacklist,
                "fob_schedule_enabled": self.fob_schedule_enabled,
                "fob_schedule": "fob-hours",
                "temporary_code_enabled": self.temporary_code,
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
                    { "days": ["mon","tue","wed","thu","fri"], "start": "09:00", "end": "17:00" },
                    { "days": ["sat"], "start": "01:00", "end": "02:30" } ] }
            ],
            "entries": [
                { "id": "gate-1", "kind": "gate" },
                { "id": "exit-1", "kind": "exit" },
                { "id": "door-a", "kind": "door", "zone": "zone-a" },
                { "id": "elevator-b", "kind": "elevator", "zone": "zone-b" }
            ],
            "units": units,
            "users": users,
            "credentials": credentials,
            "shares": shares,
            "transfers": transfers,
            "blacklist": blacklist
        });
        serde_json::from_value(v).expect("generated snapshot is well-formed")
    }

    fn site(&self) -> Site {
        Site::from_snapshot(&self.snapshot(), &CodeKey::from_bytes(CODE_KEY))
            .expect("generated snapshot is accepted")
    }
}

/// Every entry and every unit of a generated facility.
fn targets(unit_ids: &[String]) -> Vec<Target<'_>> {
    let mut t: Vec<Target<'_>> = ENTRIES.iter().map(|e| Target::Entry(e)).collect();
    t.extend(unit_ids.iter().map(|u| Target::Unit(u)));
    t
}

fn ask(
    site: &Site,
    ctx: &Context,
    credential: Presented,
    target: Target,
    direction: Direction,
    at: DateTime<Utc>,
) -> Decision {
    decide(
        site,
        ctx,
        &Request {
            credential,
            target,
            direction,
        },
        at,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// While Use Blacklist is ON, a blacklisted fob is never granted.
    #[test]
    fn blacklisted_fob_never_granted(mut w in world(), extra_times in proptest::collection::vec(0..SPAN, 3)) {
        w.use_blacklist = true;
        let site = w.site();
        let code_key = CodeKey::from_bytes(CODE_KEY);
        let ctx = Context { code_key: &code_key, digital_key_public: None };
        let mut fobs: Vec<String> = vec![GHOST_FOB.to_string()];
        fobs.extend((0..N_USERS).filter(|&i| w.users[i].fob_blacklisted).map(user_fob));
        let unit_ids: Vec<String> = (0..N_UNITS).map(unit_id).collect();
        let mut times = vec![w.at];
        times.extend(extra_times);
        for &t in &times {
            for f in &fobs {
                for target in targets(&unit_ids) {
                    for dir in [Direction::In, Direction::Out] {
                        let d = ask(&site, &ctx, Presented::Fob(f), target, dir, ts(t));
                        prop_assert!(
                            !d.granted && d.reason == Reason::Blacklisted,
                            "blacklisted fob {} at {:?} {:?} at {} got {:?}", f, target, dir, rfc(t), d
                        );
                    }
                }
            }
        }
    }

    /// An overlocked unit is never opened: every role, every kind of credential, any time.
    #[test]
    fn overlock_denies_every_role(mut w in world(), forced in 0..N_UNITS) {
        w.units[forced].status = 2; // at least one overlocked unit
        prop_assert_eq!(STATUSES[2], "overlock");
        let site = w.site();
        let code_key = CodeKey::from_bytes(CODE_KEY);
        let cloud = SigningKey::from_bytes(&[9; 32]);
        let public = cloud.verifying_key();
        let keys = digital_key::KeyVerifier::new(public, "site");
        let ctx = Context { code_key: &code_key, digital_key_public: Some(&keys) };
        let at = ts(w.at);
        let secret = hex::decode(TEMP_SECRET_HEX).expect("hex");
        let temp = gatehouse::policy::tempcode::code_at(&secret, chrono_tz::America::New_York, at);
        let overlocked: Vec<usize> = (0..N_UNITS).filter(|&i| STATUSES[w.units[i].status] == "overlock").collect();
        for &u in &overlocked {
            let uid = unit_id(u);
            let target = Target::Unit(&uid);
            let d = ask(&site, &ctx, Presented::Code(&temp), target, Direction::In, at);
            prop_assert!(!d.granted, "temporary code opened overlocked {}: {:?}", uid, d);
            for i in 0..N_USERS {
                let (code, fob, card) = (user_code(i), user_fob(i), user_card(i));
                for cred in [Presented::Code(&code), Presented::Fob(&fob), Presented::Card(card)] {
                    let d = ask(&site, &ctx, cred, target, Direction::In, at);
                    prop_assert!(!d.granted, "{} ({}) with {:?} opened overlocked {}: {:?}",
                        user_id(i), ROLES[w.users[i].role], cred, uid, d);
                }
                // A valid, unexpired, unrevoked key naming the unit (and every other unit).
                let payload = KeyPayload {
                    v: 2,
                    site: "site".into(),
                    key_id: format!("dk-{i}-{u}"),
                    user: user_id(i),
                    units: (0..N_UNITS).map(unit_id).collect(),
                    entries: ENTRIES.iter().map(|e| e.to_string()).collect(),
                    issued_at: at - Duration::minutes(10),
                    not_before: at - Duration::minutes(10),
                    expires_at: at + Duration::minutes(10),
                };
                let token = digital_key::sign(&payload, &cloud);
                let d = ask(&site, &ctx, Presented::DigitalKey(&token), target, Direction::In, at);
                prop_assert!(!d.granted, "{}'s digital key opened overlocked {}: {:?}", user_id(i), uid, d);
                prop_assert_eq!(d.reason, Reason::UnitOverlocked, "{:?}", d);
            }
            // A key for a user the site data does not know yet rests on the key alone: it opens
            // the gate, so the refusal at the overlocked unit is the overlock itself.
            let payload = KeyPayload {
                v: 2,
                site: "site".into(),
                key_id: format!("dk-new-{u}"),
                user: "not-yet-synced".into(),
                units: (0..N_UNITS).map(unit_id).collect(),
                entries: ENTRIES.iter().map(|e| e.to_string()).collect(),
                issued_at: at - Duration::minutes(10),
                not_before: at - Duration::minutes(10),
                expires_at: at + Duration::minutes(10),
            };
            let token = digital_key::sign(&payload, &cloud);
            let d = ask(&site, &ctx, Presented::DigitalKey(&token), target, Direction::In, at);
            prop_assert_eq!(d.reason, Reason::UnitOverlocked, "{:?}", d);
            let d = ask(&site, &ctx, Presented::DigitalKey(&token), Target::Entry("gate-1"), Direction::In, at);
            prop_assert!(d.granted && d.reason == Reason::DigitalKey, "key not usable at the gate: {:?}", d);
        }
    }
}
