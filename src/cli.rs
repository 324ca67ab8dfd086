//! The `gatehouse` command line. `main` prints the whole cause chain of an error on one line and
//! exits non-zero; `access check` exits 0 when granted and 1 when denied.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::access::AccessEngine;
use crate::config::Config;
use crate::events::EventKind;
use crate::policy::{Direction, Presented, Request, Target};
use crate::store::{Applied, Store};
use crate::sync::{self, Card};

mod pair;

#[derive(Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "Site gateway for self-storage facilities"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check a configuration file and exit.
    CheckConfig {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// The site database.
    #[command(subcommand)]
    Db(DbCommand),
    /// Access decisions.
    #[command(subcommand)]
    Access(AccessCommand),
    /// Device profiles (embedded, and the files of the profiles directory).
    #[command(subcommand)]
    Profiles(ProfilesCommand),
    /// The running daemon: site, outbox, storage, install mode (over the control socket).
    Status(pair::SocketArg),
    /// Install mode: discovery of new devices, for installers.
    #[command(subcommand)]
    InstallMode(pair::InstallModeCommand),
    /// Candidates found in install mode: list, adopt, remove.
    #[command(subcommand)]
    Pair(pair::PairCommand),
    /// The registry of adopted devices.
    #[command(subcommand)]
    Devices(pair::DevicesCommand),
}

#[derive(Subcommand)]
enum ProfilesCommand {
    /// Every profile: id, protocol, where it comes from, and whether a file replaces it.
    List {
        /// Read the profiles directory this config names (else the default directory).
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check one profile file; exits 0 when it is valid, 1 (with file:line: key) when not.
    Check { file: PathBuf },
}

#[derive(Args)]
struct DbArg {
    /// The data directory (holds `db/` and `code.key`).
    #[arg(long, value_name = "DIR", required_unless_present = "config")]
    db: Option<PathBuf>,
    /// Take the data directory (and keys) from a config file instead.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DbCommand {
    /// Apply a snapshot or delta (JSON, see docs/sync.md) from a file.
    Import {
        #[command(flatten)]
        db: DbArg,
        file: PathBuf,
    },
    /// Write the site as a snapshot (codes as hashes). The file is created mode 0600.
    Export {
        #[command(flatten)]
        db: DbArg,
        /// Output file; standard output when absent.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Counts, version, event log.
    Stats {
        #[command(flatten)]
        db: DbArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AccessCommand {
    /// Decide one attempt against the database (a dry run: nothing is recorded).
    Check(CheckArgs),
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("credential").required(true).args(["code", "fob", "card", "key"])))]
#[command(group(clap::ArgGroup::new("target").required(true).args(["entry", "unit"])))]
struct CheckArgs {
    #[command(flatten)]
    db: DbArg,
    /// Keypad code, without `#`.
    #[arg(long)]
    code: Option<String>,
    /// Fob tracking id.
    #[arg(long)]
    fob: Option<String>,
    /// Card number, or FACILITY:NUMBER.
    #[arg(long)]
    card: Option<String>,
    /// A signed offline digital key (JSON file).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// The cloud's Ed25519 public key for --key (else taken from --config).
    #[arg(long, value_name = "KEY")]
    public_key: Option<String>,
    /// The site id a --key must name (else `site.id` of --config).
    #[arg(long, value_name = "SITE")]
    site: Option<String>,
    #[arg(long)]
    entry: Option<String>,
    #[arg(long)]
    unit: Option<String>,
    /// Leaving rather than entering.
    #[arg(long)]
    exit: bool,
    /// When (RFC 3339, e.g. 2026-11-23T22:10:00-05:00); now when absent.
    #[arg(long)]
    at: Option<String>,
    #[arg(long)]
    json: bool,
}

pub fn main() -> ExitCode {
    // Before anything is created: files 0600, directories 0700 (see `fsperm`).
    crate::fsperm::private_umask();
    let cli = Cli::parse();
    let level = match &cli.command {
        Command::Run { .. } => None,
        _ => Some("warn"),
    };
    if let Some(l) = level {
        init_tracing(l);
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gatehouse: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Logs of the one-shot commands: text on stderr (colour on a terminal only).
pub fn init_tracing(level: &str) {
    let _ = crate::logging::Logging::init(level, crate::logging::LogFormat::Text);
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => {
            let cfg = Config::load(&config)?;
            let logging = crate::logging::Logging::init(&cfg.log_level, cfg.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(crate::daemon::run(cfg, logging))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(socket) => pair::status(socket),
        Command::InstallMode(cmd) => pair::install_mode(cmd),
        Command::Pair(cmd) => pair::pair(cmd),
        Command::Devices(cmd) => pair::devices(cmd),
        Command::Profiles(ProfilesCommand::List { config }) => {
            let set = match config {
                Some(c) => Config::load(&c)?.profiles,
                None => std::sync::Arc::new(crate::profiles::Profiles::load(
                    Path::new(crate::profiles::DEFAULT_DIR),
                    false,
                )?),
            };
            println!(
                "# profiles directory: {}",
                set.dir()
                    .map_or("(none)".to_string(), |d| d.display().to_string())
            );
            let list = set.list();
            let replaced: std::collections::HashSet<&str> = list
                .iter()
                .filter(|l| l.overridden)
                .map(|l| l.id.as_str())
                .collect();
            for l in &list {
                let (source, note) = match &l.source {
                    crate::profiles::Source::Embedded if l.overridden => {
                        ("embedded".to_string(), "overridden")
                    }
                    crate::profiles::Source::Embedded => ("embedded".to_string(), ""),
                    crate::profiles::Source::File(f) if replaced.contains(l.id.as_str()) => {
                        (f.display().to_string(), "overrides embedded")
                    }
                    crate::profiles::Source::File(f) => (f.display().to_string(), ""),
                };
                println!("{}\t{}\t{source}\t{note}", l.id, l.protocol);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Profiles(ProfilesCommand::Check { file }) => {
            match crate::profiles::parse_file(&file) {
                Ok(p) => {
                    println!(
                        "{}: ok ({} profile `{}`)",
                        file.display(),
                        p.protocol(),
                        p.id()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("gatehouse: error: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            let notes =
                crate::preflight::check(&cfg).with_context(|| format!("{}", config.display()))?;
            for n in notes {
                println!("{}: note: {n}", config.display());
            }
            println!(
                "{}: ok (site `{}`, gateway `{}`, data in `{}`)",
                config.display(),
                cfg.site_id,
                cfg.gateway_id,
                cfg.data_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Db(DbCommand::Import { db, file }) => {
            let (store, _) = open_db(&db)?;
            let applied = import_file(&store, &file)?;
            println!(
                "applied {} version {} (was {})",
                applied.kind, applied.version, applied.previous_version
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Db(DbCommand::Export { db, out }) => {
            let (store, _) = open_db(&db)?;
            let snap = store.export();
            let text = serde_json::to_string_pretty(&snap)?;
            match out {
                Some(path) => write_private(&path, text.as_bytes())?,
                None => println!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Db(DbCommand::Stats { db, json }) => {
            let (store, _) = open_db(&db)?;
            let s = store.stats();
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                let c = &s.counts;
                println!(
                    "version:       {}{}",
                    s.version,
                    if s.has_snapshot {
                        ""
                    } else {
                        " (no snapshot yet)"
                    }
                );
                println!(
                    "generation:    {} (+{} deltas)",
                    s.generation, s.deltas_since_snapshot
                );
                println!("zones:         {}", c.zones);
                println!("schedules:     {}", c.schedules);
                println!("entries:       {}", c.entries);
                println!("units:         {}", c.units);
                println!("users:         {}", c.users);
                println!("credentials:   {}", c.credentials);
                println!("shares:        {}", c.shares);
                println!("transfers:     {}", c.transfers);
                println!("blacklist:     {}", c.blacklist);
                println!("devices:       {}", c.devices);
                match (s.first_event_seq, s.last_event_seq) {
                    (Some(a), Some(b)) => println!("events:        {} (seq {a}..={b})", s.events),
                    _ => println!("events:        0"),
                }
                println!("disk:          {} bytes", s.size_on_disk_bytes);
                println!("code key id:   {}", s.code_key_id);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Access(AccessCommand::Check(args)) => access_check(args),
    }
}

/// Opens the database named by `--db` or by a config's data_dir.
fn open_db(arg: &DbArg) -> anyhow::Result<(Store, Option<Config>)> {
    let cfg = match &arg.config {
        Some(p) => Some(Config::load(p)?),
        None => None,
    };
    let dir = match (&arg.db, &cfg) {
        (Some(d), _) => d.clone(),
        (None, Some(c)) => c.data_dir.clone(),
        (None, None) => bail!("give --db DIR or --config FILE"),
    };
    let limits = cfg.as_ref().map_or_else(Default::default, |c| c.log_limits);
    Ok((Store::open_with(&dir, limits)?, cfg))
}

/// Reads, parses and applies a sync file; records the outcome in the event log.
pub fn import_file(store: &Store, path: &Path) -> anyhow::Result<Applied> {
    let bytes = std::fs::read(path).with_context(|| format!("reading `{}`", path.display()))?;
    let msg = match sync::parse_for_apply(&bytes) {
        Ok(m) => m,
        Err(e) => {
            let _ = store.record_flushed(
                EventKind::SyncRefused,
                json!({"reason": e.to_string(), "source": "file"}),
            );
            return Err(anyhow::Error::new(e).context(format!("`{}` not applied", path.display())));
        }
    };
    drop(bytes);
    let version = msg.version();
    match store.apply_incoming(msg) {
        Ok(a) => {
            store.record_flushed(
                EventKind::SyncApplied,
                json!({"kind": a.kind, "version": a.version, "previous_version": a.previous_version, "source": "file"}),
            )?;
            Ok(a)
        }
        Err(e) => {
            let _ = store.record_flushed(
                EventKind::SyncRefused,
                json!({"version": version, "reason": e.to_string(), "source": "file"}),
            );
            Err(anyhow::Error::new(e).context(format!("`{}` not applied", path.display())))
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating `{}`", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn parse_card(s: &str) -> anyhow::Result<Card> {
    let bad = || anyhow::anyhow!("--card `{s}` is not NUMBER or FACILITY:NUMBER");
    Ok(match s.split_once(':') {
        Some((fc, n)) => Card {
            facility_code: Some(fc.parse().map_err(|_| bad())?),
            number: n.parse().map_err(|_| bad())?,
        },
        None => Card {
            facility_code: None,
            number: s.parse().map_err(|_| bad())?,
        },
    })
}

fn access_check(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let (store, cfg) = open_db(&a.db)?;
    let at = match &a.at {
        Some(s) => crate::site::parse_time(s).with_context(|| {
            format!("--at `{s}` is not an RFC 3339 time (e.g. 2026-11-23T22:10:00-05:00)")
        })?,
        None => chrono::Utc::now(),
    };
    let public = match (
        &a.public_key,
        cfg.as_ref().and_then(|c| c.digital_key_public),
    ) {
        (Some(k), _) => Some(
            crate::policy::digital_key::parse_public_key(k)
                .with_context(|| format!("--public-key `{k}` is not an Ed25519 public key"))?,
        ),
        (None, k) => k,
    };
    if a.key.is_some() && public.is_none() {
        bail!("checking a digital key needs the cloud's public key: give --public-key or --config");
    }
    let key_bytes = match &a.key {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("reading `{}`", p.display()))?),
        None => None,
    };
    let card = a.card.as_deref().map(parse_card).transpose()?;
    let credential = if let Some(c) = &a.code {
        Presented::Code(c.trim_end_matches('#'))
    } else if let Some(f) = &a.fob {
        Presented::Fob(f)
    } else if let Some(c) = card {
        Presented::Card(c)
    } else if let Some(k) = &key_bytes {
        Presented::DigitalKey(k)
    } else {
        bail!("give one of --code, --fob, --card, --key");
    };
    let target = match (&a.entry, &a.unit) {
        (Some(e), _) => Target::Entry(e),
        (_, Some(u)) => Target::Unit(u),
        _ => bail!("give --entry or --unit"),
    };
    let req = Request {
        credential,
        target,
        direction: if a.exit {
            Direction::Out
        } else {
            Direction::In
        },
    };
    let site = a
        .site
        .clone()
        .or_else(|| cfg.as_ref().map(|c| c.site_id.clone()));
    let keys = match (public, site) {
        (Some(k), Some(site)) => Some(crate::policy::digital_key::KeyVerifier::new(k, &site)),
        (Some(_), None) if a.key.is_some() => {
            bail!("checking a digital key needs the site id it must name: give --site or --config")
        }
        _ => None,
    };
    let store = std::sync::Arc::new(store);
    let engine = AccessEngine::new(store.clone(), keys);
    let d = engine.evaluate(&req, at);
    if a.json {
        println!("{}", serde_json::to_string(&d)?);
    } else {
        let tz = store.site().tables.facility.tz;
        println!(
            "{} ({}){}{} at {}",
            if d.granted { "GRANTED" } else { "DENIED" },
            d.reason,
            d.user
                .as_ref()
                .map(|u| format!(" user {u}"))
                .unwrap_or_default(),
            if d.units.is_empty() {
                String::new()
            } else {
                format!(" units {}", d.units.join(","))
            },
            at.with_timezone(&tz).to_rfc3339()
        );
    }
    Ok(if d.granted {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
