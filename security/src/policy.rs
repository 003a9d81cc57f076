//! Who may send what, and the checks every receiver runs.
//!
//! An agent may sign only events about itself; commands, the
//! orchestrator's own events and operators' enrollments are signed by the
//! cluster key. A receiver accepts a message only if, in this order: it is
//! signed; the signer is the one allowed to send it; the signer is enrolled
//! (an HSM's key as the log says at that point, or the cluster key); the
//! signature verifies over subject, id and bytes; and it is inside the
//! replay window.

use keysync_schemas::{
    decode, Command, DeadLetter, Envelope, Event, Heartbeat, HsmId, RejectReason, Rejection, Source,
};

use crate::freshness::{self, Monotonic};
use crate::identity::Identity;
use crate::signature::{self, Claim, Signer};

/// Decodes a payload whose signer is `signer`, refusing what does not decode.
fn decoded<T: keysync_schemas::Message>(
    payload: &[u8],
    signer: &Signer,
) -> Result<Envelope<T>, Rejection> {
    decode::<T>(payload).map_err(|e| Rejection::from(e).claimed_by(signer.header_value()))
}

/// Signed by `signer`, who may not send a message that is from `from`.
fn signer_mismatch(signer: &Signer, from: impl std::fmt::Display) -> Rejection {
    Rejection::new(
        RejectReason::SignerMismatch,
        format!("signer {signer} may not send this (it is from {from})"),
    )
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
        Event::HsmCapabilities(e) => Signer::Hsm(e.hsm.clone()),
        Event::ClonesApplied(e) => Signer::Hsm(e.hsm.clone()),
        Event::KeyReplicated(_)
        | Event::HsmFailed(_)
        | Event::HsmRecovered(_)
        | Event::HsmEnrolled(_)
        | Event::HsmRevoked(_)
        | Event::JoinTokenIssued(_)
        | Event::Checkpoint(_) => Signer::Cluster,
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
) -> Result<Envelope<Event>, Rejection> {
    check_event_verified(
        headers,
        subject,
        payload,
        stored_at_ns,
        cluster_key,
        enrolled,
        Verified::No,
    )
}

/// How much of an event's signature check is done already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Nothing: check it.
    No,
    /// Its signature verified with this key (see [`preverify`]): if that
    /// is the key it must be signed with, it is not checked again.
    With([u8; 32]),
    /// A checkpoint the cluster signed vouches for its exact stored bytes
    /// (the orchestrator's `checkpoint` module): the signature was checked
    /// when it was first folded. Every other check still runs.
    Vouched,
}

/// [`check_event`], with as much of the signature check done as
/// `verified` says.
pub fn check_event_verified(
    headers: Option<&async_nats::HeaderMap>,
    subject: &str,
    payload: &[u8],
    stored_at_ns: u64,
    cluster_key: &[u8; 32],
    enrolled: impl Fn(&HsmId) -> Option<[u8; 32]>,
    verified: Verified,
) -> Result<Envelope<Event>, Rejection> {
    let claim = Claim::read(headers)?;
    let refuse = |r: Rejection| r.claimed_by(claim.signer.header_value());
    let env = decoded::<Event>(payload, &claim.signer)?;
    let expected = event_signer(&env.body);
    if claim.signer != expected || !source_matches(&expected, &env.source) {
        return Err(refuse(signer_mismatch(
            &claim.signer,
            expected.header_value(),
        )));
    }
    // A batch's shape is part of decoding it: every reader (fold, audit,
    // lifecycle, SDK) refuses the same ones, before checking a signature.
    if let Event::ClonesApplied(b) = &env.body {
        b.check().map_err(refuse)?;
    }
    let key = match (&expected, &env.body) {
        (Signer::Cluster, _) => *cluster_key,
        // A join request is signed by the key it asks to enroll
        // (possession); the token proof is checked with it.
        (Signer::Hsm(h), Event::JoinRequested(j)) => {
            if !crate::join::verify_proof(&j.token_key, h, &j.public_key, &j.proof) {
                return Err(refuse(Rejection::new(
                    RejectReason::BadJoinProof,
                    "the join token's proof does not verify",
                )));
            }
            j.public_key
        }
        (Signer::Hsm(h), _) => enrolled(h).ok_or_else(|| {
            refuse(Rejection::new(
                RejectReason::Unenrolled,
                format!("signer {} is not enrolled", claim.signer),
            ))
        })?,
    };
    let done = match verified {
        Verified::No => false,
        Verified::With(k) => k == key,
        Verified::Vouched => true,
    };
    if !done {
        claim.verify(&key, subject, payload).map_err(refuse)?;
    }
    freshness::check(env.emitted_at.as_nanos(), stored_at_ns).map_err(refuse)?;
    Ok(env)
}

/// One message to [`preverify`]: its subject, headers and payload, and the
/// key its claimed signer has (as far as the caller knows now).
pub struct Pending {
    /// Subject.
    pub subject: String,
    /// Headers.
    pub headers: Option<async_nats::HeaderMap>,
    /// Payload.
    pub payload: bytes::Bytes,
    /// The key to check the signature with.
    pub key: [u8; 32],
}

/// Checks many signatures on `threads` threads (a replay's batch), so the
/// fold that follows checks each one only if the key it needs is not the
/// one verified here. Returns, per message, the key its signature verified
/// with.
pub fn preverify(batch: &[Pending], threads: usize) -> Vec<Option<[u8; 32]>> {
    let check = |p: &Pending| {
        let claim = Claim::read(p.headers.as_ref()).ok()?;
        claim
            .verify(&p.key, &p.subject, &p.payload)
            .ok()
            .map(|()| p.key)
    };
    let threads = threads.max(1);
    if threads == 1 || batch.len() < 2 * threads {
        return batch.iter().map(check).collect();
    }
    let per = batch.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = batch
            .chunks(per)
            .map(|part| scope.spawn(move || part.iter().map(check).collect::<Vec<_>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// Checks a command from an agent's queue (stored at `stored_at_ns`).
pub fn check_command(
    headers: Option<&async_nats::HeaderMap>,
    subject: &str,
    payload: &[u8],
    stored_at_ns: u64,
    cluster_key: &[u8; 32],
) -> Result<Envelope<Command>, Rejection> {
    let claim = Claim::read(headers)?;
    let refuse = |r: Rejection| r.claimed_by(claim.signer.header_value());
    if claim.signer != Signer::Cluster {
        return Err(refuse(signer_mismatch(
            &claim.signer,
            Signer::Cluster.header_value(),
        )));
    }
    // Verified before decoding: nothing but the cluster sends commands.
    claim
        .verify(cluster_key, subject, payload)
        .map_err(refuse)?;
    let env = decoded::<Command>(payload, &claim.signer)?;
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
) -> Result<Envelope<Heartbeat>, Rejection> {
    let claim = Claim::read(headers)?;
    let refuse = |r: Rejection| r.claimed_by(claim.signer.header_value());
    let Signer::Hsm(hsm) = &claim.signer else {
        return Err(refuse(signer_mismatch(&claim.signer, "an HSM")));
    };
    let key = enrolled(hsm).ok_or_else(|| {
        refuse(Rejection::new(
            RejectReason::Unenrolled,
            format!("signer {} is not enrolled", claim.signer),
        ))
    })?;
    claim.verify(&key, subject, payload).map_err(refuse)?;
    let env = decoded::<Heartbeat>(payload, &claim.signer)?;
    if &env.body.hsm != hsm || !source_matches(&claim.signer, &env.source) {
        return Err(refuse(signer_mismatch(
            &claim.signer,
            format!("hsm/{}", env.body.hsm),
        )));
    }
    seen.check(hsm.as_str(), env.emitted_at.as_nanos(), now_ns)
        .map_err(refuse)?;
    Ok(env)
}

/// Checks a dead letter read from the dead-letter stream: signed by the
/// process that filed it, an enrolled HSM (as `enrolled` says now) or an
/// orchestrator (the cluster key), and naming that filer. Letters are a
/// record for people, not input: no replay window applies, and a letter
/// that fails is shown as unverified, not acted on.
pub fn check_dead_letter(
    headers: Option<&async_nats::HeaderMap>,
    subject: &str,
    payload: &[u8],
    cluster_key: &[u8; 32],
    enrolled: impl Fn(&HsmId) -> Option<[u8; 32]>,
) -> Result<(Signer, Envelope<DeadLetter>), Rejection> {
    let claim = Claim::read(headers)?;
    let refuse = |r: Rejection| r.claimed_by(claim.signer.header_value());
    let key = match &claim.signer {
        Signer::Cluster => *cluster_key,
        Signer::Hsm(hsm) => enrolled(hsm).ok_or_else(|| {
            refuse(Rejection::new(
                RejectReason::Unenrolled,
                format!("signer {} is not enrolled", claim.signer),
            ))
        })?,
    };
    claim.verify(&key, subject, payload).map_err(refuse)?;
    let env = decoded::<DeadLetter>(payload, &claim.signer)?;
    let filer_matches = match (&claim.signer, &env.source) {
        (Signer::Hsm(h), Source::Hsm(s)) => h == s,
        (Signer::Cluster, Source::Orchestrator(_)) => true,
        _ => false,
    };
    if !filer_matches || env.body.rejected_by != env.source.to_string() {
        return Err(refuse(signer_mismatch(
            &claim.signer,
            &env.body.rejected_by,
        )));
    }
    Ok((claim.signer.clone(), env))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keysync_schemas::{encode, DeleteKey, HsmJoined, KeyId};
    use proptest::prelude::*;

    const NOW: u64 = 1_800_000_000_000_000_000;

    fn hsm(s: &str) -> HsmId {
        s.parse().expect("id")
    }

    fn letter(from: Source) -> Vec<u8> {
        encode(&Envelope::new(
            from.clone(),
            DeadLetter {
                rejected_by: from.to_string(),
                subject: "keysync.op".into(),
                reason: RejectReason::BadMagic,
                detail: "d".into(),
                claimed_signer: None,
                stream_seq: None,
                payload_len: 1,
                payload_sha256: [0; 32],
                payload: None,
            },
        ))
        .expect("encode")
    }

    #[test]
    fn a_dead_letter_verifies_only_as_filed_by_the_process_it_names() {
        let cluster = Identity::from_seed(&[1; 32]);
        let agent = Identity::from_seed(&[2; 32]);
        let other = Identity::from_seed(&[3; 32]);
        let enrolled = |h: &HsmId| (h.as_str() == "hsm-1").then(|| agent.public_key());
        let subject = "keysync.dlq.agent";
        let check = |h: &async_nats::HeaderMap, bytes: &[u8]| {
            check_dead_letter(Some(h), subject, bytes, &cluster.public_key(), enrolled)
                .map(|(signer, _)| signer)
        };
        let sign = |id: &Identity, signer: Signer, bytes: &[u8]| {
            signed_headers(id, &signer, subject, "m", bytes)
        };
        let hsm1 = Signer::Hsm(hsm("hsm-1"));

        let filed = letter(Source::Hsm(hsm("hsm-1")));
        assert_eq!(
            check(&sign(&agent, hsm1.clone(), &filed), &filed),
            Ok(hsm1.clone())
        );
        let by_orchestrator = letter(Source::Orchestrator("o".into()));
        assert_eq!(
            check(
                &sign(&cluster, Signer::Cluster, &by_orchestrator),
                &by_orchestrator
            ),
            Ok(Signer::Cluster)
        );

        let reason = |r: Result<Signer, Rejection>| r.expect_err("refused").reason;
        // Unsigned, as anyone on the subject can publish it.
        assert_eq!(
            reason(check(&async_nats::HeaderMap::new(), &filed)),
            RejectReason::Unsigned
        );
        // An agent's letter claiming to be the orchestrator's.
        assert_eq!(
            reason(check(
                &sign(&agent, hsm1.clone(), &by_orchestrator),
                &by_orchestrator
            )),
            RejectReason::SignerMismatch
        );
        // Another key claiming to be hsm-1; an HSM not enrolled.
        assert_eq!(
            reason(check(&sign(&other, hsm1.clone(), &filed), &filed)),
            RejectReason::BadSignature
        );
        let hsm2 = letter(Source::Hsm(hsm("hsm-2")));
        assert_eq!(
            reason(check(
                &sign(&other, Signer::Hsm(hsm("hsm-2")), &hsm2),
                &hsm2
            )),
            RejectReason::Unenrolled
        );
    }

    fn signed_event(agent: &Identity) -> (String, async_nats::HeaderMap, Vec<u8>) {
        let mut env = Envelope::new(
            Source::Hsm(hsm("hsm-1")),
            Event::HsmJoined(HsmJoined {
                hsm: hsm("hsm-1"),
                agent_version: "t".into(),
                token_keys: 3,
            }),
        );
        env.emitted_at = keysync_schemas::Timestamp(NOW);
        let bytes = encode(&env).expect("encode");
        let subject = "keysync.evt.hsm.hsm-1.joined".to_string();
        let h = signed_headers(
            agent,
            &Signer::Hsm(hsm("hsm-1")),
            &subject,
            &env.id.to_string(),
            &bytes,
        );
        (subject, h, bytes)
    }

    #[test]
    fn a_signed_event_from_its_enrolled_hsm_is_accepted_and_nothing_else() {
        let agent = Identity::generate().expect("rng");
        let cluster = Identity::generate().expect("rng");
        let (subject, h, bytes) = signed_event(&agent);
        let enrolled = |k: [u8; 32]| move |h: &HsmId| (h.as_str() == "hsm-1").then_some(k);
        let ok = check_event(
            Some(&h),
            &subject,
            &bytes,
            NOW,
            &cluster.public_key(),
            enrolled(agent.public_key()),
        );
        assert!(ok.is_ok(), "{ok:?}");
        // Unenrolled, or enrolled with another key.
        let r = check_event(
            Some(&h),
            &subject,
            &bytes,
            NOW,
            &cluster.public_key(),
            |_| None,
        );
        assert_eq!(
            r.map(drop).err().map(|e| e.reason),
            Some(RejectReason::Unenrolled)
        );
        let other = Identity::generate().expect("rng").public_key();
        let r = check_event(
            Some(&h),
            &subject,
            &bytes,
            NOW,
            &cluster.public_key(),
            enrolled(other),
        );
        assert_eq!(
            r.map(drop).err().map(|e| e.reason),
            Some(RejectReason::BadSignature)
        );
        // Unsigned.
        let r = check_event(
            None,
            &subject,
            &bytes,
            NOW,
            &cluster.public_key(),
            enrolled(agent.public_key()),
        );
        assert_eq!(
            r.map(drop).err().map(|e| e.reason),
            Some(RejectReason::Unsigned)
        );
        // Replayed after the window.
        let late = NOW + crate::freshness::DUPLICATE_WINDOW.as_nanos() as u64;
        let r = check_event(
            Some(&h),
            &subject,
            &bytes,
            late,
            &cluster.public_key(),
            enrolled(agent.public_key()),
        );
        assert_eq!(
            r.map(drop).err().map(|e| e.reason),
            Some(RejectReason::Stale)
        );
        // Signed as the cluster: an HSM's event may not be.
        let hc = signed_headers(&cluster, &Signer::Cluster, &subject, "x", &bytes);
        let r = check_event(
            Some(&hc),
            &subject,
            &bytes,
            NOW,
            &cluster.public_key(),
            enrolled(agent.public_key()),
        );
        assert_eq!(
            r.map(drop).err().map(|e| e.reason),
            Some(RejectReason::SignerMismatch)
        );
    }

    #[test]
    fn commands_must_be_signed_by_the_cluster() {
        let cluster = Identity::generate().expect("rng");
        let mut env = Envelope::new(
            Source::Orchestrator("o".into()),
            Command::DeleteKey(DeleteKey {
                target: hsm("hsm-2"),
                key_id: KeyId::new(),
            }),
        );
        env.emitted_at = keysync_schemas::Timestamp(NOW);
        let bytes = encode(&env).expect("encode");
        let subject = "keysync.cmd.hsm-2";
        let h = signed_headers(&cluster, &Signer::Cluster, subject, "d-1", &bytes);
        assert!(check_command(Some(&h), subject, &bytes, NOW, &cluster.public_key()).is_ok());
        let forger = Identity::generate().expect("rng");
        let hf = signed_headers(&forger, &Signer::Cluster, subject, "d-1", &bytes);
        assert_eq!(
            check_command(Some(&hf), subject, &bytes, NOW, &cluster.public_key())
                .map(drop)
                .err()
                .map(|e| e.reason),
            Some(RejectReason::BadSignature)
        );
        let ha = signed_headers(&forger, &Signer::Hsm(hsm("hsm-1")), subject, "d-1", &bytes);
        assert_eq!(
            check_command(Some(&ha), subject, &bytes, NOW, &cluster.public_key())
                .map(drop)
                .err()
                .map(|e| e.reason),
            Some(RejectReason::SignerMismatch)
        );
    }

    proptest! {
        // Many cases: this is the decoders' and checks' fuzz target, run
        // in CI for a bounded time.
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn arbitrary_input_never_panics_and_is_never_accepted(
            payload in proptest::collection::vec(any::<u8>(), 0..512),
            signer in "[a-z/0-9-]{0,20}",
            sig in "[A-Za-z0-9+/=]{0,100}",
            id in "[a-z0-9-]{0,40}",
        ) {
            let cluster = Identity::from_seed(&[7; 32]);
            let mut h = async_nats::HeaderMap::new();
            h.insert(keysync_schemas::headers::SIGNER, signer.as_str());
            h.insert(keysync_schemas::headers::SIGNATURE, sig.as_str());
            h.insert(keysync_schemas::headers::MSG_ID, id.as_str());
            let k = cluster.public_key();
            prop_assert!(check_event(Some(&h), "keysync.evt.key.x.created", &payload, NOW, &k, |_| Some(k)).is_err());
            prop_assert!(check_command(Some(&h), "keysync.cmd.hsm-1", &payload, NOW, &k).is_err());
            let mut seen = Monotonic::default();
            prop_assert!(check_heartbeat(Some(&h), "keysync.hsm.hsm-1.heartbeat", &payload, NOW, |_| Some(k), &mut seen).is_err());
        }

        #[test]
        fn any_change_to_a_signed_event_is_rejected(
            at in any::<proptest::sample::Index>(),
            flip in 1u8..=255,
            in_subject in any::<bool>(),
        ) {
            let agent = Identity::from_seed(&[3; 32]);
            let cluster = Identity::from_seed(&[4; 32]);
            let (mut subject, h, mut bytes) = signed_event(&agent);
            if in_subject {
                let mut b = subject.into_bytes();
                let i = at.index(b.len());
                b[i] ^= flip;
                subject = String::from_utf8_lossy(&b).into_owned();
            } else {
                let i = at.index(bytes.len());
                bytes[i] ^= flip;
            }
            let key = agent.public_key();
            let r = check_event(Some(&h), &subject, &bytes, NOW, &cluster.public_key(), |_| Some(key));
            prop_assert!(r.is_err());
        }
    }
}
