//! Snapshots of the folded state, so a start is "load the snapshot, replay
//! the tail of the log" rather than a replay from the first event.
//!
//! A snapshot is the state at some sequence S, bincode-encoded, in a
//! JetStream object store (chunked, so any size fits). It is private to the
//! orchestrator and versioned: a snapshot of another version, or one that
//! cannot be read, is ignored and the log is replayed from the start, which
//! gives the same state, only slower. Since the state is a pure fold,
//! snapshot + tail = full replay.

use async_nats::jetstream::{self, object_store};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::state::ClusterState;

/// Bumped whenever [`ClusterState`]'s layout changes.
pub const SNAPSHOT_VERSION: u16 = 1;

const OBJECT: &str = "cluster-state";

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u16,
    state: ClusterState,
}

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

/// The latest snapshot, if there is a readable one of this version.
pub async fn load(store: &object_store::ObjectStore) -> Option<ClusterState> {
    let mut object = store.get(OBJECT).await.ok()?;
    let mut bytes = Vec::new();
    if let Err(e) = object.read_to_end(&mut bytes).await {
        tracing::warn!(error = %e, "snapshot unreadable; replaying the whole log");
        return None;
    }
    let decoded = tokio::task::spawn_blocking(move || {
        bincode::serde::decode_from_slice::<Snapshot, _>(&bytes, config()).map(|(s, _)| s)
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
            tracing::warn!(error = %e, "snapshot undecodable; replaying the whole log");
            None
        }
    }
}

/// Stores `state` as the latest snapshot.
pub async fn save(store: &object_store::ObjectStore, state: ClusterState) -> anyhow::Result<u64> {
    let seq = state.last_seq();
    let bytes = tokio::task::spawn_blocking(move || {
        bincode::serde::encode_to_vec(
            Snapshot {
                version: SNAPSHOT_VERSION,
                state,
            },
            config(),
        )
    })
    .await??;
    store.put(OBJECT, &mut bytes.as_slice()).await?;
    Ok(seq)
}
