//! A full disk under one HSM, on real processes: hsm-3's `--data-dir` is a
//! small tmpfs filled to the last byte while keys are created elsewhere.
//! Its clones must wait (never logged as `CloneFailed`, still pending for
//! the orchestrator, counted by the agent as retried), its own creates must
//! fail cleanly, and once the filler is deleted it must catch up by itself,
//! without a restart.
//!
//! Mounting needs root (CI is root); elsewhere the test says why and passes
//! without running.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::{Duration, Instant};

use keysync::{CreateKey, Route};
use keysync_schemas::{
    decode, encode, CloneBatch, CloneKey, Command, DeadLetter, Envelope, Event, HsmId, KeyId,
    KeyType, OpErrorKind, Source,
};
use keysync_security::{signed_headers, Identity, Signer};
use keysync_testkit::{
    assert_converges, count_events, create, create_many, fast_options, hsm, inventory, wait_until,
    DevStack,
};

/// The HSM whose disk fills up.
const FULL: &str = "hsm-3";
/// Keys created while it is full.
const KEYS_WHILE_FULL: usize = 50;

/// A tmpfs mounted for the test, unmounted when dropped (also when the test
/// panics; the stack, declared after it, is dropped and its processes
/// reaped first).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it) on `path`,
    /// or says why it cannot.
    fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
            })
            .unwrap_or_default();
        if uid != "0" {
            return Err(format!("not root (effective uid {uid:?})"));
        }
        std::fs::create_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let out = Process::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "keysync-disk-full",
            ])
            .arg(path)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        for _ in 0..50 {
            let unmounted = Process::new("umount")
                .arg(&self.path)
                .status()
                .is_ok_and(|s| s.success());
            if unmounted {
                return;
            }
            // A process that was just killed may still hold a file open.
            std::thread::sleep(Duration::from_millis(100));
        }
        let lazy = Process::new("umount").arg("-l").arg(&self.path).status();
        eprintln!("{}: lazy unmount: {lazy:?}", self.path.display());
    }
}

/// Fills the file system under `path` with a filler file until it reports
/// ENOSPC (in ever smaller writes, so the last free block goes too).
/// Returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path)
        .unwrap_or_else(|e| panic!("creating the filler {}: {e}", path.display()));
    let chunk = vec![0xa5u8; 1 << 16];
    let mut written = 0u64;
    for size in [1 << 16, 4096, 512, 1] {
        loop {
            match f.write(&chunk[..size]) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("writing the filler: {e}"),
            }
        }
    }
    written
}

/// A 3-HSM stack (fast failure detection) whose hsm-3 keeps its data on a
/// 16 MiB tmpfs. Fields drop in order: the processes are reaped before the
/// tmpfs is unmounted, and that before the temp dir is removed.
struct SmallDiskStack {
    stack: DevStack,
    _tmpfs: Tmpfs,
    full_dir: PathBuf,
    root: tempfile::TempDir,
}

impl SmallDiskStack {
    /// The stack, or `None` (having said why) where no tmpfs can be mounted.
    async fn start() -> Option<SmallDiskStack> {
        let root = tempfile::Builder::new()
            .prefix("keysync-disk-full-")
            .tempdir()
            .expect("temp dir");
        let full_dir = root.path().join(FULL);
        let tmpfs = match Tmpfs::mount(&full_dir, "16m") {
            Ok(m) => m,
            Err(why) => {
                println!("skipping the disk-full test: {why}");
                return None;
            }
        };
        let mut options = fast_options(3);
        options.data_dir = Some(root.path().to_path_buf());
        let stack = DevStack::start(options)
            .await
            .unwrap_or_else(|e| panic!("stack did not start: {e}"));
        Some(SmallDiskStack {
            stack,
            _tmpfs: tmpfs,
            full_dir,
            root,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hsm_whose_disk_is_full_catches_up_once_space_is_freed() {
    let Some(small) = SmallDiskStack::start().await else {
        return;
    };
    let (root, full_dir, stack) = (&small.root, &small.full_dir, &small.stack);
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();
    let (h1, h2, h3) = (hsm("hsm-1"), hsm("hsm-2"), hsm(FULL));

    // Some keys everywhere first, so that the full HSM's store is not empty.
    let mut expected = create_many(&client, &hsms, 6, 6).await;
    assert_converges(&client, &hsms, &expected, Duration::from_secs(30)).await;

    // hsm-3's disk fills up.
    let filler = full_dir.join("filler");
    let filled = fill(&filler);
    println!("filler: {filled} bytes until ENOSPC");

    let while_full = create_many(&client, &[h1.clone(), h2.clone()], KEYS_WHILE_FULL, 8).await;
    assert_converges(
        &client,
        &[h1.clone(), h2.clone()],
        &{
            let mut all = expected.clone();
            all.extend(while_full.iter().map(|(k, f)| (*k, *f)));
            all
        },
        Duration::from_secs(30),
    )
    .await;

    // The fault really happened: the agent counts clones that failed for a
    // passing reason, the orchestrator still counts them pending, and the
    // full HSM lacks the keys.
    let counted = wait_until(Duration::from_secs(30), || async {
        client.health(&h3).await.is_ok_and(|h| h.clones_retried > 0)
    })
    .await;
    let health = client.health(&h3).await.expect("health");
    let status = client.cluster_status().await.expect("status");
    assert!(
        counted,
        "the full HSM counted no retried clone: {:?}; cluster: pending {}, failures {}",
        health.rejected, status.pending_clones, status.clone_failures
    );
    assert!(
        status.pending_clones > 0,
        "the clones to the full HSM are not pending: {status:?}"
    );
    let held = inventory(&client, &h3).await;
    let lacking = while_full.keys().filter(|k| !held.contains_key(k)).count();
    println!(
        "while full: {h3} lacks {lacking} of {KEYS_WHILE_FULL} keys; pending_clones {}; clone_retried {}",
        status.pending_clones,
        health.clones_retried
    );
    assert!(lacking > 0, "{h3} stored every key on a full disk");
    // And it goes on: every missing key is retried again and again (with
    // growing delays) while the disk stays full.
    let rounds = 4 * lacking as u64;
    let retried = wait_until(Duration::from_secs(60), || async {
        client
            .health(&h3)
            .await
            .is_ok_and(|h| h.clones_retried >= rounds)
    })
    .await;
    let health = client.health(&h3).await.expect("health");
    assert!(
        retried,
        "fewer than {rounds} retries while full: {:?}",
        health.rejected
    );
    // (A few keys may land meanwhile, in pages redb frees when it rolls
    // back a failed commit; most cannot.)
    let held = inventory(&client, &h3).await;
    let still_lacking = while_full.keys().filter(|k| !held.contains_key(k)).count();
    println!(
        "after {} retries: {h3} still lacks {still_lacking} keys",
        health.clones_retried
    );
    assert!(still_lacking > 0, "{h3} stored every key on a full disk");
    assert_eq!(
        client
            .cluster_status()
            .await
            .expect("status")
            .clone_failures,
        0
    );

    // Its own create fails cleanly: an `unavailable` error naming the store,
    // and nothing stored (checked again once the store is readable).
    match client
        .create_key(CreateKey::new(KeyType::Rsa2048).on(Route::Hsm(h3.clone())))
        .await
    {
        Err(keysync::Error::Operation(e)) => {
            println!("create on the full HSM: {e}");
            assert_eq!(e.kind, OpErrorKind::Unavailable, "{e}");
            assert!(e.message.contains("store"), "{e}");
        }
        other => panic!("a create on a full disk did not fail cleanly: {other:?}"),
    }
    let after_create = inventory(&client, &h3).await;
    assert!(
        after_create
            .keys()
            .all(|k| expected.contains_key(k) || while_full.contains_key(k)),
        "the failed create left a key behind"
    );

    // Space is freed: it catches up by itself.
    std::fs::remove_file(&filler).expect("removing the filler");
    let freed = Instant::now();
    expected.extend(while_full);
    assert_converges(&client, &hsms, &expected, Duration::from_secs(120)).await;
    let caught_up = freed.elapsed();
    let settled = wait_until(Duration::from_secs(30), || async {
        client.cluster_status().await.is_ok_and(|s| {
            s.pending_clones == 0 && s.members.iter().all(|m| m.state.as_str() == "in-service")
        })
    })
    .await;
    let status = client.cluster_status().await.expect("status");
    assert!(
        settled,
        "clones still pending after the catch-up: {status:?}"
    );
    let health = client.health(&h3).await.expect("health");
    println!(
        "{h3} caught up {:.2} s after space was freed; clone_retried {}",
        caught_up.as_secs_f64(),
        health.clones_retried
    );
    assert_eq!(
        count_events(&client, &format!("keysync.evt.key.*.failed.{FULL}")).await,
        0,
        "a CloneFailed was logged for the full HSM"
    );
    assert_eq!(status.clone_failures, 0, "{status:?}");
    let log = std::fs::read_to_string(root.path().join(format!("logs/{FULL}.log")))
        .expect("the agent's log");
    let handed_back: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("handed back to retry"))
        .collect();
    println!(
        "{} retry log lines; last: {}",
        handed_back.len(),
        handed_back.last().unwrap_or(&"")
    );
    assert!(!handed_back.is_empty());

    // Nothing of the failed create surfaced once the store was readable
    // again: no outbox entry (a key and its outbox entry are stored
    // together), and every HSM holds exactly the expected keys.
    assert_eq!(health.outbox, 0, "the failed create left an outbox entry");

    // And its own creates work again, and reach the others.
    let k = create(&client, KeyType::Ed25519, &h3).await;
    expected.insert(k.info.key_id, k.info.fingerprint);
    assert_converges(&client, &hsms, &expected, Duration::from_secs(30)).await;
}

/// The `CloneKey` the orchestrator would send `target` for `key`, from the
/// key's `KeyCreated` in the events stream.
async fn clone_command(
    events: &async_nats::jetstream::stream::Stream,
    client: &keysync::Client,
    key: &KeyId,
    target: &HsmId,
) -> CloneKey {
    let msg = events
        .direct_get_last_for_subject(client.subjects().key_created(key))
        .await
        .unwrap_or_else(|e| panic!("KeyCreated of {key}: {e}"));
    match decode::<Event>(&msg.payload).map(|env| env.body) {
        Ok(Event::KeyCreated(created)) => CloneKey {
            target: target.clone(),
            created_seq: msg.sequence,
            key: created,
        },
        other => panic!("not a KeyCreated: {other:?}"),
    }
}

/// How many events were stored on `subject`, by stream sequence: those the
/// events stream holds, and those the orchestrator refused and removed
/// from it after filing them as dead letters (one letter per stored copy).
async fn stored_on(client: &keysync::Client, subject: &str) -> usize {
    let js = async_nats::jetstream::new(client.nats().clone());
    let mut seqs = std::collections::BTreeSet::new();
    for (stream, filter) in [
        (client.subjects().events_stream(), subject.to_string()),
        (
            client.subjects().dead_letter_stream(),
            client.subjects().dead_letters("orchestrator"),
        ),
    ] {
        let Ok(s) = js.get_stream(&stream).await else {
            continue;
        };
        let mut from = 1;
        while let Ok(m) = s
            .direct_get_next_for_subject(filter.as_str(), Some(from))
            .await
        {
            from = m.sequence + 1;
            if m.subject.as_str() == subject {
                seqs.insert(m.sequence);
            } else if let Ok(letter) = decode::<DeadLetter>(&m.payload) {
                if letter.body.subject == subject {
                    seqs.extend(letter.body.stream_seq);
                }
            }
        }
    }
    seqs.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_on_a_full_disk_announces_each_decided_clone_once_and_retries_the_rest() {
    let Some(small) = SmallDiskStack::start().await else {
        return;
    };
    let stack = &small.stack;
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();
    let (h1, h2, h3) = (hsm("hsm-1"), hsm("hsm-2"), hsm(FULL));
    let mut expected = create_many(&client, &hsms, 6, 6).await;
    assert_converges(&client, &hsms, &expected, Duration::from_secs(30)).await;
    let (held, _) = expected.first_key_value().expect("a key");
    let held = *held;

    let filler = small.full_dir.join("filler");
    fill(&filler);
    let missing = create_many(&client, &[h1.clone(), h2.clone()], KEYS_WHILE_FULL, 8).await;

    // One batch command, signed with the cluster key as the orchestrator
    // signs them: a key hsm-3 holds (applied: already present), a tampered
    // one (failed for good: integrity), and the keys it lacks (transient).
    let js = async_nats::jetstream::new(client.nats().clone());
    let events = js
        .get_stream(client.subjects().events_stream())
        .await
        .expect("events stream");
    let mut clones = vec![clone_command(&events, &client, &held, &h3).await];
    let mut tampered = clones[0].clone();
    tampered.key.key_id = KeyId::new();
    tampered.key.wrapped[5] ^= 1;
    let tampered_id = tampered.key.key_id;
    clones.push(tampered);
    for key in missing.keys() {
        clones.push(clone_command(&events, &client, key, &h3).await);
    }
    let env = Envelope::new(
        Source::Orchestrator("orchestrator".into()),
        Command::CloneBatch(CloneBatch {
            target: h3.clone(),
            clones,
        }),
    );
    let payload = encode(&env).expect("encode");
    let subject = client.subjects().commands_for(&h3);
    let cluster = Identity::load(stack.cluster_identity()).expect("cluster identity");
    let headers = signed_headers(
        &cluster,
        &Signer::Cluster,
        &subject,
        &env.id.to_string(),
        &payload,
    );
    js.publish_with_headers(subject, headers, payload.into())
        .await
        .expect("publish")
        .await
        .expect("stored");

    let failed_subject = format!("keysync.evt.key.{tampered_id}.failed.{FULL}");
    // (The tampered key was never created, so the orchestrator refuses
    // its CloneFailed and removes it from the log once filed: count what
    // was stored, in the log or in the dead-letter stream.)
    let failed_once = wait_until(Duration::from_secs(30), || async {
        stored_on(&client, &failed_subject).await == 1
    })
    .await;
    assert!(failed_once, "the tampered clone was not logged as failed");
    // Its commit failed: some keys of the batch are still missing, so it was
    // handed back and will come again.
    let inv = inventory(&client, &h3).await;
    let lacking = missing.keys().filter(|k| !inv.contains_key(k)).count();
    println!(
        "batch taken on a full disk: {lacking} of its {KEYS_WHILE_FULL} missing keys not stored"
    );
    assert!(lacking > 0, "{h3} stored every key on a full disk");
    // Fan-out, then the batch.
    assert_eq!(keysync_testkit::count_applied(&client, &held, &h3).await, 2);

    std::fs::remove_file(&filler).expect("removing the filler");
    expected.extend(missing);
    assert_converges(&client, &hsms, &expected, Duration::from_secs(120)).await;
    // Every command taken, the batch included.
    let consumer = client.subjects().agent_consumer(&h3);
    let commands = js
        .get_stream(client.subjects().commands_stream())
        .await
        .expect("commands stream");
    let drained = wait_until(Duration::from_secs(60), || async {
        commands
            .consumer_info(consumer.clone())
            .await
            .is_ok_and(|i| i.num_pending == 0 && i.num_ack_pending == 0)
    })
    .await;
    assert!(drained, "commands left for {h3}");
    let health = client.health(&h3).await.expect("health");
    println!("batch done; clone_retried {}", health.clones_retried);
    // Redelivered at least once after space was freed, yet each decided
    // clone was announced once.
    assert_eq!(stored_on(&client, &failed_subject).await, 1);
    assert_eq!(keysync_testkit::count_applied(&client, &held, &h3).await, 2);
}
