//! `keysync cluster init|status`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::json;

use super::{print_json, Cli};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new cluster domain key (mode 0600; never overwrites).
    Init {
        /// Where to write the key.
        #[arg(long)]
        domain_key_out: PathBuf,
        /// Also make the cluster identity here (Ed25519, mode 0600, never
        /// overwritten): the key both orchestrators (`--identity`) and the
        /// operators' `keysync hsm` commands sign with. Prints its public
        /// key (the agents' `--cluster-key`).
        #[arg(long)]
        identity_out: Option<PathBuf>,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Members, their states, key counts and lag, as the orchestrator sees them.
    Status {
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cli: &Cli, cmd: &Command) -> anyhow::Result<()> {
    match cmd {
        Command::Init {
            domain_key_out,
            identity_out,
            json,
        } => {
            // The identity first: it refuses an existing file before the
            // domain key is made.
            let identity = identity_out
                .as_deref()
                .map(|path| {
                    keysync_security::Identity::create_file(path).with_context(|| {
                        format!("creating the cluster identity {}", path.display())
                    })
                })
                .transpose()?;
            let key = keysync_security::domain_key::DomainKey::create_file(domain_key_out)
                .context("creating the domain key")?;
            if *json {
                return print_json(&json!({
                    "domain": key.id().to_string(),
                    "domain_key_file": domain_key_out.display().to_string(),
                    "identity_file": identity_out.as_ref().map(|p| p.display().to_string()),
                    "cluster_key": identity.as_ref().map(|i| i.public_hex()),
                }));
            }
            outln!(
                "domain key {} written to {} (mode 0600). Give this file to every hsm-agent of the cluster (--domain-key), and to nothing else.",
                key.id(),
                domain_key_out.display()
            );
            if let (Some(identity), Some(path)) = (identity, identity_out) {
                outln!(
                    "cluster identity written to {} (mode 0600): give it to both orchestrators (--identity) and to operators' keysync hsm commands.",
                    path.display()
                );
                outln!(
                    "cluster key (agents' --cluster-key): {}",
                    identity.public_hex()
                );
            }
            Ok(())
        }
        Command::Status { json } => {
            let s = cli.client().await?.cluster_status().await?;
            if *json {
                print_json(&json!({
                    "members": s.members.iter().map(|m| json!({
                        "hsm_id": m.hsm_id.as_str(),
                        "state": m.state.as_str(),
                        "keys": m.keys,
                        "lag": m.lag,
                        "cannot_hold": m.cannot_hold.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                    "keys": s.keys,
                    "replicated": s.replicated,
                    "pending_clones": s.pending_clones,
                    "clone_failures": s.clone_failures,
                    "below_durability": s.below_durability,
                    "last_seq": s.last_seq,
                    "rejected": s.rejected.iter().map(|(r, n)| (r.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
                }))
            } else {
                outln!(
                    "{:<16} {:<11} {:>8} {:>8}  CANNOT HOLD",
                    "HSM",
                    "STATE",
                    "KEYS",
                    "LAG"
                );
                for m in &s.members {
                    let cannot: Vec<&str> = m.cannot_hold.iter().map(|t| t.as_str()).collect();
                    outln!(
                        "{:<16} {:<11} {:>8} {:>8}  {}",
                        m.hsm_id.as_str(),
                        m.state.as_str(),
                        m.keys,
                        m.lag,
                        if cannot.is_empty() {
                            "-".to_string()
                        } else {
                            cannot.join(",")
                        }
                    );
                }
                outln!(
                    "keys {}  replicated {}  pending clones {}  clone failures {}  log seq {}",
                    s.keys,
                    s.replicated,
                    s.pending_clones,
                    s.clone_failures,
                    s.last_seq
                );
                for (reason, n) in &s.rejected {
                    outln!("rejected {reason}: {n}");
                }
                Ok(())
            }
        }
    }
}
