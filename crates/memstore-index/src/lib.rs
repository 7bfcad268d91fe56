//! # memstore-index
//!
//! The approximate index kind for memstore's stores: [`HnswIndex`], and
//! [`Hnsw`], the [`memstore_engine::ann::AnnBuilder`] that the SQL backends take
//! in their options. Exact search is not here: the stores' own
//! [`memstore_engine::MemoryIndex`] answers it (blocked SGEMM, or the
//! exact 8-bit prefilter on a VNNI CPU), and is the reference that the HNSW
//! candidates are re-ranked against.
//!
//! - [`HnswIndex`]: a hierarchical navigable small-world graph (Malkov &
//!   Yashunin, "Efficient and robust approximate nearest neighbor search
//!   using HNSW graphs", 2018) through [usearch](https://github.com/unum-cloud/usearch):
//!   configurable connectivity, expansion at insert and search time, f32, f16
//!   or i8 storage; filtered search inside the graph walk (usearch's
//!   `filtered_search`), deletes by `remove` (usearch reuses the freed slots
//!   for later inserts). usearch's own `compact` is never called: it
//!   corrupted the heap here under insert/remove churn (double free at dim 4,
//!   usearch 2.26.6); a graph with too many unreused deletions reports
//!   [`HnswIndex::fragmented`] and its owner rebuilds it from the rows.
//!   The search expansion (ef) is calibrated on the data by default
//!   ([`HnswOptions::target_recall`], [`HnswIndex::calibrate_with`]): each
//!   time the graph grows by a quarter, keys held out of an insert batch are searched
//!   as fresh queries and ef is raised until their recall@8 reaches the
//!   target, or lowered while it clears it with a margin — the role of
//!   FAISS's auto-tuning or Weaviate's dynamic ef; one fixed ef gives recall
//!   0.98 on 64-d random keys and 0.60 on 768-d random keys at 100k, while
//!   clustered keys need only ef 16.
//!   An index no larger than its ef is answered by usearch's exhaustive
//!   scan (exact, and no dearer than the walk).
//!
//! Distances follow [`memstore_api::Metric`] everywhere: `L2` is Euclidean
//! (usearch's squared L2 is square-rooted), `Cosine` is `1 − cos`,
//! `InnerProduct` is `1 − a·b`.
//!
//! **Persistence.** An index is derived data: the store's rows are the truth.
//! [`HnswIndex::save`] writes one file atomically (temporary file, fsync,
//! rename) holding a header, a fingerprint of the rows it was built from
//! (count and a hash of every id and key), the usearch graph and a checksum.
//! [`HnswIndex::open_or_build`] loads it only when the checksum holds and the
//! fingerprint matches the rows given; otherwise it rebuilds from the rows
//! (and says so), so a stale, truncated or corrupt file never answers a query.

use std::io::Write;
use std::path::{Path, PathBuf};

use memstore_api::{MemoryId, Metric, math};
use memstore_engine::ann::{AnnBuilder, AnnFilter, AnnIndex, AnnOpened};
use rayon::prelude::*;

/// Errors of the index layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// Input of the wrong shape (dimension, row counts).
    #[error("shape error: {0}")]
    Shape(String),
    /// A NaN or infinite number in the input.
    #[error("non-finite number in {what}, row {row}")]
    NonFinite {
        /// Which input.
        what: &'static str,
        /// The row.
        row: usize,
    },
    /// `k` was zero.
    #[error("k must be at least 1")]
    ZeroK,
    /// An id added twice.
    #[error("memory {0} is already in the index")]
    Duplicate(MemoryId),
    /// Options that cannot work.
    #[error("invalid index options: {0}")]
    InvalidOptions(String),
    /// usearch failed.
    #[error("usearch: {0}")]
    Usearch(String),
    /// A saved index that cannot be used (corrupt, truncated, or built from other rows).
    #[error("index file {path}: {reason}")]
    Unusable {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// File I/O failed.
    #[error("index file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl From<IndexError> for memstore_api::Error {
    fn from(e: IndexError) -> Self {
        match e {
            IndexError::ZeroK => memstore_api::Error::ZeroK,
            IndexError::Shape(m) => memstore_api::Error::Shape(m),
            other => memstore_api::Error::storage(other),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = IndexError> = std::result::Result<T, E>;

/// A predicate on ids that restricts a search (evaluated during the search).
pub type Filter<'a> = &'a (dyn Fn(MemoryId) -> bool + Sync);

/// One search result row: `(distance, id)`, nearest first.
pub type Row = Vec<(f32, MemoryId)>;

fn check_rows(what: &'static str, data: &[f32], dim: usize, rows: Option<usize>) -> Result<usize> {
    if dim == 0 || !data.len().is_multiple_of(dim) {
        return Err(IndexError::Shape(format!(
            "{what}: {} floats are not rows of dimension {dim}",
            data.len()
        )));
    }
    let n = data.len() / dim;
    if let Some(r) = rows
        && r != n
    {
        return Err(IndexError::Shape(format!("{what}: {n} rows for {r} ids")));
    }
    if let Some(p) = data.iter().position(|x| !x.is_finite()) {
        return Err(IndexError::NonFinite { what, row: p / dim });
    }
    Ok(n)
}

/// Refuses ids already present or repeated in the batch.
fn check_new(ids: &[MemoryId], present: impl Fn(MemoryId) -> bool) -> Result<()> {
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    match ids.iter().find(|&&id| present(id) || !seen.insert(id)) {
        Some(&id) => Err(IndexError::Duplicate(id)),
        None => Ok(()),
    }
}

/// How the HNSW graph stores vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Quantization {
    /// 32-bit floats (no loss).
    F32,
    /// Half precision.
    F16,
    /// 8-bit integers (meant for cosine on normalised keys).
    I8,
}

/// HNSW parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct HnswOptions {
    /// Edges per node (usearch's `connectivity`, HNSW's M).
    pub connectivity: usize,
    /// Candidate list size while inserting (efConstruction).
    pub expansion_add: usize,
    /// Candidate list size while searching (ef): the recall/speed knob;
    /// with `target_recall` the ef calibration starts from (and goes up or
    /// down from), and the graph size below which the index is scanned.
    pub expansion_search: usize,
    /// Recall@8 the search expansion is calibrated to reach on the data
    /// itself ([`HnswIndex::calibration`]), or `None` for a fixed ef. The
    /// same graph needs a far larger ef on hard data (random high-dimension
    /// keys) than on easy data, so no fixed default fits every store.
    pub target_recall: Option<f32>,
    /// Vector storage.
    pub quantization: Quantization,
    /// Rebuild the graph from the rows once this share of its slots hold
    /// deleted, not yet reused entries ([`HnswIndex::fragmented`]).
    pub rebuild_after: f32,
}

impl Default for HnswOptions {
    /// Chosen by measurement (tests/index.rs prints recall): on 10k random
    /// 64-d keys ef 256 alone gives recall@8 ≥ 0.95; the calibration to
    /// 0.95 raises it where the data needs more (768-d random keys at 100k)
    /// and lowers it where less does (clustered keys).
    fn default() -> Self {
        HnswOptions {
            connectivity: 32,
            expansion_add: 128,
            expansion_search: 256,
            target_recall: Some(0.95),
            quantization: Quantization::F32,
            rebuild_after: 0.25,
        }
    }
}

impl HnswOptions {
    fn validate(&self) -> Result<()> {
        if self.connectivity < 2 || self.expansion_add == 0 || self.expansion_search == 0 {
            return Err(IndexError::InvalidOptions(format!(
                "connectivity ≥ 2 and expansions ≥ 1 required, got {self:?}"
            )));
        }
        if let Some(r) = self.target_recall
            && !(r > 0.0 && r <= 1.0)
        {
            return Err(IndexError::InvalidOptions(format!(
                "target_recall must be in (0, 1], got {r}"
            )));
        }
        if !(self.rebuild_after > 0.0 && self.rebuild_after <= 1.0) {
            return Err(IndexError::InvalidOptions(format!(
                "rebuild_after must be in (0, 1], got {}",
                self.rebuild_after
            )));
        }
        Ok(())
    }
}

/// Keys of an insert batch held out as calibration queries (at most).
const CALIBRATION_SAMPLE: usize = 128;
/// Fewer held-out keys than this measure too noisily: calibration waits
/// for a larger batch.
const CALIBRATION_MIN: usize = 32;
/// The `k` of the recall that calibration measures (recall@8).
const CALIBRATION_K: usize = 8;
/// The largest ef calibration tries; past it the index answers by scanning.
const MAX_EF: usize = 1 << 15;
/// The smallest ef calibration goes down to (twice the k it measures).
const MIN_EF: usize = 2 * CALIBRATION_K;
/// Growth of the graph (since the last calibration) that calls for the next
/// one. Recall falls as a graph grows at a fixed ef: after calibrating at
/// 65k, a 768-d store grown to 100k measured 0.927 at a 0.95 target, so the
/// step is 1.25×, not 2× (still a constant share of insert time).
const RECALIBRATE_GROWTH: f64 = 1.25;

/// What the last calibration of the search expansion found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Calibration {
    /// Vectors in the index when it ran.
    pub size: usize,
    /// The ef chosen (the smallest tried that reached the target).
    pub expansion_search: usize,
    /// Recall@8 of the sample at that ef (1.0 once ef covers the index).
    pub recall: f32,
    /// Sample queries used.
    pub queries: usize,
}

/// Approximate search by an HNSW graph (usearch).
pub struct HnswIndex {
    index: usearch::Index,
    metric: Metric,
    dim: usize,
    options: HnswOptions,
    deleted: usize,
    /// The ef searches use now (`options.expansion_search` until calibrated).
    ef: usize,
    calibration: Option<Calibration>,
}

impl std::fmt::Debug for HnswIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HnswIndex")
            .field("metric", &self.metric)
            .field("dim", &self.dim)
            .field("len", &self.index.size())
            .field("options", &self.options)
            .field("ef", &self.ef)
            .finish()
    }
}

fn us<E: std::fmt::Display>(e: E) -> IndexError {
    IndexError::Usearch(e.to_string())
}

/// What [`HnswIndex::open_or_build`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opened {
    /// The saved index matched the rows and was loaded.
    Loaded,
    /// There was no saved index; it was built and saved.
    Built,
    /// The saved index could not be used (the reason); it was rebuilt and saved.
    Rebuilt(String),
}

/// The file format: header (magic, dim, metric, fingerprint, rows, graph
/// length, the last calibration), usearch graph, CRC-32 of all before it.
/// Files of earlier formats are not read: the index is rebuilt from the rows.
const MAGIC: &[u8; 8] = b"MSHNSW04";

impl HnswIndex {
    /// An empty index.
    pub fn new(metric: Metric, dim: usize, options: HnswOptions) -> Result<Self> {
        options.validate()?;
        if dim == 0 {
            return Err(IndexError::InvalidOptions("dimension must be at least 1".into()));
        }
        let opts = usearch::IndexOptions {
            dimensions: dim,
            metric: match metric {
                Metric::L2 => usearch::MetricKind::L2sq,
                Metric::Cosine => usearch::MetricKind::Cos,
                Metric::InnerProduct => usearch::MetricKind::IP,
            },
            quantization: match options.quantization {
                Quantization::F32 => usearch::ScalarKind::F32,
                Quantization::F16 => usearch::ScalarKind::F16,
                Quantization::I8 => usearch::ScalarKind::I8,
            },
            connectivity: options.connectivity,
            expansion_add: options.expansion_add,
            expansion_search: options.expansion_search,
            multi: false,
        };
        let index = usearch::Index::new(&opts).map_err(us)?;
        // One search/insert context per worker thread, so that batched
        // searches and inserts run in parallel.
        index
            .reserve_capacity_and_threads(64, rayon::current_num_threads().max(1))
            .map_err(us)?;
        Ok(HnswIndex {
            index,
            metric,
            dim,
            options,
            deleted: 0,
            ef: options.expansion_search,
            calibration: None,
        })
    }

    /// The options.
    pub fn options(&self) -> &HnswOptions {
        &self.options
    }

    /// Fixes the search expansion (ef) of a built index (and turns
    /// calibration off).
    pub fn set_expansion_search(&mut self, ef: usize) {
        self.options.expansion_search = ef.max(1);
        self.options.target_recall = None;
        self.set_ef(ef.max(1));
    }

    /// The search expansion in use (calibrated or fixed).
    pub fn expansion_search(&self) -> usize {
        self.ef
    }

    /// The last calibration, if one ran.
    pub fn calibration(&self) -> Option<Calibration> {
        self.calibration
    }

    fn set_ef(&mut self, ef: usize) {
        self.ef = ef;
        self.index.change_expansion_search(ef);
    }

    /// Whether an insert that brings the index to `size` vectors should
    /// calibrate: a target is set, the graph is too large to scan, and it
    /// has grown by [`RECALIBRATE_GROWTH`] since the last calibration
    /// (geometric steps: amortised, a constant share of insert time).
    fn calibration_due(&self, size: usize) -> bool {
        self.options.target_recall.is_some()
            && size > self.options.expansion_search
            && size as f64 >= RECALIBRATE_GROWTH * self.calibration.map_or(0, |c| c.size) as f64
    }

    /// Finds the smallest search expansion (ef) at which this graph reaches
    /// `target_recall` for `queries` (row-major, ideally drawn like the
    /// queries to come and not stored in the graph): recall@8 against
    /// usearch's exhaustive scan of the same vectors; ef doubles from
    /// `expansion_search` until the target is met (or ef covers the graph,
    /// which is then scanned), or, when `expansion_search` already meets
    /// it with a margin (two standard errors of the sample), halves while
    /// that margin holds (not below 16); then the point halfway to the last
    /// ef that missed is tried. The result stays in use until the next
    /// calibration.
    ///
    /// Inserts calibrate on their own: when the graph has grown by a
    /// quarter, up to 128 keys of an insert batch of at least 64 are held
    /// out, the rest inserted, the held-out keys used as fresh queries, then
    /// inserted.
    /// (Stored keys make poor calibration queries: the graph linked each to
    /// its neighbours, so they are found far more easily than new points —
    /// measured at 256-d: 0.97 for stored keys where new queries got 0.87.)
    pub fn calibrate_with(&mut self, queries: &[f32]) -> Result<Option<Calibration>> {
        let before = self.ef;
        let found = self.calibrate_inner(queries);
        if found.is_err() {
            // The ef in use stays what it was; the calibration stays due.
            self.set_ef(before);
        }
        found
    }

    fn calibrate_inner(&mut self, queries: &[f32]) -> Result<Option<Calibration>> {
        let Some(target) = self.options.target_recall else {
            return Ok(None);
        };
        let m = check_rows("queries", queries, self.dim, None)?;
        if m == 0 {
            return Err(IndexError::Shape("calibration needs at least one query".into()));
        }
        let size = self.index.size();
        let start = self.options.expansion_search;
        let d = self.dim;
        if size <= start {
            // Searched by scanning: exact.
            self.set_ef(start);
            let c = Calibration {
                size,
                expansion_search: start,
                recall: 1.0,
                queries: m,
            };
            self.calibration = Some(c);
            return Ok(Some(c));
        }
        let k = CALIBRATION_K.min(size);
        let truth: Vec<Vec<MemoryId>> = (0..m)
            .into_par_iter()
            .map(|i| {
                let found = self.index.exact_search(&queries[i * d..(i + 1) * d], k).map_err(us)?;
                Ok(found.keys)
            })
            .collect::<Result<_>>()?;
        let measure = |this: &mut Self, ef: usize| -> Result<f32> {
            this.set_ef(ef);
            let hits: Vec<(usize, usize)> = (0..m)
                .into_par_iter()
                .map(|i| {
                    let found = this.index.search(&queries[i * d..(i + 1) * d], k).map_err(us)?;
                    Ok((
                        found.keys.iter().filter(|id| truth[i].contains(id)).count(),
                        truth[i].len(),
                    ))
                })
                .collect::<Result<_>>()?;
            let (hit, all) = hits.into_iter().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            Ok(if all == 0 { 1.0 } else { hit as f32 / all as f32 })
        };
        let mut ef = start;
        let mut recall = measure(self, ef)?;
        let mut below = None;
        while recall < target && ef < size && ef < MAX_EF {
            below = Some(ef);
            ef = (ef * 2).min(MAX_EF);
            recall = if ef >= size { 1.0 } else { measure(self, ef)? };
        }
        // Going below the start needs the sample to clear the target by two
        // standard errors (of m·k neighbour hits): the smallest ef whose
        // sample just meets the target misses it on fresh queries about
        // half the time (seen: 0.950 fresh at a 0.95 target, 5k × 32 cosine).
        let samples = (m * k).max(1) as f32;
        let clears = |r: f32| r - 2.0 * (r * (1.0 - r) / samples).sqrt() >= target;
        let mut lowering = false;
        if below.is_none() && clears(recall) {
            // The start already reaches the target (easy data: clustered
            // keys reach recall 1.0 at ef 16 where random ones need
            // thousands): halve while the target holds.
            lowering = true;
            while ef / 2 >= MIN_EF {
                let r = measure(self, ef / 2)?;
                if !clears(r) {
                    below = Some(ef / 2);
                    break;
                }
                (ef, recall) = (ef / 2, r);
            }
        }
        // The halfway point must pass the same test as the ef it replaces.
        let passes = |r: f32| if lowering { clears(r) } else { r >= target };
        if let Some(lo) = below
            && recall >= target
        {
            let mid = lo + (ef - lo) / 2;
            if mid > lo && mid < size {
                let r = measure(self, mid)?;
                if passes(r) {
                    (ef, recall) = (mid, r);
                }
            }
        }
        self.set_ef(ef);
        let c = Calibration {
            size,
            expansion_search: ef,
            recall,
            queries: m,
        };
        self.calibration = Some(c);
        Ok(Some(c))
    }

    /// Deleted entries whose slots no insert has reused yet.
    pub fn tombstones(&self) -> usize {
        self.deleted
    }

    /// Whether deleted, unreused entries fill at least `rebuild_after` of the
    /// graph's slots (they still route searches and cost memory): time to
    /// rebuild from the rows.
    pub fn fragmented(&self) -> bool {
        let slots = self.index.size() + self.deleted;
        self.deleted > 0 && self.deleted as f32 >= self.options.rebuild_after * slots as f32
    }

    /// The usearch index underneath, for read-only use (the benchmarks call
    /// it directly as the raw anchor of this wrapper's overhead).
    pub fn raw(&self) -> &usearch::Index {
        &self.index
    }

    /// Builds an index of `(ids, keys)`.
    pub fn build(metric: Metric, dim: usize, options: HnswOptions, ids: &[MemoryId], keys: &[f32]) -> Result<Self> {
        let mut h = HnswIndex::new(metric, dim, options)?;
        h.add(ids, keys)?;
        Ok(h)
    }

    fn to_metric(&self, d: f32) -> f32 {
        match self.metric {
            Metric::L2 => d.max(0.0).sqrt(),
            _ => d,
        }
    }

    /// Writes the index to `path` atomically, with the fingerprint of the
    /// rows it holds (`ids` and `keys`, as the store has them).
    pub fn save(&self, path: &Path, ids: &[MemoryId], keys: &[f32]) -> Result<()> {
        let io = |source| IndexError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut graph = vec![0u8; self.index.serialized_length()];
        self.index.save_to_buffer(&mut graph).map_err(us)?;
        let mut out = Vec::with_capacity(graph.len() + 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.dim as u64).to_le_bytes());
        out.push(self.metric.as_str().as_bytes()[0]);
        out.extend_from_slice(&fingerprint(ids, keys).to_le_bytes());
        out.extend_from_slice(&(ids.len() as u64).to_le_bytes());
        out.extend_from_slice(&(graph.len() as u64).to_le_bytes());
        let c = self.calibration.unwrap_or(Calibration {
            size: 0,
            expansion_search: 0,
            recall: 0.0,
            queries: 0,
        });
        out.extend_from_slice(&(c.size as u64).to_le_bytes());
        out.extend_from_slice(&(c.expansion_search as u64).to_le_bytes());
        out.extend_from_slice(&c.recall.to_bits().to_le_bytes());
        out.extend_from_slice(&(c.queries as u32).to_le_bytes());
        out.extend_from_slice(&self.options.target_recall.unwrap_or(0.0).to_bits().to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&graph);
        let sum = crc32fast::hash(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&out).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent()
            && let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            })
        {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Checks that the index saved at `path` is intact and was built from
    /// exactly these rows (what [`HnswIndex::open_or_build`] would load
    /// rather than rebuild); the error says why not. Writes nothing.
    pub fn verify_saved(path: &Path, metric: Metric, dim: usize, ids: &[MemoryId], keys: &[f32]) -> Result<()> {
        check_rows("keys", keys, dim, Some(ids.len()))?;
        Self::load(path, metric, dim, HnswOptions::default(), ids, keys).map(|_| ())
    }

    /// Loads the index saved at `path` if it is intact and was built from
    /// exactly these rows; otherwise builds it from the rows and saves it.
    pub fn open_or_build(
        path: &Path,
        metric: Metric,
        dim: usize,
        options: HnswOptions,
        ids: &[MemoryId],
        keys: &[f32],
    ) -> Result<(Self, Opened)> {
        check_rows("keys", keys, dim, Some(ids.len()))?;
        let why = match Self::load(path, metric, dim, options, ids, keys) {
            Ok(h) => return Ok((h, Opened::Loaded)),
            Err(IndexError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some(e.to_string()),
        };
        let h = Self::build(metric, dim, options, ids, keys)?;
        h.save(path, ids, keys)?;
        Ok((h, why.map_or(Opened::Built, Opened::Rebuilt)))
    }

    fn load(
        path: &Path,
        metric: Metric,
        dim: usize,
        options: HnswOptions,
        ids: &[MemoryId],
        keys: &[f32],
    ) -> Result<Self> {
        let bad = |reason: String| IndexError::Unusable {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|source| IndexError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // Magic, dim, metric, fingerprint, rows, graph length, then the
        // calibration: size, ef, recall, queries, target, reserved.
        const HEAD: usize = 8 + 8 + 1 + 8 + 8 + 8 + 8 + 8 + 4 + 4 + 4 + 4;
        if bytes.get(..8) != Some(&MAGIC[..]) || bytes.len() < HEAD + 4 {
            return Err(bad("not a memstore HNSW index of this format (bad header)".into()));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 4);
        let u64_at = |o: usize| -> u64 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let mut s = [0u8; 4];
        s.copy_from_slice(sum);
        if crc32fast::hash(body) != u32::from_le_bytes(s) {
            return Err(bad("checksum mismatch (corrupt or truncated)".into()));
        }
        if u64_at(8) != dim as u64 || body[16] != metric.as_str().as_bytes()[0] {
            return Err(bad("built for another dimension or metric".into()));
        }
        if u64_at(17) != fingerprint(ids, keys) || u64_at(25) != ids.len() as u64 {
            return Err(bad("built from other rows than the store holds".into()));
        }
        let glen = u64_at(33) as usize;
        if HEAD + glen != body.len() {
            return Err(bad("graph length does not match the file".into()));
        }
        let u32_at = |o: usize| -> u32 {
            let mut b = [0u8; 4];
            b.copy_from_slice(&body[o..o + 4]);
            u32::from_le_bytes(b)
        };
        // The saved calibration holds for the same target and starting ef.
        let saved = (u64_at(41) > 0)
            .then(|| {
                let c = Calibration {
                    size: u64_at(41) as usize,
                    expansion_search: u64_at(49) as usize,
                    recall: f32::from_bits(u32_at(57)),
                    queries: u32_at(61) as usize,
                };
                let target = f32::from_bits(u32_at(65));
                (options.target_recall == Some(target) && c.expansion_search >= options.expansion_search).then_some(c)
            })
            .flatten();
        let mut h = HnswIndex::new(metric, dim, options)?;
        h.index
            .load_from_buffer(&body[HEAD..])
            .map_err(|e| bad(format!("usearch: {e}")))?;
        h.set_ef(saved.map_or(options.expansion_search, |c| c.expansion_search));
        h.calibration = saved;
        if h.index.size() != ids.len() || ids.iter().any(|&id| !h.index.contains(id)) {
            return Err(bad("the graph's keys differ from the rows".into()));
        }
        // Loading does not reserve search contexts for every thread.
        h.index
            .reserve_capacity_and_threads(h.index.size(), rayon::current_num_threads().max(1))
            .map_err(us)?;
        Ok(h)
    }
}

/// A 64-bit hash of the rows: every `(id, key bits)` pair hashed on its own
/// (XXH3-64 over the id's and the key's little-endian bytes) and the hashes
/// summed with the row count, so the order of the rows does not matter (a
/// store keeps them in storage order, which deletes permute).
pub fn fingerprint(ids: &[MemoryId], keys: &[f32]) -> u64 {
    let dim = keys.len().checked_div(ids.len()).unwrap_or(0);
    let mut row = Vec::with_capacity(8 + 4 * dim);
    let mut sum = xxhash_rust::xxh3::xxh3_64(&(ids.len() as u64).to_le_bytes());
    for (i, &id) in ids.iter().enumerate() {
        row.clear();
        row.extend_from_slice(&id.to_le_bytes());
        for &k in &keys[i * dim..(i + 1) * dim] {
            row.extend_from_slice(&k.to_bits().to_le_bytes());
        }
        sum = sum.wrapping_add(xxhash_rust::xxh3::xxh3_64(&row));
    }
    sum
}

impl HnswIndex {
    /// The metric.
    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// The key dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.index.size()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `id` is present.
    pub fn contains(&self, id: MemoryId) -> bool {
        self.index.contains(id)
    }

    /// Adds keys (`ids.len() × dim`, row-major) under new ids; calibrates
    /// the search expansion when the graph has grown enough (see
    /// [`HnswIndex::calibrate_with`]).
    pub fn add(&mut self, ids: &[MemoryId], keys: &[f32]) -> Result<()> {
        check_rows("keys", keys, self.dim, Some(ids.len()))?;
        check_new(ids, |id| self.index.contains(id))?;
        let threads = rayon::current_num_threads().max(1);
        self.index
            .reserve_capacity_and_threads(self.index.size() + ids.len(), threads)
            .map_err(us)?;
        let d = self.dim;
        let n = ids.len();
        let insert = |this: &Self, i: usize| this.index.add(ids[i], &keys[i * d..(i + 1) * d]).map_err(us);
        let held = if self.calibration_due(self.index.size() + n) && n >= 2 * CALIBRATION_MIN {
            CALIBRATION_SAMPLE.min(n / 2)
        } else {
            0
        };
        if held == 0 {
            (0..n).into_par_iter().try_for_each(|i| insert(self, i))?;
        } else {
            // Held-out keys: evenly spread over the batch, inserted last.
            let last: Vec<usize> = (0..held).map(|j| j * n / held).collect();
            let mut out = vec![false; n];
            last.iter().for_each(|&i| out[i] = true);
            (0..n)
                .into_par_iter()
                .filter(|&i| !out[i])
                .try_for_each(|i| insert(self, i))?;
            let queries: Vec<f32> = last
                .iter()
                .flat_map(|&i| keys[i * d..(i + 1) * d].iter().copied())
                .collect();
            // Calibration is tuning, not the insert: if usearch fails it, the
            // ef in use stays and the next due insert tries again.
            let _ = self.calibrate_with(&queries);
            last.par_iter().try_for_each(|&i| insert(self, i))?;
        }
        // Inserts take freed slots first.
        self.deleted = self.deleted.saturating_sub(n);
        Ok(())
    }

    /// Removes ids (absent ones are skipped); returns how many were removed.
    pub fn remove(&mut self, ids: &[MemoryId]) -> Result<usize> {
        let mut n = 0;
        for &id in ids {
            if self.index.contains(id) {
                n += self.index.remove(id).map_err(us)?;
            }
        }
        self.deleted += n;
        Ok(n)
    }

    /// The `k` nearest keys of each query (`m × dim`) that pass `filter`,
    /// nearest first (ties by id); fewer when fewer pass.
    pub fn search(&self, queries: &[f32], k: usize, filter: Option<Filter<'_>>) -> Result<Vec<Row>> {
        if k == 0 {
            return Err(IndexError::ZeroK);
        }
        let m = check_rows("queries", queries, self.dim, None)?;
        let d = self.dim;
        let size = self.index.size();
        // A graph no larger than the search's candidate list is answered by
        // usearch's exhaustive scan (it skips removed slots): exact, and no
        // dearer than the walk, which on a small graph whose nearest keys
        // all fail the filter can stop short of the k that pass.
        let start = self.options.expansion_search;
        let exhaustive = size <= self.ef.max(start);
        // (Calibration may lower ef below the start on easy data; graphs up
        // to the start's size are still scanned. Filtered walks at the
        // lowered ef keep their recall: tests/index.rs
        // calibration_lowers_ef_on_easy_data.)
        (0..m)
            .into_par_iter()
            .map(|i| {
                let q = &queries[i * d..(i + 1) * d];
                if size == 0 {
                    return Ok(Vec::new());
                }
                let found = match filter {
                    // The scan filters afterwards: all of it, then the k best that pass.
                    Some(_) if exhaustive => self.index.exact_search(q, size),
                    None if exhaustive => self.index.exact_search(q, k.min(size)),
                    Some(f) => self.index.filtered_search(q, k, f),
                    None => self.index.search(q, k),
                }
                .map_err(us)?;
                let mut row: Row = found
                    .keys
                    .iter()
                    .zip(&found.distances)
                    .filter(|(id, _)| filter.is_none_or(|f| f(**id)))
                    .map(|(&id, &dist)| (self.to_metric(dist), id))
                    .collect();
                row.sort_by(|a, b| math::neighbour_order(*a, *b));
                row.truncate(k);
                Ok(row)
            })
            .collect()
    }
}

impl From<Opened> for AnnOpened {
    fn from(o: Opened) -> Self {
        match o {
            Opened::Loaded => AnnOpened::Loaded,
            Opened::Built => AnnOpened::Built,
            Opened::Rebuilt(why) => AnnOpened::Rebuilt(why),
        }
    }
}

/// An [`HnswIndex`] seen as a `MemoryIndex`'s approximate structure (a
/// wrapper, so that the two traits' methods never clash on `HnswIndex`).
struct HnswAnn(HnswIndex);

impl AnnIndex for HnswAnn {
    fn add(&mut self, ids: &[MemoryId], keys: &[f32]) -> memstore_api::Result<()> {
        Ok(self.0.add(ids, keys)?)
    }
    fn remove(&mut self, ids: &[MemoryId]) -> memstore_api::Result<()> {
        self.0.remove(ids)?;
        Ok(())
    }
    fn search(
        &self,
        queries: &[f32],
        k: usize,
        filter: Option<AnnFilter<'_>>,
    ) -> memstore_api::Result<Vec<Vec<(f32, MemoryId)>>> {
        Ok(self.0.search(queries, k, filter)?)
    }
    fn save(&self, path: &Path, ids: &[MemoryId], keys: &[f32]) -> memstore_api::Result<()> {
        Ok(self.0.save(path, ids, keys)?)
    }
    fn needs_rebuild(&self) -> bool {
        self.0.fragmented()
    }
}

/// The HNSW index kind for the SQL backends' `MemoryIndex` (an
/// [`AnnBuilder`]): pass `Arc::new(Hnsw::new(options))` in the backend's
/// options. The graph is saved beside the database as `<db>.hnsw`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Hnsw {
    /// The graph's parameters.
    pub options: HnswOptions,
}

impl Hnsw {
    /// An HNSW kind with these parameters.
    pub fn new(options: HnswOptions) -> Self {
        Hnsw { options }
    }
}

impl AnnBuilder for Hnsw {
    fn describe(&self) -> String {
        let o = &self.options;
        let ef = match o.target_recall {
            Some(r) => format!("ef ≥ {} calibrated to recall@8 {r}", o.expansion_search),
            None => format!("ef {}", o.expansion_search),
        };
        format!(
            "hnsw (usearch; M {}, ef_add {}, {ef}, {:?})",
            o.connectivity, o.expansion_add, o.quantization
        )
    }
    fn extension(&self) -> &str {
        "hnsw"
    }
    fn open(
        &self,
        metric: Metric,
        dim: usize,
        saved: Option<&Path>,
        ids: &[MemoryId],
        keys: &[f32],
    ) -> memstore_api::Result<(Box<dyn AnnIndex>, AnnOpened)> {
        let (index, opened) = match saved {
            Some(path) => HnswIndex::open_or_build(path, metric, dim, self.options, ids, keys)?,
            None => (HnswIndex::build(metric, dim, self.options, ids, keys)?, Opened::Built),
        };
        Ok((Box::new(HnswAnn(index)), opened.into()))
    }
}
