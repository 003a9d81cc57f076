//! What every keysync process does the same way: read a NATS server list,
//! wait for a stop signal, and restart its run after a failure.

use std::future::Future;
use std::time::Duration;

/// The servers of a `--nats` value: one URL, or several separated by commas.
pub fn servers(urls: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    urls.split(',')
        .map(|u| {
            u.trim()
                .parse()
                .map_err(|e| format!("invalid NATS URL {u:?}: {e}"))
        })
        .collect()
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}

/// Crash-only supervision: calls `run` with a shutdown future until it
/// returns `Ok` (a clean stop) or fails after a stop signal; any other
/// failure is logged and `run` is started again after a short pause. The
/// state that matters lives in JetStream and the process's own store, so a
/// fresh run finishes what the failed one left.
pub async fn supervise<F, Fut>(what: &str, mut run: F) -> Result<(), anyhow::Error>
where
    F: FnMut(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = Result<(), anyhow::Error>>,
{
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    loop {
        let mut stop_rx = stop.clone();
        let shutdown = Box::pin(async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        });
        match run(shutdown).await {
            Ok(()) => return Ok(()),
            Err(e) if *stop.borrow() => return Err(e),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "{what} stopped; starting again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
