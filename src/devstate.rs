//! Device state for the cloud: one JSON object per device (availability, last seen, battery,
//! lock state, last readings), published retained on `devices/<id>/state` by the cloud link
//! when it changes and all again after every reconnect. In memory only: the durable record of
//! what happened is the event log; this is the latest picture.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use serde_json::{Map, Value};
use tokio::sync::Notify;

#[derive(Default)]
struct Board {
    states: BTreeMap<String, Map<String, Value>>,
    dirty: BTreeSet<String>,
}

/// The latest state of every device the gateway drives or hears.
#[derive(Default)]
pub struct DeviceStates {
    board: Mutex<Board>,
    changed: Notify,
}

impl DeviceStates {
    pub fn new() -> Self {
        Self::default()
    }

    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets fields of a device's state (`null` removes one). Marks the device for publishing
    /// when anything changed; returns whether it did.
    pub fn set(&self, device: &str, fields: &[(&str, Value)]) -> bool {
        let mut b = self.board();
        let state = b.states.entry(device.to_string()).or_insert_with(|| {
            let mut m = Map::new();
            m.insert("device".into(), Value::String(device.to_string()));
            m
        });
        let mut changed = false;
        for (k, v) in fields {
            if v.is_null() {
                changed |= state.remove(*k).is_some();
            } else if state.get(*k) != Some(v) {
                state.insert((*k).to_string(), v.clone());
                changed = true;
            }
        }
        if changed {
            b.dirty.insert(device.to_string());
            drop(b);
            self.changed.notify_one();
        }
        changed
    }

    /// Devices whose availability is known (an `online` field): (online, total).
    pub fn online_counts(&self) -> (usize, usize) {
        let b = self.board();
        let known = b.states.values().filter_map(|s| s.get("online"));
        known.fold((0, 0), |(up, n), v| {
            (up + usize::from(v == &Value::Bool(true)), n + 1)
        })
    }

    /// A device's current state.
    pub fn get(&self, device: &str) -> Option<Value> {
        self.board().states.get(device).cloned().map(Value::Object)
    }

    /// The states changed since the last call, and clears the marks.
    pub fn take_changed(&self) -> Vec<(String, Value)> {
        let mut b = self.board();
        let dirty = std::mem::take(&mut b.dirty);
        dirty
            .into_iter()
            .filter_map(|d| b.states.get(&d).map(|s| (d, Value::Object(s.clone()))))
            .collect()
    }

    /// Marks devices to be published again (their publication did not go out). Without a
    /// wake-up: the caller retries on its own schedule (no busy loop while a queue is full).
    pub fn mark_changed(&self, devices: impl IntoIterator<Item = String>) {
        self.board().dirty.extend(devices);
    }

    /// Every state (after a reconnect), and clears the marks.
    pub fn all(&self) -> Vec<(String, Value)> {
        let mut b = self.board();
        b.dirty.clear();
        b.states
            .iter()
            .map(|(d, s)| (d.clone(), Value::Object(s.clone())))
            .collect()
    }

    /// Resolves when a state changed (after the last [`Self::take_changed`]).
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_changes_are_marked() {
        let s = DeviceStates::new();
        assert!(s.set("lock-1", &[("online", json!(true))]));
        assert!(!s.set("lock-1", &[("online", json!(true))]));
        assert_eq!(
            s.take_changed(),
            vec![("lock-1".into(), json!({"device": "lock-1", "online": true}))]
        );
        assert!(s.take_changed().is_empty());
        assert!(s.set(
            "lock-1",
            &[("battery_mv", json!(2900)), ("online", Value::Null)]
        ));
        assert_eq!(
            s.get("lock-1").unwrap(),
            json!({"device": "lock-1", "battery_mv": 2900})
        );
        assert_eq!(s.all().len(), 1);
        assert!(s.take_changed().is_empty());
    }
}
