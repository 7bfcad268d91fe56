//! Helpers for the conformance cases: deterministic data and brute-force oracles.

use std::collections::BTreeMap;

use rand_core::{RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;

use crate::{Batch, DurableStore, Memory, MemoryConfig, MemoryId, MemoryStore, Metric, Stats, Tags, Vectors};

/// A seeded generator (`rand_xoshiro`'s SplitMix64) with the draws the cases
/// use: the same seed gives the same data on every platform.
pub struct Rng(SplitMix64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Rng(SplitMix64::seed_from_u64(seed))
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `[-1, 1)`.
    pub fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `n × d` uniform floats.
    pub fn vecs(&mut self, n: usize, d: usize) -> Vec<f32> {
        (0..n * d).map(|_| self.unit()).collect()
    }
}

/// `n` uniform floats in `[-1, 1)` from `seed` (benches' and tests' data).
pub fn uniform(seed: u64, n: usize) -> Vec<f32> {
    Rng::new(seed).vecs(n, 1)
}

/// Overwrites rows `0, step, 2·step, …` of `keys` (rows of `dim`) with
/// randomly chosen rows of `stored`: exact duplicates of stored keys.
pub fn copy_stored_rows(rng: &mut Rng, keys: &mut [f32], dim: usize, stored: &[f32], step: usize) {
    let (n, stored_rows) = (keys.len() / dim, stored.len() / dim);
    for i in (0..n).step_by(step) {
        let j = rng.below(stored_rows as u64) as usize;
        keys[i * dim..(i + 1) * dim].copy_from_slice(&stored[j * dim..(j + 1) * dim]);
    }
}

/// Overwrites rows `from, from + step, …` of `keys` (rows of `dim`) with
/// copies of randomly chosen earlier rows: exact duplicates within a batch.
pub fn copy_earlier_rows(rng: &mut Rng, keys: &mut [f32], dim: usize, from: usize, step: usize) {
    for i in (from..keys.len() / dim).step_by(step) {
        let j = rng.below(i as u64) as usize;
        keys.copy_within(j * dim..(j + 1) * dim, i * dim);
    }
}

/// A configuration with L2, no capacity and never-merge, always-insert thresholds.
pub fn cfg(key_dim: usize, value_dim: usize) -> MemoryConfig {
    MemoryConfig::new(key_dim, value_dim)
}

/// Wraps a flat buffer; panics on a bad shape (test helper only).
pub fn v(data: &[f32], dim: usize) -> Vectors<'_> {
    Vectors::new(data, dim).expect("test data has a whole number of rows")
}

/// Inserts `keys`/`values` untagged at `tick`.
pub async fn ins<S: MemoryStore + ?Sized>(s: &S, keys: &[f32], values: &[f32], tick: u64) -> Vec<MemoryId> {
    let c = s.config().clone();
    s.insert(Batch::new(v(keys, c.key_dim), v(values, c.value_dim)), tick)
        .await
        .expect("insert")
}

/// Inserts with per-row tags.
pub async fn ins_tagged<S: MemoryStore + ?Sized>(
    s: &S,
    keys: &[f32],
    values: &[f32],
    tags: &[Vec<String>],
    tick: u64,
) -> Vec<MemoryId> {
    let c = s.config().clone();
    s.insert(
        Batch::new(v(keys, c.key_dim), v(values, c.value_dim)).with_tags(Tags::PerRow(tags)),
        tick,
    )
    .await
    .expect("insert")
}

/// Tag list from string literals.
pub fn tags(t: &[&str]) -> Vec<String> {
    t.iter().map(|s| s.to_string()).collect()
}

/// Every memory of the store, by id (via `ids` and `get`).
pub async fn dump<S: MemoryStore + ?Sized>(s: &S) -> (BTreeMap<MemoryId, Memory>, Stats) {
    let st = s.stats().await.expect("stats");
    let ids = s.ids().await.expect("ids");
    let out: BTreeMap<MemoryId, Memory> = s
        .get(&ids)
        .await
        .expect("get every listed id")
        .into_iter()
        .map(|m| (m.id, m))
        .collect();
    assert_eq!(out.len() as u64, st.len, "stats.len disagrees with ids()");
    (out, st)
}

/// Exercises [`DurableStore`] on `store`, the store of the file `path`:
/// 50 memories are inserted, a backup onto `path` itself (a file that
/// exists) is refused, a backup to `copy` is taken and the store closed, all
/// through the trait; `reopen` then opens `path` and `copy`, and each holds
/// the memories the store held.
pub async fn backup_and_close<S, F, Fut>(store: S, path: &std::path::Path, copy: &std::path::Path, reopen: F)
where
    S: DurableStore,
    F: Fn(std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = crate::Result<S>>,
{
    let (kd, vd) = (store.config().key_dim, store.config().value_dim);
    let mut rng = Rng::new(17);
    ins(&store, &rng.vecs(50, kd), &rng.vecs(50, vd), 1).await;
    let before = dump(&store).await.0;
    assert!(path.exists(), "{} must exist for this check", path.display());
    assert!(
        DurableStore::backup_to(&store, path).await.is_err(),
        "a backup onto an existing file is refused"
    );
    DurableStore::backup_to(&store, copy).await.expect("backup");
    assert_eq!(dump(&store).await.0, before, "a backup changes nothing");
    DurableStore::close(store).await.expect("close");
    for p in [path, copy] {
        let again = reopen(p.to_path_buf()).await.expect("reopen");
        assert_eq!(dump(&again).await.0, before, "{}", p.display());
        DurableStore::close(again).await.expect("close");
    }
}

/// Brute-force distance written out independently of [`crate::math`].
pub fn oracle_distance(metric: Metric, a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    match metric {
        Metric::L2 => a
            .iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum::<f64>()
            .sqrt(),
        Metric::InnerProduct => 1.0 - dot,
        Metric::Cosine => {
            let na = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let nb = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            if na == 0.0 || nb == 0.0 {
                1.0
            } else {
                1.0 - dot / (na * nb)
            }
        }
    }
}

/// Brute-force top-k ids over `(id, key)` pairs using [`oracle_distance`].
pub fn oracle_topk(metric: Metric, mems: &[(MemoryId, Vec<f32>)], q: &[f32], k: usize) -> Vec<(MemoryId, f64)> {
    let mut all: Vec<(MemoryId, f64)> = mems
        .iter()
        .map(|(id, key)| (*id, oracle_distance(metric, q, key)))
        .collect();
    all.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}
