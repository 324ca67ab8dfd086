//! The demo's simulated RS-485 devices (`[demo] simulate_devices`): one simulated keypad or
//! relay board per `sim:` bus, and with `[demo] pairing` an unconfigured keypad and board on
//! the same PTYs for the pairing script (`crate::demo_pairing`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::sim::{SimBoard, SimKeypad, SimPd, SimUnit};

/// The demo's simulated devices: one per `sim:` bus, and with `[demo] pairing` an unconfigured
/// keypad and board for the pairing script (`crate::demo_pairing`).
#[derive(Default)]
pub struct DemoSims {
    keypads: Vec<(String, Arc<SimKeypad>)>,
    boards: Vec<SimBoard>,
    pub pairing: Option<PairSims>,
}

/// The unconfigured devices of the demo's pairing script: a keypad on the first simulated OSDP
/// bus, at an address no configured reader uses, and a relay board on the first simulated
/// Modbus bus, at a unit id no configured device uses.
#[derive(Clone)]
pub struct PairSims {
    pub osdp_bus: String,
    pub osdp_address: u8,
    /// The line the new keypad is on (type on it with `keys_at(osdp_address, ..)`).
    pub keypad: Arc<SimKeypad>,
    pub modbus_bus: String,
    /// The board's unit id when it was found (before the adoption moves it).
    pub modbus_unit: u8,
}

/// Starts a simulated device for every `sim:` bus of the config (an OSDP bus gets a keypad for
/// its one reader, a Modbus bus a relay board for its one device) and returns the buses with
/// their ports pointed at the simulators' PTYs. With `cfg.demo_pairing`, the first simulated
/// OSDP bus also gets an unconfigured keypad (from address 3 up) and the first simulated Modbus
/// bus an unconfigured board (from unit 9 up); their keys and unit ids are kept in
/// `<data_dir>/sim/`, so that a restart finds them as the adoption left them.
pub fn start_for_demo(
    cfg: &crate::config::Config,
) -> anyhow::Result<(Vec<super::config::BusConfig>, DemoSims)> {
    use super::config::BusKind;
    let mut sims = DemoSims::default();
    let mut buses = cfg.buses.clone();
    let sim_dir = cfg.data_dir.join("sim");
    let (mut new_keypad, mut new_board) = (None, None);
    for bus in buses.iter_mut().filter(|b| b.simulated()) {
        match &bus.kind {
            BusKind::Osdp(readers) => {
                let [r] = readers.as_slice() else {
                    anyhow::bail!(
                        "bus `{}`: a simulated OSDP bus has exactly one reader",
                        bus.id
                    );
                };
                let key = (r.secure != super::config::Secure::None)
                    .then(|| sim_dir.join(format!("{}.key", r.id)));
                let mut line = vec![SimPd {
                    address: r.address,
                    key_file: key,
                }];
                let extra = (cfg.demo_pairing && new_keypad.is_none())
                    .then(|| (3..=126u8).find(|a| *a != r.address))
                    .flatten();
                if let Some(address) = extra {
                    line.push(SimPd {
                        address,
                        key_file: Some(sim_dir.join(format!("{}-pd-{address}.key", bus.id))),
                    });
                }
                let k = Arc::new(SimKeypad::start_line(&line)?);
                tracing::info!(bus = %bus.id, reader = %r.id, pty = %k.path.display(), "simulated keypad started");
                if let Some(address) = extra {
                    tracing::info!(bus = %bus.id, address, "simulated unconfigured keypad started (demo pairing)");
                    new_keypad = Some((bus.id.clone(), address, k.clone()));
                }
                bus.port = k.path.clone();
                sims.keypads.push((r.id.clone(), k));
            }
            BusKind::Modbus { devices, .. } => {
                let [d] = devices.as_slice() else {
                    anyhow::bail!(
                        "bus `{}`: a simulated Modbus bus has exactly one device",
                        bus.id
                    );
                };
                let mut line = vec![SimUnit {
                    address: d.address,
                    unit_file: None,
                }];
                let extra = (cfg.demo_pairing && new_board.is_none())
                    .then(|| (9..=247u8).find(|a| *a != d.address))
                    .flatten();
                if let Some(unit) = extra {
                    line.push(SimUnit {
                        address: unit,
                        unit_file: Some(sim_dir.join(format!("{}-unit-{unit}", bus.id))),
                    });
                }
                let b = SimBoard::start_line(&line)?;
                tracing::info!(bus = %bus.id, device = %d.id, pty = %b.path.display(), "simulated relay board started");
                if let Some(unit) = extra {
                    tracing::info!(bus = %bus.id, unit, "simulated unconfigured relay board started (demo pairing)");
                    new_board = Some((bus.id.clone(), unit));
                }
                bus.port = b.path.clone();
                sims.boards.push(b);
            }
        }
    }
    if cfg.demo_pairing {
        let (Some((osdp_bus, osdp_address, keypad)), Some((modbus_bus, modbus_unit))) =
            (new_keypad, new_board)
        else {
            anyhow::bail!(
                "demo.pairing needs a simulated OSDP bus and a simulated Modbus bus (`sim:` ports)"
            );
        };
        sims.pairing = Some(PairSims {
            osdp_bus,
            osdp_address,
            keypad,
            modbus_bus,
            modbus_unit,
        });
    }
    Ok((buses, sims))
}

impl DemoSims {
    /// The demo's door held open: `channel` of the first simulated board goes active `after`
    /// the start and stays so for `held` (a background thread; nothing when there is no board).
    pub fn hold_door_open(&self, channel: usize, after: Duration, held: Duration) {
        let Some(inputs) = self.boards.first().map(|b| b.inputs.clone()) else {
            return;
        };
        std::thread::spawn(move || {
            let set = |on: bool| {
                if let Some(i) = inputs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(channel)
                {
                    *i = on;
                }
            };
            std::thread::sleep(after);
            tracing::info!(
                channel,
                "demo: the gate's door contact opens and is held open"
            );
            set(true);
            std::thread::sleep(held);
            tracing::info!(channel, "demo: the gate's door contact closes");
            set(false);
        });
    }

    /// Types the demo attempts that name a simulated keypad and a code on that keypad (code and
    /// `#`, 2 s apart, once the keypad is online), in a background thread. Returns the indices
    /// of the attempts it takes.
    pub fn type_demo_codes(&self, attempts: &[crate::config::DemoAttempt]) -> Vec<usize> {
        let mut plan = Vec::new();
        for (i, a) in attempts.iter().enumerate() {
            let (Some(code), Some(kp)) = (&a.code, &a.keypad) else {
                continue;
            };
            if let Some((_, k)) = self.keypads.iter().find(|(id, _)| id == kp) {
                plan.push((i, k.clone(), format!("{code}#")));
            }
        }
        let taken = plan.iter().map(|p| p.0).collect();
        if !plan.is_empty() {
            std::thread::spawn(move || {
                for (_, keypad, keys) in plan {
                    let end = Instant::now() + Duration::from_secs(15);
                    while !keypad.online() && Instant::now() < end {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    // Past the pairing (install mode, KEYSET, new secure channel).
                    std::thread::sleep(Duration::from_secs(2));
                    tracing::info!(keys = %"*".repeat(keys.len() - 1), "demo: typing a code on the simulated keypad");
                    keypad.keys(&keys);
                }
            });
        }
        taken
    }
}
