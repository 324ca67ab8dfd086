//! The access engine: the I/O edge around [`crate::policy::decide`]. It applies keypad lockout,
//! asks the policy, and appends the decision (and a `keypad_locked_out` event when a lockout
//! starts) to the durable event log *before* returning, so that a device is never told "open"
//! for an event that is not on disk.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::events::EventKind;
use crate::policy::digital_key::KeyVerifier;
use crate::policy::lockout::Lockouts;
use crate::policy::{self, Context, Decision, Direction, Presented, Reason, Request, Target};
use crate::store::{NewEvent, Store};

/// One access attempt from a device.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    pub request: Request<'a>,
    /// The keypad or reader the attempt came from (lockout is per keypad).
    pub device: Option<&'a str>,
}

/// Where the engine reads monotonic time (keypad lockout durations).
pub type MonotonicClock = Arc<dyn Fn() -> Instant + Send + Sync>;

pub struct AccessEngine {
    store: Arc<Store>,
    lockouts: Mutex<Lockouts>,
    /// The cloud's key for offline digital keys and this gateway's site id.
    digital_key_public: Option<KeyVerifier>,
    monotonic: MonotonicClock,
    metrics: crate::metrics::Metrics,
    /// Where drivers and decisions hand facts to automation (set once by the daemon).
    facts: std::sync::OnceLock<crate::automation::facts::FactSink>,
}

impl AccessEngine {
    /// `digital_key_public`: the cloud's key for offline digital keys with this gateway's site
    /// id (`KeyVerifier::new(public, &cfg.site_id)`); `None` refuses every key.
    pub fn new(store: Arc<Store>, digital_key_public: Option<KeyVerifier>) -> Self {
        AccessEngine {
            store,
            lockouts: Mutex::new(Lockouts::default()),
            digital_key_public,
            monotonic: Arc::new(Instant::now),
            metrics: crate::metrics::Metrics::new(),
            facts: std::sync::OnceLock::new(),
        }
    }

    /// Replaces the monotonic clock that keypad lockout durations are measured on (tests step
    /// it; the daemon uses [`Instant::now`]). The wall clock is the `at` of each attempt.
    pub fn with_monotonic_clock(mut self, clock: MonotonicClock) -> Self {
        self.monotonic = clock;
        self
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The daemon's metrics: drivers count through the engine they hold.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The automation runner's fact sink (a silent one until [`Self::set_facts`]): drivers hand
    /// it what they observe; it never blocks.
    pub fn facts(&self) -> &crate::automation::facts::FactSink {
        static NONE: std::sync::OnceLock<crate::automation::facts::FactSink> =
            std::sync::OnceLock::new();
        self.facts
            .get()
            .unwrap_or_else(|| NONE.get_or_init(crate::automation::facts::FactSink::none))
    }

    /// Connects the automation runner (once; a second call is ignored).
    pub fn set_facts(&self, sink: crate::automation::facts::FactSink) {
        let _ = self.facts.set(sink);
    }

    /// Decides an attempt without recording it (for `gatehouse access check`).
    pub fn evaluate(&self, req: &Request, at: DateTime<Utc>) -> Decision {
        let site = self.store.site();
        let ctx = Context {
            code_key: self.store.code_key(),
            digital_key_public: self.digital_key_public.as_ref(),
        };
        policy::decide(&site, &ctx, req, at)
    }

    /// Decides an attempt, records it durably, and returns the decision. `at` (wall clock) is
    /// what the policy and the event see; keypad lockout durations run on the monotonic clock.
    pub fn check(&self, attempt: &Attempt, at: DateTime<Utc>) -> anyhow::Result<Decision> {
        let started = Instant::now();
        let req = &attempt.request;
        let site = self.store.site();
        let tables = &site.tables;
        let lockout_policy = tables.facility.wire.keypad_lockout;
        let tz = tables.facility.tz;
        let is_code = matches!(req.credential, Presented::Code(_));
        let mut lockout_started = None;
        let decision = {
            let mut lockouts = self.lockouts.lock().unwrap_or_else(|e| e.into_inner());
            let now = (self.monotonic)();
            match attempt.device {
                Some(kp) if is_code && lockouts.is_locked(kp, now) => {
                    Decision::denied(Reason::KeypadLockedOut)
                }
                _ => {
                    let ctx = Context {
                        code_key: self.store.code_key(),
                        digital_key_public: self.digital_key_public.as_ref(),
                    };
                    let d = policy::decide(&site, &ctx, req, at);
                    if let (true, Reason::UnknownCredential, Some(kp)) =
                        (is_code, d.reason, attempt.device)
                    {
                        lockout_started = lockouts.record_failure(kp, now, lockout_policy);
                        lockouts.prune(now, lockout_policy);
                    }
                    d
                }
            }
        };
        drop(site);
        let local = at.with_timezone(&tz).to_rfc3339();
        let (target_kind, target_id) = match req.target {
            Target::Entry(e) => ("entry", e),
            Target::Unit(u) => ("unit", u),
        };
        let mut payload = json!({
            "reason": decision.reason,
            "credential": req.credential.kind(),
            target_kind: target_id,
            "direction": match req.direction { Direction::In => "in", Direction::Out => "out" },
            "units": decision.units,
        });
        let obj = payload.as_object_mut().expect("object");
        if let Some(u) = &decision.user {
            obj.insert("user".into(), json!(u));
        }
        if let Some(c) = &decision.credential_id {
            obj.insert("credential_id".into(), json!(c));
        }
        if let Some(d) = attempt.device {
            obj.insert("device".into(), json!(d));
        }
        // Unknown fobs and cards are worth seeing; keypad codes never leave the keypad.
        if decision.credential_id.is_none() {
            match req.credential {
                Presented::Fob(f) => {
                    obj.insert("fob".into(), json!(f));
                }
                Presented::Card(c) => {
                    obj.insert("card".into(), json!(c));
                }
                _ => {}
            }
        }
        let mut events = vec![NewEvent {
            at,
            local: local.clone(),
            kind: if decision.granted {
                EventKind::AccessGranted
            } else {
                EventKind::AccessDenied
            },
            payload,
        }];
        if let Some(cooldown) = lockout_started {
            // The end of the cool-down as a wall-clock time, for people reading the event; the
            // lockout itself ends when that much monotonic time has passed.
            let until = chrono::Duration::from_std(cooldown)
                .ok()
                .and_then(|d| at.checked_add_signed(d))
                .unwrap_or(at);
            events.push(NewEvent {
                at,
                local,
                kind: EventKind::KeypadLockedOut,
                payload: json!({
                    "device": attempt.device,
                    "until": until,
                    "failures": lockout_policy.max_failures,
                    "window_minutes": lockout_policy.window_minutes,
                }),
            });
        }
        if let Err(e) = self.store.events().append(&events) {
            self.store.report_error("recording an access decision");
            return Err(e);
        }
        if decision.granted {
            let (entry, unit) = match req.target {
                Target::Entry(e) => (Some(e.to_string()), None),
                Target::Unit(u) => (None, Some(u.to_string())),
            };
            self.facts()
                .send(crate::automation::facts::Observed::Granted {
                    user: decision.user.clone(),
                    entry,
                    unit,
                    leaving: req.direction == Direction::Out,
                });
        }
        self.metrics.decision(
            decision.reason.as_str(),
            decision.granted,
            started.elapsed(),
        );
        Ok(decision)
    }
}
