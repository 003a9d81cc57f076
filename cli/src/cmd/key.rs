//! `keysync key create|list|sign|public|info`.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use keysync::{Client, CreateKey, Route};
use keysync_schemas::{Durability, HsmId, KeyId, KeyInfo, KeyStanding, KeyType};
use serde_json::json;

use super::{print_json, Cli};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a token key on one HSM (or any).
    Create {
        /// Key type: p256, ed25519, aes256 or rsa2048.
        #[arg(long = "type")]
        key_type: KeyType,
        /// HSM to create it on (default: any).
        #[arg(long)]
        hsm: Option<HsmId>,
        /// none | logged | replicas:N | all.
        #[arg(long, default_value = "logged")]
        durability: Durability,
        /// A label (at most 128 bytes).
        #[arg(long)]
        label: Option<String>,
        /// The application's own id for the key, in hex (PKCS#11 `CKA_ID`,
        /// 1 to 64 bytes): carried to every HSM, found by the PKCS#11
        /// module's searches.
        #[arg(long, value_parser = parse_app_id)]
        app_id: Option<AppId>,
        /// A session key: never synced, gone when its HSM restarts.
        #[arg(long)]
        session: bool,
        /// Seconds to wait for replicas:N or all.
        #[arg(long, default_value_t = 10.0)]
        durability_timeout: f64,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Every key one HSM holds.
    List {
        /// The HSM.
        #[arg(long)]
        hsm: HsmId,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Sign data; prints the signature in hex (ECDSA P-256 over SHA-256 as
    /// DER, Ed25519 raw, RSA PKCS#1 v1.5 with SHA-256), or writes it as
    /// bytes with --out, as `openssl dgst -verify` / `pkeyutl -verify` read it.
    Sign {
        /// The key.
        key_id: KeyId,
        /// HSM to sign on (default: any).
        #[arg(long)]
        hsm: Option<HsmId>,
        /// The data, hex-encoded.
        #[arg(long, value_parser = parse_hex, required_unless_present = "data_file", conflicts_with = "data_file")]
        data_hex: Option<Data>,
        /// Read the data from this file (`-`: standard input).
        #[arg(long, value_parser = read_data)]
        data_file: Option<Data>,
        /// Write the signature's bytes to this file instead of hex on stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// The public key (SPKI).
    Public {
        /// The key.
        key_id: KeyId,
        /// HSM to ask (default: any).
        #[arg(long)]
        hsm: Option<HsmId>,
        /// PEM, as openssl reads it (the default).
        #[arg(long)]
        pem: bool,
        /// Print the DER in hex instead of PEM.
        #[arg(long, conflicts_with = "pem")]
        der_hex: bool,
        /// One JSON document on stdout (PEM and DER in hex).
        #[arg(long, conflicts_with_all = ["pem", "der_hex"])]
        json: bool,
    },
    /// Delete a key from every HSM (a tombstone; its material is purged from the log).
    Delete {
        /// The key.
        key_id: KeyId,
        /// HSM to ask (default: one known to hold it).
        #[arg(long)]
        hsm: Option<HsmId>,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// One key's metadata.
    Info {
        /// The key.
        key_id: KeyId,
        /// HSM to ask (default: any).
        #[arg(long)]
        hsm: Option<HsmId>,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// Data to sign, from `--data-hex` or `--data-file`.
#[derive(Debug, Clone)]
pub struct Data(Vec<u8>);

/// `--data-hex`: bad hex is a bad argument (exit 2), like any other.
fn parse_hex(s: &str) -> Result<Data, String> {
    hex::decode(s.trim())
        .map(Data)
        .map_err(|e| format!("not hex ({e}); give the data as hex digits, or use --data-file FILE"))
}

/// `--data-file`: a file that cannot be read is a bad argument (exit 2).
fn read_data(path: &str) -> Result<Data, String> {
    let read = if path == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).map(|_| buf)
    } else {
        std::fs::read(path)
    };
    read.map(Data)
        .map_err(|e| format!("cannot read {path}: {e}"))
}

/// How long an operation on an `--hsm` the cluster status does not list
/// still gets to answer: a status can lag an HSM that just joined (its
/// join not folded yet), and a live agent answers well within this.
const NOT_A_MEMBER_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs a key operation, refusing at once an `--hsm` that is not a member
/// (asked of the orchestrator while the operation runs, so a member costs
/// nothing extra), and turning "not found" into what the log says: no
/// such key, deleted, or not yet replicated to the HSM asked.
async fn guarded<T>(
    client: &Client,
    hsm: Option<&HsmId>,
    key: Option<KeyId>,
    op: impl Future<Output = keysync::Result<T>>,
) -> anyhow::Result<T> {
    let result = match hsm {
        None => op.await,
        Some(h) => {
            tokio::pin!(op);
            let status = client.cluster_status();
            tokio::pin!(status);
            tokio::select! {
                r = &mut op => r,
                s = &mut status => {
                    match s.as_ref().map(|s| check_member(s, h)) {
                        // The orchestrator has not (yet) folded this HSM's
                        // join: an agent that is up answers its operation
                        // within milliseconds, so give it that long before
                        // believing the status over the HSM itself.
                        Ok(Err(not_member)) => {
                            match tokio::time::timeout(NOT_A_MEMBER_GRACE, &mut op).await {
                                Ok(r) => r,
                                Err(_) => return Err(not_member),
                            }
                        }
                        _ => op.await,
                    }
                }
            }
        }
    };
    match result {
        Ok(v) => Ok(v),
        Err(e) => Err(explain(client, hsm, key, e).await),
    }
}

/// An error for an `--hsm` that names no member of the cluster.
pub fn check_member(s: &keysync_schemas::ClusterStatus, hsm: &HsmId) -> anyhow::Result<()> {
    let member = s.members.iter().find(|m| &m.hsm_id == hsm);
    match member {
        Some(m) if m.state == keysync_schemas::MemberState::Removed => anyhow::bail!(
            "HSM {hsm} was removed from this cluster (keysync hsm remove); see `keysync cluster status` for its members"
        ),
        Some(_) => Ok(()),
        None => {
            let mut ids: Vec<&str> = s.members.iter().map(|m| m.hsm_id.as_str()).collect();
            ids.sort_unstable();
            anyhow::bail!(
                "no HSM {hsm} in this cluster (members: {}); see `keysync cluster status`",
                if ids.is_empty() { "none yet".to_string() } else { ids.join(", ") }
            )
        }
    }
}

/// What a failed key operation means, with what the orchestrator knows.
async fn explain(
    client: &Client,
    hsm: Option<&HsmId>,
    key: Option<KeyId>,
    e: keysync::Error,
) -> anyhow::Error {
    match (&e, hsm, key) {
        (keysync::Error::HsmUnavailable { .. }, Some(h), _) => {
            if let Ok(s) = client.cluster_status().await {
                if let Err(not_member) = check_member(&s, h) {
                    return not_member;
                }
            }
            e.into()
        }
        (keysync::Error::KeyNotFound { .. }, Some(h), Some(key_id)) => {
            match client.key_status(key_id).await.map(|s| s.standing) {
                Ok(KeyStanding::Unknown) => keysync::Error::NoSuchKey { key_id }.into(),
                Ok(KeyStanding::Deleted) => keysync::Error::KeyDeleted { key_id }.into(),
                Ok(KeyStanding::Live) => anyhow::anyhow!(
                    "key {key_id} is not on HSM {h} yet: the cluster's log has it, so it is not yet replicated there; ask again, or without --hsm"
                ),
                Err(why) => anyhow::anyhow!(
                    "{e} (whether the cluster has it is unknown: the orchestrator did not answer: {why})"
                ),
            }
        }
        _ => e.into(),
    }
}

/// A named HSM, or the replica-aware route (which falls back to any HSM
/// for keys it has not seen).
fn route(hsm: &Option<HsmId>) -> Route {
    hsm.clone().map_or(Route::ReplicaAware, Route::Hsm)
}

/// An application's key id given as hex on the command line.
#[derive(Debug, Clone)]
pub struct AppId(Vec<u8>);

fn parse_app_id(s: &str) -> Result<AppId, String> {
    let bytes = hex::decode(s).map_err(|e| {
        format!("--app-id {s:?} is not hex ({e}); give the bytes as hex digits, e.g. 0102")
    })?;
    if bytes.is_empty() || bytes.len() > keysync_schemas::MAX_APP_ID_BYTES {
        return Err(format!(
            "--app-id is {} bytes; give 1 to {} bytes",
            bytes.len(),
            keysync_schemas::MAX_APP_ID_BYTES
        ));
    }
    Ok(AppId(bytes))
}

/// One key. `hsm_id` is the name every command's JSON uses for an HSM;
/// `hsm` is kept, the same value, for the contract's first readers.
fn key_json(k: &KeyInfo) -> serde_json::Value {
    json!({
        "key_id": k.key_id.to_string(),
        "key_type": k.key_type.as_str(),
        "fingerprint": k.fingerprint.to_hex(),
        "hsm_id": k.hsm.as_str(),
        "hsm": k.hsm.as_str(),
        "session": k.session,
        "label": k.attributes.label,
        "app_id": k.attributes.app_id_hex(),
    })
}

pub async fn run(cli: &Cli, cmd: &Command) -> anyhow::Result<()> {
    let client = cli.client().await?;
    match cmd {
        Command::Create {
            key_type,
            hsm,
            durability,
            label,
            app_id,
            session,
            durability_timeout,
            json,
        } => {
            let mut spec = CreateKey::new(*key_type)
                .on(hsm.clone().map_or(Route::Any, Route::Hsm))
                .durability(*durability);
            if !matches!(durability, Durability::None | Durability::Logged)
                && client.cluster_size().await.is_ok_and(|n| n == 1)
            {
                eprintln!(
                    "warning: the cluster has one HSM; no durability above logged can be met (the key lives on one HSM and in the log)"
                );
            }
            spec.label = label.clone();
            spec.app_id = app_id.as_ref().map(|a| a.0.clone());
            spec.session = *session;
            spec.durability_timeout = Duration::from_secs_f64(durability_timeout.max(0.0));
            let k = guarded(&client, hsm.as_ref(), None, client.create_key(spec)).await?;
            if *json {
                print_json(&json!({
                    "key_id": k.info.key_id.to_string(),
                    "key_type": k.info.key_type.as_str(),
                    "fingerprint": k.info.fingerprint.to_hex(),
                    "hsm_id": k.info.hsm.as_str(),
                    "hsm": k.info.hsm.as_str(),
                    "durability": k.durability.to_string(),
                    "session": k.info.session,
                    "label": k.info.attributes.label,
                    "app_id": k.info.attributes.app_id_hex(),
                    "holders": k.holders.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
                    "created_seq": k.created_seq,
                }))
            } else {
                outln!(
                    "{} {} on {} ({}), fingerprint {}",
                    k.info.key_id,
                    k.info.key_type,
                    k.info.hsm,
                    k.durability,
                    k.info.fingerprint
                );
                Ok(())
            }
        }
        Command::List { hsm, json } => {
            let keys = guarded(&client, Some(hsm), None, client.list_keys(hsm)).await?;
            if *json {
                print_json(&serde_json::Value::Array(
                    keys.iter().map(key_json).collect(),
                ))
            } else {
                for k in &keys {
                    outln!(
                        "{}  {:<8} {}{}",
                        k.key_id,
                        k.key_type.as_str(),
                        k.fingerprint,
                        if k.session { "  (session)" } else { "" }
                    );
                }
                Ok(())
            }
        }
        Command::Sign {
            key_id,
            hsm,
            data_hex,
            data_file,
            out,
            json,
        } => {
            let Some(Data(data)) = data_hex.as_ref().or(data_file.as_ref()) else {
                anyhow::bail!("give the data with --data-hex or --data-file");
            };
            let sig = guarded(
                &client,
                hsm.as_ref(),
                Some(*key_id),
                client.sign(*key_id, data, &route(hsm)),
            )
            .await?;
            if let Some(path) = out {
                std::fs::write(path, &sig)
                    .with_context(|| format!("writing the signature to {}", path.display()))?;
            }
            if *json {
                print_json(&json!({
                    "key_id": key_id.to_string(),
                    "signature": hex::encode(&sig),
                    "bytes": sig.len(),
                    "out": out.as_ref().map(|p| p.display().to_string()),
                }))
            } else {
                match out {
                    Some(path) => eprintln!(
                        "signature ({} bytes) written to {}",
                        sig.len(),
                        path.display()
                    ),
                    None => outln!("{}", hex::encode(sig)),
                }
                Ok(())
            }
        }
        Command::Public {
            key_id,
            hsm,
            der_hex,
            json,
            ..
        } => {
            let der = guarded(
                &client,
                hsm.as_ref(),
                Some(*key_id),
                client.public_key(*key_id, &route(hsm)),
            )
            .await?;
            let pem = pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, &der)
                .map_err(|e| anyhow::anyhow!("PEM encoding failed: {e}"))?;
            if *json {
                print_json(&json!({
                    "key_id": key_id.to_string(),
                    "pem": pem,
                    "der_hex": hex::encode(&der),
                }))
            } else {
                if *der_hex {
                    outln!("{}", hex::encode(der));
                } else {
                    out!("{pem}");
                }
                Ok(())
            }
        }
        Command::Delete { key_id, hsm, json } => {
            let seq = guarded(
                &client,
                hsm.as_ref(),
                Some(*key_id),
                client.delete_key(*key_id, &route(hsm)),
            )
            .await?;
            if *json {
                print_json(&json!({"key_id": key_id.to_string(), "deleted": true, "seq": seq}))
            } else {
                outln!(
                    "{key_id} deleted (tombstone at stream sequence {seq}); every HSM erases it"
                );
                Ok(())
            }
        }
        Command::Info { key_id, hsm, json } => {
            let k = guarded(
                &client,
                hsm.as_ref(),
                Some(*key_id),
                client.key_info(*key_id, &route(hsm)),
            )
            .await?;
            if *json {
                print_json(&key_json(&k))
            } else {
                outln!(
                    "{} {} on {}, fingerprint {}{}",
                    k.key_id,
                    k.key_type,
                    k.hsm,
                    k.fingerprint,
                    if k.session { " (session)" } else { "" }
                );
                Ok(())
            }
        }
    }
}
