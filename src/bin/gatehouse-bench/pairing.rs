//! `gatehouse-bench pairing`: install-mode scans on the RS-485 buses, and what they cost a
//! configured reader.
//!
//! The peers are the integration tests' (Python, `tests/peers/`, run from the repository's
//! `.venv` or `GATEHOUSE_TEST_PYTHON`): one OSDP bus with the configured keypad (address 0,
//! paired by install mode first) and two unconfigured LibOSDP PDs (addresses 40 and 90); one
//! Modbus bus at 9600 with the gate's relay board (unit 1, polled every 200 ms) and three
//! unconfigured devices (units 60, 130, 200).
//!
//! - `reader_p99_delta_ms`: keypad code → relay p99 (the PD's "sent" time of the final `#` to the
//!   board's coil-on, both on CLOCK_MONOTONIC) while both scans run, minus the same without scans.
//! - `osdp_scan_s`: one sweep of the 126 free addresses at the bus's baud (install mode start to
//!   the last probe's progress report); `modbus_scan_s`: one sweep of the 246 free unit ids.
//! - `candidates`: distinct candidates reported (5 expected).
//!
//! `GATEHOUSE_BENCH_SAMPLES` (default 200): samples without scans; with scans, sampling goes on
//! until both sweeps are done and at least that many samples were taken (the scans start again
//! after a 5 s rest).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use gatehouse::access::AccessEngine;
use gatehouse::config::Config;
use gatehouse::pairing::{Candidate, Scan, ScanOptions};
use gatehouse::rs485::Rs485;
use gatehouse::store::Store;

#[derive(Default)]
struct BenchScan {
    active: Mutex<Option<ScanOptions>>,
    found: Mutex<BTreeMap<String, Candidate>>,
    /// source → (done, total, when the last probe was reported)
    progress: Mutex<BTreeMap<String, (u32, u32, Instant)>>,
}

impl Scan for BenchScan {
    fn active(&self) -> Option<ScanOptions> {
        self.active.lock().unwrap().clone()
    }
    fn discovered(&self, c: Candidate) {
        self.found.lock().unwrap().insert(c.id.clone(), c);
    }
    fn progress(&self, source: &str, done: u32, total: u32) {
        let mut p = self.progress.lock().unwrap();
        // The first sweep's end is what is measured.
        if p.get(source).is_none_or(|&(d, t, _)| d < t) {
            p.insert(source.to_string(), (done, total, Instant::now()));
        }
    }
}

impl BenchScan {
    fn finished(&self, source: &str) -> Option<Instant> {
        self.progress
            .lock()
            .unwrap()
            .get(source)
            .and_then(|&(d, t, at)| (d >= t).then_some(at))
    }
}

/// A Python peer: JSON lines in and out.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    events: Arc<Mutex<Vec<Value>>>,
}

impl Peer {
    fn start(script: &str, args: &[String]) -> anyhow::Result<Peer> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let python = std::env::var_os("GATEHOUSE_TEST_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".venv/bin/python"));
        let mut child = Command::new(&python)
            .arg(root.join("tests/peers").join(script))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {script} with {}", python.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let stdin = child.stdin.take().context("stdin")?;
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let ev = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    ev.lock().unwrap().push(v);
                }
            }
        });
        let p = Peer {
            child,
            stdin,
            events,
        };
        p.wait(Duration::from_secs(20), 0, |e| e["ev"] == "ready")
            .with_context(|| format!("{script} not ready"))?;
        Ok(p)
    }

    fn send(&mut self, op: Value) -> anyhow::Result<()> {
        writeln!(self.stdin, "{op}")?;
        Ok(self.stdin.flush()?)
    }

    fn len(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    fn wait(&self, timeout: Duration, from: usize, f: impl Fn(&Value) -> bool) -> Option<Value> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(v) = self.events.lock().unwrap().iter().skip(from).find(|e| f(e)) {
                return Some(v.clone());
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{{\"op\":\"quit\"}}");
        let _ = self.stdin.flush();
        std::thread::sleep(Duration::from_millis(200));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One keypad code → relay latency in ms.
fn sample(pd: &mut Peer, board: &Peer, n: usize) -> anyhow::Result<f64> {
    let (p0, b0) = (pd.len(), board.len());
    pd.send(json!({"op": "keys", "pd": 0, "digits": "123456#", "id": n}))?;
    let sent = pd
        .wait(Duration::from_secs(5), p0, |e| {
            e["ev"] == "sent" && e["id"] == n
        })
        .context("the keypad did not send the code")?;
    let on = board
        .wait(Duration::from_secs(5), b0, |e| {
            e["ev"] == "coil" && e["addr"] == 1 && e["index"] == 0 && e["on"] == true
        })
        .context("no relay pulse within 5 s of a valid code")?;
    // The pulse is over before the next sample.
    board
        .wait(Duration::from_secs(5), b0, |e| {
            e["ev"] == "coil" && e["addr"] == 1 && e["index"] == 0 && e["on"] == false
        })
        .context("the pulse did not end")?;
    let (t0, t1) = (sent["t"].as_f64(), on["t"].as_f64());
    match (t0, t1) {
        (Some(a), Some(b)) => Ok((b - a) * 1000.0),
        _ => bail!("peer events without times"),
    }
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn p99(v: Vec<f64>) -> f64 {
    pct(v, 0.99)
}

pub fn run() -> anyhow::Result<()> {
    let samples: usize = std::env::var("GATEHOUSE_BENCH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir()?;
    let (osdp, modbus) = (dir.path().join("osdp"), dir.path().join("modbus"));
    let mut pd = Peer::start(
        "osdp_pd.py",
        &[
            "--link".into(),
            osdp.display().to_string(),
            "--pd".into(),
            "0:install".into(),
            "--pd".into(),
            "40:install".into(),
            "--pd".into(),
            "90:install".into(),
        ],
    )?;
    let board = Peer::start(
        "modbus_dev.py",
        &[
            "--link".into(),
            modbus.display().to_string(),
            "--device".into(),
            "1:relay8".into(),
            "--device".into(),
            "60:relay8".into(),
            "--device".into(),
            "130:xymd02".into(),
            "--device".into(),
            "200:io8".into(),
        ],
    )?;
    let mut snapshot: Value =
        serde_json::from_str(include_str!("../../../config/demo-snapshot.json"))?;
    snapshot["facility"]["default_schedule"] = json!("always");
    for e in snapshot["entries"].as_array_mut().context("entries")? {
        if let Some(r) = e.get_mut("relay") {
            r["pulse_ms"] = json!(100);
        }
    }
    let snap_path = dir.path().join("snapshot.json");
    std::fs::write(&snap_path, serde_json::to_vec(&snapshot)?)?;
    let cfg_path = dir.path().join("bench.toml");
    std::fs::write(
        &cfg_path,
        format!(
            r#"
[site]
id = "bench"
gateway_id = "gw"
[storage]
data_dir = "data"
[[bus]]
id = "readers"
port = "{}"
protocol = "osdp"
[[bus.reader]]
id = "keypad-gate"
address = 0
entry = "gate-1"
secure = "install"
[[bus]]
id = "io"
port = "{}"
protocol = "modbus"
baud = 9600
timeout_ms = 100
[[bus.device]]
id = "relay-board-1"
profile = "waveshare-relay-8ch"
address = 1
poll_interval_ms = 200
"#,
            osdp.display(),
            modbus.display()
        ),
    )?;
    let cfg = Config::load(&cfg_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Arc::new(Store::open_with(&cfg.data_dir, cfg.log_limits)?);
    gatehouse::cli::import_file(&store, &snap_path)?;
    let buses = Rs485::start(&cfg.buses, Arc::new(AccessEngine::new(store.clone(), None)))?;
    let scan = Arc::new(BenchScan::default());
    buses.set_pairing(scan.clone(), cfg.profiles.clone());
    let end = Instant::now() + Duration::from_secs(30);
    while !store
        .events()
        .read_from(0, 10_000)?
        .iter()
        .any(|e| e.kind == "reader_paired")
    {
        if Instant::now() > end {
            bail!("the keypad did not pair within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the paired channel settle.
    std::thread::sleep(Duration::from_secs(2));

    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut pause = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        Duration::from_micros(20_000 + seed % 60_000)
    };
    let mut quiet = Vec::with_capacity(samples);
    for n in 0..samples {
        std::thread::sleep(pause());
        quiet.push(sample(&mut pd, &board, n)?);
    }

    let started = Instant::now();
    // GATEHOUSE_BENCH_SCAN=osdp: the OSDP scan alone (the Modbus sweep is empty: unit 1 is
    // configured), to tell the two costs apart.
    let osdp_only = std::env::var("GATEHOUSE_BENCH_SCAN").is_ok_and(|v| v == "osdp");
    *scan.active.lock().unwrap() = Some(ScanOptions {
        all_bauds: false,
        modbus_units: if osdp_only { 1..=1 } else { 1..=247 },
    });
    if osdp_only {
        scan.progress("modbus:io", 1, 1);
    }
    let mut busy = Vec::with_capacity(samples);
    let limit = started + Duration::from_secs(600);
    let mut n = samples;
    loop {
        let done =
            scan.finished("osdp:readers@9600").is_some() && scan.finished("modbus:io").is_some();
        if (done && busy.len() >= samples) || Instant::now() > limit {
            break;
        }
        std::thread::sleep(pause());
        // Only samples taken while a sweep runs count.
        let running =
            scan.finished("osdp:readers@9600").is_none() || scan.finished("modbus:io").is_none();
        let v = sample(&mut pd, &board, n)?;
        n += 1;
        if running || busy.len() < samples {
            busy.push(v);
        }
    }
    let secs = |s: &str| {
        scan.finished(s)
            .map(|t| (t.duration_since(started).as_secs_f64() * 100.0).round() / 100.0)
    };
    let (osdp_s, modbus_s) = (secs("osdp:readers@9600"), secs("modbus:io"));
    *scan.active.lock().unwrap() = None;
    buses.stop(Duration::from_secs(2));
    let round3 = |v: f64| (v * 1000.0).round() / 1000.0;
    let candidates = scan.found.lock().unwrap().len();
    println!(
        "{}",
        json!({
            "osdp_scan_s": osdp_s,
            "modbus_scan_s": modbus_s,
            "reader_p99_delta_ms": round3(p99(busy.clone()) - p99(quiet.clone())),
            "reader_p99_quiet_ms": round3(p99(quiet.clone())),
            "reader_p99_scanning_ms": round3(p99(busy.clone())),
            "reader_p50_delta_ms": round3(pct(busy.clone(), 0.5) - pct(quiet.clone(), 0.5)),
            "candidates": candidates,
            "samples": [quiet.len(), busy.len()],
        })
    );
    if candidates != if osdp_only { 2 } else { 5 } {
        bail!(
            "expected 5 candidates, found {:?}",
            scan.found.lock().unwrap().keys()
        );
    }
    Ok(())
}
