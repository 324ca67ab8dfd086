//! The checks `gatehouse run` makes before it starts anything that are not about the config
//! file's own text (those are [`Config::load`]'s): one function, called by `run` and by
//! `check-config`, so a config that `check-config` passes does not fail at start for a reason it
//! could have seen.
//!
//! It reads and never changes anything, and it does not open the database (which the running
//! daemon holds): the checks that need the database itself (its layout, the code key's
//! fingerprint) are made when it is opened, by `run` and by `gatehouse db stats`.

use anyhow::{Context as _, bail};

use crate::config::{Config, Transport};
use crate::fsperm;

/// Refuses what would stop `run` at start; returns notes on what `run` would fix or what may
/// depend on the user it runs as.
pub fn check(cfg: &Config) -> anyhow::Result<Vec<String>> {
    let mut notes = Vec::new();
    let dir = &cfg.data_dir;
    fsperm::creatable(dir)?;
    if !fsperm::writable(dir) {
        notes.push(format!(
            "data directory `{}` is not writable by this user: `run` must run as one who can \
             write it",
            dir.display()
        ));
    }
    if dir.is_dir() {
        let found = fsperm::inspect(dir)?;
        if let Some(r) = found.refusal() {
            bail!(r);
        }
        notes.extend(found.fix_notes());
        crate::store::read_code_key(&dir.join("code.key"))?;
    }
    if let Some(path) = &cfg.initial_snapshot {
        let bytes = std::fs::read(path)
            .with_context(|| format!("access.initial_snapshot: reading `{}`", path.display()))?;
        let msg = crate::sync::parse(&bytes).with_context(|| {
            format!(
                "access.initial_snapshot: `{}` is not a valid snapshot",
                path.display()
            )
        })?;
        if !matches!(msg, crate::sync::SyncMessage::Snapshot(_)) {
            bail!(
                "access.initial_snapshot: `{}` is a delta, not a snapshot",
                path.display()
            );
        }
    }
    if let Some(c) = &cfg.cloud
        && let Transport::Tls {
            ca_file,
            use_system_roots,
            cert_file,
            key_file,
        } = &c.transport
    {
        crate::cloud::tls::client_config(
            ca_file.as_deref(),
            *use_system_roots,
            cert_file,
            key_file,
        )
        .context("cloud TLS")?;
    }
    for b in cfg.buses.iter().filter(|b| b.is_empty()) {
        notes.push(format!(
            "bus `{}` has no devices: it only listens for install mode until a device is \
             adopted onto it",
            b.id
        ));
    }
    Ok(notes)
}
