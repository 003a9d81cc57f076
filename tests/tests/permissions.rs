//! The cluster runs under `deploy/nats/secure.conf`, each process logged in
//! as its role, and each role is confined: a client cannot publish events
//! or commands, an agent cannot publish in another agent's name (NATS
//! refuses it where the subject names the HSM; the signature check where it
//! does not).

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use keysync::{Client, ClientOptions};
use keysync_schemas::{
    encode, CloneApplied, Envelope, Event, Fingerprint, KeyId, KeyType, RejectReason, Source,
};
use keysync_security::{Identity, Signer};
use keysync_testkit::{
    assert_converges, create, fast_options, on_secure_config, secure_user as user, wait_until,
    DevStack,
};

async fn connect(stack: &DevStack, name: &str) -> async_nats::Client {
    user(name)
        .apply(async_nats::ConnectOptions::new())
        .await
        .expect("credentials")
        .connect(stack.url())
        .await
        .unwrap_or_else(|e| panic!("{name} cannot connect: {e}"))
}

/// A JetStream publish as `nats` is refused: no acknowledgement comes
/// (the server drops a publish the user may not make).
async fn refused(
    nats: &async_nats::Client,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: Vec<u8>,
) -> bool {
    let js = jetstream::new(nats.clone());
    match js
        .publish_with_headers(subject, headers, payload.into())
        .await
    {
        Err(_) => true,
        Ok(ack) => !matches!(
            tokio::time::timeout(Duration::from_secs(3), ack).await,
            Ok(Ok(_))
        ),
    }
}

async fn rejected(client: &Client, reason: RejectReason) -> u64 {
    client
        .cluster_status()
        .await
        .map(|s| {
            s.rejected
                .iter()
                .find(|(r, _)| *r == reason)
                .map_or(0, |(_, n)| *n)
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_secure_config_every_role_works_and_none_can_act_for_another() {
    let opts = on_secure_config(fast_options(3));
    let stack = DevStack::start(opts)
        .await
        .expect("stack on deploy/nats/secure.conf with per-role users");
    let hsms = stack.hsm_ids();

    // A client, logged in as `client`, creates and uses keys; they reach
    // every HSM.
    let client = Client::connect_with(
        &stack.url(),
        ClientOptions {
            auth: user("client"),
            ..Default::default()
        },
    )
    .await
    .expect("client connects");
    let mut expected = BTreeMap::new();
    for (i, t) in [KeyType::P256, KeyType::Ed25519, KeyType::Aes256]
        .into_iter()
        .enumerate()
    {
        let k = create(&client, t, &hsms[i % 3]).await;
        expected.insert(k.info.key_id, k.info.fingerprint);
    }
    assert_converges(stack.client(), &hsms, &expected, Duration::from_secs(30)).await;
    client
        .cluster_status()
        .await
        .expect("a client may ask for status");

    // A client may not publish commands or events.
    let as_client = connect(&stack, "client").await;
    let key_id = KeyId::new();
    let applied = Envelope::new(
        Source::Hsm(hsms[1].clone()),
        Event::CloneApplied(CloneApplied {
            key_id,
            hsm: hsms[1].clone(),
            fingerprint: Fingerprint([7; 32]),
            already_present: false,
        }),
    );
    let bytes = encode(&applied).expect("encode");
    let subjects = stack.client().subjects().clone();
    assert!(
        refused(
            &as_client,
            subjects.commands_for(&hsms[0]),
            Default::default(),
            bytes.clone()
        )
        .await,
        "a client published a command"
    );
    assert!(
        refused(
            &as_client,
            subjects.clone_applied(&key_id, &hsms[1]),
            Default::default(),
            bytes.clone()
        )
        .await,
        "a client published an event"
    );
    assert!(
        refused(
            &as_client,
            subjects.key_created(&key_id),
            Default::default(),
            bytes.clone()
        )
        .await,
        "a client published a KeyCreated"
    );

    // hsm-1 may not publish hsm-2's clone result, even signed: NATS refuses
    // the subject.
    let as_hsm1 = connect(&stack, "hsm-1").await;
    let hsm1_identity = Identity::load(&stack.agent_identity(&hsms[0])).expect("hsm-1 identity");
    let subject = subjects.clone_applied(&key_id, &hsms[1]);
    let h = keysync_security::signed_headers(
        &hsm1_identity,
        &Signer::Hsm(hsms[0].clone()),
        &subject,
        &applied.id.to_string(),
        &bytes,
    );
    assert!(
        refused(&as_hsm1, subject, h, bytes.clone()).await,
        "hsm-1 published on hsm-2's subject"
    );
    // ... nor announce what hsm-2 can hold.
    assert!(
        refused(
            &as_hsm1,
            subjects.hsm_capabilities(&hsms[1]),
            Default::default(),
            bytes.clone()
        )
        .await,
        "hsm-1 published hsm-2's capabilities"
    );
    // ... nor a command.
    assert!(
        refused(
            &as_hsm1,
            subjects.commands_for(&hsms[1]),
            Default::default(),
            bytes.clone()
        )
        .await,
        "an agent published a command"
    );

    // Where the subject does not name the HSM (a key's `created`), NATS lets
    // hsm-1 publish, and the signature check refuses a KeyCreated that claims
    // to come from hsm-2.
    let before = rejected(stack.client(), RejectReason::SignerMismatch).await;
    let forged = Envelope::new(
        Source::Hsm(hsms[1].clone()),
        Event::KeyCreated(keysync_schemas::KeyCreated {
            key_id,
            key_type: KeyType::Ed25519,
            fingerprint: Fingerprint([9; 32]),
            hsm: hsms[1].clone(),
            origin: keysync_schemas::KeyOrigin::Generated,
            attributes: Default::default(),
            durability: keysync_schemas::Durability::Logged,
            domain: keysync_schemas::DomainId([0; 8]),
            wrapped: vec![0; 40],
            public_key: None,
        }),
    );
    let forged_bytes = encode(&forged).expect("encode");
    let subject = subjects.key_created(&key_id);
    let h = keysync_security::signed_headers(
        &hsm1_identity,
        &Signer::Hsm(hsms[0].clone()),
        &subject,
        &forged.id.to_string(),
        &forged_bytes,
    );
    assert!(
        !refused(&as_hsm1, subject, h, forged_bytes).await,
        "an agent may publish KeyCreated events"
    );
    assert!(
        wait_until(Duration::from_secs(10), || async {
            rejected(stack.client(), RejectReason::SignerMismatch).await > before
        })
        .await,
        "a KeyCreated signed by hsm-1 in hsm-2's name was not rejected"
    );
    let status = stack.client().cluster_status().await.expect("status");
    assert_eq!(
        status.keys,
        expected.len() as u64,
        "the forged key was counted"
    );
    assert_converges(stack.client(), &hsms, &expected, Duration::from_secs(10)).await;
    stack.shutdown().await;
}
