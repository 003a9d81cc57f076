//! `keysync metrics watch`: the orchestrator's sync metrics, live.
//!
//! On a terminal the view refreshes in place; into a pipe or a file each
//! document is printed after the previous one, with no escape codes. The
//! view fits 80 columns. `--timeout` bounds the wait for each document, so
//! a cluster without a publishing orchestrator is reported, not waited on
//! forever.

use std::io::IsTerminal as _;

use clap::Subcommand;
use futures::StreamExt;
use keysync_schemas::{LatencySummary, SyncMetrics};

use super::Cli;

/// The view's width.
const WIDTH: usize = 80;

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

/// `p50/p90/p99/max` in ms with the count, or `-`.
fn lat(s: &LatencySummary) -> String {
    if s.count == 0 {
        return "-".into();
    }
    format!(
        "{:.2}/{:.2}/{:.2}/{:.2} ms (n={})",
        s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms, s.count
    )
}

/// `s` cut to `n` characters (an ellipsis marks the cut).
fn fit(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut cut: String = s.chars().take(n.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// Words joined into lines of at most [`WIDTH`] characters.
fn wrap(words: &[String], indent: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for w in words {
        let w = fit(w, WIDTH - indent.len());
        if !line.is_empty() && line.chars().count() + 1 + w.chars().count() > WIDTH {
            lines.push(std::mem::take(&mut line));
        }
        if line.is_empty() {
            line.push_str(if lines.is_empty() { "" } else { indent });
        } else {
            line.push(' ');
        }
        line.push_str(&w);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// The view of one document: plain text, every line at most 80 columns.
fn view(m: &SyncMetrics) -> String {
    let mut lines = vec![
        fit(
            &format!(
                "keysync sync metrics from {} (window {:.1} s)",
                m.orchestrator, m.window_secs
            ),
            WIDTH,
        ),
        String::new(),
    ];
    lines.extend(wrap(
        &[
            format!("members {}", m.members),
            format!("keys {}", m.keys),
            format!(
                "replicated {} (+{} in window)",
                m.replicated_total, m.replicated_window
            ),
            format!("pending clones {}", m.pending_clones),
            format!("below durability {}", m.below_durability),
            format!("clone failures {}", m.clone_failures),
        ],
        "",
    ));
    lines.push(String::new());
    lines.push("sync latency   p50/p90/p99/max".into());
    lines.push(fit(
        &format!("  window       {}", lat(&m.sync_latency_window)),
        WIDTH,
    ));
    lines.push(fit(
        &format!("  all          {}", lat(&m.sync_latency_total)),
        WIDTH,
    ));
    lines.push(String::new());
    lines.push(format!(
        "{:<16} {:<10} {:>7} {:>6}  clone latency, window",
        "HSM", "STATE", "KEYS", "LAG"
    ));
    for h in &m.hsms {
        lines.push(fit(
            &format!(
                "{:<16} {:<10} {:>7} {:>6}  {}",
                fit(&h.hsm_id, 16),
                fit(&h.state, 10),
                h.keys,
                h.lag,
                lat(&h.clone_latency_window)
            ),
            WIDTH,
        ));
    }
    if !m.rejected.is_empty() {
        lines.push(String::new());
        let mut words = vec!["rejected:".to_string()];
        words.extend(m.rejected.iter().map(|(r, n)| format!("{r}={n}")));
        lines.extend(wrap(&words, "  "));
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

pub async fn run(cli: &Cli, cmd: &Command) -> anyhow::Result<()> {
    let Command::Watch { json, count } = cmd;
    let subject = cli.subjects()?.metrics_sync();
    let nats = cli.nats("keysync metrics watch").await?;
    let mut sub = nats.subscribe(subject.clone()).await?;
    // Refresh in place only on a terminal: escape codes in a pipe or a
    // file are noise to whoever reads it.
    let refresh = !json && std::io::stdout().is_terminal();
    if !json {
        eprintln!("waiting for metrics on {subject} ...");
    }
    let wait = cli.wait();
    let mut seen = 0u64;
    loop {
        let msg = match tokio::time::timeout(wait, sub.next()).await {
            Ok(Some(msg)) => msg,
            Ok(None) => anyhow::bail!("the NATS connection closed"),
            Err(_) => anyhow::bail!(
                "no sync metrics on {subject} within {:.1} s (--timeout): is an orchestrator running for this cluster (--prefix {})?",
                wait.as_secs_f64(),
                cli.prefix
            ),
        };
        let m: SyncMetrics = match serde_json::from_slice(&msg.payload) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("warning: unreadable metrics document: {e}");
                continue;
            }
        };
        if *json {
            outln!("{}", serde_json::to_string(&m)?);
        } else if refresh {
            // Clear the screen and go home.
            out!("\x1b[2J\x1b[H{}", view(&m));
        } else {
            if seen > 0 {
                outln!();
            }
            out!("{}", view(&m));
        }
        seen += 1;
        if count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keysync_schemas::{HsmMetrics, RejectReason};

    fn busy(ms: f64, n: u64) -> LatencySummary {
        LatencySummary {
            count: n,
            p50_ms: ms,
            p90_ms: ms * 2.0,
            p99_ms: ms * 30.0,
            max_ms: ms * 400.0,
        }
    }

    #[test]
    fn the_view_fits_80_columns_even_with_big_numbers_and_long_names() {
        let m = SyncMetrics {
            orchestrator: "orchestrator-on-a-host-with-a-very-long-name.example.org".into(),
            window_secs: 1.0,
            members: 64,
            keys: 123_456_789,
            replicated_window: 98_765,
            replicated_total: 123_456_000,
            sync_latency_window: busy(12.345, 9_876_543),
            sync_latency_total: busy(123.456, 987_654_321),
            pending_clones: 1_234_567,
            below_durability: 7_654,
            clone_failures: 321,
            hsms: (0..3)
                .map(|i| HsmMetrics {
                    hsm_id: format!("hsm-in-rack-{i}-of-the-east-datacentre"),
                    state: "in-service".into(),
                    keys: 123_456_789,
                    lag: 1_234_567,
                    clone_latency_window: busy(99.99, 123_456),
                    ..Default::default()
                })
                .collect(),
            rejected: RejectReason::ALL.iter().map(|r| (*r, 12_345)).collect(),
            ..Default::default()
        };
        let v = view(&m);
        for line in v.lines() {
            assert!(
                line.chars().count() <= WIDTH,
                "{} columns: {line:?}",
                line.chars().count()
            );
        }
        assert!(!v.contains('\x1b'), "no escape codes in the view itself");
        assert!(v.contains("pending clones 1234567"), "{v}");
        assert!(v.contains("hsm-in-rack-0-o…"), "{v}");
        assert!(
            v.contains("12.35/24.69/370.35/4938.00 ms (n=9876543)"),
            "{v}"
        );
    }
}
