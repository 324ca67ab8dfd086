//! The devices' side and the [`Router`]: the traits commands reach devices through
//! ([`UnitControllers`], [`Relays`], with [`Online`] and [`Execution`]), what a command did
//! ([`Outcome`], its [`Effect`]s), and the router that checks the device, executes a [`Plan`],
//! keeps commands for sleeping devices until they wake ([`Router::wake`]) or expire
//! ([`Router::expire`]), and hands install mode, adoption and removal to [`Pairing`].

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use super::{
    Emergency, InstallMode, MAX_PENDING, Plan, Reason, Refusal, RelayOp, Request, TargetRef,
    UnitAction, parse, resolve,
};
use crate::cloud::messages::{Command, CommandResult};
use crate::pairing::{PairError, Pairing, ScanOptions};
use crate::site::Tables;

// ---------------------------------------------------------------------------------------------
// Devices

/// Whether a device can take a command now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Online {
    Yes,
    /// Offline: the command is refused (`target_offline`).
    No,
    /// Sleeping (BLE padlocks): the command waits, until it expires, for the device to wake.
    Asleep,
    /// Not a device of this gateway.
    Unknown,
}

/// What a device did with a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Execution {
    /// Done; the text goes into the result's `detail`.
    Done(String),
    /// The device turned out to be asleep: the router keeps the command pending and tries again
    /// at [`Router::wake`].
    Queued,
    /// The device reported an error (result `failed`, reason `device_error`, this text as
    /// `detail`).
    Failed(String),
}

/// Unit controllers and padlocks. Calls are synchronous and may block briefly (a bridge should
/// bound its own wait); the cloud link calls [`handle`](super::handle) from a blocking task.
pub trait UnitControllers: Send + Sync {
    fn online(&self, device: &str) -> Online;
    fn execute(&self, device: &str, action: UnitAction) -> Execution;
    /// [`Self::execute`], with the time its outcome was reached when that is not the moment
    /// handling began (a BLE lock that waits for the cloud's packets): the result's `at`.
    fn execute_timed(
        &self,
        device: &str,
        action: UnitAction,
    ) -> (Execution, Option<DateTime<Utc>>) {
        (self.execute(device, action), None)
    }
}

/// Relay outputs (entry gates and doors, raw relay devices). Same calling rules as
/// [`UnitControllers`].
pub trait Relays: Send + Sync {
    fn online(&self, device: &str) -> Online;
    fn execute(&self, device: &str, channel: u16, op: RelayOp) -> Execution;
}

// ---------------------------------------------------------------------------------------------
// Router

/// Something the cloud link must do or record besides publishing the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// An `unlock` reached its final outcome: log a `remote_unlock` event.
    RemoteUnlock(UnlockRecord),
    /// An `emergency_unlock` reached its final outcome: log an `override_unlock` event (and
    /// the cloud notifies the tenant).
    OverrideUnlock {
        unlock: UnlockRecord,
        emergency: Emergency,
    },
    /// `resync`: republish `status` and ask the cloud for a snapshot.
    Resync,
    /// `install_mode`: installer mode until this instant, or stopped (`None`).
    InstallMode { until: Option<DateTime<Utc>> },
}

/// The final outcome of an unlock, for the event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnlockRecord {
    pub command_id: String,
    pub target: TargetRef,
    /// The controller or relay device, when the target was resolved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// `done`, `failed`, `refused` or `expired`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What handling one command message (or a wake-up, or an expiry) produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// To publish on `cmd/<result.name>/result`.
    pub result: CommandResult,
    pub effects: Vec<Effect>,
    /// A second delivery of a claimed id: answered with the stored result, not executed, no
    /// effects.
    pub duplicate: bool,
}

impl Outcome {
    pub(super) fn of(result: CommandResult) -> Self {
        Outcome {
            result,
            effects: Vec::new(),
            duplicate: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DeviceOp {
    Unit(UnitAction),
    Relay { channel: u16, op: RelayOp },
}

/// A command bound for a device.
#[derive(Debug, Clone)]
struct Job {
    id: String,
    name: String,
    expires_at: DateTime<Utc>,
    device: String,
    op: DeviceOp,
    /// The device comes from the site (a unit's controller, an entry's relay): a device this
    /// gateway does not have is `no_controller`, not `unknown_target`.
    from_site: bool,
    unlock: Option<(TargetRef, Option<Emergency>)>,
}

pub(super) fn result(
    id: &str,
    name: &str,
    status: &str,
    reason: Option<&str>,
    detail: Option<String>,
    at: DateTime<Utc>,
) -> CommandResult {
    CommandResult {
        id: Some(id.to_string()),
        id_truncated: None,
        name: name.to_string(),
        status: status.to_string(),
        reason: reason.map(str::to_string),
        detail,
        at,
    }
}

fn unlock_effect(
    unlock: Option<(TargetRef, Option<Emergency>)>,
    device: Option<String>,
    r: &CommandResult,
) -> Option<Effect> {
    let (target, emergency) = unlock?;
    let record = UnlockRecord {
        command_id: r.id.clone().unwrap_or_default(),
        target,
        device,
        status: r.status.clone(),
        reason: r.reason.clone(),
    };
    Some(match emergency {
        None => Effect::RemoteUnlock(record),
        Some(emergency) => Effect::OverrideUnlock {
            unlock: record,
            emergency,
        },
    })
}

impl Job {
    /// A final outcome (done, failed, refused, expired) with the unlock effect if any.
    fn finish(self, r: CommandResult) -> Outcome {
        let effects = unlock_effect(self.unlock, Some(self.device), &r)
            .into_iter()
            .collect();
        Outcome {
            result: r,
            effects,
            duplicate: false,
        }
    }
}

/// Routes commands to unit controllers and relays, and keeps those for sleeping devices until
/// the device wakes ([`Router::wake`]) or the command expires ([`Router::expire`]).
/// Pending commands live in memory only: after a restart their stored result stays `queued`.
pub struct Router {
    units: Arc<dyn UnitControllers>,
    relays: Arc<dyn Relays>,
    pending: Mutex<Vec<Job>>,
    pairing: Option<Arc<Pairing>>,
}

impl Router {
    pub fn new(units: Arc<dyn UnitControllers>, relays: Arc<dyn Relays>) -> Self {
        Router {
            units,
            relays,
            pending: Mutex::new(Vec::new()),
            pairing: None,
        }
    }

    /// Installer pairing: `install_mode`, `adopt` and `remove` go to it.
    pub fn with_pairing(mut self, pairing: Arc<Pairing>) -> Self {
        self.pairing = Some(pairing);
        self
    }

    /// `install_mode`, `adopt`, `remove` with installer pairing (blocking: flushes, the
    /// provisioner's work).
    fn pairing_plan(&self, cmd: &Command, plan: &Plan, now: DateTime<Utc>) -> Option<Outcome> {
        let by = format!("command:{}", cmd.id);
        let failed = |e: PairError| {
            Outcome::of(result(
                &cmd.id,
                &cmd.name,
                e.reason.status(),
                Some(e.reason.as_str()),
                Some(e.detail),
                now,
            ))
        };
        let done = |detail: String| {
            Outcome::of(result(&cmd.id, &cmd.name, "done", None, Some(detail), now))
        };
        let Some(p) = &self.pairing else {
            return match plan {
                Plan::Adopt(_) | Plan::Remove { .. } => Some(failed(PairError::new(
                    crate::pairing::PairReason::NotInInstallMode,
                    "this gateway has no installer pairing",
                ))),
                _ => None,
            };
        };
        Some(match plan {
            Plan::InstallMode(InstallMode::Start { minutes }) => {
                match p.start(*minutes, &by, ScanOptions::default()) {
                    Ok(until) => done(format!("install mode until {}", until.to_rfc3339())),
                    Err(e) => failed(e),
                }
            }
            Plan::InstallMode(InstallMode::Stop) => done(if p.stop(&by) {
                "install mode stopped".into()
            } else {
                "install mode was not active".into()
            }),
            Plan::Adopt(spec) => match p.adopt(spec, &by) {
                Ok(r) => done(format!("adopted as `{}`", r.id)),
                Err(e) => failed(e),
            },
            Plan::Remove { device } => match p.remove(device, &by) {
                Ok(r) => done(format!("removed `{}`", r.id)),
                Err(e) => failed(e),
            },
            _ => return None,
        })
    }

    /// Parses, resolves against `tables` and executes an authentic command (no store involved:
    /// see [`handle`](super::handle) for the exactly-once wrapper).
    pub fn dispatch(&self, cmd: &Command, tables: &Tables, now: DateTime<Utc>) -> Outcome {
        let request = match parse(cmd) {
            Ok(r) => r,
            Err(refusal) => return Outcome::of(refusal.to_result(&cmd.name, now)),
        };
        let unlock = match &request {
            Request::Unlock { target, emergency } => Some((target.clone(), emergency.clone())),
            _ => None,
        };
        let plan = match resolve(&request, tables, &cmd.id) {
            Ok(p) => p,
            Err(refusal) => {
                let r = refusal.to_result(&cmd.name, now);
                let effects = unlock_effect(unlock, None, &r).into_iter().collect();
                return Outcome {
                    result: r,
                    effects,
                    duplicate: false,
                };
            }
        };
        let done = |detail: String, effect: Effect| Outcome {
            result: result(&cmd.id, &cmd.name, "done", None, Some(detail), now),
            effects: vec![effect],
            duplicate: false,
        };
        if let Some(o) = self.pairing_plan(cmd, &plan, now) {
            return o;
        }
        let (device, op) = match plan {
            // Answered by `pairing_plan` (always): a guard, never reached.
            Plan::Adopt(_) | Plan::Remove { .. } => {
                return Outcome::of(result(
                    &cmd.id,
                    &cmd.name,
                    "failed",
                    Some("no_provisioner"),
                    None,
                    now,
                ));
            }
            Plan::Ping => {
                return Outcome::of(result(
                    &cmd.id,
                    &cmd.name,
                    "done",
                    None,
                    Some("pong".into()),
                    now,
                ));
            }
            Plan::Resync => return done("resync requested".into(), Effect::Resync),
            Plan::InstallMode(InstallMode::Start { minutes }) => {
                let until = now
                    .checked_add_signed(Duration::minutes(minutes.into()))
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
                return done(
                    format!("install mode until {}", until.to_rfc3339()),
                    Effect::InstallMode { until: Some(until) },
                );
            }
            Plan::InstallMode(InstallMode::Stop) => {
                return done(
                    "install mode stopped".into(),
                    Effect::InstallMode { until: None },
                );
            }
            Plan::Unit { device, action } => (device, DeviceOp::Unit(action)),
            Plan::Relay {
                device,
                channel,
                op,
            } => (device, DeviceOp::Relay { channel, op }),
        };
        let from_site = !matches!(request, Request::Relay { .. });
        self.run(
            Job {
                id: cmd.id.clone(),
                name: cmd.name.clone(),
                expires_at: cmd.expires_at,
                device,
                op,
                from_site,
                unlock,
            },
            now,
        )
    }

    fn online(&self, job: &Job) -> Online {
        match job.op {
            DeviceOp::Unit(_) => self.units.online(&job.device),
            DeviceOp::Relay { .. } => self.relays.online(&job.device),
        }
    }

    /// The device's outcome, and when it was reached (`now` unless the device says otherwise).
    fn execute(&self, job: &Job, now: DateTime<Utc>) -> (Execution, DateTime<Utc>) {
        match job.op {
            DeviceOp::Unit(action) => {
                let (e, at) = self.units.execute_timed(&job.device, action);
                (e, at.unwrap_or(now))
            }
            DeviceOp::Relay { channel, op } => (self.relays.execute(&job.device, channel, op), now),
        }
    }

    fn run(&self, job: Job, now: DateTime<Utc>) -> Outcome {
        let refuse = |job: Job, reason: Reason, detail: String| {
            let r = Refusal::new(reason, Some(job.id.clone()))
                .detail(detail)
                .to_result(&job.name, now);
            job.finish(r)
        };
        match self.online(&job) {
            Online::Unknown => {
                let (reason, detail) = if job.from_site {
                    (
                        Reason::NoController,
                        format!("device `{}` is not configured on this gateway", job.device),
                    )
                } else {
                    (Reason::UnknownTarget, format!("no device `{}`", job.device))
                };
                refuse(job, reason, detail)
            }
            Online::No => {
                let detail = format!("device `{}` is offline", job.device);
                refuse(job, Reason::TargetOffline, detail)
            }
            Online::Asleep => self.enqueue(job, now),
            Online::Yes => match self.execute(&job, now) {
                (Execution::Queued, at) => self.enqueue(job, at),
                (Execution::Done(detail), at) => {
                    let r = result(&job.id, &job.name, "done", None, Some(detail), at);
                    job.finish(r)
                }
                (Execution::Failed(detail), at) => {
                    let r = result(
                        &job.id,
                        &job.name,
                        "failed",
                        Some("device_error"),
                        Some(detail),
                        at,
                    );
                    job.finish(r)
                }
            },
        }
    }

    fn enqueue(&self, job: Job, now: DateTime<Utc>) -> Outcome {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() >= MAX_PENDING {
            drop(pending);
            let r = Refusal::new(Reason::QueueFull, Some(job.id.clone()))
                .detail(format!("{MAX_PENDING} commands already wait for devices"))
                .to_result(&job.name, now);
            return job.finish(r);
        }
        let r = result(
            &job.id,
            &job.name,
            "queued",
            None,
            Some(format!(
                "waiting for `{}` to wake, until {}",
                job.device,
                job.expires_at.to_rfc3339()
            )),
            now,
        );
        pending.push(job);
        Outcome::of(r)
    }

    /// `device` woke up: executes its pending commands in the order they came and returns their
    /// final outcomes (those past expiry are `expired`). If the device goes back to sleep
    /// ([`Execution::Queued`]), it and the commands after it stay pending.
    pub fn wake(&self, device: &str, now: DateTime<Utc>) -> Vec<Outcome> {
        let mine: Vec<Job> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let (mine, rest) = std::mem::take(&mut *pending)
                .into_iter()
                .partition(|j| j.device == device);
            *pending = rest;
            mine
        };
        let mut out = Vec::new();
        let mut jobs = mine.into_iter();
        // The time moves on as the device works through them: each result is stamped, and each
        // expiry checked, when it is reached.
        let mut now = now;
        while let Some(job) = jobs.next() {
            if job.expires_at <= now {
                out.push(expired(job, now));
                continue;
            }
            let (e, at) = self.execute(&job, now);
            now = now.max(at);
            let r = match e {
                Execution::Done(detail) => {
                    result(&job.id, &job.name, "done", None, Some(detail), at)
                }
                Execution::Failed(detail) => result(
                    &job.id,
                    &job.name,
                    "failed",
                    Some("device_error"),
                    Some(detail),
                    at,
                ),
                Execution::Queued => {
                    let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                    pending.push(job);
                    pending.extend(jobs);
                    break;
                }
            };
            out.push(job.finish(r));
        }
        out
    }

    /// Removes pending commands whose `expires_at` has passed and returns their `expired`
    /// outcomes (reason `target_asleep`).
    pub fn expire(&self, now: DateTime<Utc>) -> Vec<Outcome> {
        let gone: Vec<Job> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let (gone, rest) = std::mem::take(&mut *pending)
                .into_iter()
                .partition(|j| j.expires_at <= now);
            *pending = rest;
            gone
        };
        gone.into_iter().map(|j| expired(j, now)).collect()
    }

    /// Ids of the commands waiting for sleeping devices, with their devices.
    pub fn pending(&self) -> Vec<(String, String)> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|j| (j.id.clone(), j.device.clone()))
            .collect()
    }
}

fn expired(job: Job, now: DateTime<Utc>) -> Outcome {
    let detail = format!("`{}` did not wake before the command expired", job.device);
    let r = result(
        &job.id,
        &job.name,
        "expired",
        Some("target_asleep"),
        Some(detail),
        now,
    );
    job.finish(r)
}
