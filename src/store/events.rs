//! The event log (tree `events`), which is also the cloud outbox.
//!
//! `<seq:u64be>` → JSON [`Event`]. Sequence numbers increase by one per event and are never
//! reused (the next number is recovered from the last key at open). [`EventLog::append`] flushes
//! before it returns: an event is on disk before its effect is reported. The log is bounded by
//! a count; the oldest events go first.

use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::events::EventKind;

/// One entry of the durable event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    /// When it happened, UTC.
    pub at: DateTime<Utc>,
    /// The same instant in the facility's local time, with its offset (RFC 3339).
    pub local: String,
    pub kind: String,
    pub payload: serde_json::Value,
}

/// An event to append; the log assigns the sequence number.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub at: DateTime<Utc>,
    pub local: String,
    pub kind: EventKind,
    pub payload: serde_json::Value,
}

/// Bounds of the event log (which is also the cloud outbox).
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    pub max_events: u64,
    pub max_bytes: u64,
    pub max_age: chrono::Duration,
}

impl LogLimits {
    pub fn with_max_events(max_events: u64) -> Self {
        LogLimits {
            max_events,
            ..LogLimits::default()
        }
    }
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            max_events: 1_000_000,
            max_bytes: 256 << 20,
            max_age: chrono::Duration::days(30),
        }
    }
}

#[derive(Debug)]
struct LogState {
    next: u64,
    count: u64,
    bytes: u64,
}

/// The durable, bounded event log. It is also the cloud outbox: an event leaves it only when the
/// broker has acknowledged it ([`EventLog::remove_delivered`]) or when the log is over its bounds,
/// and then the oldest events that are not security events go first
/// ([`crate::events::is_security_kind`]); an `outbox_overflow` event counts what was dropped.
pub struct EventLog {
    tree: sled::Tree,
    state: Mutex<LogState>,
    limits: LogLimits,
    appended: Arc<tokio::sync::Notify>,
}

/// Key of the next sequence number to assign: the empty key sorts before every 8-byte event key,
/// so reads from a cursor never see it.
const HIGH_WATER: &[u8] = b"";

fn seq_of(k: &[u8]) -> anyhow::Result<u64> {
    Ok(u64::from_be_bytes(
        k.try_into().context("event log key is not 8 bytes")?,
    ))
}

impl EventLog {
    pub(super) fn open(db: &sled::Db, limits: LogLimits) -> anyhow::Result<EventLog> {
        let tree = db.open_tree("events")?;
        let next = match tree.range(0u64.to_be_bytes()..).next_back() {
            Some(kv) => seq_of(&kv?.0)? + 1,
            None => 1,
        };
        // Sequence numbers are never reused, even when the log was emptied by deliveries.
        let floor = tree
            .get(HIGH_WATER)?
            .map(|v| seq_of(&v))
            .transpose()?
            .unwrap_or(1);
        let (mut count, mut bytes) = (0u64, 0u64);
        for kv in tree.range(0u64.to_be_bytes()..) {
            let (_, v) = kv?;
            count += 1;
            bytes += v.len() as u64;
        }
        Ok(EventLog {
            tree,
            state: Mutex::new(LogState {
                next: next.max(floor),
                count,
                bytes,
            }),
            limits: LogLimits {
                max_events: limits.max_events.max(1),
                ..limits
            },
            appended: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Appends events and flushes them to disk before returning their sequence numbers.
    pub fn append(&self, events: &[NewEvent]) -> anyhow::Result<Vec<u64>> {
        let seqs = self.append_unflushed(events)?;
        self.tree.flush()?;
        Ok(seqs)
    }

    /// Appends without waiting for the disk (the background flush, at most 500 ms later, makes
    /// them durable). For events whose loss in a power cut is acceptable.
    pub fn append_unflushed(&self, events: &[NewEvent]) -> anyhow::Result<Vec<u64>> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut batch = sled::Batch::default();
        let mut seqs = Vec::with_capacity(events.len());
        let (mut next, mut added) = (st.next, 0u64);
        for e in events {
            let ev = Event {
                seq: next,
                at: e.at,
                local: e.local.clone(),
                kind: e.kind.as_str().to_string(),
                payload: e.payload.clone(),
            };
            let v = serde_json::to_vec(&ev)?;
            added += v.len() as u64;
            batch.insert(&next.to_be_bytes(), v);
            seqs.push(next);
            next += 1;
        }
        // The high-water mark of sequence numbers, in the same batch.
        batch.insert(HIGH_WATER, &next.to_be_bytes());
        self.tree.apply_batch(batch)?;
        st.next = next;
        st.count += events.len() as u64;
        st.bytes += added;
        self.appended.notify_one();
        if st.count > self.limits.max_events || st.bytes > self.limits.max_bytes {
            let at = events.last().map_or_else(Utc::now, |e| e.at);
            let local = events.last().map(|e| e.local.clone()).unwrap_or_default();
            self.trim_locked(&mut st, at, &local)?;
        }
        Ok(seqs)
    }

    /// Enforces the bounds now (also the maximum age). The cloud link calls it periodically.
    pub fn trim(&self, now: DateTime<Utc>, local: &str) -> anyhow::Result<u64> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.trim_locked(&mut st, now, local)
    }

    /// Drops the oldest non-security events until the log is within 95 % of its bounds (so that
    /// trimming is not repeated at every append) and nothing is older than the maximum age.
    /// Security events are kept even beyond the bounds. Records one `outbox_overflow` event.
    fn trim_locked(
        &self,
        st: &mut LogState,
        now: DateTime<Utc>,
        local: &str,
    ) -> anyhow::Result<u64> {
        let target_events = self.limits.max_events - self.limits.max_events / 20;
        let target_bytes = self.limits.max_bytes - self.limits.max_bytes / 20;
        let cutoff = now.checked_sub_signed(self.limits.max_age);
        let over_bounds = st.count > self.limits.max_events || st.bytes > self.limits.max_bytes;
        let (mut count, mut bytes) = (st.count, st.bytes);
        let mut batch = sled::Batch::default();
        let (mut dropped, mut first, mut last) = (0u64, None, 0u64);
        for kv in self.tree.range(0u64.to_be_bytes()..) {
            let (k, v) = kv?;
            let shrinking = over_bounds && (count > target_events || bytes > target_bytes);
            let ev: Option<Event> = serde_json::from_slice(&v).ok();
            let too_old = match (&ev, cutoff) {
                (Some(e), Some(c)) => e.at < c,
                _ => false,
            };
            // Events are in time order: once one is neither needed for space nor too old,
            // none after it is.
            if !shrinking && !too_old {
                break;
            }
            // A corrupt record is dropped like an ordinary one (and counted).
            if ev
                .as_ref()
                .is_some_and(|e| crate::events::is_security_kind(&e.kind))
            {
                continue;
            }
            let seq = seq_of(&k)?;
            batch.remove(k);
            count = count.saturating_sub(1);
            bytes = bytes.saturating_sub(v.len() as u64);
            dropped += 1;
            first.get_or_insert(seq);
            last = seq;
        }
        if dropped == 0 {
            return Ok(0);
        }
        let overflow = Event {
            seq: st.next,
            at: now,
            local: local.to_string(),
            kind: crate::events::EventKind::OutboxOverflow
                .as_str()
                .to_string(),
            payload: serde_json::json!({
                "dropped": dropped,
                "first_seq": first,
                "last_seq": last,
                "max_events": self.limits.max_events,
                "max_bytes": self.limits.max_bytes,
                "max_age_seconds": self.limits.max_age.num_seconds(),
            }),
        };
        let v = serde_json::to_vec(&overflow)?;
        count += 1;
        bytes += v.len() as u64;
        batch.insert(&st.next.to_be_bytes(), v);
        batch.insert(HIGH_WATER, &(st.next + 1).to_be_bytes());
        self.tree.apply_batch(batch)?;
        st.next += 1;
        st.count = count;
        st.bytes = bytes;
        tracing::warn!(dropped, first_seq = ?first, last_seq = last, "event log over its bounds: dropped the oldest non-security events");
        Ok(dropped)
    }

    /// Removes events the broker has acknowledged. Not flushed: an acknowledgement lost in a
    /// crash only means the event is sent again (the cloud drops duplicates by id).
    pub fn remove_delivered(&self, seqs: &[u64]) -> anyhow::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for s in seqs {
            if let Some(v) = self.tree.remove(s.to_be_bytes())? {
                st.count = st.count.saturating_sub(1);
                st.bytes = st.bytes.saturating_sub(v.len() as u64);
            }
        }
        Ok(())
    }

    /// The same log woken through `appended` (kept by a store that reopens its database).
    pub(super) fn with_appended(mut self, appended: Arc<tokio::sync::Notify>) -> EventLog {
        self.appended = appended;
        self
    }

    /// Makes sure no sequence number below `floor` is assigned again (a store reopened after a
    /// storage failure: numbers the old handles gave out in memory may have been sent).
    pub(super) fn raise_next(&self, floor: u64) -> anyhow::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if floor > st.next {
            self.tree.insert(HIGH_WATER, &floor.to_be_bytes())?;
            st.next = floor;
        }
        Ok(())
    }

    /// Woken after every append (the cloud link waits on it).
    pub fn appended(&self) -> Arc<tokio::sync::Notify> {
        self.appended.clone()
    }

    /// Bytes of event records held.
    pub fn bytes(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }

    /// Flushes the log to disk.
    pub fn flush(&self) -> anyhow::Result<()> {
        self.tree.flush()?;
        Ok(())
    }

    /// Up to `limit` stored records with `seq >= cursor`, in order, as their JSON bytes (an
    /// [`Event`] object). The cloud link sends them without parsing them.
    pub fn read_raw_from(
        &self,
        cursor: u64,
        limit: usize,
    ) -> anyhow::Result<Vec<(u64, sled::IVec)>> {
        let mut out = Vec::with_capacity(limit.min(1024));
        for kv in self.tree.range(cursor.to_be_bytes()..).take(limit) {
            let (k, v) = kv?;
            out.push((seq_of(&k)?, v));
        }
        Ok(out)
    }

    /// The next sequence number to be assigned.
    pub fn next_seq(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).next
    }

    /// Up to `limit` events with `seq >= cursor`, in order.
    pub fn read_from(&self, cursor: u64, limit: usize) -> anyhow::Result<Vec<Event>> {
        let mut out = Vec::new();
        for kv in self.tree.range(cursor.to_be_bytes()..).take(limit) {
            let (_, v) = kv?;
            out.push(serde_json::from_slice(&v).context("event record is corrupt")?);
        }
        Ok(out)
    }

    pub fn len(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).count
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (first, last) sequence numbers held.
    pub fn bounds(&self) -> (Option<u64>, Option<u64>) {
        let mut events = self.tree.range(0u64.to_be_bytes()..);
        let first = events
            .next()
            .and_then(|kv| kv.ok())
            .and_then(|(k, _)| seq_of(&k).ok());
        let last = events
            .next_back()
            .and_then(|kv| kv.ok())
            .and_then(|(k, _)| seq_of(&k).ok());
        (first, last.or(first))
    }
}
