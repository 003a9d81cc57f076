//! Schema version 1, kept so that version-1 messages still decode.
//!
//! bincode carries no layout of its own and has no optional trailing
//! fields, so adding `app_id` to [`crate::KeyAttributes`] made schema
//! version 2 (decision 1). Every message that carries key attributes has
//! its version-1 shape here; the codec decodes a version-1 body into these
//! types and upcasts it with `From` (`app_id: None`), here and nowhere
//! else. Variants that did not change reuse today's types, so their bytes
//! are the same in both versions. The events stream's old `KeyCreated`s
//! replay for ever, so this module stays as long as such a log may exist.
//!
//! Nothing writes these types: every writer writes version 2.

use serde::{Deserialize, Serialize};

use crate::commands::DeleteKey;
use crate::envelope::Timestamp;
use crate::events::{
    CloneApplied, CloneFailed, HsmCapabilities, HsmEnrolled, HsmFailed, HsmJoined, HsmRecovered,
    HsmRevoked, JoinRequested, JoinTokenIssued, KeyDeleted, KeyErased, KeyOrigin, KeyReplicated,
};
use crate::keys::{DomainId, Durability, Fingerprint, HsmId, KeyId, KeyType, SecretBytes};
use crate::ops::{AgentHealth, DigestSignScheme, GcmParams, OpError};

/// Version-1 [`crate::KeyAttributes`]: the label only.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeyAttributes {
    /// The label.
    pub label: Option<String>,
}

impl From<KeyAttributes> for crate::KeyAttributes {
    fn from(a: KeyAttributes) -> Self {
        crate::KeyAttributes {
            label: a.label,
            app_id: None,
        }
    }
}

/// Version-1 [`crate::KeyCreated`].
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCreated {
    pub key_id: KeyId,
    pub key_type: KeyType,
    pub fingerprint: Fingerprint,
    pub hsm: HsmId,
    pub origin: KeyOrigin,
    pub attributes: KeyAttributes,
    pub durability: Durability,
    pub domain: DomainId,
    pub wrapped: Vec<u8>,
    pub public_key: Option<Vec<u8>>,
}

impl From<KeyCreated> for crate::KeyCreated {
    fn from(c: KeyCreated) -> Self {
        crate::KeyCreated {
            key_id: c.key_id,
            key_type: c.key_type,
            fingerprint: c.fingerprint,
            hsm: c.hsm,
            origin: c.origin,
            attributes: c.attributes.into(),
            durability: c.durability,
            domain: c.domain,
            wrapped: c.wrapped,
            public_key: c.public_key,
        }
    }
}

/// Version-1 [`crate::Event`]: same variants in the same order.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    KeyCreated(KeyCreated),
    CloneApplied(CloneApplied),
    CloneFailed(CloneFailed),
    KeyReplicated(KeyReplicated),
    HsmJoined(HsmJoined),
    HsmFailed(HsmFailed),
    HsmRecovered(HsmRecovered),
    KeyDeleted(KeyDeleted),
    KeyErased(KeyErased),
    HsmEnrolled(HsmEnrolled),
    HsmRevoked(HsmRevoked),
    JoinTokenIssued(JoinTokenIssued),
    JoinRequested(JoinRequested),
    HsmCapabilities(HsmCapabilities),
}

impl From<Event> for crate::Event {
    fn from(e: Event) -> Self {
        use crate::Event as E;
        match e {
            Event::KeyCreated(c) => E::KeyCreated(c.into()),
            Event::CloneApplied(x) => E::CloneApplied(x),
            Event::CloneFailed(x) => E::CloneFailed(x),
            Event::KeyReplicated(x) => E::KeyReplicated(x),
            Event::HsmJoined(x) => E::HsmJoined(x),
            Event::HsmFailed(x) => E::HsmFailed(x),
            Event::HsmRecovered(x) => E::HsmRecovered(x),
            Event::KeyDeleted(x) => E::KeyDeleted(x),
            Event::KeyErased(x) => E::KeyErased(x),
            Event::HsmEnrolled(x) => E::HsmEnrolled(x),
            Event::HsmRevoked(x) => E::HsmRevoked(x),
            Event::JoinTokenIssued(x) => E::JoinTokenIssued(x),
            Event::JoinRequested(x) => E::JoinRequested(x),
            Event::HsmCapabilities(x) => E::HsmCapabilities(x),
        }
    }
}

/// Version-1 [`crate::CloneKey`].
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneKey {
    pub target: HsmId,
    pub created_seq: u64,
    pub key: KeyCreated,
}

impl From<CloneKey> for crate::CloneKey {
    fn from(c: CloneKey) -> Self {
        crate::CloneKey {
            target: c.target,
            created_seq: c.created_seq,
            key: c.key.into(),
        }
    }
}

/// Version-1 [`crate::CloneBatch`].
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneBatch {
    pub target: HsmId,
    pub clones: Vec<CloneKey>,
}

/// Version-1 [`crate::Command`].
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    CloneKey(CloneKey),
    DeleteKey(DeleteKey),
    CloneBatch(CloneBatch),
}

impl From<Command> for crate::Command {
    fn from(c: Command) -> Self {
        use crate::Command as C;
        match c {
            Command::CloneKey(k) => C::CloneKey(k.into()),
            Command::DeleteKey(d) => C::DeleteKey(d),
            Command::CloneBatch(b) => C::CloneBatch(crate::CloneBatch {
                target: b.target,
                clones: b.clones.into_iter().map(Into::into).collect(),
            }),
        }
    }
}

/// Version-1 [`crate::KeyInfo`].
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub key_id: KeyId,
    pub key_type: KeyType,
    pub fingerprint: Fingerprint,
    pub session: bool,
    pub attributes: KeyAttributes,
    pub hsm: HsmId,
    pub stored_at: Timestamp,
}

impl From<KeyInfo> for crate::KeyInfo {
    fn from(k: KeyInfo) -> Self {
        crate::KeyInfo {
            key_id: k.key_id,
            key_type: k.key_type,
            fingerprint: k.fingerprint,
            session: k.session,
            attributes: k.attributes.into(),
            hsm: k.hsm,
            stored_at: k.stored_at,
        }
    }
}

/// Version-1 [`crate::OpRequest`]: the creates carried version-1
/// attributes; every other variant is as today.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpRequest {
    Generate {
        key_id: Option<KeyId>,
        key_type: KeyType,
        session: bool,
        durability: Durability,
        attributes: KeyAttributes,
    },
    Import {
        key_id: Option<KeyId>,
        key_type: KeyType,
        material: SecretBytes,
        session: bool,
        durability: Durability,
        attributes: KeyAttributes,
    },
    Unwrap {
        key_id: Option<KeyId>,
        key_type: KeyType,
        wrapping_key: KeyId,
        wrapped: Vec<u8>,
        session: bool,
        durability: Durability,
        attributes: KeyAttributes,
    },
    Sign {
        key_id: KeyId,
        data: Vec<u8>,
    },
    Verify {
        key_id: KeyId,
        data: Vec<u8>,
        signature: Vec<u8>,
    },
    Encrypt {
        key_id: KeyId,
        plaintext: SecretBytes,
        aad: Vec<u8>,
    },
    Decrypt {
        key_id: KeyId,
        ciphertext: Vec<u8>,
        aad: Vec<u8>,
    },
    PublicKey {
        key_id: KeyId,
    },
    Info {
        key_id: KeyId,
    },
    List {
        after: Option<KeyId>,
        limit: u32,
    },
    Health,
    Delete {
        key_id: KeyId,
    },
    Inventory {
        after: Option<KeyId>,
        limit: u32,
    },
    SignDigest {
        key_id: KeyId,
        scheme: DigestSignScheme,
        digest: Vec<u8>,
    },
    EncryptGcm {
        key_id: KeyId,
        params: GcmParams,
        plaintext: SecretBytes,
    },
    DecryptGcm {
        key_id: KeyId,
        params: GcmParams,
        ciphertext: Vec<u8>,
    },
}

impl From<OpRequest> for crate::OpRequest {
    fn from(r: OpRequest) -> Self {
        use crate::OpRequest as R;
        match r {
            OpRequest::Generate {
                key_id,
                key_type,
                session,
                durability,
                attributes,
            } => R::Generate {
                key_id,
                key_type,
                session,
                durability,
                attributes: attributes.into(),
            },
            OpRequest::Import {
                key_id,
                key_type,
                material,
                session,
                durability,
                attributes,
            } => R::Import {
                key_id,
                key_type,
                material,
                session,
                durability,
                attributes: attributes.into(),
            },
            OpRequest::Unwrap {
                key_id,
                key_type,
                wrapping_key,
                wrapped,
                session,
                durability,
                attributes,
            } => R::Unwrap {
                key_id,
                key_type,
                wrapping_key,
                wrapped,
                session,
                durability,
                attributes: attributes.into(),
            },
            OpRequest::Sign { key_id, data } => R::Sign { key_id, data },
            OpRequest::Verify {
                key_id,
                data,
                signature,
            } => R::Verify {
                key_id,
                data,
                signature,
            },
            OpRequest::Encrypt {
                key_id,
                plaintext,
                aad,
            } => R::Encrypt {
                key_id,
                plaintext,
                aad,
            },
            OpRequest::Decrypt {
                key_id,
                ciphertext,
                aad,
            } => R::Decrypt {
                key_id,
                ciphertext,
                aad,
            },
            OpRequest::PublicKey { key_id } => R::PublicKey { key_id },
            OpRequest::Info { key_id } => R::Info { key_id },
            OpRequest::List { after, limit } => R::List { after, limit },
            OpRequest::Health => R::Health,
            OpRequest::Delete { key_id } => R::Delete { key_id },
            OpRequest::Inventory { after, limit } => R::Inventory { after, limit },
            OpRequest::SignDigest {
                key_id,
                scheme,
                digest,
            } => R::SignDigest {
                key_id,
                scheme,
                digest,
            },
            OpRequest::EncryptGcm {
                key_id,
                params,
                plaintext,
            } => R::EncryptGcm {
                key_id,
                params,
                plaintext,
            },
            OpRequest::DecryptGcm {
                key_id,
                params,
                ciphertext,
            } => R::DecryptGcm {
                key_id,
                params,
                ciphertext,
            },
        }
    }
}

/// Version-1 [`crate::OpReply`]: `Created`, `Info` and `List` carried
/// version-1 key infos.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpReply {
    Created {
        info: KeyInfo,
        durability: Durability,
        created_seq: Option<u64>,
    },
    Signature(Vec<u8>),
    Verified(bool),
    Ciphertext(Vec<u8>),
    Plaintext(SecretBytes),
    PublicKey(Vec<u8>),
    Info(KeyInfo),
    List(Vec<KeyInfo>),
    Health(AgentHealth),
    Deleted {
        key_id: KeyId,
        seq: u64,
    },
    Inventory(Vec<(KeyId, Fingerprint)>),
    Error(OpError),
}

impl From<OpReply> for crate::OpReply {
    fn from(r: OpReply) -> Self {
        use crate::OpReply as R;
        match r {
            OpReply::Created {
                info,
                durability,
                created_seq,
            } => R::Created {
                info: info.into(),
                durability,
                created_seq,
            },
            OpReply::Signature(x) => R::Signature(x),
            OpReply::Verified(x) => R::Verified(x),
            OpReply::Ciphertext(x) => R::Ciphertext(x),
            OpReply::Plaintext(x) => R::Plaintext(x),
            OpReply::PublicKey(x) => R::PublicKey(x),
            OpReply::Info(i) => R::Info(i.into()),
            OpReply::List(l) => R::List(l.into_iter().map(Into::into).collect()),
            OpReply::Health(x) => R::Health(x),
            OpReply::Deleted { key_id, seq } => R::Deleted { key_id, seq },
            OpReply::Inventory(x) => R::Inventory(x),
            OpReply::Error(x) => R::Error(x),
        }
    }
}
