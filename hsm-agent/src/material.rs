//! Key material of the embedded (software) HSM and the operations on it.
//!
//! Every algorithm comes from RustCrypto or dalek; nothing here is
//! hand-rolled. Material serialises as PKCS#8 DER (asymmetric keys) or the
//! raw 32 bytes (AES-256): the forms PKCS#11 HSMs wrap and unwrap with
//! `CKM_AES_KEY_WRAP_PAD`, so blobs move between software and hardware.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use hmac::{Hmac, Mac};
use keysync_schemas::{DigestAlg, DigestSignScheme, Fingerprint, GcmParams, KeyType};
use p256::pkcs8::EncodePublicKey as _;
use sha2::{Digest, Sha256};
use signature::{SignatureEncoding as _, Signer as _, Verifier as _};
use zeroize::Zeroizing;

/// Bytes of an AES-GCM nonce.
pub const GCM_NONCE_LEN: usize = 12;

/// Errors of key material handling.
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    /// The bytes are not a valid key of the stated type.
    #[error("not a valid {0} key")]
    Invalid(KeyType),
    /// The key type cannot do this operation.
    #[error("a {key_type} key cannot {op}")]
    Unsupported {
        /// The key type.
        key_type: KeyType,
        /// The operation.
        op: &'static str,
    },
    /// Decryption failed its integrity check.
    #[error("decryption failed its integrity check")]
    Integrity,
    /// The random number generator failed.
    #[error("random number generator failed")]
    Rng,
    /// An encoding step failed.
    #[error("encoding failed: {0}")]
    Encoding(String),
    /// The input is not what the operation takes (a digest of the wrong
    /// length, parameters keysync does not support): the caller's mistake.
    #[error("bad input: {0}")]
    BadInput(String),
}

/// A key's secret material, held in types that zeroize on drop.
pub enum KeyMaterial {
    /// ECDSA P-256.
    P256(p256::ecdsa::SigningKey),
    /// Ed25519.
    Ed25519(ed25519_dalek::SigningKey),
    /// AES-256.
    Aes256(Zeroizing<[u8; 32]>),
    /// RSA-2048 (boxed: it is large).
    Rsa2048(Box<rsa::PrivateKey>),
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyMaterial::{}([REDACTED])", self.key_type())
    }
}

/// The public key of a P-256 PKCS#8 private key, checked as
/// `SigningKey::from_pkcs8_der` checks it (the algorithm and curve, a
/// scalar in range, and the public key the key carries, if any, equal to
/// the one its scalar gives), with one scalar multiplication: the same
/// library parsers, read once.
fn p256_checked_public_key(der: &[u8]) -> Result<p256::PublicKey, MaterialError> {
    use p256::elliptic_curve::{sec1::ToSec1Point as _, ALGORITHM_OID};
    use p256::pkcs8::{der::Decode as _, AssociatedOid as _};
    fn invalid<E>(_: E) -> MaterialError {
        MaterialError::Invalid(KeyType::P256)
    }
    let info = p256::pkcs8::PrivateKeyInfoRef::from_der(der).map_err(invalid)?;
    info.algorithm
        .assert_oids(ALGORITHM_OID, p256::NistP256::OID)
        .map_err(invalid)?;
    let ec = sec1::EcPrivateKey::from_der(info.private_key.as_bytes()).map_err(invalid)?;
    if let Some(sec1::EcParameters::NamedCurve(curve)) = ec.parameters {
        if curve != p256::NistP256::OID {
            return Err(MaterialError::Invalid(KeyType::P256));
        }
    }
    let secret = p256::SecretKey::from_slice(ec.private_key).map_err(invalid)?;
    let public = secret.public_key();
    if let Some(carried) = ec.public_key {
        let carried = p256::Sec1Point::from_bytes(carried).map_err(invalid)?;
        if public.to_sec1_point(carried.is_compressed()) != carried {
            return Err(MaterialError::Invalid(KeyType::P256));
        }
    }
    Ok(public)
}

/// PKCS#8 DER of a P-256 key, byte for byte what `to_pkcs8_der` writes
/// (SEC1 `ECPrivateKey` with the uncompressed public key, curve named in
/// the algorithm), but with the public key the signing key holds:
/// `to_pkcs8_der` derives it again from the scalar (a scalar
/// multiplication, ~0.1 ms of a create).
fn p256_pkcs8(key: &p256::ecdsa::SigningKey) -> Result<Zeroizing<Vec<u8>>, MaterialError> {
    use p256::pkcs8::der::{asn1::OctetStringRef, Encode as _};
    use p256::pkcs8::AssociatedOid as _;
    let enc = |e: p256::pkcs8::der::Error| MaterialError::Encoding(e.to_string());
    let secret = Zeroizing::new(key.to_bytes());
    let public = key.verifying_key().to_sec1_point(false);
    let ec = Zeroizing::new(
        sec1::EcPrivateKey {
            private_key: &secret,
            parameters: None,
            public_key: Some(public.as_bytes()),
        }
        .to_der()
        .map_err(enc)?,
    );
    let info = p256::pkcs8::PrivateKeyInfoRef::new(
        p256::pkcs8::AlgorithmIdentifierRef {
            oid: p256::elliptic_curve::ALGORITHM_OID,
            parameters: Some((&p256::NistP256::OID).into()),
        },
        OctetStringRef::new(&ec).map_err(enc)?,
    );
    Ok(Zeroizing::new(info.to_der().map_err(enc)?))
}

/// Fills `buf` from the operating system's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), MaterialError> {
    getrandom::fill(buf).map_err(|_| MaterialError::Rng)
}

impl KeyMaterial {
    /// Generates a fresh key inside this process.
    pub fn generate(key_type: KeyType) -> Result<Self, MaterialError> {
        use p256::elliptic_curve::Generate as _;
        Ok(match key_type {
            KeyType::P256 => KeyMaterial::P256(
                p256::ecdsa::SigningKey::try_generate().map_err(|_| MaterialError::Rng)?,
            ),
            KeyType::Ed25519 => {
                let mut seed = Zeroizing::new([0u8; 32]);
                random_bytes(seed.as_mut())?;
                KeyMaterial::Ed25519(ed25519_dalek::SigningKey::from_bytes(&seed))
            }
            KeyType::Aes256 => {
                let mut k = Zeroizing::new([0u8; 32]);
                random_bytes(k.as_mut())?;
                KeyMaterial::Aes256(k)
            }
            KeyType::Rsa2048 => {
                let mut rng = getrandom::SysRng;
                let key = rsa::PrivateKey::new(&mut rng, 2048)
                    .map_err(|e| MaterialError::Encoding(e.to_string()))?;
                KeyMaterial::Rsa2048(Box::new(key))
            }
        })
    }

    /// Parses material: PKCS#8 DER for asymmetric keys, 32 raw bytes for AES.
    /// PKCS#8 may carry the zero padding some PKCS#11 tokens add before
    /// wrapping (see [`trim_wrap_padding`]).
    pub fn from_bytes(key_type: KeyType, bytes: &[u8]) -> Result<Self, MaterialError> {
        let invalid = |_| MaterialError::Invalid(key_type);
        let bytes = if key_type.is_asymmetric() {
            trim_wrap_padding(bytes)
        } else {
            bytes
        };
        Ok(match key_type {
            KeyType::P256 => {
                KeyMaterial::P256(p256::ecdsa::SigningKey::from_pkcs8_der(bytes).map_err(invalid)?)
            }
            KeyType::Ed25519 => KeyMaterial::Ed25519(
                ed25519_dalek::SigningKey::from_pkcs8_der(bytes).map_err(invalid)?,
            ),
            KeyType::Aes256 => {
                let arr: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| MaterialError::Invalid(key_type))?;
                KeyMaterial::Aes256(Zeroizing::new(arr))
            }
            KeyType::Rsa2048 => {
                let key = rsa::PrivateKey::from_pkcs8_der(bytes).map_err(invalid)?;
                if rsa::traits::PublicKeyParts::size(&key) != 256 {
                    return Err(MaterialError::Invalid(key_type));
                }
                KeyMaterial::Rsa2048(Box::new(key))
            }
        })
    }

    /// The fingerprint of key bytes in [`KeyMaterial::from_bytes`]'s form,
    /// after the same checks `from_bytes` makes, for a caller that keeps the
    /// bytes and has no use for the parsed key (a clone stores what it
    /// unwrapped). A P-256 key's public key is derived once here, where
    /// `from_bytes` derives it twice (once to check the public key the
    /// PKCS#8 carries, once more to build the signing key): each derivation
    /// is a scalar multiplication, ~0.1 ms, most of a clone's checks.
    pub fn checked_fingerprint(
        key_type: KeyType,
        bytes: &[u8],
    ) -> Result<Fingerprint, MaterialError> {
        match key_type {
            KeyType::P256 => {
                let public = p256_checked_public_key(trim_wrap_padding(bytes))?;
                let spki = public
                    .to_public_key_der()
                    .map_err(|e| MaterialError::Encoding(e.to_string()))?;
                Ok(public_fingerprint(key_type, spki.as_bytes()))
            }
            _ => KeyMaterial::from_bytes(key_type, bytes)?.fingerprint(),
        }
    }

    /// The key's type.
    pub fn key_type(&self) -> KeyType {
        match self {
            KeyMaterial::P256(_) => KeyType::P256,
            KeyMaterial::Ed25519(_) => KeyType::Ed25519,
            KeyMaterial::Aes256(_) => KeyType::Aes256,
            KeyMaterial::Rsa2048(_) => KeyType::Rsa2048,
        }
    }

    /// The material in its exchange form (PKCS#8 DER or raw AES bytes).
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>, MaterialError> {
        let enc = |e: p256::pkcs8::Error| MaterialError::Encoding(e.to_string());
        Ok(match self {
            KeyMaterial::P256(k) => p256_pkcs8(k)?,
            KeyMaterial::Ed25519(k) => {
                Zeroizing::new(k.to_pkcs8_der().map_err(enc)?.as_bytes().to_vec())
            }
            KeyMaterial::Aes256(k) => Zeroizing::new(k.to_vec()),
            KeyMaterial::Rsa2048(k) => {
                Zeroizing::new(k.to_pkcs8_der().map_err(enc)?.as_bytes().to_vec())
            }
        })
    }

    /// SPKI DER of the public key; `None` for secret keys.
    pub fn public_key_der(&self) -> Result<Option<Vec<u8>>, MaterialError> {
        let enc = |e: p256::pkcs8::spki::Error| MaterialError::Encoding(e.to_string());
        Ok(match self {
            KeyMaterial::P256(k) => Some(
                k.verifying_key()
                    .to_public_key_der()
                    .map_err(enc)?
                    .into_vec(),
            ),
            KeyMaterial::Ed25519(k) => Some(
                k.verifying_key()
                    .to_public_key_der()
                    .map_err(enc)?
                    .into_vec(),
            ),
            KeyMaterial::Aes256(_) => None,
            KeyMaterial::Rsa2048(k) => Some(
                k.to_public_key()
                    .to_public_key_der()
                    .map_err(enc)?
                    .into_vec(),
            ),
        })
    }

    /// The fingerprint every HSM computes alike. Asymmetric keys: SHA-256 of
    /// a label, the type and the SPKI DER ([`public_fingerprint`]). Secret
    /// keys: HMAC-SHA-256 under the key itself of
    /// [`secret_fingerprint_message`], which reveals nothing of the key (the
    /// PKCS#11 key-check-value idea, with a modern MAC).
    pub fn fingerprint(&self) -> Result<Fingerprint, MaterialError> {
        match self {
            KeyMaterial::Aes256(k) => {
                let mut mac = <Hmac<Sha256>>::new_from_slice(k.as_ref())
                    .map_err(|e| MaterialError::Encoding(e.to_string()))?;
                mac.update(&secret_fingerprint_message(self.key_type()));
                Ok(Fingerprint(mac.finalize().into_bytes().into()))
            }
            _ => {
                let spki = self.public_key_der()?.unwrap_or_default();
                Ok(public_fingerprint(self.key_type(), &spki))
            }
        }
    }

    /// Signs `data`: ECDSA P-256 over SHA-256 (DER), Ed25519 (raw 64 bytes),
    /// RSA PKCS#1 v1.5 over SHA-256.
    pub fn sign(&self, data: &[u8]) -> Result<Vec<u8>, MaterialError> {
        match self {
            KeyMaterial::P256(k) => {
                let sig: p256::ecdsa::DerSignature = k.sign(data);
                Ok(sig.to_vec())
            }
            KeyMaterial::Ed25519(k) => Ok(k.sign(data).to_bytes().to_vec()),
            KeyMaterial::Rsa2048(k) => {
                let signer = rsa::pkcs1v15::SigningKey::<Sha256>::new((**k).clone());
                let sig = signer
                    .try_sign(data)
                    .map_err(|e| MaterialError::Encoding(e.to_string()))?;
                Ok(sig.to_vec())
            }
            KeyMaterial::Aes256(_) => Err(MaterialError::Unsupported {
                key_type: KeyType::Aes256,
                op: "sign",
            }),
        }
    }

    /// Verifies a signature made by [`KeyMaterial::sign`].
    pub fn verify(&self, data: &[u8], signature: &[u8]) -> Result<bool, MaterialError> {
        Ok(match self {
            KeyMaterial::P256(k) => match p256::ecdsa::DerSignature::from_bytes(signature) {
                Ok(sig) => k.verifying_key().verify(data, &sig).is_ok(),
                Err(_) => false,
            },
            KeyMaterial::Ed25519(k) => match ed25519_dalek::Signature::from_slice(signature) {
                Ok(sig) => k.verifying_key().verify(data, &sig).is_ok(),
                Err(_) => false,
            },
            KeyMaterial::Rsa2048(k) => match rsa::pkcs1v15::Signature::try_from(signature) {
                Ok(sig) => rsa::pkcs1v15::VerifyingKey::<Sha256>::new(k.to_public_key())
                    .verify(data, &sig)
                    .is_ok(),
                Err(_) => false,
            },
            KeyMaterial::Aes256(_) => {
                return Err(MaterialError::Unsupported {
                    key_type: KeyType::Aes256,
                    op: "verify",
                })
            }
        })
    }

    fn aes(&self, op: &'static str) -> Result<Aes256Gcm, MaterialError> {
        match self {
            KeyMaterial::Aes256(k) => Aes256Gcm::new_from_slice(k.as_ref())
                .map_err(|e| MaterialError::Encoding(e.to_string())),
            other => Err(MaterialError::Unsupported {
                key_type: other.key_type(),
                op,
            }),
        }
    }

    /// AES-256-GCM with a random nonce: returns nonce ‖ ciphertext ‖ tag.
    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, MaterialError> {
        let cipher = self.aes("encrypt")?;
        let mut nonce = [0u8; GCM_NONCE_LEN];
        random_bytes(&mut nonce)?;
        seal(&cipher, &nonce, plaintext, aad)
    }

    /// Signs a digest the caller computed, as PKCS#11's `CKM_ECDSA` (raw
    /// r ‖ s), `CKM_RSA_PKCS` (type-1 padding of the DigestInfo given, no
    /// prefix added) and `CKM_RSA_PKCS_PSS` do. The input is checked first
    /// ([`DigestSignScheme::check`]).
    pub fn sign_digest(
        &self,
        scheme: &DigestSignScheme,
        digest: &[u8],
    ) -> Result<Vec<u8>, MaterialError> {
        use signature::hazmat::PrehashSigner as _;
        scheme.check(digest).map_err(MaterialError::BadInput)?;
        let failed = |e: signature::Error| MaterialError::Encoding(e.to_string());
        match (self, scheme) {
            (KeyMaterial::P256(k), DigestSignScheme::Ecdsa) => {
                let sig: p256::ecdsa::Signature = k.sign_prehash(digest).map_err(failed)?;
                Ok(sig.to_bytes().to_vec())
            }
            (KeyMaterial::Rsa2048(k), DigestSignScheme::RsaPkcs1) => {
                let signer = rsa::pkcs1v15::SigningKey::<Sha256>::new_unprefixed((**k).clone());
                Ok(signer.sign_prehash(digest).map_err(failed)?.to_vec())
            }
            (KeyMaterial::Rsa2048(k), DigestSignScheme::RsaPss { hash, salt_len, .. }) => {
                let key = (**k).clone();
                let salt = *salt_len as usize;
                let sig = match hash {
                    DigestAlg::Sha256 => {
                        rsa::pss::SigningKey::<Sha256>::new_with_salt_len(key, salt)
                            .sign_prehash(digest)
                    }
                    DigestAlg::Sha384 => {
                        rsa::pss::SigningKey::<sha2::Sha384>::new_with_salt_len(key, salt)
                            .sign_prehash(digest)
                    }
                    DigestAlg::Sha512 => {
                        rsa::pss::SigningKey::<sha2::Sha512>::new_with_salt_len(key, salt)
                            .sign_prehash(digest)
                    }
                }
                .map_err(failed)?;
                Ok(sig.to_vec())
            }
            (other, _) => Err(MaterialError::Unsupported {
                key_type: other.key_type(),
                op: "sign a digest with that scheme",
            }),
        }
    }

    /// AES-256-GCM with the caller's IV, AAD and tag length (PKCS#11
    /// `CKM_AES_GCM`): ciphertext ‖ tag.
    pub fn encrypt_gcm(
        &self,
        params: &GcmParams,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, MaterialError> {
        params.check().map_err(MaterialError::BadInput)?;
        let KeyMaterial::Aes256(k) = self else {
            return Err(MaterialError::Unsupported {
                key_type: self.key_type(),
                op: "encrypt",
            });
        };
        with_tag_size!(params.tag_len(), T => gcm_seal::<T>(k, params, plaintext))
    }

    /// Opens ciphertext ‖ tag sealed with these parameters.
    pub fn decrypt_gcm(
        &self,
        params: &GcmParams,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, MaterialError> {
        params.check().map_err(MaterialError::BadInput)?;
        let KeyMaterial::Aes256(k) = self else {
            return Err(MaterialError::Unsupported {
                key_type: self.key_type(),
                op: "decrypt",
            });
        };
        if sealed.len() < params.tag_len() {
            return Err(MaterialError::Integrity);
        }
        with_tag_size!(params.tag_len(), T => gcm_open::<T>(k, params, sealed))
    }

    /// Opens what [`KeyMaterial::encrypt`] produced.
    pub fn decrypt(&self, sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, MaterialError> {
        let cipher = self.aes("decrypt")?;
        open(&cipher, sealed, aad)
    }
}

/// Runs `$body` with `$t` the typenum of a GCM tag of `$len` bytes (12 to
/// 16; [`GcmParams::check`] has ruled out the rest).
macro_rules! with_tag_size {
    ($len:expr, $t:ident => $body:expr) => {{
        use aes_gcm::aead::consts::{U12, U13, U14, U15, U16};
        match $len {
            12 => {
                type $t = U12;
                $body
            }
            13 => {
                type $t = U13;
                $body
            }
            14 => {
                type $t = U14;
                $body
            }
            15 => {
                type $t = U15;
                $body
            }
            16 => {
                type $t = U16;
                $body
            }
            other => Err(MaterialError::BadInput(format!(
                "an AES-GCM tag of {other} bytes"
            ))),
        }
    }};
}
use with_tag_size;

type GcmWithTag<T> = aes_gcm::AesGcm<aes_gcm::aes::Aes256, aes_gcm::aead::consts::U12, T>;

fn gcm_seal<T: aes_gcm::TagSize>(
    key: &[u8; 32],
    params: &GcmParams,
    plaintext: &[u8],
) -> Result<Vec<u8>, MaterialError> {
    let cipher =
        GcmWithTag::<T>::new_from_slice(key).map_err(|e| MaterialError::Encoding(e.to_string()))?;
    let nonce = aes_gcm::Nonce::try_from(params.iv.as_slice())
        .map_err(|_| MaterialError::BadInput("an AES-GCM IV is 12 bytes".into()))?;
    cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad: &params.aad,
            },
        )
        .map_err(|_| MaterialError::Encoding("AES-GCM encryption failed".into()))
}

fn gcm_open<T: aes_gcm::TagSize>(
    key: &[u8; 32],
    params: &GcmParams,
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, MaterialError> {
    let cipher =
        GcmWithTag::<T>::new_from_slice(key).map_err(|e| MaterialError::Encoding(e.to_string()))?;
    let nonce = aes_gcm::Nonce::try_from(params.iv.as_slice())
        .map_err(|_| MaterialError::BadInput("an AES-GCM IV is 12 bytes".into()))?;
    cipher
        .decrypt(
            &nonce,
            Payload {
                msg: sealed,
                aad: &params.aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| MaterialError::Integrity)
}

/// Label every fingerprint starts with.
const FINGERPRINT_LABEL: &[u8] = b"keysync fingerprint v1\0";

/// The fingerprint of an asymmetric key from its SPKI DER: SHA-256 of a
/// label, the type, a zero byte and the SPKI. A PKCS#11 backend computes it
/// from the SPKI it builds out of the public-key object's attributes.
pub fn public_fingerprint(key_type: KeyType, spki: &[u8]) -> Fingerprint {
    let mut h = Sha256::new();
    h.update(FINGERPRINT_LABEL);
    h.update(key_type.as_str().as_bytes());
    h.update([0]);
    h.update(spki);
    Fingerprint(h.finalize().into())
}

/// What a secret key's fingerprint MACs (HMAC-SHA-256 under the key): a
/// label and the type. A PKCS#11 backend computes `CKM_SHA256_HMAC` over
/// the same bytes inside the token.
pub fn secret_fingerprint_message(key_type: KeyType) -> Vec<u8> {
    let ty = key_type.as_str().as_bytes();
    let mut m = Vec::with_capacity(FINGERPRINT_LABEL.len() + ty.len());
    m.extend_from_slice(FINGERPRINT_LABEL);
    m.extend_from_slice(ty);
    m
}

/// PKCS#8 as some PKCS#11 tokens unwrap it: SoftHSM 2.6.1 pads the DER
/// with zeros to a multiple of 8 bytes before `CKM_AES_KEY_WRAP_PAD`, so
/// its blobs unwrap (in software) to the DER followed by up to 7 zeros.
/// Returns the DER alone when `bytes` is exactly that (one outer SEQUENCE
/// whose length fits, then 1 to 7 zero bytes reaching a multiple of 8);
/// otherwise `bytes` unchanged, for the DER parser to judge.
pub fn trim_wrap_padding(bytes: &[u8]) -> &[u8] {
    let Some(der_len) = der_sequence_len(bytes) else {
        return bytes;
    };
    if der_len >= bytes.len() {
        return bytes;
    }
    let pad = &bytes[der_len..];
    if pad.len() < 8 && bytes.len().is_multiple_of(8) && pad.iter().all(|b| *b == 0) {
        &bytes[..der_len]
    } else {
        bytes
    }
}

/// The encoded length (header included) of the DER SEQUENCE `bytes` starts
/// with, if its header is well formed.
fn der_sequence_len(bytes: &[u8]) -> Option<usize> {
    if bytes.first() != Some(&0x30) {
        return None;
    }
    let first = *bytes.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in bytes.get(2..2 + n)? {
            len = (len << 8) | usize::from(*b);
        }
        (len, 2 + n)
    };
    len.checked_add(header)
}

/// AES-256-GCM seal with a given nonce: nonce ‖ ciphertext ‖ tag.
pub fn seal(
    cipher: &Aes256Gcm,
    nonce: &[u8; GCM_NONCE_LEN],
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, MaterialError> {
    let n = Nonce::try_from(&nonce[..]).map_err(|_| MaterialError::Integrity)?;
    let ct = cipher
        .encrypt(
            &n,
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| MaterialError::Encoding("AES-GCM encryption failed".into()))?;
    let mut out = Vec::with_capacity(GCM_NONCE_LEN + ct.len());
    out.extend_from_slice(nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// AES-256-GCM open of nonce ‖ ciphertext ‖ tag.
pub fn open(
    cipher: &Aes256Gcm,
    sealed: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, MaterialError> {
    if sealed.len() < GCM_NONCE_LEN + 16 {
        return Err(MaterialError::Integrity);
    }
    let (nonce, ct) = sealed.split_at(GCM_NONCE_LEN);
    let n = Nonce::try_from(nonce).map_err(|_| MaterialError::Integrity)?;
    cipher
        .decrypt(&n, Payload { msg: ct, aad })
        .map(Zeroizing::new)
        .map_err(|_| MaterialError::Integrity)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Given P-256 keys, when encoded with the public key the signing key
    /// holds, then the bytes are the library's own PKCS#8.
    #[test]
    fn p256_encoding_is_the_librarys_pkcs8() {
        use p256::pkcs8::EncodePrivateKey as _;
        for _ in 0..20 {
            let m = KeyMaterial::generate(KeyType::P256).expect("generate");
            let KeyMaterial::P256(k) = &m else {
                panic!("a P-256 key was generated as another type")
            };
            let ours = m.to_bytes().expect("encode");
            assert_eq!(
                ours.as_slice(),
                k.to_pkcs8_der().expect("library encoding").as_bytes()
            );
        }
    }

    /// Given key bytes of every type, when checked for their fingerprint
    /// alone, then it is the fingerprint of the key `from_bytes` parses
    /// (wrap padding too).
    #[test]
    fn checked_fingerprint_is_that_of_the_parsed_key() {
        for t in [KeyType::P256, KeyType::Ed25519, KeyType::Aes256] {
            let m = KeyMaterial::generate(t).expect("generate");
            let mut bytes = m.to_bytes().expect("encode").to_vec();
            let fp = m.fingerprint().expect("fp");
            assert_eq!(
                KeyMaterial::checked_fingerprint(t, &bytes).expect("checked"),
                fp
            );
            if t.is_asymmetric() {
                // A token's padding: zeros up to the next multiple of 8.
                bytes.resize(bytes.len().div_ceil(8) * 8, 0);
                assert_eq!(
                    KeyMaterial::checked_fingerprint(t, &bytes).expect("checked"),
                    fp
                );
            }
        }
    }

    /// Given P-256 PKCS#8 that `from_bytes` refuses (a carried public key
    /// not the scalar's, a zero scalar, another curve's key, garbage,
    /// trailing bytes), when checked for its fingerprint, then it is
    /// refused too.
    #[test]
    fn checked_fingerprint_refuses_what_from_bytes_refuses() {
        let p256 = || {
            KeyMaterial::generate(KeyType::P256)
                .expect("generate")
                .to_bytes()
                .expect("encode")
                .to_vec()
        };
        let der = p256();
        let refused = |b: &[u8]| {
            assert!(KeyMaterial::from_bytes(KeyType::P256, b).is_err());
            assert!(matches!(
                KeyMaterial::checked_fingerprint(KeyType::P256, b),
                Err(MaterialError::Invalid(KeyType::P256))
            ));
        };
        // Another key's (valid) public key carried: the uncompressed point
        // is the last 65 bytes of both.
        let mut other_public = der.clone();
        let n = der.len();
        other_public[n - 65..].copy_from_slice(&p256()[n - 65..]);
        refused(&other_public);
        // A point off the curve carried.
        let mut off_curve = der.clone();
        *off_curve.last_mut().expect("not empty") ^= 1;
        refused(&off_curve);
        // The scalar (the 32 bytes after the OCTET STRING 04 20 inside the
        // ECPrivateKey) zeroed.
        let at = der
            .windows(2)
            .position(|w| w == [0x04, 0x20])
            .expect("the scalar")
            + 2;
        let mut zero = der.clone();
        zero[at..at + 32].fill(0);
        refused(&zero);
        // Another key type's PKCS#8, garbage, a truncation, trailing bytes.
        refused(
            &KeyMaterial::generate(KeyType::Ed25519)
                .expect("generate")
                .to_bytes()
                .expect("encode"),
        );
        refused(b"not a key");
        refused(&der[..der.len() - 3]);
        let mut trailing = der.clone();
        trailing.extend([1, 2, 3]);
        refused(&trailing);
        assert!(KeyMaterial::checked_fingerprint(KeyType::P256, &der).is_ok());
    }

    #[test]
    fn every_type_round_trips_and_fingerprints_agree() {
        for t in KeyType::ALL {
            let k = KeyMaterial::generate(t).expect("generate");
            let bytes = k.to_bytes().expect("encode");
            let k2 = KeyMaterial::from_bytes(t, &bytes).expect("decode");
            assert_eq!(
                k.fingerprint().expect("fp"),
                k2.fingerprint().expect("fp"),
                "{t}"
            );
            assert_eq!(
                k.public_key_der().expect("pk"),
                k2.public_key_der().expect("pk")
            );
            let other = KeyMaterial::generate(t).expect("generate");
            assert_ne!(
                k.fingerprint().expect("fp"),
                other.fingerprint().expect("fp")
            );
        }
    }

    #[test]
    fn signatures_verify_across_copies() {
        for t in [KeyType::P256, KeyType::Ed25519, KeyType::Rsa2048] {
            let k = KeyMaterial::generate(t).expect("generate");
            let copy = KeyMaterial::from_bytes(t, &k.to_bytes().expect("enc")).expect("dec");
            let sig = k.sign(b"hello").expect("sign");
            assert!(copy.verify(b"hello", &sig).expect("verify"), "{t}");
            assert!(!copy.verify(b"hellp", &sig).expect("verify"), "{t}");
            assert!(!copy.verify(b"hello", &sig[1..]).expect("verify"), "{t}");
        }
    }

    #[test]
    fn aes_gcm_round_trips_and_detects_tampering() {
        let k = KeyMaterial::generate(KeyType::Aes256).expect("generate");
        let mut ct = k.encrypt(b"secret", b"aad").expect("enc");
        assert_eq!(&k.decrypt(&ct, b"aad").expect("dec")[..], b"secret");
        assert!(k.decrypt(&ct, b"other").is_err());
        let last = ct.len() - 1;
        ct[last] ^= 1;
        assert!(k.decrypt(&ct, b"aad").is_err());
        assert!(k.decrypt(&[0; 5], b"").is_err());
        assert!(k.sign(b"x").is_err());
    }

    #[test]
    fn zero_padded_pkcs8_from_a_token_parses() {
        for t in [KeyType::P256, KeyType::Ed25519, KeyType::Rsa2048] {
            let k = KeyMaterial::generate(t).expect("generate");
            let der = k.to_bytes().expect("enc");
            let mut padded = der.to_vec();
            while !padded.len().is_multiple_of(8) {
                padded.push(0);
            }
            let k2 = KeyMaterial::from_bytes(t, &padded).expect("padded PKCS#8");
            assert_eq!(k.fingerprint().expect("fp"), k2.fingerprint().expect("fp"));
            assert_eq!(trim_wrap_padding(&padded), &der[..]);
            // Only zero padding to a multiple of 8, at most 7 bytes.
            let mut junk = der.to_vec();
            junk.push(1);
            while !junk.len().is_multiple_of(8) {
                junk.push(0);
            }
            assert_eq!(trim_wrap_padding(&junk), &junk[..]);
            assert!(KeyMaterial::from_bytes(t, &junk).is_err(), "{t}");
            let mut long = der.to_vec();
            long.extend_from_slice(&[0; 8]);
            assert_eq!(trim_wrap_padding(&long), &long[..]);
            assert!(KeyMaterial::from_bytes(t, &long).is_err(), "{t}");
        }
        // AES keys are raw bytes: never trimmed.
        let mut aes = vec![0x30, 0x1e];
        aes.extend_from_slice(&[0; 30]);
        assert_eq!(
            KeyMaterial::from_bytes(KeyType::Aes256, &aes)
                .expect("aes")
                .to_bytes()
                .expect("enc")
                .as_slice(),
            &aes[..]
        );
        assert_eq!(trim_wrap_padding(&[0x30, 0x84, 0xff]), &[0x30, 0x84, 0xff]);
        assert_eq!(trim_wrap_padding(&[]), &[] as &[u8]);
    }

    #[test]
    fn fingerprints_are_pinned() {
        // The AES fingerprint: HMAC-SHA-256 under the key of the label and
        // type (checked with Python's hmac); a PKCS#11 token must match it.
        let k = KeyMaterial::from_bytes(KeyType::Aes256, &[0x11; 32]).expect("aes");
        assert_eq!(
            k.fingerprint().expect("fp").to_hex(),
            "0b9d6ec8b6d82717bb8b7d60bc1a28a2386434bde99fd8547793b92eeb426c82"
        );
        assert_eq!(
            secret_fingerprint_message(KeyType::Aes256),
            b"keysync fingerprint v1\0aes256"
        );
    }

    #[test]
    fn digest_signatures_verify_as_their_standards_say() {
        use keysync_schemas::{DigestAlg, DigestSignScheme};
        use signature::hazmat::PrehashVerifier as _;
        let digest = Sha256::digest(b"application data");

        let ec = KeyMaterial::generate(KeyType::P256).expect("p256");
        let KeyMaterial::P256(ec_key) = &ec else {
            panic!("not P-256")
        };
        let raw = ec
            .sign_digest(&DigestSignScheme::Ecdsa, &digest)
            .expect("ecdsa");
        assert_eq!(raw.len(), 64);
        let sig = p256::ecdsa::Signature::from_slice(&raw).expect("r||s");
        ec_key
            .verifying_key()
            .verify_prehash(&digest, &sig)
            .expect("verifies");
        // The same as hash-and-sign over the message.
        ec_key
            .verifying_key()
            .verify(b"application data", &sig)
            .expect("verifies as ECDSA-SHA256");

        let rsa_key = KeyMaterial::generate(KeyType::Rsa2048).expect("rsa");
        let KeyMaterial::Rsa2048(k) = &rsa_key else {
            panic!("not RSA")
        };
        // A DigestInfo for SHA-256 (RFC 8017 9.2 note 1) + the digest:
        // the same signature as SHA256-RSA-PKCS over the message.
        let mut info = hex::decode("3031300d060960864801650304020105000420").expect("hex");
        info.extend_from_slice(&digest);
        let sig = rsa_key
            .sign_digest(&DigestSignScheme::RsaPkcs1, &info)
            .expect("rsa-pkcs");
        assert_eq!(sig, rsa_key.sign(b"application data").expect("sign"));

        for salt_len in [0u32, 32, 64] {
            let pss = DigestSignScheme::RsaPss {
                hash: DigestAlg::Sha256,
                mgf: DigestAlg::Sha256,
                salt_len,
            };
            let sig = rsa_key.sign_digest(&pss, &digest).expect("pss");
            let sig = rsa::pss::Signature::try_from(&sig[..]).expect("sig");
            rsa::pss::VerifyingKey::<Sha256>::new_with_salt_len(
                k.to_public_key(),
                salt_len as usize,
            )
            .verify_prehash(&digest, &sig)
            .expect("pss verifies");
        }
        let sha512 = sha2::Sha512::digest(b"x");
        let pss512 = DigestSignScheme::RsaPss {
            hash: DigestAlg::Sha512,
            mgf: DigestAlg::Sha512,
            salt_len: 64,
        };
        let sig = rsa_key.sign_digest(&pss512, &sha512).expect("pss-512");
        rsa::pss::VerifyingKey::<sha2::Sha512>::new_with_salt_len(k.to_public_key(), 64)
            .verify_prehash(
                &sha512,
                &rsa::pss::Signature::try_from(&sig[..]).expect("sig"),
            )
            .expect("verifies");
    }

    #[test]
    fn bad_digest_input_is_a_bad_request_not_a_signature() {
        use keysync_schemas::{DigestAlg, DigestSignScheme};
        let ec = KeyMaterial::generate(KeyType::P256).expect("p256");
        let rsa_key = KeyMaterial::generate(KeyType::Rsa2048).expect("rsa");
        let bad = |r: Result<Vec<u8>, MaterialError>| matches!(r, Err(MaterialError::BadInput(_)));
        assert!(bad(ec.sign_digest(&DigestSignScheme::Ecdsa, &[1; 31])));
        assert!(bad(ec.sign_digest(&DigestSignScheme::Ecdsa, &[])));
        assert!(bad(
            rsa_key.sign_digest(&DigestSignScheme::RsaPkcs1, &[1; 246])
        ));
        assert!(bad(rsa_key.sign_digest(&DigestSignScheme::RsaPkcs1, &[])));
        let pss = |hash, mgf, salt_len| DigestSignScheme::RsaPss {
            hash,
            mgf,
            salt_len,
        };
        use DigestAlg::*;
        assert!(bad(rsa_key.sign_digest(&pss(Sha256, Sha256, 32), &[1; 48])));
        assert!(bad(rsa_key.sign_digest(&pss(Sha256, Sha512, 32), &[1; 32])));
        assert!(bad(rsa_key.sign_digest(&pss(Sha256, Sha256, 223), &[1; 32])));
        assert!(rsa_key
            .sign_digest(&pss(Sha256, Sha256, 222), &[1; 32])
            .is_ok());
        // A scheme for another key type.
        assert!(matches!(
            ec.sign_digest(&DigestSignScheme::RsaPkcs1, &[1; 32]),
            Err(MaterialError::Unsupported { .. })
        ));
    }

    #[test]
    fn gcm_with_the_callers_iv_matches_and_truncates_the_tag() {
        use keysync_schemas::GcmParams;
        let k = KeyMaterial::generate(KeyType::Aes256).expect("aes");
        let iv = [9u8; GCM_NONCE_LEN];
        let full = k.aes("encrypt").expect("aes");
        let reference = seal(&full, &iv, b"plaintext", b"aad").expect("seal");
        let mut last = None;
        for tag_bits in [96u32, 104, 112, 120, 128] {
            let p = GcmParams {
                iv: iv.to_vec(),
                aad: b"aad".to_vec(),
                tag_bits,
            };
            let ct = k.encrypt_gcm(&p, b"plaintext").expect("enc");
            // GCM's shorter tags are the full tag's prefix.
            assert_eq!(ct, reference[GCM_NONCE_LEN..][..9 + p.tag_len()]);
            assert_eq!(&k.decrypt_gcm(&p, &ct).expect("dec")[..], b"plaintext");
            let mut bad = ct.clone();
            bad[0] ^= 1;
            assert!(matches!(
                k.decrypt_gcm(&p, &bad),
                Err(MaterialError::Integrity)
            ));
            last = Some(p);
        }
        let mut p = last.expect("params");
        p.aad = b"other".to_vec();
        let ct = k.encrypt_gcm(&p, b"x").expect("enc");
        p.aad = b"aad".to_vec();
        assert!(matches!(
            k.decrypt_gcm(&p, &ct),
            Err(MaterialError::Integrity)
        ));
        for (iv_len, tag_bits) in [(11usize, 128u32), (16, 128), (12, 64), (12, 100), (12, 136)] {
            let p = GcmParams {
                iv: vec![0; iv_len],
                aad: Vec::new(),
                tag_bits,
            };
            assert!(matches!(
                k.encrypt_gcm(&p, b"x"),
                Err(MaterialError::BadInput(_))
            ));
            assert!(matches!(
                k.decrypt_gcm(&p, &[0; 32]),
                Err(MaterialError::BadInput(_))
            ));
        }
        let p = GcmParams {
            iv: iv.to_vec(),
            aad: Vec::new(),
            tag_bits: 128,
        };
        assert!(matches!(
            k.decrypt_gcm(&p, &[0; 3]),
            Err(MaterialError::Integrity)
        ));
    }

    #[test]
    fn garbage_material_is_rejected() {
        for t in KeyType::ALL {
            assert!(KeyMaterial::from_bytes(t, &[1, 2, 3]).is_err(), "{t}");
        }
    }
}
