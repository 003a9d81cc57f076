//! `keysync hsm enroll|token|remove|cluster-key`: operators' enrollment
//! actions, signed with the cluster identity; `keysync hsm
//! provision-domain-key`: the ceremony that puts the cluster domain key
//! into a PKCS#11 token.

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
        #[arg(long, env = "KEYSYNC_IDENTITY", default_value = keysync_security::identity::DEFAULT_CLUSTER_IDENTITY)]
        identity: PathBuf,
        #[command(flatten)]
        creds: super::nats::MintArgs,
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
        #[arg(long, env = "KEYSYNC_IDENTITY", default_value = keysync_security::identity::DEFAULT_CLUSTER_IDENTITY)]
        identity: PathBuf,
        #[command(flatten)]
        creds: super::nats::MintArgs,
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
        #[arg(long, env = "KEYSYNC_IDENTITY", default_value = keysync_security::identity::DEFAULT_CLUSTER_IDENTITY)]
        identity: PathBuf,
        #[command(flatten)]
        nats_revoke: super::nats::RevokeArgs,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Print the cluster's public key (for agents' `--cluster-key`).
    ClusterKey {
        /// The cluster identity file.
        #[arg(long, env = "KEYSYNC_IDENTITY", default_value = keysync_security::identity::DEFAULT_CLUSTER_IDENTITY)]
        identity: PathBuf,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Put the cluster domain key into a PKCS#11 token (sensitive,
    /// non-extractable, wrap and unwrap only), so an agent can front it
    /// with `--keystore pkcs11`. Refuses a token that holds another domain
    /// key; running it again on a provisioned token changes nothing.
    /// Prints the check value agents are started with
    /// (`--domain-check-value`).
    ProvisionDomainKey {
        /// The cluster domain key file (`keysync cluster init`).
        #[arg(long, env = "KEYSYNC_DOMAIN_KEY")]
        domain_key: PathBuf,
        /// The PKCS#11 module (shared library).
        #[arg(long, env = "KEYSYNC_PKCS11_MODULE")]
        pkcs11_module: PathBuf,
        /// The token's label.
        #[arg(long, env = "KEYSYNC_PKCS11_TOKEN_LABEL")]
        pkcs11_token_label: String,
        /// A file holding the user PIN (mode 0600 or stricter).
        #[arg(long, env = "KEYSYNC_PKCS11_PIN_FILE")]
        pkcs11_pin_file: PathBuf,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// The provisioning ceremony (blocks on the token).
fn provision(
    domain_key: &std::path::Path,
    module: &std::path::Path,
    label: &str,
    pin_file: &std::path::Path,
) -> anyhow::Result<(hsm_agent::keystore::pkcs11::Provisioned, [u8; 32], String)> {
    use hsm_agent::keystore::pkcs11::{provision_domain_key, Token};
    use keysync_security::domain_key::DomainKey;
    let dk = DomainKey::load(domain_key)
        .with_context(|| format!("domain key file {}", domain_key.display()))?;
    let token = Token::open(module, label, pin_file).with_context(|| {
        format!(
            "opening PKCS#11 token {label:?} with module {}",
            module.display()
        )
    })?;
    let done = provision_domain_key(&token, &dk)
        .with_context(|| format!("provisioning the domain key into token {label:?}"))?;
    Ok((done, dk.check_value()?, dk.id().to_string()))
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
            creds,
            json,
        } => {
            let identity = load(identity)?;
            let nats = cli.nats("keysync-cli hsm").await?;
            let seq =
                keysync::admin::enroll(&nats, &cli.subjects()?, &identity, id, *pubkey).await?;
            let creds_out = super::nats::mint(creds, id.as_str())?;
            if *json {
                print_json(&json!({
                    "hsm_id": id.as_str(),
                    "pubkey": hex::encode(pubkey),
                    "seq": seq,
                    "nats_creds": creds_out.map(|p| p.display().to_string()),
                }))
            } else {
                outln!(
                    "enrolled {id} with key {} (event {seq})",
                    hex::encode(pubkey)
                );
                if let Some(p) = creds_out {
                    eprintln!(
                        "its NATS credentials: {} (agent: --nats-creds)",
                        p.display()
                    );
                }
                Ok(())
            }
        }
        Command::Token {
            id,
            ttl,
            identity,
            creds,
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
            let creds_out = super::nats::mint(creds, id.as_str())?;
            if *json {
                print_json(&json!({
                    "hsm_id": id.as_str(),
                    "token": token.encode().as_str(),
                    "ttl_secs": ttl,
                    "nats_creds": creds_out.map(|p| p.display().to_string()),
                }))
            } else {
                outln!("{}", token.encode().as_str());
                eprintln!("one-time join token for {id}, valid {ttl} s: start its agent with --join-token (or KEYSYNC_JOIN_TOKEN)");
                if let Some(p) = creds_out {
                    eprintln!(
                        "its NATS credentials: {} (agent: --nats-creds)",
                        p.display()
                    );
                }
                Ok(())
            }
        }
        Command::Remove {
            id,
            identity,
            nats_revoke,
            json,
        } => {
            let identity = load(identity)?;
            let nats = cli.nats("keysync-cli hsm").await?;
            let seq = keysync::admin::revoke(&nats, &cli.subjects()?, &identity, id).await?;
            // After the log's revocation, so a failure here leaves the HSM
            // removed from the cluster (its events refused) and the NATS
            // revocation to retry.
            let nats_user = super::nats::revoke(cli, nats_revoke, id.as_str())
                .await
                .with_context(|| {
                    format!("{id} is removed from the cluster, but its NATS user is not revoked yet; run the command again")
                })?;
            if *json {
                print_json(&json!({
                    "hsm_id": id.as_str(),
                    "removed": true,
                    "seq": seq,
                    "nats_user_revoked": nats_user,
                }))
            } else {
                outln!("removed {id}: key revoked, queued commands withdrawn (event {seq})");
                if let Some(u) = nats_user {
                    outln!("NATS user {u} revoked on the servers");
                }
                Ok(())
            }
        }
        Command::ClusterKey { identity, json } => {
            let key = load(identity)?.public_hex();
            if *json {
                return print_json(&json!({"cluster_key": key}));
            }
            outln!("{key}");
            Ok(())
        }
        Command::ProvisionDomainKey {
            domain_key,
            pkcs11_module,
            pkcs11_token_label,
            pkcs11_pin_file,
            json,
        } => {
            let (dk, module, label, pin) = (
                domain_key.clone(),
                pkcs11_module.clone(),
                pkcs11_token_label.clone(),
                pkcs11_pin_file.clone(),
            );
            let (done, check_value, domain) =
                tokio::task::spawn_blocking(move || provision(&dk, &module, &label, &pin))
                    .await??;
            let imported = done == hsm_agent::keystore::pkcs11::Provisioned::Imported;
            let cv = hex::encode(check_value);
            if *json {
                print_json(&json!({
                    "token_label": pkcs11_token_label,
                    "domain": domain,
                    "check_value": cv,
                    "imported": imported,
                }))
            } else {
                if imported {
                    outln!("domain key {domain} put into token {pkcs11_token_label:?}");
                } else {
                    outln!("token {pkcs11_token_label:?} already holds domain key {domain}; nothing changed");
                }
                outln!("check value: {cv}");
                eprintln!("start its agent with --keystore pkcs11 --domain-check-value {cv}");
                Ok(())
            }
        }
    }
}
