//! `keysync bench --throughput-only` on real processes, at the `--quick`
//! size: the CPU every process spends per replicated key, and the messages
//! the stack stored per key in each stream, read from JetStream. Under 64
//! creates in flight, batching (decision 21) must show: fewer stored
//! messages per key than one per fact (4n+2 = 14 at 3 HSMs).

use keysync_testkit::keysync_cli;

#[test]
fn the_throughput_run_reports_cpu_and_fewer_stored_messages_per_key_than_facts() {
    let out = keysync_cli(&[
        "bench",
        "--quick",
        "--throughput-only",
        "--sync-interval",
        "none",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "keysync bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    let cpu = &doc["cpu_per_key"];
    let total_us = cpu["total_us_per_key"].as_f64().expect("total CPU per key");
    assert!(total_us > 0.0, "no CPU counted: {cpu}");
    let m = &cpu["stored_messages_per_key"];
    let get = |k: &str| {
        m[k].as_f64()
            .unwrap_or_else(|| panic!("stored_messages_per_key.{k} is not a number: {m}"))
    };
    // Every key stores its KeyCreated and its KeyReplicated, each audited
    // and mirrored: at least 2 in events, 2 in the audit chain, and with
    // the applied facts at least 4 lifecycle events (one per fact, by
    // design: consumers filter by key).
    assert!(get("events") >= 2.0, "events per key: {m}");
    assert!(get("audit") >= 2.0, "audit records per key: {m}");
    assert!(get("lifecycle") >= 4.0, "lifecycle events per key: {m}");
    // Batched under load: clone commands and applied announcements far
    // below one per clone (2 each a key at 3 HSMs), the total below 4n+2.
    assert!(
        get("commands") < 1.0,
        "clone commands were not batched: {m}"
    );
    assert!(
        get("events") < 3.0,
        "applied announcements were not batched: {m}"
    );
    let total = get("total");
    assert!(total < 14.0, "no fewer messages than facts: {m}");
    let sum = get("events") + get("commands") + get("audit") + get("lifecycle");
    assert!((sum - total).abs() < 0.05, "the streams do not add up: {m}");
}
