//! Keys in the token: generate, wrap (clone out), unwrap (clone in),
//! fingerprint without seeing the key, sign, AES-GCM, list, delete.
//!
//! Every object is found again by `CKA_ID` for every call: handles of
//! private objects go stale when the token logs the user out and in again.

use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::Ulong;
use keysync_schemas::{DigestAlg, DigestSignScheme, Fingerprint, KeyId, KeyType};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use super::error::{integrity, map, Pkcs11Error};
use super::spki;
use super::templates::{self, key_id_bytes, Life, Name, DOMAIN_KEY_ID};
use super::token::Token;
use crate::material::{
    public_fingerprint, random_bytes, secret_fingerprint_message, GCM_NONCE_LEN,
};

/// The RFC 5649 blob of a 32-byte key: 32 bytes rounded to 8, plus 8.
const AES256_BLOB_LEN: usize = 40;

/// A key in the token, in the form keysync announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenKey {
    /// Its id (`CKA_ID`).
    pub id: KeyId,
    /// Its type.
    pub key_type: KeyType,
    /// The fingerprint every HSM computes alike.
    pub fingerprint: Fingerprint,
    /// SPKI DER, for asymmetric keys.
    pub public_key: Option<Vec<u8>>,
}

/// A key found in the token by a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedKey {
    /// Its id.
    pub id: KeyId,
    /// Its type.
    pub key_type: KeyType,
    /// Its `CKA_LABEL`.
    pub label: String,
}

/// The key a blob is wrapped under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kek {
    /// The cluster domain key (clones).
    Domain,
    /// An AES-256 key of keysync in the token (an import wrapped under a
    /// user's key).
    Key(KeyId),
}

/// A wrapped key to put into the token.
#[derive(Debug, Clone, Copy)]
pub struct UnwrapRequest<'a> {
    /// The new key's id.
    pub id: KeyId,
    /// Its type.
    pub key_type: KeyType,
    /// `CKA_LABEL` (the id when `None`).
    pub label: Option<&'a str>,
    /// What the blob is wrapped under.
    pub kek: Kek,
    /// RFC 5649 blob: PKCS#8 DER or the 32 raw bytes of an AES key.
    pub blob: &'a [u8],
    /// SPKI DER of the public key; required for asymmetric keys (the
    /// public-key object is made from it, and the unwrapped private key
    /// must sign a challenge it verifies).
    pub public_key: Option<&'a [u8]>,
    /// The fingerprint announced, if any: refused unless it matches.
    pub fingerprint: Option<Fingerprint>,
}

/// A session object destroyed when this guard drops (on every path).
pub(crate) struct Temp<'s> {
    session: &'s Session,
    /// The object.
    pub handle: ObjectHandle,
}

impl<'s> Temp<'s> {
    pub(crate) fn new(session: &'s Session, handle: ObjectHandle) -> Self {
        Temp { session, handle }
    }
}

impl Drop for Temp<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.session.destroy_object(self.handle) {
            tracing::debug!(error = %e, "destroying a session object failed");
        }
    }
}

/// A key object of keysync found by id.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyObject {
    pub handle: ObjectHandle,
    pub key_type: KeyType,
    pub public: Option<ObjectHandle>,
}

pub(crate) fn find(s: &Session, template: &[Attribute]) -> Result<Vec<ObjectHandle>, Pkcs11Error> {
    s.find_objects(template).map_err(map("C_FindObjects"))
}

/// keysync's type of a key object, from its PKCS#11 type and size; `None`
/// for anything else.
pub(crate) fn key_type_of(s: &Session, h: ObjectHandle) -> Result<Option<KeyType>, Pkcs11Error> {
    let attrs = s
        .get_attributes(
            h,
            &[
                AttributeType::KeyType,
                AttributeType::EcParams,
                AttributeType::Modulus,
                AttributeType::ValueLen,
            ],
        )
        .map_err(map("C_GetAttributeValue"))?;
    let mut ck = None;
    let mut params = None;
    let mut modulus_len = None;
    let mut value_len = None;
    for a in attrs {
        match a {
            Attribute::KeyType(t) => ck = Some(t),
            Attribute::EcParams(p) => params = Some(p),
            Attribute::Modulus(m) => modulus_len = Some(m.iter().skip_while(|b| **b == 0).count()),
            Attribute::ValueLen(l) => value_len = Some(usize::from(l)),
            _ => {}
        }
    }
    Ok(match ck {
        Some(t) if t == CkKeyType::EC && params.as_deref() == Some(spki::P256_PARAMS) => {
            Some(KeyType::P256)
        }
        Some(t) if t == CkKeyType::EC_EDWARDS => Some(KeyType::Ed25519),
        Some(t) if t == CkKeyType::RSA && modulus_len == Some(256) => Some(KeyType::Rsa2048),
        // SoftHSM 2.6.1 leaves CKA_VALUE_LEN 0 on an unwrapped AES key (and
        // refuses it in an unwrap template); keysync checks the length of
        // what it unwraps (a 40-byte KWP blob is a 32-byte key).
        Some(t) if t == CkKeyType::AES && matches!(value_len, Some(32 | 0) | None) => {
            Some(KeyType::Aes256)
        }
        _ => None,
    })
}

/// The key with this id: its private or secret object, and its public one.
pub(crate) fn find_key(s: &Session, id: &KeyId) -> Result<Option<KeyObject>, Pkcs11Error> {
    match find_key_as(s, id, true)? {
        Some(k) => Ok(Some(k)),
        // A session key (session objects of this process, on the
        // session-key session).
        None => find_key_as(s, id, false),
    }
}

fn find_key_as(s: &Session, id: &KeyId, on_token: bool) -> Result<Option<KeyObject>, Pkcs11Error> {
    let idb = key_id_bytes(id);
    let mut keys = find(
        s,
        &[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Token(on_token),
            Attribute::Id(idb.clone()),
        ],
    )?;
    keys.extend(find(
        s,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(on_token),
            Attribute::Id(idb.clone()),
        ],
    )?);
    let handle = match keys.as_slice() {
        [] => return Ok(None),
        [h] => *h,
        many => {
            return Err(Pkcs11Error::BadObject(format!(
                "{} key objects carry the id of key {id}",
                many.len()
            )))
        }
    };
    let key_type = key_type_of(s, handle)?.ok_or_else(|| {
        Pkcs11Error::BadObject(format!("key {id} is not of a type keysync makes"))
    })?;
    let public = if key_type.is_asymmetric() {
        match find(
            s,
            &[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::Token(on_token),
                Attribute::Id(idb),
            ],
        )?
        .as_slice()
        {
            [] => None,
            [h] => Some(*h),
            _ => {
                return Err(Pkcs11Error::BadObject(format!(
                    "several public-key objects carry the id of key {id}"
                )))
            }
        }
    } else {
        None
    };
    Ok(Some(KeyObject {
        handle,
        key_type,
        public,
    }))
}

/// The domain key's handle, if the token holds one.
pub(crate) fn find_domain_key(s: &Session) -> Result<Option<ObjectHandle>, Pkcs11Error> {
    let found = find(
        s,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(true),
            Attribute::Id(DOMAIN_KEY_ID.to_vec()),
        ],
    )?;
    match found.as_slice() {
        [] => Ok(None),
        [h] => Ok(Some(*h)),
        many => Err(Pkcs11Error::BadObject(format!(
            "{} objects carry the domain key's id",
            many.len()
        ))),
    }
}

/// The mechanism generating a key of `key_type`.
fn generation_mechanism(key_type: KeyType) -> Mechanism<'static> {
    match key_type {
        KeyType::P256 => Mechanism::EccKeyPairGen,
        KeyType::Ed25519 => Mechanism::EccEdwardsKeyPairGen,
        KeyType::Rsa2048 => Mechanism::RsaPkcsKeyPairGen,
        KeyType::Aes256 => Mechanism::AesKeyGen,
    }
}

/// Generates a key of `key_type` named `name` (`life`: token or session
/// object). Returns the private or secret handle and the public one.
pub(crate) fn generate_objects(
    s: &Session,
    key_type: KeyType,
    name: &Name<'_>,
    life: Life,
) -> Result<(ObjectHandle, Option<ObjectHandle>), Pkcs11Error> {
    let mech = generation_mechanism(key_type);
    if key_type == KeyType::Aes256 {
        let h = s
            .generate_key(&mech, &templates::aes_key(life, name, true, true))
            .map_err(map("C_GenerateKey"))?;
        return Ok((h, None));
    }
    let (public, private) = s
        .generate_key_pair(
            &mech,
            &templates::public_key(key_type, life, name, None),
            &templates::private_key(key_type, life, name, true),
        )
        .map_err(map("C_GenerateKeyPair"))?;
    Ok((private, Some(public)))
}

/// SPKI DER of a public-key object.
pub(crate) fn read_spki(
    s: &Session,
    public: ObjectHandle,
    key_type: KeyType,
) -> Result<Vec<u8>, Pkcs11Error> {
    let attrs = s
        .get_attributes(public, spki::public_attribute_types(key_type))
        .map_err(map("C_GetAttributeValue"))?;
    spki::spki_from_attributes(key_type, &attrs)
}

/// The embedded backend's AES fingerprint (HMAC-SHA-256 under the key)
/// computed in the token from a blob of the key under `kek`: the blob is
/// unwrapped again as a session generic secret, which can HMAC (an AES key
/// object cannot on SoftHSM).
pub(crate) fn hmac_fingerprint(
    s: &Session,
    kek: ObjectHandle,
    blob: &[u8],
) -> Result<Fingerprint, Pkcs11Error> {
    let g = Temp::new(
        s,
        s.unwrap_key(
            &Mechanism::AesKeyWrapPad,
            kek,
            blob,
            &templates::hmac_session_key(),
        )
        .map_err(integrity("C_UnwrapKey"))?,
    );
    let mac = s
        .sign(
            &Mechanism::Sha256Hmac,
            g.handle,
            &secret_fingerprint_message(KeyType::Aes256),
        )
        .map_err(map("C_Sign (HMAC)"))?;
    let out: [u8; 32] = mac
        .as_slice()
        .try_into()
        .map_err(|_| Pkcs11Error::BadObject(format!("a {}-byte HMAC-SHA-256", mac.len())))?;
    Ok(Fingerprint(out))
}

/// The fingerprint of an AES key object: wrapped under a throw-away
/// session key, then [`hmac_fingerprint`].
pub(crate) fn aes_fingerprint(s: &Session, key: ObjectHandle) -> Result<Fingerprint, Pkcs11Error> {
    let kek = Temp::new(
        s,
        s.generate_key(&Mechanism::AesKeyGen, &templates::session_kek())
            .map_err(map("C_GenerateKey"))?,
    );
    let blob = s
        .wrap_key(&Mechanism::AesKeyWrapPad, kek.handle, key)
        .map_err(map("C_WrapKey"))?;
    hmac_fingerprint(s, kek.handle, &blob)
}

/// Signs `data` with a private key object as keysync signs: ECDSA P-256
/// over SHA-256 (`CKM_ECDSA` over the digest, DER), Ed25519 (`CKM_EDDSA`),
/// RSA PKCS#1 v1.5 over SHA-256.
pub(crate) fn sign_with(
    s: &Session,
    key: ObjectHandle,
    key_type: KeyType,
    data: &[u8],
) -> Result<Vec<u8>, Pkcs11Error> {
    match key_type {
        KeyType::P256 => {
            let digest = Sha256::digest(data);
            let raw = s
                .sign(&Mechanism::Ecdsa, key, &digest)
                .map_err(map("C_Sign (ECDSA)"))?;
            spki::ecdsa_raw_to_der(&raw)
        }
        KeyType::Ed25519 => s
            .sign(
                &Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                key,
                data,
            )
            .map_err(map("C_Sign (EdDSA)")),
        KeyType::Rsa2048 => s
            .sign(&Mechanism::Sha256RsaPkcs, key, data)
            .map_err(map("C_Sign (SHA256-RSA-PKCS)")),
        KeyType::Aes256 => Err(cannot(key_type, "sign")),
    }
}

/// AES-256-GCM in the token with a nonce keysync draws: nonce ‖ ciphertext
/// ‖ tag, the embedded backend's format.
pub(crate) fn gcm_encrypt(
    s: &Session,
    key: ObjectHandle,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, Pkcs11Error> {
    let mut nonce = [0u8; GCM_NONCE_LEN];
    random_bytes(&mut nonce).map_err(|e| Pkcs11Error::Library {
        op: "random nonce",
        detail: e.to_string(),
    })?;
    let mut iv = nonce;
    let params =
        GcmParams::new(&mut iv, aad, Ulong::new(128)).map_err(map("AES-GCM parameters"))?;
    let ct = s
        .encrypt(&Mechanism::AesGcm(params), key, plaintext)
        .map_err(map("C_Encrypt (AES-GCM)"))?;
    let mut out = Vec::with_capacity(GCM_NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens what [`gcm_encrypt`] (or the embedded backend) sealed.
pub(crate) fn gcm_decrypt(
    s: &Session,
    key: ObjectHandle,
    sealed: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Pkcs11Error> {
    if sealed.len() < GCM_NONCE_LEN + 16 {
        return Err(Pkcs11Error::Integrity);
    }
    let (nonce, ct) = sealed.split_at(GCM_NONCE_LEN);
    let mut iv = [0u8; GCM_NONCE_LEN];
    iv.copy_from_slice(nonce);
    let params =
        GcmParams::new(&mut iv, aad, Ulong::new(128)).map_err(map("AES-GCM parameters"))?;
    s.decrypt(&Mechanism::AesGcm(params), key, ct)
        .map(Zeroizing::new)
        .map_err(integrity("C_Decrypt (AES-GCM)"))
}

/// Signs a digest the caller computed with a private key object:
/// `CKM_ECDSA` (raw r ‖ s), `CKM_RSA_PKCS` (the DigestInfo as given),
/// `CKM_RSA_PKCS_PSS`. The input was checked against the scheme first.
pub(crate) fn sign_digest_with(
    s: &Session,
    key: ObjectHandle,
    key_type: KeyType,
    scheme: &DigestSignScheme,
    digest: &[u8],
) -> Result<Vec<u8>, Pkcs11Error> {
    scheme.check(digest).map_err(Pkcs11Error::Invalid)?;
    if scheme.key_type() != key_type {
        return Err(cannot(key_type, "sign a digest with that scheme"));
    }
    match scheme {
        DigestSignScheme::Ecdsa => s
            .sign(&Mechanism::Ecdsa, key, digest)
            .map_err(map("C_Sign (ECDSA on a digest)")),
        DigestSignScheme::RsaPkcs1 => s
            .sign(&Mechanism::RsaPkcs, key, digest)
            .map_err(map("C_Sign (RSA-PKCS)")),
        DigestSignScheme::RsaPss {
            hash,
            mgf,
            salt_len,
        } => {
            let params = PkcsPssParams {
                hash_alg: hash_mechanism(*hash),
                mgf: mgf1(*mgf),
                s_len: Ulong::new(u64::from(*salt_len)),
            };
            s.sign(&Mechanism::RsaPkcsPss(params), key, digest)
                .map_err(map("C_Sign (RSA-PKCS-PSS)"))
        }
    }
}

fn hash_mechanism(h: DigestAlg) -> MechanismType {
    match h {
        DigestAlg::Sha256 => MechanismType::SHA256,
        DigestAlg::Sha384 => MechanismType::SHA384,
        DigestAlg::Sha512 => MechanismType::SHA512,
    }
}

fn mgf1(h: DigestAlg) -> PkcsMgfType {
    match h {
        DigestAlg::Sha256 => PkcsMgfType::MGF1_SHA256,
        DigestAlg::Sha384 => PkcsMgfType::MGF1_SHA384,
        DigestAlg::Sha512 => PkcsMgfType::MGF1_SHA512,
    }
}

/// AES-GCM in the token with the caller's IV, AAD and tag length:
/// ciphertext ‖ tag.
pub(crate) fn gcm_encrypt_with(
    s: &Session,
    key: ObjectHandle,
    params: &keysync_schemas::GcmParams,
    plaintext: &[u8],
) -> Result<Vec<u8>, Pkcs11Error> {
    params.check().map_err(Pkcs11Error::Invalid)?;
    let mut iv = params.iv.clone();
    let gcm = GcmParams::new(&mut iv, &params.aad, Ulong::new(u64::from(params.tag_bits)))
        .map_err(map("AES-GCM parameters"))?;
    s.encrypt(&Mechanism::AesGcm(gcm), key, plaintext)
        .map_err(map("C_Encrypt (AES-GCM)"))
}

/// Opens ciphertext ‖ tag with the caller's parameters.
pub(crate) fn gcm_decrypt_with(
    s: &Session,
    key: ObjectHandle,
    params: &keysync_schemas::GcmParams,
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Pkcs11Error> {
    params.check().map_err(Pkcs11Error::Invalid)?;
    if sealed.len() < params.tag_len() {
        return Err(Pkcs11Error::Integrity);
    }
    let mut iv = params.iv.clone();
    let gcm = GcmParams::new(&mut iv, &params.aad, Ulong::new(u64::from(params.tag_bits)))
        .map_err(map("AES-GCM parameters"))?;
    s.decrypt(&Mechanism::AesGcm(gcm), key, sealed)
        .map(Zeroizing::new)
        .map_err(integrity("C_Decrypt (AES-GCM)"))
}

fn cannot(key_type: KeyType, op: &str) -> Pkcs11Error {
    Pkcs11Error::Unsupported {
        what: format!("{op} with {key_type} keys"),
        why: "the key type cannot".into(),
    }
}

fn label_of(id: &KeyId, label: Option<&str>) -> Vec<u8> {
    label.map_or_else(|| id.to_string().into_bytes(), |l| l.as_bytes().to_vec())
}

impl Token {
    /// The key with this id, from the handle cache or found (and cached).
    pub(crate) fn key(&self, s: &Session, id: &KeyId) -> Result<Option<KeyObject>, Pkcs11Error> {
        if let Some(k) = self.handles.lock().ok().and_then(|h| h.get(id).copied()) {
            return Ok(Some(k));
        }
        let found = find_key(s, id)?;
        if let (Some(k), Ok(mut h)) = (found, self.handles.lock()) {
            h.insert(*id, k);
        }
        Ok(found)
    }

    /// The domain key's handle, from the cache or found (and cached).
    pub(crate) fn domain(&self, s: &Session) -> Result<Option<ObjectHandle>, Pkcs11Error> {
        if let Some(d) = self.domain_handle.lock().ok().and_then(|d| *d) {
            return Ok(Some(d));
        }
        let found = find_domain_key(s)?;
        if let (Some(d), Ok(mut slot)) = (found, self.domain_handle.lock()) {
            *slot = Some(d);
        }
        Ok(found)
    }

    fn forget_key(&self, id: &KeyId) {
        if let Ok(mut h) = self.handles.lock() {
            h.remove(id);
        }
    }
}

impl Token {
    /// Generates a key inside the token as token objects (the public half
    /// too, with the same `CKA_ID`), sensitive and extractable only by
    /// wrapping, and returns it with its fingerprint, computed without the
    /// material leaving the token. Refuses an id already in use. Blocks.
    pub fn generate(
        &self,
        id: KeyId,
        key_type: KeyType,
        label: Option<&str>,
    ) -> Result<TokenKey, Pkcs11Error> {
        self.with_session(|s| generate_on(s, id, key_type, label, Life::Token))
    }

    /// Generates a session key: session objects on the token's dedicated
    /// session-key session, so they live until the agent stops (or the
    /// token goes away) and any pooled session finds them by `CKA_ID`.
    /// Never wrapped, never announced. Blocks.
    pub fn generate_session_key(
        &self,
        id: KeyId,
        key_type: KeyType,
        label: Option<&str>,
    ) -> Result<TokenKey, Pkcs11Error> {
        self.with_session_key_session(|s| generate_on(s, id, key_type, label, Life::Session))
    }

    /// The key wrapped under the domain key with `CKM_AES_KEY_WRAP_PAD`:
    /// RFC 5649 bytes any keysync HSM unwraps. Blocks.
    pub fn wrap(&self, id: &KeyId) -> Result<Vec<u8>, Pkcs11Error> {
        self.with_session(|s| {
            let key = self.key(s, id)?.ok_or(Pkcs11Error::NotFound(*id))?;
            let dk = self
                .domain(s)?
                .ok_or_else(|| Pkcs11Error::DomainKeyMissing {
                    label: self.label().to_string(),
                })?;
            s.wrap_key(&Mechanism::AesKeyWrapPad, dk, key.handle)
                .map_err(|e| match map("C_WrapKey")(e) {
                    Pkcs11Error::Unsupported { why, .. } => Pkcs11Error::Unsupported {
                        what: format!("wrapping {} keys (cloning them out)", key.key_type),
                        why,
                    },
                    other => other,
                })
        })
    }

    /// Unwraps a blob into a new token key, checking it first without
    /// storing anything: it is unwrapped as a session object and must sign
    /// a challenge the announced public key verifies (asymmetric keys) or
    /// give the announced fingerprint (AES). Only then the token objects
    /// are made: the public key from the SPKI, then the private or secret
    /// key. A tampered blob or one under another key is `Integrity`, and
    /// leaves nothing behind; a type the token cannot unwrap (per the
    /// capability probe) is `Unsupported`. Blocks.
    pub fn unwrap(&self, req: &UnwrapRequest<'_>) -> Result<TokenKey, Pkcs11Error> {
        self.unwrap_under(req, None)
    }

    /// Imports plaintext material (PKCS#8 DER, or the 32 bytes of an AES
    /// key) as a token key, the way PKCS#11 imports sensitive keys: wrapped
    /// in software under a fresh random transport key, which goes into the
    /// token as a throw-away session object and unwraps it there. The
    /// material is checked as [`Token::unwrap`] checks a clone
    /// (`public_key` is its SPKI, required for asymmetric keys). Blocks.
    pub fn import(
        &self,
        id: KeyId,
        key_type: KeyType,
        label: Option<&str>,
        plaintext: &[u8],
        public_key: Option<&[u8]>,
    ) -> Result<TokenKey, Pkcs11Error> {
        let library = |e: &dyn std::fmt::Display| Pkcs11Error::Library {
            op: "import transport key",
            detail: e.to_string(),
        };
        let mut transport = Zeroizing::new([0u8; 32]);
        random_bytes(transport.as_mut_slice()).map_err(|e| library(&e))?;
        let blob = keysync_security::domain_key::wrap_with(&transport, plaintext)
            .map_err(|e| library(&e))?;
        let req = UnwrapRequest {
            id,
            key_type,
            label,
            kek: Kek::Domain,
            blob: &blob,
            public_key,
            fingerprint: None,
        };
        self.unwrap_under(&req, Some(&transport))
    }

    /// [`Token::unwrap`], under `req.kek` or, when given, a transport key
    /// of known value (the import path).
    fn unwrap_under(
        &self,
        req: &UnwrapRequest<'_>,
        transport: Option<&[u8; 32]>,
    ) -> Result<TokenKey, Pkcs11Error> {
        let t = req.key_type;
        if let Some(why) = self.capabilities()?.get(t).unwrap.refusal() {
            return Err(Pkcs11Error::Unsupported {
                what: format!("unwrapping {t} keys (cloning them in)"),
                why: why.to_string(),
            });
        }
        let (spki, public_attrs) = if t.is_asymmetric() {
            let spki = req.public_key.ok_or_else(|| {
                Pkcs11Error::Invalid(format!("a {t} key comes with its public key (SPKI)"))
            })?;
            (
                Some(spki.to_vec()),
                Some(spki::public_attributes_from_spki(t, spki)?),
            )
        } else {
            (None, None)
        };
        let idb = key_id_bytes(&req.id);
        let labelb = label_of(&req.id, req.label);
        self.with_session(|s| {
            if !find(s, &[Attribute::Id(idb.clone())])?.is_empty() {
                return Err(Pkcs11Error::AlreadyExists(req.id));
            }
            let transport_key = match transport {
                Some(value) => Some(Temp::new(
                    s,
                    s.create_object(&templates::known_aes_session_key(value, false, true, false))
                        .map_err(map("C_CreateObject (transport key)"))?,
                )),
                None => None,
            };
            let kek = match &transport_key {
                Some(k) => k.handle,
                None => self.kek_handle(s, req.kek)?,
            };
            // Check it as a session object first.
            let fingerprint = match &spki {
                Some(spki) => {
                    let fp = public_fingerprint(t, spki);
                    if req.fingerprint.is_some_and(|want| want != fp) {
                        return Err(Pkcs11Error::Mismatch("fingerprint"));
                    }
                    let name = Name {
                        id: &idb,
                        label: &labelb,
                    };
                    let probe = Temp::new(
                        s,
                        s.unwrap_key(
                            &Mechanism::AesKeyWrapPad,
                            kek,
                            req.blob,
                            &templates::private_key(t, Life::Session, &name, false),
                        )
                        .map_err(integrity("C_UnwrapKey"))?,
                    );
                    let mut challenge = [0u8; 32];
                    random_bytes(&mut challenge).map_err(|e| Pkcs11Error::Library {
                        op: "random challenge",
                        detail: e.to_string(),
                    })?;
                    let sig = sign_with(s, probe.handle, t, &challenge)?;
                    if !spki::verify(t, spki, &challenge, &sig)? {
                        return Err(Pkcs11Error::Mismatch("public key"));
                    }
                    fp
                }
                None => {
                    let fp = hmac_fingerprint(s, kek, req.blob)?;
                    // It unwrapped: now its length tells whether it is a
                    // 32-byte key (a 40-byte blob), as the embedded
                    // backend refuses other lengths as invalid material.
                    if req.blob.len() != AES256_BLOB_LEN {
                        return Err(Pkcs11Error::Invalid(format!(
                            "the blob holds a {}-byte key, not an AES-256 key",
                            req.blob.len().saturating_sub(8)
                        )));
                    }
                    if req.fingerprint.is_some_and(|want| want != fp) {
                        return Err(Pkcs11Error::Mismatch("fingerprint"));
                    }
                    fp
                }
            };
            let name = Name {
                id: &idb,
                label: &labelb,
            };
            let public = match &public_attrs {
                Some(attrs) => Some(
                    s.create_object(&templates::public_key(
                        t,
                        Life::Token,
                        &name,
                        Some(attrs.clone()),
                    ))
                    .map_err(map("C_CreateObject (public key)"))?,
                ),
                None => None,
            };
            let stored = s
                .unwrap_key(
                    &Mechanism::AesKeyWrapPad,
                    kek,
                    req.blob,
                    &templates::secret_or_private(t, Life::Token, &name, true),
                )
                .map_err(integrity("C_UnwrapKey"));
            if let Err(e) = stored {
                if let Some(p) = public {
                    let _ = s.destroy_object(p);
                }
                return Err(e);
            }
            Ok(TokenKey {
                id: req.id,
                key_type: t,
                fingerprint,
                public_key: spki.clone(),
            })
        })
    }

    fn kek_handle(&self, s: &Session, kek: Kek) -> Result<ObjectHandle, Pkcs11Error> {
        match kek {
            Kek::Domain => self
                .domain(s)?
                .ok_or_else(|| Pkcs11Error::DomainKeyMissing {
                    label: self.label().to_string(),
                }),
            Kek::Key(id) => {
                let k = self.key(s, &id)?.ok_or(Pkcs11Error::NotFound(id))?;
                if k.key_type != KeyType::Aes256 {
                    return Err(Pkcs11Error::Invalid(format!(
                        "key {id} is not an AES-256 wrapping key"
                    )));
                }
                Ok(k.handle)
            }
        }
    }

    /// The key's fingerprint, computed without the material leaving the
    /// token (from the public-key object, or an HMAC inside it). Blocks.
    pub fn fingerprint(&self, id: &KeyId) -> Result<Fingerprint, Pkcs11Error> {
        self.with_session(|s| {
            let key = self.key(s, id)?.ok_or(Pkcs11Error::NotFound(*id))?;
            match key.key_type {
                KeyType::Aes256 => aes_fingerprint(s, key.handle),
                t => {
                    let p = key.public.ok_or_else(|| {
                        Pkcs11Error::BadObject(format!("key {id} has no public-key object"))
                    })?;
                    Ok(public_fingerprint(t, &read_spki(s, p, t)?))
                }
            }
        })
    }

    /// SPKI DER of an asymmetric key, from its public-key object. Blocks.
    pub fn public_key(&self, id: &KeyId) -> Result<Vec<u8>, Pkcs11Error> {
        self.with_session(|s| {
            let key = self.key(s, id)?.ok_or(Pkcs11Error::NotFound(*id))?;
            if !key.key_type.is_asymmetric() {
                return Err(cannot(key.key_type, "export a public key"));
            }
            let p = key.public.ok_or_else(|| {
                Pkcs11Error::BadObject(format!("key {id} has no public-key object"))
            })?;
            read_spki(s, p, key.key_type)
        })
    }

    /// Signs as the embedded backend does (see `KeyMaterial::sign`). Blocks.
    pub fn sign(&self, id: &KeyId, data: &[u8]) -> Result<Vec<u8>, Pkcs11Error> {
        self.with_session(|s| {
            let key = self.key(s, id)?.ok_or(Pkcs11Error::NotFound(*id))?;
            sign_with(s, key.handle, key.key_type, data)
        })
    }

    /// Verifies a signature with the key's public key (in software: it is
    /// public). Blocks.
    pub fn verify(&self, id: &KeyId, data: &[u8], signature: &[u8]) -> Result<bool, Pkcs11Error> {
        let (key_type, spki) = self.with_session(|s| {
            let key = self.key(s, id)?.ok_or(Pkcs11Error::NotFound(*id))?;
            if !key.key_type.is_asymmetric() {
                return Err(cannot(key.key_type, "verify"));
            }
            let p = key.public.ok_or_else(|| {
                Pkcs11Error::BadObject(format!("key {id} has no public-key object"))
            })?;
            Ok((key.key_type, read_spki(s, p, key.key_type)?))
        })?;
        spki::verify(key_type, &spki, data, signature)
    }

    /// AES-256-GCM with a random nonce: nonce ‖ ciphertext ‖ tag. Blocks.
    pub fn encrypt(
        &self,
        id: &KeyId,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, Pkcs11Error> {
        self.with_session(|s| {
            let key = self.key(s, id)?.ok_or(Pkcs11Error::NotFound(*id))?;
            if key.key_type != KeyType::Aes256 {
                return Err(cannot(key.key_type, "encrypt"));
            }
            gcm_encrypt(s, key.handle, plaintext, aad)
        })
    }

    /// Opens nonce ‖ ciphertext ‖ tag; `Integrity` if it was altered or
    /// sealed under another key. Blocks.
    pub fn decrypt(
        &self,
        id: &KeyId,
        sealed: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Pkcs11Error> {
        self.with_session(|s| {
            let key = self.key(s, id)?.ok_or(Pkcs11Error::NotFound(*id))?;
            if key.key_type != KeyType::Aes256 {
                return Err(cannot(key.key_type, "decrypt"));
            }
            gcm_decrypt(s, key.handle, sealed, aad)
        })
    }

    /// Signs a digest the caller computed (see [`DigestSignScheme`]). Blocks.
    pub fn sign_digest(
        &self,
        id: &KeyId,
        scheme: &DigestSignScheme,
        digest: &[u8],
    ) -> Result<Vec<u8>, Pkcs11Error> {
        self.with_session(|s| {
            let key = self.key(s, id)?.ok_or(Pkcs11Error::NotFound(*id))?;
            sign_digest_with(s, key.handle, key.key_type, scheme, digest)
        })
    }

    /// AES-GCM with the caller's parameters: ciphertext ‖ tag. Blocks.
    pub fn encrypt_gcm(
        &self,
        id: &KeyId,
        params: &keysync_schemas::GcmParams,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, Pkcs11Error> {
        self.with_session(|s| {
            let key = self.key(s, id)?.ok_or(Pkcs11Error::NotFound(*id))?;
            if key.key_type != KeyType::Aes256 {
                return Err(cannot(key.key_type, "encrypt"));
            }
            gcm_encrypt_with(s, key.handle, params, plaintext)
        })
    }

    /// Opens ciphertext ‖ tag with the caller's parameters. Blocks.
    pub fn decrypt_gcm(
        &self,
        id: &KeyId,
        params: &keysync_schemas::GcmParams,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Pkcs11Error> {
        self.with_session(|s| {
            let key = self.key(s, id)?.ok_or(Pkcs11Error::NotFound(*id))?;
            if key.key_type != KeyType::Aes256 {
                return Err(cannot(key.key_type, "decrypt"));
            }
            gcm_decrypt_with(s, key.handle, params, sealed)
        })
    }

    /// One key by id, if the token holds it. Blocks.
    pub fn find(&self, id: &KeyId) -> Result<Option<ListedKey>, Pkcs11Error> {
        self.with_session(|s| {
            let Some(key) = self.key(s, id)? else {
                return Ok(None);
            };
            Ok(Some(ListedKey {
                id: *id,
                key_type: key.key_type,
                label: read_label(s, key.handle)?,
            }))
        })
    }

    /// Every keysync key in the token (private and secret key objects whose
    /// `CKA_ID` is a 16-byte key id and whose type keysync makes), in id
    /// order. The domain key is not one. Blocks.
    pub fn list(&self) -> Result<Vec<ListedKey>, Pkcs11Error> {
        self.with_session(|s| {
            let mut out = Vec::new();
            for class in [ObjectClass::PRIVATE_KEY, ObjectClass::SECRET_KEY] {
                for h in find(s, &[Attribute::Class(class), Attribute::Token(true)])? {
                    let attrs = s
                        .get_attributes(h, &[AttributeType::Id, AttributeType::Label])
                        .map_err(map("C_GetAttributeValue"))?;
                    let mut id = None;
                    let mut label = String::new();
                    for a in attrs {
                        match a {
                            Attribute::Id(v) => id = uuid::Uuid::from_slice(&v).ok().map(KeyId),
                            Attribute::Label(v) => label = String::from_utf8_lossy(&v).into_owned(),
                            _ => {}
                        }
                    }
                    let Some(id) = id else { continue };
                    let Some(key_type) = key_type_of(s, h)? else {
                        continue;
                    };
                    out.push(ListedKey {
                        id,
                        key_type,
                        label,
                    });
                }
            }
            out.sort_by_key(|k| k.id);
            Ok(out)
        })
    }

    /// Destroys every object carrying the key's id (private, secret and
    /// public). Returns whether there was any. Blocks.
    pub fn delete(&self, id: &KeyId) -> Result<bool, Pkcs11Error> {
        let idb = key_id_bytes(id);
        self.with_session(|s| {
            let found = find(s, &[Attribute::Id(idb.clone())])?;
            self.forget_key(id);
            for h in &found {
                s.destroy_object(*h).map_err(map("C_DestroyObject"))?;
            }
            Ok(!found.is_empty())
        })
    }

    /// The attributes of a key's private or secret object, for checks and
    /// audits (sensitive ones are simply absent). Blocks.
    pub fn key_attributes(
        &self,
        id: &KeyId,
        types: &[AttributeType],
    ) -> Result<Vec<Attribute>, Pkcs11Error> {
        self.with_session(|s| {
            let key = self.key(s, id)?.ok_or(Pkcs11Error::NotFound(*id))?;
            s.get_attributes(key.handle, types)
                .map_err(map("C_GetAttributeValue"))
        })
    }
}

/// Generates a key as objects of `life` on `s` (the public half too, with
/// the same `CKA_ID`) and returns it with its fingerprint, computed without
/// the material leaving the token. Refuses an id already in use.
fn generate_on(
    s: &Session,
    id: KeyId,
    key_type: KeyType,
    label: Option<&str>,
    life: Life,
) -> Result<TokenKey, Pkcs11Error> {
    let idb = key_id_bytes(&id);
    let labelb = label_of(&id, label);
    if !find(s, &[Attribute::Id(idb.clone())])?.is_empty() {
        return Err(Pkcs11Error::AlreadyExists(id));
    }
    let name = Name {
        id: &idb,
        label: &labelb,
    };
    let (key, public) = generate_objects(s, key_type, &name, life)?;
    let made = match public {
        None => aes_fingerprint(s, key).map(|fp| (fp, None)),
        Some(p) => {
            read_spki(s, p, key_type).map(|spki| (public_fingerprint(key_type, &spki), Some(spki)))
        }
    };
    match made {
        Ok((fingerprint, public_key)) => Ok(TokenKey {
            id,
            key_type,
            fingerprint,
            public_key,
        }),
        Err(e) => {
            // No half-made key: take it out again.
            let _ = s.destroy_object(key);
            if let Some(p) = public {
                let _ = s.destroy_object(p);
            }
            Err(e)
        }
    }
}

fn read_label(s: &Session, h: ObjectHandle) -> Result<String, Pkcs11Error> {
    let attrs = s
        .get_attributes(h, &[AttributeType::Label])
        .map_err(map("C_GetAttributeValue"))?;
    Ok(attrs
        .into_iter()
        .find_map(|a| match a {
            Attribute::Label(v) => Some(String::from_utf8_lossy(&v).into_owned()),
            _ => None,
        })
        .unwrap_or_default())
}
