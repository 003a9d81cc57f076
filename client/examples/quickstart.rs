//! The keysync SDK in one program: connect, create a key with a durability
//! level, sign with each route, and read the live sync metrics.
//!
//! ```sh
//! cargo build --workspace --bins --examples
//! target/debug/examples/quickstart                        # starts its own local stack
//! target/debug/examples/quickstart nats://127.0.0.1:4222  # or uses a running cluster
//! ```

use keysync::{Client, CreateKey, Route};
use keysync_harness::{DevStack, StackOptions};
use keysync_schemas::{Durability, KeyType};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // A cluster to talk to: the one named on the command line, or a local
    // stack of real processes (nats-server, orchestrator, three agents).
    let (_stack, url) = match std::env::args().nth(1) {
        Some(url) => (None, url),
        None => {
            let stack = DevStack::start(StackOptions::default()).await?;
            let url = stack.url();
            (Some(stack), url)
        }
    };

    // Connect. The client watches key events (for replica-aware routing)
    // and the orchestrator's metrics (to size its retries).
    let client = Client::connect(&url).await?;

    // Create: returns once two HSMs hold the key.
    let key = client
        .create_key(CreateKey::new(KeyType::P256).durability(Durability::Replicas(2)))
        .await?;
    println!(
        "created {} on {}; held by {:?}",
        key.info.key_id, key.info.hsm, key.holders
    );

    // Sign along each route.
    let message = b"transfer 10 to bob";
    for route in [
        Route::Hsm(key.holders[key.holders.len() - 1].clone()),
        Route::ReplicaAware,
        Route::Any,
    ] {
        let signature = client.sign(key.info.key_id, message, &route).await?;
        let ok = client
            .verify(key.info.key_id, message, &signature, &Route::ReplicaAware)
            .await?;
        println!(
            "signed via {route}: {} bytes, verifies: {ok}",
            signature.len()
        );
        anyhow::ensure!(ok, "signature via {route} did not verify");
    }

    // Watch metrics: the next document the orchestrator publishes.
    let mut metrics = client.metrics_receiver();
    metrics.changed().await?;
    if let Some(m) = metrics.borrow().clone() {
        println!(
            "metrics: {} keys on {} HSMs, sync latency p99 {:.2} ms, {} clones pending",
            m.keys, m.members, m.sync_latency_total.p99_ms, m.pending_clones
        );
    }
    Ok(())
}
