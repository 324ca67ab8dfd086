//! The real daemon (`gatehouse run`) for end-to-end tests: its config (the demo site, the
//! broker from `support/broker.rs`, the control socket, buses), the process (killed if a test
//! fails before stopping it), what it publishes (events, retained documents) and the CLI on its
//! control socket. Used by `tests/pairing_e2e.rs`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use gatehouse::cloud::messages::Topics;
use serde_json::Value;

use crate::broker::{Broker, Received, Subscriber};
use crate::common::gatehouse_bin;

const WAIT: Duration = Duration::from_secs(60);

/// The demo site open around the clock, with short relay pulses.
pub fn snapshot(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut snap: Value =
        serde_json::from_slice(&std::fs::read(root.join("config/demo-snapshot.json")).unwrap())
            .unwrap();
    snap["facility"]["default_schedule"] = Value::from("always");
    for e in snap["entries"].as_array_mut().unwrap() {
        if let Some(r) = e.get_mut("relay") {
            r["pulse_ms"] = Value::from(300);
        }
    }
    let f = dir.join("snapshot.json");
    std::fs::write(&f, serde_json::to_vec(&snap).unwrap()).unwrap();
    f
}

/// The daemon's config: the broker, the demo site, the control socket in `dir`, and the
/// buses/BLE `extra` asks for.
pub fn write_config(dir: &Path, b: &Broker, signer: &SigningKey, extra: &str) -> PathBuf {
    b.write_gateway_config(
        dir,
        "data",
        &signer.verifying_key(),
        "reconnect_min_ms = 200\n",
        &format!(
            "[access]\ninitial_snapshot = \"{}\"\n[control]\nsocket = \"{}\"\n{extra}",
            snapshot(dir).display(),
            dir.join("control.sock").display()
        ),
    )
}

/// An OSDP bus `readers` (the configured keypad at 0, paired on first contact) on `osdp`.
pub fn osdp_bus(osdp: &Path) -> String {
    format!(
        "[[bus]]\nid = \"readers\"\nport = \"{}\"\nprotocol = \"osdp\"\n\
         [[bus.reader]]\nid = \"keypad-gate-1\"\naddress = 0\nentry = \"gate-1\"\n\
         secure = \"install\"\n",
        osdp.display()
    )
}

/// A Modbus bus `io` (the gate's relay board at unit 1) on `modbus`.
pub fn modbus_bus(modbus: &Path) -> String {
    format!(
        "[[bus]]\nid = \"io\"\nport = \"{}\"\nprotocol = \"modbus\"\ntimeout_ms = 200\n\
         [[bus.device]]\nid = \"relay-board-1\"\nprofile = \"waveshare-relay-8ch\"\naddress = 1\n\
         poll_interval_ms = 200\n",
        modbus.display()
    )
}

/// The daemon process, killed if the test fails before it stops it.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub fn daemon(cfg: &Path, dbus: Option<&str>) -> Daemon {
    let mut c = Process::new(gatehouse_bin());
    c.args(["run", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(d) = dbus {
        c.env("DBUS_SYSTEM_BUS_ADDRESS", d);
    }
    Daemon(c.spawn().unwrap())
}

/// SIGTERM, and waits for a clean exit.
pub fn stop(d: &mut Daemon) {
    let child = &mut d.0;
    let kill = Process::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let end = Instant::now() + WAIT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "the daemon exited with {s}");
            return;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("the daemon did not stop within {WAIT:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Event messages of `kind` received from index `from` on, each event once (by `id`).
pub fn events_of(msgs: &[Received], t: &Topics, from: usize, kind: &str) -> Vec<Value> {
    let mut seen = std::collections::BTreeSet::new();
    msgs.iter()
        .skip(from)
        .filter(|m| m.topic == t.events())
        .map(|m| m.json())
        .filter(|v| v["kind"] == kind && seen.insert(v["id"].as_str().unwrap_or("").to_string()))
        .collect()
}

/// Waits until `f` over the messages received so far gives a value.
pub async fn wait_msgs<T>(
    sub: &Subscriber,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut(&[Received]) -> Option<T>,
) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f(&sub.messages()) {
            return v;
        }
        assert!(Instant::now() < end, "{what}: not seen within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for an event of `kind` (received from index `from` on) whose payload fits `pred`.
pub async fn wait_event(
    sub: &Subscriber,
    t: &Topics,
    from: usize,
    kind: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    wait_msgs(sub, &format!("event `{kind}`"), WAIT, |m| {
        events_of(m, t, from, kind)
            .into_iter()
            .find(|e| pred(&e["payload"]))
    })
    .await
}

/// The last message on `topic` received from index `from` on.
pub fn last_on(msgs: &[Received], from: usize, topic: &str) -> Option<Value> {
    msgs.iter()
        .skip(from)
        .rev()
        .find(|m| m.topic == topic)
        .map(|m| m.json())
}

/// Validates `doc` against `docs/schemas/<schema>` with the test venv's jsonschema.
pub fn check_schema(schema: &str, doc: &Value) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Process::new(root.join(".venv/bin/python"))
        .args([
            "-c",
            "import json, sys\n\
             from jsonschema import Draft202012Validator\n\
             Draft202012Validator(json.load(open(sys.argv[1]))).validate(json.loads(sys.argv[2]))",
        ])
        .arg(root.join("docs/schemas").join(schema))
        .arg(doc.to_string())
        .output()
        .expect("the test venv's python (make venv)");
    assert!(
        o.status.success(),
        "{schema}: {doc}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `gatehouse <args> --config <cfg>`, in a blocking task: success, stdout, stderr.
pub async fn cli(cfg: &Path, args: &[&str]) -> (bool, String, String) {
    let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    a.extend(["--config".into(), cfg.display().to_string()]);
    tokio::task::spawn_blocking(move || {
        let o = Process::new(gatehouse_bin())
            .args(&a)
            .env("NO_COLOR", "1")
            .output()
            .expect("gatehouse runs");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}
