//! Every nats-server config in `deploy/` runs a working cluster.

use std::collections::BTreeMap;
use std::time::Duration;

use keysync_schemas::KeyType;
use keysync_testkit::{assert_converges, create, deploy, DevStack, StackOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_config_runs_a_cluster() {
    let stack = DevStack::start(StackOptions {
        hsms: 2,
        nats_config: Some(deploy("nats/single-node.conf")),
        ..Default::default()
    })
    .await
    .expect("stack on deploy/nats/single-node.conf");
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();
    let mut expected = BTreeMap::new();
    for (i, t) in KeyType::ALL.into_iter().enumerate() {
        let k = create(&client, t, &hsms[i % 2]).await;
        expected.insert(k.info.key_id, k.info.fingerprint);
    }
    assert_converges(&client, &hsms, &expected, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_metrics_the_orchestrator_serves() {
    let text =
        std::fs::read_to_string(deploy("grafana/keysync-dashboard.json")).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect();
    assert!(exprs.len() >= 6);
    let names: std::collections::BTreeSet<String> = exprs
        .iter()
        .flat_map(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("keysync_"))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();

    let (stack, port) = keysync_testkit::start_stack_with_metrics(2).await;
    let client = stack.client().clone();
    create(&client, KeyType::P256, &stack.hsm_ids()[0]).await;
    let scrape = || keysync_testkit::scrape_metrics(port);
    // Rejected messages appear once something is rejected.
    client
        .nats()
        .publish(
            client
                .subjects()
                .key_created(&keysync_schemas::KeyId::new()),
            "junk".into(),
        )
        .await
        .expect("publish");
    let served = keysync_testkit::wait_until(Duration::from_secs(10), || async {
        scrape()
            .await
            .is_some_and(|body| names.iter().all(|n| body.contains(&format!("\n{n}"))))
    })
    .await;
    let body = scrape().await.unwrap_or_default();
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !body.contains(&format!("\n{n}")))
        .collect();
    assert!(
        served,
        "the dashboard queries metrics not served: {missing:?}"
    );
}
