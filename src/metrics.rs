//! Metrics: one OpenMetrics registry for the daemon (prometheus-client), the handles drivers
//! count with, and the `/metrics` endpoint (docs/operations.md *Metrics* lists every family).
//!
//! - [`Metrics`] is a cheap handle (an `Arc`) made once by the [`crate::access::AccessEngine`];
//!   drivers reach it through the engine they already hold (RS-485 `Shared`, the BLE manager),
//!   the cloud link gets a clone from the daemon. Nothing here imports the daemon.
//! - Counting on the decision and bus paths is an atomic add (counters are `Arc<AtomicU64>`);
//!   labels there are `&'static str` (decision reasons) or resolved once per bus
//!   ([`Metrics::bus`] gives a [`BusMetrics`] the bus thread keeps): no allocation per event.
//! - What the store knows (outbox depth, oldest event, size on disk, health) is read at scrape
//!   time ([`Metrics::encode`]), not mirrored.
//! - [`serve`]: a minimal HTTP/1.1 responder on tokio (`GET /metrics`, one request per
//!   connection, bounded request size and time). It binds before the daemon goes on, so that a
//!   port in use is one clear error line while access keeps being decided.
//! - [`Metrics::health`] gives the essentials for the cloud's `health` message (the link
//!   publishes it; docs/mqtt-api.md).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// The content type of a scrape.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The largest request head the endpoint reads.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; more wait for the listener.
const MAX_CONNECTIONS: usize = 4;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    reason: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BusLabels {
    bus: String,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    device: String,
    bus: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The registry and its families. See the module header.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    started: Instant,
    decisions: Family<DecisionLabels, Counter>,
    granted: AtomicU64,
    denied: AtomicU64,
    decision_seconds: Histogram,
    outbox_events: Gauge,
    outbox_oldest_age: Gauge,
    store_bytes: Gauge,
    store_ok: Gauge,
    uptime: Gauge,
    published: Counter,
    acknowledged: Counter,
    cloud_connected: Gauge,
    cloud_reconnects: Counter,
    command_results: Family<StatusLabels, Counter>,
    bus_transactions: Family<BusLabels, Counter>,
    bus_timeouts: Family<BusLabels, Counter>,
    bus_crc_errors: Family<BusLabels, Counter>,
    bus_seconds: Family<BusLabels, Histogram>,
    device_online: Family<DeviceLabels, Gauge>,
    /// device -> (bus, online): the health message's counts per bus.
    online: Mutex<BTreeMap<String, (String, bool)>>,
    /// The buses started since the daemon started: each is in the health message, at 0 of 0
    /// while it has no devices (an empty bus, listening for install mode).
    buses: Mutex<std::collections::BTreeSet<String>>,
    ble_adverts: Counter,
    ble_lock_ops: Family<ResultLabels, Counter>,
    facts_dropped: Counter,
    automation: crate::automation::runner::RunnerCounters,
}

/// One bus's counters, resolved once and kept by the bus thread.
#[derive(Clone)]
pub struct BusMetrics {
    transactions: Counter,
    timeouts: Counter,
    crc_errors: Counter,
    seconds: Histogram,
}

/// How one bus transaction ended, for [`BusMetrics::transaction`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxOutcome {
    /// An answer (a Modbus exception is an answer).
    Answered,
    /// No answer in time.
    Timeout,
    /// A garbled answer: bad CRC, wrong length or framing.
    Garbled,
    /// The port failed.
    PortError,
}

impl BusMetrics {
    /// Counts one transaction that took `elapsed` (monotonic).
    pub fn transaction(&self, elapsed: Duration, outcome: TxOutcome) {
        self.transactions.inc();
        self.seconds.observe(elapsed.as_secs_f64());
        match outcome {
            TxOutcome::Timeout => {
                self.timeouts.inc();
            }
            TxOutcome::Garbled => {
                self.crc_errors.inc();
            }
            TxOutcome::Answered | TxOutcome::PortError => {}
        }
    }

    /// Counts one transaction whose timing and outcome the protocol library keeps (OSDP).
    pub fn sent(&self) {
        self.transactions.inc();
    }
}

/// The essentials of the `health` message, from the counters (the link adds the store's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCounts {
    pub uptime_s: u64,
    pub granted: u64,
    pub denied: u64,
    pub cloud_reconnects: u64,
    /// Per bus (`ble` for BLE devices): (online, known).
    pub buses: BTreeMap<String, (u32, u32)>,
    /// Automation: facts dropped by a full queue, facts from unknown devices, active alerts.
    pub facts_dropped: u64,
    pub facts_unknown: u64,
    pub alerts_active: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("gatehouse");
        let decisions = Family::<DecisionLabels, Counter>::default();
        r.register(
            "decisions",
            "Access decisions by reason and result (granted or denied)",
            decisions.clone(),
        );
        let decision_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        r.register_with_unit(
            "decision_duration",
            "Time from an attempt to its decision on disk",
            Unit::Seconds,
            decision_seconds.clone(),
        );
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        let outbox_events = gauge(
            &mut r,
            "outbox_events",
            "Events held in the outbox (not yet acknowledged by the broker)",
        );
        let outbox_oldest_age = Gauge::default();
        r.register_with_unit(
            "outbox_oldest_event_age",
            "Age of the oldest event in the outbox (0 when empty)",
            Unit::Seconds,
            outbox_oldest_age.clone(),
        );
        let store_bytes = Gauge::default();
        r.register_with_unit(
            "store_size",
            "Size of the site database on disk",
            Unit::Bytes,
            store_bytes.clone(),
        );
        let store_ok = gauge(
            &mut r,
            "store_ok",
            "1 while the database takes writes, 0 after a storage failure",
        );
        let uptime = Gauge::default();
        r.register_with_unit(
            "uptime",
            "Time since the daemon started",
            Unit::Seconds,
            uptime.clone(),
        );
        r.register(
            "build",
            "The gatehouse version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let published = counter(
            &mut r,
            "events_published",
            "Events written to the broker (QoS 1; a resend after a reconnect counts again)",
        );
        let acknowledged = counter(
            &mut r,
            "events_acknowledged",
            "Events acknowledged by the broker (PUBACK) and removed from the outbox",
        );
        let cloud_connected = gauge(
            &mut r,
            "cloud_connected",
            "1 while the cloud link is connected (CONNACK received), else 0",
        );
        let cloud_reconnects = counter(
            &mut r,
            "cloud_reconnects",
            "Connection attempts to the broker after the first one",
        );
        let command_results = Family::<StatusLabels, Counter>::default();
        r.register(
            "command_results",
            "Cloud command results published, by status",
            command_results.clone(),
        );
        let bus_transactions = Family::<BusLabels, Counter>::default();
        r.register(
            "bus_transactions",
            "RS-485 transactions (requests sent) per bus",
            bus_transactions.clone(),
        );
        let bus_timeouts = Family::<BusLabels, Counter>::default();
        r.register(
            "bus_timeouts",
            "RS-485 transactions without an answer in time (Modbus)",
            bus_timeouts.clone(),
        );
        let bus_crc_errors = Family::<BusLabels, Counter>::default();
        r.register(
            "bus_crc_errors",
            "RS-485 answers with a bad CRC or framing (Modbus)",
            bus_crc_errors.clone(),
        );
        let bus_seconds: Family<BusLabels, Histogram> = Family::new_with_constructor(bus_histogram);
        r.register_with_unit(
            "bus_transaction_duration",
            "RS-485 transaction time, request to answer or timeout (Modbus)",
            Unit::Seconds,
            bus_seconds.clone(),
        );
        let device_online = Family::<DeviceLabels, Gauge>::default();
        r.register(
            "device_online",
            "1 while a device answers (RS-485) or is heard (BLE), 0 when offline",
            device_online.clone(),
        );
        let ble_adverts = counter(&mut r, "ble_adverts", "BLE advertisements received");
        let ble_lock_ops = Family::<ResultLabels, Counter>::default();
        r.register(
            "ble_lock_operations",
            "BLE lock operations by result (done, queued, failed)",
            ble_lock_ops.clone(),
        );
        let facts_dropped = counter(
            &mut r,
            "automation_facts_dropped",
            "Facts for automation dropped because its queue was full",
        );
        let automation = crate::automation::runner::RunnerCounters {
            facts: counter(
                &mut r,
                "automation_facts",
                "Facts the automation runner took",
            ),
            unknown: counter(
                &mut r,
                "automation_facts_unknown",
                "Facts from a device, entry or unit the site does not know (ignored)",
            ),
            active: gauge(
                &mut r,
                "automation_alerts_active",
                "Active alerts (as published on `alerts`)",
            ),
        };
        Metrics {
            inner: Arc::new(Inner {
                registry: r,
                started: Instant::now(),
                decisions,
                granted: AtomicU64::new(0),
                denied: AtomicU64::new(0),
                decision_seconds,
                outbox_events,
                outbox_oldest_age,
                store_bytes,
                store_ok,
                uptime,
                published,
                acknowledged,
                cloud_connected,
                cloud_reconnects,
                command_results,
                bus_transactions,
                bus_timeouts,
                bus_crc_errors,
                bus_seconds,
                device_online,
                online: Mutex::new(BTreeMap::new()),
                buses: Mutex::default(),
                ble_adverts,
                ble_lock_ops,
                facts_dropped,
                automation,
            }),
        }
    }

    /// One access decision, on disk `elapsed` after the attempt arrived.
    pub fn decision(&self, reason: &'static str, granted: bool, elapsed: Duration) {
        let i = &self.inner;
        let result = if granted { "granted" } else { "denied" };
        i.decisions
            .get_or_create(&DecisionLabels { reason, result })
            .inc();
        if granted {
            i.granted.fetch_add(1, Ordering::Relaxed);
        } else {
            i.denied.fetch_add(1, Ordering::Relaxed);
        }
        i.decision_seconds.observe(elapsed.as_secs_f64());
    }

    /// The counters of one bus (made at zero so a scrape shows the bus from the start).
    pub fn bus(&self, bus: &str, protocol: &'static str) -> BusMetrics {
        let l = BusLabels {
            bus: bus.to_string(),
            protocol,
        };
        let i = &self.inner;
        i.buses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(bus.to_string());
        BusMetrics {
            transactions: i.bus_transactions.get_or_create_owned(&l),
            timeouts: i.bus_timeouts.get_or_create_owned(&l),
            crc_errors: i.bus_crc_errors.get_or_create_owned(&l),
            seconds: i.bus_seconds.get_or_create_owned(&l),
        }
    }

    /// A device's liveness (on change; `bus` is the bus id, or `ble`).
    pub fn device_online(&self, device: &str, bus: &str, online: bool) {
        self.inner
            .device_online
            .get_or_create(&DeviceLabels {
                device: device.to_string(),
                bus: bus.to_string(),
            })
            .set(online as i64);
        self.inner
            .online
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(device.to_string(), (bus.to_string(), online));
    }

    /// A device taken off its bus (a reload without it, the removal of an adopted device): no
    /// longer counted or exported.
    pub fn device_removed(&self, device: &str) {
        let gone = self
            .inner
            .online
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(device);
        if let Some((bus, _)) = gone {
            self.inner.device_online.remove(&DeviceLabels {
                device: device.to_string(),
                bus,
            });
        }
    }

    pub fn ble_advert(&self) {
        self.inner.ble_adverts.inc();
    }

    /// A BLE lock operation's outcome: `done`, `queued` or `failed`.
    pub fn ble_lock_operation(&self, result: &'static str) {
        self.inner
            .ble_lock_ops
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn cloud_connected(&self, connected: bool) {
        self.inner.cloud_connected.set(connected as i64);
    }

    pub fn cloud_reconnect(&self) {
        self.inner.cloud_reconnects.inc();
    }

    pub fn event_published(&self) {
        self.inner.published.inc();
    }

    pub fn event_acknowledged(&self) {
        self.inner.acknowledged.inc();
    }

    /// A command result published, by its status (`done`, `failed`, `refused`, ...).
    pub fn command_result(&self, status: &str) {
        self.inner
            .command_results
            .get_or_create(&StatusLabels {
                status: status.to_string(),
            })
            .inc();
    }

    /// What a full automation queue counts ([`crate::automation::facts::FactSink::bounded`]).
    pub fn facts_dropped(&self) -> Counter {
        self.inner.facts_dropped.clone()
    }

    /// The automation runner's counters.
    pub fn automation(&self) -> crate::automation::runner::RunnerCounters {
        self.inner.automation.clone()
    }

    /// Counters for the `health` message.
    pub fn health(&self) -> HealthCounts {
        let i = &self.inner;
        let mut buses: BTreeMap<String, (u32, u32)> = i
            .buses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|b| (b.clone(), (0, 0)))
            .collect();
        for (bus, online) in i.online.lock().unwrap_or_else(|e| e.into_inner()).values() {
            let c = buses.entry(bus.clone()).or_default();
            c.0 += *online as u32;
            c.1 += 1;
        }
        HealthCounts {
            uptime_s: i.started.elapsed().as_secs(),
            granted: i.granted.load(Ordering::Relaxed),
            denied: i.denied.load(Ordering::Relaxed),
            cloud_reconnects: i.cloud_reconnects.get(),
            buses,
            facts_dropped: i.facts_dropped.get(),
            facts_unknown: i.automation.unknown.get(),
            alerts_active: u64::try_from(i.automation.active.get()).unwrap_or(0),
        }
    }

    /// The OpenMetrics text of a scrape, with what the store knows read now.
    pub fn encode(&self, store: &Store) -> String {
        let i = &self.inner;
        let events = store.events();
        i.outbox_events.set(events.len() as i64);
        let oldest = oldest_age_s(&events).unwrap_or(0);
        drop(events);
        i.outbox_oldest_age.set(oldest as i64);
        i.store_bytes.set(store.size_on_disk() as i64);
        i.store_ok.set(store.health().is_ok() as i64);
        i.uptime.set(i.started.elapsed().as_secs() as i64);
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &i.registry);
        out
    }
}

fn bus_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 12))
}

/// Age of the oldest visible event, in seconds (wall clock: the event's own time).
pub fn oldest_age_s(events: &crate::store::EventLog) -> Option<u64> {
    let first = events.bounds().0?;
    let e = events.read_from(first, 1).ok()?.into_iter().next()?;
    Some((Utc::now() - e.at).num_seconds().max(0) as u64)
}

/// The checked `[metrics]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

/// `[metrics]` as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// `host:port` for `GET /metrics`; absent: no endpoint.
    #[serde(default)]
    pub listen: Option<toml::Spanned<String>>,
}

/// Checks `[metrics]`: `listen` must be an IP address and port (`127.0.0.1:9469`).
pub fn check(
    raw: &RawMetrics,
    err: &crate::config::ErrFn,
) -> Result<Option<MetricsConfig>, crate::config::ConfigError> {
    let Some(l) = &raw.listen else {
        return Ok(None);
    };
    let listen: SocketAddr = l.get_ref().parse().map_err(|_| {
        err(
            l.span(),
            "metrics.listen",
            format!(
                "{} is not an IP address and port (expected e.g. `127.0.0.1:9469` or \
                 `[::1]:9469`)",
                crate::redact::excerpt(l.get_ref())
            ),
        )
    })?;
    Ok(Some(MetricsConfig { listen }))
}

/// The endpoint as configured now: started at start-up, replaced by a reload that changes
/// `[metrics]` (the old listener stops, the new one binds; a bind failure is logged and leaves
/// no endpoint until the next reload or restart).
pub struct Endpoint {
    metrics: Metrics,
    store: Arc<Store>,
    stop: CancellationToken,
    current: Mutex<Option<(MetricsConfig, CancellationToken)>>,
}

impl Endpoint {
    /// Serves `cfg` (if any) until `stop`; a port in use is logged and the daemon goes on.
    pub fn start(
        cfg: Option<&MetricsConfig>,
        metrics: Metrics,
        store: Arc<Store>,
        stop: CancellationToken,
    ) -> Arc<Endpoint> {
        let e = Arc::new(Endpoint {
            metrics,
            store,
            stop,
            current: Mutex::new(None),
        });
        if let Err(err) = e.set(cfg) {
            tracing::error!("{err:#}; running without the metrics endpoint");
        }
        e
    }

    fn set(&self, cfg: Option<&MetricsConfig>) -> anyhow::Result<()> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.as_ref().map(|c| &c.0) == cfg {
            return Ok(());
        }
        if let Some((_, old)) = cur.take() {
            old.cancel();
        }
        if let Some(c) = cfg {
            let token = self.stop.child_token();
            serve(c, self.metrics.clone(), self.store.clone(), token.clone())?;
            *cur = Some((c.clone(), token));
        }
        Ok(())
    }
}

impl crate::reload::Part for Endpoint {
    fn apply(
        &self,
        old: &crate::config::Config,
        new: &crate::config::Config,
    ) -> anyhow::Result<Vec<String>> {
        if old.metrics == new.metrics {
            return Ok(Vec::new());
        }
        self.set(new.metrics.as_ref())?;
        Ok(vec!["metrics".to_string()])
    }
}

/// Binds the endpoint and serves it until `stop`. A bind failure is returned (the daemon logs
/// it and runs on without metrics); a non-loopback address is served with a warning.
pub fn serve(
    cfg: &MetricsConfig,
    metrics: Metrics,
    store: Arc<Store>,
    stop: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    use anyhow::Context as _;
    let std_listener = std::net::TcpListener::bind(cfg.listen)
        .with_context(|| format!("metrics: cannot listen on {}", cfg.listen))?;
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!(
            listen = %addr,
            "metrics endpoint on a non-loopback address: anyone who reaches this port reads \
             the gateway's figures (device ids, bus names); firewall it"
        );
    }
    tracing::info!(listen = %addr, "metrics endpoint: GET /metrics");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = stop.cancelled() => return,
            };
            let conn = tokio::select! {
                c = listener.accept() => c,
                _ = stop.cancelled() => return,
            };
            let (sock, _) = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("metrics: accept: {e}");
                    continue;
                }
            };
            let (metrics, store) = (metrics.clone(), store.clone());
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT * 2, respond(sock, &metrics, &store))
                    .await;
                drop(permit);
            });
        }
    });
    Ok((addr, task))
}

/// Reads one request head and answers it; the connection closes after.
async fn respond(mut sock: tokio::net::TcpStream, metrics: &Metrics, store: &Arc<Store>) {
    let mut buf = Vec::with_capacity(512);
    let head = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Some(end);
            }
            if buf.len() >= MAX_REQUEST {
                return None;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let (status, ctype, body) = match head {
        Ok(Some(end)) => {
            let line = buf[..end].split(|&b| b == b'\r').next().unwrap_or_default();
            let mut parts = line.split(|&b| b == b' ');
            let (method, path) = (parts.next(), parts.next());
            match (method, path) {
                (Some(b"GET"), Some(p)) if p == b"/metrics" || p.starts_with(b"/metrics?") => {
                    let store = store.clone();
                    let metrics = metrics.clone();
                    match tokio::task::spawn_blocking(move || metrics.encode(&store)).await {
                        Ok(text) => ("200 OK", CONTENT_TYPE, text),
                        Err(_) => (
                            "500 Internal Server Error",
                            "text/plain",
                            "scrape failed\n".into(),
                        ),
                    }
                }
                (Some(b"GET"), _) => (
                    "404 Not Found",
                    "text/plain",
                    "only /metrics is served here\n".into(),
                ),
                _ => (
                    "405 Method Not Allowed",
                    "text/plain",
                    "only GET /metrics\n".into(),
                ),
            }
        }
        _ => (
            "400 Bad Request",
            "text/plain",
            "request head missing or too large\n".into(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = sock.write_all(head.as_bytes()).await;
    let _ = sock.write_all(body.as_bytes()).await;
    let _ = sock.shutdown().await;
}
