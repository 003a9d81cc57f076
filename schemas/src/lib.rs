//! Every keysync wire type, and nothing else.
//!
//! keysync processes (the `hsm-agent`s, the `orchestrator`, the `keysync`
//! client) talk only through NATS and JetStream. Everything they put on the
//! bus is defined here:
//!
//! - [`envelope`]: the versioned envelope every message travels in (message
//!   id, schema version, time, source);
//! - [`events`]: the facts agents and the orchestrator append to the event
//!   stream (`KeyCreated`, `CloneApplied`, `KeyReplicated`, ...);
//! - [`commands`]: what the orchestrator asks one agent to do (`CloneKey`);
//! - [`ops`]: the request/reply key operations clients send to agents;
//! - [`dead_letter`]: a rejected message, kept with its reason;
//! - [`rejection`]: why a message was rejected, one typed reason for all;
//! - [`lifecycle`]: CloudEvents for other languages (JSON, with JSON Schemas);
//! - [`status`]: cluster status, as the orchestrator reports it;
//! - [`subjects`]: the subject and stream layout under a cluster prefix;
//! - [`headers`]: NATS header names (dedup id, later signatures and trace
//!   context, which travel beside the payload so adding them breaks nothing);
//! - [`codec`]: the one place bytes become values, with a size limit and an
//!   explicit version check;
//! - [`v1`]: schema version 1's shapes of the messages version 2 changed,
//!   decoded and upcast by [`codec`] only.
//!
//! Decoding never panics, whatever the bytes (a property test checks it).
#![warn(missing_docs)]

pub mod audit;
pub mod codec;
pub mod commands;
pub mod dead_letter;
pub mod envelope;
pub mod events;
pub mod headers;
pub mod heartbeat;
pub mod keys;
pub mod lifecycle;
pub mod metrics;
pub mod ops;
pub mod rejection;
pub mod status;
pub mod subjects;
pub mod v1;

pub use audit::{record_hash, Actor, AuditFact, AuditRecord};
pub use codec::{
    decode, encode, DecodeError, EncodeError, Message, MAX_EVENT_BYTES, MAX_MESSAGE_BYTES,
};
pub use commands::{CloneBatch, CloneKey, Command, DeleteKey};
pub use dead_letter::DeadLetter;
pub use envelope::{Envelope, Source, Timestamp, OLDEST_SCHEMA_VERSION, SCHEMA_VERSION};
pub use events::{
    join_proof_message, AppliedKey, Checkpoint, CloneApplied, CloneFailed, CloneFailure,
    ClonesApplied, EnrolledVia, Event, HsmCapabilities, HsmEnrolled, HsmFailed, HsmJoined,
    HsmRecovered, HsmRevoked, JoinRequested, JoinTokenIssued, KeyCreated, KeyDeleted, KeyErased,
    KeyOrigin, KeyReplicated, PublicKeyBytes, MAX_APPLIED_PER_EVENT,
};
pub use heartbeat::{Heartbeat, InventoryDigest};
pub use keys::{
    AttributeError, DomainId, Durability, Fingerprint, HsmId, IdError, KeyAttributes, KeyId,
    KeyType, SecretBytes, MAX_APP_ID_BYTES, MAX_LABEL_BYTES,
};
pub use metrics::{HsmMetrics, LatencySummary, SyncMetrics, METRICS_VERSION};
pub use ops::{
    AgentHealth, DigestAlg, DigestSignScheme, GcmParams, KeyInfo, OpError, OpErrorKind, OpReply,
    OpRequest, ECDSA_DIGEST_LENS, GCM_IV_LEN, RSA_MODULUS_BYTES,
};
pub use rejection::{RejectReason, Rejection};
pub use status::{
    ClusterStatus, KeyStanding, KeyStatus, MemberState, MemberStatus, StatusReply, StatusRequest,
};
pub use subjects::Subjects;
