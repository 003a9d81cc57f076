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
