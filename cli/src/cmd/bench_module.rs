//! `keysync bench`'s PKCS#11 module rows: what an application sees through
//! `libkeysync_pkcs11.so` (loaded here as any application loads it, with
//! cryptoki) beside the SDK: create-then-sign latency, and sign operations
//! per second at 1, 8 and 32 threads, each with its own session.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use keysync::{Client, CreateKey, Route};
use keysync_schemas::{Durability, KeyType};
use serde_json::json;

use super::bench::{histogram, pct};

/// The PIN the bench's module configuration accepts.
const PIN: &str = "bench-pin";
/// DER of the P-256 curve OID, as `CKA_EC_PARAMS` holds it.
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The module next to this binary (`target/<profile>/`), if built.
pub fn find_module() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let m = exe.parent()?.join("libkeysync_pkcs11.so");
    m.is_file().then_some(m)
}

fn login(ctx: &Pkcs11) -> anyhow::Result<Session> {
    let slot = *ctx
        .get_slots_with_token()?
        .first()
        .context("the module shows no token")?;
    let s = ctx.open_rw_session(slot)?;
    match s.login(UserType::User, Some(&AuthPin::new(PIN.into()))) {
        Ok(()) => {}
        Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(s)
}

/// A P-256 token key pair made through the module: (public, private).
fn keypair(s: &Session, label: &str) -> anyhow::Result<(ObjectHandle, ObjectHandle)> {
    let public = [
        Attribute::Token(true),
        Attribute::EcParams(P256_PARAMS.to_vec()),
        Attribute::Verify(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    let private = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Sign(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    Ok(s.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)?)
}

fn sign_rate(ctx: &Pkcs11, key_label: &str, threads: usize, for_: Duration) -> anyhow::Result<f64> {
    let start = Instant::now();
    let results: Vec<anyhow::Result<u64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<u64> {
                    let s = login(ctx)?;
                    let key = *s
                        .find_objects(&[
                            Attribute::Class(ObjectClass::PRIVATE_KEY),
                            Attribute::Label(key_label.as_bytes().to_vec()),
                        ])?
                        .first()
                        .context("the bench key is not found through the module")?;
                    let mut n = 0u64;
                    while start.elapsed() < for_ {
                        s.sign(&Mechanism::EcdsaSha256, key, b"keysync bench")?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a signing thread panicked")))
            })
            .collect()
    });
    let mut total = 0u64;
    for r in results {
        total += r?;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// The module's rows against the cluster at `nats_url`: create-then-sign
/// through the module and through the SDK (both `replicas:2`), and module
/// sign rates. Blocking calls run on their own threads.
pub async fn rows(
    module: &Path,
    nats_url: &str,
    client: &Client,
    cycles: usize,
    rate_for: Duration,
) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("keysync-pkcs11.toml");
    // It holds a user PIN: a secret file (0600, written whole).
    keysync_security::secret_file::write_private(
        &config,
        format!("nats = [\"{nats_url}\"]\nuser_pin = \"{PIN}\"\ndurability = \"replicas:2\"\n")
            .as_bytes(),
    )?;
    // Read at C_Initialize, below; nothing else in this process reads it.
    std::env::set_var("KEYSYNC_PKCS11_CONFIG", &config);

    // Through the SDK, the same work.
    let mut sdk = histogram()?;
    for _ in 0..cycles {
        let t = Instant::now();
        let k = client
            .create_key(CreateKey::new(KeyType::P256).durability(Durability::Replicas(2)))
            .await?;
        client
            .sign(k.info.key_id, b"keysync bench", &Route::Any)
            .await?;
        sdk.record((t.elapsed().as_micros() as u64).max(1))?;
    }

    let module = module.to_path_buf();
    let doc = tokio::task::spawn_blocking(move || -> anyhow::Result<serde_json::Value> {
        let ctx = Pkcs11::new(&module).with_context(|| module.display().to_string())?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
        let s = login(&ctx)?;
        let mut through = histogram()?;
        for i in 0..cycles {
            let t = Instant::now();
            let (_, private) = keypair(&s, &format!("bench-{i}"))?;
            s.sign(&Mechanism::EcdsaSha256, private, b"keysync bench")?;
            through.record((t.elapsed().as_micros() as u64).max(1))?;
        }
        keypair(&s, "bench-signer")?;
        let mut rates = serde_json::Map::new();
        for threads in [1usize, 8, 32] {
            let r = sign_rate(&ctx, "bench-signer", threads, rate_for)?;
            rates.insert(threads.to_string(), json!(r.round() as u64));
        }
        drop(s);
        Ok(json!({
            "cycles": cycles,
            "create_then_sign_module": pct(&through),
            "sign_per_s_by_threads": rates,
        }))
    })
    .await??;
    let mut doc = doc;
    doc["create_then_sign_sdk"] = pct(&sdk);
    Ok(doc)
}
