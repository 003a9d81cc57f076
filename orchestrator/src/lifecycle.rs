//! The lifecycle mirror: the active orchestrator copies every fact another
//! service could care about from the signed events stream into
//! `KEYSYNC_LIFECYCLE`, as CloudEvents 1.0 in structured JSON mode (see
//! `docs/decisions/0014-lifecycle-events.md`).
//!
//! What a fact becomes is decided by pure functions ([`data_of`],
//! [`cloud_event`], [`mirrored`]): the same fact always gives the same
//! bytes under the same id (`events-<seq>`), which is also the message's
//! `Nats-Msg-Id`. Where to resume is read back from the lifecycle stream
//! itself ([`cursor_of`]: the events-stream sequence of its last message
//! signed by the cluster), so a new active orchestrator after a failover
//! or a restart neither skips a fact nor stores one twice, however long
//! after; the duplicate window only has to cover what the old active one
//! still had in flight.
//!
//! Which facts count is decided as the fold decides it: the mirror runs
//! its own [`ClusterState`] over the log (from the snapshot when that is
//! not past the cursor), with the same signature, subject and state
//! checks, so a forged, replayed or refused event is never mirrored. It
//! runs as its own task beside the fold, like the auditor, and like it
//! ends the orchestrator's run when it cannot publish (crash-only).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::stream::{self, DirectGetErrorKind};
use async_nats::jetstream::{self, consumer::pull};
use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use keysync_schemas::lifecycle::{
    self, About, CloudEvent, HsmEnrolledData, HsmFailedData, HsmJoinedData, HsmRecoveredData,
    HsmRemovedData, KeyAppliedData, KeyCloneFailedData, KeyCreatedData, KeyDeletedData,
    KeyErasedData, KeyReplicatedData, LifecycleData,
};
use keysync_schemas::{headers, EnrolledVia, Event, Subjects};
use keysync_security::{Claim, Identity, Signer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::audit::{Verdict, Verdicts};
use crate::decide::subject_matches;
use crate::state::{ClusterState, EventMeta};

/// How long the lifecycle stream remembers a `Nats-Msg-Id`. It covers a
/// failover many times over (the lease is seconds): the one case where two
/// orchestrators publish the same facts at once. Past it the cursor alone
/// keeps a fact from being stored twice.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Largest lifecycle event stored (they are a few hundred bytes).
pub const MAX_EVENT_BYTES: i32 = 8 * 1024;

/// Most publishes awaiting their PubAck at once.
const IN_FLIGHT: usize = 256;

/// Most messages looked at, walking back over foreign ones, to find the
/// cursor.
const MAX_WALK_BACK: u64 = 100_000;

/// One lifecycle message in this many carries the cluster's signature
/// (the others only their `Nats-Msg-Id`). The signature is what makes a
/// message a cursor; signing each one was a fifth of the orchestrator's
/// CPU under load (an Ed25519 signature per CloudEvent, four per key).
/// Resuming from a signed message, the mirror finds the unsigned ones
/// stored after it (at most this many less one of its own) and does not
/// store them again ([`Tail`]), so the cursor stays exactly-once.
/// Consumers check an event against the signed events stream
/// (decision 14), not by the lifecycle message's own signature.
pub const SIGN_EVERY: u64 = 16;

/// Most unsigned messages remembered after the cursor (ours are fewer
/// than [`SIGN_EVERY`]; the rest would be a flood of foreign ones).
const MAX_TAIL: usize = 4 * 1024;

/// The lifecycle stream: CloudEvents, kept (limits retention), file
/// storage, bounded in message size.
pub fn stream_config(subjects: &Subjects, replicas: usize) -> stream::Config {
    stream::Config {
        name: subjects.lifecycle_stream(),
        description: Some(
            "keysync lifecycle events: CloudEvents 1.0 (JSON) mirrored from the events stream"
                .into(),
        ),
        subjects: vec![subjects.lifecycle_all()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_message_size: MAX_EVENT_BYTES,
        duplicate_window: DUPLICATE_WINDOW,
        allow_direct: true,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Nanoseconds since the epoch in RFC 3339 (UTC), the one time format of
/// keysync's JSON outputs. Empty if out of range (never, for a real clock).
pub fn rfc3339(ns: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// The lifecycle id (and `Nats-Msg-Id`) of the fact at events-stream
/// sequence `seq`.
pub fn event_id(seq: u64) -> String {
    format!("events-{seq}")
}

/// The lifecycle id of the `index`-th fact of the batch event at
/// events-stream sequence `seq` (a `ClonesApplied`: one `key.applied`
/// per key, decision 21): `events-<seq>-<index>`. Unique (one event per
/// sequence, one index per entry; the single-fact form has no second
/// dash) and the same on every replay, since a batch's entries are in the
/// signed event in a fixed order.
pub fn batch_event_id(seq: u64, index: usize) -> String {
    format!("events-{seq}-{index}")
}

/// The lifecycle id of a fact: [`event_id`], or [`batch_event_id`] for
/// the `index`-th fact of a batch.
fn fact_id(seq: u64, index: Option<usize>) -> String {
    match index {
        None => event_id(seq),
        Some(i) => batch_event_id(seq, i),
    }
}

/// The CloudEvents `source` of a cluster.
pub fn source(subjects: &Subjects) -> String {
    format!("urn:keysync:{}", subjects.prefix())
}

/// What a fact tells other services, if anything. Never key material: a
/// `KeyCreated`'s wrapped blob and public key stay in the signed log.
/// Enrollment requests, join tokens and capability announcements are
/// internal to the cluster and not mirrored; a clone failure is (only
/// final ones are logged). `was_failed`: the log said the event's HSM was
/// failed before it (a failed HSM that joins again has recovered).
pub fn data_of(event: &Event, was_failed: bool) -> Option<LifecycleData> {
    Some(match event {
        Event::KeyCreated(c) => LifecycleData::KeyCreated(KeyCreatedData {
            key_id: c.key_id.to_string(),
            key_type: c.key_type.into(),
            fingerprint: c.fingerprint.to_hex(),
            hsm: c.hsm.to_string(),
            origin: c.origin.into(),
            durability: c.durability.to_string(),
            label: c.attributes.label.clone(),
            app_id: c.attributes.app_id_hex(),
        }),
        Event::CloneApplied(a) => LifecycleData::KeyApplied(KeyAppliedData {
            key_id: a.key_id.to_string(),
            hsm: a.hsm.to_string(),
            fingerprint: a.fingerprint.to_hex(),
            already_present: a.already_present,
        }),
        Event::CloneFailed(f) => LifecycleData::KeyCloneFailed(KeyCloneFailedData {
            key_id: f.key_id.to_string(),
            hsm: f.hsm.to_string(),
            reason: f.reason.label().to_string(),
            detail: f.reason.reason().to_string(),
        }),
        Event::KeyReplicated(r) => LifecycleData::KeyReplicated(KeyReplicatedData {
            key_id: r.key_id.to_string(),
            fingerprint: r.fingerprint.to_hex(),
            holders: r.holders.iter().map(|h| h.to_string()).collect(),
            sync_latency_ms: r.sync_latency_micros as f64 / 1000.0,
            created_seq: r.created_seq,
        }),
        Event::KeyDeleted(d) => LifecycleData::KeyDeleted(KeyDeletedData {
            key_id: d.key_id.to_string(),
            fingerprint: d.fingerprint.to_hex(),
            hsm: d.hsm.to_string(),
        }),
        Event::KeyErased(e) => LifecycleData::KeyErased(KeyErasedData {
            key_id: e.key_id.to_string(),
            hsm: e.hsm.to_string(),
            was_present: e.was_present,
        }),
        Event::HsmJoined(j) if was_failed => LifecycleData::HsmRecovered(HsmRecoveredData {
            hsm: j.hsm.to_string(),
            rejoined: true,
            agent_version: Some(j.agent_version.clone()),
            token_keys: Some(j.token_keys),
        }),
        Event::HsmJoined(j) => LifecycleData::HsmJoined(HsmJoinedData {
            hsm: j.hsm.to_string(),
            agent_version: j.agent_version.clone(),
            token_keys: j.token_keys,
        }),
        Event::HsmFailed(f) => LifecycleData::HsmFailed(HsmFailedData {
            hsm: f.hsm.to_string(),
            silent_ms: f.silent_ms,
        }),
        Event::HsmRecovered(r) => LifecycleData::HsmRecovered(HsmRecoveredData {
            hsm: r.hsm.to_string(),
            rejoined: false,
            agent_version: None,
            token_keys: None,
        }),
        Event::HsmEnrolled(e) => LifecycleData::HsmEnrolled(HsmEnrolledData {
            hsm: e.hsm.to_string(),
            public_key: hex::encode(e.public_key),
            via: match e.via {
                EnrolledVia::Operator => "operator",
                EnrolledVia::JoinToken => "join_token",
            }
            .to_string(),
        }),
        Event::HsmRevoked(r) => LifecycleData::HsmRemoved(HsmRemovedData {
            hsm: r.hsm.to_string(),
        }),
        Event::JoinTokenIssued(_)
        | Event::JoinRequested(_)
        | Event::HsmCapabilities(_)
        | Event::Checkpoint(_) => return None,
        // Many facts: mirrored one per key by [`mirrored_all`].
        Event::ClonesApplied(_) => return None,
    })
}

/// The key or HSM a lifecycle event is about (its CloudEvents `subject`).
fn about_id(data: &LifecycleData) -> &str {
    match data {
        LifecycleData::KeyCreated(d) => &d.key_id,
        LifecycleData::KeyApplied(d) => &d.key_id,
        LifecycleData::KeyCloneFailed(d) => &d.key_id,
        LifecycleData::KeyReplicated(d) => &d.key_id,
        LifecycleData::KeyDeleted(d) => &d.key_id,
        LifecycleData::KeyErased(d) => &d.key_id,
        LifecycleData::HsmJoined(d) => &d.hsm,
        LifecycleData::HsmFailed(d) => &d.hsm,
        LifecycleData::HsmRecovered(d) => &d.hsm,
        LifecycleData::HsmEnrolled(d) => &d.hsm,
        LifecycleData::HsmRemoved(d) => &d.hsm,
    }
}

/// W3C trace context carried by a fact (its `traceparent` and
/// `tracestate` headers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    /// `traceparent`.
    pub parent: Option<String>,
    /// `tracestate`.
    pub state: Option<String>,
}

impl Trace {
    /// The trace context in a message's headers.
    pub fn of(h: Option<&async_nats::HeaderMap>) -> Trace {
        let get = |name: &str| {
            h.and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
                .filter(|v| !v.is_empty())
        };
        Trace {
            parent: get(headers::TRACEPARENT),
            state: get(headers::TRACESTATE),
        }
    }
}

/// The CloudEvent for `data`, the fact stored at `meta` with trace `trace`.
pub fn cloud_event(
    subjects: &Subjects,
    meta: EventMeta,
    data: LifecycleData,
    trace: Trace,
) -> CloudEvent<LifecycleData> {
    batch_cloud_event(subjects, meta, None, data, trace)
}

/// [`cloud_event`] for the `index`-th fact of a batch event (`None`: a
/// single fact).
fn batch_cloud_event(
    subjects: &Subjects,
    meta: EventMeta,
    index: Option<usize>,
    data: LifecycleData,
    trace: Trace,
) -> CloudEvent<LifecycleData> {
    CloudEvent {
        specversion: lifecycle::SPEC_VERSION.into(),
        id: fact_id(meta.seq, index),
        source: source(subjects),
        event_type: data.event_type(),
        subject: about_id(&data).to_string(),
        time: rfc3339(meta.stored_at_ns),
        datacontenttype: lifecycle::DATA_CONTENT_TYPE.into(),
        dataschema: format!("{}{}", lifecycle::SCHEMA_BASE, data.schema_file()),
        keysyncseq: meta.seq.to_string(),
        traceparent: trace.parent,
        tracestate: trace.state,
        data,
    }
}

/// A lifecycle message ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirrored {
    /// `<p>.lifecycle.<key|hsm>.<id>.<event>`
    pub subject: String,
    /// `Nats-Msg-Id` (the CloudEvent's `id`).
    pub msg_id: String,
    /// The structured-mode JSON.
    pub payload: Vec<u8>,
}

/// What the accepted fact `event`, stored at `meta`, is mirrored as: its
/// lifecycle message, or nothing. `was_failed` as for [`data_of`].
pub fn mirrored(
    subjects: &Subjects,
    meta: EventMeta,
    event: &Event,
    was_failed: bool,
    trace: Trace,
) -> Option<Mirrored> {
    mirrored_fact(subjects, meta, None, data_of(event, was_failed)?, trace)
}

/// Every lifecycle message of the accepted fact `event`: [`mirrored`], or
/// for a batch event one per fact it stands for (a `ClonesApplied` of N
/// keys: N `key.applied`, with ids [`batch_event_id`]), in order.
pub fn mirrored_all(
    subjects: &Subjects,
    meta: EventMeta,
    event: &Event,
    was_failed: bool,
    trace: Trace,
) -> Vec<Mirrored> {
    match event {
        Event::ClonesApplied(b) => b
            .units()
            .enumerate()
            .filter_map(|(i, a)| {
                let data = data_of(&Event::CloneApplied(a), was_failed)?;
                mirrored_fact(subjects, meta, Some(i), data, trace.clone())
            })
            .collect(),
        _ => mirrored(subjects, meta, event, was_failed, trace)
            .into_iter()
            .collect(),
    }
}

fn mirrored_fact(
    subjects: &Subjects,
    meta: EventMeta,
    index: Option<usize>,
    data: LifecycleData,
    trace: Trace,
) -> Option<Mirrored> {
    let (about, name) = data.name();
    let subject = match about {
        About::Key => subjects.lifecycle_key(about_id(&data), name),
        About::Hsm => subjects.lifecycle_hsm(about_id(&data), name),
    };
    let ce = batch_cloud_event(subjects, meta, index, data, trace);
    let payload = serde_json::to_vec(&ce).ok()?;
    Some(Mirrored {
        subject,
        msg_id: ce.id,
        payload,
    })
}

/// The events-stream sequence a stored lifecycle message mirrors, if it is
/// one of ours: signed by the cluster key over its subject, id and bytes,
/// and carrying `keysyncseq`. Anything else (a stray or hostile publish on
/// a lifecycle subject) is not a cursor.
pub fn cursor_of(
    subject: &str,
    h: &async_nats::HeaderMap,
    payload: &[u8],
    cluster_key: &[u8; 32],
) -> Option<u64> {
    position_of(subject, h, payload, cluster_key).map(|(seq, _)| seq)
}

/// [`cursor_of`], with the index of the fact within a batch event (`None`
/// for a single fact): the mirror resumes after exactly that fact, so a
/// batch cut short by a crash is finished, not skipped nor repeated.
pub fn position_of(
    subject: &str,
    h: &async_nats::HeaderMap,
    payload: &[u8],
    cluster_key: &[u8; 32],
) -> Option<(u64, Option<usize>)> {
    let claim = Claim::read(Some(h)).ok()?;
    if claim.signer != Signer::Cluster || claim.verify(cluster_key, subject, payload).is_err() {
        return None;
    }
    let ce: CloudEvent<serde_json::Value> = serde_json::from_slice(payload).ok()?;
    let seq: u64 = ce.keysyncseq.parse().ok()?;
    if ce.id != claim.msg_id {
        return None;
    }
    if ce.id == event_id(seq) {
        return Some((seq, None));
    }
    let index: usize = ce
        .id
        .strip_prefix(&format!("events-{seq}-"))?
        .parse()
        .ok()?;
    (ce.id == batch_event_id(seq, index)).then_some((seq, Some(index)))
}

/// The messages stored after the cursor that are not signed (ours among
/// them: the mirror signs one in [`SIGN_EVERY`]), by `Nats-Msg-Id`. A
/// fact the mirror would publish again is skipped when its exact subject
/// and bytes are here: it is stored already, whoever put it there.
#[derive(Debug, Default)]
pub struct Tail(std::collections::HashMap<String, Vec<(String, Bytes)>>);

impl Tail {
    /// Remembers a stored message.
    fn keep(&mut self, msg_id: String, subject: String, payload: Bytes) {
        if self.0.len() < MAX_TAIL {
            self.0.entry(msg_id).or_default().push((subject, payload));
        }
    }

    /// Whether `m` is stored already, byte for byte (and forgets it).
    pub fn holds(&mut self, m: &Mirrored) -> bool {
        let stored = self.0.get(&m.msg_id).is_some_and(|held| {
            held.iter()
                .any(|(subject, payload)| *subject == m.subject && payload[..] == m.payload[..])
        });
        if stored {
            self.0.remove(&m.msg_id);
        }
        stored
    }
}

/// The last fact mirrored: the cursor of the stream's last message that is
/// ours and signed, walking back over unsigned ones (0: none), and those
/// unsigned ones ([`Tail`]).
async fn read_cursor(
    stream: &jetstream::stream::Stream,
    cluster_key: &[u8; 32],
) -> anyhow::Result<((u64, Option<usize>), Tail)> {
    let state = stream.get_info().await?.state;
    let first = state.first_sequence.max(1);
    let mut seq = state.last_sequence;
    let mut walked = 0u64;
    let mut tail = Tail::default();
    while seq >= first && seq > 0 {
        match stream.direct_get(seq).await {
            Ok(m) => {
                if let Some(cursor) = position_of(&m.subject, &m.headers, &m.payload, cluster_key) {
                    return Ok((cursor, tail));
                }
                match m.headers.get(headers::MSG_ID) {
                    Some(id) => {
                        tail.keep(id.as_str().to_string(), m.subject.to_string(), m.payload)
                    }
                    None => tracing::warn!(
                        seq,
                        subject = %m.subject,
                        "a foreign message in the lifecycle stream (no message id): skipped"
                    ),
                }
            }
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        walked += 1;
        if walked >= MAX_WALK_BACK {
            anyhow::bail!(
                "no lifecycle event of ours in the last {MAX_WALK_BACK} messages of {}: \
                 see who may publish on its subjects (only orchestrators should)",
                stream.cached_info().config.name
            );
        }
        seq -= 1;
    }
    Ok(((0, None), tail))
}

/// A publish in flight: what it was, and its PubAck.
type InFlight = FuturesOrdered<
    futures::future::BoxFuture<'static, (Mirrored, Result<PublishAck, PublishError>)>,
>;

/// Runs the mirror until aborted or a publish fails.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    js: jetstream::Context,
    events: jetstream::stream::Stream,
    subjects: Subjects,
    replicas: usize,
    identity: Arc<Identity>,
    snapshots: jetstream::object_store::ObjectStore,
    verdicts: Arc<Verdicts>,
) -> anyhow::Result<()> {
    let cluster_key = identity.public_key();
    let lifecycle = crate::streams::ensure_one(&js, stream_config(&subjects, replicas)).await?;
    let ((mut cursor, mut cursor_index), mut tail) = read_cursor(&lifecycle, &cluster_key).await?;
    let mut events = events;
    let events_last = events.info().await?.state.last_sequence;
    if cursor > events_last {
        tracing::warn!(
            cursor,
            events_last,
            "the lifecycle stream is ahead of the events stream (was the events stream recreated?): mirroring it from its start"
        );
        cursor = 0;
        cursor_index = None;
        tail = Tail::default();
    }
    let mut published = 0u64;
    // Where reading resumes: at the cursor's fact when a batch there is
    // unfinished, after it otherwise.
    let resume = match cursor_index {
        Some(_) => cursor.max(1),
        None => cursor + 1,
    };
    // The fold's verdicts are kept for the mirror from here on; below
    // `complete_from` (a cursor older than this process's fold) the
    // mirror judges facts itself, with a fold of its own that it drops
    // once it reaches the fold's verdicts.
    let complete_from = verdicts.hold_for_mirror(resume);
    let _hold = MirrorHold(verdicts.clone());
    let mut own: Option<ClusterState> = if resume < complete_from {
        Some(
            crate::snapshot::load(&snapshots, cluster_key)
                .await
                .filter(|s| s.last_seq() < resume)
                .unwrap_or_default(),
        )
    } else {
        None
    };
    let start = own.as_ref().map_or(resume, |s| s.last_seq() + 1);
    tracing::info!(
        cursor,
        from = start,
        judged_by_the_fold_from = complete_from,
        "lifecycle mirror: resuming after the last fact mirrored"
    );
    let consumer = events
        .create_consumer(pull::OrderedConfig {
            filter_subject: subjects.events_all(),
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start.max(1),
            },
            ..Default::default()
        })
        .await?;
    let mut judged = verdicts.judged_watch();
    let mut messages = consumer.messages().await?;
    let mut acks: InFlight = FuturesOrdered::new();
    loop {
        tokio::select! {
            msg = messages.next() => {
                let msg = msg
                    .ok_or_else(|| anyhow::anyhow!("lifecycle reader ended"))?
                    .map_err(|e| anyhow::anyhow!("lifecycle reader failed: {e}"))?;
                let (meta, _) = crate::intake::meta_of(&msg)?;
                let accepted = if meta.seq < complete_from {
                    let state = own.get_or_insert_with(ClusterState::default);
                    judge(state, &subjects, &cluster_key, &msg, meta)
                } else {
                    // Past the fold's start: its verdict, not a fold of
                    // our own (the memory and the signature check once
                    // more per event).
                    own = None;
                    by_the_fold(&verdicts, &mut judged, &msg, meta).await?
                };
                verdicts.mirrored_upto(meta.seq);
                let Some((event, was_failed)) = accepted else {
                    continue;
                };
                // Mirrored already: facts before the cursor, and at the
                // cursor a single fact or a batch's facts up to its index.
                let skip = match meta.seq.cmp(&cursor) {
                    std::cmp::Ordering::Less => continue,
                    std::cmp::Ordering::Equal => match cursor_index {
                        None => continue,
                        Some(i) => i + 1,
                    },
                    std::cmp::Ordering::Greater => 0,
                };
                let trace = Trace::of(msg.headers.as_ref());
                for m in mirrored_all(&subjects, meta, &event, was_failed, trace).into_iter().skip(skip) {
                    if tail.holds(&m) {
                        continue;
                    }
                    published += 1;
                    let sign = published.is_multiple_of(SIGN_EVERY);
                    acks.push_back(send(&js, &identity, m, sign).await?);
                    while acks.len() >= IN_FLIGHT {
                        if let Some(done) = acks.next().await {
                            settle(&js, &lifecycle, &identity, &mut acks, done).await?;
                        }
                    }
                }
            }
            Some(done) = acks.next(), if !acks.is_empty() => {
                settle(&js, &lifecycle, &identity, &mut acks, done).await?;
            }
        }
    }
}

/// Keeps the fold's verdicts for the mirror while it runs; lets them go
/// when it stops (returns, fails or is aborted).
struct MirrorHold(Arc<Verdicts>);

impl Drop for MirrorHold {
    fn drop(&mut self) {
        self.0.release_mirror();
    }
}

/// The fold's verdict on the event in `msg` (waiting for it if the mirror
/// read the event first): the event if the fold accepted it, with whether
/// it is an `HsmJoined` of an HSM the log said was failed.
async fn by_the_fold(
    verdicts: &Verdicts,
    judged: &mut tokio::sync::watch::Receiver<u64>,
    msg: &jetstream::Message,
    meta: EventMeta,
) -> anyhow::Result<Option<(Event, bool)>> {
    judged
        .wait_for(|upto| *upto >= meta.seq)
        .await
        .map_err(|_| anyhow::anyhow!("the fold's verdicts are gone"))?;
    match verdicts.verdict(meta.seq) {
        Some(Verdict::Rejected) => Ok(None),
        Some(Verdict::Accepted { rejoined }) => {
            // Accepted by the fold, so it decodes; its signature and
            // subject were checked there.
            Ok(keysync_schemas::decode::<Event>(&msg.payload)
                .ok()
                .map(|env| (env.body, rejoined)))
        }
        None => anyhow::bail!(
            "the fold's verdict on event {} was not kept for the lifecycle mirror",
            meta.seq
        ),
    }
}

/// Folds one stored event as the orchestrator's fold does; the event if it
/// is an accepted fact, with whether the log said its HSM was failed
/// before it.
fn judge(
    state: &mut ClusterState,
    subjects: &Subjects,
    cluster_key: &[u8; 32],
    msg: &jetstream::Message,
    meta: EventMeta,
) -> Option<(Event, bool)> {
    let checked = keysync_security::check_event(
        msg.headers.as_ref(),
        &msg.subject,
        &msg.payload,
        meta.stored_at_ns,
        cluster_key,
        |h| state.enrolled_key(h),
    );
    let event = match checked {
        Ok(env) if subject_matches(subjects.parse_event(&msg.subject), &env.body) => env.body,
        Ok(_) => {
            state.reject_at(meta.seq, keysync_schemas::RejectReason::SubjectMismatch);
            return None;
        }
        Err(r) => {
            state.reject_at(meta.seq, r.reason);
            return None;
        }
    };
    let was_failed = state.is_rejoin(&event);
    state.apply(meta, &event).ok().map(|_| (event, was_failed))
}

/// Publishes one lifecycle message, signed by the cluster if `sign`;
/// returns its PubAck to come.
async fn send(
    js: &jetstream::Context,
    identity: &Identity,
    m: Mirrored,
    sign: bool,
) -> anyhow::Result<futures::future::BoxFuture<'static, (Mirrored, Result<PublishAck, PublishError>)>>
{
    let mut h = if sign {
        keysync_security::signed_headers(
            identity,
            &Signer::Cluster,
            &m.subject,
            &m.msg_id,
            &m.payload,
        )
    } else {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, m.msg_id.as_str());
        h
    };
    // The CloudEvents NATS binding: structured mode says so in content-type.
    h.insert("content-type", lifecycle::CONTENT_TYPE);
    let fut = js
        .publish_with_headers(m.subject.clone(), h, Bytes::from(m.payload.clone()))
        .await?;
    Ok(Box::pin(async move { (m, fut.await) }))
}

/// One PubAck. A failure ends the run. A duplicate answer is checked: if
/// what holds the id is ours (signed by the cluster, or these very bytes
/// on this subject), the fact was mirrored already (by the active
/// orchestrator before this one, within the duplicate window); if not, it
/// is removed and the event published again, so a stray publish under one
/// of our ids cannot suppress nor alter a fact.
async fn settle(
    js: &jetstream::Context,
    lifecycle: &jetstream::stream::Stream,
    identity: &Identity,
    acks: &mut InFlight,
    (m, ack): (Mirrored, Result<PublishAck, PublishError>),
) -> anyhow::Result<()> {
    let ack = ack.map_err(|e| anyhow::anyhow!("a lifecycle event was not stored: {e}"))?;
    if !ack.duplicate {
        return Ok(());
    }
    let cluster_key = identity.public_key();
    let ours = match lifecycle.direct_get(ack.sequence).await {
        Ok(s) => {
            (s.subject.as_str() == m.subject && s.payload[..] == m.payload[..])
                || cursor_of(&s.subject, &s.headers, &s.payload, &cluster_key).is_some()
        }
        Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => false,
        Err(e) => return Err(e.into()),
    };
    if ours {
        return Ok(());
    }
    tracing::warn!(
        seq = ack.sequence,
        msg_id = %m.msg_id,
        "a foreign message holds a lifecycle event's id: removing it and publishing the event again"
    );
    crate::streams::delete_message(js, &ack.stream, ack.sequence, false).await?;
    // The id is free once the message holding it is gone.
    acks.push_back(send(js, identity, m, true).await?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keysync_schemas::{
        DomainId, Durability, Fingerprint, HsmId, JoinRequested, KeyAttributes, KeyCreated, KeyId,
        KeyOrigin, KeyReplicated, KeyType,
    };

    fn meta(seq: u64) -> EventMeta {
        EventMeta {
            seq,
            stored_at_ns: 1_764_000_000_123_456_789,
        }
    }

    fn created(key_id: KeyId) -> Event {
        Event::KeyCreated(KeyCreated {
            key_id,
            key_type: KeyType::P256,
            fingerprint: Fingerprint([0xab; 32]),
            hsm: HsmId::new("hsm-1").expect("id"),
            origin: KeyOrigin::Generated,
            attributes: KeyAttributes::default(),
            durability: Durability::Replicas(2),
            domain: DomainId([1; 8]),
            wrapped: vec![0x5e; 40],
            public_key: Some(vec![0x30; 91]),
        })
    }

    #[test]
    fn a_created_key_becomes_a_cloudevent_without_material() {
        let s = Subjects::default();
        let key_id = KeyId::new();
        let trace = Trace {
            parent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            state: None,
        };
        let m = mirrored(&s, meta(42), &created(key_id), false, trace.clone()).expect("mirrored");
        assert_eq!(m.subject, s.lifecycle_key(&key_id.to_string(), "created"));
        assert_eq!(m.msg_id, "events-42");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "events-42");
        assert_eq!(v["source"], "urn:keysync:keysync");
        assert_eq!(v["type"], "io.keysync.key.created.v1");
        assert_eq!(v["subject"], key_id.to_string());
        assert_eq!(v["time"], "2025-11-24T16:00:00.123456789Z");
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(
            v["dataschema"],
            format!("{}key.created.v1.json", lifecycle::SCHEMA_BASE)
        );
        assert_eq!(v["keysyncseq"], "42");
        assert_eq!(v["traceparent"], trace.parent.clone().expect("tp").as_str());
        assert!(v.get("tracestate").is_none());
        assert_eq!(v["data"]["key_type"], "p256");
        assert_eq!(v["data"]["durability"], "replicas:2");
        assert_eq!(v["data"]["origin"], "generated");
        assert!(
            v["data"].get("app_id").is_none(),
            "no app id: the field is left out"
        );
        let Event::KeyCreated(mut with_id) = created(key_id) else {
            unreachable!()
        };
        with_id.attributes.app_id = Some(vec![0x01, 0xab]);
        let m2 = mirrored(
            &s,
            meta(43),
            &Event::KeyCreated(with_id),
            false,
            trace.clone(),
        )
        .expect("mirrored");
        let v2: serde_json::Value = serde_json::from_slice(&m2.payload).expect("json");
        assert_eq!(v2["data"]["app_id"], "01ab", "the application's id, as hex");
        // No wrapped material, no public key: neither as bytes nor as hex.
        let text = String::from_utf8(m.payload.clone()).expect("utf-8");
        assert!(
            !text.contains("wrapped") && !text.contains("public_key"),
            "{text}"
        );
        assert!(
            !text.contains("5e5e5e") && !text.contains("303030"),
            "{text}"
        );
        // The same fact gives the same bytes: a re-mirror after a failover
        // is a byte-identical duplicate.
        assert_eq!(
            Some(m),
            mirrored(&s, meta(42), &created(key_id), false, trace)
        );
    }

    #[test]
    fn replicated_carries_holders_and_latency_and_internal_facts_are_not_mirrored() {
        let s = Subjects::new("team-a").expect("prefix");
        let key_id = KeyId::new();
        let r = Event::KeyReplicated(KeyReplicated {
            key_id,
            fingerprint: Fingerprint([1; 32]),
            holders: vec![HsmId::new("a").expect("id"), HsmId::new("b").expect("id")],
            sync_latency_micros: 1_250,
            created_seq: 7,
        });
        let m = mirrored(&s, meta(9), &r, false, Trace::default()).expect("mirrored");
        assert_eq!(
            m.subject,
            format!("team-a.lifecycle.key.{key_id}.replicated")
        );
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
        assert_eq!(v["data"]["holders"], serde_json::json!(["a", "b"]));
        assert_eq!(v["data"]["sync_latency_ms"], 1.25);
        assert_eq!(v["data"]["created_seq"], 7);
        assert_eq!(v["source"], "urn:keysync:team-a");
        assert!(v.get("traceparent").is_none());
        let join = Event::JoinRequested(JoinRequested {
            hsm: HsmId::new("a").expect("id"),
            public_key: [2; 32],
            token_key: [3; 32],
            proof: vec![4; 64],
        });
        assert_eq!(mirrored(&s, meta(10), &join, false, Trace::default()), None);
    }

    #[test]
    fn a_failed_hsm_that_joins_again_has_recovered() {
        let s = Subjects::default();
        let joined = Event::HsmJoined(keysync_schemas::HsmJoined {
            hsm: HsmId::new("hsm-3").expect("id"),
            agent_version: "0.1.0".into(),
            token_keys: 12,
        });
        let first = mirrored(&s, meta(3), &joined, false, Trace::default()).expect("m");
        assert_eq!(first.subject, "keysync.lifecycle.hsm.hsm-3.joined");
        let again = mirrored(&s, meta(30), &joined, true, Trace::default()).expect("m");
        assert_eq!(again.subject, "keysync.lifecycle.hsm.hsm-3.recovered");
        let v: serde_json::Value = serde_json::from_slice(&again.payload).expect("json");
        assert_eq!(v["type"], "io.keysync.hsm.recovered.v1");
        assert_eq!(v["data"]["rejoined"], true);
        assert_eq!(v["data"]["token_keys"], 12);
    }

    #[test]
    fn a_batch_of_applied_clones_is_one_key_applied_per_key_with_ids_of_its_own() {
        // Given a batch event at sequence 7 naming three keys,
        let s = Subjects::default();
        let keys = [KeyId::new(), KeyId::new(), KeyId::new()];
        let batch = Event::ClonesApplied(keysync_schemas::ClonesApplied {
            hsm: HsmId::new("hsm-2").expect("id"),
            applied: keys
                .iter()
                .map(|k| keysync_schemas::AppliedKey {
                    key_id: *k,
                    fingerprint: Fingerprint([0xab; 32]),
                    already_present: false,
                })
                .collect(),
        });
        // when it is mirrored,
        let all = mirrored_all(&s, meta(7), &batch, false, Trace::default());
        // then each key gets the key.applied a CloneApplied would give it,
        // under id events-7-<i>, in the batch's order,
        assert_eq!(all.len(), 3);
        for (i, (m, k)) in all.iter().zip(keys).enumerate() {
            let single = Event::CloneApplied(keysync_schemas::CloneApplied {
                key_id: k,
                hsm: HsmId::new("hsm-2").expect("id"),
                fingerprint: Fingerprint([0xab; 32]),
                already_present: false,
            });
            let alone = mirrored(&s, meta(7), &single, false, Trace::default()).expect("m");
            assert_eq!(m.subject, alone.subject);
            assert_eq!(m.msg_id, format!("events-7-{i}"));
            let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
            let w: serde_json::Value = serde_json::from_slice(&alone.payload).expect("json");
            assert_eq!(v["id"], m.msg_id.as_str());
            assert_eq!(v["data"], w["data"]);
            assert_eq!(v["type"], w["type"]);
            assert_eq!(v["keysyncseq"], "7");
        }
        // and the same again on a replay (ids are deterministic);
        assert_eq!(
            all,
            mirrored_all(&s, meta(7), &batch, false, Trace::default())
        );
        // and a mirrored one is a cursor at its place in the batch.
        let id = Identity::generate().expect("rng");
        let m = &all[1];
        let h = keysync_security::signed_headers(
            &id,
            &Signer::Cluster,
            &m.subject,
            &m.msg_id,
            &m.payload,
        );
        assert_eq!(
            position_of(&m.subject, &h, &m.payload, &id.public_key()),
            Some((7, Some(1)))
        );
        assert_eq!(
            cursor_of(&m.subject, &h, &m.payload, &id.public_key()),
            Some(7)
        );
    }

    #[test]
    fn only_a_cluster_signed_lifecycle_event_is_a_cursor() {
        let s = Subjects::default();
        let id = Identity::generate().expect("rng");
        let m = mirrored(&s, meta(5), &created(KeyId::new()), false, Trace::default()).expect("m");
        let h = keysync_security::signed_headers(
            &id,
            &Signer::Cluster,
            &m.subject,
            &m.msg_id,
            &m.payload,
        );
        assert_eq!(
            cursor_of(&m.subject, &h, &m.payload, &id.public_key()),
            Some(5)
        );
        // Another key, another subject, edited bytes, no signature: none.
        let other = Identity::generate().expect("rng");
        assert_eq!(
            cursor_of(&m.subject, &h, &m.payload, &other.public_key()),
            None
        );
        assert_eq!(
            cursor_of("keysync.lifecycle.x", &h, &m.payload, &id.public_key()),
            None
        );
        let mut edited = m.payload.clone();
        edited[10] ^= 1;
        assert_eq!(cursor_of(&m.subject, &h, &edited, &id.public_key()), None);
        let unsigned = async_nats::HeaderMap::new();
        assert_eq!(
            cursor_of(&m.subject, &unsigned, &m.payload, &id.public_key()),
            None
        );
    }

    #[test]
    fn an_unsigned_message_after_the_cursor_is_skipped_only_if_byte_identical() {
        // Given the unsigned messages stored after the cursor: one of ours
        // and a stray one under another of our ids,
        let s = Subjects::default();
        let ours =
            mirrored(&s, meta(5), &created(KeyId::new()), false, Trace::default()).expect("m");
        let next =
            mirrored(&s, meta(6), &created(KeyId::new()), false, Trace::default()).expect("m");
        let mut tail = Tail::default();
        tail.keep(
            ours.msg_id.clone(),
            ours.subject.clone(),
            Bytes::from(ours.payload.clone()),
        );
        tail.keep(
            next.msg_id.clone(),
            next.subject.clone(),
            Bytes::from_static(b"{\"forged\":true}"),
        );
        // when the mirror comes to publish them again,
        // then ours is stored already (once: a second copy is published),
        assert!(tail.holds(&ours));
        assert!(!tail.holds(&ours));
        // and the stray one does not stand for the fact.
        assert!(!tail.holds(&next));
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_500_000_000), "1970-01-01T00:00:01.5Z");
    }
}
