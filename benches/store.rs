//! Store throughput (criterion): search, insert and learn through the
//! `MemoryStore` trait, SQLite backend next to the naive reference model as
//! the in-run baseline. Run with `cargo bench --bench store`.
//! The full matrix (N up to 1M, dim 768, HNSW, raw sqlite-vec and DuckDB SQL
//! anchors) is `benches/anchors.rs`; this is its small, quick companion.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use memstore::{Batch, InMemoryStore, MemoryConfig, MemoryStore, SqliteStore, Vectors};

mod common;
use common::data;

const DIM: usize = 64;
const N: usize = 10_000;

async fn filled<S: MemoryStore>(s: S) -> S {
    let keys = data(1, N * DIM);
    for c in keys.chunks(4096 * DIM) {
        let n = c.len() / DIM;
        let vals = vec![0.5f32; n * DIM];
        let b = Batch::new(Vectors::new(c, DIM).unwrap(), Vectors::new(&vals, DIM).unwrap());
        s.insert(b, 0).await.unwrap();
    }
    s
}

fn search(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = MemoryConfig::new(DIM, DIM);
    let sqlite = rt.block_on(async {
        filled(
            SqliteStore::open(dir.path().join("bench.db"), config.clone())
                .await
                .unwrap(),
        )
        .await
    });
    let reference = rt.block_on(filled(InMemoryStore::new(config).unwrap()));
    // Calls run in spawned tasks, as an application's would (a call from
    // `block_on` on the main thread measured ~25% slower in process).
    let (sqlite, reference): (Arc<dyn MemoryStore>, Arc<dyn MemoryStore>) = (Arc::new(sqlite), Arc::new(reference));
    let mut g = c.benchmark_group(format!("search_dim{DIM}_n{N}_k8"));
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for batch in [1usize, 64, 1024] {
        let q = Arc::new(data(2, batch * DIM));
        g.throughput(Throughput::Elements(batch as u64));
        for (name, store) in [("sqlite", &sqlite), ("reference", &reference)] {
            if name == "reference" && batch > 64 {
                continue;
            }
            g.bench_function(BenchmarkId::new(name, batch), |b| {
                b.to_async(&rt).iter(|| {
                    let (s, q) = (store.clone(), q.clone());
                    async move {
                        tokio::spawn(async move { s.search(Vectors::new(&q, DIM).unwrap(), 8, None).await.unwrap() })
                            .await
                            .unwrap()
                    }
                })
            });
        }
    }
    g.finish();
}

fn writes(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut g = c.benchmark_group(format!("write_dim{DIM}_batch4096"));
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(4096));
    let keys = data(3, 4096 * DIM);
    let vals = data(4, 4096 * DIM);
    let config = MemoryConfig::new(DIM, DIM).with_thresholds(0.1, 0.5);
    for op in ["insert", "learn"] {
        g.bench_function(BenchmarkId::new("sqlite", op), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (keys, vals, config) = (keys.clone(), vals.clone(), config.clone());
                async move {
                    tokio::spawn(async move {
                        let (keys, vals) = (&keys, &vals);
                        let mut total = Duration::ZERO;
                        for i in 0..iters {
                            let dir = tempfile::tempdir().unwrap();
                            let s = filled(
                                SqliteStore::open(dir.path().join("w.db"), config.clone())
                                    .await
                                    .unwrap(),
                            )
                            .await;
                            let batch = Batch::new(Vectors::new(keys, DIM).unwrap(), Vectors::new(vals, DIM).unwrap());
                            let t = Instant::now();
                            if op == "insert" {
                                s.insert(batch, 1 + i).await.unwrap();
                            } else {
                                s.learn(batch, 1 + i, 8).await.unwrap();
                            }
                            total += t.elapsed();
                            s.close().await.expect("close");
                        }
                        total
                    })
                    .await
                    .unwrap()
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, search, writes);
criterion_main!(benches);
