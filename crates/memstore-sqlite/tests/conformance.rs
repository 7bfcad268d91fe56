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

/// The whole suite again with values read from the database instead of
/// kept in the index (`resident_values: false`), and without the `vec0`
/// mirror (`sql_knn: false`): both of the store's other write and read paths.
mod values_from_the_database {
    use super::*;
    use memstore_sqlite::SqliteOptions;

    struct ReadingHarness {
        dir: tempfile::TempDir,
    }

    #[async_trait]
    impl Harness for ReadingHarness {
        type Store = SqliteStore;

        async fn open(&self, config: MemoryConfig) -> Result<SqliteStore> {
            let options = SqliteOptions {
                resident_values: false,
                sql_knn: false,
                ..SqliteOptions::default()
            };
            SqliteStore::open_with(self.dir.path().join("store.db"), config, options).await
        }

        async fn close(&self, store: SqliteStore) -> Result<()> {
            store.close().await;
            Ok(())
        }
    }

    memstore_api::conformance_suite!(ReadingHarness {
        dir: tempfile::tempdir().expect("temporary directory"),
    });
}
