//! The PKCS#11 operations in safe Rust: sessions, login, objects, key
//! generation, search, attributes, signatures, random bytes. The `ffi`
//! module turns C arguments into these calls' arguments and back.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use cryptoki_sys::*;
use keysync::{CreateKey, Route};
use keysync_schemas::{HsmId, KeyId, KeyInfo, MemberState};

use crate::mechanisms::{self, AgentSign, Param, SignMechanism};
use crate::module::{report, Module};
use crate::objects::{self, Attr, Class, Wanted};
use crate::sessions::{Crypting, Search, Signing};

/// A template: (attribute type, value) pairs.
pub type Template = [(CK_ATTRIBUTE_TYPE, Vec<u8>)];

/// The most data a signature or verification takes (the agents' requests
/// are bounded).
pub const MAX_DATA: usize = 64 * 1024;

/// What an SDK failure is to the application. Every failure is reported
/// on stderr too: a return code says little.
fn sdk_rv(what: &str, e: &keysync::Error, missing: CK_RV) -> CK_RV {
    report(format_args!("{what}: {e}"));
    match e {
        keysync::Error::KeyNotFound { .. }
        | keysync::Error::NotYetReplicated { .. }
        | keysync::Error::NoSuchKey { .. }
        | keysync::Error::KeyDeleted { .. } => missing,
        keysync::Error::Connect { .. }
        | keysync::Error::HsmUnavailable { .. }
        | keysync::Error::OrchestratorUnavailable(_) => CKR_DEVICE_ERROR,
        _ => CKR_FUNCTION_FAILED,
    }
}

/// `CKS_*` and `CKF_*` of a session.
pub struct SessionState {
    /// `CKS_*`.
    pub state: CK_STATE,
    /// `CKF_SERIAL_SESSION`, and `CKF_RW_SESSION` if read/write.
    pub flags: CK_FLAGS,
}

impl Module {
    fn is_logged_in(&self) -> bool {
        self.logged_in.load(Ordering::SeqCst)
    }

    /// Checks a session is open; returns whether it is read/write.
    pub fn check_session(&self, s: CK_SESSION_HANDLE) -> Result<bool, CK_RV> {
        self.sessions().get(s).map(|session| session.rw)
    }

    /// `C_OpenSession` (serial sessions only, as the spec requires).
    pub fn open_session(&self, flags: CK_FLAGS) -> Result<CK_SESSION_HANDLE, CK_RV> {
        if flags & CKF_SERIAL_SESSION == 0 {
            return Err(CKR_SESSION_PARALLEL_NOT_SUPPORTED);
        }
        self.sessions().open(flags & CKF_RW_SESSION != 0)
    }

    /// `C_CloseSession`: its session objects are deleted; closing the last
    /// session logs the user out.
    pub fn close_session(&self, s: CK_SESSION_HANDLE) -> Result<(), CK_RV> {
        {
            let mut sessions = self.sessions();
            sessions.close(s)?;
            if sessions.count() == 0 {
                self.logged_in.store(false, Ordering::SeqCst);
            }
        }
        self.delete_session_keys(Some(s));
        Ok(())
    }

    /// `C_CloseAllSessions` (and `C_Finalize`): every session object is
    /// deleted.
    pub fn close_all_sessions(&self) {
        self.sessions().close_all();
        self.logged_in.store(false, Ordering::SeqCst);
        self.delete_session_keys(None);
    }

    /// Deletes the session objects of one session, or of all, from their
    /// HSMs (a failure is reported; the agent drops session keys at
    /// restart anyway).
    fn delete_session_keys(&self, owner: Option<CK_SESSION_HANDLE>) {
        let keys = self.objects().session_keys(owner);
        if keys.is_empty() {
            return;
        }
        let client = self.client.clone();
        let deletions: Vec<(KeyId, Route)> = keys.iter().map(|(id, k)| (*id, k.route())).collect();
        let results = self.run(async move {
            let deletes = deletions.into_iter().map(|(id, route)| {
                let client = client.clone();
                async move { (id, client.delete_key(id, &route).await) }
            });
            futures::future::join_all(deletes).await
        });
        let mut objects = self.objects();
        for (id, _) in &keys {
            objects.forget(id);
        }
        match results {
            Ok(results) => {
                for (id, r) in results {
                    if let Err(e) = r {
                        report(format_args!("deleting session key {id}: {e}"));
                    }
                }
            }
            Err(_) => report("session keys were not deleted"),
        }
    }

    /// `C_GetSessionInfo`.
    pub fn session_info(&self, s: CK_SESSION_HANDLE) -> Result<SessionState, CK_RV> {
        let rw = self.check_session(s)?;
        let user = self.is_logged_in();
        let state = match (rw, user) {
            (false, false) => CKS_RO_PUBLIC_SESSION,
            (false, true) => CKS_RO_USER_FUNCTIONS,
            (true, false) => CKS_RW_PUBLIC_SESSION,
            (true, true) => CKS_RW_USER_FUNCTIONS,
        };
        let flags = CKF_SERIAL_SESSION | if rw { CKF_RW_SESSION } else { 0 };
        Ok(SessionState { state, flags })
    }

    /// Sessions open, and how many of them read/write.
    pub fn session_counts(&self) -> (usize, usize) {
        let s = self.sessions();
        (s.count(), s.rw_count())
    }

    /// `C_Login`: the user with the configured PIN. There is no security
    /// officer (the cluster is administered with the `keysync` CLI).
    pub fn login(&self, s: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: &[u8]) -> Result<(), CK_RV> {
        self.check_session(s)?;
        match user {
            CKU_USER => {}
            CKU_CONTEXT_SPECIFIC => return Err(CKR_OPERATION_NOT_INITIALIZED),
            _ => return Err(CKR_USER_TYPE_INVALID),
        }
        if self.is_logged_in() {
            return Err(CKR_USER_ALREADY_LOGGED_IN);
        }
        if !constant_time_eq(pin, self.config.user_pin.as_bytes()) {
            return Err(CKR_PIN_INCORRECT);
        }
        self.logged_in.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// `C_Logout`.
    pub fn logout(&self, s: CK_SESSION_HANDLE) -> Result<(), CK_RV> {
        self.check_session(s)?;
        if !self.logged_in.swap(false, Ordering::SeqCst) {
            return Err(CKR_USER_NOT_LOGGED_IN);
        }
        Ok(())
    }

    /// Checks a session may create or destroy an object: logged in, and
    /// read/write for a token object.
    fn check_writer(&self, s: CK_SESSION_HANDLE, token: bool) -> Result<(), CK_RV> {
        if !self.check_session(s)? && token {
            return Err(CKR_SESSION_READ_ONLY);
        }
        if !self.is_logged_in() {
            return Err(CKR_USER_NOT_LOGGED_IN);
        }
        Ok(())
    }

    /// Creates a key: a token key in the cluster, returned once the
    /// configured durability holds; or a session object for session `s`,
    /// on one HSM.
    fn create(
        &self,
        s: CK_SESSION_HANDLE,
        key_type: keysync_schemas::KeyType,
        wanted: Wanted,
    ) -> Result<KeyId, CK_RV> {
        let token = wanted.token != Some(false);
        self.check_writer(s, token)?;
        let durability = if token {
            self.config.durability
        } else {
            keysync_schemas::Durability::None
        };
        let spec = CreateKey {
            label: wanted.label.clone(),
            app_id: wanted.app_id.clone(),
            session: !token,
            durability_timeout: self.config.timeout,
            ..CreateKey::new(key_type).durability(durability)
        };
        let client = self.client.clone();
        let created = self
            .run(async move { client.create_key(spec).await })?
            .map_err(|e| sdk_rv("creating a key", &e, CKR_FUNCTION_FAILED))?;
        let id = created.info.key_id;
        let attributes = created.info.attributes;
        let mut objects = self.objects();
        if token {
            for hsm in created.holders.iter().chain([&created.info.hsm]) {
                objects.learn(id, key_type, &attributes, hsm.clone());
            }
        } else {
            objects.learn_session_key(id, key_type, attributes, created.info.hsm, s);
        }
        Ok(id)
    }

    /// `C_GenerateKeyPair`: returns (public, private) handles.
    pub fn generate_key_pair(
        &self,
        s: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_TYPE,
        public: &Template,
        private: &Template,
    ) -> Result<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE), CK_RV> {
        self.check_session(s)?;
        let key_type = mechanisms::key_pair_type(mechanism)?;
        let mut wanted = Wanted::default();
        objects::check_template(key_type, Class::Public, public, &mut wanted)?;
        objects::check_template(key_type, Class::Private, private, &mut wanted)?;
        if key_type == keysync_schemas::KeyType::P256
            && !public.iter().any(|(t, _)| *t == CKA_EC_PARAMS)
        {
            return Err(CKR_TEMPLATE_INCOMPLETE);
        }
        let id = self.create(s, key_type, wanted)?;
        let mut objects = self.objects();
        Ok((
            objects.handle(id, Class::Public),
            objects.handle(id, Class::Private),
        ))
    }

    /// `C_GenerateKey`.
    pub fn generate_key(
        &self,
        s: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_TYPE,
        template: &Template,
    ) -> Result<CK_OBJECT_HANDLE, CK_RV> {
        self.check_session(s)?;
        let key_type = mechanisms::key_type(mechanism)?;
        let mut wanted = Wanted::default();
        objects::check_template(key_type, Class::Secret, template, &mut wanted)?;
        let id = self.create(s, key_type, wanted)?;
        Ok(self.objects().handle(id, Class::Secret))
    }

    /// Resolves a handle the session may see.
    fn visible(&self, h: CK_OBJECT_HANDLE) -> Result<(KeyId, Class, crate::objects::Key), CK_RV> {
        let (id, class, key) = self.objects().resolve(h)?;
        if class.is_private() && !self.is_logged_in() {
            return Err(CKR_OBJECT_HANDLE_INVALID);
        }
        Ok((id, class, key))
    }

    /// `C_DestroyObject`: deletes the key from every HSM (either half of a
    /// pair destroys the pair: it is one keysync key).
    pub fn destroy_object(&self, s: CK_SESSION_HANDLE, h: CK_OBJECT_HANDLE) -> Result<(), CK_RV> {
        self.check_session(s)?;
        let (id, _, key) = self.visible(h)?;
        self.check_writer(s, key.session.is_none())?;
        let client = self.client.clone();
        let route = key.route();
        self.run(async move { client.delete_key(id, &route).await })?
            .map_err(|e| sdk_rv("deleting a key", &e, CKR_OBJECT_HANDLE_INVALID))?;
        self.objects().forget(&id);
        Ok(())
    }

    /// Every token key in the cluster, from every live member (a key made
    /// with `replicas:N` may not be on all of them yet), with its holders.
    fn list_cluster(&self) -> Result<BTreeMap<KeyId, (KeyInfo, Vec<HsmId>)>, CK_RV> {
        let client = self.client.clone();
        let listed = self.run(async move {
            let status = client.cluster_status().await?;
            let live: Vec<HsmId> = status
                .members
                .into_iter()
                .filter(|m| matches!(m.state, MemberState::InService | MemberState::Syncing))
                .map(|m| m.hsm_id)
                .collect();
            let lists = futures::future::join_all(live.iter().map(|h| client.list_keys(h))).await;
            Ok::<_, keysync::Error>(live.into_iter().zip(lists).collect::<Vec<_>>())
        })?;
        let listed = listed.map_err(|e| sdk_rv("listing the cluster", &e, CKR_DEVICE_ERROR))?;
        let mut keys: BTreeMap<KeyId, (KeyInfo, Vec<HsmId>)> = BTreeMap::new();
        let mut answered = 0;
        for (hsm, list) in listed {
            match list {
                Ok(list) => {
                    answered += 1;
                    for info in list.into_iter().filter(|k| !k.session) {
                        self.client.note_holder(info.key_id, hsm.clone());
                        keys.entry(info.key_id)
                            .or_insert_with(|| (info, Vec::new()))
                            .1
                            .push(hsm.clone());
                    }
                }
                Err(e) => report(format_args!("listing the keys of {hsm}: {e}")),
            }
        }
        if answered == 0 {
            report("no live HSM listed its keys");
            return Err(CKR_DEVICE_ERROR);
        }
        Ok(keys)
    }

    /// `C_FindObjectsInit`: finds every match at once, among the cluster's
    /// token keys and this application's session objects.
    pub fn find_init(&self, s: CK_SESSION_HANDLE, template: &Template) -> Result<(), CK_RV> {
        if self.sessions().get(s)?.search.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        let listed = self.list_cluster()?;
        let logged_in = self.is_logged_in();
        let (candidates, missing) = {
            let mut objects = self.objects();
            for (id, (info, holders)) in &listed {
                for hsm in holders {
                    objects.learn(*id, info.key_type, &info.attributes, hsm.clone());
                }
            }
            let mut candidates: Vec<KeyId> = listed.keys().copied().collect();
            candidates.extend(objects.session_keys(None).into_iter().map(|(id, _)| id));
            let missing: Vec<(KeyId, Route)> = candidates
                .iter()
                .filter_map(|id| {
                    let k = objects.key(id)?;
                    (k.key_type.is_asymmetric() && k.spki.is_none()).then(|| (*id, k.route()))
                })
                .collect();
            (candidates, missing)
        };
        // A search by a public-key value needs the public keys.
        if template.iter().any(|(t, _)| objects::needs_spki(*t)) && !missing.is_empty() {
            let client = self.client.clone();
            let fetched = self.run(async move {
                let fetches = missing.into_iter().map(|(id, route)| {
                    let client = client.clone();
                    async move { (id, client.public_key(id, &route).await) }
                });
                futures::future::join_all(fetches).await
            })?;
            let mut objects = self.objects();
            for (id, spki) in fetched {
                match spki {
                    Ok(spki) => objects.set_spki(&id, spki),
                    Err(e) => report(format_args!("reading the public key of {id}: {e}")),
                }
            }
        }
        let mut found = Vec::new();
        {
            let mut objects = self.objects();
            for id in &candidates {
                let Some(key) = objects.key(id).cloned() else {
                    continue;
                };
                for class in Class::of(key.key_type) {
                    if class.is_private() && !logged_in {
                        continue;
                    }
                    if objects::matches(id, *class, &key, template) {
                        found.push(objects.handle(*id, *class));
                    }
                }
            }
        }
        let mut sessions = self.sessions();
        let session = sessions.get(s)?;
        if session.search.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        session.search = Some(Search { found, returned: 0 });
        Ok(())
    }

    /// `C_FindObjects`: up to `max` more handles.
    pub fn find(&self, s: CK_SESSION_HANDLE, max: usize) -> Result<Vec<CK_OBJECT_HANDLE>, CK_RV> {
        let mut sessions = self.sessions();
        let search = sessions
            .get(s)?
            .search
            .as_mut()
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        let start = search.returned.min(search.found.len());
        let end = start.saturating_add(max).min(search.found.len());
        search.returned = end;
        Ok(search.found[start..end].to_vec())
    }

    /// `C_FindObjectsFinal`.
    pub fn find_final(&self, s: CK_SESSION_HANDLE) -> Result<(), CK_RV> {
        self.sessions()
            .get(s)?
            .search
            .take()
            .map(|_| ())
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)
    }

    /// `C_GetAttributeValue`: each attribute asked for. The public key is
    /// fetched from an HSM the first time a public part is asked for.
    pub fn attributes(
        &self,
        s: CK_SESSION_HANDLE,
        h: CK_OBJECT_HANDLE,
        types: &[CK_ATTRIBUTE_TYPE],
    ) -> Result<Vec<Attr>, CK_RV> {
        self.check_session(s)?;
        let (id, class, mut key) = self.visible(h)?;
        let wants_public = types.iter().any(|t| objects::needs_spki(*t));
        if wants_public && key.key_type.is_asymmetric() && key.spki.is_none() {
            let client = self.client.clone();
            let route = key.route();
            let spki = self
                .run(async move { client.public_key(id, &route).await })?
                .map_err(|e| sdk_rv("reading a public key", &e, CKR_OBJECT_HANDLE_INVALID))?;
            self.objects().set_spki(&id, spki.clone());
            key.spki = Some(spki);
        }
        Ok(types
            .iter()
            .map(|t| objects::attribute(&id, class, &key, *t))
            .collect())
    }

    /// The key an operation uses, checked against the mechanism's key type
    /// and the classes that may do it.
    fn operation_key(
        &self,
        key_type: keysync_schemas::KeyType,
        h: CK_OBJECT_HANDLE,
        classes: &[Class],
    ) -> Result<(KeyId, Route), CK_RV> {
        if !self.is_logged_in() {
            return Err(CKR_USER_NOT_LOGGED_IN);
        }
        let (id, class, key) = self
            .objects()
            .resolve(h)
            .map_err(|_| CKR_KEY_HANDLE_INVALID)?;
        if key.key_type != key_type {
            return Err(CKR_KEY_TYPE_INCONSISTENT);
        }
        if !classes.contains(&class) {
            return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
        }
        Ok((id, key.route()))
    }

    /// `C_SignInit` / `C_VerifyInit`.
    pub fn operation_init(
        &self,
        s: CK_SESSION_HANDLE,
        verify: bool,
        mechanism: CK_MECHANISM_TYPE,
        param: &Param,
        h: CK_OBJECT_HANDLE,
    ) -> Result<(), CK_RV> {
        let active = {
            let mut sessions = self.sessions();
            let session = sessions.get(s)?;
            if verify {
                session.verify.is_some()
            } else {
                session.sign.is_some()
            }
        };
        if active {
            return Err(CKR_OPERATION_ACTIVE);
        }
        let m = SignMechanism::from_ck(mechanism, param)?;
        let classes: &[Class] = if verify {
            &[Class::Public, Class::Private]
        } else {
            &[Class::Private]
        };
        let (key, route) = self.operation_key(m.key_type(), h, classes)?;
        let op = Some(Signing {
            mechanism: m,
            key,
            route,
            data: Vec::new(),
        });
        let mut sessions = self.sessions();
        let session = sessions.get(s)?;
        if verify {
            session.verify = op;
        } else {
            session.sign = op;
        }
        Ok(())
    }

    fn with_operation<T>(
        &self,
        s: CK_SESSION_HANDLE,
        verify: bool,
        f: impl FnOnce(&mut Option<Signing>) -> Result<T, CK_RV>,
    ) -> Result<T, CK_RV> {
        let mut sessions = self.sessions();
        let session = sessions.get(s)?;
        let op = if verify {
            &mut session.verify
        } else {
            &mut session.sign
        };
        if op.is_none() {
            return Err(CKR_OPERATION_NOT_INITIALIZED);
        }
        f(op)
    }

    /// The length of the signature the session's signing makes.
    pub fn signature_len(&self, s: CK_SESSION_HANDLE) -> Result<usize, CK_RV> {
        self.with_operation(s, false, |op| {
            Ok(op.as_ref().map_or(0, |o| o.mechanism.signature_len()))
        })
    }

    /// `C_SignUpdate` / `C_VerifyUpdate`: buffers `data`.
    pub fn operation_update(
        &self,
        s: CK_SESSION_HANDLE,
        verify: bool,
        data: &[u8],
    ) -> Result<(), CK_RV> {
        self.with_operation(s, verify, |op| {
            let fits = op
                .as_ref()
                .is_some_and(|o| o.data.len().saturating_add(data.len()) <= MAX_DATA);
            if !fits {
                *op = None;
                return Err(CKR_DATA_LEN_RANGE);
            }
            if let Some(o) = op.as_mut() {
                o.data.extend_from_slice(data);
            }
            Ok(())
        })
    }

    /// Ends the session's signing or verification, with `more` data last.
    fn take_operation(
        &self,
        s: CK_SESSION_HANDLE,
        verify: bool,
        more: &[u8],
    ) -> Result<Signing, CK_RV> {
        self.with_operation(s, verify, |op| {
            let mut o = op.take().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
            if o.data.len().saturating_add(more.len()) > MAX_DATA {
                return Err(CKR_DATA_LEN_RANGE);
            }
            o.data.extend_from_slice(more);
            Ok(o)
        })
    }

    /// `C_Sign` (with `data`) and `C_SignFinal` (with none): signs what was
    /// given and ends the operation. A digest the mechanism cannot take is
    /// `CKR_DATA_LEN_RANGE`, found before anything is sent.
    pub fn sign(&self, s: CK_SESSION_HANDLE, data: &[u8]) -> Result<Vec<u8>, CK_RV> {
        let op = self.take_operation(s, false, data)?;
        let request = op.mechanism.agent_request(op.data)?;
        let client = self.client.clone();
        let (key, route) = (op.key, op.route);
        let signature = self
            .run(async move {
                match request {
                    AgentSign::Message(data) => client.sign(key, &data, &route).await,
                    AgentSign::Digest(scheme, digest) => {
                        client.sign_digest(key, scheme, &digest, &route).await
                    }
                }
            })?
            .map_err(|e| sdk_rv("signing", &e, CKR_KEY_HANDLE_INVALID))?;
        op.mechanism.from_agent(signature)
    }

    /// `C_Verify` (with `data`) and `C_VerifyFinal` (with none): verifies
    /// here with the key's public key (fetched from an HSM once, then
    /// kept) and ends the operation.
    pub fn verify(&self, s: CK_SESSION_HANDLE, data: &[u8], signature: &[u8]) -> Result<(), CK_RV> {
        let op = self.take_operation(s, true, data)?;
        let spki = self.public_key_of(op.key, &op.route)?;
        op.mechanism.verify(&spki, &op.data, signature)
    }

    /// A key's SPKI DER: kept, or fetched from an HSM holding the key.
    fn public_key_of(&self, id: KeyId, route: &Route) -> Result<Vec<u8>, CK_RV> {
        if let Some(spki) = self.objects().key(&id).and_then(|k| k.spki.clone()) {
            return Ok(spki);
        }
        let client = self.client.clone();
        let route = route.clone();
        let spki = self
            .run(async move { client.public_key(id, &route).await })?
            .map_err(|e| sdk_rv("reading a public key", &e, CKR_KEY_HANDLE_INVALID))?;
        self.objects().set_spki(&id, spki.clone());
        Ok(spki)
    }

    /// `C_EncryptInit` / `C_DecryptInit`: `CKM_AES_GCM` with an AES key.
    pub fn crypt_init(
        &self,
        s: CK_SESSION_HANDLE,
        decrypt: bool,
        mechanism: CK_MECHANISM_TYPE,
        param: &Param,
        h: CK_OBJECT_HANDLE,
    ) -> Result<(), CK_RV> {
        {
            let mut sessions = self.sessions();
            let session = sessions.get(s)?;
            let active = if decrypt {
                session.decrypt.is_some()
            } else {
                session.encrypt.is_some()
            };
            if active {
                return Err(CKR_OPERATION_ACTIVE);
            }
        }
        let params = mechanisms::gcm(mechanism, param)?;
        let (key, route) =
            self.operation_key(keysync_schemas::KeyType::Aes256, h, &[Class::Secret])?;
        let op = Some(Crypting {
            key,
            route,
            params,
            data: Vec::new(),
        });
        let mut sessions = self.sessions();
        let session = sessions.get(s)?;
        if decrypt {
            session.decrypt = op;
        } else {
            session.encrypt = op;
        }
        Ok(())
    }

    fn with_crypt<T>(
        &self,
        s: CK_SESSION_HANDLE,
        decrypt: bool,
        f: impl FnOnce(&mut Option<Crypting>) -> Result<T, CK_RV>,
    ) -> Result<T, CK_RV> {
        let mut sessions = self.sessions();
        let session = sessions.get(s)?;
        let op = if decrypt {
            &mut session.decrypt
        } else {
            &mut session.encrypt
        };
        if op.is_none() {
            return Err(CKR_OPERATION_NOT_INITIALIZED);
        }
        f(op)
    }

    /// The exact output length of ending the session's encryption or
    /// decryption with `more` data last (GCM: ciphertext = plaintext +
    /// tag), known before the HSM is asked, for the two-call protocol. A
    /// ciphertext shorter than its tag is `CKR_ENCRYPTED_DATA_LEN_RANGE`
    /// and ends the operation.
    pub fn crypt_output_len(
        &self,
        s: CK_SESSION_HANDLE,
        decrypt: bool,
        more: usize,
    ) -> Result<usize, CK_RV> {
        self.with_crypt(s, decrypt, |op| {
            let (buffered, tag) = op
                .as_ref()
                .map_or((0, 0), |o| (o.data.len(), o.params.tag_len()));
            let total = buffered.saturating_add(more);
            if !decrypt {
                return Ok(total.saturating_add(tag));
            }
            match total.checked_sub(tag) {
                Some(n) => Ok(n),
                None => {
                    *op = None;
                    Err(CKR_ENCRYPTED_DATA_LEN_RANGE)
                }
            }
        })
    }

    /// `C_EncryptUpdate` / `C_DecryptUpdate`: buffers `data` (and returns
    /// nothing yet: the HSM seals or opens the whole message at the end).
    pub fn crypt_update(
        &self,
        s: CK_SESSION_HANDLE,
        decrypt: bool,
        data: &[u8],
    ) -> Result<(), CK_RV> {
        self.with_crypt(s, decrypt, |op| {
            let fits = op
                .as_ref()
                .is_some_and(|o| o.data.len().saturating_add(data.len()) <= MAX_DATA);
            if !fits {
                *op = None;
                return Err(CKR_DATA_LEN_RANGE);
            }
            if let Some(o) = op.as_mut() {
                o.data.extend_from_slice(data);
            }
            Ok(())
        })
    }

    /// `C_Encrypt`/`C_Decrypt` (with `data`) and `C_EncryptFinal`/
    /// `C_DecryptFinal` (with none): seals or opens on an HSM holding the
    /// key and ends the operation. A failed tag check is
    /// `CKR_ENCRYPTED_DATA_INVALID`.
    pub fn crypt(
        &self,
        s: CK_SESSION_HANDLE,
        decrypt: bool,
        more: &[u8],
    ) -> Result<Vec<u8>, CK_RV> {
        let op = self.with_crypt(s, decrypt, |op| {
            let mut o = op.take().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
            if o.data.len().saturating_add(more.len()) > MAX_DATA {
                return Err(CKR_DATA_LEN_RANGE);
            }
            o.data.extend_from_slice(more);
            Ok(o)
        })?;
        let client = self.client.clone();
        let result = self.run(async move {
            if decrypt {
                client
                    .decrypt_gcm(op.key, op.params, &op.data, &op.route)
                    .await
                    .map(|p| p.expose().to_vec())
            } else {
                client
                    .encrypt_gcm(op.key, op.params, &op.data, &op.route)
                    .await
            }
        })?;
        match result {
            Ok(out) => Ok(out),
            Err(keysync::Error::Operation(e))
                if e.kind == keysync_schemas::OpErrorKind::IntegrityFailed =>
            {
                Err(CKR_ENCRYPTED_DATA_INVALID)
            }
            Err(e) => Err(sdk_rv(
                if decrypt { "decrypting" } else { "encrypting" },
                &e,
                CKR_KEY_HANDLE_INVALID,
            )),
        }
    }

    /// `C_GenerateRandom`.
    pub fn random(&self, s: CK_SESSION_HANDLE, out: &mut [u8]) -> Result<(), CK_RV> {
        self.check_session(s)?;
        getrandom::fill(out).map_err(|_| CKR_FUNCTION_FAILED)
    }
}

/// Compares without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
