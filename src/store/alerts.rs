//! Durable automation state: the active alerts and the pending relay offs (docs/automation.md,
//! *Lifecycle*). Kept in tree `state` beside the gateway's other own state, under two key
//! prefixes, as JSON the automation module defines (the store does not read it):
//!
//! ```text
//! alert/<key>   JSON of one active alert (key: kind and subject, chosen by the caller)
//! timer/<key>   JSON of one pending timer (a zone relay to switch off)
//! ```
//!
//! [`Store::automation_write`] applies a batch of records, then records the events that go
//! with them through the group commit, with at most one flush of its own: the events become
//! visible to the cloud only after a flush that follows the records (sled's flush covers every
//! tree, and its log is recovered in write order). So an alert is on disk no later than its
//! `alert_raised` event, and (with `flush`) a relay's off time before the relay is switched on
//! (the caller switches it after the call returns). Restoring is one prefix scan of each set.

use anyhow::Context as _;

use super::Store;
use crate::events::EventKind;

/// Which of the two sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutomationSet {
    Alerts,
    Timers,
}

impl AutomationSet {
    fn prefix(self) -> &'static str {
        match self {
            AutomationSet::Alerts => "alert/",
            AutomationSet::Timers => "timer/",
        }
    }
}

/// One change of a set: `Some(value)` stores (or replaces) the record, `None` removes it.
#[derive(Debug, Clone)]
pub struct AutomationWrite {
    pub set: AutomationSet,
    pub key: String,
    pub value: Option<serde_json::Value>,
}

impl Store {
    /// Applies `writes` (key by key, in order), then records `events` through the group commit
    /// ([`Store::record`]: durable, then visible, with the committer's next flush, which also
    /// carries the writes). With `flush`, the writes are on disk when this returns (one flush;
    /// a relay's first off time before the relay is switched on); without, a crash may lose
    /// them with the events, never an event without its writes.
    pub fn automation_write(
        &self,
        writes: &[AutomationWrite],
        events: Vec<(EventKind, serde_json::Value)>,
        flush: bool,
    ) -> anyhow::Result<()> {
        if writes.is_empty() && events.is_empty() {
            return Ok(());
        }
        // Key by key, not a `sled::Batch`: the records are independent, and `apply_batch` holds
        // sled's global write lock while it may wait for a new log segment, which deadlocked
        // against the group commit's flush (sled 0.34, seen in `gatehouse-bench automation`).
        let r = self.h().and_then(|h| {
            for w in writes {
                let key = format!("{}{}", w.set.prefix(), w.key);
                match &w.value {
                    Some(v) => {
                        h.state.insert(key, serde_json::to_vec(v)?)?;
                    }
                    None => {
                        h.state.remove(key)?;
                    }
                }
            }
            Ok(())
        });
        self.w("storing automation state", r)?;
        // Through the group commit: each event becomes visible after a flush that follows the
        // writes above (sled's flush covers every tree).
        for (kind, payload) in events {
            self.record(kind, payload);
        }
        if flush {
            let r = self.h().and_then(|h| {
                h.state.flush()?;
                Ok(())
            });
            self.w("flushing automation state", r)?;
        }
        Ok(())
    }

    /// Increments and returns the automation run counter (one per runner start), durably: the
    /// alert ids of a run are `<epoch>-<run>-<n>`, never reused after a crash.
    pub fn automation_run(&self) -> anyhow::Result<u64> {
        let h = self.h()?;
        let v = h.state.update_and_fetch("automation_run", |old| {
            let n = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_be_bytes);
            Some((n + 1).to_be_bytes().to_vec())
        })?;
        h.state.flush()?;
        let b = v.context("automation run counter")?;
        Ok(u64::from_be_bytes(
            b.as_ref().try_into().context("automation run counter")?,
        ))
    }

    /// Stores (or replaces) one record of `set` under `key`, flushed.
    pub fn automation_put(
        &self,
        set: AutomationSet,
        key: &str,
        value: &serde_json::Value,
    ) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(value)?;
        let r = self.h().and_then(|h| {
            h.state.insert(format!("{}{key}", set.prefix()), bytes)?;
            h.state.flush()?;
            Ok(())
        });
        self.w("storing automation state", r)
    }

    /// Removes one record of `set` (absent: nothing to do), flushed.
    pub fn automation_remove(&self, set: AutomationSet, key: &str) -> anyhow::Result<()> {
        let r = self.h().and_then(|h| {
            if h.state.remove(format!("{}{key}", set.prefix()))?.is_some() {
                h.state.flush()?;
            }
            Ok(())
        });
        self.w("removing automation state", r)
    }

    /// Every record of `set`, in key order, decoded straight into `T` (one prefix scan, no
    /// write). A damaged record is an error naming its key (never
    /// skipped: a forgotten timer could leave a relay on).
    pub fn automation_load<T: serde::de::DeserializeOwned>(
        &self,
        set: AutomationSet,
    ) -> anyhow::Result<Vec<(String, T)>> {
        let h = self.h()?;
        let mut out = Vec::new();
        for kv in h.state.scan_prefix(set.prefix()) {
            let (k, v) = kv?;
            let key = String::from_utf8_lossy(&k[set.prefix().len()..]).into_owned();
            let value = serde_json::from_slice(&v)
                .with_context(|| format!("automation record `{key}` is damaged"))?;
            out.push((key, value));
        }
        Ok(out)
    }
}
