//! `orchestrator`: folds the event log into cluster state, fans out clone
//! and delete commands, tracks acknowledgements, declares keys replicated,
//! detects failed HSMs, and repairs divergence.
//!
//! The brain is pure ([`state`] and [`decide`]); [`run`] is the thin NATS
//! loop around it. State is a fold over the log: at start the orchestrator
//! replays the events stream from the beginning with no side effects. Then
//! it takes the lease ([`lease`]) or waits as a hot standby, still folding
//! every event; the one holding the lease [`decide::reconcile`]s once and
//! acts. It is crash-only: any failure to publish, or to renew the lease,
//! ends [`run`] with an error, and the restart's replay and reconcile finish
//! whatever was half done.

pub mod anti_entropy;
pub mod audit;
pub mod decide;
pub mod lease;
pub mod liveness;
pub mod metrics;
pub mod plan;
pub mod prometheus;
pub mod snapshot;
pub mod state;
pub mod streams;
#[cfg(test)]
mod testkit;

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, context::PublishError, publish::PublishAck};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use keysync_schemas::{
    decode, encode, Envelope, Event, Heartbeat, HsmId, KeyCreated, KeyId, OpReply, OpRequest,
    Source, StatusReply, StatusRequest, Subjects,
};
use keysync_security::{freshness::Monotonic, DeadLetters, Identity, Keep, Rejected, Signer};
use tracing::Instrument as _;

use crate::anti_entropy::{AntiEntropy, Inventory, Verdict};
use crate::decide::{decide, reconcile, subject_matches, Action};
use crate::lease::Lease;
use crate::liveness::Liveness;
use crate::plan::{MsgId, Step};
use crate::state::{ClusterState, EventMeta};

/// How the orchestrator is configured.
#[derive(Debug, Clone)]
pub struct Config {
    /// Subject layout of the cluster.
    pub subjects: Subjects,
    /// This instance's name (in the `source` of what it publishes, and in the lease).
    pub name: String,
    /// Stream replicas when creating streams (3 on a NATS cluster).
    pub replicas: usize,
    /// Most publishes awaiting their PubAck at once.
    pub max_in_flight: usize,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How often sync metrics are published.
    pub metrics_interval: Duration,
    /// An HSM silent this long is declared failed.
    pub failure_timeout: Duration,
    /// Lease time: a standby takes over this long after the active one stops renewing.
    pub lease_ttl: Duration,
    /// Heartbeats in a row whose inventory digest differs, unchanged,
    /// before anti-entropy repairs that HSM.
    pub repair_after: u32,
    /// Events folded between snapshots (0: never snapshot).
    pub snapshot_every: u64,
    /// The cluster identity: signs commands and the orchestrator's events,
    /// and verifies operators' enrollments.
    pub identity: Arc<Identity>,
}

/// Default most publishes in flight.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;

/// Inventory entries asked for per request during a repair.
const INVENTORY_PAGE: u32 = 2000;

/// Most events taken from the consumer at once.
const EVENT_BATCH: usize = 128;

/// Smallest batch whose signatures are checked in parallel beforehand.
const PREVERIFY_MIN: usize = 16;

type AckFuture = BoxFuture<'static, Result<PublishAck, PublishError>>;

struct Orchestrator {
    config: Config,
    nats: async_nats::Client,
    js: jetstream::Context,
    events: jetstream::stream::Stream,
    state: ClusterState,
    stats: metrics::SyncStats,
    in_flight: FuturesUnordered<AckFuture>,
    /// Holds the lease and acts.
    active: bool,
    /// The audit appender, while active.
    auditor: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// Who is heard from and who fell silent (knowledge of this process
    /// only: heartbeats are not in the log).
    liveness: Liveness,
    /// Heartbeats in a row showing one inventory difference, per member.
    anti_entropy: AntiEntropy,
    /// The cluster's public key.
    cluster_key: [u8; 32],
    /// Where rejected messages are filed.
    dead_letters: DeadLetters,
    /// The newest heartbeat accepted from each HSM.
    heartbeats_seen: Monotonic,
    /// What the fold accepted and rejected, for the auditor.
    verdicts: Arc<audit::Verdicts>,
    /// Events this process signed and has not folded back yet: message id
    /// → (digest of subject and payload, signature). One it gets back
    /// byte for byte needs no signature check.
    own: HashMap<String, ([u8; 32], String)>,
}

/// Most signed-by-me events remembered (cleared when full).
const OWN_MAX: usize = 100_000;

fn own_digest(subject: &str, payload: &[u8]) -> [u8; 32] {
    let mut bytes = Vec::with_capacity(subject.len() + 1 + payload.len());
    bytes.extend_from_slice(subject.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(payload);
    keysync_schemas::record_hash(&bytes)
}

/// Runs the orchestrator until `shutdown` resolves or a fatal error occurs.
pub async fn run(
    config: Config,
    nats: async_nats::Client,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let js = jetstream::new(nats.clone());
    let mut events = streams::ensure(&js, &config.subjects, config.replicas).await?;
    let lease = Lease::open(
        &js,
        &config.subjects.lease_bucket(),
        &config.name,
        config.lease_ttl,
        config.replicas,
    )
    .await?;
    let snapshots =
        snapshot::open(&js, &config.subjects.snapshot_bucket(), config.replicas).await?;
    let info = events.info().await?.clone();
    let replay_until = info.state.last_sequence;
    // A snapshot from beyond this stream's end belongs to an older stream.
    let state = snapshot::load(&snapshots, config.identity.public_key())
        .await
        .filter(|s| s.last_seq() <= replay_until)
        .unwrap_or_default();
    let mut caught_up =
        info.state.messages == 0 || (state.last_seq() > 0 && state.last_seq() >= replay_until);
    tracing::info!(
        stream = %config.subjects.events_stream(),
        messages = info.state.messages,
        last_seq = replay_until,
        snapshot_seq = state.last_seq(),
        "replaying the event log"
    );
    let deliver_policy = if state.last_seq() > 0 {
        jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: state.last_seq() + 1,
        }
    } else {
        jetstream::consumer::DeliverPolicy::All
    };
    let consumer = events
        .create_consumer(pull::OrderedConfig {
            filter_subject: config.subjects.events_all(),
            deliver_policy,
            ..Default::default()
        })
        .await?;
    // In batches of whatever is ready: a replay's signatures are checked
    // in parallel before the batch is folded in order.
    let mut messages = consumer.messages().await?.ready_chunks(EVENT_BATCH);
    let mut status_requests = nats
        .subscribe(config.subjects.orchestrator_status())
        .await?;
    let mut heartbeats = nats.subscribe(config.subjects.all_heartbeats()).await?;

    let dead_letters = DeadLetters::new(
        js.clone(),
        &config.subjects,
        "orchestrator",
        Source::Orchestrator(config.name.clone()),
    );
    let mut orch = Orchestrator {
        cluster_key: config.identity.public_key(),
        dead_letters,
        heartbeats_seen: Monotonic::default(),
        verdicts: Arc::new(audit::Verdicts::default()),
        own: HashMap::new(),
        nats: nats.clone(),
        js,
        events,
        state,
        stats: metrics::SyncStats::default(),
        in_flight: FuturesUnordered::new(),
        active: false,
        auditor: None,
        liveness: Liveness::new(config.failure_timeout),
        anti_entropy: AntiEntropy::new(config.repair_after),
        config,
    };
    orch.verdicts.start(orch.state.last_seq() + 1);
    let latest: prometheus::Latest = Default::default();
    let metrics_server = orch
        .config
        .metrics_addr
        .map(|addr| tokio::spawn(prometheus::serve(addr, latest.clone())));
    let mut metrics_tick = tokio::time::interval(orch.config.metrics_interval);
    metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lease_tick = tokio::time::interval(orch.config.lease_ttl / 3);
    lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failure_tick = tokio::time::interval(orch.config.failure_timeout / 4);
    failure_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut snapshot_tick = tokio::time::interval(Duration::from_secs(5));
    snapshot_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut snapshot_seq = orch.state.last_seq();
    // Events in the stream that this fold does not receive (as after the
    // NATS node serving the consumer died) end the run: the next one
    // starts a fresh consumer.
    let mut stall_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(3),
        Duration::from_secs(3),
    );
    stall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq_at_last_check = orch.state.last_seq();
    let mut saving: Option<tokio::task::JoinHandle<anyhow::Result<u64>>> = None;
    let started = Instant::now();
    let lease = std::sync::Arc::new(tokio::sync::Mutex::new(lease));
    let mut renewing: Option<lease::Keeper> = None;
    if caught_up {
        tracing::info!("event log empty");
    }
    tokio::pin!(shutdown);
    let result: anyhow::Result<()> = async {
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                batch = messages.next() => {
                    let batch = batch.ok_or_else(|| anyhow::anyhow!("event consumer ended"))?;
                    let mut msgs = Vec::with_capacity(batch.len());
                    for msg in batch {
                        msgs.push(msg.map_err(|e| anyhow::anyhow!("event consumer failed: {e}"))?);
                    }
                    // Only a replay's backlog is worth both cores: once
                    // caught up, the other processes need them.
                    let verified = if caught_up {
                        vec![None; msgs.len()]
                    } else {
                        orch.preverify(&msgs).await
                    };
                    for (msg, verified) in msgs.iter().zip(verified) {
                        let (seq, pending) = msg
                            .info()
                            .map(|i| (i.stream_sequence, i.pending))
                            .map_err(|e| anyhow::anyhow!("event without metadata: {e}"))?;
                        orch.handle(msg, caught_up, verified).await?;
                        if !caught_up && (seq >= replay_until || pending == 0) {
                            caught_up = true;
                            tracing::info!(
                                events = orch.state.last_seq(),
                                keys = orch.state.key_count(),
                                elapsed_ms = started.elapsed().as_millis() as u64,
                                "replay done"
                            );
                        }
                    }
                }
                Some(req) = status_requests.next() => orch.answer_status(req).await,
                Some(hb) = heartbeats.next() => {
                    if orch.active {
                        orch.on_heartbeat(hb).await?;
                    }
                }
                _ = metrics_tick.tick() => {
                    if orch.active {
                        orch.publish_metrics(&latest).await;
                    }
                }
                _ = lease_tick.tick() => {
                    if !orch.active && caught_up && lease.lock().await.try_acquire().await {
                        // Renewed on its own task: a loop busy with a large
                        // fan-out (a bootstrap) keeps the lease; a process
                        // that dies or loses NATS does not.
                        renewing = Some(lease::keep(lease.clone()));
                        orch.become_active(started).await?;
                    }
                }
                lost = async {
                    match renewing.as_mut() {
                        Some(k) => (&mut k.lost).await,
                        None => std::future::pending().await,
                    }
                } => {
                    renewing = None;
                    match lost {
                        Ok(e) => return Err(e),
                        Err(_) => anyhow::bail!("the lease keeper stopped"),
                    }
                }
                _ = failure_tick.tick() => {
                    if orch.active {
                        orch.detect_failures().await?;
                    }
                }
                _ = stall_tick.tick() => {
                    let folded = orch.state.last_seq();
                    if folded == seq_at_last_check {
                        let stream_last = orch.events.info().await.map(|i| i.state.last_sequence).unwrap_or(0);
                        if stream_last > folded {
                            anyhow::bail!("event consumer stalled at {folded} while the stream is at {stream_last}");
                        }
                    }
                    seq_at_last_check = folded;
                }
                _ = snapshot_tick.tick() => {
                    if let Some(done) = saving.take_if(|h| h.is_finished()) {
                        match done.await {
                            Ok(Ok(seq)) => tracing::info!(seq, "snapshot saved"),
                            Ok(Err(e)) => tracing::warn!(error = %e, "snapshot not saved"),
                            Err(e) => tracing::warn!(error = %e, "snapshot task failed"),
                        }
                    }
                    let due = orch.config.snapshot_every > 0
                        && orch.state.last_seq() >= snapshot_seq + orch.config.snapshot_every;
                    if orch.active && caught_up && saving.is_none() && due {
                        snapshot_seq = orch.state.last_seq();
                        let store = snapshots.clone();
                        let state = orch.state.clone();
                        let identity = orch.config.identity.clone();
                        saving = Some(tokio::spawn(async move { snapshot::save(&store, state, identity).await }));
                    }
                }
                Some(ack) = orch.in_flight.next(), if !orch.in_flight.is_empty() => {
                    ack.map_err(|e| anyhow::anyhow!("a publish was not acknowledged: {e}"))?;
                }
                done = async {
                    match orch.auditor.as_mut() {
                        Some(h) => h.await,
                        None => std::future::pending().await,
                    }
                } => {
                    orch.auditor = None;
                    match done {
                        Ok(Ok(())) => anyhow::bail!("the audit appender stopped"),
                        Ok(Err(e)) => anyhow::bail!("the audit appender failed: {e:#}"),
                        Err(e) => anyhow::bail!("the audit appender panicked: {e}"),
                    }
                }
            }
        }
    }
    .await;
    // Wait for what was already published, then let the client go.
    while let Some(ack) = orch.in_flight.next().await {
        if let Err(e) = ack {
            tracing::warn!(error = %e, "publish not acknowledged at shutdown");
        }
    }
    if let Some(a) = orch.auditor.take() {
        a.abort();
    }
    if let Some(k) = renewing.take() {
        k.task.abort();
    }
    if result.is_ok() && orch.active {
        lease.lock().await.release().await;
    }
    drop(messages);
    if let Some(server) = metrics_server {
        server.abort();
    }
    let _ = nats.flush().await;
    result
}

impl Orchestrator {
    async fn become_active(&mut self, started: Instant) -> anyhow::Result<()> {
        self.active = true;
        self.auditor = Some(tokio::spawn(audit::run(
            self.js.clone(),
            self.events.clone(),
            self.config.subjects.clone(),
            self.config.name.clone(),
            self.config.replicas,
            self.cluster_key,
            self.verdicts.clone(),
        )));
        self.liveness
            .start(Instant::now(), self.state.members().map(|m| &m.hsm));
        let actions = reconcile(&self.state);
        tracing::info!(
            name = %self.config.name,
            outstanding = actions.len(),
            since_start_ms = started.elapsed().as_millis() as u64,
            "holding the lease; active"
        );
        self.execute(actions, None).await
    }

    /// Checks the signatures of a batch of events in parallel, against the
    /// keys their signers have now (a batch below [`PREVERIFY_MIN`] is left
    /// to [`Orchestrator::handle`]). Returns, per event, the key its
    /// signature verified with.
    async fn preverify(&self, msgs: &[jetstream::Message]) -> Vec<Option<[u8; 32]>> {
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
                Signer::Hsm(h) => self.state.enrolled_key(h),
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
            out[i] = v;
        }
        out
    }

    fn events_prefix(&self) -> String {
        format!("{}.evt.", self.config.subjects.prefix())
    }

    /// The cluster key, if `msg` is an event this process signed and it
    /// came back with the same subject, payload and signature.
    fn signed_by_me(&mut self, msg: &jetstream::Message) -> Option<[u8; 32]> {
        let h = msg.headers.as_ref()?;
        if h.get(keysync_schemas::headers::SIGNER)?.as_str() != "cluster" {
            return None;
        }
        let id = h.get(keysync_schemas::headers::MSG_ID)?.as_str();
        let (digest, sig) = self.own.remove(id)?;
        // Drained after a burst: give the memory back.
        if self.own.is_empty() && self.own.capacity() > 4096 {
            self.own.shrink_to(1024);
        }
        let same = digest == own_digest(&msg.subject, &msg.payload)
            && h.get(keysync_schemas::headers::SIGNATURE)?.as_str() == sig;
        same.then_some(self.cluster_key)
    }

    async fn handle(
        &mut self,
        msg: &jetstream::Message,
        caught_up: bool,
        preverified: Option<[u8; 32]>,
    ) -> anyhow::Result<()> {
        let preverified = preverified.or_else(|| self.signed_by_me(msg));
        let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let meta = EventMeta {
            seq: info.stream_sequence,
            stored_at_ns: u64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0),
        };
        let subject = msg.subject.as_str();
        let state = &self.state;
        let checked = keysync_security::check_event_preverified(
            msg.headers.as_ref(),
            subject,
            &msg.payload,
            meta.stored_at_ns,
            &self.cluster_key,
            |h| state.enrolled_key(h),
            preverified,
        )
        .and_then(|env| {
            if subject_matches(self.config.subjects.parse_event(subject), &env.body) {
                Ok(env.body)
            } else {
                Err(keysync_security::Refusal {
                    reason: "subject_mismatch",
                    detail: format!("a {} on this subject", env.body.kind()),
                    signer: None,
                })
            }
        });
        let event = match checked {
            Ok(event) => event,
            Err(refusal) => {
                tracing::warn!(seq = meta.seq, subject, reason = refusal.reason, detail = %refusal.detail, "rejected event");
                self.state.reject_at(meta.seq, refusal.reason);
                self.rejected_event(msg, meta, caught_up, refusal).await;
                return Ok(());
            }
        };
        let change = match self.state.apply(meta, &event) {
            Ok(change) => change,
            Err(r) => {
                tracing::warn!(seq = meta.seq, subject, reason = r.reason(), error = %r, "rejected event");
                let refusal = keysync_security::Refusal {
                    reason: r.reason(),
                    detail: r.to_string(),
                    signer: None,
                };
                self.rejected_event(msg, meta, caught_up, refusal).await;
                return Ok(());
            }
        };
        self.verdicts.judged(meta.seq, false);
        // Acted on now: caught up with the log (not replaying history)
        // and holding the lease.
        let acting = caught_up && self.active;
        self.stats.observe(&change, acting);
        match &event {
            Event::HsmJoined(j) => self.liveness.joined(Instant::now(), &j.hsm),
            Event::HsmRecovered(r) => self.liveness.recovered(&r.hsm),
            Event::HsmFailed(f) => {
                tracing::warn!(hsm = %f.hsm, silent_ms = f.silent_ms, "HSM failed")
            }
            _ => {}
        }
        if acting {
            let actions = decide(&self.state, meta, &event, &change);
            let current = match &event {
                Event::KeyCreated(c) => Some((meta.seq, c)),
                _ => None,
            };
            // The event's trace continues through what it causes.
            let span = tracing::info_span!("keysync.event", kind = event.kind(), seq = meta.seq);
            keysync_telemetry::follow(&span, msg.headers.as_ref());
            let started = Instant::now();
            let n = actions.len();
            self.execute(actions, current).instrument(span).await?;
            if started.elapsed() > Duration::from_millis(200) {
                tracing::info!(
                    kind = event.kind(),
                    actions = n,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "slow event handling"
                );
            }
        }
        Ok(())
    }

    /// Tells the auditor an event was rejected and files it as a dead
    /// letter: once, when first seen caught up with the log (a replay
    /// after a restart does not file it again).
    async fn rejected_event(
        &self,
        msg: &jetstream::Message,
        meta: EventMeta,
        caught_up: bool,
        refusal: keysync_security::Refusal,
    ) {
        self.verdicts.judged(meta.seq, true);
        if caught_up {
            self.dead_letters
                .file(
                    Rejected {
                        subject: &msg.subject,
                        reason: refusal.reason,
                        detail: refusal.detail,
                        claimed_signer: refusal.signer,
                        stream_seq: Some(meta.seq),
                        payload: &msg.payload,
                        dedup_id: Some(plan::message_id(MsgId::DeadLetter { seq: meta.seq })),
                    },
                    Keep::Payload,
                )
                .await;
        }
    }

    /// Carries out actions as [`plan`] lays them out: the steps other than
    /// clones, in order, then the clones window by window, each window's
    /// `KeyCreated`s fetched (pipelined) just before its commands are
    /// planned. `current` is the `KeyCreated` being handled, if any, so its
    /// clones need not fetch it back from the stream.
    async fn execute(
        &mut self,
        actions: Vec<Action>,
        current: Option<(u64, &KeyCreated)>,
    ) -> anyhow::Result<()> {
        let work = plan::sort(actions);
        for action in &work.others {
            if let Some(step) = plan::step(&self.state, action) {
                self.carry_out(step).await?;
            }
        }
        let at_seq = self.state.last_seq();
        for window in &work.windows {
            let created = self.fetch_window(window, current).await;
            for step in plan::clone_commands(window, &created, at_seq) {
                self.carry_out(step).await?;
            }
        }
        Ok(())
    }

    /// The `KeyCreated`s a window of clones comes from, by sequence: read
    /// back from the stream, 64 at a time, except the one being handled.
    async fn fetch_window(
        &self,
        window: &plan::CloneWindow,
        current: Option<(u64, &KeyCreated)>,
    ) -> HashMap<u64, KeyCreated> {
        let mut found = HashMap::with_capacity(window.clones.len());
        let mut needed = Vec::with_capacity(window.clones.len());
        for (seq, key_id) in &window.clones {
            match current {
                Some((s, c)) if s == *seq => {
                    found.insert(s, c.clone());
                }
                _ => needed.push((*seq, *key_id)),
            }
        }
        let fetched: Vec<(u64, KeyCreated)> = futures::stream::iter(needed)
            .map(|(seq, key_id)| async move { (seq, self.fetch_created(seq, key_id).await) })
            .buffered(64)
            .filter_map(|(seq, c)| async move { c.map(|c| (seq, c)) })
            .collect()
            .await;
        found.extend(fetched);
        found
    }

    /// Carries out one planned step.
    async fn carry_out(&mut self, step: Step) -> anyhow::Result<()> {
        let source = Source::Orchestrator(self.config.name.clone());
        match step {
            Step::Command { msg_id, command } => {
                let subject = self.config.subjects.commands_for(command.target());
                let env = Envelope::new(source, command);
                self.publish(subject, msg_id, encode(&env)?).await
            }
            Step::Announce { msg_id, replicated } => {
                let subject = self.config.subjects.key_replicated(&replicated.key_id);
                let env = Envelope::new(source, Event::KeyReplicated(replicated));
                self.publish(subject, msg_id, encode(&env)?).await
            }
            Step::Purge { key_id } => {
                // Crypto-shredding: the key's wrapped material leaves the log.
                let subject = self.config.subjects.key_created(&key_id);
                let purged = self.events.purge().filter(subject).await?;
                tracing::info!(%key_id, purged = purged.purged, "purged a deleted key's material from the stream");
                Ok(())
            }
            Step::Withdraw { target } => {
                // A removed HSM gets none of what was queued for it.
                let stream = self
                    .js
                    .get_stream(self.config.subjects.commands_stream())
                    .await?;
                let purged = stream
                    .purge()
                    .filter(self.config.subjects.commands_for(&target))
                    .await?;
                let consumer = self.config.subjects.agent_consumer(&target);
                if let Err(e) = stream.delete_consumer(&consumer).await {
                    tracing::info!(%target, error = %e, "no command consumer to delete");
                }
                tracing::warn!(%target, withdrawn = purged.purged, "HSM removed: its queued commands are withdrawn");
                Ok(())
            }
        }
    }

    /// Reads a `KeyCreated` back from the stream by sequence.
    async fn fetch_created(&self, seq: u64, key_id: KeyId) -> Option<KeyCreated> {
        let msg = match self.events.direct_get(seq).await {
            Ok(m) => m,
            Err(e) => {
                // Purged (a deleted key) or lost: nothing to clone from.
                tracing::warn!(seq, %key_id, error = %e, "KeyCreated not readable; clone skipped");
                return None;
            }
        };
        match decode::<Event>(&msg.payload).map(|e| e.body) {
            Ok(Event::KeyCreated(c)) if c.key_id == key_id => Some(c),
            _ => {
                tracing::warn!(seq, %key_id, "message at that sequence is not the key's KeyCreated");
                None
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
        let mut h = keysync_security::signed_headers(
            &self.config.identity,
            &Signer::Cluster,
            &subject,
            &msg_id,
            &payload,
        );
        if subject.starts_with(&self.events_prefix()) {
            if self.own.len() >= OWN_MAX {
                self.own.clear();
            }
            if let Some(sig) = h.get(keysync_schemas::headers::SIGNATURE) {
                self.own.insert(
                    msg_id.clone(),
                    (own_digest(&subject, &payload), sig.as_str().to_string()),
                );
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

    async fn publish_event(&mut self, subject: String, event: Event) -> anyhow::Result<()> {
        let env = Envelope::new(Source::Orchestrator(self.config.name.clone()), event);
        let id = plan::message_id(MsgId::Fact {
            envelope_id: env.id,
        });
        self.publish(subject, id, encode(&env)?).await
    }

    /// A heartbeat: the member is alive (recovered if it was failed), and
    /// its inventory digest is checked against what the log says it holds.
    async fn on_heartbeat(&mut self, msg: async_nats::Message) -> anyhow::Result<()> {
        let state = &self.state;
        let checked = keysync_security::check_heartbeat(
            msg.headers.as_ref(),
            &msg.subject,
            &msg.payload,
            keysync_schemas::Timestamp::now().as_nanos(),
            |h| state.enrolled_key(h),
            &mut self.heartbeats_seen,
        )
        .and_then(|env| {
            if msg.subject.as_str() == self.config.subjects.heartbeat(&env.body.hsm) {
                Ok(env.body)
            } else {
                Err(keysync_security::Refusal {
                    reason: "subject_mismatch",
                    detail: "heartbeat on another HSM's subject".into(),
                    signer: None,
                })
            }
        });
        let hb: Heartbeat = match checked {
            Ok(hb) => hb,
            Err(refusal) => {
                tracing::warn!(subject = %msg.subject, reason = refusal.reason, detail = %refusal.detail, "rejected heartbeat");
                self.state.count_rejection(refusal.reason);
                self.dead_letters
                    .file(
                        Rejected {
                            subject: &msg.subject,
                            reason: refusal.reason,
                            detail: refusal.detail,
                            claimed_signer: refusal.signer,
                            stream_seq: None,
                            payload: &msg.payload,
                            dedup_id: None,
                        },
                        Keep::Payload,
                    )
                    .await;
                return Ok(());
            }
        };
        let Some(idx) = self.state.member_index(&hb.hsm) else {
            return Ok(()); // not joined yet
        };
        let is_live = self.state.member_at(idx).is_some_and(|m| m.live);
        if let Some(recovered) = self.liveness.heard(Instant::now(), &hb.hsm, is_live) {
            tracing::info!(hsm = %hb.hsm, "failed HSM heard from again");
            let subject = self.config.subjects.hsm_recovered(&hb.hsm);
            self.publish_event(subject, Event::HsmRecovered(recovered))
                .await?;
        }
        let reported = Inventory {
            keys: hb.token_keys,
            digest: hb.digest,
        };
        if self.anti_entropy.check(&self.state, idx, &hb.hsm, reported) == Verdict::Repair {
            self.repair_member(&hb.hsm).await?;
        }
        Ok(())
    }

    /// Anti-entropy's I/O: reads the member's inventory, page by page, and
    /// sends what [`anti_entropy::repairs`] computes from it. An agent that
    /// does not answer is left for a later heartbeat to try again.
    async fn repair_member(&mut self, hsm: &HsmId) -> anyhow::Result<()> {
        let mut inventory = Vec::new();
        let mut after = None;
        loop {
            let req = encode(&Envelope::new(
                Source::Orchestrator(self.config.name.clone()),
                OpRequest::Inventory {
                    after,
                    limit: INVENTORY_PAGE,
                },
            ))?;
            let reply = match tokio::time::timeout(
                Duration::from_secs(5),
                self.nats
                    .request(self.config.subjects.hsm_op(hsm), req.into()),
            )
            .await
            {
                Ok(Ok(r)) => r,
                _ => {
                    tracing::warn!(%hsm, "inventory request unanswered; repair postponed");
                    return Ok(());
                }
            };
            match decode::<OpReply>(&reply.payload).map(|e| e.body) {
                Ok(OpReply::Inventory(page)) => {
                    let last = page.last().map(|(k, _)| *k);
                    let done = page.len() < INVENTORY_PAGE as usize;
                    inventory.extend(page);
                    match last {
                        Some(k) if !done => after = Some(k),
                        _ => break,
                    }
                }
                _ => {
                    tracing::warn!(%hsm, "unexpected inventory reply; repair postponed");
                    return Ok(());
                }
            }
        }
        let actions = anti_entropy::repairs(&self.state, hsm, &inventory);
        tracing::info!(%hsm, held = inventory.len(), repairs = actions.len(), "anti-entropy repair");
        self.stats.repairs += actions.len() as u64;
        self.execute(actions, None).await
    }

    /// Announces failed every live member [`Liveness::tick`] finds silent.
    async fn detect_failures(&mut self) -> anyhow::Result<()> {
        let live = self.state.members().filter(|m| m.live).map(|m| &m.hsm);
        let failed = self.liveness.tick(Instant::now(), live);
        for f in failed {
            let subject = self.config.subjects.hsm_failed(&f.hsm);
            self.publish_event(subject, Event::HsmFailed(f)).await?;
        }
        Ok(())
    }

    /// Publishes the metrics of the window that just ended, as JSON on
    /// core NATS, and keeps them for the Prometheus endpoint.
    async fn publish_metrics(&mut self, latest: &prometheus::Latest) {
        let at_unix_ms = keysync_schemas::Timestamp::now().as_nanos() / 1_000_000;
        let doc = self.stats.roll(&self.state, &self.config.name, at_unix_ms);
        match serde_json::to_vec(&doc) {
            Ok(json) => {
                if let Err(e) = self
                    .nats
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

    async fn answer_status(&self, req: async_nats::Message) {
        let Some(reply) = req.reply.clone() else {
            return;
        };
        if let Err(e) = decode::<StatusRequest>(&req.payload) {
            tracing::warn!(reason = e.reason(), "rejected status request");
            return;
        }
        let mut status = self.state.status();
        status.cluster_key = self.cluster_key;
        let env = Envelope::new(
            Source::Orchestrator(self.config.name.clone()),
            StatusReply::Cluster(status),
        );
        match encode(&env) {
            Ok(bytes) => {
                if let Err(e) = self.nats.publish(reply, bytes.into()).await {
                    tracing::warn!(error = %e, "could not answer a status request");
                }
            }
            Err(e) => tracing::error!(error = %e, "could not encode status"),
        }
    }
}
