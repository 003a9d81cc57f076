//! Heartbeats: every agent says it is alive, and what it holds, every
//! second on core NATS (`<prefix>.hsm.<id>.heartbeat`; not logged).
//!
//! The inventory digest is order-independent and updated in O(1) per key
//! (XOR of a SHA-256 per key id and fingerprint), so an agent and the
//! orchestrator can both keep it current and compare it every second;
//! a lasting mismatch starts an anti-entropy repair. It detects divergence;
//! it is not a security mechanism.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::{Fingerprint, HsmId, KeyId};

/// The XOR of `SHA-256("keysync inventory v1" ‖ key id ‖ fingerprint)` over a
/// set of keys. The empty set is all zeros.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InventoryDigest(pub [u8; 32]);

impl InventoryDigest {
    /// Adds a key to the set, or removes it (XOR is its own inverse).
    pub fn toggle(&mut self, key: &KeyId, fingerprint: &Fingerprint) {
        let mut h = Sha256::new();
        h.update(b"keysync inventory v1");
        h.update(key.0.as_bytes());
        h.update(fingerprint.0);
        let d: [u8; 32] = h.finalize().into();
        for (a, b) in self.0.iter_mut().zip(d) {
            *a ^= b;
        }
    }
}

/// An agent's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The HSM.
    pub hsm: HsmId,
    /// Token keys it holds.
    pub token_keys: u64,
    /// Digest of its token keys.
    pub digest: InventoryDigest,
    /// `KeyCreated` events stored and not yet acknowledged.
    pub outbox: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_order_independent_and_reversible() {
        let (k1, k2) = (KeyId::new(), KeyId::new());
        let (f1, f2) = (Fingerprint([1; 32]), Fingerprint([2; 32]));
        let mut a = InventoryDigest::default();
        a.toggle(&k1, &f1);
        a.toggle(&k2, &f2);
        let mut b = InventoryDigest::default();
        b.toggle(&k2, &f2);
        b.toggle(&k1, &f1);
        assert_eq!(a, b);
        b.toggle(&k2, &f2);
        assert_ne!(a, b);
        b.toggle(&k1, &f1);
        assert_eq!(b, InventoryDigest::default());
        let mut c = InventoryDigest::default();
        c.toggle(&k1, &f2);
        assert_ne!(c.0, {
            let mut d = InventoryDigest::default();
            d.toggle(&k1, &f1);
            d.0
        });
    }
}
