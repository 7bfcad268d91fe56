//! `InMemoryStore`: the reference model. Plain, exact, obviously correct and
//! deliberately naive (a `BTreeMap` scanned in full, `learn` applied row by
//! row), in the spirit of redb's reference model: the conformance suite's
//! property tests compare every backend against it.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use crate::math::{self, MergeSource};
use crate::{
    Batch, ChangeBatch, Counters, Error, Memory, MemoryConfig, MemoryId, MemoryStore, Neighbors, Result, Stats,
    TagFilter, Tick, Vectors,
};

/// The reference memory store: everything in a map, every search a full scan.
pub struct InMemoryStore {
    config: MemoryConfig,
    state: Mutex<State>,
}

#[derive(Clone)]
struct State {
    mems: BTreeMap<MemoryId, Memory>,
    next_id: MemoryId,
    counters: Counters,
}

impl InMemoryStore {
    /// An empty store with this configuration.
    pub fn new(config: MemoryConfig) -> Result<Self> {
        config.validate()?;
        Ok(InMemoryStore {
            config,
            state: Mutex::new(State {
                mems: BTreeMap::new(),
                next_id: 1,
                counters: Counters::default(),
            }),
        })
    }

    /// The same contents under a configuration whose tunable fields may differ
    /// (what reopening a durable store does).
    pub fn reconfigure(self, config: MemoryConfig) -> Result<Self> {
        config.validate()?;
        config.check_compatible(&self.config)?;
        Ok(InMemoryStore {
            config,
            state: self.state,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied change:
        // every mutation works on a copy or validates first.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lambda(&self) -> f64 {
        self.config.eviction.lambda()
    }
}

/// The `k` nearest memories of `q` among those passing `filter`.
fn nearest<'a>(
    config: &MemoryConfig,
    mems: &'a BTreeMap<MemoryId, Memory>,
    q: &[f32],
    k: usize,
    filter: Option<&TagFilter>,
) -> Vec<(f32, &'a Memory)> {
    let mut all: Vec<(f32, &Memory)> = mems
        .values()
        .filter(|m| filter.is_none_or(|f| f.matches(&m.tags)))
        .map(|m| (math::distance(config.metric, q, &m.key), m))
        .collect();
    all.sort_by(|a, b| math::neighbour_order((a.0, a.1.id), (b.0, b.1.id)));
    all.truncate(k);
    all
}

fn access(lambda: f64, m: &mut Memory, tick: Tick) {
    let (crf, last) = math::access(lambda, m.crf, m.last_access, tick);
    m.crf = crf;
    m.last_access = last;
    m.access_count = m.access_count.saturating_add(1);
}

fn new_memory(id: MemoryId, key: &[f32], value: &[f32], tags: &[String], tick: Tick) -> Memory {
    Memory {
        id,
        key: key.to_vec(),
        value: value.to_vec(),
        created: tick,
        last_access: tick,
        access_count: 1,
        crf: 1.0,
        tags: math::new_tags(tags),
    }
}

fn evict_to(lambda: f64, st: &mut State, target: usize) -> usize {
    let excess = st.mems.len().saturating_sub(target);
    if excess == 0 {
        return 0;
    }
    let mut order: Vec<(f64, MemoryId)> = st
        .mems
        .values()
        .map(|m| (math::priority(lambda, m.crf, m.last_access), m.id))
        .collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    for (_, id) in order.into_iter().take(excess) {
        st.mems.remove(&id);
    }
    st.counters.evicted += excess as u64;
    excess
}

fn check_known(st: &State, ids: &[MemoryId]) -> Result<()> {
    match ids.iter().find(|id| !st.mems.contains_key(id)) {
        Some(&id) => Err(Error::UnknownId(id)),
        None => Ok(()),
    }
}

#[async_trait]
impl MemoryStore for InMemoryStore {
    fn config(&self) -> &MemoryConfig {
        &self.config
    }

    async fn search(&self, queries: Vectors<'_>, k: usize, filter: Option<&TagFilter>) -> Result<Neighbors> {
        self.config.check_search(&queries, k)?;
        let st = self.lock();
        let mut out = Neighbors::empty(queries.len(), k, self.config.key_dim, self.config.value_dim);
        for i in 0..queries.len() {
            for (j, (d, m)) in nearest(&self.config, &st.mems, queries.row(i), k, filter)
                .into_iter()
                .enumerate()
            {
                out.set(i, j, m.id, d, &m.key, &m.value);
            }
        }
        Ok(out)
    }

    async fn insert(&self, batch: Batch<'_>, tick: Tick) -> Result<Vec<MemoryId>> {
        batch.check(&self.config)?;
        let mut st = self.lock();
        let mut ids = Vec::with_capacity(batch.len());
        for i in 0..batch.len() {
            let id = st.next_id;
            st.next_id += 1;
            let m = new_memory(id, batch.keys.row(i), batch.values.row(i), batch.tags.row(i), tick);
            st.mems.insert(id, m);
            ids.push(id);
        }
        st.counters.inserted += batch.len() as u64;
        if let Some(cap) = self.config.capacity {
            evict_to(self.lambda(), &mut st, cap);
        }
        Ok(ids)
    }

    async fn get(&self, ids: &[MemoryId]) -> Result<Vec<Memory>> {
        let st = self.lock();
        ids.iter()
            .map(|id| st.mems.get(id).cloned().ok_or(Error::UnknownId(*id)))
            .collect()
    }

    async fn delete(&self, ids: &[MemoryId]) -> Result<usize> {
        let mut st = self.lock();
        check_known(&st, ids)?;
        let unique: HashSet<MemoryId> = ids.iter().copied().collect();
        for id in &unique {
            st.mems.remove(id);
        }
        st.counters.deleted += unique.len() as u64;
        Ok(unique.len())
    }

    async fn update_values(&self, ids: &[MemoryId], deltas: Vectors<'_>) -> Result<()> {
        deltas.check("deltas", self.config.value_dim)?;
        if ids.len() != deltas.len() {
            return Err(Error::Shape(format!("{} ids but {} deltas", ids.len(), deltas.len())));
        }
        let mut st = self.lock();
        check_known(&st, ids)?;
        let new_values = math::apply_deltas(ids, deltas, |id| {
            st.mems.get(&id).map(|m| m.value.as_slice()).ok_or(Error::UnknownId(id))
        })?;
        for (id, v) in new_values {
            if let Some(m) = st.mems.get_mut(&id) {
                m.value = v;
            }
        }
        Ok(())
    }

    async fn touch(&self, ids: &[MemoryId], tick: Tick) -> Result<()> {
        let mut st = self.lock();
        check_known(&st, ids)?;
        let lambda = self.lambda();
        for id in ids {
            if let Some(m) = st.mems.get_mut(id) {
                access(lambda, m, tick);
            }
        }
        Ok(())
    }

    async fn learn(&self, batch: Batch<'_>, tick: Tick, k: usize) -> Result<Neighbors> {
        self.config.check_learn(&batch, k)?;
        let lambda = self.lambda();
        let cfg = &self.config;
        let mut st = self.lock();
        let mut out = Neighbors::empty(batch.len(), k, cfg.key_dim, cfg.value_dim);
        for i in 0..batch.len() {
            let key = batch.keys.row(i);
            let found: Vec<(f32, MemoryId)> = nearest(cfg, &st.mems, key, k, None)
                .into_iter()
                .enumerate()
                .map(|(j, (d, m))| {
                    out.set(i, j, m.id, d, &m.key, &m.value);
                    (d, m.id)
                })
                .collect();
            let close: Vec<(f32, MemoryId)> = found.iter().copied().filter(|(d, _)| *d < cfg.recombine).collect();
            let between: Vec<MemoryId> = found
                .iter()
                .filter(|(d, _)| *d >= cfg.recombine && *d <= cfg.novelty)
                .map(|(_, id)| *id)
                .collect();
            if !close.is_empty() {
                let sources: Vec<MergeSource<'_>> = close
                    .iter()
                    .map(|(d, id)| {
                        let m = &st.mems[id];
                        MergeSource {
                            distance: *d,
                            key: &m.key,
                            created: m.created,
                            last_access: m.last_access,
                            access_count: m.access_count,
                            crf: m.crf,
                            tags: &m.tags,
                        }
                    })
                    .collect();
                let merged = math::merge(lambda, key, batch.tags.row(i), tick, &sources);
                let value = math::weighted_mean(
                    batch.values.row(i),
                    merged
                        .weights
                        .iter()
                        .copied()
                        .zip(close.iter().map(|(_, id)| st.mems[id].value.as_slice())),
                );
                for (_, id) in &close {
                    st.mems.remove(id);
                }
                let id = st.next_id;
                st.next_id += 1;
                st.counters.merged += 1;
                st.mems.insert(
                    id,
                    Memory {
                        id,
                        key: merged.key,
                        value,
                        created: merged.created,
                        last_access: merged.last_access,
                        access_count: merged.access_count,
                        crf: merged.crf,
                        tags: merged.tags,
                    },
                );
            } else if found.iter().all(|(d, _)| *d > cfg.novelty) {
                let id = st.next_id;
                st.next_id += 1;
                st.counters.inserted += 1;
                st.mems
                    .insert(id, new_memory(id, key, batch.values.row(i), batch.tags.row(i), tick));
            }
            for id in between {
                if let Some(m) = st.mems.get_mut(&id) {
                    access(lambda, m, tick);
                }
            }
        }
        if let Some(cap) = cfg.capacity {
            evict_to(lambda, &mut st, cap);
        }
        Ok(out)
    }

    async fn evict(&self, target_len: usize) -> Result<usize> {
        let mut st = self.lock();
        Ok(evict_to(self.lambda(), &mut st, target_len))
    }

    async fn apply(&self, batch: &ChangeBatch) -> Result<()> {
        let cfg = &self.config;
        let lambda = self.lambda();
        let mut guard = self.lock();
        batch.check(cfg, guard.counters.last_batch, guard.next_id)?;
        // Work on a copy: a batch that fails half-way changes nothing.
        let mut st = guard.clone();
        check_known(&st, &batch.delete)?;
        let unique: HashSet<MemoryId> = batch.delete.iter().copied().collect();
        for id in &unique {
            st.mems.remove(id);
        }
        st.counters.deleted += unique.len() as u64;
        check_known(&st, &batch.update_ids)?;
        let new_values = math::apply_deltas(&batch.update_ids, batch.deltas(cfg)?, |id| {
            st.mems.get(&id).map(|m| m.value.as_slice()).ok_or(Error::UnknownId(id))
        })?;
        for (id, v) in new_values {
            if let Some(m) = st.mems.get_mut(&id) {
                m.value = v;
            }
        }
        check_known(&st, &batch.assign_ids)?;
        for (id, v) in batch
            .assign_ids
            .iter()
            .zip(batch.assign_values.chunks(cfg.value_dim.max(1)))
        {
            if let Some(m) = st.mems.get_mut(id) {
                m.value = v.to_vec();
            }
        }
        for (id, tag, count) in &batch.tag_counts {
            let m = st.mems.get_mut(id).ok_or(Error::UnknownId(*id))?;
            if *count == 0 {
                m.tags.remove(tag);
            } else {
                m.tags.insert(tag.clone(), *count);
            }
        }
        let inserts = batch.inserts(cfg)?;
        for i in 0..inserts.len() {
            let id = st.next_id;
            st.next_id += 1;
            let mut m = new_memory(
                id,
                inserts.keys.row(i),
                inserts.values.row(i),
                inserts.tags.row(i),
                batch.tick,
            );
            if let Some(meta) = batch.insert_meta.get(i) {
                m.created = meta.created;
                m.last_access = meta.last_access;
                m.access_count = meta.access_count;
                m.crf = meta.crf;
            }
            st.mems.insert(id, m);
        }
        st.counters.inserted += inserts.len() as u64;
        check_known(&st, &batch.touch)?;
        for id in &batch.touch {
            if let Some(m) = st.mems.get_mut(id) {
                access(lambda, m, batch.tick);
            }
        }
        if let Some(cap) = cfg.capacity {
            evict_to(lambda, &mut st, cap);
        }
        st.counters.last_batch = batch.seq;
        *guard = st;
        Ok(())
    }

    async fn ids(&self) -> Result<Vec<MemoryId>> {
        Ok(self.lock().mems.keys().copied().collect())
    }

    async fn len(&self) -> Result<usize> {
        Ok(self.lock().mems.len())
    }

    async fn stats(&self) -> Result<Stats> {
        let st = self.lock();
        let mut tag_counts = BTreeMap::new();
        let mut access_count_total = 0u64;
        for m in st.mems.values() {
            access_count_total += m.access_count;
            for (t, c) in &m.tags {
                *tag_counts.entry(t.clone()).or_insert(0) += c;
            }
        }
        Ok(Stats {
            len: st.mems.len() as u64,
            next_id: st.next_id,
            access_count_total,
            tag_counts,
            counters: st.counters,
        })
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}
