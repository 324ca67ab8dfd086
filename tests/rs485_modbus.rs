//! Modbus RTU devices against independent pymodbus servers (`tests/peers/modbus_dev.py`, a
//! separate process on a PTY), one per profile in `devices/`: relays (on, off, board-timed and
//! gatehouse-timed pulses) through the command router's `Relays`, inputs (door contact, exit
//! button, motion, tamper), temperature and humidity readings, a Modbus exception, a silent
//! device and a device that falls silent, and an unplugged adapter.

#[path = "support/peers.rs"]
mod peers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse::access::AccessEngine;
use gatehouse::cloud::commands::{Execution, Online, RelayOp};
use gatehouse::rs485::Rs485;
use peers::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn coil(addr: u64, ch: u64, on: bool) -> impl Fn(&Value) -> bool {
    move |e: &Value| e["ev"] == "coil" && e["addr"] == addr && e["index"] == ch && e["on"] == on
}

/// Every profile on one bus: relay board (1), relay board with inputs (2, the demo site's
/// `relay-board-1`, whose channels 0 and 1 open `gate-1` and `exit-1`), IO board (3),
/// XY-MD02 (4), and an XY-MD02 nobody answers for (5).
fn bus(link: &std::path::Path) -> String {
    format!(
        r#"
[[bus]]
id = "io"
port = "{}"
protocol = "modbus"
timeout_ms = 500
[[bus.device]]
id = "relays-a"
profile = "waveshare-relay-8ch"
address = 1
poll_interval_ms = 200
[[bus.device]]
id = "relay-board-1"
profile = "waveshare-relay-8ch-d"
address = 2
poll_interval_ms = 50
inputs = [
  {{ channel = 0, role = "door_contact", entry = "gate-1" }},
]
[[bus.device]]
id = "io-1"
profile = "waveshare-io-8ch"
address = 3
poll_interval_ms = 50
inputs = [
  {{ channel = 1, role = "exit_button", entry = "exit-1" }},
  {{ channel = 2, role = "motion" }},
  {{ channel = 3, role = "tamper" }},
]
[[bus.device]]
id = "climate-1"
profile = "xy-md02"
address = 4
poll_interval_ms = 100
[[bus.device]]
id = "climate-dead"
profile = "xy-md02"
address = 5
poll_interval_ms = 100
"#,
        link.display()
    )
}

fn peer(link: &std::path::Path) -> Peer {
    Peer::start(
        "modbus_dev.py",
        link,
        &[
            "--device",
            "1:relay8",
            "--device",
            "2:relay8d",
            "--device",
            "3:io8",
            "--device",
            "4:xymd02",
        ]
        .map(String::from),
    )
}

#[test]
fn every_profile_works_against_its_peer() {
    let dir = tempfile::tempdir().unwrap();
    let store = demo_store(dir.path());
    let link = dir.path().join("modbus");
    let mut dev = peer(&link);
    let cfg = config(dir.path(), &bus(&link));
    let buses = Rs485::start(&cfg.buses, Arc::new(AccessEngine::new(store.clone(), None))).unwrap();
    let relays = buses.relays();
    for d in ["relays-a", "relay-board-1", "io-1", "climate-1"] {
        wait_event(&store, 0, "device_online", WAIT, |p| p["device"] == d);
    }
    // XY-MD02: the first readings are reported.
    let t = wait_event(&store, 0, "sensor_reading", WAIT, |p| {
        p["device"] == "climate-1" && p["reading"] == "temperature"
    });
    assert_eq!(t.payload["value"], 21.5);
    assert_eq!(t.payload["unit"], "celsius");
    let h = wait_event(&store, 0, "sensor_reading", WAIT, |p| {
        p["device"] == "climate-1" && p["reading"] == "humidity"
    });
    assert_eq!(h.payload["value"], 45.0);
    // A device nobody answers for is offline after its profile's failures; the others go on.
    let off = wait_event(&store, 0, "device_offline", WAIT, |p| {
        p["device"] == "climate-dead"
    });
    assert!(off.payload["detail"].as_str().unwrap().contains("timeout"));
    assert_eq!(relays.online("climate-dead"), Online::No);
    assert_eq!(relays.online("relays-a"), Online::Yes);
    assert_eq!(relays.online("nobody"), Online::Unknown);

    // Relays through the command router's interface: on, off, board-timed pulse.
    let start = Instant::now();
    assert!(matches!(
        relays.execute("relays-a", 3, RelayOp::On),
        Execution::Done(_)
    ));
    dev.wait_for("coil 3 on", WAIT, coil(1, 3, true));
    assert!(matches!(
        relays.execute("relays-a", 3, RelayOp::Off),
        Execution::Done(_)
    ));
    dev.wait_for("coil 3 off", WAIT, coil(1, 3, false));
    let Execution::Done(detail) = relays.execute("relays-a", 4, RelayOp::Pulse { ms: 250 }) else {
        panic!("pulse failed")
    };
    assert!(detail.contains("timed by the board"), "{detail}");
    let on = dev.wait_for("coil 4 on", WAIT, coil(1, 4, true));
    let off = dev.wait_for("coil 4 off by the board", WAIT, |e| {
        coil(1, 4, false)(e) && e["cause"] == "flash"
    });
    let len = off["t"].as_f64().unwrap() - on["t"].as_f64().unwrap();
    assert!(
        (0.25..1.0).contains(&len),
        "a 250 ms pulse (3 × 100 ms) lasted {len} s"
    );
    // The IO board has no board-timed pulse: gatehouse times it.
    let Execution::Done(detail) = relays.execute("io-1", 0, RelayOp::Pulse { ms: 300 }) else {
        panic!("pulse failed")
    };
    assert!(!detail.contains("board"), "{detail}");
    let on = dev.wait_for("io coil on", WAIT, coil(3, 0, true));
    let off = dev.wait_for("io coil off", WAIT, coil(3, 0, false));
    let len = off["t"].as_f64().unwrap() - on["t"].as_f64().unwrap();
    assert!(
        (0.29..2.0).contains(&len),
        "a 300 ms software pulse lasted {len} s"
    );
    // Refusals with a reason, before the wire.
    let Execution::Failed(e) = relays.execute("relays-a", 8, RelayOp::On) else {
        panic!()
    };
    assert!(e.contains("relays 0 to 7"), "{e}");
    let Execution::Failed(e) = relays.execute("climate-1", 0, RelayOp::On) else {
        panic!()
    };
    assert!(e.contains("no relays"), "{e}");
    assert!(start.elapsed() < WAIT);

    // Door contact on the relay board's input 0 (gate-1): opening without a release is forced.
    let seq = last_seq(&store);
    dev.send(json!({"op": "input", "addr": 2, "index": 0, "on": true}));
    wait_event(&store, seq, "door_forced", WAIT, |p| p["entry"] == "gate-1");
    dev.send(json!({"op": "input", "addr": 2, "index": 0, "on": false}));
    wait_event(&store, seq, "door_closed", WAIT, |p| p["entry"] == "gate-1");
    // After a remote unlock of the gate (a pulse on its relay), opening is not forced.
    let seq = last_seq(&store);
    assert!(matches!(
        relays.execute("relay-board-1", 0, RelayOp::Pulse { ms: 300 }),
        Execution::Done(_)
    ));
    dev.send(json!({"op": "input", "addr": 2, "index": 0, "on": true}));
    wait_event(&store, seq, "door_opened", WAIT, |p| p["entry"] == "gate-1");
    assert!(
        !logged(&store)
            .iter()
            .any(|e| e.seq > seq && e.kind == "door_forced"),
        "a released door was reported forced"
    );

    // Exit button on the IO board (exit-1): the exit gate's relay (relay-board-1 ch 1) pulses.
    let seq = last_seq(&store);
    dev.send(json!({"op": "input", "addr": 3, "index": 1, "on": true}));
    wait_event(&store, seq, "exit_request", WAIT, |p| {
        p["entry"] == "exit-1"
    });
    dev.wait_for("exit relay", WAIT, coil(2, 1, true));
    // Motion and tamper.
    dev.send(json!({"op": "input", "addr": 3, "index": 2, "on": true}));
    wait_event(&store, seq, "motion", WAIT, |p| p["device"] == "io-1");
    dev.send(json!({"op": "input", "addr": 3, "index": 3, "on": true}));
    let t = wait_event(&store, seq, "tamper", WAIT, |p| p["device"] == "io-1");
    assert_eq!(t.payload["active"], true);

    // A new temperature is reported once it moved by the profile's delta.
    let seq = last_seq(&store);
    dev.send(json!({"op": "temp", "addr": 4, "celsius": 25.0}));
    let t = wait_event(&store, seq, "sensor_reading", WAIT, |p| {
        p["device"] == "climate-1" && p["reading"] == "temperature"
    });
    assert_eq!(t.payload["value"], 25.0);

    // A device falling silent goes offline, and comes back.
    let seq = last_seq(&store);
    dev.send(json!({"op": "silent", "addr": 4, "on": true}));
    wait_event(&store, seq, "device_offline", WAIT, |p| {
        p["device"] == "climate-1"
    });
    let Execution::Done(_) = relays.execute("relays-a", 5, RelayOp::On) else {
        panic!("the bus stalled behind a silent device")
    };
    dev.send(json!({"op": "silent", "addr": 4, "on": false}));
    wait_event(&store, seq, "device_online", WAIT, |p| {
        p["device"] == "climate-1"
    });

    buses.stop(Duration::from_secs(5));
}

#[test]
fn a_modbus_exception_is_a_device_error_not_a_crash() {
    // The config says the board has inputs (the (D) model) but the board on the wire is the
    // plain one: every input read gets exception 02. Reported once, the device stays online
    // and its relays work.
    let dir = tempfile::tempdir().unwrap();
    let store = demo_store(dir.path());
    let link = dir.path().join("modbus");
    let dev = Peer::start(
        "modbus_dev.py",
        &link,
        &["--device".into(), "7:relay8".into()],
    );
    let cfg = config(
        dir.path(),
        &format!(
            r#"
[[bus]]
id = "io"
port = "{}"
protocol = "modbus"
[[bus.device]]
id = "wrong-model"
profile = "waveshare-relay-8ch-d"
address = 7
poll_interval_ms = 50
"#,
            link.display()
        ),
    );
    let buses = Rs485::start(&cfg.buses, Arc::new(AccessEngine::new(store.clone(), None))).unwrap();
    let e = wait_event(&store, 0, "device_error", WAIT, |p| {
        p["device"] == "wrong-model"
    });
    assert!(
        e.payload["error"].as_str().unwrap().contains("exception"),
        "{}",
        e.payload
    );
    std::thread::sleep(Duration::from_millis(500));
    let errors = logged(&store)
        .iter()
        .filter(|e| e.kind == "device_error")
        .count();
    assert_eq!(errors, 1, "a repeated exception is recorded once");
    assert_eq!(buses.relays().online("wrong-model"), Online::Yes);
    assert!(matches!(
        buses.relays().execute("wrong-model", 2, RelayOp::On),
        Execution::Done(_)
    ));
    dev.wait_for("coil on", WAIT, coil(7, 2, true));
    buses.stop(Duration::from_secs(5));
}

#[test]
fn an_unplugged_adapter_is_reported_and_survived() {
    let dir = tempfile::tempdir().unwrap();
    let store = demo_store(dir.path());
    let link = dir.path().join("modbus");
    let mut dev = Peer::start(
        "modbus_dev.py",
        &link,
        &["--device".into(), "1:relay8".into()],
    );
    let cfg = config(
        dir.path(),
        &format!(
            r#"
[[bus]]
id = "io"
port = "{}"
protocol = "modbus"
[[bus.device]]
id = "relays-a"
profile = "waveshare-relay-8ch"
address = 1
poll_interval_ms = 50
"#,
            link.display()
        ),
    );
    let buses = Rs485::start(&cfg.buses, Arc::new(AccessEngine::new(store.clone(), None))).unwrap();
    wait_event(&store, 0, "device_online", WAIT, |p| {
        p["device"] == "relays-a"
    });
    let seq = last_seq(&store);
    dev.kill();
    let _ = std::fs::remove_file(&link);
    wait_event(&store, seq, "bus_disconnected", WAIT, |p| p["bus"] == "io");
    wait_event(&store, seq, "device_offline", WAIT, |p| {
        p["device"] == "relays-a"
    });
    let Execution::Failed(_) = buses.relays().execute("relays-a", 0, RelayOp::On) else {
        panic!("a relay on an unplugged bus reported done")
    };
    let seq = last_seq(&store);
    let dev = Peer::start(
        "modbus_dev.py",
        &link,
        &["--device".into(), "1:relay8".into()],
    );
    wait_event(&store, seq, "bus_connected", WAIT, |p| p["bus"] == "io");
    wait_event(&store, seq, "device_online", WAIT, |p| {
        p["device"] == "relays-a"
    });
    assert!(matches!(
        buses.relays().execute("relays-a", 0, RelayOp::On),
        Execution::Done(_)
    ));
    dev.wait_for("coil on", WAIT, coil(1, 0, true));
    buses.stop(Duration::from_secs(5));
}

#[test]
fn signed_unlock_and_relay_commands_reach_the_board_through_the_router() {
    use ed25519_dalek::SigningKey;
    use gatehouse::cloud::commands::{CommandConfig, NoDevices, Router, handle, sign};
    use gatehouse::cloud::messages::Command;

    let dir = tempfile::tempdir().unwrap();
    let store = demo_store(dir.path());
    let link = dir.path().join("modbus");
    let dev = Peer::start(
        "modbus_dev.py",
        &link,
        &["--device".into(), "2:relay8d".into()],
    );
    let cfg = config(
        dir.path(),
        &format!(
            r#"
[[bus]]
id = "io"
port = "{}"
protocol = "modbus"
[[bus.device]]
id = "relay-board-1"
profile = "waveshare-relay-8ch-d"
address = 2
"#,
            link.display()
        ),
    );
    let buses = Rs485::start(&cfg.buses, Arc::new(AccessEngine::new(store.clone(), None))).unwrap();
    wait_event(&store, 0, "device_online", WAIT, |p| {
        p["device"] == "relay-board-1"
    });
    let signer = SigningKey::from_bytes(&[9; 32]);
    let router = Router::new(Arc::new(NoDevices), buses.relays());
    let ccfg = CommandConfig::new(signer.verifying_key(), "site", "gw");
    let run = |id: &str, name: &str, target: Value, args: Value| {
        let now = chrono::Utc::now();
        let cmd = Command {
            v: 2,
            site: "site".into(),
            gateway: "gw".into(),
            id: id.into(),
            name: name.into(),
            issued_at: now,
            expires_at: now + chrono::Duration::minutes(1),
            target: serde_json::from_value(target).unwrap(),
            args,
        };
        handle(&router, &store, &sign(&cmd, &signer), name, now, &ccfg).result
    };
    // The cloud's remote unlock of the gate: its relay (channel 0) pulses, board-timed.
    let r = run("c-1", "unlock", json!({"entry": "gate-1"}), Value::Null);
    assert_eq!(r.status, "done", "{r:?}");
    assert!(r.detail.as_deref().unwrap().contains("pulsed"), "{r:?}");
    dev.wait_for("gate relay", WAIT, coil(2, 0, true));
    // A raw relay command.
    let r = run(
        "c-2",
        "relay",
        json!({"device": "relay-board-1", "channel": 6}),
        json!({"action": "on"}),
    );
    assert_eq!(r.status, "done", "{r:?}");
    dev.wait_for("relay 6", WAIT, coil(2, 6, true));
    // A channel the board does not have: the device's refusal, as `failed`.
    let r = run(
        "c-3",
        "relay",
        json!({"device": "relay-board-1", "channel": 12}),
        json!({"action": "on"}),
    );
    assert_eq!(r.status, "failed", "{r:?}");
    // A device no bus has.
    let r = run(
        "c-4",
        "relay",
        json!({"device": "nowhere", "channel": 0}),
        json!({"action": "on"}),
    );
    assert_eq!(r.status, "refused", "{r:?}");
    buses.stop(Duration::from_secs(5));
}
