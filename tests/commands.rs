//! Cloud commands: verification, refusals, routing, exactly-once, sleeping devices.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use ed25519_dalek::SigningKey;
use gatehouse::cloud::commands::*;
use gatehouse::cloud::messages::Command;
use gatehouse::store::Store;
use serde_json::{Value, json};

struct Fx {
    _dir: tempfile::TempDir,
    store: Store,
    units: Arc<SimulatedUnits>,
    relays: Arc<SimulatedRelays>,
    router: Router,
    cfg: CommandConfig,
    key: SigningKey,
}

fn fx() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 10_000).unwrap();
    let snapshot = gatehouse::sync::parse(include_bytes!("../config/demo-snapshot.json")).unwrap();
    store.apply(&snapshot).unwrap();
    let units = Arc::new(SimulatedUnits::new(["lock-a101", "lock-a102", "lock-b201"]));
    let relays = Arc::new(SimulatedRelays::new(["relay-board-1"]));
    let router = Router::new(units.clone(), relays.clone());
    let key = SigningKey::from_bytes(&[11; 32]);
    let cfg = CommandConfig::new(key.verifying_key(), SITE, GATEWAY);
    Fx {
        _dir: dir,
        store,
        units,
        relays,
        router,
        cfg,
        key,
    }
}

/// The audience of the fixture's gateway.
const SITE: &str = "demo-site";
const GATEWAY: &str = "demo-gw";

fn now() -> DateTime<Utc> {
    "2026-03-01T12:00:00Z".parse().unwrap()
}

fn command(id: &str, name: &str, target: Value, args: Value) -> Command {
    Command {
        v: 2,
        site: SITE.into(),
        gateway: GATEWAY.into(),
        id: id.into(),
        name: name.into(),
        issued_at: now() - Duration::seconds(10),
        expires_at: now() + Duration::minutes(5),
        target: serde_json::from_value(target).unwrap(),
        args,
    }
}

fn unlock_unit(id: &str, unit: &str) -> Command {
    command(id, "unlock", json!({"unit": unit}), Value::Null)
}

impl Fx {
    fn send(&self, cmd: &Command) -> Outcome {
        self.send_bytes(&sign(cmd, &self.key), &cmd.name)
    }
    fn send_bytes(&self, bytes: &[u8], topic: &str) -> Outcome {
        self.send_at(bytes, topic, now())
    }
    fn send_at(&self, bytes: &[u8], topic: &str, at: DateTime<Utc>) -> Outcome {
        handle(&self.router, &self.store, bytes, topic, at, &self.cfg)
    }
    fn claimed(&self, id: &str) -> bool {
        self.store.commands().get(id).unwrap().is_some()
    }
    fn nothing_executed(&self) -> bool {
        self.units.executed().is_empty() && self.relays.executed().is_empty()
    }
}

#[track_caller]
fn assert_result(o: &Outcome, status: &str, reason: Option<&str>, id: Option<&str>) {
    assert_eq!(o.result.status, status, "{:?}", o.result);
    assert_eq!(o.result.reason.as_deref(), reason, "{:?}", o.result);
    assert_eq!(o.result.id.as_deref(), id, "{:?}", o.result);
}

/// Envelope with a given payload (raw bytes) and signature text (or none).
fn envelope(payload: &[u8], signature: Option<&str>) -> Vec<u8> {
    let mut m = json!({"payload": URL_SAFE_NO_PAD.encode(payload)});
    if let Some(s) = signature {
        m["signature"] = json!(s);
    }
    serde_json::to_vec(&m).unwrap()
}

// ----------------------------------------------------------------------------- verification

#[test]
fn unsigned_is_refused_and_does_not_use_up_the_id() {
    let f = fx();
    let cmd = unlock_unit("c-unsigned", "A-101");
    let payload = serde_json::to_vec(&cmd).unwrap();
    for sig in [None, Some(""), Some("AAAA"), Some("not base64!")] {
        let o = f.send_bytes(&envelope(&payload, sig), "unlock");
        assert_result(&o, "refused", Some("unsigned"), Some("c-unsigned"));
        assert!(o.effects.is_empty());
    }
    assert!(!f.claimed("c-unsigned"));
    assert!(f.nothing_executed());
    // The genuine command with that id still works.
    assert_result(&f.send(&cmd), "done", None, Some("c-unsigned"));
}

#[test]
fn bad_signature_is_refused_and_does_not_use_up_the_id() {
    let f = fx();
    let cmd = unlock_unit("c-forged", "A-101");
    let forged = sign(&cmd, &SigningKey::from_bytes(&[12; 32]));
    let o = f.send_bytes(&forged, "unlock");
    assert_result(&o, "refused", Some("bad_signature"), Some("c-forged"));

    // A genuine signature over another payload.
    let genuine: Value = serde_json::from_slice(&sign(&cmd, &f.key)).unwrap();
    let other = serde_json::to_vec(&unlock_unit("c-forged", "A-102")).unwrap();
    let swapped = envelope(&other, genuine["signature"].as_str());
    let o = f.send_bytes(&swapped, "unlock");
    assert_result(&o, "refused", Some("bad_signature"), Some("c-forged"));

    assert!(!f.claimed("c-forged"));
    assert!(f.nothing_executed());
    assert_result(&f.send(&cmd), "done", None, Some("c-forged"));
}

#[test]
fn expired_is_refused() {
    let f = fx();
    let mut cmd = unlock_unit("c-old", "A-101");
    cmd.issued_at = now() - Duration::minutes(10);
    cmd.expires_at = now() - Duration::seconds(1);
    assert_result(&f.send(&cmd), "refused", Some("expired"), Some("c-old"));
    // Expiring exactly now is expired too.
    cmd.id = "c-old-2".into();
    cmd.expires_at = now();
    assert_result(&f.send(&cmd), "refused", Some("expired"), Some("c-old-2"));
    assert!(!f.claimed("c-old") && !f.claimed("c-old-2"));
    assert!(f.nothing_executed());
}

#[test]
fn issued_in_future_is_refused_beyond_the_skew() {
    let f = fx();
    let mut cmd = unlock_unit("c-future", "A-101");
    cmd.issued_at = now() + Duration::seconds(61);
    assert_result(
        &f.send(&cmd),
        "refused",
        Some("issued_in_future"),
        Some("c-future"),
    );
    assert!(f.nothing_executed());
    // Within the 60 s skew it is accepted.
    cmd.id = "c-future-ok".into();
    cmd.issued_at = now() + Duration::seconds(60);
    assert_result(&f.send(&cmd), "done", None, Some("c-future-ok"));
}

#[test]
fn bad_times_is_malformed() {
    let f = fx();
    let mut cmd = unlock_unit("c-times", "A-101");
    cmd.issued_at = now() + Duration::seconds(30);
    cmd.expires_at = now() + Duration::seconds(20);
    assert_result(
        &f.send(&cmd),
        "malformed",
        Some("bad_times"),
        Some("c-times"),
    );
    assert!(f.nothing_executed());
}

#[test]
fn name_mismatch_is_refused() {
    let f = fx();
    let cmd = unlock_unit("c-topic", "A-101");
    let o = f.send_bytes(&sign(&cmd, &f.key), "lock");
    assert_result(&o, "refused", Some("name_mismatch"), Some("c-topic"));
    // The result goes to the topic it came on.
    assert_eq!(o.result.name, "lock");
    assert!(f.nothing_executed());
}

#[test]
fn unknown_command_is_refused() {
    let f = fx();
    let cmd = command("c-unknown", "self_destruct", Value::Null, Value::Null);
    assert_result(
        &f.send(&cmd),
        "refused",
        Some("unknown_command"),
        Some("c-unknown"),
    );
}

#[test]
fn unsupported_version_is_malformed() {
    let f = fx();
    for v in [1, 3] {
        let id = format!("c-v{v}");
        let mut cmd = unlock_unit(&id, "A-101");
        cmd.v = v;
        let o = f.send(&cmd);
        assert_result(&o, "malformed", Some("unsupported_version"), Some(&id));
        assert!(!f.claimed(&id));
    }
    // A version 1 command as the cloud sent it before (no site, no gateway).
    let payload = br#"{"v":1,"id":"c-old","name":"unlock","issued_at":"2026-03-01T11:59:00Z","expires_at":"2026-03-01T12:05:00Z","target":{"unit":"A-101"}}"#;
    let o = f.send_bytes(&sign_payload(payload, &f.key), "unlock");
    assert_result(&o, "malformed", Some("unsupported_version"), Some("c-old"));
    assert!(!f.claimed("c-old"));
    assert!(f.nothing_executed());
}

#[test]
fn a_command_for_another_site_or_gateway_is_refused_and_not_claimed() {
    let f = fx();
    // Captured at site A (or at another gateway of this site), replayed here: every gateway of
    // the fleet trusts the same command key, so only the audience tells them apart.
    let cases = [
        ("site-a", GATEWAY),
        ("site-a", "gw-1"),
        (SITE, "gw-2"),
        ("", GATEWAY),
        (SITE, ""),
        ("DEMO-SITE", GATEWAY),
    ];
    for (i, (site, gateway)) in cases.into_iter().enumerate() {
        let id = format!("c-aud-{i}");
        let mut cmd = command(&id, "unlock", json!({"entry": "gate-1"}), Value::Null);
        cmd.site = site.into();
        cmd.gateway = gateway.into();
        let o = f.send(&cmd);
        assert_result(&o, "refused", Some("wrong_gateway"), Some(&id));
        assert!(o.effects.is_empty());
        assert!(
            !f.claimed(&id),
            "the id of a command for another gateway is not used up"
        );
    }
    assert!(f.nothing_executed());
    // Checked before the name, the target and the times: nothing about it is looked at.
    let mut cmd = command(
        "c-aud-x",
        "no_such_command",
        json!({"unit": "nowhere"}),
        Value::Null,
    );
    cmd.site = "site-a".into();
    assert_result(
        &f.send(&cmd),
        "refused",
        Some("wrong_gateway"),
        Some("c-aud-x"),
    );
    // Missing audience fields: not a version 2 command.
    let payload = br#"{"v":2,"id":"c-noaud","name":"unlock","issued_at":"2026-03-01T11:59:00Z","expires_at":"2026-03-01T12:05:00Z","target":{"unit":"A-101"}}"#;
    let o = f.send_bytes(&sign_payload(payload, &f.key), "unlock");
    assert_result(&o, "malformed", Some("bad_payload"), Some("c-noaud"));
    assert!(f.nothing_executed());
    assert!(f.store.commands().is_empty());
    // The same command for this gateway is executed.
    let cmd = command(
        "c-aud-ok",
        "unlock",
        json!({"entry": "gate-1"}),
        Value::Null,
    );
    assert_result(&f.send(&cmd), "done", None, Some("c-aud-ok"));
}

#[test]
fn refusal_details_never_quote_a_value_of_the_payload() {
    let f = fx();
    const SECRET: &str = "5550009999";
    let n: u64 = SECRET.parse().unwrap();
    let payloads = [
        json!({"v": 2, "site": SITE, "gateway": GATEWAY, "id": "c-s1", "name": "unlock",
            "issued_at": "2026-03-01T11:59:00Z", "expires_at": "2026-03-01T12:05:00Z",
            "target": {"unit": n}}),
        json!({"v": 2, "site": SITE, "gateway": GATEWAY, "id": "c-s2", "name": "unlock",
            "issued_at": "2026-03-01T11:59:00Z", "expires_at": "2026-03-01T12:05:00Z",
            "pin": SECRET}),
        json!({"v": 2, "site": SITE, "gateway": GATEWAY, "id": "c-s3", "name": "unlock",
            "issued_at": SECRET, "expires_at": "2026-03-01T12:05:00Z"}),
        json!({"v": 2, "site": SITE, "gateway": GATEWAY, "id": "c-s4", "name": "unlock",
            "issued_at": "2026-03-01T11:59:00Z", "expires_at": "2026-03-01T12:05:00Z",
            "target": {"unit": "A-101"}, SECRET: 1}),
        json!({"v": 2, "site": SITE, "gateway": GATEWAY, "id": "c-s5", "name": "emergency_unlock",
            "issued_at": "2026-03-01T11:59:00Z", "expires_at": "2026-03-01T12:05:00Z",
            "target": {"unit": "A-101"}, "args": {"reason": "other", SECRET: SECRET}}),
        json!({"v": 2, "site": SITE, "gateway": GATEWAY, "id": "c-s6", "name": "emergency_unlock",
            "issued_at": "2026-03-01T11:59:00Z", "expires_at": "2026-03-01T12:05:00Z",
            "target": {"unit": "A-101"}, "args": {"reason": "other", "note": n}}),
    ];
    for (i, p) in payloads.iter().enumerate() {
        let name = p["name"].as_str().unwrap();
        let o = f.send_bytes(&sign_payload(p.to_string().as_bytes(), &f.key), name);
        let text = serde_json::to_string(&o.result).unwrap();
        assert!(!text.contains(SECRET), "case {i}: {text}");
        assert!(
            o.result.status == "malformed" || o.result.status == "refused",
            "{text}"
        );
        assert!(
            o.result.detail.is_some(),
            "case {i}: the refusal says why: {text}"
        );
    }
    // The path and the kind of value, not the value.
    let o = f.send_bytes(
        &sign_payload(payloads[0].to_string().as_bytes(), &f.key),
        "unlock",
    );
    assert_eq!(
        o.result.detail.as_deref(),
        Some("payload: target.unit: expected a string, found a number")
    );
    assert!(f.nothing_executed());
}

#[test]
fn id_and_note_lengths_are_characters_as_the_schema_counts() {
    // The same strings as tests/schemas/check_examples.py `boundary_commands`: at the bound in
    // multi-byte characters (accepted by the schema and the gateway), one over (refused by
    // both).
    let f = fx();
    let id_at = "é".repeat(128);
    assert_eq!(id_at.len(), 256);
    let o = f.send(&unlock_unit(&id_at, "A-101"));
    assert_result(&o, "done", None, Some(&id_at));
    let id_over = "é".repeat(129);
    let o = f.send(&unlock_unit(&id_over, "A-101"));
    assert_eq!(o.result.status, "malformed");
    assert_eq!(o.result.reason.as_deref(), Some("bad_payload"));
    assert!(!f.claimed(&id_over));

    let emergency = |id: &str, note: String| {
        command(
            id,
            "emergency_unlock",
            json!({"unit": "A-101"}),
            json!({"reason": "other", "note": note}),
        )
    };
    let note_at = "€".repeat(500);
    assert_eq!(note_at.len(), 1500);
    assert_result(
        &f.send(&emergency("c-note-at", note_at)),
        "done",
        None,
        Some("c-note-at"),
    );
    let o = f.send(&emergency("c-note-over", "€".repeat(501)));
    assert_result(&o, "refused", Some("bad_args"), Some("c-note-over"));
}

#[test]
fn non_json_is_malformed_without_id() {
    let f = fx();
    for bytes in [
        &b"hello"[..],
        b"",
        b"[1,2,3]",
        b"{\"signature\":\"x\"}",
        b"{\"payload\":5}",
    ] {
        let o = f.send_bytes(bytes, "unlock");
        assert_result(&o, "malformed", Some("not_json"), None);
        assert_eq!(o.result.name, "unlock");
    }
    assert!(f.store.commands().is_empty());
}

#[test]
fn bad_payload_is_malformed_and_echoes_a_readable_id() {
    let f = fx();
    // Not base64url: no id.
    let bytes = br#"{"payload":"***","signature":"x"}"#;
    assert_result(
        &f.send_bytes(bytes, "unlock"),
        "malformed",
        Some("bad_payload"),
        None,
    );
    // Base64 of something that is not a JSON object: no id.
    let o = f.send_bytes(&envelope(b"\"just a string\"", None), "unlock");
    assert_result(&o, "malformed", Some("bad_payload"), None);
    // Cut short after the id: the id is echoed.
    let o = f.send_bytes(
        &envelope(br#"{"v":1,"id":"c-cut","name":"unl"#, None),
        "unlock",
    );
    assert_result(&o, "malformed", Some("bad_payload"), Some("c-cut"));
    // Signed, valid JSON, but not a command (unknown field, missing times): id echoed.
    let payload = br#"{"v":2,"id":"c-shape","name":"unlock","colour":"red"}"#;
    let o = f.send_bytes(&sign_payload(payload, &f.key), "unlock");
    assert_result(&o, "malformed", Some("bad_payload"), Some("c-shape"));
    assert!(f.store.commands().is_empty());
    assert!(f.nothing_executed());
}

#[test]
fn too_large_is_malformed_and_not_read() {
    let mut f = fx();
    f.cfg.max_bytes = 600;
    // A genuine command whose id could be read, made too large by a long note.
    let cmd = command(
        "c-big",
        "emergency_unlock",
        json!({"unit": "A-101"}),
        json!({"reason": "other", "note": "x".repeat(400)}),
    );
    let bytes = sign(&cmd, &f.key);
    assert!(bytes.len() > 600);
    let o = f.send_bytes(&bytes, "emergency_unlock");
    // Its id is echoed (read from the start of the payload only), so the cloud can match it.
    assert_result(&o, "malformed", Some("too_large"), Some("c-big"));
    assert!(!f.claimed("c-big"));
    // Too large and unreadable.
    let o = f.send_bytes(&vec![0xff; 601], "unlock");
    assert_result(&o, "malformed", Some("too_large"), None);
    assert!(f.nothing_executed());
    // At the limit it is read.
    f.cfg.max_bytes = bytes.len();
    assert_result(
        &f.send_bytes(&bytes, "emergency_unlock"),
        "done",
        None,
        Some("c-big"),
    );
}

// ----------------------------------------------------------------------------- exactly once

#[test]
fn replay_is_answered_with_the_first_result_and_not_executed() {
    let f = fx();
    let bytes = sign(&unlock_unit("c-once", "A-101"), &f.key);
    let first = f.send_bytes(&bytes, "unlock");
    assert_result(&first, "done", None, Some("c-once"));
    assert!(!first.duplicate);
    assert_eq!(first.effects.len(), 1);

    let later = now() + Duration::seconds(30);
    let second = f.send_at(&bytes, "unlock", later);
    assert!(second.duplicate);
    assert_eq!(
        second.result, first.result,
        "answered with the stored result"
    );
    assert!(second.effects.is_empty());
    assert_eq!(
        f.units.executed(),
        vec![("lock-a101".to_string(), UnitAction::Unlock)]
    );
}

#[test]
fn a_refusal_after_verification_stays_refused_on_redelivery() {
    let f = fx();
    f.units.set_online("lock-a101", Online::No);
    let bytes = sign(&unlock_unit("c-off", "A-101"), &f.key);
    let first = f.send_bytes(&bytes, "unlock");
    assert_result(&first, "refused", Some("target_offline"), Some("c-off"));
    f.units.set_online("lock-a101", Online::Yes);
    let again = f.send_bytes(&bytes, "unlock");
    assert!(again.duplicate);
    assert_eq!(again.result, first.result);
    assert!(f.nothing_executed());
}

#[test]
fn claimed_without_a_result_is_refused_as_duplicate() {
    let f = fx();
    let cmd = unlock_unit("c-crash", "A-101");
    // As if the process died after the claim, before the result was stored.
    f.store
        .commands()
        .claim("c-crash", cmd.expires_at, now(), 0)
        .unwrap();
    let o = f.send(&cmd);
    assert!(o.duplicate);
    assert_result(&o, "refused", Some("duplicate"), Some("c-crash"));
    assert!(f.nothing_executed());
}

// ----------------------------------------------------------------------------- targets

#[test]
fn unknown_target_is_refused() {
    let f = fx();
    let o = f.send(&unlock_unit("c-u1", "Z-999"));
    assert_result(&o, "refused", Some("unknown_target"), Some("c-u1"));
    // The caller still gets the unlock attempt for its log.
    let Effect::RemoteUnlock(rec) = &o.effects[0] else {
        panic!("{:?}", o.effects)
    };
    assert_eq!(rec.status, "refused");
    assert_eq!(rec.device, None);

    let o = f.send(&command(
        "c-u2",
        "unlock",
        json!({"entry": "moat"}),
        Value::Null,
    ));
    assert_result(&o, "refused", Some("unknown_target"), Some("c-u2"));
    let o = f.send(&command(
        "c-u3",
        "relay",
        json!({"device": "relay-board-9", "channel": 0}),
        json!({"action": "on"}),
    ));
    assert_result(&o, "refused", Some("unknown_target"), Some("c-u3"));
    assert!(f.nothing_executed());
}

#[test]
fn no_controller_is_refused() {
    let f = fx();
    // A-103 has no controller.
    let o = f.send(&unlock_unit("c-n1", "A-103"));
    assert_result(&o, "refused", Some("no_controller"), Some("c-n1"));
    // door-a has no relay.
    let o = f.send(&command(
        "c-n2",
        "unlock",
        json!({"entry": "door-a"}),
        Value::Null,
    ));
    assert_result(&o, "refused", Some("no_controller"), Some("c-n2"));
    let o = f.send(&command(
        "c-n3",
        "lock",
        json!({"unit": "A-104"}),
        Value::Null,
    ));
    assert_result(&o, "refused", Some("no_controller"), Some("c-n3"));
    // The site names a controller this gateway does not have.
    f.units.set_online("lock-b201", Online::Unknown);
    let o = f.send(&unlock_unit("c-n4", "B-201"));
    assert_result(&o, "refused", Some("no_controller"), Some("c-n4"));
    assert!(f.nothing_executed());
}

#[test]
fn target_offline_is_refused() {
    let f = fx();
    f.units.set_online("lock-a101", Online::No);
    let o = f.send(&unlock_unit("c-off", "A-101"));
    assert_result(&o, "refused", Some("target_offline"), Some("c-off"));
    let Effect::RemoteUnlock(rec) = &o.effects[0] else {
        panic!("{:?}", o.effects)
    };
    assert_eq!(rec.device.as_deref(), Some("lock-a101"));
    assert_eq!(rec.reason.as_deref(), Some("target_offline"));

    f.relays.set_online("relay-board-1", Online::No);
    let o = f.send(&command(
        "c-off-2",
        "unlock",
        json!({"entry": "gate-1"}),
        Value::Null,
    ));
    assert_result(&o, "refused", Some("target_offline"), Some("c-off-2"));
    assert!(f.nothing_executed());
}

#[test]
fn bad_target_is_refused() {
    let f = fx();
    let cases = [
        ("unlock", Value::Null),
        ("unlock", json!({"unit": "A-101", "entry": "gate-1"})),
        ("unlock", json!({"device": "relay-board-1", "channel": 0})),
        ("lock", json!({"entry": "gate-1"})),
        ("locate", Value::Null),
        ("relay", json!({"unit": "A-101"})),
        ("relay", json!({"device": "relay-board-1"})),
        ("ping", json!({"unit": "A-101"})),
        ("resync", json!({"entry": "gate-1"})),
    ];
    for (i, (name, target)) in cases.into_iter().enumerate() {
        let id = format!("c-bt-{i}");
        let args = if name == "relay" {
            json!({"action": "on"})
        } else {
            Value::Null
        };
        let o = f.send(&command(&id, name, target, args));
        assert_result(&o, "refused", Some("bad_target"), Some(&id));
    }
    assert!(f.nothing_executed());
}

// ----------------------------------------------------------------------------- arguments

#[test]
fn emergency_unlock_needs_a_listed_reason() {
    let f = fx();
    let target = json!({"unit": "A-101"});
    for (i, args) in [
        Value::Null,
        json!({}),
        json!({"reason": "because"}),
        json!({"reason": "Medical Emergency"}),
        json!({"reason": 3}),
        json!("medical_emergency"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("c-br-{i}");
        let o = f.send(&command(&id, "emergency_unlock", target.clone(), args));
        assert_result(&o, "refused", Some("bad_reason"), Some(&id));
        assert!(o.effects.is_empty());
    }
    assert!(f.nothing_executed());
    for r in EmergencyReason::ALL {
        assert_eq!(EmergencyReason::parse(r.as_str()), Some(r));
    }
}

#[test]
fn bad_args_are_refused() {
    let f = fx();
    let relay = json!({"device": "relay-board-1", "channel": 2});
    let cases = [
        ("relay", relay.clone(), json!({"action": "blink"})),
        ("relay", relay.clone(), Value::Null),
        ("relay", relay.clone(), json!({"action": "pulse", "ms": 99})),
        (
            "relay",
            relay.clone(),
            json!({"action": "pulse", "ms": 60001}),
        ),
        (
            "relay",
            relay.clone(),
            json!({"action": "pulse", "ms": "500"}),
        ),
        ("relay", relay.clone(), json!({"action": "on", "ms": 500})),
        (
            "relay",
            relay.clone(),
            json!({"action": "off", "colour": 1}),
        ),
        ("install_mode", Value::Null, json!({"action": "start"})),
        (
            "install_mode",
            Value::Null,
            json!({"action": "start", "minutes": 0}),
        ),
        (
            "install_mode",
            Value::Null,
            json!({"action": "start", "minutes": 241}),
        ),
        ("install_mode", Value::Null, json!({"action": "pause"})),
        (
            "install_mode",
            Value::Null,
            json!({"action": "stop", "minutes": 5}),
        ),
        ("unlock", json!({"unit": "A-101"}), json!({"force": true})),
        ("unlock", json!({"unit": "A-101"}), json!([1])),
        (
            "emergency_unlock",
            json!({"unit": "A-101"}),
            json!({"reason": "other", "note": 5}),
        ),
        ("ping", Value::Null, json!({"x": 1})),
        ("adopt", Value::Null, Value::Null),
        ("adopt", Value::Null, json!({})),
        ("adopt", Value::Null, json!({"candidate": ""})),
        ("adopt", Value::Null, json!({"candidate": 5})),
        (
            "adopt",
            Value::Null,
            json!({"candidate": "osdp:b:5", "pin": "1"}),
        ),
        (
            "adopt",
            Value::Null,
            json!({"candidate": "osdp:b:5", "address": 300}),
        ),
        ("remove", Value::Null, json!({})),
        ("remove", Value::Null, json!({"device": ""})),
        ("remove", Value::Null, json!({"device": "d", "why": 1})),
    ];
    for (i, (name, target, args)) in cases.into_iter().enumerate() {
        let id = format!("c-ba-{i}");
        let o = f.send(&command(&id, name, target, args));
        assert_result(&o, "refused", Some("bad_args"), Some(&id));
        assert!(o.effects.is_empty(), "{:?}", o.effects);
    }
    assert!(f.nothing_executed());
}

// ----------------------------------------------------------------------------- execution

#[test]
fn unlock_unit_is_done() {
    let f = fx();
    let o = f.send(&unlock_unit("c-1", "A-101"));
    assert_result(&o, "done", None, Some("c-1"));
    assert_eq!(o.result.name, "unlock");
    assert_eq!(o.result.at, now());
    assert_eq!(
        f.units.executed(),
        vec![("lock-a101".to_string(), UnitAction::Unlock)]
    );
    assert_eq!(
        o.effects,
        vec![Effect::RemoteUnlock(UnlockRecord {
            command_id: "c-1".into(),
            target: TargetRef::Unit("A-101".into()),
            device: Some("lock-a101".into()),
            status: "done".into(),
            reason: None,
        })]
    );
    // The stored result is the one returned.
    let seen = f.store.commands().get("c-1").unwrap().unwrap();
    assert_eq!(seen.result, Some(serde_json::to_value(&o.result).unwrap()));
}

#[test]
fn unlock_entry_pulses_its_relay() {
    let f = fx();
    let o = f.send(&command(
        "c-gate",
        "unlock",
        json!({"entry": "gate-1"}),
        Value::Null,
    ));
    assert_result(&o, "done", None, Some("c-gate"));
    let o = f.send(&command(
        "c-exit",
        "unlock",
        json!({"entry": "exit-1"}),
        Value::Null,
    ));
    assert_result(&o, "done", None, Some("c-exit"));
    assert_eq!(
        f.relays.executed(),
        vec![
            ("relay-board-1".to_string(), 0, RelayOp::Pulse { ms: 3000 }),
            ("relay-board-1".to_string(), 1, RelayOp::Pulse { ms: 3000 }),
        ]
    );
    let Effect::RemoteUnlock(rec) = &o.effects[0] else {
        panic!("{:?}", o.effects)
    };
    assert_eq!(rec.target, TargetRef::Entry("exit-1".into()));
    assert_eq!(
        serde_json::to_value(rec).unwrap(),
        json!({"command_id": "c-exit", "target": {"entry": "exit-1"},
               "device": "relay-board-1", "status": "done"})
    );
}

#[test]
fn relay_commands_are_done() {
    let f = fx();
    let target = json!({"device": "relay-board-1", "channel": 2});
    for (id, args) in [
        ("c-r1", json!({"action": "pulse", "ms": 500})),
        ("c-r2", json!({"action": "pulse"})),
        ("c-r3", json!({"action": "on"})),
        ("c-r4", json!({"action": "off"})),
    ] {
        let o = f.send(&command(id, "relay", target.clone(), args));
        assert_result(&o, "done", None, Some(id));
        assert!(o.effects.is_empty());
    }
    let d = "relay-board-1".to_string();
    assert_eq!(
        f.relays.executed(),
        vec![
            (d.clone(), 2, RelayOp::Pulse { ms: 500 }),
            (d.clone(), 2, RelayOp::Pulse { ms: 3000 }),
            (d.clone(), 2, RelayOp::On),
            (d, 2, RelayOp::Off),
        ]
    );
}

#[test]
fn lock_and_locate_are_done() {
    let f = fx();
    let o = f.send(&command(
        "c-l",
        "lock",
        json!({"unit": "A-102"}),
        Value::Null,
    ));
    assert_result(&o, "done", None, Some("c-l"));
    let o = f.send(&command(
        "c-f",
        "locate",
        json!({"unit": "B-201"}),
        json!({}),
    ));
    assert_result(&o, "done", None, Some("c-f"));
    assert!(o.effects.is_empty());
    assert_eq!(
        f.units.executed(),
        vec![
            ("lock-a102".to_string(), UnitAction::Lock),
            ("lock-b201".to_string(), UnitAction::Locate),
        ]
    );
}

#[test]
fn emergency_unlock_yields_an_override_effect() {
    let f = fx();
    let o = f.send(&command(
        "c-em",
        "emergency_unlock",
        json!({"unit": "A-101"}),
        json!({"reason": "tenant_locked_phone_in_unit", "note": "called the office"}),
    ));
    assert_result(&o, "done", None, Some("c-em"));
    assert_eq!(o.result.name, "emergency_unlock");
    assert_eq!(
        o.effects,
        vec![Effect::OverrideUnlock {
            unlock: UnlockRecord {
                command_id: "c-em".into(),
                target: TargetRef::Unit("A-101".into()),
                device: Some("lock-a101".into()),
                status: "done".into(),
                reason: None,
            },
            emergency: Emergency {
                reason: EmergencyReason::TenantLockedPhoneInUnit,
                note: Some("called the office".into()),
            },
        }]
    );
    assert_eq!(
        f.units.executed(),
        vec![("lock-a101".to_string(), UnitAction::Unlock)]
    );
    // An emergency unlock of an entry pulses its relay.
    let o = f.send(&command(
        "c-em-2",
        "emergency_unlock",
        json!({"entry": "gate-1"}),
        json!({"reason": "fire_or_safety"}),
    ));
    assert_result(&o, "done", None, Some("c-em-2"));
    assert!(matches!(&o.effects[..], [Effect::OverrideUnlock { .. }]));
}

#[test]
fn device_failure_is_failed() {
    let f = fx();
    f.units.set_failure("lock-a101", Some("motor jammed"));
    let o = f.send(&unlock_unit("c-jam", "A-101"));
    assert_result(&o, "failed", Some("device_error"), Some("c-jam"));
    assert_eq!(o.result.detail.as_deref(), Some("motor jammed"));
    let Effect::RemoteUnlock(rec) = &o.effects[0] else {
        panic!("{:?}", o.effects)
    };
    assert_eq!(rec.status, "failed");
}

#[test]
fn ping_resync_and_install_mode_are_handled_by_the_router() {
    let f = fx();
    let o = f.send(&command("c-ping", "ping", Value::Null, Value::Null));
    assert_result(&o, "done", None, Some("c-ping"));
    assert_eq!(o.result.detail.as_deref(), Some("pong"));
    assert!(o.effects.is_empty());

    let o = f.send(&command("c-resync", "resync", Value::Null, json!({})));
    assert_result(&o, "done", None, Some("c-resync"));
    assert_eq!(o.effects, vec![Effect::Resync]);

    let o = f.send(&command(
        "c-im",
        "install_mode",
        Value::Null,
        json!({"action": "start", "minutes": 30}),
    ));
    assert_result(&o, "done", None, Some("c-im"));
    assert_eq!(
        o.effects,
        vec![Effect::InstallMode {
            until: Some(now() + Duration::minutes(30))
        }]
    );
    let o = f.send(&command(
        "c-im-stop",
        "install_mode",
        Value::Null,
        json!({"action": "stop"}),
    ));
    assert_eq!(o.effects, vec![Effect::InstallMode { until: None }]);
    assert!(f.nothing_executed());
}

#[test]
fn adopt_and_remove_without_installer_pairing_are_refused() {
    let f = fx();
    let o = f.send(&command(
        "c-ad",
        "adopt",
        Value::Null,
        json!({"candidate": "osdp:bus-1:5", "entry": "gate-1"}),
    ));
    assert_result(&o, "refused", Some("not_in_install_mode"), Some("c-ad"));
    let o = f.send(&command(
        "c-rm",
        "remove",
        Value::Null,
        json!({"device": "d"}),
    ));
    assert_result(&o, "refused", Some("not_in_install_mode"), Some("c-rm"));
    let o = f.send(&command(
        "c-ad-t",
        "adopt",
        json!({"unit": "A-101"}),
        json!({"candidate": "osdp:bus-1:5"}),
    ));
    assert_result(&o, "refused", Some("bad_target"), Some("c-ad-t"));
    assert!(o.effects.is_empty());
    assert!(f.nothing_executed());
}

// ----------------------------------------------------------------------------- sleeping devices

#[test]
fn queued_then_wake_is_done() {
    let f = fx();
    f.units.set_online("lock-a102", Online::Asleep);
    let cmd = unlock_unit("c-sleep", "A-102");
    let bytes = sign(&cmd, &f.key);
    let o = f.send_bytes(&bytes, "unlock");
    assert_result(&o, "queued", None, Some("c-sleep"));
    assert!(o.effects.is_empty(), "no final outcome yet");
    assert!(f.nothing_executed());
    assert_eq!(
        f.router.pending(),
        vec![("c-sleep".to_string(), "lock-a102".to_string())]
    );
    // A redelivery while it waits is answered `queued` and not queued twice.
    let again = f.send_bytes(&bytes, "unlock");
    assert!(again.duplicate);
    assert_eq!(again.result.status, "queued");
    assert_eq!(f.router.pending().len(), 1);

    // Another device waking does nothing.
    assert!(handle_wake(&f.router, &f.store, "lock-a101", now()).is_empty());

    f.units.set_online("lock-a102", Online::Yes);
    let woke = now() + Duration::minutes(2);
    let out = handle_wake(&f.router, &f.store, "lock-a102", woke);
    assert_eq!(out.len(), 1);
    assert_result(&out[0], "done", None, Some("c-sleep"));
    assert_eq!(out[0].result.at, woke);
    assert!(matches!(&out[0].effects[..], [Effect::RemoteUnlock(r)] if r.status == "done"));
    assert_eq!(
        f.units.executed(),
        vec![("lock-a102".to_string(), UnitAction::Unlock)]
    );
    assert!(f.router.pending().is_empty());
    // The stored result is now the final one.
    let again = f.send_at(&bytes, "unlock", woke);
    assert!(again.duplicate);
    assert_eq!(again.result, out[0].result);
    assert_eq!(f.units.executed().len(), 1);
}

#[test]
fn queued_then_expire_is_expired() {
    let f = fx();
    f.units.set_online("lock-a102", Online::Asleep);
    let o = f.send(&command(
        "c-late",
        "emergency_unlock",
        json!({"unit": "A-102"}),
        json!({"reason": "tenant_lost_phone"}),
    ));
    assert_result(&o, "queued", None, Some("c-late"));
    // Not yet expired.
    assert!(handle_expire(&f.router, &f.store, now() + Duration::minutes(4)).is_empty());
    let at = now() + Duration::minutes(5);
    let out = handle_expire(&f.router, &f.store, at);
    assert_eq!(out.len(), 1);
    assert_result(&out[0], "expired", Some("target_asleep"), Some("c-late"));
    match &out[0].effects[..] {
        [Effect::OverrideUnlock { unlock, emergency }] => {
            assert_eq!(unlock.status, "expired");
            assert_eq!(emergency.reason, EmergencyReason::TenantLostPhone);
        }
        other => panic!("{other:?}"),
    }
    assert!(f.router.pending().is_empty());
    // Waking later executes nothing.
    f.units.set_online("lock-a102", Online::Yes);
    assert!(handle_wake(&f.router, &f.store, "lock-a102", at).is_empty());
    assert!(f.nothing_executed());
    let seen = f.store.commands().get("c-late").unwrap().unwrap();
    assert_eq!(seen.result.unwrap()["status"], "expired");
}

#[test]
fn wake_after_expiry_reports_expired_and_keeps_order() {
    let f = fx();
    f.units.set_online("lock-a102", Online::Asleep);
    let mut short = unlock_unit("c-short", "A-102");
    short.expires_at = now() + Duration::minutes(1);
    assert_result(&f.send(&short), "queued", None, Some("c-short"));
    let lock = command("c-lock", "lock", json!({"unit": "A-102"}), Value::Null);
    assert_result(&f.send(&lock), "queued", None, Some("c-lock"));
    f.units.set_online("lock-a102", Online::Yes);
    let out = handle_wake(
        &f.router,
        &f.store,
        "lock-a102",
        now() + Duration::minutes(2),
    );
    let got: Vec<_> = out
        .iter()
        .map(|o| (o.result.id.clone().unwrap(), o.result.status.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("c-short".to_string(), "expired".to_string()),
            ("c-lock".to_string(), "done".to_string()),
        ]
    );
    assert_eq!(
        f.units.executed(),
        vec![("lock-a102".to_string(), UnitAction::Lock)]
    );
}

#[test]
fn device_falling_asleep_again_keeps_its_commands() {
    let f = fx();
    f.units.set_online("lock-a102", Online::Asleep);
    assert_result(
        &f.send(&unlock_unit("c-z1", "A-102")),
        "queued",
        None,
        Some("c-z1"),
    );
    // Woken, but it is asleep again by the time the router talks to it.
    assert!(handle_wake(&f.router, &f.store, "lock-a102", now()).is_empty());
    assert_eq!(f.router.pending().len(), 1);
    f.units.set_online("lock-a102", Online::Yes);
    let out = handle_wake(&f.router, &f.store, "lock-a102", now());
    assert_result(&out[0], "done", None, Some("c-z1"));
}

#[test]
fn verify_alone_returns_the_command() {
    let key = SigningKey::from_bytes(&[11; 32]);
    let cmd = unlock_unit("c-v", "A-101");
    let mut cfg = CommandConfig::new(key.verifying_key(), SITE, GATEWAY);
    cfg.max_bytes = 4096;
    let got = verify(&sign(&cmd, &key), "unlock", &cfg, now()).unwrap();
    assert_eq!(got, cmd);
    let err = verify(b"nope", "unlock", &cfg, now()).unwrap_err();
    assert_eq!(err.status(), RefusalStatus::Malformed);
    assert_eq!(err.reason.as_str(), "not_json");
    assert_eq!(err.id, None);
}
