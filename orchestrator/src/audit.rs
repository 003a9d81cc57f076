//! The audit chain: one hash-chained record per fact in the events stream,
//! appended by the active orchestrator.
//!
//! The auditor reads the events stream on its own, from the fact after the
//! last one audited (the chain's last record says which), so it neither
//! waits for nor depends on the fold or its snapshots. Each record is
//! appended with `Nats-Expected-Last-Sequence` set to the chain's end: it
//! lands exactly at the sequence it claims, or not at all (a second writer
//! makes the append fail, and the run restart from the chain's real end).

use std::collections::BTreeSet;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use keysync_schemas::{
    decode, encode, record_hash, AuditFact, AuditRecord, Envelope, Event, Source, Subjects,
    MAX_MESSAGE_BYTES,
};

use crate::decide::subject_matches;
use crate::state::{ClusterState, EventMeta};

/// The fold's verdicts, shared with the auditor in the same process, so an
/// event's signature is checked once: the auditor takes the fold's word for
/// every event the fold has judged, and checks only those it has not (below
/// the fold's start, or ahead of it).
#[derive(Debug, Default)]
pub struct Verdicts {
    /// The first sequence this process's fold judged.
    from: AtomicU64,
    /// The last sequence it judged.
    upto: AtomicU64,
    /// Judged and rejected, above the auditor's position.
    rejected: Mutex<BTreeSet<u64>>,
}

impl Verdicts {
    /// The fold starts judging at `seq`.
    pub fn start(&self, seq: u64) {
        self.from.store(seq, Ordering::Release);
        self.upto.store(seq.saturating_sub(1), Ordering::Release);
    }

    /// The fold judged `seq` (rejected or not).
    pub fn judged(&self, seq: u64, rejected: bool) {
        if rejected {
            if let Ok(mut r) = self.rejected.lock() {
                r.insert(seq);
            }
        }
        self.upto.fetch_max(seq, Ordering::AcqRel);
    }

    /// Whether the fold accepted `seq`, if it judged it.
    fn accepted(&self, seq: u64) -> Option<bool> {
        let judged =
            seq >= self.from.load(Ordering::Acquire) && seq <= self.upto.load(Ordering::Acquire);
        if !judged {
            return None;
        }
        self.rejected.lock().ok().map(|r| !r.contains(&seq))
    }

    /// Forgets rejections at or below `seq` (audited already).
    fn forget_upto(&self, seq: u64) {
        if let Ok(mut r) = self.rejected.lock() {
            *r = r.split_off(&(seq + 1));
        }
    }
}

/// Membership and enrollment as the log says, for checking signatures:
/// only events under `<prefix>.evt.hsm.>` are folded into it.
struct Enrollment {
    state: ClusterState,
    cluster_key: [u8; 32],
}

impl Enrollment {
    /// Checks one event as the fold does (or takes the fold's verdict);
    /// folds it if it is about membership. Returns the accepted event.
    fn check(
        &mut self,
        subjects: &Subjects,
        msg: &jetstream::Message,
        meta: EventMeta,
        verdicts: &Verdicts,
    ) -> Option<Event> {
        let env = match verdicts.accepted(meta.seq) {
            Some(false) => return None,
            Some(true) => decode::<Event>(&msg.payload).ok()?,
            None => {
                let state = &self.state;
                keysync_security::check_event(
                    msg.headers.as_ref(),
                    &msg.subject,
                    &msg.payload,
                    meta.stored_at_ns,
                    &self.cluster_key,
                    |h| state.enrolled_key(h),
                )
                .ok()?
            }
        };
        if !subject_matches(subjects.parse_event(&msg.subject), &env.body) {
            return None;
        }
        let about_membership = matches!(
            env.body,
            Event::HsmJoined(_)
                | Event::HsmFailed(_)
                | Event::HsmRecovered(_)
                | Event::HsmEnrolled(_)
                | Event::HsmRevoked(_)
                | Event::JoinTokenIssued(_)
                | Event::JoinRequested(_)
        );
        if about_membership && self.state.apply(meta, &env.body).is_err() {
            return None;
        }
        Some(env.body)
    }
}

fn meta_of(msg: &jetstream::Message) -> anyhow::Result<EventMeta> {
    let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(EventMeta {
        seq: info.stream_sequence,
        stored_at_ns: u64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0),
    })
}

/// Folds the membership events up to `until` (where auditing resumes).
async fn enrollment_until(
    events: &jetstream::stream::Stream,
    subjects: &Subjects,
    cluster_key: [u8; 32],
    until: u64,
) -> anyhow::Result<Enrollment> {
    let mut e = Enrollment {
        state: ClusterState::default(),
        cluster_key,
    };
    if until == 0 {
        return Ok(e);
    }
    let consumer = events
        .create_consumer(pull::OrderedConfig {
            filter_subject: subjects.hsm_events_all(),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    loop {
        let Ok(Some(msg)) =
            tokio::time::timeout(std::time::Duration::from_secs(2), messages.next()).await
        else {
            break; // nothing more (or none at all) before `until`
        };
        let msg = msg?;
        let meta = meta_of(&msg)?;
        if meta.seq > until {
            break;
        }
        e.check(subjects, &msg, meta, &Verdicts::default());
        if msg.info().map(|i| i.pending == 0).unwrap_or(true) || meta.seq == until {
            break;
        }
    }
    Ok(e)
}

/// The audit stream's configuration.
pub fn stream_config(subjects: &Subjects, replicas: usize) -> stream::Config {
    stream::Config {
        name: subjects.audit_stream(),
        description: Some("keysync hash-chained audit records".into()),
        subjects: vec![subjects.audit()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_message_size: MAX_MESSAGE_BYTES as i32,
        allow_direct: true,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Appends audit records for every fact after the chain's end, until the
/// task is aborted or an append fails.
pub async fn run(
    js: jetstream::Context,
    mut events: jetstream::stream::Stream,
    subjects: Subjects,
    name: String,
    replicas: usize,
    cluster_key: [u8; 32],
    verdicts: Arc<Verdicts>,
) -> anyhow::Result<()> {
    let mut audit = js
        .get_or_create_stream(stream_config(&subjects, replicas))
        .await?;
    let last = audit.info().await?.state.last_sequence;
    let (mut chain_seq, mut prev_hash, cursor) = if last == 0 {
        (0, [0u8; 32], 0)
    } else {
        let msg = audit.direct_get(last).await?;
        let rec = decode::<AuditRecord>(&msg.payload)?.body;
        (last, record_hash(&msg.payload), rec.event_seq)
    };
    if events.info().await?.state.last_sequence <= cursor {
        tracing::info!(chain_seq, "audit chain up to date");
    }
    let mut enrollment = enrollment_until(&events, &subjects, cluster_key, cursor).await?;
    let consumer = events
        .create_consumer(pull::OrderedConfig {
            filter_subject: subjects.events_all(),
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: cursor + 1,
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut acks = FuturesUnordered::new();
    loop {
        tokio::select! {
            msg = messages.next() => {
                let msg = msg.ok_or_else(|| anyhow::anyhow!("audit reader ended"))??;
                let meta = meta_of(&msg)?;
                let (event_seq, event_time_ns) = (meta.seq, meta.stored_at_ns);
                // Rejected input (unsigned, forged, replayed) is not a fact.
                if event_seq % 1024 == 0 {
                    verdicts.forget_upto(event_seq);
                }
                let Some(event) = enrollment.check(&subjects, &msg, meta, &verdicts) else {
                    continue;
                };
                let record = AuditRecord {
                    chain_seq: chain_seq + 1,
                    prev_hash,
                    event_seq,
                    event_time_ns,
                    fact: AuditFact::of(&event),
                };
                let bytes = encode(&Envelope::new(Source::Orchestrator(name.clone()), record))?;
                let mut h = async_nats::HeaderMap::new();
                h.insert("Nats-Expected-Last-Sequence", chain_seq.to_string().as_str());
                prev_hash = record_hash(&bytes);
                chain_seq += 1;
                let fut = js.publish_with_headers(subjects.audit(), h, bytes.into()).await?;
                acks.push(fut.into_future());
                while acks.len() >= 256 {
                    if let Some(ack) = acks.next().await {
                        ack?;
                    }
                }
            }
            Some(ack) = acks.next(), if !acks.is_empty() => {
                ack?;
            }
        }
    }
}
