//! Device tensors read back to the host together.
//!
//! On a GPU every read-back waits for the device's queued work: reading
//! each memory layer's search results, new rows and value deltas apart
//! would wait a few times per layer and step. [`HostReads`] gathers the
//! tensors of one stage of a step, flattened, and reads them in one
//! concatenated transfer ([`HostReads::read`]; several batches, gathered
//! by layers side by side, in one: [`HostReads::read_all`]);
//! [`HostValues::get`] hands back each tensor's floats. Integer tensors
//! travel as floats ([`HostReads::push_int`]), which is exact for
//! magnitudes below 2²⁴: callers with larger integers read them apart.

use std::sync::Arc;

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
        self.on_device(t.device().inner())?;
        self.parts.push(t.reshape([n]));
        self.len += n;
        Ok(span)
    }

    /// Takes note of the device of a tensor gathered: every tensor of one
    /// batch must be on one device.
    fn on_device(&mut self, device: Device) -> Result<()> {
        match &self.device {
            Some(d) if *d != device => Err(DmtError::InvalidArgument(format!(
                "one read-back gathers tensors of {d:?} and {device:?}"
            ))),
            Some(_) => Ok(()),
            None => {
                self.device = Some(device);
                Ok(())
            }
        }
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
        let len = data.len();
        Ok(HostValues {
            data: Arc::new(data),
            start: 0,
            len,
        })
    }

    /// Reads several batches in one transfer, each batch's spans still its
    /// own (`HostValues` in the order of `batches`): for a stage whose
    /// layers gather side by side, each into its own batch. Every tensor of
    /// every batch must be on one device.
    pub fn read_all(batches: Vec<HostReads>) -> Result<Vec<HostValues>> {
        let mut joined = HostReads::new();
        let mut lens = Vec::with_capacity(batches.len());
        for b in batches {
            if let Some(device) = b.device {
                joined.on_device(device)?;
            }
            lens.push(b.len);
            joined.parts.extend(b.parts);
            joined.len += b.len;
        }
        let all = joined.read()?;
        let mut start = 0;
        Ok(lens
            .into_iter()
            .map(|len| {
                let part = HostValues {
                    data: Arc::clone(&all.data),
                    start,
                    len,
                };
                start += len;
                part
            })
            .collect())
    }
}

/// What one [`HostReads::read`] returned (or one batch of a
/// [`HostReads::read_all`], which shares the transfer's floats).
#[derive(Debug, Default)]
pub struct HostValues {
    data: Arc<Vec<f32>>,
    start: usize,
    len: usize,
}

impl HostValues {
    /// The floats of the tensor pushed as `span` (a span of the batch that
    /// was read).
    pub fn get(&self, span: Span) -> &[f32] {
        let mine = &self.data[self.start..self.start + self.len];
        &mine[span.start..span.start + span.len]
    }
}
