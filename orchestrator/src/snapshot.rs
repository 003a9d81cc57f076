//! Snapshots of the folded state, so a start is "load the snapshot, replay
//! the tail of the log" rather than a replay from the first event.
//!
//! A snapshot is the state at some sequence S, bincode-encoded, in a
//! JetStream object store (chunked, so any size fits). It is private to the
//! orchestrator and versioned: a snapshot of another version, or one that
//! cannot be read, is ignored and the log is replayed from the start, which
//! gives the same state, only slower. Since the state is a pure fold,
//! snapshot + tail = full replay.
//!
//! A snapshot is signed with the cluster identity, so one that was edited in
//! the object store (or written by anyone else) is refused and the log,
//! whose every event is signed, is replayed instead. A start from a snapshot
//! verifies one signature, not one per event folded into it.

use async_nats::jetstream::{self, object_store};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::state::ClusterState;

/// Bumped whenever [`ClusterState`]'s layout changes.
/// 5: the key table is a sequence of (id, state) entries (decision 19).
pub const SNAPSHOT_VERSION: u16 = 5;

const OBJECT: &str = "cluster-state";

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u16,
    state: ClusterState,
}

/// The object's metadata entry holding the cluster key's signature (hex)
/// over the stored bytes (kept beside them, so the snapshot is never copied
/// to be signed or checked).
const SIGNATURE: &str = "keysync-signature";

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Opens (or creates) the snapshot store.
pub async fn open(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> anyhow::Result<object_store::ObjectStore> {
    match js.get_object_store(bucket).await {
        Ok(s) => Ok(s),
        Err(_) => Ok(js
            .create_object_store(object_store::Config {
                bucket: bucket.to_string(),
                description: Some("keysync orchestrator snapshots".into()),
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await?),
    }
}

/// The latest snapshot, if there is a readable one of this version signed
/// with `cluster_key`.
pub async fn load(
    store: &object_store::ObjectStore,
    cluster_key: [u8; 32],
) -> Option<ClusterState> {
    let mut object = store.get(OBJECT).await.ok()?;
    let signature = object
        .info
        .metadata
        .get(SIGNATURE)
        .and_then(|h| hex::decode(h).ok())
        .unwrap_or_default();
    let mut bytes = Vec::new();
    if let Err(e) = object.read_to_end(&mut bytes).await {
        tracing::warn!(error = %e, "snapshot unreadable; replaying the whole log");
        return None;
    }
    let decoded = tokio::task::spawn_blocking(move || {
        if !keysync_security::identity::verify(&cluster_key, &bytes, &signature) {
            return Err("its signature does not verify with the cluster key".to_string());
        }
        bincode::serde::decode_from_slice::<Snapshot, _>(&bytes, config())
            .map(|(s, _)| s)
            .map_err(|e| e.to_string())
    })
    .await
    .ok()?;
    match decoded {
        Ok(s) if s.version == SNAPSHOT_VERSION => Some(s.state),
        Ok(s) => {
            tracing::info!(
                version = s.version,
                "snapshot of another version; replaying the whole log"
            );
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "snapshot refused; replaying the whole log");
            None
        }
    }
}

/// Stores `state` as the latest snapshot, signed with `identity`.
pub async fn save(
    store: &object_store::ObjectStore,
    state: ClusterState,
    identity: std::sync::Arc<keysync_security::Identity>,
) -> anyhow::Result<u64> {
    let seq = state.last_seq();
    let (bytes, signature) = tokio::task::spawn_blocking(move || {
        let bytes = bincode::serde::encode_to_vec(
            Snapshot {
                version: SNAPSHOT_VERSION,
                state,
            },
            config(),
        )?;
        let signature = identity.sign(&bytes);
        anyhow::Ok((bytes, signature))
    })
    .await??;
    let meta = object_store::ObjectMetadata {
        name: OBJECT.to_string(),
        metadata: [(SIGNATURE.to_string(), hex::encode(signature))].into(),
        ..Default::default()
    };
    store.put(meta, &mut bytes.as_slice()).await?;
    Ok(seq)
}
