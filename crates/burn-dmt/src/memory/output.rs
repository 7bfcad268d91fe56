//! The output memory: a nearest-neighbour memory at the LM head, as in
//! kNN-LM ("Generalization through Memorization: Nearest Neighbor Language
//! Models", Khandelwal et al. 2020). Each row is one position of a
//! memorised text: its key is the model's final hidden state there (after
//! `ln_f`, what the tied head multiplies), its value the token that
//! followed. At inference the `k` nearest rows of a position vote for their
//! tokens and their distribution is mixed into the model's:
//!
//! `p(y) = (1 − λ) · p_model(y) + λ · p_memory(y)`
//!
//! where the nearest row lies within the memory's radius, and `p_model`
//! alone elsewhere. The radius is calibrated on the training text
//! ([`OutputMemory::radius_for`]): it is the distance to the nearest row
//! below which only a chosen share of the training text's positions fall,
//! so the memory answers positions that resemble what it memorised and
//! stays silent on the text the model was trained on. Where it answers, the
//! log-probability of any token falls by at most `−ln(1 − λ)`, which bounds
//! what it can cost on other text.
//!
//! Unlike the feed-forward memories, whose outputs pass through the frozen
//! head and so through its rank (the softmax bottleneck: `n_embd`
//! dimensions for the whole vocabulary), the output memory changes the
//! next-token distribution directly. It changes no weight, and its rows
//! are store rows with tags: a source's rows are deleted by their tag.
//! The mixture is computed on the host and is not differentiable (no
//! gradient reaches the weights through it); training never uses it.

use std::fmt;

use burn::tensor::{Tensor, TensorData};
use memstore_api::{MemoryId, MemoryStore, Metric};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{DmtError, Result};

/// How an output memory answers: its neighbours, mixture weight and radius.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputParams {
    /// Rows that vote per position.
    pub k: usize,
    /// Weight `λ` of the memory's distribution where it answers, in `[0, 1)`.
    pub lambda: f32,
    /// Share of the training text's positions whose nearest row may lie
    /// within the radius (the calibration's quantile).
    pub quantile: f64,
    /// A position is answered when its nearest row is at most this far
    /// (L2); rows farther away do not vote.
    pub radius: f32,
}

impl Default for OutputParams {
    fn default() -> Self {
        OutputParams {
            k: 1024,
            lambda: 0.3,
            quantile: 1.0,
            radius: 0.0,
        }
    }
}

impl OutputParams {
    /// Refuses parameters that cannot be used.
    pub fn check(&self) -> Result<()> {
        let usable = self.k > 0
            && (0.0..1.0).contains(&self.lambda)
            && (0.0..=1.0).contains(&self.quantile)
            && self.radius.is_finite()
            && self.radius >= 0.0;
        if !usable {
            return Err(DmtError::InvalidArgument(format!(
                "output memory: k {} must be at least 1, λ {} in [0, 1), quantile {} in [0, 1] and radius {} \
                 finite and not negative",
                self.k, self.lambda, self.quantile, self.radius
            )));
        }
        Ok(())
    }
}

/// The rows of an output memory on the host, with how they answer.
#[derive(Clone, PartialEq)]
pub struct OutputMemory {
    dim: usize,
    vocab: usize,
    keys: Vec<f32>,
    tokens: Vec<u32>,
    ids: Vec<MemoryId>,
    /// How it answers.
    pub params: OutputParams,
}

impl fmt::Debug for OutputMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutputMemory")
            .field("dim", &self.dim)
            .field("rows", &self.tokens.len())
            .field("params", &self.params)
            .finish()
    }
}

impl OutputMemory {
    /// An empty memory for hidden states of width `dim` and a vocabulary of `vocab`.
    pub fn new(dim: usize, vocab: usize, params: OutputParams) -> Result<Self> {
        params.check()?;
        if dim == 0 || vocab == 0 {
            return Err(DmtError::InvalidArgument(
                "output memory: hidden width and vocabulary must not be 0".into(),
            ));
        }
        Ok(OutputMemory {
            dim,
            vocab,
            keys: Vec::new(),
            tokens: Vec::new(),
            ids: Vec::new(),
            params,
        })
    }

    /// Reads every row of `store` (keys of width `dim`, one value: the
    /// token id); refuses a store of other dimensions or a value that is not
    /// a token id of `vocab`.
    pub async fn load(store: &dyn MemoryStore, vocab: usize, dim: usize, params: OutputParams) -> Result<Self> {
        let c = store.config();
        if c.key_dim != dim || c.value_dim != 1 || c.metric != Metric::L2 {
            return Err(DmtError::InvalidArgument(format!(
                "output memory store has keys of {} and values of {} ({:?}); expected keys of {dim}, one value, L2",
                c.key_dim, c.value_dim, c.metric
            )));
        }
        let mut m = OutputMemory::new(dim, vocab, params)?;
        let mut ids = store.ids().await?;
        ids.sort_unstable();
        for chunk in ids.chunks(4096) {
            let rows = store.get(chunk).await?;
            let (mut keys, mut tokens, mut got) = (Vec::new(), Vec::new(), Vec::new());
            for r in rows {
                keys.extend_from_slice(&r.key);
                tokens.push(r.value.first().copied().unwrap_or(f32::NAN));
                got.push(r.id);
            }
            m.push(&got, &keys, &tokens)?;
        }
        Ok(m)
    }

    /// Appends rows: ids, keys (`n × dim`) and next tokens (as stored, f32).
    pub fn push(&mut self, ids: &[MemoryId], keys: &[f32], tokens: &[f32]) -> Result<()> {
        if keys.len() != ids.len() * self.dim || tokens.len() != ids.len() {
            return Err(DmtError::InvalidArgument(format!(
                "output memory: {} ids, {} key floats and {} tokens for width {}",
                ids.len(),
                keys.len(),
                tokens.len(),
                self.dim
            )));
        }
        let mut toks = Vec::with_capacity(tokens.len());
        for (&t, id) in tokens.iter().zip(ids) {
            if !(t.is_finite() && t >= 0.0 && t.fract() == 0.0 && (t as usize) < self.vocab) {
                return Err(DmtError::InvalidArgument(format!(
                    "output memory row {id}: value {t} is not a token id of a vocabulary of {}",
                    self.vocab
                )));
            }
            toks.push(t as u32);
        }
        if keys.iter().any(|x| !x.is_finite()) {
            return Err(DmtError::InvalidArgument("output memory: a key is not finite".into()));
        }
        self.keys.extend_from_slice(keys);
        self.tokens.extend(toks);
        self.ids.extend_from_slice(ids);
        Ok(())
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether it holds no row (it then changes nothing).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Hidden-state width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The rows' store ids, in the order held.
    pub fn ids(&self) -> &[MemoryId] {
        &self.ids
    }

    /// Each query's (`m × dim`) distance to its nearest row among those
    /// from `from` on (`+∞` where there is none).
    pub fn nearest_from(&self, queries: &[f32], from: usize) -> Result<Vec<f32>> {
        let m = queries.len() / self.dim.max(1);
        if from >= self.len() {
            return Ok(vec![f32::INFINITY; m]);
        }
        let keys = &self.keys[from * self.dim..];
        let (d, _) = memstore_engine::gemm::topk_sgemm(Metric::L2, queries, keys, self.dim, 1, None)?;
        Ok(d)
    }

    /// The radius below which a share `quantile` of the distances
    /// `nearest` (the training text's positions' distances to their nearest
    /// row) falls: 0 for quantile 0, the largest finite distance for 1.
    pub fn radius_for(nearest: &[f32], quantile: f64) -> f32 {
        let mut d: Vec<f32> = nearest.iter().copied().filter(|x| x.is_finite()).collect();
        if d.is_empty() || quantile <= 0.0 {
            return 0.0;
        }
        d.sort_by(f32::total_cmp);
        let i = ((d.len() as f64 * quantile.min(1.0)).ceil() as usize).clamp(1, d.len()) - 1;
        d[i]
    }

    /// The next-token log-probabilities of positions whose logits are
    /// `logits` (`m × vocab`) and final hidden states `queries`
    /// (`m × dim`): the model's log-softmax, mixed with the memory's
    /// distribution where the nearest row lies within the radius.
    pub fn mix_host(&self, queries: &[f32], logits: &[f32]) -> Result<Vec<f32>> {
        let v = self.vocab;
        let m = logits.len() / v;
        if logits.len() != m * v || queries.len() != m * self.dim {
            return Err(DmtError::InvalidArgument(format!(
                "output memory: {} logits and {} query floats for a vocabulary of {v} and width {}",
                logits.len(),
                queries.len(),
                self.dim
            )));
        }
        let mut out = logits.to_vec();
        let k = self.params.k.min(self.len());
        let found = if k > 0 {
            Some(memstore_engine::gemm::topk_sgemm(
                Metric::L2,
                queries,
                &self.keys,
                self.dim,
                k,
                None,
            )?)
        } else {
            None
        };
        let (lambda, radius) = (self.params.lambda as f64, self.params.radius);
        out.par_chunks_mut(v)
            .enumerate()
            .for_each_init(Vec::new, |votes, (r, row)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = max as f64 + row.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln();
                for x in row.iter_mut() {
                    *x = (*x as f64 - lse) as f32;
                }
                let Some((dist, idx)) = &found else { return };
                let (ds, is) = (&dist[r * k..(r + 1) * k], &idx[r * k..(r + 1) * k]);
                if is[0] == u32::MAX || ds[0].is_nan() || ds[0] > radius {
                    return;
                }
                // Rows within the radius vote, weighted by how much farther
                // than the nearest they are, on the radius's scale.
                votes.clear();
                let scale = radius.max(f32::MIN_POSITIVE) as f64;
                let mut total = 0.0f64;
                for (&d, &i) in ds.iter().zip(is) {
                    if i == u32::MAX || d.is_nan() || d > radius {
                        break;
                    }
                    let w = (-((d - ds[0]) as f64) / scale).exp();
                    votes.push((self.tokens[i as usize], w));
                    total += w;
                }
                votes.sort_unstable_by_key(|x| x.0);
                let keep = (1.0 - lambda).ln();
                let mut j = 0;
                for (tok, x) in row.iter_mut().enumerate() {
                    let mut p = 0.0;
                    while j < votes.len() && votes[j].0 as usize == tok {
                        p += votes[j].1;
                        j += 1;
                    }
                    *x = if p > 0.0 {
                        ((1.0 - lambda) * (*x as f64).exp() + lambda * p / total).ln() as f32
                    } else {
                        (*x as f64 + keep) as f32
                    };
                }
            });
        Ok(out)
    }

    /// [`OutputMemory::mix_host`] of tensors: logits `[b, t, vocab]` and
    /// final hidden states `[b, t, dim]` give log-probabilities `[b, t,
    /// vocab]` on the logits' device (detached).
    pub fn mix(&self, logits: Tensor<3>, hidden: Tensor<3>) -> Result<Tensor<3>> {
        let [b, t, v] = logits.dims();
        if v != self.vocab || hidden.dims() != [b, t, self.dim] {
            return Err(DmtError::InvalidArgument(format!(
                "output memory of width {} and vocabulary {}: hidden states {:?}, logits {:?}",
                self.dim,
                self.vocab,
                hidden.dims(),
                [b, t, v]
            )));
        }
        let device = logits.device();
        let q = crate::host_f32(hidden)?;
        let l = crate::host_f32(logits)?;
        let out = self.mix_host(&q, &l)?;
        Ok(Tensor::from_data(TensorData::new(out, [b, t, v]), &device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_softmax(x: &[f32]) -> Vec<f64> {
        let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        x.iter().map(|&v| v as f64 - lse).collect()
    }

    /// Three rows in the plane; a query at the first row mixes in its two
    /// nearest rows' tokens, weighted by distance on the radius's scale; a
    /// query farther than the radius from every row is the model's own.
    #[test]
    fn mixes_the_nearest_rows_tokens_within_the_radius() {
        let params = OutputParams {
            k: 2,
            lambda: 0.5,
            quantile: 0.2,
            radius: 2.0,
        };
        let mut m = OutputMemory::new(2, 4, params).unwrap();
        m.push(&[7, 8, 9], &[0.0, 0.0, 1.0, 0.0, 10.0, 10.0], &[1.0, 2.0, 3.0])
            .unwrap();
        let logits = [0.5f32, -1.0, 2.0, 0.0, 0.5, -1.0, 2.0, 0.0];
        let out = m.mix_host(&[0.0, 0.0, 5.0, -5.0], &logits).unwrap();
        let lp = log_softmax(&logits[..4]);
        let (w1, w2) = (1.0f64, (-1.0f64 / 2.0).exp());
        let mut want: Vec<f64> = lp.iter().map(|l| 0.5 * l.exp()).collect();
        want[1] += 0.5 * w1 / (w1 + w2);
        want[2] += 0.5 * w2 / (w1 + w2);
        for (g, w) in out[..4].iter().zip(&want) {
            assert!((*g as f64 - w.ln()).abs() < 1e-6, "{:?} against {want:?}", &out[..4]);
        }
        for (g, w) in out[4..].iter().zip(&lp) {
            assert!(
                (*g as f64 - w).abs() < 1e-6,
                "beyond the radius: {:?} against {lp:?}",
                &out[4..]
            );
        }
        for row in out.chunks(4) {
            let total: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
            assert!((total - 1.0).abs() < 1e-6, "{total}");
        }
    }

    /// Wherever it answers, no token's log-probability falls by more than
    /// `−ln(1 − λ)`; an empty memory is the model's log-softmax.
    #[test]
    fn a_token_loses_at_most_the_mixture_weight() {
        let params = OutputParams {
            k: 4,
            lambda: 0.75,
            quantile: 0.2,
            radius: 100.0,
        };
        let (dim, vocab) = (3, 11);
        let mut m = OutputMemory::new(dim, vocab, params).unwrap();
        let empty = m.clone();
        let keys: Vec<f32> = (0..30).map(|i| ((i * 7) % 13) as f32 * 0.3).collect();
        let toks: Vec<f32> = (0..10).map(|i| (i % vocab) as f32).collect();
        m.push(&(0..10).collect::<Vec<_>>(), &keys, &toks).unwrap();
        let q: Vec<f32> = (0..15).map(|i| ((i * 5) % 11) as f32 * 0.4).collect();
        let logits: Vec<f32> = (0..55).map(|i| ((i * 3) % 17) as f32 * 0.5 - 2.0).collect();
        let out = m.mix_host(&q, &logits).unwrap();
        let own = empty.mix_host(&q, &logits).unwrap();
        for (r, row) in logits.chunks(vocab).enumerate() {
            let lp = log_softmax(row);
            for (t, l) in lp.iter().enumerate() {
                assert!((own[r * vocab + t] as f64 - l).abs() < 1e-6);
                assert!(
                    out[r * vocab + t] as f64 >= l + (0.25f64).ln() - 1e-6,
                    "row {r} token {t}"
                );
            }
        }
        assert_ne!(out, own);
    }

    #[test]
    fn radius_is_the_quantile_of_the_distances() {
        let d = [4.0, f32::INFINITY, 1.0, 3.0, 2.0];
        assert_eq!(OutputMemory::radius_for(&d, 0.0), 0.0);
        assert_eq!(OutputMemory::radius_for(&d, 0.25), 1.0);
        assert_eq!(OutputMemory::radius_for(&d, 0.5), 2.0);
        assert_eq!(OutputMemory::radius_for(&d, 1.0), 4.0);
        assert_eq!(OutputMemory::radius_for(&[f32::INFINITY], 0.5), 0.0);
    }

    #[test]
    fn refuses_what_is_not_a_row_or_a_setting() {
        let p = OutputParams::default();
        let mut m = OutputMemory::new(2, 5, p).unwrap();
        for (toks, keys) in [
            (vec![5.0], vec![0.0, 0.0]),
            (vec![1.5], vec![0.0, 0.0]),
            (vec![-1.0], vec![0.0, 0.0]),
            (vec![f32::NAN], vec![0.0, 0.0]),
            (vec![1.0], vec![0.0, f32::INFINITY]),
            (vec![1.0], vec![0.0]),
        ] {
            assert!(m.push(&[1], &keys, &toks).is_err(), "{toks:?} {keys:?}");
        }
        assert!(m.is_empty());
        for bad in [
            OutputParams { k: 0, ..p },
            OutputParams { lambda: 1.0, ..p },
            OutputParams { lambda: -0.1, ..p },
            OutputParams { quantile: 1.5, ..p },
            OutputParams { radius: f32::NAN, ..p },
        ] {
            assert!(OutputMemory::new(2, 5, bad).is_err(), "{bad:?}");
        }
        assert!(m.mix_host(&[0.0; 3], &[0.0; 5]).is_err());
    }
}
