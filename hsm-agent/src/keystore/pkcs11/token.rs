//! One PKCS#11 token: the module loaded once per process, the token found
//! by its label, the user logged in with a PIN from a file, and a pool of
//! sessions.
//!
//! **Every call blocks** (a PKCS#11 call waits on the device): async
//! callers run them with `tokio::task::spawn_blocking`. A [`Token`] is
//! `Send + Sync`; a cryptoki `Session` moves between threads but must not be
//! shared, so each call takes a session out of the pool for its duration.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use keysync_schemas::KeyId;
use keysync_security::secret_file;

use super::error::{map, rv_of, Pkcs11Error};
use super::keys::KeyObject;
use super::probe::Capabilities;

/// Idle sessions kept for reuse; more are opened when calls overlap and
/// closed when they come back to a full pool.
const MAX_IDLE_SESSIONS: usize = 8;

/// Modules loaded in this process, by canonical path. A module is loaded
/// and `C_Initialize`d once and stays so for the life of the process: two
/// tokens of one module share its library state, and finalizing it under
/// one of them would break the other. (SoftHSM reads its token directory
/// at `C_Initialize`: tokens created after that are not seen until the
/// process restarts.)
fn modules() -> &'static Mutex<HashMap<PathBuf, Loaded>> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Loaded>>> = OnceLock::new();
    MODULES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A loaded module, and the lock its calls take if it cannot take them at
/// once.
#[derive(Clone)]
struct Loaded {
    ctx: Pkcs11,
    serial: Option<Arc<Mutex<()>>>,
}

/// Whether a module must be called one call at a time. SoftHSM 2.6.1 must:
/// with 64 key creations in flight on one token, about one
/// `C_GenerateKeyPair` in 200 failed with `CKR_GENERAL_ERROR`, and two
/// threads provisioning one token made `C_UnwrapKey` fail the same way;
/// serialized, none did, at the same throughput (SoftHSM takes the calls
/// one by one inside anyway). Other modules get parallel sessions.
fn needs_serial_calls(ctx: &Pkcs11) -> bool {
    ctx.get_library_info()
        .is_ok_and(|i| i.manufacturer_id().contains("SoftHSM"))
}

/// Loads and initializes (with OS locking) the module at `path`, or
/// returns the one already loaded.
fn load_module(path: &Path) -> Result<Loaded, Pkcs11Error> {
    let shown = path.display().to_string();
    let not_a_module = |detail: String| Pkcs11Error::NotAModule {
        path: shown.clone(),
        detail,
    };
    let canonical = path
        .canonicalize()
        .map_err(|e| not_a_module(e.to_string()))?;
    if !canonical.is_file() {
        return Err(not_a_module("not a file".into()));
    }
    let mut loaded = modules()
        .lock()
        .map_err(|_| not_a_module("module registry poisoned".into()))?;
    if let Some(l) = loaded.get(&canonical) {
        return Ok(l.clone());
    }
    let ctx = Pkcs11::new(&canonical).map_err(|e| {
        not_a_module(match e {
            CkError::LibraryLoading(e) => format!("cannot load it: {e}"),
            CkError::MissingSymbol(s) => format!("it has no {s}"),
            other => other.to_string(),
        })
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        // Initialized by another path to the same library: fine.
        Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(Pkcs11Error::Initialize {
                path: shown,
                detail: e.to_string(),
            })
        }
    }
    let serial = needs_serial_calls(&ctx).then(|| Arc::new(Mutex::new(())));
    let l = Loaded { ctx, serial };
    loaded.insert(canonical, l.clone());
    Ok(l)
}

/// Reads the user PIN from a file no one else may read (mode 0600), without
/// its trailing newline. The text is zeroized when dropped.
pub fn read_pin_file(path: &Path) -> Result<AuthPin, Pkcs11Error> {
    let text = secret_file::read(path).map_err(|e| Pkcs11Error::PinFile(e.to_string()))?;
    let pin = text.trim_end_matches(['\n', '\r']);
    if pin.is_empty() {
        return Err(Pkcs11Error::PinFile(format!("{} is empty", path.display())));
    }
    Ok(AuthPin::from(pin))
}

/// The slot holding the token labelled `label`: exactly one must.
///
/// Reading the other tokens' info can fail for a moment: SoftHSM's file
/// store answers `CKR_GENERAL_ERROR` for a token whose files another
/// process (the agent of that token, starting beside this one) is writing.
/// So a failed `C_GetTokenInfo` is retried a few times, briefly, before it
/// is reported; anything else is reported at once.
fn find_slot(ctx: &Pkcs11, label: &str) -> Result<Slot, Pkcs11Error> {
    use backon::{BlockingRetryable as _, ExponentialBuilder};
    let backoff = ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(20))
        .with_max_delay(std::time::Duration::from_millis(500))
        .with_max_times(5);
    (|| find_slot_once(ctx, label))
        .retry(backoff)
        .sleep(std::thread::sleep)
        .when(|e| {
            matches!(
                e,
                Pkcs11Error::Token {
                    op: "C_GetTokenInfo",
                    ..
                } | Pkcs11Error::Unavailable {
                    op: "C_GetTokenInfo",
                    ..
                }
            )
        })
        .call()
}

fn find_slot_once(ctx: &Pkcs11, label: &str) -> Result<Slot, Pkcs11Error> {
    let slots = ctx.get_slots_with_token().map_err(map("C_GetSlotList"))?;
    let mut found = Vec::new();
    let mut present = Vec::new();
    for slot in slots {
        let info = match ctx.get_token_info(slot) {
            Ok(info) => info,
            // A token removed between the list and this call.
            Err(e) if matches!(rv_of(&e), Some(RvError::TokenNotPresent)) => continue,
            Err(e) => return Err(map("C_GetTokenInfo")(e)),
        };
        let l = info.label().trim_end();
        if l == label {
            found.push(slot);
        }
        if info.token_initialized() {
            present.push(format!("{l:?}"));
        }
    }
    match found.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(Pkcs11Error::TokenNotFound {
            label: label.to_string(),
            present: if present.is_empty() {
                "none".into()
            } else {
                present.join(", ")
            },
        }),
        many => Err(Pkcs11Error::AmbiguousLabel {
            label: label.to_string(),
            count: many.len(),
        }),
    }
}

/// One token, logged in, with a pool of sessions.
pub struct Token {
    // Sessions first: they close before anything else is dropped.
    pool: Mutex<Vec<Session>>,
    /// The session that owns the session keys (session objects die with
    /// the session that made them); opened on first use.
    session_keys: Mutex<Option<Session>>,
    /// The module's call lock, if it takes calls one at a time
    /// ([`needs_serial_calls`]).
    serial: Option<Arc<Mutex<()>>>,
    /// Handles of keys found by id, and of the domain key. A find scans
    /// the token (SoftHSM's file store: every object, each call), so a
    /// handle is found once and kept until it can have gone stale: a fresh
    /// login, a session reset, the key's deletion, or the token answering
    /// that it no longer knows the handle (then every call finds again).
    pub(crate) handles: Mutex<HashMap<KeyId, KeyObject>>,
    pub(crate) domain_handle: Mutex<Option<ObjectHandle>>,
    ctx: Pkcs11,
    module: PathBuf,
    label: String,
    slot: Mutex<Slot>,
    pin: AuthPin,
    caps: OnceLock<Capabilities>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("module", &self.module)
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// Loads the module at `module` (once per process), finds the one token
    /// labelled `label` (slot ids change between restarts; labels do not)
    /// and logs in as the user with the PIN in `pin_file`. Blocks.
    pub fn open(module: &Path, label: &str, pin_file: &Path) -> Result<Token, Pkcs11Error> {
        let pin = read_pin_file(pin_file)?;
        let Loaded { ctx, serial } = load_module(module)?;
        let slot = find_slot(&ctx, label)?;
        let token = Token {
            pool: Mutex::new(Vec::new()),
            session_keys: Mutex::new(None),
            serial,
            handles: Mutex::new(HashMap::new()),
            domain_handle: Mutex::new(None),
            ctx,
            module: module.to_path_buf(),
            label: label.to_string(),
            slot: Mutex::new(slot),
            pin,
            caps: OnceLock::new(),
        };
        // Log in now, so a wrong PIN or a missing token fails the open.
        let session = token.open_session()?;
        token.give_back(session);
        Ok(token)
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The module path it was opened with.
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// What this token can generate, wrap and unwrap per key type, probed
    /// on throw-away session objects the first time it is asked (which
    /// takes a moment: it generates one key of each type, RSA included).
    pub fn capabilities(&self) -> Result<&Capabilities, Pkcs11Error> {
        if let Some(c) = self.caps.get() {
            return Ok(c);
        }
        let probed = super::probe::probe(self)?;
        Ok(self.caps.get_or_init(|| probed))
    }

    /// A new read-write session, logged in. Re-finds the slot by label if
    /// the token moved (it was re-inserted, the slot list changed).
    fn open_session(&self) -> Result<Session, Pkcs11Error> {
        let slot = *self.slot.lock().map_err(|_| poisoned())?;
        let session = match self.ctx.open_rw_session(slot) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    rv_of(&e),
                    Some(RvError::SlotIdInvalid | RvError::TokenNotPresent)
                ) =>
            {
                let slot = find_slot(&self.ctx, &self.label)?;
                *self.slot.lock().map_err(|_| poisoned())? = slot;
                self.ctx
                    .open_rw_session(slot)
                    .map_err(map("C_OpenSession"))?
            }
            Err(e) => return Err(map("C_OpenSession")(e)),
        };
        self.login(&session)?;
        Ok(session)
    }

    /// Logs the user in on `session` (login state is per token and
    /// application: "already logged in" is success).
    fn login(&self, session: &Session) -> Result<(), Pkcs11Error> {
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) => {
                // Logged out before: handles of private objects may have
                // changed.
                self.forget_handles();
                Ok(())
            }
            Err(e) => match rv_of(&e) {
                Some(RvError::UserAlreadyLoggedIn) => Ok(()),
                Some(RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange) => {
                    Err(Pkcs11Error::WrongPin {
                        label: self.label.clone(),
                    })
                }
                Some(RvError::PinLocked) => Err(Pkcs11Error::PinLocked {
                    label: self.label.clone(),
                }),
                _ => Err(map("C_Login")(e)),
            },
        }
    }

    fn take(&self) -> Result<Session, Pkcs11Error> {
        let pooled = self.pool.lock().map_err(|_| poisoned())?.pop();
        match pooled {
            Some(s) => Ok(s),
            None => self.open_session(),
        }
    }

    fn give_back(&self, session: Session) {
        if let Ok(mut pool) = self.pool.lock() {
            if pool.len() < MAX_IDLE_SESSIONS {
                pool.push(session);
            }
        }
    }

    /// Runs `f` on a pooled, logged-in session. A session the token
    /// invalidated is dropped, not pooled again; if `f` failed because the
    /// session was invalid or no longer logged in (nothing was done), it
    /// runs once more on a fresh one. Blocks.
    pub fn with_session<T>(
        &self,
        mut f: impl FnMut(&Session) -> Result<T, Pkcs11Error>,
    ) -> Result<T, Pkcs11Error> {
        let _one_at_a_time = self.one_at_a_time()?;
        let mut retried = false;
        loop {
            let session = self.take()?;
            let result = f(&session);
            match &result {
                Err(e) if e.stale_handle() && !retried => {
                    retried = true;
                    self.forget_handles();
                    self.give_back(session);
                    continue;
                }
                Err(e) if e.not_logged_in() && !retried => {
                    retried = true;
                    self.login(&session)?;
                    self.give_back(session);
                    continue;
                }
                Err(e) if e.session_lost() => {
                    drop(session);
                    if !retried
                        && matches!(
                            e,
                            Pkcs11Error::Unavailable {
                                rv: RvError::SessionHandleInvalid | RvError::SessionClosed,
                                ..
                            }
                        )
                    {
                        retried = true;
                        continue;
                    }
                }
                _ => self.give_back(session),
            }
            return result;
        }
    }

    /// Runs `f` on the dedicated session that owns the session keys,
    /// opening it first if needed. If the token dropped it, the session
    /// keys are gone with it and a fresh one is opened. Blocks.
    pub(crate) fn with_session_key_session<T>(
        &self,
        f: impl FnOnce(&Session) -> Result<T, Pkcs11Error>,
    ) -> Result<T, Pkcs11Error> {
        let mut slot = self.session_keys.lock().map_err(|_| poisoned())?;
        let _one_at_a_time = self.one_at_a_time()?;
        let session = match slot.take() {
            Some(s) => s,
            None => self.open_session()?,
        };
        let result = f(&session);
        if !matches!(&result, Err(e) if e.session_lost()) {
            *slot = Some(session);
        }
        result
    }

    /// Forgets every cached handle (the next calls find them again).
    pub(crate) fn forget_handles(&self) {
        if let Ok(mut h) = self.handles.lock() {
            h.clear();
        }
        if let Ok(mut d) = self.domain_handle.lock() {
            *d = None;
        }
    }

    /// The module's call lock, held for one call, if it needs one.
    fn one_at_a_time(&self) -> Result<Option<std::sync::MutexGuard<'_, ()>>, Pkcs11Error> {
        match &self.serial {
            Some(l) => Ok(Some(l.lock().map_err(|_| poisoned())?)),
            None => Ok(None),
        }
    }

    /// Closes every pooled session (the token logs the user out when its
    /// last session closes); the next call opens and logs in afresh. For
    /// recovery after the token went away, and for tests of re-login.
    pub fn reset_sessions(&self) {
        self.forget_handles();
        if let Ok(mut pool) = self.pool.lock() {
            pool.clear();
        }
    }
}

fn poisoned() -> Pkcs11Error {
    Pkcs11Error::Library {
        op: "lock",
        detail: "a token lock was poisoned".into(),
    }
}
