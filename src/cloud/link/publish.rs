//! What the link publishes: the outbox events in order within the window (`fill`, with the
//! `event_unpublishable` marker for an event over the packet limit), their drain at a clean
//! stop, the retained `status` (and the offline goodbye), `health` when due, command results,
//! device states, pairing documents and alerts; every publish goes through `publish` (packet
//! limit guard, the request recorded for the `pkid -> seq` mapping).

use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use super::{CloudLink, Outbox};
use crate::cloud::limits;
use crate::cloud::messages::{
    EventMessage, Health, HealthBus, HealthCloud, HealthDecisions, HealthOutbox, Status,
};
use crate::cloud::mqtt::{Client, Ev, Loop};

/// How often `health` is published when nothing changed.
const HEALTH_EVERY: Duration = Duration::from_secs(60);
/// What makes `health` due before `HEALTH_EVERY`: the store's state and the devices online.
type HealthKey = (
    String,
    std::collections::BTreeMap<String, crate::cloud::messages::HealthBus>,
);

impl CloudLink {
    pub(super) fn status(&self, online: bool) -> Status {
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
    pub(super) fn publish_health(
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
    pub(super) fn publish_result(
        &self,
        client: &Client,
        out: &mut Outbox,
        result: &crate::cloud::messages::CommandResult,
    ) -> anyhow::Result<()> {
        self.metrics.command_result(&result.status);
        let topic = self.topics.command_result(&result.name);
        self.publish(client, out, topic, false, result)
    }

    /// Publishes more events while the window allows.
    pub(super) fn fill(
        &self,
        client: &Client,
        out: &mut Outbox,
        connected_at: u64,
    ) -> anyhow::Result<()> {
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
    pub(super) fn publish_states(
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
    pub(super) fn publish_pairing(
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
    pub(super) fn publish_alerts(
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

    pub(super) fn publish<T: serde::Serialize>(
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
    pub(super) async fn drain_outbox(
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
    pub(super) async fn goodbye(&self, client: &Client, el: &mut Loop) {
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
