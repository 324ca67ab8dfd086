//! Access decisions: a pure function from (site data, credential presented, where, when) to a
//! [`Decision`]. No I/O, no clock, no database handle: time is a parameter, the site is data.
//! Keypad lockout state ([`lockout::Lockouts`]) is kept by the caller and consulted before this.
//!
//! The rules are those of shared/DOMAIN.md "Access rules"; docs/access-rules.md states each rule
//! as implemented, and lists every [`Reason`].

pub mod digital_key;
pub mod lockout;
pub mod schedule;
pub mod tempcode;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::site::{ALWAYS_OPEN, CodeKey, CompiledSchedule, CredValue, Site, Tables};
use crate::sync::{Card, EntryKind, Role, Unit, UnitStatus, User};

/// What was presented.
#[derive(Debug, Clone, Copy)]
pub enum Presented<'a> {
    /// Keypad digits without the final `#`.
    Code(&'a str),
    /// A fob's tracking id.
    Fob(&'a str),
    Card(Card),
    /// A signed offline digital key, as its JSON bytes.
    DigitalKey(&'a [u8]),
}

impl Presented<'_> {
    pub fn kind(&self) -> &'static str {
        match self {
            Presented::Code(_) => "code",
            Presented::Fob(_) => "fob",
            Presented::Card(_) => "card",
            Presented::DigitalKey(_) => "digital_key",
        }
    }
}

/// Where access is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    Entry(&'a str),
    Unit(&'a str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    In,
    Out,
}

#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub credential: Presented<'a>,
    pub target: Target<'a>,
    pub direction: Direction,
}

/// Inputs a decision needs besides the site: keys.
pub struct Context<'a> {
    pub code_key: &'a CodeKey,
    /// The cloud's public key for offline digital keys and this gateway's site id (a key must
    /// name it); without it, keys are refused.
    pub digital_key_public: Option<&'a digital_key::KeyVerifier>,
}

/// Why access was granted or denied. The snake_case names are stable: the cloud, logs and
/// docs/access-rules.md use them. Add new ones at the end; never rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    // Granted.
    Tenant,
    SharedUser,
    Transfer,
    AuctionWinner,
    Employee,
    Vendor,
    TemporaryCode,
    DigitalKey,
    ExitGracePeriod,
    // Denied.
    UnknownCredential,
    UnknownEntry,
    UnknownUnit,
    KeypadLockedOut,
    Blacklisted,
    UserExpired,
    ZoneNotAllowed,
    OutsideSchedule,
    UnitOverlocked,
    Overlocked,
    OverlockedRestricted,
    Gatelocked,
    PreLet,
    NoAccess,
    ShareNotActive,
    TransferExpired,
    KeyMalformed,
    KeyBadSignature,
    KeyVerificationUnavailable,
    KeyRevoked,
    KeyNotYetValid,
    KeyExpired,
    KeyNotForTarget,
    /// An authentic key issued for another site.
    KeyWrongSite,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        use Reason::*;
        match self {
            Tenant => "tenant",
            SharedUser => "shared_user",
            Transfer => "transfer",
            AuctionWinner => "auction_winner",
            Employee => "employee",
            Vendor => "vendor",
            TemporaryCode => "temporary_code",
            DigitalKey => "digital_key",
            ExitGracePeriod => "exit_grace_period",
            UnknownCredential => "unknown_credential",
            UnknownEntry => "unknown_entry",
            UnknownUnit => "unknown_unit",
            KeypadLockedOut => "keypad_locked_out",
            Blacklisted => "blacklisted",
            UserExpired => "user_expired",
            ZoneNotAllowed => "zone_not_allowed",
            OutsideSchedule => "outside_schedule",
            UnitOverlocked => "unit_overlocked",
            Overlocked => "overlocked",
            OverlockedRestricted => "overlocked_restricted",
            Gatelocked => "gatelocked",
            PreLet => "pre_let",
            NoAccess => "no_access",
            ShareNotActive => "share_not_active",
            TransferExpired => "transfer_expired",
            KeyMalformed => "key_malformed",
            KeyBadSignature => "key_bad_signature",
            KeyVerificationUnavailable => "key_verification_unavailable",
            KeyRevoked => "key_revoked",
            KeyNotYetValid => "key_not_yet_valid",
            KeyExpired => "key_expired",
            KeyNotForTarget => "key_not_for_target",
            KeyWrongSite => "key_wrong_site",
        }
    }

    pub fn is_grant(self) -> bool {
        use Reason::*;
        matches!(
            self,
            Tenant
                | SharedUser
                | Transfer
                | AuctionWinner
                | Employee
                | Vendor
                | TemporaryCode
                | DigitalKey
                | ExitGracePeriod
        )
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome: granted or not, why, for whom, and the units concerned (the units that gave
/// access, or the ones that caused the refusal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub granted: bool,
    pub reason: Reason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub units: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
}

impl Decision {
    fn new(reason: Reason) -> Self {
        Decision {
            granted: reason.is_grant(),
            reason,
            user: None,
            units: Vec::new(),
            credential_id: None,
        }
    }

    pub fn denied(reason: Reason) -> Self {
        debug_assert!(!reason.is_grant());
        Decision::new(reason)
    }

    fn units(mut self, units: impl IntoIterator<Item = String>) -> Self {
        self.units = units.into_iter().collect();
        self
    }
}

/// Decides one request. Pure: same inputs, same answer.
pub fn decide(site: &Site, ctx: &Context, req: &Request, at: DateTime<Utc>) -> Decision {
    let t = &*site.tables;
    let direction = match req.target {
        Target::Entry(id) => match t.entries.get(id) {
            None => return Decision::denied(Reason::UnknownEntry),
            Some(e) if e.kind == EntryKind::Exit => Direction::Out,
            Some(_) => req.direction,
        },
        Target::Unit(id) => {
            if !t.units.contains_key(id) {
                return Decision::denied(Reason::UnknownUnit);
            }
            Direction::In
        }
    };
    let f = &t.facility;
    let blacklist_on = f.wire.use_blacklist;
    let cred = match req.credential {
        Presented::Code(code) => {
            match site
                .creds
                .get_by_value(&CredValue::Code(ctx.code_key.hash(code)))
            {
                Some(c) => c,
                None => {
                    return match &f.temporary_code_secret {
                        Some(secret)
                            if f.wire.temporary_code_enabled
                                && tempcode::matches(secret, f.tz, at, code) =>
                        {
                            decide_temporary_code(t, req.target, direction, at)
                        }
                        _ => Decision::denied(Reason::UnknownCredential),
                    };
                }
            }
        }
        Presented::Fob(id) => {
            if blacklist_on && t.blacklisted_fobs.contains(id) {
                return Decision::denied(Reason::Blacklisted);
            }
            match site.creds.get_by_value(&CredValue::Fob(id.into())) {
                Some(c) => c,
                None => return Decision::denied(Reason::UnknownCredential),
            }
        }
        Presented::Card(card) => {
            let any_fc = Card {
                facility_code: None,
                ..card
            };
            if blacklist_on
                && (t.blacklisted_cards.contains(&card) || t.blacklisted_cards.contains(&any_fc))
            {
                return Decision::denied(Reason::Blacklisted);
            }
            match site
                .creds
                .get_by_value(&CredValue::Card(card.into()))
                .or_else(|| site.creds.get_by_value(&CredValue::Card(any_fc.into())))
            {
                Some(c) => c,
                None => return Decision::denied(Reason::UnknownCredential),
            }
        }
        Presented::DigitalKey(token) => {
            return decide_digital_key(t, ctx, token, req.target, direction, at);
        }
    };
    let Some(user) = t.users.get(&*cred.user) else {
        // Cannot happen: every credential's user is checked on the way in.
        return Decision::denied(Reason::UnknownCredential);
    };
    let is_fob = matches!(req.credential, Presented::Fob(_));
    let mut d = decide_user(t, user, is_fob, req.target, direction, at);
    d.user = Some(user.id.clone());
    d.credential_id = Some(cred.id.to_string());
    d
}

/// The schedule that applies to a user presenting this kind of credential.
fn user_schedule<'t>(t: &'t Tables, user: &User, is_fob: bool) -> &'t CompiledSchedule {
    let f = &t.facility.wire;
    let id = if is_fob && f.fob_schedule_enabled {
        f.fob_schedule.as_ref()
    } else {
        user.schedule.as_ref().or(f.default_schedule.as_ref())
    };
    match id {
        Some(id) => t.schedules.get(id).map(|(_, c)| c).unwrap_or(&ALWAYS_OPEN),
        None => &ALWAYS_OPEN,
    }
}

/// Applies the schedule to an otherwise granted decision.
fn within_schedule(
    t: &Tables,
    sched: &CompiledSchedule,
    direction: Direction,
    at: DateTime<Utc>,
    granted: Decision,
) -> Decision {
    let tz = t.facility.tz;
    if schedule::is_open(sched, tz, at) {
        return granted;
    }
    if direction == Direction::Out
        && schedule::closed_within(sched, tz, at, t.facility.wire.grace_period_minutes)
    {
        return Decision {
            reason: Reason::ExitGracePeriod,
            ..granted
        };
    }
    Decision {
        granted: false,
        reason: Reason::OutsideSchedule,
        ..granted
    }
}

fn decide_temporary_code(
    t: &Tables,
    target: Target,
    dir: Direction,
    at: DateTime<Utc>,
) -> Decision {
    // The temporary code opens keypads at entries, within the facility's gate hours.
    if let Target::Unit(_) = target {
        return Decision::denied(Reason::NoAccess);
    }
    let sched = match &t.facility.wire.default_schedule {
        Some(id) => t.schedules.get(id).map(|(_, c)| c).unwrap_or(&ALWAYS_OPEN),
        None => &ALWAYS_OPEN,
    };
    within_schedule(t, sched, dir, at, Decision::new(Reason::TemporaryCode))
}

/// How a user holds a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Tenant,
    Share,
    Transfer,
    Auction,
}

struct Held<'t> {
    unit: &'t Unit,
    via: Via,
}

impl Held<'_> {
    /// Units the user rents: their status (gatelocked, overlocked) is the user's standing.
    /// A unit merely shared with someone says nothing about that person.
    fn rented(&self) -> bool {
        matches!(self.via, Via::Tenant | Via::Transfer)
    }
}

/// What a user holds at `at`, plus hints for the refusal reason when they hold nothing.
struct Holdings<'t> {
    held: Vec<Held<'t>>,
    inactive_share: bool,
    expired_transfer_units: Vec<&'t str>,
}

fn holdings<'t>(t: &'t Tables, user: &User, at: DateTime<Utc>) -> Holdings<'t> {
    let mut h = Holdings {
        held: Vec::new(),
        inactive_share: false,
        expired_transfer_units: Vec::new(),
    };
    let mut active_transfer_from: Vec<&str> = Vec::new();
    let mut expired_to: Vec<&str> = Vec::new();
    for tid in t
        .transfers_by_user
        .get(user.id.as_str())
        .into_iter()
        .flatten()
    {
        let tr = &t.transfers[tid];
        if at < tr.expires_at {
            for u in [&tr.from_unit, &tr.to_unit] {
                h.held.push(Held {
                    unit: &t.units[u],
                    via: Via::Transfer,
                });
            }
            active_transfer_from.push(&tr.from_unit);
        } else {
            expired_to.push(&tr.to_unit);
            h.expired_transfer_units.push(&tr.from_unit);
        }
    }
    for uid in t.units_by_user.get(user.id.as_str()).into_iter().flatten() {
        let unit = &t.units[uid];
        if unit.tenant.as_deref() == Some(user.id.as_str()) {
            // After a transfer expires the old unit is no longer the tenant's, even if the
            // property-management data has not caught up yet.
            let expired_from = h.expired_transfer_units.contains(&uid.as_str())
                && !active_transfer_from.contains(&uid.as_str());
            if !expired_from && !h.held.iter().any(|x| x.unit.id == *uid) {
                h.held.push(Held {
                    unit,
                    via: Via::Tenant,
                });
            }
        }
        if unit.auction_winner.as_deref() == Some(user.id.as_str()) {
            h.held.push(Held {
                unit,
                via: Via::Auction,
            });
        }
    }
    // After the transfer period only the new unit remains, until the cloud's next sync turns
    // the transfer into a plain tenancy.
    for to in expired_to {
        // ...and only while the new unit is not someone else's.
        let unit = &t.units[to];
        let theirs = unit.tenant.as_deref().is_none_or(|x| x == user.id);
        if theirs && !h.held.iter().any(|x| x.unit.id == to) {
            h.held.push(Held {
                unit: &t.units[to],
                via: Via::Transfer,
            });
        }
    }
    for sid in t.shares_by_user.get(user.id.as_str()).into_iter().flatten() {
        let s = &t.shares[sid];
        // Shares of a unit left by an expired transfer end with it: the tenant re-adds them
        // on the new unit.
        let left_behind = t
            .transfers
            .values()
            .any(|tr| tr.from_unit == s.unit && tr.expires_at <= at);
        let active =
            s.starts_at.is_none_or(|a| a <= at) && s.ends_at.is_none_or(|b| at < b) && !left_behind;
        if !active {
            h.inactive_share = true;
            continue;
        }
        h.held.push(Held {
            unit: &t.units[&s.unit],
            via: Via::Share,
        });
        // During a transfer, the tenant's shared users reach the new unit too; shared
        // managers and employees do not (they are re-added once the move is done).
        if user.role != Role::SharedUser {
            continue;
        }
        for tr in t.transfers.values() {
            if tr.from_unit == s.unit && at < tr.expires_at {
                h.held.push(Held {
                    unit: &t.units[&tr.to_unit],
                    via: Via::Share,
                });
            }
        }
    }
    // Same data, same answer: report reasons in a fixed order, not hash-map order.
    h.held
        .sort_by(|a, b| (&a.unit.id, a.via as u8).cmp(&(&b.unit.id, b.via as u8)));
    h
}

/// May this holding open the unit given its status? `Ok` carries the grant reason.
fn status_allows(held: &Held) -> Result<Reason, Reason> {
    use UnitStatus::*;
    match (held.via, held.unit.status) {
        (_, Overlock) => Err(Reason::UnitOverlocked),
        (_, Gatelocked) => Err(Reason::Gatelocked),
        (Via::Tenant, Occupied) => Ok(Reason::Tenant),
        (Via::Share, Occupied) => Ok(Reason::SharedUser),
        (Via::Auction, PendingAuction) => Ok(Reason::AuctionWinner),
        // A transfer holds both units whatever the property-management data says meanwhile.
        (Via::Transfer, Occupied | Available | PreLet) => Ok(Reason::Transfer),
        (Via::Tenant | Via::Share, PreLet) => Err(Reason::PreLet),
        _ => Err(Reason::NoAccess),
    }
}

fn decide_user(
    t: &Tables,
    user: &User,
    is_fob: bool,
    target: Target,
    dir: Direction,
    at: DateTime<Utc>,
) -> Decision {
    // An expired user may still leave (through an entry, within the schedule and grace period).
    let leaving = dir == Direction::Out && matches!(target, Target::Entry(_));
    if user.expires_at.is_some_and(|e| e <= at) && !leaving {
        return Decision::denied(Reason::UserExpired);
    }
    let in_zones = |zone: &Option<String>| match zone {
        Some(z) => user.zones.is_empty() || user.zones.contains(z),
        None => true,
    };
    let sched = user_schedule(t, user, is_fob);
    let staff_reason = match user.role {
        Role::Employee | Role::Manager => Some(Reason::Employee),
        Role::Vendor => Some(Reason::Vendor),
        _ => None,
    };
    let restrict = t.facility.wire.restrict_overlocked_entry;
    match target {
        Target::Entry(eid) => {
            let entry = &t.entries[eid];
            if !in_zones(&entry.zone) {
                return Decision::denied(Reason::ZoneNotAllowed);
            }
            if let Some(r) = staff_reason {
                return within_schedule(t, sched, dir, at, Decision::new(r));
            }
            let h = holdings(t, user, at);
            // Leaving is never blocked by a tenant's standing: a delinquent tenant already
            // inside may exit (the schedule and grace period still apply).
            if dir == Direction::Out
                && let Some(x) = h.held.first()
            {
                let reason = match x.via {
                    Via::Tenant => Reason::Tenant,
                    Via::Share => Reason::SharedUser,
                    Via::Transfer => Reason::Transfer,
                    Via::Auction => Reason::AuctionWinner,
                };
                let mut units: Vec<String> = h.held.iter().map(|x| x.unit.id.clone()).collect();
                units.sort();
                units.dedup();
                return within_schedule(t, sched, dir, at, Decision::new(reason).units(units));
            }
            if let Some(g) = h
                .held
                .iter()
                .find(|x| x.rented() && x.unit.status == UnitStatus::Gatelocked)
            {
                return Decision::denied(Reason::Gatelocked).units([g.unit.id.clone()]);
            }
            let overlocked: Vec<String> = h
                .held
                .iter()
                .filter(|x| x.unit.status == UnitStatus::Overlock)
                .map(|x| x.unit.id.clone())
                .collect();
            if restrict
                && h.held
                    .iter()
                    .any(|x| x.rented() && x.unit.status == UnitStatus::Overlock)
            {
                return Decision::denied(Reason::OverlockedRestricted).units(overlocked);
            }
            let mut good: Vec<(&Held, Reason)> = Vec::new();
            let mut first_err = None;
            for x in &h.held {
                match status_allows(x) {
                    Ok(r) => good.push((x, r)),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            if good.is_empty() {
                let reason = if !overlocked.is_empty() {
                    return Decision::denied(Reason::Overlocked).units(overlocked);
                } else if let Some(e) = first_err {
                    e
                } else if !h.expired_transfer_units.is_empty() {
                    Reason::TransferExpired
                } else if h.inactive_share {
                    Reason::ShareNotActive
                } else {
                    Reason::NoAccess
                };
                return Decision::denied(reason);
            }
            // A zoned entry needs a unit in that zone.
            let zoned: Vec<&(&Held, Reason)> = match &entry.zone {
                Some(z) => good
                    .iter()
                    .filter(|(x, _)| x.unit.zone.as_ref() == Some(z))
                    .collect(),
                None => good.iter().collect(),
            };
            let Some(&&(_, reason)) = zoned.first() else {
                return Decision::denied(Reason::ZoneNotAllowed);
            };
            let mut units: Vec<String> = zoned.iter().map(|(x, _)| x.unit.id.clone()).collect();
            units.sort();
            units.dedup();
            within_schedule(t, sched, dir, at, Decision::new(reason).units(units))
        }
        Target::Unit(uid) => {
            let unit = &t.units[uid];
            if unit.status == UnitStatus::Overlock {
                return Decision::denied(Reason::UnitOverlocked).units([uid.to_string()]);
            }
            if !in_zones(&unit.zone) {
                return Decision::denied(Reason::ZoneNotAllowed).units([uid.to_string()]);
            }
            let unit_only = |d: Decision| d.units([uid.to_string()]);
            // Employees and managers open units nobody rents; vendors do not ("Available:
            // employees only").
            if staff_reason == Some(Reason::Employee)
                && matches!(
                    unit.status,
                    UnitStatus::Available | UnitStatus::PendingAuction | UnitStatus::PreLet
                )
            {
                let granted = unit_only(Decision::new(Reason::Employee));
                return within_schedule(t, sched, Direction::In, at, granted);
            }
            // Staff reach occupied units only through a share (a manager share), like anyone.
            let h = holdings(t, user, at);
            // A gatelocked tenant is locked out of the whole facility, their other units too.
            if h.held
                .iter()
                .any(|x| x.rented() && x.unit.status == UnitStatus::Gatelocked)
            {
                return unit_only(Decision::denied(Reason::Gatelocked));
            }
            if restrict
                && h.held
                    .iter()
                    .any(|x| x.rented() && x.unit.status == UnitStatus::Overlock)
            {
                return unit_only(Decision::denied(Reason::OverlockedRestricted));
            }
            let mut result = None;
            for x in h.held.iter().filter(|x| x.unit.id == uid) {
                match status_allows(x) {
                    Ok(r) => {
                        result = Some(Ok(r));
                        break;
                    }
                    Err(e) => {
                        result.get_or_insert(Err(e));
                    }
                }
            }
            match result {
                Some(Ok(r)) => {
                    within_schedule(t, sched, Direction::In, at, unit_only(Decision::new(r)))
                }
                Some(Err(e)) => unit_only(Decision::denied(e)),
                None if h.expired_transfer_units.contains(&uid) => {
                    unit_only(Decision::denied(Reason::TransferExpired))
                }
                None if t
                    .shares_by_user
                    .get(user.id.as_str())
                    .into_iter()
                    .flatten()
                    .any(|s| t.shares[s].unit == uid) =>
                {
                    unit_only(Decision::denied(Reason::ShareNotActive))
                }
                None => unit_only(Decision::denied(Reason::NoAccess)),
            }
        }
    }
}

fn decide_digital_key(
    t: &Tables,
    ctx: &Context,
    token: &[u8],
    target: Target,
    dir: Direction,
    at: DateTime<Utc>,
) -> Decision {
    let Some(public) = ctx.digital_key_public else {
        return Decision::denied(Reason::KeyVerificationUnavailable);
    };
    let key = match public.verify(token) {
        Ok(k) => k,
        Err(digital_key::KeyError::Malformed) => return Decision::denied(Reason::KeyMalformed),
        Err(digital_key::KeyError::BadSignature) => {
            return Decision::denied(Reason::KeyBadSignature);
        }
        Err(digital_key::KeyError::WrongSite) => return Decision::denied(Reason::KeyWrongSite),
    };
    let mut d = Decision::denied(Reason::KeyRevoked);
    d.user = Some(key.user.clone());
    d.credential_id = Some(key.key_id.clone());
    let deny = |mut d: Decision, r: Reason| {
        d.reason = r;
        d.granted = false;
        d
    };
    if t.revoked_keys.contains(&key.key_id) {
        return deny(d, Reason::KeyRevoked);
    }
    if at < key.not_before {
        return deny(d, Reason::KeyNotYetValid);
    }
    // The facility caps how long an offline key is honoured, whatever the key says.
    let cap = key
        .issued_at
        .checked_add_signed(chrono::Duration::minutes(
            t.facility.wire.offline_key_expiration_minutes as i64,
        ))
        .unwrap_or(key.expires_at);
    if at >= key.expires_at.min(cap) {
        return deny(d, Reason::KeyExpired);
    }
    match target {
        Target::Entry(e) => {
            if !key.entries.iter().any(|x| x == e) {
                return deny(d, Reason::KeyNotForTarget);
            }
            d.units = key.units.clone();
        }
        Target::Unit(u) => {
            if !key.units.iter().any(|x| x == u) {
                return deny(d, Reason::KeyNotForTarget);
            }
            d.units = vec![u.to_string()];
            // Overlock denies everyone, whatever credential they carry.
            if t.units[u].status == UnitStatus::Overlock {
                return deny(d, Reason::UnitOverlocked);
            }
        }
    }
    d.granted = true;
    d.reason = Reason::DigitalKey;
    // The key carries the cloud's checks at issue time. When the site data knows the user, what
    // it says now (expiry, gatelock, restricted overlock, schedule) still applies; a user the
    // data does not know yet (rented after the last sync) is let in on the key alone.
    let Some(user) = t.users.get(key.user.as_str()) else {
        return d;
    };
    if user.expires_at.is_some_and(|e| e <= at) {
        return deny(d, Reason::UserExpired);
    }
    if dir == Direction::In {
        let h = holdings(t, user, at);
        let rented = |s: UnitStatus| h.held.iter().any(|x| x.rented() && x.unit.status == s);
        let unit_status = match target {
            Target::Unit(u) => Some(t.units[u].status),
            Target::Entry(_) => None,
        };
        if rented(UnitStatus::Gatelocked) || unit_status == Some(UnitStatus::Gatelocked) {
            return deny(d, Reason::Gatelocked);
        }
        if t.facility.wire.restrict_overlocked_entry && rented(UnitStatus::Overlock) {
            return deny(d, Reason::OverlockedRestricted);
        }
    }
    within_schedule(t, user_schedule(t, user, false), dir, at, d)
}
