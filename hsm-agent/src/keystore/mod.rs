//! The HSM behind an agent, as a trait.
//!
//! An agent fronts one HSM. The trait speaks at the level of an HSM (create
//! a key, clone one in from its wrapped form, sign with a key) rather than
//! of raw storage, so a PKCS#11 backend can implement it with the material
//! never leaving the device. The embedded backend ([`embedded`]) is a
//! software HSM on a redb database; it is the default.

pub mod embedded;
pub mod journal;
#[cfg(feature = "pkcs11")]
pub mod pkcs11;

use keysync_schemas::{
    CloneFailure, CloneKey, DigestSignScheme, DomainId, Fingerprint, GcmParams, HsmId,
    InventoryDigest, KeyAttributes, KeyId, KeyInfo, KeyOrigin, KeyType, OpErrorKind,
};

use crate::material::MaterialError;

/// What a keystore operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    /// No such key on this HSM.
    #[error("key {0} is not on this HSM")]
    NotFound(KeyId),
    /// A key with this id exists already.
    #[error("this HSM already holds a key with id {0}")]
    AlreadyExists(KeyId),
    /// The id belonged to a key deleted here; ids are never reused.
    #[error("key id {0} belonged to a key deleted on this HSM; key ids are never reused")]
    Deleted(KeyId),
    /// The key cannot do this.
    #[error(transparent)]
    Material(#[from] MaterialError),
    /// The wrapped blob did not unwrap (wrong key or tampered).
    #[error("unwrap failed its integrity check")]
    Integrity,
    /// The wrapping key is not an AES-256 key.
    #[error("key {0} is not an AES-256 wrapping key")]
    NotAWrappingKey(KeyId),
    /// The store itself failed.
    #[error("key store: {0}")]
    Storage(String),
    /// The stored keys cannot be decrypted (wrong domain key or corrupt store).
    #[error("cannot open key store: {0}")]
    Open(String),
    /// This HSM cannot hold keys of this type (its token lacks a mechanism).
    #[error("this HSM cannot hold {key_type} keys: {why}")]
    CannotHold {
        /// The type.
        key_type: KeyType,
        /// The token's reason.
        why: String,
    },
    /// The PKCS#11 token refused or failed.
    #[cfg(feature = "pkcs11")]
    #[error(transparent)]
    Token(#[from] pkcs11::Pkcs11Error),
}

impl KeystoreError {
    /// The operation error kind a client sees.
    pub fn kind(&self) -> OpErrorKind {
        match self {
            KeystoreError::NotFound(_) => OpErrorKind::KeyNotFound,
            KeystoreError::AlreadyExists(_) => OpErrorKind::AlreadyExists,
            KeystoreError::Deleted(_) => OpErrorKind::KeyIdTaken,
            KeystoreError::Material(MaterialError::Unsupported { .. }) => OpErrorKind::Unsupported,
            KeystoreError::Material(MaterialError::Invalid(_) | MaterialError::BadInput(_)) => {
                OpErrorKind::BadRequest
            }
            KeystoreError::Material(MaterialError::Integrity) | KeystoreError::Integrity => {
                OpErrorKind::IntegrityFailed
            }
            KeystoreError::NotAWrappingKey(_) => OpErrorKind::BadRequest,
            KeystoreError::Material(_) | KeystoreError::Open(_) => OpErrorKind::Internal,
            KeystoreError::Storage(_) => OpErrorKind::Unavailable,
            KeystoreError::CannotHold { .. } => OpErrorKind::Unsupported,
            #[cfg(feature = "pkcs11")]
            KeystoreError::Token(e) => e.kind(),
        }
    }
}

/// Where a new key's material comes from.
pub enum KeySource<'a> {
    /// Generate it inside the HSM.
    Generate,
    /// Plaintext PKCS#8 DER or raw AES bytes.
    Import(&'a [u8]),
    /// An RFC 5649 blob under an AES-256 key this HSM holds.
    Unwrap {
        /// The wrapping key.
        wrapping_key: KeyId,
        /// The blob.
        blob: &'a [u8],
    },
}

impl KeySource<'_> {
    /// The origin recorded in `KeyCreated`.
    pub fn origin(&self) -> KeyOrigin {
        match self {
            KeySource::Generate => KeyOrigin::Generated,
            KeySource::Import(_) => KeyOrigin::Imported,
            KeySource::Unwrap { .. } => KeyOrigin::Unwrapped,
        }
    }
}

/// A request to create a key.
pub struct NewKey<'a> {
    /// Its id.
    pub id: KeyId,
    /// Its type.
    pub key_type: KeyType,
    /// Session keys stay in memory on this HSM only.
    pub session: bool,
    /// Attributes.
    pub attributes: KeyAttributes,
    /// Where the material comes from.
    pub source: KeySource<'a>,
}

/// A token key just created, in the form it is announced to the cluster.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// What the HSM holds.
    pub info: KeyInfo,
    /// How it was made.
    pub origin: KeyOrigin,
    /// The material wrapped under the domain key (empty for session keys).
    pub wrapped: Vec<u8>,
    /// SPKI DER, for asymmetric keys.
    pub public_key: Option<Vec<u8>>,
    /// The domain key `wrapped` is under.
    pub domain: DomainId,
}

/// A key clone applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloneOutcome {
    /// Stored now.
    Stored,
    /// Already held with the same fingerprint (idempotent no-op).
    AlreadyPresent,
    /// The key was deleted here: its tombstone refuses it (no-op).
    Tombstoned,
}

/// At most `limit` of what `keep` makes of the entries of `index` (ordered
/// by key id) after `after`: a page of a listing or an inventory.
pub(crate) fn page<V, T>(
    index: &std::collections::BTreeMap<KeyId, V>,
    after: Option<KeyId>,
    limit: usize,
    keep: impl FnMut((&KeyId, &V)) -> Option<T>,
) -> Vec<T> {
    use std::ops::Bound;
    let start = after.map_or(Bound::Unbounded, Bound::Excluded);
    index
        .range((start, Bound::Unbounded))
        .filter_map(keep)
        .take(limit)
        .collect()
}

/// Bytes of an event to publish later, stored atomically with a new key so
/// a key never exists without its `KeyCreated` eventually being logged.
pub type OutboxEntry = Vec<u8>;

/// One HSM.
pub trait Keystore: Send + Sync + 'static {
    /// This HSM's id.
    fn hsm_id(&self) -> &HsmId;
    /// The domain key this HSM holds.
    fn domain_id(&self) -> DomainId;

    /// The key types this HSM can hold as cluster keys: create clonable
    /// and receive as clones. A token may lack a mechanism (SoftHSM 2.6.1
    /// can neither wrap nor unwrap Ed25519); the cluster learns this set so
    /// a key of a type a member cannot hold is not sent to it. The embedded
    /// backend holds every type.
    fn holdable_types(&self) -> Vec<KeyType> {
        KeyType::ALL.to_vec()
    }

    /// Creates a key. For token keys, `outbox` is called with the created
    /// key and the event bytes it returns are stored in the same
    /// transaction, to be published (and then forgotten) by the agent.
    fn create(
        &self,
        key: NewKey<'_>,
        outbox: &mut dyn FnMut(&CreatedKey) -> Result<OutboxEntry, String>,
    ) -> Result<CreatedKey, KeystoreError>;

    /// Applies clones in one transaction; one result per command, in order.
    /// A failed clone stores nothing. A clone of an id under which this HSM
    /// holds a key of its own with another fingerprint fails `Undecided`
    /// (passing) while that key's `KeyCreated` is in the outbox, and
    /// `Conflict` (final) once it is logged.
    fn apply_clones(&self, clones: &[&CloneKey]) -> Vec<Result<CloneOutcome, CloneFailure>>;

    /// Signs with a key.
    fn sign(&self, id: &KeyId, data: &[u8]) -> Result<Vec<u8>, KeystoreError>;
    /// Verifies a signature.
    fn verify(&self, id: &KeyId, data: &[u8], signature: &[u8]) -> Result<bool, KeystoreError>;
    /// AES-256-GCM encryption.
    fn encrypt(&self, id: &KeyId, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeystoreError>;
    /// AES-256-GCM decryption.
    fn decrypt(
        &self,
        id: &KeyId,
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KeystoreError>;
    /// Signs a digest the caller computed (see [`DigestSignScheme`]).
    fn sign_digest(
        &self,
        id: &KeyId,
        scheme: &DigestSignScheme,
        digest: &[u8],
    ) -> Result<Vec<u8>, KeystoreError>;
    /// AES-256-GCM with the caller's IV, AAD and tag length: ciphertext ‖ tag.
    fn encrypt_gcm(
        &self,
        id: &KeyId,
        params: &GcmParams,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KeystoreError>;
    /// Opens ciphertext ‖ tag sealed with these parameters.
    fn decrypt_gcm(
        &self,
        id: &KeyId,
        params: &GcmParams,
        sealed: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KeystoreError>;
    /// SPKI DER of a key.
    fn public_key(&self, id: &KeyId) -> Result<Vec<u8>, KeystoreError>;
    /// One key's metadata.
    fn info(&self, id: &KeyId) -> Result<KeyInfo, KeystoreError>;
    /// Keys after `after`, in id order, at most `limit` (session keys too).
    fn list_page(&self, after: Option<KeyId>, limit: usize) -> Vec<KeyInfo>;
    /// Number of keys, session keys included.
    fn key_count(&self) -> u64;
    /// Number of token keys.
    fn token_key_count(&self) -> u64;

    /// Erases a token key and keeps its tombstone, so it is refused from
    /// then on. `outbox` bytes (the `KeyDeleted` event, when this HSM
    /// starts the deletion) are stored in the same transaction. Returns the
    /// erased key's metadata, or `None` if it was not held (the tombstone
    /// is kept all the same).
    fn delete(
        &self,
        id: &KeyId,
        outbox: Option<OutboxEntry>,
    ) -> Result<Option<KeyInfo>, KeystoreError>;

    /// Digest of the token keys held (see `InventoryDigest`).
    fn inventory_digest(&self) -> InventoryDigest;

    /// Token keys after `after`, in id order, at most `limit`.
    fn inventory_page(&self, after: Option<KeyId>, limit: usize) -> Vec<(KeyId, Fingerprint)>;

    /// Undoes a create the log refused (its id was taken in the cluster
    /// first): in one transaction, removes the key if it still has
    /// `fingerprint`, and the outbox entry if it is still `entry`. Keeps no
    /// tombstone: the winner's key is cloned in under that id next. Returns
    /// whether a key was removed.
    fn discard_created(
        &self,
        id: &KeyId,
        fingerprint: &Fingerprint,
        entry: &[u8],
    ) -> Result<bool, KeystoreError>;

    /// Events stored by `create` and not yet confirmed published.
    fn outbox(&self) -> Result<Vec<(KeyId, OutboxEntry)>, KeystoreError>;
    /// Forgets outbox entries whose publication was acknowledged.
    fn outbox_done(&self, ids: &[KeyId]) -> Result<(), KeystoreError>;
}
