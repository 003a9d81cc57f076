//! Carrying out actions: the only I/O between a decision and its effect.
//!
//! What the messages are and under which ids is planned by [`plan`]; the
//! executor only reads back the `KeyCreated`s a window of clones needs,
//! publishes each step through the [`Publisher`], and runs the two stream
//! operations (purging a deleted key's material, withdrawing a removed
//! member's queue). Anything that fails here ends the run (crash-only):
//! the restart's reconcile plans the same steps under the same ids.

use std::collections::HashMap;

use async_nats::jetstream;
use futures::StreamExt;
use keysync_schemas::{decode, encode, Envelope, Event, KeyCreated, KeyId, Subjects};

use crate::backlog::Backlog;
use crate::decide::Action;
use crate::plan::{self, CloneWindow, Step};
use crate::prometheus::Metrics;
use crate::publisher::Publisher;
use crate::state::ClusterState;

/// `KeyCreated`s read back from the stream at once.
const FETCH_AHEAD: usize = 64;

/// Carries out planned steps.
pub struct Executor {
    /// Publishes (and signs) every message.
    pub publisher: Publisher,
    js: jetstream::Context,
    events: jetstream::stream::Stream,
    subjects: Subjects,
    metrics: Metrics,
    /// Large fan-outs, carried out a window per turn of the loop.
    backlog: Backlog,
}

impl Executor {
    /// An executor publishing through `publisher`, reading `KeyCreated`s
    /// from (and purging) the `events` stream, counting commands in `metrics`.
    pub fn new(
        publisher: Publisher,
        js: jetstream::Context,
        events: jetstream::stream::Stream,
        subjects: Subjects,
        metrics: Metrics,
    ) -> Self {
        Executor {
            publisher,
            js,
            events,
            subjects,
            metrics,
            backlog: Backlog::default(),
        }
    }

    /// Carries out `actions` as [`plan::plan`] lays them out: the steps
    /// other than clones, in order, then the clones window by window, each
    /// window's `KeyCreated`s fetched (pipelined) just before its commands
    /// are planned, so at most a window of them is held. `known` are the
    /// `KeyCreated`s at hand (the feed batch's), by sequence, so their
    /// clones need not fetch them back from the stream.
    pub async fn execute(
        &mut self,
        state: &ClusterState,
        actions: Vec<Action>,
        known: &HashMap<u64, KeyCreated>,
    ) -> anyhow::Result<()> {
        let work = plan::sort(actions);
        for action in &work.others {
            if let Some(step) = plan::step(self.publisher.ids(), state, action) {
                self.carry_out(step).await?;
            }
        }
        let at_seq = state.last_seq();
        if Backlog::defers(&work.windows) {
            self.backlog.push(work.windows, at_seq);
            tracing::info!(
                backlog = self.backlog.clones(),
                "large fan-out queued: carried out a window at a time"
            );
            return Ok(());
        }
        for window in &work.windows {
            self.carry_out_window(window, known, at_seq).await?;
        }
        Ok(())
    }

    /// Whether clone windows wait in the backlog ([`Executor::next_window`]).
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Carries out the backlog's next window still wanted by `state`.
    pub async fn next_window(&mut self, state: &ClusterState) -> anyhow::Result<()> {
        if let Some((window, at_seq)) = self.backlog.next(state) {
            self.carry_out_window(&window, &HashMap::new(), at_seq)
                .await?;
            if self.backlog.is_empty() {
                tracing::info!("fan-out backlog done");
            }
        }
        Ok(())
    }

    /// Fetches a window's `KeyCreated`s and publishes its commands.
    async fn carry_out_window(
        &mut self,
        window: &CloneWindow,
        known: &HashMap<u64, KeyCreated>,
        at_seq: u64,
    ) -> anyhow::Result<()> {
        let created = self.fetch_window(window, known).await;
        let steps = plan::clone_commands(self.publisher.ids(), window, &created, at_seq);
        for step in steps {
            self.carry_out(step).await?;
        }
        Ok(())
    }

    /// The `KeyCreated`s a window of clones comes from, by sequence: read
    /// back from the stream, [`FETCH_AHEAD`] at a time, except those
    /// `known`.
    async fn fetch_window(
        &self,
        window: &CloneWindow,
        known: &HashMap<u64, KeyCreated>,
    ) -> HashMap<u64, KeyCreated> {
        let mut found = HashMap::with_capacity(window.clones.len());
        let mut needed = Vec::with_capacity(window.clones.len());
        for (seq, key_id) in &window.clones {
            match known.get(seq).filter(|c| c.key_id == *key_id) {
                Some(c) => {
                    found.insert(*seq, c.clone());
                }
                None => needed.push((*seq, *key_id)),
            }
        }
        let fetched: Vec<(u64, KeyCreated)> = futures::stream::iter(needed)
            .map(|(seq, key_id)| async move { (seq, self.fetch_created(seq, key_id).await) })
            .buffered(FETCH_AHEAD)
            .filter_map(|(seq, c)| async move { c.map(|c| (seq, c)) })
            .collect()
            .await;
        found.extend(fetched);
        found
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

    /// Carries out one planned step.
    async fn carry_out(&mut self, step: Step) -> anyhow::Result<()> {
        let source = self.publisher.source();
        match step {
            Step::Command { msg_id, command } => {
                let subject = self.subjects.commands_for(command.target());
                self.metrics.command_sent(&command);
                let key_id = command.key_id();
                let env = Envelope::new(source, command);
                self.publisher
                    .publish(subject, msg_id, encode(&env)?, key_id)
                    .await
            }
            Step::Announce { msg_id, replicated } => {
                let subject = self.subjects.key_replicated(&replicated.key_id);
                let key_id = Some(replicated.key_id);
                let env = Envelope::new(source, Event::KeyReplicated(replicated));
                self.publisher
                    .publish(subject, msg_id, encode(&env)?, key_id)
                    .await
            }
            Step::Purge { key_id } => {
                // Crypto-shredding: the key's wrapped material leaves the log.
                let subject = self.subjects.key_created(&key_id);
                let purged = self.events.purge().filter(subject).await?;
                tracing::info!(%key_id, purged = purged.purged, "purged a deleted key's material from the stream");
                Ok(())
            }
            Step::Withdraw { target } => {
                // A removed HSM gets none of what was queued for it.
                let stream = self.js.get_stream(self.subjects.commands_stream()).await?;
                let purged = stream
                    .purge()
                    .filter(self.subjects.commands_for(&target))
                    .await?;
                let consumer = self.subjects.agent_consumer(&target);
                if let Err(e) = stream.delete_consumer(&consumer).await {
                    tracing::info!(%target, error = %e, "no command consumer to delete");
                }
                tracing::warn!(%target, withdrawn = purged.purged, "HSM removed: its queued commands are withdrawn");
                Ok(())
            }
        }
    }
}
