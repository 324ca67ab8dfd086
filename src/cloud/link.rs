//! The MQTT connection and the outbox drain.
//!
//! # Design (see also docs/guarantees.md)
//!
//! The event log *is* the outbox: records keyed by sequence number in sled ([`EventLog`]). This
//! task reads events from the oldest unacknowledged one, publishes them at QoS 1 in order, and
//! deletes each record only when the broker's PUBACK for it arrives. Nothing about delivery is
//! kept anywhere else, so there is no second ledger to disagree with the log.
//!
//! rumqttc keeps unacknowledged QoS 1 publishes only in memory and drops them on a reconnect
//! without a resumed session. So each connection gets a *fresh* client and event loop (clean
//! session): rumqttc never replays anything itself, and after every (re)connection this task
//! starts again from the oldest record still in the log. An event whose PUBACK was lost is sent
//! again: delivery is at least once, in order of first delivery, and the cloud drops duplicates by
//! the event's `id` (`<database epoch>-<seq>`).
//!
//! Mapping acknowledgements to records: rumqttc reports `Outgoing::Publish(pkid)` for each publish
//! in the order they were requested; a FIFO of what was requested (an event's sequence number, or
//! nothing for status and results) turns that into `pkid -> seq`, and `PubAck(pkid)` into a delete.
//!
//! No record can block the outbox: one whose message is over the connection's packet limit is
//! published as an `event_unpublishable` marker with its id and seq ([`limits`]) and deleted on
//! its PUBACK like any event.
//!
//! At risk: nothing that was appended. A crash between a PUBACK and the (unflushed) delete only
//! sends that event again. The event loop is polled by this task alone and never waits on
//! anything else: publishing uses `try_publish`, snapshots are applied on a blocking thread.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::cloud::commands::{self, Effect, Outcome};
use crate::cloud::lanes::{CmdJob, dispatch_commands, keep_unsent, record_effects};
use crate::cloud::limits::{self, TooLargeLog};
use crate::cloud::messages::{
    EventMessage, Health, HealthBus, HealthCloud, HealthDecisions, HealthOutbox, SnapshotChunk,
    Status, SyncResult, Topics,
};
use crate::cloud::mqtt::{self, Client, Ev, Loop, PollError};
use crate::config::{CloudConfig, Transport};
use crate::events::EventKind;
use crate::store::{Applied, ApplyError, Store};
use crate::sync;

/// Final command results waiting for the next session ([`CloudLink::with_unsent`]).
pub type Unsent = Arc<std::sync::Mutex<Vec<Outcome>>>;

/// What the link needs to serve commands: the router to the devices and the checks' settings.
pub struct Commands {
    pub router: Arc<commands::Router>,
    pub cfg: commands::CommandConfig,
}

/// The device side of device requests the link carries (today the BLE module's online lock
/// operations; `ble/unlock_request` and `ble/unlock_response` on the wire, docs/mqtt-api.md).
/// The link publishes the requests as they are, hands responses back unread, and never
/// knows what kind of device asked.
pub trait DeviceRpc: Send + Sync {
    /// The link that serves the requests, so that they fail fast while it is down.
    fn attach(&self, link: Arc<LinkState>);
    /// A message that arrived on the response topic.
    fn on_response(&self, payload: &[u8]);
}

/// What a device module exchanges through the link: requests out, responses in (through
/// [`DeviceRpc`]), and the sleeping devices that woke up (their queued commands run on the
/// command thread).
pub struct DeviceBridge {
    rpc: Arc<dyn DeviceRpc>,
    requests: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    wakes: tokio::sync::Mutex<mpsc::Receiver<String>>,
}

impl DeviceBridge {
    /// `requests`: the payloads to publish; `wakes`: ids of devices that woke up.
    pub fn new(
        rpc: Arc<dyn DeviceRpc>,
        requests: mpsc::Receiver<Vec<u8>>,
        wakes: mpsc::Receiver<String>,
    ) -> Self {
        DeviceBridge {
            rpc,
            requests: tokio::sync::Mutex::new(requests),
            wakes: tokio::sync::Mutex::new(wakes),
        }
    }
}

/// Requests queued in rumqttc's channel at most; the outbox window is kept below it.
const REQUEST_CAPACITY: usize = 1024;
/// How often `health` is published when nothing changed.
const HEALTH_EVERY: Duration = Duration::from_secs(60);
/// What makes `health` due before `HEALTH_EVERY`: the store's state and the devices online.
type HealthKey = (
    String,
    std::collections::BTreeMap<String, crate::cloud::messages::HealthBus>,
);

/// Largest snapshot the gateway assembles from chunks.
const MAX_SNAPSHOT_BYTES: usize = 1 << 30;
/// Most parts a snapshot may come in (the part table is allocated from the announced count).
const MAX_SNAPSHOT_PARTS: u32 = 65_536;

/// What the rest of the daemon sees of the link.
#[derive(Debug, Default)]
pub struct LinkState {
    pub connected: AtomicBool,
    /// Connections tried since the link started.
    pub attempts: AtomicU64,
    /// The reconnection wait before jitter (the next wait is drawn in 50-100 % of it), in ms.
    pub delay_ms: AtomicU64,
}

pub struct CloudLink {
    cfg: CloudConfig,
    site: String,
    gateway: String,
    store: Arc<Store>,
    topics: Topics,
    session: u64,
    started_at: DateTime<Utc>,
    appended: Arc<Notify>,
    commands: Option<Arc<Commands>>,
    pub state: Arc<LinkState>,
    devices: Option<Arc<crate::devstate::DeviceStates>>,
    pairing: Option<Arc<crate::pairing::Pairing>>,
    /// The active alerts, published retained on `alerts` (None: not published).
    alerts: Option<Arc<crate::automation::runner::AlertBoard>>,
    bridge: Option<Arc<DeviceBridge>>,
    /// Final command results reached while no session could publish them (a sleeping lock's
    /// unlock finished as the connection dropped): published first on the next session.
    unsent: Unsent,
    /// `message_too_large` events, coalesced.
    too_large: std::sync::Mutex<TooLargeLog>,
    /// How long a clean stop keeps publishing the outbox and waiting for acknowledgements.
    drain: Duration,
    metrics: crate::metrics::Metrics,
}

enum SessionEnd {
    Shutdown,
    Lost(String),
    /// The broker sent a packet over the incoming limit (MQTT 3.1.1 cannot tell it the limit).
    TooLarge {
        bytes: usize,
        max: usize,
    },
}

/// A publish requested from rumqttc, in order: an event (its sequence number) or anything else.
type Requested = Option<u64>;

struct Outbox {
    /// Requested publishes not yet reported as written, in order.
    requested: VecDeque<Requested>,
    /// pkid -> what was written and awaits its PUBACK (an event's seq, or nothing).
    inflight: HashMap<u16, Requested>,
    /// The next sequence number to read from the log.
    cursor: u64,
    acked: Vec<u64>,
    window: usize,
    /// The database epoch (for event ids), read once per session.
    epoch: String,
    /// The largest packet this connection may send ([`limits::outgoing_limit`]).
    max_packet: usize,
}

/// Snapshot parts being assembled.
struct Assembly {
    id: String,
    count: u32,
    sha256: String,
    parts: Vec<Option<Vec<u8>>>,
    bytes: usize,
}

impl CloudLink {
    pub fn new(
        cfg: CloudConfig,
        site: &str,
        gateway: &str,
        store: Arc<Store>,
        session: u64,
        commands: Option<Arc<Commands>>,
    ) -> Self {
        let appended = store.events().appended();
        CloudLink {
            topics: Topics::new(&cfg.topic_prefix, site, gateway),
            cfg,
            site: site.to_string(),
            gateway: gateway.to_string(),
            store,
            session,
            started_at: Utc::now(),
            appended,
            commands,
            state: Arc::new(LinkState::default()),
            devices: None,
            pairing: None,
            alerts: None,
            bridge: None,
            unsent: Arc::default(),
            too_large: Default::default(),
            drain: Duration::from_secs(10),
            metrics: crate::metrics::Metrics::new(),
        }
    }

    /// Counts into the daemon's metrics (events published and acknowledged, connection state,
    /// reconnects, command results) and takes the counters of the `health` message from them.
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// How long a clean stop drains the outbox (`shutdown.drain_timeout_secs`) before the
    /// offline status and the disconnect.
    pub fn with_drain_timeout(mut self, drain: Duration) -> Self {
        self.drain = drain;
        self
    }

    /// Final command results still waiting for a session: shared with the link this one
    /// replaces (a reload that restarts the link), so that none is dropped.
    pub fn with_unsent(mut self, unsent: Unsent) -> Self {
        self.unsent = unsent;
        self
    }

    /// Publishes the devices' states retained on `devices/<id>/state`.
    pub fn with_device_states(mut self, states: Arc<crate::devstate::DeviceStates>) -> Self {
        self.devices = Some(states);
        self
    }

    /// Publishes installer pairing's `pairing/state` and `pairing/discovered` (retained).
    pub fn with_pairing(mut self, pairing: Arc<crate::pairing::Pairing>) -> Self {
        self.pairing = Some(pairing);
        self
    }

    /// Publishes the active alerts retained on `alerts` (at each connection and on change).
    pub fn with_alerts(mut self, board: Arc<crate::automation::runner::AlertBoard>) -> Self {
        self.alerts = Some(board);
        self
    }

    /// Carries a device module's requests and wake-ups.
    pub fn with_device_bridge(mut self, bridge: Arc<DeviceBridge>) -> Self {
        bridge.rpc.attach(self.state.clone());
        self.bridge = Some(bridge);
        self
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// The broker sent a packet over the incoming limit: recorded (coalesced), never its content.
    fn message_too_large(&self, bytes: usize, max: usize) {
        tracing::warn!(
            bytes,
            max,
            "the broker sent a message larger than the gateway takes in: connection dropped"
        );
        let due = self
            .too_large
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .note(std::time::Instant::now(), bytes, max, self.cfg.protocol);
        // Through the group commit: this runs on the MQTT loop's task, which must not wait on
        // the disk.
        if let Some(payload) = due {
            self.store.record(EventKind::MessageTooLarge, payload);
        }
    }

    fn status(&self, online: bool) -> Status {
        Status {
            online,
            site: self.site.clone(),
            gateway: self.gateway.clone(),
            session: self.session,
            started_at: online.then_some(self.started_at),
            gatehouse_version: online.then(|| env!("CARGO_PKG_VERSION").to_string()),
            site_version: online.then(|| self.store.site().version),
            outbox: online.then(|| self.store.events().len()),
            storage: online.then(|| self.store.health().into()),
        }
    }

    /// The `health` message, measured now.
    fn health(&self) -> Health {
        let c = self.metrics.health();
        let events = self.store.events();
        let outbox = HealthOutbox {
            events: events.len(),
            oldest_age_s: crate::metrics::oldest_age_s(&events).unwrap_or(0),
        };
        drop(events);
        Health {
            site: self.site.clone(),
            gateway: self.gateway.clone(),
            session: self.session,
            at: Utc::now(),
            gatehouse_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: c.uptime_s,
            site_version: self.store.site().version,
            outbox,
            cloud: HealthCloud {
                reconnects: c.cloud_reconnects,
            },
            storage: self.store.health().into(),
            decisions: HealthDecisions {
                granted: c.granted,
                denied: c.denied,
            },
            buses: c
                .buses
                .into_iter()
                .map(|(bus, (online, total))| (bus, HealthBus { online, total }))
                .collect(),
            automation: crate::cloud::messages::HealthAutomation {
                facts_dropped: c.facts_dropped,
                facts_unknown: c.facts_unknown,
                alerts_active: c.alerts_active,
            },
        }
    }

    /// Publishes `health` (retained) when due: at `HEALTH_EVERY`, or when the store's health or
    /// a device's liveness changed since the last one (`last`).
    fn publish_health(
        &self,
        client: &Client,
        out: &mut Outbox,
        last: &mut Option<(std::time::Instant, HealthKey)>,
    ) -> anyhow::Result<()> {
        let h = self.health();
        let key = (h.storage.state.clone(), h.buses.clone());
        let due = match last {
            None => true,
            Some((at, k)) => at.elapsed() >= HEALTH_EVERY || *k != key,
        };
        if due {
            self.publish(client, out, self.topics.health(), true, &h)?;
            *last = Some((std::time::Instant::now(), key));
        }
        Ok(())
    }

    /// A command result, counted by status.
    fn publish_result(
        &self,
        client: &Client,
        out: &mut Outbox,
        result: &crate::cloud::messages::CommandResult,
    ) -> anyhow::Result<()> {
        self.metrics.command_result(&result.status);
        let topic = self.topics.command_result(&result.name);
        self.publish(client, out, topic, false, result)
    }

    fn settings(&self) -> anyhow::Result<mqtt::Settings> {
        let c = &self.cfg;
        let tls = match &c.transport {
            Transport::Tls {
                ca_file,
                use_system_roots,
                cert_file,
                key_file,
            } => Some(super::tls::client_config(
                ca_file.as_deref(),
                *use_system_roots,
                cert_file,
                key_file,
            )?),
            Transport::Tcp => None,
        };
        Ok(mqtt::Settings {
            protocol: c.protocol,
            client_id: c.client_id.clone(),
            host: c.host.clone(),
            port: c.port,
            keep_alive: c.keep_alive,
            inflight: c.inflight,
            // Large enough for snapshot chunks; commands are held to max_message_bytes by the
            // handler, which answers `malformed` rather than losing the connection.
            max_incoming_bytes: limits::incoming_limit(c.max_message_bytes),
            max_outgoing_bytes: limits::MAX_OUTGOING_PACKET,
            will: (
                self.topics.status(),
                serde_json::to_vec(&self.status(false))?,
            ),
            tls,
        })
    }

    /// Runs until `shutdown`: connects, drains the outbox, serves commands and sync, reconnects
    /// with capped exponential backoff and jitter.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut delay = self.cfg.reconnect_min;
        // The task's liveness (`supervise`): ticked at each turn of the session loop and every
        // second through the connection and backoff waits.
        let beat = crate::liveness::register("cloud link");
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            beat.tick();
            let mut connected = false;
            if self.state.attempts.fetch_add(1, Ordering::Relaxed) > 0 {
                self.metrics.cloud_reconnect();
            }
            let end = self.session_once(&shutdown, &mut connected, &beat).await;
            self.state.connected.store(false, Ordering::Relaxed);
            self.metrics.cloud_connected(false);
            // A connection that reached CONNACK resets the wait, unless the broker ended it by
            // sending what the gateway cannot take (it may do so again at once: retained).
            let mut healthy = connected;
            match end {
                Ok(SessionEnd::Shutdown) => return,
                Ok(SessionEnd::Lost(why)) => tracing::warn!(reason = %why, "cloud connection lost"),
                Ok(SessionEnd::TooLarge { bytes, max }) => {
                    healthy = false;
                    self.message_too_large(bytes, max);
                }
                Err(e) => tracing::warn!("cloud connection failed: {e:#}"),
            }
            if healthy {
                delay = self.cfg.reconnect_min;
            }
            self.state
                .delay_ms
                .store(delay.as_millis() as u64, Ordering::Relaxed);
            let wait = jitter(delay);
            tracing::info!(
                broker = %format!("{}:{}", self.cfg.host, self.cfg.port),
                retry_in_ms = wait.as_millis() as u64,
                queued_events = self.store.events().len(),
                "cloud unreachable: events stay queued in the outbox"
            );
            tokio::select! {
                _ = crate::liveness::ticking(&beat, tokio::time::sleep(wait)) => {}
                _ = shutdown.cancelled() => return,
            }
            delay = (delay * 2).min(self.cfg.reconnect_max);
        }
    }

    async fn session_once(
        &self,
        shutdown: &CancellationToken,
        connected: &mut bool,
        beat: &crate::liveness::Beat,
    ) -> anyhow::Result<SessionEnd> {
        let (client, mut el) = mqtt::connect(&self.settings()?, REQUEST_CAPACITY);
        // Connect: poll until the broker accepts (or refuses) us.
        let connack = tokio::select! {
            r = crate::liveness::ticking(beat, tokio::time::timeout(self.cfg.keep_alive.max(Duration::from_secs(5)), wait_connack(&mut el))) => r,
            _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        };
        let broker_max = connack.context("no CONNACK in time")??;
        *connected = true;
        self.state.connected.store(true, Ordering::Relaxed);
        self.metrics.cloud_connected(true);
        // Events numbered below this were recorded before this connection: `historical`.
        let connected_at = self.store.events().next_seq();
        let mut out = Outbox {
            requested: VecDeque::new(),
            inflight: HashMap::new(),
            cursor: 0,
            acked: Vec::new(),
            window: (self.cfg.inflight as usize).min(REQUEST_CAPACITY / 2),
            epoch: self.store.epoch(),
            max_packet: limits::outgoing_limit(broker_max),
        };
        let mut filters = vec![self.topics.sync_snapshot(), self.topics.sync_delta()];
        if self.commands.is_some() {
            filters.push(self.topics.commands_filter());
        }
        if self.bridge.is_some() {
            filters.push(self.topics.ble_unlock_response());
        }
        for t in filters {
            client.try_subscribe(t).map_err(anyhow::Error::msg)?;
        }
        self.publish(
            &client,
            &mut out,
            self.topics.status(),
            true,
            &self.status(true),
        )?;
        tracing::info!(
            broker = %format!("{}:{}", self.cfg.host, self.cfg.port),
            session = self.session,
            queued_events = self.store.events().len(),
            "cloud connected: draining the outbox"
        );
        let (sync_tx, mut sync_rx) = mpsc::channel::<SyncResult>(4);
        // Sync documents are applied one after the other, in arrival order, on one blocking
        // thread (deltas must not overtake each other).
        let (job_tx, job_rx) = std::sync::mpsc::channel::<(Vec<u8>, Option<String>)>();
        {
            let (store, tx) = (self.store.clone(), sync_tx.clone());
            tokio::task::spawn_blocking(move || {
                for (doc, id) in job_rx {
                    if tx.blocking_send(apply_document(&store, doc, id)).is_err() {
                        break;
                    }
                }
            });
        }
        let (cmd_tx, mut cmd_rx) = mpsc::channel::<Vec<Outcome>>(64);
        // Commands run in lanes, one per target (unit, entry, device), each a thread taking its
        // jobs one after the other in arrival order: a second delivery of a command follows the
        // first in its lane and finds its result, and a device sees its commands in order, while
        // a slow device (a padlock out of range) holds up only its own lane.
        let (cmd_job_tx, cmd_job_rx) = std::sync::mpsc::channel::<CmdJob>();
        if let Some(c) = &self.commands {
            let (c, store, tx) = (c.clone(), self.store.clone(), cmd_tx.clone());
            let unsent = self.unsent.clone();
            std::thread::Builder::new()
                .name("cmd-dispatch".into())
                .spawn(move || dispatch_commands(cmd_job_rx, &c, &store, &tx, &unsent))
                .context("starting the command thread")?;
        }
        // The device bridge's channels and the device states belong to this session while it
        // lasts.
        let mut dev_requests = match &self.bridge {
            Some(b) => Some(b.requests.lock().await),
            None => None,
        };
        let mut dev_wakes = match &self.bridge {
            Some(b) => Some(b.wakes.lock().await),
            None => None,
        };
        let unsent = std::mem::take(&mut *self.unsent.lock().unwrap_or_else(|e| e.into_inner()));
        for o in unsent {
            self.publish_result(&client, &mut out, &o.result)?;
        }
        let mut last_health = None;
        self.publish_health(&client, &mut out, &mut last_health)?;
        // Every connection republishes the active alerts (version 0: none yet).
        let mut alerts_sent = 0;
        self.publish_alerts(&client, &mut out, &mut alerts_sent)?;
        if let Some(d) = &self.devices {
            let all = d.all();
            self.publish_states(&client, &mut out, d, all);
        }
        if let Some(p) = &self.pairing {
            let _ = p.take_changed();
            self.publish_pairing(&client, &mut out, p, p.documents());
        }
        let mut assembly: Option<Assembly> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut storage_ok = self.store.health().is_ok();
        loop {
            beat.tick();
            // A storage failure does not end the session (commands must still be answered).
            // While it lasts no event is sent: what sled holds in memory may never reach the disk.
            if self.store.health().is_ok()
                && let Err(e) = self.fill(&client, &mut out, connected_at)
            {
                tracing::debug!("reading the outbox: {e:#}");
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.drain_outbox(&client, &mut el, &mut out, connected_at).await;
                    self.goodbye(&client, &mut el).await;
                    return Ok(SessionEnd::Shutdown);
                }
                ev = el.poll() => match ev {
                    Ok(Ev::Written(pkid)) => {
                        // rumqttc writes publishes in the order they were requested (it never
                        // has to hold one back: the window stays below its in-flight limit).
                        let Some(what) = out.requested.pop_front() else {
                            return Ok(SessionEnd::Lost("publish written that was not requested".into()));
                        };
                        if what.is_some() {
                            crate::store::crash_point("event_published");
                            self.metrics.event_published();
                        }
                        if out.inflight.insert(pkid, what).is_some() {
                            return Ok(SessionEnd::Lost(format!("packet id {pkid} reused while in flight")));
                        }
                    }
                    Ok(Ev::PubAck(pkid)) => {
                        if let Some(Some(seq)) = out.inflight.remove(&pkid) {
                            crate::store::crash_point("event_acked");
                            self.metrics.event_acknowledged();
                            out.acked.push(seq);
                        }
                    }
                    Ok(Ev::Message { topic, payload }) => {
                        self.incoming(&client, &mut out, &topic, payload, &mut assembly, &job_tx, &cmd_job_tx)?;
                    }
                    Ok(_) => {}
                    Err(PollError::TooLarge { bytes, max }) => return Ok(SessionEnd::TooLarge { bytes, max }),
                    Err(PollError::Other(e)) => return Ok(SessionEnd::Lost(e)),
                },
                Some(result) = sync_rx.recv() => {
                    self.publish(&client, &mut out, self.topics.sync_result(), false, &result)?;
                }
                Some(outcomes) = cmd_rx.recv() => {
                    for o in outcomes {
                        if o.effects.iter().any(|e| matches!(e, Effect::Resync)) {
                            // The cloud asked: say where the site stands.
                            self.publish(&client, &mut out, self.topics.status(), true, &self.status(true))?;
                        }
                        self.publish_result(&client, &mut out, &o.result)?;
                    }
                }
                Some(req) = async {
                    match dev_requests.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    // Queue full: the request is dropped; the lock operation gets no answer and
                    // falls back to the offline unlock.
                    let topic = self.topics.ble_unlock_request();
                    if client.packet_size(topic.len(), req.len()) > out.max_packet {
                        tracing::warn!("device request too large: not sent");
                    } else {
                        match client.try_publish(topic, false, req) {
                            Ok(()) => out.requested.push_back(None),
                            Err(e) => tracing::warn!("device request not sent: {e}"),
                        }
                    }
                }
                Some(device) = async {
                    match dev_wakes.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let waiting = self.commands.as_ref().is_some_and(|c| {
                        c.router.pending().iter().any(|(_, d)| *d == device)
                    });
                    if waiting {
                        let _ = cmd_job_tx.send(CmdJob::Wake(device));
                    }
                }
                _ = async {
                    match &self.devices {
                        Some(d) => d.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(d) = &self.devices {
                        let changed = d.take_changed();
                        self.publish_states(&client, &mut out, d, changed);
                    }
                }
                _ = async {
                    match &self.pairing {
                        Some(p) => p.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(p) = &self.pairing
                        && let Some(docs) = p.take_changed()
                    {
                        self.publish_pairing(&client, &mut out, p, docs);
                    }
                }
                _ = async {
                    match &self.alerts {
                        Some(b) => b.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.publish_alerts(&client, &mut out, &mut alerts_sent)?;
                }
                _ = self.appended.notified() => {}
                _ = tick.tick() => {
                    // Pairing documents a full queue held back.
                    if let Some(p) = &self.pairing
                        && let Some(docs) = p.take_changed()
                    {
                        self.publish_pairing(&client, &mut out, p, docs);
                    }
                    // A set a full queue held back.
                    self.publish_alerts(&client, &mut out, &mut alerts_sent)?;
                    if storage_ok != self.store.health().is_ok() {
                        storage_ok = !storage_ok;
                        self.publish(&client, &mut out, self.topics.status(), true, &self.status(true))?;
                    }
                    self.publish_health(&client, &mut out, &mut last_health)?;
                    // States a full queue held back.
                    if let Some(d) = &self.devices {
                        let changed = d.take_changed();
                        self.publish_states(&client, &mut out, d, changed);
                    }
                    let now = Utc::now();
                    if let Some(c) = &self.commands {
                        let (c, store, tx) = (c.clone(), self.store.clone(), cmd_tx.clone());
                        let unsent = self.unsent.clone();
                        tokio::task::spawn_blocking(move || {
                            let expired = commands::handle_expire(&c.router, &store, now);
                            record_effects(&store, &expired);
                            let lived = store.lived().now_ms();
                            match commands::prune(&store, now, lived, &c.cfg) {
                                Ok(n) => tracing::debug!(
                                    pruned = n,
                                    held = store.commands().len(),
                                    "command ids pruned"
                                ),
                                Err(e) => tracing::warn!("pruning command ids: {e:#}"),
                            }
                            if !expired.is_empty()
                                && let Err(e) = tx.blocking_send(expired)
                            {
                                keep_unsent(&unsent, e.0);
                            }
                        });
                    }
                }
            }
            // Deletes go in batches (a quarter of the window), and whenever the link is idle.
            if !out.acked.is_empty()
                && (out.acked.len() >= out.window.div_ceil(4) || out.inflight.is_empty())
            {
                // On a storage failure they are kept and removed later (sent again after a
                // restart at worst: the cloud drops duplicates by id).
                match self.store.events().remove_delivered(&out.acked) {
                    Ok(()) => {
                        crate::store::crash_point("event_deleted");
                        out.acked.clear();
                    }
                    Err(e) => tracing::debug!("removing delivered events: {e:#}"),
                }
            }
        }
    }

    /// Publishes more events while the window allows.
    fn fill(&self, client: &Client, out: &mut Outbox, connected_at: u64) -> anyhow::Result<()> {
        // Refill in batches, when at least a quarter of the window is free: one read of the log
        // per batch rather than per acknowledgement.
        let busy = out.requested.len() + out.inflight.len();
        if busy >= out.window || (busy > 0 && out.window - busy < out.window.div_ceil(4)) {
            return Ok(());
        }
        let records = self
            .store
            .events()
            .read_raw_from(out.cursor, out.window - busy)?;
        let epoch = &out.epoch;
        for (seq, stored) in records {
            // The stored record is an `Event` object; the message is the same object with the
            // event's `id` and `historical` added (no parse, no re-serialisation).
            let historical = seq < connected_at;
            let mut bytes = event_message(epoch, seq, historical, &stored);
            let topic = self.topics.events();
            if client.packet_size(topic.len(), bytes.len()) > out.max_packet {
                // Never sendable: a marker with its id and seq takes its place (docs/events.md).
                tracing::warn!(
                    seq,
                    bytes = bytes.len(),
                    max_packet = out.max_packet,
                    "event too large to publish: sent as event_unpublishable"
                );
                bytes = limits::unpublishable(epoch, seq, historical, &stored);
            }
            match client.try_publish(topic, false, bytes) {
                Ok(()) => {
                    out.requested.push_back(Some(seq));
                    out.cursor = seq + 1;
                }
                // rumqttc's queue is full: try again on the next turn.
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Publishes device states (retained) while rumqttc's queue takes them; the rest are marked
    /// changed again and go out on a later turn (a site with many devices, a mass change).
    fn publish_states(
        &self,
        client: &Client,
        out: &mut Outbox,
        d: &crate::devstate::DeviceStates,
        states: Vec<(String, serde_json::Value)>,
    ) {
        let mut left = states.into_iter();
        for (id, state) in left.by_ref() {
            let bytes = serde_json::to_vec(&state).unwrap_or_default();
            let topic = self.topics.device_state(&id);
            if client.packet_size(topic.len(), bytes.len()) > out.max_packet {
                tracing::warn!(device = %id, "device state too large to publish: not sent");
                continue;
            }
            if client
                .try_publish(self.topics.device_state(&id), true, bytes)
                .is_err()
            {
                d.mark_changed(std::iter::once(id));
                break;
            }
            out.requested.push_back(None);
        }
        d.mark_changed(left.map(|(id, _)| id));
    }

    /// Publishes `pairing/state` and `pairing/discovered` (retained); marked changed again
    /// when rumqttc's queue does not take them.
    fn publish_pairing(
        &self,
        client: &Client,
        out: &mut Outbox,
        p: &crate::pairing::Pairing,
        (state, discovered): (serde_json::Value, serde_json::Value),
    ) {
        for (topic, doc) in [
            (self.topics.pairing_state(), state),
            (self.topics.pairing_discovered(), discovered),
        ] {
            if self.publish(client, out, topic, true, &doc).is_err() {
                p.mark_changed();
                return;
            }
        }
    }

    /// Publishes the active alerts (retained) when the board moved past `sent`.
    fn publish_alerts(
        &self,
        client: &Client,
        out: &mut Outbox,
        sent: &mut u64,
    ) -> anyhow::Result<()> {
        let Some(b) = &self.alerts else {
            return Ok(());
        };
        let (version, set) = b.snapshot();
        if version == 0 || version == *sent {
            return Ok(());
        }
        let msg = crate::cloud::messages::AlertsMessage::new(&self.site, &self.gateway, &set);
        self.publish(client, out, self.topics.alerts(), true, &msg)?;
        *sent = version;
        Ok(())
    }

    fn publish<T: serde::Serialize>(
        &self,
        client: &Client,
        out: &mut Outbox,
        topic: String,
        retain: bool,
        msg: &T,
    ) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(msg)?;
        if client.packet_size(topic.len(), bytes.len()) > out.max_packet {
            // Sending it would end the connection; nothing the gateway publishes besides events
            // grows with input (results carry bounded ids), so this is only a guard.
            tracing::error!(
                topic,
                bytes = bytes.len(),
                "message too large to publish: not sent"
            );
            return Ok(());
        }
        client
            .try_publish(topic, retain, bytes)
            .map_err(|e| anyhow::anyhow!("publishing: {e}"))?;
        out.requested.push_back(None);
        Ok(())
    }

    /// A clean stop, connected: keeps publishing the outbox and taking PUBACKs (deleting what
    /// was acknowledged) until every event in the log is acknowledged or `drain` has passed.
    /// Nothing else is served meanwhile (the drivers are already stopped).
    async fn drain_outbox(
        &self,
        client: &Client,
        el: &mut Loop,
        out: &mut Outbox,
        connected_at: u64,
    ) {
        let deadline = tokio::time::Instant::now() + self.drain;
        let r: anyhow::Result<()> = async {
            loop {
                self.fill(client, out, connected_at)?;
                let events_out = out
                    .requested
                    .iter()
                    .chain(out.inflight.values())
                    .any(Option::is_some);
                if !events_out && self.store.events().read_raw_from(out.cursor, 1)?.is_empty() {
                    break;
                }
                match tokio::time::timeout_at(deadline, el.poll()).await {
                    Err(_) => {
                        tracing::warn!(
                            left = self.store.events().len(),
                            "drain timeout: events stay in the outbox for the next start"
                        );
                        break;
                    }
                    Ok(Err(e)) => anyhow::bail!("{e}"),
                    Ok(Ok(Ev::Written(pkid))) => {
                        if let Some(what) = out.requested.pop_front() {
                            if what.is_some() {
                                self.metrics.event_published();
                            }
                            out.inflight.insert(pkid, what);
                        }
                    }
                    Ok(Ok(Ev::PubAck(pkid))) => {
                        if let Some(Some(seq)) = out.inflight.remove(&pkid) {
                            self.metrics.event_acknowledged();
                            out.acked.push(seq);
                        }
                    }
                    Ok(Ok(_)) => {}
                }
                if !out.acked.is_empty() {
                    self.store.events().remove_delivered(&out.acked)?;
                    out.acked.clear();
                }
            }
            Ok(())
        }
        .await;
        if !out.acked.is_empty() {
            let _ = self.store.events().remove_delivered(&out.acked);
            out.acked.clear();
        }
        match r {
            Ok(()) => tracing::info!(left = self.store.events().len(), "outbox drained"),
            Err(e) => tracing::warn!("draining the outbox at stop: {e:#}"),
        }
    }

    /// A clean goodbye: `offline` retained (the will is not sent on a clean disconnect).
    async fn goodbye(&self, client: &Client, el: &mut Loop) {
        let offline = serde_json::to_vec(&self.status(false)).unwrap_or_default();
        let _ = client.try_publish(self.topics.status(), true, offline);
        client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match el.poll().await {
                    Ok(Ev::Disconnected) | Err(_) => break,
                    _ => {}
                }
            }
        })
        .await;
    }

    #[allow(clippy::too_many_arguments)]
    fn incoming(
        &self,
        client: &Client,
        out: &mut Outbox,
        topic: &str,
        payload: Vec<u8>,
        assembly: &mut Option<Assembly>,
        sync_jobs: &std::sync::mpsc::Sender<(Vec<u8>, Option<String>)>,
        cmd_jobs: &std::sync::mpsc::Sender<CmdJob>,
    ) -> anyhow::Result<()> {
        if payload.is_empty() {
            // How MQTT clears a retained message: nothing to act on or answer.
            tracing::debug!(topic, "empty message ignored");
            return Ok(());
        }
        if let Some(name) = self.topics.command_name(topic) {
            match &self.commands {
                Some(_) => {
                    let _ = cmd_jobs.send(CmdJob::Message(name.to_string(), payload));
                }
                None => tracing::debug!(topic, "command ignored: no command router"),
            }
        } else if topic == self.topics.ble_unlock_response() {
            if let Some(b) = &self.bridge {
                b.rpc.on_response(&payload);
            }
        } else if topic == self.topics.sync_delta() {
            let _ = sync_jobs.send((payload, None));
        } else if topic == self.topics.sync_snapshot() {
            match add_chunk(assembly, &payload) {
                Ok(Some((id, doc))) => {
                    let _ = sync_jobs.send((doc, Some(id)));
                }
                Ok(None) => {}
                Err(reason) => {
                    let r = SyncResult {
                        status: "refused".into(),
                        kind: Some("snapshot".into()),
                        id: None,
                        version: None,
                        current_version: self.store.site().version,
                        reason: Some(reason),
                    };
                    self.publish(client, out, self.topics.sync_result(), false, &r)?;
                }
            }
        }
        Ok(())
    }
}

/// An [`EventMessage`] from a stored event record: `{"id":…,"historical":…,` followed by the
/// record's own fields. A record that is not a JSON object (corrupt) is sent wrapped, so that the
/// cloud still sees its sequence number and can report it.
fn event_message(epoch: &str, seq: u64, historical: bool, stored: &[u8]) -> Vec<u8> {
    let id = format!("{epoch}-{seq}");
    match stored.strip_prefix(b"{") {
        Some(rest) if rest.len() > 1 => {
            let mut v = Vec::with_capacity(stored.len() + id.len() + 32);
            v.extend_from_slice(b"{\"id\":\"");
            v.extend_from_slice(id.as_bytes());
            v.extend_from_slice(b"\",\"historical\":");
            v.extend_from_slice(if historical { b"true," } else { b"false," });
            v.extend_from_slice(rest);
            v
        }
        _ => serde_json::to_vec(&EventMessage {
            id,
            seq,
            kind: "corrupt_record".into(),
            at: Utc::now(),
            local: String::new(),
            historical,
            payload: json!({"bytes": stored.len()}),
        })
        .unwrap_or_default(),
    }
}

/// Waits for the broker's CONNACK; returns the Maximum Packet Size it announced (MQTT 5).
async fn wait_connack(el: &mut Loop) -> anyhow::Result<Option<u32>> {
    loop {
        match el.poll().await.map_err(|e| anyhow::anyhow!("{e}"))? {
            Ev::ConnAck(Ok(max)) => return Ok(max),
            Ev::ConnAck(Err(code)) => anyhow::bail!("broker refused the connection: {code}"),
            _ => continue,
        }
    }
}

/// Between 50 % and 100 % of `d`, so that gateways cut off together do not return together.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::getrandom(&mut b);
    let frac = 0.5 + (u16::from_le_bytes(b) as f64 / u16::MAX as f64) / 2.0;
    d.mul_f64(frac)
}

/// Adds a snapshot part. Returns the whole document when the last part arrives.
fn add_chunk(
    assembly: &mut Option<Assembly>,
    payload: &[u8],
) -> Result<Option<(String, Vec<u8>)>, String> {
    let chunk: SnapshotChunk = serde_json::from_slice(payload)
        .map_err(|e| format!("snapshot part is not valid: {}", crate::redact::serde(&e)))?;
    if chunk.count > MAX_SNAPSHOT_PARTS {
        return Err(format!(
            "snapshot announces {} parts (at most {MAX_SNAPSHOT_PARTS})",
            chunk.count
        ));
    }
    if chunk.count == 0 || chunk.index >= chunk.count {
        return Err(format!(
            "snapshot part {} of {} is out of range",
            chunk.index, chunk.count
        ));
    }
    let data = base64::engine::general_purpose::STANDARD
        .decode(&chunk.data)
        .map_err(|_| "snapshot part data is not base64".to_string())?;
    let fresh = match assembly {
        Some(a) => a.id != chunk.id || a.count != chunk.count || a.sha256 != chunk.sha256,
        None => true,
    };
    if fresh {
        // A part of another transfer replaces an unfinished one.
        *assembly = Some(Assembly {
            id: chunk.id.clone(),
            count: chunk.count,
            sha256: chunk.sha256.to_lowercase(),
            parts: vec![None; chunk.count as usize],
            bytes: 0,
        });
    }
    let a = assembly.as_mut().expect("set above");
    if a.parts[chunk.index as usize].is_none() {
        a.bytes += data.len();
        if a.bytes > MAX_SNAPSHOT_BYTES {
            *assembly = None;
            return Err("snapshot exceeds 1 GiB".into());
        }
        a.parts[chunk.index as usize] = Some(data);
    }
    if a.parts.iter().any(Option::is_none) {
        return Ok(None);
    }
    let a = assembly.take().expect("complete");
    // Joined into one buffer of the exact size, each part freed as soon as it is copied: the
    // document is held about once, not twice (nor in a buffer grown by doubling).
    let mut doc: Vec<u8> = Vec::with_capacity(a.bytes);
    for part in a.parts.into_iter().flatten() {
        doc.extend_from_slice(&part);
    }
    let digest = hex::encode(Sha256::digest(&doc));
    if digest != a.sha256 {
        return Err(format!(
            "snapshot {} does not match its sha256 (got {digest})",
            crate::redact::excerpt(&a.id)
        ));
    }
    Ok(Some((a.id, doc)))
}

/// Parses and applies a snapshot or delta; records the outcome as an event; says what happened.
/// `id` is the transfer id of a document assembled from `sync/snapshot` parts, `None` for one
/// from `sync/delta`: the topic decides what is accepted (a snapshot only in parts, with its
/// SHA-256; a delta only on `sync/delta`).
/// Takes the document by value: it is dropped once parsed, before the site is built (a
/// million-credential snapshot is tens of MB of JSON).
pub fn apply_document(store: &Store, doc: Vec<u8>, id: Option<String>) -> SyncResult {
    let record = |kind: EventKind, payload: serde_json::Value| {
        if let Err(e) = store.record_flushed(kind, payload) {
            tracing::error!("recording a sync outcome: {e:#}");
        }
    };
    if let Some((kind, reason)) = wrong_topic(&doc, id.is_some()) {
        record(
            EventKind::SyncRefused,
            json!({"kind": kind, "reason": reason, "source": "mqtt"}),
        );
        tracing::warn!(kind, reason = %reason, "sync refused");
        return SyncResult {
            status: "refused".into(),
            kind: Some(kind.into()),
            id,
            version: None,
            current_version: store.site().version,
            reason: Some(reason.into()),
        };
    }
    let parsed = sync::parse_for_apply(&doc);
    drop(doc);
    let msg = match parsed {
        Ok(m) => m,
        Err(e) => {
            record(
                EventKind::SyncRefused,
                json!({"reason": e.to_string(), "source": "mqtt"}),
            );
            return SyncResult {
                status: "refused".into(),
                kind: None,
                id,
                version: None,
                current_version: store.site().version,
                reason: Some(e.to_string()),
            };
        }
    };
    let kind = match &msg {
        sync::Incoming::Snapshot(_) => "snapshot",
        sync::Incoming::Delta(_) => "delta",
    };
    let version = msg.version();
    // Consumed: a snapshot's records are freed as the new site is built from them.
    let result = store.apply_incoming(msg);
    let current_version = store.site().version;
    match result {
        Ok(Applied {
            version,
            previous_version,
            ..
        }) => {
            record(
                EventKind::SyncApplied,
                json!({"kind": kind, "version": version, "previous_version": previous_version, "source": "mqtt"}),
            );
            tracing::info!(kind, version, "sync applied");
            SyncResult {
                status: "applied".into(),
                kind: Some(kind.into()),
                id,
                version: Some(version),
                current_version,
                reason: None,
            }
        }
        Err(e) => {
            let status = if e.is_resync_needed() {
                "resync_needed"
            } else {
                "refused"
            };
            record(
                EventKind::SyncRefused,
                json!({"kind": kind, "version": version, "reason": e.to_string(), "source": "mqtt"}),
            );
            tracing::warn!(kind, version, "sync refused: {e}");
            let _: &ApplyError = &e;
            SyncResult {
                status: status.into(),
                kind: Some(kind.into()),
                id,
                version: Some(version),
                current_version,
                reason: Some(e.to_string()),
            }
        }
    }
}

/// A document of the wrong kind for its topic: its kind and why it is refused. Only the
/// header's `kind` is read (the rest is skipped), before anything is parsed for real.
fn wrong_topic(doc: &[u8], from_snapshot_topic: bool) -> Option<(&'static str, &'static str)> {
    #[derive(serde::Deserialize)]
    struct Head {
        kind: Option<String>,
    }
    let kind = serde_json::from_slice::<Head>(doc).ok()?.kind?;
    match (kind.as_str(), from_snapshot_topic) {
        ("snapshot", false) => Some((
            "snapshot",
            "a snapshot on sync/delta is refused: send snapshots in parts on sync/snapshot",
        )),
        ("delta", true) => Some((
            "delta",
            "a delta on sync/snapshot is refused: send deltas on sync/delta",
        )),
        _ => None,
    }
}
