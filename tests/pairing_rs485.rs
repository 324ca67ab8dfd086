//! Install mode on the RS-485 buses against independent peers on PTYs (LibOSDP PDs,
//! `tests/peers/osdp_pd.py`; pymodbus devices, `tests/peers/modbus_dev.py`): the scans find the
//! unconfigured reader (and one at another baud) and the unconfigured boards while the
//! configured keypad and relay board keep working; adoption pairs a reader (COMSET to a new
//! address, KEYSET through the install path) whose code then opens the gate, and moves a board
//! to a new unit id that is then polled; failures leave the running configuration as it was.
//! Driven through the `Scan`/`Provisioner` contract with a small test `Scan`. Buses with no
//! devices configured: `pairing_rs485/empty_bus.rs`.

#[path = "pairing_rs485/empty_bus.rs"]
mod empty_bus;
#[path = "support/peers.rs"]
mod peers;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatehouse::access::AccessEngine;
use gatehouse::pairing::{AdoptSpec, Candidate, Provisioner, Scan, ScanOptions};
use gatehouse::profiles::Profiles;
use gatehouse::rs485::Rs485;
use gatehouse::rs485::config::BusKind;
use gatehouse::rs485::provision::Rs485Provisioner;
use gatehouse::store::Store;
use peers::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
const SCAN_WAIT: Duration = Duration::from_secs(90);
const KEY_A: &str = "000102030405060708090a0b0c0d0e0f";
const KEY_B: &str = "f0e0d0c0b0a090807060504030201000";

/// Install mode as a test sets it: active with options or not; what was discovered.
#[derive(Default)]
struct TestScan {
    active: Mutex<Option<ScanOptions>>,
    found: Mutex<BTreeMap<String, Candidate>>,
    progress: Mutex<BTreeMap<String, (u32, u32)>>,
}

impl Scan for TestScan {
    fn active(&self) -> Option<ScanOptions> {
        self.active.lock().unwrap().clone()
    }
    fn discovered(&self, c: Candidate) {
        if self.active().is_some() {
            self.found.lock().unwrap().insert(c.id.clone(), c);
        }
    }
    fn progress(&self, source: &str, done: u32, total: u32) {
        self.progress
            .lock()
            .unwrap()
            .insert(source.to_string(), (done, total));
    }
}

impl TestScan {
    fn start(&self, all_bauds: bool, units: std::ops::RangeInclusive<u8>) {
        *self.active.lock().unwrap() = Some(ScanOptions {
            all_bauds,
            modbus_units: units,
        });
    }
    fn wait(&self, id: &str, timeout: Duration) -> Candidate {
        eventually(&format!("candidate `{id}`"), timeout, || {
            self.found.lock().unwrap().get(id).cloned()
        })
    }
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

    /// The configured keypad (address 0, its key known) and relay board (unit 1), with install
    /// mode wired to `scan`.
    /// The configuration's `[[bus]]` sections.
    fn body(&self) -> String {
        format!(
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

[[bus]]
id = "io"
port = "{}"
protocol = "modbus"
timeout_ms = 300
[[bus.device]]
id = "relay-board-1"
profile = "waveshare-relay-8ch"
address = 1
poll_interval_ms = 200
"#,
            self.link("osdp").display(),
            self.link("modbus").display()
        )
    }

    fn start(&self, scan: &Arc<TestScan>) -> Arc<Rs485> {
        self.store
            .set_reader_key("keypad-gate-1", &hex_key(KEY_A), true)
            .unwrap();
        let cfg = config(self.dir.path(), &self.body());
        let rs = Arc::new(
            Rs485::start(
                &cfg.buses,
                Arc::new(AccessEngine::new(self.store.clone(), None)),
            )
            .unwrap(),
        );
        rs.set_pairing(scan.clone(), Arc::new(Profiles::embedded()));
        wait_event(&self.store, 0, "device_online", WAIT, |p| {
            p["device"] == "keypad-gate-1"
        });
        wait_event(&self.store, 0, "device_online", WAIT, |p| {
            p["device"] == "relay-board-1"
        });
        rs
    }
}

fn hex_key(k: &str) -> [u8; 16] {
    hex::decode(k).unwrap().try_into().unwrap()
}

fn coil_on(addr: u64, ch: u64) -> impl Fn(&Value) -> bool {
    move |e: &Value| e["ev"] == "coil" && e["addr"] == addr && e["index"] == ch && e["on"] == true
}

/// Waits until `device` is online after its last `device_offline` since `after`.
fn online_again(s: &Site, device: &str, after: u64) {
    let last_off = logged(&s.store)
        .into_iter()
        .filter(|e| e.seq > after && e.kind == "device_offline" && e.payload["device"] == device)
        .map(|e| e.seq)
        .max()
        .unwrap_or(after);
    wait_event(&s.store, last_off, "device_online", WAIT, |p| {
        p["device"] == device
    });
}

fn readers_of(rs: &Rs485) -> Vec<(String, u8)> {
    match rs.running_config("readers").unwrap().kind {
        BusKind::Osdp(r) => r.into_iter().map(|r| (r.id, r.address)).collect(),
        _ => panic!("not osdp"),
    }
}

fn devices_of(rs: &Rs485) -> Vec<(String, u8)> {
    match rs.running_config("io").unwrap().kind {
        BusKind::Modbus { devices, .. } => devices.into_iter().map(|d| (d.id, d.address)).collect(),
        _ => panic!("not modbus"),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A code typed on the reader `pd` (peer id) opens the gate: granted for `device`, relay on.
fn code_opens_the_gate(s: &Site, pd: &mut Peer, pd_id: u64, board: &Peer, device: &str) {
    let seq = last_seq(&s.store);
    let b0 = board.len();
    pd.send(json!({"op": "keys", "pd": pd_id, "digits": "123456#"}));
    let g = wait_event(&s.store, seq, "access_granted", WAIT, |p| {
        p["device"] == device
    });
    assert_eq!(g.payload["entry"], "gate-1");
    eventually("the gate relay", WAIT, || {
        (board.count_since(b0, coil_on(1, 0)) > 0).then_some(())
    });
    // The pulse ends (so that the next grant is seen switching it on again).
    eventually("the gate relay off", WAIT, || {
        (board.count_since(b0, |e| {
            e["ev"] == "coil" && e["addr"] == 1 && e["index"] == 0 && e["on"] == false
        }) > 0)
            .then_some(())
    });
}

#[test]
fn a_scan_finds_unconfigured_devices_at_every_baud_while_configured_ones_keep_working() {
    let s = site();
    let mut pd = Peer::start(
        "osdp_pd.py",
        &s.link("osdp"),
        &[
            "--pd".into(),
            format!("0:{KEY_A}:enforce:baud=9600"),
            "--pd".into(),
            "5:install:baud=9600".into(),
            "--pd".into(),
            "9:install:baud=19200".into(),
        ],
    );
    let board = Peer::start(
        "modbus_dev.py",
        &s.link("modbus"),
        &[
            "--device".into(),
            "1:relay8".into(),
            "--device".into(),
            "7:xymd02".into(),
            "--device".into(),
            "12:relay8".into(),
        ],
    );
    let scan = Arc::new(TestScan::default());
    let rs = s.start(&scan);
    let seq0 = last_seq(&s.store);
    scan.start(true, 1..=20);

    // The configured keypad keeps deciding while the scans run.
    code_opens_the_gate(&s, &mut pd, 0, &board, "keypad-gate-1");

    let r5 = scan.wait("osdp:readers:5", SCAN_WAIT);
    assert_eq!(r5.baud, Some(9600));
    assert_eq!(r5.address, Some(5));
    assert_eq!(r5.identity["pdid"]["vendor_oui"], "0A1B2C");
    assert_eq!(r5.identity["pdid"]["serial"], "47480005");
    assert_eq!(r5.identity["pdid"]["firmware"], "1.2.3");
    assert!(
        r5.identity["pdcap"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    );
    let t = scan.wait("modbus:io:7", SCAN_WAIT);
    assert_eq!(t.identity["profiles"], json!(["xy-md02"]));
    let r = scan.wait("modbus:io:12", SCAN_WAIT);
    assert_eq!(r.identity["profiles"], json!(["waveshare-relay-8ch"]));
    assert_eq!(r.identity["registers"]["holding:0x4000"], 12);
    code_opens_the_gate(&s, &mut pd, 0, &board, "keypad-gate-1");
    let r9 = scan.wait("osdp:readers:9", SCAN_WAIT);
    assert_eq!(r9.baud, Some(19200));
    assert_eq!(r9.identity["pdid"]["serial"], "47480009");

    // Configured devices are never candidates, and nobody went offline.
    let found = scan.found.lock().unwrap().clone();
    assert!(!found.contains_key("osdp:readers:0"), "{found:?}");
    assert!(!found.contains_key("modbus:io:1"), "{found:?}");
    assert!(
        found.keys().all(|k| [
            "osdp:readers:5",
            "osdp:readers:9",
            "modbus:io:7",
            "modbus:io:12"
        ]
        .contains(&k.as_str())),
        "{found:?}"
    );
    let offline: Vec<_> = logged(&s.store)
        .into_iter()
        .filter(|e| e.seq > seq0 && e.kind == "device_offline")
        .map(|e| e.payload)
        .collect();
    assert!(offline.is_empty(), "{offline:?}");
    let progress = scan.progress.lock().unwrap().clone();
    assert_eq!(progress.get("osdp:readers@9600").map(|p| p.1), Some(126));
    assert_eq!(progress.get("modbus:io").map(|p| p.1), Some(19));

    // The reader found at another baud is moved to the bus's (COMSET) and paired.
    let prov = Rs485Provisioner::new(rs.clone(), Arc::new(Profiles::embedded()));
    let spec: AdoptSpec = serde_json::from_value(
        json!({"candidate": r9.id, "device": "keypad-9", "entry": "gate-1"}),
    )
    .unwrap();
    let reg = rt().block_on(prov.adopt(&r9, &spec)).unwrap();
    assert_eq!(reg.settings["address"], 9);
    pd.wait_for("COMSET to 9600", WAIT, |e| {
        e["ev"] == "comset_done" && e["pd"] == 9 && e["baud_rate"] == 9600
    });
    pd.wait_for("KEYSET", WAIT, |e| e["ev"] == "keyset" && e["pd"] == 9);
    code_opens_the_gate(&s, &mut pd, 9, &board, "keypad-9");

    // Install mode over: no more candidates, and the peers hear no more probes.
    *scan.active.lock().unwrap() = None;
    scan.found.lock().unwrap().clear();
    std::thread::sleep(Duration::from_millis(500));
    online_again(&s, "keypad-gate-1", seq0);
    code_opens_the_gate(&s, &mut pd, 0, &board, "keypad-gate-1");
    assert!(scan.found.lock().unwrap().is_empty());
    rs.stop(Duration::from_secs(5));
}

#[test]
fn an_adopted_reader_is_moved_paired_and_its_code_opens_the_gate() {
    let s = site();
    let mut pd = Peer::start(
        "osdp_pd.py",
        &s.link("osdp"),
        &[
            "--pd".into(),
            format!("0:{KEY_A}:enforce"),
            "--pd".into(),
            "5:install".into(),
        ],
    );
    let board = Peer::start(
        "modbus_dev.py",
        &s.link("modbus"),
        &["--device".into(), "1:relay8".into()],
    );
    let scan = Arc::new(TestScan::default());
    let rs = s.start(&scan);
    scan.start(false, 1..=3);
    let c = scan.wait("osdp:readers:5", SCAN_WAIT);
    let prov = Rs485Provisioner::new(rs.clone(), Arc::new(Profiles::embedded()));
    let rt = rt();

    // Bad requests are refused before anything is sent.
    let bad = |spec: Value| {
        let spec: AdoptSpec = serde_json::from_value(spec).unwrap();
        rt.block_on(prov.adopt(&c, &spec)).unwrap_err()
    };
    let e = bad(json!({"candidate": c.id, "entry": "no-such-gate"}));
    assert!(e.contains("no entry `no-such-gate`"), "{e}");
    let e = bad(json!({"candidate": c.id, "entry": "gate-1", "address": 0}));
    assert!(e.contains("used by reader `keypad-gate-1`"), "{e}");
    let e = bad(json!({"candidate": c.id, "entry": "gate-1", "device": "keypad-gate-1"}));
    assert!(e.contains("already used"), "{e}");
    let e = bad(json!({"candidate": c.id}));
    assert!(e.contains("needs an `entry`"), "{e}");
    // A candidate naming a configured reader's address is refused (no COMSET to it).
    let mut forged = c.clone();
    forged.address = Some(0);
    let spec: AdoptSpec =
        serde_json::from_value(json!({"candidate": c.id, "entry": "gate-1", "address": 7}))
            .unwrap();
    let e = rt.block_on(prov.adopt(&forged, &spec)).unwrap_err();
    assert!(
        e.contains("is reader `keypad-gate-1`: not a candidate"),
        "{e}"
    );
    assert_eq!(readers_of(&rs), vec![("keypad-gate-1".to_string(), 0)]);
    assert_eq!(pd.count_since(0, |e| e["ev"] == "comset"), 0);

    let spec: AdoptSpec = serde_json::from_value(json!({
        "candidate": c.id, "device": "keypad-new", "entry": "gate-1", "address": 6
    }))
    .unwrap();
    let reg = rt.block_on(prov.adopt(&c, &spec)).unwrap();
    assert_eq!(reg.id, "keypad-new");
    assert_eq!(reg.bus.as_deref(), Some("readers"));
    assert_eq!(reg.settings["address"], 6);
    assert_eq!(reg.settings["entry"], "gate-1");
    pd.wait_for("COMSET to 6", WAIT, |e| {
        e["ev"] == "comset_done" && e["pd"] == 5 && e["address"] == 6
    });
    pd.wait_for("KEYSET", WAIT, |e| e["ev"] == "keyset" && e["pd"] == 5);
    let (key, confirmed) = s.store.reader_key("keypad-new").unwrap().unwrap();
    assert!(confirmed);
    pd.send(json!({"op": "state"}));
    let state = pd.wait_for("state", WAIT, |e| e["ev"] == "state");
    let p5 = state["pds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pd"] == 5)
        .unwrap()
        .clone();
    assert_eq!(p5["key"], hex::encode(key));
    assert_eq!(p5["address"], 6);

    // Run from the registry (what paircore does after storing it): nothing changes, and the
    // new reader's code opens the gate; the old one still works.
    prov.run(std::slice::from_ref(&reg)).unwrap();
    assert_eq!(
        readers_of(&rs),
        vec![
            ("keypad-gate-1".to_string(), 0),
            ("keypad-new".to_string(), 6)
        ]
    );
    code_opens_the_gate(&s, &mut pd, 5, &board, "keypad-new");
    online_again(&s, "keypad-gate-1", 0);
    code_opens_the_gate(&s, &mut pd, 0, &board, "keypad-gate-1");
    // Install mode no longer finds it (its address is configured now).
    scan.found.lock().unwrap().clear();
    // Removal: run without it.
    prov.run(&[]).unwrap();
    assert_eq!(readers_of(&rs), vec![("keypad-gate-1".to_string(), 0)]);
    rs.stop(Duration::from_secs(5));
}

#[test]
fn an_adopted_board_is_moved_to_a_new_unit_id_and_polled() {
    let s = site();
    let _pd = Peer::start(
        "osdp_pd.py",
        &s.link("osdp"),
        &["--pd".into(), format!("0:{KEY_A}:enforce")],
    );
    let board = Peer::start(
        "modbus_dev.py",
        &s.link("modbus"),
        &[
            "--device".into(),
            "1:relay8".into(),
            "--device".into(),
            "12:relay8d".into(),
        ],
    );
    let scan = Arc::new(TestScan::default());
    let rs = s.start(&scan);
    scan.start(false, 10..=14);
    let c = scan.wait("modbus:io:12", SCAN_WAIT);
    let profiles = c.identity["profiles"].as_array().unwrap().clone();
    assert!(
        profiles.contains(&json!("waveshare-relay-8ch-d")),
        "{profiles:?}"
    );
    let prov = Rs485Provisioner::new(rs.clone(), Arc::new(Profiles::embedded()));
    let rt = rt();
    let bad = |spec: Value| {
        let spec: AdoptSpec = serde_json::from_value(spec).unwrap();
        rt.block_on(prov.adopt(&c, &spec)).unwrap_err()
    };
    let e = bad(json!({"candidate": c.id, "address": 1}));
    assert!(e.contains("used by device `relay-board-1`"), "{e}");
    let e = bad(json!({"candidate": c.id, "profile": "no-such"}));
    assert!(e.contains("no Modbus profile `no-such`"), "{e}");
    let e = bad(
        json!({"candidate": c.id, "profile": "waveshare-relay-8ch-d",
                       "inputs": [{"channel": 9, "role": "motion"}]}),
    );
    assert!(e.contains("channel 9 does not exist"), "{e}");
    assert_eq!(board.count_since(0, |e| e["ev"] == "write"), 0);

    let spec: AdoptSpec = serde_json::from_value(json!({
        "candidate": c.id, "device": "board-2", "profile": "waveshare-relay-8ch-d",
        "address": 20, "inputs": [{"channel": 3, "role": "motion"}]
    }))
    .unwrap();
    let reg = rt.block_on(prov.adopt(&c, &spec)).unwrap();
    assert_eq!(reg.settings["address"], 20);
    assert_eq!(reg.settings["profile"], "waveshare-relay-8ch-d");
    board.wait_for("moved", WAIT, |e| {
        e["ev"] == "address" && e["addr"] == 12 && e["to"] == 20
    });
    // Not run until asked.
    assert_eq!(devices_of(&rs), vec![("relay-board-1".to_string(), 1)]);
    let seq = last_seq(&s.store);
    prov.run(std::slice::from_ref(&reg)).unwrap();
    assert_eq!(
        devices_of(&rs),
        vec![
            ("relay-board-1".to_string(), 1),
            ("board-2".to_string(), 20)
        ]
    );
    wait_event(&s.store, seq, "device_online", WAIT, |p| {
        p["device"] == "board-2"
    });
    // Polled: its motion input reaches the log.
    let mut board = board;
    board.send(json!({"op": "input", "addr": 12, "index": 3, "on": true}));
    wait_event(&s.store, seq, "motion", WAIT, |p| p["device"] == "board-2");
    rs.stop(Duration::from_secs(5));
}

#[test]
fn devices_gone_or_refusing_the_key_leave_the_configuration_unchanged() {
    let s = site();
    let mut pd = Peer::start(
        "osdp_pd.py",
        &s.link("osdp"),
        &[
            "--pd".into(),
            format!("0:{KEY_A}:enforce"),
            "--pd".into(),
            "5:install".into(),
            // Has a key of its own already: refuses the install-mode key, so no KEYSET.
            "--pd".into(),
            format!("8:{KEY_B}:enforce"),
        ],
    );
    let mut board = Peer::start(
        "modbus_dev.py",
        &s.link("modbus"),
        &[
            "--device".into(),
            "1:relay8".into(),
            "--device".into(),
            "12:relay8".into(),
        ],
    );
    let scan = Arc::new(TestScan::default());
    let rs = s.start(&scan);
    scan.start(false, 10..=14);
    let r5 = scan.wait("osdp:readers:5", SCAN_WAIT);
    let r8 = scan.wait("osdp:readers:8", SCAN_WAIT);
    let m12 = scan.wait("modbus:io:12", SCAN_WAIT);
    *scan.active.lock().unwrap() = None;
    let prov = Rs485Provisioner::new(rs.clone(), Arc::new(Profiles::embedded()))
        .with_pair_timeout(Duration::from_secs(6));
    let rt = rt();
    let before = (readers_of(&rs), devices_of(&rs));

    // Gone before provisioning.
    pd.send(json!({"op": "silent", "pd": 5, "on": true}));
    pd.wait_for("silent", WAIT, |e| e["ev"] == "ack" && e["op"] == "silent");
    let spec: AdoptSpec =
        serde_json::from_value(json!({"candidate": r5.id, "entry": "gate-1", "address": 6}))
            .unwrap();
    let e = rt.block_on(prov.adopt(&r5, &spec)).unwrap_err();
    assert!(e.contains("no longer answers"), "{e}");
    board.send(json!({"op": "silent", "addr": 12, "on": true}));
    board.wait_for("silent", WAIT, |e| e["ev"] == "ack" && e["op"] == "silent");
    let spec: AdoptSpec =
        serde_json::from_value(json!({"candidate": m12.id, "address": 20})).unwrap();
    let e = rt.block_on(prov.adopt(&m12, &spec)).unwrap_err();
    assert!(e.contains("no longer answers"), "{e}");
    assert_eq!((readers_of(&rs), devices_of(&rs)), before);

    // KEYSET never acknowledged: the reader is taken off the bus again, its key forgotten.
    let seq = last_seq(&s.store);
    let spec: AdoptSpec = serde_json::from_value(
        json!({"candidate": r8.id, "device": "keypad-keyed", "entry": "gate-1"}),
    )
    .unwrap();
    let e = rt.block_on(prov.adopt(&r8, &spec)).unwrap_err();
    assert!(e.contains("did not take its new key"), "{e}");
    assert_eq!((readers_of(&rs), devices_of(&rs)), before);
    assert!(s.store.reader_key("keypad-keyed").unwrap().is_none());
    assert_eq!(pd.count_since(0, |e| e["ev"] == "keyset"), 0);
    // The configured keypad still works after the bus restarts.
    online_again(&s, "keypad-gate-1", seq);
    code_opens_the_gate(&s, &mut pd, 0, &board, "keypad-gate-1");
    rs.stop(Duration::from_secs(5));
}
