//! The DuckDB backend runs the whole conformance suite, each case in a fresh
//! temporary directory; "reopen" checkpoints, closes and opens the file again.

use async_trait::async_trait;
use memstore_api::testkit::Harness;
use memstore_api::{MemoryConfig, Result};
use memstore_duckdb::{DuckdbOptions, DuckdbStore, IndexOptions};

struct DuckdbHarness {
    dir: tempfile::TempDir,
    options: DuckdbOptions,
}

impl DuckdbHarness {
    fn new(options: DuckdbOptions) -> Self {
        DuckdbHarness {
            dir: tempfile::tempdir().expect("temporary directory"),
            options,
        }
    }
}

#[async_trait]
impl Harness for DuckdbHarness {
    type Store = DuckdbStore;

    async fn open(&self, config: MemoryConfig) -> Result<DuckdbStore> {
        DuckdbStore::open_with(self.dir.path().join("store.duckdb"), config, self.options.clone()).await
    }

    async fn close(&self, store: DuckdbStore) -> Result<()> {
        store.close().await
    }
}

memstore_api::conformance_suite!(DuckdbHarness::new(DuckdbOptions::default()));

/// The whole suite again with values read from the database instead of
/// kept in the index (`resident_values` off).
mod values_from_the_database {
    use super::*;

    memstore_api::conformance_suite!(DuckdbHarness::new({
        let mut o = DuckdbOptions::default();
        o.index = IndexOptions::default().with_resident_values(false);
        o
    }));
}
