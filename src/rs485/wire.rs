//! What gatehouse itself parses from RS-485 devices: keypad keys into codes, Wiegand bits into
//! card numbers, raw reads into fob ids, and register words into readings. Pure functions over
//! bytes, no I/O, no panics on any input (fuzzed in `tests/fuzz_parsers.rs`). OSDP framing and
//! the secure channel are LibOSDP's; Modbus RTU framing is tokio-modbus's.

use std::time::{Duration, Instant};

use crate::sync::Card;

/// Longest code a keypad buffer keeps; further digits before `#` are dropped and the code is
/// submitted as too long (an unknown code: it counts towards the keypad's lockout).
pub const MAX_CODE_DIGITS: usize = 16;

/// What a key press did to the keypad buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// A digit was added (or dropped past [`MAX_CODE_DIGITS`]); nothing to decide yet.
    Pending,
    /// `#` ended a code.
    Submit(String),
    /// `*` cleared the buffer, or the inter-digit timeout expired before this key.
    Cleared,
    /// A key that is neither a digit, `*` nor `#` (ignored).
    Ignored(u8),
}

/// Assembles keypad digits into a code ending with `#`. `*` clears; a pause longer than the
/// inter-digit timeout discards what was typed before it.
#[derive(Debug, Clone)]
pub struct KeypadBuffer {
    digits: String,
    overflow: bool,
    last: Option<Instant>,
    timeout: Duration,
}

impl KeypadBuffer {
    pub fn new(inter_digit_timeout: Duration) -> Self {
        KeypadBuffer {
            digits: String::new(),
            overflow: false,
            last: None,
            timeout: inter_digit_timeout,
        }
    }

    /// Digits typed so far (for tests and logs: never logged in clear by the daemon).
    pub fn pending_len(&self) -> usize {
        self.digits.len()
    }

    fn clear(&mut self) {
        self.digits.clear();
        self.overflow = false;
    }

    /// Drops a stale partial code (the timeout passed since the last key). True if it did.
    pub fn expire(&mut self, now: Instant) -> bool {
        match self.last {
            Some(t)
                if !self.digits.is_empty() && now.saturating_duration_since(t) > self.timeout =>
            {
                self.clear();
                self.last = None;
                true
            }
            _ => false,
        }
    }

    /// One key. OSDP keypads send ASCII digits, and `*` / `#` either as ASCII or as 0x7F / 0x0D
    /// (SIA OSDP 2.2, KEYPAD reply).
    pub fn press(&mut self, key: u8, now: Instant) -> Key {
        let expired = self.expire(now);
        self.last = Some(now);
        match key {
            b'0'..=b'9' => {
                if self.digits.len() < MAX_CODE_DIGITS {
                    self.digits.push(key as char);
                } else {
                    self.overflow = true;
                }
                Key::Pending
            }
            b'*' | 0x7F => {
                self.clear();
                Key::Cleared
            }
            b'#' | 0x0D => {
                if self.digits.is_empty() {
                    return if expired { Key::Cleared } else { Key::Pending };
                }
                let mut code = std::mem::take(&mut self.digits);
                if self.overflow {
                    // Too long for any code: submit it so that it is refused and counted.
                    code.push('+');
                }
                self.clear();
                Key::Submit(code)
            }
            other => Key::Ignored(other),
        }
    }

    /// Several keys (one OSDP KEYPAD reply carries up to a few dozen); returns every submitted
    /// code in order.
    pub fn press_all(&mut self, keys: &[u8], now: Instant) -> Vec<String> {
        keys.iter()
            .filter_map(|&k| match self.press(k, now) {
                Key::Submit(c) => Some(c),
                _ => None,
            })
            .collect()
    }
}

/// Why card bits were not a card.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CardError {
    #[error("{bits}-bit Wiegand is not a supported format (26, 34, 37)")]
    Unsupported { bits: usize },
    #[error("{bits} bits announced but only {bytes} data bytes")]
    Short { bits: usize, bytes: usize },
    #[error("parity error in a {bits}-bit read")]
    Parity { bits: usize },
}

/// Bit `i` (0 = first bit on the wire) of MSB-first packed data.
fn bit(data: &[u8], i: usize) -> u8 {
    (data[i / 8] >> (7 - i % 8)) & 1
}

fn field(data: &[u8], from: usize, len: usize) -> u64 {
    (from..from + len).fold(0u64, |acc, i| (acc << 1) | bit(data, i) as u64)
}

fn ones(data: &[u8], from: usize, len: usize) -> u32 {
    (from..from + len).map(|i| bit(data, i) as u32).sum()
}

/// Decodes a raw Wiegand read (bits MSB-first, as OSDP RAW carries them):
/// - 26-bit H10301: even parity over bits 1–12, 8-bit facility code, 16-bit card number, odd
///   parity over bits 13–24;
/// - 34-bit: even parity over the first 16 data bits, 16-bit facility, 16-bit number, odd over
///   the last 16;
/// - 37-bit H10304: even parity over bits 1–18, 16-bit facility, 19-bit number, odd over 18–35.
pub fn wiegand(bits: usize, data: &[u8]) -> Result<Card, CardError> {
    let Some((fc_len, cn_len, parity_len)) = format(bits) else {
        return Err(CardError::Unsupported { bits });
    };
    if data.len() * 8 < bits {
        return Err(CardError::Short {
            bits,
            bytes: data.len(),
        });
    }
    let even_ok = (bit(data, 0) as u32 + ones(data, 1, parity_len)) % 2 == 0;
    let odd_ok =
        (ones(data, bits - 1 - parity_len, parity_len) + bit(data, bits - 1) as u32) % 2 == 1;
    if !even_ok || !odd_ok {
        return Err(CardError::Parity { bits });
    }
    Ok(Card {
        facility_code: Some(field(data, 1, fc_len) as u32),
        number: field(data, 1 + fc_len, cn_len),
    })
}

/// (facility bits, number bits, bits under each parity bit) of the supported formats. The even
/// parity bit leads and covers the first `parity` data bits; the odd one trails and covers the
/// last `parity` (in 37-bit H10304 the two ranges share the middle bit).
fn format(bits: usize) -> Option<(usize, usize, usize)> {
    match bits {
        26 => Some((8, 16, 12)),
        34 => Some((16, 16, 16)),
        37 => Some((16, 19, 18)),
        _ => None,
    }
}

/// Encodes a card as Wiegand bits (the inverse of [`wiegand`]; for simulators and tests).
pub fn wiegand_encode(bits: usize, facility: u32, number: u64) -> Option<Vec<u8>> {
    let (fc_len, cn_len, parity_len) = format(bits)?;
    if u64::from(facility) >> fc_len != 0 || number >> cn_len != 0 {
        return None;
    }
    let mut v: Vec<u8> = Vec::with_capacity(bits);
    v.push(0);
    v.extend((0..fc_len).rev().map(|i| ((facility >> i) & 1) as u8));
    v.extend((0..cn_len).rev().map(|i| ((number >> i) & 1) as u8));
    v.push(0);
    let first: u32 = v[1..1 + parity_len].iter().map(|&b| b as u32).sum();
    v[0] = (first % 2) as u8;
    let last: u32 = v[bits - 1 - parity_len..bits - 1]
        .iter()
        .map(|&b| b as u32)
        .sum();
    v[bits - 1] = ((last + 1) % 2) as u8;
    let mut out = vec![0u8; bits.div_ceil(8)];
    for (i, b) in v.iter().enumerate() {
        out[i / 8] |= b << (7 - i % 8);
    }
    Some(out)
}

/// A raw (format-unspecified) read: a fob or tag id. Printable ASCII is taken as it is (fob
/// tracking ids such as `FOB-A1B2C3`); anything else becomes upper-case hex. Empty or longer
/// than 64 bytes is refused.
pub fn raw_id(data: &[u8]) -> Option<String> {
    if data.is_empty() || data.len() > 64 {
        return None;
    }
    if data.iter().all(|b| b.is_ascii_graphic()) {
        return Some(String::from_utf8_lossy(data).into_owned());
    }
    Some(data.iter().map(|b| format!("{b:02X}")).collect())
}

/// How a register word becomes a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WordType {
    U16,
    I16,
}

/// A register word scaled to a reading (`scale` is e.g. 0.1 for tenths).
pub fn reading(word: u16, ty: WordType, scale: f64) -> f64 {
    let raw = match ty {
        WordType::U16 => f64::from(word),
        WordType::I16 => f64::from(word as i16),
    };
    // Round to the scale's resolution so that 0.1 steps print as 21.5, not 21.500000000000004.
    let v = raw * scale;
    let digits = (-scale.log10()).ceil().clamp(0.0, 6.0) as i32;
    let p = 10f64.powi(digits);
    (v * p).round() / p
}

/// Modbus RTU CRC-16 (polynomial 0xA001 reflected, initial 0xFFFF); sent low byte first.
pub fn modbus_crc(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// An RTU frame: address, function, data, CRC.
pub fn modbus_frame(addr: u8, function: u8, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(data.len() + 4);
    f.push(addr);
    f.push(function);
    f.extend_from_slice(data);
    let crc = modbus_crc(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

/// Why an answer to a hand-framed write was not its echo.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EchoError {
    #[error("exception {0}")]
    Exception(u8),
    #[error("CRC mismatch")]
    Crc,
    #[error("answer is not the echo of the request ({0} bytes)")]
    Mismatch(usize),
}

/// Checks the answer to a single-write request (FC05/06), which a device echoes; an exception
/// reply is address, function | 0x80, code, CRC.
pub fn check_echo(sent: &[u8], got: &[u8]) -> Result<(), EchoError> {
    if got.len() == 5 && sent.len() >= 2 && got[0] == sent[0] && got[1] == sent[1] | 0x80 {
        if modbus_crc(&got[..3]).to_le_bytes() != got[3..5] {
            return Err(EchoError::Crc);
        }
        return Err(EchoError::Exception(got[2]));
    }
    if got.len() >= 3 {
        let (body, crc) = got.split_at(got.len() - 2);
        if modbus_crc(body).to_le_bytes() != crc {
            return Err(EchoError::Crc);
        }
    }
    if got != sent {
        return Err(EchoError::Mismatch(got.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_ends_with_hash_and_star_clears() {
        let t0 = Instant::now();
        let mut k = KeypadBuffer::new(Duration::from_secs(5));
        assert_eq!(k.press_all(b"12*123456#", t0), vec!["123456".to_string()]);
        assert_eq!(k.press_all(b"#", t0), Vec::<String>::new());
        // OSDP's own codes for * and #.
        assert_eq!(k.press_all(&[b'9', 0x7F, b'4', b'2', 0x0D], t0), vec!["42"]);
    }

    #[test]
    fn a_pause_discards_the_partial_code() {
        let t0 = Instant::now();
        let mut k = KeypadBuffer::new(Duration::from_secs(5));
        k.press_all(b"999", t0);
        let later = t0 + Duration::from_secs(6);
        assert_eq!(k.press_all(b"123#", later), vec!["123".to_string()]);
        k.press_all(b"55", later);
        assert!(k.expire(later + Duration::from_secs(6)));
        assert_eq!(k.pending_len(), 0);
    }

    #[test]
    fn an_overlong_code_is_submitted_marked() {
        let t0 = Instant::now();
        let mut k = KeypadBuffer::new(Duration::from_secs(5));
        let keys = [b'1'; 40].iter().copied().chain([b'#']).collect::<Vec<_>>();
        let codes = k.press_all(&keys, t0);
        assert_eq!(codes.len(), 1);
        assert_eq!(codes[0].len(), MAX_CODE_DIGITS + 1);
        assert!(codes[0].ends_with('+'));
    }

    #[test]
    fn wiegand_26_known_vector() {
        // FC 12, card 34567: the demo site's card.
        let data = wiegand_encode(26, 12, 34567).unwrap();
        assert_eq!(
            wiegand(26, &data),
            Ok(Card {
                facility_code: Some(12),
                number: 34567
            })
        );
        // A textbook H10301 read: FC 1, card 1 is 0 00000001 0000000000000001 0 → parity
        // bits: even over 00000001 0000 (one 1) = 1; odd over 000000000001 (one 1) = 0.
        let bits = "10000000100000000000000010";
        let mut packed = vec![0u8; 4];
        for (i, c) in bits.bytes().enumerate() {
            packed[i / 8] |= (c - b'0') << (7 - i % 8);
        }
        assert_eq!(
            wiegand(26, &packed),
            Ok(Card {
                facility_code: Some(1),
                number: 1
            })
        );
        packed[0] ^= 0x80;
        assert_eq!(wiegand(26, &packed), Err(CardError::Parity { bits: 26 }));
    }

    #[test]
    fn wiegand_34_and_37_round_trip() {
        for (bits, fc, n) in [
            (34, 65535, 65535),
            (34, 7, 1),
            (37, 1234, 524_287),
            (37, 0, 0),
        ] {
            let d = wiegand_encode(bits, fc, n).unwrap();
            assert_eq!(
                wiegand(bits, &d),
                Ok(Card {
                    facility_code: Some(fc),
                    number: n
                })
            );
        }
        assert_eq!(
            wiegand(35, &[0; 5]),
            Err(CardError::Unsupported { bits: 35 })
        );
        assert_eq!(
            wiegand(26, &[0; 3]),
            Err(CardError::Short { bits: 26, bytes: 3 })
        );
    }

    #[test]
    fn raw_ids() {
        assert_eq!(raw_id(b"FOB-A1B2C3").as_deref(), Some("FOB-A1B2C3"));
        assert_eq!(raw_id(&[0xDE, 0xAD, 0x01]).as_deref(), Some("DEAD01"));
        assert_eq!(raw_id(&[]), None);
    }

    #[test]
    fn modbus_frames() {
        // Waveshare's documented "relay 0 flash on for 700 ms": 01 05 02 00 00 07 8D B0.
        let f = modbus_frame(1, 5, &[0x02, 0x00, 0x00, 0x07]);
        assert_eq!(f, [0x01, 0x05, 0x02, 0x00, 0x00, 0x07, 0x8D, 0xB0]);
        assert_eq!(check_echo(&f, &f), Ok(()));
        let mut bad = f.clone();
        bad[6] ^= 1;
        assert_eq!(check_echo(&f, &bad), Err(EchoError::Crc));
        let ex = modbus_frame(1, 0x85, &[0x02]);
        assert_eq!(check_echo(&f, &ex), Err(EchoError::Exception(2)));
        assert!(check_echo(&f, &[]).is_err());
    }

    #[test]
    fn readings_scale() {
        assert_eq!(reading(215, WordType::I16, 0.1), 21.5);
        assert_eq!(reading(0xFF9C, WordType::I16, 0.1), -10.0);
        assert_eq!(reading(0xFF9C, WordType::U16, 1.0), 65436.0);
    }
}
