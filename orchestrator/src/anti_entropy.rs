//! Anti-entropy: noticing that a member's store drifted from what the log
//! says it holds, and what to send it to repair that.
//!
//! Each heartbeat carries the agent's key count and an order-free digest
//! of its keys; the fold keeps the same pair for what the log says each
//! member holds ([`ClusterState::digest_of`]). A difference is normal for a
//! moment (a clone applied whose `CloneApplied` is not folded yet), so a
//! member is repaired only after the same difference shows in
//! [`AntiEntropy::new`]'s `repair_after` heartbeats in a row; a member with
//! clones outstanding is given ten times as long, since it is expected to
//! differ while it works through its queue. A repair first reads the
//! member's inventory (I/O, in the loop) and then sends what [`repairs`]
//! computes from it.
//!
//! Everything here is pure: the loop passes each heartbeat in and carries
//! out what comes back.

use std::collections::HashMap;

use keysync_schemas::{Fingerprint, HsmId, InventoryDigest, KeyId};

use crate::decide::Action;
use crate::state::{ClusterState, KeyState};

/// A member's store, as a heartbeat reports it or as the log says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inventory {
    /// Live keys held.
    pub keys: u64,
    /// Digest of the keys held.
    pub digest: InventoryDigest,
}

/// What one heartbeat's inventory means for its member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The member holds what the log says.
    InSync,
    /// It differs, the same way for `in_a_row` heartbeats; it is repaired
    /// at `patience`.
    Differs {
        /// Heartbeats in a row showing this same difference.
        in_a_row: u32,
        /// Heartbeats in a row after which it is repaired.
        patience: u32,
    },
    /// Repair it now: read its inventory and send [`repairs`].
    Repair,
    /// Not judged: the fold is more than [`MAX_UNFOLDED`] events behind
    /// the log, so what the member reports may already be in the log
    /// unfolded (its `CloneApplied`s of a bootstrap) and a difference
    /// means nothing yet. The count in a row is left as it was.
    Behind,
}

/// Events the fold may be behind the log for a heartbeat to be judged.
/// While a member bootstraps 100,000 keys on a busy machine the fold can
/// trail the log by tens of seconds; a member that had applied all of
/// them was then "repaired" with all of them again (every key it held,
/// unknown to the lagging fold), which queued more work and slowed the
/// fold further (decision 23).
pub const MAX_UNFOLDED: u64 = 1000;

/// One difference: (what the agent reported, the digest the log expected).
/// The same difference again means no progress was made.
type Difference = (Inventory, InventoryDigest);

/// Counts, per member, the heartbeats in a row that showed one difference.
#[derive(Debug, Clone)]
pub struct AntiEntropy {
    repair_after: u32,
    differences: HashMap<HsmId, (Difference, u32)>,
}

impl AntiEntropy {
    /// Repairs after `repair_after` identical differences in a row (ten
    /// times as many while clones are outstanding for the member).
    pub fn new(repair_after: u32) -> Self {
        AntiEntropy {
            repair_after,
            differences: HashMap::new(),
        }
    }

    /// A heartbeat from `hsm` reported `reported`; the log expects
    /// `expected`, and `pending` clones for it are outstanding.
    ///
    /// A difference counts only if it is the very same as the previous
    /// heartbeat's: an agent that changes (applies clones, even slowly) is
    /// making progress and is left alone. A match, or a repair, starts the
    /// count afresh.
    pub fn observe(
        &mut self,
        hsm: &HsmId,
        reported: Inventory,
        expected: Inventory,
        pending: u64,
    ) -> Verdict {
        if reported == expected {
            self.differences.remove(hsm);
            return Verdict::InSync;
        }
        let seen = (reported, expected.digest);
        let entry = self.differences.entry(hsm.clone()).or_insert((seen, 0));
        if entry.0 == seen {
            entry.1 = entry.1.saturating_add(1);
        } else {
            *entry = (seen, 1);
        }
        let in_a_row = entry.1;
        // A member with clones outstanding is expected to differ while it
        // applies its queue: it gets ten times longer without progress
        // before it is repaired (a busy machine, not lost commands).
        let patience = if pending > 0 {
            self.repair_after.saturating_mul(10)
        } else {
            self.repair_after
        };
        if in_a_row >= patience {
            self.differences.remove(hsm);
            Verdict::Repair
        } else {
            Verdict::Differs { in_a_row, patience }
        }
    }

    /// [`AntiEntropy::observe`] for member `idx` of `state`: the expected
    /// inventory and the outstanding clones come from the fold, which has
    /// `unfolded` events of the log still to fold ([`Verdict::Behind`]
    /// past [`MAX_UNFOLDED`]).
    pub fn check(
        &mut self,
        state: &ClusterState,
        idx: u8,
        hsm: &HsmId,
        reported: Inventory,
        unfolded: u64,
    ) -> Verdict {
        if unfolded > MAX_UNFOLDED {
            return Verdict::Behind;
        }
        let expected = Inventory {
            keys: state.held_by(idx),
            digest: state.digest_of(idx),
        };
        self.observe(hsm, reported, expected, state.pending_for(idx))
    }
}

/// What `member` must be sent so that its store matches the state, given
/// the inventory it reported. Keys it lacks are cloned again; deleted keys
/// it still holds are erased; live keys it holds unknown to the state are
/// cloned again too (it answers `already_present`, which records it as a
/// holder). Clones are marked `repair`, so they are not mistaken for the
/// original clones JetStream may still remember.
pub fn repairs(
    state: &ClusterState,
    member: &HsmId,
    inventory: &[(KeyId, Fingerprint)],
) -> Vec<Action> {
    let Some(idx) = state.member_index(member) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let held: HashMap<KeyId, Fingerprint> = inventory.iter().copied().collect();
    let mut keys: Vec<(&KeyId, &KeyState)> = state.keys().collect();
    keys.sort_by_key(|(id, k)| (k.created_seq, **id));
    for (key_id, key) in keys {
        let has = held.get(key_id);
        if key.deleted {
            if has.is_some() {
                out.push(Action::SendDelete {
                    target: member.clone(),
                    key_id: *key_id,
                });
            }
            continue;
        }
        // A key of a type it cannot hold is not sent to it, whether it
        // lacks it or holds it unknown to the log.
        if !state.can_hold(idx, key.key_type) {
            continue;
        }
        let lacks = has.is_none();
        let unknown_holder = has == Some(&key.fingerprint) && !key.holders.contains(idx);
        if (lacks || unknown_holder) && key.created_seq > 0 {
            out.push(Action::SendClone {
                target: member.clone(),
                key_id: *key_id,
                created_seq: key.created_seq,
                repair: true,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    //! Given heartbeats so far, when one more comes, then this verdict;
    //! given a state and an inventory, then these repairs.
    use super::*;
    use crate::testkit::*;

    fn inv(keys: u64, byte: u8) -> Inventory {
        Inventory {
            keys,
            digest: InventoryDigest([byte; 32]),
        }
    }

    const REPAIR_AFTER: u32 = 3;

    #[test]
    fn a_fold_behind_the_log_judges_nobody_and_keeps_the_count() {
        let mut log = Log::given(&[joined("a"), joined("b")]);
        let k = KeyId::new();
        log.when(&created(k, "a", 1)).expect("created");
        let mut ae = AntiEntropy::new(REPAIR_AFTER);
        let b = hsm("b");
        let idx = log.state.member_index(&b).expect("b");
        // b reports the key the fold does not know it holds yet.
        let mut digest = InventoryDigest::default();
        digest.toggle(&k, &Fingerprint([1; 32]));
        let reported = Inventory { keys: 1, digest };
        for _ in 0..29 {
            assert!(matches!(
                ae.check(&log.state, idx, &b, reported, 0),
                Verdict::Differs { .. }
            ));
        }
        // The fold falls far behind: no verdict, however long.
        for _ in 0..100 {
            assert_eq!(
                ae.check(&log.state, idx, &b, reported, MAX_UNFOLDED + 1),
                Verdict::Behind
            );
        }
        // Caught up again (and still differing): the count resumes.
        assert_eq!(
            ae.check(&log.state, idx, &b, reported, MAX_UNFOLDED),
            Verdict::Repair
        );
    }

    #[test]
    fn a_member_that_matches_is_in_sync() {
        let mut ae = AntiEntropy::new(REPAIR_AFTER);
        let a = hsm("a");
        for _ in 0..10 {
            assert_eq!(ae.observe(&a, inv(2, 7), inv(2, 7), 0), Verdict::InSync);
        }
    }

    #[test]
    fn the_same_difference_in_a_row_leads_to_a_repair() {
        // Given a member that reports one key fewer than the log says, again and again
        let mut ae = AntiEntropy::new(REPAIR_AFTER);
        let a = hsm("a");
        let verdicts: Vec<Verdict> = (0..4)
            .map(|_| ae.observe(&a, inv(1, 1), inv(2, 2), 0))
            .collect();
        // Then it is repaired at the third, and counting starts afresh
        assert_eq!(
            verdicts,
            vec![
                Verdict::Differs {
                    in_a_row: 1,
                    patience: 3
                },
                Verdict::Differs {
                    in_a_row: 2,
                    patience: 3
                },
                Verdict::Repair,
                Verdict::Differs {
                    in_a_row: 1,
                    patience: 3
                },
            ]
        );
    }

    #[test]
    fn a_changing_difference_is_progress_and_is_not_counted() {
        // Given a member applying its clones: each heartbeat differs anew
        let mut ae = AntiEntropy::new(REPAIR_AFTER);
        let a = hsm("a");
        for held in 0..10u8 {
            let v = ae.observe(&a, inv(u64::from(held), held), inv(10, 10), 0);
            // Then it is never repaired
            assert_eq!(
                v,
                Verdict::Differs {
                    in_a_row: 1,
                    patience: 3
                }
            );
        }
        // Nor when the log moves while the agent stands still.
        for expected in 20..30u8 {
            let v = ae.observe(&a, inv(1, 1), inv(u64::from(expected), expected), 0);
            assert_ne!(v, Verdict::Repair);
        }
    }

    #[test]
    fn a_match_resets_the_count() {
        let mut ae = AntiEntropy::new(REPAIR_AFTER);
        let a = hsm("a");
        ae.observe(&a, inv(1, 1), inv(2, 2), 0);
        ae.observe(&a, inv(1, 1), inv(2, 2), 0);
        assert_eq!(ae.observe(&a, inv(2, 2), inv(2, 2), 0), Verdict::InSync);
        assert_eq!(
            ae.observe(&a, inv(1, 1), inv(2, 2), 0),
            Verdict::Differs {
                in_a_row: 1,
                patience: 3
            }
        );
    }

    #[test]
    fn clones_outstanding_give_ten_times_the_patience() {
        let mut ae = AntiEntropy::new(REPAIR_AFTER);
        let a = hsm("a");
        let verdicts: Vec<Verdict> = (0..30)
            .map(|_| ae.observe(&a, inv(1, 1), inv(2, 2), 5))
            .collect();
        assert_eq!(
            verdicts[28],
            Verdict::Differs {
                in_a_row: 29,
                patience: 30
            }
        );
        assert_eq!(verdicts[29], Verdict::Repair);
        assert_eq!(
            verdicts.iter().filter(|v| **v == Verdict::Repair).count(),
            1
        );
    }

    #[test]
    fn members_are_counted_apart() {
        let mut ae = AntiEntropy::new(2);
        let (a, b) = (hsm("a"), hsm("b"));
        ae.observe(&a, inv(1, 1), inv(2, 2), 0);
        ae.observe(&b, inv(1, 1), inv(2, 2), 0);
        assert_eq!(ae.observe(&a, inv(1, 1), inv(2, 2), 0), Verdict::Repair);
        assert_eq!(ae.observe(&b, inv(1, 1), inv(2, 2), 0), Verdict::Repair);
    }

    #[test]
    fn check_compares_with_what_the_log_says_the_member_holds() {
        let k = KeyId::new();
        let log = Log::given(&[joined("a"), joined("b"), created(k, "a", 1)]);
        let mut digest = InventoryDigest::default();
        digest.toggle(&k, &Fingerprint([1; 32]));
        let mut ae = AntiEntropy::new(1);
        // a holds k, as the log says.
        let a = Inventory { keys: 1, digest };
        assert_eq!(ae.check(&log.state, 0, &hsm("a"), a, 0), Verdict::InSync);
        // b lost nothing but lacks k: outstanding, so patient.
        let b = Inventory {
            keys: 0,
            digest: InventoryDigest::default(),
        };
        assert_eq!(ae.check(&log.state, 1, &hsm("b"), b, 0), Verdict::InSync);
        // b claims k although no apply was folded: it differs, patiently.
        assert_eq!(
            ae.check(&log.state, 1, &hsm("b"), a, 0),
            Verdict::Differs {
                in_a_row: 1,
                patience: 10
            }
        );
    }

    #[test]
    fn repairs_clone_what_is_missing_and_erase_what_is_deleted() {
        let (k1, k2, k3) = (KeyId::new(), KeyId::new(), KeyId::new());
        let log = Log::given(&[
            joined("a"),
            joined("b"),
            created(k1, "a", 1),
            applied(k1, "b", 1),
            created(k2, "a", 2),
            applied(k2, "b", 2),
            created(k3, "a", 3),
            applied(k3, "b", 3),
            deleted(k3, "a", 3),
        ]);
        // b lost k1, still has the deleted k3, and holds k2.
        let inventory = vec![(k2, Fingerprint([2; 32])), (k3, Fingerprint([3; 32]))];
        assert_eq!(
            repairs(&log.state, &hsm("b"), &inventory),
            vec![
                Action::SendClone {
                    target: hsm("b"),
                    key_id: k1,
                    created_seq: 3,
                    repair: true
                },
                Action::SendDelete {
                    target: hsm("b"),
                    key_id: k3
                },
            ]
        );
        let mut all = inventory.clone();
        all.push((k1, Fingerprint([1; 32])));
        all.retain(|(k, _)| *k != k3);
        assert!(repairs(&log.state, &hsm("b"), &all).is_empty());
    }

    #[test]
    fn a_key_held_but_not_recorded_is_cloned_again_to_record_it() {
        let k = KeyId::new();
        let log = Log::given(&[joined("a"), joined("b"), created(k, "a", 1)]);
        // b has k (its CloneApplied was lost): a repair clone makes it say so.
        let inventory = vec![(k, Fingerprint([1; 32]))];
        assert_eq!(
            repairs(&log.state, &hsm("b"), &inventory),
            vec![Action::SendClone {
                target: hsm("b"),
                key_id: k,
                created_seq: 3,
                repair: true
            }]
        );
        // Another key under that id (another fingerprint) is left alone.
        let other = vec![(k, Fingerprint([9; 32]))];
        assert!(repairs(&log.state, &hsm("b"), &other).is_empty());
        // A stranger gets nothing.
        assert!(repairs(&log.state, &hsm("zz"), &[]).is_empty());
    }

    #[test]
    fn repairs_are_the_same_whatever_the_inventory_order() {
        let keys: Vec<KeyId> = (0..5).map(|_| KeyId::new()).collect();
        let mut events = vec![joined("a"), joined("b")];
        for (i, k) in keys.iter().enumerate() {
            events.push(created(*k, "a", i as u8));
        }
        let log = Log::given(&events);
        // b holds two of them unrecorded, and one key the log never saw.
        let inventory: Vec<(KeyId, Fingerprint)> = vec![
            (keys[1], Fingerprint([1; 32])),
            (keys[3], Fingerprint([3; 32])),
            (KeyId::new(), Fingerprint([9; 32])),
        ];
        let mut reversed = inventory.clone();
        reversed.reverse();
        let a = repairs(&log.state, &hsm("b"), &inventory);
        assert_eq!(a, repairs(&log.state, &hsm("b"), &reversed));
        let seqs: Vec<u64> = a
            .iter()
            .filter_map(|x| match x {
                Action::SendClone { created_seq, .. } => Some(*created_seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, vec![3, 4, 5, 6, 7]);
    }

    #[test]
    fn a_key_of_a_type_the_member_cannot_hold_is_never_repaired_onto_it() {
        use keysync_schemas::{Durability, Event, KeyType};
        // Given b cannot hold Ed25519 (the test keys' type) and a P-256 key
        // exists too,
        let (e, p) = (KeyId::new(), KeyId::new());
        let mut p256 = key_created(p, "a", 2, Durability::Logged);
        p256.key_type = KeyType::P256;
        let log = Log::given(&[
            joined("a"),
            joined("b"),
            capabilities("b", &[KeyType::P256, KeyType::Aes256, KeyType::Rsa2048]),
            created(e, "a", 1),
            Event::KeyCreated(p256),
        ]);
        let p_to_b = Action::SendClone {
            target: hsm("b"),
            key_id: p,
            created_seq: 5,
            repair: true,
        };
        // when its inventory is empty, then only the P-256 key is sent,
        assert_eq!(repairs(&log.state, &hsm("b"), &[]), vec![p_to_b.clone()]);
        // and an Ed25519 key it holds unknown to the log is left alone.
        assert_eq!(
            repairs(&log.state, &hsm("b"), &[(e, Fingerprint([1; 32]))]),
            vec![p_to_b]
        );
    }
}
