//! The one place bytes become keysync values, and back.
//!
//! Layout of every payload:
//!
//! ```text
//! "KS" | version: u16 big-endian | family: u8 | bincode 2 (standard config) of Envelope<T>
//! ```
//!
//! bincode carries no layout of its own, so the version comes first and is
//! checked before anything is decoded; a family byte keeps an event from
//! being read as a command. The whole payload is bounded by
//! [`MAX_MESSAGE_BYTES`], and bincode's own limit bounds every allocation,
//! so hostile bytes cannot make a reader allocate more than that. Decoding
//! returns an error for anything else, and never panics.
//!
//! Versions: this build writes [`SCHEMA_VERSION`] (2) and reads
//! [`OLDEST_SCHEMA_VERSION`] (1) too. A version-1 body is decoded into the
//! family's [`Message::V1`] type (kept in [`crate::v1`]) and upcast; the
//! families whose layout did not change decode it as they are.

use serde::{de::DeserializeOwned, Serialize};

use crate::commands::Command;
use crate::envelope::{Envelope, OLDEST_SCHEMA_VERSION, SCHEMA_VERSION};
use crate::events::Event;
use crate::ops::{OpReply, OpRequest};
use crate::status::{StatusReply, StatusRequest};

/// Largest payload keysync writes or reads, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024;

/// Largest event message the events stream stores (payload and headers),
/// in bytes. Events are small: an RSA-2048 `KeyCreated` with a full label
/// is under 2 KiB, a `KeyReplicated` naming 64 members of 64-character
/// ids under 5 KiB. Only clone batch commands come near
/// [`MAX_MESSAGE_BYTES`], and they go to the command stream. Bounding the
/// events stream here bounds what anyone who may publish on an event
/// subject can store per message.
pub const MAX_EVENT_BYTES: usize = 16 * 1024;

const MAGIC: [u8; 2] = *b"KS";
const HEADER_LEN: usize = 5;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_MESSAGE_BYTES>,
>;

fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>()
}

/// A message family: which enum a payload holds. Each has its own family
/// byte so that a payload of one family is never decoded as another.
pub trait Message: Serialize + DeserializeOwned {
    /// The family byte.
    const FAMILY: u8;
    /// A name for errors.
    const NAME: &'static str;
    /// The family's schema-version-1 type, upcast on decoding (`Self` when
    /// the layout did not change).
    type V1: DeserializeOwned + Into<Self>;
}

impl Message for Event {
    const FAMILY: u8 = 1;
    const NAME: &'static str = "event";
    type V1 = crate::v1::Event;
}
impl Message for Command {
    const FAMILY: u8 = 2;
    const NAME: &'static str = "command";
    type V1 = crate::v1::Command;
}
impl Message for OpRequest {
    const FAMILY: u8 = 3;
    const NAME: &'static str = "operation request";
    type V1 = crate::v1::OpRequest;
}
impl Message for OpReply {
    const FAMILY: u8 = 4;
    const NAME: &'static str = "operation reply";
    type V1 = crate::v1::OpReply;
}
impl Message for StatusRequest {
    const FAMILY: u8 = 5;
    const NAME: &'static str = "status request";
    type V1 = Self;
}
impl Message for StatusReply {
    const FAMILY: u8 = 6;
    const NAME: &'static str = "status reply";
    type V1 = Self;
}
impl Message for crate::heartbeat::Heartbeat {
    const FAMILY: u8 = 7;
    const NAME: &'static str = "heartbeat";
    type V1 = Self;
}
impl Message for crate::audit::AuditRecord {
    const FAMILY: u8 = 8;
    const NAME: &'static str = "audit record";
    type V1 = Self;
}

impl Message for crate::dead_letter::DeadLetter {
    const FAMILY: u8 = 9;
    const NAME: &'static str = "dead letter";
    type V1 = Self;
}

/// Why a payload was rejected. [`DecodeError::reason`] is the stable,
/// countable name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than [`MAX_MESSAGE_BYTES`].
    #[error("message of {len} bytes is over the {max}-byte limit")]
    Oversized {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Shorter than the fixed header.
    #[error("message of {0} bytes is shorter than the 5-byte header")]
    Truncated(usize),
    /// Does not start with `KS`.
    #[error("not a keysync message (bad magic)")]
    BadMagic,
    /// A schema version this build cannot read.
    #[error("unknown schema version {found} (this build reads {OLDEST_SCHEMA_VERSION}..={SCHEMA_VERSION})")]
    UnknownVersion {
        /// The version found.
        found: u16,
    },
    /// A payload of another family (say, an event where a command belongs).
    #[error("expected a {expected}, found family {found}")]
    WrongFamily {
        /// What was expected.
        expected: &'static str,
        /// The family byte found.
        found: u8,
    },
    /// The body does not decode.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// The decoder's message (never payload bytes).
        detail: String,
    },
    /// Bytes left over after the body.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
}

impl DecodeError {
    /// A stable name for counters and dead letters.
    pub fn reason(&self) -> crate::RejectReason {
        use crate::RejectReason as R;
        match self {
            DecodeError::Oversized { .. } => R::Oversized,
            DecodeError::Truncated(_) => R::Truncated,
            DecodeError::BadMagic => R::BadMagic,
            DecodeError::UnknownVersion { .. } => R::UnknownVersion,
            DecodeError::WrongFamily { .. } => R::WrongFamily,
            DecodeError::Malformed { .. } => R::Malformed,
            DecodeError::TrailingBytes(_) => R::TrailingBytes,
        }
    }
}

/// Encodes a message at the current schema version.
///
/// Fails only if the value cannot be represented (a bug, or a body larger
/// than [`MAX_MESSAGE_BYTES`]).
pub fn encode<T: Message>(msg: &Envelope<T>) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&SCHEMA_VERSION.to_be_bytes());
    out.push(T::FAMILY);
    bincode::serde::encode_into_std_write(msg, &mut out, config())
        .map_err(|e| EncodeError(e.to_string()))?;
    if out.len() > MAX_MESSAGE_BYTES {
        return Err(EncodeError(format!(
            "{} of {} bytes is over the {MAX_MESSAGE_BYTES}-byte limit",
            T::NAME,
            out.len()
        )));
    }
    Ok(out)
}

fn body_of<B: DeserializeOwned>(
    body: &[u8],
    what: &'static str,
) -> Result<(B, usize), DecodeError> {
    bincode::serde::decode_from_slice(body, config()).map_err(|e| DecodeError::Malformed {
        what,
        detail: e.to_string(),
    })
}

/// A value that cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode message: {0}")]
pub struct EncodeError(pub String);

/// Decodes a message of family `T`, checking size, magic, version and
/// family first. Never panics.
pub fn decode<T: Message>(bytes: &[u8]) -> Result<Envelope<T>, DecodeError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::Oversized {
            len: bytes.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated(bytes.len()));
    }
    if bytes[..2] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = u16::from_be_bytes([bytes[2], bytes[3]]);
    let family = bytes[4];
    if !(OLDEST_SCHEMA_VERSION..=SCHEMA_VERSION).contains(&version) {
        return Err(DecodeError::UnknownVersion { found: version });
    }
    if family != T::FAMILY {
        return Err(DecodeError::WrongFamily {
            expected: T::NAME,
            found: family,
        });
    }
    let body = &bytes[HEADER_LEN..];
    let (msg, used) = if version == SCHEMA_VERSION {
        body_of::<Envelope<T>>(body, T::NAME)?
    } else {
        // Version 1: the kept v1 types, upcast (app_id: None).
        let (old, used) = body_of::<Envelope<T::V1>>(body, T::NAME)?;
        (old.map(Into::into), used)
    };
    if used != body.len() {
        return Err(DecodeError::TrailingBytes(body.len() - used));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Source;
    use crate::events::{HsmJoined, KeyCreated, KeyOrigin};
    use crate::keys::{DomainId, Durability, Fingerprint, HsmId, KeyAttributes, KeyId, KeyType};
    use proptest::prelude::*;

    fn hsm(s: &str) -> HsmId {
        HsmId::new(s).expect("valid id")
    }

    fn created(wrapped: Vec<u8>, label: Option<String>) -> Envelope<Event> {
        Envelope::new(
            Source::Hsm(hsm("hsm-1")),
            Event::KeyCreated(KeyCreated {
                key_id: KeyId::new(),
                key_type: KeyType::P256,
                fingerprint: Fingerprint([7; 32]),
                hsm: hsm("hsm-1"),
                origin: KeyOrigin::Generated,
                attributes: KeyAttributes {
                    label,
                    app_id: Some(vec![1, 2]),
                },
                durability: Durability::Replicas(2),
                domain: DomainId([1; 8]),
                wrapped,
                public_key: Some(vec![0x30, 0x59]),
            }),
        )
    }

    #[test]
    fn the_largest_events_fit_the_event_limit_with_room_for_headers() {
        use crate::events::KeyReplicated;
        let id64 = "h".repeat(64);
        let mut big = created(vec![0xA5; 1300], Some("l".repeat(crate::MAX_LABEL_BYTES)));
        if let Event::KeyCreated(c) = &mut big.body {
            c.key_type = KeyType::Rsa2048;
            c.public_key = Some(vec![0x30; 300]);
            c.hsm = hsm(&id64);
        }
        big.source = Source::Hsm(hsm(&id64));
        let replicated = Envelope::new(
            Source::Orchestrator(id64.clone()),
            Event::KeyReplicated(KeyReplicated {
                key_id: KeyId::new(),
                fingerprint: Fingerprint([7; 32]),
                holders: (0..64)
                    .map(|i| hsm(&format!("{}{i:02}", &id64[..62])))
                    .collect(),
                sync_latency_micros: u64::MAX,
                created_seq: u64::MAX,
            }),
        );
        // Headers: signer, signature (88), a message id, a traceparent.
        const HEADERS: usize = 1024;
        for e in [big, replicated] {
            let n = encode(&e).expect("encodes").len();
            assert!(n + HEADERS <= MAX_EVENT_BYTES / 2, "{} bytes", n);
        }
    }

    #[test]
    fn the_largest_batch_of_applied_clones_and_its_audit_record_fit_the_event_limit() {
        use crate::events::{AppliedKey, ClonesApplied, MAX_APPLIED_PER_EVENT};
        let id64 = "h".repeat(64);
        let batch = ClonesApplied {
            hsm: hsm(&id64),
            applied: (0..MAX_APPLIED_PER_EVENT)
                .map(|_| AppliedKey {
                    key_id: KeyId::new(),
                    fingerprint: Fingerprint([0xff; 32]),
                    already_present: true,
                })
                .collect(),
        };
        assert!(batch.check().is_ok());
        let record = crate::AuditRecord {
            chain_seq: u64::MAX,
            prev_hash: [0xff; 32],
            event_seq: u64::MAX,
            event_time_ns: u64::MAX,
            fact: crate::AuditFact::of(&Event::ClonesApplied(batch.clone())),
        };
        let env = Envelope::new(Source::Hsm(hsm(&id64)), Event::ClonesApplied(batch));
        const HEADERS: usize = 1024;
        let n = encode(&env).expect("encodes").len();
        assert!(n + HEADERS <= MAX_EVENT_BYTES / 2, "{n} bytes");
        let r = bincode::serde::encode_to_vec(&record, config()).expect("encodes");
        assert!(
            r.len() + HEADERS <= MAX_EVENT_BYTES / 2,
            "{} bytes",
            r.len()
        );
    }

    #[test]
    fn round_trips() {
        let msg = created(vec![1, 2, 3], Some("payments".into()));
        let bytes = encode(&msg).expect("encodes");
        assert_eq!(&bytes[..5], b"KS\x00\x02\x01");
        assert_eq!(decode::<Event>(&bytes).expect("decodes"), msg);
    }

    #[test]
    fn rejects_each_kind_of_bad_payload() {
        let good = encode(&created(vec![9; 40], None)).expect("encodes");
        assert_eq!(
            decode::<Event>(&good[..3]).expect_err("rejected").reason(),
            crate::RejectReason::Truncated
        );
        assert_eq!(
            decode::<Event>(b"XX\x00\x01\x01")
                .expect_err("rejected")
                .reason(),
            crate::RejectReason::BadMagic
        );
        for unknown in [0, 3] {
            let mut other = good.clone();
            other[3] = unknown;
            assert_eq!(
                decode::<Event>(&other).expect_err("rejected"),
                DecodeError::UnknownVersion {
                    found: unknown.into()
                }
            );
        }
        assert_eq!(
            decode::<Command>(&good).expect_err("rejected").reason(),
            crate::RejectReason::WrongFamily
        );
        assert_eq!(
            decode::<Event>(&good[..good.len() - 4])
                .expect_err("rejected")
                .reason(),
            crate::RejectReason::Malformed
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            decode::<Event>(&trailing).expect_err("rejected").reason(),
            crate::RejectReason::TrailingBytes
        );
        let huge = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert_eq!(
            decode::<Event>(&huge).expect_err("rejected").reason(),
            crate::RejectReason::Oversized
        );
    }

    #[test]
    fn a_huge_length_prefix_does_not_allocate() {
        // A valid header followed by a varint claiming a 2^60-byte vector.
        let mut bytes = b"KS\x00\x01\x01".to_vec();
        bytes.extend_from_slice(&[0xff; 16]);
        assert!(decode::<Event>(&bytes).is_err());
    }

    #[test]
    fn refuses_to_encode_oversized() {
        let msg = created(vec![0; MAX_MESSAGE_BYTES], None);
        assert!(encode(&msg).is_err());
    }

    #[test]
    fn hsm_ids_are_validated_when_decoded() {
        // An HSM id with a dot would break subject routing: it must not decode.
        let msg = Envelope::new(
            Source::Client("t".into()),
            Event::HsmJoined(HsmJoined {
                hsm: hsm("abc"),
                agent_version: "1".into(),
                token_keys: 0,
            }),
        );
        let mut bytes = encode(&msg).expect("encodes");
        let pos = bytes
            .windows(3)
            .position(|w| w == b"abc")
            .expect("id in payload");
        bytes[pos + 1] = b'.';
        assert_eq!(
            decode::<Event>(&bytes).expect_err("rejected").reason(),
            crate::RejectReason::Malformed
        );
    }

    proptest! {
        // The decoders' fuzz target, run in CI for a bounded time.
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode::<Event>(&bytes);
            let _ = decode::<Command>(&bytes);
            let _ = decode::<OpRequest>(&bytes);
            let _ = decode::<OpReply>(&bytes);
            let _ = decode::<StatusRequest>(&bytes);
            let _ = decode::<StatusReply>(&bytes);
        }

        #[test]
        fn valid_header_with_arbitrary_body_never_panics(
            version in 1u8..=2,
            family in 1u8..=6,
            body in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let mut bytes = vec![b'K', b'S', 0, version, family];
            bytes.extend_from_slice(&body);
            let _ = decode::<Event>(&bytes);
            let _ = decode::<Command>(&bytes);
            let _ = decode::<OpRequest>(&bytes);
            let _ = decode::<OpReply>(&bytes);
        }

        #[test]
        fn mutated_valid_messages_never_panic(
            wrapped in proptest::collection::vec(any::<u8>(), 0..200),
            label in proptest::option::of("[a-z]{0,20}"),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let msg = created(wrapped, label);
            let mut bytes = encode(&msg).expect("encodes");
            prop_assert_eq!(decode::<Event>(&bytes).expect("decodes"), msg);
            for (pos, val) in flips {
                let i = pos % bytes.len();
                bytes[i] = val;
            }
            let _ = decode::<Event>(&bytes);
        }
    }
}
