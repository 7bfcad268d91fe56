//! Exact batched top-k through an 8-bit prefilter with proven error bounds.
//!
//! Scalar quantisation with exact re-ranking is how large vector indexes
//! trade bandwidth for precision (FAISS's `IndexScalarQuantizer` behind an
//! `IndexRefine`; ScaNN's re-scoring): keys and queries become 8-bit
//! integers, one scale per row, and their dot products come from integer
//! dot-product instructions (AVX-512 VNNI `vpdpbusd`: 64 multiply-adds per
//! instruction where an f32 FMA does 16). Here the prefilter is not
//! approximate: for each query the quantisation and rounding errors are bounded
//! (Cauchy–Schwarz on the per-row quantisation residuals, plus the f32
//! rounding of the score and of [`math::distance`] itself), and every row
//! whose score is within twice that bound of the `k`-th best score is kept
//! and re-ranked by [`math::distance`]. A row left out is provably farther
//! than the `k`-th result, so the answer is the brute-force answer, ties by
//! row, with `math::distance`'s floats.
//!
//! The selection is fused into the kernel: a tile of 8 queries × 32 keys is
//! scored in registers and compared with each query's current threshold, and
//! only rows under it leave the registers, so the scores are never written
//! out (the SGEMM path writes and re-reads every score). Keys are walked in
//! chunks that stay in the second-level cache while every query tile of a
//! block passes over them; blocks of queries (and, for few blocks, ranges of
//! keys) run on all cores.
//!
//! The same arithmetic runs through a portable integer kernel that the
//! tests compare with the VNNI one (integer sums are exact, so both give the
//! same scores bit for bit). The store uses this path only where the CPU has
//! VNNI; elsewhere [`crate::gemm::topk`] stays on SGEMM.

use std::ops::Range;

use rayon::prelude::*;

use memstore_api::{Metric, math};

/// Keys per panel: one 512-bit register of 32-bit sums.
const LANES: usize = 16;
/// Keys per kernel step (two panels).
const PAIR: usize = 2 * LANES;
/// Queries per kernel step.
const TILE: usize = 8;
/// Queries per parallel work item.
const QBLOCK: usize = 256;
/// Key bytes per chunk that a block's tiles walk while it stays in cache.
const CHUNK_BYTES: usize = 1 << 18;
/// The widest key this path takes: the 32-bit sums cannot overflow below it.
pub(crate) const MAX_DIM: usize = 16384;
/// Norms above this fall back to SGEMM (their squares approach f32's range).
const MAX_NORM: f64 = 1e15;

/// Which integer dot-product kernel scores the tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// AVX-512 VNNI (`vpdpbusd`), where the CPU has it.
    #[cfg(target_arch = "x86_64")]
    Vnni,
    /// Plain integer loops: the reference for the tests.
    #[cfg_attr(not(test), allow(dead_code))]
    Portable,
}

impl Kernel {
    /// The fast kernel this CPU can run, if any (none when the environment
    /// sets `MEMSTORE_NO_Q8`, to compare with the SGEMM path). The crate's
    /// own tests take the portable kernel where the CPU has no VNNI, so that
    /// the 8-bit path and the planners built on it are tested on every CPU
    /// (both kernels give the same scores bit for bit).
    pub(crate) fn detect() -> Option<Kernel> {
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *OFF.get_or_init(|| std::env::var_os("MEMSTORE_NO_Q8").is_some()) {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                return Some(Kernel::Vnni);
            }
        }
        if cfg!(test) {
            return Some(Kernel::Portable);
        }
        None
    }
}

/// Quantises `row` to `out` (zero padding beyond the row) with one scale:
/// `x ≈ scale · X`, `|X| ≤ 127`. Returns the scale, the residual's norm
/// `‖x − scale·X‖` and the row's norm, in f64 (rounded up), or `None` for a
/// non-finite entry.
fn quantize(row: &[f32], out: &mut [i8]) -> Option<(f32, f64, f64)> {
    out.fill(0);
    let maxabs = row.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    if !maxabs.is_finite() || row.iter().any(|x| x.is_nan()) {
        return None;
    }
    if maxabs == 0.0 {
        return Some((0.0, 0.0, 0.0));
    }
    let scale = maxabs / 127.0;
    let inv = 127.0 / maxabs;
    // Round to nearest by the 1.5·2²³ trick (`f32::round` is a libm call on
    // baseline x86-64); any rounding would do, the residual is exact.
    const MAGIC: f32 = 12_582_912.0;
    let (mut e2, mut n2) = (0.0f64, 0.0f64);
    for (o, &x) in out.iter_mut().zip(row) {
        let q = ((x * inv + MAGIC) - MAGIC).clamp(-127.0, 127.0);
        *o = q as i8;
        let e = f64::from(x) - f64::from(scale) * f64::from(q);
        e2 += e * e;
        n2 += f64::from(x) * f64::from(x);
    }
    let up = 1.0 + 1e-12;
    Some((scale, e2.sqrt() * up, n2.sqrt() * up))
}

/// `row` scaled to unit length as [`crate::gemm`] does for cosine (zero rows stay zero).
fn unit_into(row: &[f32], out: &mut Vec<f32>) {
    out.clear();
    out.extend_from_slice(row);
    crate::gemm::to_unit(out);
}

/// Keys quantised to 8 bits and packed for the kernels (unit rows for
/// cosine): panel `p` (keys `16p..16p + 16`), group `g` (dims `4g..4g + 4`)
/// holds 64 bytes, lane `l`'s four bytes being key `16p + l`'s dims. Keys
/// are padded to a multiple of [`PAIR`]; pads get a bias of `+∞`, which no
/// threshold admits (nor masked-out rows, whose bias a search sets to `+∞`).
/// Built once per key matrix and kept by its owner ([`crate::gemm::KeyCache`]).
pub(crate) struct Q8Keys {
    metric: Metric,
    dim: usize,
    n: usize,
    groups: usize,
    data: Vec<i8>,
    /// `128 · ΣX` per key: queries are stored as `Q + 128` (VNNI multiplies
    /// unsigned by signed bytes), so this is subtracted from every sum.
    corr: Vec<i32>,
    scale: Vec<f32>,
    /// `‖x‖²` for L2, 0 otherwise; `+∞` for pads.
    bias: Vec<f32>,
    /// Largest residual norm `‖e_x‖`.
    err_max: f64,
    /// Largest `‖x‖ + ‖e_x‖`.
    norm_err_max: f64,
    /// Largest `‖x‖`.
    norm_max: f64,
}

impl Q8Keys {
    /// Quantises `keys` (`n × dim`) for `metric`; `None` when a key is
    /// non-finite or too large to bound, or the width is over [`MAX_DIM`].
    pub(crate) fn new(metric: Metric, keys: &[f32], dim: usize) -> Option<Q8Keys> {
        if dim == 0 || dim > MAX_DIM || !keys.len().is_multiple_of(dim) {
            return None;
        }
        let n = keys.len() / dim;
        let groups = dim.div_ceil(4);
        let padded = n.div_ceil(PAIR) * PAIR;
        let panels = padded / LANES;
        let mut data = vec![0i8; panels * groups * 64];
        let mut corr = vec![0i32; padded];
        let mut scale = vec![0.0f32; padded];
        let mut bias = vec![f32::INFINITY; padded];
        // One task per panel of 16 keys, each writing its own slabs.
        let stats: Vec<Option<(f64, f64, f64)>> = data
            .par_chunks_mut(groups * 64)
            .zip(corr.par_chunks_mut(LANES))
            .zip(scale.par_chunks_mut(LANES))
            .zip(bias.par_chunks_mut(LANES))
            .enumerate()
            .map(|(p, (((slab, corr), scale), bias))| {
                let mut q = vec![0i8; groups * 4];
                let mut unit = Vec::new();
                let (mut err_max, mut norm_err_max, mut norm_max) = (0.0f64, 0.0f64, 0.0f64);
                for lane in 0..LANES {
                    let j = p * LANES + lane;
                    if j >= n {
                        break;
                    }
                    let mut row = &keys[j * dim..(j + 1) * dim];
                    if metric == Metric::Cosine {
                        unit_into(row, &mut unit);
                        row = &unit;
                    }
                    let (s, err, norm) = quantize(row, &mut q)?;
                    for g in 0..groups {
                        slab[g * 64 + lane * 4..g * 64 + lane * 4 + 4].copy_from_slice(&q[g * 4..g * 4 + 4]);
                    }
                    corr[lane] = 128 * q.iter().map(|&x| i32::from(x)).sum::<i32>();
                    scale[lane] = s;
                    // The bias's own rounding is part of the bound (γ‖x‖²).
                    bias[lane] = match metric {
                        Metric::L2 => math::dot(row, row),
                        _ => 0.0,
                    };
                    err_max = err_max.max(err);
                    norm_err_max = norm_err_max.max(norm + err);
                    norm_max = norm_max.max(norm);
                }
                Some((err_max, norm_err_max, norm_max))
            })
            .collect();
        let (mut err_max, mut norm_err_max, mut norm_max) = (0.0f64, 0.0f64, 0.0f64);
        for st in stats {
            let (e, ne, nm) = st?;
            err_max = err_max.max(e);
            norm_err_max = norm_err_max.max(ne);
            norm_max = norm_max.max(nm);
        }
        if norm_max >= MAX_NORM || bias.iter().take(n).any(|b| !b.is_finite()) {
            return None;
        }
        Some(Q8Keys {
            metric,
            dim,
            n,
            groups,
            data,
            corr,
            scale,
            bias,
            err_max,
            norm_err_max,
            norm_max,
        })
    }

    /// Whether this is the quantisation of `n` keys of `dim` for `metric`.
    pub(crate) fn fits(&self, metric: Metric, n: usize, dim: usize) -> bool {
        self.metric == metric && self.n == n && self.dim == dim
    }

    fn pairs(&self) -> usize {
        self.scale.len() / PAIR
    }
}

/// One query's running selection: every row offered whose score may still
/// be within the bound of the `k`-th best. An offer only appends; when the
/// list fills, the threshold is tightened to the `k`-th best score in it
/// (plus the bound) and the rows above are dropped. Offers stay O(1):
/// tightening at every offer (a running `k`-th best) would scan `k` scores
/// per improvement, and a streamed top-`k` sees about `k·ln(n/k)`
/// improvements per query.
struct Sel {
    cands: Vec<(f32, u32)>,
    /// Rows scoring above this cannot reach the top `k`.
    thr: f32,
    cap: usize,
    k: usize,
    bound: Bound,
}

impl Sel {
    fn new(k: usize, bound: Bound) -> Sel {
        let cap = 3 * k + 8;
        Sel {
            cands: Vec::with_capacity(cap),
            thr: f32::MAX,
            cap,
            k,
            bound,
        }
    }

    /// Offers row `j` with approximate score `a` (at most the threshold).
    #[inline]
    fn push(&mut self, j: usize, a: f32) {
        self.cands.push((a, j as u32));
        if self.cands.len() >= self.cap {
            self.tighten();
        }
    }

    /// Tightens the threshold to the `k`-th best score offered so far and
    /// drops the rows above it.
    #[cold]
    #[inline(never)]
    fn tighten(&mut self) {
        let k = self.k;
        if k > 0 && self.cands.len() >= k {
            let (_, kth, _) = self.cands.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0));
            self.thr = self.bound.tau(kth.0);
        }
        let thr = self.thr;
        self.cands.retain(|c| c.0 <= thr);
        self.cap = (2 * self.cands.len()).max(3 * k + 8);
    }
}

/// The margin above the `k`-th approximate score within which a row may
/// still be among the `k` nearest by [`math::distance`].
#[derive(Clone, Copy)]
struct Bound {
    metric: Metric,
    /// Additive part: twice the score error, plus twice `math::distance`'s
    /// own error for the inner-product metrics.
    add: f64,
    /// Relative part (L2: applied to the squared distance at the cut).
    rel: f64,
    /// L2: the score error plus `‖q‖²` (score + `‖q‖²` is the squared
    /// distance); inner products: the largest `|distance|`.
    base: f64,
}

impl Bound {
    /// The threshold for a `k`-th best score of `kth`, rounded up to f32.
    fn tau(&self, kth: f32) -> f32 {
        let kth = f64::from(kth);
        let t = match self.metric {
            Metric::L2 => kth + self.add + self.rel * (kth + self.base).max(0.0),
            _ => kth + self.add + self.rel * self.base,
        };
        let f = t as f32;
        if f64::from(f) < t { f.next_up() } else { f }
    }
}

/// A tile's queries: `TILE × groups` words of four `Q + 128` bytes, and the
/// per-query factor turning an integer sum into a score (`−2α` for L2, `−α`
/// for the inner products; `α` the query's scale).
struct Tile<'a> {
    words: &'a [u32],
    factor: [f32; TILE],
    /// The keys' biases for this search (`+∞` for rows the mask rejects).
    bias: &'a [f32],
    /// Per query, the number of leading keys it may see (`usize::MAX`: all).
    limit: [usize; TILE],
}

impl Tile<'_> {
    /// Which of the 16 keys from `first` on query `r` may see, as lane bits.
    #[inline]
    fn visible(&self, r: usize, first: usize) -> u32 {
        let lim = self.limit[r];
        if first.saturating_add(LANES) <= lim {
            0xFFFF
        } else if first >= lim {
            0
        } else {
            (1u32 << (lim - first)) - 1
        }
    }
}

/// Scores key pairs `pairs` for a tile and offers each of `sels`' queries
/// (the tile's first `sels.len()`) the rows at or under its threshold.
fn run(kernel: Kernel, keys: &Q8Keys, tile: &Tile<'_>, pairs: Range<usize>, sels: &mut [Sel]) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernel::Vnni` is only produced by `detect`, which checked
        // that the CPU has every feature `run_vnni` enables; `run_vnni`
        // checks its own bounds.
        Kernel::Vnni => unsafe { vnni::run_vnni(keys, tile, pairs, sels) },
        Kernel::Portable => run_portable(keys, tile, pairs, sels),
    }
}

/// The portable kernel: the same sums, scores and offers as the VNNI kernel.
fn run_portable(keys: &Q8Keys, tile: &Tile<'_>, pairs: Range<usize>, sels: &mut [Sel]) {
    let g = keys.groups;
    for p in pairs {
        for half in 0..2 {
            let panel = 2 * p + half;
            let block = &keys.data[panel * g * 64..(panel + 1) * g * 64];
            for (r, sel) in sels.iter_mut().enumerate().take(TILE) {
                let mut sums = [0i32; LANES];
                for gi in 0..g {
                    let qb = tile.words[r * g + gi].to_le_bytes();
                    for (l, sum) in sums.iter_mut().enumerate() {
                        let kb = &block[gi * 64 + l * 4..gi * 64 + l * 4 + 4];
                        for t in 0..4 {
                            *sum += i32::from(qb[t]) * i32::from(kb[t]);
                        }
                    }
                }
                let vis = tile.visible(r, panel * LANES);
                for (l, &sum) in sums.iter().enumerate() {
                    let j = panel * LANES + l;
                    let s = (sum - keys.corr[j]) as f32;
                    let a = s.mul_add(keys.scale[j] * tile.factor[r], tile.bias[j]);
                    if a <= sel.thr && vis & (1 << l) != 0 {
                        sel.push(j, a);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{LANES, Q8Keys, Sel, TILE, Tile};

    /// The VNNI kernel: per step, 8 queries × 32 keys in 16 accumulators;
    /// the scores are compared with the thresholds in registers.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn run_vnni(keys: &Q8Keys, tile: &Tile<'_>, pairs: Range<usize>, sels: &mut [Sel]) {
        let g = keys.groups;
        let live = sels.len().min(TILE);
        assert!(tile.words.len() >= TILE * g);
        assert!(pairs.end * 2 * g * 64 <= keys.data.len());
        assert!(pairs.end * 2 * LANES <= keys.scale.len() && keys.scale.len() == keys.corr.len());
        assert!(tile.bias.len() == keys.scale.len());
        let qw = tile.words.as_ptr();
        // SAFETY: the asserts above bound every read: query words
        // `r·g + gi < TILE·g`; key bytes of pair `p` end at `(p + 1)·2·g·64`;
        // the per-key arrays hold `2·LANES` entries per pair. Unaligned
        // loads and stores are used throughout.
        unsafe {
            for p in pairs {
                let base = keys.data.as_ptr().add(p * 2 * g * 64);
                let mut acc0 = [_mm512_setzero_si512(); TILE];
                let mut acc1 = [_mm512_setzero_si512(); TILE];
                for gi in 0..g {
                    let k0 = _mm512_loadu_si512(base.add(gi * 64).cast());
                    let k1 = _mm512_loadu_si512(base.add((g + gi) * 64).cast());
                    for r in 0..TILE {
                        let q = _mm512_set1_epi32(*qw.add(r * g + gi) as i32);
                        acc0[r] = _mm512_dpbusd_epi32(acc0[r], q, k0);
                        acc1[r] = _mm512_dpbusd_epi32(acc1[r], q, k1);
                    }
                }
                for (half, acc) in [acc0, acc1].iter().enumerate() {
                    let first = (2 * p + half) * LANES;
                    let corr = _mm512_loadu_si512(keys.corr.as_ptr().add(first).cast());
                    let scale = _mm512_loadu_ps(keys.scale.as_ptr().add(first));
                    let bias = _mm512_loadu_ps(tile.bias.as_ptr().add(first));
                    for (r, sel) in sels.iter_mut().enumerate().take(live) {
                        let s = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r], corr));
                        let a = _mm512_fmadd_ps(s, _mm512_mul_ps(scale, _mm512_set1_ps(tile.factor[r])), bias);
                        let m = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(a, _mm512_set1_ps(sel.thr))
                            & tile.visible(r, first) as u16;
                        if m != 0 {
                            let mut out = [0.0f32; LANES];
                            _mm512_storeu_ps(out.as_mut_ptr(), a);
                            let mut bits = m;
                            while bits != 0 {
                                let l = bits.trailing_zeros() as usize;
                                bits &= bits - 1;
                                if out[l] <= sel.thr {
                                    sel.push(first + l, out[l]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The `k` nearest rows by [`math::distance`] for each query, as
/// [`crate::gemm::topk`] returns them (shapes already validated), ties
/// broken by `tie[row]` (by row when `None`), through the 8-bit prefilter
/// over `packed` (the quantisation of `keys`); query `i` sees only rows
/// `< limit[i]` when `limit` is given (a causal search: rows of a batch
/// against the rows before them). `None` when this path does not apply (a
/// non-finite or enormous query, or `packed` is not `keys`' quantisation),
/// for the caller to use SGEMM.
#[allow(clippy::too_many_arguments)]
pub(crate) fn topk(
    kernel: Kernel,
    metric: Metric,
    queries: &[f32],
    keys: &[f32],
    packed: &Q8Keys,
    dim: usize,
    k: usize,
    mask: Option<&[bool]>,
    tie: Option<&[u64]>,
    limit: Option<&[usize]>,
) -> Option<(Vec<f32>, Vec<u32>)> {
    let (m, n) = (queries.len() / dim, keys.len() / dim);
    if !packed.fits(metric, n, dim) || tie.is_some_and(|t| t.len() != n) || limit.is_some_and(|l| l.len() != m) {
        return None;
    }
    // Per query, the rows it may see; pad queries see none.
    let lim = |i: usize| -> usize { if i >= m { 0 } else { limit.map_or(usize::MAX, |l| l[i]) } };
    // Pairs of keys a run of queries needs: up to its widest limit.
    let pairs_for = |from: usize, to: usize| -> usize { (from..to).map(lim).max().unwrap_or(0).min(n).div_ceil(PAIR) };
    let bias: std::borrow::Cow<'_, [f32]> = match mask {
        None => std::borrow::Cow::Borrowed(&packed.bias),
        Some(mask) => std::borrow::Cow::Owned(
            packed
                .bias
                .iter()
                .enumerate()
                .map(|(j, &b)| {
                    if mask.get(j).copied().unwrap_or(false) {
                        b
                    } else {
                        f32::INFINITY
                    }
                })
                .collect(),
        ),
    };
    let groups = packed.groups;
    // Queries: `Q + 128` bytes, padded to whole tiles (pad rows never admit
    // anything: their threshold is −∞).
    let tiles = m.div_ceil(TILE);
    let eps = f64::from(f32::EPSILON);
    let gamma = (dim as f64 + 8.0) * eps;
    let per_query: Vec<Option<(Vec<u32>, f32, Bound)>> = queries
        .par_chunks(dim)
        .map(|raw| {
            let mut unit = Vec::new();
            let qv = if metric == Metric::Cosine {
                unit_into(raw, &mut unit);
                &unit[..]
            } else {
                raw
            };
            let mut q = vec![0i8; groups * 4];
            let (alpha, eq, qn) = quantize(qv, &mut q)?;
            if qn >= MAX_NORM {
                return None;
            }
            let words: Vec<u32> = q
                .chunks(4)
                .map(|b| u32::from_le_bytes([0, 1, 2, 3].map(|t| (i16::from(b[t]) + 128) as u8)))
                .collect();
            // |q·x − α·β·S| ≤ ‖q‖‖e_x‖ + ‖e_q‖(‖x‖ + ‖e_x‖), plus the f32
            // rounding of the score's products.
            let e = qn * packed.err_max + eq * packed.norm_err_max;
            let b = e + 4.0 * eps * (qn * packed.norm_err_max + e);
            let xn = packed.norm_max;
            let bound = match metric {
                Metric::L2 => {
                    // The bias ‖x‖² (γ-relative), the score's additions, then
                    // `math::distance`'s squared sum (γ-relative, all terms ≥ 0).
                    let rn: f64 = raw.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
                    let a = gamma * xn * xn + 2.0 * b + eps * (xn * xn + 2.0 * qn * packed.norm_err_max);
                    Bound {
                        metric,
                        add: 2.0 * a,
                        rel: 4.0 * gamma,
                        base: a + rn * (1.0 + eps),
                    }
                }
                Metric::InnerProduct => {
                    let gd = gamma * qn * xn;
                    Bound {
                        metric,
                        add: 2.0 * b + 2.0 * gd,
                        rel: 4.0 * eps,
                        base: 1.0 + qn * xn + 2.0 * b + 2.0 * gd,
                    }
                }
                Metric::Cosine => {
                    // Unit rows: the normalisation and `math::distance`'s
                    // own cosine each err by a few γ.
                    let gd = 8.0 * gamma;
                    Bound {
                        metric,
                        add: 2.0 * b + 2.0 * gd,
                        rel: 4.0 * eps,
                        base: 2.0 + 2.0 * b + 2.0 * gd,
                    }
                }
            };
            let factor = if metric == Metric::L2 { -2.0 * alpha } else { -alpha };
            Some((words, factor, bound))
        })
        .collect();
    let mut words = vec![0u32; tiles * TILE * groups];
    let mut factors = vec![0.0f32; tiles * TILE];
    let mut bounds = Vec::with_capacity(m);
    for (i, row) in per_query.into_iter().enumerate() {
        let (w, f, b) = row?;
        words[i * groups..(i + 1) * groups].copy_from_slice(&w);
        factors[i] = f;
        bounds.push(b);
    }
    let kk = k.min(n);
    let pairs = packed.pairs();
    let blocks = m.div_ceil(QBLOCK);
    let threads = rayon::current_num_threads().max(1);
    let ranges = if blocks >= threads || pairs < 2 * threads {
        1
    } else {
        threads.div_ceil(blocks).min(pairs).max(1)
    };
    let span = pairs.div_ceil(ranges);
    let chunk = (CHUNK_BYTES / (PAIR * groups * 4)).max(1);
    let items: Vec<(usize, usize)> = (0..blocks).flat_map(|b| (0..ranges).map(move |r| (b, r))).collect();
    let found: Vec<Vec<Sel>> = items
        .par_iter()
        .map(|&(b, r)| {
            let q0 = b * QBLOCK;
            let rows = QBLOCK.min(m - q0);
            let mut sels: Vec<Sel> = (0..rows).map(|i| Sel::new(kk, bounds[q0 + i])).collect();
            let (lo, hi) = (r * span, ((r + 1) * span).min(pairs).min(pairs_for(q0, q0 + rows)));
            let mut c0 = lo;
            while c0 < hi {
                let c1 = (c0 + chunk).min(hi);
                for t in 0..rows.div_ceil(TILE) {
                    let first = q0 + t * TILE;
                    let tile = Tile {
                        words: &words[first * groups..(first + TILE) * groups],
                        factor: std::array::from_fn(|i| factors[first + i]),
                        bias: &bias,
                        limit: std::array::from_fn(|i| lim(first + i)),
                    };
                    let end = (t * TILE + TILE).min(rows);
                    let stop = c1.min(pairs_for(first, q0 + end));
                    if c0 < stop {
                        run(kernel, packed, &tile, c0..stop, &mut sels[t * TILE..end]);
                    }
                }
                c0 = c1;
            }
            sels
        })
        .collect();
    // Each query's candidates, moved out of its selections (no copy when
    // the keys were not split into ranges).
    let mut found = found;
    let mut per_query: Vec<Vec<(f32, u32)>> = Vec::with_capacity(m);
    for block in found.chunks_mut(ranges) {
        let (first, rest) = block.split_at_mut(1);
        for (row, sel) in first[0].iter_mut().enumerate() {
            let mut cands = std::mem::take(&mut sel.cands);
            for part in rest.iter() {
                cands.extend_from_slice(&part[row].cands);
            }
            per_query.push(cands);
        }
    }
    drop(found);
    let mut dist = vec![f32::INFINITY; m * k];
    let mut idx = vec![u32::MAX; m * k];
    dist.par_chunks_mut(k)
        .zip(idx.par_chunks_mut(k))
        .zip(per_query.par_iter_mut())
        .enumerate()
        .for_each(|(i, ((drow, irow), cands))| {
            // The union holds every range's `k` best; the global `k`-th
            // gives the tightest threshold (ranges pruned only above their
            // own, looser, thresholds).
            let thr = if cands.len() > kk && kk > 0 {
                let (_, kth, _) = cands.select_nth_unstable_by(kk - 1, |a, b| a.0.total_cmp(&b.0));
                bounds[i].tau(kth.0)
            } else {
                f32::MAX
            };
            cands.retain(|c| c.0 <= thr);
            // Approximate scores replaced by exact distances, in place.
            let qrow = &queries[i * dim..(i + 1) * dim];
            for c in cands.iter_mut() {
                let j = c.1 as usize;
                c.0 = math::distance(metric, qrow, &keys[j * dim..(j + 1) * dim]);
            }
            // Every row that can tie with the `k`-th is among the candidates,
            // so any tie order is exact.
            let rank = |r: u32| tie.map_or(u64::from(r), |t| t[r as usize]);
            let order = |a: &(f32, u32), b: &(f32, u32)| a.0.total_cmp(&b.0).then(rank(a.1).cmp(&rank(b.1)));
            if cands.len() > kk && kk > 0 {
                cands.select_nth_unstable_by(kk - 1, order);
                cands.truncate(kk);
            }
            cands.sort_by(order);
            for (j, &(d, x)) in cands.iter().enumerate() {
                drow[j] = d;
                irow[j] = x;
            }
        });
    Some((dist, idx))
}

#[cfg(test)]
mod tests {
    use super::*;

    use memstore_api::testkit::util::Rng;

    /// Uniform in `[-0.5, 0.5)`.
    fn rng(r: &mut Rng) -> f32 {
        r.unit() * 0.5
    }

    fn brute(metric: Metric, q: &[f32], keys: &[f32], d: usize, k: usize, mask: Option<&[bool]>) -> Vec<(f32, u32)> {
        let n = keys.len() / d;
        let mut all: Vec<(f32, u32)> = (0..n)
            .filter(|&j| mask.is_none_or(|m| m[j]))
            .map(|j| (math::distance(metric, q, &keys[j * d..(j + 1) * d]), j as u32))
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        all.truncate(k);
        all
    }

    /// Quantises the keys and searches, as `gemm::topk` does per call.
    #[allow(clippy::too_many_arguments)]
    fn fresh(
        kernel: Kernel,
        metric: Metric,
        q: &[f32],
        keys: &[f32],
        d: usize,
        k: usize,
        mask: Option<&[bool]>,
    ) -> Option<(Vec<f32>, Vec<u32>)> {
        let packed = Q8Keys::new(metric, keys, d)?;
        topk(kernel, metric, q, keys, &packed, d, k, mask, None, None)
    }

    /// The portable kernel, and the VNNI one where the CPU has it.
    fn kernels() -> Vec<Kernel> {
        let mut out = vec![Kernel::Portable];
        out.extend(Kernel::detect().filter(|k| *k != Kernel::Portable));
        out
    }

    fn check(kernel: Kernel, metric: Metric, q: &[f32], keys: &[f32], d: usize, k: usize, mask: Option<&[bool]>) {
        let m = q.len() / d;
        let (dist, idx) = fresh(kernel, metric, q, keys, d, k, mask).expect("finite input takes the 8-bit path");
        for i in 0..m {
            let want = brute(metric, &q[i * d..(i + 1) * d], keys, d, k, mask);
            let got: Vec<(f32, u32)> = (0..k)
                .filter(|&j| idx[i * k + j] != u32::MAX)
                .map(|j| (dist[i * k + j], idx[i * k + j]))
                .collect();
            assert_eq!(got, want, "{kernel:?} {metric:?} d {d} query {i}");
            assert!(dist[i * k + want.len()..(i + 1) * k].iter().all(|x| x.is_infinite()));
        }
    }

    /// With per-query limits (query `i` sees rows `< limit[i]`), the answer
    /// is the brute-force answer over those rows: the triangular case that
    /// `learn` uses (rows against the rows before them, duplicates included),
    /// arbitrary limits (0, beyond `n`, mid-pair), with and without a mask,
    /// every metric, both kernels.
    #[test]
    fn limits_match_brute_force() {
        let mut s = Rng::new(23);
        for kernel in kernels() {
            for metric in [Metric::L2, Metric::Cosine, Metric::InnerProduct] {
                for &(n, d, k) in &[(70usize, 5usize, 4usize), (300, 64, 16), (600, 13, 8), (97, 33, 40)] {
                    let mut rows: Vec<f32> = (0..n * d).map(|_| rng(&mut s)).collect();
                    // Duplicated rows: ties that the order by row must break.
                    for j in (5..n).step_by(7) {
                        rows.copy_within((j - 5) * d..(j - 4) * d, j * d);
                    }
                    let packed = Q8Keys::new(metric, &rows, d).expect("finite rows");
                    let tri: Vec<usize> = (0..n).collect();
                    let odd: Vec<usize> = (0..n)
                        .map(|i| match i % 5 {
                            0 => 0,
                            1 => n + 3,
                            2 => (i * 7) % (n + 1),
                            3 => i / 2 + 17,
                            _ => usize::MAX,
                        })
                        .collect();
                    let mask: Vec<bool> = (0..n).map(|j| j % 3 != 1).collect();
                    for (limit, mask) in [(&tri, None), (&odd, None), (&tri, Some(&mask[..]))] {
                        let (dist, idx) = topk(kernel, metric, &rows, &rows, &packed, d, k, mask, None, Some(limit))
                            .expect("finite rows take the 8-bit path");
                        for i in 0..n {
                            let seen = limit[i].min(n);
                            let want = brute(
                                metric,
                                &rows[i * d..(i + 1) * d],
                                &rows[..seen * d],
                                d,
                                k,
                                mask.map(|m| &m[..seen]),
                            );
                            let got: Vec<(f32, u32)> = (0..k)
                                .filter(|&j| idx[i * k + j] != u32::MAX)
                                .map(|j| (dist[i * k + j], idx[i * k + j]))
                                .collect();
                            assert_eq!(
                                got, want,
                                "{kernel:?} {metric:?} n {n} d {d} row {i} limit {}",
                                limit[i]
                            );
                        }
                    }
                }
            }
        }
    }

    /// The answer is the brute-force answer (same ids, same floats, ties by
    /// row) on every metric and both kernels: random keys of odd widths,
    /// counts that leave partial tiles and pairs, masks, fewer rows than k.
    #[test]
    fn matches_brute_force() {
        let mut s = Rng::new(11);
        for &(m, n, d, k) in &[
            (13usize, 70usize, 5usize, 4usize),
            (40, 300, 64, 8),
            (9, 257, 77, 10),
            (3, 6, 3, 9),
            (17, 100, 1, 3),
            (300, 120, 16, 5),
        ] {
            let q: Vec<f32> = (0..m * d).map(|_| rng(&mut s)).collect();
            let keys: Vec<f32> = (0..n * d).map(|_| rng(&mut s)).collect();
            let mask: Vec<bool> = (0..n).map(|j| j % 3 != 1).collect();
            for kernel in kernels() {
                for metric in [Metric::L2, Metric::Cosine, Metric::InnerProduct] {
                    for mask in [None, Some(&mask[..])] {
                        check(kernel, metric, &q, &keys, d, k, mask);
                    }
                }
            }
        }
    }

    /// Many random small cases (shapes, metrics, masks, duplicated rows,
    /// magnitudes from 1e-6 to 1e6, coarse grids), each against brute force
    /// with both kernels.
    #[test]
    fn random_cases_match_brute_force() {
        let mut s = Rng::new(2024);
        let mut pick = |n: usize| -> usize { ((rng(&mut s) + 0.5) * n as f32) as usize % n };
        let mut seed = Rng::new(99);
        for case in 0..150 {
            let (m, n, d, k) = (1 + pick(40), 1 + pick(200), 1 + pick(40), 1 + pick(12));
            let metric = [Metric::L2, Metric::Cosine, Metric::InnerProduct][case % 3];
            let scale = [1e-6f32, 1e-2, 1.0, 1e3, 1e6][pick(5)];
            let grid = pick(3) == 0;
            let mut keys: Vec<f32> = (0..n * d)
                .map(|_| {
                    let x = rng(&mut seed) * scale;
                    if grid { (x / scale * 6.0).round() * scale } else { x }
                })
                .collect();
            // Duplicate some rows.
            for _ in 0..n / 4 {
                let (a, b) = (pick(n), pick(n));
                let row: Vec<f32> = keys[a * d..(a + 1) * d].to_vec();
                keys[b * d..(b + 1) * d].copy_from_slice(&row);
            }
            let mut q: Vec<f32> = (0..m * d).map(|_| rng(&mut seed) * scale).collect();
            if m > 1 && n > 0 {
                let r = pick(n);
                q[..d].copy_from_slice(&keys[r * d..(r + 1) * d]);
            }
            let mask: Vec<bool> = (0..n).map(|_| pick(4) != 0).collect();
            for kernel in kernels() {
                for mask in [None, Some(&mask[..])] {
                    check(kernel, metric, &q, &keys, d, k, mask);
                }
            }
        }
    }

    /// Ties and near-ties at the cut: keys on a coarse grid with duplicates,
    /// queries equal to keys, keys differing in the last bits, wide ranges of
    /// magnitude, zero rows. The bound must keep every row that can tie.
    #[test]
    fn ties_and_near_ties_match_brute_force() {
        let mut s = Rng::new(5);
        let d = 24;
        let mut keys: Vec<f32> = (0..500 * d).map(|_| (rng(&mut s) * 4.0).round()).collect();
        // Near-duplicates of row 0, one ulp apart, and a scaled copy.
        for r in 1..6 {
            for c in 0..d {
                keys[r * d + c] = if c == r { keys[c].next_up() } else { keys[c] };
            }
        }
        for c in 0..d {
            keys[6 * d + c] = keys[c] * 1e-3;
            keys[7 * d + c] = keys[c] * 1e3;
            keys[8 * d + c] = 0.0;
        }
        let mut q: Vec<f32> = keys[..12 * d].to_vec();
        q.extend((0..20 * d).map(|_| (rng(&mut s) * 4.0).round() * 0.5));
        q.extend(std::iter::repeat_n(0.0, d));
        for kernel in kernels() {
            for metric in [Metric::L2, Metric::Cosine, Metric::InnerProduct] {
                for k in [1, 7, 30] {
                    check(kernel, metric, &q, &keys, d, k, None);
                }
            }
        }
    }

    /// With a tie order (ids of rows not in row order, as an index keeps
    /// after swap-removes), exact ties at the cut go to the lowest ids.
    #[test]
    fn ties_follow_the_given_order() {
        let d = 4;
        // 40 copies of one key, 60 others farther away.
        let mut keys: Vec<f32> = Vec::new();
        for j in 0..100 {
            let v = if j % 5 < 2 { 1.0 } else { 3.0 + j as f32 };
            keys.extend([v, 0.5 * v, -v, 0.25]);
        }
        let ids: Vec<u64> = (0..100u64).map(|j| (j * 37) % 101).collect();
        let q = vec![1.0f32, 0.5, -1.0, 0.25];
        for kernel in kernels() {
            let packed = Q8Keys::new(Metric::L2, &keys, d).unwrap();
            let (dist, idx) = topk(kernel, Metric::L2, &q, &keys, &packed, d, 5, None, Some(&ids), None).unwrap();
            let mut want: Vec<(f32, u64, u32)> = (0..100)
                .map(|j| {
                    (
                        math::distance(Metric::L2, &q, &keys[j * d..(j + 1) * d]),
                        ids[j],
                        j as u32,
                    )
                })
                .collect();
            want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let want_rows: Vec<u32> = want[..5].iter().map(|w| w.2).collect();
            assert_eq!(idx, want_rows, "{kernel:?}");
            assert!(dist.iter().all(|&x| x == 0.0));
            // Without the order, the lowest rows.
            let (_, idx) = topk(kernel, Metric::L2, &q, &keys, &packed, d, 5, None, None, None).unwrap();
            assert_eq!(idx, vec![0, 1, 5, 6, 10]);
        }
    }

    /// The VNNI kernel's sums and scores are the portable kernel's, bit for
    /// bit (a query tile against a few pairs, every hit recorded).
    #[test]
    #[ignore = "needs AVX-512 VNNI: .ci/run runs it with --ignored where the CPU has it"]
    fn kernels_agree_bit_for_bit() {
        let fast = Kernel::detect()
            .filter(|k| *k != Kernel::Portable)
            .expect("this test needs a CPU with AVX-512 VNNI (and MEMSTORE_NO_Q8 unset)");
        let mut s = Rng::new(9);
        for d in [1usize, 4, 13, 64, 200] {
            let n = 3 * PAIR + 5;
            let keys: Vec<f32> = (0..n * d).map(|_| rng(&mut s) * 7.0).collect();
            let packed = Q8Keys::new(Metric::L2, &keys, d).unwrap();
            let g = packed.groups;
            let words: Vec<u32> = (0..TILE * g).map(|i| (i as u32).wrapping_mul(2654435761)).collect();
            let tile = Tile {
                words: &words,
                factor: std::array::from_fn(|i| -0.01 * (i as f32 + 1.0)),
                bias: &packed.bias,
                // Limits inside a panel, at its edges, none and everything.
                limit: [usize::MAX, 0, 5, 16, 17, 33, n, 2 * PAIR + 1],
            };
            let mut seen = [Vec::new(), Vec::new()];
            for (slot, kernel) in [Kernel::Portable, fast].into_iter().enumerate() {
                // A k larger than the keys: nothing is ever pruned.
                let bound = Bound {
                    metric: Metric::L2,
                    add: 0.0,
                    rel: 0.0,
                    base: 0.0,
                };
                let mut sels: Vec<Sel> = (0..TILE).map(|_| Sel::new(n + 1, bound)).collect();
                run(kernel, &packed, &tile, 0..packed.pairs(), &mut sels);
                for (r, sel) in sels.iter().enumerate() {
                    seen[slot].extend(sel.cands.iter().map(|&(a, j)| (r, j, a.to_bits())));
                }
            }
            seen.iter_mut().for_each(|v| v.sort_unstable());
            let visible: usize = tile.limit.iter().map(|&l| l.min(n)).sum();
            assert_eq!(
                seen[0].len(),
                visible,
                "d {d}: every real key a query may see, under f32::MAX; pads and rows past a limit never"
            );
            assert!(seen[0].iter().all(|&(r, j, _)| (j as usize) < tile.limit[r]));
            assert_eq!(seen[0], seen[1], "d {d}");
        }
    }

    /// Non-finite or enormous entries leave the 8-bit path (the caller falls
    /// back to SGEMM), as do over-wide keys.
    #[test]
    fn declines_what_it_cannot_bound() {
        let q = [1.0f32, 1.0];
        let keys = vec![0.5f32, f32::NAN, 1.0, 2.0];
        assert!(fresh(Kernel::Portable, Metric::L2, &q, &keys, 2, 1, None).is_none());
        let keys = vec![0.5f32, 1e20, 1.0, 2.0];
        assert!(fresh(Kernel::Portable, Metric::L2, &q, &keys, 2, 1, None).is_none());
        let inf = [f32::INFINITY, 1.0];
        assert!(fresh(Kernel::Portable, Metric::L2, &inf, &[1.0, 1.0], 2, 1, None).is_none());
        // A quantisation of other keys, or a tie order of another length, is not used.
        let other = Q8Keys::new(Metric::L2, &[1.0, 2.0], 2).unwrap();
        let four = [1.0f32, 2.0, 3.0, 4.0];
        let with = |metric: Metric, keys: &[f32], tie: Option<&[u64]>| {
            topk(Kernel::Portable, metric, &q, keys, &other, 2, 1, None, tie, None).is_some()
        };
        assert!(!with(Metric::L2, &four, None));
        assert!(!with(Metric::Cosine, &four[..2], None));
        assert!(!with(Metric::L2, &four[..2], Some(&[1, 2])));
        assert!(with(Metric::L2, &four[..2], Some(&[1])));
        let wide = vec![0.0f32; MAX_DIM + 1];
        assert!(fresh(Kernel::Portable, Metric::L2, &wide, &wide, MAX_DIM + 1, 1, None).is_none());
    }
}
