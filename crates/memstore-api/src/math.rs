//! The arithmetic that defines the store's behaviour, shared by every backend
//! so that they agree bit for bit: key distances, LRFU bookkeeping (Lee et al.,
//! "LRFU: a spectrum of policies that subsumes the LRU and LFU policies", 1999),
//! and the recombination of near-duplicate memories.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use crate::{Error, MemoryId, Metric, Result, Tick, Vectors};

/// Lanes of the partial sums: eight independent accumulators let the compiler
/// vectorise the loops while the result stays one fixed, portable definition.
const LANES: usize = 8;

#[inline]
fn lanes(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += f(x[l], y[l]);
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += f(*x, *y);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// The distance between two keys under `metric` (see [`Metric`]). Every
/// backend computes distances with this function, so they agree bit for bit.
#[inline]
pub fn distance(metric: Metric, a: &[f32], b: &[f32]) -> f32 {
    match metric {
        Metric::L2 => lanes(a, b, |x, y| (x - y) * (x - y)).sqrt(),
        Metric::InnerProduct => 1.0 - dot(a, b),
        Metric::Cosine => {
            let (ab, aa, bb) = (dot(a, b), dot(a, a), dot(b, b));
            if aa == 0.0 || bb == 0.0 {
                1.0
            } else {
                1.0 - ab / (aa.sqrt() * bb.sqrt())
            }
        }
    }
}

/// Rows per group of [`distances`]: four independent sets of accumulators
/// keep the vector units busy where one distance at a time waits on the
/// latency of its own additions.
const GROUP: usize = 4;

/// [`lanes`] for `GROUP` pairs at once: each pair's sums are formed in exactly
/// the order [`lanes`] uses, so every result is bit-identical to it.
#[inline]
fn lanes_group(pairs: [(&[f32], &[f32]); GROUP], f: impl Fn(f32, f32) -> f32) -> [f32; GROUP] {
    let mut acc = [[0.0f32; LANES]; GROUP];
    let dim = pairs[0].0.len();
    let whole = dim - dim % LANES;
    let mut c = 0;
    while c < whole {
        for (g, (a, b)) in pairs.iter().enumerate() {
            let (x, y) = (&a[c..c + LANES], &b[c..c + LANES]);
            for l in 0..LANES {
                acc[g][l] += f(x[l], y[l]);
            }
        }
        c += LANES;
    }
    let mut out = [0.0f32; GROUP];
    for (g, (a, b)) in pairs.iter().enumerate() {
        for (l, (x, y)) in a[whole..].iter().zip(&b[whole..]).enumerate() {
            acc[g][l] += f(*x, *y);
        }
        let s = &acc[g];
        out[g] = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    }
    out
}

/// The distance from `q` to every row of `keys` (row-major, rows of
/// `q.len()` floats), appended to `out`: bit-identical to calling
/// [`distance`] per row, and faster on scans (rows are taken four at a
/// time, so four independent sums are in flight). A trailing partial row is
/// ignored.
pub fn distances(metric: Metric, q: &[f32], keys: &[f32], out: &mut Vec<f32>) {
    let dim = q.len();
    if dim == 0 {
        return;
    }
    let rows = keys.len() / dim;
    out.reserve(rows);
    let qq = if metric == Metric::Cosine { dot(q, q) } else { 0.0 };
    let mut groups = keys[..rows * dim].chunks_exact(dim * GROUP);
    for g in &mut groups {
        let row = |i: usize| &g[i * dim..(i + 1) * dim];
        let pairs = [(q, row(0)), (q, row(1)), (q, row(2)), (q, row(3))];
        match metric {
            Metric::L2 => out.extend(lanes_group(pairs, |x, y| (x - y) * (x - y)).map(f32::sqrt)),
            Metric::InnerProduct => out.extend(lanes_group(pairs, |x, y| x * y).map(|d| 1.0 - d)),
            Metric::Cosine => {
                let ab = lanes_group(pairs, |x, y| x * y);
                let own = [(row(0), row(0)), (row(1), row(1)), (row(2), row(2)), (row(3), row(3))];
                let bb = lanes_group(own, |x, y| x * y);
                for (ab, bb) in ab.into_iter().zip(bb) {
                    out.push(if qq == 0.0 || bb == 0.0 {
                        1.0
                    } else {
                        1.0 - ab / (qq.sqrt() * bb.sqrt())
                    });
                }
            }
        }
    }
    for r in groups.remainder().chunks_exact(dim) {
        out.push(distance(metric, q, r));
    }
}

/// The dot product, summed in the same lane order as [`distance`].
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    lanes(a, b, |x, y| x * y)
}

/// The total order of search results: by distance, then by id.
#[inline]
pub fn neighbour_order(a: (f32, u64), b: (f32, u64)) -> Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
}

/// `2^(−λ·Δt)`, the LRFU weighting of an access `Δt` ticks ago.
#[inline]
pub fn decay(lambda: f64, dt: u64) -> f64 {
    // Repeated accesses within one tick (the common case in training: a
    // step's retrievals) skip the exp2; 2^(−0) is exactly 1 either way.
    if dt == 0 {
        return 1.0;
    }
    (-lambda * dt as f64).exp2()
}

/// The CRF after an access at `now` of a memory last accessed at `last` with
/// CRF `crf`: `1 + 2^(−λ·(now − last))·crf`. Returns `(crf, last_access)`;
/// a `now` older than `last` counts as no time passed.
#[inline]
pub fn access(lambda: f64, crf: f64, last: Tick, now: Tick) -> (f64, Tick) {
    (1.0 + decay(lambda, now.saturating_sub(last)) * crf, last.max(now))
}

/// The CRF of a memory at `now` without a new access: `2^(−λ·(now − last))·crf`.
#[inline]
pub fn decayed(lambda: f64, crf: f64, last: Tick, now: Tick) -> f64 {
    decay(lambda, now.saturating_sub(last)) * crf
}

/// The eviction priority `log2(crf) + λ·last_access`. Its order equals the order
/// of decayed CRFs at any common "now", so eviction is an index scan: the
/// victim is the lowest priority (ties: lowest id).
#[inline]
pub fn priority(lambda: f64, crf: f64, last: Tick) -> f64 {
    crf.log2() + lambda * last as f64
}

/// One original taking part in a recombination.
#[derive(Clone, Copy, Debug)]
pub struct MergeSource<'a> {
    /// Distance from the observation.
    pub distance: f32,
    /// The original's key.
    pub key: &'a [f32],
    /// Its creation tick.
    pub created: Tick,
    /// Its last access.
    pub last_access: Tick,
    /// Its access count.
    pub access_count: u64,
    /// Its CRF.
    pub crf: f64,
    /// Its tags.
    pub tags: &'a BTreeMap<String, u64>,
}

/// The memory that results from merging an observation with near-duplicates.
/// Its value is `weighted_mean(observed value, weights · source values)`,
/// computed by the caller once the source values are at hand.
#[derive(Clone, Debug, PartialEq)]
pub struct Merged {
    /// exp(−distance)-weighted mean key, the observation weighing 1.
    pub key: Vec<f32>,
    /// The weight exp(−distanceᵢ) of each source, in order.
    pub weights: Vec<f64>,
    /// Oldest creation tick among the originals (and `tick`).
    pub created: Tick,
    /// `tick` (or a later access of an original, if ticks went backwards).
    pub last_access: Tick,
    /// Sum of the originals' counts plus one for the observation.
    pub access_count: u64,
    /// `1 + Σ decayed(crfᵢ)`: the merged histories plus this access.
    pub crf: f64,
    /// Union of tags, counts summed, the observation's tags counting 1 each.
    pub tags: BTreeMap<String, u64>,
}

/// Weighted mean `(obs + Σ wᵢ·xᵢ) / (1 + Σ wᵢ)`, computed in f64.
pub fn weighted_mean<'a>(obs: &[f32], parts: impl Iterator<Item = (f64, &'a [f32])>) -> Vec<f32> {
    let mut acc: Vec<f64> = obs.iter().map(|&x| x as f64).collect();
    let mut total = 1.0f64;
    for (w, x) in parts {
        total += w;
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += w * v as f64;
        }
    }
    acc.into_iter().map(|a| (a / total) as f32).collect()
}

/// Merges an observation (`key` and `tags`, seen at `tick`) with `sources`.
pub fn merge(lambda: f64, key: &[f32], tags: &[String], tick: Tick, sources: &[MergeSource<'_>]) -> Merged {
    let weights: Vec<f64> = sources.iter().map(|s| (-(s.distance as f64)).exp()).collect();
    let mkey = weighted_mean(key, weights.iter().copied().zip(sources.iter().map(|s| s.key)));
    let mut mtags = BTreeMap::new();
    let mut created = tick;
    let mut access_count = 1u64;
    let mut last = tick;
    for s in sources {
        created = created.min(s.created);
        access_count = access_count.saturating_add(s.access_count);
        last = last.max(s.last_access);
        for (t, c) in s.tags {
            *mtags.entry(t.clone()).or_insert(0u64) += c;
        }
    }
    let mut crf = 1.0f64;
    for s in sources {
        crf += decayed(lambda, s.crf, s.last_access, last);
    }
    add_tags(&mut mtags, tags);
    Merged {
        key: mkey,
        weights,
        created,
        last_access: last,
        access_count,
        crf,
        tags: mtags,
    }
}

/// The sparse value update: adds row `i` of `deltas` to the value of `ids[i]`,
/// in row order (a repeated id gets every delta), starting from `current(id)`.
/// Returns the new values ascending by id. Refuses the whole update if any
/// resulting value is not finite.
pub fn apply_deltas<'a>(
    ids: &[MemoryId],
    deltas: Vectors<'_>,
    current: impl Fn(MemoryId) -> Result<&'a [f32]>,
) -> Result<Vec<(MemoryId, Vec<f32>)>> {
    let new_values: Vec<(MemoryId, Vec<f32>)> = if ids.windows(2).all(|w| w[0] < w[1]) {
        // Distinct and ascending (a training step's update, listed by
        // slot): one value each, in order, with no map to keep.
        let mut out = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            let v: Vec<f32> = current(id)?.iter().zip(deltas.row(i)).map(|(x, d)| x + d).collect();
            out.push((id, v));
        }
        out
    } else {
        let mut by_id: BTreeMap<MemoryId, Vec<f32>> = BTreeMap::new();
        for (i, &id) in ids.iter().enumerate() {
            let v = match by_id.entry(id) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => e.insert(current(id)?.to_vec()),
            };
            for (x, d) in v.iter_mut().zip(deltas.row(i)) {
                *x += d;
            }
        }
        by_id.into_iter().collect()
    };
    for (id, v) in &new_values {
        if let Some(col) = v.iter().position(|x| !x.is_finite()) {
            let row = ids.iter().rposition(|x| x == id).unwrap_or(0);
            return Err(Error::NonFinite {
                what: "values after update",
                row,
                col,
            });
        }
    }
    Ok(new_values)
}

/// Adds one to the count of each tag (a tag listed twice counts twice).
pub fn add_tags(into: &mut BTreeMap<String, u64>, tags: &[String]) {
    for t in tags {
        *into.entry(t.clone()).or_insert(0) += 1;
    }
}

/// The tags of a newly inserted row.
pub fn new_tags(tags: &[String]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    add_tags(&mut m, tags);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        let a = [3.0, 4.0];
        let z = [0.0, 0.0];
        assert_eq!(distance(Metric::L2, &a, &z), 5.0);
        assert_eq!(distance(Metric::InnerProduct, &a, &[1.0, 0.0]), -2.0);
        assert!((distance(Metric::Cosine, &a, &[6.0, 8.0])).abs() < 1e-7);
        assert_eq!(distance(Metric::Cosine, &a, &z), 1.0);
        assert!((distance(Metric::Cosine, &[1.0, 0.0], &[0.0, 2.0]) - 1.0).abs() < 1e-7);
    }

    /// The grouped scan gives the per-row function's floats bit for bit, for
    /// every metric, dimensions with and without a partial lane chunk, row
    /// counts with and without a partial group, zero rows and zero queries.
    #[test]
    fn grouped_distances_are_bit_identical() {
        use rand_core::{RngCore, SeedableRng};
        let mut rng = rand_xoshiro::SplitMix64::seed_from_u64(11);
        let mut next = || ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0;
        for dim in [1usize, 3, 8, 13, 64, 77] {
            for rows in [0usize, 1, 4, 7, 9] {
                let mut keys: Vec<f32> = (0..rows * dim).map(|_| next()).collect();
                if rows > 2 {
                    keys[2 * dim..3 * dim].iter_mut().for_each(|x| *x = 0.0);
                }
                for zero_query in [false, true] {
                    let q: Vec<f32> = (0..dim).map(|_| if zero_query { 0.0 } else { next() }).collect();
                    for metric in [Metric::L2, Metric::InnerProduct, Metric::Cosine] {
                        let mut got = vec![7.0];
                        super::distances(metric, &q, &keys, &mut got);
                        let want: Vec<f32> = std::iter::once(7.0)
                            .chain(keys.chunks_exact(dim).map(|r| distance(metric, &q, r)))
                            .collect();
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&got), bits(&want), "{metric:?} dim {dim} rows {rows}");
                    }
                }
            }
        }
    }

    #[test]
    fn lrfu_limits() {
        // λ = 0: CRF counts accesses (LFU).
        let (c, _) = access(0.0, 3.0, 5, 100);
        assert_eq!(c, 4.0);
        // λ = 1: an access one tick later halves the history.
        let (c, l) = access(1.0, 2.0, 5, 6);
        assert_eq!((c, l), (2.0, 6));
        // The priority order equals the decayed-CRF order at any later time.
        let (a, b) = ((3.0, 10u64), (1.5, 12u64));
        for now in [12u64, 20, 100] {
            let da = decayed(0.3, a.0, a.1, now);
            let db = decayed(0.3, b.0, b.1, now);
            let pa = priority(0.3, a.0, a.1);
            let pb = priority(0.3, b.0, b.1);
            assert_eq!(da < db, pa < pb);
        }
    }
}
