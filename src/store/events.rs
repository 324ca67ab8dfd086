//! The event log, which is also the cloud outbox.
//!
//! # Layout
//!
//! ```text
//! tree `events`      ""              u64be  high-water: the next sequence number to assign
//!                    "\0"            u64be  events dropped by trims since the database epoch
//!                    "\0\0"          u64be  seq of the latest `outbox_overflow` record
//!                    <seq:u64be>     JSON [`Event`] (at most [`MAX_RECORD_BYTES`]): a loose
//!                                    record, in the open block (or written by an older version)
//!                    "B" <block:u64be> the sealed records of seq block×128 .. block×128+127
//!                    "S" <block:u64be> its summary: which are held, which are security events,
//!                                    their sizes (see `events/blocks.rs`)
//! tree `events_age`  <lived_ms:u64be> u64be  age mark: every event numbered below the value
//!                                           was appended at or before this lived time
//! ```
//!
//! Sequence numbers increase by one per event (and stay below 2^56); the high-water key is
//! written in the same batch as the records, so a number once flushed is never assigned again.
//!
//! # Blocks, and memory
//!
//! sled keeps per-key structures in memory, so a million keys cost some 90 MiB whatever its
//! cache. Records are therefore appended as loose keys and, once all 128 numbers of a block are
//! assigned, *sealed* into one block key and one summary key, in one batch (a crash leaves the
//! loose or the sealed form, both complete). A PUBACK rewrites only the summaries of the blocks
//! it touches (a block goes with its last record); a trim drops records by summary and compacts
//! the blocks it touched. The log keeps only counters in memory (`LogState`, O(1)); an open
//! rebuilds them from the summaries and the open block's loose records, without reading the
//! sealed records. A log written by an older version (one key per event) is sealed block by
//! block at its first open (each block one batch, so an interrupted migration finishes at the
//! next open).
//!
//! # Visible only when durable
//!
//! An appended record is applied to sled at once but is *visible* (to [`EventLog::read_raw_from`],
//! [`EventLog::read_from`], [`EventLog::bounds`] — what the cloud link publishes) only once a
//! flush has put it on disk: a watermark (`durable`, the first sequence number not known to be
//! on disk) advances after each flush, and the `appended` notification fires only then. So a
//! record the cloud has seen is never lost in a crash, and a sequence number that a crash does
//! reuse (the record and its high-water key were not flushed) was never published.
//! [`EventLog::append`] flushes before it returns; [`EventLog::append_unflushed`] leaves it to
//! [`EventLog::flush_pending`], which the daemon calls every second off the async workers. Flushes
//! are serialised; one that starts after a record was applied covers it, so appenders that
//! arrive while another flushes find their records already durable (a later group-commit thread
//! can batch appends on top of `append_unflushed` + `flush_pending`).
//!
//! # Bounds
//!
//! The log is bounded by count and bytes: over either, the oldest non-security events go first
//! (down to 95 % of the bound), and by age in *lived* time ([`crate::store::LivedClock`]): the
//! daemon's housekeeping calls [`EventLog::trim`] every minute with the lived time, which writes
//! one age mark and drops the non-security events appended more than `max_age` of lived time
//! ago. A wall-clock step never drops anything. Security events
//! ([`crate::events::is_security_kind`]) are kept beyond every bound. Each trim that drops events
//! writes one `outbox_overflow` record and folds the previous one, if not yet delivered, into it
//! (removing it): the log holds at most one undelivered overflow record from this version. A
//! trim reads only what it drops plus the security events it passes, once (a cursor skips the
//! security events at the front of the log; sealed records are read from their block's summary,
//! and each block it dropped from is rewritten once), and when only security events are over a bound no
//! trim runs until the droppable events reach 5 % of the bound. An append reads at most
//! [`INLINE_TRIM_READS`] + 2 per event for a trim, so a decision never pays for a backlog; later
//! appends, or [`EventLog::trim_pending`] (the daemon, every second, in chunks), go on from the
//! cursor.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::crash_point;
use crate::events::{EventKind, is_security_kind};

mod blocks;
mod size;

use blocks::{BLOCK, SEQ_LIMIT, seq_key};

pub use size::{MAX_RECORD_BYTES, MAX_STRING_BYTES};

/// One entry of the durable event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    /// When it happened, UTC (wall clock: what the cloud sees).
    pub at: DateTime<Utc>,
    /// The same instant in the facility's local time, with its offset (RFC 3339).
    pub local: String,
    pub kind: String,
    pub payload: serde_json::Value,
}

/// An event to append; the log assigns the sequence number.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub at: DateTime<Utc>,
    pub local: String,
    pub kind: EventKind,
    pub payload: serde_json::Value,
}

/// Bounds of the event log (which is also the cloud outbox).
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    pub max_events: u64,
    pub max_bytes: u64,
    /// In lived time (see [`crate::store::LivedClock`]), not wall-clock time.
    pub max_age: chrono::Duration,
}

impl LogLimits {
    pub fn with_max_events(max_events: u64) -> Self {
        LogLimits {
            max_events,
            ..LogLimits::default()
        }
    }
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            max_events: 1_000_000,
            max_bytes: 256 << 20,
            max_age: chrono::Duration::days(30),
        }
    }
}

/// Names of the sled trees the event log uses.
pub const EVENTS_TREE: &str = "events";
pub const AGE_TREE: &str = "events_age";

/// Key of the next sequence number to assign: the empty key sorts before every 8-byte event key,
/// so reads from a cursor never see it.
const HIGH_WATER: &[u8] = b"";
/// Key of the count of events dropped by trims (sorts before every event key too).
const DROPPED_TOTAL: &[u8] = b"\0";
/// Key of the sequence number of the latest `outbox_overflow` record (which may be gone since).
const OVERFLOW: &[u8] = b"\0\0";

/// Records a trim inside an append may read, plus two per event appended: a decision never pays
/// for a backlog; what is left is trimmed by later appends or by [`EventLog::trim_pending`].
const INLINE_TRIM_READS: u64 = 64;
/// Records a background trim reads while holding the log's lock (appends wait that long).
const CHUNK_TRIM_READS: u64 = 4_096;

/// Test hook: `GATEHOUSE_FLUSH_DELAY_MS` (read once) sleeps that long before each flush of the
/// event log, a slow disk for the fault tests. Not for production.
fn flush_delay() -> Option<std::time::Duration> {
    static DELAY: OnceLock<Option<std::time::Duration>> = OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("GATEHOUSE_FLUSH_DELAY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&ms| ms > 0)
            .map(std::time::Duration::from_millis)
    })
}

#[derive(Clone)]
struct Trees {
    events: sled::Tree,
    age: sled::Tree,
}

impl Trees {
    fn open(db: &sled::Db) -> anyhow::Result<Trees> {
        Ok(Trees {
            events: db.open_tree(EVENTS_TREE)?,
            age: db.open_tree(AGE_TREE)?,
        })
    }
}

#[derive(Debug, Clone, Default)]
struct LogState {
    /// The next sequence number to assign.
    next: u64,
    count: u64,
    bytes: u64,
    /// Non-security events held (those a trim may drop), and their bytes.
    droppable: u64,
    droppable_bytes: u64,
    /// Every record numbered below this is a security event (or gone): trims start here.
    scan_from: u64,
    /// The latest `outbox_overflow` record held, folded into the next one.
    overflow: Option<u64>,
    /// A trim for space stopped at its read limit before reaching 95 % of the bounds.
    trimming: bool,
    dropped_total: u64,
    /// Every block numbered below this is sealed (has no loose record).
    seal_from: u64,
}

/// The durable, bounded event log. It is also the cloud outbox: an event leaves it only when the
/// broker has acknowledged it ([`EventLog::remove_delivered`]) or when a trim drops it (see the
/// module documentation).
pub struct EventLog {
    trees: RwLock<Trees>,
    state: Mutex<LogState>,
    /// The first sequence number not known to be on disk: records at or above it are invisible.
    durable: AtomicU64,
    /// Held by a flush: flushes are serialised.
    flushing: Mutex<()>,
    /// Read-held by readers ([`EventLog::read_raw_from`], [`EventLog::bounds`]), write-held
    /// (under `state`) by every write to the events tree: appends, seals, trims,
    /// acknowledgements. sled reads are not snapshots: without it a reader could check a
    /// block's summary before a seal and its loose keys after and see none of its records, and
    /// a sled range iterator was seen to stop early (17 of 125 keys) while keys were inserted
    /// after it (`a_reader_never_misses_the_records_a_seal_moves`).
    layout: RwLock<()>,
    limits: LogLimits,
    appended: Arc<tokio::sync::Notify>,
    /// Records read by trims since open (the cost of trimming, for tests).
    trim_reads: AtomicU64,
}

fn seq_of(k: &[u8]) -> anyhow::Result<u64> {
    Ok(u64::from_be_bytes(
        k.try_into().context("event log key is not 8 bytes")?,
    ))
}

fn u64_of(v: &[u8]) -> Option<u64> {
    v.try_into().ok().map(u64::from_be_bytes)
}

/// The kind of a stored record (`None` if it is corrupt).
fn record_kind(v: &[u8]) -> Option<Cow<'_, str>> {
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        kind: Cow<'a, str>,
    }
    serde_json::from_slice::<Head>(v).ok().map(|h| h.kind)
}

/// Whether a stored record is a security event (a corrupt record is not: a trim may drop it).
fn is_security_record(v: &[u8]) -> bool {
    record_kind(v).is_some_and(|k| is_security_kind(&k))
}

/// Reads the log's state from disk (at open, also after a disk-full recovery reopened sled),
/// first sealing every complete block that still has loose records (a log written by an older
/// version, one key per event, is migrated here once; each block is one atomic batch, so a crash
/// half way leaves a log that opens and finishes the migration). Reads the block summaries and
/// the loose records of the open block, not the sealed records.
fn scan(trees: &Trees) -> anyhow::Result<LogState> {
    let t = &trees.events;
    // Sequence numbers are never reused, even when the log was emptied by deliveries.
    let floor = t
        .get(HIGH_WATER)?
        .map(|v| seq_of(&v))
        .transpose()?
        .unwrap_or(1);
    let last = match blocks::prev_block(t, u64::MAX)? {
        Some(b) => blocks::records(t, b, 0, u64::MAX)?.last().map(|(s, _)| *s),
        None => None,
    };
    let next = last.map_or(floor, |l| floor.max(l + 1));
    let mut overflow = None;
    let (mut sealed, mut seal_from, started) = (0u64, next / BLOCK, std::time::Instant::now());
    // Best effort: loose records are read as well as sealed ones, so a log whose sealing fails
    // (a full disk, at a reopen after a storage failure) still opens; a later append seals.
    let mut sealing = || -> anyhow::Result<()> {
        while let Some(seq) = blocks::first_loose(t, 0, next / BLOCK * BLOCK)? {
            seal_from = seal_from.min(seq / BLOCK);
            overflow = overflow.max(blocks::seal(t, seq / BLOCK)?);
            sealed += 1;
        }
        seal_from = next / BLOCK;
        if sealed > 0 {
            t.flush()?;
        }
        Ok(())
    };
    if let Err(e) = sealing() {
        tracing::warn!("event log: sealing loose records into blocks: {e:#}");
    }
    if sealed > 0 {
        tracing::info!(
            blocks = sealed,
            seconds = started.elapsed().as_secs_f64(),
            "event log: sealed loose records into blocks"
        );
    }
    let mut st = LogState {
        next,
        dropped_total: t.get(DROPPED_TOTAL)?.and_then(|v| u64_of(&v)).unwrap_or(0),
        seal_from,
        scan_from: next,
        ..LogState::default()
    };
    for s in blocks::summaries(t) {
        let (b, s) = s?;
        let droppable = s.present & !s.security;
        st.count += u64::from(s.present.count_ones());
        st.bytes += s.bytes(u128::MAX);
        st.droppable += u64::from(droppable.count_ones());
        st.droppable_bytes += s.bytes(droppable);
        if droppable != 0 {
            st.scan_from = st
                .scan_from
                .min(b * BLOCK + u64::from(droppable.trailing_zeros()));
        }
    }
    for kv in blocks::loose(t) {
        let (seq, v) = kv?;
        st.count += 1;
        st.bytes += v.len() as u64;
        let kind = record_kind(&v);
        if kind.as_deref().is_some_and(is_security_kind) {
            if kind.as_deref() == Some(EventKind::OutboxOverflow.as_str()) {
                overflow = overflow.max(Some(seq));
            }
        } else {
            st.droppable += 1;
            st.droppable_bytes += v.len() as u64;
            st.scan_from = st.scan_from.min(seq);
        }
    }
    let known = t.get(OVERFLOW)?.and_then(|v| u64_of(&v));
    st.overflow = match overflow.max(known) {
        Some(o) if blocks::holds(t, o)? => Some(o),
        _ => None,
    };
    Ok(st)
}

impl EventLog {
    /// Opens the log in trees [`EVENTS_TREE`] and [`AGE_TREE`] of `db`. Everything found on disk
    /// is durable, hence visible.
    pub(super) fn open(db: &sled::Db, limits: LogLimits) -> anyhow::Result<EventLog> {
        let trees = Trees::open(db)?;
        let st = scan(&trees)?;
        Ok(EventLog {
            trees: RwLock::new(trees),
            durable: AtomicU64::new(st.next),
            state: Mutex::new(st),
            flushing: Mutex::new(()),
            layout: RwLock::new(()),
            limits: LogLimits {
                max_events: limits.max_events.max(1),
                max_bytes: limits.max_bytes.max(1),
                ..limits
            },
            appended: Arc::new(tokio::sync::Notify::new()),
            trim_reads: AtomicU64::new(0),
        })
    }

    fn trees(&self) -> Trees {
        self.trees.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends events and flushes them to disk before returning their sequence numbers; they
    /// are visible (to the cloud link) from then on. A failed flush leaves them applied but
    /// invisible until a later flush succeeds.
    pub fn append(&self, events: &[NewEvent]) -> anyhow::Result<Vec<u64>> {
        let seqs = self.append_unflushed(events)?;
        crash_point("event_applied");
        self.flush_pending()?;
        Ok(seqs)
    }

    /// Appends without waiting for the disk. The records become visible at the next
    /// [`EventLog::flush_pending`] (the daemon calls it every second) or flushed append. For events
    /// whose loss in a power cut is acceptable. If sled refuses the batch, nothing changes.
    pub fn append_unflushed(&self, events: &[NewEvent]) -> anyhow::Result<Vec<u64>> {
        let trees = self.trees();
        let mut st = self.lock();
        let mut batch = sled::Batch::default();
        let mut seqs = Vec::with_capacity(events.len());
        let mut new = st.clone();
        if new.next + events.len() as u64 + 1 >= SEQ_LIMIT {
            anyhow::bail!("the event log has used up its sequence numbers");
        }
        for e in events {
            let ev = Event {
                seq: new.next,
                at: e.at,
                local: e.local.clone(),
                kind: e.kind.as_str().to_string(),
                payload: e.payload.clone(),
            };
            let v = size::encode(&ev)?;
            new.count += 1;
            new.bytes += v.len() as u64;
            if !e.kind.is_security() {
                new.droppable += 1;
                new.droppable_bytes += v.len() as u64;
            } else if new.scan_from == new.next {
                // Everything before it is a security event or gone: keep the cursor past it.
                new.scan_from = new.next + 1;
            }
            batch.insert(&seq_key(new.next), v);
            seqs.push(new.next);
            new.next += 1;
        }
        // The high-water mark of sequence numbers, in the same batch.
        batch.insert(HIGH_WATER, &new.next.to_be_bytes());
        self.write_batch(&trees.events, batch)?;
        *st = new;
        if self.trim_due(&st) {
            let at = events.last().map_or_else(Utc::now, |e| e.at);
            let local = events.last().map(|e| e.local.clone()).unwrap_or_default();
            // The events are in; a failed trim is retried at the next append or tick.
            let reads = INLINE_TRIM_READS + 2 * events.len() as u64;
            if let Err(e) = self.trim_locked(&trees, &mut st, 0, at, &local, reads) {
                tracing::warn!("trimming the event log: {e:#}");
            }
        }
        self.seal_done(&trees, &mut st);
        Ok(seqs)
    }

    /// Seals the blocks whose every number has been assigned (see [`blocks`]). Their records
    /// are in sled already, loose; a failure leaves them so, and a later call seals them.
    /// Applies `batch` to the events tree with no reader in it (see `layout`).
    fn write_batch(&self, t: &sled::Tree, batch: sled::Batch) -> sled::Result<()> {
        let _layout = self.layout.write().unwrap_or_else(|e| e.into_inner());
        t.apply_batch(batch)
    }

    fn seal_done(&self, trees: &Trees, st: &mut LogState) {
        let open = st.next / BLOCK;
        if st.seal_from >= open {
            return;
        }
        let _layout = self.layout.write().unwrap_or_else(|e| e.into_inner());
        while st.seal_from < open {
            let lo = st.seal_from * BLOCK;
            let sealed =
                blocks::first_loose(&trees.events, lo, open * BLOCK).and_then(
                    |first| match first {
                        Some(seq) => {
                            blocks::seal(&trees.events, seq / BLOCK).map(|_| seq / BLOCK + 1)
                        }
                        None => Ok(open),
                    },
                );
            match sealed {
                Ok(b) => st.seal_from = b,
                Err(e) => {
                    tracing::warn!("sealing a block of the event log: {e:#}");
                    return;
                }
            }
        }
    }

    /// Flushes what was applied and makes it visible. Returns the watermark: every record
    /// numbered below it is on disk. Blocks on the disk: call it off the async workers.
    pub fn flush_pending(&self) -> anyhow::Result<u64> {
        let _flushing = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        let target = self.lock().next;
        let durable = self.durable.load(Ordering::Acquire);
        if target <= durable {
            return Ok(durable);
        }
        if let Some(d) = flush_delay() {
            std::thread::sleep(d);
        }
        self.trees().events.flush()?;
        crash_point("event_flushed");
        self.durable.store(target, Ordering::Release);
        self.appended.notify_one();
        Ok(target)
    }

    /// Whether records were applied that are not yet visible (a flush is due).
    pub fn has_pending(&self) -> bool {
        self.lock().next > self.durable.load(Ordering::Acquire)
    }

    /// Whether the count or byte bound calls for a trim: over a bound, with enough droppable
    /// events to bring it back to 95 % — or, when security events alone are over it, once the
    /// droppable ones reach 5 % of it (not at every append).
    fn trim_due(&self, st: &LogState) -> bool {
        if st.trimming {
            return true;
        }
        let l = &self.limits;
        let over_count = st.count > l.max_events && {
            let excess = st.count - (l.max_events - l.max_events / 20);
            st.droppable >= excess.min(l.max_events / 20).max(1)
        };
        let over_bytes = st.bytes > l.max_bytes && {
            let excess = st.bytes - (l.max_bytes - l.max_bytes / 20);
            st.droppable_bytes >= excess.min(l.max_bytes / 20).max(1)
        };
        over_count || over_bytes
    }

    /// Enforces the bounds now, including the maximum age counted in lived time (`lived_ms`,
    /// from [`crate::store::LivedClock::now_ms`]); `now`/`local` stamp the overflow record.
    /// Writes one age mark. The daemon calls it every minute. Returns how many events went.
    pub fn trim(&self, lived_ms: u64, now: DateTime<Utc>, local: &str) -> anyhow::Result<u64> {
        let trees = self.trees();
        let age_cut = {
            let st = self.lock();
            // The age mark: events numbered below `st.next` were appended by now. Marks stay in
            // lived-time order even if lived time went back after a crash (it under-counts).
            let last = trees
                .age
                .last()?
                .map(|(k, v)| (u64_of(&k).unwrap_or(0), u64_of(&v).unwrap_or(0)));
            if last.is_none_or(|(_, n)| n < st.next) {
                let key = last.map_or(lived_ms, |(l, _)| l.max(lived_ms));
                trees
                    .age
                    .insert(key.to_be_bytes(), &st.next.to_be_bytes())?;
            }
            let max_age_ms = u64::try_from(self.limits.max_age.num_milliseconds()).unwrap_or(0);
            let mut age_cut = 0;
            if let Some(cutoff) = lived_ms.checked_sub(max_age_ms)
                && let Some((k, v)) = trees
                    .age
                    .range(..=cutoff.to_be_bytes())
                    .next_back()
                    .transpose()?
            {
                age_cut = u64_of(&v).unwrap_or(0);
                // Marks at or below it are used up.
                let mut used = sled::Batch::default();
                for k in trees.age.range(..=k).keys() {
                    used.remove(k?);
                }
                trees.age.apply_batch(used)?;
            }
            age_cut
        };
        self.trim_chunks(&trees, age_cut, now, local)
    }

    /// Finishes a trim that appends left unfinished (they read only a few records each), in
    /// chunks, releasing the lock between them. The daemon calls it every second, off the async
    /// workers. Returns how many events went.
    pub fn trim_pending(&self, now: DateTime<Utc>, local: &str) -> anyhow::Result<u64> {
        if !self.over_bounds() {
            return Ok(0);
        }
        self.trim_chunks(&self.trees(), 0, now, local)
    }

    /// Whether the count or byte bound calls for a trim now.
    pub fn over_bounds(&self) -> bool {
        self.trim_due(&self.lock())
    }

    fn trim_chunks(
        &self,
        trees: &Trees,
        age_cut: u64,
        now: DateTime<Utc>,
        local: &str,
    ) -> anyhow::Result<u64> {
        let mut dropped = 0;
        loop {
            let mut st = self.lock();
            let (d, reads) =
                self.trim_locked(trees, &mut st, age_cut, now, local, CHUNK_TRIM_READS)?;
            dropped += d;
            self.seal_done(trees, &mut st);
            if reads < CHUNK_TRIM_READS {
                break;
            }
        }
        if dropped > 0 {
            self.flush_pending()?;
        }
        Ok(dropped)
    }

    /// Drops non-security events numbered below `age_cut`, and, if the bounds call for it, the
    /// oldest non-security events until the log is within 95 % of its bounds. Reads from the
    /// cursor past the leading security events. Records one `outbox_overflow` event, folding
    /// the previous one if it is still held. Reads at most `max_reads` records (the cursor keeps
    /// its place for the next call). On error nothing changes. Returns (dropped, records read).
    fn trim_locked(
        &self,
        trees: &Trees,
        st: &mut LogState,
        age_cut: u64,
        now: DateTime<Utc>,
        local: &str,
        max_reads: u64,
    ) -> anyhow::Result<(u64, u64)> {
        let l = &self.limits;
        let (target_events, target_bytes) = (
            l.max_events - l.max_events / 20,
            l.max_bytes - l.max_bytes / 20,
        );
        let for_space = self.trim_due(st);
        if !for_space && age_cut <= st.scan_from {
            return Ok((0, 0));
        }
        let mut new = st.clone();
        let mut batch = sled::Batch::default();
        // The previous overflow record, if still held, is folded into this trim's (and so does
        // not count towards the bounds).
        let t = &trees.events;
        // Records to remove from sealed blocks: (summary, bits), written once per block.
        let mut sealed: std::collections::BTreeMap<u64, (blocks::Summary, u128)> =
            Default::default();
        let folded = match st.overflow {
            Some(old) => {
                let b = old / BLOCK;
                let rec = blocks::records(t, b, old, old + 1)?.pop();
                if let Some((_, v)) = &rec {
                    match blocks::summary(t, b)? {
                        Some(s) if s.holds(old) => {
                            sealed.entry(b).or_insert((s, 0)).1 |= 1 << (old % BLOCK);
                        }
                        _ => batch.remove(&seq_key(old)),
                    }
                    new.count = new.count.saturating_sub(1);
                    new.bytes = new.bytes.saturating_sub(v.len() as u64);
                }
                rec
            }
            None => None,
        };
        let (mut dropped, mut first, mut last, mut reads) = (0u64, None, 0u64, 0u64);
        let mut block = st.scan_from / BLOCK;
        'blocks: while let Some(b) = blocks::next_block(t, block)? {
            block = b + 1;
            let (summary, metas) = blocks::metas(t, b, st.scan_from)?;
            for m in metas {
                if reads >= max_reads {
                    break 'blocks;
                }
                reads += 1;
                self.trim_reads.fetch_add(1, Ordering::Relaxed);
                let seq = m.seq;
                let shrinking = for_space
                    && new.droppable > 0
                    && (new.count > target_events || new.bytes > target_bytes);
                if seq >= age_cut && !shrinking {
                    break 'blocks;
                }
                // Everything before the cursor is now a security event or dropped.
                new.scan_from = seq + 1;
                if m.security {
                    continue;
                }
                match (&summary, m.sealed) {
                    (Some(s), true) => {
                        sealed.entry(b).or_insert((s.clone(), 0)).1 |= 1 << (seq % BLOCK);
                    }
                    _ => batch.remove(&seq_key(seq)),
                }
                new.count = new.count.saturating_sub(1);
                new.bytes = new.bytes.saturating_sub(m.len);
                new.droppable = new.droppable.saturating_sub(1);
                new.droppable_bytes = new.droppable_bytes.saturating_sub(m.len);
                dropped += 1;
                first.get_or_insert(seq);
                last = seq;
            }
        }
        // Stopped by the read limit with more to drop: the next append or tick goes on.
        new.trimming = for_space
            && reads >= max_reads
            && new.droppable > 0
            && (new.count > target_events || new.bytes > target_bytes);
        if dropped == 0 {
            st.scan_from = new.scan_from;
            st.trimming = new.trimming;
            return Ok((0, reads));
        }
        let (mut covered, mut first_seq) = (dropped, first.unwrap_or(last));
        if let Some((_, v)) = folded
            && let Ok(e) = serde_json::from_slice::<Event>(&v)
        {
            covered += e.payload["dropped"].as_u64().unwrap_or(0);
            first_seq = first_seq.min(e.payload["first_seq"].as_u64().unwrap_or(first_seq));
        }
        // Compacted: a trim reclaims the space of what it drops.
        for (b, (s, gone)) in &sealed {
            blocks::remove_sealed(t, &mut batch, *b, s, *gone, true)?;
        }
        new.dropped_total += dropped;
        let overflow = Event {
            seq: new.next,
            at: now,
            local: local.to_string(),
            kind: EventKind::OutboxOverflow.as_str().to_string(),
            payload: serde_json::json!({
                "dropped": covered,
                "dropped_total": new.dropped_total,
                "first_seq": first_seq,
                "last_seq": last,
                "max_events": l.max_events,
                "max_bytes": l.max_bytes,
                "max_age_seconds": l.max_age.num_seconds(),
            }),
        };
        let v = size::encode(&overflow)?;
        new.count += 1;
        new.bytes += v.len() as u64;
        new.overflow = Some(new.next);
        if new.scan_from == new.next {
            new.scan_from += 1;
        }
        batch.insert(OVERFLOW, &new.next.to_be_bytes());
        batch.insert(&seq_key(new.next), v);
        new.next += 1;
        batch.insert(HIGH_WATER, &new.next.to_be_bytes());
        batch.insert(DROPPED_TOTAL, &new.dropped_total.to_be_bytes());
        self.write_batch(&trees.events, batch)?;
        *st = new;
        tracing::warn!(
            dropped,
            first_seq = ?first,
            last_seq = last,
            "event log over its bounds: dropped the oldest non-security events"
        );
        Ok((dropped, reads))
    }

    /// Removes events the broker has acknowledged. Not flushed: an acknowledgement lost in a
    /// crash only means the event is sent again (the cloud drops duplicates by id).
    pub fn remove_delivered(&self, seqs: &[u64]) -> anyhow::Result<()> {
        let trees = self.trees();
        let t = &trees.events;
        let mut st = self.lock();
        let _layout = self.layout.write().unwrap_or_else(|e| e.into_inner());
        // Sealed records: only their block's summary is rewritten, once per block.
        let mut sealed: std::collections::BTreeMap<u64, (Option<blocks::Summary>, u128)> =
            Default::default();
        for &s in seqs {
            let b = s / BLOCK;
            let entry = match sealed.entry(b) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert((blocks::summary(t, b)?, 0))
                }
            };
            if let (Some(sum), gone) = entry {
                if sum.holds(s) {
                    *gone |= 1 << (s % BLOCK);
                    continue;
                }
            }
            if let Some(v) = t.remove(seq_key(s))? {
                st.count = st.count.saturating_sub(1);
                st.bytes = st.bytes.saturating_sub(v.len() as u64);
                if !is_security_record(&v) {
                    st.droppable = st.droppable.saturating_sub(1);
                    st.droppable_bytes = st.droppable_bytes.saturating_sub(v.len() as u64);
                }
                if st.overflow == Some(s) {
                    st.overflow = None;
                }
            }
        }
        let mut batch = sled::Batch::default();
        let mut new = st.clone();
        for (b, (sum, gone)) in &sealed {
            let Some(sum) = sum.as_ref().filter(|_| *gone != 0) else {
                continue;
            };
            blocks::remove_sealed(t, &mut batch, *b, sum, *gone, false)?;
            let droppable = *gone & !sum.security;
            new.count = new.count.saturating_sub(u64::from(gone.count_ones()));
            new.bytes = new.bytes.saturating_sub(sum.bytes(*gone));
            new.droppable = new
                .droppable
                .saturating_sub(u64::from(droppable.count_ones()));
            new.droppable_bytes = new.droppable_bytes.saturating_sub(sum.bytes(droppable));
            if new
                .overflow
                .is_some_and(|o| o / BLOCK == *b && gone & 1 << (o % BLOCK) != 0)
            {
                new.overflow = None;
            }
        }
        t.apply_batch(batch)?;
        *st = new;
        Ok(())
    }

    /// The same log woken through `appended` (kept by a store that reopens its database).
    pub(super) fn with_appended(mut self, appended: Arc<tokio::sync::Notify>) -> EventLog {
        self.appended = appended;
        self
    }

    /// Makes sure no sequence number below `floor` is assigned again (a store reopened after a
    /// storage failure). Records are published only once flushed, so this is a second line of
    /// defence: the cloud may see a gap in `seq`, never one `seq` with two contents.
    pub(super) fn raise_next(&self, floor: u64) -> anyhow::Result<()> {
        let trees = self.trees();
        let mut st = self.lock();
        if floor > st.next {
            if floor >= SEQ_LIMIT {
                anyhow::bail!("sequence number {floor} is beyond the event log's range");
            }
            {
                let _layout = self.layout.write().unwrap_or_else(|e| e.into_inner());
                trees.events.insert(HIGH_WATER, &floor.to_be_bytes())?;
            }
            st.next = floor;
            self.seal_done(&trees, &mut st);
        }
        Ok(())
    }

    /// Woken after every flush that made records visible (the cloud link waits on it).
    pub fn appended(&self) -> Arc<tokio::sync::Notify> {
        self.appended.clone()
    }

    /// Bytes of event records held.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Flushes the log to disk (and makes what it holds visible).
    pub fn flush(&self) -> anyhow::Result<()> {
        self.flush_pending()?;
        Ok(())
    }

    /// Records read by trims since the log was opened: what trimming has cost.
    pub fn trim_reads(&self) -> u64 {
        self.trim_reads.load(Ordering::Relaxed)
    }

    /// The watermark: records numbered below it are on disk and visible.
    pub fn durable_seq(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Up to `limit` visible records with `seq >= cursor`, in order, as their JSON bytes (an
    /// [`Event`] object). The cloud link sends them without parsing them.
    pub fn read_raw_from(
        &self,
        cursor: u64,
        limit: usize,
    ) -> anyhow::Result<Vec<(u64, sled::IVec)>> {
        let end = self.durable_seq();
        let mut out = Vec::with_capacity(limit.min(1024));
        if cursor >= end {
            return Ok(out);
        }
        let _layout = self.layout.read().unwrap_or_else(|e| e.into_inner());
        let t = &self.trees().events;
        let mut block = cursor / BLOCK;
        while out.len() < limit {
            let Some(b) = blocks::next_block(t, block)? else {
                break;
            };
            if b * BLOCK >= end {
                break;
            }
            let recs = blocks::records(t, b, cursor, end)?;
            out.extend(recs.into_iter().take(limit - out.len()));
            block = b + 1;
        }
        Ok(out)
    }

    /// The next sequence number to be assigned.
    pub fn next_seq(&self) -> u64 {
        self.lock().next
    }

    /// Up to `limit` visible events with `seq >= cursor`, in order.
    pub fn read_from(&self, cursor: u64, limit: usize) -> anyhow::Result<Vec<Event>> {
        self.read_raw_from(cursor, limit)?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).context("event record is corrupt"))
            .collect()
    }

    /// Records held (visible or not yet).
    pub fn len(&self) -> u64 {
        self.lock().count
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (first, last) sequence numbers visible.
    pub fn bounds(&self) -> (Option<u64>, Option<u64>) {
        let first = self
            .read_raw_from(0, 1)
            .ok()
            .and_then(|r| r.first().map(|(s, _)| *s));
        let Some(first) = first else {
            return (None, None);
        };
        let (end, t) = (self.durable_seq(), &self.trees().events);
        let _layout = self.layout.read().unwrap_or_else(|e| e.into_inner());
        let mut block = (end - 1) / BLOCK;
        while let Ok(Some(b)) = blocks::prev_block(t, block) {
            if let Some((last, _)) = blocks::records(t, b, 0, end).ok().and_then(|mut r| r.pop()) {
                return (Some(first), Some(last));
            }
            let Some(below) = b.checked_sub(1) else { break };
            block = below;
        }
        (Some(first), Some(first))
    }
}

#[cfg(test)]
mod tests;
