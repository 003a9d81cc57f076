//! `Pkcs11Keystore`, the agent's `Keystore` on a real SoftHSM2 token,
//! against the embedded keystore: the same rules (ids never reused, clones
//! idempotent and checked, tombstones), the same blobs both ways, and
//! crash recovery: the process SIGKILLed between a token call and the
//! journal commit, then opened again.
#![cfg(feature = "pkcs11")]

mod softhsm;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use hsm_agent::keystore::embedded::EmbeddedKeystore;
use hsm_agent::keystore::pkcs11::{
    provision_domain_key, ExpectedDomain, Pkcs11Keystore, Step, Token,
};
use hsm_agent::keystore::{CloneOutcome, CreatedKey, KeySource, Keystore, NewKey, OutboxEntry};
use hsm_agent::material::KeyMaterial;
use keysync_schemas::{
    CloneFailure, CloneKey, Durability, HsmId, KeyAttributes, KeyCreated, KeyId, KeyType,
    OpErrorKind,
};
use keysync_security::domain_key::DomainKey;
use softhsm::{softhsm, SoftHsm};

fn is_261() -> bool {
    softhsm::version().as_deref() == Some("2.6.1")
}

fn open_store(h: &SoftHsm, label: &str, dir: &Path, dk: &DomainKey) -> Pkcs11Keystore {
    let token = Token::open(h.module(), label, &h.pin_file).expect("open token");
    provision_domain_key(&token, dk).expect("provision");
    Pkcs11Keystore::open(
        Arc::new(token),
        dir,
        HsmId::new(label).expect("id"),
        ExpectedDomain::CheckValue(dk.check_value().expect("check value")),
    )
    .expect("open the PKCS#11 keystore")
}

fn new_key(key_type: KeyType, source: KeySource<'_>) -> NewKey<'_> {
    NewKey {
        id: KeyId::new(),
        key_type,
        session: false,
        attributes: KeyAttributes {
            label: Some(format!("test {key_type}")),
            app_id: Some(vec![0xa1, key_type as u8]),
        },
        source,
    }
}

fn event(_: &CreatedKey) -> Result<OutboxEntry, String> {
    Ok(b"KeyCreated".to_vec())
}

/// The clone command the orchestrator would send `target` for `created`.
fn clone_of(created: &CreatedKey, target: &str) -> CloneKey {
    CloneKey {
        target: HsmId::new(target).expect("id"),
        created_seq: 1,
        key: KeyCreated {
            key_id: created.info.key_id,
            key_type: created.info.key_type,
            fingerprint: created.info.fingerprint,
            hsm: created.info.hsm.clone(),
            origin: created.origin,
            attributes: created.info.attributes.clone(),
            durability: Durability::Logged,
            domain: created.domain,
            wrapped: created.wrapped.clone(),
            public_key: created.public_key.clone(),
        },
    }
}

/// The applications' operations on a digest and AES-GCM with their IV,
/// on two keystores holding the same key: deterministic outputs are equal
/// (RSA PKCS#1 v1.5, AES-GCM at every tag length); the others verify
/// with the public key under the standard's own rules; bad input is a
/// bad request on both.
fn digest_ops_agree(a: &dyn Keystore, b: &dyn Keystore, id: &KeyId, t: KeyType) {
    use keysync_schemas::{DigestAlg, DigestSignScheme, GcmParams};
    use p256::pkcs8::DecodePublicKey as _;
    use sha2::Digest as _;
    use signature::hazmat::PrehashVerifier as _;
    let digest = sha2::Sha256::digest(b"application data");
    match t {
        KeyType::P256 => {
            let spki = a.public_key(id).expect("spki");
            let vk = p256::ecdsa::VerifyingKey::from_public_key_der(&spki).expect("p256 spki");
            for ks in [a, b] {
                let raw = ks
                    .sign_digest(id, &DigestSignScheme::Ecdsa, &digest)
                    .expect("ECDSA on a digest");
                let sig = p256::ecdsa::Signature::from_slice(&raw).expect("raw r||s");
                vk.verify_prehash(&digest, &sig).expect("verifies");
                let e = ks
                    .sign_digest(id, &DigestSignScheme::Ecdsa, &digest[..31])
                    .expect_err("a 31-byte digest");
                assert_eq!(e.kind(), OpErrorKind::BadRequest, "{e}");
            }
        }
        KeyType::Rsa2048 => {
            let spki = a.public_key(id).expect("spki");
            let pk = rsa::PublicKey::from_public_key_der(&spki).expect("rsa spki");
            let mut info = hex::decode("3031300d060960864801650304020105000420").expect("hex");
            info.extend_from_slice(&digest);
            let sa = a
                .sign_digest(id, &DigestSignScheme::RsaPkcs1, &info)
                .expect("RSA-PKCS on a");
            let sb = b
                .sign_digest(id, &DigestSignScheme::RsaPkcs1, &info)
                .expect("RSA-PKCS on b");
            assert_eq!(sa, sb, "PKCS#1 v1.5 is deterministic");
            assert_eq!(sa, a.sign(id, b"application data").expect("sign"));
            let pss = DigestSignScheme::RsaPss {
                hash: DigestAlg::Sha256,
                mgf: DigestAlg::Sha256,
                salt_len: 32,
            };
            for ks in [a, b] {
                let sig = ks.sign_digest(id, &pss, &digest).expect("PSS");
                rsa::pss::VerifyingKey::<sha2::Sha256>::new_with_salt_len(pk.clone(), 32)
                    .verify_prehash(
                        &digest,
                        &rsa::pss::Signature::try_from(&sig[..]).expect("sig"),
                    )
                    .expect("PSS verifies");
                let bad = DigestSignScheme::RsaPss {
                    hash: DigestAlg::Sha256,
                    mgf: DigestAlg::Sha384,
                    salt_len: 32,
                };
                let e = ks.sign_digest(id, &bad, &digest).expect_err("MGF1-SHA384");
                assert_eq!(e.kind(), OpErrorKind::BadRequest, "{e}");
            }
        }
        KeyType::Aes256 => {
            for tag_bits in [96, 128] {
                let p = GcmParams {
                    iv: vec![7; 12],
                    aad: b"header".to_vec(),
                    tag_bits,
                };
                let ca = a.encrypt_gcm(id, &p, b"app secret").expect("GCM on a");
                let cb = b.encrypt_gcm(id, &p, b"app secret").expect("GCM on b");
                assert_eq!(ca, cb, "same key, IV, AAD, tag length: same bytes");
                assert_eq!(ca.len(), 10 + tag_bits as usize / 8);
                assert_eq!(
                    b.decrypt_gcm(id, &p, &ca).expect("open on b").as_slice(),
                    b"app secret"
                );
                let mut tampered = ca.clone();
                tampered[0] ^= 1;
                let e = a.decrypt_gcm(id, &p, &tampered).expect_err("tampered");
                assert_eq!(e.kind(), OpErrorKind::IntegrityFailed, "{e}");
            }
            let short_iv = GcmParams {
                iv: vec![7; 8],
                aad: Vec::new(),
                tag_bits: 128,
            };
            for ks in [a, b] {
                let e = ks.encrypt_gcm(id, &short_iv, b"x").expect_err("8-byte IV");
                assert_eq!(e.kind(), OpErrorKind::BadRequest, "{e}");
            }
        }
        KeyType::Ed25519 => {}
    }
}

/// Signs on one, verifies on the other (or AES-GCM across), both ways.
fn works_across(a: &dyn Keystore, b: &dyn Keystore, id: &KeyId, t: KeyType) {
    digest_ops_agree(a, b, id, t);
    if t.is_asymmetric() {
        let sig = a.sign(id, b"from a").expect("sign on a");
        assert!(b.verify(id, b"from a", &sig).expect("verify on b"), "{t}");
        let sig = b.sign(id, b"from b").expect("sign on b");
        assert!(a.verify(id, b"from b", &sig).expect("verify on a"), "{t}");
    } else {
        let sealed = a.encrypt(id, b"secret a", b"aad").expect("encrypt on a");
        assert_eq!(
            b.decrypt(id, &sealed, b"aad")
                .expect("decrypt on b")
                .as_slice(),
            b"secret a"
        );
        let sealed = b.encrypt(id, b"secret b", b"aad").expect("encrypt on b");
        assert_eq!(
            a.decrypt(id, &sealed, b"aad")
                .expect("decrypt on a")
                .as_slice(),
            b"secret b"
        );
    }
}

#[test]
fn a_token_keystore_and_the_embedded_one_clone_to_each_other_under_the_same_rules() {
    let Some(h) = softhsm() else { return };
    let dk = DomainKey::from_bytes([0x31; 32]);
    let dirs = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let token = open_store(h, "store-a", dirs.0.path(), &dk);
    let soft = EmbeddedKeystore::open(
        dirs.1.path(),
        HsmId::new("soft").expect("id"),
        DomainKey::from_bytes([0x31; 32]),
    )
    .expect("embedded");
    let holds = token.holdable_types();
    println!("store-a holds {holds:?}");
    if is_261() {
        assert_eq!(
            holds,
            vec![KeyType::P256, KeyType::Aes256, KeyType::Rsa2048]
        );
    }

    for t in KeyType::ALL {
        // Made on the token, cloned to the embedded HSM.
        let made = token.create(new_key(t, KeySource::Generate), &mut event);
        if !holds.contains(&t) {
            let e = made.expect_err("a type the token cannot clone is refused at create");
            assert_eq!(e.kind(), OpErrorKind::Unsupported, "{t}: {e}");
            println!("{t} on the token: {e}");
        } else {
            let made = made.expect("create on the token");
            let id = made.info.key_id;
            assert_eq!(
                soft.apply_clones(&[&clone_of(&made, "soft")]),
                vec![Ok(CloneOutcome::Stored)]
            );
            assert_eq!(
                soft.info(&id).expect("held").fingerprint,
                made.info.fingerprint
            );
            works_across(&token, &soft, &id, t);
        }
        // Made on the embedded HSM, cloned to the token.
        let made = soft
            .create(new_key(t, KeySource::Generate), &mut event)
            .expect("create on the embedded HSM");
        let cmd = clone_of(&made, "store-a");
        let applied = token.apply_clones(&[&cmd]);
        if holds.contains(&t) {
            assert_eq!(applied, vec![Ok(CloneOutcome::Stored)], "{t}");
            assert_eq!(
                token.apply_clones(&[&cmd]),
                vec![Ok(CloneOutcome::AlreadyPresent)]
            );
            works_across(&token, &soft, &made.info.key_id, t);
        } else {
            assert!(
                matches!(applied.as_slice(), [Err(CloneFailure::Unsupported(_))]),
                "{t}: {applied:?}"
            );
            assert!(token.info(&made.info.key_id).is_err());
        }
    }

    // Imported material gets the same fingerprint as in software.
    let material = KeyMaterial::generate(KeyType::P256).expect("material");
    let bytes = material.to_bytes().expect("bytes");
    let imported = token
        .create(
            new_key(KeyType::P256, KeySource::Import(&bytes)),
            &mut event,
        )
        .expect("import");
    assert_eq!(
        imported.info.fingerprint,
        material.fingerprint().expect("fp")
    );
    let sig = token
        .sign(&imported.info.key_id, b"imported")
        .expect("sign");
    assert!(material.verify(b"imported", &sig).expect("verify"));

    // A clone with another key under a held id conflicts; a tampered blob
    // is an integrity failure; neither stores anything.
    let mut other = clone_of(&imported, "store-a");
    other.key.fingerprint.0[0] ^= 1;
    let mut tampered = clone_of(
        &soft
            .create(new_key(KeyType::Aes256, KeySource::Generate), &mut event)
            .expect("create"),
        "store-a",
    );
    tampered.key.wrapped[5] ^= 1;
    let before = token.token_key_count();
    let r = token.apply_clones(&[&other, &tampered]);
    assert!(
        matches!(r[0], Err(CloneFailure::Undecided | CloneFailure::Conflict)),
        "{r:?}"
    );
    assert_eq!(r[1], Err(CloneFailure::Integrity));
    assert_eq!(token.token_key_count(), before);
    assert!(token
        .token()
        .find(&tampered.key.key_id)
        .expect("find")
        .is_none());

    // Session keys: in the token, never announced, not inventory.
    let mut session = new_key(KeyType::P256, KeySource::Generate);
    session.session = true;
    let s = token.create(session, &mut event).expect("session key");
    assert!(s.wrapped.is_empty());
    assert!(token.sign(&s.info.key_id, b"session").is_ok());
    assert_eq!(token.key_count(), token.token_key_count() + 1);

    // Deleted: gone from the token, its id refused for good.
    let gone = imported.info.key_id;
    let deleted = token
        .delete(&gone, Some(b"KeyDeleted".to_vec()))
        .expect("delete");
    assert_eq!(deleted.map(|i| i.key_id), Some(gone));
    assert!(token.token().find(&gone).expect("find").is_none());
    let again = NewKey {
        id: gone,
        ..new_key(KeyType::P256, KeySource::Generate)
    };
    assert_eq!(
        token.create(again, &mut event).map_err(|e| e.kind()).err(),
        Some(OpErrorKind::KeyIdTaken)
    );
    assert_eq!(
        token.apply_clones(&[&clone_of(&imported, "store-a")]),
        vec![Ok(CloneOutcome::Tombstoned)]
    );

    // Opened again: the same keys, digest and outbox.
    let digest = token.inventory_digest();
    let count = token.token_key_count();
    let outbox = token.outbox().expect("outbox");
    assert!(outbox
        .iter()
        .any(|(id, e)| *id == gone && e == b"KeyDeleted"));
    drop(token);
    let token = open_store(h, "store-a", dirs.0.path(), &dk);
    assert_eq!(token.reconciled().destroyed, Vec::<KeyId>::new());
    assert_eq!(token.reconciled().lost, Vec::<KeyId>::new());
    assert_eq!(token.inventory_digest(), digest);
    assert_eq!(token.token_key_count(), count);
    assert_eq!(token.outbox().expect("outbox"), outbox);
    let ids: Vec<KeyId> = outbox.iter().map(|(id, _)| *id).collect();
    token.outbox_done(&ids).expect("done");
    assert!(token.outbox().expect("outbox").is_empty());
}

#[test]
fn a_token_of_another_domain_is_refused_at_open() {
    let Some(h) = softhsm() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let token = Token::open(h.module(), "store-b", &h.pin_file).expect("open token");
    provision_domain_key(&token, &DomainKey::from_bytes([0x01; 32])).expect("provision");
    let theirs = DomainKey::from_bytes([0x02; 32]);
    let err = Pkcs11Keystore::open(
        Arc::new(token),
        dir.path(),
        HsmId::new("store-b").expect("id"),
        ExpectedDomain::CheckValue(theirs.check_value().expect("cv")),
    )
    .err()
    .expect("another domain key is refused");
    let msg = err.to_string();
    println!("{msg}");
    assert!(msg.contains("store-b"), "{msg}");
    // Nothing was written: no journal made for a token that is refused.
    assert!(!dir
        .path()
        .join(hsm_agent::keystore::pkcs11::JOURNAL_FILE)
        .exists());
}

// ---- Crash recovery -------------------------------------------------------
//
// The crashing process must be a real process killed by SIGKILL at the
// exact step, so this test runs itself again as a child (`crash_child`,
// selected by environment), on a token directory of its own: SoftHSM reads
// its tokens at C_Initialize, so every process that touches this token is a
// fresh one.

const CHILD_ENV: &str = "KEYSYNC_TEST_CRASH_CHILD";

struct CrashRig {
    dir: tempfile::TempDir,
}

impl CrashRig {
    fn new() -> Option<CrashRig> {
        if !Path::new(softhsm::MODULE).exists() || !softhsm::have("softhsm2-util", "--version") {
            println!("SKIPPED: SoftHSM2 is not installed");
            return None;
        }
        let dir = tempfile::tempdir().expect("dir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir_all(&tokens).expect("tokens dir");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("conf");
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                "crash",
                "--pin",
                softhsm::PIN,
            ])
            .args(["--so-pin", softhsm::SO_PIN])
            .output()
            .expect("softhsm2-util");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        softhsm::secret_file(&dir.path().join("pin"), softhsm::PIN);
        std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
        Some(CrashRig { dir })
    }

    /// Runs `crash_child` as `role`; returns its exit status and stdout.
    fn child(&self, role: &str) -> (std::process::ExitStatus, String) {
        let out = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--ignored",
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{role}:{}", self.dir.path().display()))
            .env("SOFTHSM2_CONF", self.dir.path().join("softhsm2.conf"))
            .output()
            .expect("run the child");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            println!("child {role}: {}", String::from_utf8_lossy(&out.stderr));
        }
        (out.status, stdout)
    }

    /// The child's `name=value` line.
    fn value(stdout: &str, name: &str) -> String {
        stdout
            .lines()
            // The test harness prints "test crash_child ... " before the
            // child's first line.
            .find_map(|l| {
                let pat = format!("{name}=");
                let at = l.find(&pat)?;
                (at == 0 || l[..at].ends_with(' ')).then(|| &l[at + pat.len()..])
            })
            .unwrap_or_else(|| panic!("no {name}= in {stdout}"))
            .to_string()
    }
}

fn killed(status: std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt as _;
    status.signal() == Some(nix::sys::signal::Signal::SIGKILL as i32)
}

#[test]
#[ignore = "the child process of the crash tests; run by them"]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (role, dir) = spec.split_once(':').expect("role:dir");
    let dir = Path::new(dir);
    let dk = DomainKey::from_bytes([0x66; 32]);
    let token = Token::open(Path::new(softhsm::MODULE), "crash", &dir.join("pin")).expect("token");
    provision_domain_key(&token, &dk).expect("provision");
    let token = Arc::new(token);
    let open = |token: Arc<Token>| {
        Pkcs11Keystore::open(
            token,
            &dir.join("data"),
            HsmId::new("crash").expect("id"),
            ExpectedDomain::CheckValue(dk.check_value().expect("cv")),
        )
        .expect("open")
    };
    let die = |_| {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    };
    match role {
        // A key acknowledged, then one whose create dies after the token
        // object is made and before the journal commit.
        "create" => {
            let mut store = open(token.clone());
            let kept = store
                .create(new_key(KeyType::P256, KeySource::Generate), &mut event)
                .expect("create");
            println!("kept={}", kept.info.key_id);
            let doomed = new_key(KeyType::Rsa2048, KeySource::Generate);
            println!("doomed={}", doomed.id);
            store.on_step(move |s| {
                if matches!(s, Step::ObjectCreated(_)) {
                    die(s)
                }
            });
            let _ = store.create(doomed, &mut event);
            unreachable!("the create was to die at ObjectCreated");
        }
        // A key acknowledged, then its delete dies after the tombstone.
        "delete" => {
            let mut store = open(token.clone());
            let doomed = store
                .create(new_key(KeyType::Aes256, KeySource::Generate), &mut event)
                .expect("create");
            println!("doomed={}", doomed.info.key_id);
            store.on_step(move |s| {
                if matches!(s, Step::Tombstoned(_)) {
                    die(s)
                }
            });
            let _ = store.delete(&doomed.info.key_id, Some(b"KeyDeleted".to_vec()));
            unreachable!("the delete was to die at Tombstoned");
        }
        // What the token holds, without the keystore (no reconciliation).
        "objects" => {
            let ids: Vec<String> = token
                .list()
                .expect("list")
                .into_iter()
                .map(|k| k.id.to_string())
                .collect();
            println!("objects={}", ids.join(","));
        }
        // The agent starting again: open (reconcile), then report.
        "restart" => {
            let store = open(token.clone());
            let r = store.reconciled();
            let ids = |v: &[KeyId]| {
                v.iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            println!("destroyed={}", ids(&r.destroyed));
            println!("lost={}", ids(&r.lost));
            let held: Vec<KeyId> = store
                .list_page(None, 1000)
                .into_iter()
                .map(|i| i.key_id)
                .collect();
            println!("held={}", ids(&held));
            let outbox: Vec<String> = store
                .outbox()
                .expect("outbox")
                .into_iter()
                .map(|(id, e)| format!("{id}/{}", String::from_utf8_lossy(&e)))
                .collect();
            println!("outbox={}", outbox.join(","));
            let objects: Vec<KeyId> = token
                .list()
                .expect("list")
                .into_iter()
                .map(|k| k.id)
                .collect();
            println!("objects={}", ids(&objects));
            for id in &held {
                assert!(store.sign(id, b"x").is_ok() || store.encrypt(id, b"x", b"").is_ok());
            }
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn a_create_killed_between_the_token_and_the_journal_leaves_no_orphan() {
    let Some(rig) = CrashRig::new() else { return };
    let (status, out) = rig.child("create");
    assert!(
        killed(status),
        "the child was to die by SIGKILL: {status:?}\n{out}"
    );
    let kept = CrashRig::value(&out, "kept");
    let doomed = CrashRig::value(&out, "doomed");
    // The fault happened where claimed: the token holds the doomed key's
    // objects, and the journal never recorded them.
    let (_, objects) = rig.child("objects");
    let objects = CrashRig::value(&objects, "objects");
    assert!(objects.contains(&doomed), "{objects}");
    let (status, out) = rig.child("restart");
    assert!(status.success(), "{out}");
    println!("{out}");
    assert_eq!(CrashRig::value(&out, "destroyed"), doomed);
    assert_eq!(CrashRig::value(&out, "lost"), "");
    assert_eq!(CrashRig::value(&out, "held"), kept);
    assert_eq!(CrashRig::value(&out, "objects"), kept);
    assert_eq!(
        CrashRig::value(&out, "outbox"),
        format!("{kept}/KeyCreated")
    );
}

#[test]
fn a_delete_killed_between_tombstone_and_destroy_resurrects_nothing() {
    let Some(rig) = CrashRig::new() else { return };
    let (status, out) = rig.child("delete");
    assert!(
        killed(status),
        "the child was to die by SIGKILL: {status:?}\n{out}"
    );
    let doomed = CrashRig::value(&out, "doomed");
    let (_, objects) = rig.child("objects");
    assert_eq!(
        CrashRig::value(&objects, "objects"),
        doomed,
        "the object outlived the tombstone"
    );
    let (status, out) = rig.child("restart");
    assert!(status.success(), "{out}");
    println!("{out}");
    assert_eq!(CrashRig::value(&out, "destroyed"), doomed);
    assert_eq!(CrashRig::value(&out, "held"), "");
    assert_eq!(CrashRig::value(&out, "objects"), "");
    // The KeyDeleted event survived the crash, to be published.
    assert_eq!(
        CrashRig::value(&out, "outbox"),
        format!("{doomed}/KeyDeleted")
    );
}
