//! Lifecycle events for other languages: CloudEvents 1.0 in structured
//! JSON mode, mirrored by the active orchestrator from the signed events
//! stream into `KEYSYNC_LIFECYCLE` (see
//! `docs/decisions/0014-lifecycle-events.md`).
//!
//! Everything here is JSON with a JSON Schema generated from these types
//! (`schemas/json/*.v1.json`, checked in; a test fails when they differ
//! from what the types generate). Within a version (`.v1`) fields are only
//! ever added, never renamed, retyped or removed: a consumer must accept
//! fields it does not know. Nothing here carries key material, wrapped or
//! not, nor anything derived from a private value other than the
//! fingerprint.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The CloudEvents version written.
pub const SPEC_VERSION: &str = "1.0";

/// NATS `content-type` header of a structured-mode CloudEvent (the
/// CloudEvents NATS protocol binding).
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// The `datacontenttype` of every lifecycle event.
pub const DATA_CONTENT_TYPE: &str = "application/json";

/// Where the schema files are published: the repository's
/// `schemas/json/` folder. `dataschema` is this plus the file name, and
/// each schema's `$id` is the same URI, so a validator resolves one from
/// the other.
pub const SCHEMA_BASE: &str = "https://example.invalid/keysync/schemas/json/";

/// A key type, as lifecycle events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyTypeName {
    /// ECDSA P-256.
    P256,
    /// Ed25519.
    Ed25519,
    /// AES-256.
    Aes256,
    /// RSA-2048.
    Rsa2048,
}

impl From<crate::KeyType> for KeyTypeName {
    fn from(t: crate::KeyType) -> Self {
        match t {
            crate::KeyType::P256 => KeyTypeName::P256,
            crate::KeyType::Ed25519 => KeyTypeName::Ed25519,
            crate::KeyType::Aes256 => KeyTypeName::Aes256,
            crate::KeyType::Rsa2048 => KeyTypeName::Rsa2048,
        }
    }
}

/// How a key came to exist on its first HSM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OriginName {
    /// Generated inside the HSM.
    Generated,
    /// Imported from plaintext.
    Imported,
    /// Unwrapped under a key the HSM holds.
    Unwrapped,
}

impl From<crate::KeyOrigin> for OriginName {
    fn from(o: crate::KeyOrigin) -> Self {
        match o {
            crate::KeyOrigin::Generated => OriginName::Generated,
            crate::KeyOrigin::Imported => OriginName::Imported,
            crate::KeyOrigin::Unwrapped => OriginName::Unwrapped,
        }
    }
}

/// The CloudEvents version: `1.0`.
fn spec_version_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "const": "1.0"})
}

/// An events-stream sequence: decimal digits.
fn seq_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "pattern": "^[1-9][0-9]*$"})
}

/// An RFC 3339 time.
fn time_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "format": "date-time"})
}

/// A URI.
fn uri_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "format": "uri"})
}

/// A key id: a UUID in its hyphenated form.
fn key_id_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "format": "uuid"})
}

/// An HSM id: a NATS subject token.
fn hsm_id_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"})
}

/// A list of HSM ids.
fn hsm_ids_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let item = hsm_id_schema(g);
    schemars::json_schema!({"type": "array", "items": item})
}

/// A fingerprint: 64 lower-case hex digits.
fn fingerprint_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "pattern": "^[0-9a-f]{64}$"})
}

/// An application's key id: 1 to 64 bytes as lower-case hex.
fn app_id_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "pattern": "^([0-9a-f]{2}){1,64}$"})
}

/// A durability level as the CLI writes it.
fn durability_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "pattern": "^(none|logged|all|replicas:[1-9][0-9]*)$"})
}

/// `io.keysync.key.created.v1`: a key was created on an HSM and logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KeyCreatedData {
    /// The key.
    #[schemars(schema_with = "key_id_schema")]
    pub key_id: String,
    /// Its type.
    pub key_type: KeyTypeName,
    /// Its fingerprint, identical on every HSM (SHA-256 over the public key
    /// for asymmetric keys, an HMAC keyed by the key for AES).
    #[schemars(schema_with = "fingerprint_schema")]
    pub fingerprint: String,
    /// The HSM that created it.
    #[schemars(schema_with = "hsm_id_schema")]
    pub hsm: String,
    /// How it was created.
    pub origin: OriginName,
    /// The durability the creator asked for.
    #[schemars(schema_with = "durability_schema")]
    pub durability: String,
    /// Its label (`CKA_LABEL`), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The application's own key id (`CKA_ID`), lower-case hex, if it has
    /// one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "app_id_schema")]
    pub app_id: Option<String>,
}

/// `io.keysync.key.applied.v1`: one more HSM holds the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KeyAppliedData {
    /// The key.
    #[schemars(schema_with = "key_id_schema")]
    pub key_id: String,
    /// The HSM that now holds it.
    #[schemars(schema_with = "hsm_id_schema")]
    pub hsm: String,
    /// The fingerprint that HSM computed.
    #[schemars(schema_with = "fingerprint_schema")]
    pub fingerprint: String,
    /// Whether it held the key already (an idempotent no-op).
    pub already_present: bool,
}

/// `io.keysync.key.clone_failed.v1`: an HSM could not take the key, for
/// good (nothing was stored there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KeyCloneFailedData {
    /// The key.
    #[schemars(schema_with = "key_id_schema")]
    pub key_id: String,
    /// The HSM.
    #[schemars(schema_with = "hsm_id_schema")]
    pub hsm: String,
    /// Why, as a stable snake_case name (`wrong_domain`, `integrity`,
    /// `invalid_material`, `fingerprint_mismatch`, `conflict`, `storage`,
    /// `undecided`, `unsupported`; more may come).
    pub reason: String,
    /// Why, for people.
    pub detail: String,
}

/// `io.keysync.key.replicated.v1`: every live member able to hold the key
/// holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KeyReplicatedData {
    /// The key.
    #[schemars(schema_with = "key_id_schema")]
    pub key_id: String,
    /// Its fingerprint.
    #[schemars(schema_with = "fingerprint_schema")]
    pub fingerprint: String,
    /// Every HSM that holds it.
    #[schemars(schema_with = "hsm_ids_schema")]
    pub holders: Vec<String>,
    /// From its `KeyCreated` stored to the last clone stored, by the
    /// stream's clock, in milliseconds.
    pub sync_latency_ms: f64,
    /// Events-stream sequence of its `KeyCreated`.
    pub created_seq: u64,
}

/// `io.keysync.key.deleted.v1`: a key was deleted (a tombstone; every HSM
/// erases it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KeyDeletedData {
    /// The key.
    #[schemars(schema_with = "key_id_schema")]
    pub key_id: String,
    /// Its fingerprint.
    #[schemars(schema_with = "fingerprint_schema")]
    pub fingerprint: String,
    /// The HSM the deletion was asked of.
    #[schemars(schema_with = "hsm_id_schema")]
    pub hsm: String,
}

/// `io.keysync.key.erased.v1`: one HSM erased a deleted key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KeyErasedData {
    /// The key.
    #[schemars(schema_with = "key_id_schema")]
    pub key_id: String,
    /// The HSM.
    #[schemars(schema_with = "hsm_id_schema")]
    pub hsm: String,
    /// Whether the HSM held the key.
    pub was_present: bool,
}

/// `io.keysync.hsm.joined.v1`: an HSM's agent (re)started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HsmJoinedData {
    /// The HSM.
    #[schemars(schema_with = "hsm_id_schema")]
    pub hsm: String,
    /// The agent's version.
    pub agent_version: String,
    /// Token keys it held when it joined.
    pub token_keys: u64,
}

/// `io.keysync.hsm.failed.v1`: the orchestrator declared an HSM failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HsmFailedData {
    /// The HSM.
    #[schemars(schema_with = "hsm_id_schema")]
    pub hsm: String,
    /// How long it had been silent, in milliseconds.
    pub silent_ms: u64,
}

/// `io.keysync.hsm.recovered.v1`: a failed HSM is heard from again: its
/// heartbeats came back, or its agent restarted and joined again (then
/// this event stands for that `joined`, with the agent's figures).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HsmRecoveredData {
    /// The HSM.
    #[schemars(schema_with = "hsm_id_schema")]
    pub hsm: String,
    /// Whether it came back by restarting (joining again) rather than by
    /// its heartbeats resuming.
    #[serde(default)]
    pub rejoined: bool,
    /// When rejoined: the agent's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// When rejoined: token keys it held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_keys: Option<u64>,
}

/// `io.keysync.hsm.enrolled.v1`: an HSM's identity key was enrolled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HsmEnrolledData {
    /// The HSM.
    #[schemars(schema_with = "hsm_id_schema")]
    pub hsm: String,
    /// Its agent's Ed25519 identity key (public), hex.
    pub public_key: String,
    /// `operator` or `join_token`.
    pub via: String,
}

/// `io.keysync.hsm.removed.v1`: an operator removed an HSM (its identity
/// key is revoked, it is no member).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HsmRemovedData {
    /// The HSM.
    #[schemars(schema_with = "hsm_id_schema")]
    pub hsm: String,
}

/// The data of a lifecycle event, one variant per type.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum LifecycleData {
    /// `key.created`
    KeyCreated(KeyCreatedData),
    /// `key.applied`
    KeyApplied(KeyAppliedData),
    /// `key.clone_failed`
    KeyCloneFailed(KeyCloneFailedData),
    /// `key.replicated`
    KeyReplicated(KeyReplicatedData),
    /// `key.deleted`
    KeyDeleted(KeyDeletedData),
    /// `key.erased`
    KeyErased(KeyErasedData),
    /// `hsm.joined`
    HsmJoined(HsmJoinedData),
    /// `hsm.failed`
    HsmFailed(HsmFailedData),
    /// `hsm.recovered`
    HsmRecovered(HsmRecoveredData),
    /// `hsm.enrolled`
    HsmEnrolled(HsmEnrolledData),
    /// `hsm.removed`
    HsmRemoved(HsmRemovedData),
}

/// What a lifecycle event is about: a key or an HSM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum About {
    /// `<prefix>.lifecycle.key.<key_id>.<event>`
    Key,
    /// `<prefix>.lifecycle.hsm.<hsm_id>.<event>`
    Hsm,
}

impl LifecycleData {
    /// What it is about, and the event's name (the last subject token and
    /// the middle of its `type`).
    pub fn name(&self) -> (About, &'static str) {
        match self {
            LifecycleData::KeyCreated(_) => (About::Key, "created"),
            LifecycleData::KeyApplied(_) => (About::Key, "applied"),
            LifecycleData::KeyCloneFailed(_) => (About::Key, "clone_failed"),
            LifecycleData::KeyReplicated(_) => (About::Key, "replicated"),
            LifecycleData::KeyDeleted(_) => (About::Key, "deleted"),
            LifecycleData::KeyErased(_) => (About::Key, "erased"),
            LifecycleData::HsmJoined(_) => (About::Hsm, "joined"),
            LifecycleData::HsmFailed(_) => (About::Hsm, "failed"),
            LifecycleData::HsmRecovered(_) => (About::Hsm, "recovered"),
            LifecycleData::HsmEnrolled(_) => (About::Hsm, "enrolled"),
            LifecycleData::HsmRemoved(_) => (About::Hsm, "removed"),
        }
    }

    /// The CloudEvents `type`: `io.keysync.<key|hsm>.<event>.v1`.
    pub fn event_type(&self) -> String {
        let (about, name) = self.name();
        format!("io.keysync.{}.{name}.v1", about.token())
    }

    /// The schema file of its data: `<key|hsm>.<event>.v1.json`.
    pub fn schema_file(&self) -> String {
        let (about, name) = self.name();
        format!("{}.{name}.v1.json", about.token())
    }
}

impl About {
    /// `key` or `hsm`.
    pub fn token(self) -> &'static str {
        match self {
            About::Key => "key",
            About::Hsm => "hsm",
        }
    }
}

/// A CloudEvents 1.0 event in structured JSON mode, as stored in
/// `KEYSYNC_LIFECYCLE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "CloudEvent")]
pub struct CloudEvent<T> {
    /// `1.0`.
    #[schemars(schema_with = "spec_version_schema")]
    pub specversion: String,
    /// Unique within `source`, and deterministic: the same fact always
    /// gets the same id (`events-<seq>`), which is also the message's
    /// `Nats-Msg-Id`, so a failover or a replay never stores it twice.
    pub id: String,
    /// The cluster: `urn:keysync:<subject prefix>`.
    #[schemars(schema_with = "uri_schema")]
    pub source: String,
    /// `io.keysync.<key|hsm>.<event>.v1`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The key id or HSM id the event is about.
    pub subject: String,
    /// When the fact was stored in the events stream (RFC 3339, UTC).
    #[schemars(schema_with = "time_schema")]
    pub time: String,
    /// `application/json`.
    pub datacontenttype: String,
    /// The JSON Schema of `data`: the repository's `schemas/json/` folder
    /// plus the schema file name (`key.created.v1.json`, ...).
    #[schemars(schema_with = "uri_schema")]
    pub dataschema: String,
    /// Extension: the fact's sequence in the signed events stream (decimal
    /// digits; a string because CloudEvents integers stop at 2^31). Check
    /// the event against the fact stored there.
    #[schemars(schema_with = "seq_schema")]
    pub keysyncseq: String,
    /// Extension (W3C trace context): the trace of the fact, which for a
    /// key is the key's trace, begun when it was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Extension (W3C trace context): vendor trace state, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    /// The event's data; its schema is `dataschema`.
    pub data: T,
}

/// Every JSON Schema of `schemas/json/`, by file name: the CloudEvent
/// envelope, each event's data, and the `<prefix>.metrics.sync` document.
pub fn json_schemas() -> Vec<(String, serde_json::Value)> {
    fn one<T: JsonSchema>(file: &str) -> (String, serde_json::Value) {
        let mut schema = schemars::schema_for!(T).to_value();
        if let Some(o) = schema.as_object_mut() {
            // `$id` first among the keywords a reader looks for.
            o.insert(
                "$id".into(),
                serde_json::Value::String(format!("{SCHEMA_BASE}{file}")),
            );
        }
        (file.to_string(), schema)
    }
    vec![
        one::<CloudEvent<serde_json::Value>>("cloudevent.v1.json"),
        one::<KeyCreatedData>("key.created.v1.json"),
        one::<KeyAppliedData>("key.applied.v1.json"),
        one::<KeyCloneFailedData>("key.clone_failed.v1.json"),
        one::<KeyReplicatedData>("key.replicated.v1.json"),
        one::<KeyDeletedData>("key.deleted.v1.json"),
        one::<KeyErasedData>("key.erased.v1.json"),
        one::<HsmJoinedData>("hsm.joined.v1.json"),
        one::<HsmFailedData>("hsm.failed.v1.json"),
        one::<HsmRecoveredData>("hsm.recovered.v1.json"),
        one::<HsmEnrolledData>("hsm.enrolled.v1.json"),
        one::<HsmRemovedData>("hsm.removed.v1.json"),
        one::<crate::SyncMetrics>("metrics.sync.v1.json"),
    ]
}

/// A schema file's text: pretty JSON with a final newline.
pub fn pretty(schema: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(schema).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_base_is_the_repositorys_schema_folder() {
        assert_eq!(
            SCHEMA_BASE,
            format!("{}/schemas/json/", env!("CARGO_PKG_REPOSITORY"))
        );
    }

    #[test]
    fn every_data_type_has_its_schema_file() {
        let files: Vec<String> = json_schemas().into_iter().map(|(f, _)| f).collect();
        let h = || "h".to_string();
        let all = [
            LifecycleData::HsmRecovered(HsmRecoveredData {
                hsm: h(),
                rejoined: false,
                agent_version: None,
                token_keys: None,
            }),
            LifecycleData::HsmRemoved(HsmRemovedData { hsm: h() }),
            LifecycleData::HsmFailed(HsmFailedData {
                hsm: h(),
                silent_ms: 1,
            }),
        ];
        for d in all {
            assert!(files.contains(&d.schema_file()), "{}", d.schema_file());
        }
        assert_eq!(
            LifecycleData::HsmRemoved(HsmRemovedData { hsm: h() }).event_type(),
            "io.keysync.hsm.removed.v1"
        );
    }
}
