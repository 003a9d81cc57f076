//! The clone backlog: a large fan-out (a member joining a cluster of a
//! million keys, a restart's reconcile, a big repair) carried out a window
//! at a time between the loop's other work, not in one go.
//!
//! Carried out inline, the fan-out of an `HsmJoined` into 100,000 keys held
//! the loop for 15–35 s (release, 2 shared cores), and 1,000,000 keys for
//! minutes: no event folded (new keys went unreplicated), no status
//! answered, no heartbeat read, so that when it finished the busy members
//! were declared failed (`silent_ms=99668`) and had to be recovered
//! (decision 23). Queued here instead, the loop plans and publishes one
//! [`CloneWindow`] per turn, as one of its `select!` branches: events,
//! heartbeats and status requests are served between windows.
//!
//! A window is checked against the fold when it is taken, not when it was
//! queued: clones of keys deleted meanwhile, or (for a fan-out, not a
//! repair) already applied by the target, are left out, and a window for a
//! member that left is dropped. The queue is the loop's knowledge only:
//! after a crash, the next run's reconcile plans what is still outstanding
//! under the same message ids ([`crate::plan`]), so nothing is lost or
//! doubled by not persisting it.
//!
//! Pure: no I/O; the executor takes windows and publishes them.

use std::collections::VecDeque;

use crate::plan::CloneWindow;
use crate::state::ClusterState;

/// Clones carried out inline; more in one go go to the backlog. The live
/// fan-out of a whole feed batch (128 `KeyCreated`s, decision 21) to 32
/// HSMs (3,968 clones) stays inline; a bootstrap of more keys does not.
pub const INLINE_CLONES: usize = 4096;

/// Windows of clones waiting for the loop's turns, in the order planned.
#[derive(Debug, Default, Clone)]
pub struct Backlog {
    windows: VecDeque<(CloneWindow, u64)>,
    clones: usize,
}

impl Backlog {
    /// Whether `windows` are too many clones to carry out inline.
    pub fn defers(windows: &[CloneWindow]) -> bool {
        windows.iter().map(|w| w.clones.len()).sum::<usize>() > INLINE_CLONES
    }

    /// Queues `windows`, planned when the fold was at `at_seq`.
    pub fn push(&mut self, windows: Vec<CloneWindow>, at_seq: u64) {
        for w in windows {
            self.clones += w.clones.len();
            self.windows.push_back((w, at_seq));
        }
    }

    /// Whether a window waits.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Clones waiting (for the log line and a gauge).
    pub fn clones(&self) -> usize {
        self.clones
    }

    /// The next window still wanted by `state`, with the sequence it was
    /// planned at; windows left empty by the check are skipped.
    pub fn next(&mut self, state: &ClusterState) -> Option<(CloneWindow, u64)> {
        while let Some((mut w, at_seq)) = self.windows.pop_front() {
            self.clones -= w.clones.len();
            let Some(idx) = state
                .member_index(&w.target)
                .filter(|i| state.member_at(*i).is_some_and(|m| !m.revoked))
            else {
                continue;
            };
            w.clones.retain(|(_, key_id)| {
                state.key(key_id).is_some_and(|k| {
                    // A repair is for a key the log says the member holds
                    // and it does not: holding it in the log is the point.
                    !k.deleted && (w.repair || !k.holders.contains(idx))
                })
            });
            if !w.clones.is_empty() {
                return Some((w, at_seq));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    //! Given a fold and queued windows, when the loop takes the next one,
    //! then only what is still wanted comes out.
    use super::*;
    use crate::testkit::*;
    use keysync_schemas::{Event, KeyId};

    fn fold(events: &[Event]) -> ClusterState {
        let mut s = ClusterState::default();
        for (i, e) in events.iter().enumerate() {
            let seq = i as u64 + 1;
            s.apply(meta(seq), e).expect("applies");
        }
        s
    }

    fn seq_of(s: &ClusterState, k: KeyId) -> u64 {
        s.key(&k).expect("known").created_seq
    }

    fn window(target: &str, repair: bool, clones: Vec<(u64, KeyId)>) -> CloneWindow {
        CloneWindow {
            target: hsm(target),
            repair,
            clones,
        }
    }

    #[test]
    fn a_bootstrap_is_deferred_and_a_keys_fan_out_is_not() {
        let keys: Vec<(u64, KeyId)> = (1..=4097).map(|i| (i, KeyId::new())).collect();
        let big: Vec<CloneWindow> = keys
            .chunks(512)
            .map(|c| window("b", false, c.to_vec()))
            .collect();
        assert!(Backlog::defers(&big));
        // A feed batch of 128 keys to 31 other members.
        let fan_out: Vec<CloneWindow> = (0..31)
            .map(|i| window(&format!("h{i}"), false, keys[..128].to_vec()))
            .collect();
        assert!(!Backlog::defers(&fan_out));
    }

    #[test]
    fn windows_come_out_in_order_less_what_the_fold_no_longer_wants() {
        let (k1, k2, k3, k4) = (KeyId::new(), KeyId::new(), KeyId::new(), KeyId::new());
        let mut state = fold(&[
            joined("a"),
            created(k1, "a", 1),
            created(k2, "a", 2),
            created(k3, "a", 3),
            created(k4, "a", 4),
            joined("b"),
        ]);
        let clones: Vec<(u64, KeyId)> = [k1, k2, k3, k4]
            .iter()
            .map(|k| (seq_of(&state, *k), *k))
            .collect();
        let mut backlog = Backlog::default();
        backlog.push(
            vec![
                window("b", false, clones[..2].to_vec()),
                window("b", false, clones[2..].to_vec()),
            ],
            6,
        );
        assert_eq!(backlog.clones(), 4);
        // Meanwhile b applied k1 (a live fan-out reached it) and k4 was
        // deleted.
        let mut seq = 6;
        for e in [applied(k1, "b", 1), deleted(k4, "a", 4)] {
            seq += 1;
            state.apply(meta(seq), &e).expect("applies");
        }
        let (w, at) = backlog.next(&state).expect("first window");
        assert_eq!((w.clones, at), (vec![clones[1]], 6));
        let (w, _) = backlog.next(&state).expect("second window");
        assert_eq!(w.clones, vec![clones[2]]);
        assert!(backlog.next(&state).is_none());
        assert!(backlog.is_empty());
        assert_eq!(backlog.clones(), 0);
    }

    #[test]
    fn a_repair_is_sent_though_the_log_says_the_member_holds_the_key() {
        let k = KeyId::new();
        let state = fold(&[
            joined("a"),
            joined("b"),
            created(k, "a", 1),
            applied(k, "b", 1),
        ]);
        let mut backlog = Backlog::default();
        let pos = (seq_of(&state, k), k);
        backlog.push(
            vec![window("b", true, vec![pos]), window("b", false, vec![pos])],
            4,
        );
        let (w, _) = backlog.next(&state).expect("the repair");
        assert!(w.repair);
        assert!(backlog.next(&state).is_none(), "the fan-out is moot");
    }

    #[test]
    fn windows_for_a_member_that_is_not_one_are_dropped() {
        let k = KeyId::new();
        let state = fold(&[joined("a"), created(k, "a", 1)]);
        let mut backlog = Backlog::default();
        backlog.push(vec![window("gone", false, vec![(2, k)])], 2);
        assert!(backlog.next(&state).is_none());
        assert_eq!(backlog.clones(), 0);
    }
}
