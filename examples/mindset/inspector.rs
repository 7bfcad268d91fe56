//! The inspector's model side: a trained student whose memory layers answer
//! from the run directory's stores (`serve_from_stores`: each layer searches
//! its store's own index), so that every view reads the stores as they are
//! now. A store file is owned by one opener at a time (memstore's file
//! lock), so the inspector opens the stores it needs for each request and
//! closes them when it answers: between requests the `memstore` tool,
//! `memory forget` or another process can use them, and whatever they
//! changed shows in the next answer. Nothing of the stores is kept (the
//! student is loaded with empty memory tiers); the only state kept here is
//! derived: the contexts in which this inspector saw each memory used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn_dmt::Gpt2;
use burn_dmt::burn::tensor::Device;
use burn_dmt::continual::{forget, serve_from_stores, sources};
use burn_dmt::distill::{StudentSpec, load_student};
use burn_dmt::inspect::{Explanation, explain, promoted_tokens};
use burn_dmt::memory::tier::{DeviceMemory, head_tag};
use burn_dmt::storage::LayerStore;
use burn_dmt::tokenizer::TextCodec;
use memstore::{Memory, MemoryId, MemoryStore, TagFilter, Vectors};
use serde_json::{Value, json};

/// What can go wrong, as the page and the command line report it.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The model side (loading, tokenising, running).
    #[error(transparent)]
    Model(#[from] burn_dmt::DmtError),
    /// A store.
    #[error(transparent)]
    Store(#[from] memstore::Error),
    /// A request that names nothing that exists, or is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// Files of the run directory.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

/// Results of the inspector.
pub type Result<T> = std::result::Result<T, InspectError>;

/// Contexts kept per memory (the heaviest uses seen).
const CONTEXTS_KEPT: usize = 5;
/// Tokens of context shown on each side of the position that used a memory.
const CONTEXT_SIDE: usize = 8;
/// Most characters a prompt may have.
pub const MAX_PROMPT_CHARS: usize = 4096;

/// One use of a memory: the text around the position, and its weight there.
#[derive(Clone, Debug, PartialEq)]
struct Context {
    before: String,
    token: String,
    after: String,
    weight: f32,
}

/// A trained student, opened for inspection.
pub struct Inspector {
    run_dir: PathBuf,
    spec: StudentSpec,
    /// The student's weights; its memory tiers are empty (every view serves
    /// a copy of it from the stores).
    model: Gpt2,
    /// The blocks with a memory layer.
    blocks: Vec<usize>,
    codec: TextCodec,
    rt: tokio::runtime::Runtime,
    contexts: BTreeMap<(usize, MemoryId), Vec<Context>>,
}

/// The student serving from the run's stores, and the stores, by block;
/// closed when dropped.
struct Served {
    model: Gpt2,
    stores: BTreeMap<usize, Arc<dyn MemoryStore>>,
    _open: Vec<LayerStore>,
}

impl Inspector {
    /// Opens the student of `run_dir` (from `distill_gpt2`) on the CPU.
    pub fn open(run_dir: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| InspectError::Io {
                path: run_dir.to_path_buf(),
                source: e,
            })?;
        let device = Device::flex();
        let (spec, mut model) = load_student(run_dir, &device, &rt)?;
        let mut blocks = Vec::new();
        for (i, b) in model.h.iter_mut().enumerate() {
            if let Some(t) = b.mlp.memory_mut() {
                // Emptied: every view reads the stores themselves.
                let parts = t.parts();
                *t = DeviceMemory::new(t.config().clone(), parts.max(1), &device)?.with_parts(parts)?;
                blocks.push(i);
            }
        }
        let codec = TextCodec::for_model(&spec.teacher, None)?;
        Ok(Inspector {
            run_dir: run_dir.to_path_buf(),
            spec,
            model,
            blocks,
            codec,
            rt,
            contexts: BTreeMap::new(),
        })
    }

    /// The student with every memory layer searching its store, until dropped.
    fn serve(&self) -> Result<Served> {
        let mut model = self.model.clone();
        let open = serve_from_stores(&self.run_dir, &mut model, &self.rt)?;
        let stores = self
            .blocks
            .iter()
            .copied()
            .zip(open.iter().map(LayerStore::shared))
            .collect();
        Ok(Served {
            model,
            stores,
            _open: open,
        })
    }

    /// `block`'s store, opened for one request (closed when dropped).
    fn store(&self, block: usize) -> Result<Arc<dyn MemoryStore>> {
        if !self.blocks.contains(&block) {
            return Err(InspectError::BadRequest(format!(
                "block {block} has no memory layer (memory blocks: {:?})",
                self.blocks
            )));
        }
        let loc = self.spec.store_location()?;
        Ok(self.rt.block_on(loc.open_existing(&self.run_dir, block))?.shared())
    }

    fn token_text(&self, id: u32) -> String {
        self.codec.decode(&[id]).unwrap_or_else(|_| format!("<{id}>"))
    }

    /// The memory `id` of `block`, or a clear error when it does not exist.
    fn memory(&self, store: &Arc<dyn MemoryStore>, block: usize, id: MemoryId) -> Result<Memory> {
        let unknown = || InspectError::BadRequest(format!("block {block} has no memory {id}"));
        self.rt
            .block_on(store.get(&[id]))
            .map_err(|e| match e {
                memstore::Error::UnknownId(_) => unknown(),
                e => e.into(),
            })?
            .into_iter()
            .next()
            .ok_or_else(|| InspectError::BadRequest(format!("block {block} has no memory {id}")))
    }

    /// The model: its memory layers (kind, heads, rows now, capacity, and
    /// their growth over training from `metrics.csv`) and the memorised
    /// sources.
    pub fn model_view(&self) -> Result<Value> {
        let metrics = read_metrics(&self.run_dir.join("metrics.csv"))?;
        let mut layers = Vec::new();
        for (i, b) in self.model.h.iter().enumerate() {
            let kind = b.mlp.kind();
            let mut layer = json!({ "block": i, "kind": kind });
            if self.blocks.contains(&i) {
                let store = self.store(i)?;
                let stats = self.rt.block_on(store.stats())?;
                let col = |name: &str| metrics.column(&format!("b{i}_{name}"));
                let rows_over_training: Vec<[f64; 2]> = metrics
                    .column("step")
                    .iter()
                    .zip(col("rows"))
                    .filter_map(|(s, r)| Some([(*s)?, r?]))
                    .collect();
                let total = |name: &str| col(name).iter().flatten().sum::<f64>();
                layer["memory"] = json!({
                    "rows": stats.len,
                    "next_id": stats.next_id,
                    "capacity": self.spec.capacity + self.spec.memory_room,
                    "heads": if kind == "keyvalue" { 1 } else { self.spec.memory_parts },
                    "k": if kind == "keyvalue" { self.spec.kv_k } else { self.spec.k },
                    "dims": [store.config().key_dim, store.config().value_dim],
                    "inserted": total("inserted"),
                    "merged": total("merged"),
                    "evicted": total("evicted"),
                    "rows_over_training": rows_over_training,
                });
            }
            layers.push(layer);
        }
        let srcs: Vec<Value> = sources(&self.run_dir)?
            .into_iter()
            .map(|l| {
                json!({
                    "tag": l.source.tag,
                    "tokens": l.tokens,
                    "mechanism": l.mechanism.name(),
                    "inserted": l.layers.iter().map(|x| x.inserted).sum::<usize>(),
                    "changed": l.layers.iter().map(|x| x.changed.len()).sum::<usize>(),
                })
            })
            .collect();
        let loss = metrics.column("loss");
        Ok(json!({
            "run_dir": self.run_dir.display().to_string(),
            "n_layer": self.model.h.len(),
            "n_embd": self.spec.config.n_embd,
            "vocab": self.spec.config.vocab_size,
            "steps": loss.len(),
            "final_loss": loss.iter().rev().flatten().next(),
            "feedback": self.spec.feedback,
            "layers": layers,
            "sources": srcs,
        }))
    }

    /// Tokenises `prompt` and explains it ([`Inspector::explain_tokens`]).
    pub fn explain_prompt(&mut self, prompt: &str, top: usize) -> Result<Value> {
        if prompt.trim().is_empty() {
            return Err(InspectError::BadRequest("the prompt is empty".into()));
        }
        if prompt.chars().count() > MAX_PROMPT_CHARS {
            return Err(InspectError::BadRequest(format!(
                "the prompt is longer than {MAX_PROMPT_CHARS} characters"
            )));
        }
        let tokens = self.codec.encode(prompt)?;
        self.explain_tokens(&tokens, top)
    }

    /// Per token: the memories each memory layer read (id, head, distance,
    /// weight, tags, provenance) and the `top` next tokens; remembers the
    /// contexts for [`Inspector::memory_view`].
    pub fn explain_tokens(&mut self, tokens: &[u32], top: usize) -> Result<Value> {
        let served = self.serve()?;
        let e = explain(&served.model, tokens, top)?;
        self.remember_contexts(&e);
        let texts: Vec<String> = e.tokens.iter().map(|&t| self.token_text(t)).collect();
        let mut layers = Vec::new();
        for l in &e.layers {
            let store = served
                .stores
                .get(&l.block)
                .ok_or_else(|| InspectError::BadRequest(format!("block {} has no store", l.block)))?;
            let mut ids: Vec<MemoryId> = l.positions.iter().flatten().map(|r| r.id).collect();
            ids.sort_unstable();
            ids.dedup();
            let mut tags = BTreeMap::new();
            for chunk in ids.chunks(1024) {
                for m in self.rt.block_on(store.get(chunk))? {
                    tags.insert(m.id, provenance(&m));
                }
            }
            let positions: Vec<Value> = l
                .positions
                .iter()
                .map(|read| {
                    Value::Array(
                        read.iter()
                            .map(|r| {
                                json!({
                                    "id": r.id,
                                    "head": r.head,
                                    "distance": r.distance,
                                    "weight": r.weight,
                                    "source": tags.get(&r.id).cloned().unwrap_or(Value::Null),
                                })
                            })
                            .collect(),
                    )
                })
                .collect();
            layers.push(json!({
                "block": l.block,
                "kind": l.kind,
                "heads": l.heads,
                "k": l.k,
                "positions": positions,
            }));
        }
        let next: Vec<Value> = e
            .next
            .iter()
            .map(|row| {
                Value::Array(
                    row.iter()
                        .map(|&(t, p)| json!({ "id": t, "text": self.token_text(t), "p": p }))
                        .collect(),
                )
            })
            .collect();
        let tokens: Vec<Value> = e
            .tokens
            .iter()
            .zip(&texts)
            .map(|(&id, text)| json!({ "id": id, "text": text }))
            .collect();
        Ok(json!({ "tokens": tokens, "next": next, "layers": layers }))
    }

    fn remember_contexts(&mut self, e: &Explanation) {
        let texts: Vec<String> = e.tokens.iter().map(|&t| self.token_text(t)).collect();
        for l in &e.layers {
            for (p, read) in l.positions.iter().enumerate() {
                let before = texts[p.saturating_sub(CONTEXT_SIDE)..p].concat();
                let after = texts[(p + 1).min(texts.len())..(p + 1 + CONTEXT_SIDE).min(texts.len())].concat();
                for r in read {
                    let c = Context {
                        before: before.clone(),
                        token: texts[p].clone(),
                        after: after.clone(),
                        weight: r.weight,
                    };
                    let kept = self.contexts.entry((l.block, r.id)).or_default();
                    if let Some(same) = kept
                        .iter_mut()
                        .find(|k| k.before == c.before && k.token == c.token && k.after == c.after)
                    {
                        if c.weight.abs() > same.weight.abs() {
                            same.weight = c.weight;
                        }
                        continue;
                    }
                    kept.push(c);
                    kept.sort_by(|a, b| b.weight.abs().total_cmp(&a.weight.abs()));
                    kept.truncate(CONTEXTS_KEPT);
                }
            }
        }
    }

    /// Reads `text` (split into windows of `seq` tokens, at most `windows`
    /// of them) through the model to collect the contexts each memory is
    /// used in; returns the tokens read.
    pub fn scan_contexts(&mut self, text: &str, seq: usize, windows: usize) -> Result<usize> {
        let tokens = self.codec.encode(text)?;
        let seq = seq.clamp(1, self.spec.config.n_positions);
        let served = self.serve()?;
        let mut read = 0;
        for w in tokens.chunks(seq).take(windows) {
            let e = explain(&served.model, w, 1)?;
            self.remember_contexts(&e);
            read += w.len();
        }
        Ok(read)
    }

    /// One memory: its bookkeeping and tags, the tokens its value promotes
    /// most, and the heaviest contexts this inspector saw it used in. A
    /// memory of a table the heads share is read through head `head`'s
    /// output projection (0 when not given); one of a head's own table,
    /// through that head's.
    pub fn memory_view(&self, block: usize, id: MemoryId, head: Option<usize>, top: usize) -> Result<Value> {
        let m = self.memory(&self.store(block)?, block, id)?;
        let own = m.tags.keys().any(|t| t.starts_with("head:"));
        let head = if own { head_of(&m) } else { head.unwrap_or(0) };
        let promoted: Vec<Value> = promoted_tokens(&self.model, block, head, &m.value, top)?
            .into_iter()
            .map(|(t, s)| json!({ "id": t, "text": self.token_text(t), "score": s }))
            .collect();
        let contexts: Vec<Value> = self
            .contexts
            .get(&(block, id))
            .into_iter()
            .flatten()
            .map(|c| json!({ "before": c.before, "token": c.token, "after": c.after, "weight": c.weight }))
            .collect();
        let norm = m.value.iter().map(|x| x * x).sum::<f32>().sqrt();
        Ok(json!({
            "block": block,
            "id": m.id,
            "head": head,
            "shared_by_heads": !own,
            "tags": m.tags,
            "source": provenance(&m),
            "created": m.created,
            "last_access": m.last_access,
            "access_count": m.access_count,
            "value_norm": norm,
            "promoted": promoted,
            "contexts": contexts,
        }))
    }

    /// Memories of `block` in id order after `after`, those carrying `tag`
    /// when given, at most `limit`.
    pub fn browse(&self, block: usize, tag: Option<&str>, after: Option<MemoryId>, limit: usize) -> Result<Value> {
        let store = self.store(block)?;
        let ids = self.rt.block_on(store.ids())?;
        let start = after.map_or(0, |a| ids.partition_point(|&i| i <= a));
        let mut found = Vec::new();
        let mut last = None;
        for chunk in ids[start..].chunks(512) {
            for m in self.rt.block_on(store.get(chunk))? {
                last = Some(m.id);
                if tag.is_none_or(|t| m.tags.contains_key(t)) {
                    found.push(row(&m));
                    if found.len() == limit {
                        break;
                    }
                }
            }
            if found.len() == limit {
                break;
            }
        }
        let more = last.is_some_and(|l| ids.last().is_some_and(|&e| e > l));
        Ok(
            json!({ "block": block, "total": ids.len(), "memories": found, "next_after": if more { last } else { None } }),
        )
    }

    /// The `k` memories nearest memory `id`'s key in `block` (its own head's
    /// memories when heads keep separate tables).
    pub fn nearest(&self, block: usize, id: MemoryId, k: usize) -> Result<Value> {
        let store = self.store(block)?;
        let m = self.memory(&store, block, id)?;
        let filter = (self.spec.memory_parts > 1 && m.tags.keys().any(|t| t.starts_with("head:")))
            .then(|| TagFilter::All(vec![head_tag(head_of(&m))]));
        let q = Vectors::new(&m.key, m.key.len())?;
        let n = self.rt.block_on(store.search(q, k.max(1), filter.as_ref()))?;
        let ids: Vec<MemoryId> = (0..n.k).filter_map(|j| n.id(0, j)).collect();
        let dist: BTreeMap<MemoryId, f32> = (0..n.k).filter_map(|j| Some((n.id(0, j)?, n.distance(0, j)))).collect();
        let mut rows: Vec<Value> = self
            .rt
            .block_on(store.get(&ids))?
            .iter()
            .map(|x| {
                let mut r = row(x);
                r["distance"] = json!(dist.get(&x.id));
                r
            })
            .collect();
        rows.sort_by(|a, b| {
            a["distance"]
                .as_f64()
                .unwrap_or(f64::INFINITY)
                .total_cmp(&b["distance"].as_f64().unwrap_or(f64::INFINITY))
        });
        Ok(json!({ "block": block, "id": id, "memories": rows }))
    }

    /// Deletes memory `id` from `block`'s store (what `memstore delete`
    /// does); an id that does not exist is an error and deletes nothing.
    pub fn delete(&mut self, block: usize, id: MemoryId) -> Result<Value> {
        let store = self.store(block)?;
        self.memory(&store, block, id)?;
        let n = self.rt.block_on(store.delete(&[id]))?;
        self.contexts.remove(&(block, id));
        Ok(json!({ "block": block, "id": id, "deleted": n }))
    }

    /// Forgets a memorised source (its tag or file name), as `memory forget`.
    pub fn forget(&mut self, source: &str) -> Result<Value> {
        let r = forget(&self.run_dir, source)?;
        Ok(json!({ "source": source, "deleted": r.deleted, "restored": r.restored, "overlapped": r.overlapped }))
    }

    /// The explanation of `prompt` as text, for terminals: per token, the
    /// likeliest next tokens and each layer's `per_layer` heaviest memories.
    pub fn explain_text(&mut self, prompt: &str, top: usize, per_layer: usize) -> Result<String> {
        let v = self.explain_prompt(prompt, top)?;
        let mut out = String::new();
        let empty = Vec::new();
        let tokens = v["tokens"].as_array().unwrap_or(&empty);
        for (p, t) in tokens.iter().enumerate() {
            let next: Vec<String> = v["next"][p]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|n| {
                    format!(
                        "{:?} {:.3}",
                        n["text"].as_str().unwrap_or(""),
                        n["p"].as_f64().unwrap_or(0.0)
                    )
                })
                .collect();
            out += &format!(
                "{p:>3} {:?} (token {}) -> next: {}\n",
                t["text"].as_str().unwrap_or(""),
                t["id"],
                next.join(", ")
            );
            for l in v["layers"].as_array().unwrap_or(&empty) {
                let read: Vec<String> = l["positions"][p]
                    .as_array()
                    .unwrap_or(&empty)
                    .iter()
                    .take(per_layer)
                    .map(|r| {
                        format!(
                            "#{} h{} d={:.3} w={:.3}{}",
                            r["id"],
                            r["head"],
                            r["distance"].as_f64().unwrap_or(f64::NAN),
                            r["weight"].as_f64().unwrap_or(f64::NAN),
                            r["source"].as_str().map_or(String::new(), |s| format!(" [{s}]"))
                        )
                    })
                    .collect();
                out += &format!(
                    "      block {} {}: {}\n",
                    l["block"],
                    l["kind"].as_str().unwrap_or(""),
                    read.join("; ")
                );
            }
        }
        Ok(out)
    }
}

/// A memory's provenance: its `source:` tags (memorised text), or `None`
/// for memories from training.
fn provenance(m: &Memory) -> Value {
    let s: Vec<&str> = m
        .tags
        .keys()
        .filter(|t| t.starts_with("source:"))
        .map(String::as_str)
        .collect();
    if s.is_empty() { Value::Null } else { json!(s.join(", ")) }
}

/// The head whose table holds `m` (its `head:` tag; 0 without one).
fn head_of(m: &Memory) -> usize {
    m.tags
        .keys()
        .find_map(|t| t.strip_prefix("head:")?.parse().ok())
        .unwrap_or(0)
}

/// A memory as a browse row.
fn row(m: &Memory) -> Value {
    json!({
        "id": m.id,
        "head": head_of(m),
        "tags": m.tags,
        "source": provenance(m),
        "access_count": m.access_count,
        "last_access": m.last_access,
    })
}

/// `metrics.csv`'s columns by name (empty cells as `None`); a missing file
/// reads as no rows.
struct Metrics {
    header: Vec<String>,
    rows: Vec<Vec<Option<f64>>>,
}

impl Metrics {
    fn column(&self, name: &str) -> Vec<Option<f64>> {
        match self.header.iter().position(|h| h == name) {
            Some(i) => self.rows.iter().map(|r| r.get(i).copied().flatten()).collect(),
            None => Vec::new(),
        }
    }
}

fn read_metrics(path: &Path) -> Result<Metrics> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(InspectError::Io {
                path: path.to_path_buf(),
                source: e,
            });
        }
    };
    let mut lines = text.lines();
    let header = lines.next().unwrap_or("").split(',').map(str::to_owned).collect();
    let rows = lines
        .filter(|l| !l.is_empty())
        .map(|l| l.split(',').map(|c| c.parse().ok()).collect())
        .collect();
    Ok(Metrics { header, rows })
}
