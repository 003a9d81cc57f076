//! OpenSC's `pkcs11-tool`, unmodified, against `libkeysync_pkcs11.so` in
//! front of a cluster of real processes (nats-server, the orchestrator,
//! three agents): it lists the token, generates EC, Ed25519, RSA and AES
//! keys, signs with each key pair at once (in a new process, which has
//! never seen the key), and openssl verifies with the public key it reads
//! out; a wrong PIN is `CKR_PIN_INCORRECT`; every HSM ends up holding
//! every key; `--test` finds no errors; `--delete-object` deletes the key
//! from every HSM.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use keysync_schemas::{HsmId, KeyId};
use keysync_testkit::{find_binary, start_stack, wait_until, DevStack};

const PIN: &str = "1234";

fn tools_present() -> bool {
    let have = |p: &str| std::process::Command::new(p).arg("--help").output().is_ok();
    let present = have("pkcs11-tool") && have("openssl");
    if !present {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have OpenSC and openssl (scripts/install-deps installs them)"
        );
        println!("SKIPPED: pkcs11-tool or openssl is not installed (scripts/install-deps)");
    }
    present
}

/// The module, built next to the tests (`cargo build -p keysync-pkcs11`).
fn module() -> PathBuf {
    find_binary("libkeysync_pkcs11.so")
        .unwrap_or_else(|e| panic!("{e}: build it with `cargo build -p keysync-pkcs11`"))
}

/// Writes the module's configuration for `stack` into `dir`.
fn config(stack: &DevStack, dir: &Path) -> PathBuf {
    let urls: Vec<String> = stack.url().split(',').map(|u| format!("{u:?}")).collect();
    let path = dir.join("keysync-pkcs11.toml");
    std::fs::write(
        &path,
        format!(
            "nats = [{}]\nuser_pin = \"{PIN}\"\ndurability = \"replicas:2\"\n",
            urls.join(", ")
        ),
    )
    .expect("write config");
    path
}

struct Tool {
    module: PathBuf,
    config: PathBuf,
    dir: PathBuf,
}

impl Tool {
    async fn run(&self, args: &[&str]) -> Output {
        tokio::process::Command::new("pkcs11-tool")
            .env("KEYSYNC_PKCS11_CONFIG", &self.config)
            .current_dir(&self.dir)
            .arg("--module")
            .arg(&self.module)
            .args(args)
            .output()
            .await
            .expect("run pkcs11-tool")
    }

    /// Runs and requires success; returns stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "pkcs11-tool {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Logged in, then `args`.
    async fn user(&self, args: &[&str]) -> String {
        let mut all = vec!["--login", "--pin", PIN];
        all.extend_from_slice(args);
        self.ok(&all).await
    }
}

/// The `ID:` pkcs11-tool prints for a new key: the keysync key id.
fn printed_id(out: &str) -> String {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("ID:"))
        .map(|id| id.trim().to_string())
        .unwrap_or_else(|| panic!("no ID in {out}"))
}

fn key_id(hex: &str) -> KeyId {
    KeyId(uuid::Uuid::parse_str(hex).unwrap_or_else(|e| panic!("{hex} is not a key id: {e}")))
}

/// openssl verifies `signature` over `data` with the DER public key.
fn openssl_verifies(dir: &Path, public: &str, signature: &str) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(["dgst", "-sha256", "-verify", public, "-keyform", "DER"])
        .args(["-signature", signature, "data.txt"])
        .output()
        .expect("run openssl");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Verified OK"),
        "openssl does not verify {signature}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until every HSM of the stack holds (or, `held` false, lacks) `keys`.
async fn on_every_hsm(stack: &DevStack, keys: &[KeyId], held: bool) {
    let hsms: Vec<HsmId> = stack.hsm_ids();
    let client = stack.client();
    let ok = wait_until(Duration::from_secs(30), || async {
        for h in &hsms {
            let Ok(list) = client.list_keys(h).await else {
                return false;
            };
            if keys
                .iter()
                .any(|k| list.iter().any(|i| i.key_id == *k) != held)
            {
                return false;
            }
        }
        true
    })
    .await;
    assert!(
        ok,
        "not every HSM {} the keys {keys:?}",
        if held { "holds" } else { "dropped" }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs11_tool_uses_the_cluster_as_one_token() {
    if !tools_present() {
        return;
    }
    let stack = start_stack(3).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let tool = Tool {
        module: module(),
        config: config(&stack, dir.path()),
        dir: dir.path().to_path_buf(),
    };
    std::fs::write(dir.path().join("data.txt"), b"signed through PKCS#11").expect("data");

    let slots = tool.ok(&["--list-slots"]).await;
    assert!(slots.contains("token label        : keysync"), "{slots}");
    let mechanisms = tool.ok(&["--list-mechanisms"]).await;
    for m in ["ECDSA-SHA256", "EDDSA", "SHA256-RSA-PKCS", "AES-KEY-GEN"] {
        assert!(mechanisms.contains(m), "{m} not in {mechanisms}");
    }

    // EC P-256: generate, then sign at once from another process.
    let ec = printed_id(
        &tool
            .user(&[
                "--keypairgen",
                "--key-type",
                "EC:prime256v1",
                "--label",
                "app-ec",
            ])
            .await,
    );
    tool.user(&[
        "--sign",
        "--mechanism",
        "ECDSA-SHA256",
        "--signature-format",
        "openssl",
        "--id",
        &ec,
        "-i",
        "data.txt",
        "-o",
        "ec.sig",
    ])
    .await;
    tool.ok(&[
        "--read-object",
        "--type",
        "pubkey",
        "--id",
        &ec,
        "-o",
        "ec.pub",
    ])
    .await;
    openssl_verifies(dir.path(), "ec.pub", "ec.sig");

    // RSA-2048.
    let rsa = printed_id(
        &tool
            .user(&[
                "--keypairgen",
                "--key-type",
                "RSA:2048",
                "--label",
                "app-rsa",
            ])
            .await,
    );
    tool.user(&[
        "--sign",
        "--mechanism",
        "SHA256-RSA-PKCS",
        "--id",
        &rsa,
        "-i",
        "data.txt",
        "-o",
        "rsa.sig",
    ])
    .await;
    tool.ok(&[
        "--read-object",
        "--type",
        "pubkey",
        "--id",
        &rsa,
        "-o",
        "rsa.pub",
    ])
    .await;
    openssl_verifies(dir.path(), "rsa.pub", "rsa.sig");

    // Ed25519 (pkcs11-tool writes bad DER for its public key, so the token
    // verifies).
    let ed = printed_id(
        &tool
            .user(&[
                "--keypairgen",
                "--key-type",
                "EC:edwards25519",
                "--label",
                "app-ed",
            ])
            .await,
    );
    tool.user(&[
        "--sign",
        "--mechanism",
        "EDDSA",
        "--id",
        &ed,
        "-i",
        "data.txt",
        "-o",
        "ed.sig",
    ])
    .await;
    let verified = tool
        .user(&[
            "--verify",
            "--mechanism",
            "EDDSA",
            "--id",
            &ed,
            "-i",
            "data.txt",
            "--signature-file",
            "ed.sig",
        ])
        .await;
    assert!(verified.contains("Signature is valid"), "{verified}");

    // AES-256 (keysync keys are always sensitive and private: say so).
    let aes = printed_id(
        &tool
            .user(&[
                "--keygen",
                "--key-type",
                "AES:32",
                "--label",
                "app-aes",
                "--sensitive",
                "--private",
            ])
            .await,
    );

    let listed = tool.user(&["--list-objects"]).await;
    for label in ["app-ec", "app-rsa", "app-ed", "app-aes"] {
        assert!(listed.contains(label), "{label} not listed: {listed}");
    }
    let public_only = tool.ok(&["--list-objects"]).await;
    assert!(
        !public_only.contains("Private Key Object") && public_only.contains("Public Key Object"),
        "without login only public objects show: {public_only}"
    );

    let wrong = tool
        .run(&["--login", "--pin", "4321", "--list-objects"])
        .await;
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("CKR_PIN_INCORRECT"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );

    let keys: Vec<KeyId> = [&ec, &rsa, &ed, &aes].map(|h| key_id(h)).to_vec();
    on_every_hsm(&stack, &keys, true).await;

    let test = tool.user(&["--test"]).await;
    println!("pkcs11-tool --test:\n{test}");
    assert!(test.contains("No errors"), "{test}");
    assert!(test.contains("SHA256-RSA-PKCS: OK"), "{test}");

    tool.user(&["--delete-object", "--type", "secrkey", "--id", &aes])
        .await;
    on_every_hsm(&stack, &[key_id(&aes)], false).await;

    stack.shutdown().await;
}
