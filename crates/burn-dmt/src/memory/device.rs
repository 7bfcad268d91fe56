//! Exact batched top-k on the device: distances of every query to every key
//! by one matrix product (`‖q‖² + ‖k‖² − 2·q·kᵀ` for L2, normalised products
//! for cosine, `1 − q·k` for inner product — memstore's metrics), invalid
//! slots masked to `+∞`, and `topk` along the key axis. A partitioned search
//! ([`partitioned_topk`]) gives each attention head its own block of keys,
//! as per-head tables, in one batched product.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use memstore_api::Metric;

use crate::{DmtError, Result, cpu_f32};

/// The `k` nearest keys of each query: distances ascending and key-row indices,
/// both `[queries, k]`. Slots beyond the valid keys have distance `+∞`.
#[derive(Clone, Debug)]
pub struct TopK {
    /// Distances, `[m, k]`, nearest first.
    pub distances: Tensor<2>,
    /// Row indices into the key matrix, `[m, k]`.
    pub indices: Tensor<2, Int>,
}

impl TopK {
    /// Distances and indices of an inner-backend search, moved back onto
    /// the autodiff device when the queries came from one.
    pub(crate) fn on_autodiff(distances: Tensor<2>, indices: Tensor<2, Int>, autodiff: bool) -> Self {
        if autodiff {
            TopK {
                distances: distances.autodiff(),
                indices: indices.autodiff(),
            }
        } else {
            TopK { distances, indices }
        }
    }
}

/// Distances `[.., m, n]` between queries `[.., m, d]` and keys `[.., n, d]`
/// under `metric` (batched over any leading dimensions).
pub fn distances<const D: usize>(queries: Tensor<D>, keys: Tensor<D>, metric: Metric) -> Tensor<D> {
    match metric {
        Metric::L2 => {
            let q2 = queries.clone().powf_scalar(2.0).sum_dim(D - 1); // [.., m, 1]
            let k2 = keys.clone().powf_scalar(2.0).sum_dim(D - 1).transpose(); // [.., 1, n]
            let qk = queries.matmul(keys.transpose());
            (q2 + k2 - qk.mul_scalar(2.0)).clamp_min(0.0).sqrt()
        }
        Metric::InnerProduct => queries.matmul(keys.transpose()).neg().add_scalar(1.0),
        Metric::Cosine => {
            let unit = |x: Tensor<D>| {
                let norm = x.clone().powf_scalar(2.0).sum_dim(D - 1).sqrt().clamp_min(1e-30);
                x / norm
            };
            unit(queries).matmul(unit(keys).transpose()).neg().add_scalar(1.0)
        }
    }
}

/// Exact top-k of `queries` `[m, d]` among the rows of `keys` `[n, d]` whose
/// `valid` flag is set (all rows when `None`; a host mask, since the CPU path
/// needs it there and the GPU path uploads it once). `k` may not exceed `n`.
pub fn exact_topk(
    queries: Tensor<2>,
    keys: Tensor<2>,
    valid: Option<&[bool]>,
    k: usize,
    metric: Metric,
) -> Result<TopK> {
    partitioned_topk(queries, keys, valid, k, metric, 1)
}

/// Exact top-k within partitions: the `n` key rows form `parts` equal blocks
/// of consecutive rows, and query row `i` searches block `i % parts` only
/// (rows of `[positions · heads, dh]` tensors searching per-head tables).
/// Indices are rows of the whole key matrix; `k` may not exceed a block's
/// rows. Slots beyond a block's valid keys have distance `+∞`.
pub fn partitioned_topk(
    queries: Tensor<2>,
    keys: Tensor<2>,
    valid: Option<&[bool]>,
    k: usize,
    metric: Metric,
    parts: usize,
) -> Result<TopK> {
    let [m, d] = queries.dims();
    let [n, dk] = keys.dims();
    if d != dk {
        return Err(DmtError::InvalidArgument(format!(
            "queries have dimension {d}, keys {dk}"
        )));
    }
    if parts == 0 || !n.is_multiple_of(parts) || !m.is_multiple_of(parts) {
        return Err(DmtError::InvalidArgument(format!(
            "{m} queries and {n} keys do not split into {parts} partitions"
        )));
    }
    let per = n / parts;
    if k == 0 || k > per {
        return Err(DmtError::InvalidArgument(format!(
            "k = {k} must be in 1..={per} (the key slots of a partition)"
        )));
    }
    if let Some(v) = valid
        && v.len() != n
    {
        return Err(DmtError::InvalidArgument(format!(
            "a validity mask of {} for {n} keys",
            v.len()
        )));
    }
    let device = queries.device();
    if on_cpu(&device) {
        return host_topk(queries, keys, valid, k, metric, parts, &device);
    }
    // The search is not differentiated (as on the CPU path): it runs on the
    // inner backend. Through the autodiff decorator, Burn 0.22 has no top-k
    // of its own and falls back to a sort that reads the whole [m, n] matrix
    // back to the host and sorts it there; that made a GPT-2-small-shaped
    // student train at 8 tokens/s on an H200. The inner (cubecl) backend's
    // top-k is a one-pass reduction on the device, and the distance matrix
    // is no longer kept alive for a backward pass.
    let autodiff = queries.is_autodiff();
    let inner = device.clone().inner();
    let rows = m / parts;
    // [parts, rows, d] against [parts, per, d]: one batched product.
    let q = queries.inner().reshape([rows, parts, d]).swap_dims(0, 1);
    let kk = keys.inner().reshape([parts, per, d]);
    let mut dist = distances(q, kk, metric); // [parts, rows, per]
    if let Some(valid) = valid {
        let valid = Tensor::<1, Bool>::from_data(TensorData::new(valid.to_vec(), [n]), &inner);
        let invalid = valid.bool_not().reshape([parts, 1, per]).expand([parts, rows, per]);
        dist = dist.mask_fill(invalid, f32::INFINITY);
    }
    let (neg, local) = dist.neg().topk_with_indices(k, 2);
    // Where fewer than k entries beat its starting value (a partition with
    // fewer valid keys than k: the rest are +∞), cubecl's top-k answers
    // padding: index −1 with the lowest finite float, or (with autotuning,
    // on NVIDIA's driver) an index with −∞ or the lowest finite float.
    // Every such entry, and any index outside the partition, becomes what
    // the CPU path answers: the partition's first row at +∞.
    let pad = local
        .clone()
        .lower_elem(0)
        .bool_or(local.clone().greater_equal_elem(per as i64))
        .bool_or(neg.clone().lower_equal_elem(f32::MIN));
    let local = local.mask_fill(pad.clone(), 0);
    let neg = neg.mask_fill(pad, f32::NEG_INFINITY);
    let offsets = Tensor::<1, Int>::arange(0..parts as i64, &inner)
        .mul_scalar(per as i64)
        .reshape([parts, 1, 1]);
    let indices = (local + offsets).swap_dims(0, 1).reshape([m, k]);
    let distances = neg.neg().swap_dims(0, 1).reshape([m, k]);
    Ok(TopK::on_autodiff(distances, indices, autodiff))
}

/// Whether tensors on `device` live in host memory (the CPU backend).
pub fn on_cpu(device: &Device) -> bool {
    device.clone().inner() == Device::flex()
}

/// The CPU backend's exact top-k: memstore's blocked-SGEMM search
/// ([`memstore_engine::gemm::topk`]) on the host data, partition by partition,
/// which never materialises the whole distance matrix (the tensor path's
/// matrix + `topk` sorts whole rows: 6× slower at 4096 × 4096,
/// benches/tier.rs). Padding slots (fewer valid keys than `k`) point at the
/// partition's first row, with distance `+∞`.
fn host_topk(
    queries: Tensor<2>,
    keys: Tensor<2>,
    valid: Option<&[bool]>,
    k: usize,
    metric: Metric,
    parts: usize,
    device: &Device,
) -> Result<TopK> {
    let [m, d] = queries.dims();
    let n = keys.dims()[0];
    let (q, keys) = (cpu_f32(queries)?, cpu_f32(keys)?);
    if parts == 1 {
        let (dist, idx) = memstore_engine::gemm::topk(metric, &q, &keys, d, k, valid)?;
        let idx = idx
            .into_iter()
            .map(|i| if i == u32::MAX { 0 } else { i as i64 })
            .collect();
        return Ok(TopK {
            distances: Tensor::from_data(TensorData::new(dist, [m, k]), device),
            indices: Tensor::from_data(TensorData::new(idx, [m, k]), device),
        });
    }
    let (rows, per) = (m / parts, n / parts);
    let (mut dist, mut idx) = (vec![0.0f32; m * k], vec![0i64; m * k]);
    let mut qp = Vec::with_capacity(rows * d);
    for p in 0..parts {
        qp.clear();
        for r in 0..rows {
            let i = r * parts + p;
            qp.extend_from_slice(&q[i * d..(i + 1) * d]);
        }
        let kp = &keys[p * per * d..(p + 1) * per * d];
        let vp = valid.map(|v| &v[p * per..(p + 1) * per]);
        let (dp, ip) = memstore_engine::gemm::topk(metric, &qp, kp, d, k, vp)?;
        for r in 0..rows {
            let i = r * parts + p;
            dist[i * k..(i + 1) * k].copy_from_slice(&dp[r * k..(r + 1) * k]);
            for (o, &j) in idx[i * k..(i + 1) * k].iter_mut().zip(&ip[r * k..(r + 1) * k]) {
                *o = (p * per) as i64 + if j == u32::MAX { 0 } else { j as i64 };
            }
        }
    }
    Ok(TopK {
        distances: Tensor::from_data(TensorData::new(dist, [m, k]), device),
        indices: Tensor::from_data(TensorData::new(idx, [m, k]), device),
    })
}
