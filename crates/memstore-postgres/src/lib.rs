//! # memstore-postgres
//!
//! The PostgreSQL backend of memstore: [`PostgresDriver`], a thin driver under
//! the store core of memstore-engine ([`SqlStore`]), in the style of sqlx (one
//! core, thin drivers). [`PostgresStore`] is the core on this driver; this
//! crate holds only what is specific to PostgreSQL: the schema, the SQL that
//! writes a plan's changes and reads rows, how a store is located and
//! shared, and its backups.
//!
//! - **Storage.** sqlx's Postgres driver. A store is one PostgreSQL schema
//!   (its name is part of the [`PostgresLocation`]), so one database holds
//!   many stores; every connection of the store's pool runs with
//!   `search_path = "<store>", public`. The tables live in this crate's
//!   `migrations/`, embedded at compile time and applied by sqlx's migrator
//!   inside the store's schema. Keys are pgvector `vector(key_dim)` (the
//!   `vector` extension is created if the role may, and a database without
//!   it is a typed error), values `real[]`, tags in their own tables with
//!   counts. Every operation is one transaction.
//! - **SQL kNN.** Because keys are pgvector vectors, exact kNN works in plain
//!   SQL for ad-hoc inspection: `SELECT id, key <-> $1 AS d FROM
//!   "<store>".memories ORDER BY d, id LIMIT 8` (`<=>` for cosine distance,
//!   `<#>` for negative inner product);
//!   [`server_search::create_hnsw_index`] adds pgvector's HNSW index on
//!   `key` for approximate SQL kNN.
//! - **Hot path.** Batched search never goes through SQL: as with every SQL
//!   backend, keys and access bookkeeping live in the core's in-process index
//!   (memstore-engine's `MemoryIndex`), loaded on open and kept in step after
//!   each commit, so searches are answered in-process.
//! - **Server-side search.** For a store larger than a client's RAM, and
//!   for read replicas, [`ServerSearch`] opens a store without loading it
//!   and answers each batch of queries with one SQL statement using
//!   pgvector's operators, exact or through its HNSW index
//!   ([`server_search`] module docs). It only reads.
//! - **Many clients, one store.** Any number of processes, on any number of
//!   machines, open the same store, each with its own index (the store
//!   core's shared-store protocol, memstore-engine's `store` module). The
//!   store's version counts commits (`memstore_meta.version`). A write
//!   begins by raising it, which takes the meta row's lock: writes of all
//!   clients are serialised by that row lock, and each is planned after its
//!   client has applied what the others committed, so concurrent `learn`
//!   calls give the totals of running them one after another (no lost
//!   update, no merge applied twice, no id reused). Triggers (migration
//!   `0002`) stamp every row written with the version of its write and log
//!   every deleted id, so a client catches up by reading only the rows
//!   stamped after its version and the ids deleted since (a client behind
//!   the pruned part of the deletion log reloads the store whole). Reads
//!   are consistent with writes: before answering, a search (and `get`,
//!   `ids`, `len`, `stats`) reads the store's version, one indexed
//!   single-row query, and catches up when it is behind, so it sees every
//!   write committed before it began, the writer's own included.
//!   [`PostgresOptions::with_max_staleness`] trades that for fewer round
//!   trips: the version is then read at most once per interval, and a read
//!   may miss others' writes of that last interval (never its own).
//!   No LISTEN/NOTIFY: a notification arrives asynchronously, so it could not
//!   promise that a read sees a write that committed before it.
//! - **Durability.** A commit is durable once `COMMIT` returns with the
//!   server's default `synchronous_commit = on`; [`Driver::checkpoint`] has
//!   nothing to add. A server is backed up with PostgreSQL's own tools
//!   (`pg_dump --schema`, base backups, replicas); one store is also
//!   copied to a file ([`Driver::backup_to`]: its tables in `COPY` binary
//!   format, read in one snapshot, written durably) and put back with
//!   [`restore`] (how a training run checkpoints its memory and resumes).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use memstore_api::{Counters, Error, Memory, MemoryConfig, MemoryId, Result};
use memstore_engine::driver::{self, ConfigWrite};
use memstore_engine::index::Changes;
use memstore_engine::{Begun, Driver, Opened, Refresh};
use pgvector::Vector;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, Postgres, Row, Transaction};

pub mod server_search;

pub use memstore_engine::{IndexOptions, SqlStore};
pub use server_search::{ServerKnn, ServerSearch, ServerSearchOptions};

/// A memory store in one PostgreSQL schema: the store core on [`PostgresDriver`].
pub type PostgresStore = SqlStore<PostgresDriver>;

/// Errors of the PostgreSQL driver; converted into
/// [`memstore_api::Error::Storage`] at the trait boundary, with this error as
/// the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostgresError {
    /// PostgreSQL (through sqlx) failed: connecting, authenticating, a query.
    #[error("postgres: {0}")]
    Sql(#[from] sqlx::Error),
    /// Applying the schema migrations failed.
    #[error("migrating the schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A store name that is not a plain lower-case SQL identifier.
    #[error("store name {0:?}: use 1 to 63 characters of a-z, 0-9 and _, not starting with a digit")]
    BadName(String),
    /// The database has no `vector` extension and this role may not create it.
    #[error("the database has no pgvector extension (`CREATE EXTENSION vector` failed: {0})")]
    NoVector(String),
    /// Opening an existing store that is not there.
    #[error("no memstore store named {0:?} in this database")]
    NoStore(String),
    /// Server-side HNSW search of a store that has no HNSW index on its
    /// keys for its metric ([`server_search::create_hnsw_index`] makes one).
    #[error("store {0:?} has no HNSW index on its keys for its metric (create_hnsw_index makes one)")]
    NoHnswIndex(String),
    /// An operation PostgreSQL does differently.
    #[error("not supported on PostgreSQL: {0}")]
    Unsupported(&'static str),
}

impl From<PostgresError> for Error {
    fn from(e: PostgresError) -> Self {
        Error::storage(e)
    }
}

fn sql(e: sqlx::Error) -> Error {
    Error::storage(PostgresError::Sql(e))
}

/// Where a store lives: a connection URL and the schema that holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresLocation {
    /// A libpq-style URL (`postgres://user@host:port/db`; a Unix socket
    /// directory as `?host=/path`).
    pub url: String,
    /// The store's schema name.
    pub store: String,
}

/// The schema a location without `#NAME` names.
pub const DEFAULT_STORE: &str = "memstore";

impl PostgresLocation {
    /// The store `store` in the database at `url`.
    pub fn new(url: impl Into<String>, store: impl Into<String>) -> Self {
        PostgresLocation {
            url: url.into(),
            store: store.into(),
        }
    }

    /// Parses `URL#NAME`; without `#NAME`, the store [`DEFAULT_STORE`].
    pub fn parse(s: &str) -> Self {
        match s.rsplit_once('#') {
            Some((url, store)) => Self::new(url, store),
            None => Self::new(s, DEFAULT_STORE),
        }
    }
}

impl From<&str> for PostgresLocation {
    fn from(s: &str) -> Self {
        Self::parse(s)
    }
}

impl From<String> for PostgresLocation {
    fn from(s: String) -> Self {
        Self::parse(&s)
    }
}

/// Options of the PostgreSQL backend beyond the memory configuration.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// Connections in the pool (one writes at a time; the others read values).
    pub max_connections: u32,
    /// The index: its kind (exact by default, or an approximate structure,
    /// rebuilt from the rows on every open) and whether values stay in
    /// memory beside the keys (by default).
    pub index: IndexOptions,
    /// How old the last check of the store's version may be before a read
    /// checks again (zero, the default: every read checks, and sees every
    /// write committed before it began). Writes always catch up first.
    pub max_staleness: Duration,
    /// How many versions a deleted id stays in the deletion log (4,096 by
    /// default); a client whose index is older reloads the store whole.
    pub deletion_log: u32,
    /// How long an operation waits for a connection (connecting included)
    /// before it fails with [`PostgresError::Sql`]; 30 s by default. While
    /// the server is down, every operation fails after this long; once it
    /// is back, the pool connects again.
    pub acquire_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            max_connections: 4,
            index: IndexOptions::default(),
            max_staleness: Duration::ZERO,
            deletion_log: 4096,
            acquire_timeout: Duration::from_secs(30),
        }
    }
}

impl PostgresOptions {
    /// Reads check the store's version at most once per `staleness`, so
    /// they may miss other clients' writes of that last interval.
    pub fn with_max_staleness(mut self, staleness: Duration) -> Self {
        self.max_staleness = staleness;
        self
    }

    /// Waits at most `timeout` for a connection.
    pub fn with_acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Keeps deleted ids in the deletion log for `versions` versions (at
    /// least 1).
    pub fn with_deletion_log(mut self, versions: u32) -> Self {
        self.deletion_log = versions.max(1);
        self
    }
}

memstore_engine::driver_options!(PostgresOptions, pooled);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The PostgreSQL driver: a connection pool whose connections see the
/// store's schema first.
pub struct PostgresDriver {
    pool: PgPool,
    store: String,
    lambda: f64,
    key_dim: usize,
    value_dim: usize,
    /// Whether the index keeps values (what a refresh reads).
    values: bool,
    max_staleness: Duration,
    /// Versions a deleted id stays in the log.
    deletion_log: i64,
    /// The last version read and when (for `max_staleness`).
    checked: Mutex<Option<(Instant, u64)>>,
}

/// The writer's state: tag names and their row ids, as committed.
pub struct PostgresWriter {
    tags: HashMap<String, i64>,
}

/// A written, uncommitted transaction (rolled back if dropped).
pub struct PostgresPending {
    tx: Transaction<'static, Postgres>,
    new_tags: HashMap<String, i64>,
}

/// Whether `name` is a plain lower-case identifier (so it can be quoted into
/// DDL and `search_path` without escaping).
fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && !b[0].is_ascii_digit()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

fn key_vec(v: Vector, dim: usize, id: i64) -> Result<Vec<f32>> {
    let v = v.to_vec();
    if v.len() != dim {
        return Err(Error::Corrupt(format!(
            "memory {id}: key has {} floats, expected {dim}",
            v.len()
        )));
    }
    Ok(v)
}

fn value_vec(v: Vec<f32>, dim: usize, id: i64) -> Result<Vec<f32>> {
    if v.len() != dim {
        return Err(Error::Corrupt(format!(
            "memory {id}: value has {} floats, expected {dim}",
            v.len()
        )));
    }
    Ok(v)
}

impl PostgresDriver {
    /// The store's schema name.
    pub fn store(&self) -> &str {
        &self.store
    }

    /// The connection pool (its connections see the store's schema first),
    /// for ad-hoc SQL: reads only, since writes behind the store's back are
    /// not seen by its index.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn connect(
        at: PostgresLocation,
        config: Option<MemoryConfig>,
        options: PostgresOptions,
    ) -> Result<Opened<Self>> {
        let store = at.store.clone();
        if !valid_name(&store) {
            return Err(PostgresError::BadName(store).into());
        }
        let connect = PgConnectOptions::from_str(&at.url).map_err(sql)?;
        // One plain connection first: a server that is not there or refuses
        // the credentials is reported as such at once (the pool would retry
        // until its timeout and report only that).
        let mut first = PgConnection::connect_with(&connect).await.map_err(sql)?;
        let prepared = Self::prepare(&mut first, &store, config.is_some()).await;
        let _ = first.close().await;
        prepared?;
        let setup = format!("SET search_path TO \"{store}\", public");
        let pool = store_pool(connect, setup, options.max_connections, options.acquire_timeout).await?;
        let opened = Self::init(pool.clone(), store, config, options).await;
        if opened.is_err() {
            pool.close().await;
        }
        opened
    }

    /// Checks (or creates, when `create`) the `vector` extension and the
    /// store's schema.
    async fn prepare(conn: &mut PgConnection, store: &str, create: bool) -> Result<()> {
        async fn has_vector(conn: &mut PgConnection) -> Result<bool> {
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector')")
                .fetch_one(conn)
                .await
                .map_err(sql)
        }
        // Two sessions creating the extension at once make one fail on the
        // catalog's unique index although the extension then exists.
        if !has_vector(conn).await?
            && let Err(e) = conn.execute("CREATE EXTENSION IF NOT EXISTS vector").await
            && !has_vector(conn).await?
        {
            return Err(PostgresError::NoVector(e.to_string()).into());
        }
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(store)
            .fetch_one(&mut *conn)
            .await
            .map_err(sql)?;
        if !exists {
            if !create {
                return Err(PostgresError::NoStore(store.to_string()).into());
            }
            // The name was checked to be a plain identifier.
            conn.execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS \"{store}\"")))
                .await
                .map_err(sql)?;
        }
        Ok(())
    }

    /// Prepares the database and the store (creating or updating its
    /// configuration, one open at a time), then loads the index from one
    /// snapshot of the committed rows.
    async fn init(
        pool: PgPool,
        store: String,
        config: Option<MemoryConfig>,
        options: PostgresOptions,
    ) -> Result<Opened<Self>> {
        MIGRATOR.run(&pool).await.map_err(PostgresError::from)?;
        let mut tx = pool.begin().await.map_err(sql)?;
        lock_opens(&mut tx, &store).await?;
        let stored = read_config(&mut tx, None).await?.map(|(c, _)| c);
        if stored.is_none() && config.is_none() {
            return Err(PostgresError::NoStore(store).into());
        }
        let r = driver::resolve_config(stored, config, &store)?;
        match r.write {
            ConfigWrite::Create => {
                write_config(&mut tx, &r.config, true, None).await?;
                sqlx::query(
                    "INSERT INTO memstore_meta (id, next_id, inserted, merged, evicted, deleted, last_batch) \
                     VALUES (1, 1, 0, 0, 0, 0, 0)",
                )
                .execute(&mut *tx)
                .await
                .map_err(sql)?;
                // Only an integer is interpolated.
                let ddl = format!(
                    "ALTER TABLE memories ALTER COLUMN key TYPE vector({})",
                    r.config.key_dim
                );
                tx.execute(sqlx::AssertSqlSafe(ddl)).await.map_err(sql)?;
            }
            ConfigWrite::Update => write_config(&mut tx, &r.config, false, None).await?,
            ConfigWrite::Keep => {}
        }
        let (kd, vd) = (r.config.key_dim, r.config.value_dim);
        let key = |row: &sqlx::postgres::PgRow, id| key_vec(row.try_get(1).map_err(sql)?, kd, id);
        let value = |row: &sqlx::postgres::PgRow, id| value_vec(row.try_get(6).map_err(sql)?, vd, id);
        if r.lambda_changed {
            // The stored priorities depend on λ: rewritten as a write of
            // their own, which every client sees.
            bump_version(&mut tx).await?;
            let index = load_rows(&mut tx, &r.config, false, key, value).await?;
            update_access(&mut tx, &driver::reprioritised(&index)).await?;
        }
        tx.commit().await.map_err(sql)?;

        let resident = options.index.resident_values;
        let mut tx = snapshot(&pool).await?;
        let version: i64 = sqlx::query_scalar("SELECT version FROM memstore_meta WHERE id = 1")
            .fetch_one(&mut *tx)
            .await
            .map_err(sql)?;
        let index = load_rows(&mut tx, &r.config, resident, key, value).await?;
        let tags = load_tag_ids(&mut tx).await?;
        tx.commit().await.map_err(sql)?;
        let driver = PostgresDriver {
            pool,
            store,
            lambda: r.config.eviction.lambda(),
            key_dim: r.config.key_dim,
            value_dim: r.config.value_dim,
            values: resident,
            max_staleness: options.max_staleness,
            deletion_log: i64::from(options.deletion_log.max(1)),
            checked: Mutex::new(None),
        };
        Ok(Opened {
            driver,
            writer: PostgresWriter { tags },
            config: r.config,
            index,
            version: version as u64,
        })
    }

    /// What was committed after version `seen`, read in `tx` (a snapshot,
    /// or the writer's transaction holding the meta row's lock): the rows
    /// stamped after it and the ids deleted after it, or every row when
    /// `seen` is older than the deletion log (or newer than the store: it
    /// was replaced). `at` is the version the answer brings the index to.
    async fn changes_since(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        index_version: u64,
        at: i64,
        log_floor: i64,
    ) -> Result<Refresh> {
        let seen = index_version as i64;
        let whole = seen < log_floor || seen > at;
        let since = if whole { i64::MIN } else { seen };
        // A generic plan of `version > $1` would estimate a third of the
        // table and scan it; planned for the value, the index finds the few
        // rows written since.
        tx.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            .await
            .map_err(sql)?;
        let meta = sqlx::query(
            "SELECT next_id, inserted, merged, evicted, deleted, last_batch FROM memstore_meta WHERE id = 1",
        )
        .fetch_one(&mut **tx)
        .await
        .map_err(sql)?;
        let g = |i: usize| -> Result<u64> { Ok(meta.try_get::<i64, _>(i).map_err(sql)? as u64) };
        let counters = Counters {
            inserted: g(1)?,
            merged: g(2)?,
            evicted: g(3)?,
            deleted: g(4)?,
            last_batch: g(5)?,
        };
        let next_id = g(0)?;
        let mut tags: HashMap<i64, BTreeMap<String, u64>> = HashMap::new();
        for r in sqlx::query(
            "SELECT mt.memory_id, t.name, mt.count FROM memory_tags mt JOIN tags t ON t.id = mt.tag_id \
             JOIN memories m ON m.id = mt.memory_id WHERE m.version > $1",
        )
        .bind(since)
        .fetch_all(&mut **tx)
        .await
        .map_err(sql)?
        {
            let count: i64 = r.try_get(2).map_err(sql)?;
            tags.entry(r.try_get(0).map_err(sql)?)
                .or_default()
                .insert(r.try_get(1).map_err(sql)?, count as u64);
        }
        let select = if self.values {
            "SELECT id, key, created, last_access, access_count, crf, value FROM memories WHERE version > $1"
        } else {
            "SELECT id, key, created, last_access, access_count, crf FROM memories WHERE version > $1"
        };
        let mut rows = Vec::new();
        for r in sqlx::query(select)
            .bind(since)
            .fetch_all(&mut **tx)
            .await
            .map_err(sql)?
        {
            let id: i64 = r.try_get(0).map_err(sql)?;
            let crf: f64 = r.try_get(5).map_err(sql)?;
            if !(crf.is_finite() && crf > 0.0) {
                return Err(Error::Corrupt(format!("memory {id} has crf {crf}")));
            }
            let key = key_vec(r.try_get(1).map_err(sql)?, self.key_dim, id)?;
            if key.iter().any(|x| !x.is_finite()) {
                return Err(Error::Corrupt(format!("memory {id} has a non-finite key")));
            }
            rows.push(Memory {
                id: id as MemoryId,
                key,
                value: if self.values {
                    value_vec(r.try_get(6).map_err(sql)?, self.value_dim, id)?
                } else {
                    Vec::new()
                },
                created: r.try_get::<i64, _>(2).map_err(sql)? as u64,
                last_access: r.try_get::<i64, _>(3).map_err(sql)? as u64,
                access_count: r.try_get::<i64, _>(4).map_err(sql)? as u64,
                crf,
                tags: tags.remove(&id).unwrap_or_default(),
            });
        }
        let deleted: Vec<MemoryId> = if whole {
            Vec::new()
        } else {
            sqlx::query_scalar::<_, i64>("SELECT id FROM memstore_deleted WHERE version > $1")
                .bind(since)
                .fetch_all(&mut **tx)
                .await
                .map_err(sql)?
                .into_iter()
                .map(|id| id as MemoryId)
                .collect()
        };
        Ok(Refresh {
            version: at as u64,
            rows,
            deleted,
            whole,
            next_id,
            counters,
        })
    }
}

#[async_trait]
impl Driver for PostgresDriver {
    type Options = PostgresOptions;
    type Location = PostgresLocation;
    type Writer = PostgresWriter;
    type Pending = PostgresPending;
    type Txn = Option<Transaction<'static, Postgres>>;

    async fn open(
        at: PostgresLocation,
        config: Option<MemoryConfig>,
        options: PostgresOptions,
    ) -> Result<Opened<Self>> {
        Self::connect(at, config, options).await
    }

    async fn fetch_values(&self, ids: &[MemoryId]) -> Result<HashMap<MemoryId, Vec<f32>>> {
        let dim = self.value_dim;
        fetch_values(&self.pool, ids, |r, id| value_vec(r.try_get(1).map_err(sql)?, dim, id)).await
    }

    /// Raises the store's version (taking the meta row's lock, which every
    /// client's write takes first) and reads what others committed since
    /// `seen`. Every sixteenth of the deletion log's length in versions,
    /// prunes the log.
    async fn begin(&self, _writer: &mut PostgresWriter, seen: u64) -> Result<Begun<Self::Txn>> {
        let mut tx = self.pool.begin().await.map_err(sql)?;
        let (version, log_floor) = bump_version(&mut tx).await?;
        let before = version - 1;
        let refresh = if before as u64 != seen {
            Some(self.changes_since(&mut tx, seen, before, log_floor).await?)
        } else {
            None
        };
        let keep = self.deletion_log;
        if version % (keep / 16).max(1) == 0 && version > keep {
            let floor = version - keep;
            sqlx::query("DELETE FROM memstore_deleted WHERE version <= $1")
                .bind(floor)
                .execute(&mut *tx)
                .await
                .map_err(sql)?;
            sqlx::query("UPDATE memstore_meta SET log_floor = greatest(log_floor, $1) WHERE id = 1")
                .bind(floor)
                .execute(&mut *tx)
                .await
                .map_err(sql)?;
        }
        Ok(Begun {
            txn: Some(tx),
            refresh,
            version: version as u64,
        })
    }

    async fn version(&self) -> Result<Option<u64>> {
        if !self.max_staleness.is_zero()
            && let Ok(checked) = self.checked.lock()
            && let Some((at, version)) = *checked
            && at.elapsed() < self.max_staleness
        {
            return Ok(Some(version));
        }
        let version: i64 = sqlx::query_scalar("SELECT version FROM memstore_meta WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(sql)?;
        if let Ok(mut checked) = self.checked.lock() {
            *checked = Some((Instant::now(), version as u64));
        }
        Ok(Some(version as u64))
    }

    async fn refresh(&self, _writer: &mut PostgresWriter, seen: u64) -> Result<Option<Refresh>> {
        let mut tx = snapshot(&self.pool).await?;
        let row = sqlx::query("SELECT version, log_floor FROM memstore_meta WHERE id = 1")
            .fetch_one(&mut *tx)
            .await
            .map_err(sql)?;
        let version: i64 = row.try_get(0).map_err(sql)?;
        if version as u64 == seen {
            return Ok(None);
        }
        let refresh = self
            .changes_since(&mut tx, seen, version, row.try_get(1).map_err(sql)?)
            .await?;
        tx.commit().await.map_err(sql)?;
        Ok(Some(refresh))
    }

    async fn write(&self, writer: &mut PostgresWriter, txn: Self::Txn, changes: &Changes) -> Result<PostgresPending> {
        let Some(mut tx) = txn else {
            return Err(PostgresError::Unsupported("a write that was not begun").into());
        };
        if let Some(m) = changes.inserted.iter().find(|m| m.key.len() != self.key_dim) {
            return Err(Error::Corrupt(format!(
                "memory {}: a key of {} floats",
                m.id,
                m.key.len()
            )));
        }
        let key = |k: &[f32]| Vector::from(k.to_vec());
        let value = |v: &[f32]| v.to_vec();
        let new_tags = persist(&mut tx, self.lambda, &writer.tags, changes, key, value).await?;
        Ok(PostgresPending { tx, new_tags })
    }

    async fn commit(&self, writer: &mut PostgresWriter, pending: PostgresPending) -> Result<()> {
        pending.tx.commit().await.map_err(sql)?;
        writer.tags.extend(pending.new_tags);
        Ok(())
    }

    /// Nothing to do: a commit is durable on the server once `COMMIT`
    /// returns (the server's default `synchronous_commit = on`).
    async fn checkpoint(&self, _writer: &mut PostgresWriter) -> Result<()> {
        Ok(())
    }

    /// Writes the store's tables, read in one snapshot, to the file `dest`
    /// (see [`restore`]); the file is synced and renamed into place, so it
    /// is there whole or not at all.
    async fn backup_to(&self, _writer: &mut PostgresWriter, dest: &Path) -> Result<()> {
        let mut partial = dest.as_os_str().to_owned();
        partial.push(".partial");
        let partial = std::path::PathBuf::from(partial);
        let io = |e: std::io::Error| Error::storage(std::io::Error::new(e.kind(), format!("{}: {e}", dest.display())));
        let written = async {
            let mut out = std::io::BufWriter::new(std::fs::File::create_new(&partial).map_err(io)?);
            let mut tx = snapshot(&self.pool).await?;
            out.write_all(BACKUP_MAGIC).map_err(io)?;
            for table in BACKUP_TABLES {
                out.write_all(format!("{table}\n").as_bytes()).map_err(io)?;
                let mut stream = tx
                    .copy_out_raw(&format!("COPY {table} TO STDOUT (FORMAT binary)"))
                    .await
                    .map_err(sql)?;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(sql)?;
                    out.write_all(&(chunk.len() as u64).to_le_bytes()).map_err(io)?;
                    out.write_all(&chunk).map_err(io)?;
                }
                drop(stream);
                out.write_all(&0u64.to_le_bytes()).map_err(io)?;
            }
            tx.commit().await.map_err(sql)?;
            let file = out.into_inner().map_err(|e| io(e.into_error()))?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&partial, dest).map_err(io)?;
            driver::sync_parent(dest).map_err(io)
        }
        .await;
        if written.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        written
    }

    /// Closes the pool (every commit is on the server already).
    async fn close(self, _writer: PostgresWriter) -> Result<()> {
        self.pool.close().await;
        Ok(())
    }
}

/// The first line of a backup file.
const BACKUP_MAGIC: &[u8] = b"memstore-postgres backup 1\n";
/// The tables a backup holds, in the order [`restore`] loads them.
const BACKUP_TABLES: [&str; 5] = ["memstore_config", "memstore_meta", "memories", "tags", "memory_tags"];
/// The largest chunk a backup file may announce (a larger one means the
/// file is not a backup).
const MAX_CHUNK: u64 = 1 << 30;

/// Puts back the store at `at` as it is in the backup file `from` (from
/// [`Driver::backup_to`] of a store of any name), in one transaction: its
/// rows are replaced whole and its version raised past both the old and the
/// restored one, with the deletion log cut there, so that every client
/// open meanwhile reloads the store whole at its next read or write. The
/// store is created if it does not exist. A file that is not a backup
/// changes nothing.
pub async fn restore(at: PostgresLocation, from: &Path) -> Result<()> {
    let bad = |why: String| Error::Corrupt(format!("{}: not a memstore-postgres backup ({why})", from.display()));
    let io = |e: std::io::Error| Error::storage(std::io::Error::new(e.kind(), format!("{}: {e}", from.display())));
    let mut input = std::io::BufReader::new(std::fs::File::open(from).map_err(io)?);
    let mut magic = vec![0u8; BACKUP_MAGIC.len()];
    input.read_exact(&mut magic).map_err(|_| bad("too short".into()))?;
    if magic != BACKUP_MAGIC {
        return Err(bad("wrong header".into()));
    }
    if !valid_name(&at.store) {
        return Err(PostgresError::BadName(at.store).into());
    }
    let connect = PgConnectOptions::from_str(&at.url).map_err(sql)?;
    let mut conn = PgConnection::connect_with(&connect).await.map_err(sql)?;
    let restored = async {
        PostgresDriver::prepare(&mut conn, &at.store, true).await?;
        conn.execute(sqlx::AssertSqlSafe(format!(
            "SET search_path TO \"{}\", public",
            at.store
        )))
        .await
        .map_err(sql)?;
        MIGRATOR.run(&mut conn).await.map_err(PostgresError::from)?;
        let mut tx = conn.begin().await.map_err(sql)?;
        lock_opens(&mut tx, &at.store).await?;
        let old: i64 = sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM memstore_meta")
            .fetch_one(&mut *tx)
            .await
            .map_err(sql)?;
        tx.execute("TRUNCATE memory_tags, tags, memories, memstore_meta, memstore_config, memstore_deleted")
            .await
            .map_err(sql)?;
        for table in BACKUP_TABLES {
            let mut line = String::new();
            input.read_line(&mut line).map_err(io)?;
            if line.trim_end() != table {
                return Err(bad(format!("expected table {table}, found {:?}", line.trim_end())));
            }
            if table == "memories" {
                // The key column takes the restored store's dimension, and
                // every restored row the new version.
                let key_dim: i64 = sqlx::query_scalar("SELECT key_dim FROM memstore_config WHERE id = 1")
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(sql)?
                    .ok_or_else(|| bad("no configuration".into()))?;
                let restored: i64 = sqlx::query_scalar("SELECT version FROM memstore_meta WHERE id = 1")
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(sql)?
                    .ok_or_else(|| bad("no meta row".into()))?;
                let version = old.max(restored) + 1;
                sqlx::query("UPDATE memstore_meta SET version = $1, log_floor = $1 WHERE id = 1")
                    .bind(version)
                    .execute(&mut *tx)
                    .await
                    .map_err(sql)?;
                stamp_writes(&mut tx, version).await?;
                tx.execute(sqlx::AssertSqlSafe(format!(
                    "ALTER TABLE memories ALTER COLUMN key TYPE vector({key_dim})"
                )))
                .await
                .map_err(sql)?;
            }
            let mut copy = tx
                .copy_in_raw(&format!("COPY {table} FROM STDIN (FORMAT binary)"))
                .await
                .map_err(sql)?;
            let sent = async {
                loop {
                    let mut len = [0u8; 8];
                    input
                        .read_exact(&mut len)
                        .map_err(|_| bad(format!("{table} is cut short")))?;
                    let len = u64::from_le_bytes(len);
                    if len == 0 {
                        return Ok(());
                    }
                    if len > MAX_CHUNK {
                        return Err(bad(format!("a chunk of {len} bytes")));
                    }
                    let mut chunk = vec![0u8; len as usize];
                    input
                        .read_exact(&mut chunk)
                        .map_err(|_| bad(format!("{table} is cut short")))?;
                    copy.send(chunk).await.map_err(sql)?;
                }
            }
            .await;
            match sent {
                Ok(()) => {
                    copy.finish().await.map_err(sql)?;
                }
                Err(e) => {
                    let _ = copy.abort("not a backup").await;
                    return Err(e);
                }
            }
        }
        sqlx::query("SELECT setval(pg_get_serial_sequence('tags', 'id'), coalesce(max(id), 0) + 1, false) FROM tags")
            .execute(&mut *tx)
            .await
            .map_err(sql)?;
        // The restored configuration must be one this version accepts.
        read_config(&mut tx, None)
            .await?
            .ok_or_else(|| bad("no configuration".into()))?;
        tx.commit().await.map_err(sql)
    }
    .await;
    let _ = conn.close().await;
    restored
}

/// Whether the store at `at` exists and holds memories: one query, with
/// nothing opened, migrated or locked.
pub async fn holds_memories(at: &PostgresLocation) -> Result<bool> {
    if !valid_name(&at.store) {
        return Err(PostgresError::BadName(at.store.clone()).into());
    }
    let connect = PgConnectOptions::from_str(&at.url).map_err(sql)?;
    let mut conn = PgConnection::connect_with(&connect).await.map_err(sql)?;
    let table = format!("\"{}\".memories", at.store);
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&table)
        .fetch_one(&mut conn)
        .await
        .map_err(sql)?;
    let holds = if exists {
        // The name was checked to be a plain identifier.
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT EXISTS (SELECT 1 FROM {table})")))
            .fetch_one(&mut conn)
            .await
            .map_err(sql)?
    } else {
        false
    };
    let _ = conn.close().await;
    Ok(holds)
}

/// Raises the store's version in `tx` (taking the meta row's lock until
/// `tx` ends) and sets it as the version the triggers stamp on the rows
/// `tx` writes. Returns the new version and the deletion log's floor.
async fn bump_version(tx: &mut Transaction<'static, Postgres>) -> Result<(i64, i64)> {
    let row = sqlx::query("UPDATE memstore_meta SET version = version + 1 WHERE id = 1 RETURNING version, log_floor")
        .fetch_optional(&mut **tx)
        .await
        .map_err(sql)?
        .ok_or_else(|| Error::Corrupt("memstore_meta row is missing".into()))?;
    let version: i64 = row.try_get(0).map_err(sql)?;
    stamp_writes(tx, version).await?;
    Ok((version, row.try_get(1).map_err(sql)?))
}

/// Sets `version` as the one the triggers stamp on the rows `tx` writes
/// (the transaction-local `memstore.version`).
async fn stamp_writes(tx: &mut Transaction<'_, Postgres>, version: i64) -> Result<()> {
    sqlx::query("SELECT set_config('memstore.version', $1, true)")
        .bind(version.to_string())
        .execute(&mut **tx)
        .await
        .map_err(sql)?;
    Ok(())
}

/// Makes opens (creation, configuration updates) and restores of `store`
/// run one at a time, until `tx` ends.
async fn lock_opens(tx: &mut Transaction<'_, Postgres>, store: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("memstore:{store}"))
        .execute(&mut **tx)
        .await
        .map_err(sql)?;
    Ok(())
}

/// A pool of at most `max_connections` connections to `connect`, each of
/// which runs `setup` (its `search_path` first, so that it sees the store's
/// schema) when it connects.
async fn store_pool(
    connect: PgConnectOptions,
    setup: String,
    max_connections: u32,
    acquire_timeout: Duration,
) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(acquire_timeout)
        .after_connect(move |conn, _| {
            let setup = setup.clone();
            Box::pin(async move {
                conn.execute(sqlx::AssertSqlSafe(setup)).await?;
                Ok(())
            })
        })
        .connect_with(connect)
        .await
        .map_err(sql)
}

/// A read-only transaction on one snapshot of the committed store.
async fn snapshot(pool: &PgPool) -> Result<Transaction<'static, Postgres>> {
    let mut tx = pool.begin().await.map_err(sql)?;
    tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .map_err(sql)?;
    Ok(tx)
}

memstore_engine::sqlx_rows!(Postgres, sql);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_names_are_plain_identifiers() {
        for ok in ["memstore", "layer_0", "_x", "a1"] {
            assert!(valid_name(ok), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in ["", "0abc", "Upper", "a-b", "a\"b", "a b", long.as_str()] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn locations_parse_the_store_name() {
        let l = PostgresLocation::parse("postgres://u@h/db?host=/tmp/s#layer_3");
        assert_eq!(l.url, "postgres://u@h/db?host=/tmp/s");
        assert_eq!(l.store, "layer_3");
        assert_eq!(PostgresLocation::parse("postgres://u@h/db").store, DEFAULT_STORE);
    }
}
