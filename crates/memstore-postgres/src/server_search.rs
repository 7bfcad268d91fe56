//! Server-side search: a store's nearest neighbours found by PostgreSQL
//! with pgvector's operators, for memories larger than a client's RAM.
//!
//! A [`PostgresStore`](crate::PostgresStore) loads every key into its
//! in-process index on open, which is what makes its batched search fast
//! and what bounds it: a client needs the keys' bytes in memory
//! (`docs/scaling.md`). [`ServerSearch`] loads nothing: each batch of
//! queries is one SQL statement, `unnest` of the queries joined
//! `LATERAL` to an `ORDER BY <distance> LIMIT k` subquery on `memories`;
//! a large batch is split into parts searched at once on the pool's
//! connections (so on that many server cores). Each part reads one
//! snapshot of the committed store taken after the call began, so a search
//! sees every write committed before it began. Two ways to find the
//! neighbours ([`ServerKnn`]):
//!
//! - **Exact**: pgvector scans every row with the store's metric and ties
//!   are broken by id, as the in-process exact search breaks them, so the
//!   answer is the same up to float rounding (pgvector sums in its own
//!   order; `tests/postgres.rs` compares the two).
//! - **HNSW**: pgvector's HNSW index on the key column (Malkov & Yashunin,
//!   2018), created with [`create_hnsw_index`] by a client that may write;
//!   `ef_search` trades recall for speed (its recall against exact search
//!   is in the store benchmark, `benches/postgres.rs`). With a tag filter
//!   on pgvector ≥ 0.8, `hnsw.iterative_scan = strict_order` keeps
//!   scanning until `k` rows pass the filter; older versions filter the
//!   `ef_search` candidates the index returns, so fewer than `k` may come
//!   back.
//!
//! A searcher only reads: its connections run with
//! `default_transaction_read_only`, it runs no migration and takes no lock,
//! so it also works on a hot standby (a read replica for inference, as
//! `docs/scaling.md` describes). Search updates no access bookkeeping,
//! exactly as the store's own search does (bookkeeping is `touch` and
//! `learn`). Writes go through a [`PostgresStore`](crate::PostgresStore)
//! on a client whose RAM holds the keys, or, for a store larger than that,
//! outside memstore.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::Duration;

use memstore_api::{Error, MemoryConfig, MemoryId, Metric, Neighbors, Result, TagFilter, Vectors};
use pgvector::Vector;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
use sqlx::{Connection, Row};

use crate::{PostgresError, PostgresLocation, sql, store_pool, valid_name};

/// The name [`create_hnsw_index`] gives the HNSW index on `memories.key`.
pub const HNSW_INDEX: &str = "memories_key_hnsw";

/// One row of an answer: distance, id, key, value.
type Hit = (f32, MemoryId, Vec<f32>, Vec<f32>);

/// How the server finds a query's neighbours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKnn {
    /// A scan of every row: the exact answer, ties broken by id.
    Exact,
    /// pgvector's HNSW index (see [`create_hnsw_index`]), visiting
    /// `ef_search` candidates per query (at least `k`): approximate.
    Hnsw {
        /// pgvector's `hnsw.ef_search` (its default is 40).
        ef_search: u32,
    },
}

/// Options of a [`ServerSearch`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerSearchOptions {
    /// How neighbours are found ([`ServerKnn::Exact`] by default).
    pub knn: ServerKnn,
    /// Connections in the pool (4): a batch of queries is split into that
    /// many statements run at once (of at least 16 queries each).
    pub max_connections: u32,
    /// How long a search waits for a connection, connecting included (30 s).
    pub acquire_timeout: Duration,
}

impl Default for ServerSearchOptions {
    fn default() -> Self {
        ServerSearchOptions {
            knn: ServerKnn::Exact,
            max_connections: 4,
            acquire_timeout: Duration::from_secs(30),
        }
    }
}

impl ServerSearchOptions {
    /// Finds neighbours with `knn`.
    pub fn with_knn(mut self, knn: ServerKnn) -> Self {
        self.knn = knn;
        self
    }

    /// Searches on at most `n` connections at once (at least 1).
    pub fn with_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// Waits at most `timeout` for a connection.
    pub fn with_acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }
}

/// Read-only search of an existing PostgreSQL store on the server, with
/// nothing loaded into the client (module docs).
pub struct ServerSearch {
    pool: PgPool,
    store: String,
    config: MemoryConfig,
    knn: ServerKnn,
    /// Whether pgvector has `hnsw.iterative_scan` (≥ 0.8).
    iterative: bool,
    /// Statements a search runs at once (the pool's connections).
    parallel: usize,
}

/// The fewest queries a part of a batch holds (smaller batches are one
/// statement).
const MIN_PART: usize = 16;

/// pgvector's operator for `metric` and the operator class of an HNSW
/// index ordered by it.
fn operator(metric: Metric) -> (&'static str, &'static str) {
    match metric {
        Metric::L2 => ("<->", "vector_l2_ops"),
        Metric::Cosine => ("<=>", "vector_cosine_ops"),
        Metric::InnerProduct => ("<#>", "vector_ip_ops"),
    }
}

/// A plain connection to `at`, its store name checked first.
async fn connect(at: &PostgresLocation) -> Result<(PgConnectOptions, PgConnection)> {
    if !valid_name(&at.store) {
        return Err(PostgresError::BadName(at.store.clone()).into());
    }
    let options = PgConnectOptions::from_str(&at.url).map_err(sql)?;
    let conn = PgConnection::connect_with(&options).await.map_err(sql)?;
    Ok((options, conn))
}

/// The store's configuration and pgvector's version, read without writing;
/// a database without pgvector, or without the store, is a typed error.
async fn inspect(conn: &mut PgConnection, store: &str) -> Result<(MemoryConfig, (u32, u32))> {
    let version: Option<String> = sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        .fetch_optional(&mut *conn)
        .await
        .map_err(sql)?;
    let Some(version) = version else {
        return Err(PostgresError::NoVector("the extension is not installed".into()).into());
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let table = format!("\"{store}\".memstore_config");
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&table)
        .fetch_one(&mut *conn)
        .await
        .map_err(sql)?;
    if !exists {
        return Err(PostgresError::NoStore(store.to_string()).into());
    }
    set_path(conn, store).await?;
    let mut tx = conn.begin().await.map_err(sql)?;
    let config = crate::read_config(&mut tx, None).await?;
    tx.rollback().await.map_err(sql)?;
    match config {
        Some((config, _)) => Ok((config, version)),
        None => Err(PostgresError::NoStore(store.to_string()).into()),
    }
}

/// Points a plain connection's `search_path` at `store` (a checked name).
async fn set_path(conn: &mut PgConnection, store: &str) -> Result<()> {
    use sqlx::Executor as _;
    conn.execute(sqlx::AssertSqlSafe(format!("SET search_path TO \"{store}\", public")))
        .await
        .map_err(sql)?;
    Ok(())
}

/// Whether the store has an HNSW index on its keys for `metric`'s operator.
async fn has_hnsw(conn: &mut PgConnection, store: &str, metric: Metric) -> Result<bool> {
    let (_, opclass) = operator(metric);
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE schemaname = $1 AND tablename = 'memories' \
         AND indexdef ILIKE '%USING hnsw%' AND indexdef LIKE '%' || $2 || '%')",
    )
    .bind(store)
    .bind(opclass)
    .fetch_one(conn)
    .await
    .map_err(sql)
}

/// Creates pgvector's HNSW index on the keys of the store at `at` for its
/// metric (`m` links per node, `ef_construction` candidates while
/// building; pgvector's defaults are 16 and 64), unless there is one. A
/// write: run it on the primary. The store's own writes then also update
/// the index, which makes them slower (`benches/postgres.rs` measures
/// both).
pub async fn create_hnsw_index(at: &PostgresLocation, m: u32, ef_construction: u32) -> Result<()> {
    let (_, mut conn) = connect(at).await?;
    let created = async {
        let (config, _) = inspect(&mut conn, &at.store).await?;
        let (_, opclass) = operator(config.metric);
        // Only a checked identifier and integers are interpolated.
        let ddl = format!(
            "CREATE INDEX IF NOT EXISTS {HNSW_INDEX} ON \"{}\".memories USING hnsw (key {opclass}) \
             WITH (m = {}, ef_construction = {})",
            at.store,
            m.clamp(2, 100),
            ef_construction.clamp(4, 1000)
        );
        use sqlx::Executor as _;
        conn.execute(sqlx::AssertSqlSafe(ddl)).await.map_err(sql)?;
        Ok::<_, Error>(())
    }
    .await;
    let _ = conn.close().await;
    created
}

/// Drops the HNSW index [`create_hnsw_index`] made, if there is one.
pub async fn drop_hnsw_index(at: &PostgresLocation) -> Result<()> {
    let (_, mut conn) = connect(at).await?;
    use sqlx::Executor as _;
    // Only a checked identifier is interpolated.
    let dropped = conn
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP INDEX IF EXISTS \"{}\".{HNSW_INDEX}",
            at.store
        )))
        .await
        .map(|_| ())
        .map_err(sql);
    let _ = conn.close().await;
    dropped
}

impl ServerSearch {
    /// Opens the existing store at `at` for server-side search. Errors: a
    /// bad store name, a server that cannot be reached or refuses the
    /// credentials, a database without pgvector, no such store, and
    /// [`ServerKnn::Hnsw`] on a store without an HNSW index for its metric
    /// ([`PostgresError::NoHnswIndex`]) — never a silent scan instead.
    pub async fn open(at: PostgresLocation, options: ServerSearchOptions) -> Result<Self> {
        let (connect_options, mut conn) = connect(&at).await?;
        let inspected = async {
            let (config, version) = inspect(&mut conn, &at.store).await?;
            if matches!(options.knn, ServerKnn::Hnsw { .. }) && !has_hnsw(&mut conn, &at.store, config.metric).await? {
                return Err(PostgresError::NoHnswIndex(at.store.clone()).into());
            }
            Ok::<_, Error>((config, version))
        }
        .await;
        let _ = conn.close().await;
        let (config, version) = inspected?;
        let iterative = version >= (0, 8);
        let mut setup = format!(
            "SET search_path TO \"{}\", public; SET default_transaction_read_only = on",
            at.store
        );
        if let ServerKnn::Hnsw { ef_search } = options.knn {
            setup.push_str(&format!("; SET hnsw.ef_search = {}", ef_search.clamp(1, 1000)));
            if iterative {
                setup.push_str("; SET hnsw.iterative_scan = strict_order");
            }
        }
        let pool = store_pool(connect_options, setup, options.max_connections, options.acquire_timeout).await?;
        Ok(ServerSearch {
            pool,
            store: at.store,
            config,
            knn: options.knn,
            iterative,
            parallel: options.max_connections.max(1) as usize,
        })
    }

    /// The store's configuration, as persisted in it.
    pub fn config(&self) -> &MemoryConfig {
        &self.config
    }

    /// The store's schema name.
    pub fn store(&self) -> &str {
        &self.store
    }

    /// How neighbours are found.
    pub fn knn(&self) -> ServerKnn {
        self.knn
    }

    /// The `k` nearest memories of each query (passing `filter`, if any),
    /// nearest first, in the store's answer shape: slots past the memories
    /// found are empty (`None`, infinite distance), as with the store's own
    /// search. Bad queries are refused as the store refuses them.
    pub async fn search(&self, queries: Vectors<'_>, k: usize, filter: Option<&TagFilter>) -> Result<Neighbors> {
        self.config.check_search(&queries, k)?;
        let (kd, vd) = (self.config.key_dim, self.config.value_dim);
        let mut out = Neighbors::empty(queries.len(), k, kd, vd);
        if queries.is_empty() {
            return Ok(out);
        }
        let metric = self.config.metric;
        let (op, _) = operator(metric);
        // pgvector's cosine distance of a zero vector is NaN; the store's
        // is 1. Its inner-product operator is the negated product; the
        // store's distance is one minus it.
        let distance = match metric {
            Metric::L2 => format!("key {op} q.v"),
            Metric::Cosine => format!("coalesce(nullif(key {op} q.v, 'NaN'::float8), 1)"),
            Metric::InnerProduct => format!("1 + (key {op} q.v)"),
        };
        let order = match self.knn {
            ServerKnn::Exact => "d, id".to_string(),
            // Exactly the operator, so that the planner uses the index.
            ServerKnn::Hnsw { .. } => format!("key {op} q.v"),
        };
        let tags = match filter {
            None => String::new(),
            Some(TagFilter::Any(_)) => " WHERE EXISTS (SELECT 1 FROM memory_tags mt JOIN tags t ON t.id = mt.tag_id \
                 WHERE mt.memory_id = memories.id AND t.name = ANY($3))"
                .to_string(),
            Some(TagFilter::All(_)) => " WHERE (SELECT count(*) FROM memory_tags mt JOIN tags t ON t.id = mt.tag_id \
                 WHERE mt.memory_id = memories.id AND t.name = ANY($3)) = $4"
                .to_string(),
        };
        let statement = format!(
            "SELECT q.i, m.id, m.d, m.key, m.value \
             FROM unnest($1::vector[]) WITH ORDINALITY AS q(v, i) \
             CROSS JOIN LATERAL (SELECT id, key, value, {distance} AS d FROM memories{tags} \
             ORDER BY {order} LIMIT $2) m"
        );
        let names: Vec<String> = match filter {
            Some(TagFilter::Any(t) | TagFilter::All(t)) => {
                t.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect()
            }
            None => Vec::new(),
        };
        let limit = i64::try_from(k).map_err(|_| Error::Shape(format!("k = {k} is too large")))?;
        let hnsw_ef = match self.knn {
            ServerKnn::Hnsw { ef_search } if (ef_search as usize) < k => Some(k.min(1000)),
            _ => None,
        };
        // The batch in parts, one statement per connection at once, so
        // that the server searches on as many cores as the pool has
        // connections.
        let per = queries.len().div_ceil(self.parallel).max(MIN_PART);
        let parts = (0..queries.len()).step_by(per).map(|first| {
            let rows = first..(first + per).min(queries.len());
            let statement = &statement;
            let names = &names;
            let filtered = filter.is_some();
            async move {
                let vectors: Vec<Vector> = rows.clone().map(|i| Vector::from(queries.row(i).to_vec())).collect();
                let mut conn = self.pool.acquire().await.map_err(sql)?;
                let mut tx = conn.begin().await.map_err(sql)?;
                if let Some(ef) = hnsw_ef {
                    // An HNSW scan returns at most ef_search rows: raised
                    // to k for this search (pgvector caps it at 1000).
                    use sqlx::Executor as _;
                    tx.execute(sqlx::AssertSqlSafe(format!("SET LOCAL hnsw.ef_search = {ef}")))
                        .await
                        .map_err(sql)?;
                }
                // Only fixed SQL is interpolated; queries, k and tags are bound.
                let mut q = sqlx::query(sqlx::AssertSqlSafe(statement.clone()))
                    .bind(vectors)
                    .bind(limit);
                if filtered {
                    q = q.bind(names.clone()).bind(names.len() as i64);
                }
                let answer = q.fetch_all(&mut *tx).await.map_err(sql)?;
                tx.commit().await.map_err(sql)?;
                Ok::<_, Error>((rows.start, answer))
            }
        });
        let answers = futures_util::future::try_join_all(parts).await?;
        let mut found: Vec<Vec<Hit>> = vec![Vec::new(); queries.len()];
        for (first, rows) in answers {
            for row in rows {
                let i: i64 = row.try_get(0).map_err(sql)?;
                let id: i64 = row.try_get(1).map_err(sql)?;
                let d: f64 = row.try_get(2).map_err(sql)?;
                let key = crate::key_vec(row.try_get(3).map_err(sql)?, kd, id)?;
                let value = crate::value_vec(row.try_get(4).map_err(sql)?, vd, id)?;
                let slot = usize::try_from(i - 1)
                    .ok()
                    .and_then(|i| found.get_mut(first + i))
                    .ok_or_else(|| Error::Corrupt(format!("the server answered for query {i}")))?;
                slot.push((d as f32, id as MemoryId, key, value));
            }
        }
        for (i, mut hits) in found.into_iter().enumerate() {
            hits.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            for (j, (d, id, key, value)) in hits.into_iter().take(k).enumerate() {
                let slot = i * k + j;
                out.ids[slot] = Some(id);
                out.distances[slot] = d;
                out.keys[slot * kd..(slot + 1) * kd].copy_from_slice(&key);
                out.values[slot * vd..(slot + 1) * vd].copy_from_slice(&value);
            }
        }
        Ok(out)
    }

    /// How many memories the store holds now.
    pub async fn len(&self) -> Result<usize> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM memories")
            .fetch_one(&self.pool)
            .await
            .map_err(sql)?;
        Ok(n as usize)
    }

    /// Whether the store holds no memories.
    pub async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }

    /// Whether tag-filtered HNSW searches keep scanning until `k` rows
    /// pass the filter (pgvector ≥ 0.8).
    pub fn iterative_scan(&self) -> bool {
        self.iterative
    }

    /// Closes the connections.
    pub async fn close(self) {
        self.pool.close().await;
    }
}
