//! Fuzzing what comes off the RS-485 wires: keypad keys, Wiegand bits, raw reads, Modbus echoes
//! and requests (the simulated board's parser), device profiles, and whole OSDP replies fed to
//! LibOSDP's control panel (its framing and reply parsing, and the `libosdp` crate's event
//! conversion that hands card and key data to gatehouse), and the replies install mode reads
//! from unconfigured PDs (`rs485::pairing`). Nothing may panic or abort; good
//! input must still come out right. `FUZZ_CASES=200000 cargo test --release --test fuzz_rs485`
//! runs longer.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gatehouse::rs485::profile::{BUILTIN, Profile};
use gatehouse::rs485::sim::{BoardState, request_len};
use gatehouse::rs485::wire::{self, KeypadBuffer, MAX_CODE_DIGITS};
use libosdp::{Channel, ChannelError, ControlPanelBuilder, PdInfoBuilder};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000)
}

/// OSDP CRC-16 (poly 0x1021, init 0x1D0F), sent low byte first.
fn osdp_crc(data: &[u8]) -> u16 {
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

/// A PD reply frame with a correct CRC: SOM, address | 0x80, length, control (sequence, CRC
/// flag), reply code, data.
fn reply(addr: u8, seq: u8, code: u8, data: &[u8]) -> Vec<u8> {
    let len = (data.len() + 8) as u16;
    let mut f = vec![0x53, addr | 0x80];
    f.extend_from_slice(&len.to_le_bytes());
    f.push((seq & 3) | 0x04);
    f.push(code);
    f.extend_from_slice(data);
    let crc = osdp_crc(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

/// An in-memory channel: what the CP reads comes from `input`; what it writes is dropped.
struct Wire {
    input: Arc<Mutex<VecDeque<u8>>>,
}

impl Channel for Wire {
    fn get_id(&self) -> i32 {
        0
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChannelError> {
        let mut q = self.input.lock().unwrap();
        let n = buf.len().min(q.len());
        for b in buf.iter_mut().take(n) {
            *b = q.pop_front().unwrap();
        }
        if n == 0 {
            Err(ChannelError::WouldBlock)
        } else {
            Ok(n)
        }
    }
    fn write(&mut self, buf: &[u8]) -> Result<usize, ChannelError> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }
    fn close(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }
}

#[test]
fn osdp_crc_matches_the_protocol_vector() {
    // PROTOCOLS.md: 53 7F 0D 00 04 6E 00 80 25 00 00 → 6E 38.
    let c = osdp_crc(&[
        0x53, 0x7F, 0x0D, 0x00, 0x04, 0x6E, 0x00, 0x80, 0x25, 0x00, 0x00,
    ]);
    assert_eq!(c.to_le_bytes(), [0x6E, 0x38]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn keypad_keys_never_panic_and_codes_stay_bounded(
        keys in prop::collection::vec((any::<u8>(), 0u64..8000), 0..200)
    ) {
        let t0 = Instant::now();
        let mut k = KeypadBuffer::new(Duration::from_secs(5));
        let mut t = t0;
        for (key, dt) in keys {
            t += Duration::from_millis(dt);
            k.expire(t);
            if let wire::Key::Submit(code) = k.press(key, t) {
                prop_assert!(!code.is_empty() && code.len() <= MAX_CODE_DIGITS + 1);
                prop_assert!(code.bytes().all(|b| b.is_ascii_digit() || b == b'+'));
            }
            prop_assert!(k.pending_len() <= MAX_CODE_DIGITS);
        }
    }

    #[test]
    fn wiegand_never_panics_and_round_trips(
        bits in 0usize..600,
        data in prop::collection::vec(any::<u8>(), 0..80),
        fc in any::<u32>(),
        number in any::<u64>(),
        format in prop::sample::select(vec![26usize, 34, 37]),
    ) {
        let _ = wire::wiegand(bits, &data);
        let _ = wire::raw_id(&data);
        let (fc_bits, cn_bits) = match format { 26 => (8, 16), 34 => (16, 16), _ => (16, 19) };
        let (fc, number) = (fc & ((1 << fc_bits) - 1), number & ((1 << cn_bits) - 1));
        let packed = wire::wiegand_encode(format, fc, number).unwrap();
        let card = wire::wiegand(format, &packed).unwrap();
        prop_assert_eq!(card.facility_code, Some(fc));
        prop_assert_eq!(card.number, number);
        // Any single flipped bit is caught by a parity bit or changes the card.
        let mut flipped = packed.clone();
        let i = (number as usize) % format;
        flipped[i / 8] ^= 0x80 >> (i % 8);
        if let Ok(c) = wire::wiegand(format, &flipped) {
            prop_assert!(c != card);
        }
    }

    #[test]
    fn modbus_answers_and_requests_never_panic(
        sent in prop::collection::vec(any::<u8>(), 0..16),
        got in prop::collection::vec(any::<u8>(), 0..16),
        pdu in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let _ = wire::check_echo(&sent, &got);
        let _ = request_len(&pdu);
        let mut board = BoardState::default();
        let (reply, _) = board.handle(&pdu, Instant::now());
        prop_assert!(!reply.is_empty() && reply.len() <= 253);
        let _ = board.tick(Instant::now() + Duration::from_secs(7000));
    }

    #[test]
    fn install_mode_probe_replies_never_panic(
        noise in proptest::collection::vec(any::<u8>(), 0..64),
        addr in 0u8..0x7F,
        code in any::<u8>(),
        data in proptest::collection::vec(any::<u8>(), 0..40),
        cut in any::<usize>(),
    ) {
        use gatehouse::rs485::pairing::{Parsed, osdp_parse, pdcap_json, pdcap_secure, pdid_json};
        // Junk, and a good reply behind junk, cut anywhere.
        let _ = osdp_parse(&noise);
        let good = reply(addr, 0, code, &data);
        let mut wire: Vec<u8> = noise.iter().copied().filter(|&b| b != 0x53).collect();
        wire.extend_from_slice(&good);
        let parsed = osdp_parse(&wire);
        if good[4] & 0x08 == 0 {
            prop_assert_eq!(parsed, Parsed::Reply(gatehouse::rs485::pairing::Reply {
                address: addr, code, data: data.clone() }));
        }
        let _ = osdp_parse(&wire[..cut % (wire.len() + 1)]);
        let _ = pdid_json(&data);
        let _ = pdcap_secure(&pdcap_json(&data));
    }

    #[test]
    fn device_profiles_never_panic(
        which in 0..BUILTIN.len(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let (file, text) = BUILTIN[which];
        let mut bytes = text.as_bytes().to_vec();
        for (pos, b) in edits {
            let pos = pos % bytes.len();
            bytes[pos] = b;
        }
        let _ = Profile::parse(file, &String::from_utf8_lossy(&bytes));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: (cases() / 20).max(50), failure_persistence: None, ..ProptestConfig::default() })]

    /// Random bytes and CRC-correct replies of every reply code with random data, fed to a
    /// LibOSDP control panel polling one PD.
    #[test]
    fn osdp_replies_never_crash_the_control_panel(
        noise in prop::collection::vec(any::<u8>(), 0..300),
        frames in prop::collection::vec(
            (prop::sample::select(vec![0x40u8, 0x41, 0x45, 0x46, 0x48, 0x49, 0x4A, 0x50, 0x51, 0x53, 0x54, 0x76, 0x78, 0x79, 0x90, 0xB1]),
             0u8..4,
             prop::collection::vec(any::<u8>(), 0..120)),
            1..12),
    ) {
        let input = Arc::new(Mutex::new(VecDeque::new()));
        let pd = PdInfoBuilder::new().name("fuzz").unwrap().address(1).unwrap().baud_rate(9600).unwrap();
        let mut cp = ControlPanelBuilder::new()
            .add_channel(Box::new(Wire { input: input.clone() }), vec![pd])
            .build()
            .unwrap();
        let events = Arc::new(Mutex::new(0usize));
        let ev = events.clone();
        cp.set_event_callback(move |_, _| { *ev.lock().unwrap() += 1; 0 });
        input.lock().unwrap().extend(noise);
        for (code, seq, data) in frames {
            cp.refresh();
            input.lock().unwrap().extend(reply(1, seq, code, &data));
            cp.refresh();
        }
        for _ in 0..5 {
            cp.refresh();
        }
        let _ = cp.is_online(0);
    }
}
