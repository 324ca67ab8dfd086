//! Command lanes: the commands of a session run one thread per target (unit, entry, device),
//! in arrival order within a lane, so that a slow device holds up only its own commands (see
//! docs/guarantees.md, Commands). The cloud link feeds [`CmdJob`]s to [`dispatch_commands`];
//! outcomes go back to it over a channel, or wait in `unsent` for the next session.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use serde_json::json;
use tokio::sync::mpsc;

use super::commands::{self, Effect, Outcome};
use super::link::Commands;
use crate::events::EventKind;
use crate::store::Store;

/// Lanes at most per session; commands for further targets share the `main` lane.
const MAX_LANES: usize = 16;

/// The lane of a job: its command's target, or the woken device.
fn lane_of(job: &CmdJob, c: &Commands) -> String {
    match job {
        CmdJob::Wake(device) => format!("device:{device}"),
        CmdJob::Message(name, bytes) => {
            match commands::verify(bytes, name, &c.cfg, Utc::now()) {
                // Installer pairing has its own lane: an adoption provisions a device (seconds)
                // without holding up `ping` or `resync`.
                Ok(cmd) if matches!(cmd.name.as_str(), "install_mode" | "adopt" | "remove") => {
                    "pairing".into()
                }
                Ok(cmd) => match cmd.target {
                    Some(t) => match (t.unit, t.entry, t.device) {
                        (Some(u), _, _) => format!("unit:{u}"),
                        (_, Some(e), _) => format!("entry:{e}"),
                        (_, _, Some(d)) => format!("device:{d}"),
                        _ => "main".into(),
                    },
                    None => "main".into(),
                },
                // Refused before any effect: answered at once, in the main lane.
                Err(_) => "main".into(),
            }
        }
    }
}

/// Runs the command jobs of a session in lanes (see `session_once`).
pub(super) fn dispatch_commands(
    jobs: std::sync::mpsc::Receiver<CmdJob>,
    c: &Arc<Commands>,
    store: &Arc<Store>,
    tx: &mpsc::Sender<Vec<Outcome>>,
    unsent: &Arc<std::sync::Mutex<Vec<Outcome>>>,
) {
    let mut lanes: HashMap<String, std::sync::mpsc::Sender<CmdJob>> = HashMap::new();
    for job in jobs {
        let mut key = lane_of(&job, c);
        if !lanes.contains_key(&key) && lanes.len() >= MAX_LANES {
            key = "main".into();
        }
        let lane = lanes.entry(key.clone()).or_insert_with(|| {
            let (lane_tx, lane_rx) = std::sync::mpsc::channel::<CmdJob>();
            let (c, store, tx, unsent) = (c.clone(), store.clone(), tx.clone(), unsent.clone());
            let spawned = std::thread::Builder::new()
                .name("cmd-lane".into())
                .spawn(move || {
                    for job in lane_rx {
                        run_command_job(job, &c, &store, &tx, &unsent);
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("could not start a command lane: {e}");
            }
            lane_tx
        });
        // A lane that could not start: run the job here.
        if let Err(std::sync::mpsc::SendError(job)) = lane.send(job) {
            lanes.remove(&key);
            run_command_job(job, c, store, tx, unsent);
        }
    }
}

fn run_command_job(
    job: CmdJob,
    c: &Commands,
    store: &Store,
    tx: &mpsc::Sender<Vec<Outcome>>,
    unsent: &std::sync::Mutex<Vec<Outcome>>,
) {
    let out = match job {
        CmdJob::Message(name, payload) => vec![commands::handle(
            &c.router,
            store,
            &payload,
            &name,
            Utc::now(),
            &c.cfg,
        )],
        CmdJob::Wake(device) => commands::handle_wake(&c.router, store, &device, Utc::now()),
    };
    record_effects(store, &out);
    if !out.is_empty()
        && let Err(e) = tx.blocking_send(out)
    {
        // The session ended meanwhile: the next one publishes these.
        keep_unsent(unsent, e.0);
    }
}

pub(super) fn keep_unsent(unsent: &std::sync::Mutex<Vec<Outcome>>, outcomes: Vec<Outcome>) {
    unsent
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(outcomes);
}

/// Work for the command lanes, in arrival order.
pub(super) enum CmdJob {
    /// A message from `cmd/<name>`.
    Message(String, Vec<u8>),
    /// A sleeping device woke up: run what waits for it.
    Wake(String),
}

/// Records what commands did: unlocks, override unlocks, install mode, refusals.
pub(super) fn record_effects(store: &Store, outcomes: &[Outcome]) {
    for o in outcomes {
        let mut events: Vec<(EventKind, serde_json::Value)> = Vec::new();
        for e in &o.effects {
            match e {
                Effect::RemoteUnlock(u) => events.push((EventKind::RemoteUnlock, json!(u))),
                Effect::OverrideUnlock { unlock, emergency } => {
                    let mut v = json!(unlock);
                    v["emergency"] = json!(emergency);
                    events.push((EventKind::OverrideUnlock, v));
                }
                Effect::InstallMode { until } => events.push((
                    EventKind::InstallModeRequested,
                    json!({"command_id": o.result.id, "until": until, "active": until.is_some()}),
                )),
                Effect::Resync => {}
            }
        }
        if !o.duplicate && matches!(o.result.status.as_str(), "refused" | "malformed") {
            events.push((EventKind::CommandRefused, json!(o.result)));
        }
        for (kind, payload) in events {
            if let Err(e) = store.record_flushed(kind, payload) {
                tracing::error!("recording a command outcome: {e:#}");
            }
        }
    }
}
