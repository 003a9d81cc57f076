//! One key id, one key, in the whole cluster: decided by the log.
//!
//! A create names its key id (the SDK picks a random one, but the op API
//! takes any), and two HSMs asked for the same id at once would each make
//! a key under it, with different material. So an agent publishes
//! `KeyCreated` with JetStream's optimistic-concurrency headers: stored
//! only if *no* message exists yet under `<p>.evt.key.<id>.>` (expected
//! last sequence 0 over that filter). The first create of an id is stored;
//! any later one is refused, also when the id belonged to a key deleted
//! since (its `deleted` and `erased` events stay in the log, while its
//! `created` subject is purged).
//!
//! A refusal is not yet a verdict: the message refused may be our own
//! `KeyCreated` published again (from the outbox after a crash, or after a
//! lost PubAck), and nats-server checks the expectation *before*
//! de-duplication on a single node (a clustered stream checks the message
//! id first and answers "duplicate", which is read back the same way: it
//! says only that *a* message had the id). So on a refusal the agent reads the
//! key's first `created` message and its first event ([`judge`]): our own
//! event means the create is logged; another key's event, or events of a
//! deleted key, mean the id is taken, and the agent removes the key it made
//! with its outbox entry ([`Keystore::discard_created`]), keeping no
//! tombstone, so the winner's key is cloned in under that id.
//!
//! [`Keystore::discard_created`]: crate::keystore::Keystore::discard_created

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::stream::DirectGetErrorKind;
use keysync_schemas::{decode, headers, Event, Fingerprint, HsmId, KeyId, Subjects};

use crate::Agent;

/// The headers that make JetStream store a `KeyCreated` only if the log
/// holds nothing yet for its key id.
pub fn expect_new_key_id(h: &mut async_nats::HeaderMap, subjects: &Subjects, key: &KeyId) {
    h.insert(headers::EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
    h.insert(
        headers::EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT,
        subjects.key_events(key).as_str(),
    );
}

/// Whether JetStream refused a publish because its expected last sequence
/// did not hold: error 10071 ("wrong last sequence: N"), or 10164 ("wrong
/// last sequence", a clustered stream with another publish under the same
/// filter in flight).
pub fn refused_by_log(e: &PublishError) -> bool {
    if e.kind() == PublishErrorKind::WrongLastSequence {
        return true;
    }
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|js| js.error_code().0 == 10164)
}

/// What the log says about a `KeyCreated` it refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Our own `KeyCreated` is there (an earlier publish of it was stored):
    /// the create is logged, at this sequence.
    Ours {
        /// Its stream sequence.
        seq: u64,
    },
    /// The id is taken: the reason, for the caller.
    Taken(String),
    /// The log shows nothing under the id (the refusal was about a
    /// publish still in flight): ask again later.
    Undecided,
}

/// The first message of a subject filter: its sequence, subject and bytes.
#[derive(Debug, Clone)]
pub struct Found {
    /// Stream sequence.
    pub seq: u64,
    /// Its subject.
    pub subject: String,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// The rule. `created` is the first message on the key's `created`
/// subject, `first_event` the first under `<p>.evt.key.<id>.>`. Ours is a
/// `KeyCreated` of this key by this HSM with this fingerprint; anything
/// else there (another HSM's key, another key of ours, an unreadable
/// message) takes the id, as do events of a key whose `created` subject was
/// purged (a deleted key).
pub fn judge(
    hsm: &HsmId,
    key: &KeyId,
    fingerprint: &Fingerprint,
    created: Option<&Found>,
    first_event: Option<&Found>,
) -> Verdict {
    if let Some(c) = created {
        return match decode::<Event>(&c.payload).map(|e| e.body) {
            Ok(Event::KeyCreated(k))
                if k.key_id == *key && k.hsm == *hsm && k.fingerprint == *fingerprint =>
            {
                Verdict::Ours { seq: c.seq }
            }
            Ok(Event::KeyCreated(k)) => Verdict::Taken(format!(
                "{} created a key under it first (stream sequence {}, fingerprint {})",
                k.hsm, c.seq, k.fingerprint
            )),
            _ => Verdict::Taken(format!(
                "the log holds another message on its created subject (stream sequence {})",
                c.seq
            )),
        };
    }
    match first_event {
        Some(e) => Verdict::Taken(format!(
            "it belonged to a key deleted since (its events remain in the log, from stream sequence {} on {}); key ids are never reused",
            e.seq, e.subject
        )),
        None => Verdict::Undecided,
    }
}

/// The first message under `filter` in the events stream, by direct get
/// (`$JS.API.DIRECT.GET.<stream>` with `next_by_subj`, which takes
/// wildcards).
async fn first_under(agent: &Agent, filter: String) -> Result<Option<Found>, String> {
    let stream = agent
        .js
        .get_stream_no_info(agent.subjects.events_stream())
        .await
        .map_err(|e| e.to_string())?;
    match stream
        .direct_get_builder()
        .sequence(1)
        .next_by_subject(filter)
        .send()
        .await
    {
        Ok(m) => Ok(Some(Found {
            seq: m.sequence,
            subject: m.subject.to_string(),
            payload: m.payload.to_vec(),
        })),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Reads the log and judges a refused `KeyCreated` ([`judge`]). A log that
/// shows nothing yet is asked again a few times (a clustered stream refuses
/// a publish while another one under the same filter is in flight).
pub async fn settle(agent: &Agent, key: &KeyId, fingerprint: &Fingerprint) -> Verdict {
    for pause in [20u64, 100, 400, 0] {
        let created = first_under(agent, agent.subjects.key_created(key)).await;
        let verdict = match created {
            Ok(Some(c)) => judge(&agent.hsm, key, fingerprint, Some(&c), None),
            Ok(None) => match first_under(agent, agent.subjects.key_events(key)).await {
                Ok(first) => judge(&agent.hsm, key, fingerprint, None, first.as_ref()),
                Err(e) => {
                    tracing::warn!(%key, error = %e, "cannot read the log to settle a refused create");
                    Verdict::Undecided
                }
            },
            Err(e) => {
                tracing::warn!(%key, error = %e, "cannot read the log to settle a refused create");
                Verdict::Undecided
            }
        };
        if verdict != Verdict::Undecided || pause == 0 {
            return verdict;
        }
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    Verdict::Undecided
}

/// What became of a published `KeyCreated`.
#[derive(Debug)]
pub enum Outcome {
    /// Stored (or found stored: ours), at this sequence; the outbox entry
    /// is forgotten.
    Logged(u64),
    /// The id is taken in the cluster (why); the key this HSM made under
    /// it was removed with its outbox entry (or will be, by the outbox
    /// loop, if the store failed now).
    Taken(String),
    /// Not decided (JetStream away, too slow, or the log not yet showing
    /// the id): the entry stays in the outbox and is published again.
    Pending(String),
}

/// Waits for the PubAck of a `KeyCreated` (at most `timeout`, if given,
/// and as long again to read the log after a refusal) and, if the log
/// refused it, settles who holds the id; a lost create is undone here.
/// `entry` is the outbox entry as stored.
pub async fn await_created(
    agent: &Arc<Agent>,
    key: KeyId,
    fingerprint: Fingerprint,
    entry: Vec<u8>,
    published: anyhow::Result<PublishAckFuture>,
    timeout: Option<Duration>,
) -> Outcome {
    let fut = match published {
        Ok(f) => f,
        Err(e) => return Outcome::Pending(e.to_string()),
    };
    let acked = match timeout {
        Some(t) => match tokio::time::timeout(t, fut).await {
            Ok(r) => r,
            Err(_) => {
                return Outcome::Pending(
                    "timed out waiting for the JetStream acknowledgement".into(),
                )
            }
        },
        None => fut.await,
    };
    let refusal = match acked {
        Ok(ack) if !ack.duplicate => {
            agent.outbox_confirmed(key);
            return Outcome::Logged(ack.sequence);
        }
        // "Duplicate" says only that some message had this id: ours stored
        // before (a clustered stream checks the id first), or one stored
        // under it by someone who learnt it. Read back like a refusal.
        Ok(ack) => format!(
            "answered as a duplicate of stream sequence {}",
            ack.sequence
        ),
        Err(e) if refused_by_log(&e) => e.to_string(),
        Err(e) => return Outcome::Pending(e.to_string()),
    };
    // The log is read within the caller's time too: a create's answer
    // must not wait on a server that stopped answering.
    let verdict = match timeout {
        Some(t) => tokio::time::timeout(t, settle(agent, &key, &fingerprint))
            .await
            .unwrap_or(Verdict::Undecided),
        None => settle(agent, &key, &fingerprint).await,
    };
    match verdict {
        Verdict::Ours { seq } => {
            tracing::info!(%key, seq, "KeyCreated refused as already logged: the log holds this HSM's own (published again)");
            agent.outbox_confirmed(key);
            Outcome::Logged(seq)
        }
        Verdict::Taken(why) => {
            let store = agent.store.clone();
            let removed = tokio::task::spawn_blocking(move || {
                store.discard_created(&key, &fingerprint, &entry)
            })
            .await;
            match removed {
                Ok(Ok(removed)) => {
                    tracing::warn!(%key, removed, reason = %why, "the log refused this HSM's KeyCreated: the key id is taken in the cluster; the key made here is removed");
                }
                Ok(Err(e)) => {
                    tracing::warn!(%key, error = %e, reason = %why, "the key id is taken in the cluster, but the key made here could not be removed yet; the outbox loop tries again");
                }
                Err(e) => tracing::error!(%key, error = %e, "removing a refused key panicked"),
            }
            Outcome::Taken(why)
        }
        Verdict::Undecided => Outcome::Pending(format!(
            "JetStream did not store KeyCreated ({refusal}) and the log shows nothing under the id yet"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keysync_schemas::{
        encode, DomainId, Durability, Envelope, KeyAttributes, KeyCreated, KeyDeleted, KeyOrigin,
        KeyType, Source,
    };

    fn hsm(s: &str) -> HsmId {
        HsmId::new(s).expect("id")
    }

    fn created(key: KeyId, by: &str, fp: Fingerprint, seq: u64) -> Found {
        let env = Envelope::new(
            Source::Hsm(hsm(by)),
            Event::KeyCreated(KeyCreated {
                key_id: key,
                key_type: KeyType::Ed25519,
                fingerprint: fp,
                hsm: hsm(by),
                origin: KeyOrigin::Generated,
                attributes: KeyAttributes::default(),
                durability: Durability::Logged,
                domain: DomainId([1; 8]),
                wrapped: vec![0; 40],
                public_key: None,
            }),
        );
        Found {
            seq,
            subject: format!("keysync.evt.key.{key}.created"),
            payload: encode(&env).expect("encode"),
        }
    }

    #[test]
    fn our_own_event_in_the_log_means_logged() {
        let key = KeyId::new();
        let fp = Fingerprint([3; 32]);
        let c = created(key, "hsm-1", fp, 17);
        assert_eq!(
            judge(&hsm("hsm-1"), &key, &fp, Some(&c), Some(&c)),
            Verdict::Ours { seq: 17 }
        );
    }

    #[test]
    fn another_key_under_the_id_takes_it() {
        let key = KeyId::new();
        let ours = Fingerprint([3; 32]);
        // Another HSM's key, and our HSM with other material (a create
        // under an id this HSM had used itself).
        for (by, fp) in [
            ("hsm-2", ours),
            ("hsm-2", Fingerprint([4; 32])),
            ("hsm-1", Fingerprint([4; 32])),
        ] {
            let c = created(key, by, fp, 5);
            assert!(
                matches!(
                    judge(&hsm("hsm-1"), &key, &ours, Some(&c), None),
                    Verdict::Taken(_)
                ),
                "{by}"
            );
        }
        let junk = Found {
            seq: 9,
            subject: format!("keysync.evt.key.{key}.created"),
            payload: b"junk".to_vec(),
        };
        assert!(matches!(
            judge(&hsm("hsm-1"), &key, &ours, Some(&junk), None),
            Verdict::Taken(_)
        ));
    }

    #[test]
    fn a_deleted_keys_events_take_the_id_and_nothing_is_undecided() {
        let key = KeyId::new();
        let fp = Fingerprint([3; 32]);
        let env = Envelope::new(
            Source::Hsm(hsm("hsm-2")),
            Event::KeyDeleted(KeyDeleted {
                key_id: key,
                fingerprint: Fingerprint([9; 32]),
                hsm: hsm("hsm-2"),
            }),
        );
        let deleted = Found {
            seq: 40,
            subject: format!("keysync.evt.key.{key}.deleted"),
            payload: encode(&env).expect("encode"),
        };
        match judge(&hsm("hsm-1"), &key, &fp, None, Some(&deleted)) {
            Verdict::Taken(why) => assert!(why.contains("deleted"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            judge(&hsm("hsm-1"), &key, &fp, None, None),
            Verdict::Undecided
        );
    }
}
