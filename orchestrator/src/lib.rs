//! `orchestrator`: folds the event log into cluster state, fans out clone
//! and delete commands, tracks acknowledgements, declares keys replicated,
//! detects failed HSMs, and repairs divergence.
//!
//! State is a fold over the log: at start the orchestrator replays the
//! events stream (from its last snapshot) with no side effects. Then it
//! takes the lease ([`lease`]) or waits as a hot standby, still folding
//! every event; the one holding the lease [`decide::reconcile`]s once and
//! acts. It is crash-only: any failure to publish, or to renew the lease,
//! ends [`run`] with an error, and the restart's replay and reconcile finish
//! whatever was half done.
//!
//! Every rule that decides something is pure, takes the time and its
//! inputs as arguments, and is tested without NATS, processes or real
//! seconds (see `docs/decisions/0008-orchestrator-policy-core.md`):
//!
//! - [`state`]: the fold itself, [`ClusterState::apply`](state::ClusterState::apply);
//! - [`decide`](mod@decide): what an event calls for, and what is outstanding after a replay;
//! - [`liveness`]: failure timeout and recovery debounce, over heartbeats;
//! - [`anti_entropy`]: when a member's drift calls for a repair, and which;
//! - [`plan`]: which messages carry out the actions, under which ids;
//! - [`backlog`]: a large fan-out, a window per turn of the loop;
//! - [`progress`]: when the fold has caught up, a snapshot is due, the feed stalled.
//!
//! [`run`] is the thin loop around them: intake ([`intake`],
//! [`heartbeats`]) → verify → fold → decide → execute ([`executor`],
//! [`publisher`]), plus the lease, snapshots ([`snapshot`]), the audit chain
//! ([`audit`]), the lifecycle mirror for other languages ([`lifecycle`])
//! and read-only answers ([`status`], [`metrics`],
//! [`prometheus`]).

pub mod anti_entropy;
pub mod audit;
pub mod backlog;
pub mod checkpoint;
pub mod decide;
pub mod duplicates;
pub mod executor;
pub mod feed;
pub mod heartbeats;
pub mod intake;
pub mod inventory;
pub mod lease;
pub mod lifecycle;
pub mod liveness;
pub mod metrics;
pub mod plan;
pub mod progress;
pub mod prometheus;
pub mod publisher;
pub mod removal;
pub mod snapshot;
pub mod state;
pub mod status;
pub mod streams;
#[cfg(test)]
mod testkit;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use futures::{FutureExt as _, StreamExt};
use keysync_schemas::{Event, HsmId, KeyCreated, Rejection, Subjects};
use keysync_security::{DeadLetters, Filing, Identity, Keep};
use tracing::Instrument as _;

use crate::anti_entropy::{AntiEntropy, Inventory, Verdict};
use crate::decide::{decide, reconcile, Action};
use crate::executor::Executor;
use crate::heartbeats::Heartbeats;
use crate::intake::Intake;
use crate::lease::Lease;
use crate::liveness::Liveness;
use crate::progress::Progress;
use crate::publisher::Publisher;
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
    /// When the active orchestrator appends a signed checkpoint
    /// (`every` 0: never).
    pub checkpoints: checkpoint::Rule,
    /// The cluster identity: signs commands and the orchestrator's events,
    /// and verifies operators' enrollments.
    pub identity: Arc<Identity>,
    /// Whether the active orchestrator mirrors lifecycle facts into the
    /// CloudEvents stream ([`lifecycle`]); off only to measure its cost.
    pub lifecycle: bool,
}

/// Default most publishes in flight.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;

/// Event handling slower than this is logged.
const SLOW_EVENT: Duration = Duration::from_millis(200);

/// The loop's parts. Whatever decides is in a pure part (`state`,
/// `liveness`, `anti_entropy`, `progress`); the others only move messages.
struct Orchestrator {
    config: Config,
    nats: async_nats::Client,
    js: jetstream::Context,
    events: jetstream::stream::Stream,
    /// The fold.
    state: ClusterState,
    /// How far the fold is through the log.
    progress: Progress,
    stats: metrics::SyncStats,
    /// The live Prometheus metrics.
    prom: prometheus::Metrics,
    /// Event feed: verification, refusals.
    intake: Intake,
    /// Heartbeat feed: verification, refusals.
    heartbeats: Heartbeats,
    /// Carries out actions; owns the publisher.
    executor: Executor,
    /// Holds the lease and acts.
    active: bool,
    /// The audit appender, while active.
    auditor: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The lifecycle mirror, while active (and turned on).
    mirror: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The snapshot store (the lifecycle mirror starts its fold from it).
    snapshots: jetstream::object_store::ObjectStore,
    /// Who is heard from and who fell silent (knowledge of this process
    /// only: heartbeats are not in the log).
    liveness: Liveness,
    /// Heartbeats in a row showing one inventory difference, per member.
    anti_entropy: AntiEntropy,
    /// Events in the log after the last one folded (its consumer's
    /// `pending`): how far the fold trails the log, for anti-entropy.
    unfolded: u64,
    /// The cluster's public key.
    cluster_key: [u8; 32],
    /// What the fold accepted and rejected, for the auditor.
    verdicts: Arc<audit::Verdicts>,
    /// Where refused requests are filed.
    dead_letters: DeadLetters,
    /// Foreign messages the auditor and the lease skipped, to be counted
    /// by the loop (it owns the counters).
    side_rejections: audit::Report,
    /// Events folded vouched for by checkpoints read ahead (the feed
    /// holds their runs and checks their chains).
    vouched: u64,
    /// Places checkpoints in the log (and refuses mismatched ones).
    judge: checkpoint::Judge,
    /// The run this process chains, checkpointed while it is active.
    chain: checkpoint::Chain,
    /// When a checkpoint is due.
    checkpoint_rule: checkpoint::Rule,
    /// When the last event was folded (the rule's idle time).
    last_event_at: Instant,
    /// Clones decided in this feed batch, not sent yet (decision 21).
    deferred: Deferred,
}

/// Clones the events of one feed batch decided, sent together when the
/// batch is folded ([`Orchestrator::flush_clones`]): several keys for one
/// member become one `CloneBatch` (one message, one signature) instead of
/// one `CloneKey` each. A batch of one event (one key at a time) is sent
/// at the end of that event, as before: no timer, no wait. Sent earlier
/// when an event of the batch decides a delete, purge or withdrawal, so
/// nothing is reordered against them.
#[derive(Default)]
struct Deferred {
    clones: Vec<Action>,
    /// The `KeyCreated`s of the batch the clones come from, by sequence
    /// (not read back from the stream).
    created: HashMap<u64, KeyCreated>,
    /// The span of the last event that added clones: the commands carry
    /// its trace.
    span: Option<tracing::Span>,
}

/// Runs the orchestrator until `shutdown` resolves or a fatal error occurs.
///
/// Any error ends the run rather than being retried in place (crash-only):
/// the caller starts it again, and the new run's replay and reconcile
/// finish whatever this one left, under the same message ids.
pub async fn run(
    config: Config,
    nats: async_nats::Client,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let js = jetstream::new(nats.clone());
    let mut events = streams::ensure(&js, &config.subjects, config.replicas).await?;
    // Foreign messages the auditor and the lease skip, counted by the loop.
    let (side_rejections, mut skipped) = tokio::sync::mpsc::unbounded_channel();
    let lease = Lease::open(
        &js,
        &config.subjects.lease_bucket(),
        &config.name,
        config.lease_ttl,
        config.replicas,
        config.identity.clone(),
        side_rejections.clone(),
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
    let mut progress = Progress::new(
        info.state.messages,
        replay_until,
        state.last_seq(),
        config.snapshot_every,
    );
    // Everything after the snapshot removed (refused events): no event
    // will come to say the replay is over.
    if !progress.caught_up()
        && matches!(
            next_stored_after(&events, &config.subjects, state.last_seq()).await,
            Ok(None)
        )
    {
        progress.reached_end();
    }
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
    // Checkpoints stored before the replay's end: runs it checks with one
    // signature each (decision 22).
    let vouchers = read_vouchers(
        &events,
        &config.subjects,
        &config.identity.public_key(),
        state.last_seq(),
        replay_until,
    )
    .await;
    let replay = checkpoint::Replay::new(vouchers);
    // This process chains what comes after the last run vouched for (or
    // after its snapshot), so that once active it checkpoints the rest.
    let chain = checkpoint::Chain::new(replay.last_through().unwrap_or(0).max(state.last_seq()));
    // In batches of whatever is ready, read ahead, placed and held for
    // their checkpoints on their own task (module `feed`): a replay's
    // signatures are checked in parallel before the batch is folded in
    // order.
    let mut feed = feed::read_ahead(consumer.messages().await?, replay);
    let mut status_requests = nats
        .subscribe(config.subjects.orchestrator_status())
        .await?;
    let mut heartbeat_feed = nats.subscribe(config.subjects.all_heartbeats()).await?;

    let dead_letters = DeadLetters::new(
        js.clone(),
        &config.subjects,
        "orchestrator",
        keysync_schemas::Source::Orchestrator(config.name.clone()),
        config.identity.clone(),
        keysync_security::Signer::Cluster,
    );
    let cluster_key = config.identity.public_key();
    let verdicts = Arc::new(audit::Verdicts::default());
    let prom = prometheus::Metrics::new();
    let publisher = Publisher::new(
        js.clone(),
        config.identity.clone(),
        &config.subjects,
        &config.name,
        config.max_in_flight,
    );
    let mut orch = Orchestrator {
        vouched: 0,
        judge: checkpoint::Judge::default(),
        chain,
        checkpoint_rule: config.checkpoints,
        last_event_at: Instant::now(),
        intake: Intake::new(
            config.subjects.clone(),
            cluster_key,
            dead_letters.clone(),
            verdicts.clone(),
            publisher.ids().clone(),
            js.clone(),
            events.clone(),
        ),
        heartbeats: Heartbeats::new(config.subjects.clone(), dead_letters.clone()),
        dead_letters,
        side_rejections,
        executor: Executor::new(
            publisher,
            js.clone(),
            events.clone(),
            config.subjects.clone(),
            prom.clone(),
        ),
        cluster_key,
        verdicts,
        nats: nats.clone(),
        js,
        events,
        state,
        progress,
        stats: metrics::SyncStats::default(),
        prom,
        active: false,
        auditor: None,
        mirror: None,
        snapshots: snapshots.clone(),
        liveness: Liveness::new(config.failure_timeout),
        anti_entropy: AntiEntropy::new(config.repair_after),
        unfolded: 0,
        deferred: Deferred::default(),
        config,
    };
    orch.verdicts.start(orch.state.last_seq() + 1);
    // Ready: connected, and the fold caught up with the log (a standby
    // is ready too: it answers status and takes over at once).
    let caught_up = Arc::new(std::sync::atomic::AtomicBool::new(
        orch.progress.caught_up(),
    ));
    let metrics_server = orch.config.metrics_addr.map(|addr| {
        let nats = nats.clone();
        let caught_up = caught_up.clone();
        let ready: keysync_telemetry::serve::Readiness = Arc::new(move || {
            let mut waiting = Vec::new();
            if nats.connection_state() != async_nats::connection::State::Connected {
                waiting.push("nats: not connected");
            }
            if !caught_up.load(std::sync::atomic::Ordering::Relaxed) {
                waiting.push("replay: the fold has not caught up with the event log");
            }
            waiting
        });
        let registry = orch.prom.registry();
        tokio::spawn(async move {
            if let Err(e) = keysync_telemetry::serve::serve(addr, registry, ready).await {
                tracing::error!(error = %e, "the metrics endpoint stopped");
            }
        })
    });
    orch.prom.levels(&orch.state);
    let mut metrics_tick = tokio::time::interval(orch.config.metrics_interval);
    metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lease_tick = tokio::time::interval(orch.config.lease_ttl / 3);
    lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failure_tick = tokio::time::interval(orch.config.failure_timeout / 4);
    failure_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut snapshot_tick = tokio::time::interval(Duration::from_secs(5));
    snapshot_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Events in the stream that this fold does not receive (as after the
    // NATS node serving the consumer died) end the run: the next one
    // starts a fresh consumer.
    let mut stall_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(3),
        Duration::from_secs(3),
    );
    stall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut saving: Option<tokio::task::JoinHandle<anyhow::Result<u64>>> = None;
    let started = Instant::now();
    let lease = std::sync::Arc::new(tokio::sync::Mutex::new(lease));
    let mut renewing: Option<lease::Keeper> = None;
    if orch.progress.caught_up() {
        tracing::info!("event log empty");
    }
    tokio::pin!(shutdown);
    let result: anyhow::Result<()> = async {
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                ready = feed.recv() => {
                    let received = keysync_schemas::Timestamp::now().as_nanos();
                    let ready = ready.ok_or_else(|| anyhow::anyhow!("event consumer ended"))??;
                    orch.executor.publisher.handling(Some(received));
                    let folded = orch.on_events(ready, started).await;
                    orch.executor.publisher.handling(None);
                    folded?;
                    orch.checkpoint_if_due().await?;
                }
                // A subscription that ends (its connection closed for good)
                // ends the run, so the restart subscribes again; it is
                // never left silently disabled.
                req = status_requests.next() => {
                    let req = req.ok_or_else(|| anyhow::anyhow!("the status subscription closed"))?;
                    let source = orch.executor.publisher.source();
                    if let Err(rejection) = status::answer(&orch.nats, &orch.state, orch.cluster_key, source, &req).await {
                        orch.refused_request(&req, rejection).await;
                    }
                }
                Some(reason) = skipped.recv() => orch.count_rejection(reason),
                hb = heartbeat_feed.next() => {
                    let hb = hb.ok_or_else(|| anyhow::anyhow!("the heartbeat subscription closed"))?;
                    if orch.active {
                        orch.on_heartbeat(hb).await?;
                    }
                }
                _ = metrics_tick.tick() => {
                    orch.checkpoint_if_due().await?;
                    if orch.active {
                        status::publish_metrics(
                            &orch.nats,
                            &orch.config.subjects,
                            &mut orch.stats,
                            &orch.state,
                            &orch.config.name,
                        )
                        .await;
                    }
                }
                _ = lease_tick.tick() => {
                    if !orch.active && orch.progress.caught_up() && lease.lock().await.try_acquire().await {
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
                        // Heartbeats already received are heard before
                        // anyone is judged silent: a loop busy with a large
                        // fan-out must not take its own lag for their
                        // silence (decision 23).
                        while let Some(Some(hb)) = heartbeat_feed.next().now_or_never() {
                            orch.on_heartbeat(hb).await?;
                        }
                        orch.detect_failures().await?;
                    }
                }
                _ = stall_tick.tick() => {
                    // A run held whole for its checkpoint is progress too.
                    let folded = orch.state.last_seq().max(feed.last_held().unwrap_or(0));
                    if orch.progress.idle_since_last_check(folded) {
                        let stream_last = orch.events.info().await.map(|i| i.state.last_sequence).unwrap_or(0);
                        if stream_last > folded {
                            match next_stored_after(&orch.events, &orch.config.subjects, folded).await {
                                Ok(next) if progress::stalled(folded, next) => anyhow::bail!(
                                    "event consumer stalled at {folded} while the stream holds {next:?} (last {stream_last})"
                                ),
                                Ok(_) => {
                                    if orch.progress.reached_end() {
                                        tracing::info!(events = folded, "replay done (the log's last events were removed)");
                                    }
                                }
                                // Asked again at the next check.
                                Err(e) => tracing::info!(error = %e, "could not read past the fold"),
                            }
                        }
                    }
                }
                _ = snapshot_tick.tick() => {
                    if let Some(done) = saving.take_if(|h| h.is_finished()) {
                        match done.await {
                            Ok(Ok(seq)) => tracing::info!(seq, "snapshot saved"),
                            Ok(Err(e)) => tracing::warn!(error = %e, "snapshot not saved"),
                            Err(e) => tracing::warn!(error = %e, "snapshot task failed"),
                        }
                    }
                    let folded = orch.state.last_seq();
                    if orch.active && saving.is_none() && orch.progress.snapshot_due(folded) {
                        orch.progress.snapshot_started(folded);
                        let store = snapshots.clone();
                        let state = orch.state.clone();
                        let identity = orch.config.identity.clone();
                        saving = Some(tokio::spawn(async move { snapshot::save(&store, state, identity).await }));
                    }
                }
                // A large fan-out, one window a turn: the branches above
                // are served between windows (module `backlog`).
                _ = std::future::ready(()), if orch.active && orch.executor.has_backlog() => {
                    orch.executor.next_window(&orch.state).await?;
                }
                acked = orch.executor.publisher.next_ack(), if !orch.executor.publisher.is_idle() => {
                    orch.executor.publisher.settle(acked).await?;
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
                done = async {
                    match orch.mirror.as_mut() {
                        Some(h) => h.await,
                        None => std::future::pending().await,
                    }
                } => {
                    orch.mirror = None;
                    match done {
                        Ok(Ok(())) => anyhow::bail!("the lifecycle mirror stopped"),
                        Ok(Err(e)) => anyhow::bail!("the lifecycle mirror failed: {e:#}"),
                        Err(e) => anyhow::bail!("the lifecycle mirror panicked: {e}"),
                    }
                }
            }
            // Junk found under one of our ids by any publish above: counted
            // and filed here, in one place.
            orch.report_foreign().await;
            // For /readyz (the replay also ends when its last events were
            // found removed, with no event folded).
            caught_up.store(orch.progress.caught_up(), std::sync::atomic::Ordering::Relaxed);
        }
    }
    .await;
    // Wait for what was already published, then let the client go.
    orch.executor.publisher.drain().await;
    if let Some(a) = orch.auditor.take() {
        a.abort();
    }
    if let Some(m) = orch.mirror.take() {
        m.abort();
    }
    if let Some(k) = renewing.take() {
        k.task.abort();
    }
    if result.is_ok() && orch.active {
        lease.lock().await.release().await;
    }
    feed.stop();
    drop(feed);
    if let Some(server) = metrics_server {
        server.abort();
    }
    let _ = nats.flush().await;
    result
}

/// The sequence of the first event stored after `seq`, if any.
async fn next_stored_after(
    events: &jetstream::stream::Stream,
    subjects: &Subjects,
    seq: u64,
) -> Result<Option<u64>, jetstream::stream::DirectGetError> {
    match events
        .direct_get_next_for_subject(subjects.events_all(), Some(seq + 1))
        .await
    {
        Ok(m) => Ok(Some(m.sequence)),
        Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The checkpoints stored in `(from, until]`, each checked as the fold
/// checks any event (signed by the cluster, fresh, on its subject) and
/// placed by a [`checkpoint::Judge`]; those whose runs start at or after
/// `from` (what a replay from `from` reads whole). A checkpoint that
/// cannot be read is left out: its run is checked one by one, and the
/// fold judges the checkpoint itself when it reaches it.
async fn read_vouchers(
    events: &jetstream::stream::Stream,
    subjects: &Subjects,
    cluster_key: &[u8; 32],
    from: u64,
    until: u64,
) -> Vec<checkpoint::Voucher> {
    let subject = subjects.checkpoint();
    let mut judge = checkpoint::Judge::default();
    let mut out = Vec::new();
    let mut seq = from;
    loop {
        let msg = match events
            .direct_get_next_for_subject(&subject, Some(seq + 1))
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => break,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the checkpoints ahead; replaying without the rest");
                break;
            }
        };
        seq = msg.sequence;
        if seq > until {
            break;
        }
        let stored_at_ns = u64::try_from(msg.time.unix_timestamp_nanos()).unwrap_or(0);
        let checked = keysync_security::check_event(
            Some(&msg.headers),
            &msg.subject,
            &msg.payload,
            stored_at_ns,
            cluster_key,
            |_| None,
        );
        let cp = match checked {
            Ok(env)
                if subjects.parse_event(&msg.subject)
                    == Some(keysync_schemas::subjects::KeySubject::Checkpoint) =>
            {
                match env.body {
                    Event::Checkpoint(cp) => cp,
                    _ => continue,
                }
            }
            Ok(_) => continue,
            Err(r) => {
                tracing::debug!(seq, reason = %r.reason, "a checkpoint not used");
                continue;
            }
        };
        if judge.judge(seq, &cp).is_ok() && cp.after_seq >= from {
            out.push(checkpoint::Voucher { at: seq, cp });
        }
    }
    tracing::info!(
        checkpoints = out.len(),
        "checkpoints read ahead of the replay"
    );
    out
}

impl Orchestrator {
    /// Took the lease: start the auditor, start measuring silence, and
    /// finish whatever the log says is outstanding.
    async fn become_active(&mut self, started: Instant) -> anyhow::Result<()> {
        self.active = true;
        self.prom.set_active(true);
        self.auditor = Some(tokio::spawn(audit::run(
            self.js.clone(),
            self.events.clone(),
            self.config.subjects.clone(),
            self.config.name.clone(),
            self.config.replicas,
            self.cluster_key,
            self.verdicts.clone(),
            self.side_rejections.clone(),
        )));
        if self.config.lifecycle {
            self.mirror = Some(tokio::spawn(lifecycle::run(
                self.js.clone(),
                self.events.clone(),
                self.config.subjects.clone(),
                self.config.replicas,
                self.config.identity.clone(),
                self.snapshots.clone(),
                self.verdicts.clone(),
            )));
        }
        if self.chain.weight() > self.checkpoint_rule.every {
            // Chained through a long replay with no checkpoint: that run
            // stays checked one by one; checkpoints start here.
            self.chain = checkpoint::Chain::new(self.state.last_seq());
        }
        self.liveness
            .start(Instant::now(), self.state.members().map(|m| &m.hsm));
        let actions = reconcile(&self.state);
        tracing::info!(
            name = %self.config.name,
            outstanding = actions.len(),
            since_start_ms = started.elapsed().as_millis() as u64,
            "holding the lease; active"
        );
        self.executor
            .execute(&self.state, actions, &HashMap::new())
            .await?;
        self.intake.remove_pending().await;
        Ok(())
    }

    /// Counts a message rejected outside the fold (a heartbeat, a request,
    /// a foreign record): in the fold's totals and in Prometheus.
    fn count_rejection(&mut self, reason: keysync_schemas::RejectReason) {
        self.state.count_rejection(reason);
        self.prom.rejected(reason);
    }

    /// A request refused before it was answered (a reply subject that is
    /// not an inbox): logged, counted, filed; never answered.
    async fn refused_request(&mut self, req: &async_nats::Message, rejection: Rejection) {
        tracing::warn!(subject = %req.subject, reason = %rejection.reason, detail = %rejection.detail, "refused a request");
        self.count_rejection(rejection.reason);
        self.dead_letters
            .file(
                Filing {
                    subject: &req.subject,
                    rejection,
                    stream_seq: None,
                    payload: &req.payload,
                    dedup_id: None,
                },
                Keep::Payload,
            )
            .await;
    }

    /// A batch from the event feed, folded in order.
    async fn on_events(&mut self, ready: feed::Ready, started: Instant) -> anyhow::Result<()> {
        let result = self.fold_batch(ready, started).await;
        self.prom.levels(&self.state);
        result
    }

    async fn fold_batch(&mut self, ready: feed::Ready, started: Instant) -> anyhow::Result<()> {
        // Runs a checkpoint covers were held by the feed until whole, and
        // come with their signatures vouched for (or to be checked, if the
        // chain differs: their checkpoints are marked mismatched first).
        let feed::Ready {
            events: ready,
            mismatched,
        } = ready;
        for at in mismatched {
            self.judge.mismatched(at);
        }
        // Only a replay's backlog is worth both cores: once caught up, the
        // other processes need them.
        let to_check: Vec<&jetstream::Message> = ready
            .iter()
            .filter(|(_, t)| *t == checkpoint::Tag::Check)
            .map(|((m, _, _), _)| m)
            .collect();
        let mut verified = if self.progress.caught_up() {
            Vec::new()
        } else {
            self.intake.preverify(&self.state, &to_check).await
        }
        .into_iter();
        drop(to_check);
        for ((msg, meta, pending), tag) in ready {
            self.unfolded = pending;
            let verified = match tag {
                checkpoint::Tag::Vouched => {
                    self.vouched += 1;
                    keysync_security::Verified::Vouched
                }
                checkpoint::Tag::Check => verified.next().flatten().map_or(
                    keysync_security::Verified::No,
                    keysync_security::Verified::With,
                ),
            };
            if let Err(e) = self.on_event(&msg, meta, verified).await {
                self.deferred = Deferred::default();
                return Err(e);
            }
            if self.progress.folded(meta.seq, pending) {
                tracing::info!(
                    events = self.state.last_seq(),
                    keys = self.state.key_count(),
                    vouched_by_checkpoints = self.vouched,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "replay done"
                );
            }
        }
        self.flush_clones().await
    }

    /// Sends the clones deferred in this feed batch ([`Deferred`]): planned
    /// per member into `CloneBatch`es by [`plan`], in the trace of the
    /// last event that added some.
    async fn flush_clones(&mut self) -> anyhow::Result<()> {
        let Deferred {
            clones,
            created,
            span,
        } = std::mem::take(&mut self.deferred);
        if clones.is_empty() {
            return Ok(());
        }
        let span = span.unwrap_or_else(tracing::Span::none);
        let result = self
            .executor
            .execute(&self.state, clones, &created)
            .instrument(span.clone())
            .await;
        if let Err(e) = &result {
            keysync_telemetry::fail(&span, "execute", &format!("{e:#}"));
        }
        result
    }

    /// Appends a checkpoint for the run chained so far, if this process
    /// acts and the rule says it is due.
    async fn checkpoint_if_due(&mut self) -> anyhow::Result<()> {
        if !(self.active && self.progress.caught_up()) || self.checkpoint_rule.every == 0 {
            return Ok(());
        }
        if !self
            .checkpoint_rule
            .due(Instant::now(), &self.chain, self.last_event_at)
        {
            return Ok(());
        }
        let Some(cp) = self.chain.seal() else {
            return Ok(());
        };
        let through = cp.through_seq;
        tracing::debug!(
            after = cp.after_seq,
            through,
            accepted = cp.accepted,
            rejected = cp.rejected.len(),
            "checkpoint"
        );
        self.executor
            .publisher
            .announce(self.config.subjects.checkpoint(), Event::Checkpoint(cp))
            .await?;
        self.chain = checkpoint::Chain::new(through);
        Ok(())
    }

    /// One event: verify → fold → decide → execute.
    async fn on_event(
        &mut self,
        msg: &jetstream::Message,
        meta: EventMeta,
        verified: keysync_security::Verified,
    ) -> anyhow::Result<()> {
        let caught_up = self.progress.caught_up();
        self.last_event_at = Instant::now();
        self.prom.verified(verified);
        let subject = msg.subject.as_str();
        let own = self.executor.publisher.own_events();
        let checked = self
            .intake
            .check(&self.state, own, msg, meta, verified)
            .and_then(|event| match &event {
                Event::Checkpoint(cp) => self.judge.judge(meta.seq, cp).map(|()| event),
                _ => Ok(event),
            });
        let event = match checked {
            Ok(event) => event,
            Err(rejection) => {
                self.chain.rejected(meta.seq, rejection.reason);
                tracing::warn!(seq = meta.seq, subject, reason = %rejection.reason, detail = %rejection.detail, "rejected event");
                self.state.reject_at(meta.seq, rejection.reason);
                self.prom.rejected(rejection.reason);
                self.intake
                    .refused(&self.state, msg, meta, (caught_up, self.active), rejection)
                    .await;
                return Ok(());
            }
        };
        let rejoined = self.state.is_rejoin(&event);
        let change = match self.state.apply(meta, &event) {
            Ok(change) => change,
            Err(rejection) => {
                self.chain.rejected(meta.seq, rejection.reason);
                tracing::warn!(seq = meta.seq, subject, reason = %rejection.reason, detail = %rejection.detail, "rejected event");
                // The fold counted it in its own totals.
                self.prom.rejected(rejection.reason);
                self.intake
                    .refused(&self.state, msg, meta, (caught_up, self.active), rejection)
                    .await;
                return Ok(());
            }
        };
        self.intake.accepted(meta.seq, rejoined);
        if let Event::Checkpoint(cp) = &event {
            // Another orchestrator's checkpoint past this process's chain
            // (this one is a standby): its own run starts after it.
            if cp.through_seq > self.chain.after() {
                self.chain = checkpoint::Chain::new(meta.seq);
            }
        }
        self.chain.accepted(
            &checkpoint::Stored {
                seq: meta.seq,
                subject,
                headers: msg.headers.as_ref(),
                payload: &msg.payload,
            },
            matches!(event, Event::Checkpoint(_)),
        );
        // Acted on now: caught up with the log (not replaying history)
        // and holding the lease.
        let acting = caught_up && self.active;
        self.stats.observe(&change, acting);
        self.prom.folded(&self.state, &event, &change);
        match &event {
            Event::HsmJoined(j) => self.liveness.joined(Instant::now(), &j.hsm),
            Event::HsmRecovered(r) => self.liveness.recovered(&r.hsm),
            Event::HsmFailed(f) => {
                tracing::warn!(hsm = %f.hsm, silent_ms = f.silent_ms, "HSM failed")
            }
            _ => {}
        }
        if !acting {
            return Ok(());
        }
        let actions = decide(&self.state, meta, &event, &change);
        // Anything that must not overtake a clone decided earlier in this
        // batch (a delete, a purge, a withdrawal) sends those clones first.
        if actions.iter().any(|a| {
            matches!(
                a,
                Action::SendDelete { .. } | Action::Purge { .. } | Action::Withdraw { .. }
            )
        }) {
            self.flush_clones().await?;
        }
        let (clones, actions): (Vec<Action>, Vec<Action>) = actions
            .into_iter()
            .partition(|a| matches!(a, Action::SendClone { .. }));
        // The event's trace continues through what it causes.
        // A CONSUMER span: the event consumed, child of its publish.
        let span = tracing::info_span!(
            "keysync.event",
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.destination.name = %msg.subject,
            messaging.operation.type = "process",
            messaging.message.id = tracing::field::Empty,
            messaging.nats.stream_sequence = meta.seq,
            keysync.key_id = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
            kind = event.kind(),
        );
        keysync_telemetry::follow(&span, msg.headers.as_ref());
        if let Some(id) = keysync_telemetry::message_id(msg.headers.as_ref()) {
            span.record("messaging.message.id", id);
        }
        if let Some(key_id) = event.key_id() {
            span.record("keysync.key_id", key_id.to_string().as_str());
        }
        if !clones.is_empty() {
            // The clones this event decided wait for the end of the feed
            // batch, with what they need.
            self.deferred.clones.extend(clones);
            if let Event::KeyCreated(c) = &event {
                self.deferred.created.insert(meta.seq, c.clone());
            }
            self.deferred.span = Some(span.clone());
        }
        let handling = Instant::now();
        let n = actions.len();
        if let Err(e) = self
            .executor
            .execute(&self.state, actions, &HashMap::new())
            .instrument(span.clone())
            .await
        {
            keysync_telemetry::fail(&span, "execute", &format!("{e:#}"));
            return Err(e);
        }
        if handling.elapsed() > SLOW_EVENT {
            tracing::info!(
                kind = event.kind(),
                actions = n,
                elapsed_ms = handling.elapsed().as_millis() as u64,
                "slow event handling"
            );
        }
        Ok(())
    }

    /// A heartbeat: the member is heard from (announced recovered if the
    /// log says failed), and its inventory is compared with what the log
    /// says it holds.
    async fn on_heartbeat(&mut self, msg: async_nats::Message) -> anyhow::Result<()> {
        let now_ns = keysync_schemas::Timestamp::now().as_nanos();
        let hb = match self.heartbeats.check(&self.state, &msg, now_ns) {
            Ok(hb) => hb,
            Err(rejection) => {
                tracing::warn!(subject = %msg.subject, reason = %rejection.reason, detail = %rejection.detail, "rejected heartbeat");
                self.count_rejection(rejection.reason);
                self.heartbeats.refused(&msg, rejection).await;
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
            self.executor
                .publisher
                .announce(subject, Event::HsmRecovered(recovered))
                .await?;
        }
        let reported = Inventory {
            keys: hb.token_keys,
            digest: hb.digest,
        };
        let verdict = self
            .anti_entropy
            .check(&self.state, idx, &hb.hsm, reported, self.unfolded);
        if verdict == Verdict::Repair {
            self.repair_member(&hb.hsm).await?;
        }
        Ok(())
    }

    /// Anti-entropy's I/O: reads the member's inventory and sends what
    /// [`anti_entropy::repairs`] computes from it. A member that does not
    /// answer is left for a later heartbeat to try again.
    ///
    /// A completed round (inventory read, compared, repairs handed to the
    /// publisher) is timed into `keysync_anti_entropy_round_seconds` and
    /// logged with its duration; a postponed one is not counted.
    async fn repair_member(&mut self, hsm: &HsmId) -> anyhow::Result<()> {
        let started = Instant::now();
        let source = self.executor.publisher.source();
        let Some(inventory) =
            inventory::read_inventory(&self.nats, &self.config.subjects, source, hsm).await?
        else {
            return Ok(());
        };
        let read_ms = started.elapsed().as_millis() as u64;
        let actions = anti_entropy::repairs(&self.state, hsm, &inventory);
        let repairs = actions.len();
        self.stats.repairs += repairs as u64;
        self.prom.repairs(repairs as u64);
        self.executor
            .execute(&self.state, actions, &HashMap::new())
            .await?;
        let elapsed = started.elapsed();
        self.prom.anti_entropy_round(elapsed.as_secs_f64());
        tracing::info!(
            %hsm,
            held = inventory.len(),
            repairs,
            read_ms,
            elapsed_ms = elapsed.as_millis() as u64,
            "anti-entropy repair"
        );
        Ok(())
    }

    /// Counts and files what the publisher found holding one of our
    /// message ids (it removed it and sent the real message again).
    async fn report_foreign(&mut self) {
        for f in self.executor.publisher.take_foreign() {
            self.count_rejection(keysync_schemas::RejectReason::ForeignDuplicate);
            self.intake.file_foreign(&f).await;
        }
    }

    /// Announces failed every live member [`Liveness::tick`] finds silent.
    async fn detect_failures(&mut self) -> anyhow::Result<()> {
        let live = self.state.members().filter(|m| m.live).map(|m| &m.hsm);
        let failed = self.liveness.tick(Instant::now(), live);
        for f in failed {
            let subject = self.config.subjects.hsm_failed(&f.hsm);
            self.executor
                .publisher
                .announce(subject, Event::HsmFailed(f))
                .await?;
        }
        Ok(())
    }
}
