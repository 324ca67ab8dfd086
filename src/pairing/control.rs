//! The local control socket for installers on site (docs/pairing.md, *Local control*): a Unix
//! stream socket (`[control] socket`, default [`DEFAULT_SOCKET`], mode 0660: only root and the
//! service's group can open it, so only they can pair) speaking newline-delimited JSON, one
//! answer line per request line:
//!
//! ```text
//! {"op":"status"}
//! {"op":"install_mode","action":"start","minutes":30}   {"op":"install_mode","action":"stop"}
//! {"op":"list"}
//! {"op":"adopt","spec":{"candidate":"osdp:bus-1:5","entry":"gate-1","direction":"in"}}
//! {"op":"remove","device":"osdp-bus-1-5"}
//! {"op":"export"}
//! ```
//!
//! Answers are `{"ok":true, …}` or `{"ok":false,"status":"refused"|"failed"|"malformed",
//! "reason":…,"error":…}`. Requests are at most [`MAX_LINE`] bytes. Who asked is the peer's uid
//! (SO_PEERCRED, through tokio) resolved to a name: `local:<user>` in the events.

use std::io::{BufRead as _, Write as _};
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::{AdoptSpec, PairError, Pairing, ScanOptions};
use crate::store::Store;

/// Where the daemon listens unless `[control] socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/gatehouse/control.sock";
/// Longest request line, in bytes.
pub const MAX_LINE: usize = 64 * 1024;
/// How long the CLI waits for an answer (an adoption provisions the device meanwhile).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);

/// What the socket serves.
pub struct Control {
    pub pairing: Arc<Pairing>,
    pub store: Arc<Store>,
    pub site: String,
    pub gateway: String,
}

/// Binds the socket at `path`: a stale socket file (no daemon answers on it) is replaced; one a
/// daemon answers on is an error; the mode is set to 0660.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "control socket `{}` is in use (another gatehouse runs?)",
                path.display()
            );
        }
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "control socket `{}`: a file that is not a socket is in the way",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale control socket `{}`", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket `{}`", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting the mode of `{}`", path.display()))?;
    Ok(listener)
}

/// Serves connections until `stop`, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    control: Arc<Control>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    let (control, stop) = (control.clone(), stop.clone());
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            r = connection(stream, &control) => if let Err(e) = r {
                                tracing::debug!("control connection: {e:#}");
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// The user name of a uid (from /etc/passwd), else the number.
pub fn user_name(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let id: u32 = f.nth(1)?.parse().ok()?;
                (id == uid && !name.is_empty()).then(|| name.to_string())
            })
        })
        .unwrap_or_else(|| format!("uid{uid}"))
}

async fn connection(stream: UnixStream, control: &Arc<Control>) -> anyhow::Result<()> {
    let uid = stream
        .peer_cred()
        .context("reading the peer's credentials")?
        .uid();
    let who = format!("local:{}", user_name(uid));
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let n = (&mut read)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let answer = if line.len() > MAX_LINE {
            malformed(format!("request longer than {MAX_LINE} bytes"))
        } else {
            match serde_json::from_slice::<Value>(&line) {
                Ok(req) => handle(control, req, &who).await,
                Err(e) => malformed(format!("not JSON: {}", crate::redact::serde(&e))),
            }
        };
        let mut bytes = serde_json::to_vec(&answer)?;
        bytes.push(b'\n');
        write.write_all(&bytes).await?;
        if line.len() > MAX_LINE {
            return Ok(());
        }
    }
}

fn malformed(error: String) -> Value {
    json!({"ok": false, "status": "malformed", "reason": "bad_request", "error": error})
}

fn refusal(e: PairError) -> Value {
    json!({"ok": false, "status": e.reason.status(), "reason": e.reason.as_str(),
           "error": e.detail})
}

/// Work for a blocking thread: the control and who asked.
type Job = Box<dyn FnOnce(&Control, &str) -> Value + Send>;

/// One request. Blocking work (flushes, provisioning) runs on a blocking thread.
pub async fn handle(control: &Arc<Control>, req: Value, who: &str) -> Value {
    let op = req.get("op").and_then(Value::as_str).unwrap_or_default();
    let (c, who) = (control.clone(), who.to_string());
    let blocking = |f: Job| async move {
        tokio::task::spawn_blocking(move || f(&c, &who))
            .await
            .unwrap_or_else(|e| {
                json!({"ok": false, "status": "failed", "reason": "internal",
                                       "error": e.to_string()})
            })
    };
    match op {
        "status" => {
            let (state, _) = control.pairing.documents();
            json!({
                "ok": true,
                "site": control.site,
                "gateway": control.gateway,
                "gatehouse": env!("CARGO_PKG_VERSION"),
                "site_version": control.store.site().version,
                "outbox": control.store.events().len(),
                "storage_ok": control.store.health().is_ok(),
                "install_mode": state,
            })
        }
        "list" => {
            let (state, _) = control.pairing.documents();
            json!({"ok": true, "state": state, "candidates": control.pairing.candidates(),
                   "registered": control.pairing.registered()})
        }
        "export" => json!({"ok": true,
                           "toml": super::registry::export_toml(&control.pairing.registered())}),
        "install_mode" => match req.get("action").and_then(Value::as_str) {
            Some("start") => {
                let Some(minutes) = req
                    .get("minutes")
                    .and_then(Value::as_u64)
                    .and_then(|m| u32::try_from(m).ok())
                else {
                    return malformed("start needs `minutes` (1 to 240)".into());
                };
                blocking(Box::new(move |c, who| {
                    match c.pairing.start(minutes, who, ScanOptions::default()) {
                        Ok(until) => json!({"ok": true, "until": until}),
                        Err(e) => refusal(e),
                    }
                }))
                .await
            }
            Some("stop") => {
                blocking(Box::new(
                    |c, who| json!({"ok": true, "was_active": c.pairing.stop(who)}),
                ))
                .await
            }
            _ => malformed("`action` must be start or stop".into()),
        },
        "adopt" => {
            let spec = match req.get("spec").cloned() {
                Some(v @ Value::Object(_)) => match serde_path_to_error::deserialize(v) {
                    Ok(s) => s,
                    Err(e) => {
                        return malformed(format!("spec: {}", crate::redact::serde_with_path(&e)));
                    }
                },
                _ => return malformed("adopt needs `spec`, an object".into()),
            };
            let spec: AdoptSpec = spec;
            blocking(Box::new(move |c, who| match c.pairing.adopt(&spec, who) {
                Ok(r) => json!({"ok": true, "device": r}),
                Err(e) => refusal(e),
            }))
            .await
        }
        "remove" => {
            let Some(device) = req
                .get("device")
                .and_then(Value::as_str)
                .map(str::to_string)
            else {
                return malformed("remove needs `device`".into());
            };
            blocking(Box::new(move |c, who| {
                match c.pairing.remove(&device, who) {
                    Ok(r) => json!({"ok": true, "removed": r.id}),
                    Err(e) => refusal(e),
                }
            }))
            .await
        }
        _ => malformed(
            "`op` must be one of status, install_mode, list, adopt, remove, export".into(),
        ),
    }
}

/// Why the CLI got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket, or nobody listening: the daemon is not running (or listens elsewhere).
    #[error(
        "the gatehouse daemon is not running (no control socket at `{}`: {reason}); start it, \
         or point to its socket with --socket or --config",
        .path.display()
    )]
    NotRunning { path: PathBuf, reason: String },
    /// The socket exists but this user may not open it.
    #[error(
        "cannot open the control socket `{}`: permission denied (run as root or as a member of \
         the service's group)",
        .path.display()
    )]
    Denied { path: PathBuf },
    #[error("talking to the daemon on `{}`: {reason}", .path.display())]
    Io { path: PathBuf, reason: String },
}

/// Sends one request and reads its answer (blocking; for the CLI).
pub fn request(path: &Path, req: &Value) -> Result<Value, ClientError> {
    use std::io::ErrorKind;
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => ClientError::NotRunning {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
        ErrorKind::PermissionDenied => ClientError::Denied {
            path: path.to_path_buf(),
        },
        _ => ClientError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    })?;
    let io = |e: std::io::Error| ClientError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(req).unwrap_or_default();
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| ClientError::Io {
        path: path.to_path_buf(),
        reason: format!("unreadable answer: {e}"),
    })
}
