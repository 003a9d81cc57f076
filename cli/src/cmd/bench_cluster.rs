//! The large-cluster rows of `keysync bench` (#17, decision 23): a stack of
//! three embedded HSMs holding N keys (1,000,000 in a full run), and what
//! an operator does to it at that size:
//!
//! - **seed**: N signed `KeyCreated` events with real wrapped Ed25519
//!   material published at bus speed by a seed member that never runs
//!   ([`keysync_harness::seed::seed_keys`]); the orchestrator folds them.
//! - **build**: three HSMs join that log together and each is sent every
//!   key (the cluster's own bootstrap path, three at once): seconds until
//!   all three are in service, and the CPU per key copy.
//! - **join**: a fourth HSM joins the N-key cluster: seconds until it is
//!   in service, keys/s, and the CPU per key of every process.
//! - **status**: `keysync cluster status --json` (this very binary, as an
//!   operator runs it) and the SDK call it makes, p50, and the reply's size.
//! - **anti-entropy**: one member loses keys behind its agent's back (its
//!   store edited while it is down, as a disk would); from its restart to
//!   it holding N keys again: the round itself (its whole inventory read,
//!   compared with the log, repairs sent) as the orchestrator times it in
//!   `keysync_anti_entropy_round_seconds`, and the wall time around it.
//! - **snapshot**: the size of the orchestrator's snapshot object, and a
//!   restart of the orchestrator from it until it has folded the log.
//! - **memory**: RSS of every process, and the bytes on disk, at N keys.
//!
//! The machine is shared: every phase that does work reports CPU time
//! (user + system from `/proc/<pid>/stat`, per process, a process started
//! during the phase counted from its start) beside its wall time, counted
//! until the stack is quiet again (the audit chain and the lifecycle
//! mirror trail the bootstrap).

use std::time::{Duration, Instant};

use redb::ReadableTable as _;

use async_nats::jetstream;
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use keysync::Client;
use keysync_harness::{DevStack, StackOptions};
use keysync_schemas::{decode, encode, Envelope, Heartbeat, HsmId, StatusRequest, Subjects};
use serde_json::json;

/// Members the cluster is built with; the joining one comes on top.
const MEMBERS: usize = 3;

/// `keysync cluster status` calls timed through the binary, and SDK calls.
const CLI_CALLS: usize = 5;
const SDK_CALLS: usize = 20;

/// Longest any phase may take before the bench gives up (a million keys
/// on a busy 2-core machine takes minutes per phase, not hours).
const PHASE_TIMEOUT: Duration = Duration::from_secs(3600);

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn mb(bytes: Option<u64>) -> Option<f64> {
    bytes.map(|b| round2(b as f64 / (1024.0 * 1024.0)))
}

/// A sample's value in Prometheus text: the line `name value` (no labels).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse().ok())
}

/// Completed anti-entropy rounds and their total seconds, from the
/// orchestrator's `keysync_anti_entropy_round_seconds` histogram.
async fn rounds(port: u16) -> Option<(f64, f64)> {
    let text = keysync_harness::scrape_metrics(port).await?;
    Some((
        sample(&text, "keysync_anti_entropy_round_seconds_count")?,
        sample(&text, "keysync_anti_entropy_round_seconds_sum")?,
    ))
}

/// CPU seconds so far of every process of the stack and of this one.
fn cpu_now(stack: &DevStack) -> Vec<(String, f64)> {
    stack
        .processes()
        .into_iter()
        .chain(std::iter::once((
            "bench client (keysync)".to_string(),
            std::process::id(),
        )))
        .filter_map(|(name, pid)| Some((name, super::bench_memory::cpu_seconds(pid)?)))
        .collect()
}

/// After the phase that began at `before`: waits until the stack spends
/// under a tenth of a core over a second (at most two minutes), then
/// gives each process's CPU seconds over the phase (a process absent from
/// `before` counted from its start) and the microseconds per `units`.
async fn cpu_since(stack: &DevStack, before: &[(String, f64)], units: usize) -> serde_json::Value {
    let total = |v: &[(String, f64)]| v.iter().map(|(_, c)| c).sum::<f64>();
    let settle = Instant::now();
    let mut last = cpu_now(stack);
    while settle.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cpu_now(stack);
        let spent = total(&now) - total(&last);
        last = now;
        if spent < 0.1 {
            break;
        }
    }
    let mut by_process = serde_json::Map::new();
    let mut sum = 0.0;
    for (name, after) in &last {
        let start = before
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0.0, |(_, c)| *c);
        let spent = (after - start).max(0.0);
        sum += spent;
        by_process.insert(name.clone(), json!(round2(spent)));
    }
    json!({
        "seconds_by_process": by_process,
        "seconds": round2(sum),
        "us_per_unit": round2(sum * 1e6 / units.max(1) as f64),
        "settled_after_s": round2(settle.elapsed().as_secs_f64()),
    })
}

/// Polls the cluster status until `done` holds for it.
async fn wait_status(
    client: &Client,
    what: &str,
    done: impl Fn(&keysync_schemas::ClusterStatus) -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PHASE_TIMEOUT;
    loop {
        if client.cluster_status().await.is_ok_and(|s| done(&s)) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("{what} did not happen within {PHASE_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether every one of `ids` holds at least `n` keys, as the log says.
fn all_hold(s: &keysync_schemas::ClusterStatus, ids: &[HsmId], n: u64) -> bool {
    ids.iter()
        .all(|id| s.members.iter().any(|m| &m.hsm_id == id && m.keys >= n))
}

/// The last sequence of the events stream.
async fn stream_last_seq(client: &Client) -> anyhow::Result<u64> {
    let js = jetstream::new(client.nats().clone());
    let mut s = js.get_stream(client.subjects().events_stream()).await?;
    Ok(s.info().await?.state.last_sequence)
}

/// `HsmFailed` events in the log, per member, the seed member aside (it
/// never runs, so it is rightly declared failed): a member declared failed
/// while it was only busy would be a fault of the run, not a measurement.
async fn failures_declared(
    client: &Client,
    subjects: &Subjects,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let js = jetstream::new(client.nats().clone());
    let stream = js.get_stream(subjects.events_stream()).await?;
    let mut counts = stream
        .info_with_subjects(format!("{}.evt.hsm.*.failed", subjects.prefix()))
        .await?;
    let mut out = serde_json::Map::new();
    let seed = format!(".{}.", keysync_harness::seed::SEED_HSM);
    while let Some(c) = counts.next().await {
        let (subject, n) = c?;
        if !subject.contains(&seed) {
            out.insert(subject, json!(n));
        }
    }
    Ok(out)
}

/// Removes `n` token keys from a stopped agent's store, behind its back
/// (as a disk losing records would): returns how many it removed.
fn drop_keys(store: &std::path::Path, n: usize) -> anyhow::Result<usize> {
    let db = redb::Database::open(store)?;
    let txn = db.begin_write()?;
    let mut removed = 0;
    {
        let table: redb::TableDefinition<u128, &[u8]> = redb::TableDefinition::new("keys");
        let mut keys = txn.open_table(table)?;
        let ids: Vec<u128> = keys
            .iter()?
            .take(n)
            .map(|e| e.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        for id in ids {
            if keys.remove(id)?.is_some() {
                removed += 1;
            }
        }
    }
    txn.commit()?;
    Ok(removed)
}

/// p50 in milliseconds of a histogram of microseconds.
fn p50_ms(h: &Histogram<u64>) -> f64 {
    round2(h.value_at_quantile(0.5) as f64 / 1000.0)
}

/// `keysync cluster status --json` through this binary, `CLI_CALLS`
/// times; the SDK call `SDK_CALLS` times; and the reply's size on the bus.
async fn status_row(
    client: &Client,
    url: &str,
    subjects: &Subjects,
) -> anyhow::Result<serde_json::Value> {
    let exe = std::env::current_exe()?;
    let mut cli_h = super::bench::histogram()?;
    for _ in 0..CLI_CALLS {
        let (exe, url, prefix) = (exe.clone(), url.to_string(), subjects.prefix().to_string());
        let t = Instant::now();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(exe)
                .args([
                    "--nats", &url, "--prefix", &prefix, "cluster", "status", "--json",
                ])
                .output()
        })
        .await??;
        cli_h.record((t.elapsed().as_micros() as u64).max(1))?;
        anyhow::ensure!(
            out.status.success(),
            "keysync cluster status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout)?;
    }
    let mut sdk_h = super::bench::histogram()?;
    for _ in 0..SDK_CALLS {
        let t = Instant::now();
        client.cluster_status().await?;
        sdk_h.record((t.elapsed().as_micros() as u64).max(1))?;
    }
    // The same request the SDK sends, to see the reply's bytes.
    let req = encode(&Envelope::new(
        keysync_schemas::Source::Client("bench".into()),
        StatusRequest::Cluster,
    ))?;
    let reply = client
        .nats()
        .request(subjects.orchestrator_status(), req.into())
        .await?;
    Ok(json!({
        "cli_calls": CLI_CALLS,
        "cli_p50_ms": p50_ms(&cli_h),
        "sdk_calls": SDK_CALLS,
        "sdk_p50_ms": p50_ms(&sdk_h),
        "reply_bytes": reply.payload.len(),
    }))
}

/// The cluster rows at `keys` keys (module doc).
pub(super) async fn rows(
    subjects: &Subjects,
    keys: usize,
    say: &dyn Fn(&str),
) -> anyhow::Result<serde_json::Value> {
    let n = keys as u64;
    let metrics_port = keysync_harness::free_port()?;
    let mut stack = DevStack::start(StackOptions {
        hsms: 0,
        subjects: subjects.clone(),
        orchestrator_metrics_addr: Some(([127, 0, 0, 1], metrics_port).into()),
        ..Default::default()
    })
    .await?;
    let client = stack.client().clone();

    say(&format!(
        "cluster: seeding {keys} keys (signed KeyCreated, real wrapped Ed25519)"
    ));
    let t = Instant::now();
    let last = keysync_harness::seed::seed_keys(&stack, keys, true).await?;
    let published = t.elapsed().as_secs_f64();
    super::bench::wait_folded(&client, last, PHASE_TIMEOUT).await?;
    let folded = t.elapsed().as_secs_f64();
    let seed = json!({
        "seconds_published": round2(published),
        "events_per_s": (n as f64 / published).round() as u64,
        "seconds_folded": round2(folded),
    });
    say(&format!("cluster: seeded: {seed}"));

    say(&format!(
        "cluster: {MEMBERS} HSMs join and are each sent the {keys} keys"
    ));
    let members: Vec<HsmId> = (1..=MEMBERS)
        .map(|i| HsmId::new(format!("hsm-{i}")))
        .collect::<Result<_, _>>()?;
    let before = cpu_now(&stack);
    let t = Instant::now();
    stack.start_agents(&members).await?;
    wait_status(&client, "the first members' bootstrap", |s| {
        all_hold(s, &members, n)
    })
    .await?;
    let secs = t.elapsed().as_secs_f64();
    let copies = keys * MEMBERS;
    let cpu = cpu_since(&stack, &before, copies).await;
    let build = json!({
        "hsms": MEMBERS,
        "seconds_to_in_service": round2(secs),
        "key_copies_per_s": (copies as f64 / secs).round() as u64,
        "cpu_us_per_key_copy": cpu["us_per_unit"],
        "cpu": cpu,
    });
    say(&format!("cluster: built: {build}"));

    say(&format!("cluster: a new HSM joins the {keys}-key cluster"));
    let joiner = HsmId::new(format!("hsm-{}", MEMBERS + 1))?;
    let before = cpu_now(&stack);
    let t = Instant::now();
    stack.start_agents(std::slice::from_ref(&joiner)).await?;
    wait_status(&client, "the new member's bootstrap", |s| {
        all_hold(s, std::slice::from_ref(&joiner), n)
    })
    .await?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_since(&stack, &before, keys).await;
    let join = json!({
        "seconds_to_in_service": round2(secs),
        "keys_per_s": (n as f64 / secs).round() as u64,
        "cpu_us_per_key": cpu["us_per_unit"],
        "cpu": cpu,
    });
    say(&format!("cluster: joined: {join}"));

    say("cluster: keysync cluster status");
    let status = status_row(&client, &stack.url(), subjects).await?;
    // Before the anti-entropy row stops a member on purpose.
    let failures = failures_declared(&client, subjects).await?;

    // Memory and disk at N keys on every member, before anything restarts.
    let rss: serde_json::Map<String, serde_json::Value> = stack
        .processes()
        .into_iter()
        .map(|(name, pid)| (name, json!(mb(super::bench_memory::rss_bytes(pid)))))
        .collect();
    let js = jetstream::new(client.nats().clone());
    let events_bytes = js
        .get_stream(subjects.events_stream())
        .await?
        .info()
        .await?
        .state
        .bytes;
    let store_bytes: serde_json::Map<String, serde_json::Value> = members
        .iter()
        .chain(std::iter::once(&joiner))
        .map(|id| {
            let len = std::fs::metadata(stack.dir().join(id.as_str()).join("keystore.redb"))
                .map(|m| m.len())
                .ok();
            (id.to_string(), json!(mb(len)))
        })
        .collect();

    say(&format!(
        "cluster: status: {status}; RSS (MB): {}; declared failed: {}",
        serde_json::Value::Object(rss.clone()),
        serde_json::Value::Object(failures.clone())
    ));

    let victim = members[1].clone();
    let drift = (keys / 100).clamp(1, 10_000);
    say(&format!(
        "cluster: anti-entropy: {victim} loses {drift} keys while down, then restarts"
    ));
    stack.kill_agent(&victim);
    let removed = drop_keys(
        &stack.dir().join(victim.as_str()).join("keystore.redb"),
        drift,
    )?;
    let (count_before, sum_before) = rounds(metrics_port).await.unwrap_or((0.0, 0.0));
    let mut beats = client.nats().subscribe(subjects.heartbeat(&victim)).await?;
    client.nats().flush().await?;
    let t = Instant::now();
    stack.start_agents(std::slice::from_ref(&victim)).await?;
    let restart = t.elapsed().as_secs_f64();
    let deadline = tokio::time::Instant::now() + PHASE_TIMEOUT;
    let (mut round_done, mut held) = (None, 0u64);
    while round_done.is_none() || held < n {
        let beat = tokio::time::timeout_at(deadline, beats.next())
            .await
            .map_err(|_| anyhow::anyhow!("{victim} was not repaired within {PHASE_TIMEOUT:?}"))?
            .ok_or_else(|| anyhow::anyhow!("the heartbeat subscription ended"))?;
        if let Ok(hb) = decode::<Heartbeat>(&beat.payload) {
            held = hb.body.token_keys;
        }
        if round_done.is_none() {
            round_done = rounds(metrics_port)
                .await
                .filter(|(c, _)| *c > count_before)
                .map(|r| (r, t.elapsed().as_secs_f64()));
        }
    }
    let repaired = t.elapsed().as_secs_f64();
    let ((count_after, sum_after), round_wall) = round_done.unwrap_or(((0.0, 0.0), 0.0));
    let anti_entropy = json!({
        "member": victim.as_str(),
        "keys_lost": removed,
        "agent_restart_seconds": round2(restart),
        "rounds": count_after - count_before,
        "round_seconds": round2((sum_after - sum_before) / (count_after - count_before).max(1.0)),
        "seconds_restart_to_round_done": round2(round_wall),
        "seconds_restart_to_repaired": round2(repaired),
    });
    say(&format!("cluster: anti-entropy: {anti_entropy}"));

    say("cluster: the snapshot, and an orchestrator restart from it");
    let store = js.get_object_store(subjects.snapshot_bucket()).await?;
    let last = stream_last_seq(&client).await?;
    if store.info("cluster-state").await.is_err() {
        // Fewer events than `--snapshot-every` (a small --quick run with
        // batched clone results): restart it once snapshotting at every
        // tick, so that the timed restart below has a snapshot to start from.
        stack.set_orchestrator_args(vec!["--snapshot-every".into(), "1".into()]);
        stack.kill_orchestrator();
        stack.start_orchestrator().await?;
        super::bench::wait_folded(&client, last, PHASE_TIMEOUT).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while store.info("cluster-state").await.is_err() {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "no snapshot was written"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let snapshot_bytes = store
        .info("cluster-state")
        .await
        .map(|i| i.size as u64)
        .ok();
    stack.kill_orchestrator();
    let t = Instant::now();
    stack.start_orchestrator().await?;
    super::bench::wait_folded(&client, last, PHASE_TIMEOUT).await?;
    let restart_secs = t.elapsed().as_secs_f64();
    let orch_cpu = stack
        .orchestrator(keysync_harness::PRIMARY)
        .map(|p| p.pid())
        .and_then(super::bench_memory::cpu_seconds);
    stack.shutdown().await;
    Ok(json!({
        "keys": keys,
        "hsms": MEMBERS,
        "seed": seed,
        "build": build,
        "join": join,
        "status": status,
        "anti_entropy": anti_entropy,
        "snapshot": {
            "bytes": snapshot_bytes,
            "bytes_per_key": snapshot_bytes.map(|b| round2(b as f64 / n.max(1) as f64)),
            "events": last,
            "restart_seconds": round2(restart_secs),
            "restart_cpu_seconds": orch_cpu.map(round2),
        },
        "rss_mb": rss,
        "members_declared_failed": failures,
        "disk_mb": {
            "events_stream": mb(Some(events_bytes)),
            "agent_stores": store_bytes,
        },
    }))
}

/// Prints the cluster rows (nothing if they were not run).
pub(super) fn print(c: &serde_json::Value) -> std::io::Result<()> {
    if c.is_null() {
        return Ok(());
    }
    let s = &c["seed"];
    outln!(
        "\n  cluster of {} keys on {} HSMs (Ed25519; CPU is user+sys of every process)",
        c["keys"],
        c["hsms"]
    );
    outln!(
        "  {:<34} {} s published ({} events/s), folded after {} s",
        "seed the log",
        s["seconds_published"],
        s["events_per_s"],
        s["seconds_folded"]
    );
    let b = &c["build"];
    outln!(
        "  {:<34} {} s ({} key copies/s, {} µs CPU a copy)",
        format!("{} HSMs join and catch up", b["hsms"]),
        b["seconds_to_in_service"],
        b["key_copies_per_s"],
        b["cpu_us_per_key_copy"]
    );
    let j = &c["join"];
    outln!(
        "  {:<34} {} s to in service ({} keys/s, {} µs CPU a key)",
        "a new HSM joins",
        j["seconds_to_in_service"],
        j["keys_per_s"],
        j["cpu_us_per_key"]
    );
    let st = &c["status"];
    outln!(
        "  {:<34} p50 {} ms through the CLI, {} ms through the SDK; reply {} bytes",
        "keysync cluster status",
        st["cli_p50_ms"],
        st["sdk_p50_ms"],
        st["reply_bytes"]
    );
    let a = &c["anti_entropy"];
    outln!(
        "  {:<34} round {} s (inventory of {} keys read and compared); {} lost keys back {} s after the restart (agent restart {} s)",
        "anti-entropy",
        a["round_seconds"],
        c["keys"],
        a["keys_lost"],
        a["seconds_restart_to_repaired"],
        a["agent_restart_seconds"]
    );
    let sn = &c["snapshot"];
    outln!(
        "  {:<34} {} bytes ({} a key); orchestrator restart from it {} s ({} s CPU)",
        "snapshot",
        sn["bytes"],
        sn["bytes_per_key"],
        sn["restart_seconds"],
        sn["restart_cpu_seconds"]
    );
    outln!("  {:<34} {}", "RSS, MB", c["rss_mb"]);
    outln!(
        "  {:<34} {}",
        "members declared failed (HsmFailed)",
        c["members_declared_failed"]
    );
    outln!("  {:<34} {}", "disk, MB", c["disk_mb"]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_found_by_their_whole_name() {
        let text = "# TYPE keysync_anti_entropy_round_seconds histogram\nkeysync_anti_entropy_round_seconds_sum 1.5\nkeysync_anti_entropy_round_seconds_count 2\nkeysync_anti_entropy_round_seconds_bucket{le=\"0.01\"} 0\n";
        assert_eq!(
            sample(text, "keysync_anti_entropy_round_seconds_count"),
            Some(2.0)
        );
        assert_eq!(
            sample(text, "keysync_anti_entropy_round_seconds_sum"),
            Some(1.5)
        );
        assert_eq!(sample(text, "keysync_anti_entropy_round_seconds"), None);
    }
}
