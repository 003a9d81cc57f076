//! Issue 12, item 6, on real processes: an agent's files are private to
//! it, it stops on SIGTERM within its grace even while NATS is down, and a
//! dead letter anyone forged is told apart from one a process filed.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use keysync_schemas::{encode, DeadLetter, Envelope, OpErrorKind, OpReply, RejectReason, Source};
use keysync_testkit::{hsm, keysync_cli, start_stack, wait_until, DevStack, StackOptions};

/// A path's permission bits, in octal ("700").
fn octal(path: &Path) -> String {
    format!("{:o}", mode(path))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every file and directory under `dir` that group or others may access.
fn shared_entries(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        let m = mode(&path);
        if m & 0o077 != 0 {
            out.push(format!("{} {m:o}", path.display()));
        }
        if path.is_dir() {
            out.extend(shared_entries(&path));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_data_dirs_and_files_are_private() {
    // A stack dir that does not exist yet, as `keysync dev --data-dir`.
    let parent = tempfile::tempdir().expect("tempdir");
    let dir = parent.path().join("stack");
    let mut stack = DevStack::start(StackOptions {
        hsms: 1,
        data_dir: Some(dir.clone()),
        ..Default::default()
    })
    .await
    .expect("stack");
    let h1 = hsm("hsm-1");
    let data = dir.join("hsm-1");
    // The agent made its files: identity, keystore, pinned cluster key.
    for file in ["identity.key", "keystore.redb", "cluster.pub"] {
        assert!(data.join(file).is_file(), "{file} exists");
    }
    let mut open = Vec::new();
    for d in [&dir, &data] {
        if mode(d) & 0o077 != 0 {
            open.push(format!("{} {}", d.display(), octal(d)));
        }
    }
    open.extend(shared_entries(&data));
    assert_eq!(
        open,
        Vec::<String>::new(),
        "the stack dir, the agent's data dir and its files must be 0700/0600"
    );

    // An agent started on a data dir left open by an older version
    // closes it again.
    stack.kill_agent(&h1);
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(
        data.join("keystore.redb"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    stack
        .start_agents(std::slice::from_ref(&h1))
        .await
        .expect("restart");
    assert_eq!(octal(&data), "700", "the agent's data dir after a restart");
    assert_eq!(octal(&data.join("keystore.redb")), "600");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stops_on_sigterm_while_nats_is_down() {
    let mut stack = keysync_testkit::start_fast_stack(1).await;
    let h1 = hsm("hsm-1");
    let log = stack.dir().join("logs/hsm-1.log");
    let before = std::fs::read_to_string(&log).expect("agent log").len();
    stack.nats().kill();
    // The agent noticed: its connection or its command consumer fails.
    let noticed = wait_until(Duration::from_secs(20), || async {
        std::fs::read_to_string(&log).is_ok_and(|l| {
            let new = &l[before.min(l.len())..];
            [
                "IO error",
                "disconnected",
                "command consumer unavailable",
                "command stream error",
            ]
            .iter()
            .any(|s| new.contains(s))
        })
    })
    .await;
    assert!(noticed, "the agent did not notice NATS going away");

    let agent = stack.agent(&h1).expect("agent process");
    let started = Instant::now();
    let exited = agent.terminate(Duration::from_secs(5)).await;
    let took = started.elapsed();
    let tail = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: String = tail
        .lines()
        .rev()
        .take(15)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    match exited {
        Some(status) => assert!(
            status.success(),
            "the agent exited with {status} after SIGTERM:\n{tail}"
        ),
        None => {
            panic!("the agent ignored SIGTERM for 5 s while NATS was down (SIGKILLed):\n{tail}")
        }
    }
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// `keysync dlq list --json`, off the runtime's threads.
async fn dlq_list(url: &str) -> serde_json::Value {
    let url = url.to_string();
    let out = tokio::task::spawn_blocking(move || {
        keysync_cli(&["--nats", &url, "dlq", "list", "--json", "--limit", "100"])
    })
    .await
    .expect("the CLI task");
    assert!(
        out.status.success(),
        "keysync dlq list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

/// Any role allowed on `keysync.dlq.agent` (every agent under
/// `secure.conf`) can publish dead letters of its own making, claiming any
/// filer. `keysync dlq list` must show which letters were filed (signed) by
/// whom, and that a forged one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_dead_letters_are_told_apart_from_filed_ones() {
    let stack = start_stack(1).await;
    let client = stack.client();
    let subjects = client.subjects().clone();

    // A genuine one: hsm-1 rejects a malformed request and files it.
    let reply = client
        .nats()
        .request(subjects.hsm_op(&hsm("hsm-1")), "not an envelope".into())
        .await
        .expect("hsm-1 answers");
    match keysync_schemas::decode::<OpReply>(&reply.payload).map(|e| e.body) {
        Ok(OpReply::Error(e)) => assert_eq!(e.kind, OpErrorKind::BadRequest),
        other => panic!("a malformed request answered {other:?}"),
    }

    // A forged one, claiming the orchestrator rejected a signed event.
    let forged = DeadLetter {
        rejected_by: "orchestrator orchestrator".into(),
        subject: "keysync.evt.hsm.hsm-1.joined".into(),
        reason: RejectReason::BadSignature,
        detail: "forged by a test".into(),
        claimed_signer: Some("hsm/hsm-1".into()),
        stream_seq: Some(1),
        payload_len: 0,
        payload_sha256: [0; 32],
        payload: None,
    };
    let bytes = encode(&Envelope::new(
        Source::Orchestrator("orchestrator".into()),
        forged,
    ))
    .expect("encode");
    let js = async_nats::jetstream::new(client.nats().clone());
    js.publish(subjects.dead_letters("agent"), bytes.into())
        .await
        .expect("publish")
        .await
        .expect("the forged dead letter is stored");

    let url = stack.url();
    let both_listed = |doc: &serde_json::Value| {
        let letters = doc["letters"].as_array().cloned().unwrap_or_default();
        letters.iter().any(|l| l["detail"] == "forged by a test")
            && letters
                .iter()
                .any(|l| l["rejected_by"] == "hsm-agent hsm-1")
    };
    let listed = wait_until(Duration::from_secs(20), || async {
        both_listed(&dlq_list(&url).await)
    })
    .await;
    let doc = dlq_list(&url).await;
    assert!(listed, "both letters are listed: {doc:#}");
    let letters = doc["letters"].as_array().cloned().unwrap_or_default();
    let forged = letters
        .iter()
        .find(|l| l["detail"] == "forged by a test")
        .expect("forged letter");
    let filed = letters
        .iter()
        .find(|l| l["rejected_by"] == "hsm-agent hsm-1")
        .expect("filed letter");
    assert_eq!(filed["verified"], true, "{filed:#}");
    assert_eq!(filed["signed_by"], "hsm/hsm-1", "{filed:#}");
    assert_eq!(forged["verified"], false, "{forged:#}");
    assert!(
        forged["unverified_reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{forged:#}"
    );
}
