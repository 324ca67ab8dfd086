//! Install mode on the RS-485 buses against independent peers on PTYs (LibOSDP PDs,
//! `tests/peers/osdp_pd.py`; pymodbus devices, `tests/peers/modbus_dev.py`): the scans find the
//! unconfigured reader (and one at another baud) and the unconfigured boards while the
//! configured keypad and relay board keep working; adoption pairs a reader (COMSET to a new
//! address, KEYSET through the install path) whose code then opens the gate, and moves a board
//! to a new unit id that is then polled; failures leave the running configuration as it was.
//! Driven through the `Scan`/`Provisioner` contract with a small test `Scan`; and through the
//! daemon's own wiring of the registry (`Pairing` on the store, the buses started with the
//! adopted devices merged, the provisioner registered) across an in-process restart: the
//! configured devices do not blink when the adopted ones are added, and a configured reader
//! replaced by an adopted one is no longer polled. Buses with no
//! devices configured: `pairing_rs485/empty_bus.rs`.

#[path = "pairing_rs485/empty_bus.rs"]
mod empty_bus;
#[path = "pairing_rs485/give_way.rs"]
mod give_way;
#[path = "support/peers.rs"]
mod peers;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatehouse::access::AccessEngine;
use gatehouse::pairing::{AdoptSpec, Candidate, Pairing, Provisioner, Scan, ScanOptions};
use gatehouse::profiles::Profiles;
use gatehouse::rs485::Rs485;
use gatehouse::rs485::config::BusKind;
use gatehouse::rs485::provision::{self, Rs485Provisioner};
use gatehouse::store::Store;
use peers::*;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

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

/// The daemon's wiring of the registry and the buses (`daemon::run`), in process: the registry
/// opened against the config, the buses started with its adopted devices merged, install mode's
/// timer and recorder, and the RS-485 provisioner registered.
struct Wired {
    pairing: Arc<Pairing>,
    rs: Arc<Rs485>,
    stop: CancellationToken,
    rt: tokio::runtime::Runtime,
}

impl Site {
    /// Starts the wiring; `before_register` runs once the buses run and before the provisioner
    /// registers (a daemon's start does other work there: the BLE manager, the cloud link).
    fn wire(&self, before_register: impl FnOnce(&Arc<Rs485>)) -> Wired {
        // The configured keypad's key, the first time (a reader replacing it under its id has
        // its own key afterwards).
        if self.store.reader_key("keypad-gate-1").unwrap().is_none() {
            self.store
                .set_reader_key("keypad-gate-1", &hex_key(KEY_A), true)
                .unwrap();
        }
        let cfg = config(self.dir.path(), &self.body());
        let rt = rt();
        let pairing = {
            let _in = rt.enter();
            Pairing::open(
                self.store.clone(),
                gatehouse::pairing::registry::configured(&cfg),
                Vec::new(),
            )
            .unwrap()
        };
        let engine = Arc::new(AccessEngine::new(self.store.clone(), None));
        let rs = Arc::new(
            provision::start(&cfg.buses, &pairing.registered(), &cfg.profiles, engine).unwrap(),
        );
        rs.set_pairing(pairing.clone(), cfg.profiles.clone());
        let stop = CancellationToken::new();
        rt.spawn(pairing.clone().run(stop.clone()));
        before_register(&rs);
        let prov = Rs485Provisioner::new(rs.clone(), cfg.profiles.clone());
        pairing.register(Arc::new(prov)).unwrap();
        Wired {
            pairing,
            rs,
            stop,
            rt,
        }
    }
}

impl Wired {
    /// Install mode on, until `candidate` is recorded (adoptable).
    fn discover(&self, candidate: &str) {
        self.pairing
            .start_for(
                Duration::from_secs(600),
                "local:test",
                ScanOptions {
                    all_bauds: false,
                    modbus_units: 1..=3,
                },
            )
            .unwrap();
        eventually(&format!("candidate `{candidate}`"), SCAN_WAIT, || {
            self.pairing
                .candidates()
                .iter()
                .any(|c| c.id == candidate)
                .then_some(())
        });
    }

    /// What a daemon's stop does to these parts.
    fn stop(self) {
        self.stop.cancel();
        self.rs.stop(Duration::from_secs(5));
        self.rt.shutdown_timeout(Duration::from_secs(5));
    }
}

/// The events of `kind` about `device` after `after`.
fn events_about(s: &Site, after: u64, kind: &str, device: &str) -> Vec<Value> {
    logged(&s.store)
        .into_iter()
        .filter(|e| e.seq > after && e.kind == kind && e.payload["device"] == device)
        .map(|e| e.payload)
        .collect()
}

/// The PD's own view of whether it is polled (LibOSDP: a frame addressed to it within 8 s),
/// from its last `online` event.
fn pd_polled(pd: &Peer, address: u64) -> Option<bool> {
    pd.events()
        .iter()
        .rev()
        .find(|e| e["ev"] == "online" && e["pd"] == address)
        .and_then(|e| e["online"].as_bool())
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

#[test]
fn after_a_restart_the_adopted_reader_runs_and_the_configured_devices_never_blink() {
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
    // First run: the reader at 5 is adopted next to the configured keypad.
    let w = s.wire(|_| {});
    w.discover("osdp:readers:5");
    let spec = AdoptSpec {
        candidate: "osdp:readers:5".into(),
        device: Some("keypad-new".into()),
        entry: Some("gate-1".into()),
        ..Default::default()
    };
    let reg = w.pairing.adopt(&spec, "local:test").unwrap();
    assert_eq!(reg.replaces, None);
    code_opens_the_gate(&s, &mut pd, 5, &board, "keypad-new");
    w.stop();

    // Restart. The buses run the adopted reader from the start; the configured devices are
    // online before the provisioner registers (as in a daemon, whose start goes on meanwhile),
    // and registering it restarts nothing.
    let seq = last_seq(&s.store);
    let w = s.wire(|rs| {
        assert_eq!(
            readers_of(rs),
            vec![
                ("keypad-gate-1".to_string(), 0),
                ("keypad-new".to_string(), 5)
            ]
        );
        for d in ["keypad-gate-1", "relay-board-1", "keypad-new"] {
            wait_event(&s.store, seq, "device_online", WAIT, |p| p["device"] == d);
        }
    });
    assert_eq!(
        readers_of(&w.rs),
        vec![
            ("keypad-gate-1".to_string(), 0),
            ("keypad-new".to_string(), 5)
        ]
    );
    assert_eq!(w.pairing.registered().len(), 1);
    code_opens_the_gate(&s, &mut pd, 5, &board, "keypad-new");
    code_opens_the_gate(&s, &mut pd, 0, &board, "keypad-gate-1");
    for d in ["keypad-gate-1", "relay-board-1", "keypad-new"] {
        assert_eq!(
            events_about(&s, seq, "device_offline", d),
            Vec::<Value>::new(),
            "`{d}` went offline after the restart"
        );
        assert_eq!(
            events_about(&s, seq, "device_online", d).len(),
            1,
            "`{d}` came online more than once after the restart"
        );
    }
    w.stop();
}

#[test]
fn a_configured_reader_replaced_by_an_adopted_one_is_no_longer_polled_across_a_restart() {
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
    let w = s.wire(|_| {});
    wait_event(&s.store, 0, "device_online", WAIT, |p| {
        p["device"] == "keypad-gate-1"
    });
    code_opens_the_gate(&s, &mut pd, 0, &board, "keypad-gate-1");
    w.discover("osdp:readers:5");
    // Another family cannot replace it; `remove` of a configured device stays refused.
    let e = w.pairing.remove("keypad-gate-1", "local:test").unwrap_err();
    assert_eq!(e.reason.as_str(), "configured", "{e}");
    let e = w
        .pairing
        .adopt(
            &AdoptSpec {
                candidate: "osdp:readers:5".into(),
                entry: Some("gate-1".into()),
                replaces: Some("relay-board-1".into()),
                ..Default::default()
            },
            "local:test",
        )
        .unwrap_err();
    assert_eq!(e.reason.as_str(), "bad_spec", "{e}");

    // The new reader takes over the configured keypad's id (the default), keyed afresh.
    let seq = last_seq(&s.store);
    let reg = w
        .pairing
        .adopt(
            &AdoptSpec {
                candidate: "osdp:readers:5".into(),
                entry: Some("gate-1".into()),
                replaces: Some("keypad-gate-1".into()),
                ..Default::default()
            },
            "local:test",
        )
        .unwrap();
    assert_eq!(reg.id, "keypad-gate-1");
    assert_eq!(reg.replaces.as_deref(), Some("keypad-gate-1"));
    let stored = s.store.registry_list().unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].replaces.as_deref(), Some("keypad-gate-1"));
    pd.wait_for("KEYSET", WAIT, |e| e["ev"] == "keyset" && e["pd"] == 5);
    let adopted = wait_event(&s.store, seq, "device_adopted", WAIT, |_| true);
    assert_eq!(adopted.payload["replaces"], "keypad-gate-1");
    let removed = wait_event(&s.store, seq, "device_removed", WAIT, |_| true);
    assert_eq!(removed.payload["device"], "keypad-gate-1");
    assert_eq!(removed.payload["replaced_by"], "keypad-gate-1");
    assert_eq!(readers_of(&w.rs), vec![("keypad-gate-1".to_string(), 5)]);
    code_opens_the_gate(&s, &mut pd, 5, &board, "keypad-gate-1");
    // Install mode off (its scan would probe the free address 0): the old reader hears nothing.
    w.pairing.stop("local:test");
    eventually("the old reader no longer polled", WAIT, || {
        (pd_polled(&pd, 0) == Some(false)).then_some(())
    });
    w.stop();

    // Restart with the TOML unchanged: the old reader stays out, the new one runs.
    let seq = last_seq(&s.store);
    let from = pd.len();
    let w = s.wire(|_| {});
    assert_eq!(readers_of(&w.rs), vec![("keypad-gate-1".to_string(), 5)]);
    wait_event(&s.store, seq, "device_online", WAIT, |p| {
        p["device"] == "keypad-gate-1"
    });
    code_opens_the_gate(&s, &mut pd, 5, &board, "keypad-gate-1");
    // Codes typed on the old reader open nothing (it is not polled, its keys never read).
    pd.send(json!({"op": "keys", "pd": 0, "digits": "123456#"}));
    code_opens_the_gate(&s, &mut pd, 5, &board, "keypad-gate-1");
    assert_eq!(pd_polled(&pd, 0), Some(false));
    assert_eq!(
        pd.count_since(from, |e| e["ev"] == "online" && e["pd"] == 0),
        0,
        "the old reader was polled after the restart"
    );
    assert_eq!(
        pd.count_since(from, |e| e["ev"] == "delivered" && e["pd"] == 0),
        0,
        "the old reader's keys were read"
    );
    w.stop();
}
