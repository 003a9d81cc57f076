//! The envelope every keysync message travels in.
//!
//! The schema version is not a field of the envelope: it is the fixed
//! header [`crate::codec`] writes before the bincode body, because bincode
//! carries no layout of its own and a reader must know the version before it
//! can decode anything. Signatures and W3C trace context travel in NATS
//! headers over the exact payload bytes ([`crate::headers`]), so they are
//! added without changing this layout.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::keys::HsmId;

/// The schema version this build writes. Version 2 added the application's
/// key id to [`crate::KeyAttributes`].
pub const SCHEMA_VERSION: u16 = 2;

/// The oldest schema version this build reads: version-1 bodies are
/// decoded into [`crate::v1`]'s types and upcast in [`crate::codec`].
pub const OLDEST_SCHEMA_VERSION: u16 = 1;

/// Wall-clock time as nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Now, by this machine's clock.
    pub fn now() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Timestamp(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Nanoseconds since the epoch.
    pub fn as_nanos(self) -> u64 {
        self.0
    }
}

/// Who emitted a message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Source {
    /// An `hsm-agent`.
    Hsm(HsmId),
    /// The orchestrator (its instance name).
    Orchestrator(String),
    /// A client (SDK or CLI), by its self-chosen name.
    Client(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Hsm(h) => write!(f, "hsm-agent {h}"),
            Source::Orchestrator(n) => write!(f, "orchestrator {n}"),
            Source::Client(n) => write!(f, "client {n}"),
        }
    }
}

/// A message with its metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Unique message id; for events it is also the JetStream `Nats-Msg-Id`,
    /// so a publish retried after a lost PubAck is stored once.
    pub id: Uuid,
    /// When the sender built the message.
    pub emitted_at: Timestamp,
    /// Who sent it.
    pub source: Source,
    /// The message itself.
    pub body: T,
}

impl<T> Envelope<T> {
    /// Wraps `body` with a fresh id and the current time.
    pub fn new(source: Source, body: T) -> Self {
        Envelope {
            id: Uuid::now_v7(),
            emitted_at: Timestamp::now(),
            source,
            body,
        }
    }

    /// The same envelope around `f(body)` (an upcast keeps id, time and
    /// source).
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Envelope<U> {
        Envelope {
            id: self.id,
            emitted_at: self.emitted_at,
            source: self.source,
            body: f(self.body),
        }
    }

    /// Wraps `body` with a given id (deterministic ids make retries and
    /// re-sent commands deduplicate in JetStream).
    pub fn with_id(id: Uuid, source: Source, body: T) -> Self {
        Envelope {
            id,
            emitted_at: Timestamp::now(),
            source,
            body,
        }
    }
}
