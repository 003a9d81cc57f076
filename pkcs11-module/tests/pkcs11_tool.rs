//! OpenSC's `pkcs11-tool`, unmodified, against `libkeysync_pkcs11.so` in
//! front of a cluster of real processes (nats-server, the orchestrator,
//! three agents): it lists the token, generates EC, Ed25519, RSA and AES
//! keys, signs with each key pair at once (in a new process, which has
//! never seen the key), also on digests the application made (`ECDSA`,
//! `RSA-PKCS` on a DigestInfo, `RSA-PKCS-PSS`), and openssl verifies with
//! the public key it reads out; OpenSSL's pkcs11 engine signs by a
//! `pkcs11:` URI and openssl verifies; a wrong PIN is `CKR_PIN_INCORRECT`;
//! every HSM ends up holding every key; `--test` finds no errors;
//! `--delete-object` deletes the key from every HSM. Applications' own
//! `CKA_ID`s (`--id`) are kept with the key, travel with it to every HSM
//! (tokens and embedded), and find it from other processes: pkcs11-tool,
//! the engine by `pkcs11:id=...`, PyKCS11's `findObjects`.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use keysync_schemas::{HsmId, KeyId};
use keysync_testkit::{find_binary, keysync_cli, start_stack, wait_until, DevStack, StackOptions};

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

/// OpenSSL with its pkcs11 engine loading the module (an `OPENSSL_CONF`
/// with an engine section, as a deployment would write it).
struct Engine {
    conf: PathBuf,
    config: PathBuf,
    dir: PathBuf,
}

impl Engine {
    /// `None` (and a note) when libengine-pkcs11-openssl is not installed;
    /// in CI it must be.
    fn new(tool: &Tool) -> Option<Engine> {
        let dirs = std::process::Command::new("openssl")
            .args(["version", "-e"])
            .output()
            .expect("openssl version");
        let engines = String::from_utf8_lossy(&dirs.stdout)
            .trim()
            .strip_prefix("ENGINESDIR: ")
            .map(|d| d.trim_matches('"').to_string())
            .unwrap_or_default();
        if !Path::new(&engines).join("pkcs11.so").exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must have OpenSSL's pkcs11 engine (scripts/install-deps installs libengine-pkcs11-openssl)"
            );
            println!("SKIPPED the engine: libengine-pkcs11-openssl is not installed");
            return None;
        }
        let conf = tool.dir.join("openssl-pkcs11.cnf");
        std::fs::write(
            &conf,
            format!(
                "openssl_conf = openssl_init\n[openssl_init]\nengines = engine_section\n\
                 [engine_section]\npkcs11 = pkcs11_section\n[pkcs11_section]\n\
                 engine_id = pkcs11\nMODULE_PATH = {}\ninit = 0\n",
                tool.module.display()
            ),
        )
        .expect("write openssl.cnf");
        Some(Engine {
            conf,
            config: tool.config.clone(),
            dir: tool.dir.clone(),
        })
    }

    fn ok(&self, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .current_dir(&self.dir)
            .env("OPENSSL_CONF", &self.conf)
            .env("KEYSYNC_PKCS11_CONFIG", &self.config)
            .args(args)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
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
    openssl_verifies_with(dir, public, signature, &[]);
}

/// The same, with `-sigopt`s (PSS).
fn openssl_verifies_with(dir: &Path, public: &str, signature: &str, sigopts: &[&str]) {
    let mut cmd = std::process::Command::new("openssl");
    cmd.current_dir(dir)
        .env_remove("OPENSSL_CONF")
        .args(["dgst", "-sha256", "-verify", public, "-keyform", "DER"]);
    for o in sigopts {
        cmd.args(["-sigopt", o]);
    }
    let out = cmd
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
    for m in [
        "ECDSA-SHA256",
        "EDDSA",
        "SHA256-RSA-PKCS,",
        "AES-KEY-GEN",
        "ECDSA,",
        "RSA-PKCS,",
        "RSA-PKCS-PSS,",
        "SHA256-RSA-PKCS-PSS,",
        "AES-GCM, keySize={32,32}, hw, encrypt, decrypt",
    ] {
        assert!(mechanisms.contains(m), "{m} not in {mechanisms}");
    }
    // The application hashes: the SHA-256 digest of data.txt, and its
    // PKCS#1 DigestInfo (RFC 8017 9.2, note 1).
    let digest = {
        let out = std::process::Command::new("openssl")
            .current_dir(dir.path())
            .args(["dgst", "-sha256", "-binary", "data.txt"])
            .output()
            .expect("openssl dgst");
        assert!(out.status.success());
        out.stdout
    };
    assert_eq!(digest.len(), 32);
    std::fs::write(dir.path().join("data.sha256"), &digest).expect("digest");
    std::fs::write(dir.path().join("short.sha256"), &digest[..31]).expect("short");
    let mut digest_info = vec![
        0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01,
        0x05, 0x00, 0x04, 0x20,
    ];
    digest_info.extend_from_slice(&digest);
    std::fs::write(dir.path().join("data.di"), &digest_info).expect("digest info");

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
    // CKM_ECDSA on the digest: the same signature openssl checks over data.txt.
    tool.user(&[
        "--sign",
        "--mechanism",
        "ECDSA",
        "--signature-format",
        "openssl",
        "--id",
        &ec,
        "-i",
        "data.sha256",
        "-o",
        "ec-digest.sig",
    ])
    .await;
    openssl_verifies(dir.path(), "ec.pub", "ec-digest.sig");
    let verified = tool
        .user(&[
            "--verify",
            "--mechanism",
            "ECDSA",
            "--signature-format",
            "openssl",
            "--id",
            &ec,
            "-i",
            "data.sha256",
            "--signature-file",
            "ec-digest.sig",
        ])
        .await;
    assert!(verified.contains("Signature is valid"), "{verified}");
    // A digest of no hash's length: refused, nothing signed.
    let short = tool
        .run(&[
            "--login",
            "--pin",
            PIN,
            "--sign",
            "--mechanism",
            "ECDSA",
            "--id",
            &ec,
            "-i",
            "short.sha256",
            "-o",
            "short.sig",
        ])
        .await;
    assert!(!short.status.success());
    assert!(
        String::from_utf8_lossy(&short.stderr).contains("CKR_DATA_LEN_RANGE"),
        "{}",
        String::from_utf8_lossy(&short.stderr)
    );

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
    // CKM_RSA_PKCS on the application's DigestInfo: a PKCS#1 v1.5 SHA-256
    // signature of data.txt.
    tool.user(&[
        "--sign",
        "--mechanism",
        "RSA-PKCS",
        "--id",
        &rsa,
        "-i",
        "data.di",
        "-o",
        "rsa-di.sig",
    ])
    .await;
    openssl_verifies(dir.path(), "rsa.pub", "rsa-di.sig");
    assert_eq!(
        std::fs::read(dir.path().join("rsa-di.sig")).expect("sig"),
        std::fs::read(dir.path().join("rsa.sig")).expect("sig"),
        "PKCS#1 v1.5 is deterministic: the DigestInfo path signs the same bytes"
    );
    // RSA-PSS on the digest, and SHA256-RSA-PKCS-PSS on the message.
    let pss = ["rsa_padding_mode:pss", "rsa_pss_saltlen:32"];
    tool.user(&[
        "--sign",
        "--mechanism",
        "RSA-PKCS-PSS",
        "--hash-algorithm",
        "SHA256",
        "--mgf",
        "MGF1-SHA256",
        "--id",
        &rsa,
        "-i",
        "data.sha256",
        "-o",
        "rsa-pss.sig",
    ])
    .await;
    openssl_verifies_with(dir.path(), "rsa.pub", "rsa-pss.sig", &pss);
    let verified = tool
        .user(&[
            "--verify",
            "--mechanism",
            "RSA-PKCS-PSS",
            "--hash-algorithm",
            "SHA256",
            "--mgf",
            "MGF1-SHA256",
            "--id",
            &rsa,
            "-i",
            "data.sha256",
            "--signature-file",
            "rsa-pss.sig",
        ])
        .await;
    assert!(verified.contains("Signature is valid"), "{verified}");
    tool.user(&[
        "--sign",
        "--mechanism",
        "SHA256-RSA-PKCS-PSS",
        "--id",
        &rsa,
        "-i",
        "data.txt",
        "-o",
        "rsa-pss2.sig",
    ])
    .await;
    openssl_verifies_with(dir.path(), "rsa.pub", "rsa-pss2.sig", &pss);

    // OpenSSL's pkcs11 engine, by pkcs11: URI (the label pkcs11-tool gave).
    if let Some(engine) = Engine::new(&tool) {
        let ec_uri = format!("pkcs11:token=keysync;object=app-ec;type=private;pin-value={PIN}");
        let rsa_uri = format!("pkcs11:token=keysync;object=app-rsa;type=private;pin-value={PIN}");
        // pkeyutl hands the engine the digest (CKM_ECDSA).
        engine.ok(&[
            "pkeyutl",
            "-engine",
            "pkcs11",
            "-keyform",
            "engine",
            "-inkey",
            &ec_uri,
            "-sign",
            "-in",
            "data.sha256",
            "-out",
            "engine-ec.sig",
        ]);
        openssl_verifies(dir.path(), "ec.pub", "engine-ec.sig");
        // dgst hashes, the engine signs the DigestInfo (CKM_RSA_PKCS) or
        // the digest with PSS (CKM_RSA_PKCS_PSS).
        engine.ok(&[
            "dgst",
            "-engine",
            "pkcs11",
            "-keyform",
            "engine",
            "-sign",
            &rsa_uri,
            "-sha256",
            "-out",
            "engine-rsa.sig",
            "data.txt",
        ]);
        openssl_verifies(dir.path(), "rsa.pub", "engine-rsa.sig");
        engine.ok(&[
            "dgst",
            "-engine",
            "pkcs11",
            "-keyform",
            "engine",
            "-sign",
            &rsa_uri,
            "-sha256",
            "-sigopt",
            pss[0],
            "-sigopt",
            pss[1],
            "-out",
            "engine-pss.sig",
            "data.txt",
        ]);
        openssl_verifies_with(dir.path(), "rsa.pub", "engine-pss.sig", &pss);
        engine.ok(&[
            "dgst",
            "-engine",
            "pkcs11",
            "-keyform",
            "engine",
            "-sign",
            &ec_uri,
            "-sha256",
            "-out",
            "engine-ec2.sig",
            "data.txt",
        ]);
        openssl_verifies(dir.path(), "ec.pub", "engine-ec2.sig");
    }

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

    // pkcs11-tool's default AES template asks for a non-sensitive, public
    // key; keysync makes none (decision 13): refused, and stderr says which
    // attribute and what to ask instead.
    let default_aes = tool
        .run(&[
            "--login",
            "--pin",
            PIN,
            "--keygen",
            "--key-type",
            "AES:32",
            "--label",
            "app-aes-0",
        ])
        .await;
    assert!(!default_aes.status.success());
    let stderr = String::from_utf8_lossy(&default_aes.stderr);
    assert!(
        stderr.contains("CKR_ATTRIBUTE_VALUE_INVALID") && stderr.contains("CKA_SENSITIVE"),
        "{stderr}"
    );
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
    // --test signs and verifies with every RSA mechanism listed that it knows.
    assert!(test.contains("RSA-PKCS: OK"), "{test}");

    tool.user(&["--delete-object", "--type", "secrkey", "--id", &aes])
        .await;
    on_every_hsm(&stack, &[key_id(&aes)], false).await;

    stack.shutdown().await;
}

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
