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
//! Σ d key returned); values likewise, so the value projection, whose output
//! every inserted memory's value is, learns from what retrieved values should
//! have been. When the tier's values are trainable (sparse value updates, as
//! Memory Layers at Scale), the stored values receive the same gradient as
//! well ([`straight_through_values`]).
//!
//! With head partitions (the default), each head searches, inserts into and
//! evicts from its own table; a partition holding fewer than `k` memories
//! (a memory that grows from empty) attends over the ones it has.

use std::sync::{Arc, Mutex};

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Bool, Device, Int, Tensor};
use memstore_api::Tick;

use super::featural::{check_layer, masked_softmax, missing, projection, unit_rows};
use super::tier::{CommitCounts, CommitRequest, DeviceMemory, Observation, ValueGrad};
use super::trace::{Trace, Tracer};
use crate::Result;

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
///
/// `missing` `[n, k]` marks neighbours that do not exist (a partition with
/// fewer than `k` memories): they get no weight, and a row with none
/// attends to nothing (output zero).
pub fn attend(
    q: Tensor<2>,
    keys: Tensor<3>,
    values: Tensor<3>,
    scale: Tensor<1>,
    missing: Option<Tensor<2, Bool>>,
) -> Tensor<2> {
    let [n, _, dh] = keys.dims();
    let w = attention_weights(q, keys, scale, missing);
    (w * values).sum_dim(1).reshape([n, dh])
}

/// The weights `[n, k, 1]` of [`attend`]: softmax over the `k` retrieved
/// keys of `−scale · ‖q − key‖²`, nothing for `missing` ones.
pub fn attention_weights(
    q: Tensor<2>,
    keys: Tensor<3>,
    scale: Tensor<1>,
    missing: Option<Tensor<2, Bool>>,
) -> Tensor<3> {
    let scores = (q.unsqueeze_dim::<3>(1) - keys).powf_scalar(2.0).sum_dim(2).neg() * scale.reshape([1, 1, 1]);
    masked_softmax(scores, missing)
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

/// Retrieved values whose forward value is `stored` and whose gradient
/// reaches both the value projection's output `v` (broadcast over the `k`
/// retrieved rows, as [`straight_through`]) and, when `stored` is a
/// gradient-tracked leaf (trainable tier values), the stored values.
pub fn straight_through_values(v: Tensor<2>, stored: Tensor<3>) -> Tensor<3> {
    let [_, k, _] = stored.dims();
    let v = v.unsqueeze_dim::<3>(1);
    let [n, _, d] = v.dims();
    let v = v.expand([n, k, d]);
    stored + (v.clone() - v.detach())
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
    observed: Arc<Mutex<Vec<Observation>>>,
    #[module(skip)]
    learning: bool,
    /// Whether learning passes propose the layer's answers (per head,
    /// before `out`) as new memories' values instead of the value
    /// projection's outputs.
    #[module(skip)]
    answers: bool,
    #[module(skip)]
    n_head: usize,
    #[module(skip)]
    k: usize,
    #[module(skip)]
    tracer: Tracer,
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
    /// layer's current answers (the attention output over the retrieved
    /// memories, per head): such a memory leaves the attention output
    /// unchanged wherever it is retrieved, and can then learn.
    pub fn set_recording_answers(&mut self, on: bool) {
        self.answers = on;
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

    fn split_heads(&self, lin: &Linear, x: Tensor<3>) -> Tensor<2> {
        let [b, t, c] = x.dims();
        lin.forward(x).reshape([b * t * self.n_head, c / self.n_head])
    }

    /// Projections of the normalised residual stream `[b, t, n_embd]`: unit
    /// queries, unit keys and values, each `[b·t·heads, dh]`.
    pub fn project(&self, x: Tensor<3>) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
        (
            unit_rows(self.split_heads(&self.query, x.clone())),
            unit_rows(self.split_heads(&self.key, x.clone())),
            self.split_heads(&self.value, x),
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

    /// Attention over what was retrieved, with the straight-through estimator
    /// on keys and values, and the output projection: `[b, t, n_embd]`.
    pub fn attend(&self, shape: [usize; 3], q: Tensor<2>, k: Tensor<2>, v: Tensor<2>, r: &Retrieved) -> Tensor<3> {
        self.out.forward(self.attend_heads(q, k, v, r).reshape(shape))
    }

    /// [`AssociativeMemory::attend`] before the output projection: `[n, dh]`.
    fn attend_heads(&self, q: Tensor<2>, k: Tensor<2>, v: Tensor<2>, r: &Retrieved) -> Tensor<2> {
        let keys = straight_through(k, r.keys.clone());
        let values = straight_through_values(v, r.values.clone());
        let gaps = missing(&self.memory, self.k, &r.distances);
        attend(q, keys, values, self.log_scale.val().exp(), gaps)
    }

    /// Applies the layer to the normalised residual stream `[b, t, n_embd]`;
    /// when learning, records novel keys and values and the retrieved slots.
    pub fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        let shape = x.dims();
        let (q, k, v) = self.project(x);
        let r = self.retrieve(k.clone())?;
        self.tracer.record(|| {
            let gaps = missing(&self.memory, self.k, &r.distances);
            let w = attention_weights(
                q.clone().detach(),
                r.keys.clone(),
                self.log_scale.val().exp().detach(),
                gaps,
            );
            let [n, k, _] = w.dims();
            Trace {
                slots: r.slots.clone(),
                distances: r.distances.clone().detach(),
                weights: w.reshape([n, k]),
            }
        });
        let proposed = v.clone().detach();
        let y = self.attend_heads(q, k.clone(), v, &r);
        if self.learning {
            let mut o = self.observed.lock().unwrap_or_else(|e| e.into_inner());
            o.push(Observation {
                keys: k.detach(),
                values: Some(if self.answers { y.clone().detach() } else { proposed }),
                distances: r.distances.clone().detach(),
                slots: r.slots.clone(),
            });
        }
        Ok(self.out.forward(y.reshape(shape)))
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

    /// Between steps: records the accesses of the retrieved memories at
    /// `tick`, applies the sparse value update when a value gradient is
    /// given (trainable tier values), recombines near-duplicate observations
    /// and inserts novel ones, at most `max_inserts` merges and inserts
    /// together ([`DeviceMemory::commit`]).
    pub fn commit(
        &mut self,
        tick: Tick,
        max_inserts: usize,
        value_grad: Option<(ValueGrad, f32)>,
    ) -> Result<CommitCounts> {
        let request = self.commit_request(tick, max_inserts, value_grad);
        self.memory.commit_request(request)
    }

    /// What [`AssociativeMemory::commit`] would commit (the observations
    /// taken), for a commit shared with other layers
    /// ([`DeviceMemory::commit_gather`]).
    pub fn commit_request(
        &mut self,
        tick: Tick,
        max_inserts: usize,
        value_grad: Option<(ValueGrad, f32)>,
    ) -> CommitRequest {
        let observed = std::mem::take(&mut *self.observed.lock().unwrap_or_else(|e| e.into_inner()));
        CommitRequest {
            observed,
            tick,
            max_inserts,
            value_grad,
        }
    }
}
