//! Messages from the cloud: commands go to the command lanes, device responses to the device
//! bridge, sync deltas to the apply thread, snapshot parts are assembled (bounded in parts and
//! bytes, checked against their SHA-256) and the whole document applied ([`apply_document`]).

use base64::Engine as _;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{CloudLink, Outbox};
use crate::cloud::lanes::CmdJob;
use crate::cloud::messages::{SnapshotChunk, SyncResult};
use crate::cloud::mqtt::Client;
use crate::events::EventKind;
use crate::store::{Applied, ApplyError, Store};
use crate::sync;

/// Largest snapshot the gateway assembles from chunks.
const MAX_SNAPSHOT_BYTES: usize = 1 << 30;
/// Most parts a snapshot may come in (the part table is allocated from the announced count).
const MAX_SNAPSHOT_PARTS: u32 = 65_536;

/// Snapshot parts being assembled.
pub(super) struct Assembly {
    id: String,
    count: u32,
    sha256: String,
    parts: Vec<Option<Vec<u8>>>,
    bytes: usize,
}

impl CloudLink {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn incoming(
        &self,
        client: &Client,
        out: &mut Outbox,
        topic: &str,
        payload: Vec<u8>,
        assembly: &mut Option<Assembly>,
        sync_jobs: &std::sync::mpsc::Sender<(Vec<u8>, Option<String>)>,
        cmd_jobs: &std::sync::mpsc::Sender<CmdJob>,
    ) -> anyhow::Result<()> {
        if payload.is_empty() {
            // How MQTT clears a retained message: nothing to act on or answer.
            tracing::debug!(topic, "empty message ignored");
            return Ok(());
        }
        if let Some(name) = self.topics.command_name(topic) {
            match &self.commands {
                Some(_) => {
                    let _ = cmd_jobs.send(CmdJob::Message(name.to_string(), payload));
                }
                None => tracing::debug!(topic, "command ignored: no command router"),
            }
        } else if topic == self.topics.ble_unlock_response() {
            if let Some(b) = &self.bridge {
                b.rpc.on_response(&payload);
            }
        } else if topic == self.topics.sync_delta() {
            let _ = sync_jobs.send((payload, None));
        } else if topic == self.topics.sync_snapshot() {
            match add_chunk(assembly, &payload) {
                Ok(Some((id, doc))) => {
                    let _ = sync_jobs.send((doc, Some(id)));
                }
                Ok(None) => {}
                Err(reason) => {
                    let r = SyncResult {
                        status: "refused".into(),
                        kind: Some("snapshot".into()),
                        id: None,
                        version: None,
                        current_version: self.store.site().version,
                        reason: Some(reason),
                    };
                    self.publish(client, out, self.topics.sync_result(), false, &r)?;
                }
            }
        }
        Ok(())
    }
}

/// Adds a snapshot part. Returns the whole document when the last part arrives.
fn add_chunk(
    assembly: &mut Option<Assembly>,
    payload: &[u8],
) -> Result<Option<(String, Vec<u8>)>, String> {
    let chunk: SnapshotChunk = serde_json::from_slice(payload)
        .map_err(|e| format!("snapshot part is not valid: {}", crate::redact::serde(&e)))?;
    if chunk.count > MAX_SNAPSHOT_PARTS {
        return Err(format!(
            "snapshot announces {} parts (at most {MAX_SNAPSHOT_PARTS})",
            chunk.count
        ));
    }
    if chunk.count == 0 || chunk.index >= chunk.count {
        return Err(format!(
            "snapshot part {} of {} is out of range",
            chunk.index, chunk.count
        ));
    }
    let data = base64::engine::general_purpose::STANDARD
        .decode(&chunk.data)
        .map_err(|_| "snapshot part data is not base64".to_string())?;
    let fresh = match assembly {
        Some(a) => a.id != chunk.id || a.count != chunk.count || a.sha256 != chunk.sha256,
        None => true,
    };
    if fresh {
        // A part of another transfer replaces an unfinished one.
        *assembly = Some(Assembly {
            id: chunk.id.clone(),
            count: chunk.count,
            sha256: chunk.sha256.to_lowercase(),
            parts: vec![None; chunk.count as usize],
            bytes: 0,
        });
    }
    let a = assembly.as_mut().expect("set above");
    if a.parts[chunk.index as usize].is_none() {
        a.bytes += data.len();
        if a.bytes > MAX_SNAPSHOT_BYTES {
            *assembly = None;
            return Err("snapshot exceeds 1 GiB".into());
        }
        a.parts[chunk.index as usize] = Some(data);
    }
    if a.parts.iter().any(Option::is_none) {
        return Ok(None);
    }
    let a = assembly.take().expect("complete");
    // Joined into one buffer of the exact size, each part freed as soon as it is copied: the
    // document is held about once, not twice (nor in a buffer grown by doubling).
    let mut doc: Vec<u8> = Vec::with_capacity(a.bytes);
    for part in a.parts.into_iter().flatten() {
        doc.extend_from_slice(&part);
    }
    let digest = hex::encode(Sha256::digest(&doc));
    if digest != a.sha256 {
        return Err(format!(
            "snapshot {} does not match its sha256 (got {digest})",
            crate::redact::excerpt(&a.id)
        ));
    }
    Ok(Some((a.id, doc)))
}

/// Parses and applies a snapshot or delta; records the outcome as an event; says what happened.
/// `id` is the transfer id of a document assembled from `sync/snapshot` parts, `None` for one
/// from `sync/delta`: the topic decides what is accepted (a snapshot only in parts, with its
/// SHA-256; a delta only on `sync/delta`).
/// Takes the document by value: it is dropped once parsed, before the site is built (a
/// million-credential snapshot is tens of MB of JSON).
pub fn apply_document(store: &Store, doc: Vec<u8>, id: Option<String>) -> SyncResult {
    let record = |kind: EventKind, payload: serde_json::Value| {
        if let Err(e) = store.record_flushed(kind, payload) {
            tracing::error!("recording a sync outcome: {e:#}");
        }
    };
    if let Some((kind, reason)) = wrong_topic(&doc, id.is_some()) {
        record(
            EventKind::SyncRefused,
            json!({"kind": kind, "reason": reason, "source": "mqtt"}),
        );
        tracing::warn!(kind, reason = %reason, "sync refused");
        return SyncResult {
            status: "refused".into(),
            kind: Some(kind.into()),
            id,
            version: None,
            current_version: store.site().version,
            reason: Some(reason.into()),
        };
    }
    let parsed = sync::parse_for_apply(&doc);
    drop(doc);
    let msg = match parsed {
        Ok(m) => m,
        Err(e) => {
            record(
                EventKind::SyncRefused,
                json!({"reason": e.to_string(), "source": "mqtt"}),
            );
            return SyncResult {
                status: "refused".into(),
                kind: None,
                id,
                version: None,
                current_version: store.site().version,
                reason: Some(e.to_string()),
            };
        }
    };
    let kind = match &msg {
        sync::Incoming::Snapshot(_) => "snapshot",
        sync::Incoming::Delta(_) => "delta",
    };
    let version = msg.version();
    // Consumed: a snapshot's records are freed as the new site is built from them.
    let result = store.apply_incoming(msg);
    let current_version = store.site().version;
    match result {
        Ok(Applied {
            version,
            previous_version,
            ..
        }) => {
            record(
                EventKind::SyncApplied,
                json!({"kind": kind, "version": version, "previous_version": previous_version, "source": "mqtt"}),
            );
            tracing::info!(kind, version, "sync applied");
            SyncResult {
                status: "applied".into(),
                kind: Some(kind.into()),
                id,
                version: Some(version),
                current_version,
                reason: None,
            }
        }
        Err(e) => {
            let status = if e.is_resync_needed() {
                "resync_needed"
            } else {
                "refused"
            };
            record(
                EventKind::SyncRefused,
                json!({"kind": kind, "version": version, "reason": e.to_string(), "source": "mqtt"}),
            );
            tracing::warn!(kind, version, "sync refused: {e}");
            let _: &ApplyError = &e;
            SyncResult {
                status: status.into(),
                kind: Some(kind.into()),
                id,
                version: Some(version),
                current_version,
                reason: Some(e.to_string()),
            }
        }
    }
}

/// A document of the wrong kind for its topic: its kind and why it is refused. Only the
/// header's `kind` is read (the rest is skipped), before anything is parsed for real.
fn wrong_topic(doc: &[u8], from_snapshot_topic: bool) -> Option<(&'static str, &'static str)> {
    #[derive(serde::Deserialize)]
    struct Head {
        kind: Option<String>,
    }
    let kind = serde_json::from_slice::<Head>(doc).ok()?.kind?;
    match (kind.as_str(), from_snapshot_topic) {
        ("snapshot", false) => Some((
            "snapshot",
            "a snapshot on sync/delta is refused: send snapshots in parts on sync/snapshot",
        )),
        ("delta", true) => Some((
            "delta",
            "a delta on sync/snapshot is refused: send deltas on sync/delta",
        )),
        _ => None,
    }
}
