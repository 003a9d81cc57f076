//! `keysync metrics watch`: the orchestrator's sync metrics, live.

use clap::Subcommand;
use futures::StreamExt;
use keysync_schemas::{LatencySummary, SyncMetrics};

use super::Cli;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show sync metrics as they are published (every second).
    Watch {
        /// Print each document as one line of JSON instead of a refreshing view.
        #[arg(long)]
        json: bool,
        /// Stop after this many documents.
        #[arg(long)]
        count: Option<u64>,
    },
}

fn lat(s: &LatencySummary) -> String {
    if s.count == 0 {
        return "-".into();
    }
    format!(
        "p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2} ms  (n={})",
        s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms, s.count
    )
}

fn view(m: &SyncMetrics) -> String {
    let mut out = String::new();
    // Clear the screen and go home: a refreshing view.
    out.push_str("\x1b[2J\x1b[H");
    out.push_str(&format!(
        "keysync sync metrics from {} (window {:.1} s)\n\n",
        m.orchestrator, m.window_secs
    ));
    out.push_str(&format!(
        "members {}   keys {}   replicated {} (+{} in window)   pending clones {}   below durability {}   clone failures {}\n\n",
        m.members, m.keys, m.replicated_total, m.replicated_window, m.pending_clones, m.below_durability, m.clone_failures
    ));
    out.push_str(&format!(
        "sync latency, window: {}\n",
        lat(&m.sync_latency_window)
    ));
    out.push_str(&format!(
        "sync latency, all:    {}\n\n",
        lat(&m.sync_latency_total)
    ));
    out.push_str(&format!(
        "{:<16} {:<11} {:>8} {:>6}  clone latency (window)\n",
        "HSM", "STATE", "KEYS", "LAG"
    ));
    for h in &m.hsms {
        out.push_str(&format!(
            "{:<16} {:<11} {:>8} {:>6}  {}\n",
            h.hsm_id,
            h.state,
            h.keys,
            h.lag,
            lat(&h.clone_latency_window)
        ));
    }
    if !m.rejected.is_empty() {
        out.push_str("\nrejected:");
        for (r, n) in &m.rejected {
            out.push_str(&format!(" {r}={n}"));
        }
        out.push('\n');
    }
    out
}

pub async fn run(cli: &Cli, cmd: &Command) -> anyhow::Result<()> {
    let Command::Watch { json, count } = cmd;
    let nats = cli.nats("keysync metrics watch").await?;
    let mut sub = nats.subscribe(cli.subjects()?.metrics_sync()).await?;
    if !json {
        eprintln!(
            "waiting for metrics on {} ...",
            cli.subjects()?.metrics_sync()
        );
    }
    let mut seen = 0u64;
    while let Some(msg) = sub.next().await {
        let m: SyncMetrics = match serde_json::from_slice(&msg.payload) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("warning: unreadable metrics document: {e}");
                continue;
            }
        };
        if *json {
            if !super::write_line(&mut std::io::stdout().lock(), &serde_json::to_string(&m)?)? {
                return Ok(());
            }
        } else {
            print!("{}", view(&m));
        }
        seen += 1;
        if count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    Ok(())
}
