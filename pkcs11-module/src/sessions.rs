//! Sessions: what each one has under way (a search, a signature, a
//! verification). Login is the application's, shared by all its sessions.

use std::collections::HashMap;

use cryptoki_sys::*;
use keysync_schemas::KeyId;

use crate::mechanisms::SignMechanism;

/// A search under way: the handles it found, and how many were returned.
#[derive(Debug, Default)]
pub struct Search {
    /// Every match, found at `C_FindObjectsInit`.
    pub found: Vec<CK_OBJECT_HANDLE>,
    /// How many `C_FindObjects` returned so far.
    pub returned: usize,
}

/// A signature or verification under way (the data is buffered: keysync
/// signs the whole message).
#[derive(Debug)]
pub struct Signing {
    /// The mechanism.
    pub mechanism: SignMechanism,
    /// The key.
    pub key: KeyId,
    /// Where the key's operations go.
    pub route: keysync::Route,
    /// Data given so far by `C_*Update`.
    pub data: Vec<u8>,
}

/// An AES-GCM encryption or decryption under way (the data is buffered:
/// GCM authenticates the whole message, and the HSM does it in one call).
#[derive(Debug)]
pub struct Crypting {
    /// The key.
    pub key: KeyId,
    /// Where the key's operations go.
    pub route: keysync::Route,
    /// The application's IV, AAD and tag length.
    pub params: keysync_schemas::GcmParams,
    /// Data given so far by `C_*Update`.
    pub data: Vec<u8>,
}

/// One session.
#[derive(Debug, Default)]
pub struct Session {
    /// Opened read/write.
    pub rw: bool,
    /// A search under way.
    pub search: Option<Search>,
    /// A signature under way.
    pub sign: Option<Signing>,
    /// A verification under way.
    pub verify: Option<Signing>,
    /// An encryption under way.
    pub encrypt: Option<Crypting>,
    /// A decryption under way.
    pub decrypt: Option<Crypting>,
}

/// Open sessions by handle.
#[derive(Debug, Default)]
pub struct Sessions {
    open: HashMap<CK_SESSION_HANDLE, Session>,
    last: CK_SESSION_HANDLE,
}

/// Most sessions open at once (`CKR_SESSION_COUNT` beyond).
pub const MAX_SESSIONS: usize = 4096;

impl Sessions {
    /// Opens a session.
    pub fn open(&mut self, rw: bool) -> Result<CK_SESSION_HANDLE, CK_RV> {
        if self.open.len() >= MAX_SESSIONS {
            return Err(CKR_SESSION_COUNT);
        }
        self.last += 1;
        self.open.insert(
            self.last,
            Session {
                rw,
                ..Default::default()
            },
        );
        Ok(self.last)
    }

    /// Closes a session; `CKR_SESSION_HANDLE_INVALID` if it is not open.
    pub fn close(&mut self, h: CK_SESSION_HANDLE) -> Result<(), CK_RV> {
        self.open
            .remove(&h)
            .map(|_| ())
            .ok_or(CKR_SESSION_HANDLE_INVALID)
    }

    /// Closes every session.
    pub fn close_all(&mut self) {
        self.open.clear();
    }

    /// How many are open.
    pub fn count(&self) -> usize {
        self.open.len()
    }

    /// How many are open read/write.
    pub fn rw_count(&self) -> usize {
        self.open.values().filter(|s| s.rw).count()
    }

    /// An open session.
    pub fn get(&mut self, h: CK_SESSION_HANDLE) -> Result<&mut Session, CK_RV> {
        self.open.get_mut(&h).ok_or(CKR_SESSION_HANDLE_INVALID)
    }
}
