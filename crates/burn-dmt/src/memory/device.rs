//! Exact batched top-k on the device: distances of every query to every key
//! by one matrix product (`‖q‖² + ‖k‖² − 2·q·kᵀ` for L2, normalised products
//! for cosine, `1 − q·k` for inner product — memstore's metrics), invalid
//! slots masked to `+∞`, and `topk` along the key axis.

use burn::tensor::{Bool, Int, Tensor};
use memstore_api::Metric;

use crate::{DmtError, Result};

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
/// `valid` flag is set (all rows when `None`). `k` may not exceed `n`.
pub fn exact_topk(
    queries: Tensor<2>,
    keys: Tensor<2>,
    valid: Option<Tensor<1, Bool>>,
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
    let mut scores = distances(queries, keys, metric).neg();
    if let Some(valid) = valid {
        let invalid = valid.bool_not().unsqueeze_dim::<2>(0).expand([m, n]);
        scores = scores.mask_fill(invalid, f32::NEG_INFINITY);
    }
    let (neg, indices) = scores.topk_with_indices(k, 1);
    Ok(TopK {
        distances: neg.neg(),
        indices,
    })
}
