//! Signed checkpoints in the events log: one signature that vouches for
//! a run of events, so a replay checks one signature per run instead of
//! one per event (decision 22).
//!
//! The active orchestrator checks every event it folds live, one by one.
//! Every [`Rule::every`] events (or when the log goes quiet after a
//! burst) it appends a [`Checkpoint`], signed with the cluster identity,
//! that commits to a SHA-256 chain over the exact stored bytes (subject,
//! message id, signer, signature, payload) of every event it accepted in
//! `(after_seq, through_seq]`, and lists the ones it rejected there with
//! their reasons.
//!
//! A replay reads the checkpoints first (few: one per run), checked like
//! any event (cluster-signed, fresh, on their subject) and placed by
//! [`Judge`]. When it reaches a run one vouches for, it holds the run's
//! events, computes the chain over them ([`vouches`]) and, if it matches,
//! folds them without their Ed25519 checks: their bytes are the bytes an
//! orchestrator of this cluster verified. Every other rule of the fold
//! still runs on each (signer allowed, signer enrolled at that point,
//! freshness, subject, membership rules). The events it lists as rejected
//! are checked one by one as before. An altered, inserted or removed event
//! changes the chain: the whole run is checked one by one, and the
//! checkpoint is refused when the fold reaches it
//! ([`RejectReason::CheckpointMismatch`]). The tail after the last
//! checkpoint is checked one by one.
//!
//! Everything here is pure: it takes the stored bytes, the time and the
//! counts, and returns verdicts.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use keysync_schemas::{headers, Checkpoint, RejectReason, Rejection};
use sha2::{Digest, Sha256};

const DOMAIN: &[u8] = b"keysync-checkpoint-v1\0";

/// When the active orchestrator appends a checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// Events in a run that call for a checkpoint at once.
    pub every: u64,
    /// Quiet this long after the last event: checkpoint what is there ...
    pub idle: Duration,
    /// ... if the run holds at least this many events (a smaller tail
    /// costs a replay little to check one by one).
    pub idle_min: u64,
}

impl Default for Rule {
    fn default() -> Self {
        Rule {
            every: 10_000,
            idle: Duration::from_secs(2),
            idle_min: 256,
        }
    }
}

impl Rule {
    /// Whether a checkpoint is due at `now` for `chain`, whose last event
    /// was folded at `last_event`.
    pub fn due(&self, now: Instant, chain: &Chain, last_event: Instant) -> bool {
        let weight = chain.weight();
        weight >= self.every
            || (weight >= self.idle_min && now.saturating_duration_since(last_event) >= self.idle)
    }
}

/// One stored event, as the chain covers it.
#[derive(Debug, Clone, Copy)]
pub struct Stored<'a> {
    /// Stream sequence.
    pub seq: u64,
    /// Subject.
    pub subject: &'a str,
    /// Headers (message id, signer, signature).
    pub headers: Option<&'a HeaderMap>,
    /// Payload bytes.
    pub payload: &'a [u8],
}

fn field(h: &mut Sha256, bytes: Option<&[u8]>) {
    match bytes {
        None => h.update([0u8]),
        Some(b) => {
            h.update([1u8]);
            h.update((b.len() as u64).to_be_bytes());
            h.update(b);
        }
    }
}

fn absorb(h: &mut Sha256, e: &Stored<'_>) {
    h.update(e.seq.to_be_bytes());
    field(h, Some(e.subject.as_bytes()));
    for name in [headers::MSG_ID, headers::SIGNER, headers::SIGNATURE] {
        let value = e
            .headers
            .and_then(|hm| hm.get(name))
            .map(|v| v.as_str().as_bytes());
        field(h, value);
    }
    field(h, Some(e.payload));
}

/// A run being chained: the events accepted after `after`, and the ones
/// rejected there.
#[derive(Debug, Clone)]
pub struct Chain {
    after: u64,
    hasher: Sha256,
    through: u64,
    accepted: u64,
    /// Events that count towards [`Rule`] (not checkpoints themselves, so
    /// an idle log does not checkpoint its own checkpoints forever).
    weight: u64,
    rejected: Vec<(u64, RejectReason)>,
}

impl Chain {
    /// An empty run of the events after `after`.
    pub fn new(after: u64) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(DOMAIN);
        hasher.update(after.to_be_bytes());
        Chain {
            after,
            hasher,
            through: after,
            accepted: 0,
            weight: 0,
            rejected: Vec::new(),
        }
    }

    /// Where the run starts (exclusive).
    pub fn after(&self) -> u64 {
        self.after
    }

    /// Events towards the rule.
    pub fn weight(&self) -> u64 {
        self.weight
    }

    /// The fold accepted `e` (a checkpoint if `is_checkpoint`). Events at
    /// or before the run's start are not its own.
    pub fn accepted(&mut self, e: &Stored<'_>, is_checkpoint: bool) {
        if e.seq <= self.through {
            return;
        }
        absorb(&mut self.hasher, e);
        self.through = e.seq;
        self.accepted += 1;
        if !is_checkpoint {
            self.weight += 1;
        }
    }

    /// The fold rejected the event at `seq` for `reason`.
    pub fn rejected(&mut self, seq: u64, reason: RejectReason) {
        if seq <= self.through {
            return;
        }
        self.through = seq;
        self.rejected.push((seq, reason));
        self.weight += 1;
    }

    /// The checkpoint for the run so far, if it holds any event.
    pub fn seal(&self) -> Option<Checkpoint> {
        (self.through > self.after).then(|| Checkpoint {
            after_seq: self.after,
            through_seq: self.through,
            accepted: self.accepted,
            chain: self.hasher.clone().finalize().into(),
            rejected: self.rejected.clone(),
        })
    }
}

/// Whether `cp` vouches for `held`, the events stored in its run as a
/// replay reads them (in order; others are ignored): the chain over those
/// it does not list as rejected must be its chain.
pub fn vouches<'a>(
    cp: &Checkpoint,
    held: impl IntoIterator<Item = Stored<'a>>,
) -> Result<(), Rejection> {
    let listed: HashSet<u64> = cp.rejected.iter().map(|(s, _)| *s).collect();
    let mut chain = Chain::new(cp.after_seq);
    for e in held {
        if e.seq > cp.after_seq && e.seq <= cp.through_seq && !listed.contains(&e.seq) {
            chain.accepted(&e, false);
        }
    }
    let got = chain.seal();
    let matches =
        got.as_ref().is_some_and(|g| g.chain == cp.chain) && chain.accepted == cp.accepted;
    if matches {
        Ok(())
    } else {
        Err(Rejection::new(
            RejectReason::CheckpointMismatch,
            format!(
                "the events stored in ({}, {}] are not the {} the checkpoint vouches for (altered, inserted or removed)",
                cp.after_seq, cp.through_seq, cp.accepted
            ),
        ))
    }
}

/// Places checkpoints in the log: each covers a run that ends before it
/// and does not overlap one accepted before; and refuses one whose run a
/// replay found altered.
#[derive(Debug, Default)]
pub struct Judge {
    last_through: u64,
    mismatched: HashSet<u64>,
}

impl Judge {
    /// The checkpoint stored at `seq` found not to match its run.
    pub fn mismatched(&mut self, seq: u64) {
        self.mismatched.insert(seq);
    }

    /// Judges the checkpoint stored at `seq`; accepted, it is the last.
    pub fn judge(&mut self, seq: u64, cp: &Checkpoint) -> Result<(), Rejection> {
        if cp.after_seq >= cp.through_seq || cp.through_seq >= seq {
            return Err(Rejection::new(
                RejectReason::CheckpointOutOfPlace,
                format!(
                    "a checkpoint at {seq} for ({}, {}]: a run must be non-empty and end before its checkpoint",
                    cp.after_seq, cp.through_seq
                ),
            ));
        }
        if cp.after_seq < self.last_through {
            return Err(Rejection::new(
                RejectReason::CheckpointOutOfPlace,
                format!(
                    "a checkpoint for ({}, {}] overlaps the run up to {} another one covers (replayed?)",
                    cp.after_seq, cp.through_seq, self.last_through
                ),
            ));
        }
        if self.mismatched.remove(&seq) {
            return Err(Rejection::new(
                RejectReason::CheckpointMismatch,
                format!(
                    "the events stored in ({}, {}] are not the ones it vouches for",
                    cp.after_seq, cp.through_seq
                ),
            ));
        }
        self.last_through = cp.through_seq;
        Ok(())
    }

    /// The end of the last run accepted.
    pub fn last_through(&self) -> u64 {
        self.last_through
    }
}

/// Longest run (in stream sequences) a replay holds to check as one: a
/// checkpoint over more is not used (its run is checked one by one), so
/// what a replay holds stays bounded whatever a checkpoint says.
pub const MAX_RUN: u64 = 65_536;

/// A checkpoint read ahead of a replay: stored at `at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Voucher {
    /// Its own stream sequence.
    pub at: u64,
    /// What it vouches for.
    pub cp: Checkpoint,
}

/// How a message leaves [`Replay`]: to be checked one by one, or with
/// its signature vouched for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// Check its signature.
    Check,
    /// A checkpoint vouches for it.
    Vouched,
}

/// A replay's use of checkpoints: messages come in log order; those in a
/// run a [`Voucher`] covers are held until the run is whole, then come
/// out vouched for (the chain matches) or to be checked (it does not);
/// the others come out at once. Generic over the message so it is tested
/// without a bus.
#[derive(Debug)]
pub struct Replay<T> {
    vouchers: std::collections::VecDeque<Voucher>,
    held: Vec<(u64, T)>,
    mismatched: Vec<u64>,
}

impl<T> Default for Replay<T> {
    fn default() -> Self {
        Replay {
            vouchers: Default::default(),
            held: Vec::new(),
            mismatched: Vec::new(),
        }
    }
}

impl<T> Replay<T> {
    /// A replay using `vouchers` (in log order, not overlapping; runs
    /// longer than [`MAX_RUN`] are dropped).
    pub fn new(vouchers: impl IntoIterator<Item = Voucher>) -> Self {
        Replay {
            vouchers: vouchers
                .into_iter()
                .filter(|v| v.cp.through_seq.saturating_sub(v.cp.after_seq) <= MAX_RUN)
                .collect(),
            ..Default::default()
        }
    }

    /// Whether nothing is held or expected any more.
    pub fn is_done(&self) -> bool {
        self.vouchers.is_empty() && self.held.is_empty()
    }

    /// The end of the last run a voucher covers, if any.
    pub fn last_through(&self) -> Option<u64> {
        self.vouchers.back().map(|v| v.cp.through_seq)
    }

    /// Checkpoints found not to match their runs since last asked (their
    /// own sequences, for the [`Judge`]).
    pub fn take_mismatched(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.mismatched)
    }

    /// The last message held (delivered, not folded yet): progress for
    /// the stall check, which would otherwise take a run being held for
    /// a consumer that stopped delivering.
    pub fn last_held(&self) -> Option<u64> {
        self.held.last().map(|(s, _)| *s)
    }

    /// The next message, at `seq`, with `pending` more after it on the
    /// consumer now; what can be folded is appended to `out`, in order.
    /// `stored` gives a message's stored bytes.
    pub fn push(
        &mut self,
        seq: u64,
        pending: u64,
        msg: T,
        out: &mut Vec<(T, Tag)>,
        stored: impl Fn(u64, &T) -> Stored<'_>,
    ) {
        if self
            .vouchers
            .front()
            .is_some_and(|v| seq > v.cp.through_seq)
        {
            self.settle(out, &stored);
        }
        // Runs passed with nothing held (all of it removed from the log).
        while self
            .vouchers
            .front()
            .is_some_and(|v| seq > v.cp.through_seq)
        {
            self.vouchers.pop_front();
        }
        match self.vouchers.front() {
            Some(v) if seq > v.cp.after_seq => {
                let last = seq == v.cp.through_seq;
                self.held.push((seq, msg));
                if last || pending == 0 {
                    self.settle(out, &stored);
                }
            }
            _ => out.push((msg, Tag::Check)),
        }
    }

    /// The held run is whole: out, vouched for if its chain matches.
    fn settle(&mut self, out: &mut Vec<(T, Tag)>, stored: &impl Fn(u64, &T) -> Stored<'_>) {
        let Some(v) = self.vouchers.pop_front() else {
            return;
        };
        let held = std::mem::take(&mut self.held);
        let ok = vouches(&v.cp, held.iter().map(|(s, m)| stored(*s, m))).is_ok();
        if !ok {
            tracing::warn!(
                checkpoint = v.at,
                after = v.cp.after_seq,
                through = v.cp.through_seq,
                "a checkpoint does not match the events stored in its run: checking them one by one"
            );
            self.mismatched.push(v.at);
        }
        let listed: HashSet<u64> = v.cp.rejected.iter().map(|(s, _)| *s).collect();
        for (seq, m) in held {
            let tag = if ok && !listed.contains(&seq) {
                Tag::Vouched
            } else {
                Tag::Check
            };
            out.push((m, tag));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored event at `seq` whose bytes depend on `tag`.
    fn headers(tag: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, format!("m-{tag}").as_str());
        h.insert(headers::SIGNER, "hsm/a");
        h.insert(headers::SIGNATURE, format!("sig-{tag}").as_str());
        h
    }

    struct Ev {
        seq: u64,
        subject: String,
        headers: HeaderMap,
        payload: Vec<u8>,
    }

    fn ev(seq: u64) -> Ev {
        Ev {
            seq,
            subject: format!("keysync.evt.key.k{seq}.created"),
            headers: headers(&seq.to_string()),
            payload: vec![seq as u8; 40],
        }
    }

    fn stored(e: &Ev) -> Stored<'_> {
        Stored {
            seq: e.seq,
            subject: &e.subject,
            headers: Some(&e.headers),
            payload: &e.payload,
        }
    }

    /// Given events `after+1..=through` accepted but those in `rejected`:
    /// the checkpoint an active orchestrator seals.
    fn sealed(after: u64, through: u64, rejected: &[u64]) -> (Vec<Ev>, Checkpoint) {
        let mut chain = Chain::new(after);
        let evs: Vec<Ev> = (after + 1..=through).map(ev).collect();
        for e in &evs {
            if rejected.contains(&e.seq) {
                chain.rejected(e.seq, RejectReason::BadSignature);
            } else {
                chain.accepted(&stored(e), false);
            }
        }
        (evs, chain.seal().expect("non-empty"))
    }

    #[test]
    fn a_checkpoint_is_due_every_k_events_or_when_idle_after_a_burst() {
        let rule = Rule {
            every: 100,
            idle: Duration::from_secs(2),
            idle_min: 10,
        };
        let t0 = Instant::now();
        // Given 99 events folded just now: not due.
        let mut chain = Chain::new(0);
        for s in 1..=99 {
            chain.accepted(&stored(&ev(s)), false);
        }
        assert!(!rule.due(t0, &chain, t0));
        // When the 100th is folded: due at once.
        chain.accepted(&stored(&ev(100)), false);
        assert!(rule.due(t0, &chain, t0));
        // Given 12 events and a quiet log: due only after the idle time.
        let mut chain = Chain::new(0);
        for s in 1..=12 {
            chain.accepted(&stored(&ev(s)), false);
        }
        assert!(!rule.due(t0 + Duration::from_millis(1999), &chain, t0));
        assert!(rule.due(t0 + Duration::from_secs(2), &chain, t0));
        // Given fewer than idle_min events, however quiet: not due (the
        // tail is cheap to check one by one).
        let mut chain = Chain::new(0);
        for s in 1..=9 {
            chain.accepted(&stored(&ev(s)), false);
        }
        assert!(!rule.due(t0 + Duration::from_secs(3600), &chain, t0));
        // Given only checkpoints since the last one: never due (an idle
        // log does not checkpoint its own checkpoints).
        let mut chain = Chain::new(0);
        for s in 1..=500 {
            chain.accepted(&stored(&ev(s)), true);
        }
        assert!(!rule.due(t0 + Duration::from_secs(3600), &chain, t0));
        // Rejections count: a flood of junk is checkpointed too.
        let mut chain = Chain::new(0);
        for s in 1..=100 {
            chain.rejected(s, RejectReason::Unsigned);
        }
        assert!(rule.due(t0, &chain, t0));
    }

    #[test]
    fn an_empty_run_seals_nothing_and_events_before_the_run_are_not_its_own() {
        let mut chain = Chain::new(10);
        assert_eq!(chain.seal(), None);
        chain.accepted(&stored(&ev(9)), false);
        chain.accepted(&stored(&ev(10)), false);
        assert_eq!(chain.seal(), None);
        chain.accepted(&stored(&ev(11)), false);
        let cp = chain.seal().expect("one event");
        assert_eq!((cp.after_seq, cp.through_seq, cp.accepted), (10, 11, 1));
    }

    #[test]
    fn the_run_as_stored_is_vouched_for() {
        let (evs, cp) = sealed(100, 120, &[105]);
        assert_eq!(cp.rejected, vec![(105, RejectReason::BadSignature)]);
        assert_eq!(vouches(&cp, evs.iter().map(stored)), Ok(()));
        // The rejected one removed from the log since: still vouched for.
        let without: Vec<&Ev> = evs.iter().filter(|e| e.seq != 105).collect();
        assert_eq!(vouches(&cp, without.into_iter().map(stored)), Ok(()));
    }

    fn mismatch(cp: &Checkpoint, evs: &[Ev]) -> Option<RejectReason> {
        vouches(cp, evs.iter().map(stored)).err().map(|r| r.reason)
    }

    #[test]
    fn an_altered_inserted_or_removed_event_breaks_the_chain() {
        let (evs, cp) = sealed(0, 20, &[]);
        // Altered payload.
        let mut altered = sealed(0, 20, &[]).0;
        altered[4].payload[0] ^= 1;
        assert_eq!(
            mismatch(&cp, &altered),
            Some(RejectReason::CheckpointMismatch)
        );
        // Altered signature header (same payload).
        let mut resigned = sealed(0, 20, &[]).0;
        resigned[7].headers.insert(headers::SIGNATURE, "forged");
        assert_eq!(
            mismatch(&cp, &resigned),
            Some(RejectReason::CheckpointMismatch)
        );
        // Moved to another subject.
        let mut moved = sealed(0, 20, &[]).0;
        moved[3].subject = "keysync.evt.key.other.created".into();
        assert_eq!(
            mismatch(&cp, &moved),
            Some(RejectReason::CheckpointMismatch)
        );
        // Removed.
        let mut removed = sealed(0, 20, &[]).0;
        removed.remove(10);
        assert_eq!(
            mismatch(&cp, &removed),
            Some(RejectReason::CheckpointMismatch)
        );
        // Inserted (a sequence the run did not hold: as if the store had
        // been edited).
        let mut inserted = sealed(0, 20, &[]).0;
        inserted.remove(10);
        let mut forged = ev(11);
        forged.payload = vec![0xee; 40];
        inserted.insert(10, forged);
        assert_eq!(
            mismatch(&cp, &inserted),
            Some(RejectReason::CheckpointMismatch)
        );
        // An event the checkpoint lists as rejected, swapped for another:
        // not vouched for either way (it is checked one by one).
        let (evs2, cp2) = sealed(0, 20, &[5]);
        let mut swapped = sealed(0, 20, &[5]).0;
        swapped[4].payload = vec![1; 3];
        assert_eq!(vouches(&cp2, swapped.iter().map(stored)), Ok(()));
        assert_eq!(vouches(&cp2, evs2.iter().map(stored)), Ok(()));
        // A checkpoint for another run than the one it names.
        let mut shifted = cp.clone();
        shifted.after_seq = 1;
        assert_eq!(
            mismatch(&shifted, &evs),
            Some(RejectReason::CheckpointMismatch)
        );
        // The chain claimed over the run with one event fewer.
        let mut fewer = cp.clone();
        fewer.accepted -= 1;
        assert_eq!(
            mismatch(&fewer, &evs),
            Some(RejectReason::CheckpointMismatch)
        );
    }

    #[test]
    fn checkpoints_must_end_before_themselves_and_not_overlap() {
        let cp = |after, through| Checkpoint {
            after_seq: after,
            through_seq: through,
            accepted: 1,
            chain: [0; 32],
            rejected: Vec::new(),
        };
        let mut judge = Judge::default();
        let out = |r: Result<(), Rejection>| r.err().map(|r| r.reason);
        // Given a checkpoint of (0, 100] stored at 105: accepted.
        assert_eq!(out(judge.judge(105, &cp(0, 100))), None);
        // A run reaching past its own checkpoint, or empty: refused.
        assert_eq!(
            out(judge.judge(150, &cp(100, 150))),
            Some(RejectReason::CheckpointOutOfPlace)
        );
        assert_eq!(
            out(judge.judge(160, &cp(120, 120))),
            Some(RejectReason::CheckpointOutOfPlace)
        );
        // The same checkpoint replayed later (or any overlapping run):
        // refused.
        assert_eq!(
            out(judge.judge(300, &cp(0, 100))),
            Some(RejectReason::CheckpointOutOfPlace)
        );
        assert_eq!(
            out(judge.judge(301, &cp(50, 200))),
            Some(RejectReason::CheckpointOutOfPlace)
        );
        // The next run, starting where the last ended or later: accepted.
        assert_eq!(out(judge.judge(310, &cp(100, 200))), None);
        assert_eq!(out(judge.judge(400, &cp(310, 390))), None);
        assert_eq!(judge.last_through(), 390);
        // One a replay found mismatched: refused when reached.
        judge.mismatched(500);
        assert_eq!(
            out(judge.judge(500, &cp(390, 480))),
            Some(RejectReason::CheckpointMismatch)
        );
        assert_eq!(judge.last_through(), 390);
    }

    /// Drives a replay over `evs` (in order, nothing pending after the
    /// last), returning (seq, tag) as they come out.
    fn run_replay(vouchers: Vec<Voucher>, evs: &[Ev]) -> (Vec<(u64, Tag)>, Vec<u64>) {
        let mut r: Replay<&Ev> = Replay::new(vouchers);
        let mut out = Vec::new();
        for (i, e) in evs.iter().enumerate() {
            let pending = (evs.len() - i - 1) as u64;
            r.push(e.seq, pending, e, &mut out, |_, e| stored(e));
        }
        assert!(r.is_done());
        let tags = out.into_iter().map(|(e, t)| (e.seq, t)).collect();
        (tags, r.take_mismatched())
    }

    #[test]
    fn a_replay_folds_vouched_runs_without_their_signatures_and_checks_the_rest() {
        // Given events 1..=30, a checkpoint of (5, 20] with 9 rejected,
        // stored at 25.
        let (_, cp) = sealed(5, 20, &[9]);
        let evs: Vec<Ev> = (1..=30).map(ev).collect();
        let mut r: Replay<&Ev> = Replay::new(vec![Voucher {
            at: 25,
            cp: cp.clone(),
        }]);
        let mut out = Vec::new();
        for e in &evs[..10] {
            r.push(e.seq, 20, e, &mut out, |_, e| stored(e));
        }
        // While a run is held, its last message is the replay's progress.
        assert_eq!(r.last_held(), Some(10));
        assert_eq!(out.len(), 5);
        let (tags, mismatched) = run_replay(vec![Voucher { at: 25, cp }], &evs);
        // Then they come out in log order; 6..=20 but 9 vouched for.
        assert_eq!(
            tags.iter().map(|t| t.0).collect::<Vec<_>>(),
            (1..=30).collect::<Vec<_>>()
        );
        for (seq, tag) in tags {
            let vouched = (6..=20).contains(&seq) && seq != 9;
            assert_eq!(tag == Tag::Vouched, vouched, "seq {seq}");
        }
        assert!(mismatched.is_empty());
    }

    #[test]
    fn a_replay_checks_a_run_one_by_one_when_its_chain_differs() {
        let (_, cp) = sealed(0, 10, &[]);
        let mut evs: Vec<Ev> = (1..=12).map(ev).collect();
        evs[3].payload[0] ^= 0xff; // altered in the store
        let (tags, mismatched) = run_replay(vec![Voucher { at: 11, cp }], &evs);
        assert!(tags.iter().all(|(_, t)| *t == Tag::Check));
        assert_eq!(tags.len(), 12);
        assert_eq!(mismatched, vec![11]);
        // A run whose last events were removed: settled when nothing is
        // pending, vouched for only if the chain still matches (it does
        // not: they were accepted events).
        let (_, cp) = sealed(0, 10, &[]);
        let evs: Vec<Ev> = (1..=8).map(ev).collect();
        let (tags, mismatched) = run_replay(vec![Voucher { at: 11, cp }], &evs);
        assert_eq!(tags.len(), 8);
        assert!(tags.iter().all(|(_, t)| *t == Tag::Check));
        assert_eq!(mismatched, vec![11]);
    }

    #[test]
    fn a_replay_does_not_hold_a_run_longer_than_the_bound() {
        let cp = Checkpoint {
            after_seq: 0,
            through_seq: MAX_RUN + 1,
            accepted: 1,
            chain: [0; 32],
            rejected: Vec::new(),
        };
        let r: Replay<()> = Replay::new(vec![Voucher {
            at: MAX_RUN + 5,
            cp,
        }]);
        assert!(r.is_done());
    }
}
