//! Answering `keysync cluster status` and publishing sync metrics: read-only
//! views of the fold, on core NATS (nothing here is stored or acted on).

use keysync_schemas::{
    decode, encode, Envelope, Rejection, Source, StatusReply, StatusRequest, Subjects,
};

use crate::metrics::SyncStats;
use crate::state::ClusterState;

/// Answers a status request with the fold's view of the cluster. Any
/// orchestrator answers, standby included: its fold is as current.
///
/// Only an inbox is answered ([`keysync_security::reply::check`]): the
/// reply is published with the orchestrator's permissions, which cover the
/// audit stream and the lease bucket, so a request naming `keysync.audit`
/// or `$KV.<lease bucket>.active` as its reply subject would have the
/// orchestrator write there. Such a request is returned as a rejection
/// (`foreign_reply_subject`) for the caller to count, and not answered. A
/// request without a reply subject or that does not decode is only logged,
/// as before.
pub async fn answer(
    nats: &async_nats::Client,
    state: &ClusterState,
    cluster_key: [u8; 32],
    source: Source,
    req: &async_nats::Message,
) -> Result<(), Rejection> {
    let Some(reply) = req.reply.clone() else {
        return Ok(());
    };
    keysync_security::reply::check(&reply)?;
    if let Err(e) = decode::<StatusRequest>(&req.payload) {
        tracing::warn!(reason = %e.reason(), "rejected status request");
        return Ok(());
    }
    let mut status = state.status();
    status.cluster_key = Some(cluster_key);
    let env = Envelope::new(source, StatusReply::Cluster(status));
    match encode(&env) {
        Ok(bytes) => {
            if let Err(e) = nats.publish(reply, bytes.into()).await {
                tracing::warn!(error = %e, "could not answer a status request");
            }
        }
        Err(e) => tracing::error!(error = %e, "could not encode status"),
    }
    Ok(())
}

/// Publishes the metrics of the window that just ended, as JSON on core
/// NATS (the Prometheus series are live: see [`crate::prometheus`]).
pub async fn publish_metrics(
    nats: &async_nats::Client,
    subjects: &Subjects,
    stats: &mut SyncStats,
    state: &ClusterState,
    name: &str,
) {
    let at_unix_ms = keysync_schemas::Timestamp::now().as_nanos() / 1_000_000;
    let doc = stats.roll(state, name, at_unix_ms);
    match serde_json::to_vec(&doc) {
        Ok(json) => {
            if let Err(e) = nats.publish(subjects.metrics_sync(), json.into()).await {
                tracing::warn!(error = %e, "could not publish metrics");
            }
        }
        Err(e) => tracing::error!(error = %e, "could not encode metrics"),
    }
}
