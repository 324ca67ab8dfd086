//! No refusal quotes a credential. Keypad codes (and card numbers, fob ids) are sent in every
//! shape a sync document can be refused for — a number where a string is expected, a boolean,
//! an array, an object, nested, too long, a whole snapshot or delta JSON-encoded twice, under
//! wrong field names, as an unknown field's value or name, duplicated — through the real paths:
//! a file import with the `gatehouse` binary, and the daemon over a real mosquitto. Then every
//! output is searched for every code: the binary's stdout and stderr, the daemon's log, every
//! MQTT message a subscriber to the gateway's topics saw (`events`, `sync/result`, ...), and
//! every file of the data directory, as raw bytes.

#[path = "support/broker.rs"]
mod broker;
mod common;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use base64::Engine as _;
use broker::{Broker, Subscriber};
use gatehouse::cloud::messages::{SnapshotChunk, Topics};
use rumqttc::QoS;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const WAIT: Duration = Duration::from_secs(60);
/// A keypad-code-like number sent where a small number (a version) is expected.
const SIX_DIGITS: u32 = 987_654;

/// The refused documents and the secrets they carry.
struct Cases {
    docs: Vec<(String, Vec<u8>)>,
    secrets: HashSet<String>,
}

fn delta(upsert: Value) -> Value {
    // The demo snapshot is at version 1.
    json!({"schema_version": 1, "kind": "delta", "base_version": 1, "version": 2, "upsert": upsert})
}

fn cases() -> Cases {
    let mut n = 5_550_000_000u64;
    let mut secrets = HashSet::new();
    let mut code = || {
        n += 1;
        let c = n.to_string();
        secrets.insert(c.clone());
        c
    };
    let cred = |field: &str, value: Value| {
        let mut c = json!({"id": "c-new", "user": "alice"});
        c[field] = value;
        delta(json!({"credentials": [c]}))
    };
    let mut docs: Vec<(String, Value)> = Vec::new();
    let num = |c: &str| Value::from(c.parse::<u64>().unwrap());
    let c = code();
    docs.push(("code as a number".into(), cred("code", num(&c))));
    let c = code();
    docs.push((
        "code as a float".into(),
        cred("code", json!(c.parse::<f64>().unwrap() + 0.5)),
    ));
    docs.push(("code as a boolean".into(), cred("code", json!(true))));
    let c = code();
    docs.push(("code in an array".into(), cred("code", json!([c]))));
    let c = code();
    docs.push((
        "code as a number in an array".into(),
        cred("code", json!([num(&c)])),
    ));
    let c = code();
    docs.push((
        "code in an object".into(),
        cred("code", json!({"value": c})),
    ));
    let c = code();
    docs.push((
        "code nested".into(),
        cred("code", json!([[{"x": [num(&c)]}]])),
    ));
    let c = code();
    docs.push((
        "code too long".into(),
        cred("code", json!(format!("{c}{c}"))),
    ));
    let c = code();
    docs.push((
        "code with letters".into(),
        cred("code", json!(format!("{c}ab"))),
    ));
    let c = code();
    docs.push(("code under `pin`".into(), cred("pin", json!(c))));
    let c = code();
    docs.push((
        "code under `keypad_code`".into(),
        cred("keypad_code", json!(c)),
    ));
    let c = code();
    docs.push((
        "code as an unknown field's name".into(),
        cred(&c, json!(true)),
    ));
    let c = code();
    docs.push(("code as an unknown top-level field".into(), {
        let mut d = delta(json!({}));
        d[c.as_str()] = json!(c);
        d
    }));
    let c = code();
    docs.push(("code as a role".into(), {
        delta(json!({"users": [{"id": "u-new", "role": c}]}))
    }));
    let c = code();
    docs.push(("code as the kind".into(), {
        let mut d = delta(json!({}));
        d["kind"] = json!(c);
        d
    }));
    let c = code();
    docs.push(("code as the schema_version".into(), {
        let mut d = delta(json!({}));
        d["schema_version"] = json!(c);
        d
    }));
    docs.push(("a 6-digit code as the schema_version number".into(), {
        let mut d = delta(json!({}));
        d["schema_version"] = json!(SIX_DIGITS);
        d
    }));
    let c = code();
    docs.push(("code and code_hmac".into(), {
        let mut d = cred("code", json!(c));
        d["upsert"]["credentials"][0]["code_hmac"] = json!("00");
        d
    }));
    let c = code();
    docs.push(("the same code twice".into(), {
        delta(json!({"credentials": [
            {"id": "c-new-1", "user": "alice", "code": c},
            {"id": "c-new-2", "user": "bob", "code": c},
        ]}))
    }));
    let c = code();
    docs.push((
        "code of an unknown user".into(),
        delta(json!({"credentials": [{"id": "c-new", "user": "nobody", "code": c}]})),
    ));
    let c = code();
    docs.push(("fob as a number".into(), cred("fob", num(&c))));
    let c = code();
    docs.push((
        "card number as a string".into(),
        cred("card", json!({"number": c})),
    ));
    let c = code();
    docs.push((
        "card with an unknown field".into(),
        cred("card", json!({"number": 5, "pin": c})),
    ));
    let c = code();
    docs.push(("temporary_code_secret as a number".into(), {
        delta(json!({"facility": {"time_zone": "America/New_York", "temporary_code_secret": num(&c)}}))
    }));
    let c = code();
    docs.push(("credentials JSON-encoded twice".into(), {
        let inner = json!([{"id": "c-new", "user": "alice", "code": c}]).to_string();
        delta(json!({"credentials": inner}))
    }));
    let mut docs: Vec<(String, Vec<u8>)> = docs
        .into_iter()
        .map(|(name, v)| (name, serde_json::to_vec(&v).unwrap()))
        .collect();
    // Not JSON: cut short right after a code, and a code followed by garbage.
    let c = code();
    docs.push((
        "cut short after a code".into(),
        format!(r#"{{"schema_version":1,"kind":"delta","base_version":1,"version":2,"upsert":{{"credentials":[{{"id":"c","user":"alice","code":"{c}"#).into_bytes(),
    ));
    let c = code();
    docs.push((
        "garbage after a code".into(),
        format!(r#"{{"schema_version":1,"kind":"delta","base_version":1,"version":2,"upsert":{{"credentials":[{{"id":"c","user":"alice","code":"{c}"}}]}}}} {c}"#).into_bytes(),
    ));
    let c = code();
    docs.push(("a bare code".into(), c.clone().into_bytes()));
    // A whole site's snapshot, and a delta, each JSON-encoded twice (one JSON string).
    let snapshot = common::tenants_snapshot(5, 2000, 7_770_000_000);
    let bulk: Vec<String> = snapshot
        .credentials
        .iter()
        .map(|c| c.code.clone().unwrap())
        .collect();
    let text = serde_json::to_string(&snapshot).unwrap();
    docs.push((
        "a snapshot of 2000 codes JSON-encoded twice".into(),
        serde_json::to_vec(&text).unwrap(),
    ));
    let mut many = Vec::new();
    for i in 0..200 {
        let c = code();
        many.push(json!({"id": format!("c-d{i}"), "user": "alice", "code": c}));
    }
    let text = delta(json!({"credentials": many})).to_string();
    docs.push((
        "a delta of 200 codes JSON-encoded twice".into(),
        serde_json::to_vec(&text).unwrap(),
    ));
    secrets.extend(bulk);
    secrets.insert(SIX_DIGITS.to_string());
    Cases { docs, secrets }
}

/// The secrets found in `bytes`: every run of digits is searched for every code length.
fn leaks(bytes: &[u8], secrets: &HashSet<String>) -> Vec<String> {
    let lens: BTreeSet<usize> = secrets.iter().map(String::len).collect();
    let mut found = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let run = &bytes[start..i];
        for &l in &lens {
            for w in run.windows(l) {
                let s = std::str::from_utf8(w).expect("digits");
                if secrets.contains(s) {
                    found.insert(s.to_string());
                }
            }
        }
    }
    found.into_iter().collect()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Searches every file under `dir`; returns `file: codes` lines.
fn leaks_in_dir(dir: &Path, secrets: &HashSet<String>) -> Vec<String> {
    let mut files = Vec::new();
    files_under(dir, &mut files);
    assert!(!files.is_empty(), "no files under {}", dir.display());
    files
        .iter()
        .filter_map(|f| {
            let l = leaks(&std::fs::read(f).unwrap(), secrets);
            (!l.is_empty()).then(|| format!("{}: {l:?}", f.display()))
        })
        .collect()
}

fn dir_contains(dir: &Path, needle: &[u8]) -> bool {
    let mut files = Vec::new();
    files_under(dir, &mut files);
    files.iter().any(|f| {
        std::fs::read(f)
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
    })
}

fn gatehouse(args: &[&str]) -> Output {
    Command::new(common::gatehouse_bin())
        .args(args)
        .output()
        .unwrap()
}

fn demo_snapshot() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo-snapshot.json")
}

#[test]
fn file_imports_never_quote_a_code() {
    let c = cases();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let db_s = db.to_str().unwrap();
    let o = gatehouse(&[
        "db",
        "import",
        "--db",
        db_s,
        demo_snapshot().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut found = Vec::new();
    for (i, (name, doc)) in c.docs.iter().enumerate() {
        let file = dir.path().join(format!("doc-{i}.json"));
        std::fs::write(&file, doc).unwrap();
        let o = gatehouse(&["db", "import", "--db", db_s, file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name}: applied");
        assert!(stderr.contains("not applied"), "{name}: {stderr}");
        for (what, bytes) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
            let l = leaks(bytes, &c.secrets);
            if !l.is_empty() {
                found.push(format!("{name}: {what} quotes {l:?}: {stderr}"));
            }
        }
        println!("secrets: file import, {name}: refused ({})", stderr.trim());
        // The refusal still says where and what.
        if name == "code as a number" {
            assert!(
                stderr.contains("upsert.credentials[0].code: expected a string, found a number"),
                "{stderr}"
            );
        }
        if name.starts_with("a snapshot of") {
            assert!(stderr.contains("found a string"), "{stderr}");
        }
    }
    // The refusals are in the event log on disk (so the search below reads them).
    assert!(
        dir_contains(&db, b"sync_refused"),
        "no sync_refused event on disk"
    );
    found.extend(leaks_in_dir(&db, &c.secrets));
    assert!(found.is_empty(), "codes quoted:\n{}", found.join("\n"));
    println!(
        "secrets: {} refused file imports, {} codes: none in stdout, stderr or the data dir",
        c.docs.len(),
        c.secrets.len()
    );
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_config(dir: &Path, b: &Broker) -> PathBuf {
    let key: [u8; 32] =
        hex::decode("ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c")
            .unwrap()
            .try_into()
            .unwrap();
    b.write_gateway_config(
        dir,
        "data",
        &ed25519_dalek::VerifyingKey::from_bytes(&key).unwrap(),
        "reconnect_min_ms = 200\n",
        &format!(
            "[access]\ninitial_snapshot = \"{}\"\n[log]\nlevel = \"debug\"\n",
            demo_snapshot().display()
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_never_quotes_a_code_on_mqtt_in_its_log_or_on_disk() {
    let c = cases();
    let b = Broker::start();
    let t = Topics::new("gatehouse", "site-1", "gw-1");
    let sub = Subscriber::connect(&b, "cloud", &format!("{}/#", t.base())).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &b);
    let log_path = dir.path().join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut daemon = Daemon(
        Command::new(common::gatehouse_bin())
            .args(["run", "--config", cfg.to_str().unwrap()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let status = t.status();
    sub.try_wait_for(
        |m| {
            m.iter()
                .any(|m| m.topic == status && m.json()["online"] == true)
        },
        WAIT,
    )
    .await
    .expect("the gateway comes online");

    // Every document as a delta; the double-encoded ones also as a snapshot transfer.
    let mut expected_results = 0;
    for (i, (_, doc)) in c.docs.iter().enumerate() {
        sub.client
            .publish(t.sync_delta(), QoS::AtLeastOnce, false, doc.clone())
            .await
            .unwrap();
        expected_results += 1;
        if doc.first() == Some(&b'"') || i == 0 {
            let chunk = SnapshotChunk {
                id: format!("snap-{i}"),
                index: 0,
                count: 1,
                sha256: hex::encode(Sha256::digest(doc)),
                data: base64::engine::general_purpose::STANDARD.encode(doc),
            };
            sub.client
                .publish(
                    t.sync_snapshot(),
                    QoS::AtLeastOnce,
                    false,
                    serde_json::to_vec(&chunk).unwrap(),
                )
                .await
                .unwrap();
            expected_results += 1;
        }
    }
    let (results, events) = (t.sync_result(), t.events());
    let deadline = Instant::now() + WAIT;
    let refused_events = |m: &[broker::Received]| {
        m.iter()
            .filter(|m| m.topic == events && m.json()["kind"] == "sync_refused")
            .count()
    };
    let got = sub
        .try_wait_for(
            |m| {
                m.iter().filter(|m| m.topic == results).count() >= expected_results
                    && refused_events(m) >= expected_results
            },
            deadline.saturating_duration_since(Instant::now()),
        )
        .await
        .unwrap_or_else(|| {
            panic!(
                "expected {expected_results} sync results and sync_refused events; got:\n{}",
                sub.messages()
                    .iter()
                    .map(|m| format!("{} {}", m.topic, m.text()))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
    let mut found = Vec::new();
    // What the gateway published (the subscriber also sees what the test itself sent).
    let sent = [t.sync_delta(), t.sync_snapshot()];
    for m in got.iter().filter(|m| !sent.contains(&m.topic)) {
        if m.topic == results {
            let r = m.json();
            assert_eq!(r["status"], "refused", "{r}");
            assert!(r["reason"].as_str().is_some_and(|s| !s.is_empty()), "{r}");
            println!("secrets: mqtt, refused: {}", r["reason"]);
        }
        let l = leaks(&m.payload, &c.secrets);
        if !l.is_empty() {
            found.push(format!(
                "{} quotes {} codes, e.g. {:?}",
                m.topic,
                l.len(),
                &l[..l.len().min(3)]
            ));
        }
    }
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    let log = std::fs::read(&log_path).unwrap();
    assert!(!log.is_empty());
    let l = leaks(&log, &c.secrets);
    if !l.is_empty() {
        found.push(format!("the daemon's log quotes {l:?}"));
    }
    assert!(
        dir_contains(&dir.path().join("data"), b"sync_refused"),
        "no sync_refused event on disk"
    );
    found.extend(leaks_in_dir(&dir.path().join("data"), &c.secrets));
    assert!(found.is_empty(), "codes quoted:\n{}", found.join("\n"));
    println!(
        "secrets: {expected_results} refused MQTT documents, {} codes: none in {} MQTT messages, the log or the data dir",
        c.secrets.len(),
        got.len()
    );
}
