//! Device tensors read back to the host together.
//!
//! On a GPU every read-back waits for the device's queued work: reading
//! each memory layer's search results, new rows and value deltas apart
//! would wait a few times per layer and step. [`HostReads`] gathers the
//! tensors of one stage of a step, flattened, and reads them in one
//! concatenated transfer ([`HostReads::read`]); [`HostValues::get`] hands
//! back each tensor's floats. Integer tensors travel as floats
//! ([`HostReads::push_int`]), which is exact for magnitudes below 2²⁴:
//! callers with larger integers read them apart.

use burn::tensor::{Device, Int, Tensor};

use crate::{DmtError, Result, host_f32};

/// The largest integer magnitude an f32 holds exactly (2²⁴).
pub const EXACT_INT: usize = 1 << 24;

/// Where one pushed tensor's floats lie in a [`HostValues`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    start: usize,
    len: usize,
}

/// Tensors waiting to be read back in one transfer.
#[derive(Debug, Default)]
pub struct HostReads {
    parts: Vec<Tensor<1>>,
    len: usize,
    device: Option<Device>,
}

impl HostReads {
    /// Nothing gathered yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Gathers `t` (flattened, row-major; its autodiff graph dropped).
    /// Every tensor of one batch must be on one device.
    pub fn push<const D: usize>(&mut self, t: Tensor<D>) -> Result<Span> {
        let n = t.shape().num_elements();
        let span = Span {
            start: self.len,
            len: n,
        };
        if n == 0 {
            return Ok(span);
        }
        let t = t.inner();
        let device = t.device().inner();
        match &self.device {
            Some(d) if *d != device => {
                return Err(DmtError::InvalidArgument(format!(
                    "one read-back gathers tensors of {d:?} and {device:?}"
                )));
            }
            Some(_) => {}
            None => self.device = Some(device),
        }
        self.parts.push(t.reshape([n]));
        self.len += n;
        Ok(span)
    }

    /// Gathers an integer tensor as floats; its values must lie within
    /// ±[`EXACT_INT`] (slots of a tier below that capacity, token ids).
    pub fn push_int<const D: usize>(&mut self, t: Tensor<D, Int>) -> Result<Span> {
        self.push(t.float())
    }

    /// Reads everything gathered in one transfer (none when nothing was).
    pub fn read(self) -> Result<HostValues> {
        let mut parts = self.parts;
        let data = match parts.len() {
            0 => Vec::new(),
            1 => host_f32(parts.remove(0))?,
            _ => host_f32(Tensor::cat(parts, 0))?,
        };
        if data.len() != self.len {
            return Err(DmtError::InvalidArgument(format!(
                "a read-back of {} floats returned {}",
                self.len,
                data.len()
            )));
        }
        Ok(HostValues { data })
    }
}

/// What one [`HostReads::read`] returned.
#[derive(Debug, Default)]
pub struct HostValues {
    data: Vec<f32>,
}

impl HostValues {
    /// The floats of the tensor pushed as `span` (a span of the batch that
    /// was read).
    pub fn get(&self, span: Span) -> &[f32] {
        &self.data[span.start..span.start + span.len]
    }
}
