//! Hostile and malformed input on every keysync subject: rejected with a
//! counted reason, never a crash, never a state change.

use std::collections::BTreeMap;
use std::time::Duration;

use keysync_schemas::{
    decode, encode, CloneKey, Command, DomainId, Durability, Envelope, Event, Fingerprint,
    HsmJoined, KeyAttributes, KeyCreated, KeyId, KeyOrigin, KeyType, OpErrorKind, OpReply,
    RejectReason, Source,
};
use keysync_testkit::{assert_converges, create, hsm, inventory, start_stack, wait_until};

fn count(list: &[(RejectReason, u64)], reason: RejectReason) -> u64 {
    list.iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, n)| *n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_counted_and_changes_nothing() {
    let mut stack = start_stack(3).await;
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();
    let subjects = client.subjects().clone();
    let nats = client.nats().clone();
    let js = async_nats::jetstream::new(nats.clone());
    let (h1, h2) = (hsm("hsm-1"), hsm("hsm-2"));

    let mut expected = BTreeMap::new();
    let real = create(&client, KeyType::P256, &h1).await;
    expected.insert(real.info.key_id, real.info.fingerprint);
    assert_converges(&client, &hsms, &expected, Duration::from_secs(20)).await;
    // The agents hold it; wait until the orchestrator has folded their
    // CloneApplied too, so the "before" status is the settled one.
    let folded = wait_until(Duration::from_secs(20), || async {
        client
            .cluster_status()
            .await
            .is_ok_and(|s| s.replicated == 1 && s.members.iter().all(|m| m.lag == 0))
    })
    .await;
    assert!(
        folded,
        "the orchestrator did not fold the key's replication"
    );
    let status_before = client.cluster_status().await.expect("status");

    let valid_event = encode(&Envelope::new(
        Source::Client("attacker".into()),
        Event::HsmJoined(HsmJoined {
            hsm: hsm("hsm-9"),
            agent_version: "x".into(),
            token_keys: 0,
        }),
    ))
    .expect("encode");
    let mut unknown_version = valid_event.clone();
    unknown_version[3] = 9;
    let oversized = vec![b'K'; 200 * 1024];
    let garbage: Vec<Vec<u8>> = vec![
        // A valid header of each family followed by a body that does not decode.
        b"KS\x00\x01\x01\xff\xff\xff".to_vec(),
        b"KS\x00\x01\x02\xff\xff\xff".to_vec(),
        b"KS\x00\x01\x03\xff\xff\xff".to_vec(),
        Vec::new(),
        b"KS".to_vec(),
        b"{\"json\": true}".to_vec(),
        unknown_version.clone(),
        valid_event[..valid_event.len() - 3].to_vec(),
    ];

    // 1. Key operations: every bad request gets a BadRequest reply.
    for payload in garbage.iter().chain([&oversized, &valid_event]) {
        for subject in [subjects.hsm_op(&h1), subjects.any_op()] {
            let reply = nats
                .request(subject.clone(), payload.clone().into())
                .await
                .expect("agents answer bad requests");
            match decode::<OpReply>(&reply.payload)
                .expect("reply decodes")
                .body
            {
                OpReply::Error(e) => assert_eq!(e.kind, OpErrorKind::BadRequest, "{subject}"),
                other => panic!("bad request accepted on {subject}: {other:?}"),
            }
        }
    }
    // A request without a reply subject is counted and dropped.
    nats.publish(subjects.hsm_op(&h1), b"junk".to_vec().into())
        .await
        .expect("publish");

    // 2. Commands: garbage on hsm-1's durable queue, and well-formed
    //    clones that must not be applied.
    let cmd_subject = subjects.commands_for(&h1);
    for payload in &garbage {
        js.publish(cmd_subject.clone(), payload.clone().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let forged_key = KeyCreated {
        key_id: KeyId::new(),
        key_type: KeyType::Ed25519,
        fingerprint: Fingerprint([1; 32]),
        hsm: h2.clone(),
        origin: KeyOrigin::Generated,
        attributes: KeyAttributes::default(),
        durability: Durability::Logged,
        domain: DomainId([0; 8]),
        wrapped: vec![0x42; 48],
        public_key: None,
    };
    // Addressed to hsm-2 but queued for hsm-1.
    let misaddressed = Command::CloneKey(CloneKey {
        target: h2.clone(),
        created_seq: 1,
        key: forged_key.clone(),
    });
    // Addressed right, but wrapped under no domain key this cluster has.
    let wrong_domain = Command::CloneKey(CloneKey {
        target: h1.clone(),
        created_seq: 1,
        key: forged_key.clone(),
    });
    // Signed with the cluster key (as if the orchestrator erred), so the
    // checks after the signature's are reached.
    let cluster = keysync_security::Identity::load(stack.cluster_identity()).expect("cluster key");
    let signed = |signer: &keysync_security::Identity,
                  who: keysync_security::Signer,
                  subject: &str,
                  bytes: &[u8]| {
        keysync_security::signed_headers(
            signer,
            &who,
            subject,
            &uuid::Uuid::now_v7().to_string(),
            bytes,
        )
    };
    for cmd in [misaddressed, wrong_domain] {
        let bytes = encode(&Envelope::new(Source::Client("attacker".into()), cmd)).expect("encode");
        let h = signed(
            &cluster,
            keysync_security::Signer::Cluster,
            &cmd_subject,
            &bytes,
        );
        js.publish_with_headers(cmd_subject.clone(), h, bytes.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    // 3. Events: garbage (with signature headers, so decoding is reached),
    //    an unknown version, a body under the wrong subject.
    let events_subject = subjects.key_created(&KeyId::new());
    for payload in &garbage {
        let h = signed(
            &cluster,
            keysync_security::Signer::Cluster,
            &events_subject,
            payload,
        );
        js.publish_with_headers(events_subject.clone(), h, payload.clone().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    // A KeyCreated properly signed by its HSM, but under another key's subject.
    let mismatched = encode(&Envelope::new(
        Source::Hsm(h2.clone()),
        Event::KeyCreated(forged_key),
    ))
    .expect("encode");
    let h2_identity =
        keysync_security::Identity::load(&stack.agent_identity(&h2)).expect("hsm-2 identity");
    let h = signed(
        &h2_identity,
        keysync_security::Signer::Hsm(h2.clone()),
        &events_subject,
        &mismatched,
    );
    js.publish_with_headers(events_subject.clone(), h, mismatched.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    // Oversized: JetStream itself refuses it (the stream's message size limit).
    let refused = match js.publish(events_subject, oversized.clone().into()).await {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    assert!(
        refused,
        "the events stream stored a message over the size limit"
    );

    // Counted, per reason.
    let agent_ok = wait_until(Duration::from_secs(10), || async {
        client.health(&h1).await.is_ok_and(|h| {
            count(&h.rejected, RejectReason::WrongTarget) == 1
                && h.clones_failed == 1
                && count(&h.rejected, RejectReason::NoReplySubject) == 1
                && count(&h.rejected, RejectReason::Oversized) >= 1
                && count(&h.rejected, RejectReason::Unsigned) == garbage.len() as u64
        })
    })
    .await;
    let health = client.health(&h1).await.expect("health");
    assert!(agent_ok, "agent counters: {:?}", health.rejected);
    for reason in [
        RejectReason::Truncated,
        RejectReason::BadMagic,
        RejectReason::UnknownVersion,
        RejectReason::Malformed,
        RejectReason::WrongFamily,
    ] {
        assert!(
            count(&health.rejected, reason) >= 1,
            "{reason} not counted: {:?}",
            health.rejected
        );
    }
    let orch_ok = wait_until(Duration::from_secs(10), || async {
        client.cluster_status().await.is_ok_and(|s| {
            count(&s.rejected, RejectReason::SubjectMismatch) == 1
                && count(&s.rejected, RejectReason::UnknownVersion) == 1
        })
    })
    .await;
    let status = client.cluster_status().await.expect("status");
    assert!(orch_ok, "orchestrator counters: {:?}", status.rejected);
    for reason in [
        RejectReason::Truncated,
        RejectReason::BadMagic,
        RejectReason::Malformed,
    ] {
        assert!(
            count(&status.rejected, reason) >= 1,
            "{reason}: {:?}",
            status.rejected
        );
    }

    // Nothing died, nothing changed.
    for h in &hsms {
        assert!(stack.agent(h).expect("agent").is_running(), "{h} died");
    }
    assert_eq!(status.members, status_before.members);
    assert_eq!(status.keys, 1);
    for h in &hsms {
        assert_eq!(inventory(&client, h).await, expected, "{h} changed");
    }
    // The bad commands were acknowledged, not left to be redelivered.
    let consumer_info = js
        .get_stream(subjects.commands_stream())
        .await
        .expect("stream")
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
            &subjects.agent_consumer(&h1),
        )
        .await
        .expect("consumer")
        .info()
        .await
        .expect("info")
        .clone();
    assert_eq!(consumer_info.num_ack_pending, 0);
    assert_eq!(consumer_info.num_pending, 0);

    // And real keys keep syncing.
    let k = create(&client, KeyType::Ed25519, &h2).await;
    expected.insert(k.info.key_id, k.info.fingerprint);
    assert_converges(&client, &hsms, &expected, Duration::from_secs(20)).await;
}
