//! Applying clone and delete commands from this HSM's durable command queue.
//!
//! Commands are taken in batches of whatever is ready, checked, stored in
//! one keystore transaction (one fsync for the batch), announced with one
//! `CloneApplied`/`CloneFailed` event each (published pipelined), and only
//! then acknowledged. A crash anywhere before the ack means redelivery,
//! which is harmless: applying a clone twice is a no-op.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, AckKind};
use futures::StreamExt;
use keysync_schemas::{
    CloneApplied, CloneFailed, CloneFailure, CloneKey, Command, Envelope, Event, KeyErased,
    RejectReason, Rejection, Source,
};
use keysync_security::{Filing, Keep};
use tracing::Instrument as _;

use crate::keystore::{CloneOutcome, Keystore};
use crate::Agent;

/// Most commands applied in one keystore transaction.
const MAX_BATCH: usize = 512;

/// How often a quiet consumer is checked for commands it is not receiving.
const STALL_CHECK: Duration = Duration::from_secs(3);

/// Consumes this HSM's command subject. The pull stream is recreated when
/// it reports an error, ends, or stalls (commands pending on the server
/// while none arrive, as after a NATS node holding the consumer died).
pub async fn run(agent: Arc<Agent>) -> anyhow::Result<()> {
    let stream = agent
        .wait_for_stream(&agent.subjects.commands_stream())
        .await?;
    let name = agent.subjects.agent_consumer(&agent.hsm);
    loop {
        let consumer: jetstream::consumer::PullConsumer = match stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: agent.subjects.commands_for(&agent.hsm),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
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
                    apply_batch(&agent, ok).await;
                    if failed {
                        break;
                    }
                }
                _ = check.tick() => {
                    let quiet = !std::mem::take(&mut received_since_check);
                    if quiet {
                        let mut c = consumer.clone();
                        let stalled = match c.info().await {
                            Ok(i) => i.num_pending > 0,
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

async fn apply_batch(agent: &Arc<Agent>, batch: Vec<jetstream::Message>) {
    let mut valid: Vec<(jetstream::Message, Command)> = Vec::with_capacity(batch.len());
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
                Ok(env.body)
            } else {
                Err(Rejection::new(
                    RejectReason::WrongTarget,
                    format!("command addressed to {}", env.body.target()),
                ))
            }
        });
        let cmd = match checked {
            Ok(cmd) => cmd,
            Err(rejection) => {
                let seq = msg.info().map(|i| i.stream_sequence).ok();
                agent
                    .bad_input
                    .file(
                        Filing {
                            subject: &msg.subject,
                            rejection,
                            stream_seq: seq,
                            payload: &msg.payload,
                            dedup_id: seq.map(|s| format!("dlq-command-{s}")),
                        },
                        Keep::Payload,
                    )
                    .await;
                terminate(&msg).await;
                continue;
            }
        };
        valid.push((msg, cmd));
    }
    if valid.is_empty() {
        return;
    }

    // A batch command stands for its clones: apply the single commands in
    // order (runs of clones in one transaction each, deletes one by one, so
    // a delete queued after a clone of the same key wins); a message is
    // acknowledged once every result it caused is logged.
    let mut msgs = Vec::with_capacity(valid.len());
    let mut units: Vec<(usize, Command)> = Vec::with_capacity(valid.len());
    for (i, (msg, cmd)) in valid.into_iter().enumerate() {
        msgs.push(msg);
        units.extend(cmd.into_units().into_iter().map(|c| (i, c)));
    }
    let mut failed: Vec<Option<anyhow::Error>> = msgs.iter().map(|_| None).collect();
    let mut seen = vec![false; msgs.len()];
    // In windows of at most MAX_BATCH commands: each is applied in one
    // transaction, announced and confirmed before the next, so a large batch
    // command (a bootstrap) does not flood the bus with thousands of events
    // at once.
    let mut rest = units;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(MAX_BATCH));
        let window = std::mem::replace(&mut rest, tail);
        let store = agent.store.clone();
        let cmds: Vec<Command> = window.iter().map(|(_, c)| c.clone()).collect();
        let outcomes = match tokio::task::spawn_blocking(move || {
            apply_in_order(store.as_ref(), &cmds)
        })
        .await
        {
            Ok(r) => r,
            Err(e) => {
                // Not acknowledged: the commands are redelivered after ack_wait.
                tracing::error!(error = %e, "command batch panicked");
                return;
            }
        };

        let mut results: Vec<(
            usize,
            Option<anyhow::Result<jetstream::context::PublishAckFuture>>,
        )> = Vec::with_capacity(window.len());
        for ((at, cmd), outcome) in window.into_iter().zip(outcomes) {
            let msg = &msgs[at];
            let (subject, event) = match (cmd, outcome) {
                (_, Outcome::Silent) => {
                    results.push((at, None));
                    continue;
                }
                (Command::CloneKey(clone), Outcome::Clone(Ok(outcome))) => {
                    agent.clones_applied.fetch_add(1, Ordering::Relaxed);
                    let key_id = clone.key.key_id;
                    (
                        agent.subjects.clone_applied(&key_id, &agent.hsm),
                        Event::CloneApplied(CloneApplied {
                            key_id,
                            hsm: agent.hsm.clone(),
                            fingerprint: clone.key.fingerprint,
                            already_present: outcome == CloneOutcome::AlreadyPresent,
                        }),
                    )
                }
                (Command::CloneKey(clone), Outcome::Clone(Err(reason))) => {
                    let key_id = clone.key.key_id;
                    tracing::warn!(%key_id, reason = reason.reason(), "clone failed; nothing stored");
                    // A command that cannot be applied is a fact to report,
                    // not bad input: counted apart from rejected messages.
                    agent.clones_failed.fetch_add(1, Ordering::Relaxed);
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
                    // Not acknowledged: redelivered and tried again.
                    tracing::warn!(error = %e, "command not applied; it will be redelivered");
                    results.push((at, Some(Err(anyhow::anyhow!("not applied: {e}")))));
                    continue;
                }
                _ => continue,
            };
            // The command's trace continues here: this apply, then its result.
            let span = tracing::info_span!("keysync.apply", hsm = %agent.hsm, kind = event.kind());
            keysync_telemetry::follow(&span, msg.headers.as_ref());
            let env = Envelope::new(Source::Hsm(agent.hsm.clone()), event);
            let published = match keysync_schemas::encode(&env) {
                Ok(bytes) => {
                    agent
                        .publish_event(subject, env.id, bytes)
                        .instrument(span)
                        .await
                }
                Err(e) => Err(anyhow::anyhow!(e)),
            };
            results.push((at, Some(published)));
        }
        // Every PubAck is awaited at once: each one's timeout starts when it is
        // awaited, so awaiting them in turn would let a batch published into a
        // NATS outage (acks lost) stall for its length times the timeout.
        let confirmations =
            futures::future::join_all(results.into_iter().map(|(at, published)| async move {
                let confirmed = match published {
                    None => Ok(()),
                    Some(Ok(fut)) => fut.await.map(drop).map_err(anyhow::Error::from),
                    Some(Err(e)) => Err(e),
                };
                (at, confirmed)
            }))
            .await;
        for (at, confirmed) in confirmations {
            seen[at] = true;
            if let Err(e) = confirmed {
                failed[at] = Some(e);
            }
        }
    }
    for ((msg, failure), seen) in msgs.iter().zip(failed).zip(seen) {
        if !seen {
            continue; // nothing came of it (not applied): redelivered
        }
        match failure {
            None => {
                if let Err(e) = msg.ack().await {
                    tracing::warn!(error = %e, "could not acknowledge a command; it will be redelivered");
                }
            }
            // Left unacknowledged: redelivered and re-applied (a no-op).
            Some(e) => {
                tracing::warn!(error = %e, "command result not logged; command will be redelivered")
            }
        }
    }
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
