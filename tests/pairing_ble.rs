//! Install mode on BLE, through bluer and the mock BlueZ (`tests/peers/bluez_mock.py`) on a
//! private D-Bus: unknown padlocks, BTHome sensors (plain and encrypted) and fobs become
//! candidates only while a [`Scan`] says install mode is active; known devices never do;
//! adoption through the manager's `Provisioner` (a sensor with its bind key checked and stored,
//! a padlock only to the unit whose site-database lock has its MAC, with an offline test
//! unlock); adopted devices run, and run again after a restart from the registered set.
//!
//! bluer finds the system bus through `DBUS_SYSTEM_BUS_ADDRESS`, read from the environment of
//! the process. A test must not change its own environment while threads run, so each test
//! runs its body in a child process of this test binary started with the variable set to the
//! socket the mock will listen on (`--bus-dir`): `tests/support/bluez.rs`, `in_child`.

#[path = "support/bluez.rs"]
mod bluez;
#[path = "support/peers.rs"]
mod peers;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use bluez::{discovering, in_child, mock};
use gatehouse::access::AccessEngine;
use gatehouse::ble::bluez::Bluez;
use gatehouse::ble::config::BleConfig;
use gatehouse::ble::rpc::CloudRpc;
use gatehouse::ble::{Ble, Manager};
use gatehouse::devstate::DeviceStates;
use gatehouse::pairing::{AdoptSpec, Candidate, Family, Provisioner, Scan, ScanOptions};
use gatehouse::store::Store;
use peers::wait_event;

const WAIT: Duration = Duration::from_secs(30);

// Known to the demo site database.
const LOCK_A101: &str = "D0:1F:A6:44:B3:01";
const SENSOR_HALL: &str = "3C:2E:F5:00:00:A1";
// Unknown.
const NEW_LOCK: &str = "D0:1F:A6:44:B3:21";
const NEW_LOCK_KEY: &str = "A0A1A2A3A4A5A6A7A8A9AAABACADAEAF";
const NEW_PLAIN: &str = "3C:2E:F5:00:00:C1";
const NEW_ENC: &str = "3C:2E:F5:00:00:C2";
const BIND_KEY: &str = "00112233445566778899AABBCCDDEEFF";
const NEW_FOB: &str = "C0:FF:EE:00:00:F1";

/// Install mode as the pairing module would say it: on or off, and what was reported.
#[derive(Default)]
struct TestScan {
    active: AtomicBool,
    found: Mutex<Vec<Candidate>>,
}

impl Scan for TestScan {
    fn active(&self) -> Option<ScanOptions> {
        self.active
            .load(Ordering::SeqCst)
            .then(ScanOptions::default)
    }
    fn discovered(&self, candidate: Candidate) {
        self.found.lock().unwrap().push(candidate);
    }
    fn progress(&self, _source: &str, _done: u32, _total: u32) {}
}

impl TestScan {
    fn found(&self) -> Vec<Candidate> {
        self.found.lock().unwrap().clone()
    }
    fn candidate(&self, mac: &str) -> Candidate {
        let id = Candidate::ble_id(mac);
        peers::eventually(&format!("candidate {id}"), WAIT, || {
            self.found().into_iter().rev().find(|c| c.id == id)
        })
    }
}

/// The BLE manager over bluer on the mock's bus, on the demo site's store.
struct Gateway {
    rt: tokio::runtime::Runtime,
    store: Arc<Store>,
    manager: Arc<Manager<Bluez>>,
    stop: tokio_util::sync::CancellationToken,
    ble: Option<Ble<Bluez>>,
}

impl Gateway {
    fn start(store: Arc<Store>, scan: Arc<TestScan>) -> Gateway {
        Gateway::start_with(store, scan, BleConfig::default())
    }

    fn start_with(store: Arc<Store>, scan: Arc<TestScan>, cfg: BleConfig) -> Gateway {
        let engine = Arc::new(AccessEngine::new(store.clone(), None));
        Gateway::start_engine(store, scan, cfg, engine)
    }

    /// With this access engine (its fact sink: what the drivers hand automation).
    fn start_engine(
        store: Arc<Store>,
        scan: Arc<TestScan>,
        cfg: BleConfig,
        engine: Arc<AccessEngine>,
    ) -> Gateway {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let (manager, ble) = rt.block_on(async {
            let radio = Bluez::open(Some("hci0")).await.expect("the mock's adapter");
            let m = Manager::new(
                radio,
                cfg,
                engine,
                Arc::new(DeviceStates::new()),
                Arc::new(CloudRpc::new()),
            );
            m.set_scan(scan);
            let ble = Ble::start(m.clone(), stop.clone());
            (m, ble)
        });
        Gateway {
            rt,
            store,
            manager,
            stop,
            ble: Some(ble),
        }
    }

    fn adopt(&self, c: &Candidate, spec: Value) -> Result<gatehouse::pairing::Registered, String> {
        let spec: AdoptSpec = serde_json::from_value(spec).unwrap();
        self.rt.block_on(self.manager.adopt(c, &spec))
    }

    /// Stops scanning and the advert thread; gives the store back.
    fn stop(mut self) -> Arc<Store> {
        self.stop.cancel();
        if let Some(b) = self.ble.take() {
            b.join();
        }
        let store = self.store.clone();
        drop(self.manager);
        self.rt.shutdown_timeout(Duration::from_secs(5));
        store
    }
}

#[test]
fn unknown_ble_devices_are_candidates_in_install_mode_and_an_adopted_sensor_reports() {
    let Some(bus) = in_child(
        "unknown_ble_devices_are_candidates_in_install_mode_and_an_adopted_sensor_reports",
    ) else {
        return;
    };
    let mut bluez = mock(
        &bus,
        &[
            format!("--padlock={LOCK_A101}::000102030405060708090A0B0C0D0E0F"),
            format!("--sensor={SENSOR_HALL}"),
        ],
    );
    let data = tempfile::tempdir().unwrap();
    let store = peers::demo_store(data.path());
    let scan = Arc::new(TestScan::default());
    let gw = Gateway::start(store.clone(), scan.clone());
    discovering(&bluez, 1);
    wait_event(&store, 0, "device_online", WAIT, |p| {
        p["device"] == "sensor-hall-a"
    });

    // Install mode off: unknown devices are only counted.
    let unknown_before = gw.manager.counters().unknown;
    bluez.send(json!({"op": "add", "kind": "padlock",
        "spec": format!("{NEW_LOCK}::{NEW_LOCK_KEY}")}));
    bluez.send(json!({"op": "add", "kind": "sensor", "spec": NEW_PLAIN}));
    bluez.send(json!({"op": "add", "kind": "sensor",
        "spec": format!("{NEW_ENC}:bindkey={BIND_KEY}")}));
    bluez.send(json!({"op": "add", "kind": "fob", "spec": NEW_FOB}));
    peers::eventually("unknown adverts handled", WAIT, || {
        (gw.manager.counters().unknown >= unknown_before + 3).then_some(())
    });
    assert!(
        scan.found().is_empty(),
        "reported outside install mode: {:?}",
        scan.found()
    );

    // Install mode on: each unknown device of a known family is a candidate.
    scan.active.store(true, Ordering::SeqCst);
    for mac in [NEW_LOCK, NEW_FOB, LOCK_A101] {
        bluez.send(json!({"op": "advert", "mac": mac, "force": true}));
    }
    // Packet 2: 23.00 °C.
    bluez.send(json!({"op": "sensor", "mac": NEW_PLAIN, "hex": "400002016402FC08"}));
    bluez.send(json!({"op": "sensor", "mac": SENSOR_HALL, "hex": "400002016402FC08"}));
    bluez.send(json!({"op": "sensor", "mac": NEW_ENC, "objects": "0164026608"}));
    let lock = scan.candidate(NEW_LOCK);
    assert_eq!(lock.family, Family::BleLock);
    assert_eq!(lock.mac.as_deref(), Some(NEW_LOCK));
    assert!(lock.rssi.is_some(), "{lock:?}");
    assert_eq!(lock.identity["hardware"], "3P", "{lock:?}");
    let plain = scan.candidate(NEW_PLAIN);
    assert_eq!(plain.family, Family::BleSensor);
    assert_eq!(plain.identity["service"], "bthome");
    assert_eq!(plain.identity["encrypted"], false);
    let enc = scan.candidate(NEW_ENC);
    assert_eq!(enc.family, Family::BleSensor);
    assert_eq!(enc.identity["encrypted"], true, "{enc:?}");
    let fob = scan.candidate(NEW_FOB);
    assert_eq!(fob.family, Family::BleFob);
    // Known devices are untouched: never candidates, and the site's sensor still reports.
    wait_event(&store, 0, "sensor_reading", WAIT, |p| {
        p["device"] == "sensor-hall-a" && p["value"] == 23.0
    });
    let known = [Candidate::ble_id(LOCK_A101), Candidate::ble_id(SENSOR_HALL)];
    assert!(
        scan.found().iter().all(|c| !known.contains(&c.id)),
        "{:?}",
        scan.found()
    );

    // Bad adoptions fail with a reason and change nothing.
    let enc_id = "sensor-3c2ef50000c2";
    let wrong = "FFEEDDCCBBAA99887766554433221100";
    let e = gw
        .adopt(
            &enc,
            json!({"candidate": enc.id, "unit": "A-103", "bind_key": wrong}),
        )
        .unwrap_err();
    assert!(e.contains("does not decrypt"), "{e}");
    assert!(!e.to_uppercase().contains(wrong), "the key echoed: {e}");
    let e = gw
        .adopt(&enc, json!({"candidate": enc.id, "unit": "A-103"}))
        .unwrap_err();
    assert!(e.contains("bind_key"), "{e}");
    let e = gw
        .adopt(
            &enc,
            json!({"candidate": enc.id, "unit": "Z-999", "bind_key": BIND_KEY}),
        )
        .unwrap_err();
    assert!(e.contains("`Z-999` is not in the site database"), "{e}");
    let e = gw
        .adopt(
            &plain,
            json!({"candidate": plain.id, "zone": "zone-a", "bind_key": BIND_KEY}),
        )
        .unwrap_err();
    assert!(e.contains("plain data"), "{e}");
    let e = gw.adopt(&fob, json!({"candidate": fob.id})).unwrap_err();
    assert!(e.contains("fob credential"), "{e}");
    let e = gw
        .adopt(
            &enc,
            json!({"candidate": enc.id, "unit": "A-103", "entry": "gate-1",
            "bind_key": BIND_KEY}),
        )
        .unwrap_err();
    assert!(e.contains("`entry` does not apply"), "{e}");
    assert_eq!(store.ble_key(enc_id).unwrap(), None);

    // The right key: checked against the advert, stored in the store, not in the settings.
    let reg = gw
        .adopt(
            &enc,
            json!({"candidate": enc.id, "unit": "A-103", "bind_key": BIND_KEY}),
        )
        .unwrap();
    assert_eq!(reg.id, enc_id);
    assert_eq!(reg.family, Family::BleSensor);
    assert_eq!(reg.candidate, enc.id);
    let settings = reg.settings.to_string();
    assert!(
        !settings.to_uppercase().contains(BIND_KEY),
        "the key is in the settings: {settings}"
    );
    assert_eq!(reg.settings["unit"], "A-103");
    assert_eq!(reg.settings["encrypted"], true);
    assert_eq!(
        store.ble_key(enc_id).unwrap().map(hex::encode_upper),
        Some(BIND_KEY.to_string())
    );
    let reg_plain = gw
        .adopt(
            &plain,
            json!({"candidate": plain.id, "zone": "zone-a", "device": "hall-2"}),
        )
        .unwrap();
    assert_eq!(reg_plain.settings["zone"], "zone-a");
    gw.manager.run(&[reg.clone(), reg_plain.clone()]).unwrap();

    // Run: its encrypted readings become events, with where it is. 25.20 °C.
    let from = peers::last_seq(&store);
    bluez.send(json!({"op": "sensor", "mac": NEW_ENC, "objects": "02D809"}));
    let r = wait_event(&store, from, "sensor_reading", WAIT, |p| {
        p["device"] == enc_id
    });
    assert_eq!(r.payload["value"], 25.2);
    assert_eq!(r.payload["unit"], "celsius");
    assert_eq!(r.payload["unit_id"], "A-103");
    bluez.send(json!({"op": "sensor", "mac": NEW_PLAIN, "hex": "400003016402D809"}));
    let r = wait_event(&store, from, "sensor_reading", WAIT, |p| {
        p["device"] == "hall-2"
    });
    assert_eq!(r.payload["zone"], "zone-a");

    // A restart: the store reopened, a new manager given the registered set.
    drop(store);
    drop(gw.stop());
    let store = peers::eventually("the store reopens", WAIT, || {
        Store::open(&data.path().join("data"), 100_000).ok()
    });
    let store = Arc::new(store);
    let scan = Arc::new(TestScan::default());
    scan.active.store(true, Ordering::SeqCst);
    let gw = Gateway::start(store.clone(), scan.clone());
    gw.manager.run(&[reg.clone(), reg_plain]).unwrap();
    let from = peers::last_seq(&store);
    // 19.00 °C (0x076C), decrypted with the key the store kept. The new manager's discovery
    // may start after the first advert: advertised until it is heard.
    let r = peers::eventually(
        "the adopted sensor's reading after the restart",
        WAIT,
        || {
            bluez.send(json!({"op": "sensor", "mac": NEW_ENC, "objects": "026C07"}));
            let found = peers::logged(&store).into_iter().find(|e| {
                e.seq > from
                    && e.kind == "sensor_reading"
                    && e.payload["device"] == enc_id
                    && e.payload["value"] == 19.0
            });
            if found.is_none() {
                std::thread::sleep(Duration::from_millis(200));
            }
            found
        },
    );
    assert_eq!(r.payload["unit_id"], "A-103");
    // Adopted devices are known: not candidates again.
    assert!(
        scan.found()
            .iter()
            .all(|c| c.id != enc.id && c.id != plain.id),
        "{:?}",
        scan.found()
    );
    // Removed (the set without it): its key is forgotten, it is unknown again.
    gw.manager.run(&[]).unwrap();
    assert_eq!(store.ble_key(enc_id).unwrap(), None);
    bluez.send(json!({"op": "sensor", "mac": NEW_ENC, "objects": "0164"}));
    scan.candidate(NEW_ENC);
    gw.stop();
    bluez.send(json!({"op": "quit"}));
}

#[test]
fn a_padlock_is_adopted_only_to_the_unit_whose_lock_has_its_mac_with_a_test_unlock() {
    let Some(bus) =
        in_child("a_padlock_is_adopted_only_to_the_unit_whose_lock_has_its_mac_with_a_test_unlock")
    else {
        return;
    };
    let mut bluez = mock(
        &bus,
        &[format!(
            "--padlock={LOCK_A101}::000102030405060708090A0B0C0D0E0F"
        )],
    );
    let data = tempfile::tempdir().unwrap();
    let store = peers::demo_store(data.path());
    let scan = Arc::new(TestScan::default());
    scan.active.store(true, Ordering::SeqCst);
    let gw = Gateway::start(store.clone(), scan.clone());
    discovering(&bluez, 1);
    bluez.send(json!({"op": "add", "kind": "padlock",
        "spec": format!("{NEW_LOCK}::{NEW_LOCK_KEY}")}));
    let c = scan.candidate(NEW_LOCK);

    // Unit A-101's lock in the site database is another padlock; A-103 has none.
    let e = gw
        .adopt(&c, json!({"candidate": c.id, "unit": "A-101"}))
        .unwrap_err();
    assert!(e.contains("not the unit's lock"), "{e}");
    let e = gw
        .adopt(&c, json!({"candidate": c.id, "unit": "A-103"}))
        .unwrap_err();
    assert!(e.contains("names no padlock"), "{e}");
    let e = gw.adopt(&c, json!({"candidate": c.id})).unwrap_err();
    assert!(e.contains("`unit`"), "{e}");

    // The cloud assigns the new padlock to A-103 (with its keys): now it is the unit's lock,
    // and the installer's offline test unlock opens it.
    let v = store.stats().version;
    store
        .apply(&gatehouse::sync::SyncMessage::Delta(Box::new(
            serde_json::from_value(json!({
                "schema_version": 1, "kind": "delta", "base_version": v, "version": v + 1,
                "upsert": {
                    "devices": [{"id": "lock-a103", "kind": "padlock", "mac": NEW_LOCK,
                        "offline_key": NEW_LOCK_KEY,
                        "unlock_command": "7E100230A230000000001122334455667788990D"}],
                    "units": [{"id": "A-103", "status": "occupied", "tenant": "bob",
                        "zone": "zone-a", "controller": "lock-a103"}]
                }
            }))
            .unwrap(),
        )))
        .unwrap();
    let e = gw
        .adopt(
            &c,
            json!({"candidate": c.id, "unit": "A-103", "device": "other"}),
        )
        .unwrap_err();
    assert!(e.contains("lock-a103"), "{e}");
    let reg = gw
        .adopt(
            &c,
            json!({"candidate": c.id, "unit": "A-103", "test_unlock": true}),
        )
        .unwrap();
    assert_eq!(reg.id, "lock-a103");
    assert_eq!(reg.family, Family::BleLock);
    assert_eq!(reg.settings["unit"], "A-103");
    assert_eq!(reg.settings["mac"], NEW_LOCK);
    assert!(
        reg.settings.get("offline_key").is_none(),
        "{}",
        reg.settings
    );
    bluez.wait_for("the test unlock", WAIT, |e| {
        e["ev"] == "unlocked" && e["mac"] == NEW_LOCK && e["via"] == "offline"
    });
    // The adoption answers once the lock has; its link stays up a moment for what the lock
    // says after (server packets). The installer's next try comes after that link is closed.
    bluez.wait_for("the test unlock's link closed", WAIT, |e| {
        e["ev"] == "disconnected" && e["mac"] == NEW_LOCK
    });
    gw.manager.run(&[reg]).unwrap();

    // A test unlock the padlock refuses (its key was changed behind the site's back): failed.
    bluez.send(json!({"op": "config", "mac": NEW_LOCK, "offline_key": "00".repeat(16)}));
    let e = gw
        .adopt(
            &c,
            json!({"candidate": c.id, "unit": "A-103", "test_unlock": true}),
        )
        .unwrap_err();
    assert!(
        e.contains("test unlock failed"),
        "{e}; the mock's last events: {:#?}",
        bluez.events().iter().rev().take(20).collect::<Vec<_>>()
    );
    gw.stop();
    bluez.send(json!({"op": "quit"}));
}

/// `[ble]` with these `[[ble.device]]` tables.
fn ble_config(extra: &str, devices: &[(&str, &str, &str)]) -> String {
    let mut s = format!("[ble]\nadapter = \"hci0\"\n{extra}");
    for (id, mac, rest) in devices {
        s.push_str(&format!(
            "[[ble.device]]\nid = \"{id}\"\nkind = \"sensor\"\nmac = \"{mac}\"\n{rest}\n"
        ));
    }
    s
}

#[test]
fn a_reload_adds_and_removes_ble_devices_live_and_an_invalid_one_changes_nothing() {
    use gatehouse::reload::{Outcome, Reloader};
    let Some(bus) =
        in_child("a_reload_adds_and_removes_ble_devices_live_and_an_invalid_one_changes_nothing")
    else {
        return;
    };
    let mut bluez = mock(
        &bus,
        &[
            format!("--sensor={NEW_PLAIN}"),
            format!("--sensor={NEW_ENC}:bindkey={BIND_KEY}"),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let store = peers::demo_store(dir.path());
    let write = |body: &str| peers::config(dir.path(), body);
    let cfg = write(&ble_config("", &[("porch", NEW_PLAIN, "unit = \"A-103\"")]));
    let scan = Arc::new(TestScan::default());
    scan.active.store(true, Ordering::SeqCst);
    let gw = Gateway::start_with(store.clone(), scan.clone(), cfg.ble.clone().unwrap());
    let engine = Arc::new(AccessEngine::new(store.clone(), None));
    let rs485 = Arc::new(gatehouse::rs485::Rs485::start(&[], engine.clone()).unwrap());
    let supervisor = Arc::new(gatehouse::cloud::supervisor::LinkSupervisor::new(
        gatehouse::cloud::supervisor::LinkParts {
            site: cfg.site_id.clone(),
            gateway: cfg.gateway_id.clone(),
            store: store.clone(),
            states: Arc::new(DeviceStates::new()),
            units: Arc::new(gatehouse::cloud::commands::NoDevices),
            relays: Arc::new(gatehouse::cloud::commands::NoDevices),
            devices: None,
            metrics: engine.metrics().clone(),
            drain: Duration::from_secs(1),
            pairing: None,
            alerts: None,
        },
        tokio_util::sync::CancellationToken::new(),
        tokio_util::task::TaskTracker::new(),
    ));
    let reloader = Reloader::new(cfg, store.clone(), None, rs485, supervisor);
    let control: Arc<dyn gatehouse::ble::manager::Control> = gw.manager.clone();
    // What the daemon hands the pairing module: the same manager, as a provisioner.
    let provisioner: Arc<dyn Provisioner> = control.clone();
    assert!(provisioner.families().contains(&Family::BleSensor));
    reloader.add_part(Arc::new(gatehouse::ble::manager::LivePart(control)));
    discovering(&bluez, 1);
    // The configured sensor reports, with its unit; the other is a candidate.
    let r = wait_event(&store, 0, "sensor_reading", WAIT, |p| {
        p["device"] == "porch"
    });
    assert_eq!(r.payload["unit_id"], "A-103");
    scan.candidate(NEW_ENC);

    // Reload: `porch` removed, the encrypted sensor added with its key, in a zone.
    write(&ble_config(
        "",
        &[(
            "vault",
            NEW_ENC,
            &format!("zone = \"zone-b\"\nkey = \"{BIND_KEY}\""),
        )],
    ));
    let out = gw.rt.block_on(reloader.reload());
    assert_eq!(
        out,
        Outcome::Reloaded {
            changed: vec!["ble.device".into()],
            restart_needed: vec![]
        }
    );
    scan.found.lock().unwrap().clear();
    let from = peers::last_seq(&store);
    bluez.send(json!({"op": "sensor", "mac": NEW_PLAIN, "hex": "400002016402FC08"}));
    bluez.send(json!({"op": "sensor", "mac": NEW_ENC, "objects": "02D809"}));
    let r = wait_event(&store, from, "sensor_reading", WAIT, |p| {
        p["device"] == "vault"
    });
    assert_eq!(r.payload["zone"], "zone-b");
    assert_eq!(r.payload["value"], 25.2);
    // The removed one is unknown again: a candidate, its reading not recorded.
    scan.candidate(NEW_PLAIN);
    assert!(
        scan.found()
            .iter()
            .all(|c| c.id != Candidate::ble_id(NEW_ENC)),
        "{:?}",
        scan.found()
    );

    // Invalid files are refused whole, without quoting a key, and change nothing.
    let bad_key = "0123456789ABCDEF0123456789ABCDEX";
    for (body, key) in [
        (
            ble_config(
                "fob_min_rssi = -70\n",
                &[("vault", "3C:2E:F5:00:00", "zone = \"zone-b\"")],
            ),
            "not a MAC address",
        ),
        (
            ble_config(
                "",
                &[(
                    "vault",
                    NEW_ENC,
                    &format!("zone = \"zone-b\"\nkey = \"{bad_key}\""),
                )],
            ),
            "not a bind key",
        ),
        (
            ble_config("", &[("vault", NEW_ENC, "")]),
            "exactly one of `unit` or `zone`",
        ),
    ] {
        std::fs::write(dir.path().join("gatehouse.toml"), format!(
            "[site]\nid = \"test-site\"\ngateway_id = \"gw\"\n[storage]\ndata_dir = \"data\"\n{body}"
        ))
        .unwrap();
        match gw.rt.block_on(reloader.reload()) {
            Outcome::Refused { reason } => {
                assert!(reason.contains(key), "{reason}");
                assert!(reason.contains("gatehouse.toml:"), "{reason}");
                assert!(!reason.contains("0123456789"), "a key quoted: {reason}");
            }
            other => panic!("{body}: {other:?}"),
        }
    }
    // A table naming an adopted device's MAC: refused, naming both.
    let adopted = gatehouse::pairing::Registered {
        id: "adopted-porch".into(),
        candidate: Candidate::ble_id(NEW_PLAIN),
        family: Family::BleSensor,
        bus: None,
        settings: json!({"id": "adopted-porch", "kind": "sensor", "mac": NEW_PLAIN,
            "zone": "zone-a", "encrypted": false}),
        adopted_at: chrono::Utc::now(),
        adopted_by: "local:installer".into(),
        replaces: None,
    };
    provisioner.run(std::slice::from_ref(&adopted)).unwrap();
    write(&ble_config("", &[("porch", NEW_PLAIN, "unit = \"A-103\"")]));
    match gw.rt.block_on(reloader.reload()) {
        Outcome::Refused { reason } => {
            assert!(
                reason.contains("adopted device `adopted-porch`"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    let from = peers::last_seq(&store);
    bluez.send(json!({"op": "sensor", "mac": NEW_PLAIN, "hex": "400004016402D809"}));
    wait_event(&store, from, "sensor_reading", WAIT, |p| {
        p["device"] == "adopted-porch" && p["zone"] == "zone-a"
    });
    provisioner.run(&[]).unwrap();
    assert_eq!(gw.manager.cfg().fob_min_rssi, -80);
    let from = peers::last_seq(&store);
    bluez.send(json!({"op": "sensor", "mac": NEW_ENC, "objects": "026C07"}));
    wait_event(&store, from, "sensor_reading", WAIT, |p| {
        p["device"] == "vault" && p["value"] == 19.0
    });

    // An adopted sensor replacing the configured `vault`: `vault` is no longer run (its
    // readings are not recorded), a reload of the config that still lists it is accepted and
    // keeps it out, and the replacement removed brings it back.
    let vault_config = ble_config(
        "",
        &[(
            "vault",
            NEW_ENC,
            &format!("zone = \"zone-b\"\nkey = \"{BIND_KEY}\""),
        )],
    );
    let replacing = gatehouse::pairing::Registered {
        id: "porch-2".into(),
        candidate: Candidate::ble_id(NEW_PLAIN),
        family: Family::BleSensor,
        bus: None,
        settings: json!({"id": "porch-2", "kind": "sensor", "mac": NEW_PLAIN,
            "zone": "zone-b", "encrypted": false}),
        adopted_at: chrono::Utc::now(),
        adopted_by: "local:installer".into(),
        replaces: Some("vault".into()),
    };
    provisioner.run(std::slice::from_ref(&replacing)).unwrap();
    let from = peers::last_seq(&store);
    bluez.send(json!({"op": "sensor", "mac": NEW_ENC, "objects": "02D007"}));
    write(&vault_config);
    let out = gw.rt.block_on(reloader.reload());
    assert!(matches!(out, Outcome::Reloaded { .. }), "{out:?}");
    bluez.send(json!({"op": "sensor", "mac": NEW_ENC, "objects": "023408"}));
    bluez.send(json!({"op": "sensor", "mac": NEW_PLAIN, "hex": "400005016402D809"}));
    wait_event(&store, from, "sensor_reading", WAIT, |p| {
        p["device"] == "porch-2" && p["zone"] == "zone-b"
    });
    let vault: Vec<_> = peers::logged(&store)
        .into_iter()
        .filter(|e| e.seq > from && e.payload["device"] == "vault")
        .map(|e| e.payload)
        .collect();
    assert!(
        vault.is_empty(),
        "the replaced sensor still runs: {vault:?}"
    );
    provisioner.run(&[]).unwrap();
    let from = peers::last_seq(&store);
    bluez.send(json!({"op": "sensor", "mac": NEW_ENC, "objects": "029808"}));
    wait_event(&store, from, "sensor_reading", WAIT, |p| {
        p["device"] == "vault" && p["value"] == 22.0
    });

    // Settings apply live; the adapter waits for a restart.
    write(&ble_config(
        "fob_min_rssi = -70\n",
        &[(
            "vault",
            NEW_ENC,
            &format!("zone = \"zone-b\"\nkey = \"{BIND_KEY}\""),
        )],
    ));
    let out = gw.rt.block_on(reloader.reload());
    assert_eq!(
        out,
        Outcome::Reloaded {
            changed: vec!["ble.fob_min_rssi".into()],
            restart_needed: vec![]
        }
    );
    assert_eq!(gw.manager.cfg().fob_min_rssi, -70);
    let body = ble_config("", &[]).replace("hci0", "hci1");
    write(&body);
    match gw.rt.block_on(reloader.reload()) {
        Outcome::Reloaded {
            changed,
            restart_needed,
        } => {
            assert_eq!(restart_needed, vec!["ble.adapter".to_string()]);
            assert!(changed.contains(&"ble.device".to_string()), "{changed:?}");
        }
        other => panic!("{other:?}"),
    }
    gw.stop();
    bluez.send(json!({"op": "quit"}));
}

/// The demo site's unit A-104 lists no sensor; zone `zone-b` has no sensor rules.
const NEW_ZONE: &str = "3C:2E:F5:00:00:C4";
const NEW_CFG: &str = "3C:2E:F5:00:00:C5";

/// BTHome v2 service data, plain: packet id `pid`, motion on or off.
fn bthome_motion(pid: u8, on: bool) -> String {
    format!("4000{pid:02x}21{:02x}", u8::from(on))
}

/// BTHome v2 service data, plain: packet id `pid`, a temperature in 0.01 °C.
fn bthome_temp(pid: u8, centi: i16) -> String {
    let [lo, hi] = centi.to_le_bytes();
    format!("4000{pid:02x}02{lo:02x}{hi:02x}")
}

/// The active alert of this kind and subject on the board (the durable set).
fn active(
    board: &gatehouse::automation::runner::AlertBoard,
    kind: &str,
    subject: Value,
) -> Option<gatehouse::automation::lifecycle::ActiveAlert> {
    board
        .snapshot()
        .1
        .iter()
        .find(|a| a.kind.as_str() == kind && serde_json::to_value(&a.subject).unwrap() == subject)
        .cloned()
}

/// Sends packets from `mac` (a fresh packet id each, from `pid`) until `found` answers.
fn until<T>(
    bluez: &mut peers::Peer,
    mac: &str,
    pid: &mut u8,
    what: &str,
    packets: impl Fn(u8) -> Vec<String>,
    found: impl Fn() -> Option<T>,
) -> T {
    peers::eventually(what, WAIT, || {
        for hex in packets(*pid) {
            bluez.send(json!({"op": "sensor", "mac": mac, "hex": hex}));
            *pid = pid.wrapping_add(1);
        }
        let f = found();
        if f.is_none() {
            std::thread::sleep(Duration::from_millis(300));
        }
        f
    })
}

#[test]
fn a_sensor_adopted_to_a_unit_raises_the_units_alerts_and_one_in_a_zone_names_it() {
    use gatehouse::automation::facts::{DropCounter, FactSink};
    use gatehouse::automation::runner::{self, AlertBoard, RunnerCounters};
    let Some(bus) =
        in_child("a_sensor_adopted_to_a_unit_raises_the_units_alerts_and_one_in_a_zone_names_it")
    else {
        return;
    };
    let mut bluez = mock(
        &bus,
        &[
            format!("--sensor={NEW_PLAIN}"),
            format!("--sensor={NEW_ZONE}"),
            format!("--sensor={NEW_CFG}"),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    // Demo automation settings: motion 2 in 1 minute; temperature above 22.5 °C at once.
    let store = peers::demo_store(dir.path());
    // As the daemon wires it: the engine's sink, the runner reading its placements.
    let engine = Arc::new(AccessEngine::new(store.clone(), None));
    let (sink, rx) = FactSink::bounded(64, DropCounter::default());
    let placed = sink.placements().clone();
    engine.set_facts(sink);
    let board = AlertBoard::new();
    let counters = RunnerCounters::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let running = runner::start(
        store.clone(),
        Arc::new(gatehouse::cloud::commands::NoDevices),
        rx,
        placed.clone(),
        board.clone(),
        counters.clone(),
        stop.clone(),
    )
    .unwrap();
    let scan = Arc::new(TestScan::default());
    scan.active.store(true, Ordering::SeqCst);
    let gw = Gateway::start_engine(store.clone(), scan.clone(), BleConfig::default(), engine);
    discovering(&bluez, 1);
    let mut pid = 10u8;
    // Heard: candidates. Before adoption their facts reach nobody's rules.
    let pir = scan.candidate(NEW_PLAIN);
    let thermo = scan.candidate(NEW_ZONE);
    let reg = gw
        .adopt(
            &pir,
            json!({"candidate": pir.id, "unit": "A-104", "device": "pir-a104"}),
        )
        .unwrap();
    let reg_zone = gw
        .adopt(
            &thermo,
            json!({"candidate": thermo.id, "zone": "zone-b", "device": "thermo-b"}),
        )
        .unwrap();
    gw.manager.run(&[reg.clone(), reg_zone.clone()]).unwrap();

    // Motion, no motion, motion: A-104's motion alert, from a sensor the site database does
    // not list (the unit's alarm_enabled applies: on by default).
    let unit = json!({"type": "unit", "id": "A-104"});
    let raised = until(
        &mut bluez,
        NEW_PLAIN,
        &mut pid,
        "A-104's motion_alert",
        |p| {
            vec![
                bthome_motion(p, true),
                bthome_motion(p.wrapping_add(100), false),
            ]
        },
        || active(&board, "motion_alert", unit.clone()),
    );
    assert_eq!(raised.detail["device"], "pir-a104", "{:?}", raised.detail);
    let e = wait_event(&store, 0, "alert_raised", WAIT, |p| {
        p["kind"] == "motion_alert"
    });
    assert_eq!(e.payload["subject"], unit);
    // 23.00 °C from the same sensor: the unit's temperature monitoring.
    let high = until(
        &mut bluez,
        NEW_PLAIN,
        &mut pid,
        "A-104's temperature_high",
        |p| vec![bthome_temp(p, 2300)],
        || active(&board, "temperature_high", unit.clone()),
    );
    assert_eq!(high.detail["celsius"], 23.0);

    // The zone's thermometer: its own subject, the alert names the zone.
    let dev = json!({"type": "device", "id": "thermo-b"});
    let zone_high = until(
        &mut bluez,
        NEW_ZONE,
        &mut pid,
        "thermo-b's temperature_high",
        |p| vec![bthome_temp(p, 2400)],
        || active(&board, "temperature_high", dev.clone()),
    );
    assert_eq!(zone_high.detail["zone"], "zone-b", "{:?}", zone_high.detail);
    // Back inside by the hysteresis: cleared.
    until(
        &mut bluez,
        NEW_ZONE,
        &mut pid,
        "thermo-b's temperature_high cleared",
        |p| vec![bthome_temp(p, 2000)],
        || {
            active(&board, "temperature_high", dev.clone())
                .is_none()
                .then_some(())
        },
    );

    // Removal applies live: the pir leaves automation's placements with the registry.
    assert!(placed.snapshot().get("pir-a104").is_some());
    gw.manager.run(std::slice::from_ref(&reg_zone)).unwrap();
    assert!(placed.snapshot().get("pir-a104").is_none());
    assert!(placed.snapshot().get("thermo-b").is_some());

    // A `[[ble.device]]` with a unit, added by a reload: A-102's sensor from then on.
    let cfg = peers::config(
        dir.path(),
        &ble_config("", &[("cfg-thermo", NEW_CFG, "unit = \"A-102\"")]),
    );
    gw.manager.apply_config(cfg.ble.as_ref().unwrap());
    let a102 = json!({"type": "unit", "id": "A-102"});
    until(
        &mut bluez,
        NEW_CFG,
        &mut pid,
        "A-102's temperature_high",
        |p| vec![bthome_temp(p, 2500)],
        || active(&board, "temperature_high", a102.clone()),
    );
    assert!(counters.facts.get() > 0);

    gw.stop();
    stop.cancel();
    running.join();
    bluez.send(json!({"op": "quit"}));
}
