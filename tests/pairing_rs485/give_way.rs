//! A relay job on a Modbus bus being scanned (docs/rs485.md, *Pairing*): a probe waiting for
//! its first byte gives way to the job, and its unit is probed again, so back-to-back relay
//! commands all succeed while every unit of the sweep is still probed and the unconfigured
//! devices are still found and identified. Part of `pairing_rs485` (its harness).

use super::peers::*;
use super::*;
use gatehouse::cloud::commands::Execution;
use gatehouse::cloud::commands::RelayOp;
use std::sync::atomic::{AtomicBool, Ordering};

#[test]
fn relay_jobs_during_a_modbus_sweep_all_succeed_and_no_unit_is_skipped() {
    let s = site();
    let _pd = Peer::start(
        "osdp_pd.py",
        &s.link("osdp"),
        &["--pd".into(), format!("0:{KEY_A}:enforce:baud=9600")],
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
            "33:relay8".into(),
        ],
    );
    let scan = Arc::new(TestScan::default());
    let rs = s.start(&scan);
    let relays = rs.relays();

    // Relay commands back to back on the configured board for as long as the sweep runs.
    let sweeping = Arc::new(AtomicBool::new(true));
    let jobs = {
        let (relays, sweeping) = (relays.clone(), sweeping.clone());
        std::thread::spawn(move || {
            let mut outcomes = Vec::new();
            let mut on = true;
            while sweeping.load(Ordering::Relaxed) {
                let op = if on { RelayOp::On } else { RelayOp::Off };
                outcomes.push(relays.execute("relay-board-1", 2, op));
                on = !on;
            }
            outcomes
        })
    };
    scan.start(false, 1..=40);
    let t = scan.wait("modbus:io:7", SCAN_WAIT);
    let r = scan.wait("modbus:io:33", SCAN_WAIT);
    // The whole sweep: 39 units (unit 1 is configured), each probed to the end.
    eventually("the Modbus sweep's last unit", SCAN_WAIT, || {
        (scan.progress.lock().unwrap().get("modbus:io") == Some(&(39, 39))).then_some(())
    });
    sweeping.store(false, Ordering::Relaxed);
    let outcomes = jobs.join().unwrap();

    assert_eq!(t.identity["profiles"], json!(["xy-md02"]));
    assert_eq!(r.identity["registers"]["holding:0x4000"], 33);
    assert!(outcomes.len() >= 10, "{} relay commands", outcomes.len());
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| !matches!(o, Execution::Done(_)))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    // The board saw every switch, in order, ending with the last one sent.
    let last_on = outcomes.len() % 2 == 1;
    eventually("the last relay command on the board", WAIT, || {
        board
            .events()
            .iter()
            .rev()
            .find(|e| e["ev"] == "coil" && e["addr"] == 1 && e["index"] == 2)
            .is_some_and(|e| e["on"] == last_on)
            .then_some(())
    });
    let found = scan.found.lock().unwrap().clone();
    assert_eq!(
        found.keys().filter(|k| k.starts_with("modbus:")).count(),
        2,
        "{found:?}"
    );
    rs.stop(Duration::from_secs(2));
}
