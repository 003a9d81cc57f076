//! Every nats-server config in `deploy/` runs a working cluster.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use keysync_schemas::KeyType;
use keysync_testkit::{assert_converges, create, DevStack, StackOptions};

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let stack = DevStack::start(StackOptions {
        hsms: 2,
        orchestrator_metrics_addr: Some(format!("127.0.0.1:{port}").parse().expect("addr")),
        ..Default::default()
    })
    .await
    .expect("stack");
    let client = stack.client().clone();
    create(&client, KeyType::P256, &stack.hsm_ids()[0]).await;
    let scrape = || async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
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
