//! Whether what JetStream holds under one of our message ids is ours.
//!
//! JetStream answers a publish whose `Nats-Msg-Id` it stored within its
//! duplicate window with "duplicate" and the sequence of what it stored,
//! and drops the new message. That is how a restarted or standby
//! orchestrator avoids sending twice (decision 8); it is also what an
//! attacker who stored junk under the id first exploits (issue 12). Ids are
//! keyed with a secret only orchestrators hold (decision 11), so an outsider
//! cannot tell one in advance; as defense in depth, every duplicate answer
//! is checked against what is stored:
//!
//! - **ours**: on the same subject, under the same id, signed by the
//!   cluster key, carrying the same command or event (its envelope, with
//!   its own id and time, may differ: it may be a crashed run's). Nothing
//!   to do.
//! - **gone**: nothing is stored at that sequence any more: a command an
//!   agent took and acknowledged (the normal case after a restart), or a
//!   message removed since. It cannot be told apart from junk an agent
//!   took and rejected, so the message is sent again under a fresh id:
//!   applying a command twice is a no-op (decision 3), and so is a second
//!   `KeyReplicated`.
//! - **foreign**: anything else. It is removed from the stream, counted
//!   ([`RejectReason::ForeignDuplicate`](keysync_schemas::RejectReason)),
//!   filed as a dead letter, and the message is sent again under a fresh
//!   id.
//!
//! Fresh ids are [`MsgId::Retry`](crate::plan::MsgId::Retry): the first
//! id and an attempt number, MACed, so a restart that meets the same junk
//! takes the same way and finds its own retry stored.

use keysync_schemas::{decode, Command, Event};
use keysync_security::{Claim, Signer};

/// Fresh ids tried for one message before the run gives up (and its
/// restart tries again). Each is MACed under the cluster's secret: past
/// the first, only a crashed run's own retries can be in the way.
pub const MAX_RETRIES: u32 = 8;

/// A message as we published it.
#[derive(Debug, Clone, Copy)]
pub struct Published<'a> {
    /// Its subject.
    pub subject: &'a str,
    /// Its `Nats-Msg-Id`.
    pub msg_id: &'a str,
    /// Its bytes.
    pub payload: &'a [u8],
}

/// What JetStream holds at the sequence it named.
#[derive(Debug, Clone, Copy)]
pub struct Stored<'a> {
    /// Its subject.
    pub subject: &'a str,
    /// Its headers.
    pub headers: Option<&'a async_nats::HeaderMap>,
    /// Its bytes.
    pub payload: &'a [u8],
}

/// What a duplicate answer turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// An orchestrator's copy of the same message.
    Ours,
    /// Nothing is stored there any more.
    Gone,
    /// Someone else's message holds the id; why it is not ours.
    Foreign(String),
}

/// Judges what is stored (`None`: nothing at that sequence) under the id
/// of `ours`, with the cluster's public key.
pub fn judge(ours: Published<'_>, stored: Option<Stored<'_>>, cluster_key: &[u8; 32]) -> Verdict {
    let Some(stored) = stored else {
        return Verdict::Gone;
    };
    let foreign = |why: &str| Verdict::Foreign(why.to_string());
    if stored.subject != ours.subject {
        return foreign("stored on another subject");
    }
    let Ok(claim) = Claim::read(stored.headers) else {
        return foreign("not signed");
    };
    if claim.signer != Signer::Cluster {
        return foreign("not signed by the cluster");
    }
    if claim.msg_id != ours.msg_id {
        return foreign("signed under another id");
    }
    if claim
        .verify(cluster_key, stored.subject, stored.payload)
        .is_err()
    {
        return foreign("its signature does not verify");
    }
    if same_body(ours.payload, stored.payload) {
        Verdict::Ours
    } else {
        foreign("another message under the same id")
    }
}

/// Whether two payloads carry the same command or event (their envelopes'
/// ids, sources and times aside).
fn same_body(a: &[u8], b: &[u8]) -> bool {
    if let Ok(ours) = decode::<Command>(a) {
        return decode::<Command>(b).is_ok_and(|theirs| theirs.body == ours.body);
    }
    if let Ok(ours) = decode::<Event>(a) {
        return decode::<Event>(b).is_ok_and(|theirs| theirs.body == ours.body);
    }
    false
}

/// The attempt after `attempt` (0: the first id), if any is left.
pub fn next_attempt(attempt: u32) -> Option<u32> {
    (attempt < MAX_RETRIES).then_some(attempt + 1)
}

#[cfg(test)]
mod tests {
    //! Given what we published and what is stored under its id, then this
    //! verdict.
    use super::*;
    use crate::testkit::{hsm, key_created};
    use keysync_schemas::{
        encode, CloneKey, DeleteKey, Durability, Envelope, KeyId, KeyReplicated, Source,
    };
    use keysync_security::{signed_headers, Identity};

    fn cluster() -> Identity {
        Identity::from_seed(&[3; 32])
    }

    fn delete(key: KeyId) -> Vec<u8> {
        let cmd = Command::DeleteKey(DeleteKey {
            target: hsm("b"),
            key_id: key,
        });
        encode(&Envelope::new(Source::Orchestrator("o1".into()), cmd)).expect("encode")
    }

    fn signed(
        id: &Identity,
        signer: &Signer,
        subject: &str,
        msg_id: &str,
        payload: &[u8],
    ) -> async_nats::HeaderMap {
        signed_headers(id, signer, subject, msg_id, payload)
    }

    const SUBJECT: &str = "keysync.cmd.b";
    const ID: &str = "delete-b-0123";

    fn judged(
        stored_subject: &str,
        headers: Option<&async_nats::HeaderMap>,
        payload: &[u8],
        ours: &[u8],
    ) -> Verdict {
        judge(
            Published {
                subject: SUBJECT,
                msg_id: ID,
                payload: ours,
            },
            Some(Stored {
                subject: stored_subject,
                headers,
                payload,
            }),
            &cluster().public_key(),
        )
    }

    #[test]
    fn a_crashed_runs_copy_of_the_same_command_is_ours() {
        let k = KeyId::new();
        // Another envelope (id, time, orchestrator name): the same command.
        let theirs = {
            let cmd = Command::DeleteKey(DeleteKey {
                target: hsm("b"),
                key_id: k,
            });
            encode(&Envelope::new(Source::Orchestrator("o2".into()), cmd)).expect("encode")
        };
        let h = signed(&cluster(), &Signer::Cluster, SUBJECT, ID, &theirs);
        assert_eq!(
            judged(SUBJECT, Some(&h), &theirs, &delete(k)),
            Verdict::Ours
        );
    }

    #[test]
    fn nothing_stored_is_gone() {
        let ours = delete(KeyId::new());
        let v = judge(
            Published {
                subject: SUBJECT,
                msg_id: ID,
                payload: &ours,
            },
            None,
            &cluster().public_key(),
        );
        assert_eq!(v, Verdict::Gone);
    }

    #[test]
    fn junk_unsigned_or_signed_by_anyone_else_is_foreign() {
        let k = KeyId::new();
        let ours = delete(k);
        let is_foreign = |v: Verdict| matches!(v, Verdict::Foreign(_));
        // Junk, no headers.
        assert!(is_foreign(judged(SUBJECT, None, b"junk", &ours)));
        // Our very bytes, unsigned.
        assert!(is_foreign(judged(SUBJECT, None, &ours, &ours)));
        // Signed by an agent, or by a stranger claiming to be the cluster.
        let agent = Identity::from_seed(&[4; 32]);
        let h = signed(&agent, &Signer::Hsm(hsm("b")), SUBJECT, ID, &ours);
        assert!(is_foreign(judged(SUBJECT, Some(&h), &ours, &ours)));
        let h = signed(&agent, &Signer::Cluster, SUBJECT, ID, &ours);
        assert!(is_foreign(judged(SUBJECT, Some(&h), &ours, &ours)));
    }

    #[test]
    fn a_cluster_message_on_another_subject_id_or_body_is_foreign() {
        let k = KeyId::new();
        let ours = delete(k);
        let is_foreign = |v: Verdict| matches!(v, Verdict::Foreign(_));
        // Another subject (a replay moved there keeps its own signature).
        let other = "keysync.cmd.c";
        let h = signed(&cluster(), &Signer::Cluster, other, ID, &ours);
        assert!(is_foreign(judged(other, Some(&h), &ours, &ours)));
        // Signed under another id.
        let h = signed(&cluster(), &Signer::Cluster, SUBJECT, "another", &ours);
        assert!(is_foreign(judged(SUBJECT, Some(&h), &ours, &ours)));
        // Another command (another key) under our id.
        let theirs = delete(KeyId::new());
        let h = signed(&cluster(), &Signer::Cluster, SUBJECT, ID, &theirs);
        assert!(is_foreign(judged(SUBJECT, Some(&h), &theirs, &ours)));
        // A clone where a delete was sent.
        let clone = Command::CloneKey(CloneKey {
            target: hsm("b"),
            created_seq: 3,
            key: key_created(k, "a", 1, Durability::Logged),
        });
        let theirs =
            encode(&Envelope::new(Source::Orchestrator("o1".into()), clone)).expect("encode");
        let h = signed(&cluster(), &Signer::Cluster, SUBJECT, ID, &theirs);
        assert!(is_foreign(judged(SUBJECT, Some(&h), &theirs, &ours)));
    }

    #[test]
    fn events_are_compared_by_body_too() {
        let k = KeyId::new();
        let subject = "keysync.evt.key.k.replicated";
        let event = |latency: u64| {
            let e = Event::KeyReplicated(KeyReplicated {
                key_id: k,
                fingerprint: keysync_schemas::Fingerprint([1; 32]),
                holders: vec![hsm("a"), hsm("b")],
                sync_latency_micros: latency,
                created_seq: 3,
            });
            encode(&Envelope::new(Source::Orchestrator("o1".into()), e)).expect("encode")
        };
        let (ours, same, other) = (event(5), event(5), event(6));
        let mine = Published {
            subject,
            msg_id: ID,
            payload: &ours,
        };
        let key = cluster().public_key();
        let h = signed(&cluster(), &Signer::Cluster, subject, ID, &same);
        assert_eq!(
            judge(
                mine,
                Some(Stored {
                    subject,
                    headers: Some(&h),
                    payload: &same
                }),
                &key
            ),
            Verdict::Ours
        );
        let h = signed(&cluster(), &Signer::Cluster, subject, ID, &other);
        assert!(matches!(
            judge(
                mine,
                Some(Stored {
                    subject,
                    headers: Some(&h),
                    payload: &other
                }),
                &key
            ),
            Verdict::Foreign(_)
        ));
    }

    #[test]
    fn retries_are_bounded() {
        assert_eq!(next_attempt(0), Some(1));
        assert_eq!(next_attempt(MAX_RETRIES - 1), Some(MAX_RETRIES));
        assert_eq!(next_attempt(MAX_RETRIES), None);
    }
}
