//! # memstore-sqlite
//!
//! The SQLite backend of memstore: [`SqliteDriver`], a thin driver under the
//! store core of memstore-engine ([`SqlStore`]), in the style of sqlx (one
//! core, thin drivers). [`SqliteStore`] is the core on this driver; this
//! crate holds only what is specific to SQLite: the schema, the SQL that
//! writes a plan's changes and reads rows, checkpoints and backups.
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
//!   never goes through SQL: the keys and access bookkeeping are kept in the
//!   core's in-process index (memstore-engine's `MemoryIndex`) loaded on
//!   open, searched exactly and in parallel, and updated after each commit
//!   under its write lock, so that no search sees a deleted id or misses a
//!   committed one. By default the index
//!   keeps the values too ([`IndexOptions::resident_values`]), so searches
//!   and `learn` return them without a read; with that off, values are read
//!   from the database by id (about 1.5 µs per value through sqlx: 11 ms of
//!   a 4096-row `learn` at 64 × 10k).
//!
//! - **Index kind.** [`IndexOptions::ann`] swaps the exact search for an
//!   approximate structure (memstore-index's HNSW), kept in step the same way
//!   and saved beside the database on close (see [`memstore_engine::ann`]).
//!
//! One store owns a file at a time (the index is per process): opening takes an
//! exclusive advisory lock on `<path>.lock` and a second open fails with
//! [`FileError::Locked`]. To share a store between processes, serve it with
//! `memstored` (memstore-ipc).

#[cfg(feature = "faults")]
pub mod faults;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Once, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use memstore_api::{Error, Memory, MemoryConfig, MemoryId, Metric, Result};
use memstore_engine::ann::AnnBuilder;
use memstore_engine::driver::{self, ConfigWrite};
use memstore_engine::index::Changes;
use memstore_engine::{Driver, Opened};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};

pub use memstore_engine::driver::FileError;
pub use memstore_engine::{IndexOptions, SqlStore};
pub use sqlx::sqlite::SqliteSynchronous;

/// A memory store in one SQLite file: the store core on [`SqliteDriver`].
pub type SqliteStore = SqlStore<SqliteDriver>;

/// Errors of the SQLite driver; converted into [`memstore_api::Error::Storage`]
/// at the trait boundary, with this error as the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqliteError {
    /// SQLite (through sqlx) failed.
    #[error("sqlite: {0}")]
    Sql(#[from] sqlx::Error),
    /// Applying the schema migrations failed.
    #[error("migrating the schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
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
#[non_exhaustive]
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
    /// The index: its kind (exact by default, or an approximate structure
    /// saved beside the database as `<path>.<extension>`) and whether values
    /// stay in memory beside the keys (by default).
    pub index: IndexOptions,
    /// The SQLite VFS the files are opened through (`None`, the default:
    /// the platform's; [`faults`] registers one that injects faults).
    pub vfs: Option<String>,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: SqliteSynchronous::Full,
            sql_knn: true,
            max_connections: 4,
            index: IndexOptions::default(),
            vfs: None,
        }
    }
}

impl SqliteOptions {
    /// With the `synchronous` level.
    pub fn with_synchronous(mut self, synchronous: SqliteSynchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// Opens the files through the registered SQLite VFS `name`.
    pub fn with_vfs(mut self, name: impl Into<String>) -> Self {
        self.vfs = Some(name.into());
        self
    }

    /// With or without the sqlite-vec mirror for SQL kNN.
    pub fn with_sql_knn(mut self, on: bool) -> Self {
        self.sql_knn = on;
        self
    }
}

memstore_engine::driver_options!(SqliteOptions, pooled);

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

/// The SQLite driver: a connection pool on one file in WAL mode, and the
/// lock that makes this store the file's only owner.
pub struct SqliteDriver {
    pool: SqlitePool,
    path: PathBuf,
    sql_knn: bool,
    lambda: f64,
    value_dim: usize,
    /// Whether the database is a plain file (no custom VFS), which a backup
    /// may copy byte for byte.
    plain_file: bool,
    /// Exclusive advisory lock on `<path>.lock`, held while the store is open.
    _lock: std::fs::File,
}

/// The writer's state: tag names and their row ids, as committed.
#[derive(Debug, Default)]
pub struct SqliteWriter {
    tags: HashMap<String, i64>,
}

/// A written, uncommitted SQLite transaction (rolled back if dropped).
pub struct SqlitePending {
    tx: Transaction<'static, Sqlite>,
    new_tags: HashMap<String, i64>,
}

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

impl SqliteDriver {
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

    /// Checks the file against itself and returns the problems found (none:
    /// sound): SQLite's `PRAGMA integrity_check` (pages, b-trees, indexes),
    /// its foreign-key check (tags of memories that are gone), and, when keys
    /// are mirrored for SQL kNN, that `memory_keys` holds exactly the rows'
    /// ids with their keys bit for bit. Reads only.
    pub async fn integrity_problems(&self) -> Result<Vec<String>> {
        let mut problems: Vec<String> = sqlx::query_scalar::<_, String>("PRAGMA integrity_check")
            .fetch_all(&self.pool)
            .await
            .map_err(sql)?
            .into_iter()
            .filter(|line| line != "ok")
            .map(|line| format!("integrity_check: {line}"))
            .collect();
        let orphans: Vec<(String, i64)> =
            sqlx::query_as(r#"SELECT "table", count(*) FROM pragma_foreign_key_check GROUP BY "table""#)
                .fetch_all(&self.pool)
                .await
                .map_err(sql)?;
        problems.extend(
            orphans
                .into_iter()
                .map(|(table, n)| format!("{n} rows of {table} refer to rows that do not exist")),
        );
        if self.sql_knn {
            let missing: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM memories m WHERE NOT EXISTS \
                 (SELECT 1 FROM memory_keys k WHERE k.rowid = m.id AND k.key = m.key)",
            )
            .fetch_one(&self.pool)
            .await
            .map_err(sql)?;
            if missing > 0 {
                problems.push(format!(
                    "{missing} memories have no row, or another key, in the SQL kNN table memory_keys"
                ));
            }
            let stray: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM memory_keys k WHERE NOT EXISTS (SELECT 1 FROM memories m WHERE m.id = k.rowid)",
            )
            .fetch_one(&self.pool)
            .await
            .map_err(sql)?;
            if stray > 0 {
                problems.push(format!("memory_keys holds {stray} keys of memories that do not exist"));
            }
        }
        Ok(problems)
    }

    async fn connect(path: PathBuf, config: Option<MemoryConfig>, options: SqliteOptions) -> Result<Opened<Self>> {
        if config.is_none() {
            driver::require_file(&path)?;
        }
        register_sqlite_vec();
        let lock = driver::lock_file(&path)?;
        let connect = SqliteConnectOptions::from_str("sqlite://")
            .map_err(sql)?
            .filename(&path)
            .create_if_missing(config.is_some())
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(options.synchronous)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30))
            .pragma("cache_size", "-65536");
        let connect = match &options.vfs {
            Some(vfs) => connect.vfs(vfs.clone()),
            None => connect,
        };
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
        path: PathBuf,
        config: Option<MemoryConfig>,
        options: SqliteOptions,
        lock: std::fs::File,
    ) -> Result<Opened<Self>> {
        MIGRATOR.run(&pool).await.map_err(SqliteError::from)?;
        let mut tx = pool.begin().await.map_err(sql)?;
        let stored = read_config(&mut tx, Some("sql_knn")).await?;
        let stored_knn = stored.as_ref().map(|(_, knn)| *knn != Some(0));
        let r = driver::resolve_config(stored.map(|(c, _)| c), config, &path.display().to_string())?;
        let sql_knn = stored_knn.unwrap_or(options.sql_knn);
        match r.write {
            ConfigWrite::Create => {
                write_config(&mut tx, &r.config, true, Some(("sql_knn", sql_knn as i64))).await?;
                sqlx::query(
                    "INSERT INTO memstore_meta (id, next_id, inserted, merged, evicted, deleted) VALUES (1, 1, 0, 0, 0, 0)",
                )
                .execute(&mut *tx)
                .await
                .map_err(sql)?;
                if sql_knn {
                    let metric = match r.config.metric {
                        Metric::Cosine => "cosine",
                        Metric::L2 | Metric::InnerProduct => "l2",
                    };
                    let ddl = format!(
                        "CREATE VIRTUAL TABLE memory_keys USING vec0(key float[{}] distance_metric={metric})",
                        r.config.key_dim
                    );
                    // Only integers and a fixed keyword are interpolated.
                    sqlx::query(sqlx::AssertSqlSafe(ddl))
                        .execute(&mut *tx)
                        .await
                        .map_err(sql)?;
                }
            }
            ConfigWrite::Update => write_config(&mut tx, &r.config, false, Some(("sql_knn", sql_knn as i64))).await?,
            ConfigWrite::Keep => {}
        }
        let (kd, vd) = (r.config.key_dim, r.config.value_dim);
        let (index, tags) = load_store(
            &mut tx,
            &r.config,
            options.index.resident_values,
            r.lambda_changed,
            |row, id| blob_f32(row.try_get::<&[u8], _>(1).map_err(sql)?, kd, "key", id),
            |row, id| blob_f32(row.try_get::<&[u8], _>(6).map_err(sql)?, vd, "value", id),
        )
        .await?;
        tx.commit().await.map_err(sql)?;
        if matches!(r.write, ConfigWrite::Create) {
            // A new store is durable before it is handed out, whatever the
            // `synchronous` level: with `normal` the WAL is synced only by
            // checkpoints, and a power loss before the first one would
            // leave a file without its configuration.
            wal_checkpoint(&pool, "FULL").await?;
        }
        Ok(Opened {
            driver: SqliteDriver {
                pool,
                path,
                sql_knn,
                lambda: r.config.eviction.lambda(),
                value_dim: r.config.value_dim,
                plain_file: options.vfs.is_none(),
                _lock: lock,
            },
            writer: SqliteWriter { tags },
            config: r.config,
            index,
            version: 0,
        })
    }
}

#[async_trait]
impl Driver for SqliteDriver {
    type Options = SqliteOptions;
    type Location = PathBuf;
    type Writer = SqliteWriter;
    type Pending = SqlitePending;
    type Txn = ();

    async fn open(path: PathBuf, config: Option<MemoryConfig>, options: SqliteOptions) -> Result<Opened<Self>> {
        Self::connect(path, config, options).await
    }

    fn ann_path(&self, builder: &dyn AnnBuilder) -> Option<PathBuf> {
        Some(memstore_engine::ann::saved_path(&self.path, builder))
    }

    async fn fetch_values(&self, ids: &[MemoryId]) -> Result<HashMap<MemoryId, Vec<f32>>> {
        let dim = self.value_dim;
        fetch_values(&self.pool, ids, |r, id| {
            blob_f32(r.try_get::<&[u8], _>(1).map_err(sql)?, dim, "value", id)
        })
        .await
    }

    async fn write(&self, writer: &mut SqliteWriter, _txn: (), changes: &Changes) -> Result<SqlitePending> {
        let mut tx = self.pool.begin().await.map_err(sql)?;
        let new_tags = persist_all(&mut tx, self.sql_knn, self.lambda, &writer.tags, changes).await?;
        Ok(SqlitePending { tx, new_tags })
    }

    async fn commit(&self, writer: &mut SqliteWriter, pending: SqlitePending) -> Result<()> {
        pending.tx.commit().await.map_err(sql)?;
        writer.tags.extend(pending.new_tags);
        Ok(())
    }

    /// A FULL checkpoint: every committed frame of the WAL copied into the
    /// database file and synced. SQLite reports a checkpoint that readers
    /// kept from finishing (after the busy timeout) as `busy`: that is an
    /// error here, not a success.
    async fn checkpoint(&self, _writer: &mut SqliteWriter) -> Result<()> {
        wal_checkpoint(&self.pool, "FULL").await
    }

    /// The database file's bytes once a PASSIVE checkpoint has copied every
    /// committed WAL frame into it: with the writer lock held (no write of
    /// this process starts) and the store's lock file held (no other
    /// process has it open), the file then holds the committed store and
    /// nothing changes it until the copy is done. Pages are copied as they
    /// are, where `VACUUM INTO` inserts every row again (and rebuilds the
    /// `vec0` mirror's tables). When a reader keeps the checkpoint from
    /// copying every frame, or the store runs on a custom VFS (its file
    /// need not be a plain file), `VACUUM INTO` makes the copy: one read
    /// transaction, so concurrent readers are neither blocked for long nor
    /// half-copied. Neither copy is synced by the backup.
    async fn backup_to(&self, _writer: &mut SqliteWriter, dest: &Path) -> Result<()> {
        if self.plain_file && wal_backfilled(&self.pool).await? {
            let (from, to) = (self.path.clone(), dest.to_path_buf());
            return tokio::task::spawn_blocking(move || copy_new_file(&from, &to))
                .await
                .map_err(|e| Error::storage(std::io::Error::other(format!("the backup's copy stopped: {e}"))))?
                .map_err(Error::storage);
        }
        sqlx::query("VACUUM INTO ?")
            .bind(dest.to_string_lossy().into_owned())
            .execute(&self.pool)
            .await
            .map_err(sql)?;
        Ok(())
    }

    /// Checkpoints the WAL into the database file and closes the pool. An
    /// error is the checkpoint's: the committed writes are in the WAL, which
    /// the next open replays.
    async fn close(self, _writer: SqliteWriter) -> Result<()> {
        let checkpoint = wal_checkpoint(&self.pool, "TRUNCATE").await;
        self.pool.close().await;
        checkpoint
    }
}

/// Runs a PASSIVE checkpoint (it waits for no reader) and answers whether
/// it copied every frame of the WAL into the database file.
async fn wal_backfilled(pool: &SqlitePool) -> Result<bool> {
    let (busy, log, done) = checkpoint_counts(pool, "PASSIVE").await?;
    Ok(busy == 0 && log >= 0 && done == log)
}

/// Copies `from` to `to`, which must not exist; a copy that fails is
/// removed.
fn copy_new_file(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut src = std::fs::File::open(from)?;
    let mut dst = std::fs::OpenOptions::new().write(true).create_new(true).open(to)?;
    let copied = std::io::copy(&mut src, &mut dst).map(drop);
    if copied.is_err() {
        drop(dst);
        let _ = std::fs::remove_file(to);
    }
    copied
}

/// Runs `PRAGMA wal_checkpoint(MODE)` and checks its answer: `busy` (the
/// checkpoint could not finish) or fewer frames checkpointed than the WAL
/// holds is an error.
async fn wal_checkpoint(pool: &SqlitePool, mode: &'static str) -> Result<()> {
    let (busy, log, done) = checkpoint_counts(pool, mode).await?;
    if busy != 0 || (log >= 0 && done < log) {
        return Err(Error::storage(std::io::Error::other(format!(
            "WAL checkpoint ({mode}) did not finish: busy {busy}, {done} of {log} frames copied"
        ))));
    }
    Ok(())
}

/// Runs `PRAGMA wal_checkpoint(MODE)` (`PASSIVE`, `FULL` or `TRUNCATE`) and
/// returns its answer: busy, frames in the WAL, frames checkpointed.
async fn checkpoint_counts(pool: &SqlitePool, mode: &'static str) -> Result<(i64, i64, i64)> {
    let q = match mode {
        "PASSIVE" => "PRAGMA wal_checkpoint(PASSIVE)",
        "FULL" => "PRAGMA wal_checkpoint(FULL)",
        _ => "PRAGMA wal_checkpoint(TRUNCATE)",
    };
    sqlx::query_as(q).fetch_one(pool).await.map_err(sql)
}

memstore_engine::sqlx_rows!(Sqlite, sql);

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

/// Writes `changes` inside `tx`, and into the `vec0` mirror when there is
/// one. Returns tags created (their ids become valid only once the
/// transaction commits).
async fn persist_all(
    tx: &mut Transaction<'_, Sqlite>,
    sql_knn: bool,
    lambda: f64,
    tag_ids: &HashMap<String, i64>,
    ch: &Changes,
) -> Result<HashMap<String, i64>> {
    let new_tags = persist(tx, lambda, tag_ids, ch, f32_blob, f32_blob).await?;
    if sql_knn {
        delete_from_mirror(tx, &ch.removed).await?;
        for chunk in ch.inserted.chunks(memstore_engine::sqlx_rows::CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new("INSERT INTO memory_keys (rowid, key) ");
            q.push_values(chunk, |mut b, m: &Memory| {
                b.push_bind(m.id as i64).push_bind(f32_blob(&m.key));
            });
            q.build().execute(&mut **tx).await.map_err(sql)?;
        }
    }
    Ok(new_tags)
}
