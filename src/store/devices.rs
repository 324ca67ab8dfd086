//! The registry of adopted devices (installer pairing, docs/pairing.md): one record per device
//! adopted through install mode, kept in tree `state` beside the gateway's other own state:
//!
//! ```text
//! device/<id>   JSON of one `pairing::Registered` (never a secret in clear)
//! ```
//!
//! Every write is flushed before it returns: an adoption is answered `done` only once its
//! record is on disk, and a removal is durable before the device stops being run. At start the
//! daemon reads the whole set (one prefix scan) and merges it with the TOML config
//! (`pairing::registry::merge`).

use anyhow::Context as _;

use super::Store;
use crate::pairing::Registered;

const PREFIX: &str = "device/";

impl Store {
    /// Stores (or replaces) an adopted device's record, flushed.
    pub fn registry_put(&self, device: &Registered) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(device)?;
        let r = self.h().and_then(|h| {
            h.state.insert(format!("{PREFIX}{}", device.id), bytes)?;
            h.state.flush()?;
            Ok(())
        });
        self.w("storing an adopted device", r)
    }

    /// Removes an adopted device's record, flushed. Returns whether there was one.
    pub fn registry_remove(&self, id: &str) -> anyhow::Result<bool> {
        let r = self.h().and_then(|h| {
            let had = h.state.remove(format!("{PREFIX}{id}"))?.is_some();
            if had {
                h.state.flush()?;
            }
            Ok(had)
        });
        self.w("removing an adopted device", r)
    }

    /// Every adopted device, in id order. A damaged record is an error naming its key (never
    /// skipped: a device silently forgotten would stop being run).
    pub fn registry_list(&self) -> anyhow::Result<Vec<Registered>> {
        let h = self.h()?;
        let mut out = Vec::new();
        for kv in h.state.scan_prefix(PREFIX) {
            let (k, v) = kv?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let device: Registered = serde_json::from_slice(&v)
                .with_context(|| format!("the registry record `{key}` is damaged"))?;
            out.push(device);
        }
        Ok(out)
    }
}
