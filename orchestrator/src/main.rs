//! `orchestrator` binary: parses flags and runs [`orchestrator::run`].

use anyhow::Context as _;
use clap::Parser;
use keysync_schemas::Subjects;

/// Folds the keysync event log into cluster state and keeps every HSM in sync.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// NATS server URL.
    #[arg(long, env = "KEYSYNC_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Subject prefix of the cluster.
    #[arg(long, env = "KEYSYNC_PREFIX", default_value = "keysync")]
    prefix: String,
    /// Stream replicas when creating the streams (use 3 on a NATS cluster).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// This instance's name.
    #[arg(long, default_value = "orchestrator")]
    name: String,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long, env = "KEYSYNC_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Seconds between sync-metrics documents on `<prefix>.metrics.sync`.
    #[arg(long, default_value_t = 1.0)]
    metrics_interval: f64,
    /// Most publishes awaiting acknowledgement at once.
    #[arg(long, default_value_t = orchestrator::DEFAULT_MAX_IN_FLIGHT)]
    max_in_flight: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,async_nats=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = orchestrator::Config {
        subjects: Subjects::new(&args.prefix)?,
        name: args.name.clone(),
        replicas: args.replicas.max(1),
        max_in_flight: args.max_in_flight.max(1),
        metrics_addr: args.metrics_addr,
        metrics_interval: std::time::Duration::from_secs_f64(args.metrics_interval.max(0.05)),
    };
    let nats = async_nats::ConnectOptions::new()
        .name(format!("orchestrator {}", args.name))
        .retry_on_initial_connect()
        .connect(&args.nats)
        .await
        .with_context(|| format!("connecting to NATS at {}", args.nats))?;
    let shutdown = async {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutting down");
    };
    orchestrator::run(config, nats, shutdown).await
}
