//! Install mode on an OSDP bus: probes of the addresses no configured reader uses, and the
//! provisioner's ID/COMSET exchanges, as raw OSDP frames on the port between LibOSDP's
//! transactions (docs/rs485.md, *Pairing*).
//!
//! A probe goes out only in a gap: the last byte on the port was a reply LibOSDP read (not a
//! command still waiting for its answer), the line has been quiet a few byte times with nothing
//! left to read, LibOSDP has had a turn since the previous probe, and the probe's command plus
//! the reply window ends before LibOSDP's next poll is due. So a scan never delays a configured
//! reader by more than one transaction slot, and usually not at all. When LibOSDP has been quiet
//! for [`LONG_QUIET`] (every reader offline), probes go out at each turn of the bus loop.
//!
//! A probe is an ID command (sequence 0: a PD takes it as a fresh start); an answering PD is
//! asked for its capabilities (CAP) at the next gap and reported as a candidate. With
//! `all_bauds`, the port is switched to each other standard rate for the length of one exchange
//! and back (a PTY ignores the rate; the test peer reads it and answers only at its own).

use std::io::{Read as _, Write as _};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::Value;
use serialport::SerialPort as _;

use super::super::Shared;
use super::super::config::BusConfig;
use super::super::pairing::{self as p, Answer, Op, OpReq, Parsed, Reply, code};
use super::POLL_DUE;
use crate::pairing::{Candidate, Family, Scan, ScanOptions};

/// After a probe's command has gone out, how long a PD has to start its reply (the spec allows
/// 200 ms; readers answer within a few ms, and a probe must fit between LibOSDP's polls).
const TURNAROUND: Duration = Duration::from_millis(25);
/// LibOSDP quiet this long: probe at every turn (no reader is being polled).
const LONG_QUIET: Duration = Duration::from_millis(250);
/// Between two sweeps of every address and rate.
const SWEEP_REST: Duration = Duration::from_secs(5);
/// The highest unicast OSDP address.
const MAX_ADDRESS: u8 = 126;

/// 8N1: ten bits a byte.
fn byte_time(baud: u32) -> Duration {
    Duration::from_micros(10_000_000 / u64::from(baud.max(1200)))
}

/// One bus's prober: a handle of the port of its own, the scan position, a held op.
pub(in crate::rs485) struct Prober {
    port: Option<serialport::TTYPort>,
    bus: String,
    bus_baud: u32,
    configured: Vec<u8>,
    sweep: Option<Sweep>,
    held: Option<OpReq>,
    last_probe: Option<Instant>,
}

struct Sweep {
    opts: ScanOptions,
    bauds: Vec<u32>,
    baud_i: usize,
    next: u8,
    done: u32,
    /// Answered ID, to be asked for its capabilities: address, baud, PDID.
    found: Option<(u8, u32, Value)>,
    rest_until: Option<Instant>,
}

impl Prober {
    pub(in crate::rs485) fn new(port: &serialport::TTYPort, bus: &BusConfig) -> Prober {
        let configured = match &bus.kind {
            super::BusKind::Osdp(r) => r.iter().map(|r| r.address).collect(),
            _ => Vec::new(),
        };
        Prober {
            port: port.try_clone_native().ok(),
            bus: bus.id.clone(),
            bus_baud: bus.baud,
            configured,
            sweep: None,
            held: None,
            last_probe: None,
        }
    }

    /// One pairing turn of the bus loop: runs the provisioner's next op or one scan step, if
    /// there is one and the bus has a gap for it. True if it did (another may follow at once).
    pub(in crate::rs485) fn turn(
        &mut self,
        shared: &Shared,
        activity: &Mutex<Option<Instant>>,
        last_read: &Mutex<Option<Instant>>,
    ) -> bool {
        let hub = shared.pairing();
        if self.held.is_none() {
            self.held = hub.take(&self.bus);
        }
        let scan = hub.scan();
        let opts = scan.active();
        if opts.is_none() {
            self.sweep = None;
        }
        let resting = self
            .sweep
            .as_ref()
            .and_then(|s| s.rest_until)
            .is_some_and(|t| Instant::now() < t && self.held.is_none());
        if (self.held.is_none() && opts.is_none()) || resting || !self.gap(activity, last_read) {
            return false;
        }
        if let Some(req) = self.held.take() {
            let answer = self.op(&req.op);
            let _ = req.reply.send(answer);
            return true;
        }
        if let Some(o) = opts {
            self.step(scan.as_ref(), o);
            return true;
        }
        false
    }

    /// Whether a probe may go out now (see the module header); waits the settle time itself.
    fn gap(&self, activity: &Mutex<Option<Instant>>, last_read: &Mutex<Option<Instant>>) -> bool {
        let io = *activity.lock().unwrap_or_else(|e| e.into_inner());
        let read = *last_read.lock().unwrap_or_else(|e| e.into_inner());
        let Some(io) = io else { return true };
        let quiet = io.elapsed();
        if quiet >= LONG_QUIET {
            return true;
        }
        let replied = read.is_some_and(|r| r >= io);
        let fresh = self.last_probe.is_none_or(|p| p < io);
        let settle = Duration::from_millis(2) + byte_time(self.bus_baud) * 3;
        let cost = settle + byte_time(self.bus_baud) * 9 + TURNAROUND;
        if !(replied && fresh && quiet + cost <= POLL_DUE) {
            return false;
        }
        if quiet < settle {
            std::thread::sleep(settle - quiet);
        }
        // Nothing more arriving (the rest of a reply LibOSDP has not read yet).
        let pending = self
            .port
            .as_ref()
            .map_or(1, |p| p.bytes_to_read().unwrap_or(1));
        pending == 0 && *activity.lock().unwrap_or_else(|e| e.into_inner()) == Some(io)
    }

    fn op(&mut self, op: &Op) -> Result<Answer, String> {
        match *op {
            Op::OsdpId { address, baud } => {
                Ok(match self.exchange(address, baud, code::ID, &[0])? {
                    Some(r) if r.code == code::PDID => match p::pdid_json(&r.data) {
                        Some(id) => Answer::Identity(id),
                        None => Answer::Refused("a short PDID report".into()),
                    },
                    Some(r) => Answer::Refused(reply_name(&r)),
                    None => Answer::Silent,
                })
            }
            Op::OsdpComset {
                address,
                baud,
                new_address,
                new_baud,
            } => {
                let mut data = vec![new_address];
                data.extend_from_slice(&new_baud.to_le_bytes());
                Ok(match self.exchange(address, baud, code::COMSET, &data)? {
                    Some(r) if r.code == code::COM => Answer::Done,
                    Some(r) => Answer::Refused(reply_name(&r)),
                    None => Answer::Silent,
                })
            }
            Op::ModbusRead { .. } | Op::ModbusWrite { .. } => {
                Err(format!("bus `{}` is an OSDP bus", self.bus))
            }
        }
    }

    fn step(&mut self, scan: &dyn Scan, opts: ScanOptions) {
        if self.sweep.as_ref().is_none_or(|s| s.opts != opts) {
            let mut bauds = vec![self.bus_baud];
            if opts.all_bauds {
                bauds.extend(p::OSDP_BAUDS.iter().filter(|&&b| b != self.bus_baud));
            }
            self.sweep = Some(Sweep {
                opts,
                bauds,
                baud_i: 0,
                next: 0,
                done: 0,
                found: None,
                rest_until: None,
            });
        }
        let Some(s) = self.sweep.as_mut() else { return };
        s.rest_until = None;
        if let Some((address, baud, pdid)) = s.found.take() {
            let cap = match self.exchange(address, baud, code::CAP, &[0]) {
                Ok(Some(r)) if r.code == code::PDCAP => Some(p::pdcap_json(&r.data)),
                _ => None,
            };
            let now = Utc::now();
            scan.discovered(Candidate {
                id: Candidate::osdp_id(&self.bus, address),
                family: Family::OsdpReader,
                bus: Some(self.bus.clone()),
                address: Some(address),
                baud: Some(baud),
                mac: None,
                rssi: None,
                identity: serde_json::json!({"pdid": pdid, "pdcap": cap}),
                first_seen: now,
                last_seen: now,
            });
            return;
        }
        while s.next <= MAX_ADDRESS && self.configured.contains(&s.next) {
            s.next += 1;
        }
        if s.next > MAX_ADDRESS {
            s.next = 0;
            s.done = 0;
            s.baud_i += 1;
            if s.baud_i >= s.bauds.len() {
                s.baud_i = 0;
                s.rest_until = Some(Instant::now() + SWEEP_REST);
            }
            return;
        }
        let (address, baud) = (s.next, s.bauds[s.baud_i]);
        s.next += 1;
        s.done += 1;
        let total = u32::from(MAX_ADDRESS) + 1 - self.configured.len() as u32;
        let done = s.done;
        let answer = self.exchange(address, baud, code::ID, &[0]);
        scan.progress(&format!("osdp:{}@{baud}", self.bus), done, total);
        match answer {
            Ok(Some(r)) if r.code == code::PDID => {
                if let (Some(id), Some(s)) = (p::pdid_json(&r.data), self.sweep.as_mut()) {
                    s.found = Some((address, baud, id));
                }
            }
            Ok(Some(r)) => {
                tracing::debug!(bus = %self.bus, address, baud, reply = %reply_name(&r), "probe answered without a PDID");
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(bus = %self.bus, address, baud, "probe failed: {e}"),
        }
    }

    /// One command and its reply, at `baud` (the port is back at the bus's rate after it).
    /// `Ok(None)`: no reply, or none readable, within the window.
    fn exchange(
        &mut self,
        address: u8,
        baud: u32,
        command: u8,
        data: &[u8],
    ) -> Result<Option<Reply>, String> {
        let bus_baud = self.bus_baud;
        let Some(port) = self.port.as_mut() else {
            return Err("no handle of the port for probes".into());
        };
        if baud != bus_baud {
            port.set_baud_rate(baud)
                .map_err(|e| format!("cannot set {baud} baud: {e}"))?;
        }
        let r = talk(port, address, baud, command, data);
        if baud != bus_baud {
            port.set_baud_rate(bus_baud)
                .map_err(|e| format!("cannot set the bus back to {bus_baud} baud: {e}"))?;
        }
        self.last_probe = Some(Instant::now());
        r
    }
}

fn reply_name(r: &Reply) -> String {
    match (r.code, r.data.first()) {
        (code::NAK, Some(n)) => format!("NAK {n}"),
        (code::ACK, _) => "ACK".into(),
        (c, _) => format!("reply 0x{c:02X}"),
    }
}

fn talk(
    port: &mut serialport::TTYPort,
    address: u8,
    baud: u32,
    command: u8,
    data: &[u8],
) -> Result<Option<Reply>, String> {
    let _ = port.clear(serialport::ClearBuffer::Input);
    let frame = p::osdp_command(address, 0, command, data);
    port.write_all(&frame).map_err(|e| format!("write: {e}"))?;
    let _ = port.flush();
    let mut buf = Vec::new();
    let mut deadline = Instant::now() + TURNAROUND;
    let mut chunk = [0u8; 256];
    loop {
        let now = Instant::now();
        if now >= deadline || buf.len() > 2048 {
            return Ok(None);
        }
        let _ = port.set_timeout(deadline - now);
        match port.read(&mut chunk) {
            Ok(0) => {}
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                match p::osdp_parse(&buf) {
                    Parsed::Reply(r) if r.address == address => return Ok(Some(r)),
                    Parsed::Reply(_) | Parsed::Bad(_) => return Ok(None),
                    Parsed::Incomplete(len) => {
                        let rest = byte_time(baud) * len.unwrap_or(16).min(1440) as u32;
                        deadline = deadline.max(Instant::now() + rest + Duration::from_millis(20));
                    }
                }
            }
            Err(e) if super::idle(&e) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}
