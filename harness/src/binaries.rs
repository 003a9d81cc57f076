//! Where the programs a stack runs are found.

use std::path::PathBuf;

use crate::{Result, StackError};

/// Finds a `nats-server`: `$NATS_SERVER_BIN`, then PATH, then Debian's path.
pub fn find_nats_server() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN").map(PathBuf::from) {
        if p.is_file() {
            return Ok(p);
        }
    }
    find_on_path("nats-server")
        .or_else(|| {
            ["/usr/sbin/nats-server", "/usr/local/bin/nats-server"]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
        })
        .ok_or(StackError::NoNatsServer)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Finds a keysync binary (`hsm-agent`, `orchestrator`): `$KEYSYNC_BIN_DIR`,
/// next to the running program, one level up (test binaries live in
/// `target/<profile>/deps`), then PATH.
pub fn find_binary(name: &str) -> Result<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("KEYSYNC_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            dirs.push(dir.to_path_buf());
            if let Some(up) = dir.parent() {
                dirs.push(up.to_path_buf());
            }
        }
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .or_else(|| find_on_path(name))
        .ok_or_else(|| StackError::NoBinary(name.to_string()))
}
