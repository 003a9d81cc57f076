//! Command planning: which messages carry out a list of actions, and under
//! which message ids.
//!
//! [`decide`](crate::decide::decide), [`reconcile`](crate::decide::reconcile)
//! and [`repairs`](crate::anti_entropy::repairs) say *what* to do, as
//! [`Action`]s. This module says *in which messages*, purely: given the
//! actions and the `KeyCreated` events their clones come from, it returns
//! [`Step`]s, each a command or event with its message id, or a stream
//! operation. The executor only fetches the `KeyCreated`s a window needs,
//! and publishes.
//!
//! **Batching.** Clones travel in batch commands: one signature and one
//! message for many keys. The batches depend on the set of clones
//! outstanding, never on the order the actions came in: clones are grouped
//! per (target, repair), sorted by `created_seq`, cut into windows of
//! [`CLONE_WINDOW`] (so a plan holds at most that many `KeyCreated`s at a
//! time), and each window is filled greedily up to [`CLONE_BATCH_BYTES`].
//!
//! **Message ids.** JetStream drops a message whose `Nats-Msg-Id` it stored
//! within its duplicate window. A restarted orchestrator re-derives what is
//! outstanding from the log ([`reconcile`](crate::decide::reconcile)) and
//! must publish it under the ids the crashed one used, so that whatever was
//! already published is stored once. So an id is made from the message's
//! content only: a batch's from its target and the (created_seq, key) pairs
//! it carries. The same outstanding set gives the same batches, hence the
//! same ids, whichever process plans them. And since JetStream drops a
//! message under an id someone else stored first, the content is MACed
//! under a key only orchestrators hold ([`MessageIdKey`], derived from the
//! cluster identity): nobody else can tell an id in advance and take it
//! (decision 11). Every id is made by [`message_id`].

use std::collections::{BTreeMap, HashMap};

use keysync_schemas::{
    CloneBatch, CloneKey, Command, DeleteKey, HsmId, KeyCreated, KeyId, KeyReplicated,
    MAX_MESSAGE_BYTES,
};
use keysync_security::MessageIdKey;

use crate::decide::Action;
use crate::state::ClusterState;

/// Bytes of wrapped keys one batch command carries at most (well under
/// the message limit, with room for the envelope).
pub const CLONE_BATCH_BYTES: usize = MAX_MESSAGE_BYTES * 3 / 4;

/// Clones for one target planned together: at most this many `KeyCreated`s
/// are fetched and held at once.
pub const CLONE_WINDOW: usize = 512;

/// Where a clone comes from: its key's `KeyCreated` sequence, and the key.
pub type ClonePos = (u64, KeyId);

/// What a message id is for. [`message_id`] turns it into the id.
#[derive(Debug, Clone, Copy)]
pub enum MsgId<'a> {
    /// One key cloned to one member (a fan-out, a bootstrap of one key).
    Clone {
        /// The key.
        key_id: KeyId,
        /// The member.
        target: &'a HsmId,
    },
    /// Several keys cloned to one member in one command.
    CloneBatch {
        /// The member.
        target: &'a HsmId,
        /// What it carries.
        clones: &'a [ClonePos],
    },
    /// Anti-entropy clones (one or several) for one member, planned when
    /// the fold was at `at_seq`. The log position keeps a repair apart
    /// from an earlier repair of the same keys whose effect is in the log
    /// (a member that lost them twice), while a repair planned again at
    /// the same position, when nothing of the first has come back yet, is
    /// dropped by JetStream as the duplicate it is.
    Repair {
        /// The member.
        target: &'a HsmId,
        /// The fold's last sequence when the repair was planned.
        at_seq: u64,
        /// What it carries.
        clones: &'a [ClonePos],
    },
    /// A key erased on one member.
    Delete {
        /// The key.
        key_id: KeyId,
        /// The member.
        target: &'a HsmId,
    },
    /// A key's `KeyReplicated`: announced once.
    Replicated {
        /// The key.
        key_id: KeyId,
    },
    /// An announcement that is a new fact each time it is made
    /// (`HsmFailed`, `HsmRecovered`): its envelope's id.
    Fact {
        /// The envelope's id.
        envelope_id: uuid::Uuid,
    },
    /// A rejected event filed as a dead letter: once per stream sequence,
    /// however many orchestrators file it.
    DeadLetter {
        /// Its sequence in the events stream.
        seq: u64,
    },
    /// A message sent again because what JetStream holds under its id
    /// `of` is not ours (the publisher checks every duplicate): the
    /// `attempt`th fresh id for it, as deterministic as the first.
    Retry {
        /// The id it was first published under.
        of: &'a str,
        /// 1 for the first retry, and so on.
        attempt: u32,
    },
}

/// The message id for `id`: every `Nats-Msg-Id` the orchestrator publishes
/// is made here. The content is MACed under `ids` (only orchestrators hold
/// it), so an id is reproducible from the log by an orchestrator and by
/// nobody else. Batch and repair ids are order-free. The kind and target
/// stay readable, for people reading the stream.
pub fn message_id(ids: &MessageIdKey, id: MsgId<'_>) -> String {
    match id {
        MsgId::Clone { key_id, target } => format!(
            "clone-{target}-{}",
            ids.tag("clone", &[key_id.0.as_bytes(), target.as_str().as_bytes()])
        ),
        MsgId::CloneBatch { target, clones } => format!(
            "clone-batch-{target}-{}",
            ids.tag(
                "clone-batch",
                &[target.as_str().as_bytes(), &positions(clones)]
            )
        ),
        MsgId::Repair {
            target,
            at_seq,
            clones,
        } => format!(
            "repair-{target}-{}",
            ids.tag(
                "repair",
                &[
                    target.as_str().as_bytes(),
                    &at_seq.to_be_bytes(),
                    &positions(clones)
                ]
            )
        ),
        MsgId::Delete { key_id, target } => format!(
            "delete-{target}-{}",
            ids.tag("delete", &[key_id.0.as_bytes(), target.as_str().as_bytes()])
        ),
        MsgId::Replicated { key_id } => format!(
            "replicated-{}",
            ids.tag("replicated", &[key_id.0.as_bytes()])
        ),
        // Random (UUID v7, 74 random bits): nobody can tell it in advance.
        MsgId::Fact { envelope_id } => envelope_id.to_string(),
        MsgId::DeadLetter { seq } => {
            format!("dlq-event-{}", ids.tag("dlq-event", &[&seq.to_be_bytes()]))
        }
        MsgId::Retry { of, attempt } => format!(
            "retry-{attempt}-{}",
            ids.tag("retry", &[of.as_bytes(), &attempt.to_be_bytes()])
        ),
    }
}

/// The clones carried, in `created_seq` order, as bytes (each 8 + 16).
fn positions(clones: &[ClonePos]) -> Vec<u8> {
    let mut sorted = clones.to_vec();
    sorted.sort_unstable();
    let mut bytes = Vec::with_capacity(sorted.len() * 24);
    for (seq, key) in &sorted {
        bytes.extend_from_slice(&seq.to_be_bytes());
        bytes.extend_from_slice(key.0.as_bytes());
    }
    bytes
}

/// One thing to publish or do, with its message id.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Publish a command on its target's command subject.
    Command {
        /// Its message id.
        msg_id: String,
        /// The command.
        command: Command,
    },
    /// Publish a `KeyReplicated` event.
    Announce {
        /// Its message id.
        msg_id: String,
        /// The event.
        replicated: KeyReplicated,
    },
    /// Purge the key's wrapped material (its `created` subject) from the
    /// events stream.
    Purge {
        /// The key.
        key_id: KeyId,
    },
    /// Withdraw a removed member's queued commands.
    Withdraw {
        /// The member.
        target: HsmId,
    },
}

/// Clones for one target planned together: a window of at most
/// [`CLONE_WINDOW`], in `created_seq` order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneWindow {
    /// The member.
    pub target: HsmId,
    /// Anti-entropy clones (repair ids).
    pub repair: bool,
    /// The clones, sorted, no repeats.
    pub clones: Vec<ClonePos>,
}

/// Actions sorted for planning.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Work {
    /// Everything but clones, in the order given.
    pub others: Vec<Action>,
    /// Clones, per (target, repair) in that order, then by `created_seq`.
    pub windows: Vec<CloneWindow>,
}

/// Sorts actions into clone windows and the rest. The windows depend only
/// on the set of clones, not on the order they came in.
pub fn sort(actions: Vec<Action>) -> Work {
    let mut clones: BTreeMap<(HsmId, bool), Vec<ClonePos>> = BTreeMap::new();
    let mut others = Vec::new();
    for action in actions {
        match action {
            Action::SendClone {
                target,
                key_id,
                created_seq,
                repair,
            } => clones
                .entry((target, repair))
                .or_default()
                .push((created_seq, key_id)),
            other => others.push(other),
        }
    }
    let mut windows = Vec::new();
    for ((target, repair), mut list) in clones {
        list.sort_unstable();
        list.dedup();
        for chunk in list.chunks(CLONE_WINDOW) {
            windows.push(CloneWindow {
                target: target.clone(),
                repair,
                clones: chunk.to_vec(),
            });
        }
    }
    Work { others, windows }
}

/// What one clone of `key` adds to a batch command, about.
fn clone_size(key: &KeyCreated) -> usize {
    key.wrapped.len()
        + key.public_key.as_ref().map_or(0, Vec::len)
        + key.attributes.label.as_ref().map_or(0, String::len)
        + key.attributes.app_id.as_ref().map_or(0, Vec::len)
        + 160
}

/// The commands for one window of clones, given the `KeyCreated` events
/// they come from, by sequence. A clone whose `KeyCreated` is not given (it
/// was purged: the key was deleted meanwhile) is left out, and is not part
/// of any id. `at_seq` is the fold's last sequence; only repair ids depend
/// on it.
///
/// Batches are filled in `created_seq` order up to [`CLONE_BATCH_BYTES`]
/// (a key larger than that goes alone). A batch of one is a plain
/// `CloneKey`.
pub fn clone_commands(
    ids: &MessageIdKey,
    window: &CloneWindow,
    created: &HashMap<u64, KeyCreated>,
    at_seq: u64,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut batch: Vec<CloneKey> = Vec::new();
    let mut bytes = 0;
    for (seq, key_id) in &window.clones {
        let Some(key) = created.get(seq).filter(|c| c.key_id == *key_id) else {
            continue;
        };
        let size = clone_size(key);
        if !batch.is_empty() && bytes + size > CLONE_BATCH_BYTES {
            steps.extend(batch_command(
                ids,
                window,
                std::mem::take(&mut batch),
                at_seq,
            ));
            bytes = 0;
        }
        bytes += size;
        batch.push(CloneKey {
            target: window.target.clone(),
            created_seq: *seq,
            key: key.clone(),
        });
    }
    steps.extend(batch_command(ids, window, batch, at_seq));
    steps
}

/// One command for `clones` (none for none), with its id.
fn batch_command(
    ids: &MessageIdKey,
    window: &CloneWindow,
    mut clones: Vec<CloneKey>,
    at_seq: u64,
) -> Option<Step> {
    let carried: Vec<ClonePos> = clones
        .iter()
        .map(|c| (c.created_seq, c.key.key_id))
        .collect();
    let target = &window.target;
    let msg_id = match carried.as_slice() {
        [] => return None,
        _ if window.repair => message_id(
            ids,
            MsgId::Repair {
                target,
                at_seq,
                clones: &carried,
            },
        ),
        [(_, key_id)] => message_id(
            ids,
            MsgId::Clone {
                key_id: *key_id,
                target,
            },
        ),
        _ => message_id(
            ids,
            MsgId::CloneBatch {
                target,
                clones: &carried,
            },
        ),
    };
    let command = match clones.pop() {
        Some(single) if clones.is_empty() => Command::CloneKey(single),
        Some(last) => {
            clones.push(last);
            Command::CloneBatch(CloneBatch {
                target: target.clone(),
                clones,
            })
        }
        None => return None,
    };
    Some(Step::Command { msg_id, command })
}

/// The step for an action other than a clone. `None` for a clone (they
/// are planned in windows, [`clone_commands`]) and for an announcement of
/// a key the state no longer knows.
pub fn step(ids: &MessageIdKey, state: &ClusterState, action: &Action) -> Option<Step> {
    match action {
        Action::SendClone { .. } => None,
        Action::SendDelete { target, key_id } => Some(Step::Command {
            msg_id: message_id(
                ids,
                MsgId::Delete {
                    key_id: *key_id,
                    target,
                },
            ),
            command: Command::DeleteKey(DeleteKey {
                target: target.clone(),
                key_id: *key_id,
            }),
        }),
        Action::Purge { key_id } => Some(Step::Purge { key_id: *key_id }),
        Action::Withdraw { target } => Some(Step::Withdraw {
            target: target.clone(),
        }),
        Action::AnnounceReplicated { key_id, latency_ns } => {
            let key = state.key(key_id)?;
            let holders = key
                .holders
                .iter()
                .filter_map(|i| state.member_at(i).map(|m| m.hsm.clone()))
                .collect();
            Some(Step::Announce {
                msg_id: message_id(ids, MsgId::Replicated { key_id: *key_id }),
                replicated: KeyReplicated {
                    key_id: *key_id,
                    fingerprint: key.fingerprint,
                    holders,
                    sync_latency_micros: latency_ns / 1_000,
                    created_seq: key.created_seq,
                },
            })
        }
    }
}

/// The whole plan for `actions` at once: the other steps in the order
/// given, then each clone window's commands. The executor follows the same
/// order window by window, fetching each window's `KeyCreated`s just
/// before its commands are planned.
pub fn plan(
    ids: &MessageIdKey,
    state: &ClusterState,
    actions: Vec<Action>,
    created: &HashMap<u64, KeyCreated>,
) -> Vec<Step> {
    let work = sort(actions);
    let mut steps: Vec<Step> = work
        .others
        .iter()
        .filter_map(|a| step(ids, state, a))
        .collect();
    for window in &work.windows {
        steps.extend(clone_commands(ids, window, created, state.last_seq()));
    }
    steps
}

#[cfg(test)]
mod tests {
    //! Given actions and the `KeyCreated`s they need, then these messages
    //! under these ids.
    use super::*;
    use crate::decide::{decide, reconcile};
    use crate::testkit::*;
    use keysync_schemas::Durability;

    /// `n` keys created on "a" at sequences 1..=n (sizes of `wrapped` bytes).
    fn keys(n: usize, wrapped: usize) -> (Vec<KeyId>, HashMap<u64, KeyCreated>) {
        let ids: Vec<KeyId> = (0..n).map(|_| KeyId::new()).collect();
        let created = ids
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let mut c = key_created(*k, "a", 1, Durability::Logged);
                c.wrapped = vec![7; wrapped];
                (i as u64 + 1, c)
            })
            .collect();
        (ids, created)
    }

    fn clone(target: &str, ids: &[KeyId], i: usize, repair: bool) -> Action {
        Action::SendClone {
            target: hsm(target),
            key_id: ids[i],
            created_seq: i as u64 + 1,
            repair,
        }
    }

    fn clones(target: &str, ids: &[KeyId], repair: bool) -> Vec<Action> {
        (0..ids.len())
            .map(|i| clone(target, ids, i, repair))
            .collect()
    }

    /// (message id, target, created_seqs carried) of each command step.
    fn commands(steps: &[Step]) -> Vec<(String, String, Vec<u64>)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Command { msg_id, command } => {
                    let seqs = command
                        .clone()
                        .into_units()
                        .into_iter()
                        .filter_map(|u| match u {
                            Command::CloneKey(c) => Some(c.created_seq),
                            _ => None,
                        })
                        .collect();
                    Some((msg_id.clone(), command.target().to_string(), seqs))
                }
                _ => None,
            })
            .collect()
    }

    fn msg_ids(steps: &[Step]) -> Vec<String> {
        commands(steps).into_iter().map(|(id, _, _)| id).collect()
    }

    fn empty() -> ClusterState {
        ClusterState::default()
    }

    #[test]
    fn a_version_1_key_created_from_the_log_folds_and_its_clone_is_written_as_version_2() {
        // Bytes the last version-1 build wrote (schemas' fixture): the
        // events stream keeps such `KeyCreated`s for ever.
        let v1 = include_bytes!("../../schemas/tests/fixtures/v1-key-created.bin");
        let event = keysync_schemas::decode::<keysync_schemas::Event>(v1)
            .expect("a v1 KeyCreated decodes")
            .body;
        let mut log = Log::given(&[joined("hsm-1"), joined("hsm-2")]);
        let keysync_schemas::Event::KeyCreated(created) = &event else {
            panic!("not a KeyCreated");
        };
        log.when(&event).expect("a v1 KeyCreated folds");
        assert!(log.state.key(&created.key_id).is_some());
        let window = CloneWindow {
            target: hsm("hsm-2"),
            repair: false,
            clones: vec![(log.seq, created.key_id)],
        };
        let by_seq = HashMap::from([(log.seq, created.clone())]);
        let steps = clone_commands(&id_key(), &window, &by_seq, log.seq);
        let [Step::Command { command, .. }] = &steps[..] else {
            panic!("one clone command: {steps:?}");
        };
        let bytes = keysync_schemas::encode(&keysync_schemas::Envelope::new(
            keysync_schemas::Source::Orchestrator("o1".into()),
            command.clone(),
        ))
        .expect("encodes");
        assert_eq!(&bytes[..4], b"KS\x00\x02", "every writer writes version 2");
        let back = keysync_schemas::decode::<Command>(&bytes).expect("decodes");
        let Command::CloneKey(c) = back.body else {
            panic!("not a CloneKey");
        };
        assert_eq!(c.key.attributes.label.as_deref(), Some("payments"));
        assert_eq!(c.key.attributes.app_id, None);
    }

    /// The message-id key of a test cluster.
    fn id_key() -> MessageIdKey {
        MessageIdKey::derive(&keysync_security::Identity::from_seed(&[9; 32]))
    }

    /// The id of a single clone of `key` to `target` in the test cluster.
    fn clone_id(key: KeyId, target: &str) -> String {
        message_id(
            &id_key(),
            MsgId::Clone {
                key_id: key,
                target: &hsm(target),
            },
        )
    }

    #[test]
    fn clones_for_one_member_go_in_one_batch_in_created_order() {
        let (ids, created) = keys(5, 40);
        let mut actions = clones("b", &ids, false);
        actions.reverse();
        let steps = plan(&id_key(), &empty(), actions, &created);
        let cmds = commands(&steps);
        assert_eq!(cmds.len(), 1);
        let (id, target, seqs) = &cmds[0];
        assert!(id.starts_with("clone-batch-b-"), "{id}");
        assert_eq!(target, "b");
        assert_eq!(seqs, &vec![1, 2, 3, 4, 5]);
        assert!(matches!(
            &steps[0],
            Step::Command {
                command: Command::CloneBatch(_),
                ..
            }
        ));
    }

    #[test]
    fn a_single_clone_is_a_clone_key_under_its_readable_id() {
        let (ids, created) = keys(1, 40);
        let steps = plan(&id_key(), &empty(), clones("b", &ids, false), &created);
        assert_eq!(msg_ids(&steps), vec![clone_id(ids[0], "b")]);
        assert!(matches!(
            &steps[0],
            Step::Command {
                command: Command::CloneKey(c),
                ..
            } if c.created_seq == 1 && c.target == hsm("b")
        ));
    }

    #[test]
    fn batches_are_cut_at_the_byte_budget() {
        // Given keys of 30,000 wrapped bytes: three fit in 96 KiB, four do not
        let (ids, created) = keys(7, 30_000);
        let steps = plan(&id_key(), &empty(), clones("b", &ids, false), &created);
        let seqs: Vec<Vec<u64>> = commands(&steps).into_iter().map(|(_, _, s)| s).collect();
        assert_eq!(seqs, vec![vec![1, 2, 3], vec![4, 5, 6], vec![7]]);
        // The lone last one is a plain CloneKey.
        assert_eq!(msg_ids(&steps)[2], clone_id(ids[6], "b"));
    }

    #[test]
    fn a_key_larger_than_the_budget_goes_alone() {
        let (ids, created) = keys(1, CLONE_BATCH_BYTES + 1);
        let steps = plan(&id_key(), &empty(), clones("b", &ids, false), &created);
        assert_eq!(commands(&steps).len(), 1);
    }

    #[test]
    fn clones_are_grouped_per_member() {
        // Given a reconcile's interleaving: each key to b and to c in turn
        let (ids, created) = keys(4, 40);
        let actions: Vec<Action> = (0..4)
            .flat_map(|i| [clone("c", &ids, i, false), clone("b", &ids, i, false)])
            .collect();
        let cmds = commands(&plan(&id_key(), &empty(), actions, &created));
        // Then one batch per member, not eight single clones
        let per_target: Vec<(String, Vec<u64>)> =
            cmds.into_iter().map(|(_, t, s)| (t, s)).collect();
        assert_eq!(
            per_target,
            vec![
                ("b".to_string(), vec![1, 2, 3, 4]),
                ("c".to_string(), vec![1, 2, 3, 4])
            ]
        );
    }

    #[test]
    fn windows_bound_how_many_keys_are_held_at_once() {
        let (ids, created) = keys(CLONE_WINDOW * 2 + 3, 40);
        let work = sort(clones("b", &ids, false));
        let sizes: Vec<usize> = work.windows.iter().map(|w| w.clones.len()).collect();
        assert_eq!(sizes, vec![CLONE_WINDOW, CLONE_WINDOW, 3]);
        // Every clone is sent exactly once.
        let sent: usize = commands(&plan(
            &id_key(),
            &empty(),
            clones("b", &ids, false),
            &created,
        ))
        .iter()
        .map(|(_, _, s)| s.len())
        .sum();
        assert_eq!(sent, ids.len());
    }

    #[test]
    fn the_same_clones_give_the_same_ids_whatever_the_order() {
        let (ids, created) = keys(40, 5_000);
        let mut actions = clones("b", &ids, false);
        actions.extend(clones("c", &ids, false));
        let first = plan(&id_key(), &empty(), actions.clone(), &created);
        // Reversed, rotated, and with duplicates: the same plan.
        let mut shuffled = actions.clone();
        shuffled.reverse();
        shuffled.rotate_left(17);
        shuffled.extend(actions[3..9].iter().cloned());
        assert_eq!(plan(&id_key(), &empty(), shuffled, &created), first);
        assert!(commands(&first).len() > 2, "several batches per member");
    }

    #[test]
    fn other_content_gives_other_ids() {
        let (ids, created) = keys(6, 40);
        let base = msg_ids(&plan(
            &id_key(),
            &empty(),
            clones("b", &ids[..5], false),
            &created,
        ));
        // Another target.
        let other_target = msg_ids(&plan(
            &id_key(),
            &empty(),
            clones("c", &ids[..5], false),
            &created,
        ));
        // One key fewer.
        let fewer = msg_ids(&plan(
            &id_key(),
            &empty(),
            clones("b", &ids[..4], false),
            &created,
        ));
        assert_ne!(base, other_target);
        assert_ne!(base, fewer);
        // The same keys under other sequences.
        let moved: Vec<Action> = (0..5)
            .map(|i| Action::SendClone {
                target: hsm("b"),
                key_id: ids[i],
                created_seq: i as u64 + 2,
                repair: false,
            })
            .collect();
        let mut shifted = HashMap::new();
        for i in 0..5u64 {
            if let Some(c) = created.get(&(i + 1)) {
                shifted.insert(i + 2, c.clone());
            }
        }
        assert_ne!(base, msg_ids(&plan(&id_key(), &empty(), moved, &shifted)));
    }

    #[test]
    fn a_clone_whose_creation_is_gone_is_left_out_of_the_batch_and_its_id() {
        let (ids, mut created) = keys(4, 40);
        created.remove(&2);
        let steps = plan(&id_key(), &empty(), clones("b", &ids, false), &created);
        let without = plan(
            &id_key(),
            &empty(),
            [0, 2, 3]
                .iter()
                .map(|i| clone("b", &ids, *i, false))
                .collect(),
            &created,
        );
        assert_eq!(commands(&steps)[0].2, vec![1, 3, 4]);
        assert_eq!(steps, without);
        // A KeyCreated at that sequence for another key is not used either.
        let (_, stranger) = keys(2, 40);
        let mut wrong = created.clone();
        if let Some(c) = stranger.get(&2) {
            wrong.insert(2, c.clone());
        }
        assert_eq!(
            plan(&id_key(), &empty(), clones("b", &ids, false), &wrong),
            steps
        );
    }

    #[test]
    fn repairs_are_deterministic_and_apart_from_clones() {
        let (ids, created) = keys(3, 40);
        let at = |seq: u64| {
            let mut w = sort(clones("b", &ids, true));
            let window = w.windows.remove(0);
            msg_ids(&clone_commands(&id_key(), &window, &created, seq))
        };
        // The same repair at the same log position: the same id.
        assert_eq!(at(10), at(10));
        assert!(at(10)[0].starts_with("repair-b-"), "{:?}", at(10));
        // At another position (the log moved): another id.
        assert_ne!(at(10), at(11));
        // Never the id of the original clones.
        let original = msg_ids(&plan(
            &id_key(),
            &empty(),
            clones("b", &ids, false),
            &created,
        ));
        assert_ne!(at(10), original);
        // A single repair clone also gets a repair id.
        let (one, created_one) = keys(1, 40);
        let mut w = sort(clones("b", &one, true));
        let steps = clone_commands(&id_key(), &w.windows.remove(0), &created_one, 10);
        assert!(msg_ids(&steps)[0].starts_with("repair-b-"));
        assert!(matches!(
            &steps[0],
            Step::Command {
                command: Command::CloneKey(_),
                ..
            }
        ));
    }

    #[test]
    fn repairs_and_clones_for_one_member_are_planned_apart() {
        let (ids, created) = keys(2, 40);
        let mut actions = clones("b", &ids, false);
        actions.extend(clones("b", &ids, true));
        let found = msg_ids(&plan(&id_key(), &empty(), actions, &created));
        assert_eq!(found.len(), 2);
        assert!(found[0].starts_with("clone-batch-b-"));
        assert!(found[1].starts_with("repair-b-"));
    }

    #[test]
    fn deletes_purges_withdrawals_and_announcements_keep_their_ids_and_order() {
        let k = KeyId::new();
        let log = Log::given(&[
            joined("a"),
            joined("b"),
            created(k, "a", 1),
            applied(k, "b", 1),
        ]);
        let gone = KeyId::new();
        let steps = plan(
            &id_key(),
            &log.state,
            vec![
                Action::Withdraw { target: hsm("c") },
                Action::AnnounceReplicated {
                    key_id: k,
                    latency_ns: 1_500_000,
                },
                Action::Purge { key_id: k },
                Action::SendDelete {
                    target: hsm("a"),
                    key_id: k,
                },
                // A key the state does not know is not announced.
                Action::AnnounceReplicated {
                    key_id: gone,
                    latency_ns: 1,
                },
            ],
            &HashMap::new(),
        );
        assert_eq!(
            steps,
            vec![
                Step::Withdraw { target: hsm("c") },
                Step::Announce {
                    msg_id: message_id(&id_key(), MsgId::Replicated { key_id: k }),
                    replicated: KeyReplicated {
                        key_id: k,
                        fingerprint: keysync_schemas::Fingerprint([1; 32]),
                        holders: vec![hsm("a"), hsm("b")],
                        sync_latency_micros: 1_500,
                        created_seq: 3,
                    }
                },
                Step::Purge { key_id: k },
                Step::Command {
                    msg_id: message_id(
                        &id_key(),
                        MsgId::Delete {
                            key_id: k,
                            target: &hsm("a")
                        }
                    ),
                    command: Command::DeleteKey(DeleteKey {
                        target: hsm("a"),
                        key_id: k
                    })
                },
            ]
        );
    }

    #[test]
    fn a_restarted_orchestrator_plans_a_bootstrap_under_the_same_ids() {
        // Given keys on a and b, and c joining: the active orchestrator
        // plans c's bootstrap from the join
        // (more than a window of them)
        let ks: Vec<KeyId> = (0..CLONE_WINDOW + 88).map(|_| KeyId::new()).collect();
        let mut events = vec![joined("a"), joined("b")];
        for (i, k) in ks.iter().enumerate() {
            events.push(created(*k, "a", i as u8));
            events.push(applied(*k, "b", i as u8));
            events.push(replicated(*k, i as u8));
        }
        let mut log = Log::given(&events);
        let join = joined("c");
        let change = log.when(&join).expect("c joins");
        let actions = decide(&log.state, meta(log.seq), &join, &change);
        let created: HashMap<u64, KeyCreated> = log
            .state
            .keys()
            .filter_map(|(id, k)| {
                let i = ks.iter().position(|x| x == id)?;
                Some((
                    k.created_seq,
                    key_created(*id, "a", i as u8, Durability::Logged),
                ))
            })
            .collect();
        let live = plan(&id_key(), &log.state, actions, &created);
        // When it crashes after publishing, and a new one reconciles the same log
        let restarted = plan(&id_key(), &log.state, reconcile(&log.state), &created);
        // Then it publishes under the same ids: JetStream stores them once
        assert_eq!(msg_ids(&restarted), msg_ids(&live));
        assert_eq!(restarted, live);
        assert!(msg_ids(&live).len() > 2);
    }

    #[test]
    fn every_id_comes_from_message_id_keyed_by_the_cluster() {
        let k = KeyId::new();
        let b = hsm("b");
        let ids = id_key();
        let all = |ids: &MessageIdKey| {
            let pairs = [(3, k), (1, KeyId::new())];
            vec![
                message_id(
                    ids,
                    MsgId::Clone {
                        key_id: k,
                        target: &b,
                    },
                ),
                message_id(
                    ids,
                    MsgId::Delete {
                        key_id: k,
                        target: &b,
                    },
                ),
                message_id(ids, MsgId::Replicated { key_id: k }),
                message_id(ids, MsgId::DeadLetter { seq: 42 }),
                message_id(
                    ids,
                    MsgId::Retry {
                        of: "x",
                        attempt: 1,
                    },
                ),
                message_id(
                    ids,
                    MsgId::CloneBatch {
                        target: &b,
                        clones: &pairs[..1],
                    },
                ),
                message_id(
                    ids,
                    MsgId::Repair {
                        target: &b,
                        at_seq: 0,
                        clones: &pairs[..1],
                    },
                ),
            ]
        };
        let mine = all(&ids);
        // Readable kind and target, then 128 bits of MAC.
        assert!(mine[0].starts_with("clone-b-") && mine[0].len() == "clone-b-".len() + 32);
        assert!(mine[1].starts_with("delete-b-"));
        assert!(mine[2].starts_with("replicated-"));
        assert!(mine[3].starts_with("dlq-event-"));
        assert!(mine[4].starts_with("retry-1-"));
        // None is what anyone could compute from the content alone
        // (the ids of decision 8), and none names the key.
        assert_ne!(mine[0], format!("clone-{k}-b"));
        assert_ne!(mine[1], format!("delete-{k}-b"));
        assert_ne!(mine[2], format!("replicated-{k}"));
        assert_ne!(mine[3], "dlq-event-42");
        assert!(mine.iter().all(|id| !id.contains(&k.to_string())));
        // Another cluster (another identity) has other ids for the same
        // content; the same cluster, the same ids.
        let other = MessageIdKey::derive(&keysync_security::Identity::from_seed(&[8; 32]));
        let theirs = all(&other);
        assert!(mine.iter().zip(&theirs).all(|(a, b)| a != b));
        let envelope_id = uuid::Uuid::now_v7();
        assert_eq!(
            message_id(&ids, MsgId::Fact { envelope_id }),
            envelope_id.to_string()
        );
        // Batch ids: order-free; a repair never shares a batch's MAC.
        let pairs = [(3, k), (1, KeyId::new())];
        let mut reversed = pairs;
        reversed.reverse();
        let id = message_id(
            &ids,
            MsgId::CloneBatch {
                target: &b,
                clones: &pairs,
            },
        );
        assert_eq!(id.len(), "clone-batch-b-".len() + 32);
        assert_eq!(
            id,
            message_id(
                &ids,
                MsgId::CloneBatch {
                    target: &b,
                    clones: &reversed
                }
            )
        );
        assert_ne!(
            message_id(
                &ids,
                MsgId::Repair {
                    target: &b,
                    at_seq: 0,
                    clones: &pairs
                }
            )
            .trim_start_matches("repair-"),
            id.trim_start_matches("clone-batch-"),
            "a repair never shares a clone batch's MAC"
        );
        // Each retry of an id is another id, the same on every orchestrator.
        let r1 = message_id(
            &ids,
            MsgId::Retry {
                of: &id,
                attempt: 1,
            },
        );
        let r2 = message_id(
            &ids,
            MsgId::Retry {
                of: &id,
                attempt: 2,
            },
        );
        assert_ne!(r1, r2);
        assert_eq!(
            r1,
            message_id(
                &id_key(),
                MsgId::Retry {
                    of: &id,
                    attempt: 1
                }
            )
        );
    }
}
