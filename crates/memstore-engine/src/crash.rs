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

/// The shared-store load: clients `learn` concurrently into one store whose
/// result does not depend on their order, so that its totals are exact.
/// The store holds [`ANCHORS`] anchor memories (tagged `anchor`); every
/// batch of a client learns exact copies of random anchors (each merges
/// into its anchor: same key and value, access count and the client's tag
/// count up by one) and keys no other row comes near (each inserted, tagged
/// with the client). A lost update, a merge applied twice or an id reused
/// shows in the counts.
pub mod shared {
    use super::*;

    /// Anchor memories in the store.
    pub const ANCHORS: usize = 16;

    /// 4-d keys, 2-d values; exact copies merge, keys 1 apart are new.
    pub fn config() -> MemoryConfig {
        MemoryConfig::new(4, 2).with_thresholds(0.01, 0.25)
    }

    /// Anchor `a`'s key (anchors are 100 apart, far from every new key).
    pub fn anchor_key(a: usize) -> [f32; 4] {
        [-100.0 * (a as f32 + 1.0), 0.0, 0.0, 0.0]
    }

    /// Anchor `a`'s value (every copy learned carries it too).
    pub fn anchor_value(a: usize) -> [f32; 2] {
        [a as f32, 1.0]
    }

    /// Client `client`'s `n`-th new key: unit steps on a line of its own.
    pub fn novel_key(client: u64, n: u64) -> [f32; 4] {
        [1000.0 * (client as f32 + 1.0), n as f32, 0.0, 0.0]
    }

    /// The tag of client `client`'s rows.
    pub fn tag(client: u64) -> String {
        format!("c{client}")
    }

    /// Learns batches (4 anchor copies and 4 new keys each) for `seconds`,
    /// then writes what it sent: `anchor <a> <copies>` per anchor and
    /// `novel <keys>`.
    pub async fn learn_for<S: MemoryStore + ?Sized>(
        store: &S,
        client: u64,
        seconds: f64,
        out: &mut dyn Write,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let mut rng = SplitMix64::seed_from_u64(client);
        let mut copies = [0u64; ANCHORS];
        let mut novel = 0u64;
        let tags = vec![tag(client)];
        let start = std::time::Instant::now();
        let mut tick = 1;
        while start.elapsed().as_secs_f64() < seconds {
            let (mut keys, mut values) = (Vec::new(), Vec::new());
            for _ in 0..4 {
                let a = (rng.next_u64() % ANCHORS as u64) as usize;
                copies[a] += 1;
                keys.extend(anchor_key(a));
                values.extend(anchor_value(a));
            }
            for _ in 0..4 {
                keys.extend(novel_key(client, novel));
                values.extend([novel as f32, 0.0]);
                novel += 1;
            }
            let b = Batch::new(Vectors::new(&keys, 4)?, Vectors::new(&values, 2)?).with_tags(Tags::Same(&tags));
            store.learn(b, tick, 4).await?;
            tick += 1;
        }
        for (a, n) in copies.iter().enumerate() {
            writeln!(out, "anchor {a} {n}")?;
        }
        writeln!(out, "novel {novel}")?;
        out.flush()?;
        Ok(())
    }
}
