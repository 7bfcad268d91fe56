//! Exact batched top-k on the device: distances of every query to every key
//! by one matrix product (`‖q‖² + ‖k‖² − 2·q·kᵀ` for L2, normalised products
//! for cosine, `1 − q·k` for inner product — memstore's metrics), invalid
//! slots masked to `+∞`, and `topk` along the key axis.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use memstore_api::Metric;

use crate::{DmtError, Result, host_f32};

/// The `k` nearest keys of each query: distances ascending and key-row indices,
/// both `[queries, k]`. Slots beyond the valid keys have distance `+∞`.
#[derive(Clone, Debug)]
pub struct TopK {
    /// Distances, `[m, k]`, nearest first.
    pub distances: Tensor<2>,
    /// Row indices into the key matrix, `[m, k]`.
    pub indices: Tensor<2, Int>,
}

/// Distances `[m, n]` between queries `[m, d]` and keys `[n, d]` under `metric`.
pub fn distances(queries: Tensor<2>, keys: Tensor<2>, metric: Metric) -> Tensor<2> {
    match metric {
        Metric::L2 => {
            let q2 = queries.clone().powf_scalar(2.0).sum_dim(1); // [m, 1]
            let k2 = keys.clone().powf_scalar(2.0).sum_dim(1).transpose(); // [1, n]
            let qk = queries.matmul(keys.transpose());
            (q2 + k2 - qk.mul_scalar(2.0)).clamp_min(0.0).sqrt()
        }
        Metric::InnerProduct => queries.matmul(keys.transpose()).neg().add_scalar(1.0),
        Metric::Cosine => {
            let unit = |x: Tensor<2>| {
                let norm = x.clone().powf_scalar(2.0).sum_dim(1).sqrt().clamp_min(1e-30);
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
    let [m, d] = queries.dims();
    let [n, dk] = keys.dims();
    if d != dk {
        return Err(DmtError::InvalidArgument(format!(
            "queries have dimension {d}, keys {dk}"
        )));
    }
    if k == 0 || k > n {
        return Err(DmtError::InvalidArgument(format!(
            "k = {k} must be in 1..={n} (the key slots)"
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
        return host_topk(queries, keys, valid, k, metric, &device);
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
    let mut d = distances(queries.inner(), keys.inner(), metric);
    if let Some(valid) = valid {
        let valid = Tensor::<1, Bool>::from_data(TensorData::new(valid.to_vec(), [n]), &inner);
        let invalid = valid.bool_not().unsqueeze_dim::<2>(0).expand([m, n]);
        d = d.mask_fill(invalid, f32::INFINITY);
    }
    let (neg, indices) = d.neg().topk_with_indices(k, 1);
    let distances = neg.neg();
    Ok(if autodiff {
        TopK {
            distances: distances.autodiff(),
            indices: indices.autodiff(),
        }
    } else {
        TopK { distances, indices }
    })
}

/// Whether tensors on `device` live in host memory (the CPU backend).
pub fn on_cpu(device: &Device) -> bool {
    device.clone().inner() == Device::flex()
}

/// The CPU backend's exact top-k: memstore's blocked-SGEMM search
/// ([`memstore_api::gemm::topk`]) on the host data, which never materialises
/// the whole distance matrix (the tensor path's matrix + `topk` sorts whole
/// rows: 6× slower at 4096 × 4096, benches/tier.rs).
fn host_topk(
    queries: Tensor<2>,
    keys: Tensor<2>,
    valid: Option<&[bool]>,
    k: usize,
    metric: Metric,
    device: &Device,
) -> Result<TopK> {
    let [m, d] = queries.dims();
    let (dist, idx) = memstore_api::gemm::topk(metric, &host_f32(queries)?, &host_f32(keys)?, d, k, valid)?;
    let idx: Vec<i64> = idx
        .into_iter()
        .map(|i| if i == u32::MAX { 0 } else { i as i64 })
        .collect();
    Ok(TopK {
        distances: Tensor::from_data(TensorData::new(dist, [m, k]), device),
        indices: Tensor::from_data(TensorData::new(idx, [m, k]), device),
    })
}
