//! One module per command group.

mod audit;
mod bench;
mod bench_lifecycle;
mod bench_module;
mod cluster;
mod demo;
mod dev;
mod dlq;
mod hsm;
mod key;
mod metrics;

use clap::{Parser, Subcommand};
use keysync::{Client, ClientOptions};
use keysync_schemas::Subjects;

/// keysync: keep the token keys of a cluster of HSMs in sync.
#[derive(Debug, Parser)]
#[command(name = "keysync", version, about, propagate_version = true)]
pub struct Cli {
    /// NATS server URL.
    #[arg(
        long,
        global = true,
        env = "KEYSYNC_NATS",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats: String,
    /// Subject prefix of the cluster.
    #[arg(long, global = true, env = "KEYSYNC_PREFIX", default_value = "keysync")]
    prefix: String,
    /// Seconds to wait for one reply.
    #[arg(long, global = true, default_value_t = 10.0)]
    timeout: f64,
    /// Do not retry: a key not yet on the HSM asked fails at once.
    #[arg(long, global = true)]
    no_retry: bool,
    /// Log lines on stderr: text (coloured on a terminal) or json (one
    /// object per line, with trace and span ids).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "KEYSYNC_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: keysync_telemetry::LogFormat,
    #[command(flatten)]
    auth: keysync_security::NatsAuth,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a local stack: nats-server, the orchestrator and N HSM agents.
    Dev(dev::Args),
    /// The newcomer's tour: a local stack, keys, sync latency, an HSM killed, nothing lost.
    Demo(demo::Args),
    /// Cluster set-up and status.
    #[command(subcommand)]
    Cluster(cluster::Command),
    /// Create and use keys.
    #[command(subcommand)]
    Key(key::Command),
    /// Sync-latency metrics.
    #[command(subcommand)]
    Metrics(metrics::Command),
    /// Measure keysync against the JetStream floor, in one run.
    Bench(bench::Args),
    /// The hash-chained audit log: verify, export, replay.
    #[command(subcommand)]
    Audit(audit::Command),
    /// Enroll, remove and issue join tokens for HSMs (signed with the
    /// cluster identity).
    #[command(subcommand)]
    Hsm(hsm::Command),
    /// Rejected messages, with their reasons.
    #[command(subcommand)]
    Dlq(dlq::Command),
}

impl Cli {
    fn subjects(&self) -> anyhow::Result<Subjects> {
        Ok(Subjects::new(&self.prefix)?)
    }

    /// A plain NATS connection (for commands that read streams or
    /// subjects directly); `--nats` may list several servers.
    async fn nats(&self, name: &str) -> anyhow::Result<async_nats::Client> {
        let servers =
            keysync_telemetry::process::servers(&self.nats).map_err(anyhow::Error::msg)?;
        self.auth
            .apply_as(async_nats::ConnectOptions::new(), "client")
            .await?
            .name(name)
            .connect(servers)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to NATS at {}: {e}", self.nats))
    }

    async fn client(&self) -> anyhow::Result<Client> {
        let options = ClientOptions {
            subjects: self.subjects()?,
            name: "keysync-cli".into(),
            request_timeout: std::time::Duration::from_secs_f64(self.timeout.max(0.01)),
            retry: if self.no_retry {
                keysync::RetryPolicy::none()
            } else {
                keysync::RetryPolicy::default()
            },
            auth: self.auth.clone(),
            ..Default::default()
        };
        Ok(Client::connect_with(&self.nats, options).await?)
    }
}

impl Cli {
    /// Refuses options that would be silently ignored: `dev`, `demo` and
    /// `bench` start their own nats-server, without authentication, so
    /// NATS credentials mean nothing to them. Exits with code 2, like any
    /// bad argument.
    pub fn check(&self) {
        let own_server = matches!(
            self.command,
            Command::Dev(_) | Command::Demo(_) | Command::Bench(_)
        );
        if own_server && self.auth.is_set() {
            use clap::CommandFactory as _;
            Cli::command()
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    "dev, demo and bench start their own nats-server without authentication: \
                     NATS credentials (--nats-user, --nats-password, --nats-creds, --nats-nkey \
                     or KEYSYNC_NATS_*) apply to commands that connect to a running cluster",
                )
                .exit();
        }
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Dev(args) => dev::run(&cli, args).await,
        Command::Demo(args) => demo::run(&cli, args).await,
        Command::Cluster(c) => cluster::run(&cli, c).await,
        Command::Key(c) => key::run(&cli, c).await,
        Command::Metrics(c) => metrics::run(&cli, c).await,
        Command::Bench(args) => bench::run(&cli, args).await,
        Command::Audit(c) => audit::run(&cli, c).await,
        Command::Hsm(c) => hsm::run(&cli, c).await,
        Command::Dlq(c) => dlq::run(&cli, c).await,
    }
}

/// Writes one line to `out` (stdout, for a line-at-a-time feed) and
/// flushes it. `Ok(false)` when the reader has gone (a closed pipe, as
/// `| head -1`): the caller stops quietly instead of panicking.
fn write_line(out: &mut impl std::io::Write, line: &str) -> anyhow::Result<bool> {
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow::anyhow!("writing to stdout: {e}")),
    }
}

/// Prints one JSON document on stdout.
fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
