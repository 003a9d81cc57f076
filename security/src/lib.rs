//! What keeps the bus honest.
//!
//! The bus is shared: anyone who can reach it may send anything. keysync
//! therefore trusts no message for where it came from, only for who signed
//! it:
//!
//! - [`identity`]: Ed25519 identities. Each agent has one (made at first
//!   start, mode 0600, zeroized in memory); the orchestrators of a cluster
//!   share the cluster identity, which also signs operators' enrollments.
//! - [`signature`]: every event, command and heartbeat is signed over its
//!   subject, its deduplication id and its exact payload bytes; the
//!   signature travels in headers beside the payload.
//! - [`freshness`]: the replay window. A signed message replayed within
//!   JetStream's duplicate window is dropped by JetStream (the id is
//!   signed); one replayed later is older than the window and rejected.
//! - [`join`]: one-time join tokens.
//! - [`message_id`]: the key the orchestrators' message ids are MACed
//!   under, so nobody else can tell an id in advance.
//! - [`dead_letter`]: every rejected message is copied, with its reason, to
//!   the dead-letter stream.
//! - [`domain_key`]: the cluster domain key file and RFC 5649 wrapping
//!   under it (what travels between HSMs is wrapped by it).
//! - [`credentials`]: NATS user/password, nkey or creds-file flags shared by
//!   every binary, so NATS permissions can confine each role.
//! - `nats_jwt` (feature `jwt`): NATS operator, account and per-agent
//!   user JWTs, so adding an HSM edits no server config.
//! - [`reply`]: responders answer only inboxes; each role asks under its
//!   own inbox prefix.

pub mod credentials;
pub mod dead_letter;
pub mod domain_key;
pub mod freshness;
pub mod identity;
pub mod join;
pub mod message_id;
#[cfg(feature = "jwt")]
pub mod nats_jwt;
pub mod policy;
pub mod reply;
pub mod secret_file;
pub mod signature;

pub use credentials::NatsAuth;
pub use dead_letter::{DeadLetterError, DeadLetters, Filing, Keep};
pub use identity::{parse_public_key, Identity, IdentityError};
pub use message_id::MessageIdKey;
pub use policy::{
    check_command, check_dead_letter, check_event, check_event_verified, check_heartbeat,
    event_signer, preverify, signed_headers, Pending, Verified,
};
pub use signature::{Claim, Signer};
