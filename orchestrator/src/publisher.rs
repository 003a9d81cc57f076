//! Publishing to JetStream: every message the orchestrator stores is signed
//! here, and its PubAck is awaited later, with up to `max_in_flight`
//! outstanding at once.
//!
//! Awaiting each PubAck in turn would make a fan-out of thousands of
//! commands cost thousands of round trips; not awaiting them at all would
//! let a publish fail unnoticed. So acks are collected in the background
//! ([`Publisher::next_ack`] in the loop), and a failed one ends the run:
//! the orchestrator is crash-only, and the restart's reconcile publishes
//! again under the same message ids, which JetStream stores once.

use std::future::IntoFuture;
use std::sync::Arc;

use async_nats::jetstream::{self, context::PublishError, publish::PublishAck};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use keysync_schemas::{encode, Envelope, Event, Source, Subjects};
use keysync_security::{Identity, MessageIdKey, Signer};

use crate::intake::OwnEvents;
use crate::plan::{message_id, MsgId};

type AckFuture = BoxFuture<'static, Result<PublishAck, PublishError>>;

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
        }
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
    /// those is an error.
    pub async fn publish(
        &mut self,
        subject: String,
        msg_id: String,
        payload: Vec<u8>,
    ) -> anyhow::Result<()> {
        while self.in_flight.len() >= self.max_in_flight {
            if let Some(ack) = self.in_flight.next().await {
                ack.map_err(|e| anyhow::anyhow!("a publish was not acknowledged: {e}"))?;
            }
        }
        let mut h = keysync_security::signed_headers(
            &self.identity,
            &Signer::Cluster,
            &subject,
            &msg_id,
            &payload,
        );
        if subject.starts_with(&self.events_prefix) {
            if let Some(sig) = h.get(keysync_schemas::headers::SIGNATURE) {
                self.own
                    .remember(&msg_id, &subject, &payload, sig.as_str().to_string());
            }
        }
        keysync_telemetry::inject(&tracing::Span::current(), &mut h);
        let fut = self
            .js
            .publish_with_headers(subject, h, payload.into())
            .await?;
        self.in_flight.push(Box::pin(fut.into_future()));
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
        self.publish(subject, id, encode(&env)?).await
    }

    /// Whether no PubAck is outstanding.
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// The next PubAck to come in (pending forever while none is
    /// outstanding, so the loop can always select on it).
    pub async fn next_ack(&mut self) -> anyhow::Result<()> {
        match self.in_flight.next().await {
            Some(ack) => ack
                .map(|_| ())
                .map_err(|e| anyhow::anyhow!("a publish was not acknowledged: {e}")),
            None => std::future::pending().await,
        }
    }

    /// Waits for every PubAck outstanding (at shutdown), logging failures.
    pub async fn drain(&mut self) {
        while let Some(ack) = self.in_flight.next().await {
            if let Err(e) = ack {
                tracing::warn!(error = %e, "publish not acknowledged at shutdown");
            }
        }
    }
}
