//! The DuckDB backend runs the whole conformance suite, each case in a fresh
//! temporary directory; "reopen" checkpoints, closes and opens the file again.

use async_trait::async_trait;
use memstore_api::testkit::Harness;
use memstore_api::{MemoryConfig, Result};
use memstore_duckdb::DuckdbStore;

struct DuckdbHarness {
    dir: tempfile::TempDir,
}

impl DuckdbHarness {
    fn new() -> Self {
        DuckdbHarness {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }
}

#[async_trait]
impl Harness for DuckdbHarness {
    type Store = DuckdbStore;

    async fn open(&self, config: MemoryConfig) -> Result<DuckdbStore> {
        DuckdbStore::open(self.dir.path().join("store.duckdb"), config).await
    }

    async fn close(&self, store: DuckdbStore) -> Result<()> {
        store.close().await
    }
}

memstore_api::conformance_suite!(DuckdbHarness::new());

/// The whole suite again with values read from the database instead of
/// kept in the index (`resident_values: false`).
mod values_from_the_database {
    use super::*;
    use memstore_duckdb::DuckdbOptions;

    struct ReadingHarness {
        dir: tempfile::TempDir,
    }

    #[async_trait]
    impl Harness for ReadingHarness {
        type Store = DuckdbStore;

        async fn open(&self, config: MemoryConfig) -> Result<DuckdbStore> {
            let options = DuckdbOptions {
                resident_values: false,
                ..DuckdbOptions::default()
            };
            DuckdbStore::open_with(self.dir.path().join("store.duckdb"), config, options).await
        }

        async fn close(&self, store: DuckdbStore) -> Result<()> {
            store.close().await
        }
    }

    memstore_api::conformance_suite!(ReadingHarness {
        dir: tempfile::tempdir().expect("temporary directory"),
    });
}
