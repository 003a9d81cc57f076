//! The event feed, read ahead of the fold on its own task.
//!
//! The ordered consumer asks the server for more messages only while it
//! is polled (a pull of 500 whenever half of the last is taken). Read
//! from the loop itself, every pause of the loop — folding a checkpointed
//! run of 10,000 events at once, a fan-out window, a status answer —
//! stopped the pulls too, and nats-server sat idle until the loop came
//! back: a replay alternated between the server delivering and the fold
//! folding instead of doing both at once on the two cores (issue 17).
//! Read here, the pulls go on while the fold works, up to [`AHEAD`]
//! batches.
//!
//! What needs no fold state is done here too, on the other core: each
//! message's place in the log (its metadata) and the replay's use of
//! checkpoints ([`Replay`]: holding a run whole and checking
//! its chain). Nothing changes for what is folded: the same ordered
//! consumer, the same messages in the same order with the same tags, its
//! errors and its end passed on as they come (the loop ends the run on
//! either, as before).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::checkpoint::{Replay, Stored, Tag};
use crate::intake;
use crate::state::EventMeta;

/// Most messages taken from the consumer at once (one batch of the fold).
pub const BATCH: usize = 128;

/// Batches read ahead of the fold: up to `AHEAD × BATCH` messages wait
/// (8,192: what nats-server delivers while the fold settles a run), plus
/// a checkpointed run being held.
pub const AHEAD: usize = 64;

/// A message of the log with its place: the message, its metadata, and
/// how many more the consumer held after it.
pub type Placed = (jetstream::Message, EventMeta, u64);

/// What the fold takes next.
#[derive(Debug, Default)]
pub struct Ready {
    /// Messages to fold, in log order, each checked one by one or vouched
    /// for by a checkpoint.
    pub events: Vec<(Placed, Tag)>,
    /// Checkpoints (their own sequences) found not to match their runs,
    /// for the fold's [`Judge`](crate::checkpoint::Judge), before any of `events`.
    pub mismatched: Vec<u64>,
}

/// The feed's receiving end, owned by the loop.
pub struct Feed {
    rx: mpsc::Receiver<anyhow::Result<Ready>>,
    task: tokio::task::JoinHandle<()>,
    held: Arc<AtomicU64>,
}

impl Feed {
    /// The next messages to fold; `None` when the consumer ended.
    pub async fn recv(&mut self) -> Option<anyhow::Result<Ready>> {
        self.rx.recv().await
    }

    /// The last message delivered and held for its checkpoint's run
    /// (not folded yet), if any: progress for the stall check, which
    /// would otherwise take a run being held for a consumer that stopped
    /// delivering.
    pub fn last_held(&self) -> Option<u64> {
        Some(self.held.load(Ordering::Relaxed)).filter(|s| *s > 0)
    }

    /// Stops reading. Must be called before the client is dropped (an
    /// ordered consumer polled after that panics: FACTS.md).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads `messages` on a task of its own, placing each message and
/// passing it through `replay`.
pub fn read_ahead(messages: pull::Ordered, mut replay: Replay<Placed>) -> Feed {
    let (tx, rx) = mpsc::channel(AHEAD);
    let held = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn({
        let held = held.clone();
        async move {
            let mut batches = messages.ready_chunks(BATCH);
            while let Some(batch) = batches.next().await {
                let ready = place(batch, &mut replay);
                held.store(replay.last_held().unwrap_or(0), Ordering::Relaxed);
                let failed = ready.is_err();
                if tx.send(ready).await.is_err() || failed {
                    return;
                }
            }
        }
    });
    Feed { rx, task, held }
}

/// One batch from the consumer: placed, and held or tagged by `replay`.
fn place(
    batch: Vec<Result<jetstream::Message, pull::OrderedError>>,
    replay: &mut Replay<Placed>,
) -> anyhow::Result<Ready> {
    let mut ready = Ready {
        events: Vec::with_capacity(batch.len()),
        mismatched: Vec::new(),
    };
    let done = replay.is_done();
    for msg in batch {
        let msg = msg.map_err(|e| anyhow::anyhow!("event consumer failed: {e}"))?;
        let (meta, pending) = intake::meta_of(&msg)?;
        if done {
            ready.events.push(((msg, meta, pending), Tag::Check));
        } else {
            replay.push(
                meta.seq,
                pending,
                (msg, meta, pending),
                &mut ready.events,
                |seq, (m, _, _)| Stored {
                    seq,
                    subject: m.subject.as_str(),
                    headers: m.headers.as_ref(),
                    payload: &m.payload,
                },
            );
        }
    }
    ready.mismatched = replay.take_mismatched();
    Ok(ready)
}
