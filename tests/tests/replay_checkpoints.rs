//! Signed checkpoints in the events log (decision 22), on real processes:
//! the active orchestrator appends them as it folds; an orchestrator
//! restarted with no snapshot folds the checkpointed runs without their
//! per-event signature checks and reaches the same state; and what an
//! attacker with the bus could do to a checkpoint (forge one with an
//! agent's key or none, replay a captured one, remove an event it vouches
//! for) is refused, counted, and leaves the state as the log says.

use std::time::Duration;

use async_nats::jetstream;
use keysync::Client;
use keysync_harness::{DevStack, StackOptions};
use keysync_schemas::{
    encode, ClusterStatus, Durability, Envelope, Event, Fingerprint, KeyAttributes, KeyCreated,
    KeyId, KeyOrigin, KeyType, RejectReason, Source,
};
use keysync_security::{Identity, Signer};
use keysync_testkit::{
    assert_converges, create_many, hsm, sample, scrape_metrics, wait_settled, wait_until,
};
use orchestrator::checkpoint::{Chain, Stored};

/// A stack of `hsms` HSMs whose orchestrator checkpoints every 20 events
/// (and whatever is left after 0.5 s of quiet), never snapshots, and
/// serves metrics.
async fn stack(hsms: usize) -> (DevStack, u16) {
    let port = keysync_harness::free_port().unwrap_or_else(|e| panic!("{e}"));
    let stack = DevStack::start(StackOptions {
        hsms,
        orchestrator_metrics_addr: Some(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
        orchestrator_args: [
            "--snapshot-every",
            "0",
            "--checkpoint-every",
            "20",
            "--checkpoint-idle",
            "0.5",
            "--checkpoint-idle-min",
            "1",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("stack did not start: {e}"));
    (stack, port)
}

async fn events_stream(client: &Client) -> jetstream::stream::Stream {
    jetstream::new(client.nats().clone())
        .get_stream(client.subjects().events_stream())
        .await
        .unwrap_or_else(|e| panic!("events stream: {e}"))
}

async fn last_seq(client: &Client) -> u64 {
    let mut s = events_stream(client).await;
    s.info()
        .await
        .unwrap_or_else(|e| panic!("stream info: {e}"))
        .state
        .last_sequence
}

/// The last message of the events stream, if it is a checkpoint: the
/// active orchestrator checkpointed everything before it.
async fn last_is_checkpoint(client: &Client) -> bool {
    let last = last_seq(client).await;
    let stream = events_stream(client).await;
    stream
        .direct_get(last)
        .await
        .is_ok_and(|m| m.subject.as_str() == client.subjects().checkpoint())
}

/// Checkpoints stored in the events stream.
async fn checkpoints(client: &Client) -> Vec<(u64, keysync_schemas::Checkpoint)> {
    let stream = events_stream(client).await;
    let mut out = Vec::new();
    let mut seq = 0;
    while let Ok(m) = stream
        .direct_get_next_for_subject(client.subjects().checkpoint(), Some(seq + 1))
        .await
    {
        seq = m.sequence;
        let env = keysync_schemas::decode::<Event>(&m.payload)
            .unwrap_or_else(|e| panic!("checkpoint at {seq}: {e}"));
        if let Event::Checkpoint(cp) = env.body {
            out.push((seq, cp));
        }
    }
    out
}

async fn status(client: &Client) -> ClusterStatus {
    client
        .cluster_status()
        .await
        .unwrap_or_else(|e| panic!("cluster status: {e}"))
}

/// Restarts the orchestrator and waits until it has folded the whole
/// stream; returns its status.
async fn restart_and_fold(stack: &mut DevStack) -> ClusterStatus {
    let client = stack.client().clone();
    stack.kill_orchestrator();
    stack
        .start_orchestrator()
        .await
        .unwrap_or_else(|e| panic!("orchestrator restart: {e}"));
    folded(&client).await
}

/// Waits until the orchestrator has folded the whole stream.
async fn folded(client: &Client) -> ClusterStatus {
    let end = last_seq(client).await;
    let done = wait_until(Duration::from_secs(60), || async {
        client
            .cluster_status()
            .await
            .is_ok_and(|s| s.last_seq >= end)
    })
    .await;
    assert!(done, "the orchestrator did not fold up to {end}");
    status(client).await
}

/// `keysync_events_verified_total{by=...}` as served now.
async fn verified(port: u16) -> (f64, f64) {
    let text = scrape_metrics(port)
        .await
        .unwrap_or_else(|| panic!("no metrics on port {port}"));
    let get = |by: &str| {
        sample(
            &text,
            &format!("keysync_events_verified_total{{by=\"{by}\"}}"),
        )
        .unwrap_or(-1.0)
    };
    (get("signature"), get("checkpoint"))
}

fn rejected(s: &ClusterStatus, reason: RejectReason) -> u64 {
    s.rejected
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, n)| *n)
}

/// A stack that folded keys and checkpointed them all; its status.
async fn checkpointed_stack() -> (DevStack, u16, ClusterStatus) {
    let (stack, port) = stack(2).await;
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();
    let keys = create_many(&client, &hsms, 40, 4).await;
    assert_converges(&client, &hsms, &keys, Duration::from_secs(30)).await;
    let settled = wait_settled(&client, keys.len() as u64, Duration::from_secs(30)).await;
    assert!(settled, "the cluster did not settle");
    let quiet = wait_until(Duration::from_secs(30), || last_is_checkpoint(&client)).await;
    assert!(
        quiet,
        "the log does not end with a checkpoint after a quiet time"
    );
    let before = folded(&client).await;
    (stack, port, before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_no_snapshot_folds_checkpointed_runs_without_their_signatures() {
    let (mut stack, port, before) = checkpointed_stack().await;
    let client = stack.client().clone();
    let cps = checkpoints(&client).await;
    // 40 keys on 2 HSMs: KeyCreated and KeyReplicated each, their clones'
    // results (one event each, or fewer when batched: decision 21), plus
    // joins: at least 80 events. A checkpoint follows the feed batch that
    // brings its run to 20 events (a run may be longer when a batch is),
    // and the tail is checkpointed when the log goes quiet: several runs.
    let events = before.last_seq;
    assert!(
        cps.len() >= 2,
        "{} checkpoints for {events} events",
        cps.len()
    );
    for w in cps.windows(2) {
        assert_eq!(
            w[1].1.after_seq, w[0].1.through_seq,
            "runs follow each other"
        );
    }
    let (_, first) = &cps[0];
    assert_eq!(
        first.after_seq, 0,
        "the first run starts at the log's start"
    );
    let total = before.last_seq;

    let after = restart_and_fold(&mut stack).await;
    assert_eq!(after, before, "the replay reached another state");
    let (by_signature, by_checkpoint) = verified(port).await;
    // Everything the checkpoints cover was vouched for; what is checked
    // one by one is the checkpoints' own tail (the last checkpoint) and the
    // events they list as rejected (a busy machine makes some: a clone
    // result repeated after a redelivery, say).
    let covered: u64 = cps.iter().map(|(_, c)| c.accepted).sum();
    let rejected: usize = cps.iter().map(|(_, c)| c.rejected.len()).sum();
    assert_eq!(
        by_checkpoint, covered as f64,
        "vouched for: {by_checkpoint}"
    );
    assert_eq!(by_signature + by_checkpoint, total as f64);
    assert!(
        by_signature <= 2.0 + rejected as f64,
        "checked one by one: {by_signature}, of which {rejected} listed as rejected"
    );
    stack.shutdown().await;
}

/// An attacker's event: a `KeyCreated` of a new key claimed by `hsm-1`,
/// signed with `signer_key` (not hsm-1's), on its subject.
fn forged_create(
    client: &Client,
    signer_key: &Identity,
) -> (String, async_nats::HeaderMap, Vec<u8>, KeyId) {
    let key_id = KeyId::new();
    let h1 = hsm("hsm-1");
    let env = Envelope::new(
        Source::Hsm(h1.clone()),
        Event::KeyCreated(KeyCreated {
            key_id,
            key_type: KeyType::Ed25519,
            fingerprint: Fingerprint([7; 32]),
            hsm: h1.clone(),
            origin: KeyOrigin::Generated,
            attributes: KeyAttributes::default(),
            durability: Durability::Logged,
            domain: keysync_schemas::DomainId([0; 8]),
            wrapped: vec![0; 56],
            public_key: None,
        }),
    );
    let subject = client.subjects().key_created(&key_id);
    let bytes = encode(&env).unwrap_or_else(|e| panic!("encode: {e}"));
    let headers = keysync_security::signed_headers(
        signer_key,
        &Signer::Hsm(h1),
        &subject,
        &env.id.to_string(),
        &bytes,
    );
    (subject, headers, bytes, key_id)
}

async fn publish(
    js: &jetstream::Context,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: Vec<u8>,
) -> jetstream::publish::PublishAck {
    js.publish_with_headers(subject, headers, payload.into())
        .await
        .unwrap_or_else(|e| panic!("publish: {e}"))
        .await
        .unwrap_or_else(|e| panic!("ack: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_checkpoints_are_refused_and_counted() {
    let (mut stack, _port, before) = checkpointed_stack().await;
    let client = stack.client().clone();
    let attacker = async_nats::connect(stack.url())
        .await
        .unwrap_or_else(|e| panic!("the attacker connects: {e}"));
    let ajs = jetstream::new(attacker);
    let cps = checkpoints(&client).await;
    let (captured_at, _) = cps
        .last()
        .cloned()
        .unwrap_or_else(|| panic!("no checkpoint"));
    let captured = events_stream(&client)
        .await
        .direct_get(captured_at)
        .await
        .unwrap_or_else(|e| panic!("the captured checkpoint: {e}"));

    // The orchestrator is down (a checkpoint forged while it runs is
    // refused and removed at once; a replay must refuse it too).
    stack.kill_orchestrator();

    // 1. A forged KeyCreated (signed with a key that is not hsm-1's), and
    //    checkpoints that vouch for it, chained exactly over its stored
    //    bytes: one signed with an agent's key (hsm-2's own identity), one
    //    claiming the cluster but signed with a key of the attacker's.
    let stranger = Identity::generate().unwrap_or_else(|e| panic!("{e}"));
    let (subject, headers, bytes, _forged_key) = forged_create(&client, &stranger);
    let forged_at = publish(&ajs, subject.clone(), headers.clone(), bytes.clone())
        .await
        .sequence;
    let mut chain = Chain::new(forged_at - 1);
    chain.accepted(
        &Stored {
            seq: forged_at,
            subject: &subject,
            headers: Some(&headers),
            payload: &bytes,
        },
        false,
    );
    let vouching = chain.seal().unwrap_or_else(|| panic!("a run of one"));
    let agent2 = Identity::load(&stack.agent_identity(&hsm("hsm-2")))
        .unwrap_or_else(|e| panic!("hsm-2's identity: {e}"));
    let cp_subject = client.subjects().checkpoint();
    for (identity, signer) in [
        (&agent2, Signer::Hsm(hsm("hsm-2"))),
        (&stranger, Signer::Cluster),
    ] {
        let source = match &signer {
            Signer::Hsm(h) => Source::Hsm(h.clone()),
            Signer::Cluster => Source::Orchestrator("orchestrator".into()),
        };
        let env = Envelope::new(source, Event::Checkpoint(vouching.clone()));
        let payload = encode(&env).unwrap_or_else(|e| panic!("encode: {e}"));
        let h = keysync_security::signed_headers(
            identity,
            &signer,
            &cp_subject,
            &env.id.to_string(),
            &payload,
        );
        publish(&ajs, cp_subject.clone(), h, payload).await;
    }

    // 2. The captured checkpoint replayed as it is: JetStream drops it
    //    (its id is signed, and within the duplicate window). Under a new
    //    id, its signature no longer verifies.
    let mut again = captured.headers.clone();
    let ack = publish(
        &ajs,
        cp_subject.clone(),
        again.clone(),
        captured.payload.to_vec(),
    )
    .await;
    assert!(ack.duplicate, "a replayed checkpoint was stored again");
    again.insert("Nats-Msg-Id", uuid::Uuid::new_v4().to_string().as_str());
    publish(&ajs, cp_subject.clone(), again, captured.payload.to_vec()).await;

    stack
        .start_orchestrator()
        .await
        .unwrap_or_else(|e| panic!("orchestrator restart: {e}"));
    let after = folded(&client).await;
    // The forged key is not in the fold; nothing else changed.
    assert_eq!(after.keys, before.keys);
    assert_eq!(after.replicated, before.replicated);
    assert_eq!(after.members, before.members);
    assert_eq!(after.enrolled, before.enrolled);
    // Each refusal counted under its reason: the forged event, the
    // checkpoint signed by hsm-2, the one with a stranger's signature and
    // the captured one under a new id.
    let more = |r| rejected(&after, r) - rejected(&before, r);
    assert_eq!(
        more(RejectReason::SignerMismatch),
        1,
        "{:?}",
        after.rejected
    );
    assert_eq!(more(RejectReason::BadSignature), 3, "{:?}", after.rejected);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_removed_from_a_checkpointed_run_is_found_and_the_run_checked_one_by_one() {
    let (mut stack, port, before) = checkpointed_stack().await;
    let client = stack.client().clone();
    let cps = checkpoints(&client).await;
    // A run in the middle of the log, and a KeyReplicated in it (a fact
    // the fold can lose without another rule refusing what follows).
    let stream = events_stream(&client).await;
    let mut victim = None;
    'runs: for (_, cp) in &cps[1..] {
        for seq in cp.after_seq + 1..=cp.through_seq {
            if let Ok(m) = stream.direct_get(seq).await {
                if m.subject.ends_with(".replicated") {
                    victim = Some((seq, cp.clone()));
                    break 'runs;
                }
            }
        }
    }
    let (victim, run) = victim.unwrap_or_else(|| panic!("no KeyReplicated in a checkpointed run"));

    stack.kill_orchestrator();
    // An attacker with the stream's admin rights removes it.
    let admin = events_stream(&client).await;
    let removed = admin
        .delete_message(victim)
        .await
        .unwrap_or_else(|e| panic!("delete: {e}"));
    assert!(removed, "the event was not removed");
    stack
        .start_orchestrator()
        .await
        .unwrap_or_else(|e| panic!("orchestrator restart: {e}"));
    let after = folded(&client).await;
    let more = |r| rejected(&after, r) - rejected(&before, r);
    assert_eq!(
        more(RejectReason::CheckpointMismatch),
        1,
        "{:?}",
        after.rejected
    );
    // The run was checked one by one: everything but it was vouched for.
    let (by_signature, by_checkpoint) = verified(port).await;
    let covered: u64 = cps.iter().map(|(_, c)| c.accepted).sum();
    assert_eq!(by_checkpoint, (covered - run.accepted) as f64);
    assert!(by_signature >= (run.accepted - 1) as f64, "{by_signature}");
    // The keys are all there (the fold does not need that fact).
    assert_eq!(after.keys, before.keys);
    stack.shutdown().await;
}
