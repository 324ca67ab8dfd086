//! Lock operations of the [`Manager`]: connect, read the session, get the packets (the cloud's,
//! or the offline unlock made here), write them one by one, and say what came of it.
//!
//! - While the gateway waits for the cloud's packets it also listens to the lock: a lock that
//!   says it goes to sleep (0x64) or drops the link before anything was written has not taken
//!   the command, and a sleeping padlock's command then waits for it to wake (`Queued`).
//! - A cloud packet list the lock refuses as unusable (invalid key, command or data) is, for an
//!   `unlock`, followed by the offline unlock on the same link; the outcome names both.
//! - The outcome is stamped with the time it was reached ([`Manager::operate_timed`]): the
//!   command result's `at`.
//! - An offline unlock refused with `invalid_key` is recorded with what tells a wrong key from
//!   a padlock whose clock is far off, as far as the protocol allows (`clock_suspect`).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use super::*;

/// How often the wait for the cloud's packets looks at the lock (its notifications and link
/// are watched all along; this only bounds one wait on the link).
const WATCH_SLICE: Duration = Duration::from_millis(250);

/// Why a lock did not take a packet.
#[derive(Debug)]
enum LockError {
    /// It shut down (went to sleep) instead of answering.
    Sleep,
    /// It refused the packet: its answer.
    Refused(&'static str),
    /// The link failed (the write, or the wait for the answer).
    Link(BleError),
    Other(String),
}

impl LockError {
    /// A refusal that says the packets were unusable for this lock (not a decision of the lock
    /// about the unlock itself, nor a mechanical failure): the offline unlock may follow.
    fn unusable_packets(&self) -> bool {
        matches!(
            self,
            LockError::Refused(
                "invalid_key" | "invalid_command" | "invalid_data" | "invalid" | "invalid_result"
            )
        )
    }
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Sleep => f.write_str("the lock went to sleep (shutdown)"),
            LockError::Refused(r) => write!(f, "the lock answered {r}"),
            LockError::Link(e) => write!(f, "{e}"),
            LockError::Other(e) => f.write_str(e),
        }
    }
}

/// A packet list that was not taken: which packet, and why.
struct NotTaken {
    index: usize,
    /// Nothing reached the lock: the first packet's write failed, or the lock went to sleep
    /// instead of answering it.
    nothing_taken: bool,
    error: LockError,
}

/// An offline unlock made here: what its `lock_result` says about it.
#[derive(Debug, Clone, Copy)]
struct Offline {
    /// The Unix time put in the packet.
    time: u32,
    /// Identifies the site database's offline key used (a hash: the key never leaves here).
    key_id: u64,
}

/// What a notification answers, for its `lock_result` event's `via`.
#[derive(Debug, Clone, Copy)]
enum Via {
    Online,
    Offline(Offline),
    /// Before anything was written, while the gateway waited for the cloud's packets.
    Waiting,
    /// After the last packet's answer.
    After,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Online => "online",
            Via::Offline(_) => "offline",
            Via::Waiting => "waiting",
            Via::After => "after",
        }
    }
}

/// The packets for an action.
enum Packets {
    Online(Vec<[u8; PACKET_LEN]>),
    Offline([u8; PACKET_LEN], Offline),
}

/// Why there are no packets to write.
enum NoPackets {
    /// The lock went to sleep or dropped the link while the gateway waited for the cloud:
    /// nothing was written.
    Asleep(String),
    Failed(String),
}

/// For an offline unlock the lock refused as `invalid_key`: what else it may mean.
fn clock_hint(via: Via, e: &LockError) -> &'static str {
    match (via, e) {
        (Via::Offline(_), LockError::Refused("invalid_key")) => {
            " (a wrong offline key, or the lock's clock far from the gateway's: see the \
             lock_result event's clock_suspect)"
        }
        _ => "",
    }
}

/// An outcome, stamped now.
fn reached(e: Execution) -> (Execution, DateTime<Utc>) {
    (e, Utc::now())
}

impl<R: Radio> Manager<R> {
    /// Whether a padlock or unit controller can take a command now.
    pub fn online(&self, device: &str) -> Online {
        let Some(dev) = self.device(device) else {
            return Online::Unknown;
        };
        if !matches!(dev.kind, DeviceKind::Padlock | DeviceKind::Controller) {
            return Online::Unknown;
        }
        let cfg = self.cfg();
        let prof = cfg.profiles.get(dev.kind);
        let (last, reported_offline) = lock(&self.live)
            .get(device)
            .map_or((None, false), |l| (l.last_seen, l.online == Some(false)));
        if reported_offline && !prof.sleeps {
            return Online::No;
        }
        let now = Instant::now();
        if prof.sleeps {
            match last {
                Some(t) if now - t <= prof.awake_for => Online::Yes,
                _ => Online::Asleep,
            }
        } else {
            let after = dev
                .offline_after_s
                .map(Duration::from_secs)
                .or(prof.offline_after)
                .unwrap_or(Duration::MAX);
            match last {
                Some(t) if now - t <= after => Online::Yes,
                _ => Online::No,
            }
        }
    }

    /// Carries out an action on a padlock or unit controller, bounded by `OPERATION_TIMEOUT`.
    /// `offline_only`: do not ask the cloud (an installer's test; the cloud is known to be
    /// away). See [`Self::operate_timed`].
    pub async fn operate(&self, device: &str, action: UnitAction, offline_only: bool) -> Execution {
        self.operate_timed(device, action, offline_only).await.0
    }

    /// [`Self::operate`], with the time the outcome was reached. The outcome is returned as
    /// soon as the lock has answered the last packet; the link then stays up a moment for the
    /// server packets the lock sends after it (uploaded), and the device is not used by
    /// anything else until it is closed.
    pub async fn operate_timed(
        &self,
        device: &str,
        action: UnitAction,
        offline_only: bool,
    ) -> (Execution, DateTime<Utc>) {
        let Some(me) = self.me.upgrade() else {
            return reached(Execution::Failed("the BLE module is stopping".into()));
        };
        if action == UnitAction::Unlock {
            // Explains the lock's "unlocked" report to automation (no manual-unlock alert).
            self.engine
                .facts()
                .send(crate::automation::facts::Observed::UnlockCommanded {
                    device: device.to_string(),
                });
        }
        let (tx, rx) = oneshot::channel();
        let device = device.to_string();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                OPERATION_TIMEOUT,
                me.operate_inner(&device, action, offline_only, tx),
            )
            .await;
        });
        let r = match rx.await {
            Ok(r) => r,
            Err(_) => reached(Execution::Failed(format!(
                "no outcome within {} s",
                OPERATION_TIMEOUT.as_secs()
            ))),
        };
        self.engine.metrics().ble_lock_operation(match r.0 {
            Execution::Done(_) => "done",
            Execution::Queued => "queued",
            Execution::Failed(_) => "failed",
        });
        r
    }

    async fn operate_inner(
        &self,
        id: &str,
        action: UnitAction,
        offline_only: bool,
        outcome: oneshot::Sender<(Execution, DateTime<Utc>)>,
    ) {
        let Some(dev) = self.device(id) else {
            let _ = outcome.send(reached(Execution::Failed(format!(
                "no device `{id}` in the site database"
            ))));
            return;
        };
        let cfg = self.cfg();
        let prof = cfg.profiles.get(dev.kind);
        let serial = lock(&self.serial)
            .entry(id.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone();
        let _one_at_a_time = serial.lock().await;
        let Ok(_permit) = self.pool.acquire().await else {
            let _ = outcome.send(reached(Execution::Failed(
                "the BLE module is stopping".into(),
            )));
            return;
        };
        let mac = dev.mac.to_ascii_uppercase();
        let mut retries = 0;
        let mut link = match loop {
            match self.radio.connect(&mac, prof.connect_timeout).await {
                // A busy adapter or a radio hiccup: again, after a pause that doubles.
                Err(BleError::Timeout(_) | BleError::Disconnected(_) | BleError::Adapter(_))
                    if retries < CONNECT_RETRIES =>
                {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(250) * (1 << retries)).await;
                }
                Err(BleError::Unreachable(_)) if !prof.sleeps && retries < CONNECT_RETRIES => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(250) * (1 << retries)).await;
                }
                other => break other,
            }
        } {
            Ok(l) => l,
            Err(BleError::Unreachable(why)) if prof.sleeps => {
                tracing::info!(device = id, "lock asleep ({why}): the command waits for it");
                self.asleep(id);
                let _ = outcome.send(reached(Execution::Queued));
                return;
            }
            Err(e) => {
                let _ = outcome.send(reached(Execution::Failed(e.to_string())));
                return;
            }
        };
        let session = link.session();
        self.note_battery(&dev, prof, &session);
        let result = self
            .run_on_link(&dev, &mac, &mut link, &session, action, offline_only)
            .await;
        let _ = outcome.send(reached(result));
        // What the lock still says (server packets after an unlock) is uploaded, within one
        // short window.
        let end = tokio::time::Instant::now() + AFTER_LAST_PACKET;
        for _ in 0..MAX_EXTRA_NOTIFICATIONS {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            match link.notification(left).await {
                Ok(value) if !left.is_zero() => {
                    self.on_notification(&dev, &session, &value, Via::After);
                }
                _ => break,
            }
        }
        link.disconnect().await;
    }

    /// The lock is asleep: commands for it wait until it advertises again.
    fn asleep(&self, id: &str) {
        lock(&self.live)
            .entry(id.to_string())
            .or_default()
            .last_seen = None;
    }

    fn note_battery(&self, dev: &Device, prof: &Profile, session: &[u8; PACKET_LEN]) {
        let Ok(s) = noke::Session::parse(session) else {
            return;
        };
        let mv = s.battery_mv();
        self.states.set(&dev.id, &[("battery_mv", json!(mv))]);
        let low = prof.low_battery_mv > 0 && mv < prof.low_battery_mv;
        let newly = {
            let mut live = lock(&self.live);
            let l = live.entry(dev.id.clone()).or_default();
            let newly = low && !l.battery_low;
            l.battery_low = low;
            newly
        };
        if newly {
            self.record(
                EventKind::BatteryLow,
                json!({"device": dev.id, "battery_mv": mv}),
            );
        }
    }

    async fn run_on_link(
        &self,
        dev: &Device,
        mac: &str,
        link: &mut R::Link,
        session: &[u8; PACKET_LEN],
        action: UnitAction,
        offline_only: bool,
    ) -> Execution {
        let sleeps = self.cfg().profiles.get(dev.kind).sleeps;
        let what = match action {
            UnitAction::Unlock => "unlocked",
            UnitAction::Lock => "locked",
            UnitAction::Locate => "located",
        };
        let packets = match self
            .packets_watching(dev, mac, link, session, action, offline_only)
            .await
        {
            Ok(p) => p,
            // Nothing was written: a padlock's command waits for it to wake, as if it had not
            // answered the connection.
            Err(NoPackets::Asleep(why)) if sleeps => {
                tracing::info!(device = %dev.id, "{why}: the command waits for the lock");
                self.asleep(&dev.id);
                return Execution::Queued;
            }
            Err(NoPackets::Asleep(why) | NoPackets::Failed(why)) => return Execution::Failed(why),
        };
        let (list, via) = match packets {
            Packets::Online(list) => (list, Via::Online),
            Packets::Offline(p, o) => (vec![p], Via::Offline(o)),
        };
        let n = list.len();
        let refused = match self.write_all(dev, session, link, &list, via).await {
            Ok(()) => return Execution::Done(format!("{what} ({}, {n} packet(s))", via.as_str())),
            // A sleeping lock that went before it took anything: the command waits for it.
            Err(e) if e.nothing_taken && sleeps => {
                tracing::info!(device = %dev.id, "{}: the command waits for the lock", e.error);
                self.asleep(&dev.id);
                return Execution::Queued;
            }
            Err(e)
                if matches!(via, Via::Online)
                    && action == UnitAction::Unlock
                    && e.error.unusable_packets() =>
            {
                format!(
                    "the lock refused the cloud's packets ({} to packet {} of {n})",
                    match e.error {
                        LockError::Refused(r) => r,
                        _ => "invalid",
                    },
                    e.index + 1
                )
            }
            Err(e) => {
                return Execution::Failed(format!(
                    "packet {} of {n}: {}{}",
                    e.index + 1,
                    e.error,
                    clock_hint(via, &e.error)
                ));
            }
        };
        // The cloud's packets were unusable for this lock: the offline unlock, on the same
        // link and session, when the site database has the lock's offline key.
        let (p, o) = match self.offline_packet(dev, session) {
            Ok(x) => x,
            Err(why) => return Execution::Failed(format!("{refused}; {why}")),
        };
        tracing::info!(device = %dev.id, "offline unlock ({refused})");
        match self
            .write_all(dev, session, link, &[p], Via::Offline(o))
            .await
        {
            Ok(()) => Execution::Done(format!("unlocked (offline, 1 packet(s), after {refused})")),
            Err(e) => Execution::Failed(format!(
                "{refused}; offline unlock: {}{}",
                e.error,
                clock_hint(Via::Offline(o), &e.error)
            )),
        }
    }

    /// Writes the packets one by one, each after the lock's success for the previous one.
    async fn write_all(
        &self,
        dev: &Device,
        session: &[u8; PACKET_LEN],
        link: &mut R::Link,
        list: &[[u8; PACKET_LEN]],
        via: Via,
    ) -> Result<(), NotTaken> {
        for (index, p) in list.iter().enumerate() {
            if let Err(e) = link.write(p).await {
                return Err(NotTaken {
                    index,
                    nothing_taken: index == 0 && matches!(e, BleError::Disconnected(_)),
                    error: LockError::Link(e),
                });
            }
            if let Err(error) = self.await_result(dev, session, link, via).await {
                return Err(NotTaken {
                    index,
                    nothing_taken: index == 0 && matches!(error, LockError::Sleep),
                    error,
                });
            }
        }
        Ok(())
    }

    /// Waits for the lock's answer to the packet just written: server packets on the way are
    /// uploaded; the first app packet decides.
    async fn await_result(
        &self,
        dev: &Device,
        session: &[u8; PACKET_LEN],
        link: &mut R::Link,
        via: Via,
    ) -> Result<(), LockError> {
        for _ in 0..=MAX_EXTRA_NOTIFICATIONS {
            let value = link
                .notification(NOTIFY_TIMEOUT)
                .await
                .map_err(LockError::Link)?;
            if let Some(answer) = self.on_notification(dev, session, &value, via) {
                return answer;
            }
        }
        Err(LockError::Other(format!(
            "more than {MAX_EXTRA_NOTIFICATIONS} notifications without an answer"
        )))
    }

    /// Records what a notification says: a server packet is uploaded, an app packet is a
    /// `lock_result` and the answer (`Some`) to the packet written last.
    fn on_notification(
        &self,
        dev: &Device,
        session: &[u8; PACKET_LEN],
        value: &[u8],
        via: Via,
    ) -> Option<Result<(), LockError>> {
        match noke::parse_notification(value) {
            Ok(Notification::Server(p)) => {
                self.record(
                    EventKind::LockUpload,
                    json!({"device": dev.id, "mac": dev.mac.to_ascii_uppercase(),
                           "session": hex::encode_upper(session), "packet": hex::encode_upper(p)}),
                );
                None
            }
            Ok(Notification::App { result, raw }) => {
                let mut event = json!({"device": dev.id, "result": result.event_name(),
                    "code": result.code(), "via": via.as_str(), "raw": hex::encode_upper(raw)});
                if let Via::Offline(o) = via {
                    self.offline_answer(dev, o, &result, &mut event);
                }
                self.record(EventKind::LockResult, event);
                Some(match result {
                    AppResult::Success { .. } => Ok(()),
                    AppResult::Shutdown { .. } => Err(LockError::Sleep),
                    other => Err(LockError::Refused(other.event_name())),
                })
            }
            Ok(Notification::Invalid(raw)) => {
                self.record(
                    EventKind::LockResult,
                    json!({"device": dev.id, "result": "invalid", "code": 0xFF,
                           "via": via.as_str(), "raw": hex::encode_upper(raw)}),
                );
                Some(Err(LockError::Refused("invalid")))
            }
            Err(e) => {
                self.record(
                    EventKind::DeviceError,
                    json!({"device": dev.id, "error": format!("unreadable notification: {e}")}),
                );
                None
            }
        }
    }

    /// The lock's answer to an offline unlock made here. A success proves the key (and the
    /// lock's clock, then); an `invalid_key` gets what tells a wrong key from a clock far off:
    /// the lock's time cannot be read over this protocol, so the clock is suspect whenever the
    /// packet came from the site database's key, and `key_worked_at` says whether that same
    /// key opened this lock before.
    fn offline_answer(&self, dev: &Device, o: Offline, result: &AppResult, event: &mut Value) {
        let mut live = lock(&self.live);
        let l = live.entry(dev.id.clone()).or_default();
        match result {
            AppResult::Success { .. } => l.offline_worked = Some((o.key_id, Utc::now())),
            AppResult::InvalidKey => {
                let worked = l
                    .offline_worked
                    .filter(|(k, _)| *k == o.key_id)
                    .map(|(_, at)| at);
                let packet_time = DateTime::<Utc>::from_timestamp(i64::from(o.time), 0);
                event["key"] = json!("site_database");
                event["lock_time"] = json!("unknown");
                event["packet_time"] = json!(packet_time);
                event["key_worked_at"] = json!(worked);
                event["clock_suspect"] = json!(true);
            }
            _ => {}
        }
    }

    /// The packets for an action ([`Self::packets`]), while the lock is watched: a lock that
    /// goes to sleep (0x64) or drops the link before anything is written is reported at once
    /// ([`NoPackets::Asleep`]) instead of after the cloud's wait.
    async fn packets_watching(
        &self,
        dev: &Device,
        mac: &str,
        link: &mut R::Link,
        session: &[u8; PACKET_LEN],
        action: UnitAction,
        offline_only: bool,
    ) -> Result<Packets, NoPackets> {
        let read_at = tokio::time::Instant::now();
        let ask = self.packets(dev, mac, session, read_at, action, offline_only);
        tokio::pin!(ask);
        let mut heard = 0;
        loop {
            tokio::select! {
                biased;
                p = &mut ask => return p.map_err(NoPackets::Failed),
                n = link.notification(WATCH_SLICE), if heard <= MAX_EXTRA_NOTIFICATIONS => match n {
                    Ok(value) => {
                        heard += 1;
                        if let Some(Err(LockError::Sleep)) =
                            self.on_notification(dev, session, &value, Via::Waiting)
                        {
                            return Err(NoPackets::Asleep(
                                "the lock went to sleep (shutdown) before the first packet".into(),
                            ));
                        }
                    }
                    Err(BleError::Timeout(_)) => {}
                    Err(BleError::Disconnected(why)) => {
                        return Err(NoPackets::Asleep(format!(
                            "the lock dropped the link before the first packet ({why})"
                        )));
                    }
                    Err(e) => return Err(NoPackets::Failed(e.to_string())),
                },
            }
        }
    }

    /// The packets for an action: the cloud's (online), or the offline unlock made here when
    /// the cloud is away or does not answer in time and the site database has the lock's
    /// offline key.
    async fn packets(
        &self,
        dev: &Device,
        mac: &str,
        session: &[u8; PACKET_LEN],
        read_at: tokio::time::Instant,
        action: UnitAction,
        offline_only: bool,
    ) -> Result<Packets, String> {
        // The cloud's wait ends early enough for the session to be still valid for the offline
        // unlock (a wake-to-answer lock's session lasts ~15 s).
        let cfg = self.cfg();
        let valid = cfg.profiles.get(dev.kind).session_valid;
        let left = valid
            .saturating_sub(read_at.elapsed())
            .saturating_sub(Duration::from_secs(1));
        let wait = cfg.online_unlock_timeout.min(left);
        let online_err = if offline_only {
            "offline unlock asked for".to_string()
        } else {
            match self.rpc.request(&dev.id, mac, action, session, wait).await {
                Ok(p) => return Ok(Packets::Online(p)),
                Err(e) => e,
            }
        };
        if action != UnitAction::Unlock {
            return Err(format!("{online_err}; only an unlock can be made offline"));
        }
        let (p, o) = self
            .offline_packet(dev, session)
            .map_err(|why| format!("{online_err}; {why}"))?;
        tracing::info!(device = %dev.id, "offline unlock ({online_err})");
        Ok(Packets::Offline(p, o))
    }

    /// The offline unlock for this session, from the site database's key and unlock command.
    fn offline_packet(
        &self,
        dev: &Device,
        session: &[u8; PACKET_LEN],
    ) -> Result<([u8; PACKET_LEN], Offline), String> {
        let (Some(key), Some(cmd)) = (
            dev.offline_key.as_deref().and_then(hex16),
            dev.unlock_command.as_deref().and_then(hex20),
        ) else {
            return Err(format!(
                "the site database has no offline key for `{}`",
                dev.id
            ));
        };
        let time = Utc::now().timestamp().clamp(0, i64::from(u32::MAX)) as u32;
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        let o = Offline {
            time,
            key_id: h.finish(),
        };
        Ok((noke::offline_unlock_packet(&key, &cmd, session, time), o))
    }
}

/// Blocking calls from the command router (a blocking thread).
impl<R: Radio> UnitControllers for Manager<R> {
    fn online(&self, device: &str) -> Online {
        Manager::online(self, device)
    }

    fn execute(&self, device: &str, action: UnitAction) -> Execution {
        self.handle.block_on(self.operate(device, action, false))
    }

    fn execute_timed(
        &self,
        device: &str,
        action: UnitAction,
    ) -> (Execution, Option<DateTime<Utc>>) {
        let (e, at) = self
            .handle
            .block_on(self.operate_timed(device, action, false));
        (e, Some(at))
    }
}
