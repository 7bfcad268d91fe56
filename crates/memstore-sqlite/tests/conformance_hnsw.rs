//! The conformance suite again, with the HNSW index kind (memstore-index over
//! usearch) instead of the exact search, in its `approximate` form: every
//! case runs unchanged except the six that demand the exact top-k of random
//! data, which are replaced by recall measurements against brute force (see
//! `memstore_api::conformance_suite!`). Candidates are re-ranked by exact
//! distance, so thresholds, ties at distance 0, filters and everything `learn`
//! does behave as in exact mode. "Reopen" saves the graph beside the database
//! and loads it back.

use std::sync::Arc;

use async_trait::async_trait;
use memstore_api::testkit::Harness;
use memstore_api::{MemoryConfig, Result};
use memstore_index::{Hnsw, HnswOptions};
use memstore_sqlite::{IndexOptions, SqliteOptions, SqliteStore};

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
    type Store = SqliteStore;

    async fn open(&self, config: MemoryConfig) -> Result<SqliteStore> {
        let options = {
            let mut o = SqliteOptions::default();
            o.index = IndexOptions::default().with_ann(Arc::new(Hnsw::new(HnswOptions::default())));
            o
        };
        SqliteStore::open_with(self.dir.path().join("store.db"), config, options).await
    }

    async fn close(&self, store: SqliteStore) -> Result<()> {
        store.close().await
    }
}

memstore_api::conformance_suite!(approximate: HnswHarness::new());
