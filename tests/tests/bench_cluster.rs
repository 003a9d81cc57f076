//! `keysync bench`'s large-cluster rows on real processes, at the
//! `--quick` size: a seeded log, three HSMs bootstrapped from it, a fourth
//! joining, `keysync cluster status` through the binary, an anti-entropy
//! round after a member lost keys behind its agent's back (timed by the
//! orchestrator's `keysync_anti_entropy_round_seconds`), the snapshot and
//! a restart from it, and memory. Every row is present, numeric and
//! consistent with what was staged.

use keysync_testkit::keysync_cli;

fn num(v: &serde_json::Value, path: &str) -> f64 {
    let mut at = v;
    for part in path.split('.') {
        at = &at[part];
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number: {at} in {v}"))
}

#[test]
fn the_cluster_rows_measure_a_bootstrapped_cluster_and_repair_a_staged_drift() {
    let out = keysync_cli(&["bench", "--quick", "--only", "cluster", "--json"]);
    assert!(
        out.status.success(),
        "keysync bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    let c = &doc["cluster"];
    let keys = num(c, "keys");
    assert_eq!(keys, 2000.0, "--quick's size: {c}");
    assert_eq!(num(c, "hsms"), 3.0);
    for path in [
        "seed.seconds_published",
        "seed.events_per_s",
        "seed.seconds_folded",
        "build.seconds_to_in_service",
        "build.key_copies_per_s",
        "build.cpu_us_per_key_copy",
        "join.seconds_to_in_service",
        "join.keys_per_s",
        "join.cpu_us_per_key",
        "status.cli_p50_ms",
        "status.sdk_p50_ms",
        "status.reply_bytes",
        "anti_entropy.round_seconds",
        "anti_entropy.seconds_restart_to_repaired",
        "snapshot.bytes",
        "snapshot.restart_seconds",
    ] {
        assert!(num(c, path) > 0.0, "{path} = 0: {c}");
    }
    // The status reply does not grow with the keys: far from NATS's
    // 1 MiB payload limit.
    assert!(num(c, "status.reply_bytes") < 64.0 * 1024.0, "{c}");
    // The drift was staged (1 % of the keys gone from hsm-2's store), and
    // repaired by at least one round the orchestrator counted.
    let ae = &c["anti_entropy"];
    assert_eq!(num(c, "anti_entropy.keys_lost"), keys / 100.0, "{ae}");
    assert!(num(c, "anti_entropy.rounds") >= 1.0, "{ae}");
    assert!(
        num(c, "anti_entropy.seconds_restart_to_repaired")
            >= num(c, "anti_entropy.seconds_restart_to_round_done") - 1.5,
        "{ae}"
    );
    // A snapshot covers every key: at least its id and fingerprint.
    assert!(num(c, "snapshot.bytes") >= keys * 48.0, "{c}");
    for (name, mb) in c["rss_mb"].as_object().expect("rss_mb") {
        assert!(mb.as_f64().is_some_and(|m| m > 1.0), "{name}: {mb}");
    }
    let stores = c["disk_mb"]["agent_stores"].as_object().expect("stores");
    assert_eq!(stores.len(), 4, "{stores:?}");
    assert!(stores.values().all(|m| m.as_f64().is_some_and(|m| m > 0.0)));
}
