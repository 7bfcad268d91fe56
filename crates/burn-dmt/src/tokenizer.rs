//! GPT-2's byte-level BPE tokenizer, through the `tokenizers` crate, from a
//! model directory's `tokenizer.json` or its `vocab.json` + `merges.txt`.

use std::path::Path;

use tokenizers::Tokenizer;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::{DmtError, Result};

/// A GPT-2 tokenizer.
pub struct Gpt2Tokenizer {
    inner: Tokenizer,
}

fn err(e: impl std::fmt::Display) -> DmtError {
    DmtError::Tokenizer(e.to_string())
}

impl Gpt2Tokenizer {
    /// Loads `dir/tokenizer.json`, or builds the tokenizer from
    /// `dir/vocab.json` and `dir/merges.txt` (byte-level pre-tokenizer and
    /// decoder, no prefix space: GPT-2's settings).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let json = dir.join("tokenizer.json");
        if json.exists() {
            let inner = Tokenizer::from_file(&json).map_err(|e| err(format!("{}: {e}", json.display())))?;
            return Ok(Gpt2Tokenizer { inner });
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        for f in [&vocab, &merges] {
            if !f.exists() {
                return Err(err(format!(
                    "{} not found (a tokenizer needs tokenizer.json, or vocab.json and merges.txt)",
                    f.display()
                )));
            }
        }
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(|e| err(format!("{} / {}: {e}", vocab.display(), merges.display())))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        Ok(Gpt2Tokenizer { inner })
    }

    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false).map_err(err)?.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(err)
    }

    /// Vocabulary size (with added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// File name of a compact vocabulary beside a model's weights.
pub const VOCAB_MAP_FILE: &str = "vocab_map.json";

/// A compact vocabulary: the GPT-2 tokens a small model knows, in model-id
/// order, so its embedding and LM head cover only the tokens of its corpus
/// (vocabulary trimming; tiny-shakespeare uses about a quarter of GPT-2's
/// 50257 tokens, and the LM head dominates a small model's cost). Tokens
/// outside it map to the `unknown` model id. A model without a map uses the
/// GPT-2 ids directly.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VocabMap {
    /// GPT-2 id of each model id.
    pub gpt2_ids: Vec<u32>,
    /// The model id that stands for every token outside the map.
    pub unknown: u32,
}

impl VocabMap {
    /// The tokens of `corpus` (GPT-2 ids), most frequent first (ties by id),
    /// plus `unknown_gpt2` (GPT-2's `<|endoftext|>` is the usual choice).
    pub fn from_corpus(corpus: &[u32], unknown_gpt2: u32) -> Self {
        let mut counts: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
        for &t in corpus {
            *counts.entry(t).or_insert(0) += 1;
        }
        counts.entry(unknown_gpt2).or_insert(0);
        let mut ids: Vec<(u32, u64)> = counts.into_iter().collect();
        ids.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let gpt2_ids: Vec<u32> = ids.into_iter().map(|(t, _)| t).collect();
        let unknown = gpt2_ids.iter().position(|&t| t == unknown_gpt2).unwrap_or(0) as u32;
        VocabMap { gpt2_ids, unknown }
    }

    /// Number of model tokens.
    pub fn len(&self) -> usize {
        self.gpt2_ids.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.gpt2_ids.is_empty()
    }

    /// Model ids of GPT-2 ids.
    pub fn to_model(&self, gpt2: &[u32]) -> Vec<u32> {
        let index: std::collections::HashMap<u32, u32> =
            self.gpt2_ids.iter().enumerate().map(|(i, &t)| (t, i as u32)).collect();
        gpt2.iter()
            .map(|t| index.get(t).copied().unwrap_or(self.unknown))
            .collect()
    }

    /// GPT-2 ids of model ids (unknown ids become the unknown token).
    pub fn to_gpt2(&self, model: &[u32]) -> Vec<u32> {
        let unk = self.gpt2_ids.get(self.unknown as usize).copied().unwrap_or(0);
        model
            .iter()
            .map(|&i| self.gpt2_ids.get(i as usize).copied().unwrap_or(unk))
            .collect()
    }

    /// Reads `dir/vocab_map.json` if present.
    pub fn load(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = dir.as_ref().join(VOCAB_MAP_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|source| DmtError::Io {
            path: path.clone(),
            source,
        })?;
        let map: VocabMap = serde_json::from_str(&text).map_err(|e| DmtError::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if map.unknown as usize >= map.len() {
            return Err(DmtError::Config {
                path,
                message: format!("unknown id {} outside the {} tokens", map.unknown, map.len()),
            });
        }
        Ok(Some(map))
    }

    /// Writes `dir/vocab_map.json` atomically.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let text = serde_json::to_string(self).map_err(err)?;
        crate::loader::write_atomic(&dir.as_ref().join(VOCAB_MAP_FILE), text.as_bytes())
    }
}

/// Text to model ids and back for one model: its GPT-2 tokenizer and, for a
/// model with a compact vocabulary, the map.
pub struct TextCodec {
    /// The tokenizer.
    pub tokenizer: Gpt2Tokenizer,
    /// The compact vocabulary, if the model has one.
    pub map: Option<VocabMap>,
}

impl TextCodec {
    /// The codec of the model in `dir`: its tokenizer files (or those in
    /// `tokenizer_dir`) and its `vocab_map.json` if any.
    pub fn for_model(dir: impl AsRef<Path>, tokenizer_dir: Option<&Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tokenizer = Gpt2Tokenizer::from_dir(tokenizer_dir.unwrap_or(dir))?;
        Ok(TextCodec {
            tokenizer,
            map: VocabMap::load(dir)?,
        })
    }

    /// Model ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.tokenizer.encode(text)?;
        Ok(match &self.map {
            Some(m) => m.to_model(&ids),
            None => ids,
        })
    }

    /// Text of model ids.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.map {
            Some(m) => self.tokenizer.decode(&m.to_gpt2(ids)),
            None => self.tokenizer.decode(ids),
        }
    }

    /// The model's vocabulary size.
    pub fn vocab_size(&self) -> usize {
        match &self.map {
            Some(m) => m.len(),
            None => self.tokenizer.vocab_size(),
        }
    }
}
