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
async fn the_grafana_dashboard_queries_metrics_the_orchestrator_and_agents_serve() {
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
    // Counters and histograms only: a dashboard shows their rates and
    // quantiles, never a raw running total.
    for e in &exprs {
        let raw_counter = e.contains("_total") && !e.contains("rate(");
        let raw_histogram = e.contains("_bucket") && !e.contains("histogram_quantile(");
        assert!(
            !raw_counter && !raw_histogram,
            "not a rate or quantile: {e}"
        );
    }

    let (mut stack, port) = keysync_testkit::start_stack_with_metrics(2).await;
    let agent_port = keysync_harness::free_port().expect("port");
    let first = stack.hsm_ids()[0].clone();
    stack
        .start_agents_with(
            std::slice::from_ref(&first),
            &["--metrics-addr".into(), format!("127.0.0.1:{agent_port}")],
        )
        .await
        .expect("agent restarted with --metrics-addr");
    let client = stack.client().clone();
    create(&client, KeyType::P256, &first).await;
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
    // Served: a sample of it, or (a family with no sample yet) its type.
    let serves = |body: &str, n: &str| {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| n.strip_suffix(s))
            .unwrap_or(n);
        body.contains(&format!("\n{n}")) || body.contains(&format!("# TYPE {family} "))
    };
    let missing = || async {
        let orchestrator = keysync_testkit::http_get(port, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        let agent = keysync_testkit::http_get(agent_port, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        names
            .iter()
            .filter(|n| {
                let body = if n.starts_with("keysync_agent_") {
                    &agent
                } else {
                    &orchestrator
                };
                !serves(body, n)
            })
            .cloned()
            .collect::<Vec<_>>()
    };
    let served = keysync_testkit::wait_until(Duration::from_secs(10), || async {
        missing().await.is_empty()
    })
    .await;
    assert!(
        served,
        "the dashboard queries metrics not served: {:?}",
        missing().await
    );
}
