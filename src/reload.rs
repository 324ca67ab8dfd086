//! Configuration reload (SIGHUP, `systemctl reload`): docs/operations.md, *Reload*.
//!
//! The file the daemon was started with is read again and checked whole, exactly as
//! `check-config` does (`Config::load` + `preflight::check`). Then:
//! - invalid, or changing what a running daemon cannot change (`site.id`,
//!   `site.gateway_id`, `storage.data_dir`): nothing changes; the reason (redacted: no quoted
//!   value that could be a code or a key) is logged and recorded as `config_reload_refused`;
//! - valid: what can change live changes — log level and format, RS-485 buses (added, removed,
//!   changed: only a changed bus restarts), the cloud link (new settings: it reconnects), and
//!   whatever registered a [`Part`] (the metrics listener and the BLE manager hook in here) — and
//!   `config_reloaded` is recorded with what changed and what waits for a restart.
//!
//! Decisions go on throughout: the store, the access engine and the buses a reload does not
//! touch are never stopped. Reloads run one at a time. Each outcome is also published on a
//! watch channel ([`Reloader::outcomes`]) for the service manager's notifications.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::config::Config;
use crate::events::EventKind;
use crate::logging::Logging;
use crate::rs485::{BusChanges, Rs485};
use crate::store::Store;

/// What one reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied: what changed (setting names; empty when the file was unchanged) and the
    /// settings that changed but take effect only at the next start.
    Reloaded {
        changed: Vec<String>,
        restart_needed: Vec<String>,
    },
    /// Refused: nothing changed. The reason is redacted.
    Refused { reason: String },
}

/// Something else the daemon runs that a reload can change (e.g. the metrics listener):
/// registered with [`Reloader::add_part`].
pub trait Part: Send + Sync {
    /// Checks `new` against what runs, before anything is applied: an `Err` refuses the whole
    /// reload (e.g. a port that cannot be bound).
    fn check(&self, _old: &Config, _new: &Config) -> anyhow::Result<()> {
        Ok(())
    }
    /// Applies `new`; returns the names of the settings that changed.
    fn apply(&self, old: &Config, new: &Config) -> anyhow::Result<Vec<String>>;
}

/// The daemon's running parts a reload reaches.
pub struct Reloader {
    current: Mutex<Config>,
    store: Arc<Store>,
    logging: Option<Logging>,
    rs485: Arc<Rs485>,
    cloud: Arc<crate::cloud::supervisor::LinkSupervisor>,
    parts: Mutex<Vec<Arc<dyn Part>>>,
    running: tokio::sync::Mutex<()>,
    outcomes: tokio::sync::watch::Sender<Option<Outcome>>,
}

/// Settings a running daemon cannot take: a reload that changes one is refused.
fn identity_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut v = Vec::new();
    if old.site_id != new.site_id {
        v.push("site.id");
    }
    if old.gateway_id != new.gateway_id {
        v.push("site.gateway_id");
    }
    if old.data_dir != new.data_dir {
        v.push("storage.data_dir");
    }
    v
}

fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
}

/// Settings that changed but are read only at start: applied at the next restart.
fn restart_needed(old: &Config, new: &Config) -> Vec<String> {
    let mut v = Vec::new();
    if differs(&old.log_limits, &new.log_limits) || old.max_events != new.max_events {
        v.push("outbox".to_string());
    }
    if differs(&old.digital_key_public, &new.digital_key_public) {
        v.push("access.digital_key_public_key".to_string());
    }
    if old.drain_timeout != new.drain_timeout {
        v.push("shutdown.drain_timeout_secs".to_string());
    }
    // The rest of `[ble]` is applied live (`ble::manager::LivePart`).
    match (&old.ble, &new.ble) {
        (None, None) => {}
        (Some(o), Some(n)) => {
            if o.adapter != n.adapter {
                v.push("ble.adapter".to_string());
            }
            if o.max_connections != n.max_connections {
                v.push("ble.max_connections".to_string());
            }
        }
        _ => v.push("ble".to_string()),
    }
    if old.simulate_devices != new.simulate_devices
        || old.demo_pairing != new.demo_pairing
        || old.demo_pairing_code != new.demo_pairing_code
        || differs(&old.demo_attempts, &new.demo_attempts)
    {
        v.push("demo".to_string());
    }
    v
}

/// A refusal reason that quotes nothing that could be a secret: every `` `quoted` `` part
/// holding a digit (a code, a key, a card number) is replaced by `(not shown)`, the others are
/// cut short ([`crate::redact::excerpt`]). File paths and line numbers stay.
pub fn redacted(reason: &str) -> String {
    let mut out = String::new();
    for (i, part) in reason.split('`').enumerate() {
        if i % 2 == 0 {
            out.push_str(part);
        } else if part.bytes().any(|b| b.is_ascii_digit()) && !part.contains('/') {
            out.push_str("(not shown)");
        } else {
            out.push_str(&crate::redact::excerpt(part));
        }
    }
    out
}

impl Reloader {
    pub fn new(
        current: Config,
        store: Arc<Store>,
        logging: Option<Logging>,
        rs485: Arc<Rs485>,
        cloud: Arc<crate::cloud::supervisor::LinkSupervisor>,
    ) -> Self {
        Reloader {
            current: Mutex::new(current),
            store,
            logging,
            rs485,
            cloud,
            parts: Mutex::new(Vec::new()),
            running: tokio::sync::Mutex::new(()),
            outcomes: tokio::sync::watch::channel(None).0,
        }
    }

    /// Registers another reloadable part (the metrics listener, ...).
    pub fn add_part(&self, part: Arc<dyn Part>) {
        self.parts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(part);
    }

    /// Every reload's outcome, latest first seen (`None` before the first reload): for
    /// `RELOADING=1` / `READY=1` to the service manager.
    pub fn outcomes(&self) -> tokio::sync::watch::Receiver<Option<Outcome>> {
        self.outcomes.subscribe()
    }

    /// The configuration running now.
    pub fn current(&self) -> Config {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the config file again and applies it, or refuses it (see the module docs).
    pub async fn reload(&self) -> Outcome {
        let _one = self.running.lock().await;
        tracing::info!("reloading the configuration");
        let old = self.current();
        let outcome = match self.try_reload(&old).await {
            Ok((new, changed, restart_needed)) => {
                let buses = changed.1;
                let changed = changed.0;
                tracing::info!(
                    changed = %changed.join(","),
                    restart_needed = %restart_needed.join(","),
                    "configuration reloaded"
                );
                self.record(
                    EventKind::ConfigReloaded,
                    json!({
                        "changed": changed,
                        "buses": {
                            "added": buses.added,
                            "removed": buses.removed,
                            "restarted": buses.restarted,
                        },
                        "restart_needed": restart_needed,
                    }),
                )
                .await;
                *self.current.lock().unwrap_or_else(|e| e.into_inner()) = new;
                Outcome::Reloaded {
                    changed,
                    restart_needed,
                }
            }
            Err(reason) => {
                let reason = redacted(&reason);
                tracing::error!(
                    reason = %reason,
                    "configuration reload refused, nothing changed (`gatehouse check-config` \
                     shows the full error)"
                );
                self.record(EventKind::ConfigReloadRefused, json!({ "reason": reason }))
                    .await;
                Outcome::Refused { reason }
            }
        };
        self.outcomes.send_replace(Some(outcome.clone()));
        outcome
    }

    async fn record(&self, kind: EventKind, payload: serde_json::Value) {
        let store = self.store.clone();
        let r = tokio::task::spawn_blocking(move || store.record_flushed(kind, payload)).await;
        if let Ok(Err(e)) = r {
            tracing::warn!("recording {}: {e:#}", kind.as_str());
        }
    }

    /// Loads, checks, applies. `Err(reason)` when refused (before anything changed).
    #[allow(clippy::type_complexity)]
    async fn try_reload(
        &self,
        old: &Config,
    ) -> Result<(Config, (Vec<String>, BusChanges), Vec<String>), String> {
        let path = old.path.clone();
        let new = tokio::task::spawn_blocking(move || -> Result<Config, String> {
            let cfg = Config::load(&path).map_err(|e| e.to_string())?;
            crate::preflight::check(&cfg).map_err(|e| format!("{}: {e:#}", path.display()))?;
            Ok(cfg)
        })
        .await
        .map_err(|e| format!("the check did not finish: {e}"))??;
        let identity = identity_changes(old, &new);
        if !identity.is_empty() {
            return Err(format!(
                "{}: {} cannot change while the daemon runs: restart it to apply",
                new.path.display(),
                identity.join(", ")
            ));
        }
        let parts: Vec<Arc<dyn Part>> =
            self.parts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for p in &parts {
            p.check(old, &new).map_err(|e| format!("{e:#}"))?;
        }

        // Valid: apply. From here a failure is reported but what was applied stays.
        let mut changed: Vec<String> = Vec::new();
        if let Some(l) = &self.logging {
            match l.apply(&new.log_level, new.log_format) {
                Ok(c) => changed.extend(c.into_iter().map(String::from)),
                Err(e) => tracing::warn!("{e:#}"),
            }
        }
        // Simulated (demo) buses run on PTYs made at start: they keep running as they are; a
        // change to one waits for a restart.
        let mut want = Vec::new();
        let mut demo_bus_changed = false;
        for bus in &new.buses {
            if !bus.simulated() {
                want.push(bus.clone());
                continue;
            }
            let before = old.buses.iter().find(|b| b.id == bus.id);
            demo_bus_changed |= before.is_none_or(|b| differs(b, bus));
            if let Some(running) = self.rs485.bus_config(&bus.id) {
                want.push(running);
            }
        }
        let buses = {
            let rs = self.rs485.clone();
            let deadline = new.drain_timeout.min(Duration::from_secs(10));
            match tokio::task::spawn_blocking(move || rs.apply(&want, deadline)).await {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    tracing::error!("starting a bus: {e:#}");
                    BusChanges::default()
                }
                Err(e) => {
                    tracing::error!("applying the buses: {e}");
                    BusChanges::default()
                }
            }
        };
        if !buses.is_empty() {
            changed.push("bus".into());
        }
        match self.cloud.apply(new.cloud.as_ref()).await {
            Ok(true) => changed.push("cloud".into()),
            Ok(false) => {}
            Err(e) => tracing::error!("restarting the cloud link: {e:#}"),
        }
        for p in &parts {
            match p.apply(old, &new) {
                Ok(c) => changed.extend(c),
                Err(e) => tracing::error!("{e:#}"),
            }
        }
        let mut restart = restart_needed(old, &new);
        if demo_bus_changed && !restart.iter().any(|r| r == "demo") {
            restart.push("demo".to_string());
        }
        for r in &restart {
            tracing::warn!(setting = %r, "changed in the file: applied at the next restart");
        }
        Ok((new, (changed, buses), restart))
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn refusal_reasons_never_quote_what_could_be_a_secret() {
        let r = redacted(
            "/etc/gatehouse/gatehouse.toml:12: key `demo.attempt[0].code`: `4821` is not valid",
        );
        assert!(!r.contains("4821"), "{r}");
        assert!(r.contains("gatehouse.toml:12"), "{r}");
        let r = redacted("key `log.level`: `verbose` is not a level");
        assert!(r.contains("`log.level`") && r.contains("`verbose`"), "{r}");
        let r = redacted("key `k`: `00112233445566778899aabbccddeeff` is weak");
        assert!(!r.contains("0011"), "{r}");
    }
}
