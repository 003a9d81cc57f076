//! CPU per replicated key: user + system time of every process of the
//! bench's stack (each nats-server, orchestrator and agent, and the bench
//! client itself) over a throughput run, divided by the keys replicated.
//!
//! Wall-clock rates on a 2-core machine shared with other work move with
//! whatever else runs; CPU time spent per key moves much less, and split
//! by process it says where a key's cost goes. Times come from
//! `/proc/<pid>/stat` (`utime` + `stime`, every thread of the process,
//! exited ones included), in clock ticks (10 ms at the usual 100 Hz), so a
//! run should cost each process many ticks (10,000 keys do).
//!
//! The run is counted until the stack is quiet again, not only until the
//! last `KeyReplicated` arrives: the audit chain and the lifecycle mirror
//! trail the replication and are part of each key's cost. What an idle
//! stack spends (heartbeats, ticks) is measured just before and reported
//! beside it, not subtracted.

use std::time::{Duration, Instant};

use serde_json::json;

/// The bench client's row: this process.
const CLIENT: &str = "bench client (keysync)";

/// After the run, the stack is quiet once it spends less than this share
/// of one core over [`SETTLE_STEP`].
const QUIET_CORES: f64 = 0.1;
const SETTLE_STEP: Duration = Duration::from_millis(250);
/// Longest wait for a quiet stack after the run.
const SETTLE_MAX: Duration = Duration::from_secs(10);
/// How long the idle stack is watched before the run.
const IDLE_WINDOW: Duration = Duration::from_millis(500);

/// User and system time of one process, in clock ticks.
#[derive(Debug, Clone, Copy, Default)]
struct Ticks {
    user: u64,
    sys: u64,
}

/// `utime` and `stime` of `/proc/<pid>/stat`: fields 14 and 15, counted
/// after the command name (which is in parentheses and may hold spaces).
fn ticks(pid: u32) -> Option<Ticks> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // After the name: state (field 3) ... utime is field 14.
    let user = fields.nth(11)?.parse().ok()?;
    let sys = fields.next()?.parse().ok()?;
    Some(Ticks { user, sys })
}

fn clock_ticks_per_s() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// The stack's processes and this one.
fn with_client(procs: &[(String, u32)]) -> Vec<(String, u32)> {
    let mut all = procs.to_vec();
    all.push((CLIENT.to_string(), std::process::id()));
    all
}

fn sample(procs: &[(String, u32)]) -> Vec<Option<Ticks>> {
    procs.iter().map(|(_, pid)| ticks(*pid)).collect()
}

fn total(s: &[Option<Ticks>]) -> u64 {
    s.iter().flatten().map(|t| t.user + t.sys).sum()
}

/// Watches a stack's CPU over a run: [`Meter::start`] before it,
/// [`Meter::finish`] after.
pub(super) struct Meter {
    procs: Vec<(String, u32)>,
    start: Vec<Option<Ticks>>,
    began: Instant,
    idle_cores: f64,
    hz: u64,
}

impl Meter {
    /// Measures what the idle stack spends, then starts counting.
    pub(super) async fn start(stack_processes: Vec<(String, u32)>) -> Meter {
        let procs = with_client(&stack_processes);
        let hz = clock_ticks_per_s();
        let a = sample(&procs);
        let t = Instant::now();
        tokio::time::sleep(IDLE_WINDOW).await;
        let b = sample(&procs);
        let idle_cores =
            total(&b).saturating_sub(total(&a)) as f64 / hz as f64 / t.elapsed().as_secs_f64();
        Meter {
            start: sample(&procs),
            procs,
            began: Instant::now(),
            idle_cores,
            hz,
        }
    }

    /// Waits until the stack is quiet, then gives each process's CPU per
    /// key over the run, and the total.
    pub(super) async fn finish(self, keys: usize) -> serde_json::Value {
        let replicated_after = self.began.elapsed();
        let settle_from = Instant::now();
        let mut last = sample(&self.procs);
        while settle_from.elapsed() < SETTLE_MAX {
            tokio::time::sleep(SETTLE_STEP).await;
            let now = sample(&self.procs);
            let spent = total(&now).saturating_sub(total(&last)) as f64 / self.hz as f64;
            last = now;
            if spent < QUIET_CORES * SETTLE_STEP.as_secs_f64() {
                break;
            }
        }
        let wall = self.began.elapsed().as_secs_f64();
        let us_per_tick = 1e6 / self.hz as f64;
        let per_key = |ticks: u64| ticks as f64 * us_per_tick / keys.max(1) as f64;
        let round = |v: f64| (v * 10.0).round() / 10.0;
        let mut rows = Vec::new();
        let mut sum = Ticks::default();
        for (((name, pid), a), b) in self.procs.iter().zip(&self.start).zip(&last) {
            let (Some(a), Some(b)) = (a, b) else {
                rows.push(json!({ "name": name, "pid": pid, "gone": true }));
                continue;
            };
            let d = Ticks {
                user: b.user.saturating_sub(a.user),
                sys: b.sys.saturating_sub(a.sys),
            };
            sum.user += d.user;
            sum.sys += d.sys;
            rows.push(json!({
                "name": name,
                "pid": pid,
                "user_us_per_key": round(per_key(d.user)),
                "sys_us_per_key": round(per_key(d.sys)),
                "us_per_key": round(per_key(d.user + d.sys)),
            }));
        }
        let cpu_s = (sum.user + sum.sys) as f64 / self.hz as f64;
        json!({
            "keys": keys,
            "seconds_to_replicated": round(replicated_after.as_secs_f64()),
            "seconds_counted": round(wall),
            "clock_ticks_per_s": self.hz,
            "idle_stack_cores": (self.idle_cores * 1000.0).round() / 1000.0,
            "cores_busy": (cpu_s / wall * 100.0).round() / 100.0,
            "processes": rows,
            "user_us_per_key": round(per_key(sum.user)),
            "sys_us_per_key": round(per_key(sum.sys)),
            "total_us_per_key": round(per_key(sum.user + sum.sys)),
        })
    }
}
/// The throughput run (Ed25519 keys, `in_flight` creates at a time) on
/// `stack`, metered: keys/s created and replicated, and the CPU per
/// replicated key of every process of the stack ([`Meter`]).
pub(super) async fn metered_throughput(
    stack: &keysync_harness::DevStack,
    keys: usize,
    in_flight: usize,
) -> anyhow::Result<(f64, f64, serde_json::Value)> {
    let streams = StoredMessages::start(stack.client()).await;
    let meter = Meter::start(stack.processes()).await;
    let (created, replicated) = super::bench::throughput(
        stack.client(),
        &stack.hsm_ids(),
        keysync_schemas::KeyType::Ed25519,
        keys,
        in_flight,
    )
    .await?;
    let mut doc = meter.finish(keys).await;
    // Read once the stack is quiet: the audit chain and the lifecycle
    // mirror trail the last key.
    doc["stored_messages_per_key"] = streams.finish(keys).await;
    Ok((created, replicated, doc))
}

/// The messages the stack stored in each of its streams over a run, per
/// key: what batching saves, measured rather than counted by hand (the
/// commands stream is a work queue, so sequences are compared, not sizes).
struct StoredMessages {
    js: async_nats::jetstream::Context,
    streams: Vec<(&'static str, String, u64)>,
}

impl StoredMessages {
    async fn start(client: &keysync::Client) -> Self {
        let s = client.subjects();
        let js = async_nats::jetstream::new(client.nats().clone());
        let mut streams = Vec::new();
        for (label, name) in [
            ("events", s.events_stream()),
            ("commands", s.commands_stream()),
            ("audit", s.audit_stream()),
            ("lifecycle", s.lifecycle_stream()),
        ] {
            let seq = last_seq(&js, &name).await;
            streams.push((label, name, seq));
        }
        StoredMessages { js, streams }
    }

    async fn finish(self, keys: usize) -> serde_json::Value {
        let mut per = serde_json::Map::new();
        let mut total = 0u64;
        for (label, name, before) in &self.streams {
            let n = last_seq(&self.js, name).await.saturating_sub(*before);
            total += n;
            per.insert((*label).into(), json!(per_key(n, keys)));
        }
        per.insert("total".into(), json!(per_key(total, keys)));
        serde_json::Value::Object(per)
    }
}

/// A stream's last sequence (0 when it is missing, as the lifecycle
/// stream is with the mirror off).
async fn last_seq(js: &async_nats::jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(mut st) => st.info().await.map(|i| i.state.last_sequence).unwrap_or(0),
        Err(_) => 0,
    }
}

fn per_key(n: u64, keys: usize) -> f64 {
    (n as f64 / keys.max(1) as f64 * 100.0).round() / 100.0
}

/// The table of a [`Meter::finish`] document (nothing if it is null).
pub(super) fn print(v: &serde_json::Value) -> std::io::Result<()> {
    if v.is_null() {
        return Ok(());
    }
    let f = |x: &serde_json::Value| format!("{:.1}", x.as_f64().unwrap_or(0.0));
    outln!(
        "\n  CPU per replicated key ({} keys; user+sys of every process until the stack is quiet, {} s; {} cores busy; idle stack {} cores)",
        v["keys"],
        v["seconds_counted"],
        v["cores_busy"],
        v["idle_stack_cores"]
    );
    outln!(
        "  {:<34} {:>10} {:>10} {:>10}",
        "process",
        "user µs",
        "sys µs",
        "total µs"
    );
    for p in v["processes"].as_array().into_iter().flatten() {
        outln!(
            "  {:<34} {:>10} {:>10} {:>10}",
            p["name"].as_str().unwrap_or_default(),
            f(&p["user_us_per_key"]),
            f(&p["sys_us_per_key"]),
            f(&p["us_per_key"])
        );
    }
    outln!(
        "  {:<34} {:>10} {:>10} {:>10}",
        "total",
        f(&v["user_us_per_key"]),
        f(&v["sys_us_per_key"]),
        f(&v["total_us_per_key"])
    );
    let m = &v["stored_messages_per_key"];
    if m.is_object() {
        outln!(
            "  stored messages per key: {} (events {}, commands {}, audit {}, lifecycle {})",
            m["total"],
            m["events"],
            m["commands"],
            m["audit"],
            m["lifecycle"]
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_cpu_time_is_read_and_grows_with_work() {
        let pid = std::process::id();
        let a = ticks(pid).expect("own /proc stat");
        // Spin until the kernel has charged at least two ticks.
        let t = Instant::now();
        let mut x = 0u64;
        while ticks(pid).map(|b| b.user + b.sys).unwrap_or(0) < a.user + a.sys + 2 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            assert!(t.elapsed() < Duration::from_secs(10), "no CPU time charged");
        }
        std::hint::black_box(x);
        assert!(ticks(u32::MAX).is_none(), "no such process");
    }
}
