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
//! (SQLite under the run directory), copied with the weights at each
//! checkpoint, which is what a resumed run restores; the run directory is
//! self-contained (student weights as safetensors, `student.json`, the
//! stores) and `--eval-only` rebuilds the student from it.

use rand_core::SeedableRng as _;
use rayon::prelude::*;
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

use crate::accounting::Accounting;
use crate::config::Gpt2Config;
use crate::gpt2::Mlp;
use crate::loss::{LossKernel, tied_loss};
use crate::memory::associative::AssociativeMemory;
use crate::memory::device::on_cpu;
use crate::memory::featural::{FeaturalMemory, unit_rows};
use crate::memory::journal::{AfterDone, Group, WriteBehind};
use crate::memory::keyvalue::KeyValueMemory;
use crate::memory::layers::{LayerKind, MemoryInit, parse_layers};
use crate::memory::product::fit_grid;
use crate::memory::readback::HostReads;
use crate::memory::tier::{DeviceMemory, ValueAblation};
use crate::ngram::Bigram;
use crate::tokenizer::TextCodec;
use crate::train::{Corpus, EvalStats, SplitMix64, Window, eval_batches, evaluate, lr_at, sample_batch, seeded_normal};
use crate::{DmtError, FeedForward, Gpt2, Result, cpu_f32, host_f32, io_error as io, runtime};

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
    /// Tables per memory layer: one per head, or 1 (shared by the heads;
    /// also what runs that do not record it used).
    #[serde(default = "one")]
    pub memory_parts: usize,
    /// Hidden width of the MLP blocks (`None`: the teacher's).
    #[serde(default)]
    pub mlp_width: Option<usize>,
    /// How the featural layers' memories started.
    #[serde(default = "teacher_init")]
    pub featural_init: MemoryInit,
    /// How the associative layers' memories started.
    #[serde(default = "teacher_init")]
    pub associative_init: MemoryInit,
    /// The training text (absent in runs that do not record it).
    #[serde(default)]
    pub corpus: Option<TrainingText>,
    /// Memories a key-value layer sums per position.
    #[serde(default = "default_kv_k")]
    pub kv_k: usize,
    /// Slots added to each memory layer's table for memorised text
    /// (`memorize` sets it; 0 until then).
    #[serde(default)]
    pub memory_room: usize,
    /// Layerwise feedback's parallel training passes (`None`: no feedback).
    #[serde(default)]
    pub feedback: Option<usize>,
}

fn default_kv_k() -> usize {
    64
}

/// Where a run's training text came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainingText {
    /// The corpus file.
    pub path: PathBuf,
    /// Whether its last 10% was held out (no separate held-out file).
    pub held_out_tail: bool,
}

fn one() -> usize {
    1
}

fn teacher_init() -> MemoryInit {
    MemoryInit::Teacher
}

impl StudentSpec {
    /// Where this run's stores live.
    pub fn store_location(&self) -> Result<StoreLocation> {
        self.store.as_deref().map_or(Ok(StoreLocation::default()), str::parse)
    }
}

/// Everything a distillation run is asked to do.
#[derive(Clone, Debug)]
#[non_exhaustive]
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
    /// Device-tier slots per memory layer (and memories bootstrapped), rounded
    /// down to a multiple of the head partitions.
    pub capacity: usize,
    /// Learning rate of the sparse value updates (0: stored values fixed).
    pub value_lr: f32,
    /// Novelty threshold of insertion (L2 between unit keys); recombination
    /// below a quarter of it.
    pub novelty: f32,
    /// Most memories a growing layer inserts or recombines per step.
    pub max_inserts: usize,
    /// Memories a key-value layer sums per position.
    pub kv_k: usize,
    /// One table shared by a layer's heads instead of one per head (an
    /// ablation).
    pub shared_heads: bool,
    /// How featural memories start (`Empty`: they grow, with the teacher's
    /// feed-forward output on the same input as each new memory's value).
    pub featural_init: MemoryInit,
    /// How associative memories start (they always learn: insert novel
    /// keys and values of their own projections, recombine near-duplicates).
    pub associative_init: MemoryInit,
    /// Train (or reuse) the attention-only baseline and compare with it.
    pub attention_baseline: bool,
    /// Where trained attention-only baselines are kept for reuse (`None`:
    /// `.baselines` beside the run directory).
    pub baseline_cache: Option<PathBuf>,
    /// Hidden width of the student's MLP blocks (`None`: the teacher's):
    /// narrower keeps the teacher's units with the largest weight norms,
    /// wider adds units that start silent (the dense baselines).
    pub mlp_width: Option<usize>,
    /// Weight of the hidden-state loss: for each memory block, the MSE between
    /// the memory layer's output and the teacher's MLP output on the same
    /// input (0: off).
    pub hidden_loss: f64,
    /// Layerwise feedback ([`crate::gpt2::Feedback`]) in the student,
    /// trained with this many parallel passes (`None`: off).
    pub feedback: Option<usize>,
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
    /// report's phase times are exact on a GPU (costs some throughput); on
    /// the CPU, run the teacher's forward pass before the student's instead
    /// of beside it, so that each is timed.
    pub profile: bool,
    /// The float type of the student's and teacher's matrix products
    /// ([`crate::precision`]; f16 only on a device that computes in it).
    pub precision: crate::precision::Precision,
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
            kv_k: 128,
            shared_heads: false,
            featural_init: MemoryInit::Teacher,
            associative_init: MemoryInit::Empty,
            mlp_width: None,
            attention_baseline: true,
            baseline_cache: None,
            hidden_loss: 0.0,
            feedback: None,
            eval_windows: 128,
            log_every: 10,
            checkpoint_every: 100,
            resume: false,
            halt_after: None,
            profile: false,
            precision: crate::precision::Precision::F32,
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
    /// New memories inserted this step (all layers).
    pub inserted: usize,
    /// Each memory layer's table after this step.
    #[serde(default)]
    pub memory: Vec<LayerStep>,
}

/// One memory layer's table after a training step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerStep {
    /// The block.
    pub block: usize,
    /// Memories held.
    pub rows: usize,
    /// New memories inserted this step.
    pub inserted: usize,
    /// Recombined memories created this step (each replaces its sources).
    pub merged: usize,
    /// Memories evicted this step.
    pub evicted: usize,
    /// Share of the memories held that were retrieved since the previous
    /// logged step (recorded at logged steps only).
    pub retrieved: Option<f64>,
}

/// Wall time of the training loop by phase, summed over the steps of one
/// run (a resumed run counts its own steps). Without `--profile` a GPU's
/// queued work is counted in the phase that waits for it (the memory
/// commit's two reads, which carry the loss too), and on the CPU the
/// teacher's forward pass runs beside the student's (both in the student's
/// phase); with it, the device is synchronised at every phase boundary and
/// the passes run one after the other.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PhaseTimes {
    /// Seconds per phase, in the order of [`PhaseTimes::NAMES`].
    pub seconds: [f64; 8],
    /// Steps timed.
    pub steps: usize,
    /// Whether the device was synchronised at each boundary (`--profile`).
    pub synchronised: bool,
    /// Tensors read back to the host by the timed steps ([`crate::host_reads`]:
    /// each one waits for the device), checkpoints excluded.
    pub host_reads: u64,
}

impl PhaseTimes {
    /// The phases: batch sampling and the teacher's forward pass; the
    /// student's forward pass (to the logits, computed off the autodiff
    /// graph); the loss (KL and cross-entropy over the vocabulary and their
    /// gradient with respect to the logits, the optional hidden-state loss);
    /// the backward pass (from the LM head's two products down); the
    /// optimiser step; the memory layers' commit (reading the loss and what
    /// the searches found, accesses, value updates, merges and inserts on
    /// the device tier); handing the change batches to the stores' writers;
    /// checkpoints.
    pub const NAMES: [&'static str; 8] = [
        "teacher forward",
        "student forward",
        "loss",
        "backward",
        "optimizer",
        "memory commit",
        "write-behind",
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
        format!(
            "ms/step: {} (total {:.1}); host reads/step {:.1}",
            parts.join(", "),
            ms.iter().sum::<f64>(),
            self.reads_per_step()
        )
    }

    /// Tensors read back to the host per step.
    pub fn reads_per_step(&self) -> f64 {
        self.host_reads as f64 / self.steps.max(1) as f64
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

/// One model of a report: its held-out figures and what it costs.
#[derive(Clone, Debug)]
pub struct ModelRow {
    /// How the report names it.
    pub name: String,
    /// Held-out figures (KL and agreement against the teacher where given).
    pub eval: EvalStats,
    /// Its inference cost (`None`: not a network, e.g. the n-gram floor).
    pub cost: Option<Accounting>,
}

/// What a run (or `--eval-only`) reports.
#[derive(Clone, Debug)]
pub struct Report {
    /// Teacher on the held-out text.
    pub teacher: EvalStats,
    /// Student on the held-out text, against the teacher.
    pub student: EvalStats,
    /// The attention-only baseline (the teacher without feed-forward
    /// layers, distilled with the student's recipe), when the run has one.
    pub attention: Option<EvalStats>,
    /// Cross-entropy of the bigram floor ([`Bigram`]) on the same positions.
    pub bigram_nll: f64,
    /// Teacher without feed-forward layers, not retrained (a secondary
    /// reference: it was never trained to work without them).
    pub ablated: EvalStats,
    /// Teacher's inference cost.
    pub teacher_cost: Accounting,
    /// Student's inference cost.
    pub student_cost: Accounting,
    /// The attention-only baseline's cost.
    pub attention_cost: Option<Accounting>,
    /// Bytes of each memory block's store on disk (`None`: no memory, or a
    /// store served by a daemon).
    pub store_bytes: Vec<Option<u64>>,
    /// Whether each memory layer's memory matters on the held-out text.
    pub memory_use: Vec<LayerUse>,
    /// With layerwise feedback: KL(exact ‖ training approximation) per
    /// held-out position, nats ([`crate::train::feedback_mismatch`]).
    pub feedback_mismatch: Option<f64>,
    /// Training tokens per second (`None` for `--eval-only`).
    pub train_tokens_per_s: Option<f64>,
    /// Where the training time went (`None` for `--eval-only`).
    pub phases: Option<PhaseTimes>,
    /// Device.
    pub device: String,
    /// Per-step metrics.
    pub steps: Vec<StepMetrics>,
}

/// How much the student needs one memory layer's memory on the held-out
/// text: which share of its rows the text retrieves, and the student's
/// cross-entropy with that layer's values zeroed (the layer adds nothing) and
/// shuffled among its memories (retrieval intact, contents wrong).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerUse {
    /// The block.
    pub block: usize,
    /// Share of the layer's rows retrieved at least once.
    pub retrieved: f64,
    /// Held-out cross-entropy with the layer's values zeroed.
    pub nll_zeroed: f64,
    /// Held-out cross-entropy with the layer's values shuffled.
    pub nll_shuffled: f64,
}

/// [`LayerUse`] of every memory layer of `student` on `eval`.
pub fn memory_use(student: &Gpt2, eval: &[Window]) -> Result<Vec<LayerUse>> {
    let student = &mut crate::train::untracked(student);
    let device = student.device();
    let blocks: Vec<usize> = (0..student.h.len())
        .filter(|&i| student.h[i].mlp.memory().is_some_and(|t| !t.is_store_backed()))
        .collect();
    let mut seen: Vec<std::collections::HashSet<usize>> = vec![Default::default(); student.h.len()];
    set_learning(student, true);
    let mut passes = || -> Result<()> {
        for w in eval {
            student.forward(w.inputs(&device), None)?;
            for &i in &blocks {
                seen[i].extend(student.h[i].mlp.take_retrieved()?.unwrap_or_default());
            }
        }
        Ok(())
    };
    let counted = passes();
    set_learning(student, false);
    counted?;
    let mut out = Vec::with_capacity(blocks.len());
    for &i in &blocks {
        let mut nll = [0.0; 2];
        for (n, how) in nll
            .iter_mut()
            .zip([ValueAblation::Zero, ValueAblation::Shuffle { seed: 1 }])
        {
            let mut m = student.clone();
            let ff = m
                .feed_forward_mut(i)
                .and_then(FeedForward::memory_mut)
                .ok_or_else(|| DmtError::InvalidArgument(format!("block {i} has no memory")))?;
            *ff = ff.with_ablated_values(how)?;
            *n = evaluate(&m, None, eval)?.nll;
        }
        let rows = student.h[i].mlp.memory().map_or(0, |t| t.len());
        out.push(LayerUse {
            block: i,
            retrieved: seen[i].len() as f64 / rows.max(1) as f64,
            nll_zeroed: nll[0],
            nll_shuffled: nll[1],
        });
    }
    Ok(out)
}

/// The share of the gap from `base` to `top` (cross-entropies, nats per
/// token) that `model` closes: `(base − model) / (base − top)`.
pub fn recovered(base: f64, model: f64, top: f64) -> f64 {
    (base - model) / (base - top)
}

impl Report {
    /// `accounting.csv`: for the teacher, the student and the attention-only
    /// baseline, one row per feed-forward layer (trained weights, memory
    /// rows and floats, store bytes on disk, multiply-adds per token) and
    /// one row `all` with the model's non-embedding weights and totals.
    pub fn accounting_csv(&self) -> String {
        let mut s =
            String::from("model,block,layer,trained_weights,memory_rows,memory_floats,store_bytes,macs_per_token\n");
        let models = [
            Some(("teacher", &self.teacher_cost, None)),
            Some(("student", &self.student_cost, Some(&self.store_bytes))),
            self.attention_cost.as_ref().map(|c| ("attention-only", c, None)),
        ];
        for (name, c, bytes) in models.into_iter().flatten() {
            for l in &c.layers {
                let b = bytes
                    .and_then(|b: &Vec<Option<u64>>| b.get(l.block).copied().flatten())
                    .map_or(String::new(), |b| b.to_string());
                s += &format!(
                    "{name},{},{},{},{},{},{b},{}\n",
                    l.block, l.kind, l.weights, l.memory_rows, l.memory_floats, l.macs_per_token
                );
            }
            let rows: usize = c.layers.iter().map(|l| l.memory_rows).sum();
            let b: u64 = bytes.map_or(0, |b| b.iter().flatten().sum());
            s += &format!(
                "{name},all,non-embedding,{},{rows},{},{b},{}\n",
                c.weights,
                c.memory_floats(),
                c.ff_macs_per_token() + c.shared_macs_per_token
            );
        }
        s
    }

    /// Memory rows of each block (`None`: not a memory layer).
    pub fn memory_rows(&self) -> Vec<Option<usize>> {
        self.student_cost
            .layers
            .iter()
            .map(|l| {
                matches!(l.kind.as_str(), "featural" | "product" | "associative" | "keyvalue").then_some(l.memory_rows)
            })
            .collect()
    }

    /// The headline: the share of the teacher's advantage over the trained
    /// attention-only baseline that the student recovers, in nats per token
    /// (`None` without the baseline).
    pub fn recovered(&self) -> Option<f64> {
        self.attention
            .as_ref()
            .map(|a| recovered(a.nll, self.student.nll, self.teacher.nll))
    }

    /// The same share against the untrained ablation (a secondary figure:
    /// that model was never trained to work without its feed-forward layers).
    pub fn recovered_from_untrained_ablation(&self) -> f64 {
        recovered(self.ablated.nll, self.student.nll, self.teacher.nll)
    }

    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::from("# Distillation report\n\n");
        let ratio = self.student.perplexity() / self.teacher.perplexity();
        match self.recovered() {
            Some(r) => {
                s += &format!(
                    "The student recovers **{:.1}%** of the teacher's advantage over the attention-only baseline \
                     trained with the same recipe ((CE_attention − CE_student) / (CE_attention − CE_teacher), nats per \
                     token), with **{:.1}%** of the teacher's non-embedding weights ({:.1}% counting its memory \
                     tables). Perplexity student / teacher {ratio:.3}; KL(teacher ‖ student) {}; top-1 agreement {}.\n\n",
                    100.0 * r,
                    100.0 * self.student_cost.weights as f64 / self.teacher_cost.weights.max(1) as f64,
                    100.0 * self.student_cost.weights_and_memory() as f64 / self.teacher_cost.weights.max(1) as f64,
                    fmt_opt(self.student.kl, |v| format!("{v:.4}")),
                    fmt_opt(self.student.agreement, |v| format!("{:.1}%", 100.0 * v)),
                )
            }
            None => {
                s += &format!(
                    "No attention-only baseline in this run: perplexity student / teacher {ratio:.3}; \
                     KL(teacher ‖ student) {}; top-1 agreement {}.\n\n",
                    fmt_opt(self.student.kl, |v| format!("{v:.4}")),
                    fmt_opt(self.student.agreement, |v| format!("{:.1}%", 100.0 * v)),
                )
            }
        }
        s += "| model | held-out CE (nats/token) | perplexity | KL(teacher ‖ model) | top-1 agreement | tokens/s (eval) |\n";
        s += "| --- | --- | --- | --- | --- | --- |\n";
        let row = |name: &str, e: &EvalStats| {
            format!(
                "| {name} | {:.4} | {:.3} | {} | {} | {:.0} |\n",
                e.nll,
                e.perplexity(),
                fmt_opt(e.kl, |v| format!("{v:.4}")),
                fmt_opt(e.agreement, |v| format!("{:.1}%", 100.0 * v)),
                e.tokens as f64 / e.seconds.max(1e-9)
            )
        };
        s += &row("teacher", &self.teacher);
        s += &row("student", &self.student);
        if let Some(a) = &self.attention {
            s += &row("attention-only, distilled with the same recipe", a);
        }
        s += &format!(
            "| bigram, absolute discounting (counts of the training text) | {:.4} | {:.3} | — | — | — |\n",
            self.bigram_nll,
            self.bigram_nll.exp()
        );
        s += &row(
            "*secondary:* teacher without feed-forward layers, not retrained",
            &self.ablated,
        );
        s += "\n";
        if let Some(m) = self.feedback_mismatch {
            s += &format!(
                "The student has layerwise feedback; its figures are the exact sequential computation. Trained with \
                 the teacher-forced approximation, which differs from it by KL(exact ‖ approximation) = {m:.5} nats \
                 per held-out position.\n\n"
            );
        }
        s += &format!(
            "Against the untrained ablation (secondary; it was never trained without its feed-forward layers) the \
             student closes {:.2}% of the gap.\n\n",
            100.0 * self.recovered_from_untrained_ablation()
        );
        s += "## What each model needs at inference\n\n";
        s += &cost_table(
            &self.teacher_cost,
            [
                Some(("teacher", &self.teacher_cost)),
                Some(("student", &self.student_cost)),
                self.attention_cost.as_ref().map(|c| ("attention-only", c)),
            ]
            .into_iter()
            .flatten(),
        );
        s += "\nThe student's feed-forward layers:\n\n";
        s += &layer_table(&self.student_cost, &self.store_bytes);
        s += "\n";
        if !self.memory_use.is_empty() {
            s += &format!(
                "## Does the memory matter?\n\nOn the held-out text (the student's cross-entropy there: {:.4}):\n\n\
                 | block | share of rows retrieved | CE with the layer's values zeroed | CE with its values shuffled among its memories |\n\
                 | --- | --- | --- | --- |\n",
                self.student.nll
            );
            for u in &self.memory_use {
                s += &format!(
                    "| {} | {:.1}% | {:.4} ({:+.4}) | {:.4} ({:+.4}) |\n",
                    u.block,
                    100.0 * u.retrieved,
                    u.nll_zeroed,
                    u.nll_zeroed - self.student.nll,
                    u.nll_shuffled,
                    u.nll_shuffled - self.student.nll
                );
            }
            s += "\n";
        }
        if let Some(t) = self.train_tokens_per_s {
            s += &format!("Training: {t:.0} tokens/s. ");
        }
        s += &format!(
            "Held-out text: {} positions. Device: {}.\n",
            self.student.tokens, self.device
        );
        if let Some(p) = &self.phases {
            s += &format!(
                "\n| training phase | ms per step | share |\n| --- | --- | --- |\n{}\n{} steps timed{}; {:.1} \
                 tensors read back to the host per step.\n",
                phase_rows(p),
                p.steps,
                if p.synchronised {
                    ", device synchronised at each phase (--profile)"
                } else {
                    "; GPU work is counted where the host waits for it, and on the CPU the teacher's forward \
                     pass runs beside the student's, in its row (--profile synchronises and times them apart)"
                },
                p.reads_per_step()
            );
        }
        s
    }

    /// The losses per step, then, for each memory block `i`, its rows,
    /// inserts, merges and evictions that step and the share of its rows
    /// retrieved since the previous logged step (`b{i}_rows`, ...,
    /// `b{i}_retrieved`; empty where not logged).
    pub fn csv(&self) -> String {
        let blocks: Vec<usize> = self
            .steps
            .first()
            .map_or(Vec::new(), |m| m.memory.iter().map(|l| l.block).collect());
        let mut s = String::from("step,loss,kd,ce,lr,inserted");
        for b in &blocks {
            s += &format!(",b{b}_rows,b{b}_inserted,b{b}_merged,b{b}_evicted,b{b}_retrieved");
        }
        s.push('\n');
        for m in &self.steps {
            s += &format!("{},{},{},{},{},{}", m.step, m.loss, m.kd, m.ce, m.lr, m.inserted);
            for b in &blocks {
                match m.memory.iter().find(|l| l.block == *b) {
                    Some(l) => {
                        s += &format!(",{},{},{},{},", l.rows, l.inserted, l.merged, l.evicted);
                        if let Some(r) = l.retrieved {
                            s += &format!("{r}");
                        }
                    }
                    None => s += ",,,,,",
                }
            }
            s.push('\n');
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

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or("—".into(), f)
}

/// The cost of each model, with ratios to `reference` (the teacher).
pub fn cost_table<'a>(reference: &Accounting, models: impl Iterator<Item = (&'a str, &'a Accounting)>) -> String {
    let t = reference.weights.max(1) as f64;
    let mut s = String::from(
        "| model | non-embedding weights | memory rows | memory floats | weights + memory floats | \
         weights / teacher's | (weights + memory) / teacher's | feed-forward multiply-adds per token |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for (name, c) in models {
        let rows: usize = c.layers.iter().map(|l| l.memory_rows).sum();
        s += &format!(
            "| {name} | {} | {rows} | {} | {} | {:.1}% | {:.1}% | {} |\n",
            c.weights,
            c.memory_floats(),
            c.weights_and_memory(),
            100.0 * c.weights as f64 / t,
            100.0 * c.weights_and_memory() as f64 / t,
            c.ff_macs_per_token()
        );
    }
    s
}

/// One model's feed-forward layers, block by block.
pub fn layer_table(cost: &Accounting, store_bytes: &[Option<u64>]) -> String {
    let mut s = String::from(
        "| block | layer | trained weights | memory rows | memory floats | store on disk | multiply-adds per token |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for l in &cost.layers {
        let bytes = store_bytes
            .get(l.block)
            .copied()
            .flatten()
            .map_or("—".into(), |b| format!("{:.2} MB", b as f64 / 1e6));
        s += &format!(
            "| {} | {} | {} | {} | {} | {bytes} | {} |\n",
            l.block, l.kind, l.weights, l.memory_rows, l.memory_floats, l.macs_per_token
        );
    }
    s
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
        LayerKind::Product => "product",
        LayerKind::Associative => "associative",
        LayerKind::KeyValue => "keyvalue",
        LayerKind::Ablated => "none",
    }
}

/// Weights of a model: (all, non-embedding).
pub fn param_counts(m: &Gpt2) -> (usize, usize) {
    let emb = m.wte.weight.val().dims().iter().product::<usize>() + m.wpe.weight.val().dims().iter().product::<usize>();
    let all = m.num_params();
    (all, all - emb)
}

/// The store configuration of a memory layer of `kind`: one head wide and
/// L2 for featural and associative layers; the whole width (keys with a
/// bias term) and inner product for key-value layers.
fn memory_config(kind: LayerKind, spec: &StudentSpec) -> MemoryConfig {
    let (c, h) = (spec.config.n_embd, spec.config.n_head);
    let base = match kind {
        LayerKind::KeyValue => MemoryConfig::new(c + 1, c).with_metric(Metric::InnerProduct),
        _ => MemoryConfig::new(c / h, c / h).with_metric(Metric::L2),
    };
    base.with_eviction(EvictionPolicy::Lrfu { lambda: spec.lambda })
        .with_thresholds(spec.novelty / 4.0, spec.novelty)
}

/// Reads a sampler state written either as the generator's own serde form or
/// as its bare `u64` state (the same SplitMix64 state, so a resumed run draws
/// the same batches either way).
fn sampler_state<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<SplitMix64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum State {
        Bare(u64),
        Full(SplitMix64),
    }
    Ok(match State::deserialize(d)? {
        State::Bare(x) => SplitMix64::seed_from_u64(x),
        State::Full(r) => r,
    })
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
    /// The batch sampler's state (`{"x": state}`; a bare number in
    /// checkpoints written before the generator came from `rand_xoshiro`).
    #[serde(deserialize_with = "sampler_state")]
    rng: SplitMix64,
    /// Metrics of the steps done.
    metrics: Vec<StepMetrics>,
    /// Each memory block's slot layout.
    layouts: Vec<Option<Vec<Option<u64>>>>,
    /// The checkpoint's folder under `checkpoints/`.
    dir: String,
}

/// A checkpoint whose weights are saved and whose store copies run on the
/// stores' writers ([`WriteBehind::after`]: each once its store holds
/// every change up to the checkpoint's step). It becomes the run's
/// checkpoint ([`PendingCheckpoint::complete`]: `checkpoint.json` names it)
/// only after every copy has finished, so a crash before that resumes from
/// the checkpoint before it.
struct PendingCheckpoint {
    /// `checkpoint.json`'s contents.
    text: String,
    /// The checkpoint's folder name under `checkpoints/`.
    name: String,
    /// That folder.
    dir: PathBuf,
    /// The store copies' results, block by block.
    copies: Vec<AfterDone>,
}

impl PendingCheckpoint {
    /// Whether every store copy has finished (without waiting).
    fn is_done(&mut self) -> bool {
        self.copies.iter_mut().all(AfterDone::is_done)
    }

    /// Completes the checkpoint in `pending`, if there is one, leaving none.
    fn complete_any(
        pending: &mut Option<PendingCheckpoint>,
        run_dir: &Path,
        writers: &mut [Option<WriteBehind>],
    ) -> Result<()> {
        pending.take().map_or(Ok(()), |p| p.complete(run_dir, writers))
    }

    /// Waits for the store copies, then writes `checkpoint.json` naming this
    /// checkpoint and removes the others. A copy that failed because its
    /// writer stopped reports the writer's error (the writers are finished).
    fn complete(self, run_dir: &Path, writers: &mut [Option<WriteBehind>]) -> Result<()> {
        let mut copied = Ok(());
        for copy in self.copies {
            let done = copy.wait();
            if copied.is_ok() {
                copied = done;
            }
        }
        if let Err(e) = copied {
            WriteBehind::finish_all(writers.iter_mut().filter_map(Option::take))?;
            return Err(DmtError::Checkpoint {
                path: self.dir,
                message: format!("a store's copy did not finish: {e}"),
            });
        }
        crate::loader::write_atomic(&run_dir.join("checkpoint.json"), self.text.as_bytes())?;
        for e in std::fs::read_dir(run_dir.join("checkpoints"))
            .map_err(io(run_dir))?
            .flatten()
        {
            if e.file_name().to_string_lossy() != self.name.as_str() {
                std::fs::remove_dir_all(e.path()).map_err(io(&e.path()))?;
            }
        }
        Ok(())
    }
}

/// Removes a write-behind journal of block `block` left in the run
/// directory: the checkpoint being restored supersedes its batches (the
/// run's own writers keep no journal; see [`WRITE_GROUP`]).
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

/// A memory layer for a block whose teacher feed-forward layer maps the
/// inputs `x` to the outputs `y` (`[positions, n_embd]`, from
/// [`teacher_ff`]); its output projection starts as the identity, so the
/// layer's output lives where the teacher's feed-forward output does.
///
/// - `Teacher`: keys = unit per-head projections of `x` (the featural
///   query projection, the associative key projection, both seeded), values
///   = the per-head slices of `y`; the table is full from the start, so the
///   student begins as a k-nearest-neighbour regression of the teacher's
///   feed-forward layer.
/// - `Empty`: no memories; the layer grows while it trains.
/// - `Random`: as many random unit keys and small random values as
///   `Teacher` would give (an ablation).
///
/// An associative layer's value projection, whose outputs become the values
/// of the memories it inserts, starts as the least-squares linear map from
/// `x` to `y` (ridge-regularised), unless the memory starts `Random`.
fn memory_layer(
    kind: LayerKind,
    init: MemoryInit,
    (x, y): (Tensor<2>, Tensor<2>),
    spec: &StudentSpec,
    rng: &mut SplitMix64,
    device: &Device,
) -> Result<FeedForward> {
    let c = spec.config.n_embd;
    let h = spec.config.n_head;
    let dh = c / h;
    let n = x.dims()[0];
    let rows = (spec.capacity / h).min(n);
    if init != MemoryInit::Empty && rows * h < spec.k {
        return Err(DmtError::InvalidArgument(format!(
            "{} bootstrap memories are fewer than k = {}",
            rows * h,
            spec.k
        )));
    }
    let config = memory_config(kind, spec);
    let empty = || DeviceMemory::new(config.clone(), spec.capacity, device)?.with_parts(spec.memory_parts);
    let xs = x.clone().slice([0..rows, 0..c]);
    let project = |lin: &burn::nn::Linear| -> Result<Vec<f32>> {
        let w = lin.weight.val().inner();
        let b = lin.bias.as_ref().map(|b| b.val().inner());
        let mut p = xs.clone().matmul(w.to_device(&xs.device()));
        if let Some(b) = b {
            p = p + b.to_device(&xs.device()).unsqueeze_dim::<2>(0);
        }
        host_f32(unit_rows(p.reshape([rows * h, dh])))
    };
    let out_identity = |lin: &mut burn::nn::Linear| {
        lin.weight = Param::from_tensor(identity(c, device));
        lin.bias = lin.bias.take().map(|b| Param::from_tensor(b.val().zeros_like()));
    };
    let seeded = |lin: &mut burn::nn::Linear, rng: &mut SplitMix64| {
        lin.weight = Param::from_tensor(seeded_normal(c, c, rng, device));
        lin.bias = lin.bias.take().map(|b| Param::from_tensor(b.val().zeros_like()));
    };
    let fill = |lin: &burn::nn::Linear, rng: &mut SplitMix64| -> Result<DeviceMemory> {
        let mut t = empty()?;
        match init {
            MemoryInit::Empty => {}
            MemoryInit::Teacher => {
                let values = host_f32(y.clone().slice([0..rows, 0..c]).reshape([rows * h, dh]))?;
                t.fill(&project(lin)?, &values, 0)?;
            }
            MemoryInit::Random => {
                let values = host_f32(seeded_normal(rows * h, dh, rng, device))?;
                let keys = host_f32(unit_rows(seeded_normal(rows * h, dh, rng, device)))?;
                t.fill(&keys, &values, 0)?;
            }
        }
        Ok(t)
    };
    Ok(match kind {
        LayerKind::Featural => {
            let mut f = FeaturalMemory::new(c, h, spec.k, empty()?, device)?;
            out_identity(&mut f.out);
            seeded(&mut f.query, rng);
            *f.memory_mut() = fill(&f.query, rng)?;
            FeedForward::Featural(f)
        }
        LayerKind::Product => {
            let grid = empty()?.with_product_keys()?;
            let mut f = FeaturalMemory::new(c, h, spec.k, grid.clone(), device)?;
            out_identity(&mut f.out);
            seeded(&mut f.query, rng);
            let (keys, values) = match init {
                MemoryInit::Teacher => product_grid(
                    &project(&f.query)?,
                    &host_f32(y.clone().slice([0..rows, 0..c]).reshape([rows * h, dh]))?,
                    spec,
                    rng,
                )?,
                MemoryInit::Random => random_grid(spec, rng)?,
                MemoryInit::Empty => {
                    return Err(DmtError::InvalidArgument(
                        "a product-key memory is a full grid from the start (--featural-init teacher or random), it \
                         does not grow from empty"
                            .into(),
                    ));
                }
            };
            let mut t = grid;
            t.fill(&keys, &values, 0)?;
            *f.memory_mut() = t;
            FeedForward::Featural(f)
        }
        LayerKind::Associative => {
            let mut a = AssociativeMemory::new(c, h, spec.k, empty()?, device)?;
            out_identity(&mut a.out);
            seeded(&mut a.key, rng);
            seeded(&mut a.value, rng);
            if init != MemoryInit::Random {
                let (w, b) = fit_linear(&host_f32(x.clone())?, &host_f32(y.clone())?, c, 1e-3)?;
                a.value.weight = Param::from_tensor(Tensor::from_data(TensorData::new(w, [c, c]), device));
                a.value.bias = Some(Param::from_tensor(Tensor::from_data(TensorData::new(b, [c]), device)));
            }
            // Queries start where the keys are, so retrieval attends at once.
            a.query = a.key.clone();
            *a.memory_mut() = fill(&a.key, rng)?;
            FeedForward::Associative(a)
        }
        _ => {
            return Err(DmtError::InvalidArgument(format!("{kind:?} is not a memory layer")));
        }
    })
}

/// A product-key layer's grids from the teacher: for each head, the grid
/// [`fit_grid`] fits to the head's queries `points` and the teacher's
/// per-head outputs `outputs` (both `[positions · heads, dh]`), in the row
/// order a tier's fill takes (row `r · heads + h` is head `h`'s cell `r`).
fn product_grid(
    points: &[f32],
    outputs: &[f32],
    spec: &StudentSpec,
    rng: &mut SplitMix64,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let parts = spec.memory_parts;
    let dh = spec.config.n_embd / spec.config.n_head;
    let n = grid_side(spec)?;
    let per_head =
        |x: &[f32], p: usize| -> Vec<f32> { x.chunks(dh).skip(p).step_by(parts).flatten().copied().collect() };
    let grids = (0..parts)
        .map(|p| fit_grid(&per_head(points, p), &per_head(outputs, p), dh, dh, n, rng))
        .collect::<Result<Vec<_>>>()?;
    Ok(interleave(&grids, n * n, dh))
}

/// A product-key layer's grids of random sub-keys (unit halves scaled by
/// `1/√2`, so every key is a unit vector) and small random values (N(0,
/// 0.02²)), as the random ablation of other layers.
fn random_grid(spec: &StudentSpec, rng: &mut SplitMix64) -> Result<(Vec<f32>, Vec<f32>)> {
    let parts = spec.memory_parts;
    let dh = spec.config.n_embd / spec.config.n_head;
    let n = grid_side(spec)?;
    let cpu = Device::flex();
    let mut grids = Vec::with_capacity(parts);
    for _ in 0..parts {
        let half = |w: usize, rng: &mut SplitMix64| {
            cpu_f32(unit_rows(seeded_normal(n, w, rng, &cpu)).mul_scalar(std::f32::consts::FRAC_1_SQRT_2))
        };
        let (a, b) = (half(dh / 2, rng)?, half(dh - dh / 2, rng)?);
        let mut keys = Vec::with_capacity(n * n * dh);
        for i in 0..n {
            for j in 0..n {
                keys.extend_from_slice(&a[i * (dh / 2)..(i + 1) * (dh / 2)]);
                keys.extend_from_slice(&b[j * (dh - dh / 2)..(j + 1) * (dh - dh / 2)]);
            }
        }
        grids.push((keys, cpu_f32(seeded_normal(n * n, dh, rng, &cpu))?));
    }
    Ok(interleave(&grids, n * n, dh))
}

/// The side `n` of a product-key layer's per-head grid: `--capacity` per
/// head partition must be `n²`.
fn grid_side(spec: &StudentSpec) -> Result<usize> {
    let per = spec.capacity / spec.memory_parts.max(1);
    let n = per.isqrt();
    if n * n != per || per * spec.memory_parts != spec.capacity {
        return Err(DmtError::InvalidArgument(format!(
            "a product-key layer needs --capacity of {} partitions × n² rows ({} is not)",
            spec.memory_parts, spec.capacity
        )));
    }
    Ok(n)
}

/// Rows of per-partition tables (`rows` each of `d`) interleaved as a
/// tier's fill takes them: row `r · parts + p` is partition `p`'s row `r`.
fn interleave(grids: &[(Vec<f32>, Vec<f32>)], rows: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let mut keys = Vec::with_capacity(grids.len() * rows * d);
    let mut values = Vec::with_capacity(grids.len() * rows * d);
    for r in 0..rows {
        for (k, v) in grids {
            keys.extend_from_slice(&k[r * d..(r + 1) * d]);
            values.extend_from_slice(&v[r * d..(r + 1) * d]);
        }
    }
    (keys, values)
}

/// The least-squares affine map from rows of `x` to rows of `y` (both
/// `[n, c]`, row-major): `(W [c, c] row-major, b [c])` minimising
/// `‖x·W + b − y‖² + ridge · tr(xᵀx)/c · ‖W‖²`, by the normal equations
/// and a Cholesky factorisation in f64 (the ridge keeps them positive
/// definite when `n ≤ c`).
pub fn fit_linear(x: &[f32], y: &[f32], c: usize, ridge: f64) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = x.len() / c.max(1);
    if c == 0 || n == 0 || x.len() != n * c || y.len() != n * c {
        return Err(DmtError::InvalidArgument(format!(
            "a linear fit needs rows of {c} inputs and outputs ({} and {} floats)",
            x.len(),
            y.len()
        )));
    }
    let d = c + 1; // the inputs and a constant 1
    let row = |i: usize, j: usize| if j < c { x[i * c + j] as f64 } else { 1.0 };
    let (mut a, mut r) = (vec![0.0f64; d * d], vec![0.0f64; d * c]);
    for i in 0..n {
        for p in 0..d {
            let xp = row(i, p);
            for q in 0..d {
                a[p * d + q] += xp * row(i, q);
            }
            for o in 0..c {
                r[p * c + o] += xp * y[i * c + o] as f64;
            }
        }
    }
    let scale = (0..c).map(|p| a[p * d + p]).sum::<f64>() / c as f64;
    for p in 0..c {
        a[p * d + p] += ridge * scale.max(1e-12);
    }
    a[c * d + c] += 1e-9 * (n as f64);
    // Cholesky a = l·lᵀ (lower triangle in place), then two triangular solves.
    for j in 0..d {
        let mut diag = a[j * d + j];
        for k in 0..j {
            diag -= a[j * d + k] * a[j * d + k];
        }
        if !(diag > 0.0 && diag.is_finite()) {
            return Err(DmtError::InvalidArgument(
                "the linear fit's normal equations are not positive definite".into(),
            ));
        }
        let diag = diag.sqrt();
        a[j * d + j] = diag;
        for i in j + 1..d {
            let mut v = a[i * d + j];
            for k in 0..j {
                v -= a[i * d + k] * a[j * d + k];
            }
            a[i * d + j] = v / diag;
        }
    }
    for o in 0..c {
        let mut z = vec![0.0f64; d];
        for i in 0..d {
            let mut v = r[i * c + o];
            for k in 0..i {
                v -= a[i * d + k] * z[k];
            }
            z[i] = v / a[i * d + i];
        }
        for i in (0..d).rev() {
            let mut v = z[i];
            for k in i + 1..d {
                v -= a[k * d + i] * r[k * c + o];
            }
            r[i * c + o] = v / a[i * d + i];
        }
    }
    let w = r[..c * c].iter().map(|&v| v as f32).collect();
    let b = r[c * c..].iter().map(|&v| v as f32).collect();
    Ok((w, b))
}

/// A key-value memory layer holding the teacher MLP `m`'s units as rows
/// (key = a unit's input weights and bias, value = its output weights;
/// output bias = the MLP's), in a table of [`kv_capacity`] rows: with fewer
/// rows than units, the units of largest `‖c_fc column‖ · ‖c_proj row‖` are
/// kept.
fn keyvalue_layer(m: &Mlp, spec: &StudentSpec, device: &Device) -> Result<FeedForward> {
    let c = spec.config.n_embd;
    let f = m.c_fc.weight.val().dims()[1];
    let units = ranked_units(m, kv_capacity(spec))?;
    let w_in = host_f32(m.c_fc.weight.val())?; // [c, f]
    let w_out = host_f32(m.c_proj.weight.val())?; // [f, c]
    let b_in = match &m.c_fc.bias {
        Some(b) => host_f32(b.val())?,
        None => vec![0.0; f],
    };
    let (mut keys, mut values) = (
        Vec::with_capacity(units.len() * (c + 1)),
        Vec::with_capacity(units.len() * c),
    );
    for &j in &units {
        keys.extend((0..c).map(|i| w_in[i * f + j]));
        keys.push(b_in[j]);
        values.extend_from_slice(&w_out[j * c..(j + 1) * c]);
    }
    let mut tier = DeviceMemory::new(memory_config(LayerKind::KeyValue, spec), kv_capacity(spec), device)?;
    tier.fill(&keys, &values, 0)?;
    let mut layer = KeyValueMemory::new(c, spec.kv_k, spec.config.activation(), tier, device)?;
    if let Some(b) = &m.c_proj.bias {
        layer.bias = Param::from_tensor(Tensor::from_data(TensorData::new(host_f32(b.val())?, [c]), device));
    }
    Ok(FeedForward::KeyValue(layer))
}

/// Rows of a key-value layer's table: the teacher MLP's units, at most
/// `--capacity` of them (key-value layers do not grow, so a larger table
/// would only be searched in vain).
fn kv_capacity(spec: &StudentSpec) -> usize {
    spec.capacity.min(spec.config.d_ff())
}

/// The `n` units of `m` with the largest `‖c_fc column‖ · ‖c_proj row‖`
/// (magnitude), in their order.
fn ranked_units(m: &Mlp, n: usize) -> Result<Vec<usize>> {
    let [c, f] = m.c_fc.weight.val().dims();
    let w_in = host_f32(m.c_fc.weight.val())?;
    let w_out = host_f32(m.c_proj.weight.val())?;
    let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let mut units: Vec<usize> = (0..f).collect();
    if n < f {
        let score: Vec<f64> = (0..f)
            .map(|j| norm(&mut (0..c).map(|i| w_in[i * f + j])) * norm(&mut w_out[j * c..(j + 1) * c].iter().copied()))
            .collect();
        units.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
        units.truncate(n);
        units.sort_unstable();
    }
    Ok(units)
}

/// `m` with `width` hidden units: narrower keeps the units with the largest
/// `‖c_fc column‖ · ‖c_proj row‖` (magnitude pruning), in their order; wider
/// keeps every unit and adds new ones whose input weights are N(0, 0.02²)
/// from `rng` and whose output weights are zero, so the layer computes
/// what `m` does until it trains.
pub fn resized_mlp(m: &Mlp, width: usize, config: &Gpt2Config, rng: &mut SplitMix64) -> Result<Mlp> {
    let device = m.c_fc.weight.val().device();
    let [c, f] = m.c_fc.weight.val().dims();
    if width == 0 {
        return Err(DmtError::InvalidArgument(
            "an MLP needs at least one hidden unit".into(),
        ));
    }
    let w_in = host_f32(m.c_fc.weight.val())?; // [c, f]
    let w_out = host_f32(m.c_proj.weight.val())?; // [f, c]
    let b_in = match &m.c_fc.bias {
        Some(b) => host_f32(b.val())?,
        None => vec![0.0; f],
    };
    let units = ranked_units(m, width.min(f))?;
    let extra = width.saturating_sub(f);
    let fresh = if extra > 0 {
        host_f32(seeded_normal(c, extra, rng, &Device::flex()))?
    } else {
        Vec::new()
    };
    let (mut nw_in, mut nb_in, mut nw_out) = (vec![0.0f32; c * width], vec![0.0f32; width], vec![0.0f32; width * c]);
    for i in 0..c {
        for (k, &j) in units.iter().enumerate() {
            nw_in[i * width + k] = w_in[i * f + j];
        }
        for e in 0..extra {
            nw_in[i * width + f + e] = fresh[i * extra + e];
        }
    }
    for (k, &j) in units.iter().enumerate() {
        nb_in[k] = b_in[j];
        nw_out[k * c..(k + 1) * c].copy_from_slice(&w_out[j * c..(j + 1) * c]);
    }
    let c_fc = burn::nn::Linear {
        weight: Param::from_tensor(Tensor::from_data(TensorData::new(nw_in, [c, width]), &device)),
        bias: Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(nb_in, [width]),
            &device,
        ))),
    };
    let c_proj = burn::nn::Linear {
        weight: Param::from_tensor(Tensor::from_data(TensorData::new(nw_out, [width, c]), &device)),
        bias: m.c_proj.bias.as_ref().map(|b| Param::from_tensor(b.val().detach())),
    };
    Ok(Mlp::new(c_fc, c_proj, config.activation()))
}

/// Switches every memory layer's learning (recording retrievals and
/// proposals) on or off.
pub(crate) fn set_learning(model: &mut Gpt2, on: bool) {
    for b in model.h.iter_mut() {
        b.mlp.set_learning(on);
    }
}

fn read_tokens(codec: &TextCodec, path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    codec.encode(&text)
}

/// What [`final_report`] compares the student with besides the teacher.
struct References<'a> {
    /// The attention-only baseline, when the run has one.
    attention: Option<&'a Gpt2>,
    /// The bigram floor, counted on the training text.
    bigram: &'a Bigram,
}

/// Bytes on disk of each block's store (`None`: no store, or one a daemon
/// serves): the files of its name in the store directory (with SQLite's
/// `-wal` and `-shm` or DuckDB's `.wal`).
fn store_bytes(loc: &StoreLocation, run_dir: &Path, n_layer: usize, model: &Gpt2) -> Vec<Option<u64>> {
    (0..n_layer)
        .map(|i| {
            model.h.get(i)?.mlp.memory()?;
            let file = loc.file(run_dir, i)?;
            let name = file.file_name()?.to_string_lossy().into_owned();
            let dir = file.parent()?;
            let bytes = std::fs::read_dir(dir)
                .ok()?
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&name))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum();
            Some(bytes)
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn final_report(
    teacher: &Gpt2,
    student: &mut Gpt2,
    refs: References<'_>,
    eval: &[Window],
    run_dir: &Path,
    loc: &StoreLocation,
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
    let attention = refs.attention.map(|a| evaluate(a, Some(teacher), eval)).transpose()?;
    let memory_use = memory_use(student, eval)?;
    let report = Report {
        teacher: evaluate(teacher, None, eval)?,
        student: evaluate(student, Some(teacher), eval)?,
        attention,
        bigram_nll: refs.bigram.cross_entropy(eval)?,
        ablated: evaluate(&ablated, Some(teacher), eval)?,
        teacher_cost: Accounting::of(teacher),
        student_cost: Accounting::of(student),
        attention_cost: refs.attention.map(Accounting::of),
        store_bytes: store_bytes(loc, run_dir, teacher.config().n_layer, student),
        memory_use,
        feedback_mismatch: match &student.feedback {
            Some(_) => Some(crate::train::feedback_mismatch(student, eval)?),
            None => None,
        },
        train_tokens_per_s,
        phases,
        device: device.to_string(),
        steps,
    };
    if train_tokens_per_s.is_some() {
        let col = |f: fn(&StepMetrics) -> f64| report.steps.iter().map(f).collect::<Vec<f64>>();
        let (loss, kd, ce) = (col(|m| m.loss), col(|m| m.kd), col(|m| m.ce));
        crate::plot::loss_curves(
            &run_dir.join("loss.png"),
            &[
                ("total loss", &loss),
                ("T²·KL(teacher ‖ student)", &kd),
                ("next-token cross-entropy", &ce),
            ],
        )?;
        let memory = crate::plot::memory_curves(&run_dir.join("memory.png"), &report.steps)?;
        let md = format!(
            "{}\n`loss.png`: the training loss per step and its two terms. {}\n",
            report.markdown(),
            if memory {
                "`memory.png`: each memory layer's rows, and its inserts, merges and evictions per step."
            } else {
                ""
            }
        );
        crate::loader::write_atomic(&run_dir.join("report.md"), md.as_bytes())?;
        crate::loader::write_atomic(&run_dir.join("metrics.csv"), report.csv().as_bytes())?;
        crate::loader::write_atomic(&run_dir.join("accounting.csv"), report.accounting_csv().as_bytes())?;
    } else {
        // --eval-only keeps the training report and metrics.
        crate::loader::write_atomic(&run_dir.join("eval-report.md"), report.markdown().as_bytes())?;
    }
    Ok(report)
}

/// Runs a distillation end to end (or, with `resume`, from the run
/// directory's last checkpoint) and writes the run directory; prints progress
/// with `log`.
pub fn run(opts: &DistillOptions) -> Result<Report> {
    let device = opts.device.clone();
    let ad = device.clone().autodiff();
    let codec = TextCodec::for_model(&opts.teacher, opts.tokenizer.as_deref())?;
    let mut teacher = Gpt2::from_pretrained(&opts.teacher, &device)?;
    teacher.set_precision(opts.precision)?;
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
    tracing::info!(
        "teacher {} ({} blocks × {}), corpus {} ({} training / {} held-out tokens), device {}",
        opts.teacher.display(),
        config.n_layer,
        config.n_embd,
        opts.corpus.display(),
        corpus.train.len(),
        corpus.eval.len(),
        opts.device_name
    );
    let run_dir = opts.run_dir.as_path();
    let rt = runtime()?;
    let fresh_optim = || {
        AdamWConfig::new()
            .with_weight_decay(0.01)
            .with_grad_clipping(Some(GradientClippingConfig::Norm(opts.precision.loss_scale())))
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
        tracing::info!("resuming {} after step {}", run_dir.display(), cp.step);
        (spec, student, optim, cp.rng, cp.metrics, cp.step)
    } else {
        let plan_text = opts.layers.clone().unwrap_or_else(|| default_layers(config.n_layer));
        let plan = parse_layers(&plan_text, config.n_layer)?;
        // Per-head tables split the slots evenly among the heads: a capacity
        // that does not divide (4,096 for GPT-2 small's 12 heads) is rounded
        // down to one that does.
        let parts = if opts.shared_heads { 1 } else { config.n_head.max(1) };
        let capacity = opts.capacity - opts.capacity % parts;
        if capacity == 0 {
            return Err(DmtError::InvalidArgument(format!(
                "--capacity {} is fewer slots than the {parts} heads' tables",
                opts.capacity
            )));
        }
        if capacity != opts.capacity {
            tracing::info!(
                "capacity {} rounded down to {capacity}, a multiple of the {parts} heads' tables",
                opts.capacity
            );
        }
        let spec = StudentSpec {
            teacher: std::fs::canonicalize(&opts.teacher).unwrap_or_else(|_| opts.teacher.clone()),
            config: config.clone(),
            layers: plan.iter().map(|k| kind_name(*k).to_string()).collect(),
            k: opts.k,
            capacity,
            novelty: opts.novelty,
            lambda: 0.01,
            store: Some(absolute_location(&opts.store)?.to_string()),
            memory_parts: parts,
            mlp_width: opts.mlp_width,
            featural_init: opts.featural_init,
            associative_init: opts.associative_init,
            kv_k: opts.kv_k,
            memory_room: 0,
            feedback: opts.feedback,
            corpus: Some(TrainingText {
                path: std::path::absolute(&opts.corpus).map_err(io(&opts.corpus))?,
                held_out_tail: opts.eval_corpus.is_none(),
            }),
        };
        let loc = spec.store_location()?;
        let mut occupied = run_dir.join("student.json").exists();
        for i in 0..config.n_layer {
            occupied = occupied || rt.block_on(loc.occupied(run_dir, i))?;
        }
        if occupied {
            return Err(DmtError::InvalidArgument(format!(
                "{} or its stores ({loc}) already hold a run (--resume it, choose another --run-dir or --store, \
                 or remove it)",
                run_dir.display()
            )));
        }
        std::fs::create_dir_all(run_dir.join("memory")).map_err(io(run_dir))?;
        let store_dir = loc.dir(run_dir);
        std::fs::create_dir_all(&store_dir).map_err(io(&store_dir))?;
        // The student: the teacher's weights, memory layers bootstrapped from it.
        let mut boot_rng = SplitMix64::seed_from_u64(opts.seed ^ 0x5EED);
        let boot_windows: Vec<Window> = (0..(spec.capacity / config.n_head).div_ceil(opts.batch * seq).max(1))
            .map(|_| sample_batch(&corpus.train, opts.batch, seq, &mut boot_rng))
            .collect::<Result<_>>()?;
        let boot_ff = teacher_ff(&teacher, &boot_windows)?;
        let mut student = Gpt2::from_pretrained(&opts.teacher, &ad)?;
        if let Some(passes) = spec.feedback {
            student = student.with_feedback(passes)?;
        }
        for (i, kind) in plan.iter().enumerate() {
            let ff = match kind {
                LayerKind::Featural | LayerKind::Product => {
                    memory_layer(*kind, spec.featural_init, boot_ff[i].clone(), &spec, &mut boot_rng, &ad)?
                }
                LayerKind::Associative => memory_layer(
                    *kind,
                    spec.associative_init,
                    boot_ff[i].clone(),
                    &spec,
                    &mut boot_rng,
                    &ad,
                )?,
                LayerKind::KeyValue => match &teacher.h[i].mlp {
                    FeedForward::Mlp(m) => keyvalue_layer(m, &spec, &ad)?,
                    _ => {
                        return Err(DmtError::InvalidArgument(format!(
                            "block {i} of the teacher has no MLP to make key-value memories of"
                        )));
                    }
                },
                LayerKind::Ablated => FeedForward::Ablated(burn::nn::Identity),
                LayerKind::Mlp => match (spec.mlp_width, &student.h[i].mlp) {
                    (Some(w), FeedForward::Mlp(m)) => FeedForward::Mlp(resized_mlp(m, w, &config, &mut boot_rng)?),
                    _ => continue,
                },
            };
            student.set_feed_forward(i, ff)?;
        }
        let spec_text = serde_json::to_string_pretty(&spec).map_err(|e| DmtError::InvalidArgument(e.to_string()))?;
        crate::loader::write_atomic(&run_dir.join("student.json"), spec_text.as_bytes())?;
        tracing::info!("student: {plan_text}");
        (
            spec,
            student,
            fresh_optim(),
            SplitMix64::seed_from_u64(opts.seed),
            Vec::new(),
            0,
        )
    };
    let (tp, sp) = (param_counts(&teacher), param_counts(&student));
    tracing::info!(
        "non-embedding weights: student {} of the teacher's {} ({:.1}%)",
        sp.1,
        tp.1,
        100.0 * sp.1 as f64 / tp.1 as f64
    );

    // One durable store per memory layer, written behind ([`WRITE_GROUP`]).
    let loc = spec.store_location()?;
    tracing::info!("memory stores: {loc}");
    let mut stores: Vec<Option<LayerStore>> = Vec::with_capacity(config.n_layer);
    let mut fills = Vec::new();
    for i in 0..config.n_layer {
        let Some(tier) = student.feed_forward_mut(i).and_then(FeedForward::memory_mut) else {
            stores.push(None);
            continue;
        };
        if opts.value_lr > 0.0 {
            tier.set_trainable_values(true);
        }
        let kind: LayerKind = spec.layers[i].parse()?;
        let store = rt.block_on(loc.open(run_dir, i, memory_config(kind, &spec)))?;
        // The bootstrapped memory (a new run's) reaches the stores before the
        // first step, side by side: the stores start where the run starts,
        // and a table's one-off fill is not left to a training step's group.
        if let Some(b) = tier.take_changes() {
            let shared = store.shared();
            fills.push(rt.spawn(async move { shared.apply(&b).await }));
        }
        stores.push(Some(store));
    }
    for fill in fills {
        rt.block_on(fill)
            .map_err(|e| DmtError::Store(memstore_api::Error::Storage(Box::new(e))))??;
    }
    let mut writers = start_writers(&stores, &loc.dir(run_dir))?;
    let mut pending: Option<PendingCheckpoint> = None;
    set_learning(&mut student, true);
    student.set_precision(opts.precision)?;
    // Reduced precision scales the loss, so every gradient, by a constant;
    // the optimiser's clipping threshold and the sparse value updates take
    // it out again (AdamW's update does not depend on the gradients' scale
    // beyond its epsilon).
    let scale = opts.precision.loss_scale();
    // Featural memories that start empty grow with the teacher's
    // feed-forward output on the student's own input as their values.
    let grow_featural = spec.featural_init == MemoryInit::Empty && opts.max_inserts > 0;
    let n_head = config.n_head;

    let warmup = (opts.steps / 10).max(1);
    // The two forward passes overlap on the CPU backend (unless profiling,
    // which times them apart).
    let overlap = on_cpu(&device) && !opts.profile;
    let mut times = PhaseTimes {
        synchronised: opts.profile,
        ..PhaseTimes::default()
    };
    let start = Instant::now();
    for step in first_step..opts.steps {
        let tick = step as u64 + 1;
        let reads = crate::host_reads();
        let mut lap = Lap::new(&mut times, opts.profile.then_some(&device));
        let b = sample_batch(&corpus.train, opts.batch, seq, &mut rng)?;
        let want_ff = opts.hidden_loss > 0.0 || grow_featural;
        // The LM head's logits stay off the autodiff graph (loss::TiedHead).
        let (tl, (head, ff)) = if overlap {
            // On the CPU backend a forward pass's element-wise operations
            // and smaller products run on one thread: the teacher's pass
            // runs beside the student's (0.90× the tokens/s one after the
            // other on two cores; the first phase is then the batch's
            // sampling alone).
            lap.lap(0)?;
            let (teacher, inputs) = (&teacher, b.inputs(&device));
            std::thread::scope(|scope| {
                let t = scope.spawn(move || teacher.forward(inputs, None));
                let s = student.forward_train_tied(b.inputs(&ad), want_ff);
                let t = t
                    .join()
                    .map_err(|_| DmtError::InvalidArgument("the teacher's forward pass panicked".into()))?;
                Ok::<_, DmtError>((t?, s?))
            })?
        } else {
            let tl = teacher.forward(b.inputs(&device), None)?;
            lap.lap(0)?;
            (tl, student.forward_train_tied(b.inputs(&ad), want_ff)?)
        };
        lap.lap(1)?;
        let dl = tied_loss(
            head,
            Some(tl),
            b.targets(&device),
            opts.temperature,
            opts.alpha,
            LossKernel::Auto,
        )?;
        let (mut objective, kd, ce) = (dl.objective(), dl.kd.clone(), dl.ce.clone());
        let mut hidden_mse: Option<Tensor<1>> = None;
        let mut grow_targets: Vec<Option<Tensor<2>>> = vec![None; config.n_layer];
        for (i, (ff_in, ff_out)) in ff.into_iter().enumerate() {
            let featural = matches!(student.h[i].mlp, FeedForward::Featural(_));
            if student.h[i].mlp.memory().is_none() {
                continue;
            }
            let target = teacher.h[i].mlp.forward(ff_in.inner())?;
            if featural && grow_featural {
                let [bb, t, c] = target.dims();
                grow_targets[i] = Some(target.clone().reshape([bb * t * n_head, c / n_head]));
            }
            if opts.hidden_loss > 0.0 {
                let mse = (ff_out - target).powf_scalar(2.0).mean().mul_scalar(opts.hidden_loss);
                let scaled = mse.clone().mul_scalar(scale);
                objective = objective + mse.clone().inner();
                hidden_mse = Some(hidden_mse.map_or(scaled.clone(), |sum| sum + scaled));
            }
        }
        lap.lap(2)?;
        // The head's backward products belong to the backward pass.
        let mut loss = dl.into_scaled_loss(scale).surrogate;
        if let Some(mse) = hidden_mse {
            loss = loss + mse;
        }
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
        let mut memory = Vec::new();
        let mut batches = Vec::with_capacity(config.n_layer);
        let logging = (step + 1) % opts.log_every.max(1) == 0 || step + 1 == opts.steps;
        // The loss and every memory layer's commit share two reads from the
        // device: what the searches found (and the loss), then the rows
        // that become memories and the value deltas the stores need.
        let mut batch = HostReads::new();
        let loss_span = batch.push(Tensor::cat(vec![objective, kd, ce], 0))?;
        let mut gathered = Vec::with_capacity(config.n_layer);
        for ((i, g), target) in value_grads.into_iter().enumerate().zip(grow_targets) {
            let vg = g.map(|g| {
                (
                    if scale == 1.0 {
                        g
                    } else {
                        g.map(|g| g.div_scalar(scale))
                    },
                    opts.value_lr,
                )
            });
            let Some(ff) = student.feed_forward_mut(i) else {
                continue;
            };
            let request = match ff {
                FeedForward::Featural(f) => f.commit_request(tick, vg, target.map(|t| (t, opts.max_inserts)))?,
                FeedForward::Associative(a) => a.commit_request(tick, opts.max_inserts, vg),
                FeedForward::KeyValue(m) => m.commit_request(tick, vg),
                _ => continue,
            };
            let Some(tier) = ff.memory() else { continue };
            let evicted_before = tier.counters().evicted;
            gathered.push((i, evicted_before, tier.commit_gather(request, &mut batch)?));
        }
        let found = batch.read()?;
        let [l, kdv, cev] = [0, 1, 2].map(|i| found.get(loss_span).get(i).copied().map_or(f64::NAN, f64::from));
        if !l.is_finite() {
            return Err(DmtError::InvalidArgument(format!(
                "the loss diverged at step {} ({l}); lower --lr",
                step + 1
            )));
        }
        // The layers' later stages run side by side on the CPU: each changes
        // its own tier only (host work there: the accesses, the value rows'
        // deltas recorded and added, the store's batch), and each plans into
        // its own batch of reads, all read in one transfer. On a GPU the
        // stages queue device work and run one after another.
        let parallel = on_cpu(&device);
        let mut tiers: Vec<Option<&mut DeviceMemory>> = student.h.iter_mut().map(|b| b.mlp.memory_mut()).collect();
        let mut jobs = Vec::with_capacity(gathered.len());
        for (i, evicted_before, g) in gathered {
            let tier = tiers
                .get_mut(i)
                .and_then(Option::take)
                .ok_or_else(|| DmtError::InvalidArgument(format!("block {i} has no memory to commit to")))?;
            jobs.push((i, evicted_before, g, tier));
        }
        let planned = each_layer(jobs, parallel, |(i, evicted_before, g, tier)| {
            let mut reads = HostReads::new();
            let p = tier.commit_plan(g, &found, &mut reads)?;
            Ok(((i, evicted_before, p, tier), reads))
        })
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
        let (jobs, layer_reads): (Vec<_>, Vec<_>) = planned.into_iter().unzip();
        let rows = HostReads::read_all(layer_reads)?;
        let jobs: Vec<_> = jobs.into_iter().zip(rows).collect();
        let finished = each_layer(jobs, parallel, |((i, evicted_before, p, tier), rows)| {
            let done = tier.commit_finish(p, &rows)?;
            let step = LayerStep {
                block: i,
                rows: tier.len(),
                inserted: done.inserted,
                merged: done.merged,
                evicted: (tier.counters().evicted - evicted_before) as usize,
                retrieved: logging.then(|| tier.take_retrieved_share()),
            };
            Ok::<_, DmtError>((step, tier.take_changes()))
        });
        for done in finished {
            let (step, changes) = done?;
            inserted += step.inserted;
            if let Some(batch) = changes {
                batches.push((step.block, batch));
            }
            memory.push(step);
        }
        lap.lap(5)?;
        for (i, batch) in batches {
            let w = writer_of(&mut writers, i)?;
            w.submit(batch)?;
        }
        lap.lap(6)?;
        times.steps += 1;
        times.host_reads += crate::host_reads() - reads;
        metrics.push(StepMetrics {
            step: step + 1,
            loss: l,
            kd: kdv,
            ce: cev,
            lr,
            inserted,
            memory: memory.clone(),
        });
        if !logging {
            tracing::debug!(step = step + 1, steps = opts.steps);
        }
        if logging {
            let toks = (step + 1 - first_step) * opts.batch * seq;
            let rows: Vec<String> = memory.iter().map(|m| m.rows.to_string()).collect();
            // `step` and `steps` make this a progress event (the examples
            // draw a bar from them).
            tracing::info!(
                step = step + 1,
                steps = opts.steps,
                "loss {l:.4}  (T²·KL {kdv:.4}, CE {cev:.4})  lr {lr:.2e}  inserted {inserted}  rows [{}]  {:.0} tokens/s",
                rows.join(" "),
                toks as f64 / start.elapsed().as_secs_f64()
            );
            if opts.profile {
                tracing::info!("{}", times.summary());
            }
        }
        let checkpoint_start = Instant::now();
        // A checkpoint whose copies are done is made the run's.
        if pending.as_mut().is_some_and(PendingCheckpoint::is_done) {
            PendingCheckpoint::complete_any(&mut pending, run_dir, &mut writers)?;
        }
        if (step + 1) % opts.checkpoint_every.max(1) == 0 || step + 1 == opts.steps {
            PendingCheckpoint::complete_any(&mut pending, run_dir, &mut writers)?;
            let name = format!("step-{:07}", step + 1);
            let cdir = run_dir.join("checkpoints").join(&name);
            if cdir.exists() {
                std::fs::remove_dir_all(&cdir).map_err(io(&cdir))?;
            }
            std::fs::create_dir_all(&cdir).map_err(io(&cdir))?;
            // Each store is copied on its writer's thread once it holds
            // every change up to here, while the loop goes on.
            let mut copies = Vec::new();
            for (i, st) in stores.iter().enumerate() {
                let Some(st) = st else { continue };
                let w = writer_of(&mut writers, i)?;
                copies.push(w.after(Box::pin(st.backup_task(cdir.join(loc.checkpoint_name(i)))))?);
            }
            let mut layouts = Vec::with_capacity(config.n_layer);
            for (i, store) in stores.iter().enumerate() {
                let tier = student.feed_forward_mut(i).and_then(FeedForward::memory_mut);
                layouts.push(store.as_ref().and(tier.map(|t| t.layout())));
            }
            let path = cdir.join("student.bpk");
            student.clone().save_file(&path).map_err(ckpt_err(path))?;
            let path = cdir.join("optim.bpk");
            optim.save(&path).map_err(ckpt_err(path))?;
            let cp = Checkpoint {
                step: step + 1,
                rng: rng.clone(),
                metrics: metrics.clone(),
                layouts,
                dir: name.clone(),
            };
            let text = serde_json::to_string(&cp).map_err(|e| DmtError::InvalidArgument(e.to_string()))?;
            pending = Some(PendingCheckpoint {
                text,
                name,
                dir: cdir,
                copies,
            });
        }
        if opts.halt_after == Some(step + 1) {
            PendingCheckpoint::complete_any(&mut pending, run_dir, &mut writers)?;
            return Err(DmtError::Halted { step: step + 1 });
        }
        times.seconds[7] += checkpoint_start.elapsed().as_secs_f64();
    }
    // The run's last checkpoint is part of its training time.
    let last_start = Instant::now();
    PendingCheckpoint::complete_any(&mut pending, run_dir, &mut writers)?;
    times.seconds[7] += last_start.elapsed().as_secs_f64();
    let done = opts.steps.saturating_sub(first_step);
    let train_tps = (done * opts.batch * seq) as f64 / start.elapsed().as_secs_f64().max(1e-9);
    WriteBehind::finish_all(writers.into_iter().flatten())?;
    for st in stores.into_iter().flatten() {
        rt.block_on(st.close())?;
    }
    student
        .save_into(&mut SafetensorsStore::from_file(run_dir.join("student.safetensors")))
        .map_err(|e| DmtError::Checkpoint {
            path: run_dir.join("student.safetensors"),
            message: e.to_string(),
        })?;
    let attention = if opts.attention_baseline {
        let dir = attention_baseline(opts, run_dir)?;
        let rt = runtime()?;
        Some(load_student(&dir, &ad, &rt)?.1)
    } else {
        None
    };
    tracing::info!("evaluating ...");
    let eval = eval_batches(&corpus.eval, opts.batch, seq, opts.eval_windows);
    let bigram = Bigram::fit(&corpus.train, config.vocab_size)?;
    let refs = References {
        attention: attention.as_ref(),
        bigram: &bigram,
    };
    final_report(
        &teacher,
        &mut student,
        refs,
        &eval,
        run_dir,
        &loc,
        Some((train_tps, times)),
        &match opts.precision {
            crate::precision::Precision::F32 => opts.device_name.clone(),
            p => format!("{}, {} matrix products", opts.device_name, p.name()),
        },
        metrics,
    )
}

/// Training steps whose memory changes a layer's store writer applies in
/// one transaction ([`WriteBehind`]; fewer when they hold
/// [`crate::memory::journal::GROUP_BYTES`]: [`Group::of`]). The store lags
/// by up to 31 steps (a full queue of another group's batches holds the
/// loop back); at a checkpoint each writer applies what it holds and then
/// copies its store on its own thread ([`PendingCheckpoint`]).
/// The writers keep no journal ([`WriteBehind::unjournaled`]): a run
/// recovers from its last checkpoint, whose store copies are taken with
/// the weights, so after a crash the steps since that checkpoint are lost
/// together, memory and weights, and the stores are put back to the copies
/// (a journal's batches past the checkpoint would be discarded unread,
/// after costing every step an `fsync` of megabytes per layer).
/// A 65,536-row layer changes ~9,000 memories a step and
/// 26,000–48,000 in a group (the main job's shape with product keys), so a
/// group writes 7–9× fewer rows than its steps would one by one.
const WRITE_GROUP: usize = 32;

/// `f` of each item, in order: on rayon's pool when `parallel`, else one
/// after another on this thread.
fn each_layer<T: Send, R: Send>(items: Vec<T>, parallel: bool, f: impl Fn(T) -> R + Send + Sync) -> Vec<R> {
    if parallel {
        items.into_par_iter().map(f).collect()
    } else {
        items.into_iter().map(f).collect()
    }
}

/// Block `i`'s store writer.
fn writer_of(writers: &mut [Option<WriteBehind>], i: usize) -> Result<&mut WriteBehind> {
    writers
        .get_mut(i)
        .and_then(Option::as_mut)
        .ok_or_else(|| DmtError::InvalidArgument(format!("block {i}'s memory has no store writer")))
}

/// A writer for each open store (none for a block without one), in groups
/// of [`WRITE_GROUP`], without a journal; `dir` names the stores in errors.
fn start_writers(stores: &[Option<LayerStore>], dir: &Path) -> Result<Vec<Option<WriteBehind>>> {
    stores
        .iter()
        .map(|st| {
            st.as_ref()
                .map(|st| WriteBehind::unjournaled(st.shared(), Group::of(WRITE_GROUP), dir))
                .transpose()
        })
        .collect()
}

/// Where a run keeps its attention-only baseline.
pub const ATTENTION_BASELINE: &str = "baseline-attention";

/// Changes whenever the training recipe changes in a way the options do not
/// show, so that cached baselines trained by an older recipe are not reused.
const RECIPE_VERSION: u32 = 1;

/// The attention-only baseline of the run in `run_dir`: the teacher without
/// its feed-forward layers, distilled with the run's own recipe (corpus,
/// held-out split, steps, batch, sequence length, learning-rate schedule,
/// loss, seed), in `run_dir/baseline-attention` (a run directory of its
/// own). It is trained once per teacher, corpus and recipe and kept under
/// `opts.baseline_cache` (default: `.baselines` beside the run directory),
/// keyed by a SHA-256 of the teacher's files, the texts and the recipe; a
/// later run with the same key copies it.
fn attention_baseline(opts: &DistillOptions, run_dir: &Path) -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in ["config.json", "model.safetensors", "vocab_map.json"] {
        let p = opts.teacher.join(f);
        if p.exists() {
            h.update(std::fs::read(&p).map_err(io(&p))?);
        }
    }
    for p in [Some(&opts.corpus), opts.eval_corpus.as_ref()].into_iter().flatten() {
        h.update(std::fs::read(p).map_err(io(p))?);
        h.update([0xFF]);
    }
    h.update(format!(
        "v{RECIPE_VERSION} eval_corpus={} steps={} batch={} seq={} lr={} T={} alpha={} seed={} device={}",
        opts.eval_corpus.is_some(),
        opts.steps,
        opts.batch,
        opts.seq,
        opts.lr,
        opts.temperature,
        opts.alpha,
        opts.seed,
        opts.device_name
    ));
    let key: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    let cache_root = match &opts.baseline_cache {
        Some(d) => d.clone(),
        None => std::path::absolute(run_dir)
            .map_err(io(run_dir))?
            .parent()
            .map_or_else(|| PathBuf::from(".baselines"), |p| p.join(".baselines")),
    };
    let cached = cache_root.join(format!("attention-{key}"));
    let done = |d: &Path| d.join("report.md").exists() && d.join("student.safetensors").exists();
    if done(&cached) {
        tracing::info!("attention-only baseline: reusing {}", cached.display());
    } else {
        if cached.exists() {
            // An interrupted training: start it again.
            std::fs::remove_dir_all(&cached).map_err(io(&cached))?;
        }
        std::fs::create_dir_all(&cache_root).map_err(io(&cache_root))?;
        let n = Gpt2Config::from_file(&opts.teacher.join("config.json"))?.n_layer;
        let mut o = opts.clone();
        o.layers = Some(format!("0-{}:none", n.saturating_sub(1)));
        o.mlp_width = None;
        o.run_dir = cached.clone();
        o.resume = false;
        o.halt_after = None;
        o.profile = false;
        o.checkpoint_every = o.steps.max(1);
        o.attention_baseline = false;
        o.feedback = None;
        o.store = StoreLocation::default();
        tracing::info!(
            "attention-only baseline: the teacher without feed-forward layers, distilled with the same recipe"
        );
        let _span = tracing::info_span!("attention_only").entered();
        run(&o)?;
    }
    let dir = run_dir.join(ATTENTION_BASELINE);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    for f in ["student.json", "student.safetensors", "report.md", "metrics.csv"] {
        let (from, to) = (cached.join(f), dir.join(f));
        std::fs::copy(&from, &to).map_err(io(&from))?;
    }
    // The key says the teacher's files are the same; the cached copy may
    // name a directory where they no longer are: the copy names this run's.
    let mut spec = read_spec(&dir)?;
    if spec.teacher != opts.teacher {
        spec.teacher = opts.teacher.clone();
        write_spec(&dir, &spec)?;
    }
    Ok(dir)
}

/// The student description of a run directory (`student.json`).
pub fn read_spec(run_dir: &Path) -> Result<StudentSpec> {
    let spec_path = run_dir.join("student.json");
    if !spec_path.exists() {
        return Err(DmtError::InvalidArgument(format!(
            "{} is not a run directory (no student.json)",
            run_dir.display()
        )));
    }
    let text = std::fs::read_to_string(&spec_path).map_err(io(&spec_path))?;
    serde_json::from_str(&text).map_err(|e| DmtError::Config {
        path: spec_path.clone(),
        message: e.to_string(),
    })
}

/// Writes `student.json` (atomically).
pub fn write_spec(run_dir: &Path, spec: &StudentSpec) -> Result<()> {
    let text = serde_json::to_string_pretty(spec).map_err(|e| DmtError::InvalidArgument(e.to_string()))?;
    crate::loader::write_atomic(&run_dir.join("student.json"), text.as_bytes())
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
    if let Some(passes) = spec.feedback {
        student = student.with_feedback(passes)?;
    }
    let loc = spec.store_location()?;
    let (c, h) = (spec.config.n_embd, spec.config.n_head);
    for (i, kind) in plan.iter().enumerate() {
        let ff = match kind {
            LayerKind::Featural | LayerKind::Product | LayerKind::Associative | LayerKind::KeyValue => {
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
                // A product-key grid keeps its n² cells per head: it takes
                // no room for new memories.
                let (parts, capacity) = match kind {
                    LayerKind::KeyValue => (1, kv_capacity(spec) + spec.memory_room),
                    LayerKind::Product => (spec.memory_parts, spec.capacity),
                    _ => (spec.memory_parts, spec.capacity + spec.memory_room),
                };
                let tier = match layout {
                    Some(l) => rt.block_on(DeviceMemory::load_with_layout(&store, &l, parts, ad))?,
                    None => rt.block_on(DeviceMemory::load_parts(&store, capacity, parts, ad))?,
                };
                drop(store);
                rt.block_on(layer_store.close())?;
                match kind {
                    LayerKind::Featural => FeedForward::Featural(FeaturalMemory::new(c, h, spec.k, tier, ad)?),
                    LayerKind::Product => {
                        FeedForward::Featural(FeaturalMemory::new(c, h, spec.k, tier.with_product_keys()?, ad)?)
                    }
                    LayerKind::KeyValue => {
                        FeedForward::KeyValue(KeyValueMemory::new(c, spec.kv_k, spec.config.activation(), tier, ad)?)
                    }
                    _ => FeedForward::Associative(AssociativeMemory::new(c, h, spec.k, tier, ad)?),
                }
            }
            LayerKind::Ablated => FeedForward::Ablated(burn::nn::Identity),
            LayerKind::Mlp => match (spec.mlp_width, &student.h[i].mlp) {
                // Its weights are loaded over it.
                (Some(w), FeedForward::Mlp(m)) => {
                    FeedForward::Mlp(resized_mlp(m, w, &spec.config, &mut SplitMix64::seed_from_u64(0))?)
                }
                _ => continue,
            },
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
    let rt = runtime()?;
    let (spec, mut student) = load_student(run_dir, &ad, &rt)?;
    let codec = TextCodec::for_model(&spec.teacher, opts.tokenizer.as_deref())?;
    let teacher = Gpt2::from_pretrained(&spec.teacher, &device)?;
    let baseline = run_dir.join(ATTENTION_BASELINE);
    let attention = if baseline.join("student.json").exists() {
        Some(load_student(&baseline, &ad, &rt)?.1)
    } else {
        None
    };
    let tokens = read_tokens(&codec, corpus)?;
    let eval = eval_batches(
        &tokens,
        opts.batch,
        opts.seq.min(spec.config.n_positions),
        opts.eval_windows,
    );
    // The bigram floor counts the run's training text (recorded in the
    // run), else the evaluated text's first 90% (then it has seen nothing
    // of what it is scored on only when the text is new to it).
    let train = match &spec.corpus {
        Some(c) if c.path.exists() => {
            let t = read_tokens(&codec, &c.path)?;
            if c.held_out_tail {
                Corpus::split(t, 0.1).train
            } else {
                t
            }
        }
        _ => Corpus::split(tokens.clone(), 0.1).train,
    };
    let bigram = Bigram::fit(&train, spec.config.vocab_size)?;
    let refs = References {
        attention: attention.as_ref(),
        bigram: &bigram,
    };
    final_report(
        &teacher,
        &mut student,
        refs,
        &eval,
        run_dir,
        &spec.store_location()?,
        None,
        &opts.device_name,
        Vec::new(),
    )
}

/// A trained student and its description, rebuilt from its run directory
/// (weights from `student.safetensors`, memories from its stores, and the
/// output memory when a text was memorised into one).
pub fn load_student(run_dir: &Path, ad: &Device, rt: &tokio::runtime::Runtime) -> Result<(StudentSpec, Gpt2)> {
    let spec = read_spec(run_dir)?;
    let student = load_student_room(run_dir, &spec, ad, rt)?;
    Ok((spec, student))
}

/// [`load_student`] described by `spec` (the run's, perhaps with more
/// room for memorised memories).
pub fn load_student_room(
    run_dir: &Path,
    spec: &StudentSpec,
    ad: &Device,
    rt: &tokio::runtime::Runtime,
) -> Result<Gpt2> {
    let mut student = student_from_run(run_dir, spec, None, ad, rt)?;
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
    if let Some(m) = crate::continual::load_output_memory(run_dir, spec, rt)? {
        student.set_output_memory(Some(std::sync::Arc::new(m)))?;
    }
    Ok(student)
}
