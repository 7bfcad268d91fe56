//! Product keys: a memory table whose keys are the cells of a grid, searched
//! at a cost that grows with the square root of its rows (Lample et al.,
//! "Large Memory Layers with Product Keys", 2019; Berges et al., "Memory
//! Layers at Scale", 2024).
//!
//! Each head partition of `n²` slots has two tables of `n` sub-keys, one for
//! each half of a key (the first `dim / 2` components and the rest). Cell
//! `(i, j)` has the key `[a_i; b_j]`: the concatenation of the first half's
//! sub-key `i` and the second half's sub-key `j`, and holds at most one
//! memory. The store holds every memory's full key, like any other table's;
//! the sub-key tables are rebuilt from those keys ([`ProductKeys::place`]),
//! so nothing but the rows needs saving.
//!
//! L2 and inner-product distances split over the halves
//! (`‖q − [a; b]‖² = ‖q₁ − a‖² + ‖q₂ − b‖²`, `q·[a; b] = q₁·a + q₂·b`),
//! so a query's `k` nearest cells are among the `k × k` cells formed by the
//! `k` nearest sub-keys of each half: if cell `(i, j)` were nearer than the
//! `k`-th nearest cell with `i` outside its half's `k` nearest, the `k`
//! sub-keys nearer than `i` would give `k` cells `(i', j)` nearer still.
//! The search ([`ProductKeys::topk`]) therefore costs `2·n` half-width
//! distances and at most `k²` sums per query instead of `n²` full
//! distances, and answers what an exact search of a full grid answers (the
//! same distances; ties, and near-ties within rounding, may pick other
//! cells). On the CPU the halves' scores come from strided SGEMMs over
//! blocks of query rows, and a row's candidate cells are visited in the
//! order of their halves' scores, stopping once a sum exceeds the `k`-th
//! best so far. Cells without a memory are skipped among the `k²`
//! candidates, and sub-keys with no memory left are not searched: on a
//! grid with empty cells a query can get fewer than `k` memories (padding,
//! distance `+∞`, as a partition with fewer than `k` memories gives) even
//! when more exist elsewhere on the grid.
//!
//! The grid holds memories only where its cells are: a product-key table
//! takes new memories whose keys lie on its grid (a free cell, or a free
//! sub-key row for a new half), and does not recombine near-duplicates
//! (a merged key would lie between cells).

use std::collections::HashMap;
use std::sync::OnceLock;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use memstore_api::{Metric, math};
use rayon::prelude::*;

use super::device::{TopK, on_cpu};
use crate::{DmtError, Result, cpu_f32};

/// The sub-key tables of a tier's partitions and the memory in each cell.
#[derive(Clone, Debug)]
pub struct ProductKeys {
    metric: Metric,
    dim: usize,
    /// Width of the first half.
    split: usize,
    parts: usize,
    /// Sub-keys per half and partition (a partition has `n²` cells).
    n: usize,
    /// Each half's sub-keys, `parts · n` rows (partition-major).
    sub: [Vec<f32>; 2],
    /// Memories using each sub-key; a sub-key none uses is free.
    uses: [Vec<u32>; 2],
    /// The sub-key row of each half's bit pattern, per partition.
    lookup: [HashMap<(usize, Vec<u32>), usize>; 2],
    /// The slot of each cell `part · n² + i · n + j`, `-1` where empty.
    cells: Vec<i64>,
    /// The cell of each occupied slot.
    cell_of_slot: HashMap<usize, usize>,
    /// The tables on a device, for the tensor search; rebuilt on first use
    /// after a change.
    tensors: OnceLock<Tables>,
}

/// Query rows per partition that one task of the CPU search scores at once
/// (its score buffers: `2 · QUERY_BLOCK · parts · n` floats).
const QUERY_BLOCK: usize = 64;

/// A CPU search task's buffers, reused across its blocks.
struct HostScratch {
    /// Each half's scores of the block's rows, `rows × n`.
    scores: [Vec<f32>; 2],
    /// Each half's nearest sub-keys in use of one row.
    near: [Near; 2],
    /// One row's best candidate cells: (score, (slot, sub-key a, sub-key b)).
    found: Least<(i64, u32, u32)>,
    /// Those cells by exact distance: (distance, slot, sub-key a, sub-key b).
    best: Vec<(f32, i64, u32, u32)>,
    /// A key put together from its halves.
    key: Vec<f32>,
}

/// The `take` least `(score, tie)` pairs offered (scores by `total_cmp`,
/// then ties by `T`), kept sorted by insertion: `take` is a search's `k`
/// (a few), and once it is full an offer no better than the worst kept
/// costs one comparison.
struct Least<T> {
    take: usize,
    buf: Vec<(f32, T)>,
}

impl<T: Ord + Copy> Least<T> {
    fn new(take: usize) -> Self {
        Least {
            take,
            buf: Vec::with_capacity(take + 1),
        }
    }

    fn order(x: &(f32, T), y: &(f32, T)) -> std::cmp::Ordering {
        x.0.total_cmp(&y.0).then(x.1.cmp(&y.1))
    }

    fn clear(&mut self) {
        self.buf.clear();
    }

    /// The worst score kept once `take` pairs are (`None` before: any pair
    /// enters).
    fn bound(&self) -> Option<f32> {
        if self.buf.len() == self.take {
            self.buf.last().map(|w| w.0)
        } else {
            None
        }
    }

    fn offer(&mut self, score: f32, tie: T) {
        let pair = (score, tie);
        if self.buf.len() == self.take {
            match self.buf.last() {
                Some(worst) if Self::order(&pair, worst).is_lt() => {
                    self.buf.pop();
                }
                _ => return,
            }
        }
        self.buf.push(pair);
        let mut at = self.buf.len() - 1;
        while at > 0 && Self::order(&self.buf[at], &self.buf[at - 1]).is_lt() {
            self.buf.swap(at, at - 1);
            at -= 1;
        }
    }

    /// The least pairs, ascending.
    fn sorted(&self) -> &[(f32, T)] {
        &self.buf
    }
}

/// One row's nearest sub-keys of a half: the kept (score, sub-key) pairs,
/// ascending (ties by sub-key), at most `take` of them, with the scratch
/// [`nearest`] works in.
struct Near {
    take: usize,
    /// The row's sums `scores + bias`.
    sums: Vec<f32>,
    /// Each run's least sum.
    mins: Vec<f32>,
    /// The sums up to the bound and their sub-keys; after [`nearest`], the
    /// kept pairs.
    kept: Vec<(f32, u32)>,
}

impl Near {
    fn new(take: usize) -> Self {
        Near {
            take,
            sums: Vec::new(),
            mins: Vec::new(),
            kept: Vec::new(),
        }
    }

    /// The kept (score, sub-key) pairs, ascending.
    fn pairs(&self) -> impl Iterator<Item = (f32, u32)> + '_ {
        self.kept.iter().copied()
    }

    /// The kept pairs' least score.
    fn first(&self) -> Option<f32> {
        self.kept.first().map(|p| p.0)
    }
}

/// Keeps in `out` the least `scores[j] + bias[j]` (as many as it holds) and
/// their `j`, ascending, ties by `j`; a sum that is not below `+∞` never
/// enters (`bias` is `+∞` for a sub-key no memory uses). The row is cut
/// into about `2 · take` runs: `take` runs each hold a sum no greater than
/// the `take`-th least of the runs' minima, so no kept sum is above it and
/// only the sums up to it are sorted. Finding the bound does not branch on
/// the data, and the few sums up to it are the only ones handled one by
/// one: inserting each sum that beats the worst kept as it comes would
/// mispredict at many of them (`cargo bench -p burn-dmt --bench tier --
/// product_keys`).
fn nearest(scores: &[f32], bias: &[f32], out: &mut Near) {
    let Near {
        take,
        sums,
        mins,
        kept: cand,
    } = out;
    let take = *take;
    cand.clear();
    let n = scores.len().min(bias.len());
    if take == 0 || n == 0 {
        return;
    }
    sums.clear();
    sums.extend(scores[..n].iter().zip(&bias[..n]).map(|(s, b)| s + b));
    let run = (n / (2 * take)).max(1);
    let mut bound = f32::INFINITY;
    if n.div_ceil(run) > take {
        mins.clear();
        // A run's least sum (NaN never taken; +∞ when no sum is below it).
        mins.extend(
            sums.chunks(run)
                .map(|r| r.iter().fold(f32::INFINITY, |m, &x| if x < m { x } else { m })),
        );
        let (_, b, _) = mins.select_nth_unstable_by(take - 1, |x, y| x.total_cmp(y));
        bound = *b;
    }
    for (j, &x) in sums.iter().enumerate() {
        if x <= bound && x < f32::INFINITY {
            cand.push((x, j as u32));
        }
    }
    // Finite sums only: `partial_cmp` orders them (−0 and +0 equal, as `<`
    // does), ties by sub-key.
    cand.sort_unstable_by(|x, y| {
        x.0.partial_cmp(&y.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(x.1.cmp(&y.1))
    });
    cand.truncate(take);
}

/// [`ProductKeys`]' tables as tensors of a device's inner backend.
#[derive(Clone, Debug)]
struct Tables {
    device: Device,
    /// Each half's sub-keys, `[parts, n, width]`.
    sub: [Tensor<3>; 2],
    /// Sub-keys no memory uses, `[parts, 1, n]`.
    unused: [Tensor<3, Bool>; 2],
    /// Slot of each cell, `[parts · n²]` (`-1`: empty).
    cells: Tensor<1, Int>,
}

impl ProductKeys {
    /// An empty grid for a tier of `parts` partitions of `per` slots with
    /// `dim`-wide keys under `metric`: `per` must be a square `n²`, keys at
    /// least 2 wide, the metric L2 or inner product (cosine distance does
    /// not split over the halves).
    pub fn new(metric: Metric, dim: usize, parts: usize, per: usize) -> Result<Self> {
        let n = per.isqrt();
        if n == 0 || n * n != per {
            return Err(DmtError::InvalidArgument(format!(
                "a product-key table needs a square number of slots per partition ({per} is not n²)"
            )));
        }
        if dim < 2 {
            return Err(DmtError::InvalidArgument(format!(
                "product keys split a key in two halves: {dim}-wide keys are too narrow"
            )));
        }
        if metric == Metric::Cosine {
            return Err(DmtError::InvalidArgument(
                "product keys need a metric that splits over the key's halves (L2 or inner product, not cosine)".into(),
            ));
        }
        let split = dim / 2;
        Ok(ProductKeys {
            metric,
            dim,
            split,
            parts,
            n,
            sub: [vec![0.0; parts * n * split], vec![0.0; parts * n * (dim - split)]],
            uses: [vec![0; parts * n], vec![0; parts * n]],
            lookup: [HashMap::new(), HashMap::new()],
            cells: vec![-1; parts * n * n],
            cell_of_slot: HashMap::new(),
            tensors: OnceLock::new(),
        })
    }

    /// Sub-keys per half of a partition (`√` of its slots).
    pub fn sub_keys(&self) -> usize {
        self.n
    }

    /// Memories on the grid.
    pub fn len(&self) -> usize {
        self.cell_of_slot.len()
    }

    /// Whether no cell holds a memory.
    pub fn is_empty(&self) -> bool {
        self.cell_of_slot.is_empty()
    }

    /// Floats of the sub-key tables: what a model needs of the keys at
    /// inference (`parts · n · dim`; the full keys are their concatenations).
    pub fn key_floats(&self) -> usize {
        self.parts * self.n * self.dim
    }

    fn width(&self, half: usize) -> usize {
        if half == 0 { self.split } else { self.dim - self.split }
    }

    fn half<'a>(&self, half: usize, key: &'a [f32]) -> &'a [f32] {
        if half == 0 {
            &key[..self.split]
        } else {
            &key[self.split..]
        }
    }

    fn sub_row(&self, half: usize, row: usize) -> &[f32] {
        let w = self.width(half);
        &self.sub[half][row * w..(row + 1) * w]
    }

    /// The full key of cell `cell` (`part · n² + i · n + j`).
    pub fn cell_key(&self, cell: usize) -> Vec<f32> {
        let (part, i, j) = self.split_cell(cell);
        let mut key = self.sub_row(0, part * self.n + i).to_vec();
        key.extend_from_slice(self.sub_row(1, part * self.n + j));
        key
    }

    /// Writes the key of partition `part`'s cell `(a, b)` into `out`.
    fn put_key(&self, part: usize, a: u32, b: u32, out: &mut [f32]) {
        out[..self.split].copy_from_slice(self.sub_row(0, part * self.n + a as usize));
        out[self.split..].copy_from_slice(self.sub_row(1, part * self.n + b as usize));
    }

    fn split_cell(&self, cell: usize) -> (usize, usize, usize) {
        let nn = self.n * self.n;
        (cell / nn, (cell % nn) / self.n, cell % self.n)
    }

    /// The cell of the memory in `slot`, if it holds one.
    pub fn cell_of(&self, slot: usize) -> Option<usize> {
        self.cell_of_slot.get(&slot).copied()
    }

    /// Puts the memory of `slot` with `key` on partition `part`'s grid:
    /// each half takes the sub-key equal to it (bit for bit) or, when none
    /// is, a free sub-key row. Refused, with nothing changed, when a half
    /// finds no free row (the partition's keys are not `n × n` products)
    /// or the cell already holds a memory. Returns the cell.
    pub fn place(&mut self, part: usize, key: &[f32], slot: usize) -> Result<usize> {
        if key.len() != self.dim || part >= self.parts {
            return Err(DmtError::InvalidArgument(format!(
                "a {}-wide key for partition {part} of a product-key table of {}-wide keys and {} partitions",
                key.len(),
                self.dim,
                self.parts
            )));
        }
        if self.cell_of_slot.contains_key(&slot) {
            return Err(DmtError::InvalidArgument(format!("slot {slot} is on the grid already")));
        }
        let n = self.n;
        let mut rows = [(0usize, false); 2];
        for (h, row) in rows.iter_mut().enumerate() {
            let bits: Vec<u32> = self.half(h, key).iter().map(|x| x.to_bits()).collect();
            *row = match self.lookup[h].get(&(part, bits)) {
                Some(&r) => (r, false),
                None => {
                    let free = (part * n..(part + 1) * n)
                        .find(|&r| self.uses[h][r] == 0)
                        .ok_or_else(|| {
                            DmtError::InvalidArgument(format!(
                                "partition {part}'s keys are not a product grid: their {} halves take more than \
                                 its {n} sub-keys",
                                if h == 0 { "first" } else { "second" }
                            ))
                        })?;
                    (free, true)
                }
            };
        }
        let cell = part * n * n + (rows[0].0 - part * n) * n + (rows[1].0 - part * n);
        if self.cells[cell] >= 0 {
            return Err(DmtError::InvalidArgument(format!(
                "partition {part}'s grid cell ({}, {}) holds the memory of slot {} already",
                rows[0].0 - part * n,
                rows[1].0 - part * n,
                self.cells[cell]
            )));
        }
        for (h, &(row, new)) in rows.iter().enumerate() {
            if new {
                let w = self.width(h);
                let half = self.half(h, key).to_vec();
                self.lookup[h].insert((part, half.iter().map(|x| x.to_bits()).collect()), row);
                self.sub[h][row * w..(row + 1) * w].copy_from_slice(&half);
            }
            self.uses[h][row] += 1;
        }
        self.cells[cell] = slot as i64;
        self.cell_of_slot.insert(slot, cell);
        self.tensors = OnceLock::new();
        Ok(cell)
    }

    /// Takes the memory of `slot` off the grid (nothing when it is not on
    /// it); a sub-key no memory uses any more becomes free.
    pub fn remove(&mut self, slot: usize) {
        let Some(cell) = self.cell_of_slot.remove(&slot) else {
            return;
        };
        self.cells[cell] = -1;
        let (part, i, j) = self.split_cell(cell);
        for (h, r) in [(0, part * self.n + i), (1, part * self.n + j)] {
            self.uses[h][r] -= 1;
            if self.uses[h][r] == 0 {
                let bits = self.sub_row(h, r).iter().map(|x| x.to_bits()).collect();
                self.lookup[h].remove(&(part, bits));
            }
        }
        self.tensors = OnceLock::new();
    }

    fn check_queries(&self, queries: &Tensor<2>, k: usize) -> Result<[usize; 2]> {
        let [m, d] = queries.dims();
        if d != self.dim {
            return Err(DmtError::InvalidArgument(format!(
                "queries have dimension {d}, keys {}",
                self.dim
            )));
        }
        if !m.is_multiple_of(self.parts) {
            return Err(DmtError::InvalidArgument(format!(
                "{m} queries do not split into {} partitions",
                self.parts
            )));
        }
        if k == 0 || k > self.n * self.n {
            return Err(DmtError::InvalidArgument(format!(
                "k = {k} must be in 1..={} (the cells of a partition)",
                self.n * self.n
            )));
        }
        Ok([m, d])
    }

    /// The `k` nearest memories on the grid of each query `[m, dim]` (row
    /// `i` within partition `i % parts`): distances ascending and slots,
    /// both `[m, k]`, padding (fewer than `k` memories among the
    /// candidates) at distance `+∞` in the partition's first slot, as
    /// [`super::device::partitioned_topk`] answers. On the CPU backend the
    /// candidates' distances are the full keys' exact ones
    /// ([`math::distance`]); on other devices they are the sums of the
    /// halves' ([`ProductKeys::tensor_topk`]).
    pub fn topk(&self, queries: Tensor<2>, k: usize) -> Result<TopK> {
        Ok(self.topk_with_keys(queries, k)?.0)
    }

    /// [`ProductKeys::topk`] and, on the CPU backend when every answer is a
    /// memory (no padding), the answers' full keys `[m · k · dim]`
    /// (row-major), put together from the sub-key tables: equal bit for bit
    /// to the keys the memories were placed with ([`ProductKeys::place`]),
    /// and read from tables of `2 · n` rows a cache holds rather than
    /// gathered from a table of `n²`.
    pub fn topk_with_keys(&self, queries: Tensor<2>, k: usize) -> Result<(TopK, Option<Vec<f32>>)> {
        let device = queries.device();
        if on_cpu(&device) {
            self.host_topk(queries, k, &device)
        } else {
            Ok((self.tensor_topk(queries, k)?, None))
        }
    }

    fn host_topk(&self, queries: Tensor<2>, k: usize, device: &Device) -> Result<(TopK, Option<Vec<f32>>)> {
        let [m, d] = self.check_queries(&queries, k)?;
        let q = cpu_f32(queries)?;
        let (parts, n, split) = (self.parts, self.n, self.split);
        let per = n * n;
        let kh = k.min(n);
        // Ranking scores of a half: L2 ‖a‖² − 2·q·a (a query's own ‖q‖² is
        // the same for every sub-key), inner product −q·a. The halves'
        // scores sum to the full key's (squared L2 less ‖q‖²; the inner
        // product distance less 1), so they rank the k² candidate cells
        // too; the k best then get the full key's exact distance, and their
        // keys are put together from the halves.
        let scale = if self.metric == Metric::L2 { -2.0 } else { -1.0 };
        // Sub-keys no memory uses score +∞ (never nearest).
        let bias: [Vec<f32>; 2] = [0, 1].map(|h| {
            let w = self.width(h);
            self.sub[h]
                .chunks(w)
                .zip(&self.uses[h])
                .map(|(a, &u)| match (u, self.metric) {
                    (0, _) => f32::INFINITY,
                    (_, Metric::L2) => math::dot(a, a),
                    _ => 0.0,
                })
                .collect()
        });
        let block = QUERY_BLOCK * parts;
        let (mut dist, mut idx) = (vec![f32::INFINITY; m * k], vec![0i64; m * k]);
        let mut keys = vec![0.0f32; m * k * d];
        dist.par_chunks_mut(block * k)
            .zip(idx.par_chunks_mut(block * k))
            .zip(keys.par_chunks_mut(block * k * d))
            .enumerate()
            .try_for_each_init(
                || HostScratch {
                    scores: [Vec::new(), Vec::new()],
                    near: [Near::new(kh), Near::new(kh)],
                    found: Least::new(k),
                    best: Vec::with_capacity(k),
                    key: vec![0.0f32; d],
                },
                |sc, (b, ((bd, bi), bk))| -> Result<()> {
                    // Rows i0.. of the batch; i0 is a multiple of `parts`, so
                    // row t of the block lies in partition t % parts.
                    let (i0, rows) = (b * block, bd.len() / k);
                    // Every row's scores against its partition's sub-keys:
                    // one product per partition and half, reading that
                    // partition's interleaved rows and writing them in place.
                    for h in 0..2 {
                        let w = self.width(h);
                        let lo = if h == 0 { 0 } else { split };
                        sc.scores[h].resize(rows * n, 0.0);
                        for p in 0..parts {
                            let table = &self.sub[h][p * n * w..(p + 1) * n * w];
                            memstore_engine::gemm::scaled_products(
                                &q[(i0 + p) * d + lo..(i0 + rows) * d],
                                parts * d,
                                rows / parts,
                                table,
                                w,
                                scale,
                                &mut sc.scores[h][p * n..],
                                parts * n,
                            )?;
                        }
                    }
                    for t in 0..rows {
                        let (i, p) = (i0 + t, t % parts);
                        let HostScratch {
                            scores,
                            near,
                            found,
                            best,
                            key,
                        } = sc;
                        for h in 0..2 {
                            nearest(
                                &scores[h][t * n..(t + 1) * n],
                                &bias[h][p * n..(p + 1) * n],
                                &mut near[h],
                            );
                        }
                        let [na, nb] = near;
                        // Both halves ascend: once a pair's score is above
                        // the worst kept, so is every later pair of its row
                        // (and, for the first of the row, of every later row).
                        found.clear();
                        for (sa, a) in na.pairs() {
                            if nb.first().is_some_and(|sb| found.bound().is_some_and(|w| sa + sb > w)) {
                                break;
                            }
                            for (sb, b) in nb.pairs() {
                                if found.bound().is_some_and(|w| sa + sb > w) {
                                    break;
                                }
                                let slot = self.cells[p * per + a as usize * n + b as usize];
                                if slot >= 0 {
                                    found.offer(sa + sb, (slot, a, b));
                                }
                            }
                        }
                        // The k best by the full key's exact distance.
                        let qi = &q[i * d..(i + 1) * d];
                        best.clear();
                        best.extend(found.sorted().iter().map(|&(_, (slot, a, b))| {
                            self.put_key(p, a, b, key);
                            (math::distance(self.metric, qi, key), slot, a, b)
                        }));
                        best.sort_unstable_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
                        let (out_d, out_i) = (&mut bd[t * k..(t + 1) * k], &mut bi[t * k..(t + 1) * k]);
                        let out_k = &mut bk[t * k * d..(t + 1) * k * d];
                        for (j, c) in best.iter().enumerate() {
                            out_d[j] = c.0;
                            out_i[j] = c.1;
                            self.put_key(p, c.2, c.3, &mut out_k[j * d..(j + 1) * d]);
                        }
                        // Padding: the partition's first slot.
                        out_i[best.len()..].fill((p * per) as i64);
                    }
                    Ok(())
                },
            )?;
        // Padding (distance +∞) has no key of its own to put together.
        let keys = dist.iter().all(|x| x.is_finite()).then_some(keys);
        Ok((
            TopK {
                distances: Tensor::from_data(TensorData::new(dist, [m, k]), device),
                indices: Tensor::from_data(TensorData::new(idx, [m, k]), device),
            },
            keys,
        ))
    }

    fn tables(&self, inner: &Device) -> Tables {
        let build = || {
            let (parts, n) = (self.parts, self.n);
            let half = |h: usize| {
                Tensor::<3>::from_data(TensorData::new(self.sub[h].clone(), [parts, n, self.width(h)]), inner)
            };
            let unused = |h: usize| {
                let u: Vec<bool> = self.uses[h].iter().map(|&u| u == 0).collect();
                Tensor::<3, Bool>::from_data(TensorData::new(u, [parts, 1, n]), inner)
            };
            Tables {
                device: inner.clone(),
                sub: [half(0), half(1)],
                unused: [unused(0), unused(1)],
                cells: Tensor::from_data(TensorData::new(self.cells.clone(), [parts * n * n]), inner),
            }
        };
        let t = self.tensors.get_or_init(build);
        if &t.device == inner {
            t.clone()
        } else {
            // Searched from another device than the tables were built for:
            // built again, not cached (a tier lives on one device).
            build()
        }
    }

    /// [`ProductKeys::topk`] by tensor operations on the queries' device
    /// (the path of GPUs; the CPU backend takes the host kernel, and this
    /// is public so tests can compare the two there). A candidate's
    /// distance is the sum of its halves' (L2: the square root of the sum
    /// of squares), which equals the full key's up to rounding.
    pub fn tensor_topk(&self, queries: Tensor<2>, k: usize) -> Result<TopK> {
        let [m, d] = self.check_queries(&queries, k)?;
        let device = queries.device();
        let autodiff = queries.is_autodiff();
        let inner = device.clone().inner();
        let t = self.tables(&inner);
        let (parts, n) = (self.parts, self.n);
        let per = n * n;
        let kh = k.min(n);
        let rows = m / parts;
        let q = queries.inner().reshape([rows, parts, d]).swap_dims(0, 1); // [parts, rows, d]
        let near = |h: usize| {
            let lo = if h == 0 { 0 } else { self.split };
            let qh = q.clone().slice([0..parts, 0..rows, lo..lo + self.width(h)]);
            let sub = t.sub[h].clone();
            let score = match self.metric {
                // Squared distance: it adds over the halves.
                Metric::L2 => {
                    let q2 = qh.clone().powf_scalar(2.0).sum_dim(2); // [parts, rows, 1]
                    let s2 = sub.clone().powf_scalar(2.0).sum_dim(2).swap_dims(1, 2); // [parts, 1, n]
                    (q2 + s2 - qh.matmul(sub.swap_dims(1, 2)).mul_scalar(2.0)).clamp_min(0.0)
                }
                // −q·a: 1 plus the halves' sum is the distance 1 − q·key.
                _ => qh.matmul(sub.swap_dims(1, 2)).neg(),
            };
            let score = score.mask_fill(t.unused[h].clone().expand([parts, rows, n]), f32::INFINITY);
            let (neg, idx) = score.neg().topk_with_indices(kh, 2);
            // Where fewer than kh entries beat its starting value, cubecl's
            // top-k pads with index −1 or the lowest finite float (or −∞):
            // padding, at −∞ (as in `device::partitioned_topk`).
            let pad = idx
                .clone()
                .lower_elem(0)
                .bool_or(neg.clone().lower_equal_elem(f32::MIN));
            (neg.mask_fill(pad.clone(), f32::NEG_INFINITY), idx.mask_fill(pad, 0))
        };
        let ((neg_a, a), (neg_b, b)) = (near(0), near(1));
        let kk = kh * kh;
        let neg = (neg_a.unsqueeze_dim::<4>(3) + neg_b.unsqueeze_dim::<4>(2)).reshape([parts, rows, kk]);
        let offsets = Tensor::<1, Int>::arange(0..parts as i64, &inner)
            .mul_scalar(per as i64)
            .reshape([parts, 1, 1, 1]);
        let cell = a.unsqueeze_dim::<4>(3).mul_scalar(n as i64) + b.unsqueeze_dim::<4>(2) + offsets;
        let slots = t
            .cells
            .select(0, cell.reshape([parts * rows * kk]))
            .reshape([parts, rows, kk]);
        let neg = neg.mask_fill(slots.clone().lower_elem(0), f32::NEG_INFINITY);
        let (neg, pos) = neg.topk_with_indices(k, 2);
        let bad = pos.clone().lower_elem(0);
        let chosen = slots.gather(2, pos.mask_fill(bad.clone(), 0));
        let pad = bad
            .bool_or(neg.clone().lower_equal_elem(f32::MIN))
            .bool_or(chosen.clone().lower_elem(0));
        let firsts = Tensor::<1, Int>::arange(0..parts as i64, &inner)
            .mul_scalar(per as i64)
            .reshape([parts, 1, 1])
            .expand([parts, rows, k]);
        let chosen = chosen.mask_where(pad.clone(), firsts);
        let score = neg.neg();
        let dist = match self.metric {
            Metric::L2 => score.clamp_min(0.0).sqrt(),
            _ => score.add_scalar(1.0),
        }
        .mask_fill(pad, f32::INFINITY);
        let indices = chosen.swap_dims(0, 1).reshape([m, k]);
        let distances = dist.swap_dims(0, 1).reshape([m, k]);
        Ok(TopK::on_autodiff(distances, indices, autodiff))
    }
}

/// Lloyd iterations of [`fit_grid`]'s k-means.
const KMEANS_ITERS: usize = 10;

/// The grid a product-key table of `n × n` cells starts with when it stands
/// for a function sampled at `points` (`m` rows of `dim`, L2) with
/// `outputs` (`m` rows of `dv`): each half's `n` sub-keys are the k-means
/// centroids of the points' halves (Lloyd's algorithm from `n` distinct
/// points drawn with `rng`, as product quantisation trains its codebooks,
/// Jégou et al. 2011); a cell's value is the mean output of the points
/// whose nearest cell it is (under L2 the nearest cell is the pair of
/// nearest sub-keys), or, for a cell no point is nearest to, the output of
/// the point nearest to its key. Returns the `n²` keys and values in cell
/// order (`i · n + j`). Needs at least `n` distinct halves in each half.
pub fn fit_grid(
    points: &[f32],
    outputs: &[f32],
    dim: usize,
    dv: usize,
    n: usize,
    rng: &mut rand_xoshiro::SplitMix64,
) -> Result<(Vec<f32>, Vec<f32>)> {
    use crate::train::Below as _;
    let m = points.len() / dim.max(1);
    if dim < 2 || n == 0 || points.len() != m * dim || outputs.len() != m * dv || m < n {
        return Err(DmtError::InvalidArgument(format!(
            "a grid of {n} × {n} cells needs at least {n} points of {dim} ≥ 2 floats with outputs of {dv} ({} and {} \
             floats given)",
            points.len(),
            outputs.len()
        )));
    }
    let split = dim / 2;
    let metric = Metric::L2;
    let mut nearest = [vec![0u32; m], vec![0u32; m]];
    let mut subs: [Vec<f32>; 2] = [Vec::new(), Vec::new()];
    for h in 0..2 {
        let (lo, w) = if h == 0 { (0, split) } else { (split, dim - split) };
        let half: Vec<f32> = (0..m)
            .flat_map(|i| points[i * dim + lo..i * dim + lo + w].iter().copied())
            .collect();
        // n distinct halves, in a seeded order, start the centroids.
        let mut order: Vec<usize> = (0..m).collect();
        for i in (1..m).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut seen = std::collections::HashSet::new();
        let mut c = Vec::with_capacity(n * w);
        for &i in &order {
            let row = &half[i * w..(i + 1) * w];
            if seen.insert(row.iter().map(|x| x.to_bits()).collect::<Vec<_>>()) {
                c.extend_from_slice(row);
                if c.len() == n * w {
                    break;
                }
            }
        }
        if c.len() < n * w {
            return Err(DmtError::InvalidArgument(format!(
                "the points have {} distinct {} halves, fewer than the grid's {n} sub-keys",
                c.len() / w,
                if h == 0 { "first" } else { "second" }
            )));
        }
        for it in 0..=KMEANS_ITERS {
            let (_, idx) = memstore_engine::gemm::topk(metric, &half, &c, w, 1, None)?;
            nearest[h] = idx;
            if it == KMEANS_ITERS {
                break;
            }
            let (mut sum, mut count) = (vec![0.0f64; n * w], vec![0usize; n]);
            for (i, &j) in nearest[h].iter().enumerate() {
                let j = j as usize;
                count[j] += 1;
                for (s, &x) in sum[j * w..(j + 1) * w].iter_mut().zip(&half[i * w..(i + 1) * w]) {
                    *s += x as f64;
                }
            }
            // An empty cluster keeps its centroid.
            for j in (0..n).filter(|&j| count[j] > 0) {
                for (cv, &s) in c[j * w..(j + 1) * w].iter_mut().zip(&sum[j * w..(j + 1) * w]) {
                    *cv = (s / count[j] as f64) as f32;
                }
            }
        }
        subs[h] = c;
    }
    let w1 = dim - split;
    let mut keys = Vec::with_capacity(n * n * dim);
    for i in 0..n {
        for j in 0..n {
            keys.extend_from_slice(&subs[0][i * split..(i + 1) * split]);
            keys.extend_from_slice(&subs[1][j * w1..(j + 1) * w1]);
        }
    }
    let (mut sum, mut count) = (vec![0.0f64; n * n * dv], vec![0usize; n * n]);
    for i in 0..m {
        let cell = nearest[0][i] as usize * n + nearest[1][i] as usize;
        count[cell] += 1;
        for (s, &y) in sum[cell * dv..(cell + 1) * dv]
            .iter_mut()
            .zip(&outputs[i * dv..(i + 1) * dv])
        {
            *s += y as f64;
        }
    }
    let mut values: Vec<f32> = sum
        .chunks(dv.max(1))
        .zip(&count)
        .flat_map(|(s, &c)| s.iter().map(move |&v| (v / c.max(1) as f64) as f32))
        .collect();
    let empty: Vec<usize> = (0..n * n).filter(|&cell| count[cell] == 0).collect();
    if !empty.is_empty() {
        let q: Vec<f32> = empty
            .iter()
            .flat_map(|&cell| keys[cell * dim..(cell + 1) * dim].iter().copied())
            .collect();
        let (_, idx) = memstore_engine::gemm::topk(metric, &q, points, dim, 1, None)?;
        for (&cell, &p) in empty.iter().zip(&idx) {
            let p = p as usize;
            values[cell * dv..(cell + 1) * dv].copy_from_slice(&outputs[p * dv..(p + 1) * dv]);
        }
    }
    Ok((keys, values))
}

#[cfg(test)]
mod tests {
    use rand_core::{RngCore, SeedableRng};
    use rand_xoshiro::SplitMix64;

    use super::{Near, nearest};

    /// The least `take` sums below `+∞` and their sub-keys, ties by sub-key:
    /// every such sum sorted (a stable sort keeps sub-key order among equals).
    fn least(scores: &[f32], bias: &[f32], take: usize) -> Vec<(f32, u32)> {
        let mut all: Vec<(f32, u32)> = scores
            .iter()
            .zip(bias)
            .enumerate()
            .map(|(j, (s, b))| (s + b, j as u32))
            .filter(|(x, _)| *x < f32::INFINITY)
            .collect();
        all.sort_by(|x, y| x.0.partial_cmp(&y.0).unwrap_or(std::cmp::Ordering::Equal));
        all.truncate(take);
        all
    }

    #[test]
    fn nearest_keeps_the_least_sums_ties_by_sub_key() {
        let mut rng = SplitMix64::seed_from_u64(7);
        let mut out = Near::new(1);
        for case in 0..3000 {
            let n = 1 + (rng.next_u32() % 300) as usize;
            let take = 1 + (rng.next_u32() % 20) as usize;
            if out.take != take {
                out = Near::new(take);
            }
            // Few distinct values (many ties), NaN, both zeros, and unused
            // sub-keys (a bias of +∞).
            let levels = 1 + rng.next_u32() % 40;
            let scores: Vec<f32> = (0..n)
                .map(|_| match rng.next_u32() % 50 {
                    0 => f32::NAN,
                    1 => -0.0,
                    2 => 0.0,
                    _ => (rng.next_u32() % levels) as f32 * 0.25 - 3.0,
                })
                .collect();
            let unused = rng.next_u32() % 4;
            let bias: Vec<f32> = (0..n)
                .map(|_| {
                    if rng.next_u32() % 4 < unused {
                        f32::INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            nearest(&scores, &bias, &mut out);
            let got: Vec<(f32, u32)> = out.pairs().collect();
            let want = least(&scores, &bias, take);
            assert_eq!(got.len(), want.len(), "case {case}: {got:?} against {want:?}");
            for (g, w) in got.iter().zip(&want) {
                assert!(g.0 == w.0 && g.1 == w.1, "case {case}: {got:?} against {want:?}");
            }
        }
    }
}
