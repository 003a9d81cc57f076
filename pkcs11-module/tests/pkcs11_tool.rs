//! OpenSC's `pkcs11-tool`, unmodified, against `libkeysync_pkcs11.so` in
//! front of a cluster of real processes (nats-server, the orchestrator,
//! three agents): it lists the token, generates EC, Ed25519, RSA and AES
//! keys, signs with each key pair at once (in a new process, which has
//! never seen the key), also on digests the application made (`ECDSA`,
//! `RSA-PKCS` on a DigestInfo, `RSA-PKCS-PSS`), and openssl verifies with
//! the public key it reads out; OpenSSL's pkcs11 engine signs by a
//! `pkcs11:` URI and openssl verifies; a wrong PIN is `CKR_PIN_INCORRECT`;
//! every HSM ends up holding every key; `--test` finds no errors;
//! `--delete-object` deletes the key from every HSM. (Applications' own
//! `CKA_ID`s: `app_ids.rs`.)

mod common;

use std::time::Duration;

use common::*;
use keysync_schemas::{HsmId, KeyId};
use keysync_testkit::{start_stack, wait_until, DevStack};

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
