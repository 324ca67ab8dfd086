//! `gatehouse-bench rs485`: keypad to relay through the real bus code.
//!
//! A simulated OSDP keypad (LibOSDP PD, secure channel after install-mode pairing) and a
//! simulated Modbus relay board run on their own PTYs; gatehouse runs one OSDP bus and one
//! Modbus bus on the PTYs' other ends, as the daemon does. Each sample types a tenant's code
//! ending in `#` at a random moment; `code_to_relay` is from the moment the keypad queued the
//! final `#` to the moment the board switched coil 0 on. The board is polled every 10 ms (the
//! shortest poll interval a profile allows) so that relay jobs compete with polls on the bus;
//! `polls_per_s` is the Modbus transactions per second the board answered during the run.
//! `poll_interval_ms` is LibOSDP's reader poll interval (fixed at 50 ms in LibOSDP): a key
//! pressed just after a poll waits for the next one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;

use gatehouse::access::AccessEngine;
use gatehouse::config::Config;
use gatehouse::rs485::Rs485;
use gatehouse::rs485::sim::{Seen, SimBoard, SimKeypad};
use gatehouse::store::Store;

const SAMPLES: usize = 300;
const OSDP_POLL_MS: u64 = 50;

pub fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keypad = SimKeypad::start(0, Some(dir.path().join("keypad.key")))?;
    let board = SimBoard::start(1)?;
    let mut snapshot: serde_json::Value =
        serde_json::from_str(include_str!("../../../config/demo-snapshot.json"))?;
    // Open around the clock (the demo's gate hours would refuse codes at night), and short
    // pulses so that every sample starts with the coil off.
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
port = "{keypad}"
protocol = "osdp"
[[bus.reader]]
id = "keypad-gate"
address = 0
entry = "gate-1"
secure = "install"
[[bus]]
id = "io"
port = "{board}"
protocol = "modbus"
timeout_ms = 50
[[bus.device]]
id = "relay-board-1"
profile = "waveshare-relay-8ch-d"
address = 1
poll_interval_ms = 10
"#,
            keypad = keypad.path.display(),
            board = board.path.display()
        ),
    )?;
    let cfg = Config::load(&cfg_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Arc::new(Store::open_with(&cfg.data_dir, cfg.log_limits)?);
    gatehouse::cli::import_file(&store, &snap_path)?;
    let engine = Arc::new(AccessEngine::new(store.clone(), None));
    let buses = Rs485::start(&cfg.buses, engine)?;
    // Pairing: install mode, KEYSET, then the secure channel on the new key.
    let paired = wait(Duration::from_secs(20), || {
        store
            .events()
            .read_from(0, 10_000)
            .map(|evs| evs.iter().any(|e| e.kind == "reader_paired"))
            .unwrap_or(false)
    });
    if !paired {
        bail!("the simulated keypad did not pair within 20 s");
    }
    let mut lat = Vec::with_capacity(SAMPLES);
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let served0 = board.served.load(Ordering::Relaxed);
    let t_start = Instant::now();
    for _ in 0..SAMPLES {
        // A random phase against the readers' 50 ms poll.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_micros(150_000 + seed % 60_000));
        let seen_before = board.seen.lock().unwrap().len();
        let t0 = keypad
            .keys("123456#")
            .context("keypad did not take the keys")?;
        let on = wait_for(Duration::from_secs(3), || {
            board.seen.lock().unwrap()[seen_before..]
                .iter()
                .find(|(_, s)| {
                    *s == Seen::Coil {
                        channel: 0,
                        on: true,
                    }
                })
                .map(|(t, _)| *t)
        });
        match on {
            Some(t) => lat.push(t.saturating_duration_since(t0).as_secs_f64() * 1000.0),
            None => bail!("no relay pulse within 3 s of a valid code"),
        }
    }
    let elapsed = t_start.elapsed().as_secs_f64();
    let polls = board.served.load(Ordering::Relaxed) - served0;
    buses.stop(Duration::from_secs(2));
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    let round3 = |v: f64| (v * 1000.0).round() / 1000.0;
    println!(
        "{}",
        json!({
            "poll_interval_ms": OSDP_POLL_MS,
            "code_to_relay_p50_ms": round3(pct(0.50)),
            "code_to_relay_p99_ms": round3(pct(0.99)),
            "polls_per_s": (polls as f64 / elapsed).round(),
            "samples": lat.len(),
        })
    );
    Ok(())
}

fn wait(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    wait_for(timeout, || f().then_some(())).is_some()
}

fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}
