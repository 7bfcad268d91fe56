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
//! `value_fixed_lr`) through the tier, which journals it to the store.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::softmax;
use std::sync::{Arc, Mutex};

use burn::tensor::{Device, Int, Tensor};
use memstore_api::Tick;

use super::tier::DeviceMemory;
use crate::{DmtError, Result, host_i64};

/// Scales rows to unit L2 norm (QK-norm).
pub fn unit_rows<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let norm = x.clone().powf_scalar(2.0).sum_dim(D - 1).sqrt().clamp_min(1e-6);
    x / norm
}

/// Checks that a memory layer of `n_embd` width and `n_head` heads fits
/// `memory` (keys and values one head wide) and can retrieve `k` memories.
pub(crate) fn check_layer(n_embd: usize, n_head: usize, k: usize, memory: &DeviceMemory) -> Result<()> {
    let dh = n_embd / n_head.max(1);
    let c = memory.config();
    if n_head == 0 || dh * n_head != n_embd || c.key_dim != dh || c.value_dim != dh {
        return Err(DmtError::InvalidArgument(format!(
            "memory of {}/{} dims does not fit {n_head} heads of {n_embd}",
            c.key_dim, c.value_dim
        )));
    }
    if k == 0 || memory.len() < k {
        return Err(DmtError::InvalidArgument(format!(
            "k = {k} needs at least k memories (the tier has {})",
            memory.len()
        )));
    }
    Ok(())
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
    /// Slots retrieved by learning forward passes, on the device until the
    /// commit reads them (a read-back in the forward pass made the host wait
    /// for the device at every memory layer).
    #[module(skip)]
    retrieved: Arc<Mutex<Vec<Tensor<2, Int>>>>,
    #[module(skip)]
    learning: bool,
    #[module(skip)]
    n_head: usize,
    #[module(skip)]
    k: usize,
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
            retrieved: Arc::new(Mutex::new(Vec::new())),
            learning: false,
            n_head,
            k,
        })
    }

    /// The device tier.
    pub fn memory(&self) -> &DeviceMemory {
        &self.memory
    }

    /// The device tier, to change between steps.
    pub fn memory_mut(&mut self) -> &mut DeviceMemory {
        &mut self.memory
    }

    /// Whether forward passes record the slots they retrieve (for LRFU
    /// accesses and sparse value updates at [`FeaturalMemory::commit`]).
    pub fn set_learning(&mut self, learning: bool) {
        self.learning = learning;
    }

    /// Takes the slots retrieved since the last call (reading them from the
    /// device).
    pub fn take_retrieved(&self) -> Result<Vec<usize>> {
        let found = std::mem::take(&mut *self.retrieved.lock().unwrap_or_else(|e| e.into_inner()));
        let mut slots = Vec::new();
        for t in found {
            slots.extend(host_i64(t)?.into_iter().map(|s| s as usize));
        }
        Ok(slots)
    }

    /// Between steps: records the accesses of the retrieved slots at `tick`,
    /// and applies the sparse value update `value −= lr · grad` to them when a
    /// value gradient is given. Returns the slots.
    pub fn commit(&mut self, tick: Tick, value_grad: Option<(Tensor<2>, f32)>) -> Result<Vec<usize>> {
        let slots = self.take_retrieved()?;
        self.memory.touch(&slots, tick)?;
        if let Some((g, lr)) = value_grad {
            self.memory.apply_value_grad(g, lr, &slots)?;
        }
        Ok(slots)
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
        if self.learning {
            let mut r = self.retrieved.lock().unwrap_or_else(|e| e.into_inner());
            r.push(found.slots.clone());
        }
        let d = (q.unsqueeze_dim::<3>(1) - keys)
            .powf_scalar(2.0)
            .sum_dim(2)
            .add_scalar(1e-12)
            .sqrt(); // [n, k, 1]
        let tau = self.log_tau.val().exp().reshape([1, 1, 1]);
        let w = softmax(d.neg() / tau, 1);
        let y = (w * values).sum_dim(1).reshape([b, t, c]);
        Ok(self.out.forward(y))
    }
}
