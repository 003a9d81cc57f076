//! One module per command group.

/// `println!` that returns a closed pipe as an error (`?`) instead of
/// panicking: `main` ends quietly on it (exit 0), as `keysync key list |
/// head -1` expects.
macro_rules! outln {
    () => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock())?;
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?;
    }};
}

/// `print!` (flushed, for a line finished later) that returns a closed
/// pipe as an error, like [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        write!(stdout, $($arg)*)?;
        stdout.flush()?;
    }};
}

mod audit;
mod bench;
mod bench_cluster;
mod bench_cpu;
mod bench_hops;
mod bench_lifecycle;
mod bench_memory;
mod bench_module;
mod bench_sync;
mod cluster;
mod completions;
mod demo;
mod dev;
mod dlq;
mod hsm;
mod key;
mod metrics;
mod nats;

use clap::{Parser, Subcommand};
use keysync::{Client, ClientOptions};
use keysync_schemas::Subjects;

/// keysync: keep the token keys of a cluster of HSMs in sync.
#[derive(Debug, Parser)]
#[command(
    name = "keysync",
    version,
    about,
    propagate_version = true,
    after_help = "New here? `keysync demo` runs a local cluster and shows keys syncing, an HSM \
                  killed and nothing lost; `keysync dev` keeps such a local stack up for you \
                  to try the other commands against (it prints the KEYSYNC_NATS to export)."
)]
pub struct Cli {
    /// NATS server URL (several: comma-separated).
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
    /// Seconds to wait for the connection to NATS, and then for each reply.
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
    /// The NATS trust chain of a deployment: operator, accounts, each
    /// role's credentials (docs/deploy.md).
    #[command(subcommand)]
    Nats(nats::Command),
    /// Print a shell completion script (bash, zsh, fish, ...).
    Completions(completions::Args),
    /// Print the man page (or write one page per command into a directory).
    Man(completions::ManArgs),
}

/// Global options that connect to a running cluster.
const CONNECTION: &[&str] = &[
    "nats",
    "prefix",
    "timeout",
    "no_retry",
    "nats_user",
    "nats_password",
    "nats_creds",
    "nats_nkey",
    "inbox_prefix",
    "nats_tls_ca",
    "nats_tls_cert",
    "nats_tls_key",
];

/// Which global options mean nothing to a (sub)command, so that its help
/// does not show them: a command path (names from the top) and the
/// options' ids. Commands not listed use them all.
const UNUSED_GLOBALS: &[(&[&str], &[&str])] = &[
    // Start their own nats-server; only the subject prefix applies.
    (&["dev"], &CONNECTION_BUT_PREFIX),
    (&["demo"], &CONNECTION_BUT_PREFIX),
    (&["bench"], &CONNECTION_BUT_PREFIX),
    // Offline: files and tokens only.
    (&["cluster", "init"], CONNECTION),
    (&["hsm", "cluster-key"], CONNECTION),
    (&["hsm", "provision-domain-key"], CONNECTION),
    (&["completions"], CONNECTION),
    (&["man"], CONNECTION),
    (&["nats", "init"], CONNECTION),
    (&["nats", "role-creds"], CONNECTION),
    // No key operations: nothing to retry.
    (&["cluster", "status"], &["no_retry"]),
    (&["metrics"], &["no_retry"]),
    (&["audit"], &["no_retry"]),
    (&["dlq"], &["no_retry"]),
    (&["hsm", "enroll"], &["no_retry"]),
    (&["hsm", "token"], &["no_retry"]),
    (&["hsm", "remove"], &["no_retry"]),
];

const CONNECTION_BUT_PREFIX: [&str; 11] = [
    "nats",
    "timeout",
    "no_retry",
    "nats_user",
    "nats_password",
    "nats_creds",
    "nats_nkey",
    "inbox_prefix",
    "nats_tls_ca",
    "nats_tls_cert",
    "nats_tls_key",
];

/// The command line as clap sees it, with the global options a command
/// does not use hidden from its help (they are still accepted there, so
/// `KEYSYNC_*` in the environment never breaks a command).
pub fn command() -> clap::Command {
    use clap::CommandFactory as _;
    let mut cmd = Cli::command();
    cmd.build();
    for (path, ids) in UNUSED_GLOBALS {
        hide_in(&mut cmd, path, ids);
    }
    cmd
}

/// Hides `ids` in the command at `path` and every command below it.
fn hide_in(cmd: &mut clap::Command, path: &[&str], ids: &[&str]) {
    match path.split_first() {
        Some((first, rest)) => {
            if let Some(sub) = cmd.find_subcommand_mut(first) {
                hide_in(sub, rest, ids);
            }
        }
        None => hide_all(cmd, ids),
    }
}

fn hide_all(cmd: &mut clap::Command, ids: &[&str]) {
    // In place (`mut_arg` would move the argument and stale the built
    // command's index of option names).
    let mut owned = std::mem::take(cmd).mut_args(|a| {
        if ids.contains(&a.get_id().as_str()) {
            a.hide(true)
        } else {
            a
        }
    });
    for sub in owned.get_subcommands_mut() {
        hide_all(sub, ids);
    }
    *cmd = owned;
}

/// Parses the process's arguments (exit 2 with a message on a bad one).
pub fn parse() -> Cli {
    use clap::FromArgMatches as _;
    let matches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

impl Cli {
    fn subjects(&self) -> anyhow::Result<Subjects> {
        Ok(Subjects::new(&self.prefix)?)
    }

    /// `--timeout`, as a duration.
    fn wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.timeout.clamp(0.01, 86_400.0))
    }

    /// A plain NATS connection (for commands that read streams or
    /// subjects directly); `--nats` may list several servers. `--timeout`
    /// bounds the whole connect: an address that does not answer fails in
    /// that time, not the NATS client's own 5 s.
    async fn nats(&self, name: &str) -> anyhow::Result<async_nats::Client> {
        let servers =
            keysync_telemetry::process::servers(&self.nats).map_err(anyhow::Error::msg)?;
        let wait = self.wait();
        let connect = async {
            self.auth
                .apply_as(async_nats::ConnectOptions::new(), "client")
                .await?
                .name(name)
                .connection_timeout(wait)
                .connect(servers)
                .await
                .map_err(|e| anyhow::anyhow!("cannot connect to NATS at {}: {e}", self.nats))
        };
        tokio::time::timeout(wait, connect).await.unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "cannot connect to NATS at {}: no answer within {:.1} s (--timeout); is the address right, and nats-server up?",
                self.nats,
                wait.as_secs_f64()
            ))
        })
    }

    async fn client(&self) -> anyhow::Result<Client> {
        let options = ClientOptions {
            subjects: self.subjects()?,
            name: "keysync-cli".into(),
            request_timeout: self.wait(),
            retry: if self.no_retry {
                keysync::RetryPolicy::none()
            } else {
                keysync::RetryPolicy::default()
            },
            auth: self.auth.clone(),
            ..Default::default()
        };
        let nats = self.nats("keysync-cli").await?;
        Ok(Client::from_nats(nats, options).await)
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
        Command::Nats(c) => nats::run(&cli, c).await,
        Command::Completions(args) => completions::run(args),
        Command::Man(args) => completions::man(args),
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
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Whether `e` is stdout closed under us (the reader of a pipe went away):
/// a normal end for a command whose output was cut short, not an error.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
