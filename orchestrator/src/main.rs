//! `orchestrator` binary: parses flags and runs [`orchestrator::run`],
//! starting it again after a failure (crash-only: the replay and
//! reconcile of a fresh run finish whatever the failed one left).

use std::time::Duration;

use anyhow::Context as _;
use keysync_schemas::Subjects;

/// Folds the keysync event log into cluster state and keeps every HSM in sync.
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
    /// NATS server URL (several, comma-separated, for a NATS cluster).
    #[arg(long, env = "KEYSYNC_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Subject prefix of the cluster.
    #[arg(long, env = "KEYSYNC_PREFIX", default_value = "keysync")]
    prefix: String,
    /// Stream replicas when creating the streams (use 3 on a NATS cluster).
    #[arg(
        long,
        visible_alias = "stream-replicas",
        env = "KEYSYNC_STREAM_REPLICAS",
        default_value_t = 1
    )]
    replicas: usize,
    /// This instance's name (unique among orchestrators of one cluster).
    #[arg(long, default_value = "orchestrator")]
    name: String,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long, env = "KEYSYNC_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Seconds between sync-metrics documents on `<prefix>.metrics.sync`.
    #[arg(long, default_value_t = 1.0)]
    metrics_interval: f64,
    /// Seconds without a heartbeat before an HSM is declared failed.
    #[arg(long, default_value_t = 5.0)]
    failure_timeout: f64,
    /// Seconds of the active/standby lease (a standby takes over this long
    /// after the active one stops renewing).
    #[arg(long, default_value_t = 3.0)]
    lease_ttl: f64,
    /// Heartbeats in a row showing the same inventory mismatch before an
    /// anti-entropy repair.
    #[arg(long, default_value_t = 3)]
    repair_after: u32,
    /// Events folded between state snapshots (0: never).
    #[arg(long, default_value_t = 10_000)]
    snapshot_every: u64,
    /// Events folded between signed checkpoints in the events log: a
    /// replay checks one signature per checkpointed run instead of one per
    /// event (0: never checkpoint).
    #[arg(long, default_value_t = 10_000)]
    checkpoint_every: u64,
    /// Seconds of quiet after a burst before the events folded since the
    /// last checkpoint are checkpointed, if there are at least
    /// `--checkpoint-idle-min`.
    #[arg(long, default_value_t = 2.0)]
    checkpoint_idle: f64,
    /// Fewest events a quiet time checkpoints (a smaller tail costs a
    /// replay little to check one by one).
    #[arg(long, default_value_t = 256)]
    checkpoint_idle_min: u64,
    /// The cluster identity (Ed25519, mode 0600; made at first start).
    /// Every orchestrator of a cluster uses the same one; agents verify
    /// commands with its public key. Default: a fixed system path, never
    /// the working directory.
    #[arg(long, env = "KEYSYNC_IDENTITY", default_value = keysync_security::identity::DEFAULT_CLUSTER_IDENTITY)]
    identity: std::path::PathBuf,
    #[command(flatten)]
    auth: keysync_security::NatsAuth,
    /// Mirror lifecycle facts as CloudEvents (JSON) into the
    /// `<PREFIX>_LIFECYCLE` stream for services in any language (`off` only
    /// to measure what the mirror costs).
    #[arg(
        long,
        value_enum,
        env = "KEYSYNC_LIFECYCLE_STREAM",
        default_value = "on"
    )]
    lifecycle_stream: OnOff,
    /// Most publishes awaiting acknowledgement at once.
    #[arg(long, default_value_t = orchestrator::DEFAULT_MAX_IN_FLIGHT)]
    max_in_flight: usize,
}

/// A feature turned on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

fn secs(s: f64, min: f64) -> Duration {
    Duration::from_secs_f64(s.max(min))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = keysync_telemetry::config_file::parse();
    let _telemetry = keysync_telemetry::init(
        "orchestrator",
        &[("service.instance.id", args.name.clone())],
        "info,async_nats=warn",
        args.log_format,
    )?;
    let (identity, created) = keysync_security::Identity::load_or_create(&args.identity)
        .with_context(|| format!("cluster identity {}", args.identity.display()))?;
    tracing::info!(
        identity = %args.identity.display(),
        cluster_key = %identity.public_hex(),
        created,
        "cluster identity loaded (give agents --cluster-key with this public key)"
    );
    let config = orchestrator::Config {
        identity: std::sync::Arc::new(identity),
        subjects: Subjects::new(&args.prefix)?,
        name: args.name.clone(),
        replicas: args.replicas.max(1),
        max_in_flight: args.max_in_flight.max(1),
        metrics_addr: args.metrics_addr,
        metrics_interval: secs(args.metrics_interval, 0.05),
        failure_timeout: secs(args.failure_timeout, 0.2),
        lease_ttl: secs(args.lease_ttl, 0.3),
        repair_after: args.repair_after.max(1),
        snapshot_every: args.snapshot_every,
        checkpoints: orchestrator::checkpoint::Rule {
            every: args.checkpoint_every,
            idle: secs(args.checkpoint_idle, 0.05),
            idle_min: args.checkpoint_idle_min.max(1),
        },
        lifecycle: args.lifecycle_stream == OnOff::On,
    };
    let nats = args
        .auth
        .apply_as(
            keysync_telemetry::process::log_connection_events(async_nats::ConnectOptions::new()),
            "orchestrator",
        )
        .await?
        .name(format!("orchestrator {}", args.name))
        .retry_on_initial_connect()
        .connect(keysync_telemetry::process::servers(&args.nats).map_err(anyhow::Error::msg)?)
        .await
        .with_context(|| format!("connecting to NATS at {}", args.nats))?;

    keysync_telemetry::process::supervise("orchestrator", |shutdown| {
        orchestrator::run(config.clone(), nats.clone(), shutdown)
    })
    .await
}
