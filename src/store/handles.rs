//! The sled handles of one open of the database, and opening it.

use std::ops::Deref;
use std::path::Path;
use std::sync::RwLockReadGuard;

use anyhow::{Context as _, bail};

use super::{FORMAT, Meta};

/// The sled handles of one open of the database. Every clone of them must be gone before the
/// database can be opened again (sled holds a file lock).
pub(super) struct Handles {
    pub(super) db: sled::Db,
    /// Tree `site`.
    pub(super) tree: sled::Tree,
    /// Gateway state: database epoch, session counter (tree `state`).
    pub(super) state: sled::Tree,
}

/// A read guard on the open handles.
pub(super) struct HandlesGuard<'a>(pub(super) RwLockReadGuard<'a, Option<Handles>>);

impl Deref for HandlesGuard<'_> {
    type Target = Handles;
    fn deref(&self) -> &Handles {
        // Constructed only when `Some` (see `Core::h`), and the read guard keeps it so.
        self.0.as_ref().expect("handles checked at construction")
    }
}

/// How long an open waits for sled's file lock. sled releases it from a background thread a
/// moment after the last handle of the previous open is dropped (a reopen in this process: the
/// disk-full recovery, tests), so an open right after a close may find it still held.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens sled in `dir/db`.
pub(super) fn open_db(dir: &Path) -> anyhow::Result<sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        let r = sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(8 << 20)
            .flush_every_ms(Some(500))
            .open();
        match r {
            Ok(db) => return Ok(db),
            // sled reports a held lock as an I/O error whose text says so.
            Err(e) if e.to_string().contains("could not acquire lock") => {
                if std::time::Instant::now() >= deadline {
                    bail!(
                        "database `{}` is in use by another process (is the daemon running?)",
                        dir.display()
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("opening database `{}`", dir.join("db").display())));
            }
        }
    }
}

pub(super) fn read_meta(tree: &sled::Tree, dir: &Path) -> anyhow::Result<Option<Meta>> {
    let meta: Option<Meta> = match tree.get("meta")? {
        Some(b) => Some(serde_json::from_slice(&b).context("database meta record is corrupt")?),
        None => None,
    };
    if let Some(m) = &meta
        && m.format != FORMAT
    {
        bail!(
            "database `{}` has layout {} (this gatehouse reads {FORMAT}); export it with the \
             version that wrote it, or delete it and resync",
            dir.display(),
            m.format
        );
    }
    Ok(meta)
}

impl Handles {
    pub(super) fn open(db: sled::Db) -> anyhow::Result<Handles> {
        let tree = db.open_tree("site")?;
        let state = db.open_tree("state")?;
        if state.get("epoch")?.is_none() {
            let mut e = [0u8; 8];
            getrandom::getrandom(&mut e).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            state.insert("epoch", hex::encode(e).as_bytes())?;
            state.flush()?;
        }
        Ok(Handles { db, tree, state })
    }
}
