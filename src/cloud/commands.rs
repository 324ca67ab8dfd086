//! Commands from the cloud (`cmd/<name>`): verification, target resolution, routing to devices,
//! and exactly-once handling.
//!
//! # Signature scheme
//!
//! A command arrives as the JSON envelope [`SignedCommand`] `{"payload": B64, "signature": B64}`
//! (base64url, no padding; surrounding whitespace is ignored). `payload` is the JSON of a
//! [`Command`]; `signature` is Ed25519 (checked strictly, RFC 8032 with the canonical-encoding
//! checks of `verify_strict`) over [`COMMAND_CONTEXT`] `|| payload bytes`, made with the cloud's
//! command key. The bytes signed are exactly the bytes carried, so no canonical JSON is needed.
//! This is the scheme of offline digital keys (`policy::digital_key`) with another context
//! string, so a key can never be replayed as a command or the other way round.
//!
//! # Order of checks ([`verify`])
//!
//! Each check either passes or ends handling with a result whose `status` is `malformed` or
//! `refused` and whose `reason` is the stable word in brackets ([`Reason`]):
//! (no refusal's `detail` quotes a value of the payload other than short, marked excerpts of
//! identifiers: see [`crate::redact`])
//!
//! 1. the message is at most `max_bytes` long (`malformed`, `too_large`; only the envelope's
//!    `payload` is looked for and its first `max_bytes` decoded, for an id to echo);
//! 2. it is a JSON object with a string `payload` (`malformed`, `not_json`);
//! 3. `payload` is base64url of a JSON object (`malformed`, `bad_payload`); from here on the
//!    result echoes the payload's `id` whenever one can be read, even from a payload that is
//!    cut short or otherwise invalid (an id over [`MAX_ID_LEN`] characters is cut to it, with
//!    `id_truncated`);
//! 4. `signature` is present and is base64url of 64 bytes (`refused`, `unsigned`);
//! 5. the signature verifies (`refused`, `bad_signature`);
//! 6. `v` is [`COMMAND_VERSION`] (`malformed`, `unsupported_version`);
//! 7. the payload has the fields of [`Command`], nothing more, and an `id` of 1 to
//!    [`MAX_ID_LEN`] characters (`malformed`, `bad_payload`); then (7a in docs/mqtt-api.md)
//!    `site` and `gateway` are this gateway's ([`CommandConfig::site`], `gateway`): the
//!    audience, checked before anything else is done (`refused`, `wrong_gateway`);
//! 8. `name` equals the `<name>` of the topic it came on (`refused`, `name_mismatch`);
//! 9. `expires_at > now` (`refused`, `expired`);
//! 10. `issued_at <= now + max_skew` (`refused`, `issued_in_future`);
//! 11. `expires_at > issued_at` (`malformed`, `bad_times`).
//!
//! A command that passes is *authentic*. [`handle`] then claims its id in the store's
//! [`CommandLog`](crate::store::CommandLog) **before** doing anything else: an id is used once,
//! whatever happens next. A second delivery of a claimed id (MQTT redelivery, replay) is
//! answered with the result stored for the first one and is not executed; if no result was
//! stored (the first delivery is still being handled, or the process died while handling it)
//! it is refused as `duplicate`. Messages that fail verification are never claimed, so a forged
//! or damaged message cannot use up the id of a genuine command. Claiming before the target
//! checks also means a command refused as, say, `target_offline` stays refused when it is
//! delivered again after the device came back: the cloud sends a new command (new id) to retry.
//!
//! After the claim, [`parse`] reads the name and arguments (`unknown_command`, `bad_target`,
//! `bad_reason`, `bad_args`), [`resolve`] checks the target against the current site
//! (`unknown_target`, `no_controller`), and the [`Router`] checks the device
//! (`no_controller` when the site names a device this gateway does not have, `unknown_target`
//! for a raw relay device it does not have, `target_offline`) and executes it.
//!
//! # Results
//!
//! Every message gets exactly one [`CommandResult`] from [`handle`], to be published on
//! `cmd/<name>/result` where `<name>` is [`CommandResult::name`] (the topic's name). A command
//! for a sleeping device is answered `queued`; its final result (`done`, `failed`, or `expired`
//! with reason `target_asleep`) comes later from [`handle_wake`] or [`handle_expire`], under the
//! same id, and is published on the same topic. Device errors are `failed` with reason
//! `device_error` and the device's text in `detail`; a store failure at claim time is `failed`
//! with reason `storage` (nothing was executed).
//!
//! # Commands
//!
//! | name               | target               | args                                                   |
//! |--------------------|----------------------|--------------------------------------------------------|
//! | `unlock`           | `unit` or `entry`    | none                                                   |
//! | `emergency_unlock` | `unit` or `entry`    | `reason` (one of [`EmergencyReason`]), `note` optional  |
//! | `lock`             | `unit`               | none                                                   |
//! | `locate`           | `unit`               | none                                                   |
//! | `relay`            | `device` + `channel` | `action`: `pulse` (`ms` 100..=60000, default 3000), `on`, `off` |
//! | `install_mode`     | none                 | `action`: `start` with `minutes` 1..=240, or `stop`    |
//! | `adopt`            | none                 | an [`AdoptSpec`] (`candidate`, `device`, `entry`, …; `replaces` for a replacement) |
//! | `remove`           | none                 | `device`: an adopted device's id                       |
//! | `resync`           | none                 | none                                                   |
//! | `ping`             | none                 | none                                                   |
//!
//! `args` is absent, `null` or an object; keys other than those listed are refused
//! (`bad_args`). An entry is unlocked by pulsing its relay for the entry's `pulse_ms`.
//!
//! With installer pairing ([`Router::with_pairing`]), `install_mode` starts and stops
//! [`Pairing`]'s install mode (which records `install_mode_started`/`install_mode_ended`), and
//! `adopt`/`remove` go to [`Pairing::adopt`]/[`Pairing::remove`]: their refusals (`refused`) and
//! failures (`failed`) carry the reasons of [`crate::pairing::PairReason`]. Without it, `adopt`
//! and `remove` are refused as `not_in_install_mode`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::Serialize;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

use super::messages::{
    COMMAND_CONTEXT, COMMAND_VERSION, Command, CommandResult, CommandTarget, SignedCommand,
};
use crate::pairing::{AdoptSpec, PairError, Pairing, ScanOptions};
use crate::site::Tables;
use crate::store::{Claim, Store};

/// Longest command id accepted, in characters (Unicode scalar values, as JSON Schema's
/// `maxLength` counts them).
pub const MAX_ID_LEN: usize = 128;
/// Longest `note` of an emergency unlock, in characters (as [`MAX_ID_LEN`]).
pub const MAX_NOTE_LEN: usize = 500;
/// Commands waiting for sleeping devices, at most (more are refused as `queue_full`).
pub const MAX_PENDING: usize = 256;
/// Default pulse of a `relay` command without `ms`.
pub const DEFAULT_PULSE_MS: u32 = 3000;
/// Bounds of a `relay` pulse.
pub const PULSE_MS: std::ops::RangeInclusive<u32> = 100..=60_000;
/// Bounds of `install_mode` `minutes`.
pub const INSTALL_MINUTES: std::ops::RangeInclusive<u32> = 1..=240;

// ---------------------------------------------------------------------------------------------
// Refusals

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
    /// An `emergency_unlock` without a reason from [`EmergencyReason`].
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

    fn detail(mut self, detail: impl Into<String>) -> Self {
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

// ---------------------------------------------------------------------------------------------
// Commands, parsed

/// The command names this gateway executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandName {
    Unlock,
    EmergencyUnlock,
    Lock,
    Locate,
    Relay,
    InstallMode,
    Resync,
    Ping,
    Adopt,
    Remove,
}

impl CommandName {
    pub const ALL: [CommandName; 10] = [
        CommandName::Unlock,
        CommandName::EmergencyUnlock,
        CommandName::Lock,
        CommandName::Locate,
        CommandName::Relay,
        CommandName::InstallMode,
        CommandName::Resync,
        CommandName::Ping,
        CommandName::Adopt,
        CommandName::Remove,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandName::Unlock => "unlock",
            CommandName::EmergencyUnlock => "emergency_unlock",
            CommandName::Lock => "lock",
            CommandName::Locate => "locate",
            CommandName::Relay => "relay",
            CommandName::InstallMode => "install_mode",
            CommandName::Resync => "resync",
            CommandName::Ping => "ping",
            CommandName::Adopt => "adopt",
            CommandName::Remove => "remove",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|n| n.as_str() == s)
    }
}

/// Why an emergency unlock (*Emergency Unlock Override*) is needed: a fixed list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EmergencyReason {
    /// `tenant_locked_phone_in_unit`
    TenantLockedPhoneInUnit,
    /// `tenant_lost_phone`
    TenantLostPhone,
    /// `medical_emergency`
    MedicalEmergency,
    /// `fire_or_safety`
    FireOrSafety,
    /// `device_malfunction`
    DeviceMalfunction,
    /// `other` (say what in `note`)
    Other,
}

impl EmergencyReason {
    pub const ALL: [EmergencyReason; 6] = [
        EmergencyReason::TenantLockedPhoneInUnit,
        EmergencyReason::TenantLostPhone,
        EmergencyReason::MedicalEmergency,
        EmergencyReason::FireOrSafety,
        EmergencyReason::DeviceMalfunction,
        EmergencyReason::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EmergencyReason::TenantLockedPhoneInUnit => "tenant_locked_phone_in_unit",
            EmergencyReason::TenantLostPhone => "tenant_lost_phone",
            EmergencyReason::MedicalEmergency => "medical_emergency",
            EmergencyReason::FireOrSafety => "fire_or_safety",
            EmergencyReason::DeviceMalfunction => "device_malfunction",
            EmergencyReason::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// The reason (and optional note) of an emergency unlock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Emergency {
    pub reason: EmergencyReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What an unlock is for: serialises as `{"unit": "A-101"}` or `{"entry": "gate-1"}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetRef {
    Unit(String),
    Entry(String),
}

/// What a unit controller (padlock) is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitAction {
    Unlock,
    Lock,
    /// Beep/flash so that staff can find it.
    Locate,
}

/// What a relay output is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelayOp {
    /// On for `ms` milliseconds, then off.
    Pulse {
        ms: u32,
    },
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstallMode {
    Start { minutes: u32 },
    Stop,
}

/// A command's name, target and arguments, checked for shape (not yet against the site).
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `unlock`, or `emergency_unlock` when `emergency` is set.
    Unlock {
        target: TargetRef,
        emergency: Option<Emergency>,
    },
    Lock {
        unit: String,
    },
    Locate {
        unit: String,
    },
    Relay {
        device: String,
        channel: u16,
        op: RelayOp,
    },
    InstallMode(InstallMode),
    Resync,
    Ping,
    /// `adopt` (a replacement when `replaces` is set).
    Adopt(Box<AdoptSpec>),
    /// `remove` an adopted device.
    Remove {
        device: String,
    },
}

enum Shape<'a> {
    None,
    Unit(&'a str),
    Entry(&'a str),
    Device(&'a str, u16),
    Other,
}

fn shape(t: &Option<CommandTarget>) -> Shape<'_> {
    let Some(t) = t else { return Shape::None };
    match (&t.unit, &t.entry, &t.device, t.channel) {
        (None, None, None, None) => Shape::None,
        (Some(u), None, None, None) => Shape::Unit(u),
        (None, Some(e), None, None) => Shape::Entry(e),
        (None, None, Some(d), Some(c)) => Shape::Device(d, c),
        _ => Shape::Other,
    }
}

/// The object of `args` (empty for `null`), with only the `allowed` keys.
fn args_object(
    args: &Value,
    allowed: &[&str],
    id: &str,
) -> Result<serde_json::Map<String, Value>, Refusal> {
    let bad = || Refusal::new(Reason::BadArgs, Some(id.to_string()));
    let map = match args {
        Value::Null => serde_json::Map::new(),
        Value::Object(m) => m.clone(),
        _ => return Err(bad().detail("args must be an object")),
    };
    if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad().detail(format!("unknown argument {}", crate::redact::name(k))));
    }
    Ok(map)
}

fn bounded_u32(
    v: Option<&Value>,
    range: &std::ops::RangeInclusive<u32>,
) -> Result<Option<u32>, ()> {
    match v {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| range.contains(n))
            .map(Some)
            .ok_or(()),
    }
}

/// Reads the name, target shape and arguments of an authentic command.
pub fn parse(cmd: &Command) -> Result<Request, Refusal> {
    let id = || Some(cmd.id.clone());
    let refuse = |r: Reason| Refusal::new(r, id());
    let name = CommandName::parse(&cmd.name).ok_or_else(|| refuse(Reason::UnknownCommand))?;
    let target = shape(&cmd.target);
    let bad_target = || {
        refuse(Reason::BadTarget).detail(format!(
            "`{}` takes {}",
            name.as_str(),
            match name {
                CommandName::Unlock | CommandName::EmergencyUnlock => "a unit or an entry",
                CommandName::Lock | CommandName::Locate => "a unit",
                CommandName::Relay => "a device and a channel",
                _ => "no target",
            }
        ))
    };
    let unlock_target = || match target {
        Shape::Unit(u) => Ok(TargetRef::Unit(u.to_string())),
        Shape::Entry(e) => Ok(TargetRef::Entry(e.to_string())),
        _ => Err(bad_target()),
    };
    let unit_target = || match target {
        Shape::Unit(u) => Ok(u.to_string()),
        _ => Err(bad_target()),
    };
    let no_target = || match target {
        Shape::None => Ok(()),
        _ => Err(bad_target()),
    };
    let bad_args = |what: &str| refuse(Reason::BadArgs).detail(what.to_string());
    Ok(match name {
        CommandName::Unlock => {
            let target = unlock_target()?;
            args_object(&cmd.args, &[], &cmd.id)?;
            Request::Unlock {
                target,
                emergency: None,
            }
        }
        CommandName::EmergencyUnlock => {
            let target = unlock_target()?;
            let reason = match &cmd.args {
                Value::Object(m) => m.get("reason").and_then(Value::as_str),
                _ => None,
            };
            let reason = reason.and_then(EmergencyReason::parse).ok_or_else(|| {
                refuse(Reason::BadReason).detail(format!(
                    "args.reason must be one of: {}",
                    EmergencyReason::ALL.map(EmergencyReason::as_str).join(", ")
                ))
            })?;
            let args = args_object(&cmd.args, &["reason", "note"], &cmd.id)?;
            let note = match args.get("note") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s.chars().count() <= MAX_NOTE_LEN => Some(s.clone()),
                Some(_) => {
                    return Err(bad_args(&format!(
                        "note must be a string of at most {MAX_NOTE_LEN} characters"
                    )));
                }
            };
            Request::Unlock {
                target,
                emergency: Some(Emergency { reason, note }),
            }
        }
        CommandName::Lock => {
            let unit = unit_target()?;
            args_object(&cmd.args, &[], &cmd.id)?;
            Request::Lock { unit }
        }
        CommandName::Locate => {
            let unit = unit_target()?;
            args_object(&cmd.args, &[], &cmd.id)?;
            Request::Locate { unit }
        }
        CommandName::Relay => {
            let Shape::Device(device, channel) = target else {
                return Err(bad_target());
            };
            let args = args_object(&cmd.args, &["action", "ms"], &cmd.id)?;
            let ms = bounded_u32(args.get("ms"), &PULSE_MS).map_err(|_| {
                bad_args(&format!(
                    "ms must be an integer from {} to {}",
                    PULSE_MS.start(),
                    PULSE_MS.end()
                ))
            })?;
            let op = match (args.get("action").and_then(Value::as_str), ms) {
                (Some("pulse"), ms) => RelayOp::Pulse {
                    ms: ms.unwrap_or(DEFAULT_PULSE_MS),
                },
                (Some("on"), None) => RelayOp::On,
                (Some("off"), None) => RelayOp::Off,
                (Some("on" | "off"), Some(_)) => return Err(bad_args("ms only goes with pulse")),
                _ => return Err(bad_args("action must be pulse, on or off")),
            };
            Request::Relay {
                device: device.to_string(),
                channel,
                op,
            }
        }
        CommandName::InstallMode => {
            no_target()?;
            let args = args_object(&cmd.args, &["action", "minutes"], &cmd.id)?;
            let minutes = bounded_u32(args.get("minutes"), &INSTALL_MINUTES).map_err(|_| {
                bad_args(&format!(
                    "minutes must be an integer from {} to {}",
                    INSTALL_MINUTES.start(),
                    INSTALL_MINUTES.end()
                ))
            })?;
            match (args.get("action").and_then(Value::as_str), minutes) {
                (Some("start"), Some(minutes)) => {
                    Request::InstallMode(InstallMode::Start { minutes })
                }
                (Some("start"), None) => return Err(bad_args("start needs minutes")),
                (Some("stop"), None) => Request::InstallMode(InstallMode::Stop),
                (Some("stop"), Some(_)) => return Err(bad_args("stop takes no minutes")),
                _ => return Err(bad_args("action must be start or stop")),
            }
        }
        CommandName::Resync => {
            no_target()?;
            args_object(&cmd.args, &[], &cmd.id)?;
            Request::Resync
        }
        CommandName::Ping => {
            no_target()?;
            args_object(&cmd.args, &[], &cmd.id)?;
            Request::Ping
        }
        CommandName::Adopt => {
            no_target()?;
            if !cmd.args.is_object() {
                return Err(bad_args("args must be an object with `candidate`"));
            }
            let spec: AdoptSpec = serde_path_to_error::deserialize(&cmd.args)
                .map_err(|e| bad_args(&crate::redact::serde_with_path(&e)))?;
            if spec.candidate.is_empty() {
                return Err(bad_args("candidate must not be empty"));
            }
            Request::Adopt(Box::new(spec))
        }
        CommandName::Remove => {
            no_target()?;
            let args = args_object(&cmd.args, &["device"], &cmd.id)?;
            match args.get("device").and_then(Value::as_str) {
                Some(d) if !d.is_empty() => Request::Remove {
                    device: d.to_string(),
                },
                _ => return Err(bad_args("device must be a non-empty string")),
            }
        }
    })
}

/// A request resolved against the site: the device to act on, or work for the router itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// For a unit controller (padlock); `device` is the unit's `controller`.
    Unit {
        device: String,
        action: UnitAction,
    },
    /// For a relay output: an entry's relay, or a `relay` command's device.
    Relay {
        device: String,
        channel: u16,
        op: RelayOp,
    },
    InstallMode(InstallMode),
    Resync,
    Ping,
    Adopt(Box<AdoptSpec>),
    Remove {
        device: String,
    },
}

/// Checks a request's unit or entry against the site and finds its device.
pub fn resolve(request: &Request, tables: &Tables, id: &str) -> Result<Plan, Refusal> {
    let refuse = |r: Reason| Refusal::new(r, Some(id.to_string()));
    let unit_device = |unit: &str| {
        let u = tables
            .units
            .get(unit)
            .ok_or_else(|| refuse(Reason::UnknownTarget).detail(format!("no unit `{unit}`")))?;
        u.controller.clone().ok_or_else(|| {
            refuse(Reason::NoController).detail(format!("unit `{unit}` has no controller"))
        })
    };
    Ok(match request {
        Request::Unlock {
            target: TargetRef::Unit(unit),
            ..
        } => Plan::Unit {
            device: unit_device(unit)?,
            action: UnitAction::Unlock,
        },
        Request::Unlock {
            target: TargetRef::Entry(entry),
            ..
        } => {
            let e = tables.entries.get(entry.as_str()).ok_or_else(|| {
                refuse(Reason::UnknownTarget).detail(format!("no entry `{entry}`"))
            })?;
            let relay = e.relay.as_ref().ok_or_else(|| {
                refuse(Reason::NoController).detail(format!("entry `{entry}` has no relay"))
            })?;
            Plan::Relay {
                device: relay.device.clone(),
                channel: relay.channel,
                op: RelayOp::Pulse { ms: relay.pulse_ms },
            }
        }
        Request::Lock { unit } => Plan::Unit {
            device: unit_device(unit)?,
            action: UnitAction::Lock,
        },
        Request::Locate { unit } => Plan::Unit {
            device: unit_device(unit)?,
            action: UnitAction::Locate,
        },
        Request::Relay {
            device,
            channel,
            op,
        } => Plan::Relay {
            device: device.clone(),
            channel: *channel,
            op: *op,
        },
        Request::InstallMode(m) => Plan::InstallMode(*m),
        Request::Resync => Plan::Resync,
        Request::Ping => Plan::Ping,
        Request::Adopt(spec) => Plan::Adopt(spec.clone()),
        Request::Remove { device } => Plan::Remove {
            device: device.clone(),
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Devices

/// Whether a device can take a command now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Online {
    Yes,
    /// Offline: the command is refused (`target_offline`).
    No,
    /// Sleeping (BLE padlocks): the command waits, until it expires, for the device to wake.
    Asleep,
    /// Not a device of this gateway.
    Unknown,
}

/// What a device did with a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Execution {
    /// Done; the text goes into the result's `detail`.
    Done(String),
    /// The device turned out to be asleep: the router keeps the command pending and tries again
    /// at [`Router::wake`].
    Queued,
    /// The device reported an error (result `failed`, reason `device_error`, this text as
    /// `detail`).
    Failed(String),
}

/// Unit controllers and padlocks. Calls are synchronous and may block briefly (a bridge should
/// bound its own wait); the cloud link calls [`handle`] from a blocking task.
pub trait UnitControllers: Send + Sync {
    fn online(&self, device: &str) -> Online;
    fn execute(&self, device: &str, action: UnitAction) -> Execution;
    /// [`Self::execute`], with the time its outcome was reached when that is not the moment
    /// handling began (a BLE lock that waits for the cloud's packets): the result's `at`.
    fn execute_timed(
        &self,
        device: &str,
        action: UnitAction,
    ) -> (Execution, Option<DateTime<Utc>>) {
        (self.execute(device, action), None)
    }
}

/// Relay outputs (entry gates and doors, raw relay devices). Same calling rules as
/// [`UnitControllers`].
pub trait Relays: Send + Sync {
    fn online(&self, device: &str) -> Online;
    fn execute(&self, device: &str, channel: u16, op: RelayOp) -> Execution;
}

// ---------------------------------------------------------------------------------------------
// Router

/// Something the cloud link must do or record besides publishing the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// An `unlock` reached its final outcome: log a `remote_unlock` event.
    RemoteUnlock(UnlockRecord),
    /// An `emergency_unlock` reached its final outcome: log an `override_unlock` event (and
    /// the cloud notifies the tenant).
    OverrideUnlock {
        unlock: UnlockRecord,
        emergency: Emergency,
    },
    /// `resync`: republish `status` and ask the cloud for a snapshot.
    Resync,
    /// `install_mode`: installer mode until this instant, or stopped (`None`).
    InstallMode { until: Option<DateTime<Utc>> },
}

/// The final outcome of an unlock, for the event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnlockRecord {
    pub command_id: String,
    pub target: TargetRef,
    /// The controller or relay device, when the target was resolved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// `done`, `failed`, `refused` or `expired`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What handling one command message (or a wake-up, or an expiry) produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// To publish on `cmd/<result.name>/result`.
    pub result: CommandResult,
    pub effects: Vec<Effect>,
    /// A second delivery of a claimed id: answered with the stored result, not executed, no
    /// effects.
    pub duplicate: bool,
}

impl Outcome {
    fn of(result: CommandResult) -> Self {
        Outcome {
            result,
            effects: Vec::new(),
            duplicate: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DeviceOp {
    Unit(UnitAction),
    Relay { channel: u16, op: RelayOp },
}

/// A command bound for a device.
#[derive(Debug, Clone)]
struct Job {
    id: String,
    name: String,
    expires_at: DateTime<Utc>,
    device: String,
    op: DeviceOp,
    /// The device comes from the site (a unit's controller, an entry's relay): a device this
    /// gateway does not have is `no_controller`, not `unknown_target`.
    from_site: bool,
    unlock: Option<(TargetRef, Option<Emergency>)>,
}

fn result(
    id: &str,
    name: &str,
    status: &str,
    reason: Option<&str>,
    detail: Option<String>,
    at: DateTime<Utc>,
) -> CommandResult {
    CommandResult {
        id: Some(id.to_string()),
        id_truncated: None,
        name: name.to_string(),
        status: status.to_string(),
        reason: reason.map(str::to_string),
        detail,
        at,
    }
}

fn unlock_effect(
    unlock: Option<(TargetRef, Option<Emergency>)>,
    device: Option<String>,
    r: &CommandResult,
) -> Option<Effect> {
    let (target, emergency) = unlock?;
    let record = UnlockRecord {
        command_id: r.id.clone().unwrap_or_default(),
        target,
        device,
        status: r.status.clone(),
        reason: r.reason.clone(),
    };
    Some(match emergency {
        None => Effect::RemoteUnlock(record),
        Some(emergency) => Effect::OverrideUnlock {
            unlock: record,
            emergency,
        },
    })
}

impl Job {
    /// A final outcome (done, failed, refused, expired) with the unlock effect if any.
    fn finish(self, r: CommandResult) -> Outcome {
        let effects = unlock_effect(self.unlock, Some(self.device), &r)
            .into_iter()
            .collect();
        Outcome {
            result: r,
            effects,
            duplicate: false,
        }
    }
}

/// Routes commands to unit controllers and relays, and keeps those for sleeping devices until
/// the device wakes ([`Router::wake`]) or the command expires ([`Router::expire`]).
/// Pending commands live in memory only: after a restart their stored result stays `queued`.
pub struct Router {
    units: Arc<dyn UnitControllers>,
    relays: Arc<dyn Relays>,
    pending: Mutex<Vec<Job>>,
    pairing: Option<Arc<Pairing>>,
}

impl Router {
    pub fn new(units: Arc<dyn UnitControllers>, relays: Arc<dyn Relays>) -> Self {
        Router {
            units,
            relays,
            pending: Mutex::new(Vec::new()),
            pairing: None,
        }
    }

    /// Installer pairing: `install_mode`, `adopt` and `remove` go to it.
    pub fn with_pairing(mut self, pairing: Arc<Pairing>) -> Self {
        self.pairing = Some(pairing);
        self
    }

    /// `install_mode`, `adopt`, `remove` with installer pairing (blocking: flushes, the
    /// provisioner's work).
    fn pairing_plan(&self, cmd: &Command, plan: &Plan, now: DateTime<Utc>) -> Option<Outcome> {
        let by = format!("command:{}", cmd.id);
        let failed = |e: PairError| {
            Outcome::of(result(
                &cmd.id,
                &cmd.name,
                e.reason.status(),
                Some(e.reason.as_str()),
                Some(e.detail),
                now,
            ))
        };
        let done = |detail: String| {
            Outcome::of(result(&cmd.id, &cmd.name, "done", None, Some(detail), now))
        };
        let Some(p) = &self.pairing else {
            return match plan {
                Plan::Adopt(_) | Plan::Remove { .. } => Some(failed(PairError::new(
                    crate::pairing::PairReason::NotInInstallMode,
                    "this gateway has no installer pairing",
                ))),
                _ => None,
            };
        };
        Some(match plan {
            Plan::InstallMode(InstallMode::Start { minutes }) => {
                match p.start(*minutes, &by, ScanOptions::default()) {
                    Ok(until) => done(format!("install mode until {}", until.to_rfc3339())),
                    Err(e) => failed(e),
                }
            }
            Plan::InstallMode(InstallMode::Stop) => done(if p.stop(&by) {
                "install mode stopped".into()
            } else {
                "install mode was not active".into()
            }),
            Plan::Adopt(spec) => match p.adopt(spec, &by) {
                Ok(r) => done(format!("adopted as `{}`", r.id)),
                Err(e) => failed(e),
            },
            Plan::Remove { device } => match p.remove(device, &by) {
                Ok(r) => done(format!("removed `{}`", r.id)),
                Err(e) => failed(e),
            },
            _ => return None,
        })
    }

    /// Parses, resolves against `tables` and executes an authentic command (no store involved:
    /// see [`handle`] for the exactly-once wrapper).
    pub fn dispatch(&self, cmd: &Command, tables: &Tables, now: DateTime<Utc>) -> Outcome {
        let request = match parse(cmd) {
            Ok(r) => r,
            Err(refusal) => return Outcome::of(refusal.to_result(&cmd.name, now)),
        };
        let unlock = match &request {
            Request::Unlock { target, emergency } => Some((target.clone(), emergency.clone())),
            _ => None,
        };
        let plan = match resolve(&request, tables, &cmd.id) {
            Ok(p) => p,
            Err(refusal) => {
                let r = refusal.to_result(&cmd.name, now);
                let effects = unlock_effect(unlock, None, &r).into_iter().collect();
                return Outcome {
                    result: r,
                    effects,
                    duplicate: false,
                };
            }
        };
        let done = |detail: String, effect: Effect| Outcome {
            result: result(&cmd.id, &cmd.name, "done", None, Some(detail), now),
            effects: vec![effect],
            duplicate: false,
        };
        if let Some(o) = self.pairing_plan(cmd, &plan, now) {
            return o;
        }
        let (device, op) = match plan {
            // Answered by `pairing_plan` (always): a guard, never reached.
            Plan::Adopt(_) | Plan::Remove { .. } => {
                return Outcome::of(result(
                    &cmd.id,
                    &cmd.name,
                    "failed",
                    Some("no_provisioner"),
                    None,
                    now,
                ));
            }
            Plan::Ping => {
                return Outcome::of(result(
                    &cmd.id,
                    &cmd.name,
                    "done",
                    None,
                    Some("pong".into()),
                    now,
                ));
            }
            Plan::Resync => return done("resync requested".into(), Effect::Resync),
            Plan::InstallMode(InstallMode::Start { minutes }) => {
                let until = now
                    .checked_add_signed(Duration::minutes(minutes.into()))
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
                return done(
                    format!("install mode until {}", until.to_rfc3339()),
                    Effect::InstallMode { until: Some(until) },
                );
            }
            Plan::InstallMode(InstallMode::Stop) => {
                return done(
                    "install mode stopped".into(),
                    Effect::InstallMode { until: None },
                );
            }
            Plan::Unit { device, action } => (device, DeviceOp::Unit(action)),
            Plan::Relay {
                device,
                channel,
                op,
            } => (device, DeviceOp::Relay { channel, op }),
        };
        let from_site = !matches!(request, Request::Relay { .. });
        self.run(
            Job {
                id: cmd.id.clone(),
                name: cmd.name.clone(),
                expires_at: cmd.expires_at,
                device,
                op,
                from_site,
                unlock,
            },
            now,
        )
    }

    fn online(&self, job: &Job) -> Online {
        match job.op {
            DeviceOp::Unit(_) => self.units.online(&job.device),
            DeviceOp::Relay { .. } => self.relays.online(&job.device),
        }
    }

    /// The device's outcome, and when it was reached (`now` unless the device says otherwise).
    fn execute(&self, job: &Job, now: DateTime<Utc>) -> (Execution, DateTime<Utc>) {
        match job.op {
            DeviceOp::Unit(action) => {
                let (e, at) = self.units.execute_timed(&job.device, action);
                (e, at.unwrap_or(now))
            }
            DeviceOp::Relay { channel, op } => (self.relays.execute(&job.device, channel, op), now),
        }
    }

    fn run(&self, job: Job, now: DateTime<Utc>) -> Outcome {
        let refuse = |job: Job, reason: Reason, detail: String| {
            let r = Refusal::new(reason, Some(job.id.clone()))
                .detail(detail)
                .to_result(&job.name, now);
            job.finish(r)
        };
        match self.online(&job) {
            Online::Unknown => {
                let (reason, detail) = if job.from_site {
                    (
                        Reason::NoController,
                        format!("device `{}` is not configured on this gateway", job.device),
                    )
                } else {
                    (Reason::UnknownTarget, format!("no device `{}`", job.device))
                };
                refuse(job, reason, detail)
            }
            Online::No => {
                let detail = format!("device `{}` is offline", job.device);
                refuse(job, Reason::TargetOffline, detail)
            }
            Online::Asleep => self.enqueue(job, now),
            Online::Yes => match self.execute(&job, now) {
                (Execution::Queued, at) => self.enqueue(job, at),
                (Execution::Done(detail), at) => {
                    let r = result(&job.id, &job.name, "done", None, Some(detail), at);
                    job.finish(r)
                }
                (Execution::Failed(detail), at) => {
                    let r = result(
                        &job.id,
                        &job.name,
                        "failed",
                        Some("device_error"),
                        Some(detail),
                        at,
                    );
                    job.finish(r)
                }
            },
        }
    }

    fn enqueue(&self, job: Job, now: DateTime<Utc>) -> Outcome {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() >= MAX_PENDING {
            drop(pending);
            let r = Refusal::new(Reason::QueueFull, Some(job.id.clone()))
                .detail(format!("{MAX_PENDING} commands already wait for devices"))
                .to_result(&job.name, now);
            return job.finish(r);
        }
        let r = result(
            &job.id,
            &job.name,
            "queued",
            None,
            Some(format!(
                "waiting for `{}` to wake, until {}",
                job.device,
                job.expires_at.to_rfc3339()
            )),
            now,
        );
        pending.push(job);
        Outcome::of(r)
    }

    /// `device` woke up: executes its pending commands in the order they came and returns their
    /// final outcomes (those past expiry are `expired`). If the device goes back to sleep
    /// ([`Execution::Queued`]), it and the commands after it stay pending.
    pub fn wake(&self, device: &str, now: DateTime<Utc>) -> Vec<Outcome> {
        let mine: Vec<Job> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let (mine, rest) = std::mem::take(&mut *pending)
                .into_iter()
                .partition(|j| j.device == device);
            *pending = rest;
            mine
        };
        let mut out = Vec::new();
        let mut jobs = mine.into_iter();
        // The time moves on as the device works through them: each result is stamped, and each
        // expiry checked, when it is reached.
        let mut now = now;
        while let Some(job) = jobs.next() {
            if job.expires_at <= now {
                out.push(expired(job, now));
                continue;
            }
            let (e, at) = self.execute(&job, now);
            now = now.max(at);
            let r = match e {
                Execution::Done(detail) => {
                    result(&job.id, &job.name, "done", None, Some(detail), at)
                }
                Execution::Failed(detail) => result(
                    &job.id,
                    &job.name,
                    "failed",
                    Some("device_error"),
                    Some(detail),
                    at,
                ),
                Execution::Queued => {
                    let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                    pending.push(job);
                    pending.extend(jobs);
                    break;
                }
            };
            out.push(job.finish(r));
        }
        out
    }

    /// Removes pending commands whose `expires_at` has passed and returns their `expired`
    /// outcomes (reason `target_asleep`).
    pub fn expire(&self, now: DateTime<Utc>) -> Vec<Outcome> {
        let gone: Vec<Job> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let (gone, rest) = std::mem::take(&mut *pending)
                .into_iter()
                .partition(|j| j.expires_at <= now);
            *pending = rest;
            gone
        };
        gone.into_iter().map(|j| expired(j, now)).collect()
    }

    /// Ids of the commands waiting for sleeping devices, with their devices.
    pub fn pending(&self) -> Vec<(String, String)> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|j| (j.id.clone(), j.device.clone()))
            .collect()
    }
}

fn expired(job: Job, now: DateTime<Utc>) -> Outcome {
    let detail = format!("`{}` did not wake before the command expired", job.device);
    let r = result(
        &job.id,
        &job.name,
        "expired",
        Some("target_asleep"),
        Some(detail),
        now,
    );
    job.finish(r)
}

// ---------------------------------------------------------------------------------------------
// Exactly once

/// Settings of command handling.
#[derive(Debug, Clone)]
pub struct CommandConfig {
    /// The cloud's command key.
    pub public: VerifyingKey,
    /// This gateway's site id (`site.id` of the config): a command must name it in `site`.
    pub site: String,
    /// This gateway's id (`site.gateway_id`): a command must name it in `gateway`.
    pub gateway: String,
    /// How far in the future `issued_at` may be (the cloud's clock ahead of ours).
    pub max_skew: Duration,
    /// Longest message accepted, in bytes.
    pub max_bytes: usize,
}

impl CommandConfig {
    pub const DEFAULT_MAX_SKEW_SECS: i64 = 60;
    pub const DEFAULT_MAX_BYTES: usize = 16 * 1024;

    pub fn new(public: VerifyingKey, site: &str, gateway: &str) -> Self {
        CommandConfig {
            public,
            site: site.to_string(),
            gateway: gateway.to_string(),
            max_skew: Duration::seconds(Self::DEFAULT_MAX_SKEW_SECS),
            max_bytes: Self::DEFAULT_MAX_BYTES,
        }
    }
}

fn store_result(store: &Store, r: &CommandResult) {
    let Some(id) = &r.id else { return };
    let stored = serde_json::to_value(r)
        .map_err(anyhow::Error::from)
        .and_then(|v| store.commands().set_result(id, v));
    if let Err(e) = stored {
        tracing::warn!(id = %id, "could not store a command result: {e:#}");
    }
}

/// Handles one message from `cmd/<topic_name>`: verifies it, claims its id (exactly once),
/// executes it and stores its result. Always returns one result to publish. Blocking (sled
/// flushes, device calls): call it from a blocking task.
pub fn handle(
    router: &Router,
    store: &Store,
    bytes: &[u8],
    topic_name: &str,
    now: DateTime<Utc>,
    cfg: &CommandConfig,
) -> Outcome {
    let lived_ms = store.lived().now_ms();
    handle_at(router, store, bytes, topic_name, now, lived_ms, cfg)
}

/// [`handle`] with the lived time given (see [`crate::store::LivedClock`]): the wall clock `now`
/// and `lived_ms` are the only clocks the command path reads.
pub fn handle_at(
    router: &Router,
    store: &Store,
    bytes: &[u8],
    topic_name: &str,
    now: DateTime<Utc>,
    lived_ms: u64,
    cfg: &CommandConfig,
) -> Outcome {
    let cmd = match verify(bytes, topic_name, cfg, now) {
        Ok(c) => c,
        Err(refusal) => return Outcome::of(refusal.to_result(topic_name, now)),
    };
    match store
        .commands()
        .claim(&cmd.id, cmd.expires_at, now, lived_ms)
    {
        Ok(Claim::New) => {}
        Ok(Claim::Seen(seen)) => {
            let earlier = seen
                .result
                .and_then(|v| serde_json::from_value::<CommandResult>(v).ok());
            let result = earlier.unwrap_or_else(|| {
                Refusal::new(Reason::Duplicate, Some(cmd.id.clone()))
                    .detail("already received; its outcome is not known")
                    .to_result(&cmd.name, now)
            });
            return Outcome {
                result,
                effects: Vec::new(),
                duplicate: true,
            };
        }
        Ok(Claim::Pruned { through }) => {
            return Outcome::of(
                Refusal::new(Reason::Expired, Some(cmd.id.clone()))
                    .detail(format!(
                        "expires at {}, no later than commands already forgotten ({through}): \
                         a replay could not be recognised",
                        cmd.expires_at
                    ))
                    .to_result(&cmd.name, now),
            );
        }
        Err(e) => {
            tracing::error!(id = %cmd.id, "could not record a command id: {e:#}");
            store.report_error("recording a command id");
            return Outcome::of(result(
                &cmd.id,
                &cmd.name,
                "failed",
                Some("storage"),
                Some("the gateway could not record the command; not executed".into()),
                now,
            ));
        }
    }
    // An Arc of the tables: no lock is held while devices work.
    let tables = store.site().tables.clone();
    let outcome = router.dispatch(&cmd, &tables, now);
    store_result(store, &outcome.result);
    outcome
}

/// [`Router::wake`], storing each final result so that a duplicate delivery is answered with
/// it.
pub fn handle_wake(
    router: &Router,
    store: &Store,
    device: &str,
    now: DateTime<Utc>,
) -> Vec<Outcome> {
    let out = router.wake(device, now);
    for o in &out {
        store_result(store, &o.result);
    }
    out
}

/// [`Router::expire`], storing each `expired` result. Call it periodically (with
/// [`prune`]).
pub fn handle_expire(router: &Router, store: &Store, now: DateTime<Utc>) -> Vec<Outcome> {
    let out = router.expire(now);
    for o in &out {
        store_result(store, &o.result);
    }
    out
}

/// Forgets the command ids that have expired by the wall clock `now` and by lived time
/// `lived_ms` (see [`crate::store::CommandLog::prune`]).
pub fn prune(
    store: &Store,
    now: DateTime<Utc>,
    lived_ms: u64,
    cfg: &CommandConfig,
) -> anyhow::Result<usize> {
    store.commands().prune(now, lived_ms, cfg.max_skew)
}

// ---------------------------------------------------------------------------------------------
// Simulators

/// Per-device switches of a simulator.
#[derive(Debug, Default)]
struct Switches {
    state: HashMap<String, Online>,
    failing: HashMap<String, String>,
}

impl Switches {
    fn new<I, S>(devices: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Switches {
            state: devices
                .into_iter()
                .map(|d| (d.into(), Online::Yes))
                .collect(),
            failing: HashMap::new(),
        }
    }

    fn online(&self, device: &str) -> Online {
        self.state.get(device).copied().unwrap_or(Online::Unknown)
    }

    /// `None` when the device would execute now.
    fn refuse(&self, device: &str) -> Option<Execution> {
        match self.online(device) {
            Online::Yes => self
                .failing
                .get(device)
                .map(|m| Execution::Failed(m.clone())),
            Online::Asleep => Some(Execution::Queued),
            Online::No => Some(Execution::Failed(format!("`{device}` is offline"))),
            Online::Unknown => Some(Execution::Failed(format!("no device `{device}`"))),
        }
    }
}

/// **Simulator** of devices, for tests and the demo: no hardware. It knows a fixed set of devices
/// (others are [`Online::Unknown`]), each online until switched, and records what it executed
/// (`A`: one executed action).
#[derive(Debug)]
pub struct Simulated<A> {
    switches: Mutex<Switches>,
    executed: Mutex<Vec<A>>,
}

/// Simulated unit controllers and padlocks; records `(device, action)`.
pub type SimulatedUnits = Simulated<(String, UnitAction)>;
/// Simulated relay devices; records `(device, channel, op)`.
pub type SimulatedRelays = Simulated<(String, u16, RelayOp)>;

impl<A: Clone> Simulated<A> {
    pub fn new<I, S>(devices: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Simulated {
            switches: Mutex::new(Switches::new(devices)),
            executed: Mutex::new(Vec::new()),
        }
    }

    /// Switches a device online, offline or asleep (or makes it unknown).
    pub fn set_online(&self, device: &str, state: Online) {
        let mut s = self.switches.lock().unwrap_or_else(|e| e.into_inner());
        s.state.insert(device.to_string(), state);
    }

    /// Makes a device fail every command with `message` (or work again with `None`).
    pub fn set_failure(&self, device: &str, message: Option<&str>) {
        let mut s = self.switches.lock().unwrap_or_else(|e| e.into_inner());
        match message {
            Some(m) => s.failing.insert(device.to_string(), m.to_string()),
            None => s.failing.remove(device),
        };
    }

    /// What was executed, in order.
    pub fn executed(&self) -> Vec<A> {
        self.executed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl UnitControllers for SimulatedUnits {
    fn online(&self, device: &str) -> Online {
        self.switches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .online(device)
    }

    fn execute(&self, device: &str, action: UnitAction) -> Execution {
        let refused = self
            .switches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refuse(device);
        if let Some(r) = refused {
            return r;
        }
        self.executed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((device.to_string(), action));
        Execution::Done(
            match action {
                UnitAction::Unlock => "unlocked",
                UnitAction::Lock => "locked",
                UnitAction::Locate => "beeping",
            }
            .into(),
        )
    }
}

impl Relays for SimulatedRelays {
    fn online(&self, device: &str) -> Online {
        self.switches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .online(device)
    }

    fn execute(&self, device: &str, channel: u16, op: RelayOp) -> Execution {
        let refused = self
            .switches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refuse(device);
        if let Some(r) = refused {
            return r;
        }
        self.executed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((device.to_string(), channel, op));
        Execution::Done(match op {
            RelayOp::Pulse { ms } => format!("channel {channel} pulsed for {ms} ms"),
            RelayOp::On => format!("channel {channel} on"),
            RelayOp::Off => format!("channel {channel} off"),
        })
    }
}

/// The targets of a gateway with no device drivers running: every device is offline, so a
/// command to it is refused `target_offline` (the honest answer: nothing can reach it).
pub struct NoDevices;

impl UnitControllers for NoDevices {
    fn online(&self, _device: &str) -> Online {
        Online::No
    }
    fn execute(&self, device: &str, _action: UnitAction) -> Execution {
        Execution::Failed(format!("no driver for `{device}`"))
    }
}

impl Relays for NoDevices {
    fn online(&self, _device: &str) -> Online {
        Online::No
    }
    fn execute(&self, device: &str, _channel: u16, _op: RelayOp) -> Execution {
        Execution::Failed(format!("no driver for `{device}`"))
    }
}

/// Two sets of devices as one: the first that knows a device (anything but
/// [`Online::Unknown`]) handles it. E.g. the RS-485 buses first, then simulated or absent ones.
pub struct Either<A: ?Sized, B: ?Sized>(pub Arc<A>, pub Arc<B>);

impl<A: Relays + ?Sized, B: Relays + ?Sized> Relays for Either<A, B> {
    fn online(&self, device: &str) -> Online {
        match self.0.online(device) {
            Online::Unknown => self.1.online(device),
            o => o,
        }
    }
    fn execute(&self, device: &str, channel: u16, op: RelayOp) -> Execution {
        match self.0.online(device) {
            Online::Unknown => self.1.execute(device, channel, op),
            _ => self.0.execute(device, channel, op),
        }
    }
}

impl<A: UnitControllers + ?Sized, B: UnitControllers + ?Sized> UnitControllers for Either<A, B> {
    fn online(&self, device: &str) -> Online {
        match self.0.online(device) {
            Online::Unknown => self.1.online(device),
            o => o,
        }
    }
    fn execute(&self, device: &str, action: UnitAction) -> Execution {
        match self.0.online(device) {
            Online::Unknown => self.1.execute(device, action),
            _ => self.0.execute(device, action),
        }
    }
    fn execute_timed(
        &self,
        device: &str,
        action: UnitAction,
    ) -> (Execution, Option<DateTime<Utc>>) {
        match self.0.online(device) {
            Online::Unknown => self.1.execute_timed(device, action),
            _ => self.0.execute_timed(device, action),
        }
    }
}
