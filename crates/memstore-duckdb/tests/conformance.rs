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
