//! Cluster status, as the orchestrator reports it on `<prefix>.orchestrator.status`.

use serde::{Deserialize, Serialize};

use crate::keys::HsmId;

/// Ask the orchestrator for cluster status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StatusRequest {
    /// Members, their key counts and lag.
    Cluster,
}

/// The orchestrator's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StatusReply {
    /// Cluster status.
    Cluster(ClusterStatus),
}

/// A member's state as the orchestrator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// Joined, still receiving keys it lacks.
    Syncing,
    /// Joined and holding every live key.
    InService,
    /// Silent past the failure timeout; its commands wait in its queue.
    Failed,
    /// Removed by an operator (`keysync hsm remove`): revoked, sent nothing.
    Removed,
}

impl MemberState {
    /// The name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Syncing => "syncing",
            MemberState::InService => "in-service",
            MemberState::Failed => "failed",
            MemberState::Removed => "removed",
        }
    }
}

/// One member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// The HSM.
    pub hsm_id: HsmId,
    /// Its state.
    pub state: MemberState,
    /// Token keys it is known to hold.
    pub keys: u64,
    /// Live keys it still lacks (of the types it can hold).
    pub lag: u64,
    /// Key types it announced it cannot hold (never sent to it).
    pub cannot_hold: Vec<crate::KeyType>,
}

/// The cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Every member.
    pub members: Vec<MemberStatus>,
    /// Live keys.
    pub keys: u64,
    /// Keys held by every member.
    pub replicated: u64,
    /// Clone commands sent and not yet applied or failed.
    pub pending_clones: u64,
    /// Clone failures seen.
    pub clone_failures: u64,
    /// Keys created with `replicas:N` or `all` that do not meet it yet.
    pub below_durability: u64,
    /// Last event stream sequence folded into this state.
    pub last_seq: u64,
    /// Rejected messages by reason.
    pub rejected: Vec<(crate::RejectReason, u64)>,
    /// Enrolled HSMs and their identity keys.
    pub enrolled: Vec<(HsmId, [u8; 32])>,
    /// The cluster's public key (what signs commands), as the answering
    /// orchestrator holds it; `None` where the state was not served by an
    /// orchestrator (a fold computed offline, as `audit replay` does).
    pub cluster_key: Option<[u8; 32]>,
}
