//! A Modbus RTU bus: tokio-modbus as master on a current-thread runtime of the bus's own thread.
//!
//! One transaction at a time, each under the bus timeout. Relay jobs go before polls. Each
//! device is polled at its profile's interval (inputs, coils, readings); a device that fails
//! `offline_after_failures` transactions in a row is reported offline and then polled with
//! backoff (up to 30 s), so a dead device costs the bus one timeout per backoff period, not one
//! per poll. A Modbus exception means the device is alive but refused: it is recorded as
//! `device_error` when it starts or changes, never a crash. Before each transaction the port's
//! input buffer is cleared, so a late answer to a timed-out request cannot be taken for the
//! next one.
//!
//! Poll timing. Each device is polled on a fixed grid of its period; the devices' first slots are
//! spread evenly over the period ([`first_slot`]) so that devices with the same period take turns
//! instead of queueing behind each other, and a device back from backoff rejoins its own grid.
//! The wait for a slot is one wake of the bus thread, at the slot: a `timerfd` on the bus's
//! runtime ([`super::rt::SlotTimer`]; tokio's own timer has 1 ms ticks and rounds up, up to
//! ~2 ms late), raced with the job queue so that a relay job never waits for it. With nothing
//! due, the thread sleeps up to [`IDLE_WAKE`]. The thread itself runs at real-time priority where
//! permitted ([`super::rt`]). Events are recorded through the store's group
//! commit ([`Shared::record`]), so no poll waits for the disk. Each poll's lateness (the write of
//! its first request − its slot) is emitted as a `trace` event on [`POLL_START_TARGET`].
//!
//! The Waveshare board-timed pulse ("flash on": FC05 with the duration as the value) is not a
//! valid FC05 for tokio-modbus (it only knows 0xFF00/0x0000 and rejects the echo), so that one
//! request is framed here ([`wire::modbus_frame`]) on the same port.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};
use tokio_serial::{SerialPort, SerialPortBuilderExt as _};

use super::config::{BusConfig, BusKind, DeviceConfig, InputRole};
use super::wire;
use super::{Job, PortWatch, Shared, answer, port_builder};
use crate::cloud::commands::RelayOp;
use crate::events::EventKind;

mod scan;

/// Longest wait between polls of an offline device.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The `tracing` target of the per-poll timing event (level `trace`): fields `bus`, `device` and
/// `late_us`, the time from the poll's slot to the write of its first request, in microseconds.
pub const POLL_START_TARGET: &str = "gatehouse::rs485::modbus::poll_start";

/// The serial port shared between tokio-modbus's framed transport and the hand-framed requests.
/// Only the bus thread uses it, one transaction at a time; the lock is never held across an
/// await.
#[derive(Clone)]
struct SharedPort(Arc<Mutex<PortState>>);

struct PortState {
    stream: tokio_serial::SerialStream,
    /// When a write first put bytes on the port since [`SharedPort::take_written`].
    written: Option<Instant>,
}

impl std::fmt::Debug for SharedPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedPort")
    }
}

impl SharedPort {
    fn new(stream: tokio_serial::SerialStream) -> Self {
        SharedPort(Arc::new(Mutex::new(PortState {
            stream,
            written: None,
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PortState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with<R>(&self, f: impl FnOnce(&mut tokio_serial::SerialStream) -> R) -> R {
        f(&mut self.state().stream)
    }

    /// When the first write since the last call put bytes on the port (and forgets it).
    fn take_written(&self) -> Option<Instant> {
        self.state().written.take()
    }
}

impl AsyncRead for SharedPort {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.with(|p| Pin::new(p).poll_read(cx, buf))
    }
}

impl AsyncWrite for SharedPort {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut s = self.state();
        let r = Pin::new(&mut s.stream).poll_write(cx, buf);
        if s.written.is_none() && matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            s.written = Some(Instant::now());
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        self.with(|p| Pin::new(p).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        self.with(|p| Pin::new(p).poll_shutdown(cx))
    }
}

/// Why a transaction did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TxError {
    /// The device answered with a Modbus exception: alive, but refused.
    Exception(String),
    /// No (valid) answer in time.
    Timeout,
    /// The port failed: the bus reopens it.
    Port(String),
    /// A garbled or mismatched answer.
    Protocol(String),
}

impl std::fmt::Display for TxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxError::Exception(e) => write!(f, "Modbus exception: {e}"),
            TxError::Timeout => f.write_str("no answer (timeout)"),
            TxError::Port(e) => write!(f, "serial port: {e}"),
            TxError::Protocol(e) => write!(f, "bad answer: {e}"),
        }
    }
}

fn exception_name(e: ExceptionCode) -> String {
    format!("{e:?}").to_lowercase()
}

/// Per-device state on the bus thread.
struct Dev<'a> {
    cfg: &'a DeviceConfig,
    next_poll: Instant,
    failures: u32,
    online: Option<bool>,
    /// The error last recorded (exceptions), so that a repeated one is not recorded again.
    last_error: Option<String>,
    inputs: Vec<Option<bool>>,
    /// A changed input value seen once; acted on when the next poll confirms it (debounce).
    candidates: Vec<Option<bool>>,
    readings: Vec<Option<(f64, Instant)>>,
    identified: bool,
    /// Poll slots missed since the device was last polled on time (see [`next_slot`]).
    late: Late,
}

/// Missed poll slots of one device: counted, and reported once as a `device_error` when the
/// device has not been polled on its period for [`LATE_REPORT_AFTER`].
#[derive(Debug, Default)]
struct Late {
    /// Slots skipped in all (for metrics).
    total: u64,
    /// Since when every poll has been late, and whether that was reported.
    since: Option<Instant>,
    reported: bool,
}

/// How long a device may miss its period before a `device_error` says so.
const LATE_REPORT_AFTER: Duration = Duration::from_secs(60);

/// The fixed poll schedule: the slot after `scheduled` (the slot this poll was due at) is
/// `scheduled + period`; if that is already past at `now`, the missed slots are skipped (not
/// made up with a burst) and counted. Slots stay on multiples of the period from the first
/// one, so a device's polls do not drift by the time each poll takes.
fn next_slot(scheduled: Instant, now: Instant, period: Duration) -> (Instant, u64) {
    let next = scheduled + period;
    if next >= now || period.is_zero() {
        return (next, 0);
    }
    let behind = now.duration_since(next).as_nanos();
    let missed = behind / period.as_nanos() + 1;
    let missed = u64::try_from(missed).unwrap_or(u64::MAX);
    let skip = u32::try_from(missed).unwrap_or(u32::MAX);
    (next + period.saturating_mul(skip), missed)
}

/// The first poll slot of device `i` of `n` on a bus: the first slots are spread evenly over the
/// device's period from `start`, so that devices with the same period take turns (four devices
/// polled every 10 ms: one every 2.5 ms) rather than several falling due at once and all but
/// one starting late.
fn first_slot(start: Instant, i: usize, n: usize, period: Duration) -> Instant {
    let n = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
    let i = u32::try_from(i).unwrap_or(0) % n;
    start + period / n * i
}

/// The longest the bus thread sleeps with nothing due (it ticks its liveness beat at each
/// wake; `liveness` wants a tick at least every second).
const IDLE_WAKE: Duration = Duration::from_millis(1000);

/// A software-timed pulse to end.
struct PendingOff {
    at: Instant,
    device: usize,
    channel: u16,
    /// Failed attempts so far (the first failure is recorded; it is retried until it works).
    failures: u32,
}

/// Between attempts to end a pulse that failed.
const OFF_RETRY: Duration = Duration::from_millis(500);
/// After a timeout or a garbled answer: let a late answer arrive and be discarded before the
/// next request, so it cannot be taken for the next device's.
const QUIET: Duration = Duration::from_millis(30);

struct Bus<'a> {
    cfg: &'a BusConfig,
    timeout: Duration,
    shared: &'a Arc<Shared>,
    port: SharedPort,
    ctx: Context,
    devs: Vec<Dev<'a>>,
    offs: Vec<PendingOff>,
    started: Instant,
    metrics: crate::metrics::BusMetrics,
    /// Install mode (`modbus/scan.rs`).
    pairing: scan::State,
}

/// The bus thread.
pub fn run(bus: &BusConfig, shared: &Arc<Shared>, rx: tokio::sync::mpsc::UnboundedReceiver<Job>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(bus = %bus.id, "cannot start the bus runtime: {e}");
            return;
        }
    };
    rt.block_on(run_async(bus, shared, rx));
}

async fn run_async(
    bus: &BusConfig,
    shared: &Arc<Shared>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Job>,
) {
    let BusKind::Modbus {
        parity,
        timeout,
        devices,
    } = &bus.kind
    else {
        return;
    };
    let mut watch = PortWatch::new(bus);
    let metrics = shared.engine.metrics().bus(&bus.id, "modbus");
    // Pulses to end survive reconnections: a coil switched on must be switched off.
    let mut offs: Vec<PendingOff> = Vec::new();
    // Device state survives reconnections (inputs are not re-reported after a replug).
    let now = Instant::now();
    let mut devs: Vec<Dev> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| Dev {
            cfg: d,
            next_poll: first_slot(now, i, devices.len(), d.poll_interval),
            failures: 0,
            online: None,
            last_error: None,
            inputs: vec![None; input_count(d)],
            candidates: vec![None; input_count(d)],
            readings: vec![None; d.profile.readings.len()],
            identified: false,
            late: Late::default(),
        })
        .collect();
    while !shared.stopping() {
        let stream = match port_builder(&bus.port, bus.baud, *parity, *timeout).open_native_async()
        {
            Ok(s) => s,
            Err(e) => {
                fail_jobs(shared, &mut rx, &format!("bus `{}` is down", bus.id));
                if watch.down(shared, &e.to_string()) {
                    break;
                }
                continue;
            }
        };
        let port = SharedPort::new(stream);
        let mut b = Bus {
            cfg: bus,
            timeout: *timeout,
            shared,
            ctx: tokio_modbus::client::rtu::attach(port.clone()),
            port,
            devs: std::mem::take(&mut devs),
            offs: std::mem::take(&mut offs),
            started: Instant::now(),
            metrics: metrics.clone(),
            pairing: scan::State::default(),
        };
        let broken = b.session(&mut rx, &mut watch).await;
        if broken.is_none() {
            // Stopping: end running pulses now, as far as the bus lets us.
            b.switch_off_pending().await;
        }
        devs = std::mem::take(&mut b.devs);
        offs = std::mem::take(&mut b.offs);
        drop(b);
        for d in devs.iter_mut() {
            if broken.is_some() && d.online == Some(true) {
                shared.set_online(&d.cfg.id, &bus.id, false, broken.clone());
                d.online = Some(false);
            }
            d.identified = false;
        }
        if let Some(e) = broken
            && watch.down(shared, &e)
        {
            break;
        }
    }
    fail_jobs(shared, &mut rx, shared.stop_reason());
}

/// Waits until `at` on the precise timer, or on tokio's when there is none (or it failed).
async fn slot_wait(timer: &mut Option<super::rt::SlotTimer>, at: Instant) {
    if let Some(t) = timer {
        match t.sleep_until(at).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!("precise timer failed, using tokio's: {e}");
                *timer = None;
            }
        }
    }
    tokio::time::sleep_until(at.into()).await;
}

fn input_count(d: &DeviceConfig) -> usize {
    d.profile
        .inputs
        .as_ref()
        .map_or(0, |i| usize::from(i.count))
}

fn fail_jobs(shared: &Shared, rx: &mut tokio::sync::mpsc::UnboundedReceiver<Job>, why: &str) {
    while let Ok(job) = rx.try_recv() {
        answer(shared, job, Err(why.to_string()));
    }
}

impl Bus<'_> {
    /// Runs until the port breaks (`Some(error)`) or the daemon stops (`None`).
    async fn session(
        &mut self,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<Job>,
        watch: &mut PortWatch,
    ) -> Option<String> {
        // Without a timerfd (never seen on Linux) the bus falls back to tokio's timer.
        let mut timer = match super::rt::SlotTimer::new() {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(bus = %self.cfg.id, "no precise timer, polls may start ~2 ms late: {e}");
                None
            }
        };
        loop {
            if self.shared.stopping() {
                return None;
            }
            watch.alive();
            let now = Instant::now();
            if now.duration_since(self.started) >= super::osdp::PORT_STABLE {
                watch.up(self.shared);
            }
            // Pulses to end first, then jobs, then the most overdue poll.
            if let Some(i) = self.offs.iter().position(|o| o.at <= now) {
                let mut off = self.offs.swap_remove(i);
                let r = self.write_coil(off.device, off.channel, false).await;
                if let Err(e) = r {
                    if off.failures == 0 {
                        self.device_error(off.device, &format!("ending a pulse (retrying): {e}"));
                    }
                    off.failures = off.failures.saturating_add(1);
                    off.at = Instant::now() + OFF_RETRY;
                    self.offs.push(off);
                    if let TxError::Port(p) = e {
                        return Some(p);
                    }
                }
                continue;
            }
            if let Ok(job) = rx.try_recv() {
                if let Some(p) = self.job(job).await {
                    return Some(p);
                }
                continue;
            }
            let due = self
                .devs
                .iter()
                .enumerate()
                .min_by_key(|(_, d)| d.next_poll)
                .map(|(i, d)| (i, d.next_poll));
            let next_off = self.offs.iter().map(|o| o.at).min();
            match due {
                Some((i, at)) if at <= now => {
                    if let Some(p) = self.poll(i).await {
                        return Some(p);
                    }
                }
                _ => {
                    match self.pairing_turn(due.map(|d| d.1), rx).await {
                        scan::Turn::Idle => {}
                        scan::Turn::Busy => continue,
                        scan::Turn::Broken(p) => return Some(p),
                        scan::Turn::Job(job) => {
                            if let Some(p) = self.job(job).await {
                                return Some(p);
                            }
                            continue;
                        }
                    }
                    let wake = [due.map(|d| d.1), next_off]
                        .into_iter()
                        .flatten()
                        .min()
                        .unwrap_or(now + IDLE_WAKE)
                        .min(now + IDLE_WAKE);
                    tokio::select! {
                        job = rx.recv() => match job {
                            Some(job) => {
                                if let Some(p) = self.job(job).await {
                                    return Some(p);
                                }
                            }
                            // Every sender is gone: the daemon is stopping.
                            None => return None,
                        },
                        () = slot_wait(&mut timer, wake) => {}
                    }
                }
            }
        }
    }

    /// Clears the input buffer and runs one transaction under the bus timeout.
    async fn tx<T, F>(&mut self, i: usize, f: F) -> Result<T, TxError>
    where
        F: for<'c> FnOnce(
            &'c mut Context,
        ) -> Pin<
            Box<dyn std::future::Future<Output = tokio_modbus::Result<T>> + Send + 'c>,
        >,
    {
        self.port
            .with(|p| p.clear(tokio_serial::ClearBuffer::Input))
            .map_err(|e| TxError::Port(e.to_string()))?;
        self.ctx.set_slave(Slave(self.devs[i].cfg.address));
        let r = self.tx_once(f).await;
        if matches!(r, Err(TxError::Timeout | TxError::Protocol(_))) {
            tokio::time::sleep(QUIET).await;
            let _ = self
                .port
                .with(|p| p.clear(tokio_serial::ClearBuffer::Input));
        }
        r
    }

    async fn tx_once<T, F>(&mut self, f: F) -> Result<T, TxError>
    where
        F: for<'c> FnOnce(
            &'c mut Context,
        ) -> Pin<
            Box<dyn std::future::Future<Output = tokio_modbus::Result<T>> + Send + 'c>,
        >,
    {
        let t0 = Instant::now();
        let r = self.tx_inner(f).await;
        self.count(t0.elapsed(), &r);
        r
    }

    fn count<T>(&self, elapsed: Duration, r: &Result<T, TxError>) {
        use crate::metrics::TxOutcome;
        let outcome = match r {
            Ok(_) | Err(TxError::Exception(_)) => TxOutcome::Answered,
            Err(TxError::Timeout) => TxOutcome::Timeout,
            Err(TxError::Protocol(_)) => TxOutcome::Garbled,
            Err(TxError::Port(_)) => TxOutcome::PortError,
        };
        self.metrics.transaction(elapsed, outcome);
    }

    async fn tx_inner<T, F>(&mut self, f: F) -> Result<T, TxError>
    where
        F: for<'c> FnOnce(
            &'c mut Context,
        ) -> Pin<
            Box<dyn std::future::Future<Output = tokio_modbus::Result<T>> + Send + 'c>,
        >,
    {
        match tokio::time::timeout(self.timeout, f(&mut self.ctx)).await {
            Err(_) => Err(TxError::Timeout),
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(ex))) => Err(TxError::Exception(exception_name(ex))),
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                // A decode error leaves tokio-modbus's framing unusable: start a fresh one on
                // the same port. A real I/O error means the port is gone.
                self.ctx = tokio_modbus::client::rtu::attach(self.port.clone());
                match e.kind() {
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
                        Err(TxError::Protocol(e.to_string()))
                    }
                    _ => Err(TxError::Port(e.to_string())),
                }
            }
            Ok(Err(tokio_modbus::Error::Protocol(e))) => Err(TxError::Protocol(e.to_string())),
        }
    }

    async fn write_coil(&mut self, i: usize, channel: u16, on: bool) -> Result<(), TxError> {
        let base = self.devs[i]
            .cfg
            .profile
            .relays
            .as_ref()
            .map_or(0, |r| r.coil_base);
        let addr = base.wrapping_add(channel);
        self.tx(i, move |c| Box::pin(c.write_single_coil(addr, on)))
            .await
    }

    /// FC05 with an arbitrary value (board-timed pulse), framed here; the device echoes it.
    async fn write_single_raw(
        &mut self,
        i: usize,
        register: u16,
        value: u16,
    ) -> Result<(), TxError> {
        let addr = self.devs[i].cfg.address;
        let frame = wire::modbus_frame(
            addr,
            0x05,
            &[register.to_be_bytes(), value.to_be_bytes()].concat(),
        );
        let port = self.port.clone();
        port.with(|p| p.clear(tokio_serial::ClearBuffer::Input))
            .map_err(|e| TxError::Port(e.to_string()))?;
        let mut io = port.clone();
        let exchange = async move {
            io.write_all(&frame).await?;
            io.flush().await?;
            // An echo is 8 bytes; an exception reply is 5.
            let mut got = Vec::with_capacity(8);
            let mut buf = [0u8; 8];
            loop {
                let n = io.read(&mut buf[..8 - got.len()]).await?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                }
                got.extend_from_slice(&buf[..n]);
                if got.len() >= 5 && got[1] & 0x80 != 0 || got.len() == 8 {
                    return Ok::<_, std::io::Error>((frame, got));
                }
            }
        };
        let t0 = Instant::now();
        let r = tokio::time::timeout(self.timeout, exchange).await;
        let elapsed = t0.elapsed();
        let r = match r {
            Err(_) => {
                tokio::time::sleep(QUIET).await;
                let _ = port.with(|p| p.clear(tokio_serial::ClearBuffer::Input));
                Err(TxError::Timeout)
            }
            Ok(Err(e)) => Err(TxError::Port(e.to_string())),
            Ok(Ok((sent, got))) => match wire::check_echo(&sent, &got) {
                Ok(()) => Ok(()),
                Err(wire::EchoError::Exception(code)) => {
                    Err(TxError::Exception(format!("exception code {code}")))
                }
                Err(e) => Err(TxError::Protocol(e.to_string())),
            },
        };
        self.count(elapsed, &r);
        r
    }

    /// A relay job. Returns `Some(error)` if the port broke.
    async fn job(&mut self, job: Job) -> Option<String> {
        if job.deadline.is_some_and(|d| Instant::now() > d) {
            let msg = format!("`{}`: expired before the bus could run it", job.device);
            answer(self.shared, job, Err(msg));
            return None;
        }
        let Some(i) = self.devs.iter().position(|d| d.cfg.id == job.device) else {
            let msg = format!("no device `{}` on bus `{}`", job.device, self.cfg.id);
            answer(self.shared, job, Err(msg));
            return None;
        };
        let profile = &self.devs[i].cfg.profile;
        let Some(relays) = profile.relays.as_ref() else {
            let msg = format!("`{}` ({}) has no relays", job.device, profile.id);
            answer(self.shared, job, Err(msg));
            return None;
        };
        if job.channel >= relays.count {
            let msg = format!(
                "`{}` has relays 0 to {}, not {}",
                job.device,
                relays.count - 1,
                job.channel
            );
            answer(self.shared, job, Err(msg));
            return None;
        }
        // A new command on a channel replaces a software pulse still running on it.
        self.offs
            .retain(|o| !(o.device == i && o.channel == job.channel));
        // Relay writes are idempotent: one lost frame gets one more try.
        let mut result = self.relay_op(i, &job).await;
        if matches!(result, Err(TxError::Timeout | TxError::Protocol(_)))
            && job.deadline.is_none_or(|d| Instant::now() < d)
        {
            result = self.relay_op(i, &job).await;
        }
        if job.op == RelayOp::Off && result.is_err() {
            // Keep trying to switch it off.
            self.offs.push(PendingOff {
                at: Instant::now() + OFF_RETRY,
                device: i,
                channel: job.channel,
                failures: 1,
            });
        }
        self.outcome(i, &result, false);
        let port_broken = match &result {
            Err(TxError::Port(p)) => Some(p.clone()),
            _ => None,
        };
        answer(
            self.shared,
            job,
            result.map_err(|e| format!("{}: {e}", self.devs[i].cfg.id)),
        );
        port_broken
    }

    async fn relay_op(&mut self, i: usize, job: &Job) -> Result<String, TxError> {
        let profile = &self.devs[i].cfg.profile;
        let Some(relays) = profile.relays.as_ref() else {
            return Err(TxError::Protocol("no relays".into()));
        };
        match job.op {
            RelayOp::On => self
                .write_coil(i, job.channel, true)
                .await
                .map(|()| format!("relay {} on", job.channel)),
            RelayOp::Off => self
                .write_coil(i, job.channel, false)
                .await
                .map(|()| format!("relay {} off", job.channel)),
            RelayOp::Pulse { ms } => match (profile.board_pulse_units(ms), relays.pulse) {
                (Some(units), Some(p)) => self
                    .write_single_raw(i, p.register_base.wrapping_add(job.channel), units)
                    .await
                    .map(|()| {
                        format!(
                            "relay {} pulsed for {} ms (timed by the board)",
                            job.channel,
                            u32::from(units) * p.unit_ms
                        )
                    }),
                _ => {
                    // The off is due whatever the on's answer was: a board that switched on but
                    // whose echo was lost must still be switched off (off is idempotent).
                    let channel = job.channel;
                    self.offs
                        .retain(|o| !(o.device == i && o.channel == channel));
                    self.offs.push(PendingOff {
                        at: Instant::now() + Duration::from_millis(u64::from(ms)),
                        device: i,
                        channel,
                        failures: 0,
                    });
                    self.write_coil(i, channel, true)
                        .await
                        .map(|()| format!("relay {channel} pulsed for {ms} ms"))
                }
            },
        }
    }

    /// Accounts a transaction's result to the device: liveness, backoff, error events.
    /// `poll`: a poll's result (only a good poll clears the remembered exception, so that a
    /// relay job between two failing polls does not make the same exception recorded again).
    fn outcome<T>(&mut self, i: usize, r: &Result<T, TxError>, poll: bool) {
        let bus = self.cfg.id.clone();
        let d = &mut self.devs[i];
        match r {
            Ok(_) => {
                d.failures = 0;
                if poll {
                    d.last_error = None;
                }
                if d.online != Some(true) {
                    d.online = Some(true);
                    self.shared.set_online(&d.cfg.id, &bus, true, None);
                }
            }
            Err(TxError::Exception(e)) => {
                // Alive: it answered.
                d.failures = 0;
                if d.online != Some(true) {
                    d.online = Some(true);
                    self.shared.set_online(&d.cfg.id, &bus, true, None);
                }
                if d.last_error.as_deref() != Some(e.as_str()) {
                    d.last_error = Some(e.clone());
                    self.shared.record(
                        EventKind::DeviceError,
                        json!({"device": d.cfg.id, "bus": bus, "error": format!("Modbus exception: {e}")}),
                    );
                }
            }
            Err(e @ (TxError::Timeout | TxError::Protocol(_))) => {
                d.failures = d.failures.saturating_add(1);
                if d.failures >= d.cfg.profile.offline_after_failures && d.online != Some(false) {
                    d.online = Some(false);
                    d.identified = false;
                    self.shared
                        .set_online(&d.cfg.id, &bus, false, Some(e.to_string()));
                }
            }
            Err(TxError::Port(_)) => {}
        }
    }

    fn device_error(&mut self, i: usize, msg: &str) {
        self.shared.record(
            EventKind::DeviceError,
            json!({"device": self.devs[i].cfg.id, "bus": self.cfg.id, "error": msg}),
        );
    }

    /// Polls one device: identity once, inputs, readings, or (relay boards) the coils.
    async fn poll(&mut self, i: usize) -> Option<String> {
        let cfg = self.devs[i].cfg;
        let profile = &cfg.profile;
        let slot = self.devs[i].next_poll;
        self.port.take_written();
        let mut result: Result<(), TxError> = Ok(());
        if !self.devs[i].identified
            && let Some(id) = &profile.identity
        {
            let reg = id.firmware_register;
            match self
                .tx(i, move |c| Box::pin(c.read_holding_registers(reg, 1)))
                .await
            {
                // A reply with fewer registers than asked is refused like any short reply.
                Ok(words) if words.is_empty() => {
                    result = Err(TxError::Protocol(
                        "identity read answered 0 of 1 registers".into(),
                    ));
                }
                Ok(words) => {
                    self.devs[i].identified = true;
                    tracing::info!(device = %cfg.id, firmware = ?words, "device identified");
                }
                // Clones without the register answer with an exception: fine.
                Err(TxError::Exception(_)) => self.devs[i].identified = true,
                Err(e) => result = Err(e),
            }
        }
        if result.is_ok()
            && let Some(inputs) = &profile.inputs
        {
            let (base, count) = (inputs.base, inputs.count);
            match self
                .tx(i, move |c| Box::pin(c.read_discrete_inputs(base, count)))
                .await
            {
                Ok(bits) => self.inputs(i, &bits),
                Err(e) => result = Err(e),
            }
        }
        if result.is_ok() {
            for (ri, r) in profile.readings.iter().enumerate() {
                let reg = r.register;
                match self
                    .tx(i, move |c| Box::pin(c.read_input_registers(reg, 1)))
                    .await
                {
                    Ok(words) if !words.is_empty() => self.reading(i, ri, words[0]),
                    Ok(_) => {
                        result = Err(TxError::Protocol("empty register read".into()));
                        break;
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        if result.is_ok()
            && profile.inputs.is_none()
            && profile.readings.is_empty()
            && let Some(relays) = &profile.relays
        {
            let (base, count) = (relays.coil_base, relays.count);
            if let Err(e) = self
                .tx(i, move |c| Box::pin(c.read_coils(base, count)))
                .await
            {
                result = Err(e);
            }
        }
        if let Some(at) = self.port.take_written() {
            let late = at.saturating_duration_since(slot);
            tracing::trace!(
                target: POLL_START_TARGET,
                bus = self.cfg.id.as_str(),
                device = cfg.id.as_str(),
                late_us = u64::try_from(late.as_micros()).unwrap_or(u64::MAX),
                "poll started"
            );
        }
        self.outcome(i, &result, true);
        let d = &mut self.devs[i];
        let interval = cfg.poll_interval;
        let extra = d
            .failures
            .saturating_sub(cfg.profile.offline_after_failures.saturating_sub(1));
        let now = Instant::now();
        let mut late_for = None;
        if extra == 0 {
            // On its period: the next slot of the fixed schedule.
            let (next, missed) = next_slot(d.next_poll, now, interval);
            d.next_poll = next;
            if missed == 0 {
                d.late = Late {
                    total: d.late.total,
                    ..Late::default()
                };
            } else {
                d.late.total = d.late.total.saturating_add(missed);
                let since = *d.late.since.get_or_insert(now);
                if !d.late.reported && now.duration_since(since) >= LATE_REPORT_AFTER {
                    d.late.reported = true;
                    late_for = Some(d.late.total);
                }
            }
        } else {
            // Backing off a failing device: from now, doubling, on the device's own grid (so
            // that it does not fall on other devices' slots when it answers again).
            let wait =
                (interval * 2u32.saturating_pow(extra.min(16))).min(MAX_BACKOFF.max(interval));
            d.next_poll = next_slot(d.next_poll, now + wait, interval).0;
        }
        if let Some(total) = late_for {
            self.device_error(
                i,
                &format!(
                    "cannot be polled every {} ms: every poll for the last minute was late \
                     ({total} poll slots skipped so far); lengthen poll_interval_ms or put fewer \
                     devices on the bus",
                    interval.as_millis()
                ),
            );
        }
        match result {
            Err(TxError::Port(p)) => Some(p),
            _ => None,
        }
    }

    fn inputs(&mut self, i: usize, bits: &[bool]) {
        let bus = self.cfg.id.clone();
        let cfg = self.devs[i].cfg;
        for input in &cfg.inputs {
            let Some(&raw) = bits.get(usize::from(input.channel)) else {
                continue;
            };
            let active = raw != input.invert;
            let ch = usize::from(input.channel);
            let dev = &mut self.devs[i];
            let before = dev.inputs[ch];
            if before == Some(active) {
                dev.candidates[ch] = None;
                continue;
            }
            // A change counts once two polls in a row agree (a bouncing contact is not a door
            // opening twice); the first read after start only sets the state.
            if before.is_some() && dev.candidates[ch] != Some(active) {
                dev.candidates[ch] = Some(active);
                continue;
            }
            dev.candidates[ch] = None;
            dev.inputs[ch] = Some(active);
            let first = before.is_none();
            let entry = input.entry.as_deref();
            let base =
                json!({"device": cfg.id, "bus": bus, "channel": input.channel, "entry": entry});
            self.fact(cfg.id.as_str(), input, active, first);
            match (input.role, active) {
                (InputRole::DoorContact, true) if !first => {
                    let forced = entry.is_some_and(|e| !self.shared.recently_released(e));
                    self.shared.record(
                        if forced {
                            EventKind::DoorForced
                        } else {
                            EventKind::DoorOpened
                        },
                        base,
                    );
                }
                (InputRole::DoorContact, false) if !first => {
                    self.shared.record(EventKind::DoorClosed, base);
                }
                (InputRole::Motion, true) => self.shared.record(EventKind::Motion, base),
                (InputRole::ExitButton, true) if !first => {
                    self.shared.record(EventKind::ExitRequest, base);
                    if let Some(e) = entry
                        && let Err(err) = self.shared.release_entry(e, "exit_request")
                    {
                        tracing::warn!(entry = e, error = %err, "exit button failed");
                    }
                }
                (InputRole::ManualRelease, true) if !first => {
                    // A physical override: the door may open without being forced.
                    if let Some(e) = entry {
                        self.shared.note_manual_release(e);
                    }
                    self.shared.record(EventKind::ManualRelease, base);
                }
                (InputRole::Tamper, on) if on || !first => {
                    let mut p = base;
                    p["active"] = json!(on);
                    self.shared.record(EventKind::Tamper, p);
                }
                _ => {}
            }
        }
    }

    /// Hands an input change to automation (door contacts, motion, manual releases).
    fn fact(&self, device: &str, input: &super::config::InputConfig, active: bool, first: bool) {
        use crate::automation::facts::Observed;
        let facts = self.shared.engine.facts();
        let entry = input.entry.clone();
        let f = match (input.role, active, entry) {
            (InputRole::DoorContact, true, Some(entry)) if !first => Observed::DoorOpened { entry },
            (InputRole::DoorContact, false, Some(entry)) if !first => {
                Observed::DoorClosed { entry }
            }
            (InputRole::Motion, true, _) => Observed::Motion {
                device: device.to_string(),
                channel: Some(input.channel),
            },
            (InputRole::ManualRelease, true, Some(entry)) if !first => {
                Observed::ManualRelease { entry }
            }
            _ => return,
        };
        facts.send(f);
    }

    fn reading(&mut self, i: usize, ri: usize, word: u16) {
        let cfg = self.devs[i].cfg;
        let r = &cfg.profile.readings[ri];
        let value = wire::reading(word, r.ty, r.scale);
        // Every temperature reading goes to automation (its minimum duration needs them all),
        // not only those reported as events.
        if r.unit == "celsius" && value.is_finite() {
            self.shared
                .engine
                .facts()
                .send(crate::automation::facts::Observed::Temperature {
                    device: cfg.id.clone(),
                    channel: Some(u16::try_from(ri).unwrap_or(u16::MAX)),
                    celsius: value,
                });
        }
        let now = Instant::now();
        let last = self.devs[i].readings[ri];
        let report = match last {
            None => true,
            Some((v, at)) => {
                (value - v).abs() >= r.report_delta
                    || now.duration_since(at) >= Duration::from_secs(r.report_every_s)
            }
        };
        if report {
            self.devs[i].readings[ri] = Some((value, now));
            self.shared.record(
                EventKind::SensorReading,
                json!({"device": cfg.id, "bus": self.cfg.id, "reading": r.name,
                       "value": value, "unit": r.unit}),
            );
        }
    }

    /// Ends running software pulses before the bus stops (the daemon stops, or a reload
    /// removes or restarts the bus): each one cut short is recorded as a `device_error` saying
    /// why, and whether the relay could be switched off.
    async fn switch_off_pending(&mut self) {
        let why = self.shared.stop_reason();
        for off in std::mem::take(&mut self.offs) {
            let left = off.at.saturating_duration_since(Instant::now()).as_millis();
            let msg = match self.write_coil(off.device, off.channel, false).await {
                Ok(()) if off.failures == 0 => format!(
                    "pulse on relay {} ended {left} ms early (switched off): {why}",
                    off.channel
                ),
                Ok(()) => format!("relay {} switched off at last: {why}", off.channel),
                Err(e) => format!(
                    "could not end the pulse on relay {} ({why}): {e}; the relay may still be on",
                    off.channel
                ),
            };
            self.device_error(off.device, &msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_keeps_to_multiples_of_the_period_and_skips_missed_slots() {
        let t0 = Instant::now();
        let p = Duration::from_millis(10);
        // A poll that took 3 ms: the next one is at t0 + 10 ms, not t0 + 13 ms.
        assert_eq!(next_slot(t0, t0 + Duration::from_millis(3), p), (t0 + p, 0));
        // Done exactly at the next slot: that slot is due now, nothing missed.
        assert_eq!(next_slot(t0, t0 + p, p), (t0 + p, 0));
        // Just past it: that slot is skipped, the one after is next.
        assert_eq!(
            next_slot(t0, t0 + p + Duration::from_micros(1), p),
            (t0 + 2 * p, 1)
        );
        // A poll that overran by 25 ms: slots 10 and 20 are skipped, not made up; next is 30.
        assert_eq!(
            next_slot(t0, t0 + Duration::from_millis(25), p),
            (t0 + 3 * p, 2)
        );
        // Many periods in a row stay on the grid (no drift).
        let mut at = t0;
        for k in 1..=1000u32 {
            let (next, missed) = next_slot(at, at + Duration::from_millis(7), p);
            assert_eq!(missed, 0);
            assert_eq!(next, t0 + p * k);
            at = next;
        }
    }

    #[test]
    fn first_slots_spread_evenly_over_the_period() {
        let t0 = Instant::now();
        let p = Duration::from_millis(10);
        let slots: Vec<Instant> = (0..4).map(|i| first_slot(t0, i, 4, p)).collect();
        assert_eq!(
            slots,
            [0, 2500, 5000, 7500].map(|us| t0 + Duration::from_micros(us))
        );
        // On the grid, no two of them ever fall due together.
        let mut all: Vec<Instant> = slots
            .iter()
            .flat_map(|&s| (0..100u32).map(move |k| s + p * k))
            .collect();
        all.sort();
        assert!(
            all.windows(2)
                .all(|w| w[1] - w[0] == Duration::from_micros(2500))
        );
        // Each device spreads over its own period; one device starts at once.
        assert_eq!(
            first_slot(t0, 1, 2, Duration::from_secs(1)),
            t0 + Duration::from_millis(500)
        );
        assert_eq!(first_slot(t0, 0, 1, p), t0);
        assert_eq!(first_slot(t0, 0, 0, p), t0);
    }

    #[test]
    fn a_backed_off_device_stays_on_its_grid() {
        let t0 = Instant::now();
        let p = Duration::from_millis(10);
        let slot = t0 + Duration::from_micros(2500);
        // Failed at 3 ms past its slot, backing off 40 ms: the first grid slot after 43 ms.
        let (next, _) = next_slot(slot, slot + Duration::from_millis(43), p);
        assert_eq!(next, slot + 5 * p);
    }
}
