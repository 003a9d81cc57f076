//! Helpers shared by the module's test files: pkcs11-tool and OpenSSL's
//! pkcs11 engine run against the module, openssl verifying.
#![allow(dead_code)] // each test binary uses a part

use std::path::{Path, PathBuf};
use std::process::Output;

use keysync_schemas::KeyId;
use keysync_testkit::{find_binary, DevStack};

pub const PIN: &str = "1234";

pub fn tools_present() -> bool {
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
pub fn module() -> PathBuf {
    find_binary("libkeysync_pkcs11.so")
        .unwrap_or_else(|e| panic!("{e}: build it with `cargo build -p keysync-pkcs11`"))
}

/// Writes the module's configuration for `stack` into `dir`.
pub fn config(stack: &DevStack, dir: &Path) -> PathBuf {
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

pub struct Tool {
    pub module: PathBuf,
    pub config: PathBuf,
    pub dir: PathBuf,
}

impl Tool {
    pub async fn run(&self, args: &[&str]) -> Output {
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
    pub async fn ok(&self, args: &[&str]) -> String {
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
    pub async fn user(&self, args: &[&str]) -> String {
        let mut all = vec!["--login", "--pin", PIN];
        all.extend_from_slice(args);
        self.ok(&all).await
    }
}

/// OpenSSL with its pkcs11 engine loading the module (an `OPENSSL_CONF`
/// with an engine section, as a deployment would write it).
pub struct Engine {
    conf: PathBuf,
    config: PathBuf,
    dir: PathBuf,
}

impl Engine {
    /// `None` (and a note) when libengine-pkcs11-openssl is not installed;
    /// in CI it must be.
    pub fn new(tool: &Tool) -> Option<Engine> {
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

    pub fn ok(&self, args: &[&str]) {
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
pub fn printed_id(out: &str) -> String {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("ID:"))
        .map(|id| id.trim().to_string())
        .unwrap_or_else(|| panic!("no ID in {out}"))
}

pub fn key_id(hex: &str) -> KeyId {
    KeyId(uuid::Uuid::parse_str(hex).unwrap_or_else(|e| panic!("{hex} is not a key id: {e}")))
}

/// openssl verifies `signature` over `data` with the DER public key.
pub fn openssl_verifies(dir: &Path, public: &str, signature: &str) {
    openssl_verifies_with(dir, public, signature, &[]);
}

/// The same, with `-sigopt`s (PSS).
pub fn openssl_verifies_with(dir: &Path, public: &str, signature: &str, sigopts: &[&str]) {
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
