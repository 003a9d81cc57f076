//! Learning the cluster key, and waiting to be an enrolled member.
//!
//! An agent is sent keys only once an operator has enrolled its identity
//! key (`keysync hsm enroll`, or a join token) and its `HsmJoined` has been
//! accepted. Until then it serves operations on the keys it holds, applies
//! nothing it is not sent, and sends no heartbeats (they would be rejected);
//! it asks the orchestrator's status every second and says what the
//! operator must do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Request;
use keysync_schemas::{
    decode, encode, ClusterStatus, Envelope, MemberState, Source, StatusReply, StatusRequest,
};

use crate::{Agent, Config};

async fn status(
    nats: &async_nats::Client,
    subject: String,
    source: Source,
) -> Option<ClusterStatus> {
    let payload = encode(&Envelope::new(source, StatusRequest::Cluster)).ok()?;
    let msg = nats
        .send_request(
            subject,
            Request::new()
                .payload(payload.into())
                .timeout(Some(Duration::from_secs(2))),
        )
        .await
        .ok()?;
    match decode::<StatusReply>(&msg.payload).ok()?.body {
        StatusReply::Cluster(s) => Some(s),
        StatusReply::Key(_) => None,
    }
}

/// Asks the orchestrator for the cluster key until it answers.
pub async fn cluster_key_from_status(
    config: &Config,
    nats: &async_nats::Client,
) -> anyhow::Result<[u8; 32]> {
    let mut warned = false;
    loop {
        if let Some(s) = status(
            nats,
            config.subjects.orchestrator_status(),
            Source::Hsm(config.hsm.clone()),
        )
        .await
        {
            if let Some(key) = s.cluster_key {
                return Ok(key);
            }
        }
        if !warned {
            tracing::info!(
                "waiting for an orchestrator to learn the cluster key (or pass --cluster-key)"
            );
            warned = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Returns once the orchestrator lists this HSM as an enrolled member with
/// this agent's identity key; announces it again while it is enrolled but
/// not a member (enrolled after it started).
pub async fn confirm(agent: Arc<Agent>) -> anyhow::Result<()> {
    let me = agent.identity.public_key();
    let mut last_hint: Option<Instant> = None;
    let mut last_announce = Instant::now();
    let mut wait = Duration::from_millis(50);
    loop {
        if let Some(s) = status(
            &agent.nats,
            agent.subjects.orchestrator_status(),
            Source::Hsm(agent.hsm.clone()),
        )
        .await
        {
            let enrolled = s.enrolled.iter().any(|(h, k)| *h == agent.hsm && *k == me);
            let member = s
                .members
                .iter()
                .any(|m| m.hsm_id == agent.hsm && m.state != MemberState::Removed);
            match (enrolled, member) {
                (true, true) => {
                    tracing::info!(hsm = %agent.hsm, "enrolled member of the cluster");
                    return Ok(());
                }
                (true, false) if last_announce.elapsed() > Duration::from_secs(2) => {
                    crate::announce(&agent).await?;
                    last_announce = Instant::now();
                }
                (false, _) if last_hint.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) => {
                    tracing::warn!(
                        hsm = %agent.hsm,
                        "not enrolled: it is sent no keys until an operator runs `keysync hsm enroll --id {} --pubkey {}` (or starts it with a join token)",
                        agent.hsm,
                        agent.identity.public_hex()
                    );
                    last_hint = Some(Instant::now());
                }
                _ => {}
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
    }
}
