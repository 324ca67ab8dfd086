//! BLE: padlocks and unit controllers (legacy lock protocol), fobs and BTHome sensors, through
//! BlueZ (bluer) or a simulated radio.
//!
//! - [`transport`]: the module's own view of a radio ([`transport::Radio`], [`transport::Link`]),
//!   with two implementations: [`bluez`] (BlueZ over D-Bus through bluer) and [`sim`] (simulated
//!   padlocks, sensors and fobs in memory: protocol tests, the benchmark, the demo).
//! - [`noke`], [`bthome`]: the wire formats (advertisements, sessions, notifications, the
//!   offline unlock; BTHome v2 with AES-CCM). Never panic on input: fuzzed.
//! - [`manager`]: adverts to events and decisions, availability, lock operations (online via
//!   the cloud, offline from the site database's keys), sleeping locks.
//! - [`rpc`]: the online operation's request/response over the cloud link.
//! - [`profile`]: device families from `devices/*.toml`; [`config`]: the `[ble]` section.
//!
//! [`Ble::start`] runs one scanner task (restarted with backoff when the adapter or bluetoothd
//! goes away) feeding one advert thread (events are flushed to disk, so adverts are handled off
//! the async runtime, in order).

pub mod bluez;
pub mod bthome;
pub mod config;
pub mod manager;
pub mod noke;
pub mod profile;
pub mod rpc;
pub mod sim;
pub mod transport;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub use manager::Manager;
use transport::{Radio, Seen};

/// Wake-ups (device ids) queued for the cloud link at most; beyond it they are dropped (an
/// advertising sleeper is reported again every second).
pub const WAKE_QUEUE: usize = 256;

/// Adverts queued between the scanner and the advert thread; beyond it they are dropped (the
/// next advert of the same device carries the same news).
const ADVERT_QUEUE: usize = 8192;

/// The running BLE module.
pub struct Ble<R: Radio> {
    pub manager: Arc<Manager<R>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<R: Radio> Ble<R> {
    /// Starts scanning and the advert thread. Stops when `shutdown` is cancelled.
    pub fn start(manager: Arc<Manager<R>>, shutdown: CancellationToken) -> Ble<R> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Seen>(ADVERT_QUEUE);
        let (scanner, stop) = (manager.clone(), shutdown.clone());
        tokio::spawn(async move { scan_loop(scanner.radio(), tx, stop).await });
        let m = manager.clone();
        let thread = std::thread::Builder::new()
            .name("ble-adverts".into())
            .spawn(move || advert_loop(&m, rx, shutdown))
            .ok();
        Ble { manager, thread }
    }

    /// Waits for the advert thread to finish (after `shutdown`).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn scan_loop<R: Radio>(
    radio: &R,
    tx: std::sync::mpsc::SyncSender<Seen>,
    stop: CancellationToken,
) {
    let mut delay = Duration::from_secs(1);
    loop {
        match radio.scan().await {
            Ok(mut rx) => {
                tracing::info!("BLE scanning");
                let started = Instant::now();
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        s = rx.recv() => match s {
                            Some(s) => {
                                if let Err(std::sync::mpsc::TrySendError::Disconnected(_)) = tx.try_send(s) {
                                    return;
                                }
                            }
                            None => break,
                        }
                    }
                }
                if started.elapsed() > Duration::from_secs(60) {
                    delay = Duration::from_secs(1);
                }
                tracing::warn!("BLE scan ended (adapter or bluetoothd gone?); starting again");
            }
            Err(e) => tracing::warn!(retry_in_s = delay.as_secs(), "BLE scan failed: {e}"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

fn advert_loop<R: Radio>(
    m: &Manager<R>,
    rx: std::sync::mpsc::Receiver<Seen>,
    stop: CancellationToken,
) {
    let mut last_check = Instant::now();
    let beat = crate::liveness::register("ble adverts");
    loop {
        if stop.is_cancelled() {
            return;
        }
        beat.tick();
        crate::liveness::stall_if_asked(&beat);
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(seen) => m.on_advert(&seen, Instant::now(), chrono::Utc::now()),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
        if last_check.elapsed() >= Duration::from_secs(1) {
            last_check = Instant::now();
            m.check_availability(last_check);
        }
    }
}
