//! Install mode on the RS-485 buses: what the bus threads and the provisioner share, and the
//! pure pieces of discovery (docs/rs485.md, *Pairing*).
//!
//! - [`Hub`] (one for all buses, in the buses' shared state): the install-mode handle
//!   ([`Scan`], `NoScan` until the daemon sets one), the profiles Modbus candidates are matched
//!   against, and per bus a queue of [`Op`]s the provisioner asks of the bus thread (an OSDP
//!   ID/COMSET exchange, a Modbus register read or write). A bus thread takes them at its
//!   pairing turn, between the configured devices' transactions, and answers on a oneshot.
//! - The scans themselves run on the bus threads: `osdp/scan.rs` (raw ID/CAP probes over
//!   addresses × bauds, between LibOSDP's polls) and `modbus/scan.rs` (one unit probe between
//!   polls, then the profiles' `identify` registers).
//! - Pure: OSDP command frames and reply parsing ([`osdp_command`], [`osdp_parse`], the PDID and
//!   PDCAP reports as JSON), and the Modbus identification plan ([`identify_steps`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::pairing::{NoScan, Scan};
use crate::profiles::Profiles;

/// The OSDP rates an `all_bauds` scan tries (the bus's own first).
pub const OSDP_BAUDS: [u32; 5] = [9600, 19200, 38400, 57600, 115_200];

/// OSDP command and reply codes used by discovery and provisioning.
pub mod code {
    pub const ID: u8 = 0x61;
    pub const CAP: u8 = 0x62;
    pub const COMSET: u8 = 0x6E;
    pub const ACK: u8 = 0x40;
    pub const NAK: u8 = 0x41;
    pub const PDID: u8 = 0x45;
    pub const PDCAP: u8 = 0x46;
    pub const COM: u8 = 0x54;
}

/// What the provisioner asks of a bus thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// OSDP: an ID command at `address`/`baud`; answered with the PDID as JSON, or `Silent`.
    OsdpId { address: u8, baud: u32 },
    /// OSDP: COMSET at `address`/`baud` to `new_address`/`new_baud`; answered `Done` on the
    /// PD's COM reply (the PD moves after it), `Refused` on a NAK, `Silent`.
    OsdpComset {
        address: u8,
        baud: u32,
        new_address: u8,
        new_baud: u32,
    },
    /// Modbus: read one register.
    ModbusRead {
        unit: u8,
        function: RegFn,
        register: u16,
    },
    /// Modbus: write one holding register (FC06).
    ModbusWrite { unit: u8, register: u16, value: u16 },
}

/// How a bus thread answered an [`Op`].
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Nothing (or nothing readable) came back in time.
    Silent,
    /// OSDP PDID report.
    Identity(Value),
    /// A Modbus register (or bit, 0/1).
    Word(u16),
    /// A Modbus exception or an OSDP NAK: the device is there and refused.
    Refused(String),
    /// A write or COMSET the device confirmed.
    Done,
}

/// An [`Op`] with where its answer goes. `Err` = the bus could not run it (port broken, bus
/// stopping).
pub struct OpReq {
    pub op: Op,
    pub reply: tokio::sync::oneshot::Sender<Result<Answer, String>>,
}

/// The Modbus register kinds an identification or a provisioning reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegFn {
    /// FC03.
    Holding,
    /// FC04.
    Input,
    /// FC02 (one bit).
    Discrete,
    /// FC01 (one bit).
    Coil,
}

/// What every bus shares for install mode.
pub struct Hub {
    scan: Mutex<Arc<dyn Scan>>,
    profiles: Mutex<Arc<Profiles>>,
    ops: Mutex<HashMap<String, VecDeque<OpReq>>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            scan: Mutex::new(Arc::new(NoScan)),
            profiles: Mutex::new(Arc::new(Profiles::embedded())),
            ops: Mutex::default(),
        }
    }
}

impl Hub {
    pub fn set_scan(&self, scan: Arc<dyn Scan>) {
        *self.scan.lock().unwrap_or_else(|e| e.into_inner()) = scan;
    }

    pub fn scan(&self) -> Arc<dyn Scan> {
        self.scan.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_profiles(&self, profiles: Arc<Profiles>) {
        *self.profiles.lock().unwrap_or_else(|e| e.into_inner()) = profiles;
    }

    pub fn profiles(&self) -> Arc<Profiles> {
        self.profiles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Queues `op` for the thread of `bus`.
    pub fn ask(&self, bus: &str, op: Op) -> tokio::sync::oneshot::Receiver<Result<Answer, String>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(bus.to_string())
            .or_default()
            .push_back(OpReq { op, reply: tx });
        rx
    }

    /// The next op for `bus`, if any (asks whose asker gave up are dropped).
    pub fn take(&self, bus: &str) -> Option<OpReq> {
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let q = ops.get_mut(bus)?;
        while let Some(r) = q.pop_front() {
            if !r.reply.is_closed() {
                return Some(r);
            }
        }
        None
    }
}

/// OSDP CRC-16 (poly 0x1021, init 0x1D0F, not reflected).
pub fn osdp_crc(data: &[u8]) -> u16 {
    let mut crc: u16 = 0x1D0F;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A plaintext OSDP command frame with CRC, mark byte first: `FF 53 ADDR LEN CTRL CMD DATA CRC`.
pub fn osdp_command(address: u8, seq: u8, command: u8, data: &[u8]) -> Vec<u8> {
    let len = 5 + 1 + data.len() + 2;
    let mut f = Vec::with_capacity(len + 1);
    f.extend_from_slice(&[0x53, address & 0x7F]);
    f.extend_from_slice(&(len as u16).to_le_bytes());
    f.push((seq & 0x03) | 0x04);
    f.push(command);
    f.extend_from_slice(data);
    let crc = osdp_crc(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    let mut out = vec![0xFF];
    out.extend(f);
    out
}

/// A reply from a PD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The PD's address (the reply bit cleared).
    pub address: u8,
    pub code: u8,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes needed; `Some(n)`: the whole frame is `n` bytes from its SOM.
    Incomplete(Option<usize>),
    Bad(String),
    Reply(Reply),
}

/// Reads one reply frame from `buf` (leading mark bytes and line noise before the SOM are
/// skipped). Never panics, whatever the bytes.
pub fn osdp_parse(buf: &[u8]) -> Parsed {
    let Some(start) = buf.iter().position(|&b| b == 0x53) else {
        return Parsed::Incomplete(None);
    };
    let f = &buf[start..];
    if f.len() < 4 {
        return Parsed::Incomplete(None);
    }
    let len = usize::from(u16::from_le_bytes([f[2], f[3]]));
    if !(8..=1440).contains(&len) {
        return Parsed::Bad(format!("length {len} out of range"));
    }
    if f.len() < len {
        return Parsed::Incomplete(Some(len));
    }
    let f = &f[..len];
    let ctrl = f[4];
    if ctrl & 0x04 == 0 {
        return Parsed::Bad("checksum frames are not used".into());
    }
    let crc = u16::from_le_bytes([f[len - 2], f[len - 1]]);
    if osdp_crc(&f[..len - 2]) != crc {
        return Parsed::Bad("CRC mismatch".into());
    }
    if f[1] & 0x80 == 0 {
        return Parsed::Bad("a command, not a reply".into());
    }
    let mut at = 5;
    if ctrl & 0x08 != 0 {
        // A security block: its length is its first byte.
        let sb = usize::from(f[5]);
        if sb < 2 || 5 + sb >= len - 2 {
            return Parsed::Bad("bad security block".into());
        }
        at += sb;
    }
    Parsed::Reply(Reply {
        address: f[1] & 0x7F,
        code: f[at],
        data: f[at + 1..len - 2].to_vec(),
    })
}

/// The PDID report (osdp_PDID, 12 bytes) as JSON, `None` when too short.
pub fn pdid_json(d: &[u8]) -> Option<Value> {
    if d.len() < 12 {
        return None;
    }
    Some(json!({
        // Three bytes, least significant first (as LibOSDP reads and writes it).
        "vendor_oui": format!("{:02X}{:02X}{:02X}", d[2], d[1], d[0]),
        "model": d[3],
        "version": d[4],
        "serial": format!("{:08X}", u32::from_le_bytes([d[5], d[6], d[7], d[8]])),
        "firmware": format!("{}.{}.{}", d[9], d[10], d[11]),
    }))
}

/// The PDCAP report (triplets function, compliance, items) as JSON.
pub fn pdcap_json(d: &[u8]) -> Value {
    Value::Array(
        d.chunks_exact(3)
            .map(|c| json!({"function": c[0], "compliance": c[1], "items": c[2]}))
            .collect(),
    )
}

/// Whether a PDCAP report says the PD does the secure channel (function 9,
/// communication security, compliance ≥ 1). `None`: not reported.
pub fn pdcap_secure(cap: &Value) -> Option<bool> {
    cap.as_array()?
        .iter()
        .find(|c| c["function"] == 9)
        .map(|c| c["compliance"].as_u64().unwrap_or(0) >= 1)
}

/// What one identification read expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Answered without an exception.
    Any,
    /// Holds this value.
    Value(u16),
    /// Holds the unit's own address (an address register).
    Unit,
}

/// One read of a Modbus identification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub profile: String,
    pub function: RegFn,
    pub register: u16,
    pub expect: Expect,
}

/// The reads that tell which profiles a unit matches, profile by profile (profiles without an
/// `identify` section are never matched).
pub fn identify_steps(profiles: &Profiles) -> Vec<Step> {
    let mut out = Vec::new();
    for id in profiles.modbus_ids() {
        let Some(p) = profiles.modbus(id) else {
            continue;
        };
        let Some(ident) = &p.identify else { continue };
        if let Some(r) = ident.address_register {
            out.push(Step {
                profile: p.id.clone(),
                function: RegFn::Holding,
                register: r,
                expect: Expect::Unit,
            });
        }
        for r in &ident.registers {
            out.push(Step {
                profile: p.id.clone(),
                function: r.function,
                register: r.register,
                expect: r.equals.map_or(Expect::Any, Expect::Value),
            });
        }
    }
    out
}

/// Whether an answer satisfies a step at `unit`.
pub fn step_matches(step: &Step, unit: u8, answer: &Answer) -> bool {
    match (step.expect, answer) {
        (Expect::Any, Answer::Word(_)) => true,
        (Expect::Value(v), Answer::Word(w)) => v == *w,
        (Expect::Unit, Answer::Word(w)) => *w == u16::from(unit),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_spec_vector() {
        let v = [
            0x53, 0x7F, 0x0D, 0x00, 0x04, 0x6E, 0x00, 0x80, 0x25, 0x00, 0x00,
        ];
        assert_eq!(osdp_crc(&v).to_le_bytes(), [0x6E, 0x38]);
    }

    #[test]
    fn a_command_frame_parses_back_only_as_a_reply() {
        let f = osdp_command(5, 0, code::ID, &[0]);
        assert_eq!(f[0], 0xFF);
        assert_eq!(u16::from_le_bytes([f[3], f[4]]) as usize, f.len() - 1);
        // A command is not taken for a reply.
        assert!(matches!(osdp_parse(&f), Parsed::Bad(_)));
        // The same frame with the reply bit set is.
        let mut r = f[1..].to_vec();
        r[1] |= 0x80;
        r[5] = code::PDID;
        let n = r.len();
        let crc = osdp_crc(&r[..n - 2]).to_le_bytes();
        r[n - 2..].copy_from_slice(&crc);
        assert_eq!(
            osdp_parse(&r),
            Parsed::Reply(Reply {
                address: 5,
                code: code::PDID,
                data: vec![0]
            })
        );
    }

    #[test]
    fn garbage_and_short_frames_never_panic() {
        assert_eq!(osdp_parse(&[]), Parsed::Incomplete(None));
        assert_eq!(osdp_parse(&[0xFF, 0x53, 0x85]), Parsed::Incomplete(None));
        assert_eq!(
            osdp_parse(&[0x53, 0x85, 0x10, 0x00, 0x04]),
            Parsed::Incomplete(Some(16))
        );
        assert!(matches!(
            osdp_parse(&[0x53, 0x85, 0xFF, 0xFF, 0x04]),
            Parsed::Bad(_)
        ));
        let mut bad = osdp_command(1, 0, code::ID, &[0])[1..].to_vec();
        bad[1] |= 0x80;
        assert!(matches!(osdp_parse(&bad), Parsed::Bad(_)));
        for n in 0..64u8 {
            let junk: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37) ^ 0x53).collect();
            let _ = osdp_parse(&junk);
        }
    }

    #[test]
    fn pdid_and_pdcap_read_as_json() {
        let d = [0x2C, 0x1B, 0x0A, 2, 1, 0x05, 0x00, 0x48, 0x47, 1, 2, 3];
        let j = pdid_json(&d).unwrap();
        assert_eq!(j["vendor_oui"], "0A1B2C");
        assert_eq!(j["serial"], "47480005");
        assert_eq!(j["firmware"], "1.2.3");
        assert!(pdid_json(&d[..11]).is_none());
        let cap = pdcap_json(&[9, 1, 1, 4, 1, 1, 7]);
        assert_eq!(cap.as_array().unwrap().len(), 2);
        assert_eq!(pdcap_secure(&cap), Some(true));
        assert_eq!(pdcap_secure(&pdcap_json(&[9, 0, 0])), Some(false));
        assert_eq!(pdcap_secure(&pdcap_json(&[])), None);
    }

    #[test]
    fn identification_plans_follow_the_profiles() {
        let p = Profiles::embedded();
        let steps = identify_steps(&p);
        assert!(
            steps.iter().any(|s| s.profile == "xy-md02"
                && s.register == 0x0101
                && s.expect == Expect::Unit)
        );
        let s = &steps[0];
        assert!(step_matches(
            &Step {
                expect: Expect::Unit,
                ..s.clone()
            },
            7,
            &Answer::Word(7)
        ));
        assert!(!step_matches(s, 7, &Answer::Refused("x".into())));
        assert!(!step_matches(
            &Step {
                expect: Expect::Value(3),
                ..s.clone()
            },
            7,
            &Answer::Word(4)
        ));
    }
}
