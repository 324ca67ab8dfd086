//! Simulated devices: [`Simulated`] units and relays (switchable online, asleep or failing,
//! recording what they executed) for tests and the demo, [`NoDevices`] (a gateway without
//! devices of that kind), and [`Either`] (two device sets behind one trait object).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use super::{Execution, Online, RelayOp, Relays, UnitAction, UnitControllers};

/// Per-device switches of a simulator.
#[derive(Debug, Default)]
struct Switches {
    state: HashMap<String, Online>,
    failing: HashMap<String, String>,
}

impl Switches {
    fn new<I, S>(devices: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Switches {
            state: devices
                .into_iter()
                .map(|d| (d.into(), Online::Yes))
                .collect(),
            failing: HashMap::new(),
        }
    }

    fn online(&self, device: &str) -> Online {
        self.state.get(device).copied().unwrap_or(Online::Unknown)
    }

    /// `None` when the device would execute now.
    fn refuse(&self, device: &str) -> Option<Execution> {
        match self.online(device) {
            Online::Yes => self
                .failing
                .get(device)
                .map(|m| Execution::Failed(m.clone())),
            Online::Asleep => Some(Execution::Queued),
            Online::No => Some(Execution::Failed(format!("`{device}` is offline"))),
            Online::Unknown => Some(Execution::Failed(format!("no device `{device}`"))),
        }
    }
}

/// **Simulator** of devices, for tests and the demo: no hardware. It knows a fixed set of devices
/// (others are [`Online::Unknown`]), each online until switched, and records what it executed
/// (`A`: one executed action).
#[derive(Debug)]
pub struct Simulated<A> {
    switches: Mutex<Switches>,
    executed: Mutex<Vec<A>>,
}

/// Simulated unit controllers and padlocks; records `(device, action)`.
pub type SimulatedUnits = Simulated<(String, UnitAction)>;
/// Simulated relay devices; records `(device, channel, op)`.
pub type SimulatedRelays = Simulated<(String, u16, RelayOp)>;

impl<A: Clone> Simulated<A> {
    pub fn new<I, S>(devices: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Simulated {
            switches: Mutex::new(Switches::new(devices)),
            executed: Mutex::new(Vec::new()),
        }
    }

    /// Switches a device online, offline or asleep (or makes it unknown).
    pub fn set_online(&self, device: &str, state: Online) {
        let mut s = self.switches.lock().unwrap_or_else(|e| e.into_inner());
        s.state.insert(device.to_string(), state);
    }

    /// Makes a device fail every command with `message` (or work again with `None`).
    pub fn set_failure(&self, device: &str, message: Option<&str>) {
        let mut s = self.switches.lock().unwrap_or_else(|e| e.into_inner());
        match message {
            Some(m) => s.failing.insert(device.to_string(), m.to_string()),
            None => s.failing.remove(device),
        };
    }

    /// What was executed, in order.
    pub fn executed(&self) -> Vec<A> {
        self.executed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl UnitControllers for SimulatedUnits {
    fn online(&self, device: &str) -> Online {
        self.switches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .online(device)
    }

    fn execute(&self, device: &str, action: UnitAction) -> Execution {
        let refused = self
            .switches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refuse(device);
        if let Some(r) = refused {
            return r;
        }
        self.executed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((device.to_string(), action));
        Execution::Done(
            match action {
                UnitAction::Unlock => "unlocked",
                UnitAction::Lock => "locked",
                UnitAction::Locate => "beeping",
            }
            .into(),
        )
    }
}

impl Relays for SimulatedRelays {
    fn online(&self, device: &str) -> Online {
        self.switches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .online(device)
    }

    fn execute(&self, device: &str, channel: u16, op: RelayOp) -> Execution {
        let refused = self
            .switches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refuse(device);
        if let Some(r) = refused {
            return r;
        }
        self.executed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((device.to_string(), channel, op));
        Execution::Done(match op {
            RelayOp::Pulse { ms } => format!("channel {channel} pulsed for {ms} ms"),
            RelayOp::On => format!("channel {channel} on"),
            RelayOp::Off => format!("channel {channel} off"),
        })
    }
}

/// The targets of a gateway with no device drivers running: every device is offline, so a
/// command to it is refused `target_offline` (the honest answer: nothing can reach it).
pub struct NoDevices;

impl UnitControllers for NoDevices {
    fn online(&self, _device: &str) -> Online {
        Online::No
    }
    fn execute(&self, device: &str, _action: UnitAction) -> Execution {
        Execution::Failed(format!("no driver for `{device}`"))
    }
}

impl Relays for NoDevices {
    fn online(&self, _device: &str) -> Online {
        Online::No
    }
    fn execute(&self, device: &str, _channel: u16, _op: RelayOp) -> Execution {
        Execution::Failed(format!("no driver for `{device}`"))
    }
}

/// Two sets of devices as one: the first that knows a device (anything but
/// [`Online::Unknown`]) handles it. E.g. the RS-485 buses first, then simulated or absent ones.
pub struct Either<A: ?Sized, B: ?Sized>(pub Arc<A>, pub Arc<B>);

impl<A: Relays + ?Sized, B: Relays + ?Sized> Relays for Either<A, B> {
    fn online(&self, device: &str) -> Online {
        match self.0.online(device) {
            Online::Unknown => self.1.online(device),
            o => o,
        }
    }
    fn execute(&self, device: &str, channel: u16, op: RelayOp) -> Execution {
        match self.0.online(device) {
            Online::Unknown => self.1.execute(device, channel, op),
            _ => self.0.execute(device, channel, op),
        }
    }
}

impl<A: UnitControllers + ?Sized, B: UnitControllers + ?Sized> UnitControllers for Either<A, B> {
    fn online(&self, device: &str) -> Online {
        match self.0.online(device) {
            Online::Unknown => self.1.online(device),
            o => o,
        }
    }
    fn execute(&self, device: &str, action: UnitAction) -> Execution {
        match self.0.online(device) {
            Online::Unknown => self.1.execute(device, action),
            _ => self.0.execute(device, action),
        }
    }
    fn execute_timed(
        &self,
        device: &str,
        action: UnitAction,
    ) -> (Execution, Option<DateTime<Utc>>) {
        match self.0.online(device) {
            Online::Unknown => self.1.execute_timed(device, action),
            _ => self.0.execute_timed(device, action),
        }
    }
}
