//! NATS header names keysync uses.
//!
//! Headers carry what is *about* a payload rather than in it: the JetStream
//! deduplication id, and (reserved now so adding them breaks nothing) a
//! signature over the exact payload bytes with its signer, and W3C trace
//! context.

/// JetStream deduplication id (set to the envelope id).
pub const MSG_ID: &str = "Nats-Msg-Id";
/// Reserved: the signer's identity (an HSM id or `orchestrator`).
pub const SIGNER: &str = "Keysync-Signer";
/// Reserved: Ed25519 signature over the exact payload bytes, base64.
pub const SIGNATURE: &str = "Keysync-Signature";
/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// W3C trace state (omitted when empty).
pub const TRACESTATE: &str = "tracestate";
/// JetStream optimistic concurrency: the publish is stored only if the last
/// message under [`EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT`] (or the
/// message's own subject) has this sequence; `0` means "none at all".
pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
/// The subject filter (wildcards allowed) the expected last subject
/// sequence applies to, in place of the message's subject (nats-server
/// 2.11 and later; older servers ignore it and check the subject itself).
pub const EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: &str =
    "Nats-Expected-Last-Subject-Sequence-Subject";
