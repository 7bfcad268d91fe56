//! Text generation with a GPT-2 checkpoint (Hugging Face directory).
//!
//! ```text
//! cargo run --release --example generate -- --model DIR --prompt "Hello" --max-new-tokens 20
//! cargo run --release --example generate -- --model crates/burn-dmt/tests/fixtures/tiny-gpt2 \
//!     --prompt-ids 1,2,3 --greedy --print-ids
//! ```

use std::path::PathBuf;
use std::time::Instant;

use burn_dmt::Gpt2;
use burn_dmt::device::{DeviceChoice, select};
use burn_dmt::generate::{Sampling, generate};
use burn_dmt::tokenizer::Gpt2Tokenizer;
use clap::Parser;

/// Generate text with GPT-2 in Burn.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Hugging Face GPT-2 directory (config.json, model.safetensors; tokenizer files for --prompt).
    #[arg(long)]
    model: PathBuf,
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

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let selected = select(args.device)?;
    eprintln!("device: {}", selected.description);
    let config = burn_dmt::Gpt2Config::from_file(&args.model.join("config.json"))?;
    selected.check_fits("the token embedding", (config.vocab_size * config.n_embd * 4) as u64)?;
    let model = Gpt2::from_pretrained(&args.model, &selected.device)?;
    let tokenizer = || Gpt2Tokenizer::from_dir(args.tokenizer.as_ref().unwrap_or(&args.model));
    let prompt: Vec<u32> = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => tokenizer()?.encode(text)?,
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
        match tokenizer() {
            Ok(tok) => println!("{}", tok.decode(&out)?),
            Err(_) if !args.print_ids => println!("{out:?}"),
            Err(_) => {}
        }
    }
    let new = out.len() - prompt.len();
    eprintln!("{new} new tokens in {secs:.2} s ({:.1} tokens/s)", new as f64 / secs);
    Ok(())
}
