//! # memstore-ipc
//!
//! One memory, many processes: `memstored` serves a store (SQLite, or DuckDB
//! with the `duckdb` feature), and optionally a directory of named stores
//! (`--stores DIR`: one per memory layer of a model behind one socket), on a
//! Unix domain socket and optionally on TCP (loopback, or any interface
//! with TLS), and [`IpcStore`] is a
//! [`MemoryStore`](memstore_api::MemoryStore) that talks to it, so trainers
//! and an inference server on one machine share a memory through the same
//! trait they would use in process. It passes the conformance suite of
//! `memstore-api` unchanged (and its approximate form with `--index hnsw`).
//!
//! The design follows the usual shape of a local database daemon (Redis,
//! PostgreSQL's Unix-socket listener): a length-prefixed binary protocol with
//! a versioned handshake and request ids so that a connection can pipeline
//! ([`protocol`]); the store's own transactions serialise writes while reads
//! run in parallel; a connection that misbehaves (malformed, oversized or
//! truncated frames, unknown requests, wrong version or token) gets a typed
//! error or is closed without touching the store or the other connections.
//!
//! - [`protocol`]: frames, the handshake, requests, replies and typed errors.
//! - `server` (feature `server`): `Server`, the daemon's core (the
//!   `memstored` binary, feature `daemon`, is a thin command line around it).
//! - `client` (feature `client`): `IpcStore`, the client (its frame reader
//!   decodes search and learn replies straight into their vectors as they
//!   arrive); it needs no database.
//! - [`tls`]: TLS for TCP connections (rustls), for daemons reached over a
//!   network.
//! - [`Endpoint`]: where a daemon listens (`unix:PATH`, `tcp:HOST:PORT` or
//!   `tls:HOST:PORT`).

#[cfg(feature = "client")]
pub mod client;
pub mod protocol;
#[cfg(feature = "client")]
mod reader;
#[cfg(feature = "server")]
pub mod server;
pub mod tls;

use std::path::PathBuf;

#[cfg(feature = "client")]
pub use client::{ClientOptions, IpcStore};
pub use protocol::ProtocolError;
#[cfg(feature = "duckdb")]
pub use server::DuckdbOpener;
#[cfg(feature = "server")]
pub use server::{Server, ServerOptions, SqliteOpener, StoreOpener};

/// Errors of the IPC layer. At the [`memstore_api::MemoryStore`] boundary they
/// become [`memstore_api::Error::Storage`] with this error as the source; the
/// store's own typed errors (dimension mismatch, unknown id, ...) come back
/// from the daemon as the same [`memstore_api::Error`] variants.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IpcError {
    /// Socket I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol, or refused us for a protocol reason.
    #[error("protocol error ({kind:?}): {message}")]
    Protocol {
        /// What kind of failure.
        kind: ProtocolError,
        /// Details.
        message: String,
    },
    /// The daemon's store failed (its message).
    #[error("daemon: {0}")]
    Remote(String),
    /// The connection to the daemon is gone.
    #[error("disconnected from memstored: {0}")]
    Disconnected(String),
    /// An endpoint that does not parse.
    #[error("bad endpoint {0:?}: expected unix:PATH, tcp:HOST:PORT, tls:HOST:PORT or a socket path")]
    BadEndpoint(String),
    /// TLS could not be set up (certificates, keys) or its handshake failed
    /// (an untrusted certificate, a peer that does not speak TLS).
    #[error("tls: {0}")]
    Tls(String),
    /// The daemon could not start (socket directory, permissions, addresses).
    #[error("cannot start: {0}")]
    Setup(String),
}

impl From<IpcError> for memstore_api::Error {
    fn from(e: IpcError) -> Self {
        memstore_api::Error::storage(e)
    }
}

/// The protocol failure behind an error from [`IpcStore`], if it is one
/// (a refused handshake, an oversized request, a daemon shutting down, ...).
pub fn protocol_error(e: &memstore_api::Error) -> Option<ProtocolError> {
    let memstore_api::Error::Storage(inner) = e else {
        return None;
    };
    match inner.downcast_ref::<IpcError>() {
        Some(IpcError::Protocol { kind, .. }) => Some(*kind),
        _ => None,
    }
}

/// Where a daemon listens.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Endpoint {
    /// A Unix domain socket.
    Unix(PathBuf),
    /// A TCP address (`host:port`).
    Tcp(String),
    /// A TCP address (`host:port`) reached over TLS.
    Tls(String),
}

impl Endpoint {
    /// Parses `unix:PATH`, `tcp:HOST:PORT`, `tls:HOST:PORT`, or a bare path
    /// (a Unix socket).
    pub fn parse(s: &str) -> Result<Endpoint, IpcError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(IpcError::BadEndpoint(s.into()));
            }
            Ok(Endpoint::Unix(PathBuf::from(p)))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            if !a.contains(':') {
                return Err(IpcError::BadEndpoint(s.into()));
            }
            Ok(Endpoint::Tcp(a.to_string()))
        } else if let Some(a) = s.strip_prefix("tls:") {
            if !a.contains(':') {
                return Err(IpcError::BadEndpoint(s.into()));
            }
            Ok(Endpoint::Tls(a.to_string()))
        } else if s.is_empty() || s.contains("://") {
            Err(IpcError::BadEndpoint(s.into()))
        } else {
            Ok(Endpoint::Unix(PathBuf::from(s)))
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Tls(a) => write!(f, "tls:{a}"),
        }
    }
}

/// The environment variable holding the shared token for TCP connections.
pub const TOKEN_ENV: &str = "MEMSTORED_TOKEN";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            Endpoint::parse("unix:/tmp/a.sock").unwrap(),
            Endpoint::Unix("/tmp/a.sock".into())
        );
        assert_eq!(
            Endpoint::parse("/run/m.sock").unwrap(),
            Endpoint::Unix("/run/m.sock".into())
        );
        assert_eq!(
            Endpoint::parse("tcp:127.0.0.1:7070").unwrap(),
            Endpoint::Tcp("127.0.0.1:7070".into())
        );
        assert_eq!(
            Endpoint::parse("tls:memory.example:7070").unwrap(),
            Endpoint::Tls("memory.example:7070".into())
        );
        for bad in ["", "unix:", "tcp:localhost", "tls:localhost", "http://x"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
