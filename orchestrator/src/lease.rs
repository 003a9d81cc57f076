//! Active/standby orchestrators: a lease in a JetStream KV bucket.
//!
//! The bucket keeps one key, `active`, whose value names the holder; its
//! `max_age` is the lease time, so an entry not renewed disappears by
//! itself. Taking the lease is a `create` (fails while someone holds it);
//! renewing is an `update` at the revision we wrote (fails if anyone else
//! wrote since). A holder that cannot renew steps down at once. Nothing in
//! keysync is its own consensus: JetStream's is used.

use std::time::Duration;

use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use tokio::sync::{oneshot, Mutex};

const KEY: &str = "active";

/// The lease, as seen by one orchestrator.
pub struct Lease {
    store: kv::Store,
    holder: String,
    revision: Option<u64>,
    /// The lease time.
    pub ttl: Duration,
}

impl Lease {
    /// Opens (or creates) the lease bucket.
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        holder: &str,
        ttl: Duration,
        replicas: usize,
    ) -> anyhow::Result<Self> {
        let store = match js.get_key_value(bucket).await {
            Ok(s) => s,
            Err(_) => {
                js.create_key_value(kv::Config {
                    bucket: bucket.to_string(),
                    description: "keysync orchestrator lease".into(),
                    history: 1,
                    max_age: ttl,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await?
            }
        };
        Ok(Lease {
            store,
            holder: holder.to_string(),
            revision: None,
            ttl,
        })
    }

    /// Whether this orchestrator holds the lease.
    pub fn held(&self) -> bool {
        self.revision.is_some()
    }

    /// Tries to take the lease; true if taken.
    pub async fn try_acquire(&mut self) -> bool {
        match self.store.create(KEY, self.holder.clone().into()).await {
            Ok(rev) => {
                self.revision = Some(rev);
                true
            }
            Err(_) => false,
        }
    }

    /// Renews a held lease; an error means it was lost.
    pub async fn renew(&mut self) -> anyhow::Result<()> {
        let Some(rev) = self.revision else {
            anyhow::bail!("lease not held");
        };
        match self
            .store
            .update(KEY, self.holder.clone().into(), rev)
            .await
        {
            Ok(rev) => {
                self.revision = Some(rev);
                Ok(())
            }
            Err(e) => {
                self.revision = None;
                anyhow::bail!("lost the orchestrator lease: {e}")
            }
        }
    }

    /// Gives the lease up (on clean shutdown), so a standby takes over now.
    pub async fn release(&mut self) {
        if let Some(rev) = self.revision.take() {
            let _ = self.store.delete_expect_revision(KEY, Some(rev)).await;
        }
    }

    /// Who holds the lease now, if anyone.
    pub async fn holder(&self) -> Option<String> {
        self.store
            .get(KEY)
            .await
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }
}

/// A lease being renewed on its own task.
pub struct Keeper {
    /// The renewing task.
    pub task: tokio::task::JoinHandle<()>,
    /// Resolves with the error when the lease is lost.
    pub lost: oneshot::Receiver<anyhow::Error>,
}

/// Renews a held lease every third of its time until a renewal fails.
pub fn keep(lease: Arc<Mutex<Lease>>) -> Keeper {
    let (tx, lost) = oneshot::channel();
    let task = tokio::spawn(async move {
        let ttl = lease.lock().await.ttl;
        let mut tick = tokio::time::interval(ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let renewed = lease.lock().await.renew().await;
            if let Err(e) = renewed {
                let _ = tx.send(e);
                return;
            }
        }
    });
    Keeper { task, lost }
}
