//! Buses with no devices in the configuration (docs/rs485.md, *A bus with no devices*): they
//! send nothing outside install mode and stay healthy; install mode finds their first device,
//! which is adopted, runs, survives a restart (from the registry) and, removed, leaves the bus
//! listening again. Part of `pairing_rs485` (its harness: `TestScan`, `Site`, the peers).

use super::peers::*;
use super::*;

/// The configuration's `[[bus]]` sections in `body` started on `engine`, with install mode
/// wired to `scan`.
fn start_buses(
    s: &Site,
    engine: &Arc<AccessEngine>,
    scan: &Arc<TestScan>,
    body: &str,
) -> Arc<Rs485> {
    let cfg = config(s.dir.path(), body);
    let rs = Arc::new(Rs485::start(&cfg.buses, engine.clone()).unwrap());
    rs.set_pairing(scan.clone(), Arc::new(Profiles::embedded()));
    rs
}

/// The bus's liveness beat has not gone stale (a health check would flag it).
fn beats(bus: &str) -> bool {
    let name = format!("bus {bus}");
    let live = gatehouse::liveness::global();
    live.names().contains(&name)
        && !live
            .stale(Duration::from_secs(1))
            .iter()
            .any(|s| s.name == name)
}

/// Bytes gatehouse wrote on the line (the far end of an empty bus's PTY), read and dropped.
fn drain(pty: &mut gatehouse::rs485::sim::Pty) -> usize {
    use serialport::SerialPort as _;
    use std::io::Read as _;
    let mut n = 0;
    let mut buf = [0u8; 512];
    while pty.master.bytes_to_read().unwrap() > 0 {
        n += pty.master.read(&mut buf).unwrap();
    }
    n
}

#[test]
fn an_empty_bus_sends_nothing_outside_install_mode_and_stays_healthy() {
    let s = site();
    let mut osdp = gatehouse::rs485::sim::Pty::open().unwrap();
    let mut modbus = gatehouse::rs485::sim::Pty::open().unwrap();
    let engine = Arc::new(AccessEngine::new(s.store.clone(), None));
    let scan = Arc::new(TestScan::default());
    let body = format!(
        "[[bus]]\nid = \"quiet-osdp\"\nport = \"{}\"\nprotocol = \"osdp\"\n\
         [[bus]]\nid = \"quiet-io\"\nport = \"{}\"\nprotocol = \"modbus\"\n",
        osdp.path.display(),
        modbus.path.display()
    );
    let rs = start_buses(&s, &engine, &scan, &body);
    eventually("both bus threads beating", WAIT, || {
        (beats("quiet-osdp") && beats("quiet-io")).then_some(())
    });
    // A window in which a bus with a device would have polled it dozens of times.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!((drain(&mut osdp), drain(&mut modbus)), (0, 0));
    assert!(beats("quiet-osdp") && beats("quiet-io"));
    assert_eq!(rs.shared().online_counts(), (0, 0));
    let h = engine.metrics().health();
    assert_eq!(h.buses.get("quiet-osdp"), Some(&(0, 0)), "{:?}", h.buses);
    assert_eq!(h.buses.get("quiet-io"), Some(&(0, 0)), "{:?}", h.buses);

    // Install mode: both buses probe (nobody answers).
    scan.start(false, 1..=247);
    eventually("probes on both lines", WAIT, || {
        let (o, m) = (drain(&mut osdp), drain(&mut modbus));
        (o > 0 && m > 0).then_some(())
    });
    eventually("OSDP progress", WAIT, || {
        scan.progress
            .lock()
            .unwrap()
            .get("osdp:quiet-osdp@9600")
            .copied()
    });
    assert!(beats("quiet-osdp") && beats("quiet-io"));
    // Over: quiet again once the probe in flight has ended.
    *scan.active.lock().unwrap() = None;
    eventually("the lines quiet", WAIT, || {
        drain(&mut osdp);
        drain(&mut modbus);
        std::thread::sleep(Duration::from_millis(300));
        (drain(&mut osdp) + drain(&mut modbus) == 0).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!((drain(&mut osdp), drain(&mut modbus)), (0, 0));
    assert!(scan.found.lock().unwrap().is_empty());
    let errors: Vec<_> = logged(&s.store)
        .into_iter()
        .filter(|e| ["bus_disconnected", "device_error"].contains(&e.kind.as_str()))
        .map(|e| e.payload)
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    rs.stop(Duration::from_secs(5));
}

#[test]
fn an_empty_osdp_bus_finds_adopts_and_runs_its_first_reader_across_a_restart() {
    let s = site();
    let mut pd = Peer::start(
        "osdp_pd.py",
        &s.link("entrance"),
        &["--pd".into(), "5:install".into()],
    );
    let board = Peer::start(
        "modbus_dev.py",
        &s.link("modbus"),
        &["--device".into(), "1:relay8".into()],
    );
    let engine = Arc::new(AccessEngine::new(s.store.clone(), None));
    let scan = Arc::new(TestScan::default());
    let body = format!(
        "[[bus]]\nid = \"entrance\"\nport = \"{}\"\nprotocol = \"osdp\"\n\
         [[bus]]\nid = \"io\"\nport = \"{}\"\nprotocol = \"modbus\"\ntimeout_ms = 300\n\
         [[bus.device]]\nid = \"relay-board-1\"\nprofile = \"waveshare-relay-8ch\"\naddress = 1\n\
         poll_interval_ms = 200\n",
        s.link("entrance").display(),
        s.link("modbus").display()
    );
    let entrance = |rs: &Rs485| match rs.running_config("entrance").unwrap().kind {
        BusKind::Osdp(r) => r.into_iter().map(|r| (r.id, r.address)).collect::<Vec<_>>(),
        _ => panic!("not osdp"),
    };
    let rs = start_buses(&s, &engine, &scan, &body);
    wait_event(&s.store, 0, "device_online", WAIT, |p| {
        p["device"] == "relay-board-1"
    });
    assert!(entrance(&rs).is_empty());

    // Found by install mode at every address of the empty bus, at the bus's rate.
    scan.start(false, 1..=1);
    let c = scan.wait("osdp:entrance:5", SCAN_WAIT);
    assert_eq!((c.address, c.baud), (Some(5), Some(9600)));
    assert_eq!(c.identity["pdid"]["serial"], "47480005");
    assert!(
        c.identity["pdcap"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    );
    let progress = scan.progress.lock().unwrap().clone();
    assert_eq!(progress.get("osdp:entrance@9600").map(|p| p.1), Some(127));
    *scan.active.lock().unwrap() = None;

    // Adopted: KEYSET over the install path, then LibOSDP runs it; a code on it is decided.
    let prov = Rs485Provisioner::new(rs.clone(), Arc::new(Profiles::embedded()));
    let spec: AdoptSpec = serde_json::from_value(
        json!({"candidate": c.id, "device": "keypad-entrance", "entry": "gate-1"}),
    )
    .unwrap();
    let reg = rt().block_on(prov.adopt(&c, &spec)).unwrap();
    assert_eq!(reg.bus.as_deref(), Some("entrance"));
    pd.wait_for("KEYSET", WAIT, |e| e["ev"] == "keyset" && e["pd"] == 5);
    wait_event(&s.store, 0, "reader_paired", WAIT, |p| {
        p["device"] == "keypad-entrance"
    });
    prov.run(std::slice::from_ref(&reg)).unwrap();
    assert_eq!(entrance(&rs), vec![("keypad-entrance".to_string(), 5)]);
    online_again(&s, "keypad-entrance", 0);
    code_opens_the_gate(&s, &mut pd, 5, &board, "keypad-entrance");
    assert_eq!(rs.shared().online_counts(), (2, 2));
    assert_eq!(
        engine.metrics().health().buses.get("entrance"),
        Some(&(1, 1))
    );

    // A restart: the configuration's bus is empty; the registry puts the reader back on it.
    rs.stop(Duration::from_secs(5));
    let seq = last_seq(&s.store);
    let rs = start_buses(&s, &engine, &scan, &body);
    let prov = Rs485Provisioner::new(rs.clone(), Arc::new(Profiles::embedded()));
    prov.run(std::slice::from_ref(&reg)).unwrap();
    assert_eq!(entrance(&rs), vec![("keypad-entrance".to_string(), 5)]);
    wait_event(&s.store, seq, "device_online", WAIT, |p| {
        p["device"] == "keypad-entrance"
    });
    code_opens_the_gate(&s, &mut pd, 5, &board, "keypad-entrance");

    // Its removal (the last adopted device): the bus only listens again; the reader, no longer
    // polled, sees the line fall silent (LibOSDP's 8 s without a frame).
    let seq = last_seq(&s.store);
    let p0 = pd.len();
    prov.run(&[]).unwrap();
    assert!(entrance(&rs).is_empty());
    wait_event(&s.store, seq, "device_offline", WAIT, |p| {
        p["device"] == "keypad-entrance"
    });
    eventually("the reader no longer polled", WAIT, || {
        (pd.count_since(p0, |e| {
            e["ev"] == "online" && e["pd"] == 5 && e["online"] == false
        }) > 0)
            .then_some(())
    });
    assert_eq!(rs.shared().online_counts(), (1, 1));
    assert_eq!(
        engine.metrics().health().buses.get("entrance"),
        Some(&(0, 0))
    );
    assert!(beats("entrance"));
    rs.stop(Duration::from_secs(5));
}

#[test]
fn an_empty_modbus_bus_finds_adopts_and_polls_its_first_board_across_a_restart() {
    let s = site();
    let mut board = Peer::start(
        "modbus_dev.py",
        &s.link("modbus"),
        &["--device".into(), "12:relay8d".into()],
    );
    let engine = Arc::new(AccessEngine::new(s.store.clone(), None));
    let scan = Arc::new(TestScan::default());
    let body = format!(
        "[[bus]]\nid = \"io\"\nport = \"{}\"\nprotocol = \"modbus\"\ntimeout_ms = 300\n",
        s.link("modbus").display()
    );
    let rs = start_buses(&s, &engine, &scan, &body);
    assert!(devices_of(&rs).is_empty());
    scan.start(false, 10..=14);
    let c = scan.wait("modbus:io:12", SCAN_WAIT);
    let profiles = c.identity["profiles"].as_array().unwrap().clone();
    assert!(
        profiles.contains(&json!("waveshare-relay-8ch-d")),
        "{profiles:?}"
    );
    *scan.active.lock().unwrap() = None;

    let prov = Rs485Provisioner::new(rs.clone(), Arc::new(Profiles::embedded()));
    let spec: AdoptSpec = serde_json::from_value(json!({
        "candidate": c.id, "device": "board-1", "profile": "waveshare-relay-8ch-d",
        "inputs": [{"channel": 3, "role": "motion"}]
    }))
    .unwrap();
    let reg = rt().block_on(prov.adopt(&c, &spec)).unwrap();
    assert_eq!(reg.settings["address"], 12);
    prov.run(std::slice::from_ref(&reg)).unwrap();
    assert_eq!(devices_of(&rs), vec![("board-1".to_string(), 12)]);
    wait_event(&s.store, 0, "device_online", WAIT, |p| {
        p["device"] == "board-1"
    });
    board.send(json!({"op": "input", "addr": 12, "index": 3, "on": true}));
    wait_event(&s.store, 0, "motion", WAIT, |p| p["device"] == "board-1");
    assert_eq!(engine.metrics().health().buses.get("io"), Some(&(1, 1)));

    // A restart: back on the bus from the registry, and polled.
    rs.stop(Duration::from_secs(5));
    let seq = last_seq(&s.store);
    let rs = start_buses(&s, &engine, &scan, &body);
    let prov = Rs485Provisioner::new(rs.clone(), Arc::new(Profiles::embedded()));
    prov.run(std::slice::from_ref(&reg)).unwrap();
    wait_event(&s.store, seq, "device_online", WAIT, |p| {
        p["device"] == "board-1"
    });
    // Its motion input is still on: the first poll reports it.
    wait_event(&s.store, seq, "motion", WAIT, |p| p["device"] == "board-1");

    // Removed: the bus only listens again, and counts nothing.
    let seq = last_seq(&s.store);
    prov.run(&[]).unwrap();
    assert!(devices_of(&rs).is_empty());
    wait_event(&s.store, seq, "device_offline", WAIT, |p| {
        p["device"] == "board-1"
    });
    assert_eq!(rs.shared().online_counts(), (0, 0));
    assert_eq!(engine.metrics().health().buses.get("io"), Some(&(0, 0)));
    rs.stop(Duration::from_secs(5));
}
