//! The installer's commands (docs/pairing.md): `gatehouse status`, `install-mode start|stop`,
//! `pair list|adopt|remove` over the daemon's control socket, and `devices export` (over the
//! socket, or from the database when the daemon is not running).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::config::Config;
use crate::pairing::control::{self, ClientError};

#[derive(Args, Clone)]
pub(super) struct SocketArg {
    /// The daemon's control socket (default: `[control] socket` of --config, else
    /// /run/gatehouse/control.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Take the control socket from this config file.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl SocketArg {
    fn path(&self) -> anyhow::Result<PathBuf> {
        Ok(match (&self.socket, &self.config) {
            (Some(s), _) => s.clone(),
            (None, Some(c)) => Config::load(c)?.control_socket,
            (None, None) => PathBuf::from(control::DEFAULT_SOCKET),
        })
    }
}

#[derive(Subcommand)]
pub(super) enum InstallModeCommand {
    /// Start install mode (discovery on every bus and the BLE adapter) for N minutes.
    Start {
        #[arg(long, value_name = "N")]
        minutes: u32,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// End install mode now; candidates not adopted are forgotten.
    Stop {
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Subcommand)]
pub(super) enum PairCommand {
    /// The candidates found so far, the scans' progress and the adopted devices.
    List {
        #[command(flatten)]
        socket: SocketArg,
        /// The daemon's answer as JSON.
        #[arg(long)]
        json: bool,
        /// Refresh every 2 s (a live table) until install mode ends or Ctrl-C.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
    /// Adopt a candidate (its id from `pair list`).
    Adopt(Box<AdoptArgs>),
    /// Remove an adopted device.
    Remove {
        device: String,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Args)]
pub(super) struct AdoptArgs {
    /// The candidate's id (`osdp:<bus>:<addr>`, `modbus:<bus>:<unit>`, `ble:<MAC>`).
    candidate: String,
    /// The device id it gets (default: the candidate id with `-` for `:`).
    #[arg(long)]
    device: Option<String>,
    /// OSDP reader: the entry it opens.
    #[arg(long)]
    entry: Option<String>,
    /// OSDP reader: `in` or `out`.
    #[arg(long, value_parser = ["in", "out"])]
    direction: Option<String>,
    /// BLE lock/controller or sensor: the unit.
    #[arg(long)]
    unit: Option<String>,
    /// BLE sensor: the zone.
    #[arg(long)]
    zone: Option<String>,
    /// Modbus: the profile.
    #[arg(long)]
    profile: Option<String>,
    /// A new OSDP address / Modbus unit id (written, then read back).
    #[arg(long)]
    address: Option<u8>,
    /// A new OSDP baud rate.
    #[arg(long)]
    baud: Option<u32>,
    /// Modbus input wiring, as JSON objects (`{"channel":1,"role":"door_contact"}`); repeat.
    #[arg(long = "input", value_name = "JSON")]
    inputs: Vec<String>,
    /// BTHome bind key of an encrypted sensor, read from this file (never on the command
    /// line: it would show in `ps`).
    #[arg(long, value_name = "FILE")]
    bind_key_file: Option<PathBuf>,
    /// BLE lock: an offline test unlock as part of the adoption.
    #[arg(long)]
    test_unlock: bool,
    /// The adopted or configured device this one replaces (it takes over its entry/unit and
    /// settings; a configured one is no longer run).
    #[arg(long, value_name = "DEVICE")]
    replaces: Option<String>,
    #[command(flatten)]
    socket: SocketArg,
}

#[derive(Subcommand)]
pub(super) enum DevicesCommand {
    /// The adopted devices as TOML tables to paste into the config.
    Export {
        #[command(flatten)]
        socket: SocketArg,
        /// When the daemon is not running: read the registry from this data directory.
        #[arg(long, value_name = "DIR")]
        db: Option<PathBuf>,
    },
}

fn ask(socket: &SocketArg, req: Value) -> anyhow::Result<Value> {
    let path = socket.path()?;
    Ok(control::request(&path, &req)?)
}

/// Prints a refusal (exit 1) or returns the answer.
fn answered(answer: Value) -> Result<Value, ExitCode> {
    if answer["ok"] == true {
        return Ok(answer);
    }
    eprintln!(
        "gatehouse: {} ({}): {}",
        answer["status"].as_str().unwrap_or("failed"),
        answer["reason"].as_str().unwrap_or("?"),
        answer["error"].as_str().unwrap_or("")
    );
    Err(ExitCode::from(1))
}

pub(super) fn status(socket: SocketArg) -> anyhow::Result<ExitCode> {
    let a = match answered(ask(&socket, json!({"op": "status"}))?) {
        Ok(a) => a,
        Err(code) => return Ok(code),
    };
    println!("site:          {}", a["site"].as_str().unwrap_or("?"));
    println!("gateway:       {}", a["gateway"].as_str().unwrap_or("?"));
    println!("gatehouse:     {}", a["gatehouse"].as_str().unwrap_or("?"));
    println!("site version:  {}", a["site_version"]);
    println!("outbox:        {} events", a["outbox"]);
    println!(
        "storage:       {}",
        if a["storage_ok"] == true {
            "ok"
        } else {
            "FAILED"
        }
    );
    print_install_mode(&a["install_mode"]);
    Ok(ExitCode::SUCCESS)
}

fn print_install_mode(state: &Value) {
    if state["active"] == true {
        println!(
            "install mode:  active until {} (started by {})",
            state["until"].as_str().unwrap_or("?"),
            state["started_by"].as_str().unwrap_or("?")
        );
    } else {
        println!("install mode:  off");
    }
    println!("adopted:       {} devices", state["registered"]);
}

pub(super) fn install_mode(cmd: InstallModeCommand) -> anyhow::Result<ExitCode> {
    let (socket, req) = match cmd {
        InstallModeCommand::Start { minutes, socket } => (
            socket,
            json!({"op": "install_mode", "action": "start", "minutes": minutes}),
        ),
        InstallModeCommand::Stop { socket } => {
            (socket, json!({"op": "install_mode", "action": "stop"}))
        }
    };
    let a = match answered(ask(&socket, req)?) {
        Ok(a) => a,
        Err(code) => return Ok(code),
    };
    match a.get("until").and_then(Value::as_str) {
        Some(until) => println!("install mode active until {until}"),
        None if a["was_active"] == true => println!("install mode stopped"),
        None => println!("install mode was not active"),
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn pair(cmd: PairCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PairCommand::List {
            socket,
            json,
            watch,
        } => loop {
            let a = match answered(ask(&socket, json!({"op": "list"}))?) {
                Ok(a) => a,
                Err(code) => return Ok(code),
            };
            if json {
                println!("{a}");
                return Ok(ExitCode::SUCCESS);
            }
            if watch {
                // Clear the terminal, then the table from the top.
                print!("\x1b[2J\x1b[H");
            }
            print_table(&a);
            if !watch || a["state"]["active"] != true {
                return Ok(ExitCode::SUCCESS);
            }
            std::thread::sleep(std::time::Duration::from_secs(2));
        },
        PairCommand::Adopt(args) => {
            let mut inputs = Vec::new();
            for i in &args.inputs {
                let v: Value = serde_json::from_str(i)
                    .with_context(|| "--input must be a JSON object".to_string())?;
                inputs.push(v);
            }
            let bind_key = match &args.bind_key_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("reading `{}`", f.display()))?
                        .trim()
                        .to_string(),
                ),
                None => None,
            };
            let mut spec = json!({"candidate": args.candidate, "inputs": inputs,
                                  "test_unlock": args.test_unlock});
            for (k, v) in [
                ("device", args.device.map(Value::from)),
                ("entry", args.entry.map(Value::from)),
                ("direction", args.direction.map(Value::from)),
                ("unit", args.unit.map(Value::from)),
                ("zone", args.zone.map(Value::from)),
                ("profile", args.profile.map(Value::from)),
                ("address", args.address.map(Value::from)),
                ("baud", args.baud.map(Value::from)),
                ("bind_key", bind_key.map(Value::from)),
                ("replaces", args.replaces.map(Value::from)),
            ] {
                if let Some(v) = v {
                    spec[k] = v;
                }
            }
            let a = match answered(ask(&args.socket, json!({"op": "adopt", "spec": spec}))?) {
                Ok(a) => a,
                Err(code) => return Ok(code),
            };
            println!(
                "adopted `{}` ({})",
                a["device"]["id"].as_str().unwrap_or("?"),
                a["device"]["family"].as_str().unwrap_or("?")
            );
            Ok(ExitCode::SUCCESS)
        }
        PairCommand::Remove { device, socket } => {
            let a = match answered(ask(&socket, json!({"op": "remove", "device": device}))?) {
                Ok(a) => a,
                Err(code) => return Ok(code),
            };
            println!("removed `{}`", a["removed"].as_str().unwrap_or("?"));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `pair list` as a table: install mode, scans, candidates, adopted devices.
fn print_table(a: &Value) {
    print_install_mode(&a["state"]);
    for s in a["state"]["scans"].as_array().into_iter().flatten() {
        println!(
            "scan {:<28} {:>4}/{:<4}",
            s["source"].as_str().unwrap_or("?"),
            s["done"],
            s["total"]
        );
    }
    println!(
        "{:<28} {:<14} {:>5}  IDENTITY",
        "CANDIDATE", "FAMILY", "RSSI"
    );
    for c in a["candidates"].as_array().into_iter().flatten() {
        println!(
            "{:<28} {:<14} {:>5}  {}",
            c["id"].as_str().unwrap_or("?"),
            c["family"].as_str().unwrap_or("?"),
            c["rssi"].as_i64().map_or("-".into(), |r| r.to_string()),
            c["identity"]
        );
    }
    for r in a["registered"].as_array().into_iter().flatten() {
        println!(
            "adopted {:<20} {:<14} from {} by {}",
            r["id"].as_str().unwrap_or("?"),
            r["family"].as_str().unwrap_or("?"),
            r["candidate"].as_str().unwrap_or("?"),
            r["adopted_by"].as_str().unwrap_or("?")
        );
    }
}

pub(super) fn devices(cmd: DevicesCommand) -> anyhow::Result<ExitCode> {
    let DevicesCommand::Export { socket, db } = cmd;
    match ask(&socket, json!({"op": "export"})) {
        Ok(a) => {
            let a = match answered(a) {
                Ok(a) => a,
                Err(code) => return Ok(code),
            };
            print!("{}", a["toml"].as_str().unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let not_running = matches!(
                e.downcast_ref::<ClientError>(),
                Some(ClientError::NotRunning { .. })
            );
            let dir = match (&db, &socket.config) {
                (Some(d), _) => d.clone(),
                (None, Some(c)) => Config::load(c)?.data_dir,
                _ => return Err(e),
            };
            if !not_running {
                return Err(e);
            }
            print!("{}", export_from(&dir)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn export_from(dir: &Path) -> anyhow::Result<String> {
    let store = crate::store::Store::open(dir, 100_000)
        .with_context(|| format!("opening the database in `{}`", dir.display()))?;
    Ok(crate::pairing::registry::export_toml(
        &store.registry_list()?,
    ))
}
