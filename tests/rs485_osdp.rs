//! OSDP readers against independent LibOSDP peripheral devices (Python `libosdp`, a separate
//! process on a PTY, `tests/peers/osdp_pd.py`), with the entry's relay on a pymodbus board
//! (`tests/peers/modbus_dev.py`): keypad codes and cards through the secure channel to the
//! access decision, the reader's LED and buzzer, the relay; install mode with KEYSET; two
//! readers on one bus with one going silent; tamper; an unplugged adapter.

#[path = "support/peers.rs"]
mod peers;

use std::sync::Arc;
use std::time::Duration;

use gatehouse::access::AccessEngine;
use gatehouse::rs485::Rs485;
use gatehouse::store::Store;
use peers::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);
const KEY_A: &str = "000102030405060708090a0b0c0d0e0f";
const KEY_B: &str = "f0e0d0c0b0a090807060504030201000";

fn key(hex_key: &str) -> [u8; 16] {
    hex::decode(hex_key).unwrap().try_into().unwrap()
}

struct Site {
    dir: tempfile::TempDir,
    store: Arc<Store>,
}

fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let store = demo_store(dir.path());
    Site { dir, store }
}

impl Site {
    fn link(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the buses of `body` (TOML `[[bus]]` sections).
    fn start(&self, body: &str) -> Rs485 {
        let cfg = config(self.dir.path(), body);
        Rs485::start(
            &cfg.buses,
            Arc::new(AccessEngine::new(self.store.clone(), None)),
        )
        .unwrap()
    }
}

/// The relay board of the demo site's gate (`relay-board-1`, channels 0 and 1).
fn relay_bus(link: &std::path::Path) -> String {
    format!(
        r#"
[[bus]]
id = "io"
port = "{}"
protocol = "modbus"
timeout_ms = 500
[[bus.device]]
id = "relay-board-1"
profile = "waveshare-relay-8ch"
address = 1
poll_interval_ms = 200
"#,
        link.display()
    )
}

fn coil_on(ch: u64) -> impl Fn(&Value) -> bool {
    move |e: &Value| e["ev"] == "coil" && e["index"] == ch && e["on"] == true
}

#[test]
fn keypad_codes_and_cards_over_the_secure_channel_drive_feedback_and_the_relay() {
    let s = site();
    s.store
        .set_reader_key("keypad-gate-1", &key(KEY_A), true)
        .unwrap();
    let mut pd = Peer::start(
        "osdp_pd.py",
        &s.link("osdp"),
        &["--pd".into(), format!("0:{KEY_A}:enforce")],
    );
    let board = Peer::start(
        "modbus_dev.py",
        &s.link("modbus"),
        &["--device".into(), "1:relay8".into()],
    );
    let buses = s.start(&format!(
        r#"
[[bus]]
id = "readers"
port = "{}"
protocol = "osdp"
[[bus.reader]]
id = "keypad-gate-1"
address = 0
entry = "gate-1"
secure = "key"
{}"#,
        s.link("osdp").display(),
        relay_bus(&s.link("modbus"))
    ));
    pd.wait_for("secure channel", WAIT, |e| {
        e["ev"] == "sc" && e["active"] == true
    });
    wait_event(&s.store, 0, "device_online", WAIT, |p| {
        p["device"] == "keypad-gate-1"
    });

    // A tenant's code, as a real keypad sends it (`#` is 0x0D).
    let seq = last_seq(&s.store);
    let (p0, b0) = (pd.len(), board.len());
    pd.send(json!({"op": "keys", "pd": 0, "digits": "123456#"}));
    let granted = wait_event(&s.store, seq, "access_granted", WAIT, |_| true);
    assert_eq!(granted.payload["reason"], "tenant");
    assert_eq!(granted.payload["user"], "alice");
    assert_eq!(granted.payload["device"], "keypad-gate-1");
    assert_eq!(granted.payload["entry"], "gate-1");
    // The relay: a board-timed pulse (Waveshare flash-on, 0x0200 + channel, 100 ms units).
    board.wait_for("gate relay on", WAIT, coil_on(0));
    let write = board.wait_for("flash write", WAIT, |e| e["ev"] == "write" && e["fc"] == 5);
    assert_eq!(write["address"], 0x0200);
    assert_eq!(write["values"], json!([3]));
    board.wait_for("gate relay off again", WAIT, |e| {
        e["ev"] == "coil" && e["index"] == 0 && e["on"] == false && e["cause"] == "flash"
    });
    let led = pd.wait_for("green LED", WAIT, |e| e["ev"] == "led");
    assert_eq!(led["on_color"], 2, "green: {led}");
    let buz = pd.wait_for("one beep", WAIT, |e| e["ev"] == "buzzer");
    assert_eq!(buz["rep_count"], 1);
    assert!(pd.len() > p0 && board.len() > b0);

    // An unknown code: refused, red, three beeps, no relay.
    let seq = last_seq(&s.store);
    let (p0, b0) = (pd.len(), board.len());
    pd.send(json!({"op": "keys", "pd": 0, "digits": "999999#"}));
    let denied = wait_event(&s.store, seq, "access_denied", WAIT, |_| true);
    assert_eq!(denied.payload["reason"], "unknown_credential");
    let led = pd.wait_for("red LED", WAIT, |e| e["ev"] == "led" && e["on_color"] == 1);
    assert!(led["t"].as_f64().is_some());
    pd.wait_for("three beeps", WAIT, |e| {
        e["ev"] == "buzzer" && e["rep_count"] == 3
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        board.count_since(b0, coil_on(0)),
        0,
        "no relay on a refusal"
    );
    assert!(pd.len() > p0);

    // `*` clears; digits sent one reply at a time assemble the same way.
    let seq = last_seq(&s.store);
    pd.send(json!({"op": "keys", "pd": 0, "digits": "55*123456#", "each": true, "gap_ms": 20}));
    let g = wait_event(&s.store, seq, "access_granted", WAIT, |_| true);
    assert_eq!(g.payload["user"], "alice");

    // Alice's 26-bit card (facility 12, number 34567).
    let seq = last_seq(&s.store);
    pd.send(json!({"op": "card", "pd": 0, "facility": 12, "number": 34567}));
    let g = wait_event(&s.store, seq, "access_granted", WAIT, |_| true);
    assert_eq!(g.payload["credential"], "card");
    assert_eq!(g.payload["credential_id"], "c-alice-card");

    // A card read with a parity error: a device error, a refusal at the reader, no decision.
    let seq = last_seq(&s.store);
    pd.send(json!({"op": "card", "pd": 0, "bits": 26, "value": 0x3FF_FFFF}));
    let e = wait_event(&s.store, seq, "device_error", WAIT, |p| {
        p["device"] == "keypad-gate-1"
    });
    assert!(
        e.payload["error"].as_str().unwrap().contains("parity"),
        "{}",
        e.payload
    );

    // A blacklisted fob presented as a raw read (printable id).
    let seq = last_seq(&s.store);
    pd.send(json!({"op": "card", "pd": 0, "bits": 80, "format": "raw", "hex": hex::encode("FOB-DEAD01")}));
    let d = wait_event(&s.store, seq, "access_denied", WAIT, |_| true);
    assert_eq!(d.payload["reason"], "blacklisted");
    assert_eq!(d.payload["fob"], "FOB-DEAD01");

    // The reader's own output as a relay (OSDP OUT, timed: control code 5, 100 ms units).
    let relays = buses.relays();
    assert!(matches!(
        relays.execute(
            "keypad-gate-1",
            0,
            gatehouse::cloud::commands::RelayOp::Pulse { ms: 500 }
        ),
        gatehouse::cloud::commands::Execution::Done(_)
    ));
    let out = pd.wait_for("OSDP output", WAIT, |e| e["ev"] == "output");
    assert_eq!(out["output_no"], 0);
    assert_eq!(out["control_code"], 5);
    assert_eq!(out["timer_count"], 5);

    // Tamper switch.
    let seq = last_seq(&s.store);
    pd.send(json!({"op": "tamper", "pd": 0, "on": true}));
    let t = wait_event(&s.store, seq, "tamper", WAIT, |p| {
        p["device"] == "keypad-gate-1"
    });
    assert_eq!(t.payload["active"], true);

    buses.stop(Duration::from_secs(5));
    drop(board);
}

#[test]
fn five_bad_codes_lock_the_keypad_out_with_its_own_feedback() {
    let s = site();
    let mut pd = Peer::start(
        "osdp_pd.py",
        &s.link("osdp"),
        &["--pd".into(), "3:nosc".into()],
    );
    let _board = Peer::start(
        "modbus_dev.py",
        &s.link("modbus"),
        &["--device".into(), "1:relay8".into()],
    );
    let buses = s.start(&format!(
        r#"
[[bus]]
id = "readers"
port = "{}"
protocol = "osdp"
[[bus.reader]]
id = "keypad-plain"
address = 3
entry = "gate-1"
secure = "none"
{}"#,
        s.link("osdp").display(),
        relay_bus(&s.link("modbus"))
    ));
    wait_event(&s.store, 0, "device_online", WAIT, |p| {
        p["device"] == "keypad-plain"
    });
    let seq = last_seq(&s.store);
    for i in 0..5 {
        pd.send(json!({"op": "keys", "pd": 3, "digits": format!("90000{i}#")}));
        std::thread::sleep(Duration::from_millis(150));
    }
    wait_event(&s.store, seq, "keypad_locked_out", WAIT, |p| {
        p["device"] == "keypad-plain"
    });
    let seq = last_seq(&s.store);
    let p0 = pd.len();
    pd.send(json!({"op": "keys", "pd": 3, "digits": "123456#"}));
    let d = wait_event(&s.store, seq, "access_denied", WAIT, |_| true);
    assert_eq!(d.payload["reason"], "keypad_locked_out");
    // Locked out: red flashing and one long beep.
    let led = pd.wait_for("flashing red", WAIT, |e| {
        e["ev"] == "led" && e["on_color"] == 1 && e["off_count"] != 0
    });
    assert!(led["on_count"].as_u64().unwrap() > 0);
    pd.wait_for("long beep", WAIT, |e| {
        e["ev"] == "buzzer" && e["on_count"] == 15
    });
    assert!(pd.len() > p0);
    buses.stop(Duration::from_secs(5));
}

#[test]
fn install_mode_gives_the_reader_its_own_key_and_the_next_start_enforces_it() {
    let s = site();
    let pd = Peer::start(
        "osdp_pd.py",
        &s.link("osdp"),
        &["--pd".into(), "5:install".into()],
    );
    let _board = Peer::start(
        "modbus_dev.py",
        &s.link("modbus"),
        &["--device".into(), "1:relay8".into()],
    );
    let body = format!(
        r#"
[[bus]]
id = "readers"
port = "{}"
protocol = "osdp"
[[bus.reader]]
id = "keypad-new"
address = 5
entry = "gate-1"
secure = "install"
{}"#,
        s.link("osdp").display(),
        relay_bus(&s.link("modbus"))
    );
    let buses = s.start(&body);
    let ks = pd.wait_for("KEYSET", WAIT, |e| e["ev"] == "keyset");
    let given = ks["key"].as_str().unwrap().to_string();
    assert_ne!(given, "00000000000000000000000000000000");
    wait_event(&s.store, 0, "reader_paired", WAIT, |p| {
        p["device"] == "keypad-new"
    });
    let (stored, confirmed) = s.store.reader_key("keypad-new").unwrap().expect("key kept");
    assert_eq!(
        hex::encode(stored),
        given,
        "the key the reader got is the one kept"
    );
    assert!(confirmed);
    // The channel is up on the new key: a code goes through.
    let mut pd = pd;
    let seq = last_seq(&s.store);
    pd.send(json!({"op": "keys", "pd": 5, "digits": "123456#"}));
    wait_event(&s.store, seq, "access_granted", WAIT, |_| true);
    buses.stop(Duration::from_secs(5));

    // A restart: the paired reader is spoken to on its key, with the secure channel enforced.
    let n_keysets = pd.count_since(0, |e| e["ev"] == "keyset");
    let seq = last_seq(&s.store);
    let buses = s.start(&body);
    wait_event(&s.store, seq, "device_online", WAIT, |p| {
        p["device"] == "keypad-new"
    });
    pd.send(json!({"op": "keys", "pd": 5, "digits": "123456#"}));
    wait_event(&s.store, seq, "access_granted", WAIT, |_| true);
    assert_eq!(
        pd.count_since(0, |e| e["ev"] == "keyset"),
        n_keysets,
        "no second KEYSET"
    );
    buses.stop(Duration::from_secs(5));
}

#[test]
fn two_readers_share_a_bus_and_one_going_silent_does_not_stop_the_other() {
    let s = site();
    s.store
        .set_reader_key("keypad-in", &key(KEY_A), true)
        .unwrap();
    s.store
        .set_reader_key("keypad-out", &key(KEY_B), true)
        .unwrap();
    let mut pd = Peer::start(
        "osdp_pd.py",
        &s.link("osdp"),
        &[
            "--pd".into(),
            format!("1:{KEY_A}:enforce"),
            "--pd".into(),
            format!("2:{KEY_B}:enforce"),
        ],
    );
    let board = Peer::start(
        "modbus_dev.py",
        &s.link("modbus"),
        &["--device".into(), "1:relay8".into()],
    );
    let buses = s.start(&format!(
        r#"
[[bus]]
id = "readers"
port = "{}"
protocol = "osdp"
[[bus.reader]]
id = "keypad-in"
address = 1
entry = "gate-1"
[[bus.reader]]
id = "keypad-out"
address = 2
entry = "exit-1"
direction = "out"
{}"#,
        s.link("osdp").display(),
        relay_bus(&s.link("modbus"))
    ));
    for r in ["keypad-in", "keypad-out"] {
        wait_event(&s.store, 0, "device_online", WAIT, |p| p["device"] == r);
    }
    // The exit reader opens the exit gate (relay channel 1).
    let seq = last_seq(&s.store);
    pd.send(json!({"op": "keys", "pd": 2, "digits": "123456#"}));
    let g = wait_event(&s.store, seq, "access_granted", WAIT, |p| {
        p["device"] == "keypad-out"
    });
    assert_eq!(g.payload["direction"], "out");
    board.wait_for("exit relay", WAIT, coil_on(1));

    // Reader 2 goes silent: reported offline; reader 1 goes on working meanwhile.
    let seq = last_seq(&s.store);
    pd.send(json!({"op": "silent", "pd": 2, "on": true}));
    std::thread::sleep(Duration::from_millis(500));
    pd.send(json!({"op": "keys", "pd": 1, "digits": "123456#"}));
    let g = wait_event(&s.store, seq, "access_granted", WAIT, |p| {
        p["device"] == "keypad-in"
    });
    assert_eq!(g.payload["entry"], "gate-1");
    wait_event(&s.store, seq, "device_offline", WAIT, |p| {
        p["device"] == "keypad-out"
    });
    let seq = last_seq(&s.store);
    pd.send(json!({"op": "keys", "pd": 1, "digits": "123456#"}));
    wait_event(&s.store, seq, "access_granted", WAIT, |p| {
        p["device"] == "keypad-in"
    });
    buses.stop(Duration::from_secs(5));
}

#[test]
fn an_unplugged_adapter_is_reported_and_survived() {
    let s = site();
    s.store
        .set_reader_key("keypad-gate-1", &key(KEY_A), true)
        .unwrap();
    let args = ["--pd".to_string(), format!("0:{KEY_A}:enforce")];
    let mut pd = Peer::start("osdp_pd.py", &s.link("osdp"), &args);
    let _board = Peer::start(
        "modbus_dev.py",
        &s.link("modbus"),
        &["--device".into(), "1:relay8".into()],
    );
    let buses = s.start(&format!(
        r#"
[[bus]]
id = "readers"
port = "{}"
protocol = "osdp"
[[bus.reader]]
id = "keypad-gate-1"
address = 0
entry = "gate-1"
{}"#,
        s.link("osdp").display(),
        relay_bus(&s.link("modbus"))
    ));
    wait_event(&s.store, 0, "device_online", WAIT, |p| {
        p["device"] == "keypad-gate-1"
    });
    // Unplugged: the PTY goes away with its process.
    let seq = last_seq(&s.store);
    pd.kill();
    let _ = std::fs::remove_file(s.link("osdp"));
    let d = wait_event(&s.store, seq, "bus_disconnected", WAIT, |p| {
        p["bus"] == "readers"
    });
    assert!(d.payload["error"].is_string());
    wait_event(&s.store, seq, "device_offline", WAIT, |p| {
        p["device"] == "keypad-gate-1"
    });
    // Plugged back (a new PTY at the same path).
    let seq = last_seq(&s.store);
    let mut pd = Peer::start("osdp_pd.py", &s.link("osdp"), &args);
    wait_event(&s.store, seq, "bus_connected", WAIT, |p| {
        p["bus"] == "readers"
    });
    wait_event(&s.store, seq, "device_online", WAIT, |p| {
        p["device"] == "keypad-gate-1"
    });
    pd.send(json!({"op": "keys", "pd": 0, "digits": "123456#"}));
    wait_event(&s.store, seq, "access_granted", WAIT, |_| true);
    buses.stop(Duration::from_secs(5));
}

#[test]
fn a_reader_in_plain_text_is_not_listened_to() {
    // A reader being paired (install mode, key not yet confirmed) that does no secure channel
    // at all (a swapped or downgraded device): LibOSDP falls back to plain text and reports it
    // online, but gatehouse drops its input, says so, and never counts it as online.
    let s = site();
    s.store
        .set_reader_key("keypad-gate-1", &key(KEY_A), false)
        .unwrap();
    let mut pd = Peer::start(
        "osdp_pd.py",
        &s.link("osdp"),
        &["--pd".into(), "0:nosc".into()],
    );
    let _board = Peer::start(
        "modbus_dev.py",
        &s.link("modbus"),
        &["--device".into(), "1:relay8".into()],
    );
    let buses = s.start(&format!(
        r#"
[[bus]]
id = "readers"
port = "{}"
protocol = "osdp"
[[bus.reader]]
id = "keypad-gate-1"
address = 0
entry = "gate-1"
secure = "install"
{}"#,
        s.link("osdp").display(),
        relay_bus(&s.link("modbus"))
    ));
    // The bus really talks to it.
    pd.wait_for("polled by the gateway", WAIT, |e| {
        e["ev"] == "online" && e["online"] == true
    });
    std::thread::sleep(Duration::from_secs(1));
    pd.send(json!({"op": "keys", "pd": 0, "digits": "123456#"}));
    pd.wait_for("keys delivered", WAIT, |e| {
        e["ev"] == "delivered" && e["event"] == "keypress"
    });
    let e = wait_event(&s.store, 0, "device_error", WAIT, |p| {
        p["device"] == "keypad-gate-1"
    });
    assert!(
        e.payload["error"]
            .as_str()
            .unwrap()
            .contains("without a secure channel"),
        "{}",
        e.payload
    );
    let off = wait_event(&s.store, 0, "device_offline", WAIT, |p| {
        p["device"] == "keypad-gate-1"
    });
    assert!(
        off.payload["detail"]
            .as_str()
            .unwrap()
            .contains("secure channel")
    );
    let log = logged(&s.store);
    assert!(
        !log.iter()
            .any(|e| e.kind == "access_granted" || e.kind == "access_denied"),
        "a reader without its secure channel reached a decision"
    );
    assert!(
        !log.iter()
            .any(|e| e.kind == "device_online" && e.payload["device"] == "keypad-gate-1"),
        "a reader without its secure channel was reported online"
    );
    let (_, confirmed) = s.store.reader_key("keypad-gate-1").unwrap().unwrap();
    assert!(!confirmed, "not paired");
    buses.stop(Duration::from_secs(5));
}
