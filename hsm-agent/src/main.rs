//! `hsm-agent` binary: parses flags and runs [`hsm_agent::run`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use keysync_schemas::{HsmId, Subjects};

/// Fronts one HSM for a keysync cluster.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// NATS server URL.
    #[arg(long, env = "KEYSYNC_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// This HSM's id (A-Z, a-z, 0-9, '_', '-').
    #[arg(long, env = "KEYSYNC_HSM_ID")]
    id: HsmId,
    /// Directory of the embedded keystore.
    #[arg(long, env = "KEYSYNC_DATA_DIR")]
    data_dir: PathBuf,
    /// Cluster domain key file (made by `keysync cluster init`).
    #[arg(long, env = "KEYSYNC_DOMAIN_KEY")]
    domain_key: PathBuf,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = keysync_telemetry::init(
        "hsm-agent",
        &[
            ("keysync.hsm_id", args.id.to_string()),
            ("service.instance.id", args.id.to_string()),
        ],
        "info,async_nats=warn",
    );
    let subjects = Subjects::new(&args.prefix)?;
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
        domain_key: args.domain_key,
        subjects,
        publish_timeout: Duration::from_secs_f64(args.publish_timeout.max(0.1)),
        max_concurrent_ops: args.max_concurrent_ops,
        heartbeat_interval: Duration::from_secs_f64(args.heartbeat_interval.max(0.05)),
        metrics: hsm_agent::metrics::Endpoint::new(args.metrics_addr),
    };
    let nats = args
        .auth
        .apply_as(async_nats::ConnectOptions::new(), args.id.as_str())
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
