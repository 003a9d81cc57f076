//! Publishing to JetStream: every message the orchestrator stores is signed
//! here, and its PubAck is awaited later, with up to `max_in_flight`
//! outstanding at once.
//!
//! Awaiting each PubAck in turn would make a fan-out of thousands of
//! commands cost thousands of round trips; not awaiting them at all would
//! let a publish fail unnoticed. So acks are collected in the background
//! ([`Publisher::next_ack`] in the loop, then [`Publisher::settle`]), and a
//! failed one ends the run: the orchestrator is crash-only, and the
//! restart's reconcile publishes again under the same message ids, which
//! JetStream stores once.
//!
//! A PubAck that says "duplicate" is not taken on trust: what JetStream
//! holds under the id is read back and judged ([`duplicates`]). If it is
//! not ours, it is removed, reported ([`Publisher::take_foreign`]) and the
//! message sent again under a fresh id, so junk stored first under one of
//! our ids never costs a command or an event.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::Arc;

use async_nats::jetstream::{self, context::PublishError, publish::PublishAck};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use keysync_schemas::{encode, Envelope, Event, KeyId, Source, Subjects};
use keysync_security::{Identity, MessageIdKey, Signer};

use tracing::Instrument as _;

use crate::duplicates::{self, Published, Stored, Verdict};
use crate::intake::OwnEvents;
use crate::plan::{message_id, MsgId};

/// A message published and not acknowledged yet: what checking a
/// duplicate answer, and sending again, takes.
#[derive(Debug, Clone)]
struct Sent {
    subject: String,
    /// The id it is published under now.
    msg_id: String,
    /// The id it was first published under (retry ids derive from it).
    first_id: String,
    payload: Bytes,
    /// 0 for the first id, then each retry.
    attempt: u32,
    /// The key it is about, if one (for its trace).
    key_id: Option<KeyId>,
}

type AckFuture = BoxFuture<'static, (Sent, Result<PublishAck, PublishError>)>;

/// A PubAck (or its failure), with the message it answers.
pub struct Acked(Sent, Result<PublishAck, PublishError>);

/// A message that held one of our ids and was not ours: removed from its
/// stream, for the loop to count and file.
#[derive(Debug, Clone)]
pub struct Foreign {
    /// The stream that held it.
    pub stream: String,
    /// Its sequence there.
    pub seq: u64,
    /// Its subject.
    pub subject: String,
    /// Its bytes.
    pub payload: Bytes,
    /// The id it held.
    pub msg_id: String,
    /// Why it is not ours.
    pub why: String,
}

/// Signs and publishes, and keeps the PubAcks to come.
pub struct Publisher {
    js: jetstream::Context,
    identity: Arc<Identity>,
    /// What message ids are MACed under (derived from `identity`).
    ids: MessageIdKey,
    source: Source,
    /// Subjects under this are events (they come back through the fold).
    events_prefix: String,
    max_in_flight: usize,
    in_flight: FuturesUnordered<AckFuture>,
    /// Events signed here and not folded back yet.
    own: OwnEvents,
    /// Streams read back after a duplicate answer, by name.
    streams: HashMap<String, jetstream::stream::Stream>,
    /// Foreign messages found under our ids, not reported yet.
    foreign: Vec<Foreign>,
    /// When the event batch being handled was received (ns since the
    /// epoch), put on what is published meanwhile as
    /// [`keysync_schemas::headers::HOP_TIMES`] (for the bench's hop table).
    received_at: Option<u64>,
}

impl Publisher {
    /// A publisher signing with the cluster identity, as orchestrator `name`.
    pub fn new(
        js: jetstream::Context,
        identity: Arc<Identity>,
        subjects: &Subjects,
        name: &str,
        max_in_flight: usize,
    ) -> Self {
        Publisher {
            js,
            ids: MessageIdKey::derive(&identity),
            identity,
            source: Source::Orchestrator(name.to_string()),
            events_prefix: format!("{}.evt.", subjects.prefix()),
            max_in_flight: max_in_flight.max(1),
            in_flight: FuturesUnordered::new(),
            own: OwnEvents::default(),
            streams: HashMap::new(),
            foreign: Vec::new(),
            received_at: None,
        }
    }

    /// Marks what is published from now on as answering events received
    /// at `at` (ns since the epoch); `None` when the loop is done with them.
    pub fn handling(&mut self, at: Option<u64>) {
        self.received_at = at;
    }

    /// The key message ids are MACed under (see [`message_id`]).
    pub fn ids(&self) -> &MessageIdKey {
        &self.ids
    }

    /// Who this publisher speaks for, in the envelopes it sends.
    pub fn source(&self) -> Source {
        self.source.clone()
    }

    /// The events signed here and not folded back yet, for the intake.
    pub fn own_events(&mut self) -> &mut OwnEvents {
        &mut self.own
    }

    /// Signs `payload` for `subject` under `msg_id` and publishes it. Waits
    /// first if `max_in_flight` PubAcks are outstanding; a failed one of
    /// those is an error. `key_id`, the key it is about, is for its trace.
    pub async fn publish(
        &mut self,
        subject: String,
        msg_id: String,
        payload: Vec<u8>,
        key_id: Option<KeyId>,
    ) -> anyhow::Result<()> {
        while self.in_flight.len() >= self.max_in_flight {
            if let Some(acked) = self.in_flight.next().await {
                self.settle(Acked(acked.0, acked.1)).await?;
            }
        }
        self.send(Sent {
            subject,
            first_id: msg_id.clone(),
            msg_id,
            payload: payload.into(),
            attempt: 0,
            key_id,
        })
        .await
    }

    /// Signs and publishes one message; its PubAck joins those in flight.
    async fn send(&mut self, sent: Sent) -> anyhow::Result<()> {
        let mut h = keysync_security::signed_headers(
            &self.identity,
            &Signer::Cluster,
            &sent.subject,
            &sent.msg_id,
            &sent.payload,
        );
        if sent.subject.starts_with(&self.events_prefix) {
            if let Some(sig) = h.get(keysync_schemas::headers::SIGNATURE) {
                self.own.remember(
                    &sent.msg_id,
                    &sent.subject,
                    &sent.payload,
                    sig.as_str().to_string(),
                );
            }
        }
        // A PRODUCER span per publish; the consumers' spans are its children.
        let span = tracing::info_span!(
            "keysync.publish",
            otel.kind = "producer",
            messaging.system = "nats",
            messaging.destination.name = %sent.subject,
            messaging.operation.type = "send",
            messaging.message.id = %sent.msg_id,
            keysync.key_id = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        );
        if let Some(key_id) = sent.key_id {
            span.record("keysync.key_id", key_id.to_string().as_str());
        }
        keysync_telemetry::inject(&span, &mut h);
        if let Some(at) = self.received_at {
            let times = keysync_schemas::headers::HopTimes {
                orchestrator_received: Some(at),
                ..Default::default()
            };
            h.insert(keysync_schemas::headers::HOP_TIMES, times.to_header());
        }
        let fut = match self
            .js
            .publish_with_headers(sent.subject.clone(), h, sent.payload.clone())
            .instrument(span.clone())
            .await
        {
            Ok(ack) => ack.into_future(),
            Err(e) => {
                keysync_telemetry::fail(&span, "publish", &e);
                return Err(e.into());
            }
        };
        self.in_flight
            .push(Box::pin(async move { (sent, fut.await) }));
        Ok(())
    }

    /// Publishes `event`, a new fact each time (`HsmFailed`, `HsmRecovered`):
    /// under its envelope's id.
    pub async fn announce(&mut self, subject: String, event: Event) -> anyhow::Result<()> {
        let env = Envelope::new(self.source(), event);
        let id = message_id(
            &self.ids,
            MsgId::Fact {
                envelope_id: env.id,
            },
        );
        let key_id = env.body.key_id();
        self.publish(subject, id, encode(&env)?, key_id).await
    }

    /// Whether no PubAck is outstanding.
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// The next PubAck to come in (pending forever while none is
    /// outstanding, so the loop can always select on it). Cancel-safe;
    /// hand what it returns to [`Publisher::settle`].
    pub async fn next_ack(&mut self) -> Acked {
        match self.in_flight.next().await {
            Some((sent, ack)) => Acked(sent, ack),
            None => std::future::pending().await,
        }
    }

    /// Settles one PubAck: a failure is an error (the run ends); a
    /// duplicate answer is checked against what JetStream holds under the
    /// id, and if that is not ours the message is sent again under a fresh
    /// id (what was in the way is removed and kept for
    /// [`Publisher::take_foreign`]).
    pub async fn settle(&mut self, acked: Acked) -> anyhow::Result<()> {
        let Acked(sent, ack) = acked;
        let ack = ack.map_err(|e| anyhow::anyhow!("a publish was not acknowledged: {e}"))?;
        if !ack.duplicate {
            return Ok(());
        }
        let stream = self.stream(&ack.stream).await?;
        let stored = match stream.get_raw_message(ack.sequence).await {
            Ok(m) => Some(m),
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => None,
            Err(e) => anyhow::bail!(
                "reading back {} seq {} (a duplicate of {}): {e}",
                ack.stream,
                ack.sequence,
                sent.msg_id
            ),
        };
        let verdict = duplicates::judge(
            Published {
                subject: &sent.subject,
                msg_id: &sent.msg_id,
                payload: &sent.payload,
            },
            stored.as_ref().map(|m| Stored {
                subject: m.subject.as_str(),
                headers: Some(&m.headers),
                payload: &m.payload,
            }),
            &self.identity.public_key(),
        );
        match verdict {
            Verdict::Ours => return Ok(()),
            Verdict::Gone => tracing::info!(
                stream = %ack.stream,
                seq = ack.sequence,
                msg_id = %sent.msg_id,
                "what held this id is gone; sending again under a fresh id"
            ),
            Verdict::Foreign(why) => {
                tracing::warn!(
                    stream = %ack.stream,
                    seq = ack.sequence,
                    msg_id = %sent.msg_id,
                    subject = %sent.subject,
                    %why,
                    "a foreign message holds one of our ids: removing it, sending again under a fresh id"
                );
                if let Err(e) =
                    crate::streams::delete_message(&self.js, &ack.stream, ack.sequence, false).await
                {
                    // Taken meanwhile (an agent, or the intake removing it
                    // as rejected): gone either way.
                    tracing::info!(seq = ack.sequence, error = %e, "the foreign message was not removed");
                }
                if let Some(m) = stored {
                    self.foreign.push(Foreign {
                        stream: ack.stream.clone(),
                        seq: ack.sequence,
                        subject: m.subject.to_string(),
                        payload: m.payload,
                        msg_id: sent.msg_id.clone(),
                        why,
                    });
                }
            }
        }
        let Some(attempt) = duplicates::next_attempt(sent.attempt) else {
            anyhow::bail!(
                "{} is still taken after {} fresh ids",
                sent.first_id,
                duplicates::MAX_RETRIES
            );
        };
        let msg_id = message_id(
            &self.ids,
            MsgId::Retry {
                of: &sent.first_id,
                attempt,
            },
        );
        self.send(Sent {
            msg_id,
            attempt,
            ..sent
        })
        .await
    }

    /// A stream by name, looked up once.
    async fn stream(&mut self, name: &str) -> anyhow::Result<jetstream::stream::Stream> {
        if let Some(s) = self.streams.get(name) {
            return Ok(s.clone());
        }
        let s = self.js.get_stream(name).await?;
        self.streams.insert(name.to_string(), s.clone());
        Ok(s)
    }

    /// Foreign messages found under our ids since the last call.
    pub fn take_foreign(&mut self) -> Vec<Foreign> {
        std::mem::take(&mut self.foreign)
    }

    /// Waits for every PubAck outstanding (at shutdown), logging failures.
    pub async fn drain(&mut self) {
        while let Some((sent, ack)) = self.in_flight.next().await {
            match ack {
                Err(e) => tracing::warn!(error = %e, "publish not acknowledged at shutdown"),
                Ok(a) if a.duplicate => tracing::info!(
                    msg_id = %sent.msg_id,
                    "a duplicate answer at shutdown, not checked: the next run plans it again"
                ),
                Ok(_) => {}
            }
        }
    }
}
