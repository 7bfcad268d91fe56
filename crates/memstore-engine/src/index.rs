//! `MemoryIndex`: the in-process state that SQL backends keep beside their
//! tables, and the planner that turns each operation into a [`Changes`] set.
//!
//! The database is the truth; this index is derived from it on open. It holds
//! every key in one contiguous row-major matrix (exact, batched, multi-threaded
//! brute-force search with a bounded heap per query), the access bookkeeping
//! and tags of every memory, and an ordered set of LRFU priorities so that
//! eviction is a scan of the lowest entries. Values stay in the database, and
//! with [`MemoryIndex::with_values`] also in a second row-aligned matrix, so
//! that searches and `learn` return neighbours' values without a read (a
//! write-through copy, as the keys are: changed only by committed
//! [`Changes`]).
//!
//! A backend runs every write the same way: plan against the index (pure,
//! nothing changes), persist the resulting [`Changes`] in one transaction,
//! and apply them to the index only after the commit, while holding the
//! index's write lock, so that no search sees a half-applied batch.
//!
//! `learn` is planned with row-by-row semantics (row `i` sees rows `< i`) at
//! batched cost: one batched search of the state before the batch with some
//! slack, an overlay of what earlier rows removed, created and touched, and a
//! single-row re-search only for rows whose slack was used up.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, OnceLock};

use rayon::prelude::*;

use crate::ann::{AnnBuilder, AnnFilter, AnnIndex, AnnOpened, AnnStatus};
use memstore_api::math::{self, MergeSource};
use memstore_api::{
    Batch, ChangeBatch, Counters, Error, Memory, MemoryConfig, MemoryId, Metric, Neighbors, Result, Stats, TagFilter,
    Tick, Vectors,
};

/// Access bookkeeping and tags of one memory (everything but key and value).
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    /// Creation tick.
    pub created: Tick,
    /// Last access tick.
    pub last_access: Tick,
    /// Number of accesses.
    pub access_count: u64,
    /// LRFU CRF at `last_access`.
    pub crf: f64,
    /// Tags with counts.
    pub tags: BTreeMap<String, u64>,
}

/// New access bookkeeping of an existing memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccessUpdate {
    /// The memory.
    pub id: MemoryId,
    /// New last access.
    pub last_access: Tick,
    /// New access count.
    pub access_count: u64,
    /// New CRF.
    pub crf: f64,
    /// New eviction priority ([`math::priority`]).
    pub priority: f64,
}

/// Everything one operation changes: what a backend persists in one
/// transaction and then applies to its index.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes {
    /// Existing memories removed (deleted, merged away or evicted), ascending.
    pub removed: Vec<MemoryId>,
    /// Existing memories whose access bookkeeping changed.
    pub accessed: Vec<AccessUpdate>,
    /// Existing memories whose value changed (the full new value).
    pub values: Vec<(MemoryId, Vec<f32>)>,
    /// New memories, complete, ascending by id.
    pub inserted: Vec<Memory>,
    /// Existing memories whose tags changed: the complete new tag counts.
    pub retagged: Vec<(MemoryId, BTreeMap<String, u64>)>,
    /// The id the next new memory will get.
    pub next_id: MemoryId,
    /// Lifetime counters after the operation.
    pub counters: Counters,
}

impl Changes {
    /// The complete tag counts a backend writes: those of the new memories
    /// and of the existing memories whose tags changed (whose tag rows it
    /// first deletes).
    pub fn tag_rows(&self) -> impl Iterator<Item = (MemoryId, &BTreeMap<String, u64>)> {
        self.inserted
            .iter()
            .map(|m| (m.id, &m.tags))
            .chain(self.retagged.iter().map(|(id, t)| (*id, t)))
    }

    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty()
            && self.accessed.is_empty()
            && self.values.is_empty()
            && self.inserted.is_empty()
            && self.retagged.is_empty()
    }
}

/// [`Changes`] composed operation after operation, held by memory id until
/// [`Composed::finish`], so that composing a long run of operations costs
/// each one its own size, not the run's so far.
#[derive(Debug)]
pub struct Composed {
    removed: Vec<MemoryId>,
    inserted: IdMap<Memory>,
    accessed: IdMap<AccessUpdate>,
    values: IdMap<Vec<f32>>,
    retagged: IdMap<BTreeMap<String, u64>>,
    next_id: MemoryId,
    counters: Counters,
}

impl Composed {
    /// The changes of a first operation.
    pub fn new(first: Changes) -> Self {
        Composed {
            removed: first.removed,
            inserted: first.inserted.into_iter().map(|m| (m.id, m)).collect(),
            accessed: first.accessed.into_iter().map(|u| (u.id, u)).collect(),
            values: first.values.into_iter().collect(),
            retagged: first.retagged.into_iter().collect(),
            next_id: first.next_id,
            counters: first.counters,
        }
    }

    /// Adds `later`, planned on the state the changes so far leave: the
    /// result takes the index (and the database) from the state before the
    /// first to the state after `later`, each memory written once with its
    /// last state. A memory created earlier and changed by `later` is
    /// written as created in its final state; one created and removed again
    /// is not written at all.
    pub fn then(&mut self, later: Changes) {
        for id in later.removed {
            if self.inserted.remove(&id).is_some() {
                continue;
            }
            self.accessed.remove(&id);
            self.values.remove(&id);
            self.retagged.remove(&id);
            self.removed.push(id);
        }
        for u in later.accessed {
            self.set_access(u);
        }
        for (id, v) in later.values {
            match self.inserted.get_mut(&id) {
                Some(m) => m.value = v,
                None => {
                    self.values.insert(id, v);
                }
            }
        }
        for (id, tags) in later.retagged {
            match self.inserted.get_mut(&id) {
                Some(m) => m.tags = tags,
                None => {
                    self.retagged.insert(id, tags);
                }
            }
        }
        self.inserted.extend(later.inserted.into_iter().map(|m| (m.id, m)));
        self.next_id = later.next_id;
        self.counters = later.counters;
    }

    /// Takes memory `id`'s new value, as [`Composed::then`] takes a later
    /// operation's (a memory created earlier gets it as created).
    fn set_value(&mut self, id: MemoryId, value: &[f32]) {
        if let Some(m) = self.inserted.get_mut(&id) {
            m.value.clear();
            m.value.extend_from_slice(value);
            return;
        }
        match self.values.get_mut(&id) {
            Some(v) => {
                v.clear();
                v.extend_from_slice(value);
            }
            None => {
                self.values.insert(id, value.to_vec());
            }
        }
    }

    /// Takes a memory's new access bookkeeping, as [`Composed::then`] takes a
    /// later operation's.
    fn set_access(&mut self, u: AccessUpdate) {
        match self.inserted.get_mut(&u.id) {
            Some(m) => {
                m.last_access = u.last_access;
                m.access_count = u.access_count;
                m.crf = u.crf;
            }
            None => {
                self.accessed.insert(u.id, u);
            }
        }
    }

    /// The composed changes, each list ascending by id.
    pub fn finish(self) -> Changes {
        fn sorted<T>(map: IdMap<T>) -> Vec<(MemoryId, T)> {
            let mut v: Vec<(MemoryId, T)> = map.into_iter().collect();
            v.sort_unstable_by_key(|(id, _)| *id);
            v
        }
        let mut removed = self.removed;
        removed.sort_unstable();
        Changes {
            removed,
            accessed: sorted(self.accessed).into_iter().map(|(_, u)| u).collect(),
            values: sorted(self.values),
            inserted: sorted(self.inserted).into_iter().map(|(_, m)| m).collect(),
            retagged: sorted(self.retagged),
            next_id: self.next_id,
            counters: self.counters,
        }
    }
}

/// An eviction candidate, ordered as LRFU evicts: lowest priority first,
/// ties by id.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Victim(f64, MemoryId);
impl Eq for Victim {}
impl PartialOrd for Victim {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Victim {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// Queries below which the scalar scan beats setting up SGEMM blocks.
const GEMM_MIN_QUERIES: usize = 8;
/// Extra candidates per query before the exact re-rank.
const GEMM_SLACK: usize = 8;

/// Extra candidates per query asked of an approximate index before the
/// exact re-rank.
const ANN_SLACK: usize = 8;

/// An approximate search structure attached to a [`MemoryIndex`].
struct Ann {
    builder: Arc<dyn AnnBuilder>,
    /// `None` once disabled (see [`AnnStatus::disabled`]).
    index: Option<Box<dyn AnnIndex>>,
    opened: AnnOpened,
    fallbacks: AtomicU64,
    rebuilds: u64,
    disabled: Option<String>,
}

/// A map from memory ids, hashed by FxHash: ids are a store's own counter,
/// so a multiplicative hash spreads them, and SipHash (std's default) made id
/// lookups a visible part of `learn`.
type IdMap<V> = HashMap<MemoryId, V, rustc_hash::FxBuildHasher>;
/// A set of memory ids, hashed like [`IdMap`].
type IdSet = HashSet<MemoryId, rustc_hash::FxBuildHasher>;

/// Keys, bookkeeping and priorities of every memory of one store.
pub struct MemoryIndex {
    config: MemoryConfig,
    ids: Vec<MemoryId>,
    keys: Vec<f32>,
    /// Values, row-aligned with `keys`, when the index keeps them
    /// ([`MemoryIndex::with_values`]).
    values: Option<Vec<f32>>,
    meta: Vec<Meta>,
    /// Row-aligned with `meta`: each memory's eviction priority
    /// ([`math::priority`] of its CRF and last access), scanned by eviction.
    prio: Vec<f64>,
    pos: IdMap<usize>,
    next_id: MemoryId,
    counters: Counters,
    ann: Option<Ann>,
    /// Bumped on every change of `keys`, for `key_cache`.
    key_version: u64,
    /// The keys' 8-bit quantisation for the batched search ([`crate::gemm::KeyCache`]).
    key_cache: crate::gemm::KeyCache,
}

impl MemoryIndex {
    /// A copy to plan several operations on, one after another, before any
    /// of them is committed (`None` with an approximate structure attached,
    /// which cannot be copied). The copy's key quantisation starts empty;
    /// [`MemoryIndex::replace_with`] hands the original's over.
    pub fn try_clone(&self) -> Option<MemoryIndex> {
        if self.ann.is_some() {
            return None;
        }
        Some(MemoryIndex {
            config: self.config.clone(),
            ids: self.ids.clone(),
            keys: self.keys.clone(),
            values: self.values.clone(),
            meta: self.meta.clone(),
            prio: self.prio.clone(),
            pos: self.pos.clone(),
            next_id: self.next_id,
            counters: self.counters,
            ann: None,
            key_version: self.key_version,
            key_cache: crate::gemm::KeyCache::default(),
        })
    }

    /// Whether the index keeps every value ([`MemoryIndex::with_values`]).
    pub fn keeps_values(&self) -> bool {
        self.values.is_some()
    }

    /// Replaces this index with `planned`, a [`MemoryIndex::try_clone`] of
    /// it that committed changes were applied to. The keys' quantisation
    /// moves over with its version, so it is reused when the keys did not
    /// change.
    pub fn replace_with(&mut self, mut planned: MemoryIndex) {
        planned.key_cache = std::mem::take(&mut self.key_cache);
        *self = planned;
    }

    /// An empty index for this configuration.
    pub fn new(config: MemoryConfig) -> Self {
        MemoryIndex {
            config,
            ids: Vec::new(),
            keys: Vec::new(),
            values: None,
            meta: Vec::new(),
            prio: Vec::new(),
            pos: IdMap::default(),
            next_id: 1,
            counters: Counters::default(),
            ann: None,
            key_version: 0,
            key_cache: crate::gemm::KeyCache::default(),
        }
    }

    /// The same index keeping every value in memory beside its key, so that
    /// searches and `learn` need no value reads from the database (memory:
    /// `value_dim` floats per memory more). Set before loading.
    pub fn with_values(mut self) -> Self {
        self.values = Some(Vec::new());
        self
    }

    /// Whether the index keeps values ([`MemoryIndex::with_values`]).
    pub fn holds_values(&self) -> bool {
        self.values.is_some()
    }

    /// The kept value of `id` (`None` when absent or values are not kept).
    pub fn value(&self, id: MemoryId) -> Option<&[f32]> {
        let (d, values) = (self.config.value_dim, self.values.as_ref()?);
        self.pos.get(&id).map(|&r| &values[r * d..(r + 1) * d])
    }

    /// Of `ids`, those whose values must be read from the database: all
    /// of them unless the index keeps values (then only ids it does not
    /// hold, which the read reports as missing).
    pub fn missing_values(&self, ids: impl IntoIterator<Item = MemoryId>) -> Vec<MemoryId> {
        if self.values.is_some() {
            ids.into_iter().filter(|id| !self.pos.contains_key(id)).collect()
        } else {
            ids.into_iter().collect()
        }
    }

    /// A stored value: kept by the index, or read into `read`.
    fn stored_value<'a>(&'a self, id: MemoryId, read: &'a HashMap<MemoryId, Vec<f32>>) -> Option<&'a [f32]> {
        self.value(id).or_else(|| read.get(&id).map(Vec::as_slice))
    }

    /// Attaches an approximate search structure built by `builder` for the
    /// rows loaded so far (from the file `saved` when it matches them; see
    /// [`crate::ann`]). From now on searches ask it for candidates and
    /// [`MemoryIndex::apply`] keeps it in step.
    pub fn attach_ann(&mut self, builder: Arc<dyn AnnBuilder>, saved: Option<&Path>) -> Result<AnnOpened> {
        let (index, opened) = builder.open(self.config.metric, self.config.key_dim, saved, &self.ids, &self.keys)?;
        self.ann = Some(Ann {
            builder,
            index: Some(index),
            opened: opened.clone(),
            fallbacks: AtomicU64::new(0),
            rebuilds: 0,
            disabled: None,
        });
        Ok(opened)
    }

    /// Saves the attached approximate structure to `path` with the
    /// fingerprint of the current rows (nothing when none is attached).
    pub fn save_ann(&self, path: &Path) -> Result<()> {
        match self.ann.as_ref().and_then(|a| a.index.as_ref()) {
            Some(index) => index.save(path, &self.ids, &self.keys),
            None => Ok(()),
        }
    }

    /// What the approximate search is doing (`None` in exact mode).
    pub fn ann_status(&self) -> Option<AnnStatus> {
        self.ann.as_ref().map(|a| AnnStatus {
            kind: a.builder.describe(),
            opened: a.opened.clone(),
            exact_fallbacks: a.fallbacks.load(AtomicOrdering::Relaxed),
            rebuilds: a.rebuilds,
            disabled: a.disabled.clone(),
        })
    }

    /// Brings the approximate structure in step with committed changes. If
    /// that fails, or deletions fragmented it, rebuilds it from the rows; if
    /// the rebuild fails, drops it (searches stay correct: exact from then on).
    fn apply_ann(&mut self, changes: &Changes) {
        let Some(ann) = self.ann.as_mut() else { return };
        let Some(index) = ann.index.as_mut() else { return };
        let d = self.config.key_dim;
        let inserted: Vec<MemoryId> = changes.inserted.iter().map(|m| m.id).collect();
        let mut keys = Vec::with_capacity(inserted.len() * d);
        for m in &changes.inserted {
            keys.extend_from_slice(&m.key);
        }
        let failed = match index
            .remove(&changes.removed)
            .and_then(|()| index.add(&inserted, &keys))
        {
            Ok(()) if !index.needs_rebuild() => return,
            Ok(()) => None,
            Err(e) => Some(e),
        };
        ann.rebuilds += 1;
        match ann.builder.open(self.config.metric, d, None, &self.ids, &self.keys) {
            Ok((rebuilt, _)) => ann.index = Some(rebuilt),
            Err(e2) => {
                ann.index = None;
                ann.disabled = Some(match failed {
                    Some(e) => format!("update failed ({e}); rebuild failed ({e2})"),
                    None => format!("rebuild failed ({e2})"),
                });
            }
        }
    }

    /// The configuration.
    pub fn config(&self) -> &MemoryConfig {
        &self.config
    }

    /// Counts, totals and lifetime counters of the indexed memories (what a
    /// backend's `stats` reports).
    pub fn stats(&self) -> Stats {
        let mut tag_counts = BTreeMap::new();
        let mut access_count_total = 0u64;
        for m in &self.meta {
            access_count_total += m.access_count;
            for (t, c) in &m.tags {
                *tag_counts.entry(t.clone()).or_insert(0) += c;
            }
        }
        Stats {
            len: self.len() as u64,
            next_id: self.next_id,
            access_count_total,
            tag_counts,
            counters: self.counters,
        }
    }

    /// The memories `ids`, in the order asked, completed with their values
    /// read from the database (a backend's `get`).
    pub fn memories(&self, ids: &[MemoryId], values: &HashMap<MemoryId, Vec<f32>>) -> Result<Vec<Memory>> {
        ids.iter()
            .map(|id| {
                let (Some(key), Some(m), Some(value)) = (self.key(*id), self.meta(*id), self.stored_value(*id, values))
                else {
                    return Err(Error::UnknownId(*id));
                };
                Ok(Memory {
                    id: *id,
                    key: key.to_vec(),
                    value: value.to_vec(),
                    created: m.created,
                    last_access: m.last_access,
                    access_count: m.access_count,
                    crf: m.crf,
                    tags: m.tags.clone(),
                })
            })
            .collect()
    }

    fn lambda(&self) -> f64 {
        self.config.eviction.lambda()
    }

    /// Number of memories.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The next id to be assigned.
    pub fn next_id(&self) -> MemoryId {
        self.next_id
    }

    /// Lifetime counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Sets the id counter and lifetime counters (when loading).
    pub fn set_state(&mut self, next_id: MemoryId, counters: Counters) {
        self.next_id = next_id;
        self.counters = counters;
    }

    /// Whether `id` is present.
    pub fn contains(&self, id: MemoryId) -> bool {
        self.pos.contains_key(&id)
    }

    /// The key of `id`.
    pub fn key(&self, id: MemoryId) -> Option<&[f32]> {
        let d = self.config.key_dim;
        self.pos.get(&id).map(|&r| &self.keys[r * d..(r + 1) * d])
    }

    /// The bookkeeping of `id`.
    pub fn meta(&self, id: MemoryId) -> Option<&Meta> {
        self.pos.get(&id).map(|&r| &self.meta[r])
    }

    /// All ids, in storage order.
    pub fn ids(&self) -> &[MemoryId] {
        &self.ids
    }

    /// Adds one memory (when loading, or applying changes). Checks its key's
    /// shape, and its value's where the index keeps values (then required).
    pub fn load(&mut self, id: MemoryId, key: &[f32], value: Option<&[f32]>, meta: Meta) -> Result<()> {
        if key.len() != self.config.key_dim {
            return Err(Error::Corrupt(format!(
                "memory {id} has a key of {} floats, expected {}",
                key.len(),
                self.config.key_dim
            )));
        }
        if self.pos.contains_key(&id) {
            return Err(Error::Corrupt(format!("memory {id} appears twice")));
        }
        if let Some(values) = &mut self.values {
            match value {
                Some(v) if v.len() == self.config.value_dim => values.extend_from_slice(v),
                _ => {
                    return Err(Error::Corrupt(format!(
                        "memory {id} has a value of {} floats, expected {}",
                        value.map_or(0, <[f32]>::len),
                        self.config.value_dim
                    )));
                }
            }
        }
        self.pos.insert(id, self.ids.len());
        self.ids.push(id);
        self.keys.extend_from_slice(key);
        self.key_version += 1;
        self.prio
            .push(math::priority(self.lambda(), meta.crf, meta.last_access));
        self.meta.push(meta);
        self.next_id = self.next_id.max(id + 1);
        Ok(())
    }

    fn remove(&mut self, id: MemoryId) {
        let Some(r) = self.pos.remove(&id) else { return };
        self.key_version += 1;
        let d = self.config.key_dim;
        let last = self.ids.len() - 1;
        if r != last {
            self.ids.swap(r, last);
            self.meta.swap(r, last);
            self.prio.swap(r, last);
            let (head, tail) = self.keys.split_at_mut(last * d);
            head[r * d..(r + 1) * d].copy_from_slice(&tail[..d]);
            if let Some(values) = &mut self.values {
                let dv = self.config.value_dim;
                values.copy_within(last * dv..(last + 1) * dv, r * dv);
            }
            self.pos.insert(self.ids[r], r);
        }
        self.ids.pop();
        self.meta.pop();
        self.prio.pop();
        self.keys.truncate(last * d);
        if let Some(values) = &mut self.values {
            values.truncate(last * self.config.value_dim);
        }
    }

    /// Applies committed changes.
    pub fn apply(&mut self, changes: &Changes) -> Result<()> {
        let lambda = self.lambda();
        for &id in &changes.removed {
            self.remove(id);
        }
        for u in &changes.accessed {
            if let Some(&r) = self.pos.get(&u.id) {
                let m = &mut self.meta[r];
                m.last_access = u.last_access;
                m.access_count = u.access_count;
                m.crf = u.crf;
                self.prio[r] = math::priority(lambda, u.crf, u.last_access);
            }
        }
        for (id, tags) in &changes.retagged {
            if let Some(&r) = self.pos.get(id) {
                self.meta[r].tags = tags.clone();
            }
        }
        for m in &changes.inserted {
            self.load(
                m.id,
                &m.key,
                Some(&m.value),
                Meta {
                    created: m.created,
                    last_access: m.last_access,
                    access_count: m.access_count,
                    crf: m.crf,
                    tags: m.tags.clone(),
                },
            )?;
        }
        if let Some(values) = &mut self.values {
            let dv = self.config.value_dim;
            for (id, v) in &changes.values {
                if let Some(&r) = self.pos.get(id) {
                    if v.len() != dv {
                        return Err(Error::Corrupt(format!(
                            "memory {id} was given a value of {} floats, expected {dv}",
                            v.len()
                        )));
                    }
                    values[r * dv..(r + 1) * dv].copy_from_slice(v);
                }
            }
        }
        self.next_id = changes.next_id;
        self.counters = changes.counters;
        self.apply_ann(changes);
        Ok(())
    }

    /// Checks that every id is present.
    pub fn check_ids(&self, ids: &[MemoryId]) -> Result<()> {
        match ids.iter().find(|id| !self.pos.contains_key(id)) {
            Some(&id) => Err(Error::UnknownId(id)),
            None => Ok(()),
        }
    }

    /// Which rows pass the filter.
    fn mask(&self, filter: Option<&TagFilter>) -> Option<Vec<bool>> {
        filter.map(|f| self.meta.iter().map(|m| f.matches(&m.tags)).collect())
    }

    fn topk(&self, q: &[f32], k: usize, mask: Option<&[bool]>, parallel_rows: bool) -> Vec<(f32, MemoryId)> {
        // The index's own rows, ids and mask always agree in shape and `k`
        // is checked by every caller, so the scan cannot fail.
        let found = crate::gemm::scan(self.config.metric, q, &self.keys, &self.ids, k, mask, parallel_rows);
        debug_assert!(found.is_ok(), "scan of the index's own rows failed: {found:?}");
        found.unwrap_or_default()
    }

    /// The `k` nearest memories of each query (distance, id), nearest
    /// first, ties by id; only rows passing `filter`. Exact (on all cores)
    /// unless an approximate structure is attached ([`crate::ann`]).
    pub fn search(&self, queries: Vectors<'_>, k: usize, filter: Option<&TagFilter>) -> Vec<Vec<(f32, MemoryId)>> {
        if let Some(ann) = &self.ann
            && let Some(index) = &ann.index
            && !self.ids.is_empty()
        {
            return self.search_ann(index.as_ref(), &ann.fallbacks, queries, k, filter);
        }
        self.search_exact(queries, k, filter)
    }

    /// The exact search (see [`MemoryIndex::search`]).
    fn search_exact(&self, queries: Vectors<'_>, k: usize, filter: Option<&TagFilter>) -> Vec<Vec<(f32, MemoryId)>> {
        let mask = self.mask(filter);
        let mask = mask.as_deref();
        let n = queries.len();
        let work = n * self.ids.len() * self.config.key_dim;
        if work >= 1 << 22 && n >= GEMM_MIN_QUERIES {
            return self.search_gemm(queries, k, mask);
        }
        if work < 1 << 18 {
            (0..n).map(|i| self.topk(queries.row(i), k, mask, false)).collect()
        } else if n >= 2 * rayon::current_num_threads() {
            (0..n)
                .into_par_iter()
                .map(|i| self.topk(queries.row(i), k, mask, false))
                .collect()
        } else {
            (0..n).map(|i| self.topk(queries.row(i), k, mask, true)).collect()
        }
    }

    /// Batched search ([`crate::gemm::topk_ranked`]). On a CPU with VNNI the
    /// exact 8-bit prefilter answers directly (the brute-force answer, ties
    /// by id; the keys' quantisation is kept in `key_cache` until the keys
    /// change). Otherwise blocked SGEMM gives `k + slack` candidates per
    /// query ranked by the matrix product, re-ranked by exact distance (ties
    /// by id); a query whose k-th exact distance comes within rounding of
    /// the last candidate's (ties or near-ties at the cut, e.g. duplicate
    /// keys) is answered by the exact scan instead. Either way results are
    /// those of the scalar scan.
    fn search_gemm(&self, queries: Vectors<'_>, k: usize, mask: Option<&[bool]>) -> Vec<Vec<(f32, MemoryId)>> {
        let n = self.ids.len();
        let k = k.min(n);
        let set = crate::gemm::KeySet {
            keys: &self.keys,
            dim: self.config.key_dim,
            ids: Some(&self.ids),
            cache: Some((&self.key_cache, self.key_version)),
        };
        let slack = GEMM_SLACK.min(n - k);
        let Ok(found) = crate::gemm::topk_ranked(self.config.metric, queries.data(), &set, k, slack, mask) else {
            return (0..queries.len())
                .into_par_iter()
                .map(|i| self.topk(queries.row(i), k, mask, false))
                .collect();
        };
        let want = found.width;
        let (dist, idx) = (&found.dist, &found.idx);
        // Only the SGEMM answer is re-ranked, which needs the count of rows the mask admits.
        let qualifying = if found.exact {
            0
        } else {
            mask.map_or(n, |m| m.iter().filter(|x| **x).count())
        };
        (0..queries.len())
            .into_par_iter()
            .map(|i| {
                let mut cands: Vec<(f32, MemoryId)> = (0..want)
                    .filter(|&j| idx[i * want + j] != u32::MAX)
                    .map(|j| (dist[i * want + j], self.ids[idx[i * want + j] as usize]))
                    .collect();
                if found.exact {
                    // The brute-force answer, ties by id: nothing to re-rank.
                    return cands;
                }
                cands.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                let truncated = cands.len() < qualifying;
                if truncated && cands.len() > k {
                    let (kth, last) = (cands[k - 1].0, cands[cands.len() - 1].0);
                    if kth >= last - (1e-4 * last.abs() + 1e-6) {
                        return self.topk(queries.row(i), k, mask, false);
                    }
                }
                cands.truncate(k);
                cands
            })
            .collect()
    }

    /// Search through the approximate structure: `k + slack` candidates per
    /// query, re-ranked by exact distance (ties by id); a query answered with
    /// fewer than `min(k, matching rows)` goes to the exact scan.
    fn search_ann(
        &self,
        ann: &dyn AnnIndex,
        fallbacks: &AtomicU64,
        queries: Vectors<'_>,
        k: usize,
        filter: Option<&TagFilter>,
    ) -> Vec<Vec<(f32, MemoryId)>> {
        let passes = |id: MemoryId| match filter {
            None => true,
            Some(f) => self.pos.get(&id).is_some_and(|&r| f.matches(&self.meta[r].tags)),
        };
        let pred: Option<AnnFilter<'_>> = filter.map(|_| &passes as AnnFilter<'_>);
        let want = (k + ANN_SLACK).min(self.ids.len());
        let Ok(found) = ann.search(queries.data(), want, pred) else {
            fallbacks.fetch_add(queries.len() as u64, AtomicOrdering::Relaxed);
            return self.search_exact(queries, k, filter);
        };
        if found.len() != queries.len() {
            fallbacks.fetch_add(queries.len() as u64, AtomicOrdering::Relaxed);
            return self.search_exact(queries, k, filter);
        }
        let qualifying = OnceLock::new();
        let mask = OnceLock::new();
        let metric = self.config.metric;
        found
            .into_par_iter()
            .enumerate()
            .map(|(i, cands)| {
                let q = queries.row(i);
                let mut row: Vec<(f32, MemoryId)> = cands
                    .into_iter()
                    .filter(|&(_, id)| passes(id))
                    .filter_map(|(_, id)| self.key(id).map(|key| (math::distance(metric, q, key), id)))
                    .collect();
                row.sort_by(|a, b| math::neighbour_order(*a, *b));
                row.dedup_by_key(|x| x.1);
                // Ties running past the candidates: the lowest ids among the
                // tied may be missing, so the exact scan decides.
                let tied_at_cut = row.len() > k && row[k - 1].0 >= row[row.len() - 1].0;
                row.truncate(k);
                let short = tied_at_cut
                    || row.len() < k
                        && row.len()
                            < *qualifying.get_or_init(|| match filter {
                                None => self.ids.len(),
                                Some(f) => self.meta.iter().filter(|m| f.matches(&m.tags)).count(),
                            });
                if short {
                    fallbacks.fetch_add(1, AtomicOrdering::Relaxed);
                    let mask = mask.get_or_init(|| self.mask(filter));
                    return self.topk(q, k, mask.as_deref(), false);
                }
                row
            })
            .collect()
    }

    /// Builds fixed-shape [`Neighbors`] from search rows, keys from the index
    /// and values from `values` (which must hold every id found).
    pub fn assemble(
        &self,
        rows: &[Vec<(f32, MemoryId)>],
        k: usize,
        values: &HashMap<MemoryId, Vec<f32>>,
    ) -> Result<Neighbors> {
        let out = Neighbors::empty(rows.len(), k, self.config.key_dim, self.config.value_dim);
        fill_neighbors(out, rows, |id| {
            let key = self.key(id).ok_or(Error::UnknownId(id))?;
            let value = self
                .stored_value(id, values)
                .ok_or_else(|| Error::Corrupt(format!("no value stored for memory {id}")))?;
            Ok((key, value))
        })
    }

    /// Plans an insert of a validated batch at `tick`, with capacity eviction.
    pub fn plan_insert(&self, batch: &Batch<'_>, tick: Tick) -> Result<Changes> {
        batch.check(&self.config)?;
        let mut ov = Overlay::new(self);
        for i in 0..batch.len() {
            ov.insert_row(batch, i, tick);
        }
        if let Some(cap) = self.config.capacity {
            ov.evict_to(cap);
        }
        ov.finish(batch, &HashMap::new())
    }

    /// Plans a delete (repeated ids count once).
    pub fn plan_delete(&self, ids: &[MemoryId]) -> Result<Changes> {
        self.check_ids(ids)?;
        let unique: BTreeSet<MemoryId> = ids.iter().copied().collect();
        let mut counters = self.counters;
        counters.deleted += unique.len() as u64;
        Ok(Changes {
            removed: unique.into_iter().collect(),
            next_id: self.next_id,
            counters,
            ..Changes::default()
        })
    }

    /// Plans accesses at `tick` (a repeated id is accessed repeatedly).
    pub fn plan_touch(&self, ids: &[MemoryId], tick: Tick) -> Result<Changes> {
        self.check_ids(ids)?;
        let mut ov = Overlay::new(self);
        for &id in ids {
            ov.access(id, tick);
        }
        ov.finish_without_values()
    }

    /// Plans a sparse value update given the current values of the ids.
    pub fn plan_update_values(
        &self,
        ids: &[MemoryId],
        deltas: Vectors<'_>,
        current: &HashMap<MemoryId, Vec<f32>>,
    ) -> Result<Changes> {
        let new_values = math::apply_deltas(ids, deltas, |id| {
            self.stored_value(id, current)
                .ok_or_else(|| Error::Corrupt(format!("no value stored for memory {id}")))
        })?;
        Ok(Changes {
            values: new_values.into_iter().collect(),
            next_id: self.next_id,
            counters: self.counters,
            ..Changes::default()
        })
    }

    /// Validates a sparse value update's inputs (before fetching values).
    pub fn check_update_values(&self, ids: &[MemoryId], deltas: Vectors<'_>) -> Result<()> {
        deltas.check("deltas", self.config.value_dim)?;
        if ids.len() != deltas.len() {
            return Err(Error::Shape(format!("{} ids but {} deltas", ids.len(), deltas.len())));
        }
        self.check_ids(ids)
    }

    /// Validates a change batch and names the stored values its deltas need
    /// (before they are fetched for [`MemoryIndex::plan_apply`]).
    pub fn check_apply(&self, batch: &ChangeBatch) -> Result<Vec<MemoryId>> {
        batch.check(&self.config, self.counters.last_batch, self.next_id)?;
        self.check_ids(&batch.delete)?;
        let gone: HashSet<MemoryId> = batch.delete.iter().copied().collect();
        let new = batch.first_id..batch.first_id + batch.inserts(&self.config)?.len() as u64;
        let live = |id: &MemoryId| (self.contains(*id) && !gone.contains(id)) || new.contains(id);
        if let Some(&id) = batch
            .update_ids
            .iter()
            .find(|id| !self.contains(**id) || gone.contains(id))
        {
            return Err(Error::UnknownId(id));
        }
        if let Some(run) = batch.touch.chunk_by(|a, b| a == b).find(|run| !live(&run[0])) {
            return Err(Error::UnknownId(run[0]));
        }
        let existing = |id: &MemoryId| self.contains(*id) && !gone.contains(id);
        if let Some(&id) = batch
            .assign_ids
            .iter()
            .chain(batch.tag_counts.iter().map(|(id, _, _)| id))
            .find(|id| !existing(id))
        {
            return Err(Error::UnknownId(id));
        }
        Ok(self.missing_values(batch.update_ids.iter().copied()))
    }

    /// Plans a change batch (see [`memstore_api::MemoryStore::apply`]) given the
    /// current values of its updated ids.
    pub fn plan_apply(&self, batch: &ChangeBatch, current: &HashMap<MemoryId, Vec<f32>>) -> Result<Changes> {
        self.check_apply(batch)?;
        self.plan_checked_apply(batch, current)
    }

    /// [`MemoryIndex::plan_apply`] of a batch that [`MemoryIndex::check_apply`]
    /// accepted on this index as it is.
    pub(crate) fn plan_checked_apply(
        &self,
        batch: &ChangeBatch,
        current: &HashMap<MemoryId, Vec<f32>>,
    ) -> Result<Changes> {
        let inserts = batch.inserts(&self.config)?;
        let mut new_values = math::apply_deltas(&batch.update_ids, batch.deltas(&self.config)?, |id| {
            self.stored_value(id, current)
                .ok_or_else(|| Error::Corrupt(format!("no value stored for memory {id}")))
        })?;
        if !batch.assign_ids.is_empty() {
            // An assignment replaces whatever the deltas gave.
            let dv = self.config.value_dim;
            let mut by_id: BTreeMap<MemoryId, Vec<f32>> = new_values.into_iter().collect();
            for (i, &id) in batch.assign_ids.iter().enumerate() {
                by_id.insert(id, batch.assign_values[i * dv..(i + 1) * dv].to_vec());
            }
            new_values = by_id.into_iter().collect();
        }
        let mut retagged: BTreeMap<MemoryId, BTreeMap<String, u64>> = BTreeMap::new();
        for (id, tag, count) in &batch.tag_counts {
            let tags = retagged
                .entry(*id)
                .or_insert_with(|| self.pos.get(id).map(|&r| self.meta[r].tags.clone()).unwrap_or_default());
            if *count == 0 {
                tags.remove(tag);
            } else {
                tags.insert(tag.clone(), *count);
            }
        }
        let mut ov = Overlay::new(self);
        let unique: BTreeSet<MemoryId> = batch.delete.iter().copied().collect();
        for &id in &unique {
            ov.remove(id);
        }
        ov.counters.deleted += unique.len() as u64;
        for i in 0..inserts.len() {
            ov.insert_row(&inserts, i, batch.tick);
            if let (Some(meta), Some(c)) = (batch.insert_meta.get(i), ov.created.last_mut()) {
                c.meta.created = meta.created;
                c.meta.last_access = meta.last_access;
                c.meta.access_count = meta.access_count;
                c.meta.crf = meta.crf;
            }
        }
        // A tier lists a memory's accesses in a run (one id repeated): one
        // lookup a run.
        for run in batch.touch.chunk_by(|a, b| a == b) {
            ov.access_n(run[0], run.len(), batch.tick);
        }
        if let Some(cap) = self.config.capacity {
            ov.evict_to(cap);
        }
        ov.counters.last_batch = batch.seq;
        let mut changes = ov.finish(&inserts, &HashMap::new())?;
        let removed: HashSet<MemoryId> = changes.removed.iter().copied().collect();
        changes.values = new_values.into_iter().filter(|(id, _)| !removed.contains(id)).collect();
        changes.retagged = retagged.into_iter().filter(|(id, _)| !removed.contains(id)).collect();
        Ok(changes)
    }

    /// [`MemoryIndex::plan_checked_apply`], [`MemoryIndex::apply`] and
    /// [`Composed::then`] at once, in place, for a batch that
    /// [`MemoryIndex::check_apply`] accepted on this index and that only
    /// accesses memories and adds deltas to their values (a training step's
    /// batch), on an index that keeps values: the same arithmetic, the same
    /// errors, and the index and `into` end as those three calls leave them,
    /// without the plan's copy of each changed value and its lookups (a
    /// group of training steps changes thousands of memories a step).
    /// Returns `false`, with nothing changed, for any other batch or index.
    /// On an error the index and `into` may be partly changed: a caller
    /// plans on a copy ([`MemoryIndex::try_clone`]) that it then drops.
    pub(crate) fn apply_updates_in_place(&mut self, batch: &ChangeBatch, into: &mut Composed) -> Result<bool> {
        let only_updates = batch.delete.is_empty()
            && batch.insert_keys.is_empty()
            && batch.insert_values.is_empty()
            && batch.insert_meta.is_empty()
            && batch.insert_tags.is_empty()
            && batch.assign_ids.is_empty()
            && batch.tag_counts.is_empty();
        // A store above its capacity evicts on any batch (the planner's
        // `evict_to`): that path stays with the planner.
        let over = self.config.capacity.is_some_and(|cap| self.ids.len() > cap);
        if !only_updates || over || self.ann.is_some() {
            return Ok(false);
        }
        let lambda = self.lambda();
        let dv = self.config.value_dim;
        let deltas = batch.deltas(&self.config)?;
        let Some(values) = self.values.as_mut() else {
            return Ok(false);
        };
        // Deltas add in the batch's order, as `math::apply_deltas` adds them
        // (a repeated id sums its deltas in that order).
        let mut rows: Vec<(MemoryId, usize)> = Vec::with_capacity(batch.update_ids.len());
        for (i, &id) in batch.update_ids.iter().enumerate() {
            let r = *self.pos.get(&id).ok_or(Error::UnknownId(id))?;
            for (x, d) in values[r * dv..(r + 1) * dv].iter_mut().zip(deltas.row(i)) {
                *x += d;
            }
            rows.push((id, r));
        }
        // Checked in `apply_deltas`' order: the batch's when its ids ascend,
        // else by id.
        if !rows.windows(2).all(|w| w[0].0 < w[1].0) {
            rows.sort_unstable();
            rows.dedup();
        }
        for &(id, r) in &rows {
            let v = &values[r * dv..(r + 1) * dv];
            if let Some(col) = v.iter().position(|x| !x.is_finite()) {
                let row = batch.update_ids.iter().rposition(|x| *x == id).unwrap_or(0);
                return Err(Error::NonFinite {
                    what: "values after update",
                    row,
                    col,
                });
            }
            into.set_value(id, v);
        }
        // Accesses as the planner's overlay counts them (`Overlay::access_n`).
        for run in batch.touch.chunk_by(|a, b| a == b) {
            let id = run[0];
            let r = *self.pos.get(&id).ok_or(Error::UnknownId(id))?;
            let m = &mut self.meta[r];
            let (crf, last, count) =
                accessed_times(lambda, m.crf, m.last_access, m.access_count, run.len(), batch.tick);
            (m.crf, m.last_access, m.access_count) = (crf, last, count);
            let priority = math::priority(lambda, crf, last);
            self.prio[r] = priority;
            into.set_access(AccessUpdate {
                id,
                last_access: last,
                access_count: count,
                crf,
                priority,
            });
        }
        self.counters.last_batch = batch.seq;
        into.next_id = self.next_id;
        into.counters = self.counters;
        Ok(true)
    }

    /// Plans eviction down to `target_len`.
    pub fn plan_evict(&self, target_len: usize) -> Result<Changes> {
        let mut ov = Overlay::new(self);
        ov.evict_to(target_len);
        ov.finish_without_values()
    }

    /// Plans `learn` (see [`memstore_api::MemoryStore::learn`]). The plan names the
    /// stored values it needs; [`LearnPlan::finish`] takes them.
    pub fn plan_learn<'b>(&'b self, batch: Batch<'b>, tick: Tick, k: usize) -> Result<LearnPlan<'b>> {
        self.plan_learn_with(batch, tick, k, true)
    }

    /// [`MemoryIndex::plan_learn`], with the causal search of the batch's
    /// own rows allowed or not (the tests compare both ways).
    fn plan_learn_with<'b>(
        &'b self,
        batch: Batch<'b>,
        tick: Tick,
        k: usize,
        allow_causal: bool,
    ) -> Result<LearnPlan<'b>> {
        self.config.check_learn(&batch, k)?;
        let cfg = &self.config;
        let lambda = self.lambda();
        let slack = k.max(8);
        let k0 = k + slack;
        // Stored memories leave the overlay during the rows only by merging
        // (eviction comes after them). L2 distances are never negative, so
        // under L2 with `recombine <= 0` nothing can merge or be removed and
        // the store's top-k needs no slack (k + slack candidates cost a third
        // more search at 10k keys). Cosine and inner-product distances can
        // fall below 0 (rounding, or any dot product above 1): they keep it.
        let no_merges = cfg.metric == Metric::L2 && cfg.recombine <= 0.0;
        let k_store = if no_merges { k } else { k0 };
        let pre = self.search(batch.keys, k_store, None);
        let mut ov = Overlay::new(self);
        // The memories rows create from their own keys, found for every row
        // at once among the rows before it (one causal 8-bit pass); the
        // block scan then covers only merged memories. Without that path
        // (no VNNI, small batches) the block scan covers every creation.
        let causal = if allow_causal && batch.len() >= CAUSAL_MIN_ROWS {
            // Candidates per row: enough that `k` of them likely hold a
            // memory. A row whose nearest stored memory is within the
            // novelty threshold creates none from its own key, so with a
            // share `f` of rows novel against the store, about `k / f`.
            let novel = pre
                .iter()
                .filter(|row| row.first().is_none_or(|&(d, _)| d > cfg.novelty))
                .count();
            let want = if novel == batch.len() {
                k
            } else {
                let f = (novel as f64 / batch.len() as f64).max(0.25);
                ((k as f64 / f).ceil() as usize + 2).min(4 * k)
            };
            crate::gemm::causal_topk(cfg.metric, batch.keys.data(), cfg.key_dim, want).map(|(dist, idx)| Causal {
                dist,
                idx,
                want,
            })
        } else {
            None
        };
        if causal.is_some() {
            ov.literal = vec![u32::MAX; batch.len()];
            ov.merged_pool = Some((Vec::new(), Vec::new()));
        }
        let mut found_rows = Vec::with_capacity(batch.len());
        let mut in_batch = InBatchScan::default();
        for (i, pre_row) in pre.into_iter().enumerate() {
            if i % LEARN_BLOCK == 0 {
                in_batch.prepare(&ov, cfg, batch.keys, i, k0);
            }
            let key = batch.keys.row(i);
            // Nearest among stored memories still present. The survivors of the
            // pre-batch top-k0 are exact while at least k remain (anything not in
            // the top-k0 ranks after all of it); otherwise search this row again.
            let mut found: Vec<(f32, MemoryId)> = pre_row
                .iter()
                .copied()
                .filter(|(_, id)| !ov.removed.contains(id))
                .take(k)
                .collect();
            if found.len() < k && pre_row.len() == k_store {
                found = self
                    .topk(key, k + ov.removed.len(), None, true)
                    .into_iter()
                    .filter(|(_, id)| !ov.removed.contains(id))
                    .take(k)
                    .collect();
            }
            // Nearest among memories created earlier in this batch.
            match causal.as_ref().map(|c| c.nearest(&ov, i, k)) {
                None => found.extend(in_batch.nearest(&ov, cfg.metric, key, i, k)),
                Some(Some(literal)) => {
                    found.extend(literal);
                    found.extend(in_batch.nearest(&ov, cfg.metric, key, i, k));
                }
                // Too many of the nearest earlier rows created nothing (or
                // were merged away): every live creation, exactly.
                Some(None) => found.extend(ov.scan_created(cfg.metric, key)),
            }
            // Select before sorting: a large batch creates thousands of
            // memories, and sorting all of them per row dominated `learn`.
            if found.len() > k {
                found.select_nth_unstable_by(k - 1, |a, b| math::neighbour_order(*a, *b));
                found.truncate(k);
            }
            found.sort_by(|a, b| math::neighbour_order(*a, *b));

            let close: Vec<(f32, MemoryId)> = found.iter().copied().filter(|(d, _)| *d < cfg.recombine).collect();
            if !close.is_empty() {
                let metas: Vec<(Meta, &[f32])> = close.iter().map(|(_, id)| ov.meta_and_key(*id)).collect();
                let sources: Vec<MergeSource<'_>> = close
                    .iter()
                    .zip(&metas)
                    .map(|((d, _), (m, key))| MergeSource {
                        distance: *d,
                        key,
                        created: m.created,
                        last_access: m.last_access,
                        access_count: m.access_count,
                        crf: m.crf,
                        tags: &m.tags,
                    })
                    .collect();
                let merged = math::merge(lambda, key, batch.tags.row(i), tick, &sources);
                let expr = ValueExpr::Merge {
                    row: i,
                    parts: merged
                        .weights
                        .iter()
                        .copied()
                        .zip(close.iter().map(|(_, id)| *id))
                        .collect(),
                };
                let meta = Meta {
                    created: merged.created,
                    last_access: merged.last_access,
                    access_count: merged.access_count,
                    crf: merged.crf,
                    tags: merged.tags,
                };
                drop(sources);
                drop(metas);
                for (_, id) in &close {
                    ov.remove(*id);
                }
                ov.create(merged.key, expr, meta);
                ov.counters.merged += 1;
            } else if found.iter().all(|(d, _)| *d > cfg.novelty) {
                ov.insert_row(&batch, i, tick);
            }
            for &(d, id) in &found {
                if d >= cfg.recombine && d <= cfg.novelty {
                    ov.access(id, tick);
                }
            }
            found_rows.push(found);
        }
        if let Some(cap) = cfg.capacity {
            ov.evict_to(cap);
        }
        Ok(LearnPlan {
            overlay: ov,
            batch,
            k,
            found: found_rows,
        })
    }
}

/// Rows of a `learn` batch per block of [`InBatchScan`].
const LEARN_BLOCK: usize = 512;

/// Batches from this many rows find the memories created from their own
/// keys by one causal search ([`Causal`]).
const CAUSAL_MIN_ROWS: usize = 64;

/// For each row of a `learn` batch, its `want` nearest earlier rows of the
/// batch (exact distances, ties by row), from [`crate::gemm::causal_topk`]:
/// one pass of the 8-bit kernel with a per-row limit instead of a product
/// and a scan per block. A row that creates a memory from its own key (a
/// novel observation) gives it that key, so these are the candidates among
/// such memories; memories created by merging have other keys and stay
/// with [`InBatchScan`].
struct Causal {
    dist: Vec<f32>,
    idx: Vec<u32>,
    want: usize,
}

impl Causal {
    /// Row `i`'s `k` nearest live memories created from earlier rows' own
    /// keys (exact, nearest first, ties by id: ids grow with rows), or
    /// `None` when the candidates do not settle it (fewer than `k` of the
    /// `want` nearest rows still hold such a memory).
    fn nearest(&self, ov: &Overlay<'_>, i: usize, k: usize) -> Option<Vec<(f32, MemoryId)>> {
        let w = self.want;
        let mut out = Vec::with_capacity(k);
        let mut listed = 0;
        for j in i * w..(i + 1) * w {
            let Some(&c) = ov.literal.get(self.idx[j] as usize) else {
                break;
            };
            listed += 1;
            if let Some(m) = ov.created.get(c as usize)
                && m.alive
            {
                out.push((self.dist[j], m.id));
                if out.len() == k {
                    return Some(out);
                }
            }
        }
        // A short list holds every earlier row: the survivors are all there is.
        (listed < w).then_some(out)
    }
}

/// The nearest memories created earlier in the same `learn` batch, for each
/// row: row `i` must see what rows `< i` created (the batch is applied row by
/// row), which a scalar scan makes O(n²) distance computations per batch.
/// Instead, at the start of each block of [`LEARN_BLOCK`] rows, one batched
/// search ([`crate::gemm::topk`]: SGEMM, or the 8-bit prefilter on a VNNI
/// CPU) ranks the block's rows against every memory of the overlay's pool
/// created before the block (`k + slack` candidates each, exact distances);
/// within the block only the pool's memories the block itself creates are
/// scanned. The pool is every creation, or, where [`Causal`] finds the
/// memories created from rows' own keys, only the merged ones. A candidate merged away since the block began is skipped;
/// when fewer than `k` survive, or the `k`-th is within rounding of the last
/// candidate, the row falls back to the exact scan, so results are those of
/// the scalar scan (the same rule as [`MemoryIndex::search`]).
#[derive(Default)]
struct InBatchScan {
    /// First batch row of the current block.
    start: usize,
    /// Memories of the overlay's pool (`Overlay::pool_member`) the block's product covered.
    upto: usize,
    /// Candidates per row.
    want: usize,
    dist: Vec<f32>,
    idx: Vec<u32>,
}

impl InBatchScan {
    /// Ranks rows `start..start + LEARN_BLOCK` of `keys` against the memories created so far.
    fn prepare(&mut self, ov: &Overlay<'_>, cfg: &MemoryConfig, keys: Vectors<'_>, start: usize, want: usize) {
        self.start = start;
        self.upto = 0;
        let pooled = ov.pool_len();
        if pooled == 0 {
            return;
        }
        let dim = cfg.key_dim;
        let end = (start + LEARN_BLOCK).min(keys.len());
        let mask: Vec<bool> = (0..pooled).map(|p| ov.pool_member(p).alive).collect();
        let rows = &keys.data()[start * dim..end * dim];
        // Shapes are the overlay's own and `want` > 0: this cannot fail; if
        // it did, `upto` = 0 leaves every row to the scalar scan.
        if let Ok((dist, idx)) = crate::gemm::topk(cfg.metric, rows, ov.pool_keys(), dim, want, Some(&mask)) {
            (self.dist, self.idx, self.want, self.upto) = (dist, idx, want, pooled);
        }
    }

    /// Row `row`'s `k` nearest live memories created earlier in the batch
    /// (fewer when fewer exist), exact distances, in no particular order.
    fn nearest(&self, ov: &Overlay<'_>, metric: Metric, key: &[f32], row: usize, k: usize) -> Vec<(f32, MemoryId)> {
        let mut out: Vec<(f32, MemoryId)> = Vec::new();
        if self.upto > 0 {
            let r = row - self.start;
            let cands: Vec<(f32, usize)> = (r * self.want..(r + 1) * self.want)
                .filter(|&j| self.idx[j] != u32::MAX)
                .map(|j| (self.dist[j], self.idx[j] as usize))
                .collect();
            out = cands
                .iter()
                .map(|&(d, p)| (d, ov.pool_member(p)))
                .filter(|(_, c)| c.alive)
                .map(|(d, c)| (d, c.id))
                .collect();
            out.sort_by(|a, b| math::neighbour_order(*a, *b));
            // Fewer candidates than asked: the product returned every memory
            // alive at the block's start, so the survivors are all there is.
            let all = cands.len() < self.want;
            let exact = all
                || (out.len() >= k && {
                    let (kth, last) = (out[k - 1].0, cands[cands.len() - 1].0);
                    kth < last - (1e-4 * last.abs() + 1e-6)
                });
            if exact {
                out.truncate(k);
            } else {
                out = (0..self.upto)
                    .map(|p| ov.pool_member(p))
                    .filter(|c| c.alive)
                    .map(|c| (math::distance(metric, key, &c.key), c.id))
                    .collect();
            }
        }
        // The memories the block created so far: one grouped scan of their
        // contiguous keys (bit-identical to `math::distance` per row).
        let mut dist = Vec::with_capacity(ov.pool_len() - self.upto);
        math::distances(metric, key, &ov.pool_keys()[self.upto * key.len()..], &mut dist);
        out.extend(
            (self.upto..ov.pool_len())
                .map(|p| ov.pool_member(p))
                .zip(dist)
                .filter(|(c, _)| c.alive)
                .map(|(c, d)| (d, c.id)),
        );
        out
    }
}

/// How a new memory's value is obtained once stored values are at hand.
enum ValueExpr {
    /// Row `i` of the batch's values.
    Literal(usize),
    /// `weighted_mean(batch value row, weights · values of ids)`.
    Merge { row: usize, parts: Vec<(f64, MemoryId)> },
}

struct Created {
    id: MemoryId,
    key: Vec<f32>,
    value: ValueExpr,
    meta: Meta,
    alive: bool,
}

/// A memory's `(crf, last_access, access_count)` after `times` accesses at
/// `tick`: [`math::access`] once per access, in order.
fn accessed_times(lambda: f64, mut crf: f64, mut last: Tick, count: u64, times: usize, tick: Tick) -> (f64, Tick, u64) {
    for _ in 0..times {
        (crf, last) = math::access(lambda, crf, last, tick);
    }
    (crf, last, count.saturating_add(times as u64))
}

/// What an operation has done so far on top of the index.
struct Overlay<'a> {
    base: &'a MemoryIndex,
    removed: IdSet,
    accessed: IdMap<(Tick, u64, f64)>,
    created: Vec<Created>,
    /// The keys of `created`, row after row.
    created_keys: Vec<f32>,
    /// The id of `created[0]` (creations take consecutive ids).
    first_id: MemoryId,
    /// When `learn` finds the memories created from rows' own keys by
    /// [`Causal`], the others, which [`InBatchScan`] then covers alone: their
    /// indices in `created` and their keys, row after row. `None`: the scan
    /// covers every creation (`created`, `created_keys`).
    merged_pool: Option<(Vec<usize>, Vec<f32>)>,
    /// Per batch row, the index in `created` of the memory it created from
    /// its own key (`u32::MAX`: none); empty unless `learn` uses [`Causal`].
    literal: Vec<u32>,
    next_id: MemoryId,
    counters: Counters,
}

impl<'a> Overlay<'a> {
    fn new(base: &'a MemoryIndex) -> Self {
        Overlay {
            base,
            removed: IdSet::default(),
            accessed: IdMap::default(),
            created: Vec::new(),
            created_keys: Vec::new(),
            first_id: base.next_id,
            merged_pool: None,
            literal: Vec::new(),
            next_id: base.next_id,
            counters: base.counters,
        }
    }

    fn create(&mut self, key: Vec<f32>, value: ValueExpr, meta: Meta) {
        let id = self.next_id;
        self.next_id += 1;
        self.created_keys.extend_from_slice(&key);
        if let Some((members, keys)) = &mut self.merged_pool
            && !matches!(value, ValueExpr::Literal(_))
        {
            members.push(self.created.len());
            keys.extend_from_slice(&key);
        }
        self.created.push(Created {
            id,
            key,
            value,
            meta,
            alive: true,
        });
    }

    /// Creates a new memory from row `i` of `batch`, first accessed at `tick`.
    fn insert_row(&mut self, batch: &Batch<'_>, i: usize, tick: Tick) {
        let meta = Meta {
            created: tick,
            last_access: tick,
            access_count: 1,
            crf: 1.0,
            tags: math::new_tags(batch.tags.row(i)),
        };
        self.create(batch.keys.row(i).to_vec(), ValueExpr::Literal(i), meta);
        if let Some(slot) = self.literal.get_mut(i) {
            *slot = (self.created.len() - 1) as u32;
        }
        self.counters.inserted += 1;
    }

    /// How many creations [`InBatchScan`] covers.
    fn pool_len(&self) -> usize {
        self.merged_pool.as_ref().map_or(self.created.len(), |(m, _)| m.len())
    }

    /// The `p`-th creation [`InBatchScan`] covers.
    fn pool_member(&self, p: usize) -> &Created {
        &self.created[self.merged_pool.as_ref().map_or(p, |(m, _)| m[p])]
    }

    /// The keys of the creations [`InBatchScan`] covers, row after row.
    fn pool_keys(&self) -> &[f32] {
        self.merged_pool.as_ref().map_or(&self.created_keys, |(_, k)| k)
    }

    /// Every live memory created so far, with its exact distance to `key`.
    fn scan_created(&self, metric: Metric, key: &[f32]) -> Vec<(f32, MemoryId)> {
        let mut dist = Vec::with_capacity(self.created.len());
        math::distances(metric, key, &self.created_keys, &mut dist);
        self.created
            .iter()
            .zip(dist)
            .filter(|(c, _)| c.alive)
            .map(|(c, d)| (d, c.id))
            .collect()
    }

    /// The current bookkeeping and key of a live memory.
    fn meta_and_key(&self, id: MemoryId) -> (Meta, &[f32]) {
        if let Some(c) = self.created_index(id) {
            let c = &self.created[c];
            return (c.meta.clone(), &c.key);
        }
        let (Some(m), Some(key)) = (self.base.meta(id), self.base.key(id)) else {
            unreachable!("overlay asked for memory {id} that the planner never found")
        };
        let mut m = m.clone();
        if let Some(&(last, count, crf)) = self.accessed.get(&id) {
            m.last_access = last;
            m.access_count = count;
            m.crf = crf;
        }
        (m, key)
    }

    fn access(&mut self, id: MemoryId, tick: Tick) {
        self.access_n(id, 1, tick);
    }

    /// `times` accesses of `id` at `tick`: the same arithmetic as that many
    /// calls of [`Overlay::access`], with one lookup.
    fn access_n(&mut self, id: MemoryId, times: usize, tick: Tick) {
        let lambda = self.base.lambda();
        let repeat = |crf: f64, last: Tick, count: u64| accessed_times(lambda, crf, last, count, times, tick);
        if let Some(c) = self.created_index(id) {
            let m = &mut self.created[c].meta;
            (m.crf, m.last_access, m.access_count) = repeat(m.crf, m.last_access, m.access_count);
            return;
        }
        // The bookkeeping only (a touch of a memory must not copy its tags).
        let (last, count, crf) = match self.accessed.get(&id) {
            Some(&state) => state,
            None => {
                let Some(m) = self.base.meta(id) else {
                    unreachable!("overlay asked for memory {id} that the planner never found")
                };
                (m.last_access, m.access_count, m.crf)
            }
        };
        let (crf, last, count) = repeat(crf, last, count);
        self.accessed.insert(id, (last, count, crf));
    }

    fn remove(&mut self, id: MemoryId) {
        if let Some(c) = self.created_index(id) {
            self.created[c].alive = false;
        } else {
            self.removed.insert(id);
            self.accessed.remove(&id);
        }
    }

    fn live_len(&self) -> usize {
        self.base.len() - self.removed.len() + self.created.iter().filter(|c| c.alive).count()
    }

    /// Evicts the lowest-priority live memories until at most `target` remain.
    fn evict_to(&mut self, target: usize) {
        let need = self.live_len().saturating_sub(target);
        if need == 0 {
            return;
        }
        let lambda = self.base.lambda();
        // The `need` lowest of the stored memories this operation left
        // alone, at their stored priority: one scan with a bounded heap (no
        // priority tree to keep in step on every access; the heap sees few
        // pushes, and the hash lookups only rows that would enter it).
        let base = self.base;
        let mut lowest: BinaryHeap<Victim> = BinaryHeap::with_capacity(need + 1);
        for (&id, &p) in base.ids.iter().zip(&base.prio) {
            let v = Victim(p, id);
            if lowest.len() == need && lowest.peek().is_some_and(|top| v >= *top) {
                continue;
            }
            if self.removed.contains(&id) || self.accessed.contains_key(&id) {
                continue;
            }
            lowest.push(v);
            if lowest.len() > need {
                lowest.pop();
            }
        }
        let mut cands: Vec<Victim> = lowest.into_vec();
        for (&id, &(last, _, crf)) in &self.accessed {
            cands.push(Victim(math::priority(lambda, crf, last), id));
        }
        for c in self.created.iter().filter(|c| c.alive) {
            cands.push(Victim(math::priority(lambda, c.meta.crf, c.meta.last_access), c.id));
        }
        cands.sort_unstable();
        for &Victim(_, id) in cands.iter().take(need) {
            self.remove(id);
        }
        self.counters.evicted += need as u64;
    }

    fn finish_without_values(self) -> Result<Changes> {
        debug_assert!(self.created.is_empty());
        let dummy = Batch::new(Vectors::new(&[], 1)?, Vectors::new(&[], 1)?);
        self.finish(&dummy, &HashMap::new())
    }

    /// Evaluates new values and lists the changes.
    fn finish(self, batch: &Batch<'_>, stored: &HashMap<MemoryId, Vec<f32>>) -> Result<Changes> {
        let values = self.created_values(batch, stored)?;
        Ok(self.into_changes(values))
    }

    /// The values of the memories created so far, by index in `created`
    /// (merges read their sources from earlier creations, the index's kept
    /// values, or `stored`).
    fn created_values(&self, batch: &Batch<'_>, stored: &HashMap<MemoryId, Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        let mut values: Vec<Vec<f32>> = Vec::with_capacity(self.created.len());
        for c in &self.created {
            let v = match &c.value {
                ValueExpr::Literal(row) => batch.values.row(*row).to_vec(),
                ValueExpr::Merge { row, parts } => {
                    let mut srcs: Vec<(f64, &[f32])> = Vec::with_capacity(parts.len());
                    for (w, id) in parts {
                        let v = match self.created_index(*id) {
                            Some(i) => values.get(i).map(Vec::as_slice),
                            None => self.base.stored_value(*id, stored),
                        }
                        .ok_or_else(|| Error::Corrupt(format!("no value stored for memory {id}")))?;
                        srcs.push((*w, v));
                    }
                    math::weighted_mean(batch.values.row(*row), srcs.into_iter())
                }
            };
            values.push(v);
        }
        Ok(values)
    }

    /// Where memory `id` sits in `created`, if this operation created it.
    fn created_index(&self, id: MemoryId) -> Option<usize> {
        let i = usize::try_from(id.checked_sub(self.first_id)?).ok()?;
        (i < self.created.len()).then_some(i)
    }

    /// The changes to persist, the created memories taking their values
    /// from `values` (by index in `created`; moved, not copied).
    fn into_changes(self, values: Vec<Vec<f32>>) -> Changes {
        let lambda = self.base.lambda();
        let mut removed: Vec<MemoryId> = self.removed.into_iter().collect();
        removed.sort_unstable();
        let mut accessed: Vec<AccessUpdate> = self
            .accessed
            .into_iter()
            .map(|(id, (last, count, crf))| AccessUpdate {
                id,
                last_access: last,
                access_count: count,
                crf,
                priority: math::priority(lambda, crf, last),
            })
            .collect();
        accessed.sort_by_key(|u| u.id);
        let inserted = self
            .created
            .into_iter()
            .zip(values.into_iter().map(Some).chain(std::iter::repeat_with(|| None)))
            .filter(|(c, _)| c.alive)
            .map(|(c, value)| Memory {
                id: c.id,
                value: value.unwrap_or_default(),
                key: c.key,
                created: c.meta.created,
                last_access: c.meta.last_access,
                access_count: c.meta.access_count,
                crf: c.meta.crf,
                tags: c.meta.tags,
            })
            .collect();
        Changes {
            removed,
            accessed,
            values: Vec::new(),
            inserted,
            retagged: Vec::new(),
            next_id: self.next_id,
            counters: self.counters,
        }
    }
}

/// Fills `out` (empty, `rows.len()` × `k` slots) with the neighbours of
/// `rows`, each id's key and value from `lookup`, row by row on all cores
/// (a batch of 4096 × 8 neighbours of 64-d keys and values is 16 MB).
fn fill_neighbors<'a>(
    mut out: Neighbors,
    rows: &[Vec<(f32, MemoryId)>],
    lookup: impl Fn(MemoryId) -> Result<(&'a [f32], &'a [f32])> + Sync,
) -> Result<Neighbors> {
    let (k, dk, dv) = (out.k, out.key_dim, out.value_dim);
    if out.n != rows.len() {
        return Err(Error::Shape(format!(
            "{} rows of neighbours for {} rows found",
            out.n,
            rows.len()
        )));
    }
    if k == 0 || dk == 0 || dv == 0 {
        return Ok(out);
    }
    out.ids
        .par_chunks_mut(k)
        .zip(out.distances.par_chunks_mut(k))
        .zip(out.keys.par_chunks_mut(k * dk))
        .zip(out.values.par_chunks_mut(k * dv))
        .zip(rows.par_iter())
        .try_for_each(|((((ids, dist), keys), values), row)| -> Result<()> {
            for (j, &(d, id)) in row.iter().take(k).enumerate() {
                let (key, value) = lookup(id)?;
                ids[j] = Some(id);
                dist[j] = d;
                keys[j * dk..(j + 1) * dk].copy_from_slice(key);
                values[j * dv..(j + 1) * dv].copy_from_slice(value);
            }
            Ok(())
        })?;
    Ok(out)
}

/// Floats of keys and values from which [`PendingNeighbors::allocate_while`]
/// allocates on a second thread (1 MiB: 256 rows of 8 neighbours of 64-d
/// keys and values).
const ALLOCATE_ALONGSIDE: usize = 256 * 1024;

/// Floats written per job when [`touched_neighbors`] touches its buffers
/// (64 KiB: sixteen 4 KiB pages).
const TOUCH_RUN: usize = 16 * 1024;

/// [`Neighbors::empty`], with every page of its key and value buffers
/// written on all cores. A buffer this large is freshly mapped by the
/// allocator, and its first-touch page faults (4096 of them for 16 MB)
/// cost more than the copy that fills it: touched ahead, off the critical
/// path, the fill is a plain copy.
fn touched_neighbors(n: usize, k: usize, dk: usize, dv: usize) -> Neighbors {
    let mut out = Neighbors::empty(n, k, dk, dv);
    out.keys.par_chunks_mut(TOUCH_RUN).for_each(|c| c.fill(0.0));
    out.values.par_chunks_mut(TOUCH_RUN).for_each(|c| c.fill(0.0));
    out
}

/// A planned `learn`, waiting for the stored values it needs.
pub struct LearnPlan<'a> {
    overlay: Overlay<'a>,
    batch: Batch<'a>,
    k: usize,
    found: Vec<Vec<(f32, MemoryId)>>,
}

impl LearnPlan<'_> {
    /// The stored memories whose values the plan needs (neighbours and merge
    /// sources) and the index does not keep, ascending.
    pub fn needed_values(&self) -> Vec<MemoryId> {
        let base = self.overlay.base;
        if base.holds_values() {
            return Vec::new();
        }
        let mut ids: Vec<MemoryId> = self
            .found
            .iter()
            .flatten()
            .map(|&(_, id)| id)
            .filter(|&id| base.contains(id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        base.missing_values(ids)
    }

    /// The changes to persist and the neighbours to return.
    pub fn finish(self, stored: &HashMap<MemoryId, Vec<f32>>) -> Result<(Changes, Neighbors)> {
        let base = self.overlay.base;
        let (changes, pending) = self.split(stored)?;
        let out = pending.fill(base, pending.allocate())?;
        Ok((changes, out))
    }

    /// The changes to persist, and the neighbours to return still to be
    /// copied out (see [`PendingNeighbors`]), which no longer borrow the
    /// index: a backend can write the changes first.
    pub fn split<'s>(self, stored: &'s HashMap<MemoryId, Vec<f32>>) -> Result<(Changes, PendingNeighbors<'s>)> {
        let base = self.overlay.base;
        let (dk, dv) = (base.config.key_dim, base.config.value_dim);
        let new_values = self.overlay.created_values(&self.batch, stored)?;
        let mut created_values = Vec::with_capacity(new_values.len() * dv);
        for v in &new_values {
            created_values.extend_from_slice(v);
        }
        // Stored memories this learn removes (merged away, evicted) that a
        // row may have returned: copied now, the index loses them on apply.
        let mut gone = HashMap::new();
        for &id in &self.overlay.removed {
            if let (Some(key), Some(value)) = (base.key(id), base.stored_value(id, stored)) {
                gone.insert(id, (key.to_vec(), value.to_vec()));
            }
        }
        let mut overlay = self.overlay;
        let pending = PendingNeighbors {
            stored,
            found: self.found,
            k: self.k,
            dims: (dk, dv),
            first_id: overlay.first_id,
            created: new_values.len(),
            created_keys: std::mem::take(&mut overlay.created_keys),
            created_values,
            gone,
        };
        Ok((overlay.into_changes(new_values), pending))
    }
}

/// The neighbours a `learn` returns, still to be copied out.
///
/// Split from [`LearnPlan`] so that a backend can write the changes, apply
/// them and fill the neighbours afterwards from the changed index, with the
/// output's buffers allocated and touched while the write waits on the disk
/// ([`PendingNeighbors::allocate`]): at 4096 rows × 8 neighbours × (64 + 64)
/// floats the output is 16 MB of fresh memory, whose page faults took ~5 ms
/// of a ~40 ms `learn` on 2 cores. Memories the batch created come from the
/// plan's own copies, stored ones it removed from copies taken at the
/// split, the others from whichever index [`PendingNeighbors::fill`] is
/// given, before or after the changes are applied (stored keys and values
/// do not change in a `learn`).
pub struct PendingNeighbors<'s> {
    stored: &'s HashMap<MemoryId, Vec<f32>>,
    found: Vec<Vec<(f32, MemoryId)>>,
    k: usize,
    dims: (usize, usize),
    first_id: MemoryId,
    created: usize,
    created_keys: Vec<f32>,
    created_values: Vec<f32>,
    gone: HashMap<MemoryId, (Vec<f32>, Vec<f32>)>,
}

impl PendingNeighbors<'_> {
    /// The output, empty, its buffers touched on all cores (see the type).
    pub fn allocate(&self) -> Neighbors {
        touched_neighbors(self.found.len(), self.k, self.dims.0, self.dims.1)
    }

    /// Awaits `write` while [`PendingNeighbors::allocate`]'s work runs on a
    /// thread of its own, and returns both results. The thread owns nothing
    /// of the caller's, so this works on any async runtime (or none); a small
    /// output is allocated here after `write` (a thread costs more than it
    /// saves).
    pub async fn allocate_while<T>(&self, write: impl std::future::Future<Output = T>) -> (T, Neighbors) {
        let (n, k, (dk, dv)) = (self.found.len(), self.k, self.dims);
        if n * k * (dk + dv) < ALLOCATE_ALONGSIDE {
            let done = write.await;
            return (done, self.allocate());
        }
        let job = std::thread::spawn(move || touched_neighbors(n, k, dk, dv));
        let done = write.await;
        match job.join() {
            Ok(out) => (done, out),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Copies every neighbour's key and value into `out` (from
    /// [`PendingNeighbors::allocate`]), reading stored memories from `base`:
    /// the index the plan was made on, with or without its changes applied.
    pub fn fill(&self, base: &MemoryIndex, out: Neighbors) -> Result<Neighbors> {
        let (dk, dv) = self.dims;
        if (out.k, out.key_dim, out.value_dim) != (self.k, dk, dv)
            || (base.config.key_dim, base.config.value_dim) != (dk, dv)
        {
            return Err(Error::Shape(
                "neighbours filled into a buffer or from an index of another shape".into(),
            ));
        }
        let missing = |id: MemoryId| Error::Corrupt(format!("no value stored for memory {id}"));
        fill_neighbors(out, &self.found, |id| {
            let created = id
                .checked_sub(self.first_id)
                .and_then(|c| usize::try_from(c).ok())
                .filter(|&c| c < self.created);
            if let Some(c) = created {
                return Ok((
                    &self.created_keys[c * dk..(c + 1) * dk],
                    &self.created_values[c * dv..(c + 1) * dv],
                ));
            }
            if let Some((key, value)) = self.gone.get(&id) {
                return Ok((key.as_slice(), value.as_slice()));
            }
            // One lookup of the row for key and kept value.
            let r = *base.pos.get(&id).ok_or(Error::UnknownId(id))?;
            let value = match &base.values {
                Some(values) => &values[r * dv..(r + 1) * dv],
                None => self.stored.get(&id).ok_or_else(|| missing(id))?.as_slice(),
            };
            Ok((&base.keys[r * dk..(r + 1) * dk], value))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use memstore_api::testkit::util::Rng;

    /// Uniform in `[-0.5, 0.5)`.
    fn rng(r: &mut Rng) -> f32 {
        r.unit() * 0.5
    }

    /// `n` keys around `centres` (`dim` wide), spread `spread`.
    fn clustered(seed: &mut Rng, n: usize, centres: &[f32], dim: usize, spread: f32) -> Vec<f32> {
        let c = centres.len() / dim;
        let mut out = Vec::with_capacity(n * dim);
        for _ in 0..n {
            let j = ((rng(seed) + 0.5) * c as f32) as usize % c;
            out.extend((0..dim).map(|d| centres[j * dim + d] + spread * rng(seed)));
        }
        out
    }

    /// Brute force: the `k` nearest of `keys` (rows of `ids`) to `q`, ties
    /// by id.
    fn brute(metric: Metric, q: &[f32], ids: &[MemoryId], keys: &[f32], k: usize) -> Vec<(f32, MemoryId)> {
        let d = q.len();
        let mut all: Vec<(f32, MemoryId)> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| (math::distance(metric, q, &keys[i * d..(i + 1) * d]), id))
            .collect();
        all.sort_by(|a, b| math::neighbour_order(*a, *b));
        all.truncate(k);
        all
    }

    /// Large search batches (the 8-bit path, which keeps the keys'
    /// quantisation between searches) see every change: after the nearest
    /// keys are deleted, and after as many are inserted, each answer is the
    /// brute-force one with ties by id.
    #[test]
    fn large_batches_see_every_change() {
        let d = 16;
        for metric in [Metric::L2, Metric::Cosine] {
            let mut seed = Rng::new(5);
            let mut index = MemoryIndex::new(MemoryConfig::new(d, 1).with_metric(metric));
            let keys: Vec<f32> = (0..3000 * d).map(|_| rng(&mut seed)).collect();
            let values = vec![0.0f32; 3000];
            let batch = Batch::new(Vectors::new(&keys, d).unwrap(), Vectors::new(&values, 1).unwrap());
            let changes = index.plan_insert(&batch, 1).unwrap();
            index.apply(&changes).unwrap();
            let q: Vec<f32> = (0..300 * d).map(|_| rng(&mut seed)).collect();
            let check = |index: &MemoryIndex, step: &str| {
                let ids = index.ids().to_vec();
                let live: Vec<f32> = ids.iter().flat_map(|&id| index.key(id).unwrap().to_vec()).collect();
                let got = index.search(Vectors::new(&q, d).unwrap(), 5, None);
                for (i, row) in got.iter().enumerate() {
                    assert_eq!(
                        row,
                        &brute(metric, &q[i * d..(i + 1) * d], &ids, &live, 5),
                        "{metric:?} {step}: query {i}"
                    );
                }
                got
            };
            let got = check(&index, "before");
            let mut nearest: Vec<MemoryId> = got.iter().map(|row| row[0].1).collect();
            nearest.sort_unstable();
            nearest.dedup();
            let changes = index.plan_delete(&nearest).unwrap();
            index.apply(&changes).unwrap();
            check(&index, "after the deletes");
            let fresh = &q[..nearest.len() * d];
            let zeros = vec![0.0f32; nearest.len()];
            let batch = Batch::new(Vectors::new(fresh, d).unwrap(), Vectors::new(&zeros, 1).unwrap());
            let changes = index.plan_insert(&batch, 2).unwrap();
            index.apply(&changes).unwrap();
            assert_eq!(index.len(), 3000);
            check(&index, "after");
        }
    }

    /// The causal search of a batch's own rows plans exactly what the block
    /// scan plans (neighbours, merges, touches, insertions, evictions, the
    /// values and neighbours `finish` returns), on every metric, with merges
    /// of stored and of in-batch memories, duplicates of earlier rows and of
    /// stored keys, and the novelty gate leaving many rows uncreated (which
    /// sends rows to the causal path's exact fallback).
    #[test]
    fn causal_and_block_scans_plan_the_same_learn() {
        assert!(
            crate::gemm::causal_topk(Metric::L2, &[0.0, 1.0, 2.0, 3.0], 2, 1).is_some(),
            "the 8-bit path runs in this crate's tests on every CPU (unset MEMSTORE_NO_Q8)"
        );
        let (dim, stored, n) = (8usize, 1500usize, 1300usize);
        for (case, metric) in [Metric::L2, Metric::Cosine, Metric::InnerProduct]
            .into_iter()
            .enumerate()
        {
            let mut seed = Rng::new(77 + case as u64);
            let centres: Vec<f32> = (0..200 * dim).map(|_| rng(&mut seed) * 8.0 + 0.3).collect();
            let base = clustered(&mut seed, stored, &centres, dim, 0.4);
            let mut keys = clustered(&mut seed, n, &centres, dim, 0.4);
            for i in (0..n).step_by(9) {
                let j = ((rng(&mut seed) + 0.5) * stored as f32) as usize % stored;
                keys[i * dim..(i + 1) * dim].copy_from_slice(&base[j * dim..(j + 1) * dim]);
            }
            for i in (100..n).step_by(6) {
                let j = ((rng(&mut seed) + 0.5) * i as f32) as usize % i;
                keys.copy_within(j * dim..(j + 1) * dim, i * dim);
            }
            // Thresholds at quantiles of the rows' nearest stored distance:
            // some rows merge, some are gated, the rest create memories.
            let mut nearest: Vec<f32> = (0..300)
                .map(|i| {
                    (0..stored)
                        .map(|j| math::distance(metric, &keys[i * dim..(i + 1) * dim], &base[j * dim..(j + 1) * dim]))
                        .fold(f32::INFINITY, f32::min)
                })
                .collect();
            nearest.sort_by(f32::total_cmp);
            let (recombine, novelty) = (nearest[45], nearest[150]);
            let cfg = MemoryConfig::new(dim, 2)
                .with_metric(metric)
                .with_thresholds(recombine, novelty)
                .with_capacity(1700);
            let mut index = MemoryIndex::new(cfg);
            let mut values = HashMap::new();
            for j in 0..stored {
                let meta = Meta {
                    created: 1,
                    last_access: 1 + (j % 5) as u64,
                    access_count: 1,
                    crf: 1.0,
                    tags: BTreeMap::new(),
                };
                index
                    .load(j as u64 + 1, &base[j * dim..(j + 1) * dim], None, meta)
                    .unwrap();
                values.insert(j as u64 + 1, vec![j as f32, -(j as f32)]);
            }
            let vals: Vec<f32> = (0..2 * n).map(|_| rng(&mut seed)).collect();
            let batch = Batch::new(Vectors::new(&keys, dim).unwrap(), Vectors::new(&vals, 2).unwrap());
            let plans = [true, false].map(|causal| index.plan_learn_with(batch, 9, 6, causal).unwrap());
            assert_eq!(plans[0].found, plans[1].found, "{metric:?}: neighbours differ");
            let [a, b] = plans.map(|p| p.finish(&values).unwrap());
            assert_eq!(a, b, "{metric:?}: changes or returned neighbours differ");
            let c = a.0.counters;
            assert!(
                c.merged > 100 && c.inserted > 300 && c.inserted + c.merged < n as u64 && c.evicted > 0,
                "{metric:?}: the scenario must merge, gate, insert and evict: {c:?}"
            );
        }
    }
}
