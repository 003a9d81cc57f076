//! Events: the facts appended to the `KEYSYNC_EVENTS` stream.
//!
//! Events are past-tense nouns. The orchestrator's state is a fold over
//! them, so an event says everything needed to apply it without asking
//! anyone.

use serde::{Deserialize, Serialize};

use crate::keys::{DomainId, Durability, Fingerprint, HsmId, KeyAttributes, KeyId, KeyType};

/// One event on the events stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A token key was created on an HSM.
    KeyCreated(KeyCreated),
    /// An HSM applied a clone command (or already held the key).
    CloneApplied(CloneApplied),
    /// An HSM could not apply a clone command.
    CloneFailed(CloneFailed),
    /// Every member holds the key.
    KeyReplicated(KeyReplicated),
    /// An HSM (re)started and announces itself.
    HsmJoined(HsmJoined),
    /// The orchestrator declared an HSM failed (silent past the timeout).
    HsmFailed(HsmFailed),
    /// A failed HSM is heard from again.
    HsmRecovered(HsmRecovered),
    /// A key was deleted: a tombstone every HSM honours from then on.
    KeyDeleted(KeyDeleted),
    /// An HSM erased a deleted key (or recorded its tombstone).
    KeyErased(KeyErased),
}

impl Event {
    /// A short name for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::KeyCreated(_) => "key_created",
            Event::CloneApplied(_) => "clone_applied",
            Event::CloneFailed(_) => "clone_failed",
            Event::KeyReplicated(_) => "key_replicated",
            Event::HsmJoined(_) => "hsm_joined",
            Event::HsmFailed(_) => "hsm_failed",
            Event::HsmRecovered(_) => "hsm_recovered",
            Event::KeyDeleted(_) => "key_deleted",
            Event::KeyErased(_) => "key_erased",
        }
    }
}

/// How a key came to exist on its first HSM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyOrigin {
    /// Generated inside the HSM.
    Generated,
    /// Imported from plaintext PKCS#8 or raw bytes.
    Imported,
    /// Unwrapped (RFC 5649) under a key the HSM holds.
    Unwrapped,
}

/// A token key was created on `hsm`. Carries the key material wrapped under
/// the cluster domain key with AES key wrap with padding (RFC 5649, the
/// bytes of PKCS#11 `CKM_AES_KEY_WRAP_PAD`): PKCS#8 DER for asymmetric keys,
/// the raw 32 bytes for AES-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCreated {
    /// The key.
    pub key_id: KeyId,
    /// Its type.
    pub key_type: KeyType,
    /// Its fingerprint, identical on every HSM.
    pub fingerprint: Fingerprint,
    /// The HSM that created it.
    pub hsm: HsmId,
    /// How it was created.
    pub origin: KeyOrigin,
    /// Attributes carried to every HSM.
    pub attributes: KeyAttributes,
    /// The durability the creator asked for.
    pub durability: Durability,
    /// Which domain key `wrapped` is wrapped under.
    pub domain: DomainId,
    /// The key material, RFC 5649-wrapped under the domain key.
    pub wrapped: Vec<u8>,
    /// SPKI DER of the public key, for asymmetric keys.
    pub public_key: Option<Vec<u8>>,
}

/// An HSM holds the key (it stored it, or it already had it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneApplied {
    /// The key.
    pub key_id: KeyId,
    /// The HSM that applied the clone.
    pub hsm: HsmId,
    /// The fingerprint the HSM computed from the unwrapped material.
    pub fingerprint: Fingerprint,
    /// True when the HSM already held the key (an idempotent no-op).
    pub already_present: bool,
}

/// Why a clone could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CloneFailure {
    /// The blob is wrapped under another cluster's domain key.
    WrongDomain,
    /// Unwrapping failed its integrity check (tampered or corrupt blob).
    Integrity,
    /// The unwrapped material is not a valid key of the stated type.
    InvalidMaterial,
    /// The fingerprint of the unwrapped key differs from the stated one.
    FingerprintMismatch,
    /// The HSM holds a different key under the same id.
    Conflict,
    /// The HSM could not store the key.
    Storage(String),
}

impl CloneFailure {
    /// A short reason for people and counters.
    pub fn reason(&self) -> &str {
        match self {
            CloneFailure::WrongDomain => "wrong domain",
            CloneFailure::Integrity => "unwrap integrity check failed",
            CloneFailure::InvalidMaterial => "invalid key material",
            CloneFailure::FingerprintMismatch => "fingerprint mismatch",
            CloneFailure::Conflict => "a different key has this id",
            CloneFailure::Storage(_) => "storage error",
        }
    }
}

/// An HSM could not apply a clone; nothing was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneFailed {
    /// The key.
    pub key_id: KeyId,
    /// The HSM that failed.
    pub hsm: HsmId,
    /// Why.
    pub reason: CloneFailure,
}

/// The orchestrator saw every member apply the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyReplicated {
    /// The key.
    pub key_id: KeyId,
    /// Its fingerprint.
    pub fingerprint: Fingerprint,
    /// Every HSM that holds it.
    pub holders: Vec<HsmId>,
    /// From the `KeyCreated` being stored in JetStream to the last
    /// `CloneApplied` being stored, by the stream's own timestamps (one
    /// clock, so no skew between machines).
    pub sync_latency_micros: u64,
    /// Stream sequence of the `KeyCreated` event.
    pub created_seq: u64,
}

/// An HSM announces itself; sent at every agent start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HsmJoined {
    /// The HSM.
    pub hsm: HsmId,
    /// The agent's version.
    pub agent_version: String,
    /// How many token keys it holds.
    pub token_keys: u64,
}

/// The orchestrator declared an HSM failed: no heartbeat for `silent_ms`.
/// From then on replication completes without it; its commands wait in its
/// queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HsmFailed {
    /// The HSM.
    pub hsm: HsmId,
    /// How long it had been silent, in milliseconds.
    pub silent_ms: u64,
}

/// A failed HSM is heard from again (a heartbeat); it is a live member
/// again, catching up from its queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HsmRecovered {
    /// The HSM.
    pub hsm: HsmId,
}

/// A key was deleted on `hsm` (the request's HSM). Every other HSM is told
/// to erase it; its wrapped material is purged from the events stream; it
/// never comes back (catch-up and anti-entropy honour the tombstone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDeleted {
    /// The key.
    pub key_id: KeyId,
    /// Its fingerprint.
    pub fingerprint: Fingerprint,
    /// The HSM that deleted it first.
    pub hsm: HsmId,
}

/// An HSM erased a deleted key (or, lacking it, recorded the tombstone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyErased {
    /// The key.
    pub key_id: KeyId,
    /// The HSM.
    pub hsm: HsmId,
    /// Whether the HSM held the key.
    pub was_present: bool,
}
