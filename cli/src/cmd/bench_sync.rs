//! The durable bus setting: the floor and keysync measured on a server
//! that syncs JetStream's files before every acknowledgement
//! (`jetstream { sync_interval: always }`) and on one with the default
//! (acknowledged from the page cache, files synced every 2 minutes).
//!
//! JetStream acknowledges a publish before its data reaches the disk by
//! default; an acknowledged write can then be lost on power failure
//! (Jepsen's NATS 2.12.1 analysis, Dec 2025). The deploy configs for
//! production (`deploy/nats/cluster-tls.conf`, `single-node-jwt.conf`)
//! set `always`; these rows say what it costs. Each setting gets its own
//! stack (nats-server started from a config file that differs only in
//! that line), and the floor and keysync are measured on it, so each
//! ratio compares like with like.

use keysync_harness::{DevStack, StackOptions};
use keysync_schemas::{KeyType, Subjects};
use serde_json::json;

use super::bench::{floor, pct, ratio, sync_one_at_a_time};

/// `--sync-interval`: which server settings the durable-bus rows run under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncInterval {
    /// No durable-bus rows.
    None,
    /// JetStream's default (synced every 2 minutes).
    Default,
    /// `sync_interval: always` (synced before each acknowledgement).
    Always,
    /// Both, one after the other.
    Both,
}

impl SyncInterval {
    fn settings(self) -> &'static [&'static str] {
        match self {
            SyncInterval::None => &[],
            SyncInterval::Default => &["default"],
            SyncInterval::Always => &["always"],
            SyncInterval::Both => &["default", "always"],
        }
    }
}

/// Sample sizes of the rows.
pub(super) struct Sizes {
    pub latency: usize,
    pub throughput: usize,
    pub in_flight: usize,
}

/// A nats-server config for one setting: the same as the harness's
/// flags give (store dir from `$KEYSYNC_NATS_STORE_DIR`), plus the line.
fn config(setting: &str) -> String {
    let sync = if setting == "always" {
        "  sync_interval: always\n"
    } else {
        ""
    };
    format!("jetstream {{\n  store_dir: $KEYSYNC_NATS_STORE_DIR\n{sync}}}\n")
}

/// The rows for each setting `which` names (null for none).
pub(super) async fn rows(
    subjects: &Subjects,
    hsms: usize,
    key_type: KeyType,
    which: SyncInterval,
    sizes: &Sizes,
    say: &dyn Fn(&str),
) -> anyhow::Result<serde_json::Value> {
    if which == SyncInterval::None {
        return Ok(serde_json::Value::Null);
    }
    let dir = tempfile::tempdir()?;
    let mut out = serde_json::Map::new();
    for setting in which.settings() {
        say(&format!(
            "measuring floor, sync latency and throughput with JetStream sync_interval {setting}"
        ));
        let conf = dir.path().join(format!("sync-{setting}.conf"));
        std::fs::write(&conf, config(setting))?;
        let stack = DevStack::start(StackOptions {
            hsms,
            subjects: subjects.clone(),
            nats_config: Some(conf),
            ..Default::default()
        })
        .await?;
        let client = stack.client().clone();
        let ids = stack.hsm_ids();
        let floor_h = pct(&floor(client.nats(), hsms - 1, sizes.latency).await?);
        let sync_h = pct(&sync_one_at_a_time(&client, &ids, key_type, sizes.latency).await?);
        let (created, replicated, cpu) =
            super::bench_cpu::metered_throughput(&stack, sizes.throughput, sizes.in_flight).await?;
        stack.shutdown().await;
        out.insert(
            (*setting).to_string(),
            json!({
                "floor": floor_h,
                "sync_latency": sync_h,
                "ratio_to_floor": {
                    "p50": ratio(&sync_h, &floor_h, "p50_ms"),
                    "p99": ratio(&sync_h, &floor_h, "p99_ms"),
                },
                "throughput_keys": sizes.throughput,
                "in_flight": sizes.in_flight,
                "created_per_s": created.round() as u64,
                "replicated_per_s": replicated.round() as u64,
                "cpu_us_per_key": cpu["total_us_per_key"],
                "nats_server_cpu_us_per_key": cpu["processes"][0]["us_per_key"],
            }),
        );
    }
    Ok(serde_json::Value::Object(out))
}

/// The table of [`rows`] (nothing if null).
pub(super) fn print(v: &serde_json::Value) -> std::io::Result<()> {
    let Some(rows) = v.as_object() else {
        return Ok(());
    };
    let f = |x: &serde_json::Value| format!("{:.2}", x.as_f64().unwrap_or(0.0));
    outln!(
        "\n  JetStream sync_interval (own stack each)   floor p50/p99   sync p50/p99   floor x p50/p99   replicated/s   CPU µs/key (nats-server)"
    );
    for (setting, r) in rows {
        outln!(
            "  {:<40} {:>6} {:>6}   {:>6} {:>6}   {:>6}x {:>6}x   {:>12}   {:>8} ({})",
            setting,
            f(&r["floor"]["p50_ms"]),
            f(&r["floor"]["p99_ms"]),
            f(&r["sync_latency"]["p50_ms"]),
            f(&r["sync_latency"]["p99_ms"]),
            f(&r["ratio_to_floor"]["p50"]),
            f(&r["ratio_to_floor"]["p99"]),
            r["replicated_per_s"].to_string(),
            r["cpu_us_per_key"].to_string(),
            r["nats_server_cpu_us_per_key"].to_string()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_configs_differ_only_in_the_sync_line() {
        let d = config("default");
        let a = config("always");
        assert!(!d.contains("sync_interval"));
        assert_eq!(a.replace("  sync_interval: always\n", ""), d);
    }
}
