//! Autoregressive decoding: greedy, temperature, top-k and top-p (nucleus)
//! sampling, with or without the KV cache.

use burn::tensor::{Int, Tensor, TensorData};
use rand_core::{RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;

use crate::gpt2::{Gpt2, KvCache};
use crate::{DmtError, Result};

/// How the next token is chosen.
#[derive(Clone, Debug)]
pub struct Sampling {
    /// Take the most likely token (ties: lowest id). Overrides the rest.
    pub greedy: bool,
    /// Softmax temperature (> 0).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            greedy: true,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    fn check(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(DmtError::InvalidArgument(format!(
                "temperature must be > 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(DmtError::InvalidArgument(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Picks the next token from one row of logits.
pub fn pick(logits: &[f32], s: &Sampling, rng: &mut impl RngCore) -> u32 {
    if s.greedy {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let max = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / s.temperature as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (j, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= s.top_p as f64 {
                keep = j + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let mut acc = 0.0;
    for (j, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return idx[j] as u32;
        }
    }
    idx[idx.len() - 1] as u32
}

/// Generates `max_new` tokens after `prompt`; returns prompt + generated ids.
/// With `use_cache`, the prompt is run once and each new token alone;
/// without, the whole sequence is run at every step.
pub fn generate(model: &Gpt2, prompt: &[u32], max_new: usize, s: &Sampling, use_cache: bool) -> Result<Vec<u32>> {
    s.check()?;
    let vocab = model.config().vocab_size;
    if prompt.is_empty() {
        return Err(DmtError::InvalidArgument("the prompt is empty".into()));
    }
    if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab) {
        return Err(DmtError::TokenOutOfRange { id, vocab });
    }
    let total = prompt.len() + max_new;
    if total > model.config().n_positions {
        return Err(DmtError::SequenceTooLong {
            len: total,
            max: model.config().n_positions,
        });
    }
    let device = model.device();
    let ids_tensor = |ids: &[u32]| {
        let data: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
        Tensor::<2, Int>::from_data(TensorData::new(data, [1, ids.len()]), &device)
    };
    let mut out = prompt.to_vec();
    let mut cache = KvCache::new();
    let mut rng = SplitMix64::seed_from_u64(s.seed);
    let mut feed = prompt.to_vec();
    for _ in 0..max_new {
        let logits = if use_cache {
            model.forward(ids_tensor(&feed), Some(&mut cache))?
        } else {
            model.forward(ids_tensor(&out), None)?
        };
        let [_, t, v] = logits.dims();
        let last = logits.narrow(1, t - 1, 1).reshape([v]);
        let row: Vec<f32> = last
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| DmtError::InvalidArgument(format!("reading logits: {e:?}")))?;
        let next = pick(&row, s, &mut rng);
        out.push(next);
        feed = vec![next];
    }
    Ok(out)
}
