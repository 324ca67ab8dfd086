//! The MQTT examples in docs/examples/mqtt/ are read by the gateway's own message types
//! (src/cloud/messages.rs), the signed command of docs/mqtt-api.md verifies and is accepted by the
//! gateway's command checks, and the page names every example, schema, command and emergency
//! reason. The JSON Schema side of the same files is checked by tests/schemas/check_examples.py,
//! which maps file names to schemas with the same prefixes as [`kind_of`].

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, Duration};
use ed25519_dalek::{Signature, Signer as _, SigningKey};
use gatehouse::ble::rpc::{UnlockRequest, UnlockResponse};
use gatehouse::cloud::commands::{self, CommandName, EmergencyReason};
use gatehouse::cloud::messages::{
    AlertsMessage, COMMAND_CONTEXT, Command, CommandResult, EventMessage, Health,
    MAX_PUBLISHED_ALERTS, SignedCommand, SnapshotChunk, Status, SyncResult,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

/// The demo command key of docs/mqtt-api.md and config/demo.toml (public; never on a real site).
const DEMO_SEED: [u8; 32] = [7; 32];
const DEMO_PUBLIC: &str = "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c";
/// The payload bytes of the worked example, exactly as signed.
const EXAMPLE_PAYLOAD: &str = r#"{"v":2,"site":"site-0042","gateway":"gw-1","id":"c7d1f0a2-5b9e-4c3a-8f61-0d2e4b7a9c15","name":"unlock","issued_at":"2026-11-23T21:15:00Z","expires_at":"2026-11-23T21:17:00Z","target":{"unit":"A-101"}}"#;

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading `{}`: {e}", path.display()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Status,
    Event,
    SnapshotChunk,
    SyncResult,
    CommandEnvelope,
    CommandResult,
    Command,
    BleUnlockRequest,
    BleUnlockResponse,
    DeviceState,
    Health,
    PairingState,
    PairingDiscovered,
    Alerts,
}

const ALL_KINDS: [Kind; 14] = [
    Kind::PairingState,
    Kind::PairingDiscovered,
    Kind::Health,
    Kind::Alerts,
    Kind::BleUnlockRequest,
    Kind::BleUnlockResponse,
    Kind::DeviceState,
    Kind::Status,
    Kind::Event,
    Kind::SnapshotChunk,
    Kind::SyncResult,
    Kind::CommandEnvelope,
    Kind::CommandResult,
    Kind::Command,
];

/// File name -> message, by prefix, first match wins (same table as check_examples.py).
fn kind_of(file_name: &str) -> Option<Kind> {
    const PREFIXES: [(&str, Kind); 14] = [
        ("pairing-state", Kind::PairingState),
        ("pairing-discovered", Kind::PairingDiscovered),
        ("status-", Kind::Status),
        ("health", Kind::Health),
        ("alerts", Kind::Alerts),
        ("ble-unlock-request", Kind::BleUnlockRequest),
        ("ble-unlock-response", Kind::BleUnlockResponse),
        ("device-state-", Kind::DeviceState),
        ("event-", Kind::Event),
        ("snapshot-chunk-", Kind::SnapshotChunk),
        ("sync-result-", Kind::SyncResult),
        ("command-envelope", Kind::CommandEnvelope),
        ("command-result-", Kind::CommandResult),
        ("command-", Kind::Command),
    ];
    PREFIXES
        .iter()
        .find(|(p, _)| file_name.starts_with(p))
        .map(|(_, k)| *k)
}

fn examples() -> Vec<(String, Kind, String)> {
    let dir = repo("docs/examples/mqtt");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("docs/examples/mqtt") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let kind = kind_of(&name)
            .unwrap_or_else(|| panic!("docs/examples/mqtt/{name}: no message type for this name"));
        out.push((name, kind, read(&path)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Reads `text` as `T` (unknown fields are errors in these types), then checks that writing it
/// back gives the same JSON: nothing in the example is lost or read differently.
fn read_as<T: DeserializeOwned + Serialize>(name: &str, text: &str) -> T {
    let de = &mut serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(de)
        .unwrap_or_else(|e| panic!("{name}: does not read as the gateway's type: {e}"));
    let original: serde_json::Value = serde_json::from_str(text).unwrap();
    let mut back = serde_json::to_value(&value).unwrap();
    // `target: null` / `args: null` are written back as null; compare without them.
    if let (Some(o), Some(b)) = (original.as_object(), back.as_object_mut()) {
        b.retain(|k, v| !v.is_null() || o.contains_key(k));
    }
    assert_eq!(
        back, original,
        "{name}: reading and writing it back changes it"
    );
    value
}

#[test]
fn every_example_reads_as_its_message_type() {
    let examples = examples();
    for kind in ALL_KINDS {
        assert!(
            examples.iter().any(|(_, k, _)| *k == kind),
            "no example for {kind:?}"
        );
    }
    for (name, kind, text) in &examples {
        match kind {
            Kind::Status => {
                let s: Status = read_as(name, text);
                let online_fields = [
                    s.started_at.is_some(),
                    s.gatehouse_version.is_some(),
                    s.site_version.is_some(),
                    s.outbox.is_some(),
                    s.storage.is_some(),
                ];
                // The will carries the four required fields only; online status all of them.
                assert!(
                    online_fields.iter().all(|f| *f == s.online),
                    "{name}: online {} with fields {online_fields:?}",
                    s.online
                );
            }
            Kind::Health => {
                let h: Health = read_as(name, text);
                assert!(
                    h.buses.values().all(|b| b.online <= b.total),
                    "{name}: online within total"
                );
                assert_eq!(h.storage.state, "ok", "{name}");
            }
            Kind::Alerts => {
                let a: AlertsMessage = read_as(name, text);
                assert!(
                    a.alerts.len() as u64 <= a.total,
                    "{name}: listed within total"
                );
                assert!(
                    a.alerts.len() <= MAX_PUBLISHED_ALERTS,
                    "{name}: at most the limit"
                );
                assert!(
                    a.alerts
                        .windows(2)
                        .all(|w| w[0].raised_at <= w[1].raised_at),
                    "{name}: oldest raise first"
                );
            }
            Kind::Event => {
                let e: EventMessage = read_as(name, text);
                let (epoch, seq) = e.id.split_once('-').expect("id is <epoch>-<seq>");
                assert_eq!(epoch.len(), 16, "{name}: epoch of 16 hex digits");
                assert!(epoch.bytes().all(|b| b.is_ascii_hexdigit()));
                assert_eq!(seq, e.seq.to_string(), "{name}: id ends with seq");
                DateTime::parse_from_rfc3339(&e.local).expect("local is RFC 3339");
                assert_eq!(
                    DateTime::parse_from_rfc3339(&e.local).unwrap(),
                    e.at,
                    "{name}: local is the same instant as at"
                );
            }
            Kind::SnapshotChunk => {
                let c: SnapshotChunk = read_as(name, text);
                assert!(c.index < c.count, "{name}: index below count");
                STANDARD.decode(&c.data).expect("data is standard base64");
            }
            Kind::SyncResult => {
                let r: SyncResult = read_as(name, text);
                assert!(["applied", "resync_needed", "refused"].contains(&r.status.as_str()));
                assert_eq!(r.reason.is_none(), r.status == "applied", "{name}: reason");
            }
            Kind::CommandEnvelope => {
                let _: SignedCommand = read_as(name, text);
            }
            Kind::CommandResult => {
                let r: CommandResult = read_as(name, text);
                assert!(
                    [
                        "done",
                        "queued",
                        "refused",
                        "failed",
                        "expired",
                        "malformed"
                    ]
                    .contains(&r.status.as_str()),
                    "{name}: status {}",
                    r.status
                );
                assert_eq!(
                    r.reason.is_none(),
                    ["done", "queued"].contains(&r.status.as_str()),
                    "{name}: reason"
                );
                assert!(r.id.is_some() || r.status == "malformed", "{name}: id");
            }
            Kind::BleUnlockRequest => {
                let r: UnlockRequest = read_as(name, text);
                assert_eq!(r.session.len(), 40, "{name}: a 20-byte session");
            }
            Kind::BleUnlockResponse => {
                let r: UnlockResponse = read_as(name, text);
                assert!(
                    r.commands.is_some() != r.error.is_some(),
                    "{name}: one of two"
                );
                if let Some(c) = &r.commands {
                    gatehouse::ble::noke::parse_command_packets(c)
                        .unwrap_or_else(|e| panic!("{name}: packets refused: {e}"));
                }
            }
            Kind::DeviceState => {
                let v: serde_json::Value = serde_json::from_str(text).unwrap();
                let device = v["device"].as_str().expect("device").to_string();
                // The gateway's own board produces this shape from the same fields.
                let states = gatehouse::devstate::DeviceStates::new();
                let fields: Vec<(&str, serde_json::Value)> = v
                    .as_object()
                    .unwrap()
                    .iter()
                    .filter(|(k, _)| *k != "device")
                    .map(|(k, x)| (k.as_str(), x.clone()))
                    .collect();
                states.set(&device, &fields);
                assert_eq!(states.get(&device).unwrap(), v, "{name}");
            }
            Kind::PairingState => {
                let v: serde_json::Value = serde_json::from_str(text).unwrap();
                assert!(
                    v["active"].is_boolean() && v["registered"].is_u64(),
                    "{name}"
                );
                let total = v["candidates"]["total"].as_u64().unwrap();
                let by: u64 = v["candidates"]["by_family"]
                    .as_object()
                    .unwrap()
                    .values()
                    .map(|n| n.as_u64().unwrap())
                    .sum();
                assert_eq!(total, by, "{name}: total is the sum by family");
            }
            Kind::PairingDiscovered => {
                let v: serde_json::Value = serde_json::from_str(text).unwrap();
                // The gateway's own candidate type reads each one.
                let c: Vec<gatehouse::pairing::Candidate> =
                    serde_json::from_value(v["candidates"].clone()).expect(name);
                assert!(!c.is_empty(), "{name}");
            }
            Kind::Command => {
                let c: Command = read_as(name, text);
                // The file is named after the command: command-emergency-unlock.json.
                let stem = name
                    .trim_start_matches("command-")
                    .trim_end_matches(".json")
                    .replace('-', "_");
                assert_eq!(c.name, stem, "{name}: name");
                assert_eq!(c.v, gatehouse::cloud::messages::COMMAND_VERSION);
                // Every example is for the gateway of the page's topics.
                assert_eq!((c.site.as_str(), c.gateway.as_str()), ("site-0042", "gw-1"));
                assert!(c.expires_at > c.issued_at, "{name}: expires after issued");
                commands::parse(&c)
                    .unwrap_or_else(|r| panic!("{name}: refused by the gateway: {r:?}"));
            }
        }
    }
}

#[test]
fn the_snapshot_parts_make_a_snapshot_that_applies() {
    let parts: Vec<SnapshotChunk> = examples()
        .into_iter()
        .filter(|(_, k, _)| *k == Kind::SnapshotChunk)
        .map(|(name, _, text)| read_as(&name, &text))
        .collect();
    assert!(parts.len() >= 2, "the example shows a snapshot in parts");
    let first = &parts[0];
    assert_eq!(parts.len() as u32, first.count);
    let mut doc = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(
            (&p.id, p.count, &p.sha256),
            (&first.id, first.count, &first.sha256)
        );
        assert_eq!(p.index as usize, i);
        doc.extend(STANDARD.decode(&p.data).unwrap());
    }
    assert_eq!(hex::encode(Sha256::digest(&doc)), first.sha256);
    let msg = gatehouse::sync::parse(&doc).expect("the joined parts are a valid snapshot");
    let dir = tempfile::tempdir().unwrap();
    let store = gatehouse::store::Store::open(dir.path(), 1000).unwrap();
    let applied = store.apply(&msg).expect("the snapshot applies");

    let result: SyncResult = read_as(
        "sync-result-applied.json",
        &read(&repo("docs/examples/mqtt/sync-result-applied.json")),
    );
    assert_eq!(result.id.as_deref(), Some(first.id.as_str()));
    assert_eq!(result.version, Some(applied.version));
    assert_eq!(result.current_version, applied.version);
}

fn envelope_of(payload: &[u8], signer: &SigningKey) -> SignedCommand {
    let mut msg = COMMAND_CONTEXT.to_vec();
    msg.extend_from_slice(payload);
    SignedCommand {
        payload: URL_SAFE_NO_PAD.encode(payload),
        signature: URL_SAFE_NO_PAD.encode(signer.sign(&msg).to_bytes()),
    }
}

#[test]
fn the_documented_signed_command_verifies() {
    let signer = SigningKey::from_bytes(&DEMO_SEED);
    let public = signer.verifying_key();
    assert_eq!(hex::encode(public.to_bytes()), DEMO_PUBLIC);
    let expected = envelope_of(EXAMPLE_PAYLOAD.as_bytes(), &signer);
    let expected_line = serde_json::to_string(&expected).unwrap();
    println!("signed example: {expected_line}");

    // The example file is that envelope.
    let file = read(&repo("docs/examples/mqtt/command-envelope.json"));
    let env: SignedCommand = serde_json::from_str(&file).unwrap();
    assert_eq!(
        env, expected,
        "command-envelope.json is not the signed example; it should be {expected_line}"
    );

    // Verified independently of the gateway's code: context || payload bytes.
    let payload = URL_SAFE_NO_PAD.decode(&env.payload).unwrap();
    assert_eq!(payload, EXAMPLE_PAYLOAD.as_bytes());
    let sig: [u8; 64] = URL_SAFE_NO_PAD
        .decode(&env.signature)
        .unwrap()
        .try_into()
        .unwrap();
    let mut signed = b"gatehouse-command-v1\0".to_vec();
    signed.extend_from_slice(&payload);
    assert_eq!(&signed[..21], COMMAND_CONTEXT);
    public
        .verify_strict(&signed, &Signature::from_bytes(&sig))
        .expect("the documented signature verifies");

    // The payload is command-unlock.json.
    let unlock: serde_json::Value =
        serde_json::from_str(&read(&repo("docs/examples/mqtt/command-unlock.json"))).unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&payload).unwrap(),
        unlock
    );

    // The page shows the same bytes, envelope, key and signature.
    let md = read(&repo("docs/mqtt-api.md"));
    for s in [
        EXAMPLE_PAYLOAD,
        expected_line.as_str(),
        DEMO_PUBLIC,
        env.signature.as_str(),
    ] {
        assert!(md.contains(s), "docs/mqtt-api.md does not show `{s}`");
    }

    // The gateway's own checks accept it inside its validity, and refuse it outside.
    let cmd: Command = serde_json::from_slice(&payload).unwrap();
    let bytes = file.as_bytes();
    let skew = Duration::seconds(30);
    let at = cmd.issued_at + Duration::seconds(1);
    let cfg = |public| {
        let mut c = commands::CommandConfig::new(public, "site-0042", "gw-1");
        c.max_skew = skew;
        c
    };
    let ok = commands::verify(bytes, "unlock", &cfg(public), at)
        .expect("the gateway accepts the documented command");
    assert_eq!(ok, cmd);
    let late =
        commands::verify(bytes, "unlock", &cfg(public), cmd.expires_at).expect_err("expired");
    assert_eq!(late.reason.as_str(), "expired");
    let wrong_topic = commands::verify(bytes, "lock", &cfg(public), at).expect_err("name mismatch");
    assert_eq!(wrong_topic.reason.as_str(), "name_mismatch");
    // The same bytes at another site, or at another gateway of the same site: not for them.
    for (site, gateway) in [("site-0043", "gw-1"), ("site-0042", "gw-2")] {
        let mut other = cfg(public);
        other.site = site.into();
        other.gateway = gateway.into();
        let e = commands::verify(bytes, "unlock", &other, at).expect_err("another gateway");
        assert_eq!(e.reason.as_str(), "wrong_gateway");
        assert_eq!(e.status().as_str(), "refused");
    }
    let other_key = SigningKey::from_bytes(&[8; 32]).verifying_key();
    let forged = commands::verify(bytes, "unlock", &cfg(other_key), at).expect_err("other key");
    assert_eq!(forged.reason.as_str(), "bad_signature");
    assert_eq!(forged.id.as_deref(), Some(cmd.id.as_str()));
}

#[test]
fn the_page_names_every_example_schema_command_and_reason() {
    let md = read(&repo("docs/mqtt-api.md"));
    for (name, _, _) in examples() {
        assert!(
            md.contains(&name),
            "docs/mqtt-api.md does not mention `{name}`"
        );
    }
    for entry in std::fs::read_dir(repo("docs/schemas")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with("mqtt-") {
            assert!(
                md.contains(&name),
                "docs/mqtt-api.md does not mention `{name}`"
            );
        }
    }
    let schema: serde_json::Value =
        serde_json::from_str(&read(&repo("docs/schemas/mqtt-command.schema.json"))).unwrap();
    let names: Vec<&str> = schema["properties"]["name"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let gateway_names: Vec<&str> = CommandName::ALL.iter().map(|n| n.as_str()).collect();
    assert_eq!(names, gateway_names, "command names: schema vs gateway");
    for n in gateway_names {
        assert!(
            md.contains(&format!("| `{n}` |")),
            "no row for command `{n}`"
        );
    }
    let reasons: Vec<&str> = schema["$defs"]["EmergencyReason"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let gateway_reasons: Vec<&str> = EmergencyReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        reasons, gateway_reasons,
        "emergency reasons: schema vs gateway"
    );
    for r in gateway_reasons {
        assert!(
            md.contains(&format!("| `{r}` |")),
            "no row for reason `{r}`"
        );
    }
    for reason in [
        "too_large",
        "not_json",
        "bad_payload",
        "unsigned",
        "bad_signature",
        "unsupported_version",
        "wrong_gateway",
        "name_mismatch",
        "expired",
        "issued_in_future",
        "bad_times",
        "unknown_command",
        "bad_target",
        "bad_reason",
        "bad_args",
        "unknown_target",
        "no_controller",
        "target_offline",
        "duplicate",
        "queue_full",
        "device_error",
        "target_asleep",
    ] {
        assert!(
            md.contains(&format!("`{reason}`")),
            "docs/mqtt-api.md does not explain `{reason}`"
        );
    }
}
