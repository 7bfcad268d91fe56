//! The conformance suite in its `approximate` form with the HNSW index kind
//! (memstore-index over usearch), as memstore-sqlite runs it: every case
//! unchanged except the six exact-top-k cases, replaced by recall measurements
//! against brute force. "Reopen" saves the graph beside the database and
//! loads it back.

use std::sync::Arc;

use async_trait::async_trait;
use memstore_api::testkit::Harness;
use memstore_api::{MemoryConfig, Result};
use memstore_duckdb::{DuckdbOptions, DuckdbStore, IndexOptions};
use memstore_index::{Hnsw, HnswOptions};

struct HnswHarness {
    dir: tempfile::TempDir,
}

impl HnswHarness {
    fn new() -> Self {
        HnswHarness {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }
}

#[async_trait]
impl Harness for HnswHarness {
    type Store = DuckdbStore;

    async fn open(&self, config: MemoryConfig) -> Result<DuckdbStore> {
        let options = {
            let mut o = DuckdbOptions::default();
            o.index = IndexOptions::default().with_ann(Arc::new(Hnsw::new(HnswOptions::default())));
            o
        };
        DuckdbStore::open_with(self.dir.path().join("store.duckdb"), config, options).await
    }

    async fn close(&self, store: DuckdbStore) -> Result<()> {
        store.close().await
    }
}

memstore_api::conformance_suite!(approximate: HnswHarness::new());
