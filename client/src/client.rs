//! The SDK client: key operations routed to one HSM or any, creates with a
//! durability level, cluster status.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::Request;
use futures::StreamExt;
use keysync_schemas::{
    decode, encode, ClusterStatus, Durability, Envelope, Event, HsmId, KeyAttributes, KeyId,
    KeyInfo, KeyType, OpErrorKind, OpReply, OpRequest, SecretBytes, Source, StatusReply,
    StatusRequest, Subjects,
};

use crate::error::{Error, Result};

/// Where a key operation goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// One named HSM.
    Hsm(HsmId),
    /// Any HSM, through the agents' queue group (it may lack a key created
    /// moments ago elsewhere).
    Any,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Hsm(h) => write!(f, "HSM {h}"),
            Route::Any => f.write_str("any HSM"),
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
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            subjects: Subjects::default(),
            name: "keysync-client".into(),
            request_timeout: Duration::from_secs(10),
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
            session: false,
            durability_timeout: Duration::from_secs(10),
        }
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

/// A connection to a keysync cluster.
#[derive(Clone)]
pub struct Client {
    nats: async_nats::Client,
    options: ClientOptions,
}

impl Client {
    /// Connects with default options.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, ClientOptions::default()).await
    }

    /// Connects with `options`.
    pub async fn connect_with(url: &str, options: ClientOptions) -> Result<Self> {
        let nats = async_nats::ConnectOptions::new()
            .name(&options.name)
            .connect(url)
            .await
            .map_err(|e| Error::Connect {
                url: url.to_string(),
                detail: e.to_string(),
            })?;
        Ok(Client { nats, options })
    }

    /// Wraps an existing NATS connection.
    pub fn from_nats(nats: async_nats::Client, options: ClientOptions) -> Self {
        Client { nats, options }
    }

    /// The NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// The subject layout.
    pub fn subjects(&self) -> &Subjects {
        &self.options.subjects
    }

    fn source(&self) -> Source {
        Source::Client(self.options.name.clone())
    }

    /// Sends one operation and returns the reply, errors turned into [`Error`].
    pub async fn request(&self, route: &Route, op: OpRequest) -> Result<OpReply> {
        let subject = match route {
            Route::Hsm(h) => self.options.subjects.hsm_op(h),
            Route::Any => self.options.subjects.any_op(),
        };
        let key_id = match &op {
            OpRequest::Sign { key_id, .. }
            | OpRequest::Verify { key_id, .. }
            | OpRequest::Encrypt { key_id, .. }
            | OpRequest::Decrypt { key_id, .. }
            | OpRequest::PublicKey { key_id }
            | OpRequest::Info { key_id } => Some(*key_id),
            _ => None,
        };
        let payload = encode(&Envelope::new(self.source(), op))
            .map_err(|e| Error::BadRequest(e.to_string()))?;
        let msg = self
            .nats
            .send_request(
                subject,
                Request::new()
                    .payload(payload.into())
                    .timeout(Some(self.options.request_timeout)),
            )
            .await
            .map_err(|e| Error::HsmUnavailable {
                route: route.to_string(),
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
    pub async fn create_key(&self, spec: CreateKey) -> Result<CreatedKey> {
        let key_id = KeyId::new();
        let op = OpRequest::Generate {
            key_id: Some(key_id),
            key_type: spec.key_type,
            session: spec.session,
            durability: spec.durability,
            attributes: KeyAttributes {
                label: spec.label.clone(),
            },
        };
        self.create_with(key_id, &spec, op).await
    }

    /// Imports plaintext material (PKCS#8 DER, or 32 raw bytes for AES-256).
    pub async fn import_key(&self, spec: CreateKey, material: Vec<u8>) -> Result<CreatedKey> {
        let key_id = KeyId::new();
        let op = OpRequest::Import {
            key_id: Some(key_id),
            key_type: spec.key_type,
            material: SecretBytes(material),
            session: spec.session,
            durability: spec.durability,
            attributes: KeyAttributes {
                label: spec.label.clone(),
            },
        };
        self.create_with(key_id, &spec, op).await
    }

    async fn create_with(
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
        let wait = matches!(spec.durability, Durability::Replicas(n) if n > 1)
            || spec.durability == Durability::All;
        if wait && spec.session {
            return Err(Error::BadRequest(
                "session keys never leave their HSM: use durability none or logged".into(),
            ));
        }
        // Subscribe before asking, so no acknowledgement can be missed.
        let mut key_events = if wait {
            Some(
                self.nats
                    .subscribe(self.options.subjects.key_events(&key_id))
                    .await
                    .map_err(|e| Error::HsmUnavailable {
                        route: spec.route.to_string(),
                        detail: e.to_string(),
                    })?,
            )
        } else {
            None
        };
        let reply = self.request(&spec.route, op).await?;
        let OpReply::Created {
            info,
            durability,
            created_seq,
        } = reply
        else {
            return Err(Self::unexpected(reply));
        };
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
            let Ok(env) = decode::<Event>(&msg.payload) else {
                continue;
            };
            match env.body {
                Event::CloneApplied(a)
                    if a.key_id == key_id && a.fingerprint == info.fingerprint =>
                {
                    holders.insert(a.hsm);
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

    /// Every key one HSM holds.
    pub async fn list_keys(&self, hsm: &HsmId) -> Result<Vec<KeyInfo>> {
        match self
            .request(&Route::Hsm(hsm.clone()), OpRequest::List)
            .await?
        {
            OpReply::List(keys) => Ok(keys),
            other => Err(Self::unexpected(other)),
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

    /// The public key as SPKI DER.
    pub async fn public_key(&self, key_id: KeyId, route: &Route) -> Result<Vec<u8>> {
        match self.request(route, OpRequest::PublicKey { key_id }).await? {
            OpReply::PublicKey(der) => Ok(der),
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

    /// Cluster status from the orchestrator.
    pub async fn cluster_status(&self) -> Result<ClusterStatus> {
        let payload = encode(&Envelope::new(self.source(), StatusRequest::Cluster))
            .map_err(|e| Error::BadRequest(e.to_string()))?;
        let msg = self
            .nats
            .send_request(
                self.options.subjects.orchestrator_status(),
                Request::new()
                    .payload(payload.into())
                    .timeout(Some(self.options.request_timeout)),
            )
            .await
            .map_err(|e| Error::OrchestratorUnavailable(e.to_string()))?;
        match decode::<StatusReply>(&msg.payload)
            .map_err(|e| Error::Protocol(e.to_string()))?
            .body
        {
            StatusReply::Cluster(s) => Ok(s),
        }
    }
}
