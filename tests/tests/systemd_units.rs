//! The service units in `deploy/systemd/` pass `systemd-analyze verify`
//! with no warning, and the example config files in `deploy/config/` are
//! accepted by the binaries they configure.

use std::path::{Path, PathBuf};

use keysync_testkit::{deploy, find_binary, on_path};

/// The units with their ExecStart binaries pointed at ones that exist here
/// (verify checks that a unit's command is executable), in `dir`.
fn units_in(dir: &Path) -> Vec<PathBuf> {
    let nats = keysync_harness::find_nats_server().expect("nats-server");
    let subst = [
        (
            "/usr/local/bin/orchestrator",
            find_binary("orchestrator").expect("orchestrator"),
        ),
        (
            "/usr/local/bin/hsm-agent",
            find_binary("hsm-agent").expect("hsm-agent"),
        ),
        ("/usr/local/bin/nats-server", nats),
    ];
    let mut units = Vec::new();
    for entry in std::fs::read_dir(deploy("systemd")).expect("deploy/systemd") {
        let path = entry.expect("entry").path();
        let mut text = std::fs::read_to_string(&path).expect("unit");
        for (from, to) in &subst {
            text = text.replace(from, &to.display().to_string());
        }
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        std::fs::write(dir.join(&name), text).expect("copy");
        // A template is verified through an instance of it.
        units.push(dir.join(name.replace("@.service", "@n1.service")));
    }
    units.sort();
    units
}

fn verify(unit: &Path) -> (bool, String) {
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
        .expect("systemd-analyze runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_service_units_verify_without_a_warning() {
    if on_path("systemd-analyze").is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing in CI (scripts/install-deps installs the systemd package)"
        );
        eprintln!("SKIP: systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let units = units_in(dir.path());
    assert_eq!(units.len(), 3, "{units:?}");
    for unit in &units {
        let (ok, output) = verify(unit);
        assert!(
            ok && output.trim().is_empty(),
            "{}: systemd-analyze verify said:\n{output}",
            unit.display()
        );
    }
    // The check is real: a unit with a misspelt hardening value, or a
    // command that does not exist, is reported.
    let bad = dir.path().join("keysync-bad.service");
    let text =
        std::fs::read_to_string(dir.path().join("keysync-orchestrator.service")).expect("unit");
    std::fs::write(
        &bad,
        text.replace("ProtectSystem=strict", "ProtectSystem=strictt"),
    )
    .expect("write");
    let (_, output) = verify(&bad);
    assert!(output.contains("strictt"), "not reported: {output}");
    std::fs::write(
        &bad,
        "[Service]\nExecStart=/nonexistent/keysync --config /x.toml\n",
    )
    .expect("write");
    let (ok, output) = verify(&bad);
    assert!(!ok && output.contains("/nonexistent/keysync"), "{output}");
}

#[test]
fn the_units_harden_and_pass_secrets_as_credentials() {
    for name in ["keysync-orchestrator.service", "keysync-hsm-agent@.service"] {
        let text = std::fs::read_to_string(deploy(&format!("systemd/{name}"))).expect("unit");
        for line in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "LoadCredential=nats.creds:",
            "ExecStart=/usr/local/bin/",
            "--config /etc/keysync/",
        ] {
            assert!(text.contains(line), "{name} lacks {line}");
        }
        // Secrets are read from the credentials directory, never from a
        // path the unit names in the clear.
        assert!(text.contains("%d/"), "{name} points no option at %d");
    }
    let agent =
        std::fs::read_to_string(deploy("systemd/keysync-hsm-agent@.service")).expect("unit");
    assert!(agent.contains("LoadCredential=pkcs11.pin:"));
    assert!(
        agent.contains("LoadCredential=domain.key:"),
        "the embedded keystore's drop-in"
    );
    let orchestrator =
        std::fs::read_to_string(deploy("systemd/keysync-orchestrator.service")).expect("unit");
    assert!(orchestrator.contains("LoadCredential=cluster.key:"));
}

#[test]
fn the_example_config_files_are_accepted_by_their_binaries() {
    for (bin, file) in [
        ("orchestrator", "config/orchestrator.toml"),
        ("hsm-agent", "config/hsm-agent.toml"),
    ] {
        // `--help` after the file: the file is read and checked (an
        // unknown key or a wrong shape fails), nothing starts.
        let out = std::process::Command::new(find_binary(bin).expect("binary"))
            .arg("--config")
            .arg(deploy(file))
            .arg("--help")
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{bin} refused {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // And a typo is refused, naming the key and the file.
        let dir = tempfile::tempdir().expect("temp dir");
        let typo = dir.path().join("typo.toml");
        let text = std::fs::read_to_string(deploy(file)).expect("example");
        std::fs::write(&typo, format!("{text}\nnats_url = \"nats://x:4222\"\n")).expect("write");
        let out = std::process::Command::new(find_binary(bin).expect("binary"))
            .arg("--config")
            .arg(&typo)
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bin}: {err}");
        assert!(
            err.contains("`nats_url`") && err.contains(&typo.display().to_string()),
            "{bin}: {err}"
        );
    }
}
