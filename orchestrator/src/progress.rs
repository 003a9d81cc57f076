//! The fold's progress through the log: when a replay has caught up, when
//! a snapshot is due, and when the consumer has stalled.
//!
//! These decide when the loop may act at all (nothing is done for events
//! of a replay, and no lease is taken before the fold is caught up), so
//! they are kept pure like the other rules: the loop passes in sequence
//! numbers and acts on the answers.

/// Where the fold is, against where the log was when this run started.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The stream's last sequence when this run started: the replay ends there.
    replay_until: u64,
    caught_up: bool,
    /// Events folded between snapshots (0: never).
    snapshot_every: u64,
    /// Where the last snapshot was taken (or the fold started).
    snapshot_seq: u64,
    /// Where the fold was at the previous stall check.
    checked_seq: u64,
}

impl Progress {
    /// The stream held `messages` events, up to `stream_last`, when this
    /// run started; the fold starts at `from_seq` (the snapshot's last
    /// sequence, 0 without one). An empty log, or a snapshot that already
    /// reaches the end, is caught up from the start: no event will come to
    /// say so.
    pub fn new(messages: u64, stream_last: u64, from_seq: u64, snapshot_every: u64) -> Self {
        Progress {
            replay_until: stream_last,
            caught_up: messages == 0 || (from_seq > 0 && from_seq >= stream_last),
            snapshot_every,
            snapshot_seq: from_seq,
            checked_seq: from_seq,
        }
    }

    /// Whether the fold has caught up with the log (it follows it live).
    pub fn caught_up(&self) -> bool {
        self.caught_up
    }

    /// The event at `seq` was folded, with `pending` more waiting for the
    /// consumer. Returns true when this event caught the fold up: it
    /// reached where the log ended at start, or nothing more is waiting
    /// (the start sequence may have been purged).
    pub fn folded(&mut self, seq: u64, pending: u64) -> bool {
        if self.caught_up || (seq < self.replay_until && pending > 0) {
            return false;
        }
        self.caught_up = true;
        true
    }

    /// Nothing is stored after the fold any more (the log's last events
    /// were removed: refused events, purged material), so no event will
    /// come to say it caught up. Returns true when this caught it up.
    pub fn reached_end(&mut self) -> bool {
        let was = self.caught_up;
        self.caught_up = true;
        !was
    }

    /// Whether a snapshot of the fold at `folded` is due: caught up, and
    /// `snapshot_every` events folded since the last one.
    pub fn snapshot_due(&self, folded: u64) -> bool {
        self.caught_up
            && self.snapshot_every > 0
            && folded >= self.snapshot_seq.saturating_add(self.snapshot_every)
    }

    /// A snapshot of the fold at `folded` is being saved.
    pub fn snapshot_started(&mut self, folded: u64) {
        self.snapshot_seq = folded;
    }

    /// The periodic stall check, with the fold at `folded`: whether it has
    /// not moved since the previous check. Only then is the stream asked
    /// how far it is ([`stalled`]).
    pub fn idle_since_last_check(&mut self, folded: u64) -> bool {
        let idle = folded == self.checked_seq;
        self.checked_seq = folded;
        idle
    }
}

/// Whether a fold idle at `folded` is stalled: the stream holds an event
/// past it (`next_stored`, the first stored after it) that the consumer
/// does not deliver (as after the NATS node serving the consumer died).
/// The run then ends, and the next one starts a fresh consumer. The
/// stream's last sequence is not enough: it stays where it was when the
/// last events are removed.
pub fn stalled(folded: u64, next_stored: Option<u64>) -> bool {
    next_stored.is_some_and(|next| next > folded)
}

#[cfg(test)]
mod tests {
    //! Given where the log and the fold are, when events are folded, then
    //! this progress.
    use super::*;

    #[test]
    fn an_empty_log_is_caught_up_from_the_start() {
        assert!(Progress::new(0, 0, 0, 100).caught_up());
        // Purged to empty, its sequence still counting: caught up too.
        assert!(Progress::new(0, 57, 0, 100).caught_up());
    }

    #[test]
    fn a_snapshot_at_the_end_of_the_log_is_caught_up_from_the_start() {
        assert!(Progress::new(10, 10, 10, 100).caught_up());
        assert!(!Progress::new(10, 10, 8, 100).caught_up());
    }

    #[test]
    fn a_replay_catches_up_at_the_last_event_of_the_log() {
        // Given a log of 5 events
        let mut p = Progress::new(5, 5, 0, 100);
        assert!(!p.caught_up());
        // When events 1 to 4 are folded, more pending
        for seq in 1..5 {
            assert!(!p.folded(seq, 5 - seq));
        }
        assert!(!p.caught_up());
        // Then the 5th catches the fold up, once
        assert!(p.folded(5, 0));
        assert!(p.caught_up());
        assert!(!p.folded(6, 0));
    }

    #[test]
    fn nothing_pending_also_means_caught_up() {
        // The log's last events were purged: the fold never sees seq 9.
        let mut p = Progress::new(6, 9, 0, 100);
        assert!(!p.folded(3, 2));
        assert!(p.folded(5, 0));
    }

    #[test]
    fn a_snapshot_is_due_every_so_many_events_once_caught_up() {
        let mut p = Progress::new(0, 0, 0, 100);
        assert!(!p.snapshot_due(99));
        assert!(p.snapshot_due(100));
        p.snapshot_started(130);
        assert!(!p.snapshot_due(229));
        assert!(p.snapshot_due(230));
        // Never while replaying, never with snapshots off.
        let replaying = Progress::new(500, 500, 0, 100);
        assert!(!replaying.snapshot_due(300));
        let off = Progress::new(0, 0, 0, 0);
        assert!(!off.snapshot_due(1_000_000));
    }

    #[test]
    fn a_fold_that_does_not_move_while_the_stream_does_is_stalled() {
        let mut p = Progress::new(0, 0, 40, 100);
        // The first check after start: idle since the fold started at 40.
        assert!(p.idle_since_last_check(40));
        assert!(!stalled(40, None), "nothing new in the stream");
        assert!(!p.idle_since_last_check(45));
        assert!(p.idle_since_last_check(45));
        assert!(stalled(45, Some(46)));
    }

    #[test]
    fn a_log_whose_tail_was_removed_is_not_a_stall_and_ends_the_replay() {
        // Given a snapshot at 10 and a log that ended at 14, whose events
        // 11 to 14 were refused and removed: no event will come.
        let mut p = Progress::new(3, 14, 10, 100);
        assert!(!p.caught_up());
        // The stream's last sequence is past the fold, but nothing is stored there.
        assert!(!stalled(10, None));
        // Then the replay is over, once.
        assert!(p.reached_end());
        assert!(p.caught_up());
        assert!(!p.reached_end());
    }
}
