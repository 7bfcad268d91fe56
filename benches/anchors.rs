//! The store benchmark matrix, with the raw SQL anchors in the same run:
//!
//! - search (queries/s, k = 8) at batch 1, 64 and 4096 through the
//!   `MemoryStore` trait (SQLite, and DuckDB with `--features duckdb`), against
//!   one kNN statement per query in plain SQL on the very same keys:
//!   sqlite-vec's `vec0` (the SQLite store mirrors its keys into it) and
//!   DuckDB's `array_distance ... ORDER BY ... LIMIT` (the DuckDB store keeps
//!   keys as `FLOAT[dim]`);
//! - durable writes of 4096 rows (keys/s): `insert`, `learn` (search +
//!   novelty gate + insert in one transaction) and `evict` (4096 LRFU
//!   victims), each on a store of N keys (the rows are removed again, untimed,
//!   so N stays put), also for the exact SQLite store without its `vec0`
//!   mirror (`sqlite-no-vec0`, `SqliteOptions::sql_knn = false`).
//!
//! - with `--features hnsw`: the SQLite store again with the HNSW index kind
//!   (`memstore-sqlite-hnsw`, default HNSW options), its recall@8 against the
//!   exact store printed for the same 4096 queries (with `duckdb` too, the
//!   DuckDB store with the HNSW index kind, `memstore-duckdb-hnsw`); and the in-memory
//!   reference store (a plain scalar scan, the naive baseline; batches 1 and
//!   64 only).
//!
//! `MEMSTORE_BENCH_LEARN_ONCE=1` also times one `learn` of 4096 keys on each
//! HNSW store (printed), for sizes where criterion's ten samples take too long;
//! the recall line of each HNSW store also gives the time of its batch of 4096
//! (one call), and `MEMSTORE_BENCH_REFERENCE_4096=1` times one batch of 4096 on
//! the in-memory reference.
//!
//! `MEMSTORE_BENCH_KEYS=clustered` fills the stores with keys that cluster
//! like embeddings (1024 centroids, a 16-dimensional spread; queries from the
//! same distribution) instead of uniform random keys (HNSW's worst case).
//!
//! Sizes: `MEMSTORE_BENCH_SIZES="64x10000,64x100000,768x10000"` (dim × N;
//! default `64x100000`). Run with `cargo bench --bench anchors` (add
//! `--features duckdb` after `scripts/fetch-libduckdb.sh`); tables with
//! `python3 scripts/bench_table.py anchor_search --baseline sqlite-vec-sql`
//! and `python3 scripts/bench_table.py anchor_write`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use memstore::{Batch, MemoryConfig, MemoryStore, SqliteStore, Vectors};

mod common;
use common::{data, keys};

const K: usize = 8;
const WRITE: usize = 4096;
const BATCHES: [usize; 3] = [1, 64, 4096];

fn sizes() -> Vec<(usize, usize)> {
    let spec = std::env::var("MEMSTORE_BENCH_SIZES").unwrap_or_else(|_| "64x100000".into());
    spec.split(',')
        .filter_map(|s| {
            let (d, n) = s.trim().split_once('x')?;
            Some((d.parse().ok()?, n.parse().ok()?))
        })
        .collect()
}

/// [`fill`], printing how long it took (an HNSW store builds its graph as it
/// fills: minutes at dim 768).
#[cfg(feature = "hnsw")]
async fn fill_timed(name: &str, s: &dyn MemoryStore, dim: usize, n: usize) {
    let t = Instant::now();
    fill(s, dim, n).await;
    eprintln!("{name} dim {dim} n {n}: filled in {:.1} s", t.elapsed().as_secs_f64());
}

async fn fill(s: &dyn MemoryStore, dim: usize, n: usize) {
    let keys = keys(1, n, dim);
    let vals = data(2, n * dim);
    for (k, v) in keys.chunks(4096 * dim).zip(vals.chunks(4096 * dim)) {
        s.insert(
            Batch::new(Vectors::new(k, dim).unwrap(), Vectors::new(v, dim).unwrap()),
            0,
        )
        .await
        .unwrap();
    }
}

/// Searches through the trait at these batch sizes.
fn bench_search(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    name: &str,
    store: Arc<dyn MemoryStore>,
    dim: usize,
    batches: &[usize],
) {
    for &batch in batches {
        let q = Arc::new(keys(4, batch, dim));
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(BenchmarkId::new(name, batch), |b| {
            b.to_async(rt).iter(|| {
                let (s, q) = (store.clone(), q.clone());
                async move {
                    tokio::spawn(async move { s.search(Vectors::new(&q, dim).unwrap(), K, None).await.unwrap() })
                        .await
                        .unwrap()
                }
            })
        });
    }
}

/// Durable insert, learn and evict of 4096 rows on a store of N keys; the
/// rows are removed again (untimed) so the store keeps its size.
fn bench_writes(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    name: &str,
    store: Arc<dyn MemoryStore>,
    dim: usize,
) {
    g.throughput(Throughput::Elements(WRITE as u64));
    let keys = Arc::new(keys(7, WRITE, dim));
    let vals = Arc::new(data(8, WRITE * dim));
    for op in ["insert", "learn", "evict"] {
        g.bench_function(BenchmarkId::new(format!("{op}-{name}"), WRITE), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for i in 0..iters {
                    let (k, v) = (keys.to_vec(), vals.to_vec());
                    let s = store.clone();
                    spent += rt.block_on(async move {
                        tokio::spawn(async move {
                            let b = Batch::new(Vectors::new(&k, dim).unwrap(), Vectors::new(&v, dim).unwrap());
                            let before = s.stats().await.unwrap().next_id;
                            let len = s.len().await.unwrap();
                            let t = Instant::now();
                            let spent = match op {
                                "insert" => {
                                    s.insert(b, i + 1).await.unwrap();
                                    t.elapsed()
                                }
                                "learn" => {
                                    s.learn(b, i + 1, K).await.unwrap();
                                    t.elapsed()
                                }
                                _ => {
                                    s.insert(b, i + 1).await.unwrap();
                                    let t = Instant::now();
                                    assert_eq!(s.evict(len).await.unwrap(), WRITE);
                                    return t.elapsed();
                                }
                            };
                            let after = s.stats().await.unwrap().next_id;
                            let new: Vec<u64> = (before..after).collect();
                            s.delete(&new).await.unwrap();
                            spent
                        })
                        .await
                        .unwrap()
                    });
                }
                spent
            })
        });
    }
}

fn anchors(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (dim, n) in sizes() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = rt.block_on(async {
            let s = SqliteStore::open(dir.path().join("anchor.db"), MemoryConfig::new(dim, dim))
                .await
                .unwrap();
            fill(&s, dim, n).await;
            Arc::new(s)
        });
        // The same exact store without the `vec0` mirror (no SQL kNN through
        // vec0, which costs writes): its writes only.
        let bare = rt.block_on(async {
            let options = memstore::SqliteOptions::default().with_sql_knn(false);
            let s = SqliteStore::open_with(dir.path().join("anchor-bare.db"), MemoryConfig::new(dim, dim), options)
                .await
                .unwrap();
            fill(&s, dim, n).await;
            Arc::new(s)
        });
        #[cfg(feature = "duckdb")]
        let duck = rt.block_on(async {
            let s = memstore::DuckdbStore::open(dir.path().join("anchor.duckdb"), MemoryConfig::new(dim, dim))
                .await
                .unwrap();
            fill(&s, dim, n).await;
            Arc::new(s)
        });
        #[cfg(feature = "hnsw")]
        let hnsw = rt.block_on(async {
            let options = memstore::SqliteOptions::default()
                .with_index(
                    memstore::IndexOptions::default()
                        .with_ann(Arc::new(memstore::Hnsw::new(memstore::HnswOptions::default()))),
                )
                .with_sql_knn(false);
            let s = SqliteStore::open_with(dir.path().join("anchor-hnsw.db"), MemoryConfig::new(dim, dim), options)
                .await
                .unwrap();
            fill_timed("memstore-sqlite-hnsw", &s, dim, n).await;
            Arc::new(s)
        });
        #[cfg(feature = "hnsw")]
        let reference = rt.block_on(async {
            let s = memstore::InMemoryStore::new(MemoryConfig::new(dim, dim)).unwrap();
            fill(&s, dim, n).await;
            Arc::new(s)
        });
        #[cfg(all(feature = "hnsw", feature = "duckdb"))]
        let duck_hnsw = rt.block_on(async {
            let options = {
                let mut o = memstore::DuckdbOptions::default();
                o.index = memstore::IndexOptions::default()
                    .with_ann(Arc::new(memstore::Hnsw::new(memstore::HnswOptions::default())));
                o
            };
            let s = memstore::DuckdbStore::open_with(
                dir.path().join("anchor-hnsw.duckdb"),
                MemoryConfig::new(dim, dim),
                options,
            )
            .await
            .unwrap();
            fill_timed("memstore-duckdb-hnsw", &s, dim, n).await;
            Arc::new(s)
        });
        #[cfg(feature = "hnsw")]
        rt.block_on(async {
            let q = keys(4, 4096, dim);
            let exact = sqlite.search(Vectors::new(&q, dim).unwrap(), K, None).await.unwrap();
            #[allow(unused_mut)]
            let mut approximate: Vec<(&str, Arc<dyn MemoryStore>)> =
                vec![("memstore-sqlite-hnsw", hnsw.clone() as Arc<dyn MemoryStore>)];
            #[cfg(feature = "duckdb")]
            approximate.push(("memstore-duckdb-hnsw", duck_hnsw.clone() as Arc<dyn MemoryStore>));
            for (name, store) in approximate {
                let t = Instant::now();
                let approx = store.search(Vectors::new(&q, dim).unwrap(), K, None).await.unwrap();
                let spent = t.elapsed().as_secs_f64();
                let mut hit = 0;
                for i in 0..4096 {
                    let want: std::collections::HashSet<_> = exact.row_ids(i).iter().flatten().collect();
                    hit += approx
                        .row_ids(i)
                        .iter()
                        .flatten()
                        .filter(|id| want.contains(id))
                        .count();
                }
                let recall = hit as f64 / (4096 * K) as f64;
                eprintln!(
                    "{name} dim {dim} n {n}: recall@{K} {recall:.4} (4096 queries, vs exact); \
                     that batch of 4096 timed once: {spent:.2} s ({:.0} queries/s)",
                    4096.0 / spent
                );
                // One learn of 4096 keys, timed once: at dim 768 an HNSW
                // store's learn takes minutes (its 4096 searches run at the
                // calibrated ef), too long for criterion's ten samples
                // (filter it out there with a regex, see docs/benchmarks.md).
                if std::env::var_os("MEMSTORE_BENCH_LEARN_ONCE").is_some() {
                    let (k, v) = (keys(7, WRITE, dim), data(8, WRITE * dim));
                    let before = store.stats().await.unwrap().next_id;
                    let t = Instant::now();
                    let b = Batch::new(Vectors::new(&k, dim).unwrap(), Vectors::new(&v, dim).unwrap());
                    store.learn(b, 1, K).await.unwrap();
                    let spent = t.elapsed().as_secs_f64();
                    let after = store.stats().await.unwrap().next_id;
                    store.delete(&(before..after).collect::<Vec<_>>()).await.unwrap();
                    eprintln!(
                        "{name} dim {dim} n {n}: one learn of {WRITE} keys in {spent:.1} s ({:.0} keys/s)",
                        WRITE as f64 / spent
                    );
                }
            }
            // The naive scan at batch 4096, timed once (minutes: criterion
            // runs it at batches 1 and 64 only).
            if std::env::var_os("MEMSTORE_BENCH_REFERENCE_4096").is_some() {
                let t = Instant::now();
                let got = reference.search(Vectors::new(&q, dim).unwrap(), K, None).await.unwrap();
                let spent = t.elapsed().as_secs_f64();
                assert_eq!(got.row_ids(4095).iter().flatten().count(), K);
                eprintln!(
                    "in-memory dim {dim} n {n}: one batch of 4096 queries in {spent:.1} s ({:.1} queries/s)",
                    4096.0 / spent
                );
            }
        });
        let label = if n >= 1_000_000 {
            format!("{}M", n / 1_000_000)
        } else {
            format!("{}k", n / 1000)
        };

        let mut g = c.benchmark_group(format!("anchor_search_dim{dim}_n{label}_k{K}"));
        g.sample_size(10).measurement_time(Duration::from_secs(4));
        // The anchors: one kNN statement per query (what SQL offers).
        let q1 = keys(3, 1, dim);
        let blob: Vec<u8> = q1.iter().flat_map(|x| x.to_le_bytes()).collect();
        g.throughput(Throughput::Elements(1));
        let s = sqlite.clone();
        g.bench_function(BenchmarkId::new("sqlite-vec-sql", 1), |b| {
            b.to_async(&rt).iter(|| {
                let (s, blob) = (s.clone(), blob.clone());
                async move {
                    tokio::spawn(async move {
                        sqlx::query(
                            "SELECT rowid, distance FROM memory_keys WHERE key MATCH ? AND k = ? ORDER BY distance",
                        )
                        .bind(blob)
                        .bind(K as i64)
                        .fetch_all(s.driver().pool())
                        .await
                        .unwrap()
                        .len()
                    })
                    .await
                    .unwrap()
                }
            })
        });
        #[cfg(feature = "duckdb")]
        {
            let literal = q1.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(",");
            let sql = Arc::new(format!(
                "SELECT id, array_distance(key, [{literal}]::FLOAT[{dim}]) AS d FROM memories ORDER BY d LIMIT {K}"
            ));
            let s = duck.clone();
            g.bench_function(BenchmarkId::new("duckdb-sql", 1), |b| {
                b.to_async(&rt).iter(|| {
                    let (s, sql) = (s.clone(), sql.clone());
                    async move {
                        tokio::spawn(async move {
                            s.driver()
                                .with_reader(|c| {
                                    let mut st = c.prepare(&sql)?;
                                    let rows = st.query_map([], |r| r.get::<_, i64>(0))?;
                                    rows.collect::<Result<Vec<_>, _>>()
                                })
                                .await
                                .unwrap()
                                .len()
                        })
                        .await
                        .unwrap()
                    }
                })
            });
        }
        bench_search(&mut g, &rt, "memstore-sqlite", sqlite.clone(), dim, &BATCHES);
        #[cfg(feature = "duckdb")]
        bench_search(&mut g, &rt, "memstore-duckdb", duck.clone(), dim, &BATCHES);
        #[cfg(feature = "hnsw")]
        bench_search(&mut g, &rt, "memstore-sqlite-hnsw", hnsw.clone(), dim, &BATCHES);
        #[cfg(all(feature = "hnsw", feature = "duckdb"))]
        bench_search(&mut g, &rt, "memstore-duckdb-hnsw", duck_hnsw.clone(), dim, &BATCHES);
        #[cfg(feature = "hnsw")]
        // The naive scan answers 4096 queries in minutes: batches 1 and 64 only.
        bench_search(&mut g, &rt, "in-memory", reference.clone(), dim, &BATCHES[..2]);
        g.finish();

        let mut g = c.benchmark_group(format!("anchor_write_dim{dim}_n{label}"));
        g.sample_size(10).measurement_time(Duration::from_secs(4));
        bench_writes(&mut g, &rt, "sqlite", sqlite.clone(), dim);
        bench_writes(&mut g, &rt, "sqlite-no-vec0", bare.clone(), dim);
        #[cfg(feature = "duckdb")]
        bench_writes(&mut g, &rt, "duckdb", duck.clone(), dim);
        #[cfg(feature = "hnsw")]
        bench_writes(&mut g, &rt, "sqlite-hnsw", hnsw.clone(), dim);
        #[cfg(all(feature = "hnsw", feature = "duckdb"))]
        bench_writes(&mut g, &rt, "duckdb-hnsw", duck_hnsw.clone(), dim);
        g.finish();
    }
}

criterion_group!(benches, anchors);
criterion_main!(benches);
