//! Site automation end to end (docs/automation.md): the real `gatehouse run` daemon with a
//! pymodbus bus on a PTY (`tests/peers/modbus_dev.py`) and a real mosquitto over mutual TLS
//! playing the cloud. Each case restarts the daemon in the middle (SIGKILL, then a new start
//! on the same data) and checks the promise: no alert repeated, none lost, no relay left on.
//!
//! - A door contact held open on the IO board raises `door_held_open` once, the retained
//!   `alerts` topic shows it (again after the restart, same id), and closing clears it; the
//!   door's manual-release input raises `manual_unlock`, cleared once the door closed again.
//! - A BTHome motion sensor on the mock BlueZ raises `motion_alert` once across a restart,
//!   cleared after a quiet minute.
//! - A grant into a zone switches the zone's trigger relay on the relay board, and it goes off
//!   on time — also when the daemon was killed while it was on.

#[path = "support/broker.rs"]
mod broker;
mod common;
#[path = "support/peers.rs"]
mod peers;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use broker::{Broker, Received, Subscriber};
use common::gatehouse_bin;
use gatehouse::cloud::messages::Topics;
use peers::Peer;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// A small site: zone `z-1` with door `door-1` (held open after 5 s) and a trigger relay
/// (`relays` channel 5, on for 5 s); alice rents `U-1` in it and has code 123456.
fn snapshot(dir: &Path) -> PathBuf {
    let snap = json!({
        "schema_version": 1, "kind": "snapshot", "version": 1,
        "facility": {"time_zone": "UTC", "zone_triggers": true},
        "zones": [{"id": "z-1", "triggers": [{"device": "relays", "channel": 5, "on_seconds": 5}]}],
        "entries": [{"id": "door-1", "kind": "door", "zone": "z-1", "held_open_seconds": 5}],
        "units": [{"id": "U-1", "status": "occupied", "tenant": "alice", "zone": "z-1"}],
        "users": [{"id": "alice", "role": "tenant"}],
        "credentials": [{"id": "c-1", "user": "alice", "code": "123456"}]
    });
    let f = dir.join("snapshot.json");
    std::fs::write(&f, serde_json::to_vec(&snap).unwrap()).unwrap();
    f
}

/// The daemon's config: the broker, the site, the Modbus bus (relay board at 1, IO board at 3
/// with the door contact on input 0); `grant` adds a start-up attempt of alice's code at
/// `door-1` (a grant into `z-1`).
fn write_config(dir: &Path, b: &Broker, link: &Path, grant: bool) -> PathBuf {
    let signer = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    let attempt = if grant {
        "[[demo.attempts]]\ncode = \"123456\"\nentry = \"door-1\"\n"
    } else {
        ""
    };
    let extra = format!(
        "[access]\ninitial_snapshot = \"{}\"\n{attempt}\
         [[bus]]\nid = \"io\"\nport = \"{}\"\nprotocol = \"modbus\"\ntimeout_ms = 500\n\
         [[bus.device]]\nid = \"relays\"\nprofile = \"waveshare-relay-8ch\"\naddress = 1\n\
         poll_interval_ms = 200\n\
         [[bus.device]]\nid = \"io-1\"\nprofile = \"waveshare-io-8ch\"\naddress = 3\n\
         poll_interval_ms = 50\n\
         inputs = [ {{ channel = 0, role = \"door_contact\", entry = \"door-1\" }},\n\
                    {{ channel = 1, role = \"manual_release\", entry = \"door-1\" }} ]\n",
        snapshot(dir).display(),
        link.display()
    );
    b.write_gateway_config(
        dir,
        "data",
        &signer.verifying_key(),
        "reconnect_min_ms = 200\n",
        &extra,
    )
}

fn daemon(cfg: &Path) -> Child {
    Command::new(gatehouse_bin())
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn modbus_peer(link: &Path) -> Peer {
    Peer::start(
        "modbus_dev.py",
        link,
        &["--device", "1:relay8", "--device", "3:io8"].map(String::from),
    )
}

fn coil(addr: u64, ch: u64, on: bool) -> impl Fn(&Value) -> bool {
    move |e: &Value| e["ev"] == "coil" && e["addr"] == addr && e["index"] == ch && e["on"] == on
}

/// Event messages of `kind` received so far, each event once (by `id`: delivery is at least
/// once).
fn events_of(msgs: &[Received], t: &Topics, kind: &str) -> Vec<Value> {
    let mut seen = std::collections::BTreeSet::new();
    msgs.iter()
        .filter(|m| m.topic == t.events())
        .map(|m| m.json())
        .filter(|v| v["kind"] == kind && seen.insert(v["id"].as_str().unwrap_or("").to_string()))
        .collect()
}

/// Waits until `f` over the messages received so far gives a value.
async fn wait_msgs<T>(
    sub: &Subscriber,
    what: &str,
    mut f: impl FnMut(&[Received]) -> Option<T>,
) -> T {
    let end = Instant::now() + WAIT;
    loop {
        if let Some(v) = f(&sub.messages()) {
            return v;
        }
        assert!(Instant::now() < end, "{what}: not seen within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `alerts` messages received from index `from` on.
fn alert_sets(msgs: &[Received], t: &Topics, from: usize) -> Vec<Value> {
    msgs.iter()
        .skip(from)
        .filter(|m| m.topic == t.alerts())
        .map(|m| m.json())
        .collect()
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let end = Instant::now() + WAIT;
    while Instant::now() < end {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_door_held_open_raises_once_across_a_restart_and_clears_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let t = Topics::new("gatehouse", "site-1", "gw-1");
    let sub = Subscriber::connect(&broker, "cloud", "gatehouse/site-1/gw-1/#").await;
    let link = dir.path().join("modbus");
    let mut dev = modbus_peer(&link);
    let cfg = write_config(dir.path(), &broker, &link, false);
    let mut gw = daemon(&cfg);

    // Connected: the empty set is published (retained).
    wait_msgs(&sub, "an empty alerts set", |m| {
        alert_sets(m, &t, 0).into_iter().find(|s| s["total"] == 0)
    })
    .await;
    // The IO board polled (its first read only sets the state), then the door opens.
    wait_msgs(&sub, "io-1 online", |m| {
        events_of(m, &t, "device_online")
            .into_iter()
            .find(|e| e["payload"]["device"] == "io-1")
    })
    .await;
    dev.send(json!({"op": "input", "addr": 3, "index": 0, "on": true}));
    let raised = wait_msgs(&sub, "door_held_open raised", |m| {
        events_of(m, &t, "alert_raised")
            .into_iter()
            .find(|e| e["payload"]["kind"] == "door_held_open")
    })
    .await;
    let id = raised["payload"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        raised["payload"]["subject"],
        json!({"type": "entry", "id": "door-1"})
    );
    // The retained set shows it (published once durable).
    wait_msgs(&sub, "the alert on `alerts`", |m| {
        alert_sets(m, &t, 0)
            .into_iter()
            .find(|s| s["total"] == 1 && s["alerts"][0]["id"] == id.as_str())
    })
    .await;

    // Killed while the door is held open, started again: the same alert, not a new one.
    gw.kill().unwrap();
    gw.wait().unwrap();
    let from = sub.messages().len();
    let gw = daemon(&cfg);
    wait_msgs(&sub, "gateway_started again", |m| {
        let starts = events_of(m, &t, "gateway_started");
        (starts.len() >= 2).then_some(())
    })
    .await;
    let again = wait_msgs(&sub, "the alerts set after the restart", |m| {
        alert_sets(m, &t, from).into_iter().next()
    })
    .await;
    assert_eq!(again["total"], 1, "{again}");
    assert_eq!(again["alerts"][0]["id"], id.as_str(), "{again}");
    // Still held open well past the limit: still one raise.
    tokio::time::sleep(Duration::from_secs(7)).await;

    // Closed: cleared, with the original id, and the set is empty.
    dev.send(json!({"op": "input", "addr": 3, "index": 0, "on": false}));
    let cleared = wait_msgs(&sub, "door_held_open cleared", |m| {
        events_of(m, &t, "alert_cleared")
            .into_iter()
            .find(|e| e["payload"]["kind"] == "door_held_open")
    })
    .await;
    assert_eq!(cleared["payload"]["id"], id.as_str());
    wait_msgs(&sub, "an empty set after the clear", |m| {
        alert_sets(m, &t, from).pop().filter(|s| s["total"] == 0)
    })
    .await;
    let raises: Vec<Value> = events_of(&sub.messages(), &t, "alert_raised")
        .into_iter()
        .filter(|e| e["payload"]["kind"] == "door_held_open")
        .collect();
    assert_eq!(raises.len(), 1, "one raise in all: {raises:?}");

    // The door's manual release (a key switch on input 1): `manual_unlock` on the entry,
    // cleared when the door has opened and closed again.
    dev.send(json!({"op": "input", "addr": 3, "index": 1, "on": true}));
    let manual = wait_msgs(&sub, "manual_unlock raised", |m| {
        events_of(m, &t, "alert_raised")
            .into_iter()
            .find(|e| e["payload"]["kind"] == "manual_unlock")
    })
    .await;
    assert_eq!(
        manual["payload"]["subject"],
        json!({"type": "entry", "id": "door-1"})
    );
    dev.send(json!({"op": "input", "addr": 3, "index": 0, "on": true}));
    tokio::time::sleep(Duration::from_millis(500)).await;
    dev.send(json!({"op": "input", "addr": 3, "index": 0, "on": false}));
    let cleared = wait_msgs(&sub, "manual_unlock cleared", |m| {
        events_of(m, &t, "alert_cleared")
            .into_iter()
            .find(|e| e["payload"]["kind"] == "manual_unlock")
    })
    .await;
    assert_eq!(cleared["payload"]["id"], manual["payload"]["id"]);
    stop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_trigger_relay_goes_off_on_time_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let t = Topics::new("gatehouse", "site-1", "gw-1");
    let sub = Subscriber::connect(&broker, "cloud", "gatehouse/site-1/gw-1/#").await;
    let link = dir.path().join("modbus");
    let dev = modbus_peer(&link);
    let with_grant = write_config(dir.path(), &broker, &link, true);

    // A grant into z-1 at start: the trigger relay goes on, then off by itself.
    let gw = daemon(&with_grant);
    wait_msgs(&sub, "the grant", |m| {
        events_of(m, &t, "access_granted").into_iter().next()
    })
    .await;
    dev.wait_for("trigger relay on", WAIT, coil(1, 5, true));
    dev.wait_for("trigger relay off", WAIT, coil(1, 5, false));
    stop(gw);

    // Again, and the daemon is killed while the relay is on; the restart (no grant this time)
    // switches it off at its stored time.
    let seen = dev.len();
    let mut gw = daemon(&with_grant);
    eventually_peer(&dev, seen, "trigger relay on again", coil(1, 5, true));
    gw.kill().unwrap();
    gw.wait().unwrap();
    let seen_off = dev.len();
    assert_eq!(
        dev.count_since(seen, coil(1, 5, false)),
        0,
        "the relay went off before the kill: the test proves nothing"
    );
    let without = write_config(dir.path(), &broker, &link, false);
    let gw = daemon(&without);
    eventually_peer(
        &dev,
        seen_off,
        "trigger relay off after the restart",
        coil(1, 5, false),
    );
    stop(gw);
}

/// Waits for a peer event matching `pred` among those after index `from`.
fn eventually_peer(dev: &Peer, from: usize, what: &str, pred: impl Fn(&Value) -> bool) {
    let end = Instant::now() + WAIT;
    while dev.count_since(from, &pred) == 0 {
        assert!(Instant::now() < end, "{what}: not seen within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The BTHome sensor of unit A-103 on the demo site (`sensor-hall-a`).
const SENSOR: &str = "3C:2E:F5:00:00:A1";

/// BTHome v2 service data, plain: packet id `pid`, motion on or off.
fn bthome_motion(pid: u8, on: bool) -> String {
    format!("4000{pid:02x}21{:02x}", u8::from(on))
}

/// The demo site (motion: 2 events in 1 minute, cleared after 1 quiet minute; A-103's motion
/// sensor is `sensor-hall-a`) with BLE through BlueZ at `dbus` (the mock).
fn write_ble_config(dir: &Path, b: &Broker) -> PathBuf {
    let signer = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    let snapshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo-snapshot.json");
    b.write_gateway_config(
        dir,
        "data",
        &signer.verifying_key(),
        "reconnect_min_ms = 200\n",
        &format!(
            "[access]\ninitial_snapshot = \"{}\"\n[ble]\nadapter = \"hci0\"\n",
            snapshot.display()
        ),
    )
}

fn ble_daemon(cfg: &Path, dbus: &str) -> Child {
    Command::new(gatehouse_bin())
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .env("DBUS_SYSTEM_BUS_ADDRESS", dbus)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bthome_motion_sensor_raises_once_across_a_restart_and_clears_when_quiet() {
    let mut bluez = Peer::start_with(
        "bluez_mock.py",
        &[format!("--sensor={SENSOR}"), "--adv-interval-ms=500".into()],
    );
    let dbus = bluez.events()[0]["address"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let t = Topics::new("gatehouse", "site-1", "gw-1");
    let sub = Subscriber::connect(&broker, "cloud", "gatehouse/site-1/gw-1/#").await;
    let cfg = write_ble_config(dir.path(), &broker);
    let mut gw = ble_daemon(&cfg, &dbus);
    // The sensor is heard (its default advert: a temperature).
    wait_msgs(&sub, "sensor-hall-a heard", |m| {
        events_of(m, &t, "sensor_reading")
            .into_iter()
            .find(|e| e["payload"]["device"] == "sensor-hall-a")
    })
    .await;

    // Motion, no motion, motion: two motion facts within a minute.
    for (pid, on) in [(200, true), (201, false), (202, true)] {
        bluez.send(json!({"op": "sensor", "mac": SENSOR, "hex": bthome_motion(pid, on)}));
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let raised = wait_msgs(&sub, "motion_alert raised", |m| {
        events_of(m, &t, "alert_raised")
            .into_iter()
            .find(|e| e["payload"]["kind"] == "motion_alert")
    })
    .await;
    assert_eq!(
        raised["payload"]["subject"],
        json!({"type": "unit", "id": "A-103"})
    );
    let id = raised["payload"]["id"].as_str().unwrap().to_string();
    wait_msgs(&sub, "the alert on `alerts`", |m| {
        alert_sets(m, &t, 0).into_iter().find(|s| {
            s["alerts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["id"] == id.as_str())
        })
    })
    .await;

    // Killed while active, started again: the same alert comes back on `alerts`; more motion
    // does not raise it again.
    gw.kill().unwrap();
    gw.wait().unwrap();
    let from = sub.messages().len();
    let gw = ble_daemon(&cfg, &dbus);
    let again = wait_msgs(&sub, "the alerts set after the restart", |m| {
        alert_sets(m, &t, from).into_iter().next()
    })
    .await;
    assert!(
        again["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == id.as_str() && a["kind"] == "motion_alert"),
        "{again}"
    );
    for (pid, on) in [(203, false), (204, true)] {
        bluez.send(json!({"op": "sensor", "mac": SENSOR, "hex": bthome_motion(pid, on)}));
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    // One quiet minute (lived time) later: cleared with the original id.
    let end = Instant::now() + Duration::from_secs(180);
    let cleared = loop {
        if let Some(c) = events_of(&sub.messages(), &t, "alert_cleared")
            .into_iter()
            .find(|e| e["payload"]["kind"] == "motion_alert")
        {
            break c;
        }
        assert!(
            Instant::now() < end,
            "motion_alert not cleared within 180 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(cleared["payload"]["id"], id.as_str());
    let raises: Vec<Value> = events_of(&sub.messages(), &t, "alert_raised")
        .into_iter()
        .filter(|e| e["payload"]["kind"] == "motion_alert")
        .collect();
    assert_eq!(raises.len(), 1, "one motion raise in all: {raises:?}");
    stop(gw);
}
