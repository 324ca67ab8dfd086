//! Benchmarks. Each prints one JSON line of figures.
//!
//! `gatehouse-bench access`: builds a synthetic facility of 1,000,000 credentials over 100,000
//! units, imports it as `gatehouse db import` does (parse + check + store), then reopens the
//! database in a fresh child process as the daemon does at start and times at least 100,000
//! random decisions mixing valid, invalid and blacklisted credentials. `rss_mb` is the peak
//! resident size of that reopened, daemon-like process; the import process's own peak is printed
//! on stderr.
//!
//! `gatehouse-bench outbox`: decision latency with a full outbox, the daemon's memory holding a
//! million undelivered events and replacing a million-credential site over MQTT, and how soon
//! the link resumes after the broker returns (see `outbox.rs`).
//!
//! `gatehouse-bench automation`: the automation rules and alert lifecycle (see `automation.rs`).
//! `gatehouse-bench idle`: the daemon's CPU, memory, wakeups and metrics scrape time at rest
//! with two buses, ten BLE devices and the metrics endpoint (see `idle.rs`).
//! `gatehouse-bench pairing`: install-mode scans on the RS-485 buses and what they cost a
//! configured reader (see `pairing.rs`).
//!
//! With `RUST_LOG` set (e.g. `RUST_LOG=gatehouse=debug`), the gatehouse code a bench runs in
//! process logs to stderr, so a slow sample can be traced; stdout keeps its one JSON line.

mod automation;
mod ble;
mod idle;
mod outbox;
mod pairing;
mod rs485;
mod telemetry;
mod uplink;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};
use chrono::{TimeZone, Utc};
use serde_json::json;

use gatehouse::policy::{self, Context, Direction, Presented, Request, Target};
use gatehouse::store::Store;
use gatehouse::sync::{self, Card};

const UNITS: usize = 100_000;
const CREDENTIALS: usize = 1_000_000;
const DECISIONS: usize = 200_000;

// Many small, long-lived allocations (the site's records): mimalloc opens a large site
// faster and smaller than the system allocator (see ARCHITECTURE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("access") => access(),
        Some("access-open") => access_open(Path::new(&args[1])),
        Some("event-log") => event_log(),
        Some("uplink") => uplink::run(),
        Some("rs485") => rs485::run(),
        Some("ble") => ble::run(),
        Some("outbox") => outbox::run(),
        Some("outbox-probe") => outbox::probe(&args[1..]),
        Some("telemetry") => telemetry::run(&args[1..]),
        Some("automation") => automation::run(),
        Some("idle") => idle::run(),
        Some("pairing") => pairing::run(),
        _ => bail!(
            "usage: gatehouse-bench access|event-log|outbox|uplink|rs485|ble|telemetry|automation|idle|pairing"
        ),
    }
}

/// A memory figure of this process from /proc/self/status (`VmRSS`, `VmHWM`), in MiB.
fn status_mb(key: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn rss_now_mb() -> f64 {
    status_mb("VmRSS:")
}

fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

/// Credential `i`: codes, fobs, cards and digital-key ids in turn, all unique.
fn credential(i: usize, users: usize) -> sync::Credential {
    let mut c = sync::Credential {
        id: format!("c{i}"),
        user: format!("u{}", i % users),
        code: None,
        code_hmac: None,
        fob: None,
        card: None,
        key_id: None,
    };
    match i % 4 {
        0 => c.code = Some(code_of(i)),
        1 => c.fob = Some(fob_of(i)),
        2 => c.card = Some(card_of(i)),
        _ => c.key_id = Some(format!("k{i}")),
    }
    c
}

/// 8-digit codes; 7919 is coprime with 10^8, so distinct `i` give distinct codes.
fn code_of(i: usize) -> String {
    format!("{:08}", (i as u64 * 7919) % 100_000_000)
}

fn fob_of(i: usize) -> String {
    format!("F{i:08X}")
}

fn card_of(i: usize) -> Card {
    Card {
        facility_code: Some((i % 200) as u32),
        number: i as u64,
    }
}

fn synthetic() -> sync::Snapshot {
    let users_n = UNITS + UNITS / 5 + 500;
    let mut snap: sync::Snapshot = serde_json::from_value(json!({
        "schema_version": 1, "kind": "snapshot", "version": 1,
        "facility": {
            "time_zone": "America/New_York", "default_schedule": "gate-hours",
            "grace_period_minutes": 30, "use_blacklist": true,
            "temporary_code_enabled": true,
            "temporary_code_secret": "00112233445566778899aabbccddeeff"
        },
        "zones": [{"id": "z1"}, {"id": "z2"}],
        "schedules": [
            {"id": "gate-hours", "windows": [{"days": ["mon","tue","wed","thu","fri","sat","sun"], "start": "06:00", "end": "22:00"}]},
            {"id": "always", "always_open": true}
        ],
        "entries": [
            {"id": "gate-1", "kind": "gate"},
            {"id": "door-1", "kind": "door", "zone": "z1"},
            {"id": "exit-1", "kind": "exit"}
        ]
    }))
    .expect("static facility");
    let statuses = [
        sync::UnitStatus::Occupied,
        sync::UnitStatus::Occupied,
        sync::UnitStatus::Occupied,
        sync::UnitStatus::Occupied,
        sync::UnitStatus::Overlock,
        sync::UnitStatus::Available,
        sync::UnitStatus::PendingAuction,
        sync::UnitStatus::Gatelocked,
    ];
    for u in 0..UNITS {
        let status = statuses[u % statuses.len()];
        snap.units.push(sync::Unit {
            id: format!("U{u}"),
            name: None,
            status,
            tenant: (status != sync::UnitStatus::Available).then(|| format!("u{u}")),
            auction_winner: None,
            zone: Some(if u % 2 == 0 { "z1" } else { "z2" }.into()),
            controller: None,
            ..sync::Unit::new("", status)
        });
    }
    for u in 0..users_n {
        let role = if u < UNITS {
            sync::Role::Tenant
        } else if u < UNITS + UNITS / 5 {
            sync::Role::SharedUser
        } else {
            sync::Role::Employee
        };
        snap.users.push(sync::User {
            id: format!("u{u}"),
            name: None,
            role,
            schedule: (role == sync::Role::Employee).then(|| "always".into()),
            zones: vec![],
            expires_at: None,
        });
        if role == sync::Role::SharedUser {
            snap.shares.push(sync::Share {
                id: format!("s{u}"),
                unit: format!("U{}", u - UNITS),
                user: format!("u{u}"),
                starts_at: None,
                ends_at: None,
            });
        }
    }
    snap.credentials = (0..CREDENTIALS).map(|i| credential(i, users_n)).collect();
    // Blacklist every 100th fob (they remain valid credentials: the blacklist must win).
    for i in (1..CREDENTIALS).step_by(400) {
        snap.blacklist.push(sync::BlacklistEntry {
            id: format!("b{i}"),
            fob: Some(fob_of(i)),
            card: None,
            key_id: None,
            reason: None,
        });
    }
    snap
}

fn access() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("snapshot.json");
    let keep = std::env::var_os("GATEHOUSE_BENCH_KEEP").map(std::path::PathBuf::from);
    {
        let snap = synthetic();
        let f = std::io::BufWriter::new(std::fs::File::create(&file)?);
        serde_json::to_writer(f, &snap)?;
    }
    let data = keep.unwrap_or_else(|| dir.path().join("data"));
    let import_s = {
        let store = Store::open(&data, 100_000)?;
        let started = Instant::now();
        let bytes = std::fs::read(&file)?;
        let msg = sync::parse(&bytes)?;
        drop(bytes);
        store.apply(&msg)?;
        let t = started.elapsed().as_secs_f64();
        drop(msg);
        store.flush()?;
        t
    };
    eprintln!("import process peak rss: {:.0} MiB", peak_rss_mb());
    let out = Command::new(std::env::current_exe()?)
        .arg("access-open")
        .arg(&data)
        .output()
        .context("running the reopen phase")?;
    if !out.status.success() {
        bail!(
            "reopen phase failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut figures: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("reopen phase output")?;
    let mut line = serde_json::Map::new();
    line.insert("credentials".into(), json!(CREDENTIALS));
    line.insert("units".into(), json!(UNITS));
    line.insert("import_s".into(), json!(round3(import_s)));
    for k in ["open_s", "decision_p50_us", "decision_p99_us", "rss_mb"] {
        line.insert(k.into(), figures.remove(k).unwrap_or(json!(null)));
    }
    println!("{}", serde_json::Value::Object(line));
    Ok(())
}

/// The cost of the flush policy: an access event appended and flushed (as before a relay
/// opens) versus appended without waiting for the disk.
fn event_log() -> anyhow::Result<()> {
    use gatehouse::events::EventKind;
    use gatehouse::store::NewEvent;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path(), 1_000_000)?;
    let ev = || NewEvent {
        at: Utc::now(),
        local: "2026-11-23T10:00:00-05:00".into(),
        kind: EventKind::AccessGranted,
        payload: json!({"reason": "tenant", "credential": "code", "entry": "gate-1",
                        "direction": "in", "units": ["A-101"], "user": "alice"}),
    };
    let n = 2_000;
    let mut flushed = Vec::with_capacity(n);
    let mut unflushed = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        store.events().append(&[ev()])?;
        flushed.push(t.elapsed().as_nanos() as u64);
        let t = Instant::now();
        store.events().append_unflushed(&[ev()])?;
        unflushed.push(t.elapsed().as_nanos() as u64);
    }
    let batch = 1_000;
    let t = Instant::now();
    store
        .events()
        .append(&(0..batch).map(|_| ev()).collect::<Vec<_>>())?;
    let batch_us = t.elapsed().as_secs_f64() * 1e6;
    let pct = |v: &mut Vec<u64>, p: f64| {
        v.sort_unstable();
        v[((v.len() as f64 * p) as usize).min(v.len() - 1)] as f64 / 1000.0
    };
    println!(
        "{}",
        json!({
            "appends": n,
            "flushed_append_p50_us": round3(pct(&mut flushed, 0.5)),
            "flushed_append_p99_us": round3(pct(&mut flushed, 0.99)),
            "unflushed_append_p50_us": round3(pct(&mut unflushed, 0.5)),
            "batch_1000_flushed_us_per_event": round3(batch_us / batch as f64),
        })
    );
    Ok(())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The reopen phase, in its own process so that its RSS is the daemon's.
fn access_open(data: &Path) -> anyhow::Result<()> {
    eprintln!("before open: rss {:.0} MiB", rss_now_mb());
    let started = Instant::now();
    let store = Store::open(data, 100_000)?;
    let open_s = started.elapsed().as_secs_f64();
    eprintln!(
        "after open: rss {:.0} MiB, peak {:.0} MiB",
        rss_now_mb(),
        peak_rss_mb()
    );
    let users_n = UNITS + UNITS / 5 + 500;
    let stats = store.stats();
    if stats.counts.credentials != CREDENTIALS {
        bail!("reopened with {} credentials", stats.counts.credentials);
    }
    // A fixed, in-hours instant: 10:00 in New York.
    let at = Utc.with_ymd_and_hms(2026, 11, 23, 15, 0, 0).unwrap();
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut granted, mut blacklisted) = (0usize, 0usize);
    let mut times = Vec::with_capacity(DECISIONS);
    let key_site = store.code_key().clone();
    for n in 0..DECISIONS {
        let r = next();
        let i = (r % CREDENTIALS as u64) as usize;
        // Mix: 60% valid codes/fobs/cards, 25% invalid, 15% blacklisted fobs.
        let (code, fob, card);
        let credential = match n % 20 {
            0..=11 => match i % 4 {
                0 => {
                    code = code_of(i);
                    Presented::Code(&code)
                }
                1 | 3 => {
                    fob = fob_of(i | 1);
                    Presented::Fob(&fob)
                }
                _ => {
                    card = card_of(i);
                    Presented::Card(card)
                }
            },
            12..=16 => {
                code = format!("9{:08}", i);
                Presented::Code(&code)
            }
            _ => {
                fob = fob_of(1 + 400 * (i % (CREDENTIALS / 400)));
                Presented::Fob(&fob)
            }
        };
        let unit = format!("U{}", i % UNITS);
        let target = if n % 3 == 0 {
            Target::Unit(&unit)
        } else {
            Target::Entry(if n % 3 == 1 { "gate-1" } else { "door-1" })
        };
        let req = Request {
            credential,
            target,
            direction: Direction::In,
        };
        let t0 = Instant::now();
        let d = {
            let site = store.site();
            let ctx = Context {
                code_key: &key_site,
                digital_key_public: None,
            };
            policy::decide(&site, &ctx, &req, at)
        };
        times.push(t0.elapsed().as_nanos() as u64);
        granted += d.granted as usize;
        blacklisted += (d.reason == policy::Reason::Blacklisted) as usize;
    }
    let _ = users_n;
    if granted == 0 || blacklisted == 0 {
        bail!("decision mix is degenerate: {granted} granted, {blacklisted} blacklisted");
    }
    times.sort_unstable();
    let pct =
        |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)] as f64 / 1000.0;
    eprintln!("decisions: {DECISIONS}, granted {granted}, blacklisted {blacklisted}");
    println!(
        "{}",
        json!({
            "open_s": round3(open_s),
            "decision_p50_us": round3(pct(0.50)),
            "decision_p99_us": round3(pct(0.99)),
            "rss_mb": peak_rss_mb().round(),
        })
    );
    Ok(())
}
