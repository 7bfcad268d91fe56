//! Knowledge in a student's memory: write a text into it with every weight
//! frozen, list what was written, and forget it by its source.
//!
//! ```text
//! cargo run --release --example memory -- memorize --student runs/distill assets/data/kjv-genesis-deuteronomy.txt
//! cargo run --release --example memory -- sources --student runs/distill
//! cargo run --release --example memory -- forget --student runs/distill --source kjv-genesis-deuteronomy.txt
//! ```
//!
//! `memorize` tags every memory it inserts or changes with the source
//! (`source:<file>@<sha256 prefix>`), in the store, and keeps a ledger in
//! the run directory (`sources/`), from which `forget` deletes the
//! source's memories and puts back the values it changed
//! (`burn_dmt::continual` explains both).

use std::path::PathBuf;

use burn_dmt::continual::{Mechanism, MemorizeOptions, forget, memorize, sources};
use burn_dmt::device::{DeviceChoice, select};
use burn_dmt::memory::output::OutputParams;
use clap::{Parser, Subcommand};

mod spread;
mod study;

/// Write texts into a student's memory, list them, forget them.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write texts into the memory of a trained student, weights frozen.
    Memorize {
        /// The student's run directory (from distill_gpt2).
        #[arg(long, default_value = "runs/distill")]
        student: PathBuf,
        /// sparse (TF-IDF-selected rows' values), insert (new memories), both,
        /// or output (rows of the output memory at the LM head, kNN-LM).
        #[arg(long, default_value = "both")]
        mechanism: Mechanism,
        /// SGD steps per text (default: one pass over its tokens).
        #[arg(long)]
        steps: Option<usize>,
        /// Windows per step.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Tokens per window.
        #[arg(long, default_value_t = 64)]
        seq: usize,
        /// SGD learning rate of the memory values.
        #[arg(long, default_value_t = MemorizeOptions::default().lr)]
        lr: f32,
        /// Rows per memory layer the sparse mechanism trains.
        #[arg(long, default_value_t = MemorizeOptions::default().sparse_rows)]
        sparse_rows: usize,
        /// Slots added to each memory table for memorised memories (set once per run).
        #[arg(long, default_value_t = MemorizeOptions::default().room)]
        room: usize,
        /// Output memory: rows that vote per position.
        #[arg(long, default_value_t = OutputParams::default().k)]
        output_k: usize,
        /// Output memory: the weight of its distribution where it answers.
        #[arg(long, default_value_t = OutputParams::default().lambda)]
        output_lambda: f32,
        /// Output memory: the share of the training text's positions it may
        /// answer (sets its radius).
        #[arg(long, default_value_t = OutputParams::default().quantile)]
        output_quantile: f64,
        /// Device: auto, cpu or wgpu.
        #[arg(long, default_value = "cpu")]
        device: DeviceChoice,
        /// The texts (UTF-8), each its own source.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Remove what one source wrote (by its tag, or its file name).
    Forget {
        /// The student's run directory.
        #[arg(long, default_value = "runs/distill")]
        student: PathBuf,
        /// The source's tag (`source:<file>@<hash>`) or file name.
        #[arg(long)]
        source: String,
    },
    /// Measure learning against forgetting: memory-only memorising (each
    /// mechanism) against finetuning all weights or the last block, on
    /// the bundled KJV text; writes OUT/continual.md, continual.csv and
    /// continual.png (OUT: docs/results).
    Study(study::StudyArgs),
    /// The spread over seeds of several studies' results (one
    /// continual.csv per seed): mean ± sd of every method's changes and
    /// of the memory runs' shares of full finetuning's.
    Spread(spread::SpreadArgs),
    /// List the sources memorised in a run directory.
    Sources {
        /// The student's run directory.
        #[arg(long, default_value = "runs/distill")]
        student: PathBuf,
    },
}

#[path = "../common/alloc.rs"]
mod alloc;

#[path = "../common/progress.rs"]
mod progress;

#[path = "../common/stats.rs"]
mod stats;

fn main() {
    alloc::keep_freed_memory();
    progress::init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    match args.command {
        Command::Memorize {
            student,
            mechanism,
            steps,
            batch,
            seq,
            lr,
            sparse_rows,
            room,
            output_k,
            output_lambda,
            output_quantile,
            device,
            files,
        } => {
            let selected = select(device)?;
            let opts = {
                let mut o = MemorizeOptions::default();
                o.mechanism = mechanism;
                o.steps = steps;
                o.batch = batch;
                o.seq = seq;
                o.lr = lr;
                o.sparse_rows = sparse_rows;
                o.room = room;
                o.output = OutputParams {
                    k: output_k,
                    lambda: output_lambda,
                    quantile: output_quantile,
                    ..OutputParams::default()
                };
                o.device = selected.device;
                o
            };
            for r in memorize(&student, &files, &opts, None)? {
                println!(
                    "{}: cross-entropy on it {:.4} -> {:.4} nats; {} steps at {:.0} tokens/s",
                    r.source.tag, r.ce_before, r.ce_after, r.steps, r.tokens_per_s
                );
                for (block, inserted, changed) in r.layers {
                    if mechanism == Mechanism::Output {
                        println!("  output memory (store block {block}): {inserted} rows inserted");
                    } else {
                        println!("  block {block}: {inserted} memories inserted, {changed} older memories changed");
                    }
                }
            }
        }
        Command::Forget { student, source } => {
            let r = forget(&student, &source)?;
            println!(
                "forgot {source}: {} memories deleted, {} values restored exactly, {} values also changed by a \
                 later source (this source's change subtracted)",
                r.deleted, r.restored, r.overlapped
            );
        }
        Command::Study(a) => study::run(a)?,
        Command::Spread(a) => spread::run(a)?,
        Command::Sources { student } => {
            let all = sources(&student)?;
            if all.is_empty() {
                println!("no memorised sources in {}", student.display());
            }
            for l in all {
                let inserted: usize = l.layers.iter().map(|x| x.inserted).sum();
                let changed: usize = l.layers.iter().map(|x| x.changed.len()).sum();
                println!(
                    "{}  {} bytes, {} tokens, {} ({} steps){}: {inserted} memories inserted, {changed} older \
                     memories trainable",
                    l.source.tag,
                    l.source.bytes,
                    l.tokens,
                    l.mechanism.name(),
                    l.steps,
                    if l.complete { "" } else { ", interrupted" }
                );
            }
        }
    }
    Ok(())
}
