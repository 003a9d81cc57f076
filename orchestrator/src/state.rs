//! Cluster state: a fold over the event log.
//!
//! [`ClusterState::apply`] is the only way state changes, it does no I/O,
//! and it is deterministic, so replaying the log from the start rebuilds
//! exactly the state the orchestrator had. Times come from the stream's own
//! timestamps (one clock), never from this process's clock.

use std::collections::{BTreeMap, HashMap};

use keysync_schemas::{
    ClusterStatus, Event, Fingerprint, HsmId, KeyId, KeyType, MemberState, MemberStatus,
};

/// Most members one cluster can have (a [`MemberSet`] is a 64-bit set).
pub const MAX_MEMBERS: usize = 64;

/// Where an event sits in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventMeta {
    /// Stream sequence.
    pub seq: u64,
    /// When JetStream stored it, nanoseconds since the epoch.
    pub stored_at_ns: u64,
}

/// A set of members, by index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemberSet(u64);

impl MemberSet {
    /// Adds a member.
    pub fn insert(&mut self, idx: u8) {
        self.0 |= 1 << idx;
    }
    /// Whether a member is in the set.
    pub fn contains(self, idx: u8) -> bool {
        self.0 & (1 << idx) != 0
    }
    /// Whether every member of `other` is in the set.
    pub fn covers(self, other: MemberSet) -> bool {
        self.0 & other.0 == other.0
    }
    /// Number of members.
    pub fn len(self) -> u32 {
        self.0.count_ones()
    }
    /// Whether empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// Members in `self` and not in `other`.
    pub fn minus(self, other: MemberSet) -> MemberSet {
        MemberSet(self.0 & !other.0)
    }
    /// Member indexes, ascending.
    pub fn iter(self) -> impl Iterator<Item = u8> {
        (0..MAX_MEMBERS as u8).filter(move |i| self.contains(*i))
    }
}

/// One member HSM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its id.
    pub hsm: HsmId,
    /// Sequence of its latest `HsmJoined`.
    pub joined_seq: u64,
}

/// What the orchestrator knows of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyState {
    /// Type.
    pub key_type: KeyType,
    /// Fingerprint, as announced by the creator.
    pub fingerprint: Fingerprint,
    /// Index of the creating member.
    pub creator: u8,
    /// Sequence of `KeyCreated` (where the wrapped material is).
    pub created_seq: u64,
    /// When `KeyCreated` was stored.
    pub created_ns: u64,
    /// Members known to hold it.
    pub holders: MemberSet,
    /// Members that reported a failed clone.
    pub failed: MemberSet,
    /// Set when the key first reached every member: (sequence of the
    /// completing `CloneApplied`, sync latency in ns).
    pub completed: Option<(u64, u64)>,
    /// A `KeyReplicated` for it is in the log.
    pub announced: bool,
}

/// Why an event was not applied. Counted, never fatal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The subject does not match the body.
    #[error("subject does not match the event")]
    SubjectMismatch,
    /// The cluster has [`MAX_MEMBERS`] members already.
    #[error("cluster is full ({MAX_MEMBERS} members)")]
    TooManyMembers,
    /// An event about a member that never joined.
    #[error("event from {0}, which never joined")]
    UnknownMember(HsmId),
    /// An event about a key that was never created.
    #[error("event about unknown key {0}")]
    UnknownKey(KeyId),
    /// A clone result whose fingerprint differs from the key's.
    #[error("fingerprint of {0} differs from the one announced")]
    FingerprintMismatch(KeyId),
    /// A second `KeyCreated` with the same id and another fingerprint.
    #[error("key {0} was already created with another fingerprint")]
    ConflictingCreate(KeyId),
}

impl Rejection {
    /// Stable counter name.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::SubjectMismatch => "subject_mismatch",
            Rejection::TooManyMembers => "too_many_members",
            Rejection::UnknownMember(_) => "unknown_member",
            Rejection::UnknownKey(_) => "unknown_key",
            Rejection::FingerprintMismatch(_) => "fingerprint_mismatch",
            Rejection::ConflictingCreate(_) => "conflicting_create",
        }
    }
}

/// The whole cluster, as folded from the log.
#[derive(Debug, Default, Clone)]
pub struct ClusterState {
    members: Vec<Member>,
    index: HashMap<HsmId, u8>,
    keys: HashMap<KeyId, KeyState>,
    last_seq: u64,
    clone_failures: u64,
    rejected: BTreeMap<String, u64>,
}

impl ClusterState {
    /// Folds one event into the state. Rejected events change nothing but
    /// their counter (and the last sequence seen).
    pub fn apply(&mut self, meta: EventMeta, event: &Event) -> Result<(), Rejection> {
        self.last_seq = self.last_seq.max(meta.seq);
        let result = self.apply_inner(meta, event);
        if let Err(r) = &result {
            self.count_rejection(r.reason());
        }
        result
    }

    /// Counts a message rejected before it could be applied (say, it did not decode).
    pub fn count_rejection(&mut self, reason: &str) {
        *self.rejected.entry(reason.to_string()).or_default() += 1;
    }

    fn member(&self, hsm: &HsmId) -> Result<u8, Rejection> {
        self.index
            .get(hsm)
            .copied()
            .ok_or_else(|| Rejection::UnknownMember(hsm.clone()))
    }

    fn apply_inner(&mut self, meta: EventMeta, event: &Event) -> Result<(), Rejection> {
        match event {
            Event::HsmJoined(j) => {
                if let Some(&i) = self.index.get(&j.hsm) {
                    self.members[i as usize].joined_seq = meta.seq;
                } else {
                    if self.members.len() >= MAX_MEMBERS {
                        return Err(Rejection::TooManyMembers);
                    }
                    let i = self.members.len() as u8;
                    self.members.push(Member {
                        hsm: j.hsm.clone(),
                        joined_seq: meta.seq,
                    });
                    self.index.insert(j.hsm.clone(), i);
                    // A member that joins after a key completed does not
                    // reopen it; it is tracked through its lag.
                }
                Ok(())
            }
            Event::KeyCreated(c) => {
                let creator = self.member(&c.hsm)?;
                if let Some(existing) = self.keys.get(&c.key_id) {
                    // A republished KeyCreated (outbox retry) is a no-op.
                    return if existing.fingerprint == c.fingerprint {
                        Ok(())
                    } else {
                        Err(Rejection::ConflictingCreate(c.key_id))
                    };
                }
                let mut holders = MemberSet::default();
                holders.insert(creator);
                let mut key = KeyState {
                    key_type: c.key_type,
                    fingerprint: c.fingerprint,
                    creator,
                    created_seq: meta.seq,
                    created_ns: meta.stored_at_ns,
                    holders,
                    failed: MemberSet::default(),
                    completed: None,
                    announced: false,
                };
                if holders.covers(self.all_members()) {
                    key.completed = Some((meta.seq, 0));
                }
                self.keys.insert(c.key_id, key);
                Ok(())
            }
            Event::CloneApplied(a) => {
                let m = self.member(&a.hsm)?;
                let all = self.all_members();
                let key = self
                    .keys
                    .get_mut(&a.key_id)
                    .ok_or(Rejection::UnknownKey(a.key_id))?;
                if key.fingerprint != a.fingerprint {
                    return Err(Rejection::FingerprintMismatch(a.key_id));
                }
                key.holders.insert(m);
                if key.completed.is_none() && key.holders.covers(all) {
                    key.completed =
                        Some((meta.seq, meta.stored_at_ns.saturating_sub(key.created_ns)));
                }
                Ok(())
            }
            Event::CloneFailed(f) => {
                let m = self.member(&f.hsm)?;
                let key = self
                    .keys
                    .get_mut(&f.key_id)
                    .ok_or(Rejection::UnknownKey(f.key_id))?;
                if !key.holders.contains(m) {
                    key.failed.insert(m);
                }
                self.clone_failures += 1;
                Ok(())
            }
            Event::KeyReplicated(r) => {
                let key = self
                    .keys
                    .get_mut(&r.key_id)
                    .ok_or(Rejection::UnknownKey(r.key_id))?;
                key.announced = true;
                Ok(())
            }
        }
    }

    /// Every member.
    pub fn all_members(&self) -> MemberSet {
        let mut s = MemberSet::default();
        for i in 0..self.members.len() {
            s.insert(i as u8);
        }
        s
    }

    /// A member's index.
    pub fn member_index(&self, hsm: &HsmId) -> Option<u8> {
        self.index.get(hsm).copied()
    }

    /// A member by index.
    pub fn member_at(&self, idx: u8) -> Option<&Member> {
        self.members.get(idx as usize)
    }

    /// One key.
    pub fn key(&self, id: &KeyId) -> Option<&KeyState> {
        self.keys.get(id)
    }

    /// Every key.
    pub fn keys(&self) -> impl Iterator<Item = (&KeyId, &KeyState)> {
        self.keys.iter()
    }

    /// The last sequence folded.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Members that neither hold nor failed `key`: clones outstanding.
    pub fn missing(&self, key: &KeyState) -> MemberSet {
        self.all_members().minus(key.holders).minus(key.failed)
    }

    /// Status for `keysync cluster status`.
    pub fn status(&self) -> ClusterStatus {
        let all = self.all_members();
        let mut held = vec![0u64; self.members.len()];
        let mut replicated = 0u64;
        let mut pending = 0u64;
        for k in self.keys.values() {
            for i in k.holders.iter() {
                if let Some(h) = held.get_mut(i as usize) {
                    *h += 1;
                }
            }
            if k.holders.covers(all) {
                replicated += 1;
            }
            pending += u64::from(all.minus(k.holders).minus(k.failed).len());
        }
        let total = self.keys.len() as u64;
        ClusterStatus {
            members: self
                .members
                .iter()
                .zip(held)
                .map(|(m, keys)| MemberStatus {
                    hsm_id: m.hsm.clone(),
                    state: if keys >= total {
                        MemberState::InService
                    } else {
                        MemberState::Syncing
                    },
                    keys,
                    lag: total.saturating_sub(keys),
                })
                .collect(),
            keys: total,
            replicated,
            pending_clones: pending,
            clone_failures: self.clone_failures,
            last_seq: self.last_seq,
            rejected: self.rejected.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }
}
