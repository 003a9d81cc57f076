//! Operators' enrollment actions: events signed with the cluster identity.
//!
//! Enrollment is part of the event log, so the orchestrator's fold knows,
//! at every point of the log, which identity keys were enrolled then; a
//! replay after a removal still accepts what the HSM signed before it.

use std::time::Duration;

use async_nats::jetstream;
use keysync_schemas::{
    encode, EnrolledVia, Envelope, Event, HsmEnrolled, HsmId, HsmRevoked, JoinTokenIssued, Source,
    Subjects, Timestamp,
};
use keysync_security::{join::JoinToken, Identity, Signer};

use crate::error::{Error, Result};

/// Publishes an event signed with the cluster identity and waits for
/// JetStream's acknowledgement. Returns its stream sequence.
pub async fn publish_cluster_event(
    nats: &async_nats::Client,
    identity: &Identity,
    subject: String,
    event: Event,
) -> Result<u64> {
    let env = Envelope::new(Source::Client("operator".into()), event);
    let bytes = encode(&env).map_err(|e| Error::BadRequest(e.to_string()))?;
    let headers = keysync_security::signed_headers(
        identity,
        &Signer::Cluster,
        &subject,
        &env.id.to_string(),
        &bytes,
    );
    let js = jetstream::new(nats.clone());
    let ack = js
        .publish_with_headers(subject, headers, bytes.into())
        .await
        .map_err(|e| Error::Admin(e.to_string()))?;
    let ack = tokio::time::timeout(Duration::from_secs(10), ack)
        .await
        .map_err(|_| Error::Admin("no acknowledgement within 10 s".into()))?
        .map_err(|e| Error::Admin(e.to_string()))?;
    Ok(ack.sequence)
}

/// Enrolls `hsm` with identity key `public_key`.
pub async fn enroll(
    nats: &async_nats::Client,
    subjects: &Subjects,
    identity: &Identity,
    hsm: &HsmId,
    public_key: [u8; 32],
) -> Result<u64> {
    publish_cluster_event(
        nats,
        identity,
        subjects.hsm_enrolled(hsm),
        Event::HsmEnrolled(HsmEnrolled {
            hsm: hsm.clone(),
            public_key,
            via: EnrolledVia::Operator,
        }),
    )
    .await
}

/// Removes `hsm`: revokes its key, withdraws its queued commands.
pub async fn revoke(
    nats: &async_nats::Client,
    subjects: &Subjects,
    identity: &Identity,
    hsm: &HsmId,
) -> Result<u64> {
    publish_cluster_event(
        nats,
        identity,
        subjects.hsm_revoked(hsm),
        Event::HsmRevoked(HsmRevoked { hsm: hsm.clone() }),
    )
    .await
}

/// Issues a one-time join token for `hsm`, valid for `ttl`.
pub async fn issue_token(
    nats: &async_nats::Client,
    subjects: &Subjects,
    identity: &Identity,
    hsm: &HsmId,
    ttl: Duration,
) -> Result<JoinToken> {
    let token = JoinToken::issue(hsm.clone()).map_err(|e| Error::Admin(e.to_string()))?;
    publish_cluster_event(
        nats,
        identity,
        subjects.join_token(hsm),
        Event::JoinTokenIssued(JoinTokenIssued {
            hsm: hsm.clone(),
            token_key: token.public_key(),
            expires_at_ns: Timestamp::now().as_nanos() + ttl.as_nanos() as u64,
        }),
    )
    .await?;
    Ok(token)
}
