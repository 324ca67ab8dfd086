//! `gatehouse-bench idle`: what the daemon costs when nothing happens.
//!
//! The daemon runs as a separate process (the `gatehouse` binary next to this one) with one
//! OSDP bus of two readers and one Modbus bus of two devices (a relay board with inputs and a
//! temperature sensor), whose peers run in other processes (`tests/peers/osdp_pd.py`: LibOSDP
//! PDs; `tests/peers/modbus_dev.py`: pymodbus), ten BLE devices on the simulated radio (the
//! demo's six plus four sensors; the simulated radio advertises each every 2 s), and the
//! metrics endpoint on. No cloud link. After the devices are online and a settling pause, it
//! measures over `GATEHOUSE_BENCH_IDLE_SECS` (default 60):
//!
//! - `idle_cpu_pct`: the daemon's own CPU time (user + system, `/proc/<pid>/stat`) over the
//!   window, in % of one core;
//! - `wakeups_per_s`: voluntary + involuntary context switches per second summed over the
//!   daemon's threads (`/proc/<pid>/task/*/status`); the per-thread figures go to stderr;
//! - `rss_mb`: the daemon's resident size at the end;
//! - `scrape_ms`: one `GET /metrics` (the median of 5), connection included.
//!
//! Targets (issue 11): idle_cpu_pct <= 0.5, rss_mb <= 30, scrape_ms <= 5.

use std::collections::BTreeMap;
use std::io::{BufRead as _, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    let venv = repo().join(".venv/bin/python3");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// Starts a peer script and waits for its link to appear.
fn peer(script: &str, link: &Path, args: &[&str]) -> anyhow::Result<Proc> {
    let child = Command::new(python())
        .arg(repo().join("tests/peers").join(script))
        .arg("--link")
        .arg(link)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {script}"))?;
    let p = Proc(child);
    let end = Instant::now() + Duration::from_secs(20);
    while !link.exists() {
        if Instant::now() > end {
            bail!("{script} did not create {}", link.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(p)
}

fn scrape(port: u16) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP head")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("scrape: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &s[s.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// Context switches per thread (name with tid) of a process.
fn switches(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let mut name = String::new();
        let mut n = 0;
        for l in status.lines() {
            if let Some(v) = l.strip_prefix("Name:") {
                name = v.trim().to_string();
            }
            if let Some(v) = l
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                n += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
        out.insert(format!("{name}/{}", t.file_name().to_string_lossy()), n);
    }
    out
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn run() -> anyhow::Result<()> {
    let secs: u64 = std::env::var("GATEHOUSE_BENCH_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir()?;
    let osdp_link = dir.path().join("ttyOSDP");
    let modbus_link = dir.path().join("ttyMODBUS");
    let _osdp = peer(
        "osdp_pd.py",
        &osdp_link,
        &["--pd", "0:nosc", "--pd", "1:nosc"],
    )?;
    let _modbus = peer(
        "modbus_dev.py",
        &modbus_link,
        &["--device", "1:relay8d", "--device", "2:xymd02"],
    )?;

    let mut snapshot: serde_json::Value =
        serde_json::from_str(include_str!("../../../config/demo-snapshot.json"))?;
    snapshot["facility"]["default_schedule"] = json!("always");
    let devices = snapshot["devices"].as_array_mut().context("devices")?;
    for i in 1..=4 {
        devices.push(json!({"id": format!("sensor-extra-{i}"), "kind": "sensor",
                            "mac": format!("3C:2E:F5:00:01:0{i}")}));
    }
    let ble_devices = devices.len();
    let snap_path = dir.path().join("snapshot.json");
    std::fs::write(&snap_path, serde_json::to_vec(&snapshot)?)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let cfg_path = dir.path().join("idle.toml");
    std::fs::write(
        &cfg_path,
        format!(
            r#"
[site]
id = "bench"
gateway_id = "gw"
[storage]
data_dir = "data"
[access]
initial_snapshot = "{snap}"
[log]
level = "warn"
[metrics]
listen = "127.0.0.1:{port}"
[demo]
simulate_devices = true
[ble]
adapter = "sim"
[[bus]]
id = "readers"
port = "{osdp}"
protocol = "osdp"
[[bus.reader]]
id = "keypad-gate-1"
address = 0
entry = "gate-1"
secure = "none"
[[bus.reader]]
id = "keypad-exit-1"
address = 1
entry = "exit-1"
secure = "none"
[[bus]]
id = "io"
port = "{modbus}"
protocol = "modbus"
[[bus.device]]
id = "relay-board-1"
profile = "waveshare-relay-8ch-d"
address = 1
inputs = [{{ channel = 0, role = "door_contact", entry = "gate-1" }}]
[[bus.device]]
id = "climate-1"
profile = "xy-md02"
address = 2
"#,
            snap = snap_path.display(),
            osdp = osdp_link.display(),
            modbus = modbus_link.display(),
        ),
    )?;
    let exe = std::env::current_exe()?.with_file_name("gatehouse");
    if !exe.exists() {
        bail!(
            "{} not found: build both binaries (`cargo build --release --bins`)",
            exe.display()
        );
    }
    let log_path = dir.path().join("daemon.log");
    let daemon = Proc(
        Command::new(&exe)
            .args(["run", "--config"])
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()
            .context("starting the daemon")?,
    );
    let pid = daemon.0.id();

    // Warm up: every RS-485 device and every BLE lock/sensor online.
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let online = scrape(port)
            .map(|t| {
                t.lines()
                    .filter(|l| l.starts_with("gatehouse_device_online{") && l.ends_with(" 1"))
                    .count()
            })
            .unwrap_or(0);
        // 4 RS-485 devices and the BLE devices that advertise (the fob only now and then, the
        // sleeping padlock not at all).
        if online >= 4 + ble_devices - 2 {
            break;
        }
        if Instant::now() > end {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("devices not online after 60 s ({online} online); daemon log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(5));

    let hz = clock_ticks();
    let (c0, s0, t0) = (cpu_ticks(pid)?, switches(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    let (c1, s1, elapsed) = (cpu_ticks(pid)?, switches(pid), t0.elapsed().as_secs_f64());
    let rss = rss_mb(pid);
    let mut scrapes = Vec::new();
    let mut body_len = 0;
    for _ in 0..5 {
        let t = Instant::now();
        body_len = scrape(port)?.len();
        scrapes.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(200));
    }
    scrapes.sort_by(f64::total_cmp);
    let cpu_pct = (c1 - c0) as f64 / hz / elapsed * 100.0;
    let mut per_thread: Vec<(String, f64)> = s1
        .iter()
        .map(|(k, v)| {
            let before = s0.get(k).copied().unwrap_or(0);
            (k.clone(), v.saturating_sub(before) as f64 / elapsed)
        })
        .collect();
    let wakeups: f64 = per_thread.iter().map(|(_, w)| w).sum();
    per_thread.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut by_name: BTreeMap<String, f64> = BTreeMap::new();
    for (k, w) in &per_thread {
        let name = k.rsplit_once('/').map_or(k.as_str(), |(n, _)| n);
        *by_name.entry(name.to_string()).or_default() += w;
    }
    let mut by_name: Vec<_> = by_name.into_iter().collect();
    by_name.sort_by(|a, b| b.1.total_cmp(&a.1));
    eprintln!("wakeups per second by thread name (threads: {}):", s1.len());
    for (name, w) in by_name.iter().filter(|(_, w)| *w >= 0.05) {
        eprintln!("  {name:<20} {w:>8.1}");
    }
    let log: Vec<String> = std::fs::File::open(&log_path)
        .map(|f| {
            std::io::BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .collect()
        })
        .unwrap_or_default();
    eprintln!("daemon log (warn and above), {} lines:", log.len());
    for l in log.iter().take(10) {
        eprintln!("  {l}");
    }
    println!(
        "{}",
        json!({
            "bench": "idle",
            "window_s": (elapsed * 10.0).round() / 10.0,
            "idle_cpu_pct": (cpu_pct * 1000.0).round() / 1000.0,
            "rss_mb": (rss * 10.0).round() / 10.0,
            "wakeups_per_s": (wakeups * 10.0).round() / 10.0,
            "scrape_ms": (scrapes[2] * 1000.0).round() / 1000.0,
            "scrape_bytes": body_len,
            "threads": s1.len(),
            "buses": {"osdp_readers": 2, "modbus_devices": 2},
            "ble_devices": ble_devices,
            "targets": {"idle_cpu_pct": 0.5, "rss_mb": 30, "scrape_ms": 5},
        })
    );
    drop(daemon);
    Ok(())
}
