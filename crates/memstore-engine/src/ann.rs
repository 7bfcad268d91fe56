//! Approximate search structures that a [`crate::index::MemoryIndex`] keeps
//! in step with its rows (the "index kind" option of the SQL backends).
//!
//! The exact search of `MemoryIndex` (blocked SGEMM, [`crate::gemm`]) is the
//! default and the correctness reference. For larger stores a backend can be
//! opened with an [`AnnBuilder`] (memstore-index's HNSW graph over usearch is
//! one): the index then asks the graph for candidates, re-ranks them by the
//! exact distance of [`memstore_api::math::distance`] (so reported distances, and the
//! thresholds of `learn`, are the same as in exact mode), and falls back to
//! the exact scan for any query that the graph answers with fewer than
//! `min(k, matching rows)` results (a selective tag filter, a sparse graph),
//! so k results come back whenever k matches exist.
//!
//! The graph is derived data, like the rest of the index: it is built from
//! the rows on open (or loaded from a saved file whose fingerprint matches
//! them), changed in [`crate::index::MemoryIndex::apply`] after each commit
//! under the index's write lock (no search sees a deleted id or misses a
//! committed one), and saved on close.

use std::path::{Path, PathBuf};

use memstore_api::{MemoryId, Metric, Result};

/// A predicate on ids that restricts an approximate search.
pub type AnnFilter<'a> = &'a (dyn Fn(MemoryId) -> bool + Sync);

/// An approximate nearest-neighbour structure over `(id, key)` rows.
pub trait AnnIndex: Send + Sync {
    /// Adds new rows (`ids.len() × dim` keys, row-major).
    fn add(&mut self, ids: &[MemoryId], keys: &[f32]) -> Result<()>;
    /// Removes ids (absent ones are skipped).
    fn remove(&mut self, ids: &[MemoryId]) -> Result<()>;
    /// About `k` nearest ids of each query (`m × dim`), passing `filter`,
    /// nearest first. Distances may be approximate: the caller re-ranks.
    fn search(&self, queries: &[f32], k: usize, filter: Option<AnnFilter<'_>>) -> Result<Vec<Vec<(f32, MemoryId)>>>;
    /// Saves the structure to `path` atomically, with a fingerprint of the
    /// rows it holds (`ids` and their `keys`, in any order).
    fn save(&self, path: &Path, ids: &[MemoryId], keys: &[f32]) -> Result<()>;
    /// Whether deletions have degraded the structure enough that the owner
    /// should rebuild it from the rows.
    fn needs_rebuild(&self) -> bool {
        false
    }
}

/// How an [`AnnIndex`] was obtained when a store opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnnOpened {
    /// Loaded from the saved file (it matched the rows).
    Loaded,
    /// No saved file: built from the rows.
    Built,
    /// The saved file could not be used (the reason): rebuilt from the rows.
    Rebuilt(String),
}

/// Makes [`AnnIndex`]es: what a backend is given to search approximately.
pub trait AnnBuilder: Send + Sync + std::fmt::Debug {
    /// A short name of the kind and its settings (for status and logs).
    fn describe(&self) -> String;
    /// The extension of the saved file beside the store (`<db>.<ext>`).
    fn extension(&self) -> &str;
    /// An index of these rows: loaded from `saved` when that file exists, is
    /// intact and was built from exactly these rows, else built from them
    /// (and saved to `saved`, when given).
    fn open(
        &self,
        metric: Metric,
        dim: usize,
        saved: Option<&Path>,
        ids: &[MemoryId],
        keys: &[f32],
    ) -> Result<(Box<dyn AnnIndex>, AnnOpened)>;
}

/// What a [`crate::index::MemoryIndex`]'s approximate search is doing.
#[derive(Clone, Debug, PartialEq)]
pub struct AnnStatus {
    /// The builder's description.
    pub kind: String,
    /// How the structure was obtained on open.
    pub opened: AnnOpened,
    /// Queries answered by the exact scan because the graph returned too
    /// few results (or failed).
    pub exact_fallbacks: u64,
    /// Rebuilds from the rows since open (after fragmentation or a failed update).
    pub rebuilds: u64,
    /// Set when keeping the structure in step failed and it was dropped:
    /// every search is exact from then on (correct, slower).
    pub disabled: Option<String>,
}

/// Where a store at `db` keeps the saved structure of `builder`:
/// `<db>.<extension>` (e.g. `memory.db.hnsw`), beside the database.
pub fn saved_path(db: &Path, builder: &dyn AnnBuilder) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".");
    name.push(builder.extension());
    PathBuf::from(name)
}
