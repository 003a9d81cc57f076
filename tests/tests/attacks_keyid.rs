//! Attack 3 of issue 12, "two keys, one id", on real processes.
//!
//! A create names the id its key gets (the SDK picks a random one, but the
//! op API takes any). Sending the same id to two HSMs at once made both
//! create a key, with different material: signatures under that id then
//! depended on which HSM answered, and the second HSM's clone of the first
//! key failed "conflict" for good. A key id must name one key in the whole
//! cluster, for ever (a deleted key's id too).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use keysync::{Client, Error, Route};
use keysync_schemas::{
    decode, Durability, Event, Fingerprint, HsmId, KeyAttributes, KeyId, KeyType, OpReply,
    OpRequest,
};
use keysync_testkit::{
    assert_converges, count_events, create, hsm, inventory, on_secure_config, start_stack,
    wait_until, DevStack, StackOptions,
};

/// Rounds of the race: each one a fresh id sent to two HSMs at once.
const ROUNDS: usize = 50;

/// The three-node NATS cluster is the heaviest stack here: it runs alone
/// (write), the others together (read), so that on a busy 2-core machine
/// its start-up does not compete with five other stacks.
static HEAVY: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn generate(key_id: KeyId, key_type: KeyType, durability: Durability) -> OpRequest {
    OpRequest::Generate {
        key_id: Some(key_id),
        key_type,
        session: false,
        durability,
        attributes: KeyAttributes::default(),
    }
}

/// The fingerprint in the `KeyCreated` the log holds for `key`, if any.
async fn logged_fingerprint(client: &Client, key: &KeyId) -> Option<Fingerprint> {
    let js = async_nats::jetstream::new(client.nats().clone());
    let stream = js
        .get_stream(client.subjects().events_stream())
        .await
        .unwrap_or_else(|e| panic!("events stream: {e}"));
    let msg = stream
        .direct_get_last_for_subject(client.subjects().key_created(key))
        .await
        .ok()?;
    match decode::<Event>(&msg.payload).map(|e| e.body) {
        Ok(Event::KeyCreated(c)) => Some(c.fingerprint),
        other => panic!("the created subject of {key} holds {other:?}"),
    }
}

/// Sends `op` to both HSMs at once; returns each answer.
async fn race(
    client: &Client,
    a: &HsmId,
    b: &HsmId,
    op: &OpRequest,
) -> [(HsmId, Result<OpReply, Error>); 2] {
    let (to_a, to_b) = (Route::Hsm(a.clone()), Route::Hsm(b.clone()));
    let (ra, rb) = tokio::join!(
        client.request(&to_a, op.clone()),
        client.request(&to_b, op.clone()),
    );
    [(a.clone(), ra), (b.clone(), rb)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_id_leave_one_key_in_the_cluster() {
    let _heavy = HEAVY.read().await;
    race_rounds(&start_stack(3).await, ROUNDS).await;
}

/// The same on a three-node NATS cluster (R3 streams), where JetStream
/// checks the message id before the expectation, and refuses a publish
/// while another one under the same filter is in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_id_on_a_nats_cluster_leave_one_key() {
    let _heavy = HEAVY.write().await;
    let options = StackOptions {
        hsms: 3,
        nats_nodes: 3,
        nats_config: Some(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/cluster-node.conf"),
        ),
        ..Default::default()
    };
    // A cluster forming on a busy 2-core machine has twice kept the
    // orchestrator from answering within the harness's 60 s (2 of some 20
    // runs, both while other engineers' tests loaded the VM): the start is
    // not what is tested here, so it gets a second chance, and says so.
    let stack = match DevStack::start(options.clone()).await {
        Ok(s) => s,
        Err(first) => {
            eprintln!("the 3-node stack did not start; starting it again: {first}");
            DevStack::start(options)
                .await
                .expect("stack on a 3-node NATS cluster")
        }
    };
    race_rounds(&stack, 20).await;
}

/// The same under `deploy/nats/secure.conf`, each process logged in as its
/// role: an agent may read what it needs to settle a refused create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_id_under_the_secure_config_leave_one_key() {
    let _heavy = HEAVY.read().await;
    let stack = DevStack::start(on_secure_config(StackOptions {
        hsms: 3,
        ..Default::default()
    }))
    .await
    .expect("stack on deploy/nats/secure.conf with per-role users");
    race_rounds(&stack, 10).await;
}

/// `rounds` fresh ids, each sent to hsm-1 and hsm-2 at once: one key per
/// id, the other create refused, every HSM converging on the winner.
async fn race_rounds(stack: &DevStack, rounds: usize) {
    let client = stack.client();
    let (h1, h2) = (hsm("hsm-1"), hsm("hsm-2"));
    let types = [KeyType::Ed25519, KeyType::P256, KeyType::Aes256];

    let mut winners: BTreeMap<KeyId, Fingerprint> = BTreeMap::new();
    let mut twice = Vec::new();
    let mut refused = 0usize;
    let mut unexpected = Vec::new();
    for round in 0..rounds {
        let id = KeyId::new();
        let op = generate(id, types[round % types.len()], Durability::Logged);
        let mut created = Vec::new();
        for (h, answer) in race(client, &h1, &h2, &op).await {
            match answer {
                Ok(OpReply::Created { info, .. }) => created.push((h, info.fingerprint)),
                Err(Error::KeyIdTaken { key_id, detail }) => {
                    assert_eq!(key_id, id, "round {round}");
                    assert!(
                        detail.contains("taken in the cluster") || detail.contains("already holds"),
                        "round {round}: the refusal says why: {detail}"
                    );
                    refused += 1;
                }
                other => unexpected.push(format!("round {round}, {h}: {other:?}")),
            }
        }
        // The attack was performed: both HSMs answered, and the id exists.
        match created.as_slice() {
            [(_, fp)] => {
                winners.insert(id, *fp);
            }
            [(_, a), (_, b)] => {
                twice.push((id, a != b));
                winners.insert(id, *a);
            }
            _ => panic!("round {round}: both creates of {id} were refused"),
        }
    }
    assert!(
        twice.is_empty(),
        "{} of {rounds} ids were created on both HSMs ({} with different material); \
         other answers: {unexpected:?}",
        twice.len(),
        twice.iter().filter(|(_, differ)| *differ).count(),
    );
    assert!(unexpected.is_empty(), "{unexpected:?}");
    assert_eq!(refused, rounds, "one create of each id is refused");

    // The log holds one KeyCreated per id, the winner's.
    for (id, fp) in &winners {
        assert_eq!(
            count_events(client, &client.subjects().key_created(id)).await,
            1,
            "{id}"
        );
        assert_eq!(logged_fingerprint(client, id).await, Some(*fp), "{id}");
    }
    // Every HSM ends up with the winner's key under each id: no HSM keeps
    // a losing key (it would show as another fingerprint).
    assert_converges(client, &stack.hsm_ids(), &winners, Duration::from_secs(60)).await;
    for h in stack.hsm_ids() {
        let health = client.health(&h).await.expect("health");
        assert_eq!(
            health.outbox, 0,
            "{h} keeps no outbox entry of a lost create"
        );
        assert_eq!(
            health.clones_failed, 0,
            "{h}: no clone failed (a kept losing key makes its clone conflict)"
        );
    }
}

/// With durability `none` the HSM answers before JetStream decides, so both
/// creates may answer `Created`; the loser's key is removed once the log
/// refuses it, and the cluster still ends with one key per id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_durability_none_the_losing_key_is_removed_afterwards() {
    let _heavy = HEAVY.read().await;
    let stack = start_stack(2).await;
    let client = stack.client();
    let (h1, h2) = (hsm("hsm-1"), hsm("hsm-2"));
    let mut ids = Vec::new();
    let mut both_created = 0;
    for _ in 0..10 {
        let id = KeyId::new();
        let op = generate(id, KeyType::Ed25519, Durability::None);
        let mut created = 0;
        for (h, answer) in race(client, &h1, &h2, &op).await {
            match answer {
                Ok(OpReply::Created { .. }) => created += 1,
                Err(Error::KeyIdTaken { .. }) => {}
                other => panic!("the create on {h} answered {other:?}"),
            }
        }
        if created == 2 {
            both_created += 1;
        }
        ids.push(id);
    }
    // The attack was performed: both HSMs made a key under one id.
    assert!(both_created > 0, "no round had both creates answered");
    let mut winners = BTreeMap::new();
    for id in &ids {
        let logged = wait_until(Duration::from_secs(20), || async {
            logged_fingerprint(client, id).await.is_some()
        })
        .await;
        assert!(logged, "{id} was never logged");
        let fp = logged_fingerprint(client, id).await.expect("logged");
        assert_eq!(
            count_events(client, &client.subjects().key_created(id)).await,
            1
        );
        winners.insert(*id, fp);
    }
    assert_converges(client, &stack.hsm_ids(), &winners, Duration::from_secs(60)).await;
}

/// A deleted key's id stays taken: an HSM that never held the key (it
/// joined after the delete, so it has no tombstone) cannot create a new key
/// under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_keys_id_cannot_be_created_again() {
    let _heavy = HEAVY.read().await;
    let mut stack = start_stack(2).await;
    let key = create(stack.client(), KeyType::Ed25519, &hsm("hsm-1")).await;
    let id = key.info.key_id;
    stack
        .client()
        .delete_key(id, &Route::Hsm(hsm("hsm-1")))
        .await
        .expect("delete");
    let client = stack.client().clone();
    let erased = wait_until(Duration::from_secs(20), || async {
        for h in [hsm("hsm-1"), hsm("hsm-2")] {
            if inventory(&client, &h).await.contains_key(&id) {
                return false;
            }
        }
        count_events(&client, &client.subjects().key_created(&id)).await == 0
    })
    .await;
    assert!(erased, "the delete did not complete");

    let fresh = hsm("hsm-3");
    stack
        .start_agents(std::slice::from_ref(&fresh))
        .await
        .expect("hsm-3 starts");
    stack.wait_for_members(3).await.expect("hsm-3 is a member");
    let answer = client
        .request(
            &Route::Hsm(fresh.clone()),
            generate(id, KeyType::Ed25519, Durability::Logged),
        )
        .await;
    // The attack was performed: hsm-3 answered the create.
    match answer {
        Err(Error::KeyIdTaken { key_id, .. }) => assert_eq!(key_id, id),
        other => panic!("a create under a deleted key's id answered {other:?}"),
    }
    assert!(
        !inventory(&client, &fresh).await.contains_key(&id),
        "hsm-3 keeps the refused key"
    );
    assert_eq!(
        count_events(&client, &client.subjects().key_created(&id)).await,
        0,
        "the deleted key's created subject stays empty"
    );
    assert_eq!(client.health(&fresh).await.expect("health").outbox, 0);
}

/// The expectation must not refuse our own event: a `KeyCreated` stored
/// and then published again from the outbox (the agent died between the
/// PubAck and forgetting the entry) is refused by a single-node server,
/// which checks the expectation before de-duplication; the agent must see
/// that the log holds its own event, keep its key and forget the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_own_key_created_published_again_is_recognised_as_logged() {
    let _heavy = HEAVY.read().await;
    let mut stack = start_stack(2).await;
    let client = stack.client().clone();
    let h1 = hsm("hsm-1");
    let key = create(&client, KeyType::Ed25519, &h1).await;
    let id = key.info.key_id;
    let drained = wait_until(Duration::from_secs(10), || async {
        client.health(&h1).await.is_ok_and(|h| h.outbox == 0)
    })
    .await;
    assert!(drained, "the outbox never drained");
    let js = async_nats::jetstream::new(client.nats().clone());
    let logged = js
        .get_stream(client.subjects().events_stream())
        .await
        .expect("events stream")
        .direct_get_last_for_subject(client.subjects().key_created(&id))
        .await
        .expect("the KeyCreated");

    // Put the logged event back into hsm-1's outbox while it is down.
    stack.kill_agent(&h1);
    {
        let db = redb::Database::open(stack.dir().join("hsm-1/keystore.redb")).expect("open store");
        let txn = db.begin_write().expect("txn");
        {
            let table: redb::TableDefinition<u128, &[u8]> = redb::TableDefinition::new("outbox");
            let mut outbox = txn.open_table(table).expect("outbox table");
            outbox
                .insert(id.0.as_u128(), logged.payload.as_ref())
                .expect("insert");
        }
        txn.commit().expect("commit");
    }
    stack
        .start_agents(std::slice::from_ref(&h1))
        .await
        .expect("restart");
    assert_eq!(client.health(&h1).await.expect("health").outbox, 1);

    let drained = wait_until(Duration::from_secs(20), || async {
        client.health(&h1).await.is_ok_and(|h| h.outbox == 0)
    })
    .await;
    assert!(drained, "the republished KeyCreated was never settled");
    let log = std::fs::read_to_string(stack.dir().join("logs/hsm-1.log")).expect("log");
    assert!(
        log.contains("KeyCreated refused as already logged"),
        "the republish was refused and recognised (the path under test)"
    );
    assert!(
        !log.contains("key id is taken"),
        "hsm-1 judged its own key lost"
    );
    assert_eq!(
        inventory(&client, &h1).await.get(&id),
        Some(&key.info.fingerprint),
        "hsm-1 keeps its key"
    );
    assert_eq!(
        count_events(&client, &client.subjects().key_created(&id)).await,
        1
    );
}

/// "Duplicate" only says that some message had the id. Junk stored first
/// under the `Nats-Msg-Id` of an agent's `KeyCreated` (whoever learnt the
/// id: here it is planted while the agent is down) made the agent take the
/// duplicate answer as "logged" and forget its outbox entry: the key was
/// never logged and never reached another HSM. The agent must read the log
/// back, keep the entry, and log the key once the id can be stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_under_a_key_createds_message_id_does_not_pass_for_it() {
    use hsm_agent::keystore::{embedded::EmbeddedKeystore, KeySource, Keystore, NewKey};
    use keysync_schemas::{encode, Envelope, KeyCreated, Source};

    let _heavy = HEAVY.read().await;
    let mut stack = start_stack(2).await;
    let client = stack.client().clone();
    let (h1, h2) = (hsm("hsm-1"), hsm("hsm-2"));

    // A key made on hsm-1 while it is down, its KeyCreated in the outbox
    // (as if the agent died before publishing it).
    stack.kill_agent(&h1);
    let domain =
        keysync_security::domain_key::DomainKey::load(stack.domain_key()).expect("domain key");
    let store = EmbeddedKeystore::open(&stack.dir().join("hsm-1"), h1.clone(), domain)
        .expect("hsm-1's keystore");
    let mut msg_id = None;
    let created = store
        .create(
            NewKey {
                id: KeyId::new(),
                key_type: KeyType::Ed25519,
                session: false,
                attributes: KeyAttributes::default(),
                source: KeySource::Generate,
            },
            &mut |c| {
                let env = Envelope::new(
                    Source::Hsm(h1.clone()),
                    Event::KeyCreated(KeyCreated {
                        key_id: c.info.key_id,
                        key_type: c.info.key_type,
                        fingerprint: c.info.fingerprint,
                        hsm: h1.clone(),
                        origin: c.origin,
                        attributes: c.info.attributes.clone(),
                        durability: Durability::Logged,
                        domain: c.domain,
                        wrapped: c.wrapped.clone(),
                        public_key: c.public_key.clone(),
                    }),
                );
                msg_id = Some(env.id.to_string());
                encode(&env).map_err(|e| e.to_string())
            },
        )
        .expect("create");
    drop(store);
    let id = created.info.key_id;
    let msg_id = msg_id.expect("the event's id");

    // The attack: junk stored first under that id, on another subject.
    let js = async_nats::jetstream::new(client.nats().clone());
    let mut h = async_nats::HeaderMap::new();
    h.insert(keysync_schemas::headers::MSG_ID, msg_id.as_str());
    js.publish_with_headers("keysync.evt.hsm.nobody.joined", h, "junk".into())
        .await
        .expect("publish")
        .await
        .expect("the junk is stored");

    stack
        .start_agents(std::slice::from_ref(&h1))
        .await
        .expect("hsm-1 restarts");
    // Its outbox publishes the entry (after a 5 s grace) and is answered
    // "duplicate"; the entry must stay, the key unlogged.
    let log = stack.dir().join("logs/hsm-1.log");
    // Published once its 5 s grace is over: then either forgotten (the
    // duplicate taken for its own) or read back and kept.
    let answered = wait_until(Duration::from_secs(30), || async {
        let read_back =
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("answered as a duplicate"));
        read_back || client.health(&h1).await.is_ok_and(|h| h.outbox == 0)
    })
    .await;
    assert!(answered, "hsm-1 never published its outbox entry");
    assert_eq!(
        client.health(&h1).await.expect("health").outbox,
        1,
        "hsm-1 took the duplicate answer for its own KeyCreated and forgot it, unlogged (the log holds {} created)",
        count_events(&client, &client.subjects().key_created(&id)).await
    );

    // Once JetStream forgets the id (its duplicate window made short
    // here), the next outbox round logs the key and it reaches hsm-2.
    let mut stream = js
        .get_stream(client.subjects().events_stream())
        .await
        .expect("events stream");
    let mut config = stream.info().await.expect("info").config.clone();
    config.duplicate_window = Duration::from_secs(1);
    js.update_stream(&config)
        .await
        .expect("shorter duplicate window");
    let expected = BTreeMap::from([(id, created.info.fingerprint)]);
    assert_converges(&client, &[h1, h2], &expected, Duration::from_secs(60)).await;
    assert_eq!(
        count_events(&client, &client.subjects().key_created(&id)).await,
        1
    );
}
