//! Object templates. Every one is complete: each usage keysync does not
//! want is given as `false`, because tokens (SoftHSM among them) allow a
//! usage a template leaves out. Everything keysync stores is
//! `CKA_MODIFIABLE` false (no one flips a usage on later: a domain key
//! given decrypt would hand out every wrapped key) and `CKA_COPYABLE` false
//! (no copy with other attributes).

use cryptoki::object::{Attribute, KeyType as CkKeyType, ObjectClass};
use cryptoki::types::Ulong;
use keysync_schemas::{KeyId, KeyType};

use super::spki::{ED25519_PARAMS, P256_PARAMS, RSA_EXPONENT};

/// `CKA_ID` and `CKA_LABEL` of the domain key (14 bytes: never a key id,
/// which is 16).
pub const DOMAIN_KEY_ID: &[u8] = b"keysync-domain";
/// `CKA_APPLICATION` of keysync's data objects.
pub const APPLICATION: &[u8] = b"keysync";

/// `CKA_ID` of a keysync key: the 16 bytes of its id, so
/// `pkcs11-tool --id <32 hex>` finds it.
pub fn key_id_bytes(id: &KeyId) -> Vec<u8> {
    id.0.as_bytes().to_vec()
}

/// The PKCS#11 key type of a keysync key type.
pub fn ck_key_type(key_type: KeyType) -> CkKeyType {
    match key_type {
        KeyType::P256 => CkKeyType::EC,
        KeyType::Ed25519 => CkKeyType::EC_EDWARDS,
        KeyType::Aes256 => CkKeyType::AES,
        KeyType::Rsa2048 => CkKeyType::RSA,
    }
}

/// Where an object lives: in the token (kept) or in the session (gone when
/// the session closes; used for checks and the probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Life {
    /// `CKA_TOKEN` true.
    Token,
    /// `CKA_TOKEN` false.
    Session,
}

/// Names an object: `CKA_ID` and `CKA_LABEL`.
pub struct Name<'a> {
    /// `CKA_ID`.
    pub id: &'a [u8],
    /// `CKA_LABEL`.
    pub label: &'a [u8],
}

/// Ends a template with `CKA_MODIFIABLE` false. It must come last:
/// SoftHSM 2.6.1 applies an unwrap template in order and refuses every
/// attribute after `CKA_MODIFIABLE` false with `CKR_ATTRIBUTE_READ_ONLY`.
fn sealed(mut t: Vec<Attribute>) -> Vec<Attribute> {
    t.push(Attribute::Modifiable(false));
    t
}

fn common(class: ObjectClass, key_type: CkKeyType, life: Life, name: &Name<'_>) -> Vec<Attribute> {
    vec![
        Attribute::Class(class),
        Attribute::KeyType(key_type),
        Attribute::Token(life == Life::Token),
        Attribute::Copyable(false),
        Attribute::Destroyable(true),
        Attribute::Id(name.id.to_vec()),
        Attribute::Label(name.label.to_vec()),
    ]
}

/// The private half of an asymmetric key, generated or unwrapped: private,
/// sensitive, extractable only by wrapping (`extractable`), sign only.
pub fn private_key(
    key_type: KeyType,
    life: Life,
    name: &Name<'_>,
    extractable: bool,
) -> Vec<Attribute> {
    let mut t = common(ObjectClass::PRIVATE_KEY, ck_key_type(key_type), life, name);
    t.extend([
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(extractable),
        Attribute::Sign(true),
        Attribute::SignRecover(false),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]);
    sealed(t)
}

/// The public half, for `C_GenerateKeyPair` (with the domain parameters) or
/// `C_CreateObject` (with `key`: the point or modulus and exponent). Verify
/// only; public.
pub fn public_key(
    key_type: KeyType,
    life: Life,
    name: &Name<'_>,
    key: Option<Vec<Attribute>>,
) -> Vec<Attribute> {
    let mut t = common(ObjectClass::PUBLIC_KEY, ck_key_type(key_type), life, name);
    t.extend([
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::VerifyRecover(false),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
    ]);
    match key {
        Some(k) => t.extend(k),
        None => match key_type {
            KeyType::P256 => t.push(Attribute::EcParams(P256_PARAMS.to_vec())),
            KeyType::Ed25519 => t.push(Attribute::EcParams(ED25519_PARAMS.to_vec())),
            KeyType::Rsa2048 => t.extend([
                Attribute::ModulusBits(Ulong::new(2048)),
                Attribute::PublicExponent(RSA_EXPONENT.to_vec()),
            ]),
            KeyType::Aes256 => {}
        },
    }
    sealed(t)
}

/// An AES-256 key of keysync: private, sensitive, extractable only by
/// wrapping; AES-GCM encrypt and decrypt, and unwrap (a key imported
/// wrapped under it, as the embedded backend allows); never wrap, sign or
/// derive. `generate` adds `CKA_VALUE_LEN` (an unwrap takes the length from
/// the blob).
pub fn aes_key(life: Life, name: &Name<'_>, extractable: bool, generate: bool) -> Vec<Attribute> {
    let mut t = common(ObjectClass::SECRET_KEY, CkKeyType::AES, life, name);
    t.extend([
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(extractable),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Unwrap(true),
        Attribute::Wrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ]);
    if generate {
        t.push(Attribute::ValueLen(Ulong::new(32)));
    }
    sealed(t)
}

/// The template of a generated or unwrapped key of `key_type` (the private
/// half for asymmetric keys).
pub fn secret_or_private(
    key_type: KeyType,
    life: Life,
    name: &Name<'_>,
    extractable: bool,
) -> Vec<Attribute> {
    match key_type {
        KeyType::Aes256 => aes_key(life, name, extractable, false),
        _ => private_key(key_type, life, name, extractable),
    }
}

/// The cluster domain key in a token: AES-256, private, sensitive, never
/// extractable, wrap and unwrap only.
pub fn domain_key() -> Vec<Attribute> {
    let name = Name {
        id: DOMAIN_KEY_ID,
        label: DOMAIN_KEY_ID,
    };
    let mut t = common(ObjectClass::SECRET_KEY, CkKeyType::AES, Life::Token, &name);
    t.extend([
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ]);
    sealed(t)
}

/// A throw-away session AES-256 key with a value keysync knows (a transport
/// key, the probe's key-encryption key, the domain check key): wrap and/or
/// unwrap as asked, nothing else.
pub fn known_aes_session_key(
    value: &[u8],
    wrap: bool,
    unwrap: bool,
    extractable: bool,
) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(CkKeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(!extractable),
        Attribute::Extractable(extractable),
        Attribute::Wrap(wrap),
        Attribute::Unwrap(unwrap),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Value(value.to_vec()),
    ]
}

/// A throw-away session AES-256 key-encryption key made in the token.
pub fn session_kek() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(CkKeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::ValueLen(Ulong::new(32)),
    ]
}

/// A throw-away session generic secret for `CKM_SHA256_HMAC`: an AES key's
/// material unwrapped again under this type computes the embedded
/// backend's fingerprint (HMAC-SHA-256 under the key) inside the token.
pub fn hmac_session_key() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(CkKeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Verify(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]
}
