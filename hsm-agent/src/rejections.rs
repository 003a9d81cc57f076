//! Counted reasons for rejected input, and the dead-letter copy.
//!
//! Bad input is never fatal: it is logged (without payload bytes, which
//! could hold key material), counted here by a stable reason, filed in the
//! dead-letter stream, and dropped. The counts are served by the `Health`
//! operation, with a few that are not rejections but an operator wants
//! beside them: `clone_retried` and `delete_retried` count command units
//! that failed for a passing reason and were handed back to retry.

use std::collections::BTreeMap;
use std::sync::Mutex;

use keysync_security::{DeadLetters, Keep, Rejected};

/// Rejected-message counters by reason.
#[derive(Default)]
pub struct Rejections {
    counts: Mutex<BTreeMap<String, u64>>,
    dead_letters: Option<DeadLetters>,
}

impl Rejections {
    /// Counters that also file rejected messages as dead letters.
    pub fn new(dead_letters: DeadLetters) -> Self {
        Rejections {
            counts: Mutex::default(),
            dead_letters: Some(dead_letters),
        }
    }

    /// Counts one rejection and logs it.
    pub fn reject(&self, reason: &str, subject: &str, detail: &dyn std::fmt::Display) {
        tracing::warn!(reason, subject, %detail, "rejected message");
        if let Ok(mut c) = self.counts.lock() {
            *c.entry(reason.to_string()).or_default() += 1;
        }
    }

    /// Counts one occurrence of `reason` without logging it: for counters
    /// served beside the rejections that are not bad input (a clone handed
    /// back to be retried), logged by the caller in summary.
    pub fn count(&self, reason: &str) {
        if let Ok(mut c) = self.counts.lock() {
            *c.entry(reason.to_string()).or_default() += 1;
        }
    }

    /// Counts and logs a rejected message, and files it as a dead letter.
    pub async fn reject_message(&self, rejected: Rejected<'_>, keep: Keep) {
        self.reject(rejected.reason, rejected.subject, &rejected.detail);
        if let Some(d) = &self.dead_letters {
            d.file(rejected, keep).await;
        }
    }

    /// The counts, sorted by reason.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        self.counts
            .lock()
            .map(|c| c.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }
}
