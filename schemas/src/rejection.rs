//! Why a message was rejected: one typed reason, from the check that
//! refuses a message to the counters, the dead-letter stream, the status
//! reply and the SDK.
//!
//! Every receiver (orchestrator, agent, client) rejects bad input with a
//! [`Rejection`]: a [`RejectReason`] that is counted and compared, detail
//! for people, and the signer the message claimed. Nobody matches on
//! strings; the snake_case names ([`RejectReason::as_str`]) exist for
//! people, JSON and Prometheus labels only.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a message was rejected.
///
/// On the wire (bincode) a reason is its variant index: add new reasons
/// at the end only. In JSON it is the snake_case name.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Larger than the message limit.
    Oversized,
    /// Shorter than its header or body says.
    Truncated,
    /// Not a keysync message (wrong magic bytes).
    BadMagic,
    /// A schema version this build cannot read.
    UnknownVersion,
    /// A message of another family (a command where an event belongs).
    WrongFamily,
    /// The body does not decode.
    Malformed,
    /// Bytes left after the body.
    TrailingBytes,
    /// No signature, signer or deduplication id.
    Unsigned,
    /// Signature headers that are not well formed.
    MalformedSignature,
    /// The signer is not enrolled (or was revoked).
    Unenrolled,
    /// The signature does not verify.
    BadSignature,
    /// Signed by someone who may not send it (an agent signing another
    /// agent's event, an agent signing a command).
    SignerMismatch,
    /// Older than the replay window.
    Stale,
    /// From further in the future than clocks may drift.
    Future,
    /// Seen already (a heartbeat not newer than the sender's last).
    Replayed,
    /// The subject does not match the body (an event moved to another
    /// key's or HSM's subject).
    SubjectMismatch,
    /// A command addressed to another HSM.
    WrongTarget,
    /// A join request whose token proof does not verify.
    BadJoinProof,
    /// A join beyond the cluster's member limit.
    TooManyMembers,
    /// An event about an HSM that never joined.
    UnknownMember,
    /// An event about a key that was never created.
    UnknownKey,
    /// A clone result whose fingerprint differs from the key's.
    FingerprintMismatch,
    /// A second `KeyCreated` for an id, with another fingerprint.
    ConflictingCreate,
    /// An erase of a key that is not deleted.
    EraseOfLiveKey,
    /// A join request with an unknown, used, expired or foreign token.
    InvalidToken,
    /// A key-operation request the agent cannot carry out as asked.
    BadRequest,
    /// A request with no reply subject.
    NoReplySubject,
    /// A request whose reply subject is not an inbox (`_INBOX.…`):
    /// answering it would publish the reply wherever the requester
    /// pointed (the audit stream, the lease bucket, a command queue), with
    /// the responder's permissions. Never answered.
    ForeignReplySubject,
    /// A message in a stream or bucket keysync writes alone (the audit
    /// stream, the lease bucket) that is not one of keysync's records:
    /// skipped and reported, never taken for one.
    ForeignRecord,
    /// A message stored under one of the orchestrator's message ids that
    /// no orchestrator sent: JetStream dropped the real one as its
    /// duplicate. It is removed and the real one sent again under a fresh
    /// id.
    ForeignDuplicate,
    /// A `KeyCreated` of a key that was deleted (a replay, or an outbox
    /// retry after the delete): never applied, and removed from the log at
    /// once, since it carries the wrapped material the delete purged.
    CreateOfDeletedKey,
    /// A checkpoint whose run, as stored now, is not the run it vouches
    /// for (an event altered, inserted or removed since): the run is
    /// checked event by event instead.
    CheckpointMismatch,
    /// A checkpoint for an empty run, a run that does not end before it,
    /// or a run another checkpoint covers already (a replayed one).
    CheckpointOutOfPlace,
    /// A batch event (`ClonesApplied`) that is empty or names more keys
    /// than [`crate::MAX_APPLIED_PER_EVENT`]: an agent never sends one.
    BatchSize,
    /// A batch event naming the same key twice: an agent never sends one.
    BatchDuplicate,
}

impl RejectReason {
    /// Every reason, in wire order.
    pub const ALL: [RejectReason; 35] = [
        RejectReason::Oversized,
        RejectReason::Truncated,
        RejectReason::BadMagic,
        RejectReason::UnknownVersion,
        RejectReason::WrongFamily,
        RejectReason::Malformed,
        RejectReason::TrailingBytes,
        RejectReason::Unsigned,
        RejectReason::MalformedSignature,
        RejectReason::Unenrolled,
        RejectReason::BadSignature,
        RejectReason::SignerMismatch,
        RejectReason::Stale,
        RejectReason::Future,
        RejectReason::Replayed,
        RejectReason::SubjectMismatch,
        RejectReason::WrongTarget,
        RejectReason::BadJoinProof,
        RejectReason::TooManyMembers,
        RejectReason::UnknownMember,
        RejectReason::UnknownKey,
        RejectReason::FingerprintMismatch,
        RejectReason::ConflictingCreate,
        RejectReason::EraseOfLiveKey,
        RejectReason::InvalidToken,
        RejectReason::BadRequest,
        RejectReason::NoReplySubject,
        RejectReason::ForeignReplySubject,
        RejectReason::ForeignRecord,
        RejectReason::ForeignDuplicate,
        RejectReason::CreateOfDeletedKey,
        RejectReason::CheckpointMismatch,
        RejectReason::CheckpointOutOfPlace,
        RejectReason::BatchSize,
        RejectReason::BatchDuplicate,
    ];

    /// The snake_case name, for people, JSON and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            RejectReason::Oversized => "oversized",
            RejectReason::Truncated => "truncated",
            RejectReason::BadMagic => "bad_magic",
            RejectReason::UnknownVersion => "unknown_version",
            RejectReason::WrongFamily => "wrong_family",
            RejectReason::Malformed => "malformed",
            RejectReason::TrailingBytes => "trailing_bytes",
            RejectReason::Unsigned => "unsigned",
            RejectReason::MalformedSignature => "malformed_signature",
            RejectReason::Unenrolled => "unenrolled",
            RejectReason::BadSignature => "bad_signature",
            RejectReason::SignerMismatch => "signer_mismatch",
            RejectReason::Stale => "stale",
            RejectReason::Future => "future",
            RejectReason::Replayed => "replayed",
            RejectReason::SubjectMismatch => "subject_mismatch",
            RejectReason::WrongTarget => "wrong_target",
            RejectReason::BadJoinProof => "bad_join_proof",
            RejectReason::TooManyMembers => "too_many_members",
            RejectReason::UnknownMember => "unknown_member",
            RejectReason::UnknownKey => "unknown_key",
            RejectReason::FingerprintMismatch => "fingerprint_mismatch",
            RejectReason::ConflictingCreate => "conflicting_create",
            RejectReason::EraseOfLiveKey => "erase_of_live_key",
            RejectReason::InvalidToken => "invalid_token",
            RejectReason::BadRequest => "bad_request",
            RejectReason::NoReplySubject => "no_reply_subject",
            RejectReason::ForeignReplySubject => "foreign_reply_subject",
            RejectReason::ForeignRecord => "foreign_record",
            RejectReason::ForeignDuplicate => "foreign_duplicate",
            RejectReason::CreateOfDeletedKey => "create_of_deleted_key",
            RejectReason::CheckpointMismatch => "checkpoint_mismatch",
            RejectReason::CheckpointOutOfPlace => "checkpoint_out_of_place",
            RejectReason::BatchSize => "batch_size",
            RejectReason::BatchDuplicate => "batch_duplicate",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Not a reason keysync knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown rejection reason {0:?}")]
pub struct UnknownReason(pub String);

impl std::str::FromStr for RejectReason {
    type Err = UnknownReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RejectReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReason(s.to_string()))
    }
}

/// A rejected message: the counted reason, detail for people (never
/// payload bytes), and the signer it claimed, if it claimed one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Rejection {
    /// What is counted.
    pub reason: RejectReason,
    /// What happened, for people.
    pub detail: String,
    /// The signer it claimed (`cluster`, `hsm/<id>`).
    pub signer: Option<String>,
}

impl Rejection {
    /// A rejection that claims no signer.
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
            signer: None,
        }
    }

    /// The same rejection, of a message that claimed `signer`.
    pub fn claimed_by(mut self, signer: impl Into<String>) -> Self {
        self.signer = Some(signer.into());
        self
    }
}

impl From<crate::DecodeError> for Rejection {
    fn from(e: crate::DecodeError) -> Self {
        Rejection::new(e.reason(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_one_name_that_parses_back() {
        let mut names: Vec<&str> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        for r in RejectReason::ALL {
            assert_eq!(r.as_str().parse::<RejectReason>(), Ok(r));
            assert_eq!(
                serde_json::to_string(&r).expect("json"),
                format!("\"{}\"", r.as_str())
            );
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), RejectReason::ALL.len());
        assert!("no_such_reason".parse::<RejectReason>().is_err());
    }

    #[test]
    fn wire_order_is_the_declaration_order() {
        // bincode writes the variant index: ALL must list variants in
        // declaration order, so a new reason goes at the end of both.
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            let bytes =
                bincode::serde::encode_to_vec(r, bincode::config::standard()).expect("encode");
            assert_eq!(bytes, vec![i as u8], "{r}");
        }
    }
}
