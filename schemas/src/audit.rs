//! The audit log: the facts of the events stream, hash-chained.
//!
//! Each record carries its own sequence in the audit stream (appended with
//! `Nats-Expected-Last-Sequence`, so a record can only land where it says)
//! and the SHA-256 of the previous record's exact payload bytes. Editing,
//! removing, inserting or reordering a record breaks a link that
//! `keysync audit verify` reports. Nothing secret is in a record: no key
//! material, wrapped or not.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::events::{EnrolledVia, Event, KeyOrigin};
use crate::keys::{Durability, Fingerprint, HsmId, KeyId, KeyType};

/// The hash of a record: SHA-256 of its payload bytes as stored.
pub fn record_hash(payload: &[u8]) -> [u8; 32] {
    Sha256::digest(payload).into()
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// This record's sequence in the audit stream.
    pub chain_seq: u64,
    /// [`record_hash`] of the previous record (zeros for the first).
    pub prev_hash: [u8; 32],
    /// Sequence of the fact in the events stream.
    pub event_seq: u64,
    /// When JetStream stored the fact, ns since the epoch.
    pub event_time_ns: u64,
    /// The fact.
    pub fact: AuditFact,
}

/// A fact, as audited (the event without material or free text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditFact {
    /// A key was created.
    KeyCreated {
        /// The key.
        key_id: KeyId,
        /// Its type.
        key_type: KeyType,
        /// Its fingerprint.
        fingerprint: Fingerprint,
        /// The creating HSM.
        hsm: HsmId,
        /// How.
        origin: KeyOrigin,
        /// Requested durability.
        durability: Durability,
    },
    /// An HSM holds the key.
    CloneApplied {
        /// The key.
        key_id: KeyId,
        /// The HSM.
        hsm: HsmId,
        /// The fingerprint it computed.
        fingerprint: Fingerprint,
    },
    /// An HSM could not store the key.
    CloneFailed {
        /// The key.
        key_id: KeyId,
        /// The HSM.
        hsm: HsmId,
        /// Why.
        reason: String,
    },
    /// Every live member held the key.
    KeyReplicated {
        /// The key.
        key_id: KeyId,
        /// Sync latency.
        sync_latency_micros: u64,
    },
    /// A key was deleted.
    KeyDeleted {
        /// The key.
        key_id: KeyId,
        /// The HSM that deleted it.
        hsm: HsmId,
    },
    /// An HSM erased a deleted key.
    KeyErased {
        /// The key.
        key_id: KeyId,
        /// The HSM.
        hsm: HsmId,
    },
    /// An HSM joined (or restarted).
    HsmJoined {
        /// The HSM.
        hsm: HsmId,
    },
    /// An HSM was declared failed.
    HsmFailed {
        /// The HSM.
        hsm: HsmId,
    },
    /// A failed HSM came back.
    HsmRecovered {
        /// The HSM.
        hsm: HsmId,
    },
    /// An HSM's identity key was enrolled.
    HsmEnrolled {
        /// The HSM.
        hsm: HsmId,
        /// Its Ed25519 identity key.
        public_key: [u8; 32],
        /// By an operator or with a join token.
        via: EnrolledVia,
    },
    /// An HSM was removed and its identity key revoked.
    HsmRevoked {
        /// The HSM.
        hsm: HsmId,
    },
    /// A join token was issued for an HSM (its secret never is logged).
    JoinTokenIssued {
        /// The HSM.
        hsm: HsmId,
        /// When it expires, ns since the epoch.
        expires_at_ns: u64,
    },
    /// An agent presented a join token (enrolled if the token was valid).
    JoinRequested {
        /// The HSM.
        hsm: HsmId,
        /// The identity key it asked to enroll.
        public_key: [u8; 32],
    },
    /// An HSM announced the key types it can hold.
    HsmCapabilities {
        /// The HSM.
        hsm: HsmId,
        /// The types.
        holds: Vec<crate::KeyType>,
    },
    /// The active orchestrator vouched for a run of events (decision 22).
    Checkpoint {
        /// The run starts after this stream sequence.
        after_seq: u64,
        /// Its last stream sequence.
        through_seq: u64,
        /// The chain over its accepted events.
        chain: [u8; 32],
    },
    /// An HSM holds each of these keys: the facts of one `CloneApplied`
    /// per entry, audited as the one signed batch event they came in
    /// (`ClonesApplied`, decision 21).
    ClonesApplied {
        /// The HSM.
        hsm: HsmId,
        /// Each key and the fingerprint it computed.
        applied: Vec<(KeyId, Fingerprint)>,
    },
}

/// Who caused an audited fact: the signer the log's policy requires for
/// it (an HSM's agent, or the cluster key), and for the cluster key
/// whether the orchestrator decided it or an operator asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// The HSM's agent (signed with its enrolled identity key).
    Hsm(HsmId),
    /// The active orchestrator (signed with the cluster key).
    Orchestrator,
    /// An operator, with the cluster identity (`keysync hsm ...`).
    Operator,
}

impl Actor {
    /// `hsm`, `orchestrator` or `operator`.
    pub fn kind(&self) -> &'static str {
        match self {
            Actor::Hsm(_) => "hsm",
            Actor::Orchestrator => "orchestrator",
            Actor::Operator => "operator",
        }
    }
}

impl AuditFact {
    /// Who caused the fact. Exact, not guessed: every fact is accepted only
    /// with the one signer the policy allows for its kind
    /// (`keysync_security::event_signer`).
    pub fn actor(&self) -> Actor {
        match self {
            AuditFact::KeyCreated { hsm, .. }
            | AuditFact::CloneApplied { hsm, .. }
            | AuditFact::CloneFailed { hsm, .. }
            | AuditFact::KeyDeleted { hsm, .. }
            | AuditFact::KeyErased { hsm, .. }
            | AuditFact::HsmJoined { hsm }
            | AuditFact::JoinRequested { hsm, .. }
            | AuditFact::HsmCapabilities { hsm, .. }
            | AuditFact::ClonesApplied { hsm, .. } => Actor::Hsm(hsm.clone()),
            AuditFact::KeyReplicated { .. }
            | AuditFact::HsmFailed { .. }
            | AuditFact::HsmRecovered { .. }
            | AuditFact::Checkpoint { .. } => Actor::Orchestrator,
            AuditFact::HsmEnrolled { .. }
            | AuditFact::HsmRevoked { .. }
            | AuditFact::JoinTokenIssued { .. } => Actor::Operator,
        }
    }

    /// The audited form of an event.
    pub fn of(event: &Event) -> AuditFact {
        match event {
            Event::KeyCreated(c) => AuditFact::KeyCreated {
                key_id: c.key_id,
                key_type: c.key_type,
                fingerprint: c.fingerprint,
                hsm: c.hsm.clone(),
                origin: c.origin,
                durability: c.durability,
            },
            Event::CloneApplied(a) => AuditFact::CloneApplied {
                key_id: a.key_id,
                hsm: a.hsm.clone(),
                fingerprint: a.fingerprint,
            },
            Event::CloneFailed(f) => AuditFact::CloneFailed {
                key_id: f.key_id,
                hsm: f.hsm.clone(),
                reason: f.reason.reason().to_string(),
            },
            Event::KeyReplicated(r) => AuditFact::KeyReplicated {
                key_id: r.key_id,
                sync_latency_micros: r.sync_latency_micros,
            },
            Event::KeyDeleted(d) => AuditFact::KeyDeleted {
                key_id: d.key_id,
                hsm: d.hsm.clone(),
            },
            Event::KeyErased(e) => AuditFact::KeyErased {
                key_id: e.key_id,
                hsm: e.hsm.clone(),
            },
            Event::HsmJoined(j) => AuditFact::HsmJoined { hsm: j.hsm.clone() },
            Event::HsmFailed(f) => AuditFact::HsmFailed { hsm: f.hsm.clone() },
            Event::HsmRecovered(r) => AuditFact::HsmRecovered { hsm: r.hsm.clone() },
            Event::HsmEnrolled(e) => AuditFact::HsmEnrolled {
                hsm: e.hsm.clone(),
                public_key: e.public_key,
                via: e.via,
            },
            Event::HsmRevoked(r) => AuditFact::HsmRevoked { hsm: r.hsm.clone() },
            Event::JoinTokenIssued(t) => AuditFact::JoinTokenIssued {
                hsm: t.hsm.clone(),
                expires_at_ns: t.expires_at_ns,
            },
            Event::JoinRequested(j) => AuditFact::JoinRequested {
                hsm: j.hsm.clone(),
                public_key: j.public_key,
            },
            Event::HsmCapabilities(c) => AuditFact::HsmCapabilities {
                hsm: c.hsm.clone(),
                holds: c.holds.clone(),
            },
            Event::Checkpoint(c) => AuditFact::Checkpoint {
                after_seq: c.after_seq,
                through_seq: c.through_seq,
                chain: c.chain,
            },
            Event::ClonesApplied(b) => AuditFact::ClonesApplied {
                hsm: b.hsm.clone(),
                applied: b
                    .applied
                    .iter()
                    .map(|a| (a.key_id, a.fingerprint))
                    .collect(),
            },
        }
    }
}
