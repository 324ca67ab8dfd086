//! The facility's temporary daily code: one code, valid at every keypad for one facility-local
//! calendar day, derived from the site's secret and the local date so that it changes at local
//! midnight without the network. The cloud computes the same code to show it in the portal:
//!
//! ```text
//! mac  = HMAC-SHA256(key = secret, msg = "gatehouse-temporary-code-v1\0" || "YYYY-MM-DD")
//! code = big-endian u32 of mac[0..4] mod 1_000_000, as six digits with leading zeros
//! ```

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The code for a facility-local date.
pub fn code_for_date(secret: &[u8], date: NaiveDate) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes any key length");
    mac.update(b"gatehouse-temporary-code-v1\0");
    mac.update(date.format("%Y-%m-%d").to_string().as_bytes());
    let out = mac.finalize().into_bytes();
    let n = u32::from_be_bytes([out[0], out[1], out[2], out[3]]) % 1_000_000;
    format!("{n:06}")
}

/// The code in force at an instant, in the facility's time zone.
pub fn code_at(secret: &[u8], tz: Tz, at: DateTime<Utc>) -> String {
    code_for_date(secret, at.with_timezone(&tz).date_naive())
}

/// Constant-time comparison of a presented code with the day's code.
pub fn matches(secret: &[u8], tz: Tz, at: DateTime<Utc>, presented: &str) -> bool {
    use subtle::ConstantTimeEq;
    let expected = code_at(secret, tz, at);
    expected.len() == presented.len() && bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
}
