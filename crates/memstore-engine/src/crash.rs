//! The write load of the drivers' crash-consistency tests (the
//! `memstore-<backend>-writer` binaries): batches tagged `b<i>` with seeded
//! keys and values, alternating `insert` and `learn`, each acknowledged by a
//! `committed <i>` line only after the store returned. The tests kill the
//! writer with SIGKILL at random moments and check that the reopened file
//! holds every acknowledged batch whole and no batch in part (as redb's crash
//! tests kill a writer and reopen).

use std::io::Write;

use memstore_api::{Batch, MemoryConfig, MemoryStore, Tags, Vectors};
use rand_core::{RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;

/// The configuration the crash tests expect (8-d keys, 4-d values, never merge).
pub fn config() -> MemoryConfig {
    MemoryConfig::new(8, 4)
}

/// Commits batches `first..first + batches` of `rows` rows each to `store`
/// (even ones inserted, odd ones learned), writing `committed <i>` to `out`
/// and flushing it after each returns.
pub async fn write_batches<S: MemoryStore + ?Sized>(
    store: &S,
    first: u64,
    batches: u64,
    rows: usize,
    out: &mut dyn Write,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = SplitMix64::seed_from_u64(first);
    let mut next = move || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
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
    Ok(())
}

/// Parses `PATH FIRST_BATCH BATCHES ROWS` from the arguments after the
/// program name (`name` is the program, for the usage message).
pub fn args(name: &str) -> Result<(String, u64, u64, usize), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path, first, batches, rows] = args.as_slice() else {
        return Err(format!("usage: {name} PATH FIRST_BATCH BATCHES ROWS").into());
    };
    Ok((path.clone(), first.parse()?, batches.parse()?, rows.parse()?))
}
