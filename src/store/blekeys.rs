//! The bind keys of BTHome sensors adopted in install mode (docs/ble.md, *Pairing*): kept in
//! the gateway's own state beside the OSDP readers' keys (tree `state`, key
//! `ble_key/<device id>`, the 16 bytes), not in the site data the cloud replaces, and never in
//! the registry's settings. In clear, like every secret of the database (ARCHITECTURE.md,
//! *Secrets at rest*): the data directory is the daemon user's only.

use anyhow::Context as _;

use super::Store;

fn key_of(device: &str) -> String {
    format!("ble_key/{device}")
}

impl Store {
    /// A sensor's bind key, if one is stored. A damaged record is an error, never "no key".
    pub fn ble_key(&self, device: &str) -> anyhow::Result<Option<[u8; 16]>> {
        let Some(v) = self.h()?.state.get(key_of(device))? else {
            return Ok(None);
        };
        let key = <[u8; 16]>::try_from(v.as_ref())
            .ok()
            .with_context(|| format!("the stored bind key of `{device}` is damaged"))?;
        Ok(Some(key))
    }

    /// Stores a sensor's bind key durably (flushed) before the adoption that needs it is said
    /// done.
    pub fn set_ble_key(&self, device: &str, key: &[u8; 16]) -> anyhow::Result<()> {
        let r = self.h().and_then(|h| {
            h.state.insert(key_of(device), key.to_vec())?;
            h.state.flush()?;
            Ok(())
        });
        self.w("storing a bind key", r)
    }

    /// Forgets a sensor's bind key (the sensor was removed).
    pub fn clear_ble_key(&self, device: &str) -> anyhow::Result<()> {
        let r = self.h().and_then(|h| {
            h.state.remove(key_of(device))?;
            h.state.flush()?;
            Ok(())
        });
        self.w("removing a bind key", r)
    }
}
