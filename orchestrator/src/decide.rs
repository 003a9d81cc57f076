//! What to do about an event: pure decisions over [`ClusterState`].
//!
//! [`decide`] runs after [`ClusterState::apply`] for live events;
//! [`reconcile`] runs once after a replay and re-derives every outstanding
//! action from the state alone. Both are idempotent in effect: commands
//! carry deterministic `Nats-Msg-Id`s and agents apply a clone twice as a
//! no-op, so deciding again after a crash never does anything twice with a
//! different effect.

use keysync_schemas::subjects::KeySubject;
use keysync_schemas::{Event, HsmId, KeyId};

use crate::state::{Change, ClusterState, EventMeta, KeyState};

/// An action for the NATS loop to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Queue a `CloneKey` for `target`, built from the `KeyCreated` at
    /// `created_seq`.
    SendClone {
        /// Target HSM.
        target: HsmId,
        /// The key.
        key_id: KeyId,
        /// Where its `KeyCreated` is in the stream.
        created_seq: u64,
        /// An anti-entropy repair: sent under a repair message id (see
        /// [`crate::plan::MsgId::Repair`]), so JetStream does not drop it as
        /// a duplicate of the original clone.
        repair: bool,
    },
    /// Queue a `DeleteKey` for `target`.
    SendDelete {
        /// Target HSM.
        target: HsmId,
        /// The key.
        key_id: KeyId,
    },
    /// Purge the key's wrapped material (its `created` subject) from the
    /// events stream.
    Purge {
        /// The key.
        key_id: KeyId,
    },
    /// Publish `KeyReplicated`.
    AnnounceReplicated {
        /// The key.
        key_id: KeyId,
        /// Sync latency, nanoseconds.
        latency_ns: u64,
    },
    /// Withdraw a removed HSM's queued commands (purge its command subject
    /// and delete its consumer).
    Withdraw {
        /// The removed HSM.
        target: HsmId,
    },
}

/// Whether an event's subject names what its body says (so per-key subject
/// filters, and purges, see every event about a key).
pub fn subject_matches(subject: Option<KeySubject>, event: &Event) -> bool {
    match (subject, event) {
        (Some(KeySubject::Created(k)), Event::KeyCreated(c)) => k == c.key_id,
        (Some(KeySubject::Applied(k, h)), Event::CloneApplied(a)) => k == a.key_id && h == a.hsm,
        (Some(KeySubject::Failed(k, h)), Event::CloneFailed(f)) => k == f.key_id && h == f.hsm,
        (Some(KeySubject::Replicated(k)), Event::KeyReplicated(r)) => k == r.key_id,
        (Some(KeySubject::HsmJoined(h)), Event::HsmJoined(j)) => h == j.hsm,
        (Some(KeySubject::HsmCapabilities(h)), Event::HsmCapabilities(c)) => h == c.hsm,
        (Some(KeySubject::HsmFailed(h)), Event::HsmFailed(f)) => h == f.hsm,
        (Some(KeySubject::HsmRecovered(h)), Event::HsmRecovered(r)) => h == r.hsm,
        (Some(KeySubject::Deleted(k)), Event::KeyDeleted(d)) => k == d.key_id,
        (Some(KeySubject::Erased(k, h)), Event::KeyErased(e)) => k == e.key_id && h == e.hsm,
        (Some(KeySubject::HsmEnrolled(h)), Event::HsmEnrolled(e)) => h == e.hsm,
        (Some(KeySubject::HsmRevoked(h)), Event::HsmRevoked(r)) => h == r.hsm,
        (Some(KeySubject::JoinToken(h)), Event::JoinTokenIssued(t)) => h == t.hsm,
        (Some(KeySubject::JoinRequested(h)), Event::JoinRequested(j)) => h == j.hsm,
        (Some(KeySubject::Checkpoint), Event::Checkpoint(_)) => true,
        (Some(KeySubject::HsmApplied(h)), Event::ClonesApplied(b)) => h == b.hsm,
        _ => false,
    }
}

fn clones_for(state: &ClusterState, key_id: KeyId, key: &KeyState, out: &mut Vec<Action>) {
    for idx in state.missing(key).iter() {
        if let Some(m) = state.member_at(idx) {
            out.push(Action::SendClone {
                target: m.hsm.clone(),
                key_id,
                created_seq: key.created_seq,
                repair: false,
            });
        }
    }
}

fn deletes_for(state: &ClusterState, key_id: KeyId, key: &KeyState, out: &mut Vec<Action>) {
    for idx in key.holders.iter() {
        if let Some(m) = state.member_at(idx) {
            out.push(Action::SendDelete {
                target: m.hsm.clone(),
                key_id,
            });
        }
    }
}

fn announcement(key_id: KeyId, key: &KeyState) -> Option<Action> {
    match key.completed {
        Some((_, latency_ns)) if !key.announced && !key.deleted => {
            Some(Action::AnnounceReplicated { key_id, latency_ns })
        }
        _ => None,
    }
}

/// Actions caused by one live event, already applied to `state` with
/// result `change`.
pub fn decide(
    state: &ClusterState,
    meta: EventMeta,
    event: &Event,
    change: &Change,
) -> Vec<Action> {
    let mut out = Vec::new();
    match (event, change) {
        (Event::KeyCreated(c), _) => {
            if let Some(key) = state.key(&c.key_id) {
                // Only the first KeyCreated fans out; a republished one is a no-op.
                if key.created_seq == meta.seq && !key.deleted {
                    clones_for(state, c.key_id, key, &mut out);
                    out.extend(announcement(c.key_id, key));
                }
            }
        }
        (
            Event::CloneApplied(a),
            Change::Held {
                completed: true, ..
            },
        ) => {
            if let Some(key) = state.key(&a.key_id) {
                out.extend(announcement(a.key_id, key));
            }
        }
        (Event::ClonesApplied(b), Change::Batch(changes)) => {
            // Decided as the `CloneApplied`s it stands for, in order.
            for (a, change) in b.units().zip(changes) {
                out.extend(decide(state, meta, &Event::CloneApplied(a), change));
            }
        }
        (Event::HsmJoined(j), Change::NewMember(idx)) => {
            // A new member is sent every live key. A returning member is
            // sent nothing: its durable queue kept its commands, and
            // anti-entropy repairs anything else.
            let mut keys: Vec<(&KeyId, &KeyState)> = state
                .keys()
                .filter(|(_, k)| {
                    !k.deleted && !k.holders.contains(*idx) && state.can_hold(*idx, k.key_type)
                })
                .collect();
            keys.sort_by_key(|(_, k)| k.created_seq);
            for (key_id, key) in keys {
                out.push(Action::SendClone {
                    target: j.hsm.clone(),
                    key_id: *key_id,
                    created_seq: key.created_seq,
                    repair: false,
                });
            }
        }
        (
            Event::HsmCapabilities(c),
            Change::Capabilities {
                gained, completed, ..
            },
        ) => {
            // It can hold these types now: send it their live keys, oldest
            // first, as to a new member.
            let mut keys: Vec<(&KeyId, &KeyState)> = state
                .keys()
                .filter(|(_, k)| !k.deleted && gained.contains(&k.key_type))
                .filter(|(_, k)| {
                    state
                        .member_index(&c.hsm)
                        .is_some_and(|i| !k.holders.contains(i) && !k.failed.contains(i))
                })
                .collect();
            keys.sort_by_key(|(_, k)| k.created_seq);
            for (key_id, key) in keys {
                out.push(Action::SendClone {
                    target: c.hsm.clone(),
                    key_id: *key_id,
                    created_seq: key.created_seq,
                    repair: false,
                });
            }
            for (key_id, _) in completed {
                if let Some(key) = state.key(key_id) {
                    out.extend(announcement(*key_id, key));
                }
            }
        }
        (Event::HsmFailed(_), Change::Completed(done)) => {
            for (key_id, _) in done {
                if let Some(key) = state.key(key_id) {
                    out.extend(announcement(*key_id, key));
                }
            }
        }
        (Event::HsmRevoked(r), Change::Revoked(_, done)) => {
            // Its queued commands (wrapped keys) are withdrawn.
            out.push(Action::Withdraw {
                target: r.hsm.clone(),
            });
            for (key_id, _) in done {
                if let Some(key) = state.key(key_id) {
                    out.extend(announcement(*key_id, key));
                }
            }
        }
        (Event::KeyDeleted(d), Change::Deleted) => {
            out.push(Action::Purge { key_id: d.key_id });
            if let Some(key) = state.key(&d.key_id) {
                // Everyone else erases it; members that never held it keep
                // the tombstone, so a late clone cannot bring it back.
                for (idx, m) in state.members().enumerate() {
                    if m.hsm != d.hsm || key.holders.contains(idx as u8) {
                        out.push(Action::SendDelete {
                            target: m.hsm.clone(),
                            key_id: d.key_id,
                        });
                    }
                }
            }
        }
        _ => {}
    }
    out
}

/// Every action still outstanding in `state`: run once after replaying the
/// log (or on taking over), to finish what a previous run may have left
/// half done.
pub fn reconcile(state: &ClusterState) -> Vec<Action> {
    let mut out = Vec::new();
    let mut keys: Vec<(&KeyId, &KeyState)> = state.keys().collect();
    keys.sort_by_key(|(_, k)| k.created_seq);
    for (key_id, key) in keys {
        if key.deleted {
            if !key.holders.is_empty() {
                // Deletion under way: make sure of the purge and the erasures.
                out.push(Action::Purge { key_id: *key_id });
                deletes_for(state, *key_id, key, &mut out);
            }
            continue;
        }
        clones_for(state, *key_id, key, &mut out);
        out.extend(announcement(*key_id, key));
    }
    out
}

#[cfg(test)]
mod tests {
    //! Given events, when one more arrives, then these actions.
    use super::*;
    use crate::testkit::{
        applied, capabilities, created, created_with, deleted, erased, failed, hsm, joined, meta,
    };
    use keysync_schemas::{
        CloneFailed, CloneFailure, Durability, Fingerprint, KeyReplicated, KeyType, MemberState,
    };

    /// A tiny log: applies events in order with sequences 1, 2, ... and
    /// stream times 1 ms apart; returns the actions of the last one.
    struct Log {
        state: ClusterState,
        seq: u64,
    }

    impl Log {
        fn given(events: &[Event]) -> Self {
            let mut log = Log {
                state: ClusterState::default(),
                seq: 0,
            };
            for e in events {
                log.when(e);
            }
            log
        }

        fn when(&mut self, e: &Event) -> Vec<Action> {
            self.seq += 1;
            let meta = meta(self.seq);
            match self.state.apply(meta, e) {
                Ok(change) => decide(&self.state, meta, e, &change),
                Err(_) => Vec::new(),
            }
        }
    }

    fn clone_to(h: &str, k: KeyId, seq: u64) -> Action {
        Action::SendClone {
            target: hsm(h),
            key_id: k,
            created_seq: seq,
            repair: false,
        }
    }

    #[test]
    fn a_new_key_fans_out_to_every_other_member() {
        let k = KeyId::new();
        let mut log = Log::given(&[joined("a"), joined("b"), joined("c")]);
        let actions = log.when(&created(k, "b", 1));
        assert_eq!(actions, vec![clone_to("a", k, 4), clone_to("c", k, 4)]);
    }

    #[test]
    fn the_last_apply_announces_replication_with_stream_latency() {
        let k = KeyId::new();
        let mut log = Log::given(&[joined("a"), joined("b"), joined("c"), created(k, "a", 1)]);
        assert!(log.when(&applied(k, "b", 1)).is_empty());
        assert_eq!(
            log.when(&applied(k, "c", 1)),
            vec![Action::AnnounceReplicated {
                key_id: k,
                latency_ns: 2_000_000
            }]
        );
        // A duplicate apply announces nothing more.
        assert!(log.when(&applied(k, "c", 1)).is_empty());
        assert_eq!(log.state.status().replicated, 1);
        assert_eq!(log.state.status().pending_clones, 0);
    }

    #[test]
    fn a_republished_create_does_not_fan_out_twice() {
        let k = KeyId::new();
        let mut log = Log::given(&[joined("a"), joined("b"), created(k, "a", 1)]);
        assert!(log.when(&created(k, "a", 1)).is_empty());
        // Another fingerprint under the same id is rejected and counted.
        assert!(log.when(&created(k, "a", 2)).is_empty());
        assert_eq!(
            log.state.status().rejected,
            vec![(keysync_schemas::RejectReason::ConflictingCreate, 1)]
        );
    }

    #[test]
    fn a_joining_member_is_sent_every_key_it_lacks() {
        let (k1, k2) = (KeyId::new(), KeyId::new());
        let mut log = Log::given(&[
            joined("a"),
            joined("b"),
            created(k1, "a", 1),
            applied(k1, "b", 1),
            created(k2, "b", 2),
        ]);
        let mut actions = log.when(&joined("c"));
        actions.sort_by_key(|a| format!("{a:?}"));
        let mut want = vec![clone_to("c", k1, 3), clone_to("c", k2, 5)];
        want.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(actions, want);
        let status = log.state.status();
        assert_eq!(status.members[2].lag, 2);
    }

    /// Every type but Ed25519 (the test keys' type): SoftHSM 2.6.1.
    const NO_ED25519: [KeyType; 3] = [KeyType::P256, KeyType::Aes256, KeyType::Rsa2048];

    #[test]
    fn a_key_is_not_sent_to_a_member_that_cannot_hold_its_type_and_all_means_the_able_ones() {
        let k = KeyId::new();
        let mut log = Log::given(&[
            joined("a"),
            joined("b"),
            joined("c"),
            capabilities("c", &NO_ED25519),
        ]);
        // Given c cannot hold Ed25519, when an Ed25519 key asking for
        // `all` is made on a, then only b is sent it...
        let actions = log.when(&created_with(k, "a", 1, Durability::All));
        assert_eq!(actions, vec![clone_to("b", k, 5)]);
        assert_eq!(log.state.below_durability(), 1);
        // ...and b's apply completes it and meets `all`.
        assert_eq!(
            log.when(&applied(k, "b", 1)),
            vec![Action::AnnounceReplicated {
                key_id: k,
                latency_ns: 1_000_000
            }]
        );
        assert_eq!(log.state.below_durability(), 0);
        let status = log.state.status();
        assert_eq!(status.pending_clones, 0);
        assert_eq!(status.members[2].lag, 0);
        assert_eq!(status.members[2].cannot_hold, vec![KeyType::Ed25519]);
        assert_eq!(log.state.member_state(2), MemberState::InService);
        assert!(status.members[0].cannot_hold.is_empty());

        // When c announces it can hold every type, then it is sent the key.
        assert_eq!(
            log.when(&capabilities("c", &KeyType::ALL)),
            vec![clone_to("c", k, 5)]
        );
        assert_eq!(log.state.status().members[2].lag, 1);
    }

    #[test]
    fn a_member_that_can_no_longer_hold_a_type_no_longer_holds_up_its_keys() {
        let k = KeyId::new();
        let mut log = Log::given(&[
            joined("a"),
            joined("b"),
            joined("c"),
            created(k, "a", 1),
            applied(k, "b", 1),
        ]);
        assert_eq!(log.state.completed_count(), 0);
        assert_eq!(
            log.when(&capabilities("c", &NO_ED25519)),
            vec![Action::AnnounceReplicated {
                key_id: k,
                latency_ns: 2_000_000
            }]
        );
        assert_eq!(log.state.completed_count(), 1);
    }

    #[test]
    fn capabilities_announced_before_the_first_join_apply_to_the_new_member() {
        let k = KeyId::new();
        let mut log = Log::given(&[joined("a"), created(k, "a", 1)]);
        // The agent announces what it holds, then joins: it is sent no
        // key it cannot hold.
        assert!(log.when(&capabilities("d", &NO_ED25519)).is_empty());
        assert!(log.when(&joined("d")).is_empty());
        assert_eq!(
            log.state.status().members[1].cannot_hold,
            vec![KeyType::Ed25519]
        );
        assert_eq!(log.state.member_state(1), MemberState::InService);
    }

    #[test]
    fn wrong_fingerprints_and_strangers_change_nothing() {
        let k = KeyId::new();
        let mut log = Log::given(&[joined("a"), joined("b"), created(k, "a", 1)]);
        assert!(log.when(&applied(k, "b", 9)).is_empty());
        assert!(log.when(&applied(k, "zz", 1)).is_empty());
        assert!(log.when(&applied(KeyId::new(), "b", 1)).is_empty());
        let status = log.state.status();
        assert_eq!(status.members[1].keys, 0);
        assert_eq!(
            status.rejected,
            vec![
                (keysync_schemas::RejectReason::UnknownMember, 1),
                (keysync_schemas::RejectReason::UnknownKey, 1),
                (keysync_schemas::RejectReason::FingerprintMismatch, 1)
            ]
        );
    }

    /// Announcements of `actions`, by key.
    fn announced(actions: &[Action]) -> Vec<KeyId> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::AnnounceReplicated { key_id, .. } => Some(*key_id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_batch_of_applied_clones_folds_and_decides_as_its_clones_one_by_one() {
        // Given three members and three keys created on a, one of which b
        // already applied alone,
        let (k1, k2, k3) = (KeyId::new(), KeyId::new(), KeyId::new());
        let given = [
            joined("a"),
            joined("b"),
            joined("c"),
            created_with(k1, "a", 1, Durability::Replicas(2)),
            created(k2, "a", 2),
            created(k3, "a", 3),
            applied(k1, "c", 1),
        ];
        let mut batched = Log::given(&given);
        let mut single = Log::given(&given);
        // when b applies all three in one batch event,
        let from_batch = batched.when(&crate::testkit::batch_applied(
            "b",
            &[(k1, 1), (k2, 2), (k3, 3)],
        ));
        let mut from_singles = Vec::new();
        for (k, fp) in [(k1, 1), (k2, 2), (k3, 3)] {
            from_singles.extend(single.when(&applied(k, "b", fp)));
        }
        // then the state and the actions are those of the three
        // CloneApplied: k1 is complete (on a, b, c) and announced, k2 and
        // k3 still miss c,
        assert_eq!(announced(&from_batch), vec![k1]);
        assert_eq!(announced(&from_batch), announced(&from_singles));
        let (b, s) = (batched.state.status(), single.state.status());
        assert_eq!(b.members, s.members);
        assert_eq!(b.pending_clones, s.pending_clones);
        assert_eq!(b.below_durability, 0);
        for k in [k1, k2, k3] {
            let key = batched.state.key(&k).expect("known");
            assert!(key.holders.contains(1), "b holds {k}");
        }
        assert!(batched.state.key(&k1).expect("k1").completed.is_some());
        assert!(batched.state.key(&k2).expect("k2").completed.is_none());
        // and a batch again (a redelivery) changes nothing and decides
        // nothing.
        let again = batched.when(&crate::testkit::batch_applied("b", &[(k2, 2), (k3, 3)]));
        assert!(again.is_empty());
        assert_eq!(batched.state.status().members, b.members);
    }

    #[test]
    fn a_batch_with_one_bad_entry_is_refused_whole_and_changes_nothing() {
        let (k1, k2) = (KeyId::new(), KeyId::new());
        let mut log = Log::given(&[
            joined("a"),
            joined("b"),
            created(k1, "a", 1),
            created(k2, "a", 2),
        ]);
        let before = log.state.status();
        // A wrong fingerprint, an unknown key, a stranger, a key twice, no
        // key, and one key too many:
        let too_many: Vec<(KeyId, u8)> = (0..=keysync_schemas::MAX_APPLIED_PER_EVENT)
            .map(|_| (k1, 1))
            .collect();
        for bad in [
            crate::testkit::batch_applied("b", &[(k1, 1), (k2, 9)]),
            crate::testkit::batch_applied("b", &[(k1, 1), (KeyId::new(), 1)]),
            crate::testkit::batch_applied("zz", &[(k1, 1)]),
            crate::testkit::batch_applied("b", &[(k1, 1), (k2, 2), (k1, 1)]),
            crate::testkit::batch_applied("b", &[]),
            crate::testkit::batch_applied("b", &too_many),
        ] {
            assert!(log.when(&bad).is_empty());
        }
        let after = log.state.status();
        assert_eq!(after.members, before.members, "no entry was folded");
        assert_eq!(after.pending_clones, before.pending_clones);
        use keysync_schemas::RejectReason as R;
        assert_eq!(
            after.rejected,
            vec![
                (R::UnknownMember, 1),
                (R::UnknownKey, 1),
                (R::FingerprintMismatch, 1),
                (R::BatchSize, 2),
                (R::BatchDuplicate, 1),
            ]
        );
    }

    #[test]
    fn a_failed_clone_is_not_pending_and_not_resent() {
        let k = KeyId::new();
        let mut log = Log::given(&[joined("a"), joined("b"), created(k, "a", 1)]);
        log.when(&Event::CloneFailed(CloneFailed {
            key_id: k,
            hsm: hsm("b"),
            reason: CloneFailure::WrongDomain,
        }));
        assert_eq!(log.state.status().pending_clones, 0);
        assert_eq!(log.state.status().clone_failures, 1);
        assert!(reconcile(&log.state).is_empty());
    }

    #[test]
    fn a_passing_clone_failure_in_the_log_leaves_the_clone_pending_for_reconcile() {
        // Given an older agent that logged a full disk as CloneFailed,
        let k = KeyId::new();
        let log = Log::given(&[
            joined("a"),
            joined("b"),
            created(k, "a", 1),
            Event::CloneFailed(CloneFailed {
                key_id: k,
                hsm: hsm("b"),
                reason: CloneFailure::Storage("No space left on device".into()),
            }),
        ]);
        // then the failure is not final: the clone is still outstanding,
        // is not counted as a failure, and a restart sends it again.
        assert_eq!(log.state.pending_clones(), 1);
        assert_eq!(log.state.clone_failures(), 0);
        assert_eq!(reconcile(&log.state), vec![clone_to("b", k, 3)]);
        // A permanent failure is final.
        let mut log = log;
        log.when(&crate::testkit::clone_failed(k, "b"));
        assert_eq!(log.state.pending_clones(), 0);
        assert_eq!(log.state.clone_failures(), 1);
        assert!(reconcile(&log.state).is_empty());
    }

    #[test]
    fn reconcile_after_replay_finishes_what_was_left() {
        let (k1, k2) = (KeyId::new(), KeyId::new());
        // k1 is fully applied but its KeyReplicated never made it to the
        // log; k2 reached only its creator before the crash.
        let log = Log::given(&[
            joined("a"),
            joined("b"),
            created(k1, "a", 1),
            applied(k1, "b", 1),
            created(k2, "a", 2),
        ]);
        assert_eq!(
            reconcile(&log.state),
            vec![
                Action::AnnounceReplicated {
                    key_id: k1,
                    latency_ns: 1_000_000
                },
                clone_to("b", k2, 5)
            ]
        );
        // Once KeyReplicated is in the log, nothing is left to do for k1.
        let mut log = log;
        log.when(&Event::KeyReplicated(KeyReplicated {
            key_id: k1,
            fingerprint: Fingerprint([1; 32]),
            holders: vec![hsm("a"), hsm("b")],
            sync_latency_micros: 1000,
            created_seq: 3,
        }));
        assert_eq!(reconcile(&log.state), vec![clone_to("b", k2, 5)]);
    }

    #[test]
    fn requested_durability_is_tracked_until_met() {
        let (k1, k2, k3) = (KeyId::new(), KeyId::new(), KeyId::new());
        let mut log = Log::given(&[joined("a"), joined("b"), joined("c")]);
        log.when(&created_with(k1, "a", 1, Durability::Replicas(2)));
        log.when(&created_with(k2, "a", 2, Durability::All));
        log.when(&created_with(k3, "a", 3, Durability::Logged));
        assert_eq!(log.state.below_durability(), 2);
        log.when(&applied(k1, "b", 1));
        assert_eq!(log.state.below_durability(), 1);
        log.when(&applied(k2, "b", 2));
        log.when(&applied(k2, "b", 2));
        assert_eq!(log.state.below_durability(), 1);
        log.when(&applied(k2, "c", 2));
        assert_eq!(log.state.below_durability(), 0);
        let s = log.state.status();
        assert_eq!((s.keys, s.replicated, s.pending_clones), (3, 1, 3));
        let held: Vec<u64> = s.members.iter().map(|m| m.keys).collect();
        assert_eq!(held, vec![3, 2, 1]);
        assert_eq!(s.below_durability, 0);
    }

    #[test]
    fn apply_reports_what_changed() {
        let k = KeyId::new();
        let mut log = Log::given(&[joined("a"), joined("b"), created(k, "a", 1)]);
        let meta = EventMeta {
            seq: 10,
            stored_at_ns: 7_000_000,
        };
        assert_eq!(
            log.state.apply(meta, &applied(k, "b", 1)),
            Ok(crate::state::Change::Held {
                member: 1,
                latency_ns: 4_000_000,
                completed: true
            })
        );
        assert_eq!(
            log.state.apply(meta, &applied(k, "b", 1)),
            Ok(crate::state::Change::Other)
        );
    }

    #[test]
    fn a_failed_member_no_longer_holds_up_replication() {
        let k = KeyId::new();
        let mut log = Log::given(&[
            joined("a"),
            joined("b"),
            joined("c"),
            created(k, "a", 1),
            applied(k, "b", 1),
        ]);
        let actions = log.when(&failed("c"));
        assert_eq!(
            actions,
            vec![Action::AnnounceReplicated {
                key_id: k,
                latency_ns: 2_000_000
            }]
        );
        let s = log.state.status();
        assert_eq!(s.members[2].state, keysync_schemas::MemberState::Failed);
        // Its clone stays queued: still pending, and new keys still go to it.
        assert_eq!(s.pending_clones, 1);
        let k2 = KeyId::new();
        assert_eq!(
            log.when(&created(k2, "a", 2)),
            vec![clone_to("b", k2, 7), clone_to("c", k2, 7)]
        );
        // Back: a returning member is sent nothing (its queue kept it all).
        assert!(log.when(&joined("c")).is_empty());
        assert_eq!(
            log.state.member_state(2),
            keysync_schemas::MemberState::Syncing
        );
    }

    #[test]
    fn deletion_purges_erases_everywhere_and_never_resurrects() {
        let k = KeyId::new();
        let mut log = Log::given(&[
            joined("a"),
            joined("b"),
            joined("c"),
            created(k, "a", 1),
            applied(k, "b", 1),
        ]);
        let actions = log.when(&deleted(k, "b", 1));
        assert_eq!(
            actions,
            vec![
                Action::Purge { key_id: k },
                Action::SendDelete {
                    target: hsm("a"),
                    key_id: k
                },
                Action::SendDelete {
                    target: hsm("c"),
                    key_id: k
                },
            ]
        );
        let s = log.state.status();
        assert_eq!((s.keys, s.pending_clones), (0, 0));
        assert_eq!(log.state.digest_of(1), Default::default());
        // A late clone result and a republished create change nothing (the
        // create is refused, and so never cloned).
        assert!(log.when(&applied(k, "c", 1)).is_empty());
        assert!(log.when(&created(k, "a", 1)).is_empty());
        assert_eq!(log.state.status().keys, 0);
        assert!(log
            .state
            .status()
            .rejected
            .contains(&(keysync_schemas::RejectReason::CreateOfDeletedKey, 1)));
        // Reconcile finishes the erasure still under way...
        assert_eq!(
            reconcile(&log.state),
            vec![
                Action::Purge { key_id: k },
                Action::SendDelete {
                    target: hsm("a"),
                    key_id: k
                }
            ]
        );
        log.when(&erased(k, "a"));
        assert!(reconcile(&log.state).is_empty());
        // ...and a new member is never sent it.
        assert!(log.when(&joined("d")).is_empty());
    }

    #[test]
    fn subjects_must_match_bodies() {
        let s = keysync_schemas::Subjects::default();
        let k = KeyId::new();
        let e = created(k, "a", 1);
        assert!(subject_matches(s.parse_event(&s.key_created(&k)), &e));
        assert!(!subject_matches(
            s.parse_event(&s.key_created(&KeyId::new())),
            &e
        ));
        assert!(!subject_matches(s.parse_event(&s.key_replicated(&k)), &e));
        assert!(!subject_matches(None, &e));
    }
}
