//! NATS decentralized JWT credentials: an operator, a system account and a
//! keysync account whose *scoped signing key* mints one user per HSM agent
//! with permissions templated on the user's name (its HSM id), so adding an
//! HSM never edits a server config (docs/decisions/0016-nats-credentials.md).
//!
//! The JWTs are the nats-io/jwt v2 layout nats-server reads: header
//! `{"typ":"JWT","alg":"ed25519-nkey"}`; claims `jti` (base32 of the
//! SHA-512/256 of the standard claims), `iat`, `iss`, `name`, `sub`, and a
//! `nats` object with `type` and `version: 2`; the Ed25519 signature (by
//! an nkey, the `nkeys` crate) over `base64url(header).base64url(claims)`.
//! Checked against a real nats-server by `tests/tests/nats_credentials.rs`.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use nkeys::{KeyPair, KeyPairType};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest as _;

/// Why a credential could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum NatsJwtError {
    /// An nkey (seed or public key) that does not decode, or of the wrong kind.
    #[error("nkey: {0}")]
    Nkey(String),
    /// A JWT that is not three base64url parts of JSON, or not signed by its issuer.
    #[error("JWT: {0}")]
    Jwt(String),
    /// A signer file that is not what `keysync nats init` wrote.
    #[error("signer file: {0}")]
    Signer(String),
}

fn nkey_err(e: nkeys::error::Error) -> NatsJwtError {
    NatsJwtError::Nkey(e.to_string())
}

/// The standard claims of nats-io/jwt v2, in its field order (the `jti`
/// hash is over exactly this JSON, with `jti` empty and so omitted).
#[derive(Serialize)]
struct ClaimsData<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    jti: Option<&'a str>,
    iat: u64,
    iss: &'a str,
    name: &'a str,
    sub: &'a str,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Encodes and signs a JWT: `sub` named `name`, issued now by `signer`,
/// with `nats` (which must carry `type` and `version`).
pub fn encode(
    signer: &KeyPair,
    sub: &str,
    name: &str,
    nats: Value,
) -> Result<String, NatsJwtError> {
    encode_at(signer, sub, name, nats, now_secs())
}

fn encode_at(
    signer: &KeyPair,
    sub: &str,
    name: &str,
    nats: Value,
    iat: u64,
) -> Result<String, NatsJwtError> {
    let iss = signer.public_key();
    let std_claims = ClaimsData {
        jti: None,
        iat,
        iss: &iss,
        name,
        sub,
    };
    let hashed = serde_json::to_vec(&std_claims).map_err(|e| NatsJwtError::Jwt(e.to_string()))?;
    let jti = data_encoding::BASE32_NOPAD.encode(&sha2::Sha512_256::digest(&hashed));
    let mut claims = serde_json::to_value(ClaimsData {
        jti: Some(&jti),
        ..std_claims
    })
    .map_err(|e| NatsJwtError::Jwt(e.to_string()))?;
    claims["nats"] = nats;
    let body = serde_json::to_vec(&claims).map_err(|e| NatsJwtError::Jwt(e.to_string()))?;
    let signing_input = format!("{}.{}", b64(HEADER.as_bytes()), b64(&body));
    let sig = signer.sign(signing_input.as_bytes()).map_err(nkey_err)?;
    Ok(format!("{signing_input}.{}", b64(&sig)))
}

/// The claims of a JWT, after checking that its issuer (`iss`) signed it.
pub fn decode(jwt: &str) -> Result<Value, NatsJwtError> {
    let bad = |why: &str| NatsJwtError::Jwt(why.to_string());
    let mut parts = jwt.trim().split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("not three dot-separated parts"));
    };
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let body = engine
        .decode(c)
        .map_err(|_| bad("claims are not base64url"))?;
    let sig = engine
        .decode(s)
        .map_err(|_| bad("signature is not base64url"))?;
    let claims: Value = serde_json::from_slice(&body).map_err(|_| bad("claims are not JSON"))?;
    let iss = claims["iss"].as_str().ok_or_else(|| bad("no issuer"))?;
    KeyPair::from_public_key(iss)
        .map_err(nkey_err)?
        .verify(format!("{h}.{c}").as_bytes(), &sig)
        .map_err(|_| bad("the signature is not its issuer's"))?;
    Ok(claims)
}

/// A `.creds` file: the user JWT and its nkey seed, in the layout NATS
/// clients (async-nats, nats.go, the `nats` CLI) read.
pub fn creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// The user JWT in a `.creds` file (its first armoured block).
pub fn jwt_of_creds(text: &str) -> Option<&str> {
    let start = text.find("-----BEGIN NATS USER JWT-----")? + "-----BEGIN NATS USER JWT-----".len();
    let rest = &text[start..];
    let end = rest.find("------END NATS USER JWT------")?;
    Some(rest[..end].trim())
}

/// The name in the user JWT of a `.creds` file (the role, or an agent's
/// HSM id): what its inbox prefix is named after.
pub fn creds_name(text: &str) -> Option<String> {
    let claims = decode(jwt_of_creds(text)?).ok()?;
    claims["name"].as_str().map(String::from)
}

/// Publish and subscribe allow-lists (a NATS user's permissions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects it may publish to.
    pub publish: Vec<String>,
    /// Subjects it may subscribe to (`subject queue` for a queue group).
    pub subscribe: Vec<String>,
}

impl Permissions {
    fn of(publish: &[&str], subscribe: &[&str]) -> Self {
        Permissions {
            publish: publish.iter().map(|s| s.to_string()).collect(),
            subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The `pub`/`sub` and limits of a user JWT or a scope template.
    fn to_claims(&self) -> Value {
        json!({
            "pub": {"allow": self.publish},
            "sub": {"allow": self.subscribe},
            "subs": -1, "data": -1, "payload": -1,
        })
    }
}

/// The template in an agent's permissions that nats-server replaces with
/// the user's name, its HSM id.
pub const NAME: &str = "{{name()}}";

/// The roles of a keysync deployment, as in `deploy/nats/secure.conf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The orchestrators (active and standby).
    Orchestrator,
    /// Applications: the SDK, `keysync key ...`, the PKCS#11 module.
    Client,
    /// Read-only audit and dead letters.
    Auditor,
    /// The admin CLI (`keysync hsm ...`, `cluster status`, `dlq list`).
    Operator,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [
        Role::Orchestrator,
        Role::Client,
        Role::Auditor,
        Role::Operator,
    ];

    /// Its user name (also its inbox, `_INBOX.<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Role::Orchestrator => "orchestrator",
            Role::Client => "client",
            Role::Auditor => "auditor",
            Role::Operator => "operator",
        }
    }

    /// Its permissions: the same subjects as its block in
    /// `deploy/nats/secure.conf` (a test compares them), which explains each.
    pub fn permissions(self) -> Permissions {
        const AUDIT_READ: [&str; 26] = [
            "$JS.API.INFO",
            "$JS.API.STREAM.INFO.KEYSYNC_AUDIT",
            "$JS.API.CONSUMER.CREATE.KEYSYNC_AUDIT",
            "$JS.API.CONSUMER.CREATE.KEYSYNC_AUDIT.>",
            "$JS.API.CONSUMER.INFO.KEYSYNC_AUDIT.*",
            "$JS.API.CONSUMER.DELETE.KEYSYNC_AUDIT.*",
            "$JS.API.CONSUMER.MSG.NEXT.KEYSYNC_AUDIT.*",
            "$JS.API.DIRECT.GET.KEYSYNC_AUDIT",
            "$JS.API.DIRECT.GET.KEYSYNC_AUDIT.>",
            "$JS.API.STREAM.INFO.KEYSYNC_DLQ",
            "$JS.API.CONSUMER.CREATE.KEYSYNC_DLQ",
            "$JS.API.CONSUMER.CREATE.KEYSYNC_DLQ.>",
            "$JS.API.CONSUMER.INFO.KEYSYNC_DLQ.*",
            "$JS.API.CONSUMER.DELETE.KEYSYNC_DLQ.*",
            "$JS.API.CONSUMER.MSG.NEXT.KEYSYNC_DLQ.*",
            "$JS.API.DIRECT.GET.KEYSYNC_DLQ",
            "$JS.API.DIRECT.GET.KEYSYNC_DLQ.>",
            "$JS.API.STREAM.INFO.KEYSYNC_LIFECYCLE",
            "$JS.API.CONSUMER.CREATE.KEYSYNC_LIFECYCLE",
            "$JS.API.CONSUMER.CREATE.KEYSYNC_LIFECYCLE.>",
            "$JS.API.CONSUMER.INFO.KEYSYNC_LIFECYCLE.*",
            "$JS.API.CONSUMER.DELETE.KEYSYNC_LIFECYCLE.*",
            "$JS.API.CONSUMER.MSG.NEXT.KEYSYNC_LIFECYCLE.*",
            "$JS.API.DIRECT.GET.KEYSYNC_LIFECYCLE",
            "$JS.API.DIRECT.GET.KEYSYNC_LIFECYCLE.>",
            "$JS.FC.KEYSYNC_LIFECYCLE.>", // flow control of a push (ordered) consumer
        ];
        match self {
            Role::Orchestrator => Permissions::of(
                &[
                    "keysync.>",
                    "$JS.API.>",
                    "$JS.ACK.>",
                    "$JS.FC.>",
                    "$KV.KEYSYNC_LEASE.>",
                    "$O.KEYSYNC_SNAPSHOTS.>",
                    "_INBOX.>",
                ],
                &["keysync.>", "_INBOX.orchestrator.>"],
            ),
            Role::Client => Permissions::of(
                &[
                    "keysync.op",
                    "keysync.hsm.*.op",
                    "keysync.orchestrator.status",
                    "$JS.API.INFO",
                    "$JS.API.STREAM.INFO.KEYSYNC_EVENTS",
                    "$JS.API.DIRECT.GET.KEYSYNC_EVENTS",
                    "$JS.API.DIRECT.GET.KEYSYNC_EVENTS.>",
                ],
                &[
                    "_INBOX.client.>",
                    "keysync.metrics.sync",
                    "keysync.evt.key.>",
                    "keysync.evt.hsm.*.applied",
                ],
            ),
            Role::Auditor => Permissions::of(&AUDIT_READ, &["_INBOX.auditor.>"]),
            Role::Operator => {
                let mut publish = vec![
                    "keysync.evt.hsm.*.enrolled",
                    "keysync.evt.hsm.*.revoked",
                    "keysync.evt.hsm.*.token",
                    "keysync.orchestrator.status",
                    "keysync.op",
                    "keysync.hsm.*.op",
                    "$JS.API.DIRECT.GET.KEYSYNC_EVENTS",
                    "$JS.API.DIRECT.GET.KEYSYNC_EVENTS.>",
                    "$JS.API.STREAM.INFO.KEYSYNC_EVENTS",
                ];
                publish.extend(AUDIT_READ);
                Permissions::of(
                    &publish,
                    &["_INBOX.operator.>", "keysync.evt.>", "keysync.metrics.sync"],
                )
            }
        }
    }
}

/// An agent's permissions, templated on its name (`{{name()}}`, its HSM
/// id): `secure.conf`'s `HSM_1` block with `hsm-1` templated.
pub fn agent_template() -> Permissions {
    let n = NAME;
    Permissions {
        publish: vec![
            "keysync.evt.key.*.created".into(),
            "keysync.evt.key.*.deleted".into(),
            format!("keysync.evt.key.*.applied.{n}"),
            format!("keysync.evt.key.*.failed.{n}"),
            format!("keysync.evt.key.*.erased.{n}"),
            format!("keysync.evt.hsm.{n}.joined"),
            format!("keysync.evt.hsm.{n}.capabilities"),
            format!("keysync.evt.hsm.{n}.join"),
            format!("keysync.evt.hsm.{n}.applied"),
            format!("keysync.hsm.{n}.heartbeat"),
            format!("keysync.hsm.{n}.op"),
            "keysync.orchestrator.status".into(),
            "keysync.dlq.agent".into(),
            "$JS.API.INFO".into(),
            "$JS.API.STREAM.INFO.KEYSYNC_EVENTS".into(),
            "$JS.API.DIRECT.GET.KEYSYNC_EVENTS".into(),
            "$JS.API.STREAM.INFO.KEYSYNC_CMD".into(),
            format!("$JS.API.CONSUMER.INFO.KEYSYNC_CMD.agent-{n}"),
            format!("$JS.API.CONSUMER.CREATE.KEYSYNC_CMD.agent-{n}.keysync.cmd.{n}"),
            format!("$JS.API.CONSUMER.MSG.NEXT.KEYSYNC_CMD.agent-{n}"),
            format!("$JS.ACK.KEYSYNC_CMD.agent-{n}.>"),
            "_INBOX.client.>".into(),
            "_INBOX.operator.>".into(),
            "_INBOX.orchestrator.>".into(),
            format!("_INBOX.{n}.>"),
        ],
        subscribe: vec![
            format!("keysync.hsm.{n}.op"),
            // secure.conf allows this only in the agents' queue group
            // (`keysync.op keysync-agents`); nats-server 2.15.1 refuses
            // that queue subscription under a scoped key's template
            // (checked: "Permissions Violation for Subscription to
            // keysync.op using queue keysync-agents"), so the scope grants
            // the subject. An agent outside the group sees the requests
            // of other HSMs' share; it holds the domain key, which opens
            // every key anyway.
            "keysync.op".into(),
            format!("_INBOX.{n}.>"),
        ],
    }
}

/// The role of the agents' scoped signing key in the account JWT.
pub const AGENT_SCOPE_ROLE: &str = "keysync-agent";

/// The `nats` claims of the keysync account: JetStream enabled, no limits,
/// the agents' scoped signing key, and `revocations`.
fn account_claims(agent_signer: &str, revocations: &BTreeMap<String, u64>) -> Value {
    json!({
        "limits": {
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
        },
        "signing_keys": [{
            "kind": "user_scope",
            "key": agent_signer,
            "role": AGENT_SCOPE_ROLE,
            "template": agent_template().to_claims(),
            "description": "mints keysync HSM agents; permissions templated on the user name (the HSM id)",
        }],
        "revocations": revocations,
        "default_permissions": {"pub": {}, "sub": {}},
        "type": "account",
        "version": 2,
    })
}

/// Everything `keysync nats init` makes: the trust chain and the first
/// credentials. Seeds are secrets; JWTs are not.
pub struct Deployment {
    /// The operator's identity (keep offline: it only signs the operator JWT).
    pub operator: KeyPair,
    /// The operator signing key: signs account JWTs (revocations).
    pub operator_signer: KeyPair,
    /// The system account (server monitoring, account updates).
    pub system_account: KeyPair,
    /// The keysync account.
    pub account: KeyPair,
    /// The account's scoped signing key that mints agents.
    pub agent_signer: KeyPair,
    /// The operator JWT.
    pub operator_jwt: String,
    /// The system account's JWT.
    pub system_account_jwt: String,
    /// The keysync account's JWT.
    pub account_jwt: String,
}

impl Deployment {
    /// A new trust chain: operator `name`, accounts `SYS` and `KEYSYNC`.
    pub fn new(name: &str) -> Result<Self, NatsJwtError> {
        let operator = KeyPair::new_operator();
        let operator_signer = KeyPair::new_operator();
        let system_account = KeyPair::new_account();
        let account = KeyPair::new_account();
        let agent_signer = KeyPair::new_account();
        let operator_jwt = encode(
            &operator,
            &operator.public_key(),
            name,
            json!({
                "signing_keys": [operator_signer.public_key()],
                "system_account": system_account.public_key(),
                "type": "operator",
                "version": 2,
            }),
        )?;
        let system_account_jwt = encode(
            &operator_signer,
            &system_account.public_key(),
            "SYS",
            json!({
                "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1,
                           "exports": -1, "wildcards": true, "conn": -1, "leaf": -1},
                "default_permissions": {"pub": {}, "sub": {}},
                "type": "account",
                "version": 2,
            }),
        )?;
        let account_jwt = encode(
            &operator_signer,
            &account.public_key(),
            "KEYSYNC",
            account_claims(&agent_signer.public_key(), &BTreeMap::new()),
        )?;
        Ok(Deployment {
            operator,
            operator_signer,
            system_account,
            account,
            agent_signer,
            operator_jwt,
            system_account_jwt,
            account_jwt,
        })
    }

    /// A role's `.creds` ([`role_creds`]).
    pub fn role_creds(&self, role: Role) -> Result<String, NatsJwtError> {
        role_creds(&self.account, role)
    }

    /// The system account's user `.creds` (pushes account updates).
    pub fn system_creds(&self) -> Result<String, NatsJwtError> {
        let user = KeyPair::new_user();
        let jwt = encode(
            &self.system_account,
            &user.public_key(),
            "sys",
            json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                   "type": "user", "version": 2}),
        )?;
        Ok(creds(&jwt, &user.seed().map_err(nkey_err)?))
    }

    /// The agent signer file ([`AgentSigner`]).
    pub fn agent_signer_file(&self) -> Result<String, NatsJwtError> {
        Ok(AgentSigner {
            account: self.account.public_key(),
            signing_key_seed: self.agent_signer.seed().map_err(nkey_err)?,
        }
        .to_file())
    }

    /// The nats-server config fragment every node `include`s: the operator,
    /// the system account, and a full resolver (account JWTs kept in
    /// `$KEYSYNC_NATS_RESOLVER_DIR`, updates pushed to any node reach every
    /// node) preloaded with both accounts.
    pub fn resolver_conf(&self) -> String {
        format!(
            "# Made by `keysync nats init`: the NATS trust chain of this deployment.\n\
             # Include it from every node's config. JWTs are public; no secret here.\n\
             operator: {op}\n\
             system_account: {sys}\n\
             resolver: {{\n  type: full\n  dir: $KEYSYNC_NATS_RESOLVER_DIR\n  allow_delete: false\n  interval: \"2m\"\n}}\n\
             resolver_preload: {{\n  {sys}: {sys_jwt}\n  {acc}: {acc_jwt}\n}}\n",
            op = self.operator_jwt,
            sys = self.system_account.public_key(),
            sys_jwt = self.system_account_jwt,
            acc = self.account.public_key(),
            acc_jwt = self.account_jwt,
        )
    }
}

/// What mints agents' credentials: the keysync account's public key and
/// its scoped signing key's seed, in a small TOML file (mode 0600).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSigner {
    /// The keysync account (`A...`).
    pub account: String,
    /// The scoped signing key's seed (`SA...`).
    pub signing_key_seed: String,
}

impl AgentSigner {
    fn to_file(&self) -> String {
        format!(
            "# keysync agent credential signer (keysync nats init). Secret: mode 0600.\n\
             account = \"{}\"\nsigning_key_seed = \"{}\"\n",
            self.account, self.signing_key_seed
        )
    }

    /// Reads one from a signer file's text.
    pub fn parse(text: &str) -> Result<Self, NatsJwtError> {
        let s: AgentSigner =
            toml::from_str(text).map_err(|e| NatsJwtError::Signer(e.to_string()))?;
        KeyPair::from_seed(&s.signing_key_seed).map_err(nkey_err)?;
        KeyPair::from_public_key(&s.account).map_err(nkey_err)?;
        Ok(s)
    }

    fn key(&self) -> Result<KeyPair, NatsJwtError> {
        KeyPair::from_seed(&self.signing_key_seed).map_err(nkey_err)
    }

    /// The user key of agent `hsm`: derived from the signing key and the
    /// HSM id (HKDF-SHA-256), so `hsm remove` can revoke it knowing only
    /// the id, and every credential minted for one HSM has one user key.
    pub fn agent_user(&self, hsm: &str) -> Result<KeyPair, NatsJwtError> {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(
            Some(b"keysync-nats-agent-user-v1"),
            self.signing_key_seed.as_bytes(),
        );
        let mut raw = [0u8; 32];
        hk.expand(hsm.as_bytes(), &mut raw)
            .map_err(|e| NatsJwtError::Nkey(e.to_string()))?;
        KeyPair::new_from_raw(KeyPairType::User, raw).map_err(nkey_err)
    }

    /// Agent `hsm`'s `.creds`: a user named `hsm` (so the scope's
    /// `{{name()}}` becomes its id), issued by the scoped key for the
    /// account; it carries no permissions or limits of its own (the
    /// scope's apply).
    pub fn agent_creds(&self, hsm: &str) -> Result<String, NatsJwtError> {
        let user = self.agent_user(hsm)?;
        let jwt = encode(
            &self.key()?,
            &user.public_key(),
            hsm,
            // Nothing but the account: nats-server refuses a scoped
            // user with any permission or limit of its own, even empty
            // ones ("scoped users require no permissions or limits set").
            json!({
                "issuer_account": self.account,
                "type": "user",
                "version": 2,
            }),
        )?;
        Ok(creds(&jwt, &user.seed().map_err(nkey_err)?))
    }
}

/// A role's `.creds`: a fresh user key with the role's permissions, signed
/// by the keysync account's key (`account.nk`). Minting new ones and
/// revoking the old user keys rotates a role's credentials.
pub fn role_creds(account: &KeyPair, role: Role) -> Result<String, NatsJwtError> {
    let user = KeyPair::new_user();
    let mut nats = role.permissions().to_claims();
    nats["type"] = json!("user");
    nats["version"] = json!(2);
    let jwt = encode(account, &user.public_key(), role.name(), nats)?;
    Ok(creds(&jwt, &user.seed().map_err(nkey_err)?))
}

/// The user public key (`U...`) of a `.creds` file's JWT.
pub fn creds_user(text: &str) -> Result<String, NatsJwtError> {
    let jwt =
        jwt_of_creds(text).ok_or_else(|| NatsJwtError::Jwt("no user JWT in the creds".into()))?;
    decode(jwt)?["sub"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| NatsJwtError::Jwt("user JWT without a subject".into()))
}

/// The keysync account JWT `account_jwt` re-issued by the operator signer
/// with `user` revoked as of `at` (Unix seconds): every JWT of that user
/// issued at or before `at` is refused, and its connections are closed.
pub fn revoke(
    account_jwt: &str,
    operator_signer: &KeyPair,
    user: &str,
    at: u64,
) -> Result<String, NatsJwtError> {
    let claims = decode(account_jwt)?;
    let sub = claims["sub"]
        .as_str()
        .ok_or_else(|| NatsJwtError::Jwt("account JWT without a subject".into()))?;
    let name = claims["name"].as_str().unwrap_or("KEYSYNC");
    let mut nats = claims["nats"].clone();
    if !nats["revocations"].is_object() {
        nats["revocations"] = json!({});
    }
    nats["revocations"][user] = json!(at);
    // A later iat than the current JWT's: the resolver keeps the newest.
    let iat = now_secs().max(claims["iat"].as_u64().unwrap_or(0) + 1);
    encode_at(operator_signer, sub, name, nats, iat)
}

/// Reads an nkey seed (as in a `.nk` file, surrounding whitespace ignored).
pub fn seed_key(text: &str) -> Result<KeyPair, NatsJwtError> {
    KeyPair::from_seed(text.trim()).map_err(nkey_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jwt_decodes_to_its_claims_and_a_tampered_one_does_not() {
        let d = Deployment::new("test").expect("deployment");
        let claims = decode(&d.account_jwt).expect("valid");
        assert_eq!(claims["sub"], d.account.public_key());
        assert_eq!(claims["iss"], d.operator_signer.public_key());
        assert_eq!(claims["nats"]["type"], "account");
        assert_eq!(
            claims["nats"]["signing_keys"][0]["key"],
            d.agent_signer.public_key()
        );
        // The jti is the base32 SHA-512/256 of the standard claims.
        assert_eq!(claims["jti"].as_str().map(str::len), Some(52));
        let mut parts: Vec<&str> = d.account_jwt.split('.').collect();
        let other = decode(&d.system_account_jwt).expect("valid");
        let forged = b64(&serde_json::to_vec(&other).expect("json"));
        parts[1] = &forged;
        assert!(decode(&parts.join(".")).is_err());
        assert!(decode("a.b").is_err());
    }

    #[test]
    fn agent_credentials_are_one_user_per_hsm_named_after_it() {
        let d = Deployment::new("test").expect("deployment");
        let signer = AgentSigner::parse(&d.agent_signer_file().expect("file")).expect("parses");
        let a = signer.agent_creds("hsm-1").expect("creds");
        let b = signer.agent_creds("hsm-1").expect("creds");
        let c = signer.agent_creds("hsm-2").expect("creds");
        let user = |t: &str| decode(jwt_of_creds(t).expect("jwt")).expect("valid")["sub"].clone();
        assert_eq!(user(&a), user(&b));
        assert_ne!(user(&a), user(&c));
        assert_eq!(creds_name(&a).as_deref(), Some("hsm-1"));
        let claims = decode(jwt_of_creds(&a).expect("jwt")).expect("valid");
        assert_eq!(claims["nats"]["issuer_account"], d.account.public_key());
        assert_eq!(claims["iss"], d.agent_signer.public_key());
        assert!(AgentSigner::parse("account = \"x\"\nsigning_key_seed = \"y\"\n").is_err());
        assert!(AgentSigner::parse("account = \"x\"\nother = 1\n").is_err());
    }

    #[test]
    fn a_revocation_keeps_the_account_and_adds_the_user() {
        let d = Deployment::new("test").expect("deployment");
        let signer = AgentSigner::parse(&d.agent_signer_file().expect("file")).expect("parses");
        let user = signer.agent_user("hsm-2").expect("user").public_key();
        let next = revoke(&d.account_jwt, &d.operator_signer, &user, 1234).expect("revoked");
        let (before, after) = (
            decode(&d.account_jwt).expect("v"),
            decode(&next).expect("v"),
        );
        assert_eq!(after["nats"]["revocations"][&user], 1234);
        assert_eq!(
            after["nats"]["signing_keys"],
            before["nats"]["signing_keys"]
        );
        assert_eq!(after["sub"], before["sub"]);
        assert!(after["iat"].as_u64() > before["iat"].as_u64());
    }

    /// The roles' permissions are `deploy/nats/secure.conf`'s, so the two
    /// ways of deploying grant the same.
    #[test]
    fn role_permissions_match_secure_conf() {
        let conf = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/nats/secure.conf"
        ))
        .expect("secure.conf");
        let block = |name: &str| -> Permissions {
            let start = conf.find(&format!("  {name} = {{")).expect("block");
            let rest = &conf[start..];
            let end = rest[1..].find("\n  }\n").map(|e| e + 1).expect("block end");
            let text = &rest[..end];
            let (publish, subscribe) = text.split_once("subscribe").expect("subscribe part");
            // `allow = [ "a", "b" ]` on one line holds several.
            let all = |t: &str| -> Vec<String> {
                t.lines()
                    .flat_map(|l| {
                        let l = l.split('#').next().unwrap_or("");
                        l.split('"')
                            .enumerate()
                            .filter(|(i, _)| i % 2 == 1)
                            .map(|(_, s)| s.to_string())
                            .collect::<Vec<_>>()
                    })
                    .collect()
            };
            Permissions {
                publish: all(publish),
                subscribe: all(subscribe),
            }
        };
        let sorted = |mut p: Permissions| {
            p.publish.sort();
            p.subscribe.sort();
            p
        };
        for role in Role::ALL {
            assert_eq!(
                sorted(role.permissions()),
                sorted(block(&role.name().to_uppercase())),
                "{role:?}"
            );
        }
        let mut hsm1 = agent_template();
        for s in hsm1.publish.iter_mut().chain(hsm1.subscribe.iter_mut()) {
            *s = s.replace(NAME, "hsm-1");
        }
        let mut conf_hsm1 = block("HSM_1");
        for s in conf_hsm1.subscribe.iter_mut() {
            if s == "keysync.op keysync-agents" {
                *s = "keysync.op".into();
            }
        }
        assert_eq!(sorted(hsm1), sorted(conf_hsm1));
    }
}
