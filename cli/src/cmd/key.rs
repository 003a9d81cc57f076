//! `keysync key create|list|sign|public|info`.

use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use keysync::{CreateKey, Route};
use keysync_schemas::{Durability, HsmId, KeyId, KeyInfo, KeyType};
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
    /// Sign data; prints the signature in hex (ECDSA P-256 as DER, Ed25519 raw, RSA PKCS#1 v1.5).
    Sign {
        /// The key.
        key_id: KeyId,
        /// HSM to sign on (default: any).
        #[arg(long)]
        hsm: Option<HsmId>,
        /// The data, hex-encoded.
        #[arg(long)]
        data_hex: String,
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
    },
    /// Delete a key from every HSM (a tombstone; its material is purged from the log).
    Delete {
        /// The key.
        key_id: KeyId,
        /// HSM to ask (default: one known to hold it).
        #[arg(long)]
        hsm: Option<HsmId>,
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

/// A named HSM, or the replica-aware route (which falls back to any HSM
/// for keys it has not seen).
fn route(hsm: &Option<HsmId>) -> Route {
    hsm.clone().map_or(Route::ReplicaAware, Route::Hsm)
}

fn key_json(k: &KeyInfo) -> serde_json::Value {
    json!({
        "key_id": k.key_id.to_string(),
        "key_type": k.key_type.as_str(),
        "fingerprint": k.fingerprint.to_hex(),
        "hsm": k.hsm.as_str(),
        "session": k.session,
        "label": k.attributes.label,
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
            spec.session = *session;
            spec.durability_timeout = Duration::from_secs_f64(durability_timeout.max(0.0));
            let k = client.create_key(spec).await?;
            if *json {
                print_json(&json!({
                    "key_id": k.info.key_id.to_string(),
                    "key_type": k.info.key_type.as_str(),
                    "fingerprint": k.info.fingerprint.to_hex(),
                    "hsm": k.info.hsm.as_str(),
                    "durability": k.durability.to_string(),
                    "session": k.info.session,
                    "holders": k.holders.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
                    "created_seq": k.created_seq,
                }))
            } else {
                println!(
                    "{} {} on {} ({}), fingerprint {}",
                    k.info.key_id, k.info.key_type, k.info.hsm, k.durability, k.info.fingerprint
                );
                Ok(())
            }
        }
        Command::List { hsm, json } => {
            let keys = client.list_keys(hsm).await?;
            if *json {
                print_json(&serde_json::Value::Array(
                    keys.iter().map(key_json).collect(),
                ))
            } else {
                for k in &keys {
                    println!(
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
        } => {
            let data = hex::decode(data_hex.trim()).context("--data-hex is not valid hex")?;
            let sig = client.sign(*key_id, &data, &route(hsm)).await?;
            println!("{}", hex::encode(sig));
            Ok(())
        }
        Command::Public {
            key_id,
            hsm,
            der_hex,
            ..
        } => {
            let der = client.public_key(*key_id, &route(hsm)).await?;
            if *der_hex {
                println!("{}", hex::encode(der));
            } else {
                let pem =
                    pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, &der)
                        .map_err(|e| anyhow::anyhow!("PEM encoding failed: {e}"))?;
                print!("{pem}");
            }
            Ok(())
        }
        Command::Delete { key_id, hsm } => {
            let seq = client.delete_key(*key_id, &route(hsm)).await?;
            println!("{key_id} deleted (tombstone at stream sequence {seq}); every HSM erases it");
            Ok(())
        }
        Command::Info { key_id, hsm, json } => {
            let k = client.key_info(*key_id, &route(hsm)).await?;
            if *json {
                print_json(&key_json(&k))
            } else {
                println!(
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
