//! `keysync dlq list`: the dead-letter stream, newest last, each letter
//! with whether it verifies as filed by the process it names.

use std::collections::BTreeMap;

use async_nats::jetstream;
use clap::Subcommand;
use keysync_schemas::{decode, DeadLetter, HsmId};
use serde_json::json;

use super::{print_json, Cli};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The latest rejected messages, with their reasons.
    List {
        /// How many (the newest).
        #[arg(long, default_value_t = 50)]
        limit: u64,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cli: &Cli, cmd: &Command) -> anyhow::Result<()> {
    let Command::List { limit, json } = cmd;
    let subjects = cli.subjects()?;
    let nats = cli.nats("keysync-cli dlq").await?;
    let js = jetstream::new(nats.clone());
    let name = subjects.dead_letter_stream();
    let mut stream = js
        .get_stream(&name)
        .await
        .map_err(|e| anyhow::anyhow!("dead-letter stream {name} not readable: {e}"))?;
    let state = stream.info().await?.state.clone();
    let first = state
        .first_sequence
        .max(state.last_sequence.saturating_sub(limit.saturating_sub(1)));
    let trust = trust(cli, nats.clone()).await;
    let mut letters = Vec::new();
    let mut unreadable = 0u64;
    if state.messages > 0 {
        for seq in first..=state.last_sequence {
            let Ok(msg) = stream.direct_get(seq).await else {
                continue; // removed by the stream's limits
            };
            let time = msg.time;
            let verdict = trust.as_ref().map(|t| {
                keysync_security::check_dead_letter(
                    Some(&msg.headers),
                    &msg.subject,
                    &msg.payload,
                    &t.cluster_key,
                    |h| t.enrolled.get(h).copied(),
                )
                .map(|(signer, _)| signer.to_string())
                .map_err(|r| format!("{}: {}", r.reason, r.detail))
            });
            match decode::<DeadLetter>(&msg.payload) {
                Ok(env) => letters.push((seq, time, env.body, verdict)),
                Err(e) => {
                    unreadable += 1;
                    tracing::warn!(seq, error = %e, "unreadable dead letter (not filed by keysync)");
                }
            }
        }
    }
    if *json {
        return print_json(&json!({
            "total": state.messages,
            "unreadable": unreadable,
            "signatures_checked": trust.is_some(),
            "letters": letters.iter().map(|(seq, time, l, verdict)| json!({
                "seq": seq,
                "time": time.to_string(),
                "rejected_by": l.rejected_by,
                "subject": l.subject,
                "reason": l.reason,
                "detail": l.detail,
                "claimed_signer": l.claimed_signer,
                "stream_seq": l.stream_seq,
                "payload_len": l.payload_len,
                "payload_sha256": hex::encode(l.payload_sha256),
                "payload_kept": l.payload.is_some(),
                "verified": verdict.as_ref().map(|v| v.is_ok()),
                "signed_by": verdict.as_ref().and_then(|v| v.as_ref().ok()),
                "unverified_reason": verdict.as_ref().and_then(|v| v.as_ref().err()),
            })).collect::<Vec<_>>(),
        }));
    }
    outln!(
        "{} dead letters in {name}; the latest {}:",
        state.messages,
        letters.len()
    );
    for (seq, _, l, verdict) in &letters {
        let filed = match verdict {
            Some(Ok(_)) => "signed",
            Some(Err(_)) => "UNVERIFIED",
            None => "unchecked",
        };
        outln!(
            "{seq:>8}  {filed:<10} {:<20} {:<24} {:<48} {}",
            l.reason,
            l.rejected_by,
            l.subject,
            l.detail
        );
    }
    if trust.is_none() {
        outln!("signatures not checked: no cluster status (cluster and enrolled keys) from the orchestrator");
    }
    if unreadable > 0 {
        outln!("{unreadable} unreadable messages in the stream (not filed by keysync)");
    }
    Ok(())
}

/// The keys dead letters are checked against.
struct Trust {
    cluster_key: [u8; 32],
    enrolled: BTreeMap<HsmId, [u8; 32]>,
}

/// The cluster key and the enrolled HSMs' keys, from the orchestrator's
/// status (as the SDK's durability waits take them); `None` if it does not
/// answer (or this role may not ask it).
async fn trust(cli: &Cli, nats: async_nats::Client) -> Option<Trust> {
    let client = keysync::Client::from_nats(
        nats,
        keysync::ClientOptions {
            subjects: cli.subjects().ok()?,
            name: "keysync-cli".into(),
            request_timeout: std::time::Duration::from_secs(2),
            watch_replicas: false,
            watch_metrics: false,
            ..Default::default()
        },
    )
    .await;
    let status = client.cluster_status().await.ok()?;
    Some(Trust {
        cluster_key: status.cluster_key?,
        enrolled: status.enrolled.into_iter().collect(),
    })
}
