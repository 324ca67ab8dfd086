//! Everything gatehouse reads from outside must refuse bad input with an error, never panic:
//! sync documents (and the site built from them), offline digital keys, config files.
//! Random bytes and mutations of valid documents, through proptest. `make test` runs the default
//! case count; `FUZZ_CASES=200000 cargo test --release --test fuzz_parsers` runs longer.

use chrono::{TimeZone, Utc};
use ed25519_dalek::SigningKey;
use gatehouse::policy::digital_key::{self, KeyPayload};
use gatehouse::policy::{self, Context, Direction, Presented, Request, Target};
use gatehouse::site::{CodeKey, Site};
use gatehouse::sync::{self, SyncMessage};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000)
}

fn demo() -> &'static [u8] {
    include_bytes!("../config/demo-snapshot.json")
}

/// Mutations of a valid document: flip, insert, delete bytes, truncate, splice JSON tokens.
fn mutated(base: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    let tokens: Vec<&'static [u8]> = vec![
        b"null",
        b"-1",
        b"18446744073709551616",
        b"\"\"",
        b"[]",
        b"{}",
        b"\"24:00\"",
        b"\"99:99\"",
        b"true",
        b"\"9999-12-31T23:59:59Z\"",
        b"\"+262142-01-01T00:00:00Z\"",
        b"1e999",
        b"\"\\u0000\"",
    ];
    (
        prop::collection::vec((0..base.len(), any::<u8>(), 0..4u8), 1..6),
        prop::sample::select(tokens),
    )
        .prop_map(move |(edits, token)| {
            let mut v = base.to_vec();
            for (pos, byte, op) in edits {
                let pos = pos.min(v.len().saturating_sub(1));
                match op {
                    0 => v[pos] = byte,
                    1 => v.insert(pos, byte),
                    2 => {
                        v.remove(pos);
                    }
                    _ => {
                        // Replace the value after a colon with a token.
                        if let Some(colon) = v[pos..].iter().position(|&b| b == b':') {
                            let start = pos + colon + 1;
                            let end = v[start..]
                                .iter()
                                .position(|&b| b == b',' || b == b'}')
                                .map_or(v.len(), |e| start + e);
                            v.splice(start..end, token.iter().copied());
                        }
                    }
                }
            }
            v
        })
}

/// Whatever parses must build (or refuse to build) a site and answer decisions without panic.
fn exercise(bytes: &[u8]) {
    let Ok(msg) = sync::parse(bytes) else { return };
    let SyncMessage::Snapshot(s) = msg else {
        return;
    };
    let Ok(site) = Site::from_snapshot(&s, &CodeKey::from_bytes([3; 32])) else {
        return;
    };
    let ctx = Context {
        code_key: &CodeKey::from_bytes([3; 32]),
        digital_key_public: None,
    };
    let at = Utc.with_ymd_and_hms(2026, 11, 1, 6, 10, 0).unwrap();
    for cred in [
        Presented::Code("123456"),
        Presented::Fob("FOB-A1B2C3"),
        Presented::Code("000000"),
    ] {
        for target in [
            Target::Entry("gate-1"),
            Target::Entry("exit-1"),
            Target::Unit("A-101"),
        ] {
            for direction in [Direction::In, Direction::Out] {
                let _ = policy::decide(
                    &site,
                    &ctx,
                    &Request {
                        credential: cred,
                        target,
                        direction,
                    },
                    at,
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn sync_parse_never_panics_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        exercise(&bytes);
    }

    #[test]
    fn sync_parse_never_panics_on_mutated_snapshots(bytes in mutated(demo())) {
        exercise(&bytes);
    }

    #[test]
    fn digital_keys_never_panic(bytes in mutated(br#"{"payload":"eyJ2IjoxfQ","signature":"AAAA"}"#),
                                noise in prop::collection::vec(any::<u8>(), 0..256),
                                secs in any::<i64>()) {
        let signer = SigningKey::from_bytes(&[5; 32]);
        let public = signer.verifying_key();
        let _ = digital_key::verify(&bytes, &public);
        let _ = digital_key::verify(&noise, &public);
        // A validly signed key with extreme times must be judged, not crash the decision.
        let t = Utc.timestamp_opt(secs % 8_000_000_000_000, 0).single().unwrap_or_else(Utc::now);
        let payload = KeyPayload {
            v: 2, site: "s".into(), key_id: "k".into(), user: "alice".into(), units: vec!["A-101".into()],
            entries: vec!["gate-1".into()], issued_at: t, not_before: t, expires_at: t,
        };
        let token = digital_key::sign(&payload, &signer);
        let SyncMessage::Snapshot(s) = sync::parse(demo()).unwrap() else { unreachable!() };
        let site = Site::from_snapshot(&s, &CodeKey::from_bytes([3; 32])).unwrap();
        let keys = digital_key::KeyVerifier::new(public, "s");
        let ctx = Context { code_key: &CodeKey::from_bytes([3; 32]), digital_key_public: Some(&keys) };
        for target in [Target::Entry("gate-1"), Target::Unit("A-101")] {
            let _ = policy::decide(&site, &ctx, &Request { credential: Presented::DigitalKey(&token), target, direction: Direction::In }, t);
        }
    }

    #[test]
    fn config_parse_never_panics(bytes in mutated(include_bytes!("../config/gatehouse.example.toml"))) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = gatehouse::config::Config::parse(std::path::Path::new("/nonexistent/fuzz.toml"), &text);
    }
}
