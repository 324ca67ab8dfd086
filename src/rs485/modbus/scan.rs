//! Install mode on a Modbus bus: probes of the unit ids no configured device uses, the
//! identification of answering units by the profiles' `identify` registers, and the
//! provisioner's register reads and writes (docs/rs485.md, *Pairing*).
//!
//! A pairing turn comes when nothing is due (no pulse to end, no job, no poll): it runs the
//! provisioner's next op, or one scan transaction if it ends before the next poll's slot (or if
//! the shortest poll period has passed since the last one, so a busy bus still scans, one
//! transaction slot at a time). A probe is a read of holding register 0, framed here: a unit
//! must start its answer within [`FIRST_BYTE`] of the request's end (then it has the whole
//! reply's time plus a margin to finish it); any answer, an exception included, means a device.
//! A relay job arriving meanwhile waits at most for the request to be on the wire: the probe
//! then gives way, unless an answer has started, and its unit is probed again next, that time
//! to the end of its window (a stream of jobs cannot stall the sweep; a job arriving during
//! that second probe waits out its window). A unit that missed
//! the window is found by the next sweep, or configured by hand. Its identification reads
//! (under the bus timeout) come one per turn; the candidate is reported with the profiles it
//! matched and what was read.

use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Map, Value, json};

use super::super::pairing::{self as p, Answer, Op, RegFn, Step};
use super::{Bus, exception_name};
use crate::pairing::{Candidate, Family, Scan, ScanOptions};
use crate::rs485::Job;
use tokio_modbus::client::{Reader, Writer};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};
use tokio_serial::SerialPort as _;

/// After a probe's request has gone out, how long a unit has to start its answer.
const FIRST_BYTE: Duration = Duration::from_millis(20);
/// Added to the reply's own time once it has started.
const REPLY_MARGIN: Duration = Duration::from_millis(20);
/// Between two sweeps of the unit ids.
const SWEEP_REST: Duration = Duration::from_secs(5);

/// What a pairing turn did.
pub(super) enum Turn {
    /// Nothing to do now.
    Idle,
    /// One transaction ran.
    Busy,
    /// The port broke.
    Broken(String),
    /// A relay job came while a probe waited for its first byte: the probe gave way (its unit
    /// is probed again next), and the job goes now.
    Job(Job),
}

/// How a probe ended.
enum Probe {
    Answered(bool),
    GaveWay(Job),
}

/// The scan position of one bus.
#[derive(Default)]
pub(super) struct State {
    sweep: Option<Sweep>,
    last_probe: Option<Instant>,
}

struct Sweep {
    opts: ScanOptions,
    units: Vec<u8>,
    i: usize,
    ident: Option<Ident>,
    rest_until: Option<Instant>,
    /// The unit whose probe last gave way to a relay job: probed again next, to its end (so
    /// that a stream of jobs cannot stall the sweep).
    gave_way: Option<u8>,
}

/// A unit that answered, being identified.
struct Ident {
    unit: u8,
    steps: Vec<Step>,
    at: usize,
    failed: Vec<String>,
    read: Map<String, Value>,
}

type Read = Result<tokio_modbus::Result<u16>, tokio::time::error::Elapsed>;

impl Bus<'_> {
    /// The time of `bytes` on the wire at this bus's rate (11 bits a byte, parity or not).
    fn wire_time(&self, bytes: u64) -> Duration {
        Duration::from_micros(bytes * 11 * 1_000_000 / u64::from(self.cfg.baud.max(1200)))
    }

    /// How long a probe takes when nobody answers: the request, then the first-byte window.
    fn probe_timeout(&self) -> Duration {
        self.wire_time(8) + FIRST_BYTE
    }

    /// Whether anything answers at `unit` (a read of holding register 0; see the header). With
    /// `jobs`, a relay job that arrives once the request is on the wire, before any byte of an
    /// answer, ends the probe there: the job does not wait out the window.
    async fn probe(
        &mut self,
        unit: u8,
        jobs: Option<&mut tokio::sync::mpsc::UnboundedReceiver<Job>>,
    ) -> Result<Probe, String> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let frame = super::wire::modbus_frame(unit, 0x03, &[0, 0, 0, 1]);
        self.port
            .with(|p| p.clear(tokio_serial::ClearBuffer::Input))
            .map_err(|e| e.to_string())?;
        let mut io = self.port.clone();
        let first = self.probe_timeout();
        let rest = self.wire_time(7) + REPLY_MARGIN;
        let request = self.wire_time(8);
        let exchange = async move {
            io.write_all(&frame).await?;
            io.flush().await?;
            let mut got = Vec::with_capacity(8);
            let mut buf = [0u8; 8];
            let job = async {
                let Some(jobs) = jobs else {
                    return std::future::pending().await;
                };
                tokio::time::sleep(request).await;
                match jobs.recv().await {
                    Some(job) => job,
                    // Every sender gone (stopping): never give way.
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                r = tokio::time::timeout(first, io.read(&mut buf)) => match r {
                    Err(_) => return Ok(Err(got)),
                    Ok(r) => got.extend_from_slice(&buf[..r?]),
                },
                job = job => return Ok(Ok(job)),
            }
            // Started: the rest of a 7-byte answer or a 5-byte exception.
            let _ = tokio::time::timeout(rest, async {
                while !(got.len() >= 7
                    || got.len() >= 5 && got.get(1).is_some_and(|f| f & 0x80 != 0))
                {
                    let n = io.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            Ok::<_, std::io::Error>(Err(got))
        };
        let got = match exchange.await.map_err(|e| e.to_string())? {
            Ok(job) => return Ok(Probe::GaveWay(job)),
            Err(got) => got,
        };
        let n = if got.len() >= 5 && got[1] & 0x80 != 0 {
            5
        } else {
            7
        };
        let answered = got.len() >= n
            && got[0] == unit
            && super::wire::modbus_crc(&got[..n - 2]).to_le_bytes() == [got[n - 2], got[n - 1]];
        if !got.is_empty() && !answered {
            tracing::debug!(bus = %self.cfg.id, unit, bytes = got.len(), "garbled answer to a probe");
        }
        Ok(Probe::Answered(answered))
    }

    pub(super) async fn pairing_turn(
        &mut self,
        next_slot: Option<Instant>,
        jobs: &mut tokio::sync::mpsc::UnboundedReceiver<Job>,
    ) -> Turn {
        let hub = self.shared.pairing();
        if let Some(req) = hub.take(&self.cfg.id) {
            let r = self.pair_op(&req.op).await;
            let broken = r.as_ref().err().cloned();
            let _ = req.reply.send(r);
            return broken.map_or(Turn::Busy, Turn::Broken);
        }
        let scan = hub.scan();
        let Some(opts) = scan.active() else {
            self.pairing.sweep = None;
            return Turn::Idle;
        };
        let now = Instant::now();
        let cost = self.probe_timeout();
        let fits = next_slot.is_none_or(|s| now + cost <= s);
        let period = self
            .devs
            .iter()
            .map(|d| d.cfg.poll_interval)
            .min()
            .unwrap_or(Duration::from_secs(1));
        let owed = self
            .pairing
            .last_probe
            .is_none_or(|t| now.duration_since(t) >= period);
        if !(fits || owed) {
            return Turn::Idle;
        }
        if self.pairing.sweep.as_ref().is_none_or(|s| s.opts != opts) {
            let used: Vec<u8> = self.devs.iter().map(|d| d.cfg.address).collect();
            self.pairing.sweep = Some(Sweep {
                units: opts
                    .modbus_units
                    .clone()
                    .filter(|u| (1..=247).contains(u) && !used.contains(u))
                    .collect(),
                opts,
                i: 0,
                ident: None,
                rest_until: None,
                gave_way: None,
            });
        }
        let Some(s) = self.pairing.sweep.as_mut() else {
            return Turn::Idle;
        };
        if s.rest_until.is_some_and(|t| now < t) {
            return Turn::Idle;
        }
        s.rest_until = None;
        self.pairing.last_probe = Some(now);
        // Identifying a unit that answered: one read per turn.
        if let Some(mut id) = s.ident.take() {
            while id.at < id.steps.len() && id.failed.contains(&id.steps[id.at].profile) {
                id.at += 1;
            }
            if id.at < id.steps.len() {
                let step = id.steps[id.at].clone();
                let t = self.timeout;
                let r = match self.read(id.unit, step.function, step.register, t).await {
                    Ok(r) => r,
                    Err(e) => return Turn::Broken(e),
                };
                if let Answer::Word(w) = r {
                    id.read.insert(
                        format!("{:?}:0x{:04X}", step.function, step.register).to_lowercase(),
                        json!(w),
                    );
                }
                if !p::step_matches(&step, id.unit, &r) {
                    id.failed.push(step.profile.clone());
                }
                id.at += 1;
                if let Some(s) = self.pairing.sweep.as_mut() {
                    s.ident = Some(id);
                }
                return Turn::Busy;
            }
            self.report(scan.as_ref(), id);
            return Turn::Busy;
        }
        if s.i >= s.units.len() {
            s.i = 0;
            s.rest_until = Some(now + SWEEP_REST);
            return Turn::Idle;
        }
        let unit = s.units[s.i];
        s.i += 1;
        let (done, total) = (s.i as u32, s.units.len() as u32);
        let jobs = (s.gave_way.take() != Some(unit)).then_some(jobs);
        let answered = match self.probe(unit, jobs).await {
            Ok(Probe::Answered(a)) => a,
            Ok(Probe::GaveWay(job)) => {
                if let Some(s) = self.pairing.sweep.as_mut() {
                    s.i = s.i.saturating_sub(1);
                    s.gave_way = Some(unit);
                }
                return Turn::Job(job);
            }
            Err(e) => return Turn::Broken(e),
        };
        scan.progress(&format!("modbus:{}", self.cfg.id), done, total);
        if answered {
            let steps = p::identify_steps(&self.shared.pairing().profiles());
            if let Some(s) = self.pairing.sweep.as_mut() {
                s.ident = Some(Ident {
                    unit,
                    steps,
                    at: 0,
                    failed: Vec::new(),
                    read: Map::new(),
                });
            }
        }
        Turn::Busy
    }

    fn report(&self, scan: &dyn Scan, id: Ident) {
        let mut matched: Vec<String> = id.steps.iter().map(|s| s.profile.clone()).collect();
        matched.dedup();
        matched.retain(|p| !id.failed.contains(p));
        let now = Utc::now();
        scan.discovered(Candidate {
            id: Candidate::modbus_id(&self.cfg.id, id.unit),
            family: Family::ModbusDevice,
            bus: Some(self.cfg.id.clone()),
            address: Some(id.unit),
            baud: Some(self.cfg.baud),
            mac: None,
            rssi: None,
            identity: json!({"profiles": matched, "registers": id.read}),
            first_seen: now,
            last_seen: now,
        });
    }

    async fn pair_op(&mut self, op: &Op) -> Result<Answer, String> {
        match *op {
            Op::ModbusRead {
                unit,
                function,
                register,
            } => self.read(unit, function, register, self.timeout).await,
            Op::ModbusWrite {
                unit,
                register,
                value,
            } => {
                self.port
                    .with(|p| p.clear(tokio_serial::ClearBuffer::Input))
                    .map_err(|e| e.to_string())?;
                self.ctx.set_slave(Slave(unit));
                let r = tokio::time::timeout(
                    self.timeout,
                    self.ctx.write_single_register(register, value),
                )
                .await;
                self.settle(r.map(|r| r.map(|r| r.map(|()| 0))))
                    .map(|a| match a {
                        Answer::Word(_) => Answer::Done,
                        a => a,
                    })
            }
            Op::OsdpId { .. } | Op::OsdpComset { .. } => {
                Err(format!("bus `{}` is a Modbus bus", self.cfg.id))
            }
        }
    }

    /// One register (or bit) of `unit`, under `timeout`. `Err`: the port broke.
    async fn read(
        &mut self,
        unit: u8,
        function: RegFn,
        register: u16,
        timeout: Duration,
    ) -> Result<Answer, String> {
        self.port
            .with(|p| p.clear(tokio_serial::ClearBuffer::Input))
            .map_err(|e| e.to_string())?;
        self.ctx.set_slave(Slave(unit));
        let first = |v: Vec<u16>| v.first().copied().unwrap_or(0);
        let bit = |v: Vec<bool>| u16::from(v.first().copied().unwrap_or(false));
        let ctx = &mut self.ctx;
        let r: Read = match function {
            RegFn::Holding => {
                tokio::time::timeout(timeout, ctx.read_holding_registers(register, 1))
                    .await
                    .map(|r| r.map(|r| r.map(first)))
            }
            RegFn::Input => tokio::time::timeout(timeout, ctx.read_input_registers(register, 1))
                .await
                .map(|r| r.map(|r| r.map(first))),
            RegFn::Discrete => tokio::time::timeout(timeout, ctx.read_discrete_inputs(register, 1))
                .await
                .map(|r| r.map(|r| r.map(bit))),
            RegFn::Coil => tokio::time::timeout(timeout, ctx.read_coils(register, 1))
                .await
                .map(|r| r.map(|r| r.map(bit))),
        };
        self.settle(r)
    }

    /// An answer from a transaction's outcome; a fresh framing after anything but an answer.
    fn settle(&mut self, r: Read) -> Result<Answer, String> {
        let out = match r {
            Ok(Ok(Ok(v))) => return Ok(Answer::Word(v)),
            Ok(Ok(Err(ex))) => return Ok(Answer::Refused(exception(ex))),
            Err(_) => Ok(Answer::Silent),
            Ok(Err(tokio_modbus::Error::Transport(e))) => match e.kind() {
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
                    Ok(Answer::Silent)
                }
                _ => Err(e.to_string()),
            },
            Ok(Err(tokio_modbus::Error::Protocol(_))) => Ok(Answer::Silent),
        };
        self.ctx = tokio_modbus::client::rtu::attach(self.port.clone());
        out
    }
}

fn exception(e: ExceptionCode) -> String {
    format!("exception {}", exception_name(e))
}
