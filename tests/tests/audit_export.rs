//! `keysync audit export` as a SIEM feed, on a real cluster: `--follow`
//! prints records appended after it started, `--since SEQ` resumes exactly
//! after the last line of a previous run, `--since TIME` starts at a fact
//! time, every record names its actor, times are RFC 3339, and a reader
//! that goes away (`| head -1`) ends the export quietly.

use std::process::Stdio;
use std::time::Duration;

use keysync::{CreateKey, Route};
use keysync_schemas::{Durability, KeyType};
use keysync_testkit::{find_binary, hsm, keysync_cli, start_stack, wait_until};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, BufReader};

fn export(url: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["--nats", url, "audit", "export", "--json"];
    args.extend_from_slice(extra);
    let out = keysync_cli(&args);
    assert!(
        out.status.success(),
        "audit export failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn seq(v: &serde_json::Value) -> u64 {
    v["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_export_follows_resumes_and_names_actors() {
    let stack = start_stack(2).await;
    let url = stack.url();
    let client = stack.client().clone();
    let create = |t| {
        let client = client.clone();
        async move {
            client
                .create_key(
                    CreateKey::new(t)
                        .on(Route::Hsm(hsm("hsm-1")))
                        .durability(Durability::All),
                )
                .await
                .expect("create")
        }
    };
    let first = create(KeyType::P256).await;
    // The audit appender runs beside the fold: wait for the key's records.
    let audited = |key: String| {
        let url = url.clone();
        move || {
            let (url, key) = (url.clone(), key.clone());
            async move {
                let url2 = url.clone();
                let lines = tokio::task::spawn_blocking(move || export(&url2, &[]))
                    .await
                    .expect("export task");
                lines.iter().any(|l| {
                    l["fact"]["kind"] == "key_replicated" && l["fact"]["key_id"] == key.as_str()
                })
            }
        }
    };
    assert!(
        wait_until(
            Duration::from_secs(20),
            audited(first.info.key_id.to_string())
        )
        .await,
        "the first key's records never reached the audit stream"
    );
    let before = export(&url, &[]);
    let last = seq(before.last().expect("records"));
    for line in &before {
        // Every record names who caused it, and its time is RFC 3339.
        let kind = line["actor"]["kind"].as_str().unwrap_or_default();
        assert!(
            ["hsm", "orchestrator", "operator"].contains(&kind),
            "{line}"
        );
        let t = line["event_time"].as_str().expect("event_time");
        OffsetDateTime::parse(t, &Rfc3339).unwrap_or_else(|e| panic!("{t}: {e}"));
    }
    let created = before
        .iter()
        .find(|l| l["fact"]["kind"] == "key_created")
        .expect("key_created");
    assert_eq!(
        created["actor"],
        serde_json::json!({"kind": "hsm", "hsm": "hsm-1"})
    );
    let replicated = before
        .iter()
        .find(|l| l["fact"]["kind"] == "key_replicated")
        .expect("key_replicated");
    assert_eq!(replicated["actor"]["kind"], "orchestrator");
    let enrolled = before
        .iter()
        .find(|l| l["fact"]["kind"] == "hsm_enrolled")
        .expect("hsm_enrolled");
    assert_eq!(enrolled["actor"]["kind"], "operator");

    // --follow from where the previous run stopped: prints what is
    // appended after it started.
    let keysync = find_binary("keysync").expect("keysync binary");
    let mut follow = tokio::process::Command::new(&keysync)
        .args(["--nats", &url, "audit", "export", "--json", "--follow"])
        .args(["--since", &last.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("follow");
    let second = create(KeyType::Ed25519).await;
    let second_id = second.info.key_id.to_string();
    let mut lines = BufReader::new(follow.stdout.take().expect("stdout")).lines();
    let mut followed = Vec::new();
    let saw_it = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(l)) = lines.next_line().await {
            let v: serde_json::Value = serde_json::from_str(&l).expect("JSON line");
            let done =
                v["fact"]["kind"] == "key_replicated" && v["fact"]["key_id"] == second_id.as_str();
            followed.push(v);
            if done {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(
        saw_it,
        "--follow never printed the new key's records: {followed:?}"
    );
    assert_eq!(seq(&followed[0]), last + 1, "{followed:?}");
    assert!(followed
        .iter()
        .any(|l| l["fact"]["kind"] == "key_created" && l["fact"]["key_id"] == second_id.as_str()));
    follow.kill().await.expect("stop following");

    // --since SEQ resumes exactly: the full export's records after it, no
    // more, no fewer.
    let all = export(&url, &[]);
    let resumed = export(&url, &["--since", &last.to_string()]);
    let want: Vec<&serde_json::Value> = all.iter().filter(|l| seq(l) > last).collect();
    assert_eq!(resumed.iter().collect::<Vec<_>>(), want);
    assert_eq!(
        &resumed[..followed.len()],
        &followed[..],
        "--follow and --since printed different records"
    );
    // --since TIME: the records of facts at or after it.
    let at = followed[0]["event_time"]
        .as_str()
        .expect("time")
        .to_string();
    let by_time = export(&url, &["--since", &at]);
    assert!(
        !by_time.is_empty()
            && by_time
                .iter()
                .all(|l| l["event_time"].as_str() >= Some(at.as_str()))
    );
    assert_eq!(seq(&by_time[0]), seq(&followed[0]));
    // Past the end: nothing, at once.
    let end = seq(all.last().expect("records"));
    assert!(export(&url, &["--since", &end.to_string()]).is_empty());
    // Not a sequence nor a time: refused, saying what it takes.
    let bad = keysync_cli(&[
        "--nats",
        &url,
        "audit",
        "export",
        "--json",
        "--since",
        "yesterday",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("RFC 3339"));

    // `| head -1`: the reader goes away; the export's next write ends it
    // quietly (exit 0, no panic).
    let mut piped = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(r#"set -o pipefail; "$0" --nats "$1" audit export --json --follow | head -1"#)
        .arg(&keysync)
        .arg(&url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("bash");
    let mut head = BufReader::new(piped.stdout.take().expect("stdout")).lines();
    let one = tokio::time::timeout(Duration::from_secs(10), head.next_line())
        .await
        .expect("head printed a line")
        .expect("read");
    assert!(one.is_some());
    // A record appended after head left: the export writes into a closed pipe.
    create(KeyType::Aes256).await;
    let out = tokio::time::timeout(Duration::from_secs(20), piped.wait_with_output())
        .await
        .expect("the export ended once its reader was gone")
        .expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    stack.shutdown().await;
}
