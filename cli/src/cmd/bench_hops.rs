//! `keysync bench`'s per-hop table: where one key's sync latency goes,
//! hop by hop, each hop beside the bare JetStream hop it rides on,
//! measured in the same run on the same nats-server (decision 18).
//!
//! Times come from three places: JetStream's stored timestamps (the
//! server's clock) for everything stored, read back from the events stream
//! after the key is replicated; the processes' own clocks, which travel in
//! the [`HOP_TIMES`] header (the orchestrator's receipt of the event on
//! the commands it publishes, copied by each agent onto its
//! `CloneApplied` with the command's decision, stored and received times;
//! a `CloneApplied` envelope's `emitted_at` is when the clone was applied);
//! and the bench's clock for the create call. A command is gone from its
//! work queue once acknowledged, so its stored time is the one the agent
//! read off the delivery. All of these read one clock only because every
//! process runs on this machine; across machines a hop is only as good as
//! their clock sync.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull, stream, Message};
use futures::StreamExt;
use hdrhistogram::Histogram;
use keysync::{Client, Route};
use keysync_schemas::headers::{HopTimes, HOP_TIMES};
use keysync_schemas::{decode, Envelope, Event, HsmId, KeyType};
use serde_json::json;

use super::bench::{histogram, pct};

/// The hops, in the order a sync takes them: (JSON key, row label, the
/// bare hop's JSON key or `None` where the hop is the process's own work).
pub(super) const HOPS: [(&str, &str, Option<&str>); 8] = [
    (
        "create_op",
        "create op (client call)",
        Some("request_publish"),
    ),
    (
        "event_stored_to_orchestrator",
        "event stored -> orchestrator",
        Some("stored_to_consumer"),
    ),
    (
        "orchestrator_handling",
        "orchestrator received -> decided",
        None,
    ),
    (
        "decided_to_command_stored",
        "decided -> command stored",
        Some("publish_to_stored"),
    ),
    (
        "command_stored_to_agent",
        "command stored -> agent received",
        Some("stored_to_work_queue_consumer"),
    ),
    (
        "agent_apply",
        "agent received -> applied",
        Some("store_commit"),
    ),
    (
        "applied_to_clone_applied_stored",
        "applied -> CloneApplied stored",
        Some("publish_to_stored"),
    ),
    (
        "last_clone_applied_to_replicated",
        "last CloneApplied -> KeyReplicated",
        Some("relay"),
    ),
];

/// Nanoseconds since the epoch of a stored message.
fn stored_at(m: &jetstream::message::StreamMessage) -> u64 {
    u64::try_from(m.time.unix_timestamp_nanos()).unwrap_or(0)
}

fn delivered_at(m: &Message) -> anyhow::Result<u64> {
    let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(u64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0))
}

fn now_ns() -> u64 {
    keysync_schemas::Timestamp::now().as_nanos()
}

/// Records `to - from` in microseconds; a negative span (clocks read at
/// different resolutions) counts as the smallest value, never dropped.
fn record(h: &mut Histogram<u64>, from: u64, to: u64) -> anyhow::Result<()> {
    h.record((to.saturating_sub(from) / 1_000).max(1))?;
    Ok(())
}

/// The last message on `subject` in `stream`: the bench saw the sync end
/// on a core subscription, which can run a little ahead of the store.
async fn last_on(
    stream: &stream::Stream,
    subject: &str,
) -> anyhow::Result<jetstream::message::StreamMessage> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match stream.direct_get_last_for_subject(subject).await {
            Ok(m) => return Ok(m),
            Err(e) if tokio::time::Instant::now() > deadline => {
                anyhow::bail!("{subject} not readable from the events stream: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

fn hop_times(m: &jetstream::message::StreamMessage) -> HopTimes {
    m.headers
        .get(HOP_TIMES)
        .and_then(|v| HopTimes::from_header(v.as_str()))
        .unwrap_or_default()
}

/// The event that says `target` applied `key_id`: its `CloneApplied`, or
/// the `ClonesApplied` batch naming it (decision 21; one key at a time an
/// agent sends no batch, but one may still come: say a repair was queued
/// with it). A batch carries the hop times of its first command.
async fn applied_on(
    stream: &stream::Stream,
    subjects: &keysync_schemas::Subjects,
    key_id: &keysync_schemas::KeyId,
    target: &HsmId,
) -> anyhow::Result<jetstream::message::StreamMessage> {
    let single = subjects.clone_applied(key_id, target);
    let batch = subjects.clones_applied(target);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(m) = stream.direct_get_last_for_subject(&single).await {
            return Ok(m);
        }
        if let Ok(m) = stream.direct_get_last_for_subject(&batch).await {
            let names_it = decode::<Event>(&m.payload).is_ok_and(|e| {
                matches!(&e.body, Event::ClonesApplied(b) if b.applied.iter().any(|a| a.key_id == *key_id))
            });
            if names_it {
                return Ok(m);
            }
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("neither {single} nor a batch on {batch} naming the key is readable from the events stream");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// keysync's hops, one key at a time (a `logged` create on each HSM in
/// turn, then its clones to the others), `n` keys after a tenth as many
/// to warm up. Keyed as [`HOPS`], plus `sync` (`KeyCreated` stored →
/// `KeyReplicated` stored, the sum, as the orchestrator reports it).
pub(super) async fn keysync_hops(
    client: &Client,
    hsms: &[HsmId],
    key_type: KeyType,
    n: usize,
) -> anyhow::Result<serde_json::Value> {
    let events = jetstream::new(client.nats().clone())
        .get_stream(client.subjects().events_stream())
        .await?;
    let mut h: Vec<Histogram<u64>> = HOPS.iter().map(|_| histogram()).collect::<Result<_, _>>()?;
    let mut sync = histogram()?;
    // The last hop split at the orchestrator's receipt of the last
    // `CloneApplied` (on the `KeyReplicated` it answers with).
    let mut to_orchestrator = histogram()?;
    let mut orchestrator_to_stored = histogram()?;
    let mut missing = 0u64;
    for i in 0..n + n / 10 {
        let key_id = keysync_schemas::KeyId::new();
        let origin = &hsms[i % hsms.len()];
        let (mut sub, op) = super::bench::watched_create(client, key_id, key_type).await?;
        let t = Instant::now();
        client.request(&Route::Hsm(origin.clone()), op).await?;
        let create_us = (t.elapsed().as_micros() as u64).max(1);
        tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .context("KeyReplicated did not come within 10 s")?
            .context("subscription ended")?;
        if i < n / 10 {
            continue;
        }
        let subjects = client.subjects();
        let created = last_on(&events, &subjects.key_created(&key_id)).await?;
        let replicated = last_on(&events, &subjects.key_replicated(&key_id)).await?;
        let (t_created, t_replicated) = (stored_at(&created), stored_at(&replicated));
        h[0].record(create_us)?;
        record(&mut sync, t_created, t_replicated)?;
        let mut last_applied = 0u64;
        let mut orchestrator_seen = false;
        for target in hsms.iter().filter(|t| *t != origin) {
            let applied = applied_on(&events, subjects, &key_id, target).await?;
            let t_stored = stored_at(&applied);
            last_applied = last_applied.max(t_stored);
            let t_applied = decode::<Event>(&applied.payload)
                .map(|e: Envelope<Event>| e.emitted_at.as_nanos())
                .context("a CloneApplied in the events stream does not decode")?;
            let hops = hop_times(&applied);
            let (Some(o_recv), Some(decided), Some(c_stored), Some(a_recv)) = (
                hops.orchestrator_received,
                hops.orchestrator_decided,
                hops.command_stored,
                hops.agent_received,
            ) else {
                missing += 1;
                continue;
            };
            if !orchestrator_seen {
                // One receipt per key: every clone answers the same event.
                orchestrator_seen = true;
                record(&mut h[1], t_created, o_recv)?;
                record(&mut h[2], o_recv, decided)?;
            }
            record(&mut h[3], decided, c_stored)?;
            record(&mut h[4], c_stored, a_recv)?;
            record(&mut h[5], a_recv, t_applied)?;
            record(&mut h[6], t_applied, t_stored)?;
        }
        record(&mut h[7], last_applied, t_replicated)?;
        if let Some(o_recv) = hop_times(&replicated).orchestrator_received {
            record(&mut to_orchestrator, last_applied, o_recv)?;
            record(&mut orchestrator_to_stored, o_recv, t_replicated)?;
        }
    }
    let mut out = serde_json::Map::new();
    for ((key, _, _), h) in HOPS.iter().zip(&h) {
        out.insert((*key).into(), pct(h));
    }
    out.insert("sync".into(), pct(&sync));
    out.insert(
        "last_clone_applied_to_orchestrator".into(),
        pct(&to_orchestrator),
    );
    out.insert(
        "orchestrator_to_replicated_stored".into(),
        pct(&orchestrator_to_stored),
    );
    out.insert("clones_without_hop_times".into(), json!(missing));
    Ok(serde_json::Value::Object(out))
}

/// The bare JetStream hops keysync's ride on, `n` times each after a tenth
/// as many to warm up, on streams of their own:
/// - `publish_to_stored`: the bench's clock before a publish → the stored
///   time;
/// - `stored_to_consumer`: stored → received by an ordered pull consumer
///   (the orchestrator's kind);
/// - `stored_to_work_queue_consumer`: stored → received by a durable pull
///   consumer on a work-queue stream, explicit ack, the client's default
///   pull settings (the agent's kind);
/// - `relay`: stored → received → published → stored (a consumer that
///   answers one message with another, as the orchestrator answers the
///   last `CloneApplied` with `KeyReplicated`);
/// - `request_publish`: a request whose responder publishes to JetStream
///   and awaits the PubAck before replying (a `logged` create without the
///   key);
/// - `store_commit`: one 256-byte record committed to a redb file with its
///   default durability (fsync), as an agent stores a clone (no bus: the
///   floor of the apply, less its checks and crypto).
pub(super) async fn bare_hops(
    nats: &async_nats::Client,
    n: usize,
) -> anyhow::Result<serde_json::Value> {
    let js = jetstream::new(nats.clone());
    let (limits, queue) = ("KEYSYNC_BENCH_HOPS", "KEYSYNC_BENCH_HOPS_QUEUE");
    let _ = js.delete_stream(limits).await;
    let _ = js.delete_stream(queue).await;
    let s = js
        .create_stream(stream::Config {
            name: limits.into(),
            subjects: vec!["keysync-bench.hops.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let q = js
        .create_stream(stream::Config {
            name: queue.into(),
            subjects: vec!["keysync-bench.queue.>".into()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await?;
    let mut ordered = s
        .create_consumer(pull::OrderedConfig {
            filter_subject: "keysync-bench.hops.event".into(),
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    let durable: pull::Stream = q
        .create_consumer(pull::Config {
            durable_name: Some("bench-agent".into()),
            filter_subject: "keysync-bench.queue.cmd".into(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    let mut durable = durable.ready_chunks(512);
    let responder = {
        let mut sub = nats.subscribe("keysync-bench.hops.op").await?;
        let nats = nats.clone();
        let js = js.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if let Some(reply) = m
                    .reply
                    .filter(|r| keysync_security::reply::check(r).is_ok())
                {
                    if let Ok(ack) = js
                        .publish("keysync-bench.hops.created", m.payload.clone())
                        .await
                    {
                        let _ = ack.await;
                    }
                    let _ = nats.publish(reply, m.payload).await;
                }
            }
        })
    };
    nats.flush().await?;
    let payload = bytes::Bytes::from(vec![7u8; 400]);
    let names = [
        "publish_to_stored",
        "stored_to_consumer",
        "stored_to_work_queue_consumer",
        "relay",
        "request_publish",
        "store_commit",
    ];
    let mut h: Vec<Histogram<u64>> = names
        .iter()
        .map(|_| histogram())
        .collect::<Result<_, _>>()?;
    let dir = tempfile::tempdir()?;
    let db = std::sync::Arc::new(redb::Database::create(dir.path().join("bench.redb"))?);
    for i in 0..n + n / 10 {
        let keep = i >= n / 10;
        // Publish → stored, stored → ordered consumer, then the relay.
        let t_pub = now_ns();
        js.publish("keysync-bench.hops.event", payload.clone())
            .await?
            .await?;
        let ev = ordered.next().await.context("hop consumer ended")??;
        let t_recv = now_ns();
        let t0 = delivered_at(&ev)?;
        let ack = js
            .publish("keysync-bench.hops.done", payload.clone())
            .await?
            .await?;
        let t1 = stored_at(&s.get_raw_message(ack.sequence).await?);
        // Stored → received on the agent's kind of consumer.
        js.publish("keysync-bench.queue.cmd", payload.clone())
            .await?
            .await?;
        let batch = durable.next().await.context("queue consumer ended")?;
        let t_q_recv = now_ns();
        let mut t_q = 0;
        for m in batch {
            let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
            t_q = delivered_at(&m)?;
            m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        // A request answered after a JetStream publish is acknowledged.
        let t = Instant::now();
        nats.request("keysync-bench.hops.op", payload.clone())
            .await?;
        let rr_us = (t.elapsed().as_micros() as u64).max(1);
        let db2 = db.clone();
        let commit_us = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            const TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("bench");
            let t = Instant::now();
            let txn = db2.begin_write()?;
            txn.open_table(TABLE)?
                .insert(i as u64, [7u8; 256].as_slice())?;
            txn.commit()?;
            Ok((t.elapsed().as_micros() as u64).max(1))
        })
        .await??;
        if keep {
            h[5].record(commit_us)?;
            record(&mut h[0], t_pub, t0)?;
            record(&mut h[1], t0, t_recv)?;
            record(&mut h[2], t_q, t_q_recv)?;
            record(&mut h[3], t0, t1)?;
            h[4].record(rr_us)?;
        }
    }
    responder.abort();
    drop(ordered);
    drop(durable);
    let _ = js.delete_stream(limits).await;
    let _ = js.delete_stream(queue).await;
    let mut out = serde_json::Map::new();
    for (name, h) in names.iter().zip(&h) {
        out.insert((*name).into(), pct(h));
    }
    Ok(serde_json::Value::Object(out))
}

/// The `hops` object of `--json`: keysync's hops and the bare ones.
pub(super) async fn rows(
    client: &Client,
    hsms: &[HsmId],
    key_type: KeyType,
    n: usize,
) -> anyhow::Result<serde_json::Value> {
    let bare = bare_hops(client.nats(), n).await?;
    let keysync = keysync_hops(client, hsms, key_type, n).await?;
    Ok(json!({ "keys": n, "keysync": keysync, "bare": bare }))
}

/// The hop table of the human output.
pub(super) fn print(hops: &serde_json::Value) -> anyhow::Result<()> {
    let f = |v: &serde_json::Value| format!("{:.2}", v.as_f64().unwrap_or(0.0));
    outln!(
        "\n  {:<36} {:>7} {:>7}   {:<30} {:>7} {:>7}   (ms, {} keys one at a time)",
        "hop",
        "p50",
        "p99",
        "bare JetStream hop",
        "p50",
        "p99",
        hops["keys"]
    );
    for (key, label, bare) in HOPS {
        let k = &hops["keysync"][key];
        let (bare_label, b50, b99) = match bare {
            Some(b) => {
                let v = &hops["bare"][b];
                (b.replace('_', " "), f(&v["p50_ms"]), f(&v["p99_ms"]))
            }
            None => (
                "(the process's own work)".into(),
                String::new(),
                String::new(),
            ),
        };
        outln!(
            "  {:<36} {:>7} {:>7}   {:<30} {:>7} {:>7}",
            label,
            f(&k["p50_ms"]),
            f(&k["p99_ms"]),
            bare_label,
            b50,
            b99
        );
    }
    for (key, label, bare) in [
        (
            "last_clone_applied_to_orchestrator",
            "  of which: stored -> orchestrator",
            "stored_to_consumer",
        ),
        (
            "orchestrator_to_replicated_stored",
            "  orchestrator -> KeyReplicated",
            "publish_to_stored",
        ),
    ] {
        let (k, b) = (&hops["keysync"][key], &hops["bare"][bare]);
        outln!(
            "  {:<36} {:>7} {:>7}   {:<30} {:>7} {:>7}",
            label,
            f(&k["p50_ms"]),
            f(&k["p99_ms"]),
            bare.replace('_', " "),
            f(&b["p50_ms"]),
            f(&b["p99_ms"])
        );
    }
    let s = &hops["keysync"]["sync"];
    outln!(
        "  {:<36} {:>7} {:>7}",
        "sync (KeyCreated -> KeyReplicated)",
        f(&s["p50_ms"]),
        f(&s["p99_ms"])
    );
    Ok(())
}
