//! The event feed's intake: from a message of the events stream to a
//! verified event for the fold, or to a refusal that is counted, told to
//! the auditor and filed as a dead letter.
//!
//! A refused event is also removed from the events stream by the active
//! orchestrator, once it is filed ([`removal`](crate::removal) says which
//! and why no later verdict moves): a background task files it, waits
//! until the dead-letter stream has it, then deletes it. What a process
//! refuses while it is not acting (a replay, a standby) is remembered and
//! removed when it takes the lease.
//!
//! Checking signatures is most of what a replay costs, so it is done once
//! per event and as cheaply as it can be: a replay's batches are checked
//! in parallel beforehand ([`Intake::preverify`]), and an event this
//! process signed itself that comes back byte for byte is not checked
//! again ([`OwnEvents`]).

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use keysync_schemas::subjects::KeySubject;
use keysync_schemas::{Event, RejectReason, Rejection, Subjects};
use keysync_security::{Claim, DeadLetters, Filing, Keep, MessageIdKey, Signer, Verified};
use tokio::sync::mpsc;

use crate::audit::Verdicts;
use crate::decide::subject_matches;
use crate::plan::{message_id, MsgId};
use crate::removal;
use crate::state::{ClusterState, EventMeta};

/// Refused events being filed and removed at once.
const REMOVING_AT_ONCE: usize = 16;

/// Refused events queued for removal before the loop waits for room.
const REMOVAL_QUEUE: usize = 4096;

/// Refused events remembered while not acting, to remove on taking the
/// lease (beyond that, the next run's replay finds the rest again).
const PENDING_MAX: usize = 100_000;

/// Smallest batch whose signatures are checked in parallel beforehand.
const PREVERIFY_MIN: usize = 16;

/// Most signed-here events remembered (cleared when full: the memo only
/// saves work, forgetting costs a signature check).
const OWN_MAX: usize = 100_000;

/// Events this process signed and has not folded back yet. One that comes
/// back with the same message id, subject, payload and signature needs no
/// signature check.
///
/// An entry is two digests, 48 bytes (it was the id and the base64
/// signature as strings, ~250 bytes with the table's slot): during a
/// burst the fold can lag tens of thousands of own events behind, and
/// the memo then held more memory per tracked key than the fold itself
/// (decision 22). The id is kept as the first 16 bytes of its SHA-256 (a
/// collision only costs a signature check: the content digest must match
/// too); the content as the SHA-256 of subject, payload and signature.
#[derive(Debug, Default)]
pub struct OwnEvents {
    signed: HashMap<[u8; 16], [u8; 32]>,
}

fn id_digest(msg_id: &str) -> [u8; 16] {
    let d = keysync_schemas::record_hash(msg_id.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

fn own_digest(subject: &str, payload: &[u8], signature: &str) -> [u8; 32] {
    let mut bytes = Vec::with_capacity(subject.len() + payload.len() + signature.len() + 2);
    bytes.extend_from_slice(subject.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(signature.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(payload);
    keysync_schemas::record_hash(&bytes)
}

impl OwnEvents {
    /// This process signed `payload` for `subject` under `msg_id`.
    pub fn remember(&mut self, msg_id: &str, subject: &str, payload: &[u8], signature: String) {
        if self.signed.len() >= OWN_MAX {
            self.signed.clear();
        }
        self.signed
            .insert(id_digest(msg_id), own_digest(subject, payload, &signature));
    }

    /// Entries held (for tests and the memory figures).
    pub fn len(&self) -> usize {
        self.signed.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.signed.is_empty()
    }

    /// Whether `msg` is an event signed here, come back with the same
    /// subject, payload and signature (and forgets it either way).
    pub fn came_back(&mut self, msg: &jetstream::Message) -> bool {
        if self.signed.is_empty() {
            return false; // a replay's, a standby's: none signed here
        }
        let Some(h) = msg.headers.as_ref() else {
            return false;
        };
        if h.get(keysync_schemas::headers::SIGNER)
            .is_none_or(|s| s.as_str() != "cluster")
        {
            return false;
        }
        let (Some(id), Some(sig)) = (
            h.get(keysync_schemas::headers::MSG_ID),
            h.get(keysync_schemas::headers::SIGNATURE),
        ) else {
            return false;
        };
        let Some(digest) = self.signed.remove(&id_digest(id.as_str())) else {
            return false;
        };
        // Drained after a burst: give the memory back.
        if self.signed.is_empty() && self.signed.capacity() > 4096 {
            self.signed.shrink_to(1024);
        }
        digest == own_digest(&msg.subject, &msg.payload, sig.as_str())
    }
}

/// Where an event sits in the log, and how many more the consumer holds
/// after it, from its JetStream metadata.
pub fn meta_of(msg: &jetstream::Message) -> anyhow::Result<(EventMeta, u64)> {
    let info = msg
        .info()
        .map_err(|e| anyhow::anyhow!("event without metadata: {e}"))?;
    let meta = EventMeta {
        seq: info.stream_sequence,
        stored_at_ns: u64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0),
    };
    Ok((meta, info.pending))
}

/// A refused event on its way out of the log.
struct Removal {
    seq: u64,
    subject: String,
    payload: Bytes,
    rejection: Rejection,
    keep: Keep,
    /// Overwrite its bytes on disk (a deleted key's material), not only
    /// delete it.
    erase: bool,
}

/// A refused event to remove once this process acts.
struct Pending {
    seq: u64,
    rejection: Rejection,
    keep: Keep,
    erase: bool,
}

/// Checks events and reports what it refused.
pub struct Intake {
    subjects: Subjects,
    cluster_key: [u8; 32],
    dead_letters: DeadLetters,
    verdicts: Arc<Verdicts>,
    /// What dead letters' ids are MACed under.
    ids: MessageIdKey,
    events: jetstream::stream::Stream,
    /// To the task that files and removes refused events.
    removals: mpsc::Sender<Removal>,
    remover: tokio::task::JoinHandle<()>,
    /// Refused while not acting, to remove on taking the lease.
    pending: Vec<Pending>,
}

impl Drop for Intake {
    fn drop(&mut self) {
        self.remover.abort();
    }
}

/// Files each refused event and, once the dead-letter stream has it,
/// deletes it from the events stream; a few at a time, off the loop. One
/// not filed stays (the next run's replay finds it again).
async fn remove(
    rx: mpsc::Receiver<Removal>,
    dead_letters: DeadLetters,
    js: jetstream::Context,
    stream: String,
    ids: MessageIdKey,
) {
    let queue =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    queue
        .for_each_concurrent(REMOVING_AT_ONCE, |r| {
            let (dead_letters, js, stream, ids) = (&dead_letters, &js, &stream, &ids);
            async move {
                let filing = Filing {
                    subject: &r.subject,
                    rejection: r.rejection,
                    stream_seq: Some(r.seq),
                    payload: &r.payload,
                    dedup_id: Some(message_id(ids, MsgId::DeadLetter { seq: r.seq })),
                };
                if let Err(e) = dead_letters.file_confirmed(filing, r.keep).await {
                    tracing::warn!(seq = r.seq, error = %e, "a refused event was not filed, so it stays in the log");
                    return;
                }
                match crate::streams::delete_message(js, stream, r.seq, r.erase).await {
                    Ok(_) => tracing::debug!(seq = r.seq, "refused event removed from the log"),
                    Err(e) => tracing::info!(seq = r.seq, error = %e, "refused event not removed (gone already?)"),
                }
            }
        })
        .await;
}

impl Intake {
    /// An intake for the cluster with public key `cluster_key`, reading
    /// (and removing what it refuses from) `events`; its verdicts go to the
    /// auditor through `verdicts`; dead letters' ids are MACed under
    /// `ids`.
    pub fn new(
        subjects: Subjects,
        cluster_key: [u8; 32],
        dead_letters: DeadLetters,
        verdicts: Arc<Verdicts>,
        ids: MessageIdKey,
        js: jetstream::Context,
        events: jetstream::stream::Stream,
    ) -> Self {
        let (removals, rx) = mpsc::channel(REMOVAL_QUEUE);
        let remover = tokio::spawn(remove(
            rx,
            dead_letters.clone(),
            js,
            subjects.events_stream(),
            ids.clone(),
        ));
        Intake {
            subjects,
            cluster_key,
            dead_letters,
            verdicts,
            ids,
            events,
            removals,
            remover,
            pending: Vec::new(),
        }
    }

    /// Checks the signatures of a batch of events in parallel, against the
    /// keys their signers have now (a batch below `PREVERIFY_MIN` is left
    /// to [`Intake::check`]). Returns, per event, the key its signature
    /// verified with.
    pub async fn preverify(
        &self,
        state: &ClusterState,
        msgs: &[&jetstream::Message],
    ) -> Vec<Option<[u8; 32]>> {
        let mut out = vec![None; msgs.len()];
        if msgs.len() < PREVERIFY_MIN {
            return out;
        }
        let mut at = Vec::with_capacity(msgs.len());
        let mut pending = Vec::with_capacity(msgs.len());
        for (i, msg) in msgs.iter().enumerate() {
            let Ok(claim) = keysync_security::Claim::read(msg.headers.as_ref()) else {
                continue;
            };
            let key = match &claim.signer {
                Signer::Cluster => Some(self.cluster_key),
                Signer::Hsm(h) => state.enrolled_key(h),
            };
            if let Some(key) = key {
                at.push(i);
                pending.push(keysync_security::Pending {
                    subject: msg.subject.to_string(),
                    headers: msg.headers.clone(),
                    payload: msg.payload.clone(),
                    key,
                });
            }
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let verified =
            tokio::task::spawn_blocking(move || keysync_security::preverify(&pending, threads))
                .await
                .unwrap_or_default();
        for (i, v) in at.into_iter().zip(verified) {
            if let Some(slot) = out.get_mut(i) {
                *slot = v;
            }
        }
        out
    }

    /// The event in `msg`, if it is signed by whom it must be, fresh, and
    /// on the subject its body names. `verified` says how much of its
    /// signature check is done (the key it verified with, or a checkpoint
    /// vouching for it); an event that came back from `own` needs no
    /// check either.
    pub fn check(
        &self,
        state: &ClusterState,
        own: &mut OwnEvents,
        msg: &jetstream::Message,
        meta: EventMeta,
        verified: Verified,
    ) -> Result<Event, Rejection> {
        let came_back = own.came_back(msg);
        let verified = match verified {
            Verified::No if came_back => Verified::With(self.cluster_key),
            v => v,
        };
        let subject = msg.subject.as_str();
        keysync_security::check_event_verified(
            msg.headers.as_ref(),
            subject,
            &msg.payload,
            meta.stored_at_ns,
            &self.cluster_key,
            |h| state.enrolled_key(h),
            verified,
        )
        .and_then(|env| {
            if subject_matches(self.subjects.parse_event(subject), &env.body) {
                Ok(env.body)
            } else {
                Err(Rejection::new(
                    RejectReason::SubjectMismatch,
                    format!("a {} on this subject", env.body.kind()),
                ))
            }
        })
    }

    /// The fold accepted the event at `seq` (for the auditor and the
    /// lifecycle mirror); `rejoined`: it is an `HsmJoined` of an HSM the
    /// log said was failed before it.
    pub fn accepted(&self, seq: u64, rejoined: bool) {
        self.verdicts
            .judged_as(seq, crate::audit::Verdict::Accepted { rejoined });
    }

    /// Files a message that held one of our message ids and was not ours
    /// (the publisher removed it from `f.stream`). One in the events
    /// stream gets the dead-letter id the fold would give it.
    pub async fn file_foreign(&self, f: &crate::publisher::Foreign) {
        let in_events = f.stream == self.subjects.events_stream();
        self.dead_letters
            .file(
                Filing {
                    subject: &f.subject,
                    rejection: Rejection::new(
                        RejectReason::ForeignDuplicate,
                        format!(
                            "held message id {} in {} at {}: {}",
                            f.msg_id, f.stream, f.seq, f.why
                        ),
                    ),
                    stream_seq: in_events.then_some(f.seq),
                    payload: &f.payload,
                    dedup_id: in_events
                        .then(|| message_id(&self.ids, MsgId::DeadLetter { seq: f.seq })),
                },
                Keep::Payload,
            )
            .await;
    }

    /// An event was refused (by [`Intake::check`] or by the fold): the
    /// auditor is told. Acting (caught up and holding the lease), the
    /// event is filed and removed from the log if [`removal::removable`]
    /// (filed only, otherwise). Not acting, it is filed once when first
    /// seen caught up (a replay after a restart does not file it again)
    /// and, if removable, remembered for [`Intake::remove_pending`].
    pub async fn refused(
        &mut self,
        state: &ClusterState,
        msg: &jetstream::Message,
        meta: EventMeta,
        (caught_up, active): (bool, bool),
        rejection: Rejection,
    ) {
        self.verdicts.judged(meta.seq, true);
        let of_deleted_key = self.of_deleted_key(state, &msg.subject);
        let keep = removal::kept(of_deleted_key);
        let remove = removal::removable(
            rejection.reason,
            || self.authentic(state, msg),
            state.knows_cluster_key(),
        );
        if remove && caught_up && active {
            let r = Removal {
                seq: meta.seq,
                subject: msg.subject.to_string(),
                payload: msg.payload.clone(),
                rejection,
                keep,
                erase: of_deleted_key,
            };
            // Waits for room: a flood slows the fold rather than grow
            // without bound.
            if self.removals.send(r).await.is_err() {
                tracing::warn!(seq = meta.seq, "the remover stopped; a refused event stays");
            }
            return;
        }
        if remove && self.pending.len() < PENDING_MAX {
            self.pending.push(Pending {
                seq: meta.seq,
                rejection: rejection.clone(),
                keep,
                erase: of_deleted_key,
            });
        }
        if caught_up {
            self.dead_letters
                .file(
                    Filing {
                        subject: &msg.subject,
                        rejection,
                        stream_seq: Some(meta.seq),
                        payload: &msg.payload,
                        dedup_id: Some(message_id(&self.ids, MsgId::DeadLetter { seq: meta.seq })),
                    },
                    keep,
                )
                .await;
        }
    }

    /// Took the lease: files and removes what was refused while not
    /// acting, if it is still in the log.
    pub async fn remove_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            return;
        }
        let mut queued = 0usize;
        for p in pending {
            let Ok(msg) = self.events.direct_get(p.seq).await else {
                continue; // removed already (by the previous active one)
            };
            let r = Removal {
                seq: p.seq,
                subject: msg.subject.to_string(),
                payload: msg.payload,
                rejection: p.rejection,
                keep: p.keep,
                erase: p.erase,
            };
            if self.removals.send(r).await.is_err() {
                break;
            }
            queued += 1;
        }
        tracing::info!(queued, "removing events refused before this process acted");
    }

    /// Whether `msg`'s signature verifies with the key its claimed signer
    /// has at this point of the log (for a message this build cannot
    /// read: see [`removal`]).
    fn authentic(&self, state: &ClusterState, msg: &jetstream::Message) -> bool {
        let Ok(claim) = Claim::read(msg.headers.as_ref()) else {
            return false;
        };
        let key = match &claim.signer {
            Signer::Cluster => Some(self.cluster_key),
            Signer::Hsm(h) => state.enrolled_key(h),
        };
        key.is_some_and(|k| claim.verify(&k, &msg.subject, &msg.payload).is_ok())
    }

    /// Whether `subject` is the `created` subject of a key the fold holds
    /// a tombstone for.
    fn of_deleted_key(&self, state: &ClusterState, subject: &str) -> bool {
        matches!(
            self.subjects.parse_event(subject),
            Some(KeySubject::Created(k)) if state.key(&k).is_some_and(|k| k.deleted)
        )
    }
}
