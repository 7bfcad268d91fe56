//! Training and evaluation pieces shared by the teacher trainer and the
//! distillation job: a tokenised corpus split into train and held-out text,
//! a deterministic batch sampler, the warm-up + cosine schedule, the losses
//! (next-token cross-entropy and Hinton et al.'s distillation loss
//! T²·KL(teacher_T ‖ student_T), as Hugging Face's distillation examples use
//! it) and held-out evaluation (perplexity, KL to a teacher, top-1 agreement).

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand_core::RngCore as _;

use crate::{DmtError, Gpt2, Result};

pub use rand_xoshiro::SplitMix64;

/// Draws in `0..n` by reducing 64 random bits modulo `n`, so a seed gives the
/// same draws on every platform (the bias, under `n / 2⁶⁴`, is irrelevant
/// for sampling batch windows and shuffles).
pub trait Below: rand_core::RngCore {
    /// A number in `0..n` (`0` when `n == 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

impl<R: rand_core::RngCore + ?Sized> Below for R {}

/// A `[r, c]` matrix of N(0, 0.02²) entries (GPT-2's initialisation) drawn
/// from `rng` by Box–Muller, so that weights made with it depend on the seed
/// alone, not on a process-wide generator other work may draw from.
pub fn seeded_normal(r: usize, c: usize, rng: &mut SplitMix64, device: &Device) -> Tensor<2> {
    let mut u = || ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let data: Vec<f32> = (0..r * c)
        .map(|_| (0.02 * (-2.0 * u().ln()).sqrt() * (2.0 * std::f64::consts::PI * u()).cos()) as f32)
        .collect();
    Tensor::from_data(TensorData::new(data, [r, c]), device)
}

/// Token ids of a corpus, split into training and held-out parts.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// Training tokens.
    pub train: Vec<u32>,
    /// Held-out tokens (the end of the text).
    pub eval: Vec<u32>,
}

impl Corpus {
    /// Splits `tokens`, keeping the last `eval_fraction` for evaluation.
    pub fn split(tokens: Vec<u32>, eval_fraction: f64) -> Self {
        let cut = ((tokens.len() as f64) * (1.0 - eval_fraction)).round() as usize;
        let cut = cut.min(tokens.len());
        Corpus {
            eval: tokens[cut..].to_vec(),
            train: tokens[..cut].to_vec(),
        }
    }
}

/// A batch of `[b, t]` inputs and the next tokens as targets, on the host
/// (so models on different devices can take the same batch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// Sequences.
    pub b: usize,
    /// Positions per sequence.
    pub t: usize,
    /// Input ids, row-major `[b, t]`.
    pub inputs: Vec<i64>,
    /// Target ids (inputs shifted by one).
    pub targets: Vec<i64>,
}

impl Window {
    /// The inputs as a tensor on `device`.
    pub fn inputs(&self, device: &Device) -> Tensor<2, Int> {
        Tensor::from_data(TensorData::new(self.inputs.clone(), [self.b, self.t]), device)
    }

    /// The targets as a tensor on `device`.
    pub fn targets(&self, device: &Device) -> Tensor<2, Int> {
        Tensor::from_data(TensorData::new(self.targets.clone(), [self.b, self.t]), device)
    }

    /// Each sequence as a window of its own.
    pub fn rows(&self) -> impl Iterator<Item = Window> + '_ {
        (0..self.b).map(|r| Window {
            b: 1,
            t: self.t,
            inputs: self.inputs[r * self.t..(r + 1) * self.t].to_vec(),
            targets: self.targets[r * self.t..(r + 1) * self.t].to_vec(),
        })
    }

    fn from_starts(tokens: &[u32], starts: &[usize], t: usize) -> Self {
        let mut inputs = Vec::with_capacity(starts.len() * t);
        let mut targets = Vec::with_capacity(starts.len() * t);
        for &s in starts {
            inputs.extend(tokens[s..s + t].iter().map(|&v| v as i64));
            targets.extend(tokens[s + 1..s + t + 1].iter().map(|&v| v as i64));
        }
        Window {
            b: starts.len(),
            t,
            inputs,
            targets,
        }
    }
}

/// `b` random windows of `t + 1` tokens from `tokens`.
pub fn sample_batch(tokens: &[u32], b: usize, t: usize, rng: &mut SplitMix64) -> Result<Window> {
    if tokens.len() < t + 2 {
        return Err(DmtError::InvalidArgument(format!(
            "the corpus has {} tokens, too few for windows of {}",
            tokens.len(),
            t + 1
        )));
    }
    let starts: Vec<usize> = (0..b).map(|_| rng.below(tokens.len() - t - 1)).collect();
    Ok(Window::from_starts(tokens, &starts, t))
}

/// Consecutive, non-overlapping windows over `tokens` (evaluation), at most
/// `max_windows`, grouped into batches of `b`.
pub fn eval_batches(tokens: &[u32], b: usize, t: usize, max_windows: usize) -> Vec<Window> {
    let starts: Vec<usize> = (0..)
        .map(|i| i * t)
        .take_while(|s| s + t < tokens.len())
        .take(max_windows)
        .collect();
    starts
        .chunks(b.max(1))
        .map(|chunk| Window::from_starts(tokens, chunk, t))
        .collect()
}

/// Learning rate at `step` (0-based) of `total`: linear warm-up over
/// `warmup` steps to `peak`, then cosine decay to `peak · floor`.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64, floor: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let p = ((step - warmup) as f64 / span).min(1.0);
    peak * (floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

pub(crate) fn flat(logits: Tensor<3>) -> Tensor<2> {
    let [b, t, v] = logits.dims();
    logits.reshape([b * t, v])
}

/// Mean next-token cross-entropy (nats) of `logits` `[b, t, v]` against `targets` `[b, t]`.
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, t] = targets.dims();
    let logp = log_softmax(flat(logits), 1);
    logp.gather(1, targets.reshape([b * t, 1])).mean().neg()
}

/// The distillation loss `T² · KL(softmax(teacher/T) ‖ softmax(student/T))`,
/// mean over positions (Hinton et al. 2015).
pub fn distill_kl(student: Tensor<3>, teacher: Tensor<3>, temperature: f64) -> Tensor<1> {
    let t = temperature;
    let s = log_softmax(flat(student).div_scalar(t), 1);
    let lt = log_softmax(flat(teacher).div_scalar(t), 1).detach();
    let pt = lt.clone().exp();
    (pt * (lt - s)).sum_dim(1).mean().mul_scalar(t * t)
}

/// Reads a scalar tensor's value.
pub fn value(t: Tensor<1>) -> Result<f64> {
    crate::count_host_read();
    t.into_data()
        .convert::<f64>()
        .try_into_vec::<f64>()
        .map_err(|e| DmtError::InvalidArgument(format!("reading a scalar: {e:?}")))?
        .first()
        .copied()
        .ok_or_else(|| DmtError::InvalidArgument("empty scalar".into()))
}

/// Held-out statistics of a model, optionally against a teacher.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvalStats {
    /// Positions evaluated.
    pub tokens: usize,
    /// Mean next-token cross-entropy (nats).
    pub nll: f64,
    /// Mean KL(teacher ‖ model) at temperature 1 (nats), when a teacher is given.
    pub kl: Option<f64>,
    /// Share of positions whose argmax equals the teacher's, when given.
    pub agreement: Option<f64>,
    /// Wall-clock seconds of the model's own forward passes and
    /// cross-entropy (the teacher's passes and the comparison not counted).
    pub seconds: f64,
}

impl EvalStats {
    /// Perplexity, `exp(nll)`.
    pub fn perplexity(&self) -> f64 {
        self.nll.exp()
    }
}

/// A copy of `model` whose forward passes record no autodiff graph (its
/// parameters and trainable memory values untracked): evaluation never
/// calls backward, and a graph per batch (with a memory layer's gathered
/// rows in it) stayed alive until the process ran out of memory.
pub fn untracked(model: &Gpt2) -> Gpt2 {
    use burn::module::Module;
    let mut m = model.clone().no_grad();
    for b in m.h.iter_mut() {
        if let Some(t) = b.mlp.memory_mut() {
            t.set_trainable_values(false);
        }
    }
    m
}

/// Evaluates `model` on `batches` (and, with `teacher`, the KL to it and the
/// top-1 agreement with it), without recording a graph ([`untracked`]).
pub fn evaluate(model: &Gpt2, teacher: Option<&Gpt2>, batches: &[Window]) -> Result<EvalStats> {
    let model = &untracked(model);
    // Only the model's own forward pass and cross-entropy are timed (reading
    // the value waits for the device): the teacher's pass and the comparison
    // with it would otherwise make the student look slower than it is.
    let mut seconds = 0.0f64;
    let (mut nll, mut kl, mut agree, mut n) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    let device = model.device();
    for b in batches {
        let m = b.b * b.t;
        let start = std::time::Instant::now();
        let logits = model.forward(b.inputs(&device), None)?.detach();
        nll += value(cross_entropy(logits.clone(), b.targets(&device)))? * m as f64;
        seconds += start.elapsed().as_secs_f64();
        if let Some(teacher) = teacher {
            let tl = teacher.forward(b.inputs(&teacher.device()), None)?.detach();
            let logits = logits.inner();
            kl += value(distill_kl(logits.clone(), tl.clone(), 1.0))? * m as f64;
            let same = flat(logits).argmax(1).equal(flat(tl).argmax(1)).int().sum();
            agree += value(same.float())?;
        }
        n += m;
    }
    if n == 0 {
        return Err(DmtError::InvalidArgument("no held-out text to evaluate".into()));
    }
    Ok(EvalStats {
        tokens: n,
        nll: nll / n as f64,
        kl: teacher.map(|_| kl / n as f64),
        agreement: teacher.map(|_| agree / n as f64),
        seconds,
    })
}

/// How far layerwise feedback's teacher-forced approximation (the model's
/// training passes, [`Gpt2::forward_train`]) is from the exact sequential
/// computation ([`Gpt2::forward`]) on `batches`: the mean over positions of
/// KL(exact ‖ approximation), nats. Zero for a model without feedback.
pub fn feedback_mismatch(model: &Gpt2, batches: &[Window]) -> Result<f64> {
    let model = &untracked(model);
    let device = model.device();
    let (mut kl, mut n) = (0.0f64, 0usize);
    for b in batches {
        let m = b.b * b.t;
        let exact = model.forward(b.inputs(&device), None)?.detach().inner();
        let approx = model.forward_train(b.inputs(&device))?.detach().inner();
        kl += value(distill_kl(approx, exact, 1.0))? * m as f64;
        n += m;
    }
    if n == 0 {
        return Err(DmtError::InvalidArgument("no held-out text to compare on".into()));
    }
    Ok(kl / n as f64)
}
