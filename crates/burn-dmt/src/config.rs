//! GPT-2 configuration, read from a Hugging Face `config.json`.

use std::path::Path;

use serde::Deserialize;

use crate::{DmtError, Result};

/// The feed-forward activation named by `activation_function`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// GELU, tanh approximation (`gelu_new`, `gelu_pytorch_tanh`: GPT-2's own).
    GeluTanh,
    /// GELU with the exact erf (`gelu`).
    Gelu,
    /// ReLU (`relu`).
    Relu,
}

impl Activation {
    /// Parses a `transformers` activation name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "gelu" => Some(Activation::Gelu),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu_new".into()
}
fn default_true() -> bool {
    true
}

/// The fields of a GPT-2 `config.json` that define the architecture.
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
pub struct Gpt2Config {
    /// Number of blocks.
    pub n_layer: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Attention heads per block.
    pub n_head: usize,
    /// Context length (rows of `wpe`).
    pub n_positions: usize,
    /// Vocabulary size (rows of `wte`).
    pub vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Feed-forward activation name.
    #[serde(default = "default_act")]
    pub activation_function: String,
    /// Feed-forward width (`4 · n_embd` when absent).
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// Whether the LM head is the token embedding (GPT-2: always).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
}

impl Gpt2Config {
    /// GPT-2 small: 12 layers, 768 wide, 12 heads, 1024 positions, 50257 tokens.
    pub fn gpt2_small() -> Self {
        Self::new(12, 768, 12, 1024, 50257)
    }

    /// A configuration with GPT-2's defaults for the other fields.
    pub fn new(n_layer: usize, n_embd: usize, n_head: usize, n_positions: usize, vocab_size: usize) -> Self {
        Gpt2Config {
            n_layer,
            n_embd,
            n_head,
            n_positions,
            vocab_size,
            layer_norm_epsilon: 1e-5,
            activation_function: "gelu_new".into(),
            n_inner: None,
            tie_word_embeddings: true,
        }
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| DmtError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Gpt2Config = serde_json::from_str(&text).map_err(|e| DmtError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| DmtError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// Checks that the architecture is one this implementation runs.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.n_layer == 0 || self.n_embd == 0 || self.n_head == 0 || self.n_positions == 0 || self.vocab_size == 0 {
            return Err("n_layer, n_embd, n_head, n_positions and vocab_size must all be at least 1".into());
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "n_embd {} is not divisible by n_head {}",
                self.n_embd, self.n_head
            ));
        }
        if Activation::parse(&self.activation_function).is_none() {
            return Err(format!(
                "unsupported activation_function {:?}",
                self.activation_function
            ));
        }
        if !self.tie_word_embeddings {
            return Err("untied LM heads are not supported (GPT-2 ties lm_head to wte)".into());
        }
        if !(self.layer_norm_epsilon > 0.0 && self.layer_norm_epsilon.is_finite()) {
            return Err(format!(
                "layer_norm_epsilon must be positive, got {}",
                self.layer_norm_epsilon
            ));
        }
        Ok(())
    }

    /// Feed-forward width.
    pub fn d_ff(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// The activation (validated).
    pub fn activation(&self) -> Activation {
        Activation::parse(&self.activation_function).unwrap_or(Activation::GeluTanh)
    }
}
