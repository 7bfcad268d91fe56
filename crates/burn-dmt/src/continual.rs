//! Knowledge in the memory: `memorize` writes a new text into a trained
//! student's memory with every weight frozen, and `forget` removes what one
//! source wrote, by its tag.
//!
//! Three mechanisms, selectable ([`Mechanism`]; the first two combinable):
//! - **sparse value updates** on the memory rows the new text activates
//!   much more than the training text did: rows ranked by TF-IDF of their
//!   retrievals (term frequency: retrievals on the new text; document
//!   frequency: the training windows that retrieve the row), the top rows
//!   of each memory layer trained with plain SGD on their values, as
//!   "Continual Learning via Sparse Memory Finetuning" (Lin et al. 2025)
//!   does (which found SGD forgets less than AdamW there);
//! - **novelty-gated insertion** of new memories (featural and associative
//!   layers): a position of the new text whose nearest memory is farther
//!   than the training text's positions' nearest memories mostly are (a
//!   quantile of their distances, 0.99 by default) is inserted, with
//!   recombination of near-duplicates and LRFU eviction, in room added to
//!   each layer's table for memorised text. A new memory's value starts as
//!   the layer's answer to its query (the weighted mean of the values
//!   retrieved with it), which leaves the layer's output unchanged; the
//!   inserted rows' values are then trained as the sparse rows are. In
//!   key-value layers (inner-product scores, no distances to speak of) a
//!   position is novel where its strongest memory scores below the
//!   training text's positions' strongest at that quantile, and its new
//!   memory is a unit that answers only inputs close to its own, with a
//!   zero value to train ([`crate::memory::keyvalue::KeyValueMemory::commit_inserting`],
//!   after Transformer-Patcher, Huang et al. 2023);
//! - **the output memory** ([`crate::memory::output`], kNN-LM after
//!   Khandelwal et al. 2020): every position of the text's windows becomes
//!   a row keyed by the model's final hidden state with the token that
//!   followed as its value, and at inference the nearest rows' tokens are
//!   mixed into the next-token distribution. Nothing trains; the feed-forward
//!   memories are left as they are. It exists because writing into the
//!   feed-forward memories alone saturates: their outputs pass through the
//!   frozen head (`n_embd` dimensions for the whole vocabulary), which the
//!   output memory's mixture does not.
//!
//! The loss of the first two is the next-token cross-entropy on the new text. Weights never
//! change: the model's parameters are untracked and nothing else is
//! written to `student.safetensors`.
//!
//! **Provenance.** A source is one file; its tag is
//! `source:<file name>@<first 16 hex digits of its SHA-256>`. Every memory
//! `memorize` inserts carries the tag, and every older memory whose value
//! it changes gains it (a tag count), in the store, so `SELECT` on the
//! store's `memory_tags` lists them. The run directory keeps a ledger per
//! source (`sources/*.json`): the first id it could give per layer, the
//! older memories it may change with their values before (and, when it is
//! complete, after), as f32 bit patterns. The ledger is written before the
//! first store change, so an interrupted `memorize` can still be forgotten.
//!
//! **Forgetting.** `forget` deletes the memories the source inserted and
//! puts back the values it changed: exactly (bit for bit) where the value
//! is still what the source left; where a later source changed the same
//! memory since, by subtracting this source's change (the later change is
//! kept, up to rounding; the memory keeps the later source's tag), and the
//! later source's ledger is rebased on this one's starting value, so that
//! forgetting every source gives the distilled memory back exactly in any
//! order.
//! An output memory's rows are deleted by their tag like any inserted
//! memory; its radius stays as the last `memorize` calibrated it, and an
//! output memory left without rows is removed (its parameters file too),
//! so the model answers exactly as before.
//! A source changes the values of the distilled memories and of its own
//! only: other sources' memories are never trained, evicted or recombined
//! by it, so forgetting one source leaves every other source's memories as
//! they are, and only distilled memories that two sources both changed
//! overlap. While a source is written, older memories' LRFU bookkeeping is
//! left as it was.

use rand_core::SeedableRng as _;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::Device;
use memstore_api::{ChangeBatch, MemoryId, MemoryStore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::distill::{StudentSpec, load_student_room, read_spec, set_learning, write_spec};
use crate::loss::{LossKernel, tied_loss};
use crate::memory::layers::LayerKind;
use crate::memory::output::{OutputMemory, OutputParams};
use crate::tokenizer::TextCodec;
use crate::train::{Corpus, SplitMix64, Window, eval_batches, evaluate, sample_batch, value};
use crate::{DmtError, FeedForward, Gpt2, Result, io_error as io, runtime};

/// Where a run directory keeps its sources' ledgers.
pub const SOURCES_DIR: &str = "sources";

/// How `memorize` writes a text into the memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Mechanism {
    /// Sparse value updates of the rows the text activates most (TF-IDF).
    Sparse,
    /// Novelty-gated insertion of new memories, whose values then train.
    Insert,
    /// Both.
    Both,
    /// Rows of the output memory at the LM head (kNN-LM,
    /// [`crate::memory::output`]): every position of the text, keyed by the
    /// model's final hidden state, voting for the token that followed.
    Output,
}

impl Mechanism {
    /// The name `FromStr` takes.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Sparse => "sparse",
            Mechanism::Insert => "insert",
            Mechanism::Both => "both",
            Mechanism::Output => "output",
        }
    }
    fn sparse(self) -> bool {
        matches!(self, Mechanism::Sparse | Mechanism::Both)
    }
    fn insert(self) -> bool {
        matches!(self, Mechanism::Insert | Mechanism::Both)
    }
}

impl std::str::FromStr for Mechanism {
    type Err = DmtError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "sparse" => Ok(Mechanism::Sparse),
            "insert" => Ok(Mechanism::Insert),
            "both" => Ok(Mechanism::Both),
            "output" => Ok(Mechanism::Output),
            other => Err(DmtError::InvalidArgument(format!(
                "unknown mechanism {other:?} (expected sparse, insert, both or output)"
            ))),
        }
    }
}

/// What `memorize` is asked to do.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct MemorizeOptions {
    /// The mechanism.
    pub mechanism: Mechanism,
    /// SGD steps per source (`None`: one pass over its tokens,
    /// `⌈tokens / (batch · seq)⌉` steps of random windows).
    pub steps: Option<usize>,
    /// Windows per step.
    pub batch: usize,
    /// Tokens per window.
    pub seq: usize,
    /// SGD learning rate of the memory values.
    pub lr: f32,
    /// Rows per memory layer the sparse mechanism trains (top TF-IDF).
    pub sparse_rows: usize,
    /// Slots added to each memory layer's table for
    /// memorised memories (the first `memorize` of a run sets it; rounded
    /// up to a multiple of the head partitions).
    pub room: usize,
    /// Most memories a layer inserts or recombines per step.
    pub max_inserts: usize,
    /// Training windows that give the rows' document frequencies and the
    /// distances to the nearest memory the training text sees.
    pub background_windows: usize,
    /// Insertion's novelty gate: a position of the new text becomes a new
    /// memory only when its nearest memory is farther than this quantile of
    /// the training text's nearest-memory distances (and than the store's
    /// novelty threshold).
    pub novelty_quantile: f64,
    /// How the output memory answers (mechanism `output`; its radius is
    /// calibrated, the value here is not used).
    pub output: OutputParams,
    /// Seed of the windows.
    pub seed: u64,
    /// Tokenizer directory if not the teacher's.
    pub tokenizer: Option<PathBuf>,
    /// Device.
    pub device: Device,
}

impl Default for MemorizeOptions {
    fn default() -> Self {
        MemorizeOptions {
            mechanism: Mechanism::Both,
            steps: None,
            batch: 16,
            seq: 64,
            lr: 1000.0,
            sparse_rows: 512,
            room: 4096,
            max_inserts: 64,
            background_windows: 64,
            novelty_quantile: 0.99,
            output: OutputParams::default(),
            seed: 1,
            tokenizer: None,
            device: Device::flex(),
        }
    }
}

/// A text and its tag.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// `source:<file name>@<sha16>`.
    pub tag: String,
    /// The file's name.
    pub file: String,
    /// SHA-256 of its bytes (hex).
    pub sha256: String,
    /// Its size.
    pub bytes: u64,
}

/// Reads a text to memorise: refuses an unreadable, empty or non-UTF-8
/// file.
pub fn read_source(path: &Path) -> Result<(Source, String)> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let bad = |message: &str| DmtError::Text {
        path: path.to_path_buf(),
        message: message.to_string(),
    };
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(bad("the file is empty"));
    }
    let sha: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    let len = bytes.len() as u64;
    let text = String::from_utf8(bytes).map_err(|e| bad(&format!("not UTF-8 text ({e})")))?;
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    Ok((
        Source {
            tag: format!("source:{file}@{}", &sha[..16]),
            file,
            sha256: sha,
            bytes: len,
        },
        text,
    ))
}

/// What one source did to one memory layer (its ledger entry).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerLedger {
    /// The block.
    pub block: usize,
    /// The first id the source could give: memories from here up to
    /// `next_id` that carry its tag are its own.
    pub first_id: MemoryId,
    /// The layer's next id when the source was done (`None`: interrupted).
    pub next_id: Option<MemoryId>,
    /// Older memories whose values it may change.
    pub changed: Vec<MemoryId>,
    /// Their values before, `changed.len() × value_dim` f32 bit patterns.
    pub before: Vec<u32>,
    /// Their values after (empty while interrupted).
    pub after: Vec<u32>,
    /// Memories it inserted (and kept).
    pub inserted: usize,
}

/// A source's ledger: `sources/<hash of the tag>.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// The source.
    pub source: Source,
    /// How it was memorised.
    pub mechanism: Mechanism,
    /// Its tokens.
    pub tokens: usize,
    /// SGD steps.
    pub steps: usize,
    /// Whether `memorize` finished it.
    pub complete: bool,
    /// Per memory layer.
    pub layers: Vec<LayerLedger>,
}

fn ledger_path(run_dir: &Path, tag: &str) -> PathBuf {
    let h: String = Sha256::digest(tag.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    run_dir.join(SOURCES_DIR).join(format!("{h}.json"))
}

fn write_ledger(run_dir: &Path, l: &Ledger) -> Result<()> {
    let dir = run_dir.join(SOURCES_DIR);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let text = serde_json::to_string(l).map_err(|e| DmtError::InvalidArgument(e.to_string()))?;
    crate::loader::write_atomic(&ledger_path(run_dir, &l.source.tag), text.as_bytes())
}

/// The ledgers of the sources memorised in `run_dir`, by tag.
pub fn sources(run_dir: &Path) -> Result<Vec<Ledger>> {
    let dir = run_dir.join(SOURCES_DIR);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            let text = std::fs::read_to_string(&p).map_err(io(&p))?;
            let l: Ledger = serde_json::from_str(&text).map_err(|e| DmtError::Config {
                path: p.clone(),
                message: e.to_string(),
            })?;
            out.push(l);
        }
    }
    out.sort_by(|a, b| a.source.tag.cmp(&b.source.tag));
    Ok(out)
}

/// Finds a source by its tag, or by its file name when one source has it.
fn find_source(run_dir: &Path, tag: &str) -> Result<Ledger> {
    let all = sources(run_dir)?;
    let by_tag: Vec<&Ledger> = all.iter().filter(|l| l.source.tag == tag).collect();
    let by_file: Vec<&Ledger> = all.iter().filter(|l| l.source.file == tag).collect();
    match (by_tag.as_slice(), by_file.as_slice()) {
        ([l], _) | ([], [l]) => Ok((*l).clone()),
        _ => Err(DmtError::UnknownSource {
            tag: tag.to_string(),
            known: if all.is_empty() {
                "none".into()
            } else {
                all.iter().map(|l| l.source.tag.as_str()).collect::<Vec<_>>().join(", ")
            },
        }),
    }
}

/// What `memorize` did with one source.
#[derive(Clone, Debug)]
pub struct MemorizeReport {
    /// The source.
    pub source: Source,
    /// Its tokens.
    pub tokens: usize,
    /// SGD steps.
    pub steps: usize,
    /// Wall-clock seconds of the steps.
    pub seconds: f64,
    /// Tokens processed per second by the steps.
    pub tokens_per_s: f64,
    /// Cross-entropy on (up to 64 windows of) the text, before.
    pub ce_before: f64,
    /// And after.
    pub ce_after: f64,
    /// `(block, memories inserted and kept, older memories changed)`.
    pub layers: Vec<(usize, usize, usize)>,
}

/// Called after every step of `memorize` with the step number (from 1)
/// and the student (learning on; evaluate with [`frozen_ce`]).
pub type StepHook<'a> = &'a mut dyn FnMut(usize, &mut Gpt2) -> Result<()>;

/// Cross-entropy of `model` on `windows` without recording anything in
/// its memories (learning off, then on again).
pub fn frozen_ce(model: &mut Gpt2, windows: &[Window]) -> Result<f64> {
    set_learning(model, false);
    let r = evaluate(model, None, windows).map(|s| s.nll);
    set_learning(model, true);
    r
}

/// Cross-entropy of `model` on `windows` (for a model whose memories do
/// not learn, e.g. in [`finetune`]'s hook).
pub fn ce(model: &Gpt2, windows: &[Window]) -> Result<f64> {
    Ok(evaluate(model, None, windows)?.nll)
}

/// The training text of a run (its training part), for document frequencies.
fn training_tokens(spec: &StudentSpec, codec: &TextCodec) -> Result<Vec<u32>> {
    let c = spec.corpus.as_ref().ok_or_else(|| {
        DmtError::InvalidArgument("the run does not record its training text (needed by the sparse mechanism)".into())
    })?;
    let text = std::fs::read_to_string(&c.path).map_err(io(&c.path))?;
    let t = codec.encode(&text)?;
    Ok(if c.held_out_tail {
        Corpus::split(t, 0.1).train
    } else {
        t
    })
}

/// What a memory layer retrieved on some windows.
#[derive(Default)]
struct LayerUse {
    /// Retrievals of each slot.
    tf: Vec<f64>,
    /// Sequences retrieving each slot.
    df: Vec<f64>,
    /// Each query's distance to its nearest memory.
    nearest: Vec<f32>,
}

/// Per memory block, what the model retrieves on `windows` (learning on;
/// with `per_sequence`, one forward pass per sequence, so that document
/// frequencies count sequences; otherwise one per window).
fn retrievals(model: &mut Gpt2, windows: &[Window], per_sequence: bool) -> Result<HashMap<usize, LayerUse>> {
    let device = model.device();
    let mut out: HashMap<usize, LayerUse> = HashMap::new();
    for (i, b) in model.h.iter().enumerate() {
        if let Some(t) = b.mlp.memory() {
            out.insert(
                i,
                LayerUse {
                    tf: vec![0.0; t.capacity()],
                    df: vec![0.0; t.capacity()],
                    nearest: Vec::new(),
                },
            );
        }
    }
    for w in windows {
        let rows: Vec<Window> = if per_sequence {
            w.rows().collect()
        } else {
            vec![w.clone()]
        };
        for one in rows {
            drop(model.forward(one.inputs(&device), None)?);
            for (i, u) in out.iter_mut() {
                let observed = model.h[*i].mlp.take_observed().unwrap_or_default();
                let (slots, nearest) = crate::memory::tier::retrieved_and_nearest(observed)?;
                u.nearest.extend(nearest);
                let mut seen = vec![false; u.tf.len()];
                for s in slots {
                    u.tf[s] += 1.0;
                    if !seen[s] {
                        seen[s] = true;
                        u.df[s] += 1.0;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Memorises each file into the student of `run_dir`, one source after the
/// other (see the module documentation); calls `hook` after every step.
pub fn memorize(
    run_dir: &Path,
    files: &[PathBuf],
    opts: &MemorizeOptions,
    mut hook: Option<StepHook<'_>>,
) -> Result<Vec<MemorizeReport>> {
    if files.is_empty() {
        return Err(DmtError::InvalidArgument("name at least one text to memorise".into()));
    }
    if opts.batch == 0 || opts.seq < 2 || !(opts.lr.is_finite() && opts.lr >= 0.0) {
        return Err(DmtError::InvalidArgument(format!(
            "batch {} / sequence {} / learning rate {} are not usable",
            opts.batch, opts.seq, opts.lr
        )));
    }
    // Everything is checked before anything is written.
    let spec = read_spec(run_dir)?;
    let plan: Vec<LayerKind> = spec.layers.iter().map(|s| s.parse()).collect::<Result<_>>()?;
    if !plan.iter().any(|k| {
        matches!(
            k,
            LayerKind::Featural | LayerKind::Product | LayerKind::Associative | LayerKind::KeyValue
        )
    }) {
        return Err(DmtError::InvalidArgument(format!(
            "{} has no memory layers to memorise into",
            run_dir.display()
        )));
    }
    let grids: Vec<usize> = (0..plan.len()).filter(|&i| plan[i] == LayerKind::Product).collect();
    if opts.mechanism.insert() && !grids.is_empty() {
        return Err(DmtError::InvalidArgument(format!(
            "blocks {grids:?} are product-key grids, which take no new memories: memorise with the sparse \
             mechanism (value updates only)"
        )));
    }
    let codec = TextCodec::for_model(&spec.teacher, opts.tokenizer.as_deref())?;
    let known = sources(run_dir)?;
    let mut texts = Vec::with_capacity(files.len());
    for f in files {
        let (src, text) = read_source(f)?;
        if known
            .iter()
            .chain(texts.iter().map(|(l, _)| l))
            .any(|l: &Ledger| l.source.tag == src.tag)
        {
            return Err(DmtError::InvalidArgument(format!(
                "{} is memorised already as {} (forget it first)",
                f.display(),
                src.tag
            )));
        }
        let tokens = codec.encode(&text)?;
        if tokens.len() < 3 {
            return Err(DmtError::Text {
                path: f.clone(),
                message: format!("{} tokens are too few to learn from", tokens.len()),
            });
        }
        let ledger = Ledger {
            source: src,
            mechanism: opts.mechanism,
            tokens: tokens.len(),
            steps: 0,
            complete: false,
            layers: Vec::new(),
        };
        texts.push((ledger, tokens));
    }
    if opts.mechanism == Mechanism::Output {
        return memorize_output(run_dir, &spec, &codec, texts, opts, hook);
    }
    let parts = spec.memory_parts.max(1);
    let room = opts.room.div_ceil(parts) * parts;
    let mut spec2 = spec.clone();
    spec2.memory_room = spec.memory_room.max(room);
    let rt = runtime()?;
    let ad = opts.device.clone().autodiff();
    let mut student = load_student_room(run_dir, &spec2, &ad, &rt)?.no_grad();
    let background = {
        let t = training_tokens(&spec, &codec)?;
        let seq = opts.seq.min(spec.config.n_positions);
        let mut rng = SplitMix64::seed_from_u64(opts.seed ^ 0xB6);
        let n = opts.background_windows.max(1);
        vec![sample_batch(&t, n, seq, &mut rng)?]
    };
    let loc = spec.store_location()?;
    let mut stores = HashMap::new();
    for (i, b) in student.h.iter_mut().enumerate() {
        // New memories start as the layer's answers to their queries.
        match &mut b.mlp {
            FeedForward::Featural(f) => f.set_recording_answers(true),
            FeedForward::Associative(a) => a.set_recording_answers(true),
            _ => {}
        }
        if let Some(t) = b.mlp.memory_mut() {
            t.set_trainable_values(true);
            stores.insert(i, rt.block_on(loc.open_existing(run_dir, i))?);
        }
    }
    // The room is recorded before the stores grow into it.
    if spec2.memory_room != spec.memory_room {
        write_spec(run_dir, &spec2)?;
    }
    set_learning(&mut student, true);
    let bg = retrievals(&mut student, &background, true)?;
    // Key-value layers' insertion gate: (novel below this score, new units' score).
    let mut kv_gate: HashMap<usize, (f32, f32)> = HashMap::new();
    if opts.mechanism.insert() {
        // Novel is farther from every memory than the training text's
        // positions are (at `novelty_quantile`): new memories go where the
        // distilled ones do not reach, not where the training text's
        // queries would retrieve them too.
        for (i, u) in &bg {
            let mut d: Vec<f32> = u.nearest.iter().copied().filter(|x| x.is_finite()).collect();
            if d.is_empty() {
                continue;
            }
            d.sort_by(f32::total_cmp);
            let at = |p: f64| d[((d.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize];
            let q = at(opts.novelty_quantile);
            if let FeedForward::KeyValue(_) = student.h[*i].mlp {
                // Distances are 1 − score: a position is novel where its
                // strongest memory scores below the training text's
                // quantile; a new unit answers its own input as strongly as
                // the training text's strongest tenth of positions are.
                let (below, strength) = (1.0 - q, 1.0 - at(0.1));
                if strength > below {
                    kv_gate.insert(*i, (below, strength));
                }
            } else if let Some(t) = student.h[*i].mlp.memory_mut() {
                let floor = t.config().novelty;
                t.set_novelty(q.max(floor))?;
            }
        }
    }
    // Memories other sources inserted are theirs: a source trains only the
    // distilled memories and its own, so forgetting one source never takes
    // away what another wrote into its own memories.
    let mut foreign: HashMap<usize, Vec<std::ops::Range<MemoryId>>> = HashMap::new();
    let note = |foreign: &mut HashMap<usize, Vec<std::ops::Range<MemoryId>>>, l: &Ledger| {
        for x in &l.layers {
            foreign
                .entry(x.block)
                .or_default()
                .push(x.first_id..x.next_id.unwrap_or(MemoryId::MAX));
        }
    };
    for l in &known {
        note(&mut foreign, l);
    }
    let mut reports = Vec::new();
    for (mut ledger, tokens) in texts {
        let seq = opts.seq.min(spec.config.n_positions).min(tokens.len() - 2);
        let steps = opts
            .steps
            .unwrap_or_else(|| tokens.len().div_ceil(opts.batch * seq))
            .max(1);
        let probe = eval_batches(&tokens, opts.batch, seq, 64);
        let ce_before = frozen_ce(&mut student, &probe)?;
        // Rows to train: the top TF-IDF rows of each layer.
        let mut chosen: HashMap<usize, Vec<MemoryId>> = HashMap::new();
        if opts.mechanism.sparse() {
            let nb = opts.background_windows.max(1) as f64;
            let tf = retrievals(&mut student, &eval_batches(&tokens, opts.batch, seq, 512), false)?;
            for (i, u) in tf {
                let tf = u.tf;
                let df = bg.get(&i).map(|u| u.df.clone()).unwrap_or_default();
                let tier = student.h[i]
                    .mlp
                    .memory()
                    .ok_or_else(|| DmtError::InvalidArgument(format!("block {i} lost its memory")))?;
                let mut scored: Vec<(f64, MemoryId)> = tf
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| **t > 0.0)
                    .filter_map(|(s, t)| {
                        let idf = ((nb + 1.0) / (df.get(s).copied().unwrap_or(0.0) + 1.0)).ln();
                        tier.id(s).map(|id| (t * idf, id))
                    })
                    .filter(|(_, id)| !foreign.get(&i).is_some_and(|r| r.iter().any(|r| r.contains(id))))
                    .collect();
                scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                let mut ids: Vec<MemoryId> = scored.into_iter().take(opts.sparse_rows).map(|(_, id)| id).collect();
                ids.sort_unstable();
                chosen.insert(i, ids);
            }
        }
        // The ledger first: an interrupted source can still be forgotten.
        let mut blocks: Vec<usize> = stores.keys().copied().collect();
        blocks.sort_unstable();
        ledger.layers.clear();
        for &i in &blocks {
            let tier = student.h[i]
                .mlp
                .memory()
                .ok_or_else(|| DmtError::InvalidArgument(format!("block {i} lost its memory")))?;
            let changed = chosen.get(&i).cloned().unwrap_or_default();
            let before = tier.values_of(&changed)?.into_iter().map(f32::to_bits).collect();
            ledger.layers.push(LayerLedger {
                block: i,
                first_id: tier.next_id(),
                next_id: None,
                changed,
                before,
                after: Vec::new(),
                inserted: 0,
            });
        }
        ledger.steps = steps;
        write_ledger(run_dir, &ledger)?;
        let mut base = 0;
        for &i in &blocks {
            if let Some(t) = student.h[i].mlp.memory_mut() {
                base = base.max(t.latest_tick());
                t.begin_source(&ledger.source.tag)?;
            }
        }
        tracing::info!(
            "memorising {} ({} tokens, {steps} steps, {}): cross-entropy on it {ce_before:.4}",
            ledger.source.tag,
            tokens.len(),
            opts.mechanism.name()
        );
        let mut rng = SplitMix64::seed_from_u64(opts.seed);
        let device = student.device();
        let start = Instant::now();
        for step in 0..steps {
            let tick = base + 1 + step as u64;
            let b = sample_batch(&tokens, opts.batch, seq, &mut rng)?;
            let (head, _) = student.forward_train_tied(b.inputs(&device), false)?;
            let loss = tied_loss(head, None, b.targets(&opts.device), 1.0, 0.0, LossKernel::Auto)?.into_loss();
            let l = value(loss.ce)?;
            if !l.is_finite() {
                return Err(DmtError::InvalidArgument(format!(
                    "the loss diverged at step {} ({l}); lower the learning rate",
                    step + 1
                )));
            }
            let mut grads = loss.surrogate.backward();
            for (pos, &i) in blocks.iter().enumerate() {
                let first = ledger.layers[pos].first_id;
                let Some(ffw) = student.feed_forward_mut(i) else {
                    continue;
                };
                let Some(tier) = ffw.memory_mut() else { continue };
                let g = tier.take_value_grad(&mut grads);
                if let Some(g) = g {
                    let mut slots: Vec<usize> = chosen
                        .get(&i)
                        .map(|ids| ids.iter().filter_map(|id| tier.slot(*id)).collect())
                        .unwrap_or_default();
                    if opts.mechanism.insert() {
                        slots.extend((0..tier.capacity()).filter(|&s| tier.id(s).is_some_and(|id| id >= first)));
                    }
                    tier.apply_value_grad(g, opts.lr, &slots)?;
                }
                let inserts = if opts.mechanism.insert() { opts.max_inserts } else { 0 };
                match ffw {
                    FeedForward::Featural(f) => {
                        f.commit_answers(tick, inserts)?;
                    }
                    FeedForward::Associative(a) => {
                        a.commit(tick, inserts, None)?;
                    }
                    FeedForward::KeyValue(m) => match kv_gate.get(&i) {
                        Some(&(below, strength)) if inserts > 0 => {
                            m.commit_inserting(tick, inserts, below, strength)?;
                        }
                        _ => {
                            m.commit(tick, None)?;
                        }
                    },
                    _ => {}
                }
                let Some(tier) = ffw.memory_mut() else { continue };
                if let Some(batch) = tier.take_changes() {
                    let store = stores
                        .get(&i)
                        .ok_or_else(|| DmtError::InvalidArgument(format!("block {i} has no store")))?;
                    rt.block_on(store.shared().apply(&batch))?;
                }
            }
            if let Some(h) = hook.as_mut() {
                h(step + 1, &mut student)?;
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        let mut layers = Vec::new();
        for (pos, &i) in blocks.iter().enumerate() {
            let Some(tier) = student.h[i].mlp.memory_mut() else {
                continue;
            };
            tier.end_source()?;
            let l = &mut ledger.layers[pos];
            l.next_id = Some(tier.next_id());
            l.after = tier.values_of(&l.changed)?.into_iter().map(f32::to_bits).collect();
            l.inserted = (0..tier.capacity())
                .filter(|&s| tier.id(s).is_some_and(|id| id >= l.first_id))
                .count();
            let changed = l
                .before
                .chunks(tier.config().value_dim.max(1))
                .zip(l.after.chunks(tier.config().value_dim.max(1)))
                .filter(|(a, b)| a != b)
                .count();
            layers.push((i, l.inserted, changed));
        }
        ledger.complete = true;
        write_ledger(run_dir, &ledger)?;
        note(&mut foreign, &ledger);
        let ce_after = frozen_ce(&mut student, &probe)?;
        let done = steps * opts.batch * seq;
        tracing::info!(
            "memorised {}: cross-entropy on it {ce_before:.4} → {ce_after:.4}; {done} tokens in {seconds:.1} s \
             ({:.0} tokens/s)",
            ledger.source.tag,
            done as f64 / seconds.max(1e-9)
        );
        reports.push(MemorizeReport {
            source: ledger.source.clone(),
            tokens: tokens.len(),
            steps,
            seconds,
            tokens_per_s: done as f64 / seconds.max(1e-9),
            ce_before,
            ce_after,
            layers,
        });
    }
    for (_, s) in stores {
        rt.block_on(s.close())?;
    }
    Ok(reports)
}

/// Where a run directory keeps its output memory's parameters (the rows
/// are in the store of block `n_layer`, one past the last block).
pub const OUTPUT_MEMORY_FILE: &str = "output-memory.json";

/// The store block of a run's output memory: one past its last block.
pub fn output_block(spec: &StudentSpec) -> usize {
    spec.config.n_layer
}

/// The output memory of the student of `run_dir` (`None` when nothing was
/// memorised into one), read from its store.
pub fn load_output_memory(
    run_dir: &Path,
    spec: &StudentSpec,
    rt: &tokio::runtime::Runtime,
) -> Result<Option<OutputMemory>> {
    let path = run_dir.join(OUTPUT_MEMORY_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let params: OutputParams = serde_json::from_str(&text).map_err(|e| DmtError::Config {
        path: path.clone(),
        message: e.to_string(),
    })?;
    params.check()?;
    let loc = spec.store_location()?;
    let store = rt.block_on(loc.open_existing(run_dir, output_block(spec)))?;
    let m = rt.block_on(OutputMemory::load(
        store.shared().as_ref(),
        spec.config.vocab_size,
        spec.config.n_embd,
        params,
    ));
    rt.block_on(store.close())?;
    m.map(Some)
}

/// Each position's final hidden state (after `ln_f`), `b·t × n_embd` on
/// the host, of a model without an output memory attached.
fn final_hidden(model: &Gpt2, w: &Window) -> Result<Vec<f32>> {
    let out = model.forward_full(w.inputs(&model.device()), None, true)?;
    let h = out
        .hidden_states
        .last()
        .cloned()
        .ok_or_else(|| DmtError::InvalidArgument("the model returned no hidden state".into()))?;
    crate::host_f32(h)
}

/// `memorize` with the output mechanism: the memory layers are left as
/// they are; each step's windows become rows of the output memory, and its
/// radius is recalibrated on the training text after every step (each
/// training position's distance to its nearest row is kept and lowered by
/// the new rows, so the calibration is exact and costs only the new rows).
fn memorize_output(
    run_dir: &Path,
    spec: &StudentSpec,
    codec: &TextCodec,
    texts: Vec<(Ledger, Vec<u32>)>,
    opts: &MemorizeOptions,
    mut hook: Option<StepHook<'_>>,
) -> Result<Vec<MemorizeReport>> {
    opts.output.check()?;
    let rt = runtime()?;
    let ad = opts.device.clone().autodiff();
    let mut student = load_student_room(run_dir, spec, &ad, &rt)?.no_grad();
    set_learning(&mut student, false);
    let (block, dim, vocab) = (output_block(spec), spec.config.n_embd, spec.config.vocab_size);
    let mut memory = match student.take_output_memory() {
        Some(m) => m,
        None => std::sync::Arc::new(OutputMemory::new(dim, vocab, opts.output)?),
    };
    {
        let m = std::sync::Arc::make_mut(&mut memory);
        m.params = OutputParams {
            radius: m.params.radius,
            ..opts.output
        };
    }
    // The training text's positions, whose nearest rows set the radius.
    let background = {
        let t = training_tokens(spec, codec)?;
        let seq = opts.seq.min(spec.config.n_positions);
        let mut rng = SplitMix64::seed_from_u64(opts.seed ^ 0xB6);
        sample_batch(&t, opts.background_windows.max(1), seq, &mut rng)?
    };
    let bg = final_hidden(&student, &background)?;
    let mut nearest = memory.nearest_from(&bg, 0)?;
    let loc = spec.store_location()?;
    let store = rt.block_on(loc.open(run_dir, block, memstore_api::MemoryConfig::new(dim, 1)))?;
    {
        let c = store.shared().config().clone();
        if c.key_dim != dim || c.value_dim != 1 {
            return Err(DmtError::InvalidArgument(format!(
                "block {block}'s store holds keys of {} and values of {}, not an output memory of width {dim}",
                c.key_dim, c.value_dim
            )));
        }
    }
    let save_params = |m: &OutputMemory| -> Result<()> {
        let text = serde_json::to_string_pretty(&m.params).map_err(|e| DmtError::InvalidArgument(e.to_string()))?;
        crate::loader::write_atomic(&run_dir.join(OUTPUT_MEMORY_FILE), text.as_bytes())
    };
    let mut reports = Vec::new();
    for (mut ledger, tokens) in texts {
        let seq = opts.seq.min(spec.config.n_positions).min(tokens.len() - 2);
        let steps = opts
            .steps
            .unwrap_or_else(|| tokens.len().div_ceil(opts.batch * seq))
            .max(1);
        let probe = eval_batches(&tokens, opts.batch, seq, 64);
        student.set_output_memory(Some(memory.clone()))?;
        let ce_before = frozen_ce(&mut student, &probe)?;
        drop(student.take_output_memory());
        set_learning(&mut student, false);
        // The ledger first: an interrupted source can still be forgotten.
        let stats = rt.block_on(store.shared().stats())?;
        ledger.layers = vec![LayerLedger {
            block,
            first_id: stats.next_id,
            next_id: None,
            changed: Vec::new(),
            before: Vec::new(),
            after: Vec::new(),
            inserted: 0,
        }];
        ledger.steps = steps;
        write_ledger(run_dir, &ledger)?;
        tracing::info!(
            "memorising {} ({} tokens, {steps} steps, output memory): cross-entropy on it {ce_before:.4}",
            ledger.source.tag,
            tokens.len(),
        );
        let tag = vec![ledger.source.tag.clone()];
        let mut rng = SplitMix64::seed_from_u64(opts.seed);
        let start = Instant::now();
        let mut inserted = 0;
        for step in 0..steps {
            let b = sample_batch(&tokens, opts.batch, seq, &mut rng)?;
            let keys = final_hidden(&student, &b)?;
            let next: Vec<f32> = b.targets.iter().map(|&t| t as f32).collect();
            let batch = memstore_api::Batch::new(
                memstore_api::Vectors::new(&keys, dim)?,
                memstore_api::Vectors::new(&next, 1)?,
            )
            .with_tags(memstore_api::Tags::Same(&tag));
            let ids = rt.block_on(store.shared().insert(batch, step as u64 + 1))?;
            let m = std::sync::Arc::make_mut(&mut memory);
            let from = m.len();
            m.push(&ids, &keys, &next)?;
            inserted += ids.len();
            for (a, b) in nearest.iter_mut().zip(m.nearest_from(&bg, from)?) {
                *a = a.min(b);
            }
            m.params.radius = OutputMemory::radius_for(&nearest, m.params.quantile);
            if let Some(h) = hook.as_mut() {
                student.set_output_memory(Some(memory.clone()))?;
                h(step + 1, &mut student)?;
                drop(student.take_output_memory());
                set_learning(&mut student, false);
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        let stats = rt.block_on(store.shared().stats())?;
        ledger.layers[0].next_id = Some(stats.next_id);
        ledger.layers[0].inserted = inserted;
        ledger.complete = true;
        write_ledger(run_dir, &ledger)?;
        save_params(&memory)?;
        student.set_output_memory(Some(memory.clone()))?;
        let ce_after = frozen_ce(&mut student, &probe)?;
        drop(student.take_output_memory());
        set_learning(&mut student, false);
        let done = steps * opts.batch * seq;
        tracing::info!(
            "memorised {} into the output memory ({} rows, radius {:.4}): cross-entropy on it {ce_before:.4} → \
             {ce_after:.4}; {done} tokens in {seconds:.1} s ({:.0} tokens/s)",
            ledger.source.tag,
            memory.len(),
            memory.params.radius,
            done as f64 / seconds.max(1e-9)
        );
        reports.push(MemorizeReport {
            source: ledger.source.clone(),
            tokens: tokens.len(),
            steps,
            seconds,
            tokens_per_s: done as f64 / seconds.max(1e-9),
            ce_before,
            ce_after,
            layers: vec![(block, inserted, 0)],
        });
    }
    rt.block_on(store.close())?;
    Ok(reports)
}

/// What `forget` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForgetReport {
    /// Memories deleted (the source's own).
    pub deleted: usize,
    /// Values put back exactly.
    pub restored: usize,
    /// Values a later source had changed too: this source's change
    /// subtracted.
    pub overlapped: usize,
}

/// Removes what the source `tag` (or the one source of that file name)
/// wrote into the memory of `run_dir` (see the module documentation) and
/// its ledger.
pub fn forget(run_dir: &Path, tag: &str) -> Result<ForgetReport> {
    let ledger = find_source(run_dir, tag)?;
    // The other sources' ledgers: where they changed a memory this one
    // changed too, they are rebased on what this one started from.
    let mut others: Vec<Ledger> = sources(run_dir)?
        .into_iter()
        .filter(|l| l.source.tag != ledger.source.tag)
        .collect();
    let mut rebased = vec![false; others.len()];
    let spec = read_spec(run_dir)?;
    let loc = spec.store_location()?;
    let rt = runtime()?;
    let mut report = ForgetReport::default();
    let src = &ledger.source.tag;
    for l in &ledger.layers {
        let store = rt.block_on(loc.open_existing(run_dir, l.block))?;
        let s = store.shared();
        let dv = s.config().value_dim;
        let stats = rt.block_on(s.stats())?;
        let end = l.next_id.unwrap_or(stats.next_id);
        let ids = rt.block_on(s.ids())?;
        let own: Vec<MemoryId> = ids
            .iter()
            .copied()
            .filter(|id| (l.first_id..end).contains(id))
            .collect();
        let mut delete = Vec::new();
        for chunk in own.chunks(4096) {
            for m in rt.block_on(s.get(chunk))? {
                if m.tags.contains_key(src) {
                    delete.push(m.id);
                }
            }
        }
        let present: std::collections::HashSet<MemoryId> = ids.iter().copied().collect();
        let rows: Vec<(usize, MemoryId)> = l
            .changed
            .iter()
            .enumerate()
            .filter(|(_, id)| present.contains(id))
            .map(|(r, id)| (r, *id))
            .collect();
        let current: HashMap<MemoryId, Vec<f32>> = rt
            .block_on(s.get(&rows.iter().map(|(_, id)| *id).collect::<Vec<_>>()))?
            .into_iter()
            .map(|m| (m.id, m.value))
            .collect();
        let (mut assign_ids, mut assign_values, mut tag_counts) = (Vec::new(), Vec::new(), Vec::new());
        for (r, id) in rows {
            let before = &l.before[r * dv..(r + 1) * dv];
            let after = l.after.get(r * dv..(r + 1) * dv);
            let cur = current
                .get(&id)
                .ok_or_else(|| DmtError::InvalidArgument(format!("memory {id} vanished")))?;
            let cur_bits: Vec<u32> = cur.iter().map(|x| x.to_bits()).collect();
            tag_counts.push((id, src.clone(), 0));
            if cur_bits == before {
                continue;
            }
            match after {
                Some(a) if cur_bits != a => {
                    // A later source changed it too: take away this one's change,
                    // and rebase the later sources' ledgers, so that forgetting
                    // them too gives back this one's starting value exactly.
                    report.overlapped += 1;
                    let new: Vec<f32> = cur
                        .iter()
                        .zip(before.iter().zip(a))
                        .map(|(c, (b, a))| c - (f32::from_bits(*a) - f32::from_bits(*b)))
                        .collect();
                    for (o, moved) in others.iter_mut().zip(rebased.iter_mut()) {
                        let Some(ol) = o.layers.iter_mut().find(|x| x.block == l.block) else {
                            continue;
                        };
                        let Some(r2) = ol.changed.iter().position(|x| *x == id) else {
                            continue;
                        };
                        let span = r2 * dv..(r2 + 1) * dv;
                        if ol.before.get(span.clone()) == Some(a) {
                            ol.before[span.clone()].copy_from_slice(before);
                            *moved = true;
                        }
                        if ol.after.get(span.clone()) == Some(&cur_bits[..]) {
                            for (x, v) in ol.after[span].iter_mut().zip(&new) {
                                *x = v.to_bits();
                            }
                            *moved = true;
                        }
                    }
                    assign_ids.push(id);
                    assign_values.extend(new);
                }
                _ => {
                    report.restored += 1;
                    assign_ids.push(id);
                    assign_values.extend(before.iter().map(|b| f32::from_bits(*b)));
                }
            }
        }
        report.deleted += delete.len();
        let batch = ChangeBatch {
            seq: stats.counters.last_batch + 1,
            tick: 0,
            first_id: stats.next_id,
            delete,
            assign_ids,
            assign_values,
            tag_counts,
            ..ChangeBatch::default()
        };
        rt.block_on(s.apply(&batch))?;
        // An output memory left without rows is no output memory.
        let emptied = l.block == output_block(&spec) && rt.block_on(s.stats())?.len == 0;
        drop(s);
        rt.block_on(store.close())?;
        let params = run_dir.join(OUTPUT_MEMORY_FILE);
        if emptied && params.exists() {
            std::fs::remove_file(&params).map_err(io(&params))?;
        }
    }
    for (o, moved) in others.iter().zip(rebased) {
        if moved {
            write_ledger(run_dir, o)?;
        }
    }
    let p = ledger_path(run_dir, src);
    std::fs::remove_file(&p).map_err(io(&p))?;
    Ok(report)
}

/// Which weights [`finetune`] trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinetuneScope {
    /// Every weight (the memory's values stay as they are).
    All,
    /// The last block's weights only.
    LastBlock,
}

/// The baseline `memorize` is compared with: the student of `run_dir`
/// finetuned on `tokens` by AdamW (weight decay 0.01, constant learning
/// rate `lr`, gradient norm clipped at 1) on the next-token cross-entropy,
/// for `steps` steps of `batch` random windows of `seq` tokens (seed
/// `seed`), its memories neither learning nor changing; calls `hook` after
/// every step. Nothing is written to the run directory. Returns the
/// floats the training can change.
#[allow(clippy::too_many_arguments)]
pub fn finetune(
    run_dir: &Path,
    tokens: &[u32],
    scope: FinetuneScope,
    lr: f64,
    steps: usize,
    (batch, seq, seed): (usize, usize, u64),
    device: &Device,
    hook: StepHook<'_>,
) -> Result<usize> {
    use burn::optim::grad_clipping::GradientClippingConfig;
    use burn::optim::{AdamWConfig, GradientsParams};
    let rt = runtime()?;
    let ad = device.clone().autodiff();
    let (spec, mut student) = crate::distill::load_student(run_dir, &ad, &rt)?;
    for b in student.h.iter_mut() {
        b.mlp.set_learning(false);
        if let Some(t) = b.mlp.memory_mut() {
            t.set_trainable_values(false);
        }
    }
    let last = student.h.len().saturating_sub(1);
    let trainable = match scope {
        FinetuneScope::All => student.num_params(),
        FinetuneScope::LastBlock => student.h[last].num_params(),
    };
    let seq = seq.min(spec.config.n_positions);
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.01)
        .with_grad_clipping(Some(GradientClippingConfig::Norm(1.0)))
        .init();
    let mut rng = SplitMix64::seed_from_u64(seed);
    for step in 0..steps {
        let b = sample_batch(tokens, batch, seq, &mut rng)?;
        let (head, _) = student.forward_train_tied(b.inputs(&ad), false)?;
        let loss = tied_loss(head, None, b.targets(device), 1.0, 0.0, LossKernel::Auto)?.into_loss();
        let l = value(loss.ce)?;
        if !l.is_finite() {
            return Err(DmtError::InvalidArgument(format!(
                "finetuning diverged at step {} ({l})",
                step + 1
            )));
        }
        let grads = loss.surrogate.backward();
        let gp = match scope {
            FinetuneScope::All => GradientsParams::from_grads(grads, &student),
            FinetuneScope::LastBlock => GradientsParams::from_grads(grads, &student.h[last]),
        };
        student = optim.step(lr, student, gp);
        hook(step + 1, &mut student)?;
    }
    Ok(trainable)
}

/// Makes every memory layer of the student of `run_dir` answer from its
/// store's own index instead of its device tier (inference with a memory
/// larger than a device holds: only the rows found reach the device);
/// returns the open stores, which must outlive the model's use.
pub fn serve_from_stores(
    run_dir: &Path,
    model: &mut Gpt2,
    rt: &tokio::runtime::Runtime,
) -> Result<Vec<crate::storage::LayerStore>> {
    let spec = read_spec(run_dir)?;
    let loc = spec.store_location()?;
    let device = model.device();
    let mut open = Vec::new();
    for (i, b) in model.h.iter_mut().enumerate() {
        let parts = match &b.mlp {
            FeedForward::Featural(_) | FeedForward::Associative(_) => spec.memory_parts,
            FeedForward::KeyValue(_) => 1,
            _ => continue,
        };
        let store = rt.block_on(loc.open_existing(run_dir, i))?;
        let tier = rt.block_on(crate::memory::tier::DeviceMemory::from_store(
            store.shared(),
            parts,
            &device,
        ))?;
        if let Some(t) = b.mlp.memory_mut() {
            *t = tier;
        }
        open.push(store);
    }
    Ok(open)
}
