//! A `nats-server` child with JetStream on file storage in its own dir.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::process::{command, Process};
use crate::{find_nats_server, Result, StackError};

/// A running `nats-server`.
#[derive(Debug)]
pub struct NatsServer {
    pub(crate) process: Process,
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
}

/// A port free on 127.0.0.1 right now (for cluster routes, which must be
/// known before the servers start).
pub fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| StackError::Io("finding a free port".into(), e))
}

impl NatsServer {
    /// Starts a server storing under `dir` on `port` (a free one if `None`),
    /// and waits until it accepts clients.
    pub async fn start(dir: &Path, port: Option<u16>) -> Result<Self> {
        Self::start_with(find_nats_server()?, dir, port, Vec::new(), Vec::new()).await
    }

    /// Starts `bin` with extra arguments and environment (for cluster or
    /// auth configs).
    pub async fn start_with(
        bin: PathBuf,
        dir: &Path,
        port: Option<u16>,
        extra_args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| StackError::Io(dir.display().to_string(), e))?;
        let (process, port) = Self::spawn(&bin, dir, port, &extra_args, &env).await?;
        Ok(NatsServer {
            process,
            bin,
            dir: dir.to_path_buf(),
            port,
            extra_args,
            env,
        })
    }

    async fn spawn(
        bin: &Path,
        dir: &Path,
        port: Option<u16>,
        extra: &[String],
        env: &[(String, String)],
    ) -> Result<(Process, u16)> {
        let log = dir.join("nats-server.log");
        // A fresh log for this run, so readiness is read from this run only.
        let _ = std::fs::remove_file(&log);
        let mut cmd = command(bin);
        cmd.args(["-a", "127.0.0.1", "-p"])
            .arg(port.map_or("-1".to_string(), |p| p.to_string()))
            .arg("-js");
        if extra.iter().any(|a| a == "-c") {
            // A config names its store through $KEYSYNC_NATS_STORE_DIR
            // (a flag as well would be a duplicate setting), and its
            // account resolver's through $KEYSYNC_NATS_RESOLVER_DIR.
            cmd.env("KEYSYNC_NATS_STORE_DIR", dir.join("jetstream"));
            // Each node's own account-JWT directory, for configs with a
            // full resolver (`keysync nats init`'s resolver.conf): a
            // resolver locks its directory, so nodes cannot share one.
            cmd.env("KEYSYNC_NATS_RESOLVER_DIR", dir.join("jwt"));
        } else {
            cmd.arg("-sd").arg(dir.join("jetstream"));
        }
        cmd.arg("-l").arg(&log).args(extra);
        cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut process = Process::spawn("nats-server", cmd, dir.join("nats-server.stdout"))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let listening = text
                .lines()
                .find_map(|l| l.split("Listening for client connections on ").nth(1))
                .and_then(|addr| addr.trim().rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok());
            if let (Some(p), true) = (listening, text.contains("Server is ready")) {
                process.log = log;
                return Ok((process, p));
            }
            if !process.is_running() {
                return Err(process.not_ready(format!("exited early; see {}", log.display())));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(process.not_ready("no 'Server is ready' within 20 s"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same port and store (after [`Self::kill`]).
    pub async fn restart(&mut self) -> Result<()> {
        self.process.kill();
        let (process, _) = Self::spawn(
            &self.bin,
            &self.dir,
            Some(self.port),
            &self.extra_args,
            &self.env,
        )
        .await?;
        self.process = process;
        Ok(())
    }
}
