//! The shape of the workspace, checked: what the SDK drags into an
//! application, and what a killed `keysync dev` leaves behind.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use keysync_testkit::{find_binary, wait_until};

/// Crates an application linking the SDK must not get (issue 11): an HSM,
/// a CLI parser, an HTTP server, a progress bar, an exporter and its HTTP
/// client, process control, temp files, RSA, a metrics registry, a
/// database, and the other roles' crates.
const NOT_IN_THE_SDK: &[&str] = &[
    "redb",
    "clap",
    "hyper",
    "indicatif",
    "opentelemetry-otlp",
    "reqwest",
    "nix",
    "tempfile",
    "rsa",
    "prometheus-client",
    "hsm-agent",
    "orchestrator",
    "keysync-harness",
    "keysync-cli",
];

/// Names in the normal dependency tree of `package`.
fn normal_dependencies(package: &str) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args([
            "tree",
            "-p",
            package,
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
            "--offline",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let names: Vec<String> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect();
    assert!(
        names.iter().any(|n| n == "async-nats"),
        "the tree was read: {tree}"
    );
    names
}

/// `package` has none of [`NOT_IN_THE_SDK`] but those in `allowed`.
fn assert_thin(package: &str, allowed: &[&str]) {
    let names = normal_dependencies(package);
    let found: Vec<&&str> = NOT_IN_THE_SDK
        .iter()
        .filter(|c| !allowed.contains(*c) && names.iter().any(|n| n == *c))
        .collect();
    assert!(
        found.is_empty(),
        "{package}'s normal dependencies include {found:?}: {names:?}"
    );
}

#[test]
fn the_sdk_dependency_tree_is_thin() {
    assert_thin("keysync", &[]);
}

/// The PKCS#11 module applications load links the SDK, and nothing the
/// SDK keeps out (no agent, no harness) but `rsa`: `C_Verify` runs in the
/// module on the key's public key (decision 13), RSA included.
#[test]
fn the_pkcs11_module_links_the_sdk_only() {
    assert!(normal_dependencies("keysync-pkcs11")
        .iter()
        .any(|n| n == "keysync"));
    assert_thin("keysync-pkcs11", &["rsa"]);
}

fn pid_alive(pid: u32) -> bool {
    // A zombie has exited: only its entry is left for a parent to reap.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                != Some("Z")
        })
        .unwrap_or(false)
}

/// Every process whose parent is `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ..."; comm may hold spaces and parens.
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

#[tokio::test]
async fn keysync_dev_killed_with_sigkill_leaves_no_orphans() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut dev = Command::new(find_binary("keysync").expect("keysync binary"))
        .args(["dev", "--hsms", "2", "--data-dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start keysync dev");
    // Ready once it prints the NATS URL.
    let stdout = dev.stdout.take().expect("stdout");
    let url = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().next().and_then(|l| l.ok())
    })
    .await
    .expect("reader");
    assert!(
        url.as_deref().is_some_and(|u| u.starts_with("nats://")),
        "keysync dev printed {url:?}"
    );
    let children = children_of(dev.id());
    // nats-server, the orchestrator and two agents.
    assert_eq!(children.len(), 4, "children of keysync dev: {children:?}");
    assert!(children.iter().all(|&c| pid_alive(c)));

    dev.kill().expect("SIGKILL keysync dev");
    dev.wait().expect("reap keysync dev");

    let gone = wait_until(Duration::from_secs(10), || {
        let children = children.clone();
        async move { children.iter().all(|&c| !pid_alive(c)) }
    })
    .await;
    let left: Vec<u32> = children.into_iter().filter(|&c| pid_alive(c)).collect();
    for &pid in &left {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    assert!(
        gone,
        "processes outlived the SIGKILLed keysync dev: {left:?}"
    );
}
