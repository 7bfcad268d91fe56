//! A write-load generator for crash-consistency tests: opens (or creates) a
//! store and commits batches tagged `b<i>`, alternating `insert` and `learn`,
//! printing `committed <i>` after each one returns. The tests kill it with
//! SIGKILL at random moments and check the file.
//!
//! Usage: `memstore-sqlite-writer PATH FIRST_BATCH BATCHES ROWS`

use rand_core::{RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;
use std::io::Write;

use memstore_api::{Batch, MemoryConfig, MemoryStore, Tags, Vectors};
use memstore_sqlite::SqliteStore;

/// The configuration the crash tests expect (8-d keys, 4-d values, never merge).
fn config() -> MemoryConfig {
    MemoryConfig::new(8, 4)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        return Err("usage: memstore-sqlite-writer PATH FIRST_BATCH BATCHES ROWS".into());
    }
    let (first, batches, rows): (u64, u64, usize) = (args[2].parse()?, args[3].parse()?, args[4].parse()?);
    let store = SqliteStore::open(&args[1], config()).await?;
    let mut rng = SplitMix64::seed_from_u64(first);
    let mut next = move || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
    let mut out = std::io::stdout().lock();
    for i in first..first + batches {
        let keys: Vec<f32> = (0..rows * 8).map(|_| next() * 1000.0).collect();
        let values: Vec<f32> = (0..rows * 4).map(|_| next()).collect();
        let tag = vec![format!("b{i}")];
        let b = Batch::new(Vectors::new(&keys, 8)?, Vectors::new(&values, 4)?).with_tags(Tags::Same(&tag));
        if i % 2 == 0 {
            store.insert(b, i).await?;
        } else {
            store.learn(b, i, 4).await?;
        }
        writeln!(out, "committed {i}")?;
        out.flush()?;
    }
    store.close().await?;
    Ok(())
}
