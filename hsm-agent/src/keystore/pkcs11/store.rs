//! [`Pkcs11Keystore`]: an HSM behind a PKCS#11 token, as a [`Keystore`].
//!
//! The token holds the keys; the agent's [`Journal`] (`pkcs11-journal.redb`
//! in the data dir) holds what the cluster protocol needs besides: each
//! key's record, the tombstones, the outbox, and the intents that make a
//! crash between a token call and a journal commit recoverable (see the
//! journal's module doc and docs/decisions/0012-pkcs11-keystore.md). The
//! rules of the embedded backend apply unchanged: ids are never reused,
//! clones are idempotent and checked, a clone of an id this HSM made
//! itself waits (`Undecided`) until the log decides.
//!
//! Every method blocks on the token; the agent calls the keystore from
//! `spawn_blocking`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use keysync_schemas::{
    CloneFailure, CloneKey, DigestSignScheme, DomainId, Fingerprint, GcmParams, HsmId,
    InventoryDigest, KeyId, KeyInfo, KeyType, Timestamp,
};
use zeroize::Zeroizing;

use super::{check_domain_key, ExpectedDomain, Kek, Pkcs11Error, Token, TokenKey, UnwrapRequest};
use crate::keystore::journal::{Change, Journal, Record};
use crate::keystore::{
    CloneOutcome, CreatedKey, KeySource, Keystore, KeystoreError, NewKey, OutboxEntry,
};
use crate::material::KeyMaterial;

/// The journal's file in the data dir.
pub const JOURNAL_FILE: &str = "pkcs11-journal.redb";

/// Where the keystore is in a create or a delete; [`Pkcs11Keystore::on_step`]
/// sees each, so a test can stop the process at exactly that point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The token object of a new key exists; its record is not committed.
    ObjectCreated(KeyId),
    /// A delete's tombstone is committed; the token object still exists.
    Tombstoned(KeyId),
}

/// What the keystore knows of one key.
#[derive(Debug, Clone)]
struct Held {
    info: KeyInfo,
    /// Created here, its `KeyCreated` still in the outbox: the log has not
    /// decided whether the id was free.
    unlogged: bool,
}

/// What start-up reconciliation found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Ids in doubt whose token objects were destroyed (a create that
    /// never answered, or a delete cut short).
    pub destroyed: Vec<KeyId>,
    /// Records whose token object is gone (removed behind the agent's
    /// back): forgotten, so the cluster's repair clones them in again.
    pub lost: Vec<KeyId>,
    /// Token objects with keysync-shaped ids that the journal does not
    /// know and that were never in doubt: left alone (another
    /// application's keys, or a copy of the token from elsewhere).
    pub foreign: usize,
}

type StepHook = Box<dyn Fn(Step) + Send + Sync>;

/// An id reserved in [`Pkcs11Keystore::busy`]; released on drop.
struct Reserved<'a> {
    busy: &'a Mutex<HashSet<KeyId>>,
    id: KeyId,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if let Ok(mut b) = self.busy.lock() {
            b.remove(&self.id);
        }
    }
}

/// A PKCS#11 token as keysync's HSM.
pub struct Pkcs11Keystore {
    hsm: HsmId,
    domain: DomainId,
    token: Arc<Token>,
    journal: Journal,
    /// The types this token can hold, from the capability probe.
    holdable: Vec<KeyType>,
    keys: RwLock<BTreeMap<KeyId, Held>>,
    tombstones: RwLock<HashSet<KeyId>>,
    digest: Mutex<InventoryDigest>,
    /// Ids a create, clone or delete is working on: one operation per id
    /// at a time, while operations on other ids run in parallel in the
    /// token (an HSM's keygen is the slow part).
    busy: Mutex<HashSet<KeyId>>,
    step: Option<StepHook>,
    reconciled: Reconciled,
}

fn storage(e: impl std::fmt::Display) -> KeystoreError {
    KeystoreError::Storage(e.to_string())
}

/// A token error as a clone failure: a transient one passes (the command
/// stays queued and is tried again), never "the key is bad".
fn clone_failure(e: Pkcs11Error) -> CloneFailure {
    match e {
        Pkcs11Error::Integrity => CloneFailure::Integrity,
        Pkcs11Error::Mismatch(_) => CloneFailure::FingerprintMismatch,
        Pkcs11Error::Invalid(_) => CloneFailure::InvalidMaterial,
        Pkcs11Error::Unsupported { what, why } => {
            CloneFailure::Unsupported(format!("{what}: {why}"))
        }
        other => CloneFailure::Storage(other.to_string()),
    }
}

impl Pkcs11Keystore {
    /// Opens the token's keystore: checks that the token holds the
    /// cluster's domain key (refusing to start otherwise), probes what the
    /// token can hold, opens the journal in `data_dir` and reconciles the
    /// token with it. Blocks.
    pub fn open(
        token: Arc<Token>,
        data_dir: &Path,
        hsm: HsmId,
        domain: ExpectedDomain,
    ) -> Result<Self, KeystoreError> {
        let check = check_domain_key(&token, &domain)?;
        let caps = token.capabilities()?;
        let holdable = caps
            .iter()
            .filter(|(_, s)| s.can_receive() && s.can_create_clonable())
            .map(|(t, _)| t)
            .collect();
        let (journal, contents) = Journal::open(data_dir, JOURNAL_FILE)?;
        let mut store = Pkcs11Keystore {
            hsm,
            domain: check.domain,
            token,
            journal,
            holdable,
            keys: RwLock::new(BTreeMap::new()),
            tombstones: RwLock::new(contents.tombstones),
            digest: Mutex::new(InventoryDigest::default()),
            busy: Mutex::new(HashSet::new()),
            step: None,
            reconciled: Reconciled::default(),
        };
        let mut records = contents.records;
        store.reconciled = store.reconcile(&mut records, &contents.intents)?;
        let mut digest = InventoryDigest::default();
        let mut keys = BTreeMap::new();
        for (id, rec) in records {
            digest.toggle(&id, &rec.fingerprint);
            keys.insert(
                id,
                Held {
                    unlogged: contents.outbox.contains(&id),
                    info: KeyInfo {
                        key_id: id,
                        key_type: rec.key_type,
                        fingerprint: rec.fingerprint,
                        session: false,
                        attributes: rec.attributes,
                        hsm: store.hsm.clone(),
                        stored_at: rec.stored_at,
                    },
                },
            );
        }
        store.keys = RwLock::new(keys);
        store.digest = Mutex::new(digest);
        Ok(store)
    }

    /// Calls `hook` at each [`Step`] (tests stop the process there).
    pub fn on_step(&mut self, hook: impl Fn(Step) + Send + Sync + 'static) {
        self.step = Some(Box::new(hook));
    }

    /// What start-up reconciliation found.
    pub fn reconciled(&self) -> &Reconciled {
        &self.reconciled
    }

    /// The token.
    pub fn token(&self) -> &Token {
        &self.token
    }

    fn stepped(&self, step: Step) {
        if let Some(h) = &self.step {
            h(step);
        }
    }

    /// Makes the token match the journal: ids in doubt with no record
    /// lose their objects; records with no object are forgotten.
    fn reconcile(
        &self,
        records: &mut BTreeMap<KeyId, Record>,
        intents: &[KeyId],
    ) -> Result<Reconciled, KeystoreError> {
        let mut out = Reconciled::default();
        for id in intents {
            if !records.contains_key(id) && self.token.delete(id)? {
                tracing::warn!(key_id = %id, "destroyed the token objects of a key the journal does not hold (a create or delete cut short)");
                out.destroyed.push(*id);
            }
        }
        let settled: Vec<Change<'_>> = intents.iter().map(|id| Change::Settle(*id)).collect();
        self.journal.commit(&settled)?;
        let on_token: HashSet<KeyId> = self.token.list()?.into_iter().map(|k| k.id).collect();
        for id in records.keys() {
            if !on_token.contains(id) {
                out.lost.push(*id);
            }
        }
        for id in &out.lost {
            tracing::error!(key_id = %id, "the token no longer holds this key; forgetting it so the cluster clones it in again");
            records.remove(id);
        }
        let forgotten: Vec<Change<'_>> = out.lost.iter().map(|id| Change::Remove(*id)).collect();
        self.journal.commit(&forgotten)?;
        let tombstones = self.tombstones.read().map_err(storage)?;
        out.foreign = on_token
            .iter()
            .filter(|id| !records.contains_key(id) && !tombstones.contains(id))
            .count();
        if out.foreign > 0 {
            tracing::info!(
                count = out.foreign,
                "the token holds keys with key-id-shaped CKA_IDs that keysync did not make here; left alone"
            );
        }
        Ok(out)
    }

    /// Reserves `id` for one operation; `None` if another has it.
    fn reserve(&self, id: KeyId) -> Result<Option<Reserved<'_>>, KeystoreError> {
        let mut busy = self.busy.lock().map_err(storage)?;
        Ok(busy.insert(id).then_some(Reserved {
            busy: &self.busy,
            id,
        }))
    }

    fn held(&self, id: &KeyId) -> Result<Held, KeystoreError> {
        self.keys
            .read()
            .map_err(storage)?
            .get(id)
            .cloned()
            .ok_or(KeystoreError::NotFound(*id))
    }

    fn is_tombstoned(&self, id: &KeyId) -> bool {
        self.tombstones.read().is_ok_and(|t| t.contains(id))
    }

    fn toggle_digest(&self, id: &KeyId, fp: &Fingerprint) {
        if let Ok(mut d) = self.digest.lock() {
            d.toggle(id, fp);
        }
    }

    fn refuse_unholdable(&self, key_type: KeyType) -> Result<(), KeystoreError> {
        if self.holdable.contains(&key_type) {
            return Ok(());
        }
        let support = self.token.capabilities()?.get(key_type);
        let why = [
            &support.generate,
            &support.operate,
            &support.wrap,
            &support.unwrap,
        ]
        .into_iter()
        .find_map(|c| c.refusal())
        .unwrap_or("the capability probe refused it")
        .to_string();
        Err(KeystoreError::CannotHold { key_type, why })
    }

    /// Makes the key's objects in the token.
    fn make(&self, key: &NewKey<'_>, label: Option<&str>) -> Result<TokenKey, KeystoreError> {
        let t = key.key_type;
        Ok(match &key.source {
            KeySource::Generate => self.token.generate(key.id, t, label)?,
            KeySource::Import(bytes) => {
                // The caller sent the material in the clear; it is in
                // memory only as long as it takes to derive its public key.
                let material = KeyMaterial::from_bytes(t, bytes)?;
                let public = material.public_key_der()?;
                let plain: Zeroizing<Vec<u8>> = material.to_bytes()?;
                let made = self
                    .token
                    .import(key.id, t, label, &plain, public.as_deref())?;
                if made.fingerprint != material.fingerprint()? {
                    let _ = self.token.delete(&key.id);
                    return Err(KeystoreError::Integrity);
                }
                made
            }
            KeySource::Unwrap { wrapping_key, blob } => {
                let wk = self.held(wrapping_key)?;
                if wk.info.key_type != KeyType::Aes256 {
                    return Err(KeystoreError::NotAWrappingKey(*wrapping_key));
                }
                if t.is_asymmetric() {
                    return Err(KeystoreError::CannotHold {
                        key_type: t,
                        why: "a private key unwrapped under an application key needs its public \
                              key, which a PKCS#11 token does not derive; import it (the agent \
                              derives it) or create it here"
                            .to_string(),
                    });
                }
                self.token.unwrap(&UnwrapRequest {
                    id: key.id,
                    key_type: t,
                    label,
                    kek: Kek::Key(*wrapping_key),
                    blob,
                    public_key: None,
                    fingerprint: None,
                })?
            }
        })
    }

    fn create_session_key(&self, key: NewKey<'_>) -> Result<CreatedKey, KeystoreError> {
        if !matches!(key.source, KeySource::Generate) {
            return Err(KeystoreError::CannotHold {
                key_type: key.key_type,
                why: "session keys on a PKCS#11 token are generated in it; imported or \
                      unwrapped keys are token keys"
                    .to_string(),
            });
        }
        let label = key.attributes.label.clone();
        let made = self
            .token
            .generate_session_key(key.id, key.key_type, label.as_deref())?;
        let info = KeyInfo {
            key_id: key.id,
            key_type: key.key_type,
            fingerprint: made.fingerprint,
            session: true,
            attributes: key.attributes,
            hsm: self.hsm.clone(),
            stored_at: Timestamp::now(),
        };
        self.keys.write().map_err(storage)?.insert(
            key.id,
            Held {
                info: info.clone(),
                unlogged: false,
            },
        );
        Ok(CreatedKey {
            info,
            origin: key.source.origin(),
            wrapped: Vec::new(),
            public_key: made.public_key,
            domain: self.domain,
        })
    }

    /// Checks one clone against what is held, without touching the token.
    fn check_clone(&self, cmd: &CloneKey) -> Result<Option<()>, CloneFailure> {
        let k = &cmd.key;
        if k.domain != self.domain {
            return Err(CloneFailure::WrongDomain);
        }
        if !self.holdable.contains(&k.key_type) {
            return Err(CloneFailure::Unsupported(format!(
                "this HSM's token cannot hold {} keys",
                k.key_type
            )));
        }
        if let Ok(existing) = self.held(&k.key_id) {
            return if existing.info.fingerprint == k.fingerprint && !existing.info.session {
                Ok(None)
            } else if !existing.info.session && existing.unlogged {
                Err(CloneFailure::Undecided)
            } else {
                Err(CloneFailure::Conflict)
            };
        }
        Ok(Some(()))
    }
}

impl Keystore for Pkcs11Keystore {
    fn hsm_id(&self) -> &HsmId {
        &self.hsm
    }

    fn domain_id(&self) -> DomainId {
        self.domain
    }

    fn holdable_types(&self) -> Vec<KeyType> {
        self.holdable.clone()
    }

    fn create(
        &self,
        key: NewKey<'_>,
        outbox: &mut dyn FnMut(&CreatedKey) -> Result<OutboxEntry, String>,
    ) -> Result<CreatedKey, KeystoreError> {
        // Another operation on this id right now: a create of the same id
        // (it exists, or is about to) or a clone of it.
        let Some(_r) = self.reserve(key.id)? else {
            return Err(KeystoreError::AlreadyExists(key.id));
        };
        if self.is_tombstoned(&key.id) {
            return Err(KeystoreError::Deleted(key.id));
        }
        if self.held(&key.id).is_ok() {
            return Err(KeystoreError::AlreadyExists(key.id));
        }
        if key.session {
            return self.create_session_key(key);
        }
        self.refuse_unholdable(key.key_type)?;
        let id = key.id;
        let label = key.attributes.label.clone();
        self.journal.commit(&[Change::Intend(id)])?;
        let made = match self.make(&key, label.as_deref()) {
            Ok(m) => m,
            Err(e) => {
                // Nothing was made (the token layer leaves nothing behind);
                // the intent goes. If this commit fails, start-up settles it.
                let _ = self.journal.commit(&[Change::Settle(id)]);
                return Err(e);
            }
        };
        self.stepped(Step::ObjectCreated(id));
        let mut finish = || -> Result<(CreatedKey, Record, OutboxEntry), KeystoreError> {
            let wrapped = self.token.wrap(&id)?;
            let info = KeyInfo {
                key_id: id,
                key_type: key.key_type,
                fingerprint: made.fingerprint,
                session: false,
                attributes: key.attributes.clone(),
                hsm: self.hsm.clone(),
                stored_at: Timestamp::now(),
            };
            let created = CreatedKey {
                origin: key.source.origin(),
                wrapped,
                public_key: made.public_key.clone(),
                domain: self.domain,
                info,
            };
            let event = outbox(&created).map_err(storage)?;
            let record = Record::new(
                key.key_type,
                made.fingerprint,
                key.attributes.clone(),
                created.info.stored_at,
            );
            Ok((created, record, event))
        };
        let done = finish().and_then(|(created, record, event)| {
            self.journal.commit(&[
                Change::Put(id, &record),
                Change::Outbox(id, &event),
                Change::Settle(id),
            ])?;
            Ok(created)
        });
        match done {
            Ok(created) => {
                self.toggle_digest(&id, &created.info.fingerprint);
                self.keys.write().map_err(storage)?.insert(
                    id,
                    Held {
                        info: created.info.clone(),
                        unlogged: true,
                    },
                );
                Ok(created)
            }
            Err(e) => {
                // Undo the object; the intent stays if this fails, and the
                // next start destroys it.
                if self.token.delete(&id).is_ok() {
                    let _ = self.journal.commit(&[Change::Settle(id)]);
                }
                Err(match e {
                    KeystoreError::Storage(detail) => {
                        KeystoreError::Storage(format!("key {id} was not stored: {detail}"))
                    }
                    other => other,
                })
            }
        }
    }

    fn apply_clones(&self, clones: &[&CloneKey]) -> Vec<Result<CloneOutcome, CloneFailure>> {
        let mut reserved = Vec::new();
        let mut results: Vec<Result<CloneOutcome, CloneFailure>> = Vec::with_capacity(clones.len());
        let mut todo: Vec<usize> = Vec::new();
        let mut seen: HashMap<KeyId, Fingerprint> = HashMap::new();
        for (i, cmd) in clones.iter().enumerate() {
            let k = &cmd.key;
            if let Some(fp) = seen.get(&k.key_id) {
                results.push(if *fp == k.fingerprint {
                    Ok(CloneOutcome::AlreadyPresent)
                } else {
                    Err(CloneFailure::Conflict)
                });
                continue;
            }
            match self.reserve(k.key_id) {
                Ok(Some(r)) => reserved.push(r),
                // This HSM is creating (or deleting) the id right now: the
                // log decides, and the command is tried again.
                Ok(None) => {
                    results.push(Err(CloneFailure::Undecided));
                    continue;
                }
                Err(e) => {
                    results.push(Err(CloneFailure::Storage(e.to_string())));
                    continue;
                }
            }
            if self.is_tombstoned(&k.key_id) {
                results.push(Ok(CloneOutcome::Tombstoned));
                continue;
            }
            match self.check_clone(cmd) {
                Ok(None) => results.push(Ok(CloneOutcome::AlreadyPresent)),
                Ok(Some(())) => {
                    seen.insert(k.key_id, k.fingerprint);
                    todo.push(i);
                    results.push(Ok(CloneOutcome::Stored));
                }
                Err(f) => results.push(Err(f)),
            }
        }
        if todo.is_empty() {
            return results;
        }
        let intents: Vec<Change<'_>> = todo
            .iter()
            .map(|&i| Change::Intend(clones[i].key.key_id))
            .collect();
        if let Err(e) = self.journal.commit(&intents) {
            for &i in &todo {
                results[i] = Err(CloneFailure::Storage(e.to_string()));
            }
            return results;
        }
        let mut stored: Vec<(usize, Record)> = Vec::new();
        let mut settle: Vec<KeyId> = Vec::new();
        for &i in &todo {
            let k = &clones[i].key;
            let label = k.attributes.label.as_deref();
            match self.token.unwrap(&UnwrapRequest {
                id: k.key_id,
                key_type: k.key_type,
                label,
                kek: Kek::Domain,
                blob: &k.wrapped,
                public_key: k.public_key.as_deref(),
                fingerprint: Some(k.fingerprint),
            }) {
                Ok(_) => stored.push((
                    i,
                    Record::new(
                        k.key_type,
                        k.fingerprint,
                        k.attributes.clone(),
                        Timestamp::now(),
                    ),
                )),
                Err(e) => {
                    settle.push(k.key_id);
                    results[i] = Err(clone_failure(e));
                }
            }
        }
        let mut changes: Vec<Change<'_>> = Vec::new();
        for (i, rec) in &stored {
            let id = clones[*i].key.key_id;
            changes.push(Change::Put(id, rec));
            changes.push(Change::Settle(id));
        }
        changes.extend(settle.iter().map(|id| Change::Settle(*id)));
        match self.journal.commit(&changes) {
            Ok(()) => {
                if let Ok(mut keys) = self.keys.write() {
                    for (i, rec) in stored {
                        let k = &clones[i].key;
                        self.toggle_digest(&k.key_id, &k.fingerprint);
                        keys.insert(
                            k.key_id,
                            Held {
                                unlogged: false,
                                info: KeyInfo {
                                    key_id: k.key_id,
                                    key_type: k.key_type,
                                    fingerprint: k.fingerprint,
                                    session: false,
                                    attributes: rec.attributes,
                                    hsm: self.hsm.clone(),
                                    stored_at: rec.stored_at,
                                },
                            },
                        );
                    }
                }
            }
            Err(e) => {
                // Take the objects out again; those that stay are destroyed
                // at the next start (their intents are still journaled).
                for (i, _) in &stored {
                    let _ = self.token.delete(&clones[*i].key.key_id);
                    results[*i] = Err(CloneFailure::Storage(e.to_string()));
                }
            }
        }
        results
    }

    fn sign(&self, id: &KeyId, data: &[u8]) -> Result<Vec<u8>, KeystoreError> {
        self.held(id)?;
        Ok(self.token.sign(id, data)?)
    }

    fn verify(&self, id: &KeyId, data: &[u8], signature: &[u8]) -> Result<bool, KeystoreError> {
        self.held(id)?;
        Ok(self.token.verify(id, data, signature)?)
    }

    fn encrypt(&self, id: &KeyId, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeystoreError> {
        self.held(id)?;
        Ok(self.token.encrypt(id, plaintext, aad)?)
    }

    fn decrypt(
        &self,
        id: &KeyId,
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
        self.held(id)?;
        Ok(self.token.decrypt(id, ciphertext, aad)?)
    }

    fn sign_digest(
        &self,
        id: &KeyId,
        scheme: &DigestSignScheme,
        digest: &[u8],
    ) -> Result<Vec<u8>, KeystoreError> {
        self.held(id)?;
        Ok(self.token.sign_digest(id, scheme, digest)?)
    }

    fn encrypt_gcm(
        &self,
        id: &KeyId,
        params: &GcmParams,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KeystoreError> {
        self.held(id)?;
        Ok(self.token.encrypt_gcm(id, params, plaintext)?)
    }

    fn decrypt_gcm(
        &self,
        id: &KeyId,
        params: &GcmParams,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
        self.held(id)?;
        Ok(self.token.decrypt_gcm(id, params, sealed)?)
    }

    fn public_key(&self, id: &KeyId) -> Result<Vec<u8>, KeystoreError> {
        self.held(id)?;
        Ok(self.token.public_key(id)?)
    }

    fn info(&self, id: &KeyId) -> Result<KeyInfo, KeystoreError> {
        Ok(self.held(id)?.info)
    }

    fn list_page(&self, after: Option<KeyId>, limit: usize) -> Vec<KeyInfo> {
        let Ok(keys) = self.keys.read() else {
            return Vec::new();
        };
        crate::keystore::page(&keys, after, limit, |(_, h)| Some(h.info.clone()))
    }

    fn key_count(&self) -> u64 {
        self.keys.read().map(|k| k.len() as u64).unwrap_or(0)
    }

    fn token_key_count(&self) -> u64 {
        self.keys
            .read()
            .map(|k| k.values().filter(|h| !h.info.session).count() as u64)
            .unwrap_or(0)
    }

    fn delete(
        &self,
        id: &KeyId,
        outbox: Option<OutboxEntry>,
    ) -> Result<Option<KeyInfo>, KeystoreError> {
        let Some(_r) = self.reserve(*id)? else {
            return Err(KeystoreError::Storage(format!(
                "key {id} is being created or cloned on this HSM right now; try the delete again"
            )));
        };
        let existing = self.held(id).ok();
        if let Some(h) = existing.as_ref().filter(|h| h.info.session) {
            // Session keys are not cluster keys: just drop it here.
            self.token.delete(id)?;
            self.keys.write().map_err(storage)?.remove(id);
            return Ok(Some(h.info.clone()));
        }
        let mut changes = vec![
            Change::Remove(*id),
            Change::Tombstone(*id),
            Change::Intend(*id),
        ];
        if let Some(event) = &outbox {
            changes.push(Change::Outbox(*id, event));
        }
        self.journal.commit(&changes)?;
        self.tombstones.write().map_err(storage)?.insert(*id);
        let removed = self.keys.write().map_err(storage)?.remove(id);
        if let Some(h) = &removed {
            self.toggle_digest(id, &h.info.fingerprint);
        }
        self.stepped(Step::Tombstoned(*id));
        match self.token.delete(id) {
            Ok(_) => {
                let _ = self.journal.commit(&[Change::Settle(*id)]);
            }
            Err(e) => {
                // The key is refused from now on; its objects go at the
                // next start (the intent stays).
                tracing::warn!(key_id = %id, error = %e, "deleted key's token objects not destroyed yet; the next start destroys them");
            }
        }
        Ok(removed.map(|h| h.info))
    }

    fn inventory_digest(&self) -> InventoryDigest {
        self.digest.lock().map(|d| *d).unwrap_or_default()
    }

    fn inventory_page(&self, after: Option<KeyId>, limit: usize) -> Vec<(KeyId, Fingerprint)> {
        let Ok(keys) = self.keys.read() else {
            return Vec::new();
        };
        crate::keystore::page(&keys, after, limit, |(id, h)| {
            (!h.info.session).then_some((*id, h.info.fingerprint))
        })
    }

    fn discard_created(
        &self,
        id: &KeyId,
        fingerprint: &Fingerprint,
        entry: &[u8],
    ) -> Result<bool, KeystoreError> {
        let Some(_r) = self.reserve(*id)? else {
            return Err(KeystoreError::Storage(format!(
                "key {id} is busy on this HSM; the discard is tried again"
            )));
        };
        let ours = self
            .held(id)
            .is_ok_and(|h| !h.info.session && h.info.fingerprint == *fingerprint);
        let mut changes = vec![Change::OutboxDone(*id, Some(entry))];
        if ours {
            changes.extend([Change::Remove(*id), Change::Intend(*id)]);
        }
        self.journal.commit(&changes)?;
        if !ours {
            return Ok(false);
        }
        self.keys.write().map_err(storage)?.remove(id);
        self.toggle_digest(id, fingerprint);
        if self.token.delete(id).is_ok() {
            let _ = self.journal.commit(&[Change::Settle(*id)]);
        }
        Ok(true)
    }

    fn outbox(&self) -> Result<Vec<(KeyId, OutboxEntry)>, KeystoreError> {
        self.journal.outbox()
    }

    fn outbox_done(&self, ids: &[KeyId]) -> Result<(), KeystoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let changes: Vec<Change<'_>> = ids.iter().map(|id| Change::OutboxDone(*id, None)).collect();
        self.journal.commit(&changes)?;
        if let Ok(mut keys) = self.keys.write() {
            for id in ids {
                if let Some(h) = keys.get_mut(id) {
                    h.unlogged = false;
                }
            }
        }
        Ok(())
    }
}
