//! One key's life is one trace: the CLI's create, the creating agent, the
//! orchestrator's fan-out, each target agent's apply and the replicated
//! announcement, exported over OTLP/HTTP by every process to a real
//! receiver started here, which decodes the OTLP protobuf. The spans follow
//! the OpenTelemetry conventions: kinds, messaging attributes, the key id,
//! ERROR status on failure, retries as children of one operation.

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
    /// OTLP SpanKind: 2 server, 3 client, 4 producer, 5 consumer.
    kind: i32,
    attrs: HashMap<String, String>,
    /// OTLP status code (2 = ERROR) and message.
    status: (i32, String),
}

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;
const ERROR: i32 = 2;

type Spans = Arc<Mutex<Vec<Span>>>;

fn attr_map(attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> HashMap<String, String> {
    attrs
        .iter()
        .filter_map(|kv| {
            let v = match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                Value::BoolValue(b) => b.to_string(),
                _ => return None,
            };
            Some((kv.key.clone(), v))
        })
        .collect()
}

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
                        attrs: attr_map(&s.attributes),
                        kind: s.kind,
                        status: s.status.map(|st| (st.code, st.message)).unwrap_or_default(),
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
                    in_trace.iter().any(|s| {
                        s.process == "orchestrator"
                            && s.name == "keysync.event"
                            && in_trace.iter().any(|p| {
                                p.span_id == s.parent
                                    && p.name == "keysync.publish"
                                    && p.parent == apply.span_id
                            })
                    })
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
    // A consumer's parent is the producer's publish span, whose parent is
    // the span that caused it.
    let via_publish = |child: &Span, cause: &Span| {
        by_id.get(child.parent.as_slice()).is_some_and(|p| {
            p.name == "keysync.publish" && p.kind == PRODUCER && p.parent == cause.span_id
        })
    };
    for target in ["hsm-agent/hsm-2", "hsm-agent/hsm-3"] {
        let apply = all
            .iter()
            .find(|s| s.process == target && s.name == "keysync.apply")
            .unwrap_or_else(|| panic!("{target} apply span"));
        assert!(
            via_publish(apply, fan_out),
            "{target}'s apply is a child of the fan-out's publish of its command"
        );
        assert!(
            all.iter().any(|s| s.process == "orchestrator"
                && s.name == "keysync.event"
                && via_publish(s, apply)),
            "the orchestrator handled {target}'s CloneApplied in the same trace"
        );
    }

    // Span kinds.
    let kind_of = |name: &str| -> HashSet<i32> {
        all.iter()
            .filter(|s| s.name == name)
            .map(|s| s.kind)
            .collect()
    };
    assert_eq!(kind_of("keysync.create_key"), HashSet::from([CLIENT]));
    assert_eq!(kind_of("keysync.request"), HashSet::from([CLIENT]));
    assert_eq!(kind_of("keysync.op"), HashSet::from([SERVER]));
    assert_eq!(kind_of("keysync.publish"), HashSet::from([PRODUCER]));
    assert_eq!(kind_of("keysync.event"), HashSet::from([CONSUMER]));
    assert_eq!(kind_of("keysync.apply"), HashSet::from([CONSUMER]));

    // Messaging attributes.
    for s in all.iter().filter(|s| s.name != "keysync.create_key") {
        let a = &s.attrs;
        assert_eq!(
            a.get("messaging.system").map(String::as_str),
            Some("nats"),
            "{s:?}"
        );
        assert!(
            a.get("messaging.destination.name")
                .is_some_and(|d| d.starts_with("keysync.")),
            "{s:?}"
        );
        let op = a.get("messaging.operation.type").map(String::as_str);
        match s.kind {
            PRODUCER => assert_eq!(op, Some("send"), "{s:?}"),
            CONSUMER | SERVER => assert_eq!(op, Some("process"), "{s:?}"),
            _ => assert_eq!(op, Some("send"), "{s:?}"),
        }
        if s.kind == PRODUCER || s.kind == CONSUMER {
            assert!(
                a.get("messaging.message.id").is_some_and(|m| !m.is_empty()),
                "{s:?}"
            );
        }
        if s.kind == CONSUMER {
            assert!(
                a.get("messaging.nats.stream_sequence")
                    .and_then(|q| q.parse::<u64>().ok())
                    .is_some_and(|q| q > 0),
                "{s:?}"
            );
        }
    }

    // The key id on every span of the key's trace, the one the CLI printed.
    let created: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("key create --json prints JSON");
    let key_id = all
        .iter()
        .find(|s| s.name == "keysync.create_key")
        .and_then(|s| s.attrs.get("keysync.key_id"))
        .expect("the create span has the key id")
        .clone();
    assert!(
        created.to_string().contains(&key_id),
        "{created} / {key_id}"
    );
    for s in &all {
        assert_eq!(s.attrs.get("keysync.key_id"), Some(&key_id), "{s:?}");
        assert_ne!(s.status.0, ERROR, "{s:?}");
    }

    // A failed operation: signing with a key no HSM holds, on any HSM. One
    // operation span, ERROR with the error kind; each attempt (the SDK
    // retries a key not found on the any-HSM route) is its child; the
    // agents' spans are ERROR key_not_found.
    let unknown = uuid::Uuid::now_v7().to_string();
    let failed = keysync_testkit::keysync_cli(&[
        "--nats",
        &url,
        "key",
        "sign",
        &unknown,
        "--data-hex",
        "00",
    ]);
    assert!(
        !failed.status.success(),
        "signing with an unknown key fails"
    );
    let sign_root = || {
        spans
            .lock()
            .expect("lock")
            .iter()
            .find(|s| s.name == "keysync.sign" && s.attrs.get("keysync.key_id") == Some(&unknown))
            .cloned()
    };
    let settled = keysync_testkit::wait_until(Duration::from_secs(20), || async {
        let Some(root) = sign_root() else {
            return false;
        };
        let all = spans.lock().expect("lock");
        let attempts = all
            .iter()
            .filter(|s| s.name == "keysync.request" && s.parent == root.span_id)
            .count();
        let ops = all
            .iter()
            .filter(|s| s.name == "keysync.op" && s.trace_id == root.trace_id)
            .count();
        attempts >= 2 && ops >= 2
    })
    .await;
    let root = sign_root().expect("the CLI exported its sign span");
    let in_trace: Vec<Span> = spans
        .lock()
        .expect("lock")
        .iter()
        .filter(|s| s.trace_id == root.trace_id)
        .cloned()
        .collect();
    assert!(settled, "{in_trace:#?}");
    assert!(root.parent.is_empty(), "the operation is the trace's root");
    assert_eq!(root.kind, CLIENT);
    assert_eq!(root.status.0, ERROR, "{root:?}");
    // Retried within the budget, then named for what it is: the log has
    // no such key (not "not yet replicated").
    assert_eq!(
        root.attrs.get("error.type").map(String::as_str),
        Some("no_such_key"),
        "{root:?}"
    );
    let attempts: Vec<&Span> = in_trace
        .iter()
        .filter(|s| s.name == "keysync.request")
        .collect();
    for a in &attempts {
        assert_eq!(
            a.parent, root.span_id,
            "every attempt is a child of the one operation"
        );
        assert_eq!(a.status.0, ERROR, "{a:?}");
        assert_eq!(a.attrs.get("keysync.key_id"), Some(&unknown));
    }
    for op in in_trace.iter().filter(|s| s.name == "keysync.op") {
        assert_eq!(op.kind, SERVER);
        assert_eq!(op.status.0, ERROR, "{op:?}");
        assert_eq!(
            op.attrs.get("error.type").map(String::as_str),
            Some("key_not_found"),
            "{op:?}"
        );
        assert_eq!(op.attrs.get("keysync.key_id"), Some(&unknown));
        assert!(
            attempts.iter().any(|a| a.span_id == op.parent),
            "each agent's span is a child of one attempt"
        );
    }
}
