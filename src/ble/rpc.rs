//! Online lock operations ask the cloud for command packets over the cloud link:
//! `ble/unlock_request` out, `ble/unlock_response` in (docs/mqtt-api.md). The lock itself
//! checks the packets (they are encrypted for its session), so the response needs no
//! signature of its own; the operation it serves was a signed command.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::noke::{self, PACKET_LEN};
use crate::cloud::commands::UnitAction;

/// Requests waiting for the link at most (beyond this the cloud is taken as away).
const QUEUE: usize = 64;

/// `ble/unlock_request`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnlockRequest {
    pub request_id: String,
    pub device: String,
    pub mac: String,
    /// `unlock`, `lock` or `locate`.
    pub action: String,
    /// The session characteristic just read, 40 hex digits.
    pub session: String,
}

/// `ble/unlock_response`: `commands` (20-byte packets in hex joined by `+`) or `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnlockResponse {
    pub request_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commands: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

type Answer = Result<Vec<[u8; PACKET_LEN]>, String>;

/// The BLE side of the exchange. The cloud link takes the requests from [`Self::take_requests`]
/// and hands responses to [`Self::on_response`].
pub struct CloudRpc {
    tx: mpsc::Sender<Vec<u8>>,
    rx: Mutex<Option<mpsc::Receiver<Vec<u8>>>>,
    pending: Mutex<HashMap<String, oneshot::Sender<Answer>>>,
    connected: Mutex<Option<std::sync::Arc<crate::cloud::link::LinkState>>>,
    /// Random per process run: request ids never repeat across restarts.
    run: u64,
    next: AtomicU64,
}

impl Default for CloudRpc {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        CloudRpc {
            tx,
            rx: Mutex::new(Some(rx)),
            pending: Mutex::new(HashMap::new()),
            connected: Mutex::new(None),
            run: {
                let mut b = [0u8; 8];
                // Without entropy, the time: still differs between runs.
                if getrandom::getrandom(&mut b).is_err() {
                    b = (std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos() as u64))
                    .to_le_bytes();
                }
                u64::from_le_bytes(b)
            },
            next: AtomicU64::new(1),
        }
    }
}

/// Removes a request from the pending table when dropped.
struct Pending<'a> {
    rpc: &'a CloudRpc,
    id: &'a str,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.rpc
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.id);
    }
}

impl CloudRpc {
    pub fn new() -> Self {
        Self::default()
    }

    /// The request channel, for the one link that serves it (or a test's cloud).
    pub fn take_requests(&self) -> Option<mpsc::Receiver<Vec<u8>>> {
        self.rx.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Ask only while this link is connected (without one, requests are queued for whoever
    /// took the channel: a test's cloud).
    pub fn set_link(&self, state: std::sync::Arc<crate::cloud::link::LinkState>) {
        *self.connected.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
    }

    fn link_up(&self) -> bool {
        match &*self.connected.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(s) => s.connected.load(Ordering::Relaxed),
            None => self.rx.lock().unwrap_or_else(|e| e.into_inner()).is_none(),
        }
    }

    /// Asks the cloud for the packets of `action` on this session. `Err` says why there are
    /// none (cloud away, no answer in time, the cloud's error, malformed packets).
    pub async fn request(
        &self,
        device: &str,
        mac: &str,
        action: UnitAction,
        session: &[u8; PACKET_LEN],
        timeout: Duration,
    ) -> Answer {
        if !self.link_up() {
            return Err("the cloud is unreachable".into());
        }
        // Unique across restarts (a late answer to an earlier run's request must not match).
        let id = format!(
            "ble-{:016x}-{}",
            self.run,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let req = UnlockRequest {
            request_id: id.clone(),
            device: device.to_string(),
            mac: mac.to_string(),
            action: match action {
                UnitAction::Unlock => "unlock",
                UnitAction::Lock => "lock",
                UnitAction::Locate => "locate",
            }
            .into(),
            session: hex::encode_upper(session),
        };
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), tx);
        // Removed however this ends (answered, timed out, or the operation dropped).
        let _pending = Pending { rpc: self, id: &id };
        let bytes = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        let sent = self.tx.try_send(bytes).is_ok();
        if sent {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(a)) => a,
                Ok(Err(_)) => Err("the request was dropped".into()),
                Err(_) => Err(format!(
                    "the cloud did not answer within {} ms",
                    timeout.as_millis()
                )),
            }
        } else {
            Err("the cloud link is not taking requests".into())
        }
    }

    /// A message from `ble/unlock_response`. Malformed or unknown ones are logged and ignored.
    pub fn on_response(&self, bytes: &[u8]) {
        let resp: UnlockResponse = match serde_json::from_slice(bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("malformed ble/unlock_response ignored: {e}");
                return;
            }
        };
        let Some(tx) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&resp.request_id)
        else {
            tracing::debug!(request_id = %resp.request_id, "late or unknown unlock response ignored");
            return;
        };
        let answer = match (resp.commands, resp.error) {
            (Some(c), None) => {
                noke::parse_command_packets(&c).map_err(|e| format!("the cloud's packets: {e}"))
            }
            (None, Some(e)) => Err(format!("the cloud refused: {e}")),
            _ => Err("the cloud's response has neither or both of commands and error".into()),
        };
        let _ = tx.send(answer);
    }
}

/// The cloud link carries the requests without knowing they are BLE.
impl crate::cloud::link::DeviceRpc for CloudRpc {
    fn attach(&self, link: std::sync::Arc<crate::cloud::link::LinkState>) {
        self.set_link(link);
    }

    fn on_response(&self, payload: &[u8]) {
        CloudRpc::on_response(self, payload);
    }
}
