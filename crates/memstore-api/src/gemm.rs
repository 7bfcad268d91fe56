//! Exact batched top-k by blocked matrix products: the distances of a block
//! of queries to every key come from one SGEMM (`matrixmultiply`, the
//! BLIS-style kernel ndarray uses), each row is ranked by partial selection,
//! and only the `k` winners' distances are computed exactly with
//! [`math::distance`] — so results carry the same floats as a scalar scan.
//! Query blocks run on all cores (rayon). This is the exact search that
//! product-key and large memory layers use (Lample et al. 2019; Berges et al.
//! 2024), on the CPU.

use rayon::prelude::*;

use crate::{Error, Metric, Result, math};

/// Queries per SGEMM block (a block's score buffer is `BLOCK × n` floats).
const BLOCK: usize = 64;

/// The `k` nearest rows of `keys` (`n × dim`, row-major) for each query
/// (`m × dim`), among rows whose `mask` entry is set (all when `None`):
/// `m × k` distances (nearest first, ties by row; `+∞` pads when fewer rows
/// qualify) and row indices (`u32::MAX` pads).
pub fn topk(
    metric: Metric,
    queries: &[f32],
    keys: &[f32],
    dim: usize,
    k: usize,
    mask: Option<&[bool]>,
) -> Result<(Vec<f32>, Vec<u32>)> {
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
    // Ranking scores: L2 by ‖k‖² − 2·q·k (‖q‖² is constant per row), inner
    // product by −q·k, cosine by −q̂·k̂ with unit rows.
    let unit = |v: &[f32]| -> Vec<f32> {
        let mut out = v.to_vec();
        for row in out.chunks_mut(dim) {
            let norm = math::dot(row, row).sqrt();
            if norm > 0.0 {
                row.iter_mut().for_each(|x| *x /= norm);
            }
        }
        out
    };
    let (qs, ks) = match metric {
        Metric::Cosine => (unit(queries), unit(keys)),
        _ => (queries.to_vec(), keys.to_vec()),
    };
    let bias: Vec<f32> = match metric {
        Metric::L2 => ks.chunks(dim).map(|r| math::dot(r, r)).collect(),
        _ => vec![0.0; n],
    };
    let scale = if metric == Metric::L2 { -2.0 } else { -1.0 };
    let kk = k.min(n);
    let mut dist = vec![f32::INFINITY; m * k];
    let mut idx = vec![u32::MAX; m * k];
    dist.par_chunks_mut(BLOCK * k)
        .zip(idx.par_chunks_mut(BLOCK * k))
        .enumerate()
        .for_each_init(
            || (vec![0.0f32; BLOCK * n], Vec::<u32>::with_capacity(n)),
            |(buf, order), (b, (dblock, iblock))| {
                let rows = dblock.len() / k;
                let q = &qs[b * BLOCK * dim..(b * BLOCK + rows) * dim];
                // buf[r, j] = scale · q_r · k_j, then + bias_j.
                // SAFETY: the pointers and strides describe `q` (rows × dim),
                // `ks` read as its transpose (dim × n) and `buf` (rows × n),
                // all in bounds; beta = 0 so `buf`'s old contents are unused.
                unsafe {
                    matrixmultiply::sgemm(
                        rows,
                        dim,
                        n,
                        scale,
                        q.as_ptr(),
                        dim as isize,
                        1,
                        ks.as_ptr(),
                        1,
                        dim as isize,
                        0.0,
                        buf.as_mut_ptr(),
                        n as isize,
                        1,
                    );
                }
                for r in 0..rows {
                    let row = &mut buf[r * n..(r + 1) * n];
                    for (s, b) in row.iter_mut().zip(&bias) {
                        *s += b;
                    }
                    order.clear();
                    match mask {
                        Some(mask) => order.extend((0..n as u32).filter(|&j| mask[j as usize])),
                        None => order.extend(0..n as u32),
                    }
                    let take = kk.min(order.len());
                    if take == 0 {
                        continue;
                    }
                    let cmp = |a: &u32, b: &u32| row[*a as usize].total_cmp(&row[*b as usize]).then(a.cmp(b));
                    if take < order.len() {
                        order.select_nth_unstable_by(take - 1, cmp);
                    }
                    let qrow = &queries[(b * BLOCK + r) * dim..(b * BLOCK + r + 1) * dim];
                    let mut top: Vec<(f32, u32)> = order[..take]
                        .iter()
                        .map(|&j| {
                            let key = &keys[j as usize * dim..(j as usize + 1) * dim];
                            (math::distance(metric, qrow, key), j)
                        })
                        .collect();
                    top.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                    for (j, (d, i)) in top.into_iter().enumerate() {
                        dblock[r * k + j] = d;
                        iblock[r * k + j] = i;
                    }
                }
            },
        );
    Ok((dist, idx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// Agrees with a scalar scan on every metric, with a mask and with fewer
    /// qualifying rows than k (padding), across several query blocks.
    #[test]
    fn matches_a_scalar_scan() {
        let mut s = 7u64;
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
                }
            }
        }
        let few = vec![true, false, false, true, false, false];
        let (dist, idx) = topk(Metric::L2, &q[..d], &keys[..6 * d], d, 4, Some(&few)).unwrap();
        assert_eq!(&idx[2..], &[u32::MAX, u32::MAX]);
        assert!(dist[2].is_infinite() && dist[3].is_infinite());
        assert!(topk(Metric::L2, &q[..d], &keys, d, 0, None).is_err());
        assert!(topk(Metric::L2, &q[..d + 1], &keys, d, 1, None).is_err());
        assert!(topk(Metric::L2, &q[..d], &keys, d, 1, Some(&few)).is_err());
    }
}
