//! Cluster state: a fold over the event log.
//!
//! [`ClusterState::apply`] is the only way state changes, it does no I/O,
//! and it is deterministic, so replaying the log from the start rebuilds
//! exactly the state the orchestrator had. Times come from the stream's own
//! timestamps (one clock), never from this process's clock.
//!
//! Counters (keys held per member, clones outstanding, keys below their
//! durability, each member's expected inventory digest) are kept in step by
//! `apply`, so status, metrics and anti-entropy checks cost O(members).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use keysync_schemas::{
    CloneApplied, ClusterStatus, Durability, Event, Fingerprint, HsmId, InventoryDigest, KeyId,
    KeyType, MemberState, MemberStatus, RejectReason, Rejection,
};

/// The fold's per-key tables: std's hash table (hashbrown) used directly,
/// so [`ClusterState::state_bytes`] counts their real allocation.
type Table<K, V> = hashbrown::HashMap<K, V, std::hash::RandomState>;
type Set<K> = hashbrown::HashSet<K, std::hash::RandomState>;

/// Every key the fold tracks, tombstones included (none is ever removed):
/// a dense array of entries in arrival order, grown by a quarter at a
/// time, and a hash table from id to position. A hash table of whole
/// entries would cost up to 2.3x an entry a key right after it doubles
/// (258 B a key at worst, 129 at best); this costs at most 1.25x an entry
/// plus 25 B a bucket of index (197 B at worst; decision 19).
#[derive(Debug, Default, Clone)]
struct KeyTable {
    entries: Vec<(KeyId, KeyState)>,
    at: Table<KeyId, usize>,
}

impl KeyTable {
    fn get(&self, id: &KeyId) -> Option<&KeyState> {
        self.at
            .get(id)
            .and_then(|&i| self.entries.get(i))
            .map(|(_, k)| k)
    }

    fn get_mut(&mut self, id: &KeyId) -> Option<&mut KeyState> {
        let i = *self.at.get(id)?;
        self.entries.get_mut(i).map(|(_, k)| k)
    }

    fn insert(&mut self, id: KeyId, key: KeyState) {
        if let Some(old) = self.get_mut(&id) {
            *old = key;
            return;
        }
        if self.entries.len() == self.entries.capacity() {
            self.entries.reserve_exact((self.entries.len() / 4).max(16));
        }
        self.at.insert(id, self.entries.len());
        self.entries.push((id, key));
    }

    fn iter(&self) -> impl Iterator<Item = (&KeyId, &KeyState)> {
        self.entries.iter().map(|(id, k)| (id, k))
    }

    fn allocation_size(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<(KeyId, KeyState)>()
            + self.at.allocation_size()
    }
}

/// Snapshots hold the entries only; the index is rebuilt on reading.
impl Serialize for KeyTable {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.entries.serialize(s)
    }
}

impl<'de> Deserialize<'de> for KeyTable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let entries = Vec::<(KeyId, KeyState)>::deserialize(d)?;
        let mut at = Table::with_capacity_and_hasher(entries.len(), Default::default());
        for (i, (id, _)) in entries.iter().enumerate() {
            if at.insert(*id, i).is_some() {
                return Err(serde::de::Error::custom(format!(
                    "key {id} appears twice in the snapshot"
                )));
            }
        }
        Ok(KeyTable { entries, at })
    }
}

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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSet(u64);

impl MemberSet {
    /// Adds a member.
    pub fn insert(&mut self, idx: u8) {
        self.0 |= 1 << idx;
    }
    /// Removes a member.
    pub fn remove(&mut self, idx: u8) {
        self.0 &= !(1 << idx);
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its id.
    pub hsm: HsmId,
    /// Sequence of its first `HsmJoined`.
    pub first_seq: u64,
    /// Sequence of its latest `HsmJoined`.
    pub joined_seq: u64,
    /// Not declared failed (or recovered since).
    pub live: bool,
    /// Removed by an operator: no member until it is enrolled and joins again.
    pub revoked: bool,
}

/// What the orchestrator knows of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    /// Type.
    pub key_type: KeyType,
    /// Fingerprint, as announced by the creator.
    pub fingerprint: Fingerprint,
    /// Sequence of `KeyCreated` (where the wrapped material is); 0 for a
    /// tombstone whose creation was purged before this fold saw it.
    pub created_seq: u64,
    /// When `KeyCreated` was stored.
    pub created_ns: u64,
    /// Members known to hold it.
    pub holders: MemberSet,
    /// Members that reported a failed clone.
    pub failed: MemberSet,
    /// Set when the key first reached every live member: (sequence of the
    /// completing event, sync latency in ns).
    pub completed: Option<(u64, u64)>,
    /// A `KeyReplicated` for it is in the log.
    pub announced: bool,
    /// Holders the creator asked for before its create returned
    /// (`replicas:N` → N, `all` → [`WANTS_ALL`], lower levels → 0).
    pub wanted: u8,
    /// Deleted: a tombstone. `holders` are then the members yet to erase it.
    pub deleted: bool,
}

/// [`KeyState::wanted`] for durability `all`.
pub const WANTS_ALL: u8 = u8::MAX;

/// What one applied event changed, for metrics and decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A member holds a key it did not hold before.
    Held {
        /// The member.
        member: u8,
        /// From `KeyCreated` stored to this `CloneApplied` stored.
        latency_ns: u64,
        /// Whether this completed the key (every live member holds it).
        completed: bool,
    },
    /// A member failed, and these keys are now on every live member
    /// (key, sync latency in ns).
    Completed(Vec<(KeyId, u64)>),
    /// A member joined for the first time.
    NewMember(u8),
    /// A member was removed; these keys are now on every live member.
    Revoked(u8, Vec<(KeyId, u64)>),
    /// A member announced the types it can hold: it gained these (send it
    /// their keys), and these keys are now on every live member able to
    /// hold them.
    Capabilities {
        /// The member.
        member: u8,
        /// Types it can hold now and could not before.
        gained: Vec<KeyType>,
        /// Keys completed by the types it can no longer hold.
        completed: Vec<(KeyId, u64)>,
    },
    /// A key was deleted.
    Deleted,
    /// A batch of facts (`ClonesApplied`): what each of its
    /// `CloneApplied`s changed, in order.
    Batch(Vec<Change>),
    /// Anything else (or nothing).
    Other,
}

/// Why the fold refused an event: one constructor per rule, so the
/// reason and its sentence stay together. Counted, never fatal.
mod refuse {
    use keysync_schemas::{HsmId, KeyId, RejectReason, Rejection};

    use super::MAX_MEMBERS;

    pub fn too_many_members() -> Rejection {
        Rejection::new(
            RejectReason::TooManyMembers,
            format!("cluster is full ({MAX_MEMBERS} members)"),
        )
    }

    pub fn unknown_member(hsm: &HsmId) -> Rejection {
        Rejection::new(
            RejectReason::UnknownMember,
            format!("event from {hsm}, which never joined"),
        )
    }

    pub fn unknown_key(key: KeyId) -> Rejection {
        Rejection::new(
            RejectReason::UnknownKey,
            format!("event about unknown key {key}"),
        )
    }

    pub fn fingerprint_mismatch(key: KeyId) -> Rejection {
        Rejection::new(
            RejectReason::FingerprintMismatch,
            format!("fingerprint of {key} differs from the one announced"),
        )
    }

    pub fn conflicting_create(key: KeyId) -> Rejection {
        Rejection::new(
            RejectReason::ConflictingCreate,
            format!("key {key} was already created with another fingerprint"),
        )
    }

    pub fn create_of_deleted_key(key: KeyId) -> Rejection {
        Rejection::new(
            RejectReason::CreateOfDeletedKey,
            format!("key {key} was deleted: its creation is not taken again"),
        )
    }

    pub fn erase_of_live_key(key: KeyId) -> Rejection {
        Rejection::new(
            RejectReason::EraseOfLiveKey,
            format!("erase of live key {key}"),
        )
    }

    pub fn invalid_token(hsm: &HsmId) -> Rejection {
        Rejection::new(
            RejectReason::InvalidToken,
            format!("join request for {hsm} with an invalid token"),
        )
    }
}

/// The whole cluster, as folded from the log. Serializable for snapshots.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    members: Vec<Member>,
    index: HashMap<HsmId, u8>,
    keys: KeyTable,
    /// Live keys not yet on every live member.
    incomplete: Set<KeyId>,
    last_seq: u64,
    clone_failures: u64,
    rejected: BTreeMap<RejectReason, u64>,
    live_keys: u64,
    /// Live keys each member holds.
    held: Vec<u64>,
    /// Live keys each member failed and does not hold.
    failed: Vec<u64>,
    /// Digest of the live keys each member holds.
    digests: Vec<InventoryDigest>,
    /// Live keys that reached every live member at some point.
    completed: u64,
    /// Live keys whose requested durability is not met yet.
    below_durability: u64,
    /// Per key type (in `KeyType::ALL` order), the members that announced
    /// they cannot hold it (`HsmCapabilities`).
    unable: [MemberSet; 4],
    /// Live keys per key type (same order).
    live_by_type: [u64; 4],
    /// Capabilities announced by HSMs that are not members yet (an agent
    /// announces them just before its first `HsmJoined`).
    early_capabilities: BTreeMap<HsmId, Vec<KeyType>>,
    /// Enrolled HSMs' identity keys, as of `last_seq`.
    enrolled: BTreeMap<HsmId, [u8; 32]>,
    /// Unused join tokens: token key → (HSM, expiry in ns).
    tokens: BTreeMap<[u8; 32], (HsmId, u64)>,
}

/// Index of a key type in `KeyType::ALL` (per-type tables).
fn type_index(t: KeyType) -> usize {
    KeyType::ALL.iter().position(|x| *x == t).unwrap_or(0)
}

/// Whether a key has as many holders as its creator asked for. `all` is
/// met when the key first reached every live member.
fn durability_met(key: &KeyState) -> bool {
    match key.wanted {
        WANTS_ALL => key.completed.is_some(),
        n => key.holders.len() >= u32::from(n),
    }
}

impl ClusterState {
    /// Folds one event into the state. Rejected events change nothing but
    /// their counter (and the last sequence seen).
    pub fn apply(&mut self, meta: EventMeta, event: &Event) -> Result<Change, Rejection> {
        self.last_seq = self.last_seq.max(meta.seq);
        let result = self.apply_inner(meta, event);
        if let Err(r) = &result {
            self.count_rejection(r.reason);
        }
        result
    }

    /// A stream event rejected before it could be applied (unsigned,
    /// forged, undecodable): counted, and folded past, so the fold's
    /// position keeps up with the stream.
    pub fn reject_at(&mut self, seq: u64, reason: RejectReason) {
        self.last_seq = self.last_seq.max(seq);
        self.count_rejection(reason);
    }

    /// Counts a message rejected before it could be applied (say, it did not decode).
    pub fn count_rejection(&mut self, reason: RejectReason) {
        *self.rejected.entry(reason).or_default() += 1;
    }

    fn member(&self, hsm: &HsmId) -> Result<u8, Rejection> {
        self.index
            .get(hsm)
            .copied()
            .ok_or_else(|| refuse::unknown_member(hsm))
    }

    /// Whether [`Self::hold`] would take `a` (a known member, a known key,
    /// its fingerprint), without changing anything.
    fn check_hold(&self, a: &CloneApplied) -> Result<(), Rejection> {
        self.member(&a.hsm)?;
        let key = self
            .keys
            .get(&a.key_id)
            .ok_or_else(|| refuse::unknown_key(a.key_id))?;
        if key.fingerprint != a.fingerprint {
            return Err(refuse::fingerprint_mismatch(a.key_id));
        }
        Ok(())
    }

    /// A member holds a key: one `CloneApplied`, alone or in a batch.
    fn hold(&mut self, meta: EventMeta, a: &CloneApplied) -> Result<Change, Rejection> {
        let m = self.member(&a.hsm)?;
        let key_type = self
            .keys
            .get(&a.key_id)
            .map(|k| k.key_type)
            .ok_or_else(|| refuse::unknown_key(a.key_id))?;
        let live = self.needed(key_type);
        let key = self
            .keys
            .get_mut(&a.key_id)
            .ok_or_else(|| refuse::unknown_key(a.key_id))?;
        if key.fingerprint != a.fingerprint {
            return Err(refuse::fingerprint_mismatch(a.key_id));
        }
        // Already known, or a clone that raced the key's deletion
        // (the member is told to erase it anyway).
        if key.holders.contains(m) || key.deleted {
            return Ok(Change::Other);
        }
        let was_met = durability_met(key);
        key.holders.insert(m);
        self.held[m as usize] += 1;
        self.digests[m as usize].toggle(&a.key_id, &key.fingerprint);
        if key.failed.contains(m) {
            key.failed.remove(m);
            self.failed[m as usize] -= 1;
        }
        let latency_ns = meta.stored_at_ns.saturating_sub(key.created_ns);
        let completed = key.completed.is_none() && key.holders.covers(live);
        if completed {
            key.completed = Some((meta.seq, latency_ns));
            self.completed += 1;
            self.incomplete.remove(&a.key_id);
        }
        if !was_met && durability_met(key) {
            self.below_durability -= 1;
        }
        Ok(Change::Held {
            member: m,
            latency_ns,
            completed,
        })
    }

    fn set_live(&mut self, m: u8, live: bool) {
        if let Some(member) = self.members.get_mut(m as usize) {
            member.live = live;
        }
    }

    /// Marks every incomplete key now on every live member as complete.
    fn complete_covered(&mut self, meta: EventMeta) -> Vec<(KeyId, u64)> {
        let needed = KeyType::ALL.map(|t| self.needed(t));
        let mut done = Vec::new();
        for id in &self.incomplete {
            if let Some(k) = self.keys.get_mut(id) {
                if k.holders.covers(needed[type_index(k.key_type)]) {
                    let latency = meta.stored_at_ns.saturating_sub(k.created_ns);
                    let was_met = durability_met(k);
                    k.completed = Some((meta.seq, latency));
                    if !was_met && durability_met(k) {
                        self.below_durability -= 1;
                    }
                    done.push((*id, latency));
                }
            }
        }
        for (id, _) in &done {
            self.incomplete.remove(id);
        }
        self.completed += done.len() as u64;
        done.sort_by_key(|(id, _)| *id);
        done
    }

    fn apply_inner(&mut self, meta: EventMeta, event: &Event) -> Result<Change, Rejection> {
        match event {
            Event::HsmJoined(j) => {
                if let Some(&i) = self.index.get(&j.hsm) {
                    let m = &mut self.members[i as usize];
                    m.joined_seq = meta.seq;
                    m.revoked = false;
                    self.set_live(i, true);
                    return Ok(Change::Other);
                }
                if self.members.len() >= MAX_MEMBERS {
                    return Err(refuse::too_many_members());
                }
                let i = self.members.len() as u8;
                self.members.push(Member {
                    hsm: j.hsm.clone(),
                    first_seq: meta.seq,
                    joined_seq: meta.seq,
                    live: true,
                    revoked: false,
                });
                self.index.insert(j.hsm.clone(), i);
                if let Some(holds) = self.early_capabilities.remove(&j.hsm) {
                    for t in KeyType::ALL.into_iter().filter(|t| !holds.contains(t)) {
                        self.unable[type_index(t)].insert(i);
                    }
                }
                self.held.push(0);
                self.failed.push(0);
                self.digests.push(InventoryDigest::default());
                // A member that joins after a key completed does not reopen
                // it; it is tracked through its lag while it bootstraps.
                Ok(Change::NewMember(i))
            }
            Event::HsmCapabilities(c) => {
                let Some(&m) = self.index.get(&c.hsm) else {
                    self.early_capabilities
                        .insert(c.hsm.clone(), c.holds.clone());
                    return Ok(Change::Other);
                };
                let mut gained = Vec::new();
                for t in KeyType::ALL {
                    let unable = &mut self.unable[type_index(t)];
                    let was_able = !unable.contains(m);
                    if c.holds.contains(&t) {
                        unable.remove(m);
                        if !was_able {
                            gained.push(t);
                        }
                    } else {
                        unable.insert(m);
                    }
                }
                Ok(Change::Capabilities {
                    member: m,
                    gained,
                    completed: self.complete_covered(meta),
                })
            }
            Event::HsmFailed(f) => {
                let m = self.member(&f.hsm)?;
                if !self.members[m as usize].live {
                    return Ok(Change::Other);
                }
                self.set_live(m, false);
                Ok(Change::Completed(self.complete_covered(meta)))
            }
            Event::HsmRecovered(r) => {
                let m = self.member(&r.hsm)?;
                if self.members[m as usize].revoked {
                    return Ok(Change::Other);
                }
                self.set_live(m, true);
                Ok(Change::Other)
            }
            Event::HsmEnrolled(e) => {
                self.enrolled.insert(e.hsm.clone(), e.public_key);
                Ok(Change::Other)
            }
            // Judged by the loop (`checkpoint::Judge`); nothing to fold.
            Event::Checkpoint(_) => Ok(Change::Other),
            Event::JoinTokenIssued(t) => {
                self.tokens
                    .insert(t.token_key, (t.hsm.clone(), t.expires_at_ns));
                Ok(Change::Other)
            }
            Event::JoinRequested(j) => match self.tokens.get(&j.token_key) {
                Some((hsm, expires)) if *hsm == j.hsm && meta.stored_at_ns <= *expires => {
                    self.tokens.remove(&j.token_key);
                    self.enrolled.insert(j.hsm.clone(), j.public_key);
                    Ok(Change::Other)
                }
                _ => Err(refuse::invalid_token(&j.hsm)),
            },
            Event::HsmRevoked(r) => {
                self.enrolled.remove(&r.hsm);
                let Some(&m) = self.index.get(&r.hsm) else {
                    return Ok(Change::Other);
                };
                let member = &mut self.members[m as usize];
                if member.revoked {
                    return Ok(Change::Other);
                }
                member.revoked = true;
                member.live = false;
                Ok(Change::Revoked(m, self.complete_covered(meta)))
            }
            Event::KeyCreated(c) => {
                let creator = self.member(&c.hsm)?;
                if let Some(existing) = self.keys.get(&c.key_id) {
                    // One for a deleted key (a replay once JetStream forgot
                    // the purged original's id, or an outbox retry after
                    // the delete) is refused: it is removed from the log,
                    // so the key's `created` subject stays empty.
                    if existing.deleted {
                        return Err(refuse::create_of_deleted_key(c.key_id));
                    }
                    // A republished KeyCreated (outbox retry) is a no-op.
                    return if existing.fingerprint == c.fingerprint {
                        Ok(Change::Other)
                    } else {
                        Err(refuse::conflicting_create(c.key_id))
                    };
                }
                let mut holders = MemberSet::default();
                holders.insert(creator);
                let wanted = match c.durability {
                    Durability::Replicas(n) => u8::try_from(n).unwrap_or(WANTS_ALL - 1),
                    Durability::All => WANTS_ALL,
                    Durability::None | Durability::Logged => 0,
                };
                let mut key = KeyState {
                    key_type: c.key_type,
                    fingerprint: c.fingerprint,
                    created_seq: meta.seq,
                    created_ns: meta.stored_at_ns,
                    holders,
                    failed: MemberSet::default(),
                    completed: None,
                    announced: false,
                    wanted,
                    deleted: false,
                };
                self.live_keys += 1;
                self.held[creator as usize] += 1;
                self.digests[creator as usize].toggle(&c.key_id, &c.fingerprint);
                let completed = holders.covers(self.needed(c.key_type));
                self.live_by_type[type_index(c.key_type)] += 1;
                if completed {
                    key.completed = Some((meta.seq, 0));
                    self.completed += 1;
                } else {
                    self.incomplete.insert(c.key_id);
                }
                if !durability_met(&key) {
                    self.below_durability += 1;
                }
                self.keys.insert(c.key_id, key);
                Ok(Change::Held {
                    member: creator,
                    latency_ns: 0,
                    completed,
                })
            }
            Event::CloneApplied(a) => self.hold(meta, a),
            Event::ClonesApplied(b) => {
                // All or nothing: every entry is checked before any is
                // folded, so a refused batch changes no state. (The shape,
                // 1..=MAX entries and no key twice, was checked with the
                // signature; checked again here, since the fold is pure.)
                b.check()?;
                for a in b.units() {
                    self.check_hold(&a)?;
                }
                let changes = b
                    .units()
                    .map(|a| self.hold(meta, &a))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Change::Batch(changes))
            }
            Event::CloneFailed(f) => {
                let m = self.member(&f.hsm)?;
                let key = self
                    .keys
                    .get_mut(&f.key_id)
                    .ok_or_else(|| refuse::unknown_key(f.key_id))?;
                // Only a permanent failure is final. A passing one (a full
                // disk) is never logged by current agents, which retry it;
                // one logged by an older agent leaves the clone pending, so
                // the next reconcile sends it again.
                if !f.reason.is_permanent() {
                    return Ok(Change::Other);
                }
                if !key.holders.contains(m) && !key.failed.contains(m) && !key.deleted {
                    key.failed.insert(m);
                    self.failed[m as usize] += 1;
                }
                self.clone_failures += 1;
                Ok(Change::Other)
            }
            Event::KeyReplicated(r) => {
                let key = self
                    .keys
                    .get_mut(&r.key_id)
                    .ok_or_else(|| refuse::unknown_key(r.key_id))?;
                key.announced = true;
                Ok(Change::Other)
            }
            Event::KeyDeleted(d) => {
                let deleter = self.member(&d.hsm)?;
                let Some(key) = self.keys.get_mut(&d.key_id) else {
                    // Its creation was purged before this fold saw it: keep
                    // the tombstone so nothing brings it back.
                    self.keys.insert(
                        d.key_id,
                        KeyState {
                            key_type: KeyType::Aes256,
                            fingerprint: d.fingerprint,
                            created_seq: 0,
                            created_ns: meta.stored_at_ns,
                            holders: MemberSet::default(),
                            failed: MemberSet::default(),
                            completed: None,
                            announced: true,
                            wanted: 0,
                            deleted: true,
                        },
                    );
                    return Ok(Change::Deleted);
                };
                if key.deleted {
                    return Ok(Change::Other);
                }
                let was_met = durability_met(key);
                key.deleted = true;
                self.live_keys -= 1;
                self.live_by_type[type_index(key.key_type)] -= 1;
                for m in key.holders.iter() {
                    self.held[m as usize] -= 1;
                    self.digests[m as usize].toggle(&d.key_id, &key.fingerprint);
                }
                for m in key.failed.iter() {
                    self.failed[m as usize] -= 1;
                }
                key.failed = MemberSet::default();
                if key.completed.is_some() {
                    self.completed -= 1;
                }
                if !was_met {
                    self.below_durability -= 1;
                }
                key.holders.remove(deleter);
                self.incomplete.remove(&d.key_id);
                Ok(Change::Deleted)
            }
            Event::KeyErased(e) => {
                let m = self.member(&e.hsm)?;
                let key = self
                    .keys
                    .get_mut(&e.key_id)
                    .ok_or_else(|| refuse::unknown_key(e.key_id))?;
                if !key.deleted {
                    return Err(refuse::erase_of_live_key(e.key_id));
                }
                key.holders.remove(m);
                Ok(Change::Other)
            }
        }
    }

    /// Every member (removed ones are no members).
    pub fn all_members(&self) -> MemberSet {
        let mut s = MemberSet::default();
        for (i, m) in self.members.iter().enumerate() {
            if !m.revoked {
                s.insert(i as u8);
            }
        }
        s
    }

    /// Whether the fold has accepted an enrollment or a join, which only
    /// the cluster key signs (directly, or through a join token it
    /// issued): the key this orchestrator checks with is the cluster's
    /// own. An orchestrator started with another cluster's identity
    /// rejects every enrollment, hence every event of the log it reads,
    /// and must not remove any (see `removal`).
    pub fn knows_cluster_key(&self) -> bool {
        !self.members.is_empty() || !self.enrolled.is_empty()
    }

    /// An enrolled HSM's identity key, as of the last event folded.
    pub fn enrolled_key(&self, hsm: &HsmId) -> Option<[u8; 32]> {
        self.enrolled.get(hsm).copied()
    }

    /// Members not declared failed.
    pub fn live_members(&self) -> MemberSet {
        let mut s = MemberSet::default();
        for (i, m) in self.members.iter().enumerate() {
            if m.live {
                s.insert(i as u8);
            }
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

    /// Whether `event` is an `HsmJoined` of a member this state says is
    /// failed (the lifecycle stream calls that `hsm.recovered`): asked
    /// before the event is applied.
    pub fn is_rejoin(&self, event: &Event) -> bool {
        match event {
            Event::HsmJoined(j) => self
                .member_index(&j.hsm)
                .and_then(|i| self.member_at(i))
                .is_some_and(|m| !m.live),
            _ => false,
        }
    }

    /// One key (live or tombstone).
    pub fn key(&self, id: &KeyId) -> Option<&KeyState> {
        self.keys.get(id)
    }

    /// Bytes the fold's state holds on the heap: the per-key tables as
    /// their allocator counts them, every per-member table by capacity,
    /// and the small ordered maps (members, enrolments, tokens, rejection
    /// counters) at their entries' size (their B-tree nodes are not
    /// visible; they do not grow with keys). What the bench divides by the
    /// keys tracked (decision 19).
    pub fn state_bytes(&self) -> usize {
        use std::mem::size_of;
        fn vec<T>(v: &Vec<T>) -> usize {
            v.capacity() * size_of::<T>()
        }
        fn btree<K, V>(m: &BTreeMap<K, V>) -> usize {
            m.len() * (size_of::<K>() + size_of::<V>())
        }
        let hsm_ids = self
            .members
            .iter()
            .map(|m| m.hsm.as_str().len())
            .sum::<usize>()
            + self.index.keys().map(|h| h.as_str().len()).sum::<usize>()
            + self
                .enrolled
                .keys()
                .map(|h| h.as_str().len())
                .sum::<usize>()
            + self
                .tokens
                .values()
                .map(|(h, _)| h.as_str().len())
                .sum::<usize>();
        self.keys.allocation_size()
            + self.incomplete.allocation_size()
            + vec(&self.members)
            + self.index.capacity() * (size_of::<(HsmId, u8)>() + 1)
            + vec(&self.held)
            + vec(&self.failed)
            + vec(&self.digests)
            + btree(&self.rejected)
            + btree(&self.early_capabilities)
            + btree(&self.enrolled)
            + btree(&self.tokens)
            + hsm_ids
    }

    /// Every key, tombstones included.
    pub fn keys(&self) -> impl Iterator<Item = (&KeyId, &KeyState)> {
        self.keys.iter()
    }

    /// The last sequence folded.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Members that neither hold nor failed a live `key`: clones
    /// outstanding (failed members included: their queue keeps commands).
    pub fn missing(&self, key: &KeyState) -> MemberSet {
        if key.deleted {
            return MemberSet::default();
        }
        self.all_members()
            .minus(self.unable[type_index(key.key_type)])
            .minus(key.holders)
            .minus(key.failed)
    }

    /// The live members able to hold keys of type `t`: a key is complete
    /// when all of them hold it.
    pub fn needed(&self, t: KeyType) -> MemberSet {
        self.live_members().minus(self.unable[type_index(t)])
    }

    /// Whether member `idx` can hold keys of type `t` (it did not announce
    /// otherwise).
    pub fn can_hold(&self, idx: u8, t: KeyType) -> bool {
        !self.unable[type_index(t)].contains(idx)
    }

    /// The key types member `idx` announced it cannot hold.
    pub fn cannot_hold(&self, idx: u8) -> Vec<KeyType> {
        KeyType::ALL
            .into_iter()
            .filter(|t| !self.can_hold(idx, *t))
            .collect()
    }

    /// Live keys member `idx` can hold (every live key, unless it announced
    /// types it cannot hold).
    fn holdable_count(&self, idx: u8) -> u64 {
        KeyType::ALL
            .into_iter()
            .filter(|t| self.can_hold(idx, *t))
            .map(|t| self.live_by_type[type_index(t)])
            .sum()
    }

    /// Member ids, by index.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.iter()
    }

    /// Number of live (not deleted) keys.
    pub fn key_count(&self) -> u64 {
        self.live_keys
    }

    /// Live keys that reached every live member at some point.
    pub fn completed_count(&self) -> u64 {
        self.completed
    }

    /// Keys whose requested durability is not met yet.
    pub fn below_durability(&self) -> u64 {
        self.below_durability
    }

    /// Clone failures seen.
    pub fn clone_failures(&self) -> u64 {
        self.clone_failures
    }

    /// Rejections by reason.
    pub fn rejected(&self) -> &BTreeMap<RejectReason, u64> {
        &self.rejected
    }

    /// Live keys member `idx` holds.
    pub fn held_by(&self, idx: u8) -> u64 {
        self.held.get(idx as usize).copied().unwrap_or(0)
    }

    /// Digest of the live keys member `idx` is known to hold.
    pub fn digest_of(&self, idx: u8) -> InventoryDigest {
        self.digests.get(idx as usize).copied().unwrap_or_default()
    }

    /// Clones outstanding for member `idx` (live keys it neither holds nor failed).
    pub fn pending_for(&self, idx: u8) -> u64 {
        if self.members.get(idx as usize).is_some_and(|m| m.revoked) {
            return 0;
        }
        let failed = self.failed.get(idx as usize).copied().unwrap_or(0);
        self.holdable_count(idx)
            .saturating_sub(self.held_by(idx) + failed)
    }

    /// Clones outstanding over every member.
    pub fn pending_clones(&self) -> u64 {
        self.held
            .iter()
            .zip(&self.failed)
            .zip(&self.members)
            .enumerate()
            .filter(|(_, (_, m))| !m.revoked)
            .map(|(i, ((h, f), _))| self.holdable_count(i as u8).saturating_sub(h + f))
            .sum()
    }

    /// A member's state: failed, syncing (lacks live keys) or in service.
    pub fn member_state(&self, idx: u8) -> MemberState {
        match self.members.get(idx as usize) {
            Some(m) if m.revoked => MemberState::Removed,
            Some(m) if !m.live => MemberState::Failed,
            _ if self.held_by(idx) < self.holdable_count(idx) => MemberState::Syncing,
            _ => MemberState::InService,
        }
    }

    /// Status for `keysync cluster status`.
    pub fn status(&self) -> ClusterStatus {
        let total = self.key_count();
        ClusterStatus {
            members: self
                .members
                .iter()
                .enumerate()
                .map(|(i, m)| MemberStatus {
                    hsm_id: m.hsm.clone(),
                    state: self.member_state(i as u8),
                    keys: self.held_by(i as u8),
                    lag: self
                        .holdable_count(i as u8)
                        .saturating_sub(self.held_by(i as u8)),
                    cannot_hold: self.cannot_hold(i as u8),
                })
                .collect(),
            keys: total,
            replicated: self.completed,
            pending_clones: self.pending_clones(),
            clone_failures: self.clone_failures,
            below_durability: self.below_durability,
            last_seq: self.last_seq,
            rejected: self.rejected.iter().map(|(k, v)| (*k, *v)).collect(),
            enrolled: self.enrolled.iter().map(|(h, k)| (h.clone(), *k)).collect(),
            cluster_key: None,
        }
    }
}

#[cfg(test)]
mod tests {
    //! Given a log, when one more event is folded, then the state is this.
    use super::*;
    use crate::testkit::*;

    /// The fold's own state stays under 200 bytes a tracked key
    /// (decision 19): N keys created on one of three members and applied
    /// on the others (complete, the usual case), counted at sizes where
    /// the key table is nearly full and just grown.
    #[test]
    fn the_fold_holds_under_200_bytes_a_tracked_key() {
        let mut log = Log::given(&[joined("a"), joined("b"), joined("c")]);
        let empty = log.state.state_bytes();
        let mut worst = 0.0f64;
        for n in 1..=30_000u32 {
            let k = KeyId(uuid::Uuid::from_u128(u128::from(n) << 64 | 7));
            let fp = n as u8;
            log.when(&created(k, "a", fp)).expect("created");
            log.when(&applied(k, "b", fp)).expect("applied on b");
            log.when(&applied(k, "c", fp)).expect("applied on c");
            if n >= 1000 {
                let per_key = (log.state.state_bytes() - empty) as f64 / f64::from(n);
                worst = worst.max(per_key);
            }
        }
        assert_eq!(log.state.key_count(), 30_000);
        let slot = std::mem::size_of::<(KeyId, KeyState)>();
        assert!(log.state.state_bytes() >= 30_000 * (slot + 1));
        assert!(worst <= 200.0, "{worst:.0} bytes a key at worst");
    }

    #[test]
    fn a_first_join_adds_a_live_member_and_a_second_does_not() {
        // Given a fresh cluster
        let mut log = Log::given(&[]);
        // When a joins
        assert_eq!(log.when(&joined("a")), Ok(Change::NewMember(0)));
        // Then it is a live member in service (no keys to lack)
        assert_eq!(log.state.members().count(), 1);
        assert_eq!(log.state.member_state(0), MemberState::InService);
        let m = log.state.member_at(0).expect("member 0");
        assert_eq!((m.first_seq, m.joined_seq, m.live), (1, 1, true));
        // When it joins again, then it is the same member, rejoined later
        assert_eq!(log.when(&joined("a")), Ok(Change::Other));
        assert_eq!(log.state.members().count(), 1);
        let m = log.state.member_at(0).expect("member 0");
        assert_eq!((m.first_seq, m.joined_seq), (1, 2));
    }

    #[test]
    fn a_cluster_is_full_at_64_members() {
        let names: Vec<String> = (0..MAX_MEMBERS).map(|i| format!("h{i}")).collect();
        let events: Vec<Event> = names.iter().map(|n| joined(n)).collect();
        let mut log = Log::given(&events);
        assert_eq!(log.state.members().count(), MAX_MEMBERS);
        assert_eq!(
            log.when(&joined("one-more")).map_err(|r| r.reason),
            Err(RejectReason::TooManyMembers)
        );
        assert_eq!(
            log.state.rejected().get(&RejectReason::TooManyMembers),
            Some(&1)
        );
        // A member already in still rejoins.
        assert_eq!(log.when(&joined("h3")), Ok(Change::Other));
    }

    #[test]
    fn a_created_key_is_held_by_its_creator_and_outstanding_for_the_rest() {
        let k = KeyId::new();
        let mut log = Log::given(&[joined("a"), joined("b"), joined("c")]);
        assert_eq!(
            log.when(&created(k, "b", 1)),
            Ok(Change::Held {
                member: 1,
                latency_ns: 0,
                completed: false
            })
        );
        let key = log.state.key(&k).expect("the key");
        assert_eq!((key.created_seq, key.created_ns), (4, 4_000_000));
        assert_eq!(key.holders.iter().collect::<Vec<_>>(), vec![1]);
        assert_eq!(
            log.state.missing(key).iter().collect::<Vec<_>>(),
            vec![0, 2]
        );
        assert_eq!(log.state.key_count(), 1);
        assert_eq!(
            (
                log.state.held_by(0),
                log.state.held_by(1),
                log.state.held_by(2)
            ),
            (0, 1, 0)
        );
        assert_eq!((log.state.pending_for(0), log.state.pending_for(1)), (1, 0));
        assert_eq!(log.state.pending_clones(), 2);
        assert_eq!(log.state.member_state(0), MemberState::Syncing);
        assert_eq!(log.state.member_state(1), MemberState::InService);
        assert_eq!(log.state.completed_count(), 0);
    }

    #[test]
    fn a_key_created_in_a_one_member_cluster_is_complete_at_once() {
        let k = KeyId::new();
        let mut log = Log::given(&[joined("a")]);
        assert_eq!(
            log.when(&created(k, "a", 1)),
            Ok(Change::Held {
                member: 0,
                latency_ns: 0,
                completed: true
            })
        );
        assert_eq!(log.state.key(&k).and_then(|k| k.completed), Some((2, 0)));
        assert_eq!(log.state.completed_count(), 1);
    }

    #[test]
    fn a_create_by_a_stranger_or_a_conflicting_one_is_rejected() {
        let k = KeyId::new();
        let mut log = Log::given(&[joined("a"), created(k, "a", 1)]);
        assert_eq!(
            log.when(&created(KeyId::new(), "zz", 1))
                .map_err(|r| r.reason),
            Err(RejectReason::UnknownMember)
        );
        assert_eq!(
            log.when(&created(k, "a", 2)).map_err(|r| r.reason),
            Err(RejectReason::ConflictingCreate)
        );
        // The same create again (an outbox retry) changes nothing.
        assert_eq!(log.when(&created(k, "a", 1)), Ok(Change::Other));
        assert_eq!(log.state.key_count(), 1);
        assert_eq!(log.state.key(&k).map(|k| k.created_seq), Some(2));
    }

    #[test]
    fn an_apply_adds_a_holder_once_and_the_last_one_completes_the_key() {
        let k = KeyId::new();
        let mut log = Log::given(&[joined("a"), joined("b"), joined("c"), created(k, "a", 1)]);
        assert_eq!(
            log.when(&applied(k, "b", 1)),
            Ok(Change::Held {
                member: 1,
                latency_ns: 1_000_000,
                completed: false
            })
        );
        assert_eq!(log.when(&applied(k, "b", 1)), Ok(Change::Other));
        assert_eq!(
            log.when(&applied(k, "c", 1)),
            Ok(Change::Held {
                member: 2,
                latency_ns: 3_000_000,
                completed: true
            })
        );
        assert_eq!(
            log.state.key(&k).and_then(|k| k.completed),
            Some((7, 3_000_000))
        );
        assert_eq!(log.state.pending_clones(), 0);
        assert_eq!(log.state.completed_count(), 1);
        assert_eq!(log.state.member_state(2), MemberState::InService);
    }

    #[test]
    fn clone_results_about_strangers_are_rejected_and_counted() {
        let k = KeyId::new();
        let mut log = Log::given(&[joined("a"), joined("b"), created(k, "a", 1)]);
        let stranger = KeyId::new();
        assert_eq!(
            log.when(&applied(k, "b", 9)).map_err(|r| r.reason),
            Err(RejectReason::FingerprintMismatch)
        );
        assert_eq!(
            log.when(&applied(stranger, "b", 1)).map_err(|r| r.reason),
            Err(RejectReason::UnknownKey)
        );
        assert_eq!(
            log.when(&applied(k, "zz", 1)).map_err(|r| r.reason),
            Err(RejectReason::UnknownMember)
        );
        assert_eq!(
            log.when(&clone_failed(stranger, "b")).map_err(|r| r.reason),
            Err(RejectReason::UnknownKey)
        );
        assert_eq!(log.state.held_by(1), 0);
        let counts: Vec<(RejectReason, u64)> =
            log.state.rejected().iter().map(|(r, n)| (*r, *n)).collect();
        assert_eq!(
            counts,
            vec![
                (RejectReason::UnknownMember, 1),
                (RejectReason::UnknownKey, 2),
                (RejectReason::FingerprintMismatch, 1)
            ]
        );
        // Rejections still move the fold's position.
        assert_eq!(log.state.last_seq(), 7);
    }

    #[test]
    fn a_failed_clone_is_not_outstanding_until_a_later_apply_succeeds() {
        let k = KeyId::new();
        let mut log = Log::given(&[joined("a"), joined("b"), created(k, "a", 1)]);
        assert_eq!(log.when(&clone_failed(k, "b")), Ok(Change::Other));
        assert_eq!(log.state.pending_for(1), 0);
        assert_eq!(log.state.clone_failures(), 1);
        assert!(log
            .state
            .missing(log.state.key(&k).expect("key"))
            .is_empty());
        // A second report counts as a failure but not twice as failed.
        log.when(&clone_failed(k, "b")).expect("folded");
        assert_eq!(log.state.clone_failures(), 2);
        assert_eq!(log.state.pending_for(1), 0);
        // A repair that works after all.
        log.when(&applied(k, "b", 1)).expect("folded");
        assert_eq!(log.state.held_by(1), 1);
        assert_eq!(log.state.pending_for(1), 0);
        assert_eq!(log.state.status().pending_clones, 0);
    }

    #[test]
    fn a_failure_marks_a_member_failed_once_and_completes_what_it_held_up() {
        let (k1, k2) = (KeyId::new(), KeyId::new());
        let mut log = Log::given(&[
            joined("a"),
            joined("b"),
            joined("c"),
            created(k1, "a", 1),
            applied(k1, "b", 1),
            created(k2, "a", 2),
        ]);
        // k1 lacks only c; k2 lacks b and c.
        assert_eq!(
            log.when(&failed("c")),
            Ok(Change::Completed(vec![(k1, 3_000_000)]))
        );
        assert_eq!(log.state.member_state(2), MemberState::Failed);
        assert!(!log.state.live_members().contains(2));
        assert!(log.state.all_members().contains(2));
        // Still outstanding: its queue keeps its commands.
        assert_eq!(log.state.pending_for(2), 2);
        // Declared failed again: nothing more.
        assert_eq!(log.when(&failed("c")), Ok(Change::Other));
        assert_eq!(
            log.when(&failed("zz")).map_err(|r| r.reason),
            Err(RejectReason::UnknownMember)
        );
    }

    #[test]
    fn a_recovery_makes_a_member_live_again_but_not_a_removed_one() {
        let mut log = Log::given(&[joined("a"), joined("b"), failed("b")]);
        assert_eq!(log.when(&recovered("b")), Ok(Change::Other));
        assert!(log.state.member_at(1).is_some_and(|m| m.live));
        log.when(&revoked("b")).expect("folded");
        assert_eq!(log.when(&recovered("b")), Ok(Change::Other));
        assert!(log.state.member_at(1).is_some_and(|m| !m.live));
        assert_eq!(log.state.member_state(1), MemberState::Removed);
    }

    #[test]
    fn a_removed_member_leaves_the_counts_and_its_enrollment() {
        let k = KeyId::new();
        let mut log = Log::given(&[
            enrolled("b", 7),
            joined("a"),
            joined("b"),
            created(k, "a", 1),
        ]);
        assert_eq!(log.state.enrolled_key(&hsm("b")), Some([7; 32]));
        assert_eq!(log.state.pending_clones(), 1);
        // When b is removed, then k is complete, nothing is pending for b,
        // and b's key is no longer enrolled.
        assert_eq!(
            log.when(&revoked("b")),
            Ok(Change::Revoked(1, vec![(k, 1_000_000)]))
        );
        assert_eq!(log.state.enrolled_key(&hsm("b")), None);
        assert_eq!(log.state.pending_for(1), 0);
        assert_eq!(log.state.pending_clones(), 0);
        assert!(!log.state.all_members().contains(1));
        // Removed twice, or a stranger removed: nothing changes.
        assert_eq!(log.when(&revoked("b")), Ok(Change::Other));
        assert_eq!(log.when(&revoked("zz")), Ok(Change::Other));
        // Joining again makes it a member (and live) again.
        assert_eq!(log.when(&joined("b")), Ok(Change::Other));
        assert_eq!(log.state.member_state(1), MemberState::Syncing);
    }

    #[test]
    fn a_join_token_enrolls_its_hsm_once_before_it_expires() {
        let mut log = Log::given(&[token_issued("b", 1, 10_000_000), token_issued("c", 2, 1)]);
        // Wrong HSM for the token.
        assert_eq!(
            log.when(&join_requested("x", 9, 1)).map_err(|r| r.reason),
            Err(RejectReason::InvalidToken)
        );
        // Expired (stored at 4 ms, expired at 1 ns).
        assert_eq!(
            log.when(&join_requested("c", 9, 2)).map_err(|r| r.reason),
            Err(RejectReason::InvalidToken)
        );
        assert_eq!(log.state.enrolled_key(&hsm("c")), None);
        // Good.
        assert_eq!(log.when(&join_requested("b", 9, 1)), Ok(Change::Other));
        assert_eq!(log.state.enrolled_key(&hsm("b")), Some([9; 32]));
        // Used up.
        assert_eq!(
            log.when(&join_requested("b", 8, 1)).map_err(|r| r.reason),
            Err(RejectReason::InvalidToken)
        );
        assert_eq!(log.state.enrolled_key(&hsm("b")), Some([9; 32]));
        assert_eq!(
            log.state.rejected().get(&RejectReason::InvalidToken),
            Some(&3)
        );
    }

    #[test]
    fn an_announcement_marks_the_key_announced() {
        let k = KeyId::new();
        let mut log = Log::given(&[joined("a"), created(k, "a", 1)]);
        assert!(log.state.key(&k).is_some_and(|k| !k.announced));
        assert_eq!(log.when(&replicated(k, 1)), Ok(Change::Other));
        assert!(log.state.key(&k).is_some_and(|k| k.announced));
        let stranger = KeyId::new();
        assert_eq!(
            log.when(&replicated(stranger, 1)).map_err(|r| r.reason),
            Err(RejectReason::UnknownKey)
        );
    }

    #[test]
    fn a_deletion_leaves_a_tombstone_that_holders_erase() {
        let k = KeyId::new();
        let mut log = Log::given(&[
            joined("a"),
            joined("b"),
            joined("c"),
            created(k, "a", 1),
            applied(k, "b", 1),
        ]);
        // When b deletes it
        assert_eq!(log.when(&deleted(k, "b", 1)), Ok(Change::Deleted));
        // Then it counts nowhere, and a (the other holder) is yet to erase it
        let key = log.state.key(&k).expect("tombstone");
        assert!(key.deleted);
        assert_eq!(key.holders.iter().collect::<Vec<_>>(), vec![0]);
        assert_eq!(log.state.key_count(), 0);
        assert_eq!((log.state.held_by(0), log.state.held_by(1)), (0, 0));
        assert_eq!(log.state.pending_clones(), 0);
        assert_eq!(log.state.digest_of(0), InventoryDigest::default());
        assert!(log.state.missing(key).is_empty());
        // Deleted twice: nothing more.
        assert_eq!(log.when(&deleted(k, "a", 1)), Ok(Change::Other));
        // When a erases it, then nobody is left to erase it.
        assert_eq!(log.when(&erased(k, "a")), Ok(Change::Other));
        assert!(log.state.key(&k).is_some_and(|k| k.holders.is_empty()));
    }

    #[test]
    fn an_erase_of_a_live_key_is_rejected() {
        let k = KeyId::new();
        let mut log = Log::given(&[joined("a"), created(k, "a", 1)]);
        assert_eq!(
            log.when(&erased(k, "a")).map_err(|r| r.reason),
            Err(RejectReason::EraseOfLiveKey)
        );
        assert_eq!(log.state.held_by(0), 1);
    }

    #[test]
    fn a_deletion_whose_creation_was_purged_keeps_a_tombstone() {
        let k = KeyId::new();
        let mut log = Log::given(&[joined("a"), joined("b")]);
        assert_eq!(log.when(&deleted(k, "a", 1)), Ok(Change::Deleted));
        let key = log.state.key(&k).expect("tombstone");
        assert!(key.deleted && key.announced);
        assert_eq!(key.created_seq, 0);
        // The create, seen late (replayed), cannot bring it back: refused.
        assert_eq!(
            log.when(&created(k, "a", 1)).map_err(|r| r.reason),
            Err(RejectReason::CreateOfDeletedKey)
        );
        assert_eq!(log.state.key_count(), 0);
        assert!(log.state.key(&k).is_some_and(|k| k.deleted));
    }

    #[test]
    fn the_expected_digest_is_the_set_a_member_holds() {
        let (k1, k2) = (KeyId::new(), KeyId::new());
        let log = Log::given(&[
            joined("a"),
            joined("b"),
            created(k1, "a", 1),
            created(k2, "a", 2),
            applied(k2, "b", 2),
        ]);
        let mut both = InventoryDigest::default();
        both.toggle(&k1, &Fingerprint([1; 32]));
        both.toggle(&k2, &Fingerprint([2; 32]));
        let mut only_k2 = InventoryDigest::default();
        only_k2.toggle(&k2, &Fingerprint([2; 32]));
        assert_eq!(log.state.digest_of(0), both);
        assert_eq!(log.state.digest_of(1), only_k2);
        // Out of range: empty, not a panic.
        assert_eq!(log.state.digest_of(9), InventoryDigest::default());
        assert_eq!(log.state.held_by(9), 0);
    }

    #[test]
    fn an_event_rejected_before_the_fold_still_moves_its_position() {
        let mut log = Log::given(&[joined("a")]);
        log.state.reject_at(9, RejectReason::BadSignature);
        assert_eq!(log.state.last_seq(), 9);
        assert_eq!(
            log.state.rejected().get(&RejectReason::BadSignature),
            Some(&1)
        );
        // An older sequence does not move it back.
        log.state.reject_at(5, RejectReason::BadSignature);
        assert_eq!(log.state.last_seq(), 9);
        assert_eq!(
            log.state.rejected().get(&RejectReason::BadSignature),
            Some(&2)
        );
    }

    #[test]
    fn durability_counts_until_enough_members_hold_the_key() {
        let k = KeyId::new();
        let mut log = Log::given(&[joined("a"), joined("b"), joined("c")]);
        log.when(&created_with(k, "a", 1, Durability::Replicas(2)))
            .expect("folded");
        assert_eq!(log.state.below_durability(), 1);
        log.when(&applied(k, "b", 1)).expect("folded");
        assert_eq!(log.state.below_durability(), 0);
        // A deleted key below its durability no longer counts.
        let k2 = KeyId::new();
        log.when(&created_with(k2, "a", 2, Durability::All))
            .expect("folded");
        assert_eq!(log.state.below_durability(), 1);
        log.when(&deleted(k2, "a", 2)).expect("folded");
        assert_eq!(log.state.below_durability(), 0);
    }

    #[test]
    fn status_reports_each_member_and_the_totals() {
        let k = KeyId::new();
        let log = Log::given(&[
            joined("a"),
            joined("b"),
            joined("c"),
            created(k, "a", 1),
            failed("c"),
        ]);
        let s = log.state.status();
        let members: Vec<(&str, MemberState, u64, u64)> = s
            .members
            .iter()
            .map(|m| (m.hsm_id.as_str(), m.state, m.keys, m.lag))
            .collect();
        assert_eq!(
            members,
            vec![
                ("a", MemberState::InService, 1, 0),
                ("b", MemberState::Syncing, 0, 1),
                ("c", MemberState::Failed, 0, 1),
            ]
        );
        assert_eq!((s.keys, s.replicated, s.pending_clones), (1, 0, 2));
        assert_eq!(s.last_seq, 5);
    }

    #[test]
    fn member_sets_add_remove_and_compare() {
        let mut s = MemberSet::default();
        assert!(s.is_empty());
        s.insert(0);
        s.insert(63);
        s.insert(5);
        assert_eq!(s.len(), 3);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 5, 63]);
        let mut t = MemberSet::default();
        t.insert(5);
        assert!(s.covers(t));
        assert!(!t.covers(s));
        assert_eq!(s.minus(t).iter().collect::<Vec<_>>(), vec![0, 63]);
        s.remove(63);
        assert!(!s.contains(63));
    }
}
