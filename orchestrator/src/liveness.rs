//! Liveness: which members are heard from, and which fell silent.
//!
//! Heartbeats travel on core NATS and are never in the log, so when a
//! member was last heard from is knowledge of this process only: it is
//! kept here, not in [`ClusterState`](crate::state::ClusterState), and a
//! new active orchestrator starts it afresh ([`Liveness::start`]). What it
//! concludes, a failure or a recovery, is published as an event and only
//! takes effect when it comes back through the log.
//!
//! Every rule takes `now` from the caller and never reads a clock, so the
//! rules are tested with instants built by hand (`t0 + Duration`), without
//! real processes or real seconds.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use keysync_schemas::{HsmFailed, HsmId, HsmRecovered};

/// How long an announced recovery is given to come back through the log
/// before a heartbeat announces it again. Heartbeats come faster than the
/// log's round trip; without this a recovering member would be announced
/// recovered at every heartbeat until the first announcement is folded.
pub const RECOVERY_DEBOUNCE: Duration = Duration::from_secs(1);

/// When each member was last heard from, and what was announced about it.
#[derive(Debug, Clone)]
pub struct Liveness {
    /// A member silent longer than this is declared failed.
    failure_timeout: Duration,
    /// When each member was last heard from (or counted as heard from).
    last_seen: HashMap<HsmId, Instant>,
    /// Recoveries announced and not yet back through the log.
    recovering: HashMap<HsmId, Instant>,
    /// When the failure check last ran.
    last_tick: Option<Instant>,
}

impl Liveness {
    /// Nobody heard from yet.
    pub fn new(failure_timeout: Duration) -> Self {
        Liveness {
            failure_timeout,
            last_seen: HashMap::new(),
            recovering: HashMap::new(),
            last_tick: None,
        }
    }

    /// This process starts acting (it took the lease): every member counts
    /// as heard from `now`. Heartbeats received while standing by were not
    /// read, so silence is measured from the moment this process listens,
    /// not from whenever the previous holder last heard a member.
    pub fn start<'a>(&mut self, now: Instant, members: impl IntoIterator<Item = &'a HsmId>) {
        for hsm in members {
            self.last_seen.insert(hsm.clone(), now);
        }
        self.last_tick = Some(now);
    }

    /// A member joined (its `HsmJoined` was folded): it is heard from `now`,
    /// so a member that joins and then never sends a heartbeat is still
    /// declared failed one timeout later.
    pub fn joined(&mut self, now: Instant, hsm: &HsmId) {
        self.last_seen.insert(hsm.clone(), now);
    }

    /// A recovery came back through the log: no longer waiting for it, so
    /// a later failure and recovery are announced again.
    pub fn recovered(&mut self, hsm: &HsmId) {
        self.recovering.remove(hsm);
    }

    /// A heartbeat from member `hsm` at `now`; `is_live` is whether the log
    /// counts it live. Returns the recovery to announce: for a member the
    /// log says failed, unless one was announced within
    /// [`RECOVERY_DEBOUNCE`].
    pub fn heard(&mut self, now: Instant, hsm: &HsmId, is_live: bool) -> Option<HsmRecovered> {
        self.last_seen.insert(hsm.clone(), now);
        if is_live {
            return None;
        }
        let announced_lately = self
            .recovering
            .get(hsm)
            .is_some_and(|t| now.saturating_duration_since(*t) <= RECOVERY_DEBOUNCE);
        if announced_lately {
            return None;
        }
        self.recovering.insert(hsm.clone(), now);
        Some(HsmRecovered { hsm: hsm.clone() })
    }

    /// The periodic failure check at `now`, over the members the log counts
    /// live. Returns a failure to announce for each one silent longer than
    /// the timeout, and counts it as heard from `now`, so it is not
    /// announced again until another timeout passes (the announcement makes
    /// it not live once folded; until then it must not repeat).
    ///
    /// A check that comes late (more than half a timeout after the previous
    /// one) means the loop was busy, say with a large fan-out; heartbeats
    /// then wait unread in the subscription, and silence would be
    /// misjudged. Such a round announces nothing and only resets the clock.
    pub fn tick<'a>(
        &mut self,
        now: Instant,
        live_members: impl IntoIterator<Item = &'a HsmId>,
    ) -> Vec<HsmFailed> {
        let busy = self
            .last_tick
            .is_some_and(|t| now.saturating_duration_since(t) > self.failure_timeout / 2);
        self.last_tick = Some(now);
        if busy {
            return Vec::new();
        }
        let mut failed = Vec::new();
        for hsm in live_members {
            // A member never heard from starts its silence now.
            let seen = *self.last_seen.entry(hsm.clone()).or_insert(now);
            let quiet = now.saturating_duration_since(seen);
            if quiet > self.failure_timeout {
                self.last_seen.insert(hsm.clone(), now);
                failed.push(HsmFailed {
                    hsm: hsm.clone(),
                    silent_ms: u64::try_from(quiet.as_millis()).unwrap_or(u64::MAX),
                });
            }
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    //! Given a member heard from at some instant, when time passes and the
    //! checks run, then these announcements. Time is built by hand.
    use super::*;
    use crate::testkit::hsm;

    const TIMEOUT: Duration = Duration::from_secs(5);
    /// The failure check's period in the loop (a quarter of the timeout).
    const TICK: Duration = Duration::from_millis(1250);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs the failure check every [`TICK`] from `from` to `to`
    /// (inclusive) and returns the failures with the time they came.
    fn ticks(
        l: &mut Liveness,
        from: Instant,
        to: Instant,
        members: &[HsmId],
    ) -> Vec<(Duration, HsmFailed)> {
        let mut out = Vec::new();
        let mut t = from;
        while t <= to {
            for f in l.tick(t, members) {
                out.push((t - from, f));
            }
            t += TICK;
        }
        out
    }

    #[test]
    fn a_member_silent_past_the_timeout_fails_once_until_another_timeout() {
        // Given a member heard from when this process started acting
        let t0 = Instant::now();
        let a = hsm("a");
        let mut l = Liveness::new(TIMEOUT);
        l.start(t0, [&a]);
        // When it stays silent, checked every quarter timeout for 12 s
        let failures = ticks(&mut l, t0, t0 + ms(12_000), std::slice::from_ref(&a));
        // Then it is declared failed at the first check past 5 s (6.25 s),
        // and again only one more timeout later (12.5 s is past the end)
        let at: Vec<(Duration, u64)> = failures.iter().map(|(t, f)| (*t, f.silent_ms)).collect();
        assert_eq!(at, vec![(ms(6_250), 6_250)]);
        assert_eq!(failures[0].1.hsm, a);
        let later = l.tick(t0 + ms(12_500), [&a]);
        assert_eq!(
            later.len(),
            1,
            "a second announcement after another timeout"
        );
    }

    #[test]
    fn a_member_heard_from_in_time_never_fails() {
        let t0 = Instant::now();
        let a = hsm("a");
        let mut l = Liveness::new(TIMEOUT);
        l.start(t0, [&a]);
        let mut t = t0;
        for _ in 0..20 {
            t += TICK;
            assert_eq!(l.heard(t, &a, true), None);
            assert!(l.tick(t, [&a]).is_empty());
        }
    }

    #[test]
    fn only_live_members_are_judged() {
        // Given a member the log already counts failed (not passed as live)
        let t0 = Instant::now();
        let a = hsm("a");
        let mut l = Liveness::new(TIMEOUT);
        l.start(t0, [&a]);
        // Then silence does not fail it again
        let none: [&HsmId; 0] = [];
        assert!(ticks(&mut l, t0, t0 + ms(20_000), &[]).is_empty());
        assert!(l.tick(t0 + ms(21_000), none).is_empty());
    }

    #[test]
    fn a_member_never_heard_from_is_timed_from_its_first_check() {
        // Given a member this process has no record of (not in start)
        let t0 = Instant::now();
        let b = hsm("b");
        let mut l = Liveness::new(TIMEOUT);
        l.start(t0, std::iter::empty());
        // Then its silence counts from the first check that sees it
        let failures = ticks(&mut l, t0 + TICK, t0 + ms(8_000), std::slice::from_ref(&b));
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].0, ms(6_250));
    }

    #[test]
    fn a_join_counts_as_being_heard_from() {
        let t0 = Instant::now();
        let a = hsm("a");
        let mut l = Liveness::new(TIMEOUT);
        l.start(t0, [&a]);
        // Given a joins again at 4 s (and heartbeats are then lost)
        assert!(ticks(&mut l, t0, t0 + ms(3_750), std::slice::from_ref(&a)).is_empty());
        l.joined(t0 + ms(4_000), &a);
        // Then the silence counts from the join: failed at the first check
        // past 9 s (10 s, 5 s after these checks began), not past 5 s
        let failures = ticks(
            &mut l,
            t0 + ms(5_000),
            t0 + ms(12_000),
            std::slice::from_ref(&a),
        );
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].0, ms(5_000));
        assert_eq!(failures[0].1.silent_ms, 6_000);
    }

    #[test]
    fn a_failed_member_heard_again_is_announced_recovered_once_per_debounce() {
        let t0 = Instant::now();
        let a = hsm("a");
        let mut l = Liveness::new(TIMEOUT);
        // When a member the log says failed sends heartbeats 300 ms apart
        let announced: Vec<Duration> = (0..8)
            .map(|i| ms(300 * i))
            .filter(|d| l.heard(t0 + *d, &a, false).is_some())
            .collect();
        // Then a recovery is announced at once, and again only once the
        // first had more than the debounce to come back through the log
        assert_eq!(announced, vec![ms(0), ms(1_200)]);
        assert_eq!(
            l.heard(t0 + ms(5_000), &a, false),
            Some(HsmRecovered { hsm: a.clone() })
        );
    }

    #[test]
    fn a_recovery_folded_back_allows_the_next_one_at_once() {
        let t0 = Instant::now();
        let a = hsm("a");
        let mut l = Liveness::new(TIMEOUT);
        assert!(l.heard(t0, &a, false).is_some());
        // Given the recovery came back through the log (and a failed again)
        l.recovered(&a);
        // Then the next heartbeat announces a recovery without waiting
        assert!(l.heard(t0 + ms(100), &a, false).is_some());
        // A live member is never announced recovered.
        l.recovered(&a);
        assert!(l.heard(t0 + ms(200), &a, true).is_none());
    }

    #[test]
    fn a_check_right_after_a_busy_loop_announces_nothing() {
        // Given a member silent for long while the loop was busy
        let t0 = Instant::now();
        let a = hsm("a");
        let mut l = Liveness::new(TIMEOUT);
        l.start(t0, [&a]);
        assert!(l.tick(t0 + TICK, [&a]).is_empty());
        // When the next check comes 8 s late (more than half a timeout)
        // Then it skips, even though a is silent past the timeout
        assert!(l.tick(t0 + TICK + ms(8_000), [&a]).is_empty());
        // And when the heartbeats that waited are then read, nothing fails
        l.heard(t0 + TICK + ms(8_010), &a, true);
        assert!(l.tick(t0 + 2 * TICK + ms(8_000), [&a]).is_empty());
        // Whereas if it then stays silent, on-time checks fail it
        let from = t0 + 3 * TICK + ms(8_000);
        let failures = ticks(&mut l, from, from + ms(5_000), std::slice::from_ref(&a));
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].1.silent_ms, 6_240);
    }

    #[test]
    fn a_check_exactly_half_a_timeout_after_the_last_still_judges() {
        let t0 = Instant::now();
        let a = hsm("a");
        let mut l = Liveness::new(TIMEOUT);
        l.start(t0, [&a]);
        assert!(l.tick(t0 + ms(2_500), [&a]).is_empty());
        assert!(l.tick(t0 + ms(5_000), [&a]).is_empty());
        // 2.5 s after the previous check: exactly half, not more: judged.
        assert_eq!(l.tick(t0 + ms(7_500), [&a]).len(), 1);
    }
}
