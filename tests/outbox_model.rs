//! The event log as the cloud outbox, against a model: random appends (flushed or not), flushes,
//! acknowledgements (in or out of order, of what was visible), trims and restarts, compared after
//! every step with a `BTreeMap` that does the same by the documented rules (docs/guarantees.md):
//! a record is visible only once flushed; over the bound the oldest ordinary events go down to
//! 95 %, but only once enough of them are held (5 % of the bound when security events alone are
//! over it); each trim writes one `outbox_overflow` and folds the previous one if still held.

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
}

impl Model {
    fn trim_if_due(&mut self) {
        let target = MAX_EVENTS - MAX_EVENTS / 20;
        let count = self.held.len() as u64;
        let droppable = self.held.values().filter(|k| **k == Kind::Ordinary).count() as u64;
        if count <= MAX_EVENTS || droppable < (count - target).min(MAX_EVENTS / 20).max(1) {
            return;
        }
        // The held overflow record is folded into the new one: it does not count.
        let mut left = count - u64::from(self.overflow.is_some());
        let ordinary: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, k)| **k == Kind::Ordinary)
            .map(|(s, _)| *s)
            .collect();
        let mut dropped = 0;
        for s in ordinary {
            if left <= target {
                break;
            }
            self.held.remove(&s);
            left -= 1;
            dropped += 1;
        }
        if dropped > 0 {
            if let Some(o) = self.overflow.take() {
                self.held.remove(&o);
            }
            self.held.insert(self.next, Kind::Overflow);
            self.overflow = Some(self.next);
            self.next += 1;
        }
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
                        m.held.insert(m.next, if *sec { Kind::Security } else { Kind::Ordinary });
                        m.next += 1;
                    }
                    m.trim_if_due();
                    if flushed {
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
                    m.durable = m.next;
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
