//! Errors of the PKCS#11 token layer, and how they map to the agent's
//! operation error kinds.

use cryptoki::error::{Error as CkError, RvError};
use keysync_schemas::{KeyId, OpErrorKind};

/// What a token operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Pkcs11Error {
    /// The module path is not a loadable PKCS#11 library (missing file, not
    /// a shared object, or no `C_GetFunctionList`).
    #[error("{path} is not a PKCS#11 module: {detail}")]
    NotAModule {
        /// The path given.
        path: String,
        /// Why.
        detail: String,
    },
    /// The module loaded but `C_Initialize` failed.
    #[error("PKCS#11 module {path} failed to initialize: {detail}")]
    Initialize {
        /// The module.
        path: String,
        /// Why.
        detail: String,
    },
    /// No token carries the label.
    #[error("no PKCS#11 token is labelled {label:?} (labels present: {present})")]
    TokenNotFound {
        /// The label asked for.
        label: String,
        /// The labels seen, for the message.
        present: String,
    },
    /// More than one token carries the label: refusing to guess.
    #[error("{count} PKCS#11 tokens are labelled {label:?}; a label must name one token")]
    AmbiguousLabel {
        /// The label.
        label: String,
        /// How many tokens carry it.
        count: usize,
    },
    /// The token refused the PIN.
    #[error("wrong PIN for PKCS#11 token {label:?}")]
    WrongPin {
        /// The token.
        label: String,
    },
    /// The token's user PIN is locked.
    #[error("the user PIN of PKCS#11 token {label:?} is locked")]
    PinLocked {
        /// The token.
        label: String,
    },
    /// The PIN file could not be used.
    #[error("PIN file: {0}")]
    PinFile(String),
    /// The token went away or is busy (removed, not present, sessions
    /// invalidated, out of sessions): transient, retry once it is back.
    /// Never a reason to think a key is gone.
    #[error("PKCS#11 token unavailable during {op} ({rv:?}); retry when it is back")]
    Unavailable {
        /// The operation.
        op: &'static str,
        /// What the token said.
        rv: RvError,
    },
    /// An unwrap or an AES-GCM decryption failed its integrity check: a
    /// tampered blob or a blob under another key.
    #[error("unwrap or decryption failed its integrity check (wrong key or tampered data)")]
    Integrity,
    /// The token cannot do this (missing mechanism, unwrappable type...).
    #[error("{what} is not supported by this token: {why}")]
    Unsupported {
        /// What was asked.
        what: String,
        /// Why not.
        why: String,
    },
    /// No key with this id in the token.
    #[error("key {0} is not in the token")]
    NotFound(KeyId),
    /// A key with this id is in the token already.
    #[error("key {0} is already in the token")]
    AlreadyExists(KeyId),
    /// Unwrapped material is not the key it was announced as.
    #[error("the unwrapped key does not match its announced {0}")]
    Mismatch(&'static str),
    /// Malformed input (an SPKI of the wrong type, a missing public key).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The token holds no keysync domain key.
    #[error("PKCS#11 token {label:?} holds no keysync domain key: put it there first (keysync hsm provision-domain-key)")]
    DomainKeyMissing {
        /// The token.
        label: String,
    },
    /// The token's domain key is not the one expected.
    #[error("PKCS#11 token {label:?} holds domain key {found}, not this cluster's {expected}")]
    WrongDomain {
        /// The token.
        label: String,
        /// What was expected (domain id or check value, hex).
        expected: String,
        /// What the token holds (hex).
        found: String,
    },
    /// The token's domain key and its record disagree, or are not unique.
    #[error("PKCS#11 token {label:?}: {detail}")]
    DomainRecord {
        /// The token.
        label: String,
        /// What is wrong.
        detail: String,
    },
    /// Any other PKCS#11 error.
    #[error("PKCS#11 {op} failed: {rv:?}")]
    Token {
        /// The operation.
        op: &'static str,
        /// What the token said.
        rv: RvError,
    },
    /// A library-level error (conversion, a function the module lacks).
    #[error("PKCS#11 {op}: {detail}")]
    Library {
        /// The operation.
        op: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// The token returned an object that is not what keysync made.
    #[error("unexpected token object: {0}")]
    BadObject(String),
}

impl Pkcs11Error {
    /// The operation error kind a client sees.
    pub fn kind(&self) -> OpErrorKind {
        match self {
            Pkcs11Error::Integrity | Pkcs11Error::Mismatch(_) => OpErrorKind::IntegrityFailed,
            Pkcs11Error::Unsupported { .. } => OpErrorKind::Unsupported,
            Pkcs11Error::Unavailable { .. } => OpErrorKind::Unavailable,
            Pkcs11Error::NotFound(_) => OpErrorKind::KeyNotFound,
            Pkcs11Error::AlreadyExists(_) => OpErrorKind::AlreadyExists,
            Pkcs11Error::Invalid(_) => OpErrorKind::BadRequest,
            _ => OpErrorKind::Internal,
        }
    }

    /// Whether retrying later may succeed (the token went away or is busy).
    pub fn is_transient(&self) -> bool {
        matches!(self, Pkcs11Error::Unavailable { .. })
    }

    /// The session the error came on is dead: do not pool it again.
    pub(crate) fn session_lost(&self) -> bool {
        matches!(
            self,
            Pkcs11Error::Unavailable {
                rv: RvError::SessionHandleInvalid
                    | RvError::SessionClosed
                    | RvError::DeviceRemoved
                    | RvError::TokenNotPresent
                    | RvError::DeviceError
                    | RvError::CryptokiNotInitialized,
                ..
            }
        )
    }

    /// The session is not logged in (the token logged out, e.g. after all
    /// sessions closed): log in again and retry.
    pub(crate) fn not_logged_in(&self) -> bool {
        matches!(
            self,
            Pkcs11Error::Unavailable {
                rv: RvError::UserNotLoggedIn,
                ..
            }
        )
    }

    /// An object handle the token no longer knows (a cached handle went
    /// stale): find the objects again and retry.
    pub(crate) fn stale_handle(&self) -> bool {
        matches!(
            self,
            Pkcs11Error::Token {
                rv: RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid,
                ..
            } | Pkcs11Error::Unavailable {
                rv: RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid,
                ..
            }
        )
    }
}

/// Whether a return value means the token (or our session with it) went
/// away or ran out of room for sessions: transient.
fn transient(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::SessionCount
            | RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::HostMemory
            | RvError::SlotIdInvalid
            | RvError::CryptokiNotInitialized
            | RvError::UserNotLoggedIn
            | RvError::FunctionCanceled
            | RvError::CantLock
    )
}

/// Whether a return value means the token lacks a mechanism, a curve or
/// the ability to wrap a key.
fn unsupported(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::MechanismInvalid
            | RvError::MechanismParamInvalid
            | RvError::FunctionNotSupported
            | RvError::CurveNotSupported
            | RvError::KeyNotWrappable
            | RvError::KeyUnextractable
            | RvError::DomainParamsInvalid
    )
}

/// The return value of a cryptoki error, if it came from the token.
pub(crate) fn rv_of(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// Maps a cryptoki error of operation `op` to a token-layer error: a token
/// that went away is `Unavailable`, a missing mechanism `Unsupported`,
/// anything else a plain token error. Integrity failures depend on the
/// operation: see [`integrity`].
pub(crate) fn map(op: &'static str) -> impl Fn(CkError) -> Pkcs11Error {
    move |e| match e {
        CkError::Pkcs11(rv, _) if transient(rv) => Pkcs11Error::Unavailable { op, rv },
        CkError::Pkcs11(rv, _) if unsupported(rv) => Pkcs11Error::Unsupported {
            what: op.to_string(),
            why: format!("{rv:?}"),
        },
        CkError::Pkcs11(rv, _) => Pkcs11Error::Token { op, rv },
        CkError::NullFunctionPointer | CkError::NotSupported => Pkcs11Error::Unsupported {
            what: op.to_string(),
            why: "the module does not implement it".into(),
        },
        other => Pkcs11Error::Library {
            op,
            detail: other.to_string(),
        },
    }
}

/// Like [`map`], for an unwrap or a decryption: the token's ways of saying
/// the data is not authentic under this key become `Integrity`. SoftHSM
/// 2.6.1 answers a bad KWP blob with `CKR_GENERAL_ERROR` or
/// `CKR_FUNCTION_FAILED`, so those count too; callers rule out "the token
/// cannot unwrap this type at all" beforehand with the capability probe.
pub(crate) fn integrity(op: &'static str) -> impl Fn(CkError) -> Pkcs11Error {
    move |e| match e {
        CkError::Pkcs11(
            RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::GeneralError
            | RvError::FunctionFailed
            | RvError::DataInvalid,
            _,
        ) => Pkcs11Error::Integrity,
        other => map(op)(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    #[test]
    fn token_errors_map_to_agent_kinds() {
        let ck = |rv| CkError::Pkcs11(rv, Function::UnwrapKey);
        for rv in [
            RvError::DeviceRemoved,
            RvError::TokenNotPresent,
            RvError::SessionHandleInvalid,
        ] {
            let e = map("unwrap")(ck(rv));
            assert_eq!(e.kind(), OpErrorKind::Unavailable, "{rv:?}");
            assert!(e.is_transient());
            assert!(e.session_lost());
        }
        assert!(map("sign")(ck(RvError::UserNotLoggedIn)).not_logged_in());
        for rv in [RvError::MechanismInvalid, RvError::KeyNotWrappable] {
            assert_eq!(
                map("wrap")(ck(rv)).kind(),
                OpErrorKind::Unsupported,
                "{rv:?}"
            );
        }
        for rv in [
            RvError::WrappedKeyInvalid,
            RvError::GeneralError,
            RvError::FunctionFailed,
        ] {
            assert!(matches!(
                integrity("unwrap")(ck(rv)),
                Pkcs11Error::Integrity
            ));
            assert_eq!(
                integrity("unwrap")(ck(rv)).kind(),
                OpErrorKind::IntegrityFailed
            );
        }
        // Outside an unwrap, a general error is not an integrity failure.
        assert_eq!(
            map("sign")(ck(RvError::GeneralError)).kind(),
            OpErrorKind::Internal
        );
        // A device that went away during an unwrap is still transient.
        assert!(integrity("unwrap")(ck(RvError::DeviceRemoved)).is_transient());
        assert_eq!(
            Pkcs11Error::WrongPin { label: "x".into() }.kind(),
            OpErrorKind::Internal
        );
    }
}
