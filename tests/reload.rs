//! Configuration reload against real parts: Modbus buses added, restarted and removed while
//! pymodbus devices (`tests/peers/modbus_dev.py`, separate processes on PTYs) answer, the other
//! bus polling throughout; an invalid file refused with nothing changed and decisions going on
//! (in process, through `Reloader`). Then the daemon itself (`gatehouse run`): SIGHUP changes
//! the log level and format live, an invalid file is refused without quoting it, a piped log
//! has no ANSI escape, JSON log lines parse and carry fields; a `[cloud]` change reconnects the
//! link to a real mosquitto with a new session.

#[path = "support/broker.rs"]
mod broker;
mod common;
#[path = "support/peers.rs"]
mod peers;

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gatehouse::access::{AccessEngine, Attempt};
use gatehouse::cloud::commands::{Execution, NoDevices, Online, RelayOp};
use gatehouse::policy::{Direction, Presented, Request, Target};
use gatehouse::reload::{Outcome, Reloader};
use gatehouse::rs485::Rs485;
use peers::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn modbus_bus(id: &str, link: &Path, device: &str, poll_ms: u64) -> String {
    format!(
        r#"
[[bus]]
id = "{id}"
port = "{}"
protocol = "modbus"
timeout_ms = 500
[[bus.device]]
id = "{device}"
profile = "xy-md02"
address = 4
poll_interval_ms = {poll_ms}
"#,
        link.display()
    )
}

fn climate(link: &Path) -> Peer {
    Peer::start(
        "modbus_dev.py",
        link,
        &["--device", "4:xymd02"].map(String::from),
    )
}

/// Sets the peer's temperature and waits for the reading, recorded after `after`.
fn reading(
    store: &gatehouse::store::Store,
    peer: &mut Peer,
    device: &str,
    celsius: f64,
    after: u64,
) {
    peer.send(serde_json::json!({"op": "temp", "addr": 4, "celsius": celsius}));
    wait_event(store, after, "sensor_reading", WAIT, |p| {
        p["device"] == device && p["reading"] == "temperature" && p["value"] == celsius
    });
}

fn last_seq(store: &gatehouse::store::Store) -> u64 {
    logged(store).last().map_or(0, |e| e.seq)
}

fn granted(engine: &AccessEngine) -> bool {
    let attempt = Attempt {
        request: Request {
            credential: Presented::Code("123456"),
            target: Target::Entry("gate-1"),
            direction: Direction::In,
        },
        device: Some("keypad-gate-1"),
    };
    engine.check(&attempt, chrono::Utc::now()).unwrap().granted
}

#[test]
fn buses_are_added_restarted_and_removed_live_and_a_bad_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = demo_store(dir.path());
    let (link_a, link_b) = (dir.path().join("modbus-a"), dir.path().join("modbus-b"));
    let mut a = climate(&link_a);
    let mut b = climate(&link_b);
    let bus_a = modbus_bus("a", &link_a, "climate-a", 100);
    let cfg = config(dir.path(), &bus_a);
    let engine = Arc::new(AccessEngine::new(store.clone(), None));
    let rs485 = Arc::new(Rs485::start(&cfg.buses, engine.clone()).unwrap());
    let relays = rs485.relays();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tracker = tokio_util::task::TaskTracker::new();
    let link_stop = tokio_util::sync::CancellationToken::new();
    let supervisor = Arc::new(gatehouse::cloud::supervisor::LinkSupervisor::new(
        gatehouse::cloud::supervisor::LinkParts {
            site: cfg.site_id.clone(),
            gateway: cfg.gateway_id.clone(),
            store: store.clone(),
            states: Arc::new(gatehouse::devstate::DeviceStates::new()),
            units: Arc::new(NoDevices),
            relays: relays.clone(),
            devices: None,
            metrics: engine.metrics().clone(),
            drain: Duration::from_secs(1),
            pairing: None,
            alerts: None,
        },
        link_stop,
        tracker,
    ));
    let reloader = Reloader::new(cfg, store.clone(), None, rs485.clone(), supervisor);
    let mut outcomes = reloader.outcomes();
    wait_event(&store, 0, "device_online", WAIT, |p| {
        p["device"] == "climate-a"
    });
    reading(&store, &mut a, "climate-a", 23.0, 0);

    // Bus b added: its device is polled, its readings start; bus a untouched.
    let write = |body: &str| {
        config(dir.path(), body);
    };
    write(&format!(
        "{bus_a}{}",
        modbus_bus("b", &link_b, "climate-b", 100)
    ));
    let from = last_seq(&store);
    let out = rt.block_on(reloader.reload());
    assert_eq!(
        out,
        Outcome::Reloaded {
            changed: vec!["bus".into()],
            restart_needed: vec![]
        }
    );
    assert!(outcomes.has_changed().unwrap());
    assert_eq!(*outcomes.borrow_and_update(), Some(out));
    let r = wait_event(&store, from, "config_reloaded", WAIT, |_| true);
    assert_eq!(r.payload["buses"]["added"], serde_json::json!(["b"]));
    wait_event(&store, from, "device_online", WAIT, |p| {
        p["device"] == "climate-b"
    });
    reading(&store, &mut b, "climate-b", 23.0, from);
    assert_eq!(rs485.bus_ids(), vec!["a", "b"]);

    // Bus b changed (its poll interval): only b restarts; a keeps polling all along (no
    // device_offline for it, and its next reading arrives).
    write(&format!(
        "{bus_a}{}",
        modbus_bus("b", &link_b, "climate-b", 150)
    ));
    let from = last_seq(&store);
    rt.block_on(reloader.reload());
    let r = wait_event(&store, from, "config_reloaded", WAIT, |_| true);
    assert_eq!(r.payload["buses"]["restarted"], serde_json::json!(["b"]));
    assert_eq!(r.payload["buses"]["added"], serde_json::json!([]));
    reading(&store, &mut b, "climate-b", 25.0, from);
    reading(&store, &mut a, "climate-a", 25.0, from);
    assert!(
        !logged(&store).iter().any(|e| e.seq > from
            && e.kind == "device_offline"
            && e.payload["device"] == "climate-a"),
        "bus a was not touched"
    );

    // Bus b removed: its device goes offline (said why), nothing polls it any more, while a
    // still does.
    write(&bus_a);
    let from = last_seq(&store);
    rt.block_on(reloader.reload());
    let r = wait_event(&store, from, "config_reloaded", WAIT, |_| true);
    assert_eq!(r.payload["buses"]["removed"], serde_json::json!(["b"]));
    let off = wait_event(&store, from, "device_offline", WAIT, |p| {
        p["device"] == "climate-b"
    });
    assert!(off.payload["detail"].as_str().unwrap().contains("reload"));
    assert_eq!(relays.online("climate-b"), Online::Unknown);
    let after_removal = last_seq(&store);
    b.send(serde_json::json!({"op": "temp", "addr": 4, "celsius": 30.0}));
    b.wait_for("temp set", WAIT, |e| e["ev"] == "ack" && e["op"] == "temp");
    // Two of a's readings after b's change: b's poll interval passed many times over.
    reading(&store, &mut a, "climate-a", 27.0, after_removal);
    reading(&store, &mut a, "climate-a", 29.0, after_removal);
    assert!(
        !logged(&store)
            .iter()
            .any(|e| e.seq > after_removal && e.payload["device"] == "climate-b"),
        "a removed bus polls nothing"
    );
    assert_eq!(rs485.bus_ids(), vec!["a"]);

    // An invalid file (a new bus, and a level that looks like a code): refused,
    // nothing changes, and decisions go on.
    std::fs::write(
        dir.path().join("gatehouse.toml"),
        format!(
            "[site]\nid = \"test-site\"\ngateway_id = \"gw\"\n[storage]\ndata_dir = \"data\"\n\
             {bus_a}{}[log]\nlevel = \"4821937\"\n",
            modbus_bus("c", &link_b, "climate-c", 100)
        ),
    )
    .unwrap();
    let from = last_seq(&store);
    let out = rt.block_on(reloader.reload());
    let Outcome::Refused { reason } = &out else {
        panic!("{out:?}")
    };
    assert!(
        reason.contains("log.level") && !reason.contains("4821937"),
        "{reason}"
    );
    let refused = wait_event(&store, from, "config_reload_refused", WAIT, |_| true);
    assert_eq!(refused.payload["reason"], reason.as_str());
    assert_eq!(rs485.bus_ids(), vec!["a"]);
    assert!(granted(&engine));
    reading(&store, &mut a, "climate-a", 31.0, from);

    // A change of identity is refused too: it needs a restart.
    std::fs::write(
        dir.path().join("gatehouse.toml"),
        format!("[site]\nid = \"other-site\"\ngateway_id = \"gw\"\n[storage]\ndata_dir = \"data\"\n{bus_a}"),
    )
    .unwrap();
    let out = rt.block_on(reloader.reload());
    assert!(
        matches!(&out, Outcome::Refused { reason } if reason.contains("site.id")),
        "{out:?}"
    );
    assert_eq!(reloader.current().site_id, "test-site");
    rs485.stop(Duration::from_secs(5));
}

/// A `Reloader` over `rs485` with a cloud link supervisor that has no `[cloud]` to run.
fn reloader(
    cfg: gatehouse::config::Config,
    store: &Arc<gatehouse::store::Store>,
    engine: &AccessEngine,
    rs485: &Arc<Rs485>,
) -> Reloader {
    let supervisor = Arc::new(gatehouse::cloud::supervisor::LinkSupervisor::new(
        gatehouse::cloud::supervisor::LinkParts {
            site: cfg.site_id.clone(),
            gateway: cfg.gateway_id.clone(),
            store: store.clone(),
            states: Arc::new(gatehouse::devstate::DeviceStates::new()),
            units: Arc::new(NoDevices),
            relays: rs485.relays(),
            devices: None,
            metrics: engine.metrics().clone(),
            drain: Duration::from_secs(1),
            pairing: None,
            alerts: None,
        },
        tokio_util::sync::CancellationToken::new(),
        tokio_util::task::TaskTracker::new(),
    ));
    Reloader::new(cfg, store.clone(), None, rs485.clone(), supervisor)
}

/// Issue 11, bad input: a reload that removes the bus a relay job is pending on. A software-
/// timed pulse (the I/O board has no board-timed one) is running on a real pymodbus board when
/// its bus is removed: the pulse is ended (the coil really goes off), a `device_error` says it
/// was cut short and why, a command for the device now fails with a clear reason, and the
/// daemon goes on deciding access with its other bus still polling.
#[test]
fn a_reload_that_removes_the_bus_of_a_running_pulse_ends_it_says_why_and_decisions_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = demo_store(dir.path());
    let (link_io, link_a) = (dir.path().join("modbus-io"), dir.path().join("modbus-a"));
    let board = Peer::start(
        "modbus_dev.py",
        &link_io,
        &["--device", "1:io8"].map(String::from),
    );
    let mut a = climate(&link_a);
    let bus_a = modbus_bus("a", &link_a, "climate-a", 100);
    let bus_io = format!(
        r#"
[[bus]]
id = "io"
port = "{}"
protocol = "modbus"
timeout_ms = 500
[[bus.device]]
id = "door-io"
profile = "waveshare-io-8ch"
address = 1
"#,
        link_io.display()
    );
    let cfg = config(dir.path(), &format!("{bus_a}{bus_io}"));
    let engine = Arc::new(AccessEngine::new(store.clone(), None));
    let rs485 = Arc::new(Rs485::start(&cfg.buses, engine.clone()).unwrap());
    let relays = rs485.relays();
    let reloader = reloader(cfg, &store, &engine, &rs485);
    let rt = tokio::runtime::Runtime::new().unwrap();
    wait_event(&store, 0, "device_online", WAIT, |p| {
        p["device"] == "door-io"
    });

    // A ten-minute pulse, timed by gatehouse: the coil is on, its end pending on the bus.
    let done = relays.execute("door-io", 3, RelayOp::Pulse { ms: 600_000 });
    assert!(
        matches!(&done, Execution::Done(d) if d.contains("pulsed")),
        "{done:?}"
    );
    board.wait_for("coil 3 on", WAIT, |e| {
        e["ev"] == "coil" && e["index"] == 3 && e["on"] == true
    });

    // The bus is removed by a reload.
    config(dir.path(), &bus_a);
    let from = last_seq(&store);
    let out = rt.block_on(reloader.reload());
    assert!(matches!(out, Outcome::Reloaded { .. }), "{out:?}");
    let r = wait_event(&store, from, "config_reloaded", WAIT, |_| true);
    assert_eq!(r.payload["buses"]["removed"], serde_json::json!(["io"]));

    // The pulse ended at once, not ten minutes later, and the log says so and why.
    board.wait_for("coil 3 off", WAIT, |e| {
        e["ev"] == "coil" && e["index"] == 3 && e["on"] == false
    });
    let cut = wait_event(&store, from, "device_error", WAIT, |p| {
        p["device"] == "door-io"
    });
    let msg = cut.payload["error"].as_str().unwrap();
    assert!(
        msg.contains("relay 3") && msg.contains("early") && msg.contains("reload"),
        "{msg}"
    );
    let off = wait_event(&store, from, "device_offline", WAIT, |p| {
        p["device"] == "door-io"
    });
    assert!(off.payload["detail"].as_str().unwrap().contains("reload"));

    // A command for the removed device fails, saying why; nothing reaches the board.
    let writes = board.count_since(0, |e| e["ev"] == "write");
    match relays.execute("door-io", 3, RelayOp::On) {
        Execution::Failed(why) => assert!(why.contains("not on any bus"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(relays.online("door-io"), Online::Unknown);
    assert_eq!(board.count_since(0, |e| e["ev"] == "write"), writes);

    // Decisions go on, and so does the other bus.
    assert!(granted(&engine));
    reading(&store, &mut a, "climate-a", 26.0, from);
    assert_eq!(rs485.bus_ids(), vec!["a"]);
    rs485.stop(Duration::from_secs(5));
}

/// Collects a child's stderr lines.
fn collect(child: &mut std::process::Child) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let err = child.stderr.take().unwrap();
    let l = lines.clone();
    std::thread::spawn(move || {
        let mut r = BufReader::new(err);
        let mut buf = Vec::new();
        while r.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
            l.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf).into_owned());
            buf.clear();
        }
    });
    lines
}

/// Waits for a line containing `what`, returns its index.
fn wait_line(lines: &Mutex<Vec<String>>, what: &str, from: usize) -> usize {
    let end = Instant::now() + WAIT;
    loop {
        {
            let l = lines.lock().unwrap();
            if let Some(i) = (from..l.len()).find(|&i| l[i].contains(what)) {
                return i;
            }
            assert!(
                Instant::now() < end,
                "no log line with `{what}` after line {from}:\n{}",
                l.join("")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn hup(pid: u32) {
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

#[test]
fn sighup_changes_log_level_and_format_and_refuses_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    drop(demo_store(dir.path()));
    let base = "[site]\nid = \"test-site\"\ngateway_id = \"gw\"\n[storage]\ndata_dir = \"data\"\n";
    let cfg = dir.path().join("gatehouse.toml");
    // Written whole, then renamed over the file: a reload never reads half a file (as an
    // editor or a configuration manager replaces it).
    let write = |log: &str| {
        let tmp = dir.path().join("gatehouse.toml.new");
        std::fs::write(&tmp, format!("{base}[log]\n{log}")).unwrap();
        std::fs::rename(&tmp, &cfg).unwrap();
    };
    write("level = \"info\"\nformat = \"json\"\n");
    let mut child = Command::new(common::gatehouse_bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let lines = collect(&mut child);
    let started = wait_line(&lines, "waiting for SIGTERM", 0);
    // JSON lines: each parses, with its fields.
    {
        let l = lines.lock().unwrap();
        for line in &l[..=started] {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert!(
                v["level"].is_string() && v["fields"]["message"].is_string(),
                "{line}"
            );
        }
        let open = l
            .iter()
            .find(|x| x.contains("site database open"))
            .expect("the database-open line");
        let v: Value = serde_json::from_str(open).unwrap();
        assert_eq!(v["fields"]["site"], "test-site");
        assert_eq!(v["fields"]["version"], 1);
    }

    // Level warn, and a setting that needs a restart: its warning (written at warn, after the
    // level changed) says the reload is done; the reload's own info lines are not written.
    write("level = \"warn\"\nformat = \"json\"\n[shutdown]\ndrain_timeout_secs = 5\n");
    hup(pid);
    let first = wait_line(&lines, "applied at the next restart", started);
    // An invalid file: refused (an error, written at warn), the secret-looking value not quoted.
    write("level = \"4821937\"\nformat = \"json\"\n");
    hup(pid);
    let refused = wait_line(&lines, "configuration reload refused", first);
    {
        let l = lines.lock().unwrap();
        let v: Value = serde_json::from_str(&l[first]).unwrap();
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["fields"]["setting"], "shutdown.drain_timeout_secs");
        let v: Value = serde_json::from_str(&l[refused]).unwrap();
        assert_eq!(v["level"], "ERROR");
        let reason = v["fields"]["reason"].as_str().unwrap();
        assert!(reason.contains("log.level"), "{reason}");
        // At level warn, info lines are not written: neither the first reload's
        // "configuration reloaded" nor the second "SIGHUP received".
        let since = &l[started + 1..];
        assert!(
            since.iter().all(|x| !x.contains("configuration reloaded")),
            "info written at level warn: {since:?}"
        );
        assert_eq!(
            since
                .iter()
                .filter(|x| x.contains("SIGHUP received"))
                .count(),
            1,
            "{since:?}"
        );
        assert!(l.iter().all(|x| !x.contains("4821937")));
    }
    // Back to info, as text: text lines, no escape code in a pipe.
    let before = lines.lock().unwrap().len();
    write("level = \"info\"\nformat = \"text\"\n[shutdown]\ndrain_timeout_secs = 5\n");
    hup(pid);
    let reloaded = wait_line(&lines, "configuration reloaded", before);
    {
        let l = lines.lock().unwrap();
        assert!(
            serde_json::from_str::<Value>(&l[reloaded]).is_err(),
            "text: {}",
            l[reloaded]
        );
        assert!(l[reloaded].contains("INFO"), "{}", l[reloaded]);
    }
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let end = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "the daemon did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    wait_line(&lines, "stopped cleanly", 0);
    let l = lines.lock().unwrap();
    assert!(
        l.iter().all(|x| !x.contains('\u{1b}')),
        "an escape code in a piped log"
    );
    drop(l);
    // What the reloads recorded.
    let store = gatehouse::store::Store::open(&dir.path().join("data"), 100_000).unwrap();
    let ev = logged(&store);
    let kinds: Vec<(&str, &Value)> = ev
        .iter()
        .filter(|e| e.kind.starts_with("config_"))
        .map(|e| (e.kind.as_str(), &e.payload))
        .collect();
    assert_eq!(kinds.len(), 3, "{kinds:?}");
    assert_eq!(kinds[0].0, "config_reloaded");
    assert_eq!(kinds[0].1["changed"], serde_json::json!(["log.level"]));
    assert_eq!(
        kinds[0].1["restart_needed"],
        serde_json::json!(["shutdown.drain_timeout_secs"])
    );
    assert_eq!(kinds[1].0, "config_reload_refused");
    assert!(!kinds[1].1.to_string().contains("4821937"));
    assert_eq!(kinds[2].0, "config_reloaded");
    assert_eq!(
        kinds[2].1["changed"],
        serde_json::json!(["log.level", "log.format"])
    );
}

/// Kills the daemon if a test fails before stopping it.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cloud_change_reconnects_the_link_with_a_new_session() {
    use crate::broker::{Broker, Subscriber};
    let b = Broker::start();
    let t = gatehouse::cloud::messages::Topics::new("gatehouse", "site-1", "gw-1");
    let sub = Subscriber::connect(&b, "cloud", &format!("{}/#", t.base())).await;
    let dir = tempfile::tempdir().unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
    let extra = format!(
        "[access]\ninitial_snapshot = \"{}\"\n",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config/demo-snapshot.json")
            .display()
    );
    let cfg = b.write_gateway_config(dir.path(), "data", &key, "reconnect_min_ms = 200\n", &extra);
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let daemon = Daemon(
        Command::new(common::gatehouse_bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let status = t.status();
    let online = |m: &crate::broker::Received| m.topic == status && m.json()["online"] == true;
    let first = sub.wait_for(|m| m.iter().any(online), WAIT).await;
    let session = first.iter().find(|m| online(m)).unwrap().json()["session"]
        .as_u64()
        .unwrap();

    // Another reconnection setting: the link stops (offline status, same session) and a new
    // one connects with a new session; the reload is recorded and published.
    b.write_gateway_config(dir.path(), "data", &key, "reconnect_min_ms = 300\n", &extra);
    hup(daemon.0.id());
    let events = t.events();
    let msgs = sub
        .wait_for(
            |m| {
                m.iter().any(|m| {
                    m.topic == events
                        && m.json()["kind"] == "config_reloaded"
                        && m.json()["payload"]["changed"] == serde_json::json!(["cloud"])
                })
            },
            WAIT,
        )
        .await;
    let statuses: Vec<Value> = msgs
        .iter()
        .filter(|m| m.topic == status)
        .map(|m| m.json())
        .collect();
    let offline = statuses
        .iter()
        .position(|s| s["online"] == false && s["session"] == session)
        .unwrap_or_else(|| panic!("the old link said goodbye: {statuses:?}"));
    assert!(
        statuses[offline..]
            .iter()
            .any(|s| s["online"] == true && s["session"].as_u64().unwrap() > session),
        "a new session came online: {statuses:?}"
    );
    drop(daemon);
}
