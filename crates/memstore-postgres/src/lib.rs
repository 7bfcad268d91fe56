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
use memstore_api::{Error, MemoryConfig, MemoryId, Result};
use memstore_engine::driver::{self, ConfigWrite};
use memstore_engine::index::Changes;
use memstore_engine::{Driver, MemoryIndex, Opened};
use pgvector::Vector;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, Postgres, Row, Transaction};

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
}

/// The writer's state: tag names and their row ids, as committed, and the
/// session that holds the store's advisory lock while it is open.
pub struct PostgresWriter {
    tags: HashMap<String, i64>,
    owner: PgConnection,
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
        let mut owner = PgConnection::connect_with(&connect).await.map_err(sql)?;
        match Self::own(&mut owner, connect, store, config, options).await {
            Ok((driver, tags, config, index)) => Ok(Opened {
                driver,
                writer: PostgresWriter { tags, owner },
                config,
                index,
            }),
            Err(e) => {
                let _ = release(owner).await;
                Err(e)
            }
        }
    }

    /// Takes the store's advisory lock on the `owner` session, prepares the
    /// database, connects the pool and loads the store.
    async fn own(
        owner: &mut PgConnection,
        connect: PgConnectOptions,
        store: String,
        config: Option<MemoryConfig>,
        options: PostgresOptions,
    ) -> Result<(Self, HashMap<String, i64>, MemoryConfig, MemoryIndex)> {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
            .bind(format!("memstore:{store}"))
            .fetch_one(&mut *owner)
            .await
            .map_err(sql)?;
        if !locked {
            return Err(PostgresError::Locked(store).into());
        }
        Self::prepare(owner, &store, config.is_some()).await?;
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
            .map_err(sql)?;
        let loaded = Self::init(pool.clone(), store, config, options).await;
        if loaded.is_err() {
            pool.close().await;
        }
        loaded
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

    async fn init(
        pool: PgPool,
        store: String,
        config: Option<MemoryConfig>,
        options: PostgresOptions,
    ) -> Result<(Self, HashMap<String, i64>, MemoryConfig, MemoryIndex)> {
        MIGRATOR.run(&pool).await.map_err(PostgresError::from)?;
        let mut tx = pool.begin().await.map_err(sql)?;
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
        let (index, tags) = load_store(
            &mut tx,
            &r.config,
            options.index.resident_values,
            r.lambda_changed,
            |row, id| key_vec(row.try_get(1).map_err(sql)?, kd, id),
            |row, id| value_vec(row.try_get(6).map_err(sql)?, vd, id),
        )
        .await?;
        tx.commit().await.map_err(sql)?;
        let driver = PostgresDriver {
            pool,
            store,
            lambda: r.config.eviction.lambda(),
            key_dim: r.config.key_dim,
            value_dim: r.config.value_dim,
        };
        Ok((driver, tags, r.config, index))
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
        let dim = self.value_dim;
        fetch_values(&self.pool, ids, |r, id| value_vec(r.try_get(1).map_err(sql)?, dim, id)).await
    }

    async fn write(&self, writer: &mut PostgresWriter, changes: &Changes) -> Result<PostgresPending> {
        let mut tx = self.pool.begin().await.map_err(sql)?;
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

    /// Refused: a PostgreSQL store is backed up with the server's tools
    /// (`pg_dump --schema=<store>`, base backups, replicas).
    async fn backup_to(&self, _writer: &mut PostgresWriter, _dest: &Path) -> Result<()> {
        Err(PostgresError::Unsupported("backup to a file (use pg_dump --schema=<store> or a base backup)").into())
    }

    /// Closes the pool, releases the store's lock and closes the owner's session.
    async fn close(self, writer: PostgresWriter) -> Result<()> {
        self.pool.close().await;
        release(writer.owner).await
    }
}

/// Releases the owner session's advisory lock and closes the session. The
/// lock is released here, not when the server ends the session after the
/// close, so that an open right after this returns finds the store free.
async fn release(mut owner: PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut owner)
        .await
        .map_err(sql)?;
    owner.close().await.map_err(sql)
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
