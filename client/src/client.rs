//! The SDK client: key operations routed to one HSM or any, creates with a
//! durability level, cluster status.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Request;
use backon::Retryable as _;
use futures::StreamExt;
use keysync_schemas::{
    decode, encode, ClusterStatus, DigestSignScheme, Durability, Envelope, Event, GcmParams, HsmId,
    KeyAttributes, KeyId, KeyInfo, KeyStanding, KeyStatus, KeyType, OpErrorKind, OpReply,
    OpRequest, SecretBytes, Source, StatusReply, StatusRequest, Subjects, SyncMetrics,
};
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::error::{Error, Result};
use crate::retry::RetryPolicy;
use crate::routing::ReplicaMap;

/// Where a key operation goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Route {
    /// One named HSM.
    Hsm(HsmId),
    /// Any HSM, through the agents' queue group, like CloudHSM: it may
    /// lack a key created moments ago elsewhere (`KeyNotFound` is then
    /// retried within a budget sized from the live sync latency).
    Any,
    /// Only HSMs known to hold the key (learned from its `created`,
    /// `applied` and `replicated` events); falls back to `Any` for keys
    /// this client has not seen. The default.
    #[default]
    ReplicaAware,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Hsm(h) => write!(f, "HSM {h}"),
            Route::Any => f.write_str("any HSM"),
            Route::ReplicaAware => f.write_str("an HSM holding the key"),
        }
    }
}

/// Options of a connection.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Subject prefix of the cluster.
    pub subjects: Subjects,
    /// Name this client gives itself (in NATS and in message sources).
    pub name: String,
    /// Timeout of one request.
    pub request_timeout: Duration,
    /// Retries.
    pub retry: RetryPolicy,
    /// Watch key events for replica-aware routing (one subscription to
    /// `<prefix>.evt.key.>`).
    pub watch_replicas: bool,
    /// Watch the orchestrator's sync metrics (sizes retry budgets).
    pub watch_metrics: bool,
    /// NATS credentials, and the inbox prefix replies come back under
    /// (`auth.inbox_prefix`; default `_INBOX.<NATS user>`, or
    /// `_INBOX.client`), which NATS permissions can keep private to this
    /// client's role.
    pub auth: keysync_security::NatsAuth,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            subjects: Subjects::default(),
            name: "keysync-client".into(),
            request_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            watch_replicas: true,
            watch_metrics: true,
            auth: Default::default(),
        }
    }
}

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateKey {
    /// Key type.
    pub key_type: KeyType,
    /// Which HSM creates it.
    pub route: Route,
    /// When to return.
    pub durability: Durability,
    /// Optional label.
    pub label: Option<String>,
    /// The application's own id for the key (PKCS#11 `CKA_ID`), 1 to
    /// [`keysync_schemas::MAX_APP_ID_BYTES`] bytes, carried to every HSM
    /// like the label. keysync's key id stays the key's identity.
    pub app_id: Option<Vec<u8>>,
    /// A session key: never leaves the HSM, gone on restart.
    pub session: bool,
    /// How long to wait for `replicas:N` or `all`.
    pub durability_timeout: Duration,
}

impl CreateKey {
    /// A token key of `key_type` on any HSM, durability `logged`.
    pub fn new(key_type: KeyType) -> Self {
        CreateKey {
            key_type,
            route: Route::Any,
            durability: Durability::Logged,
            label: None,
            app_id: None,
            session: false,
            durability_timeout: Duration::from_secs(10),
        }
    }

    /// The attributes the key will carry, checked as the agent checks them
    /// (so a bad one is refused before anything is sent).
    fn attributes(&self) -> Result<KeyAttributes> {
        let a = KeyAttributes {
            label: self.label.clone(),
            app_id: self.app_id.clone(),
        };
        a.check().map_err(|e| Error::BadRequest(e.to_string()))?;
        Ok(a)
    }

    /// Sets the route.
    pub fn on(mut self, route: Route) -> Self {
        self.route = route;
        self
    }

    /// Sets the durability level.
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }
}

/// A key that was created.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// What the creating HSM holds.
    pub info: KeyInfo,
    /// The durability reached when the call returned.
    pub durability: Durability,
    /// HSMs known to hold the key when the call returned.
    pub holders: Vec<HsmId>,
    /// Stream sequence of `KeyCreated`, when logged.
    pub created_seq: Option<u64>,
}

/// A connection to a keysync cluster. Cheap to clone; background watchers
/// stop when the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    nats: async_nats::Client,
    options: ClientOptions,
    replicas: Arc<ReplicaMap>,
    metrics: watch::Receiver<Option<SyncMetrics>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The cluster key and enrolled HSM keys, to check the events a
    /// durability wait counts (learned from the orchestrator's status).
    trust: tokio::sync::Mutex<Option<Trust>>,
}

/// Who may sign the events a durability wait counts.
#[derive(Clone)]
struct Trust {
    cluster_key: [u8; 32],
    enrolled: std::collections::BTreeMap<HsmId, [u8; 32]>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Stop reading subscriptions before the connection goes away.
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn key_of(op: &OpRequest) -> Option<KeyId> {
    match op {
        OpRequest::Sign { key_id, .. }
        | OpRequest::Verify { key_id, .. }
        | OpRequest::Encrypt { key_id, .. }
        | OpRequest::Decrypt { key_id, .. }
        | OpRequest::PublicKey { key_id }
        | OpRequest::Delete { key_id }
        | OpRequest::Info { key_id }
        | OpRequest::SignDigest { key_id, .. }
        | OpRequest::EncryptGcm { key_id, .. }
        | OpRequest::DecryptGcm { key_id, .. } => Some(*key_id),
        _ => None,
    }
}

/// The id a create asks for, if it names one.
fn requested_id(op: &OpRequest) -> Option<KeyId> {
    match op {
        OpRequest::Generate { key_id, .. }
        | OpRequest::Import { key_id, .. }
        | OpRequest::Unwrap { key_id, .. } => *key_id,
        _ => None,
    }
}

impl Client {
    /// Connects with default options.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, ClientOptions::default()).await
    }

    /// Connects with `options`. `url` may list several servers, separated
    /// by commas.
    pub async fn connect_with(url: &str, options: ClientOptions) -> Result<Self> {
        let servers =
            keysync_telemetry::process::servers(url).map_err(|detail| Error::Connect {
                url: url.to_string(),
                detail,
            })?;
        let nats = options
            .auth
            .apply_as(async_nats::ConnectOptions::new(), "client")
            .await
            .map_err(|e| Error::Connect {
                url: url.to_string(),
                detail: e.to_string(),
            })?
            .name(&options.name)
            .connect(servers)
            .await
            .map_err(|e| Error::Connect {
                url: url.to_string(),
                detail: e.to_string(),
            })?;
        Ok(Self::from_nats(nats, options).await)
    }

    /// Wraps an existing NATS connection and starts the watchers the
    /// options ask for (it returns once they are subscribed).
    pub async fn from_nats(nats: async_nats::Client, options: ClientOptions) -> Self {
        let replicas = Arc::new(ReplicaMap::default());
        let (metrics_tx, metrics) = watch::channel(None);
        let mut tasks = Vec::new();
        if options.watch_replicas {
            let (ready_tx, ready) = tokio::sync::oneshot::channel();
            tasks.push(tokio::spawn(crate::routing::watch(
                nats.clone(),
                options.subjects.clone(),
                replicas.clone(),
                ready_tx,
            )));
            let _ = ready.await;
        }
        if options.watch_metrics {
            tasks.push(tokio::spawn(watch_metrics(
                nats.clone(),
                options.subjects.metrics_sync(),
                metrics_tx,
            )));
        }
        Client {
            inner: Arc::new(Inner {
                nats,
                options,
                replicas,
                metrics,
                tasks,
                trust: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// The NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.inner.nats
    }

    /// The subject layout.
    pub fn subjects(&self) -> &Subjects {
        &self.inner.options.subjects
    }

    /// The latest sync metrics seen (with `watch_metrics`).
    pub fn latest_metrics(&self) -> Option<SyncMetrics> {
        self.inner.metrics.borrow().clone()
    }

    /// A receiver that sees every new sync-metrics document.
    pub fn metrics_receiver(&self) -> watch::Receiver<Option<SyncMetrics>> {
        self.inner.metrics.clone()
    }

    /// HSMs this client knows to hold `key`.
    pub fn known_holders(&self, key: &KeyId) -> Vec<HsmId> {
        self.inner.replicas.holders(key)
    }

    /// Tells the client that `hsm` holds `key` (it listed the key, say), so
    /// replica-aware routing tries that HSM first for a key whose events
    /// this client never saw (one made by another process).
    pub fn note_holder(&self, key: KeyId, hsm: HsmId) {
        self.inner.replicas.learn(key, hsm);
    }

    fn source(&self) -> Source {
        Source::Client(self.inner.options.name.clone())
    }

    /// Sends one operation along `route`, with the retries the options
    /// allow, and returns the reply (errors turned into [`Error`]).
    ///
    /// One CLIENT span per call (named `keysync.<op>`, with
    /// `keysync.key_id`), each attempt a `keysync.request` child of it;
    /// ERROR status with the error kind when it fails.
    pub async fn request(&self, route: &Route, op: OpRequest) -> Result<OpReply> {
        let span = tracing::info_span!(
            "keysync.operation",
            otel.name = %format!("keysync.{}", op.kind()),
            otel.kind = "client",
            keysync.op = op.kind(),
            keysync.key_id = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        );
        if let Some(key_id) = op.key_id() {
            span.record("keysync.key_id", key_id.to_string().as_str());
        }
        let result = self.send_op(route, op).instrument(span.clone()).await;
        if let Err(e) = &result {
            keysync_telemetry::fail(&span, e.kind(), e);
        }
        result
    }

    /// [`Client::request`] inside the caller's span.
    async fn send_op(&self, route: &Route, op: OpRequest) -> Result<OpReply> {
        match route {
            Route::Hsm(_) => self.request_retrying_transient(route, &op).await,
            Route::Any => self.request_any(&op).await,
            Route::ReplicaAware => {
                if let Some(key) = key_of(&op) {
                    for hsm in self.inner.replicas.holders(&key) {
                        match self.request_once(&Route::Hsm(hsm), &op).await {
                            Err(Error::KeyNotFound { .. }) | Err(Error::HsmUnavailable { .. }) => {
                                continue
                            }
                            other => return other,
                        }
                    }
                }
                self.request_any(&op).await
            }
        }
    }

    /// Retries what reached no HSM (no responders) within the policy's
    /// transient budget, long enough to ride out agents reconnecting after
    /// a NATS restart; a timed-out request (it may have been carried out)
    /// is retried only a few times.
    async fn request_retrying_transient(&self, route: &Route, op: &OpRequest) -> Result<OpReply> {
        let policy = &self.inner.options.retry;
        let timeouts = std::sync::atomic::AtomicU32::new(0);
        (|| self.request_once(route, op))
            .retry(policy.transient_backoff())
            .when(|e| match e {
                Error::HsmUnavailable {
                    no_responders: true,
                    ..
                } => true,
                Error::HsmUnavailable { .. } => {
                    timeouts.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        < policy.timeout_retries
                }
                _ => false,
            })
            .await
    }

    /// The any-HSM route: a `KeyNotFound` may mean "not there yet", so it is
    /// retried within the live budget, apart from transient failures.
    async fn request_any(&self, op: &OpRequest) -> Result<OpReply> {
        let policy = &self.inner.options.retry;
        if !policy.key_not_found {
            return self.request_retrying_transient(&Route::Any, op).await;
        }
        // A deleted key will not come back: say so at once rather than
        // after the whole budget.
        let first = self.request_retrying_transient(&Route::Any, op).await;
        let key_id = match first {
            Err(Error::KeyNotFound { key_id, .. }) => key_id,
            other => return other,
        };
        if let Some(e @ Error::KeyDeleted { .. }) = self.why_missing(key_id).await {
            return Err(e);
        }
        let budget = policy.not_found_budget(self.inner.metrics.borrow().as_ref());
        let started = Instant::now();
        let result = (|| self.request_retrying_transient(&Route::Any, op))
            .retry(policy.not_found_backoff(budget))
            .when(|e| matches!(e, Error::KeyNotFound { .. }))
            .await;
        match result {
            // "Not yet replicated" only for a key the log knows; one it
            // does not know (or deleted meanwhile) is said to be so.
            Err(Error::KeyNotFound { key_id, .. }) => Err(self
                .why_missing(key_id)
                .await
                .unwrap_or(Error::NotYetReplicated {
                    key_id,
                    waited: started.elapsed(),
                })),
            other => other,
        }
    }

    /// One request, no retries.
    async fn request_once(&self, route: &Route, op: &OpRequest) -> Result<OpReply> {
        let subject = match route {
            Route::Hsm(h) => self.inner.options.subjects.hsm_op(h),
            Route::Any | Route::ReplicaAware => self.inner.options.subjects.any_op(),
        };
        let key_id = key_of(op);
        let requested_id = requested_id(op);
        let payload = encode(&Envelope::new(self.source(), op.clone()))
            .map_err(|e| Error::BadRequest(e.to_string()))?;
        // One attempt: a CLIENT span, child of the operation's.
        let span = tracing::info_span!(
            "keysync.request",
            otel.kind = "client",
            messaging.system = "nats",
            messaging.destination.name = %subject,
            messaging.operation.type = "send",
            keysync.op = op.kind(),
            keysync.key_id = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
            route = %route,
        );
        if let Some(key_id) = op.key_id() {
            span.record("keysync.key_id", key_id.to_string().as_str());
        }
        let result = self
            .attempt(route, subject, payload, key_id, requested_id, &span)
            .await;
        if let Err(e) = &result {
            keysync_telemetry::fail(&span, e.kind(), e);
        }
        result
    }

    async fn attempt(
        &self,
        route: &Route,
        subject: String,
        payload: Vec<u8>,
        key_id: Option<KeyId>,
        requested_id: Option<KeyId>,
        span: &tracing::Span,
    ) -> Result<OpReply> {
        let mut headers = async_nats::HeaderMap::new();
        keysync_telemetry::inject(span, &mut headers);
        let msg = self
            .inner
            .nats
            .send_request(
                subject,
                Request::new()
                    .payload(payload.into())
                    .headers(headers)
                    .timeout(Some(self.inner.options.request_timeout)),
            )
            .instrument(span.clone())
            .await
            .map_err(|e| Error::HsmUnavailable {
                route: route.to_string(),
                no_responders: e.kind() == async_nats::RequestErrorKind::NoResponders,
                detail: e.to_string(),
            })?;
        let reply = decode::<OpReply>(&msg.payload)
            .map_err(|e| Error::Protocol(e.to_string()))?
            .body;
        match reply {
            OpReply::Error(e) => Err(match (e.kind, key_id) {
                (OpErrorKind::KeyNotFound, Some(key_id)) => Error::KeyNotFound {
                    key_id,
                    route: route.to_string(),
                },
                (OpErrorKind::BadRequest, _) => Error::BadRequest(e.message),
                // On the HSM asked, or in the cluster's log: either way
                // the id names another key, and only a new id helps.
                (OpErrorKind::KeyIdTaken | OpErrorKind::AlreadyExists, _) => match requested_id {
                    Some(key_id) => Error::KeyIdTaken {
                        key_id,
                        detail: e.message,
                    },
                    None => Error::Operation(e),
                },
                _ => Error::Operation(e),
            }),
            other => Ok(other),
        }
    }

    fn unexpected(reply: OpReply) -> Error {
        Error::Protocol(format!("unexpected reply {reply:?}"))
    }

    /// Generates a key (see [`CreateKey`]) and returns once it reached the
    /// requested durability.
    #[tracing::instrument(name = "keysync.create_key", skip_all, fields(otel.kind = "client", keysync.key_id = tracing::field::Empty, error.type = tracing::field::Empty, otel.status_code = tracing::field::Empty, otel.status_description = tracing::field::Empty, key_type = %spec.key_type, durability = %spec.durability))]
    pub async fn create_key(&self, spec: CreateKey) -> Result<CreatedKey> {
        let key_id = KeyId::new();
        let op = OpRequest::Generate {
            key_id: Some(key_id),
            key_type: spec.key_type,
            session: spec.session,
            durability: spec.durability,
            attributes: spec.attributes()?,
        };
        self.create_with(key_id, &spec, op).await
    }

    /// Imports plaintext material (PKCS#8 DER, or 32 raw bytes for AES-256).
    #[tracing::instrument(name = "keysync.import_key", skip_all, fields(otel.kind = "client", keysync.key_id = tracing::field::Empty, error.type = tracing::field::Empty, otel.status_code = tracing::field::Empty, otel.status_description = tracing::field::Empty, key_type = %spec.key_type, durability = %spec.durability))]
    pub async fn import_key(&self, spec: CreateKey, material: Vec<u8>) -> Result<CreatedKey> {
        let key_id = KeyId::new();
        let op = OpRequest::Import {
            key_id: Some(key_id),
            key_type: spec.key_type,
            material: SecretBytes(material),
            session: spec.session,
            durability: spec.durability,
            attributes: spec.attributes()?,
        };
        self.create_with(key_id, &spec, op).await
    }

    /// Unwraps an RFC 5649 blob (PKCS#8 DER, or raw AES bytes, inside)
    /// under `wrapping_key`, an AES-256 key the HSM on `spec.route` holds.
    #[tracing::instrument(name = "keysync.unwrap_key", skip_all, fields(otel.kind = "client", keysync.key_id = tracing::field::Empty, error.type = tracing::field::Empty, otel.status_code = tracing::field::Empty, otel.status_description = tracing::field::Empty, key_type = %spec.key_type, durability = %spec.durability))]
    pub async fn unwrap_key(
        &self,
        spec: CreateKey,
        wrapping_key: KeyId,
        wrapped: Vec<u8>,
    ) -> Result<CreatedKey> {
        let key_id = KeyId::new();
        let op = OpRequest::Unwrap {
            key_id: Some(key_id),
            key_type: spec.key_type,
            wrapping_key,
            wrapped,
            session: spec.session,
            durability: spec.durability,
            attributes: spec.attributes()?,
        };
        self.create_with(key_id, &spec, op).await
    }

    /// A create, in the caller's CLIENT span: its key id recorded, its
    /// failure marked.
    async fn create_with(
        &self,
        key_id: KeyId,
        spec: &CreateKey,
        op: OpRequest,
    ) -> Result<CreatedKey> {
        let span = tracing::Span::current();
        span.record("keysync.key_id", key_id.to_string().as_str());
        let result = self.create_in_span(key_id, spec, op).await;
        if let Err(e) = &result {
            keysync_telemetry::fail(&span, e.kind(), e);
        }
        result
    }

    async fn create_in_span(
        &self,
        key_id: KeyId,
        spec: &CreateKey,
        op: OpRequest,
    ) -> Result<CreatedKey> {
        if let Durability::Replicas(0) = spec.durability {
            return Err(Error::BadRequest(
                "replicas:0 is not a durability level".into(),
            ));
        }
        if let Durability::Replicas(n) = spec.durability {
            if let Ok(members) = self.able_members(spec.key_type).await {
                if u64::from(n) > members {
                    return Err(Error::BadRequest(format!(
                        "replicas:{n} asks for more HSMs than the cluster has ({members}) able to hold {} keys",
                        spec.key_type
                    )));
                }
            }
        }
        let wait = matches!(spec.durability, Durability::Replicas(n) if n > 1)
            || spec.durability == Durability::All;
        if wait && spec.session {
            return Err(Error::BadRequest(
                "session keys never leave their HSM: use durability none or logged".into(),
            ));
        }
        // Subscribe before asking, so no acknowledgement can be missed:
        // the key's own subjects, and for `replicas:N` the agents' batches
        // of applied clones (`ClonesApplied`, decision 21), which name many
        // keys on one per-HSM subject.
        let subscribe = |subject: String| async move {
            self.inner
                .nats
                .subscribe(subject)
                .await
                .map_err(|e| Error::HsmUnavailable {
                    route: spec.route.to_string(),
                    detail: e.to_string(),
                    no_responders: false,
                })
        };
        let mut key_events = if wait {
            let subjects = &self.inner.options.subjects;
            let own = subscribe(subjects.key_events(&key_id)).await?;
            if matches!(spec.durability, Durability::Replicas(_)) {
                let batches = subscribe(subjects.all_clones_applied()).await?;
                Some(futures::stream::select(own, batches).boxed())
            } else {
                Some(own.boxed())
            }
        } else {
            None
        };
        let reply = match self.send_op(&spec.route, op).await {
            // A retried create whose first attempt had worked (its reply was
            // lost; the retry may even have reached another HSM, whose key
            // the log then refused): the id is ours (random 122 bits), so
            // the key holding it is ours.
            Err(Error::KeyIdTaken { .. }) => self.recover_create(key_id, spec).await?,
            other => other?,
        };
        let OpReply::Created {
            info,
            durability,
            created_seq,
        } = reply
        else {
            return Err(Self::unexpected(reply));
        };
        if !info.session {
            self.inner.replicas.learn(key_id, info.hsm.clone());
        }
        let mut holders: BTreeSet<HsmId> = BTreeSet::from([info.hsm.clone()]);
        let Some(events) = key_events.as_mut() else {
            return Ok(CreatedKey {
                info,
                durability,
                holders: holders.into_iter().collect(),
                created_seq,
            });
        };
        let deadline = tokio::time::Instant::now() + spec.durability_timeout;
        let reached = loop {
            let enough = match spec.durability {
                Durability::Replicas(n) => holders.len() >= usize::from(n),
                _ => false,
            };
            if enough {
                break true;
            }
            let Ok(Some(msg)) = tokio::time::timeout_at(deadline, events.next()).await else {
                break false;
            };
            // Only events signed by their enrolled HSM (or the cluster)
            // count: a forged CloneApplied or KeyReplicated on the bus must
            // not make a create return early.
            let Some(env) = self.verified_event(&msg).await else {
                continue;
            };
            match env.body {
                Event::CloneApplied(a)
                    if a.key_id == key_id && a.fingerprint == info.fingerprint =>
                {
                    holders.insert(a.hsm);
                }
                Event::ClonesApplied(b)
                    if b.applied
                        .iter()
                        .any(|a| a.key_id == key_id && a.fingerprint == info.fingerprint) =>
                {
                    holders.insert(b.hsm);
                }
                Event::KeyReplicated(r)
                    if r.key_id == key_id && r.fingerprint == info.fingerprint =>
                {
                    holders.extend(r.holders);
                    if spec.durability == Durability::All {
                        break true;
                    }
                }
                _ => {}
            }
        };
        let holders: Vec<HsmId> = holders.into_iter().collect();
        for h in &holders {
            self.inner.replicas.learn(key_id, h.clone());
        }
        if reached {
            Ok(CreatedKey {
                info,
                durability: spec.durability,
                holders,
                created_seq,
            })
        } else {
            Err(Error::BelowDurability {
                key_id,
                wanted: spec.durability,
                holders,
            })
        }
    }

    /// After a create was retried and found its own key already made:
    /// reads the key back, and for `logged` and above checks that its
    /// `KeyCreated` is in the stream.
    async fn recover_create(&self, key_id: KeyId, spec: &CreateKey) -> Result<OpReply> {
        let route = match &spec.route {
            Route::Hsm(h) => Route::Hsm(h.clone()),
            _ => Route::ReplicaAware,
        };
        let info = self.key_info(key_id, &route).await?;
        if spec.durability == Durability::None || spec.session {
            return Ok(OpReply::Created {
                info,
                durability: Durability::None,
                created_seq: None,
            });
        }
        let js = async_nats::jetstream::new(self.inner.nats.clone());
        let logged = async {
            js.get_stream(self.subjects().events_stream())
                .await
                .ok()?
                .direct_get_last_for_subject(self.subjects().key_created(&key_id))
                .await
                .ok()
        }
        .await;
        match logged {
            Some(msg) => Ok(OpReply::Created {
                info,
                durability: Durability::Logged,
                created_seq: Some(msg.sequence),
            }),
            None => Err(Error::Operation(keysync_schemas::OpError::new(
                OpErrorKind::Unavailable,
                format!("key {key_id} exists on {} but is not logged yet", info.hsm),
            ))),
        }
    }

    /// Every key one HSM holds (fetched a page at a time).
    pub async fn list_keys(&self, hsm: &HsmId) -> Result<Vec<KeyInfo>> {
        const PAGE: u32 = 400;
        let route = Route::Hsm(hsm.clone());
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = match self
                .request(&route, OpRequest::List { after, limit: PAGE })
                .await?
            {
                OpReply::List(keys) => keys,
                other => return Err(Self::unexpected(other)),
            };
            let done = page.len() < PAGE as usize;
            after = page.last().map(|k| k.key_id);
            all.extend(page);
            if done || after.is_none() {
                return Ok(all);
            }
        }
    }

    /// One key's metadata.
    pub async fn key_info(&self, key_id: KeyId, route: &Route) -> Result<KeyInfo> {
        match self.request(route, OpRequest::Info { key_id }).await? {
            OpReply::Info(info) => Ok(info),
            other => Err(Self::unexpected(other)),
        }
    }

    /// Signs `data`.
    pub async fn sign(&self, key_id: KeyId, data: &[u8], route: &Route) -> Result<Vec<u8>> {
        let op = OpRequest::Sign {
            key_id,
            data: data.to_vec(),
        };
        match self.request(route, op).await? {
            OpReply::Signature(s) => Ok(s),
            other => Err(Self::unexpected(other)),
        }
    }

    /// Verifies a signature on the HSM.
    pub async fn verify(
        &self,
        key_id: KeyId,
        data: &[u8],
        signature: &[u8],
        route: &Route,
    ) -> Result<bool> {
        let op = OpRequest::Verify {
            key_id,
            data: data.to_vec(),
            signature: signature.to_vec(),
        };
        match self.request(route, op).await? {
            OpReply::Verified(v) => Ok(v),
            other => Err(Self::unexpected(other)),
        }
    }

    /// AES-256-GCM encryption; returns nonce ‖ ciphertext ‖ tag.
    pub async fn encrypt(
        &self,
        key_id: KeyId,
        plaintext: &[u8],
        aad: &[u8],
        route: &Route,
    ) -> Result<Vec<u8>> {
        let op = OpRequest::Encrypt {
            key_id,
            plaintext: SecretBytes(plaintext.to_vec()),
            aad: aad.to_vec(),
        };
        match self.request(route, op).await? {
            OpReply::Ciphertext(c) => Ok(c),
            other => Err(Self::unexpected(other)),
        }
    }

    /// AES-256-GCM decryption.
    pub async fn decrypt(
        &self,
        key_id: KeyId,
        ciphertext: &[u8],
        aad: &[u8],
        route: &Route,
    ) -> Result<SecretBytes> {
        let op = OpRequest::Decrypt {
            key_id,
            ciphertext: ciphertext.to_vec(),
            aad: aad.to_vec(),
        };
        match self.request(route, op).await? {
            OpReply::Plaintext(p) => Ok(p),
            other => Err(Self::unexpected(other)),
        }
    }

    /// Signs a digest the caller computed (a DER DigestInfo for
    /// [`DigestSignScheme::RsaPkcs1`]), as PKCS#11's `CKM_ECDSA`,
    /// `CKM_RSA_PKCS` and `CKM_RSA_PKCS_PSS` do. ECDSA signatures come
    /// back raw (r ‖ s). Input the scheme cannot take (a digest of the
    /// wrong length, PSS parameters keysync lacks) is refused here, before
    /// anything is sent, with [`Error::BadRequest`].
    pub async fn sign_digest(
        &self,
        key_id: KeyId,
        scheme: DigestSignScheme,
        digest: &[u8],
        route: &Route,
    ) -> Result<Vec<u8>> {
        scheme.check(digest).map_err(Error::BadRequest)?;
        let op = OpRequest::SignDigest {
            key_id,
            scheme,
            digest: digest.to_vec(),
        };
        match self.request(route, op).await? {
            OpReply::Signature(s) => Ok(s),
            other => Err(Self::unexpected(other)),
        }
    }

    /// AES-256-GCM with the caller's IV, AAD and tag length (PKCS#11
    /// `CKM_AES_GCM`); returns ciphertext ‖ tag. The caller owns the IV and
    /// must never reuse one under the same key.
    pub async fn encrypt_gcm(
        &self,
        key_id: KeyId,
        params: GcmParams,
        plaintext: &[u8],
        route: &Route,
    ) -> Result<Vec<u8>> {
        params.check().map_err(Error::BadRequest)?;
        let op = OpRequest::EncryptGcm {
            key_id,
            params,
            plaintext: SecretBytes(plaintext.to_vec()),
        };
        match self.request(route, op).await? {
            OpReply::Ciphertext(c) => Ok(c),
            other => Err(Self::unexpected(other)),
        }
    }

    /// Opens ciphertext ‖ tag sealed with these parameters; a wrong key,
    /// IV, AAD or a tampered input is [`OpErrorKind::IntegrityFailed`].
    pub async fn decrypt_gcm(
        &self,
        key_id: KeyId,
        params: GcmParams,
        ciphertext: &[u8],
        route: &Route,
    ) -> Result<SecretBytes> {
        params.check().map_err(Error::BadRequest)?;
        let op = OpRequest::DecryptGcm {
            key_id,
            params,
            ciphertext: ciphertext.to_vec(),
        };
        match self.request(route, op).await? {
            OpReply::Plaintext(p) => Ok(p),
            other => Err(Self::unexpected(other)),
        }
    }

    /// The public key as SPKI DER.
    pub async fn public_key(&self, key_id: KeyId, route: &Route) -> Result<Vec<u8>> {
        match self.request(route, OpRequest::PublicKey { key_id }).await? {
            OpReply::PublicKey(der) => Ok(der),
            other => Err(Self::unexpected(other)),
        }
    }

    /// Deletes a key from every HSM: an HSM holding it erases it and logs
    /// the tombstone; the orchestrator has every other HSM erase it and
    /// purges its wrapped material from the stream. Returns the stream
    /// sequence of the tombstone.
    pub async fn delete_key(&self, key_id: KeyId, route: &Route) -> Result<u64> {
        match self.request(route, OpRequest::Delete { key_id }).await? {
            OpReply::Deleted { seq, .. } => Ok(seq),
            other => Err(Self::unexpected(other)),
        }
    }

    /// One agent's health and counters.
    pub async fn health(&self, hsm: &HsmId) -> Result<keysync_schemas::AgentHealth> {
        match self
            .request(&Route::Hsm(hsm.clone()), OpRequest::Health)
            .await?
        {
            OpReply::Health(h) => Ok(h),
            other => Err(Self::unexpected(other)),
        }
    }

    /// Number of member HSMs: asked of the orchestrator, or from the latest
    /// metrics if it does not answer.
    pub async fn cluster_size(&self) -> Result<u64> {
        match self.cluster_status().await {
            Ok(s) => Ok(s.members.len() as u64),
            Err(e) => self.latest_metrics().map(|m| m.members).ok_or(e),
        }
    }

    /// Member HSMs able to hold keys of `key_type` (a member may announce
    /// that its token cannot): asked of the orchestrator, or every member
    /// from the latest metrics if it does not answer.
    async fn able_members(&self, key_type: keysync_schemas::KeyType) -> Result<u64> {
        match self.cluster_status().await {
            Ok(s) => Ok(s
                .members
                .iter()
                .filter(|m| !m.cannot_hold.contains(&key_type))
                .count() as u64),
            Err(e) => self.latest_metrics().map(|m| m.members).ok_or(e),
        }
    }

    /// Checks an event seen on core NATS: signed by its enrolled HSM or
    /// the cluster key, fresh. Learns (or relearns, for a signer not known
    /// yet) the keys from the orchestrator's status.
    async fn verified_event(
        &self,
        msg: &async_nats::Message,
    ) -> Option<keysync_schemas::Envelope<Event>> {
        let now = keysync_schemas::Timestamp::now().as_nanos();
        for refresh in [false, true] {
            let trust = {
                let mut t = self.inner.trust.lock().await;
                if t.is_none() || refresh {
                    if let Ok(s) = self.cluster_status().await {
                        if let Some(cluster_key) = s.cluster_key {
                            *t = Some(Trust {
                                cluster_key,
                                enrolled: s.enrolled.into_iter().collect(),
                            });
                        }
                    }
                }
                t.clone()?
            };
            match keysync_security::check_event(
                msg.headers.as_ref(),
                &msg.subject,
                &msg.payload,
                now,
                &trust.cluster_key,
                |h| trust.enrolled.get(h).copied(),
            ) {
                Ok(env) => return Some(env),
                Err(r) if r.reason == keysync_schemas::RejectReason::Unenrolled => continue,
                Err(r) => {
                    tracing::warn!(subject = %msg.subject, reason = %r.reason, "ignored an event that does not verify");
                    return None;
                }
            }
        }
        None
    }

    /// Cluster status from the orchestrator.
    pub async fn cluster_status(&self) -> Result<ClusterStatus> {
        match self.ask_orchestrator(StatusRequest::Cluster).await? {
            StatusReply::Cluster(s) => Ok(s),
            other => Err(Error::Protocol(format!(
                "a cluster status request answered with {other:?}"
            ))),
        }
    }

    /// What the orchestrator's fold of the log says of one key: unknown,
    /// live (and on which HSMs) or deleted. An orchestrator older than
    /// this query does not answer it ([`Error::OrchestratorUnavailable`]).
    pub async fn key_status(&self, key_id: KeyId) -> Result<KeyStatus> {
        match self.ask_orchestrator(StatusRequest::Key(key_id)).await? {
            StatusReply::Key(s) if s.key_id == key_id => Ok(s),
            other => Err(Error::Protocol(format!(
                "a key status request answered with {other:?}"
            ))),
        }
    }

    /// Why `key_id` was not found, if the log can say: it never existed
    /// ([`Error::NoSuchKey`]) or was deleted ([`Error::KeyDeleted`]).
    /// `None` when the log knows it live (so it is on its way to the HSMs
    /// that lack it) or the orchestrator does not answer.
    pub async fn why_missing(&self, key_id: KeyId) -> Option<Error> {
        match self.key_status(key_id).await.ok()?.standing {
            KeyStanding::Unknown => Some(Error::NoSuchKey { key_id }),
            KeyStanding::Deleted => Some(Error::KeyDeleted { key_id }),
            KeyStanding::Live => None,
        }
    }

    async fn ask_orchestrator(&self, req: StatusRequest) -> Result<StatusReply> {
        let payload = encode(&Envelope::new(self.source(), req))
            .map_err(|e| Error::BadRequest(e.to_string()))?;
        let msg = self
            .inner
            .nats
            .send_request(
                self.inner.options.subjects.orchestrator_status(),
                Request::new()
                    .payload(payload.into())
                    .timeout(Some(self.inner.options.request_timeout)),
            )
            .await
            .map_err(|e| Error::OrchestratorUnavailable(e.to_string()))?;
        Ok(decode::<StatusReply>(&msg.payload)
            .map_err(|e| Error::Protocol(e.to_string()))?
            .body)
    }
}

/// Keeps the latest sync-metrics document.
async fn watch_metrics(
    nats: async_nats::Client,
    subject: String,
    tx: watch::Sender<Option<SyncMetrics>>,
) {
    let mut sub = match nats.subscribe(subject).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch sync metrics; retry budgets use their fallback");
            return;
        }
    };
    while let Some(msg) = sub.next().await {
        match serde_json::from_slice::<SyncMetrics>(&msg.payload) {
            Ok(m) => {
                let _ = tx.send(Some(m));
            }
            Err(e) => tracing::debug!(error = %e, "unreadable metrics document"),
        }
    }
}
