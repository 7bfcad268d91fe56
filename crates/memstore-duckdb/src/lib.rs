//! # memstore-duckdb
//!
//! The DuckDB backend of memstore: [`DuckdbDriver`], a thin driver under the
//! store core of memstore-engine ([`SqlStore`]), like memstore-sqlite.
//! [`DuckdbStore`] is the core on this driver (the database is the truth;
//! the core's index is derived from it on open, searched exactly and in
//! parallel, and updated after each commit under its write lock); this crate
//! holds only what is specific to DuckDB.
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
//!   ([`IndexOptions::resident_values`]) and searches read none; with that
//!   off, values are fetched by id on a second connection (DuckDB's MVCC
//!   shows it only committed data), as Arrow batches.
//!
//! - **Index kind**: [`IndexOptions::ann`] swaps the exact search for an
//!   approximate structure (memstore-index's HNSW), kept in step the same way
//!   and saved beside the database on close (see [`memstore_engine::ann`]).
//!
//! One store owns a file at a time: opening takes an exclusive advisory lock on
//! `<path>.lock` (DuckDB's own lock does not stop a second open in the same
//! process); a second open fails with [`FileError::Locked`].
//!
//! Linking: DuckDB is a large C++ library. By default this crate links DuckDB's
//! own prebuilt `libduckdb.so` (see `build.rs` and `scripts/fetch-libduckdb.sh`);
//! the `bundled` feature compiles it from source instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use duckdb::arrow::array::{Array, ArrayRef, FixedSizeListArray, Float32Array, Float64Array, Int64Array};
use duckdb::arrow::datatypes::{DataType, Field, Schema};
use duckdb::arrow::record_batch::RecordBatch;
use duckdb::{Connection, params};
use memstore_api::{Counters, Error, MemoryConfig, MemoryId, Result};
use memstore_engine::ann::AnnBuilder;
use memstore_engine::driver::{self, ConfigWrite, Loader, StoredConfig, expect_rows};
use memstore_engine::index::{AccessUpdate, Changes};
use memstore_engine::{Driver, MemoryIndex, Opened, blocking};
use tokio::sync::Mutex;

pub use memstore_engine::driver::FileError;
pub use memstore_engine::{IndexOptions, SqlStore};

/// A memory store in one DuckDB file: the store core on [`DuckdbDriver`].
pub type DuckdbStore = SqlStore<DuckdbDriver>;

/// The schema this crate writes (rows of `memstore_schema`).
const SCHEMA_VERSION: i64 = 1;
const SCHEMA_V1: &str = include_str!("../migrations/0001_memstore_init.sql");
/// Ids per `IN (...)` list.
const ID_CHUNK: usize = 4096;

/// Errors of the DuckDB driver; converted into [`memstore_api::Error::Storage`]
/// at the trait boundary, with this error as the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DuckdbError {
    /// DuckDB failed.
    #[error("duckdb: {0}")]
    Sql(#[from] duckdb::Error),
    /// Building or reading an Arrow batch failed.
    #[error("arrow: {0}")]
    Arrow(#[from] duckdb::arrow::error::ArrowError),
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

/// Options of the DuckDB backend beyond the memory configuration.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct DuckdbOptions {
    /// The index: its kind (exact by default, or an approximate structure
    /// saved beside the database as `<path>.<extension>`) and whether values
    /// stay in memory beside the keys (by default).
    pub index: IndexOptions,
}

memstore_engine::driver_options!(DuckdbOptions);

/// The DuckDB driver: a reader connection for values and ad-hoc SQL (the
/// writer's connection is the core's [`DuckdbWriter`]), and the lock that
/// makes this store the file's only owner.
pub struct DuckdbDriver {
    path: PathBuf,
    key_dim: usize,
    value_dim: usize,
    lambda: f64,
    reader: Mutex<Connection>,
    /// Exclusive advisory lock on `<path>.lock`, held while the store is open.
    _lock: std::fs::File,
}

/// The writer's connection and the tag-name → id map it keeps in sync.
pub struct DuckdbWriter {
    conn: Connection,
    tags: HashMap<String, i64>,
}

/// A written, uncommitted DuckDB transaction: the tags it created. The
/// transaction itself is open on the writer's connection; one left open by a
/// write that never reached its commit is rolled back by the next write.
pub struct DuckdbPending {
    new_tags: HashMap<String, i64>,
}

impl DuckdbDriver {
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

    fn open_sync(path: PathBuf, config: Option<MemoryConfig>, options: DuckdbOptions) -> Result<Opened<Self>> {
        if config.is_none() {
            driver::require_file(&path)?;
        }
        let lock = driver::lock_file(&path)?;
        let mut conn = Connection::open(&path).map_err(db)?;
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
                return Err(DuckdbError::SchemaVersion { path, found }.into());
            }
            read_config(&tx)?
        };
        let r = driver::resolve_config(stored, config, &path.display().to_string())?;
        match r.write {
            ConfigWrite::Create => {
                // Only integers are interpolated into the DDL.
                let ddl = SCHEMA_V1
                    .replace("{key_dim}", &r.config.key_dim.to_string())
                    .replace("{value_dim}", &r.config.value_dim.to_string());
                tx.execute_batch(&ddl).map_err(db)?;
                write_config(&tx, &r.config, true)?;
            }
            ConfigWrite::Update => write_config(&tx, &r.config, false)?,
            ConfigWrite::Keep => {}
        }
        let index = load_index(&tx, &r.config, options.index.resident_values)?;
        if r.lambda_changed {
            // The priority column depends on λ: recompute it for the new policy.
            update_access(&tx, &driver::reprioritised(&index))?;
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
        Ok(Opened {
            driver: DuckdbDriver {
                path,
                key_dim: r.config.key_dim,
                value_dim: r.config.value_dim,
                lambda: r.config.eviction.lambda(),
                reader: Mutex::new(reader),
                _lock: lock,
            },
            writer: DuckdbWriter { conn, tags },
            config: r.config,
            index,
            version: 0,
        })
    }
}

#[async_trait]
impl Driver for DuckdbDriver {
    type Options = DuckdbOptions;
    type Location = PathBuf;
    type Writer = DuckdbWriter;
    type Pending = DuckdbPending;
    type Txn = ();

    async fn open(path: PathBuf, config: Option<MemoryConfig>, options: DuckdbOptions) -> Result<Opened<Self>> {
        blocking(move || Self::open_sync(path, config, options))
    }

    fn ann_path(&self, builder: &dyn AnnBuilder) -> Option<PathBuf> {
        Some(memstore_engine::ann::saved_path(&self.path, builder))
    }

    async fn fetch_values(&self, ids: &[MemoryId]) -> Result<HashMap<MemoryId, Vec<f32>>> {
        let conn = self.reader.lock().await;
        let dim = self.value_dim;
        blocking(|| {
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
        })
    }

    async fn write(&self, w: &mut DuckdbWriter, _txn: (), changes: &Changes) -> Result<DuckdbPending> {
        blocking(|| {
            if !w.conn.is_autocommit() {
                // A write whose caller went away before its commit.
                w.conn.execute_batch("ROLLBACK").map_err(db)?;
            }
            w.conn.execute_batch("BEGIN TRANSACTION").map_err(db)?;
            match persist(&w.conn, self.key_dim, self.value_dim, self.lambda, &w.tags, changes) {
                Ok(new_tags) => Ok(DuckdbPending { new_tags }),
                Err(e) => {
                    let _ = w.conn.execute_batch("ROLLBACK");
                    Err(e)
                }
            }
        })
    }

    async fn commit(&self, w: &mut DuckdbWriter, pending: DuckdbPending) -> Result<()> {
        blocking(|| match w.conn.execute_batch("COMMIT") {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = w.conn.execute_batch("ROLLBACK");
                Err(db(e))
            }
        })?;
        w.tags.extend(pending.new_tags);
        Ok(())
    }

    async fn checkpoint(&self, w: &mut DuckdbWriter) -> Result<()> {
        blocking(|| w.conn.execute_batch("CHECKPOINT").map_err(db))
    }

    /// A new DuckDB file: `ATTACH` + `COPY FROM DATABASE`.
    async fn backup_to(&self, w: &mut DuckdbWriter, dest: &Path) -> Result<()> {
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

    /// Checkpoints the WAL into the database file and closes both connections.
    async fn close(self, w: DuckdbWriter) -> Result<()> {
        let r = self.reader.into_inner();
        blocking(move || {
            w.conn.execute_batch("CHECKPOINT").map_err(db)?;
            drop(r);
            w.conn.close().map_err(|(_, e)| db(e))
        })
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
    let row = StoredConfig {
        key_dim: r.get(0).map_err(db)?,
        value_dim: r.get(1).map_err(db)?,
        metric: r.get(2).map_err(db)?,
        capacity: r.get(3).map_err(db)?,
        lrfu_lambda: r.get(4).map_err(db)?,
        novelty: r.get(5).map_err(db)?,
        recombine: r.get(6).map_err(db)?,
    };
    row.decode().map(Some)
}

fn write_config(conn: &Connection, c: &MemoryConfig, create: bool) -> Result<()> {
    let q = if create {
        "INSERT INTO memstore_config (key_dim, value_dim, metric, capacity, lrfu_lambda, novelty, recombine, id) \
         VALUES (?, ?, ?, ?, ?, ?, ?, 1)"
    } else {
        "UPDATE memstore_config SET key_dim = ?, value_dim = ?, metric = ?, capacity = ?, lrfu_lambda = ?, \
         novelty = ?, recombine = ? WHERE id = 1"
    };
    let r = StoredConfig::new(c);
    conn.execute(
        q,
        params![
            r.key_dim,
            r.value_dim,
            r.metric,
            r.capacity,
            r.lrfu_lambda,
            r.novelty,
            r.recombine
        ],
    )
    .map_err(db)?;
    Ok(())
}

fn load_index(conn: &Connection, config: &MemoryConfig, values: bool) -> Result<MemoryIndex> {
    let mut loader = Loader::new(config, values);
    let (next_id, counters) = conn
        .query_row(
            "SELECT next_id, inserted, merged, evicted, deleted, last_batch FROM memstore_meta WHERE id = 1",
            [],
            |r| {
                let g = |i: usize| r.get::<_, i64>(i).map(|x| x as u64);
                Ok((
                    r.get::<_, i64>(0)?,
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
            loader.tag(id, name, count);
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
            let value = vals.as_ref().map(|v| v.row(i, id)).transpose()?;
            loader.memory(
                id,
                keys.row(i, id)?,
                value,
                created.value(i),
                last.value(i),
                count.value(i),
                crf.value(i),
            )?;
        }
    }
    loader.finish(next_id, counters)
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
    expect_rows(done as u64, "access update", updates.len())?;
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
        expect_rows(done as u64, "delete", chunk.len())?;
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
        expect_rows(done as u64, "value update", ch.values.len())?;
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
