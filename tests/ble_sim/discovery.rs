//! Install-mode discovery in the manager, part of `tests/ble_sim.rs`: adverts handed to
//! `Manager::on_advert` with the times the test chooses — what is a candidate, how often it is
//! reported, how many unknown devices are remembered. (Through bluer and the mock BlueZ, with
//! adoption: `tests/pairing_ble.rs`.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;

use gatehouse::ble::bthome;
use gatehouse::ble::transport::Seen;
use gatehouse::pairing::{Candidate, Family, Scan, ScanOptions};

use crate::rig::*;

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
    fn ids(&self) -> Vec<String> {
        self.found
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.id.clone())
            .collect()
    }
}

fn named(mac: &str, name: &str) -> Seen {
    Seen {
        mac: mac.into(),
        name: Some(name.into()),
        rssi: Some(-60),
        manufacturer: vec![(0xFFFF, vec![0, 2, 10])],
        service_data: vec![],
    }
}

fn bthome_seen(mac: &str, data: Vec<u8>) -> Seen {
    Seen {
        mac: mac.into(),
        name: None,
        rssi: Some(-70),
        manufacturer: vec![],
        service_data: vec![(bthome::SERVICE_UUID.into(), data)],
    }
}

#[test]
fn candidates_are_known_families_of_unknown_devices_reported_once_a_second() {
    let r = rig();
    let scan = Arc::new(TestScan::default());
    r.manager.set_scan(scan.clone());
    let (t0, wall) = (Instant::now(), Utc::now());
    let lock = named("D0:1F:A6:44:B3:21", "NOKE3E_D01FA644B321");
    let sensor = bthome_seen(
        "3C:2E:F5:00:00:C1",
        bthome::encode_plain(&[0x01, 0x64], false),
    );

    // Not in install mode: nothing.
    r.manager.on_advert(&lock, t0, wall);
    r.manager.on_advert(&sensor, t0, wall);
    assert!(scan.ids().is_empty());

    scan.active.store(true, Ordering::SeqCst);
    r.manager.on_advert(&lock, t0, wall);
    r.manager.on_advert(&sensor, t0, wall);
    // Again within the second: not reported again.
    r.manager
        .on_advert(&lock, t0 + Duration::from_millis(500), wall);
    assert_eq!(
        scan.ids(),
        vec!["ble:D0:1F:A6:44:B3:21", "ble:3C:2E:F5:00:00:C1"]
    );
    let found = scan.found.lock().unwrap().clone();
    assert_eq!(found[0].family, Family::BleLock);
    assert_eq!(found[0].identity["hardware"], "3E");
    assert_eq!(found[0].identity["kind"], "controller");
    assert_eq!(found[0].identity["profile"], "noke-unit-controller");
    assert_eq!(found[1].family, Family::BleSensor);
    assert_eq!(found[1].identity["encrypted"], false);
    // A second later: seen again (RSSI, last_seen).
    r.manager
        .on_advert(&lock, t0 + Duration::from_millis(1000), wall);
    assert_eq!(scan.ids().len(), 3);

    // Not candidates: the site's own devices, a hardware code no profile lists, an unknown
    // name, BTHome v1 data, a device with neither a name nor data.
    scan.found.lock().unwrap().clear();
    let t1 = t0 + Duration::from_secs(10);
    for seen in [
        named(LOCK_A101, "NOKE3P_D01FA644B301"),
        bthome_seen(SENSOR_PLAIN, bthome::encode_plain(&[0x01, 0x64], false)),
        named("D0:1F:A6:44:B3:31", "NOKE9Z_D01FA644B331"),
        named("11:22:33:44:55:66", "Someone's phone"),
        bthome_seen("3C:2E:F5:00:00:C3", vec![0x20, 0x01, 0x64]),
        Seen {
            mac: "11:22:33:44:55:77".into(),
            name: None,
            rssi: Some(-50),
            manufacturer: vec![],
            service_data: vec![],
        },
    ] {
        r.manager.on_advert(&seen, t1, wall);
    }
    assert!(scan.ids().is_empty(), "{:?}", scan.ids());
}

#[test]
fn unknown_devices_remembered_in_install_mode_are_bounded() {
    let r = rig();
    let scan = Arc::new(TestScan::default());
    scan.active.store(true, Ordering::SeqCst);
    r.manager.set_scan(scan.clone());
    let (t0, wall) = (Instant::now(), Utc::now());
    // A crowd of BTHome devices: 1024 remembered and reported, the rest not.
    for i in 0..1100u32 {
        let mac = format!("3C:2E:F5:00:{:02X}:{:02X}", i >> 8, i & 0xFF);
        r.manager.on_advert(
            &bthome_seen(&mac, bthome::encode_plain(&[0x01, 0x64], false)),
            t0,
            wall,
        );
    }
    assert_eq!(scan.ids().len(), 1024);
    // Install mode ends: they are forgotten; the next install mode starts afresh.
    scan.active.store(false, Ordering::SeqCst);
    let late = bthome_seen(
        "3C:2E:F5:00:FF:FF",
        bthome::encode_plain(&[0x01, 0x64], false),
    );
    r.manager.on_advert(&late, t0, wall);
    scan.active.store(true, Ordering::SeqCst);
    r.manager.on_advert(&late, t0, wall);
    assert_eq!(scan.ids().last().unwrap(), "ble:3C:2E:F5:00:FF:FF");
}
