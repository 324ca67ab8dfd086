//! Packet size limits of the cloud link, and what happens to a message over them
//! (docs/mqtt-api.md, *Sizes*).
//!
//! - **Out.** The gateway sends no packet over [`MAX_OUTGOING_PACKET`], nor over the Maximum
//!   Packet Size an MQTT 5 broker announces in its CONNACK. An event whose message would be
//!   larger is sent instead as a small `event_unpublishable` marker ([`unpublishable`]) with the
//!   same `id` and `seq`, acknowledged and deleted like any event: it never blocks the outbox.
//! - **In.** The gateway takes in packets up to [`incoming_limit`]. MQTT 5 advertises it in
//!   CONNECT (the broker drops a larger message instead of sending it); with MQTT 3.1.1 a larger
//!   packet ends the connection, which is recorded as a `message_too_large` event at most once
//!   an hour ([`TooLargeLog`]) and retried with a growing wait.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;

use crate::cloud::messages::EventMessage;
use crate::config::Protocol;

/// The largest packet the gateway sends. MQTT 3.1.1 has no way for a broker to say its limit;
/// 128 KiB fits the defaults of common brokers (AWS IoT Core's 128 KiB is the smallest) and is
/// far above any event the gateway records in normal operation.
pub const MAX_OUTGOING_PACKET: usize = 128 * 1024;

/// The kind of the marker sent in place of an event too large to publish.
pub const UNPUBLISHABLE_KIND: &str = "event_unpublishable";

/// The largest packet the gateway takes in: room for a snapshot part of 16 MiB of data (base64
/// and its envelope make it about 4/3 larger) or a command of `max_message_bytes`, twice over.
pub fn incoming_limit(max_message_bytes: usize) -> usize {
    max_message_bytes.max(16 << 20) * 2
}

/// The limit of one connection: ours, or the broker's when it announced a lower one.
pub fn outgoing_limit(broker: Option<u32>) -> usize {
    match broker {
        Some(b) => MAX_OUTGOING_PACKET.min(b as usize),
        None => MAX_OUTGOING_PACKET,
    }
}

/// The marker for the stored record `stored` (the event `<epoch>-<seq>`) whose message is over
/// the packet limit: `kind` `event_unpublishable`, the original's `at` and `local` (the Unix
/// epoch and `""` when they cannot be read), payload `{original_kind, original_bytes}` where
/// `original_bytes` is the stored record's length. Made from the record alone, so a re-send
/// carries the same content (only `historical` follows the connection, as for every event).
pub fn unpublishable(epoch: &str, seq: u64, historical: bool, stored: &[u8]) -> Vec<u8> {
    /// What is read of the record: the rest (the payload) is skipped without being kept.
    #[derive(Deserialize)]
    struct Head {
        kind: Option<String>,
        at: Option<DateTime<Utc>>,
        local: Option<String>,
    }
    let head = serde_json::from_slice::<Head>(stored).ok();
    let (kind, at, local) = match head {
        Some(h) => (h.kind, h.at, h.local),
        None => (None, None, None),
    };
    let short = |s: Option<String>, n: usize| {
        s.filter(|s| s.len() <= n && !s.contains(char::is_control))
            .unwrap_or_default()
    };
    let msg = EventMessage {
        id: format!("{epoch}-{seq}"),
        seq,
        kind: UNPUBLISHABLE_KIND.into(),
        at: at.unwrap_or(DateTime::UNIX_EPOCH),
        local: short(local, 64),
        historical,
        payload: json!({
            "original_kind": short(kind, 64),
            "original_bytes": stored.len(),
        }),
    };
    serde_json::to_vec(&msg).unwrap_or_default()
}

/// How often a `message_too_large` event may be recorded.
pub const TOO_LARGE_EVENT_EVERY: Duration = Duration::from_secs(3600);

/// Coalesces the `message_too_large` events of a link: the first occurrence is recorded at
/// once, later ones at most once per [`TOO_LARGE_EVENT_EVERY`], each saying how many
/// occurrences it stands for.
#[derive(Debug, Default)]
pub struct TooLargeLog {
    last: Option<Instant>,
    /// Occurrences since the last event recorded (not yet in an event).
    pending: u64,
    /// The largest size among them.
    largest: usize,
}

impl TooLargeLog {
    /// Notes one occurrence at `now`; returns the event payload to record, if one is due.
    pub fn note(
        &mut self,
        now: Instant,
        bytes: usize,
        limit: usize,
        protocol: Protocol,
    ) -> Option<serde_json::Value> {
        self.pending += 1;
        self.largest = self.largest.max(bytes);
        let due = self
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= TOO_LARGE_EVENT_EVERY);
        if !due {
            return None;
        }
        let payload = json!({
            "bytes": self.largest,
            "limit": limit,
            "protocol": match protocol { Protocol::V311 => "3.1.1", Protocol::V5 => "5" },
            "occurrences": self.pending,
        });
        self.last = Some(now);
        self.pending = 0;
        self.largest = 0;
        Some(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_is_small_deterministic_and_keeps_the_identity() {
        let big = format!(
            r#"{{"seq":7,"at":"2026-11-23T21:15:00Z","local":"2026-11-23T16:15:00-05:00","kind":"sync_refused","payload":{{"reason":"{}"}}}}"#,
            "x".repeat(1 << 20)
        );
        let a = unpublishable("00ff", 7, true, big.as_bytes());
        let b = unpublishable("00ff", 7, true, big.as_bytes());
        assert_eq!(a, b);
        assert!(a.len() < 512);
        let m: EventMessage = serde_json::from_slice(&a).unwrap();
        assert_eq!(m.id, "00ff-7");
        assert_eq!(m.seq, 7);
        assert_eq!(m.kind, UNPUBLISHABLE_KIND);
        assert_eq!(m.at.to_rfc3339(), "2026-11-23T21:15:00+00:00");
        assert_eq!(m.payload["original_kind"], "sync_refused");
        assert_eq!(m.payload["original_bytes"], big.len());
        // A corrupt record still gets a marker with its identity.
        let c: EventMessage =
            serde_json::from_slice(&unpublishable("00ff", 8, false, b"\xff\x00")).unwrap();
        assert_eq!((c.seq, c.at), (8, DateTime::UNIX_EPOCH));
    }

    #[test]
    fn too_large_events_are_coalesced_to_one_an_hour() {
        let mut log = TooLargeLog::default();
        let t0 = Instant::now();
        let first = log.note(t0, 100, 10, Protocol::V311).unwrap();
        assert_eq!(first["occurrences"], 1);
        for i in 1..1000u64 {
            assert!(
                log.note(t0 + Duration::from_secs(i), 200, 10, Protocol::V311)
                    .is_none()
            );
        }
        let next = log
            .note(t0 + TOO_LARGE_EVENT_EVERY, 50, 10, Protocol::V311)
            .unwrap();
        assert_eq!(next["occurrences"], 1000);
        assert_eq!(next["bytes"], 200);
    }

    #[test]
    fn packet_sizes_count_the_header() {
        use crate::cloud::mqtt::publish_packet_size;
        assert_eq!(publish_packet_size(Protocol::V311, 10, 100), 1 + 1 + 114);
        assert_eq!(publish_packet_size(Protocol::V5, 10, 200), 1 + 2 + 215);
        assert!(outgoing_limit(Some(1000)) == 1000 && outgoing_limit(None) == MAX_OUTGOING_PACKET);
    }
}
