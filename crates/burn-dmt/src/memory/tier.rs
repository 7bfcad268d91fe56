//! `DeviceMemory`: a layer's memories as device tensors — keys `[capacity, dk]`,
//! values `[capacity, dv]`, a validity mask and the store ids of the slots —
//! searched exactly on the device ([`super::device::exact_topk`]).
//!
//! The durable [`MemoryStore`] is the truth; a device tier is loaded from it
//! and never grows past its configured capacity.

use std::collections::HashMap;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use memstore_api::{MemoryConfig, MemoryId, MemoryStore};

use super::device::exact_topk;
use crate::{DmtError, Result};

/// Ids fetched from the store per `get` call while loading.
const LOAD_CHUNK: usize = 4096;

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

/// A memory's working set on a device.
#[derive(Clone, Debug)]
pub struct DeviceMemory {
    config: MemoryConfig,
    capacity: usize,
    keys: Tensor<2>,
    values: Tensor<2>,
    valid: Vec<bool>,
    ids: Vec<Option<MemoryId>>,
    slot_of: HashMap<MemoryId, usize>,
    device: Device,
}

impl DeviceMemory {
    /// An empty tier of `capacity` slots.
    pub fn new(config: MemoryConfig, capacity: usize, device: &Device) -> Result<Self> {
        if capacity == 0 {
            return Err(DmtError::InvalidArgument(
                "a device tier needs at least one slot".into(),
            ));
        }
        Ok(DeviceMemory {
            keys: Tensor::zeros([capacity, config.key_dim], device),
            values: Tensor::zeros([capacity, config.value_dim], device),
            valid: vec![false; capacity],
            ids: vec![None; capacity],
            slot_of: HashMap::new(),
            capacity,
            config,
            device: device.clone(),
        })
    }

    /// Loads every memory of `store` into a new tier of `capacity` slots; a
    /// store larger than the capacity is refused (serve it from the store's
    /// own index instead).
    pub async fn load<S: MemoryStore + ?Sized>(store: &S, capacity: usize, device: &Device) -> Result<Self> {
        let config = store.config().clone();
        let ids = store.ids().await?;
        if ids.len() > capacity {
            return Err(DmtError::InvalidArgument(format!(
                "the store holds {} memories, more than the device tier's {capacity} slots",
                ids.len()
            )));
        }
        let (dk, dv) = (config.key_dim, config.value_dim);
        let mut keys = vec![0.0f32; capacity * dk];
        let mut values = vec![0.0f32; capacity * dv];
        let mut tier = DeviceMemory::new(config, capacity, device)?;
        let mut slot = 0;
        for chunk in ids.chunks(LOAD_CHUNK) {
            for m in store.get(chunk).await? {
                keys[slot * dk..(slot + 1) * dk].copy_from_slice(&m.key);
                values[slot * dv..(slot + 1) * dv].copy_from_slice(&m.value);
                tier.valid[slot] = true;
                tier.ids[slot] = Some(m.id);
                tier.slot_of.insert(m.id, slot);
                slot += 1;
            }
        }
        tier.keys = Tensor::from_data(TensorData::new(keys, [capacity, dk]), device);
        tier.values = Tensor::from_data(TensorData::new(values, [capacity, dv]), device);
        Ok(tier)
    }

    /// Number of occupied slots.
    pub fn len(&self) -> usize {
        self.slot_of.len()
    }

    /// Whether no slot is occupied.
    pub fn is_empty(&self) -> bool {
        self.slot_of.is_empty()
    }

    /// The memory's configuration (dimensions, metric).
    pub fn config(&self) -> &MemoryConfig {
        &self.config
    }

    /// Fills the tier from flat host arrays (`n` rows of keys and values, ids
    /// in row order); refuses more rows than slots.
    pub fn fill(&mut self, ids: &[MemoryId], keys: &[f32], values: &[f32]) -> Result<()> {
        let (dk, dv) = (self.config.key_dim, self.config.value_dim);
        let n = ids.len();
        if n > self.capacity || keys.len() != n * dk || values.len() != n * dv {
            return Err(DmtError::InvalidArgument(format!(
                "{n} ids, {} key floats, {} value floats for a tier of {} slots of {dk}/{dv}",
                keys.len(),
                values.len(),
                self.capacity
            )));
        }
        let mut k = keys.to_vec();
        k.resize(self.capacity * dk, 0.0);
        let mut v = values.to_vec();
        v.resize(self.capacity * dv, 0.0);
        self.keys = Tensor::from_data(TensorData::new(k, [self.capacity, dk]), &self.device);
        self.values = Tensor::from_data(TensorData::new(v, [self.capacity, dv]), &self.device);
        self.valid = (0..self.capacity).map(|i| i < n).collect();
        self.ids = (0..self.capacity).map(|i| ids.get(i).copied()).collect();
        self.slot_of = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        Ok(())
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The store id in `slot`.
    pub fn id(&self, slot: usize) -> Option<MemoryId> {
        self.ids.get(slot).copied().flatten()
    }

    /// The slot holding `id`.
    pub fn slot(&self, id: MemoryId) -> Option<usize> {
        self.slot_of.get(&id).copied()
    }

    /// Exact `k` nearest occupied slots of each query `[m, dk]`, with their
    /// keys and values gathered on the device.
    pub fn search(&self, queries: Tensor<2>, k: usize) -> Result<DeviceNeighbors> {
        let [m, _] = queries.dims();
        let valid = Tensor::<1, Bool>::from_data(TensorData::new(self.valid.clone(), [self.capacity]), &self.device);
        let top = exact_topk(queries, self.keys.clone(), Some(valid), k, self.config.metric)?;
        let flat = top.indices.clone().reshape([m * k]);
        let keys = self
            .keys
            .clone()
            .select(0, flat.clone())
            .reshape([m, k, self.config.key_dim]);
        let values = self
            .values
            .clone()
            .select(0, flat)
            .reshape([m, k, self.config.value_dim]);
        Ok(DeviceNeighbors {
            distances: top.distances,
            slots: top.indices,
            keys,
            values,
        })
    }
}
