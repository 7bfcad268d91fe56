//! IPC overhead (criterion): the same SQLite store used in process and
//! through `memstored` (a separate process, Unix socket), on the same data:
//! 100k random 64-d keys, `search` and `learn` at batch 1, 64 and 4096, k = 8.
//! Run with `cargo bench -p memstore-ipc --bench ipc`; render the table with
//! `python3 scripts/bench_table.py ipc_ --baseline in-process`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use memstore_api::{Batch, MemoryConfig, MemoryStore, Vectors};
use memstore_ipc::{Endpoint, IpcStore};
use memstore_sqlite::SqliteStore;

const DIM: usize = 64;
const N: usize = 100_000;
const K: usize = 8;

fn data(seed: u64, n: usize) -> Vec<f32> {
    memstore_api::testkit::util::uniform(seed, n)
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn start_daemon(db: &Path, socket: &Path) -> Daemon {
    let child = Command::new(env!("CARGO_BIN_EXE_memstored"))
        .arg("--db")
        .arg(db)
        .arg("--socket")
        .arg(socket)
        .args(["--log", "warn"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn memstored");
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(60), "memstored did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    Daemon(child)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    // Thresholds that never fire on these keys: learn inserts every row.
    let config = MemoryConfig::new(DIM, DIM).with_thresholds(0.01, 0.02);
    // Both stores are copies of one filled store (no WAL to read through),
    // so that they start identical.
    let local = rt.block_on(async {
        let s = SqliteStore::open(dir.path().join("fill.db"), config.clone())
            .await
            .unwrap();
        let keys = data(1, N * DIM);
        let vals = data(2, N * DIM);
        for (k, v) in keys.chunks(4096 * DIM).zip(vals.chunks(4096 * DIM)) {
            let batch = Batch::new(Vectors::new(k, DIM).unwrap(), Vectors::new(v, DIM).unwrap());
            s.insert(batch, 0).await.unwrap();
        }
        s.backup_to(&a).await.unwrap();
        s.backup_to(&b).await.unwrap();
        s.close().await.unwrap();
        SqliteStore::open(&a, config.clone()).await.unwrap()
    });
    let _daemon = start_daemon(&b, &dir.path().join("d.sock"));
    let remote = rt
        .block_on(IpcStore::connect(&Endpoint::Unix(dir.path().join("d.sock")), None))
        .unwrap();
    assert_eq!(remote.config(), local.config());

    // Each call runs in a task on the runtime's workers, as an application's
    // calls would (a call made from `block_on` on the main thread measured
    // ~25% slower in process, which is not what is being compared here).
    let stores: [(&str, Arc<dyn MemoryStore>); 2] = [("in-process", Arc::new(local)), ("ipc", Arc::new(remote))];

    let mut g = c.benchmark_group(format!("ipc_search_dim{DIM}_n{}k_k{K}", N / 1000));
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    for batch in [1usize, 64, 4096] {
        let q = Arc::new(data(3, batch * DIM));
        g.throughput(Throughput::Elements(batch as u64));
        for (name, store) in &stores {
            g.bench_function(BenchmarkId::new(*name, batch), |bch| {
                bch.to_async(&rt).iter(|| {
                    let (s, q) = (store.clone(), q.clone());
                    async move {
                        tokio::spawn(async move { s.search(Vectors::new(&q, DIM).unwrap(), K, None).await.unwrap() })
                            .await
                            .unwrap()
                    }
                })
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group(format!("ipc_learn_dim{DIM}_n{}k_k{K}", N / 1000));
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    for batch in [1usize, 64, 4096] {
        // Fresh keys every iteration (generating them costs < 1% of a learn).
        let seed = Arc::new(AtomicU64::new(1000 * batch as u64));
        let vals = Arc::new(data(5, batch * DIM));
        g.throughput(Throughput::Elements(batch as u64));
        for (name, store) in &stores {
            g.bench_function(BenchmarkId::new(*name, batch), |bch| {
                bch.to_async(&rt).iter(|| {
                    let (s, vals, seed) = (store.clone(), vals.clone(), seed.clone());
                    async move {
                        tokio::spawn(async move {
                            let keys = data(seed.fetch_add(1, Ordering::Relaxed), batch * DIM);
                            let b = Batch::new(Vectors::new(&keys, DIM).unwrap(), Vectors::new(&vals, DIM).unwrap());
                            s.learn(b, 1, K).await.unwrap()
                        })
                        .await
                        .unwrap()
                    }
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
