//! What a token can do with each key type, found by trying it on
//! throw-away session objects rather than read from a table of token
//! models: generate a key, use it (sign and verify, or AES-GCM both ways),
//! wrap it (clone out: the blob must unwrap in software to the same key),
//! unwrap a blob made in software (clone in: the unwrapped key must sign
//! or encrypt as the software key does).

use std::fmt;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use keysync_schemas::KeyType;
use keysync_security::domain_key::{unwrap_with, wrap_with};
use zeroize::Zeroizing;

use super::error::{map, Pkcs11Error};
use super::keys::{
    aes_fingerprint, gcm_decrypt, gcm_encrypt, generate_objects, hmac_fingerprint, read_spki,
    sign_with, Temp,
};
use super::spki;
use super::templates::{self, Life, Name};
use super::token::Token;
use crate::material::{random_bytes, KeyMaterial};

/// One answer of the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// It works.
    Yes,
    /// It does not, and why.
    No(String),
}

impl Check {
    /// Whether it works.
    pub fn ok(&self) -> bool {
        matches!(self, Check::Yes)
    }

    /// Why not, if not.
    pub fn refusal(&self) -> Option<&str> {
        match self {
            Check::Yes => None,
            Check::No(why) => Some(why),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Yes => f.write_str("yes"),
            Check::No(why) => write!(f, "no ({why})"),
        }
    }
}

/// What the token does with one key type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeSupport {
    /// Generate a key inside the token.
    pub generate: Check,
    /// Use it: sign (verified in software), or AES-GCM encrypt and decrypt.
    pub operate: Check,
    /// Wrap it under an AES key with `CKM_AES_KEY_WRAP_PAD` into a blob
    /// that unwraps in software to the same key (clone out).
    pub wrap: Check,
    /// Unwrap a software-made blob into a working key (clone in).
    pub unwrap: Check,
}

impl TypeSupport {
    /// The token can hold a key of this type cloned in from elsewhere.
    pub fn can_receive(&self) -> bool {
        self.unwrap.ok() && self.operate.ok()
    }

    /// A key of this type made here can be cloned to other HSMs.
    pub fn can_create_clonable(&self) -> bool {
        self.generate.ok() && self.operate.ok() && self.wrap.ok()
    }
}

/// The probe's findings for every key type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    types: Vec<(KeyType, TypeSupport)>,
}

impl Capabilities {
    /// The findings for one type (every type is probed).
    pub fn get(&self, key_type: KeyType) -> &TypeSupport {
        self.types
            .iter()
            .find(|(t, _)| *t == key_type)
            .map(|(_, s)| s)
            .unwrap_or(&NOT_PROBED)
    }

    /// Every type with its findings, in `KeyType::ALL` order.
    pub fn iter(&self) -> impl Iterator<Item = (KeyType, &TypeSupport)> {
        self.types.iter().map(|(t, s)| (*t, s))
    }
}

/// Never returned (every type is probed); says "no" to be safe.
static NOT_PROBED: TypeSupport = TypeSupport {
    generate: Check::No(String::new()),
    operate: Check::No(String::new()),
    wrap: Check::No(String::new()),
    unwrap: Check::No(String::new()),
};

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<8} | {:<8} | {:<12} | {:<16} | {:<16}",
            "type", "generate", "sign/encrypt", "wrap (clone out)", "unwrap (clone in)"
        )?;
        writeln!(f, "{}", "-".repeat(72))?;
        let short = |c: &Check| if c.ok() { "yes" } else { "no" };
        for (t, s) in &self.types {
            writeln!(
                f,
                "{:<8} | {:<8} | {:<12} | {:<16} | {:<16}",
                t.as_str(),
                short(&s.generate),
                short(&s.operate),
                short(&s.wrap),
                short(&s.unwrap)
            )?;
        }
        for (t, s) in &self.types {
            for (what, c) in [
                ("generate", &s.generate),
                ("sign/encrypt", &s.operate),
                ("wrap", &s.wrap),
                ("unwrap", &s.unwrap),
            ] {
                if let Some(why) = c.refusal() {
                    writeln!(f, "  {} {what}: {why}", t.as_str())?;
                }
            }
        }
        Ok(())
    }
}

/// A transient error (the token went away) aborts the probe; any other is
/// a "no" with its reason.
fn verdict(r: Result<(), Pkcs11Error>) -> Result<Check, Pkcs11Error> {
    match r {
        Ok(()) => Ok(Check::Yes),
        Err(e) if e.is_transient() => Err(e),
        Err(e) => Ok(Check::No(e.to_string())),
    }
}

fn bad(what: String) -> Pkcs11Error {
    Pkcs11Error::BadObject(what)
}

const PROBE_NAME: Name<'static> = Name {
    id: b"keysync-probe",
    label: b"keysync-probe",
};

/// Probes every key type on session objects that are gone afterwards.
/// Takes a moment (an RSA-2048 key is generated in the token and one in
/// software). Blocks.
pub(crate) fn probe(token: &Token) -> Result<Capabilities, Pkcs11Error> {
    let mut kek_value = Zeroizing::new([0u8; 32]);
    random_bytes(kek_value.as_mut()).map_err(|e| Pkcs11Error::Library {
        op: "random probe key",
        detail: e.to_string(),
    })?;
    token.with_session(|s| {
        let kek = Temp::new(
            s,
            s.create_object(&templates::known_aes_session_key(
                kek_value.as_ref(),
                true,
                true,
                false,
            ))
            .map_err(map("C_CreateObject (probe key)"))?,
        );
        let mut types = Vec::new();
        for t in KeyType::ALL {
            types.push((t, probe_type(s, kek.handle, &kek_value, t)?));
        }
        Ok(Capabilities { types })
    })
}

fn probe_type(
    s: &Session,
    kek: ObjectHandle,
    kek_value: &[u8; 32],
    t: KeyType,
) -> Result<TypeSupport, Pkcs11Error> {
    let (generate, operate, wrap) = match generate_objects(s, t, &PROBE_NAME, Life::Session) {
        Err(e) if e.is_transient() => return Err(e),
        Err(e) => {
            let no = Check::No("no key generated to try".into());
            (Check::No(e.to_string()), no.clone(), no)
        }
        Ok((key, public)) => {
            let key = Temp::new(s, key);
            let public = public.map(|p| Temp::new(s, p));
            let public = public.as_ref().map(|p| p.handle);
            (
                Check::Yes,
                verdict(use_key(s, key.handle, public, t))?,
                verdict(wrap_out(s, kek, kek_value, key.handle, public, t))?,
            )
        }
    };
    let unwrap = verdict(unwrap_in(s, kek, kek_value, t))?;
    Ok(TypeSupport {
        generate,
        operate,
        wrap,
        unwrap,
    })
}

fn use_key(
    s: &Session,
    key: ObjectHandle,
    public: Option<ObjectHandle>,
    t: KeyType,
) -> Result<(), Pkcs11Error> {
    match public {
        Some(p) => {
            let spki = read_spki(s, p, t)?;
            let sig = sign_with(s, key, t, b"keysync probe")?;
            if !spki::verify(t, &spki, b"keysync probe", &sig)? {
                return Err(bad(format!(
                    "a {t} signature made in the token does not verify"
                )));
            }
            Ok(())
        }
        None => {
            let sealed = gcm_encrypt(s, key, b"keysync probe", b"aad")?;
            if gcm_decrypt(s, key, &sealed, b"aad")?.as_slice() != b"keysync probe" {
                return Err(bad("AES-GCM does not round-trip in the token".into()));
            }
            Ok(())
        }
    }
}

/// Wraps the token's key and checks the blob unwraps in software to the
/// same key (same public key, or same AES fingerprint as computed in the
/// token).
fn wrap_out(
    s: &Session,
    kek: ObjectHandle,
    kek_value: &[u8; 32],
    key: ObjectHandle,
    public: Option<ObjectHandle>,
    t: KeyType,
) -> Result<(), Pkcs11Error> {
    let blob = s
        .wrap_key(&Mechanism::AesKeyWrapPad, kek, key)
        .map_err(map("C_WrapKey"))?;
    let plain = unwrap_with(kek_value, &blob)
        .map_err(|_| bad("the token's blob does not unwrap in software".into()))?;
    let material = KeyMaterial::from_bytes(t, &plain)
        .map_err(|e| bad(format!("the token's blob is not {t} material: {e}")))?;
    let same = match public {
        Some(p) => material.public_key_der().ok().flatten() == Some(read_spki(s, p, t)?),
        None => material.fingerprint().ok() == Some(aes_fingerprint(s, key)?),
    };
    if !same {
        return Err(bad(format!(
            "the token's {t} blob unwraps in software to another key"
        )));
    }
    Ok(())
}

/// Unwraps a software-made blob and checks the key works as the software
/// key does.
fn unwrap_in(
    s: &Session,
    kek: ObjectHandle,
    kek_value: &[u8; 32],
    t: KeyType,
) -> Result<(), Pkcs11Error> {
    let material = KeyMaterial::generate(t).map_err(|e| bad(e.to_string()))?;
    let plain = material.to_bytes().map_err(|e| bad(e.to_string()))?;
    let blob = wrap_with(kek_value, &plain).map_err(|e| bad(e.to_string()))?;
    let h = Temp::new(
        s,
        s.unwrap_key(
            &Mechanism::AesKeyWrapPad,
            kek,
            &blob,
            &templates::secret_or_private(t, Life::Session, &PROBE_NAME, false),
        )
        .map_err(map("C_UnwrapKey"))?,
    );
    if t.is_asymmetric() {
        let sig = sign_with(s, h.handle, t, b"keysync probe")?;
        if !material
            .verify(b"keysync probe", &sig)
            .map_err(|e| bad(e.to_string()))?
        {
            return Err(bad(format!("the unwrapped {t} key signs as another key")));
        }
    } else {
        let sealed = gcm_encrypt(s, h.handle, b"keysync probe", b"aad")?;
        if material
            .decrypt(&sealed, b"aad")
            .map_err(|e| {
                bad(format!(
                    "the unwrapped AES key encrypts as another key: {e}"
                ))
            })?
            .as_slice()
            != b"keysync probe"
        {
            return Err(bad("the unwrapped AES key encrypts as another key".into()));
        }
        if Some(hmac_fingerprint(s, kek, &blob)?) != material.fingerprint().ok() {
            return Err(bad(
                "the in-token HMAC fingerprint differs from the software one".into(),
            ));
        }
    }
    Ok(())
}
