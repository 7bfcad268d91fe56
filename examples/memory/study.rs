//! Learning against forgetting: the student memorises the bundled KJV text
//! (Genesis–Deuteronomy, which the teacher never saw; the last 10% held
//! out) with its weights frozen, each mechanism on its own and both, and
//! is compared with finetuning every weight and finetuning the last block
//! (AdamW, best of three learning rates), for the same steps, windows and
//! seed. At every evaluation point it records the cross-entropy on the
//! held-out KJV text (learning) and on the run's own held-out text
//! (forgetting); after the memory runs it forgets the source and measures
//! both again.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn_dmt::continual::{
    FinetuneScope, Mechanism, MemorizeOptions, ce, finetune, forget, frozen_ce, memorize, sources,
};
use burn_dmt::device::{DeviceChoice, select};
use burn_dmt::distill::{load_student, read_spec};
use burn_dmt::memory::layers::LayerKind;
use burn_dmt::memory::output::OutputParams;
use burn_dmt::plot::{Chart, Series, charts};
use burn_dmt::tokenizer::TextCodec;
use burn_dmt::train::{Corpus, Window, eval_batches};

/// Options of `memory study`.
#[derive(clap::Args, Debug)]
pub struct StudyArgs {
    /// The trained student (copied; the original is not changed).
    #[arg(long, default_value = "runs/distill")]
    student: PathBuf,
    /// The new text.
    #[arg(long, default_value = "assets/data/kjv-genesis-deuteronomy.txt")]
    text: PathBuf,
    /// Where results go.
    #[arg(long, default_value = "docs/results")]
    out: PathBuf,
    /// Steps of every method.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Evaluate every this many steps.
    #[arg(long, default_value_t = 25)]
    eval_every: usize,
    /// SGD learning rates of the memory values (each mechanism runs at each).
    #[arg(long, value_delimiter = ',', default_value = "300,1000,3000")]
    memory_lrs: Vec<f32>,
    /// Rows per memory layer the sparse mechanism trains.
    #[arg(long, default_value_t = MemorizeOptions::default().sparse_rows)]
    sparse_rows: usize,
    /// Slots added to each memory table for inserted memories.
    #[arg(long, default_value_t = MemorizeOptions::default().room)]
    room: usize,
    /// Insertion's novelty gate (quantile of the training text's nearest-memory distances).
    #[arg(long, default_value_t = MemorizeOptions::default().novelty_quantile)]
    novelty_quantile: f64,
    /// Training-text sequences that give the rows' document frequencies.
    #[arg(long, default_value_t = MemorizeOptions::default().background_windows)]
    background_windows: usize,
    /// Mechanisms to run (sparse, insert, both, output).
    #[arg(long, value_delimiter = ',', default_value = "sparse,insert,both,output")]
    mechanisms: Vec<Mechanism>,
    /// Output memory: weights of its distribution where it answers; one run each.
    #[arg(long, value_delimiter = ',', default_value = "0.15,0.3,0.6")]
    output_lambdas: Vec<f32>,
    /// Output memory: the calibration quantile (the share of the training
    /// text's positions it may answer).
    #[arg(long, default_value_t = OutputParams::default().quantile)]
    output_quantile: f64,
    /// Output memory: rows that vote per position.
    #[arg(long, default_value_t = OutputParams::default().k)]
    output_k: usize,
    /// Finetuning baselines to run: all (every weight), last-block.
    #[arg(long, value_delimiter = ',', default_value = "all,last-block")]
    finetune_scopes: Vec<String>,
    /// Seed of every method's windows (the same for all of them).
    #[arg(long, default_value_t = MemorizeOptions::default().seed)]
    seed: u64,
    /// AdamW learning rates of the finetuning baselines.
    #[arg(long, value_delimiter = ',', default_value = "0.0001,0.0003,0.001")]
    finetune_lrs: Vec<f64>,
    /// Run the memory runs only (a tuning probe).
    #[arg(long)]
    skip_finetune: bool,
    /// Held-out windows of each text evaluated.
    #[arg(long, default_value_t = 64)]
    eval_windows: usize,
    /// Windows per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// Device: auto, cpu or wgpu.
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
}

/// One method's curve and its end state.
struct Run {
    method: String,
    /// Learning rate, or the output memory's calibration quantile.
    setting: String,
    /// `(step, CE new text, CE original text)`.
    points: Vec<(usize, f64, f64)>,
    /// Floats the method may change.
    floats: usize,
    seconds: f64,
    /// After `forget`: (CE new, CE original).
    forgotten: Option<(f64, f64)>,
}

impl Run {
    fn last(&self) -> (f64, f64) {
        self.points.last().map_or((f64::NAN, f64::NAN), |p| (p.1, p.2))
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let name = e.file_name();
        if name == "checkpoints" || name == "baseline-attention" {
            continue;
        }
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to.join(&name))?;
        } else {
            std::fs::copy(e.path(), to.join(&name))?;
        }
    }
    Ok(())
}

/// Runs the study and writes its report.
pub fn run(a: StudyArgs) -> Result<(), Box<dyn std::error::Error>> {
    let selected = select(a.device)?;
    let device = selected.device;
    let spec = read_spec(&a.student)?;
    let codec = TextCodec::for_model(&spec.teacher, None)?;
    let text = std::fs::read_to_string(&a.text)?;
    // The last 10% of the lines are held out.
    let cut = text
        .char_indices()
        .filter(|(i, c)| *c == '\n' && *i >= text.len() * 9 / 10)
        .map(|(i, _)| i + 1)
        .next()
        .unwrap_or(text.len());
    let (train_text, held_text) = text.split_at(cut);
    std::fs::create_dir_all(&a.out)?;
    let work = a.out.join("continual-work");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let name = a
        .text
        .file_name()
        .map_or("new.txt".into(), |f| f.to_string_lossy().into_owned());
    let train_file = work.join(&name);
    std::fs::write(&train_file, train_text)?;
    let train_tokens = codec.encode(train_text)?;
    let new_eval: Vec<Window> = eval_batches(&codec.encode(held_text)?, a.batch, a.seq, a.eval_windows);
    let orig = spec
        .corpus
        .as_ref()
        .ok_or("the run does not record its training text")?;
    let orig_tokens = codec.encode(&std::fs::read_to_string(&orig.path)?)?;
    let orig_held = if orig.held_out_tail {
        Corpus::split(orig_tokens, 0.1).eval
    } else {
        orig_tokens
    };
    let orig_eval = eval_batches(&orig_held, a.batch, a.seq, a.eval_windows);
    eprintln!(
        "new text {}: {} training tokens, {} held-out windows; original held-out: {} windows",
        a.text.display(),
        train_tokens.len(),
        new_eval.len() * a.batch,
        orig_eval.len() * a.batch
    );
    let every = a.eval_every.max(1);
    let at = |s: usize| s.is_multiple_of(every) || s == a.steps;
    let mut runs: Vec<Run> = Vec::new();

    // Each memory run: its mechanism, its setting's label and its options.
    let mut plans: Vec<(Mechanism, String, MemorizeOptions)> = Vec::new();
    for &mechanism in &a.mechanisms {
        let base = {
            let mut o = MemorizeOptions::default();
            o.mechanism = mechanism;
            o.steps = Some(a.steps);
            o.batch = a.batch;
            o.seq = a.seq;
            o.sparse_rows = a.sparse_rows;
            o.room = a.room;
            o.novelty_quantile = a.novelty_quantile;
            o.background_windows = a.background_windows;
            o.device = device.clone();
            o.seed = a.seed;
            o
        };
        if mechanism == Mechanism::Output {
            for &lambda in &a.output_lambdas {
                let mut o = base.clone();
                o.output = OutputParams {
                    k: a.output_k,
                    lambda,
                    quantile: a.output_quantile,
                    ..OutputParams::default()
                };
                plans.push((mechanism, format!("λ {lambda}"), o));
            }
        } else {
            for &lr in &a.memory_lrs {
                let mut o = base.clone();
                o.lr = lr;
                plans.push((mechanism, format!("{lr}"), o));
            }
        }
    }
    for (mechanism, setting, opts) in plans {
        {
            let dir = work.join(format!("memory-{}-{}", mechanism.name(), setting.replace(' ', "")));
            copy_dir(&a.student, &dir)?;
            let rt = tokio::runtime::Runtime::new()?;
            let (_, mut m) = load_student(&dir, &device.clone().autodiff(), &rt)?;
            let start = (ce(&m, &new_eval)?, ce(&m, &orig_eval)?);
            drop(m);
            let mut points = vec![(0, start.0, start.1)];
            let t0 = Instant::now();
            let mut eval_secs = 0.0;
            let mut hook = |step: usize, model: &mut burn_dmt::Gpt2| -> burn_dmt::Result<()> {
                if at(step) {
                    let e = Instant::now();
                    points.push((step, frozen_ce(model, &new_eval)?, frozen_ce(model, &orig_eval)?));
                    eval_secs += e.elapsed().as_secs_f64();
                }
                Ok(())
            };
            let reports = memorize(&dir, std::slice::from_ref(&train_file), &opts, Some(&mut hook))?;
            let seconds = t0.elapsed().as_secs_f64() - eval_secs;
            let ledger = sources(&dir)?;
            let floats: usize = ledger
                .iter()
                .flat_map(|l| &l.layers)
                .map(|l| {
                    // An output memory row: a hidden state and a token.
                    if l.block == spec.config.n_layer {
                        return l.inserted * (spec.config.n_embd + 1);
                    }
                    let dv = l.before.len() / l.changed.len().max(1);
                    let c = spec.config.n_embd;
                    // An inserted memory's key and value: a head's in featural and
                    // associative tables, a unit's input weights, bias and output weights
                    // in key-value ones.
                    let row = match spec.layers.get(l.block).map(|k| k.parse::<LayerKind>()) {
                        Some(Ok(LayerKind::KeyValue)) => 2 * c + 1,
                        _ => 2 * (c / spec.config.n_head),
                    };
                    l.changed.len() * dv + l.inserted * row
                })
                .sum();
            let tag = reports.first().map(|r| r.source.tag.clone()).unwrap_or_default();
            forget(&dir, &tag)?;
            let (_, m2) = load_student(&dir, &device.clone().autodiff(), &rt)?;
            m = m2;
            let forgotten = Some((ce(&m, &new_eval)?, ce(&m, &orig_eval)?));
            eprintln!(
                "memory {} {setting}: new {:.4} → {:.4}, original {:.4} → {:.4}; after forget {:.4} / {:.4}",
                mechanism.name(),
                start.0,
                points.last().map_or(f64::NAN, |p| p.1),
                start.1,
                points.last().map_or(f64::NAN, |p| p.2),
                forgotten.map_or(f64::NAN, |f| f.0),
                forgotten.map_or(f64::NAN, |f| f.1)
            );
            runs.push(Run {
                method: format!("memory: {}", mechanism.name()),
                setting,
                points,
                floats,
                seconds,
                forgotten,
            });
            std::fs::remove_dir_all(&dir)?;
        }
    }
    let mut scopes = Vec::new();
    for s in &a.finetune_scopes {
        scopes.push(match s.as_str() {
            "all" => (FinetuneScope::All, "finetune: all weights"),
            "last-block" => (FinetuneScope::LastBlock, "finetune: last block"),
            other => return Err(format!("unknown finetuning scope {other:?} (expected all or last-block)").into()),
        });
    }
    for (scope, label) in scopes {
        for &lr in a.finetune_lrs.iter().filter(|_| !a.skip_finetune) {
            let rt = tokio::runtime::Runtime::new()?;
            let (_, m) = load_student(&a.student, &device.clone().autodiff(), &rt)?;
            let mut points = vec![(0, ce(&m, &new_eval)?, ce(&m, &orig_eval)?)];
            drop(m);
            let t0 = Instant::now();
            let mut eval_secs = 0.0;
            let mut hook = |step: usize, model: &mut burn_dmt::Gpt2| -> burn_dmt::Result<()> {
                if at(step) {
                    let e = Instant::now();
                    points.push((step, ce(model, &new_eval)?, ce(model, &orig_eval)?));
                    eval_secs += e.elapsed().as_secs_f64();
                }
                Ok(())
            };
            let floats = finetune(
                &a.student,
                &train_tokens,
                scope,
                lr,
                a.steps,
                (a.batch, a.seq, a.seed),
                &device,
                &mut hook,
            )?;
            let seconds = t0.elapsed().as_secs_f64() - eval_secs;
            let r = Run {
                method: label.into(),
                setting: format!("{lr}"),
                points,
                floats,
                seconds,
                forgotten: None,
            };
            eprintln!(
                "{label} lr {lr}: new {:.4} → {:.4}, original {:.4} → {:.4}",
                r.points[0].1,
                r.last().0,
                r.points[0].2,
                r.last().1
            );
            runs.push(r);
        }
    }
    std::fs::remove_dir_all(&work)?;
    write_report(&a, &runs, train_tokens.len(), &selected.description)?;
    Ok(())
}

fn write_report(
    a: &StudyArgs,
    runs: &[Run],
    train_tokens: usize,
    device: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut csv = String::from("method,setting,step,ce_new,ce_original\n");
    for r in runs {
        for (s, n, o) in &r.points {
            writeln!(csv, "{},{},{s},{n:.6},{o:.6}", r.method, r.setting)?;
        }
    }
    std::fs::write(a.out.join("continual.csv"), csv)?;
    // The best setting of each method: the largest reduction of the
    // new text's cross-entropy at the last step.
    let mut best: Vec<&Run> = Vec::new();
    for r in runs {
        match best.iter_mut().find(|b| b.method == r.method) {
            Some(b) if r.last().0 < b.last().0 => *b = r,
            Some(_) => {}
            None => best.push(r),
        }
    }
    let drop_new = |r: &Run| r.points[0].1 - r.last().0;
    let rise_orig = |r: &Run| r.last().1 - r.points[0].2;
    let by_step: Vec<Series> = best
        .iter()
        .map(|r| Series {
            name: format!("{} ({})", r.method, r.setting),
            points: r.points.iter().map(|p| (p.0 as f64, p.1)).collect(),
        })
        .collect();
    let first = |r: &Run| r.points[0];
    let trade: Vec<Series> = best
        .iter()
        .map(|r| Series {
            name: format!("{} ({})", r.method, r.setting),
            points: r.points.iter().map(|p| (p.2 - first(r).2, first(r).1 - p.1)).collect(),
        })
        .collect();
    charts(
        &a.out.join("continual.png"),
        (1400, 560),
        2,
        &[
            Chart {
                title: "Learning against forgetting (each point an evaluation)",
                x_label: "increase of cross-entropy on the original held-out text (nats)",
                y_label: "decrease of cross-entropy on held-out new text (nats)",
                log_x: false,
                series: trade,
            },
            Chart {
                title: "Held-out new text",
                x_label: "step",
                y_label: "cross-entropy (nats)",
                log_x: false,
                series: by_step,
            },
        ],
    )?;
    let mut md = String::new();
    writeln!(md, "# Learning new text in memory against finetuning\n")?;
    writeln!(
        md,
        "Command: `cargo run --release --example memory -- {}` ({device}; mechanisms at sparse rows {} per layer, \
         room {} per layer, novelty quantile {}). The student of `{}` learns `{}` (the teacher never saw it) \
         from its first 90% ({train_tokens} tokens); learning is the cross-entropy on the last 10% ({} windows \
         of {} tokens), forgetting the cross-entropy on the run's own held-out text (as many windows). Every \
         method runs {} steps of {} random windows of {} tokens with the same seed ({}); the memory runs train \
         memory values only (SGD, every weight frozen), the finetuning runs train weights (AdamW) with the \
         memory fixed; the output memory's runs insert each step's windows as rows of the output memory \
         (kNN-LM: key the final hidden state, value the next token; the {} nearest rows vote, mixed in with \
         weight λ where the nearest row is within the radius, calibrated at quantile {} of the training text's \
         positions' distances to their nearest row). `setting`: the SGD learning rate of the memory values, \
         AdamW's learning rate, or the output memory's λ. `floats` counts what a method can change: memory values \
         of the trained rows, keys and values of inserted memories and output memory rows, or the weights \
         trained.\n",
        std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        a.sparse_rows,
        a.room,
        a.novelty_quantile,
        a.student.display(),
        a.text.display(),
        a.eval_windows,
        a.seq,
        a.steps,
        a.batch,
        a.seq,
        a.seed,
        a.output_k,
        a.output_quantile,
    )?;
    writeln!(
        md,
        "| method | setting | new text CE before → after | Δ new | original CE before → after | Δ original | \
         after forget: new / original | floats | s (evaluations excluded) |"
    )?;
    writeln!(md, "| --- | ---: | --- | ---: | --- | ---: | --- | ---: | ---: |")?;
    for r in runs {
        let (n, o) = r.last();
        writeln!(
            md,
            "| {} | {} | {:.4} → {n:.4} | {:+.4} | {:.4} → {o:.4} | {:+.4} | {} | {} | {:.0} |",
            r.method,
            r.setting,
            r.points[0].1,
            -drop_new(r),
            r.points[0].2,
            rise_orig(r),
            r.forgotten
                .map_or("—".into(), |(fn_, fo)| format!("{fn_:.4} / {fo:.4}")),
            r.floats,
            r.seconds
        )?;
    }
    let full = best.iter().find(|r| r.method == "finetune: all weights");
    writeln!(md, "\n## Against the goal\n")?;
    writeln!(
        md,
        "Goal: memory-only reaches at least 80% of full finetuning's reduction of the new text's \
         cross-entropy with at most 20% of its increase on the original held-out text (each method at its \
         best setting (learning rate or λ), by the new text's cross-entropy after the last step; every memory run is \
         listed).\n"
    )?;
    if let Some(f) = full {
        writeln!(
            md,
            "Full finetuning (lr {}): new text −{:.4} nats, original {:+.4} nats.\n",
            f.setting,
            drop_new(f),
            rise_orig(f)
        )?;
        writeln!(
            md,
            "| memory mechanism | setting | share of the reduction | share of the increase | goal met |"
        )?;
        writeln!(md, "| --- | ---: | ---: | ---: | --- |")?;
        for r in runs.iter().filter(|r| r.method.starts_with("memory")) {
            let learn = drop_new(r) / drop_new(f);
            let forget_share = if rise_orig(f) > 0.0 {
                rise_orig(r).max(0.0) / rise_orig(f)
            } else {
                f64::NAN
            };
            writeln!(
                md,
                "| {} | {} | {:.1}% | {:.1}% | {} |",
                r.method,
                r.setting,
                100.0 * learn,
                100.0 * forget_share,
                if learn >= 0.8 && forget_share <= 0.2 {
                    "yes"
                } else {
                    "no"
                }
            )?;
        }
    }
    // Forgetting at the same learning (the comparison of Lin et al. 2025): where
    // a full-finetuning run's curve first lowers the new text's cross-entropy
    // as far as a memory run did, its increase on the original text there,
    // interpolated between evaluations; the least such increase over the
    // learning rates.
    let at_same_learning = |d: f64| -> Option<(f64, String, f64)> {
        runs.iter()
            .filter(|f| f.method == "finetune: all weights")
            .filter_map(|f| {
                let (n0, o0) = (f.points[0].1, f.points[0].2);
                f.points.windows(2).find_map(|w| {
                    let (da, db) = (n0 - w[0].1, n0 - w[1].1);
                    (da < d && db >= d).then(|| {
                        let t = (d - da) / (db - da);
                        let rise = w[0].2 - o0 + t * (w[1].2 - w[0].2);
                        (rise, f.setting.clone(), w[0].0 as f64 + t * (w[1].0 - w[0].0) as f64)
                    })
                })
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
    };
    writeln!(md, "\n## At the same learning\n")?;
    writeln!(
        md,
        "Forgetting compared at equal learning, as Lin et al. 2025 compare methods: for each memory run, full \
         finetuning's increase on the original text at the point where its curve first lowers the new text's \
         cross-entropy as far (interpolated between evaluations; the least increase over its learning rates).\n"
    )?;
    writeln!(
        md,
        "| memory mechanism | setting | Δ new | Δ original | full finetuning at the same Δ new: Δ original (lr, step) | memory's share |"
    )?;
    writeln!(md, "| --- | ---: | ---: | ---: | --- | ---: |")?;
    for r in runs.iter().filter(|r| r.method.starts_with("memory")) {
        let (d, rise) = (drop_new(r), rise_orig(r));
        match at_same_learning(d) {
            Some((ft, lr, step)) => writeln!(
                md,
                "| {} | {} | −{d:.4} | {rise:+.4} | {ft:+.4} (lr {lr}, step ≈{step:.0}) | {:.0}% |",
                r.method,
                r.setting,
                100.0 * rise.max(0.0) / ft.max(1e-9)
            )?,
            None => writeln!(
                md,
                "| {} | {} | −{d:.4} | {rise:+.4} | — (no finetuning run learns as much by an evaluation) | — |",
                r.method, r.setting
            )?,
        }
    }
    writeln!(md, "\n## Forgetting by source\n")?;
    writeln!(
        md,
        "After each memory run, `forget` removed the source; the cross-entropies return to (targets: new text \
         within 1%, original within 0.2% of their values before `memorize`):\n"
    )?;
    writeln!(
        md,
        "| method | setting | new: before / after forget | original: before / after forget |"
    )?;
    writeln!(md, "| --- | ---: | --- | --- |")?;
    for r in runs.iter().filter(|r| r.forgotten.is_some()) {
        let (fnw, fo) = r.forgotten.unwrap_or_default();
        writeln!(
            md,
            "| {} | {} | {:.4} / {fnw:.4} ({:+.3}%) | {:.4} / {fo:.4} ({:+.3}%) |",
            r.method,
            r.setting,
            r.points[0].1,
            100.0 * (fnw / r.points[0].1 - 1.0),
            r.points[0].2,
            100.0 * (fo / r.points[0].2 - 1.0)
        )?;
    }
    writeln!(md, "\n## Throughput\n")?;
    for r in runs.iter().filter(|r| r.method.starts_with("memory")) {
        writeln!(
            md,
            "- {} ({}): {:.0} training tokens/s ({} steps in {:.1} s, evaluations excluded)",
            r.method,
            r.setting,
            (a.steps * a.batch * a.seq) as f64 / r.seconds.max(1e-9),
            a.steps,
            r.seconds
        )?;
    }
    writeln!(
        md,
        "\n`continual.png`: left, learning against forgetting at each evaluation of each method's best \
         learning rate; right, the held-out new text's cross-entropy by step. `continual.csv`: every \
         evaluation of every run."
    )?;
    std::fs::write(a.out.join("continual.md"), md)?;
    eprintln!("wrote {}", a.out.join("continual.md").display());
    Ok(())
}
