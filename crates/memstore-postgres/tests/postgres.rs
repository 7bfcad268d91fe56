//! What is specific to the PostgreSQL driver: store names, one owner per
//! store, opening a store that is not there, SQL kNN on the key column, and
//! a backup to a file refused with a typed error. The cases that need a
//! server are ignored in a plain `cargo test`; `.ci/run` starts one
//! (`scripts/postgres.sh`) and runs them with `--ignored`.

use memstore_api::{Batch, MemoryConfig, MemoryStore, Metric, Vectors};
use memstore_postgres::{PostgresError, PostgresLocation, PostgresStore};

fn url() -> String {
    std::env::var("MEMSTORE_POSTGRES_URL")
        .expect("MEMSTORE_POSTGRES_URL names the server (scripts/postgres.sh start prints it)")
}

fn fresh(tag: &str) -> PostgresLocation {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    PostgresLocation::new(url(), format!("{tag}_{}_{}", std::process::id(), nanos % 1_000_000_000))
}

/// The driver's typed error behind a store error.
fn driver_error(e: &memstore_api::Error) -> &PostgresError {
    let memstore_api::Error::Storage(source) = e else {
        panic!("expected a storage error, got {e}");
    };
    source
        .downcast_ref::<PostgresError>()
        .unwrap_or_else(|| panic!("expected a PostgresError, got {source}"))
}

#[tokio::test]
async fn a_store_name_that_is_not_an_identifier_is_refused_before_connecting() {
    // No server is needed: the name is checked first (the URL goes nowhere).
    let at = PostgresLocation::new("postgres://nobody@127.0.0.1:1/none", "Robert'); DROP TABLE x;--");
    let e = PostgresStore::open(at, MemoryConfig::new(4, 2))
        .await
        .err()
        .expect("refused");
    assert!(matches!(driver_error(&e), PostgresError::BadName(_)), "{e}");
}

#[tokio::test]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
async fn a_store_has_one_owner_at_a_time() {
    let at = fresh("owner");
    let first = PostgresStore::open(at.clone(), MemoryConfig::new(4, 2)).await.unwrap();
    let e = PostgresStore::open(at.clone(), MemoryConfig::new(4, 2))
        .await
        .err()
        .expect("a second owner is refused");
    assert!(matches!(driver_error(&e), PostgresError::Locked(_)), "{e}");
    first.close().await.unwrap();
    // Closing releases the lock.
    let again = PostgresStore::open_existing(at).await.unwrap();
    again.close().await.unwrap();
}

#[tokio::test]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
async fn opening_a_missing_store_is_a_typed_error_and_creates_nothing() {
    let at = fresh("missing");
    let e = PostgresStore::open_existing(at.clone())
        .await
        .err()
        .expect("no such store");
    assert!(matches!(driver_error(&e), PostgresError::NoStore(_)), "{e}");
    // Still missing: the failed open created no schema.
    let e = PostgresStore::open_existing(at)
        .await
        .err()
        .expect("still no such store");
    assert!(matches!(driver_error(&e), PostgresError::NoStore(_)), "{e}");
}

#[tokio::test]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
async fn keys_are_pgvector_vectors_that_sql_knn_orders() {
    let at = fresh("knn");
    let s = PostgresStore::open(at, MemoryConfig::new(3, 1).with_metric(Metric::L2))
        .await
        .unwrap();
    let keys = [0.0f32, 0.0, 0.0, 1.0, 0.0, 0.0, 5.0, 5.0, 5.0];
    let values = [1.0f32, 2.0, 3.0];
    let ids = s
        .insert(
            Batch::new(Vectors::new(&keys, 3).unwrap(), Vectors::new(&values, 1).unwrap()),
            1,
        )
        .await
        .unwrap();
    let typ: String = sqlx::query_scalar("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'memories'::regclass AND attname = 'key'")
        .fetch_one(s.driver().pool())
        .await
        .unwrap();
    assert_eq!(typ, "vector(3)");
    let near: Vec<i64> = sqlx::query_scalar("SELECT id FROM memories ORDER BY key <-> '[0.9,0,0]'::vector, id LIMIT 2")
        .fetch_all(s.driver().pool())
        .await
        .unwrap();
    assert_eq!(near, vec![ids[1] as i64, ids[0] as i64]);
    let e = s
        .backup_to(std::env::temp_dir().join("never-written.db"))
        .await
        .expect_err("refused");
    assert!(matches!(driver_error(&e), PostgresError::Unsupported(_)), "{e}");
    s.close().await.unwrap();
}

/// Kills a writer process with SIGKILL at random moments, 20 times, reopening
/// the store after each kill: every acknowledged batch is there whole and no
/// batch in part. The killed owner's session ends with the process; until
/// the server notices, a reopen is refused as `Locked`, and retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
async fn sigkill_mid_stream_loses_no_acknowledged_batch() {
    let at = fresh("crash");
    let arg = format!("{}#{}", at.url, at.store);
    let exe = env!("CARGO_BIN_EXE_memstore-postgres-writer");
    let reopen = || async {
        let mut tries = 0;
        loop {
            match PostgresStore::open(at.clone(), MemoryConfig::new(8, 4)).await {
                Err(e) if tries < 100 && matches!(driver_error(&e), PostgresError::Locked(_)) => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    };
    memstore_api::testkit::crash::kill_rounds(exe, &[arg.as_str()], 20, 64, reopen).await;
}
