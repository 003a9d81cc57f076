//! The agent's Prometheus metrics and readiness, served on
//! `--metrics-addr` (`/metrics`, `/healthz`, `/readyz`; see
//! [`keysync_telemetry::serve`]).
//!
//! The series live as long as the process (across the crash-only restarts
//! of [`crate::run`]); they are updated where the work happens and only
//! encoded by a scrape. Counters reset when the process restarts.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use keysync_schemas::{OpError, OpErrorKind};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::keystore::KeystoreError;

/// Latency buckets, in seconds: 0.1 ms to 10 s.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// An operation and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// The request kind (`generate`, `sign`, ...).
    pub op: String,
    /// `ok`, or the error kind the caller got (`key_not_found`, ...).
    pub outcome: String,
}

/// What a clone or delete command came to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// `applied`, `failed` (permanent, reported) or `retried` (passing, handed back).
    pub outcome: String,
}

/// Which keystore failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `storage` (the store could not read or write) or `open` (it cannot
    /// decrypt what it holds).
    pub kind: String,
}

/// The snake_case name of an error kind, for the `outcome` label.
pub fn outcome(kind: OpErrorKind) -> &'static str {
    match kind {
        OpErrorKind::KeyNotFound => "key_not_found",
        OpErrorKind::BadRequest => "bad_request",
        OpErrorKind::Unsupported => "unsupported",
        OpErrorKind::AlreadyExists => "already_exists",
        OpErrorKind::Unavailable => "unavailable",
        OpErrorKind::IntegrityFailed => "integrity_failed",
        OpErrorKind::Internal => "internal",
        OpErrorKind::KeyIdTaken => "key_id_taken",
    }
}

type OpFamily = Family<OpLabels, Histogram, fn() -> Histogram>;

/// The agent's series and readiness conditions. Clones share them.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    registry: Arc<Registry>,
    ops: OpFamily,
    clone_apply: Histogram,
    commands: Family<CommandLabels, Counter>,
    keystore_errors: Family<KindLabels, Counter>,
    outbox: Gauge,
    queue_pending: Gauge,
    batches: Counter,
    batched: Counter,
    ready: Arc<Readiness>,
}

#[derive(Debug, Default)]
struct Readiness {
    keystore_open: AtomicBool,
    enrolled: AtomicBool,
    caught_up: AtomicBool,
    nats: Mutex<Option<async_nats::Client>>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Every series, registered, at zero; nothing ready.
    pub fn new() -> Self {
        let mut r = Registry::default();
        let ops: OpFamily = Family::new_with_constructor(latency_histogram);
        let clone_apply = latency_histogram();
        let commands = Family::<CommandLabels, Counter>::default();
        let keystore_errors = Family::<KindLabels, Counter>::default();
        let outbox = Gauge::default();
        let queue_pending = Gauge::default();
        let batches = Counter::default();
        let batched = Counter::default();
        r.register(
            "keysync_agent_clones_applied_batches",
            "ClonesApplied events published (one signed event for a window of applied clones)",
            batches.clone(),
        );
        r.register(
            "keysync_agent_clones_applied_batched",
            "Applied clones announced inside ClonesApplied batches rather than alone",
            batched.clone(),
        );
        r.register(
            "keysync_agent_operation_seconds",
            "Key operations served, request received to reply ready, by op and outcome",
            ops.clone(),
        );
        r.register(
            "keysync_agent_clone_apply_seconds",
            "One keystore transaction applying a batch of clone and delete commands",
            clone_apply.clone(),
        );
        r.register(
            "keysync_agent_commands",
            "Clone and delete commands handled, by outcome",
            commands.clone(),
        );
        r.register(
            "keysync_agent_keystore_errors",
            "Keystore failures (storage, or a store that cannot be opened), by kind",
            keystore_errors.clone(),
        );
        r.register(
            "keysync_agent_outbox_events",
            "Events stored with their keys and not yet acknowledged by JetStream",
            outbox.clone(),
        );
        r.register(
            "keysync_agent_command_queue_pending",
            "Commands waiting in this HSM's queue, not yet delivered",
            queue_pending.clone(),
        );
        // Known label values start at 0: a first failure is an increase.
        for kind in ["storage", "open"] {
            keystore_errors.get_or_create_owned(&KindLabels { kind: kind.into() });
        }
        for outcome in ["applied", "failed", "retried"] {
            commands.get_or_create_owned(&CommandLabels {
                outcome: outcome.into(),
            });
        }
        AgentMetrics {
            registry: Arc::new(r),
            ops,
            clone_apply,
            commands,
            keystore_errors,
            outbox,
            queue_pending,
            batches,
            batched,
            ready: Arc::default(),
        }
    }

    /// Records an operation served.
    pub fn op(&self, op: &str, result: Result<(), &OpError>, took: Duration) {
        self.ops
            .get_or_create(&OpLabels {
                op: op.to_string(),
                outcome: match result {
                    Ok(()) => "ok",
                    Err(e) => outcome(e.kind),
                }
                .to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Records one keystore transaction of commands.
    pub fn clone_batch_applied(&self, took: Duration) {
        self.clone_apply.observe(took.as_secs_f64());
    }

    /// Counts a `ClonesApplied` published for `clones` applied clones.
    pub fn clones_batched(&self, clones: usize) {
        self.batches.inc();
        self.batched.inc_by(clones as u64);
    }

    /// Counts a command's outcome (`applied`, `failed`, `retried`).
    pub fn command(&self, outcome: &'static str) {
        self.commands
            .get_or_create(&CommandLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Counts `e` if it is the keystore failing (not an answer such as
    /// "not found").
    pub fn keystore_error(&self, e: &KeystoreError) {
        let kind = match e {
            KeystoreError::Storage(_) => "storage",
            KeystoreError::Open(_) => "open",
            _ => return,
        };
        self.keystore_errors
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    /// Counts a keystore storage failure known only by its message.
    pub fn storage_error(&self) {
        self.keystore_errors
            .get_or_create(&KindLabels {
                kind: "storage".into(),
            })
            .inc();
    }

    /// Events in the outbox.
    pub fn set_outbox(&self, n: u64) {
        self.outbox.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Commands pending in this HSM's queue.
    pub fn set_queue_pending(&self, n: u64) {
        self.queue_pending.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The keystore is open (the agent runs on it).
    pub fn keystore_opened(&self, nats: &async_nats::Client) {
        self.ready.keystore_open.store(true, Ordering::Relaxed);
        if let Ok(mut n) = self.ready.nats.lock() {
            *n = Some(nats.clone());
        }
    }

    /// The orchestrator lists this HSM as an enrolled member.
    pub fn enrolled(&self) {
        self.ready.enrolled.store(true, Ordering::Relaxed);
    }

    /// Whether the command queue was found drained: nothing pending for
    /// this HSM that it has not been given.
    pub fn caught_up(&self, yes: bool) {
        self.ready.caught_up.store(yes, Ordering::Relaxed);
    }

    /// What the agent is waiting for; empty when ready.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        let r = &self.ready;
        let mut waiting = Vec::new();
        let connected = r.nats.lock().ok().is_some_and(|n| {
            n.as_ref()
                .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected)
        });
        if !connected {
            waiting.push("nats: not connected");
        }
        if !r.keystore_open.load(Ordering::Relaxed) {
            waiting.push("keystore: not open");
        }
        if !r.enrolled.load(Ordering::Relaxed) {
            waiting.push("enrollment: not an enrolled member yet");
        }
        if !r.caught_up.load(Ordering::Relaxed) {
            waiting.push("commands: the queue is not drained yet");
        }
        waiting
    }

    /// The registry the endpoint encodes.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }
}

/// `--metrics-addr` and the series it serves. The endpoint is started once
/// per process ([`Endpoint::start`]), whatever the number of runs.
#[derive(Clone, Debug, Default)]
pub struct Endpoint {
    /// Where to serve, if anywhere.
    pub addr: Option<SocketAddr>,
    /// The series.
    pub metrics: AgentMetrics,
    started: Arc<OnceLock<()>>,
}

impl Endpoint {
    /// An endpoint on `addr` (none if `None`: the series are still kept).
    pub fn new(addr: Option<SocketAddr>) -> Self {
        Endpoint {
            addr,
            ..Default::default()
        }
    }

    /// Starts serving, the first time only.
    pub fn start(&self) {
        let Some(addr) = self.addr else {
            return;
        };
        if self.started.set(()).is_err() {
            return;
        }
        let metrics = self.metrics.clone();
        let ready: keysync_telemetry::serve::Readiness = Arc::new(move || metrics.waiting_for());
        let registry = self.metrics.registry();
        tokio::spawn(async move {
            if let Err(e) = keysync_telemetry::serve::serve(addr, registry, ready).await {
                tracing::error!(error = %e, "the metrics endpoint stopped");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_timed_by_op_and_outcome() {
        let m = AgentMetrics::new();
        m.op("sign", Ok(()), Duration::from_micros(300));
        let err = OpError::new(OpErrorKind::KeyNotFound, "no");
        m.op("sign", Err(&err), Duration::from_micros(200));
        m.keystore_error(&KeystoreError::Storage("disk full".into()));
        m.keystore_error(&KeystoreError::Integrity);
        m.command("applied");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry)
            .unwrap_or_else(|e| panic!("encode: {e}"));
        for line in [
            "keysync_agent_operation_seconds_count{op=\"sign\",outcome=\"ok\"} 1",
            "keysync_agent_operation_seconds_count{op=\"sign\",outcome=\"key_not_found\"} 1",
            "keysync_agent_keystore_errors_total{kind=\"storage\"} 1",
            "keysync_agent_commands_total{outcome=\"applied\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        // An answer ("integrity check failed") is not a keystore failure.
        assert!(!text.contains("kind=\"integrity\""), "{text}");
    }

    #[test]
    fn ready_only_when_every_condition_holds() {
        let m = AgentMetrics::new();
        assert_eq!(m.waiting_for().len(), 4);
        m.enrolled();
        m.caught_up(true);
        assert_eq!(
            m.waiting_for(),
            vec!["nats: not connected", "keystore: not open"]
        );
    }
}
