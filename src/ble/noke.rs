//! The legacy padlock / unit-controller protocol: everything gatehouse parses from or builds for
//! these devices, as pure functions over bytes (no I/O, no clock, no panics on any input; fuzzed
//! in `tests/fuzz_ble.rs`).
//!
//! Facts come from the vendor's Apache-2.0 mobile libraries (Android and iOS), summarised in
//! PROTOCOLS.md "BLE padlocks and unit controllers":
//!
//! - **GATT.** One service ([`SERVICE_UUID`]) with three characteristics: [`WRITE_CHAR_UUID`]
//!   (20-byte command packets, written without response), [`NOTIFY_CHAR_UUID`] (20-byte answers;
//!   enable through the CCCD) and [`SESSION_CHAR_UUID`] (20 bytes, read once per connection; see
//!   [`Session`]).
//! - **Advertising.** The local name carries the hardware code and the MAC
//!   (`NOKE3E_D01FA644B36F`); manufacturer data carries status flags and the firmware version.
//!   See [`parse_advert`].
//! - **Online unlock.** The cloud turns {MAC, session} into `+`-joined 20-byte packets
//!   ([`parse_command_packets`]); the gateway writes them one at a time, the next after each
//!   success notification ([`parse_notification`]).
//! - **Offline unlock.** A per-lock offline key and unlock command, combined with the session and
//!   the time ([`offline_unlock_packet`]); [`open_offline_packet`] is the lock's side, for
//!   simulators and tests.
//!
//! Everything here is the wire format only: whether to unlock is decided elsewhere.

use aes::Aes128;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use serde::Serialize;

/// The lock service.
pub const SERVICE_UUID: &str = "1bc50001-0200-d29e-e511-446c609db825";
/// Command packets from the gateway (write without response, 20 bytes each).
pub const WRITE_CHAR_UUID: &str = "1bc50002-0200-d29e-e511-446c609db825";
/// Answers from the lock (notify; enable through the CCCD 0x2902).
pub const NOTIFY_CHAR_UUID: &str = "1bc50003-0200-d29e-e511-446c609db825";
/// The session value, read once after connecting.
pub const SESSION_CHAR_UUID: &str = "1bc50004-0200-d29e-e511-446c609db825";

/// Every packet on the write and notify characteristics, and the session value, is 20 bytes.
pub const PACKET_LEN: usize = 20;
/// Most packets accepted in one cloud command list (an online unlock is a handful; a key sync a
/// few dozen). Longer lists are refused rather than written to a lock for minutes.
pub const MAX_COMMAND_PACKETS: usize = 64;

/// Byte 0 of a notification: an encrypted packet for the cloud.
pub const DEST_SERVER: u8 = 0x50;
/// Byte 0 of a notification: a plaintext packet for the app (here, the gateway).
pub const DEST_APP: u8 = 0x51;
/// Byte 0 of a notification: the lock could not make sense of what it received.
pub const DEST_INVALID: u8 = 0xFF;

/// Why a value from or for a lock was refused. One enum for the module; each variant names what
/// the caller does about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The session characteristic did not hold 20 bytes: drop the connection and retry.
    #[error("session value is {0} bytes (expected 20)")]
    SessionLength(usize),
    /// A notification was not 20 bytes: log it and ignore it.
    #[error("notification is {0} bytes (expected 20)")]
    NotificationLength(usize),
    /// A notification's byte 0 is none of 0x50, 0x51, 0xFF: log it and ignore it.
    #[error("notification has unknown destination byte 0x{0:02X} (expected 0x50, 0x51 or 0xFF)")]
    UnknownDestination(u8),
    /// The cloud sent an empty command list: report the unlock as failed.
    #[error("command list is empty")]
    NoPackets,
    /// The cloud sent more than [`MAX_COMMAND_PACKETS`] packets: refuse the whole list.
    #[error("command list has {0} packets (at most {MAX_COMMAND_PACKETS} accepted)")]
    TooManyPackets(usize),
    /// Two `+` in a row, or a leading/trailing `+`: refuse the whole list.
    #[error("command packet {index} is empty (stray `+`)")]
    EmptyPacket { index: usize },
    /// A packet is not hexadecimal: refuse the whole list.
    #[error("command packet {index} is not hex: {reason}")]
    PacketHex { index: usize, reason: String },
    /// A packet does not decode to 20 bytes: refuse the whole list.
    #[error("command packet {index} is {len} bytes (expected 20)")]
    PacketLength { index: usize, len: usize },
    /// An offline packet handed to [`open_offline_packet`] is not 20 bytes.
    #[error("offline packet is {0} bytes (expected 20)")]
    OfflinePacketLength(usize),
    /// The decrypted offline packet's checksum is wrong: wrong offline key, wrong session, or a
    /// corrupted packet. The lock refuses it.
    #[error(
        "offline packet checksum is 0x{found:02X}, expected 0x{expected:02X} (wrong key or session?)"
    )]
    Checksum { expected: u8, found: u8 },
}

// ---------------------------------------------------------------------------------------------
// Advertising

/// What a device is, from the 2-character hardware code in its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HardwareKind {
    /// `2P`, `3P`.
    Padlock,
    /// `2I`, `4I`.
    HdLock,
    /// `2E`, `3E`, `4E`: unit and door controllers.
    UnitController,
    /// `1A`: a padlock that sleeps and wakes to answer (short sessions).
    SleepingPadlock,
    /// `3K`.
    Keypad,
    /// `4K`.
    Screen,
    /// `1F`, and any device named `FOB…` / `NFOB…`.
    Fob,
    /// Any other code (the libraries also know `2U` U-lock, `1C`, `1R` repeater and `5E`, the
    /// newer signed-ACL generation, which this protocol does not drive).
    Unknown(String),
}

impl HardwareKind {
    /// The kind for a hardware code (case-sensitive, as advertised).
    pub fn from_code(code: &str) -> HardwareKind {
        match code {
            "2P" | "3P" => HardwareKind::Padlock,
            "2I" | "4I" => HardwareKind::HdLock,
            "2E" | "3E" | "4E" => HardwareKind::UnitController,
            "1A" => HardwareKind::SleepingPadlock,
            "3K" => HardwareKind::Keypad,
            "4K" => HardwareKind::Screen,
            "1F" => HardwareKind::Fob,
            other => HardwareKind::Unknown(other.to_string()),
        }
    }
}

/// A lock's mechanical state as the libraries number it (advertised by HD locks in the top three
/// bits of the status flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LockState {
    Unlocked,
    Unshackled,
    Locked,
    JammedUnlocking,
    JammedLocking,
    Other(u8),
}

impl LockState {
    fn from_number(n: u8) -> LockState {
        match n {
            0 => LockState::Unlocked,
            1 => LockState::Unshackled,
            2 => LockState::Locked,
            3 => LockState::JammedUnlocking,
            4 => LockState::JammedLocking,
            other => LockState::Other(other),
        }
    }

    /// Locked or not, when the state says so (a jammed or unknown state says neither).
    pub fn locked(self) -> Option<bool> {
        match self {
            LockState::Locked => Some(true),
            LockState::Unlocked | LockState::Unshackled => Some(false),
            LockState::JammedUnlocking | LockState::JammedLocking | LockState::Other(_) => None,
        }
    }
}

/// One advertisement from a lock, controller, keypad or fob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Advert {
    pub hardware: HardwareKind,
    /// The two characters after `NOKE` / `NFOB` / `FOB` in the name, e.g. `3E`.
    pub hardware_code: String,
    /// The MAC spelled in the name (`NOKE3E_D01FA644B36F` → `D0:1F:A6:44:B3:6F`, upper case with
    /// colons like BlueZ addresses); `None` when the name does not carry a well-formed one.
    pub mac_from_name: Option<String>,
    /// Firmware major.minor from manufacturer data bytes 1–2 (BlueZ-stripped form).
    pub firmware: Option<(u8, u8)>,
    /// Status flags: manufacturer data byte 0 (BlueZ-stripped form).
    pub flags: Option<u8>,
    /// Lock state from the flags, for the hardware whose flag layout the libraries decode
    /// (`2I` HD locks and `2U` U-locks); `None` for every other device.
    pub lock_state: Option<LockState>,
    /// Locked or not, derived from `lock_state`; `None` when unknown (see [`parse_advert`]).
    pub locked: Option<bool>,
    /// Signal strength in dBm, as BlueZ reports it.
    pub rssi: Option<i16>,
}

impl Advert {
    /// Devices that sleep and wake to answer (`1A`, `4I`): their sessions last about 15 s, the
    /// others' about 60 s, so connect and act promptly after reading the session.
    pub fn wakes_to_answer(&self) -> bool {
        matches!(self.hardware_code.as_str(), "1A" | "4I")
    }
}

/// Reads an advertisement: the device name, the manufacturer data value and the RSSI.
///
/// **Manufacturer data is taken in the BlueZ-stripped form**: `Device1.ManufacturerData` maps
/// the company id to `[flags, fw_major, fw_minor, …]`, the 2-byte company id already removed.
/// (The libraries see the raw form `[id_lo, id_hi, flags, fw_major, fw_minor]`, which is where
/// "byte 2 = status flags, bytes 3–4 firmware" comes from; it is the same data.) Pass an empty
/// slice when the device advertised none: `flags` and `firmware` are then `None`.
///
/// Names: `NOKE` + 2-char code, optionally `_` + 12 hex digits of MAC
/// (`NOKE3E_D01FA644B36F`); fobs `FOB` + code or `NFOB` + code, same optional MAC suffix. The
/// code must be two ASCII letters or digits, so bootloader names (`NOKE_FW`, `NFOB_FW`) and
/// anything else give `None`.
///
/// `locked` / `lock_state`: derived only where the iOS library derives them. For `2I` HD locks,
/// bits 7–5 of the flags are a 3-bit [`LockState`] number (0 unlocked, 1 unshackled, 2 locked,
/// 3/4 jammed); for `2U` U-locks, exactly one of bits 5–6 set means locked, neither unlocked,
/// both unknown (Android's reading; iOS calls both "locked"). No library decodes the flags of
/// other hardware (they just assume "locked"), so they stay `None`: do not infer a padlock's or
/// controller's state from its advertisement. (One iOS version matches HD locks on any code
/// containing `I`, which would include `4I`; Android and other iOS versions match `2I` only,
/// which is what is done here.)
pub fn parse_advert(name: &str, manufacturer_data: &[u8], rssi: Option<i16>) -> Option<Advert> {
    let (rest, is_fob) = if let Some(r) = name.strip_prefix("NOKE") {
        (r, false)
    } else if let Some(r) = name.strip_prefix("NFOB") {
        (r, true)
    } else if let Some(r) = name.strip_prefix("FOB") {
        (r, true)
    } else {
        return None;
    };
    let code = rest.get(..2)?;
    if !code.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let tail = rest.get(2..)?;
    let mac_from_name = tail.strip_prefix('_').and_then(mac_from_hex);

    let hardware = if is_fob {
        HardwareKind::Fob
    } else {
        HardwareKind::from_code(code)
    };
    let flags = manufacturer_data.first().copied();
    let firmware = match manufacturer_data {
        [_, major, minor, ..] => Some((*major, *minor)),
        _ => None,
    };
    let lock_state = flags.and_then(|f| match code {
        "2I" => Some(LockState::from_number(f >> 5)),
        "2U" => match (f >> 5) & 0b11 {
            0 => Some(LockState::Unlocked),
            0b01 | 0b10 => Some(LockState::Locked),
            _ => None,
        },
        _ => None,
    });
    Some(Advert {
        hardware,
        hardware_code: code.to_string(),
        mac_from_name,
        firmware,
        flags,
        lock_state,
        locked: lock_state.and_then(LockState::locked),
        rssi,
    })
}

/// `D01FA644B36F` → `D0:1F:A6:44:B3:6F`; `None` unless exactly 12 hex digits.
fn mac_from_hex(s: &str) -> Option<String> {
    if s.len() != 12 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let upper = s.to_ascii_uppercase();
    let pairs: Vec<&str> = (0..6).filter_map(|i| upper.get(2 * i..2 * i + 2)).collect();
    Some(pairs.join(":"))
}

// ---------------------------------------------------------------------------------------------
// Session

/// The session characteristic's value: 20 bytes, new on every connection. Bytes 2–3 are the
/// battery voltage in millivolts, little-endian; the whole value goes to the cloud (as upper-case
/// hex) to obtain command packets, and keys the offline unlock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Session([u8; PACKET_LEN]);

impl Session {
    /// Reads a session value; anything but 20 bytes is refused.
    pub fn parse(value: &[u8]) -> Result<Session, Error> {
        <[u8; PACKET_LEN]>::try_from(value)
            .map(Session)
            .map_err(|_| Error::SessionLength(value.len()))
    }

    /// Battery voltage in millivolts (bytes 2–3, little-endian).
    pub fn battery_mv(&self) -> u16 {
        u16::from_le_bytes([self.0[2], self.0[3]])
    }

    pub fn as_bytes(&self) -> &[u8; PACKET_LEN] {
        &self.0
    }

    /// Upper-case hex, as the cloud API takes it.
    pub fn to_hex(&self) -> String {
        hex::encode_upper(self.0)
    }
}

impl From<[u8; PACKET_LEN]> for Session {
    fn from(bytes: [u8; PACKET_LEN]) -> Self {
        Session(bytes)
    }
}

// ---------------------------------------------------------------------------------------------
// Notifications

/// Result codes: byte 1 of an app packet.
pub mod result_code {
    pub const SUCCESS: u8 = 0x60;
    pub const INVALID_KEY: u8 = 0x61;
    pub const INVALID_COMMAND: u8 = 0x62;
    pub const INVALID_PERMISSION: u8 = 0x63;
    pub const SHUTDOWN: u8 = 0x64;
    pub const INVALID_DATA: u8 = 0x65;
    pub const BATTERY: u8 = 0x66;
    pub const FAILED_TO_LOCK: u8 = 0x68;
    pub const FAILED_TO_UNLOCK: u8 = 0x69;
    pub const FAILED_TO_UNSHACKLE: u8 = 0x6A;
    pub const OUT_OF_SCHEDULE: u8 = 0x6D;
    pub const FREE_EXIT: u8 = 0x6F;
    pub const INVALID: u8 = 0xFF;
}

/// What an app packet (byte 0 = 0x51) reports, from byte 1 and its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AppResult {
    /// 0x60: the packet was accepted; byte 2 is its command id. Write the next packet.
    Success { command_id: u8 },
    /// 0x61.
    InvalidKey,
    /// 0x62.
    InvalidCommand,
    /// 0x63 (the libraries: "wrong key").
    InvalidPermission,
    /// 0x64: the lock is going to sleep and ends the session. Byte 2 is the lock state (0 =
    /// unlocked, anything else locked); byte 3 is 1 when the lock was shut down before its
    /// timeout, anything else when it timed out (both libraries read it so).
    Shutdown { locked: bool, timed_out: bool },
    /// 0x65.
    InvalidData,
    /// 0x66: battery data (payload not documented; the raw packet is kept).
    Battery,
    /// 0x68.
    FailedToLock,
    /// 0x69.
    FailedToUnlock,
    /// 0x6A.
    FailedToUnshackle,
    /// 0x6D: the key is valid but not at this time.
    OutOfSchedule,
    /// 0x6F: opened from inside without a credential.
    FreeExit,
    /// 0xFF as a result code.
    InvalidResult,
    /// Any other result code.
    Other(u8),
}

impl AppResult {
    /// Reads byte 1 (`code`) with bytes 2 and 3 (`arg1`, `arg2`).
    pub fn from_bytes(code: u8, arg1: u8, arg2: u8) -> AppResult {
        use result_code as c;
        match code {
            c::SUCCESS => AppResult::Success { command_id: arg1 },
            c::INVALID_KEY => AppResult::InvalidKey,
            c::INVALID_COMMAND => AppResult::InvalidCommand,
            c::INVALID_PERMISSION => AppResult::InvalidPermission,
            c::SHUTDOWN => AppResult::Shutdown {
                locked: arg1 != 0,
                timed_out: arg2 != 1,
            },
            c::INVALID_DATA => AppResult::InvalidData,
            c::BATTERY => AppResult::Battery,
            c::FAILED_TO_LOCK => AppResult::FailedToLock,
            c::FAILED_TO_UNLOCK => AppResult::FailedToUnlock,
            c::FAILED_TO_UNSHACKLE => AppResult::FailedToUnshackle,
            c::OUT_OF_SCHEDULE => AppResult::OutOfSchedule,
            c::FREE_EXIT => AppResult::FreeExit,
            c::INVALID => AppResult::InvalidResult,
            other => AppResult::Other(other),
        }
    }

    /// The result code (byte 1).
    pub fn code(&self) -> u8 {
        use result_code as c;
        match self {
            AppResult::Success { .. } => c::SUCCESS,
            AppResult::InvalidKey => c::INVALID_KEY,
            AppResult::InvalidCommand => c::INVALID_COMMAND,
            AppResult::InvalidPermission => c::INVALID_PERMISSION,
            AppResult::Shutdown { .. } => c::SHUTDOWN,
            AppResult::InvalidData => c::INVALID_DATA,
            AppResult::Battery => c::BATTERY,
            AppResult::FailedToLock => c::FAILED_TO_LOCK,
            AppResult::FailedToUnlock => c::FAILED_TO_UNLOCK,
            AppResult::FailedToUnshackle => c::FAILED_TO_UNSHACKLE,
            AppResult::OutOfSchedule => c::OUT_OF_SCHEDULE,
            AppResult::FreeExit => c::FREE_EXIT,
            AppResult::InvalidResult => c::INVALID,
            AppResult::Other(code) => *code,
        }
    }

    /// A stable snake_case name for event logs and the cloud. Never changes once released.
    pub fn event_name(&self) -> &'static str {
        match self {
            AppResult::Success { .. } => "success",
            AppResult::InvalidKey => "invalid_key",
            AppResult::InvalidCommand => "invalid_command",
            AppResult::InvalidPermission => "invalid_permission",
            AppResult::Shutdown { .. } => "shutdown",
            AppResult::InvalidData => "invalid_data",
            AppResult::Battery => "battery",
            AppResult::FailedToLock => "failed_to_lock",
            AppResult::FailedToUnlock => "failed_to_unlock",
            AppResult::FailedToUnshackle => "failed_to_unshackle",
            AppResult::OutOfSchedule => "out_of_schedule",
            AppResult::FreeExit => "free_exit",
            AppResult::InvalidResult => "invalid_result",
            AppResult::Other(_) => "unknown_result",
        }
    }

    /// Only 0x60: the packet written last was accepted.
    pub fn is_success(&self) -> bool {
        matches!(self, AppResult::Success { .. })
    }

    /// The 20-byte app packet carrying this result (for simulators): `[0x51, code, args…, 0…]`.
    /// `parse_notification(&r.to_packet())` gives back `r`.
    pub fn to_packet(&self) -> [u8; PACKET_LEN] {
        match *self {
            AppResult::Success { command_id } => app_packet(self.code(), &[command_id]),
            AppResult::Shutdown { locked, timed_out } => {
                app_packet(self.code(), &[u8::from(locked), u8::from(!timed_out)])
            }
            _ => app_packet(self.code(), &[]),
        }
    }
}

/// One notification from the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Notification {
    /// 0x50: encrypted for the cloud. Upload the 20 bytes as they are, with the session and MAC.
    Server([u8; PACKET_LEN]),
    /// 0x51: plaintext result for the gateway; `raw` is the whole packet, for logs.
    App {
        result: AppResult,
        raw: [u8; PACKET_LEN],
    },
    /// 0xFF: the lock flagged the exchange as invalid.
    Invalid([u8; PACKET_LEN]),
}

/// Reads a value from the notify characteristic. Exactly 20 bytes are expected (the libraries
/// treat every notification as one 20-byte packet); byte 0 selects the destination.
pub fn parse_notification(value: &[u8]) -> Result<Notification, Error> {
    let raw: [u8; PACKET_LEN] = value
        .try_into()
        .map_err(|_| Error::NotificationLength(value.len()))?;
    match raw[0] {
        DEST_SERVER => Ok(Notification::Server(raw)),
        DEST_APP => Ok(Notification::App {
            result: AppResult::from_bytes(raw[1], raw[2], raw[3]),
            raw,
        }),
        DEST_INVALID => Ok(Notification::Invalid(raw)),
        other => Err(Error::UnknownDestination(other)),
    }
}

/// Builds an app packet for simulators: `[0x51, result_code, args…]`, zero-padded to 20 bytes.
/// Arguments past byte 19 are dropped.
pub fn app_packet(result_code: u8, args: &[u8]) -> [u8; PACKET_LEN] {
    let mut p = [0u8; PACKET_LEN];
    p[0] = DEST_APP;
    p[1] = result_code;
    for (slot, byte) in p.iter_mut().skip(2).zip(args) {
        *slot = *byte;
    }
    p
}

/// Builds a server packet for simulators: `[0x50, body…]`, zero-padded to 20 bytes (the body is
/// opaque to the gateway; the real lock encrypts it for the cloud).
pub fn server_packet(body: &[u8]) -> [u8; PACKET_LEN] {
    let mut p = [0u8; PACKET_LEN];
    p[0] = DEST_SERVER;
    for (slot, byte) in p.iter_mut().skip(1).zip(body) {
        *slot = *byte;
    }
    p
}

// ---------------------------------------------------------------------------------------------
// Command packet lists from the cloud

/// Splits the cloud's command string (`HEX40+HEX40+…`, either case; surrounding whitespace is
/// ignored) into 20-byte packets, in order. The whole list is refused if any packet is bad, if it
/// is empty, or if it has more than [`MAX_COMMAND_PACKETS`] packets: a partial list must never
/// be written to a lock.
pub fn parse_command_packets(commands: &str) -> Result<Vec<[u8; PACKET_LEN]>, Error> {
    let commands = commands.trim();
    if commands.is_empty() {
        return Err(Error::NoPackets);
    }
    let count = commands.split('+').count();
    if count > MAX_COMMAND_PACKETS {
        return Err(Error::TooManyPackets(count));
    }
    commands
        .split('+')
        .enumerate()
        .map(|(index, part)| {
            if part.is_empty() {
                return Err(Error::EmptyPacket { index });
            }
            let bytes = hex::decode(part).map_err(|e| Error::PacketHex {
                index,
                reason: e.to_string(),
            })?;
            <[u8; PACKET_LEN]>::try_from(bytes.as_slice()).map_err(|_| Error::PacketLength {
                index,
                len: bytes.len(),
            })
        })
        .collect()
}

/// Joins packets the way the cloud does (upper-case hex, `+`-separated). For simulators and
/// round-trip tests.
pub fn format_command_packets(packets: &[[u8; PACKET_LEN]]) -> String {
    packets
        .iter()
        .map(hex::encode_upper)
        .collect::<Vec<_>>()
        .join("+")
}

// ---------------------------------------------------------------------------------------------
// Offline unlock

/// The per-connection AES key: `K[i] = offline_key[i] + session[i] (mod 256)`.
fn combined_key(offline_key: &[u8; 16], session: &[u8; PACKET_LEN]) -> Aes128 {
    let mut k = [0u8; 16];
    for (i, slot) in k.iter_mut().enumerate() {
        *slot = offline_key[i].wrapping_add(session[i]);
    }
    Aes128::new(&GenericArray::from(k))
}

/// `sum(P[0..15]) mod 256`.
fn checksum(p: &[u8; 16]) -> u8 {
    p[..15].iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// Builds the offline unlock packet from the lock's offline key and unlock command (both issued
/// by the cloud per lock, stored on the gateway), the session just read, and the Unix time.
///
/// - header = `unlock_command[0..4]`, sent in clear;
/// - `P = unlock_command[4..20]`; `P[2..6]` = `unix_time` little-endian; `P[15]` =
///   `sum(P[0..15]) mod 256`;
/// - `K[i] = offline_key[i] + session[i] (mod 256)`;
/// - packet = header ‖ AES-128 **inverse cipher** (decrypt) of the single block `P` under `K`.
///   The libraries call TI's `aes_enc_dec(P, K, 1)`, whose direction 1 is the inverse cipher; the
///   lock recovers `P` with the forward cipher.
///
/// The offline key carries no expiry: whether the gateway may use it now is the caller's
/// decision.
pub fn offline_unlock_packet(
    offline_key: &[u8; 16],
    unlock_command: &[u8; PACKET_LEN],
    session: &[u8; PACKET_LEN],
    unix_time: u32,
) -> [u8; PACKET_LEN] {
    let mut p = [0u8; 16];
    p.copy_from_slice(&unlock_command[4..]);
    p[2..6].copy_from_slice(&unix_time.to_le_bytes());
    p[15] = checksum(&p);
    let mut block = GenericArray::from(p);
    combined_key(offline_key, session).decrypt_block(&mut block);
    let mut out = [0u8; PACKET_LEN];
    out[..4].copy_from_slice(&unlock_command[..4]);
    out[4..].copy_from_slice(&block);
    out
}

/// The lock's side of [`offline_unlock_packet`], for simulators and tests: applies the forward
/// cipher under the combined key and checks the checksum byte. Returns the clear header, the
/// recovered 16-byte `P` (with the time in `P[2..6]` and the checksum in `P[15]`) and the time.
pub fn open_offline_packet(
    offline_key: &[u8; 16],
    session: &[u8; PACKET_LEN],
    packet: &[u8],
) -> Result<([u8; 4], [u8; 16], u32), Error> {
    let packet: &[u8; PACKET_LEN] = packet
        .try_into()
        .map_err(|_| Error::OfflinePacketLength(packet.len()))?;
    let mut header = [0u8; 4];
    header.copy_from_slice(&packet[..4]);
    let mut body = [0u8; 16];
    body.copy_from_slice(&packet[4..]);
    let mut block = GenericArray::from(body);
    combined_key(offline_key, session).encrypt_block(&mut block);
    let plain: [u8; 16] = block.into();
    let expected = checksum(&plain);
    if plain[15] != expected {
        return Err(Error::Checksum {
            expected,
            found: plain[15],
        });
    }
    let unix_time = u32::from_le_bytes([plain[2], plain[3], plain[4], plain[5]]);
    Ok((header, plain, unix_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h<const N: usize>(s: &str) -> [u8; N] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    const KEY: &str = "000102030405060708090A0B0C0D0E0F";
    const CMD: &str = "7E100230A230000000001122334455667788990A";
    const SESSION: &str = "00112233445566778899AABBCCDDEEFF00112233";

    #[test]
    fn uuids_are_full_128_bit_strings() {
        for u in [
            SERVICE_UUID,
            WRITE_CHAR_UUID,
            NOTIFY_CHAR_UUID,
            SESSION_CHAR_UUID,
        ] {
            assert_eq!(u.len(), 36);
            assert!(u.ends_with("-0200-d29e-e511-446c609db825"));
        }
        assert!(WRITE_CHAR_UUID.starts_with("1bc50002"));
        assert!(NOTIFY_CHAR_UUID.starts_with("1bc50003"));
        assert!(SESSION_CHAR_UUID.starts_with("1bc50004"));
    }

    #[test]
    fn offline_packet_matches_the_reference_vector() {
        let out = offline_unlock_packet(&h(KEY), &h(CMD), &h(SESSION), 1_700_000_000);
        assert_eq!(
            hex::encode_upper(out),
            "7E1002306E198F06BE66D383D440552E6FC24C64"
        );
    }

    #[test]
    fn offline_packet_opens_on_the_lock_side() {
        let out = offline_unlock_packet(&h(KEY), &h(CMD), &h(SESSION), 1_700_000_000);
        let (header, plain, time) = open_offline_packet(&h(KEY), &h(SESSION), &out).unwrap();
        assert_eq!(header, [0x7E, 0x10, 0x02, 0x30]);
        assert_eq!(time, 1_700_000_000);
        // P as built by hand: cmd[4..20] with the time at 2..6 and the checksum at 15.
        assert_eq!(hex::encode(plain), "a23000f1536511223344556677889978");
    }

    #[test]
    fn offline_packet_refused_under_another_session_or_key() {
        let out = offline_unlock_packet(&h(KEY), &h(CMD), &h(SESSION), 1_700_000_000);
        let mut other_session: [u8; 20] = h(SESSION);
        other_session[0] ^= 1;
        assert!(matches!(
            open_offline_packet(&h(KEY), &other_session, &out),
            Err(Error::Checksum { .. })
        ));
        let mut other_key: [u8; 16] = h(KEY);
        other_key[15] ^= 0x80;
        assert!(matches!(
            open_offline_packet(&other_key, &h(SESSION), &out),
            Err(Error::Checksum { .. })
        ));
        // Session bytes past 16 do not enter the key.
        let mut tail_changed: [u8; 20] = h(SESSION);
        tail_changed[19] ^= 0xFF;
        assert!(open_offline_packet(&h(KEY), &tail_changed, &out).is_ok());
        assert_eq!(
            open_offline_packet(&h(KEY), &h(SESSION), &out[..19]),
            Err(Error::OfflinePacketLength(19))
        );
    }

    #[test]
    fn key_addition_wraps() {
        // 0xFF + 0x01 must wrap to 0x00, not overflow.
        let key = [0xFF; 16];
        let session = [0x01; 20];
        let out = offline_unlock_packet(&key, &h(CMD), &session, 0);
        let (_, _, t) = open_offline_packet(&[0u8; 16], &[0u8; 20], &out).unwrap();
        assert_eq!(t, 0);
    }

    #[test]
    fn adverts() {
        let a = parse_advert("NOKE3E_D01FA644B36F", &[0x00, 2, 14], Some(-61)).unwrap();
        assert_eq!(a.hardware, HardwareKind::UnitController);
        assert_eq!(a.hardware_code, "3E");
        assert_eq!(a.mac_from_name.as_deref(), Some("D0:1F:A6:44:B3:6F"));
        assert_eq!(a.firmware, Some((2, 14)));
        assert_eq!(a.flags, Some(0));
        assert_eq!(a.locked, None, "controllers' flags are not decoded");
        assert_eq!(a.rssi, Some(-61));
        assert!(!a.wakes_to_answer());

        let check = |name: &str, kind: HardwareKind| {
            assert_eq!(
                parse_advert(name, &[], None).unwrap().hardware,
                kind,
                "{name}"
            );
        };
        check("NOKE2P_AABBCCDDEEFF", HardwareKind::Padlock);
        check("NOKE3P_AABBCCDDEEFF", HardwareKind::Padlock);
        check("NOKE2I_AABBCCDDEEFF", HardwareKind::HdLock);
        check("NOKE4I_AABBCCDDEEFF", HardwareKind::HdLock);
        check("NOKE2E_AABBCCDDEEFF", HardwareKind::UnitController);
        check("NOKE4E_AABBCCDDEEFF", HardwareKind::UnitController);
        check("NOKE1A_AABBCCDDEEFF", HardwareKind::SleepingPadlock);
        check("NOKE3K_AABBCCDDEEFF", HardwareKind::Keypad);
        check("NOKE4K_AABBCCDDEEFF", HardwareKind::Screen);
        check("NOKE1F_AABBCCDDEEFF", HardwareKind::Fob);
        check("FOB1F_AABBCCDDEEFF", HardwareKind::Fob);
        check("NFOB1F", HardwareKind::Fob);
        check(
            "NOKE9Z_AABBCCDDEEFF",
            HardwareKind::Unknown("9Z".to_string()),
        );

        let a = parse_advert("NOKE1A_aabbccddeeff", &[0x40], None).unwrap();
        assert_eq!(a.mac_from_name.as_deref(), Some("AA:BB:CC:DD:EE:FF"));
        assert_eq!(a.firmware, None, "flags only");
        assert_eq!(a.flags, Some(0x40));
        assert!(a.wakes_to_answer());

        // Name without a MAC, or with a malformed one.
        assert_eq!(
            parse_advert("NOKE2P", &[], None).unwrap().mac_from_name,
            None
        );
        assert_eq!(
            parse_advert("NOKE2P_D01FA644B36", &[], None)
                .unwrap()
                .mac_from_name,
            None
        );
        assert_eq!(
            parse_advert("NOKE2P_D01FA644B36G", &[], None)
                .unwrap()
                .mac_from_name,
            None
        );

        for not_ours in [
            "",
            "N",
            "NOKE",
            "NOKE2",
            "NOKE_FW",
            "NFOB_FW",
            "N3P_FW",
            "noke3E_D01FA644B36F",
            "Shelly",
            "XNOKE3E",
            "NOKEé3",
            "NOKE3é",
        ] {
            assert_eq!(parse_advert(not_ours, &[1, 2, 3], None), None, "{not_ours}");
        }
    }

    #[test]
    fn hd_lock_and_ulock_flags() {
        let state = |code: &str, flags: u8| {
            let a =
                parse_advert(&format!("NOKE{code}_AABBCCDDEEFF"), &[flags, 1, 0], None).unwrap();
            (a.lock_state, a.locked)
        };
        assert_eq!(
            state("2I", 0b0000_0000),
            (Some(LockState::Unlocked), Some(false))
        );
        assert_eq!(
            state("2I", 0b0010_0000),
            (Some(LockState::Unshackled), Some(false))
        );
        assert_eq!(
            state("2I", 0b0100_0101),
            (Some(LockState::Locked), Some(true))
        );
        assert_eq!(
            state("2I", 0b0110_0000),
            (Some(LockState::JammedUnlocking), None)
        );
        assert_eq!(
            state("2I", 0b1000_0000),
            (Some(LockState::JammedLocking), None)
        );
        assert_eq!(state("2I", 0b1110_0000), (Some(LockState::Other(7)), None));
        assert_eq!(
            state("2U", 0b0001_1111),
            (Some(LockState::Unlocked), Some(false))
        );
        assert_eq!(
            state("2U", 0b0100_0000),
            (Some(LockState::Locked), Some(true))
        );
        assert_eq!(
            state("2U", 0b0010_0000),
            (Some(LockState::Locked), Some(true))
        );
        assert_eq!(state("2U", 0b0110_0000), (None, None));
        assert_eq!(state("2P", 0xFF), (None, None));
        assert_eq!(state("4I", 0xFF), (None, None));
    }

    #[test]
    fn session_battery_and_lengths() {
        let mut v = [0u8; 20];
        v[2] = 0xB8;
        v[3] = 0x0B; // 0x0BB8 = 3000 mV
        let s = Session::parse(&v).unwrap();
        assert_eq!(s.battery_mv(), 3000);
        assert_eq!(s.as_bytes(), &v);
        assert_eq!(s.to_hex(), "0000B80B".to_string() + &"00".repeat(16));
        assert_eq!(Session::parse(&v[..19]), Err(Error::SessionLength(19)));
        assert_eq!(Session::parse(&[0u8; 21]), Err(Error::SessionLength(21)));
        assert_eq!(Session::parse(&[]), Err(Error::SessionLength(0)));
    }

    #[test]
    fn notifications() {
        let check = |bytes: &[u8], result: AppResult, name: &str| {
            let mut v = [0u8; 20];
            v[..bytes.len()].copy_from_slice(bytes);
            match parse_notification(&v).unwrap() {
                Notification::App { result: r, raw } => {
                    assert_eq!(r, result, "{bytes:02X?}");
                    assert_eq!(r.event_name(), name);
                    assert_eq!(r.code(), bytes[1]);
                    assert_eq!(raw, v);
                }
                other => panic!("{other:?}"),
            }
        };
        check(
            &[0x51, 0x60, 0x07],
            AppResult::Success { command_id: 7 },
            "success",
        );
        check(&[0x51, 0x61], AppResult::InvalidKey, "invalid_key");
        check(&[0x51, 0x62], AppResult::InvalidCommand, "invalid_command");
        check(
            &[0x51, 0x63],
            AppResult::InvalidPermission,
            "invalid_permission",
        );
        check(
            &[0x51, 0x64, 0x00, 0x01],
            AppResult::Shutdown {
                locked: false,
                timed_out: false,
            },
            "shutdown",
        );
        check(
            &[0x51, 0x64, 0x01, 0x00],
            AppResult::Shutdown {
                locked: true,
                timed_out: true,
            },
            "shutdown",
        );
        check(&[0x51, 0x65], AppResult::InvalidData, "invalid_data");
        check(&[0x51, 0x66], AppResult::Battery, "battery");
        check(&[0x51, 0x68], AppResult::FailedToLock, "failed_to_lock");
        check(&[0x51, 0x69], AppResult::FailedToUnlock, "failed_to_unlock");
        check(
            &[0x51, 0x6A],
            AppResult::FailedToUnshackle,
            "failed_to_unshackle",
        );
        check(&[0x51, 0x6D], AppResult::OutOfSchedule, "out_of_schedule");
        check(&[0x51, 0x6F], AppResult::FreeExit, "free_exit");
        check(&[0x51, 0xFF], AppResult::InvalidResult, "invalid_result");
        check(&[0x51, 0x67], AppResult::Other(0x67), "unknown_result");

        assert!(AppResult::Success { command_id: 0 }.is_success());
        assert!(!AppResult::FailedToUnlock.is_success());
        assert!(
            !AppResult::Shutdown {
                locked: true,
                timed_out: false
            }
            .is_success()
        );

        let mut server = [0xAB; 20];
        server[0] = 0x50;
        assert_eq!(
            parse_notification(&server),
            Ok(Notification::Server(server))
        );
        let mut invalid = [0u8; 20];
        invalid[0] = 0xFF;
        assert_eq!(
            parse_notification(&invalid),
            Ok(Notification::Invalid(invalid))
        );
        let mut odd = [0u8; 20];
        odd[0] = 0x52;
        assert_eq!(
            parse_notification(&odd),
            Err(Error::UnknownDestination(0x52))
        );
        assert_eq!(
            parse_notification(&[0x51, 0x60]),
            Err(Error::NotificationLength(2))
        );
        assert_eq!(parse_notification(&[]), Err(Error::NotificationLength(0)));
    }

    #[test]
    fn simulator_packets_round_trip() {
        for r in [
            AppResult::Success { command_id: 0xA2 },
            AppResult::Shutdown {
                locked: true,
                timed_out: false,
            },
            AppResult::Shutdown {
                locked: false,
                timed_out: true,
            },
            AppResult::FailedToUnlock,
            AppResult::Other(0x42),
        ] {
            let p = r.to_packet();
            assert_eq!(p[0], DEST_APP);
            assert_eq!(
                parse_notification(&p),
                Ok(Notification::App { result: r, raw: p })
            );
        }
        assert_eq!(
            &app_packet(0x64, &[1, 1])[..5],
            &[0x51, 0x64, 0x01, 0x01, 0x00]
        );
        assert_eq!(app_packet(0x60, &[9; 30])[19], 9, "extra args are dropped");
        let s = server_packet(&[1, 2, 3]);
        assert_eq!(&s[..5], &[0x50, 1, 2, 3, 0]);
    }

    #[test]
    fn command_lists() {
        let a = "7E100230A230000000001122334455667788990A";
        let b = "7e100230a230000000001122334455667788990b";
        let list = parse_command_packets(&format!(" {a}+{b}\n")).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0], h::<20>(a));
        assert_eq!(list[1][19], 0x0B);
        assert_eq!(
            format_command_packets(&list),
            format!("{a}+{}", b.to_uppercase())
        );
        assert_eq!(parse_command_packets(a).unwrap().len(), 1);

        assert_eq!(parse_command_packets(""), Err(Error::NoPackets));
        assert_eq!(parse_command_packets("  "), Err(Error::NoPackets));
        assert_eq!(
            parse_command_packets(&format!("{a}+")),
            Err(Error::EmptyPacket { index: 1 })
        );
        assert_eq!(
            parse_command_packets(&format!("{a}++{a}")),
            Err(Error::EmptyPacket { index: 1 })
        );
        assert_eq!(
            parse_command_packets(&format!("{a}+{}", &a[..38])),
            Err(Error::PacketLength { index: 1, len: 19 })
        );
        assert!(matches!(
            parse_command_packets(&format!("{}ZZ", &a[..38])),
            Err(Error::PacketHex { index: 0, .. })
        ));
        assert!(matches!(
            parse_command_packets(&a[..39]),
            Err(Error::PacketHex { index: 0, .. })
        ));
        let max = vec![a; MAX_COMMAND_PACKETS].join("+");
        assert_eq!(parse_command_packets(&max).unwrap().len(), 64);
        let over = vec![a; MAX_COMMAND_PACKETS + 1].join("+");
        assert_eq!(parse_command_packets(&over), Err(Error::TooManyPackets(65)));
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            Error::UnknownDestination(0x52).to_string(),
            "notification has unknown destination byte 0x52 (expected 0x50, 0x51 or 0xFF)"
        );
        assert_eq!(
            Error::PacketLength { index: 2, len: 3 }.to_string(),
            "command packet 2 is 3 bytes (expected 20)"
        );
    }
}
