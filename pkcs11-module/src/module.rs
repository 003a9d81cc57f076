//! The module's life: `C_Initialize` reads the configuration, starts the
//! module's own tokio runtime and connects to the cluster; `C_Finalize`
//! closes the connection and joins the runtime. Every PKCS#11 call runs its
//! I/O on that runtime and waits for it on the caller's thread, so a host
//! never needs a runtime of its own (and may have one: the wait is not
//! tokio's, so it does not panic inside a host's runtime).

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use cryptoki_sys::*;
use keysync::{Client, ClientOptions};

use crate::config::Config;
use crate::objects::Objects;
use crate::sessions::Sessions;

/// Prints a message on stderr (the only channel a PKCS#11 module has to
/// the person running the application).
pub fn report(message: impl std::fmt::Display) {
    eprintln!("keysync-pkcs11: {message}");
}

/// The initialised module.
pub struct Module {
    /// Its configuration.
    pub config: Config,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    /// The cluster.
    pub client: Client,
    /// The process that initialised it (a forked child must initialise
    /// again).
    pid: u32,
    /// Whether the user is logged in (for all sessions).
    pub logged_in: AtomicBool,
    sessions: Mutex<Sessions>,
    objects: Mutex<Objects>,
}

/// The module, between `C_Initialize` and `C_Finalize`.
static MODULE: RwLock<Option<Arc<Module>>> = RwLock::new(None);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock was already reported as
    // CKR_GENERAL_ERROR; the state it guards is still consistent (every
    // change is one insert or remove).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `C_Initialize`.
pub fn initialize() -> Result<(), CK_RV> {
    let mut slot = MODULE.write().unwrap_or_else(|e| e.into_inner());
    if let Some(m) = slot.as_ref() {
        if m.pid == std::process::id() {
            return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
        }
        // A forked child: the parent's runtime threads do not exist here,
        // so its state cannot be shut down; leave it be.
        if let Some(old) = slot.take() {
            std::mem::forget(old);
        }
    }
    let config = Config::from_env().map_err(|e| {
        report(format_args!("C_Initialize: {e}"));
        CKR_GENERAL_ERROR
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("keysync-pkcs11")
        .enable_all()
        .build()
        .map_err(|e| {
            report(format_args!("C_Initialize: cannot start a runtime: {e}"));
            CKR_FUNCTION_FAILED
        })?;
    let handle = runtime.handle().clone();
    let url = config.nats.join(",");
    let options = ClientOptions {
        subjects: config.subjects.clone(),
        name: "keysync-pkcs11".into(),
        request_timeout: config.timeout,
        auth: config.auth.clone(),
        ..Default::default()
    };
    let connected = block_on(&handle, async move {
        tokio::time::timeout(options.request_timeout, Client::connect_with(&url, options)).await
    });
    let client = match connected {
        Ok(Ok(Ok(c))) => c,
        Ok(Ok(Err(e))) => {
            report(format_args!("C_Initialize: {e}"));
            shut_down(runtime);
            return Err(CKR_FUNCTION_FAILED);
        }
        _ => {
            report("C_Initialize: timed out connecting to NATS");
            shut_down(runtime);
            return Err(CKR_FUNCTION_FAILED);
        }
    };
    *slot = Some(Arc::new(Module {
        config,
        runtime: Mutex::new(Some(runtime)),
        handle,
        client,
        pid: std::process::id(),
        logged_in: AtomicBool::new(false),
        sessions: Mutex::new(Sessions::default()),
        objects: Mutex::new(Objects::default()),
    }));
    Ok(())
}

/// `C_Finalize`: closes every session, the connection and the runtime.
pub fn finalize() -> Result<(), CK_RV> {
    let module = {
        let mut slot = MODULE.write().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some(m) if m.pid == std::process::id() => slot.take(),
            _ => None,
        }
    }
    .ok_or(CKR_CRYPTOKI_NOT_INITIALIZED)?;
    // Closes every session and deletes the session objects.
    module.close_all_sessions();
    let runtime = lock(&module.runtime).take();
    // The client's watchers stop when its last clone goes; calls still in
    // flight on other threads hold clones and end when the runtime stops.
    drop(module);
    if let Some(rt) = runtime {
        shut_down(rt);
    }
    Ok(())
}

/// Stops a runtime and joins its threads, from a thread of its own (a
/// runtime cannot be dropped inside another's context).
fn shut_down(runtime: tokio::runtime::Runtime) {
    let stopper = std::thread::spawn(move || runtime.shutdown_timeout(Duration::from_secs(5)));
    let _ = stopper.join();
}

/// The module, or `CKR_CRYPTOKI_NOT_INITIALIZED`.
pub fn get() -> Result<Arc<Module>, CK_RV> {
    let slot = MODULE.read().unwrap_or_else(|e| e.into_inner());
    match slot.as_ref() {
        Some(m) if m.pid == std::process::id() => Ok(m.clone()),
        _ => Err(CKR_CRYPTOKI_NOT_INITIALIZED),
    }
}

/// Runs `fut` on the runtime and waits for it on this thread.
fn block_on<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T, CK_RV> {
    futures::executor::block_on(handle.spawn(fut)).map_err(|e| {
        report(format_args!("an operation stopped: {e}"));
        CKR_GENERAL_ERROR
    })
}

impl Module {
    /// Runs `fut` on the module's runtime and waits for it.
    pub fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, CK_RV> {
        block_on(&self.handle, fut)
    }

    /// The sessions.
    pub fn sessions(&self) -> MutexGuard<'_, Sessions> {
        lock(&self.sessions)
    }

    /// The objects.
    pub fn objects(&self) -> MutexGuard<'_, Objects> {
        lock(&self.objects)
    }
}
