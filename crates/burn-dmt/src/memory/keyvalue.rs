//! The key-value memory layer: a feed-forward layer read as the key-value
//! memory it is (Geva et al., "Transformer Feed-Forward Layers Are Key-Value
//! Memories", 2021). An MLP `c_proj(act(c_fc(x)))` of width `f` holds `f`
//! memories: memory `j`'s key is unit `j`'s input weights with its bias,
//! `[c_fc[:, j]; b_j]`, its value is the unit's output weights
//! `c_proj[j, :]`, and the layer's output is `Σ_j act(x̂ · key_j) value_j + b`
//! with `x̂ = [x; 1]`. This layer keeps those rows in a memstore table and
//! sums over the `k` keys of largest `x̂ · key` only (exact top-k by inner
//! product: memstore's `InnerProduct` metric, distance `1 − x̂ · key`), as
//! product-key memories and Memory Layers at Scale do with learnt keys.
//!
//! Filled from a teacher's MLP, the layer computes that MLP exactly when
//! `k` is its width, and its sparse approximation for smaller `k`; the
//! table can hold more rows than the MLP had units, and each row is a
//! database row that can be read, traced, changed and removed. Keys are
//! constants of the table (the store is not differentiable); the gradient
//! reaches the input through the scores `x̂ · key`, the output bias, and,
//! when the tier's values are trainable, the stored values (sparse value
//! updates, as the featural layer's).

use std::sync::{Arc, Mutex};

use burn::module::{Module, Param};
use burn::tensor::activation::{gelu, relu};
use burn::tensor::{Device, Tensor};
use memstore_api::{Metric, Tick};

use super::tier::{CommitCounts, CommitRequest, DeviceMemory, Observation, ValueGrad};
use super::trace::{Trace, Tracer};
use crate::config::Activation;
use crate::{DmtError, Result};

/// A key-value memory layer with its device tier.
#[derive(Module, Debug)]
pub struct KeyValueMemory {
    /// The output bias (the MLP's `c_proj` bias).
    pub bias: Param<Tensor<1>>,
    #[module(skip)]
    memory: DeviceMemory,
    #[module(skip)]
    observed: Arc<Mutex<Vec<Observation>>>,
    #[module(skip)]
    learning: bool,
    #[module(skip)]
    k: usize,
    #[module(skip)]
    activation: Activation,
    #[module(skip)]
    tracer: Tracer,
}

impl KeyValueMemory {
    /// A layer of `n_embd` width over `memory`, whose keys are `n_embd + 1`
    /// wide (input weights and bias), values `n_embd` wide, one table
    /// searched by inner product; sums the `k` most active memories.
    pub fn new(n_embd: usize, k: usize, activation: Activation, memory: DeviceMemory, device: &Device) -> Result<Self> {
        let c = memory.config();
        if c.key_dim != n_embd + 1 || c.value_dim != n_embd || c.metric != Metric::InnerProduct || memory.parts() != 1 {
            return Err(DmtError::InvalidArgument(format!(
                "a key-value memory of {n_embd} features needs one inner-product table of {}-d keys and {n_embd}-d \
                 values (this one: {}/{} dims, {:?}, {} partitions)",
                n_embd + 1,
                c.key_dim,
                c.value_dim,
                c.metric,
                memory.parts()
            )));
        }
        let slots = if memory.is_store_backed() {
            memory.len()
        } else {
            memory.capacity()
        };
        if k == 0 || k > slots {
            return Err(DmtError::InvalidArgument(format!(
                "k = {k} must be in 1..={slots} (the memories the layer can retrieve)"
            )));
        }
        Ok(KeyValueMemory {
            bias: Param::from_tensor(Tensor::zeros([n_embd], device)),
            memory,
            observed: Arc::new(Mutex::new(Vec::new())),
            learning: false,
            k,
            activation,
            tracer: Tracer::default(),
        })
    }

    /// The layer's retrieval traces ([`super::trace`]).
    pub fn tracer(&self) -> &Tracer {
        &self.tracer
    }

    /// The device tier.
    pub fn memory(&self) -> &DeviceMemory {
        &self.memory
    }

    /// The device tier, to change between steps.
    pub fn memory_mut(&mut self) -> &mut DeviceMemory {
        &mut self.memory
    }

    /// Memories summed per position.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Whether forward passes record what they retrieve (LRFU accesses and
    /// sparse value updates at [`KeyValueMemory::commit`]).
    pub fn set_learning(&mut self, learning: bool) {
        self.learning = learning;
    }

    /// The slots retrieved by learning forward passes since the last commit
    /// (or call), taking them.
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
    /// the last commit at `tick` and applies the sparse value update when a
    /// value gradient is given ([`DeviceMemory::commit`]; nothing is
    /// inserted).
    pub fn commit(&mut self, tick: Tick, value_grad: Option<(ValueGrad, f32)>) -> Result<CommitCounts> {
        let request = self.commit_request(tick, value_grad);
        self.memory.commit_request(request)
    }

    /// What [`KeyValueMemory::commit`] would commit (the observations
    /// taken), for a commit shared with other layers
    /// ([`DeviceMemory::commit_gather`]).
    pub fn commit_request(&mut self, tick: Tick, value_grad: Option<(ValueGrad, f32)>) -> CommitRequest {
        let observed = std::mem::take(&mut *self.observed.lock().unwrap_or_else(|e| e.into_inner()));
        CommitRequest {
            observed,
            tick,
            max_inserts: 0,
            value_grad,
        }
    }

    /// Between steps of `memorize`: [`KeyValueMemory::commit`], then up to
    /// `max_inserts` new memories, one for each position whose strongest
    /// memory scores below `below` (`x̂ · key`; the most novel first,
    /// positions whose inputs are within cosine 0.9 of one taken in this
    /// commit skipped as near-duplicates).
    ///
    /// The memory for input `x` is a unit with key `[2s·x/‖x‖²; −s]`
    /// (`s = strength`) and a zero value: it scores `s` on `x` itself,
    /// above `below` so that inputs near `x` are no longer novel, and
    /// negatively (silent) on inputs whose projection on `x` is under half
    /// of `‖x‖`. Its zero value leaves the layer's output as it was until
    /// the value is trained. This is "one neuron per mistake" of
    /// Transformer-Patcher (Huang et al. 2023), gated by novelty instead of
    /// by error, in a key-value memory.
    pub fn commit_inserting(
        &mut self,
        tick: Tick,
        max_inserts: usize,
        below: f32,
        strength: f32,
    ) -> Result<CommitCounts> {
        if !(below.is_finite() && strength.is_finite() && strength > below) {
            return Err(DmtError::InvalidArgument(format!(
                "a new key-value memory's score {strength} must be finite and above the novelty score {below}"
            )));
        }
        let observed = std::mem::take(&mut *self.observed.lock().unwrap_or_else(|e| e.into_inner()));
        let c = self.memory.config().value_dim;
        let mut novel: Vec<(f32, Vec<f32>)> = Vec::new();
        if max_inserts > 0 {
            for o in &observed {
                let [n, k] = o.distances.dims();
                let d = crate::host_f32(o.distances.clone())?;
                let q = crate::host_f32(o.keys.clone())?;
                for i in 0..n {
                    // Distance 1 − x̂ · key: the nearest memory scores 1 − d.
                    let top = 1.0 - d[i * k];
                    if top.is_finite() && top < below {
                        novel.push((top, q[i * (c + 1)..i * (c + 1) + c].to_vec()));
                    }
                }
            }
        }
        novel.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut taken: Vec<Vec<f32>> = Vec::new();
        for (_, x) in novel {
            if taken.len() == max_inserts {
                break;
            }
            let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
            if norm <= f32::EPSILON {
                continue;
            }
            let near = taken.iter().any(|t| {
                let tn = t.iter().map(|v| v * v).sum::<f32>().sqrt();
                t.iter().zip(&x).map(|(a, b)| a * b).sum::<f32>() >= 0.9 * tn * norm
            });
            if !near {
                taken.push(x);
            }
        }
        let mut counts = self.memory.commit(observed, tick, 0, None)?;
        if !taken.is_empty() {
            let mut keys = Vec::with_capacity(taken.len() * (c + 1));
            for x in &taken {
                let scale = 2.0 * strength / x.iter().map(|v| v * v).sum::<f32>();
                keys.extend(x.iter().map(|v| v * scale));
                keys.push(-strength);
            }
            let values = vec![0.0; taken.len() * c];
            counts.inserted += self.memory.insert(&keys, &values, tick)?.len();
        }
        Ok(counts)
    }

    /// Applies the layer to the normalised residual stream `[b, t, n_embd]`.
    pub fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        let [b, t, c] = x.dims();
        let n = b * t;
        let device = x.device();
        let q = Tensor::cat(vec![x.reshape([n, c]), Tensor::ones([n, 1], &device)], 1); // [n, c + 1]
        let found = self.memory.search(q.clone().detach(), self.k)?;
        let gaps = super::featural::missing(&self.memory, self.k, &found.distances);
        if self.learning {
            let mut o = self.observed.lock().unwrap_or_else(|e| e.into_inner());
            o.push(Observation {
                keys: q.clone().detach(),
                values: None,
                distances: found.distances.clone().detach(),
                slots: found.slots.clone(),
            });
        }
        // The scores again, differentiably in the input: [n, k, 1].
        let scores = (q.unsqueeze_dim::<3>(1) * found.keys.detach()).sum_dim(2);
        let mut h = match self.activation {
            Activation::GeluTanh => crate::gpt2::gelu_new(scores),
            Activation::Gelu => gelu(scores),
            Activation::Relu => relu(scores),
        };
        if let Some(m) = gaps {
            h = h.mask_fill(m.unsqueeze_dim::<3>(2), 0.0);
        }
        self.tracer.record(|| Trace {
            slots: found.slots.clone(),
            distances: found.distances.clone().detach(),
            weights: h.clone().detach().reshape([n, self.k]),
        });
        let y = (h * found.values).sum_dim(1).reshape([n, c]) + self.bias.val().unsqueeze_dim::<2>(0);
        Ok(y.reshape([b, t, c]))
    }
}
