//! The main job: distil a GPT-2 teacher into a student whose feed-forward
//! layers are memory layers backed by memstore, then report how much of the
//! teacher it recovers.
//!
//! ```text
//! cargo run --release --example distill_gpt2                      # the embedded default
//! cargo run --release --example distill_gpt2 -- --teacher DIR     # a Hugging Face GPT-2
//! cargo run --release --example distill_gpt2 -- --eval-only --student runs/distill --corpus FILE
//! ```
//!
//! With no arguments it needs nothing but the repository: the teacher in
//! `assets/teacher` (a small GPT-2 this project trained on tiny-shakespeare,
//! see its TEACHER.md), the corpus in `assets/data`, SQLite stores under the
//! run directory, the CPU.

use std::path::PathBuf;
use std::time::Instant;

use burn_dmt::device::{DeviceChoice, select};
use burn_dmt::distill::{DistillOptions, eval_only, run};
use clap::Parser;

/// Distil GPT-2 into a discrete-memory transformer.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Teacher: a Hugging Face GPT-2 directory (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Tokenizer directory, if not the teacher's.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Training text (default: the bundled tiny-shakespeare). With --eval-only: the text to evaluate on.
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Held-out text (default: the last 10% of the corpus).
    #[arg(long)]
    eval_corpus: Option<PathBuf>,
    /// Run directory (student weights, student.json, memory stores, report.md, metrics.csv).
    #[arg(long, default_value = "runs/distill")]
    run_dir: PathBuf,
    /// Where the memory layers' stores live: sqlite[:DIR] (SQLite files DIR/block{i}.db; default DIR is
    /// RUN_DIR/memory), duckdb[:DIR] (DuckDB files; needs a build with --features duckdb), ipc:SOCKET (one
    /// memstored serving named stores, started with `memstored --stores DIR`, socket DIR/memstored.sock: layer i
    /// uses its store block{i}, shared with other processes) or postgres://…[#PREFIX] (PostgreSQL with pgvector;
    /// needs --features postgres: layer i in the schema PREFIX_block{i}, default PREFIX dmt). Recorded in the
    /// run directory: --resume and --eval-only use the same stores.
    #[arg(long, default_value = "sqlite")]
    store: burn_dmt::storage::StoreLocation,
    /// Device: auto (a wgpu GPU when the build has burn-dmt's `wgpu` feature and an adapter answers, else the
    /// CPU), cpu or wgpu.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Which blocks get which memory type, e.g. "0-2:featural,3:associative" (default: the lower three quarters
    /// featural, the rest associative; "product" is a featural layer whose tables are product-key grids, which
    /// needs --capacity of heads × n² rows; "keyvalue" turns the teacher MLP's units into memory rows, "mlp" keeps
    /// a block's MLP, "none" removes it).
    #[arg(long)]
    layers: Option<String>,
    /// Optimiser steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Sequences per step.
    #[arg(long)]
    batch: Option<usize>,
    /// Tokens per sequence.
    #[arg(long)]
    seq: Option<usize>,
    /// Peak learning rate (AdamW, warm-up then cosine decay).
    #[arg(long)]
    lr: Option<f64>,
    /// Distillation temperature T.
    #[arg(long)]
    temperature: Option<f64>,
    /// Weight α of the distillation term (1 − α on the next-token cross-entropy).
    #[arg(long)]
    alpha: Option<f64>,
    /// Seed of batches and new weights.
    #[arg(long)]
    seed: Option<u64>,
    /// Memories retrieved per head.
    #[arg(long)]
    k: Option<usize>,
    /// Memory slots per layer, split evenly among the heads (the device tier's capacity; rounded down to a
    /// multiple of the heads).
    #[arg(long)]
    capacity: Option<usize>,
    /// Learning rate of the sparse updates of retrieved values (0: values fixed).
    #[arg(long)]
    value_lr: Option<f32>,
    /// Novelty threshold of insertion (L2 distance between unit keys; recombination below a quarter of it).
    #[arg(long)]
    novelty: Option<f32>,
    /// Most memories a growing layer inserts or recombines per step.
    #[arg(long)]
    max_inserts: Option<usize>,
    /// Memories a key-value layer ("keyvalue" in --layers: the teacher MLP's units as rows) sums per position
    /// (default 128).
    #[arg(long)]
    kv_k: Option<usize>,
    /// How featural memories start: teacher (filled from the teacher's feed-forward layers), empty (they grow, each
    /// new memory's value the teacher's feed-forward output on the same input) or random (an ablation).
    #[arg(long)]
    featural_init: Option<burn_dmt::memory::layers::MemoryInit>,
    /// How associative memories start: empty (they grow by novelty-gated insertion and recombination up to
    /// --capacity, then evict by LRFU), teacher or random.
    #[arg(long)]
    associative_init: Option<burn_dmt::memory::layers::MemoryInit>,
    /// One memory table shared by a layer's heads instead of one per head (an ablation).
    #[arg(long)]
    shared_heads: bool,
    /// Hidden width of the student's MLP blocks (the dense baselines: narrower keeps the teacher's largest units,
    /// wider adds silent ones); default the teacher's.
    #[arg(long)]
    mlp_width: Option<usize>,
    /// Weight of the hidden-state loss (MSE between each memory layer's output and the teacher MLP's output on the
    /// same input; 0: off).
    #[arg(long)]
    hidden_loss: Option<f64>,
    /// Layerwise feedback in the student: each block's input also gets a learned projection of the block above's
    /// output one position back (gradient stopped); evaluated exactly, position by position.
    #[arg(long)]
    feedback: bool,
    /// Parallel passes that approximate the feedback in teacher-forced training (pass j is exact for the first j
    /// positions; default 3).
    #[arg(long, requires = "feedback")]
    feedback_passes: Option<usize>,
    /// Held-out windows to evaluate.
    #[arg(long)]
    eval_windows: Option<usize>,
    /// Continue the run in --run-dir from its last checkpoint (same flags as the first run).
    #[arg(long)]
    resume: bool,
    /// Write a resumable checkpoint every this many steps (and at the end).
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Stop after this step as if interrupted (continue later with --resume).
    #[arg(long)]
    halt_after: Option<usize>,
    /// Synchronise the device at each phase of a training step, so that the phase times in the log and the report
    /// are exact on a GPU (costs some throughput); on the CPU the teacher's forward pass then runs before the
    /// student's instead of beside it.
    #[arg(long)]
    profile: bool,
    /// Float type of the matrix products of attention, the MLPs and the LM head: f32, or f16 on a GPU adapter that
    /// computes in it (f32 weights, optimiser state and loss; the loss scaled by 1024 in training).
    #[arg(long, default_value = "f32")]
    precision: burn_dmt::precision::Precision,
    /// Evaluate a trained student (--student RUN_DIR) on --corpus instead of training.
    #[arg(long, requires_all = ["student", "corpus"])]
    eval_only: bool,
    /// The run directory of the student to evaluate.
    #[arg(long)]
    student: Option<PathBuf>,
}

#[path = "common/progress.rs"]
mod progress;

#[path = "common/alloc.rs"]
mod alloc;

fn main() {
    alloc::keep_freed_memory();
    if let Err(e) = run_main() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run_main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    progress::init();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut o = DistillOptions::embedded(&root);
    let selected = select(args.device)?;
    o.device = selected.device;
    o.device_name = selected.description;
    if let Some(t) = args.teacher {
        o.teacher = t;
    }
    o.tokenizer = args.tokenizer;
    if let Some(c) = args.corpus.clone() {
        o.corpus = c;
    }
    o.eval_corpus = args.eval_corpus;
    o.run_dir = args.run_dir;
    o.store = args.store;
    o.layers = args.layers;
    macro_rules! set {
        ($($f:ident),*) => { $(if let Some(v) = args.$f { o.$f = v; })* };
    }
    set!(
        steps,
        batch,
        seq,
        lr,
        temperature,
        alpha,
        seed,
        k,
        capacity,
        value_lr,
        novelty,
        eval_windows,
        checkpoint_every,
        hidden_loss,
        max_inserts,
        kv_k,
        featural_init,
        associative_init
    );
    o.shared_heads = args.shared_heads;
    o.mlp_width = args.mlp_width;
    o.feedback = args.feedback.then_some(args.feedback_passes.unwrap_or(3));
    o.resume = args.resume;
    o.halt_after = args.halt_after;
    o.profile = args.profile;
    o.precision = args.precision;
    let start = Instant::now();
    let report = if args.eval_only {
        let (Some(student), Some(corpus)) = (args.student, args.corpus) else {
            return Err("--eval-only needs --student RUN_DIR and --corpus FILE".into());
        };
        eval_only(&student, &corpus, &o)?
    } else {
        run(&o)?
    };
    println!("\n{}", report.markdown());
    println!("({:.0} s in all)", start.elapsed().as_secs_f64());
    Ok(())
}
