//! The CLI's own stderr, as an operator and a log shipper see it: no
//! library INFO lines unless asked for, `RUST_LOG=error` silences them, the
//! async-nats cap never raises a level, and `--log-format json` writes one
//! JSON object per line.

use keysync_testkit::keysync_cli_env;

fn status(url: &str, extra: &[&str], env: &[(&str, Option<&str>)]) -> Vec<String> {
    let mut args = vec!["--nats", url];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["cluster", "status", "--json"]);
    let out = keysync_cli_env(&args, env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr.lines().map(str::to_owned).collect()
}

fn async_nats_lines(lines: &[String]) -> Vec<&String> {
    lines.iter().filter(|l| l.contains("async_nats")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_stderr_carries_no_library_info_unless_asked() {
    let stack = keysync_testkit::start_stack(1).await;
    let url = stack.url();
    let quiet = [
        ("RUST_LOG", None),
        ("KEYSYNC_LOG_FORMAT", None),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", None),
    ];

    // Asked for: async-nats does log the connection at INFO, so the
    // absence below means something.
    let asked = status(&url, &[], &[("RUST_LOG", Some("info"))]);
    assert!(
        async_nats_lines(&asked).iter().any(|l| l.contains("INFO")),
        "RUST_LOG=info shows async-nats's connection line: {asked:#?}"
    );

    // By default and with RUST_LOG=error: none.
    let default = status(&url, &[], &quiet);
    assert!(async_nats_lines(&default).is_empty(), "{default:#?}");
    let error = status(&url, &[], &[("RUST_LOG", Some("error"))]);
    assert!(async_nats_lines(&error).is_empty(), "{error:#?}");

    // RUST_LOG=trace: async-nats stays capped at INFO (its trace level logs
    // raw message bytes).
    let trace = status(&url, &[], &[("RUST_LOG", Some("trace"))]);
    let above_info: Vec<_> = async_nats_lines(&trace)
        .into_iter()
        .filter(|l| l.contains("DEBUG") || l.contains("TRACE"))
        .collect();
    assert!(above_info.is_empty(), "{above_info:#?}");

    // JSON lines: every line one object, with the level and message.
    let json = status(
        &url,
        &["--log-format", "json"],
        &[("RUST_LOG", Some("info"))],
    );
    assert!(!json.is_empty(), "RUST_LOG=info logs something");
    for line in &json {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        assert!(
            v.get("message").is_some() || v.get("fields").is_some(),
            "{line}"
        );
    }
    // The same through the environment.
    let json_env = status(
        &url,
        &[],
        &[
            ("RUST_LOG", Some("info")),
            ("KEYSYNC_LOG_FORMAT", Some("json")),
        ],
    );
    assert!(!json_env.is_empty());
    for line in &json_env {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "{line}"
        );
    }
}

/// An OTLP protocol this build does not speak is refused at start, naming
/// what it does speak; it is not silently ignored.
#[test]
fn grpc_is_refused_at_start() {
    let out = keysync_cli_env(
        &["--nats", "nats://127.0.0.1:1", "cluster", "status"],
        &[("OTEL_EXPORTER_OTLP_PROTOCOL", Some("grpc"))],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"grpc\" is not supported")
            && stderr.contains("http/protobuf"),
        "{stderr}"
    );
}
