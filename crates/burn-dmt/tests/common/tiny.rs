//! A tiny distillation setup: a random teacher with a compact vocabulary
//! over a slice of the bundled Shakespeare and the options of a two-block
//! memory student. Shared by burn-dmt's tests and the root package's
//! (`#[path]`), so it needs nothing beyond burn-dmt.

use std::path::{Path, PathBuf};

use burn_dmt::burn::tensor::Device;

/// The repository's `assets/` folder (found above the compiling package's
/// directory, which is the root or `crates/burn-dmt`).
pub fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|d| d.join("assets"))
        .find(|a| a.join("data/tinyshakespeare.txt").is_file())
        .expect("the repository's assets/ folder")
}

/// The seed of the tiny teachers' weights.
pub const TEACHER_SEED: u64 = 1;

/// A random GPT-2 teacher with a compact vocabulary over a slice of the
/// corpus; returns (training text, held-out text) files.
pub fn tiny_setup(dir: &Path) -> (PathBuf, PathBuf) {
    let text = std::fs::read_to_string(assets().join("data/tinyshakespeare.txt")).unwrap();
    let text: String = text.chars().take(24_000).collect();
    let (train, eval) = text.split_at(20_000);
    let tok = burn_dmt::tokenizer::Gpt2Tokenizer::from_dir(assets().join("gpt2-tokenizer")).unwrap();
    let map = burn_dmt::tokenizer::VocabMap::from_corpus(&tok.encode(train).unwrap(), 50256);
    let teacher = dir.join("teacher");
    let config = burn_dmt::Gpt2Config::new(2, 32, 2, 32, map.len());
    burn_dmt::Gpt2::seeded(&config, &Device::flex(), TEACHER_SEED)
        .unwrap()
        .save_pretrained(&teacher)
        .unwrap();
    map.save(&teacher).unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(assets().join("gpt2-tokenizer").join(f), teacher.join(f)).unwrap();
    }
    let (a, b) = (dir.join("train.txt"), dir.join("eval.txt"));
    std::fs::write(&a, train).unwrap();
    std::fs::write(&b, eval).unwrap();
    (a, b)
}

/// A two-block student (featural, associative) of the teacher in
/// `dir/teacher`, trained for 4 steps into `dir/run`.
pub fn options(dir: &Path, train: PathBuf, eval: &Path) -> burn_dmt::distill::DistillOptions {
    let mut o = burn_dmt::distill::DistillOptions::embedded(Path::new(env!("CARGO_MANIFEST_DIR")));
    o.teacher = dir.join("teacher");
    o.corpus = train;
    o.eval_corpus = Some(eval.to_path_buf());
    o.run_dir = dir.join("run");
    o.layers = Some("0:featural,1:associative".into());
    o.steps = 4;
    o.batch = 2;
    o.seq = 16;
    o.capacity = 64;
    o.k = 4;
    o.eval_windows = 6;
    o.max_inserts = 8;
    o
}
