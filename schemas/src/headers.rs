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

/// When each process on a sync's path handled the message, as JSON
/// ([`HopTimes`]): the orchestrator puts its receipt of the event a command
/// (or `KeyReplicated`) answers on what it publishes; an agent copies that
/// onto the `CloneApplied` it publishes for a command, with the command's
/// decision, stored and received times. `keysync bench` reads them back
/// from the events stream for its per-hop table (decision 18).
///
/// A header, not a payload field, so it adds nothing to the signed bytes
/// and breaks no wire version (decision 1): a reader that does not know it
/// ignores it. It is not signed; it is a measurement, and nothing decides
/// on it.
pub const HOP_TIMES: &str = "Keysync-Hop-Times";

/// The times carried in [`HOP_TIMES`], each in nanoseconds since the Unix
/// epoch by the clock named (all processes of one machine read the same
/// clock; across machines these are only as good as their clock sync).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct HopTimes {
    /// The orchestrator took the event this answers off its consumer
    /// (orchestrator's clock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orchestrator_received: Option<u64>,
    /// The orchestrator built the command (its envelope's `emitted_at`,
    /// orchestrator's clock), copied by the agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orchestrator_decided: Option<u64>,
    /// JetStream stored the command (the server's clock), copied by the agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_stored: Option<u64>,
    /// The agent took the command off its consumer (agent's clock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_received: Option<u64>,
}

impl HopTimes {
    /// The header value.
    pub fn to_header(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a header value; `None` if it is not one (never an error: a
    /// measurement that cannot be read is just not counted).
    pub fn from_header(value: &str) -> Option<Self> {
        if value.len() > 512 {
            return None;
        }
        serde_json::from_str(value).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::HopTimes;

    #[test]
    fn hop_times_round_trip_and_bad_values_are_none() {
        let t = HopTimes {
            orchestrator_received: Some(1),
            orchestrator_decided: Some(2),
            command_stored: Some(3),
            agent_received: None,
        };
        assert_eq!(HopTimes::from_header(&t.to_header()), Some(t));
        assert_eq!(
            HopTimes::from_header(r#"{"orchestrator_received":5}"#),
            Some(HopTimes {
                orchestrator_received: Some(5),
                ..Default::default()
            })
        );
        assert_eq!(HopTimes::from_header("not json"), None);
        assert_eq!(HopTimes::from_header(&"x".repeat(600)), None);
    }
}
