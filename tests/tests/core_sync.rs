//! Core key sync on real processes: real nats-server, orchestrator and
//! three hsm-agents.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use keysync::{CreateKey, Route};
use keysync_schemas::{Durability, KeyType};
use keysync_testkit::{
    assert_converges, count_events, create, hsm, inventory, random_index, start_stack,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_keys_of_every_type_reach_every_hsm_with_equal_fingerprints() {
    let stack = start_stack(3).await;
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();
    let mut expected = BTreeMap::new();
    let mut creates = futures::stream::iter(0..500)
        .map(|i| {
            let key_type = KeyType::ALL[i % KeyType::ALL.len()];
            let on = hsms[random_index(hsms.len())].clone();
            let client = client.clone();
            async move {
                let k = create(&client, key_type, &on).await;
                assert_eq!(k.info.hsm, on);
                assert_eq!(k.durability, Durability::Logged);
                assert!(
                    k.created_seq.is_some(),
                    "a logged create reports its stream sequence"
                );
                k
            }
        })
        .buffer_unordered(16);
    let mut per_creator: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(k) = creates.next().await {
        *per_creator.entry(k.info.hsm.to_string()).or_default() += 1;
        expected.insert(k.info.key_id, k.info.fingerprint);
    }
    assert_eq!(expected.len(), 500);
    assert_eq!(
        per_creator.len(),
        3,
        "keys were created on every HSM: {per_creator:?}"
    );

    assert_converges(&client, &hsms, &expected, Duration::from_secs(60)).await;

    // The orchestrator agrees: everything replicated, nothing pending.
    let ok = keysync_testkit::wait_settled(&client, 500, Duration::from_secs(10)).await;
    let status = client.cluster_status().await.expect("status");
    assert!(
        ok,
        "orchestrator status never showed 500 replicated: {status:?}"
    );
    assert_eq!(status.keys, 500);
    for m in &status.members {
        assert_eq!((m.keys, m.lag), (500, 0), "{m:?}");
    }
    // Exactly one clone applied per key and non-creating HSM: no double fan-out.
    assert_eq!(keysync_testkit::count_clones_applied(&client).await, 1000);
    assert_eq!(
        count_events(&client, "keysync.evt.key.*.replicated").await,
        500
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_made_on_a_replica_verifies_against_the_creators_public_key() {
    use ed25519_dalek::pkcs8::DecodePublicKey as _;
    use signature::Verifier as _;

    let stack = start_stack(3).await;
    let client = stack.client().clone();
    let (h1, h2, h3) = (hsm("hsm-1"), hsm("hsm-2"), hsm("hsm-3"));
    let message = b"pay 100 to alice";
    for key_type in [KeyType::P256, KeyType::Ed25519, KeyType::Rsa2048] {
        let k = client
            .create_key(
                CreateKey::new(key_type)
                    .on(Route::Hsm(h1.clone()))
                    .durability(Durability::All),
            )
            .await
            .expect("create with durability all");
        assert_eq!(k.holders.len(), 3, "all: every HSM holds it on return");
        let spki = client
            .public_key(k.info.key_id, &Route::Hsm(h1.clone()))
            .await
            .expect("public key from the creator");
        for replica in [&h2, &h3] {
            assert_eq!(
                client
                    .public_key(k.info.key_id, &Route::Hsm(replica.clone()))
                    .await
                    .expect("spki"),
                spki,
                "{key_type}: same public key on {replica}"
            );
            let sig = client
                .sign(k.info.key_id, message, &Route::Hsm(replica.clone()))
                .await
                .expect("sign on a replica");
            // Verified outside keysync, from the creator's SPKI alone.
            let valid = match key_type {
                KeyType::P256 => {
                    let vk =
                        p256::ecdsa::VerifyingKey::from_public_key_der(&spki).expect("p256 spki");
                    let sig = p256::ecdsa::DerSignature::from_bytes(&sig).expect("DER signature");
                    vk.verify(message, &sig).is_ok()
                }
                KeyType::Ed25519 => {
                    let vk = ed25519_dalek::VerifyingKey::from_public_key_der(&spki)
                        .expect("ed25519 spki");
                    let sig =
                        ed25519_dalek::Signature::from_slice(&sig).expect("64-byte signature");
                    vk.verify(message, &sig).is_ok()
                }
                KeyType::Rsa2048 => {
                    let pk = rsa::PublicKey::from_public_key_der(&spki).expect("rsa spki");
                    let vk = rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(pk);
                    let sig =
                        rsa::pkcs1v15::Signature::try_from(sig.as_slice()).expect("rsa signature");
                    vk.verify(message, &sig).is_ok()
                }
                KeyType::Aes256 => unreachable!(),
            };
            assert!(valid, "{key_type} signature from {replica} does not verify");
        }
    }

    // A secret key: encrypt on one replica, decrypt on another.
    let aes = client
        .create_key(
            CreateKey::new(KeyType::Aes256)
                .on(Route::Hsm(h1.clone()))
                .durability(Durability::All),
        )
        .await
        .expect("aes key");
    let sealed = client
        .encrypt(
            aes.info.key_id,
            b"card 4111",
            b"ctx",
            &Route::Hsm(h2.clone()),
        )
        .await
        .expect("encrypt on hsm-2");
    let opened = client
        .decrypt(aes.info.key_id, &sealed, b"ctx", &Route::Hsm(h3.clone()))
        .await
        .expect("decrypt on hsm-3");
    assert_eq!(opened.expose(), b"card 4111");
    assert!(client
        .decrypt(aes.info.key_id, &sealed, b"other", &Route::Hsm(h3))
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_hsm_keeps_its_token_keys_and_loses_its_session_keys() {
    let mut stack = start_stack(3).await;
    let client = stack.client().clone();
    let h2 = hsm("hsm-2");
    let mut tokens = BTreeMap::new();
    for t in KeyType::ALL {
        let k = create(&client, t, &h2).await;
        tokens.insert(k.info.key_id, k.info.fingerprint);
    }
    let mut sessions = Vec::new();
    for t in [KeyType::P256, KeyType::Aes256] {
        let mut spec = CreateKey::new(t).on(Route::Hsm(h2.clone()));
        spec.session = true;
        let k = client.create_key(spec).await.expect("session key");
        assert!(k.info.session);
        sessions.push(k.info.key_id);
    }
    // Session keys never leave their HSM.
    assert_converges(&client, &stack.hsm_ids(), &tokens, Duration::from_secs(30)).await;
    for id in &sessions {
        assert!(client
            .key_info(*id, &Route::Hsm(hsm("hsm-1")))
            .await
            .is_err());
        assert!(client.key_info(*id, &Route::Hsm(h2.clone())).await.is_ok());
    }

    stack.kill_agent(&h2);
    stack
        .start_agents(std::slice::from_ref(&h2))
        .await
        .expect("restart hsm-2");

    assert_eq!(
        inventory(&client, &h2).await,
        tokens,
        "token keys survive a SIGKILL"
    );
    for id in &sessions {
        let err = client
            .key_info(*id, &Route::Hsm(h2.clone()))
            .await
            .expect_err("session keys are gone after a restart");
        assert!(matches!(err, keysync::Error::KeyNotFound { .. }), "{err}");
    }
    // And it still signs with what it kept.
    let (id, _) = tokens.iter().next().expect("a key");
    let info = client.key_info(*id, &Route::Hsm(h2)).await.expect("info");
    assert_eq!(info.fingerprint, tokens[id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_orchestrator_rebuilds_from_the_log_and_fans_out_nothing_twice() {
    let mut stack = start_stack(3).await;
    let client = stack.client().clone();
    let hsms = stack.hsm_ids();
    let mut expected = BTreeMap::new();
    for i in 0..60 {
        let k = create(&client, KeyType::ALL[i % 3], &hsms[i % 3]).await;
        expected.insert(k.info.key_id, k.info.fingerprint);
    }
    assert_converges(&client, &hsms, &expected, Duration::from_secs(30)).await;
    assert!(
        keysync_testkit::wait_until(Duration::from_secs(10), || async {
            client
                .cluster_status()
                .await
                .is_ok_and(|s| s.replicated == 60)
        })
        .await
    );
    let before = client.cluster_status().await.expect("status");

    stack.kill_orchestrator();
    stack
        .start_orchestrator()
        .await
        .expect("orchestrator restart");
    // Status is answered while the new run replays: wait until it has
    // folded everything the old one had.
    assert!(
        keysync_testkit::wait_until(Duration::from_secs(30), || async {
            client
                .cluster_status()
                .await
                .is_ok_and(|s| s.last_seq >= before.last_seq)
        })
        .await
    );
    let after = client.cluster_status().await.expect("status");
    assert_eq!(after.members, before.members);
    assert_eq!(
        (after.keys, after.replicated, after.pending_clones),
        (60, 60, 0)
    );

    // Live again: one more key syncs, and no old key was cloned again.
    let k = create(&client, KeyType::Ed25519, &hsms[0]).await;
    expected.insert(k.info.key_id, k.info.fingerprint);
    assert_converges(&client, &hsms, &expected, Duration::from_secs(30)).await;
    assert!(
        keysync_testkit::wait_until(Duration::from_secs(10), || async {
            count_events(&client, "keysync.evt.key.*.replicated").await == 61
        })
        .await
    );
    assert_eq!(keysync_testkit::count_clones_applied(&client).await, 61 * 2);
    assert_eq!(
        count_events(&client, "keysync.evt.key.*.replicated").await,
        61
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_and_unwrapped_keys_sync_like_generated_ones() {
    use ed25519_dalek::pkcs8::{DecodePublicKey as _, EncodePrivateKey as _};
    use signature::Verifier as _;

    let stack = start_stack(3).await;
    let client = stack.client().clone();
    let on = |h: &str, t| {
        CreateKey::new(t)
            .on(Route::Hsm(hsm(h)))
            .durability(Durability::All)
    };

    // Import: a known Ed25519 key, created outside keysync.
    let known = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let der = known.to_pkcs8_der().expect("pkcs8").as_bytes().to_vec();
    let imported = client
        .import_key(on("hsm-1", KeyType::Ed25519), der.clone())
        .await
        .expect("import");
    let sig = client
        .sign(imported.info.key_id, b"imported", &Route::Hsm(hsm("hsm-3")))
        .await
        .expect("sign on a replica");
    let spki = client
        .public_key(imported.info.key_id, &Route::Hsm(hsm("hsm-2")))
        .await
        .expect("spki");
    let vk = ed25519_dalek::VerifyingKey::from_public_key_der(&spki).expect("spki");
    assert_eq!(vk, known.verifying_key(), "the imported key, not another");
    assert!(vk
        .verify(
            b"imported",
            &ed25519_dalek::Signature::from_slice(&sig).expect("sig")
        )
        .is_ok());

    // Unwrap: an AES-256 wrapping key imported from known bytes; a key
    // wrapped under it (RFC 5649) outside keysync; unwrapped on hsm-2.
    let kek = [9u8; 32];
    let wrapping = client
        .import_key(on("hsm-2", KeyType::Aes256), kek.to_vec())
        .await
        .expect("import the wrapping key");
    let inner = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let blob = keysync_security::domain_key::wrap_with(
        &kek,
        inner.to_pkcs8_der().expect("pkcs8").as_bytes(),
    )
    .expect("wrap");
    let unwrapped = client
        .unwrap_key(
            on("hsm-2", KeyType::Ed25519),
            wrapping.info.key_id,
            blob.clone(),
        )
        .await
        .expect("unwrap");
    let spki = client
        .public_key(unwrapped.info.key_id, &Route::Hsm(hsm("hsm-1")))
        .await
        .expect("replicated");
    assert_eq!(
        ed25519_dalek::VerifyingKey::from_public_key_der(&spki).expect("spki"),
        inner.verifying_key()
    );
    // A tampered blob stores nothing.
    let mut bad = blob;
    bad[3] ^= 1;
    let err = client
        .unwrap_key(on("hsm-2", KeyType::Ed25519), wrapping.info.key_id, bad)
        .await
        .expect_err("tampered");
    assert!(err.to_string().contains("integrity"), "{err}");
}
