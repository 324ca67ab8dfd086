//! The running cloud link, replaceable: [`LinkSupervisor`] starts a [`CloudLink`] for the
//! `[cloud]` section, and on a configuration reload that changes the section stops it (it
//! drains what it holds, up to the drain timeout, and says goodbye) and starts a new one with
//! the new settings and a new session. Between the two, events wait in the outbox as they do
//! through any disconnection; command results not yet sent are handed to the new link.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cloud::commands::{CommandConfig, Relays, Router, UnitControllers};
use crate::cloud::link::{CloudLink, Commands, DeviceBridge, Unsent};
use crate::config::CloudConfig;
use crate::store::Store;

/// What every link of this daemon is built from, whatever its `[cloud]` settings.
pub struct LinkParts {
    pub site: String,
    pub gateway: String,
    pub store: Arc<Store>,
    pub states: Arc<crate::devstate::DeviceStates>,
    pub units: Arc<dyn UnitControllers>,
    pub relays: Arc<dyn Relays>,
    pub devices: Option<Arc<DeviceBridge>>,
    pub metrics: crate::metrics::Metrics,
    pub drain: Duration,
    /// Installer pairing: its commands, and `pairing/*` published retained.
    pub pairing: Option<Arc<crate::pairing::Pairing>>,
    /// The active alerts, published retained on `alerts` (None: automation not running).
    pub alerts: Option<Arc<crate::automation::runner::AlertBoard>>,
}

struct Current {
    /// The settings it runs with (their `Debug` form: compared, never logged).
    settings: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Owns the running link (at most one).
pub struct LinkSupervisor {
    parts: LinkParts,
    /// Links stop with this (the daemon's last stop), each through a child token.
    stop: CancellationToken,
    tracker: TaskTracker,
    unsent: Unsent,
    current: tokio::sync::Mutex<Option<Current>>,
    /// The running link's state (for the service manager's status line).
    state: std::sync::Mutex<Option<Arc<crate::cloud::link::LinkState>>>,
}

/// The command router over the devices, with the checks' settings from `[cloud]`.
pub fn command_router(
    site: &str,
    gateway: &str,
    cloud: &CloudConfig,
    units: Arc<dyn UnitControllers>,
    relays: Arc<dyn Relays>,
) -> Commands {
    Commands {
        router: Arc::new(Router::new(units, relays)),
        cfg: CommandConfig {
            public: cloud.command_public,
            site: site.to_string(),
            gateway: gateway.to_string(),
            max_skew: chrono::Duration::from_std(cloud.command_max_skew)
                .unwrap_or(chrono::Duration::seconds(30)),
            max_bytes: cloud.max_message_bytes,
        },
    }
}

impl LinkSupervisor {
    pub fn new(parts: LinkParts, stop: CancellationToken, tracker: TaskTracker) -> Self {
        LinkSupervisor {
            parts,
            stop,
            tracker,
            unsent: Arc::default(),
            current: tokio::sync::Mutex::new(None),
            state: std::sync::Mutex::new(None),
        }
    }

    /// The running link's state; `None` while no link runs.
    pub fn state(&self) -> Option<Arc<crate::cloud::link::LinkState>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts a link for `cloud` (none: a warning, events stay in the outbox). Returns whether
    /// a link runs.
    pub async fn start(&self, cloud: Option<&CloudConfig>) -> anyhow::Result<bool> {
        let mut cur = self.current.lock().await;
        self.start_locked(&mut cur, cloud)?;
        Ok(cur.is_some())
    }

    fn start_locked(
        &self,
        cur: &mut Option<Current>,
        cloud: Option<&CloudConfig>,
    ) -> anyhow::Result<()> {
        let Some(cloud) = cloud else {
            tracing::warn!(
                "no [cloud] section: events are kept in the outbox until a cloud link is configured"
            );
            return Ok(());
        };
        let p = &self.parts;
        let session = p.store.next_session()?;
        let mut commands = command_router(
            &p.site,
            &p.gateway,
            cloud,
            p.units.clone(),
            p.relays.clone(),
        );
        if let Some(pairing) = &p.pairing {
            commands.router = Arc::new(
                Router::new(p.units.clone(), p.relays.clone()).with_pairing(pairing.clone()),
            );
        }
        let mut link = CloudLink::new(
            cloud.clone(),
            &p.site,
            &p.gateway,
            p.store.clone(),
            session,
            Some(Arc::new(commands)),
        )
        .with_device_states(p.states.clone())
        .with_metrics(p.metrics.clone())
        .with_drain_timeout(p.drain)
        .with_unsent(self.unsent.clone());
        if let Some(b) = &p.devices {
            link = link.with_device_bridge(b.clone());
        }
        if let Some(pairing) = &p.pairing {
            link = link.with_pairing(pairing.clone());
        }
        if let Some(a) = &p.alerts {
            link = link.with_alerts(a.clone());
        }
        tracing::info!(
            session,
            broker = %format!("{}:{}", cloud.host, cloud.port),
            topics = %link.topics().base(),
            "starting the cloud link"
        );
        let stop = self.stop.child_token();
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(link.state.clone());
        let task = self.tracker.spawn(link.run(stop.clone()));
        *cur = Some(Current {
            settings: format!("{cloud:?}"),
            stop,
            task,
        });
        Ok(())
    }

    /// Brings the link to `cloud`: unchanged settings leave it alone; otherwise the running
    /// link (if any) stops (draining up to the drain timeout) and a new one starts. Returns
    /// whether anything changed.
    pub async fn apply(&self, cloud: Option<&CloudConfig>) -> anyhow::Result<bool> {
        let mut cur = self.current.lock().await;
        let wanted = cloud.map(|c| format!("{c:?}"));
        if cur.as_ref().map(|c| &c.settings) == wanted.as_ref() {
            return Ok(false);
        }
        if let Some(old) = cur.take() {
            *self.state.lock().unwrap_or_else(|e| e.into_inner()) = None;
            tracing::info!("cloud settings changed: stopping the cloud link");
            old.stop.cancel();
            let wait = self.parts.drain + Duration::from_secs(3);
            let mut task = old.task;
            if tokio::time::timeout(wait, &mut task).await.is_err() {
                // Two links under one client id would take turns kicking each other off.
                task.abort();
                tracing::warn!("the cloud link did not stop in time: aborted");
            }
        }
        self.start_locked(&mut cur, cloud)?;
        Ok(true)
    }
}
