//! A sync message read for applying ([`parse_for_apply`]): the same JSON, the same checks and
//! the same refusals as [`super::parse`], but a snapshot's credentials are read straight into a
//! compact form ([`CompactCredential`], in blocks) instead of a `Vec` of wire records.
//!
//! Why: a million-credential snapshot read as [`Credential`]s (six strings and a card each) is
//! about 260 MiB; compact, with each user id shared between that user's credentials, about
//! 100 MiB, and it is handed over block by block, each block freed once turned into the site's
//! records (the strings themselves move, they are not copied). The gateway holds the old site,
//! the message and the new site at once while it applies a snapshot, so this is what bounds its
//! peak memory (see `gatehouse-bench outbox`, `snapshot_replace_peak_mb`).

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{SeqAccess, Visitor};

use super::{
    BlacklistEntry, Card, Credential, Delta, Device, Entry, Facility, ParseError, Schedule, Share,
    Snapshot, SnapshotKind, Transfer, Unit, User, Zone,
};

/// Credentials per block of a [`CredentialList`].
const BLOCK: usize = 16_384;

/// A sync message as read by [`parse_for_apply`].
#[derive(Debug)]
pub enum Incoming {
    Snapshot(Box<IncomingSnapshot>),
    Delta(Box<Delta>),
}

impl Incoming {
    pub fn version(&self) -> u64 {
        match self {
            Incoming::Snapshot(s) => s.small.version,
            Incoming::Delta(d) => d.version,
        }
    }
}

/// A snapshot as read for applying.
#[derive(Debug)]
pub struct IncomingSnapshot {
    /// The snapshot without its credentials (`small.credentials` is empty).
    pub small: Snapshot,
    pub credentials: CredentialList,
}

impl IncomingSnapshot {
    /// A wire snapshot turned into this form (its small tables cloned).
    pub fn from_wire(s: &Snapshot) -> Self {
        let mut list = CredentialList::default();
        let mut users = Interner::default();
        for c in &s.credentials {
            list.push(CompactCredential::from_wire(c.clone(), &mut users));
        }
        let small = Snapshot {
            schema_version: s.schema_version,
            kind: s.kind,
            version: s.version,
            code_key_id: s.code_key_id.clone(),
            facility: s.facility.clone(),
            zones: s.zones.clone(),
            schedules: s.schedules.clone(),
            entries: s.entries.clone(),
            units: s.units.clone(),
            users: s.users.clone(),
            credentials: Vec::new(),
            shares: s.shares.clone(),
            transfers: s.transfers.clone(),
            blacklist: s.blacklist.clone(),
            devices: s.devices.clone(),
        };
        IncomingSnapshot {
            small,
            credentials: list,
        }
    }
}

/// A [`Credential`] in compact form: the same content, one variant for its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactCredential {
    pub id: Box<str>,
    /// Shared by the credentials of one user within a message.
    pub user: Arc<str>,
    pub value: CredentialValue,
}

/// Which of `code`, `code_hmac`, `fob`, `card`, `key_id` a credential named, as sent (empty
/// strings included: the site refuses them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialValue {
    /// A keypad code in clear (hashed by the site, never stored).
    Code(Box<str>),
    CodeHmac(Box<str>),
    Fob(Box<str>),
    Card(Card),
    KeyId(Box<str>),
    /// None of them, or more than one (refused by the site).
    NotExactlyOne,
}

/// Shares one `Arc<str>` between equal user ids.
#[derive(Default)]
struct Interner(hashbrown::HashSet<Arc<str>>);

impl Interner {
    fn get(&mut self, s: String) -> Arc<str> {
        if let Some(a) = self.0.get(s.as_str()) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.0.insert(a.clone());
        a
    }
}

impl CompactCredential {
    fn from_wire(c: Credential, users: &mut Interner) -> Self {
        let b = |s: String| s.into_boxed_str();
        let value = match (c.code, c.code_hmac, c.fob, c.card, c.key_id) {
            (Some(x), None, None, None, None) => CredentialValue::Code(b(x)),
            (None, Some(x), None, None, None) => CredentialValue::CodeHmac(b(x)),
            (None, None, Some(x), None, None) => CredentialValue::Fob(b(x)),
            (None, None, None, Some(x), None) => CredentialValue::Card(x),
            (None, None, None, None, Some(x)) => CredentialValue::KeyId(b(x)),
            _ => CredentialValue::NotExactlyOne,
        };
        CompactCredential {
            id: c.id.into_boxed_str(),
            user: users.get(c.user),
            value,
        }
    }

    /// A wire credential in compact form (for a delta's few credentials).
    pub fn from_credential(c: &Credential) -> Self {
        Self::from_wire(c.clone(), &mut Interner::default())
    }
}

/// Compact credentials in blocks of at most [`BLOCK`], in document order.
#[derive(Debug, Default)]
pub struct CredentialList {
    blocks: Vec<Vec<CompactCredential>>,
    len: usize,
}

impl CredentialList {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, c: CompactCredential) {
        match self.blocks.last_mut() {
            Some(b) if b.len() < BLOCK => b.push(c),
            _ => {
                let mut b = Vec::with_capacity(BLOCK);
                b.push(c);
                self.blocks.push(b);
            }
        }
        self.len += 1;
    }

    /// The credentials in document order; each block is freed once its last one is taken.
    pub fn into_iter_freeing(self) -> impl Iterator<Item = CompactCredential> {
        self.blocks.into_iter().flatten()
    }
}

/// Reads a JSON array of [`Credential`]s (each checked exactly as the wire type is) into a
/// [`CredentialList`], one record at a time.
struct ListVisitor;

impl<'de> Visitor<'de> for ListVisitor {
    type Value = CredentialList;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        // What serde says for a `Vec`, so that a refusal reads the same as with [`super::parse`].
        f.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<CredentialList, A::Error> {
        let mut list = CredentialList::default();
        let mut users = Interner::default();
        while let Some(c) = seq.next_element::<Credential>()? {
            list.push(CompactCredential::from_wire(c, &mut users));
        }
        Ok(list)
    }
}

impl<'de> Deserialize<'de> for CredentialList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(ListVisitor)
    }
}

/// [`Snapshot`] field for field (same names, order, defaults and `deny_unknown_fields`, so the
/// same document is accepted or refused with the same message), credentials compact.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    schema_version: u32,
    kind: SnapshotKind,
    version: u64,
    #[serde(default)]
    code_key_id: Option<String>,
    facility: Facility,
    #[serde(default)]
    zones: Vec<Zone>,
    #[serde(default)]
    schedules: Vec<Schedule>,
    #[serde(default)]
    entries: Vec<Entry>,
    #[serde(default)]
    units: Vec<Unit>,
    #[serde(default)]
    users: Vec<User>,
    #[serde(default)]
    credentials: CredentialList,
    #[serde(default)]
    shares: Vec<Share>,
    #[serde(default)]
    transfers: Vec<Transfer>,
    #[serde(default)]
    blacklist: Vec<BlacklistEntry>,
    #[serde(default)]
    devices: Vec<Device>,
}

/// [`super::parse`] for applying: the same header check first, the same refusals, a snapshot's
/// credentials compact.
pub fn parse_for_apply(bytes: &[u8]) -> Result<Incoming, ParseError> {
    match super::parse_header(bytes)? {
        super::Kind::Snapshot => {
            let b: SnapshotBody = super::from_slice(bytes)?;
            let small = Snapshot {
                schema_version: b.schema_version,
                kind: b.kind,
                version: b.version,
                code_key_id: b.code_key_id,
                facility: b.facility,
                zones: b.zones,
                schedules: b.schedules,
                entries: b.entries,
                units: b.units,
                users: b.users,
                credentials: Vec::new(),
                shares: b.shares,
                transfers: b.transfers,
                blacklist: b.blacklist,
                devices: b.devices,
            };
            Ok(Incoming::Snapshot(Box::new(IncomingSnapshot {
                small,
                credentials: b.credentials,
            })))
        }
        super::Kind::Delta => Ok(Incoming::Delta(Box::new(super::from_slice(bytes)?))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::{SyncMessage, parse};

    const GOOD: &str = r#"{"schema_version":1,"kind":"snapshot","version":3,
        "facility":{"time_zone":"UTC"},
        "users":[{"id":"u1","role":"tenant"},{"id":"u2","role":"tenant"}],
        "credentials":[
            {"id":"c1","user":"u1","code":"1234"},
            {"id":"c2","user":"u2","fob":"F1"},
            {"id":"c3","user":"u1","card":{"number":7}},
            {"id":"c4","user":"u2","key_id":"k"},
            {"id":"c5","user":"u1","code_hmac":"ab"},
            {"id":"c6","user":"u1","fob":"F2","card":{"number":8}},
            {"id":"c7","user":"u1"}
        ]}"#;

    /// The compact form holds exactly what the wire form holds.
    #[test]
    fn the_compact_form_matches_the_wire_form() {
        let Ok(SyncMessage::Snapshot(wire)) = parse(GOOD.as_bytes()) else {
            panic!("wire parse")
        };
        let Ok(Incoming::Snapshot(inc)) = parse_for_apply(GOOD.as_bytes()) else {
            panic!("compact parse")
        };
        assert_eq!(inc.credentials.len(), 7);
        let compact: Vec<CompactCredential> = inc.credentials.into_iter_freeing().collect();
        let from_wire: Vec<CompactCredential> = wire
            .credentials
            .iter()
            .map(CompactCredential::from_credential)
            .collect();
        assert_eq!(compact, from_wire);
        assert_eq!(compact[0].value, CredentialValue::Code("1234".into()));
        assert_eq!(compact[5].value, CredentialValue::NotExactlyOne);
        assert_eq!(compact[6].value, CredentialValue::NotExactlyOne);
        // Credentials of one user share its id.
        assert!(Arc::ptr_eq(&compact[0].user, &compact[2].user));
        assert_eq!(
            serde_json::to_value(&inc.small).unwrap(),
            serde_json::to_value(Snapshot {
                credentials: Vec::new(),
                ..*wire
            })
            .unwrap()
        );
    }

    /// Many credentials span several blocks, in order.
    #[test]
    fn blocks_keep_document_order() {
        let creds: Vec<String> = (0..BLOCK * 2 + 5)
            .map(|i| format!(r#"{{"id":"c{i}","user":"u1","fob":"F{i}"}}"#))
            .collect();
        let doc = format!(
            r#"{{"schema_version":1,"kind":"snapshot","version":1,"facility":{{"time_zone":"UTC"}},
            "credentials":[{}]}}"#,
            creds.join(",")
        );
        let Ok(Incoming::Snapshot(inc)) = parse_for_apply(doc.as_bytes()) else {
            panic!("parse")
        };
        assert_eq!(inc.credentials.len(), BLOCK * 2 + 5);
        for (i, c) in inc.credentials.into_iter_freeing().enumerate() {
            assert_eq!(&*c.id, format!("c{i}"));
        }
    }

    /// A refused document is refused with the same message by both readers.
    #[test]
    fn refusals_are_those_of_the_wire_reader() {
        let bad = [
            r#"{"schema_version":1,"kind":"snapshot","version":1}"#,
            r#"{"schema_version":1,"kind":"snapshot","version":1,"facility":{"time_zone":"UTC"},"credentials":{}}"#,
            r#"{"schema_version":1,"kind":"snapshot","version":1,"facility":{"time_zone":"UTC"},"credentials":[{"id":"c1","user":"u1","code":12345678}]}"#,
            r#"{"schema_version":1,"kind":"snapshot","version":1,"facility":{"time_zone":"UTC"},"credentials":[{"id":"c1","user":"u1","pin":"1234"}]}"#,
            r#"{"schema_version":1,"kind":"snapshot","version":1,"facility":{"time_zone":"UTC"},"credentials":[{"id":"c1"}]}"#,
            r#"{"schema_version":1,"kind":"snapshot","version":1,"facility":{"time_zone":"UTC"},"credentials":[1,2]}"#,
            r#"{"schema_version":1,"kind":"snapshot","version":1,"facility":{"time_zone":"UTC"},"extra":1}"#,
            r#"{"schema_version":1,"kind":"snapshot","version":1,"facility":{"time_zone":"UTC"},"credentials":[]} trailing"#,
            r#"{"schema_version":1,"kind":"snapshot","version":1,"facility":{"time_zone":"UTC"},"credentials":[{"id":"c1","user":"u1","card":{"number":"9"}}]"#,
            r#"{"schema_version":2,"kind":"snapshot"}"#,
            r#"{"schema_version":1,"kind":"other"}"#,
            r#"{"schema_version":1,"kind":"delta","base_version":1}"#,
            r#""{\"schema_version\":1}""#,
            "not json",
        ];
        for doc in bad {
            let a = parse(doc.as_bytes()).map(|_| ()).unwrap_err().to_string();
            let b = parse_for_apply(doc.as_bytes())
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert_eq!(a, b, "{doc}");
        }
    }
}
