//! Membership and faults on real processes, killed with SIGKILL. Every
//! scenario ends with every live HSM holding exactly the same live keys
//! with the same fingerprints: nothing lost, nothing resurrected.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keysync::{CreateKey, Route};
use keysync_schemas::{Durability, KeyType};
use keysync_testkit::{
    assert_converges, count_events, create, create_many, hsm, inventory, next_metrics,
    start_fast_stack, wait_for_heartbeats, wait_for_state, wait_until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hsm_down_while_2000_keys_are_created_catches_up_on_return() {
    let mut stack = start_fast_stack(3).await;
    let client = stack.client().clone();
    let (h1, h2, h3) = (hsm("hsm-1"), hsm("hsm-2"), hsm("hsm-3"));
    stack.kill_agent(&h3);
    wait_for_state(&client, &h3, "failed", Duration::from_secs(10)).await;

    let expected = create_many(&client, &[h1.clone(), h2.clone()], 2000, 32).await;
    // With hsm-3 failed, `all` means the live members.
    let k = client
        .create_key(
            CreateKey::new(KeyType::P256)
                .on(Route::Hsm(h1.clone()))
                .durability(Durability::All),
        )
        .await
        .expect("`all` completes without the failed member");
    assert_eq!(k.holders, vec![h1.clone(), h2.clone()]);
    let mut expected = expected;
    expected.insert(k.info.key_id, k.info.fingerprint);
    assert_converges(
        &client,
        &[h1.clone(), h2.clone()],
        &expected,
        Duration::from_secs(60),
    )
    .await;
    let status = client.cluster_status().await.expect("status");
    let down = status
        .members
        .iter()
        .find(|m| m.hsm_id == h3)
        .expect("hsm-3");
    assert_eq!(down.lag, 2001, "{down:?}");

    let back = Instant::now();
    stack
        .start_agents(std::slice::from_ref(&h3))
        .await
        .expect("restart hsm-3");
    assert_converges(
        &client,
        std::slice::from_ref(&h3),
        &expected,
        Duration::from_secs(120),
    )
    .await;
    println!(
        "rejoin catch-up of 2001 keys: {:.2} s",
        back.elapsed().as_secs_f64()
    );
    wait_for_state(&client, &h3, "in-service", Duration::from_secs(10)).await;
    assert_converges(
        &client,
        &stack.hsm_ids(),
        &expected,
        Duration::from_secs(10),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_killed_mid_fan_out_resumes_and_does_nothing_twice() {
    let mut stack = start_fast_stack(3).await;
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();
    let first = create_many(&client, &hsms, 500, 32).await;
    // Mid fan-out: creates are still being cloned when it dies.
    stack.kill_orchestrator();
    let second = create_many(&client, &hsms, 300, 32).await;
    stack
        .start_orchestrator()
        .await
        .expect("orchestrator restart");
    let third = create_many(&client, &hsms, 200, 32).await;
    let mut expected = first;
    expected.extend(second);
    expected.extend(third);
    assert_eq!(expected.len(), 1000);
    assert_converges(&client, &hsms, &expected, Duration::from_secs(60)).await;
    assert!(
        wait_until(Duration::from_secs(20), || async {
            count_events(&client, "keysync.evt.key.*.replicated").await == 1000
        })
        .await,
        "every key announced replicated"
    );
    // Exactly one clone per key and other HSM, and one announcement per key:
    // the restart re-sent commands under the same message ids, which
    // JetStream dropped as duplicates.
    assert_eq!(keysync_testkit::count_clones_applied(&client).await, 2000);
    assert_eq!(
        count_events(&client, "keysync.evt.key.*.replicated").await,
        1000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_orchestrator_takes_over_within_the_lease_time() {
    let mut stack = start_fast_stack(3).await;
    let client = stack.client().clone();
    stack
        .start_orchestrator_named("orchestrator-b")
        .await
        .expect("standby");
    let mut expected = create_many(&client, &stack.hsm_ids(), 100, 16).await;
    assert_eq!(next_metrics(&client).await["orchestrator"], "orchestrator");

    stack.kill_orchestrator();
    let killed = Instant::now();
    let k = client
        .create_key(
            CreateKey::new(KeyType::Ed25519)
                .on(Route::Hsm(hsm("hsm-2")))
                .durability(Durability::All),
        )
        .await
        .expect("replicated through the standby");
    let failover = killed.elapsed();
    println!(
        "failover: a key created at the kill was on every HSM after {:.2} s (lease 1 s)",
        failover.as_secs_f64()
    );
    assert!(failover < Duration::from_secs(5), "{failover:?}");
    expected.insert(k.info.key_id, k.info.fingerprint);
    assert_eq!(
        next_metrics(&client).await["orchestrator"],
        "orchestrator-b"
    );
    assert_converges(
        &client,
        &stack.hsm_ids(),
        &expected,
        Duration::from_secs(30),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_deleted_while_an_hsm_is_down_never_comes_back() {
    let mut stack = start_fast_stack(3).await;
    let client = stack.client().clone();
    let (h1, h3) = (hsm("hsm-1"), hsm("hsm-3"));
    let doomed = client
        .create_key(
            CreateKey::new(KeyType::P256)
                .on(Route::Hsm(h1.clone()))
                .durability(Durability::All),
        )
        .await
        .expect("create");
    let kept = create(&client, KeyType::Ed25519, &h1).await;
    let mut expected = BTreeMap::from([(kept.info.key_id, kept.info.fingerprint)]);
    let mut before = expected.clone();
    before.insert(doomed.info.key_id, doomed.info.fingerprint);
    assert_converges(&client, &stack.hsm_ids(), &before, Duration::from_secs(20)).await;

    stack.kill_agent(&h3);
    wait_for_state(&client, &h3, "failed", Duration::from_secs(10)).await;
    client
        .delete_key(doomed.info.key_id, &Route::Hsm(hsm("hsm-2")))
        .await
        .expect("delete");
    assert_converges(
        &client,
        &[h1.clone(), hsm("hsm-2")],
        &expected,
        Duration::from_secs(20),
    )
    .await;
    // Crypto-shredding: the wrapped material is gone from the stream.
    let created_subject = client.subjects().key_created(&doomed.info.key_id);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            count_events(&client, &created_subject).await == 0
        })
        .await,
        "the deleted key's KeyCreated is still in the stream"
    );

    // hsm-3 comes back holding the deleted key: its queued DeleteKey erases it.
    stack
        .start_agents(std::slice::from_ref(&h3))
        .await
        .expect("restart");
    assert_converges(
        &client,
        &stack.hsm_ids(),
        &expected,
        Duration::from_secs(20),
    )
    .await;
    // And it stays gone through several anti-entropy rounds and more keys:
    // each heartbeat is one round for hsm-3, and the orchestrator repairs
    // after 3 differing ones in a row (`--repair-after`), so 8 are enough
    // for a repair to have brought the key back if it were going to.
    let k = create(&client, KeyType::Aes256, &h3).await;
    expected.insert(k.info.key_id, k.info.fingerprint);
    wait_for_heartbeats(&client, &h3, 8, Duration::from_secs(20)).await;
    assert_converges(
        &client,
        &stack.hsm_ids(),
        &expected,
        Duration::from_secs(20),
    )
    .await;
    let err = client
        .sign(doomed.info.key_id, b"x", &Route::Hsm(h3))
        .await
        .expect_err("deleted");
    assert!(matches!(err, keysync::Error::KeyNotFound { .. }), "{err}");
    assert_eq!(client.cluster_status().await.expect("status").keys, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_repairs_a_key_lost_behind_an_agents_back() {
    let mut stack = start_fast_stack(3).await;
    let client = stack.client().clone();
    let h2 = hsm("hsm-2");
    let expected = create_many(&client, &stack.hsm_ids(), 20, 8).await;
    assert_converges(
        &client,
        &stack.hsm_ids(),
        &expected,
        Duration::from_secs(20),
    )
    .await;

    // Lose one key from hsm-2's database while it is down, as a disk would.
    stack.kill_agent(&h2);
    let (lost, _) = expected.iter().next().expect("a key");
    {
        let db = redb::Database::open(stack.dir().join("hsm-2/keystore.redb")).expect("open store");
        let txn = db.begin_write().expect("txn");
        {
            let table: redb::TableDefinition<u128, &[u8]> = redb::TableDefinition::new("keys");
            let mut keys = txn.open_table(table).expect("keys table");
            assert!(keys.remove(lost.0.as_u128()).expect("remove").is_some());
        }
        txn.commit().expect("commit");
    }
    stack
        .start_agents(std::slice::from_ref(&h2))
        .await
        .expect("restart");
    assert_eq!(inventory(&client, &h2).await.len(), 19);

    assert_converges(&client, &[h2], &expected, Duration::from_secs(20)).await;
    let repaired = wait_until(Duration::from_secs(10), || async {
        next_metrics(&client).await["repairs_total"].as_u64() >= Some(1)
    })
    .await;
    assert!(repaired, "the repair is not visible in the metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_orchestrator_resumes_from_its_snapshot_plus_the_log_tail() {
    let mut options = keysync_testkit::fast_options(3);
    options
        .orchestrator_args
        .extend(["--snapshot-every", "100"].map(String::from));
    let mut stack = keysync_testkit::DevStack::start(options)
        .await
        .expect("stack");
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();
    let mut expected = create_many(&client, &hsms, 400, 16).await;
    let js = async_nats::jetstream::new(client.nats().clone());
    let saved = wait_until(Duration::from_secs(30), || async {
        match js
            .get_object_store(client.subjects().snapshot_bucket())
            .await
        {
            Ok(store) => store.info("cluster-state").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(saved, "no snapshot was saved");
    // A tail after the snapshot.
    expected.extend(create_many(&client, &hsms, 50, 16).await);
    assert_converges(&client, &hsms, &expected, Duration::from_secs(30)).await;
    let before = client.cluster_status().await.expect("status");

    stack.kill_orchestrator();
    stack.start_orchestrator().await.expect("restart");
    let log = std::fs::read_to_string(stack.dir().join("logs/orchestrator.log")).expect("log");
    let resumed = log
        .lines()
        .rfind(|l| l.contains("replaying the event log"))
        .expect("a start line");
    assert!(
        !resumed.contains("snapshot_seq=0"),
        "did not start from the snapshot: {resumed}"
    );
    // Status is answered while the new run replays: wait until it has
    // folded everything the old one had.
    assert!(
        keysync_testkit::wait_until(Duration::from_secs(30), || async {
            client
                .cluster_status()
                .await
                .is_ok_and(|s| s.last_seq >= before.last_seq)
        })
        .await
    );
    let after = client.cluster_status().await.expect("status");
    assert_eq!(
        (after.keys, after.replicated, &after.members),
        (before.keys, before.replicated, &before.members)
    );

    expected.extend(create_many(&client, &hsms, 30, 8).await);
    assert_converges(&client, &hsms, &expected, Duration::from_secs(30)).await;
    assert!(
        wait_until(Duration::from_secs(20), || async {
            count_events(&client, "keysync.evt.key.*.replicated").await == 480
        })
        .await
    );
    assert_eq!(keysync_testkit::count_clones_applied(&client).await, 960);
}
