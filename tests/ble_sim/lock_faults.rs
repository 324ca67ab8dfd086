//! Lock operations over the simulated transport, part of `tests/ble_sim.rs`: when results are
//! reached; cloud packets the lock refuses; locks that sleep while the cloud is asked; locks
//! whose clock is off.

use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};

use gatehouse::ble::config::BleConfig;
use gatehouse::ble::noke;
use gatehouse::ble::rpc::UnlockResponse;
use gatehouse::cloud::commands::{Online, handle_wake};

use crate::rig::*;

/// When the `n`-th request reached the cloud (after its command started: a result stamped at
/// the start would be earlier).
fn asked_before(asked: &Asked, n: usize) -> chrono::DateTime<Utc> {
    asked.lock().unwrap()[n].1
}

#[test]
fn a_results_at_is_when_it_was_reached_online_offline_and_woken() {
    let mut r = rig();
    let p1 = packet(0xB1);
    r.radio.with_lock(LOCK_A101, |l| l.accepted = vec![p1]);
    // The first request is answered with packets; later ones never (the cloud is silent).
    let first = std::sync::atomic::AtomicBool::new(true);
    let asked = r.serve_cloud_recording(move |req| {
        first
            .swap(false, std::sync::atomic::Ordering::SeqCst)
            .then(|| UnlockResponse {
                request_id: req.request_id.clone(),
                commands: Some(noke::format_command_packets(&[p1])),
                error: None,
            })
    });
    r.advertise_until_awake(LOCK_A101, "lock-a101");
    let online = r.command(
        "at-1",
        "unlock",
        json!({"unit": "A-101"}),
        chrono::Duration::minutes(1),
    );
    assert_eq!(online.status, "done", "{online:?}");
    assert!(
        online.detail.as_deref().unwrap().contains("online"),
        "{online:?}"
    );
    assert!(
        online.at >= asked_before(&asked, 0),
        "{online:?} stamped before the cloud was asked"
    );

    let offline = r.command(
        "at-2",
        "unlock",
        json!({"unit": "A-101"}),
        chrono::Duration::minutes(1),
    );
    assert_eq!(offline.status, "done", "{offline:?}");
    assert!(
        offline.detail.as_deref().unwrap().contains("offline"),
        "{offline:?}"
    );
    assert!(
        offline.at >= asked_before(&asked, 1),
        "{offline:?} stamped before the cloud was asked"
    );

    // Queued for the sleeping padlock, then woken: the final result is stamped when the
    // padlock took the unlock, after the cloud was asked in that run.
    let queued = r.command(
        "at-3",
        "unlock",
        json!({"unit": "A-102"}),
        chrono::Duration::minutes(1),
    );
    assert_eq!(queued.status, "queued", "{queued:?}");
    r.radio.with_lock(LOCK_A102, |l| l.asleep = false);
    r.radio.advertise_lock(LOCK_A102, -58);
    let woke = r.woken(LOCK_A102, "lock-a102");
    let out = handle_wake(&r.router, &r.store, &woke, Utc::now());
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].result.status, "done", "{:?}", out[0].result);
    assert!(
        out[0].result.at >= asked_before(&asked, 2),
        "{:?}",
        out[0].result
    );
    assert!(out[0].result.at >= queued.at);
}

#[test]
fn a_queued_command_that_expires_while_an_earlier_one_runs_is_expired() {
    let mut r = rig_with(
        BleConfig {
            online_unlock_timeout: Duration::from_secs(5),
            ..fast()
        },
        |_| {},
    );
    // Two commands wait for the sleeping padlock; the second expires in 3 s.
    let first = r.command(
        "ex-1",
        "unlock",
        json!({"unit": "A-102"}),
        chrono::Duration::minutes(1),
    );
    let second = r.command(
        "ex-2",
        "unlock",
        json!({"unit": "A-102"}),
        chrono::Duration::seconds(3),
    );
    assert_eq!(
        (first.status.as_str(), second.status.as_str()),
        ("queued", "queued")
    );
    let expires = second.at + chrono::Duration::seconds(3);
    // The cloud answers the first one only once the second has expired (with an error: the
    // offline unlock follows).
    let _asked = r.serve_cloud_recording(move |req| {
        while Utc::now() <= expires + chrono::Duration::milliseconds(100) {
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(UnlockResponse {
            request_id: req.request_id.clone(),
            commands: None,
            error: Some("busy".into()),
        })
    });
    r.radio.with_lock(LOCK_A102, |l| l.asleep = false);
    r.radio.advertise_lock(LOCK_A102, -58);
    let woke = r.woken(LOCK_A102, "lock-a102");
    let out = handle_wake(&r.router, &r.store, &woke, Utc::now());
    let statuses: Vec<_> = out
        .iter()
        .map(|o| (o.result.id.clone().unwrap(), o.result.status.clone()))
        .collect();
    assert_eq!(
        statuses,
        vec![
            ("ex-1".to_string(), "done".to_string()),
            ("ex-2".to_string(), "expired".to_string())
        ]
    );
    assert!(out[1].result.at > expires, "{:?}", out[1].result);
    assert!(out[1].result.at >= out[0].result.at);
    assert_eq!(
        r.radio.unlocks(LOCK_A102),
        1,
        "the expired one was not carried out"
    );
}

#[test]
fn a_cloud_list_the_lock_refuses_is_followed_by_the_offline_unlock() {
    let r = rig();
    // The lock refuses the cloud's packets (made for another key, say): 0x61 to the first.
    let (p1, p2) = (packet(0xD1), packet(0xD2));
    r.serve_cloud(move |req| UnlockResponse {
        request_id: req.request_id.clone(),
        commands: Some(noke::format_command_packets(&[p1, p2])),
        error: None,
    });
    r.advertise_until_awake(LOCK_A101, "lock-a101");
    let res = r.command(
        "rf-1",
        "unlock",
        json!({"unit": "A-101"}),
        chrono::Duration::minutes(1),
    );
    assert_eq!(res.status, "done", "{res:?}");
    let detail = res.detail.as_deref().unwrap();
    assert!(detail.starts_with("unlocked (offline"), "{res:?}");
    assert!(
        detail.contains("the lock refused the cloud's packets (invalid_key to packet 1 of 2)"),
        "{res:?}"
    );
    assert_eq!(r.radio.unlocks(LOCK_A101), 1);
    let written = r.radio.with_lock(LOCK_A101, |l| l.written.clone()).unwrap();
    assert_eq!(written.len(), 2, "the refused packet, then the offline one");
    assert_eq!(written[0], p1);
    let results: Vec<(String, String)> = r
        .events("lock_result")
        .iter()
        .map(|p| {
            (
                p["result"].as_str().unwrap().into(),
                p["via"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        results,
        vec![
            ("invalid_key".into(), "online".into()),
            ("success".into(), "offline".into())
        ]
    );

    // Both refused (the lock was re-keyed too): failed, saying what each answered.
    r.radio.with_lock(LOCK_A101, |l| l.offline_key = [0xEE; 16]);
    let res = r.command(
        "rf-2",
        "unlock",
        json!({"unit": "A-101"}),
        chrono::Duration::minutes(1),
    );
    assert_eq!(res.status, "failed", "{res:?}");
    let detail = res.detail.as_deref().unwrap();
    assert!(
        detail.contains("refused the cloud's packets (invalid_key to packet 1 of 2)"),
        "{res:?}"
    );
    assert!(
        detail.contains("offline unlock: the lock answered invalid_key"),
        "{res:?}"
    );

    // `locate` has no offline form: the lock's refusal is the result.
    let res = r.command(
        "rf-3",
        "locate",
        json!({"unit": "A-101"}),
        chrono::Duration::minutes(1),
    );
    assert_eq!(res.status, "failed", "{res:?}");
    assert!(
        res.detail.as_deref().unwrap().contains("invalid_key"),
        "{res:?}"
    );
    let after = r.radio.with_lock(LOCK_A101, |l| l.written.len()).unwrap();
    assert_eq!(
        after, 5,
        "rf-2: cloud packet + offline; rf-3: the cloud packet only"
    );
}

#[test]
fn a_padlock_that_sleeps_while_the_cloud_is_asked_queues_the_command() {
    let mut r = rig();
    // Nobody answers: without noticing the lock, the gateway would wait out the cloud.
    let asked = r.serve_cloud_recording(|_| None);
    for (id, shutdown) in [("zz-1", true), ("zz-2", false)] {
        r.advertise_until_awake(LOCK_A101, "lock-a101");
        let before = r.events("lock_result").len();
        // It goes to sleep right after the session read: with 0x64, or dropping the link.
        r.radio
            .with_lock(LOCK_A101, |l| l.falls_asleep = Some(shutdown));
        let res = r.command(
            id,
            "unlock",
            json!({"unit": "A-101"}),
            chrono::Duration::minutes(1),
        );
        assert_eq!(res.status, "queued", "{res:?}");
        assert_eq!(r.manager.online("lock-a101"), Online::Asleep);
        assert!(
            r.radio
                .with_lock(LOCK_A101, |l| l.written.is_empty())
                .unwrap()
        );
        let said: Vec<Value> = r.events("lock_result").split_off(before);
        if shutdown {
            assert_eq!(said.len(), 1, "{said:?}");
            assert_eq!(said[0]["result"], "shutdown");
            assert_eq!(said[0]["via"], "waiting", "{said:?}");
        } else {
            assert!(said.is_empty(), "{said:?}");
        }
        // It wakes: the command runs (the cloud is silent: the offline unlock).
        r.radio.with_lock(LOCK_A101, |l| l.asleep = false);
        r.radio.advertise_lock(LOCK_A101, -58);
        let woke = r.woken(LOCK_A101, "lock-a101");
        let out = handle_wake(&r.router, &r.store, &woke, Utc::now());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].result.status, "done", "{:?}", out[0].result);
        assert_eq!(out[0].result.id.as_deref(), Some(id));
        r.radio.with_lock(LOCK_A101, |l| l.written.clear());
    }
    assert_eq!(r.radio.unlocks(LOCK_A101), 2);
    assert_eq!(
        asked.lock().unwrap().len(),
        4,
        "asked before each sleep and after each wake"
    );
}

#[test]
fn an_offline_unlock_refused_for_the_locks_clock_says_so() {
    let r = rig();
    let _requests = r.rpc.take_requests().unwrap();
    r.advertise_until_awake(LOCK_A101, "lock-a101");
    // The site database's key opens the lock.
    let res = r.command(
        "ck-1",
        "unlock",
        json!({"unit": "A-101"}),
        chrono::Duration::minutes(1),
    );
    assert_eq!(res.status, "done", "{res:?}");
    // Its battery is changed: its clock restarts two hours behind.
    r.radio.with_lock(LOCK_A101, |l| l.clock_offset_s = -7200);
    let res = r.command(
        "ck-2",
        "unlock",
        json!({"unit": "A-101"}),
        chrono::Duration::minutes(1),
    );
    assert_eq!(res.status, "failed", "{res:?}");
    assert!(res.detail.as_deref().unwrap().contains("clock"), "{res:?}");
    let refused = r.events("lock_result").last().unwrap().clone();
    assert_eq!(refused["result"], "invalid_key");
    assert_eq!(refused["via"], "offline");
    assert_eq!(refused["clock_suspect"], true, "{refused}");
    assert_eq!(refused["key"], "site_database");
    assert_eq!(refused["lock_time"], "unknown");
    assert!(refused["packet_time"].is_string(), "{refused}");
    assert!(
        refused["key_worked_at"].is_string(),
        "the same key opened it before: {refused}"
    );
    // A lock re-keyed behind the site database's back: the key never worked on it, so nothing
    // tells the key from the clock.
    let other = rig();
    let _requests = other.rpc.take_requests().unwrap();
    other
        .radio
        .with_lock(LOCK_A101, |l| l.offline_key = [0xEE; 16]);
    other.advertise_until_awake(LOCK_A101, "lock-a101");
    let res = other.command(
        "ck-3",
        "unlock",
        json!({"unit": "A-101"}),
        chrono::Duration::minutes(1),
    );
    assert_eq!(res.status, "failed", "{res:?}");
    let refused = other.events("lock_result").last().unwrap().clone();
    assert_eq!(refused["clock_suspect"], true, "{refused}");
    assert!(refused["key_worked_at"].is_null(), "{refused}");
    // The cloud's packets refused are not a clock matter of the gateway's.
    let online = r.events("lock_result");
    assert!(
        online
            .iter()
            .filter(|p| p["via"] == "online")
            .all(|p| p.get("clock_suspect").is_none())
    );
}
