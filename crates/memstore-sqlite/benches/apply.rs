//! The store's side of a training run's write-behind: change batches shaped
//! like a product-key memory layer's steps in the main job (65,536 rows of
//! 32-d keys and values; 32,768 accesses a step, each accessed memory's
//! value updated), applied to a SQLite store one step per transaction
//! (`apply`) or in groups of 8 and 32 (`apply_all`, one transaction each).
//! Accesses follow a Zipf law (s = 1) over half the rows, which gives what
//! the main job's layers show: about 8,500 memories a step, 25,000 in 8
//! steps and 32,000 in 32; a step lists each memory's accesses together,
//! as a tier does. Each iteration applies the next 32 steps.
//! `cargo bench -p memstore-sqlite --bench apply`.

use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use memstore_api::testkit::util::Rng;
use memstore_api::{ChangeBatch, MemoryConfig, MemoryStore};
use memstore_sqlite::SqliteStore;

const ROWS: usize = 65_536;
const DIM: usize = 32;
const ACCESSES: usize = 32_768;
const STEPS: usize = 32;

/// Training-shaped batches, step after step, for one store.
struct Steps {
    rng: Rng,
    /// The rows a step can access, most accessed first.
    used: Vec<u64>,
    /// Cumulative Zipf weights over `used`.
    cumulative: Vec<f64>,
    seq: u64,
}

impl Steps {
    fn new(seed: u64) -> Steps {
        let mut rng = Rng::new(seed);
        let mut ids: Vec<u64> = (1..=ROWS as u64).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.below(i as u64 + 1) as usize);
        }
        ids.truncate(ROWS / 2);
        let mut total = 0.0;
        let cumulative = (0..ids.len())
            .map(|r| {
                total += 1.0 / (r + 1) as f64;
                total
            })
            .collect();
        Steps {
            rng,
            used: ids,
            cumulative,
            seq: 1,
        }
    }

    fn next(&mut self) -> ChangeBatch {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let mut touch: Vec<u64> = (0..ACCESSES)
            .map(|_| {
                let u = self.rng.unit() as f64 * total;
                self.used[self.cumulative.partition_point(|&c| c < u).min(self.used.len() - 1)]
            })
            .collect();
        // A tier lists a memory's accesses together (by slot; ids here).
        touch.sort_unstable();
        let mut update_ids = touch.clone();
        update_ids.dedup();
        let deltas = self.rng.vecs(update_ids.len(), DIM).iter().map(|x| x * 1e-3).collect();
        self.seq += 1;
        ChangeBatch {
            seq: self.seq,
            tick: self.seq,
            first_id: ROWS as u64 + 1,
            update_ids,
            deltas,
            touch,
            ..Default::default()
        }
    }
}

fn apply(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("apply_training_steps_65536x32");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements(STEPS as u64));
    for group in [1usize, 8, 32] {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = MemoryConfig::new(DIM, DIM).with_capacity(ROWS);
        let mut rng = Rng::new(7);
        let store: memstore_api::Result<SqliteStore> = rt.block_on(async {
            let store = SqliteStore::open(dir.path().join("m.db"), config).await?;
            let fill = ChangeBatch {
                seq: 1,
                tick: 1,
                first_id: 1,
                insert_keys: rng.vecs(ROWS, DIM),
                insert_values: rng.vecs(ROWS, DIM),
                ..Default::default()
            };
            store.apply(&fill).await?;
            memstore_api::Result::Ok(store)
        });
        let store = store.expect("a filled store");
        let mut steps = Steps::new(11);
        g.bench_function(format!("groups of {group}"), |bench| {
            bench.iter_batched(
                || (0..STEPS).map(|_| steps.next()).collect::<Vec<_>>(),
                |batches| {
                    rt.block_on(async {
                        for chunk in batches.chunks(group) {
                            store.apply_all(chunk).await.expect("apply");
                        }
                    })
                },
                BatchSize::PerIteration,
            )
        });
        rt.block_on(store.close()).expect("close");
    }
    g.finish();
}

criterion_group!(benches, apply);
criterion_main!(benches);
