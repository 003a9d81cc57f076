//! What only binaries install: log output on stderr and, when the standard
//! OpenTelemetry variables say where, OTLP/HTTP span export. Behind the
//! `export` feature, so the SDK and the libraries that applications link do
//! not carry an exporter or its HTTP client.

use std::io::IsTerminal as _;

use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::FilterExt as _;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime as _;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer as _;

/// How log lines are written on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: one line per event, coloured only when stderr is a
    /// terminal.
    #[default]
    Text,
    /// For log shippers: one JSON object per line, with the OpenTelemetry
    /// trace and span ids of the current span when there is one.
    Json,
}

/// Why telemetry could not be set up as asked.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// An OTLP protocol this build does not speak (gRPC needs the tonic
    /// exporter, which is not built in). Unset the variable, or set it to a
    /// supported value.
    #[error("{variable}={value:?} is not supported: this build exports OTLP over {supported} only (unset it, or set it to that)", supported = SUPPORTED_PROTOCOLS.join(", "))]
    UnsupportedProtocol {
        /// The variable that asked for it.
        variable: &'static str,
        /// What it asked for.
        value: String,
    },
}

/// The OTLP protocols this build exports with; the first is the default,
/// as the OTLP exporter specification says.
pub const SUPPORTED_PROTOCOLS: &[&str] = &["http/protobuf"];

/// Flushes and shuts the exporter down when dropped (at process exit).
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.exporting
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
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

/// Refuses an OTLP protocol this build does not speak, whether or not an
/// endpoint is set: a variable that would be ignored is a mistake to show,
/// not to hide. The traces-specific variable wins, as the specification
/// says.
fn check_protocol() -> Result<(), InitError> {
    for variable in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        let Ok(value) = std::env::var(variable) else {
            continue;
        };
        if value.trim().is_empty() {
            continue;
        }
        if SUPPORTED_PROTOCOLS.contains(&value.trim()) {
            return Ok(());
        }
        return Err(InitError::UnsupportedProtocol { variable, value });
    }
    Ok(())
}

/// Installs logging (stderr in `format`; `RUST_LOG`, else `default_filter`)
/// and OpenTelemetry tracing: trace context always (so log lines carry
/// trace ids and traces continue across processes), span export only if an
/// OTLP endpoint is configured. `service` names the process unless
/// `OTEL_SERVICE_NAME` does; `attributes` are added to its resource (the
/// HSM id, for an agent).
pub fn init(
    service: &str,
    attributes: &[(&str, String)],
    default_filter: &str,
    format: LogFormat,
) -> Result<Telemetry, InitError> {
    check_protocol()?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    // async-nats logs every message's raw bytes at trace level, which would
    // put key material (an import request) in the log: it is capped at info
    // whatever RUST_LOG says. A cap only: it never turns on what the filter
    // leaves off (`RUST_LOG=error` silences async-nats too).
    let cap = tracing_subscriber::filter::filter_fn(|m| {
        !(m.target().starts_with("async_nats") && *m.level() > tracing::Level::INFO)
    });
    let filter = filter.and(cap);
    // The log filter applies to log output only: spans are traced at info
    // and above whatever the log level (a quiet CLI still traces).
    let slot = DispatchSlot::default();
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(JsonLines(slot.clone()))
            .with_filter(filter)
            .boxed(),
    };
    let exporting = endpoint_configured();
    let provider = provider(service, attributes, exporting);
    let exporting = exporting && provider.1;
    let provider = provider.0;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("keysync"))
        .with_filter(tracing_subscriber::filter::filter_fn(|m| {
            m.is_span() && m.name().starts_with("keysync.") && *m.level() <= tracing::Level::INFO
        }));
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(slot)
        .try_init();
    Ok(Telemetry {
        provider,
        exporting,
    })
}

/// The tracer provider: with an OTLP/HTTP batch exporter when `export` (and
/// whether that exporter could be built), else one that only makes trace
/// context.
fn provider(
    service: &str,
    attributes: &[(&str, String)],
    export: bool,
) -> (SdkTracerProvider, bool) {
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
    let builder = SdkTracerProvider::builder().with_resource(resource);
    if !export {
        return (builder.build(), false);
    }
    match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(exporter) => (builder.with_batch_exporter(exporter).build(), true),
        Err(e) => {
            eprintln!("warning: OpenTelemetry export disabled: {e}");
            (builder.build(), false)
        }
    }
}

/// Where [`JsonLines`] finds the subscriber it formats for (to ask the
/// OpenTelemetry layer for a span's context): set when the subscriber is
/// registered, since the current dispatcher cannot be asked from inside one
/// of its own callbacks.
#[derive(Clone, Default)]
struct DispatchSlot(std::sync::Arc<std::sync::OnceLock<tracing::dispatcher::WeakDispatch>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for DispatchSlot {
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        let _ = self.0.set(subscriber.downgrade());
    }
}

/// One JSON object per event: `timestamp`, `level`, `target`, `message`,
/// the event's other `fields`, the current `span`'s name and, when it has
/// one, its OpenTelemetry `trace_id` and `span_id` (hex, as W3C
/// `traceparent` writes them).
struct JsonLines(DispatchSlot);

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut timestamp = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let meta = event.metadata();
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        let mut line = serde_json::Map::new();
        line.insert("timestamp".into(), timestamp.into());
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        if let Some(message) = fields.message {
            line.insert("message".into(), message);
        }
        if !fields.fields.is_empty() {
            line.insert("fields".into(), fields.fields.into());
        }
        if let Some(current) = ctx.lookup_current() {
            line.insert("span".into(), current.name().into());
            // The nearest traced span: the OpenTelemetry layer sees only
            // keysync's own spans.
            let dispatch = self.0 .0.get().and_then(|d| d.upgrade());
            let traced = current.scope().find_map(|span| {
                let cx = tracing_opentelemetry::get_otel_context(&span.id(), dispatch.as_ref()?)?;
                let sc = cx.span().span_context().clone();
                sc.is_valid().then_some(sc)
            });
            if let Some(sc) = traced {
                line.insert("trace_id".into(), sc.trace_id().to_string().into());
                line.insert("span_id".into(), sc.span_id().to_string().into());
            }
        }
        let text =
            serde_json::to_string(&serde_json::Value::Object(line)).map_err(|_| std::fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

#[derive(Default)]
struct JsonFields {
    message: Option<serde_json::Value>,
    fields: serde_json::Map<String, serde_json::Value>,
}

impl JsonFields {
    fn put(&mut self, field: &tracing::field::Field, value: serde_json::Value) {
        if field.name() == "message" {
            self.message = Some(value);
        } else {
            self.fields.insert(field.name().to_string(), value);
        }
    }
}

impl tracing::field::Visit for JsonFields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_is_refused_with_the_supported_protocols_named() {
        let e = InitError::UnsupportedProtocol {
            variable: "OTEL_EXPORTER_OTLP_PROTOCOL",
            value: "grpc".into(),
        };
        let text = e.to_string();
        assert!(
            text.contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"grpc\""),
            "{text}"
        );
        assert!(text.contains("http/protobuf"), "{text}");
    }

    /// A JSON line of an event inside a traced span carries that span's
    /// trace and span ids, and the fields with their JSON types.
    #[test]
    fn json_lines_carry_the_trace_context() {
        let provider = SdkTracerProvider::builder().build();
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink = buf.clone();
        let slot = DispatchSlot::default();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .event_format(JsonLines(slot.clone()))
                    .with_writer(move || SharedBuf(sink.clone())),
            )
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(slot);
        let (trace_id, span_id) = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("keysync.test");
            let _entered = span.enter();
            tracing::info!(n = 3, ok = true, who = "a \"quoted\"\nname", "hello");
            use tracing_opentelemetry::OpenTelemetrySpanExt as _;
            let sc = span.context().span().span_context().clone();
            (sc.trace_id().to_string(), sc.span_id().to_string())
        });
        let out = String::from_utf8(buf.lock().expect("lock").clone()).expect("utf-8");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).expect("one JSON object");
        assert_eq!(v["message"], "hello");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["fields"]["n"], 3);
        assert_eq!(v["fields"]["ok"], true);
        assert_eq!(v["fields"]["who"], "a \"quoted\"\nname");
        assert_eq!(v["span"], "keysync.test");
        assert_eq!(v["trace_id"], trace_id.as_str());
        assert_eq!(v["span_id"], span_id.as_str());
        assert_eq!(trace_id.len(), 32);
    }

    #[derive(Clone)]
    struct SharedBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
