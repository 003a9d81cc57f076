//! `orchestrator`: folds the event log into cluster state, fans out clone
//! commands, tracks acknowledgements, and declares keys replicated.
//!
//! The brain is pure ([`state`] and [`decide`]); [`run`] is the thin NATS
//! loop around it. State is a fold over the log: at start the orchestrator
//! replays the events stream from the beginning with no side effects, then
//! [`decide::reconcile`]s once and goes live. It is crash-only: any failure
//! to publish ends the process, and the restart's replay and reconcile
//! finish whatever was half done.

pub mod decide;
pub mod metrics;
pub mod prometheus;
pub mod state;
pub mod streams;

use std::future::IntoFuture;

use async_nats::jetstream::{self, consumer::pull, context::PublishError, publish::PublishAck};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use keysync_schemas::{
    decode, encode, headers, CloneKey, Command, Envelope, Event, KeyCreated, KeyId, KeyReplicated,
    Source, StatusReply, StatusRequest, Subjects,
};

use crate::decide::{decide, reconcile, subject_matches, Action};
use crate::state::{ClusterState, EventMeta};

/// How the orchestrator is configured.
#[derive(Debug, Clone)]
pub struct Config {
    /// Subject layout of the cluster.
    pub subjects: Subjects,
    /// This instance's name (in the `source` of what it publishes).
    pub name: String,
    /// Stream replicas when creating streams (3 on a NATS cluster).
    pub replicas: usize,
    /// Most publishes awaiting their PubAck at once.
    pub max_in_flight: usize,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How often sync metrics are published.
    pub metrics_interval: std::time::Duration,
}

struct Orchestrator {
    config: Config,
    js: jetstream::Context,
    events: jetstream::stream::Stream,
    state: ClusterState,
    stats: metrics::SyncStats,
    in_flight: FuturesUnordered<BoxFuture<'static, Result<PublishAck, PublishError>>>,
}

/// Runs the orchestrator until `shutdown` resolves or a fatal error occurs.
pub async fn run(
    config: Config,
    nats: async_nats::Client,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let js = jetstream::new(nats.clone());
    let mut events = streams::ensure(&js, &config.subjects, config.replicas).await?;
    let info = events.info().await?.clone();
    let replay_until = info.state.last_sequence;
    let mut live = info.state.messages == 0;
    tracing::info!(
        stream = %config.subjects.events_stream(),
        messages = info.state.messages,
        last_seq = replay_until,
        "replaying the event log"
    );
    let consumer = events
        .create_consumer(pull::OrderedConfig {
            filter_subject: config.subjects.events_all(),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut status_requests = nats
        .subscribe(config.subjects.orchestrator_status())
        .await?;

    let mut orch = Orchestrator {
        config,
        js,
        events,
        state: ClusterState::default(),
        stats: metrics::SyncStats::default(),
        in_flight: FuturesUnordered::new(),
    };
    let latest: prometheus::Latest = Default::default();
    let metrics_server = orch
        .config
        .metrics_addr
        .map(|addr| tokio::spawn(prometheus::serve(addr, latest.clone())));
    let mut metrics_tick = tokio::time::interval(orch.config.metrics_interval);
    metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = std::time::Instant::now();
    if live {
        tracing::info!("event log empty; live");
    }
    tokio::pin!(shutdown);
    let result: anyhow::Result<()> = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            msg = messages.next() => {
                let Some(msg) = msg else { break Err(anyhow::anyhow!("event consumer ended")) };
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => break Err(anyhow::anyhow!("event consumer failed: {e}")),
                };
                let (seq, pending) = match msg.info() {
                    Ok(i) => (i.stream_sequence, i.pending),
                    Err(e) => break Err(anyhow::anyhow!("event without metadata: {e}")),
                };
                if let Err(e) = orch.handle(&msg, live).await {
                    break Err(e);
                }
                if !live && (seq >= replay_until || pending == 0) {
                    live = true;
                    let actions = reconcile(&orch.state);
                    tracing::info!(
                        events = orch.state.last_seq(),
                        keys = orch.state.keys().count(),
                        outstanding = actions.len(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "replay done; live"
                    );
                    if let Err(e) = orch.execute(actions, None).await {
                        break Err(e);
                    }
                }
            }
            Some(req) = status_requests.next() => {
                orch.answer_status(&nats, req).await;
            }
            _ = metrics_tick.tick() => {
                orch.publish_metrics(&nats, &latest).await;
            }
            Some(ack) = orch.in_flight.next(), if !orch.in_flight.is_empty() => {
                if let Err(e) = ack {
                    break Err(anyhow::anyhow!("a publish was not acknowledged: {e}"));
                }
            }
        }
    };
    // Wait for what was already published, then let the client go.
    while let Some(ack) = orch.in_flight.next().await {
        if let Err(e) = ack {
            tracing::warn!(error = %e, "publish not acknowledged at shutdown");
        }
    }
    drop(messages);
    if let Some(server) = metrics_server {
        server.abort();
    }
    let _ = nats.flush().await;
    result
}

impl Orchestrator {
    async fn handle(&mut self, msg: &jetstream::Message, live: bool) -> anyhow::Result<()> {
        let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let meta = EventMeta {
            seq: info.stream_sequence,
            stored_at_ns: u64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0),
        };
        let subject = msg.subject.as_str();
        let event = match decode::<Event>(&msg.payload) {
            Ok(env) => env.body,
            Err(e) => {
                tracing::warn!(seq = meta.seq, subject, reason = e.reason(), error = %e, "rejected event");
                self.state.count_rejection(e.reason());
                return Ok(());
            }
        };
        if !subject_matches(self.config.subjects.parse_event(subject), &event) {
            tracing::warn!(
                seq = meta.seq,
                subject,
                kind = event.kind(),
                "rejected event: subject does not match body"
            );
            self.state.count_rejection("subject_mismatch");
            return Ok(());
        }
        match self.state.apply(meta, &event) {
            Ok(change) => self.stats.observe(change, live),
            Err(r) => {
                tracing::warn!(seq = meta.seq, subject, reason = r.reason(), error = %r, "rejected event");
                return Ok(());
            }
        }
        if live {
            let actions = decide(&self.state, meta, &event);
            let current = match &event {
                Event::KeyCreated(c) => Some((meta.seq, c)),
                _ => None,
            };
            self.execute(actions, current).await?;
        }
        Ok(())
    }

    /// Carries out actions. `current` is the `KeyCreated` being handled,
    /// if any, so its clones need not fetch it back from the stream.
    async fn execute(
        &mut self,
        actions: Vec<Action>,
        current: Option<(u64, &KeyCreated)>,
    ) -> anyhow::Result<()> {
        let mut fetched: Option<(u64, KeyCreated)> = None;
        for action in actions {
            match action {
                Action::SendClone {
                    target,
                    key_id,
                    created_seq,
                } => {
                    let key = match current {
                        Some((seq, c)) if seq == created_seq => c.clone(),
                        _ => match &fetched {
                            Some((seq, c)) if *seq == created_seq => c.clone(),
                            _ => {
                                let Some(c) = self.fetch_created(created_seq, key_id).await? else {
                                    continue;
                                };
                                fetched = Some((created_seq, c.clone()));
                                c
                            }
                        },
                    };
                    let subject = self.config.subjects.commands_for(&target);
                    let msg_id = format!("clone-{key_id}-{target}");
                    let env = Envelope::new(
                        Source::Orchestrator(self.config.name.clone()),
                        Command::CloneKey(CloneKey {
                            target,
                            created_seq,
                            key,
                        }),
                    );
                    self.publish(subject, msg_id, encode(&env)?).await?;
                }
                Action::AnnounceReplicated { key_id, latency_ns } => {
                    let Some(key) = self.state.key(&key_id) else {
                        continue;
                    };
                    let holders = key
                        .holders
                        .iter()
                        .filter_map(|i| self.state.member_at(i).map(|m| m.hsm.clone()))
                        .collect();
                    let env = Envelope::new(
                        Source::Orchestrator(self.config.name.clone()),
                        Event::KeyReplicated(KeyReplicated {
                            key_id,
                            fingerprint: key.fingerprint,
                            holders,
                            sync_latency_micros: latency_ns / 1_000,
                            created_seq: key.created_seq,
                        }),
                    );
                    let subject = self.config.subjects.key_replicated(&key_id);
                    self.publish(subject, format!("replicated-{key_id}"), encode(&env)?)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Reads a `KeyCreated` back from the stream by sequence.
    async fn fetch_created(&self, seq: u64, key_id: KeyId) -> anyhow::Result<Option<KeyCreated>> {
        let msg = match self.events.direct_get(seq).await {
            Ok(m) => m,
            Err(e) => {
                // Purged or deleted: nothing to clone from.
                tracing::warn!(seq, %key_id, error = %e, "KeyCreated not readable; clone skipped");
                return Ok(None);
            }
        };
        match decode::<Event>(&msg.payload).map(|e| e.body) {
            Ok(Event::KeyCreated(c)) if c.key_id == key_id => Ok(Some(c)),
            _ => {
                tracing::warn!(seq, %key_id, "message at that sequence is not the key's KeyCreated");
                Ok(None)
            }
        }
    }

    async fn publish(
        &mut self,
        subject: String,
        msg_id: String,
        payload: Vec<u8>,
    ) -> anyhow::Result<()> {
        while self.in_flight.len() >= self.config.max_in_flight {
            if let Some(ack) = self.in_flight.next().await {
                ack.map_err(|e| anyhow::anyhow!("a publish was not acknowledged: {e}"))?;
            }
        }
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, msg_id.as_str());
        let fut = self
            .js
            .publish_with_headers(subject, h, payload.into())
            .await?;
        self.in_flight.push(Box::pin(fut.into_future()));
        Ok(())
    }

    /// Publishes the metrics of the window that just ended, as JSON on
    /// core NATS, and keeps them for the Prometheus endpoint.
    async fn publish_metrics(&mut self, nats: &async_nats::Client, latest: &prometheus::Latest) {
        let at_unix_ms = keysync_schemas::Timestamp::now().as_nanos() / 1_000_000;
        let doc = self.stats.roll(&self.state, &self.config.name, at_unix_ms);
        match serde_json::to_vec(&doc) {
            Ok(json) => {
                if let Err(e) = nats
                    .publish(self.config.subjects.metrics_sync(), json.into())
                    .await
                {
                    tracing::warn!(error = %e, "could not publish metrics");
                }
            }
            Err(e) => tracing::error!(error = %e, "could not encode metrics"),
        }
        if let Ok(mut l) = latest.write() {
            *l = Some(doc);
        }
    }

    async fn answer_status(&self, nats: &async_nats::Client, req: async_nats::Message) {
        let Some(reply) = req.reply.clone() else {
            return;
        };
        if let Err(e) = decode::<StatusRequest>(&req.payload) {
            tracing::warn!(reason = e.reason(), "rejected status request");
            return;
        }
        let env = Envelope::new(
            Source::Orchestrator(self.config.name.clone()),
            StatusReply::Cluster(self.state.status()),
        );
        match encode(&env) {
            Ok(bytes) => {
                if let Err(e) = nats.publish(reply, bytes.into()).await {
                    tracing::warn!(error = %e, "could not answer a status request");
                }
            }
            Err(e) => tracing::error!(error = %e, "could not encode status"),
        }
    }
}

/// Default most publishes in flight.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;
