//! The `keysync` CLI contract, run as a separate process against a real
//! stack; signatures checked with openssl, independently of keysync.

use std::time::Duration;

use keysync_testkit::{keysync_cli, start_stack, wait_until};

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "keysync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "keysync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn openssl(args: &[&str]) -> std::process::Output {
    std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed (the README's test command installs it)")
}

#[test]
fn cluster_init_writes_a_private_key_file_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("domain.key");
    let p = path.to_str().expect("utf-8 path");
    stdout(&keysync_cli(&["cluster", "init", "--domain-key-out", p]));
    let text = std::fs::read_to_string(&path).expect("key file");
    assert_eq!(text.trim().len(), 64);
    assert!(text.trim().bytes().all(|b| b.is_ascii_hexdigit()));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let again = keysync_cli(&["cluster", "init", "--domain-key-out", p]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    assert_eq!(
        std::fs::read_to_string(&path).expect("key file"),
        text,
        "not overwritten"
    );
}

#[test]
fn bad_arguments_exit_2_and_failures_exit_1_with_a_sentence() {
    for args in [
        &["key", "create", "--type", "dsa"][..],
        &[
            "key",
            "create",
            "--type",
            "p256",
            "--durability",
            "replicas:0",
        ],
        &["key", "create", "--type", "p256", "--hsm", "a.b"],
        &["key", "sign", "not-a-uuid", "--data-hex", "00"],
        &["frobnicate"],
    ] {
        let out = keysync_cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}: no message");
        assert!(out.stdout.is_empty(), "{args:?}: wrote to stdout");
    }
    let out = keysync_cli(&[
        "--nats",
        "nats://127.0.0.1:1",
        "cluster",
        "status",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: cannot connect to NATS"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_contract_on_a_live_cluster() {
    let stack = start_stack(3).await;
    let url = stack.url();
    let cli = |args: &[&str]| {
        let mut all = vec!["--nats", url.as_str()];
        all.extend_from_slice(args);
        keysync_cli(&all)
    };
    let dir = tempfile::tempdir().expect("tempdir");

    for (key_type, ty) in [("p256", "p256"), ("ed25519", "ed25519")] {
        let created = json_of(&cli(&[
            "key", "create", "--type", key_type, "--hsm", "hsm-1", "--json",
        ]));
        assert_eq!(created["key_type"], ty);
        assert_eq!(created["hsm"], "hsm-1");
        assert_eq!(created["durability"], "logged");
        let fp = created["fingerprint"].as_str().expect("fingerprint");
        assert_eq!(fp.len(), 64);
        let key_id = created["key_id"].as_str().expect("key_id").to_string();

        // It reaches hsm-2, which lists it with the same fingerprint.
        let listed = wait_until(Duration::from_secs(20), || async {
            json_of(&cli(&["key", "list", "--hsm", "hsm-2", "--json"]))
                .as_array()
                .expect("array")
                .iter()
                .any(|k| {
                    k["key_id"] == key_id.as_str() && k["fingerprint"] == fp && k["key_type"] == ty
                })
        })
        .await;
        assert!(listed, "{key_id} never listed on hsm-2");
        let info = json_of(&cli(&["key", "info", &key_id, "--hsm", "hsm-3", "--json"]));
        assert_eq!(info["fingerprint"], fp);

        // Sign on hsm-2; verify with openssl against the PEM from hsm-1.
        let data = b"hello keysync";
        let sig_hex = stdout(&cli(&[
            "key",
            "sign",
            &key_id,
            "--hsm",
            "hsm-2",
            "--data-hex",
            &hex::encode(data),
        ]));
        let pem = stdout(&cli(&["key", "public", &key_id, "--hsm", "hsm-1", "--pem"]));
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");
        let pem_path = dir.path().join(format!("{ty}.pem"));
        let sig_path = dir.path().join(format!("{ty}.sig"));
        let data_path = dir.path().join("data");
        std::fs::write(&pem_path, format!("{pem}\n")).expect("write");
        std::fs::write(&sig_path, hex::decode(&sig_hex).expect("hex signature")).expect("write");
        std::fs::write(&data_path, data).expect("write");
        let (pem_s, sig_s, data_s) = (
            pem_path.to_str().expect("path"),
            sig_path.to_str().expect("path"),
            data_path.to_str().expect("path"),
        );
        let verified = if ty == "p256" {
            openssl(&[
                "dgst",
                "-sha256",
                "-verify",
                pem_s,
                "-signature",
                sig_s,
                data_s,
            ])
        } else {
            openssl(&[
                "pkeyutl", "-verify", "-pubin", "-inkey", pem_s, "-rawin", "-in", data_s,
                "-sigfile", sig_s,
            ])
        };
        assert!(
            verified.status.success(),
            "openssl rejected the {ty} signature: {}{}",
            String::from_utf8_lossy(&verified.stdout),
            String::from_utf8_lossy(&verified.stderr)
        );
    }

    let status = json_of(&cli(&["cluster", "status", "--json"]));
    let members = status["members"].as_array().expect("members");
    assert_eq!(members.len(), 3);
    for m in members {
        assert!(m["hsm_id"].is_string() && m["state"].is_string());
        assert!(m["keys"].is_u64() && m["lag"].is_u64());
    }
    assert!(status["pending_clones"].is_u64());

    // A key that does not exist: exit 1, a sentence on stderr, nothing on stdout.
    let missing = cli(&[
        "key",
        "info",
        "0190f3a2-0000-7000-8000-000000000001",
        "--hsm",
        "hsm-1",
        "--json",
    ]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(missing.stdout.is_empty());
    assert!(String::from_utf8_lossy(&missing.stderr)
        .contains("no key 0190f3a2-0000-7000-8000-000000000001 in this cluster"));
}

#[test]
fn dev_refuses_nats_credentials_it_would_ignore() {
    // `keysync dev` starts its own nats-server without authentication: a
    // credential given to it would be silently ignored, so it is refused as
    // a bad argument before anything starts.
    for args in [
        &["dev", "--nats-user", "u", "--nats-password", "p"][..],
        &["demo", "--nats-creds", "/nonexistent.creds"][..],
        &["bench", "--quick", "--nats-nkey", "/nonexistent.nk"][..],
    ] {
        let out = keysync_cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("start their own nats-server"),
            "{args:?}: {stderr}"
        );
    }
}
