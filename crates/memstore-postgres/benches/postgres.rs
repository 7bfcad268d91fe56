//! memstore-postgres against pgvector's own SQL kNN and against the SQLite
//! backend, on the same keys in the same run (a table on stdout):
//!
//! - search (queries/s, k = 8): the store's batched search (4096 queries,
//!   one call, answered by the in-process index after one version check)
//!   against one SQL kNN statement per query on the same PostgreSQL table
//!   (`ORDER BY key <-> $1 LIMIT 8`), exact (a scan) and with a pgvector
//!   HNSW index on the key column (default `m`, `ef_construction`;
//!   `hnsw.ef_search` 40 and 200; 256 queries each, `MEMSTORE_BENCH_HNSW_QUERIES`
//!   to change it), whose recall@8 against the exact answer is printed;
//! - server-side search ([`ServerSearch`], nothing loaded into the client):
//!   exact, on the SQL scan's 64 queries in one call (split over the
//!   pool's 4 connections), against the in-process index and the per-query
//!   scan; with the HNSW index at each `ef_search`, the same queries in one
//!   call against one statement per query; recall@8 of each against the in-process exact answer;
//!   inserts with the HNSW index on the keys against without;
//! - durable writes of 4096 rows (keys/s): `insert`, `learn` and `evict`,
//!   each on a store of N keys (rows removed again, untimed), for
//!   memstore-postgres and for the SQLite store on a file;
//! - `learn` throughput with 1, 2 and 4 clients of one store (each its own
//!   index and pool, all in this process), batches of 256 new keys, 5 s,
//!   each run from the same N keys.
//!
//! Needs a server: `export MEMSTORE_POSTGRES_URL=$(scripts/postgres.sh start)`,
//! then `cargo bench -p memstore-postgres --bench postgres`. Sizes:
//! `MEMSTORE_BENCH_SIZES="64x100000,768x100000"` (dim × N; default
//! `64x10000,64x100000`).

use std::time::{Duration, Instant};

use memstore_api::testkit::util::uniform;
use memstore_api::{Batch, MemoryConfig, MemoryStore, Vectors};
use memstore_postgres::server_search::{create_hnsw_index, drop_hnsw_index};
use memstore_postgres::{PostgresLocation, PostgresStore, ServerKnn, ServerSearch, ServerSearchOptions};
use memstore_sqlite::SqliteStore;
use pgvector::Vector;

const K: usize = 8;
const WRITE: usize = 4096;
const QUERIES: usize = 4096;

fn sizes() -> Vec<(usize, usize)> {
    let spec = std::env::var("MEMSTORE_BENCH_SIZES").unwrap_or_else(|_| "64x10000,64x100000".into());
    spec.split(',')
        .filter_map(|s| {
            let (d, n) = s.trim().split_once('x')?;
            Some((d.parse().ok()?, n.parse().ok()?))
        })
        .collect()
}

/// Queries per HNSW setting (`MEMSTORE_BENCH_HNSW_QUERIES`, default 256).
fn hnsw_queries() -> usize {
    std::env::var("MEMSTORE_BENCH_HNSW_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn store_name(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("bench_{tag}_{}_{}", std::process::id(), nanos % 1_000_000_000)
}

async fn fill(s: &dyn MemoryStore, keys: &[f32], dim: usize) {
    for (i, k) in keys.chunks(WRITE * dim).enumerate() {
        let v = uniform(1000 + i as u64, k.len());
        s.insert(
            Batch::new(Vectors::new(k, dim).unwrap(), Vectors::new(&v, dim).unwrap()),
            0,
        )
        .await
        .unwrap();
    }
}

/// The median of `reps` timings of `f`, after `setup` (untimed) each time.
async fn median<S, F, Fs, Ff>(reps: usize, mut setup: Fs, mut f: Ff) -> Duration
where
    Fs: FnMut() -> S,
    S: std::future::Future<Output = ()>,
    Ff: FnMut() -> F,
    F: std::future::Future<Output = ()>,
{
    let mut times = Vec::new();
    for _ in 0..reps {
        setup().await;
        let t = Instant::now();
        f().await;
        times.push(t.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

/// Times insert, learn and evict of [`WRITE`] new rows on a store of N keys,
/// removing what each added (untimed); returns keys/s for each.
async fn writes(s: &dyn MemoryStore, dim: usize, seed: u64) -> [f64; 3] {
    let keys = uniform(seed, WRITE * dim);
    let values = uniform(seed + 1, WRITE * dim);
    let b = || Batch::new(Vectors::new(&keys, dim).unwrap(), Vectors::new(&values, dim).unwrap());
    let base = s.ids().await.unwrap();
    let trim = || async {
        let now = s.ids().await.unwrap();
        let extra: Vec<u64> = now.into_iter().filter(|id| base.binary_search(id).is_err()).collect();
        if !extra.is_empty() {
            s.delete(&extra).await.unwrap();
        }
    };
    let insert = median(3, trim, || async {
        s.insert(b(), 1).await.unwrap();
    })
    .await;
    let learn = median(3, trim, || async {
        s.learn(b(), 2, K).await.unwrap();
    })
    .await;
    trim().await;
    // Each round adds 4096 rows and times evicting back to the size before
    // (4096 LRFU victims, whichever they are), so N stays put.
    let before = std::sync::atomic::AtomicUsize::new(0);
    let evict = median(
        3,
        || async {
            before.store(s.len().await.unwrap(), std::sync::atomic::Ordering::Relaxed);
            s.insert(b(), 3).await.unwrap();
        },
        || async {
            let n = before.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(s.evict(n).await.unwrap(), WRITE);
        },
    )
    .await;
    let rate = |d: Duration| WRITE as f64 / d.as_secs_f64();
    [rate(insert), rate(learn), rate(evict)]
}

/// pgvector kNN in SQL, one statement per query: the ids of each query's
/// `K` nearest.
async fn sql_knn(pool: &sqlx::PgPool, queries: &[f32], dim: usize) -> Vec<Vec<i64>> {
    let mut out = Vec::new();
    for q in queries.chunks(dim) {
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM memories ORDER BY key <-> $1 LIMIT $2")
            .bind(Vector::from(q.to_vec()))
            .bind(K as i64)
            .fetch_all(pool)
            .await
            .unwrap();
        out.push(ids);
    }
    out
}

fn recall(got: &[Vec<i64>], exact: &[Vec<i64>]) -> f64 {
    let mut hit = 0;
    for (g, e) in got.iter().zip(exact) {
        hit += g.iter().filter(|id| e.contains(id)).count();
    }
    hit as f64 / (exact.len() * K) as f64
}

/// Server-side search of `queries` in one call: queries/s and each
/// query's ids.
async fn server_search(server: &ServerSearch, queries: &[f32], dim: usize) -> (f64, Vec<Vec<i64>>) {
    let qv = Vectors::new(queries, dim).unwrap();
    let t = Instant::now();
    let answer = server.search(qv, K, None).await.unwrap();
    let qps = qv.len() as f64 / t.elapsed().as_secs_f64();
    let ids = (0..qv.len())
        .map(|i| answer.row_ids(i).iter().flatten().map(|&id| id as i64).collect())
        .collect();
    (qps, ids)
}

/// Keys/s of inserting [`WRITE`] new rows (median of 3; each removed
/// again, untimed).
async fn insert_rate(s: &PostgresStore, dim: usize, seed: u64) -> f64 {
    let keys = uniform(seed, WRITE * dim);
    let values = uniform(seed + 1, WRITE * dim);
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let ids = s
            .insert(
                Batch::new(Vectors::new(&keys, dim).unwrap(), Vectors::new(&values, dim).unwrap()),
                1,
            )
            .await
            .unwrap();
        times.push(t.elapsed());
        s.delete(&ids).await.unwrap();
    }
    times.sort();
    WRITE as f64 / times[1].as_secs_f64()
}

/// Keys/s of `learn` with `clients` clients of one store learning batches
/// of 256 new keys each for `seconds`.
async fn concurrent_learn(url: &str, store: &str, dim: usize, clients: usize, seconds: f64) -> f64 {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let at = PostgresLocation::new(url, store);
        tasks.push(tokio::spawn(async move {
            let s = PostgresStore::open_existing(at).await.unwrap();
            let start = Instant::now();
            let mut rows = 0usize;
            let mut i = 0u64;
            while start.elapsed().as_secs_f64() < seconds {
                let keys = uniform(((c as u64) << 32) + i, 256 * dim);
                let values = uniform(((c as u64) << 32) + i + (1 << 31), 256 * dim);
                s.learn(
                    Batch::new(Vectors::new(&keys, dim).unwrap(), Vectors::new(&values, dim).unwrap()),
                    i,
                    K,
                )
                .await
                .unwrap();
                rows += 256;
                i += 1;
            }
            let secs = start.elapsed().as_secs_f64();
            s.close().await.unwrap();
            rows as f64 / secs
        }));
    }
    let mut total = 0.0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Ok(url) = std::env::var("MEMSTORE_POSTGRES_URL") else {
        eprintln!("postgres bench: set MEMSTORE_POSTGRES_URL (scripts/postgres.sh start prints one); skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    println!("| size | measure | memstore-postgres | baseline | ratio |");
    println!("| --- | --- | ---: | ---: | ---: |");
    for (dim, n) in sizes() {
        let size = format!("{dim} × {n}");
        let config = MemoryConfig::new(dim, dim);
        let keys = uniform(7, n * dim);
        let name = store_name(&format!("d{dim}"));
        let pg = PostgresStore::open(PostgresLocation::new(url.as_str(), name.as_str()), config.clone())
            .await
            .unwrap();
        let t = Instant::now();
        fill(&pg, &keys, dim).await;
        eprintln!("{size}: postgres filled in {:.1} s", t.elapsed().as_secs_f64());
        let sqlite = SqliteStore::open(dir.path().join(format!("{name}.db")), config.clone())
            .await
            .unwrap();
        fill(&sqlite, &keys, dim).await;

        // Search.
        let queries = uniform(11, QUERIES * dim);
        let qv = Vectors::new(&queries, dim).unwrap();
        let ours = median(
            3,
            || async {},
            || async {
                pg.search(qv, K, None).await.unwrap();
            },
        )
        .await;
        let ours_qps = QUERIES as f64 / ours.as_secs_f64();
        let answer = pg.search(qv, K, None).await.unwrap();
        let exact_ids: Vec<Vec<i64>> = (0..QUERIES)
            .map(|i| answer.row_ids(i).iter().flatten().map(|&id| id as i64).collect())
            .collect();
        let pool = pg.driver().pool().clone();
        let sql_queries = 64.min(QUERIES);
        let t = Instant::now();
        let sql_exact = sql_knn(&pool, &queries[..sql_queries * dim], dim).await;
        let sql_qps = sql_queries as f64 / t.elapsed().as_secs_f64();
        println!(
            "| {size} | search, 4096 queries in one call vs one SQL scan per query (q/s) | {ours_qps:.0} | {sql_qps:.1} | {:.0}× |",
            ours_qps / sql_qps
        );
        println!(
            "| {size} | SQL exact kNN recall@8 against the store's exact search | | {:.3} | |",
            recall(&sql_exact, &exact_ids[..sql_queries])
        );
        let at = PostgresLocation::new(url.as_str(), name.as_str());
        let server = ServerSearch::open(at.clone(), ServerSearchOptions::default())
            .await
            .unwrap();
        let (qps, got) = server_search(&server, &queries[..sql_queries * dim], dim).await;
        println!(
            "| {size} | server-side exact search, {sql_queries} queries in one call, vs the in-process index (q/s; recall@8 {:.3}) | {qps:.1} | {ours_qps:.0} | {:.4}× |",
            recall(&got, &exact_ids[..sql_queries]),
            qps / ours_qps
        );
        println!(
            "| {size} | server-side exact search vs one SQL scan per query (q/s) | {qps:.1} | {sql_qps:.1} | {:.2}× |",
            qps / sql_qps
        );
        server.close().await;

        // Inserts with and without the HNSW index on the key column.
        let plain_insert = insert_rate(&pg, dim, 31).await;
        let t = Instant::now();
        create_hnsw_index(&at, 16, 64).await.unwrap();
        eprintln!(
            "{size}: pgvector HNSW index built in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let hnsw_insert = insert_rate(&pg, dim, 31).await;
        println!(
            "| {size} | insert of 4096 with pgvector's HNSW index on the keys vs without (keys/s) | {hnsw_insert:.0} | {plain_insert:.0} | {:.2}× |",
            hnsw_insert / plain_insert
        );
        for ef in [40, 200] {
            let mut conn = pool.acquire().await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!("SET hnsw.ef_search = {ef}")))
                .execute(&mut *conn)
                .await
                .unwrap();
            let m = hnsw_queries().min(QUERIES);
            let t = Instant::now();
            let mut got = Vec::new();
            for q in queries[..m * dim].chunks(dim) {
                let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM memories ORDER BY key <-> $1 LIMIT $2")
                    .bind(Vector::from(q.to_vec()))
                    .bind(K as i64)
                    .fetch_all(&mut *conn)
                    .await
                    .unwrap();
                got.push(ids);
            }
            let qps = m as f64 / t.elapsed().as_secs_f64();
            println!(
                "| {size} | search vs pgvector HNSW per query, ef_search {ef} (q/s; its recall@8 {:.3}) | {ours_qps:.0} | {qps:.0} | {:.1}× |",
                recall(&got, &exact_ids[..m]),
                ours_qps / qps
            );
            let options = ServerSearchOptions::default().with_knn(ServerKnn::Hnsw { ef_search: ef });
            let server = ServerSearch::open(at.clone(), options).await.unwrap();
            let (server_qps, got) = server_search(&server, &queries[..m * dim], dim).await;
            println!(
                "| {size} | server-side HNSW search, ef_search {ef}, {m} queries in one call, vs one statement per query (q/s; recall@8 {:.3}) | {server_qps:.0} | {qps:.0} | {:.2}× |",
                recall(&got, &exact_ids[..m]),
                server_qps / qps
            );
            server.close().await;
        }
        drop_hnsw_index(&at).await.unwrap();

        // Durable writes against SQLite.
        let p = writes(&pg, dim, 21).await;
        let s = writes(&sqlite, dim, 21).await;
        for (i, what) in ["insert", "learn", "evict"].iter().enumerate() {
            println!(
                "| {size} | {what} of 4096 vs the SQLite store (keys/s) | {:.0} | {:.0} | {:.2}× |",
                p[i],
                s[i],
                p[i] / s[i]
            );
        }
        sqlite.close().await.unwrap();

        // Concurrent learners, each run on the same N keys (what a run
        // learned is deleted again, untimed).
        let base = pg.ids().await.unwrap();
        let mut rates = Vec::new();
        for clients in [1, 2, 4] {
            rates.push(concurrent_learn(&url, &name, dim, clients, 5.0).await);
            let extra: Vec<u64> = pg
                .ids()
                .await
                .unwrap()
                .into_iter()
                .filter(|id| base.binary_search(id).is_err())
                .collect();
            pg.delete(&extra).await.unwrap();
        }
        for (clients, rate) in [1, 2, 4].iter().zip(&rates) {
            println!(
                "| {size} | learn, {clients} client(s) at once, 256 keys a call (keys/s in all) vs 1 client | {rate:.0} | {:.0} | {:.2}× |",
                rates[0],
                rate / rates[0]
            );
        }
        pg.close().await.unwrap();
        let admin = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {name} CASCADE")))
            .execute(&admin)
            .await
            .unwrap();
    }
}
