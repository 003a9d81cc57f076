//! SDK errors, kept apart because callers handle them apart.

use keysync_schemas::{Durability, HsmId, KeyId, OpError, OpErrorKind};

/// What an SDK call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not connect to NATS.
    #[error("cannot connect to NATS at {url}: {detail}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        detail: String,
    },
    /// No HSM answered (none serves that subject, or none in time). Retry
    /// later or route elsewhere.
    #[error("HSM unavailable ({route}): {detail}")]
    HsmUnavailable {
        /// Where the request went.
        route: String,
        /// Why.
        detail: String,
        /// Nobody was subscribed to answer (no HSM serving that route right
        /// now, as while agents reconnect after a NATS restart): the request
        /// reached no HSM, so it is always safe to send again.
        no_responders: bool,
    },
    /// The HSM asked does not hold the key. Right after a create this can
    /// mean "not yet replicated there".
    #[error("key {key_id} not found on {route}")]
    KeyNotFound {
        /// The key.
        key_id: KeyId,
        /// Where the request went.
        route: String,
    },
    /// No HSM reachable by the route held the key within the retry budget,
    /// though it may still arrive (the budget comes from the live sync
    /// latency).
    #[error("key {key_id} not yet replicated to the HSMs asked (waited {waited:?})")]
    NotYetReplicated {
        /// The key.
        key_id: KeyId,
        /// How long the retries waited.
        waited: std::time::Duration,
    },
    /// The cluster's log has no key with this id: it never existed (a
    /// typo, another cluster's id). Retrying will not help.
    #[error("no key {key_id} in this cluster")]
    NoSuchKey {
        /// The key.
        key_id: KeyId,
    },
    /// The key was deleted; ids are never reused, so it will not come back.
    #[error("key {key_id} was deleted from this cluster")]
    KeyDeleted {
        /// The key.
        key_id: KeyId,
    },
    /// The request is wrong; retrying will not help.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A create asked for a key id that is taken in the cluster: another
    /// key holds it (made first on another HSM, or already on the HSM
    /// asked), or a key with that id was deleted, and ids are never
    /// reused. Nothing was created. Apart from [`Error::BadRequest`]: the
    /// request was well formed, and the same create under a new id works.
    #[error("key id {key_id} is taken: {detail}")]
    KeyIdTaken {
        /// The id asked for.
        key_id: KeyId,
        /// What the HSM said.
        detail: String,
    },
    /// The key was created but did not reach the requested durability in time.
    #[error("key {key_id} is held by {} HSM(s) ({}), below the requested durability {wanted}", holders.len(), holders.iter().map(|h| h.as_str()).collect::<Vec<_>>().join(", "))]
    BelowDurability {
        /// The key.
        key_id: KeyId,
        /// What was asked for.
        wanted: Durability,
        /// HSMs known to hold it when the wait ended.
        holders: Vec<HsmId>,
    },
    /// The orchestrator did not answer.
    #[error("orchestrator unavailable: {0}")]
    OrchestratorUnavailable(String),
    /// The HSM refused the operation for another reason.
    #[error("{0}")]
    Operation(OpError),
    /// A reply could not be understood.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// An operator action (enroll, remove, token) could not be logged.
    #[error("operator action not logged: {0}")]
    Admin(String),
}

impl Error {
    /// Its kind, as traces name it (`error.type`): `hsm_unavailable`,
    /// `key_not_found`, ... and, for an HSM's refusal, the refusal's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Connect { .. } => "connect",
            Error::HsmUnavailable { .. } => "hsm_unavailable",
            Error::KeyNotFound { .. } => "key_not_found",
            Error::NotYetReplicated { .. } => "not_yet_replicated",
            Error::NoSuchKey { .. } => "no_such_key",
            Error::KeyDeleted { .. } => "key_deleted",
            Error::BadRequest(_) => "bad_request",
            Error::KeyIdTaken { .. } => "key_id_taken",
            Error::BelowDurability { .. } => "below_durability",
            Error::OrchestratorUnavailable(_) => "orchestrator_unavailable",
            Error::Operation(e) => e.kind.as_str(),
            Error::Protocol(_) => "protocol",
            Error::Admin(_) => "admin",
        }
    }

    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::HsmUnavailable { .. }
            | Error::KeyNotFound { .. }
            | Error::NotYetReplicated { .. }
            | Error::OrchestratorUnavailable(_)
            | Error::BelowDurability { .. } => true,
            Error::Operation(e) => e.kind == OpErrorKind::Unavailable,
            _ => false,
        }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
