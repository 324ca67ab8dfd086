//! The command log (tree `commands`): command ids claimed durably, and their results.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Commands seen, by id, kept until they expire: a replayed or twice-delivered command is
/// recognised and not executed again. Tree `commands`: id -> JSON [`SeenCommand`].
pub struct CommandLog {
    tree: sled::Tree,
}

/// What is remembered of a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeenCommand {
    pub expires_at: DateTime<Utc>,
    /// The result last reported for it (JSON), if any.
    pub result: Option<serde_json::Value>,
}

impl CommandLog {
    pub(super) fn open(tree: sled::Tree) -> CommandLog {
        CommandLog { tree }
    }

    /// Records a command id durably. Returns the earlier record if the id was already known
    /// (nothing is changed then): the caller must not execute it again.
    pub fn claim(
        &self,
        id: &str,
        expires_at: DateTime<Utc>,
    ) -> anyhow::Result<Option<SeenCommand>> {
        let new = serde_json::to_vec(&SeenCommand {
            expires_at,
            result: None,
        })?;
        match self
            .tree
            .compare_and_swap(id, None as Option<&[u8]>, Some(new))?
        {
            Ok(()) => {
                self.tree.flush()?;
                Ok(None)
            }
            Err(e) => {
                let cur = e
                    .current
                    .context("compare_and_swap reported a missing value")?;
                Ok(Some(
                    serde_json::from_slice(&cur).context("command record is corrupt")?,
                ))
            }
        }
    }

    /// Stores the result reported for a command (so that a duplicate can be answered with it).
    pub fn set_result(&self, id: &str, result: serde_json::Value) -> anyhow::Result<()> {
        if let Some(cur) = self.tree.get(id)? {
            let mut seen: SeenCommand = serde_json::from_slice(&cur)?;
            seen.result = Some(result);
            self.tree.insert(id, serde_json::to_vec(&seen)?)?;
            self.tree.flush()?;
        }
        Ok(())
    }

    pub fn get(&self, id: &str) -> anyhow::Result<Option<SeenCommand>> {
        Ok(match self.tree.get(id)? {
            Some(v) => Some(serde_json::from_slice(&v)?),
            None => None,
        })
    }

    /// Forgets commands that expired before `now` (they are refused as expired anyway).
    pub fn prune(&self, now: DateTime<Utc>) -> anyhow::Result<usize> {
        let mut b = sled::Batch::default();
        let mut n = 0;
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            let expired =
                serde_json::from_slice::<SeenCommand>(&v).map_or(true, |s| s.expires_at < now);
            if expired {
                b.remove(k);
                n += 1;
            }
        }
        self.tree.apply_batch(b)?;
        Ok(n)
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}
