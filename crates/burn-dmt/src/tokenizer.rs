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
