//! # memstore-sqlite
//!
//! The SQLite backend of memstore: a thin driver that translates the plans of
//! [`memstore_api::index::MemoryIndex`] into SQL, in the style of sqlx (a core
//! trait, thin drivers).
//!
//! - **Storage.** sqlx (SQLite, tokio) in WAL mode; the schema lives in this
//!   crate's `migrations/`, embedded at compile time and applied by sqlx's
//!   migrator. Keys and
//!   values are little-endian f32 blobs; tags live in their own tables with
//!   counts. Every operation is one transaction.
//! - **SQL kNN.** sqlite-vec is registered as an auto-extension before the pool
//!   opens, and keys are mirrored into a `vec0` table (`memory_keys`) so that
//!   exact kNN works in plain SQL for ad-hoc inspection:
//!   `SELECT rowid, distance FROM memory_keys WHERE key MATCH ? AND k = 8`.
//!   (vec0 has no inner-product metric: for `Metric::InnerProduct` the table
//!   uses L2, which orders the same only for normalised keys.) The mirror
//!   costs writes: a durable insert of 4096 rows of 64-d took 31 ms with it
//!   and 9.5 ms without ([`SqliteOptions::sql_knn`] = false). Without it, SQL
//!   kNN still works by scan through sqlite-vec's scalar functions on the
//!   key blobs: `SELECT id, vec_distance_l2(key, ?) AS d FROM memories
//!   ORDER BY d, id LIMIT 8` (`vec_distance_cosine` for cosine).
//! - **Hot path.** sqlite-vec answers one query at a time, so batched search
//!   never goes through SQL: the keys and access bookkeeping are kept in an
//!   in-process [`MemoryIndex`] loaded on open, searched exactly and in
//!   parallel, and updated after each commit under its write lock, so that no
//!   search sees a deleted id or misses a committed one. By default the index
//!   keeps the values too ([`SqliteOptions::resident_values`]), so searches
//!   and `learn` return them without a read; with that off, values are read
//!   from the database by id (about 1.5 µs per value through sqlx: 11 ms of
//!   a 4096-row `learn` at 64 × 10k).
//!
//! - **Index kind.** [`SqliteOptions::ann`] swaps the exact search for an
//!   approximate structure (memstore-index's HNSW), kept in step the same way
//!   and saved beside the database on close (see [`memstore_api::ann`]).
//!
//! One store owns a file at a time (the index is per process): opening takes an
//! exclusive advisory lock on `<path>.lock` and a second open fails with
//! [`SqliteError::Locked`]. To share a store between processes, serve it with
//! `memstored` (memstore-ipc).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Once, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use memstore_api::ann::{AnnBuilder, AnnStatus};
use memstore_api::index::{Changes, Meta};
use memstore_api::{
    Batch, ChangeBatch, Counters, DurableStore, Error, EvictionPolicy, Memory, MemoryConfig, MemoryId, MemoryStore,
    Metric, Neighbors, Result, Stats, TagFilter, Tick, Vectors,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};
use tokio::sync::{Mutex, RwLock};

pub use memstore_api::index::MemoryIndex;
pub use sqlx::sqlite::SqliteSynchronous;

/// Errors of the SQLite driver; converted into [`memstore_api::Error::Storage`]
/// at the trait boundary, with this error as the source.
#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    /// SQLite (through sqlx) failed.
    #[error("sqlite: {0}")]
    Sql(#[from] sqlx::Error),
    /// Applying the schema migrations failed.
    #[error("migrating the schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The file to open does not exist.
    #[error("no memstore database at {0}")]
    NotFound(PathBuf),
    /// Another store (in this or another process) has the file open.
    #[error("{0} is open in another store (lock file held); share a store between processes with memstored")]
    Locked(PathBuf),
    /// The lock file could not be created or locked.
    #[error("lock file {0}: {1}")]
    LockFile(PathBuf, #[source] std::io::Error),
}

impl From<SqliteError> for Error {
    fn from(e: SqliteError) -> Self {
        Error::storage(e)
    }
}

fn sql(e: sqlx::Error) -> Error {
    Error::storage(SqliteError::Sql(e))
}

/// Options of the SQLite backend beyond the memory configuration.
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// SQLite `synchronous` level. `Full` (default) makes every commit durable
    /// against power loss; `Normal` in WAL mode is durable against process crashes.
    pub synchronous: SqliteSynchronous,
    /// Mirror keys into the sqlite-vec `vec0` table for SQL kNN (fixed when the
    /// store is created; later opens follow the file). On by default; off
    /// makes durable inserts about three times cheaper, and SQL kNN then runs
    /// by scan with `vec_distance_l2(key, ?)` on `memories` (module docs).
    pub sql_knn: bool,
    /// Connections in the pool (one writes at a time; the others read values).
    pub max_connections: u32,
    /// Keep every value in memory beside its key (on by default): searches,
    /// `get` and `learn` then read no values from the database. Costs
    /// `value_dim × 4` bytes of memory per memory, and reading the values
    /// on open.
    pub resident_values: bool,
    /// The index kind: `None` (default) searches exactly; an approximate
    /// structure (e.g. memstore-index's `Hnsw`) is kept in step with the rows
    /// and saved beside the database as `<path>.<extension>` on close
    /// (see [`memstore_api::ann`]).
    pub ann: Option<Arc<dyn AnnBuilder>>,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: SqliteSynchronous::Full,
            sql_knn: true,
            max_connections: 4,
            resident_values: true,
            ann: None,
        }
    }
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Registers sqlite-vec with every SQLite connection opened from now on.
fn register_sqlite_vec() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        type EntryPoint = unsafe extern "C" fn(
            *mut libsqlite3_sys::sqlite3,
            *mut *mut std::os::raw::c_char,
            *const libsqlite3_sys::sqlite3_api_routines,
        ) -> std::os::raw::c_int;
        // SAFETY: `sqlite3_vec_init` is the extension's entry point with exactly
        // this C signature; the crate declares it without arguments, so it is
        // cast to the signature `sqlite3_auto_extension` expects.
        unsafe {
            let init: EntryPoint = std::mem::transmute(sqlite_vec::sqlite3_vec_init as *const ());
            libsqlite3_sys::sqlite3_auto_extension(Some(init));
        }
    });
}

/// A memory store in one SQLite file.
pub struct SqliteStore {
    pool: SqlitePool,
    config: MemoryConfig,
    path: PathBuf,
    sql_knn: bool,
    index: RwLock<MemoryIndex>,
    /// Where the approximate index is saved (`None` in exact mode).
    ann_file: Option<PathBuf>,
    writer: Mutex<HashMap<String, i64>>,
    /// Exclusive advisory lock on `<path>.lock`, held while the store is open
    /// (the kernel releases it if the process dies).
    _lock: std::fs::File,
}

/// Takes the exclusive lock that makes one store the only owner of a file.
fn lock_file(path: &Path) -> Result<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| SqliteError::LockFile(lock_path.clone(), e))?;
    // A lock just released can still be held for a moment by a child
    // process forked between our open and its exec (the descriptor is shared
    // until exec closes it): retry briefly before calling the file locked.
    let deadline = std::time::Instant::now() + LOCK_GRACE;
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(std::fs::TryLockError::WouldBlock) => return Err(SqliteError::Locked(path.to_path_buf()).into()),
            Err(std::fs::TryLockError::Error(e)) => return Err(SqliteError::LockFile(lock_path, e).into()),
        }
    }
}

/// How long an open waits for a lock held by someone else before failing.
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

fn f32_blob(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn blob_f32(b: &[u8], dim: usize, what: &str, id: i64) -> Result<Vec<f32>> {
    if b.len() != dim * 4 {
        return Err(Error::Corrupt(format!(
            "memory {id}: {what} blob has {} bytes, expected {} ({dim} floats)",
            b.len(),
            dim * 4
        )));
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Runs CPU-heavy work without stalling the async runtime's other tasks.
fn cpu<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Rows per multi-row INSERT statement (up to 8 parameters each: 8,000 per
/// statement, under the bundled SQLite's limit of 32,766): few statements
/// per batch, since each costs a prepare and a round of sqlx overhead.
const INSERT_CHUNK: usize = 1000;
/// Ids per `IN (...)` list.
const ID_CHUNK: usize = 500;

impl SqliteStore {
    /// Opens the store at `path`, creating it with `config` if it does not
    /// exist. An existing store must have the same dimensions and metric;
    /// its tunable fields (capacity, thresholds, λ) are updated to `config`.
    pub async fn open(path: impl AsRef<Path>, config: MemoryConfig) -> Result<Self> {
        Self::open_with(path, config, SqliteOptions::default()).await
    }

    /// [`SqliteStore::open`] with backend options.
    pub async fn open_with(path: impl AsRef<Path>, config: MemoryConfig, options: SqliteOptions) -> Result<Self> {
        config.validate()?;
        Self::open_inner(path.as_ref(), Some(config), options).await
    }

    /// Opens an existing store with the configuration persisted in it.
    pub async fn open_existing(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(SqliteError::NotFound(path.to_path_buf()).into());
        }
        Self::open_existing_with(path, SqliteOptions::default()).await
    }

    /// [`SqliteStore::open_existing`] with backend options.
    pub async fn open_existing_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(SqliteError::NotFound(path.to_path_buf()).into());
        }
        Self::open_inner(path, None, options).await
    }

    async fn open_inner(path: &Path, config: Option<MemoryConfig>, options: SqliteOptions) -> Result<Self> {
        register_sqlite_vec();
        let lock = lock_file(path)?;
        let connect = SqliteConnectOptions::from_str("sqlite://")
            .map_err(sql)?
            .filename(path)
            .create_if_missing(config.is_some())
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(options.synchronous)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30))
            .pragma("cache_size", "-65536");
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .connect_with(connect)
            .await
            .map_err(sql)?;
        match Self::init(pool.clone(), path, config, options, lock).await {
            Ok(s) => Ok(s),
            Err(e) => {
                pool.close().await;
                Err(e)
            }
        }
    }

    async fn init(
        pool: SqlitePool,
        path: &Path,
        config: Option<MemoryConfig>,
        options: SqliteOptions,
        lock: std::fs::File,
    ) -> Result<Self> {
        MIGRATOR.run(&pool).await.map_err(SqliteError::from)?;
        let mut tx = pool.begin().await.map_err(sql)?;
        let stored = read_config(&mut tx).await?;
        let (config, sql_knn, lambda_changed) = match (stored, config) {
            (None, None) => {
                return Err(Error::Corrupt(format!(
                    "{} has no memstore configuration",
                    path.display()
                )));
            }
            (None, Some(c)) => {
                write_config(&mut tx, &c, options.sql_knn, true).await?;
                sqlx::query(
                    "INSERT INTO memstore_meta (id, next_id, inserted, merged, evicted, deleted) VALUES (1, 1, 0, 0, 0, 0)",
                )
                .execute(&mut *tx)
                .await
                .map_err(sql)?;
                if options.sql_knn {
                    let metric = match c.metric {
                        Metric::Cosine => "cosine",
                        Metric::L2 | Metric::InnerProduct => "l2",
                    };
                    let ddl = format!(
                        "CREATE VIRTUAL TABLE memory_keys USING vec0(key float[{}] distance_metric={metric})",
                        c.key_dim
                    );
                    // Only integers and a fixed keyword are interpolated.
                    sqlx::query(sqlx::AssertSqlSafe(ddl))
                        .execute(&mut *tx)
                        .await
                        .map_err(sql)?;
                }
                (c, options.sql_knn, false)
            }
            (Some((s, knn)), None) => (s, knn, false),
            (Some((s, knn)), Some(c)) => {
                c.check_compatible(&s)?;
                let changed = s.eviction.lambda() != c.eviction.lambda();
                if s != c {
                    write_config(&mut tx, &c, knn, false).await?;
                }
                (c, knn, changed)
            }
        };
        let mut index = load_index(&mut tx, &config, options.resident_values).await?;
        if lambda_changed {
            // The priority column depends on λ: recompute it for the new policy.
            let lambda = config.eviction.lambda();
            for &id in index.ids() {
                if let Some(m) = index.meta(id) {
                    sqlx::query("UPDATE memories SET priority = ? WHERE id = ?")
                        .bind(memstore_api::math::priority(lambda, m.crf, m.last_access))
                        .bind(id as i64)
                        .execute(&mut *tx)
                        .await
                        .map_err(sql)?;
                }
            }
        }
        let tag_rows = sqlx::query("SELECT id, name FROM tags")
            .fetch_all(&mut *tx)
            .await
            .map_err(sql)?;
        let mut tag_ids = HashMap::new();
        for r in tag_rows {
            tag_ids.insert(
                r.try_get::<String, _>(1).map_err(sql)?,
                r.try_get::<i64, _>(0).map_err(sql)?,
            );
        }
        tx.commit().await.map_err(sql)?;
        let ann_file = match options.ann {
            Some(builder) => {
                let file = memstore_api::ann::saved_path(path, builder.as_ref());
                cpu(|| index.attach_ann(builder, Some(&file)))?;
                Some(file)
            }
            None => None,
        };
        Ok(SqliteStore {
            pool,
            config,
            path: path.to_path_buf(),
            sql_knn,
            index: RwLock::new(index),
            ann_file,
            writer: Mutex::new(tag_ids),
            _lock: lock,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection pool, for ad-hoc SQL (reads only: writes behind the
    /// store's back are not seen by its index).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Whether keys are mirrored into the `memory_keys` vec0 table.
    pub fn has_sql_knn(&self) -> bool {
        self.sql_knn
    }

    /// Writes a consistent copy of the committed store to `dest` (SQLite's
    /// `VACUUM INTO`: one read transaction, so concurrent writers are neither
    /// blocked for long nor half-copied). `dest` must not exist. Used for
    /// training checkpoints: reopening the copy gives the store as it was.
    pub async fn backup_to(&self, dest: impl AsRef<Path>) -> Result<()> {
        let dest = dest.as_ref();
        if dest.exists() {
            return Err(Error::storage(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} already exists", dest.display()),
            )));
        }
        let _w = self.writer.lock().await;
        sqlx::query("VACUUM INTO ?")
            .bind(dest.to_string_lossy().into_owned())
            .execute(&self.pool)
            .await
            .map_err(sql)?;
        Ok(())
    }

    /// Closes the store: saves the approximate index (if any; a save that
    /// fails leaves the old file, which the next open finds stale and
    /// rebuilds from the rows), checkpoints the WAL into the database file
    /// and closes the connection pool. An error is the checkpoint's: the
    /// committed writes are in the WAL, which the next open replays.
    pub async fn close(self) -> Result<()> {
        let _ = self.save_index().await;
        let checkpoint = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await
            .map_err(sql);
        self.pool.close().await;
        checkpoint.map(drop)
    }

    /// Saves the approximate index beside the database (`<path>.<ext>`) with
    /// the fingerprint of the committed rows, so that the next open loads it
    /// instead of rebuilding. Nothing to do in exact mode.
    pub async fn save_index(&self) -> Result<()> {
        let Some(file) = &self.ann_file else { return Ok(()) };
        let _w = self.writer.lock().await;
        let index = self.index.read().await;
        cpu(|| index.save_ann(file))
    }

    /// What the approximate index is doing (`None` in exact mode).
    pub async fn ann_status(&self) -> Option<AnnStatus> {
        self.index.read().await.ann_status()
    }

    /// Values of `ids` (deduplicated), read from the committed state.
    async fn fetch_values(&self, ids: impl IntoIterator<Item = MemoryId>) -> Result<HashMap<MemoryId, Vec<f32>>> {
        let ids: BTreeSet<MemoryId> = ids.into_iter().collect();
        let ids: Vec<MemoryId> = ids.into_iter().collect();
        let mut out = HashMap::with_capacity(ids.len());
        if ids.is_empty() {
            return Ok(out);
        }
        let mut conn = self.pool.acquire().await.map_err(sql)?;
        for chunk in ids.chunks(ID_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new("SELECT id, value FROM memories WHERE id IN (");
            let mut sep = q.separated(", ");
            for id in chunk {
                sep.push_bind(*id as i64);
            }
            q.push(")");
            for r in q.build().fetch_all(&mut *conn).await.map_err(sql)? {
                let id: i64 = r.try_get(0).map_err(sql)?;
                let b: Vec<u8> = r.try_get(1).map_err(sql)?;
                out.insert(id as u64, blob_f32(&b, self.config.value_dim, "value", id)?);
            }
        }
        if let Some(missing) = ids.iter().find(|id| !out.contains_key(id)) {
            return Err(Error::Corrupt(format!("memory {missing} is indexed but has no row")));
        }
        Ok(out)
    }

    /// Persists `changes` in one transaction, then applies them to the index
    /// under its write lock (so no search sees the commit half-applied).
    async fn commit(&self, tag_ids: &mut HashMap<String, i64>, changes: &Changes) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(sql)?;
        let new_tags = persist(&mut tx, self.sql_knn, self.config.eviction.lambda(), tag_ids, changes).await?;
        self.publish(tx, tag_ids, new_tags, changes).await
    }

    /// Commits `tx`, which holds `changes`, and applies them to the index
    /// under its write lock, taken before the commit: no search or read of
    /// values sees the rows committed and the index not yet changed.
    async fn publish(
        &self,
        tx: Transaction<'_, Sqlite>,
        tag_ids: &mut HashMap<String, i64>,
        new_tags: HashMap<String, i64>,
        changes: &Changes,
    ) -> Result<()> {
        let mut index = self.index.write().await;
        tx.commit().await.map_err(sql)?;
        tag_ids.extend(new_tags);
        index.apply(changes)
    }
}

async fn read_config(tx: &mut Transaction<'_, Sqlite>) -> Result<Option<(MemoryConfig, bool)>> {
    let row = sqlx::query(
        "SELECT key_dim, value_dim, metric, capacity, lrfu_lambda, novelty, recombine, sql_knn FROM memstore_config",
    )
    .fetch_optional(&mut **tx)
    .await
    .map_err(sql)?;
    let Some(r) = row else { return Ok(None) };
    let metric: String = r.try_get(2).map_err(sql)?;
    let metric = Metric::parse(&metric).ok_or_else(|| Error::Corrupt(format!("unknown metric {metric:?}")))?;
    let dim = |v: i64, what: &str| usize::try_from(v).map_err(|_| Error::Corrupt(format!("{what} = {v}")));
    let capacity: Option<i64> = r.try_get(3).map_err(sql)?;
    let config = MemoryConfig {
        key_dim: dim(r.try_get(0).map_err(sql)?, "key_dim")?,
        value_dim: dim(r.try_get(1).map_err(sql)?, "value_dim")?,
        metric,
        capacity: capacity.map(|c| dim(c, "capacity")).transpose()?,
        eviction: EvictionPolicy::Lrfu {
            lambda: r.try_get(4).map_err(sql)?,
        },
        novelty: r.try_get::<f64, _>(5).map_err(sql)? as f32,
        recombine: r.try_get::<f64, _>(6).map_err(sql)? as f32,
    };
    config
        .validate()
        .map_err(|e| Error::Corrupt(format!("stored configuration: {e}")))?;
    Ok(Some((config, r.try_get::<i64, _>(7).map_err(sql)? != 0)))
}

async fn write_config(tx: &mut Transaction<'_, Sqlite>, c: &MemoryConfig, sql_knn: bool, create: bool) -> Result<()> {
    let q = if create {
        "INSERT INTO memstore_config (key_dim, value_dim, metric, capacity, lrfu_lambda, novelty, recombine, sql_knn, id) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)"
    } else {
        "UPDATE memstore_config SET key_dim = ?, value_dim = ?, metric = ?, capacity = ?, lrfu_lambda = ?, \
         novelty = ?, recombine = ?, sql_knn = ? WHERE id = 1"
    };
    sqlx::query(q)
        .bind(c.key_dim as i64)
        .bind(c.value_dim as i64)
        .bind(c.metric.as_str())
        .bind(c.capacity.map(|x| x as i64))
        .bind(c.eviction.lambda())
        .bind(c.novelty as f64)
        .bind(c.recombine as f64)
        .bind(sql_knn as i64)
        .execute(&mut **tx)
        .await
        .map_err(sql)?;
    Ok(())
}

async fn load_index(tx: &mut Transaction<'_, Sqlite>, config: &MemoryConfig, values: bool) -> Result<MemoryIndex> {
    let mut index = MemoryIndex::new(config.clone());
    if values {
        index = index.with_values();
    }
    let meta =
        sqlx::query("SELECT next_id, inserted, merged, evicted, deleted, last_batch FROM memstore_meta WHERE id = 1")
            .fetch_optional(&mut **tx)
            .await
            .map_err(sql)?
            .ok_or_else(|| Error::Corrupt("memstore_meta row is missing".into()))?;
    let g = |i: usize| -> Result<u64> { Ok(meta.try_get::<i64, _>(i).map_err(sql)? as u64) };
    let (next_id, counters) = (
        g(0)?,
        Counters {
            inserted: g(1)?,
            merged: g(2)?,
            evicted: g(3)?,
            deleted: g(4)?,
            last_batch: g(5)?,
        },
    );
    let mut tags: HashMap<i64, BTreeMap<String, u64>> = HashMap::new();
    let rows = sqlx::query("SELECT mt.memory_id, t.name, mt.count FROM memory_tags mt JOIN tags t ON t.id = mt.tag_id")
        .fetch_all(&mut **tx)
        .await
        .map_err(sql)?;
    for r in rows {
        let id: i64 = r.try_get(0).map_err(sql)?;
        let count: i64 = r.try_get(2).map_err(sql)?;
        tags.entry(id)
            .or_default()
            .insert(r.try_get(1).map_err(sql)?, count as u64);
    }
    let select = if values {
        "SELECT id, key, created, last_access, access_count, crf, value FROM memories"
    } else {
        "SELECT id, key, created, last_access, access_count, crf FROM memories"
    };
    let rows = sqlx::query(select).fetch_all(&mut **tx).await.map_err(sql)?;
    for r in rows {
        let id: i64 = r.try_get(0).map_err(sql)?;
        let key: Vec<u8> = r.try_get(1).map_err(sql)?;
        let key = blob_f32(&key, config.key_dim, "key", id)?;
        if key.iter().any(|x| !x.is_finite()) {
            return Err(Error::Corrupt(format!("memory {id} has a non-finite key")));
        }
        let crf: f64 = r.try_get(5).map_err(sql)?;
        if !(crf.is_finite() && crf > 0.0) {
            return Err(Error::Corrupt(format!("memory {id} has crf {crf}")));
        }
        let m = Meta {
            created: r.try_get::<i64, _>(2).map_err(sql)? as u64,
            last_access: r.try_get::<i64, _>(3).map_err(sql)? as u64,
            access_count: r.try_get::<i64, _>(4).map_err(sql)? as u64,
            crf,
            tags: tags.remove(&id).unwrap_or_default(),
        };
        let value = if values {
            let b: &[u8] = r.try_get(6).map_err(sql)?;
            Some(blob_f32(b, config.value_dim, "value", id)?)
        } else {
            None
        };
        index.load(id as u64, &key, value.as_deref(), m)?;
    }
    if index.next_id() > next_id {
        return Err(Error::Corrupt(format!(
            "next_id {next_id} is not above every stored id ({})",
            index.next_id() - 1
        )));
    }
    index.set_state(next_id, counters);
    Ok(index)
}

/// Checks that a statement changed exactly the rows the index expects; a
/// difference means the file was changed behind the store's back.
fn expect_rows(done: sqlx::sqlite::SqliteQueryResult, what: &str, want: usize) -> Result<()> {
    if done.rows_affected() != want as u64 {
        return Err(Error::Corrupt(format!(
            "{what} changed {} rows where the index expected {want}",
            done.rows_affected()
        )));
    }
    Ok(())
}

/// The longest run of point deletes sent to the `vec0` mirror as one query.
const MIRROR_DELETES: usize = 256;

/// `DELETE FROM memory_keys WHERE rowid = ?;` repeated `2^i` times, for `i`
/// up to log2([`MIRROR_DELETES`]).
fn mirror_delete_sql(i: usize) -> &'static str {
    static SQL: OnceLock<Vec<String>> = OnceLock::new();
    let all = SQL.get_or_init(|| {
        (0..=MIRROR_DELETES.trailing_zeros())
            .map(|i| "DELETE FROM memory_keys WHERE rowid = ?;".repeat(1 << i))
            .collect()
    });
    &all[i]
}

/// Deletes `ids` from the `vec0` mirror, one point statement per id.
///
/// sqlite-vec (0.1.9) plans `rowid IN (…)` as a scan of the whole table
/// outside kNN queries, and `rowid = ?` as a point lookup; a `DELETE … IN`
/// of 500 ids on a store of 1M keys read every chunk. The statements go in
/// runs of a power of two per query (one round trip to sqlx's worker per
/// run, at most nine query shapes in its statement cache).
async fn delete_from_mirror(tx: &mut Transaction<'_, Sqlite>, ids: &[MemoryId]) -> Result<()> {
    let mut rest = ids;
    while !rest.is_empty() {
        let i = rest.len().min(MIRROR_DELETES).ilog2() as usize;
        let (run, tail) = rest.split_at(1 << i);
        let mut q = sqlx::query(mirror_delete_sql(i));
        for id in run {
            q = q.bind(*id as i64);
        }
        q.execute(&mut **tx).await.map_err(sql)?;
        rest = tail;
    }
    Ok(())
}

/// Writes `changes` inside `tx`. Returns tags created (their ids become valid
/// only once the transaction commits).
async fn persist(
    tx: &mut Transaction<'_, Sqlite>,
    sql_knn: bool,
    lambda: f64,
    tag_ids: &HashMap<String, i64>,
    ch: &Changes,
) -> Result<HashMap<String, i64>> {
    for chunk in ch.removed.chunks(ID_CHUNK) {
        let mut q = QueryBuilder::<Sqlite>::new("DELETE FROM memories WHERE id IN (");
        let mut sep = q.separated(", ");
        for id in chunk {
            sep.push_bind(*id as i64);
        }
        q.push(")");
        let done = q.build().execute(&mut **tx).await.map_err(sql)?;
        expect_rows(done, "delete", chunk.len())?;
        if sql_knn {
            delete_from_mirror(tx, chunk).await?;
        }
    }
    for chunk in ch.accessed.chunks(INSERT_CHUNK) {
        let mut q = QueryBuilder::<Sqlite>::new("WITH v (id, last_access, access_count, crf, priority) AS (");
        q.push_values(chunk, |mut b, u| {
            b.push_bind(u.id as i64)
                .push_bind(u.last_access as i64)
                .push_bind(u.access_count as i64)
                .push_bind(u.crf)
                .push_bind(u.priority);
        });
        q.push(
            ") UPDATE memories SET last_access = v.last_access, access_count = v.access_count, crf = v.crf, \
             priority = v.priority FROM v WHERE memories.id = v.id",
        );
        let done = q.build().execute(&mut **tx).await.map_err(sql)?;
        expect_rows(done, "access update", chunk.len())?;
    }
    for chunk in ch.values.chunks(INSERT_CHUNK) {
        let mut q = QueryBuilder::<Sqlite>::new("WITH v (id, value) AS (");
        q.push_values(chunk, |mut b, (id, v)| {
            b.push_bind(*id as i64).push_bind(f32_blob(v));
        });
        q.push(") UPDATE memories SET value = v.value FROM v WHERE memories.id = v.id");
        let done = q.build().execute(&mut **tx).await.map_err(sql)?;
        expect_rows(done, "value update", chunk.len())?;
    }
    let mut new_tags: HashMap<String, i64> = HashMap::new();
    let mut tag_rows: Vec<(i64, i64, i64)> = Vec::new();
    // Retagged memories get their tag rows rewritten whole.
    for chunk in ch.retagged.chunks(ID_CHUNK) {
        let mut q = QueryBuilder::<Sqlite>::new("DELETE FROM memory_tags WHERE memory_id IN (");
        let mut sep = q.separated(", ");
        for (id, _) in chunk {
            sep.push_bind(*id as i64);
        }
        q.push(")");
        q.build().execute(&mut **tx).await.map_err(sql)?;
    }
    for (id, tags) in ch.tag_rows() {
        for (t, c) in tags {
            let tid = match tag_ids.get(t).or_else(|| new_tags.get(t)) {
                Some(&tid) => tid,
                None => {
                    let tid: i64 = sqlx::query_scalar(
                        "INSERT INTO tags (name) VALUES (?) ON CONFLICT (name) DO UPDATE SET name = excluded.name \
                         RETURNING id",
                    )
                    .bind(t)
                    .fetch_one(&mut **tx)
                    .await
                    .map_err(sql)?;
                    new_tags.insert(t.clone(), tid);
                    tid
                }
            };
            tag_rows.push((id as i64, tid, *c as i64));
        }
    }
    for chunk in ch.inserted.chunks(INSERT_CHUNK) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO memories (id, key, value, created, last_access, access_count, crf, priority) ",
        );
        q.push_values(chunk, |mut b, m: &Memory| {
            b.push_bind(m.id as i64)
                .push_bind(f32_blob(&m.key))
                .push_bind(f32_blob(&m.value))
                .push_bind(m.created as i64)
                .push_bind(m.last_access as i64)
                .push_bind(m.access_count as i64)
                .push_bind(m.crf)
                .push_bind(memstore_api::math::priority(lambda, m.crf, m.last_access));
        });
        q.build().execute(&mut **tx).await.map_err(sql)?;
        if sql_knn {
            let mut q = QueryBuilder::<Sqlite>::new("INSERT INTO memory_keys (rowid, key) ");
            q.push_values(chunk, |mut b, m: &Memory| {
                b.push_bind(m.id as i64).push_bind(f32_blob(&m.key));
            });
            q.build().execute(&mut **tx).await.map_err(sql)?;
        }
    }
    for chunk in tag_rows.chunks(INSERT_CHUNK * 2) {
        let mut q = QueryBuilder::<Sqlite>::new("INSERT INTO memory_tags (memory_id, tag_id, count) ");
        q.push_values(chunk, |mut b, r| {
            b.push_bind(r.0).push_bind(r.1).push_bind(r.2);
        });
        q.build().execute(&mut **tx).await.map_err(sql)?;
    }
    let c = ch.counters;
    sqlx::query(
        "UPDATE memstore_meta SET next_id = ?, inserted = ?, merged = ?, evicted = ?, deleted = ?, last_batch = ? \
         WHERE id = 1",
    )
    .bind(ch.next_id as i64)
    .bind(c.inserted as i64)
    .bind(c.merged as i64)
    .bind(c.evicted as i64)
    .bind(c.deleted as i64)
    .bind(c.last_batch as i64)
    .execute(&mut **tx)
    .await
    .map_err(sql)?;
    Ok(new_tags)
}

#[async_trait]
impl DurableStore for SqliteStore {
    async fn backup_to(&self, dest: &Path) -> Result<()> {
        SqliteStore::backup_to(self, dest).await
    }

    async fn close(self) -> Result<()> {
        SqliteStore::close(self).await
    }
}

#[async_trait]
impl MemoryStore for SqliteStore {
    fn config(&self) -> &MemoryConfig {
        &self.config
    }

    async fn search(&self, queries: Vectors<'_>, k: usize, filter: Option<&TagFilter>) -> Result<Neighbors> {
        self.config.check_search(&queries, k)?;
        let index = self.index.read().await;
        let rows = cpu(|| index.search(queries, k, filter));
        let values = self
            .fetch_values(index.missing_values(rows.iter().flatten().map(|(_, id)| *id)))
            .await?;
        index.assemble(&rows, k, &values)
    }

    async fn insert(&self, batch: Batch<'_>, tick: Tick) -> Result<Vec<MemoryId>> {
        let mut tags = self.writer.lock().await;
        let (changes, ids) = {
            let index = self.index.read().await;
            let first = index.next_id();
            let changes = cpu(|| index.plan_insert(&batch, tick))?;
            (changes, (first..first + batch.len() as u64).collect())
        };
        self.commit(&mut tags, &changes).await?;
        Ok(ids)
    }

    async fn get(&self, ids: &[MemoryId]) -> Result<Vec<Memory>> {
        let index = self.index.read().await;
        index.check_ids(ids)?;
        let values = self.fetch_values(index.missing_values(ids.iter().copied())).await?;
        index.memories(ids, &values)
    }

    async fn delete(&self, ids: &[MemoryId]) -> Result<usize> {
        let mut tags = self.writer.lock().await;
        let changes = self.index.read().await.plan_delete(ids)?;
        self.commit(&mut tags, &changes).await?;
        Ok(changes.removed.len())
    }

    async fn update_values(&self, ids: &[MemoryId], deltas: Vectors<'_>) -> Result<()> {
        let mut tags = self.writer.lock().await;
        let changes = {
            let index = self.index.read().await;
            index.check_update_values(ids, deltas)?;
            let current = self.fetch_values(index.missing_values(ids.iter().copied())).await?;
            index.plan_update_values(ids, deltas, &current)?
        };
        self.commit(&mut tags, &changes).await
    }

    async fn touch(&self, ids: &[MemoryId], tick: Tick) -> Result<()> {
        let mut tags = self.writer.lock().await;
        let changes = self.index.read().await.plan_touch(ids, tick)?;
        self.commit(&mut tags, &changes).await
    }

    async fn learn(&self, batch: Batch<'_>, tick: Tick, k: usize) -> Result<Neighbors> {
        let mut tags = self.writer.lock().await;
        let stored;
        let (changes, pending) = {
            let index = self.index.read().await;
            let plan = cpu(|| index.plan_learn(batch, tick, k))?;
            stored = self.fetch_values(plan.needed_values()).await?;
            plan.split(&stored)?
        };
        let write = async {
            let mut tx = self.pool.begin().await.map_err(sql)?;
            let new_tags = persist(&mut tx, self.sql_knn, self.config.eviction.lambda(), &tags, &changes).await?;
            self.publish(tx, &mut tags, new_tags, &changes).await
        };
        // The output's 16 MB (at 4096 rows of 64-d keys and values) are
        // allocated and touched while SQLite writes and syncs.
        let (written, out) = pending.allocate_while(write).await;
        written?;
        let index = self.index.read().await;
        cpu(|| pending.fill(&index, out))
    }

    async fn evict(&self, target_len: usize) -> Result<usize> {
        let mut tags = self.writer.lock().await;
        let changes = self.index.read().await.plan_evict(target_len)?;
        if changes.is_empty() {
            return Ok(0);
        }
        self.commit(&mut tags, &changes).await?;
        Ok(changes.removed.len())
    }

    async fn apply(&self, batch: &ChangeBatch) -> Result<()> {
        let mut tags = self.writer.lock().await;
        let changes = {
            let index = self.index.read().await;
            let needed = index.check_apply(batch)?;
            let current = self.fetch_values(needed).await?;
            cpu(|| index.plan_apply(batch, &current))?
        };
        self.commit(&mut tags, &changes).await
    }

    async fn ids(&self) -> Result<Vec<MemoryId>> {
        let mut ids = self.index.read().await.ids().to_vec();
        ids.sort_unstable();
        Ok(ids)
    }

    async fn len(&self) -> Result<usize> {
        Ok(self.index.read().await.len())
    }

    async fn stats(&self) -> Result<Stats> {
        Ok(self.index.read().await.stats())
    }

    async fn flush(&self) -> Result<()> {
        let _w = self.writer.lock().await;
        sqlx::query("PRAGMA wal_checkpoint(FULL)")
            .execute(&self.pool)
            .await
            .map_err(sql)?;
        Ok(())
    }
}
