//! The agent's journal, for an HSM whose keys live outside the agent (a
//! PKCS#11 token): what the agent knows of each key (type, fingerprint,
//! attributes), its tombstones, its outbox of events, and its *intents*.
//!
//! A token has no transaction spanning its objects and this file, so the
//! keystore orders its steps and this journal records which ids are in
//! doubt (see docs/decisions/0012-pkcs11-keystore.md):
//!
//! - create: commit an intent for the id; make the object in the token;
//!   commit the record and the outbox entry, settling the intent;
//! - delete: commit the tombstone (and the `KeyDeleted` entry) with an
//!   intent; destroy the object; settle the intent;
//! - at start: for every intent left, the journal is the truth: an id with
//!   no record has its token objects destroyed (a create that never
//!   answered, or a delete cut short), then the intent is settled.
//!
//! The invariant: a token object of keysync's with no record exists only
//! while an intent for its id is in the journal. Objects of other
//! applications in the same token carry no intent and are never touched.
//!
//! A redb write transaction is atomic and durable on commit. An I/O error
//! (a full disk) poisons the database; the journal reopens it before its
//! next use, so it recovers when the cause passes.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use keysync_schemas::{Fingerprint, KeyAttributes, KeyId, KeyType, Timestamp};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{KeystoreError, OutboxEntry};

const RECORDS: TableDefinition<u128, &[u8]> = TableDefinition::new("records");
const OUTBOX: TableDefinition<u128, &[u8]> = TableDefinition::new("outbox");
/// Deleted key ids, with when they were deleted (ns since the epoch).
const TOMBSTONES: TableDefinition<u128, u64> = TableDefinition::new("tombstones");
/// Ids whose token objects may not match the records.
const INTENTS: TableDefinition<u128, ()> = TableDefinition::new("intents");
/// Version 2 added the application's key id to the attributes; version-1
/// records are read and upcast ([`read_record`]), never rewritten.
const RECORD_VERSION: u8 = 2;

/// What the journal keeps of one token key held by the HSM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    version: u8,
    /// Its type.
    pub key_type: KeyType,
    /// Its fingerprint.
    pub fingerprint: Fingerprint,
    /// Its attributes.
    pub attributes: KeyAttributes,
    /// When it was stored here.
    pub stored_at: Timestamp,
}

impl Record {
    /// A record of the current version.
    pub fn new(
        key_type: KeyType,
        fingerprint: Fingerprint,
        attributes: KeyAttributes,
        stored_at: Timestamp,
    ) -> Self {
        Record {
            version: RECORD_VERSION,
            key_type,
            fingerprint,
            attributes,
            stored_at,
        }
    }
}

/// A version-1 record: attributes without the application's key id.
#[derive(Deserialize)]
struct RecordV1 {
    key_type: KeyType,
    fingerprint: Fingerprint,
    attributes: keysync_schemas::v1::KeyAttributes,
    stored_at: Timestamp,
}

/// A record of either version (the version is its first byte: a `u8` is
/// one byte in bincode), as the current one.
fn read_record(bytes: &[u8]) -> Result<Record, String> {
    match bytes.first() {
        Some(&RECORD_VERSION) => bincode::serde::decode_from_slice(bytes, bincode_config())
            .map(|(r, _)| r)
            .map_err(|e| e.to_string()),
        Some(1) => {
            let ((_version, r), _): ((u8, RecordV1), usize) =
                bincode::serde::decode_from_slice(bytes, bincode_config())
                    .map_err(|e| e.to_string())?;
            Ok(Record::new(
                r.key_type,
                r.fingerprint,
                r.attributes.into(),
                r.stored_at,
            ))
        }
        other => Err(format!("unknown version {other:?}")),
    }
}

/// One change, committed with others in one transaction.
pub enum Change<'a> {
    /// The id is in doubt until settled.
    Intend(KeyId),
    /// The token matches the records for this id again.
    Settle(KeyId),
    /// The HSM holds this key.
    Put(KeyId, &'a Record),
    /// The HSM no longer holds this key.
    Remove(KeyId),
    /// The id is deleted for good.
    Tombstone(KeyId),
    /// An event to publish.
    Outbox(KeyId, &'a [u8]),
    /// Forget the outbox entry of this id; only if it is still these bytes
    /// when given (another event of the id may have replaced it).
    OutboxDone(KeyId, Option<&'a [u8]>),
}

/// What the journal held when opened.
#[derive(Debug, Default)]
pub struct Contents {
    /// Keys held, by id.
    pub records: BTreeMap<KeyId, Record>,
    /// Deleted ids.
    pub tombstones: HashSet<KeyId>,
    /// Ids with an event in the outbox.
    pub outbox: HashSet<KeyId>,
    /// Ids in doubt.
    pub intents: Vec<KeyId>,
}

/// The journal file.
pub struct Journal {
    path: PathBuf,
    /// `None` while a reopen after an I/O error fails.
    db: RwLock<Option<redb::Database>>,
    poisoned: AtomicBool,
}

fn storage(e: impl std::fmt::Display) -> KeystoreError {
    KeystoreError::Storage(e.to_string())
}

fn id_of(k: u128) -> KeyId {
    KeyId(uuid::Uuid::from_u128(k))
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

impl Journal {
    /// Opens (or creates) `file` in `dir` (0700, the file 0600) and reads
    /// it whole.
    pub fn open(dir: &Path, file: &str) -> Result<(Journal, Contents), KeystoreError> {
        let path = dir.join(file);
        super::embedded::private_store_file(dir, &path)?;
        let db = redb::Database::create(&path)
            .map_err(|e| KeystoreError::Open(format!("{}: {e}", path.display())))?;
        {
            let txn = db.begin_write().map_err(storage)?;
            txn.open_table(RECORDS).map_err(storage)?;
            txn.open_table(OUTBOX).map_err(storage)?;
            txn.open_table(TOMBSTONES).map_err(storage)?;
            txn.open_table(INTENTS).map_err(storage)?;
            txn.commit().map_err(storage)?;
        }
        let contents = read_all(&db)?;
        Ok((
            Journal {
                path,
                db: RwLock::new(Some(db)),
                poisoned: AtomicBool::new(false),
            },
            contents,
        ))
    }

    /// Runs `f` on the database, reopening it first after an I/O error.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&redb::Database) -> Result<T, redb::Error>,
    ) -> Result<T, KeystoreError> {
        if self.poisoned.load(Ordering::Acquire) {
            let mut slot = self.db.write().map_err(storage)?;
            if self.poisoned.load(Ordering::Acquire) {
                // The old handle must be gone before the file is opened again.
                *slot = None;
                let db = redb::Database::create(&self.path).map_err(|e| {
                    KeystoreError::Storage(format!(
                        "journal {} cannot be opened again: {e}",
                        self.path.display()
                    ))
                })?;
                *slot = Some(db);
                self.poisoned.store(false, Ordering::Release);
                tracing::info!(file = %self.path.display(), "journal reopened after an I/O error");
            }
        }
        let slot = self.db.read().map_err(storage)?;
        let db = slot
            .as_ref()
            .ok_or_else(|| storage("journal closed after an I/O error"))?;
        f(db).map_err(|e| {
            if super::embedded::poisons(&e) {
                self.poisoned.store(true, Ordering::Release);
            }
            KeystoreError::Storage(format!("journal: {e}"))
        })
    }

    /// Commits `changes` in one transaction, in order.
    pub fn commit(&self, changes: &[Change<'_>]) -> Result<(), KeystoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut encoded = Vec::new();
        for c in changes {
            if let Change::Put(_, r) = c {
                encoded.push(bincode::serde::encode_to_vec(r, bincode_config()).map_err(storage)?);
            }
        }
        self.with_db(|db| {
            let txn = db.begin_write()?;
            {
                let mut records = txn.open_table(RECORDS)?;
                let mut outbox = txn.open_table(OUTBOX)?;
                let mut tombs = txn.open_table(TOMBSTONES)?;
                let mut intents = txn.open_table(INTENTS)?;
                let mut puts = encoded.iter();
                for c in changes {
                    match c {
                        Change::Intend(id) => {
                            intents.insert(id.0.as_u128(), ())?;
                        }
                        Change::Settle(id) => {
                            intents.remove(id.0.as_u128())?;
                        }
                        Change::Put(id, _) => {
                            if let Some(bytes) = puts.next() {
                                records.insert(id.0.as_u128(), bytes.as_slice())?;
                            }
                        }
                        Change::Remove(id) => {
                            records.remove(id.0.as_u128())?;
                        }
                        Change::Tombstone(id) => {
                            tombs.insert(id.0.as_u128(), Timestamp::now().as_nanos())?;
                        }
                        Change::Outbox(id, bytes) => {
                            outbox.insert(id.0.as_u128(), *bytes)?;
                        }
                        Change::OutboxDone(id, only_if) => {
                            let same = match only_if {
                                None => true,
                                Some(want) => outbox
                                    .get(id.0.as_u128())?
                                    .is_some_and(|v| v.value() == *want),
                            };
                            if same {
                                outbox.remove(id.0.as_u128())?;
                            }
                        }
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })
    }

    /// The events not yet confirmed published.
    pub fn outbox(&self) -> Result<Vec<(KeyId, OutboxEntry)>, KeystoreError> {
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(OUTBOX)?;
            let mut out = Vec::new();
            for row in table.iter()? {
                let (k, v) = row?;
                out.push((id_of(k.value()), v.value().to_vec()));
            }
            Ok(out)
        })
    }
}

fn read_all(db: &redb::Database) -> Result<Contents, KeystoreError> {
    let txn = db.begin_read().map_err(storage)?;
    let mut contents = Contents::default();
    for row in txn
        .open_table(RECORDS)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (k, v) = row.map_err(storage)?;
        let id = id_of(k.value());
        let rec = read_record(v.value())
            .map_err(|e| KeystoreError::Open(format!("journal record of key {id}: {e}")))?;
        contents.records.insert(id, rec);
    }
    for row in txn
        .open_table(TOMBSTONES)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        contents
            .tombstones
            .insert(id_of(row.map_err(storage)?.0.value()));
    }
    for row in txn
        .open_table(OUTBOX)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        contents
            .outbox
            .insert(id_of(row.map_err(storage)?.0.value()));
    }
    for row in txn
        .open_table(INTENTS)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        contents
            .intents
            .push(id_of(row.map_err(storage)?.0.value()));
    }
    Ok(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_records_are_read_with_no_app_id() {
        // The layout the last version-1 build wrote: version, type,
        // fingerprint, attributes (label only), stored_at.
        let at = Timestamp(1_700_000_000_000_000_000);
        let v1 = (
            1u8,
            KeyType::Rsa2048,
            Fingerprint([9; 32]),
            keysync_schemas::v1::KeyAttributes {
                label: Some("old".into()),
            },
            at,
        );
        let bytes = bincode::serde::encode_to_vec(&v1, bincode_config()).expect("encode");
        let rec = read_record(&bytes).expect("a v1 record reads");
        assert_eq!(rec.version, RECORD_VERSION);
        assert_eq!(rec.key_type, KeyType::Rsa2048);
        assert_eq!(rec.attributes.label.as_deref(), Some("old"));
        assert_eq!(rec.attributes.app_id, None);
        assert_eq!(rec.stored_at, at);
        // A v2 record keeps its app id; an unknown version is refused.
        let mut attributes = rec.attributes.clone();
        attributes.app_id = Some(vec![1, 2]);
        let v2 = Record::new(KeyType::P256, Fingerprint([1; 32]), attributes, at);
        let bytes = bincode::serde::encode_to_vec(&v2, bincode_config()).expect("encode");
        assert_eq!(bytes[0], 2);
        assert_eq!(read_record(&bytes), Ok(v2));
        let mut bad = bytes.clone();
        bad[0] = 3;
        assert!(read_record(&bad).is_err());
    }

    #[test]
    fn changes_commit_together_and_read_back() {
        let dir = tempfile::tempdir().expect("dir");
        let (a, b) = (KeyId::new(), KeyId::new());
        let rec = Record::new(
            KeyType::P256,
            Fingerprint([3; 32]),
            KeyAttributes::default(),
            Timestamp::now(),
        );
        {
            let (j, c) = Journal::open(dir.path(), "journal.redb").expect("open");
            assert!(c.records.is_empty() && c.intents.is_empty());
            j.commit(&[Change::Intend(a), Change::Intend(b)])
                .expect("intend");
            j.commit(&[
                Change::Put(a, &rec),
                Change::Outbox(a, b"ev"),
                Change::Settle(a),
            ])
            .expect("created");
            j.commit(&[Change::Tombstone(b), Change::Outbox(b, b"del")])
                .expect("tombstone");
            // Only the bytes given are forgotten.
            j.commit(&[Change::OutboxDone(b, Some(b"other"))])
                .expect("kept");
            assert_eq!(j.outbox().expect("outbox").len(), 2);
            j.commit(&[Change::OutboxDone(b, Some(b"del"))])
                .expect("done");
        }
        let (j, c) = Journal::open(dir.path(), "journal.redb").expect("reopen");
        assert_eq!(c.records.get(&a), Some(&rec));
        assert!(c.tombstones.contains(&b));
        assert_eq!(c.intents, vec![b]);
        assert_eq!(j.outbox().expect("outbox"), vec![(a, b"ev".to_vec())]);
    }
}
