//! Dead letters: every message a keysync process rejects, with its reason.
//!
//! A rejected message is acknowledged (so it is not redelivered forever)
//! and a copy goes to the dead-letter stream for operators
//! (`keysync dlq list`). The copy keeps the payload only where it cannot
//! hold plaintext key material: events, commands and heartbeats carry
//! material wrapped under the domain key at most; a rejected key-operation
//! request (which may be an import carrying plaintext) keeps only its length
//! and SHA-256.

use serde::{Deserialize, Serialize};

/// One rejected message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The process that rejected it (`orchestrator`, `hsm-agent hsm-1`).
    pub rejected_by: String,
    /// The subject it came on.
    pub subject: String,
    /// The counted reason.
    pub reason: crate::RejectReason,
    /// More detail for people (never payload bytes).
    pub detail: String,
    /// The signer it claimed, if any.
    pub claimed_signer: Option<String>,
    /// Stream sequence, when it came from a stream.
    pub stream_seq: Option<u64>,
    /// Its size in bytes.
    pub payload_len: u64,
    /// SHA-256 of the payload.
    pub payload_sha256: [u8; 32],
    /// The payload itself, where it cannot hold plaintext key material.
    pub payload: Option<Vec<u8>>,
}
