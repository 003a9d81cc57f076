//! Applications' own `CKA_ID`s through `libkeysync_pkcs11.so`, on a mixed
//! stack of real processes (two agents in front of SoftHSM tokens, one
//! embedded): pkcs11-tool `--keypairgen --id 0102`, then other processes
//! find the key by that id and sign with it (pkcs11-tool, OpenSSL's
//! engine by `pkcs11:id=%01%02`, PyKCS11's `findObjects`), openssl
//! verifies; every HSM lists the key with its app id (it travelled with
//! the clones); a key made by `keysync key create --app-id` is found by
//! pkcs11-tool; a `CKA_ID` over 64 bytes makes no key. Its own test binary,
//! so its stack does not start beside another test's.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use keysync_schemas::HsmId;
use keysync_testkit::{keysync_cli, wait_until, DevStack, StackOptions};

/// The keys `hsm` lists (`keysync key list --hsm --json`, the CLI the
/// operator uses) that carry application id `app_id` (hex): key id and label.
fn listed_with_app_id(url: &str, hsm: &HsmId, app_id: &str) -> Option<Vec<(String, String)>> {
    let out = keysync_cli(&[
        "--nats",
        url,
        "key",
        "list",
        "--hsm",
        hsm.as_str(),
        "--json",
    ]);
    if !out.status.success() {
        return None;
    }
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let mut found: Vec<(String, String)> = keys
        .as_array()?
        .iter()
        .filter(|k| k["app_id"] == app_id)
        .map(|k| {
            (
                k["key_id"].as_str().unwrap_or_default().to_string(),
                k["label"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    found.sort();
    Some(found)
}

/// Waits until every HSM lists exactly `want` (key id, label) under `app_id`.
async fn every_hsm_lists(stack: &DevStack, app_id: &str, want: &[(String, String)]) {
    let url = stack.url();
    let mut want = want.to_vec();
    want.sort();
    for hsm in stack.hsm_ids() {
        let ok = wait_until(Duration::from_secs(30), || async {
            listed_with_app_id(&url, &hsm, app_id).as_deref() == Some(&want[..])
        })
        .await;
        assert!(
            ok,
            "{hsm} does not list {want:?} with app id {app_id}: {:?}",
            listed_with_app_id(&url, &hsm, app_id)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applications_own_ids_travel_with_their_keys_and_find_them_everywhere() {
    if !tools_present() {
        return;
    }
    let Some(softhsm) = keysync_harness::softhsm::module() else {
        assert!(std::env::var_os("CI").is_none(), "CI must have SoftHSM2");
        println!("SKIPPED: SoftHSM2 is not installed (scripts/install-deps)");
        return;
    };
    // Two agents in front of SoftHSM tokens, one embedded: the id must
    // reach both keystores.
    let stack = DevStack::start(StackOptions {
        hsms: 3,
        softhsm_agents: vec!["hsm-1".into(), "hsm-2".into()],
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("mixed stack did not start: {e}"));
    let url = stack.url();
    let dir = tempfile::tempdir().expect("temp dir");
    let tool = Tool {
        module: module(),
        config: config(&stack, dir.path()),
        dir: dir.path().to_path_buf(),
    };
    std::fs::write(
        dir.path().join("data.txt"),
        b"signed by the application's id",
    )
    .expect("data");
    let digest = std::process::Command::new("openssl")
        .current_dir(dir.path())
        .args([
            "dgst",
            "-sha256",
            "-binary",
            "-out",
            "data.sha256",
            "data.txt",
        ])
        .output()
        .expect("openssl dgst");
    assert!(digest.status.success());

    // pkcs11-tool makes a pair with its own id; pkcs11-tool shows that id.
    let made = tool
        .user(&[
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--id",
            "0102",
            "--label",
            "app-key",
        ])
        .await;
    assert_eq!(printed_id(&made), "0102", "{made}");
    // Another process signs by that id at once; openssl verifies with the
    // public key read by the same id.
    tool.user(&[
        "--sign",
        "--mechanism",
        "ECDSA-SHA256",
        "--signature-format",
        "openssl",
        "--id",
        "0102",
        "-i",
        "data.txt",
        "-o",
        "app.sig",
    ])
    .await;
    tool.ok(&[
        "--read-object",
        "--type",
        "pubkey",
        "--id",
        "0102",
        "-o",
        "app.pub",
    ])
    .await;
    openssl_verifies(dir.path(), "app.pub", "app.sig");
    let listed = tool.user(&["--list-objects"]).await;
    assert_eq!(
        listed.matches("ID:         0102").count(),
        2,
        "the private and the public object both show ID 0102:\n{listed}"
    );

    // Every HSM holds the key with its app id: it travelled with the clone.
    let url_ref = &url;
    let hsms = stack.hsm_ids();
    let app_key = wait_until(Duration::from_secs(30), || async {
        listed_with_app_id(url_ref, &hsms[0], "0102").is_some_and(|l| l.len() == 1)
    })
    .await;
    assert!(
        app_key,
        "{} does not list the key with app id 0102",
        hsms[0]
    );
    let first = listed_with_app_id(&url, &hsms[0], "0102").expect("listed");
    assert_eq!(first[0].1, "app-key");
    every_hsm_lists(&stack, "0102", &first).await;
    // In a SoftHSM token the object keeps keysync's 16-byte CKA_ID (the
    // agents find their keys by it); the application's id is in the
    // agent's journal.
    let keysync_id = key_id(&first[0].0);
    let token = std::process::Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", stack.dir().join("softhsm/softhsm2.conf"))
        .arg("--module")
        .arg(&softhsm)
        .args(["--token-label", "hsm-2", "--login", "--pin"])
        .arg(std::fs::read_to_string(stack.dir().join("softhsm/pin")).expect("PIN file"))
        .arg("--list-objects")
        .output()
        .expect("pkcs11-tool on the token");
    let token = String::from_utf8_lossy(&token.stdout);
    assert!(
        token.contains(&format!("ID:         {}", keysync_id.0.simple())),
        "token hsm-2 does not hold {keysync_id} by keysync's id:\n{token}"
    );

    // OpenSSL's pkcs11 engine, by id.
    if let Some(engine) = Engine::new(&tool) {
        let uri = format!("pkcs11:token=keysync;id=%01%02;type=private;pin-value={PIN}");
        engine.ok(&[
            "pkeyutl",
            "-engine",
            "pkcs11",
            "-keyform",
            "engine",
            "-inkey",
            &uri,
            "-sign",
            "-in",
            "data.sha256",
            "-out",
            "engine.sig",
        ]);
        openssl_verifies(dir.path(), "app.pub", "engine.sig");
    }

    // The CLI gives an id too; pkcs11-tool signs by it.
    let cli = keysync_cli(&[
        "--nats",
        &url,
        "key",
        "create",
        "--type",
        "p256",
        "--app-id",
        "0A0B",
        "--label",
        "cli-key",
        "--durability",
        "replicas:2",
        "--json",
    ]);
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let cli: serde_json::Value = serde_json::from_slice(&cli.stdout).expect("JSON");
    assert_eq!(cli["app_id"], "0a0b");
    // It travels too (and, once everywhere, no clone is in flight: the
    // counts below are stable).
    let cli_key = (
        cli["key_id"].as_str().expect("key id").to_string(),
        "cli-key".to_string(),
    );
    every_hsm_lists(&stack, "0a0b", &[cli_key]).await;
    tool.user(&[
        "--sign",
        "--mechanism",
        "ECDSA-SHA256",
        "--id",
        "0a0b",
        "-i",
        "data.txt",
        "-o",
        "cli.sig",
    ])
    .await;
    let bad_hex = keysync_cli(&[
        "--nats", &url, "key", "create", "--type", "p256", "--app-id", "xyz",
    ]);
    assert!(!bad_hex.status.success());
    assert!(String::from_utf8_lossy(&bad_hex.stderr).contains("not hex"));

    // An id over the limit: CKR_ATTRIBUTE_VALUE_INVALID, no key made.
    let before: Vec<usize> = {
        let client = stack.client();
        let mut n = Vec::new();
        for h in &hsms {
            n.push(client.list_keys(h).await.expect("list").len());
        }
        n
    };
    let too_long = "07".repeat(65);
    let refused = tool
        .run(&[
            "--login",
            "--pin",
            PIN,
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--id",
            &too_long,
            "--label",
            "too-long",
        ])
        .await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("CKR_ATTRIBUTE_VALUE_INVALID") && stderr.contains("CKA_ID"),
        "{stderr}"
    );
    let client = stack.client();
    for (h, n) in hsms.iter().zip(&before) {
        let keys = client.list_keys(h).await.expect("list");
        assert_eq!(keys.len(), *n, "{h} gained a key from a refused template");
        assert!(keys
            .iter()
            .all(|k| k.attributes.label.as_deref() != Some("too-long")));
    }

    // PyKCS11, another process again: finds by CKA_ID, signs; a twin under
    // the same id is found beside it.
    let python = "/usr/bin/python3";
    let has_pykcs11 = std::process::Command::new(python)
        .args(["-c", "import PyKCS11"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_pykcs11 {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/app_ids.py");
        let out = tokio::process::Command::new(python)
            .env("KEYSYNC_PKCS11_CONFIG", &tool.config)
            .arg(&script)
            .arg(&tool.module)
            .args([PIN, "0102", "app-key"])
            .output()
            .await
            .expect("run python");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "app_ids.py: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(report["found_by_id"], 2, "{report}");
        assert_eq!(report["found_ids"], serde_json::json!(["0102", "0102"]));
        assert_eq!(report["private_by_id"], 1, "{report}");
        assert_eq!(report["label"], "app-key");
        assert_eq!(report["signature_len"], 64);
        assert_eq!(report["verifies"], true);
        assert_eq!(report["twin_id"], "0102");
        assert_eq!(report["private_after_twin"], 2, "{report}");
        assert_eq!(report["by_label"], 1, "{report}");
        assert_eq!(report["by_id_and_ec"], 4, "{report}");
        assert_eq!(report["by_id_and_rsa"], 0, "{report}");
        assert_eq!(report["other_id"], 0, "{report}");
        assert_eq!(report["too_long"], "CKR_ATTRIBUTE_VALUE_INVALID");
        assert_eq!(report["too_long_found"], 0);
        // Both keys under 0102, each with its own label, on every HSM.
        let both = wait_until(Duration::from_secs(30), || async {
            listed_with_app_id(url_ref, &hsms[0], "0102").is_some_and(|l| l.len() == 2)
        })
        .await;
        assert!(both, "the twin did not reach {}", hsms[0]);
        let both = listed_with_app_id(&url, &hsms[0], "0102").expect("listed");
        let mut labels: Vec<&str> = both.iter().map(|(_, l)| l.as_str()).collect();
        labels.sort();
        assert_eq!(labels, ["app-key", "py-twin"]);
        every_hsm_lists(&stack, "0102", &both).await;
    } else {
        assert!(std::env::var_os("CI").is_none(), "CI must have PyKCS11");
        println!("SKIPPED the PyKCS11 part: no PyKCS11");
    }
    stack.shutdown().await;
}
