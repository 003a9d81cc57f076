//! The subject and stream layout of one keysync cluster.
//!
//! Everything sits under a prefix (`keysync` by default) so several clusters
//! share one NATS. Per-key event subjects let a deleted key's wrapped
//! material be purged from the stream with one filtered purge.

use crate::keys::{HsmId, IdError, KeyId};

/// The default subject prefix.
pub const DEFAULT_PREFIX: &str = "keysync";

/// Queue group agents join on the any-HSM operation subject.
pub const ANY_OP_QUEUE: &str = "keysync-agents";

/// Subject and stream names for one cluster prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
    stream_base: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects::new(DEFAULT_PREFIX).unwrap_or_else(|_| unreachable!("default prefix is valid"))
    }
}

/// What a per-key event subject names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySubject {
    /// `...key.<id>.created`
    Created(KeyId),
    /// `...key.<id>.applied.<hsm>`
    Applied(KeyId, HsmId),
    /// `...key.<id>.failed.<hsm>`
    Failed(KeyId, HsmId),
    /// `...key.<id>.replicated`
    Replicated(KeyId),
    /// `...hsm.<hsm>.joined`
    HsmJoined(HsmId),
    /// `...hsm.<hsm>.capabilities`
    HsmCapabilities(HsmId),
    /// `...hsm.<hsm>.failed`
    HsmFailed(HsmId),
    /// `...hsm.<hsm>.recovered`
    HsmRecovered(HsmId),
    /// `...key.<id>.deleted`
    Deleted(KeyId),
    /// `...key.<id>.erased.<hsm>`
    Erased(KeyId, HsmId),
    /// `...hsm.<hsm>.enrolled`
    HsmEnrolled(HsmId),
    /// `...hsm.<hsm>.revoked`
    HsmRevoked(HsmId),
    /// `...hsm.<hsm>.token`
    JoinToken(HsmId),
    /// `...hsm.<hsm>.join`
    JoinRequested(HsmId),
    /// `...log.checkpoint`
    Checkpoint,
    /// `...hsm.<hsm>.applied` (a `ClonesApplied` batch)
    HsmApplied(HsmId),
}

impl Subjects {
    /// A layout under `prefix` (one or more tokens of `A-Z a-z 0-9 _ -`).
    pub fn new(prefix: &str) -> Result<Self, IdError> {
        let valid = !prefix.is_empty()
            && prefix.split('.').all(|t| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
        if !valid {
            return Err(IdError::Prefix(prefix.to_string()));
        }
        let stream_base = prefix
            .chars()
            .map(|c| match c {
                '.' | '-' => '_',
                c => c.to_ascii_uppercase(),
            })
            .collect();
        Ok(Subjects {
            prefix: prefix.to_string(),
            stream_base,
        })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The events stream (`KEYSYNC_EVENTS` for the default prefix).
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.stream_base)
    }

    /// The command work-queue stream (`KEYSYNC_CMD`).
    pub fn commands_stream(&self) -> String {
        format!("{}_CMD", self.stream_base)
    }

    /// Every event subject: `<p>.evt.>`.
    pub fn events_all(&self) -> String {
        format!("{}.evt.>", self.prefix)
    }

    /// What every event subject starts with: `<p>.evt.`.
    pub fn events_prefix(&self) -> String {
        format!("{}.evt.", self.prefix)
    }

    /// Every key event: `<p>.evt.key.>`.
    pub fn key_events_all(&self) -> String {
        format!("{}.evt.key.>", self.prefix)
    }

    /// Every membership event: `<p>.evt.hsm.>`.
    pub fn hsm_events_all(&self) -> String {
        format!("{}.evt.hsm.>", self.prefix)
    }

    /// Every event of one key: `<p>.evt.key.<id>.>`.
    pub fn key_events(&self, key: &KeyId) -> String {
        format!("{}.evt.key.{key}.>", self.prefix)
    }

    /// The key id an event subject (`<p>.evt.key.<id>.…`) is about, as
    /// written there (for traces; not checked to be a valid id).
    pub fn key_of_event<'s>(&self, subject: &'s str) -> Option<&'s str> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".evt.key.")?;
        rest.split('.').next().filter(|id| !id.is_empty())
    }

    /// `<p>.evt.key.<id>.created`
    pub fn key_created(&self, key: &KeyId) -> String {
        format!("{}.evt.key.{key}.created", self.prefix)
    }

    /// `<p>.evt.key.<id>.applied.<hsm>`
    pub fn clone_applied(&self, key: &KeyId, hsm: &HsmId) -> String {
        format!("{}.evt.key.{key}.applied.{hsm}", self.prefix)
    }

    /// Every `applied` event of every key: `<p>.evt.key.*.applied.*`.
    pub fn all_applied(&self) -> String {
        format!("{}.evt.key.*.applied.*", self.prefix)
    }

    /// A batch of applied clones (`ClonesApplied`) by one HSM:
    /// `<p>.evt.hsm.<hsm>.applied`. Per HSM, not per key: it names many
    /// keys, none of which has material on it to purge.
    pub fn clones_applied(&self, hsm: &HsmId) -> String {
        format!("{}.evt.hsm.{hsm}.applied", self.prefix)
    }

    /// Every batch of applied clones: `<p>.evt.hsm.*.applied`.
    pub fn all_clones_applied(&self) -> String {
        format!("{}.evt.hsm.*.applied", self.prefix)
    }

    /// `<p>.evt.key.<id>.failed.<hsm>`
    pub fn clone_failed(&self, key: &KeyId, hsm: &HsmId) -> String {
        format!("{}.evt.key.{key}.failed.{hsm}", self.prefix)
    }

    /// `<p>.evt.key.<id>.replicated`
    pub fn key_replicated(&self, key: &KeyId) -> String {
        format!("{}.evt.key.{key}.replicated", self.prefix)
    }

    /// Every `replicated` event: `<p>.evt.key.*.replicated`.
    pub fn all_replicated(&self) -> String {
        format!("{}.evt.key.*.replicated", self.prefix)
    }

    /// `<p>.evt.hsm.<hsm>.joined`
    pub fn hsm_joined(&self, hsm: &HsmId) -> String {
        format!("{}.evt.hsm.{hsm}.joined", self.prefix)
    }

    /// `<p>.evt.hsm.<hsm>.capabilities`
    pub fn hsm_capabilities(&self, hsm: &HsmId) -> String {
        format!("{}.evt.hsm.{hsm}.capabilities", self.prefix)
    }

    /// `<p>.evt.hsm.<hsm>.failed`
    pub fn hsm_failed(&self, hsm: &HsmId) -> String {
        format!("{}.evt.hsm.{hsm}.failed", self.prefix)
    }

    /// `<p>.evt.log.checkpoint`: the orchestrator's signed checkpoints
    /// (decision 22).
    pub fn checkpoint(&self) -> String {
        format!("{}.evt.log.checkpoint", self.prefix)
    }

    /// `<p>.evt.hsm.<hsm>.recovered`
    pub fn hsm_recovered(&self, hsm: &HsmId) -> String {
        format!("{}.evt.hsm.{hsm}.recovered", self.prefix)
    }

    /// `<p>.evt.key.<id>.deleted`
    pub fn key_deleted(&self, key: &KeyId) -> String {
        format!("{}.evt.key.{key}.deleted", self.prefix)
    }

    /// `<p>.evt.key.<id>.erased.<hsm>`
    pub fn key_erased(&self, key: &KeyId, hsm: &HsmId) -> String {
        format!("{}.evt.key.{key}.erased.{hsm}", self.prefix)
    }

    /// `<p>.evt.hsm.<hsm>.enrolled`
    pub fn hsm_enrolled(&self, hsm: &HsmId) -> String {
        format!("{}.evt.hsm.{hsm}.enrolled", self.prefix)
    }

    /// `<p>.evt.hsm.<hsm>.revoked`
    pub fn hsm_revoked(&self, hsm: &HsmId) -> String {
        format!("{}.evt.hsm.{hsm}.revoked", self.prefix)
    }

    /// `<p>.evt.hsm.<hsm>.token`
    pub fn join_token(&self, hsm: &HsmId) -> String {
        format!("{}.evt.hsm.{hsm}.token", self.prefix)
    }

    /// `<p>.evt.hsm.<hsm>.join`
    pub fn join_requested(&self, hsm: &HsmId) -> String {
        format!("{}.evt.hsm.{hsm}.join", self.prefix)
    }

    /// The lifecycle stream of CloudEvents for other languages
    /// (`KEYSYNC_LIFECYCLE`).
    pub fn lifecycle_stream(&self) -> String {
        format!("{}_LIFECYCLE", self.stream_base)
    }

    /// Every lifecycle event: `<p>.lifecycle.>`.
    pub fn lifecycle_all(&self) -> String {
        format!("{}.lifecycle.>", self.prefix)
    }

    /// `<p>.lifecycle.key.<id>.<event>`
    pub fn lifecycle_key(&self, key: &str, event: &str) -> String {
        format!("{}.lifecycle.key.{key}.{event}", self.prefix)
    }

    /// `<p>.lifecycle.hsm.<hsm>.<event>`
    pub fn lifecycle_hsm(&self, hsm: &str, event: &str) -> String {
        format!("{}.lifecycle.hsm.{hsm}.{event}", self.prefix)
    }

    /// Stream of dead letters: every rejected message, with its reason.
    pub fn dead_letter_stream(&self) -> String {
        format!("{}_DLQ", self.stream_base)
    }

    /// `<p>.dlq.<component>`: where `component` files what it rejected.
    pub fn dead_letters(&self, component: &str) -> String {
        format!("{}.dlq.{component}", self.prefix)
    }

    /// Every dead-letter subject.
    pub fn dead_letters_all(&self) -> String {
        format!("{}.dlq.>", self.prefix)
    }

    /// One HSM's heartbeats: `<p>.hsm.<hsm>.heartbeat`.
    pub fn heartbeat(&self, hsm: &HsmId) -> String {
        format!("{}.hsm.{hsm}.heartbeat", self.prefix)
    }

    /// Every heartbeat: `<p>.hsm.*.heartbeat`.
    pub fn all_heartbeats(&self) -> String {
        format!("{}.hsm.*.heartbeat", self.prefix)
    }

    /// The audit stream (`KEYSYNC_AUDIT`).
    pub fn audit_stream(&self) -> String {
        format!("{}_AUDIT", self.stream_base)
    }

    /// The audit subject: `<p>.audit`.
    pub fn audit(&self) -> String {
        format!("{}.audit", self.prefix)
    }

    /// The orchestrators' snapshot store (JetStream object store).
    pub fn snapshot_bucket(&self) -> String {
        format!("{}_SNAPSHOTS", self.stream_base)
    }

    /// The orchestrators' lease bucket (JetStream KV).
    pub fn lease_bucket(&self) -> String {
        format!("{}_LEASE", self.stream_base)
    }

    /// Every command: `<p>.cmd.>`.
    pub fn commands_all(&self) -> String {
        format!("{}.cmd.>", self.prefix)
    }

    /// One HSM's command subject: `<p>.cmd.<hsm>`.
    pub fn commands_for(&self, hsm: &HsmId) -> String {
        format!("{}.cmd.{hsm}", self.prefix)
    }

    /// Operations on one HSM: `<p>.hsm.<hsm>.op`.
    pub fn hsm_op(&self, hsm: &HsmId) -> String {
        format!("{}.hsm.{hsm}.op", self.prefix)
    }

    /// Operations on any HSM (queue group [`ANY_OP_QUEUE`]): `<p>.op`.
    pub fn any_op(&self) -> String {
        format!("{}.op", self.prefix)
    }

    /// Sync-latency metrics, JSON, every second: `<p>.metrics.sync`.
    pub fn metrics_sync(&self) -> String {
        format!("{}.metrics.sync", self.prefix)
    }

    /// Orchestrator status requests: `<p>.orchestrator.status`.
    pub fn orchestrator_status(&self) -> String {
        format!("{}.orchestrator.status", self.prefix)
    }

    /// Durable consumer name of one HSM's command queue.
    pub fn agent_consumer(&self, hsm: &HsmId) -> String {
        format!("agent-{hsm}")
    }

    /// Parses a per-key or per-HSM event subject of this prefix.
    pub fn parse_event(&self, subject: &str) -> Option<KeySubject> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix(".evt.")?;
        let tokens: Vec<&str> = rest.split('.').collect();
        match tokens.as_slice() {
            ["key", id, "created"] => Some(KeySubject::Created(id.parse().ok()?)),
            ["key", id, "replicated"] => Some(KeySubject::Replicated(id.parse().ok()?)),
            ["key", id, "applied", hsm] => {
                Some(KeySubject::Applied(id.parse().ok()?, hsm.parse().ok()?))
            }
            ["key", id, "failed", hsm] => {
                Some(KeySubject::Failed(id.parse().ok()?, hsm.parse().ok()?))
            }
            ["hsm", hsm, "joined"] => Some(KeySubject::HsmJoined(hsm.parse().ok()?)),
            ["hsm", hsm, "capabilities"] => Some(KeySubject::HsmCapabilities(hsm.parse().ok()?)),
            ["hsm", hsm, "failed"] => Some(KeySubject::HsmFailed(hsm.parse().ok()?)),
            ["hsm", hsm, "recovered"] => Some(KeySubject::HsmRecovered(hsm.parse().ok()?)),
            ["hsm", hsm, "enrolled"] => Some(KeySubject::HsmEnrolled(hsm.parse().ok()?)),
            ["hsm", hsm, "revoked"] => Some(KeySubject::HsmRevoked(hsm.parse().ok()?)),
            ["hsm", hsm, "token"] => Some(KeySubject::JoinToken(hsm.parse().ok()?)),
            ["hsm", hsm, "join"] => Some(KeySubject::JoinRequested(hsm.parse().ok()?)),
            ["hsm", hsm, "applied"] => Some(KeySubject::HsmApplied(hsm.parse().ok()?)),
            ["key", id, "deleted"] => Some(KeySubject::Deleted(id.parse().ok()?)),
            ["log", "checkpoint"] => Some(KeySubject::Checkpoint),
            ["key", id, "erased", hsm] => {
                Some(KeySubject::Erased(id.parse().ok()?, hsm.parse().ok()?))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_matches_the_design() {
        let s = Subjects::default();
        let k: KeyId = "0190f3a2-0000-7000-8000-000000000001"
            .parse()
            .expect("uuid");
        let h = HsmId::new("hsm-1").expect("id");
        assert_eq!(s.events_stream(), "KEYSYNC_EVENTS");
        assert_eq!(s.commands_stream(), "KEYSYNC_CMD");
        assert_eq!(
            s.key_created(&k),
            "keysync.evt.key.0190f3a2-0000-7000-8000-000000000001.created"
        );
        assert_eq!(s.commands_for(&h), "keysync.cmd.hsm-1");
        assert_eq!(s.hsm_op(&h), "keysync.hsm.hsm-1.op");
        assert_eq!(s.any_op(), "keysync.op");
        assert_eq!(s.metrics_sync(), "keysync.metrics.sync");
        assert_eq!(s.lifecycle_stream(), "KEYSYNC_LIFECYCLE");
        assert_eq!(
            s.lifecycle_key(&k.to_string(), "created"),
            "keysync.lifecycle.key.0190f3a2-0000-7000-8000-000000000001.created"
        );
        assert_eq!(
            s.lifecycle_hsm(h.as_str(), "failed"),
            "keysync.lifecycle.hsm.hsm-1.failed"
        );
        let id = k.to_string();
        assert_eq!(s.key_of_event(&s.clone_applied(&k, &h)), Some(id.as_str()));
        assert_eq!(s.key_of_event(&s.key_created(&k)), Some(id.as_str()));
        assert_eq!(s.key_of_event(&s.hsm_joined(&h)), None);
        assert_eq!(s.key_of_event("other.evt.key.x.created"), None);
    }

    #[test]
    fn subjects_parse_back() {
        let s = Subjects::new("team-a.ks").expect("prefix");
        assert_eq!(s.events_stream(), "TEAM_A_KS_EVENTS");
        let k = KeyId::new();
        let h = HsmId::new("h2").expect("id");
        assert_eq!(
            s.parse_event(&s.key_created(&k)),
            Some(KeySubject::Created(k))
        );
        assert_eq!(
            s.parse_event(&s.clone_applied(&k, &h)),
            Some(KeySubject::Applied(k, h.clone()))
        );
        assert_eq!(
            s.parse_event(&s.hsm_joined(&h)),
            Some(KeySubject::HsmJoined(h.clone()))
        );
        assert_eq!(
            s.parse_event(&s.hsm_capabilities(&h)),
            Some(KeySubject::HsmCapabilities(h))
        );
        assert_eq!(s.parse_event("keysync.evt.key.x.created"), None);
        assert_eq!(s.parse_event("team-a.ks.evt.key"), None);
    }

    #[test]
    fn prefixes_are_validated() {
        for bad in ["", "a..b", "a.*", "a.>", "a b", ".a"] {
            assert!(Subjects::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
