//! The link's life: [`CloudLink::run`] connects, runs a session until the connection ends, and
//! reconnects with capped exponential backoff and jitter; a session subscribes, publishes what
//! is due at a connection, then polls the MQTT event loop alone, serving acknowledgements,
//! incoming messages, command outcomes, device requests and wake-ups, and the periodic tick.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::incoming::Assembly;
use super::{CloudLink, Outbox, apply_document};
use crate::cloud::commands::{self, Effect, Outcome};
use crate::cloud::lanes::{CmdJob, dispatch_commands, keep_unsent, record_effects};
use crate::cloud::limits;
use crate::cloud::messages::SyncResult;
use crate::cloud::mqtt::{self, Ev, Loop, PollError};
use crate::config::Transport;

/// Requests queued in rumqttc's channel at most; the outbox window is kept below it.
const REQUEST_CAPACITY: usize = 1024;

enum SessionEnd {
    Shutdown,
    Lost(String),
    /// The broker sent a packet over the incoming limit (MQTT 3.1.1 cannot tell it the limit).
    TooLarge {
        bytes: usize,
        max: usize,
    },
}

impl CloudLink {
    fn settings(&self) -> anyhow::Result<mqtt::Settings> {
        let c = &self.cfg;
        let tls = match &c.transport {
            Transport::Tls {
                ca_file,
                use_system_roots,
                cert_file,
                key_file,
            } => Some(crate::cloud::tls::client_config(
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
