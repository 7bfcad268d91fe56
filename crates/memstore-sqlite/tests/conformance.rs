//! The SQLite backend runs the whole conformance suite, each case in a fresh
//! temporary directory; "reopen" closes the pool and opens the file again.

use async_trait::async_trait;
use memstore_api::testkit::Harness;
use memstore_api::{MemoryConfig, Result};
use memstore_sqlite::{IndexOptions, SqliteOptions, SqliteStore};

struct SqliteHarness {
    dir: tempfile::TempDir,
    options: SqliteOptions,
}

impl SqliteHarness {
    fn new(options: SqliteOptions) -> Self {
        SqliteHarness {
            dir: tempfile::tempdir().expect("temporary directory"),
            options,
        }
    }
}

#[async_trait]
impl Harness for SqliteHarness {
    type Store = SqliteStore;

    async fn open(&self, config: MemoryConfig) -> Result<SqliteStore> {
        SqliteStore::open_with(self.dir.path().join("store.db"), config, self.options.clone()).await
    }

    async fn close(&self, store: SqliteStore) -> Result<()> {
        store.close().await
    }
}

memstore_api::conformance_suite!(SqliteHarness::new(SqliteOptions::default()));

/// The whole suite again with values read from the database instead of
/// kept in the index (`resident_values` off), and without the `vec0`
/// mirror (`sql_knn: false`): both of the store's other write and read paths.
mod values_from_the_database {
    use super::*;

    memstore_api::conformance_suite!(SqliteHarness::new({
        let mut o = SqliteOptions::default();
        o.index = IndexOptions::default().with_resident_values(false);
        o.sql_knn = false;
        o
    }));
}
