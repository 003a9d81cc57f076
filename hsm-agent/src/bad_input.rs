//! Bad input: counted by its typed reason, logged, filed, dropped.
//!
//! Bad input is never fatal: it is logged (without payload bytes, which
//! could hold key material), counted by its [`RejectReason`], filed in the
//! dead-letter stream where it came from a stream or a subject anyone may
//! publish on, and dropped. The counts are served by the `Health`
//! operation.

use std::collections::BTreeMap;
use std::sync::Mutex;

use keysync_schemas::{RejectReason, Rejection};
use keysync_security::{DeadLetters, Filing, Keep};

/// Rejected-message counters by reason, and where rejected messages go.
#[derive(Default)]
pub struct BadInput {
    counts: Mutex<BTreeMap<RejectReason, u64>>,
    dead_letters: Option<DeadLetters>,
}

impl BadInput {
    /// Counters that also file rejected messages as dead letters.
    pub fn new(dead_letters: DeadLetters) -> Self {
        BadInput {
            counts: Mutex::default(),
            dead_letters: Some(dead_letters),
        }
    }

    /// Counts one rejection and logs it.
    pub fn count(&self, subject: &str, rejection: &Rejection) {
        tracing::warn!(
            reason = %rejection.reason,
            subject,
            detail = %rejection.detail,
            "rejected message"
        );
        if let Ok(mut c) = self.counts.lock() {
            *c.entry(rejection.reason).or_default() += 1;
        }
    }

    /// Counts and logs a rejected message, and files it as a dead letter.
    pub async fn file(&self, filing: Filing<'_>, keep: Keep) {
        self.count(filing.subject, &filing.rejection);
        if let Some(d) = &self.dead_letters {
            d.file(filing, keep).await;
        }
    }

    /// The counts, in reason order.
    pub fn snapshot(&self) -> Vec<(RejectReason, u64)> {
        self.counts
            .lock()
            .map(|c| c.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }
}
