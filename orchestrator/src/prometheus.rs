//! The latest metrics as Prometheus text, served on `--metrics-addr`
//! (`GET /metrics`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use keysync_schemas::{LatencySummary, SyncMetrics};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The document the HTTP endpoint renders (the one last published).
pub type Latest = Arc<RwLock<Option<SyncMetrics>>>;

type Labels = Vec<(String, String)>;
type GaugeF = Gauge<f64, AtomicU64>;

fn gauge(registry: &mut Registry, name: &str, help: &str, value: f64) {
    let g = GaugeF::default();
    g.set(value);
    registry.register(name, help, g);
}

fn quantiles(fam: &Family<Labels, GaugeF>, base: &[(&str, &str)], s: &LatencySummary) {
    for (q, v) in [
        ("0.5", s.p50_ms),
        ("0.9", s.p90_ms),
        ("0.99", s.p99_ms),
        ("1", s.max_ms),
    ] {
        let mut labels: Labels = base
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.push(("quantile".into(), q.into()));
        fam.get_or_create(&labels).set(v / 1_000.0);
    }
}

/// Renders a metrics document in the Prometheus text format.
pub fn render(m: &SyncMetrics) -> Result<String, std::fmt::Error> {
    let mut r = Registry::default();
    gauge(&mut r, "keysync_members", "Member HSMs", m.members as f64);
    gauge(&mut r, "keysync_keys", "Live keys", m.keys as f64);
    gauge(
        &mut r,
        "keysync_replicated_keys",
        "Keys that reached every member",
        m.replicated_total as f64,
    );
    gauge(
        &mut r,
        "keysync_pending_clones",
        "Clone commands outstanding",
        m.pending_clones as f64,
    );
    gauge(
        &mut r,
        "keysync_below_durability_keys",
        "Keys below their requested durability",
        m.below_durability as f64,
    );
    gauge(
        &mut r,
        "keysync_clone_failures",
        "Clone failures seen",
        m.clone_failures as f64,
    );

    let sync = Family::<Labels, GaugeF>::default();
    quantiles(&sync, &[("window", "last")], &m.sync_latency_window);
    quantiles(&sync, &[("window", "all")], &m.sync_latency_total);
    r.register(
        "keysync_sync_latency_seconds",
        "KeyCreated stored to the last CloneApplied stored",
        sync,
    );

    let keys = Family::<Labels, GaugeF>::default();
    let lag = Family::<Labels, GaugeF>::default();
    let clone = Family::<Labels, GaugeF>::default();
    for h in &m.hsms {
        let l: Labels = vec![("hsm".into(), h.hsm_id.clone())];
        keys.get_or_create(&l).set(h.keys as f64);
        lag.get_or_create(&l).set(h.lag as f64);
        quantiles(
            &clone,
            &[("hsm", &h.hsm_id), ("window", "all")],
            &h.clone_latency_total,
        );
    }
    r.register("keysync_hsm_keys", "Keys each HSM holds", keys);
    r.register("keysync_hsm_lag", "Live keys each HSM lacks", lag);
    r.register(
        "keysync_hsm_clone_latency_seconds",
        "KeyCreated stored to this HSM's CloneApplied stored",
        clone,
    );

    let rejected = Family::<Labels, GaugeF>::default();
    for (reason, n) in &m.rejected {
        rejected
            .get_or_create(&vec![("reason".into(), reason.to_string())])
            .set(*n as f64);
    }
    r.register(
        "keysync_rejected_messages",
        "Rejected messages by reason",
        rejected,
    );

    let mut out = String::new();
    encode(&mut out, &r)?;
    Ok(out)
}

async fn respond(
    req: Request<hyper::body::Incoming>,
    latest: Latest,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    };
    if req.uri().path() != "/metrics" {
        return Ok(reply(StatusCode::NOT_FOUND, "try /metrics\n".into()));
    }
    let doc = latest.read().ok().and_then(|l| l.clone());
    Ok(match doc.map(|d| render(&d)) {
        Some(Ok(text)) => reply(StatusCode::OK, text),
        Some(Err(_)) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding failed\n".into(),
        ),
        None => reply(StatusCode::SERVICE_UNAVAILABLE, "no metrics yet\n".into()),
    })
}

/// Serves `GET /metrics` on `addr` until the task is aborted.
pub async fn serve(addr: SocketAddr, latest: Latest) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    loop {
        let (stream, _) = listener.accept().await?;
        let latest = latest.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| respond(req, latest.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}
