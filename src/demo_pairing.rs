//! The demo's pairing script (`[demo] pairing = true`, docs/pairing.md, *The demo*): at start,
//! an installer (`local:demo`) starts install mode, waits for the demo's unconfigured keypad and
//! relay board (simulated on the demo's OSDP and Modbus PTYs, `rs485::sim_demo`) and, with the
//! simulated BLE radio, an unadopted padlock and BTHome thermometer ([`ble`]) to be discovered,
//! adopts them (the keypad to the entry of the bus's configured reader, the board at a new unit
//! id, the padlock to its unit with a test unlock, the thermometer to a zone with its bind key),
//! ends install mode, types `[demo] pairing_code` on the new keypad and shows the adopted
//! thermometer's first reading.
//!
//! Everything goes through [`Pairing`], the API the control socket and the signed commands use:
//! no check is skipped. Devices already in the registry (a restart on the same data dir) are not
//! adopted again: the script only types the code and shows a reading. A failure is logged and
//! the daemon goes on.

mod ble;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::pairing::{AdoptSpec, Candidate, Pairing, ScanOptions};
use crate::rs485::config::BusKind;
use crate::rs485::sim::{DemoSims, PairSims};
use crate::store::Store;
pub use ble::{LOCK_ID, LOCK_UNIT, SENSOR_ID, SENSOR_ZONE};

/// Who the script acts as, in the events.
pub const BY: &str = "local:demo";
/// Install mode's length (ended by the script once all the devices are adopted).
const INSTALL_MINUTES: u32 = 10;
/// How long the script waits for the candidates, and for the keypad to be online.
const FIND_TIMEOUT: Duration = Duration::from_secs(180);
const ONLINE_TIMEOUT: Duration = Duration::from_secs(60);
const TICK: Duration = Duration::from_millis(200);
/// The ids the adopted devices get.
pub const KEYPAD_ID: &str = "keypad-demo-new";
pub const BOARD_ID: &str = "relay-board-demo-new";

/// What the script adopts, worked out from the config and the simulators.
struct Plan {
    sims: PairSims,
    keypad: AdoptSpec,
    board: AdoptSpec,
    code: Option<String>,
    ble: Option<ble::BlePlan>,
}

/// The demo's simulators the script works with.
pub struct Sims<'a> {
    /// RS-485: the unconfigured keypad and board (when `[demo] pairing`).
    pub rs485: &'a DemoSims,
    /// BLE: the unadopted padlock and thermometer (simulated radio and `[demo] pairing`).
    pub ble: Option<crate::ble::sim::PairSims>,
    pub store: &'a Arc<Store>,
    pub states: &'a Arc<crate::devstate::DeviceStates>,
}

/// Starts the script on a blocking thread of `tracker` when the demo has pairing simulators.
pub fn spawn(
    cfg: &Config,
    pairing: &Arc<Pairing>,
    sims: Sims<'_>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    let Some(p) = sims.rs485.pairing.clone() else {
        return;
    };
    let ble = sims
        .ble
        .map(|b| ble::BlePlan::new(b, sims.store.clone(), sims.states.clone()));
    let plan = match plan(cfg, p, ble) {
        Ok(plan) => plan,
        Err(e) => {
            tracing::error!("demo pairing: not started: {e}");
            return;
        }
    };
    let pairing = pairing.clone();
    tracker.spawn_blocking(move || {
        if let Err(e) = run(&pairing, &plan, &stop) {
            tracing::error!("demo pairing: {e}");
            if pairing.stop(BY) {
                tracing::info!("demo pairing: install mode stopped");
            }
        }
    });
}

fn plan(cfg: &Config, sims: PairSims, ble: Option<ble::BlePlan>) -> Result<Plan, String> {
    let bus = |id: &str| {
        cfg.buses
            .iter()
            .find(|b| b.id == id)
            .ok_or_else(|| format!("bus `{id}` is not in the config"))
    };
    let BusKind::Osdp(readers) = &bus(&sims.osdp_bus)?.kind else {
        return Err(format!("bus `{}` is not an OSDP bus", sims.osdp_bus));
    };
    let entry = readers
        .first()
        .map(|r| r.entry.clone())
        .ok_or_else(|| format!("bus `{}` has no reader", sims.osdp_bus))?;
    let BusKind::Modbus { devices, .. } = &bus(&sims.modbus_bus)?.kind else {
        return Err(format!("bus `{}` is not a Modbus bus", sims.modbus_bus));
    };
    let profile = devices.first().map(|d| d.profile.id.clone());
    let new_unit = (2..=247u8)
        .find(|u| *u != sims.modbus_unit && devices.iter().all(|d| d.address != *u))
        .ok_or("no free unit id")?;
    Ok(Plan {
        keypad: AdoptSpec {
            candidate: Candidate::osdp_id(&sims.osdp_bus, sims.osdp_address),
            device: Some(KEYPAD_ID.into()),
            entry: Some(entry),
            direction: Some("in".into()),
            ..AdoptSpec::default()
        },
        board: AdoptSpec {
            candidate: Candidate::modbus_id(&sims.modbus_bus, sims.modbus_unit),
            device: Some(BOARD_ID.into()),
            profile,
            address: Some(new_unit),
            ..AdoptSpec::default()
        },
        code: cfg.demo_pairing_code.clone(),
        sims,
        ble,
    })
}

/// Waits until `done` or the deadline or the stop; false when not done.
fn wait(stop: &CancellationToken, timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if stop.is_cancelled() || Instant::now() >= end {
            return false;
        }
        std::thread::sleep(TICK);
    }
}

fn run(pairing: &Pairing, plan: &Plan, stop: &CancellationToken) -> Result<(), String> {
    let registered: Vec<String> = pairing
        .registered()
        .into_iter()
        .map(|r| r.candidate)
        .collect();
    let adopted = |s: &AdoptSpec| registered.contains(&s.candidate);
    let mut todo: Vec<&AdoptSpec> = Vec::new();
    if adopted(&plan.keypad) && adopted(&plan.board) {
        tracing::info!(
            keypad = %plan.keypad.candidate,
            board = %plan.board.candidate,
            "demo pairing: the keypad and the board are already adopted (registry): not adopting again"
        );
    }
    todo.extend(
        [&plan.keypad, &plan.board]
            .into_iter()
            .filter(|s| !adopted(s)),
    );
    if let Some(b) = &plan.ble {
        b.check(adopted(&b.lock))?;
        if adopted(&b.lock) && adopted(&b.sensor) {
            tracing::info!(
                padlock = %b.lock.candidate,
                sensor = %b.sensor.candidate,
                "demo pairing: the padlock and the sensor are already adopted (registry): not adopting again"
            );
        }
        todo.extend([&b.lock, &b.sensor].into_iter().filter(|s| !adopted(s)));
    }
    if !todo.is_empty() {
        adopt_all(pairing, plan, &todo, stop)?;
    }
    type_code(plan, stop)?;
    if let Some(b) = &plan.ble {
        b.show_reading(stop)?;
    }
    Ok(())
}

/// Types `[demo] pairing_code` and `#` on the adopted keypad once it is online.
fn type_code(plan: &Plan, stop: &CancellationToken) -> Result<(), String> {
    let Some(code) = &plan.code else {
        return Ok(());
    };
    let (k, address) = (&plan.sims.keypad, plan.sims.osdp_address);
    if !wait(stop, ONLINE_TIMEOUT, || k.online_at(address)) {
        return Err(format!(
            "the adopted keypad did not come online within {} s",
            ONLINE_TIMEOUT.as_secs()
        ));
    }
    // Past the new secure channel's set-up after a restart.
    std::thread::sleep(Duration::from_secs(2));
    tracing::info!(keypad = KEYPAD_ID, keys = %"*".repeat(code.len()), "demo pairing: typing a code on the adopted keypad");
    k.keys_at(address, &format!("{code}#"))
        .map(|_| ())
        .ok_or_else(|| "the simulated keypad did not take the keys".into())
}

fn adopt_all(
    pairing: &Pairing,
    plan: &Plan,
    todo: &[&AdoptSpec],
    stop: &CancellationToken,
) -> Result<(), String> {
    pairing
        .start(INSTALL_MINUTES, BY, ScanOptions::default())
        .map_err(|e| format!("install mode not started: {e}"))?;
    let mut seen: Vec<String> = Vec::new();
    let found = wait(stop, FIND_TIMEOUT, || {
        let now: Vec<String> = pairing.candidates().into_iter().map(|c| c.id).collect();
        for id in &now {
            if !seen.contains(id) {
                tracing::info!(candidate = %id, "demo pairing: device discovered");
                seen.push(id.clone());
            }
        }
        todo.iter().all(|s| now.contains(&s.candidate))
    });
    if !found {
        return Err(format!(
            "the demo's devices were not all discovered within {} s (found: {seen:?})",
            FIND_TIMEOUT.as_secs()
        ));
    }
    for spec in todo {
        let lock = plan
            .ble
            .as_ref()
            .filter(|b| b.lock.candidate == spec.candidate);
        if let Some(b) = lock {
            b.assign_lock()?;
            tracing::info!(candidate = %spec.candidate, unit = LOCK_UNIT, "demo pairing: adopting the padlock with a test unlock");
        }
        // The spec is not logged: a sensor's holds its bind key.
        let r = pairing
            .adopt(spec, BY)
            .map_err(|e| format!("adopting {} failed: {e}", spec.candidate))?;
        tracing::info!(device = %r.id, candidate = %spec.candidate, family = r.family.as_str(), "demo pairing: adopted");
        if let Some(b) = lock {
            b.lock_adopted();
        }
    }
    pairing.stop(BY);
    Ok(())
}
