//! The command log (tree `commands`): command ids claimed durably, and their results.
//!
//! # At most once, whatever the wall clock does
//!
//! An id is remembered until its command has expired, then pruned. Expiry is judged by the wall
//! clock, which can be stepped; two rules keep a pruned id from being admitted again:
//!
//! - a record is pruned only when it has expired by the wall clock **and** by lived time
//!   ([`super::LivedClock`], monotonic across restarts): the lived time since the claim must be
//!   at least the command's remaining lifetime at the claim (`expires_at − claimed_at`) plus the
//!   allowed clock skew. A wall clock stepped forward does not prune anything early.
//! - pruning records durably `pruned_through`, the latest `expires_at` it ever removed (key
//!   `""`, which no command id can be: ids are 1 to 128 bytes). A command whose `expires_at` is
//!   at or before it is refused `expired` ([`Claim::Pruned`]): its id might have been forgotten,
//!   so a replay could no longer be recognised. A wall clock stepped back therefore cannot
//!   re-admit a pruned id. `pruned_through` is a time taken from signed commands, never from
//!   this gateway's clock.
//!
//! Claims and pruning are serialised (a replay arriving while its id is pruned is still seen).

use std::sync::{Mutex, RwLock};

use anyhow::Context as _;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

/// Key of `pruned_through` (JSON timestamp). No command id is empty.
const PRUNED_THROUGH: &[u8] = b"";

/// Commands seen, by id, kept until they expire: a replayed or twice-delivered command is
/// recognised and not executed again. Tree `commands`: id -> JSON [`SeenCommand`].
pub struct CommandLog {
    tree: RwLock<Option<sled::Tree>>,
    /// Held by claims and pruning.
    serial: Mutex<()>,
}

/// What is remembered of a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeenCommand {
    pub expires_at: DateTime<Utc>,
    /// The result last reported for it (JSON), if any.
    pub result: Option<serde_json::Value>,
    /// The wall clock when it was claimed (absent in records of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_at: Option<DateTime<Utc>>,
    /// Lived time ([`super::LivedClock`]) when it was claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_lived_ms: Option<u64>,
}

/// The answer of [`CommandLog::claim`].
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// Recorded now: execute it.
    New,
    /// Already known (nothing changed): do not execute it again.
    Seen(SeenCommand),
    /// It expires no later than ids already pruned: refuse it as expired.
    Pruned { through: DateTime<Utc> },
}

impl CommandLog {
    pub(super) fn open(tree: sled::Tree) -> CommandLog {
        CommandLog {
            tree: RwLock::new(Some(tree)),
            serial: Mutex::new(()),
        }
    }

    fn tree(&self) -> anyhow::Result<sled::Tree> {
        self.tree
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .context("storage: the database is being reopened")
    }

    /// Drops the tree handle (before a reopen).
    pub(super) fn detach(&self) {
        *self.tree.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub(super) fn attach(&self, tree: sled::Tree) {
        *self.tree.write().unwrap_or_else(|e| e.into_inner()) = Some(tree);
    }

    /// The latest `expires_at` ever pruned.
    pub fn pruned_through(&self) -> anyhow::Result<Option<DateTime<Utc>>> {
        read_pruned_through(&self.tree()?)
    }

    /// Records a command id durably, with the wall clock `now` and the lived time `lived_ms` of
    /// the claim. Returns the earlier record if the id was already known (nothing is changed
    /// then): the caller must not execute it again.
    pub fn claim(
        &self,
        id: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
        lived_ms: u64,
    ) -> anyhow::Result<Claim> {
        let _serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let tree = self.tree()?;
        if let Some(through) = read_pruned_through(&tree)?
            && expires_at <= through
        {
            return Ok(Claim::Pruned { through });
        }
        let new = serde_json::to_vec(&SeenCommand {
            expires_at,
            result: None,
            claimed_at: Some(now),
            claimed_lived_ms: Some(lived_ms),
        })?;
        match tree.compare_and_swap(id, None as Option<&[u8]>, Some(new))? {
            Ok(()) => {
                tree.flush()?;
                Ok(Claim::New)
            }
            Err(e) => {
                let cur = e
                    .current
                    .context("compare_and_swap reported a missing value")?;
                Ok(Claim::Seen(
                    serde_json::from_slice(&cur).context("command record is corrupt")?,
                ))
            }
        }
    }

    /// Stores the result reported for a command (so that a duplicate can be answered with it).
    pub fn set_result(&self, id: &str, result: serde_json::Value) -> anyhow::Result<()> {
        let tree = self.tree()?;
        if let Some(cur) = tree.get(id)? {
            let mut seen: SeenCommand = serde_json::from_slice(&cur)?;
            seen.result = Some(result);
            tree.insert(id, serde_json::to_vec(&seen)?)?;
            tree.flush()?;
        }
        Ok(())
    }

    pub fn get(&self, id: &str) -> anyhow::Result<Option<SeenCommand>> {
        if id.is_empty() {
            return Ok(None);
        }
        Ok(match self.tree()?.get(id)? {
            Some(v) => Some(serde_json::from_slice(&v)?),
            None => None,
        })
    }

    /// Forgets commands that have expired both by the wall clock `now` and by lived time
    /// `lived_ms` (see the module docs; `max_skew` is the clock skew allowed to commands), and
    /// raises `pruned_through` accordingly, in one atomic batch. Returns how many were pruned.
    pub fn prune(
        &self,
        now: DateTime<Utc>,
        lived_ms: u64,
        max_skew: Duration,
    ) -> anyhow::Result<usize> {
        let _serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let tree = self.tree()?;
        let skew_ms = u64::try_from(max_skew.num_milliseconds()).unwrap_or(0);
        let old_through = read_pruned_through(&tree)?;
        let mut through = old_through;
        let mut b = sled::Batch::default();
        let mut n = 0;
        for kv in tree.iter() {
            let (k, v) = kv?;
            if k.as_ref() == PRUNED_THROUGH {
                continue;
            }
            let seen = serde_json::from_slice::<SeenCommand>(&v).ok();
            let expired = match &seen {
                // A corrupt record cannot be judged; it is dropped (and cannot be matched).
                None => true,
                Some(s) => s.expires_at < now && lived_enough(s, lived_ms, skew_ms),
            };
            if expired {
                if let Some(s) = &seen {
                    through = Some(through.map_or(s.expires_at, |t| t.max(s.expires_at)));
                }
                b.remove(k);
                n += 1;
            }
        }
        if through != old_through
            && let Some(t) = through
        {
            b.insert(PRUNED_THROUGH, serde_json::to_vec(&t)?);
        }
        tree.apply_batch(b)?;
        Ok(n)
    }

    /// Command ids held.
    pub fn len(&self) -> usize {
        self.tree().map_or(0, |t| {
            t.len() - usize::from(t.contains_key(PRUNED_THROUGH).unwrap_or(false))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn read_pruned_through(tree: &sled::Tree) -> anyhow::Result<Option<DateTime<Utc>>> {
    tree.get(PRUNED_THROUGH)?
        .map(|v| serde_json::from_slice(&v).context("command log `pruned_through` is corrupt"))
        .transpose()
}

/// Whether the lived time since the claim covers the command's lifetime at the claim plus the
/// skew. Records without lived time (older versions) are judged by the wall clock alone.
fn lived_enough(s: &SeenCommand, lived_ms: u64, skew_ms: u64) -> bool {
    let (Some(at), Some(l)) = (s.claimed_at, s.claimed_lived_ms) else {
        return true;
    };
    let life_ms = u64::try_from((s.expires_at - at).num_milliseconds()).unwrap_or(0);
    lived_ms.saturating_sub(l) >= life_ms.saturating_add(skew_ms)
}
