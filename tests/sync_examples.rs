//! The sync examples in docs/ are read by the real parser and applied to a real store, and the
//! refusals docs/sync.md promises happen with the messages it shows. The JSON Schema side of the
//! same files is checked by tests/schemas/check_examples.py.

use std::path::PathBuf;

use gatehouse::site::Counts;
use gatehouse::store::Store;
use gatehouse::sync::{self, SyncMessage, UnitStatus};

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("reading `{rel}`: {e}"))
}

fn parse(rel: &str) -> SyncMessage {
    sync::parse(read(rel).as_bytes()).unwrap_or_else(|e| panic!("`{rel}` does not parse: {e}"))
}

fn open_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), 10_000).expect("open store");
    (dir, store)
}

fn counts(
    [
        zones,
        schedules,
        entries,
        units,
        users,
        credentials,
        shares,
        transfers,
        blacklist,
    ]: [usize; 9],
) -> Counts {
    Counts {
        zones,
        schedules,
        entries,
        units,
        users,
        credentials,
        shares,
        transfers,
        blacklist,
        // The examples have no BLE devices (config/demo-snapshot.json has).
        devices: 0,
    }
}

#[test]
fn example_snapshot_then_delta_apply() {
    let snapshot = parse("docs/examples/snapshot.json");
    let delta = parse("docs/examples/delta.json");
    assert!(matches!(snapshot, SyncMessage::Snapshot(_)));
    assert!(matches!(delta, SyncMessage::Delta(_)));

    let (_dir, store) = open_store();
    let applied = store.apply(&snapshot).expect("snapshot applies");
    assert_eq!((applied.kind, applied.version), ("snapshot", 1));
    let stats = store.stats();
    assert_eq!(stats.version, 1);
    assert_eq!(stats.counts, counts([2, 4, 4, 9, 10, 14, 2, 1, 3]));

    let applied = store.apply(&delta).expect("delta applies");
    assert_eq!(
        (applied.kind, applied.version, applied.previous_version),
        ("delta", 2, 1)
    );
    let stats = store.stats();
    assert_eq!(stats.version, 2);
    // +1 user (nina), +1 credential (nina's code) -1 credential (alice's card), +1 share.
    assert_eq!(stats.counts, counts([2, 4, 4, 9, 11, 14, 3, 1, 3]));
    let site = store.site();
    assert_eq!(site.tables.units["A-102"].status, UnitStatus::Occupied);
    assert!(site.creds.get_by_id("c-alice-card").is_none());
    assert!(site.creds.get_by_id("c-nina-code").is_some());
    assert_eq!(site.tables.shares["s-nina-a103"].user, "nina");
}

#[test]
fn demo_snapshot_applies() {
    let (_dir, store) = open_store();
    store
        .apply(&parse("config/demo-snapshot.json"))
        .expect("demo snapshot applies");
    let stats = store.stats();
    assert_eq!(stats.version, 1);
    let mut expected = counts([2, 3, 4, 7, 8, 12, 1, 0, 1]);
    expected.devices = 6;
    assert_eq!(stats.counts, expected);
}

/// The worked example of docs/sync.md "Temporary daily code" is what the gateway computes.
#[test]
fn temporary_code_worked_example() {
    let secret = hex::decode("64656d6f2d74656d706f726172792d636f64652d736563726574").unwrap();
    let date = chrono::NaiveDate::from_ymd_opt(2026, 11, 23).unwrap();
    let code = gatehouse::policy::tempcode::code_for_date(&secret, date);
    assert_eq!(code, "754679");
    assert!(
        read("docs/sync.md").contains(&format!("`{code}`")),
        "docs/sync.md should state the worked example's code `{code}`"
    );
}

/// The digital-key test vector of docs/sync.md verifies with the demo public key, and the
/// temporary code of the worked example opens the example site's gate that day.
#[test]
fn sync_md_vectors_work_against_the_example_site() {
    use gatehouse::policy::{self, Context, Direction, Presented, Reason, Request, Target};

    const KEY: &str = r#"{"payload":"eyJ2IjoyLCJzaXRlIjoic2l0ZS0wMDQyIiwia2V5X2lkIjoiZGstYWxpY2UtMSIsInVzZXIiOiJhbGljZSIsInVuaXRzIjpbIkEtMTAxIl0sImVudHJpZXMiOlsiZ2F0ZS0xIl0sImlzc3VlZF9hdCI6IjIwMjYtMTEtMjNUMTI6MDA6MDBaIiwibm90X2JlZm9yZSI6IjIwMjYtMTEtMjNUMTE6NTk6MDBaIiwiZXhwaXJlc19hdCI6IjIwMjYtMTEtMjNUMjA6MDA6MDBaIn0","signature":"yuxuOB-zegcFJHXD5hW7QHitd_CJjycyHqfhvp16CS0EfNVEWHVJpdmW5Bq0h74ajM_vf3HshAp3fD9qxp0oCw"}"#;
    const PUBLIC: &str = "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c";
    let doc = read("docs/sync.md");
    assert!(doc.contains(KEY) && doc.contains(PUBLIC));

    let public = policy::digital_key::parse_public_key(PUBLIC).expect("public key");
    let (_dir, store) = open_store();
    store.apply(&parse("docs/examples/snapshot.json")).unwrap();
    let site = store.site();
    // The key of the vector names site `site-0042`.
    let keys = policy::digital_key::KeyVerifier::new(public, "site-0042");
    let ctx = Context {
        code_key: store.code_key(),
        digital_key_public: Some(&keys),
    };
    let decide = |credential, target, at: &str| {
        let at = gatehouse::site::parse_time(at).expect("time");
        let req = Request {
            credential,
            target,
            direction: Direction::In,
        };
        policy::decide(&site, &ctx, &req, at).reason
    };
    let key = Presented::DigitalKey(KEY.as_bytes());
    let gate = Target::Entry("gate-1");
    assert_eq!(
        decide(key, gate, "2026-11-23T11:58:59Z"),
        Reason::KeyNotYetValid
    );
    assert_eq!(
        decide(key, gate, "2026-11-23T11:59:00Z"),
        Reason::DigitalKey
    );
    assert_eq!(
        decide(key, Target::Unit("A-101"), "2026-11-23T19:59:59Z"),
        Reason::DigitalKey
    );
    assert_eq!(
        decide(key, Target::Entry("door-a"), "2026-11-23T15:00:00Z"),
        Reason::KeyNotForTarget
    );
    assert_eq!(
        decide(key, gate, "2026-11-23T20:00:00Z"),
        Reason::KeyExpired
    );

    // The same key at a gateway of another site (same cloud key): opens nothing.
    let elsewhere = policy::digital_key::KeyVerifier::new(public, "site-0043");
    let ctx_elsewhere = Context {
        code_key: store.code_key(),
        digital_key_public: Some(&elsewhere),
    };
    let req = Request {
        credential: key,
        target: gate,
        direction: Direction::In,
    };
    let at = gatehouse::site::parse_time("2026-11-23T15:00:00Z").expect("time");
    assert_eq!(
        policy::decide(&site, &ctx_elsewhere, &req, at).reason,
        Reason::KeyWrongSite
    );

    let code = Presented::Code("754679");
    assert_eq!(
        decide(code, gate, "2026-11-23T12:00:00-05:00"),
        Reason::TemporaryCode
    );
    assert_eq!(
        decide(code, gate, "2026-11-24T12:00:00-05:00"),
        Reason::UnknownCredential
    );
}

/// Parses `text` (expected to fail) and returns the message.
fn parse_error(text: &str) -> String {
    match sync::parse(text.as_bytes()) {
        Ok(_) => panic!("parsed, expected a refusal:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// Parses `text` (expected to parse), applies it (expected to be refused) and returns the message.
fn apply_error(store: &Store, text: &str) -> String {
    let msg = sync::parse(text.as_bytes()).unwrap_or_else(|e| panic!("does not parse: {e}"));
    match store.apply(&msg) {
        Ok(a) => panic!("applied version {}, expected a refusal", a.version),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(message: &str, fragments: &[&str]) {
    for f in fragments {
        assert!(
            message.contains(f),
            "message `{message}` should contain `{f}`"
        );
    }
}

#[test]
fn refusals_name_the_problem_and_change_nothing() {
    let snapshot_text = read("docs/examples/snapshot.json");
    let delta_text = read("docs/examples/delta.json");
    let (_dir, store) = open_store();
    store
        .apply(&sync::parse(snapshot_text.as_bytes()).unwrap())
        .unwrap();
    let before = store.stats();
    assert_eq!(before.version, 1);
    let unchanged = |what: &str| {
        let now = store.stats();
        assert_eq!(now.version, before.version, "{what}: version changed");
        assert_eq!(now.counts, before.counts, "{what}: counts changed");
    };

    // A newer schema is refused on the header, before any field is looked at.
    let newer = snapshot_text.replacen("\"schema_version\": 1", "\"schema_version\": 2", 1);
    let m = parse_error(&newer);
    assert_contains(&m, &["unsupported schema_version 2"]);
    unchanged("schema_version 2");

    // A misspelt enum value: the message gives the line and the bad value.
    let line = snapshot_text
        .lines()
        .position(|l| l.contains("\"status\": \"occupied\""))
        .expect("an occupied unit")
        + 1;
    let typo = snapshot_text.replacen("\"status\": \"occupied\"", "\"status\": \"occupid\"", 1);
    let m = parse_error(&typo);
    assert_contains(&m, &[&format!("line {line}, column"), "occupid"]);
    unchanged("status occupid");

    // deny_unknown_fields: an unknown top-level field is refused.
    let extra = snapshot_text.replacen(
        "\"version\": 1,",
        "\"version\": 1, \"generated_by\": \"portal\",",
        1,
    );
    assert_contains(&parse_error(&extra), &["unknown field `generated_by`"]);
    unchanged("unknown field");

    // A credential naming two values is refused by the site check.
    let both = snapshot_text.replacen(
        "\"code\": \"123456\"",
        "\"code\": \"123456\", \"fob\": \"FOB-BOTH\"",
        1,
    );
    assert_contains(
        &apply_error(&store, &both),
        &["credential `c-alice-code` must name exactly one"],
    );
    unchanged("credential with code and fob");

    // A share naming a unit the site does not have.
    let unknown_unit = delta_text.replacen("\"unit\": \"A-103\"", "\"unit\": \"Z-999\"", 1);
    assert_ne!(unknown_unit, delta_text);
    assert_contains(
        &apply_error(&store, &unknown_unit),
        &["share `s-nina-a103` refers to unknown unit `Z-999`"],
    );
    unchanged("share of an unknown unit");

    // A delta against another base.
    let stale = delta_text.replacen("\"base_version\": 1", "\"base_version\": 0", 1);
    let m = apply_error(&store, &stale);
    assert_contains(
        &m,
        &["resync needed", "based on version 0", "the site is at 1"],
    );
    unchanged("base_version 0");

    // A delta that does not move the version forward.
    let same = delta_text.replacen("\"version\": 2", "\"version\": 1", 1);
    assert_contains(
        &apply_error(&store, &same),
        &["delta version 1 is not after its base_version 1"],
    );
    unchanged("version not after base");

    // Deleting what is not there.
    let gone = delta_text.replacen("\"c-alice-card\"", "\"c-nobody\"", 1);
    assert_contains(
        &apply_error(&store, &gone),
        &["delete of unknown credential `c-nobody`"],
    );
    unchanged("delete of an unknown credential");

    // After all that, the real delta still applies.
    store
        .apply(&sync::parse(delta_text.as_bytes()).unwrap())
        .expect("the example delta applies after the refusals");
    assert_eq!(store.stats().version, 2);
}

/// A gateway restarted after importing the examples must reopen at the same version.
#[test]
fn store_reopens_after_the_examples() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path(), 10_000).expect("open store");
        store
            .apply(&parse("docs/examples/snapshot.json"))
            .expect("snapshot applies");
        store
            .apply(&parse("docs/examples/delta.json"))
            .expect("delta applies");
    }
    // Includes `c-eve-card` (`{"number": 4242}`, no facility code): stored cards must read
    // back whatever optional fields they lack.
    let store = Store::open(dir.path(), 10_000).expect("reopens");
    let stats = store.stats();
    assert_eq!(stats.version, 2);
    assert_eq!(stats.counts, counts([2, 4, 4, 9, 11, 14, 3, 1, 3]));
    assert!(store.site().creds.get_by_id("c-eve-card").is_some());
}

#[test]
fn delta_before_any_snapshot_needs_resync() {
    let (_dir, store) = open_store();
    let m = apply_error(&store, &read("docs/examples/delta.json"));
    assert_contains(&m, &["resync needed"]);
    assert_eq!(store.stats().version, 0);
}

/// docs/access-rules.md has a row for every decision reason, with the right result. The match
/// has no wildcard: a new `Reason` does not compile here until it is listed (and documented).
#[test]
fn access_rules_md_lists_every_reason() {
    use gatehouse::policy::Reason::{self, *};
    fn listed(r: Reason) -> bool {
        match r {
            Tenant
            | SharedUser
            | Transfer
            | AuctionWinner
            | Employee
            | Vendor
            | TemporaryCode
            | DigitalKey
            | ExitGracePeriod
            | UnknownCredential
            | UnknownEntry
            | UnknownUnit
            | KeypadLockedOut
            | Blacklisted
            | UserExpired
            | ZoneNotAllowed
            | OutsideSchedule
            | UnitOverlocked
            | Overlocked
            | OverlockedRestricted
            | Gatelocked
            | PreLet
            | NoAccess
            | ShareNotActive
            | TransferExpired
            | KeyMalformed
            | KeyBadSignature
            | KeyVerificationUnavailable
            | KeyRevoked
            | KeyNotYetValid
            | KeyExpired
            | KeyNotForTarget
            | KeyWrongSite => true,
        }
    }
    let all = [
        Tenant,
        SharedUser,
        Transfer,
        AuctionWinner,
        Employee,
        Vendor,
        TemporaryCode,
        DigitalKey,
        ExitGracePeriod,
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
        KeyWrongSite,
    ];
    let doc = read("docs/access-rules.md");
    let rows: Vec<&str> = doc
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter(|l| l.contains(" | granted | ") || l.contains(" | denied | "))
        .collect();
    assert_eq!(rows.len(), all.len(), "one table row per reason");
    for r in all {
        assert!(listed(r));
        let result = if r.is_grant() { "granted" } else { "denied" };
        let row = format!("| `{}` | {result} | ", r.as_str());
        assert!(
            rows.iter().any(|l| l.starts_with(&row)),
            "docs/access-rules.md has no row starting `{row}`"
        );
    }
}

/// The automation settings of the example snapshot are read as documented, and every refusal
/// docs/sync.md lists for them names the record and the field, and changes nothing.
#[test]
fn automation_settings_apply_and_refusals_name_record_and_field() {
    let text = read("docs/examples/snapshot.json");
    let (_dir, store) = open_store();
    store.apply(&sync::parse(text.as_bytes()).unwrap()).unwrap();
    {
        let site = store.site();
        let f = &site.tables.facility.wire;
        assert_eq!(
            (f.motion_alert_events, f.motion_alert_minutes),
            (Some(3), Some(5))
        );
        assert_eq!(
            (f.temperature_min, f.temperature_max),
            (Some(2.0), Some(35.0))
        );
        assert_eq!(f.loitering_alert_hours, 3);
        assert!(f.zone_triggers);
        assert_eq!(site.tables.entries["door-a"].held_open_seconds, Some(120));
        assert_eq!(
            site.tables.zones["zone-b"].triggers[0].on_seconds,
            Some(300)
        );
        let a103 = &site.tables.units["A-103"];
        assert!(!a103.alarm_enabled && !a103.monitor_temperature && a103.front_motion);
        let pir = sync::SensorRef {
            device: "pir-a101".into(),
            channel: None,
            front: false,
        };
        assert_eq!(
            site.tables.unit_by_sensor.get(&pir),
            Some(&("A-101".to_string(), true))
        );
        let lock = sync::SensorRef {
            device: "lock-a102".into(),
            channel: None,
            front: false,
        };
        assert_eq!(
            site.tables.unit_by_sensor.get(&lock),
            Some(&("A-102".to_string(), false))
        );
    }
    let before = store.stats();
    let cases: &[(&str, &str, &str)] = &[
        (
            "\"motion_alert_minutes\": 5",
            "\"motion_alert_minutes\": 0",
            "facility motion_alert_minutes is 0 (1 to 1440 expected)",
        ),
        (
            "\"motion_alert_events\": 3,",
            "",
            "facility motion_alert_events and motion_alert_minutes go together",
        ),
        (
            "\"temperature_min\": 2.0",
            "\"temperature_min\": 35.0",
            "facility temperature_min must be below temperature_max",
        ),
        (
            "\"temperature_max\": 35.0",
            "\"temperature_max\": 135.0",
            "facility temperature_max is out of range",
        ),
        (
            "\"loitering_alert_hours\": 3",
            "\"loitering_alert_hours\": 169",
            "facility loitering_alert_hours is 169 (at most 168 expected)",
        ),
        (
            "\"held_open_seconds\": 120",
            "\"held_open_seconds\": 2",
            "entry `door-a` held_open_seconds is 2 (5 to 3600 expected)",
        ),
        (
            "\"on_seconds\": 300",
            "\"on_seconds\": 300, \"pulse_ms\": 500",
            "zone `zone-b` triggers[0] must name exactly one of on_seconds, pulse_ms",
        ),
        (
            "\"device\": \"relay-board-2\", \"channel\": 3",
            "\"device\": \"\", \"channel\": 3",
            "zone `zone-b` triggers[0] has an empty device",
        ),
        (
            "{ \"device\": \"io-board-1\", \"channel\": 2 }",
            "{ \"device\": \"io-board-1\", \"channel\": 2 }] }, { \"id\": \"X\", \"status\": \"available\", \"sensors\": [{ \"device\": \"io-board-1\", \"channel\": 2 }",
            "units `A-101` and `X` share the sensor `io-board-1`",
        ),
    ];
    for (from, to, expected) in cases {
        let bad = text.replacen(from, to, 1);
        assert_ne!(bad, text, "`{from}` not found in the example");
        assert_contains(&apply_error(&store, &bad), &[expected]);
        assert!(
            read("docs/sync.md").contains(expected),
            "docs/sync.md should show the refusal `{expected}`"
        );
        let now = store.stats();
        assert_eq!(
            (now.version, now.counts),
            (before.version, before.counts.clone())
        );
    }
    // A negative number of minutes is refused by the parser with the field's path.
    let negative = text.replacen(
        "\"motion_quiet_minutes\": 30",
        "\"motion_quiet_minutes\": -5",
        1,
    );
    assert_contains(&parse_error(&negative), &["facility.motion_quiet_minutes"]);
}
