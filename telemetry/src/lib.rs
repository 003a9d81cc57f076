//! Logging, OpenTelemetry tracing and the process lifecycle ([`process`])
//! shared by keysync's processes.
//!
//! [`init`] installs the log output every process has (stderr, `RUST_LOG`)
//! and, only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, an OTLP/HTTP span exporter
//! configured by the standard variables (`OTEL_EXPORTER_OTLP_PROTOCOL`,
//! `OTEL_SERVICE_NAME`, `OTEL_BSP_*`). Unset, nothing is exported.
//!
//! W3C trace context travels in NATS message headers ([`inject`],
//! [`follow`]) on every event, command and reply, so one key's life (the
//! client's create, the creating agent, the orchestrator's fan-out, each
//! target's apply, the replicated announcement) is one trace across
//! processes.

pub mod process;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer as _;

/// Flushes and shuts the exporter down when dropped (at process exit).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

fn endpoint_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

/// Installs logging (stderr; `RUST_LOG`, else `default_filter`) and, if an
/// OTLP endpoint is configured, span export. `service` names the process
/// unless `OTEL_SERVICE_NAME` does; `attributes` are added to its resource
/// (the HSM id, for an agent).
pub fn init(service: &str, attributes: &[(&str, String)], default_filter: &str) -> Telemetry {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    // async-nats logs every message's raw bytes at trace level, which would
    // put key material (an import request) in the log: it is capped at info
    // whatever RUST_LOG says.
    let filter = match "async_nats=info".parse() {
        Ok(cap) => filter.add_directive(cap),
        Err(_) => filter,
    };
    // The log filter applies to log output only: spans are traced at info
    // and above whatever the log level (a quiet CLI still traces).
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let provider = endpoint_configured()
        .then(|| provider(service, attributes))
        .flatten();
    let registry = tracing_subscriber::registry().with(fmt);
    match &provider {
        Some(p) => {
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            let layer = tracing_opentelemetry::layer()
                .with_tracer(p.tracer("keysync"))
                .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                    m.is_span()
                        && m.name().starts_with("keysync.")
                        && *m.level() <= tracing::Level::INFO
                }));
            let _ = registry.with(layer).try_init();
        }
        None => {
            let _ = registry.try_init();
        }
    }
    Telemetry { provider }
}

fn provider(service: &str, attributes: &[(&str, String)]) -> Option<SdkTracerProvider> {
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("warning: OpenTelemetry export disabled: {e}");
            return None;
        }
    };
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_string());
    }
    let resource = resource
        .with_attributes(
            attributes
                .iter()
                .map(|(k, v)| KeyValue::new(k.to_string(), v.clone())),
        )
        .build();
    Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    )
}

struct HeaderInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // An empty tracestate is not worth a header.
        if !value.is_empty() {
            self.0.insert(key, value.as_str());
        }
    }
}

struct HeaderExtractor<'a>(&'a async_nats::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes `span`'s trace context (`traceparent`, `tracestate` if any) into
/// NATS headers. A no-op when nothing is being traced.
pub fn inject(span: &tracing::Span, headers: &mut async_nats::HeaderMap) {
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// Makes `span` a child of the trace context carried in `headers`, if any.
pub fn follow(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    if let Some(h) = headers {
        let cx = TraceContextPropagator::new().extract(&HeaderExtractor(h));
        let _ = span.set_parent(cx);
    }
}
