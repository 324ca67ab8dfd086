//! The BLE module over the simulated transport (`gatehouse::ble::sim`): padlocks that speak the
//! legacy protocol (checking the offline unlock's encryption, checksum and time), sleep and
//! wake; BTHome sensors; fobs. Commands go through the real command router with signed
//! commands; the cloud's side of an online unlock is played by the test through the rpc
//! channel the cloud link would serve.

#[path = "ble_sim/discovery.rs"]
mod discovery;
#[path = "ble_sim/lock_faults.rs"]
mod lock_faults;
#[path = "support/peers.rs"]
mod peers;
#[path = "ble_sim/rig.rs"]
mod rig;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;

use gatehouse::ble::bthome;
use gatehouse::ble::noke;
use gatehouse::ble::rpc::UnlockResponse;
use gatehouse::cloud::commands::{Execution, Online, UnitAction, handle_expire, handle_wake};
use peers::{logged, wait_event};
use rig::*;

#[test]
fn online_unlock_writes_the_clouds_packets_one_by_one_and_uploads_server_packets() {
    let r = rig();
    let (p1, p2) = (packet(0xA1), packet(0xA2));
    let server = noke::server_packet(&[0x42; 19]);
    r.radio.with_lock(LOCK_A101, |l| {
        l.accepted = vec![p1, p2];
        l.server_packet = Some(server);
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    r.serve_cloud(move |req| {
        seen2.lock().unwrap().push(req.clone());
        UnlockResponse {
            request_id: req.request_id.clone(),
            commands: Some(noke::format_command_packets(&[p1, p2])),
            error: None,
        }
    });
    r.advertise_until_awake(LOCK_A101, "lock-a101");
    let res = r.command(
        "u-1",
        "unlock",
        json!({"unit": "A-101"}),
        chrono::Duration::minutes(1),
    );
    assert_eq!(res.status, "done", "{res:?}");
    assert!(res.detail.as_deref().unwrap().contains("online"), "{res:?}");
    // The lock got exactly the cloud's packets, in order, and unlocked once.
    let written = r.radio.with_lock(LOCK_A101, |l| l.written.clone()).unwrap();
    assert_eq!(written, vec![p1, p2]);
    assert_eq!(r.radio.unlocks(LOCK_A101), 1);
    // The cloud was asked with the lock's MAC and the session just read.
    let reqs = seen.lock().unwrap().clone();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].device, "lock-a101");
    assert_eq!(reqs[0].mac, LOCK_A101);
    assert_eq!(reqs[0].action, "unlock");
    assert_eq!(reqs[0].session.len(), 40);
    // Every answer is an event.
    let results = r.events("lock_result");
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(
        results
            .iter()
            .all(|p| p["result"] == "success" && p["via"] == "online")
    );
    // The server packet comes after the last answer; it is uploaded with its session.
    let upload = wait_event(&r.store, 0, "lock_upload", WAIT, |_| true).payload;
    assert_eq!(upload["packet"], hex::encode_upper(server));
    assert_eq!(upload["session"], reqs[0].session.to_uppercase());
    // The battery read from the session is in the device's retained state.
    assert_eq!(r.states.get("lock-a101").unwrap()["battery_mv"], 3000);
}

#[test]
fn the_cloud_away_or_silent_means_an_offline_unlock_the_lock_accepts() {
    let r = rig();
    // Nobody serves the requests: the cloud does not answer within the timeout.
    let _requests = r.rpc.take_requests().unwrap();
    r.advertise_until_awake(LOCK_A101, "lock-a101");
    let res = r.command(
        "u-2",
        "unlock",
        json!({"unit": "A-101"}),
        chrono::Duration::minutes(1),
    );
    assert_eq!(res.status, "done", "{res:?}");
    assert!(
        res.detail.as_deref().unwrap().contains("offline"),
        "{res:?}"
    );
    assert_eq!(r.radio.unlocks(LOCK_A101), 1);
    // The simulated lock checked the packet: decrypted under offline key + session, checksum
    // and time within its window.
    let results = r.events("lock_result");
    assert_eq!(results.last().unwrap()["result"], "success");
    assert_eq!(results.last().unwrap()["via"], "offline");
}

#[test]
fn a_wrong_offline_key_is_the_locks_invalid_key_and_a_failed_command() {
    let r = rig();
    let _requests = r.rpc.take_requests().unwrap();
    // The lock was re-keyed; the site database still has the old key.
    r.radio.with_lock(LOCK_A101, |l| l.offline_key = [0xEE; 16]);
    r.advertise_until_awake(LOCK_A101, "lock-a101");
    let res = r.command(
        "u-3",
        "unlock",
        json!({"unit": "A-101"}),
        chrono::Duration::minutes(1),
    );
    assert_eq!(res.status, "failed", "{res:?}");
    assert_eq!(res.reason.as_deref(), Some("device_error"));
    assert!(
        res.detail.as_deref().unwrap().contains("invalid_key"),
        "{res:?}"
    );
    assert_eq!(r.radio.unlocks(LOCK_A101), 0);
    assert_eq!(
        r.events("lock_result").last().unwrap()["result"],
        "invalid_key"
    );
}

#[test]
fn the_clouds_refusal_and_bad_packets_fall_back_offline_and_lock_needs_the_cloud() {
    let r = rig();
    r.serve_cloud(|req| UnlockResponse {
        request_id: req.request_id.clone(),
        commands: (req.action == "unlock").then(|| "not-hex".to_string()),
        error: (req.action != "unlock").then(|| "no schedule".to_string()),
    });
    r.advertise_until_awake(LOCK_A101, "lock-a101");
    // Malformed packets from the cloud are never written; the offline unlock is used.
    let res = r.command(
        "u-4",
        "unlock",
        json!({"unit": "A-101"}),
        chrono::Duration::minutes(1),
    );
    assert_eq!(res.status, "done", "{res:?}");
    assert!(
        res.detail.as_deref().unwrap().contains("offline"),
        "{res:?}"
    );
    let written = r.radio.with_lock(LOCK_A101, |l| l.written.len()).unwrap();
    assert_eq!(written, 1);
    // Locate has no offline form: the cloud's refusal is the result.
    let res = r.command(
        "l-1",
        "locate",
        json!({"unit": "A-101"}),
        chrono::Duration::minutes(1),
    );
    assert_eq!(res.status, "failed", "{res:?}");
    assert!(
        res.detail.as_deref().unwrap().contains("no schedule"),
        "{res:?}"
    );
}

#[test]
fn a_sleeping_padlock_gets_its_unlock_when_it_wakes() {
    let mut r = rig();
    let _requests = r.rpc.take_requests().unwrap();
    assert_eq!(r.manager.online("lock-a102"), Online::Asleep);
    let res = r.command(
        "s-1",
        "unlock",
        json!({"unit": "A-102"}),
        chrono::Duration::minutes(1),
    );
    assert_eq!(res.status, "queued", "{res:?}");
    assert_eq!(r.router.pending().len(), 1);
    // It sleeps: nothing is written, nothing wakes.
    std::thread::sleep(Duration::from_millis(300));
    assert!(r.wakes.try_recv().is_err());
    // Someone touches it: it advertises, the manager reports it awake, the link runs what
    // waited for it.
    r.radio.with_lock(LOCK_A102, |l| l.asleep = false);
    r.radio.advertise_lock(LOCK_A102, -58);
    let woke =
        r.rt.block_on(async { tokio::time::timeout(WAIT, r.wakes.recv()).await })
            .unwrap()
            .unwrap();
    assert_eq!(woke, "lock-a102");
    let out = handle_wake(&r.router, &r.store, &woke, Utc::now());
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].result.status, "done", "{:?}", out[0].result);
    assert_eq!(out[0].result.id.as_deref(), Some("s-1"));
    assert_eq!(r.radio.unlocks(LOCK_A102), 1);
    assert!(r.router.pending().is_empty());
}

#[test]
fn a_padlock_that_never_wakes_has_its_unlock_expire() {
    let r = rig();
    let _requests = r.rpc.take_requests().unwrap();
    let res = r.command(
        "s-2",
        "unlock",
        json!({"unit": "A-102"}),
        chrono::Duration::seconds(2),
    );
    assert_eq!(res.status, "queued", "{res:?}");
    let out = handle_expire(
        &r.router,
        &r.store,
        Utc::now() + chrono::Duration::seconds(3),
    );
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].result.status, "expired");
    assert_eq!(r.radio.unlocks(LOCK_A102), 0);
}

#[test]
fn a_padlock_falling_asleep_as_it_is_called_queues_the_command() {
    let r = rig();
    let _requests = r.rpc.take_requests().unwrap();
    r.advertise_until_awake(LOCK_A101, "lock-a101");
    r.radio.with_lock(LOCK_A101, |l| l.asleep = true);
    let res = r.command(
        "s-3",
        "unlock",
        json!({"unit": "A-101"}),
        chrono::Duration::minutes(1),
    );
    assert_eq!(res.status, "queued", "{res:?}");
    assert_eq!(r.manager.online("lock-a101"), Online::Asleep);
}

#[test]
fn fobs_heard_at_the_gate_go_to_the_access_decision() {
    let r = rig();
    // Eve's BLE fob, strong enough: granted, and the gate's relay pulses.
    r.radio.advertise_fob(FOB_EVE, -50);
    let e = wait_event(&r.store, 0, "access_granted", WAIT, |p| {
        p["credential_id"] == "c-eve-blefob" && p["entry"] == "gate-1"
    });
    peers::eventually("gate relay pulsed", WAIT, || {
        let ops = r.relays.0.lock().unwrap().clone();
        (ops.len() == 1).then_some(())
    });
    let ops = r.relays.0.lock().unwrap().clone();
    assert_eq!(ops[0].0, "relay-board-1");
    assert_eq!(ops[0].1, 0);
    // The same fob again within fob_repeat: no second decision.
    r.radio.advertise_fob(FOB_EVE, -50);
    // Too far away: ignored.
    r.radio.advertise_fob("C0:FF:EE:00:00:99", -90);
    // A fob the site does not know, nearby: heard, counted, not decided (anyone can
    // advertise `FOB…`; a refusal per passer-by would flood the outbox with security events).
    let unknown_before = r.manager.counters().unknown;
    r.radio.advertise_fob("C0:FF:EE:00:00:77", -40);
    peers::eventually("the stranger's fob counted", WAIT, || {
        (r.manager.counters().unknown > unknown_before).then_some(())
    });
    let _ = e;
    std::thread::sleep(Duration::from_millis(200));
    let decisions: Vec<_> = logged(&r.store)
        .into_iter()
        .filter(|x| x.kind.starts_with("access_"))
        .map(|x| x.payload.to_string())
        .collect();
    assert_eq!(
        decisions
            .iter()
            .filter(|d| d.contains("c-eve-blefob"))
            .count(),
        1
    );
    assert!(!decisions.iter().any(|d| d.contains("C0FFEE000099")));
    assert!(!decisions.iter().any(|d| d.contains("C0FFEE000077")));
    assert_eq!(r.relays.0.lock().unwrap().len(), 1);
}

#[test]
fn a_blacklisted_ble_fob_stays_out() {
    let r = rig_with(fast(), |doc| {
        doc["facility"]["use_blacklist"] = json!(true);
        doc["blacklist"]
            .as_array_mut()
            .unwrap()
            .push(json!({"id": "bl-eve", "fob": "C0FFEE0000E1", "reason": "lost"}));
    });
    r.radio.advertise_fob(FOB_EVE, -50);
    let e = wait_event(&r.store, 0, "access_denied", WAIT, |p| {
        p.to_string().contains("C0FFEE0000E1")
    });
    assert!(e.payload.to_string().contains("blacklist"), "{}", e.payload);
    assert!(r.relays.0.lock().unwrap().is_empty());
}

fn bthome_plain(packet_id: u8, temp_centi: i16, motion: u8, battery: u8) -> Vec<u8> {
    let mut o = vec![0x00, packet_id, 0x01, battery, 0x02];
    o.extend_from_slice(&temp_centi.to_le_bytes());
    o.extend_from_slice(&[0x21, motion]);
    bthome::encode_plain(&o, false)
}

#[test]
fn bthome_sensors_report_changes_once() {
    let r = rig();
    let adv = |data: Vec<u8>| {
        r.radio
            .advertise_bthome(SENSOR_PLAIN, "SBMO-003Z", data, -70)
    };
    adv(bthome_plain(1, 2150, 1, 90));
    let first = wait_event(&r.store, 0, "motion", WAIT, |p| {
        p["device"] == "sensor-hall-a"
    });
    wait_event(&r.store, 0, "sensor_reading", WAIT, |p| {
        p["device"] == "sensor-hall-a" && p["reading"] == "temperature" && p["value"] == 21.5
    });
    // The same packet again (sensors repeat each packet): nothing new.
    adv(bthome_plain(1, 2150, 1, 90));
    // A new packet: the temperature barely moved (no reading), motion cleared, battery low.
    adv(bthome_plain(2, 2160, 0, 10));
    wait_event(&r.store, first.seq, "battery_low", WAIT, |p| {
        p["device"] == "sensor-hall-a" && p["battery_percent"] == 10
    });
    // Motion again: a second motion event.
    adv(bthome_plain(3, 2250, 1, 10));
    wait_event(&r.store, first.seq, "motion", WAIT, |p| {
        p["device"] == "sensor-hall-a"
    });
    // The temperature moved enough to report (recorded after the motion).
    wait_event(&r.store, first.seq, "sensor_reading", WAIT, |p| {
        p["device"] == "sensor-hall-a" && p["value"] == 22.5
    });
    let readings: Vec<_> = r
        .events("sensor_reading")
        .into_iter()
        .filter(|p| p["reading"] == "temperature")
        .map(|p| p["value"].as_f64().unwrap())
        .collect();
    assert_eq!(readings, vec![21.5, 22.5]);
    assert_eq!(r.events("motion").len(), 2);
    assert_eq!(r.events("battery_low").len(), 1);
    let state = r.states.get("sensor-hall-a").unwrap();
    assert_eq!(state["temperature"], 22.5);
    assert_eq!(state["online"], true);
}

#[test]
fn encrypted_bthome_needs_its_key_and_a_fresh_counter() {
    let r = rig();
    let key: [u8; 16] = hex::decode(SENSOR_KEY).unwrap().try_into().unwrap();
    let mac = bthome::parse_mac(SENSOR_ENCRYPTED).unwrap();
    let door = |open: u8| vec![0x2D, open];
    let adv = |data: Vec<u8>| {
        r.radio
            .advertise_bthome(SENSOR_ENCRYPTED, "SBDW-002C", data, -70)
    };
    // Under the wrong key: not read.
    adv(bthome::encrypt(&door(1), &[7; 16], mac, 10, false).unwrap());
    // In the clear, from a device that must encrypt: not believed.
    adv(bthome::encode_plain(&door(1), false));
    // Properly encrypted: the door opened.
    adv(bthome::encrypt(&door(1), &key, mac, 11, false).unwrap());
    let opened = wait_event(&r.store, 0, "door_opened", WAIT, |p| {
        p["device"] == "sensor-door-b"
    });
    // A replay of an older counter saying "closed": ignored.
    adv(bthome::encrypt(&door(0), &key, mac, 5, false).unwrap());
    // A fresh one: closed.
    adv(bthome::encrypt(&door(0), &key, mac, 12, false).unwrap());
    wait_event(&r.store, opened.seq, "door_closed", WAIT, |p| {
        p["device"] == "sensor-door-b"
    });
    assert_eq!(r.events("door_opened").len(), 1);
    assert_eq!(r.events("door_closed").len(), 1);
    assert!(r.manager.counters().malformed >= 2);
}

#[test]
fn a_silent_controller_goes_offline_and_comes_back() {
    let r = rig();
    r.radio.advertise_lock(CONTROLLER_B201, -60);
    let online = wait_event(&r.store, 0, "device_online", WAIT, |p| {
        p["device"] == "lock-b201"
    });
    assert_eq!(r.manager.online("lock-b201"), Online::Yes);
    // Two minutes of silence (the controller profile's offline_after is 120 s).
    r.manager
        .check_availability(Instant::now() + Duration::from_secs(121));
    let off = wait_event(&r.store, online.seq, "device_offline", WAIT, |p| {
        p["device"] == "lock-b201"
    });
    assert_eq!(r.states.get("lock-b201").unwrap()["online"], false);
    // A padlock's silence is its sleep: never offline.
    assert!(
        !r.events("device_offline")
            .iter()
            .any(|p| p["device"] == "lock-a101")
    );
    // Heard again: online.
    r.radio.advertise_lock(CONTROLLER_B201, -60);
    wait_event(&r.store, off.seq, "device_online", WAIT, |p| {
        p["device"] == "lock-b201"
    });
    assert_eq!(r.states.get("lock-b201").unwrap()["online"], true);
}

#[test]
fn a_low_battery_read_from_the_session_is_reported_once() {
    let r = rig();
    let _requests = r.rpc.take_requests().unwrap();
    r.radio.with_lock(LOCK_A101, |l| l.battery_mv = 2400);
    r.advertise_until_awake(LOCK_A101, "lock-a101");
    for id in ["b-1", "b-2"] {
        let res = r.command(
            id,
            "unlock",
            json!({"unit": "A-101"}),
            chrono::Duration::minutes(1),
        );
        assert_eq!(res.status, "done", "{res:?}");
    }
    let low = r.events("battery_low");
    assert_eq!(low.len(), 1, "{low:?}");
    assert_eq!(low[0]["battery_mv"], 2400);
}

#[test]
fn an_installers_offline_unlock_needs_no_cloud() {
    let r = rig();
    r.advertise_until_awake(LOCK_A101, "lock-a101");
    let m = r.manager.clone();
    let out =
        r.rt.block_on(async move { m.operate("lock-a101", UnitAction::Unlock, true).await });
    assert!(
        matches!(out, Execution::Done(ref d) if d.contains("offline")),
        "{out:?}"
    );
    // A device the site does not have.
    let m = r.manager.clone();
    let out =
        r.rt.block_on(async move { m.operate("lock-zz", UnitAction::Unlock, true).await });
    assert!(matches!(out, Execution::Failed(_)), "{out:?}");
}

#[test]
fn random_adverts_from_known_devices_never_panic_the_manager() {
    let r = rig();
    let cases: u64 = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000);
    let macs = [
        LOCK_A101,
        CONTROLLER_B201,
        SENSOR_PLAIN,
        SENSOR_ENCRYPTED,
        FOB_EVE,
    ];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..cases {
        let n = next();
        let len = (n % 40) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let name = match n % 4 {
            0 => Some(String::from_utf8_lossy(&bytes).into_owned()),
            1 => Some(format!(
                "NOKE{}",
                String::from_utf8_lossy(&bytes[..len.min(8)])
            )),
            2 => Some("FOB1F_C0FFEE0000E1".into()),
            _ => None,
        };
        let seen = gatehouse::ble::transport::Seen {
            mac: macs[(n >> 8) as usize % macs.len()].into(),
            name,
            rssi: Some(-((n >> 16) as i16 & 0x7F)),
            manufacturer: vec![((n >> 24) as u16, bytes.clone())],
            service_data: vec![(bthome::SERVICE_UUID.into(), bytes)],
        };
        r.manager.on_advert(&seen, Instant::now(), Utc::now());
    }
    let c = r.manager.counters();
    assert_eq!(c.adverts, cases);
    assert!(c.malformed > 0, "{c:?}");
    // Still working afterwards.
    r.advertise_until_awake(LOCK_A101, "lock-a101");
}

#[test]
fn a_controller_never_heard_since_start_is_reported_offline() {
    let r = rig();
    r.manager
        .check_availability(Instant::now() + Duration::from_secs(121));
    let off = wait_event(&r.store, 0, "device_offline", WAIT, |p| {
        p["device"] == "lock-b201"
    });
    assert!(off.payload["silent_s"].as_u64().unwrap() >= 120);
    // Sensors allow 900 s; padlocks and fobs are never offline for silence.
    let offline: Vec<String> = r
        .events("device_offline")
        .iter()
        .map(|p| p["device"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(offline, vec!["lock-b201"]);
    assert_eq!(r.manager.online("lock-b201"), Online::No);
}

#[test]
fn locate_writes_the_clouds_chirp_packets() {
    let r = rig();
    let chirp = packet(0xC1);
    r.radio.with_lock(LOCK_A101, |l| l.accepted = vec![chirp]);
    r.serve_cloud(move |req| {
        assert_eq!(req.action, "locate");
        UnlockResponse {
            request_id: req.request_id.clone(),
            commands: Some(noke::format_command_packets(&[chirp])),
            error: None,
        }
    });
    r.advertise_until_awake(LOCK_A101, "lock-a101");
    let res = r.command(
        "loc-1",
        "locate",
        json!({"unit": "A-101"}),
        chrono::Duration::minutes(1),
    );
    assert_eq!(res.status, "done", "{res:?}");
    assert!(
        res.detail
            .as_deref()
            .unwrap()
            .starts_with("located (online"),
        "{res:?}"
    );
    let written = r.radio.with_lock(LOCK_A101, |l| l.written.clone()).unwrap();
    assert_eq!(written, vec![chirp]);
}
