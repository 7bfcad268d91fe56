//! Looking inside a memory student, token by token: which memories each
//! memory layer read for each position (id, distance, weight), what the
//! model then predicts, and which tokens a memory's value pushes the
//! prediction towards. The views of the Mindset inspector
//! (`examples/mindset`) and of `mindset explain`.
//!
//! A memory's promoted tokens follow the direct path from the layer to the
//! logits, as the vocabulary projections of Geva et al., "Transformer
//! Feed-Forward Layers Build Predictions by Promoting Concepts in the
//! Vocabulary Space" (2022) and the logit lens: the value through the
//! layer's output projection (its head's rows; a key-value memory's value is
//! already in the residual stream), scaled by the final LayerNorm's gain,
//! and the tied unembedding. The LayerNorm's centring and normalisation,
//! and every later block, are left out: the scores rank tokens, they are
//! not the model's logits.

use burn::tensor::{Int, Tensor, TensorData};
use memstore_api::MemoryId;

use crate::gpt2::{FeedForward, Gpt2};
use crate::{DmtError, Result, host_f32, host_i64};

/// One memory a layer read for one position.
#[derive(Clone, Debug, PartialEq)]
pub struct Retrieval {
    /// The head whose search found it (0 for a key-value layer).
    pub head: usize,
    /// The memory's id in the layer's store.
    pub id: MemoryId,
    /// Its distance to the head's search key (the store's metric).
    pub distance: f32,
    /// Its weight in the layer's output: the softmax weight of a featural
    /// or associative head, the activation of a key-value memory.
    pub weight: f32,
}

/// What one memory layer read, position by position.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerReading {
    /// The block.
    pub block: usize,
    /// The layer's kind ([`FeedForward::kind`]).
    pub kind: &'static str,
    /// Heads searching separately (1 for a key-value layer).
    pub heads: usize,
    /// Memories retrieved per head.
    pub k: usize,
    /// Per position, every memory read, heaviest first (by |weight|).
    pub positions: Vec<Vec<Retrieval>>,
}

/// What the model did with a sequence of tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Explanation {
    /// The tokens.
    pub tokens: Vec<u32>,
    /// Per position, the most likely next tokens with their probabilities.
    pub next: Vec<Vec<(u32, f32)>>,
    /// Per memory layer, what it read.
    pub layers: Vec<LayerReading>,
}

/// Runs `model` over `tokens` (the exact computation, position by position
/// for a model with layerwise feedback) with every memory layer traced, and
/// returns each layer's retrievals and the `top` most likely next tokens at
/// each position. The model and its memory are not changed.
pub fn explain(model: &Gpt2, tokens: &[u32], top: usize) -> Result<Explanation> {
    let config = model.config();
    if tokens.is_empty() {
        return Err(DmtError::InvalidArgument("nothing to explain: no tokens".into()));
    }
    if let Some(&id) = tokens.iter().find(|&&id| id as usize >= config.vocab_size) {
        return Err(DmtError::TokenOutOfRange {
            id,
            vocab: config.vocab_size,
        });
    }
    if tokens.len() > config.n_positions {
        return Err(DmtError::SequenceTooLong {
            len: tokens.len(),
            max: config.n_positions,
        });
    }
    let t = tokens.len();
    let layers: Vec<(usize, &FeedForward)> = model
        .h
        .iter()
        .enumerate()
        .filter(|(_, b)| b.mlp.tracer().is_some())
        .map(|(i, b)| (i, &b.mlp))
        .collect();
    for (_, ff) in &layers {
        if let Some(tr) = ff.tracer() {
            tr.start();
        }
    }
    let device = model.device();
    let ids = Tensor::<2, Int>::from_data(
        TensorData::new(tokens.iter().map(|&x| x as i64).collect::<Vec<_>>(), [1, t]),
        &device,
    );
    let run = model.forward(ids, None);
    // Every trace is closed, whatever happened.
    let traces: Vec<_> = layers
        .iter()
        .map(|(_, ff)| ff.tracer().and_then(|tr| tr.take()).unwrap_or_default())
        .collect();
    let logits = run?;
    let vocab = config.vocab_size;
    let probs = host_f32(burn::tensor::activation::softmax(logits.reshape([t, vocab]), 1))?;
    let next = probs.chunks(vocab).map(|row| top_scores(row, top)).collect();
    let mut readings = Vec::with_capacity(layers.len());
    for ((block, ff), trace) in layers.into_iter().zip(traces) {
        let (mut slots, mut dist, mut weights, mut k) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for tr in trace {
            k = tr.distances.dims()[1];
            slots.extend(host_i64(tr.slots)?);
            dist.extend(host_f32(tr.distances)?);
            weights.extend(host_f32(tr.weights)?);
        }
        let rows = dist.len().checked_div(k).unwrap_or(0);
        if rows == 0 || !rows.is_multiple_of(t) {
            return Err(DmtError::InvalidArgument(format!(
                "block {block}'s trace has {rows} rows for {t} positions"
            )));
        }
        let heads = rows / t;
        let memory = ff
            .memory()
            .ok_or_else(|| DmtError::InvalidArgument(format!("block {block} has no memory")))?;
        let mut positions = Vec::with_capacity(t);
        for p in 0..t {
            let mut read = Vec::with_capacity(heads * k);
            for head in 0..heads {
                let row = p * heads + head;
                for j in 0..k {
                    let i = row * k + j;
                    let (slot, distance) = (slots[i], dist[i]);
                    if slot < 0 || !distance.is_finite() {
                        continue;
                    }
                    if let Some(id) = memory.id(slot as usize) {
                        read.push(Retrieval {
                            head,
                            id,
                            distance,
                            weight: weights[i],
                        });
                    }
                }
            }
            read.sort_by(|a, b| b.weight.abs().total_cmp(&a.weight.abs()).then(a.id.cmp(&b.id)));
            positions.push(read);
        }
        readings.push(LayerReading {
            block,
            kind: ff.kind(),
            heads,
            k,
            positions,
        });
    }
    Ok(Explanation {
        tokens: tokens.to_vec(),
        next,
        layers: readings,
    })
}

/// The `top` tokens a memory value of block `block` (head `head`) promotes
/// most, with their scores (see the module documentation), highest first.
pub fn promoted_tokens(model: &Gpt2, block: usize, head: usize, value: &[f32], top: usize) -> Result<Vec<(u32, f32)>> {
    let n = model.config().n_embd;
    let ff = &model
        .h
        .get(block)
        .ok_or_else(|| DmtError::InvalidArgument(format!("block {block} out of range (model has {})", model.h.len())))?
        .mlp;
    let device = model.device();
    let bad = |want: usize| {
        DmtError::InvalidArgument(format!(
            "a value of {} floats for block {block} (its memories hold {want})",
            value.len()
        ))
    };
    // A featural or associative value is one head wide and reaches the
    // residual stream through its head's rows of the output projection.
    let projection = match ff {
        FeedForward::Featural(f) => Some((&f.out, f.heads())),
        FeedForward::Associative(a) => Some((&a.out, a.heads())),
        FeedForward::KeyValue(_) => None,
        _ => {
            return Err(DmtError::InvalidArgument(format!(
                "block {block} is not a memory layer ({})",
                ff.kind()
            )));
        }
    };
    let residual = match projection {
        Some((out, heads)) => {
            let dh = n / heads.max(1);
            if value.len() != dh {
                return Err(bad(dh));
            }
            if head >= heads {
                return Err(DmtError::InvalidArgument(format!(
                    "head {head} out of range (block {block} has {heads})"
                )));
            }
            let v = Tensor::<2>::from_data(TensorData::new(value.to_vec(), [1, dh]), &device);
            v.matmul(out.weight.val().narrow(0, head * dh, dh))
        }
        None => {
            if value.len() != n {
                return Err(bad(n));
            }
            Tensor::<2>::from_data(TensorData::new(value.to_vec(), [1, n]), &device)
        }
    };
    let gain = model.ln_f.gamma.val().reshape([1, n]);
    let scores = (residual * gain).matmul(model.wte.weight.val().transpose());
    Ok(top_scores(&host_f32(scores)?, top))
}

/// The `top` largest entries of `row` as (index, value), largest first
/// (ties: lower index first).
pub fn top_scores(row: &[f32], top: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.into_iter().take(top).map(|i| (i as u32, row[i])).collect()
}
