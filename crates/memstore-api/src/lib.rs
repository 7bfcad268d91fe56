//! # memstore-api
//!
//! The interface of memstore, an embedded vector memory: a store of
//! `(key, value)` pairs with access bookkeeping, searched by key distance.
//! It is the durable memory behind discrete-memory layers of a transformer:
//! feed-forward layers act as key-value memories (Geva et al., "Transformer
//! Feed-Forward Layers Are Key-Value Memories", 2021), so memorisation can move
//! out of the weights into a store that is searched, written and evicted.
//!
//! - [`MemoryStore`]: the async trait every backend implements, batched and
//!   transactional (sqlx-style: one core trait, thin drivers behind it).
//! - [`math`]: the arithmetic that defines behaviour — distances, LRFU
//!   (Lee et al. 1999) and recombination — shared by all backends.
//! - [`InMemoryStore`]: the plain reference model that property tests compare
//!   every backend against (as redb does).
//! - [`DurableStore`]: the lifecycle of stores kept in files (backup, close).
//! - `testkit` (feature): the conformance suite every backend runs unchanged.
//!
//! The engine behind the SQL backends (the in-process index and write
//! planner, the search kernels, the store core that drivers plug into) is
//! the crate memstore-engine; this crate holds only what every backend and
//! every user shares.

mod error;
pub mod math;
mod reference;
mod store;
mod types;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use error::{Error, Result};
pub use reference::InMemoryStore;
pub use store::{DurableStore, MemoryStore};
pub use types::{
    Batch, ChangeBatch, Counters, EvictionPolicy, InsertMeta, Memory, MemoryConfig, MemoryId, Metric, Neighbors, Stats,
    TagFilter, Tags, Tick, Vectors,
};
