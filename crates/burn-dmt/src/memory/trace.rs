//! Retrieval traces: which memories each row of a memory layer's forward
//! pass read, at what distance and with what weight, recorded only while a
//! trace is open ([`Tracer::start`]) so that training and evaluation pay
//! nothing for it. [`crate::inspect`] turns them into per-token views.
//!
//! A trace keeps the device tensors of each forward pass (detached) and is
//! read back once, when it is taken; a pass run position by position (a
//! model with layerwise feedback, or a KV-cached decode) records one entry
//! per call, in order.

use std::sync::{Arc, Mutex};

use burn::tensor::{Int, Tensor};

/// What one forward pass of a memory layer retrieved, per row (`[n, k]`
/// each; rows are positions × heads, position-major).
#[derive(Clone, Debug)]
pub struct Trace {
    /// The retrieved memories' tier slots (a store-backed tier: their ids).
    pub slots: Tensor<2, Int>,
    /// Their distances to the row's search key (`+∞`: no memory).
    pub distances: Tensor<2>,
    /// The weight each contributed to the row's output: softmax weights
    /// for featural and associative layers, activations for key-value ones.
    pub weights: Tensor<2>,
}

/// The trace sink of one memory layer, shared by its clones: closed (no
/// recording) unless [`Tracer::start`] opened it.
#[derive(Clone, Debug, Default)]
pub struct Tracer(Arc<Mutex<Option<Vec<Trace>>>>);

impl Tracer {
    /// Opens a trace, dropping any open one.
    pub fn start(&self) {
        *self.lock() = Some(Vec::new());
    }

    /// Closes the trace and returns what it recorded (`None`: none was open).
    pub fn take(&self) -> Option<Vec<Trace>> {
        self.lock().take()
    }

    /// Whether a trace is open.
    pub fn is_open(&self) -> bool {
        self.lock().is_some()
    }

    /// Records a forward pass's retrievals when a trace is open; `make`
    /// runs only then.
    pub fn record(&self, make: impl FnOnce() -> Trace) {
        if let Some(t) = self.lock().as_mut() {
            t.push(make());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<Trace>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
