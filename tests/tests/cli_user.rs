//! The `keysync` CLI as a new user meets it: the real binary, run as a
//! separate process, against a real stack (or none, where the point is
//! what it says without one). Signatures are checked with openssl, the
//! completion script with bash, the man page with man/groff.

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use keysync_testkit::{
    find_binary, hsm, keysync_cli, start_stack, wait_until, DevStack, StackOptions,
};

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "keysync failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_of(out: &Output) -> serde_json::Value {
    let text = ok(out);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {text}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Fails with exit 1, nothing on stdout, and says `what` on stderr.
fn fails_saying(out: &Output, what: &str) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "wrote to stdout on failure");
    assert!(err.contains(what), "expected {what:?} in: {err}");
    err
}

/// The CLI against `stack`, from a blocking thread.
async fn cli_on(url: &str, args: &[&str]) -> Output {
    let mut all = vec!["--nats".to_string(), url.to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        keysync_cli(&args)
    })
    .await
    .expect("CLI thread")
}

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed (scripts/install-deps installs it)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_keys_and_hsms_are_named_for_what_they_are() {
    // A long lease: once the active orchestrator is killed, the standby
    // folds the log (and answers status) but does not fan out for a
    // minute, so a new key stays on the HSM that made it.
    let mut stack = DevStack::start(StackOptions {
        hsms: 3,
        orchestrator_args: ["--lease-ttl", "60"].map(String::from).to_vec(),
        ..Default::default()
    })
    .await
    .expect("stack");
    let url = stack.url();

    // A key the cluster never had: "no key ... in this cluster", with or
    // without --hsm, and never "not yet replicated".
    let bogus = "0190f3a2-0000-7000-8000-00000000beef";
    for args in [
        &["key", "info", bogus, "--json"][..],
        &["key", "info", bogus, "--hsm", "hsm-2"],
        &["key", "sign", bogus, "--data-hex", "00"],
        &["key", "public", bogus, "--hsm", "hsm-1"],
    ] {
        let out = cli_on(&url, args).await;
        let err = fails_saying(&out, &format!("no key {bogus} in this cluster"));
        assert!(!err.contains("not yet replicated"), "{args:?}: {err}");
    }
    let status = stack
        .client()
        .key_status(bogus.parse().expect("uuid"))
        .await
        .expect("key status");
    assert_eq!(status.standing, keysync_schemas::KeyStanding::Unknown);

    // An --hsm that is no member: said at once, pointing at cluster status.
    let created = json_of(
        &cli_on(
            &url,
            &[
                "key", "create", "--type", "p256", "--hsm", "hsm-1", "--json",
            ],
        )
        .await,
    );
    let key_id = created["key_id"].as_str().expect("key_id").to_string();
    assert_eq!(created["hsm_id"], "hsm-1");
    let started = Instant::now();
    let out = cli_on(
        &url,
        &["key", "sign", &key_id, "--hsm", "hsm-9", "--data-hex", "00"],
    )
    .await;
    let err = fails_saying(&out, "no HSM hsm-9 in this cluster");
    assert!(err.contains("keysync cluster status"), "{err}");
    assert!(
        err.contains("(members: hsm-1, hsm-2, hsm-3)"),
        "sorted: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?} (the no-responders retry budget is 5 s)",
        started.elapsed()
    );
    let out = cli_on(&url, &["key", "list", "--hsm", "hsm-9"]).await;
    fails_saying(&out, "no HSM hsm-9 in this cluster");

    // A deleted key: "was deleted", at once.
    let doomed = json_of(
        &cli_on(
            &url,
            &[
                "key", "create", "--type", "ed25519", "--hsm", "hsm-1", "--json",
            ],
        )
        .await,
    );
    let doomed = doomed["key_id"].as_str().expect("key_id").to_string();
    let deleted = json_of(&cli_on(&url, &["key", "delete", &doomed, "--json"]).await);
    assert_eq!(deleted["deleted"], true);
    assert!(deleted["seq"].is_u64());
    let doomed_id: keysync_schemas::KeyId = doomed.parse().expect("uuid");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            stack
                .client()
                .key_status(doomed_id)
                .await
                .is_ok_and(|s| s.standing == keysync_schemas::KeyStanding::Deleted)
        })
        .await,
        "the orchestrator never folded the delete"
    );
    for args in [
        &["key", "sign", doomed.as_str(), "--data-hex", "00"][..],
        &["key", "info", doomed.as_str(), "--hsm", "hsm-3"],
    ] {
        let out = cli_on(&url, args).await;
        fails_saying(&out, &format!("key {doomed} was deleted from this cluster"));
    }

    // "Not yet replicated" only when the log knows the key: kill the
    // active orchestrator; the standby folds a new key but sends nothing.
    stack
        .start_orchestrator_named("standby")
        .await
        .expect("standby");
    stack.kill_orchestrator();
    let fresh = json_of(
        &cli_on(
            &url,
            &[
                "key", "create", "--type", "p256", "--hsm", "hsm-1", "--json",
            ],
        )
        .await,
    );
    let fresh = fresh["key_id"].as_str().expect("key_id").to_string();
    let fresh_id: keysync_schemas::KeyId = fresh.parse().expect("uuid");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            stack.client().key_status(fresh_id).await.is_ok_and(|s| {
                s.standing == keysync_schemas::KeyStanding::Live && s.holders == vec![hsm("hsm-1")]
            })
        })
        .await,
        "the standby never folded the new key"
    );
    let out = cli_on(&url, &["key", "info", &fresh, "--hsm", "hsm-2"]).await;
    let err = fails_saying(&out, "not yet replicated there");
    assert!(!err.contains("no key"), "{err}");
    // The fault staged is real: hsm-2 indeed lacks it.
    let listed = json_of(&cli_on(&url, &["key", "list", "--hsm", "hsm-2", "--json"]).await);
    assert!(
        !listed
            .as_array()
            .expect("array")
            .iter()
            .any(|k| k["key_id"] == fresh.as_str()),
        "hsm-2 has the key: the staging failed"
    );
    stack.shutdown().await;
}

#[test]
fn the_timeout_bounds_the_connect() {
    // A server that accepts TCP connections and never speaks NATS: the
    // client waits for its INFO line.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("nats://{}", silent.local_addr().expect("addr"));
    for args in [
        &["cluster", "status"][..],
        &["key", "info", "0190f3a2-0000-7000-8000-000000000001"],
        &["metrics", "watch", "--count", "1"],
        &["audit", "verify"],
    ] {
        let mut all = vec!["--nats", url.as_str(), "--timeout", "1"];
        all.extend_from_slice(args);
        let started = Instant::now();
        let out = keysync_cli(&all);
        let took = started.elapsed();
        fails_saying(&out, "cannot connect to NATS");
        assert!(
            took < Duration::from_millis(3_500),
            "{args:?} took {took:?} with --timeout 1 (the NATS client's own is 5 s)"
        );
    }
    drop(silent);
}

#[test]
fn bad_data_arguments_exit_2() {
    let key = "0190f3a2-0000-7000-8000-000000000001";
    for args in [
        &["key", "sign", key, "--data-hex", "zz"][..],
        &["key", "sign", key, "--data-hex", "abc"],
        &["key", "sign", key, "--data-file", "/nonexistent/data"],
        &["key", "sign", key],
        &[
            "key",
            "sign",
            key,
            "--data-hex",
            "00",
            "--data-file",
            "/etc/hostname",
        ],
        &["key", "public", key, "--pem", "--json"],
    ] {
        let out = keysync_cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
    let out = keysync_cli(&["key", "sign", key, "--data-hex", "zz"]);
    assert!(stderr(&out).contains("not hex"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_written_with_out_verify_with_openssl_for_every_signing_type() {
    let stack = start_stack(3).await;
    let url = stack.url();
    let dir = tempfile::tempdir().expect("tempdir");
    // Data that is not valid UTF-8, read from a file.
    let data_path = dir.path().join("data.bin");
    let data: Vec<u8> = (0u8..=255).rev().chain(*b"keysync").collect();
    std::fs::write(&data_path, &data).expect("write");
    let data_s = data_path.to_str().expect("path");
    for ty in ["p256", "rsa2048", "ed25519"] {
        let created = json_of(
            &cli_on(
                &url,
                &["key", "create", "--type", ty, "--hsm", "hsm-1", "--json"],
            )
            .await,
        );
        let key_id = created["key_id"].as_str().expect("key_id").to_string();
        let pem_path = dir.path().join(format!("{ty}.pem"));
        let sig_path = dir.path().join(format!("{ty}.sig"));
        let pem = ok(&cli_on(&url, &["key", "public", &key_id, "--hsm", "hsm-1"]).await);
        std::fs::write(&pem_path, &pem).expect("write");
        // Signed on another HSM once the key got there, into a file.
        let signed = wait_until(Duration::from_secs(20), || async {
            cli_on(
                &url,
                &[
                    "key",
                    "sign",
                    &key_id,
                    "--hsm",
                    "hsm-3",
                    "--data-file",
                    data_s,
                    "--out",
                    sig_path.to_str().expect("path"),
                ],
            )
            .await
            .status
            .success()
        })
        .await;
        assert!(signed, "{ty} key never signed on hsm-3");
        let (pem_s, sig_s) = (
            pem_path.to_str().expect("path"),
            sig_path.to_str().expect("path"),
        );
        let verify = |data: &str| {
            if ty == "ed25519" {
                openssl(&[
                    "pkeyutl", "-verify", "-pubin", "-inkey", pem_s, "-rawin", "-in", data,
                    "-sigfile", sig_s,
                ])
            } else {
                openssl(&[
                    "dgst",
                    "-sha256",
                    "-verify",
                    pem_s,
                    "-signature",
                    sig_s,
                    data,
                ])
            }
        };
        let verified = verify(data_s);
        assert!(
            verified.status.success(),
            "openssl rejected the {ty} signature: {}{}",
            String::from_utf8_lossy(&verified.stdout),
            String::from_utf8_lossy(&verified.stderr)
        );
        // And it is a real check: other data does not verify.
        let other = dir.path().join("other.bin");
        std::fs::write(&other, b"other data").expect("write");
        assert!(
            !verify(other.to_str().expect("path")).status.success(),
            "openssl accepted a {ty} signature over other data"
        );
        // --json gives the same signature, in hex.
        let doc = json_of(
            &cli_on(
                &url,
                &["key", "sign", &key_id, "--data-file", data_s, "--json"],
            )
            .await,
        );
        let again = hex::decode(doc["signature"].as_str().expect("signature")).expect("hex");
        assert_eq!(doc["bytes"], again.len());
        if ty != "p256" {
            // Deterministic schemes: the same bytes (ECDSA is randomized).
            assert_eq!(again, std::fs::read(&sig_path).expect("sig"), "{ty}");
        }
    }
    stack.shutdown().await;
}

/// Every object in `v` (recursively) that names an HSM names it `hsm_id`
/// (or `hsm_ids` for a list); `hsm` only beside `hsm_id`, as the
/// contract's original key documents have it.
fn hsm_fields_are_consistent(what: &str, v: &serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, val) in m {
                if k == "hsm" {
                    assert_eq!(m.get("hsm_id"), Some(val), "{what}: `hsm` without `hsm_id`");
                }
                if k == "hsms" {
                    assert_eq!(
                        m.get("hsm_ids"),
                        Some(val),
                        "{what}: `hsms` without `hsm_ids`"
                    );
                }
                hsm_fields_are_consistent(what, val);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| hsm_fields_are_consistent(what, x)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_printing_command_has_json_and_ends_quietly_on_a_closed_pipe() {
    let stack = start_stack(2).await;
    let url = stack.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = stack.cluster_identity().to_str().expect("path").to_string();
    let created = json_of(
        &cli_on(
            &url,
            &[
                "key", "create", "--type", "p256", "--hsm", "hsm-1", "--json",
            ],
        )
        .await,
    );
    let key_id = created["key_id"].as_str().expect("key_id").to_string();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            cli_on(&url, &["key", "info", &key_id, "--hsm", "hsm-2"])
                .await
                .status
                .success()
        })
        .await
    );
    let dk = dir.path().join("dk");
    let dk2 = dir.path().join("dk2");
    let json_commands: Vec<Vec<String>> = [
        vec!["cluster", "status", "--json"],
        vec!["key", "list", "--hsm", "hsm-1", "--json"],
        vec!["key", "info", &key_id, "--json"],
        vec!["key", "public", &key_id, "--json"],
        vec!["key", "sign", &key_id, "--data-hex", "00", "--json"],
        vec!["key", "create", "--type", "aes256", "--json"],
        vec!["audit", "verify", "--json"],
        vec!["audit", "replay", "--until", "999999", "--json"],
        vec!["dlq", "list", "--json"],
        vec!["hsm", "cluster-key", "--identity", &identity, "--json"],
        vec![
            "cluster",
            "init",
            "--domain-key-out",
            dk.to_str().expect("path"),
            "--json",
        ],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect();
    for args in &json_commands {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let doc = json_of(&cli_on(&url, &args).await);
        hsm_fields_are_consistent(&args.join(" "), &doc);
    }
    let status = json_of(&cli_on(&url, &["cluster", "status", "--json"]).await);
    let mut ids: Vec<&str> = status["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["hsm_id"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, vec!["hsm-1", "hsm-2"]);
    let replay = json_of(&cli_on(&url, &["audit", "replay", "--until", "999999", "--json"]).await);
    assert!(replay["members"]
        .as_array()
        .is_some_and(|m| m.iter().all(|m| m["hsm_id"].is_string())));
    // metrics watch --json: one JSON document per line.
    let out = cli_on(&url, &["metrics", "watch", "--json", "--count", "1"]).await;
    let line = ok(&out);
    let doc: serde_json::Value = serde_json::from_str(line.trim()).expect("a JSON line");
    assert!(doc["hsms"].is_array());
    // The audit export is JSON lines.
    let out = cli_on(&url, &["audit", "export"]).await;
    for l in ok(&out).lines() {
        serde_json::from_str::<serde_json::Value>(l).expect("a JSON line");
    }

    // Every printing command, its stdout a pipe whose reader is gone
    // before it writes: no panic, exit 0 (or 141, killed by SIGPIPE).
    let mut printing: Vec<Vec<String>> = json_commands
        .iter()
        .filter(|a| a[0] != "cluster" || a[1] != "init")
        .cloned()
        .collect();
    for extra in [
        vec!["cluster", "status"],
        vec!["key", "list", "--hsm", "hsm-1"],
        vec!["key", "info", &key_id],
        vec!["key", "public", &key_id],
        vec!["key", "public", &key_id, "--der-hex"],
        vec!["key", "sign", &key_id, "--data-hex", "00"],
        vec!["key", "create", "--type", "ed25519"],
        vec!["audit", "verify"],
        vec!["audit", "export"],
        vec!["audit", "replay", "--until", "999999"],
        vec!["dlq", "list"],
        vec!["metrics", "watch", "--count", "2"],
        vec!["metrics", "watch", "--count", "2", "--json"],
        vec!["hsm", "cluster-key", "--identity", &identity],
        vec![
            "cluster",
            "init",
            "--domain-key-out",
            dk2.to_str().expect("path"),
        ],
        vec!["completions", "bash"],
        vec!["man"],
        vec!["--help"],
        vec!["key", "--help"],
        vec!["--version"],
    ] {
        printing.push(extra.into_iter().map(String::from).collect());
    }
    let bin = find_binary("keysync").expect("keysync binary");
    for args in printing {
        let (url, bin) = (url.clone(), bin.clone());
        let args2 = args.clone();
        let out = tokio::task::spawn_blocking(move || {
            let (reader, writer) = std::io::pipe().expect("pipe");
            drop(reader);
            Command::new(&bin)
                .arg("--nats")
                .arg(&url)
                .args(&args2)
                .stdout(writer)
                .stderr(Stdio::piped())
                .output()
                .expect("run keysync")
        })
        .await
        .expect("thread");
        let err = stderr(&out);
        use std::os::unix::process::ExitStatusExt as _;
        assert!(
            out.status.code() == Some(0) || out.status.signal() == Some(13),
            "{args:?} into a closed pipe: {:?}: {err}",
            out.status
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains("Broken pipe"), "{args:?}: {err}");
    }
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_watch_into_a_pipe_is_plain_80_column_text_and_gives_up_after_the_timeout() {
    let stack = start_stack(3).await;
    let url = stack.url();
    // Through a pipe (stdout is not a terminal): no escape codes.
    let out = cli_on(&url, &["metrics", "watch", "--count", "2"]).await;
    let text = ok(&out);
    assert!(!text.contains('\x1b'), "escape codes in a pipe: {text:?}");
    assert_eq!(
        text.matches("keysync sync metrics from").count(),
        2,
        "{text}"
    );
    assert!(text.contains("hsm-3"), "{text}");
    for line in text.lines() {
        assert!(
            line.chars().count() <= 80,
            "{} columns: {line:?}",
            line.chars().count()
        );
    }
    // No orchestrator publishes under this prefix: it says so within
    // --timeout instead of waiting forever.
    let started = Instant::now();
    let out = cli_on(
        &url,
        &["--prefix", "nobody", "--timeout", "1.5", "metrics", "watch"],
    )
    .await;
    fails_saying(&out, "no sync metrics on nobody.metrics.sync within 1.5 s");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    stack.shutdown().await;
}

#[test]
fn help_shows_what_a_command_uses_and_points_newcomers_at_demo_and_dev() {
    let top = ok(&keysync_cli(&["--help"]));
    assert!(
        top.contains("keysync demo") && top.contains("keysync dev"),
        "{top}"
    );
    let has = |text: &str, opt: &str| text.lines().any(|l| l.trim_start().starts_with(opt));
    // Start their own nats-server: no NATS URL, timeout or credentials.
    for cmd in [
        &["dev", "--help"][..],
        &["demo", "--help"],
        &["bench", "--help"],
    ] {
        let text = ok(&keysync_cli(cmd));
        for hidden in [
            "--nats <",
            "--timeout",
            "--no-retry",
            "--nats-creds",
            "--nats-user",
        ] {
            assert!(!has(&text, hidden), "{cmd:?} shows {hidden}: {text}");
        }
        assert!(has(&text, "--prefix"), "{cmd:?}: {text}");
    }
    // Offline commands: no connection options at all.
    for cmd in [
        &["cluster", "init", "--help"][..],
        &["hsm", "cluster-key", "--help"],
        &["completions", "--help"],
        &["man", "--help"],
    ] {
        let text = ok(&keysync_cli(cmd));
        for hidden in [
            "--nats <",
            "--prefix",
            "--timeout",
            "--no-retry",
            "--nats-creds",
        ] {
            assert!(!has(&text, hidden), "{cmd:?} shows {hidden}: {text}");
        }
        assert!(has(&text, "--log-format"), "{cmd:?}: {text}");
    }
    // Key operations use them all.
    let text = ok(&keysync_cli(&["key", "sign", "--help"]));
    for shown in [
        "--nats <",
        "--prefix",
        "--timeout",
        "--no-retry",
        "--nats-creds",
        "--out",
        "--data-file",
    ] {
        assert!(has(&text, shown), "key sign hides {shown}: {text}");
    }
    // Status does not retry key lookups.
    let text = ok(&keysync_cli(&["cluster", "status", "--help"]));
    assert!(
        !has(&text, "--no-retry") && has(&text, "--timeout"),
        "{text}"
    );
    // Hidden, not refused: a KEYSYNC_NATS or --timeout in a script still works.
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("dk");
    ok(&keysync_cli(&[
        "--timeout",
        "3",
        "cluster",
        "init",
        "--domain-key-out",
        p.to_str().expect("path"),
    ]));
}

#[test]
fn completions_and_man_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("keysync.bash");
    std::fs::write(&script, ok(&keysync_cli(&["completions", "bash"]))).expect("write");
    let checked = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("bash");
    assert!(checked.status.success(), "bash -n: {}", stderr(&checked));
    // bash completes `keysync ke` to `key`, and `keysync key sign --data-` to both data options.
    let complete = |words: &str| -> Vec<String> {
        let n = words.split(' ').count() - 1;
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD={n}; COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; \
                 _keysync keysync \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$((COMP_CWORD-1))]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                script.display()
            ))
            .output()
            .expect("bash");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect()
    };
    assert_eq!(complete("keysync ke"), vec!["key"]);
    let mut data = complete("keysync key sign --data-");
    data.sort();
    assert_eq!(data, vec!["--data-file", "--data-hex"]);
    for shell in ["zsh", "fish"] {
        let text = ok(&keysync_cli(&["completions", shell]));
        assert!(
            text.contains("keysync") && text.contains("sign"),
            "{shell}: {text}"
        );
    }
    let out = keysync_cli(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));

    // The man page: roff that man (or groff) renders with the commands in it.
    let page = dir.path().join("keysync.1");
    std::fs::write(&page, ok(&keysync_cli(&["man"]))).expect("write");
    let rendered = render_man(&page);
    for section in ["NAME", "SYNOPSIS", "SUBCOMMANDS"] {
        assert!(rendered.contains(section), "{section} missing: {rendered}");
    }
    assert!(rendered.contains("completions"), "{rendered}");
    // One page per command into a directory.
    let pages = dir.path().join("man");
    ok(&keysync_cli(&[
        "man",
        "--out-dir",
        pages.to_str().expect("path"),
    ]));
    for name in [
        "keysync.1",
        "keysync-key.1",
        "keysync-key-sign.1",
        "keysync-cluster-status.1",
    ] {
        assert!(pages.join(name).is_file(), "{name} not written");
    }
    let sign = render_man(&pages.join("keysync-key-sign.1"));
    assert!(
        sign.contains("--data-file") || sign.contains("\u{2010}\u{2010}data\u{2010}file"),
        "{sign}"
    );
}

/// The page rendered to text: `man -l` where man is installed, else groff.
fn render_man(page: &Path) -> String {
    let out = Command::new("man")
        .arg("-l")
        .arg(page)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "80")
        .output()
        .or_else(|_| {
            Command::new("groff")
                .args(["-man", "-Tutf8"])
                .arg(page)
                .output()
        })
        .expect("man or groff is installed");
    assert!(out.status.success(), "rendering failed: {}", stderr(&out));
    let mut text = String::new();
    out.stdout
        .as_slice()
        .read_to_string(&mut text)
        .expect("UTF-8");
    text
}

#[test]
fn a_secret_file_that_cannot_be_written_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The target is a directory: refused, and no temporary file is left.
    let target = dir.path().join("domain.key");
    std::fs::create_dir(&target).expect("mkdir");
    let out = keysync_cli(&[
        "cluster",
        "init",
        "--domain-key-out",
        target.to_str().expect("path"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["domain.key"], "leftovers: {names:?}");
    assert!(target.is_dir());
    // Written: 0600, whole, and the only file there.
    let good = dir.path().join("sub/cluster.key");
    std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
    ok(&keysync_cli(&[
        "cluster",
        "init",
        "--domain-key-out",
        good.to_str().expect("path"),
    ]));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&good).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(&good).expect("read").trim().len(),
        64
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("sub"))
            .expect("dir")
            .count(),
        1
    );
}

#[test]
fn dev_json_describes_the_stack_it_runs() {
    let bin = find_binary("keysync").expect("keysync binary");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(bin)
        .args(["dev", "--hsms", "1", "--json", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("keysync dev");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    // Stopped even if an assertion fails (its children follow it: the
    // harness starts them with a parent-death signal).
    let mut child = KillOnDrop(child);
    let child = &mut child.0;
    // One JSON document, pretty-printed: read until it parses.
    let mut text = String::new();
    let doc: serde_json::Value = loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut stdout, &mut line).expect("read");
        assert!(n > 0, "keysync dev ended before printing its stack: {text}");
        text.push_str(&line);
        if let Ok(doc) = serde_json::from_str(&text) {
            break doc;
        }
    };
    assert_eq!(doc["hsm_ids"], serde_json::json!(["hsm-1"]));
    assert_eq!(doc["prefix"], "keysync");
    assert_eq!(doc["data_dir"], dir.path().to_str().expect("path"));
    let url = doc["nats_url"].as_str().expect("nats_url");
    let status = json_of(&keysync_cli(&[
        "--nats", url, "cluster", "status", "--json",
    ]));
    let mut ids: Vec<&str> = status["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["hsm_id"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, vec!["hsm-1"]);
    // Ctrl-C stops it.
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exited = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "keysync dev did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exited.success(), "{exited:?}");
}

/// A child process killed when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
