//! NATS credentials, the same flags for every keysync binary.
//!
//! With the permissions config in `deploy/nats/secure.conf` each role (agent,
//! orchestrator, client, auditor, operator) connects as its own user and may
//! publish and subscribe only where its work lies, its reply inboxes
//! included: every connection asks under its own inbox prefix
//! ([`NatsAuth::inbox_prefix`], see [`crate::reply`]), so permissions can
//! confine each role's subscriptions to `_INBOX.<name>.>`.

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
    /// Inbox prefix for replies to this process's requests (`_INBOX` or
    /// under `_INBOX.`). Default: `_INBOX.<NATS user>` when logging in with
    /// a user name, else `_INBOX.<role>` (`orchestrator`, the HSM id,
    /// `client`). NATS permissions confine each role's subscriptions to its
    /// own prefix.
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "KEYSYNC_INBOX_PREFIX", global = true)
    )]
    pub inbox_prefix: Option<String>,
    /// TLS: the CA certificate (PEM) the NATS servers' certificates must
    /// chain to; TLS is then required.
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "KEYSYNC_NATS_TLS_CA", global = true)
    )]
    pub nats_tls_ca: Option<PathBuf>,
    /// TLS: this process's client certificate (PEM), for servers that
    /// verify clients (with --nats-tls-key).
    #[cfg_attr(
        feature = "clap",
        arg(
            long,
            env = "KEYSYNC_NATS_TLS_CERT",
            global = true,
            requires = "nats_tls_key"
        )
    )]
    pub nats_tls_cert: Option<PathBuf>,
    /// TLS: the client certificate's private key (PEM, mode 0600).
    #[cfg_attr(
        feature = "clap",
        arg(
            long,
            env = "KEYSYNC_NATS_TLS_KEY",
            global = true,
            requires = "nats_tls_cert"
        )
    )]
    pub nats_tls_key: Option<PathBuf>,
}

/// How long to wait before reconnect attempt `attempts` (0-based): soon,
/// then doubling from 50 ms to at most 1 s, with jitter so a cluster's
/// processes do not knock in step. async-nats's own schedule grows to
/// seconds, so after a short NATS restart agents came back ~2.3 s late and
/// requests meanwhile found no responders; at most 1 s between attempts
/// bounds that.
pub fn reconnect_delay(attempts: usize) -> std::time::Duration {
    use backon::BackoffBuilder as _;
    if attempts == 0 {
        return std::time::Duration::ZERO;
    }
    backon::ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(50))
        .with_max_delay(std::time::Duration::from_secs(1))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(attempts - 1)
        .unwrap_or(std::time::Duration::from_secs(1))
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
            .field("inbox_prefix", &self.inbox_prefix)
            .field("nats_tls_ca", &self.nats_tls_ca)
            .field("nats_tls_cert", &self.nats_tls_cert)
            .field("nats_tls_key", &self.nats_tls_key)
            .finish()
    }
}

/// The `name` of the user JWT in a NATS `.creds` file, if it has one.
/// The signature is not checked here: the server checks it, and the name
/// only chooses an inbox prefix, which the server's permissions confine.
fn creds_user_name(path: &std::path::Path) -> Option<String> {
    use base64::Engine as _;
    const BEGIN: &str = "-----BEGIN NATS USER JWT-----";
    let text = std::fs::read_to_string(path).ok()?;
    let jwt = text[text.find(BEGIN)? + BEGIN.len()..].trim_start();
    let claims = jwt.split(['.', '\n']).nth(1)?;
    let body = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim())
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&body).ok()?;
    value["name"].as_str().map(String::from)
}

/// Why credentials could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// A password without a user, or the reverse.
    #[error("--nats-user and --nats-password go together")]
    Incomplete,
    /// A TLS client certificate without its key, or the reverse.
    #[error("--nats-tls-cert and --nats-tls-key go together")]
    IncompleteTls,
    /// An inbox prefix keysync responders would not answer, or not a subject.
    #[error(transparent)]
    InboxPrefix(#[from] crate::reply::InboxPrefixError),
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

    /// The inbox prefix of a connection in `role` (`orchestrator`, an HSM
    /// id, `client`, ...): `--inbox-prefix` if given (it must be an inbox),
    /// else `_INBOX.<user>` when logging in with a user name (the role's
    /// user in `secure.conf`), else `_INBOX.<name>` with a creds file whose
    /// user JWT is named (`keysync nats init` names each role's user, and
    /// each agent's after its HSM id), else `_INBOX.<role>`; `None` if none
    /// makes a subject.
    pub fn inbox_prefix(&self, role: Option<&str>) -> Result<Option<String>, CredentialsError> {
        if let Some(p) = &self.inbox_prefix {
            crate::reply::validate_prefix(p)?;
            return Ok(Some(p.clone()));
        }
        let creds_name = self.nats_creds.as_deref().and_then(creds_user_name);
        Ok(self
            .nats_user
            .as_deref()
            .and_then(crate::reply::prefix_for)
            .or_else(|| creds_name.as_deref().and_then(crate::reply::prefix_for))
            .or_else(|| role.and_then(crate::reply::prefix_for)))
    }

    /// Adds these credentials, and the inbox prefix of a connection in
    /// `role` ([`NatsAuth::inbox_prefix`]), to connect options.
    pub async fn apply_as(
        &self,
        opts: async_nats::ConnectOptions,
        role: &str,
    ) -> Result<async_nats::ConnectOptions, CredentialsError> {
        self.apply_with(opts, Some(role)).await
    }

    /// Adds these credentials to connect options, and the inbox prefix if
    /// one is given or a user name makes one (otherwise NATS's default,
    /// `_INBOX`).
    pub async fn apply(
        &self,
        opts: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, CredentialsError> {
        self.apply_with(opts, None).await
    }

    async fn apply_with(
        &self,
        mut opts: async_nats::ConnectOptions,
        role: Option<&str>,
    ) -> Result<async_nats::ConnectOptions, CredentialsError> {
        if let Some(prefix) = self.inbox_prefix(role)? {
            opts = opts.custom_inbox_prefix(prefix);
        }
        opts = opts.reconnect_delay_callback(reconnect_delay);
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
        if let Some(ca) = &self.nats_tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.nats_tls_cert, &self.nats_tls_key) {
            (Some(cert), Some(key)) => {
                opts = opts
                    .add_client_certificate(cert.clone(), key.clone())
                    .require_tls(true)
            }
            (None, None) => {}
            _ => return Err(CredentialsError::IncompleteTls),
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
        if let Some(p) = &self.inbox_prefix {
            env.push(("KEYSYNC_INBOX_PREFIX", p.clone()));
        }
        if let Some(p) = &self.nats_tls_ca {
            env.push(("KEYSYNC_NATS_TLS_CA", p.display().to_string()));
        }
        if let Some(p) = &self.nats_tls_cert {
            env.push(("KEYSYNC_NATS_TLS_CERT", p.display().to_string()));
        }
        if let Some(p) = &self.nats_tls_key {
            env.push(("KEYSYNC_NATS_TLS_KEY", p.display().to_string()));
        }
        env
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn reconnects_come_soon_and_never_more_than_a_few_seconds_apart() {
        use std::time::Duration;
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert!(reconnect_delay(1) <= Duration::from_millis(100));
        for n in 1..200 {
            // At most the 1 s cap plus its jitter.
            assert!(reconnect_delay(n) <= Duration::from_secs(2), "attempt {n}");
        }
    }

    use super::*;

    fn prefix(auth: &NatsAuth, role: Option<&str>) -> Option<String> {
        auth.inbox_prefix(role).expect("valid")
    }

    #[test]
    fn the_inbox_prefix_is_the_given_one_else_the_users_else_the_roles() {
        let anonymous = NatsAuth::default();
        assert_eq!(prefix(&anonymous, None), None);
        assert_eq!(
            prefix(&anonymous, Some("orchestrator")).as_deref(),
            Some("_INBOX.orchestrator")
        );
        let hsm = NatsAuth::user("hsm-1", "secret");
        assert_eq!(prefix(&hsm, None).as_deref(), Some("_INBOX.hsm-1"));
        assert_eq!(
            prefix(&hsm, Some("client")).as_deref(),
            Some("_INBOX.hsm-1")
        );
        let given = NatsAuth {
            inbox_prefix: Some("_INBOX.team.alice".into()),
            ..NatsAuth::user("alice", "secret")
        };
        assert_eq!(
            prefix(&given, Some("client")).as_deref(),
            Some("_INBOX.team.alice")
        );
        assert!(given
            .to_env()
            .contains(&("KEYSYNC_INBOX_PREFIX", "_INBOX.team.alice".into())));
        // A user name that is no subject falls back to the role.
        let odd = NatsAuth::user("alice smith", "secret");
        assert_eq!(
            prefix(&odd, Some("client")).as_deref(),
            Some("_INBOX.client")
        );
    }

    #[test]
    fn a_given_prefix_must_be_an_inbox() {
        for bad in ["keysync.audit", "_INBOX.*", "_INBOX_client", ""] {
            let auth = NatsAuth {
                inbox_prefix: Some(bad.into()),
                ..Default::default()
            };
            assert!(
                matches!(
                    auth.inbox_prefix(Some("client")),
                    Err(CredentialsError::InboxPrefix(_))
                ),
                "{bad}"
            );
        }
    }
}
