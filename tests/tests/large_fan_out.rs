//! A member joining a cluster of 20,000 keys: the orchestrator carries out
//! the fan-out a window per turn of its loop (decision 23), so meanwhile it
//! answers status promptly, hears heartbeats, and declares no busy member
//! failed. Carried out in one go, the fan-out held the loop for its whole
//! length (15–35 s at 100,000 keys in release), and the members it could
//! not hear from were declared failed when it ended.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use keysync_testkit::{fast_options, hsm, wait_until, DevStack};

const KEYS: usize = 20_000;

/// `HsmFailed` events in the log for `members`.
async fn failures(client: &keysync::Client, members: &[&str]) -> usize {
    let js = async_nats::jetstream::new(client.nats().clone());
    let stream = js
        .get_stream(client.subjects().events_stream())
        .await
        .expect("events stream");
    let mut counts = stream
        .info_with_subjects(format!("{}.evt.hsm.*.failed", client.subjects().prefix()))
        .await
        .expect("subjects");
    let mut n = 0;
    while let Some(c) = counts.next().await {
        let (subject, count) = c.expect("subject count");
        if members.iter().any(|m| subject.contains(&format!(".{m}."))) {
            n += count;
        }
    }
    n
}

async fn holds(client: &keysync::Client, id: &keysync_schemas::HsmId, n: u64) -> bool {
    client
        .cluster_status()
        .await
        .is_ok_and(|s| s.members.iter().any(|m| &m.hsm_id == id && m.keys >= n))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_bootstrapping_20000_keys_does_not_stall_the_orchestrator() {
    // Heartbeats every 0.25 s; a 20 s failure timeout: a debug agent
    // applying 20,000 clones on a loaded 2-core machine was seen silent
    // for 6.8 s (its own scheduling, not the orchestrator's loop), and the
    // test is about the orchestrator.
    let mut options = fast_options(0);
    options.orchestrator_args = ["--lease-ttl", "1", "--failure-timeout", "20"]
        .map(String::from)
        .to_vec();
    let mut stack = DevStack::start(options).await.expect("stack");
    let client = stack.client().clone();
    let last = keysync_harness::seed::seed_keys(&stack, KEYS, true)
        .await
        .expect("seeded");
    let folded = wait_until(Duration::from_secs(300), || async {
        client
            .cluster_status()
            .await
            .is_ok_and(|s| s.last_seq >= last)
    })
    .await;
    assert!(folded, "the orchestrator did not fold the seeded log");
    let h1 = hsm("hsm-1");
    stack
        .start_agents(std::slice::from_ref(&h1))
        .await
        .expect("hsm-1 joins");
    let n = KEYS as u64;
    assert!(
        wait_until(Duration::from_secs(600), || holds(&client, &h1, n)).await,
        "hsm-1 did not catch up"
    );

    // hsm-2 joins: its 20,000 clones are sent while we keep asking for
    // the status, as an operator's dashboard would. An answer that shows
    // hsm-2 joined and still lacking keys, received before the fan-out's
    // last command was stored, was served *during* the fan-out: carried
    // out in one go, the fan-out left no such answer.
    let h2 = hsm("hsm-2");
    stack
        .start_agents(std::slice::from_ref(&h2))
        .await
        .expect("hsm-2 joins");
    let started = Instant::now();
    let (mut calls, mut slowest) = (0u32, Duration::ZERO);
    let mut during: Vec<i128> = Vec::new();
    loop {
        let t = Instant::now();
        let status = client.cluster_status().await;
        slowest = slowest.max(t.elapsed());
        calls += 1;
        let keys = status
            .ok()
            .and_then(|s| s.members.iter().find(|m| m.hsm_id == h2).map(|m| m.keys));
        match keys {
            Some(k) if k >= n => break,
            Some(_) => during.push(time::OffsetDateTime::now_utc().unix_timestamp_nanos()),
            None => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "hsm-2 did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let js = async_nats::jetstream::new(client.nats().clone());
    let last_command = js
        .get_stream(client.subjects().commands_stream())
        .await
        .expect("commands stream")
        .info()
        .await
        .expect("info")
        .state
        .last_timestamp
        .unix_timestamp_nanos();
    let served_during = during.iter().filter(|t| **t < last_command).count();
    // The fan-out really was large enough to be queued.
    let log = std::fs::read_to_string(stack.dir().join("logs/orchestrator.log"))
        .expect("orchestrator log");
    let notable: Vec<&str> = log
        .lines()
        .filter(|l| {
            ["anti-entropy", "slow", "failed", "fan-out"]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect();
    assert!(
        log.contains("large fan-out queued"),
        "the bootstrap was not queued: {notable:#?}"
    );
    assert!(
        served_during >= 3,
        "{served_during} status answers while the fan-out was being sent ({calls} calls, slowest {slowest:?}): {notable:#?}"
    );
    // Heartbeats were heard all along: no member was declared failed.
    assert_eq!(
        failures(&client, &["hsm-1", "hsm-2"]).await,
        0,
        "{notable:#?}"
    );
    println!(
        "bootstrap of {KEYS} keys: {:.1} s, {calls} status calls ({served_during} during the fan-out), slowest {slowest:?}",
        started.elapsed().as_secs_f64()
    );
    stack.shutdown().await;
}
