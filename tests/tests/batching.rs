//! Batching under load on real processes (decision 21): a burst of
//! concurrent creates makes the agents announce their applied clones in
//! `ClonesApplied` batches (one signed event per window), and every key
//! still reaches every HSM, every `replicas:N` waiter completes, the audit
//! chain verifies and the lifecycle stream has one `key.applied` per key
//! and HSM. Bad batches (too large, a key twice, another HSM's, another
//! HSM's subject) are refused whole with a counted reason and change
//! nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use keysync::{Client, CreateKey, Route};
use keysync_schemas::{
    decode, encode, AppliedKey, AuditFact, AuditRecord, ClonesApplied, Durability, Envelope, Event,
    Fingerprint, HsmId, KeyId, KeyType, RejectReason, Source, MAX_APPLIED_PER_EVENT,
};
use keysync_security::{signed_headers, Identity, Signer};
use keysync_testkit::{
    assert_converges, hsm, keysync_cli, start_stack, stored_messages, wait_until,
};

async fn create_burst(client: &Client, on: &[HsmId], n: usize, in_flight: usize) -> Vec<KeyId> {
    futures::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            let h = on[i % on.len()].clone();
            async move {
                let k = client
                    .create_key(
                        CreateKey::new(KeyType::P256)
                            .on(Route::Hsm(h.clone()))
                            .durability(Durability::Replicas(3)),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("create {i} on {h}: {e}"));
                // The durability waiter saw every HSM hold it.
                assert_eq!(k.holders.len(), 3, "replicas:3 returned early: {k:?}");
                k.info.key_id
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_creates_is_announced_in_batches_and_every_key_reaches_every_hsm() {
    let stack = start_stack(3).await;
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();
    let subjects = client.subjects().clone();

    // Given a burst of creates, 64 in flight, each waiting for replicas:3
    // (so each waiter must read the batches its clones came in),
    let n = 600;
    let keys = create_burst(&client, &hsms, n, 64).await;
    assert_eq!(keys.len(), n);

    // then the orchestrator completed every key with nothing pending,
    let done = wait_until(Duration::from_secs(60), || async {
        client
            .cluster_status()
            .await
            .is_ok_and(|s| s.keys == n as u64 && s.replicated == n as u64 && s.pending_clones == 0)
    })
    .await;
    assert!(done, "not completed: {:?}", client.cluster_status().await);
    let expected: BTreeMap<KeyId, Fingerprint> = client
        .list_keys(&hsms[0])
        .await
        .expect("list")
        .into_iter()
        .map(|k| (k.key_id, k.fingerprint))
        .collect();
    assert_eq!(expected.len(), n);
    assert_converges(&client, &hsms, &expected, Duration::from_secs(30)).await;

    // and the agents really announced clones in batches: signed, well
    // formed, each naming keys of this burst, on their HSM's subject.
    let events = subjects.events_stream();
    let batches = stored_messages(&client, &events, &subjects.all_clones_applied()).await;
    let mut batched: BTreeSet<(KeyId, HsmId)> = BTreeSet::new();
    for m in &batches {
        let env = decode::<Event>(&m.payload).expect("a batch decodes");
        let Event::ClonesApplied(b) = env.body else {
            panic!("not a batch on {}", m.subject);
        };
        assert_eq!(m.subject.as_str(), subjects.clones_applied(&b.hsm));
        assert!(b.check().is_ok(), "an agent sent a bad batch");
        assert!(
            b.applied.len() > 1,
            "a batch of one is a plain CloneApplied"
        );
        for a in &b.applied {
            assert!(expected.contains_key(&a.key_id));
            batched.insert((a.key_id, b.hsm.clone()));
        }
    }
    let singles = stored_messages(&client, &events, &subjects.all_applied())
        .await
        .len();
    eprintln!(
        "{} ClonesApplied batches named {} clones; {singles} clones announced alone",
        batches.len(),
        batched.len()
    );
    assert!(
        !batches.is_empty(),
        "no ClonesApplied under a burst of {n} creates at 64 in flight"
    );
    // Every clone is announced, alone or in a batch (2 per key at 3 HSMs);
    // batching saved messages.
    assert!(batched.len() + singles >= 2 * n);
    assert!(batches.len() + singles < 2 * n, "no message was saved");

    // The lifecycle stream has one key.applied per key and cloning HSM,
    // under distinct ids (events-<seq>-<i> for a batch's i-th key).
    let lifecycle = wait_until(Duration::from_secs(30), || async {
        stored_messages(
            &client,
            &subjects.lifecycle_stream(),
            &subjects.lifecycle_key("*", "applied"),
        )
        .await
        .len()
            >= 2 * n
    })
    .await;
    assert!(lifecycle, "the lifecycle mirror did not catch up");
    let mirrored = stored_messages(
        &client,
        &subjects.lifecycle_stream(),
        &subjects.lifecycle_key("*", "applied"),
    )
    .await;
    let mut ids = BTreeSet::new();
    let mut pairs = BTreeSet::new();
    for m in &mirrored {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
        assert!(
            ids.insert(v["id"].as_str().expect("id").to_string()),
            "id twice: {v}"
        );
        pairs.insert((
            v["data"]["key_id"].as_str().expect("key").to_string(),
            v["data"]["hsm"].as_str().expect("hsm").to_string(),
        ));
    }
    assert_eq!(
        pairs.len(),
        2 * n,
        "one key.applied per key and cloning HSM"
    );
    for (k, h) in &batched {
        assert!(
            pairs.contains(&(k.to_string(), h.to_string())),
            "{k} on {h} not mirrored"
        );
    }

    // The audit chain records each batch as one fact naming its keys, and
    // verifies.
    let url = stack.url();
    let audited = wait_until(Duration::from_secs(30), || async {
        let records = stored_messages(&client, &subjects.audit_stream(), "").await;
        let facts: usize = records
            .iter()
            .filter_map(|m| decode::<AuditRecord>(&m.payload).ok())
            .map(|r| match r.body.fact {
                AuditFact::ClonesApplied { applied, .. } => applied.len(),
                _ => 0,
            })
            .sum();
        facts >= batched.len()
    })
    .await;
    assert!(audited, "the audit chain does not name every batched clone");
    let out = keysync_cli(&["--nats", url.as_str(), "audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stack.shutdown().await;
}

/// Publishes a `ClonesApplied` signed by `identity` as `signer` on
/// `subject`; returns its stream sequence.
async fn publish_batch(
    nats: &async_nats::Client,
    identity: &Identity,
    signer: &HsmId,
    subject: String,
    batch: ClonesApplied,
) -> u64 {
    let env = Envelope::new(Source::Hsm(signer.clone()), Event::ClonesApplied(batch));
    let bytes = encode(&env).expect("encode");
    let h = signed_headers(
        identity,
        &Signer::Hsm(signer.clone()),
        &subject,
        &env.id.to_string(),
        &bytes,
    );
    jetstream::new(nats.clone())
        .publish_with_headers(subject.clone(), h, bytes.into())
        .await
        .unwrap_or_else(|e| panic!("publish on {subject}: {e}"))
        .await
        .unwrap_or_else(|e| panic!("{subject} not stored: {e}"))
        .sequence
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_batches_are_refused_whole_with_a_counted_reason_and_change_nothing() {
    let mut stack = start_stack(3).await;
    let client = stack.client().clone();
    let subjects = client.subjects().clone();
    let (h1, h2, h3) = (hsm("hsm-1"), hsm("hsm-2"), hsm("hsm-3"));
    // Given a key on hsm-1 only: hsm-3 is stopped, so its clone waits.
    stack.kill_agent(&h3);
    let k = client
        .create_key(
            CreateKey::new(KeyType::P256)
                .on(Route::Hsm(h1.clone()))
                .durability(Durability::Logged),
        )
        .await
        .expect("create");
    let settled = wait_until(Duration::from_secs(30), || async {
        client.cluster_status().await.is_ok_and(|s| {
            s.members
                .iter()
                .find(|m| m.hsm_id == h2)
                .is_some_and(|m| m.keys == 1)
        })
    })
    .await;
    assert!(settled, "hsm-2 never held the key");
    let before = client.cluster_status().await.expect("status");
    let held_by_3 = |s: &keysync_schemas::ClusterStatus| {
        s.members.iter().find(|m| m.hsm_id == h3).map(|m| m.keys)
    };
    assert_eq!(held_by_3(&before), Some(0));

    // hsm-3's own identity (a compromised agent, or a buggy one) signs:
    let identity = Identity::load(&stack.agent_identity(&h3)).expect("identity");
    let entry = |key_id: KeyId| AppliedKey {
        key_id,
        fingerprint: k.info.fingerprint,
        already_present: false,
    };
    let batch = |applied: Vec<AppliedKey>| ClonesApplied {
        hsm: h3.clone(),
        applied,
    };
    let cases: Vec<(&str, HsmId, String, ClonesApplied, RejectReason)> = vec![
        (
            // one key too many (the real key first, then strangers)
            "oversized",
            h3.clone(),
            subjects.clones_applied(&h3),
            batch(
                std::iter::once(entry(k.info.key_id))
                    .chain((0..MAX_APPLIED_PER_EVENT).map(|_| entry(KeyId::new())))
                    .collect(),
            ),
            RejectReason::BatchSize,
        ),
        (
            "duplicate",
            h3.clone(),
            subjects.clones_applied(&h3),
            batch(vec![entry(k.info.key_id), entry(k.info.key_id)]),
            RejectReason::BatchDuplicate,
        ),
        (
            // naming another HSM than its signer
            "another HSM",
            h3.clone(),
            subjects.clones_applied(&h2),
            ClonesApplied {
                hsm: h2.clone(),
                applied: vec![entry(k.info.key_id), entry(KeyId::new())],
            },
            RejectReason::SignerMismatch,
        ),
        (
            // its own batch on another HSM's subject
            "another HSM's subject",
            h3.clone(),
            subjects.clones_applied(&h2),
            batch(vec![entry(k.info.key_id), entry(KeyId::new())]),
            RejectReason::SubjectMismatch,
        ),
        (
            // a good entry and an unknown key: all or nothing
            "unknown key",
            h3.clone(),
            subjects.clones_applied(&h3),
            batch(vec![entry(k.info.key_id), entry(KeyId::new())]),
            RejectReason::UnknownKey,
        ),
    ];
    for (what, signer, subject, b, reason) in cases {
        let before = client.cluster_status().await.expect("status");
        let was = before
            .rejected
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n);
        let seq = publish_batch(client.nats(), &identity, &signer, subject, b).await;
        let counted = wait_until(Duration::from_secs(20), || async {
            client.cluster_status().await.is_ok_and(|s| {
                s.last_seq >= seq
                    && s.rejected
                        .iter()
                        .any(|(r, n)| *r == reason && *n == was + 1)
            })
        })
        .await;
        let after = client.cluster_status().await.expect("status");
        assert!(
            counted,
            "{what}: not rejected as {reason}: {:?}",
            after.rejected
        );
        // No state change: hsm-3 still holds nothing, hsm-1/2 as before.
        assert_eq!(held_by_3(&after), Some(0), "{what} was folded");
        assert_eq!(after.keys, before.keys);
        assert_eq!(after.replicated, before.replicated, "{what}");
    }
    // A good batch from hsm-3 alone is taken (the test's batches were
    // refused for what they were, not for being batches).
    let seq = publish_batch(
        client.nats(),
        &identity,
        &h3,
        subjects.clones_applied(&h3),
        batch(vec![entry(k.info.key_id)]),
    )
    .await;
    let taken = wait_until(Duration::from_secs(20), || async {
        client
            .cluster_status()
            .await
            .is_ok_and(|s| s.last_seq >= seq && held_by_3(&s) == Some(1))
    })
    .await;
    assert!(
        taken,
        "a well-formed batch was not folded: {:?}",
        client.cluster_status().await
    );
    stack.shutdown().await;
}
