//! The site database. This module is the only one that touches sled.
//!
//! # Layout (tree `site`)
//!
//! ```text
//! meta                      JSON Meta {format, gen, version, deltas, delta_bytes}
//! g <gen:u64be> b           JSON snapshot of the small tables (no credentials)
//! g <gen:u64be> c <n:u32be> postcard Vec<StoredGroup>: credentials grouped by user,
//!                           at most CHUNK credentials per chunk
//! g <gen:u64be> d <v:u64be> JSON delta (codes already hashed) applied on top, in version order
//! ```
//!
//! A *generation* is one full copy of the site. A snapshot is written as a new generation next
//! to the current one, flushed, and then made current by one atomic write of `meta`; the old
//! generation is deleted afterwards. A process killed at any point reopens on the old or the new
//! generation, never a mix; keys of a generation that `meta` does not name are garbage and are
//! removed at open. A delta is one atomic batch (its record plus `meta`). When the delta log of
//! a generation grows past [`COMPACT_DELTAS`] records, the site is rewritten as a new generation.
//!
//! Why chunks and not a key per record: sled at one key per credential took 40 s and 4.5 GB to
//! import a million credentials and 2.7 s to scan them back; chunks of postcard take well under
//! a second each way (see ARCHITECTURE.md).
//!
//! In memory the current [`Site`] sits behind a `RwLock`: a decision holds the read lock for its
//! few microseconds; a writer checks and persists without it, then takes the write lock only to
//! swap (snapshot) or commit (delta). Readers therefore see the old site or the new, never a mix.
//!
//! The event log (the cloud outbox) is in [`events`], the command log in [`commands`], the
//! storage health and the reopen after a storage failure (a full disk) in [`health`].

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::Instant;

use anyhow::{Context as _, bail};

use serde::{Deserialize, Serialize};

use crate::site::{
    CodeKey, Counts, CredTable, LoadedGroup, PreparedDelta, Site, SiteError, StoredGroup,
    stored_chunks,
};
use crate::sync::{self, SyncMessage};

mod alerts;
mod blekeys;
mod codekey;
mod commands;
pub mod commit;
mod devices;
mod events;
mod handles;
mod health;
mod lived;

pub use alerts::{AutomationSet, AutomationWrite};
pub use codekey::read as read_code_key;
pub use commands::{Claim, CommandLog, SeenCommand};
pub use events::{
    AGE_TREE, EVENTS_TREE, Event, EventLog, LogLimits, MAX_RECORD_BYTES, MAX_STRING_BYTES, NewEvent,
};
pub use health::Health;
pub use lived::LivedClock;

use handles::{Handles, HandlesGuard, open_db, read_meta};

/// Credentials per stored chunk.
const CHUNK: usize = 16_384;
/// Deltas kept on top of a generation before it is rewritten.
pub const COMPACT_DELTAS: u64 = 512;
/// Chunks the loader may decode ahead of indexing (bounds memory at open).
const LOAD_AHEAD: usize = 12;
/// Version of the on-disk layout above.
const FORMAT: u32 = 1;

/// Crash-test hook: when the environment variable `GATEHOUSE_CRASH_AT` names this point, the
/// process aborts here (no destructor, no flush — what a power cut leaves on disk). It lets
/// `tests/crash.rs` and `tests/faults_kill.rs` stop the daemon exactly inside the windows that
/// matter (a new generation fully on disk but not current; an event applied but not flushed)
/// rather than hoping a timed SIGKILL lands there. `name@N` aborts at the N-th time the point is
/// reached (1-based), so a test can pick a moment. The variable is read once per process; unset,
/// a point costs one atomic load.
///
/// Points: `generation_written`, `generation_switched` (snapshot import); `event_applied`,
/// `event_flushed` (event log append); `event_published`, `event_acked`, `event_deleted` (cloud
/// link drain).
pub(crate) fn crash_point(name: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static AT: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let at = AT.get_or_init(|| {
        let v = std::env::var("GATEHOUSE_CRASH_AT").ok()?;
        match v.split_once('@') {
            Some((point, n)) => Some((point.to_string(), n.parse().ok()?)),
            None => Some((v, 1)),
        }
    });
    if let Some((point, n)) = at
        && point == name
        && HITS.fetch_add(1, Ordering::Relaxed) + 1 >= *n
    {
        eprintln!("GATEHOUSE_CRASH_AT={name}@{n}: aborting");
        std::process::abort();
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Meta {
    format: u32,
    gen_: u64,
    version: u64,
    deltas: u64,
    /// Credentials in the generation's chunks (sizes the index at load).
    #[serde(default)]
    credentials: u64,
}

/// What an applied sync message did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub kind: &'static str,
    pub version: u64,
    pub previous_version: u64,
    pub compacted: bool,
}

/// Why a sync message was not applied. In every case the database is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Site(#[from] SiteError),
    /// The disk failed. The message was not applied; the daemon keeps the old data.
    #[error("storage: {0:#}")]
    Storage(anyhow::Error),
}

impl ApplyError {
    pub fn is_resync_needed(&self) -> bool {
        matches!(self, ApplyError::Site(SiteError::ResyncNeeded { .. }))
    }
}

/// The site database: the current site in memory, its copy in sled, and the event log.
///
/// The sled handles sit behind a swappable slot: sled keeps the first write error it meets
/// (a full disk) until the database is reopened, so a write error moves the store to
/// [`Health::Failed`] and a recovery thread (started here, stopped when the store is dropped)
/// reopens the database once the disk takes writes again (see [`health`]).
pub struct Store {
    core: Arc<Core>,
    recovery: Option<health::Recovery>,
    /// The group commit of recorded events (started at the first [`Store::record`]; `None` if
    /// its thread could not start): see [`commit`].
    recorder: std::sync::OnceLock<Option<commit::Committer>>,
}

impl Deref for Store {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // What was recorded is flushed first (the committer's thread drains its queue).
        drop(self.recorder.take());
        if let Some(r) = self.recovery.take() {
            r.stop();
        }
    }
}

/// Everything of a [`Store`] (reached through it by `Deref`).
pub struct Core {
    dir: PathBuf,
    key: CodeKey,
    site: RwLock<Site>,
    meta: Mutex<Option<Meta>>,
    /// Keys of unfinished generations removed by this open (a killed snapshot import).
    recovered_keys: usize,
    limits: LogLimits,
    /// The open sled database and its trees; `None` only inside a reopen (under the lock).
    handles: RwLock<Option<Handles>>,
    events: RwLock<Option<Arc<EventLog>>>,
    commands: CommandLog,
    lived: LivedClock,
    health: health::HealthCell,
}

fn gen_prefix(g: u64) -> Vec<u8> {
    let mut k = vec![b'g'];
    k.extend_from_slice(&g.to_be_bytes());
    k
}

fn gen_key(g: u64, tag: u8, n: &[u8]) -> Vec<u8> {
    let mut k = gen_prefix(g);
    k.push(tag);
    k.extend_from_slice(n);
    k
}

fn empty_site() -> Site {
    let s = sync::Snapshot {
        schema_version: sync::SCHEMA_VERSION,
        kind: sync::SnapshotKind::Snapshot,
        version: 0,
        code_key_id: None,
        facility: sync::Facility {
            name: None,
            time_zone: "UTC".into(),
            default_schedule: None,
            grace_period_minutes: 0,
            restrict_overlocked_entry: false,
            use_blacklist: false,
            fob_schedule_enabled: false,
            fob_schedule: None,
            offline_key_expiration_minutes: 0,
            keypad_lockout: Default::default(),
            temporary_code_enabled: false,
            temporary_code_secret: None,
            ..sync::Facility::new("UTC")
        },
        zones: vec![],
        schedules: vec![],
        entries: vec![],
        units: vec![],
        users: vec![],
        credentials: vec![],
        shares: vec![],
        transfers: vec![],
        blacklist: vec![],
        devices: vec![],
    };
    Site::from_snapshot(&s, &CodeKey::from_bytes([0; 32])).expect("the empty site is valid")
}

/// Figures from [`Store::stats`].
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub version: u64,
    pub has_snapshot: bool,
    pub generation: u64,
    pub deltas_since_snapshot: u64,
    pub counts: Counts,
    pub events: u64,
    pub first_event_seq: Option<u64>,
    pub last_event_seq: Option<u64>,
    pub size_on_disk_bytes: u64,
    pub code_key_id: String,
    /// Keys of an unfinished snapshot import removed when the database was opened.
    pub recovered_keys_at_open: usize,
}

impl Store {
    /// Opens (or creates) the database in `dir`: `dir/db` for sled, `dir/code.key` for the
    /// keypad-code hashing key (created 0600 on first use).
    pub fn open(dir: &Path, max_events: u64) -> anyhow::Result<Store> {
        Store::open_with(dir, LogLimits::with_max_events(max_events))
    }

    /// [`Store::open`] with all the event log's bounds.
    pub fn open_with(dir: &Path, limits: LogLimits) -> anyhow::Result<Store> {
        crate::fsperm::prepare_data_dir(dir)?;
        let db = open_db(dir)?;
        crate::fsperm::tighten(dir)?;
        let h = Handles::open(db)?;
        let events = EventLog::open(&h.db, limits)?;
        let commands = CommandLog::open(h.db.open_tree("commands")?);
        let meta = read_meta(&h.tree, dir)?;
        let key = codekey::open(dir, &h.state, meta.is_some())?;
        // Remove any generation that meta does not name: left by a snapshot import that was
        // killed, or by a clean-up that did not finish.
        let current = meta.as_ref().map(|m| m.gen_);
        let mut n_garbage = 0usize;
        let mut from = gen_prefix(0);
        let tree = &h.tree;
        // Visit one key per generation, skipping over the current one (reading its values
        // would cost as much as loading it); remove any other generation whole.
        while let Some((k, _)) = tree.range(from.clone()..).next().transpose()? {
            let Some(g) = k
                .get(1..9)
                .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
            else {
                break;
            };
            if k[0] != b'g' {
                break;
            }
            if Some(g) != current {
                let mut garbage = sled::Batch::default();
                for k in tree.scan_prefix(gen_prefix(g)).keys() {
                    garbage.remove(k?);
                    n_garbage += 1;
                }
                tree.apply_batch(garbage)?;
            }
            match g.checked_add(1) {
                Some(next) => from = gen_prefix(next),
                None => break,
            }
        }
        if n_garbage > 0 {
            h.db.flush()?;
            tracing::info!(keys = n_garbage, "removed an unfinished generation");
        }
        let core = Core {
            dir: dir.to_path_buf(),
            site: RwLock::new(empty_site()),
            meta: Mutex::new(meta.clone()),
            key,
            recovered_keys: n_garbage,
            limits,
            lived: LivedClock::open(h.state.clone())?,
            handles: RwLock::new(Some(h)),
            events: RwLock::new(Some(Arc::new(events))),
            commands,
            health: health::HealthCell::default(),
        };
        if let Some(m) = meta {
            let started = Instant::now();
            let site = core
                .load_generation(&m)
                .with_context(|| format!("loading the site from `{}`", dir.display()))?;
            tracing::debug!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "site loaded"
            );
            *core.site.write().unwrap_or_else(|e| e.into_inner()) = site;
        }
        let core = Arc::new(core);
        Ok(Store {
            recovery: Some(health::Recovery::start(core.clone())),
            core,
            recorder: std::sync::OnceLock::new(),
        })
    }
}

impl Core {
    /// The open handles, or an error inside a failed reopen.
    fn h(&self) -> anyhow::Result<HandlesGuard<'_>> {
        let g = self.handles.read().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            bail!("storage: the database is being reopened");
        }
        Ok(HandlesGuard(g))
    }

    fn load_generation(&self, m: &Meta) -> anyhow::Result<Site> {
        // A loader thread reads, decodes and hashes the credential chunks (which needs no
        // tables) while this thread parses the small tables; then this thread inserts.
        let mut creds = CredTable::with_capacity(m.credentials as usize);
        let h = self.h()?;
        let (tree, prefix, hasher) = (h.tree.clone(), gen_key(m.gen_, b'c', &[]), creds.hasher());
        let (tx, rx) =
            std::sync::mpsc::sync_channel::<Result<Vec<LoadedGroup>, String>>(LOAD_AHEAD);
        let loader = std::thread::spawn(move || {
            for kv in tree.scan_prefix(prefix) {
                let chunk = kv
                    .map_err(|e| format!("reading a credential chunk: {e}"))
                    .and_then(|(_, v)| {
                        postcard::from_bytes::<Vec<StoredGroup>>(&v)
                            .map_err(|e| format!("credential chunk is corrupt: {e}"))
                    })
                    .map(|groups| {
                        groups
                            .into_iter()
                            .map(|g| LoadedGroup::hash(g, &hasher))
                            .collect::<Vec<_>>()
                    });
                let stop = chunk.is_err();
                if tx.send(chunk).is_err() || stop {
                    break;
                }
            }
        });
        let tables = h
            .tree
            .get(gen_key(m.gen_, b'b', &[]))
            .map_err(anyhow::Error::from)
            .and_then(|base| {
                let base = base.context("the current generation has no base record")?;
                let small: sync::Snapshot =
                    serde_json::from_slice(&base).context("base record is corrupt")?;
                let version = small.version;
                let t = Site::stored_tables(small)
                    .map_err(|e| anyhow::anyhow!("stored site is inconsistent: {e}"))?;
                Ok((version, t))
            });
        let mut failed = None;
        for chunk in rx {
            match (chunk, &tables) {
                (Ok(groups), Ok((_, t))) => {
                    for g in groups {
                        if let Err(e) = g.insert_into(t, &mut creds) {
                            failed.get_or_insert(format!("stored site is inconsistent: {e}"));
                        }
                    }
                }
                (Err(e), _) => {
                    failed.get_or_insert(e);
                }
                (Ok(_), Err(_)) => {}
            }
        }
        loader.join().expect("credential loader thread");
        let (base_version, tables) = tables?;
        if let Some(e) = failed {
            bail!(e);
        }
        let mut site = Site::from_parts(base_version, Arc::new(tables), creds);
        for kv in h.tree.scan_prefix(gen_key(m.gen_, b'd', &[])) {
            let (_, v) = kv?;
            let d: sync::Delta = serde_json::from_slice(&v).context("stored delta is corrupt")?;
            let p = site
                .prepare_delta(&d, &self.key)
                .map_err(|e| anyhow::anyhow!("stored delta {} does not apply: {e}", d.version))?;
            site.commit(p);
        }
        if site.version != m.version {
            bail!(
                "stored site is at version {} but meta says {}",
                site.version,
                m.version
            );
        }
        Ok(site)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn code_key(&self) -> &CodeKey {
        &self.key
    }

    /// The current site, for decisions. Hold the guard only for the decision itself.
    pub fn site(&self) -> RwLockReadGuard<'_, Site> {
        self.site.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The event log. Take it for one operation at a time: a reopen waits until every handle
    /// taken before it is dropped.
    pub fn events(&self) -> Arc<EventLog> {
        self.events
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            // `None` only inside a reopen, which holds the write lock throughout.
            .expect("the event log is attached")
    }

    /// Whether the database takes writes (see [`Health`]).
    pub fn health(&self) -> Health {
        self.health.get()
    }

    /// Tells the store that one of its operations failed (`what`: which), so that it checks its
    /// database now rather than at its next round. A write error of sled makes the store
    /// [`Health::Failed`] until the database is reopened.
    pub fn report_error(&self, what: &str) {
        self.health.report(what);
    }

    fn storage_error(&self, what: &str, e: anyhow::Error) -> ApplyError {
        self.report_error(what);
        ApplyError::Storage(e)
    }

    fn w<T>(&self, what: &str, r: anyhow::Result<T>) -> anyhow::Result<T> {
        if r.is_err() {
            self.report_error(what);
        }
        r
    }

    /// Time this database has lived through (monotonic, across restarts): see [`LivedClock`].
    pub fn lived(&self) -> &LivedClock {
        &self.lived
    }

    pub fn commands(&self) -> &CommandLog {
        &self.commands
    }

    /// A random id made when the database was created: with an event's sequence number it makes
    /// an id that stays unique even if the database is recreated and numbering starts again.
    pub fn epoch(&self) -> String {
        self.h()
            .ok()
            .and_then(|h| h.state.get("epoch").ok())
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    }

    /// The secure-channel base key an OSDP reader was given at install (KEYSET), if any, and
    /// whether the reader was seen using it. Kept in the gateway's own state (tree `state`, key
    /// `osdp_scbk/<reader id>`), not in the site data the cloud replaces.
    /// A read error or a damaged record is an error, never "no key": a caller that took it for
    /// "none" would make a new key and lose the one the reader holds.
    pub fn reader_key(&self, reader: &str) -> anyhow::Result<Option<([u8; 16], bool)>> {
        let Some(v) = self.h()?.state.get(format!("osdp_scbk/{reader}"))? else {
            return Ok(None);
        };
        let key = v
            .get(..16)
            .and_then(|k| <[u8; 16]>::try_from(k).ok())
            .with_context(|| format!("the stored key of reader `{reader}` is damaged"))?;
        Ok(Some((key, v.get(16) == Some(&1))))
    }

    /// Stores a reader's key durably (flushed). A new key is stored before the reader can be
    /// given it, so a key a reader holds is never one the gateway could have lost.
    pub fn set_reader_key(
        &self,
        reader: &str,
        key: &[u8; 16],
        confirmed: bool,
    ) -> anyhow::Result<()> {
        let mut v = key.to_vec();
        v.push(confirmed as u8);
        let r = self.h().and_then(|h| {
            h.state.insert(format!("osdp_scbk/{reader}"), v)?;
            h.state.flush()?;
            Ok(())
        });
        self.w("storing a reader key", r)
    }

    /// Forgets a reader's key (the reader goes back to install mode).
    pub fn clear_reader_key(&self, reader: &str) -> anyhow::Result<()> {
        let r = self.h().and_then(|h| {
            h.state.remove(format!("osdp_scbk/{reader}"))?;
            h.state.flush()?;
            Ok(())
        });
        self.w("removing a reader key", r)
    }

    /// Increments and returns the session counter (one per daemon start), durably.
    pub fn next_session(&self) -> anyhow::Result<u64> {
        let h = self.h()?;
        let v = h.state.update_and_fetch("session", |old| {
            let n = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_be_bytes);
            Some((n + 1).to_be_bytes().to_vec())
        })?;
        h.state.flush()?;
        let b = v.context("session counter")?;
        Ok(u64::from_be_bytes(
            b.as_ref().try_into().context("session counter")?,
        ))
    }

    pub fn has_snapshot(&self) -> bool {
        self.meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Applies a snapshot or a delta: all of it, or (with an error) nothing. A snapshot is
    /// copied first: [`Core::apply_incoming`] applies a message read by
    /// [`sync::parse_for_apply`] without the copy (what the cloud link and the CLI do).
    pub fn apply(&self, msg: &SyncMessage) -> Result<Applied, ApplyError> {
        match msg {
            SyncMessage::Snapshot(s) => self.apply_incoming(sync::Incoming::Snapshot(Box::new(
                sync::IncomingSnapshot::from_wire(s),
            ))),
            SyncMessage::Delta(d) => {
                let mut meta = self.meta.lock().unwrap_or_else(|e| e.into_inner());
                self.apply_delta(&mut meta, d)
            }
        }
    }

    /// Applies a snapshot or a delta, consuming it: all of it, or (with an error) nothing.
    ///
    /// A snapshot is turned into the new site while the old one keeps answering decisions
    /// ([`Site::from_incoming`] frees the message as it goes), written as a new generation
    /// chunk by chunk, then swapped in; the old site is freed after the swap.
    pub fn apply_incoming(&self, msg: sync::Incoming) -> Result<Applied, ApplyError> {
        let mut meta = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        match msg {
            sync::Incoming::Snapshot(s) => {
                let previous_version = self.site().version;
                let version = s.small.version;
                let site = Site::from_incoming(*s, &self.key)?;
                let new_meta = self
                    .write_generation(&site, meta.as_ref())
                    .map_err(|e| self.storage_error("applying a sync message", e))?;
                let old_gen = meta.as_ref().map(|m| m.gen_);
                let old = std::mem::replace(
                    &mut *self.site.write().unwrap_or_else(|e| e.into_inner()),
                    site,
                );
                // Freed outside the lock: decisions go on with the new site meanwhile.
                drop(old);
                *meta = Some(new_meta);
                if let Some(g) = old_gen {
                    self.drop_generation(g);
                }
                Ok(Applied {
                    kind: "snapshot",
                    version,
                    previous_version,
                    compacted: false,
                })
            }
            sync::Incoming::Delta(d) => self.apply_delta(&mut meta, &d),
        }
    }

    fn apply_delta(&self, meta: &mut Option<Meta>, d: &sync::Delta) -> Result<Applied, ApplyError> {
        let previous_version = self.site().version;
        let Some(m) = meta.clone() else {
            return Err(SiteError::ResyncNeeded {
                base: d.base_version,
                version: d.version,
                current: 0,
            }
            .into());
        };
        let prepared: PreparedDelta = self.site().prepare_delta(d, &self.key)?;
        let mut new_meta = Meta {
            version: prepared.version,
            deltas: m.deltas + 1,
            ..m.clone()
        };
        self.persist_delta(&prepared.normalized, &new_meta)
            .map_err(|e| self.storage_error("applying a sync message", e))?;
        self.site
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .commit(prepared);
        let mut compacted = false;
        if new_meta.deltas >= COMPACT_DELTAS {
            // Rewrite as a fresh generation; on failure keep the delta log (still valid).
            let site = self.site();
            match self.write_generation(&site, Some(&new_meta)) {
                Ok(nm) => {
                    drop(site);
                    self.drop_generation(m.gen_);
                    new_meta = nm;
                    compacted = true;
                }
                Err(e) => tracing::warn!("compaction failed, keeping the delta log: {e:#}"),
            }
        }
        *meta = Some(new_meta);
        Ok(Applied {
            kind: "delta",
            version: d.version,
            previous_version,
            compacted,
        })
    }

    /// Writes a delta and its meta in one atomic batch. Once the batch is in, the delta is
    /// applied (sled serves it), even if the flush that follows fails: that is logged, and the
    /// background flush retries.
    fn persist_delta(&self, d: &sync::Delta, meta: &Meta) -> anyhow::Result<()> {
        let mut b = sled::Batch::default();
        b.insert(
            gen_key(meta.gen_, b'd', &d.version.to_be_bytes()),
            serde_json::to_vec(d)?,
        );
        b.insert("meta", serde_json::to_vec(meta)?);
        let h = self.h()?;
        h.tree.apply_batch(b)?;
        if let Err(e) = h.db.flush() {
            self.report_error("flushing a sync delta");
            tracing::error!(
                version = d.version,
                "delta applied but not yet on disk: {e}"
            );
        }
        Ok(())
    }

    /// Writes `site` as a new generation and makes it current. Returns the new meta.
    fn write_generation(&self, site: &Site, current: Option<&Meta>) -> anyhow::Result<Meta> {
        let g = current.map_or(1, |m| m.gen_ + 1);
        // The small tables' JSON, written from the tables (not a copy of them), then the chunks.
        let base = site.small_snapshot_json(&self.key)?;
        let h = self.h()?;
        h.tree.insert(gen_key(g, b'b', &[]), base)?;
        // Chunk by chunk: each is encoded, inserted and freed before the next is made.
        for (n, chunk) in stored_chunks(&site.creds, CHUNK).enumerate() {
            h.tree.insert(
                gen_key(g, b'c', &(n as u32).to_be_bytes()),
                postcard::to_stdvec(&chunk)?,
            )?;
        }
        h.db.flush()?;
        crash_point("generation_written");
        let meta = Meta {
            format: FORMAT,
            gen_: g,
            version: site.version,
            deltas: 0,
            credentials: site.creds.len() as u64,
        };
        // Once `meta` names the new generation, sled serves it: the switch has happened even if
        // the flush that follows fails (logged; the background flush retries).
        h.tree.insert("meta", serde_json::to_vec(&meta)?)?;
        if let Err(e) = h.db.flush() {
            self.report_error("flushing a site generation");
            tracing::error!(
                version = site.version,
                "site switched but not yet on disk: {e}"
            );
        }
        crash_point("generation_switched");
        Ok(meta)
    }

    fn drop_generation(&self, g: u64) {
        let Ok(h) = self.h() else { return };
        let mut b = sled::Batch::default();
        for k in h.tree.scan_prefix(gen_prefix(g)).keys().flatten() {
            b.remove(k);
        }
        if let Err(e) = h.tree.apply_batch(b) {
            self.report_error("removing an old generation");
            // Left behind keys are removed at the next open.
            tracing::warn!("could not remove generation {g}: {e}");
        }
    }

    /// The whole site as a snapshot.
    pub fn export(&self) -> sync::Snapshot {
        self.site().export(&self.key)
    }

    pub fn stats(&self) -> Stats {
        let site = self.site();
        let meta = self.meta.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let events = self.events();
        let (first, last) = events.bounds();
        Stats {
            version: site.version,
            has_snapshot: meta.is_some(),
            generation: meta.as_ref().map_or(0, |m| m.gen_),
            deltas_since_snapshot: meta.as_ref().map_or(0, |m| m.deltas),
            counts: site.counts(),
            events: events.len(),
            first_event_seq: first,
            last_event_seq: last,
            size_on_disk_bytes: self
                .h()
                .ok()
                .and_then(|h| h.db.size_on_disk().ok())
                .unwrap_or(0),
            code_key_id: self.key.id(),
            recovered_keys_at_open: self.recovered_keys,
        }
    }

    /// Bytes the database takes on disk (0 while it is being reopened).
    pub fn size_on_disk(&self) -> u64 {
        self.h()
            .ok()
            .and_then(|h| h.db.size_on_disk().ok())
            .unwrap_or(0)
    }

    /// Flushes everything to disk. Called at shutdown.
    pub fn flush(&self) -> anyhow::Result<()> {
        self.lived.persist()?;
        self.h()?.db.flush()?;
        Ok(())
    }
}
