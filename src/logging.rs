//! The daemon's logs: where they go and in what form, changeable while running.
//!
//! `[log] format` (docs/operations.md, *Logs*):
//! - `text`: one human line per event on stderr; ANSI colour only when stderr is a terminal
//!   (never in a pipe, a file or the journal).
//! - `json`: one JSON object per line on stderr (tracing-subscriber's JSON formatter): `timestamp`,
//!   `level`, `target`, `fields` (`message` plus the structured fields: `device`, `bus`,
//!   `entry`, `reason`...).
//! - `journald`: records sent to the journal's socket with their fields as journal fields
//!   (`DEVICE=`, `BUS=`, `ENTRY=`, `REASON=`..., `MESSAGE=`, `PRIORITY=`) by `tracing-journald`.
//! - `auto` (the default): `journald` when stderr *is* the journal (the `JOURNAL_STREAM`
//!   variable systemd sets names stderr's device and inode: the documented test), else `text`.
//!
//! The level is `[log] level` for gatehouse's own modules (`warn` for the libraries) unless
//! `RUST_LOG` is set, which then wins (at start and at every reload).
//!
//! The subscriber is a registry with two reloadable layers, the filter (global) and the
//! formatter, so a reload ([`Logging::apply`]) swaps level and format in place. (A per-layer
//! filter cannot be swapped in with its layer: tracing-subscriber registers such filters only
//! when the subscriber is built.) What gets logged never carries a
//! secret: call sites log identifiers and redacted refusals (`crate::redact`), never codes or
//! keys, whatever the format.

use std::io::IsTerminal as _;
use std::sync::Mutex;

use tracing_subscriber::layer::Layered;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// `[log] format` as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Auto,
    Text,
    Json,
    Journald,
}

impl LogFormat {
    pub const NAMES: &'static str = "auto, text, json or journald";

    pub fn parse(s: &str) -> Option<LogFormat> {
        Some(match s {
            "auto" => LogFormat::Auto,
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            "journald" => LogFormat::Journald,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Auto => "auto",
            LogFormat::Text => "text",
            LogFormat::Json => "json",
            LogFormat::Journald => "journald",
        }
    }
}

/// What a format resolves to on this process's stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Text lines; `ansi`: with colour (stderr is a terminal).
    Text {
        ansi: bool,
    },
    Json,
    Journald,
}

/// Picks the output: `auto` is the journal when `journal_stream` (the `JOURNAL_STREAM`
/// variable, `"<dev>:<ino>"` in decimal) names `stderr` (its device and inode), text otherwise.
/// Colour only on a terminal, never with another output.
pub fn resolve(
    format: LogFormat,
    journal_stream: Option<&str>,
    stderr: Option<(u64, u64)>,
    terminal: bool,
) -> Output {
    match format {
        LogFormat::Text => Output::Text { ansi: terminal },
        LogFormat::Json => Output::Json,
        LogFormat::Journald => Output::Journald,
        LogFormat::Auto => {
            let under_journal = match (journal_stream.and_then(parse_stream), stderr) {
                (Some(named), Some(actual)) => named == actual,
                _ => false,
            };
            if under_journal {
                Output::Journald
            } else {
                Output::Text { ansi: terminal }
            }
        }
    }
}

/// `"<dev>:<ino>"` → `(dev, ino)`.
fn parse_stream(s: &str) -> Option<(u64, u64)> {
    let (dev, ino) = s.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// stderr's device and inode.
fn stderr_id() -> Option<(u64, u64)> {
    let st = rustix::fs::fstat(std::io::stderr()).ok()?;
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    Some((st.st_dev as u64, u64::from(st.st_ino)))
}

/// The output `format` resolves to for this process.
pub fn output_here(format: LogFormat) -> Output {
    resolve(
        format,
        std::env::var("JOURNAL_STREAM").ok().as_deref(),
        stderr_id(),
        std::io::stderr().is_terminal(),
    )
}

type Base = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type Boxed = Box<dyn Layer<Base> + Send + Sync>;

/// The installed subscriber's handle: level and format changed live.
pub struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    format: reload::Handle<Boxed, Base>,
    current: Mutex<(String, LogFormat)>,
}

/// The filter: `RUST_LOG` when set, else `level` for gatehouse and `warn` for the rest.
fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("gatehouse={level},warn")))
}

/// The formatting layer for `format`, and a note when the journal was asked for but
/// cannot be reached (then text is used).
fn build(format: LogFormat) -> (Boxed, Output, Option<String>) {
    let mut out = output_here(format);
    let mut note = None;
    if out == Output::Journald {
        match tracing_journald::layer() {
            Ok(j) => {
                // Fields as `DEVICE=`, `BUS=`... (no prefix): what `journalctl DEVICE=x` finds.
                let j = j
                    .with_field_prefix(None)
                    .with_syslog_identifier("gatehouse".into());
                return (Box::new(j), out, None);
            }
            Err(e) => {
                note = Some(format!(
                    "log.format `{}`: the journal is unreachable ({e}); logging text to stderr",
                    format.name()
                ));
                out = Output::Text {
                    ansi: std::io::stderr().is_terminal(),
                };
            }
        }
    }
    let layer: Boxed = if out == Output::Json {
        Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr),
        )
    } else {
        Box::new(
            tracing_subscriber::fmt::layer()
                .with_ansi(out == Output::Text { ansi: true })
                .with_writer(std::io::stderr),
        )
    };
    (layer, out, note)
}

impl Logging {
    /// Installs the process's subscriber. `None` if one is installed already (tests).
    pub fn init(level: &str, format: LogFormat) -> Option<Logging> {
        let (layer, _, note) = build(format);
        let (filter, filter_handle) = reload::Layer::new(filter(level));
        let (layer, format_handle) = reload::Layer::new(layer);
        tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .try_init()
            .ok()?;
        if let Some(n) = note {
            tracing::warn!("{n}");
        }
        Some(Logging {
            filter: filter_handle,
            format: format_handle,
            current: Mutex::new((level.to_string(), format)),
        })
    }

    /// Changes level and format. Returns what changed (`log.level`, `log.format`), empty when
    /// nothing did.
    pub fn apply(&self, level: &str, format: LogFormat) -> anyhow::Result<Vec<&'static str>> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = Vec::new();
        if cur.0 != level {
            changed.push("log.level");
        }
        if cur.1 != format {
            changed.push("log.format");
        }
        if changed.is_empty() {
            return Ok(changed);
        }
        let mut out = None;
        let mut note = None;
        if cur.1 != format {
            let (layer, o, n) = build(format);
            self.format
                .reload(layer)
                .map_err(|e| anyhow::anyhow!("changing the log format: {e}"))?;
            (out, note) = (Some(o), n);
        }
        if cur.0 != level {
            self.filter
                .reload(filter(level))
                .map_err(|e| anyhow::anyhow!("changing the log level: {e}"))?;
        }
        *cur = (level.to_string(), format);
        drop(cur);
        if let Some(n) = note {
            tracing::warn!("{n}");
        }
        tracing::info!(level, format = format.name(), output = ?out, "log settings changed");
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_the_journal_only_when_stderr_is_the_stream_systemd_named() {
        let me = Some((64769, 123456));
        assert_eq!(
            resolve(LogFormat::Auto, Some("64769:123456"), me, false),
            Output::Journald
        );
        // Another stream (stderr redirected to a file or a pipe by a wrapper): text.
        assert_eq!(
            resolve(LogFormat::Auto, Some("64769:999"), me, false),
            Output::Text { ansi: false }
        );
        // No variable, a malformed one, or stderr unknown: text.
        assert_eq!(
            resolve(LogFormat::Auto, None, me, true),
            Output::Text { ansi: true }
        );
        assert_eq!(
            resolve(LogFormat::Auto, Some("garbage"), me, false),
            Output::Text { ansi: false }
        );
        assert_eq!(
            resolve(LogFormat::Auto, Some("64769:123456"), None, false),
            Output::Text { ansi: false }
        );
    }

    #[test]
    fn explicit_formats_win_and_colour_needs_a_terminal() {
        let me = Some((1, 2));
        assert_eq!(
            resolve(LogFormat::Text, Some("1:2"), me, false),
            Output::Text { ansi: false }
        );
        assert_eq!(
            resolve(LogFormat::Text, None, None, true),
            Output::Text { ansi: true }
        );
        assert_eq!(resolve(LogFormat::Json, None, me, true), Output::Json);
        assert_eq!(
            resolve(LogFormat::Journald, None, me, true),
            Output::Journald
        );
    }

    #[test]
    fn format_names_round_trip() {
        for f in [
            LogFormat::Auto,
            LogFormat::Text,
            LogFormat::Json,
            LogFormat::Journald,
        ] {
            assert_eq!(LogFormat::parse(f.name()), Some(f));
        }
        assert_eq!(LogFormat::parse("JSON"), None);
    }
}
