//! The size bound of an event record: every record appended is at most [`MAX_RECORD_BYTES`] of
//! JSON. An event over it is cut, never refused: strings longer than [`MAX_STRING_BYTES`] become
//! their first [`EXCERPT_BYTES`] followed by `…[cut, <original bytes> bytes]`; if the record is
//! still too big, its payload becomes `{"truncated": true, "original_bytes": N}` plus those of
//! the payload's top-level fields that are small and fit.

use serde_json::{Map, Value};

use super::Event;

/// The largest record appended, in bytes of JSON (the MQTT message adds `id` and `historical`).
pub const MAX_RECORD_BYTES: usize = 16 * 1024;
/// Strings longer than this are cut when a record is over [`MAX_RECORD_BYTES`].
pub const MAX_STRING_BYTES: usize = 512;
/// What is kept of a cut string (at most; cut on a character boundary).
pub const EXCERPT_BYTES: usize = 256;
/// A top-level payload field is kept in the marker payload only if it is at most this big.
const MAX_KEPT_FIELD_BYTES: usize = 1024;

/// The record's JSON, within [`MAX_RECORD_BYTES`].
pub(super) fn encode(ev: &Event) -> serde_json::Result<Vec<u8>> {
    let v = serde_json::to_vec(ev)?;
    if v.len() <= MAX_RECORD_BYTES {
        return Ok(v);
    }
    let original = v.len();
    let cut = Event {
        local: cut_str(&ev.local),
        payload: cut_strings(&ev.payload),
        ..ev.clone()
    };
    let v = serde_json::to_vec(&cut)?;
    if v.len() <= MAX_RECORD_BYTES {
        return Ok(v);
    }
    let mut marker = Map::new();
    marker.insert("truncated".into(), Value::Bool(true));
    marker.insert("original_bytes".into(), original.into());
    let mut out = Event {
        payload: Value::Object(marker.clone()),
        ..cut.clone()
    };
    let mut size = serde_json::to_vec(&out)?.len();
    if let Value::Object(fields) = &cut.payload {
        for (k, val) in fields {
            if marker.contains_key(k) || k.len() > MAX_STRING_BYTES {
                continue;
            }
            // `"key":value,` — the key's quotes, colon and comma.
            let add = k.len() + serde_json::to_vec(val)?.len() + 4;
            if add <= MAX_KEPT_FIELD_BYTES && size + add <= MAX_RECORD_BYTES {
                marker.insert(k.clone(), val.clone());
                size += add;
            }
        }
    }
    out.payload = Value::Object(marker);
    serde_json::to_vec(&out)
}

fn cut_str(s: &str) -> String {
    if s.len() <= MAX_STRING_BYTES {
        return s.to_string();
    }
    let mut end = EXCERPT_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[cut, {} bytes]", &s[..end], s.len())
}

fn cut_strings(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(cut_str(s)),
        Value::Array(a) => Value::Array(a.iter().map(cut_strings).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), cut_strings(v))).collect())
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use serde_json::json;

    fn ev(payload: Value) -> Event {
        Event {
            seq: 7,
            at: Utc::now(),
            local: "2026-11-23T10:00:00-05:00".into(),
            kind: "sync_refused".into(),
            payload,
        }
    }

    #[test]
    fn a_small_record_is_untouched() {
        let e = ev(json!({"reason": "x".repeat(2_000)}));
        assert_eq!(encode(&e).unwrap(), serde_json::to_vec(&e).unwrap());
    }

    #[test]
    fn long_strings_are_cut_to_a_marked_excerpt() {
        let e = ev(json!({"reason": "é".repeat(20_000), "version": 12, "ok": "short"}));
        let v = encode(&e).unwrap();
        assert!(v.len() <= MAX_RECORD_BYTES);
        let back: Event = serde_json::from_slice(&v).unwrap();
        let reason = back.payload["reason"].as_str().unwrap();
        assert!(reason.ends_with("…[cut, 40000 bytes]"), "{reason}");
        assert!(reason.starts_with("éé"));
        assert_eq!(back.payload["version"], 12);
        assert_eq!(back.payload["ok"], "short");
    }

    #[test]
    fn a_record_still_too_big_gets_a_marker_payload_with_the_fields_that_fit() {
        let many: Vec<String> = (0..2_000).map(|i| format!("value {i}")).collect();
        let e = ev(json!({"items": many, "version": 3, "reason": "y".repeat(600)}));
        let original = serde_json::to_vec(&e).unwrap().len();
        let v = encode(&e).unwrap();
        assert!(v.len() <= MAX_RECORD_BYTES, "{}", v.len());
        let back: Event = serde_json::from_slice(&v).unwrap();
        assert_eq!(back.payload["truncated"], true);
        assert_eq!(back.payload["original_bytes"], original);
        assert_eq!(back.payload["version"], 3);
        assert!(back.payload.get("items").is_none());
        assert!(
            back.payload["reason"]
                .as_str()
                .unwrap()
                .contains("[cut, 600 bytes]")
        );
        assert_eq!((back.seq, back.kind.as_str()), (7, "sync_refused"));
    }

    #[test]
    fn a_huge_non_object_payload_is_bounded_too() {
        let e = ev(json!([vec!["a"; 10_000]]));
        let v = encode(&e).unwrap();
        assert!(v.len() <= MAX_RECORD_BYTES);
        let back: Event = serde_json::from_slice(&v).unwrap();
        assert_eq!(back.payload["truncated"], true);
    }
}
