//! Who may send what, and the checks every receiver runs.
//!
//! An agent may sign only events about itself; commands, the
//! orchestrator's own events and operators' enrollments are signed by the
//! cluster key. A receiver accepts a message only if, in this order: it is
//! signed; the signer is the one allowed to send it; the signer is enrolled
//! (an HSM's key as the log says at that point, or the cluster key); the
//! signature verifies over subject, id and bytes; and it is inside the
//! replay window.

use keysync_schemas::{decode, Command, Envelope, Event, Heartbeat, HsmId, Source};

use crate::freshness::{self, Monotonic};
use crate::identity::Identity;
use crate::signature::{self, Claim, Rejection, Signer};

/// A refused message: the counted reason, detail for people, and the
/// signer it claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Stable counter name.
    pub reason: &'static str,
    /// For people (never payload bytes).
    pub detail: String,
    /// The claimed signer, if it claimed one.
    pub signer: Option<String>,
}

impl Refusal {
    fn of(r: Rejection, signer: Option<&Signer>) -> Self {
        Refusal {
            reason: r.reason(),
            detail: r.to_string(),
            signer: signer.map(Signer::header_value),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// Who may sign `event`.
pub fn event_signer(event: &Event) -> Signer {
    match event {
        Event::KeyCreated(e) => Signer::Hsm(e.hsm.clone()),
        Event::CloneApplied(e) => Signer::Hsm(e.hsm.clone()),
        Event::CloneFailed(e) => Signer::Hsm(e.hsm.clone()),
        Event::HsmJoined(e) => Signer::Hsm(e.hsm.clone()),
        Event::KeyDeleted(e) => Signer::Hsm(e.hsm.clone()),
        Event::KeyErased(e) => Signer::Hsm(e.hsm.clone()),
        Event::JoinRequested(e) => Signer::Hsm(e.hsm.clone()),
        Event::KeyReplicated(_)
        | Event::HsmFailed(_)
        | Event::HsmRecovered(_)
        | Event::HsmEnrolled(_)
        | Event::HsmRevoked(_)
        | Event::JoinTokenIssued(_) => Signer::Cluster,
    }
}

/// Signs a message and returns its headers (with `Nats-Msg-Id`).
pub fn signed_headers(
    identity: &Identity,
    signer: &Signer,
    subject: &str,
    msg_id: &str,
    payload: &[u8],
) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    signature::sign(identity, signer, subject, msg_id, payload, &mut h);
    h
}

fn source_matches(signer: &Signer, source: &Source) -> bool {
    match (signer, source) {
        (Signer::Hsm(h), Source::Hsm(s)) => h == s,
        (Signer::Hsm(_), _) => false,
        (Signer::Cluster, _) => true,
    }
}

/// Checks an event read from the events stream (stored at `stored_at_ns`).
/// `enrolled` gives an HSM's identity key as the log says at this point.
pub fn check_event(
    headers: Option<&async_nats::HeaderMap>,
    subject: &str,
    payload: &[u8],
    stored_at_ns: u64,
    cluster_key: &[u8; 32],
    enrolled: impl Fn(&HsmId) -> Option<[u8; 32]>,
) -> Result<Envelope<Event>, Refusal> {
    let claim = Claim::read(headers).map_err(|r| Refusal::of(r, None))?;
    let refuse = |r: Rejection| Refusal::of(r, Some(&claim.signer));
    let env = decode::<Event>(payload).map_err(|e| Refusal {
        reason: e.reason(),
        detail: e.to_string(),
        signer: Some(claim.signer.header_value()),
    })?;
    let expected = event_signer(&env.body);
    if claim.signer != expected || !source_matches(&expected, &env.source) {
        return Err(refuse(Rejection::SignerMismatch {
            signer: claim.signer.header_value(),
            claimed: expected.header_value(),
        }));
    }
    let key = match (&expected, &env.body) {
        (Signer::Cluster, _) => *cluster_key,
        // A join request is signed by the key it asks to enroll
        // (possession); the token proof is checked with it.
        (Signer::Hsm(h), Event::JoinRequested(j)) => {
            if !crate::join::verify_proof(&j.token_key, h, &j.public_key, &j.proof) {
                return Err(Refusal {
                    reason: "bad_join_proof",
                    detail: "the join token's proof does not verify".into(),
                    signer: Some(claim.signer.header_value()),
                });
            }
            j.public_key
        }
        (Signer::Hsm(h), _) => {
            enrolled(h).ok_or_else(|| refuse(Rejection::Unenrolled(claim.signer.header_value())))?
        }
    };
    claim.verify(&key, subject, payload).map_err(refuse)?;
    freshness::check(env.emitted_at.as_nanos(), stored_at_ns).map_err(refuse)?;
    Ok(env)
}

/// Checks a command from an agent's queue (stored at `stored_at_ns`).
pub fn check_command(
    headers: Option<&async_nats::HeaderMap>,
    subject: &str,
    payload: &[u8],
    stored_at_ns: u64,
    cluster_key: &[u8; 32],
) -> Result<Envelope<Command>, Refusal> {
    let claim = Claim::read(headers).map_err(|r| Refusal::of(r, None))?;
    let refuse = |r: Rejection| Refusal::of(r, Some(&claim.signer));
    if claim.signer != Signer::Cluster {
        return Err(refuse(Rejection::SignerMismatch {
            signer: claim.signer.header_value(),
            claimed: Signer::Cluster.header_value(),
        }));
    }
    // Verified before decoding: nothing but the cluster sends commands.
    claim
        .verify(cluster_key, subject, payload)
        .map_err(refuse)?;
    let env = decode::<Command>(payload).map_err(|e| Refusal {
        reason: e.reason(),
        detail: e.to_string(),
        signer: Some(claim.signer.header_value()),
    })?;
    freshness::check(env.emitted_at.as_nanos(), stored_at_ns).map_err(refuse)?;
    Ok(env)
}

/// Checks a heartbeat (core NATS: fresh against `now_ns`, and newer than
/// the sender's last one).
pub fn check_heartbeat(
    headers: Option<&async_nats::HeaderMap>,
    subject: &str,
    payload: &[u8],
    now_ns: u64,
    enrolled: impl Fn(&HsmId) -> Option<[u8; 32]>,
    seen: &mut Monotonic,
) -> Result<Envelope<Heartbeat>, Refusal> {
    let claim = Claim::read(headers).map_err(|r| Refusal::of(r, None))?;
    let refuse = |r: Rejection| Refusal::of(r, Some(&claim.signer));
    let Signer::Hsm(hsm) = &claim.signer else {
        return Err(refuse(Rejection::SignerMismatch {
            signer: claim.signer.header_value(),
            claimed: "an HSM".into(),
        }));
    };
    let key =
        enrolled(hsm).ok_or_else(|| refuse(Rejection::Unenrolled(claim.signer.header_value())))?;
    claim.verify(&key, subject, payload).map_err(refuse)?;
    let env = decode::<Heartbeat>(payload).map_err(|e| Refusal {
        reason: e.reason(),
        detail: e.to_string(),
        signer: Some(claim.signer.header_value()),
    })?;
    if &env.body.hsm != hsm || !source_matches(&claim.signer, &env.source) {
        return Err(refuse(Rejection::SignerMismatch {
            signer: claim.signer.header_value(),
            claimed: format!("hsm/{}", env.body.hsm),
        }));
    }
    seen.check(hsm.as_str(), env.emitted_at.as_nanos(), now_ns)
        .map_err(refuse)?;
    Ok(env)
}
