//! Message signatures.
//!
//! A signature covers a domain separator, the subject, the JetStream
//! deduplication id (`Nats-Msg-Id`) and the exact payload bytes. Binding
//! the subject stops a signed message being replayed on another subject;
//! binding the id makes JetStream's own deduplication the first half of the
//! replay window (a replay must keep the id, so JetStream drops it within
//! its duplicate window; see [`crate::freshness`] for the second half).
//!
//! Headers: `Keysync-Signer` names the signer (`cluster`, or `hsm/<id>`),
//! `Keysync-Signature` holds the 64-byte Ed25519 signature in base64.

use base64::Engine as _;
use keysync_schemas::{headers, HsmId, RejectReason, Rejection};

use crate::identity::{self, Identity};

const DOMAIN: &[u8] = b"keysync-sig-v1\0";

/// Who signed a message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Signer {
    /// The cluster identity (orchestrators and operators' enrollments).
    Cluster,
    /// An HSM's agent.
    Hsm(HsmId),
}

impl Signer {
    /// The header form.
    pub fn header_value(&self) -> String {
        match self {
            Signer::Cluster => "cluster".to_string(),
            Signer::Hsm(h) => format!("hsm/{h}"),
        }
    }

    /// Parses the header form.
    pub fn parse(text: &str) -> Option<Signer> {
        if text == "cluster" {
            return Some(Signer::Cluster);
        }
        text.strip_prefix("hsm/")?.parse().ok().map(Signer::Hsm)
    }
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.header_value())
    }
}

/// The bytes a signature covers.
pub fn signed_bytes(subject: &str, msg_id: &str, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + subject.len() + msg_id.len() + payload.len() + 2);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(subject.as_bytes());
    m.push(0);
    m.extend_from_slice(msg_id.as_bytes());
    m.push(0);
    m.extend_from_slice(payload);
    m
}

/// Signs a message: sets `Nats-Msg-Id`, `Keysync-Signer` and
/// `Keysync-Signature` in `headers`.
pub fn sign(
    identity: &Identity,
    signer: &Signer,
    subject: &str,
    msg_id: &str,
    payload: &[u8],
    headers: &mut async_nats::HeaderMap,
) {
    let sig = identity.sign(&signed_bytes(subject, msg_id, payload));
    headers.insert(headers::MSG_ID, msg_id);
    headers.insert(headers::SIGNER, signer.header_value().as_str());
    headers.insert(
        headers::SIGNATURE,
        base64::engine::general_purpose::STANDARD
            .encode(sig)
            .as_str(),
    );
}

/// What a message's headers claim: who signed it, its id and the signature.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The claimed signer.
    pub signer: Signer,
    /// The deduplication id.
    pub msg_id: String,
    signature: [u8; 64],
}

impl Claim {
    /// Reads the claim from a message's headers.
    pub fn read(headers: Option<&async_nats::HeaderMap>) -> Result<Claim, Rejection> {
        let unsigned = || Rejection::new(RejectReason::Unsigned, "not signed");
        let malformed = || {
            Rejection::new(
                RejectReason::MalformedSignature,
                "malformed signature headers",
            )
        };
        let h = headers.ok_or_else(unsigned)?;
        let (Some(signer), Some(signature), Some(msg_id)) = (
            h.get(headers::SIGNER),
            h.get(headers::SIGNATURE),
            h.get(headers::MSG_ID),
        ) else {
            return Err(unsigned());
        };
        let signer = Signer::parse(signer.as_str()).ok_or_else(malformed)?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(signature.as_str())
            .map_err(|_| malformed())?;
        let signature: [u8; 64] = raw.as_slice().try_into().map_err(|_| malformed())?;
        Ok(Claim {
            signer,
            msg_id: msg_id.as_str().to_string(),
            signature,
        })
    }

    /// Checks the signature with the signer's public key.
    pub fn verify(&self, key: &[u8; 32], subject: &str, payload: &[u8]) -> Result<(), Rejection> {
        if identity::verify(
            key,
            &signed_bytes(subject, &self.msg_id, payload),
            &self.signature,
        ) {
            Ok(())
        } else {
            Err(Rejection::new(
                RejectReason::BadSignature,
                "signature does not verify",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(id: &Identity, subject: &str, payload: &[u8]) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        sign(id, &Signer::Cluster, subject, "m-1", payload, &mut h);
        h
    }

    #[test]
    fn a_signature_binds_subject_id_and_payload() {
        let id = Identity::generate().expect("rng");
        let h = signed(&id, "a.b", b"payload");
        let claim = Claim::read(Some(&h)).expect("claim");
        assert_eq!(claim.signer, Signer::Cluster);
        assert_eq!(claim.verify(&id.public_key(), "a.b", b"payload"), Ok(()));
        assert_eq!(
            claim
                .verify(&id.public_key(), "a.c", b"payload")
                .map_err(|r| r.reason),
            Err(RejectReason::BadSignature)
        );
        assert_eq!(
            claim
                .verify(&id.public_key(), "a.b", b"payloaD")
                .map_err(|r| r.reason),
            Err(RejectReason::BadSignature)
        );
        let other = Identity::generate().expect("rng");
        assert_eq!(
            claim
                .verify(&other.public_key(), "a.b", b"payload")
                .map_err(|r| r.reason),
            Err(RejectReason::BadSignature)
        );
        // Another id: the signature no longer verifies.
        let mut h2 = h.clone();
        h2.insert(headers::MSG_ID, "m-2");
        let claim2 = Claim::read(Some(&h2)).expect("claim");
        assert_eq!(
            claim2
                .verify(&id.public_key(), "a.b", b"payload")
                .map_err(|r| r.reason),
            Err(RejectReason::BadSignature)
        );
    }

    #[test]
    fn missing_or_malformed_headers_are_rejected() {
        assert_eq!(
            Claim::read(None).err().map(|r| r.reason),
            Some(RejectReason::Unsigned)
        );
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, "x");
        assert_eq!(
            Claim::read(Some(&h)).err().map(|r| r.reason),
            Some(RejectReason::Unsigned)
        );
        h.insert(headers::SIGNER, "hsm/ok");
        h.insert(headers::SIGNATURE, "not base64!");
        assert_eq!(
            Claim::read(Some(&h)).err().map(|r| r.reason),
            Some(RejectReason::MalformedSignature)
        );
        h.insert(headers::SIGNATURE, "AAAA");
        assert_eq!(
            Claim::read(Some(&h)).err().map(|r| r.reason),
            Some(RejectReason::MalformedSignature)
        );
        h.insert(headers::SIGNER, "someone");
        assert_eq!(
            Claim::read(Some(&h)).err().map(|r| r.reason),
            Some(RejectReason::MalformedSignature)
        );
    }

    #[test]
    fn signers_round_trip() {
        for s in [Signer::Cluster, Signer::Hsm("hsm-1".parse().expect("id"))] {
            assert_eq!(Signer::parse(&s.header_value()), Some(s));
        }
        assert_eq!(Signer::parse("hsm/a.b"), None);
        assert_eq!(Signer::parse("hsm/"), None);
    }
}
