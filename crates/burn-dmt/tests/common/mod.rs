//! Shared helpers of the burn-dmt tests: fixture paths and reference tensors.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::tensor::{Int, Tensor, TensorData};
use burn_dmt::burn;
use burn_dmt::burn::tensor::Device;

/// A fixture directory under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The repository's `assets/` folder.
pub fn assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets")
}

/// One reference tensor: shape and values (ints as f64 too).
pub struct Ref {
    pub shape: Vec<usize>,
    pub f32s: Vec<f32>,
    pub i64s: Vec<i64>,
}

/// Every tensor of a fixture's `reference.safetensors`.
pub fn reference(dir: &str) -> BTreeMap<String, Ref> {
    let bytes = std::fs::read(fixture(dir).join("reference.safetensors")).expect("reference file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let (f32s, i64s) = match view.dtype() {
            safetensors::Dtype::F32 => (
                d.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                vec![],
            ),
            safetensors::Dtype::I64 => (
                vec![],
                d.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            other => panic!("unexpected dtype {other:?}"),
        };
        out.insert(
            name,
            Ref {
                shape: view.shape().to_vec(),
                f32s,
                i64s,
            },
        );
    }
    out
}

/// Ids as a `[b, t]` tensor.
pub fn ids(r: &Ref, device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(r.i64s.clone(), [r.shape[0], r.shape[1]]), device)
}

/// Values of a tensor.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
