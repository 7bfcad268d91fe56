//! # memstore-engine
//!
//! The engine behind memstore's SQL backends, in the layout of sqlx (one core,
//! thin drivers): everything a backend does that does not depend on its
//! database lives here, once.
//!
//! - [`index::MemoryIndex`]: the in-process state derived from a store's rows
//!   (keys, access bookkeeping, tags, optionally values) and the planner that
//!   turns each operation into a [`index::Changes`] set before anything is
//!   written.
//! - [`gemm`]: exact batched top-k by blocked SGEMM, with an exact 8-bit
//!   prefilter on CPUs with AVX-512 VNNI (after FAISS's scalar quantiser with
//!   refinement).
//! - [`ann`]: the seam for approximate search structures (HNSW in
//!   memstore-index) that a `MemoryIndex` keeps in step with its rows.
//! - [`SqlStore`]: the store core. It implements
//!   [`memstore_api::MemoryStore`] and [`memstore_api::DurableStore`] for any
//!   [`Driver`]: it plans every operation against the index, asks the driver
//!   to write the changes in one uncommitted transaction, takes the index's
//!   write lock, has the driver commit, and applies the changes to the index,
//!   so that no search sees a commit half-applied and a failed write changes
//!   nothing. A driver holds only what is specific to its database: the
//!   schema, how rows are written and read, checkpoints, backups.
//! - [`driver`]: helpers that every driver's `open` shares (the lock file,
//!   the reconciliation of a stored configuration with the caller's, the
//!   checks on loaded rows).
//! - [`sqlx_rows`]: the statements that the sqlx drivers (SQLite,
//!   PostgreSQL) run alike, expanded in each for its database.
//! - `testkit` (feature `testkit`): the cases every file driver passes
//!   beyond the conformance suite, and its conformance harness.

pub mod ann;
pub mod crash;
pub mod driver;
pub mod gemm;
pub mod index;
mod q8;
pub mod sqlx_rows;
mod store;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use index::MemoryIndex;
pub use store::{Begun, Driver, IndexOptions, Opened, Refresh, SqlStore, blocking};
