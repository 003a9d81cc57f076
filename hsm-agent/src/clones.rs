//! Applying clone and delete commands from this HSM's durable command queue.
//!
//! Commands are taken in batches of whatever is ready, checked, stored in
//! one keystore transaction (one fsync for the batch), announced with one
//! `CloneApplied`/`CloneFailed` event each (published pipelined), and only
//! then acknowledged. A crash anywhere before the ack means redelivery,
//! which is harmless: applying a clone twice is a no-op.
//!
//! A clone that fails for a passing reason (the store could not keep it
//! now: disk full, an I/O error; [`CloneFailure::is_permanent`] is false)
//! is not announced: `CloneFailed` is final for the orchestrator, and this
//! key is fine. Its command is handed back to JetStream with a delay
//! ([`retry_delay`], exponential with jitter by delivery count) and applied
//! again when it comes back, as often as it takes; meanwhile the consumer
//! goes on delivering other commands. A delete that cannot be stored is
//! handed back the same way. Only the results of a command's units that
//! were decided are announced, once: a redelivered batch command skips the
//! units already announced. Each retried unit is counted in the agent's
//! health (`clones_retried`, `deletes_retried`): not bad input, so not among
//! its rejections.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, AckKind};
use backon::{BackoffBuilder as _, ExponentialBuilder};
use futures::StreamExt;
use keysync_schemas::headers::{HopTimes, HOP_TIMES};
use keysync_schemas::{
    AppliedKey, CloneApplied, CloneFailed, CloneFailure, CloneKey, ClonesApplied, Command,
    Envelope, Event, KeyErased, RejectReason, Rejection, Source, MAX_APPLIED_PER_EVENT,
};
use keysync_security::{Filing, Keep};
use tracing::Instrument as _;

use crate::keystore::{CloneOutcome, Keystore};
use crate::Agent;

/// Most commands applied in one keystore transaction.
const MAX_BATCH: usize = 512;

/// How often a quiet consumer is checked for commands it is not receiving.
const STALL_CHECK: Duration = Duration::from_secs(3);

/// Delay before the second delivery of a command that failed for a
/// passing reason; it doubles with each delivery up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(250);
/// Longest delay between deliveries before jitter (which adds up to as much
/// again): once space is freed, a full HSM catches up within this (×2).
const RETRY_MAX: Duration = Duration::from_secs(4);

/// How long JetStream holds a command back after its `delivered`-th
/// delivery failed for a passing reason: `backon`'s exponential policy from
/// [`RETRY_MIN`] doubling to [`RETRY_MAX`], with full jitter on top (so
/// commands that failed together do not all come back at once). Depends
/// only on the delivery count, which JetStream keeps: nothing to remember
/// across a restart.
pub fn retry_delay(delivered: i64) -> Duration {
    // Past 32 deliveries the cap is long reached.
    let attempt = usize::try_from(delivered.saturating_sub(1))
        .unwrap_or(0)
        .min(32);
    ExponentialBuilder::default()
        .with_min_delay(RETRY_MIN)
        .with_max_delay(RETRY_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(attempt)
        .unwrap_or(RETRY_MAX)
}

/// Units of handed-back batch commands whose results were already logged,
/// by stream sequence, so a redelivery does not announce them again.
#[derive(Default)]
struct Announced(HashMap<u64, HashSet<usize>>);

impl Announced {
    /// Beyond this many commands remembered, forget them all (the cost is
    /// duplicate `CloneApplied` events, which the orchestrator ignores).
    const MAX: usize = 20_000;

    /// A command without a known stream sequence is never remembered.
    fn get(&self, seq: Option<u64>) -> Option<&HashSet<usize>> {
        self.0.get(&seq?)
    }

    fn add(&mut self, seq: Option<u64>, units: impl IntoIterator<Item = usize>) {
        let Some(seq) = seq else { return };
        if self.0.len() >= Self::MAX && !self.0.contains_key(&seq) {
            self.0.clear();
        }
        self.0.entry(seq).or_default().extend(units);
    }

    fn done(&mut self, seq: Option<u64>) {
        if let Some(seq) = seq {
            self.0.remove(&seq);
        }
    }
}

/// Consumes this HSM's command subject. The pull stream is recreated when
/// it reports an error, ends, or stalls (commands pending on the server
/// while none arrive, as after a NATS node holding the consumer died).
pub async fn run(agent: Arc<Agent>) -> anyhow::Result<()> {
    let stream = agent
        .wait_for_stream(&agent.subjects.commands_stream())
        .await?;
    let name = agent.subjects.agent_consumer(&agent.hsm);
    let mut announced = Announced::default();
    let mut retry_log = RetryLog::default();
    loop {
        let consumer: jetstream::consumer::PullConsumer = match stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: agent.subjects.commands_for(&agent.hsm),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    // Unacknowledged (the agent died mid-batch, a result was
                    // not logged): redelivered after this.
                    ack_wait: Duration::from_secs(30),
                    // Never given up on: a command that failed for a passing
                    // reason is handed back (nak with a delay) as often as
                    // it takes, and must not be dropped after N tries.
                    max_deliver: -1,
                    // Handed-back commands count here while they wait, so a
                    // long outage of the store holds back at most this many;
                    // the others keep flowing meanwhile.
                    max_ack_pending: 20_000,
                    ..Default::default()
                },
            )
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "command consumer unavailable; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut messages = match consumer.messages().await {
            Ok(m) => m.ready_chunks(MAX_BATCH),
            Err(e) => {
                tracing::warn!(error = %e, "command stream unavailable; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        tracing::info!(consumer = %name, "applying clone and delete commands");
        let mut c = consumer.clone();
        if let Ok(i) = c.info().await {
            queue_level(&agent, i.num_pending);
        }
        let mut check = tokio::time::interval(STALL_CHECK);
        check.tick().await;
        let mut received_since_check = false;
        loop {
            tokio::select! {
                batch = messages.next() => {
                    let Some(batch) = batch else {
                        tracing::warn!("command stream ended; recreating it");
                        break;
                    };
                    let mut ok = Vec::with_capacity(batch.len());
                    let mut failed = false;
                    for m in batch {
                        match m {
                            Ok(m) => ok.push(m),
                            Err(e) => {
                                tracing::warn!(error = %e, "command stream error; recreating it");
                                failed = true;
                            }
                        }
                    }
                    received_since_check |= !ok.is_empty();
                    apply_batch(&agent, ok, &mut announced, &mut retry_log).await;
                    if failed {
                        break;
                    }
                }
                _ = check.tick() => {
                    let quiet = !std::mem::take(&mut received_since_check);
                    let mut c = consumer.clone();
                    let info = c.info().await.cloned();
                    if let Ok(i) = &info {
                        queue_level(&agent, i.num_pending);
                    }
                    if quiet {
                        // Not stalled when every ack slot is taken by commands
                        // handed back to wait out their retry delay.
                        let stalled = match info {
                            Ok(i) => {
                                i.num_pending > 0
                                    && (i.config.max_ack_pending <= 0
                                        || (i.num_ack_pending as i64) < i.config.max_ack_pending)
                            }
                            Err(_) => true,
                        };
                        if stalled {
                            tracing::warn!("commands pending but none arriving; recreating the command stream");
                            break;
                        }
                    }
                }
            }
        }
        drop(messages);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the command consumer reports still undelivered: the queue's level,
/// and whether the agent has caught up with it (for `/readyz`).
fn queue_level(agent: &Agent, pending: u64) {
    agent.metrics.set_queue_pending(pending);
    agent.metrics.caught_up(pending == 0);
}

async fn apply_batch(
    agent: &Arc<Agent>,
    batch: Vec<jetstream::Message>,
    announced: &mut Announced,
    retry_log: &mut RetryLog,
) {
    // When this batch came off the consumer: checking it is part of applying.
    let received = keysync_schemas::Timestamp::now().as_nanos();
    let mut valid: Vec<(jetstream::Message, Command, HopTimes)> = Vec::with_capacity(batch.len());
    let expected_subject = agent.subjects.commands_for(&agent.hsm);
    for msg in batch {
        let stored_at_ns = msg
            .info()
            .map(|i| u64::try_from(i.published.unix_timestamp_nanos()).unwrap_or(0))
            .unwrap_or(0);
        let checked = keysync_security::check_command(
            msg.headers.as_ref(),
            &msg.subject,
            &msg.payload,
            stored_at_ns,
            &agent.cluster_key,
        )
        .and_then(|env| {
            let inner_ok = match &env.body {
                Command::CloneBatch(b) => b.clones.iter().all(|c| c.target == agent.hsm),
                _ => true,
            };
            if env.body.target() == &agent.hsm
                && inner_ok
                && msg.subject.as_str() == expected_subject
            {
                Ok((env.emitted_at, env.body))
            } else {
                Err(Rejection::new(
                    RejectReason::WrongTarget,
                    format!("command addressed to {}", env.body.target()),
                ))
            }
        });
        let (decided, cmd) = match checked {
            Ok(checked) => checked,
            Err(rejection) => {
                let seq = msg.info().map(|i| i.stream_sequence).ok();
                // Keyed by this agent's identity, so nobody else can take
                // the id first and have the letter dropped as a duplicate
                // (a restart re-derives it: a redelivery is filed once).
                let ids = &agent.message_ids;
                agent
                    .bad_input
                    .file(
                        Filing {
                            subject: &msg.subject,
                            rejection,
                            stream_seq: seq,
                            payload: &msg.payload,
                            dedup_id: seq.map(|s| {
                                format!(
                                    "dlq-command-{}",
                                    ids.tag("dlq-command", &[&s.to_be_bytes()])
                                )
                            }),
                        },
                        Keep::Payload,
                    )
                    .await;
                terminate(&msg).await;
                continue;
            }
        };
        let from_orchestrator = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(HOP_TIMES))
            .and_then(|v| HopTimes::from_header(v.as_str()))
            .unwrap_or_default();
        let hops = HopTimes {
            orchestrator_received: from_orchestrator.orchestrator_received,
            orchestrator_decided: Some(decided.as_nanos()),
            command_stored: Some(stored_at_ns).filter(|t| *t > 0),
            agent_received: Some(received),
        };
        valid.push((msg, cmd, hops));
    }
    if valid.is_empty() {
        return;
    }

    // A batch command stands for its clones: apply the single commands in
    // order (runs of clones in one transaction each, deletes one by one, so
    // a delete queued after a clone of the same key wins); a message is
    // acknowledged once every result it caused is logged, or handed back
    // if some of its units failed for a passing reason.
    let mut msgs: Vec<Delivery> = Vec::with_capacity(valid.len());
    let mut units: Vec<(usize, usize, Command)> = Vec::with_capacity(valid.len());
    for (i, (msg, cmd, hops)) in valid.into_iter().enumerate() {
        let (seq, delivered) = msg
            .info()
            .map(|info| (Some(info.stream_sequence), info.delivered))
            .unwrap_or((None, 1));
        let skip = announced.get(seq);
        let before = units.len();
        units.extend(
            cmd.into_units()
                .into_iter()
                .enumerate()
                .filter(|(u, _)| skip.is_none_or(|s| !s.contains(u)))
                .map(|(u, c)| (i, u, c)),
        );
        msgs.push(Delivery {
            msg,
            seq,
            delivered,
            has_units: units.len() > before,
            seen: false,
            unlogged: None,
            retried: 0,
            decided: Vec::new(),
            hops,
        });
    }
    // In windows of at most MAX_BATCH commands: each is applied in one
    // transaction, announced and confirmed before the next, so a large batch
    // command (a bootstrap) does not flood the bus with thousands of events
    // at once.
    let mut passing: Option<String> = None;
    let mut rest = units;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(MAX_BATCH));
        let window = std::mem::replace(&mut rest, tail);
        let store = agent.store.clone();
        let cmds: Vec<Command> = window.iter().map(|(_, _, c)| c.clone()).collect();
        let applying = std::time::Instant::now();
        let outcomes = match tokio::task::spawn_blocking(move || {
            apply_in_order(store.as_ref(), &cmds)
        })
        .await
        {
            Ok(r) => {
                agent.metrics.clone_batch_applied(applying.elapsed());
                r
            }
            Err(e) => {
                // Not acknowledged: the commands are redelivered after ack_wait.
                tracing::error!(error = %e, "command batch panicked");
                return;
            }
        };

        // Per published result: the (message, unit)s it answers, and its
        // PubAck to come (none: nothing to announce).
        let mut results: Vec<Published> = Vec::with_capacity(window.len());
        // Clones applied in this window: announced together after the
        // loop, one `ClonesApplied` per chunk (decision 21).
        let mut applied: Vec<(usize, usize, AppliedKey)> = Vec::new();
        for ((at, unit, cmd), outcome) in window.into_iter().zip(outcomes) {
            let delivery = &mut msgs[at];
            delivery.seen = true;
            let msg = &delivery.msg;
            let (subject, event) = match (cmd, outcome) {
                (_, Outcome::Silent) => {
                    results.push((vec![(at, unit)], None));
                    continue;
                }
                (Command::CloneKey(clone), Outcome::Clone(Ok(outcome))) => {
                    agent.clones_applied.fetch_add(1, Ordering::Relaxed);
                    agent.metrics.command("applied");
                    applied.push((
                        at,
                        unit,
                        AppliedKey {
                            key_id: clone.key.key_id,
                            fingerprint: clone.key.fingerprint,
                            already_present: outcome == CloneOutcome::AlreadyPresent,
                        },
                    ));
                    continue;
                }
                (Command::CloneKey(clone), Outcome::Clone(Err(reason)))
                    if !reason.is_permanent() =>
                {
                    // The key is fine; this HSM could not keep it now.
                    // Not logged: the command is handed back and retried.
                    tracing::debug!(key_id = %clone.key.key_id, reason = reason.reason(), "clone not stored for a passing reason; will retry");
                    agent.clones_retried.fetch_add(1, Ordering::Relaxed);
                    agent.metrics.command("retried");
                    if matches!(reason, CloneFailure::Storage(_)) {
                        agent.metrics.storage_error();
                    }
                    delivery.retried += 1;
                    if passing.is_none() {
                        passing = Some(match &reason {
                            CloneFailure::Storage(detail) => detail.clone(),
                            other => other.reason().to_string(),
                        });
                    }
                    continue;
                }
                (Command::CloneKey(clone), Outcome::Clone(Err(reason))) => {
                    let key_id = clone.key.key_id;
                    tracing::warn!(%key_id, reason = reason.reason(), "clone failed; nothing stored");
                    // A command that cannot be applied is a fact to report,
                    // not bad input: counted apart from rejected messages.
                    agent.clones_failed.fetch_add(1, Ordering::Relaxed);
                    agent.metrics.command("failed");
                    (
                        agent.subjects.clone_failed(&key_id, &agent.hsm),
                        Event::CloneFailed(CloneFailed {
                            key_id,
                            hsm: agent.hsm.clone(),
                            reason,
                        }),
                    )
                }
                (Command::DeleteKey(d), Outcome::Erased(was_present)) => (
                    agent.subjects.key_erased(&d.key_id, &agent.hsm),
                    Event::KeyErased(KeyErased {
                        key_id: d.key_id,
                        hsm: agent.hsm.clone(),
                        was_present,
                    }),
                ),
                (_, Outcome::Failed(e)) => {
                    // The store could not record the delete: handed back
                    // and tried again, like a clone.
                    tracing::debug!(error = %e, "delete not stored for a passing reason; will retry");
                    agent.deletes_retried.fetch_add(1, Ordering::Relaxed);
                    agent.metrics.command("retried");
                    agent.metrics.storage_error();
                    delivery.retried += 1;
                    if passing.is_none() {
                        passing = Some(e);
                    }
                    continue;
                }
                _ => continue,
            };
            let published = announce(agent, subject, event, msg, &delivery.hops).await;
            results.push((vec![(at, unit)], Some(published)));
        }
        // The clones applied: one signed event per chunk of up to
        // MAX_APPLIED_PER_EVENT, a lone one as a plain `CloneApplied` (so
        // one key at a time looks as it always did).
        for chunk in applied.chunks(MAX_APPLIED_PER_EVENT) {
            let (at, _, first) = &chunk[0];
            let (subject, event) = if chunk.len() == 1 {
                (
                    agent.subjects.clone_applied(&first.key_id, &agent.hsm),
                    Event::CloneApplied(CloneApplied {
                        key_id: first.key_id,
                        hsm: agent.hsm.clone(),
                        fingerprint: first.fingerprint,
                        already_present: first.already_present,
                    }),
                )
            } else {
                agent.metrics.clones_batched(chunk.len());
                (
                    agent.subjects.clones_applied(&agent.hsm),
                    Event::ClonesApplied(ClonesApplied {
                        hsm: agent.hsm.clone(),
                        applied: chunk.iter().map(|(_, _, a)| a.clone()).collect(),
                    }),
                )
            };
            // A batch carries the trace and hop times of its first command
            // (a message has one parent and one header).
            let delivery = &msgs[*at];
            let published = announce(agent, subject, event, &delivery.msg, &delivery.hops).await;
            results.push((
                chunk.iter().map(|(at, unit, _)| (*at, *unit)).collect(),
                Some(published),
            ));
        }
        // Every PubAck is awaited at once: each one's timeout starts when it is
        // awaited, so awaiting them in turn would let a batch published into a
        // NATS outage (acks lost) stall for its length times the timeout.
        let confirmations =
            futures::future::join_all(results.into_iter().map(|(answers, published)| async move {
                let confirmed = match published {
                    None => Ok(()),
                    Some(Ok(fut)) => fut.await.map(drop).map_err(|e| e.to_string()),
                    Some(Err(e)) => Err(format!("{e:#}")),
                };
                (answers, confirmed)
            }))
            .await;
        for (answers, confirmed) in confirmations {
            for (at, unit) in answers {
                let delivery = &mut msgs[at];
                match &confirmed {
                    Ok(()) => delivery.decided.push(unit),
                    Err(e) => delivery.unlogged = Some(anyhow::anyhow!("{e}")),
                }
            }
        }
    }

    let mut handed_back = 0usize;
    let mut retried = 0usize;
    let mut longest = Duration::ZERO;
    for d in msgs {
        if !d.seen && d.has_units {
            continue; // nothing came of it (not applied): redelivered
        }
        if d.retried > 0 || d.unlogged.is_some() {
            // Results already logged are not announced again.
            announced.add(d.seq, d.decided);
        }
        if let Some(e) = d.unlogged {
            // Left unacknowledged: redelivered and re-applied (a no-op).
            tracing::warn!(error = %e, "command result not logged; command will be redelivered");
        } else if d.retried > 0 {
            let delay = retry_delay(d.delivered);
            longest = longest.max(delay);
            handed_back += 1;
            retried += d.retried;
            if let Err(e) = d.msg.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::warn!(error = %e, "could not hand a command back; it is redelivered after ack_wait");
            }
        } else {
            announced.done(d.seq);
            if let Err(e) = d.msg.ack().await {
                tracing::warn!(error = %e, "could not acknowledge a command; it will be redelivered");
            }
        }
    }
    if handed_back > 0 {
        retry_log.note(agent, handed_back, retried, longest, passing);
    }
}

/// Signs and publishes one result `event` of the command in `msg` (its
/// trace continues in a span for this apply), with the command's hop
/// times; returns its PubAck to come.
async fn announce(
    agent: &Arc<Agent>,
    subject: String,
    event: Event,
    msg: &jetstream::Message,
    hops: &HopTimes,
) -> anyhow::Result<jetstream::context::PublishAckFuture> {
    // The command's trace continues here: this apply, then its result.
    // A CONSUMER span: the command consumed, child of the
    // orchestrator's publish of it.
    let span = tracing::info_span!(
        "keysync.apply",
        otel.kind = "consumer",
        messaging.system = "nats",
        messaging.destination.name = %msg.subject,
        messaging.operation.type = "process",
        messaging.message.id = tracing::field::Empty,
        messaging.nats.stream_sequence = tracing::field::Empty,
        keysync.key_id = tracing::field::Empty,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        hsm = %agent.hsm,
        kind = event.kind(),
    );
    keysync_telemetry::follow(&span, msg.headers.as_ref());
    if let Some(id) = keysync_telemetry::message_id(msg.headers.as_ref()) {
        span.record("messaging.message.id", id);
    }
    if let Ok(info) = msg.info() {
        span.record("messaging.nats.stream_sequence", info.stream_sequence);
    }
    if let Some(key_id) = event.key_id() {
        span.record("keysync.key_id", key_id.to_string().as_str());
    }
    if let Event::CloneFailed(f) = &event {
        keysync_telemetry::fail(&span, f.reason.label(), &f.reason.reason());
    }
    let env = Envelope::new(Source::Hsm(agent.hsm.clone()), event);
    match keysync_schemas::encode(&env) {
        Ok(bytes) => {
            agent
                .publish_result(subject, env.id, bytes, hops)
                .instrument(span)
                .await
        }
        Err(e) => Err(anyhow::anyhow!(e)),
    }
}

/// At most one warning this often about commands handed back to retry
/// (each redelivery would be one, thousands a second in a long outage).
const RETRY_LOG_EVERY: Duration = Duration::from_secs(10);

/// Sums up commands handed back to retry between two warnings.
#[derive(Default)]
struct RetryLog {
    last: Option<std::time::Instant>,
    commands: usize,
    units: usize,
    longest: Duration,
    error: Option<String>,
}

impl RetryLog {
    fn note(
        &mut self,
        agent: &Agent,
        commands: usize,
        units: usize,
        longest: Duration,
        error: Option<String>,
    ) {
        self.commands += commands;
        self.units += units;
        self.longest = self.longest.max(longest);
        if self.error.is_none() {
            self.error = error;
        }
        if self.last.is_some_and(|t| t.elapsed() < RETRY_LOG_EVERY) {
            return;
        }
        tracing::warn!(
            commands = self.commands,
            units = self.units,
            retry_in_ms_at_most = self.longest.as_millis() as u64,
            clones_retried_total = agent.clones_retried.load(Ordering::Relaxed),
            deletes_retried_total = agent.deletes_retried.load(Ordering::Relaxed),
            error = self.error.as_deref().unwrap_or(""),
            "commands not applied for a passing reason (not logged as failed); handed back to retry"
        );
        *self = RetryLog {
            last: Some(std::time::Instant::now()),
            ..RetryLog::default()
        };
    }
}

/// One result published (or none needed): the (message, unit)s it
/// answers, and its PubAck to come.
type Published = (
    Vec<(usize, usize)>,
    Option<anyhow::Result<jetstream::context::PublishAckFuture>>,
);

/// One command message of a batch, and what became of it.
struct Delivery {
    msg: jetstream::Message,
    /// Its stream sequence, if its reply subject could be read.
    seq: Option<u64>,
    /// How many times JetStream has delivered it, this time included.
    delivered: i64,
    /// Whether it had units left to apply (not all announced before).
    has_units: bool,
    /// Whether any of its units was applied.
    seen: bool,
    /// A result that could not be logged: leave it for redelivery.
    unlogged: Option<anyhow::Error>,
    /// Units that failed for a passing reason: hand it back.
    retried: usize,
    /// Units whose results are logged (or need none).
    decided: Vec<usize>,
    /// When it was decided, stored and received, for its results' header.
    hops: HopTimes,
}

/// What applying one command did.
enum Outcome {
    /// A clone's result.
    Clone(Result<CloneOutcome, CloneFailure>),
    /// A delete: whether the key was held.
    Erased(bool),
    /// Nothing to announce (a clone of a deleted key).
    Silent,
    /// The store failed; leave the command for redelivery.
    Failed(String),
}

fn apply_in_order(store: &dyn Keystore, cmds: &[Command]) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(cmds.len());
    let mut i = 0;
    while i < cmds.len() {
        match &cmds[i] {
            Command::CloneKey(_) => {
                let run: Vec<&CloneKey> = cmds[i..]
                    .iter()
                    .map_while(|c| match c {
                        Command::CloneKey(k) => Some(k),
                        Command::DeleteKey(_) | Command::CloneBatch(_) => None,
                    })
                    .collect();
                i += run.len();
                out.extend(store.apply_clones(&run).into_iter().map(|r| match r {
                    Ok(CloneOutcome::Tombstoned) => Outcome::Silent,
                    other => Outcome::Clone(other),
                }));
            }
            Command::CloneBatch(b) => {
                let units: Vec<Command> = b.clones.iter().cloned().map(Command::CloneKey).collect();
                out.extend(apply_in_order(store, &units));
                i += 1;
            }
            Command::DeleteKey(d) => {
                out.push(match store.delete(&d.key_id, None) {
                    Ok(prev) => Outcome::Erased(prev.is_some()),
                    Err(e) => Outcome::Failed(e.to_string()),
                });
                i += 1;
            }
        }
    }
    out
}

async fn terminate(msg: &jetstream::Message) {
    if let Err(e) = msg.ack_with(AckKind::Term).await {
        tracing::warn!(error = %e, "could not terminate a rejected command");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_exponentially_with_jitter_up_to_a_cap() {
        for _ in 0..100 {
            let first = retry_delay(1);
            assert!(first >= RETRY_MIN && first < RETRY_MIN * 2, "{first:?}");
            let third = retry_delay(3);
            assert!(third >= RETRY_MIN * 4 && third < RETRY_MIN * 8, "{third:?}");
            for delivered in [10, 1_000, i64::MAX] {
                let capped = retry_delay(delivered);
                assert!(capped >= RETRY_MAX && capped < RETRY_MAX * 2, "{capped:?}");
            }
            // A nonsensical count is the first delivery.
            let odd = retry_delay(-5);
            assert!(odd >= RETRY_MIN && odd < RETRY_MIN * 2, "{odd:?}");
        }
        // Jittered: commands handed back together do not return together.
        let spread: HashSet<Duration> = (0..20).map(|_| retry_delay(6)).collect();
        assert!(spread.len() > 1);
    }

    #[test]
    fn announced_units_are_remembered_until_the_command_is_done() {
        let mut a = Announced::default();
        a.add(Some(7), [0, 2]);
        a.add(Some(7), [3]);
        assert_eq!(a.get(Some(7)).map(|s| s.len()), Some(3));
        assert!(a.get(Some(8)).is_none());
        a.add(None, [1]);
        assert!(a.get(None).is_none());
        a.done(Some(7));
        assert!(a.get(Some(7)).is_none());
        for seq in 0..Announced::MAX as u64 + 1 {
            a.add(Some(seq), [0]);
        }
        assert!(a.0.len() <= Announced::MAX);
    }
}
