//! Prints a signed offline digital key for the demo site, as the cloud would issue it.
//! `cargo run --example sign_demo_key -- alice A-101 gate-1 [SITE] > /tmp/key.json`
//! SITE is the site the key is for (default `demo-site`, the `[site] id` of config/demo.toml).
//! The demo signing key is a fixed, public test key: never use it on a real site.

use chrono::{Duration, Utc};
use ed25519_dalek::SigningKey;
use gatehouse::policy::digital_key::{KeyPayload, sign};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let user = args.first().cloned().unwrap_or_else(|| "alice".into());
    let unit = args.get(1).cloned().unwrap_or_else(|| "A-101".into());
    let entry = args.get(2).cloned().unwrap_or_else(|| "gate-1".into());
    let site = args.get(3).cloned().unwrap_or_else(|| "demo-site".into());
    let signer = SigningKey::from_bytes(&[7u8; 32]);
    if args.first().map(String::as_str) == Some("--public") {
        println!("{}", hex::encode(signer.verifying_key().to_bytes()));
        return;
    }
    let now = Utc::now();
    let payload = KeyPayload {
        v: gatehouse::policy::digital_key::KEY_VERSION,
        site,
        key_id: format!("dk-{user}-1"),
        user,
        units: vec![unit],
        entries: vec![entry],
        issued_at: now,
        not_before: now - Duration::minutes(1),
        expires_at: now + Duration::hours(8),
    };
    println!(
        "{}",
        String::from_utf8(sign(&payload, &signer)).expect("utf-8")
    );
}
