//! The cluster domain key: the AES-256 key every HSM of one cluster holds,
//! under which key material travels between them.
//!
//! Material is wrapped with AES key wrap with padding (RFC 5649, the
//! `aes-kw` crate's KWP): the same bytes as PKCS#11 `CKM_AES_KEY_WRAP_PAD`,
//! so a software agent and a PKCS#11 HSM exchange blobs. The key file holds
//! 64 hex characters; it must not be readable by group or others.
//!
//! It lives here, not in the agent, because more than the agent handles the
//! file: `keysync cluster init` makes it and the local-stack harness hands it
//! to its agents, and neither should link an HSM to do so.

use std::path::Path;

use crate::secret_file::{self, SecretFileError};
use aes_kw::KwpAes256;
use hmac::{Hmac, KeyInit as _, Mac};
use keysync_schemas::DomainId;
use sha2::Sha256;
use zeroize::Zeroizing;

/// Errors loading or using the domain key.
#[derive(Debug, thiserror::Error)]
pub enum DomainKeyError {
    /// The file could not be read or written.
    #[error("domain key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is readable by group or others.
    #[error("domain key file {path} has mode {mode:o}: it must not be readable by group or others (chmod 600)")]
    Permissions {
        /// The file.
        path: String,
        /// Its mode bits.
        mode: u32,
    },
    /// The file does not hold 64 hex characters.
    #[error("domain key file {0} must hold exactly 64 hex characters (32 bytes)")]
    Format(String),
    /// The file already exists (refusing to overwrite a cluster's key).
    #[error("domain key file {0} already exists; refusing to overwrite it")]
    Exists(String),
    /// Unwrapping failed its integrity check.
    #[error("unwrap failed its integrity check (wrong domain key or corrupt blob)")]
    Integrity,
    /// Wrapping failed.
    #[error("wrap failed: {0}")]
    Wrap(String),
    /// The RNG failed.
    #[error("random number generator failed")]
    Rng,
}

impl From<SecretFileError> for DomainKeyError {
    fn from(e: SecretFileError) -> Self {
        match e {
            SecretFileError::Permissions { path, mode } => {
                DomainKeyError::Permissions { path, mode }
            }
            SecretFileError::Exists(path) => DomainKeyError::Exists(path),
            SecretFileError::Io { path, source } => DomainKeyError::Io { path, source },
        }
    }
}

/// The cluster domain key. Never logged (`Debug` is redacted), never sent.
pub struct DomainKey {
    key: Zeroizing<[u8; 32]>,
    id: DomainId,
}

impl std::fmt::Debug for DomainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DomainKey(id={}, [REDACTED])", self.id)
    }
}

impl DomainKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let key = Zeroizing::new(bytes);
        let id = derive_id(&key);
        DomainKey { key, id }
    }

    /// A fresh random domain key.
    pub fn generate() -> Result<Self, DomainKeyError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(bytes.as_mut()).map_err(|_| DomainKeyError::Rng)?;
        Ok(DomainKey::from_bytes(*bytes))
    }

    /// Loads the key from `path`, refusing a file others can read.
    pub fn load(path: &Path) -> Result<Self, DomainKeyError> {
        let text = secret_file::read(path)?;
        let mut bytes = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.trim(), bytes.as_mut())
            .map_err(|_| DomainKeyError::Format(path.display().to_string()))?;
        Ok(DomainKey::from_bytes(*bytes))
    }

    #[cfg(feature = "files")]
    /// Writes a new random key to `path` with mode 0600 (never overwrites).
    pub fn create_file(path: &Path) -> Result<Self, DomainKeyError> {
        let key = DomainKey::generate()?;
        let text = Zeroizing::new(format!("{}\n", hex::encode(key.key.as_ref())));
        secret_file::create(path, &text)?;
        Ok(key)
    }

    /// Identifies this key without revealing it.
    pub fn id(&self) -> DomainId {
        self.id
    }

    /// RFC 5649 wrap of `material`.
    pub fn wrap(&self, material: &[u8]) -> Result<Vec<u8>, DomainKeyError> {
        wrap_with(&self.key, material)
    }

    /// RFC 5649 unwrap; fails on any tampering or a wrong key.
    pub fn unwrap(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, DomainKeyError> {
        unwrap_with(&self.key, blob)
    }

    /// The domain key's check value: SHA-256 over a label and the RFC 5649
    /// wrap of the fixed, public [`check_key`] under the domain key. KWP is
    /// deterministic, so a PKCS#11 token that holds the domain key with wrap
    /// usage only computes the same bytes inside itself (`C_WrapKey` of a
    /// session object holding [`check_key`], then [`check_value_of`]): an
    /// agent can tell that its token holds this cluster's key without
    /// either side revealing it. Public; reveals only one known-plaintext
    /// AES block set, which AES withstands.
    pub fn check_value(&self) -> Result<[u8; 32], DomainKeyError> {
        Ok(check_value_of(&self.wrap(&check_key())?))
    }

    /// This key RFC 5649-wrapped under a one-time transport key, to put it
    /// into a PKCS#11 token with `C_UnwrapKey` under a session object
    /// holding `transport` (the token then keeps it sensitive and
    /// non-extractable). The domain key's bytes never leave this crate in
    /// the clear.
    pub fn wrapped_for_transport(&self, transport: &[u8; 32]) -> Result<Vec<u8>, DomainKeyError> {
        wrap_with(transport, self.key.as_ref())
    }

    /// Derives a purpose-bound sub-key (HKDF-SHA-256), e.g. an HSM's
    /// at-rest encryption key.
    pub fn derive(&self, salt: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(salt), self.key.as_ref());
        let mut out = Zeroizing::new([0u8; 32]);
        // 32 bytes is always a valid HKDF-SHA-256 output length.
        if hk.expand(info, out.as_mut()).is_err() {
            unreachable!("32-byte HKDF output is valid");
        }
        out
    }
}

/// Label hashed in front of the wrapped check key (see
/// [`DomainKey::check_value`]).
const CHECK_LABEL: &[u8] = b"keysync domain check v1\0";

/// The fixed, public 32-byte AES key whose wrap under a domain key gives
/// that key's check value: SHA-256 of `"keysync domain check key v1"`.
pub fn check_key() -> [u8; 32] {
    let mut h = <Sha256 as sha2::Digest>::new();
    sha2::Digest::update(&mut h, b"keysync domain check key v1");
    sha2::Digest::finalize(h).into()
}

/// The check value of a domain key from the RFC 5649 wrap of
/// [`check_key`] under it (made in software or inside a token).
pub fn check_value_of(wrapped_check_key: &[u8]) -> [u8; 32] {
    let mut h = <Sha256 as sha2::Digest>::new();
    sha2::Digest::update(&mut h, CHECK_LABEL);
    sha2::Digest::update(&mut h, wrapped_check_key);
    sha2::Digest::finalize(h).into()
}

fn derive_id(key: &[u8; 32]) -> DomainId {
    let mut id = [0u8; 8];
    if let Ok(mut mac) = <Hmac<Sha256>>::new_from_slice(key) {
        mac.update(b"keysync domain id v1");
        id.copy_from_slice(&mac.finalize().into_bytes()[..8]);
    }
    DomainId(id)
}

/// RFC 5649 wrap of `material` under an AES-256 key-encryption key.
pub fn wrap_with(kek: &[u8; 32], material: &[u8]) -> Result<Vec<u8>, DomainKeyError> {
    let kw = KwpAes256::new(kek.into());
    let mut buf = vec![0u8; material.len().div_ceil(8) * 8 + 8];
    let n = kw
        .wrap_key(material, &mut buf)
        .map_err(|e| DomainKeyError::Wrap(e.to_string()))?
        .len();
    buf.truncate(n);
    Ok(buf)
}

/// RFC 5649 unwrap under an AES-256 key-encryption key.
pub fn unwrap_with(kek: &[u8; 32], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, DomainKeyError> {
    if blob.len() < 16 || !blob.len().is_multiple_of(8) {
        return Err(DomainKeyError::Integrity);
    }
    let kw = KwpAes256::new(kek.into());
    let mut buf = Zeroizing::new(vec![0u8; blob.len() - 8]);
    let n = kw
        .unwrap_key(blob, &mut buf)
        .map_err(|_| DomainKeyError::Integrity)?
        .len();
    buf.truncate(n);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5649 section 6, second example: a 7-byte key under a 192-bit
    /// KEK. The crate is checked against it with AES-192 here so our
    /// buffer handling is known to produce RFC bytes.
    #[test]
    fn kwp_matches_rfc5649_vector() {
        use aes_kw::KwpAes192;
        let kek = hex::decode("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8").expect("hex");
        let key = hex::decode("466f7250617369").expect("hex");
        let want = hex::decode("afbeb0f07dfbf5419200f2ccb50bb24f").expect("hex");
        let kw = KwpAes192::new(kek.as_slice().try_into().expect("len"));
        let mut buf = [0u8; 16];
        assert_eq!(kw.wrap_key(&key, &mut buf).expect("wrap"), &want[..]);
    }

    #[test]
    fn wrap_round_trips_and_rejects_other_domains() {
        let a = DomainKey::generate().expect("key");
        let b = DomainKey::generate().expect("key");
        assert_ne!(a.id(), b.id());
        for len in [1usize, 7, 8, 32, 121, 1218] {
            let material: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let blob = a.wrap(&material).expect("wrap");
            assert_eq!(&a.unwrap(&blob).expect("unwrap")[..], &material[..]);
            assert!(b.unwrap(&blob).is_err());
            let mut bad = blob.clone();
            bad[3] ^= 0x40;
            assert!(a.unwrap(&bad).is_err());
        }
        assert!(a.unwrap(&[0u8; 5]).is_err());
    }

    #[test]
    fn check_value_is_stable_and_tells_keys_apart() {
        let a = DomainKey::from_bytes([7u8; 32]);
        let b = DomainKey::from_bytes([8u8; 32]);
        let cv = a.check_value().expect("cv");
        assert_eq!(cv, a.check_value().expect("cv"), "KWP is deterministic");
        assert_ne!(cv, b.check_value().expect("cv"));
        // Computed from a wrap made elsewhere (a token) the same way.
        let blob = wrap_with(&[7u8; 32], &check_key()).expect("wrap");
        assert_eq!(blob.len(), 40);
        assert_eq!(check_value_of(&blob), cv);
        // Pinned (computed independently with Python's `cryptography`
        // KWP), so a change to the scheme is a deliberate one.
        assert_eq!(
            hex::encode(check_key()),
            "597c43c611604ada1cdd32b7fe2020a01a49937bad31f94ec59e250abd904c93"
        );
        assert_eq!(
            hex::encode(cv),
            "c64755dc0f704ab7585de74c14334fa360f24562e8715dd3737a183a1e2176ad"
        );
    }

    #[test]
    fn transport_wrap_unwraps_to_the_key() {
        let k = DomainKey::from_bytes([9u8; 32]);
        let transport = [3u8; 32];
        let blob = k.wrapped_for_transport(&transport).expect("wrap");
        let back = unwrap_with(&transport, &blob).expect("unwrap");
        assert_eq!(&back[..], &[9u8; 32][..]);
    }

    #[test]
    fn key_file_is_private_and_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("domain.key");
        let k = DomainKey::create_file(&path).expect("create");
        assert!(matches!(
            DomainKey::create_file(&path),
            Err(DomainKeyError::Exists(_))
        ));
        let loaded = DomainKey::load(&path).expect("load");
        assert_eq!(k.id(), loaded.id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            assert!(matches!(
                DomainKey::load(&path),
                Err(DomainKeyError::Permissions { .. })
            ));
        }
        assert!(!format!("{k:?}").contains(&hex::encode(k.key.as_ref())));
    }
}
