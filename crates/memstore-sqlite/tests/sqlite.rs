//! SQLite-specific behaviour beyond the conformance suite: SQL kNN through
//! sqlite-vec, corrupt and missing files, crash consistency under SIGKILL,
//! and a large `learn` on a current-thread runtime.

use std::collections::BTreeSet;

use memstore_api::testkit::crash::kill_rounds;
use memstore_api::testkit::util::{Rng, copy_earlier_rows, copy_stored_rows, dump, ins, v};
use memstore_api::{Batch, Error, MemoryConfig, MemoryStore, Metric};
use memstore_sqlite::SqliteStore;
use sqlx::Row;

/// sqlite-vec's `vec0` kNN on the mirror.
const VEC0_KNN: &str = "SELECT rowid, distance FROM memory_keys WHERE key MATCH ? AND k = ? ORDER BY distance";

/// Runs a kNN statement taking the query blob and k: (id, distance) rows.
async fn sql_knn(store: &SqliteStore, statement: &'static str, q: &[f32], k: i64) -> Vec<(u64, f64)> {
    let blob: Vec<u8> = q.iter().flat_map(|x| x.to_le_bytes()).collect();
    sqlx::query(statement)
        .bind(blob)
        .bind(k)
        .fetch_all(store.driver().pool())
        .await
        .expect("SQL kNN")
        .into_iter()
        .map(|r| (r.get::<i64, _>(0) as u64, r.get::<f64, _>(1)))
        .collect()
}

/// Ten random queries: the SQL statement's k = 5 rows are the store's
/// search results, ids in order and distances within 1e-4.
async fn agrees_with_search(s: &SqliteStore, rng: &mut Rng, statement: &'static str, metric: Metric) {
    for _ in 0..10 {
        let q = rng.vecs(1, 16);
        let mine = s.search(v(&q, 16), 5, None).await.unwrap();
        let theirs = sql_knn(s, statement, &q, 5).await;
        assert_eq!(theirs.len(), 5);
        for (j, (id, d)) in theirs.iter().enumerate() {
            assert_eq!(mine.id(0, j), Some(*id), "{metric:?} slot {j}");
            assert!((mine.distance(0, j) as f64 - d).abs() < 1e-4, "{metric:?} distance");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_knn_agrees_with_store_search() {
    let dir = tempfile::tempdir().unwrap();
    for metric in [Metric::L2, Metric::Cosine] {
        let path = dir.path().join(format!("{}.db", metric.as_str()));
        let s = SqliteStore::open(&path, MemoryConfig::new(16, 2).with_metric(metric))
            .await
            .unwrap();
        assert!(s.driver().has_sql_knn());
        let mut rng = Rng::new(11);
        ins(&s, &rng.vecs(500, 16), &vec![0.0; 1000], 1).await;
        agrees_with_search(&s, &mut rng, VEC0_KNN, metric).await;
        s.close().await.unwrap();
    }
}

/// Without the `vec0` mirror (`sql_knn: false`, which makes durable inserts
/// about three times cheaper: docs/benchmarks.md) exact kNN still works in plain SQL: sqlite-vec's
/// scalar distance functions read the `memories.key` blobs directly, by scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_knn_by_scan_without_the_mirror() {
    let dir = tempfile::tempdir().unwrap();
    const L2: &str = "SELECT id, vec_distance_l2(key, ?) AS d FROM memories ORDER BY d, id LIMIT ?";
    const COSINE: &str = "SELECT id, vec_distance_cosine(key, ?) AS d FROM memories ORDER BY d, id LIMIT ?";
    for (metric, knn) in [(Metric::L2, L2), (Metric::Cosine, COSINE)] {
        let path = dir.path().join(format!("scan-{}.db", metric.as_str()));
        let options = {
            let mut o = memstore_sqlite::SqliteOptions::default();
            o.sql_knn = false;
            o
        };
        let s = SqliteStore::open_with(&path, MemoryConfig::new(16, 2).with_metric(metric), options)
            .await
            .unwrap();
        assert!(!s.driver().has_sql_knn());
        let mirror: i64 = sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE name = 'memory_keys'")
            .fetch_one(s.driver().pool())
            .await
            .unwrap();
        assert_eq!(mirror, 0, "no vec0 table without the mirror");
        let mut rng = Rng::new(12);
        ins(&s, &rng.vecs(500, 16), &vec![0.0; 1000], 1).await;
        agrees_with_search(&s, &mut rng, knn, metric).await;
        s.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_knn_follows_deletes_merges_and_evictions() {
    let dir = tempfile::tempdir().unwrap();
    let config = MemoryConfig::new(2, 1).with_thresholds(0.5, 1.0).with_capacity(40);
    let s = SqliteStore::open(dir.path().join("m.db"), config).await.unwrap();
    let mut rng = Rng::new(3);
    for t in 0..10 {
        let keys: Vec<f32> = rng.vecs(12, 2).iter().map(|x| x * 6.0).collect();
        s.learn(Batch::new(v(&keys, 2), v(&[1.0; 12], 1)), t, 4).await.unwrap();
    }
    s.delete(&[s.stats().await.unwrap().next_id - 1]).await.unwrap();
    let st = s.stats().await.unwrap();
    assert!(st.counters.merged > 0 && st.counters.evicted > 0, "{st:?}");
    let vec_ids: BTreeSet<u64> = sqlx::query("SELECT rowid FROM memory_keys")
        .fetch_all(s.driver().pool())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get::<i64, _>(0) as u64)
        .collect();
    let live: BTreeSet<u64> = (1..st.next_id).filter(|id| vec_ids.contains(id)).collect();
    assert_eq!(vec_ids.len() as u64, st.len);
    assert_eq!(
        s.get(&live.iter().copied().collect::<Vec<_>>()).await.unwrap().len(),
        live.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_file_is_a_storage_error_and_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.db");
    let junk: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &junk).unwrap();
    match SqliteStore::open(&path, MemoryConfig::new(2, 2)).await {
        Err(Error::Storage(e)) => assert!(e.to_string().contains("not a database"), "{e}"),
        Err(e) => panic!("expected a storage error, got {e}"),
        Ok(_) => panic!("opened a garbage file"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), junk, "the file was modified");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_key_blob_is_detected_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let s = SqliteStore::open(&path, MemoryConfig::new(4, 2)).await.unwrap();
    ins(&s, &[1.0; 8], &[0.0; 4], 1).await;
    sqlx::query("UPDATE memories SET key = x'0000' WHERE id = 2")
        .execute(s.driver().pool())
        .await
        .unwrap();
    s.close().await.unwrap();
    match SqliteStore::open(&path, MemoryConfig::new(4, 2)).await {
        Err(Error::Corrupt(m)) => assert!(m.contains("memory 2") && m.contains("key"), "{m}"),
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("opened a store with a truncated key"),
    }
}

/// Kills a writer process with SIGKILL at random moments, 20 times, reopening
/// the file after each kill: every acknowledged batch is there whole, no batch
/// is there in part, and the file always opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acknowledged_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let exe = env!("CARGO_BIN_EXE_memstore-sqlite-writer");
    kill_rounds(exe, &[path.to_str().unwrap()], 20, 64, || {
        SqliteStore::open(&path, MemoryConfig::new(8, 4))
    })
    .await;
}

/// On a current-thread runtime (where the store's CPU work cannot move off
/// the runtime's one thread) a large `learn`, its output prepared on a
/// thread beside the write, returns the reference model's neighbours and
/// leaves its state.
#[tokio::test(flavor = "current_thread")]
async fn large_learn_on_a_current_thread_runtime_matches_reference() {
    let dir = tempfile::tempdir().unwrap();
    let c = MemoryConfig::new(16, 16).with_thresholds(0.05, 0.5).with_capacity(2400);
    let s = SqliteStore::open(dir.path().join("m.db"), c.clone()).await.unwrap();
    let r = memstore_api::InMemoryStore::new(c).unwrap();
    let mut rng = Rng::new(77);
    let stored = rng.vecs(1000, 16);
    let vals = rng.vecs(1000, 16);
    ins(&s, &stored, &vals, 0).await;
    ins(&r, &stored, &vals, 0).await;
    let n = 2048;
    let mut keys = rng.vecs(n, 16);
    // Exact duplicates of stored keys and of earlier rows: merges.
    copy_stored_rows(&mut rng, &mut keys, 16, &stored, 7);
    copy_earlier_rows(&mut rng, &mut keys, 16, 1000, 5);
    let values = rng.vecs(n, 16);
    let b = Batch::new(v(&keys, 16), v(&values, 16));
    let got = s.learn(b, 1, 8).await.unwrap();
    let want = r.learn(b, 1, 8).await.unwrap();
    assert_eq!(got, want);
    let (mine, mine_stats) = dump(&s).await;
    let (theirs, their_stats) = dump(&r).await;
    assert_eq!(mine_stats, their_stats);
    assert_eq!(mine, theirs);
    assert!(
        their_stats.counters.merged > 100 && their_stats.counters.evicted > 100,
        "the batch must merge and evict: {:?}",
        their_stats.counters
    );
}

/// A backup holds every committed row both ways it is made: copied byte for
/// byte once a checkpoint has moved the WAL's frames into the file, and by
/// `VACUUM INTO` while a reader's snapshot keeps the checkpoint from moving
/// them all (a copy of the file would then miss the rows written since).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_holds_rows_still_in_the_wal_and_behind_a_reader() {
    let dir = tempfile::tempdir().unwrap();
    let config = MemoryConfig::new(4, 2);
    let s = SqliteStore::open(dir.path().join("m.db"), config.clone())
        .await
        .unwrap();
    let mut rng = Rng::new(5);
    ins(&s, &rng.vecs(300, 4), &rng.vecs(300, 2), 1).await;
    let pending: (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(s.driver().pool())
        .await
        .unwrap();
    assert_eq!(pending.0, 0, "a checkpoint with no reader was busy");
    ins(&s, &rng.vecs(300, 4), &rng.vecs(300, 2), 2).await;
    s.backup_to(dir.path().join("b1.db")).await.unwrap();
    let want = dump(&s).await;

    // A read transaction keeps its snapshot while more rows are written.
    let mut reader = s.driver().pool().begin().await.unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM memories")
        .fetch_one(&mut *reader)
        .await
        .unwrap();
    assert_eq!(seen, 600);
    ins(&s, &rng.vecs(300, 4), &rng.vecs(300, 2), 3).await;
    let (busy, log, done): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(s.driver().pool())
        .await
        .unwrap();
    assert!(
        busy != 0 || done < log,
        "the reader did not hold frames back: {busy} {log} {done}"
    );
    s.backup_to(dir.path().join("b2.db")).await.unwrap();
    reader.rollback().await.unwrap();
    let want2 = dump(&s).await;
    assert_eq!(want2.1.len, 900);
    s.close().await.unwrap();

    for (name, want) in [("b1.db", want), ("b2.db", want2)] {
        let b = SqliteStore::open_existing(dir.path().join(name)).await.unwrap();
        assert_eq!(dump(&b).await, want, "{name} differs from the store it copied");
        b.close().await.unwrap();
    }
}

/// The cases every file driver passes (memstore-engine's `testkit`).
mod file_store {
    use memstore_engine::testkit as cases;
    use memstore_sqlite::SqliteDriver;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_existing_uses_the_stored_config_and_never_creates() {
        cases::open_existing_uses_the_stored_config_and_never_creates::<SqliteDriver>("db").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_open_of_the_same_file_is_refused_until_the_first_closes() {
        cases::a_second_open_of_the_same_file_is_refused_until_the_first_closes::<SqliteDriver>("db").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backup_is_a_consistent_copy() {
        cases::backup_is_a_consistent_copy::<SqliteDriver>("db").await;
    }

    #[tokio::test]
    async fn backs_up_and_closes_through_the_lifecycle_trait() {
        cases::backs_up_and_closes_through_the_lifecycle_trait::<SqliteDriver>("db").await;
    }
}
