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
//!
//! # Layout
//!
//! - this file: [`CloudLink`] (its fields and builders), [`LinkState`], [`Commands`],
//!   [`DeviceBridge`] and [`DeviceRpc`], and the session's outbox bookkeeping (`Outbox`);
//! - `session.rs`: [`CloudLink::run`] (reconnect with backoff and jitter) and one session:
//!   the MQTT settings, connect, subscribe, then the loop that polls the event loop and
//!   serves everything;
//! - `publish.rs`: what the link publishes: the outbox events (`fill`, the drain at a clean
//!   stop), `status`, `health`, command results, device states, pairing documents, alerts;
//! - `incoming.rs`: messages from the cloud: commands to the lanes, device responses, sync
//!   documents (snapshot parts assembled, [`apply_document`]).
//!
//! [`EventLog`]: crate::store::EventLog
//! [`limits`]: crate::cloud::limits

mod incoming;
mod publish;
mod session;

pub use incoming::apply_document;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, mpsc};

use crate::cloud::commands::{self, Outcome};
use crate::cloud::limits::TooLargeLog;
use crate::cloud::messages::Topics;
use crate::config::CloudConfig;
use crate::events::EventKind;
use crate::store::Store;

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
    /// The largest packet this connection may send
    /// ([`limits::outgoing_limit`](crate::cloud::limits::outgoing_limit)).
    max_packet: usize,
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
}
