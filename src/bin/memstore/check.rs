//! `check`: a store's rows against themselves, its counters and the index
//! data derived from them.
//!
//! Through the store API, for every backend: ids ascend and are below the
//! next id, `len` and the stats agree with the rows, every memory decodes
//! with finite numbers of the configured dimensions and possible bookkeeping,
//! the access and tag totals equal the rows' sums, and the search index
//! finds each sampled memory's key at its own distance or nearer. For a
//! SQLite file, SQLite's own integrity and foreign-key checks and the SQL
//! kNN mirror of the keys ([`memstore::SqliteDriver::integrity_problems`]);
//! for a saved HNSW graph beside a file store (`<file>.hnsw`), that it was
//! built from exactly these rows (needs the `hnsw` feature).

use std::collections::BTreeMap;
#[cfg(feature = "hnsw")]
use std::path::Path;
use std::path::PathBuf;

use memstore::{AnyStore, MemoryStore, Metric, StoreUrl, Vectors, math};

use crate::error::CliError;

/// Memories read per `get`.
const CHUNK: usize = 4096;
/// Memories whose keys are searched for.
const SAMPLE: usize = 256;

/// The problems found in `store` (none: it is sound).
pub async fn check(store: &AnyStore, url: &StoreUrl) -> Result<Vec<String>, CliError> {
    let mut problems = Vec::new();
    let config = store.config().clone();
    let stats = store.stats().await?;
    let ids = store.ids().await?;
    let len = store.len().await?;
    if ids.windows(2).any(|w| w[0] >= w[1]) {
        problems.push("the ids are not strictly ascending".to_string());
    }
    if ids.len() as u64 != stats.len || ids.len() != len {
        problems.push(format!(
            "{} ids, but the stats count {} memories and len {len}",
            ids.len(),
            stats.len
        ));
    }
    if let Some(&max) = ids.last()
        && max >= stats.next_id
    {
        problems.push(format!("memory {max} is at or beyond the next id {}", stats.next_id));
    }
    let mut accesses = 0u64;
    let mut tags: BTreeMap<String, u64> = BTreeMap::new();
    let mut keys: Vec<f32> = Vec::with_capacity(ids.len() * config.key_dim);
    let step = (ids.len() / SAMPLE).max(1);
    let mut sample: Vec<(u64, f32)> = Vec::new();
    let mut sample_keys: Vec<f32> = Vec::new();
    for (c, chunk) in ids.chunks(CHUNK).enumerate() {
        let memories = store.get(chunk).await?;
        for (i, m) in memories.iter().enumerate() {
            let at = c * CHUNK + i;
            let mut bad = |why: String| problems.push(format!("memory {}: {why}", m.id));
            if m.id != chunk[i] {
                bad(format!("asked for id {}, got {}", chunk[i], m.id));
            }
            if m.key.len() != config.key_dim || m.value.len() != config.value_dim {
                bad(format!(
                    "key and value have {} and {} numbers, the store {} and {}",
                    m.key.len(),
                    m.value.len(),
                    config.key_dim,
                    config.value_dim
                ));
                continue;
            }
            if m.key.iter().chain(&m.value).any(|x| !x.is_finite()) {
                bad("a number of its key or value is not finite".into());
            }
            if m.access_count == 0 || m.created > m.last_access || !(m.crf.is_finite() && m.crf > 0.0) {
                bad(format!(
                    "impossible bookkeeping: {} accesses, created {}, last access {}, CRF {}",
                    m.access_count, m.created, m.last_access, m.crf
                ));
            }
            accesses += m.access_count;
            for (t, n) in &m.tags {
                *tags.entry(t.clone()).or_default() += n;
            }
            keys.extend_from_slice(&m.key);
            if at.is_multiple_of(step) && sample.len() < SAMPLE {
                sample.push((m.id, math::distance(config.metric, &m.key, &m.key)));
                sample_keys.extend_from_slice(&m.key);
            }
        }
    }
    if accesses != stats.access_count_total {
        problems.push(format!(
            "the memories' accesses sum to {accesses}, the stats say {}",
            stats.access_count_total
        ));
    }
    if tags != stats.tag_counts {
        problems.push("the memories' tag counts differ from the stats' per-tag totals".to_string());
    }
    // The inner-product distance of a key to itself is not the smallest in
    // general, so only the true metrics are checked this way.
    if !sample.is_empty() && config.metric != Metric::InnerProduct {
        let found = store
            .search(Vectors::new(&sample_keys, config.key_dim)?, 1, None)
            .await?;
        for (q, &(id, own)) in sample.iter().enumerate() {
            let d = found.distance(q, 0);
            if found.id(q, 0).is_none() || d > own + 1e-4 * (1.0 + own.abs()) {
                problems.push(format!(
                    "searching for memory {id}'s key finds nothing at its distance {own} (nearest: {d})"
                ));
            }
        }
    }
    if let memstore::AnyStore::Sqlite(s) = store {
        problems.extend(s.driver().integrity_problems().await?);
    }
    if let Some(file) = url.file() {
        let mut graph = file.as_os_str().to_owned();
        graph.push(".hnsw");
        let graph = PathBuf::from(graph);
        if graph.exists() {
            check_graph(&graph, &config, &ids, &keys, &mut problems);
        }
    }
    Ok(problems)
}

/// A saved HNSW graph must have been built from exactly these rows.
#[cfg(feature = "hnsw")]
fn check_graph(graph: &Path, config: &memstore::MemoryConfig, ids: &[u64], keys: &[f32], problems: &mut Vec<String>) {
    if let Err(e) = memstore_index::HnswIndex::verify_saved(graph, config.metric, config.key_dim, ids, keys) {
        problems.push(format!(
            "{}: {e} (the store rebuilds it when opened with the HNSW index)",
            graph.display()
        ));
    }
}

/// Without the HNSW index in this build, a saved graph cannot be read.
#[cfg(not(feature = "hnsw"))]
fn check_graph(graph: &std::path::Path, _: &memstore::MemoryConfig, _: &[u64], _: &[f32], _: &mut Vec<String>) {
    eprintln!(
        "note: {} not checked (this build has no `hnsw` feature)",
        graph.display()
    );
}
