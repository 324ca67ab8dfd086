//! Commands, parsed: [`parse`] reads an authentic [`Command`]'s name, target and arguments
//! into a [`Request`] (`unknown_command`, `bad_target`, `bad_reason`, `bad_args`), and
//! [`resolve`] checks its target against the current site tables into a [`Plan`]
//! (`unknown_target`, `no_controller`): which device, channel and action, if any.

use serde::Serialize;
use serde_json::Value;

use super::{DEFAULT_PULSE_MS, INSTALL_MINUTES, MAX_NOTE_LEN, PULSE_MS, Reason, Refusal};
use crate::cloud::messages::{Command, CommandTarget};
use crate::pairing::AdoptSpec;
use crate::site::Tables;

/// The command names this gateway executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandName {
    Unlock,
    EmergencyUnlock,
    Lock,
    Locate,
    Relay,
    InstallMode,
    Resync,
    Ping,
    Adopt,
    Remove,
}

impl CommandName {
    pub const ALL: [CommandName; 10] = [
        CommandName::Unlock,
        CommandName::EmergencyUnlock,
        CommandName::Lock,
        CommandName::Locate,
        CommandName::Relay,
        CommandName::InstallMode,
        CommandName::Resync,
        CommandName::Ping,
        CommandName::Adopt,
        CommandName::Remove,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandName::Unlock => "unlock",
            CommandName::EmergencyUnlock => "emergency_unlock",
            CommandName::Lock => "lock",
            CommandName::Locate => "locate",
            CommandName::Relay => "relay",
            CommandName::InstallMode => "install_mode",
            CommandName::Resync => "resync",
            CommandName::Ping => "ping",
            CommandName::Adopt => "adopt",
            CommandName::Remove => "remove",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|n| n.as_str() == s)
    }
}

/// Why an emergency unlock (*Emergency Unlock Override*) is needed: a fixed list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EmergencyReason {
    /// `tenant_locked_phone_in_unit`
    TenantLockedPhoneInUnit,
    /// `tenant_lost_phone`
    TenantLostPhone,
    /// `medical_emergency`
    MedicalEmergency,
    /// `fire_or_safety`
    FireOrSafety,
    /// `device_malfunction`
    DeviceMalfunction,
    /// `other` (say what in `note`)
    Other,
}

impl EmergencyReason {
    pub const ALL: [EmergencyReason; 6] = [
        EmergencyReason::TenantLockedPhoneInUnit,
        EmergencyReason::TenantLostPhone,
        EmergencyReason::MedicalEmergency,
        EmergencyReason::FireOrSafety,
        EmergencyReason::DeviceMalfunction,
        EmergencyReason::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EmergencyReason::TenantLockedPhoneInUnit => "tenant_locked_phone_in_unit",
            EmergencyReason::TenantLostPhone => "tenant_lost_phone",
            EmergencyReason::MedicalEmergency => "medical_emergency",
            EmergencyReason::FireOrSafety => "fire_or_safety",
            EmergencyReason::DeviceMalfunction => "device_malfunction",
            EmergencyReason::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// The reason (and optional note) of an emergency unlock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Emergency {
    pub reason: EmergencyReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What an unlock is for: serialises as `{"unit": "A-101"}` or `{"entry": "gate-1"}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetRef {
    Unit(String),
    Entry(String),
}

/// What a unit controller (padlock) is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitAction {
    Unlock,
    Lock,
    /// Beep/flash so that staff can find it.
    Locate,
}

/// What a relay output is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelayOp {
    /// On for `ms` milliseconds, then off.
    Pulse {
        ms: u32,
    },
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstallMode {
    Start { minutes: u32 },
    Stop,
}

/// A command's name, target and arguments, checked for shape (not yet against the site).
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `unlock`, or `emergency_unlock` when `emergency` is set.
    Unlock {
        target: TargetRef,
        emergency: Option<Emergency>,
    },
    Lock {
        unit: String,
    },
    Locate {
        unit: String,
    },
    Relay {
        device: String,
        channel: u16,
        op: RelayOp,
    },
    InstallMode(InstallMode),
    Resync,
    Ping,
    /// `adopt` (a replacement when `replaces` is set).
    Adopt(Box<AdoptSpec>),
    /// `remove` an adopted device.
    Remove {
        device: String,
    },
}

enum Shape<'a> {
    None,
    Unit(&'a str),
    Entry(&'a str),
    Device(&'a str, u16),
    Other,
}

fn shape(t: &Option<CommandTarget>) -> Shape<'_> {
    let Some(t) = t else { return Shape::None };
    match (&t.unit, &t.entry, &t.device, t.channel) {
        (None, None, None, None) => Shape::None,
        (Some(u), None, None, None) => Shape::Unit(u),
        (None, Some(e), None, None) => Shape::Entry(e),
        (None, None, Some(d), Some(c)) => Shape::Device(d, c),
        _ => Shape::Other,
    }
}

/// The object of `args` (empty for `null`), with only the `allowed` keys.
fn args_object(
    args: &Value,
    allowed: &[&str],
    id: &str,
) -> Result<serde_json::Map<String, Value>, Refusal> {
    let bad = || Refusal::new(Reason::BadArgs, Some(id.to_string()));
    let map = match args {
        Value::Null => serde_json::Map::new(),
        Value::Object(m) => m.clone(),
        _ => return Err(bad().detail("args must be an object")),
    };
    if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad().detail(format!("unknown argument {}", crate::redact::name(k))));
    }
    Ok(map)
}

fn bounded_u32(
    v: Option<&Value>,
    range: &std::ops::RangeInclusive<u32>,
) -> Result<Option<u32>, ()> {
    match v {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| range.contains(n))
            .map(Some)
            .ok_or(()),
    }
}

/// Reads the name, target shape and arguments of an authentic command.
pub fn parse(cmd: &Command) -> Result<Request, Refusal> {
    let id = || Some(cmd.id.clone());
    let refuse = |r: Reason| Refusal::new(r, id());
    let name = CommandName::parse(&cmd.name).ok_or_else(|| refuse(Reason::UnknownCommand))?;
    let target = shape(&cmd.target);
    let bad_target = || {
        refuse(Reason::BadTarget).detail(format!(
            "`{}` takes {}",
            name.as_str(),
            match name {
                CommandName::Unlock | CommandName::EmergencyUnlock => "a unit or an entry",
                CommandName::Lock | CommandName::Locate => "a unit",
                CommandName::Relay => "a device and a channel",
                _ => "no target",
            }
        ))
    };
    let unlock_target = || match target {
        Shape::Unit(u) => Ok(TargetRef::Unit(u.to_string())),
        Shape::Entry(e) => Ok(TargetRef::Entry(e.to_string())),
        _ => Err(bad_target()),
    };
    let unit_target = || match target {
        Shape::Unit(u) => Ok(u.to_string()),
        _ => Err(bad_target()),
    };
    let no_target = || match target {
        Shape::None => Ok(()),
        _ => Err(bad_target()),
    };
    let bad_args = |what: &str| refuse(Reason::BadArgs).detail(what.to_string());
    Ok(match name {
        CommandName::Unlock => {
            let target = unlock_target()?;
            args_object(&cmd.args, &[], &cmd.id)?;
            Request::Unlock {
                target,
                emergency: None,
            }
        }
        CommandName::EmergencyUnlock => {
            let target = unlock_target()?;
            let reason = match &cmd.args {
                Value::Object(m) => m.get("reason").and_then(Value::as_str),
                _ => None,
            };
            let reason = reason.and_then(EmergencyReason::parse).ok_or_else(|| {
                refuse(Reason::BadReason).detail(format!(
                    "args.reason must be one of: {}",
                    EmergencyReason::ALL.map(EmergencyReason::as_str).join(", ")
                ))
            })?;
            let args = args_object(&cmd.args, &["reason", "note"], &cmd.id)?;
            let note = match args.get("note") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s.chars().count() <= MAX_NOTE_LEN => Some(s.clone()),
                Some(_) => {
                    return Err(bad_args(&format!(
                        "note must be a string of at most {MAX_NOTE_LEN} characters"
                    )));
                }
            };
            Request::Unlock {
                target,
                emergency: Some(Emergency { reason, note }),
            }
        }
        CommandName::Lock => {
            let unit = unit_target()?;
            args_object(&cmd.args, &[], &cmd.id)?;
            Request::Lock { unit }
        }
        CommandName::Locate => {
            let unit = unit_target()?;
            args_object(&cmd.args, &[], &cmd.id)?;
            Request::Locate { unit }
        }
        CommandName::Relay => {
            let Shape::Device(device, channel) = target else {
                return Err(bad_target());
            };
            let args = args_object(&cmd.args, &["action", "ms"], &cmd.id)?;
            let ms = bounded_u32(args.get("ms"), &PULSE_MS).map_err(|_| {
                bad_args(&format!(
                    "ms must be an integer from {} to {}",
                    PULSE_MS.start(),
                    PULSE_MS.end()
                ))
            })?;
            let op = match (args.get("action").and_then(Value::as_str), ms) {
                (Some("pulse"), ms) => RelayOp::Pulse {
                    ms: ms.unwrap_or(DEFAULT_PULSE_MS),
                },
                (Some("on"), None) => RelayOp::On,
                (Some("off"), None) => RelayOp::Off,
                (Some("on" | "off"), Some(_)) => return Err(bad_args("ms only goes with pulse")),
                _ => return Err(bad_args("action must be pulse, on or off")),
            };
            Request::Relay {
                device: device.to_string(),
                channel,
                op,
            }
        }
        CommandName::InstallMode => {
            no_target()?;
            let args = args_object(&cmd.args, &["action", "minutes"], &cmd.id)?;
            let minutes = bounded_u32(args.get("minutes"), &INSTALL_MINUTES).map_err(|_| {
                bad_args(&format!(
                    "minutes must be an integer from {} to {}",
                    INSTALL_MINUTES.start(),
                    INSTALL_MINUTES.end()
                ))
            })?;
            match (args.get("action").and_then(Value::as_str), minutes) {
                (Some("start"), Some(minutes)) => {
                    Request::InstallMode(InstallMode::Start { minutes })
                }
                (Some("start"), None) => return Err(bad_args("start needs minutes")),
                (Some("stop"), None) => Request::InstallMode(InstallMode::Stop),
                (Some("stop"), Some(_)) => return Err(bad_args("stop takes no minutes")),
                _ => return Err(bad_args("action must be start or stop")),
            }
        }
        CommandName::Resync => {
            no_target()?;
            args_object(&cmd.args, &[], &cmd.id)?;
            Request::Resync
        }
        CommandName::Ping => {
            no_target()?;
            args_object(&cmd.args, &[], &cmd.id)?;
            Request::Ping
        }
        CommandName::Adopt => {
            no_target()?;
            if !cmd.args.is_object() {
                return Err(bad_args("args must be an object with `candidate`"));
            }
            let spec: AdoptSpec = serde_path_to_error::deserialize(&cmd.args)
                .map_err(|e| bad_args(&crate::redact::serde_with_path(&e)))?;
            if spec.candidate.is_empty() {
                return Err(bad_args("candidate must not be empty"));
            }
            Request::Adopt(Box::new(spec))
        }
        CommandName::Remove => {
            no_target()?;
            let args = args_object(&cmd.args, &["device"], &cmd.id)?;
            match args.get("device").and_then(Value::as_str) {
                Some(d) if !d.is_empty() => Request::Remove {
                    device: d.to_string(),
                },
                _ => return Err(bad_args("device must be a non-empty string")),
            }
        }
    })
}

/// A request resolved against the site: the device to act on, or work for the router itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// For a unit controller (padlock); `device` is the unit's `controller`.
    Unit {
        device: String,
        action: UnitAction,
    },
    /// For a relay output: an entry's relay, or a `relay` command's device.
    Relay {
        device: String,
        channel: u16,
        op: RelayOp,
    },
    InstallMode(InstallMode),
    Resync,
    Ping,
    Adopt(Box<AdoptSpec>),
    Remove {
        device: String,
    },
}

/// Checks a request's unit or entry against the site and finds its device.
pub fn resolve(request: &Request, tables: &Tables, id: &str) -> Result<Plan, Refusal> {
    let refuse = |r: Reason| Refusal::new(r, Some(id.to_string()));
    let unit_device = |unit: &str| {
        let u = tables
            .units
            .get(unit)
            .ok_or_else(|| refuse(Reason::UnknownTarget).detail(format!("no unit `{unit}`")))?;
        u.controller.clone().ok_or_else(|| {
            refuse(Reason::NoController).detail(format!("unit `{unit}` has no controller"))
        })
    };
    Ok(match request {
        Request::Unlock {
            target: TargetRef::Unit(unit),
            ..
        } => Plan::Unit {
            device: unit_device(unit)?,
            action: UnitAction::Unlock,
        },
        Request::Unlock {
            target: TargetRef::Entry(entry),
            ..
        } => {
            let e = tables.entries.get(entry.as_str()).ok_or_else(|| {
                refuse(Reason::UnknownTarget).detail(format!("no entry `{entry}`"))
            })?;
            let relay = e.relay.as_ref().ok_or_else(|| {
                refuse(Reason::NoController).detail(format!("entry `{entry}` has no relay"))
            })?;
            Plan::Relay {
                device: relay.device.clone(),
                channel: relay.channel,
                op: RelayOp::Pulse { ms: relay.pulse_ms },
            }
        }
        Request::Lock { unit } => Plan::Unit {
            device: unit_device(unit)?,
            action: UnitAction::Lock,
        },
        Request::Locate { unit } => Plan::Unit {
            device: unit_device(unit)?,
            action: UnitAction::Locate,
        },
        Request::Relay {
            device,
            channel,
            op,
        } => Plan::Relay {
            device: device.clone(),
            channel: *channel,
            op: *op,
        },
        Request::InstallMode(m) => Plan::InstallMode(*m),
        Request::Resync => Plan::Resync,
        Request::Ping => Plan::Ping,
        Request::Adopt(spec) => Plan::Adopt(spec.clone()),
        Request::Remove { device } => Plan::Remove {
            device: device.clone(),
        },
    })
}
