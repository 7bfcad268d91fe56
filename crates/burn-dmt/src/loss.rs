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
//! logits with `g` and nothing vocabulary-wide is kept. On the CPU backend
//! the values and `g` come from one fused pass per position on the host
//! (three vectorised exponentials per logit, rows in parallel, as
//! Liger-Kernel's fused cross-entropy does on GPUs); elsewhere from
//! tensor operations [`LOSS_CHUNK`] positions at a time, so that only a
//! chunk's intermediates live at once. Both equal
//! [`crate::train::distill_kl`] and [`crate::train::cross_entropy`] (and
//! their recorded gradients) to f32 rounding; `tests/loss.rs` holds them to
//! 1e-5.

use burn::tensor::activation::log_softmax;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};
use rayon::prelude::*;
use wide::f32x8;

use crate::memory::device::on_cpu;
use crate::train::flat;
use crate::{DmtError, Result, host_f32, host_i64};

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
        self.kd.clone().mul_scalar(self.alpha) + self.ce.clone().mul_scalar(1.0 - self.alpha)
    }
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
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(DmtError::InvalidArgument(format!(
            "the distillation temperature must be positive (got {temperature})"
        )));
    }
    let [b, t, v] = student.dims();
    let n = b * t;
    if n == 0 || v == 0 {
        return Err(DmtError::InvalidArgument(format!(
            "no logits to take a loss of ({b}×{t}×{v})"
        )));
    }
    if let Some(te) = &teacher
        && te.dims() != [b, t, v]
    {
        return Err(DmtError::InvalidArgument(format!(
            "teacher logits {:?} against student logits {:?}",
            te.dims(),
            [b, t, v]
        )));
    }
    let alpha = if teacher.is_some() { alpha } else { 0.0 };
    let z = flat(student);
    let s = z.clone().inner();
    let tl = teacher.map(|x| flat(x).inner());
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
        let sv = host_f32(s)?;
        let tv = tl.map(host_f32).transpose()?;
        let yv = host_i64(y)?;
        let (g, kd, ce) = host_rows(&sv, tv.as_deref(), &yv, v, &w)?;
        let g = Tensor::<2>::from_data(TensorData::new(g, [n, v]), &device);
        let scalar = |x: f64| Tensor::<1>::from_data(TensorData::new(vec![x as f32], [1]), &device);
        (g, scalar(kd), scalar(ce))
    } else {
        chunked(s, tl, y, &w)
    };
    Ok(DistillLoss {
        surrogate: (z * g).sum(),
        kd: kd.mul_scalar(temperature * temperature / n as f64),
        ce: ce.div_scalar(n as f64),
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
                // softmax(z) into g and softmax(z/T) into e_t, unnormalised.
                let z1 = exp_shifted(si, m, 1.0, gi);
                let ce = -(f64::from(si[y[i] as usize] - m) - z1.ln());
                let a = (f64::from(wce) / z1) as f32;
                let Some(t) = t else {
                    gi.iter_mut().for_each(|o| *o *= a);
                    gi[y[i] as usize] -= wce;
                    return (0.0, ce);
                };
                let zt = exp_shifted(si, m, inv_t, e_t);
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
