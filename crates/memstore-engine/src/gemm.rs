//! Exact batched top-k by blocked matrix products: the distances of a block
//! of queries to every key come from one SGEMM (`matrixmultiply`, the
//! BLIS-style kernel ndarray uses), each row is ranked by partial selection,
//! and only the `k` winners' distances are computed exactly with
//! [`math::distance`] — so results carry the same floats as a scalar scan.
//! Query blocks run on all cores (rayon). This is the exact search that
//! product-key and large memory layers use (Lample et al. 2019; Berges et al.
//! 2024), on the CPU.
//!
//! On a CPU with AVX-512 VNNI, large batches take an exact 8-bit prefilter
//! instead (module `q8`, after FAISS's scalar quantiser with refinement):
//! integer dot products with proven error bounds select every row that can
//! be among the `k` nearest, which are then ranked by [`math::distance`] —
//! the brute-force answer, 1.5–7× faster than SGEMM here (docs/benchmarks.md).
//! [`topk_ranked`] with a [`KeyCache`] lets an index keep the keys'
//! quantisation between searches. `MEMSTORE_NO_Q8=1` turns the path off.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rayon::prelude::*;

use memstore_api::{Error, Metric, Result, math};

/// Queries per SGEMM block.
const QBLOCK: usize = 256;
/// Keys per SGEMM chunk: a thread's score buffer is `QBLOCK × KCHUNK`
/// floats, 2 MiB, which stays in cache between the product that writes it
/// and the selection that reads it (an 8 MiB buffer would not).
const KCHUNK: usize = 2048;

/// Queries per call from which [`topk`] takes the 8-bit path (module `q8`)
/// when it must quantise every key for the call, which a few queries do not
/// repay.
const Q8_MIN_QUERIES: usize = 256;
/// The same with the keys' quantisation kept in a [`KeyCache`].
const Q8_MIN_QUERIES_CACHED: usize = 64;

/// The `k` nearest rows of `keys` (`n × dim`, row-major) for each query
/// (`m × dim`), among rows whose `mask` entry is set (all when `None`):
/// `m × k` distances (nearest first, ties by row; `+∞` pads when fewer rows
/// qualify) and row indices (`u32::MAX` pads). On a CPU with AVX-512 VNNI a
/// large batch goes through the exact 8-bit prefilter (module `q8`: the
/// brute-force answer, ties by row); otherwise, or for entries it cannot
/// bound, through [`topk_sgemm`].
pub fn topk(
    metric: Metric,
    queries: &[f32],
    keys: &[f32],
    dim: usize,
    k: usize,
    mask: Option<&[bool]>,
) -> Result<(Vec<f32>, Vec<u32>)> {
    let set = KeySet {
        keys,
        dim,
        ids: None,
        cache: None,
    };
    let found = topk_ranked(metric, queries, &set, k, 0, mask)?;
    Ok((found.dist, found.idx))
}

/// The 8-bit quantisation of a key matrix that [`topk_ranked`] builds on
/// first use and reuses while the owner's `version` of the keys stays the
/// same: the owner of the keys (an index) keeps one beside them and bumps
/// its version on every change. Empty on CPUs without VNNI.
#[derive(Default)]
pub struct KeyCache {
    slot: std::sync::Mutex<Option<(u64, Option<std::sync::Arc<crate::q8::Q8Keys>>)>>,
}

/// A clone starts empty (it is rebuilt on first use).
impl Clone for KeyCache {
    fn clone(&self) -> Self {
        KeyCache::default()
    }
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyCache")
    }
}

impl KeyCache {
    /// The quantisation of `keys` at `version`, built now if the cached one
    /// is older or of other keys; `None` where it cannot be built.
    fn get(&self, version: u64, metric: Metric, keys: &[f32], dim: usize) -> Option<std::sync::Arc<crate::q8::Q8Keys>> {
        let n = keys.len() / dim;
        // A poisoned lock only means a thread panicked while holding it; the
        // slot is replaced below whenever it does not match.
        let lock = || self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((v, packed)) = lock().as_ref()
            && *v == version
            && packed.as_ref().is_none_or(|p| p.fits(metric, n, dim))
        {
            // Keys of this version that cannot be quantised are remembered too.
            return packed.clone();
        }
        // Built without the lock held: the build runs on the rayon pool, and a
        // search waiting there on this lock (a caller inside a rayon job) must
        // not deadlock against it. Two racing searches may both build.
        let packed = crate::q8::Q8Keys::new(metric, keys, dim).map(std::sync::Arc::new);
        *lock() = Some((version, packed.clone()));
        packed
    }
}

/// A key matrix as [`topk_ranked`] searches it.
#[derive(Clone, Copy, Debug)]
pub struct KeySet<'a> {
    /// `n × dim` keys, row-major.
    pub keys: &'a [f32],
    /// Floats per key.
    pub dim: usize,
    /// Per-row ids that break exact ties (row order when `None`).
    pub ids: Option<&'a [u64]>,
    /// The keys' quantisation cache and the owner's current version of the
    /// keys (the owner changes it whenever the keys change).
    pub cache: Option<(&'a KeyCache, u64)>,
}

/// What [`topk_ranked`] found: `width` columns per query.
#[derive(Clone, Debug)]
pub struct Ranked {
    /// Exact distances ([`math::distance`]), nearest first; `+∞` pads.
    pub dist: Vec<f32>,
    /// Row indices; `u32::MAX` pads.
    pub idx: Vec<u32>,
    /// Columns per query: `k` when exact, up to `k + slack` otherwise.
    pub width: usize,
    /// Whether each row is the brute-force answer (ties by `ids`); if not,
    /// these are the SGEMM ranking's candidates for the caller to re-rank.
    pub exact: bool,
}

/// [`topk`] for an owner that can use more: where the exact 8-bit path runs
/// (VNNI) the answer is exact with ties broken by `set.ids`, and the keys'
/// quantisation comes from `set.cache` (built once per version of the keys,
/// so the path pays from smaller batches); elsewhere SGEMM returns `k +
/// slack` candidates per query for the caller to re-rank (see
/// `MemoryIndex::search`).
pub fn topk_ranked(
    metric: Metric,
    queries: &[f32],
    set: &KeySet<'_>,
    k: usize,
    slack: usize,
    mask: Option<&[bool]>,
) -> Result<Ranked> {
    let (keys, dim) = (set.keys, set.dim);
    let (m, n) = check_topk(queries, keys, dim, k, mask)?;
    if let Some(ids) = set.ids
        && ids.len() != n
    {
        return Err(Error::Shape(format!("{} ids for {n} keys", ids.len())));
    }
    let min = if set.cache.is_some() {
        Q8_MIN_QUERIES_CACHED
    } else {
        Q8_MIN_QUERIES
    };
    if m >= min
        && n > 0
        && let Some(kernel) = crate::q8::Kernel::detect()
    {
        let packed = match set.cache {
            Some((cache, version)) => cache.get(version, metric, keys, dim),
            None => crate::q8::Q8Keys::new(metric, keys, dim).map(std::sync::Arc::new),
        };
        if let Some(packed) = packed
            && let Some((dist, idx)) =
                crate::q8::topk(kernel, metric, queries, keys, &packed, dim, k, mask, set.ids, None)
        {
            return Ok(Ranked {
                dist,
                idx,
                width: k,
                exact: true,
            });
        }
    }
    let width = k + slack;
    let (dist, idx) = topk_sgemm(metric, queries, keys, dim, width, mask)?;
    Ok(Ranked {
        dist,
        idx,
        width,
        exact: false,
    })
}

/// Each row's `k` nearest among the rows before it (`rows` is `n × dim`;
/// row `i` sees rows `0..i`): `n × k` exact distances ([`math::distance`],
/// nearest first, ties by row; `+∞` pads) and row indices (`u32::MAX`
/// pads), through the 8-bit path in one pass. `None` where that path does
/// not run (no VNNI, `MEMSTORE_NO_Q8`, or rows it cannot bound): SGEMM has
/// no per-row limit, and the caller keeps its own scan. `learn` uses it for
/// the memories a batch creates from its own rows.
pub fn causal_topk(metric: Metric, rows: &[f32], dim: usize, k: usize) -> Option<(Vec<f32>, Vec<u32>)> {
    check_topk(rows, rows, dim, k, None).ok()?;
    let n = rows.len() / dim;
    if n == 0 {
        return None;
    }
    let kernel = crate::q8::Kernel::detect()?;
    let packed = crate::q8::Q8Keys::new(metric, rows, dim)?;
    let limit: Vec<usize> = (0..n).collect();
    crate::q8::topk(kernel, metric, rows, rows, &packed, dim, k, None, None, Some(&limit))
}

/// Validates [`topk`]'s shapes; returns the numbers of queries and keys.
fn check_topk(queries: &[f32], keys: &[f32], dim: usize, k: usize, mask: Option<&[bool]>) -> Result<(usize, usize)> {
    if dim == 0 || !queries.len().is_multiple_of(dim) || !keys.len().is_multiple_of(dim) {
        return Err(Error::Shape(format!(
            "{} query and {} key floats are not rows of {dim}",
            queries.len(),
            keys.len()
        )));
    }
    if k == 0 {
        return Err(Error::ZeroK);
    }
    let (m, n) = (queries.len() / dim, keys.len() / dim);
    if n > u32::MAX as usize {
        return Err(Error::Shape(format!("{n} keys exceed the index range")));
    }
    if let Some(mask) = mask
        && mask.len() != n
    {
        return Err(Error::Shape(format!("a mask of {} for {n} keys", mask.len())));
    }
    Ok((m, n))
}

/// [`topk`] by blocked SGEMM on any CPU: the ranking scores come from the
/// matrix product and only the `k` winners' distances are exact, so at
/// near-ties (within the product's rounding) the rows chosen may differ from
/// a scalar scan's; callers that need the scan's answer re-rank with slack
/// (see `MemoryIndex::search`).
pub fn topk_sgemm(
    metric: Metric,
    queries: &[f32],
    keys: &[f32],
    dim: usize,
    k: usize,
    mask: Option<&[bool]>,
) -> Result<(Vec<f32>, Vec<u32>)> {
    let (m, n) = check_topk(queries, keys, dim, k, mask)?;
    // Ranking scores: L2 by ‖k‖² − 2·q·k (‖q‖² is constant per row), inner
    // product by −q·k, cosine by −q̂·k̂ with unit rows.
    let unit = |v: &[f32]| -> Vec<f32> {
        let mut out = v.to_vec();
        out.chunks_mut(dim).for_each(to_unit);
        out
    };
    let (qs, ks): (Cow<'_, [f32]>, Cow<'_, [f32]>) = match metric {
        Metric::Cosine => (Cow::Owned(unit(queries)), Cow::Owned(unit(keys))),
        _ => (Cow::Borrowed(queries), Cow::Borrowed(keys)),
    };
    let bias: Vec<f32> = match metric {
        Metric::L2 => ks.chunks(dim).map(|r| math::dot(r, r)).collect(),
        _ => vec![0.0; n],
    };
    let scale = if metric == Metric::L2 { -2.0 } else { -1.0 };
    let kk = k.min(n);
    // Work items: (query block, key range). Query blocks of QBLOCK rows run
    // in parallel; when there are fewer blocks than threads, the keys are
    // split into ranges too so that a small batch still uses every core.
    // Each item walks its key range in chunks of KCHUNK rows (one SGEMM each,
    // packing each chunk of keys once per query block) and keeps a bounded
    // heap per query; the items' candidates are merged per query at the end.
    let blocks = m.div_ceil(QBLOCK);
    let threads = rayon::current_num_threads().max(1);
    let ranges = if blocks >= threads || n < 2 * KCHUNK {
        1
    } else {
        threads.div_ceil(blocks).min(n / KCHUNK).max(1)
    };
    let span = n.div_ceil(ranges);
    let items: Vec<(usize, usize)> = (0..blocks).flat_map(|b| (0..ranges).map(move |r| (b, r))).collect();
    let found: Vec<Vec<Vec<Cand<u32>>>> = items
        .par_iter()
        .map_init(
            // As large as a work item's product gets: a few queries or a
            // short key range need less than the full `QBLOCK × KCHUNK`
            // (zeroing 2 MiB per item would cost more than a small search).
            || vec![0.0f32; QBLOCK.min(m) * KCHUNK.min(span)],
            |buf, &(b, r)| {
                let q0 = b * QBLOCK;
                let rows = QBLOCK.min(m - q0);
                let q = &qs[q0 * dim..(q0 + rows) * dim];
                let (lo, hi) = (r * span, ((r + 1) * span).min(n));
                let mut heaps: Vec<BinaryHeap<Cand<u32>>> =
                    (0..rows).map(|_| BinaryHeap::with_capacity(kk + 1)).collect();
                let mut c0 = lo;
                while c0 < hi {
                    let cols = KCHUNK.min(hi - c0);
                    // buf[r, j] = scale · q_r · k_(c0 + j).
                    scaled_products(q, dim, rows, &ks[c0 * dim..(c0 + cols) * dim], dim, scale, buf, cols)?;
                    for (row, heap) in heaps.iter_mut().enumerate() {
                        let scores = &mut buf[row * cols..(row + 1) * cols];
                        select(
                            scores,
                            &bias[c0..c0 + cols],
                            mask.map(|m| &m[c0..c0 + cols]),
                            c0,
                            kk,
                            heap,
                        );
                    }
                    c0 += cols;
                }
                Ok(heaps.into_iter().map(BinaryHeap::into_vec).collect())
            },
        )
        .collect::<Result<_>>()?;
    let mut dist = vec![f32::INFINITY; m * k];
    let mut idx = vec![u32::MAX; m * k];
    dist.par_chunks_mut(k)
        .zip(idx.par_chunks_mut(k))
        .enumerate()
        .for_each(|(i, (drow, irow))| {
            let (b, row) = (i / QBLOCK, i % QBLOCK);
            let mut cands: Vec<Cand<u32>> = (0..ranges)
                .flat_map(|r| found[b * ranges + r][row].iter().copied())
                .collect();
            if cands.len() > kk {
                cands.select_nth_unstable(kk - 1);
                cands.truncate(kk);
            }
            let qrow = &queries[i * dim..(i + 1) * dim];
            let mut top: Vec<(f32, u32)> = cands
                .iter()
                .map(|c| {
                    let j = c.1 as usize;
                    (math::distance(metric, qrow, &keys[j * dim..(j + 1) * dim]), c.1)
                })
                .collect();
            top.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            for (j, (d, x)) in top.into_iter().enumerate() {
                drow[j] = d;
                irow[j] = x;
            }
        });
    Ok((dist, idx))
}

/// `out[r · out_stride + j] = scale · (q_r · key_j)` for `rows` queries, query
/// `r` being `queries[r · q_stride..][..dim]`, and every row `j` of `keys`
/// (`n × dim`, row-major), by one blocked SGEMM (`matrixmultiply`); the rest
/// of `out` is left as it is. The strides let a caller score rows that lie
/// interleaved in a larger matrix (one partition's queries of a batch) and
/// write them where they belong. An error, with nothing written, when a
/// slice is too short for the shapes or `out_stride < n`.
// The two strided matrices are each a slice, a stride and (for the queries)
// a row count: grouping them would only rename SGEMM's own arguments.
#[allow(clippy::too_many_arguments)]
pub fn scaled_products(
    queries: &[f32],
    q_stride: usize,
    rows: usize,
    keys: &[f32],
    dim: usize,
    scale: f32,
    out: &mut [f32],
    out_stride: usize,
) -> Result<()> {
    if dim == 0 || !keys.len().is_multiple_of(dim) {
        return Err(Error::Shape(format!("{} key floats are not rows of {dim}", keys.len())));
    }
    let n = keys.len() / dim;
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let need = |stride: usize, width: usize| stride.checked_mul(rows - 1).and_then(|x| x.checked_add(width));
    if q_stride < dim || need(q_stride, dim).is_none_or(|x| x > queries.len()) {
        return Err(Error::Shape(format!(
            "{rows} queries of {dim} at a stride of {q_stride} need more than {} floats",
            queries.len()
        )));
    }
    if out_stride < n || need(out_stride, n).is_none_or(|x| x > out.len()) {
        return Err(Error::Shape(format!(
            "{rows} rows of {n} scores at a stride of {out_stride} do not fit {} floats",
            out.len()
        )));
    }
    // SAFETY: checked above: query row r (r < rows) reads
    // queries[r·q_stride .. r·q_stride + dim], key j reads keys[j·dim ..
    // (j+1)·dim] (the transpose's column j), and out row r is written at
    // out[r·out_stride .. r·out_stride + n], all in bounds; rows of out do
    // not overlap (out_stride ≥ n) and out is borrowed mutably, apart from
    // the inputs; beta = 0, so out's old contents are not read.
    unsafe {
        matrixmultiply::sgemm(
            rows,
            dim,
            n,
            scale,
            queries.as_ptr(),
            q_stride as isize,
            1,
            keys.as_ptr(),
            1,
            dim as isize,
            0.0,
            out.as_mut_ptr(),
            out_stride as isize,
            1,
        );
    }
    Ok(())
}

/// Scales `row` to unit length in place (a zero row stays zero): how the
/// cosine paths normalise keys and queries before their dot products.
pub(crate) fn to_unit(row: &mut [f32]) {
    let norm = math::dot(row, row).sqrt();
    if norm > 0.0 {
        row.iter_mut().for_each(|x| *x /= norm);
    }
}

/// A candidate ordered by (score, then `I`: a row or an id); in a max-heap
/// the top is the worst kept. Shared by the matrix-product search and the
/// scalar scan so that both break ties the same way.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cand<I>(pub(crate) f32, pub(crate) I);

impl<I: Ord> PartialEq for Cand<I> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<I: Ord> Eq for Cand<I> {}
impl<I: Ord> PartialOrd for Cand<I> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<I: Ord> Ord for Cand<I> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// The fewest rows per parallel task of [`scan`]; above it the rows are cut
/// into one equal part per thread (fixed parts of 8192 left 10k rows split
/// 8192 + 1808, and the parallel scan slower than the serial one).
const SCAN_CHUNK: usize = 4096;
/// Rows whose distances [`scan`] computes before ranking them (a buffer that
/// stays in the first-level cache).
const SCAN_RUN: usize = 256;

/// The `k` nearest rows of `keys` (one id per row in `ids`) to one query by
/// exact distance ([`math::distance`]), nearest first, ties by id, among rows
/// whose `mask` entry is set. With `parallel`, chunks of rows are scanned on
/// all cores. The path for a few queries, where a matrix product does not pay.
pub fn scan<I: Ord + Copy + Send + Sync>(
    metric: Metric,
    q: &[f32],
    keys: &[f32],
    ids: &[I],
    k: usize,
    mask: Option<&[bool]>,
    parallel: bool,
) -> Result<Vec<(f32, I)>> {
    let dim = q.len();
    if dim == 0 || keys.len() != ids.len() * dim || mask.is_some_and(|m| m.len() != ids.len()) {
        return Err(Error::Shape(format!(
            "a query of {dim} floats against {} key floats, {} ids and a mask of {:?}",
            keys.len(),
            ids.len(),
            mask.map(<[bool]>::len)
        )));
    }
    if k == 0 {
        return Err(Error::ZeroK);
    }
    let best = |rows: std::ops::Range<usize>| -> Vec<Cand<I>> {
        let mut heap: BinaryHeap<Cand<I>> = BinaryHeap::with_capacity(k + 1);
        let mut offer = |c: Cand<I>| {
            if heap.len() < k {
                heap.push(c);
            } else if let Some(mut top) = heap.peek_mut()
                && c < *top
            {
                *top = c;
            }
        };
        match mask {
            // Unfiltered: the distances of a run of rows at a time, by the
            // grouped scan (the same floats as `math::distance` per row).
            None => {
                let mut dist = Vec::with_capacity(SCAN_RUN);
                let mut r0 = rows.start;
                while r0 < rows.end {
                    let r1 = (r0 + SCAN_RUN).min(rows.end);
                    dist.clear();
                    math::distances(metric, q, &keys[r0 * dim..r1 * dim], &mut dist);
                    for (j, &d) in dist.iter().enumerate() {
                        offer(Cand(d, ids[r0 + j]));
                    }
                    r0 = r1;
                }
            }
            Some(m) => {
                for r in rows.filter(|&r| m[r]) {
                    offer(Cand(math::distance(metric, q, &keys[r * dim..(r + 1) * dim]), ids[r]));
                }
            }
        }
        heap.into_vec()
    };
    let n = ids.len();
    let part = n.div_ceil(rayon::current_num_threads().max(1)).max(SCAN_CHUNK);
    let mut all: Vec<Cand<I>> = if parallel && n > part {
        (0..n.div_ceil(part))
            .into_par_iter()
            .flat_map_iter(|c| best(c * part..((c + 1) * part).min(n)))
            .collect()
    } else {
        best(0..n)
    };
    all.sort();
    all.truncate(k);
    Ok(all.into_iter().map(|c| (c.0, c.1)).collect())
}

/// Adds to `heap` the rows `offset + j` of this chunk, keeping the `take`
/// smallest `scores[j] + bias[j]` seen so far (ties by row) among rows the
/// mask admits: one pass with a bounded max-heap. Once the heap
/// is full, whole chunks of rows are skipped by one vectorisable comparison
/// with the worst score kept, so a row costs a fraction of a nanosecond (a
/// full partial sort of every row cost more than the matrix product at 100k
/// keys).
fn select(
    scores: &mut [f32],
    bias: &[f32],
    mask: Option<&[bool]>,
    offset: usize,
    take: usize,
    heap: &mut BinaryHeap<Cand<u32>>,
) {
    const CHUNK: usize = 16;
    if take == 0 {
        return;
    }
    for (s, b) in scores.iter_mut().zip(bias) {
        *s += b;
    }
    let mut worst = if heap.len() == take {
        heap.peek().map_or(f32::NAN, |c| c.0)
    } else {
        f32::NAN
    };
    let offer = |j: usize, s: f32, heap: &mut BinaryHeap<Cand<u32>>, worst: &mut f32| {
        if mask.is_some_and(|m| !m[j]) {
            return;
        }
        let j = offset + j;
        if heap.len() < take {
            heap.push(Cand(s, j as u32));
            if heap.len() == take {
                *worst = heap.peek().map_or(f32::NAN, |c| c.0);
            }
        } else if s.total_cmp(worst) == Ordering::Less {
            // Rows come in increasing order, so a tie with the worst kept
            // score never displaces it: only a strictly smaller score does.
            if let Some(mut top) = heap.peek_mut() {
                *top = Cand(s, j as u32);
            }
            *worst = heap.peek().map_or(f32::NAN, |c| c.0);
        }
    };
    for (c, chunk) in scores.chunks(CHUNK).enumerate() {
        // `<=` admits everything `total_cmp` could call smaller (−0 vs +0
        // included); a NaN worst (heap not full yet, or NaN scores) admits all.
        let w = worst;
        if !w.is_nan() && !chunk.iter().fold(false, |any, &x| any | (x <= w)) {
            continue;
        }
        for (i, &x) in chunk.iter().enumerate() {
            offer(c * CHUNK + i, x, heap, &mut worst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use memstore_api::testkit::util::Rng;

    /// Uniform in `[-0.5, 0.5)`.
    fn rng(r: &mut Rng) -> f32 {
        r.unit() * 0.5
    }

    /// Strided products land where the strides say, equal to the dot
    /// products scaled (up to the SGEMM's rounding), with the rest of the
    /// output untouched; slices too short for the shapes are refused with
    /// nothing written.
    #[test]
    fn scaled_products_write_strided_rows_and_refuse_short_slices() {
        let mut s = Rng::new(5);
        let (rows, dim, n, q_stride, out_stride) = (5usize, 7usize, 9usize, 10usize, 12usize);
        let queries: Vec<f32> = (0..(rows - 1) * q_stride + dim).map(|_| rng(&mut s)).collect();
        let keys: Vec<f32> = (0..n * dim).map(|_| rng(&mut s)).collect();
        let mut out = vec![7.0f32; (rows - 1) * out_stride + n];
        scaled_products(&queries, q_stride, rows, &keys, dim, -2.0, &mut out, out_stride).unwrap();
        for r in 0..rows {
            let q = &queries[r * q_stride..r * q_stride + dim];
            for j in 0..out_stride {
                let Some(&got) = out.get(r * out_stride + j) else {
                    continue;
                };
                if j < n {
                    let want = -2.0 * math::dot(q, &keys[j * dim..(j + 1) * dim]);
                    assert!((got - want).abs() <= 1e-5, "row {r} key {j}: {got} vs {want}");
                } else {
                    assert_eq!(got, 7.0, "row {r} column {j} is not the product's");
                }
            }
        }
        let before = out.clone();
        let short = &queries[..queries.len() - 1];
        assert!(scaled_products(short, q_stride, rows, &keys, dim, 1.0, &mut out, out_stride).is_err());
        assert!(scaled_products(&queries, q_stride, rows, &keys[1..], dim, 1.0, &mut out, out_stride).is_err());
        assert!(scaled_products(&queries, q_stride, rows, &keys, dim, 1.0, &mut out, n - 1).is_err());
        let cut = out.len() - 1;
        assert!(scaled_products(&queries, q_stride, rows, &keys, dim, 1.0, &mut out[..cut], out_stride).is_err());
        assert!(scaled_products(&queries, dim - 1, rows, &keys, dim, 1.0, &mut out, out_stride).is_err());
        assert_eq!(out, before);
        // Nothing to score: nothing written, no error.
        assert!(scaled_products(&[], q_stride, 0, &keys, dim, 1.0, &mut [], out_stride).is_ok());
    }

    /// The scan over more rows than one part (so the parallel path cuts them
    /// into parts, and the serial one into runs of `SCAN_RUN` with a partial
    /// last run) returns the brute-force answer, masked or not, with
    /// duplicate keys so that ties are broken by id.
    #[test]
    fn scan_over_many_rows_matches_brute_force() {
        let mut s = Rng::new(3);
        let (n, d, k) = (2 * SCAN_CHUNK + 77, 6usize, 9usize);
        let mut keys: Vec<f32> = (0..n * d).map(|_| rng(&mut s)).collect();
        let first: Vec<f32> = keys[..d].to_vec();
        for r in [SCAN_CHUNK - 1, SCAN_CHUNK + SCAN_RUN, n - 1] {
            keys[r * d..(r + 1) * d].copy_from_slice(&first);
        }
        let ids: Vec<u64> = (0..n as u64).map(|i| 1000 + 3 * i).collect();
        let mask: Vec<bool> = (0..n).map(|j| j % 5 != 1).collect();
        for metric in [Metric::L2, Metric::Cosine, Metric::InnerProduct] {
            for q in [first.clone(), (0..d).map(|_| rng(&mut s)).collect()] {
                for mask in [None, Some(&mask[..])] {
                    let mut want: Vec<(f32, u64)> = (0..n)
                        .filter(|&j| mask.is_none_or(|m| m[j]))
                        .map(|j| (math::distance(metric, &q, &keys[j * d..(j + 1) * d]), ids[j]))
                        .collect();
                    want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                    want.truncate(k);
                    for parallel in [false, true] {
                        let got = scan(metric, &q, &keys, &ids, k, mask, parallel).unwrap();
                        assert_eq!(got, want, "{metric:?} parallel {parallel} mask {}", mask.is_some());
                    }
                }
            }
        }
    }

    /// Agrees with a scalar scan on every metric, with a mask and with fewer
    /// qualifying rows than k (padding), across several query blocks.
    #[test]
    fn matches_a_scalar_scan() {
        let mut s = Rng::new(7);
        let (m, n, d, k) = (150usize, 90usize, 5usize, 6usize);
        let q: Vec<f32> = (0..m * d).map(|_| rng(&mut s)).collect();
        let keys: Vec<f32> = (0..n * d).map(|_| rng(&mut s)).collect();
        let mask: Vec<bool> = (0..n).map(|j| j % 3 != 0).collect();
        for metric in [Metric::L2, Metric::Cosine, Metric::InnerProduct] {
            for mask in [None, Some(&mask[..])] {
                let (dist, idx) = topk(metric, &q, &keys, d, k, mask).unwrap();
                for i in 0..m {
                    let mut want: Vec<(f32, u32)> = (0..n)
                        .filter(|&j| mask.is_none_or(|m| m[j]))
                        .map(|j| {
                            (
                                math::distance(metric, &q[i * d..(i + 1) * d], &keys[j * d..(j + 1) * d]),
                                j as u32,
                            )
                        })
                        .collect();
                    want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                    want.truncate(k);
                    let got: Vec<(f32, u32)> = (0..k).map(|j| (dist[i * k + j], idx[i * k + j])).collect();
                    assert_eq!(got, want, "{metric:?} row {i}");
                    let rows: Vec<u32> = (0..n as u32).collect();
                    let scanned = scan(metric, &q[i * d..(i + 1) * d], &keys, &rows, k, mask, i % 2 == 0).unwrap();
                    assert_eq!(scanned, want, "scan, {metric:?} row {i}");
                }
            }
        }
        // More keys than one chunk, few queries: the keys are split into
        // ranges searched in parallel and merged (on a machine with 2+ threads).
        let big: Vec<f32> = (0..(2 * KCHUNK + 1000) * 3).map(|_| rng(&mut s)).collect();
        let nb = big.len() / 3;
        let bmask: Vec<bool> = (0..nb).map(|j| j % 5 != 1).collect();
        for mask in [None, Some(&bmask[..])] {
            let (dist, idx) = topk(Metric::L2, &q[..3 * 3], &big, 3, 9, mask).unwrap();
            for i in 0..3 {
                let mut want: Vec<(f32, u32)> = (0..nb)
                    .filter(|&j| mask.is_none_or(|m| m[j]))
                    .map(|j| {
                        let key = &big[j * 3..(j + 1) * 3];
                        (math::distance(Metric::L2, &q[i * 3..(i + 1) * 3], key), j as u32)
                    })
                    .collect();
                want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                want.truncate(9);
                let got: Vec<(f32, u32)> = (0..9).map(|j| (dist[i * 9 + j], idx[i * 9 + j])).collect();
                assert_eq!(got, want, "query {i}");
            }
        }
        // Many exact ties (keys on a coarse grid, duplicated): the lowest rows win.
        let grid: Vec<f32> = (0..400 * d).map(|_| (rng(&mut s) * 4.0).round()).collect();
        for metric in [Metric::L2, Metric::InnerProduct] {
            let (dist, idx) = topk(metric, &q[..8 * d], &grid, d, 7, None).unwrap();
            for i in 0..8 {
                let mut want: Vec<(f32, u32)> = (0..400)
                    .map(|j| {
                        let key = &grid[j * d..(j + 1) * d];
                        (math::distance(metric, &q[i * d..(i + 1) * d], key), j as u32)
                    })
                    .collect();
                want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                let got: Vec<u32> = idx[i * 7..(i + 1) * 7].to_vec();
                let cut = want[6].0;
                // Rows strictly inside the cut must all be there; at the cut the
                // matrix product's rounding may pick other rows with the same
                // exact distance, which is what `MemoryIndex` re-ranks for.
                for w in want.iter().take(7).filter(|w| w.0 < cut) {
                    assert!(got.contains(&w.1), "{metric:?} row {i}: {w:?} missing from {got:?}");
                }
                for (j, &g) in got.iter().enumerate() {
                    assert_eq!(
                        dist[i * 7 + j],
                        math::distance(
                            metric,
                            &q[i * d..(i + 1) * d],
                            &grid[g as usize * d..(g as usize + 1) * d]
                        )
                    );
                }
                assert!(dist[i * 7..(i + 1) * 7].windows(2).all(|w| w[0] <= w[1]));
            }
        }
        let few = vec![true, false, false, true, false, false];
        let (dist, idx) = topk(Metric::L2, &q[..d], &keys[..6 * d], d, 4, Some(&few)).unwrap();
        assert_eq!(&idx[2..], &[u32::MAX, u32::MAX]);
        assert!(dist[2].is_infinite() && dist[3].is_infinite());
        assert!(topk(Metric::L2, &q[..d], &keys, d, 0, None).is_err());
        assert!(scan(Metric::L2, &q[..d], &keys, &[0u32; 3], 1, None, false).is_err());
        assert!(scan(Metric::L2, &q[..d], &keys, &vec![0u32; n], 0, None, false).is_err());
        assert!(topk(Metric::L2, &q[..d + 1], &keys, d, 1, None).is_err());
        assert!(topk(Metric::L2, &q[..d], &keys, d, 1, Some(&few)).is_err());
    }
}
