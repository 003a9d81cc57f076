//! Sync-latency statistics: HDR histograms fed by what each applied event
//! changed, summarised every second into the [`SyncMetrics`] document.
//!
//! "Total" figures cover every event folded (the whole log, replay
//! included: they are derived from stream timestamps, so replaying gives
//! the same numbers); "window" figures cover the events acted on since
//! the last summary.

use hdrhistogram::Histogram;
use keysync_schemas::{HsmMetrics, LatencySummary, SyncMetrics, METRICS_VERSION};

use crate::state::{Change, ClusterState};

/// Latencies are recorded in microseconds, 3 significant figures.
fn histogram() -> Histogram<u64> {
    // 1 µs .. 1 hour, auto-resizing beyond: construction cannot fail with
    // these bounds.
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .map(|mut h| {
            h.auto(true);
            h
        })
        .unwrap_or_else(|_| unreachable!("valid histogram bounds"))
}

fn record(h: &mut Histogram<u64>, ns: u64) {
    // Clamped to the histogram's range; auto-resize covers the rest.
    let _ = h.record((ns / 1_000).max(1));
}

/// Percentiles of a histogram, in milliseconds.
pub fn summary(h: &Histogram<u64>) -> LatencySummary {
    if h.is_empty() {
        return LatencySummary::default();
    }
    let ms = |us: u64| us as f64 / 1_000.0;
    LatencySummary {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
    }
}

/// Running statistics.
pub struct SyncStats {
    sync_window: Histogram<u64>,
    sync_total: Histogram<u64>,
    clone_window: Vec<Histogram<u64>>,
    clone_total: Vec<Histogram<u64>>,
    replicated_window: u64,
    window_start: std::time::Instant,
    /// Anti-entropy repair commands sent since start.
    pub repairs: u64,
}

impl Default for SyncStats {
    fn default() -> Self {
        SyncStats {
            sync_window: histogram(),
            sync_total: histogram(),
            clone_window: Vec::new(),
            clone_total: Vec::new(),
            replicated_window: 0,
            window_start: std::time::Instant::now(),
            repairs: 0,
        }
    }
}

impl SyncStats {
    /// Records what an applied event changed. Events `acting` on (caught
    /// up with the log, holding the lease) also count in the current window.
    pub fn observe(&mut self, change: &Change, acting: bool) {
        if let Change::Batch(changes) = change {
            for c in changes {
                self.observe(c, acting);
            }
            return;
        }
        if let Change::Completed(done) = change {
            for (_, latency_ns) in done {
                record(&mut self.sync_total, *latency_ns);
                if acting {
                    record(&mut self.sync_window, *latency_ns);
                    self.replicated_window += 1;
                }
            }
            return;
        }
        let &Change::Held {
            member,
            latency_ns,
            completed,
        } = change
        else {
            return;
        };
        let m = member as usize;
        while self.clone_total.len() <= m {
            self.clone_total.push(histogram());
            self.clone_window.push(histogram());
        }
        // The creator's own "clone" (latency 0) is not a clone.
        if latency_ns > 0 {
            record(&mut self.clone_total[m], latency_ns);
            if acting {
                record(&mut self.clone_window[m], latency_ns);
            }
        }
        if completed {
            record(&mut self.sync_total, latency_ns);
            if acting {
                record(&mut self.sync_window, latency_ns);
                self.replicated_window += 1;
            }
        }
    }

    /// The metrics document for the window that ends now; starts a new one.
    pub fn roll(
        &mut self,
        state: &ClusterState,
        orchestrator: &str,
        at_unix_ms: u64,
    ) -> SyncMetrics {
        let keys = state.key_count();
        let hsms = state
            .members()
            .enumerate()
            .map(|(i, m)| {
                let held = state.held_by(i as u8);
                HsmMetrics {
                    hsm_id: m.hsm.to_string(),
                    state: state.member_state(i as u8).as_str().to_string(),
                    keys: held,
                    lag: keys.saturating_sub(held),
                    clone_latency_window: self.clone_window.get(i).map(summary).unwrap_or_default(),
                    clone_latency_total: self.clone_total.get(i).map(summary).unwrap_or_default(),
                }
            })
            .collect::<Vec<_>>();
        let doc = SyncMetrics {
            version: METRICS_VERSION,
            orchestrator: orchestrator.to_string(),
            at_unix_ms,
            at: crate::lifecycle::rfc3339(at_unix_ms.saturating_mul(1_000_000)),
            window_secs: self.window_start.elapsed().as_secs_f64(),
            members: hsms.len() as u64,
            keys,
            replicated_window: self.replicated_window,
            replicated_total: state.completed_count(),
            sync_latency_window: summary(&self.sync_window),
            sync_latency_total: summary(&self.sync_total),
            pending_clones: state.pending_clones(),
            below_durability: state.below_durability(),
            clone_failures: state.clone_failures(),
            hsms,
            rejected: state.rejected().clone(),
            repairs_total: self.repairs,
        };
        self.sync_window.reset();
        for h in &mut self.clone_window {
            h.reset();
        }
        self.replicated_window = 0;
        self.window_start = std::time::Instant::now();
        doc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_reset_and_totals_accumulate() {
        let state = ClusterState::default();
        let mut s = SyncStats::default();
        for (lat_ms, acting) in [(1u64, false), (2, true), (3, true)] {
            s.observe(
                &Change::Held {
                    member: 1,
                    latency_ns: lat_ms * 1_000_000,
                    completed: true,
                },
                acting,
            );
        }
        let doc = s.roll(&state, "o", 0);
        assert_eq!(doc.sync_latency_total.count, 3);
        assert_eq!(doc.sync_latency_window.count, 2);
        assert_eq!(doc.replicated_window, 2);
        assert!((doc.sync_latency_window.max_ms - 3.0).abs() < 0.01);
        let doc = s.roll(&state, "o", 0);
        assert_eq!(doc.sync_latency_window.count, 0);
        assert_eq!(doc.sync_latency_total.count, 3);
        assert_eq!(doc.replicated_window, 0);
    }
}
