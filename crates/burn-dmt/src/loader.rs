//! Loading and saving GPT-2 checkpoints in Hugging Face's safetensors layouts.
//!
//! Two layouts are accepted: the original `gpt2` checkpoint (names without a
//! prefix, `h.N.attn.bias` causal-mask buffers present) and `save_pretrained`
//! output (`transformer.` prefix). `lm_head.weight` is optional (tied to
//! `wte`). Tensors are checked one by one: a missing, unexpected or misshapen
//! tensor is a typed error naming it and both shapes. F32, F16 and BF16 are
//! read (converted to f32).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::nn::{Embedding, Identity, LayerNorm, Linear};
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::config::Gpt2Config;
use crate::gpt2::{Attention, Block, FeedForward, Gpt2, Mlp, layer_norm, param};
use crate::{DmtError, Result};

/// The file names inside a Hugging Face model directory.
pub const CONFIG_FILE: &str = "config.json";
/// The weights file.
pub const WEIGHTS_FILE: &str = "model.safetensors";

use crate::io_error as io;

/// Every tensor the model needs, by name without prefix, with its shape.
pub fn expected_tensors(c: &Gpt2Config) -> BTreeMap<String, Vec<usize>> {
    let (e, f) = (c.n_embd, c.d_ff());
    let mut m = BTreeMap::new();
    m.insert("wte.weight".to_string(), vec![c.vocab_size, e]);
    m.insert("wpe.weight".to_string(), vec![c.n_positions, e]);
    m.insert("ln_f.weight".to_string(), vec![e]);
    m.insert("ln_f.bias".to_string(), vec![e]);
    for i in 0..c.n_layer {
        let p = format!("h.{i}.");
        for (n, s) in [
            ("ln_1.weight", vec![e]),
            ("ln_1.bias", vec![e]),
            ("attn.c_attn.weight", vec![e, 3 * e]),
            ("attn.c_attn.bias", vec![3 * e]),
            ("attn.c_proj.weight", vec![e, e]),
            ("attn.c_proj.bias", vec![e]),
            ("ln_2.weight", vec![e]),
            ("ln_2.bias", vec![e]),
            ("mlp.c_fc.weight", vec![e, f]),
            ("mlp.c_fc.bias", vec![f]),
            ("mlp.c_proj.weight", vec![f, e]),
            ("mlp.c_proj.bias", vec![e]),
        ] {
            m.insert(format!("{p}{n}"), s);
        }
    }
    m
}

/// Whether a checkpoint name is a buffer or tied weight the model ignores.
fn ignorable(name: &str) -> bool {
    let buffer = name.starts_with("h.") && (name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias"));
    buffer || name == "lm_head.weight"
}

/// The tensors of a checkpoint, checked against a configuration and converted
/// to f32, by name without prefix.
pub struct Checkpoint {
    /// Tensors: name → (shape, values).
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    /// The layout's prefix (`""` or `"transformer."`).
    pub prefix: String,
}

fn to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(DmtError::TensorDtype {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            });
        }
    })
}

impl Checkpoint {
    /// Reads `path` and checks every tensor against `config`.
    pub fn read(path: &Path, config: &Gpt2Config) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(io(path))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| DmtError::Checkpoint {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let names: BTreeSet<String> = st.names().into_iter().map(String::from).collect();
        let prefix = if names.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let expected = expected_tensors(config);
        for name in &names {
            let known = name == "lm_head.weight"
                || name
                    .strip_prefix(prefix)
                    .is_some_and(|bare| expected.contains_key(bare) || ignorable(bare));
            if !known {
                let shape = st.tensor(name).map(|t| t.shape().to_vec()).unwrap_or_default();
                return Err(DmtError::UnexpectedTensor {
                    name: name.clone(),
                    shape,
                });
            }
        }
        if let Ok(head) = st.tensor("lm_head.weight") {
            let want = vec![config.vocab_size, config.n_embd];
            if head.shape() != want.as_slice() {
                return Err(DmtError::TensorShape {
                    name: "lm_head.weight".into(),
                    expected: want,
                    found: head.shape().to_vec(),
                });
            }
        }
        let mut tensors = BTreeMap::new();
        for (bare, shape) in expected {
            let full = format!("{prefix}{bare}");
            let view = st.tensor(&full).map_err(|_| DmtError::MissingTensor {
                name: full.clone(),
                expected: shape.clone(),
            })?;
            if view.shape() != shape.as_slice() {
                return Err(DmtError::TensorShape {
                    name: full,
                    expected: shape,
                    found: view.shape().to_vec(),
                });
            }
            let values = to_f32(&full, view.dtype(), view.data())?;
            tensors.insert(bare, (shape, values));
        }
        Ok(Checkpoint {
            tensors,
            prefix: prefix.to_string(),
        })
    }

    fn take<const D: usize>(&mut self, name: &str, device: &Device) -> Tensor<D> {
        let (shape, values) = self.tensors.remove(name).unwrap_or_default();
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    fn linear(&mut self, name: &str, device: &Device) -> Linear {
        Linear {
            weight: param(self.take(&format!("{name}.weight"), device)),
            bias: Some(param(self.take(&format!("{name}.bias"), device))),
        }
    }

    fn norm(&mut self, name: &str, config: &Gpt2Config, device: &Device) -> LayerNorm {
        let mut ln = layer_norm(config, device);
        ln.gamma = param(self.take(&format!("{name}.weight"), device));
        ln.beta = Some(param(self.take(&format!("{name}.bias"), device)));
        ln
    }

    /// Builds the model on `device`.
    pub fn into_model(mut self, config: Gpt2Config, device: &Device) -> Gpt2 {
        let wte = Embedding {
            weight: param(self.take("wte.weight", device)),
        };
        let wpe = Embedding {
            weight: param(self.take("wpe.weight", device)),
        };
        let h = (0..config.n_layer)
            .map(|i| {
                let p = format!("h.{i}.");
                Block {
                    ln_1: self.norm(&format!("{p}ln_1"), &config, device),
                    attn: Attention::new(
                        self.linear(&format!("{p}attn.c_attn"), device),
                        self.linear(&format!("{p}attn.c_proj"), device),
                        config.n_head,
                    ),
                    ln_2: self.norm(&format!("{p}ln_2"), &config, device),
                    mlp: FeedForward::Mlp(Mlp::new(
                        self.linear(&format!("{p}mlp.c_fc"), device),
                        self.linear(&format!("{p}mlp.c_proj"), device),
                        config.activation(),
                    )),
                }
            })
            .collect();
        let ln_f = self.norm("ln_f", &config, device);
        Gpt2::from_parts(config, wte, wpe, h, ln_f)
    }
}

impl Gpt2 {
    /// Loads `config.json` and `model.safetensors` from a Hugging Face GPT-2
    /// directory (either layout) onto `device`.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = Gpt2Config::from_file(&dir.join(CONFIG_FILE))?;
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.exists() && dir.join("pytorch_model.bin").exists() {
            return Err(DmtError::Checkpoint {
                path: weights,
                message: "only safetensors checkpoints are read; this directory has pytorch_model.bin only".into(),
            });
        }
        let ckpt = Checkpoint::read(&weights, &config)?;
        Ok(ckpt.into_model(config, device))
    }

    /// Every weight as (name without prefix, shape, values), in checkpoint names.
    pub fn named_weights(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut out = Vec::new();
        let mut add = |name: String, (shape, values): (Vec<usize>, Vec<f32>)| out.push((name, shape, values));
        add("wte.weight".into(), flat(self.wte.weight.val()));
        add("wpe.weight".into(), flat(self.wpe.weight.val()));
        let norm = |add: &mut dyn FnMut(String, (Vec<usize>, Vec<f32>)), n: &str, ln: &LayerNorm| {
            add(format!("{n}.weight"), flat(ln.gamma.val()));
            if let Some(b) = &ln.beta {
                add(format!("{n}.bias"), flat(b.val()));
            }
        };
        let lin = |add: &mut dyn FnMut(String, (Vec<usize>, Vec<f32>)), n: &str, l: &Linear| {
            add(format!("{n}.weight"), flat(l.weight.val()));
            if let Some(b) = &l.bias {
                add(format!("{n}.bias"), flat(b.val()));
            }
        };
        for (i, b) in self.h.iter().enumerate() {
            let p = format!("h.{i}.");
            norm(&mut add, &format!("{p}ln_1"), &b.ln_1);
            lin(&mut add, &format!("{p}attn.c_attn"), &b.attn.c_attn);
            lin(&mut add, &format!("{p}attn.c_proj"), &b.attn.c_proj);
            norm(&mut add, &format!("{p}ln_2"), &b.ln_2);
            if let FeedForward::Mlp(m) = &b.mlp {
                lin(&mut add, &format!("{p}mlp.c_fc"), &m.c_fc);
                lin(&mut add, &format!("{p}mlp.c_proj"), &m.c_proj);
            }
        }
        norm(&mut add, "ln_f", &self.ln_f);
        out
    }

    /// Writes `config.json` and `model.safetensors` in the `save_pretrained`
    /// layout (`transformer.` prefix, LM head tied), readable by
    /// [`Gpt2::from_pretrained`] and by `transformers`. Blocks whose
    /// feed-forward layer is not an MLP are refused.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.save_pretrained_as(dir, Dtype::F32)
    }

    /// [`Gpt2::save_pretrained`] with the weights stored as `dtype` (F32, F16
    /// or BF16; half precision halves the file, e.g. for a committed teacher).
    pub fn save_pretrained_as(&self, dir: impl AsRef<Path>, dtype: Dtype) -> Result<()> {
        let dir = dir.as_ref();
        if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(DmtError::InvalidArgument(format!(
                "weights can be saved as F32, F16 or BF16, not {dtype:?}"
            )));
        }
        if let Some(i) = self.h.iter().position(|b| !matches!(b.mlp, FeedForward::Mlp(_))) {
            return Err(DmtError::InvalidArgument(format!(
                "block {i} has no MLP: only plain GPT-2 models are saved in the Hugging Face layout"
            )));
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let config_path = dir.join(CONFIG_FILE);
        let mut json = serde_json::to_value(self.config()).map_err(|e| DmtError::Config {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
        if let Some(o) = json.as_object_mut() {
            o.insert("model_type".into(), "gpt2".into());
            o.insert("architectures".into(), serde_json::json!(["GPT2LMHeadModel"]));
        }
        let text = serde_json::to_string_pretty(&json).unwrap_or_default();
        write_atomic(&config_path, text.as_bytes())?;
        let weights = self.named_weights();
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = weights
            .into_iter()
            .map(|(n, s, v)| {
                (
                    format!("transformer.{n}"),
                    s,
                    match dtype {
                        Dtype::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
                        Dtype::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
                        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    },
                )
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(n, s, b)| safetensors::tensor::TensorView::new(dtype, s.clone(), b).map(|v| (n.clone(), v)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| DmtError::Checkpoint {
                path: dir.join(WEIGHTS_FILE),
                message: e.to_string(),
            })?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let data = safetensors::serialize(views, Some(meta)).map_err(|e| DmtError::Checkpoint {
            path: dir.join(WEIGHTS_FILE),
            message: e.to_string(),
        })?;
        write_atomic(&dir.join(WEIGHTS_FILE), &data)
    }
}

/// A tensor's shape and values as f32.
fn flat<const D: usize>(t: Tensor<D>) -> (Vec<usize>, Vec<f32>) {
    let shape = t.dims().to_vec();
    (
        shape,
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap_or_default(),
    )
}

/// Writes a file through a temporary name and a rename, so a crash never
/// leaves a half-written file under the real name.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    std::fs::write(&tmp, data).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// A model with every feed-forward layer removed (the ablation baseline).
pub fn ablate_all(mut model: Gpt2) -> Gpt2 {
    for b in model.h.iter_mut() {
        b.mlp = FeedForward::Ablated(Identity);
    }
    model
}
