//! What only binaries install: log output on stderr and, when the standard
//! OpenTelemetry variables say where, OTLP/HTTP span export. Behind the
//! `export` feature, so the SDK and the libraries that applications link do
//! not carry an exporter or its HTTP client.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
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
