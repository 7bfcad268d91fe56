//! # burn-dmt
//!
//! A discrete-memory transformer in [Burn](https://burn.dev): GPT-2 (Radford et
//! al., "Language Models are Unsupervised Multitask Learners", 2019) written to
//! mirror Hugging Face's `modeling_gpt2.py` and keep the checkpoint's tensor
//! names, so that real checkpoints load as they are. Each block's feed-forward
//! layer sits behind [`gpt2::FeedForward`], the seam where memory layers backed
//! by memstore replace it (feed-forward layers act as key-value memories: Geva
//! et al. 2021).
//!
//! - [`gpt2`]: the model, with a KV cache for incremental decoding.
//! - [`loader`]: `Gpt2::from_pretrained(dir)` for both Hugging Face layouts.
//! - [`tokenizer`]: GPT-2 byte-level BPE through the `tokenizers` crate.
//! - [`generate`]: greedy, temperature, top-k and top-p decoding.
//! - [`inspect`]: which memories each token read, and what a memory's value
//!   promotes (the Mindset inspector's views).
//! - [`device`]: `--device auto|cpu|wgpu` resolution.
//! - [`memory`]: memory layers (featural, associative) and their device tier.
//! - [`distill`]: distillation of a teacher into a memory student, with its
//!   baselines ([`ngram`], dense students of other widths) and the honest
//!   accounting of what each costs ([`accounting`]).
//! - [`continual`]: `memorize` new text into a trained student's memory with
//!   its weights frozen (tagged by source in the store), `forget` it by its
//!   source, and the finetuning baseline they are measured against.

pub mod accounting;
pub mod config;
pub mod continual;
pub mod device;
pub mod distill;
pub mod generate;
pub mod gpt2;
pub mod inspect;
pub mod loader;
pub mod loss;
pub mod memory;
pub mod ngram;
pub mod plot;
pub mod precision;
pub mod storage;
pub mod tokenizer;
pub mod train;

pub use burn;
pub use config::Gpt2Config;
pub use gpt2::{FeedForward, Gpt2, KvCache};
pub use safetensors::Dtype as WeightDtype;

use std::path::PathBuf;

/// Errors of burn-dmt: bad checkpoints, configs, tokenizers and inputs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DmtError {
    /// A file could not be read; names the path.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not a valid GPT-2 configuration.
    #[error("config {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The safetensors file cannot be parsed.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("checkpoint is missing tensor {name} (expected shape {expected:?})")]
    MissingTensor {
        /// The tensor's name in the checkpoint's layout.
        name: String,
        /// The shape the model needs.
        expected: Vec<usize>,
    },
    /// The checkpoint has a tensor the model does not know.
    #[error("checkpoint has unexpected tensor {name} (shape {shape:?})")]
    UnexpectedTensor {
        /// The tensor's name.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A tensor has the wrong shape.
    #[error("tensor {name} has shape {found:?}, the model expects {expected:?}")]
    TensorShape {
        /// The tensor's name.
        name: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape in the checkpoint.
        found: Vec<usize>,
    },
    /// A tensor has a dtype the loader cannot convert to f32.
    #[error("tensor {name} has unsupported dtype {dtype}")]
    TensorDtype {
        /// The tensor's name.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// The tokenizer files are missing or invalid.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A sequence longer than the model's context.
    #[error("sequence of {len} positions exceeds the model's context of {max}")]
    SequenceTooLong {
        /// Positions needed.
        len: usize,
        /// `n_positions`.
        max: usize,
    },
    /// Bad generation or input parameters.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The requested device is not available.
    #[error("device: {0}")]
    Device(String),
    /// A run stopped after a step as asked (`halt_after`); it can be resumed.
    #[error("stopped after step {step} as asked; continue with --resume")]
    Halted {
        /// The last step done.
        step: usize,
    },
    /// The memory store failed.
    #[error("memory store: {0}")]
    Store(#[from] memstore_api::Error),
    /// A text to memorise is unusable (empty, not UTF-8, too short).
    #[error("text {path}: {message}")]
    Text {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// No memorised source has this tag.
    #[error("no memorised source {tag:?} (known: {known})")]
    UnknownSource {
        /// The tag asked for.
        tag: String,
        /// The tags the run directory knows, comma-separated.
        known: String,
    },
}

/// Result alias of burn-dmt.
pub type Result<T, E = DmtError> = std::result::Result<T, E>;

/// Maps an I/O error to [`DmtError::Io`] naming `path`.
pub(crate) fn io_error(path: &std::path::Path) -> impl Fn(std::io::Error) -> DmtError + '_ {
    move |source| DmtError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A small Tokio runtime (one worker thread), to drive the async store from
/// synchronous code (the training loop, the write-behind thread).
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    // One worker thread of its own: an IpcStore's connection tasks live on the
    // runtime that opened it and must run while other threads (the
    // write-behind) use the store and this thread trains.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(io_error(std::path::Path::new("<tokio runtime>")))
}

/// Tensors read back to the host so far ([`host_reads`]).
static HOST_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many tensors this crate's training, memorising and memory paths have
/// read back from a device in this process (on a GPU each read waits for
/// the device's queued work); generation and checkpoint loading are not
/// counted, nor are the CPU backend's host kernels (the exact top-k and the
/// loss), whose tensors already live in host memory and wait for nothing.
pub fn host_reads() -> u64 {
    HOST_READS.load(std::sync::atomic::Ordering::Relaxed)
}

pub(crate) fn count_host_read() {
    HOST_READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// A float tensor's values on the host (row-major), without its graph.
pub(crate) fn host_f32<const D: usize>(t: burn::tensor::Tensor<D>) -> Result<Vec<f32>> {
    count_host_read();
    cpu_f32(t)
}

/// [`host_f32`] of a tensor of the CPU backend, not counted as a read
/// ([`host_reads`]): a host kernel's input, already in host memory.
pub(crate) fn cpu_f32<const D: usize>(t: burn::tensor::Tensor<D>) -> Result<Vec<f32>> {
    t.detach()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| DmtError::InvalidArgument(format!("reading a tensor: {e:?}")))
}

/// An integer tensor's values on the host (row-major).
pub(crate) fn host_i64<const D: usize>(t: burn::tensor::Tensor<D, burn::tensor::Int>) -> Result<Vec<i64>> {
    count_host_read();
    cpu_i64(t)
}

/// [`host_i64`] of a tensor of the CPU backend, not counted as a read.
pub(crate) fn cpu_i64<const D: usize>(t: burn::tensor::Tensor<D, burn::tensor::Int>) -> Result<Vec<i64>> {
    t.into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .map_err(|e| DmtError::InvalidArgument(format!("reading a tensor: {e:?}")))
}
