//! DuckDB-specific behaviour beyond the conformance suite: SQL kNN with
//! `array_distance`, corrupt and missing files, the file lock, backups, and
//! crash consistency under SIGKILL.

use memstore_api::testkit::crash::kill_rounds;
use memstore_api::testkit::util::{Rng, ins, v};
use memstore_api::{Error, MemoryConfig, MemoryStore, Metric};
use memstore_duckdb::{DuckdbError, DuckdbStore};

/// Exact kNN in plain SQL over the store's `FLOAT[]` key column.
async fn sql_knn(store: &DuckdbStore, q: &[f32], k: usize, function: &str) -> Vec<(u64, f64)> {
    let dim = q.len();
    let literal = format!(
        "[{}]::FLOAT[{dim}]",
        q.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(", ")
    );
    let sql = format!("SELECT id, {function}(key, {literal}) AS d FROM memories ORDER BY d, id LIMIT {k}");
    store
        .driver()
        .with_reader(|c| {
            let mut st = c.prepare(&sql)?;
            let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, f64>(1)?)))?;
            rows.collect()
        })
        .await
        .expect("SQL kNN")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_knn_agrees_with_store_search() {
    let dir = tempfile::tempdir().unwrap();
    for (metric, function) in [
        (Metric::L2, "array_distance"),
        (Metric::Cosine, "array_cosine_distance"),
    ] {
        let path = dir.path().join(format!("{}.duckdb", metric.as_str()));
        let s = DuckdbStore::open(&path, MemoryConfig::new(16, 2).with_metric(metric))
            .await
            .unwrap();
        let mut rng = Rng::new(11);
        ins(&s, &rng.vecs(500, 16), &vec![0.0; 1000], 1).await;
        s.delete(&[3, 40, 41]).await.unwrap();
        for _ in 0..10 {
            let q = rng.vecs(1, 16);
            let mine = s.search(v(&q, 16), 5, None).await.unwrap();
            let theirs = sql_knn(&s, &q, 5, function).await;
            assert_eq!(theirs.len(), 5);
            for (j, (id, d)) in theirs.iter().enumerate() {
                assert_eq!(mine.id(0, j), Some(*id), "{metric:?} slot {j}");
                assert!((mine.distance(0, j) as f64 - d).abs() < 1e-4, "{metric:?} distance");
            }
        }
        s.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_file_is_a_storage_error_and_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.duckdb");
    let junk: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &junk).unwrap();
    match DuckdbStore::open(&path, MemoryConfig::new(2, 2)).await {
        Err(Error::Storage(e)) => assert!(
            matches!(e.downcast_ref::<DuckdbError>(), Some(DuckdbError::Sql(_))),
            "{e}"
        ),
        Err(e) => panic!("expected a storage error, got {e}"),
        Ok(_) => panic!("opened a garbage file"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), junk, "the file was modified");
}

/// Keys changed behind the store's back (a NaN, a NULL element) are found on
/// open as `Corrupt`, naming the memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_keys_are_detected_on_open() {
    let dir = tempfile::tempdir().unwrap();
    for (i, bad) in ["[1, 'nan'::FLOAT, 1, 1]", "[1, NULL, 1, 1]"].iter().enumerate() {
        let path = dir.path().join(format!("c{i}.duckdb"));
        let s = DuckdbStore::open(&path, MemoryConfig::new(4, 2)).await.unwrap();
        ins(&s, &[1.0; 8], &[0.0; 4], 1).await;
        s.close().await.unwrap();
        {
            let c = duckdb::Connection::open(&path).unwrap();
            c.execute(&format!("UPDATE memories SET key = {bad} WHERE id = 2"), [])
                .unwrap();
        }
        match DuckdbStore::open(&path, MemoryConfig::new(4, 2)).await {
            Err(Error::Corrupt(m)) => assert!(m.contains("memory 2") && m.contains("key"), "{m}"),
            Err(e) => panic!("expected Corrupt, got {e}"),
            Ok(_) => panic!("opened a store with a bad key ({bad})"),
        }
    }
}

/// The staging tables that batched updates go through are empty in every
/// committed state, and keys are stored as FLOAT[dim] arrays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_state_has_empty_staging_and_array_keys() {
    let dir = tempfile::tempdir().unwrap();
    let s = DuckdbStore::open(dir.path().join("s.duckdb"), MemoryConfig::new(3, 2))
        .await
        .unwrap();
    ins(&s, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[0.0; 4], 1).await;
    s.touch(&[1, 2], 2).await.unwrap();
    s.update_values(&[1], v(&[1.0, 1.0], 2)).await.unwrap();
    let (staged, ty): (i64, String) = s
        .driver().with_reader(|c| {
            let n = c.query_row(
                "SELECT (SELECT count(*) FROM memstore_stage_access) + (SELECT count(*) FROM memstore_stage_values) \
                 + (SELECT count(*) FROM memstore_stage_ids)",
                [],
                |r| r.get(0),
            )?;
            let t = c.query_row(
                "SELECT data_type FROM information_schema.columns WHERE table_name = 'memories' AND column_name = 'key'",
                [],
                |r| r.get(0),
            )?;
            Ok((n, t))
        })
        .await
        .unwrap();
    assert_eq!(staged, 0);
    assert_eq!(ty, "FLOAT[3]");
    let m = s.get(&[1]).await.unwrap();
    assert_eq!(m[0].value, vec![1.0, 1.0]);
    assert_eq!(m[0].access_count, 2);
}

/// Kills a writer process with SIGKILL at random moments, 20 times, reopening
/// the file after each kill: every acknowledged batch is there whole, no batch
/// is there in part, and the file always opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acknowledged_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.duckdb");
    let exe = env!("CARGO_BIN_EXE_memstore-duckdb-writer");
    kill_rounds(exe, &[path.to_str().unwrap()], 20, 64, || {
        DuckdbStore::open(&path, MemoryConfig::new(8, 4))
    })
    .await;
}

/// The cases every file driver passes (memstore-engine's `testkit`).
mod file_store {
    use memstore_duckdb::DuckdbDriver;
    use memstore_engine::testkit as cases;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_existing_uses_the_stored_config_and_never_creates() {
        cases::open_existing_uses_the_stored_config_and_never_creates::<DuckdbDriver>("duckdb").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_open_of_the_same_file_is_refused_until_the_first_closes() {
        cases::a_second_open_of_the_same_file_is_refused_until_the_first_closes::<DuckdbDriver>("duckdb").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backup_is_a_consistent_copy() {
        cases::backup_is_a_consistent_copy::<DuckdbDriver>("duckdb").await;
    }

    #[tokio::test]
    async fn backs_up_and_closes_through_the_lifecycle_trait() {
        cases::backs_up_and_closes_through_the_lifecycle_trait::<DuckdbDriver>("duckdb").await;
    }
}
