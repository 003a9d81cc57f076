//! W3C trace context in NATS headers: what every process, the SDK included,
//! needs to continue a trace across the bus. It depends on the OpenTelemetry
//! API and propagator only, never on an exporter.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

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

/// Marks `span` failed: OpenTelemetry status ERROR, described as
/// "`kind`: `detail`", and `error.type` = `kind`. The span must declare
/// `otel.status_code`, `otel.status_description` and `error.type` (as
/// `tracing::field::Empty`) for them to be recorded.
pub fn fail(span: &tracing::Span, kind: &str, detail: &dyn std::fmt::Display) {
    span.record("error.type", kind);
    span.record("otel.status_code", "ERROR");
    span.record(
        "otel.status_description",
        format!("{kind}: {detail}").as_str(),
    );
}

/// The `Nats-Msg-Id` of a message, if it carries one (the
/// `messaging.message.id` of its spans).
pub fn message_id(headers: Option<&async_nats::HeaderMap>) -> Option<&str> {
    headers?.get("Nats-Msg-Id").map(|v| v.as_str())
}
