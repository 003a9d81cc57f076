//! The keysync client SDK.
//!
//! Connect to a cluster, create keys with a durability level, and use them
//! through a chosen route:
//!
//! ```no_run
//! use keysync::{Client, CreateKey, Route};
//! use keysync_schemas::{Durability, KeyType};
//!
//! # async fn example() -> Result<(), keysync::Error> {
//! let client = Client::connect("nats://127.0.0.1:4222").await?;
//! // Returns once two HSMs hold the key.
//! let key = client
//!     .create_key(CreateKey::new(KeyType::P256).durability(Durability::Replicas(2)))
//!     .await?;
//! let signature = client
//!     .sign(key.info.key_id, b"hello", &Route::Hsm(key.holders[1].clone()))
//!     .await?;
//! # let _ = signature;
//! # Ok(())
//! # }
//! ```
//!
//! [`devstack`] runs a local stack of real processes (used by `keysync dev`,
//! `keysync demo` and the integration tests).
#![warn(missing_docs)]

pub mod client;
pub mod devstack;
pub mod error;
pub mod retry;
pub mod routing;

pub use client::{Client, ClientOptions, CreateKey, CreatedKey, Route};
pub use error::{Error, Result};
pub use keysync_schemas as schemas;
pub use retry::RetryPolicy;
