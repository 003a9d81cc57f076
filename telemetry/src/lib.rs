//! Logging, OpenTelemetry tracing and the process lifecycle ([`process`])
//! shared by keysync's processes.
//!
//! [`init`] (feature `export`, for binaries) installs the log output every
//! process has (stderr, `RUST_LOG`, text or JSON lines) and, only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set, an OTLP/HTTP span exporter configured by the standard variables
//! (`OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_SERVICE_NAME`, `OTEL_BSP_*`). Unset,
//! nothing is exported; a protocol this build does not speak (`grpc`) is
//! refused.
//!
//! [`serve`] (feature `serve`, for binaries) is the HTTP endpoint every
//! process can open with `--metrics-addr`: Prometheus text on `/metrics`,
//! `/healthz` and `/readyz`.
//!
//! W3C trace context travels in NATS message headers ([`inject`],
//! [`follow`]) on every event, command and reply, so one key's life (the
//! client's create, the creating agent, the orchestrator's fan-out, each
//! target's apply, the replicated announcement) is one trace across
//! processes.

#[cfg(feature = "export")]
pub mod config_file;
mod context;
#[cfg(feature = "export")]
mod export;
pub mod process;
#[cfg(feature = "serve")]
pub mod serve;

pub use context::{fail, follow, inject, message_id};
#[cfg(feature = "export")]
pub use export::{init, InitError, LogFormat, Telemetry, SUPPORTED_PROTOCOLS};
