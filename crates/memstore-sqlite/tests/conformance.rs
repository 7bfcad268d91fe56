//! The SQLite backend runs the whole conformance suite, each case in a fresh
//! temporary directory; "reopen" closes the pool and opens the file again.

use async_trait::async_trait;
use memstore_api::testkit::Harness;
use memstore_api::{MemoryConfig, Result};
use memstore_sqlite::SqliteStore;

struct SqliteHarness {
    dir: tempfile::TempDir,
}

impl SqliteHarness {
    fn new() -> Self {
        SqliteHarness {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }
}

#[async_trait]
impl Harness for SqliteHarness {
    type Store = SqliteStore;

    async fn open(&self, config: MemoryConfig) -> Result<SqliteStore> {
        SqliteStore::open(self.dir.path().join("store.db"), config).await
    }

    async fn close(&self, store: SqliteStore) -> Result<()> {
        store.close().await;
        Ok(())
    }
}

memstore_api::conformance_suite!(SqliteHarness::new());
