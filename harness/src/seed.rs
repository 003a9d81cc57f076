//! Seeding a stack's log with many keys at bus speed, for the bootstrap and
//! recovery benchmarks.
//!
//! A seed member (`bench-seed`) is enrolled like any HSM, joins, and
//! publishes signed `KeyCreated` events, but never runs: the orchestrator
//! folds them and a joining HSM is sent every one. Key material comes from
//! the agent's documented seam, [`hsm_agent::offline::mint`].

use async_nats::jetstream;
use futures::StreamExt;
use keysync_schemas::{
    encode, Durability, Envelope, Event, Fingerprint, HsmId, HsmJoined, KeyAttributes, KeyCreated,
    KeyId, KeyOrigin, KeyType, Source,
};
use keysync_security::domain_key::DomainKey;
use keysync_security::{Identity, Signer};

use crate::DevStack;

/// Why seeding stopped.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// Enrolling the seed member failed.
    #[error(transparent)]
    Stack(#[from] crate::StackError),
    /// A key file could not be read.
    #[error("{0}")]
    Keys(String),
    /// Minting a key failed.
    #[error(transparent)]
    Mint(#[from] hsm_agent::offline::MintError),
    /// Encoding an event failed.
    #[error(transparent)]
    Encode(#[from] keysync_schemas::EncodeError),
    /// JetStream refused a publish.
    #[error("publishing a seeded event: {0}")]
    Publish(String),
}

/// The seed member's id.
pub const SEED_HSM: &str = "bench-seed";

/// PubAcks awaited at once.
const IN_FLIGHT: usize = 1000;

/// Publishes `n` `KeyCreated` events from the seed member; returns the
/// stream sequence of the last. With `real_material`, each carries a real
/// Ed25519 key wrapped under the stack's domain key (a joining HSM can store
/// it); without, a placeholder blob (for folding only).
pub async fn seed_keys(stack: &DevStack, n: usize, real_material: bool) -> Result<u64, SeedError> {
    let publish_err = |e: &dyn std::fmt::Display| SeedError::Publish(e.to_string());
    let client = stack.client();
    let subjects = client.subjects();
    let js = jetstream::new(client.nats().clone());
    let seed = HsmId::new(SEED_HSM).map_err(|e| SeedError::Keys(e.to_string()))?;
    let source = Source::Hsm(seed.clone());
    stack.enroll(&seed).await?;
    let identity =
        Identity::load(&stack.agent_identity(&seed)).map_err(|e| SeedError::Keys(e.to_string()))?;
    let signer = Signer::Hsm(seed.clone());
    let signed = |subject: &str, env_id: uuid::Uuid, bytes: &[u8]| {
        keysync_security::signed_headers(&identity, &signer, subject, &env_id.to_string(), bytes)
    };
    let joined = Envelope::new(
        source.clone(),
        Event::HsmJoined(HsmJoined {
            hsm: seed.clone(),
            agent_version: "seed".into(),
            token_keys: 0,
        }),
    );
    let subject = subjects.hsm_joined(&seed);
    let bytes = encode(&joined)?;
    js.publish_with_headers(
        subject.clone(),
        signed(&subject, joined.id, &bytes),
        bytes.into(),
    )
    .await
    .map_err(|e| publish_err(&e))?
    .await
    .map_err(|e| publish_err(&e))?;
    let domain = DomainKey::load(stack.domain_key()).map_err(|e| SeedError::Keys(e.to_string()))?;
    type Ack = futures::future::BoxFuture<
        'static,
        Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
    >;
    let mut acks = futures::stream::FuturesUnordered::<Ack>::new();
    let mut last = 0;
    for _ in 0..n {
        let key_id = KeyId::new();
        let (fingerprint, wrapped, public_key) = if real_material {
            let m = hsm_agent::offline::mint(&domain, KeyType::Ed25519)?;
            (m.fingerprint, m.wrapped, m.public_key)
        } else {
            (Fingerprint([1; 32]), vec![0; 56], None)
        };
        let env = Envelope::new(
            source.clone(),
            Event::KeyCreated(KeyCreated {
                key_id,
                key_type: KeyType::Ed25519,
                fingerprint,
                hsm: seed.clone(),
                origin: KeyOrigin::Generated,
                attributes: KeyAttributes::default(),
                durability: Durability::Logged,
                domain: domain.id(),
                wrapped,
                public_key,
            }),
        );
        if acks.len() >= IN_FLIGHT {
            if let Some(a) = acks.next().await {
                let a = a.map_err(|e| publish_err(&e))?;
                last = last.max(a.sequence);
            }
        }
        let subject = subjects.key_created(&key_id);
        let bytes = encode(&env)?;
        let fut = js
            .publish_with_headers(
                subject.clone(),
                signed(&subject, env.id, &bytes),
                bytes.into(),
            )
            .await
            .map_err(|e| publish_err(&e))?;
        acks.push(Box::pin(std::future::IntoFuture::into_future(fut)));
    }
    while let Some(a) = acks.next().await {
        last = last.max(a.map_err(|e| publish_err(&e))?.sequence);
    }
    Ok(last)
}
