//! Attack: the log keeps junk and resurrected material (issue 12, attack
//! 5), on real processes.
//!
//! Anyone who may publish on an event subject can store bytes in
//! `KEYSYNC_EVENTS`: the orchestrator rejects them, but they used to stay
//! in the stream for good. And a `KeyCreated` replayed after its key was
//! deleted (JetStream forgets a purged message's id when it restarts) was
//! stored again with its wrapped material, although the delete had purged
//! it (crypto-shredding).

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use keysync_schemas::KeyId;
use keysync_testkit::{
    assert_converges, count_events, create, create_many, delete_with_cli, hsm, inventory,
    start_stack, wait_for_heartbeats, wait_settled, wait_until,
};

/// The events stream's message count and bytes.
async fn stream_size(js: &jetstream::Context, name: &str) -> (u64, u64) {
    let mut s = js
        .get_stream(name)
        .await
        .unwrap_or_else(|e| panic!("stream {name}: {e}"));
    let info = s
        .info()
        .await
        .unwrap_or_else(|e| panic!("stream {name} info: {e}"));
    (info.state.messages, info.state.bytes)
}

/// Runs the `keysync` CLI off the runtime's threads.
/// A deterministic byte stream, for junk that does not compress away.
fn noise(seed: u64, n: usize) -> Bytes {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_and_oversized_messages_on_event_subjects_do_not_stay_in_the_log() {
    let stack = start_stack(3).await;
    let client = stack.client().clone();
    let subjects = client.subjects().clone();
    let hsms = stack.hsm_ids();
    let keys = create_many(&client, &hsms, 6, 3).await;
    assert_converges(&client, &hsms, &keys, Duration::from_secs(20)).await;
    let settled = wait_settled(&client, keys.len() as u64, Duration::from_secs(20)).await;
    assert!(settled, "the cluster did not settle");
    let js = jetstream::new(client.nats().clone());
    let events = subjects.events_stream();
    // What keysync itself stored (the last KeyReplicated may still be on
    // its way: wait until the stream stops growing).
    let mut baseline = stream_size(&js, &events).await;
    let mut stable = false;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = stream_size(&js, &events).await;
        stable = now == baseline;
        baseline = now;
        if stable {
            break;
        }
    }
    assert!(stable, "the events stream kept growing: {baseline:?}");

    // The attack: 200 junk messages of about 1 KB and 60 of 100 KB (under
    // the 128 KiB message limit) on event subjects of every kind.
    let attacker = async_nats::ConnectOptions::new()
        .name("attacker")
        .connect(stack.url())
        .await
        .unwrap_or_else(|e| panic!("the attacker connects: {e}"));
    let ajs = jetstream::new(attacker);
    let real: Vec<KeyId> = keys.keys().copied().collect();
    let p = subjects.prefix();
    let subject_for = |i: usize| -> String {
        let k = real[i % real.len()];
        match i % 5 {
            0 => format!("{p}.evt.key.{}.created", KeyId::new()),
            1 => format!("{p}.evt.key.{k}.applied.hsm-2"),
            2 => format!("{p}.evt.key.{k}.replicated"),
            3 => format!("{p}.evt.hsm.hsm-9.joined"),
            _ => format!("{p}.evt.key.{k}.deleted"),
        }
    };
    let (mut stored, mut refused, mut stored_bytes) = (0u64, 0u64, 0u64);
    for i in 0..260 {
        let size = if i < 200 { 1_000 } else { 100_000 };
        let payload = noise(i as u64 + 1, size);
        let outcome = match ajs.publish(subject_for(i), payload).await {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(_) => {
                stored += 1;
                stored_bytes += size as u64;
            }
            Err(_) => refused += 1,
        }
    }
    let after_flood = stream_size(&js, &events).await;
    println!(
        "junk: {stored} stored ({stored_bytes} bytes of payload), {refused} refused by the stream; events stream {baseline:?} before, {after_flood:?} right after"
    );
    assert!(
        stored >= 200,
        "the small junk was not stored ({stored} stored): the attack was not performed"
    );

    // Then the stream holds only what keysync itself stored.
    let cleaned = wait_until(Duration::from_secs(30), || async {
        stream_size(&js, &events).await == baseline
    })
    .await;
    let now = stream_size(&js, &events).await;
    assert!(
        cleaned,
        "30 s after the junk, the events stream holds {now:?} (messages, bytes); keysync itself stored {baseline:?}"
    );
    // And the cluster still works.
    let more = create_many(&client, &hsms, 3, 3).await;
    let mut all = keys.clone();
    all.extend(more);
    assert_converges(&client, &hsms, &all, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_key_created_after_a_delete_leaves_nothing_stored() {
    let mut stack = start_stack(3).await;
    let client = stack.client().clone();
    let subjects = client.subjects().clone();
    let hsms = stack.hsm_ids();
    let creator = hsm("hsm-1");
    let key = create(&client, keysync_schemas::KeyType::P256, &creator).await;
    let key_id = key.info.key_id;
    let created_seq = key
        .created_seq
        .unwrap_or_else(|| panic!("a logged create has a sequence"));
    let everywhere = BTreeMap::from([(key_id, key.info.fingerprint)]);
    assert_converges(&client, &hsms, &everywhere, Duration::from_secs(20)).await;

    // The attacker captured the signed KeyCreated, headers and all.
    let js = jetstream::new(client.nats().clone());
    let original = js
        .get_stream(subjects.events_stream())
        .await
        .unwrap_or_else(|e| panic!("events stream: {e}"))
        .direct_get(created_seq)
        .await
        .unwrap_or_else(|e| panic!("the KeyCreated at {created_seq}: {e}"));
    assert_eq!(original.subject.as_str(), subjects.key_created(&key_id));

    // The key is deleted; its material is purged from the stream.
    delete_with_cli(&stack.url(), &key_id, &creator).await;
    let created_subject = subjects.key_created(&key_id);
    let purged = wait_until(Duration::from_secs(20), || async {
        count_events(&client, &created_subject).await == 0
    })
    .await;
    assert!(purged, "the deleted key's KeyCreated was not purged");
    assert_converges(&client, &hsms, &BTreeMap::new(), Duration::from_secs(20)).await;

    // NATS restarts (an upgrade, a crash): JetStream rebuilds its
    // duplicate-id memory from the messages it holds, and the purged
    // KeyCreated is not among them.
    stack
        .nats()
        .restart()
        .await
        .unwrap_or_else(|e| panic!("nats-server restarts: {e}"));
    let back = wait_until(Duration::from_secs(30), || async {
        client
            .cluster_status()
            .await
            .is_ok_and(|s| s.members.iter().all(|m| m.state.as_str() == "in-service"))
    })
    .await;
    assert!(back, "the cluster did not come back after the NATS restart");

    // The attack: the captured message, replayed verbatim (its id, its
    // signature, its material), within the replay window's 200 s.
    let attacker = async_nats::ConnectOptions::new()
        .name("attacker")
        .connect(stack.url())
        .await
        .unwrap_or_else(|e| panic!("the attacker connects: {e}"));
    let ajs = jetstream::new(attacker);
    // The agent published it with an expectation that no event of the id
    // exists yet (key ids are unique at the log), which JetStream would
    // hold against the replay; it is not signed, so the attacker drops it.
    let mut replayed = async_nats::HeaderMap::new();
    for (name, values) in original.headers.iter() {
        if name
            .to_string()
            .starts_with(keysync_schemas::headers::EXPECTED_LAST_SUBJECT_SEQUENCE)
        {
            continue;
        }
        for v in values {
            replayed.append(name.clone(), v.clone());
        }
    }
    let ack = ajs
        .publish_with_headers(
            original.subject.to_string(),
            replayed,
            original.payload.clone(),
        )
        .await
        .unwrap_or_else(|e| panic!("replay: {e}"))
        .await
        .unwrap_or_else(|e| panic!("replay not acknowledged: {e}"));
    assert!(
        !ack.duplicate,
        "JetStream dropped the replay as a duplicate: the attack was not performed"
    );

    // Then nothing stays on the key's `created` subject.
    let removed = wait_until(Duration::from_secs(10), || async {
        count_events(&client, &created_subject).await == 0
    })
    .await;
    assert!(
        removed,
        "10 s after the replay (stored at {}), the stream still holds the deleted key's wrapped material on {created_subject}",
        ack.sequence
    );
    // And no HSM gets the key back (a few heartbeats: anti-entropy had
    // its chances).
    for h in &hsms {
        wait_for_heartbeats(&client, h, 4, Duration::from_secs(20)).await;
    }
    for h in &hsms {
        assert!(
            !inventory(&client, h).await.contains_key(&key_id),
            "{h} holds the deleted key {key_id} again"
        );
    }
}

/// An existing deployment's streams, made by an older build with looser
/// limits, are tightened in place when an orchestrator starts: the bound
/// on what a sender can store holds there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_deployments_streams_are_tightened_in_place() {
    let mut stack = start_stack(1).await;
    let client = stack.client().clone();
    let subjects = client.subjects().clone();
    let js = jetstream::new(client.nats().clone());
    let config_of = |name: String| {
        let js = js.clone();
        async move {
            let mut s = js
                .get_stream(&name)
                .await
                .unwrap_or_else(|e| panic!("stream {name}: {e}"));
            s.info()
                .await
                .unwrap_or_else(|e| panic!("stream {name} info: {e}"))
                .config
                .clone()
        }
    };
    // As an older build left them: events up to 128 KiB, dead letters
    // bounded in count only.
    stack.kill_orchestrator();
    let mut events = config_of(subjects.events_stream()).await;
    events.max_message_size = keysync_schemas::MAX_MESSAGE_BYTES as i32;
    js.update_stream(&events)
        .await
        .unwrap_or_else(|e| panic!("loosening the events stream: {e}"));
    let mut dlq = config_of(subjects.dead_letter_stream()).await;
    dlq.max_bytes = -1;
    js.update_stream(&dlq)
        .await
        .unwrap_or_else(|e| panic!("loosening the dead-letter stream: {e}"));
    let loose = jetstream::new(client.nats().clone())
        .publish(
            format!("{}.evt.hsm.hsm-9.joined", subjects.prefix()),
            noise(7, 100_000),
        )
        .await
        .unwrap_or_else(|e| panic!("publish: {e}"))
        .await;
    let loose_seq = match loose {
        Ok(ack) => ack.sequence,
        Err(e) => panic!("the loosened stream refused 100 KB: {e}"),
    };

    stack
        .start_orchestrator()
        .await
        .unwrap_or_else(|e| panic!("the orchestrator restarts: {e}"));
    let events = config_of(subjects.events_stream()).await;
    let dlq = config_of(subjects.dead_letter_stream()).await;
    assert_eq!(
        events.max_message_size,
        keysync_schemas::MAX_EVENT_BYTES as i32
    );
    assert!(
        dlq.max_bytes > 0,
        "the dead-letter stream is unbounded in bytes"
    );
    let refused = jetstream::new(client.nats().clone())
        .publish(
            format!("{}.evt.hsm.hsm-9.joined", subjects.prefix()),
            noise(8, 100_000),
        )
        .await
        .unwrap_or_else(|e| panic!("publish: {e}"))
        .await;
    assert!(
        refused.is_err(),
        "100 KB stored on an event subject after the update: {refused:?}"
    );
    // And the junk stored while no orchestrator ran, refused by the
    // restart's replay, is removed once it holds the lease.
    let events_stream = js
        .get_stream(subjects.events_stream())
        .await
        .unwrap_or_else(|e| panic!("events stream: {e}"));
    let removed = wait_until(Duration::from_secs(20), || async {
        events_stream.direct_get(loose_seq).await.is_err()
    })
    .await;
    assert!(
        removed,
        "the junk stored at {loose_seq} before the restart is still in the log"
    );
}
