//! `keysync bench --quick --json` keeps the keys scripts read (issue 17's
//! "Done when"): one run of the whole quick bench on real processes, and
//! every figure the README's target table quotes is present and a number.
//! The rows' own consistency is held by `bench_hops`, `bench_throughput`
//! and `bench_cluster`; this test holds the document's shape.

use keysync_testkit::keysync_cli;
use serde_json::Value;

/// The number at `path` (keys separated by `/`, array indices as numbers).
fn number(doc: &Value, path: &str) -> f64 {
    let v = path.split('/').fold(doc, |v, k| match k.parse::<usize>() {
        Ok(i) if v.is_array() => &v[i],
        _ => &v[k],
    });
    v.as_f64()
        .unwrap_or_else(|| panic!("bench --quick --json: {path} is not a number: {v}"))
}

#[test]
fn the_quick_bench_document_keeps_every_key_the_targets_are_read_from() {
    let out = keysync_cli(&["bench", "--quick", "--json"]);
    assert!(
        out.status.success(),
        "keysync bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(doc["quick"], true);
    for path in [
        "hsms",
        "machine/cores",
        // Latency and its ratio to the floor measured in the same run.
        "floor/p50_ms",
        "floor/p99_ms",
        "sync_latency/p50_ms",
        "sync_latency/p99_ms",
        "ratio_to_floor/p50",
        "ratio_to_floor/p99",
        "create_latency/none/p50_ms",
        "create_latency/all/p50_ms",
        "hops/keys",
        // Throughput, the bus ceiling, CPU and stored messages per key.
        "throughput/replicated_per_s",
        "throughput/bus_ceiling_keys_per_s",
        "cpu_per_key/total_us_per_key",
        "cpu_per_key/stored_messages_per_key/total",
        // Bootstrap, replay and its floor, memory.
        "bootstrap/seconds_to_in_service",
        "bootstrap/orchestrator/fold_state_bytes_per_key",
        "bootstrap/orchestrator/rss_bytes_per_key",
        "recovery/seconds_full_replay",
        "recovery/seconds_from_snapshot",
        "recovery/seconds_bare_consumer",
        "memory/index_bytes_per_key",
        // Scaling, the durable bus, the large cluster, the mirror.
        "scaling/0/ratio_to_floor/p50",
        "scaling/1/replicated_per_s",
        "sync_interval/always/replicated_per_s",
        "sync_interval/default/replicated_per_s",
        "cluster/join/seconds_to_in_service",
        "lifecycle/on_to_off_replicated",
    ] {
        number(&doc, path);
    }
    let sizes: Vec<f64> = (0..2)
        .map(|i| number(&doc, &format!("scaling/{i}/hsms")))
        .collect();
    assert_eq!(sizes, [3.0, 5.0], "the quick scaling sizes");
    assert!(number(&doc, "sync_latency/p50_ms") > 0.0);
    assert!(number(&doc, "throughput/replicated_per_s") > 0.0);
}
