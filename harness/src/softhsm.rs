//! SoftHSM2 tokens for agents of a local stack that front a PKCS#11 token
//! (`hsm-agent --keystore pkcs11`) instead of the embedded keystore.
//!
//! The stack makes one token per such agent (labelled with the HSM id)
//! under a `SOFTHSM2_CONF` of its own, and puts the cluster domain key into
//! each with the real ceremony, `keysync hsm provision-domain-key` (a
//! child process: this process never loads the module, so no PKCS#11 state
//! is shared with the agents).

use std::path::{Path, PathBuf};
use std::process::Command;

use keysync_schemas::HsmId;

use crate::binaries::find_binary;
use crate::{Result, StackError};

/// Debian's SoftHSM2 module; `KEYSYNC_SOFTHSM_MODULE` overrides it.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The user PIN of the stack's tokens (in a 0600 file; agents read it there).
const PIN: &str = "1234";
const SO_PIN: &str = "12345678";

/// The SoftHSM2 set-up of a stack.
#[derive(Debug, Clone)]
pub struct SoftHsmTokens {
    /// The file `SOFTHSM2_CONF` names for the agents.
    pub conf: PathBuf,
    /// The module.
    pub module: PathBuf,
    /// The user PIN file.
    pub pin_file: PathBuf,
    /// The domain key's check value (agents' `--domain-check-value`).
    pub check_value: String,
    /// The HSMs that front a token.
    pub ids: Vec<HsmId>,
}

fn failed(what: &str, detail: impl std::fmt::Display) -> StackError {
    StackError::NotReady {
        what: what.to_string(),
        detail: detail.to_string(),
    }
}

/// The module to use, if installed.
pub fn module() -> Option<PathBuf> {
    let m = std::env::var_os("KEYSYNC_SOFTHSM_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODULE));
    m.is_file().then_some(m)
}

impl SoftHsmTokens {
    /// Makes `dir/softhsm` with one token per id and the domain key in
    /// each. Tokens already there (a stack started again on the same dir)
    /// are kept.
    pub fn make(dir: &Path, domain_key: &Path, ids: &[HsmId]) -> Result<SoftHsmTokens> {
        let module = module().ok_or_else(|| {
            failed(
                "SoftHSM2",
                format!("{DEFAULT_MODULE} is missing (apt-get install softhsm2, or set KEYSYNC_SOFTHSM_MODULE)"),
            )
        })?;
        let root = dir.join("softhsm");
        let tokens = root.join("tokens");
        keysync_security::secret_file::create_private_dirs(&tokens)
            .map_err(|e| failed("SoftHSM2 token dir", e))?;
        let conf = root.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .map_err(|e| StackError::Io(conf.display().to_string(), e))?;
        let pin_file = root.join("pin");
        keysync_security::secret_file::write_private(&pin_file, PIN.as_bytes())
            .map_err(|e| failed("SoftHSM2 PIN file", e))?;
        let made = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .arg("--show-slots")
            .output()
            .map_err(|e| failed("softhsm2-util", format!("{e} (apt-get install softhsm2)")))?;
        let listing = String::from_utf8_lossy(&made.stdout).into_owned();
        let keysync = find_binary("keysync")?;
        let mut check_value = String::new();
        for id in ids {
            let has = listing
                .lines()
                .any(|l| l.trim() == format!("Label:            {}", id.as_str()));
            if !has {
                let out = Command::new("softhsm2-util")
                    .env("SOFTHSM2_CONF", &conf)
                    .args(["--init-token", "--free", "--label", id.as_str()])
                    .args(["--pin", PIN, "--so-pin", SO_PIN])
                    .output()
                    .map_err(|e| failed("softhsm2-util", e))?;
                if !out.status.success() {
                    return Err(failed(
                        &format!("SoftHSM2 token {id}"),
                        String::from_utf8_lossy(&out.stderr),
                    ));
                }
            }
            let out = Command::new(&keysync)
                .env("SOFTHSM2_CONF", &conf)
                .args(["hsm", "provision-domain-key", "--json", "--domain-key"])
                .arg(domain_key)
                .arg("--pkcs11-module")
                .arg(&module)
                .args(["--pkcs11-token-label", id.as_str(), "--pkcs11-pin-file"])
                .arg(&pin_file)
                .output()
                .map_err(|e| failed("keysync hsm provision-domain-key", e))?;
            if !out.status.success() {
                return Err(failed(
                    &format!("provisioning the domain key into token {id}"),
                    String::from_utf8_lossy(&out.stderr),
                ));
            }
            let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
                .map_err(|e| failed("keysync hsm provision-domain-key --json", e))?;
            check_value = doc["check_value"].as_str().unwrap_or_default().to_string();
        }
        Ok(SoftHsmTokens {
            conf,
            module,
            pin_file,
            check_value,
            ids: ids.to_vec(),
        })
    }

    /// Whether the agent of `id` fronts a token.
    pub fn fronts(&self, id: &HsmId) -> bool {
        self.ids.contains(id)
    }

    /// The flags and environment of an agent fronting token `id`.
    pub fn agent(&self, id: &HsmId, cmd: &mut Command) {
        cmd.env("SOFTHSM2_CONF", &self.conf)
            .args(["--keystore", "pkcs11", "--pkcs11-module"])
            .arg(&self.module)
            .args(["--pkcs11-token-label", id.as_str(), "--pkcs11-pin-file"])
            .arg(&self.pin_file)
            .args(["--domain-check-value", &self.check_value]);
    }
}
