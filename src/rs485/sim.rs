//! Simulated RS-485 devices on pseudo-terminals, for the demo site and the `rs485` benchmark:
//! an OSDP keypad (a LibOSDP peripheral device, the same C library real readers run) and a
//! Modbus RTU board answering like the Waveshare relay board (coils, board-timed pulses,
//! discrete inputs, input registers). Gatehouse talks to them through its real bus code, over
//! the PTY's slave side, exactly as it would to a USB RS-485 adapter. The tests use independent
//! Python peers instead (`tests/peers/`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libosdp::{
    OsdpCommand, OsdpEvent, OsdpEventKeyPress, OsdpFlag, PdCapEntity, PdCapability, PdInfoBuilder,
    PeripheralDevice,
};
use serialport::{SerialPort, TTYPort};

use super::wire::{modbus_crc, modbus_frame};

pub use super::sim_demo::{DemoSims, PairSims, start_for_demo};

/// A PTY pair: the simulator owns the master; the slave stays open (so the path stays valid
/// while gatehouse opens, closes and reopens it) and is what gatehouse opens, by `path` or by a
/// symlink to it.
pub struct Pty {
    pub master: TTYPort,
    _slave: TTYPort,
    pub path: PathBuf,
}

impl Pty {
    pub fn open() -> anyhow::Result<Pty> {
        let (master, slave) = TTYPort::pair()?;
        let path = PathBuf::from(
            slave
                .name()
                .ok_or_else(|| anyhow::anyhow!("the PTY has no slave name"))?,
        );
        Ok(Pty {
            master,
            _slave: slave,
            path,
        })
    }

    /// Points `link` at the slave (replacing an old link), so that a config can name a fixed path.
    pub fn link(&self, link: &Path) -> anyhow::Result<()> {
        if let Some(dir) = link.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = link.with_extension("tmp-link");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&self.path, &tmp)?;
        std::fs::rename(&tmp, link)?;
        Ok(())
    }
}

/// What a simulated device saw or did, with when.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    Led { color: String },
    Buzzer { count: u8 },
    Output { output: u8, control: u8 },
    KeySet,
    Coil { channel: u16, on: bool },
}

pub type SeenLog = Arc<Mutex<Vec<(Instant, Seen)>>>;

enum KeypadCmd {
    Keys(u8, Vec<u8>, Option<Sender<Instant>>),
}

/// One simulated PD on a keypad's line: its address and, with a secure channel, its key file.
#[derive(Debug, Clone)]
pub struct SimPd {
    pub address: u8,
    pub key_file: Option<PathBuf>,
}

/// Simulated OSDP keypads/readers: one or more PDs on one PTY (a multidrop line,
/// [`super::sim_line`]).
pub struct SimKeypad {
    tx: Sender<KeypadCmd>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub seen: SeenLog,
    pub path: PathBuf,
    /// The PDs' addresses and whether LibOSDP has each online.
    online: Vec<(u8, Arc<AtomicBool>)>,
}

impl SimKeypad {
    /// Starts a keypad at `address`. With `key_file`: the secure-channel key is read from it if
    /// it exists (a paired reader), otherwise the keypad starts in install mode and writes the
    /// key it is given with KEYSET there (mode 0600). Without: no secure channel.
    pub fn start(address: u8, key_file: Option<PathBuf>) -> anyhow::Result<SimKeypad> {
        SimKeypad::start_line(&[SimPd { address, key_file }])
    }

    /// Starts several keypads on one PTY, each at its own address (distinct ones).
    pub fn start_line(pds: &[SimPd]) -> anyhow::Result<SimKeypad> {
        let Some(first) = pds.first() else {
            anyhow::bail!("a simulated OSDP line needs at least one keypad");
        };
        let pty = Pty::open()?;
        let path = pty.path.clone();
        let seen: SeenLog = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let online: Vec<_> = pds
            .iter()
            .map(|p| (p.address, Arc::new(AtomicBool::new(false))))
            .collect();
        let (tx, rx) = channel();
        let (s2, st2, on2, pds) = (seen.clone(), stop.clone(), online.clone(), pds.to_vec());
        let thread = std::thread::Builder::new()
            .name(format!("sim-keypad-{}", first.address))
            .spawn(move || {
                if let Err(e) = keypad_thread(pty, pds, rx, s2, st2, on2) {
                    tracing::error!("simulated keypad stopped: {e:#}");
                }
            })?;
        Ok(SimKeypad {
            tx,
            stop,
            thread: Some(thread),
            seen,
            path,
            online,
        })
    }

    /// Types keys (e.g. `123456#`) on the first keypad; returns when the keypad queued them,
    /// with that instant.
    pub fn keys(&self, keys: &str) -> Option<Instant> {
        self.keys_at(self.online.first()?.0, keys)
    }

    /// Types keys on the keypad at `address`.
    pub fn keys_at(&self, address: u8, keys: &str) -> Option<Instant> {
        let (t, r) = channel();
        self.tx
            .send(KeypadCmd::Keys(address, keys.as_bytes().to_vec(), Some(t)))
            .ok()?;
        r.recv_timeout(Duration::from_secs(2)).ok()
    }

    /// Whether the first keypad is online (polled by gatehouse).
    pub fn online(&self) -> bool {
        self.online
            .first()
            .is_some_and(|(_, o)| o.load(Ordering::Relaxed))
    }

    /// Whether the keypad at `address` is online.
    pub fn online_at(&self, address: u8) -> bool {
        self.online
            .iter()
            .any(|(a, o)| *a == address && o.load(Ordering::Relaxed))
    }
}

impl Drop for SimKeypad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One LibOSDP PD on the line: `(address, inbox, device)`.
type LinePd = (
    u8,
    Arc<Mutex<std::collections::VecDeque<u8>>>,
    PeripheralDevice,
);

fn start_pd(pty: &Pty, spec: &SimPd, index: usize, seen: &SeenLog) -> anyhow::Result<LinePd> {
    let address = spec.address;
    let key_file = spec.key_file.clone();
    let mut out = pty.master.try_clone_native()?;
    out.set_timeout(Duration::ZERO)?;
    let chan = super::sim_line::PdChannel::new(index as i32, out);
    let inbox = chan.inbox.clone();
    let mut info = PdInfoBuilder::new()
        .name("sim-keypad")
        .and_then(|b| b.address(i32::from(address)))
        .and_then(|b| b.baud_rate(9600))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        .capability(PdCapability::CommunicationSecurity(PdCapEntity::new(1, 1)))
        .capability(PdCapability::LedControl(PdCapEntity::new(1, 1)))
        .capability(PdCapability::AudibleOutput(PdCapEntity::new(1, 1)))
        .capability(PdCapability::OutputControl(PdCapEntity::new(1, 1)));
    let stored = key_file
        .as_ref()
        .and_then(|f| std::fs::read(f).ok())
        .and_then(|b| <[u8; 16]>::try_from(b.as_slice()).ok());
    match (&key_file, stored) {
        (_, Some(k)) => info = info.secure_channel_key(k),
        (Some(_), None) => info = info.flag(OsdpFlag::InstallMode),
        (None, None) => {}
    }
    let mut pd =
        PeripheralDevice::new(info, Box::new(chan)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let s = seen.clone();
    pd.set_command_callback(move |cmd| {
        let now = Instant::now();
        let item = match cmd {
            OsdpCommand::Led(l) => Seen::Led {
                color: format!("{:?}", l.temporary.on_color).to_lowercase(),
            },
            OsdpCommand::Buzzer(b) => Seen::Buzzer { count: b.rep_count },
            OsdpCommand::Output(o) => Seen::Output {
                output: o.output_no,
                control: o.control_code,
            },
            OsdpCommand::KeySet(k) => {
                if let (Some(f), Ok(key)) = (&key_file, <[u8; 16]>::try_from(k.data.as_slice())) {
                    if let Err(e) = write_secret(f, &key) {
                        tracing::error!("simulated keypad could not keep its key: {e}");
                    }
                }
                Seen::KeySet
            }
            _ => return 0,
        };
        tracing::info!(address, seen = ?item, "simulated keypad");
        s.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((now, item));
        0
    });
    Ok((address, inbox, pd))
}

fn keypad_thread(
    pty: Pty,
    specs: Vec<SimPd>,
    rx: Receiver<KeypadCmd>,
    seen: SeenLog,
    stop: Arc<AtomicBool>,
    online: Vec<(u8, Arc<AtomicBool>)>,
) -> anyhow::Result<()> {
    let mut master = pty.master.try_clone_native()?;
    master.set_timeout(Duration::ZERO)?;
    let mut pds = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        pds.push(start_pd(&pty, spec, i, &seen)?);
    }
    let inboxes: Vec<_> = pds.iter().map(|(a, i, _)| (*a, i.clone())).collect();
    let mut splitter = super::sim_line::FrameSplitter::default();
    while !stop.load(Ordering::Relaxed) {
        let busy = super::sim_line::route(&mut master, &mut splitter, &inboxes)?;
        for (address, _, pd) in pds.iter_mut() {
            pd.refresh();
            if let Some((_, o)) = online.iter().find(|(a, _)| a == address) {
                o.store(pd.is_online(), Ordering::Relaxed);
            }
        }
        while let Ok(KeypadCmd::Keys(to, keys, ack)) = rx.try_recv() {
            if let Some((_, _, pd)) = pds.iter_mut().find(|(a, _, _)| *a == to) {
                let ev = OsdpEvent::KeyPress(OsdpEventKeyPress {
                    reader_no: 0,
                    data: keys,
                });
                let _ = pd.notify_event(ev);
                if let Some(a) = ack {
                    let _ = a.send(Instant::now());
                }
            }
        }
        if !busy {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(())
}

fn write_secret(path: &Path, key: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(key)
}

/// One simulated Modbus board on a line: its unit id and, to keep a unit id written to it over
/// restarts (as a real board's EEPROM does), a file holding it.
#[derive(Debug, Clone)]
pub struct SimUnit {
    pub address: u8,
    pub unit_file: Option<PathBuf>,
}

/// A simulated Modbus RTU board: 8 coils with board-timed pulses at 0x0200+ch (Waveshare
/// "flash on", 100 ms units), 8 discrete inputs, input registers 1–2 (21.5 °C, 40 %RH), its unit
/// id at holding register 0x4000 (writable). More than one can share a PTY.
pub struct SimBoard {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub seen: SeenLog,
    pub path: PathBuf,
    /// The first board's discrete inputs.
    pub inputs: Arc<Mutex<[bool; 8]>>,
    /// Requests answered so far.
    pub served: Arc<std::sync::atomic::AtomicU64>,
}

impl SimBoard {
    pub fn start(address: u8) -> anyhow::Result<SimBoard> {
        SimBoard::start_line(&[SimUnit {
            address,
            unit_file: None,
        }])
    }

    /// Starts boards on one PTY; each answers at its unit id (the one in its `unit_file`, when
    /// that holds one).
    pub fn start_line(units: &[SimUnit]) -> anyhow::Result<SimBoard> {
        let Some(first) = units.first() else {
            anyhow::bail!("a simulated Modbus line needs at least one board");
        };
        let pty = Pty::open()?;
        let path = pty.path.clone();
        let seen: SeenLog = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let inputs = Arc::new(Mutex::new([false; 8]));
        let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s2, st2, i2, sv2) = (seen.clone(), stop.clone(), inputs.clone(), served.clone());
        let boards: Vec<(BoardState, Option<PathBuf>)> = units
            .iter()
            .map(|u| {
                let kept = u
                    .unit_file
                    .as_ref()
                    .and_then(|f| std::fs::read_to_string(f).ok())
                    .and_then(|t| t.trim().parse::<u8>().ok())
                    .filter(|a| (1..=247).contains(a));
                let state = BoardState {
                    address: kept.unwrap_or(u.address),
                    ..BoardState::default()
                };
                (state, u.unit_file.clone())
            })
            .collect();
        let thread = std::thread::Builder::new()
            .name(format!("sim-board-{}", first.address))
            .spawn(move || {
                if let Err(e) = board_thread(pty, boards, s2, st2, i2, &sv2) {
                    tracing::error!("simulated board stopped: {e:#}");
                }
            })?;
        Ok(SimBoard {
            stop,
            thread: Some(thread),
            seen,
            path,
            inputs,
            served,
        })
    }
}

impl Drop for SimBoard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The registers of a simulated board and what a request does to them.
#[derive(Debug, Default)]
pub struct BoardState {
    /// The unit id (holding register 0x4000; FC06 there moves the board).
    pub address: u8,
    pub coils: [bool; 8],
    pub inputs: [bool; 8],
    /// Pulses running: (channel, off at).
    pub pulses: Vec<(u16, Instant)>,
}

/// Length of the request frame starting `buf` (address, function, ...), if known yet.
pub fn request_len(buf: &[u8]) -> Option<usize> {
    match *buf.get(1)? {
        0x01..=0x06 => Some(8),
        0x0F | 0x10 => buf.get(6).map(|&n| 9 + usize::from(n)),
        _ => Some(4), // unknown function: answered with an exception after its CRC
    }
}

impl BoardState {
    /// Answers one request PDU (function + data). Returns the reply PDU and coil changes.
    pub fn handle(&mut self, pdu: &[u8], now: Instant) -> (Vec<u8>, Vec<(u16, bool)>) {
        let mut changes = Vec::new();
        let ex = |f: u8, code: u8| vec![f | 0x80, code];
        let Some((&f, data)) = pdu.split_first() else {
            return (ex(0, 1), changes);
        };
        let word = |i: usize| -> Option<u16> {
            Some(u16::from_be_bytes([*data.get(i)?, *data.get(i + 1)?]))
        };
        let (Some(a), Some(v)) = (word(0), word(2)) else {
            return (ex(f, 3), changes);
        };
        let reply = match f {
            0x01 | 0x02 => {
                let bits = if f == 1 { self.coils } else { self.inputs };
                if v == 0 || u32::from(a) + u32::from(v) > 8 {
                    return (ex(f, 2), changes);
                }
                let mut byte = 0u8;
                for k in 0..v {
                    byte |= u8::from(bits[usize::from(a + k)]) << k;
                }
                vec![f, 1, byte]
            }
            0x03 | 0x04 => {
                let regs: &[(u16, u16)] = if f == 4 {
                    &[(1, 215), (2, 400)]
                } else {
                    &[
                        (0x4000, u16::from(self.address)),
                        (0x2000, 2),
                        (0x8000, 0x0100),
                    ]
                };
                if v == 0 || v > 125 {
                    return (ex(f, 3), changes);
                }
                let mut out = vec![f, (v * 2) as u8];
                for k in 0..v {
                    match regs.iter().find(|(r, _)| *r == a.wrapping_add(k)) {
                        Some((_, val)) => out.extend_from_slice(&val.to_be_bytes()),
                        None => return (ex(f, 2), changes),
                    }
                }
                out
            }
            0x05 => {
                let ch = a & 0xFF;
                match (a & 0xFF00, v) {
                    (0x0000, 0xFF00 | 0x0000 | 0x5500) if ch < 8 => {
                        let c = usize::from(ch);
                        let on = match v {
                            0xFF00 => true,
                            0x0000 => false,
                            _ => !self.coils[c],
                        };
                        if self.coils[c] != on {
                            changes.push((ch, on));
                        }
                        self.coils[c] = on;
                        self.pulses.retain(|p| p.0 != ch);
                    }
                    (0x0200, units) if ch < 8 => {
                        let c = usize::from(ch);
                        if !self.coils[c] {
                            changes.push((ch, true));
                        }
                        self.coils[c] = true;
                        self.pulses.retain(|p| p.0 != ch);
                        self.pulses
                            .push((ch, now + Duration::from_millis(u64::from(units) * 100)));
                    }
                    _ => return (ex(f, 2), changes),
                }
                let mut out = vec![f];
                out.extend_from_slice(&data[..4]);
                out
            }
            0x06 if a == 0x4000 => {
                let Ok(unit) = u8::try_from(v) else {
                    return (ex(f, 3), changes);
                };
                if !(1..=247).contains(&unit) {
                    return (ex(f, 3), changes);
                }
                self.address = unit;
                let mut out = vec![f];
                out.extend_from_slice(&data[..4]);
                out
            }
            0x06 => return (ex(f, 2), changes),
            _ => return (ex(f, 1), changes),
        };
        (reply, changes)
    }

    /// Ends pulses that are due; returns the coils switched off.
    pub fn tick(&mut self, now: Instant) -> Vec<u16> {
        let (due, keep): (Vec<_>, Vec<_>) = self.pulses.drain(..).partition(|p| p.1 <= now);
        self.pulses = keep;
        due.into_iter()
            .map(|(ch, _)| {
                self.coils[usize::from(ch)] = false;
                ch
            })
            .collect()
    }
}

fn board_thread(
    pty: Pty,
    mut boards: Vec<(BoardState, Option<PathBuf>)>,
    seen: SeenLog,
    stop: Arc<AtomicBool>,
    inputs: Arc<Mutex<[bool; 8]>>,
    served: &std::sync::atomic::AtomicU64,
) -> anyhow::Result<()> {
    let mut master = pty.master.try_clone_native()?;
    master.set_timeout(Duration::from_millis(2))?;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 256];
    let note = |address: u8, ch: u16, on: bool| {
        tracing::info!(address, relay = ch, on, "simulated relay board");
        seen.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((Instant::now(), Seen::Coil { channel: ch, on }));
    };
    while !stop.load(Ordering::Relaxed) {
        for (state, _) in boards.iter_mut() {
            for ch in state.tick(Instant::now()) {
                note(state.address, ch, false);
            }
        }
        match master.read(&mut chunk) {
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(e) => return Err(e.into()),
        }
        // Frame: find a request with a good CRC at the start; drop a byte and retry otherwise.
        while buf.len() >= 4 {
            let Some(len) = request_len(&buf) else { break };
            if buf.len() < len {
                break;
            }
            let frame = &buf[..len];
            if modbus_crc(&frame[..len - 2]).to_le_bytes() != frame[len - 2..] {
                buf.remove(0);
                continue;
            }
            let first = boards.first().map(|b| b.0.address);
            if let Some((state, unit_file)) = boards.iter_mut().find(|b| b.0.address == frame[0]) {
                let address = state.address;
                if Some(address) == first {
                    state.inputs = *inputs.lock().unwrap_or_else(|e| e.into_inner());
                }
                let (reply, changes) = state.handle(&frame[1..len - 2], Instant::now());
                for (ch, on) in changes {
                    note(address, ch, on);
                }
                let out = modbus_frame(address, reply[0], &reply[1..]);
                master.write_all(&out)?;
                served.fetch_add(1, Ordering::Relaxed);
                if state.address != address {
                    tracing::info!(
                        from = address,
                        to = state.address,
                        "simulated relay board: new unit id"
                    );
                    if let Some(f) = unit_file {
                        if let Err(e) =
                            std::fs::create_dir_all(f.parent().unwrap_or(Path::new(".")))
                                .and_then(|()| std::fs::write(&f, format!("{}\n", state.address)))
                        {
                            tracing::error!(
                                "simulated relay board could not keep its unit id: {e}"
                            );
                        }
                    }
                }
            }
            buf.drain(..len);
        }
        if buf.len() > 512 {
            buf.clear();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn board_pulses_and_answers() {
        let t0 = Instant::now();
        let mut b = BoardState::default();
        let (r, ch) = b.handle(&[0x05, 0x02, 0x03, 0x00, 0x07], t0);
        assert_eq!(r, vec![0x05, 0x02, 0x03, 0x00, 0x07]);
        assert_eq!(ch, vec![(3, true)]);
        assert!(b.tick(t0 + Duration::from_millis(600)).is_empty());
        assert_eq!(b.tick(t0 + Duration::from_millis(701)), vec![3]);
        let (r, _) = b.handle(&[0x01, 0x00, 0x00, 0x00, 0x08], t0);
        assert_eq!(r, vec![0x01, 1, 0]);
        let (r, _) = b.handle(&[0x04, 0x00, 0x01, 0x00, 0x01], t0);
        assert_eq!(r, vec![0x04, 2, 0, 215]);
        let (r, _) = b.handle(&[0x04, 0x00, 0x09, 0x00, 0x01], t0);
        assert_eq!(r, vec![0x84, 2]);
        let (r, _) = b.handle(&[0x2B], t0);
        assert_eq!(r, vec![0xAB, 3]);
    }

    #[test]
    fn the_unit_id_register_reads_and_moves_the_board() {
        let t0 = Instant::now();
        let mut b = BoardState {
            address: 9,
            ..BoardState::default()
        };
        let (r, _) = b.handle(&[0x03, 0x40, 0x00, 0x00, 0x01], t0);
        assert_eq!(r, vec![0x03, 2, 0, 9]);
        let (r, _) = b.handle(&[0x06, 0x40, 0x00, 0x00, 0x02], t0);
        assert_eq!(r, vec![0x06, 0x40, 0x00, 0x00, 0x02]);
        assert_eq!(b.address, 2);
        // Out of range, or another register: refused, the unit id stays.
        for bad in [
            [0x06, 0x40, 0x00, 0x00, 0x00],
            [0x06, 0x40, 0x00, 0x00, 0xF8],
        ] {
            assert_eq!(b.handle(&bad, t0).0, vec![0x86, 3]);
        }
        assert_eq!(
            b.handle(&[0x06, 0x40, 0x00, 0x01, 0x00], t0).0,
            vec![0x86, 3]
        );
        assert_eq!(
            b.handle(&[0x06, 0x10, 0x00, 0x00, 0x05], t0).0,
            vec![0x86, 2]
        );
        assert_eq!(b.address, 2);
    }
}
