//! Replica-aware routing: which HSMs are known to hold which keys.
//!
//! The client watches the key events on the bus (`created`, `applied`,
//! `replicated`) and remembers, per key, the HSMs that hold it. A
//! replica-aware operation goes only to one of them, so a call right after a
//! create never lands on an HSM that lacks the key (the CloudHSM failure).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use futures::StreamExt;
use keysync_schemas::subjects::KeySubject;
use keysync_schemas::{decode, Event, HsmId, KeyId, Subjects};

/// Keys remembered at most; past it, arbitrary entries are forgotten (a
/// forgotten key falls back to the any-HSM route with retries).
pub const MAX_TRACKED_KEYS: usize = 1_000_000;

/// Holders per key.
#[derive(Debug, Default)]
pub struct ReplicaMap {
    keys: Mutex<HashMap<KeyId, Vec<HsmId>>>,
    next: AtomicUsize,
}

impl ReplicaMap {
    /// Records that `hsm` holds `key`.
    pub fn learn(&self, key: KeyId, hsm: HsmId) {
        let Ok(mut keys) = self.keys.lock() else {
            return;
        };
        if keys.len() >= MAX_TRACKED_KEYS && !keys.contains_key(&key) {
            if let Some(victim) = keys.keys().next().copied() {
                keys.remove(&victim);
            }
        }
        let holders = keys.entry(key).or_default();
        if !holders.contains(&hsm) {
            holders.push(hsm);
        }
    }

    /// HSMs known to hold `key`, rotated so successive calls spread load.
    pub fn holders(&self, key: &KeyId) -> Vec<HsmId> {
        let mut holders = self
            .keys
            .lock()
            .ok()
            .and_then(|k| k.get(key).cloned())
            .unwrap_or_default();
        if !holders.is_empty() {
            let n = self.next.fetch_add(1, Ordering::Relaxed) % holders.len();
            holders.rotate_left(n);
        }
        holders
    }

    /// Folds one key event (subject and payload) into the map.
    pub fn observe(&self, subjects: &Subjects, subject: &str, payload: &[u8]) {
        match subjects.parse_event(subject) {
            Some(KeySubject::Applied(key, hsm)) => self.learn(key, hsm),
            Some(KeySubject::HsmApplied(hsm)) => {
                if let Ok(Event::ClonesApplied(b)) = decode::<Event>(payload).map(|e| e.body) {
                    if b.hsm == hsm {
                        for a in b.applied {
                            self.learn(a.key_id, hsm.clone());
                        }
                    }
                }
            }
            Some(KeySubject::Created(key)) | Some(KeySubject::Replicated(key)) => {
                match decode::<Event>(payload).map(|e| e.body) {
                    Ok(Event::KeyCreated(c)) if c.key_id == key => self.learn(key, c.hsm),
                    Ok(Event::KeyReplicated(r)) if r.key_id == key => {
                        for h in r.holders {
                            self.learn(key, h);
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

/// Watches key events until the subscription ends.
pub async fn watch(
    nats: async_nats::Client,
    subjects: Subjects,
    map: std::sync::Arc<ReplicaMap>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    // Key events, and the agents' batches of applied clones (decision 21).
    let (keys, batches) = match (
        nats.subscribe(subjects.key_events_all()).await,
        nats.subscribe(subjects.all_clones_applied()).await,
    ) {
        (Ok(k), Ok(b)) => (k, b),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot watch key events; replica-aware routing falls back to any HSM");
            return;
        }
    };
    let mut sub = futures::stream::select(keys, batches);
    let _ = nats.flush().await;
    let _ = ready.send(());
    while let Some(msg) = sub.next().await {
        map.observe(&subjects, &msg.subject, &msg.payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_and_rotates_holders() {
        let m = ReplicaMap::default();
        let k = KeyId::new();
        let (a, b) = (HsmId::new("a").expect("id"), HsmId::new("b").expect("id"));
        assert!(m.holders(&k).is_empty());
        let s = Subjects::default();
        m.observe(&s, &s.clone_applied(&k, &a), b"");
        m.learn(k, b.clone());
        m.learn(k, a.clone());
        let first = m.holders(&k);
        let second = m.holders(&k);
        assert_eq!(first.len(), 2);
        assert_ne!(
            first[0], second[0],
            "successive calls start at another holder"
        );
        // Garbage under a created subject teaches nothing.
        let k2 = KeyId::new();
        m.observe(&s, &s.key_created(&k2), b"junk");
        assert!(m.holders(&k2).is_empty());
    }
}
