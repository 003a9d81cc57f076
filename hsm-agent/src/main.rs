//! `hsm-agent` binary: parses flags and runs [`hsm_agent::run`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use keysync_schemas::{HsmId, Subjects};

/// Fronts one HSM for a keysync cluster.
#[derive(Debug, clap::Parser)]
#[command(version, about)]
struct Args {
    /// A TOML file of options: keys are the long option names with `-`
    /// replaced by `_` (`nats`, `data_dir`, ...); a flag or its environment
    /// variable overrides the file. Unknown keys are refused.
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Log lines on stderr: text (coloured on a terminal) or json (one
    /// object per line, with trace and span ids).
    #[arg(long, value_enum, env = "KEYSYNC_LOG_FORMAT", default_value = "text")]
    log_format: keysync_telemetry::LogFormat,
    /// NATS server URL.
    #[arg(long, env = "KEYSYNC_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// This HSM's id (A-Z, a-z, 0-9, '_', '-').
    #[arg(long, env = "KEYSYNC_HSM_ID")]
    id: HsmId,
    /// The agent's own directory: its identity, the embedded keystore or
    /// the PKCS#11 journal, pinned cluster key.
    #[arg(long, env = "KEYSYNC_DATA_DIR")]
    data_dir: PathBuf,
    /// The HSM this agent fronts.
    #[arg(long, value_enum, env = "KEYSYNC_KEYSTORE", default_value = "embedded")]
    keystore: KeystoreArg,
    /// Cluster domain key file (made by `keysync cluster init`). Required
    /// for the embedded keystore; with a PKCS#11 token it only gives the
    /// check value the token's domain key must have (prefer
    /// `--domain-check-value`, so the file stays off the agent's host).
    #[arg(long, env = "KEYSYNC_DOMAIN_KEY")]
    domain_key: Option<PathBuf>,
    /// PKCS#11: the check value of the cluster domain key (64 hex digits,
    /// printed by `keysync hsm provision-domain-key`); the agent refuses a
    /// token whose domain key has another.
    #[arg(long, env = "KEYSYNC_DOMAIN_CHECK_VALUE")]
    domain_check_value: Option<String>,
    /// PKCS#11: the module (shared library), e.g.
    /// /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long, env = "KEYSYNC_PKCS11_MODULE")]
    pkcs11_module: Option<PathBuf>,
    /// PKCS#11: the label of the token to use.
    #[arg(long, env = "KEYSYNC_PKCS11_TOKEN_LABEL")]
    pkcs11_token_label: Option<String>,
    /// PKCS#11: a file holding the user PIN (mode 0600 or stricter; never
    /// a flag, which `ps` would show).
    #[arg(long, env = "KEYSYNC_PKCS11_PIN_FILE")]
    pkcs11_pin_file: Option<PathBuf>,
    /// Subject prefix of the cluster.
    #[arg(long, env = "KEYSYNC_PREFIX", default_value = "keysync")]
    prefix: String,
    /// Seconds a `logged` create waits for JetStream's acknowledgement.
    #[arg(long, default_value_t = 5.0)]
    publish_timeout: f64,
    /// Key operations handled at once.
    #[arg(long, default_value_t = 256)]
    max_concurrent_ops: usize,
    /// Seconds between heartbeats (each carries the inventory digest).
    #[arg(long, default_value_t = 1.0)]
    heartbeat_interval: f64,
    /// This agent's identity file (Ed25519, mode 0600; made at first
    /// start). Default: `identity.key` in the data dir.
    #[arg(long, env = "KEYSYNC_AGENT_IDENTITY")]
    identity: Option<PathBuf>,
    /// The cluster's public key (64 hex digits, printed by the
    /// orchestrator and `keysync hsm cluster-key`): commands must be signed
    /// with it. Without it, the key pinned in the data dir is used, or the
    /// orchestrator's is trusted on first use and pinned.
    #[arg(long, env = "KEYSYNC_CLUSTER_KEY", value_parser = keysync_security::parse_public_key)]
    cluster_key: Option<[u8; 32]>,
    /// A one-time join token (`keysync hsm token`) to enroll with.
    #[arg(long, env = "KEYSYNC_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Serve Prometheus metrics on `/metrics`, and `/healthz` and
    /// `/readyz`, on this address (e.g. 127.0.0.1:9101).
    #[arg(long, env = "KEYSYNC_AGENT_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    #[command(flatten)]
    auth: keysync_security::NatsAuth,
}

/// `--keystore`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum KeystoreArg {
    /// The embedded software HSM in the data dir.
    Embedded,
    /// A PKCS#11 token.
    Pkcs11,
}

/// The keystore the flags name, or what is missing, said plainly.
fn keystore_kind(args: &Args) -> anyhow::Result<hsm_agent::KeystoreKind> {
    match args.keystore {
        KeystoreArg::Embedded => {
            let domain_key = args.domain_key.clone().context(
                "the embedded keystore needs --domain-key FILE (the file `keysync cluster init` made)",
            )?;
            Ok(hsm_agent::KeystoreKind::Embedded { domain_key })
        }
        KeystoreArg::Pkcs11 => {
            use hsm_agent::keystore::pkcs11::ExpectedDomain;
            let need = |what: &str| anyhow::anyhow!("--keystore pkcs11 needs {what}");
            let module = args
                .pkcs11_module
                .clone()
                .ok_or_else(|| need("--pkcs11-module PATH"))?;
            let token_label = args
                .pkcs11_token_label
                .clone()
                .ok_or_else(|| need("--pkcs11-token-label LABEL"))?;
            let pin_file = args
                .pkcs11_pin_file
                .clone()
                .ok_or_else(|| need("--pkcs11-pin-file FILE"))?;
            let domain = match (&args.domain_check_value, &args.domain_key) {
                (Some(hex_cv), _) => {
                    let bytes = hex::decode(hex_cv.trim())
                        .ok()
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                        .context("--domain-check-value takes 64 hex digits")?;
                    ExpectedDomain::CheckValue(bytes)
                }
                (None, Some(file)) => {
                    let dk = keysync_security::domain_key::DomainKey::load(file)?;
                    ExpectedDomain::CheckValue(dk.check_value()?)
                }
                (None, None) => {
                    return Err(need(
                        "--domain-check-value HEX (printed by `keysync hsm provision-domain-key`) or --domain-key FILE",
                    ))
                }
            };
            Ok(hsm_agent::KeystoreKind::Pkcs11 {
                module,
                token_label,
                pin_file,
                domain,
            })
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = keysync_telemetry::config_file::parse();
    let _telemetry = keysync_telemetry::init(
        "hsm-agent",
        &[
            ("keysync.hsm_id", args.id.to_string()),
            ("service.instance.id", args.id.to_string()),
        ],
        "info,async_nats=warn",
        args.log_format,
    )?;
    let subjects = Subjects::new(&args.prefix)?;
    let keystore = keystore_kind(&args)?;
    // The data dir holds the identity, the keystore and its outbox: 0700,
    // every file in it 0600.
    if keysync_security::secret_file::private_dir(&args.data_dir)
        .with_context(|| format!("data dir {}", args.data_dir.display()))?
    {
        tracing::warn!(dir = %args.data_dir.display(), "the data dir was accessible to group or others; narrowed to 0700");
    }
    let identity_path = args
        .identity
        .clone()
        .unwrap_or_else(|| args.data_dir.join("identity.key"));
    let (identity, created) = keysync_security::Identity::load_or_create(&identity_path)
        .with_context(|| format!("agent identity {}", identity_path.display()))?;
    tracing::info!(
        hsm = %args.id,
        identity = %identity.public_hex(),
        created,
        "agent identity loaded"
    );
    let config = hsm_agent::Config {
        identity: std::sync::Arc::new(identity),
        cluster_key: args.cluster_key,
        join_token: args.join_token.clone(),
        hsm: args.id.clone(),
        data_dir: args.data_dir,
        keystore,
        subjects,
        publish_timeout: Duration::from_secs_f64(args.publish_timeout.max(0.1)),
        max_concurrent_ops: args.max_concurrent_ops,
        heartbeat_interval: Duration::from_secs_f64(args.heartbeat_interval.max(0.05)),
        metrics: hsm_agent::metrics::Endpoint::new(args.metrics_addr),
    };
    let nats = args
        .auth
        .apply_as(
            keysync_telemetry::process::log_connection_events(async_nats::ConnectOptions::new()),
            args.id.as_str(),
        )
        .await?
        .name(format!("hsm-agent {}", args.id))
        .retry_on_initial_connect()
        .connect(keysync_telemetry::process::servers(&args.nats).map_err(anyhow::Error::msg)?)
        .await
        .with_context(|| format!("connecting to NATS at {}", args.nats))?;
    let store = hsm_agent::open_store(&config)?;
    // Crash-only: a failed run (say, JetStream went away) starts again; the
    // keystore, its outbox and the durable command queue carry the state.
    keysync_telemetry::process::supervise("agent", |shutdown| {
        hsm_agent::run(config.clone(), store.clone(), nats.clone(), shutdown)
    })
    .await
}
