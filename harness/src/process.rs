//! A child process of the harness: its log, readiness errors that quote
//! it, graceful and hard stops.
//!
//! Children die with their parent: each is started under `setpriv
//! --pdeathsig KILL` (util-linux, on every Debian and most Linux systems),
//! so the kernel SIGKILLs it when the thread that spawned it ends — also
//! when `keysync dev` itself is SIGKILLed, which no `Drop` can handle. The
//! harness spawns from the thread that drives it (the caller's runtime
//! thread), never from a short-lived blocking-pool thread, whose exit would
//! take the children with it. Where `setpriv` is missing, children are
//! started directly and only `Drop` cleans up.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::{Result, StackError};

/// A `Command` for `program` that dies with this process (see the module
/// docs).
pub fn command(program: &Path) -> Command {
    static SETPRIV: OnceLock<Option<PathBuf>> = OnceLock::new();
    let setpriv = SETPRIV.get_or_init(|| {
        ["/usr/bin/setpriv", "/bin/setpriv"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    });
    match setpriv {
        Some(setpriv) => {
            let mut cmd = Command::new(setpriv);
            cmd.args(["--pdeathsig", "KILL", "--"]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A child's log, appended to; made 0600 (its dir is private too).
fn log_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StackError::Io(path.display().to_string(), e))
}

/// A child process, killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    pub(crate) log: PathBuf,
}

impl Process {
    pub(crate) fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Self> {
        let out = log_file(&log)?;
        let err = out
            .try_clone()
            .map_err(|e| StackError::Io(log.display().to_string(), e))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .map_err(|e| StackError::Io(format!("starting {name}"), e))?;
        Ok(Process {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns how it exited if
    /// it stopped by itself within the grace, `None` if it had to be
    /// killed (or was gone already and reaped before). Async, so that
    /// waiting for a child to exit never blocks a runtime worker.
    pub async fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) => {}
                Err(_) => return None,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill();
        None
    }

    pub(crate) fn not_ready(&self, detail: impl std::fmt::Display) -> StackError {
        StackError::NotReady {
            what: self.name.clone(),
            detail: format!(
                "{detail}\n--- last lines of {} ---\n{}",
                self.log.display(),
                tail(&self.log, 20)
            ),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
