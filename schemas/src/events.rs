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
    /// The operator enrolled an HSM's identity key (signed by the cluster key).
    HsmEnrolled(HsmEnrolled),
    /// The operator removed an HSM: its key is revoked, it is no member.
    HsmRevoked(HsmRevoked),
    /// The operator issued a one-time join token for an HSM.
    JoinTokenIssued(JoinTokenIssued),
    /// An agent asks to be enrolled with a join token.
    JoinRequested(JoinRequested),
    /// An HSM announces the key types it can hold (sent at agent start).
    HsmCapabilities(HsmCapabilities),
    /// The active orchestrator vouches for a run of events it checked
    /// (signed with the cluster identity): a replay checks this one
    /// signature instead of one per event of the run.
    Checkpoint(Checkpoint),
    /// An HSM applied several clone commands together (one keystore
    /// transaction): one signed event standing for one [`CloneApplied`]
    /// per key, so a burst costs one message and one signature per window
    /// instead of one per key (decision 21). A window of one is sent as a
    /// plain `CloneApplied`.
    ClonesApplied(ClonesApplied),
}

impl Event {
    /// The key this event is about, if it is about one.
    pub fn key_id(&self) -> Option<KeyId> {
        match self {
            Event::KeyCreated(e) => Some(e.key_id),
            Event::CloneApplied(e) => Some(e.key_id),
            Event::CloneFailed(e) => Some(e.key_id),
            Event::KeyReplicated(e) => Some(e.key_id),
            Event::KeyDeleted(e) => Some(e.key_id),
            Event::KeyErased(e) => Some(e.key_id),
            Event::HsmJoined(_)
            | Event::HsmFailed(_)
            | Event::HsmRecovered(_)
            | Event::HsmEnrolled(_)
            | Event::HsmRevoked(_)
            | Event::JoinTokenIssued(_)
            | Event::JoinRequested(_)
            | Event::HsmCapabilities(_)
            | Event::Checkpoint(_)
            | Event::ClonesApplied(_) => None,
        }
    }

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
            Event::HsmEnrolled(_) => "hsm_enrolled",
            Event::HsmRevoked(_) => "hsm_revoked",
            Event::JoinTokenIssued(_) => "join_token_issued",
            Event::JoinRequested(_) => "join_requested",
            Event::HsmCapabilities(_) => "hsm_capabilities",
            Event::Checkpoint(_) => "checkpoint",
            Event::ClonesApplied(_) => "clones_applied",
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

/// Most keys one [`ClonesApplied`] names. An entry is ~52 bytes, so 128
/// keep the event under half of [`crate::MAX_EVENT_BYTES`] with its
/// headers, and its audit record likewise.
pub const MAX_APPLIED_PER_EVENT: usize = 128;

/// One key of a [`ClonesApplied`]: what a [`CloneApplied`] says besides
/// the HSM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedKey {
    /// The key.
    pub key_id: KeyId,
    /// The fingerprint the HSM computed from the unwrapped material.
    pub fingerprint: Fingerprint,
    /// True when the HSM already held the key (an idempotent no-op).
    pub already_present: bool,
}

/// `hsm` holds every key of `applied`: exactly the facts of one
/// [`CloneApplied`] per entry, in order, signed once. Valid only with 1 to
/// [`MAX_APPLIED_PER_EVENT`] entries naming distinct keys
/// ([`ClonesApplied::check`], run by every reader with the signature).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClonesApplied {
    /// The HSM that applied the clones (the signer; the subject names it).
    pub hsm: HsmId,
    /// The keys it holds now.
    pub applied: Vec<AppliedKey>,
}

impl ClonesApplied {
    /// Whether the batch has a shape an agent sends: 1 to
    /// [`MAX_APPLIED_PER_EVENT`] entries, no key twice. Anything else is
    /// refused whole, before any of it is folded.
    pub fn check(&self) -> Result<(), crate::Rejection> {
        use crate::RejectReason;
        let n = self.applied.len();
        if n == 0 || n > MAX_APPLIED_PER_EVENT {
            return Err(crate::Rejection::new(
                RejectReason::BatchSize,
                format!("a batch of {n} applied clones (1 to {MAX_APPLIED_PER_EVENT} allowed)"),
            ));
        }
        let mut seen = std::collections::HashSet::with_capacity(n);
        if let Some(dup) = self.applied.iter().find(|a| !seen.insert(a.key_id)) {
            return Err(crate::Rejection::new(
                RejectReason::BatchDuplicate,
                format!("a batch naming key {} twice", dup.key_id),
            ));
        }
        Ok(())
    }

    /// The [`CloneApplied`] facts this batch stands for, in order.
    pub fn units(&self) -> impl Iterator<Item = CloneApplied> + '_ {
        self.applied.iter().map(|a| CloneApplied {
            key_id: a.key_id,
            hsm: self.hsm.clone(),
            fingerprint: a.fingerprint,
            already_present: a.already_present,
        })
    }
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
    /// The HSM holds a key of its own under this id whose `KeyCreated` the
    /// log has not decided yet (two HSMs created the id at once). Passing:
    /// if the log refuses the HSM's own key, the HSM removes it and the
    /// clone applies; if it takes it, the clone's key lost and is never
    /// logged. Never logged as `CloneFailed` by an agent.
    Undecided,
    /// This HSM cannot hold keys of this type (its token lacks a
    /// mechanism, e.g. Ed25519 unwrapping on SoftHSM 2.6.1). Final for
    /// this command; the orchestrator does not send such keys to members
    /// that announced they cannot hold them.
    Unsupported(String),
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
            CloneFailure::Undecided => "this HSM's own create of the id is not decided yet",
            CloneFailure::Unsupported(_) => "this HSM cannot hold keys of this type",
        }
    }

    /// A snake_case name, for metric labels.
    pub fn label(&self) -> &'static str {
        match self {
            CloneFailure::WrongDomain => "wrong_domain",
            CloneFailure::Integrity => "integrity",
            CloneFailure::InvalidMaterial => "invalid_material",
            CloneFailure::FingerprintMismatch => "fingerprint_mismatch",
            CloneFailure::Conflict => "conflict",
            CloneFailure::Storage(_) => "storage",
            CloneFailure::Undecided => "undecided",
            CloneFailure::Unsupported(_) => "unsupported",
        }
    }

    /// Whether the clone can never succeed as sent: the blob or the id is
    /// wrong, and applying it again gives the same answer. Such a failure
    /// is final and logged as `CloneFailed`.
    ///
    /// `Storage` is not permanent: the key is fine and the HSM could not
    /// keep it *now* (disk full, an I/O error, the store busy or closed),
    /// which passes. An agent does not log such a failure; it leaves the
    /// command queued and tries again.
    pub fn is_permanent(&self) -> bool {
        match self {
            CloneFailure::WrongDomain
            | CloneFailure::Integrity
            | CloneFailure::InvalidMaterial
            | CloneFailure::FingerprintMismatch
            | CloneFailure::Conflict
            | CloneFailure::Unsupported(_) => true,
            CloneFailure::Storage(_) | CloneFailure::Undecided => false,
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

/// The key types an HSM can hold as cluster keys (create clonable, and
/// receive as clones). A token may lack a mechanism: SoftHSM 2.6.1 can
/// neither wrap nor unwrap Ed25519. Keys of a type a member cannot hold
/// are not sent to it, and `all` means every live member able to hold
/// them. A member that never announced holds every type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HsmCapabilities {
    /// The HSM.
    pub hsm: HsmId,
    /// The types it holds.
    pub holds: Vec<KeyType>,
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

/// An Ed25519 public key (32 bytes), as it travels.
pub type PublicKeyBytes = [u8; 32];

/// How an HSM was enrolled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrolledVia {
    /// An operator gave its public key (`keysync hsm enroll`).
    Operator,
    /// The agent presented a one-time join token (`keysync hsm token`).
    JoinToken,
}

/// The operator enrolled `hsm` with identity key `public_key`: from this
/// event on, events signed by that key for that HSM are accepted. Signed by
/// the cluster key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HsmEnrolled {
    /// The HSM.
    pub hsm: HsmId,
    /// Its agent's Ed25519 identity key.
    pub public_key: PublicKeyBytes,
    /// How.
    pub via: EnrolledVia,
}

/// The operator removed `hsm`: its identity key is revoked, it is no longer
/// a member, its command queue is purged, and nothing it signs is accepted
/// until it is enrolled again. Signed by the cluster key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HsmRevoked {
    /// The HSM.
    pub hsm: HsmId,
}

/// A one-time join token for `hsm`: whoever holds the token's private key
/// may enroll one identity key for that HSM before `expires_at`. Only the
/// token's public key is logged. Signed by the cluster key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenIssued {
    /// The HSM the token is for.
    pub hsm: HsmId,
    /// The token's Ed25519 public key.
    pub token_key: PublicKeyBytes,
    /// Nanoseconds since the Unix epoch after which the token is void.
    pub expires_at_ns: u64,
}

/// An agent presents a join token. `proof` is the token key's signature
/// over the HSM id and the agent's identity key, so an eavesdropper cannot
/// reuse it for another key; the message itself is signed by the agent's
/// identity key (possession).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequested {
    /// The HSM.
    pub hsm: HsmId,
    /// The agent's identity key to enroll.
    pub public_key: PublicKeyBytes,
    /// The token's public key.
    pub token_key: PublicKeyBytes,
    /// Ed25519 signature (64 bytes) by the token key over
    /// [`join_proof_message`].
    pub proof: Vec<u8>,
}

/// The bytes a join token signs: a domain separator, the HSM id and the
/// agent's identity key.
pub fn join_proof_message(hsm: &HsmId, public_key: &PublicKeyBytes) -> Vec<u8> {
    let mut m = b"keysync-join-v1\0".to_vec();
    m.extend_from_slice(hsm.as_str().as_bytes());
    m.push(0);
    m.extend_from_slice(public_key);
    m
}

/// A signed checkpoint: the active orchestrator checked every event
/// stored in `(after_seq, through_seq]` as it folded it, accepted
/// `accepted` of them, whose exact stored bytes (stream sequence,
/// subject, message id, signer and signature headers, payload) chain to
/// `chain` (SHA-256, see the orchestrator's `checkpoint` module), and
/// rejected the ones in `rejected`, for the reasons given. A replay that
/// finds the same chain over the same run folds it without checking each
/// event's signature again (decision 22).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The run starts after this stream sequence.
    pub after_seq: u64,
    /// The run's last stream sequence (before the checkpoint's own).
    pub through_seq: u64,
    /// Events accepted in the run.
    pub accepted: u64,
    /// SHA-256 chain over the accepted events' stored bytes.
    pub chain: [u8; 32],
    /// Events rejected in the run: stream sequence and reason.
    pub rejected: Vec<(u64, crate::RejectReason)>,
}
