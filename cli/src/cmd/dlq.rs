//! `keysync dlq list`: the dead-letter stream, newest last.

use async_nats::jetstream;
use clap::Subcommand;
use keysync_schemas::{decode, DeadLetter};
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
    let js = jetstream::new(nats);
    let name = subjects.dead_letter_stream();
    let mut stream = js
        .get_stream(&name)
        .await
        .map_err(|e| anyhow::anyhow!("dead-letter stream {name} not readable: {e}"))?;
    let state = stream.info().await?.state.clone();
    let first = state
        .first_sequence
        .max(state.last_sequence.saturating_sub(limit.saturating_sub(1)));
    let mut letters = Vec::new();
    if state.messages > 0 {
        for seq in first..=state.last_sequence {
            let Ok(msg) = stream.direct_get(seq).await else {
                continue; // removed by the stream's limits
            };
            let time = msg.time;
            match decode::<DeadLetter>(&msg.payload) {
                Ok(env) => letters.push((seq, time, env.body)),
                Err(e) => tracing::warn!(seq, error = %e, "unreadable dead letter"),
            }
        }
    }
    if *json {
        return print_json(&json!({
            "total": state.messages,
            "letters": letters.iter().map(|(seq, time, l)| json!({
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
            })).collect::<Vec<_>>(),
        }));
    }
    println!(
        "{} dead letters in {name}; the latest {}:",
        state.messages,
        letters.len()
    );
    for (seq, _, l) in &letters {
        println!(
            "{seq:>8}  {:<20} {:<24} {:<48} {}",
            l.reason, l.rejected_by, l.subject, l.detail
        );
    }
    Ok(())
}
