//! The device profile catalogue: the profiles embedded in the binary (`devices/*.toml`) and, on
//! top, the files of the profiles directory (`[profiles] dir`, default `/etc/gatehouse/devices`).
//! A file whose id is an embedded profile's replaces it (logged); a new id adds a Modbus device
//! model without a rebuild. BLE family profiles can only be replaced (a site database device
//! gets the profile of its `kind`, by the built-in id).
//!
//! Every file is checked whole (`deny_unknown_fields`, types, ranges) and an error names the
//! file, the line and the key: one bad file refuses the whole config, like a bad key in it.
//! [`Profiles`] is part of the checked `Config` (`Config::load` builds it), so whatever reads
//! the config again reads the directory again.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ble::profile as ble;
use crate::config::ConfigError;
use crate::rs485::profile as modbus;

/// Where profiles are read from when the config names no directory.
pub const DEFAULT_DIR: &str = "/etc/gatehouse/devices";

/// A profile file, checked.
#[derive(Debug, Clone)]
pub enum Parsed {
    Modbus(modbus::Profile),
    Ble(ble::Profile),
}

impl Parsed {
    pub fn id(&self) -> &str {
        match self {
            Parsed::Modbus(p) => &p.id,
            Parsed::Ble(p) => &p.id,
        }
    }

    /// `modbus`, `ble-lock`, `bthome` or `ble-fob`.
    pub fn protocol(&self) -> &'static str {
        match self {
            Parsed::Modbus(_) => "modbus",
            Parsed::Ble(p) => ble::protocol_of(p.kind),
        }
    }
}

/// Where a profile in use comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Embedded,
    File(PathBuf),
}

/// One line of `gatehouse profiles list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: String,
    pub protocol: &'static str,
    pub source: Source,
    /// An embedded profile a file replaces (not in use), or a file that replaces one.
    pub overridden: bool,
}

/// The profiles the daemon uses: embedded, replaced or added by the profiles directory.
#[derive(Debug, Clone)]
pub struct Profiles {
    modbus: BTreeMap<String, modbus::Profile>,
    ble: BTreeMap<String, ble::Profile>,
    /// Ids read from the directory, with their file.
    files: BTreeMap<String, PathBuf>,
    /// Where the directory was read from (`None`: only the embedded profiles).
    dir: Option<PathBuf>,
}

impl Profiles {
    /// Only the profiles embedded in the binary.
    pub fn embedded() -> Profiles {
        Profiles {
            modbus: modbus::builtin().clone(),
            ble: ble::builtin().clone(),
            files: BTreeMap::new(),
            dir: None,
        }
    }

    /// The embedded profiles and, on top, every `*.toml` file of `dir` (files whose name starts
    /// with `.` are skipped). A missing `dir` is fine when it is the default one
    /// (`required == false`); otherwise a missing or unreadable directory is an error, and so
    /// is any bad file in it. The error's `key` is `None` and `line` 0 for a directory error,
    /// so that the caller can point at its own `profiles.dir` key.
    pub fn load(dir: &Path, required: bool) -> Result<Profiles, ConfigError> {
        let mut set = Profiles::embedded();
        let dir_err = |message: String| ConfigError {
            file: dir.to_path_buf(),
            line: 0,
            key: None,
            message,
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => return Ok(set),
            Err(e) => return Err(dir_err(format!("cannot read the profiles directory: {e}"))),
        };
        let mut files = Vec::new();
        for e in entries {
            let e = e.map_err(|e| dir_err(format!("cannot read the profiles directory: {e}")))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || !name.ends_with(".toml") {
                continue;
            }
            files.push(e.path());
        }
        files.sort();
        for path in files {
            let p = parse_file(&path)?;
            let id = p.id().to_string();
            let embedded = match &p {
                Parsed::Modbus(_) => modbus::builtin().contains_key(&id),
                Parsed::Ble(_) => ble::builtin().contains_key(&id),
            };
            let other_kind = match &p {
                Parsed::Modbus(_) => ble::builtin().contains_key(&id),
                Parsed::Ble(_) => modbus::builtin().contains_key(&id),
            };
            let file_err = |message: String| ConfigError {
                file: path.clone(),
                line: 0,
                key: Some("protocol".into()),
                message,
            };
            if other_kind {
                return Err(file_err(format!(
                    "`{id}` is an embedded profile of another protocol; a file replacing it \
                     must keep its protocol"
                )));
            }
            if let Parsed::Ble(b) = &p {
                if !embedded {
                    return Err(file_err(format!(
                        "a BLE profile can only replace a built-in one (noke-padlock, \
                         noke-unit-controller, bthome-sensor, ble-fob): devices get the \
                         profile of their kind, and `{id}` is none of these"
                    )));
                }
                if ble::id_for_kind(b.kind) != id {
                    return Err(ConfigError {
                        file: path.clone(),
                        line: 0,
                        key: Some("kind".into()),
                        message: format!(
                            "`{id}` is the profile of another kind (expected the kind of the \
                             built-in `{id}`)"
                        ),
                    });
                }
            }
            if embedded {
                tracing::info!(profile = %id, file = %path.display(), "a profile file replaces the embedded profile");
            } else {
                tracing::info!(profile = %id, file = %path.display(), "profile added from file");
            }
            match p {
                Parsed::Modbus(m) => {
                    set.modbus.insert(id.clone(), m);
                }
                Parsed::Ble(b) => {
                    set.ble.insert(id.clone(), b);
                }
            }
            set.files.insert(id, path);
        }
        set.dir = Some(dir.to_path_buf());
        Ok(set)
    }

    /// The Modbus profile `id`.
    pub fn modbus(&self, id: &str) -> Option<&modbus::Profile> {
        self.modbus.get(id)
    }

    /// Every Modbus profile id, sorted.
    pub fn modbus_ids(&self) -> impl Iterator<Item = &str> {
        self.modbus.keys().map(String::as_str)
    }

    /// The profile each BLE device kind gets.
    pub fn ble_kinds(&self) -> ble::KindProfiles {
        ble::KindProfiles::new(|id| self.ble[id].clone())
    }

    /// The directory read, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Every profile: those in use, and embedded ones a file replaces (`overridden`), by id.
    pub fn list(&self) -> Vec<Listed> {
        let mut out = Vec::new();
        let in_use = self.modbus.keys().map(|id| (id, "modbus")).chain(
            self.ble
                .iter()
                .map(|(id, p)| (id, ble::protocol_of(p.kind))),
        );
        for (id, protocol) in in_use {
            let embedded = modbus::builtin().contains_key(id) || ble::builtin().contains_key(id);
            match self.files.get(id) {
                Some(f) => {
                    out.push(Listed {
                        id: id.clone(),
                        protocol,
                        source: Source::File(f.clone()),
                        overridden: false,
                    });
                    if embedded {
                        out.push(Listed {
                            id: id.clone(),
                            protocol,
                            source: Source::Embedded,
                            overridden: true,
                        });
                    }
                }
                None => out.push(Listed {
                    id: id.clone(),
                    protocol,
                    source: Source::Embedded,
                    overridden: false,
                }),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id).then(a.overridden.cmp(&b.overridden)));
        out
    }
}

/// Reads and checks one profile file: its id must be its file name without `.toml`.
pub fn parse_file(path: &Path) -> Result<Parsed, ConfigError> {
    let whole = |line: usize, message: String| ConfigError {
        file: path.to_path_buf(),
        line,
        key: None,
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| whole(0, format!("cannot read: {e}")))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        let at = e.valid_up_to();
        whole(
            line_of(&String::from_utf8_lossy(&bytes[..at]), at),
            "invalid UTF-8: a profile is UTF-8 text".into(),
        )
    })?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let Some(stem) = name.strip_suffix(".toml") else {
        return Err(whole(0, "a profile file's name ends in `.toml`".into()));
    };
    parse_text(path, stem, text)
}

/// Checks one profile's text; `stem` is the id its file name gives, `path` names it in errors.
pub fn parse_text(path: &Path, stem: &str, text: &str) -> Result<Parsed, ConfigError> {
    let err = |span: Option<Range<usize>>, key: Option<String>, message: String| ConfigError {
        file: path.to_path_buf(),
        line: span.map_or(0, |s| line_of(text, s.start)),
        key,
        message,
    };
    /// Just the protocol, to pick the profile's shape.
    #[derive(Deserialize)]
    struct Head {
        protocol: Option<toml::Spanned<String>>,
    }
    let head: Head =
        toml::from_str(text).map_err(|e| err(e.span(), None, e.message().trim().to_string()))?;
    let Some(protocol) = head.protocol else {
        return Err(err(
            None,
            Some("protocol".into()),
            "is missing (expected modbus, ble-lock, bthome or ble-fob)".into(),
        ));
    };
    /// A serde error with its key path and line.
    fn de<T: serde::de::DeserializeOwned>(
        text: &str,
        err: &dyn Fn(Option<Range<usize>>, Option<String>, String) -> ConfigError,
    ) -> Result<T, ConfigError> {
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let key = (key != "." && !key.is_empty()).then_some(key);
            // A missing key has no span of its own: point at the table it belongs in.
            let span = inner
                .span()
                .or_else(|| key.as_deref().and_then(|k| key_span(text, k)));
            err(span, key, inner.message().trim().to_string())
        })
    }
    let semantic = |(key, message): (String, String)| err(key_span(text, &key), Some(key), message);
    let parsed = match protocol.get_ref().as_str() {
        "modbus" => {
            let p: modbus::Profile = de(text, &err)?;
            p.check().map_err(semantic)?;
            Parsed::Modbus(p)
        }
        "ble-lock" | "bthome" | "ble-fob" => {
            let raw: ble::RawProfile = de(text, &err)?;
            Parsed::Ble(raw.check().map_err(semantic)?)
        }
        other => {
            return Err(err(
                Some(protocol.span()),
                Some("protocol".into()),
                format!(
                    "`{other}` is not a profile protocol (expected modbus, ble-lock, bthome or ble-fob)"
                ),
            ));
        }
    };
    if parsed.id() != stem || !crate::config::valid_id(stem) {
        return Err(err(
            key_span(text, "id"),
            Some("id".into()),
            format!(
                "`{}` must be the file name without `.toml` (`{stem}`) and 1 to 64 of A-Z a-z \
                 0-9 - _ .",
                parsed.id()
            ),
        ));
    }
    Ok(parsed)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Where the key `a.b[2].c` is written in a TOML text (its name, or the nearest table that
/// holds it), if the text parses.
fn key_span(text: &str, path: &str) -> Option<Range<usize>> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut found = doc.as_table().span();
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let (name, index) = match part.split_once('[') {
            Some((n, i)) => (n, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let (k, item) = table.get_key_value(name)?;
        found = k.span().or(found);
        let item = match index {
            None => item,
            Some(i) => match item {
                toml_edit::Item::ArrayOfTables(a) => {
                    let t = a.get(i)?;
                    found = t.span().or(found);
                    table = t;
                    continue;
                }
                toml_edit::Item::Value(toml_edit::Value::Array(a)) => {
                    let v = a.get(i)?;
                    found = v.span().or(found);
                    match v.as_inline_table() {
                        Some(t) => {
                            table = t;
                            continue;
                        }
                        None => return found,
                    }
                }
                _ => return found,
            },
        };
        if parts.peek().is_none() {
            return found;
        }
        match item.as_table_like() {
            Some(t) => table = t,
            None => return found,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"id = "acme-th"
name = "Acme sensor"
protocol = "modbus"
baud = 9600
parity = "none"
default_address = 1
poll_interval_ms = 1000
offline_after_failures = 3

[[readings]]
name = "temperature"
register = 1
type = "i16"
scale = 0.1
unit = "celsius"
report_delta = 0
report_every_s = 0
"#;

    /// Checks `text` as `acme-th.toml`: `Ok` or the error's `line:key: message` start.
    #[track_caller]
    fn check(text: &str, expected: &str) {
        let got = match parse_text(Path::new("/p/acme-th.toml"), "acme-th", text) {
            Ok(p) => format!("ok {} {}", p.id(), p.protocol()),
            Err(e) => format!("{}:{}: {}", e.line, e.key.unwrap_or_default(), e.message),
        };
        assert!(
            got.starts_with(expected),
            "got {got:?}, expected {expected:?}"
        );
    }

    #[test]
    fn profile_files_are_checked_with_line_and_key() {
        check(GOOD, "ok acme-th modbus");
        check(
            &GOOD.replace("\"i16\"", "\"f32\""),
            "13:readings[0].type: unknown variant `f32`",
        );
        check(
            &GOOD.replace("baud = 9600", "baud = 9600\nsurprise = 1"),
            "5:surprise: unknown field `surprise`",
        );
        check(
            &GOOD.replace("scale = 0.1", "scale = -1.0"),
            "14:readings[0].scale: must be a number above 0",
        );
        check(
            &GOOD.replace("default_address = 1", "default_address = 0"),
            "6:default_address: must be 1 to 247",
        );
        check(
            &GOOD.replace("report_delta = 0", "report_delta = -1.5"),
            "16:readings[0].report_delta: must be",
        );
        check(
            &GOOD.replace("id = \"acme-th\"", "id = \"other\""),
            "1:id: `other` must be the file name",
        );
        check(
            &GOOD.replace("protocol = \"modbus\"", "protocol = \"osdp\""),
            "3:protocol: `osdp` is not a profile protocol",
        );
        check(
            &GOOD.replace("protocol = \"modbus\"\n", ""),
            "0:protocol: is missing",
        );
        check(
            &GOOD.replace("parity = \"none\"\n", ""),
            "1:: missing field `parity`",
        );
        check(
            &GOOD.replace("register = 1", "register = 70000"),
            "12:readings[0].register:",
        );
        check("id = [", "1::");
        check(
            &GOOD.replace(
                "[[readings]]",
                "[relays]\ncount = 65\ncoil_base = 0\n\n[[readings]]",
            ),
            "11:relays.count: must be 1 to 64",
        );
    }

    #[test]
    fn a_report_delta_of_zero_is_accepted() {
        let Parsed::Modbus(p) = parse_text(Path::new("acme-th.toml"), "acme-th", GOOD).unwrap()
        else {
            panic!("not modbus")
        };
        assert_eq!(p.readings[0].report_delta, 0.0);
        assert_eq!(p.readings[0].report_every_s, 0);
    }

    #[test]
    fn a_directory_adds_and_replaces_and_a_missing_default_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("acme-th.toml"), GOOD).unwrap();
        let replaced = modbus::BUILTIN
            .iter()
            .find(|(f, _)| *f == "xy-md02.toml")
            .unwrap()
            .1
            .replace("report_delta = 0.5", "report_delta = 0.0");
        std::fs::write(dir.path().join("xy-md02.toml"), replaced).unwrap();
        std::fs::write(dir.path().join("README.md"), "not a profile").unwrap();
        std::fs::write(dir.path().join(".xy-md02.toml.swp"), "junk").unwrap();
        let set = Profiles::load(dir.path(), true).unwrap();
        assert!(set.modbus("acme-th").is_some());
        assert_eq!(set.modbus("xy-md02").unwrap().readings[0].report_delta, 0.0);
        assert_eq!(
            set.modbus("waveshare-relay-8ch").unwrap().id,
            "waveshare-relay-8ch"
        );
        let list = set.list();
        let xy: Vec<_> = list.iter().filter(|l| l.id == "xy-md02").collect();
        assert_eq!(xy.len(), 2);
        assert_eq!(xy[0].source, Source::File(dir.path().join("xy-md02.toml")));
        assert!(!xy[0].overridden);
        assert_eq!(xy[1].source, Source::Embedded);
        assert!(xy[1].overridden);

        // Missing: fine for the default, an error when configured.
        let gone = dir.path().join("nothing-here");
        assert!(
            Profiles::load(&gone, false)
                .unwrap()
                .modbus("xy-md02")
                .is_some()
        );
        let e = Profiles::load(&gone, true).unwrap_err();
        assert!(
            e.message.contains("cannot read the profiles directory"),
            "{e}"
        );

        // One bad file refuses the set, naming the file.
        std::fs::write(
            dir.path().join("bad.toml"),
            GOOD.replace("acme-th", "bad").replace("\"i16\"", "\"f32\""),
        )
        .unwrap();
        let e = Profiles::load(dir.path(), true).unwrap_err();
        assert_eq!(e.file, dir.path().join("bad.toml"));
        assert_eq!(e.key.as_deref(), Some("readings[0].type"));
    }

    #[test]
    fn ble_files_only_replace_the_builtin_family() {
        let dir = tempfile::tempdir().unwrap();
        let text = ble::FILES
            .iter()
            .find(|(f, _)| *f == "bthome-sensor.toml")
            .unwrap()
            .1
            .replace("offline_after_s = 900", "offline_after_s = 60");
        std::fs::write(dir.path().join("bthome-sensor.toml"), &text).unwrap();
        let set = Profiles::load(dir.path(), true).unwrap();
        assert_eq!(
            set.ble_kinds()
                .get(crate::sync::DeviceKind::Sensor)
                .offline_after,
            Some(std::time::Duration::from_secs(60))
        );
        std::fs::write(
            dir.path().join("my-sensor.toml"),
            text.replace("bthome-sensor", "my-sensor"),
        )
        .unwrap();
        let e = Profiles::load(dir.path(), true).unwrap_err();
        assert!(e.message.contains("can only replace a built-in one"), "{e}");
    }
}
