//! The production layout of `deploy/`, run for real: three nats-server
//! nodes on `deploy/nats/cluster-tls.conf` (TLS for clients and routes
//! with certificates made here by openssl, JWT authentication from
//! `keysync nats init`, `sync_interval: always`, R3 streams), two
//! orchestrators (active and standby) and three agents, each started from
//! a config file alone, as the systemd units start them. Keys are created
//! and synced; one NATS node is killed; keys are still created and synced,
//! and nothing is lost.

use std::time::Duration;

use keysync_testkit::{
    assert_same_everywhere, create_many, on_path, wait_until, DevStack, NatsTrust, StackOptions,
    TlsFiles,
};

/// The command line of a running process.
fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_production_layout_syncs_keys_and_survives_losing_a_nats_node() {
    let temp = tempfile::tempdir().expect("temp dir");
    let Some(tls) = TlsFiles::make(&temp.path().join("tls")) else {
        assert!(std::env::var_os("CI").is_none(), "openssl is missing in CI");
        eprintln!("SKIP: openssl is not installed");
        return;
    };
    assert!(on_path("openssl").is_some());
    let trust = NatsTrust::init(temp.path());
    let opts = StackOptions {
        hsms: 3,
        nats_nodes: 3,
        nats_config: Some(trust.server_config("nats/cluster-tls.conf")),
        nats_env: tls.nats_env(),
        auth: trust.stack_auth(3, Some(&tls)),
        config_files: true,
        standby_orchestrators: vec!["orchestrator-b".into()],
        orchestrator_args: ["--failure-timeout", "3", "--lease-ttl", "1"]
            .map(String::from)
            .to_vec(),
        agent_args: ["--heartbeat-interval", "0.25"].map(String::from).to_vec(),
        ..Default::default()
    };
    let mut stack = DevStack::start(opts)
        .await
        .expect("the production layout starts: 3 TLS+JWT NATS nodes, 2 orchestrators, 3 agents");
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();

    // Every keysync process runs from its config file: the NATS servers,
    // credentials and identity are in the file, not on the command line.
    let mut pids: Vec<u32> = hsms
        .iter()
        .map(|h| stack.agent(h).expect("agent").pid())
        .collect();
    for name in [keysync_harness::PRIMARY, "orchestrator-b"] {
        pids.push(stack.orchestrator(name).expect("orchestrator").pid());
    }
    for pid in pids {
        let args = cmdline(pid);
        assert!(args.iter().any(|a| a == "--config"), "{args:?}");
        for flag in [
            "--nats",
            "--nats-creds",
            "--identity",
            "--nats-tls-ca",
            "--domain-key",
        ] {
            assert!(
                !args.iter().any(|a| a == flag),
                "{flag} on the command line: {args:?}"
            );
        }
    }
    // The bus admits no one without both a certificate of the CA and a
    // JWT of the trust chain.
    let first = stack.url().split(',').next().expect("a node").to_string();
    let without_tls = keysync_security::NatsAuth {
        nats_creds: Some(trust.creds("client")),
        ..Default::default()
    };
    let without_jwt = keysync_security::NatsAuth {
        nats_tls_ca: Some(tls.ca.clone()),
        nats_tls_cert: Some(tls.client_cert.clone()),
        nats_tls_key: Some(tls.client_key.clone()),
        ..Default::default()
    };
    for (what, auth) in [("no TLS", without_tls), ("no JWT", without_jwt)] {
        let connected = auth
            .apply(async_nats::ConnectOptions::new())
            .await
            .expect("options")
            .connection_timeout(Duration::from_secs(3))
            .connect(first.as_str())
            .await;
        assert!(connected.is_err(), "a client with {what} connected");
    }
    let with_both = trust
        .role_auth(trust.creds("client"), Some(&tls))
        .apply(async_nats::ConnectOptions::new())
        .await
        .expect("options")
        .connect(first.as_str())
        .await;
    assert!(
        with_both.is_ok(),
        "the client role cannot connect: {with_both:?}"
    );

    // The streams are R3 on the three nodes.
    let js = async_nats::jetstream::new(client.nats().clone());
    let mut events = js
        .get_stream("KEYSYNC_EVENTS")
        .await
        .expect("events stream");
    let info = events.info().await.expect("stream info");
    assert_eq!(info.config.num_replicas, 3);
    let cluster = info.cluster.clone().expect("clustered");
    assert_eq!(cluster.replicas.len() + 1, 3, "{cluster:?}");

    let mut created = create_many(&client, &hsms, 60, 8).await;
    assert_same_everywhere(&client, &hsms, &created).await;

    // Kill the node that leads the events stream's group (the hardest one
    // to lose), and check it is gone.
    let leader = cluster.leader.clone().expect("a leader");
    let index = match leader.as_str() {
        "n1" => 0,
        "n2" => 1,
        "n3" => 2,
        other => panic!("unexpected leader {other}"),
    };
    let node = stack.nats_node(index).expect("node");
    let port = node.port();
    node.kill();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "NATS node {leader} still accepts connections"
    );
    // The stream elects another leader among the two left.
    let moved = wait_until(Duration::from_secs(30), || async {
        let mut events = match js.get_stream("KEYSYNC_EVENTS").await {
            Ok(s) => s,
            Err(_) => return false,
        };
        events
            .info()
            .await
            .ok()
            .and_then(|i| i.cluster.clone())
            .and_then(|c| c.leader)
            .is_some_and(|l| l != leader)
    })
    .await;
    assert!(moved, "the events stream did not get a new leader");

    // Keys are still created (transient failures retried) and synced, and
    // every key from before is still everywhere.
    let after = create_many(&client, &hsms, 60, 8).await;
    assert_eq!(after.len(), 60);
    created.extend(after);
    assert_same_everywhere(&client, &hsms, &created).await;
    let status = client.cluster_status().await.expect("status");
    assert_eq!(status.keys as usize, created.len(), "{status:?}");
    stack.shutdown().await;
}
