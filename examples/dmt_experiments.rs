//! The experiment suites of the memory student, each one command:
//!
//! ```text
//! cargo run --release --example dmt_experiments -- --suite quality            # writes runs/experiments/quality
//! cargo run --release --example dmt_experiments -- --suite quality --tuning   # and the tuning runs
//! cargo run --release --example dmt_experiments -- --suite quality --out DIR  # elsewhere
//! ```
//!
//! `quality` answers whether the memory student models language as well as
//! the dense teacher for fewer weights. Every model is distilled from the
//! bundled teacher with one recipe (corpus, steps, batch, sequence length,
//! learning-rate schedule, loss, seed) and evaluated on the same held-out
//! text:
//!
//! - the memory student (featural blocks 0–2 filled from the teacher,
//!   associative block 3 growing from empty, one table per head);
//! - the memory student with product keys (its featural blocks' tables
//!   are grids of n × n cells searched through 2·n sub-keys per head, at
//!   the same rows: `memory::product`);
//! - the key-value student (every block's MLP units as memory rows, the
//!   `--kv-k` most active summed per token); its trained weights are the
//!   attention-only model's plus the output biases, so (a) is also its (b),
//!   and its weights + memory floats are the teacher's, so (d) is its (c);
//! - (a) attention-only: the teacher without its MLPs, distilled;
//! - (b) dense, equal trained weights: the teacher with MLPs narrowed so its
//!   trained weights equal the memory student's;
//! - (c) dense, equal weights + memory floats: MLPs widened to the memory
//!   student's weights plus its memory tables' floats;
//! - (d) the teacher itself after the same steps;
//! - (e) the bigram floor (counts, absolute discounting);
//!
//! each over three seeds (mean ± standard deviation), then, on one seed,
//! the memory grown, bootstrapped and fixed at equal final rows, one table
//! shared by a layer's heads, product keys at 65,536 rows per layer, and
//! the capacity curve (256 to 16,384 rows per layer against dense students
//! of equal floats). `--tuning` adds, on one
//! seed, the key-value student at other `k` and without sparse value
//! updates, grown featural memories, and the memory student without sparse
//! value updates. It writes `results.md`, `results.csv` and the plots into
//! the output directory, each run in `runs/<name>`; an interrupted suite
//! continues where it stopped (finished runs are kept, an interrupted one
//! resumes from its checkpoint), and `--only NAME,…` runs only the named
//! runs.
//!
//! `feedback` measures layerwise feedback ([`burn_dmt::gpt2::Feedback`]):
//! the memory student and the dense student of equal trained weights (b),
//! each with and without feedback, over the seeds, with the same recipe;
//! each run is also evaluated at 32, 64 and 128 positions of context (the
//! teacher's limit is 128), and feedback runs report how far training's
//! two-pass approximation is from exact sequential inference. It writes
//! `results.md` and `results.csv` into `runs/experiments/feedback`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn_dmt::Gpt2Config;
use burn_dmt::distill::{DistillOptions, LayerUse, Report, recovered, run};
use burn_dmt::memory::layers::MemoryInit;
use burn_dmt::ngram::Bigram;
use burn_dmt::plot::{Chart, Series, charts};
use burn_dmt::tokenizer::TextCodec;
use burn_dmt::train::{Corpus, eval_batches};
use clap::Parser;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

/// Runs an experiment suite of the memory student.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The suite: quality or feedback.
    #[arg(long, default_value = "quality")]
    suite: String,
    /// Output directory (default runs/experiments/SUITE).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seeds of the runs repeated per seed.
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 2, 3])]
    seeds: Vec<u64>,
    /// Optimiser steps of every run (the main job's recipe: 300).
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Memory rows per layer of the capacity curve.
    #[arg(long, value_delimiter = ',', default_values_t = [256usize, 1024, 4096, 16384])]
    capacities: Vec<usize>,
    /// Held-out windows evaluated per run.
    #[arg(long, default_value_t = 128)]
    eval_windows: usize,
    /// Rows each key-value memory sums per token in the key-value student's
    /// seeded runs.
    #[arg(long, default_value_t = 128)]
    kv_k: usize,
    /// Also run the tuning runs (one seed each): other k, no sparse value
    /// updates, grown featural memories.
    #[arg(long)]
    tuning: bool,
    /// Run only these runs (by name); the results cover every finished run.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Runs trained at once, each in its own process (about one core each).
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()))]
    jobs: usize,
    /// Internal: run the selected runs in this process, step lines on stdout.
    #[arg(long, hide = true)]
    worker: bool,
}

/// What one finished run contributes to the results (`result.json` in its
/// directory).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Outcome {
    name: String,
    model: String,
    /// `seeded` (the comparison over seeds), `variant`, `capacity` or
    /// `tuning`.
    group: String,
    seed: u64,
    nll: f64,
    kl: f64,
    agreement: f64,
    teacher_nll: f64,
    weights: usize,
    memory_floats: usize,
    memory_rows: usize,
    ff_macs: u64,
    /// Final rows per memory block.
    rows: Vec<usize>,
    /// (block, share retrieved, CE zeroed, CE shuffled).
    memory_use: Vec<(usize, f64, f64, f64)>,
    seconds: f64,
    train_tokens_per_s: f64,
    /// Multiply-adds per token of the whole model (feed-forward layers,
    /// attention, LM head and feedback).
    #[serde(default)]
    macs: u64,
    /// With layerwise feedback: KL(exact ‖ training approximation) per
    /// held-out position.
    #[serde(default)]
    feedback_mismatch: Option<f64>,
    /// Held-out CE at other context lengths: (positions, CE).
    #[serde(default)]
    contexts: Vec<(usize, f64)>,
    /// With layerwise feedback: held-out CE of the teacher-forced two-pass
    /// approximation training uses (the exact figure is `nll`).
    #[serde(default)]
    approx_nll: Option<f64>,
}

/// One invocation of the suite that trained runs (a line of
/// `invocations.jsonl` in the output directory).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Invocation {
    commit: String,
    /// Runs trained at once.
    jobs: usize,
    tuning: bool,
    /// The runs it trained (or finished, when resumed).
    trained: Vec<String>,
    minutes: f64,
}

/// The checked-out commit, `unknown` outside a git work tree.
fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or("unknown".into(), |o| {
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        })
}

/// A change to a run's options.
type Tweak<'a> = dyn Fn(&mut DistillOptions) + 'a;

/// One training run of the suite.
struct Job {
    name: String,
    model: String,
    group: &'static str,
    seed: u64,
    opts: DistillOptions,
    /// Context lengths to evaluate the trained run at besides its own.
    contexts: Vec<usize>,
}

#[path = "common/alloc.rs"]
mod alloc;

#[path = "common/stats.rs"]
mod stats;
use stats::mean_sd;

fn main() {
    alloc::keep_freed_memory();
    if let Err(e) = run_main() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Hidden width of a dense student whose trained (non-embedding) weights
/// are `target`, given the attention-only model's `base` weights: each of
/// `n` MLPs of width `w` over `c` features has `2·c·w + w + c`.
fn width_for(target: usize, base: usize, n: usize, c: usize) -> usize {
    let per = n * (2 * c + 1);
    (target.saturating_sub(base + n * c) as f64 / per as f64)
        .round()
        .max(1.0) as usize
}

fn run_main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.suite != "quality" && args.suite != "feedback" {
        return Err(format!("unknown suite {:?} (known: quality, feedback)", args.suite).into());
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs/experiments").join(&args.suite));
    std::fs::create_dir_all(out.join("runs"))?;
    let mut base = DistillOptions::embedded(&root);
    base.steps = args.steps;
    base.eval_windows = args.eval_windows;
    base.attention_baseline = false;
    base.checkpoint_every = 50;
    base.log_every = 10;
    let config = Gpt2Config::from_file(&base.teacher.join("config.json"))?;
    let (n, c, h) = (config.n_layer, config.n_embd, config.n_head);
    let dh = c / h;
    let plan = burn_dmt::distill::default_layers(n);
    let kinds = burn_dmt::memory::layers::parse_layers(&plan, n)?;
    let memory_blocks = kinds
        .iter()
        .filter(|k| !matches!(k, burn_dmt::memory::layers::LayerKind::Mlp))
        .count();
    // Weights of the attention-only model and of the memory student (the
    // layers' projections: featural 2, associative 4, each c·c + c, and a
    // temperature or scale).
    let d_ff = config.d_ff();
    let teacher_weights = burn_dmt::accounting::Accounting::of(&burn_dmt::Gpt2::from_pretrained(
        &base.teacher,
        &burn_dmt::burn::tensor::Device::flex(),
    )?)
    .weights;
    let attention_weights = teacher_weights - n * (2 * c * d_ff + d_ff + c);
    let memory_weights: usize = kinds
        .iter()
        .map(|k| match k {
            burn_dmt::memory::layers::LayerKind::Featural | burn_dmt::memory::layers::LayerKind::Product => {
                2 * (c * c + c) + 1
            }
            burn_dmt::memory::layers::LayerKind::Associative => 4 * (c * c + c) + 1,
            _ => 0,
        })
        .sum();
    let student_weights = attention_weights + memory_weights;
    let floats_at = |rows: usize| memory_blocks * rows * 2 * dh;

    let mut jobs: Vec<Job> = Vec::new();
    let job = |group: &'static str, model: &str, name: String, seed: u64, f: &Tweak<'_>| {
        let mut o = base.clone();
        o.seed = seed;
        o.run_dir = out.join("runs").join(&name);
        f(&mut o);
        Job {
            name,
            model: model.to_string(),
            group,
            seed,
            opts: o,
            contexts: Vec::new(),
        }
    };
    let w_b = width_for(student_weights, attention_weights, n, c);
    let w_c = width_for(student_weights + floats_at(base.capacity), attention_weights, n, c);
    // Layerwise feedback's weights: a projection and a LayerNorm per block.
    let w_f = width_for(student_weights + n * (c * c + 3 * c), attention_weights, n, c);
    if args.suite == "feedback" {
        let contexts: Vec<usize> = [32, 64, 128].into_iter().filter(|&t| t <= config.n_positions).collect();
        for &seed in &args.seeds {
            for (model, name, f, width) in [
                ("memory", format!("memory-s{seed}"), None, None),
                ("memory + feedback", format!("memory-feedback-s{seed}"), Some(2), None),
                ("dense, equal weights", format!("dense-w{w_b}-s{seed}"), None, Some(w_b)),
                (
                    "dense, equal weights + feedback",
                    format!("dense-w{w_b}-feedback-s{seed}"),
                    Some(2),
                    Some(w_b),
                ),
                (
                    "dense, the weights of dense + feedback",
                    format!("dense-w{w_f}-s{seed}"),
                    None,
                    Some(w_f),
                ),
            ] {
                let mut j = job("seeded", model, name, seed, &|o| {
                    o.feedback = f;
                    if width.is_some() {
                        o.layers = Some(String::new());
                        o.mlp_width = width;
                    }
                });
                j.contexts = contexts.clone();
                jobs.push(j);
            }
        }
        // More passes bring training closer to exact inference.
        for &seed in &args.seeds {
            let mut j = job(
                "seeded",
                "memory + feedback, 3 training passes",
                format!("memory-feedback3-s{seed}"),
                seed,
                &|o| o.feedback = Some(3),
            );
            j.contexts = contexts.clone();
            jobs.push(j);
        }
    }
    let s1 = args.seeds.first().copied().unwrap_or(1);
    if args.suite == "quality" {
        // The key-value student: every block's MLP units as memory rows; its
        // trained weights are the attention-only model's plus the n·c output
        // biases (fewer than any dense MLP of width ≥ 1 adds, so its baseline
        // (b) is the attention-only model), its weights + memory floats the
        // teacher's (so its (c) is the teacher after the same steps).
        let kv_plan = format!("0-{}:keyvalue", n - 1);
        // The memory student with product keys in its featural blocks, at
        // the same rows (exact with respect to the grid's own scoring).
        let product_plan = plan.replace("featural", "product");
        for &seed in &args.seeds {
            jobs.push(job(
                "seeded",
                "key-value memory",
                format!("kv-k{}-s{seed}", args.kv_k),
                seed,
                &|o| {
                    o.layers = Some(kv_plan.clone());
                    o.capacity = d_ff;
                    o.kv_k = args.kv_k;
                },
            ));
            jobs.push(job("seeded", "memory", format!("memory-s{seed}"), seed, &|_| {}));
            jobs.push(job(
                "seeded",
                "memory, product keys",
                format!("product-s{seed}"),
                seed,
                &|o| {
                    o.layers = Some(product_plan.clone());
                },
            ));
            jobs.push(job(
                "seeded",
                "attention-only",
                format!("attention-s{seed}"),
                seed,
                &|o| {
                    o.layers = Some(format!("0-{}:none", n - 1));
                },
            ));
            jobs.push(job(
                "seeded",
                "dense, equal weights",
                format!("dense-w{w_b}-s{seed}"),
                seed,
                &|o| {
                    o.layers = Some(String::new());
                    o.mlp_width = Some(w_b);
                },
            ));
            jobs.push(job(
                "seeded",
                "dense, equal weights + memory",
                format!("dense-w{w_c}-s{seed}"),
                seed,
                &|o| {
                    o.layers = Some(String::new());
                    o.mlp_width = Some(w_c);
                },
            ));
            jobs.push(job(
                "seeded",
                "teacher, same extra steps",
                format!("teacher-s{seed}"),
                seed,
                &|o| {
                    o.layers = Some(String::new());
                },
            ));
        }
        // Growth against bootstrapped and fixed memories at equal final rows, and
        // per-head against shared tables.
        let variants: [(&str, &str, &Tweak<'_>); 4] = [
            (
                "memory: associative bootstrapped from the teacher",
                "assoc-teacher",
                &|o| {
                    o.associative_init = MemoryInit::Teacher;
                },
            ),
            (
                "memory: fixed (bootstrapped, no inserts, no value updates)",
                "fixed",
                &|o| {
                    o.associative_init = MemoryInit::Teacher;
                    o.max_inserts = 0;
                    o.value_lr = 0.0;
                },
            ),
            ("memory: one table shared by the heads", "shared-heads", &|o| {
                o.shared_heads = true;
            }),
            ("memory, product keys: 65,536 rows per layer", "product-65536", &|o| {
                o.layers = Some(product_plan.clone());
                o.capacity = 65_536;
            }),
        ];
        for (model, name, f) in variants {
            jobs.push(job("variant", model, format!("{name}-s{s1}"), s1, f));
        }
        if args.tuning {
            let kv = |o: &mut DistillOptions, k: usize| {
                o.layers = Some(kv_plan.clone());
                o.capacity = d_ff;
                o.kv_k = k;
            };
            for k in [16, 32, 64, 128, 256]
                .into_iter()
                .filter(|&k| k != args.kv_k && k <= d_ff)
            {
                jobs.push(job(
                    "tuning",
                    &format!("key-value memory: k {k}"),
                    format!("kv-k{k}-s{s1}"),
                    s1,
                    &|o| kv(o, k),
                ));
            }
            let tuning: [(&str, &str, &Tweak<'_>); 3] = [
                ("key-value memory: no sparse value updates", "kv-value-lr0", &|o| {
                    kv(o, args.kv_k);
                    o.value_lr = 0.0;
                }),
                ("memory: featural grown too", "featural-grown", &|o| {
                    o.featural_init = MemoryInit::Empty;
                }),
                ("memory: no sparse value updates", "value-lr0", &|o| {
                    o.value_lr = 0.0;
                }),
            ];
            for (model, name, f) in tuning {
                jobs.push(job("tuning", model, format!("{name}-s{s1}"), s1, f));
            }
        }
        for &rows in &args.capacities {
            if rows != base.capacity {
                jobs.push(job("capacity", "memory", format!("memory-cap{rows}-s{s1}"), s1, &|o| {
                    o.capacity = rows
                }));
            }
            let w = width_for(student_weights + floats_at(rows), attention_weights, n, c);
            if w != w_c {
                jobs.push(job(
                    "capacity",
                    "dense, equal weights + memory",
                    format!("dense-w{w}-s{s1}"),
                    s1,
                    &|o| {
                        o.layers = Some(String::new());
                        o.mlp_width = Some(w);
                    },
                ));
            }
        }
    }

    if let Some(unknown) = args.only.iter().find(|n| !jobs.iter().any(|j| &j.name == *n)) {
        return Err(format!("--only: no run named {unknown:?} in this suite").into());
    }
    let started = Instant::now();
    let pending: Vec<&Job> = jobs
        .iter()
        .filter(|j| !j.opts.run_dir.join("result.json").exists())
        .filter(|j| args.only.is_empty() || args.only.contains(&j.name))
        .collect();
    if args.worker {
        // A child of the suite: its runs, their events on stdout, one per
        // line (the parent reads the `step=` and `steps=` fields).
        tracing_subscriber::fmt()
            .without_time()
            .with_target(false)
            .with_level(false)
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,burn_dmt::distill=debug"))
            .with_writer(std::io::stdout)
            .init();
        for j in pending {
            run_job(j)?;
        }
        return Ok(());
    }
    run_pending(&args, &out, &pending, jobs.len() - pending.len())?;
    // Finished runs that lack an evaluation this suite now asks for.
    for j in &jobs {
        let path = j.opts.run_dir.join("result.json");
        if !path.exists() {
            continue;
        }
        let mut o: Outcome = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let lacking = (o.contexts.len() < j.contexts.len()) || (j.opts.feedback.is_some() && o.approx_nll.is_none());
        if lacking {
            eprintln!(
                "{}: evaluating at other context lengths and with the training approximation",
                j.name
            );
            (o.contexts, o.approx_nll) = extra_evaluations(&j.opts, &j.contexts)?;
            std::fs::write(&path, serde_json::to_string_pretty(&o)?)?;
        }
    }
    let outcomes = jobs
        .iter()
        .map(|j| j.opts.run_dir.join("result.json"))
        .filter(|r| r.exists())
        .map(|r| Ok(serde_json::from_str::<Outcome>(&std::fs::read_to_string(r)?)?))
        .collect::<Result<Vec<Outcome>, Box<dyn std::error::Error>>>()?;
    let log = out.join("invocations.jsonl");
    if !pending.is_empty() {
        let this = Invocation {
            commit: commit(),
            jobs: args.jobs,
            tuning: args.tuning,
            trained: pending.iter().map(|j| j.name.clone()).collect(),
            minutes: started.elapsed().as_secs_f64() / 60.0,
        };
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        std::io::Write::write_all(&mut f, format!("{}\n", serde_json::to_string(&this)?).as_bytes())?;
    }
    let invocations = match std::fs::read_to_string(&log) {
        Ok(text) => text
            .lines()
            .map(serde_json::from_str::<Invocation>)
            .collect::<Result<Vec<_>, _>>()?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let bigram = bigram_floor(&base)?;
    let md = if args.suite == "feedback" {
        feedback_markdown(&args, &out, &outcomes, &invocations, (w_b, w_f))
    } else {
        results_markdown(&args, &out, &outcomes, bigram, &invocations, (w_b, w_c))?
    };
    std::fs::write(out.join("results.md"), &md)?;
    std::fs::write(out.join("results.csv"), results_csv(&outcomes))?;
    for f in ["memory.png", "loss.png"] {
        let from = out.join("runs").join(format!("memory-s{s1}")).join(f);
        if from.exists() {
            std::fs::copy(&from, out.join(f))?;
        }
    }
    println!("{md}");
    println!("wrote {}", out.display());
    Ok(())
}

/// Trains one job (resuming from its checkpoint if it has one) and writes
/// its `result.json`.
fn run_job(j: &Job) -> Result<Outcome, Box<dyn std::error::Error>> {
    let mut o = j.opts.clone();
    if o.run_dir.join("checkpoint.json").exists() {
        o.resume = true;
    } else if o.run_dir.exists() {
        std::fs::remove_dir_all(&o.run_dir)?;
    }
    let t0 = Instant::now();
    let report = run(&o)?;
    let mut outcome = outcome(j, &report, t0.elapsed().as_secs_f64());
    (outcome.contexts, outcome.approx_nll) = extra_evaluations(&o, &j.contexts)?;
    std::fs::write(
        j.opts.run_dir.join("result.json"),
        serde_json::to_string_pretty(&outcome)?,
    )?;
    Ok(outcome)
}

/// Runs `pending`, `args.jobs` at a time, each in a child process of this
/// program (a training run uses about one core, and separate processes
/// share no allocator or page tables), with a bar per running job.
fn run_pending(args: &Args, out: &Path, pending: &[&Job], done: usize) -> Result<(), Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let total = done + pending.len();
    let bars = MultiProgress::new();
    let all = bars.add(ProgressBar::new(total as u64));
    all.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} runs, {elapsed}")?.progress_chars("=> "),
    );
    all.set_prefix(format!("suite {}", args.suite));
    all.set_position(done as u64);
    let step_style =
        ProgressStyle::with_template("{prefix:>28} [{bar:30}] step {pos}/{len} {msg}")?.progress_chars("=> ");
    let mut queue = pending.iter();
    let mut running: Vec<(&Job, std::process::Child, ProgressBar, std::thread::JoinHandle<()>)> = Vec::new();
    let mut failed = Vec::new();
    loop {
        while running.len() < args.jobs.max(1)
            && let Some(j) = queue.next()
        {
            let seeds: Vec<String> = args.seeds.iter().map(u64::to_string).collect();
            let capacities: Vec<String> = args.capacities.iter().map(usize::to_string).collect();
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("--suite")
                .arg(&args.suite)
                .arg("--out")
                .arg(out)
                .arg("--seeds")
                .arg(seeds.join(","))
                .arg("--steps")
                .arg(args.steps.to_string())
                .arg("--capacities")
                .arg(capacities.join(","))
                .arg("--eval-windows")
                .arg(args.eval_windows.to_string())
                .arg("--kv-k")
                .arg(args.kv_k.to_string())
                .arg("--only")
                .arg(&j.name)
                .arg("--worker")
                .stdout(std::process::Stdio::piped());
            if args.tuning {
                cmd.arg("--tuning");
            }
            let mut child = cmd.spawn()?;
            let bar = bars.add(ProgressBar::new(args.steps as u64));
            bar.set_style(step_style.clone());
            bar.set_prefix(j.name.clone());
            let lines = child.stdout.take().ok_or("a worker without stdout")?;
            let b = bar.clone();
            let reader = std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(lines).lines().map_while(Result::ok) {
                    // A progress event: `MESSAGE step=N steps=M`.
                    let field = |name: &str| {
                        line.split_whitespace()
                            .find_map(|w| w.strip_prefix(name)?.parse::<u64>().ok())
                    };
                    if let Some(done) = field("step=") {
                        b.set_position(done);
                        if let Some((message, _)) = line.split_once(" step=")
                            && !message.is_empty()
                        {
                            b.set_message(message.split("  ").next().unwrap_or("").to_string());
                        }
                    }
                }
            });
            running.push((j, child, bar, reader));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        let mut i = 0;
        while i < running.len() {
            let Some(status) = running[i].1.try_wait()? else {
                i += 1;
                continue;
            };
            let (j, _, bar, reader) = running.remove(i);
            // The reader ends with the child's stdout.
            let _ = reader.join();
            bars.remove(&bar);
            all.inc(1);
            let result = j.opts.run_dir.join("result.json");
            match (status.success(), result.exists()) {
                (true, true) => {
                    let o: Outcome = serde_json::from_str(&std::fs::read_to_string(&result)?)?;
                    // A line per run, for logs (the bars draw only on a terminal).
                    let position = all.position();
                    bars.suspend(|| {
                        eprintln!(
                            "[{position}/{total}] {}: held-out CE {:.4} ({:.1} min; {:.0} min since the start)",
                            j.name,
                            o.nll,
                            o.seconds / 60.0,
                            started.elapsed().as_secs_f64() / 60.0
                        )
                    });
                }
                _ => failed.push(format!("{} ({status})", j.name)),
            }
        }
    }
    all.finish();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "runs failed: {}; run the command again to retry them",
            failed.join(", ")
        )
        .into())
    }
}

fn outcome(j: &Job, r: &Report, seconds: f64) -> Outcome {
    let cost = &r.student_cost;
    Outcome {
        name: j.name.clone(),
        model: j.model.clone(),
        group: j.group.to_string(),
        seed: j.seed,
        nll: r.student.nll,
        kl: r.student.kl.unwrap_or(f64::NAN),
        agreement: r.student.agreement.unwrap_or(f64::NAN),
        teacher_nll: r.teacher.nll,
        weights: cost.weights,
        memory_floats: cost.memory_floats(),
        memory_rows: cost.layers.iter().map(|l| l.memory_rows).sum(),
        ff_macs: cost.ff_macs_per_token(),
        rows: r.memory_rows().into_iter().flatten().collect(),
        memory_use: r
            .memory_use
            .iter()
            .map(|u: &LayerUse| (u.block, u.retrieved, u.nll_zeroed, u.nll_shuffled))
            .collect(),
        seconds,
        train_tokens_per_s: r.train_tokens_per_s.unwrap_or(f64::NAN),
        macs: cost.ff_macs_per_token() + cost.shared_macs_per_token,
        feedback_mismatch: r.feedback_mismatch,
        contexts: Vec::new(),
        approx_nll: None,
    }
}

/// CE at other context lengths (positions, CE) and of training's
/// approximation of layerwise feedback.
type Extra = (Vec<(usize, f64)>, Option<f64>);

/// The trained student of `o.run_dir` on the held-out text (the corpus's
/// last 10%): its CE in windows of each of `lengths` positions, and, with
/// layerwise feedback, the CE of training's teacher-forced approximation
/// in the run's own windows.
fn extra_evaluations(o: &DistillOptions, lengths: &[usize]) -> Result<Extra, Box<dyn std::error::Error>> {
    if lengths.is_empty() && o.feedback.is_none() {
        return Ok((Vec::new(), None));
    }
    let rt = tokio::runtime::Runtime::new()?;
    let (_, student) = burn_dmt::distill::load_student(&o.run_dir, &o.device.clone().autodiff(), &rt)?;
    let codec = TextCodec::for_model(&o.teacher, None)?;
    let corpus = Corpus::split(codec.encode(&std::fs::read_to_string(&o.corpus)?)?, 0.1);
    let mut out = Vec::with_capacity(lengths.len());
    for &t in lengths {
        let eval = eval_batches(&corpus.eval, o.batch, t, o.eval_windows);
        out.push((t, burn_dmt::train::evaluate(&student, None, &eval)?.nll));
    }
    let approx = match o.feedback {
        Some(_) => {
            let model = burn_dmt::train::untracked(&student);
            let device = model.device();
            let (mut nll, mut n) = (0.0, 0usize);
            for b in eval_batches(&corpus.eval, o.batch, o.seq, o.eval_windows) {
                let logits = model.forward_train(b.inputs(&device))?.detach();
                let ce = burn_dmt::train::cross_entropy(logits, b.targets(&device));
                nll += burn_dmt::train::value(ce)? * (b.b * b.t) as f64;
                n += b.b * b.t;
            }
            Some(nll / n.max(1) as f64)
        }
        None => None,
    };
    Ok((out, approx))
}

/// The feedback suite's results: each model with and without layerwise
/// feedback over the seeds.
fn feedback_markdown(
    args: &Args,
    out: &Path,
    outcomes: &[Outcome],
    invocations: &[Invocation],
    (w_b, w_f): (usize, usize),
) -> String {
    let seeds: Vec<String> = args.seeds.iter().map(u64::to_string).collect();
    let runs = |model: &str| -> Vec<&Outcome> { outcomes.iter().filter(|o| o.model == model).collect() };
    let mut s = format!(
        "# Layerwise feedback\n\n\
         Command: `cargo run --release --example dmt_experiments -- --suite feedback --seeds {} --steps {}` (output \
         `{}`), results written at commit `{}` on this machine ({} cores); invocations: {}.\n\n\
         Each model is distilled from the bundled teacher with the main job's recipe ({} steps of 16 × 64 tokens of \
         tiny-shakespeare, seeds {}), with and without layerwise feedback (block i's input at position t gains a \
         learned projection of block i + 1's layer-normalised output at t − 1, gradient stopped; trained with two \
         teacher-forced parallel passes, or three where the row says so, and evaluated exactly, position by \
         position). Held-out text: the last 10% ({} windows). \
         CE in nats per token, ± the standard deviation over seeds. The dense student has MLPs of width {w_b}, its \
         trained weights equal to the memory student's; feedback adds a projection and a LayerNorm per block, so \
         the dense student of width {w_f} has the trained weights of the dense student with feedback.\n\n\
         | model | runs | held-out CE | KL(teacher ‖ model) | top-1 agreement | CE of training's approximation | \
         KL(exact ‖ approximation) | weights + memory floats | multiply-adds per token | training tokens/s |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        seeds.join(","),
        args.steps,
        out.display(),
        commit(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        invocations
            .iter()
            .map(|i| format!(
                "`{}` ({} runs at once, {} trained, {:.0} min)",
                i.commit,
                i.jobs,
                i.trained.len(),
                i.minutes
            ))
            .collect::<Vec<_>>()
            .join("; "),
        args.steps,
        seeds.join(", "),
        args.eval_windows,
    );
    let models = [
        "memory",
        "memory + feedback",
        "dense, equal weights",
        "dense, equal weights + feedback",
        "dense, the weights of dense + feedback",
    ];
    for model in models.into_iter().chain(["memory + feedback, 3 training passes"]) {
        let r = runs(model);
        let Some(o) = r.first() else { continue };
        let col = |f: &dyn Fn(&Outcome) -> f64| r.iter().map(|o| f(o)).collect::<Vec<f64>>();
        let mismatch: Vec<f64> = r.iter().filter_map(|o| o.feedback_mismatch).collect();
        let approx: Vec<f64> = r.iter().filter_map(|o| o.approx_nll).collect();
        let or_dash = |v: &[f64]| if v.is_empty() { "—".to_string() } else { pm(v, 4) };
        s += &format!(
            "| {model} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.len(),
            pm(&col(&|o| o.nll), 4),
            pm(&col(&|o| o.kl), 4),
            pm(&col(&|o| 100.0 * o.agreement), 1),
            or_dash(&approx),
            or_dash(&mismatch),
            o.weights + o.memory_floats,
            o.macs,
            pm(&col(&|o| o.train_tokens_per_s), 0),
        );
    }
    s += "\n## Feedback's effect, per seed\n\nCE with feedback minus CE without, same seed (negative: feedback helps); the last rows compare the dense student with feedback to the dense student of its trained weights without. The students and the teacher were trained on windows of 64 positions: at 128, positions 64–127 have position embeddings no training step has used.\n\n\
          | model | context | Δ CE per seed | mean ± sd |\n| --- | --- | --- | --- |\n";
    for (label, base, fed) in [
        ("memory", models[0], models[1]),
        ("dense, equal weights", models[2], models[3]),
        ("dense against dense of its weights", models[4], models[3]),
        (
            "memory, 3 training passes",
            models[0],
            "memory + feedback, 3 training passes",
        ),
    ] {
        let lengths: Vec<usize> = runs(base)
            .first()
            .map(|o| o.contexts.iter().map(|c| c.0).collect())
            .unwrap_or_default();
        for t in lengths {
            let at = |o: &Outcome| o.contexts.iter().find(|c| c.0 == t).map(|c| c.1);
            let deltas: Vec<f64> = args
                .seeds
                .iter()
                .filter_map(|&seed| {
                    let b = runs(base).into_iter().find(|o| o.seed == seed).and_then(at)?;
                    let f = runs(fed).into_iter().find(|o| o.seed == seed).and_then(at)?;
                    Some(f - b)
                })
                .collect();
            if deltas.is_empty() {
                continue;
            }
            s += &format!(
                "| {label} | {t} | {} | {} |\n",
                deltas.iter().map(|d| format!("{d:+.4}")).collect::<Vec<_>>().join(", "),
                pm(&deltas, 4)
            );
        }
    }
    s
}

/// The bigram floor's held-out cross-entropy, on the held-out windows every
/// run is evaluated on.
fn bigram_floor(o: &DistillOptions) -> Result<f64, Box<dyn std::error::Error>> {
    let codec = TextCodec::for_model(&o.teacher, None)?;
    let tokens = codec.encode(&std::fs::read_to_string(&o.corpus)?)?;
    let corpus = Corpus::split(tokens, 0.1);
    let config = Gpt2Config::from_file(&o.teacher.join("config.json"))?;
    let eval = eval_batches(&corpus.eval, o.batch, o.seq.min(config.n_positions), o.eval_windows);
    Ok(Bigram::fit(&corpus.train, config.vocab_size)?.cross_entropy(&eval)?)
}

fn pm(xs: &[f64], digits: usize) -> String {
    let (m, s) = mean_sd(xs);
    if xs.len() > 1 {
        format!("{m:.digits$} ± {s:.digits$}")
    } else {
        format!("{m:.digits$}")
    }
}

fn results_markdown(
    args: &Args,
    out: &Path,
    outcomes: &[Outcome],
    bigram: f64,
    invocations: &[Invocation],
    (w_b, w_c): (usize, usize),
) -> Result<String, Box<dyn std::error::Error>> {
    let commit = commit();
    let seeds: Vec<String> = args.seeds.iter().map(u64::to_string).collect();
    let by_model = |model: &str| -> Vec<&Outcome> {
        outcomes
            .iter()
            .filter(|o| o.group == "seeded" && o.model == model)
            .collect()
    };
    let s1 = args.seeds.first().copied().unwrap_or(1);
    let teacher_nll = outcomes.first().map_or(f64::NAN, |o| o.teacher_nll);
    let teacher_weights = by_model("teacher, same extra steps").first().map_or(0, |o| o.weights);
    let minutes = |tuning: bool| {
        outcomes
            .iter()
            .filter(|o| (o.group == "tuning") == tuning)
            .map(|o| o.seconds)
            .sum::<f64>()
            / 60.0
    };
    let mut s = format!(
        "# Quality of the memory student\n\n\
         Command: `cargo run --release --example dmt_experiments -- --suite {} --seeds {} --steps {} --kv-k {}{}` \
         (output `{}`), results written at commit `{commit}` on this machine ({} cores). Each run's own wall \
         time (training and evaluation, in its `result.json`) sums to {:.0} minutes over the suite's runs{}; \
         the invocations that trained them:\n\n\
         | commit | runs at once | runs trained | wall time |\n| --- | --- | --- | --- |\n{}\n\
         Every model is distilled from the bundled teacher (`assets/teacher`, 4 × 128) on tiny-shakespeare with \
         the main job's recipe: {} steps of 16 × 64 tokens, AdamW at 2e-3 with warm-up and cosine decay, \
         α·T²·KL + (1 − α)·CE with T = 2 and α = 0.5, and evaluated on the last 10% of the text \
         ({} windows of 64 tokens). Seeds {} set the batches and new weights. Cross-entropy (CE) in nats per \
         token; ± is the standard deviation over seeds.\n\n",
        args.suite,
        seeds.join(","),
        args.steps,
        args.kv_k,
        if args.tuning { " --tuning" } else { "" },
        out.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        minutes(false),
        if args.tuning {
            format!(" and {:.0} over the tuning runs", minutes(true))
        } else {
            String::new()
        },
        invocations
            .iter()
            .map(|i| format!(
                "| `{}` | {} | {}{} | {:.0} min |\n",
                i.commit,
                i.jobs,
                i.trained.len(),
                if i.tuning { " (with --tuning)" } else { "" },
                i.minutes
            ))
            .collect::<String>(),
        args.steps,
        args.eval_windows,
        seeds.join(", ")
    );
    let a_nll: BTreeMap<u64, f64> = by_model("attention-only").iter().map(|o| (o.seed, o.nll)).collect();
    let rec = |o: &Outcome| a_nll.get(&o.seed).map(|&a| recovered(a, o.nll, teacher_nll));
    s += "## Models\n\n| model | runs | held-out CE | perplexity | KL(teacher ‖ model) | top-1 agreement | recovered (of the teacher's advantage over attention-only) | non-embedding weights | memory floats | weights + memory / teacher's weights | feed-forward multiply-adds per token |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    s += &format!(
        "| teacher (not retrained) | — | {teacher_nll:.4} | {:.2} | — | — | 100% | {teacher_weights} | 0 | 100.0% | — |\n",
        teacher_nll.exp()
    );
    for model in [
        "memory",
        "memory, product keys",
        "key-value memory",
        "attention-only",
        "dense, equal weights",
        "dense, equal weights + memory",
        "teacher, same extra steps",
    ] {
        let runs = by_model(model);
        if runs.is_empty() {
            continue;
        }
        let col = |f: &dyn Fn(&Outcome) -> f64| runs.iter().map(|o| f(o)).collect::<Vec<f64>>();
        let recs: Vec<f64> = runs.iter().filter_map(|o| rec(o)).collect();
        let o = runs[0];
        s += &format!(
            "| {model}{} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1}% | {} |\n",
            match model {
                "dense, equal weights" => format!(" (MLP width {w_b})"),
                "dense, equal weights + memory" => format!(" (MLP width {w_c})"),
                _ => String::new(),
            },
            runs.len(),
            pm(&col(&|o| o.nll), 4),
            pm(&col(&|o| o.nll.exp()), 2),
            pm(&col(&|o| o.kl), 4),
            pm(&col(&|o| 100.0 * o.agreement), 1),
            if recs.is_empty() {
                "—".into()
            } else {
                format!("{}%", pm(&recs.iter().map(|r| 100.0 * r).collect::<Vec<_>>(), 1))
            },
            o.weights,
            o.memory_floats,
            100.0 * (o.weights + o.memory_floats) as f64 / teacher_weights.max(1) as f64,
            o.ff_macs
        );
    }
    s += &format!(
        "| bigram, absolute discounting (e) | — | {bigram:.4} | {:.2} | — | — | {} | — | — | — | — |\n\n",
        bigram.exp(),
        a_nll.values().next().map_or("—".into(), |&a| format!(
            "{:.1}%",
            100.0 * recovered(a, bigram, teacher_nll)
        ))
    );
    // The goal, for each memory design.
    let nll = |v: &[&Outcome]| v.iter().map(|o| o.nll).collect::<Vec<f64>>();
    s += "## The goal\n\nWith trained weights ≤ 60% of the teacher's non-embedding weights, recover ≥ 90% of the \
          teacher's advantage over the trained attention-only baseline and beat the dense student of equal trained \
          weights (b) by more than two standard deviations; whether it matches the dense student of equal weights + \
          memory floats (c) is reported either way. \"Standard deviations\" here: the larger of the two models' \
          standard deviations over seeds.\n\n";
    for (design, b_model, c_model) in [
        ("memory", "dense, equal weights", "dense, equal weights + memory"),
        ("key-value memory", "attention-only", "teacher, same extra steps"),
    ] {
        let mem = by_model(design);
        let Some(first) = mem.first() else { continue };
        let (ms, ss) = mean_sd(&nll(&mem));
        let recs: Vec<f64> = mem.iter().filter_map(|o| rec(o)).collect();
        let (rm, rs) = mean_sd(&recs);
        let share = 100.0 * first.weights as f64 / teacher_weights.max(1) as f64;
        s += &format!(
            "**{design}** (CE {ms:.4} ± {ss:.4}):\n\n- trained weights {share:.1}% of the teacher's (≤ 60%: {});\n\
             - recovered {:.1}% ± {:.1}% (≥ 90%: {});\n",
            if share <= 60.0 { "met" } else { "not met" },
            100.0 * rm,
            100.0 * rs,
            if rm >= 0.9 { "met" } else { "not met" }
        );
        for (label, model) in [
            ("(b) equal trained weights", b_model),
            ("(c) equal weights + memory floats", c_model),
        ] {
            let runs = by_model(model);
            if runs.is_empty() {
                continue;
            }
            let (bm, bs) = mean_sd(&nll(&runs));
            let sd = ss.max(bs);
            let gap = bm - ms;
            s += &format!(
                "- against {label}, {model}: CE {bm:.4} ± {bs:.4}; the memory student is {} by {:.4} nats ({}){};\n",
                if gap > 0.0 { "better" } else { "worse" },
                gap.abs(),
                if sd > 0.0 {
                    format!("{:.1} sd", gap.abs() / sd)
                } else {
                    "no spread".into()
                },
                if label.starts_with("(b)") {
                    if gap > 2.0 * sd {
                        "; better by more than two sd: met"
                    } else {
                        "; better by more than two sd: not met"
                    }
                } else {
                    ""
                }
            );
        }
        s += "\n";
    }
    // Variants at one seed.
    s += &format!("\n## What was tried (seed {s1})\n\n");
    s += "| run | held-out CE | KL(teacher ‖ model) | top-1 agreement | recovered | final rows per memory layer | training tokens/s |\n| --- | --- | --- | --- | --- | --- | --- |\n";
    for o in outcomes.iter().filter(|o| {
        (o.model.starts_with("memory") || o.model.starts_with("key-value")) && o.seed == s1 && o.group != "capacity"
    }) {
        s += &format!(
            "| {} ({}) | {:.4} | {:.4} | {:.1}% | {} | {:?} | {:.0} |\n",
            o.model,
            o.name,
            o.nll,
            o.kl,
            100.0 * o.agreement,
            rec(o).map_or("—".into(), |r| format!("{:.1}%", 100.0 * r)),
            o.rows,
            o.train_tokens_per_s
        );
    }
    // Does the memory matter?
    for m in ["memory", "key-value memory"]
        .iter()
        .filter_map(|d| by_model(d).first().copied())
    {
        s += &format!(
            "\n## Does the memory matter? ({})\n\n| block | share of rows retrieved on the held-out text | CE with its values zeroed | CE with its values shuffled |\n| --- | --- | --- | --- |\n",
            m.name
        );
        for (b, r, z, sh) in &m.memory_use {
            s += &format!(
                "| {b} | {:.1}% | {z:.4} ({:+.4}) | {sh:.4} ({:+.4}) |\n",
                100.0 * r,
                z - m.nll,
                sh - m.nll
            );
        }
    }
    // Capacity curve.
    let curve = |model: &str| -> Vec<(f64, f64, &Outcome)> {
        let mut v: Vec<(f64, f64, &Outcome)> = outcomes
            .iter()
            .filter(|o| o.model == model && o.seed == s1 && (o.group == "capacity" || o.group == "seeded"))
            .map(|o| ((o.weights + o.memory_floats) as f64, o.nll, o))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    let curve_mem = curve("memory");
    let curve_dense = curve("dense, equal weights + memory");
    s += "\n## Capacity\n\n| model | memory rows (all layers) | weights + memory floats | held-out CE | KL(teacher ‖ model) |\n| --- | --- | --- | --- | --- |\n";
    for (f, nll, o) in curve_mem.iter().chain(&curve_dense) {
        s += &format!(
            "| {} ({}) | {} | {f:.0} | {nll:.4} | {:.4} |\n",
            o.model, o.name, o.memory_rows, o.kl
        );
    }
    let flat = |name: &str, y: f64, xs: &[f64]| Series {
        name: name.into(),
        points: xs.iter().map(|&x| (x, y)).collect(),
    };
    let xs: Vec<f64> = curve_mem.iter().chain(&curve_dense).map(|p| p.0).collect();
    let (lo, hi) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min),
        xs.iter().copied().fold(0.0, f64::max),
    );
    let mut series = vec![
        Series {
            name: "memory student".into(),
            points: curve_mem.iter().map(|p| (p.0, p.1)).collect(),
        },
        Series {
            name: "dense student of equal floats".into(),
            points: curve_dense.iter().map(|p| (p.0, p.1)).collect(),
        },
        Series {
            name: "key-value student".into(),
            points: curve("key-value memory").iter().map(|p| (p.0, p.1)).collect(),
        },
        flat("teacher", teacher_nll, &[lo, hi]),
    ];
    if let Some(&a) = a_nll.values().next() {
        series.push(flat("attention-only (trained)", a, &[lo, hi]));
    }
    if !curve_mem.is_empty() {
        charts(
            &out.join("capacity.png"),
            (960, 600),
            1,
            &[Chart {
                title: "Held-out cross-entropy against the floats a model needs",
                x_label: "non-embedding weights + memory floats (log scale)",
                y_label: "held-out CE (nats per token)",
                log_x: true,
                series,
            }],
        )?;
        s += "\n`capacity.png`: held-out CE against non-embedding weights + memory floats, memory students of 256 to 16,384 rows per layer, dense students of equal floats and the key-value student (first seed), with the teacher and the trained attention-only model as references.\n";
    }
    s += "\n`memory.png` and `loss.png`: the memory student's tables and losses over training (first seed).\n\n## Runs\n\n| run | model | seed | CE | minutes | training tokens/s |\n| --- | --- | --- | --- | --- | --- |\n";
    for o in outcomes {
        s += &format!(
            "| {} | {} | {} | {:.4} | {:.1} | {:.0} |\n",
            o.name,
            o.model,
            o.seed,
            o.nll,
            o.seconds / 60.0,
            o.train_tokens_per_s
        );
    }
    Ok(s)
}

fn results_csv(outcomes: &[Outcome]) -> String {
    let mut s = String::from(
        "name,model,seed,nll,kl,agreement,teacher_nll,weights,memory_floats,memory_rows,ff_macs,seconds,\
         train_tokens_per_s,macs,feedback_mismatch,contexts\n",
    );
    for o in outcomes {
        s += &format!(
            "{},\"{}\",{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            o.name,
            o.model,
            o.seed,
            o.nll,
            o.kl,
            o.agreement,
            o.teacher_nll,
            o.weights,
            o.memory_floats,
            o.memory_rows,
            o.ff_macs,
            o.seconds,
            o.train_tokens_per_s,
            o.macs,
            o.feedback_mismatch.map_or(String::new(), |m| m.to_string()),
            o.contexts
                .iter()
                .map(|(t, ce)| format!("{t}:{ce}"))
                .collect::<Vec<_>>()
                .join(";")
        );
    }
    s
}
