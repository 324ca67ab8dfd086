//! Prints a signed command, as the cloud sends it on `<prefix>/<site>/<gateway>/cmd/<name>`,
//! signed with the demo's fixed, public test key (never on a real site):
//!
//! ```sh
//! cargo run -q --example sign_command -- unlock unit A-101 \
//!   | mosquitto_pub -h 127.0.0.1 -t gatehouse/demo-site/demo-gw/cmd/unlock -s
//! cargo run -q --example sign_command -- emergency_unlock unit A-101 '{"reason":"tenant_locked_phone_in_unit"}'
//! cargo run -q --example sign_command -- ping
//! GATEHOUSE_SITE=site-0042 GATEHOUSE_GATEWAY=gw-1 cargo run -q --example sign_command -- ping
//! ```
//!
//! A command names the gateway it is for (`site`, `gateway`): by default the demo's
//! `demo-site` / `demo-gw` (config/demo.toml), else `GATEHOUSE_SITE` / `GATEHOUSE_GATEWAY`.

use chrono::{Duration, Utc};
use ed25519_dalek::SigningKey;
use gatehouse::cloud::commands::sign;
use gatehouse::cloud::messages::{Command, CommandTarget};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().cloned().unwrap_or_else(|| "ping".into());
    let mut target = CommandTarget {
        unit: None,
        entry: None,
        device: None,
        channel: None,
    };
    match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("unit"), Some(id)) => target.unit = Some(id.clone()),
        (Some("entry"), Some(id)) => target.entry = Some(id.clone()),
        (Some("device"), Some(id)) => {
            target.device = Some(id.clone());
            target.channel = args.get(4).and_then(|c| c.parse().ok());
        }
        _ => {}
    }
    let has_target = target.unit.is_some() || target.entry.is_some() || target.device.is_some();
    let extra = args.get(3).map_or(serde_json::Value::Null, |a| {
        serde_json::from_str(a).expect("args must be JSON")
    });
    let now = Utc::now();
    let mut id = [0u8; 6];
    getrandom::getrandom(&mut id).expect("randomness");
    let cmd = Command {
        v: gatehouse::cloud::messages::COMMAND_VERSION,
        site: std::env::var("GATEHOUSE_SITE").unwrap_or_else(|_| "demo-site".into()),
        gateway: std::env::var("GATEHOUSE_GATEWAY").unwrap_or_else(|_| "demo-gw".into()),
        id: format!("cmd-{}", hex::encode(id)),
        name,
        issued_at: now,
        expires_at: now + Duration::minutes(5),
        target: has_target.then_some(target),
        args: extra,
    };
    let signer = SigningKey::from_bytes(&[7u8; 32]);
    println!("{}", String::from_utf8(sign(&cmd, &signer)).expect("utf-8"));
}
