//! Client-side sync: durability levels, replica-aware routing, retries
//! sized from live metrics, and the metrics any NATS client can read.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use keysync::{Client, ClientOptions, CreateKey, Error, RetryPolicy, Route};
use keysync_schemas::{Durability, KeyType};
use keysync_testkit::{assert_converges, hsm, random_index, start_stack, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logged_keys_survive_their_creator_killed_right_after_the_last_reply() {
    let mut stack = start_stack(3).await;
    let client = stack.client().clone();
    let h1 = hsm("hsm-1");
    let mut expected = BTreeMap::new();
    let mut creates = futures::stream::iter(0..100)
        .map(|i| {
            let client = client.clone();
            let spec = CreateKey::new(KeyType::ALL[i % 4]).on(Route::Hsm(h1.clone()));
            async move { client.create_key(spec).await }
        })
        .buffer_unordered(8);
    while let Some(k) = creates.next().await {
        let k = k.expect("logged create");
        assert_eq!(k.durability, Durability::Logged);
        expected.insert(k.info.key_id, k.info.fingerprint);
    }
    stack.kill_agent(&h1);
    assert_converges(
        &client,
        &[hsm("hsm-2"), hsm("hsm-3")],
        &expected,
        Duration::from_secs(30),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_2_means_two_hsms_hold_the_key_when_create_returns() {
    let stack = start_stack(3).await;
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();
    for i in 0..100 {
        let on = hsms[random_index(3)].clone();
        let k = client
            .create_key(
                CreateKey::new(KeyType::ALL[i % 4])
                    .on(Route::Hsm(on))
                    .durability(Durability::Replicas(2)),
            )
            .await
            .expect("replicas:2 create");
        assert_eq!(k.durability, Durability::Replicas(2));
        assert!(k.holders.len() >= 2, "{:?}", k.holders);
        let mut holding = 0;
        for h in &hsms {
            if client
                .key_info(k.info.key_id, &Route::Hsm(h.clone()))
                .await
                .is_ok()
            {
                holding += 1;
            }
        }
        assert!(
            holding >= 2,
            "create {i}: only {holding} HSM(s) hold the key on return"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_and_unmet_durability_are_distinct_errors() {
    let mut stack = start_stack(3).await;
    let client = stack.client().clone();
    let started = std::time::Instant::now();
    let err = client
        .create_key(CreateKey::new(KeyType::P256).durability(Durability::Replicas(4)))
        .await
        .expect_err("more replicas than HSMs");
    assert!(matches!(err, Error::BadRequest(_)), "{err}");
    assert!(
        err.to_string()
            .contains("more HSMs than the cluster has (3)"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "no hang");

    // One member down (no failure detection yet: it is still a member), so
    // `all` cannot be met in time; the error says who holds the key.
    stack.kill_agent(&hsm("hsm-3"));
    let mut spec = CreateKey::new(KeyType::Ed25519)
        .on(Route::Hsm(hsm("hsm-1")))
        .durability(Durability::All);
    spec.durability_timeout = Duration::from_millis(1500);
    match client.create_key(spec).await {
        Err(Error::BelowDurability {
            wanted, holders, ..
        }) => {
            assert_eq!(wanted, Durability::All);
            assert_eq!(holders, vec![hsm("hsm-1"), hsm("hsm-2")]);
        }
        other => panic!("expected BelowDurability, got {other:?}"),
    }
}

/// Creates with durability `none` and signs at once, `cycles` times, along
/// `route`; returns how many signs failed.
async fn create_then_sign(
    client: &Client,
    hsms: &[keysync_schemas::HsmId],
    route: Route,
    cycles: usize,
) -> usize {
    let mut failures = 0;
    for i in 0..cycles {
        let k = client
            .create_key(
                CreateKey::new(KeyType::Ed25519)
                    .on(Route::Hsm(hsms[i % hsms.len()].clone()))
                    .durability(Durability::None),
            )
            .await
            .expect("create");
        if client.sign(k.info.key_id, b"m", &route).await.is_err() {
            failures += 1;
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_then_sign_at_once_never_fails_replica_aware_or_with_retries() {
    let stack = start_stack(3).await;
    let hsms = stack.hsm_ids();
    let url = stack.url();
    let with_retries = Client::connect(&url).await.expect("client");
    let without_retries = Client::connect_with(
        &url,
        ClientOptions {
            retry: RetryPolicy::none(),
            ..Default::default()
        },
    )
    .await
    .expect("client");

    let replica_aware = create_then_sign(&without_retries, &hsms, Route::ReplicaAware, 1000).await;
    let any_no_retry = create_then_sign(&without_retries, &hsms, Route::Any, 1000).await;
    let any_retry = create_then_sign(&with_retries, &hsms, Route::Any, 1000).await;
    println!(
        "create(none)+sign, 1000 cycles: replica-aware {replica_aware} failures; any HSM without retries {any_no_retry}; any HSM with retries {any_retry}"
    );
    assert_eq!(replica_aware, 0);
    assert_eq!(any_retry, 0);
    // Without retries the any-HSM route shows the CloudHSM experience.
    assert!(
        any_no_retry > 0,
        "the any-HSM route never missed a fresh key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_nats_subscriber_reads_the_metrics_and_sees_them_move() {
    let stack = start_stack(3).await;
    // Not the SDK: a bare NATS connection and untyped JSON.
    let nats = async_nats::connect(stack.url()).await.expect("nats");
    let mut sub = nats.subscribe("keysync.metrics.sync").await.expect("sub");
    nats.flush().await.expect("flush");
    let first: serde_json::Value =
        serde_json::from_slice(&sub.next().await.expect("a document").payload).expect("JSON");
    assert_eq!(first["version"], 1);
    assert_eq!(first["members"], 3);
    let before = first["replicated_total"]
        .as_u64()
        .expect("replicated_total");

    let client = stack.client().clone();
    for i in 0..20 {
        client
            .create_key(CreateKey::new(KeyType::ALL[i % 4]).on(Route::Hsm(hsm("hsm-2"))))
            .await
            .expect("create");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let doc = loop {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .expect("metrics keep coming")
            .expect("subscription open");
        let doc: serde_json::Value = serde_json::from_slice(&msg.payload).expect("JSON");
        if doc["replicated_total"].as_u64() == Some(before + 20) {
            break doc;
        }
    };
    assert_eq!(doc["keys"], 20);
    assert_eq!(doc["pending_clones"], 0);
    assert!(doc["sync_latency_total"]["count"].as_u64() >= Some(20));
    assert!(doc["sync_latency_total"]["p99_ms"].as_f64() > Some(0.0));
    let hsms = doc["hsms"].as_array().expect("hsms");
    assert_eq!(hsms.len(), 3);
    for h in hsms {
        assert_eq!(h["keys"], 20);
        assert_eq!(h["lag"], 0);
        assert_eq!(h["state"], "in-service");
    }
    // hsm-2 created them all; the others cloned them.
    let hsm1 = hsms.iter().find(|h| h["hsm_id"] == "hsm-1").expect("hsm-1");
    assert!(hsm1["clone_latency_total"]["count"].as_u64() >= Some(20));

    // The SDK sees the same documents and sizes its retry budget from them.
    assert!(
        wait_until(Duration::from_secs(5), || async {
            client.latest_metrics().is_some_and(|m| m.keys == 20)
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_text_is_served_on_the_metrics_address() {
    let (stack, port) = keysync_testkit::start_stack_with_metrics(2).await;
    let client = stack.client().clone();
    client
        .create_key(CreateKey::new(KeyType::P256).durability(Durability::All))
        .await
        .expect("create");
    let scrape = || keysync_testkit::scrape_metrics(port);
    let ok = wait_until(Duration::from_secs(10), || async {
        scrape()
            .await
            .is_some_and(|b| b.contains("keysync_keys_replicated_total 1"))
    })
    .await;
    let body = scrape().await.unwrap_or_default();
    assert!(ok, "{body}");
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    for needle in [
        "keysync_members{state=\"in-service\"} 2",
        "keysync_keys_created_total 1",
        "keysync_pending_clones 0",
        "keysync_hsm_lag{hsm=\"hsm-1\"} 0",
        "keysync_sync_latency_seconds_count 1",
        "keysync_sync_latency_seconds_bucket{le=\"+Inf\"} 1",
    ] {
        assert!(body.contains(needle), "missing {needle} in\n{body}");
    }
}
