//! Memory rows of `keysync bench` (#17, decision 19): how much an agent's
//! resident memory grows per key it holds, beside its key index's own
//! bytes per key; and the orchestrator fold's own state bytes per tracked
//! key, beside the orchestrator's RSS growth.
//!
//! RSS is read from `/proc/<pid>/status` (`VmRSS`) of the processes this
//! bench's stack started; it includes the allocator's slack and whatever
//! else grows, so it is reported beside the structure's own count, never
//! instead of it.

use std::path::Path;

use keysync_harness::{DevStack, StackOptions};
use keysync_schemas::{HsmId, KeyType, Subjects};
use serde_json::json;

/// Resident memory of a process, in bytes (Linux), or `None` if it cannot
/// be read (not Linux, process gone).
pub(super) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    vm_rss(&status)
}

/// The `VmRSS:` line of a `/proc/<pid>/status` text, in bytes.
fn vm_rss(status: &str) -> Option<u64> {
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// CPU time a process has used so far, user plus system, over all its
/// threads, in seconds (Linux: `/proc/<pid>/stat`). Compared before and
/// after on a shared machine where wall time is not.
pub(super) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = stat_cpu_ticks(&stat)?;
    let per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()?;
    Some(ticks as f64 / per_s as f64)
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line; the
/// command name (field 2) may hold spaces, so fields are counted after
/// its closing parenthesis.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Growth from `before` to `after` in bytes per key (negative if memory
/// was given back meanwhile).
fn per_key(before: Option<u64>, after: Option<u64>, keys: usize) -> Option<f64> {
    let (b, a) = (before?, after?);
    Some((a as f64 - b as f64) / keys.max(1) as f64)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The agents' row: a stack of `hsms` embedded HSMs; `warm` keys first
/// (connections, pools, the allocator's arenas), then `keys` more created
/// `in_flight` at a time and replicated to every HSM; each agent's RSS
/// before and after, per key. Then, the stack stopped, one agent's store
/// is opened here and its index counts its own bytes per key.
pub(super) async fn agents(
    subjects: &Subjects,
    hsms: usize,
    keys: usize,
    in_flight: usize,
) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let mut stack = DevStack::start(StackOptions {
        hsms,
        subjects: subjects.clone(),
        data_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    })
    .await?;
    let client = stack.client().clone();
    let ids = stack.hsm_ids();
    let warm = (keys / 10).max(100);
    super::bench::throughput(&client, &ids, KeyType::Ed25519, warm, in_flight).await?;
    let rss = |stack: &mut DevStack| -> Vec<Option<u64>> {
        ids.iter()
            .map(|id| stack.agent(id).map(|p| p.pid()).and_then(rss_bytes))
            .collect()
    };
    let before = rss(&mut stack);
    super::bench::throughput(&client, &ids, KeyType::Ed25519, keys, in_flight).await?;
    let after = rss(&mut stack);
    stack.shutdown().await;
    let growth: Vec<Option<f64>> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| per_key(*b, *a, keys))
        .collect();
    let index = match ids.first() {
        Some(id) => index_bytes(dir.path(), id)?,
        None => None,
    };
    Ok(json!({
        "hsms": hsms,
        "keys": keys,
        "warm_up_keys": warm,
        "key_type": KeyType::Ed25519.as_str(),
        "agent_rss_bytes_per_key": growth.iter().map(|g| g.map(round1)).collect::<Vec<_>>(),
        "agent_rss_mb_after": after.iter().map(|a| a.map(|b| b / (1024 * 1024))).collect::<Vec<_>>(),
        "index_bytes_per_key": index.map(|(bytes, n)| round1(bytes as f64 / n.max(1) as f64)),
        "index_keys": index.map(|(_, n)| n),
    }))
}

/// The resident index of the store an agent left in `dir`: its heap bytes
/// and the token keys it holds, as a reopened store has them.
fn index_bytes(dir: &Path, id: &HsmId) -> anyhow::Result<Option<(usize, u64)>> {
    use hsm_agent::keystore::{embedded::EmbeddedKeystore, Keystore as _};
    let domain = keysync_security::domain_key::DomainKey::load(&dir.join("domain.key"))?;
    let store_dir = dir.join(id.as_str());
    if !store_dir.exists() {
        return Ok(None);
    }
    let store = EmbeddedKeystore::open(&store_dir, id.clone(), domain)?;
    Ok(Some((store.index_heap_bytes(), store.token_key_count())))
}

/// The orchestrator's `keysync_fold_state_bytes` gauge, scraped from its
/// metrics address (`GET /metrics`, the text format).
pub(super) async fn fold_state_bytes(port: u16) -> Option<u64> {
    let text = keysync_harness::scrape_metrics(port).await?;
    gauge(&text, "keysync_fold_state_bytes")
}

/// A gauge's value in Prometheus text: the line `name value`.
fn gauge(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse().ok())
}

/// The orchestrator's figures of the bootstrap row: the fold's own bytes
/// per tracked key and its RSS growth per key, side by side.
pub(super) fn orchestrator_row(
    keys: usize,
    fold_before: Option<u64>,
    fold_after: Option<u64>,
    rss_before: Option<u64>,
    rss_after: Option<u64>,
) -> serde_json::Value {
    json!({
        "fold_state_bytes_per_key": per_key(fold_before, fold_after, keys).map(round1),
        "rss_bytes_per_key": per_key(rss_before, rss_after, keys).map(round1),
    })
}

/// Prints the agents' row.
pub(super) fn print(row: &serde_json::Value) -> std::io::Result<()> {
    if row.is_null() {
        return Ok(());
    }
    outln!(
        "  agent memory: {} keys on {} HSMs: RSS grew {} bytes per key (each agent); its key index holds {} bytes per key",
        row["keys"],
        row["hsms"],
        row["agent_rss_bytes_per_key"],
        row["index_bytes_per_key"]
    );
    Ok(())
}

/// The rows `keysync bench --only` can run alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Row {
    /// Orchestrator restart: full replay, and from a snapshot.
    Recovery,
    /// A new HSM joining the cluster's keys; the fold's bytes per key.
    Bootstrap,
    /// Agent RSS and key-index bytes per key.
    Memory,
    /// The large cluster (`--cluster-keys`): its build, a new member,
    /// status, an anti-entropy round, snapshot and restart, memory.
    Cluster,
}

/// Sizes of the rows `--only` runs.
pub(super) struct OnlySizes {
    pub bootstrap_keys: usize,
    pub recovery_events: usize,
    pub hsms: usize,
    pub in_flight: usize,
    pub cluster_keys: usize,
}

/// `keysync bench --only ROWS`: those rows alone, each on its own stack,
/// in the document under the same names as in a whole run.
pub(super) async fn only(
    cli: &super::Cli,
    rows: &[Row],
    sizes: &OnlySizes,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut doc = serde_json::Map::new();
    doc.insert(
        "machine".into(),
        json!({ "cores": std::thread::available_parallelism().map(|c| c.get()).unwrap_or(0) }),
    );
    let say = |s: &str| {
        if !as_json {
            eprintln!("{s}");
        }
    };
    if rows.contains(&Row::Bootstrap) {
        say(&format!(
            "measuring bootstrap of a new HSM into {} keys",
            sizes.bootstrap_keys
        ));
        doc.insert(
            "bootstrap".into(),
            super::bench::bootstrap(cli, sizes.bootstrap_keys).await?,
        );
    }
    if rows.contains(&Row::Recovery) {
        say(&format!(
            "measuring orchestrator recovery over {} events",
            sizes.recovery_events
        ));
        doc.insert(
            "recovery".into(),
            super::bench::recovery(cli, sizes.recovery_events).await?,
        );
    }
    if rows.contains(&Row::Memory) {
        say("measuring agent memory per key");
        let keys = sizes.bootstrap_keys / 5;
        doc.insert(
            "memory".into(),
            agents(&cli.subjects()?, sizes.hsms, keys, sizes.in_flight).await?,
        );
    }
    if rows.contains(&Row::Cluster) {
        doc.insert(
            "cluster".into(),
            super::bench_cluster::rows(&cli.subjects()?, sizes.cluster_keys, &say).await?,
        );
    }
    let doc = serde_json::Value::Object(doc);
    if as_json {
        return super::print_json(&doc);
    }
    outln!("keysync bench --only: {} cores", doc["machine"]["cores"]);
    let b = &doc["bootstrap"];
    if !b.is_null() {
        outln!(
            "  bootstrap: a new HSM joining {} keys is in service after {} s ({} keys/s)",
            b["keys"],
            b["seconds_to_in_service"],
            b["keys_per_s"]
        );
        print_orchestrator(b)?;
    }
    print_recovery(&doc["recovery"])?;
    print(&doc["memory"])?;
    super::bench_cluster::print(&doc["cluster"])?;
    Ok(())
}

/// Prints the orchestrator's memory figures of a bootstrap row.
pub(super) fn print_orchestrator(bootstrap: &serde_json::Value) -> std::io::Result<()> {
    let o = &bootstrap["orchestrator"];
    if o.is_null() {
        return Ok(());
    }
    outln!(
        "  orchestrator memory per tracked key: fold state {} bytes, RSS growth {} bytes",
        o["fold_state_bytes_per_key"],
        o["rss_bytes_per_key"]
    );
    Ok(())
}

/// The recovery rows (full replay, from the snapshot, and the bare
/// consumer's floor), if measured.
pub(super) fn print_recovery(r: &serde_json::Value) -> anyhow::Result<()> {
    if r.is_null() {
        return Ok(());
    }
    outln!(
        "  recovery: {} events folded in {} s from the log alone ({} events/s, {} µs of orchestrator CPU an event, {} MB resident); {} s from its snapshot",
        r["events"],
        r["seconds_full_replay"],
        r["events_per_s"],
        r["orchestrator_cpu_us_per_event_full_replay"],
        r["orchestrator_rss_mb"],
        r["seconds_from_snapshot"]
    );
    outln!(
        "  recovery floor: the same stream read whole by a bare async-nats ordered consumer in {} s ({} µs of CPU an event)",
        r["seconds_bare_consumer"],
        r["bare_consumer_cpu_us_per_event"]
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tkeysync\nVmPeak:\t  9000 kB\nVmRSS:\t    5120 kB\nThreads:\t4\n";
        assert_eq!(vm_rss(status), Some(5120 * 1024));
        assert_eq!(vm_rss("Name:\tx\n"), None);
        assert_eq!(vm_rss("VmRSS:\tlots kB\n"), None);
        // Our own process has one.
        assert!(rss_bytes(std::process::id()).is_some_and(|b| b > 0));
    }

    #[test]
    fn cpu_ticks_are_user_plus_system() {
        let stat = "4242 (orch (x) y) S 1 2 3 4 5 6 7 8 9 10 250 31 0 0 20 0 9 0 100 0 0";
        assert_eq!(stat_cpu_ticks(stat), Some(281));
        assert_eq!(stat_cpu_ticks("garbage"), None);
        assert!(cpu_seconds(std::process::id()).is_some());
    }

    #[test]
    fn gauges_are_found_by_their_whole_name() {
        let text = "# HELP keysync_fold_state_bytes Bytes\n# TYPE keysync_fold_state_bytes gauge\nkeysync_fold_state_bytes_total 9\nkeysync_fold_state_bytes 123456\n";
        assert_eq!(gauge(text, "keysync_fold_state_bytes"), Some(123_456));
        assert_eq!(gauge(text, "keysync_keys"), None);
    }

    #[test]
    fn growth_is_per_key_and_may_be_negative() {
        assert_eq!(per_key(Some(1000), Some(3000), 10), Some(200.0));
        assert_eq!(per_key(Some(3000), Some(1000), 10), Some(-200.0));
        assert_eq!(per_key(None, Some(1000), 10), None);
    }
}
