//! The BLE module's own view of a radio: advertisements in, connections to padlocks and unit
//! controllers out. Two implementations: [`super::bluez::Bluez`] (BlueZ over D-Bus through
//! bluer) and [`super::sim::SimRadio`] (simulated devices in memory, for fast protocol tests,
//! the benchmark and the demo).

use std::future::Future;
use std::time::Duration;

/// One advertisement (or an update of one) as the scanner saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// `AA:BB:CC:DD:EE:FF`, upper case.
    pub mac: String,
    pub name: Option<String>,
    pub rssi: Option<i16>,
    /// Manufacturer data by company id (BlueZ strips the id from the bytes).
    pub manufacturer: Vec<(u16, Vec<u8>)>,
    /// Service data by 128-bit UUID (lower case).
    pub service_data: Vec<(String, Vec<u8>)>,
}

/// Why a BLE operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BleError {
    /// The device did not answer the connection (asleep, out of range).
    #[error("not reachable: {0}")]
    Unreachable(String),
    /// Connected, but the lock service or a characteristic is missing.
    #[error("not a lock of the legacy protocol: {0}")]
    NotALock(String),
    #[error("timed out: {0}")]
    Timeout(String),
    /// The link dropped mid-operation.
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// The adapter or bluetoothd is gone.
    #[error("adapter: {0}")]
    Adapter(String),
}

/// A radio: one scanner and connections.
pub trait Radio: Send + Sync + 'static {
    type Link: Link;

    /// Starts scanning; advertisements arrive on the returned channel until it is dropped or
    /// the radio fails (the channel closes; the caller starts again).
    fn scan(
        &self,
    ) -> impl Future<Output = Result<tokio::sync::mpsc::Receiver<Seen>, BleError>> + Send;

    /// Connects to a padlock or unit controller and gets its lock service ready: session read
    /// and notifications enabled.
    fn connect(
        &self,
        mac: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<Self::Link, BleError>> + Send;
}

/// A connection to one lock.
pub trait Link: Send + 'static {
    /// The session characteristic (20 bytes), read when the link was made.
    fn session(&self) -> [u8; 20];

    /// Writes one 20-byte command packet (write without response).
    fn write(&mut self, packet: &[u8; 20]) -> impl Future<Output = Result<(), BleError>> + Send;

    /// The next notification of the lock, within `timeout`.
    fn notification(
        &mut self,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<u8>, BleError>> + Send;

    fn disconnect(self) -> impl Future<Output = ()> + Send;
}
