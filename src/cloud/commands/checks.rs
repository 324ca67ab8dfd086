//! Refusals and verification: the stable [`Reason`]s and [`Refusal`] a command is answered
//! with when it is not executed, and [`verify`], the checks in order (size, envelope,
//! signature, version, fields, audience, name, times) of the module's "Order of checks"; the
//! id probes that let a refusal echo the payload's `id`; [`sign`] and [`sign_payload`] (the
//! cloud's side, for tests and tools).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer as _, SigningKey};
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

use super::{CommandConfig, MAX_ID_LEN};
use crate::cloud::messages::{
    COMMAND_CONTEXT, COMMAND_VERSION, Command, CommandResult, SignedCommand,
};

/// The `status` of a command refused before it could be executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalStatus {
    /// The message cannot be read as a command of this protocol.
    Malformed,
    /// The command was read but will not be executed.
    Refused,
}

impl RefusalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalStatus::Malformed => "malformed",
            RefusalStatus::Refused => "refused",
        }
    }
}

/// Why a command was not executed. [`Reason::as_str`] is the stable `reason` of the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Longer than the configured maximum (malformed).
    TooLarge,
    /// Not a JSON object with a string `payload` (malformed).
    NotJson,
    /// `payload` is not base64url of a JSON object of the [`Command`] shape (malformed).
    BadPayload,
    /// No signature, or not 64 bytes of base64url.
    Unsigned,
    /// The signature does not verify with the cloud's command key.
    BadSignature,
    /// `v` is not [`COMMAND_VERSION`] (malformed).
    UnsupportedVersion,
    /// `site` or `gateway` is not this gateway's (the command is for another gateway).
    WrongGateway,
    /// `name` differs from the topic's name.
    NameMismatch,
    /// `expires_at` has passed.
    Expired,
    /// `issued_at` is further in the future than the allowed clock skew.
    IssuedInFuture,
    /// `expires_at` is not after `issued_at` (malformed).
    BadTimes,
    /// A name this gateway does not know.
    UnknownCommand,
    /// A target of the wrong kind for the command (or one where none is expected).
    BadTarget,
    /// An `emergency_unlock` without a reason from [`EmergencyReason`](super::EmergencyReason).
    BadReason,
    /// Arguments missing, out of range or unknown.
    BadArgs,
    /// The unit, entry or relay device does not exist here.
    UnknownTarget,
    /// The unit has no controller, the entry no relay, or the device is not configured here.
    NoController,
    /// The device is offline.
    TargetOffline,
    /// The id was seen before and its outcome is not known (see the module docs).
    Duplicate,
    /// Too many commands are already waiting for sleeping devices.
    QueueFull,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TooLarge => "too_large",
            Reason::NotJson => "not_json",
            Reason::BadPayload => "bad_payload",
            Reason::Unsigned => "unsigned",
            Reason::BadSignature => "bad_signature",
            Reason::UnsupportedVersion => "unsupported_version",
            Reason::WrongGateway => "wrong_gateway",
            Reason::NameMismatch => "name_mismatch",
            Reason::Expired => "expired",
            Reason::IssuedInFuture => "issued_in_future",
            Reason::BadTimes => "bad_times",
            Reason::UnknownCommand => "unknown_command",
            Reason::BadTarget => "bad_target",
            Reason::BadReason => "bad_reason",
            Reason::BadArgs => "bad_args",
            Reason::UnknownTarget => "unknown_target",
            Reason::NoController => "no_controller",
            Reason::TargetOffline => "target_offline",
            Reason::Duplicate => "duplicate",
            Reason::QueueFull => "queue_full",
        }
    }

    pub fn status(self) -> RefusalStatus {
        match self {
            Reason::TooLarge
            | Reason::NotJson
            | Reason::BadPayload
            | Reason::UnsupportedVersion
            | Reason::BadTimes => RefusalStatus::Malformed,
            _ => RefusalStatus::Refused,
        }
    }
}

/// A command that was not executed: why, and its id when it could be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("command {}: {}", .reason.status().as_str(), .reason.as_str())]
pub struct Refusal {
    pub reason: Reason,
    /// The command's id, when it could be read (not necessarily authentic before the signature
    /// check passed).
    pub id: Option<String>,
    /// Free-form details for people.
    pub detail: Option<String>,
}

impl Refusal {
    pub fn new(reason: Reason, id: Option<String>) -> Self {
        Refusal {
            reason,
            id,
            detail: None,
        }
    }

    pub(super) fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// `refused` or `malformed`.
    pub fn status(&self) -> RefusalStatus {
        self.reason.status()
    }

    /// The result to publish; `name` is the topic's command name.
    pub fn to_result(&self, name: &str, at: DateTime<Utc>) -> CommandResult {
        let (id, id_truncated) = match &self.id {
            Some(id) if id.chars().count() > MAX_ID_LEN => {
                (Some(cut_id(id).to_string()), Some(true))
            }
            id => (id.clone(), None),
        };
        CommandResult {
            id,
            id_truncated,
            name: name.to_string(),
            status: self.status().as_str().to_string(),
            reason: Some(self.reason.as_str().to_string()),
            detail: self.detail.clone(),
            at,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Verification

/// Reads the `id` member of a JSON object as far as the text can be read: it is kept even when
/// the text is cut short or invalid after it.
struct IdProbe<'a>(&'a mut Option<String>);

impl<'de> DeserializeSeed<'de> for IdProbe<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for IdProbe<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == "id" && self.0.is_none() {
                // Kept whatever its length (the text it comes from is bounded): a result shows
                // an over-long id cut, with `id_truncated`.
                if let Value::String(s) = map.next_value::<Value>()?
                    && !s.is_empty()
                {
                    *self.0 = Some(s);
                }
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// An id cut to its first [`MAX_ID_LEN`] characters (the limit counts characters).
fn cut_id(id: &str) -> &str {
    match id.char_indices().nth(MAX_ID_LEN) {
        Some((end, _)) => &id[..end],
        None => id,
    }
}

/// The id of a message too large to be read whole: the envelope is scanned for its `payload`
/// string (nothing else is kept), and only the first `max_bytes` of the payload are decoded.
fn probe_large_id(bytes: &[u8], max_bytes: usize) -> Option<String> {
    struct Payload<'a, 'de>(&'a mut Option<&'de str>);
    impl<'de> DeserializeSeed<'de> for Payload<'_, 'de> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Payload<'_, 'de> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<&'de str>()? {
                if key == "payload" && self.0.is_none() {
                    *self.0 = Some(map.next_value::<&'de str>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(())
        }
    }
    let mut payload = None;
    let _ = Payload(&mut payload).deserialize(&mut serde_json::Deserializer::from_slice(bytes));
    let b64 = payload?.trim();
    // Whole groups of 4 characters decode without padding.
    let take = (max_bytes.div_ceil(3) * 4).min(b64.len() / 4 * 4);
    let prefix = URL_SAFE_NO_PAD.decode(b64.get(..take)?).ok()?;
    probe_id(&prefix)
}

fn probe_id(payload: &[u8]) -> Option<String> {
    let mut id = None;
    let _ = IdProbe(&mut id).deserialize(&mut serde_json::Deserializer::from_slice(payload));
    id
}

/// Checks a command message in the order given in the module docs and returns the authentic
/// command. `topic_name` is the `<name>` of the `cmd/<name>` topic it came on; `cfg` gives the
/// command key, this gateway's site and gateway ids (the audience a command must name), the
/// allowed clock skew and the size limit.
pub fn verify(
    bytes: &[u8],
    topic_name: &str,
    cfg: &CommandConfig,
    now: DateTime<Utc>,
) -> Result<Command, Refusal> {
    let (public, max_skew, max_bytes) = (&cfg.public, cfg.max_skew, cfg.max_bytes);
    use Reason::*;
    if bytes.len() > max_bytes {
        return Err(
            Refusal::new(TooLarge, probe_large_id(bytes, max_bytes)).detail(format!(
                "{} bytes, at most {max_bytes} accepted",
                bytes.len()
            )),
        );
    }
    let envelope: serde_json::Map<String, Value> =
        serde_json::from_slice(bytes).map_err(|_| Refusal::new(NotJson, None))?;
    let payload_b64 = envelope
        .get("payload")
        .and_then(Value::as_str)
        .ok_or_else(|| Refusal::new(NotJson, None).detail("no string `payload`"))?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload_b64.trim())
        .map_err(|_| Refusal::new(BadPayload, None).detail("payload is not base64url"))?;
    let id = probe_id(&payload);
    let refuse = |reason: Reason| Refusal::new(reason, id.clone());
    let object: serde_json::Map<String, Value> = serde_json::from_slice(&payload)
        .map_err(|e| refuse(BadPayload).detail(format!("payload: {}", crate::redact::serde(&e))))?;

    let signature = envelope
        .get("signature")
        .and_then(Value::as_str)
        .and_then(|s| URL_SAFE_NO_PAD.decode(s.trim()).ok())
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .ok_or_else(|| refuse(Unsigned))?;
    let mut signed = Vec::with_capacity(COMMAND_CONTEXT.len() + payload.len());
    signed.extend_from_slice(COMMAND_CONTEXT);
    signed.extend_from_slice(&payload);
    public
        .verify_strict(&signed, &Signature::from_bytes(&signature))
        .map_err(|_| refuse(BadSignature))?;

    match object.get("v") {
        Some(Value::Number(n)) if n.as_u64() == Some(u64::from(COMMAND_VERSION)) => {}
        Some(Value::Number(n)) => {
            let n = match n.as_u64() {
                Some(n) if n < 1000 => n.to_string(),
                _ => "(not shown)".to_string(),
            };
            return Err(refuse(UnsupportedVersion).detail(format!(
                "v {n}, this gateway reads {COMMAND_VERSION} (commands name their site and gateway)"
            )));
        }
        _ => return Err(refuse(BadPayload).detail("`v` is missing or not a number")),
    }
    let cmd: Command = serde_path_to_error::deserialize(Value::Object(object)).map_err(|e| {
        refuse(BadPayload).detail(format!("payload: {}", crate::redact::serde_with_path(&e)))
    })?;
    let id_chars = cmd.id.chars().count();
    if id_chars == 0 || id_chars > MAX_ID_LEN {
        return Err(refuse(BadPayload).detail(format!("id must be 1 to {MAX_ID_LEN} characters")));
    }
    // The audience, before anything else: a command for another site or gateway is not ours.
    if cmd.site != cfg.site || cmd.gateway != cfg.gateway {
        return Err(refuse(WrongGateway).detail(format!(
            "the command is for site {} gateway {}, this is site {} gateway {}",
            crate::redact::excerpt(&cmd.site),
            crate::redact::excerpt(&cmd.gateway),
            crate::redact::excerpt(&cfg.site),
            crate::redact::excerpt(&cfg.gateway),
        )));
    }
    if cmd.name != topic_name {
        return Err(refuse(NameMismatch).detail(format!(
            "payload names {}, topic {}",
            crate::redact::excerpt(&cmd.name),
            crate::redact::excerpt(topic_name)
        )));
    }
    if cmd.expires_at <= now {
        return Err(refuse(Expired).detail(format!("expired at {}", cmd.expires_at)));
    }
    let latest = now
        .checked_add_signed(max_skew)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    if cmd.issued_at > latest {
        return Err(refuse(IssuedInFuture).detail(format!("issued at {}", cmd.issued_at)));
    }
    if cmd.expires_at <= cmd.issued_at {
        return Err(refuse(BadTimes).detail("expires_at is not after issued_at"));
    }
    Ok(cmd)
}

/// Signs a command as the cloud does. For tests and the demo.
pub fn sign(cmd: &Command, signer: &SigningKey) -> Vec<u8> {
    sign_payload(
        &serde_json::to_vec(cmd).expect("a command serialises"),
        signer,
    )
}

/// Signs arbitrary payload bytes into an envelope (tests use it to sign damaged payloads).
pub fn sign_payload(payload: &[u8], signer: &SigningKey) -> Vec<u8> {
    let mut msg = COMMAND_CONTEXT.to_vec();
    msg.extend_from_slice(payload);
    let sig = signer.sign(&msg);
    serde_json::to_vec(&SignedCommand {
        payload: URL_SAFE_NO_PAD.encode(payload),
        signature: URL_SAFE_NO_PAD.encode(sig.to_bytes()),
    })
    .expect("an envelope serialises")
}
