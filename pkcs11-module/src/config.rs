//! The module's configuration: a TOML file named by `KEYSYNC_PKCS11_CONFIG`.
//!
//! ```toml
//! nats = ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]
//! user_pin = "1234"            # what C_Login(CKU_USER) accepts
//! durability = "replicas:2"    # when C_GenerateKey(Pair) returns (default)
//! token_label = "keysync"      # the token's label (default), at most 32 bytes
//! timeout_secs = 10            # one request, and a durability wait (default)
//! # NATS credentials, as the CLI takes them (all optional):
//! # nats_user, nats_password, nats_creds, nats_nkey, inbox_prefix,
//! # nats_tls_ca, nats_tls_cert, nats_tls_key
//! # subject_prefix = "keysync" # the cluster's subject prefix (default)
//! ```
//!
//! An unknown key is an error at `C_Initialize`, and the message names it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keysync_schemas::{Durability, Subjects};
use serde::Deserialize;

/// The environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "KEYSYNC_PKCS11_CONFIG";

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `KEYSYNC_PKCS11_CONFIG` is not set.
    #[error("{CONFIG_ENV} is not set: name the module's TOML configuration file")]
    NotSet,
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid configuration (an unknown key, a wrong type,
    /// a missing `nats` or `user_pin`); the message says which.
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    nats: Urls,
    user_pin: String,
    durability: Option<String>,
    token_label: Option<String>,
    timeout_secs: Option<f64>,
    subject_prefix: Option<String>,
    nats_user: Option<String>,
    nats_password: Option<String>,
    nats_creds: Option<PathBuf>,
    nats_nkey: Option<PathBuf>,
    inbox_prefix: Option<String>,
    nats_tls_ca: Option<PathBuf>,
    nats_tls_cert: Option<PathBuf>,
    nats_tls_key: Option<PathBuf>,
}

/// `nats` is a list of URLs, or one string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Urls {
    One(String),
    Many(Vec<String>),
}

/// The configuration in use.
#[derive(Clone)]
pub struct Config {
    /// NATS servers.
    pub nats: Vec<String>,
    /// NATS credentials.
    pub auth: keysync_security::NatsAuth,
    /// What `C_Login(CKU_USER)` accepts.
    pub user_pin: String,
    /// When a key generation returns.
    pub durability: Durability,
    /// The token's label (at most 32 bytes).
    pub token_label: String,
    /// Timeout of one request and of a durability wait.
    pub timeout: Duration,
    /// The cluster's subjects.
    pub subjects: Subjects,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("nats", &self.nats)
            .field("durability", &self.durability)
            .field("token_label", &self.token_label)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Reads the file `KEYSYNC_PKCS11_CONFIG` names.
    pub fn from_env() -> Result<Config, ConfigError> {
        let path = std::env::var_os(CONFIG_ENV).ok_or(ConfigError::NotSet)?;
        Self::load(Path::new(&path))
    }

    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|detail| ConfigError::Invalid {
            path: path.to_path_buf(),
            detail,
        })
    }

    /// Parses and checks the text of a configuration file.
    pub fn parse(text: &str) -> Result<Config, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let nats = match file.nats {
            Urls::One(u) => vec![u],
            Urls::Many(us) => us,
        };
        if nats.is_empty() || nats.iter().any(|u| u.trim().is_empty()) {
            return Err("`nats` must list at least one server URL".into());
        }
        let durability = match file.durability {
            Some(d) => d
                .parse::<Durability>()
                .map_err(|e| format!("`durability`: {e}"))?,
            None => Durability::Replicas(2),
        };
        let token_label = file.token_label.unwrap_or_else(|| "keysync".into());
        if token_label.is_empty() || token_label.len() > 32 {
            return Err("`token_label` must be 1 to 32 bytes".into());
        }
        let timeout = match file.timeout_secs {
            None => Duration::from_secs(10),
            Some(s) if s.is_finite() && s > 0.0 && s <= 3600.0 => Duration::from_secs_f64(s),
            Some(s) => return Err(format!("`timeout_secs` {s} is not in (0, 3600]")),
        };
        let subjects = match file.subject_prefix {
            Some(p) => Subjects::new(&p).map_err(|e| format!("`subject_prefix`: {e}"))?,
            None => Subjects::default(),
        };
        Ok(Config {
            nats,
            auth: keysync_security::NatsAuth {
                nats_user: file.nats_user,
                nats_password: file.nats_password,
                nats_creds: file.nats_creds,
                nats_nkey: file.nats_nkey,
                inbox_prefix: file.inbox_prefix,
                nats_tls_ca: file.nats_tls_ca,
                nats_tls_cert: file.nats_tls_cert,
                nats_tls_key: file.nats_tls_key,
            },
            user_pin: file.user_pin,
            durability,
            token_label,
            timeout,
            subjects,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::parse("nats = \"nats://127.0.0.1:4222\"\nuser_pin = \"1234\"\n")
            .expect("valid");
        assert_eq!(c.nats, ["nats://127.0.0.1:4222"]);
        assert_eq!(c.durability, Durability::Replicas(2));
        assert_eq!(c.token_label, "keysync");
        assert_eq!(c.timeout, Duration::from_secs(10));
    }

    #[test]
    fn every_key() {
        let c = Config::parse(
            r#"
            nats = ["nats://a:4222", "nats://b:4222"]
            user_pin = "9999"
            durability = "all"
            token_label = "prod"
            timeout_secs = 2.5
            subject_prefix = "ks.prod"
            nats_user = "app"
            nats_password = "secret"
            "#,
        )
        .expect("valid");
        assert_eq!(c.nats.len(), 2);
        assert_eq!(c.durability, Durability::All);
        assert_eq!(c.token_label, "prod");
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(c.auth.nats_user.as_deref(), Some("app"));
    }

    #[test]
    fn an_unknown_key_is_named() {
        let e = Config::parse("nats = \"nats://x\"\nuser_pin = \"1\"\nuser_pni = \"2\"\n")
            .expect_err("unknown key");
        assert!(e.contains("user_pni"), "{e}");
    }

    #[test]
    fn bad_values() {
        for text in [
            "user_pin = \"1\"\n",
            "nats = []\nuser_pin = \"1\"\n",
            "nats = \"n\"\nuser_pin = \"1\"\ndurability = \"replicas:0\"\n",
            "nats = \"n\"\nuser_pin = \"1\"\ntoken_label = \"123456789012345678901234567890123\"\n",
            "nats = \"n\"\nuser_pin = \"1\"\ntimeout_secs = 0\n",
        ] {
            assert!(Config::parse(text).is_err(), "{text}");
        }
    }
}
