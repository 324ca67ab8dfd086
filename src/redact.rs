//! Refusal text that never quotes a secret. A refusal reason, an event, a log line or a result
//! built from input from a wire or a file names *where* (a path such as `credentials[3].code`),
//! *what was expected* and *what kind of value was found* (`a number`, `a string`), never the
//! value itself: the input may carry keypad codes, card numbers, fob ids, keys or secrets in any
//! field, under any name, in any shape (a number where a string was expected, a whole snapshot
//! double-encoded into one string).
//!
//! Names from the input (an unknown field, an unknown variant) are shown only when they look like
//! a field name (`[a-z_]`, at most 40); anything else is `(not shown)`. Identifiers that must be
//! quoted (a record id, a command's site) go through [`excerpt`], which cuts them short and marks
//! the cut. Nothing here quotes the value of a field.

use std::fmt::Write as _;

/// Longest excerpt quoted from input, in characters.
pub const EXCERPT_CHARS: usize = 32;

/// A short, marked, printable quotation of an identifier from input: `` `A-101` ``, or the first
/// characters followed by `…` and the full length (`` `aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa…` (300
/// bytes) ``). Control characters are escaped. For identifiers only: never for a credential value.
pub fn excerpt(s: &str) -> String {
    let mut out = String::from("`");
    for (n, c) in s.chars().enumerate() {
        if n == EXCERPT_CHARS {
            let _ = write!(out, "…` ({} bytes)", s.len());
            return out;
        }
        if c.is_control() || c == '`' {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    out.push('`');
    out
}

/// `msg` with every `` `quoted` `` part cut to a short [`excerpt`] (long identifiers from input,
/// control characters). For messages that quote identifiers (record ids, times) between
/// backticks and never a credential value.
pub fn cut_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len().min(512));
    let mut parts = msg.split('`');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    let mut inside = true;
    let rest: Vec<&str> = parts.collect();
    let n = rest.len();
    for (i, part) in rest.into_iter().enumerate() {
        if inside && i + 1 < n {
            out.push_str(&excerpt(part));
        } else if inside {
            // An unpaired backtick: keep the text after it, cut.
            out.push('`');
            out.push_str(&excerpt(part)[1..]);
            out.pop();
        } else {
            out.push_str(part);
        }
        inside = !inside;
    }
    out
}

/// True for what may be quoted as a name: lowercase letters and `_`, 1 to 40 of them (field
/// names and enum words of the contract; never a code, a card number, a hex key or a fob id,
/// which all hold digits).
pub fn is_plain_name(s: &str) -> bool {
    (1..=40).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// `` `name` `` when [`is_plain_name`], else `(not shown)`.
pub fn name(s: &str) -> String {
    if is_plain_name(s) {
        format!("`{s}`")
    } else {
        "(not shown)".to_string()
    }
}

/// The path of a serde error, e.g. `credentials[3].code`, with names that are not plain shown as
/// `?`. Empty for the document itself.
pub fn path(p: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in p.iter() {
        match seg {
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
            }
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(if is_plain_name(key) { key } else { "?" });
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

/// The kind of value in serde's `Unexpected` text (`integer `5``, `string "x"`, `map`), as
/// words, without the value.
fn found(unexpected: &str) -> &'static str {
    let u = unexpected.trim();
    let starts = |p: &str| u.starts_with(p);
    if starts("boolean") {
        "a boolean"
    } else if starts("integer") || starts("floating point") {
        "a number"
    } else if starts("string") || starts("character") {
        "a string"
    } else if starts("sequence") || starts("byte array") {
        "an array"
    } else if starts("map") {
        "an object"
    } else if starts("null") || starts("unit") || starts("Option") {
        "null"
    } else {
        "another kind of value"
    }
}

/// Serde's "expected ..." text comes from the gateway's own types, never from input; still cut
/// it short and keep it printable.
fn expected(e: &str) -> String {
    let e: String = e.chars().filter(|c| !c.is_control()).take(160).collect();
    e
}

/// A description of a JSON error that quotes no value of the input: what was expected and what
/// kind of value was found (`expected a string, found a number`), or the syntax problem.
pub fn serde_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    // serde_json appends " at line L column C"; the caller reports the position itself.
    let m = match full.rfind(" at line ") {
        Some(i) => &full[..i],
        None => full.as_str(),
    };
    describe(m, e.is_syntax() || e.is_eof())
}

fn describe(m: &str, syntax: bool) -> String {
    let split_expected = |rest: &str| -> (String, Option<String>) {
        match rest.split_once(", expected ") {
            Some((u, x)) => (u.to_string(), Some(expected(x))),
            None => (rest.to_string(), None),
        }
    };
    if let Some(rest) = m.strip_prefix("invalid type: ") {
        let (u, x) = split_expected(rest);
        return match x {
            Some(x) => format!("expected {x}, found {}", found(&u)),
            None => format!("found {}", found(&u)),
        };
    }
    if let Some(rest) = m.strip_prefix("invalid value: ") {
        let (u, x) = split_expected(rest);
        return match x {
            Some(x) => format!("expected {x}, found {} that is not one", found(&u)),
            None => format!("{} of the wrong form", found(&u)),
        };
    }
    if let Some(rest) = m.strip_prefix("invalid length ") {
        // "invalid length 3, expected ..." : a length, not a value.
        let (n, x) = split_expected(rest);
        let n: String = n.chars().filter(char::is_ascii_digit).take(20).collect();
        return match x {
            Some(x) => format!("invalid length {n}, expected {x}"),
            None => format!("invalid length {n}"),
        };
    }
    for (prefix, what) in [
        ("unknown field `", "unknown field"),
        ("unknown variant `", "unknown value"),
        ("missing field `", "missing field"),
        ("duplicate field `", "duplicate field"),
    ] {
        if let Some(rest) = m.strip_prefix(prefix) {
            let (quoted, tail) = rest.split_once('`').unwrap_or((rest, ""));
            let tail = tail
                .strip_prefix(", expected ")
                .map(|x| format!(", expected {}", expected(x)))
                .unwrap_or_default();
            return format!("{what} {}{tail}", name(quoted));
        }
    }
    // serde_json's syntax messages ("expected value", "EOF while parsing a string", "trailing
    // characters", ...) name no input; other messages (from deserializers of times, numbers)
    // are kept only when they quote nothing.
    if syntax || !(m.contains('`') || m.contains('"') || m.contains('\'')) {
        return m.chars().filter(|c| !c.is_control()).take(160).collect();
    }
    "a value of the wrong form".to_string()
}

/// [`serde_message`] with the path, for an error from `serde_path_to_error`:
/// `credentials[3].code: expected a string, found a number`.
pub fn serde_with_path(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let p = path(e.path());
    let m = serde_message(e.inner());
    if p.is_empty() || p == "?" {
        m
    } else {
        format!("{p}: {m}")
    }
}

/// [`serde_message`] of a plain serde_json error (no path known).
pub fn serde(e: &serde_json::Error) -> String {
    serde_message(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Cred {
        code: Option<String>,
        role: Option<Role>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Role {
        Tenant,
    }
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Doc {
        credentials: Vec<Cred>,
    }

    fn err(json: &str) -> String {
        let de = &mut serde_json::Deserializer::from_str(json);
        serde_with_path(&serde_path_to_error::deserialize::<_, Doc>(de).unwrap_err())
    }

    #[test]
    fn no_value_is_quoted() {
        let cases = [
            (
                r#"{"credentials":[{"code":987654}]}"#,
                "credentials[0].code: expected a string, found a number",
            ),
            (
                r#"{"credentials":[{"code":true}]}"#,
                "credentials[0].code: expected a string, found a boolean",
            ),
            (
                r#"{"credentials":[{"code":["987654"]}]}"#,
                "credentials[0].code: expected a string, found an array",
            ),
            (
                r#"{"credentials":[{"code":{"v":"987654"}}]}"#,
                "credentials[0].code: expected a string, found an object",
            ),
            (
                r#"{"credentials":[{"pin":"987654"}]}"#,
                "credentials[0].pin: unknown field `pin`, expected `code` or `role`",
            ),
            (
                r#"{"credentials":[{"987654":"x"}]}"#,
                "credentials[0].?: unknown field (not shown), expected `code` or `role`",
            ),
            (
                r#"{"credentials":[{"role":"987654"}]}"#,
                "credentials[0].role: unknown value (not shown), expected `tenant`",
            ),
            (
                r#""{\"credentials\":[{\"code\":\"987654\"}]}""#,
                "expected struct Doc, found a string",
            ),
        ];
        for (json, want) in cases {
            let got = err(json);
            assert!(!got.contains("987654"), "{got}");
            assert_eq!(got, want, "for {json}");
        }
    }

    #[test]
    fn quoted_parts_are_cut() {
        let long = "y".repeat(100);
        let m = cut_quoted(&format!("user `{long}` appears twice, see `a`"));
        assert_eq!(
            m,
            format!(
                "user `{}…` (100 bytes) appears twice, see `a`",
                "y".repeat(32)
            )
        );
        assert_eq!(cut_quoted("no quotes"), "no quotes");
    }

    #[test]
    fn excerpts_are_short_and_marked() {
        assert_eq!(excerpt("A-101"), "`A-101`");
        let long = "x".repeat(300);
        let e = excerpt(&long);
        assert!(e.ends_with("…` (300 bytes)"), "{e}");
        assert!(e.len() < 60);
        assert_eq!(excerpt("a\nb"), "`a\\u{a}b`");
    }
}
