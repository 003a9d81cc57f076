//! Key operations: the request/reply service on `<p>.hsm.<id>.op` and the
//! `<p>.op` queue group.

use std::sync::Arc;

use keysync_schemas::{
    decode, AgentHealth, Durability, Envelope, Event, KeyAttributes, KeyCreated, KeyDeleted, KeyId,
    KeyType, OpError, OpErrorKind, OpReply, OpRequest, Source,
};

use crate::keystore::{CreatedKey, KeySource, KeystoreError, NewKey};
use crate::uniqueness::{self, Outcome};
use crate::Agent;

/// Handles one raw request and returns the reply (never fails: errors are
/// replies).
pub async fn handle(agent: &Arc<Agent>, subject: &str, payload: &[u8]) -> OpReply {
    let req = match decode::<OpRequest>(payload) {
        Ok(env) => env.body,
        Err(e) => {
            // A request may be an import carrying plaintext: only its
            // digest is kept.
            let message = e.to_string();
            agent
                .bad_input
                .file(
                    keysync_security::Filing {
                        subject,
                        rejection: e.into(),
                        stream_seq: None,
                        payload,
                        dedup_id: None,
                    },
                    keysync_security::Keep::DigestOnly,
                )
                .await;
            return OpReply::Error(OpError::new(OpErrorKind::BadRequest, message));
        }
    };
    let kind = req.kind();
    let span = tracing::Span::current();
    span.record("keysync.op", kind);
    if let Some(key_id) = req.key_id() {
        span.record("keysync.key_id", key_id.to_string().as_str());
    }
    let started = std::time::Instant::now();
    let result = execute(agent, req).await;
    agent
        .metrics
        .op(kind, result.as_ref().map(|_| ()), started.elapsed());
    match result {
        Ok(reply) => reply,
        Err(err) => {
            if err.kind == OpErrorKind::BadRequest {
                agent.bad_input.count(
                    subject,
                    &keysync_schemas::Rejection::new(
                        keysync_schemas::RejectReason::BadRequest,
                        err.message.clone(),
                    ),
                );
            } else {
                tracing::debug!(op = kind, error = %err, "operation failed");
            }
            OpReply::Error(err)
        }
    }
}

/// The caller's error for a keystore error; the keystore failing (not
/// answering "not found" and the like) is counted.
fn ks_err(agent: &Agent, e: KeystoreError) -> OpError {
    agent.metrics.keystore_error(&e);
    OpError::new(e.kind(), e.to_string())
}

/// Label and application id within their bounds (a counted `BadRequest`
/// otherwise, before anything is made).
fn check_attributes(a: &KeyAttributes) -> Result<(), OpError> {
    a.check()
        .map_err(|e| OpError::new(OpErrorKind::BadRequest, e.to_string()))
}

/// A create request, whatever its source.
struct Create<'a> {
    key_id: Option<KeyId>,
    key_type: KeyType,
    session: bool,
    durability: Durability,
    attributes: KeyAttributes,
    source: KeySource<'a>,
}

async fn execute(agent: &Arc<Agent>, req: OpRequest) -> Result<OpReply, OpError> {
    let store = &agent.store;
    match req {
        OpRequest::Generate {
            key_id,
            key_type,
            session,
            durability,
            attributes,
        } => {
            create(
                agent,
                Create {
                    key_id,
                    key_type,
                    session,
                    durability,
                    attributes,
                    source: KeySource::Generate,
                },
            )
            .await
        }
        OpRequest::Import {
            key_id,
            key_type,
            material,
            session,
            durability,
            attributes,
        } => {
            create(
                agent,
                Create {
                    key_id,
                    key_type,
                    session,
                    durability,
                    attributes,
                    source: KeySource::Import(material.expose()),
                },
            )
            .await
        }
        OpRequest::Unwrap {
            key_id,
            key_type,
            wrapping_key,
            wrapped,
            session,
            durability,
            attributes,
        } => {
            create(
                agent,
                Create {
                    key_id,
                    key_type,
                    session,
                    durability,
                    attributes,
                    source: KeySource::Unwrap {
                        wrapping_key,
                        blob: &wrapped,
                    },
                },
            )
            .await
        }
        OpRequest::Sign { key_id, data } => {
            let store = store.clone();
            blocking(agent, move || store.sign(&key_id, &data))
                .await
                .map(OpReply::Signature)
        }
        OpRequest::Verify {
            key_id,
            data,
            signature,
        } => store
            .verify(&key_id, &data, &signature)
            .map(OpReply::Verified)
            .map_err(|e| ks_err(agent, e)),
        OpRequest::Encrypt {
            key_id,
            plaintext,
            aad,
        } => store
            .encrypt(&key_id, plaintext.expose(), &aad)
            .map(OpReply::Ciphertext)
            .map_err(|e| ks_err(agent, e)),
        OpRequest::Decrypt {
            key_id,
            ciphertext,
            aad,
        } => store
            .decrypt(&key_id, &ciphertext, &aad)
            .map(|p| OpReply::Plaintext(keysync_schemas::SecretBytes(p.to_vec())))
            .map_err(|e| ks_err(agent, e)),
        OpRequest::SignDigest {
            key_id,
            scheme,
            digest,
        } => {
            // Checked here too, so bad input is refused (and counted as a
            // bad request) before the keystore is touched.
            scheme
                .check(&digest)
                .map_err(|m| OpError::new(OpErrorKind::BadRequest, m))?;
            let store = store.clone();
            blocking(agent, move || store.sign_digest(&key_id, &scheme, &digest))
                .await
                .map(OpReply::Signature)
        }
        OpRequest::EncryptGcm {
            key_id,
            params,
            plaintext,
        } => {
            params
                .check()
                .map_err(|m| OpError::new(OpErrorKind::BadRequest, m))?;
            store
                .encrypt_gcm(&key_id, &params, plaintext.expose())
                .map(OpReply::Ciphertext)
                .map_err(|e| ks_err(agent, e))
        }
        OpRequest::DecryptGcm {
            key_id,
            params,
            ciphertext,
        } => {
            params
                .check()
                .map_err(|m| OpError::new(OpErrorKind::BadRequest, m))?;
            store
                .decrypt_gcm(&key_id, &params, &ciphertext)
                .map(|p| OpReply::Plaintext(keysync_schemas::SecretBytes(p.to_vec())))
                .map_err(|e| ks_err(agent, e))
        }
        OpRequest::PublicKey { key_id } => store
            .public_key(&key_id)
            .map(OpReply::PublicKey)
            .map_err(|e| ks_err(agent, e)),
        OpRequest::Info { key_id } => store
            .info(&key_id)
            .map(OpReply::Info)
            .map_err(|e| ks_err(agent, e)),
        OpRequest::List { after, limit } => {
            let limit = (limit as usize).min(MAX_LIST_PAGE);
            Ok(OpReply::List(store.list_page(after, limit)))
        }
        OpRequest::Delete { key_id } => delete(agent, key_id).await,
        OpRequest::Inventory { after, limit } => Ok(OpReply::Inventory(
            store.inventory_page(after, (limit as usize).min(MAX_INVENTORY_PAGE)),
        )),
        OpRequest::Health => {
            let outbox = store.outbox().map(|o| o.len() as u64).unwrap_or(0);
            let token_keys = store.token_key_count();
            let all = store.key_count();
            Ok(OpReply::Health(AgentHealth {
                hsm: agent.hsm.clone(),
                token_keys,
                session_keys: all.saturating_sub(token_keys),
                outbox,
                clones_applied: agent
                    .clones_applied
                    .load(std::sync::atomic::Ordering::Relaxed),
                rejected: agent.bad_input.snapshot(),
                clones_failed: agent
                    .clones_failed
                    .load(std::sync::atomic::Ordering::Relaxed),
                clones_retried: agent
                    .clones_retried
                    .load(std::sync::atomic::Ordering::Relaxed),
                deletes_retried: agent
                    .deletes_retried
                    .load(std::sync::atomic::Ordering::Relaxed),
            }))
        }
    }
}

/// Most inventory entries in one reply (keeps it under the message limit).
pub const MAX_INVENTORY_PAGE: usize = 2000;

/// Most keys in one `List` reply (a `KeyInfo` with a long label is ~250 bytes).
pub const MAX_LIST_PAGE: usize = 400;

/// Deletes a key cluster-wide: erases it here with its tombstone and the
/// `KeyDeleted` event in one transaction, then publishes the event.
async fn delete(agent: &Arc<Agent>, key_id: KeyId) -> Result<OpReply, OpError> {
    let info = agent.store.info(&key_id).map_err(|e| ks_err(agent, e))?;
    if info.session {
        let store = agent.store.clone();
        blocking(agent, move || store.delete(&key_id, None)).await?;
        return Ok(OpReply::Deleted { key_id, seq: 0 });
    }
    let env = Envelope::new(
        Source::Hsm(agent.hsm.clone()),
        Event::KeyDeleted(KeyDeleted {
            key_id,
            fingerprint: info.fingerprint,
            hsm: agent.hsm.clone(),
        }),
    );
    let bytes = keysync_schemas::encode(&env)
        .map_err(|e| OpError::new(OpErrorKind::Internal, e.to_string()))?;
    let store = agent.store.clone();
    let stored = bytes.clone();
    blocking(agent, move || store.delete(&key_id, Some(stored))).await?;
    let subject = agent.subjects.key_deleted(&key_id);
    let acked = match agent.publish_event(subject, env.id, bytes).await {
        Ok(fut) => tokio::time::timeout(agent.publish_timeout, fut)
            .await
            .map_err(|_| "timed out waiting for the JetStream acknowledgement".to_string())
            .and_then(|r| r.map_err(|e| e.to_string())),
        Err(e) => Err(e.to_string()),
    };
    match acked {
        Ok(ack) => {
            agent.outbox_confirmed(key_id);
            Ok(OpReply::Deleted {
                key_id,
                seq: ack.sequence,
            })
        }
        Err(e) => Err(OpError::new(
            OpErrorKind::Unavailable,
            format!(
                "key {key_id} was erased on {} but its tombstone is not yet logged ({e}); \
                 it is published from the agent's outbox when JetStream answers",
                agent.hsm
            ),
        )),
    }
}

/// Runs CPU- or disk-bound keystore work off the async threads.
async fn blocking<T: Send + 'static>(
    agent: &Agent,
    f: impl FnOnce() -> Result<T, KeystoreError> + Send + 'static,
) -> Result<T, OpError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OpError::new(OpErrorKind::Internal, e.to_string()))?
        .map_err(|e| ks_err(agent, e))
}

async fn create(agent: &Arc<Agent>, req: Create<'_>) -> Result<OpReply, OpError> {
    check_attributes(&req.attributes)?;
    let key_id = req.key_id.unwrap_or_default();
    let session = req.session;
    let durability = req.durability;
    let hsm = agent.hsm.clone();

    // The source borrows request bytes; copy them so the work can move to a
    // blocking thread (the copy is zeroized on drop).
    let owned_source = match req.source {
        KeySource::Generate => OwnedSource::Generate,
        KeySource::Import(b) => OwnedSource::Import(zeroize::Zeroizing::new(b.to_vec())),
        KeySource::Unwrap { wrapping_key, blob } => {
            OwnedSource::Unwrap(wrapping_key, blob.to_vec())
        }
    };
    let store = agent.store.clone();
    let key_type = req.key_type;
    let attributes = req.attributes;
    let started = std::time::Instant::now();
    let (created, event_bytes) = tokio::task::spawn_blocking(move || {
        let t = std::time::Instant::now();
        let mut event_bytes = None;
        let created = store.create(
            NewKey {
                id: key_id,
                key_type,
                session,
                attributes,
                source: owned_source.borrow(),
            },
            &mut |c: &CreatedKey| {
                let env = Envelope::new(
                    Source::Hsm(hsm.clone()),
                    Event::KeyCreated(KeyCreated {
                        key_id: c.info.key_id,
                        key_type: c.info.key_type,
                        fingerprint: c.info.fingerprint,
                        hsm: hsm.clone(),
                        origin: c.origin,
                        attributes: c.info.attributes.clone(),
                        durability,
                        domain: c.domain,
                        wrapped: c.wrapped.clone(),
                        public_key: c.public_key.clone(),
                    }),
                );
                let bytes = keysync_schemas::encode(&env).map_err(|e| e.to_string())?;
                event_bytes = Some((env.id, bytes.clone()));
                Ok(bytes)
            },
        )?;
        tracing::debug!(us = t.elapsed().as_micros() as u64, "keystore create");
        Ok::<_, KeystoreError>((created, event_bytes))
    })
    .await
    .map_err(|e| OpError::new(OpErrorKind::Internal, e.to_string()))?
    .map_err(|e| ks_err(agent, e))?;

    let Some((msg_id, bytes)) = event_bytes.filter(|_| !session) else {
        return Ok(OpReply::Created {
            info: created.info,
            durability: Durability::None,
            created_seq: None,
        });
    };
    tracing::debug!(
        us = started.elapsed().as_micros() as u64,
        "created and stored"
    );
    let fingerprint = created.info.fingerprint;
    let published = agent
        .publish_key_created(&key_id, msg_id, bytes.clone())
        .await;
    match durability {
        Durability::None => {
            // Answered before JetStream decides: a create under an id taken
            // in the cluster is undone in the background (the caller was
            // told `Created`; see decision 4).
            let agent = agent.clone();
            tokio::spawn(async move {
                match uniqueness::await_created(&agent, key_id, fingerprint, bytes, published, None)
                    .await
                {
                    Outcome::Logged(_) => {}
                    Outcome::Taken(why) => {
                        tracing::warn!(%key_id, reason = %why, "a create answered with durability none lost its key id to another key; its key was removed")
                    }
                    Outcome::Pending(e) => {
                        tracing::warn!(%key_id, error = %e, "KeyCreated not logged; it stays in the outbox")
                    }
                }
            });
            Ok(OpReply::Created {
                info: created.info,
                durability: Durability::None,
                created_seq: None,
            })
        }
        _ => match uniqueness::await_created(
            agent,
            key_id,
            fingerprint,
            bytes,
            published,
            Some(agent.publish_timeout),
        )
        .await
        {
            Outcome::Logged(seq) => Ok(OpReply::Created {
                info: created.info,
                durability: Durability::Logged,
                created_seq: Some(seq),
            }),
            Outcome::Taken(why) => Err(OpError::new(
                OpErrorKind::KeyIdTaken,
                format!(
                    "key id {key_id} is taken in the cluster: {why}; the key {} made under it was removed (create it under a new id)",
                    agent.hsm
                ),
            )),
            Outcome::Pending(e) => Err(OpError::new(
                OpErrorKind::Unavailable,
                format!(
                    "key {key_id} was created on {} but its KeyCreated event is not yet logged ({e}); \
                     it stays in the agent's outbox and is published when JetStream answers",
                    agent.hsm
                ),
            )),
        },
    }
}

enum OwnedSource {
    Generate,
    Import(zeroize::Zeroizing<Vec<u8>>),
    Unwrap(KeyId, Vec<u8>),
}

impl OwnedSource {
    fn borrow(&self) -> KeySource<'_> {
        match self {
            OwnedSource::Generate => KeySource::Generate,
            OwnedSource::Import(b) => KeySource::Import(b),
            OwnedSource::Unwrap(k, b) => KeySource::Unwrap {
                wrapping_key: *k,
                blob: b,
            },
        }
    }
}
