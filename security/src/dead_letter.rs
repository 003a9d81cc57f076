//! Filing rejected messages in the dead-letter stream.
//!
//! Filing never blocks the rejecting loop and never fails it: the publish
//! is acknowledged in the background and a failure is only logged (the
//! rejection is counted either way). The stream has limits (count and age),
//! so a flood of garbage cannot fill the disk.
//!
//! Every letter is signed by its filer (an agent's identity, or the
//! cluster key for an orchestrator) like an event, over its subject, id and
//! bytes: whoever may publish on a dead-letter subject can add letters of
//! its own making, and [`crate::check_dead_letter`] (`keysync dlq list`)
//! tells them apart.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use keysync_schemas::{
    encode, DeadLetter, Envelope, Rejection, Source, Subjects, MAX_MESSAGE_BYTES,
};
use sha2::{Digest as _, Sha256};

use crate::{Identity, Signer};

/// How long filing waits for the dead-letter stream's acknowledgement.
const ACK_WAIT: Duration = Duration::from_secs(10);

/// Why a dead letter was not filed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The letter could not be encoded.
    #[error("the dead letter could not be encoded")]
    Encode,
    /// The dead-letter stream did not store it.
    #[error("the dead letter was not stored: {0}")]
    NotStored(String),
}

/// What of a rejected payload to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The bytes (events, commands, heartbeats: wrapped material at most).
    Payload,
    /// Only length and SHA-256 (anything that may hold plaintext, such as
    /// a key-operation request).
    DigestOnly,
}

/// A process's dead-letter filer.
#[derive(Clone)]
pub struct DeadLetters {
    js: jetstream::Context,
    subject: String,
    source: Source,
    identity: Arc<Identity>,
    signer: Signer,
}

/// One rejected message to file: the message and its [`Rejection`].
#[derive(Debug, Clone)]
pub struct Filing<'a> {
    /// The subject it came on.
    pub subject: &'a str,
    /// Why it was rejected.
    pub rejection: Rejection,
    /// Its stream sequence.
    pub stream_seq: Option<u64>,
    /// Its bytes.
    pub payload: &'a [u8],
    /// A deduplication id, so that several filers of one message (an
    /// active and a standby orchestrator) file it once.
    pub dedup_id: Option<String>,
}

impl DeadLetters {
    /// A filer publishing as `source` under `component` (`orchestrator`,
    /// `agent`), signing as `signer` with `identity`.
    pub fn new(
        js: jetstream::Context,
        subjects: &Subjects,
        component: &str,
        source: Source,
        identity: Arc<Identity>,
        signer: Signer,
    ) -> Self {
        DeadLetters {
            js,
            subject: subjects.dead_letters(component),
            source,
            identity,
            signer,
        }
    }

    /// Files one rejected message (in the background).
    pub async fn file(&self, rejected: Filing<'_>, keep: Keep) {
        let Some((h, bytes)) = self.letter(rejected, keep) else {
            return;
        };
        match self
            .js
            .publish_with_headers(self.subject.clone(), h, bytes)
            .await
        {
            Ok(ack) => {
                tokio::spawn(async move {
                    match tokio::time::timeout(ACK_WAIT, ack).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "dead letter not stored"),
                        Err(_) => tracing::warn!("dead letter not acknowledged in time"),
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "could not file a dead letter"),
        }
    }

    /// Files one rejected message and waits until the dead-letter stream
    /// has stored it: for a caller that removes the original next, so the
    /// evidence is never lost in between.
    pub async fn file_confirmed(
        &self,
        rejected: Filing<'_>,
        keep: Keep,
    ) -> Result<(), DeadLetterError> {
        let (h, bytes) = self.letter(rejected, keep).ok_or(DeadLetterError::Encode)?;
        let ack = self
            .js
            .publish_with_headers(self.subject.clone(), h, bytes)
            .await
            .map_err(|e| DeadLetterError::NotStored(e.to_string()))?;
        match tokio::time::timeout(ACK_WAIT, ack).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(DeadLetterError::NotStored(e.to_string())),
            Err(_) => Err(DeadLetterError::NotStored(
                "not acknowledged in time".to_string(),
            )),
        }
    }

    /// The letter for `rejected`: its headers (the deduplication id and
    /// the filer's signature) and bytes. `None` if it cannot be encoded
    /// (logged).
    fn letter(
        &self,
        rejected: Filing<'_>,
        keep: Keep,
    ) -> Option<(async_nats::HeaderMap, bytes::Bytes)> {
        let keep_bytes = keep == Keep::Payload && rejected.payload.len() <= MAX_MESSAGE_BYTES / 2;
        let letter = DeadLetter {
            rejected_by: self.source.to_string(),
            subject: truncate(rejected.subject, 512),
            reason: rejected.rejection.reason,
            detail: truncate(&rejected.rejection.detail, 1024),
            claimed_signer: rejected.rejection.signer.map(|s| truncate(&s, 256)),
            stream_seq: rejected.stream_seq,
            payload_len: rejected.payload.len() as u64,
            payload_sha256: Sha256::digest(rejected.payload).into(),
            payload: keep_bytes.then(|| rejected.payload.to_vec()),
        };
        let env = Envelope::new(self.source.clone(), letter);
        let bytes = match encode(&env) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "could not encode a dead letter");
                return None;
            }
        };
        // Several filers of one message (an active and a standby
        // orchestrator) give it one id; otherwise the letter's own.
        let msg_id = rejected.dedup_id.unwrap_or_else(|| env.id.to_string());
        let h = crate::signed_headers(&self.identity, &self.signer, &self.subject, &msg_id, &bytes);
        Some((h, bytes.into()))
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
