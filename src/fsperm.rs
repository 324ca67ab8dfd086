//! File permissions of the data directory. The database holds secrets in clear (the facility's
//! `temporary_code_secret`, padlocks' offline keys, OSDP reader keys) and `code.key` is the
//! keypad-code key: only the daemon's user may read any of it.
//!
//! - The process umask is `0o077` from the first line of `main` ([`private_umask`]), so every
//!   file and directory gatehouse or sled creates is 0600 / 0700 whatever the umask it was
//!   started with.
//! - The data directory is created 0700 ([`prepare_data_dir`]).
//! - At open, an existing data directory, its `db/` (all of it) and `code.key` are inspected
//!   ([`inspect`]), symlinks not followed (other files there are the operator's):
//!   - anything in it (or itself) **writable** by group or others is refused: someone else may
//!     have changed the database or the key, and the gateway cannot tell;
//!   - anything only **readable** (or searchable) by group or others is fixed (chmod go-rwx) with
//!     a warning naming it: nothing was changed, but its secrets may have been read. A database
//!     written under umask 022 by an older gatehouse is in this case.
//!   - `code.key` itself readable by others is refused (see `store::codekey`): gatehouse always
//!     made it 0600, so a looser mode was set by hand.
//! - After sled has opened the database, whatever it created is tightened silently
//!   ([`tighten`]): that covers a caller (a test, a tool using the library) that did not set the
//!   umask.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// Sets the process umask to 0o077 (files 0600, directories 0700). Call first thing in `main`.
pub fn private_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// A path whose mode lets group or others in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loose {
    pub path: PathBuf,
    pub mode: u32,
    pub is_dir: bool,
    /// `code.key`: refused even when only readable by others.
    pub key_file: bool,
}

impl Loose {
    /// Group or others may write: refused.
    pub fn writable(&self) -> bool {
        self.mode & 0o022 != 0
    }

    fn wanted(&self) -> u32 {
        self.mode & 0o700
    }

    fn describe(&self) -> String {
        format!(
            "{} `{}` has mode {:04o}",
            if self.is_dir { "directory" } else { "file" },
            self.path.display(),
            self.mode
        )
    }
}

/// What [`inspect`] found in a data directory.
#[derive(Debug, Default)]
pub struct Inspection {
    /// Writable by group or others: refused.
    pub refused: Vec<Loose>,
    /// Only readable/searchable by group or others: fixed at open, with a warning.
    pub to_fix: Vec<Loose>,
}

impl Inspection {
    /// The refusal, if anything is writable by others (or `code.key` readable by them): one
    /// line, with what to do.
    pub fn refusal(&self) -> Option<String> {
        let first = self.refused.first()?;
        let more = match self.refused.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        Some(if first.key_file && !first.writable() {
            format!(
                "secret file `{}` has mode {:04o}; it must be readable by its owner only \
                 (chmod 600 `{}`){more}",
                first.path.display(),
                first.mode,
                first.path.display()
            )
        } else {
            format!(
                "{} (writable by group or others){more}: someone other than gatehouse's user may \
                 have changed the site database or its keys; check them, then `chmod -R go-rwx` \
                 the data directory (or delete it and let the cloud resync the site)",
                first.describe()
            )
        })
    }

    /// One line per path that `gatehouse` fixes at open.
    pub fn fix_notes(&self) -> Vec<String> {
        self.to_fix
            .iter()
            .map(|l| {
                format!(
                    "{} (readable by group or others): set to {:04o} at open",
                    l.describe(),
                    l.wanted()
                )
            })
            .collect()
    }
}

/// What gatehouse keeps in the data directory: sled's directory and the code key.
const OURS: [&str; 2] = ["db", "code.key"];

/// Walks `dir` (which must exist), its `db/` and `code.key`, without following symlinks, and
/// sorts what lets group or others in.
pub fn inspect(dir: &Path) -> anyhow::Result<Inspection> {
    let mut out = Inspection::default();
    let key_file = dir.join("code.key");
    let mut stack = vec![dir.to_path_buf()];
    let mut first = true;
    while let Some(p) = stack.pop() {
        // The data directory itself may be a symlink; nothing under it is followed.
        let m = match if first {
            std::fs::metadata(&p)
        } else {
            std::fs::symlink_metadata(&p)
        } {
            Ok(m) => m,
            // Gone since its directory was listed (sled renames and removes its own files).
            Err(e) if !first && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading `{}`", p.display())),
        };
        first = false;
        if m.file_type().is_symlink() {
            continue;
        }
        let mode = m.permissions().mode() & 0o7777;
        if m.is_dir() {
            let entries = match std::fs::read_dir(&p) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("reading `{}`", p.display())),
            };
            for e in entries {
                let e = e
                    .with_context(|| format!("reading `{}`", p.display()))?
                    .path();
                // In the data directory itself, only what gatehouse keeps there: other files
                // (an export, a snapshot to import) are the operator's.
                if p != dir || OURS.iter().any(|o| e.file_name() == Some(o.as_ref())) {
                    stack.push(e);
                }
            }
        }
        if mode & 0o077 != 0 {
            let l = Loose {
                key_file: p == key_file,
                path: p,
                mode: mode & 0o777,
                is_dir: m.is_dir(),
            };
            if l.writable() || l.key_file {
                out.refused.push(l);
            } else {
                out.to_fix.push(l);
            }
        }
    }
    out.refused.sort_by(|a, b| a.path.cmp(&b.path));
    out.to_fix.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Whether `dir` is a directory or could be made one: nothing on its path is a file. (Whether
/// this user may write there is [`writable`]'s question: it depends on who runs the check.)
pub fn creatable(dir: &Path) -> anyhow::Result<()> {
    let mut p = dir;
    loop {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) if p == dir => bail!(
                "data directory `{}` is not a directory (it is a file)",
                dir.display()
            ),
            Ok(_) => bail!(
                "data directory `{}` cannot be created: `{}` is a file, not a directory",
                dir.display(),
                p.display()
            ),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                match p.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => p = parent,
                    _ => return Ok(()),
                }
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "data directory `{}`: reading `{}`",
                        dir.display(),
                        p.display()
                    )
                });
            }
        }
    }
}

/// Whether this user may create or write `dir` (its nearest existing ancestor when missing).
pub fn writable(dir: &Path) -> bool {
    use rustix::fs::Access;
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    rustix::fs::access(existing, Access::WRITE_OK | Access::EXEC_OK).is_ok()
}

/// Creates the data directory 0700 when missing; when present, refuses it if anything in it is
/// writable by group or others and fixes (with a warning) what is only readable by them.
pub fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    creatable(dir)?;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating data directory `{}`", dir.display()))?;
        // The mode given is filtered by the umask; make sure of 0700.
        return set_mode(dir, 0o700);
    }
    let found = inspect(dir)?;
    if let Some(r) = found.refusal() {
        bail!(r);
    }
    for l in &found.to_fix {
        tracing::warn!(
            "{} (readable by group or others): set to {:04o}; the site's secrets in it may have \
             been read",
            l.describe(),
            l.wanted()
        );
        set_mode(&l.path, l.wanted())?;
    }
    Ok(())
}

/// Removes group and other bits from everything under `dir`, silently: for what was just
/// created (by sled) under a umask that let them in.
pub fn tighten(dir: &Path) -> anyhow::Result<()> {
    let found = inspect(dir)?;
    for l in found.refused.iter().chain(&found.to_fix) {
        set_mode(&l.path, l.wanted())?;
    }
    Ok(())
}

fn set_mode(p: &Path, mode: u32) -> anyhow::Result<()> {
    match std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r.with_context(|| format!("setting the mode of `{}` to {mode:04o}", p.display())),
    }
}
