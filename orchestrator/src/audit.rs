//! The audit chain: one hash-chained record per fact in the events stream,
//! appended by the active orchestrator.
//!
//! The auditor reads the events stream on its own, from the fact after the
//! last one audited (the chain's last record says which), so it neither
//! waits for nor depends on the fold or its snapshots. Each record is
//! appended with `Nats-Expected-Last-Sequence` set to the chain's end: it
//! lands exactly at the sequence it claims, or not at all (a second writer
//! makes the append fail, and the run restart from the chain's real end).

use std::future::IntoFuture;

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use keysync_schemas::{
    decode, encode, record_hash, AuditFact, AuditRecord, Envelope, Event, Source, Subjects,
    MAX_MESSAGE_BYTES,
};

use crate::decide::subject_matches;

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
                let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                let (event_seq, event_time_ns) = (
                    info.stream_sequence,
                    u64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0),
                );
                let Ok(event) = decode::<Event>(&msg.payload).map(|e| e.body) else {
                    continue; // rejected input is not a fact
                };
                if !subject_matches(subjects.parse_event(&msg.subject), &event) {
                    continue;
                }
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
