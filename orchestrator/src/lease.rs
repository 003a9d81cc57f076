//! Active/standby orchestrators: a lease in a JetStream KV bucket.
//!
//! The bucket keeps one key, `active`, whose value is a [`Record`]: the
//! holder's name, its term (random, per process run), a renewal counter,
//! signed with the cluster identity that every orchestrator shares. The
//! bucket's `max_age` is the lease time, so a value not renewed disappears
//! by itself. Nothing in keysync is its own consensus: every write is
//! revision-checked by JetStream.
//!
//! The key is a NATS subject (`$KV.<bucket>.active`), so more than the
//! orchestrators can write it: anyone on an open bus, or any responder
//! tricked into answering a request there. Such a value is *foreign* (not a
//! record signed by the cluster key), and it must neither hold the lease
//! nor take it away:
//!
//! - **The holder** renews with an `update` at the revision it wrote. If
//!   someone wrote since, it reads the value: a record of another
//!   orchestrator means the lease is lost (it steps down at once, as
//!   before); anything else (a foreign value, a replay of its own record,
//!   a deletion) is overwritten at once, revision-checked, and reported.
//!   It steps down if it could not write for 2/3 of the lease time.
//! - **A standby** watches the key and notes when it last saw the holder
//!   alive: a *new* signed record (another term, or a higher renewal of a
//!   term). It takes the lease when the key is empty (`create`), or, when
//!   the key holds anything (a foreign value, or a record replayed), only
//!   after a whole lease time without a sign of life, by an `update` at
//!   the revision it read ([`acquire_step`]). A foreign value written once
//!   a second therefore delays no takeover of a dead holder by more than a
//!   lease time, and never dislodges a live one.
//!
//! What is still possible, by someone allowed to write the bucket directly
//! (the orchestrators' NATS user, or anyone on a bus without permissions):
//! a flood of writes faster than the holder can answer makes it step down,
//! and deleting the bucket stops every orchestrator. Permissions are the
//! remedy (`deploy/nats/secure.conf`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use async_nats::jetstream::{self};
use futures::StreamExt;
use keysync_schemas::RejectReason;
use keysync_security::Identity;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Mutex};

use crate::audit::Report;

const KEY: &str = "active";

/// Domain separation of a lease record's signature.
const CONTEXT: &[u8] = b"keysync-lease-v1\0";

/// One lease value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The holder's name (`orchestrator --name`).
    pub holder: String,
    /// The holder's term: random, one per process run (hex).
    pub term: String,
    /// How many times the holder wrote in this term.
    pub renewal: u64,
    /// Ed25519 by the cluster key over bucket, holder, term and renewal (hex).
    sig: String,
}

fn signed_bytes(bucket: &str, holder: &str, term: &str, renewal: u64) -> Vec<u8> {
    let mut m = CONTEXT.to_vec();
    for part in [bucket, holder, term] {
        m.extend_from_slice(part.as_bytes());
        m.push(0);
    }
    m.extend_from_slice(&renewal.to_be_bytes());
    m
}

impl Record {
    /// A record signed by `identity`.
    pub fn new(identity: &Identity, bucket: &str, holder: &str, term: &str, renewal: u64) -> Self {
        let sig = identity.sign(&signed_bytes(bucket, holder, term, renewal));
        Record {
            holder: holder.to_string(),
            term: term.to_string(),
            renewal,
            sig: hex::encode(sig),
        }
    }

    /// The record a value holds, if it is one signed by `cluster_key` for
    /// `bucket`; `None` for anything else (a foreign value).
    pub fn parse(value: &[u8], bucket: &str, cluster_key: &[u8; 32]) -> Option<Self> {
        let r: Record = serde_json::from_slice(value).ok()?;
        let sig = hex::decode(&r.sig).ok()?;
        keysync_security::identity::verify(
            cluster_key,
            &signed_bytes(bucket, &r.holder, &r.term, r.renewal),
            &sig,
        )
        .then_some(r)
    }

    fn bytes(&self) -> bytes::Bytes {
        serde_json::to_vec(self).unwrap_or_default().into()
    }
}

/// The key as read: empty (never written, deleted, expired) or holding a
/// value at a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Current {
    /// Nothing there.
    Absent,
    /// A value (a record or not) at this revision.
    Present {
        /// Its revision.
        revision: u64,
    },
}

/// What a standby does on its lease tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    /// The key is empty: create it.
    Create,
    /// Someone showed life within the lease time: wait.
    Wait,
    /// The key holds a value, but nobody showed life for a whole lease
    /// time: overwrite it at the revision read.
    TakeOver {
        /// The revision read.
        revision: u64,
    },
}

/// The standby's rule: create an empty key; overwrite anything else only
/// after `ttl` without a sign of life from a holder.
pub fn acquire_step(current: Current, silent_for: Duration, ttl: Duration) -> Acquire {
    match current {
        Current::Absent => Acquire::Create,
        Current::Present { .. } if silent_for < ttl => Acquire::Wait,
        Current::Present { revision } => Acquire::TakeOver { revision },
    }
}

/// What the holder does when its renewal finds the key rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// Another orchestrator holds it.
    Lost {
        /// Who.
        to: String,
    },
    /// A value that is nobody's lease: overwrite it at its revision.
    Overwrite {
        /// The revision read.
        revision: u64,
    },
    /// The key was emptied: create it again.
    Recreate,
}

/// The holder's rule, given the key as read (`None`: empty) and the
/// record in it (if it is one): only another orchestrator's record takes
/// the lease away.
pub fn on_conflict(
    current: Current,
    record: Option<&Record>,
    holder: &str,
    term: &str,
) -> Conflict {
    match (current, record) {
        (Current::Absent, _) => Conflict::Recreate,
        (Current::Present { .. }, Some(r)) if r.holder != holder || r.term != term => {
            Conflict::Lost {
                to: r.holder.clone(),
            }
        }
        (Current::Present { revision }, _) => Conflict::Overwrite { revision },
    }
}

/// When a holder last showed life, as the watcher saw it.
#[derive(Debug)]
pub struct Life {
    /// The last sign of life (or when watching began).
    pub at: Instant,
    /// The highest renewal seen per term (a few recent terms).
    renewals: BTreeMap<String, u64>,
}

impl Life {
    /// Nothing seen yet: counted from `now`, so a new standby waits a
    /// whole lease time before overwriting a value it cannot vouch for.
    pub fn new(now: Instant) -> Self {
        Life {
            at: now,
            renewals: BTreeMap::new(),
        }
    }

    /// A signed record was seen at `now`: a sign of life if it is new (a
    /// term not seen, or a higher renewal of one); a replayed record is not.
    pub fn saw(&mut self, r: &Record, now: Instant) -> bool {
        let new = self.renewals.get(&r.term).is_none_or(|n| r.renewal > *n);
        if new {
            if self.renewals.len() >= 16 && !self.renewals.contains_key(&r.term) {
                self.renewals.pop_first();
            }
            self.renewals.insert(r.term.clone(), r.renewal);
            self.at = now;
        }
        new
    }
}

/// The lease, as seen by one orchestrator.
pub struct Lease {
    store: kv::Store,
    bucket: String,
    identity: Arc<Identity>,
    holder: String,
    term: String,
    renewal: u64,
    revision: Option<u64>,
    last_written: Instant,
    life: Arc<StdMutex<Life>>,
    watcher: tokio::task::JoinHandle<()>,
    report: Report,
    /// The last foreign revision reported (each is reported once).
    reported: u64,
    /// The lease time.
    pub ttl: Duration,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Lease {
    /// Opens (or creates) the lease bucket, and starts watching its key.
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        holder: &str,
        ttl: Duration,
        replicas: usize,
        identity: Arc<Identity>,
        report: Report,
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
        // Unique per run; not a secret (the record is signed).
        let term = hex::encode(&uuid::Uuid::new_v4().as_bytes()[..8]);
        let life = Arc::new(StdMutex::new(Life::new(Instant::now())));
        let watcher = tokio::spawn(watch(
            store.clone(),
            bucket.to_string(),
            identity.public_key(),
            life.clone(),
        ));
        Ok(Lease {
            store,
            bucket: bucket.to_string(),
            identity,
            holder: holder.to_string(),
            term,
            renewal: 0,
            revision: None,
            last_written: Instant::now(),
            life,
            watcher,
            report,
            reported: 0,
            ttl,
        })
    }

    /// Whether this orchestrator holds the lease.
    pub fn held(&self) -> bool {
        self.revision.is_some()
    }

    /// The next record to write.
    fn next(&mut self) -> bytes::Bytes {
        self.renewal += 1;
        Record::new(
            &self.identity,
            &self.bucket,
            &self.holder,
            &self.term,
            self.renewal,
        )
        .bytes()
    }

    /// The key as it is now, and the record in it if it is one.
    async fn read(&self) -> anyhow::Result<(Current, Option<Record>)> {
        Ok(match self.store.entry(KEY).await? {
            Some(e) if e.operation == Operation::Put => (
                Current::Present {
                    revision: e.revision,
                },
                Record::parse(&e.value, &self.bucket, &self.identity.public_key()),
            ),
            _ => (Current::Absent, None),
        })
    }

    /// Reports a foreign value found at `revision` (once).
    fn foreign(&mut self, revision: u64, what: &str) {
        if revision > self.reported {
            self.reported = revision;
            tracing::warn!(
                revision,
                "a foreign value in the lease key (not a signed lease record): {what}"
            );
            let _ = self.report.send(RejectReason::ForeignRecord);
        }
    }

    fn took(&mut self, revision: u64) -> bool {
        self.revision = Some(revision);
        self.last_written = Instant::now();
        true
    }

    /// Tries to take the lease; true if taken.
    pub async fn try_acquire(&mut self) -> bool {
        let Ok((current, record)) = self.read().await else {
            return false;
        };
        let now = Instant::now();
        let silent_for = {
            let Ok(mut life) = self.life.lock() else {
                return false;
            };
            if let Some(r) = &record {
                life.saw(r, now);
            }
            now.saturating_duration_since(life.at)
        };
        match acquire_step(current, silent_for, self.ttl) {
            Acquire::Wait => false,
            Acquire::Create => {
                let value = self.next();
                match self.store.create(KEY, value).await {
                    Ok(rev) => self.took(rev),
                    Err(_) => false,
                }
            }
            Acquire::TakeOver { revision } => {
                if record.is_none() {
                    self.foreign(revision, "overwritten after a lease time without a holder");
                }
                let value = self.next();
                match self.store.update(KEY, value, revision).await {
                    Ok(rev) => self.took(rev),
                    Err(_) => false,
                }
            }
        }
    }

    /// Renews a held lease; an error means it was lost. A foreign value
    /// found in the key is overwritten (a few tries), not obeyed.
    pub async fn renew(&mut self) -> anyhow::Result<()> {
        let Some(mut rev) = self.revision else {
            anyhow::bail!("lease not held");
        };
        for _ in 0..3 {
            let value = self.next();
            match self.store.update(KEY, value, rev).await {
                Ok(r) => {
                    self.took(r);
                    return Ok(());
                }
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    let (current, record) = match self.read().await {
                        Ok(c) => c,
                        Err(e) => {
                            self.revision = None;
                            anyhow::bail!("lost the orchestrator lease: {e}");
                        }
                    };
                    match on_conflict(current, record.as_ref(), &self.holder, &self.term) {
                        Conflict::Lost { to } => {
                            self.revision = None;
                            anyhow::bail!("lost the orchestrator lease to {to}");
                        }
                        Conflict::Overwrite { revision } => {
                            if record.is_none() {
                                self.foreign(revision, "overwritten by the holder");
                            }
                            rev = revision;
                        }
                        Conflict::Recreate => {
                            let value = self.next();
                            if let Ok(r) = self.store.create(KEY, value).await {
                                self.took(r);
                                return Ok(());
                            }
                        }
                    }
                }
                Err(e) => {
                    self.revision = None;
                    anyhow::bail!("lost the orchestrator lease: {e}")
                }
            }
        }
        // Writes racing ours every time: keep trying on the next tick,
        // unless a standby may soon consider this holder silent.
        self.revision = Some(rev);
        if self.last_written.elapsed() > self.ttl * 2 / 3 {
            self.revision = None;
            anyhow::bail!("could not renew the orchestrator lease for 2/3 of its time");
        }
        Ok(())
    }

    /// Gives the lease up (on clean shutdown), so a standby takes over now.
    pub async fn release(&mut self) {
        if let Some(rev) = self.revision.take() {
            let _ = self.store.delete_expect_revision(KEY, Some(rev)).await;
        }
    }

    /// Who holds the lease now, if a signed record names anyone.
    pub async fn holder(&self) -> Option<String> {
        self.read()
            .await
            .ok()
            .and_then(|(_, r)| r)
            .map(|r| r.holder)
    }
}

/// Notes every signed record written to the key, so a standby knows when
/// the holder last showed life even if something else overwrites the key
/// between its ticks. A watch that ends is started again.
async fn watch(store: kv::Store, bucket: String, cluster_key: [u8; 32], life: Arc<StdMutex<Life>>) {
    loop {
        match store.watch(KEY).await {
            Ok(mut entries) => {
                while let Some(Ok(e)) = entries.next().await {
                    if e.operation != Operation::Put {
                        continue;
                    }
                    if let Some(r) = Record::parse(&e.value, &bucket, &cluster_key) {
                        if let Ok(mut l) = life.lock() {
                            l.saw(&r, Instant::now());
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch the lease key; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3);

    fn identity() -> Identity {
        Identity::from_seed(&[7; 32])
    }

    #[test]
    fn a_record_verifies_only_under_the_cluster_key_and_its_bucket() {
        let id = identity();
        let r = Record::new(&id, "LEASE", "orchestrator", "ab", 4);
        let bytes = r.bytes();
        assert_eq!(
            Record::parse(&bytes, "LEASE", &id.public_key()),
            Some(r.clone())
        );
        assert_eq!(Record::parse(&bytes, "OTHER", &id.public_key()), None);
        let other = Identity::from_seed(&[8; 32]);
        assert_eq!(Record::parse(&bytes, "LEASE", &other.public_key()), None);
        let mut forged = r;
        forged.renewal = 5;
        assert_eq!(
            Record::parse(&forged.bytes(), "LEASE", &id.public_key()),
            None
        );
        for junk in [&b"mallory holds the lease"[..], b"", b"{}", b"\x00\xff"] {
            assert_eq!(Record::parse(junk, "LEASE", &id.public_key()), None);
        }
    }

    #[test]
    fn a_standby_creates_an_empty_key_at_once_and_overwrites_only_a_silent_one() {
        let present = Current::Present { revision: 9 };
        assert_eq!(
            acquire_step(Current::Absent, Duration::ZERO, TTL),
            Acquire::Create
        );
        assert_eq!(acquire_step(present, Duration::ZERO, TTL), Acquire::Wait);
        assert_eq!(acquire_step(present, TTL / 2, TTL), Acquire::Wait);
        assert_eq!(
            acquire_step(present, TTL, TTL),
            Acquire::TakeOver { revision: 9 }
        );
    }

    #[test]
    fn a_holder_yields_only_to_another_orchestrators_record() {
        let id = identity();
        let present = Current::Present { revision: 3 };
        let other = Record::new(&id, "L", "standby", "cd", 1);
        let mine_replayed = Record::new(&id, "L", "orchestrator", "ab", 1);
        let same_name_other_run = Record::new(&id, "L", "orchestrator", "ef", 1);
        assert_eq!(
            on_conflict(present, Some(&other), "orchestrator", "ab"),
            Conflict::Lost {
                to: "standby".into()
            }
        );
        assert_eq!(
            on_conflict(present, Some(&same_name_other_run), "orchestrator", "ab"),
            Conflict::Lost {
                to: "orchestrator".into()
            }
        );
        assert_eq!(
            on_conflict(present, None, "orchestrator", "ab"),
            Conflict::Overwrite { revision: 3 }
        );
        assert_eq!(
            on_conflict(present, Some(&mine_replayed), "orchestrator", "ab"),
            Conflict::Overwrite { revision: 3 }
        );
        assert_eq!(
            on_conflict(Current::Absent, None, "orchestrator", "ab"),
            Conflict::Recreate
        );
    }

    #[test]
    fn only_new_records_are_signs_of_life() {
        let id = identity();
        let t0 = Instant::now();
        let mut life = Life::new(t0);
        let r1 = Record::new(&id, "L", "o", "ab", 1);
        let r2 = Record::new(&id, "L", "o", "ab", 2);
        assert!(life.saw(&r1, t0 + Duration::from_secs(1)));
        assert!(life.saw(&r2, t0 + Duration::from_secs(2)));
        // A replay of an older or the same record is not.
        assert!(!life.saw(&r1, t0 + Duration::from_secs(3)));
        assert!(!life.saw(&r2, t0 + Duration::from_secs(4)));
        assert_eq!(life.at, t0 + Duration::from_secs(2));
        // A new term is.
        let next_run = Record::new(&id, "L", "o", "cd", 1);
        assert!(life.saw(&next_run, t0 + Duration::from_secs(5)));
        assert_eq!(life.at, t0 + Duration::from_secs(5));
    }
}
