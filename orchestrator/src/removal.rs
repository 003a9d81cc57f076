//! Which rejected events leave the log, and what of them the dead letter
//! keeps.
//!
//! Anyone who may publish on an event subject can store a message in the
//! events stream; the stream bounds its size, and the fold rejects what is
//! not a fact. A rejected message used to stay there for good (the fuzz
//! run left 6,195). The active orchestrator now files it as a dead letter
//! and then deletes it from the stream.
//!
//! **Why that changes no verdict of a later replay.** A verdict depends
//! only on the message and on the log before it (enrollment as of that
//! point, store times), never on the reader's clock or on what came after;
//! and a rejected message changes nothing in the fold but a counter. So a
//! replay without it judges every other message exactly as a replay with
//! it, and the message itself would be rejected again. The audit chain
//! records accepted facts only, so it never pointed at one (an auditor
//! that reads ahead of the fold checks signatures itself, and a message
//! refused by a fold rule may then be chained: that gap predates this).
//!
//! **What is kept all the same:**
//!
//! - a message this build cannot read (a newer version, an unknown kind,
//!   a bigger one) whose signature verifies with a member's or the cluster
//!   key: it is a newer build's message in a rolling upgrade, and a newer
//!   orchestrator will read it. Unsigned, or signed by nobody known, it is
//!   junk and goes;
//! - any message while the fold has accepted no enrollment (which only the
//!   cluster key signs): an orchestrator started with another cluster's
//!   identity rejects every event of the log it reads, and must not erase
//!   it;
//! - a reason this rule does not list (one added later is kept until
//!   someone decides).
//!
//! **What the dead letter keeps.** A rejected `KeyCreated` of a deleted
//! key carries the wrapped material the delete purged: its letter keeps
//! only the length and SHA-256, so it does not come back through the
//! dead-letter stream.

use keysync_schemas::RejectReason;
use keysync_security::Keep;

/// Whether an event rejected for `reason` is removed from the events
/// stream. `authentic`: its signature verifies with the key its claimed
/// signer had at that point of the log (only asked for messages this
/// build could not read). `cluster_known`: the fold has accepted an
/// enrollment, so the key this orchestrator checks with is the cluster's.
pub fn removable(
    reason: RejectReason,
    authentic: impl FnOnce() -> bool,
    cluster_known: bool,
) -> bool {
    use RejectReason::*;
    if !cluster_known {
        return false;
    }
    match reason {
        // Unreadable to this build: junk, unless a member or the cluster
        // signed it (then a newer build's).
        Oversized | Truncated | BadMagic | UnknownVersion | WrongFamily | Malformed
        | TrailingBytes => !authentic(),
        // Not signed as it must be, or replayed out of its window: judged
        // from the message and the log before it alone.
        Unsigned | MalformedSignature | Unenrolled | BadSignature | SignerMismatch | Stale
        | Future | SubjectMismatch | BadJoinProof => true,
        // Refused by a rule of the fold: the same, deterministic.
        TooManyMembers | UnknownMember | UnknownKey | FingerprintMismatch | ConflictingCreate
        | EraseOfLiveKey | InvalidToken | CreateOfDeletedKey | ForeignDuplicate => true,
        // Not reasons an event is refused for (heartbeats, commands,
        // requests), and any reason added later: kept.
        _ => false,
    }
}

/// What the dead letter of a rejected event keeps: only the length and
/// digest of a `KeyCreated` of a deleted key (`of_deleted_key`: it is on the
/// `created` subject of a key the fold holds a tombstone for), the bytes
/// of anything else (wrapped material at most).
pub fn kept(of_deleted_key: bool) -> Keep {
    if of_deleted_key {
        Keep::DigestOnly
    } else {
        Keep::Payload
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNREADABLE: [RejectReason; 7] = [
        RejectReason::Oversized,
        RejectReason::Truncated,
        RejectReason::BadMagic,
        RejectReason::UnknownVersion,
        RejectReason::WrongFamily,
        RejectReason::Malformed,
        RejectReason::TrailingBytes,
    ];

    #[test]
    fn junk_forgeries_replays_and_refused_facts_are_removed() {
        for reason in [
            RejectReason::Unsigned,
            RejectReason::BadSignature,
            RejectReason::SignerMismatch,
            RejectReason::Unenrolled,
            RejectReason::Stale,
            RejectReason::Future,
            RejectReason::SubjectMismatch,
            RejectReason::UnknownKey,
            RejectReason::ConflictingCreate,
            RejectReason::CreateOfDeletedKey,
        ] {
            assert!(removable(reason, || true, true), "{reason}");
        }
        for reason in UNREADABLE {
            assert!(removable(reason, || false, true), "{reason}");
        }
    }

    #[test]
    fn a_newer_builds_signed_message_is_kept() {
        for reason in UNREADABLE {
            assert!(!removable(reason, || true, true), "{reason}");
        }
        // Readable messages never ask.
        assert!(removable(
            RejectReason::BadSignature,
            || panic!("not asked"),
            true
        ));
    }

    #[test]
    fn nothing_is_removed_before_the_cluster_key_is_known_to_be_right() {
        for reason in RejectReason::ALL {
            assert!(!removable(reason, || false, false), "{reason}");
        }
    }

    #[test]
    fn reasons_that_are_not_about_events_are_kept() {
        for reason in [
            RejectReason::Replayed,
            RejectReason::WrongTarget,
            RejectReason::BadRequest,
            RejectReason::NoReplySubject,
        ] {
            assert!(!removable(reason, || false, true), "{reason}");
        }
    }

    #[test]
    fn a_deleted_keys_material_is_not_filed() {
        assert_eq!(kept(true), Keep::DigestOnly);
        assert_eq!(kept(false), Keep::Payload);
    }
}
