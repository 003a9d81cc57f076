//! `keysync nats init|role-creds`: the NATS trust chain of a deployment
//! (operator, accounts, signing keys; docs/decisions/0016-nats-credentials.md),
//! and the per-agent credentials `keysync hsm enroll|token` mint and
//! `keysync hsm remove` revokes.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;
use keysync_security::nats_jwt::{self, AgentSigner, Deployment, Role};
use keysync_security::secret_file;

use super::Cli;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make a deployment's NATS trust chain in DIR: the operator and its
    /// signing key, the system and keysync accounts, the agents' scoped
    /// signing key, each role's credentials, and `resolver.conf` for every
    /// nats-server to include. Refuses a DIR that holds any of them.
    Init {
        /// Where to write (made 0700; secrets 0600).
        #[arg(long)]
        out: PathBuf,
        /// The operator's name.
        #[arg(long, default_value = "keysync")]
        operator_name: String,
    },
    /// Mint a new `.creds` for a role (rotation: install it, restart the
    /// role's processes, then `keysync nats revoke --creds OLD`).
    RoleCreds {
        /// orchestrator, client, auditor or operator.
        #[arg(long)]
        role: String,
        /// The keysync account's seed (`account.nk` from `keysync nats init`).
        #[arg(long)]
        account_key: PathBuf,
        /// Where to write the `.creds` (0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke the NATS user of a `.creds` file on every server (a role's
    /// old credentials after rotation, or a leaked file): its connections
    /// are closed and it no longer logs in.
    Revoke {
        /// The `.creds` file whose user to revoke.
        #[arg(long)]
        creds: PathBuf,
        /// The operator signing key's seed (`operator-signer.nk`).
        #[arg(long, env = "KEYSYNC_NATS_OPERATOR_SIGNER")]
        nats_operator_signer: PathBuf,
        /// The system account user's `.creds` (`creds/sys.creds`).
        #[arg(long, env = "KEYSYNC_NATS_SYSTEM_CREDS")]
        nats_system_creds: PathBuf,
    },
}

/// `keysync hsm enroll|token`: also hand the agent its NATS credentials.
#[derive(Debug, Clone, clap::Args)]
pub struct MintArgs {
    /// The agents' credential signer (`agent-signer.toml` from `keysync
    /// nats init`); with --nats-creds-out, writes the agent's `.creds`.
    #[arg(long, env = "KEYSYNC_NATS_SIGNER", requires = "nats_creds_out")]
    pub nats_signer: Option<PathBuf>,
    /// Where to write the agent's NATS `.creds` (0600; never overwritten):
    /// a user named after the HSM id, confined to that HSM's subjects.
    #[arg(long, requires = "nats_signer")]
    pub nats_creds_out: Option<PathBuf>,
}

/// `keysync hsm remove`: also revoke the agent's NATS credentials.
#[derive(Debug, Clone, clap::Args)]
pub struct RevokeArgs {
    /// The agents' credential signer (`agent-signer.toml`): names the
    /// agent's NATS user. With --nats-operator-signer and
    /// --nats-system-creds, the user is revoked on every NATS server.
    #[arg(
        long,
        env = "KEYSYNC_NATS_SIGNER",
        requires_all = ["nats_operator_signer", "nats_system_creds"]
    )]
    pub nats_signer: Option<PathBuf>,
    /// The operator signing key's seed (`operator-signer.nk`): re-signs the
    /// account with the revocation.
    #[arg(long, env = "KEYSYNC_NATS_OPERATOR_SIGNER", requires = "nats_signer")]
    pub nats_operator_signer: Option<PathBuf>,
    /// The system account user's `.creds` (`creds/sys.creds`): pushes the
    /// updated account to the servers.
    #[arg(long, env = "KEYSYNC_NATS_SYSTEM_CREDS", requires = "nats_signer")]
    pub nats_system_creds: Option<PathBuf>,
}

fn signer(path: &Path) -> anyhow::Result<AgentSigner> {
    let text = secret_file::read(path)
        .with_context(|| format!("agent credential signer {}", path.display()))?;
    AgentSigner::parse(&text).with_context(|| format!("agent credential signer {}", path.display()))
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    secret_file::create(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Writes agent `hsm`'s `.creds` if asked; returns where.
pub fn mint(args: &MintArgs, hsm: &str) -> anyhow::Result<Option<PathBuf>> {
    let (Some(s), Some(out)) = (&args.nats_signer, &args.nats_creds_out) else {
        return Ok(None);
    };
    let creds = signer(s)?.agent_creds(hsm)?;
    write_secret(out, &creds)?;
    Ok(Some(out.clone()))
}

/// Revokes agent `hsm`'s NATS user on the servers, if asked; returns its
/// public key.
pub async fn revoke(cli: &Cli, args: &RevokeArgs, hsm: &str) -> anyhow::Result<Option<String>> {
    let (Some(s), Some(op), Some(sys)) = (
        &args.nats_signer,
        &args.nats_operator_signer,
        &args.nats_system_creds,
    ) else {
        return Ok(None);
    };
    let signer = signer(s)?;
    let user = signer.agent_user(hsm)?.public_key();
    revoke_user(cli, &signer.account, &user, op, sys).await?;
    Ok(Some(user))
}

/// Revokes `user` of `account` on the servers as of now: re-signs the
/// account JWT they hold with the operator signer at `op` and pushes it as
/// the system user of `sys`.
async fn revoke_user(
    cli: &Cli,
    account: &str,
    user: &str,
    op: &Path,
    sys: &Path,
) -> anyhow::Result<()> {
    let operator_signer = nats_jwt::seed_key(
        &secret_file::read(op).with_context(|| format!("operator signer {}", op.display()))?,
    )?;
    let servers = keysync_telemetry::process::servers(&cli.nats).map_err(anyhow::Error::msg)?;
    let system_user = keysync_security::NatsAuth {
        nats_creds: Some(sys.to_path_buf()),
        nats_tls_ca: cli.auth.nats_tls_ca.clone(),
        nats_tls_cert: cli.auth.nats_tls_cert.clone(),
        nats_tls_key: cli.auth.nats_tls_key.clone(),
        ..Default::default()
    };
    let nats = system_user
        .apply(async_nats::ConnectOptions::new())
        .await
        .with_context(|| format!("system account creds {}", sys.display()))?
        .name("keysync-cli nats revoke")
        .connect(servers)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to NATS at {} as the system user: {e}",
                cli.nats
            )
        })?;
    let timeout = std::time::Duration::from_secs_f64(cli.timeout.max(0.5));
    let ask = |subject: String, payload: bytes::Bytes| {
        let nats = nats.clone();
        async move {
            tokio::time::timeout(timeout, nats.request(subject.clone(), payload))
                .await
                .map_err(|_| anyhow::anyhow!("no answer on {subject} within {timeout:?}"))?
                .map_err(|e| anyhow::anyhow!("{subject}: {e}"))
        }
    };
    let lookup = ask(
        format!("$SYS.REQ.ACCOUNT.{account}.CLAIMS.LOOKUP"),
        bytes::Bytes::new(),
    )
    .await?;
    let current = String::from_utf8_lossy(&lookup.payload).to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let updated = nats_jwt::revoke(&current, &operator_signer, user, now)
        .context("the account JWT the servers hold")?;
    let reply = ask("$SYS.REQ.CLAIMS.UPDATE".into(), updated.into()).await?;
    let answer: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
    if answer["data"]["code"].as_u64() != Some(200) {
        anyhow::bail!(
            "the NATS servers refused the account update: {}",
            String::from_utf8_lossy(&reply.payload)
        );
    }
    Ok(())
}

fn role_of(name: &str) -> anyhow::Result<Role> {
    Role::ALL
        .into_iter()
        .find(|r| r.name() == name)
        .ok_or_else(|| {
            anyhow::anyhow!("no role {name:?}: orchestrator, client, auditor or operator")
        })
}

pub async fn run(cli: &Cli, cmd: &Command) -> anyhow::Result<()> {
    match cmd {
        Command::Revoke {
            creds,
            nats_operator_signer,
            nats_system_creds,
        } => {
            let text =
                secret_file::read(creds).with_context(|| format!("creds {}", creds.display()))?;
            let jwt = nats_jwt::jwt_of_creds(&text)
                .with_context(|| format!("{} holds no user JWT", creds.display()))?;
            let claims = nats_jwt::decode(jwt)?;
            let user = claims["sub"]
                .as_str()
                .context("user JWT without a subject")?;
            let account = claims["nats"]["issuer_account"]
                .as_str()
                .or_else(|| claims["iss"].as_str())
                .context("user JWT without an issuer")?;
            revoke_user(cli, account, user, nats_operator_signer, nats_system_creds).await?;
            outln!("NATS user {user} revoked on the servers");
            Ok(())
        }
        Command::Init { out, operator_name } => {
            secret_file::create_private_dirs(&out.join("creds"))
                .with_context(|| format!("making {}", out.display()))?;
            let d = Deployment::new(operator_name)?;
            let seed = |k: &nkeys::KeyPair| k.seed().map(|s| format!("{s}\n"));
            // The public files first: a refused DIR fails before any secret
            // is written.
            write_secret(&out.join("resolver.conf"), &d.resolver_conf())?;
            write_secret(&out.join("operator.nk"), &seed(&d.operator)?)?;
            write_secret(&out.join("operator-signer.nk"), &seed(&d.operator_signer)?)?;
            write_secret(&out.join("system-account.nk"), &seed(&d.system_account)?)?;
            write_secret(&out.join("account.nk"), &seed(&d.account)?)?;
            write_secret(&out.join("agent-signer.toml"), &d.agent_signer_file()?)?;
            for role in Role::ALL {
                write_secret(
                    &out.join(format!("creds/{}.creds", role.name())),
                    &d.role_creds(role)?,
                )?;
            }
            write_secret(&out.join("creds/sys.creds"), &d.system_creds()?)?;
            outln!("NATS trust chain written to {}", out.display());
            outln!("  resolver.conf        include from every nats-server config");
            outln!("  creds/*.creds        one per role (orchestrator, client, auditor, operator) and sys");
            outln!("  agent-signer.toml    mints agents' creds (keysync hsm enroll|token --nats-signer)");
            outln!("  operator-signer.nk   re-signs the account (keysync hsm remove --nats-operator-signer)");
            outln!("  operator.nk, account.nk, system-account.nk: keep offline");
            Ok(())
        }
        Command::RoleCreds {
            role,
            account_key,
            out,
        } => {
            let role = role_of(role)?;
            let account = nats_jwt::seed_key(
                &secret_file::read(account_key)
                    .with_context(|| format!("account key {}", account_key.display()))?,
            )?;
            write_secret(out, &nats_jwt::role_creds(&account, role)?)?;
            outln!("{} credentials written to {}", role.name(), out.display());
            Ok(())
        }
    }
}
