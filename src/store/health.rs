//! Storage health, and the reopen that recovers from a failed disk.
//!
//! sled keeps the first write error it meets (typically `ENOSPC`, a full disk) and fails every
//! later write until the database is reopened. So:
//!
//! - any operation of the store that fails calls [`super::Core::report_error`], which wakes the
//!   recovery thread; the thread also checks by itself every [`ROUND`]. A check is a
//!   `flush` of sled, which returns the kept error (and costs nothing when nothing is dirty).
//!   An error makes the store [`Health::Failed`] (logged once at error level).
//! - while failed, writes fail: access decisions are refused (their event cannot be recorded),
//!   commands are answered `failed` with reason `storage`.
//! - every [`ROUND`] the failed store writes and removes a [`PROBE_BYTES`] probe file next to
//!   the database. Once that works it reopens: it drops every sled handle (the store's, the
//!   event log's, the command log's, the lived clock's: sled holds a file lock until the last
//!   one goes), opens sled again, attaches them, writes and flushes a probe key, and reloads the
//!   site if what is on disk differs from what is in memory (a write that sled took but never
//!   wrote). Then it records `storage_failed` (with `since`, what failed and the error) and
//!   `storage_recovered`, and the store is [`Health::Ok`] again.
//!
//! A reopen holds the write locks of the handles and the event log, so no operation sees a
//! half-reopened store. If sled cannot be opened again within [`REOPEN_WAIT`] (a handle that is
//! not let go, a broken file system), the process exits (code 75) so that its supervisor restarts
//! it: nothing else can bring the database back.

use std::io::Write as _;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Core, EventLog, Handles, NewEvent, open_db, read_meta};
use crate::events::EventKind;

/// How often the recovery thread checks.
pub const ROUND: Duration = Duration::from_secs(2);
/// Bytes of the probe file that tells a failed store the disk takes writes again.
const PROBE_BYTES: usize = 1 << 20;
/// How long a reopen waits for the old handles to be let go.
const REOPEN_WAIT: Duration = Duration::from_secs(10);

/// Whether the database takes writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Health {
    #[default]
    Ok,
    /// A write failed at `since`; decisions are refused until the database is reopened.
    Failed {
        since: DateTime<Utc>,
        /// What the store was doing when the failure was noticed.
        what: String,
        /// sled's error.
        error: String,
    },
}

impl Health {
    pub fn is_ok(&self) -> bool {
        matches!(self, Health::Ok)
    }
}

#[derive(Default)]
struct Cell {
    health: Health,
    /// The first operation reported failing since the last check.
    reported: Option<String>,
    wake: bool,
    stop: bool,
}

#[derive(Default)]
pub(super) struct HealthCell {
    cell: Mutex<Cell>,
    cond: Condvar,
}

impl HealthCell {
    fn lock(&self) -> std::sync::MutexGuard<'_, Cell> {
        self.cell.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn get(&self) -> Health {
        self.lock().health.clone()
    }

    pub(super) fn report(&self, what: &str) {
        let mut c = self.lock();
        if c.health.is_ok() {
            c.reported.get_or_insert_with(|| what.to_string());
            c.wake = true;
            self.cond.notify_all();
        }
    }
}

/// The recovery thread; stopped (and joined) by [`Recovery::stop`].
pub(super) struct Recovery {
    core: Arc<Core>,
    thread: JoinHandle<()>,
}

impl Recovery {
    pub(super) fn start(core: Arc<Core>) -> Recovery {
        let c = core.clone();
        let thread = std::thread::Builder::new()
            .name("store-health".into())
            .spawn(move || {
                // Its turns are the store's liveness (`supervise`): a check or a reopen that
                // hangs in the file system holds the watchdog.
                let beat = crate::liveness::register("store");
                loop {
                    beat.tick();
                    {
                        let cell = c.health.lock();
                        let (mut cell, _) = c
                            .health
                            .cond
                            .wait_timeout_while(cell, ROUND, |x| !x.wake && !x.stop)
                            .unwrap_or_else(|e| e.into_inner());
                        if cell.stop {
                            return;
                        }
                        cell.wake = false;
                    }
                    c.round();
                }
            })
            .expect("spawning the store health thread");
        Recovery { core, thread }
    }

    pub(super) fn stop(self) {
        {
            let mut c = self.core.health.lock();
            c.stop = true;
            self.core.health.cond.notify_all();
        }
        let _ = self.thread.join();
    }
}

impl Core {
    /// One check: notices a failure, or tries to recover from one.
    fn round(&self) {
        if self.health.get().is_ok() {
            let err = match self.h() {
                Ok(h) => h.db.flush().err().map(|e| e.to_string()),
                Err(e) => Some(format!("{e:#}")),
            };
            let mut c = self.health.lock();
            let what = c.reported.take();
            if let Some(error) = err {
                let what = what.unwrap_or_else(|| "writing to the database".into());
                tracing::error!(
                    what = %what,
                    "storage failed: {error}; access decisions are refused and commands fail \
                     until the disk takes writes again (checked every {} s)",
                    ROUND.as_secs()
                );
                c.health = Health::Failed {
                    since: Utc::now(),
                    what,
                    error,
                };
            }
            return;
        }
        if let Err(e) = self.probe_space() {
            tracing::debug!("storage still failing: {e:#}");
            return;
        }
        match self.recover() {
            Ok(()) => {}
            Err(e) => tracing::warn!("storage: reopening the database failed: {e:#}"),
        }
    }

    /// Writes, syncs and removes a probe file next to the database.
    fn probe_space(&self) -> anyhow::Result<()> {
        let path = self.dir.join(".space-probe");
        let r = (|| {
            let mut f = std::fs::File::create(&path)?;
            f.write_all(&vec![0u8; PROBE_BYTES])?;
            f.sync_all()
        })();
        let _ = std::fs::remove_file(&path);
        Ok(r?)
    }

    fn recover(&self) -> anyhow::Result<()> {
        let Health::Failed { since, what, error } = self.health.get() else {
            return Ok(());
        };
        self.reopen()?;
        // A write sled took in memory but never wrote (the one that failed) is gone now: if the
        // site on disk is not the one in memory, the disk is the truth.
        let on_disk = read_meta(&self.h()?.tree, &self.dir)?;
        let in_memory = self.meta.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if on_disk.as_ref().map(|m| (m.gen_, m.version, m.deltas))
            != in_memory.as_ref().map(|m| (m.gen_, m.version, m.deltas))
        {
            let mut meta = self.meta.lock().unwrap_or_else(|e| e.into_inner());
            let site = match &on_disk {
                Some(m) => self.load_generation(m)?,
                None => super::empty_site(),
            };
            tracing::warn!(
                version = site.version,
                "storage: the site on disk differs from memory after the failure; reloaded it"
            );
            *self.site.write().unwrap_or_else(|e| e.into_inner()) = site;
            *meta = on_disk;
        }
        let now = Utc::now();
        let local = now
            .with_timezone(&self.site().tables.facility.tz)
            .to_rfc3339();
        let down_ms = (now - since).num_milliseconds().max(0);
        self.events().append(&[
            NewEvent {
                at: since,
                local: since
                    .with_timezone(&self.site().tables.facility.tz)
                    .to_rfc3339(),
                kind: EventKind::StorageFailed,
                payload: serde_json::json!({ "since": since, "what": what, "error": error }),
            },
            NewEvent {
                at: now,
                local,
                kind: EventKind::StorageRecovered,
                payload: serde_json::json!({ "since": since, "down_ms": down_ms }),
            },
        ])?;
        let mut c = self.health.lock();
        c.health = Health::Ok;
        c.reported = None;
        tracing::info!(
            down_ms,
            "storage recovered: the database takes writes again"
        );
        Ok(())
    }

    /// Drops every sled handle, opens the database again and attaches the handles to it, then
    /// checks a small write.
    fn reopen(&self) -> anyhow::Result<()> {
        let mut events = self.events.write().unwrap_or_else(|e| e.into_inner());
        let mut handles = self.handles.write().unwrap_or_else(|e| e.into_inner());
        let appended = events.as_ref().map(|e| e.appended());
        let next_seq = events.as_ref().map_or(0, |e| e.next_seq());
        *events = None;
        *handles = None;
        self.commands.detach();
        self.lived.detach();
        let deadline = Instant::now() + REOPEN_WAIT;
        let attached = loop {
            match self.attach_new(appended.clone(), next_seq) {
                Ok(a) => break a,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("storage: reopen: {e:#}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    tracing::error!(
                        "storage: the database could not be opened again: {e:#}; exiting so \
                         that the service manager restarts the daemon"
                    );
                    std::process::exit(75);
                }
            }
        };
        let (h, log, commands) = attached;
        let probe = (|| -> anyhow::Result<()> {
            h.state
                .insert("health_probe", &Utc::now().timestamp_millis().to_be_bytes())?;
            h.db.flush()?;
            Ok(())
        })();
        self.commands.attach(commands);
        self.lived.attach(h.state.clone());
        *events = Some(Arc::new(log));
        *handles = Some(h);
        probe
    }

    fn attach_new(
        &self,
        appended: Option<Arc<tokio::sync::Notify>>,
        next_seq: u64,
    ) -> anyhow::Result<(Handles, EventLog, sled::Tree)> {
        let h = Handles::open(open_db(&self.dir)?)?;
        let mut log = EventLog::open(&h.db, self.limits)?;
        log.raise_next(next_seq)?;
        if let Some(n) = appended {
            log = log.with_appended(n);
        }
        let commands = h.db.open_tree("commands")?;
        Ok((h, log, commands))
    }
}
