//! Keys minted outside any keystore, in exactly the form an agent
//! publishes them: the documented seam for load generators.
//!
//! `keysync bench` measures a bootstrap into 100,000 keys and a recovery
//! over 1,000,000 events; creating those through real agents would measure
//! the agents, not the orchestrator. It mints them here instead and
//! publishes them as an enrolled HSM that never runs (see
//! `keysync_harness::seed`). This module is the only part of the agent that
//! is meant to be used that way: it shares the agent's own material,
//! fingerprint and wrapping code, so a joining HSM stores what it mints.

use keysync_schemas::{Fingerprint, KeyType};
use keysync_security::domain_key::{DomainKey, DomainKeyError};

use crate::material::{KeyMaterial, MaterialError};

/// A freshly generated key, wrapped for the cluster; the plaintext is gone
/// when [`mint`] returns.
#[derive(Debug, Clone)]
pub struct Minted {
    /// What the fingerprint of a `KeyCreated` for this key must be.
    pub fingerprint: Fingerprint,
    /// The material wrapped under the domain key (RFC 5649).
    pub wrapped: Vec<u8>,
    /// The SPKI DER of an asymmetric key.
    pub public_key: Option<Vec<u8>>,
}

/// Why a key could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// Generating or encoding the key failed.
    #[error(transparent)]
    Material(#[from] MaterialError),
    /// Wrapping it failed.
    #[error(transparent)]
    Wrap(#[from] DomainKeyError),
}

/// Generates a key of `key_type` and wraps it under `domain`, as an agent
/// does on create.
pub fn mint(domain: &DomainKey, key_type: KeyType) -> Result<Minted, MintError> {
    let m = KeyMaterial::generate(key_type)?;
    Ok(Minted {
        fingerprint: m.fingerprint()?,
        wrapped: domain.wrap(&m.to_bytes()?)?,
        public_key: m.public_key_der()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_keys_unwrap_to_their_fingerprint() {
        let domain = DomainKey::generate().expect("domain key");
        for ty in [KeyType::P256, KeyType::Ed25519, KeyType::Aes256] {
            let m = mint(&domain, ty).expect("mint");
            let bytes = domain.unwrap(&m.wrapped).expect("unwrap");
            let back = KeyMaterial::from_bytes(ty, &bytes).expect("material");
            assert_eq!(back.fingerprint().expect("fingerprint"), m.fingerprint);
            assert_eq!(ty == KeyType::Aes256, m.public_key.is_none());
        }
    }
}
