#![doc = include_str!("../README.md")]
//!
//! ---
//!
//! This facade re-exports the API of [`memstore_api`] (the traits, types,
//! errors, distance arithmetic and the reference [`InMemoryStore`]) and,
//! behind features, the backends:
//! `sqlite` (default) gives [`SqliteStore`], the store core [`SqlStore`]
//! (memstore-engine; its planner and kernels stay in that crate) on
//! [`SqliteDriver`]; `ipc` (default) gives
//! [`IpcStore`], the client of the `memstored` daemon (crate `memstore-ipc`);
//! `duckdb` gives `DuckdbStore`, the core on `DuckdbDriver` (crate
//! `memstore-duckdb`, which links DuckDB);
//! `hnsw` gives `Hnsw` and `HnswOptions` (crate `memstore-index`), the
//! approximate index kind that the SQL backends take in their options;
//! `postgres` gives `PostgresStore`, a store in a PostgreSQL schema with
//! pgvector keys, and `ServerSearch`, its search on the server for stores
//! larger than a client's RAM and for read replicas (crate
//! `memstore-postgres`);
//! `any` (default) gives [`open`], any backend from a store URL
//! (`sqlite:PATH`, `duckdb:PATH`, `ipc:ENDPOINT#NAME`, `postgres://…#NAME`)
//! as one [`AnyStore`] (crate `memstore-any`).

pub use memstore_api::{
    Batch, ChangeBatch, Counters, DurableStore, Error, EvictionPolicy, InMemoryStore, InsertMeta, Memory, MemoryConfig,
    MemoryId, MemoryStore, Metric, Neighbors, Result, Stats, TagFilter, Tags, Tick, Vectors, math,
};

#[cfg(any(feature = "sqlite", feature = "duckdb", feature = "postgres"))]
pub use memstore_engine::{IndexOptions, SqlStore, driver::FileError};

#[cfg(feature = "sqlite")]
pub use memstore_sqlite::{SqliteDriver, SqliteError, SqliteOptions, SqliteStore, SqliteSynchronous};

#[cfg(feature = "ipc")]
pub use memstore_ipc::{ClientOptions, Endpoint, IpcError, IpcStore};

#[cfg(feature = "duckdb")]
pub use memstore_duckdb::{DuckdbDriver, DuckdbError, DuckdbOptions, DuckdbStore};

#[cfg(feature = "postgres")]
pub use memstore_postgres::{
    PostgresDriver, PostgresError, PostgresLocation, PostgresOptions, PostgresStore, ServerKnn, ServerSearch,
    ServerSearchOptions,
};

#[cfg(feature = "any")]
pub use memstore_any::{AnyStore, StoreUrl, open};

#[cfg(feature = "hnsw")]
pub use memstore_index::{Hnsw, HnswOptions, Quantization};

/// The code in `docs/architecture.md`, compiled by the doc-tests.
#[cfg(all(doctest, feature = "ipc", feature = "any"))]
#[doc = include_str!("../docs/architecture.md")]
pub struct ArchitectureDoc;
