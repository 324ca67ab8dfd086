//! `gatehouse-bench ble`: the BLE manager over the simulated transport.
//!
//! A site with 1,000 BLE devices (400 padlocks, 100 unit controllers, 400 BTHome sensors, 100
//! fobs) in the site database. `adverts_per_s`: advertisements parsed and dispatched by
//! [`Manager::on_advert`] (the advert thread's work: device lookup, lock advert / BTHome
//! parse, dedupe, state, events on change) over 1,000 rounds of one advert per device, each
//! sensor sending a new packet every round. `unlock_overhead`: a remote unlock through
//! `UnitControllers::execute` (what the command router calls) on a simulated lock that answers
//! at once, with the cloud's command packets served in-process at once: all of it is the
//! gateway's own time (connect, session, request, the packet write, the answer, the
//! `lock_result` event on disk). Each sample starts when the previous one's link is closed
//! (after an unlock the link stays up 300 ms for the lock's server packets, holding one of the
//! adapter's connections): the figure is one unlock's own time, not a queue behind others.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use serde_json::json;

use gatehouse::access::AccessEngine;
use gatehouse::ble::config::BleConfig;
use gatehouse::ble::rpc::{CloudRpc, UnlockRequest, UnlockResponse};
use gatehouse::ble::sim::{SimLock, SimRadio};
use gatehouse::ble::transport::Seen;
use gatehouse::ble::{Manager, bthome, noke};
use gatehouse::cloud::commands::{Execution, UnitAction, UnitControllers};
use gatehouse::devstate::DeviceStates;
use gatehouse::store::Store;

const PADLOCKS: usize = 400;
const CONTROLLERS: usize = 100;
const SENSORS: usize = 400;
const FOBS: usize = 100;
const ROUNDS: usize = 1000;
const SAMPLES: usize = 300;

fn mac(kind: u8, i: usize) -> String {
    format!("10:{kind:02X}:00:00:{:02X}:{:02X}", i >> 8, i & 0xFF)
}

pub fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut snapshot: serde_json::Value =
        serde_json::from_str(include_str!("../../../config/demo-snapshot.json"))?;
    let mut devices = Vec::new();
    for i in 0..PADLOCKS {
        devices.push(
            json!({"id": format!("lock-{i}"), "kind": "padlock", "mac": mac(1, i),
            "offline_key": "000102030405060708090A0B0C0D0E0F",
            "unlock_command": "7E100230A230000000001122334455667788990A"}),
        );
    }
    for i in 0..CONTROLLERS {
        devices.push(json!({"id": format!("ctl-{i}"), "kind": "controller", "mac": mac(2, i)}));
    }
    for i in 0..SENSORS {
        devices.push(json!({"id": format!("sensor-{i}"), "kind": "sensor", "mac": mac(3, i)}));
    }
    for i in 0..FOBS {
        devices.push(json!({"id": format!("fob-{i}"), "kind": "fob", "mac": mac(4, i)}));
    }
    snapshot["devices"] = json!(devices);
    let snap_path = dir.path().join("snapshot.json");
    std::fs::write(&snap_path, serde_json::to_vec(&snapshot)?)?;
    let store = Arc::new(Store::open(&dir.path().join("data"), 10_000_000)?);
    gatehouse::cli::import_file(&store, &snap_path)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let radio = SimRadio::new();
    let packet = {
        let mut p = [0x33u8; 20];
        p[0] = 0x7E;
        p
    };
    for i in 0..PADLOCKS {
        let mut l = SimLock::new(&format!("NOKE3P_{}", mac(1, i).replace(':', "")), [0; 16]);
        l.accepted = vec![packet];
        radio.add_lock(&mac(1, i), l);
    }
    let rpc = Arc::new(CloudRpc::new());
    let engine = Arc::new(AccessEngine::new(store.clone(), None));
    let manager = rt.block_on(async {
        Manager::new(
            radio.clone(),
            BleConfig::default(),
            engine,
            Arc::new(DeviceStates::new()),
            rpc.clone(),
        )
    });

    // Adverts: lock adverts as they come (unchanged), sensors with a new packet each round.
    let lock_advert = |m: &str, name: String| Seen {
        mac: m.to_string(),
        name: Some(name),
        rssi: Some(-60),
        manufacturer: vec![(0xFFFF, vec![0x00, 0x02, 0x0A])],
        service_data: Vec::new(),
    };
    let sensor_advert = |m: &str, round: usize| {
        let mut o = vec![0x00, round as u8, 0x01, 80, 0x02];
        o.extend_from_slice(&2150i16.to_le_bytes());
        o.extend_from_slice(&[0x21, 0]);
        Seen {
            mac: m.to_string(),
            name: Some("SBMO-003Z".into()),
            rssi: Some(-70),
            manufacturer: Vec::new(),
            service_data: vec![(
                bthome::SERVICE_UUID.to_string(),
                bthome::encode_plain(&o, false),
            )],
        }
    };
    let mut locks: Vec<Seen> = (0..PADLOCKS)
        .map(|i| lock_advert(&mac(1, i), format!("NOKE3P_{}", mac(1, i).replace(':', ""))))
        .collect();
    locks.extend(
        (0..CONTROLLERS)
            .map(|i| lock_advert(&mac(2, i), format!("NOKE3E_{}", mac(2, i).replace(':', "")))),
    );
    let fobs: Vec<Seen> = (0..FOBS)
        .map(|i| lock_advert(&mac(4, i), format!("FOB1F_{}", mac(4, i).replace(':', ""))))
        .collect();
    let sensors: Vec<Vec<Seen>> = (0..256)
        .map(|r| (0..SENSORS).map(|i| sensor_advert(&mac(3, i), r)).collect())
        .collect();
    // Warm-up round: every device comes online (1,000 `device_online` events on disk).
    let now = Instant::now();
    for s in locks.iter().chain(&fobs).chain(&sensors[0]) {
        manager.on_advert(s, now, Utc::now());
    }
    let start = Instant::now();
    let mut n = 0usize;
    for round in 1..=ROUNDS {
        let now = Instant::now();
        let wall = Utc::now();
        for s in locks.iter().chain(&fobs).chain(&sensors[round % 256]) {
            manager.on_advert(s, now, wall);
            n += 1;
        }
    }
    let adverts_per_s = n as f64 / start.elapsed().as_secs_f64();

    // Remote unlocks on lock-0, the cloud answering in-process at once.
    let mut requests = rpc.take_requests().context("rpc requests")?;
    let responder = rpc.clone();
    let commands = noke::format_command_packets(&[packet]);
    rt.spawn(async move {
        while let Some(bytes) = requests.recv().await {
            let Ok(req) = serde_json::from_slice::<UnlockRequest>(&bytes) else {
                continue;
            };
            let resp = UnlockResponse {
                request_id: req.request_id,
                commands: Some(commands.clone()),
                error: None,
            };
            responder.on_response(&serde_json::to_vec(&resp).unwrap_or_default());
        }
    });
    let mut overhead = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        while manager.links_open() > 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let dev = format!("lock-{}", i % PADLOCKS);
        manager.on_advert(&locks[i % PADLOCKS], Instant::now(), Utc::now());
        let t = Instant::now();
        let r = UnitControllers::execute(&*manager, &dev, UnitAction::Unlock);
        overhead.push(t.elapsed());
        if !matches!(r, Execution::Done(ref d) if d.contains("online")) {
            anyhow::bail!("unlock {i} of {dev}: {r:?}");
        }
    }
    overhead.sort();
    let p99 = overhead[(overhead.len() * 99).div_ceil(100) - 1];
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    println!(
        "{}",
        json!({
            "adverts_per_s": adverts_per_s.round(),
            "unlock_overhead_p99_ms": ms(p99),
            "locks": PADLOCKS + CONTROLLERS,
            "samples": SAMPLES,
        })
    );
    drop(rt);
    Ok(())
}
