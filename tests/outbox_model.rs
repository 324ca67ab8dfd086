//! The event log as the cloud outbox, against a model: random appends (flushed or not), flushes,
//! acknowledgements (in or out of order, of what was visible), trims and restarts, compared after
//! every step with a `BTreeMap` that does the same by the documented rules (docs/guarantees.md):
//! a record is visible only once flushed; over the bound the oldest ordinary events go down to
//! 95 %, but only once enough of them are held (5 % of the bound when security events alone are
//! over it); an append reads at most 64 + 2 per event for it (from a cursor past the leading
//! security events), the background trim (`trim_pending`) the rest; each trim that drops writes
//! one `outbox_overflow` and folds the previous one if still held.

use std::collections::BTreeMap;

use chrono::{TimeZone, Utc};
use gatehouse::events::EventKind;
use gatehouse::store::{LogLimits, NewEvent, Store};
use proptest::prelude::*;
use serde_json::json;

#[derive(Debug, Clone)]
enum Op {
    /// Append this many events (`true` marks a security event); flushed or not.
    Append(Vec<bool>, bool),
    /// Flush what was appended without a flush.
    Flush,
    /// The daemon's background trim.
    TrimPending,
    /// Acknowledge the visible events at these positions (as a broker would).
    Ack(Vec<prop::sample::Index>),
    /// Close and reopen the database (a clean daemon restart).
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (prop::collection::vec(prop::bool::weighted(0.3), 1..40), prop::bool::weighted(0.7))
            .prop_map(|(k, f)| Op::Append(k, f)),
        1 => Just(Op::Flush),
        1 => Just(Op::TrimPending),
        3 => prop::collection::vec(any::<prop::sample::Index>(), 1..20).prop_map(Op::Ack),
        1 => Just(Op::Reopen),
    ]
}

const MAX_EVENTS: u64 = 60;

fn limits() -> LogLimits {
    LogLimits {
        max_events: MAX_EVENTS,
        max_bytes: 1 << 30,
        max_age: chrono::Duration::days(3650),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ordinary,
    Security,
    Overflow,
}

#[derive(Default)]
struct Model {
    held: BTreeMap<u64, Kind>,
    next: u64,
    durable: u64,
    overflow: Option<u64>,
    /// Every record below it is a security event or gone: trims read from here.
    scan_from: u64,
    /// A trim stopped at its read limit with more to drop.
    trimming: bool,
}

const TARGET: u64 = MAX_EVENTS - MAX_EVENTS / 20;

impl Model {
    fn droppable(&self) -> u64 {
        self.held.values().filter(|k| **k == Kind::Ordinary).count() as u64
    }

    fn due(&self) -> bool {
        let count = self.held.len() as u64;
        self.trimming
            || (count > MAX_EVENTS
                && self.droppable() >= (count - TARGET).clamp(1, MAX_EVENTS / 20))
    }

    fn append(&mut self, security: bool) {
        if security && self.scan_from == self.next {
            self.scan_from = self.next + 1;
        }
        self.held.insert(
            self.next,
            if security {
                Kind::Security
            } else {
                Kind::Ordinary
            },
        );
        self.next += 1;
    }

    /// One trim reading at most `cap` records.
    fn trim(&mut self, cap: u64) {
        if !self.due() {
            return;
        }
        // The held overflow record is folded into the new one: it does not count.
        let mut count = self.held.len() as u64 - u64::from(self.overflow.is_some());
        let mut droppable = self.droppable();
        let from: Vec<(u64, Kind)> = self
            .held
            .range(self.scan_from..)
            .map(|(s, k)| (*s, *k))
            .collect();
        let (mut reads, mut dropped) = (0, 0);
        for (seq, kind) in from {
            if reads >= cap {
                break;
            }
            reads += 1;
            if droppable == 0 || count <= TARGET {
                break;
            }
            self.scan_from = seq + 1;
            if kind == Kind::Ordinary {
                self.held.remove(&seq);
                count -= 1;
                droppable -= 1;
                dropped += 1;
            }
        }
        self.trimming = reads >= cap && droppable > 0 && count > TARGET;
        if dropped > 0 {
            if let Some(o) = self.overflow.take() {
                self.held.remove(&o);
            }
            self.held.insert(self.next, Kind::Overflow);
            self.overflow = Some(self.next);
            if self.scan_from == self.next {
                self.scan_from += 1;
            }
            self.next += 1;
        }
    }

    /// What a reopen recomputes.
    fn reopened(&mut self) {
        self.durable = self.next;
        self.trimming = false;
        self.overflow = self
            .held
            .iter()
            .rev()
            .find(|(_, k)| **k == Kind::Overflow)
            .map(|(s, _)| *s);
        self.scan_from = self
            .held
            .iter()
            .find(|(_, k)| **k == Kind::Ordinary)
            .map_or(self.next, |(s, _)| *s);
    }
}

fn kind_of(k: &str) -> Kind {
    match k {
        "outbox_overflow" => Kind::Overflow,
        k if gatehouse::events::is_security_kind(k) => Kind::Security,
        _ => Kind::Ordinary,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_outbox_matches_its_model(ops in prop::collection::vec(op(), 1..30)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Some(Store::open_with(dir.path(), limits()).unwrap());
        let mut m = Model { next: 1, durable: 1, ..Model::default() };
        let at = Utc.with_ymd_and_hms(2026, 11, 23, 15, 0, 0).unwrap();
        for op in ops {
            let s = store.as_ref().unwrap();
            match op {
                Op::Append(kinds, flushed) => {
                    let events: Vec<NewEvent> = kinds.iter().map(|&sec| NewEvent {
                        at,
                        local: String::new(),
                        kind: if sec { EventKind::AccessDenied } else { EventKind::AccessGranted },
                        payload: json!({}),
                    }).collect();
                    let seqs = if flushed {
                        s.events().append(&events).unwrap()
                    } else {
                        s.events().append_unflushed(&events).unwrap()
                    };
                    for (seq, sec) in seqs.iter().zip(&kinds) {
                        prop_assert_eq!(*seq, m.next, "numbering");
                        m.append(*sec);
                    }
                    m.trim(64 + 2 * kinds.len() as u64);
                    if flushed {
                        m.durable = m.next;
                    }
                }
                Op::TrimPending => {
                    s.events().trim_pending(at, "").unwrap();
                    let before = m.next;
                    m.trim(4_096);
                    if m.next > before {
                        // It dropped events: it flushes what it wrote.
                        m.durable = m.next;
                    }
                }
                Op::Flush => {
                    prop_assert_eq!(s.events().flush_pending().unwrap(), m.next);
                    m.durable = m.next;
                }
                Op::Ack(picks) => {
                    let visible: Vec<u64> = m.held.range(..m.durable).map(|(s, _)| *s).collect();
                    if visible.is_empty() {
                        continue;
                    }
                    let acked: Vec<u64> = picks.iter().map(|i| visible[i.index(visible.len())]).collect();
                    s.events().remove_delivered(&acked).unwrap();
                    for a in acked {
                        m.held.remove(&a);
                        if m.overflow == Some(a) {
                            m.overflow = None;
                        }
                    }
                }
                Op::Reopen => {
                    store.take().unwrap().flush().unwrap();
                    store = Some(Store::open_with(dir.path(), limits()).unwrap());
                    // What was on disk is durable, hence visible.
                    m.reopened();
                }
            }
            let s = store.as_ref().unwrap();
            let visible: BTreeMap<u64, Kind> = s
                .events()
                .read_from(0, 10_000)
                .unwrap()
                .iter()
                .map(|e| (e.seq, kind_of(&e.kind)))
                .collect();
            let expected: BTreeMap<u64, Kind> =
                m.held.range(..m.durable).map(|(s, k)| (*s, *k)).collect();
            prop_assert_eq!(&visible, &expected, "visible: only what was flushed");
            prop_assert_eq!(s.events().len(), m.held.len() as u64, "count");
            prop_assert_eq!(s.events().has_pending(), m.durable < m.next, "pending");
            if m.durable == m.next {
                let bytes: u64 = s
                    .events()
                    .read_raw_from(0, 10_000)
                    .unwrap()
                    .iter()
                    .map(|(_, v)| v.len() as u64)
                    .sum();
                prop_assert_eq!(s.events().bytes(), bytes, "bytes");
            }
            prop_assert_eq!(s.events().next_seq(), m.next, "never reused");
            let overflows = m.held.values().filter(|k| **k == Kind::Overflow).count();
            prop_assert!(overflows <= 1, "{} overflow records held", overflows);
        }
    }
}
