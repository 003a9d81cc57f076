//! `keysync bench`'s lifecycle rows: what the CloudEvents mirror costs.
//!
//! The same throughput run on two fresh stacks, one whose orchestrator
//! mirrors lifecycle facts into `KEYSYNC_LIFECYCLE` (the default) and one
//! started with `--lifecycle-stream off`; and, with it on, how long after
//! the last key was replicated the mirror had stored it too.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use keysync_harness::{DevStack, StackOptions};
use keysync_schemas::lifecycle::CloudEvent;
use keysync_schemas::{KeyType, Subjects};
use serde_json::json;

/// The events-stream sequence the lifecycle stream's last event mirrors
/// (0: none yet).
async fn mirrored_upto(js: &jetstream::Context, subjects: &Subjects) -> u64 {
    let Ok(mut s) = js.get_stream(subjects.lifecycle_stream()).await else {
        return 0;
    };
    let Ok(last) = s.info().await.map(|i| i.state.last_sequence) else {
        return 0;
    };
    match s.direct_get(last).await {
        Ok(m) => serde_json::from_slice::<CloudEvent<serde_json::Value>>(&m.payload)
            .ok()
            .and_then(|ce| ce.keysyncseq.parse().ok())
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// Throughput with the mirror off, then on; the mirror's lag at the end.
pub async fn rows(
    subjects: &Subjects,
    hsms: usize,
    keys: usize,
    in_flight: usize,
) -> anyhow::Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    for (name, flag) in [("mirror_off", "off"), ("mirror_on", "on")] {
        let stack = DevStack::start(StackOptions {
            hsms,
            subjects: subjects.clone(),
            orchestrator_args: vec!["--lifecycle-stream".into(), flag.into()],
            ..Default::default()
        })
        .await?;
        let client = stack.client().clone();
        let ids = stack.hsm_ids();
        let (created, replicated) =
            super::bench::throughput(&client, &ids, KeyType::Ed25519, keys, in_flight).await?;
        let mut row = json!({
            "created_per_s": created.round() as u64,
            "replicated_per_s": replicated.round() as u64,
        });
        if flag == "on" {
            // Every fact of the run is a lifecycle fact (created, applied,
            // replicated): the mirror is done when it mirrors the last.
            let js = jetstream::new(client.nats().clone());
            let events_last = js
                .get_stream(subjects.events_stream())
                .await?
                .info()
                .await?
                .state
                .last_sequence;
            let t = Instant::now();
            let deadline = t + Duration::from_secs(60);
            while mirrored_upto(&js, subjects).await < events_last && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let stored = js
                .get_stream(subjects.lifecycle_stream())
                .await?
                .info()
                .await?
                .state
                .messages;
            row["lag_after_last_replicated_ms"] = json!(t.elapsed().as_millis() as u64);
            row["lifecycle_events"] = json!(stored);
        }
        out.insert(name.into(), row);
        stack.shutdown().await;
    }
    let ratio = |k: &str| {
        let on = out["mirror_on"][k].as_f64().unwrap_or(0.0);
        let off = out["mirror_off"][k].as_f64().unwrap_or(0.0);
        if off > 0.0 {
            (on / off * 100.0).round() / 100.0
        } else {
            0.0
        }
    };
    let (c, r) = (ratio("created_per_s"), ratio("replicated_per_s"));
    out.insert("keys".into(), json!(keys));
    out.insert("on_to_off_created".into(), json!(c));
    out.insert("on_to_off_replicated".into(), json!(r));
    Ok(serde_json::Value::Object(out))
}
