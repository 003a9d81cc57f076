//! Applying clone commands from this HSM's durable command queue.
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
    decode, CloneApplied, CloneFailed, CloneKey, Command, Envelope, Event, Source,
};

use crate::keystore::CloneOutcome;
use crate::Agent;

/// Most commands applied in one keystore transaction.
const MAX_BATCH: usize = 512;

/// Consumes this HSM's command subject until the stream ends or fails.
pub async fn run(agent: Arc<Agent>) -> anyhow::Result<()> {
    let stream = agent
        .wait_for_stream(&agent.subjects.commands_stream())
        .await?;
    let name = agent.subjects.agent_consumer(&agent.hsm);
    let consumer: jetstream::consumer::PullConsumer = stream
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
        .await?;
    let mut messages = consumer.messages().await?.ready_chunks(MAX_BATCH);
    tracing::info!(consumer = %name, "applying clone commands");
    while let Some(batch) = messages.next().await {
        let mut ok = Vec::with_capacity(batch.len());
        for m in batch {
            match m {
                Ok(m) => ok.push(m),
                Err(e) => tracing::warn!(error = %e, "command stream error"),
            }
        }
        apply_batch(&agent, ok).await;
    }
    anyhow::bail!("command stream ended")
}

async fn apply_batch(agent: &Arc<Agent>, batch: Vec<jetstream::Message>) {
    let mut valid: Vec<(jetstream::Message, CloneKey)> = Vec::with_capacity(batch.len());
    let expected_subject = agent.subjects.commands_for(&agent.hsm);
    for msg in batch {
        let cmd = match decode::<Command>(&msg.payload) {
            Ok(env) => env.body,
            Err(e) => {
                agent.rejections.reject(e.reason(), &msg.subject, &e);
                terminate(&msg).await;
                continue;
            }
        };
        let Command::CloneKey(clone) = cmd;
        if clone.target != agent.hsm || msg.subject.as_str() != expected_subject {
            agent.rejections.reject(
                "wrong_target",
                &msg.subject,
                &format_args!(
                    "clone of {} is addressed to {}",
                    clone.key.key_id, clone.target
                ),
            );
            terminate(&msg).await;
            continue;
        }
        valid.push((msg, clone));
    }
    if valid.is_empty() {
        return;
    }

    let store = agent.store.clone();
    let cmds: Vec<CloneKey> = valid.iter().map(|(_, c)| c.clone()).collect();
    let results = match tokio::task::spawn_blocking(move || {
        let refs: Vec<&CloneKey> = cmds.iter().collect();
        store.apply_clones(&refs)
    })
    .await
    {
        Ok(r) => r,
        Err(e) => {
            // Not acknowledged: the commands are redelivered after ack_wait.
            tracing::error!(error = %e, "clone batch panicked");
            return;
        }
    };

    let mut acks = Vec::with_capacity(valid.len());
    for ((msg, clone), result) in valid.into_iter().zip(results) {
        let key_id = clone.key.key_id;
        let (subject, event) = match result {
            Ok(outcome) => {
                agent.clones_applied.fetch_add(1, Ordering::Relaxed);
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
            Err(reason) => {
                tracing::warn!(%key_id, reason = reason.reason(), "clone failed; nothing stored");
                agent
                    .rejections
                    .reject("clone_failed", &msg.subject, &reason.reason());
                (
                    agent.subjects.clone_failed(&key_id, &agent.hsm),
                    Event::CloneFailed(CloneFailed {
                        key_id,
                        hsm: agent.hsm.clone(),
                        reason,
                    }),
                )
            }
        };
        let env = Envelope::new(Source::Hsm(agent.hsm.clone()), event);
        let published = match keysync_schemas::encode(&env) {
            Ok(bytes) => agent.publish_event(subject, env.id, bytes).await,
            Err(e) => Err(anyhow::anyhow!(e)),
        };
        acks.push((msg, published));
    }
    for (msg, published) in acks {
        let confirmed = match published {
            Ok(fut) => fut.await.map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        match confirmed {
            Ok(_) => {
                if let Err(e) = msg.ack().await {
                    tracing::warn!(error = %e, "could not acknowledge a command; it will be redelivered");
                }
            }
            // Left unacknowledged: redelivered and re-applied (a no-op).
            Err(e) => {
                tracing::warn!(error = %e, "clone result not logged; command will be redelivered")
            }
        }
    }
}

async fn terminate(msg: &jetstream::Message) {
    if let Err(e) = msg.ack_with(AckKind::Term).await {
        tracing::warn!(error = %e, "could not terminate a rejected command");
    }
}
