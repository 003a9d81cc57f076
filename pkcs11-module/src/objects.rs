//! Objects: every keysync token key is one secret-key object (AES) or a
//! private and a public key object (P-256, Ed25519, RSA). An object handle
//! names a (key id, class) pair and stays the same for the module's life.
//! Token objects are the cluster's token keys; a session object
//! (`CKA_TOKEN` false) is a keysync session key on one HSM, deleted when
//! the session that made it closes.
//!
//! `CKA_ID` is the application's own id when the template that made the
//! key gave one (kept in the key's attributes, carried to every HSM, so a
//! search from any process finds it), else the 16 bytes of the keysync key
//! id, the id the agents' PKCS#11 tokens give the key. Both halves of a
//! pair show the same `CKA_ID` (pkcs11-tool and OpenSSL pair them by it);
//! several keys may share one, and a search returns them all.

use std::collections::{BTreeSet, HashMap};

use cryptoki_sys::*;
use der::{Decode as _, Encode as _};
use keysync_schemas::{HsmId, KeyAttributes, KeyId, KeyType, MAX_APP_ID_BYTES, MAX_LABEL_BYTES};

/// What kind of object a handle names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// The private half of a key pair.
    Private,
    /// The public half of a key pair.
    Public,
    /// An AES key.
    Secret,
}

impl Class {
    /// `CKO_*`.
    pub fn ck(self) -> CK_OBJECT_CLASS {
        match self {
            Class::Private => CKO_PRIVATE_KEY,
            Class::Public => CKO_PUBLIC_KEY,
            Class::Secret => CKO_SECRET_KEY,
        }
    }

    /// Only visible to a logged-in user.
    pub fn is_private(self) -> bool {
        !matches!(self, Class::Public)
    }

    /// The classes a key of `key_type` shows as.
    pub fn of(key_type: KeyType) -> &'static [Class] {
        if key_type.is_asymmetric() {
            &[Class::Private, Class::Public]
        } else {
            &[Class::Secret]
        }
    }
}

/// `CKK_*` of a key type.
pub fn ck_key_type(t: KeyType) -> CK_KEY_TYPE {
    match t {
        KeyType::P256 => CKK_EC,
        KeyType::Ed25519 => CKK_EC_EDWARDS,
        KeyType::Rsa2048 => CKK_RSA,
        KeyType::Aes256 => CKK_AES,
    }
}

/// What the module knows of a key.
#[derive(Debug, Clone)]
pub struct Key {
    /// Its type.
    pub key_type: KeyType,
    /// Its label and application id.
    pub attributes: KeyAttributes,
    /// HSMs seen holding it (where its operations go first).
    pub holders: BTreeSet<HsmId>,
    /// Its SPKI DER, once fetched.
    pub spki: Option<Vec<u8>>,
    /// For a session object (`CKA_TOKEN` false), the session that made it:
    /// the key lives on one HSM and is deleted when that session closes.
    pub session: Option<CK_SESSION_HANDLE>,
}

impl Key {
    /// Where its operations go: a session object's one HSM, or any HSM
    /// holding a token key (those that listed it first).
    pub fn route(&self) -> keysync::Route {
        match (self.session, self.holders.iter().next()) {
            (Some(_), Some(hsm)) => keysync::Route::Hsm(hsm.clone()),
            _ => keysync::Route::ReplicaAware,
        }
    }
}

/// Handles and what they name.
#[derive(Debug, Default)]
pub struct Objects {
    by_handle: HashMap<CK_OBJECT_HANDLE, (KeyId, Class)>,
    by_object: HashMap<(KeyId, Class), CK_OBJECT_HANDLE>,
    keys: HashMap<KeyId, Key>,
    last: CK_OBJECT_HANDLE,
}

impl Objects {
    /// Records what a listing or a creation says of a key: merges holders,
    /// keeps a fetched SPKI.
    pub fn learn(&mut self, id: KeyId, key_type: KeyType, attributes: &KeyAttributes, hsm: HsmId) {
        let key = self.keys.entry(id).or_insert_with(|| Key {
            key_type,
            attributes: attributes.clone(),
            holders: BTreeSet::new(),
            spki: None,
            session: None,
        });
        if key.attributes != *attributes {
            key.attributes = attributes.clone();
        }
        key.holders.insert(hsm);
    }

    /// Records a session object made by session `owner` on `hsm`.
    pub fn learn_session_key(
        &mut self,
        id: KeyId,
        key_type: KeyType,
        attributes: KeyAttributes,
        hsm: HsmId,
        owner: CK_SESSION_HANDLE,
    ) {
        self.keys.insert(
            id,
            Key {
                key_type,
                attributes,
                holders: BTreeSet::from([hsm]),
                spki: None,
                session: Some(owner),
            },
        );
    }

    /// Session objects, of one session or (`None`) of all: id and key.
    pub fn session_keys(&self, owner: Option<CK_SESSION_HANDLE>) -> Vec<(KeyId, Key)> {
        self.keys
            .iter()
            .filter(|(_, k)| k.session.is_some() && (owner.is_none() || k.session == owner))
            .map(|(id, k)| (*id, k.clone()))
            .collect()
    }

    /// Stores a key's SPKI.
    pub fn set_spki(&mut self, id: &KeyId, spki: Vec<u8>) {
        if let Some(k) = self.keys.get_mut(id) {
            k.spki = Some(spki);
        }
    }

    /// Forgets a key (deleted); its handles stop resolving.
    pub fn forget(&mut self, id: &KeyId) {
        self.keys.remove(id);
        for class in [Class::Private, Class::Public, Class::Secret] {
            if let Some(h) = self.by_object.remove(&(*id, class)) {
                self.by_handle.remove(&h);
            }
        }
    }

    /// The handle of an object, made on first use.
    pub fn handle(&mut self, id: KeyId, class: Class) -> CK_OBJECT_HANDLE {
        if let Some(h) = self.by_object.get(&(id, class)) {
            return *h;
        }
        self.last += 1;
        let h = self.last;
        self.by_handle.insert(h, (id, class));
        self.by_object.insert((id, class), h);
        h
    }

    /// What a handle names, or `CKR_OBJECT_HANDLE_INVALID`.
    pub fn resolve(&self, h: CK_OBJECT_HANDLE) -> Result<(KeyId, Class, Key), CK_RV> {
        let (id, class) = self.by_handle.get(&h).ok_or(CKR_OBJECT_HANDLE_INVALID)?;
        let key = self.keys.get(id).ok_or(CKR_OBJECT_HANDLE_INVALID)?;
        Ok((*id, *class, key.clone()))
    }

    /// A key by id.
    pub fn key(&self, id: &KeyId) -> Option<&Key> {
        self.keys.get(id)
    }
}

/// One attribute of an object, as `C_GetAttributeValue` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    /// Its value.
    Value(Vec<u8>),
    /// A secret value, never returned (`CKR_ATTRIBUTE_SENSITIVE`).
    Sensitive,
    /// The object has no such attribute (`CKR_ATTRIBUTE_TYPE_INVALID`).
    Invalid,
}

fn ulong(v: CK_ULONG) -> Attr {
    Attr::Value(v.to_ne_bytes().to_vec())
}

fn bool_attr(v: bool) -> Attr {
    Attr::Value(vec![if v { CK_TRUE } else { CK_FALSE }])
}

/// Whether an attribute's value is a `CK_BBOOL`.
pub fn is_bool(attr: CK_ATTRIBUTE_TYPE) -> bool {
    matches!(
        attr,
        CKA_TOKEN
            | CKA_PRIVATE
            | CKA_MODIFIABLE
            | CKA_COPYABLE
            | CKA_DESTROYABLE
            | CKA_SENSITIVE
            | CKA_EXTRACTABLE
            | CKA_ALWAYS_SENSITIVE
            | CKA_NEVER_EXTRACTABLE
            | CKA_LOCAL
            | CKA_SIGN
            | CKA_VERIFY
            | CKA_ENCRYPT
            | CKA_DECRYPT
            | CKA_WRAP
            | CKA_UNWRAP
            | CKA_DERIVE
            | CKA_SIGN_RECOVER
            | CKA_VERIFY_RECOVER
            | CKA_TRUSTED
            | CKA_WRAP_WITH_TRUSTED
            | CKA_ALWAYS_AUTHENTICATE
    )
}

/// Whether computing `attr` of an asymmetric key needs its public key.
pub fn needs_spki(attr: CK_ATTRIBUTE_TYPE) -> bool {
    matches!(
        attr,
        CKA_EC_POINT | CKA_MODULUS | CKA_PUBLIC_EXPONENT | CKA_PUBLIC_KEY_INFO
    )
}

/// DER of the P-256 curve OID (prime256v1), as `CKA_EC_PARAMS` holds it.
pub const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of id-Ed25519 (RFC 8410), what `CKA_EC_PARAMS` of an Ed25519 key holds.
pub const ED25519_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// Other encodings applications send for Ed25519: the printable string
/// "edwards25519" (PKCS#11 3.0) and GnuPG's OID (OpenSC before 0.24).
const ED25519_OTHER_PARAMS: [&[u8]; 2] = [
    b"\x13\x0cedwards25519",
    &[
        0x06, 0x09, 0x2b, 0x06, 0x01, 0x04, 0x01, 0xda, 0x47, 0x0f, 0x01,
    ],
];

/// Whether `params` names the curve of `key_type`.
pub fn curve_matches(key_type: KeyType, params: &[u8]) -> bool {
    match key_type {
        KeyType::P256 => params == P256_PARAMS,
        KeyType::Ed25519 => params == ED25519_PARAMS || ED25519_OTHER_PARAMS.contains(&params),
        _ => false,
    }
}

/// The public-key parts of an SPKI.
fn public_parts(key_type: KeyType, spki: &[u8], attr: CK_ATTRIBUTE_TYPE) -> Option<Vec<u8>> {
    if attr == CKA_PUBLIC_KEY_INFO {
        return Some(spki.to_vec());
    }
    let info = spki::SubjectPublicKeyInfoRef::from_der(spki).ok()?;
    let bits = info.subject_public_key.as_bytes()?;
    match (key_type, attr) {
        (KeyType::P256 | KeyType::Ed25519, CKA_EC_POINT) => {
            der::asn1::OctetStringRef::new(bits).ok()?.to_der().ok()
        }
        (KeyType::Rsa2048, CKA_MODULUS | CKA_PUBLIC_EXPONENT) => {
            let rsa = pkcs1::RsaPublicKey::from_der(bits).ok()?;
            let n: pkcs1::RsaPublicKeyRef<'_> = rsa;
            Some(if attr == CKA_MODULUS {
                n.modulus.as_bytes().to_vec()
            } else {
                n.public_exponent.as_bytes().to_vec()
            })
        }
        _ => None,
    }
}

/// An attribute of the object (`id`, `class`) of `key`. Attributes in
/// [`needs_spki`] read `key.spki`; without it they are `Invalid`.
pub fn attribute(id: &KeyId, class: Class, key: &Key, attr: CK_ATTRIBUTE_TYPE) -> Attr {
    let t = key.key_type;
    let private = class.is_private();
    let secret = class == Class::Secret;
    let public = class == Class::Public;
    match attr {
        CKA_CLASS => ulong(class.ck()),
        CKA_KEY_TYPE => ulong(ck_key_type(t)),
        CKA_ID => Attr::Value(match &key.attributes.app_id {
            Some(app_id) => app_id.clone(),
            None => id.0.as_bytes().to_vec(),
        }),
        CKA_LABEL => Attr::Value(
            key.attributes
                .label
                .clone()
                .unwrap_or_default()
                .into_bytes(),
        ),
        CKA_TOKEN => bool_attr(key.session.is_none()),
        CKA_LOCAL | CKA_DESTROYABLE => bool_attr(true),
        CKA_MODIFIABLE | CKA_COPYABLE | CKA_DERIVE => bool_attr(false),
        CKA_PRIVATE => bool_attr(private),
        CKA_START_DATE | CKA_END_DATE => Attr::Value(Vec::new()),
        CKA_KEY_GEN_MECHANISM => ulong(match t {
            KeyType::P256 => CKM_EC_KEY_PAIR_GEN,
            KeyType::Ed25519 => CKM_EC_EDWARDS_KEY_PAIR_GEN,
            KeyType::Rsa2048 => CKM_RSA_PKCS_KEY_PAIR_GEN,
            KeyType::Aes256 => CKM_AES_KEY_GEN,
        }),
        CKA_SENSITIVE | CKA_ALWAYS_SENSITIVE | CKA_NEVER_EXTRACTABLE if private => bool_attr(true),
        CKA_EXTRACTABLE | CKA_ALWAYS_AUTHENTICATE | CKA_WRAP_WITH_TRUSTED if private => {
            bool_attr(false)
        }
        CKA_SIGN if private => bool_attr(!secret),
        CKA_ENCRYPT | CKA_DECRYPT => bool_attr(secret),
        CKA_VERIFY => bool_attr(public),
        CKA_WRAP | CKA_UNWRAP | CKA_SIGN_RECOVER | CKA_VERIFY_RECOVER => bool_attr(false),
        CKA_TRUSTED if public => bool_attr(false),
        CKA_SUBJECT if !secret => Attr::Value(Vec::new()),
        CKA_VALUE | CKA_PRIVATE_EXPONENT | CKA_PRIME_1 | CKA_PRIME_2 | CKA_EXPONENT_1
        | CKA_EXPONENT_2 | CKA_COEFFICIENT
            if private =>
        {
            Attr::Sensitive
        }
        CKA_VALUE_LEN if secret => ulong(32),
        CKA_EC_PARAMS => match t {
            KeyType::P256 => Attr::Value(P256_PARAMS.to_vec()),
            KeyType::Ed25519 => Attr::Value(ED25519_PARAMS.to_vec()),
            _ => Attr::Invalid,
        },
        CKA_MODULUS_BITS if t == KeyType::Rsa2048 => ulong(2048),
        CKA_EC_POINT if !public => Attr::Invalid,
        a if needs_spki(a) && !secret => key
            .spki
            .as_deref()
            .and_then(|spki| public_parts(t, spki, a))
            .map_or(Attr::Invalid, Attr::Value),
        _ => Attr::Invalid,
    }
}

/// Whether a found object matches a search template (an attribute the
/// object lacks, or a secret one, matches nothing).
pub fn matches(
    id: &KeyId,
    class: Class,
    key: &Key,
    template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> bool {
    template.iter().all(|(t, want)| {
        match attribute(id, class, key, *t) {
            Attr::Value(have) if is_bool(*t) => {
                // Any non-zero byte is true.
                want.len() == 1 && have.len() == 1 && (want[0] != 0) == (have[0] != 0)
            }
            Attr::Value(have) => &have == want,
            Attr::Sensitive | Attr::Invalid => false,
        }
    })
}

/// What a generation template asks for.
#[derive(Debug, Default)]
pub struct Wanted {
    /// The label.
    pub label: Option<String>,
    /// The application's id (`CKA_ID`), if given.
    pub app_id: Option<Vec<u8>>,
    /// `CKA_TOKEN`, if given (a token object unless false).
    pub token: Option<bool>,
}

fn flag(value: &[u8]) -> Result<bool, CK_RV> {
    match value {
        [b] => Ok(*b != 0),
        _ => Err(CKR_ATTRIBUTE_VALUE_INVALID),
    }
}

fn ulong_value(value: &[u8]) -> Result<CK_ULONG, CK_RV> {
    let bytes: [u8; std::mem::size_of::<CK_ULONG>()] =
        value.try_into().map_err(|_| CKR_ATTRIBUTE_VALUE_INVALID)?;
    Ok(CK_ULONG::from_ne_bytes(bytes))
}

/// The name of an attribute a template may be refused for.
fn attribute_name(t: CK_ATTRIBUTE_TYPE) -> String {
    match t {
        CKA_PRIVATE => "CKA_PRIVATE".into(),
        CKA_SENSITIVE => "CKA_SENSITIVE".into(),
        CKA_EXTRACTABLE => "CKA_EXTRACTABLE".into(),
        CKA_MODIFIABLE => "CKA_MODIFIABLE".into(),
        CKA_COPYABLE => "CKA_COPYABLE".into(),
        CKA_DESTROYABLE => "CKA_DESTROYABLE".into(),
        CKA_EC_PARAMS => "CKA_EC_PARAMS".into(),
        CKA_MODULUS_BITS => "CKA_MODULUS_BITS".into(),
        CKA_PUBLIC_EXPONENT => "CKA_PUBLIC_EXPONENT".into(),
        CKA_VALUE_LEN => "CKA_VALUE_LEN".into(),
        CKA_ID => "CKA_ID".into(),
        other => format!("attribute {other:#x}"),
    }
}

/// Checks a generation template for an object of `class` of a `key_type`
/// key. What keysync decides (sensitive, never extractable, a token object)
/// must be asked for as it is or not at all; usage flags are accepted and
/// not stored (reading them reports what the key can do in keysync);
/// `CKA_ID` and `CKA_LABEL` are kept (the same in both templates of a
/// pair; an empty `CKA_ID`, the spec's default, is none); any attribute
/// not known here is `CKR_ATTRIBUTE_TYPE_INVALID`.
pub fn check_template(
    key_type: KeyType,
    class: Class,
    template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    wanted: &mut Wanted,
) -> Result<(), CK_RV> {
    let private = class.is_private();
    for (t, v) in template {
        let must = |ok: bool| {
            if ok {
                Ok(())
            } else {
                // The return code names no attribute: say which, and why.
                crate::module::report(format_args!(
                    "template: {} = {v:02x?} asks for a key keysync does not make ({}); {}",
                    attribute_name(*t),
                    "keysync keys are private, sensitive and never extractable",
                    "leave the attribute out or ask for what keysync does (pkcs11-tool: --sensitive --private)"
                ));
                Err(CKR_ATTRIBUTE_VALUE_INVALID)
            }
        };
        match *t {
            CKA_CLASS => {
                if ulong_value(v)? != class.ck() {
                    return Err(CKR_TEMPLATE_INCONSISTENT);
                }
            }
            CKA_KEY_TYPE => {
                if ulong_value(v)? != ck_key_type(key_type) {
                    return Err(CKR_TEMPLATE_INCONSISTENT);
                }
            }
            CKA_LABEL => {
                let label =
                    String::from_utf8(v.clone()).map_err(|_| CKR_ATTRIBUTE_VALUE_INVALID)?;
                if label.len() > MAX_LABEL_BYTES {
                    return Err(CKR_ATTRIBUTE_VALUE_INVALID);
                }
                match &wanted.label {
                    Some(l) if *l != label => return Err(CKR_TEMPLATE_INCONSISTENT),
                    _ => wanted.label = Some(label),
                }
            }
            CKA_ID if v.is_empty() => {}
            CKA_ID => {
                if v.len() > MAX_APP_ID_BYTES {
                    crate::module::report(format_args!(
                        "template: CKA_ID is {} bytes; keysync keeps application ids of at most {MAX_APP_ID_BYTES} bytes",
                        v.len()
                    ));
                    return Err(CKR_ATTRIBUTE_VALUE_INVALID);
                }
                match &wanted.app_id {
                    Some(id) if id != v => return Err(CKR_TEMPLATE_INCONSISTENT),
                    _ => wanted.app_id = Some(v.clone()),
                }
            }
            CKA_TOKEN => {
                let token = flag(v)?;
                match wanted.token {
                    Some(t) if t != token => return Err(CKR_TEMPLATE_INCONSISTENT),
                    _ => wanted.token = Some(token),
                }
            }
            CKA_PRIVATE => must(flag(v)? == private)?,
            CKA_SENSITIVE if private => must(flag(v)?)?,
            CKA_EXTRACTABLE if private => must(!flag(v)?)?,
            CKA_MODIFIABLE | CKA_COPYABLE => must(!flag(v)?)?,
            CKA_DESTROYABLE => must(flag(v)?)?,
            CKA_SIGN | CKA_VERIFY | CKA_ENCRYPT | CKA_DECRYPT | CKA_WRAP | CKA_UNWRAP
            | CKA_DERIVE | CKA_SIGN_RECOVER | CKA_VERIFY_RECOVER => {
                flag(v)?;
            }
            CKA_START_DATE | CKA_END_DATE | CKA_SUBJECT => must(v.is_empty())?,
            CKA_EC_PARAMS if class == Class::Public => must(curve_matches(key_type, v))?,
            CKA_MODULUS_BITS if key_type == KeyType::Rsa2048 && class == Class::Public => {
                must(ulong_value(v)? == 2048)?
            }
            CKA_PUBLIC_EXPONENT if key_type == KeyType::Rsa2048 && class == Class::Public => {
                let trimmed: Vec<u8> = v.iter().copied().skip_while(|b| *b == 0).collect();
                must(trimmed == [1, 0, 1])?
            }
            CKA_VALUE_LEN if class == Class::Secret => must(ulong_value(v)? == 32)?,
            _ => return Err(CKR_ATTRIBUTE_TYPE_INVALID),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: KeyType) -> Key {
        Key {
            key_type: t,
            attributes: KeyAttributes {
                label: Some("l".into()),
                app_id: None,
            },
            holders: BTreeSet::new(),
            spki: None,
            session: None,
        }
    }

    #[test]
    fn secrets_are_sensitive_and_public_parts_are_not() {
        let id = KeyId::new();
        let k = key(KeyType::P256);
        assert_eq!(
            attribute(&id, Class::Private, &k, CKA_VALUE),
            Attr::Sensitive
        );
        assert_eq!(
            attribute(&id, Class::Private, &k, CKA_EC_PARAMS),
            Attr::Value(P256_PARAMS.to_vec())
        );
        assert_eq!(
            attribute(&id, Class::Public, &k, CKA_ID),
            Attr::Value(id.0.as_bytes().to_vec())
        );
        assert_eq!(
            attribute(&id, Class::Secret, &key(KeyType::Aes256), CKA_VALUE),
            Attr::Sensitive
        );
    }

    #[test]
    fn public_parts_come_from_the_spki() {
        use p256::pkcs8::EncodePublicKey as _;
        let sk = p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).expect("key");
        let spki = sk
            .verifying_key()
            .to_public_key_der()
            .expect("spki")
            .into_vec();
        let mut k = key(KeyType::P256);
        k.spki = Some(spki);
        let Attr::Value(point) = attribute(&KeyId::new(), Class::Public, &k, CKA_EC_POINT) else {
            panic!("no EC point");
        };
        let uncompressed = sk.verifying_key().to_sec1_point(false);
        assert_eq!(point[0], 0x04, "an OCTET STRING");
        assert_eq!(point[1] as usize, uncompressed.as_bytes().len());
        assert_eq!(&point[2..], uncompressed.as_bytes());
    }

    #[test]
    fn an_application_id_is_kept_and_shown_on_both_halves() {
        let mut w = Wanted::default();
        let id_attr = (CKA_ID, vec![0x01, 0x02]);
        check_template(
            KeyType::P256,
            Class::Public,
            std::slice::from_ref(&id_attr),
            &mut w,
        )
        .expect("public accepted");
        check_template(KeyType::P256, Class::Private, &[id_attr], &mut w)
            .expect("private accepted");
        assert_eq!(w.app_id.as_deref(), Some(&[0x01, 0x02][..]));
        assert_eq!(
            check_template(
                KeyType::P256,
                Class::Private,
                &[(CKA_ID, vec![0x03])],
                &mut w
            ),
            Err(CKR_TEMPLATE_INCONSISTENT),
            "halves with different ids"
        );
        let mut none = Wanted::default();
        check_template(
            KeyType::P256,
            Class::Private,
            &[(CKA_ID, vec![])],
            &mut none,
        )
        .expect("an empty CKA_ID is none");
        assert_eq!(none.app_id, None);

        let keysync_id = KeyId::new();
        let mut k = key(KeyType::P256);
        let own = Attr::Value(keysync_id.0.as_bytes().to_vec());
        assert_eq!(attribute(&keysync_id, Class::Private, &k, CKA_ID), own);
        k.attributes.app_id = Some(vec![0x01, 0x02]);
        for class in [Class::Private, Class::Public] {
            assert_eq!(
                attribute(&keysync_id, class, &k, CKA_ID),
                Attr::Value(vec![0x01, 0x02])
            );
            assert!(matches(&keysync_id, class, &k, &[(CKA_ID, vec![1, 2])]));
            assert!(!matches(&keysync_id, class, &k, &[(CKA_ID, vec![1])]));
        }
        let by_label_and_class = [
            (CKA_LABEL, b"l".to_vec()),
            (CKA_CLASS, CKO_PRIVATE_KEY.to_ne_bytes().to_vec()),
            (CKA_KEY_TYPE, CKK_EC.to_ne_bytes().to_vec()),
        ];
        assert!(matches(
            &keysync_id,
            Class::Private,
            &k,
            &by_label_and_class
        ));
        assert!(!matches(
            &keysync_id,
            Class::Public,
            &k,
            &by_label_and_class
        ));
    }

    #[test]
    fn templates() {
        let mut w = Wanted::default();
        let label = (CKA_LABEL, b"app".to_vec());
        let sensitive = (CKA_SENSITIVE, vec![1]);
        check_template(KeyType::P256, Class::Private, &[label, sensitive], &mut w)
            .expect("accepted");
        assert_eq!(w.label.as_deref(), Some("app"));
        let cases = [
            ((CKA_EXTRACTABLE, vec![1]), CKR_ATTRIBUTE_VALUE_INVALID),
            (
                (CKA_ID, vec![7; MAX_APP_ID_BYTES + 1]),
                CKR_ATTRIBUTE_VALUE_INVALID,
            ),
            ((CKA_LABEL, b"other".to_vec()), CKR_TEMPLATE_INCONSISTENT),
            ((0x8000_0001, vec![]), CKR_ATTRIBUTE_TYPE_INVALID),
        ];
        for (attr, rv) in cases {
            assert_eq!(
                check_template(KeyType::P256, Class::Private, &[attr], &mut w),
                Err(rv)
            );
        }
        let mut token = Wanted {
            token: Some(true),
            ..Default::default()
        };
        assert_eq!(
            check_template(
                KeyType::P256,
                Class::Private,
                &[(CKA_TOKEN, vec![0])],
                &mut token
            ),
            Err(CKR_TEMPLATE_INCONSISTENT),
            "a token public half with a session private half"
        );
        assert_eq!(
            check_template(
                KeyType::P256,
                Class::Public,
                &[(CKA_EC_PARAMS, ED25519_PARAMS.to_vec())],
                &mut Wanted::default()
            ),
            Err(CKR_ATTRIBUTE_VALUE_INVALID)
        );
    }
}
