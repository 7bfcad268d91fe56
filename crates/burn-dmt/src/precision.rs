//! The float type of a model's matrix products. With [`Precision::F16`] the
//! operands of the attention, MLP and LM-head products are cast to f16 and
//! the products cast back to f32, the mixed precision of Micikevicius et al.,
//! "Mixed Precision Training" (2018): parameters, optimiser state,
//! activations between products, layer norms, softmaxes and the loss stay
//! f32 (the "master weights"), and only the products, where the arithmetic
//! is, run at half width. Gradients flow back through the casts (each
//! product's backward runs in f16 too), so small gradients would flush to
//! zero in f16: training multiplies the loss by a constant scale before the
//! backward pass and divides the gradients by it after ([`LOSS_SCALE`]).
//!
//! Only devices that compute in f16 take it (`Device::supports_dtype`; the
//! CPU backend is refused: it has no faster f16 arithmetic). Memory layers'
//! projections and searches stay f32.

use std::str::FromStr;

use burn::nn::Linear;
use burn::tensor::{Device, FloatDType, Tensor};

use crate::{DmtError, Result};

/// The static loss scale of f16 training: a loss averaged over a batch's
/// positions has many gradients below f16's smallest normal number
/// (6.1e-5), which the scale lifts into its range before the f16 products
/// of the backward pass; the gradients are divided by it before the
/// optimiser (and the sparse value updates) use them.
pub const LOSS_SCALE: f32 = 1024.0;

/// The float type of a model's matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// f16 products with f32 accumulation of everything else.
    F16,
}

impl Precision {
    /// The name `FromStr` takes.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        }
    }

    /// The float type of the products.
    pub fn dtype(self) -> FloatDType {
        match self {
            Precision::F32 => FloatDType::F32,
            Precision::F16 => FloatDType::F16,
        }
    }

    /// The loss scale training uses with this precision (1 for f32).
    pub fn loss_scale(self) -> f32 {
        match self {
            Precision::F32 => 1.0,
            Precision::F16 => LOSS_SCALE,
        }
    }

    /// Refuses a precision `device` does not compute in.
    pub fn check(self, device: &Device) -> Result<()> {
        if self == Precision::F32 {
            return Ok(());
        }
        if crate::memory::device::on_cpu(device) || !device.supports_dtype(self.dtype()) {
            return Err(DmtError::InvalidArgument(format!(
                "{} matrix products need a GPU adapter that computes in {} (this device does not)",
                self.name(),
                self.name()
            )));
        }
        Ok(())
    }
}

impl FromStr for Precision {
    type Err = DmtError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "f32" => Ok(Precision::F32),
            "f16" => Ok(Precision::F16),
            other => Err(DmtError::InvalidArgument(format!(
                "unknown precision {other:?} (expected f32 or f16)"
            ))),
        }
    }
}

/// `a · b` with the product in `p`'s float type, returned in f32.
pub fn matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>, p: Precision) -> Tensor<D> {
    match p {
        Precision::F32 => a.matmul(b),
        _ => a.cast(p.dtype()).matmul(b.cast(p.dtype())).cast(FloatDType::F32),
    }
}

/// `lin`'s `x · W + b` with the product in `p`'s float type (the bias added
/// in f32).
pub fn linear<const D: usize>(lin: &Linear, x: Tensor<D>, p: Precision) -> Tensor<D> {
    match p {
        Precision::F32 => lin.forward(x),
        _ => {
            let w = lin.weight.val().cast(p.dtype());
            let y = burn::tensor::module::linear(x.cast(p.dtype()), w, None).cast(FloatDType::F32);
            match &lin.bias {
                Some(b) => {
                    let mut shape = [1usize; D];
                    shape[D - 1] = b.val().dims()[0];
                    y + b.val().reshape(shape)
                }
                None => y,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_the_cpu_refuses_f16() {
        for p in [Precision::F32, Precision::F16] {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
        }
        assert!("bf16".parse::<Precision>().is_err());
        assert_eq!(Precision::F32.loss_scale(), 1.0);
        assert!(Precision::F32.check(&Device::flex()).is_ok());
        assert!(Precision::F16.check(&Device::flex()).is_err());
    }

    #[test]
    fn f32_products_are_the_plain_ones() {
        let device = Device::flex();
        let lin = burn::nn::LinearConfig::new(3, 2).init(&device);
        let x = Tensor::<3>::ones([2, 4, 3], &device);
        let (a, b) = (linear(&lin, x.clone(), Precision::F32), lin.forward(x));
        assert_eq!(a.into_data(), b.into_data());
    }
}
