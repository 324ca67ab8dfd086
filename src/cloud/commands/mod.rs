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
//!
//! # Layout
//!
//! - this file: the limits, [`CommandConfig`], and exactly-once handling ([`handle`],
//!   [`handle_at`], [`handle_wake`], [`handle_expire`], [`prune`]): verify, claim, dispatch,
//!   store the result;
//! - `checks.rs`: [`Reason`], [`Refusal`], [`verify`] (the checks in order), [`sign`];
//! - `parse.rs`: [`Request`] and [`parse`], [`Plan`] and [`resolve`];
//! - `router.rs`: the device traits ([`UnitControllers`], [`Relays`]), [`Outcome`] and the
//!   [`Router`] (execution, commands pending for sleeping devices, pairing);
//! - `sim.rs`: [`Simulated`] devices, [`NoDevices`], [`Either`].
//!
//! [`SignedCommand`]: crate::cloud::messages::SignedCommand
//! [`Command`]: crate::cloud::messages::Command
//! [`COMMAND_CONTEXT`]: crate::cloud::messages::COMMAND_CONTEXT
//! [`COMMAND_VERSION`]: crate::cloud::messages::COMMAND_VERSION
//! [`AdoptSpec`]: crate::pairing::AdoptSpec
//! [`Pairing`]: crate::pairing::Pairing
//! [`Pairing::adopt`]: crate::pairing::Pairing::adopt
//! [`Pairing::remove`]: crate::pairing::Pairing::remove

mod checks;
mod parse;
mod router;
mod sim;

pub use checks::{Reason, Refusal, RefusalStatus, sign, sign_payload, verify};
pub use parse::{
    CommandName, Emergency, EmergencyReason, InstallMode, Plan, RelayOp, Request, TargetRef,
    UnitAction, parse, resolve,
};
pub use router::{
    Effect, Execution, Online, Outcome, Relays, Router, UnitControllers, UnlockRecord,
};
pub use sim::{Either, NoDevices, Simulated, SimulatedRelays, SimulatedUnits};

use chrono::{DateTime, Duration, Utc};
use ed25519_dalek::VerifyingKey;

use crate::cloud::messages::CommandResult;
use crate::store::{Claim, Store};
use router::result;

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
