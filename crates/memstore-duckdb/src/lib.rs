//! # memstore-duckdb
//!
//! The DuckDB backend of memstore: a thin driver, like memstore-sqlite, that
//! persists the plans of [`memstore_api::index::MemoryIndex`] (the database is
//! the truth; the index is derived from it on open, searched exactly and in
//! parallel, and updated after each commit under its write lock).
//!
//! - **Schema** (`migrations/`, embedded): keys and values are fixed-size
//!   `FLOAT[dim]` arrays, so exact kNN works in plain SQL for ad-hoc queries
//!   (`array_distance`, `array_cosine_distance`, `array_inner_product`).
//!   DuckDB's VSS (HNSW) extension is not used: it is a download and its
//!   persistence is experimental upstream.
//! - **Writes**: one explicit transaction per batch; new rows and value
//!   updates go in as Arrow record batches through DuckDB's Appender
//!   (columnar, no per-row SQL), access updates through a staging table joined
//!   by one `UPDATE`. Every statement's row count is checked against the plan.
//! - **Reads**: by default the index keeps the values beside the keys
//!   ([`DuckdbOptions::resident_values`]) and searches read none; with that
//!   off, values are fetched by id on a second connection (DuckDB's MVCC
//!   shows it only committed data), as Arrow batches.
//!
//! - **Index kind**: [`DuckdbOptions::ann`] swaps the exact search for an
//!   approximate structure (memstore-index's HNSW), kept in step the same way
//!   and saved beside the database on close (see [`memstore_api::ann`]).
//!
//! One store owns a file at a time: opening takes an exclusive advisory lock on
//! `<path>.lock` (DuckDB's own lock does not stop a second open in the same
//! process); a second open fails with [`DuckdbError::Locked`].
//!
//! Linking: DuckDB is a large C++ library. By default this crate links DuckDB's
//! own prebuilt `libduckdb.so` (see `build.rs` and `scripts/fetch-libduckdb.sh`);
//! the `bundled` feature compiles it from source instead.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use duckdb::arrow::array::{Array, ArrayRef, FixedSizeListArray, Float32Array, Float64Array, Int64Array};
use duckdb::arrow::datatypes::{DataType, Field, Schema};
use duckdb::arrow::record_batch::RecordBatch;
use duckdb::{Connection, params};
use memstore_api::ann::{AnnBuilder, AnnStatus};
use memstore_api::index::{AccessUpdate, Changes, Meta};
use memstore_api::{
    Batch, ChangeBatch, Counters, DurableStore, Error, EvictionPolicy, Memory, MemoryConfig, MemoryId, MemoryStore,
    Metric, Neighbors, Result, Stats, TagFilter, Tick, Vectors,
};
use tokio::sync::{Mutex, RwLock};

pub use memstore_api::index::MemoryIndex;

/// The schema this crate writes (rows of `memstore_schema`).
const SCHEMA_VERSION: i64 = 1;
const SCHEMA_V1: &str = include_str!("../migrations/0001_memstore_init.sql");
/// Ids per `IN (...)` list.
const ID_CHUNK: usize = 4096;

/// Errors of the DuckDB driver; converted into [`memstore_api::Error::Storage`]
/// at the trait boundary, with this error as the source.
#[derive(Debug, thiserror::Error)]
pub enum DuckdbError {
    /// DuckDB failed.
    #[error("duckdb: {0}")]
    Sql(#[from] duckdb::Error),
    /// Building or reading an Arrow batch failed.
    #[error("arrow: {0}")]
    Arrow(#[from] duckdb::arrow::error::ArrowError),
    /// The file to open does not exist.
    #[error("no memstore database at {0}")]
    NotFound(PathBuf),
    /// Another store (in this or another process) has the file open.
    #[error("{0} is open in another store (lock file held); share a store between processes with memstored")]
    Locked(PathBuf),
    /// The lock file could not be created or locked.
    #[error("lock file {0}: {1}")]
    LockFile(PathBuf, #[source] std::io::Error),
    /// The file was written by a newer memstore.
    #[error("{path}: schema version {found}, this build reads up to {SCHEMA_VERSION}")]
    SchemaVersion {
        /// The database file.
        path: PathBuf,
        /// The version found in it.
        found: i64,
    },
}

impl From<DuckdbError> for Error {
    fn from(e: DuckdbError) -> Self {
        Error::storage(e)
    }
}

fn db(e: duckdb::Error) -> Error {
    Error::storage(DuckdbError::Sql(e))
}

fn arrow(e: duckdb::arrow::error::ArrowError) -> Error {
    Error::storage(DuckdbError::Arrow(e))
}

/// Runs blocking DuckDB work without stalling the async runtime's other tasks.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
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
        .map_err(|e| DuckdbError::LockFile(lock_path.clone(), e))?;
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
            Err(std::fs::TryLockError::WouldBlock) => return Err(DuckdbError::Locked(path.to_path_buf()).into()),
            Err(std::fs::TryLockError::Error(e)) => return Err(DuckdbError::LockFile(lock_path, e).into()),
        }
    }
}

/// How long an open waits for a lock held by someone else before failing.
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

/// The writer's connection and the tag-name → id map it keeps in sync.
struct Writer {
    conn: Connection,
    tags: HashMap<String, i64>,
}

/// Options of the DuckDB backend beyond the memory configuration.
#[derive(Clone, Debug)]
pub struct DuckdbOptions {
    /// The index kind: `None` (default) searches exactly; an approximate
    /// structure (e.g. memstore-index's `Hnsw`) is kept in step with the rows
    /// and saved beside the database as `<path>.<extension>` on close
    /// (see [`memstore_api::ann`]).
    pub ann: Option<Arc<dyn AnnBuilder>>,
    /// Keep every value in memory beside its key (on by default): searches,
    /// `get` and `learn` then read no values from the database. Costs
    /// `value_dim × 4` bytes of memory per memory, and reading the values
    /// on open.
    pub resident_values: bool,
}

impl Default for DuckdbOptions {
    fn default() -> Self {
        DuckdbOptions {
            ann: None,
            resident_values: true,
        }
    }
}

/// A memory store in one DuckDB file.
pub struct DuckdbStore {
    config: MemoryConfig,
    path: PathBuf,
    index: RwLock<MemoryIndex>,
    /// Where the approximate index is saved (`None` in exact mode).
    ann_file: Option<PathBuf>,
    writer: Mutex<Writer>,
    reader: Mutex<Connection>,
    /// Exclusive advisory lock on `<path>.lock`, held while the store is open.
    _lock: std::fs::File,
}

impl DuckdbStore {
    /// Opens the store at `path`, creating it with `config` if it does not
    /// exist. An existing store must have the same dimensions and metric;
    /// its tunable fields (capacity, thresholds, λ) are updated to `config`.
    pub async fn open(path: impl AsRef<Path>, config: MemoryConfig) -> Result<Self> {
        Self::open_with(path, config, DuckdbOptions::default()).await
    }

    /// [`DuckdbStore::open`] with backend options.
    pub async fn open_with(path: impl AsRef<Path>, config: MemoryConfig, options: DuckdbOptions) -> Result<Self> {
        config.validate()?;
        let path = path.as_ref().to_path_buf();
        blocking(move || Self::open_sync(&path, Some(config), options))
    }

    /// Opens an existing store with the configuration persisted in it.
    pub async fn open_existing(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_existing_with(path, DuckdbOptions::default()).await
    }

    /// [`DuckdbStore::open_existing`] with backend options.
    pub async fn open_existing_with(path: impl AsRef<Path>, options: DuckdbOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if !path.exists() {
            return Err(DuckdbError::NotFound(path).into());
        }
        blocking(move || Self::open_sync(&path, None, options))
    }

    fn open_sync(path: &Path, config: Option<MemoryConfig>, options: DuckdbOptions) -> Result<Self> {
        let lock = lock_file(path)?;
        let mut conn = Connection::open(path).map_err(db)?;
        let tx = conn.transaction().map_err(db)?;
        let has_schema: i64 = tx
            .query_row(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'main' \
                 AND table_name = 'memstore_schema'",
                [],
                |r| r.get(0),
            )
            .map_err(db)?;
        let stored = if has_schema == 0 {
            None
        } else {
            let found: i64 = tx
                .query_row("SELECT max(version) FROM memstore_schema", [], |r| r.get(0))
                .map_err(db)?;
            if found > SCHEMA_VERSION {
                return Err(DuckdbError::SchemaVersion {
                    path: path.to_path_buf(),
                    found,
                }
                .into());
            }
            read_config(&tx)?
        };
        let (config, lambda_changed) = match (stored, config) {
            (None, None) => {
                return Err(Error::Corrupt(format!(
                    "{} has no memstore configuration",
                    path.display()
                )));
            }
            (None, Some(c)) => {
                // Only integers are interpolated into the DDL.
                let ddl = SCHEMA_V1
                    .replace("{key_dim}", &c.key_dim.to_string())
                    .replace("{value_dim}", &c.value_dim.to_string());
                tx.execute_batch(&ddl).map_err(db)?;
                write_config(&tx, &c, true)?;
                (c, false)
            }
            (Some(s), None) => (s, false),
            (Some(s), Some(c)) => {
                c.check_compatible(&s)?;
                let changed = s.eviction.lambda() != c.eviction.lambda();
                if s != c {
                    write_config(&tx, &c, false)?;
                }
                (c, changed)
            }
        };
        let mut index = load_index(&tx, &config, options.resident_values)?;
        if lambda_changed {
            // The priority column depends on λ: recompute it for the new policy.
            let lambda = config.eviction.lambda();
            let updates: Vec<AccessUpdate> = index
                .ids()
                .iter()
                .filter_map(|&id| {
                    index.meta(id).map(|m| AccessUpdate {
                        id,
                        last_access: m.last_access,
                        access_count: m.access_count,
                        crf: m.crf,
                        priority: memstore_api::math::priority(lambda, m.crf, m.last_access),
                    })
                })
                .collect();
            update_access(&tx, &updates)?;
        }
        let mut tags = HashMap::new();
        {
            let mut st = tx.prepare("SELECT id, name FROM tags").map_err(db)?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
                .map_err(db)?;
            for r in rows {
                let (id, name) = r.map_err(db)?;
                tags.insert(name, id);
            }
        }
        tx.commit().map_err(db)?;
        let reader = conn.try_clone().map_err(db)?;
        let ann_file = match options.ann {
            Some(builder) => {
                let file = memstore_api::ann::saved_path(path, builder.as_ref());
                index.attach_ann(builder, Some(&file))?;
                Some(file)
            }
            None => None,
        };
        Ok(DuckdbStore {
            config,
            path: path.to_path_buf(),
            index: RwLock::new(index),
            ann_file,
            writer: Mutex::new(Writer { conn, tags }),
            reader: Mutex::new(reader),
            _lock: lock,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a read-only SQL query on the committed state (ad-hoc inspection,
    /// SQL kNN with `array_distance`); `f` gets the reader connection.
    /// Writes behind the store's back are not seen by its index: do not write.
    pub async fn with_reader<R>(&self, f: impl FnOnce(&Connection) -> duckdb::Result<R>) -> Result<R> {
        let conn = self.reader.lock().await;
        blocking(|| f(&conn)).map_err(db)
    }

    /// Writes a consistent copy of the committed store to `dest` (a new DuckDB
    /// file: `ATTACH` + `COPY FROM DATABASE`). `dest` must not exist. Used
    /// for training checkpoints: reopening the copy gives the store as it was.
    pub async fn backup_to(&self, dest: impl AsRef<Path>) -> Result<()> {
        let dest = dest.as_ref();
        if dest.exists() {
            return Err(Error::storage(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} already exists", dest.display()),
            )));
        }
        let w = self.writer.lock().await;
        blocking(|| {
            let name: String = w
                .conn
                .query_row("SELECT current_database()", [], |r| r.get(0))
                .map_err(db)?;
            let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
            let ident = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
            let sql = format!(
                "ATTACH {} AS memstore_backup; COPY FROM DATABASE {} TO memstore_backup; DETACH memstore_backup;",
                lit(&dest.to_string_lossy()),
                ident(&name)
            );
            let done = w.conn.execute_batch(&sql).map_err(db);
            if done.is_err() {
                let _ = w.conn.execute_batch("DETACH DATABASE IF EXISTS memstore_backup");
            }
            done
        })
    }

    /// Saves the approximate index beside the database (`<path>.<ext>`) with
    /// the fingerprint of the committed rows, so that the next open loads it
    /// instead of rebuilding. Nothing to do in exact mode.
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

    /// Closes the store, checkpointing the WAL into the database file, after
    /// saving the approximate index (if any; a failed save leaves the old
    /// file, which the next open finds stale and rebuilds from the rows).
    pub async fn close(self) -> Result<()> {
        let _ = self.save_index().await;
        let w = self.writer.into_inner();
        let r = self.reader.into_inner();
        blocking(move || {
            w.conn.execute_batch("CHECKPOINT").map_err(db)?;
            drop(r);
            w.conn.close().map_err(|(_, e)| db(e))
        })
    }

    /// Values of `ids` (deduplicated), read from the committed state.
    async fn fetch_values(&self, ids: impl IntoIterator<Item = MemoryId>) -> Result<HashMap<MemoryId, Vec<f32>>> {
        let ids: BTreeSet<MemoryId> = ids.into_iter().collect();
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<MemoryId> = ids.into_iter().collect();
        let conn = self.reader.lock().await;
        let dim = self.config.value_dim;
        let out = blocking(|| -> Result<HashMap<MemoryId, Vec<f32>>> {
            let mut out = HashMap::with_capacity(ids.len());
            for chunk in ids.chunks(ID_CHUNK) {
                let sql = format!("SELECT id, value FROM memories WHERE id IN ({})", id_list(chunk));
                let mut st = conn.prepare(&sql).map_err(db)?;
                for batch in st.query_arrow([]).map_err(db)? {
                    let id_col = int64(&batch, 0)?;
                    let values = FloatRows::new(&batch, 1, dim, "value")?;
                    for i in 0..batch.num_rows() {
                        let id = id_col.value(i);
                        out.insert(id as u64, values.row(i, id)?.to_vec());
                    }
                }
            }
            Ok(out)
        })?;
        if let Some(missing) = ids.iter().find(|id| !out.contains_key(id)) {
            return Err(Error::Corrupt(format!("memory {missing} is indexed but has no row")));
        }
        Ok(out)
    }

    /// Persists `changes` in one transaction, then applies them to the index
    /// under its write lock (so no search sees the commit half-applied).
    async fn commit(&self, w: &mut Writer, changes: &Changes) -> Result<()> {
        let lambda = self.config.eviction.lambda();
        let (key_dim, value_dim) = (self.config.key_dim, self.config.value_dim);
        let new_tags = blocking(|| -> Result<HashMap<String, i64>> {
            w.conn.execute_batch("BEGIN TRANSACTION").map_err(db)?;
            match persist(&w.conn, key_dim, value_dim, lambda, &w.tags, changes) {
                Ok(t) => Ok(t),
                Err(e) => {
                    let _ = w.conn.execute_batch("ROLLBACK");
                    Err(e)
                }
            }
        })?;
        let mut index = self.index.write().await;
        blocking(|| match w.conn.execute_batch("COMMIT") {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = w.conn.execute_batch("ROLLBACK");
                Err(db(e))
            }
        })?;
        w.tags.extend(new_tags);
        index.apply(changes)
    }
}

/// A comma-separated list of ids for `IN (...)` (integers only).
fn id_list(ids: &[MemoryId]) -> String {
    let mut s = String::with_capacity(ids.len() * 8);
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&(*id as i64).to_string());
    }
    s
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, i: usize, what: &str) -> Result<&'a T> {
    batch.column(i).as_any().downcast_ref::<T>().ok_or_else(|| {
        Error::Corrupt(format!(
            "column {i} is {}, expected {what}",
            batch.column(i).data_type()
        ))
    })
}

fn int64(batch: &RecordBatch, i: usize) -> Result<&Int64Array> {
    column(batch, i, "BIGINT")
}

fn float64(batch: &RecordBatch, i: usize) -> Result<&Float64Array> {
    column(batch, i, "DOUBLE")
}

/// Rows of a `FLOAT[dim]` column of an Arrow batch.
struct FloatRows<'a> {
    list: &'a FixedSizeListArray,
    floats: &'a Float32Array,
    dim: usize,
    what: &'static str,
}

impl<'a> FloatRows<'a> {
    fn new(batch: &'a RecordBatch, i: usize, dim: usize, what: &'static str) -> Result<Self> {
        let list: &FixedSizeListArray = column(batch, i, "FLOAT[]")?;
        if list.value_length() as usize != dim {
            return Err(Error::Corrupt(format!(
                "{what} column holds FLOAT[{}], the store's dimension is {dim}",
                list.value_length()
            )));
        }
        let floats = list
            .values()
            .as_any()
            .downcast_ref::<Float32Array>()
            .ok_or_else(|| Error::Corrupt(format!("{what} column is not FLOAT[]")))?;
        Ok(FloatRows {
            list,
            floats,
            dim,
            what,
        })
    }

    fn row(&self, i: usize, id: i64) -> Result<&'a [f32]> {
        let start = self.list.value_offset(i) as usize;
        let has_null = self.floats.null_count() > 0 && (start..start + self.dim).any(|j| self.floats.is_null(j));
        if self.list.is_null(i) || has_null {
            return Err(Error::Corrupt(format!("memory {id}: {} has NULL entries", self.what)));
        }
        Ok(&self.floats.values()[start..start + self.dim])
    }
}

/// A `FLOAT[dim]` Arrow column from row-major floats.
fn float_list(rows: impl Iterator<Item = f32>, dim: usize) -> Result<ArrayRef> {
    let values: ArrayRef = Arc::new(Float32Array::from_iter_values(rows));
    let field = Arc::new(Field::new("item", DataType::Float32, true));
    let size = i32::try_from(dim).map_err(|_| Error::Corrupt(format!("dimension {dim} too large for DuckDB")))?;
    Ok(Arc::new(
        FixedSizeListArray::try_new(field, size, values, None).map_err(arrow)?,
    ))
}

fn record_batch(columns: Vec<(&str, ArrayRef)>) -> Result<RecordBatch> {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
        .collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .map_err(arrow)
}

fn read_config(conn: &Connection) -> Result<Option<MemoryConfig>> {
    let mut st = conn
        .prepare("SELECT key_dim, value_dim, metric, capacity, lrfu_lambda, novelty, recombine FROM memstore_config")
        .map_err(db)?;
    let mut rows = st.query([]).map_err(db)?;
    let Some(r) = rows.next().map_err(db)? else {
        return Ok(None);
    };
    let metric: String = r.get(2).map_err(db)?;
    let metric = Metric::parse(&metric).ok_or_else(|| Error::Corrupt(format!("unknown metric {metric:?}")))?;
    let dim = |v: i64, what: &str| usize::try_from(v).map_err(|_| Error::Corrupt(format!("{what} = {v}")));
    let capacity: Option<i64> = r.get(3).map_err(db)?;
    let config = MemoryConfig {
        key_dim: dim(r.get(0).map_err(db)?, "key_dim")?,
        value_dim: dim(r.get(1).map_err(db)?, "value_dim")?,
        metric,
        capacity: capacity.map(|c| dim(c, "capacity")).transpose()?,
        eviction: EvictionPolicy::Lrfu {
            lambda: r.get(4).map_err(db)?,
        },
        novelty: r.get::<_, f64>(5).map_err(db)? as f32,
        recombine: r.get::<_, f64>(6).map_err(db)? as f32,
    };
    config
        .validate()
        .map_err(|e| Error::Corrupt(format!("stored configuration: {e}")))?;
    Ok(Some(config))
}

fn write_config(conn: &Connection, c: &MemoryConfig, create: bool) -> Result<()> {
    let q = if create {
        "INSERT INTO memstore_config (key_dim, value_dim, metric, capacity, lrfu_lambda, novelty, recombine, id) \
         VALUES (?, ?, ?, ?, ?, ?, ?, 1)"
    } else {
        "UPDATE memstore_config SET key_dim = ?, value_dim = ?, metric = ?, capacity = ?, lrfu_lambda = ?, \
         novelty = ?, recombine = ? WHERE id = 1"
    };
    conn.execute(
        q,
        params![
            c.key_dim as i64,
            c.value_dim as i64,
            c.metric.as_str(),
            c.capacity.map(|x| x as i64),
            c.eviction.lambda(),
            c.novelty as f64,
            c.recombine as f64
        ],
    )
    .map_err(db)?;
    Ok(())
}

fn load_index(conn: &Connection, config: &MemoryConfig, values: bool) -> Result<MemoryIndex> {
    let mut index = MemoryIndex::new(config.clone());
    if values {
        index = index.with_values();
    }
    let (next_id, counters) = conn
        .query_row(
            "SELECT next_id, inserted, merged, evicted, deleted, last_batch FROM memstore_meta WHERE id = 1",
            [],
            |r| {
                let g = |i: usize| r.get::<_, i64>(i).map(|x| x as u64);
                Ok((
                    g(0)?,
                    Counters {
                        inserted: g(1)?,
                        merged: g(2)?,
                        evicted: g(3)?,
                        deleted: g(4)?,
                        last_batch: g(5)?,
                    },
                ))
            },
        )
        .map_err(|e| match e {
            duckdb::Error::QueryReturnedNoRows => Error::Corrupt("memstore_meta row is missing".into()),
            e => db(e),
        })?;
    let mut tags: HashMap<i64, BTreeMap<String, u64>> = HashMap::new();
    {
        let mut st = conn
            .prepare("SELECT mt.memory_id, t.name, mt.count FROM memory_tags mt JOIN tags t ON t.id = mt.tag_id")
            .map_err(db)?;
        let rows = st
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
            })
            .map_err(db)?;
        for r in rows {
            let (id, name, count) = r.map_err(db)?;
            tags.entry(id).or_default().insert(name, count as u64);
        }
    }
    let mut st = conn
        .prepare(if values {
            "SELECT id, key, created, last_access, access_count, crf, value FROM memories ORDER BY id"
        } else {
            "SELECT id, key, created, last_access, access_count, crf FROM memories ORDER BY id"
        })
        .map_err(db)?;
    for batch in st.query_arrow([]).map_err(db)? {
        let ids = int64(&batch, 0)?;
        let keys = FloatRows::new(&batch, 1, config.key_dim, "key")?;
        let vals = if values {
            Some(FloatRows::new(&batch, 6, config.value_dim, "value")?)
        } else {
            None
        };
        let (created, last, count, crf) = (
            int64(&batch, 2)?,
            int64(&batch, 3)?,
            int64(&batch, 4)?,
            float64(&batch, 5)?,
        );
        for i in 0..batch.num_rows() {
            let id = ids.value(i);
            let key = keys.row(i, id)?;
            if key.iter().any(|x| !x.is_finite()) {
                return Err(Error::Corrupt(format!("memory {id} has a non-finite key")));
            }
            let c = crf.value(i);
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::Corrupt(format!("memory {id} has crf {c}")));
            }
            let m = Meta {
                created: created.value(i) as u64,
                last_access: last.value(i) as u64,
                access_count: count.value(i) as u64,
                crf: c,
                tags: tags.remove(&id).unwrap_or_default(),
            };
            let value = vals.as_ref().map(|v| v.row(i, id)).transpose()?;
            index.load(id as u64, key, value, m)?;
        }
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
fn expect_rows(done: usize, what: &str, want: usize) -> Result<()> {
    if done != want {
        return Err(Error::Corrupt(format!(
            "{what} changed {done} rows where the index expected {want}"
        )));
    }
    Ok(())
}

/// Appends an Arrow batch to `table` inside the connection's transaction.
fn append(conn: &Connection, table: &str, batch: RecordBatch) -> Result<()> {
    let mut app = conn.appender(table).map_err(db)?;
    app.append_record_batch(batch).map_err(db)?;
    app.flush().map_err(db)
}

fn update_access(conn: &Connection, updates: &[AccessUpdate]) -> Result<()> {
    if updates.is_empty() {
        return Ok(());
    }
    let batch = record_batch(vec![
        (
            "id",
            Arc::new(Int64Array::from_iter_values(updates.iter().map(|u| u.id as i64))) as ArrayRef,
        ),
        (
            "last_access",
            Arc::new(Int64Array::from_iter_values(
                updates.iter().map(|u| u.last_access as i64),
            )),
        ),
        (
            "access_count",
            Arc::new(Int64Array::from_iter_values(
                updates.iter().map(|u| u.access_count as i64),
            )),
        ),
        (
            "crf",
            Arc::new(Float64Array::from_iter_values(updates.iter().map(|u| u.crf))),
        ),
        (
            "priority",
            Arc::new(Float64Array::from_iter_values(updates.iter().map(|u| u.priority))),
        ),
    ])?;
    append(conn, "memstore_stage_access", batch)?;
    let done = conn
        .execute(
            "UPDATE memories SET last_access = s.last_access, access_count = s.access_count, crf = s.crf, \
             priority = s.priority FROM memstore_stage_access s WHERE memories.id = s.id",
            [],
        )
        .map_err(db)?;
    expect_rows(done, "access update", updates.len())?;
    conn.execute("DELETE FROM memstore_stage_access", []).map_err(db)?;
    Ok(())
}

/// Writes `changes` inside the open transaction. Returns tags created (their
/// ids become valid only once the transaction commits).
fn persist(
    conn: &Connection,
    key_dim: usize,
    value_dim: usize,
    lambda: f64,
    tag_ids: &HashMap<String, i64>,
    ch: &Changes,
) -> Result<HashMap<String, i64>> {
    for chunk in ch.removed.chunks(ID_CHUNK) {
        let list = id_list(chunk);
        let done = conn
            .execute(&format!("DELETE FROM memories WHERE id IN ({list})"), [])
            .map_err(db)?;
        expect_rows(done, "delete", chunk.len())?;
        conn.execute(&format!("DELETE FROM memory_tags WHERE memory_id IN ({list})"), [])
            .map_err(db)?;
    }
    update_access(conn, &ch.accessed)?;
    if !ch.values.is_empty() {
        let batch = record_batch(vec![
            (
                "id",
                Arc::new(Int64Array::from_iter_values(ch.values.iter().map(|(id, _)| *id as i64))) as ArrayRef,
            ),
            (
                "value",
                float_list(ch.values.iter().flat_map(|(_, v)| v.iter().copied()), value_dim)?,
            ),
        ])?;
        append(conn, "memstore_stage_values", batch)?;
        let done = conn
            .execute(
                "UPDATE memories SET value = s.value FROM memstore_stage_values s WHERE memories.id = s.id",
                [],
            )
            .map_err(db)?;
        expect_rows(done, "value update", ch.values.len())?;
        conn.execute("DELETE FROM memstore_stage_values", []).map_err(db)?;
    }
    let mut new_tags: HashMap<String, i64> = HashMap::new();
    let mut tag_rows: Vec<(i64, i64, i64)> = Vec::new();
    let mut next_tag = tag_ids.values().copied().max().unwrap_or(0) + 1;
    // Retagged memories get their tag rows rewritten whole.
    for chunk in ch.retagged.chunks(ID_CHUNK) {
        let ids: Vec<MemoryId> = chunk.iter().map(|(id, _)| *id).collect();
        conn.execute(
            &format!("DELETE FROM memory_tags WHERE memory_id IN ({})", id_list(&ids)),
            [],
        )
        .map_err(db)?;
    }
    for (id, tags) in ch.tag_rows() {
        for (t, c) in tags {
            let tid = match tag_ids.get(t).or_else(|| new_tags.get(t)) {
                Some(&tid) => tid,
                None => {
                    let tid = next_tag;
                    next_tag += 1;
                    conn.execute("INSERT INTO tags (id, name) VALUES (?, ?)", params![tid, t])
                        .map_err(db)?;
                    new_tags.insert(t.clone(), tid);
                    tid
                }
            };
            tag_rows.push((id as i64, tid, *c as i64));
        }
    }
    if !ch.inserted.is_empty() {
        let ins = &ch.inserted;
        let batch = record_batch(vec![
            (
                "id",
                Arc::new(Int64Array::from_iter_values(ins.iter().map(|m| m.id as i64))) as ArrayRef,
            ),
            (
                "key",
                float_list(ins.iter().flat_map(|m| m.key.iter().copied()), key_dim)?,
            ),
            (
                "value",
                float_list(ins.iter().flat_map(|m| m.value.iter().copied()), value_dim)?,
            ),
            (
                "created",
                Arc::new(Int64Array::from_iter_values(ins.iter().map(|m| m.created as i64))),
            ),
            (
                "last_access",
                Arc::new(Int64Array::from_iter_values(ins.iter().map(|m| m.last_access as i64))),
            ),
            (
                "access_count",
                Arc::new(Int64Array::from_iter_values(ins.iter().map(|m| m.access_count as i64))),
            ),
            (
                "crf",
                Arc::new(Float64Array::from_iter_values(ins.iter().map(|m| m.crf))),
            ),
            (
                "priority",
                Arc::new(Float64Array::from_iter_values(
                    ins.iter()
                        .map(|m| memstore_api::math::priority(lambda, m.crf, m.last_access)),
                )),
            ),
        ])?;
        append(conn, "memories", batch)?;
    }
    if !tag_rows.is_empty() {
        let batch = record_batch(vec![
            (
                "memory_id",
                Arc::new(Int64Array::from_iter_values(tag_rows.iter().map(|r| r.0))) as ArrayRef,
            ),
            (
                "tag_id",
                Arc::new(Int64Array::from_iter_values(tag_rows.iter().map(|r| r.1))),
            ),
            (
                "count",
                Arc::new(Int64Array::from_iter_values(tag_rows.iter().map(|r| r.2))),
            ),
        ])?;
        append(conn, "memory_tags", batch)?;
    }
    let c = ch.counters;
    conn.execute(
        "UPDATE memstore_meta SET next_id = ?, inserted = ?, merged = ?, evicted = ?, deleted = ?, last_batch = ? \
         WHERE id = 1",
        params![
            ch.next_id as i64,
            c.inserted as i64,
            c.merged as i64,
            c.evicted as i64,
            c.deleted as i64,
            c.last_batch as i64
        ],
    )
    .map_err(db)?;
    Ok(new_tags)
}

#[async_trait]
impl DurableStore for DuckdbStore {
    async fn backup_to(&self, dest: &Path) -> Result<()> {
        DuckdbStore::backup_to(self, dest).await
    }

    async fn close(self) -> Result<()> {
        DuckdbStore::close(self).await
    }
}

#[async_trait]
impl MemoryStore for DuckdbStore {
    fn config(&self) -> &MemoryConfig {
        &self.config
    }

    async fn search(&self, queries: Vectors<'_>, k: usize, filter: Option<&TagFilter>) -> Result<Neighbors> {
        self.config.check_search(&queries, k)?;
        let index = self.index.read().await;
        let rows = blocking(|| index.search(queries, k, filter));
        let values = self
            .fetch_values(index.missing_values(rows.iter().flatten().map(|(_, id)| *id)))
            .await?;
        index.assemble(&rows, k, &values)
    }

    async fn insert(&self, batch: Batch<'_>, tick: Tick) -> Result<Vec<MemoryId>> {
        let mut w = self.writer.lock().await;
        let (changes, ids) = {
            let index = self.index.read().await;
            let first = index.next_id();
            let changes = blocking(|| index.plan_insert(&batch, tick))?;
            (changes, (first..first + batch.len() as u64).collect())
        };
        self.commit(&mut w, &changes).await?;
        Ok(ids)
    }

    async fn get(&self, ids: &[MemoryId]) -> Result<Vec<Memory>> {
        let index = self.index.read().await;
        index.check_ids(ids)?;
        let values = self.fetch_values(index.missing_values(ids.iter().copied())).await?;
        index.memories(ids, &values)
    }

    async fn delete(&self, ids: &[MemoryId]) -> Result<usize> {
        let mut w = self.writer.lock().await;
        let changes = self.index.read().await.plan_delete(ids)?;
        self.commit(&mut w, &changes).await?;
        Ok(changes.removed.len())
    }

    async fn update_values(&self, ids: &[MemoryId], deltas: Vectors<'_>) -> Result<()> {
        let mut w = self.writer.lock().await;
        let changes = {
            let index = self.index.read().await;
            index.check_update_values(ids, deltas)?;
            let current = self.fetch_values(index.missing_values(ids.iter().copied())).await?;
            index.plan_update_values(ids, deltas, &current)?
        };
        self.commit(&mut w, &changes).await
    }

    async fn touch(&self, ids: &[MemoryId], tick: Tick) -> Result<()> {
        let mut w = self.writer.lock().await;
        let changes = self.index.read().await.plan_touch(ids, tick)?;
        self.commit(&mut w, &changes).await
    }

    async fn learn(&self, batch: Batch<'_>, tick: Tick, k: usize) -> Result<Neighbors> {
        let mut w = self.writer.lock().await;
        let stored;
        let (changes, pending) = {
            let index = self.index.read().await;
            let plan = blocking(|| index.plan_learn(batch, tick, k))?;
            stored = self.fetch_values(plan.needed_values()).await?;
            plan.split(&stored)?
        };
        // The output (16 MB at 4096 rows of 64-d keys and values) is
        // allocated and touched while DuckDB writes, and filled after.
        let write = self.commit(&mut w, &changes);
        let (written, out) = pending.allocate_while(write).await;
        written?;
        let index = self.index.read().await;
        blocking(|| pending.fill(&index, out))
    }

    async fn evict(&self, target_len: usize) -> Result<usize> {
        let mut w = self.writer.lock().await;
        let changes = self.index.read().await.plan_evict(target_len)?;
        if changes.is_empty() {
            return Ok(0);
        }
        self.commit(&mut w, &changes).await?;
        Ok(changes.removed.len())
    }

    async fn apply(&self, batch: &ChangeBatch) -> Result<()> {
        let mut w = self.writer.lock().await;
        let changes = {
            let index = self.index.read().await;
            let needed = index.check_apply(batch)?;
            let current = self.fetch_values(needed).await?;
            blocking(|| index.plan_apply(batch, &current))?
        };
        self.commit(&mut w, &changes).await
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
        let w = self.writer.lock().await;
        blocking(|| w.conn.execute_batch("CHECKPOINT").map_err(db))
    }
}
