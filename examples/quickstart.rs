//! memstore on its own: create a SQLite memory store, `learn` a stream of
//! clustered observations (novelty-gated inserts, recombination of
//! near-duplicates, LRFU eviction at capacity), query it, reopen it and check
//! that it comes back identical.
//!
//! `cargo run --release --example quickstart [-- RUN_DIR]` (default `runs/quickstart`).

use std::time::Instant;

use rand_core::{RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;

use memstore::{Batch, EvictionPolicy, MemoryConfig, MemoryStore, Metric, SqliteStore, TagFilter, Tags, Vectors};

/// Uniform in `[-1, 1)`.
fn unit(rng: &mut SplitMix64) -> f32 {
    ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let run_dir = std::env::args().nth(1).unwrap_or_else(|| "runs/quickstart".into());
    std::fs::create_dir_all(&run_dir)?;
    let path = std::path::Path::new(&run_dir).join("memory.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let (dk, dv, clusters, batches, batch) = (64usize, 64usize, 2000usize, 20usize, 1024usize);
    let config = MemoryConfig::new(dk, dv)
        .with_metric(Metric::L2)
        .with_capacity(10_000)
        .with_eviction(EvictionPolicy::Lrfu { lambda: 0.01 })
        .with_thresholds(0.5, 1.0);
    let sql_knn = std::env::var("QS_KNN").map(|v| v != "0").unwrap_or(true);
    let store = memstore::SqliteStore::open_with(
        &path,
        config.clone(),
        memstore::SqliteOptions::default().with_sql_knn(sql_knn),
    )
    .await?;
    println!(
        "store: {} (key dim {dk}, value dim {dv}, capacity 10000)",
        path.display()
    );

    let mut rng = SplitMix64::seed_from_u64(42);
    let centres: Vec<f32> = (0..clusters * dk).map(|_| unit(&mut rng)).collect();
    let t0 = Instant::now();
    for step in 0..batches {
        let mut keys = Vec::with_capacity(batch * dk);
        for _ in 0..batch {
            let c = ((unit(&mut rng) + 1.0) / 2.0 * clusters as f32) as usize % clusters;
            keys.extend(centres[c * dk..(c + 1) * dk].iter().map(|x| x + 0.05 * unit(&mut rng)));
        }
        let values: Vec<f32> = (0..batch * dv).map(|_| unit(&mut rng)).collect();
        let tag = vec![format!("epoch{}", step / 10)];
        let b = Batch::new(Vectors::new(&keys, dk)?, Vectors::new(&values, dv)?).with_tags(Tags::Same(&tag));
        store.learn(b, step as u64, 8).await?;
        let s = store.stats().await?;
        println!(
            "step {step:>2}: {:>5} memories | inserted {:>5} merged {:>5} evicted {:>4}",
            s.len, s.counters.inserted, s.counters.merged, s.counters.evicted
        );
    }
    let learned = batches * batch;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "learned {learned} observations in {secs:.2} s ({:.0} keys/s, durable)",
        learned as f64 / secs
    );

    let queries: Vec<f32> = centres[..64 * dk].to_vec();
    let t0 = Instant::now();
    let hits = store.search(Vectors::new(&queries, dk)?, 8, None).await?;
    println!(
        "searched 64 queries (k = 8) in {:.2} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    for i in 0..3 {
        println!(
            "  query {i}: nearest {:?} at distance {:.3}",
            hits.id(i, 0),
            hits.distance(i, 0)
        );
    }
    let filtered = store
        .search(
            Vectors::new(&queries[..dk], dk)?,
            4,
            Some(&TagFilter::Any(vec!["epoch1".into()])),
        )
        .await?;
    println!("  query 0 among memories tagged epoch1: {:?}", filtered.row_ids(0));

    let before = store.stats().await?;
    store.close().await?;
    let reopened = SqliteStore::open(&path, config).await?;
    let after = reopened.stats().await?;
    assert_eq!(before, after, "the reopened store differs");
    let again = reopened.search(Vectors::new(&queries, dk)?, 8, None).await?;
    assert_eq!(hits, again, "search after reopen differs");
    println!(
        "reopened {}: {} memories, identical search results",
        path.display(),
        after.len
    );
    println!("size on disk: {:.1} MB", std::fs::metadata(&path)?.len() as f64 / 1e6);
    Ok(())
}
