//! The `gatehouse` binary: bad input gets one clear line, a non-zero exit, and changes nothing.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn gatehouse(args: &[&str]) -> Output {
    Command::new(gatehouse_bin()).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A data directory holding the demo snapshot (version 1).
fn demo_db() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let o = gatehouse(&[
        "db",
        "import",
        "--db",
        dir.path().to_str().unwrap(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo-snapshot.json"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("applied snapshot version 1"));
    dir
}

fn export(dir: &Path) -> String {
    let o = gatehouse(&["db", "export", "--db", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o)
}

/// Runs an import of `content` that must be refused with `expect` in its one-line error,
/// leaving the database exactly as it was.
fn refused_import(content: &str, expect: &[&str]) {
    let dir = demo_db();
    let before = export(dir.path());
    let file = dir.path().join("bad.json");
    std::fs::write(&file, content).unwrap();
    let o = gatehouse(&[
        "db",
        "import",
        "--db",
        dir.path().to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "accepted: {content}");
    let err = stderr(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains("bad.json"), "names the file: {err}");
    for e in expect {
        assert!(err.contains(e), "`{e}` missing from: {err}");
    }
    assert_eq!(export(dir.path()), before, "database changed");
}

fn demo_with(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/demo-snapshot.json"
        ))
        .unwrap(),
    )
    .unwrap();
    edit(&mut v);
    serde_json::to_string_pretty(&v).unwrap()
}

#[test]
fn a_corrupt_snapshot_is_refused() {
    let good = demo_with(|v| v["version"] = 2.into());
    refused_import(&good[..good.len() / 2], &["line", "column", "EOF"]);
    refused_import("\u{0}\u{1}garbage", &["line 1"]);
}

#[test]
fn an_unknown_schema_version_is_refused() {
    refused_import(
        &demo_with(|v| v["schema_version"] = 7.into()),
        &["unsupported schema_version 7"],
    );
}

#[test]
fn a_wrong_value_is_refused_with_its_line() {
    let text = demo_with(|v| {
        v["version"] = 2.into();
        v["units"][2]["status"] = "occupid".into();
    });
    let line = text.lines().position(|l| l.contains("occupid")).unwrap() + 1;
    refused_import(&text, &[&format!("line {line}"), "occupid", "occupied"]);
}

#[test]
fn a_delta_naming_an_unknown_unit_is_refused() {
    let delta = serde_json::json!({
        "schema_version": 1, "kind": "delta", "base_version": 1, "version": 2,
        "upsert": {"shares": [{"id": "s9", "unit": "B-104", "user": "alice"}]}
    });
    refused_import(&delta.to_string(), &["unknown unit `B-104`", "share `s9`"]);
}

#[test]
fn a_delta_on_another_base_needs_a_resync() {
    let delta = serde_json::json!({
        "schema_version": 1, "kind": "delta", "base_version": 41, "version": 42,
        "delete": {"credentials": ["c-alice-code"]}
    });
    refused_import(&delta.to_string(), &["resync needed", "the site is at 1"]);
}

#[test]
fn a_wrong_type_in_the_config_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gatehouse.toml");
    std::fs::write(
        &cfg,
        "[site]\nid = \"s1\"\ngateway_id = \"g1\"\n\n[storage]\nmax_events = \"lots\"\n",
    )
    .unwrap();
    for cmd in [&["check-config", "--config"][..], &["run", "--config"][..]] {
        let mut args = cmd.to_vec();
        args.push(cfg.to_str().unwrap());
        let o = gatehouse(&args);
        assert!(!o.status.success());
        let err = stderr(&o);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains("gatehouse.toml:6:"), "{err}");
        assert!(err.contains("key `storage.max_events`"), "{err}");
        assert!(err.contains("expected"), "{err}");
    }
    // Unknown keys are refused too.
    std::fs::write(&cfg, "[site]\nid = \"s1\"\ngateway_id = \"g1\"\nzone = 3\n").unwrap();
    let o = gatehouse(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown field `zone`"),
        "{}",
        stderr(&o)
    );
    // Semantic checks name the line of the value.
    std::fs::write(
        &cfg,
        "[site]\nid = \"s1\"\ngateway_id = \"g1\"\n[log]\nlevel = \"loud\"\n",
    )
    .unwrap();
    let o = gatehouse(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(
        stderr(&o).contains(":5: key `log.level`: `loud` is not a level"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_bad_ble_section_is_refused_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gatehouse.toml");
    for (body, expect) in [
        (
            "[ble]\nadapter = \"sim\"\n",
            ":5: key `ble.adapter`: `sim` (simulated devices) needs demo.simulate_devices = true",
        ),
        (
            "[ble]\nmax_connections = 0\n",
            ":5: key `ble.max_connections`: 0 is out of range (expected 1 to 8)",
        ),
        (
            "[ble]\nadapter = \"hci 0\"\n",
            ":5: key `ble.adapter`: `hci 0` is not an adapter name",
        ),
        ("[ble]\nradio = 1\n", "unknown field `radio`"),
    ] {
        std::fs::write(
            &cfg,
            format!("[site]\nid = \"s1\"\ngateway_id = \"g1\"\n{body}"),
        )
        .unwrap();
        let o = gatehouse(&["check-config", "--config", cfg.to_str().unwrap()]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(expect), "{body}: {}", stderr(&o));
    }
}

#[test]
fn ble_devices_in_the_config_are_checked_and_a_bad_key_is_never_quoted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gatehouse.toml");
    let dev = |rest: &str| {
        format!("[ble]\n[[ble.device]]\nid = \"s-1\"\nkind = \"sensor\"\nzone = \"zone-a\"\n{rest}")
    };
    let secret = "0123456789abcdef0123456789abcdeZ";
    for (body, expect) in [
        (
            dev("mac = \"3C:2E:F5:00:00\"\n"),
            ":9: key `ble.device[0].mac`: not a MAC address (expected AA:BB:CC:DD:EE:FF)",
        ),
        (
            dev(&format!(
                "mac = \"3C:2E:F5:00:00:C1\"\nkey = \"{secret}\"\n"
            )),
            ":10: key `ble.device[0].key`: not a bind key (expected 32 hex digits)",
        ),
        (
            format!("{}unit = \"A-101\"\n", dev("mac = \"3C:2E:F5:00:00:C1\"\n")),
            "key `ble.device[0].unit`: a sensor needs exactly one of `unit` or `zone`",
        ),
        (
            "[ble]\n[[ble.device]]\nid = \"f\"\nkind = \"fob\"\nmac = \"C0:FF:EE:00:00:F1\"\n"
                .to_string(),
            "key `ble.device[0].kind`: `fob` is not a kind here",
        ),
        (
            "[ble]\n[[ble.device]]\nid = \"l\"\nkind = \"padlock\"\nunit = \"A-101\"\n\
             mac = \"D0:1F:A6:44:B3:21\"\nkey = \"00112233445566778899AABBCCDDEEFF\"\n"
                .to_string(),
            "only an encrypted sensor has a `key`",
        ),
        (
            format!(
                "{}[[ble.device]]\nid = \"s-1\"\nkind = \"sensor\"\nzone = \"z\"\nmac = \"3C:2E:F5:00:00:C2\"\n",
                dev("mac = \"3C:2E:F5:00:00:C1\"\n")
            ),
            "key `ble.device[1].id`: `s-1` is used by another [[ble.device]]",
        ),
    ] {
        std::fs::write(
            &cfg,
            format!("[site]\nid = \"s1\"\ngateway_id = \"g1\"\n{body}"),
        )
        .unwrap();
        let o = gatehouse(&["check-config", "--config", cfg.to_str().unwrap()]);
        assert!(!o.status.success(), "{body}");
        assert!(stderr(&o).contains(expect), "{body}: {}", stderr(&o));
        assert!(!stderr(&o).contains("0123456789"), "{}", stderr(&o));
    }
    std::fs::write(
        &cfg,
        format!(
            "[site]\nid = \"s1\"\ngateway_id = \"g1\"\n[storage]\ndata_dir = \"data\"\n{}",
            dev("mac = \"3c:2e:f5:00:00:c1\"\nkey = \"00112233445566778899AABBCCDDEEFF\"\n")
        ),
    )
    .unwrap();
    let o = gatehouse(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_bad_metrics_section_is_refused_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gatehouse.toml");
    for (body, expect) in [
        (
            "[metrics]\nlisten = \"localhost:9469\"\n",
            ":5: key `metrics.listen`: `localhost:9469` is not an IP address and port",
        ),
        (
            "[metrics]\nlisten = \"127.0.0.1:99999\"\n",
            ":5: key `metrics.listen`: `127.0.0.1:99999` is not an IP address and port",
        ),
        ("[metrics]\nport = 9469\n", "unknown field `port`"),
    ] {
        std::fs::write(
            &cfg,
            format!("[site]\nid = \"s1\"\ngateway_id = \"g1\"\n{body}"),
        )
        .unwrap();
        let o = gatehouse(&["check-config", "--config", cfg.to_str().unwrap()]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(expect), "{body}: {}", stderr(&o));
    }
}

#[test]
fn a_bus_with_no_devices_passes_check_config_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gatehouse.toml");
    std::fs::write(
        &cfg,
        "[site]\nid = \"s1\"\ngateway_id = \"g1\"\n[storage]\ndata_dir = \"data\"\n\
         [[bus]]\nid = \"entrance\"\nport = \"/dev/ttyUSB0\"\nprotocol = \"osdp\"\n\
         [[bus]]\nid = \"io\"\nport = \"/dev/ttyUSB1\"\nprotocol = \"modbus\"\n",
    )
    .unwrap();
    let o = gatehouse(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for bus in ["entrance", "io"] {
        assert!(
            out.contains(&format!(
                "note: bus `{bus}` has no devices: it only listens for install mode"
            )),
            "{out}"
        );
    }
    assert!(out.contains(": ok (site `s1`"), "{out}");
}

#[test]
fn the_example_and_demo_configs_are_valid() {
    for f in ["config/gatehouse.example.toml", "config/demo.toml"] {
        let path = format!("{}/{f}", env!("CARGO_MANIFEST_DIR"));
        let o = gatehouse(&["check-config", "--config", &path]);
        assert!(o.status.success(), "{f}: {}", stderr(&o));
    }
}

#[test]
fn access_check_prints_the_decision_and_exits_by_it() {
    let dir = demo_db();
    let db = dir.path().to_str().unwrap();
    // Alice at the gate on a Monday evening in New York: open (gate hours 06:00-22:00).
    let o = gatehouse(&[
        "access",
        "check",
        "--db",
        db,
        "--code",
        "123456",
        "--entry",
        "gate-1",
        "--at",
        "2026-11-23T21:10:00-05:00",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("GRANTED (tenant) user alice units A-101"),
        "{}",
        stdout(&o)
    );
    // 22:10: closed; leaving within the 30 minute grace period is allowed.
    let o = gatehouse(&[
        "access",
        "check",
        "--db",
        db,
        "--code",
        "123456#",
        "--entry",
        "gate-1",
        "--at",
        "2026-11-23T22:10:00-05:00",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).starts_with("DENIED (outside_schedule)"),
        "{}",
        stdout(&o)
    );
    let o = gatehouse(&[
        "access",
        "check",
        "--db",
        db,
        "--code",
        "123456",
        "--entry",
        "gate-1",
        "--exit",
        "--at",
        "2026-11-23T22:10:00-05:00",
        "--json",
    ]);
    assert!(o.status.success());
    let d: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(d["reason"], "exit_grace_period");
    // A blacklisted fob, a card with its facility code, an unknown unit.
    let o = gatehouse(&[
        "access",
        "check",
        "--db",
        db,
        "--fob",
        "FOB-DEAD01",
        "--entry",
        "gate-1",
    ]);
    assert!(
        stdout(&o).starts_with("DENIED (blacklisted)"),
        "{}",
        stdout(&o)
    );
    let o = gatehouse(&[
        "access",
        "check",
        "--db",
        db,
        "--card",
        "12:34567",
        "--unit",
        "A-101",
        "--at",
        "2026-11-23T12:00:00-05:00",
    ]);
    assert!(
        stdout(&o).starts_with("GRANTED (tenant) user alice"),
        "{}",
        stdout(&o)
    );
    let o = gatehouse(&[
        "access", "check", "--db", db, "--code", "123456", "--unit", "Z-9",
    ]);
    assert!(
        stdout(&o).starts_with("DENIED (unknown_unit)"),
        "{}",
        stdout(&o)
    );
    // Bad arguments are errors (exit 2), not decisions.
    let o = gatehouse(&[
        "access", "check", "--db", db, "--code", "1", "--entry", "gate-1", "--at", "tonight",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("`tonight` is not an RFC 3339 time"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn access_check_verifies_digital_keys_with_the_configured_public_key() {
    use ed25519_dalek::SigningKey;
    use gatehouse::policy::digital_key::{KeyPayload, sign};
    let dir = demo_db();
    let db = dir.path().to_str().unwrap();
    // The demo config's public key belongs to the fixed demo signing key (seed 7).
    let signer = SigningKey::from_bytes(&[7u8; 32]);
    let at = gatehouse::site::parse_time("2026-11-23T12:00:00-05:00").unwrap();
    let payload = KeyPayload {
        v: 2,
        site: "demo-site".into(),
        key_id: "dk-alice-9".into(),
        user: "alice".into(),
        units: vec!["A-101".into()],
        entries: vec!["gate-1".into()],
        issued_at: at,
        not_before: at,
        expires_at: at + chrono::Duration::hours(2),
    };
    let key = dir.path().join("key.json");
    std::fs::write(&key, sign(&payload, &signer)).unwrap();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml");
    let check = |at: &str, extra: &[&str]| {
        let mut args = vec![
            "access",
            "check",
            "--db",
            db,
            "--key",
            key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--unit", "A-101", "--at", at]);
        stdout(&gatehouse(&args))
    };
    assert!(
        check("2026-11-23T12:30:00-05:00", &["--config", config])
            .starts_with("GRANTED (digital_key)")
    );
    assert!(
        check("2026-11-23T15:00:00-05:00", &["--config", config])
            .starts_with("DENIED (key_expired)")
    );
    let other = hex::encode(
        SigningKey::from_bytes(&[8u8; 32])
            .verifying_key()
            .to_bytes(),
    );
    assert!(
        check(
            "2026-11-23T12:30:00-05:00",
            &["--public-key", &other, "--site", "demo-site"]
        )
        .starts_with("DENIED (key_bad_signature)")
    );
    // The key names the demo site: checked as another site's gateway, it opens nothing.
    let demo_public = hex::encode(signer.verifying_key().to_bytes());
    assert!(
        check(
            "2026-11-23T12:30:00-05:00",
            &["--public-key", &demo_public, "--site", "site-b"]
        )
        .starts_with("DENIED (key_wrong_site)")
    );
    let o = gatehouse(&[
        "access",
        "check",
        "--db",
        db,
        "--key",
        key.to_str().unwrap(),
        "--public-key",
        &demo_public,
        "--unit",
        "A-101",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("give --site or --config"),
        "{}",
        stderr(&o)
    );
    let o = gatehouse(&[
        "access",
        "check",
        "--db",
        db,
        "--key",
        key.to_str().unwrap(),
        "--unit",
        "A-101",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("needs the cloud's public key"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn export_then_import_restores_the_site_on_the_same_gateway() {
    let dir = demo_db();
    let db = dir.path().to_str().unwrap();
    let out = dir.path().join("backup.json");
    let o = gatehouse(&["db", "export", "--db", db, "--out", out.to_str().unwrap()]);
    assert!(o.status.success());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&out).unwrap().permissions());
    assert_eq!(
        mode & 0o777,
        0o600,
        "exports hold the temporary-code secret"
    );
    let backup = std::fs::read_to_string(&out).unwrap();
    assert!(backup.contains("code_hmac") && !backup.contains("\"123456\""));
    // Same gateway (same code key): restores.
    let o = gatehouse(&["db", "import", "--db", db, out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = gatehouse(&[
        "access",
        "check",
        "--db",
        db,
        "--code",
        "123456",
        "--unit",
        "A-101",
        "--at",
        "2026-11-23T12:00:00-05:00",
    ]);
    assert!(stdout(&o).starts_with("GRANTED"), "{}", stdout(&o));
    // Another gateway (another key): refused, with the reason.
    let other = tempfile::tempdir().unwrap();
    let o = gatehouse(&[
        "db",
        "import",
        "--db",
        other.path().to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("send codes in clear instead"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn stats_print_counts_and_version() {
    let dir = demo_db();
    let o = gatehouse(&["db", "stats", "--db", dir.path().to_str().unwrap()]);
    let text = stdout(&o);
    assert!(text.contains("version:       1"), "{text}");
    assert!(text.contains("units:         7"), "{text}");
    assert!(text.contains("credentials:   12"), "{text}");
    assert!(text.contains("devices:       6"), "{text}");
    let o = gatehouse(&[
        "db",
        "stats",
        "--db",
        dir.path().to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["counts"]["users"], 8);
    assert_eq!(v["events"], 1, "the import was recorded");
}

#[test]
fn a_second_process_on_the_same_database_gets_a_clear_error() {
    let dir = demo_db();
    let _held = gatehouse::store::Store::open(dir.path(), 10_000).unwrap();
    let o = gatehouse(&["db", "stats", "--db", dir.path().to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("in use by another process"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn the_daemon_stops_cleanly_on_sigterm_and_records_it() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gatehouse.toml");
    std::fs::write(
        &cfg,
        format!(
            "[site]\nid = \"s1\"\ngateway_id = \"g1\"\n[storage]\ndata_dir = \"data\"\n\
             [access]\ninitial_snapshot = \"{}\"\n[[demo.attempts]]\ncode = \"999000\"\nentry = \"gate-1\"\n",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo-snapshot.json")
        ),
    )
    .unwrap();
    let mut child = Command::new(gatehouse_bin())
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "gatehouse=info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("waiting for SIGTERM") {
            break;
        }
    }
    assert!(log.contains("imported the initial snapshot"), "{log}");
    assert!(log.contains("demo attempt decided and recorded"), "{log}");
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    for line in lines {
        log.push_str(&line.unwrap());
        log.push('\n');
    }
    assert!(status.success(), "exit {status:?}\n{log}");
    assert!(
        log.contains("SIGTERM received") && log.contains("stopped cleanly"),
        "{log}"
    );
    // The demo attempt is the 24/7 employee's code, granted whatever the time of day.
    let store = gatehouse::store::Store::open(&dir.path().join("data"), 10_000).unwrap();
    let events = store.events().read_from(0, 100).unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "sync_applied",
            "gateway_started",
            "access_granted",
            "gateway_stopped"
        ],
        "{events:?}"
    );
}
