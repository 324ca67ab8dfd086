//! Device profiles read from a directory (`[profiles] dir`): a new profile and one replacing an
//! embedded id, both driving a pymodbus XY-MD02 peer (`tests/peers/modbus_dev.py` on a PTY)
//! through the real bus code, with `report_delta = 0` / `report_every_s = 0` reporting every
//! poll; bad files refused with file:line:key by `check-config` and `profiles check`; and
//! `profiles list`.

#[path = "support/peers.rs"]
mod peers;

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse::access::AccessEngine;
use gatehouse::profiles::Source;
use gatehouse::rs485::Rs485;
use peers::*;

const WAIT: Duration = Duration::from_secs(20);

/// A profile for an XY-MD02-compatible sensor that reports its temperature on every poll.
const ACME: &str = r#"# A site's own device model.
id = "acme-th"
name = "Acme temperature sensor"
protocol = "modbus"
baud = 9600
parity = "none"
default_address = 1
poll_interval_ms = 100
offline_after_failures = 3

[[readings]]
name = "temperature"
register = 0x0001
type = "i16"
scale = 0.1
unit = "celsius"
report_delta = 0
report_every_s = 0
"#;

fn gatehouse(args: &[&str]) -> Output {
    Command::new(common::gatehouse_bin())
        .args(args)
        .output()
        .unwrap()
}

/// The embedded `xy-md02` profile with its temperature reported on every poll.
fn xy_md02_every_poll() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("devices/xy-md02.toml"))
        .unwrap()
        .replace("report_delta = 0.5", "report_delta = 0")
        .replace("report_every_s = 900\n\n", "report_every_s = 0\n\n")
        .replace(
            "name = \"XY-MD02 temperature / humidity sensor\"",
            "name = \"XY-MD02 (site copy)\"",
        )
}

/// Temperature readings of `device` so far.
fn readings(store: &gatehouse::store::Store, device: &str) -> Vec<serde_json::Value> {
    logged(store)
        .into_iter()
        .filter(|e| {
            e.kind == "sensor_reading"
                && e.payload["device"] == device
                && e.payload["reading"] == "temperature"
        })
        .map(|e| e.payload["value"].clone())
        .collect()
}

#[test]
fn profiles_from_the_directory_drive_real_devices_and_report_every_poll() {
    let dir = tempfile::tempdir().unwrap();
    let devices = dir.path().join("devices");
    std::fs::create_dir(&devices).unwrap();
    std::fs::write(devices.join("acme-th.toml"), ACME).unwrap();
    std::fs::write(devices.join("xy-md02.toml"), xy_md02_every_poll()).unwrap();
    let store = demo_store(dir.path());
    let link = dir.path().join("modbus");
    let _peer = Peer::start(
        "modbus_dev.py",
        &link,
        &["--device", "1:xymd02", "--device", "2:xymd02"].map(String::from),
    );
    let cfg = config(
        dir.path(),
        &format!(
            r#"
[profiles]
dir = "devices"

[[bus]]
id = "sensors"
port = "{}"
protocol = "modbus"
timeout_ms = 500
[[bus.device]]
id = "acme-1"
profile = "acme-th"
address = 1
[[bus.device]]
id = "climate-1"
profile = "xy-md02"
address = 2
poll_interval_ms = 100
"#,
            link.display()
        ),
    );
    // The set the config carries: the file replaces the embedded `xy-md02`.
    let list = cfg.profiles.list();
    let xy: Vec<_> = list.iter().filter(|l| l.id == "xy-md02").collect();
    assert_eq!(xy.len(), 2, "{list:?}");
    assert_eq!(xy[0].source, Source::File(devices.join("xy-md02.toml")));
    assert_eq!((&xy[1].source, xy[1].overridden), (&Source::Embedded, true));
    assert!(
        list.iter()
            .any(|l| l.id == "acme-th" && l.source == Source::File(devices.join("acme-th.toml")))
    );

    let buses = Rs485::start(&cfg.buses, Arc::new(AccessEngine::new(store.clone(), None))).unwrap();
    for d in ["acme-1", "climate-1"] {
        wait_event(&store, 0, "device_online", WAIT, |p| p["device"] == d);
    }
    // The peer's temperature never changes (21.5 °C): with report_delta 0 and report_every_s
    // 0 every poll is reported, from the new profile and from the replaced one alike (the
    // embedded `xy-md02` would report it once, then every 900 s).
    let end = Instant::now() + WAIT;
    loop {
        let a = readings(&store, "acme-1");
        let x = readings(&store, "climate-1");
        if a.len() >= 4 && x.len() >= 4 {
            assert!(a.iter().chain(&x).all(|v| *v == 21.5), "{a:?} {x:?}");
            break;
        }
        assert!(
            Instant::now() < end,
            "readings not reported on every poll: {a:?} {x:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // `acme-th` has no humidity reading; the replaced xy-md02 keeps its own.
    assert!(logged(&store).iter().all(|e| !(e.kind == "sensor_reading"
        && e.payload["device"] == "acme-1"
        && e.payload["reading"] == "humidity")));
    drop(buses);
}

/// A config in `dir` with `[profiles] dir = "devices"` (and nothing else to check).
fn write_config(dir: &Path, profiles: &str) -> std::path::PathBuf {
    let path = dir.join("gatehouse.toml");
    std::fs::write(
        &path,
        format!(
            "[site]\nid = \"test-site\"\ngateway_id = \"gw\"\n[storage]\ndata_dir = \"data\"\n{profiles}"
        ),
    )
    .unwrap();
    path
}

#[test]
fn bad_profile_files_are_refused_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let devices = dir.path().join("devices");
    std::fs::create_dir(&devices).unwrap();
    let bad = devices.join("acme-th.toml");
    std::fs::write(&bad, ACME.replace("\"i16\"", "\"f32\"")).unwrap();

    // `profiles check FILE`: exit 1, the file, its line and the key.
    let o = gatehouse(&["profiles", "check", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{}:14: key `readings[0].type`", bad.display())),
        "{err}"
    );
    assert!(err.contains("unknown variant `f32`"), "{err}");

    // The same file in the configured directory refuses the whole config.
    let cfg = write_config(dir.path(), "[profiles]\ndir = \"devices\"\n");
    let o = gatehouse(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{}:14: key `readings[0].type`", bad.display())),
        "{err}"
    );

    // Other bad files: each names its line and key.
    for (edit, expect) in [
        (
            ("default_address = 1", "default_address = 300"),
            "7: key `default_address`",
        ),
        (
            ("report_delta = 0", "report_delta = -1"),
            "17: key `readings[0].report_delta`",
        ),
        (
            (
                "poll_interval_ms = 100",
                "poll_interval_ms = 100\nspeed = 3",
            ),
            "9: key `speed`",
        ),
        (("id = \"acme-th\"", "id = \"acme\""), "2: key `id`"),
    ] {
        std::fs::write(&bad, ACME.replace(edit.0, edit.1)).unwrap();
        let o = gatehouse(&["profiles", "check", bad.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("{}:{expect}", bad.display())),
            "{expect}: {err}"
        );
    }

    // A good file: exit 0.
    std::fs::write(&bad, ACME).unwrap();
    let o = gatehouse(&["profiles", "check", bad.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok (modbus profile `acme-th`)"));

    // A configured directory that does not exist is an error at its key; the default one
    // may be missing.
    let cfg = write_config(dir.path(), "[profiles]\ndir = \"nowhere\"\n");
    let o = gatehouse(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("key `profiles.dir`") && err.contains("cannot read the profiles directory"),
        "{err}"
    );
    let cfg = write_config(dir.path(), "");
    let o = gatehouse(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn profiles_list_shows_sources_and_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let devices = dir.path().join("devices");
    std::fs::create_dir(&devices).unwrap();
    std::fs::write(devices.join("acme-th.toml"), ACME).unwrap();
    std::fs::write(devices.join("xy-md02.toml"), xy_md02_every_poll()).unwrap();
    let cfg = write_config(dir.path(), "[profiles]\ndir = \"devices\"\n");
    let o = gatehouse(&["profiles", "list", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split('\t').collect())
        .collect();
    let file = |n: &str| devices.join(n).display().to_string();
    assert!(
        lines.contains(&vec!["acme-th", "modbus", &file("acme-th.toml"), ""]),
        "{out}"
    );
    assert!(
        lines.contains(&vec![
            "xy-md02",
            "modbus",
            &file("xy-md02.toml"),
            "overrides embedded"
        ]),
        "{out}"
    );
    assert!(
        lines.contains(&vec!["xy-md02", "modbus", "embedded", "overridden"]),
        "{out}"
    );
    assert!(
        lines.contains(&vec!["noke-padlock", "ble-lock", "embedded", ""]),
        "{out}"
    );
    assert!(
        lines.contains(&vec!["waveshare-relay-8ch", "modbus", "embedded", ""]),
        "{out}"
    );
    assert!(
        out.starts_with(&format!("# profiles directory: {}\n", devices.display())),
        "{out}"
    );
}
