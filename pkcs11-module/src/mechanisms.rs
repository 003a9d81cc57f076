//! The mechanisms the token offers, and how each maps onto keysync.
//!
//! keysync's agents sign hash-and-sign: ECDSA P-256 over SHA-256 (DER),
//! Ed25519, RSA PKCS#1 v1.5 over SHA-256. So the token offers exactly the
//! PKCS#11 mechanisms that are those: `CKM_ECDSA_SHA256`, `CKM_EDDSA`,
//! `CKM_SHA256_RSA_PKCS`. Mechanisms on a pre-computed digest (`CKM_ECDSA`,
//! `CKM_RSA_PKCS`, PSS) and AES-GCM with the application's IV need an agent
//! protocol extension and are `CKR_MECHANISM_INVALID` until then.

use cryptoki_sys::*;
use keysync_schemas::KeyType;

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
pub const OFFERED: [Offered; 7] = [
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
];

/// The mechanism's entry, or `CKR_MECHANISM_INVALID`.
pub fn info(mechanism: CK_MECHANISM_TYPE) -> Result<Offered, CK_RV> {
    OFFERED
        .iter()
        .find(|o| o.mechanism == mechanism)
        .copied()
        .ok_or(CKR_MECHANISM_INVALID)
}

/// A signature mechanism, and the one key type it works with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignMechanism {
    /// `CKM_ECDSA_SHA256`: raw r‖s, 64 bytes.
    EcdsaSha256,
    /// `CKM_EDDSA` (Ed25519, no context): 64 bytes.
    Eddsa,
    /// `CKM_SHA256_RSA_PKCS`: 256 bytes.
    Sha256RsaPkcs,
}

impl SignMechanism {
    /// The signature mechanism `mechanism` names; `CKR_MECHANISM_INVALID`
    /// for any other (including the digest-input ones keysync cannot do yet).
    pub fn from_ck(mechanism: CK_MECHANISM_TYPE) -> Result<Self, CK_RV> {
        match mechanism {
            CKM_ECDSA_SHA256 => Ok(SignMechanism::EcdsaSha256),
            CKM_EDDSA => Ok(SignMechanism::Eddsa),
            CKM_SHA256_RSA_PKCS => Ok(SignMechanism::Sha256RsaPkcs),
            _ => Err(CKR_MECHANISM_INVALID),
        }
    }

    /// The key type it signs with.
    pub fn key_type(self) -> KeyType {
        match self {
            SignMechanism::EcdsaSha256 => KeyType::P256,
            SignMechanism::Eddsa => KeyType::Ed25519,
            SignMechanism::Sha256RsaPkcs => KeyType::Rsa2048,
        }
    }

    /// The length of every signature it makes.
    pub fn signature_len(self) -> usize {
        match self {
            SignMechanism::EcdsaSha256 | SignMechanism::Eddsa => 64,
            SignMechanism::Sha256RsaPkcs => 256,
        }
    }

    /// A signature from the agent (DER for ECDSA) as PKCS#11 returns it.
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

    /// A PKCS#11 signature as the agent verifies it; `CKR_SIGNATURE_LEN_RANGE`
    /// when its length is wrong, `CKR_SIGNATURE_INVALID` when it cannot be
    /// a signature at all.
    pub fn to_agent(self, signature: &[u8]) -> Result<Vec<u8>, CK_RV> {
        if signature.len() != self.signature_len() {
            return Err(CKR_SIGNATURE_LEN_RANGE);
        }
        match self {
            SignMechanism::EcdsaSha256 => Ok(p256::ecdsa::Signature::from_slice(signature)
                .map_err(|_| CKR_SIGNATURE_INVALID)?
                .to_der()
                .as_bytes()
                .to_vec()),
            _ => Ok(signature.to_vec()),
        }
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
    fn ecdsa_signatures_convert_both_ways() {
        use p256::ecdsa::signature::Signer as _;
        let key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("key");
        let der: p256::ecdsa::DerSignature = key.sign(b"msg");
        let raw = SignMechanism::EcdsaSha256
            .from_agent(der.as_bytes().to_vec())
            .expect("raw");
        assert_eq!(raw.len(), 64);
        let back = SignMechanism::EcdsaSha256.to_agent(&raw).expect("der");
        assert_eq!(back, der.as_bytes());
        assert_eq!(
            SignMechanism::EcdsaSha256.to_agent(&raw[..63]),
            Err(CKR_SIGNATURE_LEN_RANGE)
        );
    }

    #[test]
    fn digest_mechanisms_are_invalid() {
        for m in [CKM_ECDSA, CKM_RSA_PKCS, CKM_RSA_PKCS_PSS, CKM_AES_GCM] {
            assert_eq!(SignMechanism::from_ck(m), Err(CKR_MECHANISM_INVALID));
        }
        assert_eq!(info(CKM_AES_GCM).err(), Some(CKR_MECHANISM_INVALID));
    }
}
