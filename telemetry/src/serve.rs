//! The HTTP endpoint of a keysync process (`--metrics-addr`):
//!
//! - `GET /metrics`: the process's Prometheus registry, in the text format;
//! - `GET /healthz`: 200 while the process runs (liveness);
//! - `GET /readyz`: 200 when the process can do its work, else 503 with
//!   what it is waiting for, one per line (readiness, for load balancers
//!   and orchestration systems).
//!
//! The registry's metrics are updated by the process as it works; a scrape
//! only encodes them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::registry::Registry;

/// What a process is still waiting for before it is ready: empty when ready.
pub type Readiness = Arc<dyn Fn() -> Vec<&'static str> + Send + Sync>;

/// The Prometheus text format (0.0.4), which `promtool check metrics`
/// reads. (prometheus-client's default `text::encode` writes OpenMetrics,
/// whose counter families are named without `_total`: promtool then finds
/// every counter without help text.)
const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Why the endpoint could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound (in use, not local, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Accepting connections failed.
    #[error("accepting a connection on {addr}: {source}")]
    Accept {
        /// The address served.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// The answer to one request.
pub fn respond(
    method: &Method,
    path: &str,
    registry: &Registry,
    ready: &Readiness,
) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != Method::GET && method != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n".into());
    }
    match path {
        "/metrics" => {
            let mut out = String::new();
            match prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
                Ok(()) => reply(StatusCode::OK, PROMETHEUS_TEXT, out),
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    "encoding failed\n".into(),
                ),
            }
        }
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" => {
            let waiting = ready();
            if waiting.is_empty() {
                reply(StatusCode::OK, TEXT, "ready\n".into())
            } else {
                let mut body = String::from("not ready:\n");
                for w in waiting {
                    body.push_str(w);
                    body.push('\n');
                }
                reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, body)
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the task is
/// aborted.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: Readiness,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    loop {
        let (stream, _) = listener
            .accept()
            .await
            .map_err(|source| ServeError::Accept { addr, source })?;
        let registry = registry.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = respond(req.method(), req.uri().path(), &registry, &ready);
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    async fn body(r: Response<Full<Bytes>>) -> (StatusCode, String) {
        use http_body_util::BodyExt as _;
        let status = r.status();
        let bytes = match r.into_body().collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) => match e {},
        };
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn metrics_health_and_readiness_answer() {
        let mut registry = Registry::default();
        let c = Counter::<u64>::default();
        registry.register("demo_things", "Things", c.clone());
        c.inc_by(3);
        let waiting = Arc::new(std::sync::Mutex::new(vec!["nats"]));
        let w = waiting.clone();
        let ready: Readiness = Arc::new(move || w.lock().map(|v| v.clone()).unwrap_or_default());

        let (status, text) = body(respond(&Method::GET, "/metrics", &registry, &ready)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("demo_things_total 3"), "{text}");
        assert_eq!(
            body(respond(&Method::GET, "/healthz", &registry, &ready))
                .await
                .0,
            StatusCode::OK
        );
        let (status, text) = body(respond(&Method::GET, "/readyz", &registry, &ready)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(text.contains("nats"), "{text}");
        if let Ok(mut v) = waiting.lock() {
            v.clear();
        }
        assert_eq!(
            body(respond(&Method::GET, "/readyz", &registry, &ready))
                .await
                .0,
            StatusCode::OK
        );
        assert_eq!(
            body(respond(&Method::GET, "/nope", &registry, &ready))
                .await
                .0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            body(respond(&Method::POST, "/metrics", &registry, &ready))
                .await
                .0,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
