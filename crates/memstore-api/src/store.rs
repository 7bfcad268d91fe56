//! The `MemoryStore` trait: the one interface every backend implements.

use async_trait::async_trait;

use crate::{Batch, ChangeBatch, Memory, MemoryConfig, MemoryId, Neighbors, Result, Stats, TagFilter, Tick, Vectors};

/// A batched, durable key-value memory with top-k search.
///
/// Every method is one transaction: it either happens whole or, on error,
/// changes nothing. Reads (`search`, `get`, `len`, `stats`) run in parallel
/// and never change access bookkeeping; `touch` and `learn` do.
#[async_trait]
pub trait MemoryStore: Send + Sync {
    /// The store's configuration.
    fn config(&self) -> &MemoryConfig;

    /// The `k` nearest memories of each query, nearest first (ties by id),
    /// restricted to those passing `filter`. Rows are padded with empty slots
    /// when fewer than `k` memories match.
    async fn search(&self, queries: Vectors<'_>, k: usize, filter: Option<&TagFilter>) -> Result<Neighbors>;

    /// Inserts the rows as new memories created and accessed at `tick`; returns
    /// their ids in row order. With a capacity set, evicts down to it afterwards
    /// (a batch larger than the capacity may evict some of its own rows).
    async fn insert(&self, batch: Batch<'_>, tick: Tick) -> Result<Vec<MemoryId>>;

    /// The memories with these ids, in the order asked.
    async fn get(&self, ids: &[MemoryId]) -> Result<Vec<Memory>>;

    /// Deletes these memories (repeated ids count once); returns how many were deleted.
    async fn delete(&self, ids: &[MemoryId]) -> Result<usize>;

    /// Adds row `i` of `deltas` to the value of `ids[i]` (a repeated id gets
    /// every delta): the sparse value update a model applies.
    async fn update_values(&self, ids: &[MemoryId], deltas: Vectors<'_>) -> Result<()>;

    /// Records an access at `tick` of each id (a repeated id is accessed repeatedly).
    async fn touch(&self, ids: &[MemoryId], tick: Tick) -> Result<()>;

    /// The associative-memory step, row by row in one transaction: find the `k`
    /// nearest memories of the key; merge the observation with every neighbour
    /// closer than `recombine` (see [`crate::math::merge`]); otherwise insert it
    /// when every neighbour is farther than `novelty` (or there is none); touch
    /// the neighbours in between. Row `i` sees the effects of rows before it.
    /// Evicts down to the capacity at the end. Returns each row's neighbours as
    /// found before its update.
    async fn learn(&self, batch: Batch<'_>, tick: Tick, k: usize) -> Result<Neighbors>;

    /// Evicts the lowest-priority memories (LRFU) until at most `target_len`
    /// remain; returns how many were evicted.
    async fn evict(&self, target_len: usize) -> Result<usize>;

    /// The ids of every memory, ascending (to enumerate or mirror a store).
    async fn ids(&self) -> Result<Vec<MemoryId>>;

    /// Number of memories.
    async fn len(&self) -> Result<usize>;

    /// Whether the store is empty.
    async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }

    /// Applies a writer's [`ChangeBatch`] in one transaction (deletes, value
    /// deltas, inserts with the ids the batch names, touches, capacity
    /// eviction) and records its sequence number. A batch that is out of
    /// order, names an unknown id (or updates or touches one it deletes), or
    /// whose inserts do not start at the store's next id changes nothing.
    async fn apply(&self, batch: &ChangeBatch) -> Result<()>;

    /// Applies consecutive batches in order, as [`MemoryStore::apply`] one
    /// after another would: how a writer that fell behind catches up. A
    /// store may write them in one transaction, each changed memory once in
    /// its last state (the SQL stores do, and the daemon's client sends a
    /// group as one request so that the daemon's store does; then an error
    /// changes nothing); the default applies each in its own. Either way an
    /// error leaves the store holding exactly the batches up to its
    /// `last_batch`.
    async fn apply_all(&self, batches: &[ChangeBatch]) -> Result<()> {
        for b in batches {
            self.apply(b).await?;
        }
        Ok(())
    }

    /// Counts, totals and lifetime counters.
    async fn stats(&self) -> Result<Stats>;

    /// Makes everything committed so far durable on the medium.
    async fn flush(&self) -> Result<()>;
}

/// A store kept in files, with the lifecycle every durable backend shares
/// (SQLite, DuckDB, and the daemon's client, for the store it serves):
/// a consistent backup while open, and an explicit close.
#[async_trait]
pub trait DurableStore: MemoryStore + Sized {
    /// Writes a consistent copy of the committed store to `dest`, which must
    /// not exist (for the daemon's client, a path on the daemon's machine).
    /// The copy opens as a store of its own: how a checkpoint is taken.
    async fn backup_to(&self, dest: &std::path::Path) -> Result<()>;

    /// Closes the store with every committed write in its files. An error
    /// reports what could not be finished (a checkpoint, a goodbye); it never
    /// means a committed write is lost, since commits are durable already.
    async fn close(self) -> Result<()>;
}

/// A shared store is a store: `Arc<S>` delegates to `S`, so one store can be
/// handed to many tasks (a daemon's connections, a model's layers).
#[async_trait]
impl<S: MemoryStore + ?Sized> MemoryStore for std::sync::Arc<S> {
    fn config(&self) -> &MemoryConfig {
        (**self).config()
    }
    async fn search(&self, queries: Vectors<'_>, k: usize, filter: Option<&TagFilter>) -> Result<Neighbors> {
        (**self).search(queries, k, filter).await
    }
    async fn insert(&self, batch: Batch<'_>, tick: Tick) -> Result<Vec<MemoryId>> {
        (**self).insert(batch, tick).await
    }
    async fn get(&self, ids: &[MemoryId]) -> Result<Vec<Memory>> {
        (**self).get(ids).await
    }
    async fn delete(&self, ids: &[MemoryId]) -> Result<usize> {
        (**self).delete(ids).await
    }
    async fn update_values(&self, ids: &[MemoryId], deltas: Vectors<'_>) -> Result<()> {
        (**self).update_values(ids, deltas).await
    }
    async fn touch(&self, ids: &[MemoryId], tick: Tick) -> Result<()> {
        (**self).touch(ids, tick).await
    }
    async fn learn(&self, batch: Batch<'_>, tick: Tick, k: usize) -> Result<Neighbors> {
        (**self).learn(batch, tick, k).await
    }
    async fn evict(&self, target_len: usize) -> Result<usize> {
        (**self).evict(target_len).await
    }
    async fn apply(&self, batch: &ChangeBatch) -> Result<()> {
        (**self).apply(batch).await
    }
    async fn apply_all(&self, batches: &[ChangeBatch]) -> Result<()> {
        (**self).apply_all(batches).await
    }
    async fn ids(&self) -> Result<Vec<MemoryId>> {
        (**self).ids().await
    }
    async fn len(&self) -> Result<usize> {
        (**self).len().await
    }
    async fn stats(&self) -> Result<Stats> {
        (**self).stats().await
    }
    async fn flush(&self) -> Result<()> {
        (**self).flush().await
    }
}
