//! `keysync demo`: the newcomer's tour.
//!
//! Starts a local stack, creates keys on random HSMs, shows their sync
//! latency as the orchestrator measured it, kills the HSM that just created
//! a batch of keys, and shows that nothing was lost: every remaining HSM
//! holds the same keys with the same fingerprints.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::StreamExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use keysync::{Client, CreateKey, Route};
use keysync_harness::{DevStack, StackOptions};
use keysync_schemas::{decode, Event, Fingerprint, HsmId, KeyId, KeyType};

use super::Cli;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Keys created on random HSMs in the first round.
    #[arg(long, default_value_t = 300)]
    keys: usize,
    /// Keys created on the HSM that is then killed.
    #[arg(long, default_value_t = 50)]
    doomed_keys: usize,
    /// Creates in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Key types to cycle through (default: every type, mostly the fast ones).
    #[arg(long, value_delimiter = ',')]
    types: Vec<KeyType>,
    /// Number of HSMs (at least 2).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=16))]
    hsms: u16,
}

fn random_index(n: usize) -> usize {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b) as usize % n.max(1)
}

fn key_type_for(types: &[KeyType], i: usize) -> KeyType {
    if !types.is_empty() {
        return types[i % types.len()];
    }
    // Mostly fast key types, with every type present.
    match i % 10 {
        0 => KeyType::Rsa2048,
        1 | 4 | 7 => KeyType::Ed25519,
        2 | 5 | 8 => KeyType::P256,
        _ => KeyType::Aes256,
    }
}

fn ms(micros: u64) -> String {
    format!("{:.2} ms", micros as f64 / 1000.0)
}

async fn inventory(client: &Client, hsm: &HsmId) -> anyhow::Result<BTreeMap<KeyId, Fingerprint>> {
    Ok(client
        .list_keys(hsm)
        .await?
        .into_iter()
        .filter(|k| !k.session)
        .map(|k| (k.key_id, k.fingerprint))
        .collect())
}

/// Creates every key of `specs`, `concurrency` at a time, handing each to
/// `each` as it returns.
async fn create_all(
    client: &Client,
    specs: impl Iterator<Item = CreateKey>,
    concurrency: u16,
    mut each: impl FnMut(keysync::CreatedKey),
) -> anyhow::Result<()> {
    let mut creates = futures::stream::iter(specs)
        .map(|spec| {
            let client = client.clone();
            async move { client.create_key(spec).await }
        })
        .buffer_unordered(usize::from(concurrency));
    while let Some(k) = creates.next().await {
        each(k?);
    }
    Ok(())
}

pub async fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let n = usize::from(args.hsms);
    outln!("keysync demo: {n} HSMs kept in sync through NATS JetStream\n");

    let t = Instant::now();
    out!("[1/5] Starting a local stack: nats-server, orchestrator, {n} HSM agents ... ");
    let mut stack = DevStack::start(StackOptions {
        hsms: n,
        subjects: cli.subjects()?,
        ..Default::default()
    })
    .await
    .context("starting the local stack")?;
    outln!(
        "ready in {:.1} s at {}",
        t.elapsed().as_secs_f64(),
        stack.url()
    );
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();

    // Every KeyReplicated, with the latency the orchestrator measured.
    let mut replicated = client
        .nats()
        .subscribe(client.subjects().all_replicated())
        .await?;
    client.nats().flush().await?;

    outln!(
        "[2/5] Creating {} token keys (P-256, Ed25519, AES-256, RSA-2048) on random HSMs, durability logged",
        args.keys
    );
    let bar = ProgressBar::new(args.keys as u64).with_style(
        ProgressStyle::with_template("      {bar:40} {pos}/{len} keys {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t = Instant::now();
    let mut expected: BTreeMap<KeyId, Fingerprint> = BTreeMap::new();
    let specs = (0..args.keys).map(|i| {
        CreateKey::new(key_type_for(&args.types, i)).on(Route::Hsm(hsms[random_index(n)].clone()))
    });
    create_all(&client, specs, args.concurrency, |k| {
        expected.insert(k.info.key_id, k.info.fingerprint);
        bar.inc(1);
    })
    .await?;
    bar.finish_and_clear();
    let created_in = t.elapsed();

    let mut latency = Histogram::<u64>::new(3)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while (latency.len() as usize) < args.keys {
        match tokio::time::timeout_at(deadline, replicated.next()).await {
            Ok(Some(msg)) => {
                if let Ok(env) = decode::<Event>(&msg.payload) {
                    if let Event::KeyReplicated(r) = env.body {
                        if expected.contains_key(&r.key_id) {
                            latency.record(r.sync_latency_micros.max(1))?;
                        }
                    }
                }
            }
            _ => bail!(
                "only {} of {} keys were reported replicated within 30 s",
                latency.len(),
                args.keys
            ),
        }
    }
    let all_in = t.elapsed();
    outln!(
        "      {} keys created in {:.2} s ({:.0} keys/s), all replicated to {n} HSMs {:.2} s after the first create",
        args.keys,
        created_in.as_secs_f64(),
        args.keys as f64 / created_in.as_secs_f64(),
        all_in.as_secs_f64()
    );
    outln!(
        "      sync latency (KeyCreated stored -> last HSM applied): p50 {}  p90 {}  p99 {}  max {}",
        ms(latency.value_at_quantile(0.5)),
        ms(latency.value_at_quantile(0.9)),
        ms(latency.value_at_quantile(0.99)),
        ms(latency.max())
    );

    let doomed = hsms[n - 1].clone();
    outln!(
        "[3/5] {doomed} creates {} more keys, then is killed with SIGKILL right after the last create returns",
        args.doomed_keys
    );
    let mut born_on_doomed = Vec::new();
    let specs = (0..args.doomed_keys)
        .map(|i| CreateKey::new(key_type_for(&args.types, i + 1)).on(Route::Hsm(doomed.clone())));
    create_all(&client, specs, args.concurrency, |k| {
        expected.insert(k.info.key_id, k.info.fingerprint);
        born_on_doomed.push(k.info.key_id);
    })
    .await?;
    let killed_at = Instant::now();
    stack.kill_agent(&doomed);
    outln!(
        "      {doomed} killed; every create had returned only after its KeyCreated was stored in JetStream"
    );

    let survivors: Vec<HsmId> = hsms[..n - 1].to_vec();
    outln!(
        "[4/5] Waiting for {} to hold every key ...",
        survivors
            .iter()
            .map(|h| h.as_str())
            .collect::<Vec<_>>()
            .join(" and ")
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut inventories = BTreeMap::new();
    for h in &survivors {
        loop {
            let inv = inventory(&client, h).await?;
            if inv == expected {
                inventories.insert(h.clone(), inv);
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{h} holds {} keys, expected {}: keys were lost",
                    inv.len(),
                    expected.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    outln!(
        "      every survivor holds all {} keys with identical fingerprints, {:.0} ms after the kill;",
        expected.len(),
        killed_at.elapsed().as_secs_f64() * 1000.0
    );
    outln!(
        "      all {} keys born on {doomed} survived its death",
        born_on_doomed.len()
    );

    outln!("[5/5] Restarting {doomed} from its own store ...");
    stack.start_agents(std::slice::from_ref(&doomed)).await?;
    let inv = inventory(&client, &doomed).await?;
    if inv != expected {
        bail!(
            "{doomed} came back with {} keys, expected {}",
            inv.len(),
            expected.len()
        );
    }
    inventories.insert(doomed.clone(), inv);
    outln!("      {doomed} is back with all {} keys\n", expected.len());

    outln!("Summary");
    outln!("  {:<8} {:>6}  fingerprints", "HSM", "keys");
    for (h, inv) in &inventories {
        outln!(
            "  {:<8} {:>6}  {}",
            h.as_str(),
            inv.len(),
            if *inv == expected {
                "identical"
            } else {
                "DIFFERENT"
            }
        );
    }
    outln!(
        "  sync latency p50 {} / p99 {} over {} keys; 0 keys lost after an HSM was killed",
        ms(latency.value_at_quantile(0.5)),
        ms(latency.value_at_quantile(0.99)),
        latency.len()
    );
    outln!(
        "\nNext: `keysync dev` runs this stack for you to use (`keysync --nats URL key create --type p256 --json`)."
    );
    stack.shutdown().await;
    Ok(())
}
