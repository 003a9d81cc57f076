//! Security on real processes (docs/security.md): enrollment, join tokens,
//! removal, ten thousand hostile messages on every subject, and logs free
//! of key material at trace level.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use keysync::{Client, CreateKey, Route};
use keysync_schemas::{
    encode, headers, CloneApplied, CloneFailed, CloneFailure, CloneKey, ClusterStatus, Command,
    DomainId, Durability, EnrolledVia, Envelope, Event, Fingerprint, Heartbeat, HsmEnrolled,
    HsmFailed, HsmId, HsmJoined, HsmRecovered, HsmRevoked, InventoryDigest, JoinRequested,
    JoinTokenIssued, KeyAttributes, KeyCreated, KeyDeleted, KeyErased, KeyId, KeyOrigin,
    KeyReplicated, KeyType, OpErrorKind, OpReply, RejectReason, Source, Subjects, Timestamp,
};
use keysync_security::{event_signer, join::JoinToken, signed_headers, Identity, Signer};
use keysync_testkit::{
    assert_converges, count_events, create_many, fast_options, hsm, inventory, keysync_cli,
    start_fast_stack, start_stack, wait_for_state, wait_until, DevStack, StackOptions,
};

// ---------------------------------------------------------------------------
// Support
// ---------------------------------------------------------------------------

/// Child processes inherit this test binary's environment, and one test
/// runs its stack at `RUST_LOG=trace`. Every test spawns processes under
/// this lock (shared); that test sets the variable under it (exclusive), so
/// only its own children see it.
static SPAWNING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn fast_stack(hsms: usize) -> DevStack {
    let _spawning = SPAWNING.read().await;
    start_fast_stack(hsms).await
}

/// Starts agents as they are (enrolled or not) with extra flags.
async fn start_agents_with(
    stack: &mut DevStack,
    ids: &[HsmId],
    extra: &[String],
) -> Result<(), keysync_harness::StackError> {
    let _spawning = SPAWNING.read().await;
    stack.start_agents_with(ids, extra).await
}

/// Runs the `keysync` CLI (off the runtime's threads).
async fn cli(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let _spawning = SPAWNING.read().await;
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        keysync_cli(&args)
    })
    .await
    .expect("the CLI task")
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "keysync failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `keysync hsm token --id ID --json`: the one-time token.
async fn issue_token(stack: &DevStack, id: &str) -> String {
    let url = stack.url();
    let identity = stack.cluster_identity().display().to_string();
    let doc = json_of(
        &cli(&[
            "--nats",
            &url,
            "hsm",
            "token",
            "--id",
            id,
            "--identity",
            &identity,
            "--json",
        ])
        .await,
    );
    assert_eq!(doc["hsm_id"], id, "{doc}");
    let token = doc["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {doc}"))
        .to_string();
    assert!(
        token.starts_with(&format!("ksjt1.{id}.")),
        "a token for {id}: {token}"
    );
    token
}

/// `keysync dlq list --json`: the newest `limit` dead letters.
async fn dead_letters(url: &str, limit: u64) -> serde_json::Value {
    json_of(
        &cli(&[
            "--nats",
            url,
            "dlq",
            "list",
            "--json",
            "--limit",
            &limit.to_string(),
        ])
        .await,
    )
}

/// Waits until `keysync dlq list` shows a letter matching `pred`; returns it.
async fn wait_for_letter(
    url: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let doc = dead_letters(url, 500).await;
        let letters = doc["letters"].as_array().cloned().unwrap_or_default();
        if let Some(l) = letters.iter().find(|l| pred(l)) {
            return l.clone();
        }
        if tokio::time::Instant::now() > deadline {
            let seen: Vec<String> = letters
                .iter()
                .rev()
                .take(20)
                .map(|l| format!("{} {} seq={}", l["reason"], l["subject"], l["stream_seq"]))
                .collect();
            panic!("no dead letter for {what} within 30 s; newest letters: {seen:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn count(list: &[(RejectReason, u64)], reason: RejectReason) -> u64 {
    list.iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, n)| *n)
}

fn total(list: &[(RejectReason, u64)]) -> u64 {
    list.iter().map(|(_, n)| n).sum()
}

/// Cluster status, asked once: an orchestrator must answer even when the
/// events stream ends with messages it rejected (it once restarted its run
/// in a loop then, "event consumer stalled"; the fold now advances past a
/// rejected event, and this is not retried around).
async fn status(client: &Client) -> ClusterStatus {
    client
        .cluster_status()
        .await
        .unwrap_or_else(|e| panic!("cluster status: {e}"))
}

fn is_member(s: &ClusterStatus, h: &HsmId) -> bool {
    s.members.iter().any(|m| &m.hsm_id == h)
}

fn enrolled_key(s: &ClusterStatus, h: &HsmId) -> Option<[u8; 32]> {
    s.enrolled.iter().find(|(e, _)| e == h).map(|(_, k)| *k)
}

fn load_identity(path: &Path) -> Identity {
    Identity::load(path).unwrap_or_else(|e| panic!("identity {}: {e}", path.display()))
}

/// Publishes `event` signed by `identity` as `signer` to JetStream; returns
/// its stream sequence.
async fn publish_signed_event(
    nats: &async_nats::Client,
    identity: &Identity,
    signer: &Signer,
    subject: String,
    source: Source,
    event: Event,
) -> u64 {
    let env = Envelope::new(source, event);
    let bytes = encode(&env).expect("encode");
    let h = signed_headers(identity, signer, &subject, &env.id.to_string(), &bytes);
    let js = async_nats::jetstream::new(nats.clone());
    js.publish_with_headers(subject.clone(), h, bytes.into())
        .await
        .unwrap_or_else(|e| panic!("publish on {subject}: {e}"))
        .await
        .unwrap_or_else(|e| panic!("{subject} not stored: {e}"))
        .sequence
}

fn join_request(hsm: &HsmId, identity: &Identity, token: &JoinToken) -> Event {
    let public_key = identity.public_key();
    Event::JoinRequested(JoinRequested {
        hsm: hsm.clone(),
        public_key,
        token_key: token.public_key(),
        proof: token.proof(&public_key).to_vec(),
    })
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

// ---------------------------------------------------------------------------
// 1. Enrollment
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unenrolled_agent_is_sent_no_keys_until_enrolled() {
    let mut stack = fast_stack(2).await;
    let client = stack.client().clone();
    let subjects = client.subjects().clone();
    let url = stack.url();
    let (h1, h2, h3) = (hsm("hsm-1"), hsm("hsm-2"), hsm("hsm-3"));
    let pair = [h1.clone(), h2.clone()];
    let mut expected = create_many(&client, &pair, 20, 8).await;
    let before = status(&client).await;

    // hsm-3 starts with an identity no operator enrolled: it announces
    // itself, and its announcement is refused.
    start_agents_with(&mut stack, std::slice::from_ref(&h3), &[])
        .await
        .expect("hsm-3 starts and announces itself");
    let joined = subjects.hsm_joined(&h3);
    let letter = wait_for_letter(&url, "hsm-3's HsmJoined", |l| {
        l["subject"] == joined.as_str() && l["reason"] == "unenrolled"
    })
    .await;
    assert_eq!(letter["claimed_signer"], "hsm/hsm-3", "{letter}");
    assert_eq!(
        letter["rejected_by"], "orchestrator orchestrator",
        "{letter}"
    );
    let s = status(&client).await;
    assert!(
        count(&s.rejected, RejectReason::Unenrolled)
            > count(&before.rejected, RejectReason::Unenrolled),
        "unenrolled not counted: {:?}",
        s.rejected
    );
    // An unenrolled agent sends no heartbeats; one signed with its real
    // identity key is refused all the same.
    let identity3 = load_identity(&stack.agent_identity(&h3));
    let hb = Envelope::new(
        Source::Hsm(h3.clone()),
        Heartbeat {
            hsm: h3.clone(),
            token_keys: 0,
            digest: InventoryDigest::default(),
            outbox: 0,
        },
    );
    let hb_bytes = encode(&hb).expect("encode");
    let hb_subject = subjects.heartbeat(&h3);
    let hb_headers = signed_headers(
        &identity3,
        &Signer::Hsm(h3.clone()),
        &hb_subject,
        &hb.id.to_string(),
        &hb_bytes,
    );
    client
        .nats()
        .publish_with_headers(hb_subject.clone(), hb_headers, hb_bytes.into())
        .await
        .expect("publish a heartbeat");
    wait_for_letter(&url, "hsm-3's heartbeat", |l| {
        l["subject"] == hb_subject.as_str() && l["reason"] == "unenrolled"
    })
    .await;

    // More keys: all complete on the two members; hsm-3 is sent none.
    expected.extend(create_many(&client, &pair, 20, 8).await);
    let n = expected.len() as u64;
    let done = wait_until(Duration::from_secs(30), || async {
        client
            .cluster_status()
            .await
            .is_ok_and(|s| s.keys == n && s.replicated == n && s.pending_clones == 0)
    })
    .await;
    let s = status(&client).await;
    assert!(done, "the members did not complete {n} keys: {s:?}");
    assert_converges(&client, &pair, &expected, Duration::from_secs(30)).await;
    assert!(!is_member(&s, &h3), "an unenrolled HSM is a member: {s:?}");
    assert_eq!(enrolled_key(&s, &h3), None, "hsm-3 enrolled by itself");
    assert!(
        inventory(&client, &h3).await.is_empty(),
        "an unenrolled HSM was sent keys"
    );
    let health = client.health(&h3).await.expect("hsm-3 health");
    assert_eq!(health.clones_applied, 0, "{health:?}");
    assert_eq!(health.token_keys, 0, "{health:?}");
    assert_eq!(
        count_events(&client, "keysync.evt.key.*.applied.hsm-3").await,
        0,
        "hsm-3 applied clones"
    );

    // Enrolled by an operator: it becomes a member and catches up.
    stack.enroll(&h3).await.expect("enroll hsm-3");
    let member = wait_until(Duration::from_secs(30), || async {
        client.cluster_status().await.is_ok_and(|s| {
            is_member(&s, &h3) && enrolled_key(&s, &h3) == Some(identity3.public_key())
        })
    })
    .await;
    assert!(
        member,
        "hsm-3 not a member after enrollment: {:?}",
        status(&client).await
    );
    assert_converges(
        &client,
        &[h1, h2, h3.clone()],
        &expected,
        Duration::from_secs(60),
    )
    .await;
    wait_for_state(&client, &h3, "in-service", Duration::from_secs(30)).await;
}

// ---------------------------------------------------------------------------
// 2. Join tokens
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_enrolls_once_and_only_its_hsm() {
    let mut stack = fast_stack(2).await;
    let client = stack.client().clone();
    let subjects = client.subjects().clone();
    let url = stack.url();
    let (h1, h2, h3, h4, h5) = (
        hsm("hsm-1"),
        hsm("hsm-2"),
        hsm("hsm-3"),
        hsm("hsm-4"),
        hsm("hsm-5"),
    );
    let expected = create_many(&client, &[h1.clone(), h2.clone()], 12, 6).await;

    // hsm-3 joins with its token, no operator enrollment.
    let token3 = issue_token(&stack, "hsm-3").await;
    start_agents_with(
        &mut stack,
        std::slice::from_ref(&h3),
        &["--join-token".to_string(), token3.clone()],
    )
    .await
    .expect("hsm-3 starts with its join token");
    let key3 = load_identity(&stack.agent_identity(&h3)).public_key();
    let joined = wait_until(Duration::from_secs(30), || async {
        client
            .cluster_status()
            .await
            .is_ok_and(|s| is_member(&s, &h3) && enrolled_key(&s, &h3) == Some(key3))
    })
    .await;
    assert!(
        joined,
        "hsm-3 not enrolled by its token: {:?}",
        status(&client).await
    );
    assert_converges(
        &client,
        &[h1.clone(), h2.clone(), h3.clone()],
        &expected,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        count_events(&client, &subjects.hsm_enrolled(&h3)).await,
        0,
        "enrolled by the token, not by an operator"
    );
    assert_eq!(
        count_events(&client, &subjects.join_requested(&h3)).await,
        1
    );
    let secret = token3.rsplit('.').next().expect("token secret");
    let log3 = stack.dir().join("logs/hsm-3.log");
    assert!(
        !std::fs::read_to_string(&log3)
            .unwrap_or_default()
            .contains(secret),
        "the join token's secret is in {}",
        log3.display()
    );

    // The same token again, by another identity for the same HSM: refused.
    let thief = Identity::generate().expect("rng");
    let used = JoinToken::parse(&token3).expect("token parses");
    let seq = publish_signed_event(
        client.nats(),
        &thief,
        &Signer::Hsm(h3.clone()),
        subjects.join_requested(&h3),
        Source::Hsm(h3.clone()),
        join_request(&h3, &thief, &used),
    )
    .await;
    let letter = wait_for_letter(&url, "the reused token", |l| l["stream_seq"] == seq).await;
    assert_eq!(letter["reason"], "invalid_token", "{letter}");
    let s = status(&client).await;
    assert!(
        count(&s.rejected, RejectReason::InvalidToken) >= 1,
        "{:?}",
        s.rejected
    );
    assert_eq!(
        enrolled_key(&s, &h3),
        Some(key3),
        "the reused token replaced hsm-3's key"
    );

    // A token for hsm-4 given to an agent started as hsm-5: the agent
    // refuses to use it (it sends no join request, and keeps retrying).
    let token4 = issue_token(&stack, "hsm-4").await;
    let log5 = stack.dir().join("logs/hsm-5.log");
    let refusal = "the join token is for hsm-4, not hsm-5";
    let seen_in_log = async {
        wait_until(Duration::from_secs(30), || async {
            std::fs::read_to_string(&log5).is_ok_and(|t| t.contains(refusal))
        })
        .await
    };
    let extra = ["--join-token".to_string(), token4.clone()];
    tokio::select! {
        started = start_agents_with(&mut stack, std::slice::from_ref(&h5), &extra) => {
            // Ending with an error (the agent exited) is a refusal too.
            assert!(started.is_err(), "hsm-5 started with hsm-4's token");
        }
        _ = seen_in_log => {}
    }
    let refused = wait_until(Duration::from_secs(30), || async {
        std::fs::read_to_string(&log5).is_ok_and(|t| t.contains(refusal))
    })
    .await;
    assert!(
        refused,
        "hsm-5 did not refuse hsm-4's token:\n{}",
        log_tail(&log5)
    );
    stack.kill_agent(&h5);
    assert_eq!(
        count_events(&client, &subjects.join_requested(&h5)).await,
        0,
        "hsm-5 sent a join request"
    );
    // A modified agent that relabels the token for hsm-5 (a valid proof
    // for hsm-5 by hsm-4's token key) is refused by the orchestrator.
    let relabelled = JoinToken::parse(&token4.replacen("ksjt1.hsm-4.", "ksjt1.hsm-5.", 1))
        .expect("relabelled token parses");
    let rogue = Identity::generate().expect("rng");
    let seq = publish_signed_event(
        client.nats(),
        &rogue,
        &Signer::Hsm(h5.clone()),
        subjects.join_requested(&h5),
        Source::Hsm(h5.clone()),
        join_request(&h5, &rogue, &relabelled),
    )
    .await;
    let letter = wait_for_letter(&url, "hsm-4's token used for hsm-5", |l| {
        l["stream_seq"] == seq
    })
    .await;
    assert_eq!(letter["reason"], "invalid_token", "{letter}");
    let s = status(&client).await;
    for h in [&h4, &h5] {
        assert_eq!(enrolled_key(&s, h), None, "{h} enrolled: {s:?}");
        assert!(!is_member(&s, h), "{h} is a member: {s:?}");
    }

    // Refused attempts do not use the token up: it still enrolls hsm-4.
    start_agents_with(
        &mut stack,
        std::slice::from_ref(&h4),
        &["--join-token".to_string(), token4],
    )
    .await
    .expect("hsm-4 starts with its token");
    let key4 = load_identity(&stack.agent_identity(&h4)).public_key();
    let joined = wait_until(Duration::from_secs(30), || async {
        client
            .cluster_status()
            .await
            .is_ok_and(|s| is_member(&s, &h4) && enrolled_key(&s, &h4) == Some(key4))
    })
    .await;
    assert!(joined, "hsm-4 not enrolled: {:?}", status(&client).await);
    assert_converges(
        &client,
        &[h1, h2, h3, h4],
        &expected,
        Duration::from_secs(60),
    )
    .await;
}

// ---------------------------------------------------------------------------
// 3. Removal
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_hsm_is_revoked_and_its_events_are_rejected() {
    let stack = fast_stack(3).await;
    let client = stack.client().clone();
    let subjects = client.subjects().clone();
    let url = stack.url();
    let hsms = stack.hsm_ids();
    let (h1, h2, h3) = (hsm("hsm-1"), hsm("hsm-2"), hsm("hsm-3"));
    let pair = [h1.clone(), h2.clone()];
    let before_removal = create_many(&client, &hsms, 15, 8).await;
    assert_converges(&client, &hsms, &before_removal, Duration::from_secs(30)).await;

    let identity = stack.cluster_identity().display().to_string();
    let doc = json_of(
        &cli(&[
            "--nats",
            &url,
            "hsm",
            "remove",
            "--id",
            "hsm-3",
            "--identity",
            &identity,
            "--json",
        ])
        .await,
    );
    assert_eq!(doc["removed"], true, "{doc}");
    wait_for_state(&client, &h3, "removed", Duration::from_secs(20)).await;
    assert_eq!(
        enrolled_key(&status(&client).await, &h3),
        None,
        "hsm-3 still enrolled"
    );

    // New keys complete on hsm-1 and hsm-2 alone.
    let all = client
        .create_key(
            CreateKey::new(KeyType::P256)
                .on(Route::Hsm(h1.clone()))
                .durability(Durability::All),
        )
        .await
        .expect("`all` completes without the removed HSM");
    assert_eq!(all.holders, pair.to_vec());
    let mut expected = before_removal.clone();
    expected.insert(all.info.key_id, all.info.fingerprint);
    let after_removal = create_many(&client, &pair, 10, 5).await;
    expected.extend(after_removal.iter().map(|(k, f)| (*k, *f)));
    let n = expected.len() as u64;
    let done = wait_until(Duration::from_secs(30), || async {
        client
            .cluster_status()
            .await
            .is_ok_and(|s| s.keys == n && s.replicated == n && s.pending_clones == 0)
    })
    .await;
    assert!(done, "keys not completed: {:?}", status(&client).await);
    assert_converges(&client, &pair, &expected, Duration::from_secs(30)).await;
    // hsm-3 (still running) keeps what it had and was sent nothing new.
    assert_eq!(
        inventory(&client, &h3).await,
        before_removal,
        "a removed HSM was sent keys"
    );

    // What it signs from now on is refused: a restart announcement, and a
    // claim to hold a new key.
    let identity3 = load_identity(&stack.agent_identity(&h3));
    let joined_seq = publish_signed_event(
        client.nats(),
        &identity3,
        &Signer::Hsm(h3.clone()),
        subjects.hsm_joined(&h3),
        Source::Hsm(h3.clone()),
        Event::HsmJoined(HsmJoined {
            hsm: h3.clone(),
            agent_version: "test".into(),
            token_keys: 0,
        }),
    )
    .await;
    let applied_seq = publish_signed_event(
        client.nats(),
        &identity3,
        &Signer::Hsm(h3.clone()),
        subjects.clone_applied(&all.info.key_id, &h3),
        Source::Hsm(h3.clone()),
        Event::CloneApplied(CloneApplied {
            key_id: all.info.key_id,
            hsm: h3.clone(),
            fingerprint: all.info.fingerprint,
            already_present: false,
        }),
    )
    .await;
    for (what, seq) in [("HsmJoined", joined_seq), ("CloneApplied", applied_seq)] {
        let letter = wait_for_letter(&url, what, |l| l["stream_seq"] == seq).await;
        assert_eq!(letter["reason"], "unenrolled", "{what}: {letter}");
        assert_eq!(letter["claimed_signer"], "hsm/hsm-3", "{what}: {letter}");
    }

    // Still removed, holding only what it had; keys still complete without it.
    let last = client
        .create_key(
            CreateKey::new(KeyType::Ed25519)
                .on(Route::Hsm(h2.clone()))
                .durability(Durability::All),
        )
        .await
        .expect("`all` still completes without the removed HSM");
    assert_eq!(last.holders, pair.to_vec());
    expected.insert(last.info.key_id, last.info.fingerprint);
    let n = expected.len() as u64;
    let done = wait_until(Duration::from_secs(30), || async {
        client
            .cluster_status()
            .await
            .is_ok_and(|s| s.keys == n && s.replicated == n && s.pending_clones == 0)
    })
    .await;
    let s = status(&client).await;
    assert!(done, "keys not completed: {s:?}");
    let member = |h: &HsmId| {
        s.members
            .iter()
            .find(|m| &m.hsm_id == h)
            .unwrap_or_else(|| panic!("{h} not listed: {s:?}"))
            .clone()
    };
    let m3 = member(&h3);
    assert_eq!(m3.state.as_str(), "removed", "{s:?}");
    assert_eq!(
        m3.keys,
        before_removal.len() as u64,
        "the forged CloneApplied was counted: {s:?}"
    );
    for h in &pair {
        assert_eq!(member(h).state.as_str(), "in-service", "{s:?}");
    }
    assert_eq!(enrolled_key(&s, &h3), None, "{s:?}");
    assert_converges(&client, &pair, &expected, Duration::from_secs(30)).await;
    assert_eq!(inventory(&client, &h3).await, before_removal);
}

// ---------------------------------------------------------------------------
// 4. Ten thousand hostile messages
// ---------------------------------------------------------------------------

/// A deterministic generator (xorshift64*): a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        for b in &mut a {
            *b = self.next() as u8;
        }
        a
    }
}

/// A real message seen on the bus, kept for replay.
#[derive(Clone)]
struct Captured {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

impl Captured {
    /// Keeps only what the sender set: id, signer, signature.
    fn new(subject: &str, h: &HeaderMap, payload: Bytes) -> Option<Self> {
        let mut headers = HeaderMap::new();
        for name in [headers::MSG_ID, headers::SIGNER, headers::SIGNATURE] {
            headers.insert(name, h.get(name)?.as_str());
        }
        Some(Captured {
            subject: subject.to_string(),
            headers,
            payload,
        })
    }
}

#[derive(Clone)]
enum Target {
    /// An event of a kind (0..[`EVENT_KINDS`]) about an HSM and a key.
    Event(usize, HsmId, KeyId),
    Command(HsmId),
    Heartbeat(HsmId),
    Op(Option<HsmId>),
    Status,
}

struct Hostile {
    subject: String,
    headers: Option<HeaderMap>,
    payload: Vec<u8>,
    reply: Option<String>,
}

const EVENT_KINDS: usize = 13;
const OVERSIZED: usize = 132 * 1024;

/// Makes hostile messages for every keysync subject.
struct Forge {
    subjects: Subjects,
    rng: Rng,
    /// A real, enrolled agent's identity (hsm-1's).
    agent: Identity,
    agent_id: HsmId,
    /// Another member.
    other: HsmId,
    /// Members and one HSM that does not exist.
    hsms: Vec<HsmId>,
    rogues: Vec<Identity>,
    events: Vec<Captured>,
    commands: Vec<Captured>,
    heartbeats: Vec<Captured>,
}

fn msg_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

impl Forge {
    /// Half the messages go to the events stream, the rest to commands,
    /// heartbeats, key operations and status.
    fn target(&mut self, i: usize) -> Target {
        let any = self.rng.below(self.hsms.len());
        let member = self.rng.below(3);
        let kind = self.rng.below(EVENT_KINDS);
        match i % 20 {
            0..=9 => Target::Event(kind, self.hsms[any].clone(), KeyId::new()),
            10..=12 => Target::Command(self.hsms[member].clone()),
            13..=15 => Target::Heartbeat(self.hsms[any].clone()),
            16..=18 => Target::Op((any < 3).then(|| self.hsms[any].clone())),
            _ => Target::Status,
        }
    }

    fn subject(&self, t: &Target) -> String {
        match t {
            Target::Event(kind, h, key) => self.event(*kind, h, *key, &[0; 32]).0,
            Target::Command(h) => self.subjects.commands_for(h),
            Target::Heartbeat(h) => self.subjects.heartbeat(h),
            Target::Op(Some(h)) => self.subjects.hsm_op(h),
            Target::Op(None) => self.subjects.any_op(),
            Target::Status => self.subjects.orchestrator_status(),
        }
    }

    fn forged_key(&self, key_id: KeyId, hsm: &HsmId) -> KeyCreated {
        KeyCreated {
            key_id,
            key_type: KeyType::Ed25519,
            fingerprint: Fingerprint([7; 32]),
            hsm: hsm.clone(),
            origin: KeyOrigin::Generated,
            attributes: KeyAttributes::default(),
            durability: Durability::Logged,
            domain: DomainId([0; 8]),
            wrapped: vec![0x42; 40],
            public_key: None,
        }
    }

    /// An event of `kind` about `hsm` and `key`, with its subject; `pk` is
    /// the identity key an enrollment or join request carries.
    fn event(&self, kind: usize, hsm: &HsmId, key: KeyId, pk: &[u8; 32]) -> (String, Event) {
        let s = &self.subjects;
        let h = hsm.clone();
        let fingerprint = Fingerprint([9; 32]);
        match kind {
            0 => (
                s.key_created(&key),
                Event::KeyCreated(self.forged_key(key, hsm)),
            ),
            1 => (
                s.clone_applied(&key, hsm),
                Event::CloneApplied(CloneApplied {
                    key_id: key,
                    hsm: h,
                    fingerprint,
                    already_present: false,
                }),
            ),
            2 => (
                s.clone_failed(&key, hsm),
                Event::CloneFailed(CloneFailed {
                    key_id: key,
                    hsm: h,
                    reason: CloneFailure::WrongDomain,
                }),
            ),
            3 => (
                s.key_replicated(&key),
                Event::KeyReplicated(KeyReplicated {
                    key_id: key,
                    fingerprint,
                    holders: vec![h],
                    sync_latency_micros: 1,
                    created_seq: 1,
                }),
            ),
            4 => (
                s.hsm_joined(hsm),
                Event::HsmJoined(HsmJoined {
                    hsm: h,
                    agent_version: "forged".into(),
                    token_keys: 0,
                }),
            ),
            5 => (
                s.hsm_failed(hsm),
                Event::HsmFailed(HsmFailed {
                    hsm: h,
                    silent_ms: 1,
                }),
            ),
            6 => (
                s.hsm_recovered(hsm),
                Event::HsmRecovered(HsmRecovered { hsm: h }),
            ),
            7 => (
                s.key_deleted(&key),
                Event::KeyDeleted(KeyDeleted {
                    key_id: key,
                    fingerprint,
                    hsm: h,
                }),
            ),
            8 => (
                s.key_erased(&key, hsm),
                Event::KeyErased(KeyErased {
                    key_id: key,
                    hsm: h,
                    was_present: true,
                }),
            ),
            9 => (
                s.hsm_enrolled(hsm),
                Event::HsmEnrolled(HsmEnrolled {
                    hsm: h,
                    public_key: *pk,
                    via: EnrolledVia::Operator,
                }),
            ),
            10 => (s.hsm_revoked(hsm), Event::HsmRevoked(HsmRevoked { hsm: h })),
            11 => (
                s.join_token(hsm),
                Event::JoinTokenIssued(JoinTokenIssued {
                    hsm: h,
                    token_key: *pk,
                    expires_at_ns: u64::MAX,
                }),
            ),
            _ => {
                // A well-formed request with a valid proof by a token the
                // cluster never issued.
                let token = JoinToken::issue(h.clone()).expect("token");
                (
                    s.join_requested(hsm),
                    Event::JoinRequested(JoinRequested {
                        hsm: h,
                        public_key: *pk,
                        token_key: token.public_key(),
                        proof: token.proof(pk).to_vec(),
                    }),
                )
            }
        }
    }

    fn source_of(event: &Event) -> Source {
        match event_signer(event) {
            Signer::Hsm(h) => Source::Hsm(h),
            Signer::Cluster => Source::Orchestrator("orchestrator".into()),
        }
    }

    fn encode_event(event: Event) -> Vec<u8> {
        encode(&Envelope::new(Self::source_of(&event), event)).expect("encode")
    }

    fn command(&self, target: &HsmId) -> Vec<u8> {
        let cmd = Command::CloneKey(CloneKey {
            target: target.clone(),
            created_seq: 1,
            key: self.forged_key(KeyId::new(), &self.other),
        });
        encode(&Envelope::new(
            Source::Orchestrator("orchestrator".into()),
            cmd,
        ))
        .expect("encode")
    }

    fn heartbeat(hsm: &HsmId) -> Vec<u8> {
        encode(&Envelope::new(
            Source::Hsm(hsm.clone()),
            Heartbeat {
                hsm: hsm.clone(),
                token_keys: 0,
                digest: InventoryDigest::default(),
                outbox: 0,
            },
        ))
        .expect("encode")
    }

    /// Encoded with `emitted_at` outside the replay window: 300 s old
    /// (past `MAX_AGE`) or 120 s ahead (past `MAX_SKEW`).
    fn shifted<T: keysync_schemas::Message>(&mut self, source: Source, body: T) -> Vec<u8> {
        let mut env = Envelope::new(source, body);
        let now = env.emitted_at.as_nanos();
        env.emitted_at = if self.rng.below(2) == 0 {
            Timestamp(now - 300_000_000_000)
        } else {
            Timestamp(now + 120_000_000_000)
        };
        encode(&env).expect("encode")
    }

    fn sign(identity: &Identity, signer: &Signer, subject: &str, payload: &[u8]) -> HeaderMap {
        signed_headers(identity, signer, subject, &msg_id(), payload)
    }

    fn garbage(&mut self, t: &Target) -> (Option<HeaderMap>, Vec<u8>) {
        let len = self.rng.below(600);
        match self.rng.below(5) {
            0 => (None, self.rng.bytes(len)),
            1 => {
                // A valid header of some family (never a key operation
                // request on an op subject: those are unauthenticated).
                let family = loop {
                    let f = 1 + self.rng.below(8) as u8;
                    if !(matches!(t, Target::Op(_)) && f == 3) {
                        break f;
                    }
                };
                let mut p = vec![b'K', b'S', 0, 1, family];
                p.extend(self.rng.bytes(len / 2));
                (None, p)
            }
            2 => {
                // Malformed signature headers.
                let mut h = HeaderMap::new();
                h.insert(headers::MSG_ID, msg_id().as_str());
                h.insert(
                    headers::SIGNER,
                    ["hsm/hsm-1", "cluster", "nobody", "hsm/a.b"][self.rng.below(4)],
                );
                h.insert(
                    headers::SIGNATURE,
                    ["not base64!", "AAAA", ""][self.rng.below(3)],
                );
                (Some(h), self.rng.bytes(len))
            }
            3 => {
                // Well-formed signature headers over bytes that do not decode.
                let mut h = HeaderMap::new();
                h.insert(headers::MSG_ID, msg_id().as_str());
                h.insert(
                    headers::SIGNER,
                    ["hsm/hsm-1", "hsm/hsm-9", "cluster"][self.rng.below(3)],
                );
                let sig: [u8; 64] = self.rng.array();
                h.insert(headers::SIGNATURE, base64(&sig, STANDARD, true).as_str());
                (Some(h), self.rng.bytes(len))
            }
            _ => {
                // A valid event, truncated.
                let kind = self.rng.below(EVENT_KINDS);
                let (_, e) = self.event(kind, &self.other, KeyId::new(), &[1; 32]);
                let mut p = Self::encode_event(e);
                let cut = self.rng.below(p.len());
                p.truncate(cut);
                (None, p)
            }
        }
    }

    fn unsigned(&mut self, t: &Target) -> (Option<HeaderMap>, Vec<u8>) {
        let p = match t {
            Target::Event(kind, h, key) => {
                Self::encode_event(self.event(*kind, h, *key, &[2; 32]).1)
            }
            Target::Command(h) => self.command(h),
            Target::Heartbeat(h) => Self::heartbeat(h),
            // Other families on the op and status subjects.
            Target::Op(_) | Target::Status => Self::heartbeat(&self.agent_id),
        };
        // Sometimes with a deduplication id, still without a signature.
        let h = (self.rng.below(2) == 0).then(|| {
            let mut h = HeaderMap::new();
            h.insert(headers::MSG_ID, msg_id().as_str());
            h
        });
        (h, p)
    }

    /// Signed by an identity no one enrolled.
    fn rogue(&mut self, t: &Target, subject: &str) -> (Option<HeaderMap>, Vec<u8>) {
        let pick = self.rng.below(self.rogues.len());
        let rogue = &self.rogues[pick];
        let (signer, p) = match t {
            Target::Event(kind, h, key) => {
                let (_, e) = self.event(*kind, h, *key, &rogue.public_key());
                (event_signer(&e), Self::encode_event(e))
            }
            Target::Command(h) => (Signer::Cluster, self.command(h)),
            Target::Heartbeat(h) => (Signer::Hsm(h.clone()), Self::heartbeat(h)),
            Target::Op(_) | Target::Status => (Signer::Cluster, self.command(&self.other)),
        };
        (Some(Self::sign(rogue, &signer, subject, &p)), p)
    }

    /// Signed by a real member's key, but about another HSM, as another
    /// signer, or on another subject.
    fn real_agent(&mut self, t: &Target) -> (String, Option<HeaderMap>, Vec<u8>) {
        let me = Signer::Hsm(self.agent_id.clone());
        let pk = self.agent.public_key();
        match t {
            Target::Event(kind, _, _) => {
                let flavour = self.rng.below(3);
                if flavour == 2 {
                    // Its own announcement, as if captured long ago (after
                    // JetStream's duplicate window) or stamped ahead.
                    let (subject, e) = self.event(4, &self.agent_id, KeyId::new(), &pk);
                    let p = self.shifted(Source::Hsm(self.agent_id.clone()), e);
                    let h = Self::sign(&self.agent, &me, &subject, &p);
                    (subject, Some(h), p)
                } else if flavour == 0 {
                    // About another HSM, signed as itself: signer mismatch.
                    let (subject, e) = self.event(*kind, &self.other, KeyId::new(), &pk);
                    let p = Self::encode_event(e);
                    let h = Self::sign(&self.agent, &me, &subject, &p);
                    (subject, Some(h), p)
                } else {
                    let (subject, e) = self.event(*kind, &self.agent_id, KeyId::new(), &pk);
                    let p = Self::encode_event(e.clone());
                    match event_signer(&e) {
                        // Its own event, on a subject of another HSM or key.
                        Signer::Hsm(_) => {
                            let (moved, _) = self.event(*kind, &self.other, KeyId::new(), &pk);
                            assert_ne!(moved, subject);
                            let h = Self::sign(&self.agent, &me, &moved, &p);
                            (moved, Some(h), p)
                        }
                        // The cluster's event, signed by an agent's key.
                        Signer::Cluster => {
                            let h = Self::sign(&self.agent, &Signer::Cluster, &subject, &p);
                            (subject, Some(h), p)
                        }
                    }
                }
            }
            Target::Command(h) => {
                let subject = self.subjects.commands_for(h);
                let p = self.command(h);
                let signer = if self.rng.below(2) == 0 {
                    me
                } else {
                    Signer::Cluster
                };
                let headers = Self::sign(&self.agent, &signer, &subject, &p);
                (subject, Some(headers), p)
            }
            Target::Heartbeat(h) => {
                if self.rng.below(2) == 0 {
                    // Another HSM's heartbeat, signed as itself.
                    let subject = self.subjects.heartbeat(h);
                    let p = Self::heartbeat(&self.other);
                    let headers = Self::sign(&self.agent, &me, &subject, &p);
                    (subject, Some(headers), p)
                } else {
                    // Its own heartbeat, too old or from the future.
                    let subject = self.subjects.heartbeat(&self.agent_id);
                    let p = self.shifted(
                        Source::Hsm(self.agent_id.clone()),
                        Heartbeat {
                            hsm: self.agent_id.clone(),
                            token_keys: 0,
                            digest: InventoryDigest::default(),
                            outbox: 0,
                        },
                    );
                    let headers = Self::sign(&self.agent, &me, &subject, &p);
                    (subject, Some(headers), p)
                }
            }
            Target::Op(_) | Target::Status => {
                let subject = self.subject(t);
                let (_, e) = self.event(4, &self.agent_id, KeyId::new(), &pk);
                let p = Self::encode_event(e);
                let headers = Self::sign(&self.agent, &me, &subject, &p);
                (subject, Some(headers), p)
            }
        }
    }

    /// A captured real message: verbatim, with a new id, or moved.
    fn replay(&mut self, t: &Target, subject: &str) -> (String, Option<HeaderMap>, Vec<u8>) {
        let pool = |f: &Forge| match t {
            Target::Command(_) => f.commands.len(),
            Target::Heartbeat(_) => f.heartbeats.len(),
            _ => f.events.len(),
        };
        let pick = self.rng.below(pool(self));
        let c = match t {
            Target::Command(_) => self.commands[pick].clone(),
            Target::Heartbeat(_) => self.heartbeats[pick].clone(),
            _ => self.events[pick].clone(),
        };
        match (t, self.rng.below(3)) {
            (Target::Op(_) | Target::Status, _) => {
                (subject.to_string(), Some(c.headers), c.payload.to_vec())
            }
            (_, 0) => (c.subject, Some(c.headers), c.payload.to_vec()),
            (_, 1) => {
                let mut h = c.headers;
                h.insert(headers::MSG_ID, msg_id().as_str());
                (c.subject, Some(h), c.payload.to_vec())
            }
            _ => {
                let mut h = c.headers;
                h.insert(headers::MSG_ID, msg_id().as_str());
                (subject.to_string(), Some(h), c.payload.to_vec())
            }
        }
    }

    fn hostile(&mut self, i: usize) -> Hostile {
        let t = self.target(i);
        let subject = self.subject(&t);
        let roll = self.rng.below(100);
        let (subject, headers, payload) = match roll {
            0 => (subject, None, self.rng.bytes(OVERSIZED)),
            1..=25 => {
                let (h, p) = self.garbage(&t);
                (subject, h, p)
            }
            26..=45 => {
                let (h, p) = self.unsigned(&t);
                (subject, h, p)
            }
            46..=65 => {
                let (h, p) = self.rogue(&t, &subject);
                (subject, h, p)
            }
            66..=85 => self.real_agent(&t),
            _ => self.replay(&t, &subject),
        };
        // Half the key-operation requests ask for a reply (on an inbox:
        // agents answer nothing else).
        let reply = (matches!(t, Target::Op(_)) && self.rng.below(2) == 0)
            .then(|| format!("_INBOX.attacker.replies.{i}"));
        Hostile {
            subject,
            headers,
            payload,
            reply,
        }
    }
}

/// Reasons a hostile message may be rejected for. Anything else (an
/// unknown key or member, a conflicting create, a failed clone) would mean
/// a forged message got past the signature checks.
const HOSTILE_REASONS: &[RejectReason] = &[
    RejectReason::Unsigned,
    RejectReason::MalformedSignature,
    RejectReason::Unenrolled,
    RejectReason::BadSignature,
    RejectReason::SignerMismatch,
    RejectReason::Stale,
    RejectReason::Future,
    RejectReason::Replayed,
    RejectReason::SubjectMismatch,
    RejectReason::InvalidToken,
    RejectReason::BadJoinProof,
    RejectReason::Oversized,
    RejectReason::Truncated,
    RejectReason::BadMagic,
    RejectReason::UnknownVersion,
    RejectReason::WrongFamily,
    RejectReason::Malformed,
    RejectReason::TrailingBytes,
    RejectReason::WrongTarget,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_hostile_messages_change_nothing_and_real_keys_keep_syncing() {
    const TOTAL: usize = 10_000;
    let mut stack = {
        let _spawning = SPAWNING.read().await;
        start_stack(3).await
    };
    let client = stack.client().clone();
    let subjects = client.subjects().clone();
    let url = stack.url();
    let hsms = stack.hsm_ids();
    let attacker = async_nats::ConnectOptions::new()
        .name("attacker")
        .connect(url.as_str())
        .await
        .expect("an attacker connects");
    let js = async_nats::jetstream::new(attacker.clone());

    // Real traffic first, with real commands and heartbeats captured.
    let mut command_sub = attacker
        .subscribe(subjects.commands_all())
        .await
        .expect("subscribe");
    let mut heartbeat_sub = attacker
        .subscribe(subjects.all_heartbeats())
        .await
        .expect("subscribe");
    attacker.flush().await.expect("flush");
    let mut expected = create_many(&client, &hsms, 50, 8).await;
    assert_converges(&client, &hsms, &expected, Duration::from_secs(30)).await;
    let commands = capture(&mut command_sub, 40, Duration::from_millis(500)).await;
    drop(command_sub);
    let heartbeats = capture(&mut heartbeat_sub, 6, Duration::from_secs(5)).await;
    drop(heartbeat_sub);
    let events_stream = js
        .get_stream(subjects.events_stream())
        .await
        .expect("events stream");
    let mut events = Vec::new();
    for seq in 1..=200 {
        if let Ok(m) = events_stream.direct_get(seq).await {
            events.extend(Captured::new(
                m.subject.as_str(),
                &m.headers,
                m.payload.clone(),
            ));
        }
    }
    assert!(
        commands.len() >= 10 && heartbeats.len() >= 3 && events.len() >= 40,
        "captured {} commands, {} heartbeats, {} events",
        commands.len(),
        heartbeats.len(),
        events.len()
    );
    let status_before = status(&client).await;
    let mut agent_rejections_before = BTreeMap::new();
    for h in &hsms {
        let health = client.health(h).await.expect("health");
        agent_rejections_before.insert(h.clone(), total(&health.rejected));
    }

    // Verbatim replays of stored messages are dropped by JetStream itself:
    // the signature covers the deduplication id.
    let mut sent = 0;
    for c in events.iter().take(5).chain(commands.iter().take(5)) {
        let ack = js
            .publish_with_headers(c.subject.clone(), c.headers.clone(), c.payload.clone())
            .await
            .expect("publish")
            .await
            .expect("acknowledged");
        assert!(
            ack.duplicate,
            "a verbatim replay on {} was stored again (seq {})",
            c.subject, ack.sequence
        );
        sent += 1;
    }

    // The flood, while real keys keep being created.
    let hsm1 = hsm("hsm-1");
    let mut forge = Forge {
        subjects: subjects.clone(),
        rng: Rng(0x5eed_cafe_f00d_d00d),
        agent: load_identity(&stack.agent_identity(&hsm1)),
        agent_id: hsm1.clone(),
        other: hsm("hsm-2"),
        hsms: vec![hsm1, hsm("hsm-2"), hsm("hsm-3"), hsm("hsm-9")],
        rogues: (0..8).map(|_| Identity::generate().expect("rng")).collect(),
        events,
        commands,
        heartbeats,
    };
    let hostile: Vec<Hostile> = (sent..TOTAL).map(|i| forge.hostile(i)).collect();
    let asking = hostile.iter().filter(|m| m.reply.is_some()).count();
    let oversized = hostile
        .iter()
        .filter(|m| m.payload.len() > keysync_schemas::MAX_MESSAGE_BYTES)
        .count();
    assert!(
        asking > 0 && oversized > 0,
        "{asking} requests, {oversized} oversized"
    );
    let mut replies = attacker
        .subscribe("_INBOX.attacker.replies.>")
        .await
        .expect("subscribe");
    attacker.flush().await.expect("flush");
    let flood = async {
        for chunk in hostile.chunks(250) {
            for m in chunk {
                let payload = Bytes::from(m.payload.clone());
                let subject = m.subject.clone();
                let r = match (&m.reply, &m.headers) {
                    (Some(r), Some(h)) => {
                        attacker
                            .publish_with_reply_and_headers(subject, r.clone(), h.clone(), payload)
                            .await
                    }
                    (Some(r), None) => {
                        attacker
                            .publish_with_reply(subject, r.clone(), payload)
                            .await
                    }
                    (None, Some(h)) => {
                        attacker
                            .publish_with_headers(subject, h.clone(), payload)
                            .await
                    }
                    (None, None) => attacker.publish(subject, payload).await,
                };
                r.expect("publish");
            }
            attacker.flush().await.expect("flush");
        }
    };
    let real = create_many(&client, &hsms, 100, 8);
    let ((), during) = tokio::join!(flood, real);
    sent += hostile.len();
    assert_eq!(sent, TOTAL);
    expected.extend(during);
    // And after it.
    expected.extend(create_many(&client, &hsms, 10, 5).await);
    assert_eq!(expected.len(), 160);

    // Every key-operation request was answered with an error.
    let mut answered = 0;
    let mut accepted = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while answered < asking {
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline, replies.next()).await else {
            break;
        };
        answered += 1;
        match keysync_schemas::decode::<OpReply>(&msg.payload).map(|e| e.body) {
            Ok(OpReply::Error(e)) if e.kind == OpErrorKind::BadRequest => {}
            other => accepted.push(format!("{}: {other:?}", msg.subject)),
        }
    }
    assert!(
        accepted.is_empty(),
        "hostile requests not refused: {accepted:#?}"
    );
    assert_eq!(answered, asking, "hostile requests left unanswered");

    // The orchestrator has read everything that was stored, and the
    // agents have worked through their queues.
    let mut events_stream = events_stream;
    let stored_until = events_stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    let folded = wait_until(Duration::from_secs(60), || async {
        client
            .cluster_status()
            .await
            .is_ok_and(|s| s.last_seq >= stored_until)
    })
    .await;
    assert!(folded, "the orchestrator did not fold up to {stored_until}");
    let commands_stream = js
        .get_stream(subjects.commands_stream())
        .await
        .expect("commands stream");
    for h in &hsms {
        let drained = wait_until(Duration::from_secs(60), || async {
            let Ok(mut c) = commands_stream
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
                    &subjects.agent_consumer(h),
                )
                .await
            else {
                return false;
            };
            c.info()
                .await
                .is_ok_and(|i| i.num_pending == 0 && i.num_ack_pending == 0)
        })
        .await;
        assert!(drained, "{h} did not work through its command queue");
    }

    // Nothing died.
    for h in &hsms {
        let agent = stack.agent(h).expect("agent");
        assert!(agent.is_running(), "{h} died:\n{}", log_tail(agent.log()));
    }
    let orchestrator = stack.orchestrator("orchestrator").expect("orchestrator");
    assert!(
        orchestrator.is_running(),
        "the orchestrator died:\n{}",
        log_tail(orchestrator.log())
    );

    // Nothing changed but the real keys.
    let n = expected.len() as u64;
    let settled = wait_until(Duration::from_secs(60), || async {
        client.cluster_status().await.is_ok_and(|s| {
            s.keys == n
                && s.replicated == n
                && s.pending_clones == 0
                && s.members.iter().all(|m| m.state.as_str() == "in-service")
        })
    })
    .await;
    let status_after = status(&client).await;
    assert!(
        settled,
        "the cluster did not settle on {n} keys: {status_after:?}"
    );
    assert_converges(&client, &hsms, &expected, Duration::from_secs(60)).await;
    let ids = |s: &ClusterStatus| {
        s.members
            .iter()
            .map(|m| m.hsm_id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&status_after),
        ids(&status_before),
        "membership changed"
    );
    assert_eq!(
        status_after.enrolled, status_before.enrolled,
        "enrollment changed"
    );
    assert_eq!(status_after.clone_failures, status_before.clone_failures);
    assert!(status_after.cluster_key.is_some());
    assert_eq!(status_after.cluster_key, status_before.cluster_key);

    // Rejected, by the expected reasons, and counted.
    let grew = |reason: RejectReason| {
        count(&status_after.rejected, reason) > count(&status_before.rejected, reason)
    };
    for reason in [
        RejectReason::Unsigned,
        RejectReason::MalformedSignature,
        RejectReason::Unenrolled,
        RejectReason::BadSignature,
        RejectReason::SignerMismatch,
        RejectReason::SubjectMismatch,
        RejectReason::InvalidToken,
        RejectReason::Replayed,
        RejectReason::Stale,
        RejectReason::Future,
        RejectReason::BadMagic,
    ] {
        assert!(
            grew(reason),
            "the orchestrator did not count {reason}: {:?}",
            status_after.rejected
        );
    }
    for (reason, n) in &status_after.rejected {
        assert!(
            HOSTILE_REASONS.contains(reason),
            "unexpected orchestrator rejection {reason} ({n}): {:?}",
            status_after.rejected
        );
    }
    for h in &hsms {
        let health = client.health(h).await.expect("health");
        assert!(
            total(&health.rejected) > agent_rejections_before[h],
            "{h} rejected nothing: {:?}",
            health.rejected
        );
        for (reason, n) in &health.rejected {
            assert!(
                HOSTILE_REASONS.contains(reason) || *reason == RejectReason::NoReplySubject,
                "{h}: unexpected rejection {reason} ({n}): {:?}",
                health.rejected
            );
        }
    }
    let filed = dead_letters(&url, 1).await["total"].as_u64().unwrap_or(0);
    assert!(filed > 0, "no dead letters");
    let dlq = dead_letters(&url, filed).await;
    let letters = dlq["letters"].as_array().cloned().unwrap_or_default();
    assert!(!letters.is_empty());
    let mut reasons = BTreeSet::new();
    let mut op_letters = 0;
    for l in &letters {
        let reason: RejectReason = l["reason"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("a dead letter without a known reason: {l}"));
        assert!(
            HOSTILE_REASONS.contains(&reason),
            "unexpected dead letter: {l}"
        );
        let subject = l["subject"].as_str().unwrap_or_default();
        if subject.ends_with(".op") {
            op_letters += 1;
            assert_eq!(
                l["payload_kept"], false,
                "a rejected key operation request was kept whole: {l}"
            );
        }
        reasons.insert(reason);
    }
    assert!(
        op_letters > 0,
        "no rejected key operation request among {} letters",
        letters.len()
    );
    let restarts = ["orchestrator.log", "hsm-1.log", "hsm-2.log", "hsm-3.log"].map(|name| {
        let log = std::fs::read_to_string(stack.dir().join("logs").join(name)).unwrap_or_default();
        (name, log.matches("starting again").count())
    });
    println!(
        "{sent} hostile messages: {filed} dead letters; orchestrator rejections {:?}; latest letters' reasons {reasons:?}; runs restarted {restarts:?}",
        status_after.rejected
    );
}

// ---------------------------------------------------------------------------
// 5. Logs
// ---------------------------------------------------------------------------

/// Restores `RUST_LOG` when dropped.
struct RestoreRustLog(Option<std::ffi::OsString>);

impl Drop for RestoreRustLog {
    fn drop(&mut self) {
        match self.0.take() {
            Some(v) => std::env::set_var("RUST_LOG", v),
            None => std::env::remove_var("RUST_LOG"),
        }
    }
}

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64(bytes: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(alphabet[((n >> (18 - 6 * i)) & 63) as usize]));
        }
        if pad {
            for _ in chunk.len()..3 {
                out.push('=');
            }
        }
    }
    out
}

/// Maps bytes one to one onto chars, so that binary needles and text
/// needles are searched in the same string.
fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

/// The ways a secret could be written into a log.
fn written_forms(secret: &[u8]) -> Vec<(String, String)> {
    let mut forms = vec![
        ("raw bytes".to_string(), latin1(secret)),
        ("lowercase hex".to_string(), hex::encode(secret)),
        ("uppercase hex".to_string(), hex::encode_upper(secret)),
        ("Debug list".to_string(), format!("{secret:?}")),
    ];
    let escaped = format!("{:?}", Bytes::copy_from_slice(secret));
    forms.push((
        "escaped bytes".to_string(),
        escaped
            .trim_start_matches("b\"")
            .trim_end_matches('"')
            .to_string(),
    ));
    for (name, alphabet) in [("base64", STANDARD), ("url-safe base64", URL_SAFE)] {
        forms.push((name.to_string(), base64(secret, alphabet, true)));
        // Inside a longer base64 text the secret may start at any byte
        // offset modulo 3: keep the characters its bytes alone determine.
        for offset in 0..3usize {
            let mut shifted = vec![0u8; offset];
            shifted.extend_from_slice(secret);
            let text = base64(&shifted, alphabet, false);
            let first = (8 * offset).div_ceil(6);
            let last = 8 * (offset + secret.len()) / 6;
            forms.push((
                format!("{name} at offset {offset}"),
                text[first..last].to_string(),
            ));
        }
    }
    forms
}

/// A known leak, reported and not yet fixed: at `RUST_LOG=trace`,
/// The log line holding byte `at`, shortened, for the failure message.
fn line_around(text: &str, at: usize) -> String {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let line: String = text[start..end].chars().take(600).collect();
    line.replace('\u{1b}', "")
}

fn secret_of_hex_file(path: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    hex::decode(text.trim()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sha256(label: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(label.as_bytes()).into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_material_appears_in_any_log_at_trace_level() {
    use ed25519_dalek::pkcs8::{DecodePublicKey as _, EncodePrivateKey as _};
    use signature::Verifier as _;

    let dir = tempfile::Builder::new()
        .prefix("keysync-logs-")
        .tempdir()
        .expect("tempdir");
    let mut options: StackOptions = fast_options(3);
    options.data_dir = Some(dir.path().to_path_buf());
    // Only this stack's processes run at trace level (see SPAWNING).
    let stack = {
        let _exclusive = SPAWNING.write().await;
        let _restore = RestoreRustLog(std::env::var_os("RUST_LOG"));
        std::env::set_var("RUST_LOG", "trace");
        DevStack::start(options)
            .await
            .unwrap_or_else(|e| panic!("stack did not start: {e}"))
    };
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();
    let (h1, h2, h3) = (hsm("hsm-1"), hsm("hsm-2"), hsm("hsm-3"));
    let all = |on: &HsmId, t| {
        CreateKey::new(t)
            .on(Route::Hsm(on.clone()))
            .durability(Durability::All)
    };

    // Known keys, imported in plaintext.
    let seed = sha256("keysync security test: Ed25519 seed");
    let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
    let pkcs8 = signing.to_pkcs8_der().expect("pkcs8").as_bytes().to_vec();
    let aes = sha256("keysync security test: AES-256 key");
    let ed = client
        .import_key(all(&h1, KeyType::Ed25519), pkcs8.clone())
        .await
        .expect("import the Ed25519 key");
    let sym = client
        .import_key(all(&h2, KeyType::Aes256), aes.to_vec())
        .await
        .expect("import the AES key");
    let mut expected = BTreeMap::from([
        (ed.info.key_id, ed.info.fingerprint),
        (sym.info.key_id, sym.info.fingerprint),
    ]);
    assert_converges(&client, &hsms, &expected, Duration::from_secs(30)).await;

    // Used on replicas.
    let sig = client
        .sign(ed.info.key_id, b"logged?", &Route::Hsm(h3.clone()))
        .await
        .expect("sign on hsm-3");
    let spki = client
        .public_key(ed.info.key_id, &Route::Hsm(h2.clone()))
        .await
        .expect("public key");
    let vk = ed25519_dalek::VerifyingKey::from_public_key_der(&spki).expect("spki");
    assert_eq!(vk, signing.verifying_key());
    vk.verify(
        b"logged?",
        &ed25519_dalek::Signature::from_slice(&sig).expect("signature"),
    )
    .expect("a valid signature by the imported key");
    let sealed = client
        .encrypt(
            sym.info.key_id,
            b"plaintext",
            b"aad",
            &Route::Hsm(h3.clone()),
        )
        .await
        .expect("encrypt on hsm-3");
    let opened = client
        .decrypt(sym.info.key_id, &sealed, b"aad", &Route::Hsm(h1.clone()))
        .await
        .expect("decrypt on hsm-1");
    assert_eq!(opened.expose(), b"plaintext");

    // Deleted everywhere.
    client
        .delete_key(sym.info.key_id, &Route::Hsm(h1.clone()))
        .await
        .expect("delete the AES key");
    expected.remove(&sym.info.key_id);
    assert_converges(&client, &hsms, &expected, Duration::from_secs(30)).await;

    // Every secret the stack holds, and the logs of every process.
    let mut secrets: Vec<(String, Vec<u8>)> = vec![
        ("the imported Ed25519 seed".into(), seed.to_vec()),
        ("the imported Ed25519 PKCS#8".into(), pkcs8),
        ("the imported AES-256 key".into(), aes.to_vec()),
        (
            "the domain key".into(),
            secret_of_hex_file(stack.domain_key()),
        ),
        (
            "the cluster identity".into(),
            secret_of_hex_file(stack.cluster_identity()),
        ),
    ];
    for h in &hsms {
        secrets.push((
            format!("{h}'s identity"),
            secret_of_hex_file(&stack.agent_identity(h)),
        ));
    }
    let hsm1_public = load_identity(&stack.agent_identity(&h1)).public_hex();
    let aes_id = sym.info.key_id.to_string();
    stack.shutdown().await;

    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir.path().join("logs"))
        .expect("logs dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    logs.push(dir.path().join("nats/nats-server.log"));
    logs.sort();
    let mut found = Vec::new();
    let mut bytes_read = 0;
    let mut texts = BTreeMap::new();
    for path in &logs {
        let raw = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        bytes_read += raw.len();
        let text = latin1(&raw);
        for (what, secret) in &secrets {
            for (form, needle) in written_forms(secret) {
                for (at, _) in text.match_indices(needle.as_str()) {
                    let line = line_around(&text, at);
                    found.push(format!("{what} as {form} in {}: {line}", path.display()));
                }
            }
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        texts.insert(name, text);
    }
    assert!(found.is_empty(), "key material in the logs: {found:#?}");
    // The logs were worth reading: every process logged, below info level
    // (RUST_LOG=trace; async-nats itself is capped at info because it logs
    // raw payloads), the keys' lives are in them, and the search finds
    // what is there.
    for name in ["orchestrator.log", "hsm-1.log", "hsm-2.log", "hsm-3.log"] {
        let text = texts
            .get(name)
            .unwrap_or_else(|| panic!("no {name} among {:?}", texts.keys()));
        assert!(text.lines().count() >= 5, "{name} is nearly empty");
    }
    assert!(
        texts
            .values()
            .any(|t| t.contains("TRACE") || t.contains("DEBUG")),
        "no process logged below info level"
    );
    assert!(
        texts["orchestrator.log"].contains(&aes_id),
        "the orchestrator's log never mentions the deleted key {aes_id}"
    );
    assert!(
        written_forms(&hex::decode(&hsm1_public).expect("hex"))
            .iter()
            .any(|(_, needle)| texts["hsm-1.log"].contains(needle.as_str())),
        "the search does not find hsm-1's public key, which its log shows"
    );
    println!(
        "searched {} log files ({bytes_read} bytes) for {} secrets in {} forms each",
        logs.len(),
        secrets.len(),
        written_forms(&seed).len()
    );
}

/// Up to `n` signed messages from `sub`, waiting at most `wait` for each.
async fn capture(sub: &mut async_nats::Subscriber, n: usize, wait: Duration) -> Vec<Captured> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(wait, sub.next()).await {
            Ok(Some(m)) => out.extend(
                m.headers
                    .as_ref()
                    .and_then(|h| Captured::new(m.subject.as_str(), h, m.payload.clone())),
            ),
            _ => break,
        }
    }
    out
}
