//! `keysync hsm enroll|token|remove|cluster-key`: operators' enrollment
//! actions, signed with the cluster identity.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use keysync_schemas::HsmId;
use keysync_security::Identity;
use serde_json::json;

use super::{print_json, Cli};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enroll an HSM's agent identity key: from then on its events are
    /// accepted and it is sent keys.
    Enroll {
        /// The HSM id.
        #[arg(long)]
        id: HsmId,
        /// The agent's public key (64 hex digits; the agent logs it at start).
        #[arg(long, value_parser = keysync_security::parse_public_key)]
        pubkey: [u8; 32],
        /// The cluster identity file (the orchestrators' `--identity`).
        #[arg(long, env = "KEYSYNC_IDENTITY", default_value = "keysync-cluster.key")]
        identity: PathBuf,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Issue a one-time join token for an HSM (start its agent with
    /// `--join-token`). Only the token's public half is logged.
    Token {
        /// The HSM id.
        #[arg(long)]
        id: HsmId,
        /// Seconds the token stays valid.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// The cluster identity file.
        #[arg(long, env = "KEYSYNC_IDENTITY", default_value = "keysync-cluster.key")]
        identity: PathBuf,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Remove an HSM: revoke its key, withdraw its queued commands; it is
    /// no member until enrolled again.
    Remove {
        /// The HSM id.
        #[arg(long)]
        id: HsmId,
        /// The cluster identity file.
        #[arg(long, env = "KEYSYNC_IDENTITY", default_value = "keysync-cluster.key")]
        identity: PathBuf,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Print the cluster's public key (for agents' `--cluster-key`).
    ClusterKey {
        /// The cluster identity file.
        #[arg(long, env = "KEYSYNC_IDENTITY", default_value = "keysync-cluster.key")]
        identity: PathBuf,
    },
}

fn load(path: &std::path::Path) -> anyhow::Result<Identity> {
    Identity::load(path).with_context(|| format!("cluster identity {}", path.display()))
}

pub async fn run(cli: &Cli, cmd: &Command) -> anyhow::Result<()> {
    match cmd {
        Command::Enroll {
            id,
            pubkey,
            identity,
            json,
        } => {
            let identity = load(identity)?;
            let nats = cli.nats("keysync-cli hsm").await?;
            let seq =
                keysync::admin::enroll(&nats, &cli.subjects()?, &identity, id, *pubkey).await?;
            if *json {
                print_json(
                    &json!({"hsm_id": id.as_str(), "pubkey": hex::encode(pubkey), "seq": seq}),
                )
            } else {
                println!(
                    "enrolled {id} with key {} (event {seq})",
                    hex::encode(pubkey)
                );
                Ok(())
            }
        }
        Command::Token {
            id,
            ttl,
            identity,
            json,
        } => {
            let identity = load(identity)?;
            let nats = cli.nats("keysync-cli hsm").await?;
            let token = keysync::admin::issue_token(
                &nats,
                &cli.subjects()?,
                &identity,
                id,
                Duration::from_secs(*ttl),
            )
            .await?;
            if *json {
                print_json(
                    &json!({"hsm_id": id.as_str(), "token": token.encode().as_str(), "ttl_secs": ttl}),
                )
            } else {
                println!("{}", token.encode().as_str());
                eprintln!("one-time join token for {id}, valid {ttl} s: start its agent with --join-token (or KEYSYNC_JOIN_TOKEN)");
                Ok(())
            }
        }
        Command::Remove { id, identity, json } => {
            let identity = load(identity)?;
            let nats = cli.nats("keysync-cli hsm").await?;
            let seq = keysync::admin::revoke(&nats, &cli.subjects()?, &identity, id).await?;
            if *json {
                print_json(&json!({"hsm_id": id.as_str(), "removed": true, "seq": seq}))
            } else {
                println!("removed {id}: key revoked, queued commands withdrawn (event {seq})");
                Ok(())
            }
        }
        Command::ClusterKey { identity } => {
            println!("{}", load(identity)?.public_hex());
            Ok(())
        }
    }
}
