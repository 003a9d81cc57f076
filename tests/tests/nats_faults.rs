//! NATS itself failing: a single nats-server restarted mid-load (file
//! store), and one node of a three-node JetStream cluster (R3 streams)
//! killed mid-load. Nothing is lost, and every HSM ends with the same keys.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use keysync::Client;
use keysync_schemas::{Fingerprint, HsmId, KeyId};
use keysync_testkit::{
    assert_same_everywhere, create_many, create_many_counted, fast_options, wait_until, DevStack,
    Progress,
};

type Load = tokio::task::JoinHandle<BTreeMap<KeyId, Fingerprint>>;

/// `n` creates in the background, 16 at a time, counted as they go.
fn start_load(client: &Client, hsms: &[HsmId], n: usize) -> (Load, Progress) {
    let progress = Progress::default();
    let load = {
        let client = client.clone();
        let hsms = hsms.to_vec();
        let progress = progress.clone();
        tokio::spawn(async move { create_many_counted(&client, &hsms, n, 16, &progress).await })
    };
    (load, progress)
}

/// Waits until a load has created `n` keys: the fault that follows is
/// then staged while the load runs, not before it starts.
async fn wait_for_progress(progress: &Progress, n: usize) {
    assert!(
        wait_until(Duration::from_secs(60), || async {
            progress.created() >= n
        })
        .await,
        "the load made only {} creates",
        progress.created()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restarted_mid_load_loses_nothing() {
    let mut stack = DevStack::start(fast_options(3)).await.expect("stack");
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();
    let mut created = create_many(&client, &hsms, 300, 16).await;
    let (load, progress) = start_load(&client, &hsms, 600);
    wait_for_progress(&progress, 100).await;
    stack.nats().kill();
    let at_kill = progress.created();
    // Down until the client has seen it go (not a fixed pause).
    assert!(
        wait_until(Duration::from_secs(10), || async {
            client.nats().connection_state() != async_nats::connection::State::Connected
        })
        .await,
        "the client never saw the server go"
    );
    // Read while the server is still down: creates held by the client across
    // the outage (it queues requests until it reconnects rather than failing
    // them, so `retried` may well stay 0) finish only after the restart.
    let before_restart = progress.created();
    stack.nats().restart().await.expect("nats-server restart");
    let during = load.await.expect("load task");
    assert!(
        at_kill < 600,
        "the server was killed after the load had finished ({at_kill} of 600)"
    );
    assert!(
        before_restart < 600,
        "the load finished before the server came back ({before_restart} of 600): the fault missed it"
    );
    eprintln!(
        "created at kill {at_kill}, before the restart {before_restart}, in all {}; retried {}",
        during.len(),
        progress.retried()
    );
    assert_eq!(during.len(), 600);
    created.extend(during);
    created.extend(create_many(&client, &hsms, 100, 16).await);
    assert!(created.len() >= 1000);
    assert_same_everywhere(&client, &hsms, &created).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_nats_node_of_three_killed_mid_load_loses_nothing() {
    let mut options = fast_options(3);
    options.nats_nodes = 3;
    options.nats_config =
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/cluster-node.conf"));
    let mut stack = DevStack::start(options)
        .await
        .expect("stack on a 3-node NATS cluster");
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();
    let js = async_nats::jetstream::new(client.nats().clone());
    let info = js
        .get_stream(client.subjects().events_stream())
        .await
        .expect("events stream")
        .info()
        .await
        .expect("info")
        .clone();
    assert_eq!(info.config.num_replicas, 3, "R3 on a NATS cluster");

    let mut created = create_many(&client, &hsms, 200, 16).await;
    let (load, progress) = start_load(&client, &hsms, 400);
    wait_for_progress(&progress, 100).await;
    stack.nats_node(1).expect("node 2").kill();
    let at_kill = progress.created();
    let during = load.await.expect("load task");
    assert!(
        at_kill < 400,
        "the node was killed after the load had finished ({at_kill} of 400)"
    );
    assert_eq!(during.len(), 400);
    created.extend(during);
    created.extend(create_many(&client, &hsms, 100, 16).await);
    assert_same_everywhere(&client, &hsms, &created).await;
}
