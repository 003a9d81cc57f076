//! Public keys between PKCS#11 attributes and SPKI DER, built with the same
//! crates and calls as `material.rs`, so a fingerprint made from a token's
//! public-key object equals the one the embedded backend makes from the
//! material. Also verification with an SPKI, and ECDSA raw to DER.

use cryptoki::object::{Attribute, AttributeType};
use keysync_schemas::KeyType;
use p256::pkcs8::{DecodePublicKey as _, EncodePublicKey as _};
use rsa::traits::PublicKeyParts as _;
use sha2::Sha256;
use signature::Verifier as _;

use super::error::Pkcs11Error;

/// DER of the P-256 (prime256v1) OID, the `CKA_EC_PARAMS` of P-256 keys.
pub const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of the Ed25519 OID (1.3.101.112), the `CKA_EC_PARAMS` of Ed25519.
pub const ED25519_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// `CKA_EC_PARAMS` as some tokens give Ed25519: PrintableString
/// "edwards25519".
const ED25519_PARAMS_NAME: &[u8] = b"\x13\x0cedwards25519";
/// The RSA public exponent keysync keys use.
pub const RSA_EXPONENT: &[u8] = &[0x01, 0x00, 0x01];

fn invalid(key_type: KeyType, what: &str) -> Pkcs11Error {
    Pkcs11Error::Invalid(format!("not a {key_type} public key: {what}"))
}

fn bad_object(key_type: KeyType, what: &str) -> Pkcs11Error {
    Pkcs11Error::BadObject(format!("{key_type} public key object: {what}"))
}

/// The attributes to read from a public-key object to build its SPKI.
pub fn public_attribute_types(key_type: KeyType) -> &'static [AttributeType] {
    match key_type {
        KeyType::P256 | KeyType::Ed25519 => &[AttributeType::EcParams, AttributeType::EcPoint],
        KeyType::Rsa2048 => &[AttributeType::Modulus, AttributeType::PublicExponent],
        KeyType::Aes256 => &[],
    }
}

/// `CKA_EC_POINT` holds a DER OCTET STRING around the point (PKCS#11 2.40);
/// some tokens give the bare point. Returns the point.
fn ec_point(raw: &[u8], point_len: usize) -> Option<&[u8]> {
    if raw.len() == point_len {
        return Some(raw);
    }
    match raw {
        [0x04, len, rest @ ..] if usize::from(*len) == point_len && rest.len() == point_len => {
            Some(rest)
        }
        [0x04, 0x81, len, rest @ ..]
            if usize::from(*len) == point_len && rest.len() == point_len =>
        {
            Some(rest)
        }
        _ => None,
    }
}

fn find(attrs: &[Attribute], ty: AttributeType) -> Option<&[u8]> {
    attrs.iter().find_map(|a| match (a, ty) {
        (Attribute::EcParams(v), AttributeType::EcParams)
        | (Attribute::EcPoint(v), AttributeType::EcPoint)
        | (Attribute::Modulus(v), AttributeType::Modulus)
        | (Attribute::PublicExponent(v), AttributeType::PublicExponent) => Some(v.as_slice()),
        _ => None,
    })
}

/// SPKI DER of a public-key object from its attributes (see
/// [`public_attribute_types`]).
pub fn spki_from_attributes(
    key_type: KeyType,
    attrs: &[Attribute],
) -> Result<Vec<u8>, Pkcs11Error> {
    let enc = |e: p256::pkcs8::spki::Error| bad_object(key_type, &e.to_string());
    match key_type {
        KeyType::P256 => {
            let params = find(attrs, AttributeType::EcParams)
                .ok_or_else(|| bad_object(key_type, "no CKA_EC_PARAMS"))?;
            if params != P256_PARAMS {
                return Err(bad_object(key_type, "CKA_EC_PARAMS is not P-256"));
            }
            let raw = find(attrs, AttributeType::EcPoint)
                .ok_or_else(|| bad_object(key_type, "no CKA_EC_POINT"))?;
            let point =
                ec_point(raw, 65).ok_or_else(|| bad_object(key_type, "bad CKA_EC_POINT"))?;
            let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map_err(|_| bad_object(key_type, "CKA_EC_POINT is not a P-256 point"))?;
            Ok(vk.to_public_key_der().map_err(enc)?.into_vec())
        }
        KeyType::Ed25519 => {
            let params = find(attrs, AttributeType::EcParams)
                .ok_or_else(|| bad_object(key_type, "no CKA_EC_PARAMS"))?;
            if params != ED25519_PARAMS && params != ED25519_PARAMS_NAME {
                return Err(bad_object(key_type, "CKA_EC_PARAMS is not Ed25519"));
            }
            let raw = find(attrs, AttributeType::EcPoint)
                .ok_or_else(|| bad_object(key_type, "no CKA_EC_POINT"))?;
            let point: [u8; 32] = ec_point(raw, 32)
                .and_then(|p| p.try_into().ok())
                .ok_or_else(|| bad_object(key_type, "bad CKA_EC_POINT"))?;
            let vk = ed25519_dalek::VerifyingKey::from_bytes(&point)
                .map_err(|_| bad_object(key_type, "CKA_EC_POINT is not an Ed25519 point"))?;
            Ok(vk.to_public_key_der().map_err(enc)?.into_vec())
        }
        KeyType::Rsa2048 => {
            let n = find(attrs, AttributeType::Modulus)
                .ok_or_else(|| bad_object(key_type, "no CKA_MODULUS"))?;
            let e = find(attrs, AttributeType::PublicExponent)
                .ok_or_else(|| bad_object(key_type, "no CKA_PUBLIC_EXPONENT"))?;
            let key = rsa::PublicKey::new(
                rsa::BoxedUint::from_be_slice_vartime(n),
                rsa::BoxedUint::from_be_slice_vartime(e),
            )
            .map_err(|e| bad_object(key_type, &e.to_string()))?;
            if key.size() != 256 {
                return Err(bad_object(key_type, "modulus is not 2048 bits"));
            }
            Ok(key.to_public_key_der().map_err(enc)?.into_vec())
        }
        KeyType::Aes256 => Err(bad_object(key_type, "a secret key has no public key")),
    }
}

/// A parsed SPKI of one of keysync's types.
enum PublicKey {
    P256(p256::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
    Rsa(rsa::PublicKey),
}

fn parse(key_type: KeyType, spki: &[u8]) -> Result<PublicKey, Pkcs11Error> {
    let bad = |e: p256::pkcs8::spki::Error| invalid(key_type, &e.to_string());
    Ok(match key_type {
        KeyType::P256 => {
            PublicKey::P256(p256::ecdsa::VerifyingKey::from_public_key_der(spki).map_err(bad)?)
        }
        KeyType::Ed25519 => {
            PublicKey::Ed25519(ed25519_dalek::VerifyingKey::from_public_key_der(spki).map_err(bad)?)
        }
        KeyType::Rsa2048 => {
            let k = rsa::PublicKey::from_public_key_der(spki).map_err(bad)?;
            if k.size() != 256 {
                return Err(invalid(key_type, "modulus is not 2048 bits"));
            }
            PublicKey::Rsa(k)
        }
        KeyType::Aes256 => return Err(invalid(key_type, "a secret key has no public key")),
    })
}

/// The attributes describing the public key in `spki`, for a public-key
/// object made with `C_CreateObject` (EC point as a DER OCTET STRING).
/// Also checks the SPKI is canonical: re-encoding it gives the same bytes,
/// so the fingerprint made from it is the one every HSM makes.
pub fn public_attributes_from_spki(
    key_type: KeyType,
    spki: &[u8],
) -> Result<Vec<Attribute>, Pkcs11Error> {
    let enc = |e: p256::pkcs8::spki::Error| invalid(key_type, &e.to_string());
    let (attrs, again) = match parse(key_type, spki)? {
        PublicKey::P256(vk) => {
            let point = vk.to_sec1_point(false);
            let mut os = vec![0x04, 65];
            os.extend_from_slice(point.as_bytes());
            (
                vec![
                    Attribute::EcParams(P256_PARAMS.to_vec()),
                    Attribute::EcPoint(os),
                ],
                vk.to_public_key_der().map_err(enc)?,
            )
        }
        PublicKey::Ed25519(vk) => {
            let mut os = vec![0x04, 32];
            os.extend_from_slice(vk.as_bytes());
            (
                vec![
                    Attribute::EcParams(ED25519_PARAMS.to_vec()),
                    Attribute::EcPoint(os),
                ],
                vk.to_public_key_der().map_err(enc)?,
            )
        }
        PublicKey::Rsa(k) => (
            vec![
                Attribute::Modulus(k.n().to_be_bytes_trimmed_vartime().to_vec()),
                Attribute::PublicExponent(k.e().to_be_bytes_trimmed_vartime().to_vec()),
            ],
            k.to_public_key_der().map_err(enc)?,
        ),
    };
    if again.as_bytes() != spki {
        return Err(invalid(key_type, "SPKI is not in canonical form"));
    }
    Ok(attrs)
}

/// Verifies a signature as `KeyMaterial::verify` does (ECDSA P-256 DER over
/// SHA-256, Ed25519, RSA PKCS#1 v1.5 SHA-256), with the public key alone.
pub fn verify(
    key_type: KeyType,
    spki: &[u8],
    data: &[u8],
    signature: &[u8],
) -> Result<bool, Pkcs11Error> {
    Ok(match parse(key_type, spki)? {
        PublicKey::P256(vk) => match p256::ecdsa::DerSignature::from_bytes(signature) {
            Ok(sig) => vk.verify(data, &sig).is_ok(),
            Err(_) => false,
        },
        PublicKey::Ed25519(vk) => match ed25519_dalek::Signature::from_slice(signature) {
            Ok(sig) => vk.verify(data, &sig).is_ok(),
            Err(_) => false,
        },
        PublicKey::Rsa(k) => match rsa::pkcs1v15::Signature::try_from(signature) {
            Ok(sig) => rsa::pkcs1v15::VerifyingKey::<Sha256>::new(k)
                .verify(data, &sig)
                .is_ok(),
            Err(_) => false,
        },
    })
}

/// `CKM_ECDSA`'s raw r ‖ s (64 bytes for P-256) as the DER signature
/// keysync's P-256 keys make.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Result<Vec<u8>, Pkcs11Error> {
    let sig = p256::ecdsa::Signature::from_slice(raw)
        .map_err(|_| Pkcs11Error::BadObject(format!("a {}-byte ECDSA signature", raw.len())))?;
    Ok(sig.to_der().as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::material::KeyMaterial;

    #[test]
    fn spki_round_trips_through_attributes() {
        for t in [KeyType::P256, KeyType::Ed25519, KeyType::Rsa2048] {
            let k = KeyMaterial::generate(t).expect("generate");
            let spki = k.public_key_der().expect("pk").expect("asymmetric");
            let attrs = public_attributes_from_spki(t, &spki).expect("attrs");
            assert_eq!(spki_from_attributes(t, &attrs).expect("spki"), spki, "{t}");
            let sig = k.sign(b"data").expect("sign");
            assert!(verify(t, &spki, b"data", &sig).expect("verify"), "{t}");
            assert!(!verify(t, &spki, b"dat", &sig).expect("verify"), "{t}");
        }
        // A bare EC point (no OCTET STRING) is read too.
        let k = KeyMaterial::generate(KeyType::P256).expect("generate");
        let spki = k.public_key_der().expect("pk").expect("asymmetric");
        let mut attrs = public_attributes_from_spki(KeyType::P256, &spki).expect("attrs");
        if let Attribute::EcPoint(p) = &mut attrs[1] {
            p.drain(..2);
        }
        assert_eq!(
            spki_from_attributes(KeyType::P256, &attrs).expect("spki"),
            spki
        );
    }

    #[test]
    fn wrong_types_are_refused() {
        let k = KeyMaterial::generate(KeyType::P256).expect("generate");
        let spki = k.public_key_der().expect("pk").expect("asymmetric");
        assert!(public_attributes_from_spki(KeyType::Ed25519, &spki).is_err());
        assert!(public_attributes_from_spki(KeyType::Aes256, &spki).is_err());
        assert!(public_attributes_from_spki(KeyType::P256, &spki[1..]).is_err());
    }

    #[test]
    fn raw_ecdsa_becomes_der() {
        let k = KeyMaterial::generate(KeyType::P256).expect("generate");
        let spki = k.public_key_der().expect("pk").expect("asymmetric");
        let der = k.sign(b"m").expect("sign");
        let sig = p256::ecdsa::DerSignature::from_bytes(&der).expect("der");
        let raw = p256::ecdsa::Signature::try_from(sig)
            .expect("sig")
            .to_bytes();
        let back = ecdsa_raw_to_der(&raw).expect("der");
        assert!(verify(KeyType::P256, &spki, b"m", &back).expect("verify"));
        assert!(ecdsa_raw_to_der(&raw[..63]).is_err());
    }
}
