//! The conformance suite again, with the HNSW index kind (memstore-index over
//! usearch) instead of the exact search, in its `approximate` form: every
//! case runs unchanged except the six that demand the exact top-k of random
//! data, which are replaced by recall measurements against brute force (see
//! `memstore_api::conformance_suite!`). Candidates are re-ranked by exact
//! distance, so thresholds, ties at distance 0, filters and everything `learn`
//! does behave as in exact mode. "Reopen" saves the graph beside the database
//! and loads it back.

use std::sync::Arc;

use memstore_engine::testkit::FileHarness;
use memstore_index::{Hnsw, HnswOptions};
use memstore_sqlite::{IndexOptions, SqliteDriver, SqliteOptions};

fn hnsw_harness() -> FileHarness<SqliteDriver> {
    let mut options = SqliteOptions::default();
    options.index = IndexOptions::default().with_ann(Arc::new(Hnsw::new(HnswOptions::default())));
    FileHarness::new("db", options)
}

memstore_api::conformance_suite!(approximate: hnsw_harness());
