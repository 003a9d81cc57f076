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
    let config = hsm_agent::Config {
        hsm: args.id.clone(),
        data_dir: args.data_dir,
        domain_key: args.domain_key,
        subjects,
        publish_timeout: Duration::from_secs_f64(args.publish_timeout.max(0.1)),
        max_concurrent_ops: args.max_concurrent_ops,
        heartbeat_interval: Duration::from_secs_f64(args.heartbeat_interval.max(0.05)),
    };
    let nats = async_nats::ConnectOptions::new()
        .name(format!("hsm-agent {}", args.id))
        .retry_on_initial_connect()
        .connect(servers(&args.nats)?)
        .await
        .with_context(|| format!("connecting to NATS at {}", args.nats))?;
    let store = hsm_agent::open_store(&config)?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    // Crash-only: a failed run (say, JetStream went away) starts again; the
    // keystore, its outbox and the durable command queue carry the state.
    loop {
        let mut stop_rx = stop.clone();
        let shutdown = async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        };
        match hsm_agent::run(config.clone(), store.clone(), nats.clone(), shutdown).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                if *stop.borrow() {
                    return Err(e);
                }
                tracing::error!(error = %format!("{e:#}"), "agent stopped; starting again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}

/// The servers of `--nats`: one URL, or several separated by commas.
fn servers(urls: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    urls.split(',')
        .map(|u| {
            u.trim()
                .parse()
                .with_context(|| format!("invalid NATS URL {u:?}"))
        })
        .collect()
}
