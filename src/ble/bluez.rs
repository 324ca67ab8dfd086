//! The BlueZ implementation of [`Radio`] and [`Link`]: bluetoothd on the D-Bus system bus,
//! through bluer. bluer (libdbus) honours `DBUS_SYSTEM_BUS_ADDRESS`, which is how the tests
//! point it at the mock BlueZ (`tests/peers/bluez_mock.py`).
//!
//! How the traits map to BlueZ:
//!
//! - **[`Bluez::open`]**: a bluer session on the system bus, the named adapter
//!   (`/org/bluez/hciN`, default `hci0` or the first one), `Adapter1.Powered` set to true.
//! - **Scanning** ([`Radio::scan`]): `SetDiscoveryFilter` {Transport `le`, DuplicateData true},
//!   then `StartDiscovery` (bluer's discovery session, shared by every scan of this process and
//!   stopped with `StopDiscovery` when the last one ends). A spawned task follows
//!   `ObjectManager.InterfacesAdded` / `InterfacesRemoved` for devices
//!   (bluer `discover_devices`) and one `Device1` `PropertiesChanged` subscription per device
//!   (bluer `Device::events`). bluetoothd reports each received advertisement as one
//!   `PropertiesChanged` signal (RSSI, ManufacturerData, ServiceData, Name, whichever changed);
//!   the task keeps the last value of each per device and sends one [`Seen`] per signal with the
//!   whole picture. A new device object is read once (Name, RSSI, ManufacturerData,
//!   ServiceData) and reported when it has an RSSI (known devices out of range have none).
//!   The channel closes when discovery ends (`Discovering` false), the adapter object goes
//!   away, or a periodic check of the adapter fails (bluetoothd gone or restarted); the caller
//!   scans again. Dropping the receiver ends the task and so the discovery session. A full
//!   channel drops the advertisement rather than stalling the bus.
//! - **Connecting** ([`Radio::connect`]): `Device1.Connect` under the caller's timeout; on
//!   timeout or failure `Device1.Disconnect` cancels the attempt (BlueZ answers
//!   `org.bluez.Error.Failed` "le-connection-abort-by-local" when an LE device does not answer).
//!   Then, bounded by [`SETUP_TIMEOUT`]: wait for `ServicesResolved`, find the lock service and
//!   its three characteristics by UUID ([`noke::SERVICE_UUID`] …), `ReadValue` the session
//!   characteristic and `StartNotify` the notify characteristic (bluer's `notify()` stream of
//!   `Value` changes) before the link is handed out, so no answer can be missed. bluer subscribes
//!   only after `StartNotify` returns; a notification in that gap is taken from the `Value`
//!   property, read before and after (`caught_up`).
//! - **Writing** ([`Link::write`]): `WriteValue` with type `command` (write without response).
//! - **Notifications** ([`Link::notification`]): the next `Value` of the notify
//!   characteristic. bluer's stream does not end when the link drops (BlueZ keeps the GATT
//!   objects), so the link also follows the device's `Connected` property: `Connected` false
//!   ends the link ([`BleError::Disconnected`]) after the notifications that came before it.
//! - **Disconnecting** ([`Link::disconnect`], or dropping the link): `StopNotify` (bluer, on
//!   dropping the stream) and `Device1.Disconnect`, best effort.
//!
//! Errors: bluetoothd gone, the bus gone or the adapter off ⇒ [`BleError::Adapter`]; a device
//! that does not connect ⇒ [`BleError::Unreachable`]; the lock service or a characteristic
//! missing, or a session value that is not 20 bytes ⇒ [`BleError::NotALock`]; the link dropped
//! ⇒ [`BleError::Disconnected`]. Every D-Bus call is bounded here (bluer's own bound is two
//! minutes), so a hung bluetoothd turns into an error rather than a stuck task.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bluer::gatt::WriteOp;
use bluer::gatt::remote::{Characteristic, CharacteristicWriteRequest};
use bluer::{
    Adapter, AdapterEvent, Address, Device, DeviceEvent, DeviceProperty, DiscoveryFilter,
    DiscoveryTransport, ErrorKind, InternalErrorKind, Session, Uuid,
};
use futures::FutureExt;
use futures::stream::{SelectAll, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::noke;
use super::transport::{BleError, Link, Radio, Seen};

/// Advertisements buffered for the scanner's reader; more are dropped.
pub const SCAN_CHANNEL: usize = 4096;
/// Bound on one D-Bus call to bluetoothd (bluer's own is 120 s).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on getting a connected lock ready: services resolved, session read, notifications on.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one write (without response: bluetoothd only queues it).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the best-effort `Disconnect` that cancels an attempt or ends a link.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a running scan checks that the adapter is still there and discovering.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// Bound on that check: a healthy bluetoothd answers a property read in milliseconds, and a
/// lost bus connection leaves calls unanswered.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

type BoxStream<T> = Pin<Box<dyn Stream<Item = T> + Send>>;

/// The BlueZ radio: a bluer session and one adapter.
pub struct Bluez {
    /// Kept for the life of the radio: the D-Bus connection and its event loop.
    _session: Session,
    adapter: Adapter,
}

impl Bluez {
    /// Opens the system bus (bluer honours `DBUS_SYSTEM_BUS_ADDRESS`), the named adapter
    /// (`None`: `hci0` if present, else the first), and powers it on.
    pub async fn open(adapter: Option<&str>) -> Result<Bluez, BleError> {
        let session = bounded("connecting to bluetoothd on the system bus", Session::new()).await?;
        let adapter = match adapter {
            Some(name) => session
                .adapter(name)
                .map_err(|e| BleError::Adapter(format!("adapter {name}: {e}")))?,
            None => bounded("finding the default adapter", session.default_adapter()).await?,
        };
        power_on(&adapter).await?;
        Ok(Bluez {
            _session: session,
            adapter,
        })
    }

    /// The adapter's name (`hci0`).
    pub fn adapter_name(&self) -> &str {
        self.adapter.name()
    }
}

/// Sets `Powered` unless it is already on; also checks that the adapter exists.
async fn power_on(adapter: &Adapter) -> Result<(), BleError> {
    let what = format!("adapter {}", adapter.name());
    if !bounded(&what, adapter.is_powered()).await? {
        bounded(&what, adapter.set_powered(true)).await?;
        tracing::info!(adapter = adapter.name(), "adapter powered on");
    }
    Ok(())
}

impl Radio for Bluez {
    type Link = BluezLink;

    async fn scan(&self) -> Result<mpsc::Receiver<Seen>, BleError> {
        let adapter = self.adapter.clone();
        power_on(&adapter).await?;
        let filter = DiscoveryFilter {
            transport: DiscoveryTransport::Le,
            duplicate_data: true,
            ..Default::default()
        };
        match adapter.set_discovery_filter(filter).await {
            Ok(()) => {}
            // Another scan of this process is running: it set the same filter.
            Err(e) if e.kind == ErrorKind::DiscoveryActive => {}
            Err(e) => return Err(BleError::Adapter(format!("discovery filter: {e}"))),
        }
        let discovery = bounded("starting discovery", adapter.discover_devices()).await?;
        let (tx, rx) = mpsc::channel(SCAN_CHANNEL);
        tokio::spawn(scan_task(adapter, discovery.boxed(), tx));
        Ok(rx)
    }

    async fn connect(&self, mac: &str, timeout: Duration) -> Result<BluezLink, BleError> {
        let addr: Address = mac
            .parse()
            .map_err(|_| BleError::Unreachable(format!("{mac}: not a Bluetooth address")))?;
        let mac = addr.to_string();
        let device = self
            .adapter
            .device(addr)
            .map_err(|e| BleError::Adapter(format!("{mac}: {e}")))?;
        // Subscribed before connecting, so that ServicesResolved cannot be missed.
        let mut events = bounded(&mac, device.events()).await?.boxed().fuse();

        match tokio::time::timeout(timeout, device.connect()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                cancel(&device).await;
                return Err(connect_error(&mac, e));
            }
            Err(_) => {
                cancel(&device).await;
                return Err(BleError::Unreachable(format!(
                    "{mac}: no connection within {} ms",
                    timeout.as_millis()
                )));
            }
        }

        match tokio::time::timeout(SETUP_TIMEOUT, setup(&device, &mut events, &mac)).await {
            Ok(Ok(ready)) => {
                tracing::debug!(mac = %mac, "lock connected, notifications on");
                Ok(BluezLink {
                    mac,
                    device,
                    write_char: ready.write_char,
                    session: ready.session,
                    notify: ready.notify,
                    events: Box::pin(events),
                    connected: true,
                    open: true,
                })
            }
            Ok(Err(e)) => {
                cancel(&device).await;
                Err(e)
            }
            Err(_) => {
                cancel(&device).await;
                Err(BleError::Timeout(format!(
                    "{mac}: lock service not ready within {} s",
                    SETUP_TIMEOUT.as_secs()
                )))
            }
        }
    }
}

/// What [`setup`] hands over to the link.
struct Ready {
    write_char: Characteristic,
    session: [u8; 20],
    notify: BoxStream<Vec<u8>>,
}

/// After `Connect`: waits for the GATT services, finds the lock's characteristics, reads the
/// session and turns notifications on.
async fn setup(
    device: &Device,
    events: &mut (impl Stream<Item = DeviceEvent> + Unpin),
    mac: &str,
) -> Result<Ready, BleError> {
    let resolved = device.is_services_resolved().await;
    if !resolved.map_err(|e| gatt_error(mac, "ServicesResolved", e))? {
        loop {
            match events.next().await {
                Some(DeviceEvent::PropertyChanged(DeviceProperty::ServicesResolved(true))) => {
                    break;
                }
                Some(DeviceEvent::PropertyChanged(DeviceProperty::Connected(false))) => {
                    return Err(BleError::Disconnected(format!(
                        "{mac}: dropped before its services were resolved"
                    )));
                }
                Some(_) => {}
                None => {
                    return Err(BleError::Disconnected(format!(
                        "{mac}: device removed by bluetoothd"
                    )));
                }
            }
        }
    }

    let service_uuid = parse_uuid(noke::SERVICE_UUID);
    let mut service = None;
    let services = device
        .services()
        .await
        .map_err(|e| gatt_error(mac, "services", e))?;
    for s in services {
        if s.uuid().await.ok() == Some(service_uuid) {
            service = Some(s);
            break;
        }
    }
    let Some(service) = service else {
        return Err(BleError::NotALock(format!(
            "{mac}: no lock service {}",
            noke::SERVICE_UUID
        )));
    };

    let (write_uuid, notify_uuid, session_uuid) = (
        parse_uuid(noke::WRITE_CHAR_UUID),
        parse_uuid(noke::NOTIFY_CHAR_UUID),
        parse_uuid(noke::SESSION_CHAR_UUID),
    );
    let (mut write_char, mut notify_char, mut session_char) = (None, None, None);
    let chars = service
        .characteristics()
        .await
        .map_err(|e| gatt_error(mac, "characteristics", e))?;
    for c in chars {
        match c.uuid().await {
            Ok(u) if u == write_uuid => write_char = Some(c),
            Ok(u) if u == notify_uuid => notify_char = Some(c),
            Ok(u) if u == session_uuid => session_char = Some(c),
            _ => {}
        }
    }
    let (Some(write_char), Some(notify_char), Some(session_char)) =
        (write_char, notify_char, session_char)
    else {
        return Err(BleError::NotALock(format!(
            "{mac}: the lock service lacks its write, notify or session characteristic"
        )));
    };

    let value = session_char
        .read()
        .await
        .map_err(|e| gatt_error(mac, "reading the session", e))?;
    let session: [u8; 20] = value.as_slice().try_into().map_err(|_| {
        BleError::NotALock(format!(
            "{mac}: session value is {} bytes (expected 20)",
            value.len()
        ))
    })?;

    // bluer's `notify()` sends `StartNotify` and only then subscribes to the characteristic's
    // property changes: a notification the lock sends in between (one that goes to sleep at
    // once) never reaches the stream, but BlueZ keeps it as the characteristic's `Value`. So
    // `Value` is read before and after: a change is delivered first ([`caught_up`]).
    let before = notify_char.cached_value().await.unwrap_or_default();
    let notify = notify_char
        .notify()
        .await
        .map_err(|e| gatt_error(mac, "enabling notifications", e))?;
    let after = notify_char.cached_value().await.unwrap_or_default();
    let missed = (after != before && !after.is_empty()).then_some(after);
    Ok(Ready {
        write_char,
        session,
        notify: caught_up(missed, notify.boxed()),
    })
}

/// `stream` with `missed` (a notification that came before the subscription) first. Should the
/// subscription have caught it after all, it is the stream's first item (D-Bus signals from one
/// sender arrive in order), and that copy is skipped.
fn caught_up(missed: Option<Vec<u8>>, stream: BoxStream<Vec<u8>>) -> BoxStream<Vec<u8>> {
    let Some(missed) = missed else {
        return stream;
    };
    let mut skip = Some(missed.clone());
    let rest = stream.filter(move |v| {
        let dup = skip.take().is_some_and(|m| &m == v);
        std::future::ready(!dup)
    });
    futures::stream::once(std::future::ready(missed))
        .chain(rest)
        .boxed()
}

/// A connection to one lock through BlueZ. Dropping it without [`Link::disconnect`] still
/// disconnects (in a spawned task).
pub struct BluezLink {
    mac: String,
    device: Device,
    write_char: Characteristic,
    session: [u8; 20],
    /// `Value` changes of the notify characteristic; dropping it sends `StopNotify`.
    notify: BoxStream<Vec<u8>>,
    /// The device's property changes, for `Connected` false (fused).
    events: BoxStream<DeviceEvent>,
    /// False once the device was seen disconnected.
    connected: bool,
    /// True until disconnected by [`Link::disconnect`] or on drop.
    open: bool,
}

impl BluezLink {
    /// `AA:BB:CC:DD:EE:FF`.
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// Takes in the device events that already arrived (without waiting).
    fn poll_events(&mut self) {
        while let Some(event) = self.events.next().now_or_never() {
            match event {
                Some(DeviceEvent::PropertyChanged(DeviceProperty::Connected(false))) | None => {
                    self.connected = false;
                    if event.is_none() {
                        break;
                    }
                }
                Some(_) => {}
            }
        }
    }

    /// Classifies a failed GATT call on an established link.
    async fn link_error(&mut self, what: &str, e: bluer::Error) -> BleError {
        if is_adapter_failure(&e) {
            return BleError::Adapter(format!("{}: {what}: {e}", self.mac));
        }
        self.poll_events();
        if self.connected {
            match tokio::time::timeout(CALL_TIMEOUT, self.device.is_connected()).await {
                Ok(Ok(false)) => self.connected = false,
                Ok(Err(e)) if e.kind == ErrorKind::NotFound => self.connected = false,
                _ => {}
            }
        }
        if self.connected {
            BleError::Adapter(format!("{}: {what}: {e}", self.mac))
        } else {
            BleError::Disconnected(format!("{}: {what}: {e}", self.mac))
        }
    }

    fn disconnected(&self) -> BleError {
        BleError::Disconnected(format!("{}: the lock dropped the connection", self.mac))
    }
}

impl Link for BluezLink {
    fn session(&self) -> [u8; 20] {
        self.session
    }

    async fn write(&mut self, packet: &[u8; 20]) -> Result<(), BleError> {
        self.poll_events();
        if !self.connected {
            return Err(self.disconnected());
        }
        let req = CharacteristicWriteRequest {
            op_type: WriteOp::Command,
            ..Default::default()
        };
        match tokio::time::timeout(WRITE_TIMEOUT, self.write_char.write_ext(packet, &req)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.link_error("write", e).await),
            Err(_) => Err(BleError::Timeout(format!(
                "{}: write not taken within {} s",
                self.mac,
                WRITE_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn notification(&mut self, timeout: Duration) -> Result<Vec<u8>, BleError> {
        if self.connected {
            let sleep = tokio::time::sleep(timeout);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    biased;
                    value = self.notify.next() => {
                        return match value {
                            Some(v) => Ok(v),
                            None => {
                                self.connected = false;
                                Err(BleError::Disconnected(format!(
                                    "{}: notifications ended (characteristic removed)",
                                    self.mac
                                )))
                            }
                        };
                    }
                    event = self.events.next() => match event {
                        Some(DeviceEvent::PropertyChanged(DeviceProperty::Connected(false)))
                        | None => {
                            self.connected = false;
                            break;
                        }
                        Some(_) => {}
                    },
                    () = &mut sleep => {
                        return Err(BleError::Timeout(format!(
                            "{}: no notification within {} ms",
                            self.mac,
                            timeout.as_millis()
                        )));
                    }
                }
            }
        }
        // Disconnected: what the lock notified before it went is still delivered.
        match self.notify.next().now_or_never() {
            Some(Some(v)) => Ok(v),
            _ => Err(self.disconnected()),
        }
    }

    async fn disconnect(mut self) {
        self.open = false;
        let device = self.device.clone();
        // Drops the notify stream (bluer sends StopNotify) and the event subscription.
        drop(self);
        cancel(&device).await;
    }
}

impl Drop for BluezLink {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let device = self.device.clone();
            rt.spawn(async move { cancel(&device).await });
        }
    }
}

/// `Device1.Disconnect`, best effort: cancels a pending attempt or ends a connection.
async fn cancel(device: &Device) {
    match tokio::time::timeout(DISCONNECT_TIMEOUT, device.disconnect()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(mac = %device.address(), "disconnect: {e}"),
        Err(_) => tracing::debug!(mac = %device.address(), "disconnect: no answer"),
    }
}

/// Runs one bluetoothd call under [`CALL_TIMEOUT`]; any failure is an adapter failure.
async fn bounded<T>(
    what: &str,
    call: impl Future<Output = bluer::Result<T>>,
) -> Result<T, BleError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(BleError::Adapter(format!("{what}: {e}"))),
        Err(_) => Err(BleError::Adapter(format!(
            "{what}: no answer from bluetoothd within {} s",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

/// Whether an error means bluetoothd, the bus or the adapter is unusable (not the device).
fn is_adapter_failure(e: &bluer::Error) -> bool {
    match &e.kind {
        // bluetoothd's "Resource Not Ready": the adapter is powered off.
        ErrorKind::NotReady => true,
        ErrorKind::Internal(InternalErrorKind::DBusConnectionLost)
        | ErrorKind::Internal(InternalErrorKind::Io(_))
        | ErrorKind::Internal(InternalErrorKind::JoinError) => true,
        ErrorKind::Internal(InternalErrorKind::DBus(name)) => matches!(
            name.as_str(),
            "org.freedesktop.DBus.Error.ServiceUnknown"
                | "org.freedesktop.DBus.Error.NameHasNoOwner"
                | "org.freedesktop.DBus.Error.NoReply"
                | "org.freedesktop.DBus.Error.Disconnected"
                | "org.freedesktop.DBus.Error.NoServer"
                | "org.freedesktop.DBus.Error.Timeout"
                | "org.freedesktop.DBus.Error.TimedOut"
        ),
        _ => false,
    }
}

/// Maps a failed `Device1.Connect`.
fn connect_error(mac: &str, e: bluer::Error) -> BleError {
    if is_adapter_failure(&e) {
        return BleError::Adapter(format!("{mac}: connect: {e}"));
    }
    match e.kind {
        ErrorKind::NotFound | ErrorKind::DoesNotExist => BleError::Unreachable(format!(
            "{mac}: not known to the adapter (not seen advertising)"
        )),
        // Failed "le-connection-abort-by-local" (no answer), ConnectionAttemptFailed,
        // InProgress (another attempt), …: the device could not be reached now.
        _ => BleError::Unreachable(format!("{mac}: {e}")),
    }
}

/// Maps a failed GATT call while setting a connection up.
fn gatt_error(mac: &str, what: &str, e: bluer::Error) -> BleError {
    if is_adapter_failure(&e) {
        return BleError::Adapter(format!("{mac}: {what}: {e}"));
    }
    let not_connected = e.kind == ErrorKind::NotFound
        || e.kind == ErrorKind::ServicesUnresolved
        || e.message.to_ascii_lowercase().contains("not connected");
    if not_connected {
        BleError::Disconnected(format!("{mac}: {what}: {e}"))
    } else {
        BleError::NotALock(format!("{mac}: {what}: {e}"))
    }
}

/// The UUID constants of the protocol modules are valid; a nil UUID never matches a device.
fn parse_uuid(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap_or_else(|_| Uuid::nil())
}

// ---------------------------------------------------------------------------------------------
// Scanning

/// The last known advertising data of one device.
#[derive(Debug, Default)]
struct DeviceState {
    name: Option<String>,
    rssi: Option<i16>,
    manufacturer: HashMap<u16, Vec<u8>>,
    service_data: HashMap<Uuid, Vec<u8>>,
    /// Properties changed since the last [`Seen`] of this device (`NAME` | `RSSI` | …).
    pending: u8,
}

const NAME: u8 = 1;
const RSSI: u8 = 2;
const MANUFACTURER: u8 = 4;
const SERVICE_DATA: u8 = 8;

impl DeviceState {
    fn seen(&self, addr: Address) -> Seen {
        let mut manufacturer: Vec<(u16, Vec<u8>)> = self
            .manufacturer
            .iter()
            .map(|(id, data)| (*id, data.clone()))
            .collect();
        manufacturer.sort();
        let mut service_data: Vec<(String, Vec<u8>)> = self
            .service_data
            .iter()
            .map(|(uuid, data)| (uuid.to_string(), data.clone()))
            .collect();
        service_data.sort();
        Seen {
            mac: addr.to_string(),
            name: self.name.clone(),
            rssi: self.rssi,
            manufacturer,
            service_data,
        }
    }
}

/// The scan task's state: devices and the channel to the reader.
struct Scanner {
    tx: mpsc::Sender<Seen>,
    devices: HashMap<Address, DeviceState>,
    /// Devices with pending changes, in order of their first change.
    dirty: Vec<Address>,
    dropped: u64,
}

impl Scanner {
    /// Sends without waiting; false when the reader is gone.
    fn send(tx: &mpsc::Sender<Seen>, dropped: &mut u64, seen: Seen) -> bool {
        match tx.try_send(seen) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                *dropped += 1;
                if dropped.is_power_of_two() {
                    tracing::warn!(
                        dropped = *dropped,
                        "scan reader behind: advertisements dropped"
                    );
                }
                true
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }

    /// A device object appeared (or was known when discovery started).
    fn add(&mut self, addr: Address, state: DeviceState) -> bool {
        let present = state.rssi.is_some();
        let seen = state.seen(addr);
        self.devices.insert(addr, state);
        !present || Self::send(&self.tx, &mut self.dropped, seen)
    }

    /// One property change; a property already pending for that device means a new
    /// advertisement, so the previous one is sent first.
    fn apply(&mut self, addr: Address, event: DeviceEvent) -> bool {
        let DeviceEvent::PropertyChanged(prop) = event;
        let Some(dev) = self.devices.get_mut(&addr) else {
            return true;
        };
        let bit = match &prop {
            DeviceProperty::Name(_) => NAME,
            DeviceProperty::Rssi(_) => RSSI,
            DeviceProperty::ManufacturerData(_) => MANUFACTURER,
            DeviceProperty::ServiceData(_) => SERVICE_DATA,
            _ => return true,
        };
        let mut open = true;
        if dev.pending & bit != 0 {
            open = Self::send(&self.tx, &mut self.dropped, dev.seen(addr));
            dev.pending = 0;
        }
        if dev.pending == 0 {
            self.dirty.push(addr);
        }
        dev.pending |= bit;
        match prop {
            DeviceProperty::Name(n) => dev.name = Some(n),
            DeviceProperty::Rssi(r) => dev.rssi = Some(r),
            DeviceProperty::ManufacturerData(m) => dev.manufacturer = m,
            DeviceProperty::ServiceData(s) => dev.service_data = s,
            _ => {}
        }
        open
    }

    /// Sends one [`Seen`] per device with pending changes.
    fn flush(&mut self) -> bool {
        let mut open = true;
        for addr in self.dirty.drain(..) {
            if let Some(dev) = self.devices.get_mut(&addr) {
                if dev.pending != 0 {
                    dev.pending = 0;
                    open &= Self::send(&self.tx, &mut self.dropped, dev.seen(addr));
                }
            }
        }
        open
    }
}

/// Reads a new device's advertising data (empty on failure: later changes fill it in).
async fn read_state(device: &Device) -> DeviceState {
    let read = async {
        Ok::<_, bluer::Error>(DeviceState {
            name: device.name().await?,
            rssi: device.rssi().await?,
            manufacturer: device.manufacturer_data().await?.unwrap_or_default(),
            service_data: device.service_data().await?.unwrap_or_default(),
            pending: 0,
        })
    };
    match tokio::time::timeout(CALL_TIMEOUT, read).await {
        Ok(Ok(state)) => state,
        Ok(Err(e)) => {
            tracing::debug!(mac = %device.address(), "reading a new device: {e}");
            DeviceState::default()
        }
        Err(_) => DeviceState::default(),
    }
}

/// Follows discovery and the devices' property changes until the reader is gone, discovery
/// ends or the adapter fails. Returning drops the discovery stream and so its session.
async fn scan_task(
    adapter: Adapter,
    mut discovery: BoxStream<AdapterEvent>,
    tx: mpsc::Sender<Seen>,
) {
    let mut scanner = Scanner {
        tx,
        devices: HashMap::new(),
        dirty: Vec::new(),
        dropped: 0,
    };
    let mut changes: SelectAll<BoxStream<(Address, DeviceEvent)>> = SelectAll::new();
    let mut health = tokio::time::interval_at(
        tokio::time::Instant::now() + HEALTH_INTERVAL,
        HEALTH_INTERVAL,
    );
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let tx = scanner.tx.clone();
    let adapter_name = adapter.name().to_string();

    let why = loop {
        tokio::select! {
            biased;
            () = tx.closed() => break "reader gone",
            event = discovery.next() => match event {
                Some(AdapterEvent::DeviceAdded(addr)) => {
                    if scanner.devices.contains_key(&addr) {
                        continue;
                    }
                    let Ok(device) = adapter.device(addr) else { continue };
                    match tokio::time::timeout(CALL_TIMEOUT, device.events()).await {
                        Ok(Ok(events)) => changes.push(events.map(move |e| (addr, e)).boxed()),
                        _ => {
                            tracing::debug!(mac = %addr, "could not follow a new device");
                            continue;
                        }
                    }
                    let state = read_state(&device).await;
                    if !scanner.add(addr, state) {
                        break "reader gone";
                    }
                }
                Some(AdapterEvent::DeviceRemoved(addr)) => {
                    // Its event stream ends by itself (bluer drops the subscription).
                    scanner.devices.remove(&addr);
                }
                Some(AdapterEvent::PropertyChanged(_)) => {}
                None => break "discovery ended (Discovering false or adapter removed)",
            },
            Some((addr, event)) = changes.next(), if !changes.is_empty() => {
                let mut open = scanner.apply(addr, event);
                // The rest of the same signal (and whatever else already arrived).
                while let Some(Some((addr, event))) = changes.next().now_or_never() {
                    open &= scanner.apply(addr, event);
                }
                if !(scanner.flush() && open) {
                    break "reader gone";
                }
            }
            _ = health.tick() => {
                match tokio::time::timeout(HEALTH_TIMEOUT, adapter.is_discovering()).await {
                    Ok(Ok(true)) => {}
                    Ok(Ok(false)) => break "adapter no longer discovering",
                    Ok(Err(e)) => {
                        tracing::warn!(adapter = %adapter_name, "adapter check failed: {e}");
                        break "adapter check failed";
                    }
                    Err(_) => break "no answer from bluetoothd",
                }
            }
        }
    };
    tracing::debug!(adapter = %adapter_name, dropped = scanner.dropped, "scan ended: {why}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ble::bthome;

    fn addr() -> Address {
        "aa:bb:cc:dd:ee:01".parse().unwrap()
    }

    #[test]
    fn uuids_parse_and_print_as_the_protocol_modules_spell_them() {
        for s in [
            noke::SERVICE_UUID,
            noke::WRITE_CHAR_UUID,
            noke::NOTIFY_CHAR_UUID,
            noke::SESSION_CHAR_UUID,
            bthome::SERVICE_UUID,
        ] {
            assert_eq!(parse_uuid(s).to_string(), s);
        }
    }

    #[test]
    fn seen_is_upper_case_sorted_and_lower_case_uuids() {
        let mut state = DeviceState {
            name: Some("BTH_EE02".into()),
            rssi: Some(-70),
            ..Default::default()
        };
        state.manufacturer.insert(0xFFFF, vec![0, 2, 10]);
        state.manufacturer.insert(0x004C, vec![1]);
        state
            .service_data
            .insert(parse_uuid(bthome::SERVICE_UUID), vec![0x40, 0]);
        let seen = state.seen(addr());
        assert_eq!(seen.mac, "AA:BB:CC:DD:EE:01");
        assert_eq!(seen.manufacturer[0].0, 0x004C);
        assert_eq!(seen.service_data[0].0, bthome::SERVICE_UUID);
    }

    #[test]
    fn one_seen_per_signal_and_a_repeat_starts_a_new_one() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut s = Scanner {
            tx,
            devices: HashMap::new(),
            dirty: Vec::new(),
            dropped: 0,
        };
        assert!(s.add(addr(), DeviceState::default())); // no RSSI: not reported
        assert!(rx.try_recv().is_err());
        let ev = |p| DeviceEvent::PropertyChanged(p);
        // One advertisement: RSSI and service data together.
        s.apply(addr(), ev(DeviceProperty::Rssi(-60)));
        s.apply(
            addr(),
            ev(DeviceProperty::ServiceData(HashMap::from([(
                parse_uuid(bthome::SERVICE_UUID),
                vec![1],
            )]))),
        );
        // The next one, already queued: RSSI again.
        s.apply(addr(), ev(DeviceProperty::Rssi(-61)));
        assert!(s.flush());
        let first = rx.try_recv().unwrap();
        assert_eq!((first.rssi, first.service_data.len()), (Some(-60), 1));
        let second = rx.try_recv().unwrap();
        assert_eq!(second.rssi, Some(-61));
        assert!(rx.try_recv().is_err());
        // Connected and the like are no advertisement.
        s.apply(addr(), ev(DeviceProperty::Connected(true)));
        assert!(s.flush());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn full_channel_drops_closed_channel_stops() {
        let (tx, rx) = mpsc::channel(1);
        let mut dropped = 0;
        let seen = DeviceState::default().seen(addr());
        assert!(Scanner::send(&tx, &mut dropped, seen.clone()));
        assert!(Scanner::send(&tx, &mut dropped, seen.clone()));
        assert_eq!(dropped, 1);
        drop(rx);
        assert!(!Scanner::send(&tx, &mut dropped, seen));
    }

    #[test]
    fn connect_errors_map_to_unreachable_or_adapter() {
        let failed = bluer::Error {
            kind: ErrorKind::Failed,
            message: "le-connection-abort-by-local".into(),
        };
        assert!(matches!(
            connect_error("AA:BB:CC:DD:EE:01", failed),
            BleError::Unreachable(m) if m.contains("le-connection-abort-by-local")
        ));
        let gone = bluer::Error {
            kind: ErrorKind::Internal(InternalErrorKind::DBus(
                "org.freedesktop.DBus.Error.ServiceUnknown".into(),
            )),
            message: "The name org.bluez was not provided".into(),
        };
        assert!(matches!(
            connect_error("AA:BB:CC:DD:EE:01", gone),
            BleError::Adapter(_)
        ));
        let off = bluer::Error {
            kind: ErrorKind::NotReady,
            message: "Resource Not Ready".into(),
        };
        assert!(matches!(gatt_error("m", "read", off), BleError::Adapter(_)));
        let not_connected = bluer::Error {
            kind: ErrorKind::Failed,
            message: "Not connected".into(),
        };
        assert!(matches!(
            gatt_error("m", "read", not_connected),
            BleError::Disconnected(_)
        ));
    }

    fn collect(missed: Option<&[u8]>, items: &[&[u8]]) -> Vec<Vec<u8>> {
        let items: Vec<Vec<u8>> = items.iter().map(|v| v.to_vec()).collect();
        let stream = futures::stream::iter(items).boxed();
        futures::executor::block_on(caught_up(missed.map(<[u8]>::to_vec), stream).collect())
    }

    #[test]
    fn a_notification_before_the_subscription_comes_first_and_once() {
        // Lost by the subscription: delivered first.
        assert_eq!(
            collect(Some(b"sleep"), &[b"a"]),
            vec![b"sleep".to_vec(), b"a".to_vec()]
        );
        // Caught by the subscription after all: not twice.
        assert_eq!(
            collect(Some(b"sleep"), &[b"sleep", b"sleep"]),
            vec![b"sleep".to_vec(), b"sleep".to_vec()]
        );
        // Nothing missed: the stream as it is.
        assert_eq!(
            collect(None, &[b"a", b"b"]),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
    }
}
