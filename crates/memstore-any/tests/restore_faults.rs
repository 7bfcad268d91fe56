//! A restore that fails at any of its file steps (copying the backup,
//! syncing the copy, removing the old logs, renaming, syncing the
//! directory), through the engine's failpoints: the restore returns an
//! error, the store file opens and holds the state before the restore, or,
//! when only the final directory sync failed, the state after it; the next
//! restore succeeds. A file that is not a store is refused and changes
//! nothing. Its own test binary: failpoints are process-wide.

use std::path::Path;

use memstore_any::StoreUrl;
use memstore_api::{Batch, DurableStore, Memory, MemoryConfig, MemoryStore, Stats, Tags, Vectors};
use memstore_engine::driver::RESTORE_STEPS;
use memstore_sqlite::SqliteStore;

/// A closed store at `path` holding `n` rows tagged `tag`.
async fn store_with(path: &Path, n: usize, tag: &str) {
    let s = SqliteStore::open(path, MemoryConfig::new(2, 1)).await.unwrap();
    let keys: Vec<f32> = (0..n * 2).map(|i| i as f32).collect();
    let values: Vec<f32> = (0..n).map(|i| i as f32 * 10.0).collect();
    let tags = vec![tag.to_string()];
    s.insert(
        Batch::new(Vectors::new(&keys, 2).unwrap(), Vectors::new(&values, 1).unwrap()).with_tags(Tags::Same(&tags)),
        1,
    )
    .await
    .unwrap();
    s.close().await.unwrap();
}

/// What the store at `path` holds, read by opening it (integrity checked).
async fn contents(path: &Path) -> (Vec<Memory>, Stats) {
    let s = SqliteStore::open_existing(path).await.unwrap();
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(s.driver().pool())
        .await
        .unwrap();
    assert_eq!(check, "ok");
    let ids = s.ids().await.unwrap();
    let out = (s.get(&ids).await.unwrap(), s.stats().await.unwrap());
    s.close().await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_failing_at_each_file_step_leaves_the_store_before_or_after() {
    let scenario = fail::FailScenario::setup();
    for step in RESTORE_STEPS {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.db");
        store_with(&file, 5, "before").await;
        let before = contents(&file).await;
        let source = dir.path().join("source.db");
        store_with(&source, 3, "backup").await;
        let backup = dir.path().join("backup.db");
        {
            let s = SqliteStore::open_existing(&source).await.unwrap();
            DurableStore::backup_to(&s, &backup).await.unwrap();
            s.close().await.unwrap();
        }
        let after = contents(&source).await;
        assert_ne!(before.0, after.0);
        // An empty log beside the closed store, as a crash after a
        // checkpoint leaves it, so that the step removing logs runs.
        std::fs::write(dir.path().join("m.db-wal"), b"").unwrap();

        let url = StoreUrl::Sqlite(file.clone());
        fail::cfg(step, "return").unwrap();
        let restored = url.restore(&backup).await;
        fail::remove(step);
        let e = restored.expect_err(step);
        assert!(e.to_string().contains("injected failure"), "{step}: {e}");
        let now = contents(&file).await;
        if step == "restore::sync_dir" {
            assert_eq!(now, after, "{step}: the copy was renamed into place");
        } else {
            assert_eq!(now, before, "{step}: the store changed");
        }
        // Once the fault clears, the restore goes through.
        url.restore(&backup)
            .await
            .unwrap_or_else(|e| panic!("{step}: second restore: {e}"));
        assert_eq!(contents(&file).await, after, "{step}");
    }
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_store_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.db");
    store_with(&file, 4, "kept").await;
    let before = contents(&file).await;
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, b"not a database at all, just bytes").unwrap();
    let url = StoreUrl::Sqlite(file.clone());
    assert!(url.restore(&junk).await.is_err());
    assert!(url.restore(&dir.path().join("missing.db")).await.is_err());
    assert_eq!(contents(&file).await, before);
    // Nothing is left beside the store.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("restoring"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
