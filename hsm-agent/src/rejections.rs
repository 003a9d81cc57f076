//! Counted reasons for rejected input.
//!
//! Bad input is never fatal: it is logged (without payload bytes, which
//! could hold key material), counted here by a stable reason, and dropped.
//! The counts are served by the `Health` operation.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Rejected-message counters by reason.
#[derive(Debug, Default)]
pub struct Rejections {
    counts: Mutex<BTreeMap<String, u64>>,
}

impl Rejections {
    /// Counts one rejection and logs it.
    pub fn reject(&self, reason: &str, subject: &str, detail: &dyn std::fmt::Display) {
        tracing::warn!(reason, subject, %detail, "rejected message");
        if let Ok(mut c) = self.counts.lock() {
            *c.entry(reason.to_string()).or_default() += 1;
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
