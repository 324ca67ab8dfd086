//! `gatehouse-bench outbox`: the cost of a flushed decision event with a full outbox.
//!
//! Three logs: empty; 1,000,000 undelivered events held (every tenth a security event) at the
//! count bound of 1,000,000, so the decisions measured take it over (one trim of 5 %); and
//! security events alone over the bound (100,000 held, bound 50,000), where every decision adds a
//! droppable event. Figures: p50/p99/max of one flushed append of an `access_granted` event, the
//! p99 ratios against the empty log (target ≤ 2), records read by trims, overflow records held.
//! `OUTBOX_BENCH_EVENTS` scales the full log down (e.g. 100000 for a quick run).

use std::time::Instant;

use chrono::Utc;
use gatehouse::events::EventKind;
use gatehouse::store::{LogLimits, NewEvent, Store};
use serde_json::json;

fn ev(kind: EventKind, i: u64) -> NewEvent {
    NewEvent {
        at: Utc::now(),
        local: "2026-11-23T10:00:00-05:00".into(),
        kind,
        payload: json!({"reason": "tenant", "credential": "code", "entry": "gate-1",
                        "direction": "in", "units": ["A-101"], "user": "alice", "i": i}),
    }
}

struct Run {
    p50: f64,
    p99: f64,
    max: f64,
    trim_reads: u64,
    overflow_held: usize,
    held: u64,
}

fn measure(store: &Store, n: u64) -> anyhow::Result<Run> {
    let reads_before = store.events().trim_reads();
    let mut us = Vec::with_capacity(n as usize);
    for i in 0..n {
        let t = Instant::now();
        store.events().append(&[ev(EventKind::AccessGranted, i)])?;
        us.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    us.sort_by(f64::total_cmp);
    let pct = |p: f64| us[((us.len() as f64 * p) as usize).min(us.len() - 1)];
    let overflow_held = store
        .events()
        .read_from(0, usize::MAX)?
        .iter()
        .filter(|e| e.kind == "outbox_overflow")
        .count();
    Ok(Run {
        p50: pct(0.5),
        p99: pct(0.99),
        max: us[us.len() - 1],
        trim_reads: store.events().trim_reads() - reads_before,
        overflow_held,
        held: store.events().len(),
    })
}

fn fill(store: &Store, n: u64, every_security: u64) -> anyhow::Result<()> {
    let batch = 10_000;
    let mut i = 0;
    while i < n {
        let k = batch.min(n - i);
        let events: Vec<NewEvent> = (i..i + k)
            .map(|j| {
                let kind = if every_security > 0 && j % every_security == 0 {
                    EventKind::AccessDenied
                } else {
                    EventKind::AccessGranted
                };
                ev(kind, j)
            })
            .collect();
        store.events().append(&events)?;
        i += k;
    }
    Ok(())
}

fn report(name: &str, r: &Run, base_p99: f64) -> serde_json::Value {
    json!({
        "log": name,
        "held": r.held,
        "p50_us": (r.p50 * 10.0).round() / 10.0,
        "p99_us": (r.p99 * 10.0).round() / 10.0,
        "max_us": r.max.round(),
        "p99_vs_empty": (r.p99 / base_p99 * 100.0).round() / 100.0,
        "trim_reads": r.trim_reads,
        "overflow_records_held": r.overflow_held,
    })
}

pub fn run() -> anyhow::Result<()> {
    let full: u64 = std::env::var("OUTBOX_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let n = 5_000;
    let empty = {
        let dir = tempfile::tempdir()?;
        let store = Store::open_with(dir.path(), LogLimits::with_max_events(full))?;
        measure(&store, n)?
    };
    let at_bound = {
        let dir = tempfile::tempdir()?;
        let store = Store::open_with(dir.path(), LogLimits::with_max_events(full))?;
        let t = Instant::now();
        fill(&store, full, 10)?;
        eprintln!("filled {full} events in {:.1} s", t.elapsed().as_secs_f64());
        measure(&store, n)?
    };
    let security_over = {
        let dir = tempfile::tempdir()?;
        let store = Store::open_with(dir.path(), LogLimits::with_max_events(full / 20))?;
        fill(&store, full / 10, 1)?;
        measure(&store, n)?
    };
    for (name, r) in [
        ("empty", &empty),
        ("full_at_bound_10pct_security", &at_bound),
        ("security_alone_over_bound", &security_over),
    ] {
        println!("{}", report(name, r, empty.p99));
    }
    Ok(())
}
