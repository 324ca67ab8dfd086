//! Offline digital keys: issued by the cloud after its online checks, signed with Ed25519, and
//! verified here without the network.
//!
//! A key is a JSON object `{"payload": B64, "signature": B64}` (base64url, no padding). The
//! signature is Ed25519 over `"gatehouse-digital-key-v1\0" || payload bytes`, so no JSON
//! canonicalisation is needed: the signed bytes are exactly the bytes carried. The payload is
//! [`KeyPayload`] as JSON. See docs/sync.md "Offline digital keys".
//!
//! A key names its audience: `site` is the site id of the gateways that honour it (the
//! gateway's configured `site.id`), so a key issued for one site opens nothing at another site
//! that trusts the same signing key. Version 1 keys (without `site`) are refused as malformed.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Domain separation for key signatures.
pub const KEY_CONTEXT: &[u8] = b"gatehouse-digital-key-v1\0";

/// The `v` of the keys this gateway reads (2: keys name their `site`).
pub const KEY_VERSION: u32 = 2;

/// What a key grants. Times are RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPayload {
    /// [`KEY_VERSION`].
    pub v: u32,
    /// The site the key is for (the gateway's `site.id`); checked before anything else.
    pub site: String,
    pub key_id: String,
    pub user: String,
    #[serde(default)]
    pub units: Vec<String>,
    #[serde(default)]
    pub entries: Vec<String>,
    pub issued_at: DateTime<Utc>,
    pub not_before: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    payload: String,
    signature: String,
}

/// Why a key could not be verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    Malformed,
    BadSignature,
    /// Authentic, but for another site.
    WrongSite,
}

/// What checks keys on this gateway: the cloud's public key and this gateway's site id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVerifier {
    pub public: VerifyingKey,
    /// The `site.id` of this gateway's config: a key must name it.
    pub site: String,
}

impl KeyVerifier {
    pub fn new(public: VerifyingKey, site: &str) -> Self {
        KeyVerifier {
            public,
            site: site.to_string(),
        }
    }

    /// [`verify`], then the audience: a key for another site is [`KeyError::WrongSite`].
    pub fn verify(&self, token: &[u8]) -> Result<KeyPayload, KeyError> {
        let p = verify(token, &self.public)?;
        if p.site != self.site {
            return Err(KeyError::WrongSite);
        }
        Ok(p)
    }
}

/// Checks the envelope and signature, then reads the payload. Does not check the audience:
/// use [`KeyVerifier::verify`].
pub fn verify(token: &[u8], public: &VerifyingKey) -> Result<KeyPayload, KeyError> {
    let env: Envelope = serde_json::from_slice(token).map_err(|_| KeyError::Malformed)?;
    let payload = URL_SAFE_NO_PAD
        .decode(env.payload.trim())
        .map_err(|_| KeyError::Malformed)?;
    let sig = URL_SAFE_NO_PAD
        .decode(env.signature.trim())
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .ok_or(KeyError::Malformed)?;
    let mut msg = Vec::with_capacity(KEY_CONTEXT.len() + payload.len());
    msg.extend_from_slice(KEY_CONTEXT);
    msg.extend_from_slice(&payload);
    public
        .verify(&msg, &Signature::from_bytes(&sig))
        .map_err(|_| KeyError::BadSignature)?;
    let p: KeyPayload = serde_json::from_slice(&payload).map_err(|_| KeyError::Malformed)?;
    if p.v != KEY_VERSION {
        return Err(KeyError::Malformed);
    }
    Ok(p)
}

/// Signs a key, as the cloud does. Used by tests, the benchmark and `make run`'s demo.
pub fn sign(payload: &KeyPayload, signer: &SigningKey) -> Vec<u8> {
    let bytes = serde_json::to_vec(payload).expect("payload serialises");
    let mut msg = KEY_CONTEXT.to_vec();
    msg.extend_from_slice(&bytes);
    let sig = signer.sign(&msg);
    serde_json::to_vec(&Envelope {
        payload: URL_SAFE_NO_PAD.encode(&bytes),
        signature: URL_SAFE_NO_PAD.encode(sig.to_bytes()),
    })
    .expect("envelope serialises")
}

/// Reads an Ed25519 public key given as 64 hex digits or base64 (standard or url-safe).
pub fn parse_public_key(s: &str) -> Option<VerifyingKey> {
    let s = s.trim();
    let bytes = hex::decode(s)
        .ok()
        .or_else(|| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .or_else(|| URL_SAFE_NO_PAD.decode(s).ok())?;
    VerifyingKey::from_bytes(&<[u8; 32]>::try_from(bytes).ok()?).ok()
}
