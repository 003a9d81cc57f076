//! Per-agent NATS credentials from `keysync nats init`'s trust chain, on a
//! real nats-server: every role works, an agent holding another agent's
//! credentials is refused on that agent's subjects, and `keysync hsm
//! remove` revokes a removed agent's credentials on the server.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keysync_schemas::KeyType;
use keysync_testkit::{
    assert_converges, create, fast_options, hsm, keysync_cli, wait_until, DevStack, NatsTrust,
};

/// A raw connection with `creds` whose server errors (permission
/// violations) are collected.
async fn connect_watching(
    url: &str,
    creds: &std::path::Path,
) -> Result<(async_nats::Client, Arc<Mutex<Vec<String>>>), String> {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let seen = errors.clone();
    let auth = keysync_security::NatsAuth {
        nats_creds: Some(creds.to_path_buf()),
        ..Default::default()
    };
    let client = auth
        .apply(async_nats::ConnectOptions::new())
        .await
        .map_err(|e| e.to_string())?
        .event_callback(move |event| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    if let Ok(mut v) = seen.lock() {
                        v.push(e.to_string());
                    }
                }
            }
        })
        .connect(url)
        .await
        .map_err(|e| e.to_string())?;
    Ok((client, errors))
}

fn violations(errors: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    errors
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.to_lowercase().contains("permissions violation"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_agent_is_confined_to_its_own_subjects_and_a_removed_one_is_revoked() {
    let temp = tempfile::tempdir().expect("temp dir");
    let trust = NatsTrust::init(temp.path());
    let mut opts = fast_options(3);
    opts.nats_config = Some(trust.server_config("nats/single-node-jwt.conf"));
    opts.auth = trust.stack_auth(3, None);
    let mut stack = DevStack::start(opts)
        .await
        .expect("stack on JWT auth: every role and agent logs in with its creds");
    let url = stack.url();
    let hsms = stack.hsm_ids();
    let client = stack.client().clone();

    // Keys made on each HSM reach every other.
    let mut expected = BTreeMap::new();
    for (i, t) in [KeyType::P256, KeyType::Ed25519, KeyType::Aes256]
        .into_iter()
        .enumerate()
    {
        let k = create(&client, t, &hsms[i]).await;
        expected.insert(k.info.key_id, k.info.fingerprint);
    }
    assert_converges(&client, &hsms, &expected, Duration::from_secs(30)).await;

    // hsm-1's credentials: its own subjects work, hsm-2's are refused.
    let (nats, errors) = connect_watching(&url, &trust.agent_creds("hsm-1"))
        .await
        .expect("hsm-1's creds connect");
    let _own = nats
        .subscribe("keysync.hsm.hsm-1.op")
        .await
        .expect("subscribe");
    let _theirs = nats
        .subscribe("keysync.hsm.hsm-2.op")
        .await
        .expect("subscribe request sent");
    let _their_inbox = nats.subscribe("_INBOX.hsm-2.>").await.expect("sent");
    nats.publish("keysync.hsm.hsm-2.heartbeat", "forged".into())
        .await
        .expect("publish sent");
    nats.publish("keysync.evt.hsm.hsm-2.joined", "forged".into())
        .await
        .expect("publish sent");
    nats.flush().await.expect("flush");
    let refused = [
        "Subscription to \"keysync.hsm.hsm-2.op\"",
        "Subscription to \"_INBOX.hsm-2.>\"",
        "Publish to \"keysync.hsm.hsm-2.heartbeat\"",
        "Publish to \"keysync.evt.hsm.hsm-2.joined\"",
    ];
    let all_refused = wait_until(Duration::from_secs(5), || async {
        let v = violations(&errors);
        refused.iter().all(|r| v.iter().any(|e| e.contains(r)))
    })
    .await;
    assert!(
        all_refused,
        "NATS did not refuse hsm-1's creds on hsm-2's subjects: {:?}",
        violations(&errors)
    );
    assert!(
        !violations(&errors)
            .iter()
            .any(|e| e.contains("\"keysync.hsm.hsm-1.op\"")),
        "hsm-1 was refused its own subject: {:?}",
        violations(&errors)
    );

    // A real agent started as hsm-2 with hsm-1's credentials never
    // becomes a member in hsm-2's place: NATS refuses its subscriptions.
    let impostor_dir = temp.path().join("impostor");
    let log = temp.path().join("impostor.log");
    let mut impostor = keysync_harness::process::command(
        &keysync_testkit::find_binary("hsm-agent").expect("hsm-agent"),
    );
    impostor
        .args(["--nats", &url, "--id", "hsm-2", "--data-dir"])
        .arg(&impostor_dir)
        .arg("--domain-key")
        .arg(stack.domain_key())
        .args(["--cluster-key", stack.cluster_key(), "--nats-creds"])
        .arg(trust.agent_creds("hsm-1"))
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(std::fs::File::create(temp.path().join("impostor.err")).expect("log"));
    let mut impostor = impostor.spawn().expect("impostor starts");
    let refused = wait_until(Duration::from_secs(15), || async {
        let text = std::fs::read_to_string(temp.path().join("impostor.err")).unwrap_or_default();
        text.contains("Permissions Violation") && text.contains("keysync.hsm.hsm-2.op")
    })
    .await;
    let _ = impostor.kill();
    let _ = impostor.wait();
    assert!(
        refused,
        "the impostor's subscriptions were not refused; its log:\n{}",
        std::fs::read_to_string(temp.path().join("impostor.err")).unwrap_or_default()
    );

    // Removing hsm-2 with the NATS flags revokes its user on the server:
    // the running agent is disconnected and its creds no longer connect.
    let cluster_identity = stack.cluster_identity().display().to_string();
    let args = [
        "--nats".to_string(),
        url.clone(),
        "--nats-creds".into(),
        trust.creds("operator").display().to_string(),
        "hsm".into(),
        "remove".into(),
        "--id".into(),
        "hsm-2".into(),
        "--identity".into(),
        cluster_identity,
        "--nats-signer".into(),
        trust.signer().display().to_string(),
        "--nats-operator-signer".into(),
        trust.dir.join("operator-signer.nk").display().to_string(),
        "--nats-system-creds".into(),
        trust.creds("sys").display().to_string(),
        "--json".into(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        keysync_cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .expect("cli task");
    assert!(
        out.status.success(),
        "keysync hsm remove: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let removed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(
        removed["nats_user_revoked"]
            .as_str()
            .is_some_and(|u| u.starts_with('U')),
        "{removed}"
    );
    let agent_log = stack
        .agent(&hsm("hsm-2"))
        .expect("hsm-2 started")
        .log()
        .to_path_buf();
    let disconnected = wait_until(Duration::from_secs(10), || async {
        std::fs::read_to_string(&agent_log)
            .unwrap_or_default()
            .contains("authorization violation")
    })
    .await;
    assert!(
        disconnected,
        "the removed agent's connection was not refused"
    );
    let again = connect_watching(&url, &trust.agent_creds("hsm-2")).await;
    assert!(
        again
            .as_ref()
            .err()
            .is_some_and(|e| e.to_lowercase().contains("authorization violation")),
        "a revoked agent's creds still connect: {:?}",
        again.map(|_| ())
    );
    // The others' creds still do, and the cluster still syncs.
    connect_watching(&url, &trust.agent_creds("hsm-3"))
        .await
        .expect("hsm-3's creds still connect");
    let left = vec![hsm("hsm-1"), hsm("hsm-3")];
    let k = create(&client, KeyType::P256, &left[0]).await;
    expected.insert(k.info.key_id, k.info.fingerprint);
    assert_converges(&client, &left, &expected, Duration::from_secs(30)).await;

    // Rotating a role's credentials: mint new ones, revoke the old user.
    let old = trust.creds("auditor");
    let new = trust.dir.join("creds/auditor-2.creds");
    let cli = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            keysync_cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .expect("cli task")
    };
    let out = cli(vec![
        "nats".into(),
        "role-creds".into(),
        "--role".into(),
        "auditor".into(),
        "--account-key".into(),
        trust.dir.join("account.nk").display().to_string(),
        "--out".into(),
        new.display().to_string(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(vec![
        "--nats".into(),
        url.clone(),
        "nats".into(),
        "revoke".into(),
        "--creds".into(),
        old.display().to_string(),
        "--nats-operator-signer".into(),
        trust.dir.join("operator-signer.nk").display().to_string(),
        "--nats-system-creds".into(),
        trust.creds("sys").display().to_string(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        connect_watching(&url, &old).await.is_err(),
        "the old auditor creds still connect"
    );
    connect_watching(&url, &new)
        .await
        .expect("the new auditor creds connect");
    stack.kill_agent(&hsm("hsm-2"));
    stack.shutdown().await;
}

/// The ceremony's first step makes the domain key and the cluster
/// identity, never overwriting either.
#[test]
fn cluster_init_makes_the_domain_key_and_the_cluster_identity() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dk = dir.path().join("domain.key");
    let id = dir.path().join("cluster.key");
    let args = [
        "cluster",
        "init",
        "--domain-key-out",
        dk.to_str().expect("utf-8"),
        "--identity-out",
        id.to_str().expect("utf-8"),
    ];
    let out = keysync_cli(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let identity = keysync_security::Identity::load(&id).expect("a cluster identity");
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(printed.contains(&identity.public_hex()), "{printed}");
    let shown = keysync_cli(&[
        "hsm",
        "cluster-key",
        "--identity",
        id.to_str().expect("utf-8"),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&shown.stdout).trim(),
        identity.public_hex()
    );
    use std::os::unix::fs::PermissionsExt as _;
    for f in [&dk, &id] {
        let mode = std::fs::metadata(f).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    // Never overwritten: a second run fails and leaves the identity.
    let again = keysync_cli(&args);
    assert!(!again.status.success());
    assert_eq!(
        keysync_security::Identity::load(&id)
            .expect("still there")
            .public_hex(),
        identity.public_hex()
    );
}
