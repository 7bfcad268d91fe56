//! `DeviceMemory`: a layer's memories as device tensors — keys `[capacity, dk]`,
//! values `[capacity, dv]`, a validity mask and the store ids of the slots —
//! searched exactly on the device ([`super::device::exact_topk`]).
//!
//! The durable [`MemoryStore`] is the truth at rest; while a model trains, the
//! tier is ahead of it and records every change it makes — LRFU accesses,
//! sparse value updates, novelty inserts and the evictions that make room —
//! as one pending [`ChangeBatch`]. [`DeviceMemory::take_changes`] hands the
//! batch to a writer ([`super::journal::WriteBehind`]), which journals it
//! (unless its caller recovers from checkpoints) and applies it to the store
//! (a few batches per transaction), so after the
//! last batch the store holds exactly the memory the model ended with.
//!
//! Ids are the tier's to assign: it knows the store's next id, and the store
//! checks that a batch's inserts start there. Values change only by adding a
//! delta (on the device and, in the batch, in the store), so both hold the
//! same floats bit for bit. The tier never grows past its capacity: a full
//! tier evicts its lowest-LRFU-priority slot (the store's policy, same
//! arithmetic) among those already synced.
//!
//! A tier may be split into equal partitions of consecutive slots, one per
//! attention head: query row `i` of a `[positions · heads, dh]` search looks
//! only at partition `i % heads`, a new memory goes to its head's partition
//! (evicting within it), and each row the store receives carries the tag
//! `head:<h>` ([`head_tag`]), so that a reload puts every memory back in its
//! head's table and SQL can tell them apart.
//!
//! While the text of one source is written into the memory
//! ([`DeviceMemory::begin_source`], used by [`crate::continual`]), every
//! memory the tier inserts carries the source's tag, an older memory whose
//! value changes gains it (a tag count in the batch), and older memories
//! are protected: never evicted, recombined or accessed, so that what the
//! source wrote can be removed exactly.
//!
//! A tier with product keys ([`DeviceMemory::with_product_keys`]) keeps
//! each partition's memories on a grid of `n × n` cells and searches it in
//! `O(n)` per query ([`super::product`]); it takes new memories only on its
//! grid and does not recombine.
//!
//! Trainable values get the sparse update of Memory Layers at Scale (Berges
//! et al. 2024): only retrieved rows change. On the CPU backend a search
//! also makes the rows it retrieved a gradient leaf of their own, so the
//! backward pass writes a gradient of those rows ([`ValueGrad`]) rather than
//! of the whole table, and a step's cost does not grow with the table's
//! rows (a GPU's search keeps its indices on the device, so there the
//! gradient covers the table).

use crate::train::Below as _;
use rand_core::SeedableRng as _;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use burn::tensor::{Bool, Device, IndexingUpdateOp, Int, Tensor, TensorData};
use memstore_api::{ChangeBatch, InsertMeta, MemoryConfig, MemoryId, MemoryStore, Tick, Vectors, math};

use super::device::{on_cpu, partitioned_topk};
use super::product::ProductKeys;
use super::readback::{EXACT_INT, HostReads, HostValues, Span};
use crate::{DmtError, Result, cpu_i64, host_f32};

/// Ids fetched from the store per `get` call while loading.
const LOAD_CHUNK: usize = 4096;

/// The tag that names the head partition a memory belongs to.
pub fn head_tag(part: usize) -> String {
    format!("head:{part}")
}

/// The head partition a memory's tags name (`None`: no `head:` tag).
fn tagged_part(tags: &std::collections::BTreeMap<String, u64>) -> Option<usize> {
    tags.keys().find_map(|t| t.strip_prefix("head:")?.parse().ok())
}

/// Lifetime counts of a tier's changes (since it was created or loaded).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierCounters {
    /// New memories (novel inserts and fills; merged memories not counted).
    pub inserted: u64,
    /// Recombinations: merged memories created from sources.
    pub merged: u64,
    /// Memories evicted to make room.
    pub evicted: u64,
}

/// The result of a device search: `[m, k]` distances and slots, and the
/// gathered keys `[m, k, dk]` and values `[m, k, dv]`.
#[derive(Clone, Debug)]
pub struct DeviceNeighbors {
    /// Distances, nearest first; `+∞` for empty slots.
    pub distances: Tensor<2>,
    /// Slot indices into the tier.
    pub slots: Tensor<2, Int>,
    /// Keys of the found slots.
    pub keys: Tensor<3>,
    /// Values of the found slots.
    pub values: Tensor<3>,
}

/// How [`DeviceMemory::with_ablated_values`] changes a memory's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueAblation {
    /// Every value zero: the layer adds nothing.
    Zero,
    /// The values permuted at random among the memories of each partition
    /// (keys kept): retrieval still works, but returns other memories'
    /// values.
    Shuffle {
        /// Seed of the permutation.
        seed: u64,
    },
}

/// What one learning forward pass of a memory layer observed, as detached
/// device tensors: they are read back at [`DeviceMemory::commit`], once the
/// step's work is queued, so a forward pass never waits for the device.
#[derive(Clone, Debug)]
pub struct Observation {
    /// The search's queries `[n, dk]` (row `i` in partition `i % parts`):
    /// the keys of new memories.
    pub keys: Tensor<2>,
    /// The values new memories would hold, `[n, dv]` (`None`: the pass only
    /// records accesses, nothing is inserted or recombined).
    pub values: Option<Tensor<2>>,
    /// Distances of the found neighbours `[n, k]` (`+∞`: none).
    pub distances: Tensor<2>,
    /// Their slots `[n, k]`.
    pub slots: Tensor<2, Int>,
}

/// The slots the observations retrieved (neighbours that exist), reading
/// them from the device.
pub fn retrieved_slots(observed: Vec<Observation>) -> Result<Vec<usize>> {
    Ok(retrieved_and_nearest(observed)?.0)
}

/// The slots the observations retrieved (neighbours that exist) and each
/// query's distance to its nearest memory (`+∞`: none), with one read of
/// each observation from the device.
pub fn retrieved_and_nearest(observed: Vec<Observation>) -> Result<(Vec<usize>, Vec<f32>)> {
    let (mut slots, mut nearest) = (Vec::new(), Vec::new());
    for o in observed {
        let [_, k] = o.distances.dims();
        let d = host_f32(o.distances)?;
        let s = crate::host_i64(o.slots)?;
        nearest.extend(d.iter().step_by(k.max(1)).copied());
        slots.extend(
            s.iter()
                .zip(&d)
                .filter(|(_, d)| d.is_finite())
                .map(|(&s, _)| s as usize),
        );
    }
    Ok((slots, nearest))
}

/// Searches whose value rows may each become a gradient leaf of their own
/// before a [`DeviceMemory::take_value_grad`] takes them: more (searches
/// whose gradient nobody took) gather from the table itself.
const MAX_WINDOWS: usize = 8;

/// The gradient of a tier's values after a backward pass
/// ([`DeviceMemory::take_value_grad`]): over the whole table, or over the
/// rows its searches retrieved (every other row's gradient is zero).
#[derive(Clone, Debug)]
pub struct ValueGrad {
    /// The rows `grad` covers, ascending and distinct; `None`: every slot.
    rows: Option<Vec<usize>>,
    /// `[rows, dv]` (or `[capacity, dv]`).
    grad: Tensor<2>,
}

impl From<Tensor<2>> for ValueGrad {
    /// A gradient over the whole table (`[capacity, dv]`).
    fn from(grad: Tensor<2>) -> Self {
        ValueGrad { rows: None, grad }
    }
}

impl ValueGrad {
    /// The same gradient with `f` applied to its rows (e.g. a loss scale
    /// divided out).
    pub fn map(self, f: impl FnOnce(Tensor<2>) -> Tensor<2>) -> Self {
        ValueGrad {
            rows: self.rows,
            grad: f(self.grad),
        }
    }

    /// The rows the gradient covers (`None`: every slot).
    pub fn rows(&self) -> Option<&[usize]> {
        self.rows.as_deref()
    }

    /// The gradient over a table of `capacity` rows, zero where no search
    /// reached.
    pub fn dense(self, capacity: usize) -> Tensor<2> {
        match self.rows {
            None => self.grad,
            Some(rows) => {
                let inner = self.grad.inner();
                let [_, dv] = inner.dims();
                let idx = index_on(&rows, &inner.device());
                Tensor::<2>::zeros([capacity, dv], &inner.device()).select_assign(0, idx, inner, IndexingUpdateOp::Add)
            }
        }
    }

    /// `grad`'s rows for `slots` (ascending, distinct), on the inner device:
    /// zero for a slot the gradient does not cover.
    fn select(self, slots: &[usize]) -> Tensor<2> {
        let inner = self.grad.inner();
        let device = inner.device();
        let Some(rows) = self.rows else {
            return inner.select(0, index_on(slots, &device));
        };
        if rows == slots {
            // A step's commit asks for the rows its searches retrieved:
            // the gradient's own rows, in its order.
            return inner;
        }
        let zero = rows.len();
        let at: Vec<usize> = slots.iter().map(|s| rows.binary_search(s).unwrap_or(zero)).collect();
        let table = if at.contains(&zero) {
            let [_, dv] = inner.dims();
            Tensor::cat(vec![inner, Tensor::zeros([1, dv], &device)], 0)
        } else {
            inner
        };
        table.select(0, index_on(&at, &device))
    }
}

/// Rows of the value table one search gathered as a gradient leaf of its
/// own, so that the backward pass writes `[rows, dv]` instead of the whole
/// table's `[capacity, dv]`.
#[derive(Debug)]
struct Window {
    /// The slots, ascending and distinct.
    rows: Vec<usize>,
    /// Their values, `[rows, dv]`, requiring a gradient.
    leaf: Tensor<2>,
}

/// An index tensor of `slots` on `device`.
fn index_on(slots: &[usize], device: &Device) -> Tensor<1, Int> {
    Tensor::<1, Int>::from_data(
        TensorData::new(slots.iter().map(|&s| s as i64).collect::<Vec<_>>(), [slots.len()]),
        device,
    )
}

/// What a [`DeviceMemory::commit`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitCounts {
    /// Accesses recorded.
    pub accessed: usize,
    /// Recombined memories created.
    pub merged: usize,
    /// New memories inserted.
    pub inserted: usize,
}

/// What a layer observed since its last commit and how to learn from it:
/// the arguments of [`DeviceMemory::commit`].
#[derive(Debug)]
pub struct CommitRequest {
    /// The learning forward passes' observations.
    pub observed: Vec<Observation>,
    /// The step's tick.
    pub tick: Tick,
    /// At most this many merges and inserts.
    pub max_inserts: usize,
    /// The values' gradient and the sparse update's learning rate.
    pub value_grad: Option<(ValueGrad, f32)>,
}

/// An observation's distances and slots: gathered for a shared read, or
/// read already.
#[derive(Debug)]
enum Found {
    Pending(Span, Span),
    Read(Vec<f32>, Vec<i64>),
}

/// A commit after [`DeviceMemory::commit_gather`].
#[derive(Debug)]
pub struct CommitGathered {
    /// Per observation: rows, neighbours per row, where its distances and
    /// slots are, its keys and values.
    found: Vec<(usize, usize, Found, Tensor<2>, Option<Tensor<2>>)>,
    tick: Tick,
    max_inserts: usize,
    value_grad: Option<(ValueGrad, f32)>,
}

/// A commit after [`DeviceMemory::commit_plan`].
#[derive(Debug)]
pub struct CommitPlanned {
    tick: Tick,
    max_inserts: usize,
    accessed: usize,
    /// The slots the value update changes, where their deltas are, and
    /// the update (their rows' index and deltas, on the device).
    update: Option<(Vec<usize>, Span, Tensor<1, Int>, Tensor<2>)>,
    /// Close observations: where their (keys, values) are, their row
    /// there, the memories they recombine with.
    merges: Vec<((Span, Span), usize, Vec<MemoryId>)>,
    /// Novel observations: where their rows are, their row, their partition.
    novel: Vec<((Span, Span), usize, usize)>,
    /// The slots merges read, and where their keys and values are.
    wanted: Vec<usize>,
    sources: Option<(Span, Span)>,
}

/// A store answering a tier's searches itself (inference from the store
/// alone, for memories larger than a device's capacity).
#[derive(Clone)]
struct StoreBacking {
    store: Arc<dyn MemoryStore>,
    len: usize,
}

impl std::fmt::Debug for StoreBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreBacking({} memories)", self.len)
    }
}

/// Where loaded memories go: the first free slots of their partition, or
/// the slots a layout names.
#[derive(Clone, Copy)]
enum Slots<'a> {
    Fill(usize),
    Layout(&'a [Option<MemoryId>]),
}

/// A memory's working set on a device.
#[derive(Clone, Debug)]
pub struct DeviceMemory {
    store: Option<StoreBacking>,
    config: MemoryConfig,
    capacity: usize,
    /// Head partitions (1: one shared table).
    parts: usize,
    counters: TierCounters,
    /// Slots retrieved since [`DeviceMemory::take_retrieved_share`] last ran.
    retrieved: Vec<bool>,
    keys: Tensor<2>,
    values: Tensor<2>,
    valid: Vec<bool>,
    /// Memories in each partition.
    part_len: Vec<usize>,
    /// Per partition, a slot below which none is free (where the search
    /// for a free slot starts: filling a partition costs its slots, not
    /// their square).
    first_free: Vec<usize>,
    ids: Vec<Option<MemoryId>>,
    crf: Vec<f64>,
    last_access: Vec<Tick>,
    created: Vec<Tick>,
    access_count: Vec<u64>,
    slot_of: HashMap<MemoryId, usize>,
    next_id: MemoryId,
    last_batch: u64,
    pending: ChangeBatch,
    /// Accesses of each slot in the pending batch (its `touch` list is built
    /// from them at [`DeviceMemory::take_changes`]: a GPU-sized step touches
    /// hundreds of thousands of times, and dropping an evicted memory's
    /// touches from a list was a scan of it per eviction).
    touches: Vec<u64>,
    /// Sum of `touches`.
    touched: u64,
    trainable_values: bool,
    /// Values changed for an evaluation ([`DeviceMemory::with_ablated_values`]):
    /// the tier no longer describes its store and refuses to learn.
    ablated: bool,
    /// The source whose text the tier is learning ([`DeviceMemory::begin_source`]).
    source: Option<SourceMark>,
    /// The grid of a product-key tier ([`DeviceMemory::with_product_keys`]).
    product: Option<ProductKeys>,
    /// The value rows of searches since the last
    /// [`DeviceMemory::take_value_grad`] (shared by clones, as the autodiff
    /// graph that holds their leaves is).
    windows: Arc<Mutex<Vec<Window>>>,
    device: Device,
}

/// A source being written into a tier: its tag, the first id it may give
/// (memories below it are the source's predecessors, which it may change
/// the values of but never removes), and the older memories already
/// tagged with it.
#[derive(Clone, Debug)]
struct SourceMark {
    tag: String,
    first_id: MemoryId,
    tagged: std::collections::HashSet<MemoryId>,
}

impl DeviceMemory {
    /// An empty tier of `capacity` slots for a new, empty store (ids from 1).
    pub fn new(config: MemoryConfig, capacity: usize, device: &Device) -> Result<Self> {
        if capacity == 0 {
            return Err(DmtError::InvalidArgument(
                "a device tier needs at least one slot".into(),
            ));
        }
        if let Some(cap) = config.capacity
            && cap < capacity
        {
            return Err(DmtError::InvalidArgument(format!(
                "the store's capacity {cap} is below the device tier's {capacity} slots: the store would evict \
                 behind the tier's back"
            )));
        }
        Ok(DeviceMemory {
            store: None,
            keys: Tensor::zeros([capacity, config.key_dim], device),
            values: Tensor::zeros([capacity, config.value_dim], device),
            valid: vec![false; capacity],
            part_len: vec![0],
            first_free: vec![0],
            ids: vec![None; capacity],
            crf: vec![0.0; capacity],
            last_access: vec![0; capacity],
            created: vec![0; capacity],
            access_count: vec![0; capacity],
            slot_of: HashMap::new(),
            next_id: 1,
            last_batch: 0,
            pending: ChangeBatch {
                seq: 1,
                first_id: 1,
                ..ChangeBatch::default()
            },
            touches: vec![0; capacity],
            touched: 0,
            trainable_values: false,
            capacity,
            parts: 1,
            counters: TierCounters::default(),
            retrieved: vec![false; capacity],
            ablated: false,
            source: None,
            product: None,
            windows: Arc::default(),
            config,
            device: device.clone(),
        })
    }

    /// Splits an empty tier into `parts` equal partitions (one per head; see
    /// the module documentation). The capacity must divide evenly.
    pub fn with_parts(mut self, parts: usize) -> Result<Self> {
        if parts == 0 || !self.capacity.is_multiple_of(parts) {
            return Err(DmtError::InvalidArgument(format!(
                "{} slots do not split into {parts} head partitions",
                self.capacity
            )));
        }
        if !self.is_empty() {
            return Err(DmtError::InvalidArgument(
                "only an empty tier can be partitioned".into(),
            ));
        }
        let per = self.capacity / parts;
        self.parts = parts;
        self.part_len = vec![0; parts];
        self.first_free = (0..parts).map(|p| p * per).collect();
        Ok(self)
    }

    /// Makes this tier a product-key table ([`super::product`]): each
    /// partition's slots (a square number, `n²`) become the cells of an
    /// `n × n` grid, searched through `n` sub-keys per key half. The
    /// memories it holds already (a loaded store's) are put on the grid;
    /// refused when their keys are not products of at most `n` distinct
    /// halves each, or two share a cell, or the metric is cosine.
    pub fn with_product_keys(mut self) -> Result<Self> {
        if self.store.is_some() {
            return Err(DmtError::InvalidArgument(
                "product keys index a device tier, not a store-backed memory".into(),
            ));
        }
        let per = self.capacity / self.parts;
        let mut grid = ProductKeys::new(self.config.metric, self.config.key_dim, self.parts, per)?;
        if !self.is_empty() {
            let dk = self.config.key_dim;
            let keys = host_f32(self.keys.clone().inner())?;
            for s in (0..self.capacity).filter(|&s| self.valid[s]) {
                grid.place(s / per, &keys[s * dk..(s + 1) * dk], s)?;
            }
        }
        self.product = Some(grid);
        Ok(self)
    }

    /// The grid of a product-key tier.
    pub fn product_keys(&self) -> Option<&ProductKeys> {
        self.product.as_ref()
    }

    /// Loads every memory of `store` (keys, values, LRFU bookkeeping, its next
    /// id and last change batch) into a new tier of `capacity` slots, in id
    /// order; a store larger than the capacity is refused (serve it from the
    /// store's own index instead).
    pub async fn load<S: MemoryStore + ?Sized>(store: &S, capacity: usize, device: &Device) -> Result<Self> {
        Self::load_parts(store, capacity, 1, device).await
    }

    /// [`DeviceMemory::load`] into a tier of `parts` head partitions: each
    /// memory goes to the partition its `head:` tag names, in id order.
    pub async fn load_parts<S: MemoryStore + ?Sized>(
        store: &S,
        capacity: usize,
        parts: usize,
        device: &Device,
    ) -> Result<Self> {
        Self::load_rows(store, Slots::Fill(capacity), parts, device).await
    }

    /// Loads `store` with each memory in the slot `layout` names (as
    /// [`DeviceMemory::layout`] returned it), so a resumed run's tier is the
    /// interrupted one slot for slot; the layout must name every stored id
    /// once, each in its head's partition.
    pub async fn load_with_layout<S: MemoryStore + ?Sized>(
        store: &S,
        layout: &[Option<MemoryId>],
        parts: usize,
        device: &Device,
    ) -> Result<Self> {
        Self::load_rows(store, Slots::Layout(layout), parts, device).await
    }

    async fn load_rows<S: MemoryStore + ?Sized>(
        store: &S,
        slots: Slots<'_>,
        parts: usize,
        device: &Device,
    ) -> Result<Self> {
        let config = store.config().clone();
        let capacity = match slots {
            Slots::Fill(c) => c,
            Slots::Layout(l) => l.len(),
        };
        let mut tier = DeviceMemory::new(config.clone(), capacity, device)?.with_parts(parts)?;
        let mut stored = store.ids().await?;
        stored.sort_unstable();
        if stored.len() > capacity {
            return Err(DmtError::InvalidArgument(format!(
                "the store holds {} memories, more than the device tier's {capacity} slots",
                stored.len()
            )));
        }
        let slot_of_id: Option<HashMap<MemoryId, usize>> = match slots {
            Slots::Fill(_) => None,
            Slots::Layout(layout) => {
                let mut named: Vec<MemoryId> = layout.iter().flatten().copied().collect();
                named.sort_unstable();
                if stored != named {
                    return Err(DmtError::InvalidArgument(format!(
                        "the slot layout names {} memories, the store holds {} others",
                        named.len(),
                        stored.len()
                    )));
                }
                Some(
                    layout
                        .iter()
                        .enumerate()
                        .filter_map(|(s, id)| id.map(|id| (id, s)))
                        .collect(),
                )
            }
        };
        let stats = store.stats().await?;
        let (dk, dv) = (config.key_dim, config.value_dim);
        let mut keys = vec![0.0f32; capacity * dk];
        let mut values = vec![0.0f32; capacity * dv];
        let per = capacity / parts;
        let mut filled = vec![0usize; parts];
        for ids in stored.chunks(LOAD_CHUNK) {
            for m in store.get(ids).await? {
                let part = if parts == 1 {
                    0
                } else {
                    tagged_part(&m.tags).filter(|&p| p < parts).ok_or_else(|| {
                        DmtError::InvalidArgument(format!(
                            "memory {} names no head partition below {parts} (a head:<h> tag)",
                            m.id
                        ))
                    })?
                };
                let slot = match &slot_of_id {
                    Some(map) => {
                        let s = map.get(&m.id).copied().ok_or_else(|| {
                            DmtError::InvalidArgument(format!("the store returned memory {} unasked", m.id))
                        })?;
                        if s / per != part {
                            return Err(DmtError::InvalidArgument(format!(
                                "the slot layout puts memory {} of head {part} in slot {s}, outside its partition",
                                m.id
                            )));
                        }
                        s
                    }
                    None => {
                        if filled[part] == per {
                            return Err(DmtError::InvalidArgument(format!(
                                "head {part} has more memories than its {per} slots"
                            )));
                        }
                        filled[part] += 1;
                        part * per + filled[part] - 1
                    }
                };
                keys[slot * dk..(slot + 1) * dk].copy_from_slice(&m.key);
                values[slot * dv..(slot + 1) * dv].copy_from_slice(&m.value);
                tier.occupy(
                    slot,
                    m.id,
                    InsertMeta {
                        created: m.created,
                        last_access: m.last_access,
                        access_count: m.access_count,
                        crf: m.crf,
                    },
                );
            }
        }
        tier.keys = Tensor::from_data(TensorData::new(keys, [capacity, dk]), device);
        tier.values = Tensor::from_data(TensorData::new(values, [capacity, dv]), device);
        tier.next_id = stats.next_id;
        tier.last_batch = stats.counters.last_batch;
        tier.reset_pending();
        Ok(tier)
    }

    /// The store id of every slot (`None`: free), for [`DeviceMemory::load_with_layout`].
    pub fn layout(&self) -> Vec<Option<MemoryId>> {
        self.ids.clone()
    }

    /// Starts writing the text of the source `tag` into the tier (no
    /// changes may be pending). Until [`DeviceMemory::end_source`]: every
    /// memory the tier inserts or recombines carries `tag`; an older memory
    /// whose value changes gains `tag` (a tag count in the batch); and the
    /// older memories are protected — never evicted, recombined or
    /// accessed (their LRFU bookkeeping stays as it was), so that removing
    /// the source's memories and restoring the values it changed gives the
    /// memory back exactly.
    pub fn begin_source(&mut self, tag: &str) -> Result<()> {
        self.check_writable()?;
        if tag.is_empty() {
            return Err(DmtError::InvalidArgument("a source tag cannot be empty".into()));
        }
        if self.has_changes() {
            return Err(DmtError::InvalidArgument(
                "take the pending changes before starting a source".into(),
            ));
        }
        self.source = Some(SourceMark {
            tag: tag.to_string(),
            first_id: self.next_id,
            tagged: std::collections::HashSet::new(),
        });
        Ok(())
    }

    /// Ends the source [`DeviceMemory::begin_source`] started (no changes
    /// may be pending).
    pub fn end_source(&mut self) -> Result<()> {
        if self.has_changes() {
            return Err(DmtError::InvalidArgument(
                "take the pending changes before ending a source".into(),
            ));
        }
        self.source = None;
        Ok(())
    }

    /// Whether the memory `id` is protected from the current source (it is
    /// older than the source).
    fn protected(&self, id: MemoryId) -> bool {
        self.source.as_ref().is_some_and(|s| id < s.first_id)
    }

    /// Sets the novelty threshold of this tier's inserts (not the store's):
    /// an observation is inserted only when its nearest memory is farther.
    /// It may not fall below the recombination threshold.
    pub fn set_novelty(&mut self, novelty: f32) -> Result<()> {
        if !(novelty.is_finite() && novelty >= self.config.recombine) {
            return Err(DmtError::InvalidArgument(format!(
                "novelty threshold {novelty} is below the recombination threshold {}",
                self.config.recombine
            )));
        }
        self.config.novelty = novelty;
        Ok(())
    }

    /// The id the next new memory gets.
    pub fn next_id(&self) -> MemoryId {
        self.next_id
    }

    /// The latest tick any memory was created or accessed at (0: empty).
    pub fn latest_tick(&self) -> Tick {
        (0..self.capacity)
            .filter(|&s| self.valid[s])
            .map(|s| self.last_access[s].max(self.created[s]))
            .max()
            .unwrap_or(0)
    }

    /// The current values of the memories `ids` (host rows, in order).
    pub fn values_of(&self, ids: &[MemoryId]) -> Result<Vec<f32>> {
        let dv = self.config.value_dim;
        let slots = ids
            .iter()
            .map(|id| {
                self.slot(*id)
                    .ok_or_else(|| DmtError::InvalidArgument(format!("memory {id} is not in the tier")))
            })
            .collect::<Result<Vec<_>>>()?;
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        let all = host_f32(self.values.clone().inner())?;
        Ok(slots
            .iter()
            .flat_map(|&s| all[s * dv..(s + 1) * dv].iter().copied())
            .collect())
    }

    fn occupy(&mut self, slot: usize, id: MemoryId, m: InsertMeta) {
        if !self.valid[slot] {
            self.part_len[slot / (self.capacity / self.parts)] += 1;
        }
        self.valid[slot] = true;
        self.ids[slot] = Some(id);
        self.crf[slot] = m.crf;
        self.last_access[slot] = m.last_access;
        self.created[slot] = m.created;
        self.access_count[slot] = m.access_count;
        self.slot_of.insert(id, slot);
    }

    fn reset_pending(&mut self) {
        self.pending = ChangeBatch {
            seq: self.last_batch + 1,
            first_id: self.next_id,
            ..ChangeBatch::default()
        };
    }

    /// A read-only tier whose searches go to `store`'s own index on the CPU
    /// (the memory stays on disk; only the found rows reach the device), for
    /// inference with a memory larger than the device could hold; with
    /// `parts` head partitions, each head searches the memories tagged with
    /// it. It finds the same top-k as a device tier holding the same
    /// memories; it cannot learn (touch, update or insert), and its slots are
    /// meaningless.
    pub async fn from_store(store: Arc<dyn MemoryStore>, parts: usize, device: &Device) -> Result<Self> {
        let len = store.len().await?;
        let mut config = store.config().clone();
        config.capacity = None;
        let mut tier = DeviceMemory::new(config, parts.max(1), device)?.with_parts(parts)?;
        tier.store = Some(StoreBacking { store, len });
        Ok(tier)
    }

    /// Whether searches go to a store instead of device tensors.
    pub fn is_store_backed(&self) -> bool {
        self.store.is_some()
    }

    fn search_store(&self, b: &StoreBacking, queries: Tensor<2>, k: usize) -> Result<DeviceNeighbors> {
        let [m, dk] = queries.dims();
        let dv = self.config.value_dim;
        let parts = self.parts;
        if !m.is_multiple_of(parts) {
            return Err(DmtError::InvalidArgument(format!(
                "{m} queries do not split into {parts} head partitions"
            )));
        }
        let q = host_f32(queries)?;
        // Each partition's rows search the memories tagged with its head.
        let rows = m / parts;
        let per_part: Vec<Vec<f32>> = (0..parts)
            .map(|p| {
                (0..rows)
                    .flat_map(|r| {
                        let i = r * parts + p;
                        q[i * dk..(i + 1) * dk].iter().copied()
                    })
                    .collect()
            })
            .collect();
        // The store is async; a scoped thread with its own small runtime keeps
        // this callable from inside or outside an async runtime.
        let found = std::thread::scope(|s| {
            s.spawn(|| -> Result<Vec<memstore_api::Neighbors>> {
                let rt = crate::runtime()?;
                let mut out = Vec::with_capacity(parts);
                for (p, qp) in per_part.iter().enumerate() {
                    let v = Vectors::new(qp, dk)?;
                    let filter = (parts > 1).then(|| memstore_api::TagFilter::All(vec![head_tag(p)]));
                    out.push(rt.block_on(b.store.search(v, k, filter.as_ref()))?);
                }
                Ok(out)
            })
            .join()
        })
        .map_err(|_| DmtError::InvalidArgument("the store search thread panicked".into()))??;
        let (mut d, mut ids, mut keys, mut values) = (
            Vec::with_capacity(m * k),
            Vec::with_capacity(m * k),
            Vec::with_capacity(m * k * dk),
            Vec::with_capacity(m * k * dv),
        );
        for i in 0..m {
            let (f, r) = (&found[i % parts], i / parts);
            for j in 0..k {
                d.push(f.distance(r, j));
                // A store-backed tier has no slots: its "slots" are the ids
                // (-1: no memory), which `DeviceMemory::id` gives back.
                ids.push(f.id(r, j).and_then(|id| i64::try_from(id).ok()).unwrap_or(-1));
                keys.extend_from_slice(f.key(r, j));
                values.extend_from_slice(f.value(r, j));
            }
        }
        let dev = &self.device;
        Ok(DeviceNeighbors {
            distances: Tensor::from_data(TensorData::new(d, [m, k]), dev),
            slots: Tensor::from_data(TensorData::new(ids, [m, k]), dev),
            keys: Tensor::from_data(TensorData::new(keys, [m, k, dk]), dev),
            values: Tensor::from_data(TensorData::new(values, [m, k, dv]), dev),
        })
    }

    fn check_writable(&self) -> Result<()> {
        if self.ablated {
            return Err(DmtError::InvalidArgument(
                "a memory with ablated values is for evaluation only".into(),
            ));
        }
        match self.store {
            Some(_) => Err(DmtError::InvalidArgument(
                "a store-backed memory is read-only (load a device tier to learn)".into(),
            )),
            None => Ok(()),
        }
    }

    /// A copy of this tier, for evaluation, whose values are zeroed or
    /// shuffled among the memories of each partition (the ablations that
    /// show whether a layer's memory matters). It records nothing for the
    /// store and refuses to learn.
    pub fn with_ablated_values(&self, how: ValueAblation) -> Result<DeviceMemory> {
        if self.store.is_some() {
            return Err(DmtError::InvalidArgument(
                "ablate a device tier, not a store-backed memory".into(),
            ));
        }
        let dv = self.config.value_dim;
        let mut values = host_f32(self.values.clone())?;
        match how {
            ValueAblation::Zero => values.iter_mut().for_each(|v| *v = 0.0),
            ValueAblation::Shuffle { seed } => {
                let mut rng = crate::train::SplitMix64::seed_from_u64(seed);
                let per = self.capacity / self.parts;
                let old = values.clone();
                for p in 0..self.parts {
                    let slots: Vec<usize> = (p * per..(p + 1) * per).filter(|&s| self.valid[s]).collect();
                    let mut order = slots.clone();
                    // Fisher–Yates.
                    for i in (1..order.len()).rev() {
                        order.swap(i, rng.below(i + 1));
                    }
                    for (&to, &from) in slots.iter().zip(&order) {
                        values[to * dv..(to + 1) * dv].copy_from_slice(&old[from * dv..(from + 1) * dv]);
                    }
                }
            }
        }
        let mut t = self.clone();
        t.trainable_values = false;
        let inner = self.device.clone().inner();
        t.set_values(Tensor::from_data(TensorData::new(values, [self.capacity, dv]), &inner));
        t.ablated = true;
        Ok(t)
    }

    /// Number of memories (occupied slots, or the backing store's rows).
    pub fn len(&self) -> usize {
        match &self.store {
            Some(b) => b.len,
            None => self.slot_of.len(),
        }
    }

    /// Whether no slot is occupied.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The memory's configuration (dimensions, metric, thresholds).
    pub fn config(&self) -> &MemoryConfig {
        &self.config
    }

    /// The device the tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of head partitions (1: one shared table).
    pub fn parts(&self) -> usize {
        self.parts
    }

    /// Memories in each partition.
    pub fn part_lens(&self) -> Vec<usize> {
        self.part_len.clone()
    }

    /// Lifetime counts of inserts, merges and evictions.
    pub fn counters(&self) -> TierCounters {
        self.counters
    }

    /// The share of the memories held now that were accessed
    /// ([`DeviceMemory::touch`]) since the last call, which starts a new
    /// period (0 when the tier is empty).
    pub fn take_retrieved_share(&mut self) -> f64 {
        let held = self.valid.iter().filter(|v| **v).count();
        let used = self
            .valid
            .iter()
            .zip(&self.retrieved)
            .filter(|(v, r)| **v && **r)
            .count();
        self.retrieved.iter_mut().for_each(|r| *r = false);
        used as f64 / held.max(1) as f64
    }

    /// The store id in `slot`.
    pub fn id(&self, slot: usize) -> Option<MemoryId> {
        if self.store.is_some() {
            // Searches of a store-backed tier return ids as slots.
            return Some(slot as MemoryId);
        }
        self.ids.get(slot).copied().flatten()
    }

    /// The slot holding `id`.
    pub fn slot(&self, id: MemoryId) -> Option<usize> {
        self.slot_of.get(&id).copied()
    }

    /// The keys and values of every slot (zeros where empty).
    pub fn tensors(&self) -> (Tensor<2>, Tensor<2>) {
        (self.keys.clone(), self.values.clone())
    }

    /// Makes the values a gradient-tracked leaf (on an autodiff device), so a
    /// backward pass yields their gradient for [`DeviceMemory::apply_value_grad`].
    pub fn set_trainable_values(&mut self, trainable: bool) {
        self.trainable_values = trainable;
        self.values = self.values.clone().detach().set_require_grad(trainable);
    }

    /// Whether the values are a gradient-tracked leaf (sparse value updates).
    pub fn values_trainable(&self) -> bool {
        self.trainable_values
    }

    /// Fills an empty tier from flat host arrays (`n` rows of keys and values)
    /// as new memories inserted at `tick` (ids assigned from the next id),
    /// recorded in the pending batch. Refuses more rows than slots.
    pub fn fill(&mut self, keys: &[f32], values: &[f32], tick: Tick) -> Result<Vec<MemoryId>> {
        if !self.is_empty() {
            return Err(DmtError::InvalidArgument("fill needs an empty tier".into()));
        }
        let rows = keys.len() / self.config.key_dim.max(1);
        // Row i goes to partition i % parts: the rows fit when the first
        // partition's share does.
        if rows.div_ceil(self.parts) > self.capacity / self.parts {
            return Err(DmtError::InvalidArgument(format!(
                "{rows} rows do not fit a tier of {} slots in {} partitions",
                self.capacity, self.parts
            )));
        }
        let slots = self.insert(keys, values, tick)?;
        if slots.len() * self.config.key_dim != keys.len() {
            return Err(DmtError::InvalidArgument(format!(
                "{} rows do not fit a tier of {} slots",
                keys.len() / self.config.key_dim.max(1),
                self.capacity
            )));
        }
        Ok(slots.iter().filter_map(|&s| self.id(s)).collect())
    }

    /// Exact `k` nearest occupied slots of each query `[m, dk]` (row `i`
    /// within partition `i % parts`), with their keys and values gathered on
    /// the device (the values keep their gradient link when they are
    /// trainable). Where a partition holds fewer than `k` memories, the
    /// missing neighbours have distance `+∞` (their slots and rows are
    /// placeholders); `k` may not exceed a partition's slots.
    pub fn search(&self, queries: Tensor<2>, k: usize) -> Result<DeviceNeighbors> {
        let [m, _] = queries.dims();
        if let Some(b) = &self.store {
            if k == 0 || k > self.len() {
                return Err(DmtError::InvalidArgument(format!(
                    "k = {k} must be in 1..={} (the memories in the store)",
                    self.len()
                )));
            }
            return self.search_store(b, queries, k);
        }
        let (top, grid_keys) = match &self.product {
            Some(grid) => grid.topk_with_keys(queries, k)?,
            None => (
                partitioned_topk(
                    queries,
                    self.keys.clone(),
                    Some(&self.valid),
                    k,
                    self.config.metric,
                    self.parts,
                )?,
                None,
            ),
        };
        let flat = top.indices.clone().reshape([m * k]);
        let dk = self.config.key_dim;
        let keys = match grid_keys {
            // A grid's keys are its cells' (bit for bit the table's rows).
            Some(keys) => Tensor::<3>::from_data(TensorData::new(keys, [m, k, dk]), &self.device),
            None => self.keys.clone().select(0, flat.clone()).reshape([m, k, dk]),
        };
        let dv = self.config.value_dim;
        let values = if let Some(values) = self.window_values(&top.indices)? {
            values
        } else if self.trainable_values && !on_cpu(&self.device) {
            // On a GPU, gathered element-wise rather than selected by row: the
            // same rows, but a gather's gradient is a scatter-add, which
            // cubecl runs with one atomic add per element where the device
            // adds floats atomically, while a select's is a select-assign,
            // whose kernel has one unit per column (dv of them) walk all m·k
            // rows serially (m·k is 196,608 at 8 × 256 tokens, 12 heads,
            // k 8), which leaves a GPU nearly idle. On the CPU the select is
            // the faster (3.2× at that size; lavapipe 1.9×):
            // `cargo bench -p burn-dmt --features wgpu --bench tier -- value_gradient`.
            let idx = flat.reshape([m * k, 1]).expand([m * k, dv]);
            self.values.clone().gather(0, idx)
        } else {
            self.values.clone().select(0, flat)
        }
        .reshape([m, k, dv]);
        Ok(DeviceNeighbors {
            distances: top.distances,
            slots: top.indices,
            keys,
            values,
        })
    }

    /// Records accesses of `slots` at `tick` (LRFU, as the store's `touch`; a
    /// repeated slot is accessed repeatedly). Nothing changes when a slot is
    /// empty.
    pub fn touch(&mut self, slots: &[usize], tick: Tick) -> Result<()> {
        self.touch_distinct(slots, tick).map(|_| ())
    }

    /// [`DeviceMemory::touch`], returning the distinct slots named
    /// (ascending, protected ones included). The accesses are counted per
    /// slot first and the slots' records then updated in slot order, so each
    /// record is read once and in sequence: a step names tens of thousands
    /// of slots, and at random the records of a large table (a product-key
    /// table's 65,536 slots hold megabytes of them) miss the cache at every
    /// access. A slot's accesses are still applied one by one, so its LRFU
    /// arithmetic is the same as in call order (the store's; different
    /// slots' accesses do not interact).
    fn touch_distinct(&mut self, slots: &[usize], tick: Tick) -> Result<Vec<usize>> {
        self.check_writable()?;
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        self.check_tick(tick)?;
        if u32::try_from(slots.len()).is_err() {
            return Err(DmtError::InvalidArgument(format!(
                "{} accesses in one touch (at most {})",
                slots.len(),
                u32::MAX
            )));
        }
        let mut hits = vec![0u32; self.capacity];
        let distinct = self.count_hits(slots, &mut hits)?;
        let lambda = self.config.eviction.lambda();
        for &s in &distinct {
            if self.source.is_some() && self.id(s).is_some_and(|id| self.protected(id)) {
                continue;
            }
            let n = hits[s];
            self.retrieved[s] = true;
            let (mut crf, mut last) = (self.crf[s], self.last_access[s]);
            for _ in 0..n {
                (crf, last) = math::access(lambda, crf, last, tick);
            }
            self.crf[s] = crf;
            self.last_access[s] = last;
            self.access_count[s] = self.access_count[s].saturating_add(u64::from(n));
            self.touches[s] += u64::from(n);
            self.touched += u64::from(n);
        }
        self.pending.tick = self.pending.tick.max(tick);
        Ok(distinct)
    }

    /// Counts each slot's accesses among `slots` into `hits` (zeroed, one
    /// per slot) and returns the slots named, ascending; an error when a slot
    /// is out of range or empty.
    fn count_hits(&self, slots: &[usize], hits: &mut [u32]) -> Result<Vec<usize>> {
        for &s in slots {
            let h = hits
                .get_mut(s)
                .ok_or_else(|| DmtError::InvalidArgument(format!("slot {s} of {}", self.capacity)))?;
            *h += 1;
        }
        let mut distinct = Vec::new();
        for (s, &n) in hits.iter().enumerate() {
            if n > 0 {
                if self.id(s).is_none() {
                    return Err(DmtError::InvalidArgument(format!("slot {s} is empty")));
                }
                distinct.push(s);
            }
        }
        Ok(distinct)
    }

    /// The gradient of the trainable values after a backward pass (removed
    /// from `grads`), or `None` when the values took no part: on the CPU
    /// backend over the rows the searches since the last call retrieved
    /// (their union), elsewhere over the whole table.
    pub fn take_value_grad(&self, grads: &mut burn::tensor::Gradients) -> Option<ValueGrad> {
        let dense = self.values.grad_remove(grads);
        let windows = std::mem::take(&mut *self.windows.lock().unwrap_or_else(|e| e.into_inner()));
        let mut sparse: Vec<(Vec<usize>, Tensor<2>)> = windows
            .into_iter()
            .filter_map(|w| w.leaf.grad_remove(grads).map(|g| (w.rows, g)))
            .collect();
        if let Some(dense) = dense {
            // Searches past the window limit reached the table itself.
            let device = dense.device();
            let dense = sparse.into_iter().fold(dense, |d, (rows, g)| {
                d.select_assign(0, index_on(&rows, &device), g, IndexingUpdateOp::Add)
            });
            return Some(dense.into());
        }
        if sparse.len() <= 1 {
            return sparse.pop().map(|(rows, grad)| ValueGrad { rows: Some(rows), grad });
        }
        // Several searches (several forward passes): their rows' union.
        let mut all: Vec<usize> = sparse.iter().flat_map(|(rows, _)| rows.iter().copied()).collect();
        all.sort_unstable();
        all.dedup();
        let device = sparse[0].1.device();
        let grad = sparse.into_iter().fold(
            Tensor::<2>::zeros([all.len(), self.config.value_dim], &device),
            |acc, (rows, g)| {
                let at: Vec<usize> = rows.iter().map(|r| all.binary_search(r).unwrap_or_default()).collect();
                acc.select_assign(0, index_on(&at, &device), g, IndexingUpdateOp::Add)
            },
        );
        Some(ValueGrad { rows: Some(all), grad })
    }

    /// On the CPU backend, for trainable values on an autodiff device: the
    /// values of the slots `indices` (`[m, k]`; `[m · k, dv]`) gathered from the rows they
    /// name, which become a gradient leaf of their own (a [`Window`]), so
    /// that the backward pass writes a gradient of those rows only, not of
    /// the whole table (Memory Layers at Scale's sparse update: its cost
    /// should not grow with the table). `None`: gather from the table
    /// (another device, whose indices would have to be read back; values
    /// not trained; or [`MAX_WINDOWS`] searches whose gradient nobody
    /// took).
    fn window_values(&self, indices: &Tensor<2, Int>) -> Result<Option<Tensor<2>>> {
        if !self.trainable_values || !self.device.is_autodiff() || !on_cpu(&self.device) {
            return Ok(None);
        }
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() >= MAX_WINDOWS {
            return Ok(None);
        }
        // Indices of the CPU backend are host memory: no device read.
        let slots = cpu_i64(indices.clone())?;
        // Distinct slots by a mask and each one's row, as `value_rows`.
        let mut at = vec![u32::MAX; self.capacity];
        for &s in &slots {
            let s = usize::try_from(s)
                .ok()
                .filter(|&s| s < self.capacity)
                .ok_or_else(|| DmtError::InvalidArgument(format!("a search answered slot {s} of {}", self.capacity)))?;
            at[s] = 0;
        }
        let mut rows = Vec::new();
        for (s, a) in at.iter_mut().enumerate() {
            if *a == 0 {
                *a = rows.len() as u32;
                rows.push(s);
            }
        }
        let inner = self.device.clone().inner();
        let remap: Vec<i64> = slots.iter().map(|&s| at[s as usize] as i64).collect();
        let leaf = self
            .values
            .clone()
            .inner()
            .select(0, index_on(&rows, &inner))
            .autodiff()
            .set_require_grad(true);
        let n = remap.len();
        let values = leaf.clone().select(
            0,
            Tensor::<1, Int>::from_data(TensorData::new(remap, [n]), &self.device),
        );
        windows.push(Window { rows, leaf });
        Ok(Some(values))
    }

    /// The sparse value update of Memory Layers at Scale (`value_fixed_lr`):
    /// `value −= lr · grad` for the rows of `slots` (deduplicated), on the
    /// device and in the pending batch (as deltas).
    pub fn apply_value_grad(&mut self, grad: impl Into<ValueGrad>, lr: f32, slots: &[usize]) -> Result<()> {
        self.check_writable()?;
        let rows = self.value_rows(slots);
        if rows.is_empty() {
            return Ok(());
        }
        let (idx, delta) = self.value_delta(grad.into(), lr, &rows);
        let host = host_f32(delta.clone())?;
        self.record_deltas(&rows, &host)?;
        self.add_to_values(idx, delta);
        Ok(())
    }

    /// Adds `delta` to the value rows `idx` in place: the table is taken out
    /// of the tier for the update, so the device adds into its storage
    /// instead of copying the whole table (a tensor shared with another
    /// handle is copied first).
    fn add_to_values(&mut self, idx: Tensor<1, Int>, delta: Tensor<2>) {
        let placeholder = Tensor::<2>::zeros([1, self.config.value_dim], &self.device);
        let values = std::mem::replace(&mut self.values, placeholder).inner();
        self.set_values(values.select_assign(0, idx, delta, IndexingUpdateOp::Add));
    }

    /// The distinct valid slots among `slots`, ascending (a mask, not a
    /// sort: a GPU-sized step names hundreds of thousands of slots).
    fn value_rows(&self, slots: &[usize]) -> Vec<usize> {
        let mut named = vec![false; self.capacity];
        for &s in slots {
            if let Some(n) = named.get_mut(s) {
                *n = true;
            }
        }
        (0..self.capacity).filter(|&s| named[s] && self.valid[s]).collect()
    }

    /// The rows' index tensor and their delta `−lr · grad[rows]`, on the
    /// device (nothing read).
    fn value_delta(&self, grad: ValueGrad, lr: f32, rows: &[usize]) -> (Tensor<1, Int>, Tensor<2>) {
        let idx = self.index(rows);
        let delta = grad.select(rows).mul_scalar(-lr);
        (idx, delta)
    }

    /// A slot index tensor on the tier's device.
    fn index(&self, slots: &[usize]) -> Tensor<1, Int> {
        index_on(slots, &self.device.clone().inner())
    }

    /// Checks the host copy of the deltas of `rows` and records them in the
    /// pending batch (an insert not yet in the store changes its row; a
    /// stored memory gets a delta and, while a source is written, its tag).
    /// Nothing is recorded when a delta is not finite.
    fn record_deltas(&mut self, rows: &[usize], host: &[f32]) -> Result<()> {
        let dv = self.config.value_dim;
        if let Some(p) = host.iter().position(|x| !x.is_finite()) {
            return Err(DmtError::InvalidArgument(format!(
                "non-finite value gradient at slot {}",
                rows[p / dv.max(1)]
            )));
        }
        for (i, &s) in rows.iter().enumerate() {
            let id = self.ids[s].ok_or_else(|| DmtError::InvalidArgument(format!("slot {s} is empty")))?;
            let d = &host[i * dv..(i + 1) * dv];
            if d.iter().all(|x| *x == 0.0) {
                // Nothing changes (a row no retrieval reached): no update, no tag.
                continue;
            }
            if id >= self.pending.first_id {
                // Not in the store yet: change the row the batch will insert.
                let r = (id - self.pending.first_id) as usize;
                for (x, y) in self.pending.insert_values[r * dv..(r + 1) * dv].iter_mut().zip(d) {
                    *x += y;
                }
            } else {
                self.pending.update_ids.push(id);
                self.pending.deltas.extend_from_slice(d);
                if let Some(src) = self.source.as_mut()
                    && id < src.first_id
                    && src.tagged.insert(id)
                {
                    self.pending.tag_counts.push((id, src.tag.clone(), 1));
                }
            }
        }
        Ok(())
    }

    fn set_values(&mut self, inner: Tensor<2>) {
        let t = if self.device.is_autodiff() {
            inner.autodiff()
        } else {
            inner
        };
        self.values = t.set_require_grad(self.trainable_values);
    }

    /// The slot a new memory of partition `part` goes to: a free one, else
    /// the partition's lowest-priority synced memory, which is evicted
    /// (deleted in the pending batch).
    fn free_slot(&mut self, part: usize) -> Option<usize> {
        let per = self.capacity / self.parts;
        let range = part * per..(part + 1) * per;
        if let Some(s) = (self.first_free[part]..range.end).find(|&s| !self.valid[s]) {
            self.first_free[part] = s;
            return Some(s);
        }
        self.first_free[part] = range.end;
        let lambda = self.config.eviction.lambda();
        let first = self.pending.first_id;
        let victim = range
            .filter_map(|s| {
                self.ids[s]
                    .filter(|&id| id < first && !self.protected(id))
                    .map(|id| (s, id))
            })
            .min_by(|a, b| {
                let pa = math::priority(lambda, self.crf[a.0], self.last_access[a.0]);
                let pb = math::priority(lambda, self.crf[b.0], self.last_access[b.0]);
                pa.total_cmp(&pb).then(a.1.cmp(&b.1))
            })?;
        let (s, _) = victim;
        self.remove_synced(s);
        self.counters.evicted += 1;
        Some(s)
    }

    /// Removes the synced memory in slot `s` (deleted in the pending batch;
    /// its pending updates and touches dropped, since a batch deletes first).
    fn remove_synced(&mut self, s: usize) {
        let Some(id) = self.ids[s] else { return };
        if let Some(grid) = &mut self.product {
            grid.remove(s);
        }
        let part = s / (self.capacity / self.parts);
        self.part_len[part] -= 1;
        self.first_free[part] = self.first_free[part].min(s);
        self.valid[s] = false;
        self.ids[s] = None;
        self.slot_of.remove(&id);
        let dv = self.config.value_dim;
        let mut kept_ids = Vec::with_capacity(self.pending.update_ids.len());
        let mut kept = Vec::with_capacity(self.pending.deltas.len());
        for (i, &u) in self.pending.update_ids.iter().enumerate() {
            if u != id {
                kept_ids.push(u);
                kept.extend_from_slice(&self.pending.deltas[i * dv..(i + 1) * dv]);
            }
        }
        self.pending.update_ids = kept_ids;
        self.pending.deltas = kept;
        self.touched -= self.touches[s];
        self.touches[s] = 0;
        self.pending.delete.push(id);
    }

    /// Inserts new memories (host rows of keys and values) at `tick`, row
    /// `i` into partition `i % parts` (the row order of `[positions · heads,
    /// dh]` tensors), evicting by LRFU within a full partition. Returns the
    /// slots used, in row order; a row whose partition holds only memories
    /// not yet synced is skipped (fewer slots).
    pub fn insert(&mut self, keys: &[f32], values: &[f32], tick: Tick) -> Result<Vec<usize>> {
        let parts = self.parts;
        let rows = keys.len() / self.config.key_dim.max(1);
        let part_of: Vec<usize> = (0..rows).map(|i| i % parts).collect();
        self.insert_parts(keys, values, &part_of, tick)
    }

    /// [`DeviceMemory::insert`] with each row's partition given.
    pub fn insert_parts(&mut self, keys: &[f32], values: &[f32], parts: &[usize], tick: Tick) -> Result<Vec<usize>> {
        let placed = self.place_rows(keys, values, None, parts, tick)?;
        let (dk, dv) = (self.config.key_dim, self.config.value_dim);
        let (mut k, mut v) = (
            Vec::with_capacity(placed.len() * dk),
            Vec::with_capacity(placed.len() * dv),
        );
        for &(row, _) in &placed {
            k.extend_from_slice(&keys[row * dk..(row + 1) * dk]);
            v.extend_from_slice(&values[row * dv..(row + 1) * dv]);
        }
        let slots: Vec<usize> = placed.into_iter().map(|(_, s)| s).collect();
        self.write_rows(&slots, &k, &v);
        Ok(slots)
    }

    /// Between steps, what learning forward passes observed, as the store's
    /// `learn` does it: records the accesses of the neighbours found (LRFU),
    /// applies the sparse value update `value −= lr · grad` to them when a
    /// value gradient is given (trainable values), and, for observations
    /// with values, recombines each one closer than the recombination
    /// threshold with those memories ([`DeviceMemory::merge_many`]) and
    /// inserts each one farther than the novelty threshold from every memory
    /// of its partition, and from every memory inserted before it in this
    /// commit (near-duplicate observations of one batch become one memory):
    /// at most `max_inserts` merges and inserts together.
    pub fn commit(
        &mut self,
        observed: Vec<Observation>,
        tick: Tick,
        max_inserts: usize,
        value_grad: Option<(ValueGrad, f32)>,
    ) -> Result<CommitCounts> {
        self.commit_request(CommitRequest {
            observed,
            tick,
            max_inserts,
            value_grad,
        })
    }

    /// [`DeviceMemory::commit`] of a request, in two reads.
    pub fn commit_request(&mut self, request: CommitRequest) -> Result<CommitCounts> {
        let mut reads = HostReads::new();
        let gathered = self.commit_gather(request, &mut reads)?;
        let found = reads.read()?;
        let mut reads = HostReads::new();
        let planned = self.commit_plan(gathered, &found, &mut reads)?;
        let rows = reads.read()?;
        self.commit_finish(planned, &rows)
    }

    /// [`DeviceMemory::commit`] of `request`, first stage: gathers the
    /// observations' distances and slots into `reads` (nothing changes).
    /// Several tiers' stages share one read: gather each, read, then
    /// [`DeviceMemory::commit_plan`] each, read, then
    /// [`DeviceMemory::commit_finish`] each; a step then waits for the
    /// device twice, however many layers learn.
    pub fn commit_gather(&self, request: CommitRequest, reads: &mut HostReads) -> Result<CommitGathered> {
        let CommitRequest {
            observed,
            tick,
            max_inserts,
            value_grad,
        } = request;
        if self.product.is_some() && max_inserts > 0 {
            return Err(DmtError::InvalidArgument(
                "a product-key table does not learn new queries (their keys are not on its grid): commit with no \
                 inserts"
                    .into(),
            ));
        }
        let mut found = Vec::with_capacity(observed.len());
        for o in observed {
            let [n, k] = o.distances.dims();
            let at = if k > 0 && self.capacity >= EXACT_INT {
                // Slots beyond an f32's exact integers travel apart.
                Found::Read(host_f32(o.distances)?, crate::host_i64(o.slots)?)
            } else {
                Found::Pending(reads.push(o.distances)?, reads.push_int(o.slots)?)
            };
            found.push((n, k, at, o.keys, o.values));
        }
        Ok(CommitGathered {
            found,
            tick,
            max_inserts,
            value_grad,
        })
    }

    /// Second stage of a commit (see [`DeviceMemory::commit_gather`]), with
    /// the first read's `found`: records the accesses, queues the value
    /// update on the device, decides what is novel or close and gathers
    /// into `reads` those observations' keys and values, the value deltas
    /// and the rows merges read.
    pub fn commit_plan(
        &mut self,
        gathered: CommitGathered,
        found: &HostValues,
        reads: &mut HostReads,
    ) -> Result<CommitPlanned> {
        let (novelty, recombine) = (self.config.novelty, self.config.recombine);
        let CommitGathered {
            found: observed,
            tick,
            max_inserts,
            value_grad,
        } = gathered;
        let mut touched = Vec::new();
        let (mut merges, mut novel_rows) = (Vec::new(), Vec::new());
        for (n, kk, at, keys, values) in observed {
            let (distances, slots): (Vec<f32>, Vec<i64>) = match at {
                Found::Read(d, s) => (d, s),
                Found::Pending(d, s) => (found.get(d).to_vec(), found.get(s).iter().map(|&x| x as i64).collect()),
            };
            touched.extend(
                slots
                    .iter()
                    .zip(&distances)
                    .filter(|(_, d)| d.is_finite())
                    .map(|(&s, _)| s as usize),
            );
            let Some(values) = values else { continue };
            let novel: Vec<usize> = (0..n).filter(|&i| kk > 0 && distances[i * kk] > novelty).collect();
            let close: Vec<usize> = (0..n).filter(|&i| kk > 0 && distances[i * kk] < recombine).collect();
            if novel.is_empty() && close.is_empty() {
                continue;
            }
            // Only the rows that become memories travel.
            let mut picked: Vec<usize> = close.iter().chain(&novel).copied().collect();
            picked.sort_unstable();
            picked.dedup();
            let idx = self.index(&picked);
            let spans = (
                reads.push(keys.inner().select(0, idx.clone()))?,
                reads.push(values.inner().select(0, idx))?,
            );
            let at = |i: usize| picked.binary_search(&i).unwrap_or_default();
            for i in close {
                let sources: Vec<MemoryId> = (0..kk)
                    .filter(|&j| distances[i * kk + j] < recombine)
                    .filter_map(|j| self.id(slots[i * kk + j] as usize))
                    .collect();
                merges.push((spans, at(i), sources));
            }
            for i in novel {
                novel_rows.push((spans, at(i), i % self.parts));
            }
        }
        let named = self.touch_distinct(&touched, tick)?;
        let mut update = None;
        if let Some((g, lr)) = value_grad {
            let rows: Vec<usize> = named.into_iter().filter(|&s| self.valid[s]).collect();
            if !rows.is_empty() {
                let (idx, delta) = self.value_delta(g, lr, &rows);
                let span = reads.push(delta.clone())?;
                update = Some((rows, span, idx, delta));
            }
        }
        let wanted = self.merge_sources(merges.iter().map(|(_, _, sources)| &sources[..]));
        let sources = if wanted.is_empty() || max_inserts == 0 || merges.is_empty() {
            None
        } else {
            // The sources' values after this step's update (a copy of the
            // table: the update itself waits for its deltas to be checked).
            let values = match &update {
                Some((_, _, idx, delta)) => {
                    self.values
                        .clone()
                        .inner()
                        .select_assign(0, idx.clone(), delta.clone(), IndexingUpdateOp::Add)
                }
                None => self.values.clone().inner(),
            };
            let idx = self.index(&wanted);
            Some((
                reads.push(self.keys.clone().inner().select(0, idx.clone()))?,
                reads.push(values.select(0, idx))?,
            ))
        };
        Ok(CommitPlanned {
            tick,
            max_inserts,
            accessed: touched.len(),
            update,
            merges,
            novel: novel_rows,
            wanted,
            sources,
        })
    }

    /// Last stage of a commit (see [`DeviceMemory::commit_gather`]), with
    /// the second read's `rows`: applies the value update (refused, with
    /// nothing changed, when a delta is not finite), recombines the close
    /// observations with their neighbours and inserts the novel ones.
    pub fn commit_finish(&mut self, planned: CommitPlanned, rows: &HostValues) -> Result<CommitCounts> {
        let (dk, dv) = (self.config.key_dim, self.config.value_dim);
        let (novelty, metric) = (self.config.novelty, self.config.metric);
        let CommitPlanned {
            tick,
            max_inserts,
            accessed,
            update,
            merges,
            novel,
            wanted,
            sources,
        } = planned;
        if let Some((slots, span, idx, delta)) = update {
            self.record_deltas(&slots, rows.get(span))?;
            self.add_to_values(idx, delta);
        }
        let row = |(k, v): (Span, Span), i: usize| {
            let (k, v) = (rows.get(k), rows.get(v));
            (&k[i * dk..(i + 1) * dk], &v[i * dv..(i + 1) * dv])
        };
        let items: Vec<(Vec<f32>, Vec<f32>, Vec<MemoryId>)> = merges
            .into_iter()
            .map(|(spans, i, sources)| {
                let (k, v) = row(spans, i);
                (k.to_vec(), v.to_vec(), sources)
            })
            .collect();
        let (skeys, svalues) = sources.map_or((&[][..], &[][..]), |(k, v)| (rows.get(k), rows.get(v)));
        let merged = if items.is_empty() {
            0
        } else {
            self.merge_read(&items, tick, max_inserts, &wanted, skeys, svalues)?
                .len()
        };
        let (mut keys, mut values, mut kept_parts) = (Vec::new(), Vec::new(), Vec::new());
        for (spans, i, part) in novel {
            if merged + kept_parts.len() >= max_inserts {
                break;
            }
            let (key, value) = row(spans, i);
            let far = keys
                .chunks(dk)
                .zip(&kept_parts)
                .filter(|(_, p)| **p == part)
                .all(|(o, _): (&[f32], _)| math::distance(metric, key, o) > novelty);
            if far {
                keys.extend_from_slice(key);
                values.extend_from_slice(value);
                kept_parts.push(part);
            }
        }
        let inserted = self.insert_parts(&keys, &values, &kept_parts, tick)?.len();
        Ok(CommitCounts {
            accessed,
            merged,
            inserted,
        })
    }

    /// Recombines memories `sources` (synced, present) with an observation
    /// (`key`, `value`) at `tick`, as the store's `learn` merges
    /// near-duplicates ([`math::merge`]: exp(−d)-weighted means, the
    /// observation weighing 1, oldest creation, counts summed, CRFs combined):
    /// the sources are deleted and the merged memory is inserted with their
    /// history (accesses recorded earlier in the same step included). Returns
    /// its slot, or `None` (nothing changed) when a source is gone or not yet
    /// in the store.
    pub fn merge(&mut self, sources: &[MemoryId], key: &[f32], value: &[f32], tick: Tick) -> Result<Option<usize>> {
        let item = (key.to_vec(), value.to_vec(), sources.to_vec());
        Ok(self.merge_many(std::slice::from_ref(&item), tick, 1)?.first().copied())
    }

    /// [`DeviceMemory::merge`] for each `(key, value, sources)` in order,
    /// until `limit` merges are done, with one device read of the source rows
    /// and one device write of the merged rows for all of them (a merge per
    /// call cost two read-backs and a rewrite of both tables). An item whose
    /// sources an earlier item merged away is skipped, as a later `merge`
    /// call would skip it. Returns the slots of the merged memories, in order.
    pub fn merge_many(
        &mut self,
        items: &[(Vec<f32>, Vec<f32>, Vec<MemoryId>)],
        tick: Tick,
        limit: usize,
    ) -> Result<Vec<usize>> {
        self.check_writable()?;
        if self.product.is_some() && limit > 0 && !items.is_empty() {
            return Err(DmtError::InvalidArgument(
                "a product-key table does not recombine memories (a merged key would lie between its cells)".into(),
            ));
        }
        let wanted = self.merge_sources(items.iter().map(|(_, _, sources)| &sources[..]));
        let (skeys, svalues) = if wanted.is_empty() || limit == 0 {
            (Vec::new(), Vec::new())
        } else {
            let idx = self.index(&wanted);
            let rows = |t: &Tensor<2>| host_f32(t.clone().inner().select(0, idx.clone()));
            (rows(&self.keys)?, rows(&self.values)?)
        };
        self.merge_read(items, tick, limit, &wanted, &skeys, &svalues)
    }

    /// The slots of the merges' sources that are in the tier, ascending and
    /// distinct: the rows a merge reads. A memory's row does not change
    /// while merges are placed (merged rows go to new memories, which are
    /// never sources), so every source row is read once, before the first.
    fn merge_sources<'a>(&self, sources: impl Iterator<Item = &'a [MemoryId]>) -> Vec<usize> {
        let mut wanted: Vec<usize> = sources.flat_map(|s| s.iter().filter_map(|id| self.slot(*id))).collect();
        wanted.sort_unstable();
        wanted.dedup();
        wanted
    }

    /// [`DeviceMemory::merge_many`] with the rows of `wanted`
    /// ([`DeviceMemory::merge_sources`]) already read: `skeys`, `svalues`
    /// (empty when `limit` is 0 or nothing is wanted).
    fn merge_read(
        &mut self,
        items: &[(Vec<f32>, Vec<f32>, Vec<MemoryId>)],
        tick: Tick,
        limit: usize,
        wanted: &[usize],
        skeys: &[f32],
        svalues: &[f32],
    ) -> Result<Vec<usize>> {
        let (dk, dv) = (self.config.key_dim, self.config.value_dim);
        let row = |s: usize| wanted.binary_search(&s).ok();
        let (mut placed, mut new_keys, mut new_values) = (Vec::new(), Vec::new(), Vec::new());
        let mut plan = || -> Result<()> {
            for (key, value, sources) in items {
                if placed.len() >= limit {
                    break;
                }
                if key.len() != dk || value.len() != dv {
                    return Err(DmtError::InvalidArgument(format!(
                        "a merged observation of {}/{} dims for memories of {dk}/{dv}",
                        key.len(),
                        value.len()
                    )));
                }
                let mut slots = Vec::with_capacity(sources.len());
                let mut usable = true;
                for id in sources {
                    match self.slot(*id) {
                        Some(s) if *id < self.pending.first_id && !self.protected(*id) && !slots.contains(&s) => {
                            slots.push(s)
                        }
                        _ => {
                            usable = false;
                            break;
                        }
                    }
                }
                if !usable || slots.is_empty() {
                    continue;
                }
                self.check_tick(tick)?;
                let mut rows = Vec::with_capacity(slots.len());
                for &s in &slots {
                    let r = row(s).ok_or_else(|| DmtError::InvalidArgument(format!("slot {s} was not read")))?;
                    rows.push(r);
                }
                let no_tags = std::collections::BTreeMap::new();
                let src: Vec<math::MergeSource<'_>> = slots
                    .iter()
                    .zip(&rows)
                    .map(|(&s, &r)| {
                        let k = &skeys[r * dk..(r + 1) * dk];
                        math::MergeSource {
                            distance: math::distance(self.config.metric, key, k),
                            key: k,
                            created: self.created[s],
                            last_access: self.last_access[s],
                            access_count: self.access_count[s],
                            crf: self.crf[s],
                            tags: &no_tags,
                        }
                    })
                    .collect();
                let merged = math::merge(self.config.eviction.lambda(), key, &[], tick, &src);
                let mvalue = math::weighted_mean(
                    value,
                    merged
                        .weights
                        .iter()
                        .copied()
                        .zip(rows.iter().map(|&r| &svalues[r * dv..(r + 1) * dv])),
                );
                if mvalue.iter().chain(&merged.key).any(|x| !x.is_finite()) {
                    return Err(DmtError::InvalidArgument("a merge produced a non-finite number".into()));
                }
                for &s in &slots {
                    self.remove_synced(s);
                }
                let meta = InsertMeta {
                    created: merged.created,
                    last_access: merged.last_access,
                    access_count: merged.access_count,
                    crf: merged.crf,
                };
                let part = slots[0] / (self.capacity / self.parts);
                for (_, s) in self.place_rows(&merged.key, &mvalue, Some(&[meta]), &[part], tick)? {
                    placed.push(s);
                    new_keys.extend_from_slice(&merged.key);
                    new_values.extend_from_slice(&mvalue);
                }
            }
            Ok(())
        };
        let planned = plan();
        // The rows placed before an error are written too, so the device
        // tables always match the bookkeeping.
        self.write_rows(&placed, &new_keys, &new_values);
        planned.map(|()| placed)
    }

    /// The bookkeeping of an insert (slots, ids, LRFU state, the pending
    /// batch) without the device write: `(row, slot)` of each row placed, in
    /// row order (a row whose partition has no free or evictable slot is
    /// skipped); [`DeviceMemory::write_rows`] must follow with those rows.
    /// Rows with `metas` are recombined memories, the others new ones.
    fn place_rows(
        &mut self,
        keys: &[f32],
        values: &[f32],
        metas: Option<&[InsertMeta]>,
        parts: &[usize],
        tick: Tick,
    ) -> Result<Vec<(usize, usize)>> {
        self.check_writable()?;
        let (dk, dv) = (self.config.key_dim, self.config.value_dim);
        let n = keys.len() / dk.max(1);
        if keys.len() != n * dk || values.len() != n * dv {
            return Err(DmtError::InvalidArgument(format!(
                "{} key floats and {} value floats are not rows of {dk} and {dv}",
                keys.len(),
                values.len()
            )));
        }
        if parts.len() != n {
            return Err(DmtError::InvalidArgument(format!(
                "{} partitions named for {n} rows",
                parts.len()
            )));
        }
        if let Some(p) = parts.iter().find(|&&p| p >= self.parts) {
            return Err(DmtError::InvalidArgument(format!(
                "partition {p} of a tier of {}",
                self.parts
            )));
        }
        if let Some(p) = keys.iter().chain(values).position(|x| !x.is_finite()) {
            return Err(DmtError::InvalidArgument(format!(
                "non-finite number at {p} in new memories"
            )));
        }
        if n > 0 {
            self.check_tick(tick)?;
        }
        if let Some(grid) = self.product.as_ref().filter(|_| n > 0) {
            // Every row on the grid first, so a refused one changes nothing.
            // A partition's slots are its cells: a row with a free cell has
            // a free slot, and nothing is evicted.
            if metas.is_some() {
                return Err(DmtError::InvalidArgument(
                    "a product-key table does not recombine memories (a merged key would lie between its cells)".into(),
                ));
            }
            let mut trial = grid.clone();
            for i in 0..n {
                trial.place(parts[i], &keys[i * dk..(i + 1) * dk], self.capacity + i)?;
            }
        }
        let mut placed = Vec::with_capacity(n);
        for i in 0..n {
            let Some(s) = self.free_slot(parts[i]) else { continue };
            if let Some(grid) = &mut self.product {
                grid.place(parts[i], &keys[i * dk..(i + 1) * dk], s)?;
            }
            let id = self.next_id;
            self.next_id += 1;
            let meta = metas.and_then(|m| m.get(i).copied()).unwrap_or(InsertMeta {
                created: tick,
                last_access: tick,
                access_count: 1,
                crf: 1.0,
            });
            self.occupy(s, id, meta);
            self.pending.insert_meta.push(meta);
            self.pending.insert_keys.extend_from_slice(&keys[i * dk..(i + 1) * dk]);
            self.pending
                .insert_values
                .extend_from_slice(&values[i * dv..(i + 1) * dv]);
            let mut tags = Vec::new();
            if self.parts > 1 {
                tags.push(head_tag(parts[i]));
            }
            if let Some(src) = &self.source {
                tags.push(src.tag.clone());
            }
            if !tags.is_empty() {
                self.pending.insert_tags.push(tags);
            }
            self.pending.tick = self.pending.tick.max(tick);
            if metas.is_some() {
                self.counters.merged += 1;
            } else {
                self.counters.inserted += 1;
            }
            placed.push((i, s));
        }
        Ok(placed)
    }

    /// Writes rows of keys and values into distinct `slots` of the device
    /// tables, in one scatter per table.
    fn write_rows(&mut self, slots: &[usize], keys: &[f32], values: &[f32]) {
        let m = slots.len();
        if m == 0 {
            return;
        }
        let (dk, dv) = (self.config.key_dim, self.config.value_dim);
        let inner = self.device.clone().inner();
        let idx = Tensor::<1, Int>::from_data(
            TensorData::new(slots.iter().map(|&s| s as i64).collect::<Vec<_>>(), [m]),
            &inner,
        );
        let mut mask = vec![false; self.capacity];
        for &s in slots {
            mask[s] = true;
        }
        let mask = Tensor::<1, Bool>::from_data(TensorData::new(mask, [self.capacity]), &inner);
        let put = |table: Tensor<2>, rows: &[f32], d: usize| {
            let new = Tensor::<2>::from_data(TensorData::new(rows.to_vec(), [m, d]), &inner);
            let scattered = Tensor::<2>::zeros([self.capacity, d], &inner).select_assign(
                0,
                idx.clone(),
                new,
                IndexingUpdateOp::Add,
            );
            let rowmask = mask.clone().unsqueeze_dim::<2>(1).expand([self.capacity, d]);
            table.inner().mask_where(rowmask, scattered)
        };
        let keys_new = put(self.keys.clone(), &keys[..m * dk], dk);
        let values_new = put(self.values.clone(), &values[..m * dv], dv);
        self.keys = if self.device.is_autodiff() {
            keys_new.autodiff()
        } else {
            keys_new
        };
        self.set_values(values_new);
    }

    /// A batch carries one tick: accesses at another tick need the pending
    /// changes taken first (the store would apply them at the batch's tick).
    fn check_tick(&self, tick: Tick) -> Result<()> {
        let p = &self.pending;
        if (self.touched > 0 || !p.insert_keys.is_empty()) && p.tick != tick {
            return Err(DmtError::InvalidArgument(format!(
                "changes at tick {} are pending: take them before accessing at tick {tick}",
                p.tick
            )));
        }
        Ok(())
    }

    /// Whether changes are waiting for the store.
    pub fn has_changes(&self) -> bool {
        let p = &self.pending;
        !(p.delete.is_empty()
            && p.update_ids.is_empty()
            && self.touched == 0
            && p.insert_keys.is_empty()
            && p.tag_counts.is_empty())
    }

    /// Takes the pending changes as the next batch for the store (`None` when
    /// nothing changed; accesses listed by slot, a memory's repeated). The
    /// caller must apply the batches in order.
    pub fn take_changes(&mut self) -> Option<ChangeBatch> {
        if !self.has_changes() {
            return None;
        }
        let mut batch = std::mem::take(&mut self.pending);
        // Accesses in slot order (the store's arithmetic is per memory, so the
        // order of different memories' accesses does not matter).
        batch.touch.reserve(self.touched as usize);
        for (s, n) in self.touches.iter_mut().enumerate() {
            if *n > 0 {
                if let Some(id) = self.ids[s] {
                    batch.touch.extend(std::iter::repeat_n(id, *n as usize));
                }
                *n = 0;
            }
        }
        self.touched = 0;
        self.last_batch = batch.seq;
        self.reset_pending();
        Some(batch)
    }
}
