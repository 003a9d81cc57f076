//! Lifecycle events for other languages, on a real stack, read by a real
//! third-party client: the Python consumer (`examples/python`, nats-py and
//! jsonschema) follows keys of every type and durability, a deletion, an
//! HSM failing and recovering, across an orchestrator failover; every event
//! is valid against its schema, in the signed log's order, stored once; a
//! consumer started after the fact replays the whole history; each event
//! names the fact it mirrors in the signed events stream.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;
use keysync::{CreateKey, Route};
use keysync_schemas::{decode, Durability, Event, KeyId, KeyType};
use keysync_testkit::{
    fast_options, hsm, next_metrics, on_secure_config, wait_for_state, wait_until, DevStack,
    StackOptions,
};

fn python() -> String {
    std::env::var("KEYSYNC_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn consumer_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/python/lifecycle_consumer.py")
}

/// Whether the Python consumer's libraries are there. Outside CI a missing
/// one skips the test (saying so); in CI it fails it (scripts/install-deps
/// installs them).
fn python_ready() -> bool {
    let ok = std::process::Command::new(python())
        .args(["-c", "import nats, jsonschema"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "nats-py or jsonschema missing for {} in CI (scripts/install-deps installs them)",
            python()
        );
        eprintln!(
            "skipped: {} lacks nats-py or jsonschema (pip install nats-py jsonschema)",
            python()
        );
    }
    ok
}

/// Starts the Python consumer with `args`; its stdout is read at the end.
fn start_consumer(url: &str, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(python())
        .arg(consumer_script())
        .args(["--nats", url])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", python()))
}

/// Waits for the consumer to end successfully and returns its JSON lines.
async fn lines_of(child: tokio::process::Child, within: Duration) -> Vec<serde_json::Value> {
    let out = tokio::time::timeout(within, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("the Python consumer did not finish within {within:?}"))
        .unwrap_or_else(|e| panic!("the Python consumer: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Python consumer failed ({}): {}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn field<'a>(v: &'a serde_json::Value, name: &str) -> &'a str {
    v[name].as_str().unwrap_or_default()
}

/// Position of the first event of `ty` about `subject`.
fn position(events: &[serde_json::Value], ty: &str, subject: &str) -> Option<usize> {
    events
        .iter()
        .position(|e| field(e, "type") == ty && field(e, "subject") == subject)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_follows_lifecycle_events_across_a_failover_and_replays_them() {
    if !python_ready() {
        return;
    }
    let mut stack = match DevStack::start(StackOptions { ..fast_options(3) }).await {
        Ok(s) => s,
        Err(e) => panic!("stack did not start: {e}"),
    };
    let url = stack.url();
    let client = stack.client().clone();
    stack
        .start_orchestrator_named("orchestrator-b")
        .await
        .expect("standby orchestrator");
    let (h1, h2, h3) = (hsm("hsm-1"), hsm("hsm-2"), hsm("hsm-3"));

    // A consumer running from the start, live.
    let live = start_consumer(
        &url,
        &[
            "--all",
            "--until",
            &format!("io.keysync.hsm.recovered.v1:{h3}"),
            "--idle",
            "3",
            "--timeout",
            "240",
        ],
    );

    // Every key type with every durability level, on hsm-1 and hsm-2; the
    // active orchestrator killed half-way.
    let levels = [
        Durability::None,
        Durability::Logged,
        Durability::Replicas(2),
        Durability::All,
    ];
    let mut keys: BTreeMap<KeyId, (KeyType, Durability)> = BTreeMap::new();
    for (i, (t, d)) in KeyType::ALL
        .iter()
        .flat_map(|t| levels.iter().map(move |d| (*t, *d)))
        .enumerate()
    {
        if i == 8 {
            assert_eq!(next_metrics(&client).await["orchestrator"], "orchestrator");
            stack.kill_orchestrator();
        }
        let on = if i % 2 == 0 { &h1 } else { &h2 };
        let k = client
            .create_key(CreateKey::new(t).on(Route::Hsm(on.clone())).durability(d))
            .await
            .unwrap_or_else(|e| panic!("creating {t} with {d}: {e}"));
        keys.insert(k.info.key_id, (t, d));
    }
    // The failover really happened: the standby publishes now.
    assert!(
        wait_until(Duration::from_secs(15), || async {
            next_metrics(&client).await["orchestrator"] == "orchestrator-b"
        })
        .await,
        "the standby never took over"
    );
    // One key deleted.
    let doomed = *keys.keys().next().expect("a key");
    client
        .delete_key(doomed, &Route::Hsm(h2.clone()))
        .await
        .expect("delete");
    // An HSM stopped and started again.
    stack.kill_agent(&h3);
    wait_for_state(&client, &h3, "failed", Duration::from_secs(15)).await;
    stack
        .start_agents(std::slice::from_ref(&h3))
        .await
        .expect("hsm-3 back");
    wait_for_state(&client, &h3, "in-service", Duration::from_secs(30)).await;

    let events = lines_of(live, Duration::from_secs(240)).await;
    // Valid, each stored once.
    for e in &events {
        assert_eq!(e["valid"], true, "invalid event: {e}");
    }
    let ids: Vec<&str> = events.iter().map(|e| field(e, "id")).collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "duplicate ids: {ids:?}");
    // In the signed log's order: by events-stream sequence, and within a
    // batch event (`ClonesApplied`, ids `events-<seq>-<i>`, decision 21)
    // by its index.
    let seqs: Vec<(u64, Option<u64>)> = events
        .iter()
        .map(|e| {
            let seq: u64 = field(e, "keysyncseq").parse().expect("keysyncseq");
            let id = field(e, "id");
            let index = id
                .strip_prefix(&format!("events-{seq}-"))
                .map(|i| i.parse().expect("a batch index"));
            assert!(
                index.is_some() || id == format!("events-{seq}"),
                "id {id} is not of seq {seq}"
            );
            (seq, index)
        })
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "not in events-stream order: {seqs:?}"
    );
    // Each key: created, then replicated; the deleted one, then deleted.
    for (id, (t, d)) in &keys {
        let id = id.to_string();
        let created = position(&events, "io.keysync.key.created.v1", &id)
            .unwrap_or_else(|| panic!("no created for {id}"));
        assert_eq!(events[created]["data"]["key_type"], t.as_str());
        assert_eq!(events[created]["data"]["durability"], d.to_string());
        let replicated = position(&events, "io.keysync.key.replicated.v1", &id)
            .unwrap_or_else(|| panic!("no replicated for {id} ({t}, {d})"));
        assert!(created < replicated, "{id}: replicated before created");
    }
    let doomed = doomed.to_string();
    let deleted = position(&events, "io.keysync.key.deleted.v1", &doomed).expect("deleted");
    assert!(position(&events, "io.keysync.key.replicated.v1", &doomed) < Some(deleted));
    let failed = position(&events, "io.keysync.hsm.failed.v1", h3.as_str()).expect("hsm failed");
    let recovered =
        position(&events, "io.keysync.hsm.recovered.v1", h3.as_str()).expect("hsm recovered");
    assert!(failed < recovered);
    // A key's events carry its trace context.
    assert!(events
        .iter()
        .filter(|e| field(e, "type") == "io.keysync.key.created.v1")
        .all(|e| field(e, "traceparent").starts_with("00-")));

    // Each event names its fact in the signed events stream.
    let js = jetstream::new(client.nats().clone());
    let log = js
        .get_stream(client.subjects().events_stream())
        .await
        .expect("events stream");
    for e in &events {
        let seq: u64 = field(e, "keysyncseq").parse().expect("seq");
        let (about, name) = field(e, "type")
            .strip_prefix("io.keysync.")
            .and_then(|t| t.strip_suffix(".v1"))
            .and_then(|t| t.split_once('.'))
            .expect("type");
        let fact = match log.direct_get(seq).await {
            Ok(m) => m,
            // A deleted key's KeyCreated is purged from the log
            // (crypto-shredding): the only fact the log no longer holds.
            Err(_) if field(e, "subject") == doomed && name == "created" => continue,
            Err(err) => panic!("fact {seq} of {e}: {err}"),
        };
        let fact_subject = fact.subject.to_string();
        if let Some(i) = field(e, "id").strip_prefix(&format!("events-{seq}-")) {
            // The i-th key of a batch of applied clones (decision 21).
            let i: usize = i.parse().expect("index");
            let Ok(Event::ClonesApplied(b)) = decode::<Event>(&fact.payload).map(|e| e.body) else {
                panic!("{e} does not name a batch");
            };
            assert_eq!(name, "applied", "{e}");
            assert_eq!(fact_subject, format!("keysync.evt.hsm.{}.applied", b.hsm));
            assert_eq!(b.applied[i].key_id.to_string(), field(e, "subject"), "{e}");
            continue;
        }
        let want = format!("keysync.evt.{about}.{}.", field(e, "subject"));
        assert!(fact_subject.starts_with(&want), "{fact_subject} vs {e}");
    }
    // Stored once: the stream holds exactly what the consumer saw.
    let mut lifecycle = js
        .get_stream(client.subjects().lifecycle_stream())
        .await
        .expect("lifecycle stream");
    let stored = lifecycle.info().await.expect("info").state.messages;
    assert_eq!(stored, events.len() as u64);

    // A consumer started after the fact replays the whole history.
    let late = start_consumer(&url, &["--all", "--idle", "2", "--timeout", "60"]);
    let replayed = lines_of(late, Duration::from_secs(90)).await;
    let replayed_ids: Vec<&str> = replayed.iter().map(|e| field(e, "id")).collect();
    assert_eq!(replayed_ids, ids);

    // The README's example: follow one key from created to replicated.
    let k = client
        .create_key(CreateKey::new(KeyType::P256).on(Route::Hsm(h1.clone())))
        .await
        .expect("create");
    let one = start_consumer(
        &url,
        &["--key", &k.info.key_id.to_string(), "--timeout", "30"],
    );
    let followed = lines_of(one, Duration::from_secs(60)).await;
    let types: Vec<&str> = followed.iter().map(|e| field(e, "type")).collect();
    assert_eq!(
        types.first(),
        Some(&"io.keysync.key.created.v1"),
        "{types:?}"
    );
    assert_eq!(
        types.last(),
        Some(&"io.keysync.key.replicated.v1"),
        "{types:?}"
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_mirror_off_nothing_is_mirrored() {
    let mut opts = fast_options(2);
    opts.orchestrator_args
        .extend(["--lifecycle-stream", "off"].map(String::from));
    let stack = match DevStack::start(opts).await {
        Ok(s) => s,
        Err(e) => panic!("stack did not start: {e}"),
    };
    let client = stack.client().clone();
    client
        .create_key(
            CreateKey::new(KeyType::Ed25519)
                .on(Route::Hsm(hsm("hsm-1")))
                .durability(Durability::All),
        )
        .await
        .expect("create");
    let js = jetstream::new(client.nats().clone());
    assert!(
        js.get_stream(client.subjects().lifecycle_stream())
            .await
            .is_err(),
        "the lifecycle stream exists with the mirror off"
    );
    stack.shutdown().await;
}

/// Under the production permissions (`deploy/nats/secure.conf`), the
/// auditor role — a SIEM's or a service's read-only user — follows a key's
/// lifecycle events with the Python consumer: the stream is readable by
/// name with its own inbox prefix, and nothing else is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auditor_role_reads_the_lifecycle_stream_under_the_secure_config() {
    if !python_ready() {
        return;
    }
    let stack = match DevStack::start(on_secure_config(fast_options(2))).await {
        Ok(s) => s,
        Err(e) => panic!("stack did not start: {e}"),
    };
    let url = stack.url();
    let k = stack
        .client()
        .create_key(
            CreateKey::new(KeyType::P256)
                .on(Route::Hsm(hsm("hsm-1")))
                .durability(Durability::All),
        )
        .await
        .expect("create");
    let auditor = start_consumer(
        &url,
        &[
            "--key",
            &k.info.key_id.to_string(),
            "--timeout",
            "30",
            "--user",
            "auditor",
            "--password",
            "auditor-dev-secret",
            "--inbox-prefix",
            "_INBOX.auditor",
        ],
    );
    let followed = lines_of(auditor, Duration::from_secs(60)).await;
    let types: Vec<&str> = followed.iter().map(|e| field(e, "type")).collect();
    assert_eq!(
        types,
        [
            "io.keysync.key.created.v1",
            "io.keysync.key.applied.v1",
            "io.keysync.key.replicated.v1"
        ],
        "the auditor's view of one key"
    );
    stack.shutdown().await;
}

/// A forged event (a `KeyCreated` under a signature the cluster key did
/// not make) is refused by the fold, and the mirror, taking the fold's
/// verdicts, never mirrors it: only the real `created` is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_event_is_never_mirrored() {
    let stack = keysync_testkit::start_stack(3).await;
    let client = stack.client().clone();
    let subjects = client.subjects().clone();
    let create = |on: &str| {
        let client = client.clone();
        let on = hsm(on);
        async move {
            client
                .create_key(
                    CreateKey::new(KeyType::P256)
                        .on(Route::Hsm(on))
                        .durability(Durability::Logged),
                )
                .await
                .unwrap_or_else(|e| panic!("create: {e}"))
        }
    };
    // Given a real key and its signed KeyCreated,
    let real = create("hsm-1").await;
    let key_id = real.info.key_id;
    let created_seq = real.created_seq.expect("a logged create has a sequence");
    let js = jetstream::new(client.nats().clone());
    let original = js
        .get_stream(subjects.events_stream())
        .await
        .expect("events stream")
        .direct_get(created_seq)
        .await
        .expect("the KeyCreated");
    // when the same bytes are published again under a new id, signed by a
    // key that is not the cluster's,
    let forger = keysync_security::Identity::generate().expect("rng");
    let subject = subjects.key_created(&key_id);
    let h = keysync_security::signed_headers(
        &forger,
        &keysync_security::Signer::Cluster,
        &subject,
        "forged-created",
        &original.payload,
    );
    let forged_seq = js
        .publish_with_headers(subject, h, original.payload.clone())
        .await
        .expect("publish")
        .await
        .expect("stored")
        .sequence;
    // and the mirror has gone past it (a key created after it is mirrored),
    let later = create("hsm-2").await;
    let later_created = subjects.lifecycle_key(&later.info.key_id.to_string(), "created");
    let mirrored_later = wait_until(Duration::from_secs(30), || async {
        !keysync_testkit::stored_messages(&client, &subjects.lifecycle_stream(), &later_created)
            .await
            .is_empty()
    })
    .await;
    assert!(mirrored_later, "the mirror did not reach the later key");
    assert!(
        later.created_seq.expect("logged") > forged_seq,
        "the forged event is before the later key in the log"
    );
    // then the forged fact is nowhere in the lifecycle stream, and the real
    // key has its one `created`.
    let all = keysync_testkit::stored_messages(
        &client,
        &subjects.lifecycle_stream(),
        &subjects.lifecycle_all(),
    )
    .await;
    let forged_id = format!("events-{forged_seq}");
    let ids: Vec<String> = all
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
            v["id"].as_str().expect("id").to_string()
        })
        .collect();
    assert!(
        !ids.contains(&forged_id),
        "{forged_id} was mirrored: {ids:?}"
    );
    let created = keysync_testkit::stored_messages(
        &client,
        &subjects.lifecycle_stream(),
        &subjects.lifecycle_key(&key_id.to_string(), "created"),
    )
    .await;
    assert_eq!(created.len(), 1, "the real key's created, once");
    let v: serde_json::Value = serde_json::from_slice(&created[0].payload).expect("json");
    assert_eq!(v["id"], format!("events-{created_seq}"));
}
