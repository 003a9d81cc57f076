//! The embedded software HSM: keys in a redb database, encrypted at rest.
//!
//! Each token key is stored as its material sealed with AES-256-GCM under
//! an at-rest key derived (HKDF-SHA-256) from the domain key and this HSM's
//! id, with the key id, type and fingerprint as associated data, so a record
//! cannot be moved to another id or altered unnoticed. A redb write
//! transaction is atomic and durable on commit. Keys are decrypted once at
//! start and held in memory in zeroizing types; session keys live only
//! there.
//!
//! An I/O error poisons a redb `Database`: after a failed write, sync or
//! commit (a full disk, say) every later transaction fails with
//! `PreviousIo` until the database is closed and opened again. The store
//! notes such an error and reopens the database before its next use
//! (redb's recovery brings the file back to its last commit), then brings
//! its in-memory index in line with what is on disk, so it recovers once
//! the cause passes, without a restart. While the reopen fails, every
//! write fails fast with a storage error.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use keysync_schemas::{
    CloneFailure, CloneKey, DigestSignScheme, DomainId, Fingerprint, GcmParams, HsmId,
    InventoryDigest, KeyAttributes, KeyId, KeyInfo, KeyType, Timestamp,
};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{CloneOutcome, CreatedKey, KeySource, Keystore, KeystoreError, NewKey, OutboxEntry};
use crate::material::{open, random_bytes, seal, KeyMaterial, GCM_NONCE_LEN};
use keysync_security::domain_key::{unwrap_with, DomainKey};

const KEYS: TableDefinition<u128, &[u8]> = TableDefinition::new("keys");
const OUTBOX: TableDefinition<u128, &[u8]> = TableDefinition::new("outbox");
/// Deleted key ids, with when they were deleted (ns since the epoch).
const TOMBSTONES: TableDefinition<u128, u64> = TableDefinition::new("tombstones");
/// Version 2 added the application's key id to the attributes; version-1
/// records are read and upcast ([`read_record`]), never rewritten.
const RECORD_VERSION: u8 = 2;

/// The on-disk record of one token key (the agent's private format).
#[derive(Serialize, Deserialize)]
struct StoredRecord {
    version: u8,
    key_type: KeyType,
    fingerprint: Fingerprint,
    attributes: KeyAttributes,
    stored_at: Timestamp,
    /// nonce ‖ AES-256-GCM(material) ‖ tag.
    sealed: Vec<u8>,
}

/// A version-1 record: attributes without the application's key id.
#[derive(Serialize, Deserialize)]
struct StoredRecordV1 {
    version: u8,
    key_type: KeyType,
    fingerprint: Fingerprint,
    attributes: keysync_schemas::v1::KeyAttributes,
    stored_at: Timestamp,
    sealed: Vec<u8>,
}

/// A stored record of either version (the version is its first byte: a
/// `u8` is one byte in bincode), as the current one.
fn read_record(bytes: &[u8]) -> Result<StoredRecord, KeystoreError> {
    match bytes.first() {
        Some(&RECORD_VERSION) => Ok(bincode::serde::decode_from_slice(bytes, bincode_config())
            .map_err(storage)?
            .0),
        Some(1) => {
            let (r, _): (StoredRecordV1, usize) =
                bincode::serde::decode_from_slice(bytes, bincode_config()).map_err(storage)?;
            Ok(StoredRecord {
                version: RECORD_VERSION,
                key_type: r.key_type,
                fingerprint: r.fingerprint,
                attributes: r.attributes.into(),
                stored_at: r.stored_at,
                sealed: r.sealed,
            })
        }
        other => Err(storage(format!("unknown record version {other:?}"))),
    }
}

/// A key with its material decrypted: a session key (memory only), or a
/// token key read from its record for one operation and then dropped.
struct Entry {
    info: KeyInfo,
    material: KeyMaterial,
}

/// What the resident index keeps of one token key: enough to say whether
/// it is here, with which type and fingerprint, and whether its create is
/// still unlogged (clones, creates, the inventory digest, routing), without
/// reading redb. Everything else (attributes, when stored, the sealed
/// material) stays in its record and is read on demand: the index is
/// 34 bytes a key plus the hash table's slot (decision 19), where holding
/// every record decrypted cost ~0.75 KB a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Indexed {
    key_type: KeyType,
    fingerprint: Fingerprint,
    /// A key created here whose `KeyCreated` is still in the outbox: the
    /// log has not decided yet whether its id was free. In the index, so a
    /// clone sees the key and this flag in one read.
    unlogged: bool,
}

/// What [`EmbeddedKeystore::lookup`] found under an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    Token(Indexed),
    Session(Fingerprint),
}

/// The resident index of token keys: id → [`Indexed`]. A hash table, not
/// a B-tree, so its heap size is known exactly ([`Self::heap_bytes`]);
/// ordered pages (list, inventory) are range reads of the records table,
/// whose keys sort like ids.
#[derive(Default)]
struct KeyIndex(hashbrown::HashMap<KeyId, Indexed, std::hash::RandomState>);

impl KeyIndex {
    /// Bytes this index holds on the heap (the table's one allocation, as
    /// hashbrown counts it).
    fn heap_bytes(&self) -> usize {
        self.0.allocation_size()
    }
}

/// Opens (or creates) the database file; replaced in tests by one whose
/// disk can be made to fail.
type Opener = Box<dyn Fn(&Path) -> Result<redb::Database, redb::DatabaseError> + Send + Sync>;

/// A software HSM in one directory.
pub struct EmbeddedKeystore {
    hsm: HsmId,
    domain: DomainKey,
    at_rest: Aes256Gcm,
    path: PathBuf,
    opener: Opener,
    /// The database; `None` after an I/O error until a reopen succeeds.
    /// Transactions run under the read lock, a reopen under the write lock.
    db: RwLock<Option<redb::Database>>,
    /// redb reported an I/O error: reopen before the next transaction.
    poisoned: AtomicBool,
    /// What poisoned it, and when to try reopening next.
    fault: Mutex<Fault>,
    /// [`REOPEN_PAUSE`], but for tests.
    reopen_pause: Duration,
    /// The token keys held (their records are in redb). Locked before
    /// `sessions` where both are taken.
    index: RwLock<KeyIndex>,
    /// Session keys: memory only, never synced. Ordered by id, so list
    /// pages are range reads.
    sessions: RwLock<BTreeMap<KeyId, Arc<Entry>>>,
    /// Token keys decrypted lately (created here, or used by an
    /// operation), at most [`HOT_KEYS`]: a key signed with again and again
    /// is not read and decrypted each time, and stays usable while a
    /// full disk keeps the database closed. Bounded, so memory does not
    /// grow with the keys held.
    hot: Mutex<lru::LruCache<KeyId, Arc<Entry>>>,
    tombstones: RwLock<HashSet<KeyId>>,
    digest: Mutex<InventoryDigest>,
    /// Creates stored and waiting for their transaction (group commit).
    group: Mutex<Vec<GroupedCreate>>,
    /// Held by the create that commits the group; see [`Self::commit_grouped`].
    committer: Mutex<()>,
    /// Write transactions that stored creates (for tests and the bench).
    create_commits: AtomicU64,
}

/// One create's record and outbox entry, waiting in [`EmbeddedKeystore::group`].
struct GroupedCreate {
    id: KeyId,
    record: Vec<u8>,
    event: Vec<u8>,
    indexed: Indexed,
    /// Set by whichever create committed it.
    outcome: Arc<Mutex<Option<Result<(), KeystoreError>>>>,
}

fn storage(e: impl std::fmt::Display) -> KeystoreError {
    KeystoreError::Storage(e.to_string())
}

/// redb's page cache, in bytes. Its default (1 GiB) fills with every page
/// written, so an agent's RSS grew with its keys however small the index;
/// records read on demand come from the OS page cache past this.
const REDB_CACHE: usize = 16 * 1024 * 1024;

/// Most token keys kept decrypted in memory ([`EmbeddedKeystore::hot`]).
const HOT_KEYS: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(1024) {
    Some(n) => n,
    None => std::num::NonZeroUsize::MIN,
};

/// Least time between two attempts to reopen the database while the cause
/// of its I/O error lasts: each one reloads the index (a scan of every
/// stored key), and retried clones and heartbeats would otherwise reopen it
/// many times a second. Meanwhile writes fail at once.
const REOPEN_PAUSE: Duration = Duration::from_secs(1);

/// At most one log line this often about I/O errors and reopens (a long
/// outage would otherwise write one or two every [`REOPEN_PAUSE`]).
const FAULT_LOG_EVERY: Duration = Duration::from_secs(10);

/// The I/O errors since the store last wrote successfully.
#[derive(Default)]
struct Fault {
    /// What redb said last.
    cause: String,
    /// No reopen before this.
    not_before: Option<Instant>,
    /// Errors since the last successful write (0: none, all is well).
    errors: u64,
    /// When an error was last logged.
    logged: Option<Instant>,
}

impl Fault {
    /// Counts an error; logs it unless one was logged within
    /// [`FAULT_LOG_EVERY`] (so the first one always is).
    fn error(&mut self, e: &redb::Error) {
        self.cause = e.to_string();
        self.errors += 1;
        if self.logged.is_none_or(|t| t.elapsed() >= FAULT_LOG_EVERY) {
            tracing::warn!(error = %e, errors = self.errors, "keystore I/O error; the database is reopened before its next use");
            self.logged = Some(Instant::now());
        }
    }
}

/// Whether a redb error may have poisoned the database handle (every later
/// transaction failing until it is reopened).
pub(super) fn poisons(e: &redb::Error) -> bool {
    matches!(
        e,
        redb::Error::Io(_)
            | redb::Error::PreviousIo
            | redb::Error::Backend(_)
            | redb::Error::DatabaseClosed
            | redb::Error::LockPoisoned(_)
    )
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

fn aad(id: &KeyId, key_type: KeyType, fp: &Fingerprint) -> Vec<u8> {
    let mut a = Vec::with_capacity(80);
    a.extend_from_slice(b"keysync at-rest v1\0");
    a.extend_from_slice(id.0.as_bytes());
    a.extend_from_slice(key_type.as_str().as_bytes());
    a.push(0);
    a.extend_from_slice(&fp.0);
    a
}

/// A stored record, decoded (the material still sealed).
fn decode_stored(bytes: &[u8]) -> Result<StoredRecord, KeystoreError> {
    read_record(bytes)
}

/// The key type and fingerprint a stored record claims (not checked: the
/// material is not decrypted).
fn stored_fingerprint(bytes: &[u8]) -> Option<(KeyType, Fingerprint)> {
    let rec = read_record(bytes).ok()?;
    Some((rec.key_type, rec.fingerprint))
}

/// Makes `dir` private (0700) and the database file in it too (0600):
/// created empty with that mode if missing (redb initialises an empty
/// file), narrowed if a looser mode was left by an older version. The file
/// is sealed at rest, but its ids, fingerprints and outbox are nobody
/// else's business.
pub(super) fn private_store_file(dir: &Path, path: &Path) -> Result<(), KeystoreError> {
    use keysync_security::secret_file;
    let open_err = |e: &dyn std::fmt::Display| KeystoreError::Open(e.to_string());
    if secret_file::private_dir(dir).map_err(|e| open_err(&e))? {
        tracing::warn!(dir = %dir.display(), "the data dir was accessible to group or others; narrowed to 0700");
    }
    let mut create = std::fs::OpenOptions::new();
    create.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        create.mode(0o600);
    }
    match create.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if secret_file::private_file(path).map_err(|e| open_err(&e))? {
                tracing::warn!(file = %path.display(), "the keystore was accessible to group or others; narrowed to 0600");
            }
            Ok(())
        }
        Err(e) => Err(open_err(&format!("{}: {e}", path.display()))),
    }
}

impl EmbeddedKeystore {
    /// Opens (or creates) the store in `dir` and loads every token key.
    /// Fails if any stored key cannot be decrypted: a wrong domain key or a
    /// corrupt store is not something to serve around.
    pub fn open(dir: &Path, hsm: HsmId, domain: DomainKey) -> Result<Self, KeystoreError> {
        Self::open_with(
            dir,
            hsm,
            domain,
            Box::new(|p| redb::Builder::new().set_cache_size(REDB_CACHE).create(p)),
        )
    }

    fn open_with(
        dir: &Path,
        hsm: HsmId,
        domain: DomainKey,
        opener: Opener,
    ) -> Result<Self, KeystoreError> {
        let path = dir.join("keystore.redb");
        private_store_file(dir, &path)?;
        let db =
            opener(&path).map_err(|e| KeystoreError::Open(format!("{}: {e}", path.display())))?;
        let at_rest_key = domain.derive(hsm.as_str().as_bytes(), b"keysync at-rest v1");
        let at_rest = Aes256Gcm::new_from_slice(at_rest_key.as_ref()).map_err(storage)?;
        {
            let txn = db.begin_write().map_err(storage)?;
            txn.open_table(KEYS).map_err(storage)?;
            txn.open_table(OUTBOX).map_err(storage)?;
            txn.open_table(TOMBSTONES).map_err(storage)?;
            txn.commit().map_err(storage)?;
        }
        let store = EmbeddedKeystore {
            hsm,
            domain,
            at_rest,
            path,
            opener,
            db: RwLock::new(None),
            poisoned: AtomicBool::new(false),
            fault: Mutex::new(Fault::default()),
            reopen_pause: REOPEN_PAUSE,
            index: RwLock::new(KeyIndex::default()),
            sessions: RwLock::new(BTreeMap::new()),
            hot: Mutex::new(lru::LruCache::new(HOT_KEYS)),
            tombstones: RwLock::new(HashSet::new()),
            digest: Mutex::new(InventoryDigest::default()),
            group: Mutex::new(Vec::new()),
            committer: Mutex::new(()),
            create_commits: AtomicU64::new(0),
        };
        store.load(&db)?;
        *store.db.write().map_err(storage)? = Some(db);
        Ok(store)
    }

    /// Makes the in-memory index what `db` holds: its token keys and
    /// tombstones; session keys (memory only) are kept. Every record not
    /// already indexed with the same type and fingerprint is decrypted and
    /// checked once (a wrong domain key or a corrupt store fails here, not
    /// at some later operation), then only its index entry is kept; so
    /// reloading after a reopen is cheap.
    fn load(&self, db: &redb::Database) -> Result<(), KeystoreError> {
        let txn = db.begin_read().map_err(storage)?;
        let table = txn.open_table(KEYS).map_err(storage)?;
        let mut index = self.index.write().map_err(storage)?;
        let mut loaded = KeyIndex::default();
        let mut bad = 0usize;
        for row in table.iter().map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            let id = KeyId(uuid::Uuid::from_u128(k.value()));
            let held = index.0.get(&id).copied().filter(|e| {
                stored_fingerprint(v.value())
                    .is_some_and(|(t, fp)| t == e.key_type && fp == e.fingerprint)
            });
            if let Some(e) = held {
                loaded.0.insert(id, e);
                continue;
            }
            match self.decode_record(&id, v.value(), true) {
                Ok(entry) => {
                    loaded.0.insert(
                        id,
                        Indexed {
                            key_type: entry.info.key_type,
                            fingerprint: entry.info.fingerprint,
                            unlogged: false,
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(key_id = %id, error = %e, "stored key cannot be opened");
                    bad += 1;
                }
            }
        }
        if bad > 0 {
            return Err(KeystoreError::Open(format!(
                "{bad} stored keys cannot be decrypted: wrong domain key for this HSM, or a corrupt store"
            )));
        }
        let tombs = txn.open_table(TOMBSTONES).map_err(storage)?;
        let mut set = HashSet::new();
        for row in tombs.iter().map_err(storage)? {
            let (k, _) = row.map_err(storage)?;
            set.insert(KeyId(uuid::Uuid::from_u128(k.value())));
        }
        let outbox = txn.open_table(OUTBOX).map_err(storage)?;
        for row in outbox.iter().map_err(storage)? {
            let (k, _) = row.map_err(storage)?;
            if let Some(e) = loaded.0.get_mut(&KeyId(uuid::Uuid::from_u128(k.value()))) {
                e.unlogged = true;
            }
        }
        let mut digest = InventoryDigest::default();
        for (id, e) in &loaded.0 {
            digest.toggle(id, &e.fingerprint);
        }
        loaded.0.shrink_to_fit();
        *self.digest.lock().map_err(storage)? = digest;
        *self.tombstones.write().map_err(storage)? = set;
        // Whatever the disk holds now is what operations read.
        self.hot.lock().map_err(storage)?.clear();
        *index = loaded;
        Ok(())
    }

    /// Runs `f` on the database, reopening it first if an I/O error
    /// poisoned it. `f` reports redb errors through [`Self::db_err`].
    fn with_db<T>(
        &self,
        f: impl FnOnce(&redb::Database) -> Result<T, KeystoreError>,
    ) -> Result<T, KeystoreError> {
        if self.poisoned.load(Ordering::Acquire) {
            self.reopen()?;
        }
        let db = self.db.read().map_err(storage)?;
        let db = db.as_ref().ok_or_else(|| {
            storage("the database is closed after an I/O error and could not be reopened yet")
        })?;
        f(db)
    }

    /// A redb error as a storage error, noting that the database must be
    /// reopened if the error may have poisoned it.
    fn db_err(&self, e: impl Into<redb::Error>) -> KeystoreError {
        let e: redb::Error = e.into();
        if poisons(&e) {
            let newly = !self.poisoned.swap(true, Ordering::AcqRel);
            if let Ok(mut fault) = self.fault.lock() {
                if newly {
                    fault.not_before = Some(Instant::now() + self.reopen_pause);
                }
                fault.error(&e);
            }
        }
        storage(e)
    }

    /// A write transaction committed: if I/O errors came before, say that
    /// the store works again.
    fn written(&self) {
        if let Ok(mut fault) = self.fault.lock() {
            if fault.errors > 0 {
                tracing::info!(
                    errors = fault.errors,
                    token_keys = self.token_key_count(),
                    "keystore writes again after I/O errors"
                );
                *fault = Fault::default();
            }
        }
    }

    /// Closes the poisoned database and opens it again (redb's recovery
    /// rolls the file back to its last commit), then reloads the index
    /// from it: whatever the failed transaction did or did not leave, the
    /// memory matches the disk afterwards. Not more often than
    /// [`REOPEN_PAUSE`]: in between, fails at once with the cause.
    fn reopen(&self) -> Result<(), KeystoreError> {
        let mut slot = self.db.write().map_err(storage)?;
        if !self.poisoned.load(Ordering::Acquire) {
            return Ok(()); // another thread reopened it meanwhile
        }
        let mut fault = self.fault.lock().map_err(storage)?;
        if fault.not_before.is_some_and(|t| Instant::now() < t) {
            return Err(storage(format!(
                "the database is closed after an I/O error ({}); it is reopened when that passes",
                fault.cause
            )));
        }
        // redb locks the file: the old handle must be gone first.
        *slot = None;
        let reopened = (self.opener)(&self.path)
            .map_err(|e| {
                storage(format!(
                    "the database could not be reopened after an I/O error: {e}"
                ))
            })
            .and_then(|db| self.load(&db).map(|()| db));
        match reopened {
            Ok(db) => {
                *slot = Some(db);
                self.poisoned.store(false, Ordering::Release);
                fault.not_before = None;
                tracing::debug!(
                    token_keys = self.token_key_count(),
                    "keystore reopened after an I/O error"
                );
                Ok(())
            }
            Err(e) => {
                fault.not_before = Some(Instant::now() + self.reopen_pause);
                Err(e)
            }
        }
    }

    fn toggle_digest(&self, id: &KeyId, fp: &Fingerprint) {
        if let Ok(mut d) = self.digest.lock() {
            d.toggle(id, fp);
        }
    }

    fn is_tombstoned(&self, id: &KeyId) -> bool {
        self.tombstones.read().is_ok_and(|t| t.contains(id))
    }

    /// A stored record's key: its material decrypted (AES-256-GCM, with
    /// its id, type and fingerprint as associated data, so the record is
    /// the one sealed for this id). `check_fp` recomputes the fingerprint
    /// from the material too: done once at open; an operation reading the
    /// key on demand skips it (the seal already binds the fingerprint, and
    /// deriving a P-256 or RSA public key again costs more than the read).
    fn decode_record(
        &self,
        id: &KeyId,
        bytes: &[u8],
        check_fp: bool,
    ) -> Result<Entry, KeystoreError> {
        let rec = decode_stored(bytes)?;
        let plain = open(
            &self.at_rest,
            &rec.sealed,
            &aad(id, rec.key_type, &rec.fingerprint),
        )?;
        let material = KeyMaterial::from_bytes(rec.key_type, &plain)?;
        if check_fp && material.fingerprint()? != rec.fingerprint {
            return Err(storage("fingerprint of stored material does not match"));
        }
        Ok(Entry {
            info: self.info_of(id, rec),
            material,
        })
    }

    /// What a record says of its key, without decrypting the material.
    fn info_of(&self, id: &KeyId, rec: StoredRecord) -> KeyInfo {
        KeyInfo {
            key_id: *id,
            key_type: rec.key_type,
            fingerprint: rec.fingerprint,
            session: false,
            attributes: rec.attributes,
            hsm: self.hsm.clone(),
            stored_at: rec.stored_at,
        }
    }

    /// The stored record of a token key, if there is one.
    fn record(&self, id: &KeyId) -> Result<Option<Vec<u8>>, KeystoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| self.db_err(e))?;
            let table = txn.open_table(KEYS).map_err(|e| self.db_err(e))?;
            let row = table.get(id.0.as_u128()).map_err(|e| self.db_err(e))?;
            Ok(row.map(|v| v.value().to_vec()))
        })
    }

    /// Up to `limit` stored records with ids after `after`, in id order
    /// (the table's `u128` keys sort like the ids' bytes).
    fn records_after(
        &self,
        after: Option<KeyId>,
        limit: usize,
    ) -> Result<Vec<(KeyId, Vec<u8>)>, KeystoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| self.db_err(e))?;
            let table = txn.open_table(KEYS).map_err(|e| self.db_err(e))?;
            let range = match after {
                Some(a) => table.range((
                    std::ops::Bound::Excluded(a.0.as_u128()),
                    std::ops::Bound::Unbounded,
                )),
                None => table.range::<u128>(..),
            }
            .map_err(|e| self.db_err(e))?;
            let mut out = Vec::with_capacity(limit.min(1024));
            for row in range.take(limit) {
                let (k, v) = row.map_err(|e| self.db_err(e))?;
                out.push((KeyId(uuid::Uuid::from_u128(k.value())), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    /// Whether and how an id is held, from memory only.
    fn lookup(&self, id: &KeyId) -> Option<Found> {
        if let Some(e) = self.index.read().ok()?.0.get(id) {
            return Some(Found::Token(*e));
        }
        self.sessions
            .read()
            .ok()?
            .get(id)
            .map(|e| Found::Session(e.info.fingerprint))
    }

    /// Bytes the resident index of token keys holds on the heap (the
    /// bench divides it by the keys held).
    pub fn index_heap_bytes(&self) -> usize {
        self.index.read().map(|i| i.heap_bytes()).unwrap_or(0)
    }

    /// A record of `plain`, the key's bytes as [`KeyMaterial::from_bytes`]
    /// reads them back (a clone stores the bytes it unwrapped and parsed,
    /// not a re-encoding: re-encoding a P-256 key derives its public key
    /// again, ~0.08 ms of a clone's apply; decision 18).
    fn seal_record(&self, info: &KeyInfo, plain: &[u8]) -> Result<Vec<u8>, KeystoreError> {
        let mut nonce = [0u8; GCM_NONCE_LEN];
        random_bytes(&mut nonce)?;
        let sealed = seal(
            &self.at_rest,
            &nonce,
            plain,
            &aad(&info.key_id, info.key_type, &info.fingerprint),
        )?;
        let rec = StoredRecord {
            version: RECORD_VERSION,
            key_type: info.key_type,
            fingerprint: info.fingerprint,
            attributes: info.attributes.clone(),
            stored_at: info.stored_at,
            sealed,
        };
        bincode::serde::encode_to_vec(&rec, bincode_config()).map_err(storage)
    }

    /// A key with its material: a session key from memory, a token key
    /// read from its record (and dropped after the operation).
    fn entry(&self, id: &KeyId) -> Result<Arc<Entry>, KeystoreError> {
        if let Some(e) = self.sessions.read().map_err(storage)?.get(id) {
            return Ok(e.clone());
        }
        if !self.index.read().map_err(storage)?.0.contains_key(id) {
            return Err(KeystoreError::NotFound(*id));
        }
        if let Some(e) = self.hot.lock().map_err(storage)?.get(id) {
            return Ok(e.clone());
        }
        // Deleted meanwhile: not found, as if the delete came first.
        let bytes = self.record(id)?.ok_or(KeystoreError::NotFound(*id))?;
        let entry = Arc::new(self.decode_record(id, &bytes, false)?);
        self.keep_hot(entry.clone());
        Ok(entry)
    }

    /// Keeps a decrypted token key for the next operations; when
    /// [`HOT_KEYS`] are kept already, the least recently used makes room.
    /// Stores a create's key and outbox entry durably: group commit.
    ///
    /// Concurrent creates (64 in flight spread over the agents) each paid
    /// a redb commit with its fsync, a third of an agent's CPU under load
    /// (decision 21). Now a create joins [`Self::group`] and takes the
    /// committer lock: whoever gets it first commits everything waiting in
    /// one transaction and one fsync, and the creates that joined meanwhile
    /// find their outcome set when they get the lock in turn. A lone create
    /// is a group of one: no timer, no added wait. Each key and its outbox
    /// entry still land together, and into the index under the same
    /// database guard (a reopen cannot come between).
    fn commit_grouped(&self, create: GroupedCreate) -> Result<(), KeystoreError> {
        let outcome = create.outcome.clone();
        self.group.lock().map_err(storage)?.push(create);
        let _committer = self.committer.lock().map_err(storage)?;
        if let Some(done) = outcome.lock().map_err(storage)?.take() {
            return done;
        }
        let batch = std::mem::take(&mut *self.group.lock().map_err(storage)?);
        let results = self.commit_creates(&batch);
        for (c, r) in batch.iter().zip(results) {
            *c.outcome.lock().map_err(storage)? = Some(r);
        }
        // Ours was in the batch (no one else committed since we joined:
        // we held the lock from before taking it).
        let ours = outcome.lock().map_err(storage)?.take();
        ours.unwrap_or_else(|| Err(storage("a grouped create was not committed")))
    }

    /// One transaction for `batch`: each create's outcome, in order. A key
    /// already stored (or earlier in the batch) is `AlreadyExists` and
    /// stores nothing; a failed transaction fails them all.
    fn commit_creates(&self, batch: &[GroupedCreate]) -> Vec<Result<(), KeystoreError>> {
        let committed = self.with_db(|db| {
            let txn = db.begin_write().map_err(|e| self.db_err(e))?;
            let mut outcomes = Vec::with_capacity(batch.len());
            {
                let mut keys = txn.open_table(KEYS).map_err(|e| self.db_err(e))?;
                let mut ob = txn.open_table(OUTBOX).map_err(|e| self.db_err(e))?;
                for c in batch {
                    let id = c.id.0.as_u128();
                    if keys.get(id).map_err(|e| self.db_err(e))?.is_some() {
                        outcomes.push(Err(KeystoreError::AlreadyExists(c.id)));
                        continue;
                    }
                    keys.insert(id, c.record.as_slice())
                        .map_err(|e| self.db_err(e))?;
                    ob.insert(id, c.event.as_slice())
                        .map_err(|e| self.db_err(e))?;
                    outcomes.push(Ok(()));
                }
            }
            txn.commit().map_err(|e| self.db_err(e))?;
            self.create_commits.fetch_add(1, Ordering::Relaxed);
            self.written();
            let mut index = self.index.write().map_err(storage)?;
            let sessions = self.sessions.read().map_err(storage)?;
            for (c, o) in batch.iter().zip(outcomes.iter_mut()) {
                if o.is_err() {
                    continue;
                }
                if sessions.contains_key(&c.id) {
                    // A concurrent create of a session key with the same id won.
                    *o = Err(KeystoreError::AlreadyExists(c.id));
                    continue;
                }
                self.toggle_digest(&c.id, &c.indexed.fingerprint);
                index.0.insert(c.id, c.indexed);
            }
            Ok(outcomes)
        });
        match committed {
            Ok(outcomes) => outcomes,
            Err(e) => {
                let detail = match e {
                    KeystoreError::Storage(d) => d,
                    other => other.to_string(),
                };
                batch
                    .iter()
                    .map(|_| Err(KeystoreError::Storage(detail.clone())))
                    .collect()
            }
        }
    }

    /// Write transactions that stored creates since the store opened.
    pub fn create_commits(&self) -> u64 {
        self.create_commits.load(Ordering::Relaxed)
    }

    fn keep_hot(&self, entry: Arc<Entry>) {
        if let Ok(mut hot) = self.hot.lock() {
            hot.put(entry.info.key_id, entry);
        }
    }

    /// Forgets a decrypted token key (deleted, discarded, replaced).
    fn forget_hot(&self, id: &KeyId) {
        if let Ok(mut hot) = self.hot.lock() {
            hot.pop(id);
        }
    }

    fn material_for(&self, key: &NewKey<'_>) -> Result<KeyMaterial, KeystoreError> {
        match &key.source {
            KeySource::Generate => Ok(KeyMaterial::generate(key.key_type)?),
            KeySource::Import(bytes) => Ok(KeyMaterial::from_bytes(key.key_type, bytes)?),
            KeySource::Unwrap { wrapping_key, blob } => {
                let wk = self.entry(wrapping_key)?;
                let KeyMaterial::Aes256(kek) = &wk.material else {
                    return Err(KeystoreError::NotAWrappingKey(*wrapping_key));
                };
                let plain = unwrap_with(kek, blob).map_err(|_| KeystoreError::Integrity)?;
                Ok(KeyMaterial::from_bytes(key.key_type, &plain)?)
            }
        }
    }

    /// Checks one clone and returns what to store, without storing it: its
    /// info and the unwrapped bytes it was checked from (what its record
    /// keeps); `None` if it is here already.
    fn check_clone(&self, cmd: &CloneKey) -> Result<Option<CheckedClone>, CloneFailure> {
        let k = &cmd.key;
        if k.domain != self.domain.id() {
            return Err(CloneFailure::WrongDomain);
        }
        if let Some(found) = self.lookup(&k.key_id) {
            return if matches!(found, Found::Token(e) if e.fingerprint == k.fingerprint) {
                Ok(None)
            } else if matches!(found, Found::Token(e) if e.unlogged) {
                // Two HSMs created this id at once and the log has not
                // refused ours yet: once it does, ours goes and this applies.
                Err(CloneFailure::Undecided)
            } else {
                Err(CloneFailure::Conflict)
            };
        }
        let plain = self
            .domain
            .unwrap(&k.wrapped)
            .map_err(|_| CloneFailure::Integrity)?;
        // Checked as `KeyMaterial::from_bytes` checks it, without building
        // a key to use: the record keeps these bytes (decision 18).
        let fp = KeyMaterial::checked_fingerprint(k.key_type, &plain)
            .map_err(|_| CloneFailure::InvalidMaterial)?;
        if fp != k.fingerprint {
            return Err(CloneFailure::FingerprintMismatch);
        }
        let info = KeyInfo {
            key_id: k.key_id,
            key_type: k.key_type,
            fingerprint: fp,
            session: false,
            attributes: k.attributes.clone(),
            hsm: self.hsm.clone(),
            stored_at: Timestamp::now(),
        };
        // As `from_bytes` read it: the DER without a token's wrap padding.
        let plain = if k.key_type.is_asymmetric() {
            Zeroizing::new(crate::material::trim_wrap_padding(&plain).to_vec())
        } else {
            plain
        };
        Ok(Some((info, plain)))
    }
}

/// What [`EmbeddedKeystore::check_clone`] found good to store: the key's
/// info and the unwrapped bytes its record keeps.
type CheckedClone = (KeyInfo, Zeroizing<Vec<u8>>);

impl Keystore for EmbeddedKeystore {
    fn hsm_id(&self) -> &HsmId {
        &self.hsm
    }

    fn domain_id(&self) -> DomainId {
        self.domain.id()
    }

    fn create(
        &self,
        key: NewKey<'_>,
        outbox: &mut dyn FnMut(&CreatedKey) -> Result<OutboxEntry, String>,
    ) -> Result<CreatedKey, KeystoreError> {
        if self.is_tombstoned(&key.id) {
            return Err(KeystoreError::Deleted(key.id));
        }
        if self.lookup(&key.id).is_some() {
            return Err(KeystoreError::AlreadyExists(key.id));
        }
        let material = self.material_for(&key)?;
        let info = KeyInfo {
            key_id: key.id,
            key_type: key.key_type,
            fingerprint: material.fingerprint()?,
            session: key.session,
            attributes: key.attributes,
            hsm: self.hsm.clone(),
            stored_at: Timestamp::now(),
        };
        let public_key = material.public_key_der()?;
        // A token key is encoded once: wrapped for the event and sealed
        // into its record (a session key is neither).
        let plain: Zeroizing<Vec<u8>> = if key.session {
            Zeroizing::new(Vec::new())
        } else {
            material.to_bytes()?
        };
        let wrapped = if key.session {
            Vec::new()
        } else {
            self.domain.wrap(&plain).map_err(storage)?
        };
        let created = CreatedKey {
            info: info.clone(),
            origin: key.source.origin(),
            wrapped,
            public_key,
            domain: self.domain.id(),
        };
        if key.session {
            let index = self.index.read().map_err(storage)?;
            let mut sessions = self.sessions.write().map_err(storage)?;
            if index.0.contains_key(&key.id) || sessions.contains_key(&key.id) {
                // A concurrent create with the same id won.
                return Err(KeystoreError::AlreadyExists(key.id));
            }
            sessions.insert(key.id, Arc::new(Entry { info, material }));
            return Ok(created);
        }
        let record = self.seal_record(&info, &plain)?;
        drop(plain);
        let indexed = Indexed {
            key_type: info.key_type,
            fingerprint: info.fingerprint,
            unlogged: true,
        };
        let event = outbox(&created).map_err(storage)?;
        self.commit_grouped(GroupedCreate {
            id: key.id,
            record,
            event,
            indexed,
            outcome: Arc::default(),
        })
        .map_err(|e| match e {
            KeystoreError::Storage(detail) => {
                KeystoreError::Storage(format!("key {} was not stored: {detail}", key.id))
            }
            other => other,
        })?;
        self.keep_hot(Arc::new(Entry { info, material }));
        Ok(created)
    }

    fn apply_clones(&self, clones: &[&CloneKey]) -> Vec<Result<CloneOutcome, CloneFailure>> {
        let mut results: Vec<Result<CloneOutcome, CloneFailure>> = Vec::with_capacity(clones.len());
        let mut staged: Vec<(usize, KeyInfo, Vec<u8>)> = Vec::new();
        let mut staged_ids: HashMap<KeyId, Fingerprint> = HashMap::new();
        for (i, cmd) in clones.iter().enumerate() {
            if let Some(fp) = staged_ids.get(&cmd.key.key_id) {
                results.push(if *fp == cmd.key.fingerprint {
                    Ok(CloneOutcome::AlreadyPresent)
                } else {
                    Err(CloneFailure::Conflict)
                });
                continue;
            }
            if self.is_tombstoned(&cmd.key.key_id) {
                results.push(Ok(CloneOutcome::Tombstoned));
                continue;
            }
            match self.check_clone(cmd) {
                Ok(None) => results.push(Ok(CloneOutcome::AlreadyPresent)),
                Ok(Some((info, plain))) => match self.seal_record(&info, &plain) {
                    Ok(record) => {
                        staged_ids.insert(info.key_id, info.fingerprint);
                        staged.push((i, info, record));
                        results.push(Ok(CloneOutcome::Stored));
                    }
                    Err(e) => results.push(Err(CloneFailure::Storage(e.to_string()))),
                },
                Err(f) => results.push(Err(f)),
            }
        }
        if staged.is_empty() {
            return results;
        }
        let at: Vec<usize> = staged.iter().map(|(i, ..)| *i).collect();
        let committed = self.with_db(|db| {
            let txn = db.begin_write().map_err(|e| self.db_err(e))?;
            {
                let mut keys = txn.open_table(KEYS).map_err(|e| self.db_err(e))?;
                for (_, info, record) in &staged {
                    keys.insert(info.key_id.0.as_u128(), record.as_slice())
                        .map_err(|e| self.db_err(e))?;
                }
            }
            txn.commit().map_err(|e| self.db_err(e))?;
            self.written();
            let mut index = self.index.write().map_err(storage)?;
            for (_, info, _) in staged {
                let (id, fp) = (info.key_id, info.fingerprint);
                let indexed = Indexed {
                    key_type: info.key_type,
                    fingerprint: fp,
                    unlogged: false,
                };
                // The digest stays right even if the key came into memory
                // meanwhile (a reload after a reopen).
                if let Some(old) = index.0.insert(id, indexed) {
                    self.toggle_digest(&id, &old.fingerprint);
                    self.forget_hot(&id);
                }
                self.toggle_digest(&id, &fp);
            }
            Ok(())
        });
        if let Err(e) = committed {
            let detail = match e {
                KeystoreError::Storage(detail) => detail,
                other => other.to_string(),
            };
            for i in at {
                results[i] = Err(CloneFailure::Storage(detail.clone()));
            }
        }
        results
    }

    fn sign(&self, id: &KeyId, data: &[u8]) -> Result<Vec<u8>, KeystoreError> {
        Ok(self.entry(id)?.material.sign(data)?)
    }

    fn verify(&self, id: &KeyId, data: &[u8], signature: &[u8]) -> Result<bool, KeystoreError> {
        Ok(self.entry(id)?.material.verify(data, signature)?)
    }

    fn encrypt(&self, id: &KeyId, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeystoreError> {
        Ok(self.entry(id)?.material.encrypt(plaintext, aad)?)
    }

    fn decrypt(
        &self,
        id: &KeyId,
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
        Ok(self.entry(id)?.material.decrypt(ciphertext, aad)?)
    }

    fn sign_digest(
        &self,
        id: &KeyId,
        scheme: &DigestSignScheme,
        digest: &[u8],
    ) -> Result<Vec<u8>, KeystoreError> {
        Ok(self.entry(id)?.material.sign_digest(scheme, digest)?)
    }

    fn encrypt_gcm(
        &self,
        id: &KeyId,
        params: &GcmParams,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KeystoreError> {
        Ok(self.entry(id)?.material.encrypt_gcm(params, plaintext)?)
    }

    fn decrypt_gcm(
        &self,
        id: &KeyId,
        params: &GcmParams,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
        Ok(self.entry(id)?.material.decrypt_gcm(params, sealed)?)
    }

    fn public_key(&self, id: &KeyId) -> Result<Vec<u8>, KeystoreError> {
        let e = self.entry(id)?;
        e.material.public_key_der()?.ok_or(KeystoreError::Material(
            crate::material::MaterialError::Unsupported {
                key_type: e.info.key_type,
                op: "export a public key",
            },
        ))
    }

    fn info(&self, id: &KeyId) -> Result<KeyInfo, KeystoreError> {
        if let Some(e) = self.sessions.read().map_err(storage)?.get(id) {
            return Ok(e.info.clone());
        }
        if !self.index.read().map_err(storage)?.0.contains_key(id) {
            return Err(KeystoreError::NotFound(*id));
        }
        let bytes = self.record(id)?.ok_or(KeystoreError::NotFound(*id))?;
        Ok(self.info_of(id, decode_stored(&bytes)?))
    }

    /// Token keys' infos come from their records (a range read, the
    /// material left sealed), merged in id order with the session keys.
    fn list_page(&self, after: Option<KeyId>, limit: usize) -> Vec<KeyInfo> {
        let mut infos: Vec<KeyInfo> = match self.records_after(after, limit) {
            Ok(rows) => rows
                .into_iter()
                .filter_map(|(id, bytes)| decode_stored(&bytes).ok().map(|r| self.info_of(&id, r)))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "listing: the keystore could not be read");
                return Vec::new();
            }
        };
        if let Ok(sessions) = self.sessions.read() {
            infos.extend(super::page(&sessions, after, limit, |(_, e)| {
                Some(e.info.clone())
            }));
        }
        infos.sort_by_key(|i| i.key_id);
        infos.truncate(limit);
        infos
    }

    fn key_count(&self) -> u64 {
        self.token_key_count() + self.sessions.read().map(|s| s.len() as u64).unwrap_or(0)
    }

    fn token_key_count(&self) -> u64 {
        self.index.read().map(|i| i.0.len() as u64).unwrap_or(0)
    }

    fn delete(
        &self,
        id: &KeyId,
        outbox: Option<OutboxEntry>,
    ) -> Result<Option<KeyInfo>, KeystoreError> {
        let session = self.sessions.write().map_err(storage)?.remove(id);
        if let Some(e) = session {
            // Session keys are not cluster keys: just drop it here.
            return Ok(Some(e.info.clone()));
        }
        self.with_db(|db| {
            let txn = db.begin_write().map_err(|e| self.db_err(e))?;
            let info;
            {
                let mut keys = txn.open_table(KEYS).map_err(|e| self.db_err(e))?;
                info = keys
                    .remove(id.0.as_u128())
                    .map_err(|e| self.db_err(e))?
                    .and_then(|old| decode_stored(old.value()).ok())
                    .map(|rec| self.info_of(id, rec));
                let mut tombs = txn.open_table(TOMBSTONES).map_err(|e| self.db_err(e))?;
                tombs
                    .insert(id.0.as_u128(), Timestamp::now().as_nanos())
                    .map_err(|e| self.db_err(e))?;
                if let Some(event) = &outbox {
                    let mut ob = txn.open_table(OUTBOX).map_err(|e| self.db_err(e))?;
                    ob.insert(id.0.as_u128(), event.as_slice())
                        .map_err(|e| self.db_err(e))?;
                }
            }
            txn.commit().map_err(|e| self.db_err(e))?;
            self.written();
            self.tombstones.write().map_err(storage)?.insert(*id);
            let removed = self.index.write().map_err(storage)?.0.remove(id);
            self.forget_hot(id);
            if let Some(e) = &removed {
                self.toggle_digest(id, &e.fingerprint);
            }
            Ok(removed.and(info))
        })
    }

    fn inventory_digest(&self) -> InventoryDigest {
        self.digest.lock().map(|d| *d).unwrap_or_default()
    }

    /// A range read of the records (only their fingerprints decoded).
    fn inventory_page(&self, after: Option<KeyId>, limit: usize) -> Vec<(KeyId, Fingerprint)> {
        match self.records_after(after, limit) {
            Ok(rows) => rows
                .into_iter()
                .filter_map(|(id, bytes)| stored_fingerprint(&bytes).map(|(_, fp)| (id, fp)))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "inventory: the keystore could not be read");
                Vec::new()
            }
        }
    }

    fn outbox(&self) -> Result<Vec<(KeyId, OutboxEntry)>, KeystoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| self.db_err(e))?;
            let table = txn.open_table(OUTBOX).map_err(|e| self.db_err(e))?;
            let mut out = Vec::new();
            for row in table.iter().map_err(|e| self.db_err(e))? {
                let (k, v) = row.map_err(|e| self.db_err(e))?;
                out.push((KeyId(uuid::Uuid::from_u128(k.value())), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    fn outbox_done(&self, ids: &[KeyId]) -> Result<(), KeystoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.with_db(|db| {
            let txn = db.begin_write().map_err(|e| self.db_err(e))?;
            {
                let mut ob = txn.open_table(OUTBOX).map_err(|e| self.db_err(e))?;
                for id in ids {
                    ob.remove(id.0.as_u128()).map_err(|e| self.db_err(e))?;
                }
            }
            txn.commit().map_err(|e| self.db_err(e))?;
            self.written();
            let mut index = self.index.write().map_err(storage)?;
            for id in ids {
                if let Some(e) = index.0.get_mut(id) {
                    e.unlogged = false;
                }
            }
            Ok(())
        })
    }

    fn discard_created(
        &self,
        id: &KeyId,
        fingerprint: &Fingerprint,
        entry: &[u8],
    ) -> Result<bool, KeystoreError> {
        self.with_db(|db| {
            let txn = db.begin_write().map_err(|e| self.db_err(e))?;
            let removed_key;
            {
                let mut keys = txn.open_table(KEYS).map_err(|e| self.db_err(e))?;
                let ours = keys
                    .get(id.0.as_u128())
                    .map_err(|e| self.db_err(e))?
                    .and_then(|v| stored_fingerprint(v.value()))
                    .is_some_and(|(_, fp)| fp == *fingerprint);
                if ours {
                    keys.remove(id.0.as_u128()).map_err(|e| self.db_err(e))?;
                }
                removed_key = ours;
                let mut ob = txn.open_table(OUTBOX).map_err(|e| self.db_err(e))?;
                let same_entry = ob
                    .get(id.0.as_u128())
                    .map_err(|e| self.db_err(e))?
                    .map(|v| v.value() == entry);
                // Another event of this id may wait there now (a delete).
                if same_entry == Some(true) {
                    ob.remove(id.0.as_u128()).map_err(|e| self.db_err(e))?;
                }
            }
            txn.commit().map_err(|e| self.db_err(e))?;
            self.written();
            if removed_key {
                let mut index = self.index.write().map_err(storage)?;
                if index
                    .0
                    .get(id)
                    .is_some_and(|e| e.fingerprint == *fingerprint)
                {
                    index.0.remove(id);
                    self.forget_hot(id);
                    self.toggle_digest(id, fingerprint);
                }
            }
            Ok(removed_key)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_records_are_read_with_no_app_id() {
        // The layout the last version-1 build wrote.
        let v1 = StoredRecordV1 {
            version: 1,
            key_type: KeyType::P256,
            fingerprint: Fingerprint([4; 32]),
            attributes: keysync_schemas::v1::KeyAttributes {
                label: Some("old".into()),
            },
            stored_at: Timestamp(7),
            sealed: vec![9; 60],
        };
        let bytes = bincode::serde::encode_to_vec(&v1, bincode_config()).expect("encode");
        let rec = read_record(&bytes).expect("a v1 record reads");
        assert_eq!(rec.attributes.label.as_deref(), Some("old"));
        assert_eq!(rec.attributes.app_id, None);
        assert_eq!((rec.key_type, rec.stored_at), (KeyType::P256, Timestamp(7)));
        assert_eq!(rec.sealed, vec![9; 60]);
        assert_eq!(
            stored_fingerprint(&bytes),
            Some((KeyType::P256, Fingerprint([4; 32])))
        );
        let mut bad = bytes;
        bad[0] = 9;
        assert!(read_record(&bad).is_err());
    }
    use keysync_schemas::{Durability, KeyCreated};

    fn hsm(s: &str) -> HsmId {
        HsmId::new(s).expect("id")
    }

    fn new_key(t: KeyType, session: bool) -> NewKey<'static> {
        NewKey {
            id: KeyId::new(),
            key_type: t,
            session,
            attributes: KeyAttributes::default(),
            source: KeySource::Generate,
        }
    }

    fn no_outbox(_: &CreatedKey) -> Result<OutboxEntry, String> {
        Ok(b"event".to_vec())
    }

    fn clone_of(c: &CreatedKey, target: &str) -> CloneKey {
        CloneKey {
            target: hsm(target),
            created_seq: 1,
            key: KeyCreated {
                key_id: c.info.key_id,
                key_type: c.info.key_type,
                fingerprint: c.info.fingerprint,
                hsm: c.info.hsm.clone(),
                origin: c.origin,
                attributes: c.info.attributes.clone(),
                durability: Durability::Logged,
                domain: c.domain,
                wrapped: c.wrapped.clone(),
                public_key: c.public_key.clone(),
            },
        }
    }

    /// Group commit: creates made at once share transactions (fewer
    /// commits than creates), each key and its outbox entry are durable
    /// (read back after a reopen), and two creates of one id in the same
    /// group give one key and one `AlreadyExists`.
    #[test]
    fn concurrent_creates_share_commits_and_each_is_durable_or_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = || {
            EmbeddedKeystore::open(dir.path(), hsm("a"), DomainKey::from_bytes([7u8; 32]))
                .expect("open")
        };
        let store = open();
        // Given 64 threads creating at once, two of them with one id,
        let twin = KeyId::new();
        let barrier = std::sync::Barrier::new(64);
        let results: Vec<Result<CreatedKey, KeystoreError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..64)
                .map(|i| {
                    let (store, barrier) = (&store, &barrier);
                    s.spawn(move || {
                        let mut key = new_key(KeyType::Ed25519, false);
                        if i < 2 {
                            key.id = twin;
                        }
                        barrier.wait();
                        store.create(key, &mut no_outbox)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("no panic"))
                .collect()
        });
        // then 63 keys were stored, the twin once,
        let stored: Vec<&CreatedKey> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(
            stored.len(),
            63,
            "{:?}",
            results.iter().filter(|r| r.is_err()).collect::<Vec<_>>()
        );
        assert!(results
            .iter()
            .any(|r| matches!(r, Err(KeystoreError::AlreadyExists(id)) if *id == twin)));
        // in fewer transactions than creates,
        let commits = store.create_commits();
        assert!(
            (1..63).contains(&commits),
            "64 creates at once took {commits} commits"
        );
        // and each key with its outbox entry is there after a reopen.
        let ids: Vec<KeyId> = stored.iter().map(|c| c.info.key_id).collect();
        drop(store);
        let store = open();
        assert_eq!(store.key_count(), 63);
        let outbox: HashSet<KeyId> = store
            .outbox()
            .expect("outbox")
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        for id in &ids {
            assert!(store.info(id).is_ok(), "{id} lost");
            assert!(outbox.contains(id), "{id}'s outbox entry lost");
        }
    }

    /// Two HSMs created one id at once: until the log decides, the other
    /// HSM's clone is passing (`Undecided`); once this HSM's create is
    /// refused and discarded, the clone applies; a logged own key makes the
    /// same clone a final `Conflict`.
    #[test]
    fn a_create_the_log_refused_is_discarded_and_the_winner_clones_in() {
        let dk = || DomainKey::from_bytes([7u8; 32]);
        let dir_a = tempfile::tempdir().expect("tempdir");
        let dir_b = tempfile::tempdir().expect("tempdir");
        let a = EmbeddedKeystore::open(dir_a.path(), hsm("a"), dk()).expect("open a");
        let b = EmbeddedKeystore::open(dir_b.path(), hsm("b"), dk()).expect("open b");
        let id = KeyId::new();
        let with_id = |id| NewKey {
            id,
            ..new_key(KeyType::Ed25519, false)
        };
        let mine = a.create(with_id(id), &mut no_outbox).expect("a creates");
        let theirs = b.create(with_id(id), &mut no_outbox).expect("b creates");
        assert_ne!(mine.info.fingerprint, theirs.info.fingerprint);

        let clone = clone_of(&theirs, "a");
        assert_eq!(
            a.apply_clones(&[&clone]),
            vec![Err(CloneFailure::Undecided)]
        );

        // A discard that names another fingerprint or entry removes nothing.
        assert!(!a
            .discard_created(&id, &theirs.info.fingerprint, b"other")
            .expect("discard"));
        assert_eq!(a.outbox().expect("outbox").len(), 1);
        let digest_before = a.inventory_digest();
        assert!(a
            .discard_created(&id, &mine.info.fingerprint, b"event")
            .expect("discard"));
        assert!(matches!(a.info(&id), Err(KeystoreError::NotFound(_))));
        assert!(a.outbox().expect("outbox").is_empty());
        assert_ne!(a.inventory_digest(), digest_before);
        assert_eq!(a.apply_clones(&[&clone]), vec![Ok(CloneOutcome::Stored)]);
        assert_eq!(
            a.info(&id).expect("cloned").fingerprint,
            theirs.info.fingerprint
        );

        // b's key was logged: a clone of a's (lost) key is a conflict.
        b.outbox_done(&[id]).expect("logged");
        assert_eq!(
            b.apply_clones(&[&clone_of(&mine, "b")]),
            vec![Err(CloneFailure::Conflict)]
        );
        // Reopened, a remembers nothing of its discarded key.
        drop(a);
        let a = EmbeddedKeystore::open(dir_a.path(), hsm("a"), dk()).expect("reopen");
        assert_eq!(
            a.info(&id).expect("kept").fingerprint,
            theirs.info.fingerprint
        );
        assert!(a.outbox().expect("outbox").is_empty());
    }

    #[test]
    fn a_deleted_keys_id_is_refused_as_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedKeystore::open(dir.path(), hsm("a"), DomainKey::from_bytes([7u8; 32]))
            .expect("open");
        let key = store
            .create(new_key(KeyType::Ed25519, false), &mut no_outbox)
            .expect("create");
        let id = key.info.key_id;
        store.delete(&id, None).expect("delete");
        let again = NewKey {
            id,
            ..new_key(KeyType::Ed25519, false)
        };
        let err = store.create(again, &mut no_outbox).expect_err("refused");
        assert!(matches!(err, KeystoreError::Deleted(_)), "{err}");
        assert_eq!(err.kind(), keysync_schemas::OpErrorKind::KeyIdTaken);
    }

    #[test]
    fn token_keys_survive_reopen_and_session_keys_do_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dk = [7u8; 32];
        let store =
            EmbeddedKeystore::open(dir.path(), hsm("a"), DomainKey::from_bytes(dk)).expect("open");
        let token = store
            .create(new_key(KeyType::P256, false), &mut no_outbox)
            .expect("create");
        let session = store
            .create(new_key(KeyType::Ed25519, true), &mut no_outbox)
            .expect("create");
        assert_eq!(store.outbox().expect("outbox").len(), 1);
        store.outbox_done(&[token.info.key_id]).expect("done");
        let sig = store.sign(&token.info.key_id, b"m").expect("sign");
        drop(store);
        let store = EmbeddedKeystore::open(dir.path(), hsm("a"), DomainKey::from_bytes(dk))
            .expect("reopen");
        assert!(store
            .verify(&token.info.key_id, b"m", &sig)
            .expect("verify"));
        assert!(matches!(
            store.info(&session.info.key_id),
            Err(KeystoreError::NotFound(_))
        ));
        assert!(store.outbox().expect("outbox").is_empty());
        drop(store);
        // Another domain key cannot open this store.
        assert!(matches!(
            EmbeddedKeystore::open(dir.path(), hsm("a"), DomainKey::from_bytes([8u8; 32])),
            Err(KeystoreError::Open(_))
        ));
    }

    /// The resident index stays under 200 bytes a key (decision 19) at
    /// every size from 1,000 to 200,000 keys, whatever the table's fill;
    /// and its count is the table's real allocation.
    #[test]
    fn the_index_holds_under_200_bytes_a_key() {
        let mut index = KeyIndex::default();
        assert_eq!(index.heap_bytes(), 0);
        let mut worst = 0.0f64;
        for n in 1..=200_000u32 {
            index.0.insert(
                KeyId(uuid::Uuid::from_u128(u128::from(n) * 0x9e37_79b9_7f4a_7c15)),
                Indexed {
                    key_type: KeyType::Ed25519,
                    fingerprint: Fingerprint([n as u8; 32]),
                    unlogged: false,
                },
            );
            if n >= 1000 {
                worst = worst.max(index.heap_bytes() as f64 / f64::from(n));
            }
        }
        let slot = std::mem::size_of::<(KeyId, Indexed)>();
        assert_eq!(slot, 50, "id 16 + type 1 + fingerprint 32 + flag 1");
        // At least a slot and a control byte a bucket for every key.
        assert!(index.heap_bytes() >= 200_000 * (slot + 1));
        assert!(worst <= 200.0, "{worst:.0} bytes a key at worst");
    }

    /// Token keys live in redb and the index only: a batch of clones is
    /// indexed (fingerprints, the digest), and listing, info, inventory and
    /// operations read the records on demand, also after a reopen.
    #[test]
    fn records_are_read_on_demand_and_the_index_counts_its_bytes() {
        let dk = || DomainKey::from_bytes([3u8; 32]);
        let (da, db) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let a = EmbeddedKeystore::open(da.path(), hsm("a"), dk()).expect("open a");
        let b = EmbeddedKeystore::open(db.path(), hsm("b"), dk()).expect("open b");
        let n = 300;
        let created: Vec<CreatedKey> = (0..n)
            .map(|i| {
                let t = [KeyType::Ed25519, KeyType::Aes256][i % 2];
                a.create(new_key(t, false), &mut no_outbox).expect("create")
            })
            .collect();
        let cmds: Vec<CloneKey> = created.iter().map(|c| clone_of(c, "b")).collect();
        let refs: Vec<&CloneKey> = cmds.iter().collect();
        assert!(b
            .apply_clones(&refs)
            .iter()
            .all(|r| *r == Ok(CloneOutcome::Stored)));
        assert_eq!(b.token_key_count(), n as u64);
        assert_eq!(b.inventory_digest(), a.inventory_digest());
        let bytes = b.index_heap_bytes();
        assert!(
            bytes >= n * 50 && bytes <= n * 200,
            "{bytes} bytes for {n} keys"
        );

        let session = b
            .create(new_key(KeyType::Ed25519, true), &mut no_outbox)
            .expect("session key");
        let mut listed = Vec::new();
        let mut after = None;
        loop {
            let page = b.list_page(after, 64);
            let Some(last) = page.last() else { break };
            after = Some(last.key_id);
            listed.extend(page);
        }
        assert_eq!(listed.len(), n + 1, "every token key and the session key");
        assert!(listed.windows(2).all(|w| w[0].key_id < w[1].key_id));
        assert!(listed
            .iter()
            .any(|i| i.key_id == session.info.key_id && i.session));
        let inventory = b.inventory_page(None, 10_000);
        assert_eq!(inventory.len(), n);
        for c in &created {
            assert!(inventory.contains(&(c.info.key_id, c.info.fingerprint)));
            let info = b.info(&c.info.key_id).expect("info from the record");
            assert_eq!(
                (info.fingerprint, info.hsm.as_str()),
                (c.info.fingerprint, "b")
            );
        }
        let signer = &created[0];
        let sig = b
            .sign(&signer.info.key_id, b"data")
            .expect("sign, material read on demand");
        assert!(a
            .verify(&signer.info.key_id, b"data", &sig)
            .expect("verify"));

        let gone = b.delete(&created[1].info.key_id, None).expect("delete");
        assert_eq!(
            gone.map(|i| i.fingerprint),
            Some(created[1].info.fingerprint)
        );
        assert!(matches!(
            b.info(&created[1].info.key_id),
            Err(KeystoreError::NotFound(_))
        ));
        let digest = b.inventory_digest();
        drop(b);
        let b = EmbeddedKeystore::open(db.path(), hsm("b"), dk()).expect("reopen b");
        assert_eq!(b.token_key_count(), n as u64 - 1);
        assert_eq!(b.inventory_digest(), digest);
        assert!(b.sign(&signer.info.key_id, b"data").is_ok());
    }

    #[test]
    fn clones_are_idempotent_and_checked() {
        let d1 = tempfile::tempdir().expect("tempdir");
        let d2 = tempfile::tempdir().expect("tempdir");
        let d3 = tempfile::tempdir().expect("tempdir");
        let a = EmbeddedKeystore::open(d1.path(), hsm("a"), DomainKey::from_bytes([1; 32]))
            .expect("open");
        let b = EmbeddedKeystore::open(d2.path(), hsm("b"), DomainKey::from_bytes([1; 32]))
            .expect("open");
        let other = EmbeddedKeystore::open(d3.path(), hsm("c"), DomainKey::from_bytes([2; 32]))
            .expect("open");
        let c = a
            .create(new_key(KeyType::Ed25519, false), &mut no_outbox)
            .expect("create");
        let cmd = clone_of(&c, "b");
        assert_eq!(
            b.apply_clones(&[&cmd, &cmd]),
            vec![Ok(CloneOutcome::Stored), Ok(CloneOutcome::AlreadyPresent)]
        );
        assert_eq!(
            b.apply_clones(&[&cmd]),
            vec![Ok(CloneOutcome::AlreadyPresent)]
        );
        assert_eq!(
            b.info(&c.info.key_id).expect("info").fingerprint,
            c.info.fingerprint
        );
        assert_eq!(
            other.apply_clones(&[&cmd]),
            vec![Err(CloneFailure::WrongDomain)]
        );

        let mut tampered = clone_of(&c, "b");
        tampered.key.key_id = KeyId::new();
        tampered.key.wrapped[5] ^= 1;
        assert_eq!(
            b.apply_clones(&[&tampered]),
            vec![Err(CloneFailure::Integrity)]
        );
        let mut wrong_fp = clone_of(&c, "b");
        wrong_fp.key.key_id = KeyId::new();
        wrong_fp.key.fingerprint = Fingerprint([0; 32]);
        assert_eq!(
            b.apply_clones(&[&wrong_fp]),
            vec![Err(CloneFailure::FingerprintMismatch)]
        );
        assert!(matches!(
            b.info(&wrong_fp.key.key_id),
            Err(KeystoreError::NotFound(_))
        ));
        let mut conflict = clone_of(&c, "b");
        conflict.key.fingerprint = Fingerprint([9; 32]);
        assert_eq!(
            b.apply_clones(&[&conflict]),
            vec![Err(CloneFailure::Conflict)]
        );
    }

    /// A clone's record keeps the bytes it was unwrapped from (not a
    /// re-encoding): every key type, and a P-256 blob padded as SoftHSM
    /// pads it, reads back after a reopen as the same key.
    #[test]
    fn cloned_keys_of_every_type_survive_reopen_from_their_unwrapped_bytes() {
        let d1 = tempfile::tempdir().expect("tempdir");
        let d2 = tempfile::tempdir().expect("tempdir");
        let dk = [1u8; 32];
        let a =
            EmbeddedKeystore::open(d1.path(), hsm("a"), DomainKey::from_bytes(dk)).expect("open");
        let b =
            EmbeddedKeystore::open(d2.path(), hsm("b"), DomainKey::from_bytes(dk)).expect("open");
        let mut clones = Vec::new();
        for t in [
            KeyType::P256,
            KeyType::Ed25519,
            KeyType::Rsa2048,
            KeyType::Aes256,
        ] {
            let c = a.create(new_key(t, false), &mut no_outbox).expect("create");
            clones.push((c.info.clone(), clone_of(&c, "b")));
        }
        // A P-256 key unwrapped with a token's zero padding after its DER.
        let p = a
            .create(new_key(KeyType::P256, false), &mut no_outbox)
            .expect("create");
        let der = a
            .entry(&p.info.key_id)
            .expect("entry")
            .material
            .to_bytes()
            .expect("der");
        let pad = (8 - der.len() % 8) % 8;
        assert!(
            pad > 0,
            "a P-256 PKCS#8 of {} bytes takes padding",
            der.len()
        );
        let mut padded = der.to_vec();
        padded.extend(std::iter::repeat_n(0u8, pad));
        let mut padded_clone = clone_of(&p, "b");
        padded_clone.key.wrapped = DomainKey::from_bytes(dk).wrap(&padded).expect("wrap");
        clones.push((p.info.clone(), padded_clone));
        let cmds: Vec<&CloneKey> = clones.iter().map(|(_, c)| c).collect();
        assert!(b
            .apply_clones(&cmds)
            .iter()
            .all(|r| *r == Ok(CloneOutcome::Stored)));
        drop(b);
        let b =
            EmbeddedKeystore::open(d2.path(), hsm("b"), DomainKey::from_bytes(dk)).expect("reopen");
        for (info, _) in &clones {
            let back = b.entry(&info.key_id).expect("the clone is stored");
            assert_eq!(
                back.info.fingerprint, info.fingerprint,
                "{:?}",
                info.key_type
            );
            assert_eq!(back.material.fingerprint().expect("fp"), info.fingerprint);
            if info.key_type != KeyType::Aes256 {
                let sig = b.sign(&info.key_id, b"m").expect("sign");
                assert!(a.verify(&info.key_id, b"m", &sig).expect("verify"));
            }
        }
    }

    /// A file backend whose disk can be made full: writes, syncs and
    /// resizes then fail with ENOSPC, as on a full file system.
    #[derive(Debug)]
    struct FullableDisk {
        inner: redb::backends::FileBackend,
        full: Arc<AtomicBool>,
    }

    impl FullableDisk {
        fn check(&self) -> Result<(), std::io::Error> {
            if self.full.load(Ordering::SeqCst) {
                Err(std::io::Error::from(std::io::ErrorKind::StorageFull))
            } else {
                Ok(())
            }
        }
    }

    type Bound = std::ops::Bound<u64>;

    impl redb::StorageBackend for FullableDisk {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.write(offset, data)
        }
        fn close(&self) -> Result<(), std::io::Error> {
            self.inner.close()
        }
        fn try_lock_range(&self, s: Bound, e: Bound) -> Result<bool, redb::BackendError> {
            self.inner.try_lock_range(s, e)
        }
        fn try_lock_shared_range(&self, s: Bound, e: Bound) -> Result<bool, redb::BackendError> {
            self.inner.try_lock_shared_range(s, e)
        }
        fn lock_range(&self, s: Bound, e: Bound) -> Result<(), redb::BackendError> {
            self.inner.lock_range(s, e)
        }
        fn lock_shared_range(&self, s: Bound, e: Bound) -> Result<(), redb::BackendError> {
            self.inner.lock_shared_range(s, e)
        }
        fn unlock_range(&self, s: Bound, e: Bound) -> Result<(), redb::BackendError> {
            self.inner.unlock_range(s, e)
        }
        fn query_lock_range(&self, s: Bound, e: Bound) -> Result<bool, redb::BackendError> {
            self.inner.query_lock_range(s, e)
        }
    }

    fn fullable(full: Arc<AtomicBool>) -> Opener {
        Box::new(move |path| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| redb::DatabaseError::Storage(redb::StorageError::Io(e)))?;
            redb::Builder::new().create_with_backend(FullableDisk {
                inner: redb::backends::FileBackend::new(file)?,
                full: full.clone(),
            })
        })
    }

    #[test]
    fn a_full_disk_fails_writes_cleanly_and_the_store_recovers_when_space_returns() {
        let src_dir = tempfile::tempdir().expect("tempdir");
        let dir = tempfile::tempdir().expect("tempdir");
        let dk = [4u8; 32];
        let source = EmbeddedKeystore::open(src_dir.path(), hsm("a"), DomainKey::from_bytes(dk))
            .expect("open");
        let full = Arc::new(AtomicBool::new(false));
        let mut store = EmbeddedKeystore::open_with(
            dir.path(),
            hsm("b"),
            DomainKey::from_bytes(dk),
            fullable(full.clone()),
        )
        .expect("open");
        store.reopen_pause = Duration::ZERO;
        let first = store
            .create(new_key(KeyType::P256, false), &mut no_outbox)
            .expect("create");
        let session = store
            .create(new_key(KeyType::Ed25519, true), &mut no_outbox)
            .expect("session key");
        let c1 = source
            .create(new_key(KeyType::Ed25519, false), &mut no_outbox)
            .expect("create");
        let c2 = source
            .create(new_key(KeyType::Aes256, false), &mut no_outbox)
            .expect("create");
        let (cmd1, cmd2) = (clone_of(&c1, "b"), clone_of(&c2, "b"));

        full.store(true, Ordering::SeqCst);
        // A create fails with a storage error (`unavailable` to the client)
        // and nothing of it is kept.
        let doomed = new_key(KeyType::Ed25519, false);
        let doomed_id = doomed.id;
        let err = store
            .create(doomed, &mut no_outbox)
            .expect_err("a create on a full disk");
        assert!(matches!(err, KeystoreError::Storage(_)), "{err}");
        assert_eq!(err.kind(), keysync_schemas::OpErrorKind::Unavailable);
        assert!(err.to_string().contains("was not stored"), "{err}");
        assert!(store.info(&doomed_id).is_err());
        // Clones fail for a passing reason, again and again while it lasts
        // (the first error poisoned redb's handle; reopening fails too).
        for _ in 0..3 {
            let r = store.apply_clones(&[&cmd1, &cmd2]);
            assert_eq!(r.len(), 2);
            assert!(
                r.iter()
                    .all(|r| matches!(r, Err(f @ CloneFailure::Storage(_)) if !f.is_permanent())),
                "{r:?}"
            );
        }
        assert!(store.delete(&first.info.key_id, None).is_err());
        assert_eq!(store.token_key_count(), 1);
        // A key kept decrypted (created here lately) keeps working.
        let sig = store.sign(&first.info.key_id, b"m").expect("sign");

        // Space returns: the store reopens by itself and catches up.
        full.store(false, Ordering::SeqCst);
        assert_eq!(
            store.apply_clones(&[&cmd1, &cmd2]),
            vec![Ok(CloneOutcome::Stored), Ok(CloneOutcome::Stored)]
        );
        assert_eq!(
            store.apply_clones(&[&cmd1]),
            vec![Ok(CloneOutcome::AlreadyPresent)]
        );
        let second = store
            .create(new_key(KeyType::P256, false), &mut no_outbox)
            .expect("create after space returned");
        assert!(store
            .verify(&first.info.key_id, b"m", &sig)
            .expect("verify"));
        assert!(store.info(&session.info.key_id).is_ok(), "session key lost");
        assert_eq!(store.token_key_count(), 4);
        let digest = store.inventory_digest();
        drop(store);

        // The disk holds exactly what memory held: no trace of the failed create.
        let reopened = EmbeddedKeystore::open(dir.path(), hsm("b"), DomainKey::from_bytes(dk))
            .expect("reopen");
        assert_eq!(reopened.token_key_count(), 4);
        assert_eq!(reopened.inventory_digest(), digest);
        assert!(reopened.info(&doomed_id).is_err());
        let mut outbox: Vec<KeyId> = reopened
            .outbox()
            .expect("outbox")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        outbox.sort();
        let mut created = vec![first.info.key_id, second.info.key_id];
        created.sort();
        assert_eq!(outbox, created);
    }

    #[test]
    fn reopening_is_not_tried_again_and_again_while_the_cause_lasts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let full = Arc::new(AtomicBool::new(false));
        let mut store = EmbeddedKeystore::open_with(
            dir.path(),
            hsm("b"),
            DomainKey::from_bytes([5; 32]),
            fullable(full.clone()),
        )
        .expect("open");
        store.reopen_pause = Duration::from_secs(3600);
        full.store(true, Ordering::SeqCst);
        let err = store
            .create(new_key(KeyType::Ed25519, false), &mut no_outbox)
            .expect_err("full");
        assert!(err.to_string().contains("space"), "{err}");
        full.store(false, Ordering::SeqCst);
        // Within the pause it fails at once, saying why, without reopening.
        let err = store.outbox().expect_err("closed");
        assert!(
            err.to_string().contains("reopened when that passes"),
            "{err}"
        );
        assert!(store.db.read().is_ok_and(|db| db.is_some()), "not reopened");
    }

    #[test]
    fn failure_kinds() {
        for permanent in [
            CloneFailure::WrongDomain,
            CloneFailure::Integrity,
            CloneFailure::InvalidMaterial,
            CloneFailure::FingerprintMismatch,
            CloneFailure::Conflict,
        ] {
            assert!(permanent.is_permanent(), "{permanent:?}");
        }
        assert!(!CloneFailure::Storage("disk full".into()).is_permanent());
    }

    #[test]
    fn unwrap_under_a_held_aes_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedKeystore::open(dir.path(), hsm("a"), DomainKey::from_bytes([3; 32]))
            .expect("open");
        let kek = store
            .create(new_key(KeyType::Aes256, false), &mut no_outbox)
            .expect("create");
        // Wrap a P-256 key under the KEK the way a PKCS#11 HSM would.
        let KeyMaterial::Aes256(kek_bytes) = &store.entry(&kek.info.key_id).expect("kek").material
        else {
            unreachable!("created an AES key")
        };
        let inner = KeyMaterial::generate(KeyType::P256).expect("gen");
        let blob =
            keysync_security::domain_key::wrap_with(kek_bytes, &inner.to_bytes().expect("der"))
                .expect("wrap");
        let unwrapped = store
            .create(
                NewKey {
                    id: KeyId::new(),
                    key_type: KeyType::P256,
                    session: false,
                    attributes: KeyAttributes::default(),
                    source: KeySource::Unwrap {
                        wrapping_key: kek.info.key_id,
                        blob: &blob,
                    },
                },
                &mut no_outbox,
            )
            .expect("unwrap");
        assert_eq!(unwrapped.info.fingerprint, inner.fingerprint().expect("fp"));
    }
}
