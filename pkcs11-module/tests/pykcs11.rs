//! PyKCS11 (Debian's `python3-pykcs11`, unmodified) against
//! `libkeysync_pkcs11.so` on a three-HSM stack: 8 threads with a session
//! each generate a P-256 pair and sign with it at once, 25 times each,
//! with zero failures; the private key's `CKA_VALUE` is never given out;
//! every HSM ends up holding every key made. The same with one HSM
//! SIGKILLed midway: zero failures. A forked child initialises
//! the module again and creates and signs; the parent, still initialised,
//! finds the child's key.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use keysync_schemas::KeyId;
use keysync_testkit::{find_binary, start_stack, wait_until};

const PYTHON: &str = "/usr/bin/python3";
const THREADS: usize = 8;
const CYCLES: usize = 25;

fn pykcs11_present() -> bool {
    let present = std::process::Command::new(PYTHON)
        .args(["-c", "import PyKCS11"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have PyKCS11 (scripts/install-deps installs python3-pykcs11)"
        );
        println!("SKIPPED: {PYTHON} has no PyKCS11 (scripts/install-deps)");
    }
    present
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pykcs11_threads_create_then_sign_without_failures() {
    if !pykcs11_present() {
        return;
    }
    let stack = start_stack(3).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let urls: Vec<String> = stack.url().split(',').map(|u| format!("{u:?}")).collect();
    let config = dir.path().join("keysync-pkcs11.toml");
    std::fs::write(
        &config,
        format!("nats = [{}]\nuser_pin = \"1234\"\n", urls.join(", ")),
    )
    .expect("config");
    let module = find_binary("libkeysync_pkcs11.so")
        .unwrap_or_else(|e| panic!("{e}: build it with `cargo build -p keysync-pkcs11`"));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/threads.py");
    let out = tokio::process::Command::new(PYTHON)
        .env("KEYSYNC_PKCS11_CONFIG", &config)
        .arg(&script)
        .arg(&module)
        .args(["1234", &THREADS.to_string(), &CYCLES.to_string()])
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "threads.py failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON line from threads.py");
    assert_eq!(report["cycles"], THREADS * CYCLES);
    assert_eq!(
        report["failures"].as_array().map(Vec::len),
        Some(0),
        "failed cycles: {}",
        report["failures"]
    );
    assert_eq!(report["sensitive"], true);
    assert!(report["value"].is_null(), "CKA_VALUE was returned");
    let ids: BTreeSet<KeyId> = report["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|h| {
            let hex = h.as_str().expect("hex id");
            KeyId(uuid::Uuid::parse_str(hex).expect("a key id"))
        })
        .collect();
    assert_eq!(ids.len(), THREADS * CYCLES);

    let client = stack.client();
    for hsm in stack.hsm_ids() {
        let all_there = wait_until(Duration::from_secs(30), || async {
            client.list_keys(&hsm).await.is_ok_and(|keys| {
                let held: BTreeSet<KeyId> = keys.iter().map(|k| k.key_id).collect();
                ids.is_subset(&held)
            })
        })
        .await;
        assert!(
            all_there,
            "{hsm} does not hold every key made through PyKCS11"
        );
    }

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/fork.py");
    let out = tokio::process::Command::new(PYTHON)
        .env("KEYSYNC_PKCS11_CONFIG", &config)
        .arg(&script)
        .arg(&module)
        .arg("1234")
        .output()
        .await
        .expect("run python");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "fork.py: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        report["child"]["signature_len"],
        64,
        "{report}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["parent_finds"], 1, "{report}");
    stack.shutdown().await;
}

/// The same 8 threads, while one of the three HSMs is SIGKILLed midway
/// (keys it was creating, or holds, included): zero failures, and the two
/// live HSMs hold every key made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pykcs11_threads_survive_an_hsm_killed_midway() {
    if !pykcs11_present() {
        return;
    }
    let mut stack = keysync_testkit::start_fast_stack(3).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let urls: Vec<String> = stack.url().split(',').map(|u| format!("{u:?}")).collect();
    let config = dir.path().join("keysync-pkcs11.toml");
    std::fs::write(
        &config,
        format!(
            "nats = [{}]\nuser_pin = \"1234\"\ntimeout_secs = 3\n",
            urls.join(", ")
        ),
    )
    .expect("config");
    let module = find_binary("libkeysync_pkcs11.so")
        .unwrap_or_else(|e| panic!("{e}: build it with `cargo build -p keysync-pkcs11`"));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/threads.py");
    let mut run = tokio::process::Command::new(PYTHON)
        .env("KEYSYNC_PKCS11_CONFIG", &config)
        .arg(&script)
        .arg(&module)
        .args(["1234", &THREADS.to_string(), &CYCLES.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python");
    let victim = keysync_testkit::hsm("hsm-1");
    let client = stack.client().clone();
    let started = wait_until(Duration::from_secs(30), || async {
        client
            .list_keys(&victim)
            .await
            .is_ok_and(|keys| keys.len() >= THREADS * CYCLES / 4)
    })
    .await;
    assert!(started, "the threads did not get going");
    stack.kill_agent(&victim);
    assert!(
        run.try_wait().expect("python's status").is_none(),
        "the threads were done before the HSM was killed"
    );
    let out = run.wait_with_output().await.expect("python ends");
    assert!(
        out.status.success(),
        "threads.py failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON line from threads.py");
    assert_eq!(
        report["failures"].as_array().map(Vec::len),
        Some(0),
        "failed cycles with an HSM killed: {}",
        report["failures"]
    );
    let ids: BTreeSet<KeyId> = report["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(|h| uuid::Uuid::parse_str(h.as_str()?).ok().map(KeyId))
        .collect();
    assert_eq!(ids.len(), THREADS * CYCLES);
    for hsm in stack.hsm_ids().into_iter().filter(|h| *h != victim) {
        let all_there = wait_until(Duration::from_secs(30), || async {
            client.list_keys(&hsm).await.is_ok_and(|keys| {
                let held: BTreeSet<KeyId> = keys.iter().map(|k| k.key_id).collect();
                ids.is_subset(&held)
            })
        })
        .await;
        assert!(all_there, "{hsm} does not hold every key made");
    }
    stack.shutdown().await;
}
