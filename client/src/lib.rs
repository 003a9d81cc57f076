//! The keysync client SDK.
//!
//! A runnable tour of everything below is `client/examples/quickstart.rs`
//! (`cargo build --workspace --bins --examples && target/debug/examples/quickstart`:
//! it starts a local stack of real processes and uses it).
//!
//! # Connect
//!
//! ```no_run
//! # async fn f() -> Result<(), keysync::Error> {
//! let client = keysync::Client::connect("nats://127.0.0.1:4222").await?;
//! # Ok(()) }
//! ```
//!
//! The client watches the cluster's key events (to know which HSMs hold
//! which key) and its sync metrics (to size retries); see [`ClientOptions`].
//!
//! # Create with a durability level
//!
//! ```no_run
//! # async fn f(client: keysync::Client) -> Result<(), keysync::Error> {
//! use keysync::{CreateKey, Route};
//! use keysync_schemas::{Durability, HsmId, KeyType};
//!
//! // Returns once the KeyCreated event is stored in JetStream (the default):
//! // the key survives the loss of the HSM that made it.
//! let logged = client.create_key(CreateKey::new(KeyType::Ed25519)).await?;
//! // Returns once two HSMs hold it, or fails with Error::BelowDurability
//! // saying which HSMs do.
//! let two = client
//!     .create_key(
//!         CreateKey::new(KeyType::P256)
//!             .on(Route::Hsm(HsmId::new("hsm-1").expect("valid id")))
//!             .durability(Durability::Replicas(2)),
//!     )
//!     .await?;
//! assert!(two.holders.len() >= 2);
//! # let _ = logged; Ok(()) }
//! ```
//!
//! # Sign with each route
//!
//! ```no_run
//! # async fn f(client: keysync::Client, key: keysync::CreatedKey) -> Result<(), keysync::Error> {
//! use keysync::Route;
//! let id = key.info.key_id;
//! // Only HSMs known to hold the key (the default for the CLI).
//! let a = client.sign(id, b"msg", &Route::ReplicaAware).await?;
//! // One named HSM: KeyNotFound if it lacks the key.
//! let b = client.sign(id, b"msg", &Route::Hsm(key.info.hsm.clone())).await?;
//! // Any HSM (queue group): a miss is retried within 3x the live p99.
//! let c = client.sign(id, b"msg", &Route::Any).await?;
//! # let _ = (a, b, c); Ok(()) }
//! ```
//!
//! # Watch metrics
//!
//! ```no_run
//! # async fn f(client: keysync::Client) -> Result<(), Box<dyn std::error::Error>> {
//! let mut metrics = client.metrics_receiver();
//! while metrics.changed().await.is_ok() {
//!     if let Some(m) = metrics.borrow().as_ref() {
//!         println!("p99 {:.2} ms, {} clones pending", m.sync_latency_window.p99_ms, m.pending_clones);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Errors keep apart what callers handle apart: [`Error::NotYetReplicated`],
//! [`Error::BelowDurability`], [`Error::HsmUnavailable`], [`Error::BadRequest`].
//!
//! This crate is only the SDK: its dependency tree holds no HSM, CLI
//! parser, HTTP server or span exporter. The `keysync` CLI is the
//! `keysync-cli` crate; the local stack of real processes used by
//! `keysync dev`, the example and the tests is `keysync-harness`.
#![warn(missing_docs)]

pub mod admin;
pub mod client;
pub mod error;
pub mod retry;
pub mod routing;

pub use client::{Client, ClientOptions, CreateKey, CreatedKey, Route};
pub use error::{Error, Result};
pub use keysync_schemas as schemas;
pub use retry::RetryPolicy;
