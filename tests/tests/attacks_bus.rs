//! Attacks through the bus's own plumbing (issue 12, attacks 1 and 4),
//! performed on real processes.
//!
//! 1. Reply-subject abuse: a request names its reply subject, and a
//!    responder answers there with its own permissions. A status request
//!    (or a key-operation request) whose reply subject is `keysync.audit`
//!    or `$KV.KEYSYNC_LEASE.active` made the orchestrator (or an agent)
//!    write into the audit stream or the lease bucket. On the open stack
//!    anyone may also write there directly, so the audit appender and the
//!    lease must survive a foreign message as well.
//! 4. Inbox sniffing: under `deploy/nats/secure.conf` every role could
//!    subscribe to `_INBOX.>` and read the commands delivered to other
//!    agents, the orchestrator's event feed and other clients' replies.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use keysync::{Client, ClientOptions, CreateKey, Route};
use keysync_schemas::{
    decode, encode, AuditRecord, Durability, Envelope, HsmId, KeyType, OpReply, OpRequest,
    RejectReason, Source, StatusReply, StatusRequest,
};
use keysync_testkit::{
    assert_converges, create, fast_options, hsm, keysync_cli, next_metrics, on_secure_config,
    secure_user as user, start_stack, wait_until, DevStack,
};

// ---- helpers ----

/// How many times `needle` occurs in an orchestrator's log.
fn log_count(stack: &DevStack, name: &str, needle: &str) -> usize {
    let path = stack.dir().join(format!("logs/{name}.log"));
    std::fs::read_to_string(&path)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// Restarts of a process's run (crash-only supervision logs each one).
const RESTARTED: &str = "starting again";
/// An orchestrator took the lease.
const TOOK_LEASE: &str = "holding the lease; active";

/// Every message of the audit stream: (sequence, payload).
async fn audit_messages(client: &Client) -> Vec<(u64, bytes::Bytes)> {
    let js = jetstream::new(client.nats().clone());
    let Ok(mut s) = js.get_stream(client.subjects().audit_stream()).await else {
        return Vec::new();
    };
    if s.info().await.map(|i| i.state.messages).unwrap_or(0) == 0 {
        return Vec::new();
    }
    let consumer = s
        .create_consumer(pull::OrderedConfig::default())
        .await
        .expect("audit consumer");
    let mut msgs = consumer.messages().await.expect("messages");
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), msgs.next()).await {
        let m = m.expect("message");
        let info = m.info().expect("info");
        let (seq, pending) = (info.stream_sequence, info.pending);
        out.push((seq, m.payload.clone()));
        if pending == 0 {
            break;
        }
    }
    out
}

/// A reply (status or key operation) stored as if it were an audit record.
fn is_a_reply(payload: &[u8]) -> bool {
    decode::<StatusReply>(payload).is_ok() || decode::<OpReply>(payload).is_ok()
}

/// Whether the audit chain has caught up with the events stream: its last
/// audit record is about the last event.
async fn audit_caught_up(client: &Client) -> bool {
    let js = jetstream::new(client.nats().clone());
    let events_last = match js.get_stream(client.subjects().events_stream()).await {
        Ok(mut s) => s.info().await.map(|i| i.state.last_sequence).unwrap_or(0),
        Err(_) => return false,
    };
    let last_record = audit_messages(client)
        .await
        .into_iter()
        .rev()
        .find_map(|(_, p)| decode::<AuditRecord>(&p).ok());
    last_record.is_some_and(|r| r.body.event_seq >= events_last)
}

/// The orchestrator's count of `reason`.
async fn orchestrator_rejected(client: &Client, reason: RejectReason) -> u64 {
    client
        .cluster_status()
        .await
        .map(|s| {
            s.rejected
                .iter()
                .find(|(r, _)| *r == reason)
                .map_or(0, |(_, n)| *n)
        })
        .unwrap_or(0)
}

/// An agent's count of `reason`.
async fn agent_rejected(client: &Client, hsm: &HsmId, reason: RejectReason) -> u64 {
    client
        .health(hsm)
        .await
        .map(|h| {
            h.rejected
                .iter()
                .find(|(r, _)| *r == reason)
                .map_or(0, |(_, n)| *n)
        })
        .unwrap_or(0)
}

/// `n` creates with durability `all` on `on`, one after the other; each
/// must succeed. Returns how long each took.
async fn all_creates(client: &Client, on: &HsmId, n: usize) -> Vec<Duration> {
    let mut took = Vec::new();
    for i in 0..n {
        let t0 = Instant::now();
        client
            .create_key(
                CreateKey::new(KeyType::Ed25519)
                    .on(Route::Hsm(on.clone()))
                    .durability(Durability::All),
            )
            .await
            .unwrap_or_else(|e| panic!("`all` create {i} failed: {e}"));
        took.push(t0.elapsed());
    }
    took
}

fn mean(d: &[Duration]) -> Duration {
    d.iter().sum::<Duration>() / d.len().max(1) as u32
}

/// A status request from nobody in particular.
fn status_request() -> Vec<u8> {
    encode(&Envelope::new(
        Source::Client("mallory".into()),
        StatusRequest::Cluster,
    ))
    .expect("encode")
}

/// A health request from nobody in particular.
fn health_request() -> Vec<u8> {
    encode(&Envelope::new(
        Source::Client("mallory".into()),
        OpRequest::Health,
    ))
    .expect("encode")
}

// ---- attack 1: reply-subject abuse, on the open stack ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_aimed_at_the_audit_stream_are_refused_and_a_foreign_record_is_skipped() {
    let stack = start_stack(3).await;
    let client = stack.client().clone();
    let hsm1 = hsm("hsm-1");
    let url = stack.url();
    let subjects = client.subjects().clone();

    // Normal speed, before the attack.
    let before = all_creates(&client, &hsm1, 5).await;
    assert!(
        wait_until(Duration::from_secs(20), || audit_caught_up(&client)).await,
        "the audit chain did not catch up before the attack"
    );
    let restarts_before = log_count(&stack, "orchestrator", RESTARTED);

    // The attack: a status request to the orchestrator and a health
    // request to hsm-1, both asking for the answer on `keysync.audit`.
    let mallory = async_nats::connect(url.as_str()).await.expect("connect");
    let counted = orchestrator_rejected(&client, RejectReason::ForeignReplySubject).await;
    let agent_counted = agent_rejected(&client, &hsm1, RejectReason::ForeignReplySubject).await;
    mallory
        .publish_with_reply(
            subjects.orchestrator_status(),
            subjects.audit(),
            status_request().into(),
        )
        .await
        .expect("publish");
    mallory
        .publish_with_reply(
            subjects.hsm_op(&hsm1),
            subjects.audit(),
            health_request().into(),
        )
        .await
        .expect("publish");
    mallory.flush().await.expect("flush");
    // Both requests arrived: refused and counted, or answered into the
    // audit stream.
    let arrived = wait_until(Duration::from_secs(10), || async {
        let replies = audit_messages(&client)
            .await
            .iter()
            .filter(|(_, p)| is_a_reply(p))
            .count();
        let refused = (orchestrator_rejected(&client, RejectReason::ForeignReplySubject).await
            > counted) as usize
            + (agent_rejected(&client, &hsm1, RejectReason::ForeignReplySubject).await
                > agent_counted) as usize;
        replies + refused >= 2
    })
    .await;
    assert!(arrived, "the requests never reached their responders");
    let answered_into_audit: Vec<u64> = audit_messages(&client)
        .await
        .into_iter()
        .filter(|(_, p)| is_a_reply(p))
        .map(|(s, _)| s)
        .collect();
    assert!(
        answered_into_audit.is_empty(),
        "replies were published into the audit stream at {answered_into_audit:?}"
    );

    // On the open stack anyone may write into the audit stream directly:
    // a foreign message lands there, acknowledged by JetStream.
    let js = jetstream::new(mallory.clone());
    let foreign_seq = js
        .publish(subjects.audit(), "not an audit record".into())
        .await
        .expect("publish")
        .await
        .expect("the foreign message was stored")
        .sequence;

    // The cluster carries on at normal speed, and the chain keeps growing
    // past the foreign message.
    let during = all_creates(&client, &hsm1, 10).await;
    assert!(
        mean(&during) <= mean(&before) * 4 + Duration::from_millis(250),
        "`all` creates slowed down: before {before:?}, during {during:?}"
    );
    assert!(
        during.iter().all(|d| *d < Duration::from_secs(3)),
        "an `all` create crawled: {during:?}"
    );
    assert!(
        wait_until(Duration::from_secs(20), || audit_caught_up(&client)).await,
        "the audit chain stopped appending"
    );
    let records_after: Vec<u64> = audit_messages(&client)
        .await
        .into_iter()
        .filter(|(s, p)| *s > foreign_seq && decode::<AuditRecord>(p).is_ok())
        .map(|(s, _)| s)
        .collect();
    assert!(
        !records_after.is_empty(),
        "no audit record after the foreign message at {foreign_seq}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || async {
            orchestrator_rejected(&client, RejectReason::ForeignRecord).await > 0
        })
        .await,
        "the foreign audit message was not counted"
    );

    // `audit verify` reports the foreign message at its sequence, and the
    // chain as intact.
    let out = keysync_cli(&["--nats", url.as_str(), "audit", "verify", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON ({e}): {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success(),
        "verify failed: {doc} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(doc["intact"], true, "{doc}");
    let foreign: Vec<u64> = doc["foreign"]
        .as_array()
        .map(|a| a.iter().filter_map(|f| f["seq"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(foreign, vec![foreign_seq], "{doc}");
    let text = keysync_cli(&["--nats", url.as_str(), "audit", "verify"]);
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(
        stdout.contains("audit chain intact") && stdout.contains(&foreign_seq.to_string()),
        "{stdout}"
    );

    // No crash loop: the orchestrator never restarted.
    assert_eq!(
        log_count(&stack, "orchestrator", RESTARTED),
        restarts_before,
        "the orchestrator restarted during the attack"
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_values_in_the_lease_key_keep_no_orchestrator_off_the_lease() {
    // Lease TTL 1 s (fast options): eight seconds of attack are eight TTLs.
    let mut stack = DevStack::start(fast_options(3)).await.expect("stack");
    stack
        .start_orchestrator_named("standby")
        .await
        .expect("standby");
    let client = stack.client().clone();
    let subjects = client.subjects().clone();
    let hsm1 = hsm("hsm-1");
    let url = stack.url();
    let lease_key = format!("$KV.{}.active", subjects.lease_bucket());
    let logs = ["orchestrator", "standby"];
    let count = |stack: &DevStack, needle: &str| -> usize {
        logs.iter().map(|l| log_count(stack, l, needle)).sum()
    };
    all_creates(&client, &hsm1, 2).await;
    let took_before = count(&stack, TOOK_LEASE);
    let restarts_before = count(&stack, RESTARTED);
    assert_eq!(took_before, 1, "one orchestrator holds the lease");
    let counted = orchestrator_rejected(&client, RejectReason::ForeignReplySubject).await;

    // Once a second: a status request answered onto the lease key, and a
    // foreign value written there directly (anyone may, on the open stack).
    let mallory = async_nats::connect(url.as_str()).await.expect("connect");
    let js = jetstream::new(mallory.clone());
    let attack = async {
        let mut stored = 0;
        for _ in 0..8 {
            mallory
                .publish_with_reply(
                    subjects.orchestrator_status(),
                    lease_key.clone(),
                    status_request().into(),
                )
                .await
                .expect("publish");
            let ack = js
                .publish(lease_key.clone(), "mallory holds the lease".into())
                .await
                .expect("publish");
            if ack.await.is_ok() {
                stored += 1;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        stored
    };
    // Meanwhile keys keep syncing everywhere.
    let load = async {
        let deadline = Instant::now() + Duration::from_secs(8);
        let mut took = Vec::new();
        while Instant::now() < deadline {
            took.extend(all_creates(&client, &hsm1, 1).await);
        }
        took
    };
    let (stored, took) = tokio::join!(attack, load);
    assert_eq!(stored, 8, "the foreign lease values were not all stored");
    assert!(
        took.len() >= 4 && took.iter().all(|d| *d < Duration::from_secs(3)),
        "keys did not keep syncing: {took:?}"
    );
    // The lease never changed hands: no failover, no restart.
    assert_eq!(
        count(&stack, RESTARTED),
        restarts_before,
        "an orchestrator restarted"
    );
    assert_eq!(
        count(&stack, TOOK_LEASE),
        took_before,
        "the lease changed hands under the attack"
    );
    // Counted as each orchestrator's loop reads its requests (it may be
    // behind on a loaded machine): wait for the count, with a deadline.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            orchestrator_rejected(&client, RejectReason::ForeignReplySubject).await >= counted + 8
        })
        .await,
        "the status requests aimed at the lease key were not refused: {} counted, {counted} before",
        orchestrator_rejected(&client, RejectReason::ForeignReplySubject).await
    );
    // An orchestrator still acts (only the lease holder publishes
    // metrics), and it counted the foreign lease values.
    let metrics = next_metrics(&client).await;
    assert!(
        metrics["rejected"]["foreign_record"].as_u64().unwrap_or(0) > 0,
        "the foreign lease values were not counted: {}",
        metrics["rejected"]
    );
    all_creates(&client, &hsm1, 2).await;
    stack.shutdown().await;
}

// ---- attack 4 (and 1 under permissions): secure.conf ----

fn as_user(name: &str) -> Vec<String> {
    vec![
        "--nats-user".into(),
        name.into(),
        "--nats-password".into(),
        format!("{name}-dev-secret"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_secure_config_inboxes_are_private_and_replies_go_only_to_inboxes() {
    let opts = on_secure_config(fast_options(3));
    let stack = DevStack::start(opts)
        .await
        .expect("stack on deploy/nats/secure.conf with per-role users");
    let hsms = stack.hsm_ids();
    let url = stack.url();
    let client = Client::connect_with(
        &url,
        ClientOptions {
            auth: user("client"),
            ..Default::default()
        },
    )
    .await
    .expect("client connects");

    // hsm-2 tries to read everyone's inboxes, and hsm-1's, the client's
    // and the orchestrator's in particular.
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = violations.clone();
    let sniffer = user("hsm-2")
        .apply(async_nats::ConnectOptions::new())
        .await
        .expect("credentials")
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
        .connect(url.as_str())
        .await
        .expect("hsm-2 connects");
    let sniffed = [
        "_INBOX.>",
        "_INBOX.hsm-1.>",
        "_INBOX.client.>",
        "_INBOX.orchestrator.>",
    ];
    let mut subs = Vec::new();
    for s in sniffed {
        subs.push(sniffer.subscribe(s).await.expect("subscribe"));
    }
    sniffer.flush().await.expect("flush");
    let mut sniffing = futures::stream::select_all(subs);

    // Traffic into those inboxes: keys created on hsm-2 and hsm-3 are
    // cloned to hsm-1 (commands delivered to its inbox), the client's
    // replies, the orchestrator's event feed.
    let mut expected = std::collections::BTreeMap::new();
    for (i, t) in [
        KeyType::P256,
        KeyType::Ed25519,
        KeyType::Aes256,
        KeyType::P256,
    ]
    .into_iter()
    .enumerate()
    {
        let k = create(&client, t, &hsms[1 + i % 2]).await;
        expected.insert(k.info.key_id, k.info.fingerprint);
    }
    assert_converges(&client, &hsms, &expected, Duration::from_secs(30)).await;
    let got = tokio::time::timeout(Duration::from_millis(500), sniffing.next()).await;
    if let Ok(Some(m)) = got {
        panic!(
            "hsm-2 read another role's inbox: {} (reply {:?})",
            m.subject, m.reply
        );
    }
    let refused_all = wait_until(Duration::from_secs(5), || async {
        let v = violations.lock().map(|v| v.clone()).unwrap_or_default();
        sniffed.iter().all(|s| {
            v.iter().any(|e| {
                e.to_lowercase().contains("permissions violation")
                    && e.contains(&format!("\"{s}\""))
            })
        })
    })
    .await;
    assert!(
        refused_all,
        "NATS did not refuse every sniffing subscription: {:?}",
        violations.lock().map(|v| v.clone()).unwrap_or_default()
    );

    // Replies aimed at the audit stream, by a client: the orchestrator and
    // the agent refuse them, and nothing lands in the stream.
    let mallory = user("client")
        .apply(async_nats::ConnectOptions::new())
        .await
        .expect("credentials")
        .connect(url.as_str())
        .await
        .expect("client connects");
    let subjects = client.subjects().clone();
    let counted = orchestrator_rejected(&client, RejectReason::ForeignReplySubject).await;
    let agent_counted = agent_rejected(&client, &hsms[0], RejectReason::ForeignReplySubject).await;
    mallory
        .publish_with_reply(
            subjects.orchestrator_status(),
            subjects.audit(),
            status_request().into(),
        )
        .await
        .expect("publish");
    mallory
        .publish_with_reply(
            subjects.hsm_op(&hsms[0]),
            subjects.audit(),
            health_request().into(),
        )
        .await
        .expect("publish");
    mallory.flush().await.expect("flush");
    let operator = stack.client();
    let arrived = wait_until(Duration::from_secs(10), || async {
        let replies = audit_messages(operator)
            .await
            .iter()
            .filter(|(_, p)| is_a_reply(p))
            .count();
        let refused = (orchestrator_rejected(&client, RejectReason::ForeignReplySubject).await
            > counted) as usize
            + (agent_rejected(&client, &hsms[0], RejectReason::ForeignReplySubject).await
                > agent_counted) as usize;
        replies + refused >= 2
    })
    .await;
    assert!(arrived, "the requests never reached their responders");
    let answered: Vec<u64> = audit_messages(operator)
        .await
        .into_iter()
        .filter(|(_, p)| is_a_reply(p))
        .map(|(s, _)| s)
        .collect();
    assert!(
        answered.is_empty(),
        "under secure.conf, replies were published into the audit stream at {answered:?}"
    );

    // The whole cluster works under these permissions: create and sync
    // (above), sign, status, metrics, audit verify, dlq list.
    let (key_id, _) = expected
        .iter()
        .next()
        .map(|(k, f)| (*k, *f))
        .expect("a key");
    for h in &hsms {
        client
            .sign(key_id, b"hello", &Route::Hsm(h.clone()))
            .await
            .unwrap_or_else(|e| panic!("sign on {h}: {e}"));
    }
    let status = client.cluster_status().await.expect("status");
    assert_eq!(status.members.len(), 3);
    next_metrics(&client).await;
    assert!(
        wait_until(Duration::from_secs(20), || audit_caught_up(operator)).await,
        "the audit chain did not catch up"
    );
    let mut args = vec!["--nats".to_string(), url.clone()];
    args.extend(as_user("auditor"));
    args.extend(["audit", "verify"].map(String::from));
    let out = keysync_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "audit verify as the auditor: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut args = vec!["--nats".to_string(), url.clone()];
    args.extend(as_user("operator"));
    args.extend(["dlq", "list", "--json"].map(String::from));
    let out = keysync_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "dlq list as the operator: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut args = vec!["--nats".to_string(), url.clone()];
    args.extend(as_user("operator"));
    args.extend(["cluster", "status", "--json"].map(String::from));
    let out = keysync_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "cluster status as the operator: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stack.shutdown().await;
}
