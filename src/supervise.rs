//! systemd supervision (`Type=notify`, docs/operations.md *Supervision*): the notify protocol
//! through the `sd-notify` crate, and the watchdog fed only while the daemon is healthy.
//!
//! - [`Notifier`] sends `READY=1`, `STATUS=…`, `WATCHDOG=1`, `RELOADING=1` (with
//!   `MONOTONIC_USEC`, as `Type=notify-reload` expects on systemd ≥ 253) and `STOPPING=1` to
//!   `$NOTIFY_SOCKET`. Without the variable every call does nothing. A socket that cannot be
//!   reached is reported once at warn level and never stops the daemon: supervision is an
//!   observer of access control, not part of it.
//! - [`run`] is the supervision task: every second (more often with a short watchdog) it
//!   checks [`health`] and builds the [`status_line`]; it sends `STATUS=` when the line changes and `WATCHDOG=1` every half of
//!   `$WATCHDOG_USEC` **only while the check passes**. A stuck loop therefore stops the pings and
//!   systemd restarts the daemon after `WatchdogSec`.
//!
//! The health check: every registered [`crate::liveness`] beat (the cloud link task, each bus
//! thread, the BLE advert thread, the store's recovery thread) ticked within [`stale_after`]; and
//! the store takes writes, or is failed but its recovery thread turns. A failed store (a full
//! disk) is shown in `STATUS` and does not stop the watchdog: a restart cannot free the disk, and
//! the store reopens by itself when space returns (docs/guarantees.md *Disk full*); a store that
//! cannot be reopened exits the process (code 75) for systemd to restart it.

use std::ffi::OsString;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::cloud::link::LinkState;
use crate::liveness::Liveness;
use crate::store::Store;

/// How often the supervision task checks health and the status line.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// A beat is stale after `WatchdogSec`, and never sooner than this (a Modbus transaction may
/// legitimately take up to its 5 s timeout, a turn a few of them).
pub const MIN_STALE: Duration = Duration::from_secs(10);

/// How old a beat may be before the check fails: the watchdog timeout, at least [`MIN_STALE`].
pub fn stale_after(watchdog: Option<Duration>) -> Duration {
    watchdog.unwrap_or(MIN_STALE).max(MIN_STALE)
}

/// The daemon's side of the notify protocol.
pub struct Notifier {
    /// `$NOTIFY_SOCKET` at start; `None`: not supervised, every call does nothing.
    socket: Option<OsString>,
    /// `$WATCHDOG_USEC` (for this process), when systemd expects pings.
    watchdog: Option<Duration>,
    /// The first failure to reach the socket was logged (at warn level; later ones at debug).
    warned: AtomicBool,
    /// `STOPPING=1` was sent: no more pings or status.
    stopping: AtomicBool,
    /// The last `STATUS=` sent (the task sends a line only when it differs).
    last_status: std::sync::Mutex<String>,
}

impl Notifier {
    /// From the environment systemd gives a `Type=notify` service.
    pub fn from_env() -> Arc<Notifier> {
        let socket = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty());
        let watchdog = sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
        if let Some(s) = &socket {
            tracing::info!(
                socket = %s.to_string_lossy(),
                watchdog_ms = watchdog.map(|d| d.as_millis() as u64),
                "supervised by systemd (notify protocol)"
            );
        }
        Arc::new(Notifier {
            socket,
            watchdog,
            warned: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            last_status: std::sync::Mutex::new(String::new()),
        })
    }

    /// Whether a service manager listens (`$NOTIFY_SOCKET` is set).
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// The watchdog timeout systemd set (`WatchdogSec`), if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// `READY=1` with a first status: start-up is complete.
    pub fn ready(&self, status: &str) {
        *self.last() = status.to_string();
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// `READY=1` after [`Notifier::reloading`]: the reload is done (applied or refused). The
    /// supervision task sends the status line again at its next check.
    pub fn reloaded(&self) {
        self.last().clear();
        self.send(&[NotifyState::Ready]);
    }

    /// `RELOADING=1` and `MONOTONIC_USEC=<now>`: a reload starts; call [`Notifier::reloaded`]
    /// when it is done (applied or refused).
    pub fn reloading(&self) {
        *self.last() = "reloading the configuration".to_string();
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[
                NotifyState::Reloading,
                now,
                NotifyState::Status("reloading the configuration"),
            ]),
            Err(e) => {
                tracing::warn!("reading the monotonic clock for RELOADING: {e}");
                self.send(&[NotifyState::Reloading]);
            }
        }
    }

    /// `STOPPING=1`: shutdown started; no watchdog pings after this.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: draining the outbox"),
        ]);
    }

    /// `STATUS=<line>`, unless it is the line sent last.
    pub fn status(&self, line: &str) {
        if self.stopping.load(Ordering::Relaxed) {
            return;
        }
        {
            let mut last = self.last();
            if *last == line {
                return;
            }
            *last = line.to_string();
        }
        self.send(&[NotifyState::Status(line)]);
    }

    fn last(&self) -> std::sync::MutexGuard<'_, String> {
        self.last_status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `WATCHDOG=1`.
    pub fn ping(&self) {
        if !self.stopping.load(Ordering::Relaxed) {
            self.send(&[NotifyState::Watchdog]);
        }
    }

    fn send(&self, states: &[NotifyState]) {
        let Some(socket) = &self.socket else { return };
        if let Err(e) = sd_notify::notify(states) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    socket = %socket.to_string_lossy(),
                    "cannot reach systemd's notify socket ({e}): the daemon goes on deciding \
                     access, but systemd will not see it ready, its status or its watchdog pings"
                );
            } else {
                tracing::debug!("notify socket: {e}");
            }
        }
    }
}

/// What the status line and the health check read.
pub struct Sources {
    pub store: Arc<Store>,
    /// The running cloud link's state; `None` while no link runs (no `[cloud]` section).
    pub link: Box<dyn Fn() -> Option<Arc<LinkState>> + Send + Sync>,
    /// Devices (online, total), one function per driver (RS-485 buses, BLE).
    pub devices: Vec<Box<dyn Fn() -> (usize, usize) + Send + Sync>>,
}

impl Sources {
    /// Devices online and known, over every driver.
    fn devices(&self) -> (usize, usize) {
        self.devices
            .iter()
            .map(|f| f())
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    }
}

/// The health check: `Ok`, or why the watchdog is held.
pub fn health(liveness: &Liveness, stale_after: Duration) -> Result<(), String> {
    let stale = liveness.stale(stale_after);
    if stale.is_empty() {
        return Ok(());
    }
    Err(stale
        .iter()
        .map(|s| format!("{} stuck for {} s", s.name, s.age.as_secs()))
        .collect::<Vec<_>>()
        .join(", "))
}

/// The one-line status (`systemctl status` shows it), e.g. `site version 42, cloud connected,
/// outbox 3 events, devices 4/5 online`, then `; storage failed: …` or `; unhealthy: bus
/// rs485-readers stuck for 12 s` when something is wrong.
pub fn status_line(s: &Sources, unhealthy: Option<&str>) -> String {
    let version = s.store.site().version;
    let cloud = match (s.link)() {
        None => "no cloud link",
        Some(l) if l.connected.load(Ordering::Relaxed) => "cloud connected",
        Some(_) => "cloud disconnected",
    };
    let outbox = s.store.events().len();
    let (online, total) = s.devices();
    let mut line = format!(
        "site version {version}, {cloud}, outbox {outbox} event{}, devices {online}/{total} online",
        if outbox == 1 { "" } else { "s" }
    );
    if let crate::store::Health::Failed { what, .. } = s.store.health() {
        line.push_str(&format!("; storage failed ({what}), recovering"));
    }
    if let Some(why) = unhealthy {
        line.push_str("; unhealthy: ");
        line.push_str(why);
    }
    line
}

/// The supervision task: status on change, watchdog pings while healthy, until `stop`.
pub async fn run(notifier: Arc<Notifier>, sources: Sources, stop: CancellationToken) {
    if !notifier.enabled() {
        return;
    }
    let stale = stale_after(notifier.watchdog());
    let ping_every = notifier.watchdog().map(|w| w / 2);
    let mut last_ping: Option<Instant> = None;
    let mut was_healthy = true;
    // Checks at least twice per ping period, so that a ping is never a whole check late.
    let check_every = ping_every.map_or(CHECK_EVERY, |p| (p / 2).min(CHECK_EVERY));
    let mut every = tokio::time::interval(check_every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.cancelled() => return,
        }
        let check = health(crate::liveness::global(), stale);
        match (&check, was_healthy) {
            (Err(why), true) => tracing::error!(
                "health check failed: {why}; watchdog pings stop (systemd restarts the daemon \
                 after WatchdogSec)"
            ),
            (Ok(()), false) => tracing::info!("health check passes again; watchdog pings resume"),
            _ => {}
        }
        was_healthy = check.is_ok();
        notifier.status(&status_line(
            &sources,
            check.as_ref().err().map(String::as_str),
        ));
        if let (Ok(()), Some(period)) = (&check, ping_every)
            && last_ping.is_none_or(|t| t.elapsed() + check_every / 2 >= period)
        {
            notifier.ping();
            last_ping = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_after_is_the_watchdog_timeout_never_under_the_floor() {
        assert_eq!(stale_after(None), MIN_STALE);
        assert_eq!(stale_after(Some(Duration::from_secs(2))), MIN_STALE);
        assert_eq!(
            stale_after(Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn health_names_the_stuck_loops() {
        let r: &'static Liveness = Box::leak(Box::new(Liveness::new()));
        let _a = r.register("bus a");
        let b = r.register("cloud link");
        assert_eq!(health(r, Duration::from_millis(100)), Ok(()));
        std::thread::sleep(Duration::from_millis(150));
        b.tick();
        let why = health(r, Duration::from_millis(100)).unwrap_err();
        assert!(why.starts_with("bus a stuck for "), "{why}");
        assert!(!why.contains("cloud link"), "{why}");
    }
}
