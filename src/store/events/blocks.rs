//! Sealed blocks of the event log: [`BLOCK`] consecutive sequence numbers stored under one key,
//! with a small summary key saying which of them are still held, which are security events and
//! how big each is. A million held events are some 8,000 blocks, not a million sled keys (sled
//! keeps per-key structures in memory), and the log's counters are rebuilt at open from the
//! summaries alone.
//!
//! Records are appended as loose keys (`<seq:u64be>`, also the layout of older versions); the
//! block is sealed once every number in it has been assigned: one sled batch writes the block and
//! its summary and removes the loose keys, so a crash leaves either form, never neither. An
//! acknowledgement rewrites only the summary; a trim also rewrites (compacts) the block so the
//! space of what it dropped is reclaimed; a block whose records are all gone is deleted.
//!
//! ```text
//! "B" <block:u64be>   seal-time records, each <seq:u64be> <len:u32be> <JSON bytes>
//! "S" <block:u64be>   <present:u128be> <security:u128be> <len:u32be> × BLOCK
//! ```
//!
//! A record is held iff it is loose, or its bit is set in `present` (a block may keep the bytes
//! of records an acknowledgement removed until the block goes).

use anyhow::{Context as _, bail};
use sled::IVec;

use crate::events::EventKind;

/// Sequence numbers per block (one bit each in a `u128`).
pub(super) const BLOCK: u64 = 128;
/// Sequence numbers stay below this: a loose key's first byte is 0, so every loose key sorts
/// before the tagged block and summary keys.
pub(super) const SEQ_LIMIT: u64 = 1 << 56;
const BLOCK_TAG: u8 = b'B';
const SUMMARY_TAG: u8 = b'S';
const SUMMARY_BYTES: usize = 32 + 4 * BLOCK as usize;

pub(super) fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn tagged(tag: u8, block: u64) -> [u8; 9] {
    let mut k = [tag; 9];
    k[1..].copy_from_slice(&block.to_be_bytes());
    k
}

fn block_of_tagged(k: &[u8]) -> anyhow::Result<u64> {
    let b: [u8; 8] = k
        .get(1..)
        .and_then(|b| b.try_into().ok())
        .context("event block key is not 9 bytes")?;
    Ok(u64::from_be_bytes(b))
}

fn seq_of(k: &[u8]) -> anyhow::Result<u64> {
    Ok(u64::from_be_bytes(
        k.try_into().context("event log key is not 8 bytes")?,
    ))
}

fn bit(seq: u64) -> u128 {
    1u128 << (seq % BLOCK)
}

/// The loose keys of sequence numbers in `[from, to)`.
fn loose_range(t: &sled::Tree, from: u64, to: u64) -> sled::Iter {
    t.range(seq_key(from.min(SEQ_LIMIT))..seq_key(to.min(SEQ_LIMIT)))
}

/// What a sealed block holds, without its records.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Summary {
    pub present: u128,
    pub security: u128,
    pub lens: [u32; BLOCK as usize],
}

impl Summary {
    fn empty() -> Summary {
        Summary {
            present: 0,
            security: 0,
            lens: [0; BLOCK as usize],
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(SUMMARY_BYTES);
        v.extend_from_slice(&self.present.to_be_bytes());
        v.extend_from_slice(&self.security.to_be_bytes());
        for l in self.lens {
            v.extend_from_slice(&l.to_be_bytes());
        }
        v
    }

    fn decode(v: &[u8]) -> anyhow::Result<Summary> {
        if v.len() != SUMMARY_BYTES {
            bail!(
                "event block summary is {} bytes, not {SUMMARY_BYTES}",
                v.len()
            );
        }
        let u128_at = |i: usize| u128::from_be_bytes(v[i..i + 16].try_into().unwrap_or([0; 16]));
        let mut s = Summary {
            present: u128_at(0),
            security: u128_at(16),
            ..Summary::empty()
        };
        for (i, l) in s.lens.iter_mut().enumerate() {
            let at = 32 + 4 * i;
            *l = u32::from_be_bytes(v[at..at + 4].try_into().unwrap_or([0; 4]));
        }
        Ok(s)
    }

    /// Bytes of the records in `mask` that are held.
    pub fn bytes(&self, mask: u128) -> u64 {
        let mut m = self.present & mask;
        let mut n = 0;
        while m != 0 {
            n += u64::from(self.lens[m.trailing_zeros() as usize]);
            m &= m - 1;
        }
        n
    }

    pub fn holds(&self, seq: u64) -> bool {
        self.present & bit(seq) != 0
    }
}

/// A held record's metadata.
#[derive(Debug, Clone, Copy)]
pub(super) struct Meta {
    pub seq: u64,
    pub len: u64,
    pub security: bool,
    /// In a sealed block (else a loose key).
    pub sealed: bool,
}

fn encode_block(records: &[(u64, &[u8])]) -> Vec<u8> {
    let mut v = Vec::with_capacity(records.iter().map(|(_, r)| 12 + r.len()).sum());
    for (seq, r) in records {
        v.extend_from_slice(&seq.to_be_bytes());
        v.extend_from_slice(&(r.len() as u32).to_be_bytes());
        v.extend_from_slice(r);
    }
    v
}

fn decode_block(mut v: &[u8]) -> anyhow::Result<Vec<(u64, &[u8])>> {
    let mut out = Vec::new();
    while !v.is_empty() {
        let (head, rest) = v.split_at_checked(12).context("event block is truncated")?;
        let seq = u64::from_be_bytes(head[..8].try_into().unwrap_or([0; 8]));
        let len = u32::from_be_bytes(head[8..].try_into().unwrap_or([0; 4])) as usize;
        let (r, rest) = rest
            .split_at_checked(len)
            .context("event block is truncated")?;
        out.push((seq, r));
        v = rest;
    }
    Ok(out)
}

pub(super) fn summary(t: &sled::Tree, block: u64) -> anyhow::Result<Option<Summary>> {
    t.get(tagged(SUMMARY_TAG, block))?
        .map(|v| Summary::decode(&v).with_context(|| format!("event block {block}")))
        .transpose()
}

/// The held records of block `block` numbered in `[from, to)`, in order: (seq, JSON bytes).
pub(super) fn records(
    t: &sled::Tree,
    block: u64,
    from: u64,
    to: u64,
) -> anyhow::Result<Vec<(u64, IVec)>> {
    let mut out = Vec::new();
    if let Some(s) = summary(t, block)? {
        let v = t
            .get(tagged(BLOCK_TAG, block))?
            .with_context(|| format!("event block {block} has a summary but no records"))?;
        for (seq, r) in decode_block(&v).with_context(|| format!("event block {block}"))? {
            if seq / BLOCK == block && (from..to).contains(&seq) && s.holds(seq) {
                out.push((seq, IVec::from(r)));
            }
        }
    }
    let sealed = out.len();
    let lo = from.max(block * BLOCK);
    let hi = to.min((block + 1) * BLOCK);
    if lo < hi {
        for kv in loose_range(t, lo, hi) {
            let (k, v) = kv?;
            out.push((seq_of(&k)?, v));
        }
    }
    if sealed > 0 && out.len() > sealed {
        out.sort_by_key(|(s, _)| *s);
    }
    Ok(out)
}

/// The metadata of block `block`'s held records numbered `from` or above, in order, and the
/// block's summary if it is sealed. Reads only the summary of a sealed block.
pub(super) fn metas(
    t: &sled::Tree,
    block: u64,
    from: u64,
) -> anyhow::Result<(Option<Summary>, Vec<Meta>)> {
    let mut out = Vec::new();
    let s = summary(t, block)?;
    if let Some(s) = &s {
        let mut m = s.present;
        while m != 0 {
            let i = u64::from(m.trailing_zeros());
            m &= m - 1;
            let seq = block * BLOCK + i;
            if seq >= from {
                out.push(Meta {
                    seq,
                    len: u64::from(s.lens[i as usize]),
                    security: s.security & (1 << i) != 0,
                    sealed: true,
                });
            }
        }
    }
    let sealed = out.len();
    let lo = from.max(block * BLOCK);
    let hi = (block + 1) * BLOCK;
    if lo < hi {
        for kv in loose_range(t, lo, hi) {
            let (k, v) = kv?;
            out.push(Meta {
                seq: seq_of(&k)?,
                len: v.len() as u64,
                security: super::is_security_record(&v),
                sealed: false,
            });
        }
    }
    if sealed > 0 && out.len() > sealed {
        out.sort_by_key(|m| m.seq);
    }
    Ok((s, out))
}

/// The first block numbered `block` or above that holds records (sealed or loose).
pub(super) fn next_block(t: &sled::Tree, block: u64) -> anyhow::Result<Option<u64>> {
    let sealed = match t
        .range(tagged(SUMMARY_TAG, block)..=tagged(SUMMARY_TAG, u64::MAX))
        .keys()
        .next()
    {
        Some(k) => Some(block_of_tagged(&k?)?),
        None => None,
    };
    let loose = match loose_range(t, block.saturating_mul(BLOCK), SEQ_LIMIT)
        .keys()
        .next()
    {
        Some(k) => Some(seq_of(&k?)? / BLOCK),
        None => None,
    };
    Ok(sealed.into_iter().chain(loose).min())
}

/// The last block numbered `block` or below that holds records (sealed or loose).
pub(super) fn prev_block(t: &sled::Tree, block: u64) -> anyhow::Result<Option<u64>> {
    let sealed = match t
        .range(tagged(SUMMARY_TAG, 0)..=tagged(SUMMARY_TAG, block))
        .keys()
        .next_back()
    {
        Some(k) => Some(block_of_tagged(&k?)?),
        None => None,
    };
    let loose = match loose_range(t, 0, block.saturating_add(1).saturating_mul(BLOCK))
        .keys()
        .next_back()
    {
        Some(k) => Some(seq_of(&k?)? / BLOCK),
        None => None,
    };
    Ok(sealed.into_iter().chain(loose).max())
}

/// The first loose record numbered in `[from, to)`.
pub(super) fn first_loose(t: &sled::Tree, from: u64, to: u64) -> anyhow::Result<Option<u64>> {
    match loose_range(t, from, to).keys().next() {
        Some(k) => Ok(Some(seq_of(&k?)?)),
        None => Ok(None),
    }
}

/// Every summary, in block order (for the counters at open).
pub(super) fn summaries(t: &sled::Tree) -> impl Iterator<Item = anyhow::Result<(u64, Summary)>> {
    t.range(tagged(SUMMARY_TAG, 0)..=tagged(SUMMARY_TAG, u64::MAX))
        .map(|kv| {
            let (k, v) = kv?;
            let b = block_of_tagged(&k)?;
            Ok((
                b,
                Summary::decode(&v).with_context(|| format!("event block {b}"))?,
            ))
        })
}

/// Every loose record, in order (at open: the open block, or an older version's whole log).
pub(super) fn loose(t: &sled::Tree) -> impl Iterator<Item = anyhow::Result<(u64, IVec)>> {
    loose_range(t, 0, SEQ_LIMIT).map(|kv| {
        let (k, v) = kv?;
        Ok((seq_of(&k)?, v))
    })
}

/// Whether record `seq` is held.
pub(super) fn holds(t: &sled::Tree, seq: u64) -> anyhow::Result<bool> {
    Ok(summary(t, seq / BLOCK)?.is_some_and(|s| s.holds(seq)) || t.contains_key(seq_key(seq))?)
}

/// Seals block `block`: its held records, loose or already sealed, become one block key and
/// its summary, and the loose keys go, in one batch. Returns the highest `outbox_overflow`
/// record in it. Nothing to do (and `None`) if it has no loose record.
pub(super) fn seal(t: &sled::Tree, block: u64) -> anyhow::Result<Option<u64>> {
    let lo = block * BLOCK;
    if first_loose(t, lo, lo + BLOCK)?.is_none() {
        return Ok(None);
    }
    let recs = records(t, block, lo, lo + BLOCK)?;
    let mut s = Summary::empty();
    let mut overflow = None;
    let mut batch = sled::Batch::default();
    for (seq, r) in &recs {
        let i = (seq % BLOCK) as usize;
        s.present |= 1 << i;
        s.lens[i] = u32::try_from(r.len()).unwrap_or(u32::MAX);
        let kind = super::record_kind(r);
        if kind.as_deref().is_some_and(crate::events::is_security_kind) {
            s.security |= 1 << i;
        }
        if kind.as_deref() == Some(EventKind::OutboxOverflow.as_str()) {
            overflow = Some(*seq);
        }
    }
    for kv in loose_range(t, lo, lo + BLOCK).keys() {
        batch.remove(kv?);
    }
    let body: Vec<(u64, &[u8])> = recs.iter().map(|(s, r)| (*s, &r[..])).collect();
    batch.insert(&tagged(BLOCK_TAG, block), encode_block(&body));
    batch.insert(&tagged(SUMMARY_TAG, block), s.encode());
    if let Some(o) = overflow {
        let known = t.get(super::OVERFLOW)?.and_then(|v| super::u64_of(&v));
        if known.is_none_or(|k| k < o) {
            batch.insert(super::OVERFLOW, &o.to_be_bytes());
        }
    }
    t.apply_batch(batch)?;
    Ok(overflow)
}

/// Adds to `batch` the removal of the records `gone` from sealed block `block` (summary `s`):
/// the block goes if nothing is left, else its summary is rewritten, and with `compact` its
/// records too (reclaiming their space).
pub(super) fn remove_sealed(
    t: &sled::Tree,
    batch: &mut sled::Batch,
    block: u64,
    s: &Summary,
    gone: u128,
    compact: bool,
) -> anyhow::Result<()> {
    let present = s.present & !gone;
    if present == 0 {
        batch.remove(&tagged(BLOCK_TAG, block));
        batch.remove(&tagged(SUMMARY_TAG, block));
        return Ok(());
    }
    let kept = Summary {
        present,
        ..s.clone()
    };
    if compact {
        let v = t
            .get(tagged(BLOCK_TAG, block))?
            .with_context(|| format!("event block {block} has a summary but no records"))?;
        let body: Vec<(u64, &[u8])> = decode_block(&v)
            .with_context(|| format!("event block {block}"))?
            .into_iter()
            .filter(|(seq, _)| seq / BLOCK == block && kept.holds(*seq))
            .collect();
        batch.insert(&tagged(BLOCK_TAG, block), encode_block(&body));
    }
    batch.insert(&tagged(SUMMARY_TAG, block), kept.encode());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_and_a_block_round_trip() {
        let mut s = Summary::empty();
        s.present = 0b1011 | 1 << 127;
        s.security = 0b10;
        s.lens[0] = 7;
        s.lens[1] = 3;
        s.lens[3] = 16_384;
        s.lens[127] = 1;
        assert_eq!(Summary::decode(&s.encode()).unwrap(), s);
        assert_eq!(s.bytes(u128::MAX), 7 + 3 + 16_384 + 1);
        assert_eq!(s.bytes(!s.security), 7 + 16_384 + 1);
        let body: Vec<(u64, &[u8])> = vec![(128, b"{}"), (130, b""), (255, b"{\"a\":1}")];
        assert_eq!(decode_block(&encode_block(&body)).unwrap(), body);
    }

    #[test]
    fn a_damaged_block_or_summary_is_an_error_not_a_panic() {
        assert!(Summary::decode(&[0; 10]).is_err());
        let v = encode_block(&[(1, b"{\"kind\":\"x\"}")]);
        for cut in 1..v.len() {
            assert!(decode_block(&v[..cut]).is_err(), "cut at {cut}");
        }
    }
}
