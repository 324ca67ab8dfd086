//! `gatehouse run`: opens the site database, imports the initial snapshot when the database has
//! none, and runs until SIGTERM or SIGINT. Shutdown is a value: one `CancellationToken` goes to
//! every task, a `TaskTracker` waits for them within the configured deadline, and the store is
//! flushed last.

use std::sync::Arc;

use anyhow::Context as _;
use chrono::Utc;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::{AccessEngine, Attempt};
use crate::config::Config;
use crate::events::EventKind;
use crate::policy::{Direction, Presented, Request, Target};
use crate::store::Store;

/// Opens the store and brings it to a usable state (initial snapshot when empty).
pub fn open_store(cfg: &Config) -> anyhow::Result<Arc<Store>> {
    let store = Store::open_with(&cfg.data_dir, cfg.log_limits)?;
    if !store.has_snapshot() {
        match &cfg.initial_snapshot {
            Some(path) => {
                let applied = crate::cli::import_file(&store, path)?;
                tracing::info!(
                    file = %path.display(),
                    version = applied.version,
                    "imported the initial snapshot"
                );
            }
            None => tracing::warn!(
                "the site database has no snapshot yet: every access is refused until the cloud \
                 sends one (or set access.initial_snapshot)"
            ),
        }
    }
    Ok(Arc::new(store))
}

pub async fn run(cfg: Config, logging: Option<crate::logging::Logging>) -> anyhow::Result<()> {
    crate::preflight::check(&cfg)?;
    let mut signals = Signals::install()?;
    let notifier = crate::supervise::Notifier::from_env();
    let store = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || open_store(&cfg)).await??
    };
    // Installer pairing: the registry of adopted devices merged with the config (a conflict
    // stops the start here, naming both places, before anything runs). The drivers, started
    // below, register their provisioners (`Pairing::register`).
    let pairing = crate::pairing::Pairing::open(
        store.clone(),
        crate::pairing::registry::configured(&cfg),
        Vec::new(),
    )?;
    let stats = store.stats();
    tracing::info!(
        site = %cfg.site_id,
        gateway = %cfg.gateway_id,
        data_dir = %cfg.data_dir.display(),
        version = stats.version,
        units = stats.counts.units,
        users = stats.counts.users,
        credentials = stats.counts.credentials,
        entries = stats.counts.entries,
        events = stats.events,
        "site database open"
    );
    let seq = store.record_flushed(
        EventKind::GatewayStarted,
        json!({"gatehouse": env!("CARGO_PKG_VERSION"), "site_version": stats.version}),
    )?;
    tracing::info!(seq, "recorded gateway_started");

    let keys = cfg
        .digital_key_public
        .map(|k| crate::policy::digital_key::KeyVerifier::new(k, &cfg.site_id));
    let engine = Arc::new(AccessEngine::new(store.clone(), keys));
    // Drivers hand facts to automation through the engine (bounded; full: dropped, counted).
    let (facts, facts_rx) = crate::automation::facts::FactSink::bounded(
        crate::automation::facts::FACT_QUEUE,
        engine.metrics().facts_dropped(),
    );
    // Sensors placed by an installer (adopted, `[[ble.device]]`): set by the BLE manager.
    let placed = facts.placements().clone();
    engine.set_facts(facts);
    // Simulated RS-485 devices (demo): started before the buses, which then open their PTYs.
    let (buses, sims) = crate::rs485::sim::start_for_demo(&cfg)?;
    // Always there (maybe with no bus): a reload can add buses. The adopted devices run from
    // the start (registering the provisioner below then restarts no bus).
    let rs485 = Arc::new(crate::rs485::provision::start(
        &buses,
        &pairing.registered(),
        &cfg.profiles,
        engine.clone(),
    )?);
    let typed = sims.type_demo_codes(&cfg.demo_attempts);
    sims.hold_door_open(
        0,
        std::time::Duration::from_secs(20),
        std::time::Duration::from_secs(15),
    );
    let direct: Vec<_> = cfg
        .demo_attempts
        .iter()
        .enumerate()
        .filter(|(i, _)| !typed.contains(i))
        .map(|(_, a)| a.clone())
        .collect();
    run_demo_attempts(&engine, &direct);

    let shutdown = CancellationToken::new();
    // The cloud link stops last: it publishes what the others recorded (see the stop below).
    let link_stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    // The metrics endpoint: a port in use is logged, and the daemon goes on deciding access.
    let endpoint = crate::metrics::Endpoint::start(
        cfg.metrics.as_ref(),
        engine.metrics().clone(),
        store.clone(),
        shutdown.child_token(),
    );
    // Each task gets a child token and is tracked.
    let states = Arc::new(crate::devstate::DeviceStates::new());
    let rpc = Arc::new(crate::ble::rpc::CloudRpc::new());
    let ble = start_ble(&cfg, &engine, &states, &rpc, &shutdown, &tracker).await;
    let (units, relays) = devices(
        &cfg,
        &store,
        Some(rs485.relays()),
        ble.as_ref().map(|b| b.control.clone()),
    );
    let (wakes_tx, wakes_rx) = tokio::sync::mpsc::channel(crate::ble::WAKE_QUEUE);
    if let Some(b) = &ble {
        b.control.set_relays(relays.clone());
        b.control.set_wakes(wakes_tx);
    }
    let alerts = crate::automation::runner::AlertBoard::new();
    let automation = crate::automation::runner::start(
        store.clone(),
        relays.clone(),
        facts_rx,
        placed,
        alerts.clone(),
        engine.metrics().automation(),
        shutdown.child_token(),
    )?;
    let bridge =
        match rpc.take_requests() {
            Some(requests) if ble.is_some() => Some(Arc::new(
                crate::cloud::link::DeviceBridge::new(rpc.clone(), requests, wakes_rx),
            )),
            _ => None,
        };
    let link = Arc::new(crate::cloud::supervisor::LinkSupervisor::new(
        crate::cloud::supervisor::LinkParts {
            site: cfg.site_id.clone(),
            gateway: cfg.gateway_id.clone(),
            store: store.clone(),
            states: states.clone(),
            units,
            relays,
            devices: bridge,
            metrics: engine.metrics().clone(),
            drain: cfg.drain_timeout,
            pairing: Some(pairing.clone()),
            alerts: Some(alerts),
        },
        link_stop.clone(),
        tracker.clone(),
    ));
    link.start(cfg.cloud.as_ref()).await?;
    let reloader = crate::reload::Reloader::new(
        cfg.clone(),
        store.clone(),
        logging,
        rs485.clone(),
        link.clone(),
    );
    reloader.add_part(endpoint);
    if let Some(b) = &ble {
        reloader.add_part(Arc::new(crate::ble::manager::LivePart(b.control.clone())));
    }
    // Install mode's timer and recorder; the drivers scan through `pairing` (`Arc<dyn Scan>`)
    // and adopt through their provisioners, which take the registered devices at once (those
    // already running are left alone).
    tracker.spawn(pairing.clone().run(shutdown.child_token()));
    reloader.add_part(Arc::new(crate::pairing::ReloadCheck(pairing.clone())));
    if let Some(b) = &ble {
        b.control.set_scan(pairing.clone());
        if let Err(e) = pairing.register(b.control.clone()) {
            tracing::error!("adopted BLE devices not started: {e}");
        }
    }
    rs485.set_pairing(pairing.clone(), cfg.profiles.clone());
    let rs485_provisioner =
        crate::rs485::provision::Rs485Provisioner::new(rs485.clone(), cfg.profiles.clone());
    if let Err(e) = pairing.register(Arc::new(rs485_provisioner)) {
        tracing::error!("adopted RS-485 devices not started: {e}");
    }
    start_control(&cfg, &pairing, &store, &shutdown, &tracker);
    crate::demo_pairing::spawn(
        &cfg,
        &pairing,
        crate::demo_pairing::Sims {
            rs485: &sims,
            ble: ble.as_ref().and_then(|b| b.pair_sims.clone()),
            store: &store,
            states: &states,
        },
        &tracker,
        shutdown.child_token(),
    );
    // Events appended without a flush become visible (to the cloud link) within a second, and a
    // trim that appends left unfinished goes on: on a blocking thread, never the async workers.
    {
        let (store, stop) = (store.clone(), shutdown.child_token());
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let events_due = store.events().has_pending() || store.events().over_bounds();
                if events_due {
                    let store = store.clone();
                    let done = tokio::task::spawn_blocking(move || {
                        let now = Utc::now();
                        let local = now
                            .with_timezone(&store.site().tables.facility.tz)
                            .to_rfc3339();
                        store.events().trim_pending(now, &local)?;
                        store.events().flush_pending()
                    });
                    if let Ok(Err(e)) = done.await {
                        tracing::warn!("trimming or flushing the event log: {e:#}");
                    }
                }
            }
        });
    }
    // Housekeeping, whether or not a cloud link runs: the event log's age bound (in lived time).
    {
        let (store, stop) = (store.clone(), shutdown.child_token());
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let store = store.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let now = Utc::now();
                    let local = now
                        .with_timezone(&store.site().tables.facility.tz)
                        .to_rfc3339();
                    if let Err(e) = store.events().trim(store.lived().now_ms(), now, &local) {
                        tracing::warn!("trimming the event log: {e:#}");
                    }
                    if let Err(e) = store.lived().persist() {
                        tracing::warn!("saving the lived time: {e:#}");
                    }
                })
                .await;
            }
        });
    }
    // Supervision (systemd): ready now that the store is open, the buses and BLE started and
    // the cloud link task runs; then status and watchdog pings while healthy.
    {
        let mut devices: Vec<Box<dyn Fn() -> (usize, usize) + Send + Sync>> = Vec::new();
        {
            let s = rs485.shared().clone();
            devices.push(Box::new(move || s.online_counts()));
        }
        let s = states.clone();
        devices.push(Box::new(move || s.online_counts()));
        let sources = crate::supervise::Sources {
            store: store.clone(),
            link: {
                let link = link.clone();
                Box::new(move || link.state())
            },
            devices,
        };
        notifier.ready(&crate::supervise::status_line(&sources, None));
        tracker.spawn(crate::supervise::run(
            notifier.clone(),
            sources,
            shutdown.child_token(),
        ));
    }
    tracker.close();
    tracing::info!("running; waiting for SIGTERM or SIGINT (SIGHUP: reload the configuration)");
    while signals.wait().await == Signal::Reload {
        notifier.reloading();
        reloader.reload().await;
        notifier.reloaded();
    }
    tracing::info!("shutting down");
    notifier.stopping();
    // A clean stop drains: stop producing (BLE, buses, housekeeping), flush what the drivers
    // recorded, record gateway_stopped, then let the cloud link publish everything held and wait
    // for the broker's acknowledgements (up to the drain timeout) before its offline status.
    shutdown.cancel();
    {
        let deadline = cfg.drain_timeout;
        let _ = tokio::task::spawn_blocking(move || rs485.stop(deadline)).await;
    }
    if let Some(b) = ble {
        let _ = tokio::task::spawn_blocking(b.join).await;
    }
    let _ = tokio::task::spawn_blocking(move || automation.join()).await;
    drop(sims);
    {
        let (store, pairing) = (store.clone(), pairing.clone());
        tokio::task::spawn_blocking(move || {
            pairing.end(crate::pairing::EndReason::Shutdown, None);
            store.drain_recorded();
            store.record_flushed(EventKind::GatewayStopped, json!({}))
        })
        .await??;
    }
    link_stop.cancel();
    // The link's drain, then its goodbye (offline status, disconnect: at most 2 s more).
    if tokio::time::timeout(
        cfg.drain_timeout + std::time::Duration::from_secs(3),
        tracker.wait(),
    )
    .await
    .is_err()
    {
        tracing::warn!(
            timeout_s = cfg.drain_timeout.as_secs(),
            "tasks did not stop in time; flushing anyway"
        );
    }
    store.drain_recorded();
    store.flush().context("final flush")?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// The local control socket (`[control] socket`): a socket that cannot be bound is logged and
/// the daemon goes on without it (the cloud and the devices do not depend on it).
fn start_control(
    cfg: &Config,
    pairing: &Arc<crate::pairing::Pairing>,
    store: &Arc<Store>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) {
    use crate::pairing::control;
    let path = cfg.control_socket.clone();
    match control::bind(&path) {
        Ok(listener) => {
            tracing::info!(socket = %path.display(), "control socket open");
            let c = Arc::new(control::Control {
                pairing: pairing.clone(),
                store: store.clone(),
                site: cfg.site_id.clone(),
                gateway: cfg.gateway_id.clone(),
            });
            tracker.spawn(control::serve(listener, path, c, shutdown.child_token()));
        }
        Err(e) => tracing::warn!("no local control (gatehouse status, install-mode, pair): {e:#}"),
    }
}

/// The BLE module, running: its controls for the router and the daemon, and how to wait for
/// it at shutdown.
struct BleRunning {
    control: Arc<dyn crate::ble::manager::Control>,
    join: Box<dyn FnOnce() + Send>,
    /// The demo's unadopted BLE devices (simulated radio, `[demo] pairing`).
    pair_sims: Option<crate::ble::sim::PairSims>,
}

impl BleRunning {
    fn start<R: crate::ble::transport::Radio>(
        m: Arc<crate::ble::Manager<R>>,
        shutdown: &CancellationToken,
    ) -> BleRunning {
        let ble = crate::ble::Ble::start(m.clone(), shutdown.child_token());
        BleRunning {
            control: m,
            join: Box::new(move || ble.join()),
            pair_sims: None,
        }
    }
}

/// Starts the BLE module when `[ble]` is configured: BlueZ's adapter, or the demo's simulated
/// devices.
async fn start_ble(
    cfg: &Config,
    engine: &Arc<AccessEngine>,
    states: &Arc<crate::devstate::DeviceStates>,
    rpc: &Arc<crate::ble::rpc::CloudRpc>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Option<BleRunning> {
    use crate::ble::{Manager, config::Adapter};
    let ble_cfg = cfg.ble.clone()?;
    match ble_cfg.adapter.clone() {
        Adapter::Simulated => {
            let radio = crate::ble::sim::demo_radio(&engine.store().site().tables);
            // Installer pairing in the demo: an unadopted padlock and sensor too.
            let pair = cfg
                .demo_pairing
                .then(|| crate::ble::sim::PairSims::add(&radio));
            let m = Manager::new(radio, ble_cfg, engine.clone(), states.clone(), rpc.clone());
            tracker.spawn(crate::ble::sim::demo_script(
                m.clone(),
                pair.clone(),
                shutdown.child_token(),
            ));
            tracing::info!("BLE: simulated padlocks, sensors and fobs (demo)");
            let mut running = BleRunning::start(m, shutdown);
            running.pair_sims = pair;
            Some(running)
        }
        adapter => {
            let name = match &adapter {
                Adapter::Named(n) => Some(n.as_str()),
                _ => None,
            };
            match crate::ble::bluez::Bluez::open(name).await {
                Ok(radio) => {
                    tracing::info!(adapter = radio.adapter_name(), "BLE adapter open");
                    let m =
                        Manager::new(radio, ble_cfg, engine.clone(), states.clone(), rpc.clone());
                    Some(BleRunning::start(m, shutdown))
                }
                Err(e) => {
                    tracing::error!(
                        "BLE adapter unavailable ({e}): padlocks, fobs and BLE sensors are not \
                         served until the daemon is restarted with the adapter present"
                    );
                    let _ = engine.store().record_flushed(
                        EventKind::DeviceError,
                        json!({"device": "ble-adapter", "error": e.to_string()}),
                    );
                    None
                }
            }
        }
    }
}

/// Who carries out commands: BLE padlocks and controllers, relays on the RS-485 buses;
/// simulated devices for what the demo site names and nothing else has; otherwise none.
fn devices(
    cfg: &Config,
    store: &Store,
    bus_relays: Option<Arc<dyn crate::cloud::commands::Relays>>,
    ble: Option<Arc<dyn crate::ble::manager::Control>>,
) -> (
    Arc<dyn crate::cloud::commands::UnitControllers>,
    Arc<dyn crate::cloud::commands::Relays>,
) {
    use crate::cloud::commands::{
        Either, NoDevices, Relays, SimulatedRelays, SimulatedUnits, UnitControllers,
    };
    let (units, relays): (Arc<dyn UnitControllers>, Arc<dyn Relays>) = if cfg.simulate_devices {
        let site = store.site();
        let t = &site.tables;
        let controllers: Vec<String> = t
            .units
            .values()
            .filter_map(|u| u.controller.clone())
            .filter(|c| ble.is_none() || !t.devices.contains_key(c))
            .collect();
        let relay_devices: Vec<String> = t
            .entries
            .values()
            .filter_map(|e| e.relay.as_ref().map(|r| r.device.clone()))
            .collect();
        tracing::info!(
            controllers = controllers.len(),
            relays = relay_devices.len(),
            "commands for devices nothing else drives reach simulated ones (demo.simulate_devices)"
        );
        (
            Arc::new(SimulatedUnits::new(controllers)),
            Arc::new(SimulatedRelays::new(relay_devices)),
        )
    } else {
        (Arc::new(NoDevices), Arc::new(NoDevices))
    };
    let relays: Arc<dyn Relays> = match bus_relays {
        Some(bus) => Arc::new(Either(bus, relays)),
        None => relays,
    };
    let units: Arc<dyn UnitControllers> = match ble {
        Some(b) => {
            let b: Arc<dyn UnitControllers> = b;
            Arc::new(Either(b, units))
        }
        None => units,
    };
    (units, relays)
}

fn run_demo_attempts(engine: &AccessEngine, attempts: &[crate::config::DemoAttempt]) {
    for a in attempts {
        let credential = match (&a.code, &a.fob) {
            (Some(c), _) => Presented::Code(c),
            (_, Some(f)) => Presented::Fob(f),
            _ => continue,
        };
        let target = match (&a.entry, &a.unit) {
            (Some(e), _) => Target::Entry(e),
            (_, Some(u)) => Target::Unit(u),
            _ => continue,
        };
        let attempt = Attempt {
            request: Request {
                credential,
                target,
                direction: if a.exit {
                    Direction::Out
                } else {
                    Direction::In
                },
            },
            device: a.keypad.as_deref(),
        };
        match engine.check(&attempt, Utc::now()) {
            Ok(d) => tracing::info!(
                credential = credential.kind(),
                target = ?target,
                granted = d.granted,
                reason = %d.reason,
                user = d.user.as_deref().unwrap_or("-"),
                "demo attempt decided and recorded"
            ),
            Err(e) => tracing::error!("demo attempt failed: {e:#}"),
        }
    }
}

/// What a signal asks for.
#[derive(Debug, PartialEq, Eq)]
enum Signal {
    Stop,
    Reload,
}

/// SIGTERM and SIGINT (stop), SIGHUP (reload), caught from the moment this is made (a signal
/// that arrives before the daemon waits for it is kept, not lost to the default action).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    async fn wait(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => { tracing::info!("SIGTERM received"); Signal::Stop }
            _ = self.int.recv() => { tracing::info!("SIGINT received"); Signal::Stop }
            _ = self.hup.recv() => { tracing::info!("SIGHUP received"); Signal::Reload }
        }
    }
}
