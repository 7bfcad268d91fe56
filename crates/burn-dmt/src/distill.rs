//! Knowledge distillation of a GPT-2 teacher into a discrete-memory student:
//! the student is the teacher with its feed-forward layers replaced by memory
//! layers (featural below, associative above, per [`super::memory::layers`]),
//! every other weight copied; it learns to imitate the teacher with
//! `α·T²·KL(teacher_T ‖ student_T) + (1 − α)·CE` (Hinton et al. 2015; T = 2,
//! α = 0.5, the Hugging Face distillation defaults), AdamW with warm-up,
//! cosine decay and gradient clipping.
//!
//! Each memory layer's memory is bootstrapped from the teacher (key = the
//! projected, normalised input of the teacher's feed-forward layer, value =
//! its output, per head; output projection = identity), so the student starts
//! as a k-nearest-neighbour regression of the teacher's MLPs. Memories live
//! on a device tier and are written behind to one durable store per layer
//! (SQLite under the run directory) through a journal; the run directory is
//! self-contained (student weights as safetensors, `student.json`, the
//! stores) and `--eval-only` rebuilds the student from it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::storage::{LayerStore, StoreLocation};
use burn::module::{Module, Param};
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::{Device, Tensor, TensorData};
use memstore_api::{EvictionPolicy, MemoryConfig, Metric};
use serde::{Deserialize, Serialize};

use crate::config::Gpt2Config;
use crate::memory::associative::AssociativeMemory;
use crate::memory::featural::{FeaturalMemory, unit_rows};
use crate::memory::journal::WriteBehind;
use crate::memory::layers::{LayerKind, parse_layers};
use crate::memory::tier::DeviceMemory;
use crate::tokenizer::TextCodec;
use crate::train::{
    Corpus, EvalStats, SplitMix, Window, cross_entropy, distill_kl, eval_batches, evaluate, lr_at, sample_batch, value,
};
use crate::{DmtError, FeedForward, Gpt2, Result, host_f32, io_error as io, runtime};

/// The student's description, saved as `student.json` in the run directory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StudentSpec {
    /// The teacher's directory (for `--eval-only` comparisons and the tokenizer).
    pub teacher: PathBuf,
    /// The architecture (the teacher's).
    pub config: Gpt2Config,
    /// Each block's feed-forward layer.
    pub layers: Vec<String>,
    /// Memories retrieved per head.
    pub k: usize,
    /// Device-tier slots per memory layer.
    pub capacity: usize,
    /// Novelty threshold of the associative layers' insertion (L2 between unit keys).
    pub novelty: f32,
    /// LRFU λ.
    pub lambda: f64,
    /// Where the memory layers' stores live (`--store`); absent in runs made
    /// before the flag existed, which used SQLite in `memory/`.
    #[serde(default)]
    pub store: Option<String>,
}

impl StudentSpec {
    /// Where this run's stores live.
    pub fn store_location(&self) -> Result<StoreLocation> {
        self.store.as_deref().map_or(Ok(StoreLocation::default()), str::parse)
    }
}

/// Everything a distillation run is asked to do.
#[derive(Clone, Debug)]
pub struct DistillOptions {
    /// Teacher: a Hugging Face GPT-2 directory (with tokenizer files, and
    /// `vocab_map.json` for a compact vocabulary).
    pub teacher: PathBuf,
    /// Tokenizer directory if not the teacher's.
    pub tokenizer: Option<PathBuf>,
    /// Where the memory layers' stores live (`--store`).
    pub store: StoreLocation,
    /// Training text.
    pub corpus: PathBuf,
    /// Held-out text (default: the last 10% of the corpus).
    pub eval_corpus: Option<PathBuf>,
    /// Run directory.
    pub run_dir: PathBuf,
    /// Layer plan (`"0-2:featural,3:associative"`); `None`: the lower three
    /// quarters featural, the rest associative.
    pub layers: Option<String>,
    /// Optimiser steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Distillation temperature T.
    pub temperature: f64,
    /// Weight α of the distillation term.
    pub alpha: f64,
    /// Seed of the batches and the student's new weights.
    pub seed: u64,
    /// Memories retrieved per head.
    pub k: usize,
    /// Device-tier slots per memory layer (and memories bootstrapped).
    pub capacity: usize,
    /// Learning rate of the sparse value updates (0: values fixed, the
    /// associative layer then trains its value projection through the STE).
    pub value_lr: f32,
    /// Novelty threshold of associative insertion.
    pub novelty: f32,
    /// Most memories an associative layer inserts per step.
    pub max_inserts: usize,
    /// Weight of the hidden-state loss: for each memory block, the MSE between
    /// the memory layer's output and the teacher's MLP output on the same
    /// input (0: off).
    pub hidden_loss: f64,
    /// Seed the memories from the teacher's feed-forward layers (otherwise:
    /// random unit keys and small random values, output projection random).
    pub bootstrap: bool,
    /// Held-out windows evaluated.
    pub eval_windows: usize,
    /// Print progress every this many steps.
    pub log_every: usize,
    /// Write a resumable checkpoint every this many steps (and at the end).
    pub checkpoint_every: usize,
    /// Continue the run in `run_dir` from its last checkpoint.
    pub resume: bool,
    /// Stop after this step as if interrupted (the run can be resumed).
    pub halt_after: Option<usize>,
    /// Synchronise the device at each phase of a training step, so that the
    /// report's phase times are exact on a GPU (costs some throughput).
    pub profile: bool,
    /// Device of the student and teacher.
    pub device: Device,
    /// How the device was chosen (for the report).
    pub device_name: String,
}

impl DistillOptions {
    /// The embedded default: the committed teacher and corpus under `root`
    /// (the repository), a run directory `runs/distill`, the CPU.
    pub fn embedded(root: &Path) -> Self {
        DistillOptions {
            teacher: root.join("assets/teacher"),
            tokenizer: None,
            corpus: root.join("assets/data/tinyshakespeare.txt"),
            eval_corpus: None,
            run_dir: PathBuf::from("runs/distill"),
            store: StoreLocation::default(),
            layers: None,
            steps: 300,
            batch: 16,
            seq: 64,
            lr: 2e-3,
            temperature: 2.0,
            alpha: 0.5,
            seed: 1,
            k: 8,
            capacity: 4096,
            value_lr: 0.05,
            novelty: 0.3,
            max_inserts: 64,
            bootstrap: true,
            hidden_loss: 0.0,
            eval_windows: 128,
            log_every: 10,
            checkpoint_every: 100,
            resume: false,
            halt_after: None,
            profile: false,
            device: Device::flex(),
            device_name: "cpu (burn flex backend)".into(),
        }
    }
}

/// One row of `metrics.csv`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Step (1-based).
    pub step: usize,
    /// Total loss.
    pub loss: f64,
    /// Distillation term T²·KL.
    pub kd: f64,
    /// Cross-entropy term.
    pub ce: f64,
    /// Learning rate.
    pub lr: f64,
    /// Memories inserted this step (all layers).
    pub inserted: usize,
}

/// Wall time of the training loop by phase, summed over the steps of one
/// run (a resumed run counts its own steps). Without `--profile` a GPU's
/// queued work is counted in the phase that waits for it (the loss read-back
/// at the end of the student's forward pass, the host copies of the memory
/// commit); with it, the device is synchronised at every phase boundary.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PhaseTimes {
    /// Seconds per phase, in the order of [`PhaseTimes::NAMES`].
    pub seconds: [f64; 8],
    /// Steps timed.
    pub steps: usize,
    /// Whether the device was synchronised at each boundary (`--profile`).
    pub synchronised: bool,
}

impl PhaseTimes {
    /// The phases: batch sampling and the teacher's forward pass; the
    /// student's forward pass (to the logits); the loss (KL and
    /// cross-entropy over the vocabulary, the optional hidden-state loss, and
    /// reading the loss values); the backward pass; the optimiser step; the
    /// memory layers' commit (accesses, value updates, merges and inserts on
    /// the device tier); journalling the change batches; checkpoints.
    pub const NAMES: [&'static str; 8] = [
        "teacher forward",
        "student forward",
        "loss",
        "backward",
        "optimizer",
        "memory commit",
        "journal",
        "checkpoint",
    ];

    /// Milliseconds per step of each phase.
    pub fn per_step_ms(&self) -> [f64; 8] {
        self.seconds.map(|s| 1e3 * s / self.steps.max(1) as f64)
    }

    /// One line: `name ms` per phase and the total, per step.
    pub fn summary(&self) -> String {
        let ms = self.per_step_ms();
        let parts: Vec<String> = Self::NAMES.iter().zip(ms).map(|(n, m)| format!("{n} {m:.1}")).collect();
        format!("ms/step: {} (total {:.1})", parts.join(", "), ms.iter().sum::<f64>())
    }
}

/// Times the phases of one step: [`Lap::lap`] charges the time since the
/// previous lap to a phase, after synchronising the device when profiling.
struct Lap<'a> {
    times: &'a mut PhaseTimes,
    device: Option<&'a Device>,
    last: Instant,
}

impl<'a> Lap<'a> {
    fn new(times: &'a mut PhaseTimes, device: Option<&'a Device>) -> Self {
        Lap {
            times,
            device,
            last: Instant::now(),
        }
    }

    fn lap(&mut self, phase: usize) -> Result<()> {
        if let Some(d) = self.device {
            d.sync()
                .map_err(|e| DmtError::InvalidArgument(format!("device synchronisation failed: {e:?}")))?;
        }
        let now = Instant::now();
        self.times.seconds[phase] += (now - self.last).as_secs_f64();
        self.last = now;
        Ok(())
    }
}

/// What a run (or `--eval-only`) reports.
#[derive(Clone, Debug)]
pub struct Report {
    /// Teacher on the held-out text.
    pub teacher: EvalStats,
    /// Student on the held-out text, against the teacher.
    pub student: EvalStats,
    /// Teacher without feed-forward layers.
    pub ablated: EvalStats,
    /// Teacher weights (all / non-embedding).
    pub teacher_params: (usize, usize),
    /// Student weights (all / non-embedding; memories are not weights).
    pub student_params: (usize, usize),
    /// Memory rows per block (`None`: an MLP block).
    pub memory_rows: Vec<Option<usize>>,
    /// Bytes of the stores on disk.
    pub store_bytes: u64,
    /// Training tokens per second (`None` for `--eval-only`).
    pub train_tokens_per_s: Option<f64>,
    /// Where the training time went (`None` for `--eval-only`).
    pub phases: Option<PhaseTimes>,
    /// Device.
    pub device: String,
    /// Per-step metrics.
    pub steps: Vec<StepMetrics>,
}

impl Report {
    /// Share of the ablation gap the student closes:
    /// `(ppl_ablated − ppl_student) / (ppl_ablated − ppl_teacher)`.
    pub fn gap_closed(&self) -> f64 {
        let (a, s, t) = (
            self.ablated.perplexity(),
            self.student.perplexity(),
            self.teacher.perplexity(),
        );
        (a - s) / (a - t)
    }

    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "# Distillation report\n\n| model | held-out perplexity | KL(teacher ‖ model) | top-1 agreement | tokens/s (eval) |\n| --- | --- | --- | --- | --- |\n",
        );
        for (name, e) in [
            ("teacher", &self.teacher),
            ("student", &self.student),
            ("teacher without feed-forward layers", &self.ablated),
        ] {
            s += &format!(
                "| {name} | {:.3} | {} | {} | {:.0} |\n",
                e.perplexity(),
                e.kl.map_or("—".into(), |v| format!("{v:.4}")),
                e.agreement.map_or("—".into(), |v| format!("{:.1}%", 100.0 * v)),
                e.tokens as f64 / e.seconds.max(1e-9)
            );
        }
        s += &format!(
            "\nGap closed: **{:.2}%** of the ablation gap ((ppl_ablated − ppl_student) / (ppl_ablated − ppl_teacher)).\n\n",
            100.0 * self.gap_closed()
        );
        s += &format!(
            "| | weights | non-embedding weights |\n| --- | --- | --- |\n| teacher | {} | {} |\n| student | {} | {} ({:.1}% of the teacher's) |\n\n",
            self.teacher_params.0,
            self.teacher_params.1,
            self.student_params.0,
            self.student_params.1,
            100.0 * self.student_params.1 as f64 / self.teacher_params.1.max(1) as f64
        );
        let rows: Vec<String> = self
            .memory_rows
            .iter()
            .enumerate()
            .map(|(i, r)| match r {
                Some(n) => format!("block {i}: {n}"),
                None => format!("block {i}: MLP"),
            })
            .collect();
        s += &format!(
            "Memory rows: {}. Stores on disk: {:.2} MB.\n\n",
            rows.join(", "),
            self.store_bytes as f64 / 1e6
        );
        if let Some(t) = self.train_tokens_per_s {
            s += &format!("Training: {t:.0} tokens/s. ");
        }
        s += &format!(
            "Held-out text: {} positions. Device: {}.\n",
            self.student.tokens, self.device
        );
        if let Some(p) = &self.phases {
            s += &format!(
                "\n| training phase | ms per step | share |\n| --- | --- | --- |\n{}\n{} steps timed{}.\n",
                phase_rows(p),
                p.steps,
                if p.synchronised {
                    ", device synchronised at each phase (--profile)"
                } else {
                    "; GPU work is counted where the host waits for it (--profile synchronises)"
                }
            );
        }
        s
    }

    /// `metrics.csv`.
    pub fn csv(&self) -> String {
        let mut s = String::from("step,loss,kd,ce,lr,inserted\n");
        for m in &self.steps {
            s += &format!("{},{},{},{},{},{}\n", m.step, m.loss, m.kd, m.ce, m.lr, m.inserted);
        }
        s
    }
}

fn phase_rows(p: &PhaseTimes) -> String {
    let ms = p.per_step_ms();
    let total: f64 = ms.iter().sum();
    PhaseTimes::NAMES
        .iter()
        .zip(ms)
        .map(|(n, m)| format!("| {n} | {m:.1} | {:.1}% |", 100.0 * m / total.max(1e-12)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The default plan: the lower three quarters featural, the rest associative.
pub fn default_layers(n_layer: usize) -> String {
    let f = (3 * n_layer).div_ceil(4).min(n_layer);
    match (f, n_layer) {
        (_, 0) => String::new(),
        (f, n) if f == n => format!("0-{}:featural", n - 1),
        (f, n) => format!("0-{}:featural,{}-{}:associative", f - 1, f, n - 1),
    }
}

fn kind_name(k: LayerKind) -> &'static str {
    match k {
        LayerKind::Mlp => "mlp",
        LayerKind::Featural => "featural",
        LayerKind::Associative => "associative",
        LayerKind::Ablated => "none",
    }
}

/// Weights of a model: (all, non-embedding).
pub fn param_counts(m: &Gpt2) -> (usize, usize) {
    let emb = m.wte.weight.val().dims().iter().product::<usize>() + m.wpe.weight.val().dims().iter().product::<usize>();
    let all = m.num_params();
    (all, all - emb)
}

fn memory_config(dh: usize, spec: &StudentSpec) -> MemoryConfig {
    MemoryConfig::new(dh, dh)
        .with_metric(Metric::L2)
        .with_eviction(EvictionPolicy::Lrfu { lambda: spec.lambda })
        .with_thresholds(spec.novelty / 4.0, spec.novelty)
}

fn journal_path(run_dir: &Path, block: usize) -> PathBuf {
    run_dir.join("memory").join(format!("block{block}.journal"))
}

/// `checkpoint.json`: where a run can continue from. Written last (atomically)
/// after the checkpoint's files, so it always names a complete checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Checkpoint {
    /// Steps done.
    step: usize,
    /// The batch sampler's state.
    rng: u64,
    /// Metrics of the steps done.
    metrics: Vec<StepMetrics>,
    /// Each memory block's slot layout.
    layouts: Vec<Option<Vec<Option<u64>>>>,
    /// The checkpoint's folder under `checkpoints/`.
    dir: String,
}

/// Removes a SQLite store's files (database, WAL, shared memory) and its journal.
/// Removes block `block`'s write-behind journal (its batches are in the store
/// or superseded by a checkpoint being restored).
fn remove_journal(run_dir: &Path, block: usize) -> Result<()> {
    let p = journal_path(run_dir, block);
    if p.exists() {
        std::fs::remove_file(&p).map_err(io(&p))?;
    }
    Ok(())
}

/// The location with its directory made absolute (recorded in `student.json`,
/// so that `--resume` and `--eval-only` find the stores from anywhere).
fn absolute_location(loc: &StoreLocation) -> Result<StoreLocation> {
    let abs = |d: &PathBuf| std::path::absolute(d).map_err(io(d));
    Ok(match loc {
        StoreLocation::Sqlite(Some(d)) => StoreLocation::Sqlite(Some(abs(d)?)),
        StoreLocation::Duckdb(Some(d)) => StoreLocation::Duckdb(Some(abs(d)?)),
        StoreLocation::Ipc(d) => StoreLocation::Ipc(abs(d)?),
        other => other.clone(),
    })
}

fn identity(n: usize, device: &Device) -> Tensor<2> {
    let mut eye = vec![0.0f32; n * n];
    for i in 0..n {
        eye[i * n + i] = 1.0;
    }
    Tensor::from_data(TensorData::new(eye, [n, n]), device)
}

/// A `[r, c]` matrix of N(0, 0.02²) entries from `rng` (Box–Muller), so a
/// run's new weights depend on its seed alone, not on a process-wide
/// generator other work may draw from.
fn seeded_normal(r: usize, c: usize, rng: &mut SplitMix, device: &Device) -> Tensor<2> {
    let mut u = || ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let data: Vec<f32> = (0..r * c)
        .map(|_| (0.02 * (-2.0 * u().ln()).sqrt() * (2.0 * std::f64::consts::PI * u()).cos()) as f32)
        .collect();
    Tensor::from_data(TensorData::new(data, [r, c]), device)
}

/// The teacher's feed-forward inputs (after `ln_2`) and outputs of every
/// block on `windows`, each `[positions, n_embd]` (one teacher pass per window).
fn teacher_ff(teacher: &Gpt2, windows: &[Window]) -> Result<Vec<(Tensor<2>, Tensor<2>)>> {
    let device = teacher.device();
    let c = teacher.config().n_embd;
    let mut per_block: Vec<(Vec<Tensor<2>>, Vec<Tensor<2>>)> = vec![(Vec::new(), Vec::new()); teacher.h.len()];
    for w in windows {
        let n = w.b * w.t;
        let (_, ff) = teacher.forward_with_ff(w.inputs(&device))?;
        for ((xs, ys), (x, y)) in per_block.iter_mut().zip(ff) {
            xs.push(x.reshape([n, c]));
            ys.push(y.reshape([n, c]));
        }
    }
    Ok(per_block
        .into_iter()
        .map(|(xs, ys)| (Tensor::cat(xs, 0), Tensor::cat(ys, 0)))
        .collect())
}

/// A memory layer bootstrapped from the teacher's feed-forward inputs `x`
/// and outputs `y` at its block: keys = unit per-head projections of `x`,
/// values = the per-head slices of `y`, output projection = identity.
fn bootstrap_layer(
    kind: LayerKind,
    (x, y): (Tensor<2>, Tensor<2>),
    spec: &StudentSpec,
    rng: &mut SplitMix,
    from_teacher: bool,
    device: &Device,
) -> Result<FeedForward> {
    let c = spec.config.n_embd;
    let h = spec.config.n_head;
    let dh = c / h;
    let n = x.dims()[0];
    let rows = (spec.capacity / h).min(n);
    if rows * h < spec.k {
        return Err(DmtError::InvalidArgument(format!(
            "{} bootstrap memories are fewer than k = {}",
            rows * h,
            spec.k
        )));
    }
    let x = x.slice([0..rows, 0..c]);
    let y = y.slice([0..rows, 0..c]);
    let config = memory_config(dh, spec);
    let placeholder = {
        let mut t = DeviceMemory::new(config.clone(), spec.capacity, device)?;
        t.fill(&vec![0.0; spec.k * dh], &vec![0.0; spec.k * dh], 0)?;
        t
    };
    let project = |lin: &burn::nn::Linear| -> Result<Vec<f32>> {
        let w = lin.weight.val().inner();
        let b = lin.bias.as_ref().map(|b| b.val().inner());
        let mut p = x.clone().matmul(w.to_device(&x.device()));
        if let Some(b) = b {
            p = p + b.to_device(&x.device()).unsqueeze_dim::<2>(0);
        }
        host_f32(unit_rows(p.reshape([rows * h, dh])))
    };
    let out_identity = |lin: &mut burn::nn::Linear| {
        lin.weight = Param::from_tensor(identity(c, device));
        lin.bias = lin.bias.take().map(|b| Param::from_tensor(b.val().zeros_like()));
    };
    let seeded = |lin: &mut burn::nn::Linear, rng: &mut SplitMix| {
        lin.weight = Param::from_tensor(seeded_normal(c, c, rng, device));
        lin.bias = lin.bias.take().map(|b| Param::from_tensor(b.val().zeros_like()));
    };
    // Without bootstrapping (the ablation): random unit keys and small random
    // values, as many as bootstrapping would give.
    let random = !from_teacher;
    let values = if random {
        host_f32(seeded_normal(rows * h, dh, rng, device))?
    } else {
        host_f32(y.reshape([rows * h, dh]))?
    };
    let fresh = |lin: &burn::nn::Linear, rng: &mut SplitMix| -> Result<DeviceMemory> {
        let keys = if random {
            host_f32(unit_rows(seeded_normal(rows * h, dh, rng, device)))?
        } else {
            project(lin)?
        };
        let mut t = DeviceMemory::new(config.clone(), spec.capacity, device)?;
        t.fill(&keys, &values, 0)?;
        Ok(t)
    };
    Ok(match kind {
        LayerKind::Featural => {
            let mut f = FeaturalMemory::new(c, h, spec.k, placeholder, device)?;
            out_identity(&mut f.out);
            seeded(&mut f.query, rng);
            *f.memory_mut() = fresh(&f.query, rng)?;
            FeedForward::Featural(f)
        }
        LayerKind::Associative => {
            let mut a = AssociativeMemory::new(c, h, spec.k, placeholder, device)?;
            out_identity(&mut a.out);
            seeded(&mut a.key, rng);
            seeded(&mut a.value, rng);
            // Queries start where the keys are, so retrieval attends at once.
            a.query = a.key.clone();
            *a.memory_mut() = fresh(&a.key, rng)?;
            FeedForward::Associative(a)
        }
        _ => unreachable!("only memory layers are bootstrapped"),
    })
}

fn set_learning(model: &mut Gpt2, on: bool) {
    for b in model.h.iter_mut() {
        b.mlp.set_learning(on);
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn read_tokens(codec: &TextCodec, path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    codec.encode(&text)
}

#[allow(clippy::too_many_arguments)]
fn final_report(
    teacher: &Gpt2,
    student: &mut Gpt2,
    eval: &[Window],
    run_dir: &Path,
    store_dir: &Path,
    training: Option<(f64, PhaseTimes)>,
    device: &str,
    steps: Vec<StepMetrics>,
) -> Result<Report> {
    let (train_tokens_per_s, phases) = match training {
        Some((t, p)) => (Some(t), Some(p)),
        None => (None, None),
    };
    set_learning(student, false);
    let ablated = crate::loader::ablate_all(teacher.clone());
    let report = Report {
        teacher: evaluate(teacher, None, eval)?,
        student: evaluate(student, Some(teacher), eval)?,
        ablated: evaluate(&ablated, Some(teacher), eval)?,
        teacher_params: param_counts(teacher),
        student_params: param_counts(student),
        memory_rows: student.h.iter().map(|b| b.mlp.memory().map(|t| t.len())).collect(),
        store_bytes: dir_bytes(store_dir),
        train_tokens_per_s,
        phases,
        device: device.to_string(),
        steps,
    };
    if train_tokens_per_s.is_some() {
        let col = |f: fn(&StepMetrics) -> f64| report.steps.iter().map(f).collect::<Vec<f64>>();
        let (loss, kd, ce) = (col(|m| m.loss), col(|m| m.kd), col(|m| m.ce));
        let (lo, hi) = crate::plot::loss_curves(&run_dir.join("loss.png"), &[&loss, &kd, &ce])?;
        let md = format!(
            "{}\n`loss.png`: training loss per step (x: step 1 to {}; y: linear, {lo:.4} to {hi:.4}); \
             blue: total loss, red: T²·KL(teacher ‖ student), green: next-token cross-entropy.\n",
            report.markdown(),
            report.steps.len()
        );
        crate::loader::write_atomic(&run_dir.join("report.md"), md.as_bytes())?;
        crate::loader::write_atomic(&run_dir.join("metrics.csv"), report.csv().as_bytes())?;
    } else {
        // --eval-only keeps the training report and metrics.
        crate::loader::write_atomic(&run_dir.join("eval-report.md"), report.markdown().as_bytes())?;
    }
    Ok(report)
}

/// Runs a distillation end to end (or, with `resume`, from the run
/// directory's last checkpoint) and writes the run directory; prints progress
/// with `log`.
pub fn run(opts: &DistillOptions, log: &mut dyn FnMut(&str)) -> Result<Report> {
    let device = opts.device.clone();
    let ad = device.clone().autodiff();
    let codec = TextCodec::for_model(&opts.teacher, opts.tokenizer.as_deref())?;
    let teacher = Gpt2::from_pretrained(&opts.teacher, &device)?;
    let config = teacher.config().clone();
    if codec.vocab_size() > config.vocab_size {
        return Err(DmtError::InvalidArgument(format!(
            "the tokenizer has {} tokens, the teacher only {}",
            codec.vocab_size(),
            config.vocab_size
        )));
    }
    let tokens = read_tokens(&codec, &opts.corpus)?;
    let corpus = match &opts.eval_corpus {
        Some(p) => Corpus {
            train: tokens,
            eval: read_tokens(&codec, p)?,
        },
        None => Corpus::split(tokens, 0.1),
    };
    let seq = opts.seq.min(config.n_positions);
    log(&format!(
        "teacher {} ({} blocks × {}), corpus {} ({} training / {} held-out tokens), device {}",
        opts.teacher.display(),
        config.n_layer,
        config.n_embd,
        opts.corpus.display(),
        corpus.train.len(),
        corpus.eval.len(),
        opts.device_name
    ));
    let run_dir = opts.run_dir.as_path();
    let rt = runtime()?;
    let fresh_optim = || {
        AdamWConfig::new()
            .with_weight_decay(0.01)
            .with_grad_clipping(Some(GradientClippingConfig::Norm(1.0)))
            .init()
    };
    let ckpt_err = |path: PathBuf| {
        move |e: burn::store::RecordError| DmtError::Checkpoint {
            path: path.clone(),
            message: e.to_string(),
        }
    };

    let (spec, mut student, mut optim, mut rng, mut metrics, first_step) = if opts.resume {
        let spec = read_spec(run_dir)?;
        if spec.config != config {
            return Err(DmtError::InvalidArgument(format!(
                "{} was distilled from another teacher than {}",
                run_dir.display(),
                opts.teacher.display()
            )));
        }
        let cp_path = run_dir.join("checkpoint.json");
        let text = std::fs::read_to_string(&cp_path).map_err(io(&cp_path))?;
        let cp: Checkpoint = serde_json::from_str(&text).map_err(|e| DmtError::Config {
            path: cp_path.clone(),
            message: e.to_string(),
        })?;
        let cdir = run_dir.join("checkpoints").join(&cp.dir);
        // The stores went on past the checkpoint: put back their state at it.
        let loc = spec.store_location()?;
        for (i, l) in cp.layouts.iter().enumerate() {
            if l.is_some() {
                remove_journal(run_dir, i)?;
                rt.block_on(loc.restore(run_dir, i, &cdir.join(loc.checkpoint_name(i))))?;
            }
        }
        let student = student_from_run(run_dir, &spec, Some(&cp.layouts), &ad, &rt)?;
        let path = cdir.join("student.bpk");
        let student = student.try_load_file(&path).map_err(ckpt_err(path))?;
        let path = cdir.join("optim.bpk");
        let optim = fresh_optim().load(&path).map_err(ckpt_err(path))?;
        log(&format!("resuming {} after step {}", run_dir.display(), cp.step));
        (spec, student, optim, SplitMix(cp.rng), cp.metrics, cp.step)
    } else {
        let plan_text = opts.layers.clone().unwrap_or_else(|| default_layers(config.n_layer));
        let plan = parse_layers(&plan_text, config.n_layer)?;
        let spec = StudentSpec {
            teacher: std::fs::canonicalize(&opts.teacher).unwrap_or_else(|_| opts.teacher.clone()),
            config: config.clone(),
            layers: plan.iter().map(|k| kind_name(*k).to_string()).collect(),
            k: opts.k,
            capacity: opts.capacity,
            novelty: opts.novelty,
            lambda: 0.01,
            store: Some(absolute_location(&opts.store)?.to_string()),
        };
        let loc = spec.store_location()?;
        if run_dir.join("student.json").exists() || (0..config.n_layer).any(|i| loc.exists(run_dir, i)) {
            return Err(DmtError::InvalidArgument(format!(
                "{} already holds a run (--resume it, choose another --run-dir or remove it)",
                run_dir.display()
            )));
        }
        std::fs::create_dir_all(run_dir.join("memory")).map_err(io(run_dir))?;
        let store_dir = loc.dir(run_dir);
        std::fs::create_dir_all(&store_dir).map_err(io(&store_dir))?;
        // The student: the teacher's weights, memory layers bootstrapped from it.
        let mut boot_rng = SplitMix(opts.seed ^ 0x5EED);
        let boot_windows: Vec<Window> = (0..(opts.capacity / config.n_head).div_ceil(opts.batch * seq).max(1))
            .map(|_| sample_batch(&corpus.train, opts.batch, seq, &mut boot_rng))
            .collect::<Result<_>>()?;
        let boot_ff = teacher_ff(&teacher, &boot_windows)?;
        let mut student = Gpt2::from_pretrained(&opts.teacher, &ad)?;
        for (i, kind) in plan.iter().enumerate() {
            match kind {
                LayerKind::Featural | LayerKind::Associative => {
                    let ff = bootstrap_layer(*kind, boot_ff[i].clone(), &spec, &mut boot_rng, opts.bootstrap, &ad)?;
                    student.set_feed_forward(i, ff)?;
                }
                LayerKind::Ablated => student.set_feed_forward(i, FeedForward::Ablated(burn::nn::Identity))?,
                LayerKind::Mlp => {}
            }
        }
        let spec_text = serde_json::to_string_pretty(&spec).map_err(|e| DmtError::InvalidArgument(e.to_string()))?;
        crate::loader::write_atomic(&run_dir.join("student.json"), spec_text.as_bytes())?;
        log(&format!("student: {plan_text}"));
        (spec, student, fresh_optim(), SplitMix(opts.seed), Vec::new(), 0)
    };
    let (tp, sp) = (param_counts(&teacher), param_counts(&student));
    log(&format!(
        "non-embedding weights: student {} of the teacher's {} ({:.1}%)",
        sp.1,
        tp.1,
        100.0 * sp.1 as f64 / tp.1 as f64
    ));

    // One durable store per memory layer, written behind through a journal.
    let dh = config.n_embd / config.n_head;
    let loc = spec.store_location()?;
    log(&format!("memory stores: {loc}"));
    let mut stores: Vec<Option<LayerStore>> = Vec::with_capacity(config.n_layer);
    let mut writers: Vec<Option<WriteBehind>> = Vec::with_capacity(config.n_layer);
    for i in 0..config.n_layer {
        let Some(tier) = student.feed_forward_mut(i).and_then(FeedForward::memory_mut) else {
            stores.push(None);
            writers.push(None);
            continue;
        };
        if opts.value_lr > 0.0 {
            tier.set_trainable_values(true);
        }
        let store = rt.block_on(loc.open(run_dir, i, memory_config(dh, &spec)))?;
        let (mut w, _) = rt.block_on(WriteBehind::start(store.shared(), journal_path(run_dir, i)))?;
        if let Some(b) = tier.take_changes() {
            w.submit(b)?;
        }
        stores.push(Some(store));
        writers.push(Some(w));
    }
    set_learning(&mut student, true);

    let warmup = (opts.steps / 10).max(1);
    let mut times = PhaseTimes {
        synchronised: opts.profile,
        ..PhaseTimes::default()
    };
    let start = Instant::now();
    for step in first_step..opts.steps {
        let tick = step as u64 + 1;
        let mut lap = Lap::new(&mut times, opts.profile.then_some(&device));
        let b = sample_batch(&corpus.train, opts.batch, seq, &mut rng)?;
        let tl = teacher.forward(b.inputs(&device), None)?;
        lap.lap(0)?;
        let (sl, ff) = if opts.hidden_loss > 0.0 {
            student.forward_with_ff(b.inputs(&ad))?
        } else {
            (student.forward(b.inputs(&ad), None)?, Vec::new())
        };
        lap.lap(1)?;
        let kd = distill_kl(sl.clone(), tl, opts.temperature);
        let ce = cross_entropy(sl, b.targets(&ad));
        let mut loss = kd.clone().mul_scalar(opts.alpha) + ce.clone().mul_scalar(1.0 - opts.alpha);
        for (i, (ff_in, ff_out)) in ff.into_iter().enumerate() {
            if matches!(student.h[i].mlp, FeedForward::Featural(_) | FeedForward::Associative(_)) {
                let target = teacher.h[i].mlp.forward(ff_in.inner())?;
                let mse = (ff_out - target).powf_scalar(2.0).mean();
                loss = loss + mse.mul_scalar(opts.hidden_loss);
            }
        }
        let (l, kdv, cev) = (value(loss.clone())?, value(kd)?, value(ce)?);
        if !l.is_finite() {
            return Err(DmtError::InvalidArgument(format!(
                "the loss diverged at step {} ({l}); lower --lr",
                step + 1
            )));
        }
        lap.lap(2)?;
        let mut grads = loss.backward();
        let mut value_grads = Vec::with_capacity(config.n_layer);
        for blk in student.h.iter() {
            value_grads.push(blk.mlp.memory().and_then(|t| t.take_value_grad(&mut grads)));
        }
        lap.lap(3)?;
        let lr = lr_at(step, opts.steps, warmup, opts.lr, 0.1);
        let gp = GradientsParams::from_grads(grads, &student);
        student = optim.step(lr, student, gp);
        lap.lap(4)?;
        let mut inserted = 0;
        let mut batches = Vec::with_capacity(config.n_layer);
        for (i, g) in value_grads.into_iter().enumerate() {
            let vg = g.map(|g| (g, opts.value_lr));
            let Some(ff) = student.feed_forward_mut(i) else {
                continue;
            };
            match ff {
                FeedForward::Featural(f) => {
                    f.commit(tick, vg)?;
                }
                FeedForward::Associative(a) => {
                    inserted += a.commit(tick, opts.max_inserts, vg)?;
                }
                _ => continue,
            }
            if let Some(batch) = ff.memory_mut().and_then(DeviceMemory::take_changes) {
                batches.push((i, batch));
            }
        }
        lap.lap(5)?;
        for (i, batch) in batches {
            let w = writers
                .get_mut(i)
                .and_then(Option::as_mut)
                .ok_or_else(|| DmtError::InvalidArgument(format!("block {i}'s memory has no store writer")))?;
            w.submit(batch)?;
        }
        lap.lap(6)?;
        times.steps += 1;
        metrics.push(StepMetrics {
            step: step + 1,
            loss: l,
            kd: kdv,
            ce: cev,
            lr,
            inserted,
        });
        if (step + 1) % opts.log_every.max(1) == 0 || step + 1 == opts.steps {
            let toks = (step + 1 - first_step) * opts.batch * seq;
            log(&format!(
                "step {:>5}/{}  loss {l:.4}  (T²·KL {kdv:.4}, CE {cev:.4})  lr {lr:.2e}  inserted {inserted}  {:.0} tokens/s",
                step + 1,
                opts.steps,
                toks as f64 / start.elapsed().as_secs_f64()
            ));
            if opts.profile {
                log(&format!("        {}", times.summary()));
            }
        }
        let checkpoint_start = Instant::now();
        if (step + 1) % opts.checkpoint_every.max(1) == 0 || step + 1 == opts.steps {
            // The stores must hold every change up to here before they are copied.
            for w in writers.iter_mut() {
                if let Some(w) = w.take() {
                    w.finish()?;
                }
            }
            let name = format!("step-{:07}", step + 1);
            let cdir = run_dir.join("checkpoints").join(&name);
            if cdir.exists() {
                std::fs::remove_dir_all(&cdir).map_err(io(&cdir))?;
            }
            std::fs::create_dir_all(&cdir).map_err(io(&cdir))?;
            let mut layouts = Vec::with_capacity(config.n_layer);
            for (i, store) in stores.iter().enumerate() {
                match store {
                    Some(st) => {
                        rt.block_on(st.backup_to(&cdir.join(loc.checkpoint_name(i))))?;
                        let tier = student.feed_forward_mut(i).and_then(FeedForward::memory_mut);
                        layouts.push(tier.map(|t| t.layout()));
                    }
                    None => layouts.push(None),
                }
            }
            let path = cdir.join("student.bpk");
            student.clone().save_file(&path).map_err(ckpt_err(path))?;
            let path = cdir.join("optim.bpk");
            optim.save(&path).map_err(ckpt_err(path))?;
            let cp = Checkpoint {
                step: step + 1,
                rng: rng.0,
                metrics: metrics.clone(),
                layouts,
                dir: name.clone(),
            };
            let text = serde_json::to_string(&cp).map_err(|e| DmtError::InvalidArgument(e.to_string()))?;
            crate::loader::write_atomic(&run_dir.join("checkpoint.json"), text.as_bytes())?;
            for e in std::fs::read_dir(run_dir.join("checkpoints"))
                .map_err(io(run_dir))?
                .flatten()
            {
                if e.file_name().to_string_lossy() != name.as_str() {
                    std::fs::remove_dir_all(e.path()).map_err(io(&e.path()))?;
                }
            }
            for (i, store) in stores.iter().enumerate() {
                if let Some(st) = store {
                    let (w, _) = rt.block_on(WriteBehind::start(st.shared(), journal_path(run_dir, i)))?;
                    writers[i] = Some(w);
                }
            }
        }
        times.seconds[7] += checkpoint_start.elapsed().as_secs_f64();
        if opts.halt_after == Some(step + 1) {
            return Err(DmtError::Halted { step: step + 1 });
        }
    }
    let done = opts.steps.saturating_sub(first_step);
    let train_tps = (done * opts.batch * seq) as f64 / start.elapsed().as_secs_f64().max(1e-9);
    for w in writers.into_iter().flatten() {
        w.finish()?;
    }
    for st in stores.into_iter().flatten() {
        rt.block_on(st.close())?;
    }
    student
        .save_into(&mut SafetensorsStore::from_file(run_dir.join("student.safetensors")))
        .map_err(|e| DmtError::Checkpoint {
            path: run_dir.join("student.safetensors"),
            message: e.to_string(),
        })?;
    log("evaluating ...");
    let eval = eval_batches(&corpus.eval, opts.batch, seq, opts.eval_windows);
    final_report(
        &teacher,
        &mut student,
        &eval,
        run_dir,
        &loc.dir(run_dir),
        Some((train_tps, times)),
        &opts.device_name,
        metrics,
    )
}

fn read_spec(run_dir: &Path) -> Result<StudentSpec> {
    let spec_path = run_dir.join("student.json");
    let text = std::fs::read_to_string(&spec_path).map_err(io(&spec_path))?;
    serde_json::from_str(&text).map_err(|e| DmtError::Config {
        path: spec_path.clone(),
        message: e.to_string(),
    })
}

/// The student skeleton of a run directory: the teacher's weights with memory
/// layers over tiers loaded from the run's stores (in `layouts` when given);
/// the caller loads the trained weights over it.
fn student_from_run(
    run_dir: &Path,
    spec: &StudentSpec,
    layouts: Option<&[Option<Vec<Option<u64>>>]>,
    ad: &Device,
    rt: &tokio::runtime::Runtime,
) -> Result<Gpt2> {
    let plan = spec
        .layers
        .iter()
        .map(|s| s.parse::<LayerKind>())
        .collect::<Result<Vec<_>>>()?;
    let mut student = Gpt2::from_pretrained(&spec.teacher, ad)?;
    let loc = spec.store_location()?;
    let (c, h) = (spec.config.n_embd, spec.config.n_head);
    for (i, kind) in plan.iter().enumerate() {
        let ff = match kind {
            LayerKind::Featural | LayerKind::Associative => {
                if let Some(path) = loc.file(run_dir, i).filter(|p| !p.exists()) {
                    return Err(DmtError::InvalidArgument(format!(
                        "{} is missing: {} is not a complete run directory",
                        path.display(),
                        run_dir.display()
                    )));
                }
                let layer_store = rt.block_on(loc.open_existing(run_dir, i))?;
                let store = layer_store.shared();
                let layout = layouts.and_then(|l| l.get(i).cloned().flatten());
                let tier = match layout {
                    Some(l) => rt.block_on(DeviceMemory::load_with_layout(&store, &l, ad))?,
                    None => rt.block_on(DeviceMemory::load(&store, spec.capacity, ad))?,
                };
                drop(store);
                rt.block_on(layer_store.close())?;
                if *kind == LayerKind::Featural {
                    FeedForward::Featural(FeaturalMemory::new(c, h, spec.k, tier, ad)?)
                } else {
                    FeedForward::Associative(AssociativeMemory::new(c, h, spec.k, tier, ad)?)
                }
            }
            LayerKind::Ablated => FeedForward::Ablated(burn::nn::Identity),
            LayerKind::Mlp => continue,
        };
        student.set_feed_forward(i, ff)?;
    }
    Ok(student)
}

/// Rebuilds the student of `run_dir` (its weights and, from the stores, its
/// memories) and evaluates it on `corpus` against its teacher.
pub fn eval_only(run_dir: &Path, corpus: &Path, opts: &DistillOptions) -> Result<Report> {
    let device = opts.device.clone();
    let ad = device.clone().autodiff();
    let spec = read_spec(run_dir)?;
    let codec = TextCodec::for_model(&spec.teacher, opts.tokenizer.as_deref())?;
    let teacher = Gpt2::from_pretrained(&spec.teacher, &device)?;
    let rt = runtime()?;
    let mut student = student_from_run(run_dir, &spec, None, &ad, &rt)?;
    let weights = run_dir.join("student.safetensors");
    let result = student
        .load_from(&mut SafetensorsStore::from_file(&weights))
        .map_err(|e| DmtError::Checkpoint {
            path: weights.clone(),
            message: e.to_string(),
        })?;
    if !result.missing.is_empty() {
        return Err(DmtError::Checkpoint {
            path: weights,
            message: format!("missing weights: {:?}", result.missing),
        });
    }
    let tokens = read_tokens(&codec, corpus)?;
    let eval = eval_batches(
        &tokens,
        opts.batch,
        opts.seq.min(spec.config.n_positions),
        opts.eval_windows,
    );
    final_report(
        &teacher,
        &mut student,
        &eval,
        run_dir,
        &spec.store_location()?.dir(run_dir),
        None,
        &opts.device_name,
        Vec::new(),
    )
}
