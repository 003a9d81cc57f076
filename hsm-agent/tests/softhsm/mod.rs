//! Temporary SoftHSM2 tokens for tests.
//!
//! `SOFTHSM2_CONF` is process-global and SoftHSM reads its token directory
//! once, at `C_Initialize`: every test of this binary shares one
//! configuration and one token directory, and every token is made before
//! the module is first loaded (here, once, by [`softhsm`]). Each test uses
//! tokens of its own labels, so tests run in parallel.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The SoftHSM2 module on Debian.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The user PIN of every test token.
pub const PIN: &str = "1234";
/// Their SO PIN.
pub const SO_PIN: &str = "12345678";

/// The tokens made, one per label (two for [`TWIN`]).
pub const LABELS: &[&str] = &[
    "keys", "domain", "clone-a", "clone-b", "bad", "probe", "pin", "relogin", "opensc", "pykcs11",
    "pool", "embedded", "store-a", "store-b",
];
/// A label two tokens carry.
pub const TWIN: &str = "twin";

/// The shared SoftHSM set-up.
pub struct SoftHsm {
    /// Holds the configuration and the tokens.
    pub dir: PathBuf,
    /// The file `SOFTHSM2_CONF` names.
    pub conf: PathBuf,
    /// A 0600 file holding [`PIN`].
    pub pin_file: PathBuf,
    /// A 0600 file holding a wrong PIN.
    pub wrong_pin_file: PathBuf,
}

impl SoftHsm {
    /// The module path.
    pub fn module(&self) -> &Path {
        Path::new(MODULE)
    }

    /// A command with this set-up's `SOFTHSM2_CONF`.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SOFTHSM2_CONF", &self.conf);
        c
    }
}

/// Whether `program` runs.
pub fn have(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success() || !o.stdout.is_empty())
}

/// The SoftHSM version `softhsm2-util --version` prints.
pub fn version() -> Option<String> {
    let out = Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Writes `text` to a new 0600 file.
pub fn secret_file(path: &Path, text: &str) {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).expect("create secret file");
    f.write_all(text.as_bytes()).expect("write secret file");
}

fn init_token(conf: &Path, label: &str) {
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", conf)
        .args([
            "--init-token",
            "--free",
            "--label",
            label,
            "--so-pin",
            SO_PIN,
            "--pin",
            PIN,
        ])
        .output()
        .expect("run softhsm2-util");
    assert!(
        out.status.success(),
        "softhsm2-util --init-token {label}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn set_up() -> Result<SoftHsm, String> {
    if !Path::new(MODULE).exists() {
        return Err(format!("{MODULE} is missing (apt-get install softhsm2)"));
    }
    if !have("softhsm2-util", "--version") {
        return Err("softhsm2-util is missing (apt-get install softhsm2)".into());
    }
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    // Token directories of earlier runs whose process is gone.
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("softhsm-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    let dir = tmp.join(format!("softhsm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(|e| e.to_string())?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            tokens.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    for label in LABELS {
        init_token(&conf, label);
    }
    init_token(&conf, TWIN);
    init_token(&conf, TWIN);
    let pin_file = dir.join("pin");
    secret_file(&pin_file, &format!("{PIN}\n"));
    let wrong_pin_file = dir.join("wrong-pin");
    secret_file(&wrong_pin_file, "4321\n");
    // Set once, before any test loads the module (all of them come through
    // here first); edition 2021, so this is a safe call.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    Ok(SoftHsm {
        dir,
        conf,
        pin_file,
        wrong_pin_file,
    })
}

/// The shared set-up, or `None` (with the reason printed) when SoftHSM2 is
/// not installed: the caller returns, skipping the test.
pub fn softhsm() -> Option<&'static SoftHsm> {
    static SET_UP: OnceLock<Result<SoftHsm, String>> = OnceLock::new();
    match SET_UP.get_or_init(set_up) {
        Ok(s) => Some(s),
        Err(why) => {
            println!("SKIPPED: no SoftHSM2 tokens: {why}");
            None
        }
    }
}
