//! The simulated OSDP multidrop line behind one PTY (demo): the bytes gatehouse sends are cut
//! into OSDP frames and each frame goes to the simulated PD whose address it names (a 0x7F
//! broadcast to every PD), as a PD on a shared RS-485 line only takes its own frames. What a PD
//! writes goes straight to the PTY. Replies are not echoed to the other PDs (a PTY has no echo).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libosdp::{Channel, ChannelError};
use serialport::TTYPort;

const SOM: u8 = 0x53;
const MARK: u8 = 0xFF;
const BROADCAST: u8 = 0x7F;
/// The smallest and largest OSDP packet (SOM to CRC) accepted.
const MIN_FRAME: usize = 7;
const MAX_FRAME: usize = 1024;
/// A partial frame that has not grown for this long is dropped (one byte, then resync).
const STALE: Duration = Duration::from_millis(100);

/// Cuts a byte stream into OSDP frames: `(address, bytes)`, the bytes with their 0xFF mark when
/// the sender put one.
#[derive(Default)]
pub struct FrameSplitter {
    buf: Vec<u8>,
    last_rx: Option<Instant>,
}

impl FrameSplitter {
    pub fn feed(&mut self, data: &[u8], now: Instant) -> Vec<(u8, Vec<u8>)> {
        if !data.is_empty() {
            self.buf.extend_from_slice(data);
            self.last_rx = Some(now);
        }
        let mut out = Vec::new();
        loop {
            let Some(i) = self.buf.iter().position(|&b| b == SOM) else {
                let keep = usize::from(self.buf.last() == Some(&MARK));
                let n = self.buf.len() - keep;
                self.buf.drain(..n);
                break;
            };
            let mark = i > 0 && self.buf[i - 1] == MARK;
            let start = i - usize::from(mark);
            self.buf.drain(..start);
            let s = usize::from(mark);
            if self.buf.len() < s + 4 {
                break;
            }
            let len = usize::from(u16::from_le_bytes([self.buf[s + 2], self.buf[s + 3]]));
            if !(MIN_FRAME..=MAX_FRAME).contains(&len) {
                self.buf.drain(..=s); // not a frame start: resync after this SOM
                continue;
            }
            if self.buf.len() < s + len {
                break;
            }
            let frame: Vec<u8> = self.buf.drain(..s + len).collect();
            out.push((frame[s + 1], frame));
        }
        if let Some(t) = self.last_rx
            && !self.buf.is_empty()
            && now.saturating_duration_since(t) > STALE
        {
            self.buf.remove(0);
            self.last_rx = Some(now);
            out.extend(self.feed(&[], now));
        }
        out
    }
}

/// Whether a frame sent to `to` reaches the PD at `address` (replies, 0x80 set, reach none).
pub fn reaches(to: u8, address: u8) -> bool {
    to & 0x80 == 0 && (to == BROADCAST || to == address)
}

/// One PD's side of the line: reads what was routed to it, writes to the PTY.
pub struct PdChannel {
    id: i32,
    pub inbox: Arc<Mutex<VecDeque<u8>>>,
    out: TTYPort,
}

impl PdChannel {
    pub fn new(id: i32, out: TTYPort) -> PdChannel {
        PdChannel {
            id,
            inbox: Arc::default(),
            out,
        }
    }
}

impl Channel for PdChannel {
    fn get_id(&self) -> i32 {
        self.id
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChannelError> {
        let mut q = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        if q.is_empty() {
            return Err(ChannelError::WouldBlock);
        }
        let n = buf.len().min(q.len());
        for (b, x) in buf.iter_mut().zip(q.drain(..n)) {
            *b = x;
        }
        Ok(n)
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, ChannelError> {
        match self.out.write(buf) {
            Ok(n) => Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                Err(ChannelError::WouldBlock)
            }
            Err(_) => Err(ChannelError::TransportError),
        }
    }

    fn flush(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }

    fn close(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }
}

/// Reads what gatehouse sent and hands each frame to the inboxes of the PDs it reaches
/// (`(address, inbox)`); returns whether any byte came in.
pub fn route(
    master: &mut TTYPort,
    splitter: &mut FrameSplitter,
    pds: &[(u8, Arc<Mutex<VecDeque<u8>>>)],
) -> std::io::Result<bool> {
    let mut chunk = [0u8; 512];
    let n = match master.read(&mut chunk) {
        Ok(n) => n,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::Interrupted
            ) =>
        {
            0
        }
        Err(e) => return Err(e),
    };
    for (to, frame) in splitter.feed(&chunk[..n], Instant::now()) {
        for (address, inbox) in pds {
            if reaches(to, *address) {
                inbox
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(frame.iter().copied());
            }
        }
    }
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(addr: u8, body: &[u8]) -> Vec<u8> {
        let len = (5 + body.len() + 2) as u16;
        let mut f = vec![SOM, addr];
        f.extend_from_slice(&len.to_le_bytes());
        f.push(0x04);
        f.extend_from_slice(body);
        f.extend_from_slice(&[0xAA, 0xBB]);
        f
    }

    #[test]
    fn frames_are_cut_and_routed_by_address() {
        let t = Instant::now();
        let mut s = FrameSplitter::default();
        let a = frame(3, &[0x60]);
        let mut b = vec![MARK];
        b.extend(frame(0, &[0x61]));
        let mut wire = vec![0x00, 0x12];
        wire.extend(&a);
        wire.extend(&b);
        // In two pieces: the second frame completes later.
        let got = s.feed(&wire[..wire.len() - 3], t);
        assert_eq!(got, vec![(3, a.clone())]);
        let got = s.feed(&wire[wire.len() - 3..], t);
        assert_eq!(got, vec![(0, b.clone())]);
        assert!(reaches(3, 3) && reaches(0x7F, 3));
        assert!(!reaches(0, 3) && !reaches(0x83, 3));
    }

    #[test]
    fn garbage_and_stale_partials_are_dropped() {
        let t = Instant::now();
        let mut s = FrameSplitter::default();
        // A SOM with an impossible length, then a good frame.
        let mut wire = vec![SOM, 1, 0x00, 0x00];
        let good = frame(1, &[]);
        wire.extend(&good);
        assert_eq!(s.feed(&wire, t), vec![(1, good.clone())]);
        // A partial frame that never completes is dropped after STALE; the next one is cut.
        assert!(s.feed(&good[..4], t).is_empty());
        let later = t + STALE + Duration::from_millis(1);
        assert!(s.feed(&[], later).is_empty());
        assert_eq!(s.feed(&good, later), vec![(1, good.clone())]);
    }
}
