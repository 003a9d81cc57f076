//! PyKCS11 (Debian's `python3-pykcs11`, unmodified) against
//! `libkeysync_pkcs11.so` on a three-HSM stack: 8 threads with a session
//! each generate a P-256 pair and sign with it at once, 25 times each,
//! with zero failures; the private key's `CKA_VALUE` is never given out;
//! every HSM ends up holding every key made. AES-GCM with the
//! application's IV and AAD round-trips, RSA-PSS signs and verifies (and
//! openssl verifies it too), parameters keysync lacks are refused. Then
//! 8 threads x 100 cycles while an HSM that created keys is SIGKILLed
//! midway: zero failures, and every live HSM holds every key
//! (`keysync key list --hsm`). A forked child initialises the module
//! again and creates and signs; the parent, still initialised, finds the
//! child's key.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use keysync_schemas::KeyId;
use keysync_testkit::{find_binary, start_stack, wait_until};

const PYTHON: &str = "/usr/bin/python3";
const THREADS: usize = 8;
const CYCLES: usize = 25;
/// Cycles per thread while an HSM is killed (8 x 100 = 800 keys).
const CYCLES_UNDER_KILL: usize = 100;

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

    apps(&stack, &module, &config, dir.path()).await;

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

/// apps.py: AES-GCM with the application's IV/AAD/tag length and RSA-PSS
/// through PyKCS11; openssl verifies both PSS signatures with the public
/// key the cluster gives; every HSM holds both keys.
async fn apps(
    stack: &keysync_testkit::DevStack,
    module: &std::path::Path,
    config: &std::path::Path,
    dir: &std::path::Path,
) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/apps.py");
    let out = tokio::process::Command::new(PYTHON)
        .env("KEYSYNC_PKCS11_CONFIG", config)
        .arg(&script)
        .arg(module)
        .arg("1234")
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "apps.py failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    let plaintext_len = 3 * "an application's record, sealed under its own IV".len();
    assert_eq!(r["gcm_len"], plaintext_len + 16, "{r}");
    assert_eq!(r["gcm96_len"], plaintext_len + 12, "{r}");
    for yes in [
        "gcm_round_trip",
        "gcm_same_bytes",
        "gcm96_is_prefix",
        "gcm96_round_trip",
        "pss_verifies",
        "pss_message_verifies",
    ] {
        assert_eq!(r[yes], true, "{yes}: {r}");
    }
    assert_eq!(r["pss_other_digest"], false, "{r}");
    for (field, rv) in [
        ("gcm_wrong_aad", "CKR_ENCRYPTED_DATA_INVALID"),
        ("gcm_flipped", "CKR_ENCRYPTED_DATA_INVALID"),
        ("gcm_iv16", "CKR_MECHANISM_PARAM_INVALID"),
        ("gcm_tag64", "CKR_MECHANISM_PARAM_INVALID"),
        ("pss_sha1", "CKR_MECHANISM_PARAM_INVALID"),
        ("pss_mgf_mismatch", "CKR_MECHANISM_PARAM_INVALID"),
        ("pss_short_digest", "CKR_DATA_LEN_RANGE"),
    ] {
        assert_eq!(r[field], rv, "{field}: {r}");
    }

    // openssl, with the public key the cluster gives, verifies both PSS
    // signatures (on the digest, and on the message).
    let id =
        |f: &str| KeyId(uuid::Uuid::parse_str(r[f].as_str().expect("hex id")).expect("a key id"));
    let (aes, rsa) = (id("aes_id"), id("rsa_id"));
    let spki = stack
        .client()
        .public_key(rsa, &keysync::Route::ReplicaAware)
        .await
        .expect("public key");
    let hex = |f: &str| {
        (0..r[f].as_str().expect("hex").len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&r[f].as_str().expect("hex")[i..i + 2], 16).expect("hex"))
            .collect::<Vec<u8>>()
    };
    std::fs::write(dir.join("pss.pub"), spki).expect("spki");
    std::fs::write(dir.join("pss.msg"), hex("message")).expect("message");
    for sig in ["pss", "pss_message"] {
        std::fs::write(dir.join(sig), hex(sig)).expect("signature");
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(["dgst", "-sha256", "-verify", "pss.pub", "-keyform", "DER"])
            .args([
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:32",
            ])
            .args(["-signature", sig, "pss.msg"])
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl does not verify {sig}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let client = stack.client();
    for hsm in stack.hsm_ids() {
        let there = wait_until(Duration::from_secs(30), || async {
            client.list_keys(&hsm).await.is_ok_and(|keys| {
                [aes, rsa]
                    .iter()
                    .all(|k| keys.iter().any(|i| i.key_id == *k))
            })
        })
        .await;
        assert!(there, "{hsm} does not hold the GCM and PSS keys");
    }
}

/// The key ids `keysync key list --hsm HSM --json` prints.
async fn cli_key_list(url: &str, hsm: &keysync_schemas::HsmId) -> Option<BTreeSet<KeyId>> {
    let cli = find_binary("keysync").expect("the keysync CLI (cargo build --workspace --bins)");
    let out = tokio::process::Command::new(cli)
        .args([
            "--nats",
            url,
            "key",
            "list",
            "--hsm",
            hsm.as_str(),
            "--json",
        ])
        .output()
        .await
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    listed
        .as_array()?
        .iter()
        .map(|k| uuid::Uuid::parse_str(k["key_id"].as_str()?).ok().map(KeyId))
        .collect()
}

/// 8 threads x 100 create-then-sign cycles while one of the three HSMs,
/// one that has created keys through the module, is SIGKILLed midway
/// (checked: its process is gone and it stops answering): zero failures,
/// and the live HSMs hold every key made, as `keysync key list --hsm`
/// shows.
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
    // Which HSM creates which key, from the `KeyCreated` events as they
    // are published (read before anything is created).
    let victim = keysync_testkit::hsm("hsm-1");
    let (created_tx, created_by_victim) = tokio::sync::watch::channel(BTreeSet::<KeyId>::new());
    let mut events = stack
        .client()
        .nats()
        .subscribe(stack.client().subjects().key_events_all())
        .await
        .expect("subscribe to key events");
    stack.client().nats().flush().await.expect("flush");
    let watcher = {
        let victim = victim.clone();
        tokio::spawn(async move {
            use futures::StreamExt as _;
            while let Some(msg) = events.next().await {
                if !msg.subject.as_str().ends_with(".created") {
                    continue;
                }
                if let Ok(env) = keysync_schemas::decode::<keysync_schemas::Event>(&msg.payload) {
                    if let keysync_schemas::Event::KeyCreated(k) = env.body {
                        if k.hsm == victim {
                            created_tx.send_modify(|ids| {
                                ids.insert(k.key_id);
                            });
                        }
                    }
                }
            }
        })
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/threads.py");
    let mut run = tokio::process::Command::new(PYTHON)
        .env("KEYSYNC_PKCS11_CONFIG", &config)
        .env("PROGRESS", "1")
        .arg(&script)
        .arg(&module)
        .args(["1234", &THREADS.to_string(), &CYCLES_UNDER_KILL.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python");
    // Cycles done so far, from the script's progress lines on stderr (the
    // other lines are kept for a failure message).
    let (done_tx, done) = tokio::sync::watch::channel(0usize);
    let stderr = run.stderr.take().expect("stderr");
    let errors = tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt as _;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut other = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if line == "cycle" {
                done_tx.send_modify(|n| *n += 1);
            } else {
                other.push_str(&line);
                other.push('\n');
            }
        }
        other
    });
    let started_at = std::time::Instant::now();
    let client = stack.client().clone();
    // Midway: a quarter of the cycles done, and the victim has created
    // keys itself. (Both are read from what the processes publish: asking
    // the busy agent would queue behind the run's own operations.)
    let midway = wait_until(Duration::from_secs(120), || async {
        *done.borrow() >= THREADS * CYCLES_UNDER_KILL / 4 && !created_by_victim.borrow().is_empty()
    })
    .await;
    assert!(midway, "the threads did not get going on {victim}");
    let victims_keys = created_by_victim.borrow().clone();
    let (killed_after, cycles_at_kill) = (started_at.elapsed(), *done.borrow());
    let pid = stack.agent(&victim).expect("the victim's process").pid();
    stack.kill_agent(&victim);
    assert!(
        run.try_wait().expect("python's status").is_none(),
        "the threads were done before the HSM was killed"
    );
    // The kill happened: the process is gone and the HSM answers no more.
    assert!(
        !stack.agent(&victim).expect("victim").is_running(),
        "{victim} (pid {pid}) still runs"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} still exists"
    );
    let silent = wait_until(Duration::from_secs(10), || async {
        client.health(&victim).await.is_err()
    })
    .await;
    assert!(silent, "{victim} still answers after SIGKILL");
    println!(
        "killed {victim} (pid {pid}) after {:?} and {} of {} cycles; it had created {} keys",
        killed_after,
        cycles_at_kill,
        THREADS * CYCLES_UNDER_KILL,
        victims_keys.len()
    );
    let out = run.wait_with_output().await.expect("python ends");
    let stderr = errors.await.unwrap_or_default();
    assert!(
        out.status.success(),
        "threads.py failed: {}{stderr}",
        String::from_utf8_lossy(&out.stdout),
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
    assert_eq!(ids.len(), THREADS * CYCLES_UNDER_KILL);
    watcher.abort();
    // Keys the killed HSM created (and the module returned) are among
    // those every live HSM must hold.
    assert!(
        victims_keys.iter().any(|k| ids.contains(k)),
        "none of the keys {victim} created is among those made"
    );
    println!(
        "{} create-then-sign cycles through PyKCS11 with {victim} killed midway: {:?}",
        ids.len(),
        started_at.elapsed()
    );
    let url = stack.url();
    for hsm in stack.hsm_ids().into_iter().filter(|h| *h != victim) {
        let all_there = wait_until(Duration::from_secs(30), || async {
            cli_key_list(&url, &hsm)
                .await
                .is_some_and(|held| ids.is_subset(&held))
        })
        .await;
        assert!(
            all_there,
            "{hsm} does not hold every key made (keysync key list)"
        );
    }
    stack.shutdown().await;
}
