//! Sync-latency metrics the orchestrator publishes every second on
//! `<prefix>.metrics.sync`, as JSON so that any language can read them.
//!
//! Field names are part of the contract (documented in the README); new
//! fields may be added, none renamed. `version` changes only on a break.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the metrics document.
pub const METRICS_VERSION: u16 = 1;

/// Latency percentiles over a set of observations, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LatencySummary {
    /// Observations.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

/// One HSM's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HsmMetrics {
    /// The HSM.
    pub hsm_id: String,
    /// `syncing` or `in-service`.
    pub state: String,
    /// Token keys it holds.
    pub keys: u64,
    /// Live keys it still lacks.
    pub lag: u64,
    /// From `KeyCreated` stored to this HSM's `CloneApplied` stored, in
    /// the last window.
    pub clone_latency_window: LatencySummary,
    /// The same over every clone this orchestrator has seen.
    pub clone_latency_total: LatencySummary,
}

/// The document on `<prefix>.metrics.sync`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SyncMetrics {
    /// [`METRICS_VERSION`].
    pub version: u16,
    /// The orchestrator instance that published it.
    pub orchestrator: String,
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// The same instant in RFC 3339 (UTC), the one time format of every
    /// keysync JSON output.
    #[serde(default)]
    pub at: String,
    /// Length of the window, in seconds.
    pub window_secs: f64,
    /// Member HSMs.
    pub members: u64,
    /// Live keys.
    pub keys: u64,
    /// Keys that reached every member in the window.
    pub replicated_window: u64,
    /// Keys that reached every member, ever.
    pub replicated_total: u64,
    /// Sync latency (`KeyCreated` stored to the last `CloneApplied` stored)
    /// of the keys replicated in the window.
    pub sync_latency_window: LatencySummary,
    /// The same over every key in the log.
    pub sync_latency_total: LatencySummary,
    /// Clone commands outstanding (members that neither hold nor failed a key).
    pub pending_clones: u64,
    /// Keys created with `replicas:N` or `all` that do not meet it yet.
    pub below_durability: u64,
    /// Clone failures, ever.
    pub clone_failures: u64,
    /// Per HSM.
    pub hsms: Vec<HsmMetrics>,
    /// Rejected messages by reason, ever.
    pub rejected: BTreeMap<crate::RejectReason, u64>,
    /// Anti-entropy repair commands sent by this orchestrator since it started.
    #[serde(default)]
    pub repairs_total: u64,
}
