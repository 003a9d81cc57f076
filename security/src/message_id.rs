//! Keyed message ids: deterministic for the orchestrators, unpredictable
//! to everyone else.
//!
//! JetStream drops a message whose `Nats-Msg-Id` it has stored within its
//! duplicate window, across the whole stream. The orchestrator derives its
//! ids from content, so that a restarted or standby orchestrator publishes
//! what is outstanding under the same ids and JetStream stores it once
//! (decision 8). Made from public content alone, those ids could be
//! computed by anyone who reads the log, and junk published first under
//! them would make JetStream drop the real command or event as its
//! duplicate.
//!
//! So the content is MACed (HMAC-SHA-256) under a key only orchestrators
//! hold: [`MessageIdKey::derive`] derives it with HKDF-SHA-256 from the
//! cluster identity's private seed, which every orchestrator of a cluster
//! shares, under a label of its own (the seed itself is only ever used
//! to sign). The same content gives the same id on every orchestrator of
//! the cluster and after any restart; without the seed, an id cannot be
//! told in advance. 128 bits of the MAC are kept.

use hmac::{Hmac, KeyInit as _, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::identity::Identity;

/// HKDF salt: what the derived key is for.
const SALT: &[u8] = b"keysync message-id key";
/// HKDF info: the version of the derivation.
const INFO: &[u8] = b"keysync message-id key v1";

/// The key message ids are MACed under. `Debug` never shows it.
#[derive(Clone)]
pub struct MessageIdKey {
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for MessageIdKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageIdKey([REDACTED])")
    }
}

impl MessageIdKey {
    /// The message-id key of the cluster whose identity is `cluster`:
    /// HKDF-SHA-256 over its private seed, with a salt and info of its own.
    pub fn derive(cluster: &Identity) -> Self {
        let seed = cluster.seed();
        let hk = hkdf::Hkdf::<Sha256>::new(Some(SALT), seed.as_ref());
        let mut key = Zeroizing::new([0u8; 32]);
        // 32 bytes is always a valid HKDF-SHA-256 output length.
        if hk.expand(INFO, key.as_mut()).is_err() {
            unreachable!("32-byte HKDF output is valid");
        }
        MessageIdKey { key }
    }

    /// The tag of `fields` under `label`: HMAC-SHA-256 over the label and
    /// each field, each preceded by its length (so no two different lists
    /// of fields give the same bytes), truncated to 128 bits, in hex.
    pub fn tag(&self, label: &str, fields: &[&[u8]]) -> String {
        let Ok(mut mac) = <Hmac<Sha256>>::new_from_slice(self.key.as_ref()) else {
            unreachable!("HMAC takes a key of any length");
        };
        mac.update(&(label.len() as u64).to_be_bytes());
        mac.update(label.as_bytes());
        for f in fields {
            mac.update(&(f.len() as u64).to_be_bytes());
            mac.update(f);
        }
        hex::encode(&mac.finalize().into_bytes()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(byte: u8) -> Identity {
        Identity::from_seed(&[byte; 32])
    }

    #[test]
    fn the_same_cluster_gives_the_same_tags() {
        // Two orchestrators loading one cluster identity file.
        let a = MessageIdKey::derive(&identity(7));
        let b = MessageIdKey::derive(&identity(7));
        assert_eq!(
            a.tag("delete", &[b"k", b"h"]),
            b.tag("delete", &[b"k", b"h"])
        );
        assert_eq!(a.tag("delete", &[b"k", b"h"]).len(), 32);
    }

    #[test]
    fn another_cluster_label_or_content_gives_another_tag() {
        let a = MessageIdKey::derive(&identity(7));
        let other = MessageIdKey::derive(&identity(8));
        let t = a.tag("delete", &[b"k", b"h"]);
        assert_ne!(t, other.tag("delete", &[b"k", b"h"]));
        assert_ne!(t, a.tag("clone", &[b"k", b"h"]));
        assert_ne!(t, a.tag("delete", &[b"k", b"i"]));
        // Field boundaries count: ("kh") is not ("k", "h").
        assert_ne!(t, a.tag("delete", &[b"kh"]));
        assert_ne!(a.tag("delete", &[b"k", b""]), a.tag("delete", &[b"k"]));
    }

    #[test]
    fn the_key_is_not_the_seed_and_is_never_shown() {
        let id = identity(7);
        let key = MessageIdKey::derive(&id);
        assert_ne!(key.key.as_ref(), id.seed().as_ref());
        assert_eq!(format!("{key:?}"), "MessageIdKey([REDACTED])");
    }

    #[test]
    fn a_known_answer_pins_the_derivation() {
        // Changing the derivation changes every id: a restart across such
        // a change would send its outstanding work again under new ids.
        // Pinned (computed apart, with Python's hmac and hashlib), so that
        // happens only on purpose.
        let key = MessageIdKey::derive(&identity(0));
        assert_eq!(
            key.tag("replicated", &[b"x"]),
            "af196294bbe78e05795b56d5fd469f3b"
        );
    }
}
