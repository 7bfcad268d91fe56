//! Trains a small GPT-2-architecture teacher from scratch on a text corpus and
//! saves it in the Hugging Face layout (with the GPT-2 tokenizer files), so the
//! distillation job has a teacher that needs nothing but the repository. The
//! committed `assets/teacher` was produced by this program (see its
//! TEACHER.md for the exact command and the held-out perplexity it reached).
//!
//! ```text
//! cargo run --release --example train_teacher -- --out assets/teacher
//! ```

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn_dmt::burn;
use burn_dmt::burn::tensor::Device;
use burn_dmt::tokenizer::{Gpt2Tokenizer, VocabMap};
use burn_dmt::train::{Corpus, SplitMix64, cross_entropy, eval_batches, evaluate, lr_at, sample_batch, value};
use burn_dmt::{Gpt2, Gpt2Config, WeightDtype};
use clap::Parser;
use rand_core::SeedableRng;

/// Train a small GPT-2 teacher on a corpus.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Training text.
    #[arg(long, default_value = "assets/data/tinyshakespeare.txt")]
    corpus: PathBuf,
    /// GPT-2 tokenizer directory (vocab.json, merges.txt).
    #[arg(long, default_value = "assets/gpt2-tokenizer")]
    tokenizer: PathBuf,
    /// Output directory (config.json, model.safetensors, tokenizer files, TEACHER.md).
    #[arg(long)]
    out: PathBuf,
    /// Blocks.
    #[arg(long, default_value_t = 4)]
    n_layer: usize,
    /// Width.
    #[arg(long, default_value_t = 128)]
    n_embd: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    n_head: usize,
    /// Context length.
    #[arg(long, default_value_t = 128)]
    n_positions: usize,
    /// Optimiser steps.
    #[arg(long, default_value_t = 1500)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Seed (weights and batches).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Save the weights in half precision (F16) instead of F32.
    #[arg(long)]
    f16: bool,
    /// Keep GPT-2's full 50257-token vocabulary instead of the corpus's tokens
    /// (vocab_map.json).
    #[arg(long)]
    full_vocab: bool,
}

#[path = "common/progress.rs"]
mod progress;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    progress::init();
    let device = Device::flex();
    device.seed(args.seed);
    let train_device = device.clone().autodiff();
    let tok = Gpt2Tokenizer::from_dir(&args.tokenizer)?;
    let text = std::fs::read_to_string(&args.corpus)?;
    let gpt2_ids = tok.encode(&text)?;
    let split = Corpus::split(gpt2_ids, 0.1);
    // The model knows the training part's tokens (held-out tokens it never
    // saw map to <|endoftext|>, the unknown token).
    let map = (!args.full_vocab).then(|| VocabMap::from_corpus(&split.train, 50256));
    let corpus = match &map {
        Some(m) => Corpus {
            train: m.to_model(&split.train),
            eval: m.to_model(&split.eval),
        },
        None => split,
    };
    let vocab = map.as_ref().map_or(tok.vocab_size(), |m| m.len());
    println!("vocabulary: {vocab} tokens");
    println!(
        "corpus {}: {} training tokens, {} held out",
        args.corpus.display(),
        corpus.train.len(),
        corpus.eval.len()
    );
    let config = Gpt2Config::new(args.n_layer, args.n_embd, args.n_head, args.n_positions, vocab);
    let mut model = Gpt2::init(&config, &train_device)?;
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.1)
        .with_grad_clipping(Some(GradientClippingConfig::Norm(1.0)))
        .init();
    let mut rng = SplitMix64::seed_from_u64(args.seed);
    let eval = eval_batches(&corpus.eval, 8, args.seq, 64);
    let start = Instant::now();
    let warmup = (args.steps / 20).max(1);
    for step in 0..args.steps {
        let b = sample_batch(&corpus.train, args.batch, args.seq, &mut rng)?;
        let loss = cross_entropy(model.forward(b.inputs(&train_device), None)?, b.targets(&train_device));
        let l = value(loss.clone())?;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lr = lr_at(step, args.steps, warmup, args.lr, 0.1);
        model = optim.step(lr, model, grads);
        if step % 50 == 0 || step + 1 == args.steps {
            let toks = (step + 1) * args.batch * args.seq;
            tracing::info!(
                step = step + 1,
                steps = args.steps,
                "loss {l:.3}  lr {lr:.2e}  {:.0} tokens/s",
                toks as f64 / start.elapsed().as_secs_f64()
            );
        } else {
            tracing::debug!(step = step + 1, steps = args.steps);
        }
    }
    let trained = start.elapsed().as_secs_f64();
    let inference = model.valid();
    let stats = evaluate(&inference, None, &eval)?;
    println!(
        "held-out perplexity {:.2} over {} tokens",
        stats.perplexity(),
        stats.tokens
    );
    let dtype = if args.f16 { WeightDtype::F16 } else { WeightDtype::F32 };
    inference.save_pretrained_as(&args.out, dtype)?;
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(args.tokenizer.join(f), args.out.join(f))?;
    }
    if let Some(m) = &map {
        m.save(&args.out)?;
    }
    let report = format!(
        "# Teacher\n\nA GPT-2-architecture model ({} blocks × {} wide, {} heads, context {}, {} tokens of GPT-2's BPE vocabulary, see vocab_map.json) \
         trained from scratch by this project's `examples/train_teacher.rs` on `{}` (the first 90% of its tokens).\n\n\
         Command:\n\n```\ncargo run --release --example train_teacher -- --out {} --n-layer {} --n-embd {} --n-head {} \
         --n-positions {} --steps {} --batch {} --seq {} --lr {} --seed {}{}{}\n```\n\n\
         Trained in {:.0} s on the CPU ({} tokens). Held-out perplexity (last 10% of the corpus, {} tokens): {:.2}.\n\n\
         Tokenizer files: the real GPT-2 byte-level BPE (MIT licence, OpenAI), as in `assets/gpt2-tokenizer`.\n",
        args.n_layer,
        args.n_embd,
        args.n_head,
        args.n_positions,
        vocab,
        args.corpus.display(),
        args.out.display(),
        args.n_layer,
        args.n_embd,
        args.n_head,
        args.n_positions,
        args.steps,
        args.batch,
        args.seq,
        args.lr,
        args.seed,
        if args.f16 { " --f16" } else { "" },
        if args.full_vocab { " --full-vocab" } else { "" },
        trained,
        args.steps * args.batch * args.seq,
        stats.tokens,
        stats.perplexity()
    );
    std::fs::write(args.out.join("TEACHER.md"), report)?;
    println!("saved to {}", args.out.display());
    Ok(())
}
