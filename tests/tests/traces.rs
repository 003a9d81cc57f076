//! One key's life is one trace: the CLI's create, the creating agent, the
//! orchestrator's fan-out, each target agent's apply and the replicated
//! announcement, exported over OTLP/HTTP by every process to a real
//! receiver started here, which decodes the OTLP protobuf.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;

#[derive(Debug, Clone)]
struct Span {
    process: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
}

type Spans = Arc<Mutex<Vec<Span>>>;

fn attr(attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> Option<String> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

async fn receive(
    req: hyper::Request<hyper::body::Incoming>,
    spans: Spans,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if let Ok(export) = ExportTraceServiceRequest::decode(body) {
        let mut out = spans.lock().expect("lock");
        for rs in export.resource_spans {
            let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let service = attr(&attrs, "service.name").unwrap_or_default();
            let process = match attr(&attrs, "keysync.hsm_id") {
                Some(h) => format!("{service}/{h}"),
                None => service,
            };
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Span {
                        process: process.clone(),
                        name: s.name,
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent: s.parent_span_id,
                    });
                }
            }
        }
    }
    Ok(hyper::Response::new(Full::new(Bytes::new())))
}

async fn otlp_receiver() -> (u16, Spans) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let spans: Spans = Arc::default();
    let shared = spans.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let spans = shared.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| receive(req, spans.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (port, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_keys_life_is_one_trace_across_processes() {
    let (port, spans) = otlp_receiver().await;
    // Every process of this test (the stack's children, the CLI) exports here.
    std::env::set_var(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        format!("http://127.0.0.1:{port}"),
    );
    std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf");
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    let stack = keysync_testkit::start_stack(3).await;
    let url = stack.url();
    let out = keysync_testkit::keysync_cli(&[
        "--nats",
        &url,
        "key",
        "create",
        "--type",
        "p256",
        "--hsm",
        "hsm-1",
        "--durability",
        "all",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The CLI's create is the root of the trace.
    let root_trace = || {
        spans
            .lock()
            .expect("lock")
            .iter()
            .find(|s| s.process == "keysync" && s.name == "keysync.create_key")
            .map(|s| s.trace_id.clone())
    };
    let expected_processes: HashSet<&str> = [
        "keysync",
        "hsm-agent/hsm-1",
        "orchestrator",
        "hsm-agent/hsm-2",
        "hsm-agent/hsm-3",
    ]
    .into();
    let complete = keysync_testkit::wait_until(Duration::from_secs(20), || async {
        let Some(trace) = root_trace() else {
            return false;
        };
        let all = spans.lock().expect("lock");
        let in_trace: Vec<&Span> = all.iter().filter(|s| s.trace_id == trace).collect();
        let procs: HashSet<&str> = in_trace.iter().map(|s| s.process.as_str()).collect();
        // Spans arrive in each process's export batches, in any order:
        // wait for the last links of the flow too (each target's apply and
        // the orchestrator's handling of its CloneApplied), not only for
        // every process to have sent something.
        let handled_apply = |target: &str| {
            in_trace
                .iter()
                .filter(|s| s.process == target && s.name == "keysync.apply")
                .any(|apply| {
                    in_trace
                        .iter()
                        .any(|s| s.process == "orchestrator" && s.parent == apply.span_id)
                })
        };
        expected_processes.is_subset(&procs)
            && handled_apply("hsm-agent/hsm-2")
            && handled_apply("hsm-agent/hsm-3")
    })
    .await;
    let Some(trace) = root_trace() else {
        let seen: Vec<(String, String)> = spans
            .lock()
            .expect("lock")
            .iter()
            .map(|s| (s.process.clone(), s.name.clone()))
            .collect();
        panic!("the CLI exported no create span; received {seen:?}");
    };
    let all: Vec<Span> = spans
        .lock()
        .expect("lock")
        .iter()
        .filter(|s| s.trace_id == trace)
        .cloned()
        .collect();
    assert!(
        complete,
        "processes in the trace: {:?}",
        all.iter()
            .map(|s| (&s.process, &s.name))
            .collect::<Vec<_>>()
    );

    // Parent links: every span but the root has its parent in the trace,
    // and the chain crosses processes in the order of the flow.
    let by_id: HashMap<&[u8], &Span> = all.iter().map(|s| (s.span_id.as_slice(), s)).collect();
    for s in &all {
        if s.parent.is_empty() {
            assert_eq!(
                (s.process.as_str(), s.name.as_str()),
                ("keysync", "keysync.create_key"),
                "a second root"
            );
        } else {
            assert!(
                by_id.contains_key(s.parent.as_slice()),
                "{s:?} has a parent outside the trace"
            );
        }
    }
    let parent_process = |s: &Span| by_id.get(s.parent.as_slice()).map(|p| p.process.clone());
    let op = all
        .iter()
        .find(|s| s.process == "hsm-agent/hsm-1" && s.name == "keysync.op")
        .expect("the creating agent's op span");
    assert_eq!(parent_process(op).as_deref(), Some("keysync"));
    let fan_out = all
        .iter()
        .find(|s| {
            s.process == "orchestrator"
                && s.name == "keysync.event"
                && parent_process(s).as_deref() == Some("hsm-agent/hsm-1")
        })
        .expect("the orchestrator's span for KeyCreated, child of the creating agent");
    for target in ["hsm-agent/hsm-2", "hsm-agent/hsm-3"] {
        let apply = all
            .iter()
            .find(|s| s.process == target && s.name == "keysync.apply")
            .unwrap_or_else(|| panic!("{target} apply span"));
        assert_eq!(
            apply.parent, fan_out.span_id,
            "{target}'s apply is a child of the fan-out"
        );
        assert!(
            all.iter()
                .any(|s| s.process == "orchestrator" && s.parent == apply.span_id),
            "the orchestrator handled {target}'s CloneApplied in the same trace"
        );
    }
}
