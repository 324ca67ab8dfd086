//! An OSDP bus: a LibOSDP control panel (the reference C implementation, through the `libosdp`
//! crate) driving the bus's readers and keypads.
//!
//! The thread owns the port and the control panel, and refreshes LibOSDP whenever it has
//! something to do, sleeping otherwise: LibOSDP polls each reader once more than 50 ms have
//! passed since its last exchange ended (`OSDP_PD_POLL_TIMEOUT_MS`; a command queued for a
//! reader goes before the poll), reads a reply when its bytes are there and gives up on one
//! after 200 ms. It moves one step per refresh (one refresh picks a command, the next sends it;
//! one reads a reply, the next may pick what follows), so each wake refreshes in a short burst
//! (`burst`). The thread wakes when the port has bytes to
//! read (`Waiter`, epoll on a second handle of the port), when a job (LED, buzzer, output)
//! arrives, and when the next poll is due after the last byte or the last exchange's end: 51 ms
//! while the bus is in use, 201 ms once its readers have been quiet for 10 s ([`super::pace`]).
//! Reader events (keys, cards, status) come back through a callback into a queue and are handled
//! on the same thread between refreshes, so nothing here needs a lock around LibOSDP.
//!
//! A bus with no reader LibOSDP can talk to (an empty `[[bus]]`, waiting for install mode to
//! find its first reader) runs without a control panel, which LibOSDP cannot build without a
//! reader: it keeps the port, sends nothing outside install mode, and runs install mode's
//! probes and the provisioner's exchanges back to back ([`listen`]). Adopting a reader onto it
//! restarts the bus with one.
//!
//! Secure channel (`secure` per reader):
//! - `key` — the reader's key from the site database; the channel must be secure
//!   (ENFORCE_SECURE), or the reader stays offline.
//! - `install` — install mode: when the reader has no key yet, gatehouse makes one, stores it
//!   (flushed), and hands it to LibOSDP, which tries it, falls back to the install-mode default
//!   key SCBK-D, and then gives the reader the new key with KEYSET and restarts the channel with
//!   it. Once the reader has held a secure channel for a second (an SCBK-D session always ends
//!   within milliseconds in KEYSET), it is paired: `reader_paired` is recorded and from the next
//!   connection on the channel is enforced like `key`.
//! - `none` — no secure channel (readers that cannot do it).
//!
//! Whatever LibOSDP falls back to, a reader configured `key` or `install` is listened to only
//! while its secure channel is up: keys and cards arriving in plain text are dropped (and
//! `device_error` says so), so a swapped or downgraded reader cannot open anything.

use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use libosdp::{
    Channel, ChannelError, ControlPanel, ControlPanelBuilder, OsdpCommand, OsdpCommandBuzzer,
    OsdpCommandLed, OsdpCommandOutput, OsdpEvent, OsdpFlag, OsdpLedColor, OsdpLedParams,
    PdInfoBuilder,
};
use serde_json::json;

use super::config::{BusConfig, BusKind, ReaderConfig, Secure};
use super::profile::Parity;
use super::wire::{self, KeypadBuffer};
use super::{Job, PortWatch, Shared, answer, port_builder};
use crate::access::Attempt;
use crate::cloud::commands::RelayOp;
use crate::events::EventKind;
use crate::policy::{Presented, Reason, Request, Target};
use serialport::SerialPort as _;

mod scan;

/// LibOSDP polls a reader when more than `OSDP_PD_POLL_TIMEOUT_MS` (50 ms) have passed since
/// its last command or reply: an install-mode probe (`scan`) goes out only when it ends within
/// that long after a reader's reply, so it never takes a configured reader's poll slot.
const POLL_DUE: Duration = super::pace::ACTIVE_DUE;
/// A secure channel up this long without a drop runs on the reader's own key (see the header).
const PAIRED_AFTER: Duration = Duration::from_secs(1);
/// A reader not usable this long after a session starts is reported offline.
const REPORT_AFTER: Duration = Duration::from_secs(10);
/// A port that has worked this long is back (`bus_connected`); a shorter life is the same
/// outage going on (no event flood from a port that opens and fails at once).
pub(crate) const PORT_STABLE: Duration = Duration::from_secs(3);
/// A reader LibOSDP has had offline this long gets a fresh control panel (LibOSDP itself
/// would wait 5 minutes); doubling up to `RETRY_MAX` while it stays away.
const RETRY_MIN: Duration = Duration::from_secs(15);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// The most refreshes in one burst (a reply's bytes trickling in keep a burst going).
const BURST_MAX: usize = 16;

/// The serial port as a LibOSDP channel. An I/O error other than "nothing to read" marks the
/// port broken; the bus thread then tears the control panel down and reopens the port.
pub(crate) struct SerialChannel {
    /// `None` once LibOSDP closed the channel (at teardown): the port is closed then, even
    /// though the `libosdp` crate never frees the channel object itself.
    port: Option<Box<dyn tokio_serial::SerialPort>>,
    broken: Arc<Mutex<Option<String>>>,
    /// When a byte last went out or came in (the bus thread's next poll is due from it).
    activity: Arc<Mutex<Option<Instant>>>,
    /// When bytes last came in (install-mode probes go out after a reply, `scan.rs`).
    last_read: Arc<Mutex<Option<Instant>>>,
    id: i32,
    /// Counts the commands sent (LibOSDP flushes before each one).
    metrics: Option<crate::metrics::BusMetrics>,
}

impl SerialChannel {
    pub(crate) fn new(port: Box<dyn tokio_serial::SerialPort>) -> Self {
        SerialChannel {
            port: Some(port),
            broken: Arc::default(),
            activity: Arc::default(),
            last_read: Arc::default(),
            id: 0,
            metrics: None,
        }
    }

    fn active(&self) {
        *self.activity.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    pub(crate) fn with_metrics(mut self, m: crate::metrics::BusMetrics) -> Self {
        self.metrics = Some(m);
        self
    }

    fn fail(&self, what: &str, e: &std::io::Error) -> ChannelError {
        let mut b = self.broken.lock().unwrap_or_else(|e| e.into_inner());
        if b.is_none() {
            *b = Some(format!("{what}: {e}"));
        }
        ChannelError::TransportError
    }
}

fn idle(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::Interrupted
    )
}

impl Channel for SerialChannel {
    fn get_id(&self) -> i32 {
        self.id
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChannelError> {
        let Some(port) = self.port.as_mut() else {
            return Err(ChannelError::TransportError);
        };
        match port.read(buf) {
            Ok(n) => {
                if n > 0 {
                    self.active();
                    *self.last_read.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Instant::now());
                }
                Ok(n)
            }
            Err(e) if idle(&e) => Err(ChannelError::WouldBlock),
            Err(e) => Err(self.fail("read", &e)),
        }
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, ChannelError> {
        let Some(port) = self.port.as_mut() else {
            return Err(ChannelError::TransportError);
        };
        match port.write(buf) {
            Ok(n) => {
                if n > 0 {
                    self.active();
                }
                Ok(n)
            }
            Err(e) if idle(&e) => Err(ChannelError::WouldBlock),
            Err(e) => Err(self.fail("write", &e)),
        }
    }

    /// LibOSDP calls this before sending, to drop stale received bytes (not to drain output).
    fn flush(&mut self) -> Result<(), ChannelError> {
        let Some(port) = self.port.as_mut() else {
            return Ok(());
        };
        if let Some(m) = &self.metrics {
            m.sent();
        }
        match port.clear(tokio_serial::ClearBuffer::Input) {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = std::io::Error::other(e.to_string());
                Err(self.fail("flush", &e))
            }
        }
    }

    fn close(&mut self) -> Result<(), ChannelError> {
        self.port = None;
        Ok(())
    }
}

/// Per-reader state on the bus thread.
struct Reader<'a> {
    cfg: &'a ReaderConfig,
    /// Index in the control panel (`None`: not given to LibOSDP, e.g. no key).
    pd: Option<i32>,
    keys: KeypadBuffer,
    /// LibOSDP's view: the reader answers.
    online: bool,
    /// Since when LibOSDP has had it offline (this session).
    offline_since: Option<Instant>,
    /// What was last reported (`device_online`/`device_offline`): online, and with its secure
    /// channel when one is required. `None`: nothing reported yet this run.
    reported: Option<bool>,
    /// Since when the secure channel has been up, if it is.
    sc_since: Option<Instant>,
    /// Install mode: the key is stored but the reader was not yet seen using it.
    unconfirmed_key: Option<[u8; 16]>,
    plaintext_warned: bool,
    tamper: Option<bool>,
}

/// The bus thread: opens the port, runs a control panel until the port breaks or the daemon
/// stops, and starts again.
pub fn run(
    bus: &BusConfig,
    shared: &Arc<Shared>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Job>,
) {
    let BusKind::Osdp(readers) = &bus.kind else {
        return;
    };
    let mut st = BusState {
        reported: std::collections::HashMap::new(),
        retry_after: RETRY_MIN,
        watch: PortWatch::new(bus),
    };
    while !shared.stopping() {
        let port =
            match port_builder(&bus.port, bus.baud, Parity::None, Duration::ZERO).open_native() {
                Ok(p) => {
                    // Whatever sat in the input buffer belongs to an earlier conversation.
                    let _ = p.clear(tokio_serial::ClearBuffer::Input);
                    p
                }
                Err(e) => {
                    fail_jobs(shared, &mut rx, &format!("bus `{}` is down", bus.id));
                    if st.watch.down(shared, &e.to_string()) {
                        break;
                    }
                    continue;
                }
            };
        match session(bus, readers, shared, port, &mut rx, &mut st) {
            End::Stopping => break,
            End::Retry => st.retry_after = (st.retry_after * 2).min(RETRY_MAX),
            End::Broken(e) => {
                for r in readers {
                    if st.reported.get(&r.id) != Some(&false) {
                        shared.set_online(&r.id, &bus.id, false, Some(e.clone()));
                        st.reported.insert(r.id.clone(), false);
                    }
                }
                st.retry_after = RETRY_MIN;
                if st.watch.down(shared, &e) {
                    break;
                }
            }
        }
        if readers
            .iter()
            .all(|r| st.reported.get(&r.id) == Some(&true))
        {
            st.retry_after = RETRY_MIN;
        }
    }
    fail_jobs(shared, &mut rx, shared.stop_reason());
}

fn fail_jobs(shared: &Shared, rx: &mut tokio::sync::mpsc::UnboundedReceiver<Job>, why: &str) {
    while let Ok(job) = rx.try_recv() {
        answer(shared, job, Err(why.to_string()));
    }
}

/// What [`describe`] makes of the readers: LibOSDP's descriptions, each reader's index among
/// them (`None`: left out), and install-mode keys not yet confirmed.
struct Described {
    infos: Vec<PdInfoBuilder>,
    index: Vec<Option<i32>>,
    unconfirmed: Vec<Option<[u8; 16]>>,
}

/// The readers' LibOSDP descriptions, with their keys. Readers that cannot be described (no key
/// where one is required) are left out, with a `device_error` saying why.
fn describe(bus: &BusConfig, readers: &[ReaderConfig], shared: &Shared) -> Described {
    let mut infos = Vec::new();
    let mut index = Vec::new();
    let mut unconfirmed = Vec::new();
    for r in readers {
        let base = PdInfoBuilder::new()
            .name(&r.id)
            .or_else(|_| PdInfoBuilder::new().name("reader"))
            .and_then(|b| b.address(i32::from(r.address)))
            .and_then(|b| b.baud_rate(bus.baud as i32));
        let base = match base {
            Ok(b) => b,
            Err(e) => {
                shared.record(
                    EventKind::DeviceError,
                    json!({"device": r.id, "bus": bus.id, "error": format!("LibOSDP refused the reader: {e:?}")}),
                );
                index.push(None);
                unconfirmed.push(None);
                continue;
            }
        };
        let stored = match shared.store.reader_key(&r.id) {
            Ok(k) => k,
            Err(e) => {
                shared.record(
                    EventKind::DeviceError,
                    json!({"device": r.id, "bus": bus.id,
                           "error": format!("cannot read the reader's key, leaving it out: {e:#}")}),
                );
                index.push(None);
                unconfirmed.push(None);
                continue;
            }
        };
        let (info, pending) = match (r.secure, stored) {
            (Secure::None, _) => (Some(base), None),
            (Secure::Key | Secure::Install, Some((key, true))) => (
                Some(base.secure_channel_key(key).flag(OsdpFlag::EnforceSecure)),
                None,
            ),
            (Secure::Key, Some((key, false))) => (
                Some(base.secure_channel_key(key).flag(OsdpFlag::EnforceSecure)),
                None,
            ),
            (Secure::Key, None) => {
                shared.record(
                    EventKind::DeviceError,
                    json!({"device": r.id, "bus": bus.id,
                           "error": "no secure-channel key for this reader: set secure = \"install\" to pair it"}),
                );
                (None, None)
            }
            (Secure::Install, Some((key, false))) => (
                Some(base.secure_channel_key(key).flag(OsdpFlag::InstallMode)),
                Some(key),
            ),
            (Secure::Install, None) => {
                let mut key = [0u8; 16];
                let made = getrandom::getrandom(&mut key)
                    .map_err(|e| anyhow::anyhow!("no randomness: {e}"))
                    .and_then(|()| shared.store.set_reader_key(&r.id, &key, false));
                match made {
                    Ok(()) => (
                        Some(base.secure_channel_key(key).flag(OsdpFlag::InstallMode)),
                        Some(key),
                    ),
                    Err(e) => {
                        shared.record(
                            EventKind::DeviceError,
                            json!({"device": r.id, "bus": bus.id,
                                   "error": format!("could not store a new key: {e:#}")}),
                        );
                        (None, None)
                    }
                }
            }
        };
        match info {
            Some(i) => {
                index.push(Some(infos.len() as i32));
                infos.push(i);
            }
            None => index.push(None),
        }
        unconfirmed.push(pending);
    }
    Described {
        infos,
        index,
        unconfirmed,
    }
}

/// What a bus keeps across sessions.
struct BusState {
    /// What was last reported per reader (`device_online`/`device_offline`).
    reported: std::collections::HashMap<String, bool>,
    /// How long a reader may stay offline before the control panel is rebuilt.
    retry_after: Duration,
    watch: PortWatch,
}

/// How a session ended.
enum End {
    Stopping,
    /// The port broke.
    Broken(String),
    /// A reader has been offline too long: LibOSDP would wait 5 minutes before trying it
    /// again, so the control panel is built afresh on the same port.
    Retry,
}

/// One connection. `reported` carries what was reported per reader across sessions;
/// `retry_after` is how long a reader may stay offline before the control panel is rebuilt.
fn session(
    bus: &BusConfig,
    cfgs: &[ReaderConfig],
    shared: &Arc<Shared>,
    port: serialport::TTYPort,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Job>,
    state: &mut BusState,
) -> End {
    let BusState {
        reported,
        retry_after,
        watch,
    } = state;
    let retry_after = *retry_after;
    // A second handle on the port, only to wait until it has bytes to read.
    let readable = match port.try_clone_native() {
        Ok(p) => p,
        Err(e) => return End::Broken(format!("cannot watch the port: {e}")),
    };
    let mut prober = scan::Prober::new(&port, bus);
    let chan = SerialChannel::new(Box::new(port))
        .with_metrics(shared.engine.metrics().bus(&bus.id, "osdp"));
    let activity = chan.activity.clone();
    let last_read = chan.last_read.clone();
    let broken = chan.broken.clone();
    let Described {
        infos,
        index,
        unconfirmed,
    } = describe(bus, cfgs, shared);
    let started = Instant::now();
    let mut pace = super::pace::Pace::new(started);
    let mut readers: Vec<Reader> = cfgs
        .iter()
        .zip(index)
        .zip(unconfirmed)
        .map(|((cfg, pd), unconfirmed_key)| Reader {
            cfg,
            pd,
            keys: KeypadBuffer::new(cfg.inter_digit_timeout),
            online: false,
            offline_since: Some(started),
            reported: reported.get(&cfg.id).copied(),
            sc_since: None,
            unconfirmed_key,
            plaintext_warned: false,
            tamper: None,
        })
        .collect();
    if infos.is_empty() {
        // LibOSDP needs at least one reader to build a control panel: with none it can talk to
        // (an empty bus, or no reader with a key), the bus only listens.
        let why = if cfgs.is_empty() {
            "no reader on this bus (it only listens for install mode)"
        } else {
            "no usable reader on this bus"
        };
        return listen(
            shared,
            &mut prober,
            rx,
            watch,
            &readable,
            (&activity, &last_read),
            why,
        );
    }
    let mut cp = match ControlPanelBuilder::new()
        .add_channel(Box::new(chan), infos)
        .build()
    {
        Ok(cp) => cp,
        Err(e) => {
            return End::Broken(format!("LibOSDP could not set up the control panel: {e:?}"));
        }
    };
    let (etx, erx) = channel::<(i32, OsdpEvent)>();
    cp.set_event_callback(move |pd, ev| {
        let _ = etx.send((pd, ev));
        0
    });
    // Declared after the control panel, so dropped (and its handle closed) before it.
    let mut waiter = match Waiter::new(readable) {
        Ok(w) => w,
        Err(e) => return End::Broken(format!("cannot watch the port: {e}")),
    };
    // When LibOSDP last finished an exchange (the burst that read its reply).
    let mut settled: Option<Instant> = None;
    loop {
        if shared.stopping() {
            return End::Stopping;
        }
        watch.alive();
        if burst(&mut cp, &activity, &last_read) {
            settled = Some(Instant::now());
        }
        if let Some(e) = broken.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return End::Broken(e);
        }
        // Commands queued by this turn (a decision's LED and buzzer, a job) go out at once.
        let mut queued = false;
        if handle_events(&mut cp, &erx, &mut readers, bus, shared) {
            pace.used(Instant::now());
            queued = true;
        }
        let now = Instant::now();
        if now.duration_since(started) >= PORT_STABLE {
            watch.up(shared);
        }
        let mut retry = false;
        for r in readers.iter_mut() {
            let Some(pd) = r.pd else { continue };
            let online = cp.is_online(pd);
            if online != r.online {
                r.online = online;
                r.offline_since = (!online).then_some(now);
            }
            let sc = online && cp.is_sc_active(pd);
            match (sc, r.sc_since) {
                (true, None) => r.sc_since = Some(now),
                (false, Some(_)) => r.sc_since = None,
                _ => {}
            }
            // Usable: answering, and with its secure channel when one is required.
            let usable = online && (r.cfg.secure == Secure::None || r.sc_since.is_some());
            let settle = now.duration_since(started) >= REPORT_AFTER;
            if (usable && r.reported != Some(true))
                || (!usable && settle && r.reported != Some(false))
            {
                let detail = (!usable).then(|| {
                    if online {
                        "answers without the required secure channel".to_string()
                    } else {
                        "no answer (or the secure channel failed)".to_string()
                    }
                });
                shared.set_online(&r.cfg.id, &bus.id, usable, detail);
                r.reported = Some(usable);
                reported.insert(r.cfg.id.clone(), usable);
            }
            if r.offline_since
                .is_some_and(|t| now.duration_since(t) >= retry_after)
            {
                retry = true;
            }
            if let (Some(key), Some(since)) = (r.unconfirmed_key, r.sc_since)
                && now.duration_since(since) >= PAIRED_AFTER
            {
                r.unconfirmed_key = None;
                // From now on the reader must use its own key: no fallback to SCBK-D (which
                // would hand the key to any device answering on the install-mode key).
                cp.set_flag(pd, OsdpFlag::EnforceSecure, true);
                cp.set_flag(pd, OsdpFlag::InstallMode, false);
                match shared.store.set_reader_key(&r.cfg.id, &key, true) {
                    Ok(()) => {
                        tracing::info!(reader = %r.cfg.id, "reader paired: secure channel on its own key");
                        shared.record(
                            EventKind::ReaderPaired,
                            json!({"device": r.cfg.id, "bus": bus.id, "address": r.cfg.address}),
                        );
                    }
                    Err(e) => {
                        tracing::error!(reader = %r.cfg.id, "could not confirm the key: {e:#}")
                    }
                }
            }
            r.keys.expire(now);
        }
        while let Ok(job) = rx.try_recv() {
            pace.used(Instant::now());
            output(&mut cp, &readers, shared, job);
            queued = true;
        }
        prober.turn(shared, &activity, &last_read);
        if retry {
            tracing::info!(bus = %bus.id, "a reader is still offline: restarting the control panel");
            return End::Retry;
        }
        if queued {
            continue;
        }
        // Sleep until LibOSDP has something to do: a reply's bytes, a job, or the next poll (see
        // the header), due from the last byte or the end of the last exchange.
        let last_io = (*activity.lock().unwrap_or_else(|e| e.into_inner())).max(settled);
        let now = Instant::now();
        let until = pace.next_refresh(now, last_io);
        if let Some(job) = waiter.wait(rx, until) {
            pace.used(Instant::now());
            output(&mut cp, &readers, shared, job);
        }
    }
}

/// How often a listening bus ([`listen`]) looks for work when it has none.
const LISTEN_WAKE: Duration = Duration::from_millis(100);

/// A bus without a control panel (no reader LibOSDP can talk to; see [`session`]): it keeps the
/// port and sends nothing of its own. Install mode's probes and the provisioner's exchanges run
/// back to back while there are any ([`scan::Prober`]: the line has no poll to leave room
/// for); relay jobs are refused with `why`. A reader adopted onto the bus restarts it with a
/// control panel. A port that goes away ends the session as broken, like one LibOSDP saw fail.
fn listen(
    shared: &Arc<Shared>,
    prober: &mut scan::Prober,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Job>,
    watch: &mut PortWatch,
    port: &serialport::TTYPort,
    (activity, last_read): (&Mutex<Option<Instant>>, &Mutex<Option<Instant>>),
    why: &str,
) -> End {
    let started = Instant::now();
    loop {
        if shared.stopping() {
            return End::Stopping;
        }
        watch.alive();
        if started.elapsed() >= PORT_STABLE {
            watch.up(shared);
        }
        fail_jobs(shared, rx, why);
        if prober.turn(shared, activity, last_read) {
            continue;
        }
        if let Err(e) = port.bytes_to_read() {
            return End::Broken(format!("the port failed: {e}"));
        }
        shared.sleep(LISTEN_WAKE);
    }
}

/// Refreshes LibOSDP as many times as one wake needs (at most [`BURST_MAX`]); true if any read
/// bytes. LibOSDP takes a step per refresh: one picks the next command (a poll once 50 ms have
/// passed since the last exchange ended, or a queued one) and the next sends it; the one that
/// reads a reply acts on it (events, the end of the exchange) and the next may pick what
/// follows. So the burst goes on after a read, stops once a command went out (the line is busy
/// until its reply, which wakes the thread), and stops after two refreshes in a row that moved
/// no byte (the second would have sent what the first picked). Refreshing only once per wake
/// left a chosen poll unsent until the next wake, a whole poll interval later.
fn burst(
    cp: &mut ControlPanel,
    activity: &Mutex<Option<Instant>>,
    last_read: &Mutex<Option<Instant>>,
) -> bool {
    let get = |m: &Mutex<Option<Instant>>| *m.lock().unwrap_or_else(|e| e.into_inner());
    let read_before = get(last_read);
    let mut quiet = 0;
    for _ in 0..BURST_MAX {
        let (io, rd) = (get(activity), get(last_read));
        cp.refresh();
        if get(last_read) != rd {
            quiet = 0;
        } else if get(activity) != io {
            break;
        } else {
            quiet += 1;
            if quiet == 2 {
                break;
            }
        }
    }
    get(last_read) != read_before
}

/// Waits for the first of: bytes to read on the port, a job, a deadline. One per session,
/// on the bus thread (a current-thread runtime of its own: the daemon's runtime is never
/// blocked by it, and it by nothing).
struct Waiter {
    rt: tokio::runtime::Runtime,
    fd: tokio::io::unix::AsyncFd<serialport::TTYPort>,
}

impl Waiter {
    fn new(port: serialport::TTYPort) -> std::io::Result<Waiter> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let fd = {
            let _g = rt.enter();
            // Deprecated in tokio for I/O safety: a borrowed descriptor could be closed while
            // registered. This one is owned by the `AsyncFd` (a handle of our own, closed only
            // after it is deregistered), which is what `AsyncFd::register` asks; that
            // replacement is an `unsafe fn`, and the crate forbids `unsafe` (tokio-serial
            // registers its ports the same way).
            #[allow(deprecated)]
            tokio::io::unix::AsyncFd::with_interest(port, tokio::io::Interest::READABLE)?
        };
        Ok(Waiter { rt, fd })
    }

    /// Returns a job if one came. Readiness is edge-triggered: it is cleared here, before
    /// LibOSDP reads, so bytes that arrive after its read wake the next wait.
    fn wait(
        &mut self,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<Job>,
        until: Instant,
    ) -> Option<Job> {
        let fd = &self.fd;
        self.rt.block_on(async {
            tokio::select! {
                biased;
                job = rx.recv() => job,
                g = fd.readable() => {
                    if let Ok(mut g) = g {
                        g.clear_ready();
                    }
                    None
                }
                () = tokio::time::sleep_until(until.into()) => None,
            }
        })
    }
}

/// Handles the readers' events LibOSDP reported; true if there was any.
fn handle_events(
    cp: &mut ControlPanel,
    erx: &Receiver<(i32, OsdpEvent)>,
    readers: &mut [Reader],
    bus: &BusConfig,
    shared: &Arc<Shared>,
) -> bool {
    let mut any = false;
    while let Ok((pd, ev)) = erx.try_recv() {
        any = true;
        let Some(r) = readers.iter_mut().find(|r| r.pd == Some(pd)) else {
            continue;
        };
        let secure_required = r.cfg.secure != Secure::None;
        if secure_required && r.sc_since.is_none() && !matches!(ev, OsdpEvent::Status(_)) {
            if !r.plaintext_warned {
                r.plaintext_warned = true;
                shared.record(
                    EventKind::DeviceError,
                    json!({"device": r.cfg.id, "bus": bus.id,
                           "error": "reader input without a secure channel was ignored"}),
                );
            }
            continue;
        }
        match ev {
            OsdpEvent::KeyPress(k) => {
                for code in r.keys.press_all(&k.data, Instant::now()) {
                    decide(cp, r, shared, Presented::Code(&code));
                }
            }
            OsdpEvent::CardRead(c) => match c.format {
                libosdp::OsdpCardFormats::Wiegand => match wire::wiegand(c.nr_bits, &c.data) {
                    Ok(card) => decide(cp, r, shared, Presented::Card(card)),
                    Err(e) => {
                        shared.record(
                            EventKind::DeviceError,
                            json!({"device": r.cfg.id, "bus": bus.id, "error": format!("card read: {e}")}),
                        );
                        feedback(cp, r, Feedback::Denied);
                    }
                },
                libosdp::OsdpCardFormats::Unspecified => match wire::raw_id(&c.data) {
                    Some(id) => decide(cp, r, shared, Presented::Fob(&id)),
                    None => feedback(cp, r, Feedback::Denied),
                },
            },
            OsdpEvent::Status(s) => {
                if matches!(s.type_, libosdp::OsdpStatusReportType::Local) && s.nr_entries >= 1 {
                    let on = s.report[0] != 0;
                    if r.tamper != Some(on) {
                        // The first report tells the state; only a tamper is worth an event then.
                        if r.tamper.is_some() || on {
                            shared.record(
                                EventKind::Tamper,
                                json!({"device": r.cfg.id, "bus": bus.id, "active": on}),
                            );
                        }
                        r.tamper = Some(on);
                    }
                }
            }
            OsdpEvent::MfgReply(_) => {}
        }
    }
    any
}

fn decide(cp: &mut ControlPanel, r: &mut Reader, shared: &Arc<Shared>, credential: Presented) {
    let attempt = Attempt {
        request: Request {
            credential,
            target: Target::Entry(&r.cfg.entry),
            direction: r.cfg.direction,
        },
        device: Some(&r.cfg.id),
    };
    // The decision is on disk before the reader or the relay hears of it.
    let decision = shared.engine.check(&attempt, Utc::now());
    if let Ok(d) = &decision {
        tracing::info!(
            reader = %r.cfg.id,
            entry = %r.cfg.entry,
            credential = credential.kind(),
            granted = d.granted,
            reason = %d.reason,
            user = d.user.as_deref().unwrap_or("-"),
            "access decided"
        );
    }
    match decision {
        Ok(d) if d.granted => {
            let _ = shared.release_entry(&r.cfg.entry, "access_granted");
            feedback(cp, r, Feedback::Granted);
        }
        Ok(d) if d.reason == Reason::KeypadLockedOut => feedback(cp, r, Feedback::LockedOut),
        Ok(_) => feedback(cp, r, Feedback::Denied),
        Err(e) => {
            tracing::error!(reader = %r.cfg.id, "access decision not recorded, refusing: {e:#}");
            feedback(cp, r, Feedback::Denied);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feedback {
    Granted,
    Denied,
    LockedOut,
}

/// LED and buzzer patterns (times in 100 ms units): granted — green 2 s, one short beep;
/// denied — red 2 s, three beeps; locked out — red flashing 5 s, one long beep.
fn feedback(cp: &mut ControlPanel, r: &Reader, f: Feedback) {
    let Some(pd) = r.pd else { return };
    let (color, on, off, timer, beep_on, beep_off, beeps) = match f {
        Feedback::Granted => (OsdpLedColor::Green, 20, 0, 20, 2, 0, 1),
        Feedback::Denied => (OsdpLedColor::Red, 20, 0, 20, 2, 1, 3),
        Feedback::LockedOut => (OsdpLedColor::Red, 3, 3, 50, 15, 0, 1),
    };
    let led = OsdpCommand::Led(OsdpCommandLed {
        reader: 0,
        led_number: 0,
        temporary: OsdpLedParams {
            control_code: 2,
            on_count: on,
            off_count: off,
            on_color: color,
            off_color: if off == 0 { color } else { OsdpLedColor::None },
            timer_count: timer,
        },
        permanent: OsdpLedParams {
            control_code: 0,
            on_count: 0,
            off_count: 0,
            on_color: OsdpLedColor::None,
            off_color: OsdpLedColor::None,
            timer_count: 0,
        },
    });
    let buzzer = OsdpCommand::Buzzer(OsdpCommandBuzzer {
        reader: 0,
        control_code: 2,
        on_count: beep_on,
        off_count: beep_off,
        rep_count: beeps,
    });
    for cmd in [led, buzzer] {
        if cp.send_command(pd, cmd).is_err() {
            tracing::debug!(reader = %r.cfg.id, "feedback not queued (reader offline)");
        }
    }
}

/// A relay job for an OSDP reader's output (`channel` = output number).
fn output(cp: &mut ControlPanel, readers: &[Reader], shared: &Shared, job: Job) {
    if job.deadline.is_some_and(|d| Instant::now() > d) {
        let msg = format!("`{}`: expired before the bus could run it", job.device);
        return answer(shared, job, Err(msg));
    }
    let Some(r) = readers.iter().find(|r| r.cfg.id == job.device) else {
        let msg = format!("no reader `{}` on this bus", job.device);
        return answer(shared, job, Err(msg));
    };
    let (Some(pd), true) = (r.pd, r.online) else {
        return answer(
            shared,
            job,
            Err(format!("reader `{}` is offline", r.cfg.id)),
        );
    };
    let Ok(output_no) = u8::try_from(job.channel) else {
        let msg = format!("no output {}", job.channel);
        return answer(shared, job, Err(msg));
    };
    // OSDP OUT control codes: 1 permanent off, 2 permanent on, 5 temporary on (timer in
    // 100 ms units), then back to the permanent state.
    let (control_code, timer_count, what) = match job.op {
        RelayOp::On => (2, 0, "on".to_string()),
        RelayOp::Off => (1, 0, "off".to_string()),
        RelayOp::Pulse { ms } => (
            5,
            u16::try_from(ms.div_ceil(100).max(1)).unwrap_or(u16::MAX),
            format!("pulsed for {ms} ms"),
        ),
    };
    let cmd = OsdpCommand::Output(OsdpCommandOutput {
        output_no,
        control_code,
        timer_count,
    });
    let result = cp
        .send_command(pd, cmd)
        .map(|()| {
            format!(
                "reader `{}` output {output_no} {what} (command queued for the reader)",
                r.cfg.id
            )
        })
        .map_err(|e| format!("LibOSDP refused the output command: {e:?}"));
    answer(shared, job, result);
}
