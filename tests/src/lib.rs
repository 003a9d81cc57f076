//! Test support for keysync's integration tests.
//!
//! The processes are real: [`keysync_harness`] spawns `nats-server` on a
//! free port with a temp JetStream store and its own log, and the real
//! `orchestrator` and `hsm-agent` binaries, observes readiness (log line,
//! answered request, `HsmJoined`), and kills everything on drop. This crate
//! adds what tests need on top: inventories, convergence waits, counting
//! events in the stream, and running the `keysync` CLI.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which
//! the README's test command does); they are found next to the test binary.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use keysync::{Client, CreateKey, CreatedKey, Route};
pub use keysync_harness::{find_binary, DevStack, StackOptions};
use keysync_schemas::{Fingerprint, HsmId, KeyId, KeyType};

/// An HSM id from a literal.
pub fn hsm(id: &str) -> HsmId {
    HsmId::new(id).unwrap_or_else(|e| panic!("bad test HSM id: {e}"))
}

/// Starts a stack of `hsms` HSMs in a temp dir, panicking with the logs'
/// tails if it does not come up.
pub async fn start_stack(hsms: usize) -> DevStack {
    match DevStack::start(StackOptions {
        hsms,
        ..Default::default()
    })
    .await
    {
        Ok(s) => s,
        Err(e) => panic!("stack did not start: {e}"),
    }
}

/// Options for fault tests: failure detection, heartbeats and the lease
/// sped up so that faults play out in seconds.
pub fn fast_options(hsms: usize) -> StackOptions {
    StackOptions {
        hsms,
        orchestrator_args: ["--failure-timeout", "1.5", "--lease-ttl", "1"]
            .map(String::from)
            .to_vec(),
        agent_args: ["--heartbeat-interval", "0.25"].map(String::from).to_vec(),
        ..Default::default()
    }
}

/// `deploy/<path>` in this repository (the configs the tests exercise).
pub fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// A user of `deploy/nats/secure.conf`, with its development password.
pub fn secure_user(name: &str) -> keysync_security::NatsAuth {
    keysync_security::NatsAuth::user(name, &format!("{name}-dev-secret"))
}

/// `opts` on `deploy/nats/secure.conf`, each process logged in as its role
/// (`orchestrator`, `operator` for the stack's own client, `hsm-<i>` for
/// each agent).
pub fn on_secure_config(mut opts: StackOptions) -> StackOptions {
    opts.nats_config = Some(deploy("nats/secure.conf"));
    opts.auth = keysync_harness::StackAuth {
        orchestrator: secure_user("orchestrator"),
        operator: secure_user("operator"),
        agents: (1..=opts.hsms)
            .map(|i| (format!("hsm-{i}"), secure_user(&format!("hsm-{i}"))))
            .collect(),
    };
    opts
}

/// Starts a stack with [`fast_options`].
pub async fn start_fast_stack(hsms: usize) -> DevStack {
    match DevStack::start(fast_options(hsms)).await {
        Ok(s) => s,
        Err(e) => panic!("stack did not start: {e}"),
    }
}

/// Waits until the orchestrator reports `hsm` in `state` (e.g. "failed").
pub async fn wait_for_state(client: &Client, hsm: &HsmId, state: &str, timeout: Duration) {
    let ok = wait_until(timeout, || async {
        client.cluster_status().await.is_ok_and(|s| {
            s.members
                .iter()
                .any(|m| &m.hsm_id == hsm && m.state.as_str() == state)
        })
    })
    .await;
    let status = client.cluster_status().await;
    assert!(ok, "{hsm} never reached state {state}: {status:?}");
}

/// Creates `n` keys concurrently on the given HSMs (round robin), retrying
/// each create that fails for a transient reason (the bus restarting)
/// until `deadline`; returns every key created.
pub async fn create_many(
    client: &Client,
    on: &[HsmId],
    n: usize,
    in_flight: usize,
) -> BTreeMap<KeyId, Fingerprint> {
    create_many_counted(client, on, n, in_flight, &Progress::default()).await
}

/// What a load in flight has done so far, for tests that stage a fault
/// mid-load and must show it really was mid-load.
#[derive(Debug, Default, Clone)]
pub struct Progress {
    /// Creates that succeeded.
    pub created: Arc<AtomicUsize>,
    /// Create attempts that failed for a transient reason and were retried.
    pub retried: Arc<AtomicUsize>,
}

impl Progress {
    /// Creates that succeeded so far.
    pub fn created(&self) -> usize {
        self.created.load(Ordering::SeqCst)
    }

    /// Transient failures retried so far.
    pub fn retried(&self) -> usize {
        self.retried.load(Ordering::SeqCst)
    }
}

/// [`create_many`], counting into `progress` as it goes.
pub async fn create_many_counted(
    client: &Client,
    on: &[HsmId],
    n: usize,
    in_flight: usize,
    progress: &Progress,
) -> BTreeMap<KeyId, Fingerprint> {
    use futures::StreamExt;
    let types = [KeyType::Ed25519, KeyType::P256, KeyType::Aes256];
    futures::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            let hsm = on[i % on.len()].clone();
            let progress = progress.clone();
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                loop {
                    match client
                        .create_key(
                            CreateKey::new(types[i % types.len()]).on(Route::Hsm(hsm.clone())),
                        )
                        .await
                    {
                        Ok(k) => {
                            progress.created.fetch_add(1, Ordering::SeqCst);
                            return (k.info.key_id, k.info.fingerprint);
                        }
                        Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                            progress.retried.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("create {i} on {hsm}: {e}"),
                    }
                }
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await
}

/// Waits until `n` signed heartbeats of `hsm` have been published after
/// this call (each one is a round of the orchestrator's liveness and
/// anti-entropy checks for that HSM).
pub async fn wait_for_heartbeats(client: &Client, hsm: &HsmId, n: usize, timeout: Duration) {
    use futures::StreamExt;
    let mut sub = client
        .nats()
        .subscribe(client.subjects().heartbeat(hsm))
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    let seen = tokio::time::timeout(timeout, sub.by_ref().take(n).count())
        .await
        .unwrap_or_else(|_| panic!("fewer than {n} heartbeats from {hsm} within {timeout:?}"));
    assert_eq!(seen, n, "the heartbeat subscription ended");
}

/// The latest metrics document a plain subscriber sees next.
pub async fn next_metrics(client: &Client) -> serde_json::Value {
    use futures::StreamExt;
    let mut sub = client
        .nats()
        .subscribe(client.subjects().metrics_sync())
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap_or_else(|_| panic!("no metrics within 10 s"))
        .unwrap_or_else(|| panic!("metrics subscription ended"));
    serde_json::from_slice(&msg.payload).unwrap_or_else(|e| panic!("metrics JSON: {e}"))
}

/// Starts a stack of `hsms` HSMs whose orchestrator serves Prometheus
/// metrics; returns it with the metrics port.
pub async fn start_stack_with_metrics(hsms: usize) -> (DevStack, u16) {
    let port = keysync_harness::free_port().unwrap_or_else(|e| panic!("{e}"));
    let stack = DevStack::start(StackOptions {
        hsms,
        orchestrator_metrics_addr: Some(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("stack did not start: {e}"));
    (stack, port)
}

pub use keysync_harness::scrape_metrics;

/// `GET path` on 127.0.0.1:`port`: the status code and the body, if
/// anything answered.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// A command found on `PATH` (as `which` would), if any.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// `promtool`, for the tests that check metrics and alert rules with it.
/// `None` (the caller skips, saying so) when it is missing outside CI; in
/// CI (`CI` set) a missing promtool fails the test.
pub fn promtool() -> Option<PathBuf> {
    let found = on_path("promtool");
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing in CI (scripts/install-deps installs it)"
        );
        println!("SKIPPED: promtool is not installed (scripts/install-deps installs it)");
    }
    found
}

/// Runs `promtool` with `args` and `stdin`; returns whether it exited 0 and
/// what it printed (stdout and stderr).
pub fn run_promtool(promtool: &std::path::Path, args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(promtool)
        .args(args)
        .current_dir(deploy(""))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running promtool: {e}"));
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.as_bytes())
            .unwrap_or_else(|e| panic!("writing to promtool: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("promtool: {e}"));
    let mut printed = String::from_utf8_lossy(&out.stdout).into_owned();
    printed.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), printed)
}

/// The value of one sample (`name{labels}` exactly as served) in
/// Prometheus text, if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Token keys one HSM holds, with fingerprints.
pub async fn inventory(client: &Client, hsm: &HsmId) -> BTreeMap<KeyId, Fingerprint> {
    client
        .list_keys(hsm)
        .await
        .unwrap_or_else(|e| panic!("listing keys on {hsm}: {e}"))
        .into_iter()
        .filter(|k| !k.session)
        .map(|k| (k.key_id, k.fingerprint))
        .collect()
}

/// Waits until every HSM in `hsms` holds exactly `expected`; panics with
/// what differs after `timeout`.
pub async fn assert_converges(
    client: &Client,
    hsms: &[HsmId],
    expected: &BTreeMap<KeyId, Fingerprint>,
    timeout: Duration,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    for h in hsms {
        loop {
            let inv = inventory(client, h).await;
            if &inv == expected {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                let missing = expected.keys().filter(|k| !inv.contains_key(k)).count();
                let extra = inv.keys().filter(|k| !expected.contains_key(k)).count();
                let differing = expected
                    .iter()
                    .filter(|(k, fp)| inv.get(k).is_some_and(|f| f != *fp))
                    .count();
                panic!(
                    "{h} did not converge in {timeout:?}: holds {}, expected {}; {missing} missing, {extra} extra, {differing} with another fingerprint",
                    inv.len(),
                    expected.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the orchestrator reports `replicated` keys replicated and no
/// clone pending (it has folded every key's last result), or `timeout`.
pub async fn wait_settled(client: &Client, replicated: u64, timeout: Duration) -> bool {
    wait_until(timeout, || async {
        client
            .cluster_status()
            .await
            .is_ok_and(|s| s.replicated == replicated && s.pending_clones == 0)
    })
    .await
}

/// Creates a key, panicking on failure.
pub async fn create(client: &Client, key_type: KeyType, on: &HsmId) -> CreatedKey {
    client
        .create_key(CreateKey::new(key_type).on(Route::Hsm(on.clone())))
        .await
        .unwrap_or_else(|e| panic!("creating a {key_type} key on {on}: {e}"))
}

/// Messages stored in the events stream under a subject filter.
pub async fn count_events(client: &Client, filter: &str) -> u64 {
    let js = async_nats::jetstream::new(client.nats().clone());
    let stream = js
        .get_stream(client.subjects().events_stream())
        .await
        .unwrap_or_else(|e| panic!("events stream: {e}"));
    let mut subjects = stream
        .info_with_subjects(filter)
        .await
        .unwrap_or_else(|e| panic!("stream info: {e}"));
    let mut total = 0;
    while let Some((_, n)) = subjects
        .try_next()
        .await
        .unwrap_or_else(|e| panic!("stream subjects: {e}"))
    {
        total += n as u64;
    }
    total
}

/// Every message of stream `stream` under `filter` ("" for all), in
/// order: an ordered consumer read to the end.
pub async fn stored_messages(
    client: &Client,
    stream: &str,
    filter: &str,
) -> Vec<async_nats::jetstream::Message> {
    use async_nats::jetstream::consumer::pull;
    use futures::StreamExt;
    let js = async_nats::jetstream::new(client.nats().clone());
    let s = js
        .get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("stream {stream}: {e}"));
    let consumer = s
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter.to_string(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("consumer on {stream}: {e}"));
    let mut out = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return out;
    }
    let mut msgs = consumer
        .messages()
        .await
        .unwrap_or_else(|e| panic!("reading {stream}: {e}"));
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(10), msgs.next()).await {
        let m = m.unwrap_or_else(|e| panic!("reading {stream}: {e}"));
        let pending = m.info().map(|i| i.pending).unwrap_or(0);
        out.push(m);
        if pending == 0 {
            break;
        }
    }
    out
}

/// Clones announced applied in the events stream: each `CloneApplied`,
/// and each key of each `ClonesApplied` batch (decision 21).
pub async fn count_clones_applied(client: &Client) -> u64 {
    let subjects = client.subjects();
    let singles = count_events(client, &subjects.all_applied()).await;
    let batched: usize = stored_messages(
        client,
        &subjects.events_stream(),
        &subjects.all_clones_applied(),
    )
    .await
    .iter()
    .map(
        |m| match keysync_schemas::decode::<keysync_schemas::Event>(&m.payload) {
            Ok(env) => match env.body {
                keysync_schemas::Event::ClonesApplied(b) => b.applied.len(),
                other => panic!("a {} on {}", other.kind(), m.subject),
            },
            Err(e) => panic!("an undecodable batch on {}: {e}", m.subject),
        },
    )
    .sum();
    singles + batched as u64
}

/// How many times `hsm` announced that it applied `key`: its
/// `CloneApplied`s, and the `ClonesApplied` batches naming the key
/// (decision 21).
pub async fn count_applied(client: &Client, key: &KeyId, hsm: &HsmId) -> u64 {
    let subjects = client.subjects();
    let singles = count_events(client, &subjects.clone_applied(key, hsm)).await;
    let batched = stored_messages(
        client,
        &subjects.events_stream(),
        &subjects.clones_applied(hsm),
    )
    .await
    .iter()
    .filter(|m| {
        matches!(
            keysync_schemas::decode::<keysync_schemas::Event>(&m.payload).map(|e| e.body),
            Ok(keysync_schemas::Event::ClonesApplied(b)) if b.applied.iter().any(|a| a.key_id == *key)
        )
    })
    .count();
    singles + batched as u64
}

/// Runs the `keysync` CLI with `args` and returns its output.
pub fn keysync_cli(args: &[&str]) -> Output {
    let bin: PathBuf = find_binary("keysync").unwrap_or_else(|e| panic!("{e}"));
    std::process::Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running keysync: {e}"))
}

/// [`keysync_cli`] with environment changes: `Some` sets a variable,
/// `None` removes it.
pub fn keysync_cli_env(args: &[&str], env: &[(&str, Option<&str>)]) -> Output {
    let bin: PathBuf = find_binary("keysync").unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = std::process::Command::new(bin);
    cmd.args(args);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("running keysync: {e}"))
}

/// `keysync --nats URL key delete KEY --hsm HSM`, as an operator runs it
/// (the real binary, off the async runtime), asserting it succeeded.
pub async fn delete_with_cli(url: &str, key_id: &KeyId, hsm: &HsmId) {
    let args = [
        "--nats".to_string(),
        url.to_string(),
        "key".into(),
        "delete".into(),
        key_id.to_string(),
        "--hsm".into(),
        hsm.to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        keysync_cli(&args)
    })
    .await
    .unwrap_or_else(|e| panic!("the CLI task: {e}"));
    assert!(
        out.status.success(),
        "keysync key delete failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A uniformly random index below `n` (for picking HSMs).
pub fn random_index(n: usize) -> usize {
    let id = uuid::Uuid::new_v4();
    (id.as_u128() % n.max(1) as u128) as usize
}

/// A deployment's NATS trust chain made by the real `keysync nats init`
/// (operator, accounts, role creds, agent signer, `resolver.conf`), and
/// optionally a CA with server and client certificates made by the
/// `openssl` CLI.
pub struct NatsTrust {
    /// Where `keysync nats init` wrote (and configs and certs go).
    pub dir: PathBuf,
}

impl NatsTrust {
    /// Runs `keysync nats init --out <dir>/nats-auth`.
    pub fn init(parent: &std::path::Path) -> Self {
        let dir = parent.join("nats-auth");
        let out = keysync_cli(&["nats", "init", "--out", &dir.display().to_string()]);
        assert!(
            out.status.success(),
            "keysync nats init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        NatsTrust { dir }
    }

    /// A role's creds (`orchestrator`, `client`, `auditor`, `operator`, `sys`).
    pub fn creds(&self, role: &str) -> PathBuf {
        self.dir.join("creds").join(format!("{role}.creds"))
    }

    /// The agents' credential signer.
    pub fn signer(&self) -> PathBuf {
        self.dir.join("agent-signer.toml")
    }

    /// Agent `hsm`'s creds, minted as `keysync hsm enroll|token
    /// --nats-signer` does (same library call), written once.
    pub fn agent_creds(&self, hsm: &str) -> PathBuf {
        let path = self.dir.join("agents").join(format!("{hsm}.creds"));
        if !path.exists() {
            let signer_text = keysync_security::secret_file::read(&self.signer())
                .unwrap_or_else(|e| panic!("signer: {e}"));
            let signer = keysync_security::nats_jwt::AgentSigner::parse(&signer_text)
                .unwrap_or_else(|e| panic!("signer: {e}"));
            let creds = signer
                .agent_creds(hsm)
                .unwrap_or_else(|e| panic!("agent creds: {e}"));
            keysync_security::secret_file::create_private_dirs(&self.dir.join("agents"))
                .unwrap_or_else(|e| panic!("agents dir: {e}"));
            keysync_security::secret_file::create(&path, &creds)
                .unwrap_or_else(|e| panic!("agent creds: {e}"));
        }
        path
    }

    /// Credentials for `tls` (CA, and this role's client certificate) if given.
    fn auth(&self, creds: PathBuf, tls: Option<&TlsFiles>) -> keysync_security::NatsAuth {
        keysync_security::NatsAuth {
            nats_creds: Some(creds),
            nats_tls_ca: tls.map(|t| t.ca.clone()),
            nats_tls_cert: tls.map(|t| t.client_cert.clone()),
            nats_tls_key: tls.map(|t| t.client_key.clone()),
            ..Default::default()
        }
    }

    /// Each process of a stack of `hsms` agents logged in as its role.
    pub fn stack_auth(&self, hsms: usize, tls: Option<&TlsFiles>) -> keysync_harness::StackAuth {
        keysync_harness::StackAuth {
            orchestrator: self.auth(self.creds("orchestrator"), tls),
            operator: self.auth(self.creds("operator"), tls),
            agents: (1..=hsms)
                .map(|i| {
                    let id = format!("hsm-{i}");
                    let auth = self.auth(self.agent_creds(&id), tls);
                    (id, auth)
                })
                .collect(),
        }
    }

    /// `role`'s credentials (a creds file of this trust chain) with `tls`.
    pub fn role_auth(&self, creds: PathBuf, tls: Option<&TlsFiles>) -> keysync_security::NatsAuth {
        self.auth(creds, tls)
    }

    /// `config` (a file under `deploy/`) copied next to `resolver.conf`,
    /// which it includes by a relative path.
    pub fn server_config(&self, config: &str) -> PathBuf {
        let to = self.dir.join(
            std::path::Path::new(config)
                .file_name()
                .unwrap_or_else(|| panic!("{config} names no file")),
        );
        std::fs::copy(deploy(config), &to).unwrap_or_else(|e| panic!("copying {config}: {e}"));
        to
    }
}

/// A CA and certificates for NATS over TLS, made with the `openssl` CLI.
pub struct TlsFiles {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The servers' certificate (127.0.0.1, localhost; server and client
    /// use, for routes).
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Makes them in `dir` with `openssl` (`None` if it is missing).
    pub fn make(dir: &std::path::Path) -> Option<Self> {
        on_path("openssl")?;
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .unwrap_or_else(|e| panic!("openssl: {e}"));
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=keysync test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        for (name, cn, ext) in [
            (
                "server",
                "keysync nats",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
            ),
            ("client", "keysync client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext)
                .unwrap_or_else(|e| panic!("{name}.ext: {e}"));
            run(&[
                "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-subj", &format!("/CN={cn}"), "-keyout", &format!("{name}.key"),
                "-out", &format!("{name}.csr"),
            ]);
            run(&[
                "x509", "-req", "-in", &format!("{name}.csr"), "-CA", "ca.pem", "-CAkey",
                "ca.key", "-CAcreateserial", "-days", "2", "-out", &format!("{name}.pem"),
                "-extfile", &format!("{name}.ext"),
            ]);
        }
        Some(TlsFiles {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        })
    }

    /// The environment the TLS configs in `deploy/nats/` read.
    pub fn nats_env(&self) -> Vec<(String, String)> {
        vec![
            ("KEYSYNC_NATS_TLS_CA".into(), self.ca.display().to_string()),
            (
                "KEYSYNC_NATS_TLS_CERT".into(),
                self.server_cert.display().to_string(),
            ),
            (
                "KEYSYNC_NATS_TLS_KEY".into(),
                self.server_key.display().to_string(),
            ),
        ]
    }
}

/// Every HSM holds the same keys, including every key in `created`. (A
/// create that failed during the outage may still have made a key, logged
/// later from its agent's outbox: it must then be everywhere too.)
pub async fn assert_same_everywhere(
    client: &Client,
    hsms: &[HsmId],
    created: &BTreeMap<KeyId, Fingerprint>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let mut invs = Vec::new();
        for h in hsms {
            invs.push(inventory(client, h).await);
        }
        let all_equal = invs.windows(2).all(|w| w[0] == w[1]);
        let complete = created.iter().all(|(k, fp)| invs[0].get(k) == Some(fp));
        if all_equal && complete {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let sizes: Vec<usize> = invs.iter().map(|i| i.len()).collect();
            let missing = created.keys().filter(|k| !invs[0].contains_key(k)).count();
            panic!("HSMs did not converge: sizes {sizes:?}, {missing} created keys missing on the first");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
