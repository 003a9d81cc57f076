//! The mechanisms the token offers, and how each maps onto keysync.
//!
//! Hash-and-sign mechanisms (`CKM_ECDSA_SHA256`, `CKM_EDDSA`,
//! `CKM_SHA256_RSA_PKCS`) are the agents' `Sign`; mechanisms on a digest
//! the application computed (`CKM_ECDSA`, `CKM_RSA_PKCS` on a DigestInfo,
//! `CKM_RSA_PKCS_PSS`) are the agents' `SignDigest`, and
//! `CKM_SHA256_RSA_PKCS_PSS` hashes here and signs the digest there.
//! `CKM_AES_GCM` is the agents' `EncryptGcm`/`DecryptGcm` with the
//! application's IV, AAD and tag length. Every private or secret operation
//! runs on an HSM; verification uses only the public key, so it runs here
//! (RustCrypto), with no round trip and no HSM needed.

use cryptoki_sys::*;
use keysync_schemas::{DigestAlg, DigestSignScheme, GcmParams, KeyType, RSA_MODULUS_BYTES};
use sha2::{Digest as _, Sha256};

/// One mechanism the token lists.
#[derive(Debug, Clone, Copy)]
pub struct Offered {
    /// The mechanism.
    pub mechanism: CK_MECHANISM_TYPE,
    /// Smallest key size (bits, as PKCS#11 counts them for the type).
    pub min: CK_ULONG,
    /// Largest key size.
    pub max: CK_ULONG,
    /// `CKF_*` flags.
    pub flags: CK_FLAGS,
}

/// `CKF_HW`: the work is done by the cluster's HSMs, not by this module.
const HW: CK_FLAGS = CKF_HW;
const EC_FLAGS: CK_FLAGS = CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS;

/// Every mechanism the token lists, in `C_GetMechanismList` order.
pub const OFFERED: [Offered; 12] = [
    Offered {
        mechanism: CKM_EC_KEY_PAIR_GEN,
        min: 256,
        max: 256,
        flags: HW | CKF_GENERATE_KEY_PAIR | EC_FLAGS,
    },
    Offered {
        mechanism: CKM_EC_EDWARDS_KEY_PAIR_GEN,
        min: 255,
        max: 255,
        flags: HW | CKF_GENERATE_KEY_PAIR,
    },
    Offered {
        mechanism: CKM_RSA_PKCS_KEY_PAIR_GEN,
        min: 2048,
        max: 2048,
        flags: HW | CKF_GENERATE_KEY_PAIR,
    },
    Offered {
        mechanism: CKM_AES_KEY_GEN,
        min: 32,
        max: 32,
        flags: HW | CKF_GENERATE,
    },
    Offered {
        mechanism: CKM_ECDSA_SHA256,
        min: 256,
        max: 256,
        flags: HW | CKF_SIGN | CKF_VERIFY | EC_FLAGS,
    },
    Offered {
        mechanism: CKM_EDDSA,
        min: 255,
        max: 255,
        flags: HW | CKF_SIGN | CKF_VERIFY,
    },
    Offered {
        mechanism: CKM_SHA256_RSA_PKCS,
        min: 2048,
        max: 2048,
        flags: HW | CKF_SIGN | CKF_VERIFY,
    },
    Offered {
        mechanism: CKM_ECDSA,
        min: 256,
        max: 256,
        flags: HW | CKF_SIGN | CKF_VERIFY | EC_FLAGS,
    },
    // Signing only: keysync does not encrypt with RSA.
    Offered {
        mechanism: CKM_RSA_PKCS,
        min: 2048,
        max: 2048,
        flags: HW | CKF_SIGN | CKF_VERIFY,
    },
    Offered {
        mechanism: CKM_RSA_PKCS_PSS,
        min: 2048,
        max: 2048,
        flags: HW | CKF_SIGN | CKF_VERIFY,
    },
    Offered {
        mechanism: CKM_SHA256_RSA_PKCS_PSS,
        min: 2048,
        max: 2048,
        flags: HW | CKF_SIGN | CKF_VERIFY,
    },
    Offered {
        mechanism: CKM_AES_GCM,
        min: 32,
        max: 32,
        flags: HW | CKF_ENCRYPT | CKF_DECRYPT,
    },
];

/// The mechanism's entry, or `CKR_MECHANISM_INVALID`.
pub fn info(mechanism: CK_MECHANISM_TYPE) -> Result<Offered, CK_RV> {
    OFFERED
        .iter()
        .find(|o| o.mechanism == mechanism)
        .copied()
        .ok_or(CKR_MECHANISM_INVALID)
}

/// A mechanism's parameter, as the C interface read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param {
    /// None given.
    None,
    /// `CK_RSA_PKCS_PSS_PARAMS`.
    Pss {
        /// `hashAlg` (`CKM_SHA256`, ...).
        hash_alg: CK_MECHANISM_TYPE,
        /// `mgf` (`CKG_MGF1_SHA256`, ...).
        mgf: CK_RSA_PKCS_MGF_TYPE,
        /// `sLen`.
        s_len: CK_ULONG,
    },
    /// `CK_GCM_PARAMS`.
    Gcm(GcmParams),
    /// A parameter this mechanism does not take, or not of its size.
    Other,
}

/// A signature mechanism, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignMechanism {
    /// `CKM_ECDSA_SHA256`: raw r‖s, 64 bytes.
    EcdsaSha256,
    /// `CKM_EDDSA` (Ed25519, no context): 64 bytes.
    Eddsa,
    /// `CKM_SHA256_RSA_PKCS`: 256 bytes.
    Sha256RsaPkcs,
    /// `CKM_ECDSA` on a digest: raw r‖s.
    Ecdsa,
    /// `CKM_RSA_PKCS` on a DigestInfo (signing only: no encryption).
    RsaPkcs,
    /// `CKM_RSA_PKCS_PSS` on a digest.
    RsaPss(DigestSignScheme),
    /// `CKM_SHA256_RSA_PKCS_PSS`: SHA-256 here, PSS on an HSM.
    Sha256RsaPss(DigestSignScheme),
}

/// What an HSM is asked to sign for a mechanism.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentSign {
    /// The message, hashed by the HSM (`Sign`).
    Message(Vec<u8>),
    /// A digest (`SignDigest`).
    Digest(DigestSignScheme, Vec<u8>),
}

fn digest_alg(m: CK_MECHANISM_TYPE) -> Option<DigestAlg> {
    match m {
        CKM_SHA256 => Some(DigestAlg::Sha256),
        CKM_SHA384 => Some(DigestAlg::Sha384),
        CKM_SHA512 => Some(DigestAlg::Sha512),
        _ => None,
    }
}

fn mgf_alg(m: CK_RSA_PKCS_MGF_TYPE) -> Option<DigestAlg> {
    match m {
        CKG_MGF1_SHA256 => Some(DigestAlg::Sha256),
        CKG_MGF1_SHA384 => Some(DigestAlg::Sha384),
        CKG_MGF1_SHA512 => Some(DigestAlg::Sha512),
        _ => None,
    }
}

/// PSS parameters keysync can honour: SHA-256/384/512 with MGF1 over the
/// same hash, a salt that fits RSA-2048; anything else is
/// `CKR_MECHANISM_PARAM_INVALID` (never silently another PSS).
fn pss_scheme(param: &Param, only: Option<DigestAlg>) -> Result<DigestSignScheme, CK_RV> {
    let Param::Pss {
        hash_alg,
        mgf,
        s_len,
    } = param
    else {
        return Err(CKR_MECHANISM_PARAM_INVALID);
    };
    let hash = digest_alg(*hash_alg).ok_or(CKR_MECHANISM_PARAM_INVALID)?;
    let mgf = mgf_alg(*mgf).ok_or(CKR_MECHANISM_PARAM_INVALID)?;
    if only.is_some_and(|o| o != hash) {
        return Err(CKR_MECHANISM_PARAM_INVALID);
    }
    let salt_len = u32::try_from(*s_len).map_err(|_| CKR_MECHANISM_PARAM_INVALID)?;
    let scheme = DigestSignScheme::RsaPss {
        hash,
        mgf,
        salt_len,
    };
    // The rule every keystore applies, on a digest of the right length.
    scheme
        .check(&vec![0; hash.output_len()])
        .map_err(|_| CKR_MECHANISM_PARAM_INVALID)?;
    Ok(scheme)
}

impl SignMechanism {
    /// The signature mechanism `mechanism` names with `param`:
    /// `CKR_MECHANISM_INVALID` for one the token lacks,
    /// `CKR_MECHANISM_PARAM_INVALID` for a parameter it cannot honour.
    pub fn from_ck(mechanism: CK_MECHANISM_TYPE, param: &Param) -> Result<Self, CK_RV> {
        let m = match mechanism {
            CKM_ECDSA_SHA256 => SignMechanism::EcdsaSha256,
            CKM_EDDSA => SignMechanism::Eddsa,
            CKM_SHA256_RSA_PKCS => SignMechanism::Sha256RsaPkcs,
            CKM_ECDSA => SignMechanism::Ecdsa,
            CKM_RSA_PKCS => SignMechanism::RsaPkcs,
            CKM_RSA_PKCS_PSS => return Ok(SignMechanism::RsaPss(pss_scheme(param, None)?)),
            CKM_SHA256_RSA_PKCS_PSS => {
                return Ok(SignMechanism::Sha256RsaPss(pss_scheme(
                    param,
                    Some(DigestAlg::Sha256),
                )?))
            }
            _ => return Err(CKR_MECHANISM_INVALID),
        };
        if *param != Param::None {
            return Err(CKR_MECHANISM_PARAM_INVALID);
        }
        Ok(m)
    }

    /// The key type it signs with.
    pub fn key_type(self) -> KeyType {
        match self {
            SignMechanism::EcdsaSha256 | SignMechanism::Ecdsa => KeyType::P256,
            SignMechanism::Eddsa => KeyType::Ed25519,
            SignMechanism::Sha256RsaPkcs
            | SignMechanism::RsaPkcs
            | SignMechanism::RsaPss(_)
            | SignMechanism::Sha256RsaPss(_) => KeyType::Rsa2048,
        }
    }

    /// The length of every signature it makes.
    pub fn signature_len(self) -> usize {
        match self.key_type() {
            KeyType::Rsa2048 => RSA_MODULUS_BYTES,
            _ => 64,
        }
    }

    /// What to ask an HSM to sign for `data`; `CKR_DATA_LEN_RANGE` when
    /// the data cannot be this mechanism's input (a digest of the wrong
    /// length), checked before anything is sent.
    pub fn agent_request(self, data: Vec<u8>) -> Result<AgentSign, CK_RV> {
        let digest = |scheme: DigestSignScheme, digest: Vec<u8>| {
            scheme
                .check(&digest)
                .map(|()| AgentSign::Digest(scheme, digest))
                .map_err(|_| CKR_DATA_LEN_RANGE)
        };
        match self {
            SignMechanism::EcdsaSha256 | SignMechanism::Eddsa | SignMechanism::Sha256RsaPkcs => {
                Ok(AgentSign::Message(data))
            }
            SignMechanism::Ecdsa => digest(DigestSignScheme::Ecdsa, data),
            SignMechanism::RsaPkcs => digest(DigestSignScheme::RsaPkcs1, data),
            SignMechanism::RsaPss(scheme) => digest(scheme, data),
            SignMechanism::Sha256RsaPss(scheme) => digest(scheme, Sha256::digest(&data).to_vec()),
        }
    }

    /// A signature from the agent (DER for `CKM_ECDSA_SHA256`) as PKCS#11
    /// returns it.
    pub fn from_agent(self, signature: Vec<u8>) -> Result<Vec<u8>, CK_RV> {
        let out = match self {
            SignMechanism::EcdsaSha256 => p256::ecdsa::Signature::from_der(&signature)
                .map_err(|_| CKR_DEVICE_ERROR)?
                .to_bytes()
                .to_vec(),
            _ => signature,
        };
        if out.len() == self.signature_len() {
            Ok(out)
        } else {
            Err(CKR_DEVICE_ERROR)
        }
    }

    /// Verifies `signature` over `data` with the key's public key (SPKI
    /// DER): `CKR_SIGNATURE_LEN_RANGE` for a signature of the wrong
    /// length, `CKR_DATA_LEN_RANGE` for a digest of the wrong length,
    /// `CKR_SIGNATURE_INVALID` when it does not verify.
    pub fn verify(self, spki: &[u8], data: &[u8], signature: &[u8]) -> Result<(), CK_RV> {
        use p256::pkcs8::DecodePublicKey as _;
        use signature::hazmat::PrehashVerifier as _;
        use signature::Verifier as _;
        if signature.len() != self.signature_len() {
            return Err(CKR_SIGNATURE_LEN_RANGE);
        }
        let bad_key = |_| CKR_DEVICE_ERROR;
        let invalid = |_| CKR_SIGNATURE_INVALID;
        match self {
            SignMechanism::EcdsaSha256 | SignMechanism::Ecdsa => {
                let vk = p256::ecdsa::VerifyingKey::from_public_key_der(spki).map_err(bad_key)?;
                let sig = p256::ecdsa::Signature::from_slice(signature).map_err(invalid)?;
                if self == SignMechanism::Ecdsa {
                    DigestSignScheme::Ecdsa
                        .check(data)
                        .map_err(|_| CKR_DATA_LEN_RANGE)?;
                    vk.verify_prehash(data, &sig).map_err(invalid)
                } else {
                    vk.verify(data, &sig).map_err(invalid)
                }
            }
            SignMechanism::Eddsa => {
                let vk = ed25519_dalek::VerifyingKey::from_public_key_der(spki).map_err(bad_key)?;
                let sig = ed25519_dalek::Signature::from_slice(signature).map_err(invalid)?;
                vk.verify(data, &sig).map_err(invalid)
            }
            SignMechanism::Sha256RsaPkcs | SignMechanism::RsaPkcs => {
                let pk = rsa::PublicKey::from_public_key_der(spki).map_err(bad_key)?;
                let sig = rsa::pkcs1v15::Signature::try_from(signature).map_err(invalid)?;
                if self == SignMechanism::RsaPkcs {
                    DigestSignScheme::RsaPkcs1
                        .check(data)
                        .map_err(|_| CKR_DATA_LEN_RANGE)?;
                    rsa::pkcs1v15::VerifyingKey::<Sha256>::new_unprefixed(pk)
                        .verify_prehash(data, &sig)
                        .map_err(invalid)
                } else {
                    rsa::pkcs1v15::VerifyingKey::<Sha256>::new(pk)
                        .verify(data, &sig)
                        .map_err(invalid)
                }
            }
            SignMechanism::RsaPss(scheme) | SignMechanism::Sha256RsaPss(scheme) => {
                let DigestSignScheme::RsaPss { hash, salt_len, .. } = scheme else {
                    return Err(CKR_GENERAL_ERROR);
                };
                let hashed;
                let digest = if matches!(self, SignMechanism::Sha256RsaPss(_)) {
                    hashed = Sha256::digest(data).to_vec();
                    &hashed[..]
                } else {
                    data
                };
                scheme.check(digest).map_err(|_| CKR_DATA_LEN_RANGE)?;
                let pk = rsa::PublicKey::from_public_key_der(spki).map_err(bad_key)?;
                let sig = rsa::pss::Signature::try_from(signature).map_err(invalid)?;
                let salt = salt_len as usize;
                match hash {
                    DigestAlg::Sha256 => {
                        rsa::pss::VerifyingKey::<Sha256>::new_with_salt_len(pk, salt)
                            .verify_prehash(digest, &sig)
                    }
                    DigestAlg::Sha384 => {
                        rsa::pss::VerifyingKey::<sha2::Sha384>::new_with_salt_len(pk, salt)
                            .verify_prehash(digest, &sig)
                    }
                    DigestAlg::Sha512 => {
                        rsa::pss::VerifyingKey::<sha2::Sha512>::new_with_salt_len(pk, salt)
                            .verify_prehash(digest, &sig)
                    }
                }
                .map_err(invalid)
            }
        }
    }
}

/// The AES-GCM parameters of `CKM_AES_GCM`: `CKR_MECHANISM_INVALID` for
/// another mechanism, `CKR_MECHANISM_PARAM_INVALID` for parameters keysync
/// does not support (a 12-byte IV, a tag of 96 to 128 bits).
pub fn gcm(mechanism: CK_MECHANISM_TYPE, param: &Param) -> Result<GcmParams, CK_RV> {
    if mechanism != CKM_AES_GCM {
        return Err(CKR_MECHANISM_INVALID);
    }
    match param {
        Param::Gcm(p) => {
            p.check().map_err(|_| CKR_MECHANISM_PARAM_INVALID)?;
            Ok(p.clone())
        }
        _ => Err(CKR_MECHANISM_PARAM_INVALID),
    }
}

/// The key type a key-pair generation mechanism makes (the EC curve is
/// checked against the template).
pub fn key_pair_type(mechanism: CK_MECHANISM_TYPE) -> Result<KeyType, CK_RV> {
    match mechanism {
        CKM_EC_KEY_PAIR_GEN => Ok(KeyType::P256),
        CKM_EC_EDWARDS_KEY_PAIR_GEN => Ok(KeyType::Ed25519),
        CKM_RSA_PKCS_KEY_PAIR_GEN => Ok(KeyType::Rsa2048),
        _ => Err(CKR_MECHANISM_INVALID),
    }
}

/// The key type a secret-key generation mechanism makes.
pub fn key_type(mechanism: CK_MECHANISM_TYPE) -> Result<KeyType, CK_RV> {
    match mechanism {
        CKM_AES_KEY_GEN => Ok(KeyType::Aes256),
        _ => Err(CKR_MECHANISM_INVALID),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_signatures_convert_from_the_agent() {
        use p256::ecdsa::signature::Signer as _;
        use p256::pkcs8::EncodePublicKey as _;
        let key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("key");
        let der: p256::ecdsa::DerSignature = key.sign(b"msg");
        let raw = SignMechanism::EcdsaSha256
            .from_agent(der.as_bytes().to_vec())
            .expect("raw");
        assert_eq!(raw.len(), 64);
        let spki = key
            .verifying_key()
            .to_public_key_der()
            .expect("spki")
            .into_vec();
        SignMechanism::EcdsaSha256
            .verify(&spki, b"msg", &raw)
            .expect("verifies");
        assert_eq!(
            SignMechanism::EcdsaSha256.verify(&spki, b"msh", &raw),
            Err(CKR_SIGNATURE_INVALID)
        );
        assert_eq!(
            SignMechanism::EcdsaSha256.verify(&spki, b"msg", &raw[..63]),
            Err(CKR_SIGNATURE_LEN_RANGE)
        );
        // The same signature is CKM_ECDSA over the SHA-256 digest.
        let digest = Sha256::digest(b"msg");
        SignMechanism::Ecdsa
            .verify(&spki, &digest, &raw)
            .expect("verifies as CKM_ECDSA");
        assert_eq!(
            SignMechanism::Ecdsa.verify(&spki, &digest[..31], &raw),
            Err(CKR_DATA_LEN_RANGE)
        );
    }

    fn pss(hash_alg: CK_MECHANISM_TYPE, mgf: CK_RSA_PKCS_MGF_TYPE, s_len: CK_ULONG) -> Param {
        Param::Pss {
            hash_alg,
            mgf,
            s_len,
        }
    }

    #[test]
    fn parameters_are_checked_at_init() {
        let ok = pss(CKM_SHA256, CKG_MGF1_SHA256, 32);
        assert!(matches!(
            SignMechanism::from_ck(CKM_RSA_PKCS_PSS, &ok),
            Ok(SignMechanism::RsaPss(_))
        ));
        assert!(matches!(
            SignMechanism::from_ck(CKM_SHA256_RSA_PKCS_PSS, &ok),
            Ok(SignMechanism::Sha256RsaPss(_))
        ));
        for (m, p) in [
            (CKM_RSA_PKCS_PSS, Param::None),
            (CKM_RSA_PKCS_PSS, Param::Other),
            (CKM_RSA_PKCS_PSS, pss(CKM_SHA_1, CKG_MGF1_SHA1, 20)),
            (CKM_RSA_PKCS_PSS, pss(CKM_SHA256, CKG_MGF1_SHA1, 32)),
            (CKM_RSA_PKCS_PSS, pss(CKM_SHA256, CKG_MGF1_SHA256, 223)),
            (
                CKM_SHA256_RSA_PKCS_PSS,
                pss(CKM_SHA384, CKG_MGF1_SHA384, 48),
            ),
            (CKM_ECDSA, Param::Other),
            (CKM_RSA_PKCS, ok.clone()),
        ] {
            assert_eq!(
                SignMechanism::from_ck(m, &p),
                Err(CKR_MECHANISM_PARAM_INVALID),
                "{m:#x} {p:?}"
            );
        }
        assert_eq!(
            SignMechanism::from_ck(CKM_SHA1_RSA_PKCS, &Param::None),
            Err(CKR_MECHANISM_INVALID)
        );
        let good = GcmParams {
            iv: vec![0; 12],
            aad: vec![],
            tag_bits: 128,
        };
        assert_eq!(gcm(CKM_AES_GCM, &Param::Gcm(good.clone())), Ok(good));
        for bad in [
            GcmParams {
                iv: vec![0; 16],
                aad: vec![],
                tag_bits: 128,
            },
            GcmParams {
                iv: vec![0; 12],
                aad: vec![],
                tag_bits: 64,
            },
        ] {
            assert_eq!(
                gcm(CKM_AES_GCM, &Param::Gcm(bad)),
                Err(CKR_MECHANISM_PARAM_INVALID)
            );
        }
        assert_eq!(
            gcm(CKM_AES_GCM, &Param::None),
            Err(CKR_MECHANISM_PARAM_INVALID)
        );
        assert_eq!(gcm(CKM_AES_CBC, &Param::None), Err(CKR_MECHANISM_INVALID));
    }

    #[test]
    fn digests_of_the_wrong_length_are_refused_before_sending() {
        assert_eq!(
            SignMechanism::Ecdsa.agent_request(vec![0; 33]),
            Err(CKR_DATA_LEN_RANGE)
        );
        assert_eq!(
            SignMechanism::RsaPkcs.agent_request(vec![0; 246]),
            Err(CKR_DATA_LEN_RANGE)
        );
        let m = SignMechanism::from_ck(
            CKM_SHA256_RSA_PKCS_PSS,
            &pss(CKM_SHA256, CKG_MGF1_SHA256, 32),
        )
        .expect("pss");
        // Any message: it is hashed here.
        assert!(matches!(
            m.agent_request(vec![1; 1000]),
            Ok(AgentSign::Digest(_, d)) if d.len() == 32
        ));
    }
}
