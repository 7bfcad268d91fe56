//! The conformance suite in its `approximate` form with the HNSW index kind
//! (memstore-index over usearch), as memstore-sqlite runs it: every case
//! unchanged except the six exact-top-k cases, replaced by recall measurements
//! against brute force. "Reopen" saves the graph beside the database and
//! loads it back.

use std::sync::Arc;

use memstore_duckdb::{DuckdbDriver, DuckdbOptions, IndexOptions};
use memstore_engine::testkit::FileHarness;
use memstore_index::{Hnsw, HnswOptions};

fn hnsw_harness() -> FileHarness<DuckdbDriver> {
    let mut options = DuckdbOptions::default();
    options.index = IndexOptions::default().with_ann(Arc::new(Hnsw::new(HnswOptions::default())));
    FileHarness::new("duckdb", options)
}

memstore_api::conformance_suite!(approximate: hnsw_harness());
