//! A mixed cluster of real processes: two agents in front of SoftHSM2
//! tokens (`--keystore pkcs11`) and one embedded agent. Keys of every type
//! the tokens can hold, made on each HSM, converge on all three with equal
//! fingerprints; AES keys encrypt on a token and decrypt on the embedded
//! HSM and back; OpenSC's `pkcs11-tool` finds the clones in token 2 by
//! `CKA_ID` and signs with them, and openssl verifies with the public key
//! read from the creating HSM; PyKCS11 finds the clones' private keys
//! sensitive and cannot read them.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use keysync::{CreateKey, Route};
use keysync_harness::softhsm;
use keysync_schemas::{Durability, HsmId, KeyId, KeyType};
use keysync_testkit::{assert_converges, hsm, DevStack, StackOptions};

/// What SoftHSM 2.6.1 can clone (Ed25519 it can neither wrap nor unwrap).
const TYPES: [KeyType; 3] = [KeyType::P256, KeyType::Aes256, KeyType::Rsa2048];

fn tools_present() -> bool {
    let have = |p: &str| Command::new(p).arg("--help").output().is_ok();
    let present = softhsm::module().is_some() && have("softhsm2-util") && have("pkcs11-tool");
    if !present {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have SoftHSM2 and OpenSC (scripts/install-deps installs them)"
        );
        println!("SKIPPED: SoftHSM2 or OpenSC is not installed (scripts/install-deps)");
    }
    present
}

async fn mixed_stack() -> DevStack {
    DevStack::start(StackOptions {
        hsms: 3,
        softhsm_agents: vec!["hsm-1".into(), "hsm-2".into()],
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("mixed stack did not start: {e}"))
}

/// `pkcs11-tool` on the stack's token `label`.
fn pkcs11_tool(stack: &DevStack, label: &str, args: &[&str]) -> String {
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", stack.dir().join("softhsm/softhsm2.conf"))
        .arg("--module")
        .arg(softhsm::module().expect("module"))
        .args(["--token-label", label, "--login", "--pin"])
        .arg(std::fs::read_to_string(stack.dir().join("softhsm/pin")).expect("PIN file"))
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

/// See the call site.
async fn applications_ops_agree(
    client: &keysync::Client,
    hsms: &[HsmId],
    made: &[(KeyType, HsmId, KeyId)],
) {
    use keysync_schemas::{DigestAlg, DigestSignScheme, GcmParams, OpRequest, RejectReason};
    use p256::pkcs8::DecodePublicKey as _;
    use sha2::Digest as _;
    use signature::hazmat::PrehashVerifier as _;
    let digest = sha2::Sha256::digest(b"an application's message");
    let mut digest_info = hex::decode("3031300d060960864801650304020105000420").expect("hex");
    digest_info.extend_from_slice(&digest);
    let pss = DigestSignScheme::RsaPss {
        hash: DigestAlg::Sha256,
        mgf: DigestAlg::Sha256,
        salt_len: 32,
    };
    for (t, on, id) in made {
        let mut same = Vec::new();
        for h in hsms {
            let route = Route::Hsm(h.clone());
            match t {
                KeyType::Aes256 => {
                    let params = GcmParams {
                        iv: vec![5; 12],
                        aad: b"header".to_vec(),
                        tag_bits: 96,
                    };
                    let sealed = client
                        .encrypt_gcm(*id, params.clone(), b"record", &route)
                        .await
                        .unwrap_or_else(|e| panic!("GCM on {h} (key from {on}): {e}"));
                    let opened = client
                        .decrypt_gcm(*id, params, &sealed, &route)
                        .await
                        .unwrap_or_else(|e| panic!("GCM open on {h}: {e}"));
                    assert_eq!(opened.expose(), b"record");
                    same.push(sealed);
                }
                KeyType::Rsa2048 => {
                    let spki = client.public_key(*id, &route).await.expect("spki");
                    let pk = rsa::PublicKey::from_public_key_der(&spki).expect("rsa spki");
                    same.push(
                        client
                            .sign_digest(*id, DigestSignScheme::RsaPkcs1, &digest_info, &route)
                            .await
                            .unwrap_or_else(|e| panic!("RSA-PKCS on {h}: {e}")),
                    );
                    let sig = client
                        .sign_digest(*id, pss, &digest, &route)
                        .await
                        .unwrap_or_else(|e| panic!("PSS on {h}: {e}"));
                    rsa::pss::VerifyingKey::<sha2::Sha256>::new_with_salt_len(pk, 32)
                        .verify_prehash(
                            &digest,
                            &rsa::pss::Signature::try_from(&sig[..]).expect("sig"),
                        )
                        .unwrap_or_else(|e| panic!("PSS from {h} does not verify: {e}"));
                }
                KeyType::P256 => {
                    let spki = client.public_key(*id, &route).await.expect("spki");
                    let vk = p256::ecdsa::VerifyingKey::from_public_key_der(&spki).expect("spki");
                    let raw = client
                        .sign_digest(*id, DigestSignScheme::Ecdsa, &digest, &route)
                        .await
                        .unwrap_or_else(|e| panic!("ECDSA on {h}: {e}"));
                    let sig = p256::ecdsa::Signature::from_slice(&raw).expect("raw r||s");
                    vk.verify_prehash(&digest, &sig)
                        .unwrap_or_else(|e| panic!("ECDSA from {h} does not verify: {e}"));
                    // Sent as is (the SDK would refuse it first): the agent
                    // refuses a 31-byte digest as a counted bad request.
                    let before = client.health(h).await.expect("health");
                    let count = |hl: &keysync_schemas::AgentHealth| {
                        hl.rejected
                            .iter()
                            .find(|(r, _)| *r == RejectReason::BadRequest)
                            .map_or(0, |(_, n)| *n)
                    };
                    let reply = client
                        .request(
                            &route,
                            OpRequest::SignDigest {
                                key_id: *id,
                                scheme: DigestSignScheme::Ecdsa,
                                digest: digest[..31].to_vec(),
                            },
                        )
                        .await;
                    assert!(
                        matches!(reply, Err(keysync::Error::BadRequest(_))),
                        "{h}: {reply:?}"
                    );
                    let after = client.health(h).await.expect("health");
                    assert_eq!(count(&after), count(&before) + 1, "{h} counted it");
                }
                KeyType::Ed25519 => {}
            }
        }
        assert!(
            same.windows(2).all(|w| w[0] == w[1]),
            "{t} key from {on}: the HSMs disagree on a deterministic output"
        );
    }
}

fn openssl_verifies(public_der: &Path, sig: &Path, data: &Path) -> bool {
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-keyform", "DER", "-verify"])
        .arg(public_der)
        .arg("-signature")
        .arg(sig)
        .arg(data)
        .output()
        .expect("run openssl");
    println!(
        "openssl: {}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out.status.success()
}

const PYKCS11_CHECK: &str = r#"
import json, sys
import PyKCS11, PyKCS11.LowLevel
from PyKCS11.LowLevel import CKA_CLASS, CKA_ID, CKA_SENSITIVE, CKA_VALUE, CKA_PRIVATE_EXPONENT, CKO_PRIVATE_KEY, CKO_SECRET_KEY, CKR_ATTRIBUTE_SENSITIVE, CKR_OK
module, label, pin_file = sys.argv[1], sys.argv[2], sys.argv[3]
pin = open(pin_file).read().strip()
lib = PyKCS11.PyKCS11Lib()
lib.load(module)
slot = [s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.strip() == label][0]
session = lib.openSession(slot)
session.login(pin)
out = {}
for hexid in sys.argv[4:]:
    for o in session.findObjects([(CKA_ID, bytes.fromhex(hexid))]):
        if session.getAttributeValue(o, [CKA_CLASS])[0] not in (CKO_PRIVATE_KEY, CKO_SECRET_KEY):
            continue
        # The secret part: CKA_VALUE (EC, AES) or CKA_PRIVATE_EXPONENT
        # (RSA); the other is CKR_ATTRIBUTE_TYPE_INVALID.
        answers = []
        for attr in (CKA_VALUE, CKA_PRIVATE_EXPONENT):
            t = PyKCS11.LowLevel.ckattrlist(1)
            t[0].SetType(attr)
            answers.append(lib.lib.C_GetAttributeValue(session.session, o, t))
        value = "sensitive" if CKR_ATTRIBUTE_SENSITIVE in answers and CKR_OK not in answers else str(answers)
        out[hexid] = {"sensitive": bool(session.getAttributeValue(o, [CKA_SENSITIVE])[0]), "value": value}
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_cluster_of_tokens_and_an_embedded_hsm_converges_and_works_both_ways() {
    if !tools_present() {
        return;
    }
    let mut stack = mixed_stack().await;
    let client = stack.client().clone();
    let hsms: Vec<HsmId> = ["hsm-1", "hsm-2", "hsm-3"].map(hsm).to_vec();
    let (token_1, token_2, soft) = (&hsms[0], &hsms[1], &hsms[2]);

    // Every type each token can hold, made on each HSM, everywhere.
    let mut expected = BTreeMap::new();
    let mut made: Vec<(KeyType, HsmId, KeyId)> = Vec::new();
    for on in &hsms {
        for t in TYPES {
            let mut spec = CreateKey::new(t)
                .on(Route::Hsm(on.clone()))
                .durability(Durability::All);
            spec.label = Some(format!("{t} made on {on}"));
            let k = client
                .create_key(spec)
                .await
                .unwrap_or_else(|e| panic!("creating {t} on {on}: {e}"));
            assert_eq!(k.durability, Durability::All, "{t} on {on}");
            expected.insert(k.info.key_id, k.info.fingerprint);
            made.push((t, on.clone(), k.info.key_id));
        }
    }
    assert_converges(&client, &hsms, &expected, Duration::from_secs(30)).await;

    // AES-GCM across the kinds of HSM, both ways.
    for (t, on, id) in &made {
        if *t != KeyType::Aes256 {
            continue;
        }
        for (a, b) in [(token_1, soft), (soft, token_1), (token_2, soft)] {
            let sealed = client
                .encrypt(*id, b"across keystores", b"aad", &Route::Hsm(a.clone()))
                .await
                .unwrap_or_else(|e| panic!("encrypt on {a} (key made on {on}): {e}"));
            let plain = client
                .decrypt(*id, &sealed, b"aad", &Route::Hsm(b.clone()))
                .await
                .unwrap_or_else(|e| panic!("decrypt on {b} (key made on {on}): {e}"));
            assert_eq!(plain.expose(), b"across keystores");
        }
    }

    // Applications' operations (what libkeysync_pkcs11.so asks for) on
    // each kind of HSM, through the real agents: AES-GCM with the caller's
    // IV gives the same bytes on every HSM; RSA PKCS#1 v1.5 on a DigestInfo
    // the same signature; ECDSA and PSS on a digest verify with the public
    // key; a digest of the wrong length is refused and counted.
    applications_ops_agree(&client, &hsms, &made).await;

    // OpenSC signs with the clones in token 2; openssl verifies with the
    // public key read from the HSM that made the key.
    let dir = tempfile::tempdir().expect("dir");
    let message = dir.path().join("message");
    std::fs::write(&message, b"signed in token 2 by OpenSC").expect("write");
    let listing = pkcs11_tool(&stack, token_2.as_str(), &["--list-objects"]);
    let mut clones = Vec::new();
    for (t, on, id) in made.iter().filter(|(_, on, _)| on != token_2) {
        let hex_id = hex::encode(id.0.as_bytes());
        assert!(
            listing.contains(&format!("ID:         {hex_id}")),
            "pkcs11-tool does not list clone {hex_id} ({t} from {on}):\n{listing}"
        );
        clones.push(hex_id.clone());
        if !t.is_asymmetric() {
            continue;
        }
        let public = client
            .public_key(*id, &Route::Hsm(on.clone()))
            .await
            .expect("public key from the creating HSM");
        let public_der = dir.path().join(format!("{hex_id}.pub.der"));
        std::fs::write(&public_der, public).expect("write");
        let sig = dir.path().join(format!("{hex_id}.sig"));
        let input = dir.path().join(format!("{hex_id}.in"));
        let mechanism = match t {
            KeyType::P256 => {
                use sha2::Digest as _;
                let digest = sha2::Sha256::digest(std::fs::read(&message).expect("read"));
                std::fs::write(&input, digest).expect("write");
                "ECDSA"
            }
            _ => {
                std::fs::copy(&message, &input).expect("copy");
                "SHA256-RSA-PKCS"
            }
        };
        let mut args = vec![
            "--sign",
            "--id",
            &hex_id,
            "--mechanism",
            mechanism,
            "--input-file",
            input.to_str().expect("path"),
            "--output-file",
            sig.to_str().expect("path"),
        ];
        if *t == KeyType::P256 {
            args.extend(["--signature-format", "openssl"]);
        }
        pkcs11_tool(&stack, token_2.as_str(), &args);
        assert!(
            openssl_verifies(&public_der, &sig, &message),
            "openssl rejects OpenSC's {t} signature with clone {hex_id} (made on {on})"
        );
    }

    // PyKCS11: each clone's private or secret key is sensitive, its value
    // unreadable.
    let python = "/usr/bin/python3";
    let has_pykcs11 = Command::new(python)
        .args(["-c", "import PyKCS11"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_pykcs11 {
        let out = Command::new(python)
            .env("SOFTHSM2_CONF", stack.dir().join("softhsm/softhsm2.conf"))
            .args(["-c", PYKCS11_CHECK])
            .arg(softhsm::module().expect("module"))
            .arg(token_2.as_str())
            .arg(stack.dir().join("softhsm/pin"))
            .args(&clones)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "PyKCS11: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        println!("PyKCS11 on {token_2}: {report}");
        for c in &clones {
            assert_eq!(report[c]["sensitive"], true, "{c}: {report}");
            assert_eq!(report[c]["value"], "sensitive", "{c}: {report}");
        }
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have PyKCS11 (python3-pykcs11)"
        );
        println!("SKIPPED the PyKCS11 part: {python} cannot import PyKCS11");
    }

    // A token agent restarted comes back with its keys (journal + token).
    stack.kill_agent(token_1);
    stack
        .start_agents(std::slice::from_ref(token_1))
        .await
        .expect("restart the token agent");
    assert_converges(&client, &hsms, &expected, Duration::from_secs(30)).await;

    // Ed25519, which SoftHSM 2.6.1 cannot clone: refused on a token at
    // create, and made on the embedded HSM it is `all` at once (no member
    // able to hold it lacks it), never sent to the tokens, no failure.
    if softhsm_is_261() {
        let refused = client
            .create_key(CreateKey::new(KeyType::Ed25519).on(Route::Hsm(token_1.clone())))
            .await
            .expect_err("a token that cannot clone Ed25519 refuses to create one");
        println!("Ed25519 on {token_1}: {refused}");
        assert!(refused.to_string().contains("ed25519"), "{refused}");
        let ed = client
            .create_key(
                CreateKey::new(KeyType::Ed25519)
                    .on(Route::Hsm(soft.clone()))
                    .durability(Durability::All),
            )
            .await
            .expect("Ed25519 with durability all on the embedded HSM");
        assert_eq!(ed.durability, Durability::All);
        let status = client.cluster_status().await.expect("status");
        for m in &status.members {
            let want: &[KeyType] = if m.hsm_id == *soft {
                &[]
            } else {
                &[KeyType::Ed25519]
            };
            assert_eq!(m.cannot_hold, want, "{}", m.hsm_id);
            assert_eq!(m.lag, 0, "{}", m.hsm_id);
        }
        assert_eq!(status.clone_failures, 0);
        assert_eq!(status.below_durability, 0);
        for t in [token_1, token_2] {
            let held = keysync_testkit::inventory(&client, t).await;
            assert!(
                !held.contains_key(&ed.info.key_id),
                "{t} was sent an Ed25519 key"
            );
        }
        // The CLI shows it.
        let out =
            keysync_testkit::keysync_cli(&["--nats", &stack.url(), "cluster", "status", "--json"]);
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        let member = |id: &HsmId| {
            doc["members"]
                .as_array()
                .and_then(|ms| ms.iter().find(|m| m["hsm_id"] == id.as_str()))
                .cloned()
                .unwrap_or_else(|| panic!("{id} not in {doc}"))
        };
        assert_eq!(
            member(token_2)["cannot_hold"],
            serde_json::json!(["ed25519"]),
            "{doc}"
        );
        assert_eq!(member(soft)["cannot_hold"], serde_json::json!([]), "{doc}");
    }
    stack.shutdown().await;
}

fn softhsm_is_261() -> bool {
    Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "2.6.1")
}

/// `hsm-agent --keystore pkcs11` with `flags`; its exit status and stderr.
fn agent_refuses(stack_dir: &Path, flags: &[&str]) -> String {
    let data = tempfile::tempdir().expect("dir");
    let out = Command::new(keysync_testkit::find_binary("hsm-agent").expect("hsm-agent"))
        .env("SOFTHSM2_CONF", stack_dir.join("softhsm/softhsm2.conf"))
        // Nothing listens here: the agent must refuse before it needs NATS.
        .args([
            "--nats",
            "nats://127.0.0.1:1",
            "--id",
            "hsm-9",
            "--keystore",
            "pkcs11",
        ])
        .arg("--data-dir")
        .arg(data.path())
        .args(flags)
        .output()
        .expect("run hsm-agent");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "hsm-agent {flags:?} started: {stderr}"
    );
    assert!(
        !data
            .path()
            .join(hsm_agent::keystore::pkcs11::JOURNAL_FILE)
            .exists(),
        "a refused token got a journal"
    );
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_a_wrong_pin_token_module_or_domain_with_a_clear_message() {
    if !tools_present() {
        return;
    }
    let stack = DevStack::start(StackOptions {
        hsms: 1,
        softhsm_agents: vec!["hsm-1".into()],
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("stack did not start: {e}"));
    let dir = stack.dir().to_path_buf();
    let module = softhsm::module().expect("module");
    let module = module.to_str().expect("path");
    let pin = dir.join("softhsm/pin");
    let pin = pin.to_str().expect("path");
    let wrong_pin = dir.join("wrong-pin");
    keysync_security::secret_file::write_private(&wrong_pin, b"9999").expect("write");
    let wrong_pin = wrong_pin.to_str().expect("path");
    let domain = dir.join("domain.key");
    let domain = domain.to_str().expect("path");
    let other_domain = dir.join("other-domain.key");
    keysync_security::secret_file::write_private(&other_domain, hex::encode([7u8; 32]).as_bytes())
        .expect("write");
    let other_domain = other_domain.to_str().expect("path");
    let token = ["--pkcs11-token-label", "hsm-1"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            [
                &[
                    "--pkcs11-module",
                    module,
                    "--pkcs11-pin-file",
                    wrong_pin,
                    "--domain-key",
                    domain,
                ][..],
                &token[..],
            ]
            .concat(),
            "PIN",
        ),
        (
            vec![
                "--pkcs11-module",
                module,
                "--pkcs11-pin-file",
                pin,
                "--domain-key",
                domain,
                "--pkcs11-token-label",
                "no-such-token",
            ],
            "no-such-token",
        ),
        (
            [
                &[
                    "--pkcs11-module",
                    "/bin/true",
                    "--pkcs11-pin-file",
                    pin,
                    "--domain-key",
                    domain,
                ][..],
                &token[..],
            ]
            .concat(),
            "/bin/true",
        ),
        (
            [
                &[
                    "--pkcs11-module",
                    module,
                    "--pkcs11-pin-file",
                    pin,
                    "--domain-key",
                    other_domain,
                ][..],
                &token[..],
            ]
            .concat(),
            "domain",
        ),
        (
            [
                &["--pkcs11-module", module, "--pkcs11-pin-file", pin][..],
                &token[..],
            ]
            .concat(),
            "--domain-check-value",
        ),
    ];
    for (flags, says) in cases {
        // The token agent is running: these are second opinions on the
        // same tokens, refused before touching anything.
        let stderr = agent_refuses(&dir, &flags);
        println!("{flags:?}:\n{stderr}");
        assert!(
            stderr.contains(says),
            "{flags:?}: expected {says:?} in:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    stack.shutdown().await;
}
