//! Text generation with a GPT-2 checkpoint (Hugging Face directory).
//!
//! ```text
//! cargo run --release --example generate -- --model DIR --prompt "Hello" --max-new-tokens 20
//! cargo run --release --example generate -- --model crates/burn-dmt/tests/fixtures/tiny-gpt2 \
//!     --prompt-ids 1,2,3 --greedy --print-ids
//! # a memory student (run directory of distill_gpt2), after memorising a text:
//! cargo run --release --example generate -- --student runs/distill --memorize FILE --prompt "And God said"
//! ```
//!
//! With `--student`, the memory layers answer from the device tier loaded
//! from the run's stores, or with `--memory store` from each store's own
//! index (for memories larger than a device holds). `--memorize FILE`
//! first writes FILE into the student's memory (weights frozen; see the
//! `memory` example; `--mechanism output` writes it into the output memory
//! at the LM head), so generation changes; `memory forget` reverts it.

use std::path::PathBuf;
use std::time::Instant;

use burn_dmt::Gpt2;
use burn_dmt::continual::{Mechanism, MemorizeOptions, memorize, serve_from_stores};
use burn_dmt::device::{DeviceChoice, select};
use burn_dmt::distill::load_student;
use burn_dmt::generate::{Sampling, generate};
use burn_dmt::tokenizer::TextCodec;
use clap::Parser;

/// Generate text with GPT-2 in Burn.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Hugging Face GPT-2 directory (config.json, model.safetensors; tokenizer files for --prompt).
    #[arg(long, required_unless_present = "student", conflicts_with = "student")]
    model: Option<PathBuf>,
    /// A memory student's run directory (from distill_gpt2) instead of --model.
    #[arg(long)]
    student: Option<PathBuf>,
    /// With --student: where the memory layers search, device (the tier loaded from the stores) or store
    /// (each store's own index).
    #[arg(long, default_value = "device", requires = "student")]
    memory: String,
    /// With --student: memorise this text into the student's memory first (weights frozen).
    #[arg(long, requires = "student")]
    memorize: Option<PathBuf>,
    /// With --memorize: how (sparse, insert, both, or output: rows of the output memory at the LM head).
    #[arg(long, default_value = "both", requires = "memorize")]
    mechanism: Mechanism,
    /// Prompt text (needs tokenizer.json or vocab.json + merges.txt in --model, or --tokenizer).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids (for checkpoints without a tokenizer).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Directory with the tokenizer files, if not the model directory.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Number of tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Greedy decoding (otherwise sampling).
    #[arg(long)]
    greedy: bool,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: smallest set of tokens reaching this probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Decode without the KV cache (for comparison).
    #[arg(long)]
    no_cache: bool,
    /// Print the full id sequence (prompt + generated) as one comma-separated line.
    #[arg(long)]
    print_ids: bool,
    /// Device: auto, cpu or wgpu.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

#[path = "common/progress.rs"]
mod progress;

fn main() {
    progress::init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let selected = select(args.device)?;
    eprintln!("device: {}", selected.description);
    let rt = tokio::runtime::Runtime::new()?;
    let mut _stores = Vec::new();
    let (model, codec): (Gpt2, Option<TextCodec>) = match (&args.model, &args.student) {
        (_, Some(run_dir)) => {
            if let Some(f) = &args.memorize {
                let opts = {
                    let mut o = MemorizeOptions::default();
                    o.mechanism = args.mechanism;
                    o.device = selected.device.clone();
                    o
                };
                for r in memorize(run_dir, std::slice::from_ref(f), &opts, None)? {
                    eprintln!(
                        "memorised {} (forget it with: cargo run --release --example memory -- forget --student {} \
                         --source {})",
                        r.source.tag,
                        run_dir.display(),
                        r.source.file
                    );
                }
            }
            let (spec, mut m) = load_student(run_dir, &selected.device, &rt)?;
            match args.memory.as_str() {
                "device" => {}
                "store" => _stores = serve_from_stores(run_dir, &mut m, &rt)?,
                other => return Err(format!("--memory {other:?}: expected device or store").into()),
            }
            (m, Some(TextCodec::for_model(&spec.teacher, args.tokenizer.as_deref())?))
        }
        (Some(dir), None) => {
            let config = burn_dmt::Gpt2Config::from_file(&dir.join("config.json"))?;
            selected.check_fits("the token embedding", (config.vocab_size * config.n_embd * 4) as u64)?;
            let m = Gpt2::from_pretrained(dir, &selected.device)?;
            let codec = TextCodec::for_model(dir, args.tokenizer.as_deref()).ok();
            (m, codec)
        }
        (None, None) => return Err("give --model or --student".into()),
    };
    let prompt: Vec<u32> = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => codec.as_ref().ok_or("no tokenizer files for --prompt")?.encode(text)?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => return Err("give --prompt or --prompt-ids".into()),
    };
    let sampling = Sampling {
        greedy: args.greedy,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    let t0 = Instant::now();
    let out = generate(&model, &prompt, args.max_new_tokens, &sampling, !args.no_cache)?;
    let secs = t0.elapsed().as_secs_f64();
    if args.print_ids {
        let line: Vec<String> = out.iter().map(|x| x.to_string()).collect();
        println!("{}", line.join(","));
    }
    if args.prompt.is_some() || !args.print_ids {
        match &codec {
            Some(c) => println!("{}", c.decode(&out)?),
            None if !args.print_ids => println!("{out:?}"),
            None => {}
        }
    }
    let new = out.len() - prompt.len();
    eprintln!("{new} new tokens in {secs:.2} s ({:.1} tokens/s)", new as f64 / secs);
    Ok(())
}
