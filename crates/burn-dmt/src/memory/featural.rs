//! The featural memory layer (meant for lower blocks), in place of a block's
//! feed-forward layer: 1. query projection (per head, QK-normalised);
//! 2. exact top-k memories by key distance on the device tier; 3. weighted sum
//! of their values with weights softmax(−distance/τ), τ learnable; 4. output
//! projection. The store is not differentiable: retrieved keys are constants
//! here, so the gradient reaches the query through the distances (recomputed
//! differentiably from the detached keys) and reaches τ and both projections.
//! Values are constants too, unless the tier's values are trainable: then the
//! gradient of each retrieved value reaches the stored value, and the training
//! loop applies it as a sparse update (Memory Layers at Scale's
//! `value_fixed_lr`) through the tier, which records it for the store.
//!
//! With head partitions (the default), each head searches its own table.
//! The memory can grow while the model trains: [`FeaturalMemory::commit`]
//! takes target values for the step's queries (in distillation, the
//! teacher's feed-forward output on the same input, per head) and inserts
//! the novel queries with them, or recombines near-duplicates, as the
//! store's `learn` does; a partition with fewer than `k` memories averages
//! over the ones it has.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::softmax;
use std::sync::{Arc, Mutex};

use burn::tensor::{Bool, Device, Tensor};
use memstore_api::Tick;

use super::tier::{CommitCounts, CommitRequest, DeviceMemory, Observation, ValueGrad};
use super::trace::{Trace, Tracer};
use crate::{DmtError, Result};

/// Scales rows to unit L2 norm (QK-norm).
pub fn unit_rows<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let norm = x.clone().powf_scalar(2.0).sum_dim(D - 1).sqrt().clamp_min(1e-6);
    x / norm
}

/// Checks that a memory layer of `n_embd` width and `n_head` heads fits
/// `memory` (keys and values one head wide, one partition per head or one
/// shared table) and can retrieve `k` memories per head.
pub(crate) fn check_layer(n_embd: usize, n_head: usize, k: usize, memory: &DeviceMemory) -> Result<()> {
    let dh = n_embd / n_head.max(1);
    let c = memory.config();
    if n_head == 0 || dh * n_head != n_embd || c.key_dim != dh || c.value_dim != dh {
        return Err(DmtError::InvalidArgument(format!(
            "memory of {}/{} dims does not fit {n_head} heads of {n_embd}",
            c.key_dim, c.value_dim
        )));
    }
    if memory.parts() != 1 && memory.parts() != n_head {
        return Err(DmtError::InvalidArgument(format!(
            "a memory of {} partitions for {n_head} heads (one per head, or one shared)",
            memory.parts()
        )));
    }
    let slots = if memory.is_store_backed() {
        memory.len()
    } else {
        memory.capacity() / memory.parts()
    };
    if k == 0 || k > slots {
        return Err(DmtError::InvalidArgument(format!(
            "k = {k} must be in 1..={slots} (the memories a head can retrieve)"
        )));
    }
    Ok(())
}

/// Which retrieved neighbours do not exist (`+∞` distance: a partition with
/// fewer than `k` memories), or `None` when every partition holds `k` or
/// more (nothing to mask).
pub(crate) fn missing(memory: &DeviceMemory, k: usize, distances: &Tensor<2>) -> Option<Tensor<2, Bool>> {
    // A store-backed tier does not know its partitions' sizes: always mask.
    if !memory.is_store_backed() && memory.part_lens().iter().all(|&n| n >= k) {
        return None;
    }
    Some(distances.clone().detach().equal_elem(f32::INFINITY))
}

/// Softmax of `scores` `[n, k, 1]` over the `k` neighbours, with the
/// `missing` ones `[n, k]` weighing nothing (a row with no neighbour gets
/// all-zero weights).
pub(crate) fn masked_softmax(scores: Tensor<3>, missing: Option<Tensor<2, Bool>>) -> Tensor<3> {
    match missing {
        None => softmax(scores, 1),
        Some(m) => {
            let m = m.unsqueeze_dim::<3>(2);
            softmax(scores.mask_fill(m.clone(), -1e30), 1).mask_fill(m, 0.0)
        }
    }
}

/// A memory layer's `[n, n]` projection, initialised N(0, 0.02²) as GPT-2's weights.
pub(crate) fn projection(n: usize, device: &Device) -> Linear {
    LinearConfig::new(n, n)
        .with_initializer(burn::nn::Initializer::Normal { mean: 0.0, std: 0.02 })
        .init(device)
}

/// A featural memory layer with its device tier.
#[derive(Module, Debug)]
pub struct FeaturalMemory {
    /// Query projection `[n_embd, n_embd]` (heads concatenated).
    pub query: Linear,
    /// Output projection `[n_embd, n_embd]`.
    pub out: Linear,
    /// log τ, the softmax temperature of the distances.
    pub log_tau: Param<Tensor<1>>,
    #[module(skip)]
    memory: DeviceMemory,
    /// What learning forward passes retrieved, on the device until the
    /// commit reads it (a read-back in the forward pass made the host wait
    /// for the device at every memory layer).
    #[module(skip)]
    observed: Arc<Mutex<Vec<Observation>>>,
    #[module(skip)]
    learning: bool,
    /// Whether learning passes record each query's answer (the layer's
    /// per-head output before `out`) as the value a new memory would take.
    #[module(skip)]
    answers: bool,
    #[module(skip)]
    n_head: usize,
    #[module(skip)]
    k: usize,
    #[module(skip)]
    tracer: Tracer,
}

impl FeaturalMemory {
    /// A layer of `n_embd` width and `n_head` heads over `memory`, whose keys
    /// and values are one head wide; retrieves `k` memories per head.
    pub fn new(n_embd: usize, n_head: usize, k: usize, memory: DeviceMemory, device: &Device) -> Result<Self> {
        check_layer(n_embd, n_head, k, &memory)?;
        let lin = || projection(n_embd, device);
        Ok(FeaturalMemory {
            query: lin(),
            out: lin(),
            log_tau: Param::from_tensor(Tensor::zeros([1], device)),
            memory,
            observed: Arc::new(Mutex::new(Vec::new())),
            learning: false,
            answers: false,
            n_head,
            k,
            tracer: Tracer::default(),
        })
    }

    /// Heads searching separately.
    pub fn heads(&self) -> usize {
        self.n_head
    }

    /// The layer's retrieval traces ([`super::trace`]).
    pub fn tracer(&self) -> &Tracer {
        &self.tracer
    }

    /// Whether learning passes propose new memories whose values are the
    /// layer's current answers to their queries (inserted by
    /// [`FeaturalMemory::commit_answers`]): a memory whose value is the
    /// softmax-weighted mean of the values retrieved with it leaves that
    /// mean, so the layer's output, unchanged, and can then learn.
    pub fn set_recording_answers(&mut self, on: bool) {
        self.answers = on;
    }

    /// Between steps, with answers recorded: records the accesses, recombines
    /// near-duplicate queries and inserts novel ones with their answers as
    /// values, at most `max_inserts` ([`DeviceMemory::commit`]).
    pub fn commit_answers(&mut self, tick: Tick, max_inserts: usize) -> Result<CommitCounts> {
        let observed = std::mem::take(&mut *self.observed.lock().unwrap_or_else(|e| e.into_inner()));
        self.memory.commit(observed, tick, max_inserts, None)
    }

    /// The device tier.
    pub fn memory(&self) -> &DeviceMemory {
        &self.memory
    }

    /// The device tier, to change between steps.
    pub fn memory_mut(&mut self) -> &mut DeviceMemory {
        &mut self.memory
    }

    /// Whether forward passes record what they retrieve (for LRFU accesses,
    /// sparse value updates and growth at [`FeaturalMemory::commit`]).
    pub fn set_learning(&mut self, learning: bool) {
        self.learning = learning;
    }

    /// Memories retrieved per head.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The slots retrieved by learning forward passes since the last commit
    /// (or call), taking them: for measuring which memories an evaluation
    /// uses without changing the memory.
    pub fn take_retrieved(&self) -> Result<Vec<usize>> {
        super::tier::retrieved_slots(self.take_observed())
    }

    /// What learning forward passes observed since the last commit (or
    /// call), taken.
    pub fn take_observed(&self) -> Vec<Observation> {
        std::mem::take(&mut *self.observed.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts back observations taken with `take_observed`, ahead of any
    /// recorded since (a pass whose observations must not count is run
    /// between the two calls and its own taken and dropped).
    pub fn restore_observed(&self, mut kept: Vec<Observation>) {
        let mut o = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        kept.append(&mut o);
        *o = kept;
    }

    /// Between steps: records the accesses of the memories retrieved since
    /// the last commit at `tick`, applies the sparse value update
    /// `value −= lr · grad` to them when a value gradient is given, and, with
    /// `grow = (targets, max_inserts)`, learns the step's queries with
    /// `targets` `[b · t · heads, dh]` as their values: novel ones inserted,
    /// near-duplicates recombined ([`DeviceMemory::commit`]). Growth needs
    /// exactly one forward pass since the last commit (the one the targets
    /// belong to).
    pub fn commit(
        &mut self,
        tick: Tick,
        value_grad: Option<(ValueGrad, f32)>,
        grow: Option<(Tensor<2>, usize)>,
    ) -> Result<CommitCounts> {
        let request = self.commit_request(tick, value_grad, grow)?;
        self.memory.commit_request(request)
    }

    /// What [`FeaturalMemory::commit`] would commit (the observations
    /// taken), for a commit shared with other layers
    /// ([`DeviceMemory::commit_gather`]).
    pub fn commit_request(
        &mut self,
        tick: Tick,
        value_grad: Option<(ValueGrad, f32)>,
        grow: Option<(Tensor<2>, usize)>,
    ) -> Result<CommitRequest> {
        let mut observed = std::mem::take(&mut *self.observed.lock().unwrap_or_else(|e| e.into_inner()));
        let mut max_inserts = 0;
        if let Some((targets, limit)) = grow {
            let [o] = observed.as_mut_slice() else {
                return Err(DmtError::InvalidArgument(format!(
                    "growth needs the one forward pass its targets belong to ({} were recorded)",
                    observed.len()
                )));
            };
            if targets.dims() != o.keys.dims() {
                return Err(DmtError::InvalidArgument(format!(
                    "targets of shape {:?} for queries of shape {:?}",
                    targets.dims(),
                    o.keys.dims()
                )));
            }
            o.values = Some(targets.detach());
            max_inserts = limit;
        }
        Ok(CommitRequest {
            observed,
            tick,
            max_inserts,
            value_grad,
        })
    }

    /// Applies the layer to the normalised residual stream `[b, t, n_embd]`.
    pub fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        let [b, t, c] = x.dims();
        let (h, k) = (self.n_head, self.k);
        let dh = c / h;
        let n = b * t * h;
        let q = unit_rows(self.query.forward(x).reshape([n, dh]));
        let found = self.memory.search(q.clone().detach(), k)?;
        let keys = found.keys.detach();
        let values = found.values;
        let gaps = missing(&self.memory, k, &found.distances);
        let d = (q.clone().unsqueeze_dim::<3>(1) - keys)
            .powf_scalar(2.0)
            .sum_dim(2)
            .add_scalar(1e-12)
            .sqrt(); // [n, k, 1]
        let tau = self.log_tau.val().exp().reshape([1, 1, 1]);
        let w = masked_softmax(d.neg() / tau, gaps);
        self.tracer.record(|| Trace {
            slots: found.slots.clone(),
            distances: found.distances.clone().detach(),
            weights: w.clone().detach().reshape([n, k]),
        });
        let y = (w * values).sum_dim(1); // [n, 1, dh]
        if self.learning {
            let mut o = self.observed.lock().unwrap_or_else(|e| e.into_inner());
            o.push(Observation {
                keys: q.detach(),
                values: self.answers.then(|| y.clone().detach().reshape([n, dh])),
                distances: found.distances.detach(),
                slots: found.slots,
            });
        }
        Ok(self.out.forward(y.reshape([b, t, c])))
    }
}
