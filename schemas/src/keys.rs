//! Identifiers and small value types shared by events, commands and operations.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// An identifier or value that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// An HSM id must be 1 to 64 characters of `A-Z a-z 0-9 _ -`, because it
    /// becomes a NATS subject token.
    #[error("invalid HSM id {0:?}: use 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'")]
    HsmId(String),
    /// A key id is a UUID.
    #[error("invalid key id {0:?}: a key id is a UUID")]
    KeyId(String),
    /// Unknown key type name.
    #[error("unknown key type {0:?}: use p256, ed25519, aes256 or rsa2048")]
    KeyType(String),
    /// Unknown durability level.
    #[error("unknown durability {0:?}: use none, logged, replicas:N (N >= 1) or all")]
    Durability(String),
    /// A subject prefix must be one or more subject tokens without wildcards.
    #[error("invalid subject prefix {0:?}: use tokens of A-Z, a-z, 0-9, '_' or '-' joined by '.'")]
    Prefix(String),
}

/// The type of a token key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum KeyType {
    /// ECDSA over NIST P-256 with SHA-256.
    P256,
    /// Ed25519 (RFC 8032).
    Ed25519,
    /// AES-256, used with AES-GCM.
    Aes256,
    /// RSA-2048, PKCS#1 v1.5 signatures over SHA-256.
    Rsa2048,
}

impl KeyType {
    /// Every key type, in a stable order.
    pub const ALL: [KeyType; 4] = [
        KeyType::P256,
        KeyType::Ed25519,
        KeyType::Aes256,
        KeyType::Rsa2048,
    ];

    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::P256 => "p256",
            KeyType::Ed25519 => "ed25519",
            KeyType::Aes256 => "aes256",
            KeyType::Rsa2048 => "rsa2048",
        }
    }

    /// Whether the key has a public half (and so can sign and export SPKI).
    pub fn is_asymmetric(self) -> bool {
        !matches!(self, KeyType::Aes256)
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyType::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| IdError::KeyType(s.to_string()))
    }
}

/// A key's identifier: a UUID (v7 when keysync makes it, so ids sort by
/// creation time). Its hyphenated form is a valid NATS subject token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyId(pub Uuid);

impl KeyId {
    /// A fresh, time-ordered key id.
    pub fn new() -> Self {
        KeyId(Uuid::now_v7())
    }
}

impl Default for KeyId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl FromStr for KeyId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(KeyId)
            .map_err(|_| IdError::KeyId(s.to_string()))
    }
}

/// An HSM's identifier within a cluster; also a NATS subject token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HsmId(String);

impl HsmId {
    /// Validates and wraps an HSM id.
    pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(HsmId(id))
        } else {
            Err(IdError::HsmId(id))
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for HsmId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        HsmId::new(s)
    }
}

impl From<HsmId> for String {
    fn from(id: HsmId) -> String {
        id.0
    }
}

impl fmt::Display for HsmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for HsmId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HsmId::new(s)
    }
}

/// A key's fingerprint: identical on every HSM that holds the key, and
/// revealing nothing of secret material. For asymmetric keys it is
/// SHA-256 over a label, the key type and the SPKI public key; for secret
/// keys, HMAC-SHA-256 keyed by the key itself over a label and the type.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Lower-case hex, as shown to people and in JSON.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Identifies the cluster domain key a blob is wrapped under (an HMAC of a
/// fixed label under that key), so a clone from another cluster is refused
/// with a clear reason before any unwrapping is attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DomainId(pub [u8; 8]);

impl fmt::Display for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// How durable a new key must be before `create` returns (client-side sync).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum Durability {
    /// The key exists on the one HSM that made it.
    None,
    /// The `KeyCreated` event is persisted in JetStream (the default).
    #[default]
    Logged,
    /// At least N HSMs hold the key.
    Replicas(u16),
    /// Every live member holds the key.
    All,
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Durability::None => f.write_str("none"),
            Durability::Logged => f.write_str("logged"),
            Durability::Replicas(n) => write!(f, "replicas:{n}"),
            Durability::All => f.write_str("all"),
        }
    }
}

impl FromStr for Durability {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        match lower.as_str() {
            "none" => Ok(Durability::None),
            "logged" => Ok(Durability::Logged),
            "all" => Ok(Durability::All),
            _ => lower
                .strip_prefix("replicas:")
                .and_then(|n| n.parse::<u16>().ok())
                .filter(|n| *n >= 1)
                .map(Durability::Replicas)
                .ok_or_else(|| IdError::Durability(s.to_string())),
        }
    }
}

/// Attributes bound to a key and carried with it to every HSM.
///
/// Schema version 2 added `app_id`; version-1 messages carry
/// [`crate::v1::KeyAttributes`] and are upcast with `app_id: None`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeyAttributes {
    /// A free-form label (CKA_LABEL), at most 128 bytes.
    pub label: Option<String>,
    /// The application's own identifier for the key (PKCS#11 `CKA_ID`), at
    /// most [`MAX_APP_ID_BYTES`]. keysync's [`KeyId`] stays the key's
    /// identity; this is what applications search by, so it is carried to
    /// every HSM like the label. Several keys may share one.
    pub app_id: Option<Vec<u8>>,
}

/// Maximum length of a key label, in bytes.
pub const MAX_LABEL_BYTES: usize = 128;

/// Maximum length of an application's key id (`CKA_ID`), in bytes. Real
/// ids are short (pkcs11-tool's are 1 to 20 bytes, a SHA-1 of the public
/// key being the longest common one); the bound keeps events small.
pub const MAX_APP_ID_BYTES: usize = 64;

/// Key attributes a receiver refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttributeError {
    /// The label is longer than [`MAX_LABEL_BYTES`].
    #[error("label is {0} bytes; use at most {MAX_LABEL_BYTES}")]
    LabelTooLong(usize),
    /// The application id is longer than [`MAX_APP_ID_BYTES`].
    #[error("application key id is {0} bytes; use at most {MAX_APP_ID_BYTES}")]
    AppIdTooLong(usize),
    /// An empty application id: leave it out instead (an empty `CKA_ID`
    /// would match every search for an empty id, which means "none").
    #[error("application key id is empty; leave it out instead")]
    AppIdEmpty,
}

impl KeyAttributes {
    /// Checks the bounds every creator and receiver applies.
    pub fn check(&self) -> Result<(), AttributeError> {
        if let Some(l) = &self.label {
            if l.len() > MAX_LABEL_BYTES {
                return Err(AttributeError::LabelTooLong(l.len()));
            }
        }
        match &self.app_id {
            Some(id) if id.len() > MAX_APP_ID_BYTES => Err(AttributeError::AppIdTooLong(id.len())),
            Some(id) if id.is_empty() => Err(AttributeError::AppIdEmpty),
            _ => Ok(()),
        }
    }

    /// The application id as lower-case hex, as shown to people and in JSON.
    pub fn app_id_hex(&self) -> Option<String> {
        self.app_id.as_deref().map(hex_lower)
    }
}

/// Lower-case hex of `bytes`.
fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Secret bytes on the wire (plaintext key material for `Import`, decrypted
/// data): zeroized on drop and never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop, Default)]
pub struct SecretBytes(pub Vec<u8>);

impl SecretBytes {
    /// The bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED; {}])", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsm_ids_are_subject_tokens() {
        assert!(HsmId::new("hsm-1").is_ok());
        assert!(HsmId::new("A_b-9").is_ok());
        for bad in ["", "a.b", "a*", ">", "a b", &"x".repeat(65)] {
            assert!(HsmId::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn durability_parses_and_prints() {
        for s in ["none", "logged", "replicas:2", "all"] {
            let d: Durability = s.parse().expect("parses");
            assert_eq!(d.to_string(), s);
        }
        for bad in ["replicas:0", "replicas:", "replicas:x", "some", ""] {
            assert!(bad.parse::<Durability>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn key_types_round_trip() {
        for t in KeyType::ALL {
            assert_eq!(t.as_str().parse::<KeyType>().expect("parses"), t);
        }
        assert!("dsa".parse::<KeyType>().is_err());
    }

    #[test]
    fn attributes_are_bounded() {
        let ok = KeyAttributes {
            label: Some("l".repeat(MAX_LABEL_BYTES)),
            app_id: Some(vec![1; MAX_APP_ID_BYTES]),
        };
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(ok.app_id_hex().map(|h| h.len()), Some(2 * MAX_APP_ID_BYTES));
        let long_id = KeyAttributes {
            app_id: Some(vec![1; MAX_APP_ID_BYTES + 1]),
            ..ok.clone()
        };
        assert_eq!(
            long_id.check(),
            Err(AttributeError::AppIdTooLong(MAX_APP_ID_BYTES + 1))
        );
        let empty_id = KeyAttributes {
            app_id: Some(Vec::new()),
            ..ok.clone()
        };
        assert_eq!(empty_id.check(), Err(AttributeError::AppIdEmpty));
        let long_label = KeyAttributes {
            label: Some("l".repeat(MAX_LABEL_BYTES + 1)),
            app_id: None,
        };
        assert!(long_label.check().is_err());
    }

    #[test]
    fn secret_bytes_never_print() {
        let s = SecretBytes(vec![0xde, 0xad, 0xbe, 0xef]);
        let shown = format!("{s:?}");
        assert!(!shown.contains("de") && !shown.contains("222"), "{shown}");
    }
}
