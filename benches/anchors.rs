//! memstore's search against the raw SQL anchor in the same run: sqlite-vec's
//! `vec0` kNN in plain SQL (one query per statement, as SQL allows) on the
//! very same keys (the store mirrors its keys into `vec0`), and memstore's
//! batched exact search through the `MemoryStore` trait. 100k random 64-d
//! keys, k = 8. Run with `cargo bench --bench anchors`; table with
//! `python3 scripts/bench_table.py anchor_ --baseline sqlite-vec-sql`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use memstore::{Batch, MemoryConfig, MemoryStore, SqliteStore, Vectors};

mod common;
use common::data;

const DIM: usize = 64;
const N: usize = 100_000;
const K: usize = 8;

fn anchors(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = rt.block_on(async {
        let s = SqliteStore::open(dir.path().join("anchor.db"), MemoryConfig::new(DIM, DIM))
            .await
            .unwrap();
        let keys = data(1, N * DIM);
        let vals = data(2, N * DIM);
        for (k, v) in keys.chunks(4096 * DIM).zip(vals.chunks(4096 * DIM)) {
            s.insert(
                Batch::new(Vectors::new(k, DIM).unwrap(), Vectors::new(v, DIM).unwrap()),
                0,
            )
            .await
            .unwrap();
        }
        Arc::new(s)
    });
    let mut g = c.benchmark_group(format!("anchor_search_dim{DIM}_n{}k_k{K}", N / 1000));
    g.sample_size(10).measurement_time(Duration::from_secs(4));

    // The anchor: one vec0 kNN statement per query (what SQL offers).
    let q1 = data(3, DIM);
    let blob: Vec<u8> = q1.iter().flat_map(|x| x.to_le_bytes()).collect();
    g.throughput(Throughput::Elements(1));
    g.bench_function(BenchmarkId::new("sqlite-vec-sql", 1), |b| {
        b.to_async(&rt).iter(|| {
            let (s, blob) = (store.clone(), blob.clone());
            async move {
                tokio::spawn(async move {
                    sqlx::query("SELECT rowid, distance FROM memory_keys WHERE key MATCH ? AND k = ? ORDER BY distance")
                        .bind(blob)
                        .bind(K as i64)
                        .fetch_all(s.pool())
                        .await
                        .unwrap()
                        .len()
                })
                .await
                .unwrap()
            }
        })
    });
    for batch in [1usize, 64, 4096] {
        let q = Arc::new(data(4, batch * DIM));
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(BenchmarkId::new("memstore-sqlite", batch), |b| {
            b.to_async(&rt).iter(|| {
                let (s, q) = (store.clone(), q.clone());
                async move {
                    tokio::spawn(async move { s.search(Vectors::new(&q, DIM).unwrap(), K, None).await.unwrap() })
                        .await
                        .unwrap()
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, anchors);
criterion_main!(benches);
