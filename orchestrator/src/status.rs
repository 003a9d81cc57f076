//! Answering `keysync cluster status` and publishing sync metrics: read-only
//! views of the fold, on core NATS (nothing here is stored or acted on).

use keysync_schemas::{
    decode, encode, Envelope, KeyId, KeyStanding, KeyStatus, Rejection, Source, StatusReply,
    StatusRequest, Subjects,
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
    let asked = match decode::<StatusRequest>(&req.payload) {
        Ok(env) => env.body,
        Err(e) => {
            tracing::warn!(reason = %e.reason(), "rejected status request");
            return Ok(());
        }
    };
    let body = match asked {
        StatusRequest::Cluster => {
            let mut status = state.status();
            status.cluster_key = Some(cluster_key);
            StatusReply::Cluster(status)
        }
        StatusRequest::Key(key_id) => StatusReply::Key(key_status(state, key_id)),
    };
    let env = Envelope::new(source, body);
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

/// One key's standing in the fold: unknown, live (with its holders) or
/// deleted (with the members yet to erase it).
pub fn key_status(state: &ClusterState, key_id: KeyId) -> KeyStatus {
    let last_seq = state.last_seq();
    match state.key(&key_id) {
        None => KeyStatus {
            key_id,
            standing: KeyStanding::Unknown,
            key_type: None,
            holders: Vec::new(),
            last_seq,
        },
        Some(k) => KeyStatus {
            key_id,
            standing: if k.deleted {
                KeyStanding::Deleted
            } else {
                KeyStanding::Live
            },
            key_type: Some(k.key_type),
            holders: k
                .holders
                .iter()
                .filter_map(|i| state.member_at(i).map(|m| m.hsm.clone()))
                .collect(),
            last_seq,
        },
    }
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

#[cfg(test)]
mod tests {
    //! Given a log, a key's standing is what the fold says.
    use super::*;
    use crate::testkit::*;

    #[test]
    fn a_key_is_unknown_live_with_its_holders_or_deleted() {
        let (k, other) = (KeyId::new(), KeyId::new());
        let mut log = Log::given(&[joined("a"), joined("b"), created(k, "a", 1)]);
        let s = key_status(&log.state, other);
        assert_eq!(
            (s.standing, s.key_type, s.holders.len()),
            (KeyStanding::Unknown, None, 0)
        );
        assert_eq!(s.last_seq, 3);
        let s = key_status(&log.state, k);
        assert_eq!(s.standing, KeyStanding::Live);
        assert_eq!(s.holders, vec![hsm("a")]);
        log.when(&applied(k, "b", 1)).expect("applied");
        assert_eq!(key_status(&log.state, k).holders, vec![hsm("a"), hsm("b")]);
        log.when(&deleted(k, "a", 1)).expect("deleted");
        let s = key_status(&log.state, k);
        assert_eq!(s.standing, KeyStanding::Deleted);
        assert_eq!(s.key_id, k);
    }
}
