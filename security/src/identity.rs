//! Ed25519 identities.
//!
//! An identity file holds the 32-byte private seed in hex, mode 0600. It is
//! read into a zeroizing buffer; the signing key zeroizes itself on drop.
//! Nothing prints it: `Debug` shows the public key only.

use std::path::Path;

use ed25519_dalek::{Signer as _, SigningKey};
use zeroize::Zeroizing;

use crate::secret_file::{self, SecretFileError};

/// Where the cluster identity lives when no `--identity` is given: a fixed
/// system path (systemd's `StateDirectory=keysync`), never one relative to
/// the directory a process happens to start in, which would scatter cluster
/// private keys wherever an orchestrator or `keysync hsm` was run.
pub const DEFAULT_CLUSTER_IDENTITY: &str = "/var/lib/keysync/cluster.key";

/// Why an identity could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file could not be read or written, or is too open.
    #[error(transparent)]
    File(#[from] SecretFileError),
    /// The file does not hold a 64-hex-digit seed.
    #[error("{0} does not hold an identity (64 hex digits)")]
    Format(String),
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Rng,
}

/// An Ed25519 identity: a signing key.
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", hex::encode(self.public_key()))
    }
}

impl Identity {
    /// A new random identity.
    pub fn generate() -> Result<Self, IdentityError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(|_| IdentityError::Rng)?;
        Ok(Self::from_seed(&seed))
    }

    /// The identity of a 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Identity {
            key: SigningKey::from_bytes(seed),
        }
    }

    /// The seed (for a join token, which is handed to a person once).
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.key.to_bytes())
    }

    /// Loads the identity in `path`, refusing a file others may read.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let text = secret_file::read(path)?;
        let mut seed = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.trim(), seed.as_mut())
            .map_err(|_| IdentityError::Format(path.display().to_string()))?;
        Ok(Self::from_seed(&seed))
    }

    #[cfg(feature = "files")]
    /// Writes a new identity to `path` (mode 0600; never overwrites).
    pub fn create_file(path: &Path) -> Result<Self, IdentityError> {
        let id = Self::generate()?;
        let text = Zeroizing::new(format!("{}\n", hex::encode(id.seed().as_ref())));
        secret_file::create(path, &text)?;
        Ok(id)
    }

    #[cfg(feature = "files")]
    /// Loads `path`, or makes it if it does not exist. Returns whether it
    /// was made.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), IdentityError> {
        if path.exists() {
            return Ok((Self::load(path)?, false));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Missing directories are made private; existing ones are the
            // operator's (`/etc/keysync`, say) and left as they are.
            secret_file::create_private_dirs(dir)?;
        }
        match Self::create_file(path) {
            Ok(id) => Ok((id, true)),
            // Another process made it first: use theirs.
            Err(IdentityError::File(SecretFileError::Exists(_))) => Ok((Self::load(path)?, false)),
            Err(e) => Err(e),
        }
    }

    /// The public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The public key in hex (how operators pass it around).
    pub fn public_hex(&self) -> String {
        hex::encode(self.public_key())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

/// Decompressed public keys, so a key used again and again (an enrolled
/// HSM's, the cluster's) is decompressed once. Bounded: cleared when full.
static KEYS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<[u8; 32], ed25519_dalek::VerifyingKey>>,
> = std::sync::LazyLock::new(Default::default);

const KEY_CACHE_MAX: usize = 4096;

/// The decompressed key, or `None` for bytes that are not a usable key
/// (not a point, or a weak, small-order one: anyone could sign for it).
fn verifying_key(public_key: &[u8; 32]) -> Option<ed25519_dalek::VerifyingKey> {
    if let Some(k) = KEYS.lock().ok().and_then(|c| c.get(public_key).copied()) {
        return Some(k);
    }
    let key = ed25519_dalek::VerifyingKey::from_bytes(public_key).ok()?;
    if key.is_weak() {
        return None;
    }
    if let Ok(mut c) = KEYS.lock() {
        if c.len() >= KEY_CACHE_MAX {
            c.clear();
        }
        c.insert(*public_key, key);
    }
    Some(key)
}

/// Checks an Ed25519 signature: RFC 8032 verification with a canonical
/// `s`, by a key that is not weak. (`verify_strict` also refuses a
/// small-order component in `R`, which matters to protocols that need a
/// signature to be unique; keysync binds what it needs, the message id,
/// inside the signed bytes, and verification is 30 % cheaper without it.)
///
/// A verification that succeeded is remembered (see [`VerifiedMemo`]): one
/// process often checks the same message more than once (the
/// orchestrator's fold, its audit appender and its lifecycle mirror each
/// read every event), and Ed25519 verification was 40 % of the
/// orchestrator's CPU under load, three times per event (decision 20).
pub fn verify(public_key: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
    use ed25519_dalek::Verifier as _;
    let digest = VerifiedMemo::digest(public_key, message, signature);
    if VERIFIED.contains(&digest) {
        return true;
    }
    let Some(key) = verifying_key(public_key) else {
        return false;
    };
    let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
        return false;
    };
    let ok = key.verify(message, &sig).is_ok();
    if ok {
        VERIFIED.insert(digest);
    }
    ok
}

/// Successful verifications of this process, by SHA-256 of the public key,
/// the signature and the message, the most recently used [`VerifiedMemo::CAPACITY`].
///
/// Sound because verification is a pure function of those three inputs:
/// a digest found here stands for exactly the bytes that verified before
/// (finding a second input with the same SHA-256 is out of reach), so the
/// answer is the one verifying again would give. Only successes are kept,
/// so nothing anyone sends can fill it without a valid signature, and it
/// is bounded (least recently used forgotten first; a forgotten one is
/// verified again).
struct VerifiedMemo {
    seen: std::sync::Mutex<lru::LruCache<[u8; 32], ()>>,
}

impl VerifiedMemo {
    /// Enough for the events a busy orchestrator's readers are apart
    /// (tens of bytes each in the cache: about 1 MiB at most).
    const CAPACITY: usize = 16_384;

    fn digest(public_key: &[u8; 32], message: &[u8], signature: &[u8]) -> [u8; 32] {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(public_key);
        // The signature's length first: the split between it and the
        // message is then unambiguous.
        h.update((signature.len() as u64).to_be_bytes());
        h.update(signature);
        h.update(message);
        h.finalize().into()
    }

    fn new() -> Self {
        let capacity =
            std::num::NonZeroUsize::new(Self::CAPACITY).unwrap_or(std::num::NonZeroUsize::MIN);
        VerifiedMemo {
            seen: std::sync::Mutex::new(lru::LruCache::new(capacity)),
        }
    }

    /// Whether `d` verified before (and keep it fresh if so).
    fn contains(&self, d: &[u8; 32]) -> bool {
        self.seen.lock().is_ok_and(|mut s| s.get(d).is_some())
    }

    fn insert(&self, d: [u8; 32]) {
        if let Ok(mut s) = self.seen.lock() {
            s.put(d, ());
        }
    }
}

static VERIFIED: std::sync::LazyLock<VerifiedMemo> = std::sync::LazyLock::new(VerifiedMemo::new);

/// Parses a public key given as 64 hex digits (refusing a weak one).
pub fn parse_public_key(text: &str) -> Result<[u8; 32], String> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key)
        .map_err(|_| "a public key is 64 hex digits".to_string())?;
    match ed25519_dalek::VerifyingKey::from_bytes(&key) {
        Ok(k) if !k.is_weak() => Ok(key),
        Ok(_) => Err("a weak (small-order) Ed25519 key".to_string()),
        Err(_) => Err("not an Ed25519 public key".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_and_are_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("id.key");
        let (made, created) = Identity::load_or_create(&path).expect("create");
        assert!(created);
        let (loaded, created) = Identity::load_or_create(&path).expect("load");
        assert!(!created);
        assert_eq!(made.public_key(), loaded.public_key());
        let sig = made.sign(b"hello");
        assert!(verify(&loaded.public_key(), b"hello", &sig));
        assert!(!verify(&loaded.public_key(), b"hellO", &sig));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
            assert!(matches!(
                Identity::load(&path),
                Err(IdentityError::File(SecretFileError::Permissions { .. }))
            ));
        }
        assert!(matches!(
            Identity::create_file(&path),
            Err(IdentityError::File(SecretFileError::Exists(_)))
        ));
    }

    #[test]
    fn debug_shows_only_the_public_key() {
        let id = Identity::generate().expect("rng");
        let shown = format!("{id:?}");
        assert!(shown.contains(&id.public_hex()));
        assert!(!shown.contains(&hex::encode(id.seed().as_ref())));
    }

    #[test]
    fn a_remembered_verification_vouches_only_for_the_same_bytes() {
        let id = Identity::generate().expect("identity");
        let other = Identity::generate().expect("identity");
        let msg = b"an event's signed bytes";
        let sig = id.sign(msg);
        assert!(verify(&id.public_key(), msg, &sig));
        // Remembered now: the same check answers the same...
        assert!(VERIFIED.contains(&VerifiedMemo::digest(&id.public_key(), msg, &sig)));
        assert!(verify(&id.public_key(), msg, &sig));
        // ...and nothing else rides on it: another message, key or signature.
        assert!(!verify(&id.public_key(), b"an event's signed bytes!", &sig));
        assert!(!verify(&other.public_key(), msg, &sig));
        let mut bad = sig;
        bad[0] ^= 1;
        assert!(!verify(&id.public_key(), msg, &bad));
        // Failures are not remembered.
        assert!(!VERIFIED.contains(&VerifiedMemo::digest(&id.public_key(), msg, &bad)));
    }

    #[test]
    fn remembered_verifications_are_bounded() {
        let v = VerifiedMemo::new();
        for i in 0..VerifiedMemo::CAPACITY as u64 + 10 {
            v.insert(VerifiedMemo::digest(&[0; 32], &i.to_be_bytes(), b"s"));
        }
        let len = v.seen.lock().map(|s| s.len()).expect("lock");
        assert_eq!(len, VerifiedMemo::CAPACITY);
        // The oldest went first.
        assert!(!v.contains(&VerifiedMemo::digest(&[0; 32], &0u64.to_be_bytes(), b"s")));
        let last = VerifiedMemo::CAPACITY as u64 + 9;
        assert!(v.contains(&VerifiedMemo::digest(&[0; 32], &last.to_be_bytes(), b"s")));
    }

    #[test]
    fn public_keys_parse() {
        let id = Identity::generate().expect("rng");
        assert_eq!(parse_public_key(&id.public_hex()), Ok(id.public_key()));
        assert!(parse_public_key("00").is_err());
        // The identity point: weak, so anyone could sign for it.
        let mut weak = [0u8; 32];
        weak[0] = 1;
        assert!(parse_public_key(&hex::encode(weak)).is_err());
        assert!(!verify(&weak, b"m", &[0u8; 64]));
        assert!(parse_public_key(&"zz".repeat(32)).is_err());
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// Prints the cost of one signature and one verification (run with
    /// `--release --ignored --nocapture`).
    #[test]
    #[ignore]
    fn sign_and_verify_speed() {
        let id = Identity::generate().expect("rng");
        let msg = vec![7u8; 300];
        let n = 5000;
        let t = std::time::Instant::now();
        let mut sig = [0u8; 64];
        for _ in 0..n {
            sig = id.sign(&msg);
        }
        let sign = t.elapsed() / n;
        let t = std::time::Instant::now();
        for _ in 0..n {
            assert!(verify(&id.public_key(), &msg, &sig));
        }
        let verify_each = t.elapsed() / n;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&id.public_key()).expect("key");
        let sig = ed25519_dalek::Signature::from_bytes(&sig);
        let t = std::time::Instant::now();
        for _ in 0..n {
            assert!(key.verify_strict(&msg, &sig).is_ok());
        }
        let once = t.elapsed() / n;
        let t = std::time::Instant::now();
        for _ in 0..n {
            use ed25519_dalek::Verifier as _;
            assert!(key.verify(&msg, &sig).is_ok());
        }
        println!(
            "sign {:?}, verify {:?}, verify with the key decompressed once {:?}, non-strict {:?}",
            sign,
            verify_each,
            once,
            t.elapsed() / n
        );
    }
}
