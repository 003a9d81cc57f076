//! The audit chain: one hash-chained record per fact in the events stream,
//! appended by the active orchestrator.
//!
//! The auditor reads the events stream on its own, from the fact after the
//! last one audited (the chain's last record says which), so it neither
//! waits for nor depends on the fold or its snapshots. Each record is
//! appended with `Nats-Expected-Last-Sequence` set to the chain's end: it
//! lands exactly at the sequence it claims, or not at all.
//!
//! The appender is not the only one who can write to the stream: a second
//! orchestrator briefly, and anyone NATS lets publish on `keysync.audit`
//! (on an open bus, anyone). A message there that is not an audit record at
//! its own sequence is *foreign*: the appender skips it, logs and reports
//! it (counted as `foreign_record`), and chains the next record to the last
//! real one, at the next free sequence. `keysync audit verify` lists
//! foreign messages by sequence and checks the chain across them. The
//! appender never stops for one, so no fact goes unaudited.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::header;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::stream::DirectGetErrorKind;
use async_nats::jetstream::{self, consumer::pull, stream};
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use keysync_schemas::{
    decode, encode, record_hash, AuditFact, AuditRecord, Envelope, Event, RejectReason, Source,
    Subjects, MAX_MESSAGE_BYTES,
};

use crate::decide::subject_matches;
use crate::state::{ClusterState, EventMeta};

/// The fold's verdicts, shared with the auditor and the lifecycle mirror
/// in the same process, so an event's signature is checked (and the event
/// folded) once: both take the fold's word for every event the fold has
/// judged. Both wait for the fold's verdict on an event they read first
/// ([`Verdicts::judged_watch`]): it is ahead within milliseconds, and a
/// second signature check per event was a fifth of the orchestrator's CPU
/// under load. Only events below the fold's start (a chain or cursor older
/// than the snapshot this process started from) are checked by the auditor
/// itself, and by a fold of the mirror's own.
#[derive(Debug)]
pub struct Verdicts {
    /// The first sequence this process's fold judged.
    from: AtomicU64,
    /// The last sequence it judged (watched by the mirror).
    upto: tokio::sync::watch::Sender<u64>,
    /// What is kept about the judged events until both readers passed.
    kept: Mutex<Kept>,
}

/// Verdicts kept until the auditor and the mirror (when it runs) have read
/// past them: only the exceptions, so a handful of entries.
#[derive(Debug, Default)]
struct Kept {
    /// Judged and rejected.
    rejected: BTreeSet<u64>,
    /// Accepted `HsmJoined` events of an HSM the log said was failed
    /// before them (the mirror calls those `hsm.recovered`).
    rejoined: BTreeSet<u64>,
    /// The auditor's position.
    audited: u64,
    /// The mirror's position, while it runs.
    mirrored: Option<u64>,
    /// Everything at or below this was forgotten.
    forgotten: u64,
}

impl Kept {
    fn prune(&mut self) {
        let to = self.mirrored.map_or(self.audited, |m| m.min(self.audited));
        if to > self.forgotten {
            self.rejected = self.rejected.split_off(&(to + 1));
            self.rejoined = self.rejoined.split_off(&(to + 1));
            self.forgotten = to;
        }
    }
}

impl Default for Verdicts {
    fn default() -> Self {
        Verdicts {
            from: AtomicU64::new(0),
            upto: tokio::sync::watch::Sender::new(0),
            kept: Mutex::new(Kept::default()),
        }
    }
}

/// What the fold said of one event it judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Refused (by a check or by the fold's state).
    Rejected,
    /// Accepted; `rejoined`: an `HsmJoined` of an HSM the log said was
    /// failed.
    Accepted {
        /// See [`Kept::rejoined`].
        rejoined: bool,
    },
}

impl Verdicts {
    /// The fold starts judging at `seq`.
    pub fn start(&self, seq: u64) {
        self.from.store(seq, Ordering::Release);
        self.upto.send_replace(seq.saturating_sub(1));
    }

    /// The fold judged `seq` (rejected or not).
    pub fn judged(&self, seq: u64, rejected: bool) {
        self.judged_as(
            seq,
            if rejected {
                Verdict::Rejected
            } else {
                Verdict::Accepted { rejoined: false }
            },
        );
    }

    /// The fold judged `seq` as `verdict`.
    pub fn judged_as(&self, seq: u64, verdict: Verdict) {
        let exception = match verdict {
            Verdict::Rejected => Some(true),
            Verdict::Accepted { rejoined: true } => Some(false),
            Verdict::Accepted { rejoined: false } => None,
        };
        if let Some(rejected) = exception {
            if let Ok(mut k) = self.kept.lock() {
                if rejected {
                    k.rejected.insert(seq);
                } else {
                    k.rejoined.insert(seq);
                }
            }
        }
        self.upto.send_if_modified(|u| {
            let later = seq > *u;
            if later {
                *u = seq;
            }
            later
        });
    }

    /// What the fold said of `seq`, if it judged it.
    pub fn verdict(&self, seq: u64) -> Option<Verdict> {
        let judged = seq >= self.from.load(Ordering::Acquire) && seq <= *self.upto.borrow();
        if !judged {
            return None;
        }
        let k = self.kept.lock().ok()?;
        if seq <= k.forgotten {
            return None;
        }
        Some(if k.rejected.contains(&seq) {
            Verdict::Rejected
        } else {
            Verdict::Accepted {
                rejoined: k.rejoined.contains(&seq),
            }
        })
    }

    /// Whether the fold will judge `seq` (this process's fold started at
    /// or before it), so a reader can wait for its verdict.
    fn will_judge(&self, seq: u64) -> bool {
        let from = self.from.load(Ordering::Acquire);
        from > 0 && seq >= from
    }

    /// Whether the fold accepted `seq`, if it judged it.
    fn accepted(&self, seq: u64) -> Option<bool> {
        self.verdict(seq).map(|v| v != Verdict::Rejected)
    }

    /// Forgets rejections at or below `seq` (audited already), unless the
    /// mirror still needs them.
    fn forget_upto(&self, seq: u64) {
        if let Ok(mut k) = self.kept.lock() {
            k.audited = k.audited.max(seq);
            k.prune();
        }
    }

    /// The mirror starts reading at `seq`: verdicts from it on are kept
    /// for it. Returns the first sequence from which the fold's verdicts
    /// are (or will be) complete: the mirror judges what is below it
    /// itself.
    pub fn hold_for_mirror(&self, seq: u64) -> u64 {
        let Ok(mut k) = self.kept.lock() else {
            return u64::MAX;
        };
        k.mirrored = Some(seq.saturating_sub(1));
        self.from.load(Ordering::Acquire).max(k.forgotten + 1)
    }

    /// The mirror has read up to `seq`.
    pub fn mirrored_upto(&self, seq: u64) {
        if let Ok(mut k) = self.kept.lock() {
            k.mirrored = Some(k.mirrored.unwrap_or(0).max(seq));
            k.prune();
        }
    }

    /// The mirror stopped: nothing is kept for it any more.
    pub fn release_mirror(&self) {
        if let Ok(mut k) = self.kept.lock() {
            k.mirrored = None;
            k.prune();
        }
    }

    /// The last sequence the fold judged, watched: the mirror waits on it
    /// for the fold's verdict on an event it read first.
    pub fn judged_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.upto.subscribe()
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
                | Event::HsmCapabilities(_)
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

/// Where the appender reports what it skipped: a foreign message in the
/// audit stream is sent as [`RejectReason::ForeignRecord`], for the
/// orchestrator to count.
pub type Report = tokio::sync::mpsc::UnboundedSender<RejectReason>;

/// Whether a stored message is one of the appenders' records at its place:
/// it decodes as an audit record and claims its own stream sequence.
/// Anything else in the audit stream is foreign (a reply aimed at
/// `keysync.audit`, anything published there by someone else) and the
/// appender skips it; `keysync audit verify` reports it at its sequence.
pub fn own_record(seq: u64, payload: &[u8]) -> Option<AuditRecord> {
    decode::<AuditRecord>(payload)
        .ok()
        .map(|e| e.body)
        .filter(|r| r.chain_seq == seq)
}

/// The end of the chain as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChainEnd {
    /// [`record_hash`] of the last record (zeros if there is none).
    hash: [u8; 32],
    /// The last fact audited (0: none).
    event_seq: u64,
    /// The stream's last sequence: the last record's, or that of a
    /// foreign message after it. The next record must land right after it.
    stream_last: u64,
}

/// Finds the chain's end: the last message of the stream that is one of
/// ours ([`own_record`]), walking back over foreign messages (each reported
/// once) and removed ones.
async fn chain_end(
    audit: &jetstream::stream::Stream,
    reported: &mut BTreeSet<u64>,
    report: &Report,
) -> anyhow::Result<ChainEnd> {
    let state = audit.get_info().await?.state;
    let mut end = ChainEnd {
        hash: [0; 32],
        event_seq: 0,
        stream_last: state.last_sequence,
    };
    let mut seq = state.last_sequence;
    while seq >= state.first_sequence.max(1) {
        match audit.direct_get(seq).await {
            Ok(msg) => {
                if let Some(rec) = own_record(seq, &msg.payload) {
                    end.hash = record_hash(&msg.payload);
                    end.event_seq = rec.event_seq;
                    break;
                }
                if reported.insert(seq) {
                    tracing::warn!(
                        seq,
                        bytes = msg.payload.len(),
                        "a foreign message in the audit stream (not an audit record): skipped"
                    );
                    let _ = report.send(RejectReason::ForeignRecord);
                }
            }
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        seq -= 1;
    }
    // Foreign messages below the chain's end are behind us for good.
    let below = seq;
    reported.retain(|s| *s > below);
    Ok(end)
}

/// Why an append session ended.
enum Stop {
    /// The stream moved under it (a foreign message, or another writer):
    /// start again from the chain's end. `progress`: whether it appended
    /// anything first.
    Resync { why: String, progress: bool },
    /// Anything else: the orchestrator's run ends (crash-only).
    Failed(anyhow::Error),
}

/// Appends audit records for every fact after the chain's end, until the
/// task is aborted or an append fails for a reason other than the stream
/// moving under it.
///
/// A foreign message in the audit stream never stops it: each record is
/// appended with `Nats-Expected-Last-Sequence` (and, after the first of a
/// session, `Nats-Expected-Last-Msg-Id` naming the previous record's random
/// id, so that no pipelined record can land one place off behind a foreign
/// message). When the stream moved, the appender lets the appends in flight
/// settle, finds the chain's real end again (skipping and reporting what is
/// not a record), and resumes from the fact after it: a record lands where
/// it says or nowhere, and no fact is skipped.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    js: jetstream::Context,
    mut events: jetstream::stream::Stream,
    subjects: Subjects,
    name: String,
    replicas: usize,
    cluster_key: [u8; 32],
    verdicts: Arc<Verdicts>,
    report: Report,
) -> anyhow::Result<()> {
    let audit = js
        .get_or_create_stream(stream_config(&subjects, replicas))
        .await?;
    let mut reported = BTreeSet::new();
    let mut idle_resyncs = 0u32;
    let mut first = true;
    loop {
        let end = chain_end(&audit, &mut reported, &report).await?;
        if first && events.info().await?.state.last_sequence <= end.event_seq {
            tracing::info!(chain_end = end.stream_last, "audit chain up to date");
        }
        first = false;
        let session = Session {
            js: &js,
            events: &events,
            subjects: &subjects,
            name: &name,
            cluster_key,
            verdicts: &verdicts,
        };
        match session.append_from(end).await {
            Stop::Failed(e) => return Err(e),
            Stop::Resync { why, progress } => {
                tracing::warn!(%why, "the audit stream moved under the appender; resuming from the chain's end");
                // A stream that moves again before anything lands (a
                // flood of foreign messages) is retried ever more slowly.
                idle_resyncs = if progress { 0 } else { idle_resyncs + 1 };
                if idle_resyncs > 0 {
                    let pause = Duration::from_millis(50 * u64::from(idle_resyncs.min(40)));
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

/// One run of appends from a known chain end.
struct Session<'a> {
    js: &'a jetstream::Context,
    events: &'a jetstream::stream::Stream,
    subjects: &'a Subjects,
    name: &'a str,
    cluster_key: [u8; 32],
    verdicts: &'a Verdicts,
}

/// Most appends awaiting their acknowledgement at once.
const IN_FLIGHT: usize = 256;

type Acks =
    FuturesOrdered<futures::future::BoxFuture<'static, (u64, Result<PublishAck, PublishError>)>>;

impl Session<'_> {
    /// Appends from `end` until the stream moves under it or an append
    /// fails.
    async fn append_from(&self, end: ChainEnd) -> Stop {
        let mut acks: Acks = FuturesOrdered::new();
        let mut progress = false;
        let stop = self.appending(end, &mut acks, &mut progress).await;
        // Let what is in flight settle before the chain's end is read
        // again: a record acknowledged late would otherwise move it.
        while let Some(done) = acks.next().await {
            if let Err(Stop::Failed(e)) = self.settled(done, &mut progress) {
                return Stop::Failed(e);
            }
        }
        match stop {
            Stop::Resync { why, .. } => Stop::Resync { why, progress },
            failed => failed,
        }
    }

    async fn appending(&self, end: ChainEnd, acks: &mut Acks, progress: &mut bool) -> Stop {
        let cursor = end.event_seq;
        let mut enrollment =
            match enrollment_until(self.events, self.subjects, self.cluster_key, cursor).await {
                Ok(e) => e,
                Err(e) => return Stop::Failed(e),
            };
        let consumer = match self
            .events
            .create_consumer(pull::OrderedConfig {
                filter_subject: self.subjects.events_all(),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: cursor + 1,
                },
                ..Default::default()
            })
            .await
        {
            Ok(c) => c,
            Err(e) => return Stop::Failed(e.into()),
        };
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => return Stop::Failed(e.into()),
        };
        // The next record must land right after `last_seq`, whose message
        // id is `last_id` once this session wrote it.
        let mut last_seq = end.stream_last;
        let mut judged = self.verdicts.judged_watch();
        let mut last_id: Option<String> = None;
        let mut prev_hash = end.hash;
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let msg = match msg {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => return Stop::Failed(anyhow::anyhow!("audit reader failed: {e}")),
                        None => return Stop::Failed(anyhow::anyhow!("audit reader ended")),
                    };
                    let meta = match meta_of(&msg) {
                        Ok(m) => m,
                        Err(e) => return Stop::Failed(e),
                    };
                    // The fold checks every event it reads, and is ahead
                    // of this reader within milliseconds: wait for its
                    // verdict rather than check the signature a second
                    // time (an event the fold will never judge, below its
                    // start, is checked here).
                    if self.verdicts.will_judge(meta.seq)
                        && judged.wait_for(|upto| *upto >= meta.seq).await.is_err()
                    {
                        return Stop::Failed(anyhow::anyhow!("the fold's verdicts are gone"));
                    }
                    // Rejected input (unsigned, forged, replayed) is not a fact.
                    let Some(event) = enrollment.check(self.subjects, &msg, meta, self.verdicts) else {
                        continue;
                    };
                    let record = AuditRecord {
                        chain_seq: last_seq + 1,
                        prev_hash,
                        event_seq: meta.seq,
                        event_time_ns: meta.stored_at_ns,
                        fact: AuditFact::of(&event),
                    };
                    let bytes = match encode(&Envelope::new(Source::Orchestrator(self.name.to_string()), record)) {
                        Ok(b) => b,
                        Err(e) => return Stop::Failed(e.into()),
                    };
                    let id = uuid::Uuid::new_v4().to_string();
                    let mut h = async_nats::HeaderMap::new();
                    h.insert(header::NATS_MESSAGE_ID, id.as_str());
                    h.insert(header::NATS_EXPECTED_LAST_SEQUENCE, last_seq.to_string().as_str());
                    if let Some(last) = &last_id {
                        h.insert(header::NATS_EXPECTED_LAST_MESSAGE_ID, last.as_str());
                    }
                    prev_hash = record_hash(&bytes);
                    last_seq += 1;
                    last_id = Some(id);
                    let fut = match self.js.publish_with_headers(self.subjects.audit(), h, bytes.into()).await {
                        Ok(f) => f,
                        Err(e) => return Stop::Failed(e.into()),
                    };
                    let event_seq = meta.seq;
                    acks.push_back(Box::pin(async move { (event_seq, fut.await) }));
                    while acks.len() >= IN_FLIGHT {
                        if let Some(done) = acks.next().await {
                            if let Err(stop) = self.settled(done, progress) {
                                return stop;
                            }
                        }
                    }
                }
                Some(done) = acks.next(), if !acks.is_empty() => {
                    if let Err(stop) = self.settled(done, progress) {
                        return stop;
                    }
                }
            }
        }
    }

    /// One acknowledgement, in append order. The rejections the fold
    /// judged can be forgotten up to a fact whose record is stored: a
    /// resync resumes after the chain's end, which is at or beyond it.
    fn settled(
        &self,
        (event_seq, ack): (u64, Result<PublishAck, PublishError>),
        progress: &mut bool,
    ) -> Result<(), Stop> {
        match ack {
            Ok(ack) if !ack.duplicate => {
                *progress = true;
                if event_seq % 1024 == 0 {
                    self.verdicts.forget_upto(event_seq);
                }
                Ok(())
            }
            Ok(ack) => Err(Stop::Resync {
                why: format!("an append at {} was taken for a duplicate", ack.sequence),
                progress: *progress,
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId
                ) =>
            {
                Err(Stop::Resync {
                    why: e.to_string(),
                    progress: *progress,
                })
            }
            Err(e) => Err(Stop::Failed(anyhow::anyhow!("audit append failed: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keysync_schemas::{HsmId, StatusRequest};

    #[test]
    fn the_fold_verdicts_are_kept_until_the_mirror_and_the_auditor_passed_them() {
        // Given a fold that started at 10 and judged 10..=14,
        let v = Verdicts::default();
        v.start(10);
        v.judged(10, false);
        v.judged(11, true);
        v.judged_as(12, Verdict::Accepted { rejoined: true });
        v.judged(13, false);
        // and a mirror reading from 11,
        assert_eq!(v.hold_for_mirror(11), 10, "complete from the fold's start");
        // when the auditor has read past all of them,
        v.forget_upto(14);
        // then the mirror still gets each verdict,
        assert_eq!(v.verdict(11), Some(Verdict::Rejected));
        assert_eq!(v.verdict(12), Some(Verdict::Accepted { rejoined: true }));
        assert_eq!(v.verdict(13), Some(Verdict::Accepted { rejoined: false }));
        // none for what the fold has not judged (ahead of it, or before it),
        assert_eq!(v.verdict(14), None);
        assert_eq!(v.verdict(9), None);
        // and once the mirror passed them too, they are forgotten: a mirror
        // starting again there is told to judge them itself.
        v.mirrored_upto(13);
        assert_eq!(v.verdict(12), None);
        assert_eq!(v.accepted(11), None);
        assert_eq!(v.hold_for_mirror(11), 14);
    }

    #[test]
    fn a_stopped_mirror_holds_nothing_back() {
        // Given a mirror that held verdicts from 5 and stopped,
        let v = Verdicts::default();
        v.start(1);
        v.judged(6, true);
        v.hold_for_mirror(5);
        v.forget_upto(8);
        assert_eq!(v.verdict(6), Some(Verdict::Rejected));
        // when it lets go,
        v.release_mirror();
        // then the auditor's position alone decides what is kept.
        assert_eq!(v.verdict(6), None);
    }

    #[tokio::test]
    async fn the_mirror_waits_for_the_folds_verdict() {
        // Given an event the fold has not judged yet,
        let v = Arc::new(Verdicts::default());
        v.start(1);
        let mut judged = v.judged_watch();
        let waiting = {
            let v = v.clone();
            tokio::spawn(async move {
                judged.wait_for(|u| *u >= 3).await.map(|_| ()).ok();
                v.verdict(3)
            })
        };
        // when the fold judges it,
        v.judged(2, false);
        v.judged(3, true);
        // then the waiting reader gets the verdict.
        assert_eq!(waiting.await.expect("task"), Some(Verdict::Rejected));
    }

    fn record(chain_seq: u64) -> Vec<u8> {
        encode(&Envelope::new(
            Source::Orchestrator("o".into()),
            AuditRecord {
                chain_seq,
                prev_hash: [1; 32],
                event_seq: 9,
                event_time_ns: 1,
                fact: AuditFact::HsmJoined {
                    hsm: HsmId::new("hsm-1").expect("id"),
                },
            },
        ))
        .expect("encode")
    }

    #[test]
    fn only_a_record_at_its_own_sequence_is_ours() {
        assert_eq!(own_record(4, &record(4)).map(|r| r.event_seq), Some(9));
        // Moved, or copied elsewhere.
        assert!(own_record(5, &record(4)).is_none());
        // A reply aimed at the audit stream, or junk.
        let reply = encode(&Envelope::new(
            Source::Client("mallory".into()),
            StatusRequest::Cluster,
        ))
        .expect("encode");
        assert!(own_record(4, &reply).is_none());
        assert!(own_record(4, b"not an audit record").is_none());
        assert!(own_record(4, b"").is_none());
    }
}
