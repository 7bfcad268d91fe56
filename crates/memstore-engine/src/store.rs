//! The store core: [`SqlStore`] runs every operation of
//! [`MemoryStore`] for a [`Driver`].
//!
//! Every write follows one protocol. Under the writer's lock (one writer at
//! a time), the core plans the operation against the index (pure: nothing
//! changes), reading any values the plan needs through the driver; the
//! driver writes the planned [`Changes`] in one transaction and returns it
//! uncommitted ([`Driver::write`]); the core takes the index's write lock,
//! the driver commits ([`Driver::commit`]), and the core applies the changes
//! to the index before releasing the lock. Searches hold the index's read
//! lock, so none sees rows committed and the index not yet changed, and a
//! write that fails before its commit leaves both the database and the
//! index as they were. Reads of values (when the index does not keep them)
//! go to the driver with ids the index vouches for; a missing row is
//! reported as corruption.
//!
//! **Shared stores.** A driver whose database other clients write too (each
//! with its own index, as PostgreSQL's) numbers the committed store with a
//! version that every commit raises by one. [`Driver::begin`] takes the
//! database's write lock before the write is planned and returns what the
//! others committed since the version this index reflects, which the core
//! applies first: writes of all clients run one after another, each planned
//! on the state it commits on. Reads ask [`Driver::version`] first and apply
//! [`Driver::refresh`] when the index is behind, so a read sees every write
//! committed before it began. Drivers of stores with one writer keep the
//! defaults, which cost nothing.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use memstore_api::{
    Batch, ChangeBatch, Counters, DurableStore, Error, Memory, MemoryConfig, MemoryId, MemoryStore, Neighbors, Result,
    Stats, TagFilter, Tick, Vectors,
};
use tokio::sync::{Mutex, RwLock};

use crate::ann::{AnnBuilder, AnnStatus};
use crate::index::{Changes, Composed, MemoryIndex};

/// Runs CPU-heavy or blocking work without stalling the async runtime's
/// other tasks (on a multi-threaded runtime the worker hands its tasks to
/// another thread first; elsewhere the work runs in place).
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The options of the index that the core keeps for every driver; each
/// driver's options hold one ([`Driver::Options`]).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct IndexOptions {
    /// The index kind: `None` (default) searches exactly; an approximate
    /// structure (e.g. memstore-index's `Hnsw`) is kept in step with the rows
    /// and saved where the driver says ([`Driver::ann_path`]; beside the
    /// database file as `<path>.<extension>` for the file backends), see
    /// [`crate::ann`].
    pub ann: Option<Arc<dyn AnnBuilder>>,
    /// Keep every value in memory beside its key (on by default): searches,
    /// `get` and `learn` then read no values from the database. Costs
    /// `value_dim × 4` bytes of memory per memory, and reading the values
    /// on open.
    pub resident_values: bool,
}

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions {
            ann: None,
            resident_values: true,
        }
    }
}

impl IndexOptions {
    /// Searches with the approximate structure `builder` makes.
    pub fn with_ann(mut self, builder: Arc<dyn AnnBuilder>) -> Self {
        self.ann = Some(builder);
        self
    }

    /// Sets whether values stay in memory beside the keys.
    pub fn with_resident_values(mut self, resident: bool) -> Self {
        self.resident_values = resident;
        self
    }
}

impl AsRef<IndexOptions> for IndexOptions {
    fn as_ref(&self) -> &IndexOptions {
        self
    }
}

/// Writes, for a driver's options type with a public `index:
/// IndexOptions` field, the `with_index` builder and the
/// `AsRef<IndexOptions>` that [`Driver::Options`] requires; with `pooled`,
/// also `with_max_connections` for its public `max_connections: u32`
/// field. Every driver's options then build alike, written once.
#[macro_export]
macro_rules! driver_options {
    ($options:ty) => {
        impl $options {
            /// With the index options.
            pub fn with_index(mut self, index: $crate::IndexOptions) -> Self {
                self.index = index;
                self
            }
        }

        impl ::core::convert::AsRef<$crate::IndexOptions> for $options {
            fn as_ref(&self) -> &$crate::IndexOptions {
                &self.index
            }
        }
    };
    ($options:ty, pooled) => {
        $crate::driver_options!($options);

        impl $options {
            /// With `n` pooled connections (one writes at a time; the
            /// others read values).
            pub fn with_max_connections(mut self, n: u32) -> Self {
                self.max_connections = n;
                self
            }
        }
    };
}

/// What a driver's [`Driver::open`] hands to the core.
pub struct Opened<D: Driver> {
    /// The driver, connected.
    pub driver: D,
    /// The writer's state (see [`Driver::Writer`]).
    pub writer: D::Writer,
    /// The configuration in force (the stored one, reconciled with the
    /// caller's: see [`crate::driver::resolve_config`]).
    pub config: MemoryConfig,
    /// The index loaded from the committed rows (with values when
    /// [`IndexOptions::resident_values`] asked for them).
    pub index: MemoryIndex,
    /// The store's version the index reflects (shared stores; 0 otherwise).
    pub version: u64,
}

/// What other clients committed to a shared store since the version an
/// index reflects, as read from the database; the core turns it into index
/// changes with [`crate::driver::changes_between`].
#[derive(Debug, Default)]
pub struct Refresh {
    /// The store's version the index reflects once this is applied.
    pub version: u64,
    /// The memories written since (complete; values empty where the index
    /// keeps none).
    pub rows: Vec<Memory>,
    /// The ids deleted since.
    pub deleted: Vec<MemoryId>,
    /// `rows` are every memory of the store: remove any other.
    pub whole: bool,
    /// The store's next id.
    pub next_id: MemoryId,
    /// The store's lifetime counters.
    pub counters: Counters,
}

/// A write's transaction, begun before the write is planned.
pub struct Begun<T> {
    /// The transaction that [`Driver::write`] continues.
    pub txn: T,
    /// What other clients committed since the index's version (shared
    /// stores only).
    pub refresh: Option<Refresh>,
    /// The version the store has once this write commits (shared stores;
    /// ignored otherwise).
    pub version: u64,
}

/// What a database must do for the core to run a memory store on it.
///
/// Every method that writes gets the writer's state, which the core holds
/// under its writer lock: calls that write never overlap. `fetch_values` may
/// run beside a write and must see only committed rows.
#[async_trait]
pub trait Driver: Sized + Send + Sync + 'static {
    /// Backend options, the index's among them.
    type Options: AsRef<IndexOptions> + Clone + Default + Send + Sync + 'static;
    /// Where a store lives: a file path, a URL.
    type Location: Send + 'static;
    /// State only the writer touches (a connection, the map of tag names to
    /// their row ids).
    type Writer: Send + 'static;
    /// A transaction written and not yet committed. Dropping it must roll the
    /// transaction back, or the next [`Driver::write`] must.
    type Pending: Send + 'static;
    /// A transaction begun before a write is planned ([`Driver::begin`]);
    /// `()` where the transaction starts in [`Driver::write`]. Dropping it
    /// (a plan that fails, a caller that gives up) must roll it back.
    type Txn: Send + Default + 'static;

    /// Opens the store at `at`. With `config`, creates it if it does not
    /// exist, and otherwise reconciles the stored configuration with it
    /// ([`crate::driver::resolve_config`]); without, opens an existing store
    /// with its stored configuration. Loads the index from the committed rows.
    async fn open(at: Self::Location, config: Option<MemoryConfig>, options: Self::Options) -> Result<Opened<Self>>;

    /// Where the approximate index built by `builder` is saved and loaded
    /// from, if the store has a place for it (none by default).
    fn ann_path(&self, _builder: &dyn AnnBuilder) -> Option<PathBuf> {
        None
    }

    /// The committed values of `ids` (ascending, distinct). An id without a
    /// row is left out of the answer (the core reports it).
    async fn fetch_values(&self, ids: &[MemoryId]) -> Result<HashMap<MemoryId, Vec<f32>>>;

    /// Begins a write, before the core plans it. A store that other
    /// clients write too takes its cross-client write lock here (held until
    /// the commit or the transaction is dropped) and returns what they
    /// committed since `seen`, the version this client's index reflects;
    /// the default (a store with one writer) begins nothing.
    async fn begin(&self, _writer: &mut Self::Writer, seen: u64) -> Result<Begun<Self::Txn>> {
        Ok(Begun {
            txn: Self::Txn::default(),
            refresh: None,
            version: seen,
        })
    }

    /// The committed store's version, for a store that other clients write
    /// too; `None` (the default) when the index cannot be behind (or, for a
    /// driver that allows staleness, need not be checked now).
    async fn version(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// What other clients committed since `seen` (a consistent snapshot),
    /// read outside a write; `None` (the default) when nothing did.
    async fn refresh(&self, _writer: &mut Self::Writer, _seen: u64) -> Result<Option<Refresh>> {
        Ok(None)
    }

    /// Writes `changes` in the transaction `txn` from [`Driver::begin`]
    /// (or one of its own) and returns it uncommitted. On error nothing is
    /// written.
    async fn write(&self, writer: &mut Self::Writer, txn: Self::Txn, changes: &Changes) -> Result<Self::Pending>;

    /// Commits a transaction from [`Driver::write`]. On error nothing is
    /// written.
    async fn commit(&self, writer: &mut Self::Writer, pending: Self::Pending) -> Result<()>;

    /// Makes everything committed durable on the medium (a WAL checkpoint).
    async fn checkpoint(&self, writer: &mut Self::Writer) -> Result<()>;

    /// Writes a consistent copy of the committed store to `dest`, which the
    /// core has checked does not exist.
    async fn backup_to(&self, writer: &mut Self::Writer, dest: &Path) -> Result<()>;

    /// Closes the connections with every committed write in the store's files.
    async fn close(self, writer: Self::Writer) -> Result<()>;
}

/// A memory store on a SQL database: the core's state and a [`Driver`].
///
/// The database is the truth; the index is derived from it on open and kept
/// in step after every commit (module docs).
pub struct SqlStore<D: Driver> {
    driver: D,
    config: MemoryConfig,
    index: RwLock<MemoryIndex>,
    /// Where the approximate index is saved (`None` in exact mode).
    ann_file: Option<PathBuf>,
    writer: Mutex<D::Writer>,
    /// The store version the index reflects (shared stores; changed only
    /// under the writer lock and the index's write lock).
    seen: AtomicU64,
}

impl<D: Driver> SqlStore<D> {
    /// Opens the store at `at`, creating it with `config` if it does not
    /// exist. An existing store must have the same dimensions and metric;
    /// its tunable fields (capacity, thresholds, λ) are updated to `config`.
    pub async fn open(at: impl Into<D::Location>, config: MemoryConfig) -> Result<Self> {
        Self::open_with(at, config, D::Options::default()).await
    }

    /// [`SqlStore::open`] with backend options.
    pub async fn open_with(at: impl Into<D::Location>, config: MemoryConfig, options: D::Options) -> Result<Self> {
        config.validate()?;
        Self::open_inner(at.into(), Some(config), options).await
    }

    /// Opens an existing store with the configuration persisted in it.
    pub async fn open_existing(at: impl Into<D::Location>) -> Result<Self> {
        Self::open_existing_with(at, D::Options::default()).await
    }

    /// [`SqlStore::open_existing`] with backend options.
    pub async fn open_existing_with(at: impl Into<D::Location>, options: D::Options) -> Result<Self> {
        Self::open_inner(at.into(), None, options).await
    }

    async fn open_inner(at: D::Location, config: Option<MemoryConfig>, options: D::Options) -> Result<Self> {
        let ann = options.as_ref().ann.clone();
        let Opened {
            driver,
            writer,
            config,
            mut index,
            version,
        } = D::open(at, config, options).await?;
        let ann_file = match ann {
            Some(builder) => {
                let file = driver.ann_path(builder.as_ref());
                if let Err(e) = blocking(|| index.attach_ann(builder, file.as_deref())) {
                    let _ = driver.close(writer).await;
                    return Err(e);
                }
                file
            }
            None => None,
        };
        Ok(SqlStore {
            driver,
            config,
            index: RwLock::new(index),
            ann_file,
            writer: Mutex::new(writer),
            seen: AtomicU64::new(version),
        })
    }

    /// The driver, for what is specific to the database (its path or
    /// connection pool, ad-hoc read-only SQL).
    pub fn driver(&self) -> &D {
        &self.driver
    }

    /// Writes a consistent copy of the committed store to `dest`, which must
    /// not exist: how a training checkpoint is taken; the copy opens as a
    /// store of its own.
    pub async fn backup_to(&self, dest: impl AsRef<Path>) -> Result<()> {
        let dest = dest.as_ref();
        if dest.exists() {
            return Err(Error::storage(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} already exists", dest.display()),
            )));
        }
        let mut w = self.writer.lock().await;
        self.driver.backup_to(&mut w, dest).await
    }

    /// Closes the store: saves the approximate index (if any; a save that
    /// fails leaves the old file, which the next open finds stale and
    /// rebuilds from the rows), then closes the driver with every committed
    /// write in the store's files. An error is the driver's (a checkpoint):
    /// committed writes are durable already.
    pub async fn close(self) -> Result<()> {
        let _ = self.save_index().await;
        let writer = self.writer.into_inner();
        self.driver.close(writer).await
    }

    /// Saves the approximate index with the fingerprint of the committed
    /// rows, so that the next open loads it instead of rebuilding. Nothing
    /// to do in exact mode.
    pub async fn save_index(&self) -> Result<()> {
        let Some(file) = &self.ann_file else { return Ok(()) };
        let _w = self.writer.lock().await;
        let index = self.index.read().await;
        blocking(|| index.save_ann(file))
    }

    /// What the approximate index is doing (`None` in exact mode).
    pub async fn ann_status(&self) -> Option<AnnStatus> {
        self.index.read().await.ann_status()
    }

    /// Values of `ids` (deduplicated), read from the committed state.
    async fn fetch_values(&self, ids: impl IntoIterator<Item = MemoryId>) -> Result<HashMap<MemoryId, Vec<f32>>> {
        self.try_fetch_values(ids).await?.map_err(no_row)
    }

    /// Values of `ids`, or the first id that has no row.
    async fn try_fetch_values(
        &self,
        ids: impl IntoIterator<Item = MemoryId>,
    ) -> Result<std::result::Result<HashMap<MemoryId, Vec<f32>>, MemoryId>> {
        let ids: Vec<MemoryId> = ids.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
        if ids.is_empty() {
            return Ok(Ok(HashMap::new()));
        }
        let out = self.driver.fetch_values(&ids).await?;
        Ok(match ids.iter().find(|id| !out.contains_key(id)) {
            Some(&missing) => Err(missing),
            None => Ok(out),
        })
    }

    /// Brings the index up to what other clients committed before this
    /// call (shared stores; nothing to do otherwise). Returns whether the
    /// store is shared.
    async fn catch_up(&self) -> Result<bool> {
        let Some(version) = self.driver.version().await? else {
            return Ok(false);
        };
        if version <= self.seen.load(Ordering::Acquire) {
            return Ok(true);
        }
        let mut w = self.writer.lock().await;
        let seen = self.seen.load(Ordering::Acquire);
        if version > seen
            && let Some(refresh) = self.driver.refresh(&mut w, seen).await?
        {
            self.apply_refresh(refresh).await?;
        }
        Ok(true)
    }

    /// Applies what other clients committed (under the writer lock).
    async fn apply_refresh(&self, refresh: Refresh) -> Result<()> {
        let mut index = self.index.write().await;
        blocking(|| {
            let changes = crate::driver::changes_between(
                &index,
                refresh.rows,
                &refresh.deleted,
                refresh.whole,
                refresh.next_id,
                refresh.counters,
            );
            index.apply(&changes)
        })?;
        self.seen.store(refresh.version, Ordering::Release);
        Ok(())
    }

    /// Begins a write under the writer lock: the driver's transaction (for
    /// a shared store, with the others' commits applied to the index first).
    async fn begin(&self, writer: &mut D::Writer) -> Result<(D::Txn, u64)> {
        let begun = self.driver.begin(writer, self.seen.load(Ordering::Acquire)).await?;
        if let Some(refresh) = begun.refresh {
            self.apply_refresh(refresh).await?;
        }
        Ok((begun.txn, begun.version))
    }

    /// Writes `changes` in the transaction begun, then commits it and
    /// applies the changes to the index under the index's write lock, taken
    /// before the commit (module docs).
    async fn commit(&self, writer: &mut D::Writer, txn: (D::Txn, u64), changes: &Changes) -> Result<()> {
        self.commit_then(writer, txn, changes, |index| index.apply(changes))
            .await
    }

    /// [`Self::commit`], with `publish` bringing the index to the committed
    /// state (applying `changes`, or putting in an index they were applied
    /// to while planning).
    async fn commit_then(
        &self,
        writer: &mut D::Writer,
        (txn, version): (D::Txn, u64),
        changes: &Changes,
        publish: impl FnOnce(&mut MemoryIndex) -> Result<()>,
    ) -> Result<()> {
        let pending = self.driver.write(writer, txn, changes).await?;
        let mut index = self.index.write().await;
        self.driver.commit(writer, pending).await?;
        self.seen.store(version, Ordering::Release);
        publish(&mut index)
    }
}

/// How often a read of a shared store retries when a row its index named
/// was deleted by another client in the meantime (values not resident).
const READ_RETRIES: usize = 3;

fn no_row(id: MemoryId) -> Error {
    Error::Corrupt(format!("memory {id} is indexed but has no row"))
}

#[async_trait]
impl<D: Driver> DurableStore for SqlStore<D> {
    async fn backup_to(&self, dest: &Path) -> Result<()> {
        SqlStore::backup_to(self, dest).await
    }

    async fn close(self) -> Result<()> {
        SqlStore::close(self).await
    }
}

#[async_trait]
impl<D: Driver> MemoryStore for SqlStore<D> {
    fn config(&self) -> &MemoryConfig {
        &self.config
    }

    async fn search(&self, queries: Vectors<'_>, k: usize, filter: Option<&TagFilter>) -> Result<Neighbors> {
        self.config.check_search(&queries, k)?;
        let mut attempt = 0;
        loop {
            let shared = self.catch_up().await?;
            let index = self.index.read().await;
            let rows = blocking(|| index.search(queries, k, filter));
            let wanted = index.missing_values(rows.iter().flatten().map(|(_, id)| *id));
            match self.try_fetch_values(wanted).await? {
                Ok(values) => return index.assemble(&rows, k, &values),
                // Another client deleted the row after this index caught up.
                Err(_) if shared && attempt < READ_RETRIES => attempt += 1,
                Err(missing) => return Err(no_row(missing)),
            }
        }
    }

    async fn insert(&self, batch: Batch<'_>, tick: Tick) -> Result<Vec<MemoryId>> {
        let mut w = self.writer.lock().await;
        let txn = self.begin(&mut w).await?;
        let (changes, ids) = {
            let index = self.index.read().await;
            let first = index.next_id();
            let changes = blocking(|| index.plan_insert(&batch, tick))?;
            (changes, (first..first + batch.len() as u64).collect())
        };
        self.commit(&mut w, txn, &changes).await?;
        Ok(ids)
    }

    async fn get(&self, ids: &[MemoryId]) -> Result<Vec<Memory>> {
        let mut attempt = 0;
        loop {
            let shared = self.catch_up().await?;
            let index = self.index.read().await;
            index.check_ids(ids)?;
            match self.try_fetch_values(index.missing_values(ids.iter().copied())).await? {
                Ok(values) => return index.memories(ids, &values),
                // Deleted by another client: the next try reports it unknown.
                Err(_) if shared && attempt < READ_RETRIES => attempt += 1,
                Err(missing) => return Err(no_row(missing)),
            }
        }
    }

    async fn delete(&self, ids: &[MemoryId]) -> Result<usize> {
        let mut w = self.writer.lock().await;
        let txn = self.begin(&mut w).await?;
        let changes = self.index.read().await.plan_delete(ids)?;
        self.commit(&mut w, txn, &changes).await?;
        Ok(changes.removed.len())
    }

    async fn update_values(&self, ids: &[MemoryId], deltas: Vectors<'_>) -> Result<()> {
        let mut w = self.writer.lock().await;
        let txn = self.begin(&mut w).await?;
        let changes = {
            let index = self.index.read().await;
            index.check_update_values(ids, deltas)?;
            let current = self.fetch_values(index.missing_values(ids.iter().copied())).await?;
            index.plan_update_values(ids, deltas, &current)?
        };
        self.commit(&mut w, txn, &changes).await
    }

    async fn touch(&self, ids: &[MemoryId], tick: Tick) -> Result<()> {
        let mut w = self.writer.lock().await;
        let txn = self.begin(&mut w).await?;
        let changes = self.index.read().await.plan_touch(ids, tick)?;
        self.commit(&mut w, txn, &changes).await
    }

    async fn learn(&self, batch: Batch<'_>, tick: Tick, k: usize) -> Result<Neighbors> {
        let mut w = self.writer.lock().await;
        let txn = self.begin(&mut w).await?;
        let stored;
        let (changes, pending) = {
            let index = self.index.read().await;
            let plan = blocking(|| index.plan_learn(batch, tick, k))?;
            stored = self.fetch_values(plan.needed_values()).await?;
            plan.split(&stored)?
        };
        // The output (16 MB at 4096 rows of 64-d keys and values) is
        // allocated and touched while the database writes and syncs, and
        // filled after the commit.
        let (written, out) = pending.allocate_while(self.commit(&mut w, txn, &changes)).await;
        written?;
        let index = self.index.read().await;
        blocking(|| pending.fill(&index, out))
    }

    async fn evict(&self, target_len: usize) -> Result<usize> {
        let mut w = self.writer.lock().await;
        let txn = self.begin(&mut w).await?;
        let changes = self.index.read().await.plan_evict(target_len)?;
        if changes.is_empty() {
            return Ok(0);
        }
        self.commit(&mut w, txn, &changes).await?;
        Ok(changes.removed.len())
    }

    async fn apply(&self, batch: &ChangeBatch) -> Result<()> {
        let mut w = self.writer.lock().await;
        let txn = self.begin(&mut w).await?;
        let changes = {
            let index = self.index.read().await;
            let needed = index.check_apply(batch)?;
            let current = self.fetch_values(needed).await?;
            blocking(|| index.plan_checked_apply(batch, &current))?
        };
        self.commit(&mut w, txn, &changes).await
    }

    /// Plans the batches one after another on a copy of the index, then
    /// writes the composed changes ([`Composed`]) in one transaction:
    /// a memory that several batches change is written once. An error
    /// changes nothing. With an approximate structure attached (its index
    /// cannot be copied) the batches are applied one by one.
    async fn apply_all(&self, batches: &[ChangeBatch]) -> Result<()> {
        let [first, rest @ ..] = batches else {
            return Ok(());
        };
        if rest.is_empty() {
            return self.apply(first).await;
        }
        let mut w = self.writer.lock().await;
        let txn = self.begin(&mut w).await?;
        let Some(mut planned) = self.index.read().await.try_clone() else {
            drop(txn);
            drop(w);
            for b in batches {
                self.apply(b).await?;
            }
            return Ok(());
        };
        let mut all = Composed::new(Changes {
            next_id: planned.next_id(),
            counters: planned.counters(),
            ..Changes::default()
        });
        // Values the batches planned so far gave, where the index does not
        // keep them (the database still holds the ones before them).
        let track = !planned.keeps_values();
        let mut latest: HashMap<MemoryId, Vec<f32>> = HashMap::new();
        for b in batches {
            let needed = planned.check_apply(b)?;
            // A training step's batch (accesses and value deltas) changes
            // the copy in place.
            if planned.apply_updates_in_place(b, &mut all)? {
                continue;
            }
            let mut current = self
                .fetch_values(needed.iter().copied().filter(|id| !latest.contains_key(id)))
                .await?;
            for id in needed {
                if let Some(v) = latest.get(&id) {
                    current.insert(id, v.clone());
                }
            }
            let changes = blocking(|| planned.plan_checked_apply(b, &current))?;
            planned.apply(&changes)?;
            if track {
                for id in &changes.removed {
                    latest.remove(id);
                }
                latest.extend(changes.values.iter().cloned());
                latest.extend(changes.inserted.iter().map(|m| (m.id, m.value.clone())));
            }
            all.then(changes);
        }
        let all = all.finish();
        self.commit_then(&mut w, txn, &all, |index| {
            index.replace_with(planned);
            Ok(())
        })
        .await
    }

    async fn ids(&self) -> Result<Vec<MemoryId>> {
        self.catch_up().await?;
        let mut ids = self.index.read().await.ids().to_vec();
        ids.sort_unstable();
        Ok(ids)
    }

    async fn len(&self) -> Result<usize> {
        self.catch_up().await?;
        Ok(self.index.read().await.len())
    }

    async fn stats(&self) -> Result<Stats> {
        self.catch_up().await?;
        Ok(self.index.read().await.stats())
    }

    async fn flush(&self) -> Result<()> {
        let mut w = self.writer.lock().await;
        self.driver.checkpoint(&mut w).await
    }
}
