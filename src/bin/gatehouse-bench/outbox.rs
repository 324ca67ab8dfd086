//! `gatehouse-bench outbox`: the event log as the cloud outbox, and the daemon's memory.
//!
//! - `decision_p99_ms_empty`: a flushed decision (`AccessEngine::check`: decide, append, flush)
//!   with an empty log;
//! - `decision_p99_ms_full`: the same with [`BACKLOG`] undelivered events held (every tenth a
//!   security event), at the default bound, so that decisions push the log over it;
//! - `open_s_backlog_1m`: the time to open the database holding that backlog (`Store::open`);
//! - `rss_mb_backlog_1m`: VmRSS of the real daemon (`gatehouse run`, a child process) holding
//!   that backlog, its cloud link unable to reach a broker;
//! - `snapshot_replace_peak_mb`: VmHWM of the daemon, holding a site of 1,000,000 credentials,
//!   while the cloud replaces that site over MQTT (chunked `sync/snapshot` through a local
//!   mosquitto), until `sync/result` says applied;
//! - `resume_after_broker_s_p99`: the broker is stopped for a while and restarted, several
//!   rounds; the time from the restart until the daemon's link publishes again (its `status`),
//!   with the default reconnect settings.
//!
//! The backlog is generated through the public `EventLog` API in large batches before the daemon
//! starts. `GATEHOUSE_BENCH_PHASES=decisions,rss,snapshot` runs only the named phases (default
//! all: `decisions`, `rss`, `snapshot`, `resume`); figures of phases not run are `null`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use chrono::Utc;
use serde_json::json;
use sha2::{Digest, Sha256};

use gatehouse::access::{AccessEngine, Attempt};
use gatehouse::events::EventKind;
use gatehouse::policy::{Direction, Presented, Request, Target};
use gatehouse::store::{LogLimits, NewEvent, Store};

use crate::uplink::{Mosquitto, options};

/// Undelivered events held (the default bound of the log).
const BACKLOG: u64 = 1_000_000;
/// Flushed decisions timed in each state of the log.
const DECISIONS: usize = 2_000;
/// Snapshot bytes per MQTT part (docs/mqtt-api.md suggests 256 KiB).
const PART: usize = 256 * 1024;
/// How long the broker stays away in each resume round, in seconds.
const BROKER_DOWN_S: [u64; 5] = [2, 5, 10, 20, 40];

const DEMO_SNAPSHOT: &str = include_str!("../../../config/demo-snapshot.json");

fn phase(name: &str) -> bool {
    std::env::var("GATEHOUSE_BENCH_PHASES").map_or(true, |v| v.split(',').any(|p| p.trim() == name))
}

pub fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let signer = ed25519_dalek::SigningKey::from_bytes(&[33; 32]);
    let public = hex::encode(signer.verifying_key().to_bytes());

    // 1. Decisions with an empty log, then with the backlog held.
    let backlog_dir = dir.path().join("backlog");
    let data = backlog_dir.join("data");
    let (mut p99_empty, mut p99_full, mut max_full, mut rss_backlog) = (None, None, None, None);
    let mut open_backlog = None;
    if phase("decisions") || phase("rss") {
        let store = Arc::new(Store::open_with(&data, LogLimits::default())?);
        store.apply(&gatehouse::sync::parse(DEMO_SNAPSHOT.as_bytes())?)?;
        let engine = AccessEngine::new(store.clone(), None);
        // Deliver what the import recorded: the log starts empty.
        let (_, last) = store.events().bounds();
        if let Some(last) = last {
            store
                .events()
                .remove_delivered(&(0..=last).collect::<Vec<_>>())?;
        }
        let empty = decisions(&engine)?;
        let t = Instant::now();
        fill(&store, BACKLOG.saturating_sub(store.events().len()))?;
        eprintln!(
            "backlog: {} events, {:.0} MiB of records, generated in {:.1} s",
            store.events().len(),
            store.events().bytes() as f64 / (1 << 20) as f64,
            t.elapsed().as_secs_f64()
        );
        // As in the daemon: trims that an append leaves unfinished are finished every second.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let housekeeping = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_secs(1));
                    let now = Utc::now();
                    if let Err(e) = store.events().trim_pending(now, &now.to_rfc3339()) {
                        eprintln!("trim_pending: {e:#}");
                    }
                }
            })
        };
        let full = decisions(&engine);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = housekeeping.join();
        let full = full?;
        eprintln!(
            "after the full-log decisions the log holds {} events",
            store.events().len()
        );
        store.flush()?;
        // The time to open the database holding the backlog (the daemon's start-up).
        drop(engine);
        drop(store);
        let t = Instant::now();
        let reopened = Store::open_with(&data, LogLimits::default())?;
        open_backlog = Some(t.elapsed().as_secs_f64());
        eprintln!(
            "reopened with {} events in {:.2} s",
            reopened.events().len(),
            t.elapsed().as_secs_f64()
        );
        drop(reopened);
        p99_empty = Some(pct(&empty, 0.99));
        p99_full = Some(pct(&full, 0.99));
        max_full = Some(pct(&full, 1.0));
    }

    // 2. The daemon holding the backlog, its broker unreachable.
    if phase("rss") {
        let dead_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let cfg = write_config(&backlog_dir, dead_port, &public)?;
        let mut d = Daemon::start(&cfg, &backlog_dir)?;
        d.wait_log("starting the cloud link", Duration::from_secs(300))?;
        // Let it settle (the link tries the broker, background flushes run), then sample.
        std::thread::sleep(Duration::from_secs(3));
        let mut rss: f64 = 0.0;
        for _ in 0..20 {
            rss = rss.max(d.status_mb("VmRSS:"));
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "daemon with the backlog: VmRSS {rss:.0} MiB, VmHWM {:.0} MiB",
            d.status_mb("VmHWM:")
        );
        d.stop();
        rss_backlog = Some(rss);
    }
    drop(std::fs::remove_dir_all(&backlog_dir));
    if !phase("snapshot") && !phase("resume") {
        print_figures(
            p99_empty,
            p99_full,
            max_full,
            (open_backlog, rss_backlog),
            None,
            &[],
        );
        return Ok(());
    }

    // 3. and 4. A daemon holding a million credentials, connected to a local mosquitto.
    let site_dir = dir.path().join("site");
    let mut broker = Mosquitto::start(dir.path())?;
    {
        let t = Instant::now();
        let store = Store::open_with(&site_dir.join("data"), LogLimits::default())?;
        store.apply(&gatehouse::sync::SyncMessage::Snapshot(Box::new(
            super::synthetic(),
        )))?;
        store.flush()?;
        eprintln!(
            "initial site of {} credentials imported in {:.1} s",
            super::CREDENTIALS,
            t.elapsed().as_secs_f64()
        );
    }
    let cfg = write_config(&site_dir, broker.port, &public)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut d = Daemon::start(&cfg, &site_dir)?;
    let (replace_peak, resume) = rt.block_on(async {
        let cloud = Cloud::connect(broker.port).await?;
        cloud.wait_status(Duration::from_secs(300)).await?;
        let mut peak = None;
        let open_hwm = d.status_mb("VmHWM:");
        // Count only the replacement: reset the peak if the kernel lets us.
        let reset = std::fs::write(format!("/proc/{}/clear_refs", d.pid()), "5").is_ok();
        eprintln!(
            "daemon open with the site: VmRSS {:.0} MiB, VmHWM {open_hwm:.0} MiB (peak reset: {reset})",
            d.status_mb("VmRSS:")
        );
        if phase("snapshot") {
            let t = Instant::now();
            cloud.send_snapshot().await?;
            let hwm = d.status_mb("VmHWM:");
            eprintln!(
                "snapshot replaced in {:.1} s; daemon VmHWM {hwm:.0} MiB, VmRSS after {:.0} MiB",
                t.elapsed().as_secs_f64(),
                d.status_mb("VmRSS:")
            );
            peak = Some(hwm);
        }

        let mut resume = Vec::new();
        let rounds: &[u64] = if phase("resume") { &BROKER_DOWN_S } else { &[] };
        for &down in rounds {
            broker.kill();
            tokio::time::sleep(Duration::from_secs(down)).await;
            cloud.reset();
            broker.restart()?;
            let back = Instant::now();
            cloud.wait_status(Duration::from_secs(600)).await?;
            let s = back.elapsed().as_secs_f64();
            eprintln!("broker away {down} s: the link published again {s:.2} s after its return");
            resume.push(s);
        }
        anyhow::Ok((peak, resume))
    })?;
    d.stop();
    print_figures(
        p99_empty,
        p99_full,
        max_full,
        (open_backlog, rss_backlog),
        replace_peak,
        &resume,
    );
    Ok(())
}

fn print_figures(
    p99_empty: Option<f64>,
    p99_full: Option<f64>,
    max_full: Option<f64>,
    (open_backlog, rss_backlog): (Option<f64>, Option<f64>),
    replace_peak: Option<f64>,
    resume: &[f64],
) {
    println!(
        "{}",
        json!({
            "backlog": BACKLOG,
            "decision_p99_ms_empty": p99_empty.map(round3),
            "decision_p99_ms_full": p99_full.map(round3),
            "decision_max_ms_full": max_full.map(round3),
            "open_s_backlog_1m": open_backlog.map(round3),
            "rss_mb_backlog_1m": rss_backlog.map(f64::round),
            "snapshot_replace_peak_mb": replace_peak.map(f64::round),
            "resume_after_broker_s_p99": (!resume.is_empty()).then(|| round3(pct(resume, 0.99))),
        })
    );
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The `p` quantile of `v` (0.99: p99; 1.0: the maximum).
fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}

/// Times flushed decisions (a valid code at the gate), in milliseconds.
fn decisions(engine: &AccessEngine) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(DECISIONS);
    for _ in 0..DECISIONS {
        let attempt = Attempt {
            request: Request {
                credential: Presented::Code("123456"),
                target: Target::Entry("gate-1"),
                direction: Direction::In,
            },
            device: Some("keypad-gate-1"),
        };
        let t = Instant::now();
        engine.check(&attempt, Utc::now())?;
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

/// Appends `n` events in large batches (flushed once at the end); every tenth is a security
/// event.
fn fill(store: &Store, n: u64) -> anyhow::Result<()> {
    const BATCH: u64 = 20_000;
    let at = Utc::now();
    let local = at.to_rfc3339();
    let mut i = 0;
    while i < n {
        let k = BATCH.min(n - i);
        let batch: Vec<NewEvent> = (i..i + k)
            .map(|j| {
                let security = j % 10 == 0;
                NewEvent {
                    at,
                    local: local.clone(),
                    kind: if security {
                        EventKind::AccessDenied
                    } else {
                        EventKind::AccessGranted
                    },
                    payload: json!({
                        "reason": if security { "unknown_credential" } else { "tenant" },
                        "credential": "code", "entry": "gate-1", "direction": "in",
                        "units": [format!("U{}", j % 100_000)], "user": format!("u{}", j % 120_000),
                        "device": "keypad-gate-1",
                    }),
                }
            })
            .collect();
        store.events().append_unflushed(&batch)?;
        i += k;
    }
    store.events().flush()
}

fn write_config(dir: &Path, port: u16, public_hex: &str) -> anyhow::Result<PathBuf> {
    let cfg = dir.join("gatehouse.toml");
    std::fs::write(
        &cfg,
        format!(
            "[site]\nid = \"site\"\ngateway_id = \"gw\"\n[storage]\ndata_dir = \"data\"\n\
             [cloud]\nhost = \"127.0.0.1\"\nport = {port}\ntransport = \"tcp\"\n\
             topic_prefix = \"bench\"\ncommand_public_key = \"{public_hex}\"\n"
        ),
    )?;
    Ok(cfg)
}

/// `gatehouse run` as a child process, its log in a file.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(cfg: &Path, dir: &Path) -> anyhow::Result<Daemon> {
        let exe = std::env::current_exe()?
            .parent()
            .context("bench executable directory")?
            .join("gatehouse");
        if !exe.is_file() {
            bail!(
                "`{}` not found: build the daemon too (cargo build --release --bins)",
                exe.display()
            );
        }
        let log = dir.join("daemon.log");
        let child = Command::new(&exe)
            .args(["run", "--config"])
            .arg(cfg)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting `{}`", exe.display()))?;
        Ok(Daemon { child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn status_mb(&self, key: &str) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    fn wait_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains(needle) {
                return Ok(());
            }
            if let Some(st) = self.child.try_wait()? {
                bail!("the daemon exited ({st}): {text}");
            }
            if Instant::now() > deadline {
                bail!("the daemon did not log `{needle}` within {timeout:?}: {text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The cloud's side: a client that watches the gateway's `status` and `sync/result` and sends
/// snapshots. It reconnects by itself when the broker comes back.
struct Cloud {
    client: rumqttc::AsyncClient,
    /// Online statuses and sync results seen since the last [`Cloud::reset`].
    seen: Arc<std::sync::Mutex<(u64, Vec<serde_json::Value>)>>,
    base: String,
}

impl Cloud {
    async fn connect(port: u16) -> anyhow::Result<Cloud> {
        let base = "bench/site/gw".to_string();
        let mut o = options("bench-cloud", port);
        o.set_max_packet_size(4 << 20, 4 << 20);
        o.set_inflight(20);
        let (client, mut el) = rumqttc::AsyncClient::new(o, 64);
        let seen = Arc::new(std::sync::Mutex::new((0u64, Vec::new())));
        let (s, c, b) = (seen.clone(), client.clone(), base.clone());
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = c
                            .subscribe(format!("{b}/status"), rumqttc::QoS::AtLeastOnce)
                            .await;
                        let _ = c
                            .subscribe(format!("{b}/sync/result"), rumqttc::QoS::AtLeastOnce)
                            .await;
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let v: serde_json::Value =
                            serde_json::from_slice(&p.payload).unwrap_or_default();
                        let mut g = s.lock().unwrap_or_else(|e| e.into_inner());
                        if p.topic.ends_with("/status") && v["online"] == true {
                            g.0 += 1;
                        } else if p.topic.ends_with("/sync/result") {
                            g.1.push(v);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        Ok(Cloud { client, seen, base })
    }

    fn reset(&self) {
        let mut g = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = 0;
        g.1.clear();
    }

    /// Waits for an online status (the link publishes one each time it connects).
    async fn wait_status(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.seen.lock().unwrap_or_else(|e| e.into_inner()).0 == 0 {
            if Instant::now() > deadline {
                bail!("no online status from the daemon within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Sends the synthetic site again (version 2) in parts and waits until it is applied.
    async fn send_snapshot(&self) -> anyhow::Result<()> {
        let doc = {
            let mut snap = super::synthetic();
            snap.version = 2;
            serde_json::to_vec(&snap)?
        };
        let sha = hex::encode(Sha256::digest(&doc));
        let count = doc.len().div_ceil(PART);
        eprintln!(
            "snapshot: {:.0} MiB in {count} parts",
            doc.len() as f64 / (1 << 20) as f64
        );
        for (index, part) in doc.chunks(PART).enumerate() {
            let msg = json!({
                "id": "bench-replace", "index": index, "count": count, "sha256": sha,
                "data": base64::engine::general_purpose::STANDARD.encode(part),
            });
            self.client
                .publish(
                    format!("{}/sync/snapshot", self.base),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    serde_json::to_vec(&msg)?,
                )
                .await?;
        }
        drop(doc);
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Some(r) = self
                .seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .1
                .iter()
                .find(|r| r["id"] == "bench-replace")
            {
                if r["status"] == "applied" {
                    return Ok(());
                }
                bail!("snapshot not applied: {r}");
            }
            if Instant::now() > deadline {
                bail!("no sync/result for the snapshot within 600 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `gatehouse-bench outbox-probe snap | log <dir> [cache_mb] | fill <dir> | fillraw <dir> <n> |
/// fillold <dir> <n> | open <dir>`: memory at each stage of replacing a million-credential site
/// in one process, or of opening a database holding a backlog (for finding where the memory
/// goes; prints to stderr). `fillold` writes `n` events as versions before event blocks did (one
/// sled key per event); `open` opens a store (sealing such a log once) and says how long it took.
/// `GH_SEG_KB` sets sled's segment size for `log` and `fillraw`.
pub fn probe(args: &[String]) -> anyhow::Result<()> {
    let rss = |stage: &str| {
        eprintln!(
            "{stage:<40} rss {:>6.0} MiB  hwm {:>6.0} MiB",
            super::rss_now_mb(),
            super::peak_rss_mb()
        )
    };
    match args.first().map(String::as_str) {
        Some("snap") => {
            let key = gatehouse::site::CodeKey::from_bytes([7; 32]);
            let old = gatehouse::site::Site::from_snapshot(&super::synthetic(), &key)?;
            rss("old site");
            let doc = serde_json::to_vec(&super::synthetic())?;
            rss("doc");
            // The daemon's path: parsed compact, the document dropped, the site built while
            // consuming the message, then the generation's chunks made and encoded one by one.
            let msg = gatehouse::sync::parse_for_apply(&doc)?;
            rss("parsed (compact)");
            drop(doc);
            rss("document dropped");
            let gatehouse::sync::Incoming::Snapshot(s) = msg else {
                bail!("not a snapshot")
            };
            let new = gatehouse::site::Site::from_incoming(*s, &key)?;
            rss("new site (message consumed)");
            let small = new.small_snapshot(&key);
            let b = serde_json::to_vec(&small)?;
            drop(small);
            rss("small snapshot");
            let mut n = 0;
            for chunk in gatehouse::site::stored_chunks(&new.creds, 16_384) {
                n += postcard::to_stdvec(&chunk)?.len();
            }
            rss("chunks encoded one by one");
            eprintln!("{} chunk bytes, {} base bytes", n, b.len());
            drop((old, new));
        }
        Some("log") => {
            let dir = Path::new(args.get(1).context("dir")?);
            let cache: u64 = args.get(2).map_or(Ok(8), |s| s.parse())?;
            rss("start");
            let db = probe_config(cache).path(dir.join("db")).open()?;
            rss("sled open");
            let tree = db.open_tree("events")?;
            rss("events tree open");
            let (mut n, mut bytes) = (0u64, 0u64);
            for kv in tree.range(0u64.to_be_bytes()..) {
                let (_, v) = kv?;
                n += 1;
                bytes += v.len() as u64;
            }
            rss(&format!("counted {n} ({bytes} bytes)"));
            let n2 = tree.range(0u64.to_be_bytes()..).keys().count();
            rss(&format!("keys again {n2}"));
        }
        Some("fill") => {
            let dir = Path::new(args.get(1).context("dir")?);
            let store = Store::open_with(dir, LogLimits::default())?;
            fill(&store, BACKLOG)?;
            store.flush()?;
            rss("filled");
        }
        Some("fillraw") => {
            let dir = Path::new(args.get(1).context("dir")?);
            let n: u64 = args.get(2).context("n")?.parse()?;
            let db = probe_config(8).path(dir.join("db")).open()?;
            let tree = db.open_tree("events")?;
            let v = vec![b'x'; 267];
            let mut i = 1u64;
            while i <= n {
                let mut b = sled::Batch::default();
                for j in i..(i + 20_000).min(n + 1) {
                    b.insert(&j.to_be_bytes(), v.clone());
                }
                i += 20_000;
                b.insert(b"", &i.to_be_bytes());
                tree.apply_batch(b)?;
            }
            db.flush()?;
            rss("filled raw");
        }
        Some("fillold") => {
            let dir = Path::new(args.get(1).context("dir")?);
            let n: u64 = args.get(2).context("n")?.parse()?;
            let db = sled::Config::new().path(dir.join("db")).open()?;
            let tree = db.open_tree("events")?;
            let at = Utc::now();
            let mut i = 1u64;
            while i <= n {
                let mut b = sled::Batch::default();
                for seq in i..(i + 20_000).min(n + 1) {
                    let security = seq % 10 == 0;
                    let ev = gatehouse::store::Event {
                        seq,
                        at,
                        local: at.to_rfc3339(),
                        kind: if security {
                            "access_denied"
                        } else {
                            "access_granted"
                        }
                        .into(),
                        payload: json!({
                            "reason": if security { "unknown_credential" } else { "tenant" },
                            "credential": "code", "entry": "gate-1", "direction": "in",
                            "units": [format!("U{}", seq % 100_000)],
                            "user": format!("u{}", seq % 120_000), "device": "keypad-gate-1",
                        }),
                    };
                    b.insert(&seq.to_be_bytes(), serde_json::to_vec(&ev)?);
                }
                i += 20_000;
                b.insert(b"", &i.to_be_bytes());
                tree.apply_batch(b)?;
            }
            db.flush()?;
            rss("filled in the one-key-per-event layout");
        }
        Some("open") => {
            let dir = Path::new(args.get(1).context("dir")?);
            let t = Instant::now();
            let store = Store::open_with(dir, LogLimits::default())?;
            rss(&format!(
                "opened {} events in {:.2} s",
                store.events().len(),
                t.elapsed().as_secs_f64()
            ));
            let t = Instant::now();
            drop(store);
            let store = Store::open_with(dir, LogLimits::default())?;
            rss(&format!(
                "opened again {} events in {:.2} s",
                store.events().len(),
                t.elapsed().as_secs_f64()
            ));
        }
        _ => bail!(
            "usage: outbox-probe snap | log <dir> [cache_mb] | fill <dir> | fillraw <dir> <n> | \
             fillold <dir> <n> | open <dir>"
        ),
    }
    Ok(())
}

fn probe_config(cache_mb: u64) -> sled::Config {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let mut c = sled::Config::new().cache_capacity(cache_mb << 20);
    if let Some(kb) = env("GH_SEG_KB") {
        c = c.segment_size(kb as usize * 1024);
    }
    c
}
