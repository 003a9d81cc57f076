//! NATS credentials, the same flags for every keysync binary.
//!
//! With the permissions config in `deploy/nats/secure.conf` each role (agent,
//! orchestrator, client, auditor, operator) connects as its own user and may
//! publish and subscribe only where its work lies.

use std::path::PathBuf;

/// How a process authenticates to NATS.
///
/// With the `clap` feature (the binaries') these are command-line flags; the
/// SDK builds it as a plain struct, so applications do not link a CLI parser.
#[derive(Clone, Default)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct NatsAuth {
    /// NATS user name (with --nats-password).
    #[cfg_attr(feature = "clap", arg(long, env = "KEYSYNC_NATS_USER", global = true))]
    pub nats_user: Option<String>,
    /// NATS password.
    #[cfg_attr(
        feature = "clap",
        arg(
            long,
            env = "KEYSYNC_NATS_PASSWORD",
            hide_env_values = true,
            global = true
        )
    )]
    pub nats_password: Option<String>,
    /// NATS credentials file (JWT and nkey seed).
    #[cfg_attr(feature = "clap", arg(long, env = "KEYSYNC_NATS_CREDS", global = true))]
    pub nats_creds: Option<PathBuf>,
    /// File holding an nkey seed (`SU...`).
    #[cfg_attr(feature = "clap", arg(long, env = "KEYSYNC_NATS_NKEY", global = true))]
    pub nats_nkey: Option<PathBuf>,
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsAuth")
            .field("nats_user", &self.nats_user)
            .field(
                "nats_password",
                &self.nats_password.as_ref().map(|_| "<redacted>"),
            )
            .field("nats_creds", &self.nats_creds)
            .field("nats_nkey", &self.nats_nkey)
            .finish()
    }
}

/// Why credentials could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// A password without a user, or the reverse.
    #[error("--nats-user and --nats-password go together")]
    Incomplete,
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

impl NatsAuth {
    /// User and password credentials.
    pub fn user(user: &str, password: &str) -> Self {
        NatsAuth {
            nats_user: Some(user.to_string()),
            nats_password: Some(password.to_string()),
            ..Default::default()
        }
    }

    /// Adds these credentials to connect options.
    pub async fn apply(
        &self,
        mut opts: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, CredentialsError> {
        match (&self.nats_user, &self.nats_password) {
            (Some(u), Some(p)) => opts = opts.user_and_password(u.clone(), p.clone()),
            (None, None) => {}
            _ => return Err(CredentialsError::Incomplete),
        }
        if let Some(path) = &self.nats_creds {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|source| CredentialsError::Io {
                    path: path.display().to_string(),
                    source,
                })?;
        }
        if let Some(path) = &self.nats_nkey {
            let seed = crate::secret_file::read(path).map_err(|e| CredentialsError::Io {
                path: path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })?;
            opts = opts.nkey(seed.trim().to_string());
        }
        Ok(opts)
    }

    /// Whether any credential is given.
    pub fn is_set(&self) -> bool {
        self.nats_user.is_some()
            || self.nats_password.is_some()
            || self.nats_creds.is_some()
            || self.nats_nkey.is_some()
    }

    /// The environment that passes these credentials to a child process.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let mut env = Vec::new();
        if let Some(u) = &self.nats_user {
            env.push(("KEYSYNC_NATS_USER", u.clone()));
        }
        if let Some(p) = &self.nats_password {
            env.push(("KEYSYNC_NATS_PASSWORD", p.clone()));
        }
        if let Some(c) = &self.nats_creds {
            env.push(("KEYSYNC_NATS_CREDS", c.display().to_string()));
        }
        if let Some(n) = &self.nats_nkey {
            env.push(("KEYSYNC_NATS_NKEY", n.display().to_string()));
        }
        env
    }
}
