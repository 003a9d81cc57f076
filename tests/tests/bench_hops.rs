//! `keysync bench`'s per-hop table on real processes: the hop times travel
//! from the orchestrator (its receipt of a `KeyCreated`, on the commands it
//! publishes) through each agent (the command's decision, stored and
//! received times, on its `CloneApplied`) into the events stream, where the
//! bench reads them back; every clone of every key is timed.

use keysync_testkit::keysync_cli;

#[test]
fn the_hop_table_times_every_clone_beside_the_bare_hops() {
    let out = keysync_cli(&["bench", "--quick", "--hops-only", "--json"]);
    assert!(
        out.status.success(),
        "keysync bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    let hops = &doc["hops"];
    let keys = hops["keys"].as_u64().expect("hops.keys");
    let hsms = doc["hsms"].as_u64().expect("hsms");
    assert!(keys > 0);
    let k = &hops["keysync"];
    assert_eq!(
        k["clones_without_hop_times"], 0,
        "a CloneApplied without its hop times: {k}"
    );
    // One sample per key, or per clone (a key goes to every other HSM).
    let per_key = [
        "create_op",
        "event_stored_to_orchestrator",
        "orchestrator_handling",
        "last_clone_applied_to_replicated",
        "sync",
        // Split at the orchestrator's receipt, carried on KeyReplicated.
        "last_clone_applied_to_orchestrator",
        "orchestrator_to_replicated_stored",
    ];
    let per_clone = [
        "decided_to_command_stored",
        "command_stored_to_agent",
        "agent_apply",
        "applied_to_clone_applied_stored",
    ];
    for (names, count) in [(&per_key[..], keys), (&per_clone[..], keys * (hsms - 1))] {
        for name in names {
            assert_eq!(k[name]["count"].as_u64(), Some(count), "{name}: {k}");
            assert!(k[name]["p50_ms"].as_f64().is_some(), "{name}: {k}");
        }
    }
    for name in [
        "publish_to_stored",
        "stored_to_consumer",
        "stored_to_work_queue_consumer",
        "relay",
        "request_publish",
        "store_commit",
    ] {
        assert_eq!(
            hops["bare"][name]["count"].as_u64(),
            Some(keys),
            "{name}: {}",
            hops["bare"]
        );
    }
    // A hop cannot take longer than the sync it is part of (the largest
    // of them, by construction of the chain, is at most the sum).
    let sync_max = k["sync"]["max_ms"].as_f64().expect("sync max");
    for name in per_clone.iter().chain(&per_key[1..4]) {
        let max = k[name]["max_ms"].as_f64().expect("max");
        assert!(
            max <= sync_max + 0.01,
            "{name} max {max} > sync max {sync_max}"
        );
    }
}
