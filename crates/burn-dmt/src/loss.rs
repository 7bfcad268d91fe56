//! The training losses with their gradient written by hand: the
//! distillation objective `α · T² · KL(teacher_T ‖ student_T) + (1 − α) ·
//! CE` (Hinton et al. 2015, "Distilling the Knowledge in a Neural
//! Network") and the next-token cross-entropy alone.
//!
//! Recorded by autodiff, these losses keep several `[positions, vocab]`
//! tensors alive for the backward pass (the log-softmaxes, their
//! exponentials, the KL products) and run a dozen vocabulary-wide
//! operations backwards. Their gradient with respect to the student's
//! logits `z` at one of `n` positions has a closed form,
//!
//! `∂/∂z = α·T/n · (softmax(z/T) − softmax(teacher/T)) + (1 − α)/n ·
//! (softmax(z) − onehot(target))`,
//!
//! so it is computed without recording anything and put on the graph as
//! one product `Σ z · g` with `g` a constant: the backward pass reaches the
//! logits with `g` and nothing vocabulary-wide is kept. For a model whose
//! LM head is its token embedding `E` (GPT-2's tied head, [`TiedHead`]),
//! the logits `z = h · Eᵀ` need not be on the graph at all: the surrogate
//! `Σ h · (g · E) + Σ E · (gᵀ · h)` gives the hidden states `h` and `E`
//! their gradients directly (the head's backward products), so the
//! `[positions, vocab]` logits are never recorded or multiplied by `g`.
//! On the CPU backend the values and `g` come from one fused pass per
//! position on the host (three vectorised exponentials per logit, two at
//! T = 2, rows in parallel, as Liger-Kernel's fused cross-entropy does on
//! GPUs); elsewhere from tensor operations [`LOSS_CHUNK`] positions at a
//! time, so that only a chunk's intermediates live at once. Both equal
//! [`crate::train::distill_kl`] and [`crate::train::cross_entropy`] (and
//! their recorded gradients) to f32 rounding; `tests/loss.rs` holds them,
//! and the tied head's gradients, to 1e-5.

use burn::tensor::activation::log_softmax;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};
use rayon::prelude::*;
use wide::f32x8;

use crate::memory::device::on_cpu;
use crate::precision::{Precision, matmul};
use crate::train::flat;
use crate::{DmtError, Result, cpu_i64, host_f32, host_i64};

/// A loss computed by [`distill_loss`] or [`cross_entropy_loss`].
#[derive(Clone, Debug)]
pub struct DistillLoss {
    /// A scalar on the student's graph whose gradient with respect to the
    /// student's logits is the objective's (its value is not the
    /// objective's: read [`DistillLoss::objective`]).
    pub surrogate: Tensor<1>,
    /// `T² · KL(teacher_T ‖ student_T)`, mean over positions (no graph;
    /// zero without a teacher).
    pub kd: Tensor<1>,
    /// Next-token cross-entropy, mean over positions (no graph).
    pub ce: Tensor<1>,
    alpha: f64,
}

impl DistillLoss {
    /// `α · kd + (1 − α) · ce` (no graph).
    pub fn objective(&self) -> Tensor<1> {
        objective(&self.kd, &self.ce, self.alpha)
    }
}

/// `α · kd + (1 − α) · ce`.
fn objective(kd: &Tensor<1>, ce: &Tensor<1>, alpha: f64) -> Tensor<1> {
    kd.clone().mul_scalar(alpha) + ce.clone().mul_scalar(1.0 - alpha)
}

/// Positions per chunk of the tensor path: a few `[chunk, vocab]` f32
/// intermediates live at a time (12 MiB each at GPT-2's 50,257 tokens).
pub const LOSS_CHUNK: usize = 64;

/// The distillation objective of `student` logits `[b, t, v]` against
/// `teacher` logits and `targets` `[b, t]` at `temperature`, weight `alpha`
/// on the distillation term (see the module documentation).
pub fn distill_loss(
    student: Tensor<3>,
    teacher: Tensor<3>,
    targets: Tensor<2, Int>,
    temperature: f64,
    alpha: f64,
) -> Result<DistillLoss> {
    loss_with(student, Some(teacher), targets, temperature, alpha, LossKernel::Auto)
}

/// The next-token cross-entropy of `student` logits `[b, t, v]` against
/// `targets` `[b, t]` (`kd` zero, weight 0).
pub fn cross_entropy_loss(student: Tensor<3>, targets: Tensor<2, Int>) -> Result<DistillLoss> {
    loss_with(student, None, targets, 1.0, 0.0, LossKernel::Auto)
}

/// How a loss is computed (both give the same values and gradient).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LossKernel {
    /// [`LossKernel::Host`] on the CPU backend, [`LossKernel::Chunked`] elsewhere.
    #[default]
    Auto,
    /// One fused pass per position on the host (reads the logits back).
    Host,
    /// Tensor operations on the logits' device, [`LOSS_CHUNK`] positions at a time.
    Chunked,
}

/// [`distill_loss`] (with a teacher) or [`cross_entropy_loss`] (without),
/// computed by `kernel`.
pub fn loss_with(
    student: Tensor<3>,
    teacher: Option<Tensor<3>>,
    targets: Tensor<2, Int>,
    temperature: f64,
    alpha: f64,
    kernel: LossKernel,
) -> Result<DistillLoss> {
    check_inputs(temperature, student.dims(), teacher.as_ref(), &targets)?;
    let alpha = if teacher.is_some() { alpha } else { 0.0 };
    let z = flat(student);
    let s = z.clone().inner();
    let tl = teacher.map(|x| flat(x).inner());
    let (g, kd, ce) = logit_gradient(s, tl, targets, temperature, alpha, kernel)?;
    Ok(DistillLoss {
        surrogate: (z * g).sum(),
        kd,
        ce,
        alpha,
    })
}

/// Refuses a temperature that is not positive, no logits, teacher logits
/// or targets of another shape than the student's `[b, t, v]` logits.
fn check_inputs(
    temperature: f64,
    [b, t, v]: [usize; 3],
    teacher: Option<&Tensor<3>>,
    targets: &Tensor<2, Int>,
) -> Result<()> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(DmtError::InvalidArgument(format!(
            "the distillation temperature must be positive (got {temperature})"
        )));
    }
    if b * t == 0 || v == 0 {
        return Err(DmtError::InvalidArgument(format!(
            "no logits to take a loss of ({b}×{t}×{v})"
        )));
    }
    if let Some(te) = teacher
        && te.dims() != [b, t, v]
    {
        return Err(DmtError::InvalidArgument(format!(
            "teacher logits {:?} against student logits {:?}",
            te.dims(),
            [b, t, v]
        )));
    }
    if targets.dims() != [b, t] {
        return Err(DmtError::InvalidArgument(format!(
            "targets {:?} against student logits {:?}",
            targets.dims(),
            [b, t, v]
        )));
    }
    Ok(())
}

/// `(g, kd, ce)` of logits `s` `[n, v]` (no graph): the objective's
/// gradient with respect to them and its two terms, means over positions.
fn logit_gradient(
    s: Tensor<2>,
    tl: Option<Tensor<2>>,
    targets: Tensor<2, Int>,
    temperature: f64,
    alpha: f64,
    kernel: LossKernel,
) -> Result<(Tensor<2>, Tensor<1>, Tensor<1>)> {
    let [n, v] = s.dims();
    let y = targets.reshape([n, 1]);
    let w = Weights {
        temperature,
        kd: alpha * temperature / n as f64,
        ce: (1.0 - alpha) / n as f64,
    };
    let device = s.device();
    let host = match kernel {
        LossKernel::Auto => on_cpu(&device),
        LossKernel::Host => true,
        LossKernel::Chunked => false,
    };
    let (g, kd, ce) = if host {
        // The CPU backend's logits are in host memory already: no device
        // read to count, and no copy where the loss holds their only handle
        // (read in place; a `Vec` of them would copy `[n, v]` floats into a
        // new buffer, twice for a shared tensor).
        let cpu = on_cpu(&device);
        let floats = |t: Tensor<2>| -> Result<TensorData> {
            if cpu {
                Ok(t.into_data().convert::<f32>())
            } else {
                Ok(TensorData::new(host_f32(t)?, [n, v]))
            }
        };
        let (sd, td) = (floats(s)?, tl.map(floats).transpose()?);
        let sv = f32_slice(&sd)?;
        let tv = td.as_ref().map(f32_slice).transpose()?;
        let yv = if cpu { cpu_i64(y)? } else { host_i64(y)? };
        let (g, kd, ce) = host_rows(sv, tv, &yv, v, &w)?;
        let g = Tensor::<2>::from_data(TensorData::new(g, [n, v]), &device);
        let scalar = |x: f64| Tensor::<1>::from_data(TensorData::new(vec![x as f32], [1]), &device);
        (g, scalar(kd), scalar(ce))
    } else {
        chunked(s, tl, y, &w)
    };
    Ok((
        g,
        kd.mul_scalar(temperature * temperature / n as f64),
        ce.div_scalar(n as f64),
    ))
}

/// The floats of host tensor data, borrowed.
fn f32_slice(d: &TensorData) -> Result<&[f32]> {
    d.as_slice::<f32>()
        .map_err(|e| DmtError::InvalidArgument(format!("reading a tensor: {e:?}")))
}

/// A tied LM head's input and output for a loss: the final hidden states
/// `[n, c]` and the token embedding `[v, c]` on the autodiff graph, and the
/// logits `hidden · embeddingᵀ` computed off it. The loss's gradient
/// reaches the graph through the head's two products
/// ([`TiedGradient::into_loss`]), so the `[n, v]` logits are never
/// recorded, multiplied by the gradient or kept for the backward pass.
#[derive(Clone, Debug)]
pub struct TiedHead {
    hidden: Tensor<2>,
    embedding: Tensor<2>,
    logits: Tensor<2>,
    dims: [usize; 3],
    precision: Precision,
}

impl TiedHead {
    /// The head over `hidden` `[b, t, c]` (after the final layer norm)
    /// with `embedding` `[v, c]` as its weight: computes the logits.
    pub fn new(hidden: Tensor<3>, embedding: Tensor<2>) -> Result<Self> {
        Self::with_precision(hidden, embedding, Precision::F32)
    }

    /// [`TiedHead::new`] with the head's three products (the logits and
    /// the two of the backward pass) in `precision`.
    pub fn with_precision(hidden: Tensor<3>, embedding: Tensor<2>, precision: Precision) -> Result<Self> {
        let [b, t, c] = hidden.dims();
        let [v, ce] = embedding.dims();
        if c != ce {
            return Err(DmtError::InvalidArgument(format!(
                "hidden states of width {c} for an embedding of width {ce}"
            )));
        }
        let hidden = hidden.reshape([b * t, c]);
        let logits = matmul(hidden.clone().inner(), embedding.clone().inner().transpose(), precision);
        Ok(Self {
            hidden,
            embedding,
            logits,
            dims: [b, t, v],
            precision,
        })
    }
}

/// A loss's value and its gradient with respect to a [`TiedHead`]'s
/// logits, before the gradient is put on the graph.
#[derive(Clone, Debug)]
pub struct TiedGradient {
    hidden: Tensor<2>,
    embedding: Tensor<2>,
    precision: Precision,
    g: Tensor<2>,
    /// As [`DistillLoss::kd`].
    pub kd: Tensor<1>,
    /// As [`DistillLoss::ce`].
    pub ce: Tensor<1>,
    alpha: f64,
}

impl TiedGradient {
    /// `α · kd + (1 − α) · ce` (no graph).
    pub fn objective(&self) -> Tensor<1> {
        objective(&self.kd, &self.ce, self.alpha)
    }

    /// The loss with its surrogate `Σ hidden · (g · E) + Σ E · (gᵀ · hidden)`
    /// (the products constants): its gradient with respect to the hidden
    /// states is `g · E` and with respect to the embedding `E` is
    /// `gᵀ · hidden`, the head's backward pass for the logits' gradient `g`.
    /// A frozen embedding (not tracked by autodiff) gets no product.
    pub fn into_loss(self) -> DistillLoss {
        self.into_scaled_loss(1.0)
    }

    /// [`TiedGradient::into_loss`] with the surrogate, so every gradient of
    /// the backward pass, multiplied by `scale` (the loss scale of reduced
    /// precision, [`crate::precision`]): the head's products take the
    /// scaled `g`, in the head's precision.
    pub fn into_scaled_loss(self, scale: f32) -> DistillLoss {
        let (hidden, embedding, precision) = (self.hidden, self.embedding, self.precision);
        let g = if scale == 1.0 { self.g } else { self.g.mul_scalar(scale) };
        let to_hidden = matmul(g.clone(), embedding.clone().inner(), precision);
        let mut surrogate = (hidden.clone() * to_hidden).sum();
        if embedding.is_tracked() {
            let to_embedding = matmul(g.transpose(), hidden.inner(), precision);
            surrogate = surrogate + (embedding * to_embedding).sum();
        }
        DistillLoss {
            surrogate,
            kd: self.kd,
            ce: self.ce,
            alpha: self.alpha,
        }
    }
}

/// [`loss_with`] for the logits of a tied head: the same values, and the
/// same gradient with respect to the hidden states and the embedding, with
/// the logits off the autodiff graph.
pub fn tied_loss(
    head: TiedHead,
    teacher: Option<Tensor<3>>,
    targets: Tensor<2, Int>,
    temperature: f64,
    alpha: f64,
    kernel: LossKernel,
) -> Result<TiedGradient> {
    check_inputs(temperature, head.dims, teacher.as_ref(), &targets)?;
    let alpha = if teacher.is_some() { alpha } else { 0.0 };
    let tl = teacher.map(|x| flat(x).inner());
    let TiedHead {
        hidden,
        embedding,
        logits,
        precision,
        ..
    } = head;
    // The logits go to the loss as their only handle (read without a copy
    // on the CPU) and are dropped there.
    let (g, kd, ce) = logit_gradient(logits, tl, targets, temperature, alpha, kernel)?;
    Ok(TiedGradient {
        hidden,
        embedding,
        precision,
        g,
        kd,
        ce,
        alpha,
    })
}

/// The gradient's weights: `kd` on the softmax difference at the
/// temperature, `ce` on softmax minus one-hot.
struct Weights {
    temperature: f64,
    kd: f64,
    ce: f64,
}

/// The tensor path: `(g, Σ KL, Σ CE)` over positions, [`LOSS_CHUNK`] rows
/// at a time.
fn chunked(s: Tensor<2>, tl: Option<Tensor<2>>, y: Tensor<2, Int>, w: &Weights) -> (Tensor<2>, Tensor<1>, Tensor<1>) {
    let [n, _] = s.dims();
    let t = w.temperature;
    let device = s.device();
    let (mut kd, mut ce) = (Tensor::<1>::zeros([1], &device), Tensor::<1>::zeros([1], &device));
    let mut grads = Vec::with_capacity(n.div_ceil(LOSS_CHUNK));
    for start in (0..n).step_by(LOSS_CHUNK) {
        let len = LOSS_CHUNK.min(n - start);
        let sc = s.clone().narrow(0, start, len);
        let yc = y.clone().narrow(0, start, len);
        let ls = log_softmax(sc.clone(), 1);
        ce = ce - ls.clone().gather(1, yc.clone()).sum();
        let mut g = ls.exp().mul_scalar(w.ce);
        if let Some(tl) = &tl {
            let ls_t = log_softmax(sc.div_scalar(t), 1);
            let lt_t = log_softmax(tl.clone().narrow(0, start, len).div_scalar(t), 1);
            let pt = lt_t.clone().exp();
            kd = kd + (pt.clone() * (lt_t - ls_t.clone())).sum();
            g = g + (ls_t.exp() - pt).mul_scalar(w.kd);
        }
        let g = g.scatter(1, yc, Tensor::full([len, 1], -w.ce, &device), IndexingUpdateOp::Add);
        grads.push(g);
    }
    (Tensor::cat(grads, 0), kd, ce)
}

/// The CPU path: `(g, Σ KL, Σ CE)` from host rows of `v` logits, one fused
/// pass per row (rows in parallel).
fn host_rows(s: &[f32], t: Option<&[f32]>, y: &[i64], v: usize, w: &Weights) -> Result<(Vec<f32>, f64, f64)> {
    let n = y.len();
    if let Some(bad) = y.iter().find(|&&c| c < 0 || c as usize >= v) {
        return Err(DmtError::InvalidArgument(format!(
            "target {bad} is outside the {v}-token vocabulary"
        )));
    }
    let inv_t = (1.0 / w.temperature) as f32;
    let (wkd, wce) = (w.kd as f32, w.ce as f32);
    let mut g = vec![0f32; n * v];
    let sums: Vec<(f64, f64)> = g
        .par_chunks_mut(v)
        .enumerate()
        .map_init(
            || (vec![0f32; v], vec![0f32; v]),
            |(e_t, p_t), (i, gi)| {
                let si = &s[i * v..(i + 1) * v];
                let m = max(si);
                // softmax(z) into g and softmax(z/T) into e_t, unnormalised;
                // at T = 2 (the default) the first is the second squared,
                // one exponential fewer per logit.
                let squared = t.is_some() && inv_t == 0.5;
                let (z1, zt) = if squared {
                    let zt = exp_shifted(si, m, 0.5, e_t);
                    (square_into(e_t, gi), zt)
                } else {
                    (exp_shifted(si, m, 1.0, gi), 0.0)
                };
                let ce = -(f64::from(si[y[i] as usize] - m) - z1.ln());
                let a = (f64::from(wce) / z1) as f32;
                let Some(t) = t else {
                    gi.iter_mut().for_each(|o| *o *= a);
                    gi[y[i] as usize] -= wce;
                    return (0.0, ce);
                };
                let zt = if squared { zt } else { exp_shifted(si, m, inv_t, e_t) };
                let b = (f64::from(wkd) / zt) as f32;
                let ti = &t[i * v..(i + 1) * v];
                let mt = max(ti);
                let zp = exp_shifted(ti, mt, inv_t, p_t);
                // KL = Σ pt · (lt_T − ls_T), lt_T − ls_T = ((t − mt) − (s − m))/T − ln zp + ln zt.
                let c = (zt.ln() - zp.ln()) as f32;
                let inv_zp = (1.0 / zp) as f32;
                let mut kl = f32x8::ZERO;
                let lanes = v / 8 * 8;
                for j in (0..lanes).step_by(8) {
                    let pt = load(&p_t[j..]) * inv_zp;
                    let d = ((load(&ti[j..]) - mt) - (load(&si[j..]) - m)) * inv_t + c;
                    kl += pt * d;
                    let gj = load(&gi[j..]) * a + (load(&e_t[j..]) * b - pt * wkd);
                    gi[j..j + 8].copy_from_slice(&gj.to_array());
                }
                let mut kl = f64::from(kl.reduce_add());
                for j in lanes..v {
                    let pt = p_t[j] * inv_zp;
                    kl += f64::from(pt * (((ti[j] - mt) - (si[j] - m)) * inv_t + c));
                    gi[j] = gi[j] * a + (e_t[j] * b - pt * wkd);
                }
                gi[y[i] as usize] -= wce;
                (kl, ce)
            },
        )
        .collect();
    let (kd, ce) = sums.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    Ok((g, kd, ce))
}

fn load(x: &[f32]) -> f32x8 {
    f32x8::new(std::array::from_fn(|k| x[k]))
}

fn max(x: &[f32]) -> f32 {
    x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Writes `x²` into `out`, returns its sum.
fn square_into(x: &[f32], out: &mut [f32]) -> f64 {
    let lanes = x.len() / 8 * 8;
    let mut sum = f32x8::ZERO;
    for j in (0..lanes).step_by(8) {
        let e = load(&x[j..]);
        let e = e * e;
        sum += e;
        out[j..j + 8].copy_from_slice(&e.to_array());
    }
    let mut total = f64::from(sum.reduce_add());
    for j in lanes..x.len() {
        out[j] = x[j] * x[j];
        total += f64::from(out[j]);
    }
    total
}

/// Writes `exp((x − shift) · scale)` into `out`, returns its sum.
fn exp_shifted(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f64 {
    let lanes = x.len() / 8 * 8;
    let mut sum = f32x8::ZERO;
    for j in (0..lanes).step_by(8) {
        let e = ((load(&x[j..]) - shift) * scale).exp();
        sum += e;
        out[j..j + 8].copy_from_slice(&e.to_array());
    }
    let mut total = f64::from(sum.reduce_add());
    for j in lanes..x.len() {
        let e = ((x[j] - shift) * scale).exp();
        out[j] = e;
        total += f64::from(e);
    }
    total
}
