//! # memstore-postgres
//!
//! The PostgreSQL backend of memstore: [`PostgresDriver`], a thin driver under
//! the store core of memstore-engine ([`SqlStore`]), in the style of sqlx (one
//! core, thin drivers). [`PostgresStore`] is the core on this driver; this
//! crate holds only what is specific to PostgreSQL: the schema, the SQL that
//! writes a plan's changes and reads rows, and how a store is located and
//! owned.
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
//!   `<#>` for negative inner product); an HNSW index on `key` may be added
//!   by hand for approximate SQL kNN.
//! - **Hot path.** Batched search never goes through SQL: as with every SQL
//!   backend, keys and access bookkeeping live in the core's in-process index
//!   (memstore-engine's `MemoryIndex`), loaded on open and kept in step after
//!   each commit, so searches are answered in-process.
//! - **One owner.** The in-process index is the truth for this process's
//!   writes, so a store has one owner at a time: opening takes a session-level
//!   advisory lock named after the schema, and a second open of the same store
//!   (from this or another machine) fails with [`PostgresError::Locked`] until
//!   the owner closes or its connection ends.
//! - **Durability.** A commit is durable once `COMMIT` returns with the
//!   server's default `synchronous_commit = on`; [`Driver::checkpoint`] has
//!   nothing to add. Backups are PostgreSQL's own (`pg_dump --schema`,
//!   base backups, replicas): [`Driver::backup_to`] a file is refused with
//!   [`PostgresError::Unsupported`].

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use memstore_api::{Counters, Error, Memory, MemoryConfig, MemoryId, Result};
use memstore_engine::driver::{self, ConfigWrite, Loader, StoredConfig, expect_rows};
use memstore_engine::index::{AccessUpdate, Changes};
use memstore_engine::{Driver, MemoryIndex, Opened};
use pgvector::Vector;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, Postgres, QueryBuilder, Row, Transaction};

pub use memstore_engine::{IndexOptions, SqlStore};

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
    /// Another connection owns the store.
    #[error("store {0:?} is open elsewhere (its advisory lock is held)")]
    Locked(String),
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
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            max_connections: 4,
            index: IndexOptions::default(),
        }
    }
}

impl PostgresOptions {
    /// With `n` pooled connections.
    pub fn with_max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// With the index options.
    pub fn with_index(mut self, index: IndexOptions) -> Self {
        self.index = index;
        self
    }
}

impl AsRef<IndexOptions> for PostgresOptions {
    fn as_ref(&self) -> &IndexOptions {
        &self.index
    }
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The PostgreSQL driver: a connection pool whose connections see the
/// store's schema first, and the connection that holds its advisory lock.
pub struct PostgresDriver {
    pool: PgPool,
    store: String,
    lambda: f64,
    key_dim: usize,
    value_dim: usize,
    /// The session holding the store's advisory lock while it is open.
    owner: std::sync::Mutex<Option<PgConnection>>,
}

/// The writer's state: tag names and their row ids, as committed.
#[derive(Debug, Default)]
pub struct PostgresWriter {
    tags: HashMap<String, i64>,
}

/// A written, uncommitted transaction (rolled back if dropped).
pub struct PostgresPending {
    tx: Transaction<'static, Postgres>,
    new_tags: HashMap<String, i64>,
}

/// Rows per multi-row INSERT statement (8 parameters each: 8,000 per
/// statement, under PostgreSQL's limit of 65,535).
const INSERT_CHUNK: usize = 1000;

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
        let mut owner = PgConnection::connect_with(&connect).await.map_err(sql)?;
        let key = format!("memstore:{store}");
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
            .bind(&key)
            .fetch_one(&mut owner)
            .await
            .map_err(sql)?;
        if !locked {
            let _ = owner.close().await;
            return Err(PostgresError::Locked(store).into());
        }
        match Self::prepare(&mut owner, &store, config.is_some()).await {
            Ok(()) => {}
            Err(e) => {
                let _ = owner.close().await;
                return Err(e);
            }
        }
        let search_path = format!("SET search_path TO \"{store}\", public");
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .after_connect(move |conn, _| {
                let search_path = search_path.clone();
                Box::pin(async move {
                    conn.execute(sqlx::AssertSqlSafe(search_path)).await?;
                    Ok(())
                })
            })
            .connect_with(connect)
            .await
            .map_err(sql);
        let pool = match pool {
            Ok(p) => p,
            Err(e) => {
                let _ = owner.close().await;
                return Err(e);
            }
        };
        match Self::init(pool.clone(), store, config, options).await {
            Ok(mut opened) => {
                opened.driver.owner = std::sync::Mutex::new(Some(owner));
                Ok(opened)
            }
            Err(e) => {
                pool.close().await;
                let _ = owner.close().await;
                Err(e)
            }
        }
    }

    /// Checks (or creates, when `create`) the `vector` extension and the
    /// store's schema.
    async fn prepare(conn: &mut PgConnection, store: &str, create: bool) -> Result<()> {
        let has_vector: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector')")
                .fetch_one(&mut *conn)
                .await
                .map_err(sql)?;
        if !has_vector && let Err(e) = conn.execute("CREATE EXTENSION IF NOT EXISTS vector").await {
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

    async fn init(
        pool: PgPool,
        store: String,
        config: Option<MemoryConfig>,
        options: PostgresOptions,
    ) -> Result<Opened<Self>> {
        MIGRATOR.run(&pool).await.map_err(PostgresError::from)?;
        let mut tx = pool.begin().await.map_err(sql)?;
        let stored = read_config(&mut tx).await?;
        if stored.is_none() && config.is_none() {
            return Err(PostgresError::NoStore(store).into());
        }
        let r = driver::resolve_config(stored, config, &store)?;
        match r.write {
            ConfigWrite::Create => {
                write_config(&mut tx, &r.config, true).await?;
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
            ConfigWrite::Update => write_config(&mut tx, &r.config, false).await?,
            ConfigWrite::Keep => {}
        }
        let index = load_index(&mut tx, &r.config, options.index.resident_values).await?;
        if r.lambda_changed {
            // The priority column depends on λ: recompute it for the new policy.
            update_access(&mut tx, &driver::reprioritised(&index)).await?;
        }
        let mut tags = HashMap::new();
        for row in sqlx::query("SELECT id, name FROM tags")
            .fetch_all(&mut *tx)
            .await
            .map_err(sql)?
        {
            tags.insert(
                row.try_get::<String, _>(1).map_err(sql)?,
                row.try_get::<i64, _>(0).map_err(sql)?,
            );
        }
        tx.commit().await.map_err(sql)?;
        Ok(Opened {
            driver: PostgresDriver {
                pool,
                store,
                lambda: r.config.eviction.lambda(),
                key_dim: r.config.key_dim,
                value_dim: r.config.value_dim,
                owner: std::sync::Mutex::new(None),
            },
            writer: PostgresWriter { tags },
            config: r.config,
            index,
        })
    }
}

#[async_trait]
impl Driver for PostgresDriver {
    type Options = PostgresOptions;
    type Location = PostgresLocation;
    type Writer = PostgresWriter;
    type Pending = PostgresPending;

    async fn open(
        at: PostgresLocation,
        config: Option<MemoryConfig>,
        options: PostgresOptions,
    ) -> Result<Opened<Self>> {
        Self::connect(at, config, options).await
    }

    async fn fetch_values(&self, ids: &[MemoryId]) -> Result<HashMap<MemoryId, Vec<f32>>> {
        let ids: Vec<i64> = ids.iter().map(|&id| id as i64).collect();
        let rows = sqlx::query("SELECT id, value FROM memories WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&self.pool)
            .await
            .map_err(sql)?;
        let mut out = HashMap::with_capacity(rows.len());
        for r in rows {
            let id: i64 = r.try_get(0).map_err(sql)?;
            let v: Vec<f32> = r.try_get(1).map_err(sql)?;
            out.insert(id as u64, value_vec(v, self.value_dim, id)?);
        }
        Ok(out)
    }

    async fn write(&self, writer: &mut PostgresWriter, changes: &Changes) -> Result<PostgresPending> {
        let mut tx = self.pool.begin().await.map_err(sql)?;
        let new_tags = persist(&mut tx, self.lambda, self.key_dim, &writer.tags, changes).await?;
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

    /// Refused: a PostgreSQL store is backed up with the server's tools
    /// (`pg_dump --schema=<store>`, base backups, replicas).
    async fn backup_to(&self, _writer: &mut PostgresWriter, _dest: &Path) -> Result<()> {
        Err(PostgresError::Unsupported("backup to a file (use pg_dump --schema=<store> or a base backup)").into())
    }

    /// Closes the pool, then the owner's session (which releases the lock).
    async fn close(self, _writer: PostgresWriter) -> Result<()> {
        self.pool.close().await;
        let owner = self.owner.into_inner().unwrap_or_else(|p| p.into_inner());
        if let Some(owner) = owner {
            owner.close().await.map_err(sql)?;
        }
        Ok(())
    }
}

async fn read_config(tx: &mut Transaction<'_, Postgres>) -> Result<Option<MemoryConfig>> {
    let row = sqlx::query(
        "SELECT key_dim, value_dim, metric, capacity, lrfu_lambda, novelty, recombine FROM memstore_config",
    )
    .fetch_optional(&mut **tx)
    .await
    .map_err(sql)?;
    let Some(r) = row else { return Ok(None) };
    let config = StoredConfig {
        key_dim: r.try_get(0).map_err(sql)?,
        value_dim: r.try_get(1).map_err(sql)?,
        metric: r.try_get(2).map_err(sql)?,
        capacity: r.try_get(3).map_err(sql)?,
        lrfu_lambda: r.try_get(4).map_err(sql)?,
        novelty: r.try_get(5).map_err(sql)?,
        recombine: r.try_get(6).map_err(sql)?,
    }
    .decode()?;
    Ok(Some(config))
}

async fn write_config(tx: &mut Transaction<'_, Postgres>, c: &MemoryConfig, create: bool) -> Result<()> {
    let q = if create {
        "INSERT INTO memstore_config (key_dim, value_dim, metric, capacity, lrfu_lambda, novelty, recombine, id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 1)"
    } else {
        "UPDATE memstore_config SET key_dim = $1, value_dim = $2, metric = $3, capacity = $4, lrfu_lambda = $5, \
         novelty = $6, recombine = $7 WHERE id = 1"
    };
    let row = StoredConfig::new(c);
    sqlx::query(q)
        .bind(row.key_dim)
        .bind(row.value_dim)
        .bind(row.metric)
        .bind(row.capacity)
        .bind(row.lrfu_lambda)
        .bind(row.novelty)
        .bind(row.recombine)
        .execute(&mut **tx)
        .await
        .map_err(sql)?;
    Ok(())
}

async fn load_index(tx: &mut Transaction<'_, Postgres>, config: &MemoryConfig, values: bool) -> Result<MemoryIndex> {
    let mut loader = Loader::new(config, values);
    let meta =
        sqlx::query("SELECT next_id, inserted, merged, evicted, deleted, last_batch FROM memstore_meta WHERE id = 1")
            .fetch_optional(&mut **tx)
            .await
            .map_err(sql)?
            .ok_or_else(|| Error::Corrupt("memstore_meta row is missing".into()))?;
    let g = |i: usize| -> Result<u64> { Ok(meta.try_get::<i64, _>(i).map_err(sql)? as u64) };
    let counters = Counters {
        inserted: g(1)?,
        merged: g(2)?,
        evicted: g(3)?,
        deleted: g(4)?,
        last_batch: g(5)?,
    };
    let next_id: i64 = meta.try_get(0).map_err(sql)?;
    let rows = sqlx::query("SELECT mt.memory_id, t.name, mt.count FROM memory_tags mt JOIN tags t ON t.id = mt.tag_id")
        .fetch_all(&mut **tx)
        .await
        .map_err(sql)?;
    for r in rows {
        loader.tag(
            r.try_get(0).map_err(sql)?,
            r.try_get(1).map_err(sql)?,
            r.try_get(2).map_err(sql)?,
        );
    }
    let select = if values {
        "SELECT id, key, created, last_access, access_count, crf, value FROM memories"
    } else {
        "SELECT id, key, created, last_access, access_count, crf FROM memories"
    };
    let rows = sqlx::query(select).fetch_all(&mut **tx).await.map_err(sql)?;
    for r in rows {
        let id: i64 = r.try_get(0).map_err(sql)?;
        let key = key_vec(r.try_get(1).map_err(sql)?, config.key_dim, id)?;
        let value = if values {
            Some(value_vec(r.try_get(6).map_err(sql)?, config.value_dim, id)?)
        } else {
            None
        };
        loader.memory(
            id,
            &key,
            value.as_deref(),
            r.try_get(2).map_err(sql)?,
            r.try_get(3).map_err(sql)?,
            r.try_get(4).map_err(sql)?,
            r.try_get(5).map_err(sql)?,
        )?;
    }
    loader.finish(next_id, counters)
}

/// Rewrites access rows (bookkeeping and priority), one statement per chunk.
async fn update_access(tx: &mut Transaction<'_, Postgres>, updates: &[AccessUpdate]) -> Result<()> {
    for chunk in updates.chunks(INSERT_CHUNK) {
        let mut q = QueryBuilder::<Postgres>::new("WITH v (id, last_access, access_count, crf, priority) AS (");
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
        expect_rows(done.rows_affected(), "access update", chunk.len())?;
    }
    Ok(())
}

/// Writes `changes` inside `tx`. Returns tags created (their ids become valid
/// only once the transaction commits).
async fn persist(
    tx: &mut Transaction<'_, Postgres>,
    lambda: f64,
    key_dim: usize,
    tag_ids: &HashMap<String, i64>,
    ch: &Changes,
) -> Result<HashMap<String, i64>> {
    if !ch.removed.is_empty() {
        let ids: Vec<i64> = ch.removed.iter().map(|&id| id as i64).collect();
        let done = sqlx::query("DELETE FROM memories WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut **tx)
            .await
            .map_err(sql)?;
        expect_rows(done.rows_affected(), "delete", ids.len())?;
    }
    update_access(tx, &ch.accessed).await?;
    for chunk in ch.values.chunks(INSERT_CHUNK) {
        let mut q = QueryBuilder::<Postgres>::new("WITH v (id, value) AS (");
        q.push_values(chunk, |mut b, (id, v)| {
            b.push_bind(*id as i64).push_bind(v.as_slice());
        });
        q.push(") UPDATE memories SET value = v.value FROM v WHERE memories.id = v.id");
        let done = q.build().execute(&mut **tx).await.map_err(sql)?;
        expect_rows(done.rows_affected(), "value update", chunk.len())?;
    }
    let mut new_tags: HashMap<String, i64> = HashMap::new();
    let mut tag_rows: Vec<(i64, i64, i64)> = Vec::new();
    // Retagged memories get their tag rows rewritten whole.
    if !ch.retagged.is_empty() {
        let ids: Vec<i64> = ch.retagged.iter().map(|(id, _)| *id as i64).collect();
        sqlx::query("DELETE FROM memory_tags WHERE memory_id = ANY($1)")
            .bind(&ids)
            .execute(&mut **tx)
            .await
            .map_err(sql)?;
    }
    for (id, tags) in ch.tag_rows() {
        for (t, c) in tags {
            let tid = match tag_ids.get(t).or_else(|| new_tags.get(t)) {
                Some(&tid) => tid,
                None => {
                    let tid: i64 = sqlx::query_scalar(
                        "INSERT INTO tags (name) VALUES ($1) ON CONFLICT (name) DO UPDATE SET name = excluded.name \
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
        if let Some(m) = chunk.iter().find(|m| m.key.len() != key_dim) {
            return Err(Error::Corrupt(format!(
                "memory {}: a key of {} floats",
                m.id,
                m.key.len()
            )));
        }
        let mut q = QueryBuilder::<Postgres>::new(
            "INSERT INTO memories (id, key, value, created, last_access, access_count, crf, priority) ",
        );
        q.push_values(chunk, |mut b, m: &Memory| {
            b.push_bind(m.id as i64)
                .push_bind(Vector::from(m.key.clone()))
                .push_bind(m.value.as_slice())
                .push_bind(m.created as i64)
                .push_bind(m.last_access as i64)
                .push_bind(m.access_count as i64)
                .push_bind(m.crf)
                .push_bind(memstore_api::math::priority(lambda, m.crf, m.last_access));
        });
        q.build().execute(&mut **tx).await.map_err(sql)?;
    }
    for chunk in tag_rows.chunks(INSERT_CHUNK * 2) {
        let mut q = QueryBuilder::<Postgres>::new("INSERT INTO memory_tags (memory_id, tag_id, count) ");
        q.push_values(chunk, |mut b, r| {
            b.push_bind(r.0).push_bind(r.1).push_bind(r.2);
        });
        q.build().execute(&mut **tx).await.map_err(sql)?;
    }
    let c = ch.counters;
    sqlx::query(
        "UPDATE memstore_meta SET next_id = $1, inserted = $2, merged = $3, evicted = $4, deleted = $5, \
         last_batch = $6 WHERE id = 1",
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
