//! The MQTT messages between the gateway and the cloud, as JSON. `docs/mqtt-api.md` and
//! `docs/schemas/mqtt-*.schema.json` describe the same shapes for the cloud team; keep the three
//! in step. Topics are under `<prefix>/<site>/<gateway>/` (see [`Topics`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Topic names for one gateway.
#[derive(Debug, Clone)]
pub struct Topics {
    base: String,
}

impl Topics {
    pub fn new(prefix: &str, site: &str, gateway: &str) -> Self {
        Topics {
            base: format!("{prefix}/{site}/{gateway}"),
        }
    }
    pub fn base(&self) -> &str {
        &self.base
    }
    /// Retained; also the last will.
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }
    /// Retained: the gateway's health, every 60 s and on change.
    pub fn health(&self) -> String {
        format!("{}/health", self.base)
    }
    /// Retained: the active alerts (docs/automation.md), republished after every connection.
    pub fn alerts(&self) -> String {
        format!("{}/alerts", self.base)
    }
    pub fn events(&self) -> String {
        format!("{}/events", self.base)
    }
    /// `pairing/state` and `pairing/discovered` (retained; docs/pairing.md).
    pub fn pairing_state(&self) -> String {
        format!("{}/pairing/state", self.base)
    }
    pub fn pairing_discovered(&self) -> String {
        format!("{}/pairing/discovered", self.base)
    }
    pub fn device_state(&self, device: &str) -> String {
        format!("{}/devices/{device}/state", self.base)
    }
    /// Out: a BLE lock operation asks the cloud for its command packets.
    pub fn ble_unlock_request(&self) -> String {
        format!("{}/ble/unlock_request", self.base)
    }
    /// In: the cloud's command packets (or its refusal) for a request.
    pub fn ble_unlock_response(&self) -> String {
        format!("{}/ble/unlock_response", self.base)
    }
    pub fn sync_snapshot(&self) -> String {
        format!("{}/sync/snapshot", self.base)
    }
    pub fn sync_delta(&self) -> String {
        format!("{}/sync/delta", self.base)
    }
    pub fn sync_result(&self) -> String {
        format!("{}/sync/result", self.base)
    }
    /// Subscription filter for every command.
    pub fn commands_filter(&self) -> String {
        format!("{}/cmd/+", self.base)
    }
    pub fn command_result(&self, name: &str) -> String {
        format!("{}/cmd/{name}/result", self.base)
    }
    /// The command name of a `.../cmd/<name>` topic.
    pub fn command_name<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let rest = topic.strip_prefix(&self.base)?.strip_prefix("/cmd/")?;
        (!rest.is_empty() && !rest.contains('/')).then_some(rest)
    }
}

/// `status`, retained. The last will is the same shape with `online: false`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub online: bool,
    pub site: String,
    pub gateway: String,
    /// Increases by one at every daemon start, persisted (a late will of an older session can be
    /// told apart from the current one).
    pub session: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gatehouse_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub site_version: Option<u64>,
    /// Events waiting in the outbox when this status was published.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub outbox: Option<u64>,
    /// Whether the gateway's database takes writes (republished when it changes).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub storage: Option<StorageStatus>,
}

/// `status.storage`: `ok`, or `failed` (a full disk): every access decision is refused and every
/// command fails with reason `storage` until the disk takes writes again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageStatus {
    /// `ok` or `failed`.
    pub state: String,
    /// When it failed (UTC); `failed` only.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub since: Option<DateTime<Utc>>,
    /// What the gateway was doing when the failure was noticed; `failed` only.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub what: Option<String>,
    /// The storage error; `failed` only.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

impl From<crate::store::Health> for StorageStatus {
    fn from(h: crate::store::Health) -> Self {
        match h {
            crate::store::Health::Ok => StorageStatus {
                state: "ok".into(),
                since: None,
                what: None,
                error: None,
            },
            crate::store::Health::Failed { since, what, error } => StorageStatus {
                state: "failed".into(),
                since: Some(since),
                what: Some(what),
                error: Some(error),
            },
        }
    }
}

/// `health`, retained, QoS 1: published at every connection, every 60 s, and within 5 s of a
/// change of `cloud`-independent state (store health, a device going online or offline).
/// Counters run from the daemon's start (`uptime_s`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub site: String,
    pub gateway: String,
    /// The daemon's session (as in `status`).
    pub session: u64,
    /// When this was measured (UTC).
    pub at: DateTime<Utc>,
    pub gatehouse_version: String,
    /// Seconds since the daemon started.
    pub uptime_s: u64,
    pub site_version: u64,
    pub outbox: HealthOutbox,
    pub cloud: HealthCloud,
    /// `ok` or `failed`, as `status.storage`.
    pub storage: StorageStatus,
    pub decisions: HealthDecisions,
    /// Devices per bus id (`ble` for BLE devices): how many answer, of those the gateway has
    /// seen or polled since it started and still runs. Every started bus is listed (0 of 0
    /// while it has no devices).
    pub buses: std::collections::BTreeMap<String, HealthBus>,
    /// Site automation's counters (docs/automation.md).
    pub automation: HealthAutomation,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthAutomation {
    /// Facts the drivers reported that a full automation queue dropped (never blocking them).
    pub facts_dropped: u64,
    /// Facts from devices, entries or units the site does not know (ignored).
    pub facts_unknown: u64,
    /// Alerts active now (as on `alerts`).
    pub alerts_active: u64,
}

/// Most alerts one `alerts` message lists (the rest are counted in `total`).
pub const MAX_PUBLISHED_ALERTS: usize = 200;

/// `alerts`, retained, QoS 1: the active alerts once durable, after every connection and
/// within a second or so of a change (docs/automation.md, docs/mqtt-api.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsMessage {
    pub site: String,
    pub gateway: String,
    /// When this set was published (UTC).
    pub at: DateTime<Utc>,
    /// Active alerts in all (`alerts` holds at most [`MAX_PUBLISHED_ALERTS`] of them).
    pub total: u64,
    /// The active alerts, oldest raise first.
    pub alerts: Vec<crate::automation::lifecycle::ActiveAlert>,
}

impl AlertsMessage {
    /// The message for `active` (any order): the oldest [`MAX_PUBLISHED_ALERTS`] raises.
    pub fn new(
        site: &str,
        gateway: &str,
        active: &[crate::automation::lifecycle::ActiveAlert],
    ) -> AlertsMessage {
        let mut alerts: Vec<_> = active.to_vec();
        alerts.sort_by(|a, b| a.raised_at.cmp(&b.raised_at).then(a.id.cmp(&b.id)));
        alerts.truncate(MAX_PUBLISHED_ALERTS);
        AlertsMessage {
            site: site.to_string(),
            gateway: gateway.to_string(),
            at: Utc::now(),
            total: active.len() as u64,
            alerts,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthOutbox {
    /// Events not yet acknowledged by the broker.
    pub events: u64,
    /// Age of the oldest of them in seconds (0 when empty).
    pub oldest_age_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCloud {
    /// Connection attempts after the first since the daemon started.
    pub reconnects: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthDecisions {
    pub granted: u64,
    pub denied: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthBus {
    pub online: u32,
    pub total: u32,
}

/// One event on `events` (QoS 1). At least once, in order; drop duplicates by `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventMessage {
    /// Unique for this gateway's database forever: `<database epoch>-<seq>`.
    pub id: String,
    pub seq: u64,
    pub kind: String,
    /// When it happened on site (UTC), whenever it is delivered.
    pub at: DateTime<Utc>,
    /// The same instant in the facility's time zone.
    pub local: String,
    /// True when delivered late: recorded before the current connection came up.
    pub historical: bool,
    pub payload: serde_json::Value,
}

/// One part of a snapshot on `sync/snapshot`. A snapshot of any size is sent as `count` parts
/// with the same `id`, each carrying a slice of the snapshot's JSON bytes in `data` (base64).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotChunk {
    pub id: String,
    pub index: u32,
    pub count: u32,
    /// Hex SHA-256 of the whole snapshot document (all parts joined).
    pub sha256: String,
    /// Standard base64 of this part's bytes.
    pub data: String,
}

/// `sync/result`: what happened to a snapshot or delta.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncResult {
    /// `applied`, `resync_needed` or `refused`.
    pub status: String,
    /// `snapshot` or `delta` (absent when the document could not be read).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kind: Option<String>,
    /// The snapshot transfer id, for snapshots.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<String>,
    /// The version the document carried, when readable.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub version: Option<u64>,
    /// The site's version after this message.
    pub current_version: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
}

/// A signed command on `cmd/<name>`: `payload` is base64url (no padding) of the command's JSON
/// ([`Command`]); `signature` is base64url Ed25519 over `"gatehouse-command-v1\0" || payload
/// bytes`. The bytes signed are exactly the bytes carried: no canonical JSON is needed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedCommand {
    pub payload: String,
    pub signature: String,
}

pub const COMMAND_CONTEXT: &[u8] = b"gatehouse-command-v1\0";

/// The `v` of the commands this gateway reads. Version 1 (no `site`/`gateway`) is refused as
/// `unsupported_version`.
pub const COMMAND_VERSION: u32 = 2;

/// What a command asks, inside the signed payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// [`COMMAND_VERSION`].
    pub v: u32,
    /// The site the command is for: the gateway's configured `site.id`. A command names its
    /// audience so that one captured at one site cannot be replayed at another.
    pub site: String,
    /// The gateway the command is for: the gateway's configured `site.gateway_id`.
    pub gateway: String,
    /// Unique per command; results echo it; replays of it are refused.
    pub id: String,
    /// Must equal the `<name>` of the topic.
    pub name: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    #[serde(default)]
    pub target: Option<CommandTarget>,
    #[serde(default)]
    pub args: serde_json::Value,
}

/// Exactly one of `unit`, `entry`, `device` (+ `channel` for a relay output).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandTarget {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub unit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub entry: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub channel: Option<u16>,
}

/// `cmd/<name>/result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandResult {
    /// The command's id; absent only for a `malformed` command whose id could not be read.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<String>,
    /// `true` when the command's id was longer than 128 characters: `id` is then its first 128
    /// characters; match it as a prefix.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id_truncated: Option<bool>,
    pub name: String,
    /// `done`, `queued`, `refused`, `failed`, `expired` or `malformed`.
    pub status: String,
    /// Why, for `refused`, `failed`, `expired`, `malformed` (a stable snake_case word).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// Free-form details (e.g. a device's error text).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    pub at: DateTime<Utc>,
}
