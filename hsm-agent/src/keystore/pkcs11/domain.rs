//! The cluster domain key inside a token, and the check that it is the
//! cluster's.
//!
//! The key is put in once (the set-up ceremony) as a sensitive,
//! non-extractable AES-256 key with wrap and unwrap usage only. Beside it a
//! private data object (`CKA_APPLICATION` "keysync", `CKA_LABEL`
//! "keysync-domain") records the key's `DomainId` and check value, so an
//! agent that has no domain key file learns its domain from the token and
//! can prove the record belongs to the key: it recomputes the check value
//! inside the token (see `DomainKey::check_value`).

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use keysync_schemas::DomainId;
use keysync_security::domain_key::{check_key, check_value_of, DomainKey};
use zeroize::Zeroizing;

use super::error::{map, Pkcs11Error};
use super::keys::{find, find_domain_key, Temp};
use super::templates::{self, APPLICATION, DOMAIN_KEY_ID};
use super::token::Token;
use crate::material::random_bytes;

/// Version tag of the domain record's value.
const RECORD_MAGIC: &[u8] = b"KSD1";

/// What a token's domain key is, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainCheck {
    /// The domain id its record names (and the check value proves).
    pub domain: DomainId,
    /// The check value computed inside the token.
    pub check_value: [u8; 32],
}

/// What provisioning did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioned {
    /// The key was put into the token.
    Imported,
    /// The token held this very key already (its record written if it was
    /// missing): nothing else to do.
    AlreadyPresent,
}

/// What the cluster's domain key is known as, to check a token against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedDomain {
    /// Its `DomainId` (what events carry).
    Id(DomainId),
    /// Its check value (`DomainKey::check_value`).
    CheckValue([u8; 32]),
}

/// The check value of the domain key `dk`, computed in the token: the
/// public check key as a throw-away session object, wrapped under `dk`
/// with `CKM_AES_KEY_WRAP_PAD`, hashed as `check_value_of` does.
fn check_value_in(s: &Session, dk: ObjectHandle) -> Result<[u8; 32], Pkcs11Error> {
    let ck = Temp::new(
        s,
        s.create_object(&templates::known_aes_session_key(
            &check_key(),
            false,
            false,
            true,
        ))
        .map_err(map("C_CreateObject (check key)"))?,
    );
    let blob = s
        .wrap_key(&Mechanism::AesKeyWrapPad, dk, ck.handle)
        .map_err(map("C_WrapKey (check value)"))?;
    Ok(check_value_of(&blob))
}

fn record_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Application(APPLICATION.to_vec()),
        Attribute::Label(DOMAIN_KEY_ID.to_vec()),
    ]
}

/// The domain record: (domain id, check value), if present.
fn read_record(s: &Session, label: &str) -> Result<Option<(DomainId, [u8; 32])>, Pkcs11Error> {
    let found = find(s, &record_template())?;
    let h = match found.as_slice() {
        [] => return Ok(None),
        [h] => *h,
        many => {
            return Err(Pkcs11Error::DomainRecord {
                label: label.to_string(),
                detail: format!("{} keysync domain records", many.len()),
            })
        }
    };
    let value = s
        .get_attributes(h, &[AttributeType::Value])
        .map_err(map("C_GetAttributeValue (domain record)"))?
        .into_iter()
        .find_map(|a| match a {
            Attribute::Value(v) => Some(v),
            _ => None,
        })
        .unwrap_or_default();
    let bad = || Pkcs11Error::DomainRecord {
        label: label.to_string(),
        detail: "the keysync domain record is malformed".into(),
    };
    let rest = value.strip_prefix(RECORD_MAGIC).ok_or_else(bad)?;
    if rest.len() != 40 {
        return Err(bad());
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&rest[..8]);
    let mut cv = [0u8; 32];
    cv.copy_from_slice(&rest[8..]);
    Ok(Some((DomainId(id), cv)))
}

fn write_record(s: &Session, domain: DomainId, cv: &[u8; 32]) -> Result<(), Pkcs11Error> {
    let mut value = RECORD_MAGIC.to_vec();
    value.extend_from_slice(&domain.0);
    value.extend_from_slice(cv);
    let mut t = record_template();
    t.extend([
        Attribute::Private(true),
        Attribute::Destroyable(true),
        Attribute::Value(value),
        Attribute::Modifiable(false),
    ]);
    s.create_object(&t)
        .map_err(map("C_CreateObject (domain record)"))?;
    Ok(())
}

/// Puts the cluster domain key into the token: unwrapped (so its bytes are
/// never handed to the token in the clear) under a one-time session
/// transport key as a token object with the complete domain-key template,
/// then checked by its check value, then recorded. Refuses a token that
/// holds a different domain key (or another domain's record). Running it
/// again with the same key is a no-op. Blocks.
pub fn provision_domain_key(token: &Token, key: &DomainKey) -> Result<Provisioned, Pkcs11Error> {
    let want = key
        .check_value()
        .map_err(|e| Pkcs11Error::Invalid(e.to_string()))?;
    let label = token.label().to_string();
    token.with_session(|s| {
        let record = read_record(s, &label)?;
        if let Some((id, cv)) = record {
            if id != key.id() || cv != want {
                return Err(Pkcs11Error::WrongDomain {
                    label: label.clone(),
                    expected: key.id().to_string(),
                    found: id.to_string(),
                });
            }
        }
        if let Some(dk) = find_domain_key(s)? {
            let cv = check_value_in(s, dk)?;
            if cv != want {
                return Err(Pkcs11Error::WrongDomain {
                    label: label.clone(),
                    expected: key.id().to_string(),
                    found: format!("with check value {}", hex::encode(cv)),
                });
            }
            if record.is_none() {
                write_record(s, key.id(), &cv)?;
            }
            return Ok(Provisioned::AlreadyPresent);
        }
        let mut transport = Zeroizing::new([0u8; 32]);
        random_bytes(transport.as_mut()).map_err(|e| Pkcs11Error::Library {
            op: "random transport key",
            detail: e.to_string(),
        })?;
        let blob = key
            .wrapped_for_transport(&transport)
            .map_err(|e| Pkcs11Error::Invalid(e.to_string()))?;
        let tk = Temp::new(
            s,
            s.create_object(&templates::known_aes_session_key(
                transport.as_ref(),
                false,
                true,
                false,
            ))
            .map_err(map("C_CreateObject (transport key)"))?,
        );
        let dk = s
            .unwrap_key(
                &Mechanism::AesKeyWrapPad,
                tk.handle,
                &blob,
                &templates::domain_key(),
            )
            .map_err(map("C_UnwrapKey (domain key)"))?;
        drop(tk);
        let checked = check_value_in(s, dk).and_then(|cv| {
            if cv == want {
                Ok(cv)
            } else {
                Err(Pkcs11Error::DomainRecord {
                    label: label.clone(),
                    detail: "the imported domain key's check value differs from the key file's"
                        .into(),
                })
            }
        });
        let cv = match checked {
            Ok(cv) => cv,
            Err(e) => {
                let _ = s.destroy_object(dk);
                return Err(e);
            }
        };
        if record.is_none() {
            write_record(s, key.id(), &cv)?;
        }
        Ok(Provisioned::Imported)
    })
}

/// The token's domain key check value, computed inside it. Blocks.
pub fn domain_check_value(token: &Token) -> Result<[u8; 32], Pkcs11Error> {
    token.with_session(|s| {
        let dk = find_domain_key(s)?.ok_or_else(|| Pkcs11Error::DomainKeyMissing {
            label: token.label().to_string(),
        })?;
        check_value_in(s, dk)
    })
}

/// The token's domain: its record, proved to belong to the domain key the
/// token holds by the check value computed inside the token. Blocks.
pub fn token_domain(token: &Token) -> Result<DomainCheck, Pkcs11Error> {
    let label = token.label().to_string();
    token.with_session(|s| {
        let dk = find_domain_key(s)?.ok_or_else(|| Pkcs11Error::DomainKeyMissing {
            label: label.clone(),
        })?;
        let cv = check_value_in(s, dk)?;
        let (domain, recorded) = read_record(s, &label)?.ok_or_else(|| Pkcs11Error::DomainRecord {
            label: label.clone(),
            detail: "the domain key has no keysync record: run the provisioning ceremony (keysync hsm provision-domain-key) with the cluster's domain key file".into(),
        })?;
        if recorded != cv {
            return Err(Pkcs11Error::DomainRecord {
                label: label.clone(),
                detail: "the keysync domain record does not belong to the domain key the token holds".into(),
            });
        }
        Ok(DomainCheck {
            domain,
            check_value: cv,
        })
    })
}

/// Checks that the token holds the cluster's domain key; an agent refuses
/// to start otherwise. Returns what the token holds. Blocks.
pub fn check_domain_key(
    token: &Token,
    expected: &ExpectedDomain,
) -> Result<DomainCheck, Pkcs11Error> {
    let held = token_domain(token)?;
    let (ok, want, found) = match expected {
        ExpectedDomain::Id(id) => (held.domain == *id, id.to_string(), held.domain.to_string()),
        ExpectedDomain::CheckValue(cv) => (
            held.check_value == *cv,
            format!("with check value {}", hex::encode(cv)),
            format!(
                "{} (check value {})",
                held.domain,
                hex::encode(held.check_value)
            ),
        ),
    };
    if !ok {
        return Err(Pkcs11Error::WrongDomain {
            label: token.label().to_string(),
            expected: want,
            found,
        });
    }
    Ok(held)
}
