//! Retry policies, sized from the cluster's live sync latency.
//!
//! Two kinds of failure are retried apart: "key not found" on a route that
//! may reach an HSM the key has not reached yet (the wait is bounded by a
//! budget derived from the live sync-latency p99), and transient bus
//! failures (no responder, timeout), retried a few times quickly. The
//! backoff itself is the `backon` crate's.

use std::time::Duration;

use backon::ExponentialBuilder;
use keysync_schemas::SyncMetrics;

/// How the SDK retries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retry `KeyNotFound` on the any-HSM route (within the budget).
    pub key_not_found: bool,
    /// Retry transient failures (no HSM answered).
    pub transient: bool,
    /// How long, in backoff delays, a request that reached no HSM (no
    /// responders) is retried: a NATS restart leaves agents resubscribing
    /// for a second or two, and a create must not fail for it.
    pub transient_budget: Duration,
    /// How many times a timed-out request is sent again.
    pub timeout_retries: u32,
    /// Budget for not-found retries when no metrics have been seen yet.
    pub fallback_budget: Duration,
    /// Budget bounds.
    pub min_budget: Duration,
    /// Budget bounds.
    pub max_budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            key_not_found: true,
            transient: true,
            transient_budget: Duration::from_secs(5),
            timeout_retries: 3,
            fallback_budget: Duration::from_secs(2),
            min_budget: Duration::from_millis(50),
            max_budget: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        RetryPolicy {
            key_not_found: false,
            transient: false,
            timeout_retries: 0,
            ..Default::default()
        }
    }

    /// How long a key may take to reach an HSM, from the live metrics:
    /// 3 × the sync-latency p99 of the last window (or of all time if the
    /// window saw nothing) plus 10 ms, within [min_budget, max_budget].
    pub fn not_found_budget(&self, metrics: Option<&SyncMetrics>) -> Duration {
        let p99_ms = metrics.and_then(|m| {
            [&m.sync_latency_window, &m.sync_latency_total]
                .into_iter()
                .find(|s| s.count > 0)
                .map(|s| s.p99_ms)
        });
        match p99_ms {
            Some(ms) => Duration::from_secs_f64((3.0 * ms + 10.0) / 1_000.0)
                .clamp(self.min_budget, self.max_budget),
            None => self.fallback_budget,
        }
    }

    /// Exponential backoff with jitter that spends at most `budget`.
    pub fn not_found_backoff(&self, budget: Duration) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay((budget / 64).max(Duration::from_micros(200)))
            .with_max_delay((budget / 4).max(Duration::from_millis(1)))
            .with_factor(2.0)
            .with_jitter()
            .with_total_delay(Some(budget))
            .with_max_times(64)
    }

    /// Quick retries for transient failures, spending at most
    /// `transient_budget` in delays.
    pub fn transient_backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(20))
            .with_max_delay(Duration::from_millis(250))
            .with_jitter()
            .with_total_delay(Some(self.transient_budget))
            .with_max_times(if self.transient { 64 } else { 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::BackoffBuilder as _;
    use keysync_schemas::LatencySummary;

    #[test]
    fn requests_that_reached_no_hsm_are_retried_through_a_reconnect_window() {
        // Agents resubscribe a second or two after a NATS restart: the
        // transient retries must span that, and stop at the budget.
        let p = RetryPolicy::default();
        let total: Duration = p.transient_backoff().build().sum();
        assert!(total >= Duration::from_secs(3), "{total:?}");
        assert!(
            total <= p.transient_budget + Duration::from_millis(250),
            "{total:?}"
        );
        assert_eq!(RetryPolicy::none().transient_backoff().build().count(), 0);
    }

    #[test]
    fn budget_follows_the_live_p99() {
        let p = RetryPolicy::default();
        assert_eq!(p.not_found_budget(None), p.fallback_budget);
        let mut m = SyncMetrics {
            sync_latency_total: LatencySummary {
                count: 10,
                p99_ms: 20.0,
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(p.not_found_budget(Some(&m)), Duration::from_millis(70));
        m.sync_latency_window = LatencySummary {
            count: 5,
            p99_ms: 1.0,
            ..Default::default()
        };
        assert_eq!(
            p.not_found_budget(Some(&m)),
            Duration::from_millis(50),
            "clamped"
        );
        m.sync_latency_window.p99_ms = 60_000.0;
        assert_eq!(p.not_found_budget(Some(&m)), p.max_budget);
    }
}
