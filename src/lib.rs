#![doc = include_str!("../README.md")]
//!
//! ---
//!
//! This facade re-exports the API of [`memstore_api`] (the traits, types,
//! errors, distance arithmetic and the reference [`InMemoryStore`]; the
//! engine's planner and kernels stay in that crate) and, behind features,
//! the backends:
//! `sqlite` (default) gives [`SqliteStore`]; `ipc` (default) gives
//! [`IpcStore`], the client of the `memstored` daemon (crate `memstore-ipc`);
//! `duckdb` gives `DuckdbStore` (crate `memstore-duckdb`, which links DuckDB);
//! `hnsw` gives `Hnsw` and `HnswOptions` (crate `memstore-index`), the
//! approximate index kind that the SQL backends take in their options.

pub use memstore_api::{
    Batch, ChangeBatch, Counters, DurableStore, Error, EvictionPolicy, InMemoryStore, InsertMeta, Memory, MemoryConfig,
    MemoryId, MemoryStore, Metric, Neighbors, Result, Stats, TagFilter, Tags, Tick, Vectors, math,
};

#[cfg(feature = "sqlite")]
pub use memstore_sqlite::{SqliteError, SqliteOptions, SqliteStore, SqliteSynchronous};

#[cfg(feature = "ipc")]
pub use memstore_ipc::{ClientOptions, Endpoint, IpcError, IpcStore};

#[cfg(feature = "duckdb")]
pub use memstore_duckdb::{DuckdbError, DuckdbOptions, DuckdbStore};

#[cfg(feature = "hnsw")]
pub use memstore_index::{Hnsw, HnswOptions, Quantization};

/// The code in `docs/architecture.md`, compiled by the doc-tests.
#[cfg(all(doctest, feature = "ipc"))]
#[doc = include_str!("../docs/architecture.md")]
pub struct ArchitectureDoc;
