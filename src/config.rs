//! Configuration: a TOML file read with serde (`deny_unknown_fields`) into [`RawConfig`], then
//! checked as a whole into [`Config`] before anything starts. Every error names the file, the
//! line, the key and what was expected; one bad key refuses the whole file (an access controller
//! must not half-start). `config/gatehouse.example.toml` documents every key.
//!
//! Relative paths in the file are resolved against the file's own directory, never against the
//! working directory.

use std::ops::Range;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use serde::Deserialize;
use toml::Spanned;

use crate::policy::digital_key;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub site: RawSite,
    #[serde(default)]
    pub storage: RawStorage,
    #[serde(default)]
    pub access: RawAccess,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub shutdown: RawShutdown,
    #[serde(default)]
    pub demo: RawDemo,
    /// The MQTT link to the cloud; absent: no cloud link (events stay queued in the log).
    #[serde(default)]
    pub cloud: Option<RawCloud>,
    #[serde(default)]
    pub outbox: RawOutbox,
    /// RS-485 buses (`[[bus]]`), each one serial port with one protocol.
    #[serde(default)]
    pub bus: Vec<crate::rs485::config::RawBus>,
    /// The BLE adapter (padlocks, unit controllers, fobs, BTHome sensors); absent: no BLE.
    #[serde(default)]
    pub ble: Option<crate::ble::config::RawBle>,
    /// The OpenMetrics endpoint (`[metrics] listen`); absent: none.
    #[serde(default)]
    pub metrics: Option<crate::metrics::RawMetrics>,
    /// Where device profiles are read from, on top of the embedded ones.
    #[serde(default)]
    pub profiles: RawProfiles,
    /// The local control socket for installers (docs/pairing.md).
    #[serde(default)]
    pub control: RawControl,
    /// Settings shared by every RS-485 bus (`[rs485] realtime`).
    #[serde(default)]
    pub rs485: crate::rs485::rt::RawRs485,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawControl {
    /// Default `/run/gatehouse/control.sock`; relative to the config file's directory.
    #[serde(default)]
    pub socket: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfiles {
    /// Default `/etc/gatehouse/devices` (which may be missing); a directory named here must
    /// exist.
    #[serde(default)]
    pub dir: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCloud {
    pub host: Spanned<String>,
    #[serde(default)]
    pub port: Option<Spanned<u16>>,
    /// `tls` (mutual TLS, the default) or `tcp` (plain: local test brokers only).
    #[serde(default)]
    pub transport: Option<Spanned<String>>,
    /// `3.1.1` (default) or `5`.
    #[serde(default)]
    pub protocol: Option<Spanned<String>>,
    #[serde(default)]
    pub ca_file: Option<Spanned<String>>,
    #[serde(default)]
    pub cert_file: Option<Spanned<String>>,
    #[serde(default)]
    pub key_file: Option<Spanned<String>>,
    #[serde(default)]
    pub use_system_roots: bool,
    #[serde(default)]
    pub client_id: Option<Spanned<String>>,
    #[serde(default)]
    pub topic_prefix: Option<Spanned<String>>,
    #[serde(default)]
    pub keep_alive_secs: Option<Spanned<u64>>,
    #[serde(default)]
    pub reconnect_min_ms: Option<Spanned<u64>>,
    #[serde(default)]
    pub reconnect_max_ms: Option<Spanned<u64>>,
    pub command_public_key: Spanned<String>,
    #[serde(default)]
    pub command_max_skew_secs: Option<Spanned<u64>>,
    #[serde(default)]
    pub max_message_bytes: Option<Spanned<u64>>,
    #[serde(default)]
    pub inflight: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutbox {
    #[serde(default)]
    pub disk_budget_mb: Option<Spanned<u64>>,
    #[serde(default)]
    pub max_age_days: Option<Spanned<u64>>,
}

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V311,
    V5,
}

/// How to reach the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP: only when the config says `transport = "tcp"`.
    Tcp,
    /// Mutual TLS: the broker's CA (and/or the system roots), this gateway's certificate and key.
    Tls {
        ca_file: Option<PathBuf>,
        use_system_roots: bool,
        cert_file: PathBuf,
        key_file: PathBuf,
    },
}

/// The checked `[cloud]` section.
#[derive(Debug, Clone)]
pub struct CloudConfig {
    pub host: String,
    pub port: u16,
    pub transport: Transport,
    pub protocol: Protocol,
    pub client_id: String,
    pub topic_prefix: String,
    pub keep_alive: std::time::Duration,
    pub reconnect_min: std::time::Duration,
    pub reconnect_max: std::time::Duration,
    pub command_public: VerifyingKey,
    pub command_max_skew: std::time::Duration,
    pub max_message_bytes: usize,
    pub inflight: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSite {
    pub id: Spanned<String>,
    pub gateway_id: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    #[serde(default = "default_data_dir")]
    pub data_dir: Spanned<String>,
    #[serde(default = "default_max_events")]
    pub max_events: Spanned<u64>,
}

fn default_data_dir() -> Spanned<String> {
    Spanned::new(0..0, "/var/lib/gatehouse".to_string())
}

fn default_max_events() -> Spanned<u64> {
    Spanned::new(0..0, 1_000_000)
}

impl Default for RawStorage {
    fn default() -> Self {
        RawStorage {
            data_dir: default_data_dir(),
            max_events: default_max_events(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccess {
    #[serde(default)]
    pub digital_key_public_key: Option<Spanned<String>>,
    #[serde(default)]
    pub initial_snapshot: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    #[serde(default = "default_level")]
    pub level: Spanned<String>,
    /// `auto` (default), `text`, `json` or `journald` (docs/operations.md, *Logs*).
    #[serde(default)]
    pub format: Option<Spanned<String>>,
}

fn default_level() -> Spanned<String> {
    Spanned::new(0..0, "info".to_string())
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: default_level(),
            format: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    #[serde(default = "default_drain")]
    pub drain_timeout_secs: Spanned<u64>,
}

fn default_drain() -> Spanned<u64> {
    Spanned::new(0..0, 10)
}

impl Default for RawShutdown {
    fn default() -> Self {
        RawShutdown {
            drain_timeout_secs: default_drain(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDemo {
    /// Access attempts the daemon makes once at start, to show decisions without hardware.
    #[serde(default)]
    pub attempts: Vec<Spanned<DemoAttempt>>,
    /// Simulated devices: `sim:` bus ports, `[ble] adapter = "sim"`, and cloud commands for
    /// padlocks, controllers and relays that nothing else drives.
    #[serde(default)]
    pub simulate_devices: bool,
    /// The pairing script (docs/pairing.md, *The demo*): needs `simulate_devices`.
    #[serde(default)]
    pub pairing: Option<Spanned<bool>>,
    /// The code the pairing script types on the keypad it adopted (digits).
    #[serde(default)]
    pub pairing_code: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoAttempt {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub fob: Option<String>,
    #[serde(default)]
    pub keypad: Option<String>,
    #[serde(default)]
    pub entry: Option<String>,
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(default)]
    pub exit: bool,
}

/// The checked configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub site_id: String,
    pub gateway_id: String,
    pub data_dir: PathBuf,
    pub max_events: u64,
    pub digital_key_public: Option<VerifyingKey>,
    pub initial_snapshot: Option<PathBuf>,
    pub log_level: String,
    pub log_format: crate::logging::LogFormat,
    pub drain_timeout: std::time::Duration,
    pub demo_attempts: Vec<DemoAttempt>,
    pub cloud: Option<CloudConfig>,
    pub log_limits: crate::store::LogLimits,
    pub simulate_devices: bool,
    /// `[demo] pairing`: an unconfigured keypad and board found and adopted at start.
    pub demo_pairing: bool,
    /// `[demo] pairing_code`: typed on the adopted keypad.
    pub demo_pairing_code: Option<String>,
    pub buses: Vec<crate::rs485::config::BusConfig>,
    pub ble: Option<crate::ble::config::BleConfig>,
    /// The device profiles: embedded, and the profiles directory's files on top.
    pub profiles: std::sync::Arc<crate::profiles::Profiles>,
    pub metrics: Option<crate::metrics::MetricsConfig>,
    /// The local control socket (`[control] socket`).
    pub control_socket: PathBuf,
}

/// A configuration error: `file:line: key `k`: message`.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}: {}{message}", file.display(), key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub key: Option<String>,
    pub message: String,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// Identifiers that end up in topics and file names.
pub(crate) fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl Config {
    /// Reads and checks a config file. The error, if any, is the first problem found.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = std::fs::read(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            // Name the first bad byte by line and column (1-based, counted in bytes).
            let at = e.valid_up_to();
            let line_start = bytes[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            ConfigError {
                file: path.to_path_buf(),
                line: bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1,
                key: None,
                message: format!(
                    "column {}: invalid UTF-8 (byte 0x{:02x} at offset {at}); the file must be \
                     UTF-8 text",
                    at - line_start + 1,
                    bytes[at]
                ),
            }
        })?;
        Config::parse(path, text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let err = |span: Range<usize>, key: &str, message: String| ConfigError {
            file: path.to_path_buf(),
            line: if span.is_empty() && span.start == 0 {
                0
            } else {
                line_of(text, span.start)
            },
            key: Some(key.to_string()),
            message,
        };
        let de = toml::Deserializer::new(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            // `Spanned` fields show up as an internal child key; report the key itself.
            let key = e
                .path()
                .to_string()
                .replace(".$__serde_spanned_private_value", "");
            let inner = e.into_inner();
            let line = inner.span().map(|s| line_of(text, s.start)).unwrap_or(0);
            ConfigError {
                file: path.to_path_buf(),
                line,
                key: (key != "." && !key.is_empty()).then_some(key),
                message: inner.message().trim().to_string(),
            }
        })?;
        let base = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."));
        let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
        let resolve = |p: &str| -> PathBuf {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        for (v, key) in [
            (&raw.site.id, "site.id"),
            (&raw.site.gateway_id, "site.gateway_id"),
        ] {
            if !valid_id(v.get_ref()) {
                return Err(err(
                    v.span(),
                    key,
                    format!(
                        "`{}` is not a valid id (expected 1 to 64 of A-Z a-z 0-9 - _ .)",
                        v.get_ref()
                    ),
                ));
            }
        }
        let dd = &raw.storage.data_dir;
        if dd.get_ref().trim().is_empty() {
            return Err(err(
                dd.span(),
                "storage.data_dir",
                "is empty (expected a directory)".into(),
            ));
        }
        if let Err(e) = crate::fsperm::creatable(&resolve(dd.get_ref())) {
            return Err(err(dd.span(), "storage.data_dir", format!("{e:#}")));
        }
        let me = &raw.storage.max_events;
        if *me.get_ref() < 1000 {
            return Err(err(
                me.span(),
                "storage.max_events",
                format!("{} is too small (expected at least 1000)", me.get_ref()),
            ));
        }
        let digital_key_public = match &raw.access.digital_key_public_key {
            Some(k) => Some(public_key(k, "access.digital_key_public_key", &err)?),
            None => None,
        };
        let initial_snapshot = match &raw.access.initial_snapshot {
            Some(p) => {
                let full = resolve(p.get_ref());
                if !full.is_file() {
                    return Err(err(
                        p.span(),
                        "access.initial_snapshot",
                        format!("file `{}` does not exist", full.display()),
                    ));
                }
                Some(full)
            }
            None => None,
        };
        let level = &raw.log.level;
        if !["error", "warn", "info", "debug", "trace"].contains(&level.get_ref().as_str()) {
            return Err(err(
                level.span(),
                "log.level",
                format!(
                    "`{}` is not a level (expected error, warn, info, debug or trace)",
                    level.get_ref()
                ),
            ));
        }
        let log_format = match &raw.log.format {
            None => crate::logging::LogFormat::default(),
            Some(f) => crate::logging::LogFormat::parse(f.get_ref()).ok_or_else(|| {
                err(
                    f.span(),
                    "log.format",
                    format!(
                        "`{}` is not a log format (expected {})",
                        f.get_ref(),
                        crate::logging::LogFormat::NAMES
                    ),
                )
            })?,
        };
        let drain = &raw.shutdown.drain_timeout_secs;
        if !(1..=300).contains(drain.get_ref()) {
            return Err(err(
                drain.span(),
                "shutdown.drain_timeout_secs",
                format!("{} is out of range (expected 1 to 300)", drain.get_ref()),
            ));
        }
        let mut demo_attempts = Vec::new();
        for (i, a) in raw.demo.attempts.iter().enumerate() {
            let v = a.get_ref();
            let creds = v.code.is_some() as u8 + v.fob.is_some() as u8;
            let targets = v.entry.is_some() as u8 + v.unit.is_some() as u8;
            if creds != 1 || targets != 1 {
                return Err(err(
                    a.span(),
                    &format!("demo.attempts[{i}]"),
                    "expected exactly one of code, fob and exactly one of entry, unit".into(),
                ));
            }
            demo_attempts.push(v.clone());
        }
        let cloud = match &raw.cloud {
            Some(c) => Some(check_cloud(c, &raw.site, &resolve, &err)?),
            None => None,
        };
        let budget = raw.outbox.disk_budget_mb.as_ref();
        let budget_mb = budget.map_or(256, |b| *b.get_ref());
        if let Some(b) = budget
            && !(1..=1_000_000).contains(b.get_ref())
        {
            return Err(err(
                b.span(),
                "outbox.disk_budget_mb",
                format!("{} is out of range (expected 1 to 1000000)", b.get_ref()),
            ));
        }
        let age = raw.outbox.max_age_days.as_ref();
        let age_days = age.map_or(30, |a| *a.get_ref());
        if let Some(a) = age
            && !(1..=3650).contains(a.get_ref())
        {
            return Err(err(
                a.span(),
                "outbox.max_age_days",
                format!("{} is out of range (expected 1 to 3650)", a.get_ref()),
            ));
        }
        let profiles = match &raw.profiles.dir {
            Some(d) => {
                crate::profiles::Profiles::load(&resolve(d.get_ref()), true).map_err(|e| {
                    if e.key.is_none() && e.line == 0 {
                        // The directory itself: point at the config's key.
                        err(
                            d.span(),
                            "profiles.dir",
                            format!("`{}`: {}", e.file.display(), e.message),
                        )
                    } else {
                        e
                    }
                })?
            }
            None => {
                crate::profiles::Profiles::load(Path::new(crate::profiles::DEFAULT_DIR), false)?
            }
        };
        let mut buses = crate::rs485::config::check(
            &raw.bus,
            &resolve,
            &err,
            raw.demo.simulate_devices,
            &profiles,
        )?;
        let realtime = crate::rs485::rt::check(&raw.rs485, &err)?;
        for b in &mut buses {
            b.realtime = realtime;
        }
        let demo_pairing = match &raw.demo.pairing {
            Some(p) if *p.get_ref() && !raw.demo.simulate_devices => {
                return Err(err(
                    p.span(),
                    "demo.pairing",
                    "the pairing script adopts simulated devices: it needs demo.simulate_devices = true".into(),
                ));
            }
            Some(p) => *p.get_ref(),
            None => false,
        };
        let demo_pairing_code = match &raw.demo.pairing_code {
            Some(c)
                if c.get_ref().is_empty() || !c.get_ref().bytes().all(|b| b.is_ascii_digit()) =>
            {
                return Err(err(
                    c.span(),
                    "demo.pairing_code",
                    "is not a code (expected digits, typed on the keypad followed by #)".into(),
                ));
            }
            Some(c) => Some(c.get_ref().clone()),
            None => None,
        };
        let ble = match &raw.ble {
            Some(b) => Some(crate::ble::config::check(
                b,
                &err,
                raw.demo.simulate_devices,
                &profiles,
            )?),
            None => None,
        };
        let metrics = match &raw.metrics {
            Some(m) => crate::metrics::check(m, &err)?,
            None => None,
        };
        let control_socket = match &raw.control.socket {
            Some(p) if p.get_ref().trim().is_empty() => {
                return Err(err(
                    p.span(),
                    "control.socket",
                    "is empty (expected a path)".into(),
                ));
            }
            Some(p) => resolve(p.get_ref()),
            None => PathBuf::from(crate::pairing::control::DEFAULT_SOCKET),
        };
        let log_limits = crate::store::LogLimits {
            max_events: *me.get_ref(),
            max_bytes: budget_mb << 20,
            max_age: chrono::Duration::days(age_days as i64),
        };
        Ok(Config {
            path: path.to_path_buf(),
            site_id: raw.site.id.into_inner(),
            gateway_id: raw.site.gateway_id.into_inner(),
            data_dir: resolve(dd.get_ref()),
            max_events: *me.get_ref(),
            digital_key_public,
            initial_snapshot,
            log_level: level.get_ref().clone(),
            log_format,
            drain_timeout: std::time::Duration::from_secs(*drain.get_ref()),
            demo_attempts,
            cloud,
            log_limits,
            simulate_devices: raw.demo.simulate_devices,
            demo_pairing,
            demo_pairing_code,
            buses,
            ble,
            profiles: std::sync::Arc::new(profiles),
            metrics,
            control_socket,
        })
    }
}

pub(crate) type ErrFn<'a> = dyn Fn(Range<usize>, &str, String) -> ConfigError + 'a;

/// An optional number: `default` when absent, an error naming its line when outside `lo..=hi`.
pub(crate) fn in_range(
    err: &ErrFn,
    v: &Option<Spanned<u64>>,
    key: &str,
    default: u64,
    lo: u64,
    hi: u64,
) -> Result<u64, ConfigError> {
    match v {
        None => Ok(default),
        Some(x) if (lo..=hi).contains(x.get_ref()) => Ok(*x.get_ref()),
        Some(x) => Err(err(
            x.span(),
            key,
            format!("{} is out of range (expected {lo} to {hi})", x.get_ref()),
        )),
    }
}

/// The cloud's Ed25519 public key: refused when it does not parse, and when it is a weak
/// (small-order) point such as all zeros — a placeholder left in, under which a forged signature
/// could verify.
fn public_key(k: &Spanned<String>, key: &str, err: &ErrFn) -> Result<VerifyingKey, ConfigError> {
    let pk = digital_key::parse_public_key(k.get_ref()).ok_or_else(|| {
        err(
            k.span(),
            key,
            "not an Ed25519 public key (expected 64 hex digits or base64 of 32 bytes)".into(),
        )
    })?;
    if pk.as_bytes().iter().all(|&b| b == 0) || pk.is_weak() {
        return Err(err(
            k.span(),
            key,
            format!(
                "{} is not a usable Ed25519 public key (a weak, small-order point): put the \
                 cloud's real public key here",
                if pk.as_bytes().iter().all(|&b| b == 0) {
                    "all zeros"
                } else {
                    "this key"
                }
            ),
        ));
    }
    Ok(pk)
}

fn check_cloud(
    c: &RawCloud,
    site: &RawSite,
    resolve: &dyn Fn(&str) -> PathBuf,
    err: &ErrFn,
) -> Result<CloudConfig, ConfigError> {
    let in_range = |v: &Option<Spanned<u64>>, key: &str, default: u64, lo: u64, hi: u64| {
        in_range(err, v, key, default, lo, hi)
    };
    if c.host.get_ref().trim().is_empty() {
        return Err(err(
            c.host.span(),
            "cloud.host",
            "is empty (expected a host name or address)".into(),
        ));
    }
    let transport_name = c.transport.as_ref().map_or("tls", |t| t.get_ref().as_str());
    let file = |v: &Option<Spanned<String>>,
                key: &str,
                required: bool|
     -> Result<Option<PathBuf>, ConfigError> {
        match v {
            Some(p) => {
                let full = resolve(p.get_ref());
                if !full.is_file() {
                    return Err(err(
                        p.span(),
                        key,
                        format!("file `{}` does not exist", full.display()),
                    ));
                }
                Ok(Some(full))
            }
            None if required => Err(err(
                c.host.span(),
                key,
                "is required with transport = \"tls\" (mutual TLS)".into(),
            )),
            None => Ok(None),
        }
    };
    let transport = match transport_name {
        "tls" => {
            let ca_file = file(&c.ca_file, "cloud.ca_file", !c.use_system_roots)?;
            let cert_file = file(&c.cert_file, "cloud.cert_file", true)?.expect("required");
            let key_file = file(&c.key_file, "cloud.key_file", true)?.expect("required");
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&key_file)
                    .map(|m| m.permissions().mode() & 0o777)
                    .unwrap_or(0);
                if mode & 0o077 != 0 {
                    let span = c.key_file.as_ref().map(|k| k.span()).unwrap_or(0..0);
                    return Err(err(
                        span,
                        "cloud.key_file",
                        format!(
                            "`{}` has mode {mode:04o}; a private key must be readable by its owner only (chmod 600)",
                            key_file.display()
                        ),
                    ));
                }
            }
            Transport::Tls {
                ca_file,
                use_system_roots: c.use_system_roots,
                cert_file,
                key_file,
            }
        }
        "tcp" => Transport::Tcp,
        other => {
            let span = c.transport.as_ref().map(|t| t.span()).unwrap_or(0..0);
            return Err(err(
                span,
                "cloud.transport",
                format!("`{other}` is not a transport (expected tls or tcp)"),
            ));
        }
    };
    let protocol = match c
        .protocol
        .as_ref()
        .map_or("3.1.1", |p| p.get_ref().as_str())
    {
        "3.1.1" | "4" | "v4" => Protocol::V311,
        "5" | "v5" => Protocol::V5,
        other => {
            let span = c.protocol.as_ref().map(|t| t.span()).unwrap_or(0..0);
            return Err(err(
                span,
                "cloud.protocol",
                format!("`{other}` is not an MQTT version (expected 3.1.1 or 5)"),
            ));
        }
    };
    let command_public = public_key(&c.command_public_key, "cloud.command_public_key", err)?;
    let prefix = c
        .topic_prefix
        .as_ref()
        .map_or("gatehouse".to_string(), |p| p.get_ref().clone());
    if prefix.is_empty()
        || prefix.contains(['+', '#'])
        || prefix.starts_with('/')
        || prefix.ends_with('/')
    {
        let span = c.topic_prefix.as_ref().map(|t| t.span()).unwrap_or(0..0);
        return Err(err(
            span,
            "cloud.topic_prefix",
            format!("`{prefix}` is not a topic prefix (no wildcards, no leading or trailing /)"),
        ));
    }
    let client_id = c.client_id.as_ref().map_or_else(
        || format!("{}-{}", site.id.get_ref(), site.gateway_id.get_ref()),
        |x| x.get_ref().clone(),
    );
    let port = c.port.as_ref().map_or(
        if transport == Transport::Tcp {
            1883
        } else {
            8883
        },
        |p| *p.get_ref(),
    );
    let reconnect_min = in_range(
        &c.reconnect_min_ms,
        "cloud.reconnect_min_ms",
        500,
        10,
        60_000,
    )?;
    let reconnect_max = in_range(
        &c.reconnect_max_ms,
        "cloud.reconnect_max_ms",
        // With waits of 50-100 % of it, the link is back within 4 s (plus a handshake) of the
        // broker's return; a fleet spreads its attempts over 2 s (docs/guarantees.md).
        4_000,
        reconnect_min,
        3_600_000,
    )?;
    Ok(CloudConfig {
        host: c.host.get_ref().clone(),
        port,
        transport,
        protocol,
        client_id,
        topic_prefix: prefix,
        keep_alive: std::time::Duration::from_secs(in_range(
            &c.keep_alive_secs,
            "cloud.keep_alive_secs",
            30,
            5,
            3600,
        )?),
        reconnect_min: std::time::Duration::from_millis(reconnect_min),
        reconnect_max: std::time::Duration::from_millis(reconnect_max),
        command_public,
        command_max_skew: std::time::Duration::from_secs(in_range(
            &c.command_max_skew_secs,
            "cloud.command_max_skew_secs",
            30,
            0,
            3600,
        )?),
        max_message_bytes: in_range(
            &c.max_message_bytes,
            "cloud.max_message_bytes",
            64 * 1024,
            1024,
            256 << 20,
        )? as usize,
        inflight: in_range(&c.inflight, "cloud.inflight", 100, 1, 1000)? as u16,
    })
}
