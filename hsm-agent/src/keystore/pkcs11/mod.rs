//! A PKCS#11 token as keysync's HSM: the token layer
//! (docs/decisions/0010-pkcs11-token.md) and [`Pkcs11Keystore`], the
//! `Keystore` on it with the agent's journal
//! (docs/decisions/0012-pkcs11-keystore.md).
//!
//! - [`Token`]: the module (loaded at run time; `cryptoki`), the token
//!   chosen by label, the user PIN from a file, a session pool.
//! - [`provision_domain_key`] / [`check_domain_key`]: the cluster domain
//!   key inside the token (sensitive, non-extractable, wrap and unwrap
//!   only) and the check value proving it is the cluster's.
//! - Keys: [`Token::generate`], [`Token::wrap`], [`Token::unwrap`],
//!   [`Token::fingerprint`], [`Token::sign`], [`Token::encrypt`],
//!   [`Token::decrypt`], [`Token::list`], [`Token::delete`]. The material
//!   never leaves the token in the clear; blobs are the RFC 5649 bytes the
//!   embedded backend makes, and fingerprints are the embedded backend's.
//! - [`Capabilities`]: what the token can generate, use, wrap and unwrap
//!   per key type, probed on throw-away session objects.
//!
//! **Every call blocks** on the device: from async code, call it inside
//! `tokio::task::spawn_blocking`.

mod domain;
mod error;
mod keys;
mod probe;
pub mod spki;
mod store;
pub mod templates;
mod token;

pub use domain::{
    check_domain_key, domain_check_value, provision_domain_key, token_domain, DomainCheck,
    ExpectedDomain, Provisioned,
};
pub use error::Pkcs11Error;
pub use keys::{Kek, ListedKey, TokenKey, UnwrapRequest};
pub use probe::{Capabilities, Check, TypeSupport};
pub use store::{Pkcs11Keystore, Reconciled, Step, JOURNAL_FILE};
pub use token::{read_pin_file, Token};

/// The cryptoki crate, for callers that inspect attributes.
pub use cryptoki;

// A token is shared between threads (sessions are pooled inside it).
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Token>();
};
