//! Key operations: request/reply between clients and agents, on
//! `<prefix>.hsm.<id>.op` (one HSM) or `<prefix>.op` (any HSM, queue group).

use serde::{Deserialize, Serialize};

use crate::envelope::Timestamp;
use crate::keys::{Durability, Fingerprint, HsmId, KeyAttributes, KeyId, KeyType, SecretBytes};

/// A key operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpRequest {
    /// Generate a key inside the HSM.
    Generate {
        /// Id to give the key (the SDK chooses it so it can subscribe to the
        /// key's events before asking); `None` lets the HSM choose.
        key_id: Option<KeyId>,
        /// Key type.
        key_type: KeyType,
        /// Session keys never leave the HSM and vanish on restart.
        session: bool,
        /// When to reply.
        durability: Durability,
        /// Attributes.
        attributes: KeyAttributes,
    },
    /// Import plaintext key material: PKCS#8 DER for asymmetric keys, raw
    /// 32 bytes for AES-256. The material crosses the bus in the clear to
    /// this one HSM: use TLS, or prefer `Unwrap`.
    Import {
        /// Id to give the key, or `None`.
        key_id: Option<KeyId>,
        /// Key type.
        key_type: KeyType,
        /// The material.
        material: SecretBytes,
        /// Session key?
        session: bool,
        /// When to reply.
        durability: Durability,
        /// Attributes.
        attributes: KeyAttributes,
    },
    /// Unwrap an RFC 5649 blob under an AES-256 key the HSM holds.
    Unwrap {
        /// Id to give the key, or `None`.
        key_id: Option<KeyId>,
        /// Type of the wrapped key.
        key_type: KeyType,
        /// The AES-256 wrapping key, held by this HSM.
        wrapping_key: KeyId,
        /// The wrapped material (PKCS#8 DER or raw AES bytes inside).
        wrapped: Vec<u8>,
        /// Session key?
        session: bool,
        /// When to reply.
        durability: Durability,
        /// Attributes.
        attributes: KeyAttributes,
    },
    /// Sign `data` (ECDSA P-256/SHA-256 DER, Ed25519 raw, RSA PKCS#1 v1.5/SHA-256).
    Sign {
        /// The key.
        key_id: KeyId,
        /// The message (hashed by the HSM).
        data: Vec<u8>,
    },
    /// Verify a signature made by `Sign`.
    Verify {
        /// The key.
        key_id: KeyId,
        /// The message.
        data: Vec<u8>,
        /// The signature.
        signature: Vec<u8>,
    },
    /// AES-256-GCM encryption; the reply is nonce (12 bytes) ‖ ciphertext ‖ tag.
    Encrypt {
        /// The AES-256 key.
        key_id: KeyId,
        /// What to encrypt.
        plaintext: SecretBytes,
        /// Additional authenticated data.
        aad: Vec<u8>,
    },
    /// AES-256-GCM decryption of what `Encrypt` returned.
    Decrypt {
        /// The AES-256 key.
        key_id: KeyId,
        /// nonce ‖ ciphertext ‖ tag.
        ciphertext: Vec<u8>,
        /// Additional authenticated data.
        aad: Vec<u8>,
    },
    /// The public key as SPKI DER.
    PublicKey {
        /// The key.
        key_id: KeyId,
    },
    /// What the HSM knows of one key.
    Info {
        /// The key.
        key_id: KeyId,
    },
    /// The keys the HSM holds, one page at a time, in key-id order.
    List {
        /// Start after this key id.
        after: Option<KeyId>,
        /// At most this many (the agent caps it to keep replies small).
        limit: u32,
    },
    /// The agent's health: key counts and rejected-message counters.
    Health,
    /// Delete a token key cluster-wide (this HSM erases it and publishes
    /// the tombstone); replies `Deleted` once the tombstone is logged.
    Delete {
        /// The key.
        key_id: KeyId,
    },
    /// One page of the token-key inventory, in key-id order (anti-entropy).
    Inventory {
        /// Start after this key id.
        after: Option<KeyId>,
        /// At most this many entries.
        limit: u32,
    },
    /// Sign a digest (or DigestInfo) the caller computed, as PKCS#11's
    /// `CKM_ECDSA`, `CKM_RSA_PKCS` and `CKM_RSA_PKCS_PSS` do: applications
    /// (TLS stacks, OpenSSL's pkcs11 engine) hash themselves. The reply is
    /// `Signature` in PKCS#11's form (raw r‖s for ECDSA).
    SignDigest {
        /// The key.
        key_id: KeyId,
        /// How to sign.
        scheme: DigestSignScheme,
        /// The digest (ECDSA, PSS) or DER DigestInfo (PKCS#1 v1.5).
        digest: Vec<u8>,
    },
    /// AES-256-GCM with the application's IV, AAD and tag length
    /// (PKCS#11 `CKM_AES_GCM`); the reply is `Ciphertext`: ciphertext ‖
    /// tag, without the IV (the application holds it).
    EncryptGcm {
        /// The AES-256 key.
        key_id: KeyId,
        /// IV, AAD and tag length.
        params: GcmParams,
        /// What to encrypt.
        plaintext: SecretBytes,
    },
    /// Opens what `EncryptGcm` (or any AES-GCM with the same parameters)
    /// sealed; the reply is `Plaintext`, or `IntegrityFailed`.
    DecryptGcm {
        /// The AES-256 key.
        key_id: KeyId,
        /// IV, AAD and tag length.
        params: GcmParams,
        /// ciphertext ‖ tag.
        ciphertext: Vec<u8>,
    },
}

/// A hash function named by a digest-signing scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DigestAlg {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl DigestAlg {
    /// Bytes of its output.
    pub fn output_len(self) -> usize {
        match self {
            DigestAlg::Sha256 => 32,
            DigestAlg::Sha384 => 48,
            DigestAlg::Sha512 => 64,
        }
    }
}

/// How [`OpRequest::SignDigest`] signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DigestSignScheme {
    /// ECDSA P-256 on a hash (`CKM_ECDSA`): raw r‖s, 64 bytes.
    Ecdsa,
    /// RSA PKCS#1 v1.5 type-1 padding of the input as given, with no
    /// prefix added (`CKM_RSA_PKCS`): the caller sends a DER DigestInfo.
    RsaPkcs1,
    /// RSA-PSS on a digest of `hash`, MGF1 over `mgf`, a salt of
    /// `salt_len` bytes (`CKM_RSA_PKCS_PSS` with `CK_RSA_PKCS_PSS_PARAMS`).
    RsaPss {
        /// The hash the digest was made with.
        hash: DigestAlg,
        /// MGF1's hash (keysync supports only `mgf == hash`).
        mgf: DigestAlg,
        /// Salt bytes.
        salt_len: u32,
    },
}

/// Digest lengths ECDSA accepts: SHA-1 and the SHA-2 family.
pub const ECDSA_DIGEST_LENS: [usize; 5] = [20, 28, 32, 48, 64];

/// Bytes of an RSA-2048 modulus (keysync's one RSA size).
pub const RSA_MODULUS_BYTES: usize = 256;

impl DigestSignScheme {
    /// The key type the scheme signs with.
    pub fn key_type(&self) -> KeyType {
        match self {
            DigestSignScheme::Ecdsa => KeyType::P256,
            DigestSignScheme::RsaPkcs1 | DigestSignScheme::RsaPss { .. } => KeyType::Rsa2048,
        }
    }

    /// Checks a request before any key is touched, so both keystores (and
    /// the PKCS#11 module, before it sends) refuse the same inputs with
    /// the same reason: a digest of the wrong length, a DigestInfo too
    /// long for the modulus, PSS parameters keysync does not do.
    pub fn check(&self, digest: &[u8]) -> Result<(), String> {
        match self {
            DigestSignScheme::Ecdsa => {
                if !ECDSA_DIGEST_LENS.contains(&digest.len()) {
                    return Err(format!(
                        "an ECDSA digest is {ECDSA_DIGEST_LENS:?} bytes (SHA-1 or SHA-2), not {}",
                        digest.len()
                    ));
                }
            }
            DigestSignScheme::RsaPkcs1 => {
                // PKCS#1 v1.5 type 1: 00 01 FF..FF (at least 8) 00 input.
                let max = RSA_MODULUS_BYTES - 11;
                if digest.is_empty() || digest.len() > max {
                    return Err(format!(
                        "RSA PKCS#1 v1.5 signs 1 to {max} bytes (a DigestInfo), not {}",
                        digest.len()
                    ));
                }
            }
            DigestSignScheme::RsaPss {
                hash,
                mgf,
                salt_len,
            } => {
                if hash != mgf {
                    return Err(format!(
                        "RSA-PSS with {hash:?} and MGF1-{mgf:?}: keysync signs with MGF1 over the digest's own hash only"
                    ));
                }
                if digest.len() != hash.output_len() {
                    return Err(format!(
                        "an RSA-PSS {hash:?} digest is {} bytes, not {}",
                        hash.output_len(),
                        digest.len()
                    ));
                }
                // emLen = 256 for RSA-2048 (emBits 2047): sLen <= emLen - hLen - 2.
                let max = RSA_MODULUS_BYTES - hash.output_len() - 2;
                if *salt_len as usize > max {
                    return Err(format!(
                        "an RSA-PSS {hash:?} salt is at most {max} bytes with RSA-2048, not {salt_len}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// AES-GCM parameters as PKCS#11's `CK_GCM_PARAMS` gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcmParams {
    /// The IV (12 bytes: the length GCM is defined for without GHASH of
    /// the IV, and the one every keystore supports).
    pub iv: Vec<u8>,
    /// Additional authenticated data.
    pub aad: Vec<u8>,
    /// Tag length in bits: 96, 104, 112, 120 or 128.
    pub tag_bits: u32,
}

/// The IV length AES-GCM takes.
pub const GCM_IV_LEN: usize = 12;

impl GcmParams {
    /// Checks the parameters keysync supports (see the fields).
    pub fn check(&self) -> Result<(), String> {
        if self.iv.len() != GCM_IV_LEN {
            return Err(format!(
                "an AES-GCM IV is {GCM_IV_LEN} bytes, not {}",
                self.iv.len()
            ));
        }
        if !(96..=128).contains(&self.tag_bits) || !self.tag_bits.is_multiple_of(8) {
            return Err(format!(
                "an AES-GCM tag is 96, 104, 112, 120 or 128 bits, not {}",
                self.tag_bits
            ));
        }
        Ok(())
    }

    /// Bytes of the tag.
    pub fn tag_len(&self) -> usize {
        (self.tag_bits / 8) as usize
    }
}

impl OpRequest {
    /// The key this operation is about: the one it uses, or the id a
    /// create asks for. `None` for listings, health and creates that let
    /// the HSM pick the id.
    pub fn key_id(&self) -> Option<KeyId> {
        match self {
            OpRequest::Sign { key_id, .. }
            | OpRequest::Verify { key_id, .. }
            | OpRequest::Encrypt { key_id, .. }
            | OpRequest::Decrypt { key_id, .. }
            | OpRequest::PublicKey { key_id }
            | OpRequest::Delete { key_id }
            | OpRequest::Info { key_id }
            | OpRequest::SignDigest { key_id, .. }
            | OpRequest::EncryptGcm { key_id, .. }
            | OpRequest::DecryptGcm { key_id, .. } => Some(*key_id),
            OpRequest::Generate { key_id, .. }
            | OpRequest::Import { key_id, .. }
            | OpRequest::Unwrap { key_id, .. } => *key_id,
            OpRequest::List { .. } | OpRequest::Health | OpRequest::Inventory { .. } => None,
        }
    }

    /// A short name for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            OpRequest::Generate { .. } => "generate",
            OpRequest::Import { .. } => "import",
            OpRequest::Unwrap { .. } => "unwrap",
            OpRequest::Sign { .. } => "sign",
            OpRequest::Verify { .. } => "verify",
            OpRequest::Encrypt { .. } => "encrypt",
            OpRequest::Decrypt { .. } => "decrypt",
            OpRequest::PublicKey { .. } => "public_key",
            OpRequest::Info { .. } => "info",
            OpRequest::List { .. } => "list",
            OpRequest::Health => "health",
            OpRequest::Delete { .. } => "delete",
            OpRequest::Inventory { .. } => "inventory",
            OpRequest::SignDigest { .. } => "sign_digest",
            OpRequest::EncryptGcm { .. } => "encrypt_gcm",
            OpRequest::DecryptGcm { .. } => "decrypt_gcm",
        }
    }
}

/// What an HSM knows of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// The key.
    pub key_id: KeyId,
    /// Its type.
    pub key_type: KeyType,
    /// Its fingerprint.
    pub fingerprint: Fingerprint,
    /// Session key (never synced)?
    pub session: bool,
    /// Attributes.
    pub attributes: KeyAttributes,
    /// The HSM answering.
    pub hsm: HsmId,
    /// When this HSM stored it.
    pub stored_at: Timestamp,
}

/// The reply to an [`OpRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpReply {
    /// A key was created (generate, import, unwrap).
    Created {
        /// The key.
        info: KeyInfo,
        /// The durability reached when the HSM replied (`none` or `logged`;
        /// replica levels are waited for by the client).
        durability: Durability,
        /// Stream sequence of the `KeyCreated` event, when logged.
        created_seq: Option<u64>,
    },
    /// A signature.
    Signature(Vec<u8>),
    /// Whether a signature verified.
    Verified(bool),
    /// nonce ‖ ciphertext ‖ tag.
    Ciphertext(Vec<u8>),
    /// Decrypted data.
    Plaintext(SecretBytes),
    /// SPKI DER.
    PublicKey(Vec<u8>),
    /// One key.
    Info(KeyInfo),
    /// One page of keys; shorter than asked when it is the last.
    List(Vec<KeyInfo>),
    /// The agent's health.
    Health(AgentHealth),
    /// A key was deleted; the tombstone is at this stream sequence.
    Deleted {
        /// The key.
        key_id: KeyId,
        /// Stream sequence of `KeyDeleted`.
        seq: u64,
    },
    /// One inventory page; shorter than the limit when it is the last.
    Inventory(Vec<(KeyId, Fingerprint)>),
    /// The operation failed.
    Error(OpError),
}

/// An agent's view of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHealth {
    /// The HSM.
    pub hsm: HsmId,
    /// Token keys held.
    pub token_keys: u64,
    /// Session keys held.
    pub session_keys: u64,
    /// `KeyCreated` events stored but not yet acknowledged by JetStream.
    pub outbox: u64,
    /// Clone commands applied since start.
    pub clones_applied: u64,
    /// Rejected messages since start, by reason.
    pub rejected: Vec<(crate::RejectReason, u64)>,
    /// Clone commands that could not be applied (`CloneFailed`) since
    /// start: not bad input, so not among `rejected`.
    pub clones_failed: u64,
    /// Clones that failed for a passing reason (a full disk) and were
    /// handed back to be retried, since start.
    pub clones_retried: u64,
    /// Deletes handed back to be retried likewise.
    pub deletes_retried: u64,
}

/// Why an operation failed, kept apart because callers handle them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OpErrorKind {
    /// This HSM does not hold the key (it may not be replicated here yet).
    KeyNotFound,
    /// The request was malformed or asked for something impossible.
    BadRequest,
    /// The key cannot do that (e.g. sign with an AES key).
    Unsupported,
    /// A key with that id already exists.
    AlreadyExists,
    /// The HSM could not reach the bus or its store; retrying may help.
    Unavailable,
    /// A decryption or unwrap failed its integrity check.
    IntegrityFailed,
    /// An internal error.
    Internal,
    /// The key id is taken in the cluster: the log already holds an event
    /// for it (another HSM created a key under it first, or a key with this
    /// id was deleted). Ids are unique at the log, so the create was undone
    /// on this HSM. Retrying with the same id can never succeed; a new id
    /// can.
    KeyIdTaken,
}

impl OpErrorKind {
    /// Its name in traces and metrics (`key_not_found`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            OpErrorKind::KeyNotFound => "key_not_found",
            OpErrorKind::BadRequest => "bad_request",
            OpErrorKind::Unsupported => "unsupported",
            OpErrorKind::AlreadyExists => "already_exists",
            OpErrorKind::Unavailable => "unavailable",
            OpErrorKind::IntegrityFailed => "integrity_failed",
            OpErrorKind::Internal => "internal",
            OpErrorKind::KeyIdTaken => "key_id_taken",
        }
    }
}

/// An operation error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpError {
    /// What kind.
    pub kind: OpErrorKind,
    /// A sentence for people (never key material).
    pub message: String,
}

impl OpError {
    /// Builds an error.
    pub fn new(kind: OpErrorKind, message: impl Into<String>) -> Self {
        OpError {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for OpError {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode, Envelope, Source};

    #[test]
    fn the_application_operations_are_appended_so_earlier_variants_keep_their_bytes() {
        // bincode writes a variant's index: `Sign` is still variant 3, so
        // an agent of this build and one of the last build read each
        // other's `Sign` alike; the new operations come after `Inventory`.
        let key_id = KeyId::new();
        let sign = OpRequest::Sign {
            key_id,
            data: vec![1, 2, 3],
        };
        let body =
            bincode::serde::encode_to_vec(&sign, bincode::config::standard()).expect("encode");
        assert_eq!(body[0], 3);
        let new = OpRequest::SignDigest {
            key_id,
            scheme: DigestSignScheme::Ecdsa,
            digest: vec![0; 32],
        };
        let body =
            bincode::serde::encode_to_vec(&new, bincode::config::standard()).expect("encode");
        assert_eq!(body[0], 13);
        let env = Envelope::new(Source::Client("c".into()), new.clone());
        let back = decode::<OpRequest>(&encode(&env).expect("encode")).expect("decode");
        assert_eq!(back.body, new);
        assert_eq!(back.body.key_id(), Some(key_id));
        assert_eq!(back.body.kind(), "sign_digest");
    }

    #[test]
    fn digest_and_gcm_checks_name_what_is_wrong() {
        use DigestAlg::*;
        assert!(DigestSignScheme::Ecdsa.check(&[0; 32]).is_ok());
        assert!(DigestSignScheme::Ecdsa.check(&[0; 20]).is_ok());
        assert!(DigestSignScheme::Ecdsa.check(&[0; 33]).is_err());
        assert!(DigestSignScheme::RsaPkcs1.check(&[0; 245]).is_ok());
        assert!(DigestSignScheme::RsaPkcs1.check(&[0; 246]).is_err());
        let pss = |hash, mgf, salt_len| DigestSignScheme::RsaPss {
            hash,
            mgf,
            salt_len,
        };
        assert!(pss(Sha256, Sha256, 32).check(&[0; 32]).is_ok());
        assert!(pss(Sha512, Sha512, 190).check(&[0; 64]).is_ok());
        assert!(pss(Sha512, Sha512, 191).check(&[0; 64]).is_err());
        assert!(pss(Sha256, Sha384, 32)
            .check(&[0; 32])
            .is_err_and(|e| e.contains("MGF1")));
        assert!(pss(Sha384, Sha384, 48).check(&[0; 32]).is_err());
        let gcm = |iv: usize, tag_bits| GcmParams {
            iv: vec![0; iv],
            aad: Vec::new(),
            tag_bits,
        };
        for bits in [96, 104, 112, 120, 128] {
            assert!(gcm(12, bits).check().is_ok(), "{bits}");
        }
        for (iv, bits) in [(12, 88), (12, 100), (12, 136), (8, 128), (16, 128)] {
            assert!(gcm(iv, bits).check().is_err(), "{iv} {bits}");
        }
    }
}
