//! Test builders: events with readable defaults, and a log that folds them
//! with sequences 1, 2, ... stored 1 ms apart, so tests read as "given
//! these events, when this one, then that".

use keysync_schemas::{
    CloneApplied, CloneFailed, CloneFailure, DomainId, Durability, EnrolledVia, Event, Fingerprint,
    HsmEnrolled, HsmFailed, HsmId, HsmJoined, HsmRecovered, HsmRevoked, JoinRequested,
    JoinTokenIssued, KeyAttributes, KeyCreated, KeyDeleted, KeyErased, KeyId, KeyOrigin,
    KeyReplicated, KeyType,
};

use keysync_schemas::Rejection;

use crate::state::{Change, ClusterState, EventMeta};

pub fn hsm(s: &str) -> HsmId {
    HsmId::new(s).expect("a valid test HSM id")
}

pub fn joined(h: &str) -> Event {
    Event::HsmJoined(HsmJoined {
        hsm: hsm(h),
        agent_version: "test".into(),
        token_keys: 0,
    })
}

pub fn capabilities(h: &str, holds: &[KeyType]) -> Event {
    Event::HsmCapabilities(keysync_schemas::HsmCapabilities {
        hsm: hsm(h),
        holds: holds.to_vec(),
    })
}

pub fn key_created(k: KeyId, h: &str, fp: u8, durability: Durability) -> KeyCreated {
    KeyCreated {
        key_id: k,
        key_type: KeyType::Ed25519,
        fingerprint: Fingerprint([fp; 32]),
        hsm: hsm(h),
        origin: KeyOrigin::Generated,
        attributes: KeyAttributes::default(),
        durability,
        domain: DomainId([0; 8]),
        wrapped: vec![1; 40],
        public_key: None,
    }
}

pub fn created(k: KeyId, h: &str, fp: u8) -> Event {
    Event::KeyCreated(key_created(k, h, fp, Durability::Logged))
}

pub fn created_with(k: KeyId, h: &str, fp: u8, durability: Durability) -> Event {
    Event::KeyCreated(key_created(k, h, fp, durability))
}

pub fn applied(k: KeyId, h: &str, fp: u8) -> Event {
    Event::CloneApplied(CloneApplied {
        key_id: k,
        hsm: hsm(h),
        fingerprint: Fingerprint([fp; 32]),
        already_present: false,
    })
}

/// A batch: `h` applied each `(key, fingerprint byte)`.
pub fn batch_applied(h: &str, keys: &[(KeyId, u8)]) -> Event {
    Event::ClonesApplied(keysync_schemas::ClonesApplied {
        hsm: hsm(h),
        applied: keys
            .iter()
            .map(|(k, fp)| keysync_schemas::AppliedKey {
                key_id: *k,
                fingerprint: Fingerprint([*fp; 32]),
                already_present: false,
            })
            .collect(),
    })
}

pub fn clone_failed(k: KeyId, h: &str) -> Event {
    Event::CloneFailed(CloneFailed {
        key_id: k,
        hsm: hsm(h),
        reason: CloneFailure::WrongDomain,
    })
}

pub fn replicated(k: KeyId, fp: u8) -> Event {
    Event::KeyReplicated(KeyReplicated {
        key_id: k,
        fingerprint: Fingerprint([fp; 32]),
        holders: Vec::new(),
        sync_latency_micros: 0,
        created_seq: 0,
    })
}

pub fn failed(h: &str) -> Event {
    Event::HsmFailed(HsmFailed {
        hsm: hsm(h),
        silent_ms: 5000,
    })
}

pub fn recovered(h: &str) -> Event {
    Event::HsmRecovered(HsmRecovered { hsm: hsm(h) })
}

pub fn revoked(h: &str) -> Event {
    Event::HsmRevoked(HsmRevoked { hsm: hsm(h) })
}

pub fn enrolled(h: &str, public_key: u8) -> Event {
    Event::HsmEnrolled(HsmEnrolled {
        hsm: hsm(h),
        public_key: [public_key; 32],
        via: EnrolledVia::Operator,
    })
}

pub fn token_issued(h: &str, token_key: u8, expires_at_ns: u64) -> Event {
    Event::JoinTokenIssued(JoinTokenIssued {
        hsm: hsm(h),
        token_key: [token_key; 32],
        expires_at_ns,
    })
}

pub fn join_requested(h: &str, public_key: u8, token_key: u8) -> Event {
    Event::JoinRequested(JoinRequested {
        hsm: hsm(h),
        public_key: [public_key; 32],
        token_key: [token_key; 32],
        proof: Vec::new(),
    })
}

pub fn deleted(k: KeyId, h: &str, fp: u8) -> Event {
    Event::KeyDeleted(KeyDeleted {
        key_id: k,
        fingerprint: Fingerprint([fp; 32]),
        hsm: hsm(h),
    })
}

pub fn erased(k: KeyId, h: &str) -> Event {
    Event::KeyErased(KeyErased {
        key_id: k,
        hsm: hsm(h),
        was_present: true,
    })
}

/// Where the `seq`th event of a test log sits: stored `seq` ms after the epoch.
pub fn meta(seq: u64) -> EventMeta {
    EventMeta {
        seq,
        stored_at_ns: seq * 1_000_000,
    }
}

/// A fold over a test log.
pub struct Log {
    pub state: ClusterState,
    pub seq: u64,
}

impl Log {
    /// The state after `events`, every result ignored.
    pub fn given(events: &[Event]) -> Self {
        let mut log = Log {
            state: ClusterState::default(),
            seq: 0,
        };
        for e in events {
            let _ = log.when(e);
        }
        log
    }

    /// Folds one more event, at the next sequence.
    pub fn when(&mut self, e: &Event) -> Result<Change, Rejection> {
        self.seq += 1;
        self.state.apply(meta(self.seq), e)
    }
}
