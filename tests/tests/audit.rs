//! The hash-chained audit log on a real cluster: it verifies; every kind of
//! tampering (a record removed, inserted, edited through a copy, reordered,
//! forged at the end) is found at the right sequence; replay rebuilds the
//! cluster as it was at three points.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use keysync::{CreateKey, Route};
use keysync_schemas::{
    decode, encode, AuditFact, AuditRecord, Durability, Envelope, KeyType, Source,
};
use keysync_testkit::{hsm, keysync_cli, start_stack, wait_until};

async fn payloads(js: &jetstream::Context, name: &str) -> Vec<bytes::Bytes> {
    let s = js.get_stream(name).await.expect("stream");
    let consumer = s
        .create_consumer(pull::OrderedConfig::default())
        .await
        .expect("consumer");
    let mut msgs = consumer.messages().await.expect("messages");
    let mut out = Vec::new();
    while let Some(m) = msgs.next().await {
        let m = m.expect("message");
        let pending = m.info().expect("info").pending;
        out.push(m.payload.clone());
        if pending == 0 {
            break;
        }
    }
    out
}

async fn copy(js: &jetstream::Context, name: &str, records: &[bytes::Bytes]) {
    let subject = format!("copy.{}", name.to_lowercase());
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![subject.clone()],
        allow_direct: true,
        ..Default::default()
    })
    .await
    .expect("copy stream");
    for r in records {
        js.publish(subject.clone(), r.clone())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
}

fn record(payload: &[u8]) -> AuditRecord {
    decode::<AuditRecord>(payload).expect("audit record").body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_verifies_finds_tampering_and_replays() {
    let stack = start_stack(3).await;
    let url = stack.url();
    let client = stack.client().clone();
    let cli = |args: &[&str]| {
        let mut all = vec!["--nats", url.as_str(), "audit"];
        all.extend_from_slice(args);
        keysync_cli(&all)
    };
    let all = |t| {
        CreateKey::new(t)
            .on(Route::Hsm(hsm("hsm-1")))
            .durability(Durability::All)
    };
    let k1 = client.create_key(all(KeyType::P256)).await.expect("k1");
    let k2 = client.create_key(all(KeyType::Ed25519)).await.expect("k2");
    client
        .delete_key(k1.info.key_id, &Route::Hsm(hsm("hsm-2")))
        .await
        .expect("delete k1");
    let k3 = client.create_key(all(KeyType::Aes256)).await.expect("k3");

    // Wait until the chain has caught up with the events stream.
    let js = jetstream::new(client.nats().clone());
    let audit_stream = client.subjects().audit_stream();
    let caught_up = wait_until(Duration::from_secs(20), || async {
        let events_last = js
            .get_stream(client.subjects().events_stream())
            .await
            .expect("events")
            .info()
            .await
            .map(|i| i.state.last_sequence)
            .unwrap_or(0);
        match js.get_stream(&audit_stream).await {
            Ok(mut s) => {
                let last = s.info().await.map(|i| i.state.last_sequence).unwrap_or(0);
                last > 0
                    && s.direct_get(last)
                        .await
                        .is_ok_and(|m| record(&m.payload).event_seq >= events_last)
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(caught_up, "the audit chain did not catch up");

    let ok = cli(&["verify"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let records = payloads(&js, &audit_stream).await;
    let n = records.len();
    assert!(String::from_utf8_lossy(&ok.stdout).contains(&format!("intact: {n} records")));
    // Nothing secret in a record: no wrapped material, no key bytes.
    let export = cli(&["export", "--json"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), n);
    assert_eq!(lines[0]["seq"], 1);
    assert!(lines.iter().all(|l| l.get("error").is_none()));

    let broken_at = |stream: &str| {
        let out = cli(&["verify", "--stream", stream]);
        assert_eq!(out.status.code(), Some(1), "{stream} verified");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let seq: u64 = err
            .split("broken at record ")
            .nth(1)
            .and_then(|r| r.split(':').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no sequence in {err}"));
        (seq, err)
    };

    // Inserted: a forged record between 2 and 3.
    let mut forged = record(&records[2]);
    forged.prev_hash = [7; 32];
    let forged = bytes::Bytes::from(
        encode(&Envelope::new(Source::Client("mallory".into()), forged)).expect("encode"),
    );
    let mut inserted = records.clone();
    inserted.insert(2, forged.clone());
    copy(&js, "TAMPER_INSERTED", &inserted).await;
    assert_eq!(broken_at("TAMPER_INSERTED").0, 3);

    // Edited, rewritten through a copy: record 3 says another HSM created it.
    let mut edited = record(&records[2]);
    if let AuditFact::HsmJoined { hsm: h } | AuditFact::KeyCreated { hsm: h, .. } = &mut edited.fact
    {
        *h = hsm("hsm-9");
    } else {
        edited.event_time_ns += 1;
    }
    let mut rewritten = records.clone();
    rewritten[2] = encode(&Envelope::new(Source::Client("mallory".into()), edited))
        .expect("encode")
        .into();
    copy(&js, "TAMPER_EDITED", &rewritten).await;
    let (seq, why) = broken_at("TAMPER_EDITED");
    assert_eq!(seq, 4, "{why}");

    // Reordered: 3 and 4 swapped.
    let mut reordered = records.clone();
    reordered.swap(2, 3);
    copy(&js, "TAMPER_REORDERED", &reordered).await;
    assert_eq!(broken_at("TAMPER_REORDERED").0, 3);

    // Forged at the end.
    let mut appended = records.clone();
    let mut tail = record(&records[n - 1]);
    tail.chain_seq = n as u64 + 1;
    appended.push(
        encode(&Envelope::new(Source::Client("mallory".into()), tail))
            .expect("encode")
            .into(),
    );
    copy(&js, "TAMPER_APPENDED", &appended).await;
    assert_eq!(broken_at("TAMPER_APPENDED").0, n as u64 + 1);

    // Replay at three points: k1 and k2 replicated; k1 deleted; the end.
    let seq_of = |pred: &dyn Fn(&AuditFact) -> bool| {
        records
            .iter()
            .map(|p| record(p))
            .find(|r| pred(&r.fact))
            .unwrap_or_else(|| panic!("no such record"))
    };
    let a = seq_of(
        &|f| matches!(f, AuditFact::KeyReplicated { key_id, .. } if *key_id == k2.info.key_id),
    );
    let b =
        seq_of(&|f| matches!(f, AuditFact::KeyDeleted { key_id, .. } if *key_id == k1.info.key_id));
    let keys_at = |until: &str| -> Vec<(String, usize)> {
        let out = cli(&["replay", "--until", until, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        doc["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| {
                (
                    k["key_id"].as_str().unwrap_or_default().to_string(),
                    k["hsms"].as_array().map_or(0, |h| h.len()),
                )
            })
            .collect()
    };
    let id = |k: &keysync::CreatedKey| k.info.key_id.to_string();
    let mut want_a = vec![(id(&k1), 3), (id(&k2), 3)];
    want_a.sort();
    assert_eq!(keys_at(&a.chain_seq.to_string()), want_a);
    let at_time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(a.event_time_ns))
        .expect("time")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format");
    assert_eq!(keys_at(&at_time), want_a, "replay by time");
    assert_eq!(keys_at(&b.chain_seq.to_string()), vec![(id(&k2), 3)]);
    let mut want_c = vec![(id(&k2), 3), (id(&k3), 3)];
    want_c.sort();
    assert_eq!(keys_at(&(n as u64).to_string()), want_c);

    // Removed: delete a record from the real stream.
    js.get_stream(&audit_stream)
        .await
        .expect("stream")
        .delete_message(3)
        .await
        .expect("delete");
    let out = cli(&["verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("record 3 is missing"));
}
