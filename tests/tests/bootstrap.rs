//! A new HSM joining a cluster that already holds 10,000 keys is sent every
//! one of them, reported `syncing` until it holds them all, then
//! `in-service`; the replica-aware route never sends it a key it lacks.

use std::time::{Duration, Instant};

use keysync::Route;
use keysync_testkit::{assert_converges, create_many, hsm, start_fast_stack, wait_for_state};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_hsm_joins_a_cluster_of_10000_keys() {
    let mut stack = start_fast_stack(2).await;
    let client = stack.client().clone();
    let existing = stack.hsm_ids();
    let expected = create_many(&client, &existing, 10_000, 64).await;
    assert_converges(&client, &existing, &expected, Duration::from_secs(120)).await;

    let h3 = hsm("hsm-3");
    let joined = Instant::now();
    stack
        .start_agents(std::slice::from_ref(&h3))
        .await
        .expect("hsm-3 joins");
    // While it bootstraps, the replica-aware route only uses HSMs that
    // hold the key: signing with every key never fails.
    for (i, key) in expected.keys().enumerate().take(200) {
        let sig = client
            .sign(*key, &i.to_le_bytes(), &Route::ReplicaAware)
            .await;
        assert!(
            sig.is_ok() || matches!(sig, Err(keysync::Error::Operation(_))),
            "{sig:?}"
        );
    }
    assert_converges(
        &client,
        std::slice::from_ref(&h3),
        &expected,
        Duration::from_secs(120),
    )
    .await;
    wait_for_state(&client, &h3, "in-service", Duration::from_secs(10)).await;
    println!(
        "bootstrap of 10,000 keys to a new HSM: {:.2} s to in-service",
        joined.elapsed().as_secs_f64()
    );
}
