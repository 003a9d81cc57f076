//! Live Prometheus metrics, served on `--metrics-addr` (`GET /metrics`,
//! with `/healthz` and `/readyz`; see [`keysync_telemetry::serve`]).
//!
//! The metrics are `prometheus-client` counters, histograms and gauges,
//! updated by the loop as it folds events, sends commands and counts
//! rejections; a scrape only encodes them. Counters end in `_total`,
//! latencies are histograms in seconds, gauges are kept for levels
//! (members by state, pending clones, keys below durability, lag per HSM).
//!
//! What the counters and histograms cover: every event this process
//! folded since it started, the replay included. A start replays the log
//! from the latest snapshot, so after a restart they count again from the
//! snapshot's sequence on: a counter reset, which `rate()` and `increase()`
//! handle. Totals over the whole log stay in the JSON metrics document
//! and `keysync cluster status` (the fold's own counts, carried in the
//! snapshot). A standby folds the same log, so it reports the same event
//! counts as the active orchestrator; only the active one sends commands
//! and repairs.

use std::sync::Arc;

use keysync_schemas::{CloneFailure, Command, Event, MemberState, RejectReason};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::state::{Change, ClusterState};

/// Latency buckets, in seconds: 0.1 ms to 10 s (the bus floor is ~0.2 ms
/// a hop; a bootstrap or a failed member's backlog takes seconds).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Anti-entropy round buckets, in seconds: 10 ms to 10 min. A round reads
/// a member's whole inventory (2,000 keys a request), so it grows with the
/// keys held: milliseconds for thousands, tens of seconds for a million.
pub const ROUND_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 100.0, 600.0,
];

/// Labels naming an HSM.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HsmLabel {
    /// The HSM's id.
    pub hsm: String,
}

/// Labels naming a reason (a rejection's, a clone failure's).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The snake_case reason.
    pub reason: String,
}

/// Labels naming a member state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// `syncing`, `in-service`, `failed` or `removed`.
    pub state: String,
}

/// Labels naming how an event's signature was established.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByLabel {
    /// `signature` (checked one by one, or known as signed by this
    /// process) or `checkpoint` (a signed checkpoint vouched for it).
    pub by: String,
}

/// Labels naming a command kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabel {
    /// `clone_key`, `clone_batch` or `delete_key`.
    pub command: String,
}

type HistogramFamily = Family<HsmLabel, Histogram, fn() -> Histogram>;

/// The orchestrator's metrics. Clones share the same series.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Arc<Registry>,
    events_folded: Counter,
    keys_created: Counter,
    keys_replicated: Counter,
    keys_deleted: Counter,
    clone_failures: Family<ReasonLabel, Counter>,
    rejected: Family<ReasonLabel, Counter>,
    repairs: Counter,
    /// Anti-entropy rounds completed and how long each took.
    anti_entropy_rounds: Histogram,
    commands: Family<CommandLabel, Counter>,
    /// Events whose signature was checked one by one, and vouched for by
    /// a checkpoint.
    verified: [Counter; 2],
    sync_latency: Histogram,
    clone_latency: HistogramFamily,
    members: Family<StateLabel, Gauge>,
    keys: Gauge,
    /// [`ClusterState::state_bytes`]: the fold's own memory.
    fold_bytes: Gauge,
    pending_clones: Gauge,
    below_durability: Gauge,
    hsm_keys: Family<HsmLabel, Gauge>,
    hsm_lag: Family<HsmLabel, Gauge>,
    active: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every series, registered, at zero.
    pub fn new() -> Self {
        let mut r = Registry::default();
        let events_folded = Counter::default();
        let keys_created = Counter::default();
        let keys_replicated = Counter::default();
        let keys_deleted = Counter::default();
        let clone_failures = Family::<ReasonLabel, Counter>::default();
        let rejected = Family::<ReasonLabel, Counter>::default();
        let repairs = Counter::default();
        let anti_entropy_rounds = Histogram::new(ROUND_BUCKETS);
        let commands = Family::<CommandLabel, Counter>::default();
        let verified_by = Family::<ByLabel, Counter>::default();
        let verified = ["signature", "checkpoint"]
            .map(|by| verified_by.get_or_create_owned(&ByLabel { by: by.to_string() }));
        let sync_latency = latency_histogram();
        let clone_latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let members = Family::<StateLabel, Gauge>::default();
        let keys = Gauge::default();
        let fold_bytes = Gauge::default();
        let pending_clones = Gauge::default();
        let below_durability = Gauge::default();
        let hsm_keys = Family::<HsmLabel, Gauge>::default();
        let hsm_lag = Family::<HsmLabel, Gauge>::default();
        let active = Gauge::default();
        // Counters get their `_total` suffix from the encoder.
        r.register(
            "keysync_events_folded",
            "Events folded into the cluster state (replay included)",
            events_folded.clone(),
        );
        r.register(
            "keysync_keys_created",
            "Token keys created (KeyCreated folded)",
            keys_created.clone(),
        );
        r.register(
            "keysync_keys_replicated",
            "Keys that reached every live member",
            keys_replicated.clone(),
        );
        r.register(
            "keysync_keys_deleted",
            "Keys deleted (KeyDeleted folded)",
            keys_deleted.clone(),
        );
        r.register(
            "keysync_clone_failures",
            "Permanent clone failures (CloneFailed folded), by reason",
            clone_failures.clone(),
        );
        r.register(
            "keysync_rejected_messages",
            "Messages rejected (events, heartbeats, requests), by reason",
            rejected.clone(),
        );
        r.register(
            "keysync_repairs",
            "Anti-entropy repair commands sent",
            repairs.clone(),
        );
        r.register(
            "keysync_anti_entropy_round_seconds",
            "Anti-entropy rounds completed (a member's whole inventory read, compared with the log, its repairs sent), by duration",
            anti_entropy_rounds.clone(),
        );
        r.register(
            "keysync_commands_sent",
            "Commands published to HSM queues, by kind",
            commands.clone(),
        );
        r.register(
            "keysync_events_verified",
            "Events folded, by how their signature was established: checked one by one, or vouched for by a signed checkpoint (a replay's runs)",
            verified_by,
        );
        r.register(
            "keysync_sync_latency_seconds",
            "KeyCreated stored to the last CloneApplied stored (stream timestamps)",
            sync_latency.clone(),
        );
        r.register(
            "keysync_hsm_clone_latency_seconds",
            "KeyCreated stored to this HSM's CloneApplied stored (stream timestamps)",
            clone_latency.clone(),
        );
        r.register("keysync_members", "Member HSMs, by state", members.clone());
        r.register("keysync_keys", "Live keys", keys.clone());
        r.register(
            "keysync_fold_state_bytes",
            "Bytes the fold's state holds on the heap (its per-key tables counted by their allocator)",
            fold_bytes.clone(),
        );
        r.register(
            "keysync_pending_clones",
            "Clones outstanding over every member",
            pending_clones.clone(),
        );
        r.register(
            "keysync_below_durability_keys",
            "Live keys below their requested durability",
            below_durability.clone(),
        );
        r.register(
            "keysync_hsm_keys",
            "Live keys each HSM holds",
            hsm_keys.clone(),
        );
        r.register(
            "keysync_hsm_lag",
            "Live keys each HSM lacks",
            hsm_lag.clone(),
        );
        r.register(
            "keysync_orchestrator_active",
            "1 while this orchestrator holds the lease and acts, else 0",
            active.clone(),
        );
        // Every known label value starts at 0, so that a first failure is
        // an increase (and `rate()`/alerts see it), not a new series.
        for reason in RejectReason::ALL {
            rejected.get_or_create_owned(&ReasonLabel {
                reason: reason.as_str().to_string(),
            });
        }
        for reason in [
            CloneFailure::WrongDomain,
            CloneFailure::Integrity,
            CloneFailure::InvalidMaterial,
            CloneFailure::FingerprintMismatch,
            CloneFailure::Conflict,
            CloneFailure::Unsupported(String::new()),
        ] {
            clone_failures.get_or_create_owned(&ReasonLabel {
                reason: reason.label().to_string(),
            });
        }
        for command in ["clone_key", "clone_batch", "delete_key"] {
            commands.get_or_create_owned(&CommandLabel {
                command: command.to_string(),
            });
        }
        Metrics {
            registry: Arc::new(r),
            events_folded,
            keys_created,
            keys_replicated,
            keys_deleted,
            clone_failures,
            rejected,
            repairs,
            anti_entropy_rounds,
            commands,
            verified,
            sync_latency,
            clone_latency,
            members,
            keys,
            fold_bytes,
            pending_clones,
            below_durability,
            hsm_keys,
            hsm_lag,
            active,
        }
    }

    /// The registry the endpoint encodes.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Counts what folding `event` changed (`state` is the state after it).
    pub fn folded(&self, state: &ClusterState, event: &Event, change: &Change) {
        self.events_folded.inc();
        if let (Event::ClonesApplied(b), Change::Batch(changes)) = (event, change) {
            for (a, c) in b.units().zip(changes) {
                self.fact(state, &Event::CloneApplied(a), c);
            }
        } else {
            self.fact(state, event, change);
        }
    }

    /// [`Self::folded`] for one fact (a batch's, one at a time).
    fn fact(&self, state: &ClusterState, event: &Event, change: &Change) {
        let seconds = |ns: u64| ns as f64 / 1e9;
        match change {
            Change::Held {
                member,
                latency_ns,
                completed,
            } => {
                if matches!(event, Event::KeyCreated(_)) {
                    self.keys_created.inc();
                } else if let Some(m) = state.member_at(*member) {
                    self.clone_latency
                        .get_or_create(&HsmLabel {
                            hsm: m.hsm.to_string(),
                        })
                        .observe(seconds(*latency_ns));
                }
                if *completed {
                    self.keys_replicated.inc();
                    self.sync_latency.observe(seconds(*latency_ns));
                }
            }
            Change::Completed(done)
            | Change::Revoked(_, done)
            | Change::Capabilities {
                completed: done, ..
            } => {
                for (_, latency_ns) in done {
                    self.keys_replicated.inc();
                    self.sync_latency.observe(seconds(*latency_ns));
                }
            }
            Change::Deleted => {
                self.keys_deleted.inc();
            }
            Change::NewMember(_) | Change::Other | Change::Batch(_) => {}
        }
        if let Event::CloneFailed(f) = event {
            if f.reason.is_permanent() {
                self.clone_failures
                    .get_or_create(&ReasonLabel {
                        reason: f.reason.label().to_string(),
                    })
                    .inc();
            }
        }
    }

    /// Counts a rejected message.
    pub fn rejected(&self, reason: RejectReason) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.as_str().to_string(),
            })
            .inc();
    }

    /// Counts an event folded, by how its signature was established.
    pub fn verified(&self, how: keysync_security::Verified) {
        let i = usize::from(how == keysync_security::Verified::Vouched);
        if let Some(c) = self.verified.get(i) {
            c.inc();
        }
    }

    /// Counts anti-entropy repair commands.
    pub fn repairs(&self, n: u64) {
        self.repairs.inc_by(n);
    }

    /// Records an anti-entropy round completed in `seconds`.
    pub fn anti_entropy_round(&self, seconds: f64) {
        self.anti_entropy_rounds.observe(seconds);
    }

    /// Counts a command published.
    pub fn command_sent(&self, command: &Command) {
        let kind = match command {
            Command::CloneKey(_) => "clone_key",
            Command::CloneBatch(_) => "clone_batch",
            Command::DeleteKey(_) => "delete_key",
        };
        self.commands
            .get_or_create(&CommandLabel {
                command: kind.to_string(),
            })
            .inc();
    }

    /// Whether this orchestrator holds the lease.
    pub fn set_active(&self, active: bool) {
        self.active.set(i64::from(active));
    }

    /// Sets the level gauges from the fold (a few values per member).
    pub fn levels(&self, state: &ClusterState) {
        let keys = state.key_count();
        self.keys.set(gauge(keys));
        self.fold_bytes.set(gauge(state.state_bytes() as u64));
        self.pending_clones.set(gauge(state.pending_clones()));
        self.below_durability.set(gauge(state.below_durability()));
        let mut by_state = [0u64; 4];
        for (i, m) in state.members().enumerate() {
            let idx = i as u8;
            let s = state.member_state(idx);
            by_state[state_index(s)] += 1;
            let held = state.held_by(idx);
            let label = HsmLabel {
                hsm: m.hsm.to_string(),
            };
            self.hsm_keys.get_or_create(&label).set(gauge(held));
            self.hsm_lag
                .get_or_create(&label)
                .set(gauge(keys.saturating_sub(held)));
        }
        for s in [
            MemberState::Syncing,
            MemberState::InService,
            MemberState::Failed,
            MemberState::Removed,
        ] {
            self.members
                .get_or_create(&StateLabel {
                    state: s.as_str().to_string(),
                })
                .set(gauge(by_state[state_index(s)]));
        }
    }
}

fn state_index(s: MemberState) -> usize {
    match s {
        MemberState::Syncing => 0,
        MemberState::InService => 1,
        MemberState::Failed => 2,
        MemberState::Removed => 3,
    }
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use keysync_schemas::KeyId;

    use super::*;
    use crate::testkit::*;

    fn scrape(m: &Metrics) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry)
            .unwrap_or_else(|e| panic!("encode: {e}"));
        out
    }

    /// Folds `events` into `log`, counting as the loop does.
    fn fold(log: &mut Log, m: &Metrics, events: &[Event]) {
        for e in events {
            match log.when(e) {
                Ok(change) => m.folded(&log.state, e, &change),
                Err(r) => m.rejected(r.reason),
            }
        }
        m.levels(&log.state);
    }

    #[test]
    fn counters_and_histograms_follow_what_the_fold_changed() {
        let (k1, k2, k3) = (KeyId::new(), KeyId::new(), KeyId::new());
        let m = Metrics::new();
        let mut log = Log::given(&[]);
        fold(
            &mut log,
            &m,
            &[
                joined("a"),
                joined("b"),
                joined("c"),
                created(k1, "a", 1),
                applied(k1, "b", 1),
                applied(k1, "c", 1),
                created(k2, "a", 2),
                applied(k2, "b", 2),
                clone_failed(k2, "c"),
                created(k3, "b", 3),
                applied(KeyId::new(), "b", 9),
            ],
        );
        let text = scrape(&m);
        for line in [
            "keysync_keys_created_total 3",
            "keysync_keys_replicated_total 1",
            "keysync_clone_failures_total{reason=\"wrong_domain\"} 1",
            "keysync_rejected_messages_total{reason=\"unknown_key\"} 1",
            "keysync_sync_latency_seconds_count 1",
            "keysync_hsm_clone_latency_seconds_count{hsm=\"b\"} 2",
            "keysync_hsm_clone_latency_seconds_count{hsm=\"c\"} 1",
            "keysync_keys 3",
            // a lacks k3, c lacks k2 and k3; b holds all three.
            "keysync_members{state=\"syncing\"} 2",
            "keysync_members{state=\"in-service\"} 1",
            "keysync_events_folded_total 10",
            "keysync_hsm_lag{hsm=\"c\"} 2",
            // Failed at c: not pending. k3 is pending on a and c.
            "keysync_pending_clones 2",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        // k1's sync: created at seq 4 (4 ms), complete at seq 6 (6 ms).
        assert!(
            text.contains("keysync_sync_latency_seconds_sum 0.002"),
            "{text}"
        );

        // c fails: k2 (a, b) completes; then a delete.
        fold(&mut log, &m, &[failed("c"), deleted(k1, "a", 1)]);
        let text = scrape(&m);
        for line in [
            "keysync_keys_replicated_total 2",
            "keysync_keys_deleted_total 1",
            "keysync_sync_latency_seconds_count 2",
            "keysync_members{state=\"failed\"} 1",
            "keysync_keys 2",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        // Levels only; no percentile gauges.
        assert!(!text.contains("quantile"), "{text}");
    }

    #[test]
    fn buckets_span_a_tenth_of_a_millisecond_to_ten_seconds() {
        assert_eq!(LATENCY_BUCKETS.first(), Some(&0.0001));
        assert_eq!(LATENCY_BUCKETS.last(), Some(&10.0));
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
