//! Java's SunPKCS11 provider (the JDK's, unmodified) on
//! `libkeysync_pkcs11.so` in front of a two-HSM stack: it generates P-256
//! and RSA-2048 pairs (as session objects) and signs with them through the
//! token; the JDK's own providers verify. Skipped where no JDK is installed
//! (`scripts/install-deps` does not install one).

use std::path::PathBuf;

use keysync_testkit::{find_binary, start_stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sunpkcs11_generates_and_signs() {
    let have = |p: &str| {
        std::process::Command::new(p)
            .arg("-version")
            .output()
            .is_ok()
    };
    if !have("javac") || !have("java") {
        println!("SKIPPED: no JDK (javac, java)");
        return;
    }
    let stack = start_stack(2).await;
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
    let provider = dir.path().join("sunpkcs11.cfg");
    std::fs::write(
        &provider,
        format!("name = keysync\nlibrary = {}\nslot = 0\n", module.display()),
    )
    .expect("provider config");
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/java/Sign.java");
    let javac = tokio::process::Command::new("javac")
        .arg("-d")
        .arg(dir.path())
        .arg(&source)
        .output()
        .await
        .expect("run javac");
    assert!(
        javac.status.success(),
        "javac: {}",
        String::from_utf8_lossy(&javac.stderr)
    );
    let out = tokio::process::Command::new("java")
        .env("KEYSYNC_PKCS11_CONFIG", &config)
        .arg("-cp")
        .arg(dir.path())
        .arg("Sign")
        .arg(&provider)
        .arg("1234")
        .output()
        .await
        .expect("run java");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("SHA256withECDSA verifies: true")
            && stdout.contains("SHA256withRSA verifies: true"),
        "java: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stack.shutdown().await;
}
