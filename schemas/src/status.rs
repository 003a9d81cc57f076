//! Cluster status, as the orchestrator reports it on `<prefix>.orchestrator.status`.

use serde::{Deserialize, Serialize};

use crate::keys::{HsmId, KeyId, KeyType};

/// Ask the orchestrator for cluster status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StatusRequest {
    /// Members, their key counts and lag.
    Cluster,
    /// What the log says of one key: never seen, live (and where), or
    /// deleted. Lets a client tell "no such key" from "not yet replicated"
    /// (appended: older orchestrators do not answer it).
    Key(KeyId),
}

/// The orchestrator's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StatusReply {
    /// Cluster status.
    Cluster(ClusterStatus),
    /// One key's standing in the log (answers [`StatusRequest::Key`]).
    Key(KeyStatus),
}

/// Whether the log knows a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyStanding {
    /// No event of the log folded so far names it: no such key in this
    /// cluster (or one created so recently that its event is not folded
    /// yet: compare [`KeyStatus::last_seq`]).
    Unknown,
    /// Created and not deleted.
    Live,
    /// Deleted (a tombstone): ids are never reused, it will not come back.
    Deleted,
}

impl KeyStanding {
    /// The name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStanding::Unknown => "unknown",
            KeyStanding::Live => "live",
            KeyStanding::Deleted => "deleted",
        }
    }
}

/// One key, as the orchestrator's fold of the log sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatus {
    /// The key asked about.
    pub key_id: KeyId,
    /// Unknown, live or deleted.
    pub standing: KeyStanding,
    /// Its type (`None` when unknown).
    pub key_type: Option<KeyType>,
    /// Members known to hold it (live), or yet to erase it (deleted).
    pub holders: Vec<HsmId>,
    /// Last event stream sequence folded when this was answered.
    pub last_seq: u64,
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
