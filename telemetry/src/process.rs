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

/// Logs the connection's own events as this process's: a lost connection
/// is a warning an operator should see (async-nats logs them at info,
/// which a service's default filter keeps quiet), a reconnection is info.
pub fn log_connection_events(options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
    options.event_callback(|event| async move {
        match event {
            async_nats::Event::Connected => tracing::info!("connected to NATS"),
            async_nats::Event::Disconnected => {
                tracing::warn!("disconnected from NATS; reconnecting")
            }
            async_nats::Event::LameDuckMode => {
                tracing::warn!("the NATS server is shutting down (lame duck mode)")
            }
            async_nats::Event::SlowConsumer(sid) => {
                tracing::warn!(sid, "slow consumer: NATS dropped messages")
            }
            other => tracing::warn!(event = %other, "NATS connection event"),
        }
    })
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

/// How long a run may take to finish after the stop signal before
/// [`supervise`] returns without it: below the 5 s a service manager (or
/// the harness) commonly waits before SIGKILL, so a stop never needs one.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// Crash-only supervision: calls `run` with a shutdown future until it
/// returns `Ok` (a clean stop) or fails after a stop signal; any other
/// failure is logged and `run` is started again after a short pause. The
/// state that matters lives in JetStream and the process's own store, so a
/// fresh run finishes what the failed one left.
///
/// A stop signal always ends it within [`STOP_GRACE`]: a run that does not
/// return by then (stuck waiting on a NATS server that is gone, say) is
/// dropped, and so is a pause between runs. Dropping a run is safe for the
/// same reason restarting one is.
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
    supervise_until(what, stop, STOP_GRACE, &mut run).await
}

/// [`supervise`] with its stop signal and grace given (for tests).
async fn supervise_until<F, Fut>(
    what: &str,
    stop: tokio::sync::watch::Receiver<bool>,
    grace: Duration,
    run: &mut F,
) -> Result<(), anyhow::Error>
where
    F: FnMut(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = Result<(), anyhow::Error>>,
{
    // Resolves `grace` after the stop signal.
    let stopped_for_good = |mut stop: tokio::sync::watch::Receiver<bool>, grace: Duration| async move {
        let _ = stop.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    };
    loop {
        let mut stop_rx = stop.clone();
        let shutdown = Box::pin(async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        });
        let outcome = tokio::select! {
            r = run(shutdown) => r,
            _ = stopped_for_good(stop.clone(), grace) => {
                tracing::warn!("{what} did not stop within {grace:?} of the stop signal; exiting without it");
                return Ok(());
            }
        };
        match outcome {
            Ok(()) => return Ok(()),
            Err(e) if *stop.borrow() => return Err(e),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "{what} stopped; starting again");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stopped_for_good(stop.clone(), Duration::ZERO) => return Ok(()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run that ignores its shutdown future (stuck on a dead server)
    /// is dropped `grace` after the stop signal.
    #[tokio::test]
    async fn a_stuck_run_is_dropped_after_the_grace() {
        let (tx, stop) = tokio::sync::watch::channel(false);
        let started = tokio::time::Instant::now();
        let supervised = tokio::spawn(async move {
            let mut run = |_shutdown| std::future::pending::<Result<(), anyhow::Error>>();
            supervise_until("test", stop, Duration::from_millis(200), &mut run).await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(true).expect("send");
        let result = tokio::time::timeout(Duration::from_secs(5), supervised)
            .await
            .expect("supervise returned")
            .expect("task");
        assert!(result.is_ok());
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    /// A run that fails over and over is not restarted after the stop.
    #[tokio::test]
    async fn a_failing_run_is_not_restarted_after_the_stop() {
        let (tx, stop) = tokio::sync::watch::channel(false);
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = runs.clone();
        let supervised = tokio::spawn(async move {
            let mut run = move |_shutdown| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { Err::<(), _>(anyhow::anyhow!("fails")) }
            };
            supervise_until("test", stop, Duration::from_secs(10), &mut run).await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(true).expect("send");
        let _ = tokio::time::timeout(Duration::from_secs(2), supervised)
            .await
            .expect("supervise returned at once")
            .expect("task");
        assert!(runs.load(std::sync::atomic::Ordering::SeqCst) <= 2);
    }
}
