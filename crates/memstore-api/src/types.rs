//! The data types of the API: configuration, input batches, stored memories,
//! search results and statistics.

use std::collections::BTreeMap;

use crate::{Error, Result};

/// A logical clock value passed by the caller (a training step, say), so that
/// runs are deterministic and testable. Ticks should not go backwards; an
/// older tick is treated as "no time has passed".
pub type Tick = u64;

/// A memory's identity: assigned by the store from 1 upwards, never reused.
pub type MemoryId = u64;

/// The distance between keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Euclidean distance `‖a − b‖₂` (not squared).
    L2,
    /// Cosine distance `1 − a·b / (‖a‖‖b‖)`; 1 when either vector is zero.
    Cosine,
    /// Inner-product distance `1 − a·b` (the usearch convention); can be negative.
    InnerProduct,
}

impl Metric {
    /// The metric's persisted name.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::L2 => "l2",
            Metric::Cosine => "cosine",
            Metric::InnerProduct => "ip",
        }
    }

    /// Parses a persisted name (`l2`, `cosine`, `ip`).
    pub fn parse(s: &str) -> Option<Metric> {
        match s {
            "l2" => Some(Metric::L2),
            "cosine" => Some(Metric::Cosine),
            "ip" => Some(Metric::InnerProduct),
            _ => None,
        }
    }
}

/// How victims are chosen when the store must shrink.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EvictionPolicy {
    /// LRFU (Lee et al. 1999): on each access `crf = 1 + 2^(−λ·Δt)·crf`;
    /// the victim has the lowest decayed CRF. λ = 0 is LFU, λ = 1 is LRU-like.
    Lrfu {
        /// The decay rate λ ≥ 0.
        lambda: f64,
    },
}

impl EvictionPolicy {
    /// Least recently used (LRFU with λ = 1).
    pub fn lru() -> Self {
        EvictionPolicy::Lrfu { lambda: 1.0 }
    }

    /// Least frequently used (LRFU with λ = 0).
    pub fn lfu() -> Self {
        EvictionPolicy::Lrfu { lambda: 0.0 }
    }

    /// The LRFU decay rate.
    pub fn lambda(&self) -> f64 {
        match *self {
            EvictionPolicy::Lrfu { lambda } => lambda,
        }
    }
}

/// The configuration of one store. It is persisted with the store; reopening
/// with a different dimension or metric is [`Error::ConfigMismatch`].
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryConfig {
    /// Dimension of keys.
    pub key_dim: usize,
    /// Dimension of values.
    pub value_dim: usize,
    /// Distance between keys.
    pub metric: Metric,
    /// Maximum number of memories; inserts and `learn` evict down to it.
    pub capacity: Option<usize>,
    /// Which memories go first.
    pub eviction: EvictionPolicy,
    /// `learn` inserts an observation only when every neighbour is farther than this.
    pub novelty: f32,
    /// `learn` merges an observation with neighbours closer than this.
    pub recombine: f32,
}

impl MemoryConfig {
    /// A configuration with the given dimensions, L2, no capacity, LRFU λ = 0.5,
    /// and thresholds that never merge and always insert.
    pub fn new(key_dim: usize, value_dim: usize) -> Self {
        MemoryConfig {
            key_dim,
            value_dim,
            metric: Metric::L2,
            capacity: None,
            eviction: EvictionPolicy::Lrfu { lambda: 0.5 },
            novelty: 0.0,
            recombine: 0.0,
        }
    }

    /// Sets the metric.
    pub fn with_metric(mut self, metric: Metric) -> Self {
        self.metric = metric;
        self
    }

    /// Sets the capacity.
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// Sets the eviction policy.
    pub fn with_eviction(mut self, eviction: EvictionPolicy) -> Self {
        self.eviction = eviction;
        self
    }

    /// Sets the novelty and recombination thresholds.
    pub fn with_thresholds(mut self, recombine: f32, novelty: f32) -> Self {
        self.recombine = recombine;
        self.novelty = novelty;
        self
    }

    /// Checks that the configuration can work.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.key_dim == 0 || self.value_dim == 0 {
            return bad(format!(
                "key_dim ({}) and value_dim ({}) must be at least 1",
                self.key_dim, self.value_dim
            ));
        }
        if self.capacity == Some(0) {
            return bad("capacity must be at least 1 when set".into());
        }
        let lambda = self.eviction.lambda();
        if !lambda.is_finite() || lambda < 0.0 {
            return bad(format!("LRFU lambda must be finite and >= 0, got {lambda}"));
        }
        if !self.novelty.is_finite() || !self.recombine.is_finite() {
            return bad(format!(
                "thresholds must be finite (recombine {}, novelty {})",
                self.recombine, self.novelty
            ));
        }
        if self.recombine > self.novelty {
            return bad(format!(
                "recombine ({}) must not exceed novelty ({})",
                self.recombine, self.novelty
            ));
        }
        Ok(())
    }

    /// Validates a search's inputs: `k ≥ 1`, query dimension, finite
    /// numbers, an answer that can be addressed.
    pub fn check_search(&self, queries: &Vectors<'_>, k: usize) -> Result<()> {
        if k == 0 {
            return Err(Error::ZeroK);
        }
        queries.check("queries", self.key_dim)?;
        self.check_answer(queries.len(), k)
    }

    /// Validates a `learn`'s inputs: `k ≥ 1`, the batch, an answer that can
    /// be addressed.
    pub fn check_learn(&self, batch: &Batch<'_>, k: usize) -> Result<()> {
        if k == 0 {
            return Err(Error::ZeroK);
        }
        batch.check(self)?;
        self.check_answer(batch.len(), k)
    }

    /// Refuses a `k` whose fixed-shape answer (`rows × k` slots, each an id,
    /// a distance, a key and a value) could not even be addressed: a typed
    /// error where allocating it would panic. (An answer that fits the
    /// address space but not the machine's memory is the caller's to size.)
    pub fn check_answer(&self, rows: usize, k: usize) -> Result<()> {
        let slot = std::mem::size_of::<Option<MemoryId>>() + 4 + 4 * (self.key_dim + self.value_dim);
        match rows.checked_mul(k).and_then(|slots| slots.checked_mul(slot)) {
            Some(bytes) if bytes <= isize::MAX as usize => Ok(()),
            _ => Err(Error::Shape(format!(
                "an answer of {rows} rows x k = {k} slots is too large to allocate"
            ))),
        }
    }

    /// Checks that a store persisted with `stored` may be opened with `self`:
    /// dimensions and metric must agree; the other fields are tunable.
    pub fn check_compatible(&self, stored: &MemoryConfig) -> Result<()> {
        let mismatch = |field, s: String, r: String| {
            Err(Error::ConfigMismatch {
                field,
                stored: s,
                requested: r,
            })
        };
        if self.key_dim != stored.key_dim {
            return mismatch("key_dim", stored.key_dim.to_string(), self.key_dim.to_string());
        }
        if self.value_dim != stored.value_dim {
            return mismatch("value_dim", stored.value_dim.to_string(), self.value_dim.to_string());
        }
        if self.metric != stored.metric {
            return mismatch("metric", stored.metric.as_str().into(), self.metric.as_str().into());
        }
        Ok(())
    }
}

/// A borrowed row-major matrix of `len()` rows of `dim()` floats: the input
/// format of every batched operation (no per-row allocation, ready for IPC
/// and device upload).
#[derive(Clone, Copy, Debug)]
pub struct Vectors<'a> {
    data: &'a [f32],
    dim: usize,
}

impl<'a> Vectors<'a> {
    /// Wraps `data` as rows of `dim` floats; `data.len()` must be a multiple of `dim`.
    pub fn new(data: &'a [f32], dim: usize) -> Result<Self> {
        if dim == 0 {
            return Err(Error::Shape("vector dimension must be at least 1".into()));
        }
        if !data.len().is_multiple_of(dim) {
            return Err(Error::Shape(format!(
                "{} floats is not a whole number of rows of dimension {dim}",
                data.len()
            )));
        }
        Ok(Vectors { data, dim })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.data.len() / self.dim
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Floats per row.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The flat row-major data.
    pub fn data(&self) -> &'a [f32] {
        self.data
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// Checks the dimension against the store's and that every number is finite.
    pub fn check(&self, what: &'static str, expected: usize) -> Result<()> {
        if self.dim != expected {
            return Err(Error::DimensionMismatch {
                what,
                expected,
                got: self.dim,
            });
        }
        if let Some(p) = self.data.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                what,
                row: p / self.dim,
                col: p % self.dim,
            });
        }
        Ok(())
    }
}

/// Tags attached to the rows of a batch.
#[derive(Clone, Copy, Debug, Default)]
pub enum Tags<'a> {
    /// No tags.
    #[default]
    None,
    /// The same tags on every row.
    Same(&'a [String]),
    /// One tag set per row.
    PerRow(&'a [Vec<String>]),
}

impl<'a> Tags<'a> {
    /// The tags of row `i` (call [`Tags::check`] first).
    pub fn row(&self, i: usize) -> &'a [String] {
        match *self {
            Tags::None => &[],
            Tags::Same(t) => t,
            Tags::PerRow(t) => &t[i],
        }
    }

    /// Checks that per-row tags match the row count.
    pub fn check(&self, rows: usize) -> Result<()> {
        match *self {
            Tags::PerRow(t) if t.len() != rows => Err(Error::TagCount { got: t.len(), rows }),
            _ => Ok(()),
        }
    }
}

/// Keys, values and tags to insert or learn, row `i` of each belonging together.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    /// Keys, `n × key_dim`.
    pub keys: Vectors<'a>,
    /// Values, `n × value_dim`.
    pub values: Vectors<'a>,
    /// Tags of the rows.
    pub tags: Tags<'a>,
}

impl<'a> Batch<'a> {
    /// A batch without tags.
    pub fn new(keys: Vectors<'a>, values: Vectors<'a>) -> Self {
        Batch {
            keys,
            values,
            tags: Tags::None,
        }
    }

    /// Attaches tags.
    pub fn with_tags(mut self, tags: Tags<'a>) -> Self {
        self.tags = tags;
        self
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Validates the batch against a configuration: dimensions, equal row
    /// counts, finite numbers, tag count.
    pub fn check(&self, config: &MemoryConfig) -> Result<()> {
        self.keys.check("keys", config.key_dim)?;
        self.values.check("values", config.value_dim)?;
        if self.keys.len() != self.values.len() {
            return Err(Error::Shape(format!(
                "{} keys but {} values",
                self.keys.len(),
                self.values.len()
            )));
        }
        self.tags.check(self.keys.len())
    }
}

/// Restricts a search to memories carrying tags. Applied during the search,
/// so `k` results come back whenever `k` matching memories exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TagFilter {
    /// Memories carrying at least one of these tags.
    Any(Vec<String>),
    /// Memories carrying all of these tags.
    All(Vec<String>),
}

impl TagFilter {
    /// Whether a memory with these tags passes the filter.
    pub fn matches(&self, tags: &BTreeMap<String, u64>) -> bool {
        match self {
            TagFilter::Any(want) => want.iter().any(|t| tags.contains_key(t)),
            TagFilter::All(want) => want.iter().all(|t| tags.contains_key(t)),
        }
    }
}

/// A stored memory with its access bookkeeping.
#[derive(Clone, Debug, PartialEq)]
pub struct Memory {
    /// Identity.
    pub id: MemoryId,
    /// Key, `key_dim` floats.
    pub key: Vec<f32>,
    /// Value, `value_dim` floats.
    pub value: Vec<f32>,
    /// Tick of creation (for a merge: the oldest original's).
    pub created: Tick,
    /// Tick of the last access.
    pub last_access: Tick,
    /// Number of accesses, the insertion included.
    pub access_count: u64,
    /// LRFU combined recency-frequency value at `last_access`.
    pub crf: f64,
    /// Tags with their counts (merges sum the counts).
    pub tags: BTreeMap<String, u64>,
}

/// Fixed-shape results of a batched search, `n` rows of `k` slots, nearest
/// first. A slot without a memory (fewer than `k` candidates) has no id,
/// distance `+∞` and zero key and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Neighbors {
    /// Number of queries.
    pub n: usize,
    /// Slots per query.
    pub k: usize,
    /// Key dimension.
    pub key_dim: usize,
    /// Value dimension.
    pub value_dim: usize,
    /// Ids, `n × k`.
    pub ids: Vec<Option<MemoryId>>,
    /// Distances, `n × k`.
    pub distances: Vec<f32>,
    /// Keys, `n × k × key_dim`.
    pub keys: Vec<f32>,
    /// Values, `n × k × value_dim`.
    pub values: Vec<f32>,
}

impl Neighbors {
    /// An all-empty result of the given shape.
    pub fn empty(n: usize, k: usize, key_dim: usize, value_dim: usize) -> Self {
        Neighbors {
            n,
            k,
            key_dim,
            value_dim,
            ids: vec![None; n * k],
            distances: vec![f32::INFINITY; n * k],
            keys: vec![0.0; n * k * key_dim],
            values: vec![0.0; n * k * value_dim],
        }
    }

    /// Id in slot `j` of query `i`.
    pub fn id(&self, i: usize, j: usize) -> Option<MemoryId> {
        self.ids[i * self.k + j]
    }

    /// Distance in slot `j` of query `i`.
    pub fn distance(&self, i: usize, j: usize) -> f32 {
        self.distances[i * self.k + j]
    }

    /// Key in slot `j` of query `i`.
    pub fn key(&self, i: usize, j: usize) -> &[f32] {
        let o = (i * self.k + j) * self.key_dim;
        &self.keys[o..o + self.key_dim]
    }

    /// Value in slot `j` of query `i`.
    pub fn value(&self, i: usize, j: usize) -> &[f32] {
        let o = (i * self.k + j) * self.value_dim;
        &self.values[o..o + self.value_dim]
    }

    /// The ids of query `i`.
    pub fn row_ids(&self, i: usize) -> &[Option<MemoryId>] {
        &self.ids[i * self.k..(i + 1) * self.k]
    }

    /// Writes one slot.
    pub fn set(&mut self, i: usize, j: usize, id: MemoryId, distance: f32, key: &[f32], value: &[f32]) {
        let s = i * self.k + j;
        self.ids[s] = Some(id);
        self.distances[s] = distance;
        self.keys[s * self.key_dim..(s + 1) * self.key_dim].copy_from_slice(key);
        self.values[s * self.value_dim..(s + 1) * self.value_dim].copy_from_slice(value);
    }
}

/// Lifetime counters persisted with the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Memories created by `insert` or by `learn` inserting a novel observation.
    pub inserted: u64,
    /// Memories created by `learn` merging an observation with neighbours.
    pub merged: u64,
    /// Memories removed by eviction.
    pub evicted: u64,
    /// Memories removed by `delete` (or by a change batch's deletes).
    pub deleted: u64,
    /// Sequence number of the last [`ChangeBatch`] applied (0: none). A
    /// journal replays exactly the batches above it.
    pub last_batch: u64,
}

/// A summary of the store's contents.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Number of memories.
    pub len: u64,
    /// The id the next new memory gets.
    pub next_id: MemoryId,
    /// Sum of `access_count` over all memories.
    pub access_count_total: u64,
    /// Per tag, the sum of its counts over all memories.
    pub tag_counts: BTreeMap<String, u64>,
    /// Lifetime counters.
    pub counters: Counters,
}

/// A writer's changes since its last sync, applied by
/// [`crate::MemoryStore::apply`] in one transaction, in this order: deletes,
/// value deltas, value assignments, tag counts of existing memories, inserts
/// at `tick`, accesses at `tick` (of existing or just inserted memories),
/// then capacity eviction as `insert` does.
///
/// It is how a model's device tier writes behind to the durable store: the
/// tier assigns the ids of its inserts itself (`first_id`, `first_id + 1`, ...,
/// which must be the store's next ids, so no round trip is needed), and the
/// sequence number, persisted in the same transaction, makes a journal replay
/// idempotent: batch `seq` applies only on top of batch `seq − 1`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChangeBatch {
    /// Sequence number: the store's `last_batch + 1`.
    pub seq: u64,
    /// Access tick of the touches and inserts.
    pub tick: Tick,
    /// Memories to delete.
    pub delete: Vec<MemoryId>,
    /// Memories whose values change, one row of `deltas` each.
    pub update_ids: Vec<MemoryId>,
    /// Value deltas, `update_ids.len() × value_dim`, added to the stored values.
    pub deltas: Vec<f32>,
    /// Memories accessed at `tick`, after the inserts (a repeated id is
    /// accessed repeatedly; ids of this batch's inserts may appear).
    pub touch: Vec<MemoryId>,
    /// The id the first inserted row gets (the store's next id).
    pub first_id: MemoryId,
    /// Keys to insert, `n × key_dim`.
    pub insert_keys: Vec<f32>,
    /// Values to insert, `n × value_dim`.
    pub insert_values: Vec<f32>,
    /// Bookkeeping of the inserted rows (empty: each is new, created and
    /// first accessed at `tick`; otherwise one per row, e.g. a recombined
    /// memory keeping the history of the memories it replaces).
    pub insert_meta: Vec<InsertMeta>,
    /// Tags of the inserted rows (empty: none; otherwise one tag list per
    /// row, each tag counted once, as [`MemoryStore::insert`] tags a batch).
    ///
    /// [`MemoryStore::insert`]: crate::MemoryStore::insert
    pub insert_tags: Vec<Vec<String>>,
    /// Memories whose values are replaced (after the deltas), one row of
    /// `assign_values` each: an exact write, e.g. to restore values saved
    /// earlier bit for bit (adding a delta back rounds).
    pub assign_ids: Vec<MemoryId>,
    /// New values, `assign_ids.len() × value_dim`.
    pub assign_values: Vec<f32>,
    /// Tag counts of existing memories: `(id, tag, count)` sets the tag's
    /// count on that memory (0 removes the tag), e.g. to mark which source
    /// changed a memory.
    pub tag_counts: Vec<(MemoryId, String, u64)>,
}

/// Access bookkeeping of a row a [`ChangeBatch`] inserts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InsertMeta {
    /// Creation tick.
    pub created: Tick,
    /// Last access tick (at least `created`).
    pub last_access: Tick,
    /// Number of accesses (at least 1).
    pub access_count: u64,
    /// LRFU CRF at `last_access` (finite, positive).
    pub crf: f64,
}

impl ChangeBatch {
    /// The deltas as a matrix.
    pub fn deltas(&self, config: &MemoryConfig) -> Result<Vectors<'_>> {
        Vectors::new(&self.deltas, config.value_dim)
    }

    /// The inserts as a batch, with their tags.
    pub fn inserts(&self, config: &MemoryConfig) -> Result<Batch<'_>> {
        let batch = Batch::new(
            Vectors::new(&self.insert_keys, config.key_dim)?,
            Vectors::new(&self.insert_values, config.value_dim)?,
        );
        Ok(if self.insert_tags.is_empty() {
            batch
        } else {
            batch.with_tags(Tags::PerRow(&self.insert_tags))
        })
    }

    /// Validates shapes, numbers, the sequence number and the first id against
    /// a store whose last batch and next id are given (ids are the backend's
    /// to check).
    pub fn check(&self, config: &MemoryConfig, last_batch: u64, next_id: MemoryId) -> Result<()> {
        if self.seq != last_batch + 1 {
            return Err(Error::OutOfOrder {
                expected: last_batch + 1,
                got: self.seq,
            });
        }
        let deltas = self.deltas(config)?;
        deltas.check("deltas", config.value_dim)?;
        if deltas.len() != self.update_ids.len() {
            return Err(Error::Shape(format!(
                "{} ids but {} deltas",
                self.update_ids.len(),
                deltas.len()
            )));
        }
        let assigned = Vectors::new(&self.assign_values, config.value_dim)?;
        assigned.check("assigned values", config.value_dim)?;
        if assigned.len() != self.assign_ids.len() {
            return Err(Error::Shape(format!(
                "{} assigned ids but {} values",
                self.assign_ids.len(),
                assigned.len()
            )));
        }
        if self.tag_counts.iter().any(|(_, t, _)| t.is_empty()) {
            return Err(Error::Shape("an empty tag name in tag counts".into()));
        }
        let inserts = self.inserts(config)?;
        inserts.check(config)?;
        if !self.insert_meta.is_empty() && self.insert_meta.len() != inserts.len() {
            return Err(Error::Shape(format!(
                "{} insert bookkeeping entries for {} inserted rows",
                self.insert_meta.len(),
                inserts.len()
            )));
        }
        if let Some(m) = self
            .insert_meta
            .iter()
            .find(|m| !(m.crf.is_finite() && m.crf > 0.0) || m.access_count == 0 || m.created > m.last_access)
        {
            return Err(Error::Shape(format!("impossible insert bookkeeping {m:?}")));
        }
        if !inserts.is_empty() && self.first_id != next_id {
            return Err(Error::IdConflict {
                expected: next_id,
                got: self.first_id,
            });
        }
        Ok(())
    }
}
