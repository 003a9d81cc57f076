//! `keysync bench`: keysync against the bus floor, measured in one run.
//!
//! It starts its own nats-server (file storage) and cluster, then measures:
//! the raw JetStream floor of the sync message pattern; keysync's sync
//! latency one key at a time; create latency at each durability level;
//! replicated keys per second with many creates in flight, beside the bus
//! ceiling; and what create-then-sign costs on each route. Benchmarks
//! report; they do not pass or fail.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use hdrhistogram::Histogram;
use keysync::{Client, ClientOptions, CreateKey, RetryPolicy, Route};
use keysync_harness::{DevStack, StackOptions};
use keysync_schemas::{decode, Durability, Event, HsmId, KeyType};
use serde_json::json;

use super::{print_json, Cli};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Small sample sizes: finishes in well under a minute.
    #[arg(long)]
    quick: bool,
    /// Number of HSMs.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=64))]
    hsms: u16,
    /// Key type for the latency runs.
    #[arg(long = "type", default_value = "p256")]
    key_type: KeyType,
    /// Creates in flight for the throughput run.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Also run the sync-latency and throughput rows with every HSM in
    /// front of a SoftHSM2 token (`pkcs11`), beside the embedded run.
    #[arg(long, value_enum, default_value = "embedded")]
    keystore: BenchKeystore,
    /// The PKCS#11 module for the module rows (default:
    /// libkeysync_pkcs11.so next to this binary; the rows are skipped if
    /// it is not built: `cargo build -p keysync-pkcs11`).
    #[arg(long)]
    module: Option<std::path::PathBuf>,
    /// One JSON document on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Only the floor, the sync latency and the per-hop table (the rest
    /// of the document is null): quick to repeat while working on a hop.
    #[arg(long)]
    hops_only: bool,
    /// Only the throughput run with its CPU per replicated key, and the
    /// durable-bus rows `--sync-interval` selects (the rest is null).
    #[arg(long)]
    throughput_only: bool,
    /// Only the scaling rows (sync latency, ratio to the floor,
    /// throughput and CPU per key at each cluster size, up to 32 HSMs).
    #[arg(long)]
    scaling_only: bool,
    /// The durable-bus rows: floor, sync latency, throughput and CPU per
    /// key on a stack whose nats-server runs JetStream's default
    /// `sync_interval`, `always` (fsync before each ack), both, or none.
    #[arg(long, value_enum, default_value = "both")]
    sync_interval: super::bench_sync::SyncInterval,
    /// Only these rows, comma-separated (`recovery`, `bootstrap`,
    /// `memory`, `cluster`): the rest of the document is absent. Quick to repeat
    /// while working on one of them.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<super::bench_memory::Row>,
    /// Events the recovery row replays (default: 20,000 with `--quick`,
    /// 1,000,000 otherwise): smaller to iterate on the replay.
    #[arg(long)]
    recovery_events: Option<usize>,
    /// Keys the bootstrap row seeds (default: 2,000 with `--quick`,
    /// 100,000 otherwise).
    #[arg(long)]
    bootstrap_keys: Option<usize>,
    /// Keys in the large-cluster rows (`cluster`): default 1,000,000, or
    /// 2,000 with `--quick`.
    #[arg(long)]
    cluster_keys: Option<usize>,
}

/// Creates in flight for the keystore rows: a SoftHSM2 token takes one
/// call at a time, and its file store slows as it fills (every call looks
/// at every object file), so the embedded run's 64 would only measure the
/// queue in front of it.
const KEYSTORE_IN_FLIGHT: usize = 16;

/// `--keystore`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchKeystore {
    /// Embedded software HSMs only.
    Embedded,
    /// Embedded, then SoftHSM2 tokens behind `--keystore pkcs11` agents.
    Pkcs11,
}

/// Sync latency and throughput on the stack `opts` starts (the side-by-side
/// rows of `--keystore pkcs11`), for `key_type` (throughput too).
async fn keystore_rows(
    opts: StackOptions,
    key_type: KeyType,
    sizes: &Sizes,
) -> anyhow::Result<serde_json::Value> {
    let stack = DevStack::start(opts).await?;
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();
    let sync_h = pct(&sync_one_at_a_time(&client, &hsms, key_type, sizes.latency).await?);
    let (created, replicated) = throughput(
        &client,
        &hsms,
        key_type,
        sizes.keystore_throughput,
        KEYSTORE_IN_FLIGHT,
    )
    .await?;
    stack.shutdown().await;
    Ok(json!({
        "keys": sizes.keystore_throughput,
        "in_flight": KEYSTORE_IN_FLIGHT,
        "sync_latency": sync_h,
        "created_per_s": created.round() as u64,
        "replicated_per_s": replicated.round() as u64,
    }))
}

struct Sizes {
    latency: usize,
    durability: usize,
    throughput: usize,
    routing: usize,
    ceiling: usize,
    scaling: Vec<usize>,
    scaling_latency: usize,
    scaling_throughput: usize,
    bootstrap_keys: usize,
    recovery_events: usize,
    keystore_throughput: usize,
    lifecycle_throughput: usize,
}

/// Resident memory of a process, in bytes (Linux).
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Waits until the orchestrator has folded the log up to `seq`.
pub(super) async fn wait_folded(
    client: &Client,
    seq: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if client
            .cluster_status()
            .await
            .is_ok_and(|s| s.last_seq >= seq)
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the orchestrator did not fold up to {seq} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A new HSM joining a cluster of `n` keys: seconds to in-service, and the
/// orchestrator's memory per tracked key.
pub(super) async fn bootstrap(cli: &Cli, n: usize) -> anyhow::Result<serde_json::Value> {
    let metrics_port = keysync_harness::free_port()?;
    let mut stack = DevStack::start(StackOptions {
        hsms: 0,
        subjects: cli.subjects()?,
        orchestrator_metrics_addr: Some(([127, 0, 0, 1], metrics_port).into()),
        ..Default::default()
    })
    .await?;
    let fold_before = super::bench_memory::fold_state_bytes(metrics_port).await;
    let client = stack.client().clone();
    let pid = stack
        .orchestrator(keysync_harness::PRIMARY)
        .map(|p| p.pid());
    let rss_before = pid.and_then(rss_bytes);
    let last = keysync_harness::seed::seed_keys(&stack, n, true).await?;
    wait_folded(&client, last, Duration::from_secs(600)).await?;
    let rss_after = pid.and_then(rss_bytes);
    let fold_after = super::bench_memory::fold_state_bytes(metrics_port).await;
    let joiner = HsmId::new("hsm-1")?;
    let t = Instant::now();
    stack.start_agents(std::slice::from_ref(&joiner)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1200);
    loop {
        let done = client.cluster_status().await.is_ok_and(|s| {
            s.members
                .iter()
                .any(|m| m.hsm_id == joiner && m.keys >= n as u64)
        });
        if done {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the joining HSM did not catch up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    let per_key = match (rss_before, rss_after) {
        (Some(b), Some(a)) if a > b => Some((a - b) / n as u64),
        _ => None,
    };
    stack.shutdown().await;
    Ok(json!({
        "keys": n,
        "seconds_to_in_service": (secs * 100.0).round() / 100.0,
        "keys_per_s": (n as f64 / secs).round() as u64,
        "orchestrator_bytes_per_key": per_key,
        "orchestrator": super::bench_memory::orchestrator_row(n, fold_before, fold_after, rss_before, rss_after),
    }))
}

/// Orchestrator restart over a log of `n` events: seconds until it has
/// folded them all, from the full log and from a snapshot.
pub(super) async fn recovery(cli: &Cli, n: usize) -> anyhow::Result<serde_json::Value> {
    let mut stack = DevStack::start(StackOptions {
        hsms: 0,
        subjects: cli.subjects()?,
        orchestrator_args: vec!["--snapshot-every".into(), "0".into()],
        ..Default::default()
    })
    .await?;
    let client = stack.client().clone();
    let last = keysync_harness::seed::seed_keys(&stack, n, false).await?;
    wait_folded(&client, last, Duration::from_secs(900)).await?;
    stack.kill_orchestrator();
    let t = Instant::now();
    stack.start_orchestrator().await?;
    wait_folded(&client, last, Duration::from_secs(900)).await?;
    let full = t.elapsed().as_secs_f64();
    let pid = stack
        .orchestrator(keysync_harness::PRIMARY)
        .map(|p| p.pid());
    let rss = pid.and_then(rss_bytes);
    let cpu = pid.and_then(super::bench_memory::cpu_seconds);

    // The usual restart: from the latest (signed) snapshot plus the tail.
    // Let it snapshot, then restart it again.
    stack.set_orchestrator_args(vec!["--snapshot-every".into(), "1".into()]);
    stack.kill_orchestrator();
    stack.start_orchestrator().await?;
    wait_folded(&client, last, Duration::from_secs(900)).await?;
    let store = jetstream::new(client.nats().clone())
        .get_object_store(client.subjects().snapshot_bucket())
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while store.info("cluster-state").await.is_err() {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("no snapshot was written");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.kill_orchestrator();
    let t = Instant::now();
    stack.start_orchestrator().await?;
    wait_folded(&client, last, Duration::from_secs(900)).await?;
    let from_snapshot = t.elapsed().as_secs_f64();
    // What is left for keysync: the same stream read whole by a bare
    // consumer, in the same run, with no orchestrator running (an active
    // one's auditor and lifecycle mirror read the stream too).
    stack.kill_orchestrator();
    let (bare, bare_cpu) = bare_read(&client).await?;
    stack.shutdown().await;
    Ok(json!({
        "events": n,
        "seconds_full_replay": (full * 100.0).round() / 100.0,
        "events_per_s": (n as f64 / full).round() as u64,
        "seconds_from_snapshot": (from_snapshot * 100.0).round() / 100.0,
        "orchestrator_rss_mb": rss.map(|b| b / (1024 * 1024)),
        "orchestrator_cpu_us_per_event_full_replay": cpu.map(|c| (c * 1e6 / n as f64 * 10.0).round() / 10.0),
        "seconds_bare_consumer": (bare * 100.0).round() / 100.0,
        "bare_consumer_cpu_us_per_event": bare_cpu.map(|c| (c * 1e6 / n as f64 * 10.0).round() / 10.0),
    }))
}

/// The floor of a full replay: the events stream read whole, from its
/// first event to its last, by a bare async-nats ordered pull consumer
/// on the orchestrator's filter (what the orchestrator's replay reads),
/// with no keysync code per message beyond counting it. Seconds, and the
/// CPU this process spent meanwhile (the reader is the only thing it
/// does then).
async fn bare_read(client: &Client) -> anyhow::Result<(f64, Option<f64>)> {
    let js = jetstream::new(client.nats().clone());
    let mut events = js.get_stream(client.subjects().events_stream()).await?;
    let last = events.info().await?.state.last_sequence;
    let consumer = events
        .create_consumer(pull::OrderedConfig {
            filter_subject: client.subjects().events_all(),
            ..Default::default()
        })
        .await?;
    let cpu_before = super::bench_memory::cpu_seconds(std::process::id());
    let t = Instant::now();
    // Taken as the orchestrator's feed takes them, in ready batches of up
    // to 128: one wake a batch, not one a message.
    let mut batches = consumer.messages().await?.ready_chunks(128);
    'read: while let Some(batch) = batches.next().await {
        for msg in batch {
            let msg = msg?;
            if msg
                .info()
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .stream_sequence
                >= last
            {
                break 'read;
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = super::bench_memory::cpu_seconds(std::process::id())
        .zip(cpu_before)
        .map(|(a, b)| a - b);
    Ok((secs, cpu))
}

/// Sync latency and throughput at each cluster size.
async fn scaling(
    cli: &Cli,
    sizes: &Sizes,
    key_type: KeyType,
    in_flight: usize,
) -> anyhow::Result<serde_json::Value> {
    let mut rows = Vec::new();
    for &n in &sizes.scaling {
        let stack = DevStack::start(StackOptions {
            hsms: n,
            subjects: cli.subjects()?,
            ..Default::default()
        })
        .await?;
        let client = stack.client().clone();
        let hsms = stack.hsm_ids();
        // The floor at this size: one request/reply per other HSM.
        let floor_h = pct(&floor(client.nats(), n - 1, sizes.scaling_latency).await?);
        let lat = pct(&sync_one_at_a_time(&client, &hsms, key_type, sizes.scaling_latency).await?);
        let (_, replicated, cpu) =
            super::bench_cpu::metered_throughput(&stack, sizes.scaling_throughput, in_flight)
                .await?;
        stack.shutdown().await;
        rows.push(json!({
            "hsms": n,
            "floor": floor_h,
            "sync_latency": lat,
            "ratio_to_floor": { "p50": ratio(&lat, &floor_h, "p50_ms"), "p99": ratio(&lat, &floor_h, "p99_ms") },
            "replicated_per_s": replicated.round() as u64,
            "cpu_us_per_key": cpu["total_us_per_key"],
        }));
    }
    Ok(serde_json::Value::Array(rows))
}

/// A `logged` create of `key_id` and a subscription, made and flushed
/// before the create is sent, to its `KeyReplicated`: one key's sync,
/// watched from its start.
pub(super) async fn watched_create(
    client: &Client,
    key_id: keysync_schemas::KeyId,
    key_type: KeyType,
) -> anyhow::Result<(async_nats::Subscriber, keysync_schemas::OpRequest)> {
    let sub = client
        .nats()
        .subscribe(client.subjects().key_replicated(&key_id))
        .await?;
    client.nats().flush().await?;
    let op = keysync_schemas::OpRequest::Generate {
        key_id: Some(key_id),
        key_type,
        session: false,
        durability: Durability::Logged,
        attributes: Default::default(),
    };
    Ok((sub, op))
}

pub(super) fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// p50, p90, p99, max in milliseconds from a histogram of microseconds.
pub(super) fn pct(h: &Histogram<u64>) -> serde_json::Value {
    let ms = |us: u64| (us as f64 / 10.0).round() / 100.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.5)),
        "p90_ms": ms(h.value_at_quantile(0.9)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "max_ms": ms(h.max()),
    })
}

pub(super) fn ratio(a: &serde_json::Value, b: &serde_json::Value, field: &str) -> f64 {
    match (a[field].as_f64(), b[field].as_f64()) {
        (Some(x), Some(y)) if y > 0.0 => (x / y * 100.0).round() / 100.0,
        _ => 0.0,
    }
}

fn stored_ns(msg: &jetstream::Message) -> anyhow::Result<u64> {
    let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(u64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0))
}

/// The floor: an event published with PubAck, received by a consumer, one
/// request/reply per target, a final record published with PubAck; one at
/// a time. Latency is event stored → final record stored, by the stream's
/// timestamps, exactly as keysync's sync latency is measured.
pub(super) async fn floor(
    nats: &async_nats::Client,
    targets: usize,
    n: usize,
) -> anyhow::Result<Histogram<u64>> {
    let js = jetstream::new(nats.clone());
    let name = "KEYSYNC_BENCH_FLOOR";
    let _ = js.delete_stream(name).await;
    let s = js
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec!["keysync-bench.floor.>".into()],
            storage: stream::StorageType::File,
            allow_direct: true,
            ..Default::default()
        })
        .await?;
    let mut responders = Vec::new();
    for t in 0..targets {
        let mut sub = nats.subscribe(format!("keysync-bench.target.{t}")).await?;
        let nats = nats.clone();
        responders.push(tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                // Like every keysync responder, answer only inboxes.
                if let Some(reply) = m
                    .reply
                    .filter(|r| keysync_security::reply::check(r).is_ok())
                {
                    let _ = nats.publish(reply, m.payload).await;
                }
            }
        }));
    }
    nats.flush().await?;
    let consumer = s
        .create_consumer(pull::OrderedConfig {
            filter_subject: "keysync-bench.floor.event".into(),
            ..Default::default()
        })
        .await?;
    let mut events = consumer.messages().await?;
    let payload = bytes::Bytes::from(vec![7u8; 400]);
    let mut h = histogram()?;
    // Warm up, then measure.
    for i in 0..n + n / 10 {
        js.publish("keysync-bench.floor.event", payload.clone())
            .await?
            .await?;
        let ev = events.next().await.context("floor consumer ended")??;
        let t0 = stored_ns(&ev)?;
        for t in 0..targets {
            nats.request(format!("keysync-bench.target.{t}"), payload.clone())
                .await?;
        }
        let ack = js
            .publish("keysync-bench.floor.done", payload.clone())
            .await?
            .await?;
        let done = s.direct_get(ack.sequence).await?;
        let t1 = u64::try_from(done.time.unix_timestamp_nanos()).unwrap_or(0);
        if i >= n / 10 {
            h.record(((t1.saturating_sub(t0)) / 1_000).max(1))?;
        }
    }
    for r in responders {
        r.abort();
    }
    drop(events);
    let _ = js.delete_stream(name).await;
    Ok(h)
}

/// JetStream async publish rate with 1,000 in flight: the bus ceiling.
async fn ceiling(nats: &async_nats::Client, n: usize) -> anyhow::Result<f64> {
    let js = jetstream::new(nats.clone());
    let name = "KEYSYNC_BENCH_CEILING";
    let _ = js.delete_stream(name).await;
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec!["keysync-bench.ceiling".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::from(vec![7u8; 400]);
    let t = Instant::now();
    let mut acks = futures::stream::FuturesUnordered::new();
    for _ in 0..n {
        if acks.len() >= 1000 {
            if let Some(r) = acks.next().await {
                r?;
            }
        }
        let fut = js.publish("keysync-bench.ceiling", payload.clone()).await?;
        acks.push(std::future::IntoFuture::into_future(fut));
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let _ = js.delete_stream(name).await;
    Ok(rate)
}

/// Sync latency one key at a time, as the orchestrator measured it.
pub(super) async fn sync_one_at_a_time(
    client: &Client,
    hsms: &[HsmId],
    key_type: KeyType,
    n: usize,
) -> anyhow::Result<Histogram<u64>> {
    let mut h = histogram()?;
    for i in 0..n {
        let key_id = keysync_schemas::KeyId::new();
        let (mut sub, op) = watched_create(client, key_id, key_type).await?;
        client
            .request(&Route::Hsm(hsms[i % hsms.len()].clone()), op)
            .await?;
        let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .context("KeyReplicated did not come within 10 s")?
            .context("subscription ended")?;
        if let Event::KeyReplicated(r) = decode::<Event>(&msg.payload)?.body {
            h.record(r.sync_latency_micros.max(1))?;
        }
    }
    Ok(h)
}

/// Create latency (the call, as the caller sees it) at one durability level.
async fn create_latency(
    client: &Client,
    hsms: &[HsmId],
    key_type: KeyType,
    d: Durability,
    n: usize,
) -> anyhow::Result<Histogram<u64>> {
    let mut h = histogram()?;
    for i in 0..n {
        let t = Instant::now();
        client
            .create_key(
                CreateKey::new(key_type)
                    .on(Route::Hsm(hsms[i % hsms.len()].clone()))
                    .durability(d),
            )
            .await?;
        h.record((t.elapsed().as_micros() as u64).max(1))?;
    }
    Ok(h)
}

/// Keys per second created and replicated to every HSM, `in_flight` creates at a time.
pub(super) async fn throughput(
    client: &Client,
    hsms: &[HsmId],
    key_type: KeyType,
    n: usize,
    in_flight: usize,
) -> anyhow::Result<(f64, f64)> {
    let mut replicated = client
        .nats()
        .subscribe(client.subjects().all_replicated())
        .await?;
    client.nats().flush().await?;
    let t = Instant::now();
    let mut ids = std::collections::HashSet::new();
    let mut creates = futures::stream::iter(0..n)
        .map(|i| {
            let spec = CreateKey::new(key_type).on(Route::Hsm(hsms[i % hsms.len()].clone()));
            let client = client.clone();
            async move { client.create_key(spec).await }
        })
        .buffer_unordered(in_flight.max(1));
    while let Some(k) = creates.next().await {
        ids.insert(k?.info.key_id);
    }
    let created = n as f64 / t.elapsed().as_secs_f64();
    let mut done = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while done < n {
        let msg = tokio::time::timeout_at(deadline, replicated.next())
            .await
            .context("replication did not finish within 120 s")?
            .context("subscription ended")?;
        if let Ok(Event::KeyReplicated(r)) = decode::<Event>(&msg.payload).map(|e| e.body) {
            if ids.remove(&r.key_id) {
                done += 1;
            }
        }
    }
    Ok((created, n as f64 / t.elapsed().as_secs_f64()))
}

/// Create (durability none) then sign at once; failures per route.
async fn routing(url: &str, hsms: &[HsmId], n: usize) -> anyhow::Result<serde_json::Value> {
    let no_retry = Client::connect_with(
        url,
        ClientOptions {
            retry: RetryPolicy::none(),
            ..Default::default()
        },
    )
    .await?;
    let retry = Client::connect(url).await?;
    let mut out = serde_json::Map::new();
    for (name, client, route) in [
        ("replica_aware", &no_retry, Route::ReplicaAware),
        ("any_without_retries", &no_retry, Route::Any),
        ("any_with_retries", &retry, Route::Any),
    ] {
        let mut failures = 0u64;
        for i in 0..n {
            let k = client
                .create_key(
                    CreateKey::new(KeyType::Ed25519)
                        .on(Route::Hsm(hsms[i % hsms.len()].clone()))
                        .durability(Durability::None),
                )
                .await?;
            if client.sign(k.info.key_id, b"bench", &route).await.is_err() {
                failures += 1;
            }
        }
        out.insert(name.into(), json!({ "cycles": n, "failures": failures }));
    }
    Ok(serde_json::Value::Object(out))
}

pub async fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let sizes = if args.quick {
        Sizes {
            latency: 100,
            durability: 50,
            throughput: 1000,
            routing: 100,
            ceiling: 20_000,
            scaling: vec![3, 5],
            scaling_latency: 30,
            scaling_throughput: 300,
            bootstrap_keys: 2000,
            recovery_events: 20_000,
            keystore_throughput: 300,
            lifecycle_throughput: 1000,
        }
    } else {
        Sizes {
            latency: 1000,
            durability: 300,
            throughput: 10_000,
            routing: 1000,
            ceiling: 100_000,
            scaling: vec![3, 5, 9, 17, 32],
            scaling_latency: 200,
            scaling_throughput: 3000,
            bootstrap_keys: 100_000,
            recovery_events: 1_000_000,
            keystore_throughput: 1000,
            lifecycle_throughput: 10_000,
        }
    };
    if args.scaling_only {
        let scale = scaling(cli, &sizes, args.key_type, args.in_flight).await?;
        let doc = json!({ "quick": args.quick, "scaling": scale });
        if args.json {
            return print_json(&doc);
        }
        return print_scaling(&doc);
    }
    let n = usize::from(args.hsms);
    let cluster_keys = args
        .cluster_keys
        .unwrap_or(if args.quick { 2000 } else { 1_000_000 });
    let say = |s: &str| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    if !args.only.is_empty() {
        let sizes = super::bench_memory::OnlySizes {
            bootstrap_keys: args.bootstrap_keys.unwrap_or(sizes.bootstrap_keys),
            recovery_events: args.recovery_events.unwrap_or(sizes.recovery_events),
            hsms: n,
            in_flight: args.in_flight,
            cluster_keys,
        };
        return super::bench_memory::only(cli, &args.only, &sizes, args.json).await;
    }
    say(&format!(
        "starting a stack: nats-server (file storage), orchestrator, {n} HSMs"
    ));
    let stack = DevStack::start(StackOptions {
        hsms: n,
        subjects: cli.subjects()?,
        ..Default::default()
    })
    .await?;
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();
    let bus_sizes = super::bench_sync::Sizes {
        latency: sizes.latency,
        throughput: sizes.throughput,
        in_flight: args.in_flight,
    };
    if args.throughput_only {
        say("measuring throughput and CPU per replicated key");
        let (created, replicated, cpu) =
            super::bench_cpu::metered_throughput(&stack, sizes.throughput, args.in_flight).await?;
        stack.shutdown().await;
        let subjects = cli.subjects()?;
        let bus = super::bench_sync::rows(
            &subjects,
            n,
            args.key_type,
            args.sync_interval,
            &bus_sizes,
            &say,
        )
        .await?;
        let doc = json!({
            "hsms": n,
            "quick": args.quick,
            "throughput": {
                "in_flight": args.in_flight,
                "keys": sizes.throughput,
                "created_per_s": created.round() as u64,
                "replicated_per_s": replicated.round() as u64,
            },
            "cpu_per_key": cpu,
            "sync_interval": bus,
        });
        if args.json {
            return print_json(&doc);
        }
        outln!(
            "keysync bench --throughput-only: {n} HSMs; {} keys, {} in flight: {} keys/s created, {} keys/s replicated",
            sizes.throughput, args.in_flight, doc["throughput"]["created_per_s"], doc["throughput"]["replicated_per_s"]
        );
        super::bench_cpu::print(&doc["cpu_per_key"])?;
        super::bench_sync::print(&doc["sync_interval"])?;
        return Ok(());
    }

    say("measuring the JetStream floor of the sync pattern");
    let floor_h = pct(&floor(client.nats(), n - 1, sizes.latency).await?);
    say("measuring sync latency, one key at a time");
    let sync_h = pct(&sync_one_at_a_time(&client, &hsms, args.key_type, sizes.latency).await?);
    say("measuring each hop of a sync and the bare JetStream hops, one key at a time");
    let hops = super::bench_hops::rows(&client, &hsms, args.key_type, sizes.latency).await?;
    if args.hops_only {
        stack.shutdown().await;
        let doc = json!({
            "machine": { "cores": std::thread::available_parallelism().map(|c| c.get()).unwrap_or(0) },
            "hsms": n,
            "key_type": args.key_type.as_str(),
            "quick": args.quick,
            "floor": floor_h,
            "sync_latency": sync_h,
            "ratio_to_floor": { "p50": ratio(&sync_h, &floor_h, "p50_ms"), "p99": ratio(&sync_h, &floor_h, "p99_ms") },
            "hops": hops,
        });
        if args.json {
            return print_json(&doc);
        }
        outln!(
            "keysync bench --hops-only: {n} HSMs, {} keys; sync p50 {} ms, floor p50 {} ms",
            args.key_type,
            sync_h["p50_ms"],
            floor_h["p50_ms"]
        );
        super::bench_hops::print(&doc["hops"])?;
        return Ok(());
    }
    say("measuring create latency at each durability level");
    let mut durability = serde_json::Map::new();
    for d in [
        Durability::None,
        Durability::Logged,
        Durability::Replicas(2),
        Durability::All,
    ] {
        let h = create_latency(&client, &hsms, args.key_type, d, sizes.durability).await?;
        durability.insert(d.to_string(), pct(&h));
    }
    say("measuring throughput");
    let (created_rate, replicated_rate, cpu_per_key) =
        super::bench_cpu::metered_throughput(&stack, sizes.throughput, args.in_flight).await?;
    let ceiling_rate = ceiling(client.nats(), sizes.ceiling).await?;
    // Stored per key, as measured over the throughput run (batching makes
    // it less than one message per fact under load); one key at a time it
    // is KeyCreated, n-1 commands, n-1 CloneApplied, KeyReplicated, one
    // audit record and one lifecycle event per fact: 4n+2.
    let msgs_per_key = cpu_per_key["stored_messages_per_key"]["total"]
        .as_f64()
        .filter(|m| *m > 0.0)
        .unwrap_or((4 * n + 2) as f64);
    say("measuring create-then-sign on each route");
    let routes = routing(&stack.url(), &hsms, sizes.routing).await?;
    let module = match args
        .module
        .clone()
        .or_else(super::bench_module::find_module)
    {
        Some(m) => {
            say("measuring create-then-sign and sign rates through the PKCS#11 module");
            let (cycles, rate_for) = if args.quick {
                (20, Duration::from_secs(2))
            } else {
                (200, Duration::from_secs(5))
            };
            super::bench_module::rows(&m, &stack.url(), &client, cycles, rate_for).await?
        }
        None => {
            say("no libkeysync_pkcs11.so next to this binary: module rows skipped (cargo build -p keysync-pkcs11)");
            serde_json::Value::Null
        }
    };
    stack.shutdown().await;
    say(&format!("measuring scaling at {:?} HSMs", sizes.scaling));
    let scale = scaling(cli, &sizes, args.key_type, args.in_flight).await?;
    say(&format!(
        "measuring bootstrap of a new HSM into {} keys",
        sizes.bootstrap_keys
    ));
    let boot = bootstrap(cli, sizes.bootstrap_keys).await?;
    say(&format!(
        "measuring orchestrator recovery over {} events",
        sizes.recovery_events
    ));
    let recov = recovery(cli, sizes.recovery_events).await?;
    say("measuring throughput with the lifecycle mirror off and on");
    let lifecycle = super::bench_lifecycle::rows(
        &cli.subjects()?,
        n,
        sizes.lifecycle_throughput,
        args.in_flight,
    )
    .await?;
    let bus = super::bench_sync::rows(
        &cli.subjects()?,
        n,
        args.key_type,
        args.sync_interval,
        &bus_sizes,
        &say,
    )
    .await?;
    say("measuring agent memory per key");
    let memory = super::bench_memory::agents(
        &cli.subjects()?,
        n,
        sizes.bootstrap_keys / 5,
        args.in_flight,
    )
    .await?;
    let cluster = super::bench_cluster::rows(&cli.subjects()?, cluster_keys, &say).await?;
    let keystores = if args.keystore == BenchKeystore::Pkcs11 {
        // Ed25519 is not clonable on every token (SoftHSM 2.6.1): these
        // rows use the latency key type for throughput too, on both.
        let subjects = cli.subjects()?;
        let opts = |softhsm: bool| StackOptions {
            hsms: n,
            subjects: subjects.clone(),
            softhsm_agents: if softhsm {
                (1..=n).map(|i| format!("hsm-{i}")).collect()
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        say("measuring sync latency and throughput, embedded HSMs");
        let embedded = keystore_rows(opts(false), args.key_type, &sizes).await?;
        say("measuring sync latency and throughput, SoftHSM2 tokens (--keystore pkcs11)");
        let pkcs11 = keystore_rows(opts(true), args.key_type, &sizes).await?;
        json!({ "key_type": args.key_type.as_str(), "embedded": embedded, "softhsm2": pkcs11 })
    } else {
        serde_json::Value::Null
    };

    let doc = json!({
        "machine": { "cores": std::thread::available_parallelism().map(|c| c.get()).unwrap_or(0) },
        "hsms": n,
        "key_type": args.key_type.as_str(),
        "quick": args.quick,
        "floor": floor_h,
        "sync_latency": sync_h,
        "ratio_to_floor": { "p50": ratio(&sync_h, &floor_h, "p50_ms"), "p99": ratio(&sync_h, &floor_h, "p99_ms") },
        "create_latency": durability,
        "throughput": {
            "in_flight": args.in_flight,
            "keys": sizes.throughput,
            "created_per_s": created_rate.round() as u64,
            "replicated_per_s": replicated_rate.round() as u64,
            "bus_publish_per_s": ceiling_rate.round() as u64,
            "messages_per_key": msgs_per_key,
            "bus_ceiling_keys_per_s": (ceiling_rate / msgs_per_key).round() as u64,
        },
        "routing": routes,
        "scaling": scale,
        "bootstrap": boot,
        "recovery": recov,
        "memory": memory,
        "keystores": keystores,
        "pkcs11_module": module,
        "lifecycle": lifecycle,
        "hops": hops,
        "cpu_per_key": cpu_per_key,
        "sync_interval": bus,
        "cluster": cluster,
    });
    if args.json {
        return print_json(&doc);
    }
    let f = |v: &serde_json::Value| format!("{:.2}", v.as_f64().unwrap_or(0.0));
    let row = |name: &str, v: &serde_json::Value| -> std::io::Result<()> {
        use std::io::Write as _;
        writeln!(
            std::io::stdout().lock(),
            "  {:<34} {:>8} {:>8} {:>8} {:>8}",
            name,
            f(&v["p50_ms"]),
            f(&v["p90_ms"]),
            f(&v["p99_ms"]),
            f(&v["max_ms"])
        )
    };
    outln!(
        "keysync bench: {n} HSMs, {} keys, {} cores{}",
        args.key_type,
        doc["machine"]["cores"],
        if args.quick { ", --quick" } else { "" }
    );
    outln!(
        "\n  {:<34} {:>8} {:>8} {:>8} {:>8}   (ms)",
        "latency",
        "p50",
        "p90",
        "p99",
        "max"
    );
    row("JetStream floor (same pattern)", &doc["floor"])?;
    row("sync latency, one key at a time", &doc["sync_latency"])?;
    outln!(
        "  {:<34} {:>7}x {:>16}x",
        "ratio to floor",
        f(&doc["ratio_to_floor"]["p50"]),
        f(&doc["ratio_to_floor"]["p99"])
    );
    for d in ["none", "logged", "replicas:2", "all"] {
        row(
            &format!("create, durability {d}"),
            &doc["create_latency"][d],
        )?;
    }
    super::bench_hops::print(&doc["hops"])?;
    let t = &doc["throughput"];
    outln!(
        "\n  throughput ({} keys, {} in flight): {} keys/s created, {} keys/s replicated to {n} HSMs",
        t["keys"], t["in_flight"], t["created_per_s"], t["replicated_per_s"]
    );
    outln!(
        "  bus ceiling: {} JetStream publishes/s / {} messages per key = {} keys/s",
        t["bus_publish_per_s"],
        t["messages_per_key"],
        t["bus_ceiling_keys_per_s"]
    );
    super::bench_cpu::print(&doc["cpu_per_key"])?;
    super::bench_sync::print(&doc["sync_interval"])?;
    let r = &doc["routing"];
    outln!(
        "\n  create (none) then sign at once, failures of {}: replica-aware {}, any HSM without retries {}, any HSM with retries {}",
        r["replica_aware"]["cycles"], r["replica_aware"]["failures"], r["any_without_retries"]["failures"], r["any_with_retries"]["failures"]
    );
    print_scaling(&doc)?;
    let l = &doc["lifecycle"];
    println!(
        "\n  lifecycle mirror ({} keys): replicated/s {} with it, {} without ({}x); created/s {} / {}; the mirror stored the last fact {} ms after the last key was replicated",
        l["keys"],
        l["mirror_on"]["replicated_per_s"],
        l["mirror_off"]["replicated_per_s"],
        l["on_to_off_replicated"],
        l["mirror_on"]["created_per_s"],
        l["mirror_off"]["created_per_s"],
        l["mirror_on"]["lag_after_last_replicated_ms"]
    );
    let b = &doc["bootstrap"];
    outln!(
        "\n  bootstrap: a new HSM joining {} keys is in service after {} s ({} keys/s); orchestrator memory {} bytes per tracked key",
        b["keys"], b["seconds_to_in_service"], b["keys_per_s"], b["orchestrator"]["fold_state_bytes_per_key"]
    );
    super::bench_memory::print_orchestrator(b)?;
    super::bench_memory::print(&doc["memory"])?;
    super::bench_cluster::print(&doc["cluster"])?;
    super::bench_memory::print_recovery(&doc["recovery"])?;
    let m = &doc["pkcs11_module"];
    if !m.is_null() {
        outln!(
            "\n  {:<34} {:>8} {:>8}   (ms, P-256, replicas:2, {} cycles)",
            "create then sign at once",
            "p50",
            "p99",
            m["cycles"]
        );
        for (name, v) in [
            ("through the PKCS#11 module", &m["create_then_sign_module"]),
            ("through the SDK", &m["create_then_sign_sdk"]),
        ] {
            outln!(
                "  {:<34} {:>8} {:>8}",
                name,
                f(&v["p50_ms"]),
                f(&v["p99_ms"])
            );
        }
        let r = &m["sign_per_s_by_threads"];
        outln!(
            "  signs/s through the module: {} (1 thread), {} (8), {} (32)",
            r["1"],
            r["8"],
            r["32"]
        );
    }
    let k = &doc["keystores"];
    if !k.is_null() {
        outln!(
            "\n  keystores: {} keys, {} HSMs; throughput {} keys, {} in flight\n  {:<34} {:>8} {:>8} {:>8} {:>12} {:>12}",
            k["key_type"].as_str().unwrap_or_default(),
            n,
            k["embedded"]["keys"],
            k["embedded"]["in_flight"],
            "",
            "p50 ms",
            "p99 ms",
            "floor x",
            "created/s",
            "replicated/s"
        );
        for (name, v) in [
            ("embedded", &k["embedded"]),
            ("SoftHSM2 (pkcs11)", &k["softhsm2"]),
        ] {
            outln!(
                "  {:<34} {:>8} {:>8} {:>7}x {:>12} {:>12}",
                format!("sync latency, {name}"),
                f(&v["sync_latency"]["p50_ms"]),
                f(&v["sync_latency"]["p99_ms"]),
                format!("{:.2}", ratio(&v["sync_latency"], &doc["floor"], "p50_ms")),
                v["created_per_s"].to_string(),
                v["replicated_per_s"].to_string()
            );
        }
    }
    Ok(())
}

/// The scaling table of a bench document.
fn print_scaling(doc: &serde_json::Value) -> anyhow::Result<()> {
    let f = |v: &serde_json::Value| format!("{:.2}", v.as_f64().unwrap_or(0.0));
    outln!(
        "\n  {:<6} {:>10} {:>10} {:>10} {:>10} {:>14} {:>12}",
        "HSMs",
        "sync p50",
        "sync p99",
        "floor x50",
        "floor x99",
        "replicated/s",
        "CPU µs/key"
    );
    for r in doc["scaling"].as_array().into_iter().flatten() {
        outln!(
            "  {:<6} {:>10} {:>10} {:>9}x {:>9}x {:>14} {:>12}",
            r["hsms"],
            f(&r["sync_latency"]["p50_ms"]),
            f(&r["sync_latency"]["p99_ms"]),
            f(&r["ratio_to_floor"]["p50"]),
            f(&r["ratio_to_floor"]["p99"]),
            r["replicated_per_s"].to_string(),
            r["cpu_us_per_key"].to_string()
        );
    }
    Ok(())
}
