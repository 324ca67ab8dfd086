//! The keypad-code key file (`code.key`) and the database's record of which key it was built
//! with.
//!
//! Keypad codes are stored as HMACs under a per-gateway key kept in `code.key`, outside the
//! database. A database whose codes were hashed under one key is useless with another: every
//! keypad code would be denied, silently. So the database records the key's fingerprint
//! ([`CodeKey::id`], tree `state`, key `code_key_id`), and the store refuses to open when the
//! database holds a site (a snapshot has been imported) and `code.key` is missing or is not the
//! key recorded. A database without a site takes whatever key there is (making one when the file
//! is missing) and records it: it holds no hashes yet.
//!
//! A database written before the fingerprint was recorded has a site but no record: the key
//! found is recorded (trust on first use), or the store refuses if the file is missing.

use std::path::Path;

use anyhow::{Context as _, bail};

use crate::site::CodeKey;

/// Key of the recorded fingerprint in the `state` tree.
const RECORD: &str = "code_key_id";

/// What to do about a lost or replaced key, said in every refusal.
fn remedy(dir: &Path) -> String {
    format!(
        "restore `code.key` from a backup of this gateway, or delete the data directory `{}` \
         and let the cloud resync the site",
        dir.display()
    )
}

/// Loads (or, for a database without a site, creates) `dir/code.key` and checks it against the
/// fingerprint recorded in `state`; records the fingerprint when there is none or the database
/// has no site yet. `has_site`: the database holds a site (its codes are hashed with some key).
pub(crate) fn open(dir: &Path, state: &sled::Tree, has_site: bool) -> anyhow::Result<CodeKey> {
    let path = dir.join("code.key");
    let recorded = recorded(state)?;
    let key = match read(&path)? {
        Some(key) => key,
        None if has_site => bail!(
            "`{}` is missing, but the database holds a site whose keypad codes were hashed with \
             code key `{}`: without it every keypad code would be denied; {}",
            path.display(),
            recorded.as_deref().unwrap_or("(not recorded)"),
            remedy(dir)
        ),
        None => create(&path)?,
    };
    let id = key.id();
    match recorded {
        Some(r) if r == id => {}
        Some(r) if has_site => bail!(
            "`{}` is code key `{id}`, but the database was built with code key `{r}`: with this \
             key every keypad code would be denied; {}",
            path.display(),
            remedy(dir)
        ),
        _ => {
            state.insert(RECORD, id.as_bytes())?;
            state.flush()?;
        }
    }
    Ok(key)
}

/// The fingerprint the database records, if any.
fn recorded(state: &sled::Tree) -> anyhow::Result<Option<String>> {
    Ok(state
        .get(RECORD)?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// Reads the key file: `None` when it does not exist. Refuses one that others can read or
/// that does not hold 64 hex digits (never echoing what it holds).
pub fn read(path: &Path) -> anyhow::Result<Option<CodeKey>> {
    use std::os::unix::fs::PermissionsExt;
    let m = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading `{}`", path.display())),
    };
    if !m.is_file() {
        bail!("`{}` is not a regular file", path.display());
    }
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "secret file `{}` has mode {mode:04o}; it must be readable by its owner only \
             (chmod 600 `{}`)",
            path.display(),
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading `{}`", path.display()))?;
    let bytes = hex::decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .with_context(|| format!("`{}` does not hold 64 hex digits", path.display()))?;
    Ok(Some(CodeKey::from_bytes(bytes)))
}

/// Makes a new random key file, mode 0600.
fn create(path: &Path) -> anyhow::Result<CodeKey> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; 32];
    getrandom::getrandom(&mut key)
        .map_err(|e| anyhow::anyhow!("no randomness for the code key: {e}"))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating `{}`", path.display()))?;
    writeln!(f, "{}", hex::encode(key))?;
    f.sync_all()?;
    tracing::info!(path = %path.display(), id = %CodeKey::from_bytes(key).id(), "made a new code key");
    Ok(CodeKey::from_bytes(key))
}
