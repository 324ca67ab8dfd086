//! systemd supervision (docs/operations.md *Supervision*): the test plays systemd with a real
//! datagram socket as `$NOTIFY_SOCKET` and a `$WATCHDOG_USEC`, and runs the real daemon binary
//! with an OSDP keypad (LibOSDP PD) and a Modbus relay board (pymodbus) on PTYs and a real
//! mosquitto with mutual TLS: `READY=1` once everything runs, a `STATUS=` line that says what a
//! person needs (site version, cloud, outbox, devices), `WATCHDOG=1` every half of the watchdog
//! timeout while healthy and none once a bus thread is stuck (`GATEHOUSE_STALL` test hook),
//! `STOPPING=1` on SIGTERM; a notify socket nobody listens on leaves the daemon deciding access.

#[path = "support/broker.rs"]
mod broker;
mod common;
#[path = "support/peers.rs"]
mod peers;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker::{Broker, Subscriber};
use ed25519_dalek::SigningKey;
use gatehouse::cloud::messages::Topics;
use peers::Peer;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
/// The watchdog timeout the test gives the daemon: pings are due every second.
const WATCHDOG_USEC: u64 = 2_000_000;

/// One datagram the daemon sent, with when it arrived.
#[derive(Debug, Clone)]
struct Note {
    at: Instant,
    fields: Vec<(String, String)>,
}

impl Note {
    fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The service manager's side: a bound datagram socket, read by a thread.
struct Systemd {
    path: PathBuf,
    notes: Arc<Mutex<Vec<Note>>>,
}

impl Systemd {
    fn listen(dir: &Path) -> Systemd {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let notes: Arc<Mutex<Vec<Note>>> = Arc::default();
        let n = notes.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok(len) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                let fields = text
                    .lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                n.lock().unwrap().push(Note {
                    at: Instant::now(),
                    fields,
                });
            }
        });
        Systemd { path, notes }
    }

    fn notes(&self) -> Vec<Note> {
        self.notes.lock().unwrap().clone()
    }

    /// Waits for a note that `pred` accepts; returns its index.
    fn wait_for(&self, what: &str, pred: impl Fn(&Note) -> bool) -> usize {
        let end = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.notes().iter().position(&pred) {
                return i;
            }
            assert!(
                Instant::now() < end,
                "no {what} within {WAIT:?}; notes: {:#?}",
                self.notes()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pings_after(&self, i: usize) -> Vec<Instant> {
        self.notes()[i..]
            .iter()
            .filter(|n| n.get("WATCHDOG") == Some("1"))
            .map(|n| n.at)
            .collect()
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    fn terminate(&mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let end = Instant::now() + WAIT;
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < end,
                "the daemon did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A site: the demo snapshot, a keypad (`keypad-plain`, OSDP address 3, plain text) on bus
/// `readers` and the gate's relay board (`relay-board-1`) on bus `io`, a broker.
struct Rig {
    dir: tempfile::TempDir,
    keypad: Peer,
    _board: Peer,
    broker: Broker,
    cfg: PathBuf,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let osdp = dir.path().join("osdp");
    let modbus = dir.path().join("modbus");
    let keypad = Peer::start("osdp_pd.py", &osdp, &["--pd".into(), "3:nosc".into()]);
    let board = Peer::start(
        "modbus_dev.py",
        &modbus,
        &["--device".into(), "1:relay8".into()],
    );
    let broker = Broker::start();
    let extra = format!(
        r#"
[access]
initial_snapshot = "{snapshot}"
[[bus]]
id = "readers"
port = "{osdp}"
protocol = "osdp"
[[bus.reader]]
id = "keypad-plain"
address = 3
entry = "gate-1"
secure = "none"
[[bus]]
id = "io"
port = "{modbus}"
protocol = "modbus"
timeout_ms = 500
[[bus.device]]
id = "relay-board-1"
profile = "waveshare-relay-8ch"
address = 1
poll_interval_ms = 200
"#,
        snapshot = concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo-snapshot.json"),
        osdp = osdp.display(),
        modbus = modbus.display(),
    );
    let key = SigningKey::from_bytes(&[9; 32]).verifying_key();
    let cfg = broker.write_gateway_config(dir.path(), "data", &key, "", &extra);
    Rig {
        dir,
        keypad,
        _board: board,
        broker,
        cfg,
    }
}

impl Rig {
    fn daemon(&self, notify_socket: &Path, envs: &[(&str, &str)]) -> Daemon {
        let log = std::fs::File::create(self.dir.path().join("daemon.log")).unwrap();
        let mut cmd = Command::new(common::gatehouse_bin());
        cmd.args(["run", "--config", self.cfg.to_str().unwrap()])
            .env("NOTIFY_SOCKET", notify_socket)
            .env("WATCHDOG_USEC", WATCHDOG_USEC.to_string())
            .env_remove("WATCHDOG_PID")
            .env("RUST_LOG", "gatehouse=info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Daemon(cmd.spawn().unwrap())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }
}

fn status_with(text: &'static str) -> impl Fn(&Note) -> bool {
    move |n: &Note| n.get("STATUS").is_some_and(|s| s.contains(text))
}

#[test]
fn ready_status_and_watchdog_while_healthy_stopping_on_sigterm() {
    let r = rig();
    let sd = Systemd::listen(r.dir.path());
    let mut d = r.daemon(&sd.path, &[]);
    // READY comes with the first status line.
    let ready = sd.wait_for("READY=1", |n| n.get("READY") == Some("1"));
    let first = sd.notes()[ready].get("STATUS").unwrap().to_string();
    assert!(
        first.starts_with("site version 1, "),
        "first status: {first}"
    );
    assert!(first.contains("outbox "), "{first}");
    // Both devices answer and the cloud link connects: the status line follows.
    sd.wait_for("status: cloud connected", status_with("cloud connected"));
    sd.wait_for("status: devices 2/2", status_with("devices 2/2 online"));
    // Pings every half of the watchdog timeout (1 s here): a dozen over 6 s, none missing for
    // longer than the timeout.
    let from = sd.notes().len();
    std::thread::sleep(Duration::from_secs(6));
    let pings = sd.pings_after(from);
    assert!(pings.len() >= 4, "only {} pings in 6 s", pings.len());
    for w in pings.windows(2) {
        assert!(
            w[1] - w[0] < Duration::from_micros(WATCHDOG_USEC),
            "a gap of {:?} between pings",
            w[1] - w[0]
        );
    }
    let last = sd.notes().last().unwrap().clone();
    let status = sd
        .notes()
        .iter()
        .rev()
        .find_map(|n| n.get("STATUS").map(String::from))
        .unwrap();
    assert!(!status.contains("unhealthy"), "{status}");
    assert!(last.get("STOPPING").is_none());
    // SIGTERM: STOPPING=1, then a clean exit; no pings after STOPPING.
    let st = d.terminate();
    assert!(st.success(), "exit: {st}; log:\n{}", r.log());
    let stopping = sd.wait_for("STOPPING=1", |n| n.get("STOPPING") == Some("1"));
    assert!(
        sd.pings_after(stopping).is_empty(),
        "pings after STOPPING: {:#?}",
        sd.notes()
    );
}

#[test]
fn watchdog_pings_stop_when_a_bus_thread_is_stuck() {
    let r = rig();
    let sd = Systemd::listen(r.dir.path());
    // The Modbus bus thread stops turning at its 100th turn (a few seconds after start).
    let _d = r.daemon(&sd.path, &[("GATEHOUSE_STALL", "bus io@100")]);
    sd.wait_for("READY=1", |n| n.get("READY") == Some("1"));
    // Healthy at first: pinged.
    let pinged = sd.wait_for("a WATCHDOG=1", |n| n.get("WATCHDOG") == Some("1"));
    // Then the bus is stuck: the status says which loop, and the pings stop.
    let unhealthy = sd.wait_for(
        "status: unhealthy",
        status_with("unhealthy: bus io stuck for"),
    );
    assert!(unhealthy > pinged);
    let status = sd.notes()[unhealthy].get("STATUS").unwrap().to_string();
    assert!(!status.contains("bus readers"), "{status}");
    assert!(!status.contains("cloud link"), "{status}");
    assert!(r.log().contains("GATEHOUSE_STALL"), "{}", r.log());
    // Three ping periods with no ping (one may have been sent just before the check failed).
    std::thread::sleep(Duration::from_secs(3));
    let after = sd.pings_after(unhealthy);
    assert!(
        after.len() <= 1,
        "{} pings after the check failed: {:#?}",
        after.len(),
        sd.notes()
    );
    assert!(
        r.log().contains("health check failed: bus io stuck"),
        "{}",
        r.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_notify_socket_leaves_the_daemon_deciding_access() {
    let mut r = rig();
    let t = Topics::new("gatehouse", "site-1", "gw-1");
    let sub = Subscriber::connect(&r.broker, "cloud", &format!("{}/#", t.base())).await;
    // Nobody listens at this path.
    let nowhere = r.dir.path().join("no-such-dir/notify.sock");
    let mut d = r.daemon(&nowhere, &[]);
    let started = Instant::now();
    while !r.log().contains("cannot reach systemd's notify socket") {
        assert!(started.elapsed() < WAIT, "no warning; log:\n{}", r.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        r.log().contains(&nowhere.display().to_string()),
        "the warning names the socket"
    );
    // Alice's code at the keypad: decided (granted, or refused outside her schedule: the demo
    // site's schedules follow the wall clock), recorded and sent to the cloud.
    let events = t.events();
    let online = sub
        .try_wait_for(
            |m| {
                m.iter().any(|x| {
                    x.topic == events && {
                        let v = x.json();
                        v["kind"] == "device_online" && v["payload"]["device"] == "keypad-plain"
                    }
                })
            },
            WAIT,
        )
        .await;
    assert!(online.is_some(), "the keypad never came online");
    r.keypad
        .send(json!({"op": "keys", "pd": 3, "digits": "123456#"}));
    let decided = sub
        .try_wait_for(
            |m| {
                m.iter().any(|x| {
                    x.topic == events && {
                        let v: Value = x.json();
                        v["kind"] == "access_granted" || v["kind"] == "access_denied"
                    }
                })
            },
            WAIT,
        )
        .await;
    assert!(decided.is_some(), "no access event; log:\n{}", r.log());
    // The warning is given once, and the daemon stops cleanly.
    assert_eq!(
        r.log()
            .matches("cannot reach systemd's notify socket")
            .count(),
        1
    );
    let st = d.terminate();
    assert!(st.success(), "exit: {st}; log:\n{}", r.log());
}
