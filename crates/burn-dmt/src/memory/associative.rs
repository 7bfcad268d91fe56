//! The associative memory layer (meant for upper blocks), in place of a
//! block's feed-forward layer: 1. query, key and value projections (per head,
//! queries and keys QK-normalised); 2. the top-k memories nearest each key on
//! the device tier; 3. where every one of them is farther than the novelty
//! threshold, the key and value are proposed for insertion, and where some
//! are closer than the recombination threshold, for recombination with them
//! (both applied by [`AssociativeMemory::commit`] between steps, within the
//! tier's capacity);
//! 4. attention of the query over the retrieved keys and values (scores from
//! squared distances, see [`attend`]); 5. output projection.
//!
//! The store is not differentiable. Retrieved keys and values go through the
//! straight-through estimator of the seed: a retrieved key is "the key plus
//! noise", `k̂ = k + (retrieved − k).detach()`, so its forward value is the
//! stored key and its gradient flows to the key projection (d key inserted =
//! Σ d key returned); values likewise, unless the tier's values are trainable
//! (sparse value updates, as Memory Layers at Scale), in which case the value
//! gradient goes to the stored values instead.

use std::sync::{Arc, Mutex};

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor};
use memstore_api::{MemoryId, Tick};

use super::featural::{check_layer, projection, unit_rows};
use super::tier::DeviceMemory;
use crate::{Result, host_f32, host_i64};

/// Keys and values proposed for insertion by forward passes, waiting for
/// [`AssociativeMemory::commit`].
#[derive(Clone, Debug, Default)]
pub struct Proposals {
    /// Keys, rows of the head dimension.
    pub keys: Vec<f32>,
    /// Values, rows of the head dimension.
    pub values: Vec<f32>,
    /// Slots retrieved (their accesses are recorded at commit).
    pub slots: Vec<usize>,
    /// Observations closer than the recombination threshold to stored
    /// memories: (key, value, the ids of those memories).
    pub merges: Vec<(Vec<f32>, Vec<f32>, Vec<MemoryId>)>,
}

/// What one forward pass retrieved, per head-row: `[n, k, dh]` keys and values
/// and `[n, k]` distances and slots.
#[derive(Clone, Debug)]
pub struct Retrieved {
    /// Stored keys.
    pub keys: Tensor<3>,
    /// Stored values.
    pub values: Tensor<3>,
    /// Distances of the projected keys to them.
    pub distances: Tensor<2>,
    /// Their slots in the tier.
    pub slots: Tensor<2, Int>,
}

/// Attention of `q` `[n, dh]` over `k` retrieved keys and values per row
/// (`[n, k, dh]`), scores `−scale · ‖q − key‖²`, weights softmax over the `k`.
///
/// Distance scores, not dot products: under the straight-through estimator
/// every retrieved key moves with the projected key, and a dot-product softmax
/// is blind to a common shift of all its keys (the key gradients sum to zero),
/// so the key projection would never learn. With squared distances the shift
/// changes the scores unequally and the key projection is pulled towards the
/// memories that help.
pub fn attend(q: Tensor<2>, keys: Tensor<3>, values: Tensor<3>, scale: Tensor<1>) -> Tensor<2> {
    let [n, _, dh] = keys.dims();
    let scores = (q.unsqueeze_dim::<3>(1) - keys).powf_scalar(2.0).sum_dim(2).neg() * scale.reshape([1, 1, 1]);
    let w = softmax(scores, 1);
    (w * values).sum_dim(1).reshape([n, dh])
}

/// The straight-through estimate of retrieved rows: forward value `stored`,
/// gradient to `x` (broadcast over the `k` retrieved rows).
pub fn straight_through(x: Tensor<2>, stored: Tensor<3>) -> Tensor<3> {
    let [_, k, _] = stored.dims();
    let x = x.unsqueeze_dim::<3>(1);
    let [n, _, d] = x.dims();
    let x = x.expand([n, k, d]);
    x.clone() + (stored - x).detach()
}

/// What a learning forward pass leaves for the commit: the projected keys and
/// values and what they retrieved, as detached device tensors. They are read
/// back at the commit, once the step's work is queued, so a forward pass never
/// waits for the device.
#[derive(Clone, Debug)]
struct Observed {
    keys: Tensor<2>,
    values: Tensor<2>,
    distances: Tensor<2>,
    slots: Tensor<2, Int>,
}

/// An associative memory layer with its device tier.
#[derive(Module, Debug)]
pub struct AssociativeMemory {
    /// Query projection `[n_embd, n_embd]` (heads concatenated).
    pub query: Linear,
    /// Key projection.
    pub key: Linear,
    /// Value projection.
    pub value: Linear,
    /// Output projection.
    pub out: Linear,
    /// log of the attention scale over retrieved keys (QK-norm makes q·k a
    /// cosine, so the scale is learnt, as in QK-norm transformers).
    pub log_scale: Param<Tensor<1>>,
    #[module(skip)]
    memory: DeviceMemory,
    #[module(skip)]
    observed: Arc<Mutex<Vec<Observed>>>,
    #[module(skip)]
    learning: bool,
    #[module(skip)]
    n_head: usize,
    #[module(skip)]
    k: usize,
}

impl AssociativeMemory {
    /// A layer of `n_embd` width and `n_head` heads over `memory` (keys and
    /// values one head wide), retrieving `k` memories per head.
    pub fn new(n_embd: usize, n_head: usize, k: usize, memory: DeviceMemory, device: &Device) -> Result<Self> {
        check_layer(n_embd, n_head, k, &memory)?;
        let lin = || projection(n_embd, device);
        Ok(AssociativeMemory {
            query: lin(),
            key: lin(),
            value: lin(),
            out: lin(),
            log_scale: Param::from_tensor(Tensor::from_floats([((n_embd / n_head) as f32).sqrt().ln()], device)),
            memory,
            observed: Arc::new(Mutex::new(Vec::new())),
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

    /// Retrieved memories per head-row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Whether forward passes propose novel keys for insertion (training) or
    /// leave the memory as it is (evaluation).
    pub fn set_learning(&mut self, learning: bool) {
        self.learning = learning;
    }

    fn heads(&self, lin: &Linear, x: Tensor<3>) -> Tensor<2> {
        let [b, t, c] = x.dims();
        lin.forward(x).reshape([b * t * self.n_head, c / self.n_head])
    }

    /// Projections of the normalised residual stream `[b, t, n_embd]`: unit
    /// queries, unit keys and values, each `[b·t·heads, dh]`.
    pub fn project(&self, x: Tensor<3>) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
        (
            unit_rows(self.heads(&self.query, x.clone())),
            unit_rows(self.heads(&self.key, x.clone())),
            self.heads(&self.value, x),
        )
    }

    /// The top-k memories nearest each projected key.
    pub fn retrieve(&self, keys: Tensor<2>) -> Result<Retrieved> {
        let found = self.memory.search(keys.detach(), self.k)?;
        Ok(Retrieved {
            keys: found.keys.detach(),
            values: found.values,
            distances: found.distances,
            slots: found.slots,
        })
    }

    /// Attention over what was retrieved, with the straight-through estimator,
    /// and the output projection: `[b, t, n_embd]`.
    pub fn attend(&self, shape: [usize; 3], q: Tensor<2>, k: Tensor<2>, v: Tensor<2>, r: &Retrieved) -> Tensor<3> {
        let keys = straight_through(k, r.keys.clone());
        let values = if self.memory.values_trainable() {
            r.values.clone()
        } else {
            straight_through(v, r.values.clone().detach())
        };
        let y = attend(q, keys, values, self.log_scale.val().exp());
        self.out.forward(y.reshape(shape))
    }

    /// Applies the layer to the normalised residual stream `[b, t, n_embd]`;
    /// when learning, records novel keys and values and the retrieved slots.
    pub fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        let shape = x.dims();
        let (q, k, v) = self.project(x);
        let r = self.retrieve(k.clone())?;
        if self.learning {
            let mut o = self.observed.lock().unwrap_or_else(|e| e.into_inner());
            o.push(Observed {
                keys: k.clone().detach(),
                values: v.clone().detach(),
                distances: r.distances.clone().detach(),
                slots: r.slots.clone(),
            });
        }
        Ok(self.attend(shape, q, k, v, &r))
    }

    /// Adds what one forward pass observed to `p`: the retrieved slots, the
    /// novel keys and values, and the observations to recombine.
    fn propose(&self, o: Observed, p: &mut Proposals) -> Result<()> {
        let [n, kk] = o.distances.dims();
        let distances = host_f32(o.distances)?;
        let slots = host_i64(o.slots)?;
        let config = self.memory.config();
        let (novelty, recombine) = (config.novelty, config.recombine);
        let novel: Vec<usize> = (0..n).filter(|&i| distances[i * kk] > novelty).collect();
        let close: Vec<usize> = (0..n).filter(|&i| distances[i * kk] < recombine).collect();
        p.slots.extend(slots.iter().map(|&s| s as usize));
        if novel.is_empty() && close.is_empty() {
            return Ok(());
        }
        let dh = o.keys.dims()[1];
        let (keys, values) = (host_f32(o.keys)?, host_f32(o.values)?);
        for i in novel {
            p.keys.extend_from_slice(&keys[i * dh..(i + 1) * dh]);
            p.values.extend_from_slice(&values[i * dh..(i + 1) * dh]);
        }
        for i in close {
            let sources: Vec<MemoryId> = (0..kk)
                .filter(|&j| distances[i * kk + j] < recombine)
                .filter_map(|j| self.memory.id(slots[i * kk + j] as usize))
                .collect();
            p.merges.push((
                keys[i * dh..(i + 1) * dh].to_vec(),
                values[i * dh..(i + 1) * dh].to_vec(),
                sources,
            ));
        }
        Ok(())
    }

    /// Takes what forward passes proposed since the last commit (reading
    /// their observations from the device).
    pub fn take_proposals(&self) -> Result<Proposals> {
        let observed = std::mem::take(&mut *self.observed.lock().unwrap_or_else(|e| e.into_inner()));
        let mut p = Proposals::default();
        for o in observed {
            self.propose(o, &mut p)?;
        }
        Ok(p)
    }

    /// Between steps: records the accesses of the retrieved slots at `tick`,
    /// applies the sparse value update `value −= lr · grad` to them when a
    /// value gradient is given (trainable tier values), recombines each
    /// observation closer than the recombination threshold with those
    /// memories ([`DeviceMemory::merge_many`], as the store's `learn` does), and
    /// inserts novel observations, each farther than the novelty threshold
    /// from every memory inserted before it in this commit (near-duplicate
    /// proposals of one batch become one memory): at most `max_inserts`
    /// merges and inserts together. Returns that number.
    pub fn commit(&mut self, tick: Tick, max_inserts: usize, value_grad: Option<(Tensor<2>, f32)>) -> Result<usize> {
        let p = self.take_proposals()?;
        self.memory.touch(&p.slots, tick)?;
        if let Some((g, lr)) = value_grad {
            self.memory.apply_value_grad(g, lr, &p.slots)?;
        }
        let done = self.memory.merge_many(&p.merges, tick, max_inserts)?.len();
        let dh = self.memory.config().key_dim;
        let novelty = self.memory.config().novelty;
        let metric = self.memory.config().metric;
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let n = p.keys.len() / dh.max(1);
        for i in 0..n {
            if done + keys.len() / dh >= max_inserts {
                break;
            }
            let key = &p.keys[i * dh..(i + 1) * dh];
            let far = keys
                .chunks(dh)
                .all(|o: &[f32]| memstore_api::math::distance(metric, key, o) > novelty);
            if far {
                keys.extend_from_slice(key);
                values.extend_from_slice(&p.values[i * dh..(i + 1) * dh]);
            }
        }
        Ok(done + self.memory.insert(&keys, &values, tick)?.len())
    }
}
