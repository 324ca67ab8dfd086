//! Durable automation state: the active alerts and the pending relay offs (docs/automation.md,
//! *Lifecycle*). Kept in tree `state` beside the gateway's other own state, under two key
//! prefixes, as JSON the automation module defines (the store does not read it):
//!
//! ```text
//! alert/<key>   JSON of one active alert (key: kind and subject, chosen by the caller)
//! timer/<key>   JSON of one pending timer (a zone relay to switch off)
//! ```
//!
//! Every write is flushed before it returns: an alert is on disk before its `alert_raised`
//! event is recorded, and a relay's off time before the relay is switched on, so a restart
//! neither forgets an alert nor leaves a relay on. Restoring is one prefix scan of each.

use anyhow::Context as _;

use super::Store;

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

impl Store {
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

    /// Every record of `set`, in key order. A damaged record is an error naming its key (never
    /// skipped: a forgotten timer could leave a relay on).
    pub fn automation_load(
        &self,
        set: AutomationSet,
    ) -> anyhow::Result<Vec<(String, serde_json::Value)>> {
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
