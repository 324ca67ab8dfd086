//! Fixtures shared by the integration tests.
#![allow(dead_code)]

use gatehouse::sync::{self, SyncMessage};
use serde_json::json;

/// A site of `n` tenants, each with one occupied unit and one code `"{base + i}"` (6+ digits).
pub fn tenants_snapshot(version: u64, n: usize, code_base: u64) -> sync::Snapshot {
    let mut units = Vec::new();
    let mut users = Vec::new();
    let mut creds = Vec::new();
    for i in 0..n {
        units.push(json!({"id": format!("U{i}"), "status": "occupied", "tenant": format!("t{i}")}));
        users.push(json!({"id": format!("t{i}"), "role": "tenant"}));
        creds.push(json!({"id": format!("c{i}"), "user": format!("t{i}"), "code": format!("{}", code_base + i as u64)}));
    }
    serde_json::from_value(json!({
        "schema_version": 1, "kind": "snapshot", "version": version,
        "facility": {"time_zone": "America/New_York"},
        "entries": [{"id": "gate-1", "kind": "gate"}],
        "units": units, "users": users, "credentials": creds
    }))
    .expect("fixture snapshot")
}

pub fn snapshot_msg(s: sync::Snapshot) -> SyncMessage {
    SyncMessage::Snapshot(Box::new(s))
}

pub fn delta_msg(v: serde_json::Value) -> SyncMessage {
    SyncMessage::Delta(Box::new(serde_json::from_value(v).expect("fixture delta")))
}

pub fn gatehouse_bin() -> &'static str {
    env!("CARGO_BIN_EXE_gatehouse")
}
