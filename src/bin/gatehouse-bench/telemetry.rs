//! `gatehouse-bench telemetry`: readings at bus speed through the real bus code and the group
//! commit of the event log.
//!
//! Four simulated XY-MD02 sensors (addresses 1–4) answer on one PTY from a thread of this
//! process (not gatehouse's bus thread); every read returns a value that differs from the last
//! by more than the profile's `report_delta`, so every poll of a sensor records two
//! `sensor_reading` events. gatehouse runs one Modbus bus on the PTY's other end, polling each
//! sensor every 10 ms, for [`RUN`] after a warm-up. Then a bare tokio-modbus client on the same
//! PTY makes the same transactions on the same fixed 10 ms schedule, for the same time.
//!
//! Each phase runs in a child process (the event log reads its flush-delay test hook,
//! `GATEHOUSE_FLUSH_DELAY_MS`, once per process): without a delay and with 2 ms per flush
//! standing in for slow flash. Printed, one JSON line:
//! - `readings_per_s`: `sensor_reading` events recorded (durable) per second;
//! - `period_achieved_ratio`: polls achieved ÷ polls configured (4 sensors × 100 per second);
//! - `bare_client_ratio`: gatehouse's Modbus transactions per second ÷ the bare client's;
//! - `poll_jitter_p99_ms` (and `_p90_`, `_p50_`): p99 of the polls' lateness, per sensor: the
//!   time from a poll's slot on the sensor's fixed schedule to the write of its first request,
//!   as the bus code itself notes it (its `trace` event on
//!   [`gatehouse::rs485::modbus::POLL_START_TARGET`], collected here by a `tracing` layer);
//! - `peer_interval_jitter_p99_ms`: the older, indirect figure, p99 of |interval between two
//!   reads of a sensor's first register as the simulated sensors receive them − 10 ms| (it also
//!   counts the simulated sensors' thread waking up);
//! - `flushes_per_s`: flushes of the event log by the group commit per second;
//! - `*_slow`: the same with the 2 ms flush delay;
//! - `bus_priority`: how gatehouse's bus thread ran (`fifo:20` by default where permitted,
//!   `normal: <why>` otherwise; `[rs485] realtime`, src/rs485/rt.rs);
//! - `sim_priority`: how the simulated sensors' thread ran. By default (`GATEHOUSE_BENCH_SIM`
//!   unset or `fifo`) it asks for the same real-time priority as the bus: the sensors stand in
//!   for hardware, which answers in the same time however busy the gateway's CPU is, and at
//!   normal priority on a loaded machine their thread's own scheduling delays dominate the
//!   figures (a late answer delays the next device's poll). `GATEHOUSE_BENCH_SIM=normal` keeps
//!   them at normal priority, to see that effect. They never run on the bus thread, and they
//!   block on the port between requests (no busy loop), so they cannot starve it.

use std::io::{Read as _, Write as _};

use serialport::SerialPort as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use gatehouse::access::AccessEngine;
use gatehouse::config::Config;
use gatehouse::rs485::Rs485;
use gatehouse::rs485::modbus::POLL_START_TARGET;
use gatehouse::rs485::rt::{self, Raised, Realtime};
use gatehouse::rs485::sim::{Pty, request_len};
use gatehouse::rs485::wire::{modbus_crc, modbus_frame};
use gatehouse::store::Store;

const DEVICES: u8 = 4;
const PERIOD: Duration = Duration::from_millis(10);
const WARMUP: Duration = Duration::from_secs(1);
const RUN: Duration = Duration::from_secs(5);

pub fn run(args: &[String]) -> anyhow::Result<()> {
    if args.first().map(String::as_str) == Some("--phase") {
        println!("{}", phase()?);
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let child = |delay_ms: u64| -> anyhow::Result<Value> {
        let out = std::process::Command::new(&exe)
            .args(["telemetry", "--phase"])
            .env("GATEHOUSE_FLUSH_DELAY_MS", delay_ms.to_string())
            .stderr(std::process::Stdio::inherit())
            .output()?;
        if !out.status.success() {
            bail!("the {delay_ms} ms phase failed: {}", out.status);
        }
        let line = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(line.lines().last().context("no output")?).context("phase output")
    };
    let fast = child(0)?;
    let slow = child(2)?;
    println!(
        "{}",
        json!({
            "readings_per_s": fast["readings_per_s"],
            "period_achieved_ratio": fast["period_achieved_ratio"],
            "bare_client_ratio": fast["bare_client_ratio"],
            "poll_jitter_p99_ms": fast["poll_jitter_p99_ms"],
            "flushes_per_s": fast["flushes_per_s"],
            "readings_per_s_slow": slow["readings_per_s"],
            "period_achieved_ratio_slow": slow["period_achieved_ratio"],
            "bare_client_ratio_slow": slow["bare_client_ratio"],
            "poll_jitter_p99_ms_slow": slow["poll_jitter_p99_ms"],
            "poll_jitter_p50_ms": fast["poll_jitter_p50_ms"],
            "poll_jitter_p90_ms": fast["poll_jitter_p90_ms"],
            "poll_jitter_p50_ms_slow": slow["poll_jitter_p50_ms"],
            "poll_jitter_p90_ms_slow": slow["poll_jitter_p90_ms"],
            "peer_interval_jitter_p99_ms": fast["peer_interval_jitter_p99_ms"],
            "peer_interval_jitter_p99_ms_slow": slow["peer_interval_jitter_p99_ms"],
            "polls_timed": fast["polls_timed"],
            "polls_timed_slow": slow["polls_timed"],
            "load_avg_1m": std::fs::read_to_string("/proc/loadavg").ok()
                .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse::<f64>().ok())),
            "flushes_per_s_slow": slow["flushes_per_s"],
            "bus_priority": priority_label(Realtime::default()),
            "sim_priority": if sim_fifo() { priority_label(Realtime::default()) } else { "normal".into() },
        })
    );
    Ok(())
}

/// Whether the simulated sensors ask for real-time priority (see the module documentation).
fn sim_fifo() -> bool {
    std::env::var("GATEHOUSE_BENCH_SIM").map_or(true, |v| v != "normal")
}

/// How a thread started with `rt` runs here: `fifo:<priority>` or `normal: <why>`.
fn priority_label(rt: Realtime) -> String {
    let r = std::thread::spawn(move || rt::raise("probe", rt))
        .join()
        .unwrap_or(Raised::Refused("probe thread failed".into()));
    match r {
        Raised::Fifo(p) => format!("fifo:{p}"),
        Raised::Off => "normal".into(),
        Raised::Refused(why) => format!("normal: {why}"),
    }
}

/// Four sensors on one PTY: every read of an input register answers 0 or 100 (alternately),
/// and the time of each temperature read (register 1) is noted per sensor.
struct Sensors {
    path: std::path::PathBuf,
    polls: Arc<Mutex<Vec<Vec<Instant>>>>,
    served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sensors {
    fn start() -> anyhow::Result<Sensors> {
        let pty = Pty::open()?;
        let path = pty.path.clone();
        let polls = Arc::new(Mutex::new(vec![Vec::new(); usize::from(DEVICES)]));
        let served = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s, st) = (polls.clone(), served.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("sim-sensors".into())
            .spawn(move || {
                if sim_fifo() {
                    rt::raise("sim-sensors", Realtime::default());
                }
                if let Err(e) = serve(pty, &p, &s, &st) {
                    eprintln!("simulated sensors stopped: {e:#}");
                }
            })?;
        Ok(Sensors {
            path,
            polls,
            served,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Sensors {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    pty: Pty,
    polls: &Mutex<Vec<Vec<Instant>>>,
    served: &AtomicU64,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let mut master = pty.master.try_clone_native()?;
    master.set_timeout(Duration::from_millis(2))?;
    let mut toggles = [[false; 3]; DEVICES as usize];
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        match master.read(&mut chunk) {
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(e) => return Err(e.into()),
        }
        while buf.len() >= 4 {
            let Some(len) = request_len(&buf) else { break };
            if buf.len() < len {
                break;
            }
            let frame = buf[..len].to_vec();
            buf.drain(..len);
            if modbus_crc(&frame[..len - 2]).to_le_bytes() != frame[len - 2..] {
                continue;
            }
            let (addr, f) = (frame[0], frame[1]);
            if !(1..=DEVICES).contains(&addr) {
                continue;
            }
            let d = usize::from(addr - 1);
            let reg = u16::from_be_bytes([frame[2], frame[3]]);
            let out = if f == 0x04 && (1..=2).contains(&reg) && frame[5] == 1 {
                if reg == 1 {
                    polls.lock().unwrap_or_else(|e| e.into_inner())[d].push(Instant::now());
                }
                let t = &mut toggles[d][usize::from(reg)];
                *t = !*t;
                let v: u16 = if *t { 100 } else { 0 };
                let [hi, lo] = v.to_be_bytes();
                modbus_frame(addr, f, &[2, hi, lo])
            } else {
                modbus_frame(addr, f | 0x80, &[2])
            };
            master.write_all(&out)?;
            served.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// The bus code's poll-start events (see [`POLL_START_TARGET`]): when each arrived and its
/// lateness in microseconds.
#[derive(Clone, Default)]
struct PollStarts(Arc<Mutex<Vec<(Instant, u64)>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PollStarts {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct LateUs(Option<u64>);
        impl tracing::field::Visit for LateUs {
            fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                if field.name() == "late_us" {
                    self.0 = Some(value);
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        if event.metadata().target() != POLL_START_TARGET {
            return;
        }
        let mut v = LateUs(None);
        event.record(&mut v);
        if let Some(us) = v.0 {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((Instant::now(), us));
        }
    }
}

fn phase() -> anyhow::Result<Value> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    let starts = PollStarts::default();
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(starts.clone().with_filter(
            tracing_subscriber::filter::filter_fn(|m| m.target() == POLL_START_TARGET),
        )),
    )
    .context("installing the poll-start collector")?;
    let dir = tempfile::tempdir()?;
    let sensors = Sensors::start()?;
    let mut devices = String::new();
    for a in 1..=DEVICES {
        devices.push_str(&format!(
            "[[bus.device]]\nid = \"sensor-{a}\"\nprofile = \"xy-md02\"\naddress = {a}\n\
             poll_interval_ms = {}\n",
            PERIOD.as_millis()
        ));
    }
    let cfg_path = dir.path().join("bench.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[site]\nid = \"bench\"\ngateway_id = \"gw\"\n[storage]\ndata_dir = \"data\"\n\
             [[bus]]\nid = \"sensors\"\nport = \"{}\"\nprotocol = \"modbus\"\ntimeout_ms = 50\n{devices}",
            sensors.path.display()
        ),
    )?;
    let cfg = Config::load(&cfg_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Arc::new(Store::open_with(&cfg.data_dir, cfg.log_limits)?);
    let engine = Arc::new(AccessEngine::new(store.clone(), None));
    let buses = Rs485::start(&cfg.buses, engine)?;
    std::thread::sleep(WARMUP);
    let (served0, flushes0, seq0) = (
        sensors.served.load(Ordering::Relaxed),
        store.recorder_flushes(),
        store.events().next_seq(),
    );
    let (t0, w0) = (Instant::now(), chrono::Utc::now());
    std::thread::sleep(RUN);
    let (t1, w1) = (Instant::now(), chrono::Utc::now());
    let (served1, flushes1) = (
        sensors.served.load(Ordering::Relaxed),
        store.recorder_flushes(),
    );
    buses.stop(Duration::from_secs(2));
    store.drain_recorded();
    let secs = (t1 - t0).as_secs_f64();
    let readings = store
        .events()
        .read_from(seq0, 1_000_000)?
        .iter()
        .filter(|e| e.kind == "sensor_reading" && e.at >= w0 && e.at < w1)
        .count();
    let (achieved, mut peer_jitter) = {
        let polls = sensors.polls.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0usize;
        let mut jitter = Vec::new();
        for dev in polls.iter() {
            let inside: Vec<Instant> = dev
                .iter()
                .copied()
                .filter(|t| *t >= t0 && *t < t1)
                .collect();
            n += inside.len();
            for w in inside.windows(2) {
                let dt = w[1].duration_since(w[0]).as_secs_f64() * 1000.0;
                jitter.push((dt - PERIOD.as_secs_f64() * 1000.0).abs());
            }
        }
        (n, jitter)
    };
    let configured = f64::from(DEVICES) * secs / PERIOD.as_secs_f64();
    let gh_tx = (served1 - served0) as f64 / secs;
    let bare_tx = bare_client(&sensors.path)?;
    let mut late: Vec<f64> = starts
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(at, _)| *at >= t0 && *at < t1)
        .map(|(_, us)| *us as f64 / 1000.0)
        .collect();
    late.sort_by(f64::total_cmp);
    peer_jitter.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let r3 = |v: f64| (v * 1000.0).round() / 1000.0;
    Ok(json!({
        "readings_per_s": (readings as f64 / secs).round(),
        "period_achieved_ratio": r3(achieved as f64 / configured),
        "bare_client_ratio": r3(gh_tx / bare_tx),
        "poll_jitter_p99_ms": r3(pct(&late, 0.99)),
        "poll_jitter_p90_ms": r3(pct(&late, 0.90)),
        "poll_jitter_p50_ms": r3(pct(&late, 0.50)),
        "polls_timed": late.len(),
        "peer_interval_jitter_p99_ms": r3(pct(&peer_jitter, 0.99)),
        "flushes_per_s": ((flushes1 - flushes0) as f64 / secs).round(),
        "tx_per_s": gh_tx.round(),
        "bare_tx_per_s": bare_tx.round(),
    }))
}

/// A bare tokio-modbus RTU client on the same PTY: the same two reads per sensor on the same
/// fixed 10 ms schedule, nothing else. Returns transactions per second.
fn bare_client(path: &std::path::Path) -> anyhow::Result<f64> {
    use tokio_modbus::client::Reader as _;
    use tokio_modbus::prelude::{Slave, SlaveContext as _};
    use tokio_serial::SerialPortBuilderExt as _;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let port = tokio_serial::new(path.to_string_lossy(), 9600).open_native_async()?;
        let mut ctx = tokio_modbus::client::rtu::attach(port);
        let t0 = Instant::now();
        let mut next = tokio::time::Instant::now();
        let mut tx = 0u64;
        while t0.elapsed() < RUN {
            for a in 1..=DEVICES {
                ctx.set_slave(Slave(a));
                for reg in 1..=2u16 {
                    let r = tokio::time::timeout(
                        Duration::from_millis(50),
                        ctx.read_input_registers(reg, 1),
                    )
                    .await;
                    if matches!(r, Ok(Ok(Ok(_)))) {
                        tx += 1;
                    }
                }
            }
            next += PERIOD;
            tokio::time::sleep_until(next).await;
        }
        Ok(tx as f64 / t0.elapsed().as_secs_f64())
    })
}
