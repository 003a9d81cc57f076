//! Attack: message-id poisoning (issue 12, attack 2), on real processes.
//!
//! JetStream drops a message whose `Nats-Msg-Id` it has stored within its
//! duplicate window, whatever the subject, across the whole stream. An
//! attacker on the bus who publishes junk first under an id the
//! orchestrator will use makes JetStream drop the real command or event as
//! its duplicate. These tests publish junk under the ids the orchestrator
//! used to derive from public content alone — `delete-<key>-<hsm>`,
//! `clone-<key>-<hsm>`, `replicated-<key>` (decision 8) — and check that
//! no command or event of the orchestrator is lost to it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use keysync::{CreateKey, Route};
use keysync_schemas::subjects::KeySubject;
use keysync_schemas::{decode, Durability, Event, HsmId, KeyId, KeyType, Subjects};
use keysync_testkit::{
    assert_converges, create, delete_with_cli, hsm, inventory, start_stack, wait_until,
};

/// Bytes no keysync receiver accepts: what the attacker stores under a
/// stolen id (its content does not matter, only that it is there first).
fn junk() -> Bytes {
    Bytes::from_static(b"junk under a predictable message id")
}

/// The ids the orchestrator derived from public content before they were
/// keyed (`plan::message_id` as of decision 8): anyone who reads the log
/// can compute them.
mod predictable {
    use super::*;

    pub fn delete(key: &KeyId, target: &HsmId) -> String {
        format!("delete-{key}-{target}")
    }

    pub fn clone(key: &KeyId, target: &HsmId) -> String {
        format!("clone-{key}-{target}")
    }

    pub fn replicated(key: &KeyId) -> String {
        format!("replicated-{key}")
    }
}

/// A connection of the attacker's own.
async fn attacker(url: &str) -> jetstream::Context {
    let nats = async_nats::ConnectOptions::new()
        .name("attacker")
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("the attacker connects: {e}"));
    jetstream::new(nats)
}

/// Publishes junk on `subject` under `msg_id` into JetStream; returns the
/// PubAck.
async fn junk_under(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
) -> jetstream::publish::PublishAck {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", msg_id);
    js.publish_with_headers(subject.clone(), h, junk())
        .await
        .unwrap_or_else(|e| panic!("publish on {subject}: {e}"))
        .await
        .unwrap_or_else(|e| panic!("junk on {subject} not acknowledged: {e}"))
}

/// Runs the `keysync` CLI off the runtime's threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_under_the_delete_ids_does_not_keep_a_deleted_key_on_any_hsm() {
    let stack = start_stack(3).await;
    let client = stack.client().clone();
    let subjects = client.subjects().clone();
    let hsms = stack.hsm_ids();
    let creator = hsm("hsm-1");
    let key = create(&client, KeyType::P256, &creator).await;
    let key_id = key.info.key_id;
    let everywhere = BTreeMap::from([(key_id, key.info.fingerprint)]);
    assert_converges(&client, &hsms, &everywhere, Duration::from_secs(20)).await;

    // The attack: junk in every HSM's command queue under the id of the
    // delete the orchestrator will send it. JetStream stores it (it is
    // the first message under that id), so it holds the id.
    let js = attacker(&stack.url()).await;
    for h in &hsms {
        let id = predictable::delete(&key_id, h);
        let ack = junk_under(&js, subjects.commands_for(h), &id).await;
        assert!(
            !ack.duplicate,
            "the junk under {id} was not stored (the attack was not performed)"
        );
    }

    // The operator deletes the key: "every HSM erases it".
    delete_with_cli(&stack.url(), &key_id, &creator).await;

    // Then no HSM holds it.
    let erased = wait_until(Duration::from_secs(20), || async {
        let mut any = false;
        for h in &hsms {
            any |= inventory(&client, h).await.contains_key(&key_id);
        }
        !any
    })
    .await;
    let mut still = Vec::new();
    for h in &hsms {
        if inventory(&client, h).await.contains_key(&key_id) {
            still.push(h.to_string());
        }
    }
    assert!(
        erased,
        "20 s after `keysync key delete`, {key_id} is still on {still:?}: the deletes were dropped as duplicates of the junk"
    );
}

/// What the racer did.
#[derive(Debug, Default)]
struct Raced {
    /// Keys whose `KeyCreated` it saw.
    keys: AtomicUsize,
    /// Junk it published under a clone id, and how much of it JetStream
    /// stored (it was first under that id) or dropped (the real clone was).
    clones_sent: AtomicUsize,
    clones_stored: AtomicUsize,
    clones_dropped: AtomicUsize,
    /// The same for the `replicated` id.
    replicated_stored: AtomicUsize,
    replicated_dropped: AtomicUsize,
}

/// Answers each `KeyCreated` on the bus, as fast as it can, with junk under
/// the ids of the clones to every other member and of the key's
/// `KeyReplicated`.
fn spawn_racer(
    js: jetstream::Context,
    subjects: Subjects,
    hsms: Vec<HsmId>,
    mut created: async_nats::Subscriber,
    raced: Arc<Raced>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut acks = futures::stream::FuturesUnordered::new();
        loop {
            tokio::select! {
                msg = created.next() => {
                    let Some(msg) = msg else { break };
                    let Some(KeySubject::Created(key)) = subjects.parse_event(&msg.subject) else {
                        continue;
                    };
                    let Ok(Event::KeyCreated(c)) = decode::<Event>(&msg.payload).map(|e| e.body) else {
                        continue;
                    };
                    raced.keys.fetch_add(1, Ordering::SeqCst);
                    let mut sends = Vec::new();
                    for h in hsms.iter().filter(|h| **h != c.hsm) {
                        sends.push((true, subjects.commands_for(h), predictable::clone(&key, h)));
                    }
                    sends.push((false, subjects.key_replicated(&key), predictable::replicated(&key)));
                    for (is_clone, subject, id) in sends {
                        let mut h = async_nats::HeaderMap::new();
                        h.insert("Nats-Msg-Id", id.as_str());
                        if let Ok(ack) = js.publish_with_headers(subject, h, junk()).await {
                            if is_clone {
                                raced.clones_sent.fetch_add(1, Ordering::SeqCst);
                            }
                            acks.push(async move { (is_clone, ack.await) });
                        }
                    }
                }
                Some((is_clone, ack)) = acks.next(), if !acks.is_empty() => {
                    let Ok(ack) = ack else { continue };
                    let counter = match (is_clone, ack.duplicate) {
                        (true, false) => &raced.clones_stored,
                        (true, true) => &raced.clones_dropped,
                        (false, false) => &raced.replicated_stored,
                        (false, true) => &raced.replicated_dropped,
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_racer_on_the_clone_and_replicated_ids_does_not_fail_all_creates() {
    const KEYS: usize = 12;
    let stack = start_stack(3).await;
    let client = stack.client().clone();
    let subjects = client.subjects().clone();
    let hsms = stack.hsm_ids();

    // The racer listens to every key's creation on the bus.
    let js = attacker(&stack.url()).await;
    let created = js
        .client()
        .subscribe(format!("{}.evt.key.*.created", subjects.prefix()))
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    js.client()
        .flush()
        .await
        .unwrap_or_else(|e| panic!("flush: {e}"));
    let raced = Arc::new(Raced::default());
    let racer = spawn_racer(js, subjects.clone(), hsms.clone(), created, raced.clone());

    // `all` creates, a few at a time, on every HSM in turn.
    let results: Vec<(HsmId, Result<keysync::CreatedKey, keysync::Error>)> =
        futures::stream::iter(0..KEYS)
            .map(|i| {
                let client = client.clone();
                let on = hsms[i % hsms.len()].clone();
                async move {
                    let r = client
                        .create_key(
                            CreateKey::new(KeyType::P256)
                                .on(Route::Hsm(on.clone()))
                                .durability(Durability::All),
                        )
                        .await;
                    (on, r)
                }
            })
            .buffer_unordered(4)
            .collect()
            .await;

    // The attack was performed: the racer answered every creation, and its
    // junk under each key's `replicated` id was stored first.
    let performed = wait_until(Duration::from_secs(10), || async {
        raced.keys.load(Ordering::SeqCst) >= KEYS
            && raced.replicated_stored.load(Ordering::SeqCst)
                + raced.replicated_dropped.load(Ordering::SeqCst)
                >= KEYS
            && raced.clones_stored.load(Ordering::SeqCst)
                + raced.clones_dropped.load(Ordering::SeqCst)
                >= raced.clones_sent.load(Ordering::SeqCst)
    })
    .await;
    racer.abort();
    println!("racer: {raced:?}");
    assert!(
        performed,
        "the racer did not answer every creation: {raced:?}"
    );

    let failed: Vec<String> = results
        .iter()
        .filter_map(|(on, r)| r.as_ref().err().map(|e| format!("on {on}: {e}")))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {KEYS} `all` creates failed while a racer held the predictable ids ({raced:?}): {failed:#?}",
        failed.len()
    );
    assert_eq!(
        raced.replicated_stored.load(Ordering::SeqCst),
        KEYS,
        "the junk under every key's `replicated` id was stored, yet the real announcements still landed"
    );

    // And the cluster is whole: every HSM holds every key, none is left
    // syncing, no clone is outstanding.
    let expected: BTreeMap<KeyId, keysync_schemas::Fingerprint> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .map(|k| (k.info.key_id, k.info.fingerprint))
        .collect();
    assert_converges(&client, &hsms, &expected, Duration::from_secs(20)).await;
    let settled = wait_until(Duration::from_secs(20), || async {
        client.cluster_status().await.is_ok_and(|s| {
            s.pending_clones == 0
                && s.replicated == KEYS as u64
                && s.members.iter().all(|m| m.state.as_str() == "in-service")
        })
    })
    .await;
    assert!(
        settled,
        "the cluster did not settle: {:?}",
        client.cluster_status().await
    );
}

/// Consumer `agent-<hsm>` has nothing left to deliver or to be acked.
async fn queue_drained(client: &keysync::Client, h: &HsmId) -> bool {
    let js = jetstream::new(client.nats().clone());
    let Ok(stream) = js.get_stream(client.subjects().commands_stream()).await else {
        return false;
    };
    let Ok(mut c) = stream
        .get_consumer::<jetstream::consumer::pull::Config>(&client.subjects().agent_consumer(h))
        .await
    else {
        return false;
    };
    c.info()
        .await
        .is_ok_and(|i| i.num_pending == 0 && i.num_ack_pending == 0)
}

/// Whether the events stream stores a `KeyReplicated` of `key` signed by
/// the cluster. (A subscriber on the subject sees the orchestrator's
/// publish even when JetStream drops it as a duplicate: only the stream
/// tells whether it landed.)
async fn replicated_stored(client: &keysync::Client, cluster_key: &[u8; 32], key: &KeyId) -> bool {
    let subject = client.subjects().key_replicated(key);
    let Ok(stream) = jetstream::new(client.nats().clone())
        .get_stream(client.subjects().events_stream())
        .await
    else {
        return false;
    };
    let mut from = 1;
    while let Ok(m) = stream
        .direct_get_next_for_subject(subject.as_str(), Some(from))
        .await
    {
        let signed = keysync_security::check_event(
            Some(&m.headers),
            &subject,
            &m.payload,
            keysync_schemas::Timestamp::now().as_nanos(),
            cluster_key,
            |_| None,
        );
        if matches!(signed, Ok(e) if matches!(&e.body, Event::KeyReplicated(r) if r.key_id == *key))
        {
            return true;
        }
        from = m.sequence + 1;
    }
    false
}

/// Defense in depth: even junk stored under the *keyed* ids — by someone
/// who holds the message-id key, or after any future mistake in deriving
/// ids — does not cost a command or an event. A publish JetStream answers
/// "duplicate" is checked against what it holds under that id; what is not
/// an orchestrator's is removed, counted, and the real message sent again
/// under a fresh id. The test derives the ids from the cluster identity
/// file, as only an orchestrator can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_under_the_keyed_ids_is_caught_on_the_duplicate_ack() {
    use keysync_schemas::{KeyAttributes, OpReply, OpRequest};
    use orchestrator::plan::{message_id, MsgId};

    let mut stack = start_stack(3).await;
    let client = stack.client().clone();
    let subjects = client.subjects().clone();
    let hsms = stack.hsm_ids();
    let (h1, h2, h3) = (hsm("hsm-1"), hsm("hsm-2"), hsm("hsm-3"));
    let cluster = keysync_security::Identity::load(stack.cluster_identity())
        .unwrap_or_else(|e| panic!("cluster identity: {e}"));
    let ids = keysync_security::MessageIdKey::derive(&cluster);

    let doomed = create(&client, KeyType::P256, &h1).await;
    let doomed_id = doomed.info.key_id;
    let everywhere = BTreeMap::from([(doomed_id, doomed.info.fingerprint)]);
    assert_converges(&client, &hsms, &everywhere, Duration::from_secs(20)).await;

    // hsm-3 is down, so the junk waits in its queue; hsm-2 takes its junk
    // at once (and rejects it), so what held the id is gone by the time
    // the orchestrator publishes.
    stack.kill_agent(&h3);
    let fresh = KeyId::new();
    let js = attacker(&stack.url()).await;
    let mut poisoned = Vec::new();
    for target in [&h2, &h3] {
        poisoned.push((
            subjects.commands_for(target),
            message_id(
                &ids,
                MsgId::Delete {
                    key_id: doomed_id,
                    target,
                },
            ),
        ));
        poisoned.push((
            subjects.commands_for(target),
            message_id(
                &ids,
                MsgId::Clone {
                    key_id: fresh,
                    target,
                },
            ),
        ));
    }
    poisoned.push((
        subjects.key_replicated(&fresh),
        message_id(&ids, MsgId::Replicated { key_id: fresh }),
    ));
    for (subject, id) in &poisoned {
        let ack = junk_under(&js, subject.clone(), id).await;
        assert!(!ack.duplicate, "the junk under {id} was not stored");
    }
    assert!(
        wait_until(Duration::from_secs(10), || queue_drained(&client, &h2)).await,
        "hsm-2 did not take its junk"
    );

    // The key is deleted; another is created under an id chosen in
    // advance (its clones' and announcement's ids were poisoned).
    delete_with_cli(&stack.url(), &doomed_id, &h1).await;
    let reply = client
        .request(
            &Route::Hsm(h1.clone()),
            OpRequest::Generate {
                key_id: Some(fresh),
                key_type: KeyType::P256,
                session: false,
                durability: Durability::Logged,
                attributes: KeyAttributes::default(),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("creating {fresh}: {e}"));
    let OpReply::Created { info, .. } = reply else {
        panic!("creating {fresh}: {reply:?}");
    };
    stack
        .start_agents(std::slice::from_ref(&h3))
        .await
        .unwrap_or_else(|e| panic!("hsm-3 restarts: {e}"));

    // Then the deleted key is gone from every HSM, the new one is on
    // every HSM, and its real announcement (signed by the cluster) landed.
    let expected = BTreeMap::from([(fresh, info.fingerprint)]);
    assert_converges(&client, &hsms, &expected, Duration::from_secs(30)).await;
    let cluster_key = cluster.public_key();
    let landed = wait_until(Duration::from_secs(20), || {
        replicated_stored(&client, &cluster_key, &fresh)
    })
    .await;
    assert!(
        landed,
        "no KeyReplicated for {fresh} signed by the cluster in the stream: it was dropped as a duplicate of the junk"
    );
    // The junk found in place (hsm-3's queue) was counted by its reason.
    let status = client
        .cluster_status()
        .await
        .unwrap_or_else(|e| panic!("cluster status: {e}"));
    let foreign: u64 = status
        .rejected
        .iter()
        .filter(|(r, _)| r.as_str() == "foreign_duplicate")
        .map(|(_, n)| *n)
        .sum();
    assert!(
        foreign >= 2,
        "the junk under hsm-3's delete and clone ids was not counted as foreign_duplicate: {:?}",
        status.rejected
    );
}

/// Under `deploy/nats/secure.conf` an agent may publish on its own event
/// subjects (and on any key's `created`): it learns a key's id from the
/// clone it is sent, and junk it stores under that key's `replicated` id
/// would make JetStream drop the orchestrator's announcement. Here hsm-1's
/// credentials are the attacker's; hsm-3 is down so the key cannot
/// complete before the junk is in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_secure_config_an_agent_cannot_take_a_keys_replicated_id() {
    use keysync_testkit::secure_user as user;

    let mut stack = keysync_testkit::DevStack::start(keysync_testkit::on_secure_config(
        keysync_testkit::StackOptions {
            hsms: 3,
            ..Default::default()
        },
    ))
    .await
    .unwrap_or_else(|e| panic!("stack on secure.conf: {e}"));
    let client = stack.client().clone();
    let subjects = client.subjects().clone();
    let hsms = stack.hsm_ids();
    let (h1, h3) = (hsm("hsm-1"), hsm("hsm-3"));
    let cluster_key = keysync_security::Identity::load(stack.cluster_identity())
        .unwrap_or_else(|e| panic!("cluster identity: {e}"))
        .public_key();

    stack.kill_agent(&h3);
    let key = create(&client, KeyType::P256, &h1).await;
    let key_id = key.info.key_id;

    // The attack, with hsm-1's credentials, on hsm-1's own subject.
    let as_hsm1 = user("hsm-1")
        .apply(async_nats::ConnectOptions::new())
        .await
        .unwrap_or_else(|e| panic!("credentials: {e}"))
        .connect(stack.url())
        .await
        .unwrap_or_else(|e| panic!("hsm-1 connects: {e}"));
    let ack = junk_under(
        &jetstream::new(as_hsm1),
        subjects.clone_applied(&key_id, &h1),
        &predictable::replicated(&key_id),
    )
    .await;
    assert!(
        !ack.duplicate,
        "the key was announced before the junk was in place (the attack was not performed)"
    );

    // hsm-3 comes back; the key completes on every member.
    stack
        .start_agents(std::slice::from_ref(&h3))
        .await
        .unwrap_or_else(|e| panic!("hsm-3 restarts: {e}"));
    let everywhere = BTreeMap::from([(key_id, key.info.fingerprint)]);
    assert_converges(&client, &hsms, &everywhere, Duration::from_secs(30)).await;

    // Then the orchestrator's announcement landed in the stream.
    let landed = wait_until(Duration::from_secs(20), || {
        replicated_stored(&client, &cluster_key, &key_id)
    })
    .await;
    assert!(
        landed,
        "no KeyReplicated for {key_id} signed by the cluster in the stream: dropped as a duplicate of hsm-1's junk"
    );
    // And the junk, refused, left the log (the orchestrator may delete
    // events under secure.conf).
    let events = jetstream::new(client.nats().clone())
        .get_stream(subjects.events_stream())
        .await
        .unwrap_or_else(|e| panic!("events stream: {e}"));
    let removed = wait_until(Duration::from_secs(20), || async {
        events.direct_get(ack.sequence).await.is_err()
    })
    .await;
    assert!(
        removed,
        "hsm-1's junk at {} is still in the log",
        ack.sequence
    );
}
