//! The kinds of event the gateway records. Names are stable snake_case strings (the cloud keys
//! on them); docs/events.md lists each with its payload.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The daemon started (payload: version, site version).
    GatewayStarted,
    /// The daemon stopped cleanly.
    GatewayStopped,
    AccessGranted,
    AccessDenied,
    /// A keypad refused codes after too many invalid ones (raised once per lockout).
    KeypadLockedOut,
    /// A snapshot or delta was applied.
    SyncApplied,
    /// A snapshot or delta was refused (payload: reason).
    SyncRefused,
    /// The event log was over its bounds: the oldest non-security events were dropped
    /// (payload: how many, which sequence numbers).
    OutboxOverflow,
    /// A remote unlock from the cloud was carried out, failed, or was refused at the device.
    RemoteUnlock,
    /// An emergency unlock override (with its reason from the fixed list).
    OverrideUnlock,
    /// A command from the cloud was refused or malformed (payload: the result).
    CommandRefused,
    /// Install (pairing) mode was started or stopped from the cloud (kept for the record;
    /// the state itself is `install_mode_started` / `install_mode_ended`).
    InstallModeRequested,
    /// Install mode started, or its end moved (payload: until, started_by, seconds, extended).
    InstallModeStarted,
    /// Install mode ended (payload: reason `expired`/`stopped`/`shutdown`, started_by,
    /// candidates, adopted, stopped_by).
    InstallModeEnded,
    /// A driver found a device not configured nor adopted, during install mode (payload: the
    /// candidate).
    DeviceDiscovered,
    /// A candidate was adopted (payload: device, candidate, family, bus, settings, adopted_by,
    /// replaces). A security event.
    DeviceAdopted,
    /// An adopted device was removed or replaced (payload: device, family, removed_by,
    /// replaced_by). A security event.
    DeviceRemoved,
    /// A device (OSDP reader, Modbus board or sensor) answers again / stopped answering.
    DeviceOnline,
    DeviceOffline,
    /// A device reported an error: a Modbus exception, a failed relay operation, an unreadable
    /// card. Raised when the error starts or changes, not on every poll.
    DeviceError,
    /// A serial port came back (adapter plugged in) / went away (unplugged, I/O error).
    BusConnected,
    BusDisconnected,
    /// A reader was given its own secure-channel key (OSDP install mode, KEYSET).
    ReaderPaired,
    /// A tamper input or a reader's tamper switch changed.
    Tamper,
    /// A door contact opened / closed.
    DoorOpened,
    DoorClosed,
    /// A door contact opened while nothing had released its entry.
    DoorForced,
    /// A motion input became active.
    Motion,
    /// An exit button released its entry.
    ExitRequest,
    /// A manual release input (key switch, fire release) became active.
    ManualRelease,
    /// A sensor reading (temperature, humidity) worth reporting.
    SensorReading,
    /// A padlock or unit controller answered a command packet (payload: `result`, e.g.
    /// `success`, `invalid_key`, `failed_to_unlock`, `out_of_schedule`, `shutdown`).
    LockResult,
    /// A lock's server packet (0x50), for the cloud, with the session it belongs to.
    LockUpload,
    /// A lock advertised a new mechanical state (locked / unlocked).
    LockStateChanged,
    /// A battery-powered device's battery went below its profile's threshold.
    BatteryLow,
    /// A BTHome button was pressed.
    Button,
    /// An event whose message is over the packet limit, sent in its place with the same `id`
    /// and `seq` (payload: `original_kind`, `original_bytes`). Only ever on the wire.
    EventUnpublishable,
    /// The broker sent a message over the packet size the gateway takes in (MQTT 3.1.1); the
    /// connection was dropped (payload: `bytes`, `limit`, `protocol`, `occurrences`).
    MessageTooLarge,
    /// The database refused writes (a full disk) from `since`: recorded once the disk takes
    /// writes again (payload: since, what, error), just before `storage_recovered`.
    StorageFailed,
    /// The database takes writes again (payload: since, down_ms).
    StorageRecovered,
    /// A configuration reload (SIGHUP) was applied (payload: `changed`, `buses`,
    /// `restart_needed`).
    ConfigReloaded,
    /// A configuration reload was refused; nothing changed (payload: `reason`, redacted).
    ConfigReloadRefused,
    /// An automation alert became active (payload: id, kind, subject, raised_at, detail;
    /// docs/automation.md).
    AlertRaised,
    /// An active automation alert ended (payload: id, kind, subject, raised_at, cleared_at).
    AlertCleared,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::GatewayStarted => "gateway_started",
            EventKind::GatewayStopped => "gateway_stopped",
            EventKind::AccessGranted => "access_granted",
            EventKind::AccessDenied => "access_denied",
            EventKind::KeypadLockedOut => "keypad_locked_out",
            EventKind::SyncApplied => "sync_applied",
            EventKind::SyncRefused => "sync_refused",
            EventKind::OutboxOverflow => "outbox_overflow",
            EventKind::RemoteUnlock => "remote_unlock",
            EventKind::OverrideUnlock => "override_unlock",
            EventKind::CommandRefused => "command_refused",
            EventKind::InstallModeRequested => "install_mode_requested",
            EventKind::InstallModeStarted => "install_mode_started",
            EventKind::InstallModeEnded => "install_mode_ended",
            EventKind::DeviceDiscovered => "device_discovered",
            EventKind::DeviceAdopted => "device_adopted",
            EventKind::DeviceRemoved => "device_removed",
            EventKind::DeviceOnline => "device_online",
            EventKind::DeviceOffline => "device_offline",
            EventKind::DeviceError => "device_error",
            EventKind::BusConnected => "bus_connected",
            EventKind::BusDisconnected => "bus_disconnected",
            EventKind::ReaderPaired => "reader_paired",
            EventKind::Tamper => "tamper",
            EventKind::DoorOpened => "door_opened",
            EventKind::DoorClosed => "door_closed",
            EventKind::DoorForced => "door_forced",
            EventKind::Motion => "motion",
            EventKind::ExitRequest => "exit_request",
            EventKind::ManualRelease => "manual_release",
            EventKind::SensorReading => "sensor_reading",
            EventKind::LockResult => "lock_result",
            EventKind::LockUpload => "lock_upload",
            EventKind::LockStateChanged => "lock_state_changed",
            EventKind::BatteryLow => "battery_low",
            EventKind::Button => "button",
            EventKind::EventUnpublishable => "event_unpublishable",
            EventKind::MessageTooLarge => "message_too_large",
            EventKind::StorageFailed => "storage_failed",
            EventKind::StorageRecovered => "storage_recovered",
            EventKind::ConfigReloaded => "config_reloaded",
            EventKind::ConfigReloadRefused => "config_reload_refused",
            EventKind::AlertRaised => "alert_raised",
            EventKind::AlertCleared => "alert_cleared",
        }
    }

    pub fn is_security(self) -> bool {
        is_security_kind(self.as_str())
    }
}

/// Security events are kept in the outbox even when it is over its bounds: refusals, lockouts,
/// forced entry, override unlocks, tamper, devices adopted or removed, and the record of what
/// was dropped.
pub fn is_security_kind(kind: &str) -> bool {
    matches!(
        kind,
        "access_denied"
            | "keypad_locked_out"
            | "forced_entry"
            | "door_forced"
            | "override_unlock"
            | "tamper"
            | "manual_release"
            | "outbox_overflow"
            | "command_refused"
            | "storage_failed"
            | "device_adopted"
            | "device_removed"
    )
}
