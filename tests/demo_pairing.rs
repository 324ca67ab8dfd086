//! The demo's pairing script (`[demo] pairing`, docs/pairing.md, *The demo*): `gatehouse run`
//! with config/demo.toml (its data dir, control socket and cloud moved out of the checkout)
//! finds the simulated unconfigured keypad and relay board and the unadopted BLE padlock and
//! BTHome thermometer, adopts them (the padlock with a test unlock, once the demo's cloud has
//! assigned it to its unit; the thermometer with its bind key), the code typed on the new keypad
//! is granted and the adopted thermometer's readings are recorded; a restart on the same data dir
//! adopts nothing again, the code is granted again and the thermometer reports again. Waits for
//! log lines and reads the event log; no timing assertions.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(300);

/// config/demo.toml with its data dir and control socket in `dir` and no cloud (the demo's
/// broker port is not this test's).
fn demo_config(dir: &std::path::Path) -> std::path::PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/config/demo.toml")).unwrap();
    let mut doc: toml_edit::DocumentMut = text.parse().unwrap();
    doc["storage"]["data_dir"] = toml_edit::value(dir.join("data").to_str().unwrap());
    doc["access"]["initial_snapshot"] =
        toml_edit::value(format!("{root}/config/demo-snapshot.json"));
    doc["control"]["socket"] = toml_edit::value(dir.join("control.sock").to_str().unwrap());
    doc.remove("cloud");
    assert_eq!(doc["demo"]["pairing"].as_bool(), Some(true));
    let path = dir.join("demo.toml");
    std::fs::write(&path, doc.to_string()).unwrap();
    path
}

struct Daemon {
    child: Child,
    lines: Receiver<String>,
    log: String,
}

impl Daemon {
    fn start(config: &std::path::Path) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .args(["run", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "gatehouse=info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, lines) = channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Daemon {
            child,
            lines,
            log: String::new(),
        }
    }

    /// Waits for a log line with all of `parts` (one already read counts).
    fn wait_for(&mut self, parts: &[&str]) {
        if self
            .log
            .lines()
            .any(|l| parts.iter().all(|p| l.contains(p)))
        {
            return;
        }
        let end = Instant::now() + WAIT;
        while Instant::now() < end {
            match self.lines.recv_timeout(Duration::from_secs(1)) {
                Ok(l) => {
                    let hit = parts.iter().all(|p| l.contains(p));
                    self.log.push_str(&l);
                    self.log.push('\n');
                    if hit {
                        return;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => break,
            }
        }
        panic!("no log line with {parts:?}:\n{}", self.log);
    }

    fn stop(mut self) -> String {
        let kill = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let status = self.child.wait().unwrap();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.log.push_str(&l);
            self.log.push('\n');
        }
        assert!(status.success(), "exit {status:?}\n{}", self.log);
        self.log
    }
}

fn events(dir: &std::path::Path) -> Vec<gatehouse::store::Event> {
    let store = gatehouse::store::Store::open(&dir.join("data"), 100_000).unwrap();
    store.events().read_from(0, 100_000).unwrap()
}

fn count(events: &[gatehouse::store::Event], kind: &str) -> usize {
    events.iter().filter(|e| e.kind == kind).count()
}

/// The events of `kind` about `device`.
fn of<'a>(
    events: &'a [gatehouse::store::Event],
    kind: &str,
    device: &str,
) -> Vec<&'a gatehouse::store::Event> {
    events
        .iter()
        .filter(|e| e.kind == kind && e.payload["device"] == device)
        .collect()
}

/// Neither BLE key shows, upper or lower case hex.
fn assert_no_key(what: &str, text: &str) {
    use gatehouse::ble::sim::{PAIR_LOCK_KEY, PAIR_SENSOR_KEY};
    for key in [PAIR_LOCK_KEY, PAIR_SENSOR_KEY] {
        let hex = hex::encode(key);
        assert!(
            !text.to_lowercase().contains(&hex),
            "a key shows in the {what}"
        );
    }
}

const LOCK: &str = "lock-a104";
const SENSOR: &str = "sensor-hall-b";

/// The access_granted events of the adopted keypad.
fn granted_on_new_keypad(events: &[gatehouse::store::Event]) -> usize {
    events
        .iter()
        .filter(|e| e.kind == "access_granted" && e.payload.to_string().contains("keypad-demo-new"))
        .count()
}

#[test]
fn the_demo_finds_adopts_and_uses_a_new_keypad_and_board_and_a_restart_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = demo_config(dir.path());

    let mut d = Daemon::start(&config);
    d.wait_for(&["install mode started", "local:demo"]);
    d.wait_for(&["demo pairing: device discovered", "osdp:rs485-readers:3"]);
    d.wait_for(&["demo pairing: device discovered", "modbus:rs485-io:9"]);
    d.wait_for(&["demo pairing: device discovered", "ble:D0:1F:A6:44:B3:04"]);
    d.wait_for(&["demo pairing: device discovered", "ble:3C:2E:F5:00:00:C3"]);
    d.wait_for(&["demo pairing: adopted", "keypad-demo-new"]);
    d.wait_for(&["demo pairing: adopted", "relay-board-demo-new"]);
    d.wait_for(&["demo pairing: the cloud assigns", LOCK, "A-104"]);
    d.wait_for(&["demo pairing: adopted", LOCK, "ble_lock"]);
    d.wait_for(&["demo pairing: adopted", SENSOR, "ble_sensor"]);
    d.wait_for(&["install mode ended", "stopped"]);
    d.wait_for(&["access decided", "keypad-demo-new", "granted=true"]);
    d.wait_for(&["demo pairing: the adopted sensor reports", SENSOR, "zone-b"]);
    let log = d.stop();
    assert!(log.contains("reader paired"), "{log}");
    assert!(!log.contains("demo pairing: not started"), "{log}");
    assert!(
        log.lines().any(|l| l
            .contains("demo pairing: the simulated padlock opened for the test unlock")
            && l.contains("unlocks=1")),
        "{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("ERROR") && l.contains("demo pairing")),
        "{log}"
    );
    assert_no_key("log", &log);

    let ev = events(dir.path());
    let kinds: Vec<&str> = ev.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(count(&ev, "install_mode_started"), 1, "{kinds:?}");
    assert_eq!(count(&ev, "device_discovered"), 4, "{kinds:?}");
    assert_eq!(count(&ev, "device_adopted"), 4, "{kinds:?}");
    assert_no_key(
        "event log",
        &ev.iter().map(|e| e.payload.to_string()).collect::<String>(),
    );
    assert_eq!(count(&ev, "install_mode_ended"), 1, "{kinds:?}");
    assert_eq!(granted_on_new_keypad(&ev), 1, "{kinds:?}");
    let adopted: Vec<&serde_json::Value> = ev
        .iter()
        .filter(|e| e.kind == "device_adopted")
        .map(|e| &e.payload)
        .collect();
    for a in &adopted {
        assert!(a.to_string().contains("local:demo"), "{a}");
    }
    let ended = ev.iter().find(|e| e.kind == "install_mode_ended").unwrap();
    assert_eq!(ended.payload["reason"], "stopped", "{}", ended.payload);
    // The board was moved from unit 9 to unit 2 and is polled there (online).
    assert!(
        adopted
            .iter()
            .any(|a| a.to_string().contains("modbus:rs485-io:9"))
    );
    assert!(
        log.lines().any(|l| l.contains("device state")
            && l.contains("\"relay-board-demo-new\"")
            && l.contains("online=true")),
        "{log}"
    );

    // BLE: the padlock, assigned to A-104 by the (demo's) cloud, adopted there after an offline
    // test unlock the padlock took; the thermometer adopted to zone-b, its key kept out of the
    // record, and its readings recorded for the zone.
    let sync = ev
        .iter()
        .find(|e| e.kind == "sync_applied" && e.payload["source"] == "demo")
        .unwrap_or_else(|| panic!("no delta from the demo: {kinds:?}"));
    assert_eq!(sync.payload["kind"], "delta", "{}", sync.payload);
    let lock = of(&ev, "device_adopted", LOCK);
    assert_eq!(lock.len(), 1, "{kinds:?}");
    let p = &lock[0].payload;
    assert_eq!(p["family"], "ble_lock", "{p}");
    assert_eq!(p["candidate"], "ble:D0:1F:A6:44:B3:04", "{p}");
    assert_eq!(p["settings"]["unit"], "A-104", "{p}");
    assert!(sync.seq < lock[0].seq, "assigned before adopted");
    // The test unlock (the adoption answers only once the padlock said success), the only
    // operation of this padlock. Its event goes through the group commit: no order by `seq`.
    let unlock = of(&ev, "lock_result", LOCK);
    assert_eq!(unlock.len(), 1, "{unlock:?}");
    assert_eq!(unlock[0].payload["via"], "offline", "{unlock:?}");
    assert_eq!(unlock[0].payload["result"], "success", "{unlock:?}");
    let sensor = of(&ev, "device_adopted", SENSOR);
    assert_eq!(sensor.len(), 1, "{kinds:?}");
    let p = &sensor[0].payload;
    assert_eq!(p["family"], "ble_sensor", "{p}");
    assert_eq!(p["candidate"], "ble:3C:2E:F5:00:00:C3", "{p}");
    assert_eq!(p["settings"]["zone"], "zone-b", "{p}");
    assert_eq!(p["settings"]["encrypted"], true, "{p}");
    assert!(p["settings"].get("bind_key").is_none(), "{p}");
    let readings = of(&ev, "sensor_reading", SENSOR);
    let first = readings.first().expect("a reading of the adopted sensor");
    assert_eq!(first.payload["zone"], "zone-b", "{}", first.payload);
    assert_eq!(first.payload["reading"], "temperature", "{}", first.payload);
    let c = first.payload["value"].as_f64().unwrap();
    assert!((18.0..=20.0).contains(&c), "{}", first.payload);
    let readings_before = readings.len();

    // A restart on the same data dir: the registry has both; nothing is adopted again, and the
    // code typed on the (now paired) keypad is granted again.
    let mut d = Daemon::start(&config);
    d.wait_for(&["demo pairing: the keypad and the board are already adopted"]);
    d.wait_for(&["demo pairing: the padlock and the sensor are already adopted"]);
    d.wait_for(&["access decided", "keypad-demo-new", "granted=true"]);
    // The adopted thermometer runs again from the registry (its key from the store).
    d.wait_for(&["demo pairing: the adopted sensor reports", SENSOR, "zone-b"]);
    // The board answers at the unit id it was given (kept by the simulated board).
    d.wait_for(&["device state", "\"relay-board-demo-new\"", "online=true"]);
    let log = d.stop();
    assert!(!log.contains("install mode started"), "{log}");
    assert!(
        !log.lines()
            .any(|l| l.contains("ERROR") && l.contains("demo pairing")),
        "{log}"
    );
    assert_no_key("log", &log);
    let ev = events(dir.path());
    assert_eq!(count(&ev, "install_mode_started"), 1);
    assert_eq!(count(&ev, "device_adopted"), 4);
    let demo_syncs = ev
        .iter()
        .filter(|e| e.kind == "sync_applied" && e.payload["source"] == "demo")
        .count();
    assert_eq!(demo_syncs, 1);
    assert_eq!(granted_on_new_keypad(&ev), 2);
    assert!(of(&ev, "sensor_reading", SENSOR).len() > readings_before);
}

#[test]
fn demo_pairing_without_simulated_devices_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("g.toml");
    // check-config on `[site]`, `[storage]` and these `[demo]` lines: refused, its stderr.
    let refused = |demo: &str| {
        std::fs::write(
            &config,
            format!(
                "[site]\nid = \"s1\"\ngateway_id = \"g1\"\n[storage]\ndata_dir = \"data\"\n\
                 [demo]\n{demo}"
            ),
        )
        .unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .args(["check-config", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = refused("pairing = true\n");
    assert!(
        err.contains("demo.pairing") && err.contains("needs demo.simulate_devices = true"),
        "{err}"
    );
    let err = refused("simulate_devices = true\npairing_code = \"12a\"\n");
    assert!(
        err.contains("demo.pairing_code") && err.contains("is not a code"),
        "{err}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "a refused config changes nothing"
    );
}
