//! The Prometheus endpoints of a running stack, checked with Prometheus's
//! own `promtool`, and the health and readiness endpoints.

use std::time::Duration;

use keysync::{CreateKey, Route};
use keysync_schemas::KeyType;
use keysync_testkit::{
    fast_options, hsm, http_get, promtool, run_promtool, sample, wait_for_state, wait_until,
    DevStack,
};

fn free_port() -> u16 {
    keysync_harness::free_port().unwrap_or_else(|e| panic!("{e}"))
}

/// `promtool check metrics` on what `port` serves: exit 0, nothing said.
async fn check_metrics(promtool: &std::path::Path, port: u16, what: &str) -> String {
    let (status, body) = http_get(port, "/metrics")
        .await
        .unwrap_or_else(|| panic!("{what}: no answer on /metrics"));
    assert_eq!(status, 200, "{what}: {body}");
    let (ok, said) = run_promtool(promtool, &["check", "metrics"], &body);
    println!(
        "promtool check metrics ({what}): exit {}, output {said:?}",
        if ok { 0 } else { 1 }
    );
    assert!(
        ok && said.trim().is_empty(),
        "{what}: promtool complained:\n{said}\n{body}"
    );
    body
}

async fn ready(port: u16) -> bool {
    http_get(port, "/readyz")
        .await
        .is_some_and(|(s, _)| s == 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_every_metrics_endpoint_through_creates_deletes_and_a_failed_hsm() {
    let Some(promtool) = promtool() else {
        return;
    };
    let orch_port = free_port();
    let mut opts = fast_options(0);
    opts.orchestrator_metrics_addr = Some(([127, 0, 0, 1], orch_port).into());
    let mut stack = DevStack::start(opts)
        .await
        .unwrap_or_else(|e| panic!("stack did not start: {e}"));
    let ids = [hsm("hsm-1"), hsm("hsm-2"), hsm("hsm-3")];
    let mut agent_ports = Vec::new();
    for id in &ids {
        let port = free_port();
        stack.enroll(id).await.unwrap_or_else(|e| panic!("{e}"));
        stack
            .start_agents_with(
                std::slice::from_ref(id),
                &["--metrics-addr".into(), format!("127.0.0.1:{port}")],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        agent_ports.push(port);
    }
    stack
        .wait_for_members(3)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Health answers at once; readiness once connected, enrolled and
    // caught up.
    for &port in agent_ports.iter().chain([&orch_port]) {
        assert_eq!(http_get(port, "/healthz").await.map(|r| r.0), Some(200));
        assert!(
            wait_until(Duration::from_secs(20), || ready(port)).await,
            "not ready on {port}: {:?}",
            http_get(port, "/readyz").await
        );
    }

    let client = stack.client().clone();
    let mut created = Vec::new();
    for i in 0..6 {
        let on = &ids[i % ids.len()];
        let k = client
            .create_key(CreateKey::new(KeyType::P256).on(Route::Hsm(on.clone())))
            .await
            .unwrap_or_else(|e| panic!("create on {on}: {e}"));
        created.push((k.info.key_id, on.clone()));
    }
    for (key_id, on) in &created[..2] {
        client
            .delete_key(*key_id, &Route::Hsm(on.clone()))
            .await
            .unwrap_or_else(|e| panic!("delete: {e}"));
    }
    // Every agent served its creates and applied the others' clones
    // before hsm-3 goes: check it while it can be scraped.
    let settled = wait_until(Duration::from_secs(20), || async {
        let Some((_, text)) = http_get(orch_port, "/metrics").await else {
            return false;
        };
        sample(&text, "keysync_keys_deleted_total") == Some(2.0)
            && sample(&text, "keysync_pending_clones") == Some(0.0)
    })
    .await;
    assert!(settled, "{:?}", http_get(orch_port, "/metrics").await);
    let agent3 = check_metrics(&promtool, agent_ports[2], "hsm-3").await;
    assert_eq!(
        sample(
            &agent3,
            "keysync_agent_operation_seconds_count{op=\"generate\",outcome=\"ok\"}"
        ),
        Some(2.0),
        "{agent3}"
    );

    stack.kill_agent(&ids[2]);
    wait_for_state(&client, &ids[2], "failed", Duration::from_secs(20)).await;
    let failed_seen = wait_until(Duration::from_secs(10), || async {
        http_get(orch_port, "/metrics")
            .await
            .is_some_and(|(_, t)| sample(&t, "keysync_members{state=\"failed\"}") == Some(1.0))
    })
    .await;
    assert!(failed_seen, "{:?}", http_get(orch_port, "/metrics").await);

    let orch = check_metrics(&promtool, orch_port, "orchestrator").await;
    assert_eq!(
        sample(&orch, "keysync_keys_created_total"),
        Some(6.0),
        "{orch}"
    );
    assert_eq!(
        sample(&orch, "keysync_keys_deleted_total"),
        Some(2.0),
        "{orch}"
    );
    assert_eq!(sample(&orch, "keysync_keys"), Some(4.0), "{orch}");
    // Six keys, each completed once on three members.
    assert_eq!(
        sample(&orch, "keysync_keys_replicated_total"),
        Some(6.0),
        "{orch}"
    );
    assert_eq!(
        sample(&orch, "keysync_sync_latency_seconds_count"),
        Some(6.0),
        "{orch}"
    );
    // Each key cloned to two members, each delete sent to two: 16 commands.
    let sent: f64 = ["clone_key", "clone_batch", "delete_key"]
        .iter()
        .filter_map(|c| {
            sample(
                &orch,
                &format!("keysync_commands_sent_total{{command=\"{c}\"}}"),
            )
        })
        .sum();
    assert!(sent >= 16.0, "{orch}");
    for (i, &port) in agent_ports[..2].iter().enumerate() {
        let what = format!("hsm-{}", i + 1);
        let text = check_metrics(&promtool, port, &what).await;
        // Its two creates, and the clones of the four others' keys.
        assert_eq!(
            sample(
                &text,
                "keysync_agent_operation_seconds_count{op=\"generate\",outcome=\"ok\"}"
            ),
            Some(2.0),
            "{what}: {text}"
        );
        assert!(
            sample(&text, "keysync_agent_commands_total{outcome=\"applied\"}") >= Some(4.0),
            "{what}: {text}"
        );
        assert_eq!(
            sample(&text, "keysync_agent_outbox_events"),
            Some(0.0),
            "{what}: {text}"
        );
    }
}

#[test]
fn the_alert_rules_check_and_pass_their_unit_tests() {
    let Some(promtool) = promtool() else {
        return;
    };
    // Run in deploy/: the test file names its rules relative to itself.
    let (ok, said) = run_promtool(&promtool, &["check", "rules", "prometheus/alerts.yml"], "");
    println!("promtool check rules: {said}");
    assert!(ok && said.contains("SUCCESS"), "{said}");
    let (ok, said) = run_promtool(
        &promtool,
        &["test", "rules", "prometheus/alerts_test.yml"],
        "",
    );
    println!("promtool test rules: {said}");
    assert!(ok && said.contains("SUCCESS"), "{said}");
    // Every alert is unit-tested.
    let rules = std::fs::read_to_string(keysync_testkit::deploy("prometheus/alerts.yml"))
        .expect("alerts.yml");
    let tests = std::fs::read_to_string(keysync_testkit::deploy("prometheus/alerts_test.yml"))
        .expect("alerts_test.yml");
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has no unit test"
        );
    }
}
