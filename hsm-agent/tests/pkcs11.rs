//! The PKCS#11 token layer against real SoftHSM2 tokens, checked with
//! software keysync (the embedded keystore, `DomainKey`), OpenSC's
//! `pkcs11-tool` and a PyKCS11 script: tools that are not our code.
#![cfg(feature = "pkcs11")]

mod softhsm;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use sha2::Digest as _;

use hsm_agent::keystore::embedded::EmbeddedKeystore;
use hsm_agent::keystore::pkcs11::cryptoki::object::{Attribute, AttributeType};
use hsm_agent::keystore::pkcs11::{
    check_domain_key, domain_check_value, provision_domain_key, token_domain, ExpectedDomain, Kek,
    Pkcs11Error, Provisioned, Token, UnwrapRequest,
};
use hsm_agent::keystore::{CloneOutcome, CreatedKey, KeySource, Keystore, NewKey, OutboxEntry};
use hsm_agent::material::KeyMaterial;
use keysync_schemas::{
    CloneKey, DomainId, Durability, Fingerprint, HsmId, KeyAttributes, KeyCreated, KeyId,
    KeyOrigin, KeyType, OpErrorKind,
};
use keysync_security::domain_key::DomainKey;
use softhsm::{softhsm, SoftHsm};

/// What SoftHSM 2.6.1 clones (Ed25519 neither wraps nor unwraps there).
const CLONABLE_ON_261: [KeyType; 3] = [KeyType::P256, KeyType::Rsa2048, KeyType::Aes256];

fn open(h: &SoftHsm, label: &str) -> Token {
    Token::open(h.module(), label, &h.pin_file).expect("open token")
}

fn is_261() -> bool {
    softhsm::version().as_deref() == Some("2.6.1")
}

/// The boolean attributes of a key's private or secret object.
fn flags(token: &Token, id: &KeyId, types: &[AttributeType]) -> Vec<(AttributeType, bool)> {
    token
        .key_attributes(id, types)
        .expect("attributes")
        .into_iter()
        .filter_map(|a| {
            let t = a.attribute_type();
            match a {
                Attribute::Token(b)
                | Attribute::Private(b)
                | Attribute::Sensitive(b)
                | Attribute::Extractable(b)
                | Attribute::Sign(b)
                | Attribute::Decrypt(b)
                | Attribute::Encrypt(b)
                | Attribute::Unwrap(b)
                | Attribute::Wrap(b)
                | Attribute::Derive(b)
                | Attribute::Modifiable(b)
                | Attribute::Copyable(b)
                | Attribute::NeverExtractable(b)
                | Attribute::Verify(b)
                | Attribute::SignRecover(b) => Some((t, b)),
                _ => None,
            }
        })
        .collect()
}

fn flag(all: &[(AttributeType, bool)], t: AttributeType) -> Option<bool> {
    all.iter().find(|(a, _)| *a == t).map(|(_, b)| *b)
}

const FLAG_TYPES: &[AttributeType] = &[
    AttributeType::Token,
    AttributeType::Private,
    AttributeType::Sensitive,
    AttributeType::Extractable,
    AttributeType::Sign,
    AttributeType::SignRecover,
    AttributeType::Decrypt,
    AttributeType::Encrypt,
    AttributeType::Unwrap,
    AttributeType::Wrap,
    AttributeType::Derive,
    AttributeType::Modifiable,
    AttributeType::Copyable,
    AttributeType::Verify,
];

#[test]
fn a_module_that_is_not_pkcs11_is_refused_without_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pin = dir.path().join("pin");
    softhsm::secret_file(&pin, "1234\n");
    let text = dir.path().join("module.txt");
    std::fs::write(&text, "not a shared object\n").expect("write");
    let mut paths = vec![
        text,
        dir.path().join("missing.so"),
        dir.path().to_path_buf(),
    ];
    for libc in [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/aarch64-linux-gnu/libc.so.6",
    ] {
        if Path::new(libc).exists() {
            paths.push(libc.into());
            break;
        }
    }
    for p in paths {
        match Token::open(&p, "keys", &pin) {
            Err(e @ Pkcs11Error::NotAModule { .. }) => {
                println!("{}: {e}", p.display());
                assert_eq!(e.kind(), OpErrorKind::Internal);
            }
            other => panic!("{}: expected NotAModule, got {other:?}", p.display()),
        }
    }
}

#[test]
fn missing_and_ambiguous_labels_are_refused() {
    let Some(h) = softhsm() else { return };
    match Token::open(h.module(), "no-such-token", &h.pin_file) {
        Err(e @ Pkcs11Error::TokenNotFound { .. }) => {
            println!("{e}");
            assert!(e.to_string().contains("\"keys\""), "{e}");
        }
        other => panic!("expected TokenNotFound, got {other:?}"),
    }
    match Token::open(h.module(), softhsm::TWIN, &h.pin_file) {
        Err(e @ Pkcs11Error::AmbiguousLabel { count: 2, .. }) => println!("{e}"),
        other => panic!("expected AmbiguousLabel, got {other:?}"),
    }
}

#[test]
fn a_wrong_pin_or_a_readable_pin_file_is_refused() {
    let Some(h) = softhsm() else { return };
    match Token::open(h.module(), "pin", &h.wrong_pin_file) {
        Err(e @ Pkcs11Error::WrongPin { .. }) => println!("{e}"),
        other => panic!("expected WrongPin, got {other:?}"),
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let loose = dir.path().join("pin");
    std::fs::write(&loose, "1234\n").expect("write");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            Token::open(h.module(), "pin", &loose),
            Err(Pkcs11Error::PinFile(_))
        ));
    }
    let empty = dir.path().join("empty");
    softhsm::secret_file(&empty, "\n");
    assert!(matches!(
        Token::open(h.module(), "pin", &empty),
        Err(Pkcs11Error::PinFile(_))
    ));
    // The right PIN still works after the failures.
    open(h, "pin");
}

#[test]
fn the_domain_key_is_provisioned_checked_and_never_replaced() {
    let Some(h) = softhsm() else { return };
    let token = open(h, "domain");
    let dk = DomainKey::generate().expect("dk");
    assert!(matches!(
        token_domain(&token),
        Err(Pkcs11Error::DomainKeyMissing { .. })
    ));
    assert_eq!(
        provision_domain_key(&token, &dk).expect("provision"),
        Provisioned::Imported
    );
    assert_eq!(
        provision_domain_key(&token, &dk).expect("again"),
        Provisioned::AlreadyPresent
    );
    let other = DomainKey::generate().expect("dk");
    match provision_domain_key(&token, &other) {
        Err(e @ Pkcs11Error::WrongDomain { .. }) => println!("{e}"),
        r => panic!("expected WrongDomain, got {r:?}"),
    }

    // The check value computed in the token is the software one.
    let cv = dk.check_value().expect("cv");
    assert_eq!(domain_check_value(&token).expect("cv in token"), cv);
    let held = check_domain_key(&token, &ExpectedDomain::Id(dk.id())).expect("check");
    assert_eq!(held.domain, dk.id());
    assert_eq!(held.check_value, cv);
    check_domain_key(&token, &ExpectedDomain::CheckValue(cv)).expect("check by value");
    for wrong in [
        ExpectedDomain::Id(other.id()),
        ExpectedDomain::Id(DomainId([0; 8])),
        ExpectedDomain::CheckValue(other.check_value().expect("cv")),
    ] {
        match check_domain_key(&token, &wrong) {
            Err(e @ Pkcs11Error::WrongDomain { .. }) => println!("{e}"),
            r => panic!("expected WrongDomain, got {r:?}"),
        }
    }
    // A new Token (a restarting agent) finds the same.
    let again = open(h, "domain");
    assert_eq!(token_domain(&again).expect("domain").domain, dk.id());

    // The domain key's template: wrap and unwrap only, never extractable.
    let attrs = again
        .with_session(|s| {
            let found = s
                .find_objects(&[
                    Attribute::Class(
                        hsm_agent::keystore::pkcs11::cryptoki::object::ObjectClass::SECRET_KEY,
                    ),
                    Attribute::Id(b"keysync-domain".to_vec()),
                ])
                .expect("find");
            assert_eq!(found.len(), 1, "one domain key");
            let mut types = FLAG_TYPES.to_vec();
            types.extend([AttributeType::NeverExtractable, AttributeType::Value]);
            Ok(s.get_attributes(found[0], &types).expect("attributes"))
        })
        .expect("session");
    let get = |t: AttributeType| {
        attrs
            .iter()
            .find(|a| a.attribute_type() == t)
            .map(|a| match a {
                Attribute::Token(b)
                | Attribute::Private(b)
                | Attribute::Sensitive(b)
                | Attribute::Extractable(b)
                | Attribute::Sign(b)
                | Attribute::SignRecover(b)
                | Attribute::Decrypt(b)
                | Attribute::Encrypt(b)
                | Attribute::Unwrap(b)
                | Attribute::Wrap(b)
                | Attribute::Derive(b)
                | Attribute::Modifiable(b)
                | Attribute::Copyable(b)
                | Attribute::Verify(b)
                | Attribute::NeverExtractable(b) => *b,
                _ => panic!("not a flag"),
            })
    };
    for (t, want) in [
        (AttributeType::Token, true),
        (AttributeType::Private, true),
        (AttributeType::Sensitive, true),
        (AttributeType::Extractable, false),
        (AttributeType::Wrap, true),
        (AttributeType::Unwrap, true),
        (AttributeType::Encrypt, false),
        (AttributeType::Decrypt, false),
        (AttributeType::Sign, false),
        (AttributeType::Verify, false),
        (AttributeType::Derive, false),
        (AttributeType::Modifiable, false),
        (AttributeType::Copyable, false),
    ] {
        assert_eq!(get(t), Some(want), "domain key {t:?}");
    }
    assert!(
        !attrs
            .iter()
            .any(|a| a.attribute_type() == AttributeType::Value),
        "the domain key's value is not readable"
    );
}

#[test]
fn generated_keys_are_sensitive_found_by_id_and_work() {
    let Some(h) = softhsm() else { return };
    let token = open(h, "keys");
    let mut ids = Vec::new();
    for t in KeyType::ALL {
        let id = KeyId::new();
        let key = token
            .generate(id, t, Some(&format!("test {t}")))
            .expect("generate");
        assert_eq!(key.key_type, t);
        assert_eq!(
            token.fingerprint(&id).expect("fingerprint"),
            key.fingerprint
        );
        assert!(matches!(
            token.generate(id, t, None),
            Err(Pkcs11Error::AlreadyExists(_))
        ));
        let f = flags(&token, &id, FLAG_TYPES);
        for (a, want) in [
            (AttributeType::Token, true),
            (AttributeType::Private, true),
            (AttributeType::Sensitive, true),
            (AttributeType::Extractable, true),
            (AttributeType::Derive, false),
            (AttributeType::Modifiable, false),
            (AttributeType::Copyable, false),
        ] {
            assert_eq!(flag(&f, a), Some(want), "{t} {a:?}");
        }
        if t.is_asymmetric() {
            for (a, want) in [
                (AttributeType::Sign, true),
                (AttributeType::Decrypt, false),
                (AttributeType::Unwrap, false),
                (AttributeType::SignRecover, false),
            ] {
                assert_eq!(flag(&f, a), Some(want), "{t} {a:?}");
            }
            let spki = token.public_key(&id).expect("public key");
            assert_eq!(key.public_key.as_deref(), Some(spki.as_slice()));
            assert_eq!(
                key.fingerprint,
                hsm_agent::material::public_fingerprint(t, &spki)
            );
            let sig = token.sign(&id, b"message").expect("sign");
            assert!(token.verify(&id, b"message", &sig).expect("verify"), "{t}");
            assert!(!token.verify(&id, b"messagf", &sig).expect("verify"), "{t}");
            assert_eq!(
                token.encrypt(&id, b"x", b"").map_err(|e| e.kind()).err(),
                Some(OpErrorKind::Unsupported)
            );
        } else {
            for (a, want) in [
                (AttributeType::Sign, false),
                (AttributeType::Wrap, false),
                (AttributeType::Unwrap, true),
                (AttributeType::Encrypt, true),
                (AttributeType::Decrypt, true),
            ] {
                assert_eq!(flag(&f, a), Some(want), "{t} {a:?}");
            }
            let mut sealed = token.encrypt(&id, b"secret", b"aad").expect("encrypt");
            assert_eq!(
                token
                    .decrypt(&id, &sealed, b"aad")
                    .expect("decrypt")
                    .as_slice(),
                b"secret"
            );
            assert!(matches!(
                token.decrypt(&id, &sealed, b"other"),
                Err(Pkcs11Error::Integrity)
            ));
            let last = sealed.len() - 1;
            sealed[last] ^= 1;
            assert!(matches!(
                token.decrypt(&id, &sealed, b"aad"),
                Err(Pkcs11Error::Integrity)
            ));
            assert_eq!(
                token.sign(&id, b"x").map_err(|e| e.kind()).err(),
                Some(OpErrorKind::Unsupported)
            );
        }
        let found = token.find(&id).expect("find").expect("present");
        assert_eq!(
            (found.key_type, found.label.as_str()),
            (t, format!("test {t}").as_str())
        );
        ids.push((id, t));
    }
    let listed: Vec<(KeyId, KeyType)> = token
        .list()
        .expect("list")
        .into_iter()
        .map(|k| (k.id, k.key_type))
        .collect();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(listed, want);
    // A label defaults to the id.
    let unlabelled = KeyId::new();
    token
        .generate(unlabelled, KeyType::P256, None)
        .expect("generate");
    assert_eq!(
        token
            .find(&unlabelled)
            .expect("find")
            .expect("present")
            .label,
        unlabelled.to_string()
    );
    // Delete takes the private and public objects.
    for (id, _) in ids.iter().chain([(unlabelled, KeyType::P256)].iter()) {
        assert!(token.delete(id).expect("delete"));
        assert!(!token.delete(id).expect("delete again"));
        assert_eq!(token.find(id).expect("find"), None);
        assert!(matches!(
            token.sign(id, b"x"),
            Err(Pkcs11Error::NotFound(_))
        ));
    }
    assert!(token.list().expect("list").is_empty());
}

#[test]
fn the_capability_probe_finds_what_softhsm_can_clone() {
    let Some(h) = softhsm() else { return };
    let token = open(h, "probe");
    let started = std::time::Instant::now();
    let caps = token.capabilities().expect("probe").clone();
    println!(
        "capabilities of SoftHSM {} (probed in {:?}):\n{caps}",
        softhsm::version().unwrap_or_default(),
        started.elapsed()
    );
    for t in CLONABLE_ON_261 {
        let s = caps.get(t);
        assert!(
            s.generate.ok() && s.operate.ok() && s.wrap.ok() && s.unwrap.ok(),
            "{t}: {s:?}"
        );
    }
    let ed = caps.get(KeyType::Ed25519);
    assert!(ed.generate.ok() && ed.operate.ok(), "{ed:?}");
    if is_261() {
        assert!(
            !ed.wrap.ok() && !ed.unwrap.ok(),
            "SoftHSM 2.6.1 cannot clone Ed25519: {ed:?}"
        );
        assert!(!ed.can_receive() && !ed.can_create_clonable());
    }
    // The probe leaves nothing behind.
    assert!(token.list().expect("list").is_empty());
    let left = token
        .with_session(|s| Ok(s.find_objects(&[]).expect("find").len()))
        .expect("session");
    assert_eq!(left, 0, "no session or token objects left");
}

/// A software keysync HSM (the embedded keystore) on a domain key.
fn embedded(dir: &Path, name: &str, dk: [u8; 32]) -> EmbeddedKeystore {
    EmbeddedKeystore::open(
        dir,
        HsmId::new(name).expect("id"),
        DomainKey::from_bytes(dk),
    )
    .expect("embedded keystore")
}

fn no_outbox(_: &CreatedKey) -> Result<OutboxEntry, String> {
    Ok(b"event".to_vec())
}

fn clone_cmd(target: &str, created: KeyCreated) -> CloneKey {
    CloneKey {
        target: HsmId::new(target).expect("id"),
        created_seq: 1,
        key: created,
    }
}

#[test]
fn blobs_move_both_ways_between_tokens_and_the_embedded_keystore() {
    let Some(h) = softhsm() else { return };
    let dk_bytes = [0x5a; 32];
    let dk = DomainKey::from_bytes(dk_bytes);
    let a = open(h, "clone-a");
    let b = open(h, "clone-b");
    for t in [&a, &b] {
        provision_domain_key(t, &dk).expect("provision");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let soft = embedded(dir.path(), "soft", dk_bytes);

    let mut padded = Vec::new();
    for t in CLONABLE_ON_261 {
        // Token → embedded and token → token.
        let id = KeyId::new();
        let made = a.generate(id, t, None).expect("generate");
        let blob = a.wrap(&id).expect("wrap");
        let plain = dk.unwrap(&blob).expect("software unwrap");
        let material = KeyMaterial::from_bytes(t, &plain).expect("token PKCS#8 parses (trimmed)");
        if t.is_asymmetric() {
            let der_len = hsm_agent::material::trim_wrap_padding(&plain).len();
            println!(
                "{t}: the token's blob unwraps to {} bytes: {der_len} of PKCS#8 DER, then zeros",
                plain.len()
            );
            if plain.len() != der_len {
                padded.push(t);
            }
        }
        assert_eq!(material.fingerprint().expect("fp"), made.fingerprint, "{t}");
        assert_eq!(
            material.public_key_der().expect("pk"),
            made.public_key,
            "{t}"
        );
        let cmd = clone_cmd(
            "soft",
            KeyCreated {
                key_id: id,
                key_type: t,
                fingerprint: made.fingerprint,
                hsm: HsmId::new("token-a").expect("id"),
                origin: KeyOrigin::Generated,
                attributes: KeyAttributes::default(),
                durability: Durability::Logged,
                domain: dk.id(),
                wrapped: blob.clone(),
                public_key: made.public_key.clone(),
            },
        );
        assert_eq!(
            soft.apply_clones(&[&cmd]),
            vec![Ok(CloneOutcome::Stored)],
            "{t}"
        );
        let cloned = b
            .unwrap(&UnwrapRequest {
                id,
                key_type: t,
                label: None,
                kek: Kek::Domain,
                blob: &blob,
                public_key: made.public_key.as_deref(),
                fingerprint: Some(made.fingerprint),
            })
            .expect("unwrap into token b");
        assert_eq!(cloned, made, "{t}");
        assert_eq!(b.fingerprint(&id).expect("fp"), made.fingerprint);
        if t.is_asymmetric() {
            let sig = b.sign(&id, b"from b").expect("sign on b");
            assert!(
                soft.verify(&id, b"from b", &sig)
                    .expect("verify in software"),
                "{t}"
            );
            let sig = soft.sign(&id, b"from soft").expect("sign in software");
            assert!(
                a.verify(&id, b"from soft", &sig).expect("verify on a"),
                "{t}"
            );
        } else {
            let sealed = a.encrypt(&id, b"from a", b"aad").expect("encrypt on a");
            assert_eq!(
                soft.decrypt(&id, &sealed, b"aad").expect("soft").as_slice(),
                b"from a"
            );
            assert_eq!(
                b.decrypt(&id, &sealed, b"aad").expect("b").as_slice(),
                b"from a"
            );
            let sealed = soft
                .encrypt(&id, b"from soft", b"")
                .expect("encrypt in software");
            assert_eq!(
                a.decrypt(&id, &sealed, b"").expect("a").as_slice(),
                b"from soft"
            );
        }
        // The clone is a token object with the complete template too.
        let f = flags(&b, &id, FLAG_TYPES);
        assert_eq!(flag(&f, AttributeType::Sensitive), Some(true), "{t}");
        assert_eq!(flag(&f, AttributeType::Token), Some(true), "{t}");
        assert_eq!(flag(&f, AttributeType::Derive), Some(false), "{t}");

        // Embedded → token: the embedded keystore's own blob.
        let created = soft
            .create(
                NewKey {
                    id: KeyId::new(),
                    key_type: t,
                    session: false,
                    attributes: KeyAttributes::default(),
                    source: KeySource::Generate,
                },
                &mut no_outbox,
            )
            .expect("embedded create");
        let into_a = a
            .unwrap(&UnwrapRequest {
                id: created.info.key_id,
                key_type: t,
                label: Some("from software"),
                kek: Kek::Domain,
                blob: &created.wrapped,
                public_key: created.public_key.as_deref(),
                fingerprint: Some(created.info.fingerprint),
            })
            .expect("embedded blob unwraps in the token");
        assert_eq!(into_a.fingerprint, created.info.fingerprint, "{t}");
        if t.is_asymmetric() {
            let sig = a.sign(&created.info.key_id, b"m").expect("sign");
            assert!(
                soft.verify(&created.info.key_id, b"m", &sig)
                    .expect("verify"),
                "{t}"
            );
        } else {
            let sealed = soft
                .encrypt(&created.info.key_id, b"m", b"")
                .expect("encrypt");
            assert_eq!(
                a.decrypt(&created.info.key_id, &sealed, b"")
                    .expect("dec")
                    .as_slice(),
                b"m"
            );
        }
        // And back out of the token into another embedded keystore.
        let dir2 = tempfile::tempdir().expect("tempdir");
        let soft2 = embedded(dir2.path(), "soft2", dk_bytes);
        let back = a.wrap(&created.info.key_id).expect("wrap");
        let cmd = clone_cmd(
            "soft2",
            KeyCreated {
                key_id: created.info.key_id,
                key_type: t,
                fingerprint: created.info.fingerprint,
                hsm: HsmId::new("token-a").expect("id"),
                origin: KeyOrigin::Unwrapped,
                attributes: KeyAttributes::default(),
                durability: Durability::Logged,
                domain: dk.id(),
                wrapped: back,
                public_key: created.public_key.clone(),
            },
        );
        assert_eq!(
            soft2.apply_clones(&[&cmd]),
            vec![Ok(CloneOutcome::Stored)],
            "{t}"
        );
    }

    // SoftHSM 2.6.1 zero-pads PKCS#8 before wrapping: the trimming ran.
    if is_261() {
        assert!(!padded.is_empty(), "no padded PKCS#8 seen");
    }

    // A key wrapped under a user's AES key (`KeySource::Unwrap`) goes into
    // the token as it goes into the embedded keystore.
    let kek = soft
        .create(
            NewKey {
                id: KeyId::new(),
                key_type: KeyType::Aes256,
                session: false,
                attributes: KeyAttributes::default(),
                source: KeySource::Generate,
            },
            &mut no_outbox,
        )
        .expect("kek");
    let kek_id = kek.info.key_id;
    a.unwrap(&UnwrapRequest {
        id: kek_id,
        key_type: KeyType::Aes256,
        label: None,
        kek: Kek::Domain,
        blob: &kek.wrapped,
        public_key: None,
        fingerprint: Some(kek.info.fingerprint),
    })
    .expect("the user's AES key into the token");
    let kek_bytes: [u8; 32] = dk
        .unwrap(&kek.wrapped)
        .expect("unwrap")
        .as_slice()
        .try_into()
        .expect("32 bytes");
    for t in CLONABLE_ON_261 {
        let material = KeyMaterial::generate(t).expect("generate");
        let blob = keysync_security::domain_key::wrap_with(
            &kek_bytes,
            &material.to_bytes().expect("bytes"),
        )
        .expect("wrap");
        let spki = material.public_key_der().expect("pk");
        let in_soft = soft
            .create(
                NewKey {
                    id: KeyId::new(),
                    key_type: t,
                    session: false,
                    attributes: KeyAttributes::default(),
                    source: KeySource::Unwrap {
                        wrapping_key: kek_id,
                        blob: &blob,
                    },
                },
                &mut no_outbox,
            )
            .expect("embedded unwrap under the user's key");
        let in_token = a
            .unwrap(&UnwrapRequest {
                id: KeyId::new(),
                key_type: t,
                label: None,
                kek: Kek::Key(kek_id),
                blob: &blob,
                public_key: spki.as_deref(),
                fingerprint: None,
            })
            .expect("token unwrap under the user's key");
        assert_eq!(in_token.fingerprint, in_soft.info.fingerprint, "{t}");
        assert_eq!(
            in_token.fingerprint,
            material.fingerprint().expect("fp"),
            "{t}"
        );
    }
    // Only an AES key of keysync is a wrapping key.
    let p256 = a
        .generate(KeyId::new(), KeyType::P256, None)
        .expect("generate");
    let r = a.unwrap(&UnwrapRequest {
        id: KeyId::new(),
        key_type: KeyType::Aes256,
        label: None,
        kek: Kek::Key(p256.id),
        blob: &kek.wrapped,
        public_key: None,
        fingerprint: None,
    });
    assert_eq!(r.map_err(|e| e.kind()).err(), Some(OpErrorKind::BadRequest));
}

#[test]
fn ed25519_is_refused_for_cloning_on_softhsm_261_and_nothing_is_stored() {
    let Some(h) = softhsm() else { return };
    if !is_261() {
        println!("SKIPPED: SoftHSM is {:?}, not 2.6.1", softhsm::version());
        return;
    }
    let dk = DomainKey::from_bytes([0x42; 32]);
    let token = open(h, "embedded");
    provision_domain_key(&token, &dk).expect("provision");
    let id = KeyId::new();
    token
        .generate(id, KeyType::Ed25519, None)
        .expect("generate");
    match token.wrap(&id) {
        Err(e @ Pkcs11Error::Unsupported { .. }) => println!("{e}"),
        r => panic!("expected Unsupported, got {r:?}"),
    }
    let material = KeyMaterial::generate(KeyType::Ed25519).expect("generate");
    let blob = dk.wrap(&material.to_bytes().expect("bytes")).expect("wrap");
    let spki = material.public_key_der().expect("pk").expect("asymmetric");
    let other = KeyId::new();
    match token.unwrap(&UnwrapRequest {
        id: other,
        key_type: KeyType::Ed25519,
        label: None,
        kek: Kek::Domain,
        blob: &blob,
        public_key: Some(&spki),
        fingerprint: None,
    }) {
        Err(e @ Pkcs11Error::Unsupported { .. }) => {
            println!("{e}");
            assert_eq!(e.kind(), OpErrorKind::Unsupported);
        }
        r => panic!("expected Unsupported, got {r:?}"),
    }
    assert_eq!(token.find(&other).expect("find"), None);
}

/// Every object this process sees in the token (token and session ones).
fn object_count(token: &Token) -> usize {
    token
        .with_session(|s| Ok(s.find_objects(&[]).expect("find").len()))
        .expect("session")
}

#[test]
fn bad_blobs_are_integrity_failures_and_store_nothing() {
    let Some(h) = softhsm() else { return };
    let dk = DomainKey::from_bytes([0x11; 32]);
    let other_dk = DomainKey::from_bytes([0x22; 32]);
    let token = open(h, "bad");
    provision_domain_key(&token, &dk).expect("provision");
    for t in CLONABLE_ON_261 {
        let before = object_count(&token);
        let material = KeyMaterial::generate(t).expect("generate");
        let plain = material.to_bytes().expect("bytes");
        let spki = material.public_key_der().expect("pk");
        let fp = material.fingerprint().expect("fp");
        let good = dk.wrap(&plain).expect("wrap");
        let mut tampered = good.clone();
        tampered[9] ^= 0x01;
        let foreign = other_dk.wrap(&plain).expect("wrap");
        let truncated = good[..good.len() - 8].to_vec();
        for (what, blob) in [
            ("tampered", &tampered),
            ("under another domain key", &foreign),
            ("truncated", &truncated),
        ] {
            let id = KeyId::new();
            let r = token.unwrap(&UnwrapRequest {
                id,
                key_type: t,
                label: None,
                kek: Kek::Domain,
                blob,
                public_key: spki.as_deref(),
                fingerprint: Some(fp),
            });
            match r {
                Err(e @ Pkcs11Error::Integrity) => {
                    assert_eq!(e.kind(), OpErrorKind::IntegrityFailed)
                }
                r => panic!("{t} {what}: expected Integrity, got {r:?}"),
            }
            assert_eq!(token.find(&id).expect("find"), None, "{t} {what}");
            assert_eq!(object_count(&token), before, "{t} {what}: no object at all");
        }
        // A good blob announced with the wrong fingerprint, or with another
        // key's public key: refused, nothing stored.
        let id = KeyId::new();
        let r = token.unwrap(&UnwrapRequest {
            id,
            key_type: t,
            label: None,
            kek: Kek::Domain,
            blob: &good,
            public_key: spki.as_deref(),
            fingerprint: Some(Fingerprint([7; 32])),
        });
        assert!(matches!(r, Err(Pkcs11Error::Mismatch(_))), "{t}: {r:?}");
        assert_eq!(object_count(&token), before, "{t}");
        if t.is_asymmetric() {
            let impostor = KeyMaterial::generate(t).expect("generate");
            let impostor_spki = impostor.public_key_der().expect("pk");
            let r = token.unwrap(&UnwrapRequest {
                id,
                key_type: t,
                label: None,
                kek: Kek::Domain,
                blob: &good,
                public_key: impostor_spki.as_deref(),
                fingerprint: None,
            });
            match r {
                Err(e @ Pkcs11Error::Mismatch("public key")) => {
                    assert_eq!(e.kind(), OpErrorKind::IntegrityFailed)
                }
                r => panic!("{t}: expected a public key mismatch, got {r:?}"),
            }
            assert_eq!(object_count(&token), before, "{t}");
            let r = token.unwrap(&UnwrapRequest {
                id,
                key_type: t,
                label: None,
                kek: Kek::Domain,
                blob: &good,
                public_key: None,
                fingerprint: None,
            });
            assert_eq!(
                r.map_err(|e| e.kind()).err(),
                Some(OpErrorKind::BadRequest),
                "{t}"
            );
        }
        // The good blob goes in.
        let stored = token
            .unwrap(&UnwrapRequest {
                id,
                key_type: t,
                label: None,
                kek: Kek::Domain,
                blob: &good,
                public_key: spki.as_deref(),
                fingerprint: Some(fp),
            })
            .expect("good blob");
        assert_eq!(stored.fingerprint, fp);
    }
    assert_eq!(token.list().expect("list").len(), CLONABLE_ON_261.len());
}

#[test]
fn keys_are_found_again_after_the_token_logs_out() {
    let Some(h) = softhsm() else { return };
    let token = open(h, "relogin");
    let id = KeyId::new();
    token.generate(id, KeyType::P256, None).expect("generate");
    token.sign(&id, b"before").expect("sign");
    // Closing every session logs the user out; handles go stale. The next
    // call opens a session, logs in again and finds the key by CKA_ID.
    token.reset_sessions();
    let sig = token.sign(&id, b"after").expect("sign after re-login");
    assert!(token.verify(&id, b"after", &sig).expect("verify"));
    // A second Token on the same token (another agent process would be the
    // same) sees the key too.
    let second = open(h, "relogin");
    assert!(second.find(&id).expect("find").is_some());
    drop(second);
    token
        .sign(&id, b"still")
        .expect("sign after the other closed");
}

#[test]
fn the_session_pool_serves_threads_and_blocking_tasks() {
    let Some(h) = softhsm() else { return };
    let token = Arc::new(open(h, "pool"));
    let ids: Vec<KeyId> = [KeyType::P256, KeyType::Aes256]
        .into_iter()
        .map(|t| {
            let id = KeyId::new();
            token.generate(id, t, None).expect("generate");
            id
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..16u8 {
            let token = token.clone();
            let (sig_id, aes_id) = (ids[0], ids[1]);
            tasks.push(tokio::task::spawn_blocking(move || {
                let sig = token.sign(&sig_id, &[i]).expect("sign");
                assert!(token.verify(&sig_id, &[i], &sig).expect("verify"));
                let sealed = token.encrypt(&aes_id, &[i], b"").expect("encrypt");
                assert_eq!(
                    token
                        .decrypt(&aes_id, &sealed, b"")
                        .expect("decrypt")
                        .as_slice(),
                    &[i]
                );
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    });
}

fn pkcs11_tool(h: &SoftHsm, label: &str, args: &[&str]) -> String {
    let out = h
        .command("pkcs11-tool")
        .args([
            "--module",
            softhsm::MODULE,
            "--token-label",
            label,
            "--login",
            "--pin",
            softhsm::PIN,
        ])
        .args(args)
        .output()
        .expect("run pkcs11-tool");
    assert!(
        out.status.success(),
        "pkcs11-tool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The objects `pkcs11-tool --list-objects` prints, one string per object
/// (its heading line, then its fields, trimmed).
fn opensc_objects(listing: &str) -> Vec<String> {
    let mut objects: Vec<String> = Vec::new();
    for line in listing.lines() {
        if line.starts_with(' ') {
            if let Some(o) = objects.last_mut() {
                o.push('\n');
                o.push_str(line.trim());
            }
        } else if !line.trim().is_empty() {
            objects.push(line.to_string());
        }
    }
    objects
}

#[test]
fn opensc_pkcs11_tool_finds_keys_by_id_and_signs_with_them() {
    let Some(h) = softhsm() else { return };
    if !softhsm::have("pkcs11-tool", "--help") {
        println!("SKIPPED: pkcs11-tool is missing (apt-get install opensc)");
        return;
    }
    let token = open(h, "opensc");
    let dir = tempfile::tempdir().expect("tempdir");
    let message = b"signed by OpenSC with a keysync key";
    for t in KeyType::ALL {
        let id = KeyId::new();
        token
            .generate(id, t, Some(&format!("opensc {t}")))
            .expect("generate");
        let hex_id = hex::encode(id.0.as_bytes());
        // OpenSC 0.23's --list-objects lists every object whatever --id
        // says: pick this key's objects by the ID it prints.
        let listing = pkcs11_tool(h, "opensc", &["--list-objects"]);
        let mine: Vec<String> = opensc_objects(&listing)
            .into_iter()
            .filter(|o| o.contains(&format!("\nID:         {hex_id}\n")))
            .collect();
        println!("pkcs11-tool sees key {hex_id}:\n{}", mine.join("\n"));
        // The usages OpenSC reads are exactly the template's.
        let kinds: &[(&str, &str)] = if t.is_asymmetric() {
            &[
                ("Private Key Object", "sign"),
                ("Public Key Object", "verify"),
            ]
        } else {
            &[("Secret Key Object", "encrypt, decrypt, unwrap")]
        };
        for (kind, usage) in kinds {
            let o = mine
                .iter()
                .find(|o| o.starts_with(kind))
                .unwrap_or_else(|| panic!("{t}: no {kind} with ID {hex_id} in {listing}"));
            assert!(o.contains(&format!("label:      opensc {t}\n")), "{t}: {o}");
            assert!(o.contains(&format!("Usage:      {usage}\n")), "{t}: {o}");
            if !kind.starts_with("Public") {
                assert!(o.contains("Access:     sensitive"), "{t}: {o}");
            }
        }
        assert_eq!(mine.len(), kinds.len(), "{t}: {mine:?}");
        if !t.is_asymmetric() {
            continue;
        }
        // OpenSC finds the private key by --id and signs; keysync verifies.
        let digest = sha2::Sha256::digest(message);
        let (mechanism, input): (&str, &[u8]) = match t {
            KeyType::P256 => ("ECDSA", digest.as_slice()),
            KeyType::Ed25519 => ("EDDSA", message),
            _ => ("SHA256-RSA-PKCS", message),
        };
        let input_file = dir.path().join(format!("{t}.in"));
        let sig_file = dir.path().join(format!("{t}.sig"));
        std::fs::write(&input_file, input).expect("write");
        let mut args = vec![
            "--sign",
            "--id",
            &hex_id,
            "--mechanism",
            mechanism,
            "--input-file",
            input_file.to_str().expect("path"),
            "--output-file",
            sig_file.to_str().expect("path"),
        ];
        if t == KeyType::P256 {
            args.extend(["--signature-format", "openssl"]);
        }
        pkcs11_tool(h, "opensc", &args);
        let sig = std::fs::read(&sig_file).expect("signature");
        assert!(
            token.verify(&id, message, &sig).expect("verify"),
            "{t}: OpenSC's signature with key {hex_id} verifies"
        );
    }
}

const PYKCS11_SCRIPT: &str = r#"
import json, sys
import PyKCS11
import PyKCS11.LowLevel
from PyKCS11.LowLevel import CKA_CLASS, CKA_ID, CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_VALUE, CKA_PRIVATE_EXPONENT, CKO_PRIVATE_KEY, CKO_SECRET_KEY, CKR_ATTRIBUTE_SENSITIVE, CKR_OK
module, label, pin = sys.argv[1], sys.argv[2], sys.argv[3]
lib = PyKCS11.PyKCS11Lib()
lib.load(module)
slot = [s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.strip() == label][0]
session = lib.openSession(slot)
session.login(pin)
out = {}
for hexid in sys.argv[4:]:
    objs = session.findObjects([(CKA_ID, bytes.fromhex(hexid))])
    for o in objs:
        cls = session.getAttributeValue(o, [CKA_CLASS])[0]
        if cls not in (CKO_PRIVATE_KEY, CKO_SECRET_KEY):
            continue
        sens, extr = session.getAttributeValue(o, [CKA_SENSITIVE, CKA_EXTRACTABLE])
        reads = {}
        for name, attr in (("value", CKA_VALUE), ("private_exponent", CKA_PRIVATE_EXPONENT)):
            # The low-level call, to see the token's own answer (the
            # high-level one turns CKR_ATTRIBUTE_SENSITIVE into None).
            t = PyKCS11.LowLevel.ckattrlist(1)
            t[0].SetType(attr)
            rv = lib.lib.C_GetAttributeValue(session.session, o, t)
            if rv == CKR_ATTRIBUTE_SENSITIVE:
                reads[name] = "sensitive"
            elif rv == CKR_OK:
                reads[name] = "read"
            else:
                reads[name] = PyKCS11.CKR[rv] if rv in PyKCS11.CKR else str(rv)
        out[hexid] = {"sensitive": bool(sens), "extractable": bool(extr), "reads": reads}
print(json.dumps(out))
"#;

#[test]
fn pykcs11_sees_private_keys_sensitive_and_cannot_read_them() {
    let Some(h) = softhsm() else { return };
    let py = "/usr/bin/python3";
    let has_pykcs11 = Command::new(py)
        .args(["-c", "import PyKCS11"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_pykcs11 {
        println!("SKIPPED: {py} cannot import PyKCS11 (apt-get install python3-pykcs11)");
        return;
    }
    let dk = DomainKey::from_bytes([0x77; 32]);
    let token = open(h, "pykcs11");
    provision_domain_key(&token, &dk).expect("provision");
    let mut ids = Vec::new();
    for t in KeyType::ALL {
        let id = KeyId::new();
        token.generate(id, t, None).expect("generate");
        ids.push((t, id));
    }
    // A clone unwrapped in, too.
    let material = KeyMaterial::generate(KeyType::P256).expect("generate");
    let cloned = KeyId::new();
    token
        .unwrap(&UnwrapRequest {
            id: cloned,
            key_type: KeyType::P256,
            label: None,
            kek: Kek::Domain,
            blob: &dk.wrap(&material.to_bytes().expect("bytes")).expect("wrap"),
            public_key: material.public_key_der().expect("pk").as_deref(),
            fingerprint: None,
        })
        .expect("unwrap");
    ids.push((KeyType::P256, cloned));
    let mut cmd = h.command(py);
    cmd.args([
        "-c",
        PYKCS11_SCRIPT,
        softhsm::MODULE,
        "pykcs11",
        softhsm::PIN,
    ]);
    for (_, id) in &ids {
        cmd.arg(hex::encode(id.0.as_bytes()));
    }
    let out = cmd.output().expect("python3");
    assert!(
        out.status.success(),
        "PyKCS11: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("PyKCS11 prints JSON");
    println!("PyKCS11 report: {report}");
    for (t, id) in &ids {
        let r = &report[hex::encode(id.0.as_bytes())];
        assert_eq!(r["sensitive"], true, "{t}: {r}");
        assert_eq!(
            r["extractable"], true,
            "{t} (extractable by wrapping only): {r}"
        );
        if *t == KeyType::Rsa2048 {
            // An RSA key's secret is its private exponent (and primes).
            assert_eq!(r["reads"]["private_exponent"], "sensitive", "{t}: {r}");
            assert_ne!(r["reads"]["value"], "read", "{t}: {r}");
        } else {
            assert_eq!(r["reads"]["value"], "sensitive", "{t}: {r}");
        }
    }
}
