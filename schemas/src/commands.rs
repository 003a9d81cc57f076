//! Commands: what the orchestrator asks one agent to do, on that agent's
//! durable subject of the `KEYSYNC_CMD` work-queue stream. A command waits
//! there while its HSM is down.

use serde::{Deserialize, Serialize};

use crate::events::KeyCreated;
use crate::keys::{HsmId, KeyId};

/// One command on the command stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Store a key created elsewhere.
    CloneKey(CloneKey),
    /// Erase a deleted key and keep its tombstone.
    DeleteKey(DeleteKey),
    /// Store many keys: a new member's bootstrap, or a repair, in one
    /// signed message (each still answered by its own `CloneApplied`).
    CloneBatch(CloneBatch),
}

impl Command {
    /// The HSM the command is for.
    pub fn target(&self) -> &HsmId {
        match self {
            Command::CloneKey(c) => &c.target,
            Command::DeleteKey(d) => &d.target,
            Command::CloneBatch(b) => &b.target,
        }
    }

    /// The key the command is about (`None` for a batch of many).
    pub fn key_id(&self) -> Option<KeyId> {
        match self {
            Command::CloneKey(c) => Some(c.key.key_id),
            Command::DeleteKey(d) => Some(d.key_id),
            Command::CloneBatch(_) => None,
        }
    }

    /// The single commands this one stands for, in order (a batch's clones
    /// must all be for its target).
    pub fn into_units(self) -> Vec<Command> {
        match self {
            Command::CloneBatch(b) => b.clones.into_iter().map(Command::CloneKey).collect(),
            single => vec![single],
        }
    }
}

/// Many clones for one HSM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneBatch {
    /// The HSM that must apply them.
    pub target: HsmId,
    /// The clones, each also naming `target`.
    pub clones: Vec<CloneKey>,
}

/// Erase `key_id` (if held) and refuse it from then on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteKey {
    /// The HSM that must apply it.
    pub target: HsmId,
    /// The key.
    pub key_id: KeyId,
}

/// Store the key described by `key` (wrapped material included). Applying it
/// twice is a no-op: same key id and fingerprint means already done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneKey {
    /// The HSM that must apply it (checked against the subject it came on).
    pub target: HsmId,
    /// Stream sequence of the `KeyCreated` event this command comes from.
    pub created_seq: u64,
    /// The key, as its creator announced it.
    pub key: KeyCreated,
}
