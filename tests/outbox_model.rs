//! The event log as the cloud outbox, against a model: random appends, acknowledgements (in or
//! out of order), trims and restarts, compared after every step with a `BTreeMap` that does the
//! same by the documented rules.

use std::collections::BTreeMap;

use chrono::{TimeZone, Utc};
use gatehouse::events::EventKind;
use gatehouse::store::{LogLimits, NewEvent, Store};
use proptest::prelude::*;
use serde_json::json;

#[derive(Debug, Clone)]
enum Op {
    /// Append this many events; `true` marks a security event.
    Append(Vec<bool>),
    /// Acknowledge the events at these positions among those held (as a broker would).
    Ack(Vec<prop::sample::Index>),
    /// Close and reopen the database (a daemon restart).
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(prop::bool::weighted(0.2), 1..40).prop_map(Op::Append),
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_outbox_matches_its_model(ops in prop::collection::vec(op(), 1..30)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Some(Store::open_with(dir.path(), limits()).unwrap());
        // seq -> security?
        let mut model: BTreeMap<u64, bool> = BTreeMap::new();
        let mut next = 1u64;
        let at = Utc.with_ymd_and_hms(2026, 11, 23, 15, 0, 0).unwrap();
        for op in ops {
            let s = store.as_ref().unwrap();
            match op {
                Op::Append(kinds) => {
                    let events: Vec<NewEvent> = kinds.iter().map(|&sec| NewEvent {
                        at,
                        local: String::new(),
                        kind: if sec { EventKind::AccessDenied } else { EventKind::AccessGranted },
                        payload: json!({}),
                    }).collect();
                    let seqs = s.events().append(&events).unwrap();
                    for (seq, sec) in seqs.iter().zip(&kinds) {
                        prop_assert_eq!(*seq, next, "numbering");
                        model.insert(next, *sec);
                        next += 1;
                    }
                    // The model's trim: over the bound, drop the oldest non-security events down
                    // to 95 % of it, then record one outbox_overflow (a security event).
                    if model.len() as u64 > MAX_EVENTS {
                        let target = (MAX_EVENTS - MAX_EVENTS / 20) as usize;
                        let ordinary: Vec<u64> = model.iter().filter(|(_, sec)| !**sec).map(|(k, _)| *k).collect();
                        let mut dropped = 0;
                        for k in ordinary {
                            if model.len() <= target {
                                break;
                            }
                            model.remove(&k);
                            dropped += 1;
                        }
                        if dropped > 0 {
                            model.insert(next, true);
                            next += 1;
                        }
                    }
                }
                Op::Ack(picks) => {
                    let held: Vec<u64> = model.keys().copied().collect();
                    if held.is_empty() {
                        continue;
                    }
                    let acked: Vec<u64> = picks.iter().map(|i| held[i.index(held.len())]).collect();
                    s.events().remove_delivered(&acked).unwrap();
                    for a in acked {
                        model.remove(&a);
                    }
                }
                Op::Reopen => {
                    drop(store.take());
                    store = Some(Store::open_with(dir.path(), limits()).unwrap());
                }
            }
            let s = store.as_ref().unwrap();
            let held = s.events().read_from(0, 10_000).unwrap();
            let got: BTreeMap<u64, bool> = held
                .iter()
                .map(|e| (e.seq, gatehouse::events::is_security_kind(&e.kind)))
                .collect();
            prop_assert_eq!(&got, &model);
            prop_assert_eq!(s.events().len(), model.len() as u64, "count");
            let bytes: u64 = s
                .events()
                .read_raw_from(0, 10_000)
                .unwrap()
                .iter()
                .map(|(_, v)| v.len() as u64)
                .sum();
            prop_assert_eq!(s.events().bytes(), bytes, "bytes");
            prop_assert_eq!(s.events().next_seq(), next, "never reused");
        }
    }
}
