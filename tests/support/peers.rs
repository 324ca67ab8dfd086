//! Independent device peers (Python, `tests/peers/`) as child processes: JSON lines in on
//! stdin, JSON lines out on stdout (the protocol is in each peer's header). The peers run in
//! the venv `make test` builds (`.venv`, pinned in tests/requirements.txt); set
//! `GATEHOUSE_TEST_PYTHON` to use another interpreter.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("GATEHOUSE_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python venv for the device peers at {}: run `make test` (or `make venv`) first",
        venv.display()
    );
    venv
}

type Events = Arc<(Mutex<Vec<Value>>, Condvar)>;

/// A running peer.
pub struct Peer {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    events: Events,
    pub link: PathBuf,
}

impl Peer {
    /// Starts `tests/peers/<script>` with `args` and `--link <link>`; waits for `ready`.
    pub fn start(script: &str, link: &Path, args: &[String]) -> Peer {
        let mut all = vec!["--link".to_string(), link.display().to_string()];
        all.extend_from_slice(args);
        Peer::spawn(script, link, &all)
    }

    /// Starts `tests/peers/<script>` with exactly `args` (a peer that makes no serial link,
    /// e.g. the mock BlueZ); waits for `ready`.
    pub fn start_with(script: &str, args: &[String]) -> Peer {
        Peer::spawn(script, Path::new(""), args)
    }

    fn spawn(script: &str, link: &Path, args: &[String]) -> Peer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/peers")
            .join(script);
        let mut child = Command::new(python())
            .arg(&path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {script}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let events: Events = Arc::default();
        let ev = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        let (m, c) = &*ev;
                        m.lock().unwrap().push(v);
                        c.notify_all();
                    }
                    Err(e) => eprintln!("peer printed a non-JSON line ({e}): {line}"),
                }
            }
        });
        let p = Peer {
            name: script.to_string(),
            stdin: child.stdin.take(),
            child,
            events,
            link: link.to_path_buf(),
        };
        p.wait_for("ready", Duration::from_secs(20), |e| e["ev"] == "ready");
        p
    }

    /// Sends one op.
    pub fn send(&mut self, op: Value) {
        let stdin = self.stdin.as_mut().expect("peer stdin");
        writeln!(stdin, "{op}").unwrap();
        stdin.flush().unwrap();
    }

    pub fn events(&self) -> Vec<Value> {
        self.events.0.lock().unwrap().clone()
    }

    /// Waits for an event matching `pred` (among all so far) and returns it.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        self.try_wait_for(timeout, &pred).unwrap_or_else(|| {
            let evs = self.events();
            let tail: Vec<String> = evs
                .iter()
                .rev()
                .take(12)
                .rev()
                .map(|e| e.to_string())
                .collect();
            panic!(
                "{}: no `{what}` within {timeout:?}; last events:\n{}",
                self.name,
                tail.join("\n")
            )
        })
    }

    pub fn try_wait_for(&self, timeout: Duration, pred: &dyn Fn(&Value) -> bool) -> Option<Value> {
        let end = Instant::now() + timeout;
        let (m, c) = &*self.events;
        let mut g = m.lock().unwrap();
        loop {
            if let Some(v) = g.iter().find(|e| pred(e)) {
                return Some(v.clone());
            }
            let now = Instant::now();
            if now >= end {
                return None;
            }
            g = c.wait_timeout(g, end - now).unwrap().0;
        }
    }

    /// Events after the first `from` ones matching `pred`.
    pub fn count_since(&self, from: usize, pred: impl Fn(&Value) -> bool) -> usize {
        self.events().iter().skip(from).filter(|e| pred(e)).count()
    }

    pub fn len(&self) -> usize {
        self.events.0.lock().unwrap().len()
    }

    /// SIGKILL (an unplugged adapter: the PTY disappears).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = writeln!(s, "{{\"op\":\"quit\"}}");
        }
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it returns `Some`, up to `timeout`.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "not within {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The demo site (config/demo-snapshot.json) open around the clock (default schedule 24/7, so
/// that tests pass at any hour) with 300 ms relay pulses, imported into a store in `dir`.
pub fn demo_store(dir: &Path) -> Arc<gatehouse::store::Store> {
    let mut snap: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo-snapshot.json"),
        )
        .unwrap(),
    )
    .unwrap();
    snap["facility"]["default_schedule"] = Value::from("always");
    for e in snap["entries"].as_array_mut().unwrap() {
        if let Some(r) = e.get_mut("relay") {
            r["pulse_ms"] = Value::from(300);
        }
    }
    let file = dir.join("snapshot.json");
    std::fs::write(&file, serde_json::to_vec(&snap).unwrap()).unwrap();
    let store = Arc::new(gatehouse::store::Store::open(&dir.join("data"), 100_000).unwrap());
    gatehouse::cli::import_file(&store, &file).unwrap();
    store
}

/// Loads a config from TOML text (a `[site]` section is added).
pub fn config(dir: &Path, body: &str) -> gatehouse::config::Config {
    let path = dir.join("gatehouse.toml");
    std::fs::write(
        &path,
        format!("[site]\nid = \"test-site\"\ngateway_id = \"gw\"\n[storage]\ndata_dir = \"data\"\n{body}"),
    )
    .unwrap();
    gatehouse::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// The event log so far.
pub fn logged(store: &gatehouse::store::Store) -> Vec<gatehouse::store::Event> {
    // Device events go through the group commit: everything recorded so far, made durable.
    store.drain_recorded();
    store.events().read_from(0, 1_000_000).unwrap()
}

/// Waits for an event of `kind` whose payload satisfies `pred`, after sequence `after`.
pub fn wait_event(
    store: &gatehouse::store::Store,
    after: u64,
    kind: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> gatehouse::store::Event {
    let end = Instant::now() + timeout;
    loop {
        if let Some(e) = logged(store)
            .into_iter()
            .find(|e| e.seq > after && e.kind == kind && pred(&e.payload))
        {
            return e;
        }
        if Instant::now() > end {
            let tail: Vec<String> = logged(store)
                .iter()
                .rev()
                .take(15)
                .rev()
                .map(|e| format!("{} {} {}", e.seq, e.kind, e.payload))
                .collect();
            panic!(
                "no `{kind}` event within {timeout:?}; the log ends:\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The last sequence number in the log.
pub fn last_seq(store: &gatehouse::store::Store) -> u64 {
    logged(store).last().map_or(0, |e| e.seq)
}
