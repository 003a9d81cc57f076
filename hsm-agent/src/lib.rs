//! `hsm-agent`: fronts one HSM.
//!
//! It serves key operations over NATS request/reply, announces every token
//! key it creates as a `KeyCreated` event in JetStream (wrapped under the
//! cluster domain key), and applies the clone commands the orchestrator
//! queues for it. See [`run`].

pub mod bad_input;
pub mod clones;
pub mod keystore;
pub mod material;
pub mod membership;
pub mod metrics;
pub mod offline;
pub mod ops;
pub mod uniqueness;

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, context::PublishAckFuture};
use futures::StreamExt;
use keysync_schemas::{
    decode, encode, subjects::ANY_OP_QUEUE, Envelope, Event, Heartbeat, HsmId, HsmJoined, KeyId,
    OpReply, OpRequest, RejectReason, Rejection, Source, Subjects, Timestamp,
};
use tokio::sync::{mpsc, Semaphore};
use tracing::Instrument as _;

use keysync_security::{DeadLetters, Filing, Identity, Keep, Signer};

use crate::bad_input::BadInput;
use crate::keystore::{embedded::EmbeddedKeystore, Keystore};
use keysync_security::domain_key::DomainKey;

/// How an agent is configured.
#[derive(Debug, Clone)]
pub struct Config {
    /// This HSM's id.
    pub hsm: HsmId,
    /// Where the embedded keystore keeps its database.
    pub data_dir: PathBuf,
    /// The HSM this agent fronts.
    pub keystore: KeystoreKind,
    /// Subject prefix of the cluster.
    pub subjects: Subjects,
    /// How long a `logged` create waits for its PubAck.
    pub publish_timeout: Duration,
    /// Operations handled at once.
    pub max_concurrent_ops: usize,
    /// How often the agent sends its heartbeat (with its inventory digest).
    pub heartbeat_interval: Duration,
    /// This agent's identity: signs its events and heartbeats.
    pub identity: Arc<Identity>,
    /// The cluster's public key, if given (otherwise the pinned one, or
    /// trust on first use; see [`cluster_key`]).
    pub cluster_key: Option<[u8; 32]>,
    /// A one-time join token to enroll with.
    pub join_token: Option<String>,
    /// `--metrics-addr` and the Prometheus series (kept across runs).
    pub metrics: metrics::Endpoint,
}

/// The running agent, shared by its tasks.
pub struct Agent {
    /// The HSM.
    pub store: Arc<dyn Keystore>,
    /// This HSM's id.
    pub hsm: HsmId,
    /// Subject layout.
    pub subjects: Subjects,
    /// Rejected input: counters and dead letters.
    pub bad_input: BadInput,
    /// Clones applied since start.
    pub clones_applied: AtomicU64,
    /// Clone commands that could not be applied (`CloneFailed`) since start.
    pub clones_failed: AtomicU64,
    /// Clones handed back to be retried after a passing failure, since start.
    pub clones_retried: AtomicU64,
    /// Deletes handed back to be retried after a passing failure, since start.
    pub deletes_retried: AtomicU64,
    nats: async_nats::Client,
    js: jetstream::Context,
    outbox_done: mpsc::UnboundedSender<KeyId>,
    /// How long a `logged` create or a delete waits for its PubAck.
    pub publish_timeout: Duration,
    /// This agent's identity.
    pub identity: Arc<Identity>,
    /// Keys the ids of the dead letters this agent files (derived once
    /// from its identity, not per rejected message).
    pub message_ids: keysync_security::MessageIdKey,
    /// The cluster's public key: commands must be signed with it.
    pub cluster_key: [u8; 32],
    /// Prometheus series and readiness.
    pub metrics: metrics::AgentMetrics,
}

impl Agent {
    /// Publishes an event to JetStream with `Nats-Msg-Id` set, so a retried
    /// publish is stored once. Returns the PubAck future.
    pub async fn publish_event(
        &self,
        subject: String,
        msg_id: uuid::Uuid,
        payload: Vec<u8>,
    ) -> anyhow::Result<PublishAckFuture> {
        self.publish_with(subject, msg_id, payload, |_| {}).await
    }

    /// Publishes a command's result like [`Agent::publish_event`], with
    /// the command's [`HopTimes`](keysync_schemas::headers::HopTimes) (for
    /// the bench's hop table; not signed, a measurement).
    pub async fn publish_result(
        &self,
        subject: String,
        msg_id: uuid::Uuid,
        payload: Vec<u8>,
        hops: &keysync_schemas::headers::HopTimes,
    ) -> anyhow::Result<PublishAckFuture> {
        self.publish_with(subject, msg_id, payload, |h| {
            h.insert(keysync_schemas::headers::HOP_TIMES, hops.to_header());
        })
        .await
    }

    /// Publishes a `KeyCreated` like [`Agent::publish_event`], stored only
    /// if the log holds nothing yet under its key id (see [`uniqueness`]):
    /// the PubAck is then "wrong last sequence" for a taken id.
    pub async fn publish_key_created(
        &self,
        key: &KeyId,
        msg_id: uuid::Uuid,
        payload: Vec<u8>,
    ) -> anyhow::Result<PublishAckFuture> {
        self.publish_with(self.subjects.key_created(key), msg_id, payload, |h| {
            uniqueness::expect_new_key_id(h, &self.subjects, key)
        })
        .await
    }

    async fn publish_with(
        &self,
        subject: String,
        msg_id: uuid::Uuid,
        payload: Vec<u8>,
        extra: impl FnOnce(&mut async_nats::HeaderMap),
    ) -> anyhow::Result<PublishAckFuture> {
        let mut h = keysync_security::signed_headers(
            &self.identity,
            &Signer::Hsm(self.hsm.clone()),
            &subject,
            &msg_id.to_string(),
            &payload,
        );
        // A PRODUCER span per publish; the consumers' spans are its children.
        let span = tracing::info_span!(
            "keysync.publish",
            otel.kind = "producer",
            messaging.system = "nats",
            messaging.destination.name = %subject,
            messaging.operation.type = "send",
            messaging.message.id = %msg_id,
            keysync.key_id = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        );
        if let Some(key_id) = self.subjects.key_of_event(&subject) {
            span.record("keysync.key_id", key_id);
        }
        keysync_telemetry::inject(&span, &mut h);
        extra(&mut h);
        match self
            .js
            .publish_with_headers(subject, h, payload.into())
            .instrument(span.clone())
            .await
        {
            Ok(ack) => Ok(ack),
            Err(e) => {
                keysync_telemetry::fail(&span, "publish", &e);
                Err(e.into())
            }
        }
    }

    /// Marks a key's `KeyCreated` as logged (forgotten from the outbox in
    /// the next batch).
    pub fn outbox_confirmed(&self, key: KeyId) {
        let _ = self.outbox_done.send(key);
    }

    /// Waits until a stream exists (the orchestrator creates them).
    pub async fn wait_for_stream(&self, name: &str) -> anyhow::Result<jetstream::stream::Stream> {
        let mut warned = false;
        loop {
            match self.js.get_stream(name).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    if !warned {
                        tracing::info!(stream = name, error = %e, "waiting for the orchestrator to create the stream");
                        warned = true;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Which HSM an agent fronts.
#[derive(Debug, Clone)]
pub enum KeystoreKind {
    /// The embedded software HSM in the data dir, under the cluster domain
    /// key in this file.
    Embedded {
        /// The domain key file (`keysync cluster init`).
        domain_key: PathBuf,
    },
    /// A PKCS#11 token holding the cluster domain key (provisioned with
    /// `keysync hsm provision-domain-key`).
    #[cfg(feature = "pkcs11")]
    Pkcs11 {
        /// The module (shared library) path.
        module: PathBuf,
        /// The token's label.
        token_label: String,
        /// The user PIN file (mode 0600 or stricter).
        pin_file: PathBuf,
        /// The domain key the token must hold.
        domain: keystore::pkcs11::ExpectedDomain,
    },
}

/// Opens the keystore named by `config`: loads every token key, and for a
/// PKCS#11 token checks its domain key, probes what it can hold and
/// reconciles it with the journal. A wrong domain key, a wrong PIN or a
/// corrupt store is an error here, not later. Blocks.
pub fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Keystore>> {
    let store: Arc<dyn Keystore> = match &config.keystore {
        KeystoreKind::Embedded { domain_key } => {
            let domain = DomainKey::load(domain_key)?;
            Arc::new(
                EmbeddedKeystore::open(&config.data_dir, config.hsm.clone(), domain)
                    .context("opening the embedded keystore")?,
            )
        }
        #[cfg(feature = "pkcs11")]
        KeystoreKind::Pkcs11 {
            module,
            token_label,
            pin_file,
            domain,
        } => {
            use keystore::pkcs11::{Pkcs11Keystore, Token};
            let token = Token::open(module, token_label, pin_file).with_context(|| {
                format!(
                    "opening PKCS#11 token {token_label:?} with module {}",
                    module.display()
                )
            })?;
            let store = Pkcs11Keystore::open(
                Arc::new(token),
                &config.data_dir,
                config.hsm.clone(),
                *domain,
            )
            .with_context(|| format!("opening the keystore on PKCS#11 token {token_label:?}"))?;
            let r = store.reconciled();
            tracing::info!(
                token = %token_label,
                holds = ?store.holdable_types(),
                destroyed = r.destroyed.len(),
                lost = r.lost.len(),
                foreign = r.foreign,
                "PKCS#11 token reconciled with the journal"
            );
            Arc::new(store)
        }
    };
    tracing::info!(
        hsm = %config.hsm,
        token_keys = store.token_key_count(),
        domain = %store.domain_id(),
        "keystore open"
    );
    Ok(store)
}

/// Runs the agent on `store` until `shutdown` resolves or a fatal error
/// occurs (after which it may simply be run again). It returns soon after
/// `shutdown` resolves whether NATS is there or not (while starting too).
pub async fn run(
    config: Config,
    store: Arc<dyn Keystore>,
    nats: async_nats::Client,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    config.metrics.start();
    config.metrics.metrics.keystore_opened(&nats);
    let mut tasks = tokio::task::JoinSet::new();
    // Starting needs NATS (the streams, a status reply, the first
    // publishes) and waits for it: a stop signal ends the wait.
    let agent = tokio::select! {
        started = start(&config, store, &nats, &mut tasks) => started?,
        _ = &mut shutdown => return Ok(()),
    };
    tracing::info!(hsm = %agent.hsm, identity = %agent.identity.public_hex(), "agent ready");

    let result = tokio::select! {
        _ = &mut shutdown => Ok(()),
        Some(done) = tasks.join_next() => match done {
            Ok(Ok(())) => Err(anyhow::anyhow!("a task ended unexpectedly")),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(anyhow::anyhow!("a task panicked: {e}")),
        },
    };
    // Stop consuming before the client goes away.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    // Sends what is buffered, if the server is there: a flush waits for a
    // server round trip, forever while it is away.
    let _ = tokio::time::timeout(Duration::from_secs(1), nats.flush()).await;
    result
}

/// Connects the agent to the cluster and starts its tasks into `tasks`;
/// returns once it serves and is announced.
async fn start(
    config: &Config,
    store: Arc<dyn Keystore>,
    nats: &async_nats::Client,
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<Arc<Agent>> {
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let js = jetstream::new(nats.clone());
    let cluster_key = cluster_key(config, nats).await?;
    let agent = Arc::new(Agent {
        store,
        hsm: config.hsm.clone(),
        subjects: config.subjects.clone(),
        bad_input: BadInput::new(DeadLetters::new(
            js.clone(),
            &config.subjects,
            "agent",
            Source::Hsm(config.hsm.clone()),
            config.identity.clone(),
            Signer::Hsm(config.hsm.clone()),
        )),
        identity: config.identity.clone(),
        message_ids: keysync_security::MessageIdKey::derive(&config.identity),
        cluster_key,
        metrics: config.metrics.metrics.clone(),
        clones_applied: AtomicU64::new(0),
        clones_failed: AtomicU64::new(0),
        clones_retried: AtomicU64::new(0),
        deletes_retried: AtomicU64::new(0),
        js,
        nats: nats.clone(),
        outbox_done: done_tx,
        publish_timeout: config.publish_timeout,
    });

    // Streams first: creates must be loggable before we serve them.
    agent
        .wait_for_stream(&agent.subjects.events_stream())
        .await?;

    let agent_for_membership = agent.clone();
    let agent_for_heartbeat = agent.clone();
    let heartbeat_interval = config.heartbeat_interval;
    tasks.spawn(serve_ops(agent.clone(), config.max_concurrent_ops));
    tasks.spawn(forget_confirmed(agent.clone(), done_rx));
    tasks.spawn(republish_outbox(agent.clone()));
    wait_until_serving(&agent).await?;
    if let Some(token) = &config.join_token {
        request_join(&agent, token).await?;
    }
    announce(&agent).await?;
    tasks.spawn(clones::run(agent.clone()));
    tasks.spawn(async move {
        membership::confirm(agent_for_membership).await?;
        agent_for_heartbeat.metrics.enrolled();
        heartbeat(agent_for_heartbeat, heartbeat_interval).await
    });
    Ok(agent)
}

/// Serves key operations on this HSM's subject and the any-HSM queue group.
async fn serve_ops(agent: Arc<Agent>, max_concurrent: usize) -> anyhow::Result<()> {
    let own = agent
        .nats
        .subscribe(agent.subjects.hsm_op(&agent.hsm))
        .await?;
    let any = agent
        .nats
        .queue_subscribe(agent.subjects.any_op(), ANY_OP_QUEUE.to_string())
        .await?;
    let mut requests = futures::stream::select(own, any);
    let limit = Arc::new(Semaphore::new(max_concurrent.max(1)));
    while let Some(msg) = requests.next().await {
        let Some(reply_to) = msg.reply.clone() else {
            agent.bad_input.count(
                &msg.subject,
                &Rejection::new(
                    RejectReason::NoReplySubject,
                    "request without a reply subject",
                ),
            );
            continue;
        };
        // Only an inbox is answered (nor is the operation carried out):
        // the reply goes out with this agent's permissions, and a request
        // could otherwise aim it at the audit stream, the lease bucket or
        // a command queue.
        if let Err(rejection) = keysync_security::reply::check(&reply_to) {
            agent
                .bad_input
                .file(
                    Filing {
                        subject: &msg.subject,
                        rejection,
                        stream_seq: None,
                        payload: &msg.payload,
                        dedup_id: None,
                    },
                    // A request may carry plaintext material (Import).
                    Keep::DigestOnly,
                )
                .await;
            continue;
        }
        let permit = limit.clone().acquire_owned().await?;
        let agent = agent.clone();
        // The agent serving one operation: a SERVER span, child of the
        // client's attempt.
        let span = tracing::info_span!(
            "keysync.op",
            otel.kind = "server",
            messaging.system = "nats",
            messaging.destination.name = %msg.subject,
            messaging.operation.type = "process",
            keysync.op = tracing::field::Empty,
            keysync.key_id = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
            hsm = %agent.hsm,
        );
        keysync_telemetry::follow(&span, msg.headers.as_ref());
        tokio::spawn(async move {
            let reply = ops::handle(&agent, &msg.subject, &msg.payload)
                .instrument(span.clone())
                .await;
            match &reply {
                OpReply::Error(e) => {
                    keysync_telemetry::fail(&span, e.kind.as_str(), &e.message);
                }
                OpReply::Created { info, .. } => {
                    span.record("keysync.key_id", info.key_id.to_string().as_str());
                }
                _ => {}
            }
            let mut reply_headers = async_nats::HeaderMap::new();
            keysync_telemetry::inject(&span, &mut reply_headers);
            let source = Source::Hsm(agent.hsm.clone());
            // A reply that cannot be encoded (too large) becomes an error
            // reply, so the caller is not left waiting for a timeout.
            let bytes = encode(&Envelope::new(source.clone(), reply)).or_else(|e| {
                tracing::error!(error = %e, "could not encode a reply");
                encode(&Envelope::new(
                    source,
                    OpReply::Error(keysync_schemas::OpError::new(
                        keysync_schemas::OpErrorKind::Internal,
                        format!("reply could not be encoded: {e}"),
                    )),
                ))
            });
            if let Ok(bytes) = bytes {
                if let Err(e) = agent
                    .nats
                    .publish_with_headers(reply_to, reply_headers, bytes.into())
                    .await
                {
                    tracing::warn!(error = %e, "could not send a reply");
                }
            }
            drop(permit);
        });
    }
    anyhow::bail!("operation subscription ended")
}

/// `flush` does not prove the server has registered our subscriptions, so
/// ask ourselves until we answer.
async fn wait_until_serving(agent: &Arc<Agent>) -> anyhow::Result<()> {
    let req = encode(&Envelope::new(
        Source::Hsm(agent.hsm.clone()),
        OpRequest::Health,
    ))?;
    let subject = agent.subjects.hsm_op(&agent.hsm);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_millis(500),
            agent.nats.request(subject.clone(), req.clone().into()),
        )
        .await;
        if let Ok(Ok(msg)) = attempt {
            if matches!(
                decode::<OpReply>(&msg.payload).map(|e| e.body),
                Ok(OpReply::Health(_))
            ) {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("operation service did not become reachable within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Announces this HSM: first the key types it can hold
/// (`HsmCapabilities`, so the cluster never sends it keys it cannot hold),
/// then `HsmJoined`, each retried until JetStream takes it.
pub(crate) async fn announce(agent: &Arc<Agent>) -> anyhow::Result<()> {
    let caps = Envelope::new(
        Source::Hsm(agent.hsm.clone()),
        Event::HsmCapabilities(keysync_schemas::HsmCapabilities {
            hsm: agent.hsm.clone(),
            holds: agent.store.holdable_types(),
        }),
    );
    publish_until_acked(
        agent,
        agent.subjects.hsm_capabilities(&agent.hsm),
        &caps,
        "HsmCapabilities",
    )
    .await?;
    let env = Envelope::new(
        Source::Hsm(agent.hsm.clone()),
        Event::HsmJoined(HsmJoined {
            hsm: agent.hsm.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            token_keys: agent.store.token_key_count(),
        }),
    );
    publish_until_acked(
        agent,
        agent.subjects.hsm_joined(&agent.hsm),
        &env,
        "HsmJoined",
    )
    .await
}

/// Publishes one event of this agent's, retrying until JetStream takes it.
async fn publish_until_acked(
    agent: &Arc<Agent>,
    subject: String,
    env: &Envelope<Event>,
    what: &str,
) -> anyhow::Result<()> {
    let bytes = encode(env)?;
    loop {
        match agent
            .publish_event(subject.clone(), env.id, bytes.clone())
            .await
        {
            Ok(ack) => match ack.await {
                Ok(_) => return Ok(()),
                Err(e) => tracing::warn!(error = %e, "{what} not acknowledged; retrying"),
            },
            Err(e) => tracing::warn!(error = %e, "{what} not published; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Says "alive, and this is what I hold" on core NATS, every interval.
async fn heartbeat(agent: Arc<Agent>, interval: Duration) -> anyhow::Result<()> {
    let subject = agent.subjects.heartbeat(&agent.hsm);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let store = agent.store.clone();
        let (token_keys, digest, outbox) = tokio::task::spawn_blocking(move || {
            (
                store.token_key_count(),
                store.inventory_digest(),
                store.outbox().map(|o| o.len() as u64).unwrap_or(0),
            )
        })
        .await?;
        agent.metrics.set_outbox(outbox);
        let env = Envelope::new(
            Source::Hsm(agent.hsm.clone()),
            Heartbeat {
                hsm: agent.hsm.clone(),
                token_keys,
                digest,
                outbox,
            },
        );
        let bytes = encode(&env)?;
        let h = keysync_security::signed_headers(
            &agent.identity,
            &Signer::Hsm(agent.hsm.clone()),
            &subject,
            &env.id.to_string(),
            &bytes,
        );
        if let Err(e) = agent
            .nats
            .publish_with_headers(subject.clone(), h, bytes.into())
            .await
        {
            tracing::warn!(error = %e, "could not send a heartbeat");
        }
    }
}

/// Removes confirmed entries from the outbox, in batches (one transaction
/// for many keys).
async fn forget_confirmed(
    agent: Arc<Agent>,
    mut rx: mpsc::UnboundedReceiver<KeyId>,
) -> anyhow::Result<()> {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 1024).await > 0 {
        let ids = std::mem::take(&mut batch);
        let store = agent.store.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || store.outbox_done(&ids)).await? {
            // Harmless: the entries are republished and deduplicated.
            tracing::warn!(error = %e, "could not trim the outbox");
        }
    }
    Ok(())
}

/// Publishes `KeyCreated` (and `KeyDeleted`) events that were stored but
/// never acknowledged (the agent died, or JetStream was away): at start,
/// then every few seconds. JetStream deduplicates by `Nats-Msg-Id`, and a
/// `KeyCreated` is stored only while its id is free in the log: one refused
/// because it is there already is recognised as ours ([`uniqueness`]), so
/// publishing one twice is harmless; one whose id another key took first
/// is undone.
const OUTBOX_GRACE: Duration = Duration::from_secs(5);

async fn republish_outbox(agent: Arc<Agent>) -> anyhow::Result<()> {
    loop {
        let store = agent.store.clone();
        // A store that cannot be read now (an I/O error, reopened when it
        // passes) is no reason to stop the agent: try again next round.
        let pending = match tokio::task::spawn_blocking(move || store.outbox()).await? {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the outbox; will retry");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        if !pending.is_empty() {
            tracing::info!(
                count = pending.len(),
                "publishing KeyCreated events from the outbox"
            );
        }
        for (key_id, bytes) in pending {
            let Ok(env) = decode::<Event>(&bytes) else {
                tracing::error!(%key_id, "unreadable outbox entry; dropping it");
                agent.outbox_confirmed(key_id);
                continue;
            };
            // Younger entries are still waiting for their first PubAck.
            let age = Timestamp::now()
                .as_nanos()
                .saturating_sub(env.emitted_at.as_nanos());
            if age < OUTBOX_GRACE.as_nanos() as u64 {
                continue;
            }
            // Stamped now (same id), so that an entry that waited out a long
            // outage is inside the replay window when it is stored.
            let created = match &env.body {
                Event::KeyCreated(c) => Some(c.fingerprint),
                _ => None,
            };
            let restamped = Envelope::with_id(env.id, env.source, env.body);
            let Ok(restamped_bytes) = encode(&restamped) else {
                continue;
            };
            match created {
                // Stored only if the id is still free in the cluster, or
                // found to be ours already; a lost id is undone here.
                Some(fingerprint) => {
                    let published = agent
                        .publish_key_created(&key_id, env.id, restamped_bytes)
                        .await;
                    match uniqueness::await_created(
                        &agent,
                        key_id,
                        fingerprint,
                        bytes,
                        published,
                        None,
                    )
                    .await
                    {
                        uniqueness::Outcome::Logged(_) | uniqueness::Outcome::Taken(_) => {}
                        uniqueness::Outcome::Pending(e) => {
                            tracing::warn!(%key_id, error = %e, "outbox publish not decided; will retry")
                        }
                    }
                }
                None => {
                    let subject = agent.subjects.key_deleted(&key_id);
                    match agent.publish_event(subject, env.id, restamped_bytes).await {
                        Ok(ack) => {
                            if ack.await.is_ok() {
                                agent.outbox_confirmed(key_id);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "outbox publish failed; will retry"),
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Sends `JoinRequested`: this agent's identity key, with the join token's
/// proof over it.
async fn request_join(agent: &Arc<Agent>, token: &str) -> anyhow::Result<()> {
    let token = keysync_security::join::JoinToken::parse(token)?;
    if token.hsm != agent.hsm {
        anyhow::bail!("the join token is for {}, not {}", token.hsm, agent.hsm);
    }
    let public_key = agent.identity.public_key();
    let env = Envelope::new(
        Source::Hsm(agent.hsm.clone()),
        Event::JoinRequested(keysync_schemas::JoinRequested {
            hsm: agent.hsm.clone(),
            public_key,
            token_key: token.public_key(),
            proof: token.proof(&public_key).to_vec(),
        }),
    );
    let ack = agent
        .publish_event(
            agent.subjects.join_requested(&agent.hsm),
            env.id,
            encode(&env)?,
        )
        .await?;
    tokio::time::timeout(agent.publish_timeout, ack)
        .await
        .map_err(|_| anyhow::anyhow!("join request not acknowledged in time"))??;
    tracing::info!(hsm = %agent.hsm, "join request sent");
    Ok(())
}

/// The cluster's public key: `--cluster-key`, else the one pinned in the
/// data dir, else (trust on first use) the one the orchestrator reports,
/// which is then pinned. Pinning with `--cluster-key` is the production way.
async fn cluster_key(config: &Config, nats: &async_nats::Client) -> anyhow::Result<[u8; 32]> {
    let pin = config.data_dir.join("cluster.pub");
    let pinned = match std::fs::read_to_string(&pin) {
        Ok(text) => Some(
            keysync_security::parse_public_key(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", pin.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(anyhow::anyhow!("{}: {e}", pin.display())),
    };
    if pinned.is_some() {
        // Pinned by an older version, readable by all: it is the data
        // dir's business only.
        keysync_security::secret_file::private_file(&pin)
            .with_context(|| format!("{}", pin.display()))?;
    }
    let key = match (config.cluster_key, pinned) {
        (Some(given), Some(p)) if given != p => {
            tracing::warn!(
                "--cluster-key differs from the pinned cluster key; pinning the given one"
            );
            given
        }
        (Some(given), _) => given,
        (None, Some(p)) => return Ok(p),
        (None, None) => {
            let key = membership::cluster_key_from_status(config, nats).await?;
            tracing::warn!(
                cluster_key = %hex::encode(key),
                "no --cluster-key: trusting the orchestrator's key on first use and pinning it"
            );
            key
        }
    };
    if pinned != Some(key) {
        keysync_security::secret_file::write_private(
            &pin,
            format!("{}\n", hex::encode(key)).as_bytes(),
        )
        .with_context(|| format!("pinning the cluster key in {}", pin.display()))?;
    }
    Ok(key)
}
