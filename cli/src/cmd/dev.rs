//! `keysync dev`: a local stack until Ctrl-C.

use std::path::PathBuf;

use keysync_harness::{DevStack, StackOptions};

use super::Cli;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of HSM agents.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    hsms: u16,
    /// Directory for the NATS store, keystores, domain key and logs (kept).
    /// Without it, a temporary directory removed on exit.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// NATS port (default: a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Have the orchestrator serve Prometheus metrics here (e.g. 127.0.0.1:9464).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Print the stack (NATS URL, HSM ids, data directory) as one JSON
    /// document on stdout once it is up, instead of the bare URL.
    #[arg(long)]
    json: bool,
}

pub async fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let stack = DevStack::start(StackOptions {
        hsms: usize::from(args.hsms),
        data_dir: args.data_dir.clone(),
        subjects: cli.subjects()?,
        port: args.port,
        orchestrator_metrics_addr: args.metrics_addr,
        ..Default::default()
    })
    .await?;
    if args.json {
        super::print_json(&serde_json::json!({
            "nats_url": stack.url(),
            "hsm_ids": stack.hsm_ids().iter().map(|h| h.as_str()).collect::<Vec<_>>(),
            "data_dir": stack.dir().display().to_string(),
            "prefix": cli.prefix,
        }))?;
    } else {
        outln!("{}", stack.url());
    }
    eprintln!(
        "keysync dev stack up: {} HSMs ({}), data in {}\n  export KEYSYNC_NATS={}\n  keysync cluster status\nCtrl-C stops it.",
        args.hsms,
        stack
            .hsm_ids()
            .iter()
            .map(|h| h.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        stack.dir().display(),
        stack.url()
    );
    keysync_telemetry::process::shutdown_signal().await;
    eprintln!("stopping");
    stack.shutdown().await;
    Ok(())
}
