//! A whole local stack: NATS, orchestrators and agents, with the cluster's
//! domain key, identity and enrollments.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use keysync::{Client, ClientOptions};
use keysync_schemas::{HsmId, Subjects};
use keysync_security::{Identity, NatsAuth};

use crate::process::{command, Process};
use crate::{find_binary, find_nats_server, free_port, NatsServer, Result, StackError};

/// What stack to start.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Number of HSMs (`hsm-1` ... `hsm-N`).
    pub hsms: usize,
    /// Where everything lives; a temp dir (removed on drop) if `None`.
    pub data_dir: Option<PathBuf>,
    /// Subject prefix.
    pub subjects: Subjects,
    /// NATS port (of the first node); a free one if `None`.
    pub port: Option<u16>,
    /// A nats-server config file (`-c`); the stack's own flags (address,
    /// port) still override what it says, and the store dir comes to it as
    /// `$KEYSYNC_NATS_STORE_DIR`.
    pub nats_config: Option<PathBuf>,
    /// NATS nodes: 1, or 3 for a JetStream cluster (give a cluster config
    /// such as `deploy/nats/cluster-node.conf`; streams are then R3).
    pub nats_nodes: usize,
    /// Have the orchestrator serve Prometheus metrics here.
    pub orchestrator_metrics_addr: Option<std::net::SocketAddr>,
    /// Extra orchestrator flags (`--failure-timeout 2`, `--lease-ttl 1`, ...).
    pub orchestrator_args: Vec<String>,
    /// Extra agent flags (`--heartbeat-interval 0.5`, ...).
    pub agent_args: Vec<String>,
    /// NATS credentials per role (none by default).
    pub auth: StackAuth,
    /// HSM ids whose agents front a SoftHSM2 token (`--keystore pkcs11`)
    /// instead of the embedded keystore; the stack makes the tokens and
    /// provisions the domain key into them (see [`crate::softhsm`]).
    pub softhsm_agents: Vec<String>,
    /// Extra environment for every nats-server (a config's `$VARS`, such
    /// as `KEYSYNC_NATS_RESOLVER_DIR` for `keysync nats init`'s resolver).
    pub nats_env: Vec<(String, String)>,
    /// Start the orchestrators and agents from TOML config files
    /// (`--config <dir>/config/<name>.toml`) holding the options the
    /// harness would otherwise pass as flags, credentials included, as a
    /// service unit does; extra args stay flags (they override the file).
    pub config_files: bool,
    /// More orchestrators to start, as standbys, after the first one
    /// (their names).
    pub standby_orchestrators: Vec<String>,
}

/// NATS credentials for each process of a stack.
#[derive(Debug, Clone, Default)]
pub struct StackAuth {
    /// The orchestrators'.
    pub orchestrator: NatsAuth,
    /// The stack's own client (status, enrollment: the operator's role).
    pub operator: NatsAuth,
    /// Each agent's, by HSM id.
    pub agents: BTreeMap<String, NatsAuth>,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            hsms: 3,
            data_dir: None,
            subjects: Subjects::default(),
            port: None,
            nats_config: None,
            nats_nodes: 1,
            orchestrator_metrics_addr: None,
            orchestrator_args: Vec::new(),
            agent_args: Vec::new(),
            auth: StackAuth::default(),
            softhsm_agents: Vec::new(),
            nats_env: Vec::new(),
            config_files: false,
            standby_orchestrators: Vec::new(),
        }
    }
}

/// A running local stack.
pub struct DevStack {
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    nats: Vec<NatsServer>,
    orchestrators: BTreeMap<String, Process>,
    agents: BTreeMap<HsmId, Process>,
    domain_key: PathBuf,
    subjects: Subjects,
    client: Client,
    orchestrator_args: Vec<String>,
    agent_args: Vec<String>,
    /// The tokens of the agents that front SoftHSM2 (none: all embedded).
    softhsm: Option<crate::softhsm::SoftHsmTokens>,
    auth: StackAuth,
    cluster_identity: PathBuf,
    cluster_key: String,
    config_files: bool,
}

/// A process's options: written to a config file or passed as flags.
struct Settings(Vec<(&'static str, String)>);

impl Settings {
    fn push(&mut self, key: &'static str, value: impl ToString) -> &mut Self {
        self.0.push((key, value.to_string()));
        self
    }

    /// Adds the options to `cmd`: in `file` (TOML, keys as the long
    /// options with `_`) named by `--config`, or as flags.
    fn apply(&self, cmd: &mut std::process::Command, file: Option<PathBuf>) -> Result<()> {
        match file {
            Some(file) => {
                let mut text = String::from("# written by the keysync harness\n");
                for (k, v) in &self.0 {
                    // A TOML basic string: JSON's string escaping is valid TOML.
                    let quoted = serde_json::to_string(v).map_err(|e| {
                        StackError::Io(file.display().to_string(), std::io::Error::other(e))
                    })?;
                    text.push_str(&format!("{k} = {quoted}\n"));
                }
                if let Some(dir) = file.parent() {
                    keysync_security::secret_file::create_private_dirs(dir).map_err(|e| {
                        StackError::Io(
                            dir.display().to_string(),
                            std::io::Error::other(e.to_string()),
                        )
                    })?;
                }
                keysync_security::secret_file::write_private(&file, text.as_bytes()).map_err(
                    |e| {
                        StackError::Io(
                            file.display().to_string(),
                            std::io::Error::other(e.to_string()),
                        )
                    },
                )?;
                cmd.arg("--config").arg(&file);
            }
            None => {
                for (k, v) in &self.0 {
                    cmd.arg(format!("--{}", k.replace('_', "-"))).arg(v);
                }
            }
        }
        Ok(())
    }

    /// NATS credentials (and TLS) as options.
    fn auth(&mut self, auth: &NatsAuth) -> &mut Self {
        let paths = [
            ("nats_creds", &auth.nats_creds),
            ("nats_nkey", &auth.nats_nkey),
            ("nats_tls_ca", &auth.nats_tls_ca),
            ("nats_tls_cert", &auth.nats_tls_cert),
            ("nats_tls_key", &auth.nats_tls_key),
        ];
        for (k, v) in paths {
            if let Some(p) = v {
                self.push(k, p.display());
            }
        }
        if let Some(u) = &auth.nats_user {
            self.push("nats_user", u);
        }
        if let Some(p) = &auth.nats_password {
            self.push("nats_password", p);
        }
        if let Some(p) = &auth.inbox_prefix {
            self.push("inbox_prefix", p);
        }
        self
    }
}

/// The first orchestrator's name.
pub const PRIMARY: &str = "orchestrator";

async fn start_nats(dir: &Path, opts: &StackOptions) -> Result<Vec<NatsServer>> {
    let bin = find_nats_server()?;
    let config_args = match &opts.nats_config {
        Some(c) => vec!["-c".to_string(), c.display().to_string()],
        None => Vec::new(),
    };
    if opts.nats_nodes <= 1 {
        return Ok(vec![
            NatsServer::start_with(
                bin,
                &dir.join("nats"),
                opts.port,
                config_args,
                opts.nats_env.clone(),
            )
            .await?,
        ]);
    }
    // A cluster that did not form (JetStream cannot place a replicated
    // stream) is started again on fresh ports and stores: a node whose
    // route port another process took meanwhile, or a meta group that never
    // elected a leader, is the harness's fault, not the system's under test.
    let mut last = None;
    for attempt in 0..3 {
        let nodes = start_cluster(&bin, dir, opts, &config_args, attempt).await?;
        match cluster_forms(&nodes, opts).await {
            Ok(()) => return Ok(nodes),
            Err(e) => {
                eprintln!(
                    "the {}-node NATS cluster did not form (attempt {}): {e}; starting it again",
                    nodes.len(),
                    attempt + 1
                );
                last = Some(e);
            }
        }
    }
    Err(StackError::NotReady {
        what: "NATS cluster".into(),
        detail: last.unwrap_or_default(),
    })
}

/// Whether JetStream on `nodes` can place an R3 (all-node) stream within
/// 30 s: a probe stream in memory, created and deleted.
async fn cluster_forms(
    nodes: &[NatsServer],
    opts: &StackOptions,
) -> std::result::Result<(), String> {
    let urls: Vec<async_nats::ServerAddr> =
        nodes.iter().filter_map(|n| n.url().parse().ok()).collect();
    // As the orchestrator: the role that may create streams.
    let client = opts
        .auth
        .orchestrator
        .apply(async_nats::ConnectOptions::new())
        .await
        .map_err(|e| e.to_string())?
        .connect(urls)
        .await
        .map_err(|e| e.to_string())?;
    let js = async_nats::jetstream::new(client);
    let probe = async_nats::jetstream::stream::Config {
        name: "KEYSYNC_HARNESS_CLUSTER_PROBE".into(),
        subjects: vec!["keysync-harness.cluster-probe".into()],
        num_replicas: nodes.len(),
        storage: async_nats::jetstream::stream::StorageType::Memory,
        ..Default::default()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        match js.create_stream(probe.clone()).await {
            Ok(_) => {
                let _ = js.delete_stream(&probe.name).await;
                return Ok(());
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!(
        "no R{} stream could be placed within 30 s: {last}",
        nodes.len()
    ))
}

/// Starts the nodes of one cluster attempt, each routing to every other.
async fn start_cluster(
    bin: &Path,
    dir: &Path,
    opts: &StackOptions,
    config_args: &[String],
    attempt: usize,
) -> Result<Vec<NatsServer>> {
    // A JetStream cluster: every node routes to every other.
    let cluster_ports: Vec<u16> = (0..opts.nats_nodes)
        .map(|_| free_port())
        .collect::<Result<_>>()?;
    let mut nodes = Vec::new();
    for i in 0..opts.nats_nodes {
        let routes: Vec<String> = cluster_ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
            .collect();
        let mut env = vec![
            ("KEYSYNC_NATS_NAME".to_string(), format!("n{}", i + 1)),
            (
                "KEYSYNC_NATS_CLUSTER_LISTEN".to_string(),
                format!("127.0.0.1:{}", cluster_ports[i]),
            ),
        ];
        for (j, r) in routes.iter().enumerate() {
            env.push((format!("KEYSYNC_NATS_ROUTE_{}", j + 1), r.clone()));
        }
        env.extend(opts.nats_env.iter().cloned());
        let port = if i == 0 { opts.port } else { None };
        // Servers of a forming cluster do not wait for each other to be
        // ready: start them all, then wait.
        let node_dir = match attempt {
            0 => dir.join(format!("nats-{}", i + 1)),
            n => dir.join(format!("nats-{}.{n}", i + 1)),
        };
        nodes.push((node_dir, port, env));
    }
    let started = futures::future::join_all(nodes.into_iter().map(|(d, port, env)| {
        let bin = bin.to_path_buf();
        let args = config_args.to_vec();
        async move { NatsServer::start_with(bin, &d, port, args, env).await }
    }))
    .await;
    started.into_iter().collect()
}

impl DevStack {
    /// Starts nats-server, the orchestrator and `hsms` agents, and waits
    /// until the orchestrator sees every agent.
    pub async fn start(opts: StackOptions) -> Result<Self> {
        let (dir, temp) = match &opts.data_dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("keysync-")
                    .tempdir()
                    .map_err(|e| StackError::Io("temp dir".into(), e))?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        // The stack dir holds the domain key, the cluster identity, the
        // agents' data dirs and the NATS store: private (0700), narrowed
        // if an existing `--data-dir` is open to others.
        let io_error = |d: &Path, e: keysync_security::secret_file::SecretFileError| {
            StackError::Io(
                d.display().to_string(),
                std::io::Error::other(e.to_string()),
            )
        };
        keysync_security::secret_file::private_dir(&dir).map_err(|e| io_error(&dir, e))?;
        let logs = dir.join("logs");
        keysync_security::secret_file::create_private_dirs(&logs)
            .map_err(|e| io_error(&logs, e))?;
        let domain_key = dir.join("domain.key");
        if !domain_key.exists() {
            hsm_domain_key_file(&domain_key)?;
        }
        // The cluster identity: the orchestrators sign with it, agents are
        // given its public key, the stack enrolls agents with it.
        let cluster_identity = dir.join("cluster.key");
        let cluster_key = Identity::load_or_create(&cluster_identity)
            .map_err(|e| {
                StackError::Io(
                    cluster_identity.display().to_string(),
                    std::io::Error::other(e.to_string()),
                )
            })?
            .0
            .public_hex();
        let softhsm = if opts.softhsm_agents.is_empty() {
            None
        } else {
            let ids = opts
                .softhsm_agents
                .iter()
                .map(|i| {
                    HsmId::new(i.as_str()).map_err(|e| StackError::NotReady {
                        what: format!("SoftHSM2 agent {i}"),
                        detail: e.to_string(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Some(crate::softhsm::SoftHsmTokens::make(
                &dir,
                &domain_key,
                &ids,
            )?)
        };
        let nats = start_nats(&dir, &opts).await?;
        let urls: Vec<async_nats::ServerAddr> =
            nats.iter().filter_map(|n| n.url().parse().ok()).collect();
        let nats_client = opts
            .auth
            .operator
            .apply_as(async_nats::ConnectOptions::new(), "operator")
            .await
            .map_err(|e| StackError::NotReady {
                what: "nats credentials".into(),
                detail: e.to_string(),
            })?
            .name("keysync dev stack")
            .retry_on_initial_connect()
            .connect(urls)
            .await
            .map_err(|e| StackError::NotReady {
                what: "nats-server".into(),
                detail: e.to_string(),
            })?;
        let client = Client::from_nats(
            nats_client,
            ClientOptions {
                subjects: opts.subjects.clone(),
                name: "keysync-dev".into(),
                auth: opts.auth.operator.clone(),
                ..Default::default()
            },
        )
        .await;
        let mut orchestrator_args = opts.orchestrator_args.clone();
        if let Some(a) = opts.orchestrator_metrics_addr {
            orchestrator_args.extend(["--metrics-addr".to_string(), a.to_string()]);
        }
        if nats.len() > 1 {
            orchestrator_args.extend(["--replicas".to_string(), "3".to_string()]);
        }
        let mut stack = DevStack {
            dir,
            _temp: temp,
            nats,
            orchestrators: BTreeMap::new(),
            agents: BTreeMap::new(),
            domain_key,
            subjects: opts.subjects,
            client,
            orchestrator_args,
            agent_args: opts.agent_args,
            softhsm,
            auth: opts.auth,
            cluster_identity,
            cluster_key,
            config_files: opts.config_files,
        };
        stack.start_orchestrator().await?;
        for name in &opts.standby_orchestrators {
            stack.start_orchestrator_named(name).await?;
        }
        let ids: Vec<HsmId> = (1..=opts.hsms)
            .filter_map(|i| HsmId::new(format!("hsm-{i}")).ok())
            .collect();
        stack.start_agents(&ids).await?;
        stack.wait_for_members(ids.len()).await?;
        Ok(stack)
    }

    /// The NATS URL(s), comma-separated for a cluster.
    pub fn url(&self) -> String {
        self.nats
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The stack's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The domain key file.
    pub fn domain_key(&self) -> &Path {
        &self.domain_key
    }

    /// A client connected to the stack.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The (first) nats-server.
    pub fn nats(&mut self) -> &mut NatsServer {
        &mut self.nats[0]
    }

    /// NATS node `i` (0-based).
    pub fn nats_node(&mut self, i: usize) -> Option<&mut NatsServer> {
        self.nats.get_mut(i)
    }

    /// Ids of agents started (running or killed).
    pub fn hsm_ids(&self) -> Vec<HsmId> {
        self.agents.keys().cloned().collect()
    }

    /// An agent's process, if started.
    pub fn agent(&mut self, id: &HsmId) -> Option<&mut Process> {
        self.agents.get_mut(id)
    }

    /// An orchestrator's process, if started.
    pub fn orchestrator(&mut self, name: &str) -> Option<&mut Process> {
        self.orchestrators.get_mut(name)
    }

    /// Every process of the stack with a role name and its pid: each
    /// nats-server node, orchestrator and agent (for accounting what the
    /// stack costs, e.g. the bench's CPU per replicated key).
    pub fn processes(&self) -> Vec<(String, u32)> {
        let nats = self.nats.iter().enumerate().map(|(i, n)| {
            let name = if self.nats.len() > 1 {
                format!("nats-server-{}", i + 1)
            } else {
                "nats-server".to_string()
            };
            (name, n.process.pid())
        });
        let orchestrators = self
            .orchestrators
            .iter()
            .map(|(name, p)| (format!("orchestrator {name}"), p.pid()));
        let agents = self
            .agents
            .iter()
            .map(|(id, p)| (format!("agent {id}"), p.pid()));
        nats.chain(orchestrators).chain(agents).collect()
    }

    fn common_settings(&self) -> Settings {
        let mut s = Settings(Vec::new());
        s.push("nats", self.url())
            .push("prefix", self.subjects.prefix());
        s
    }

    /// Where a process's config file goes, in config-file mode.
    fn config_file(&self, name: &str) -> Option<PathBuf> {
        self.config_files
            .then(|| self.dir.join("config").join(format!("{name}.toml")))
    }

    /// Sets an agent's NATS credentials (for its next start).
    pub fn set_agent_auth(&mut self, id: &HsmId, auth: NatsAuth) {
        self.auth.agents.insert(id.to_string(), auth);
    }

    /// The NATS credentials processes of the stack use.
    pub fn auth(&self) -> &StackAuth {
        &self.auth
    }

    /// Starts (or restarts) the primary orchestrator and waits until it answers.
    pub async fn start_orchestrator(&mut self) -> Result<()> {
        self.start_orchestrator_named(PRIMARY).await
    }

    /// Starts (or restarts) an orchestrator named `name` (a second one is
    /// a standby until the lease comes free) and waits until it answers.
    pub async fn start_orchestrator_named(&mut self, name: &str) -> Result<()> {
        if let Some(mut old) = self.orchestrators.remove(name) {
            old.kill();
        }
        let mut cmd = command(&find_binary("orchestrator")?);
        let mut settings = self.common_settings();
        settings
            .push("name", name)
            .push("identity", self.cluster_identity.display());
        if self.config_files {
            settings.auth(&self.auth.orchestrator);
        } else {
            cmd.envs(self.auth.orchestrator.to_env());
        }
        settings.apply(&mut cmd, self.config_file(name))?;
        cmd.args(&self.orchestrator_args);
        let mut p = Process::spawn(
            &format!("orchestrator {name}"),
            cmd,
            self.dir.join(format!("logs/{name}.log")),
        )?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if tokio::time::timeout(Duration::from_secs(1), self.client.cluster_status())
                .await
                .is_ok_and(|r| r.is_ok())
            {
                break;
            }
            if !p.is_running() {
                return Err(p.not_ready("exited"));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(p.not_ready("no status reply within 60 s"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.orchestrators.insert(name.to_string(), p);
        Ok(())
    }

    /// Replaces the extra orchestrator flags (for the next start).
    pub fn set_orchestrator_args(&mut self, args: Vec<String>) {
        self.orchestrator_args = args;
    }

    /// SIGKILLs the primary orchestrator.
    pub fn kill_orchestrator(&mut self) {
        self.kill_orchestrator_named(PRIMARY);
    }

    /// SIGKILLs one orchestrator.
    pub fn kill_orchestrator_named(&mut self, name: &str) {
        if let Some(mut p) = self.orchestrators.remove(name) {
            p.kill();
        }
    }

    /// The cluster identity file (the orchestrators' `--identity`).
    pub fn cluster_identity(&self) -> &Path {
        &self.cluster_identity
    }

    /// The cluster's public key in hex (the agents' `--cluster-key`).
    pub fn cluster_key(&self) -> &str {
        &self.cluster_key
    }

    /// An agent's identity file.
    pub fn agent_identity(&self, id: &HsmId) -> PathBuf {
        self.dir.join(id.as_str()).join("identity.key")
    }

    /// Enrolls an agent (making its identity file if it has none yet), as
    /// an operator would with `keysync hsm enroll`; nothing if it is
    /// enrolled with that key already.
    pub async fn enroll(&self, id: &HsmId) -> Result<()> {
        let io = |what: &Path, e: &dyn std::fmt::Display| {
            StackError::Io(
                what.display().to_string(),
                std::io::Error::other(e.to_string()),
            )
        };
        let path = self.agent_identity(id);
        let agent = Identity::load_or_create(&path)
            .map_err(|e| io(&path, &e))?
            .0;
        let key = agent.public_key();
        if let Ok(s) = self.client.cluster_status().await {
            if s.enrolled.iter().any(|(h, k)| h == id && *k == key) {
                return Ok(());
            }
        }
        let cluster =
            Identity::load(&self.cluster_identity).map_err(|e| io(&self.cluster_identity, &e))?;
        keysync::admin::enroll(self.client.nats(), &self.subjects, &cluster, id, key)
            .await
            .map_err(|e| StackError::NotReady {
                what: format!("enrollment of {id}"),
                detail: e.to_string(),
            })?;
        Ok(())
    }

    /// Enrolls and starts (or restarts) agents and waits for each one's
    /// `HsmJoined`.
    pub async fn start_agents(&mut self, ids: &[HsmId]) -> Result<()> {
        for id in ids {
            self.enroll(id).await?;
        }
        self.start_agents_with(ids, &[]).await
    }

    /// Starts (or restarts) agents as they are (enrolled or not), with
    /// extra flags, and waits for each one's `HsmJoined`.
    pub async fn start_agents_with(&mut self, ids: &[HsmId], extra: &[String]) -> Result<()> {
        let mut joined = Vec::new();
        for id in ids {
            if let Some(mut old) = self.agents.remove(id) {
                old.kill();
            }
            // Subscribe before spawning so the announcement cannot be missed.
            let sub = self
                .client
                .nats()
                .subscribe(self.subjects.hsm_joined(id))
                .await
                .map_err(|e| StackError::NotReady {
                    what: format!("hsm-agent {id}"),
                    detail: e.to_string(),
                })?;
            self.client
                .nats()
                .flush()
                .await
                .map_err(|e| StackError::NotReady {
                    what: format!("hsm-agent {id}"),
                    detail: e.to_string(),
                })?;
            let mut cmd = command(&find_binary("hsm-agent")?);
            let mut settings = self.common_settings();
            settings
                .push("id", id.as_str())
                .push("data_dir", self.dir.join(id.as_str()).display())
                .push("cluster_key", &self.cluster_key);
            let softhsm = matches!(&self.softhsm, Some(t) if t.fronts(id));
            if !softhsm {
                settings.push("domain_key", self.domain_key.display());
            }
            let auth = self
                .auth
                .agents
                .get(id.as_str())
                .cloned()
                .unwrap_or_default();
            if self.config_files {
                settings.auth(&auth);
            } else {
                cmd.envs(auth.to_env());
            }
            settings.apply(&mut cmd, self.config_file(id.as_str()))?;
            if let Some(tokens) = self.softhsm.as_ref().filter(|t| t.fronts(id)) {
                tokens.agent(id, &mut cmd);
            }
            cmd.args(&self.agent_args).args(extra);
            let p = Process::spawn(
                &format!("hsm-agent {id}"),
                cmd,
                self.dir.join(format!("logs/{id}.log")),
            )?;
            self.agents.insert(id.clone(), p);
            joined.push((id.clone(), sub));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for (id, mut sub) in joined {
            loop {
                match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
                    Ok(Some(_)) => break,
                    // A closed subscription answers at once, forever: fail
                    // rather than spin until the deadline.
                    Ok(None) => {
                        return Err(StackError::NotReady {
                            what: format!("hsm-agent {id}"),
                            detail: "the HsmJoined subscription closed".into(),
                        })
                    }
                    Err(_) => {}
                }
                let p = self
                    .agents
                    .get_mut(&id)
                    .ok_or_else(|| StackError::NoBinary(id.to_string()))?;
                if !p.is_running() {
                    return Err(p.not_ready("exited"));
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(p.not_ready("no HsmJoined within 60 s"));
                }
            }
        }
        Ok(())
    }

    /// SIGKILLs one agent (its store stays for a restart).
    pub fn kill_agent(&mut self, id: &HsmId) {
        if let Some(p) = self.agents.get_mut(id) {
            p.kill();
        }
    }

    /// Waits until the orchestrator counts `n` members.
    pub async fn wait_for_members(&self, n: usize) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = self.client.cluster_status().await {
                if s.members.len() >= n {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(StackError::NotReady {
                    what: "orchestrator".into(),
                    detail: format!("did not see {n} members within 30 s"),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops everything gracefully: agents and orchestrators together
    /// (SIGTERM, then SIGKILL after a 5 s grace), then NATS. Async, so a
    /// runtime worker is never blocked waiting for a child.
    pub async fn shutdown(mut self) {
        let grace = Duration::from_secs(5);
        futures::future::join_all(
            self.agents
                .values_mut()
                .chain(self.orchestrators.values_mut())
                .map(|p| p.terminate(grace)),
        )
        .await;
        futures::future::join_all(self.nats.iter_mut().map(|n| n.process.terminate(grace))).await;
    }
}

/// Writes a new domain key file (the format is defined once, in
/// `keysync_security::domain_key`).
fn hsm_domain_key_file(path: &Path) -> Result<()> {
    keysync_security::domain_key::DomainKey::create_file(path)
        .map(drop)
        .map_err(|e| {
            StackError::Io(
                path.display().to_string(),
                std::io::Error::other(e.to_string()),
            )
        })
}
