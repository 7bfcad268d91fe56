//! `export` and `import`: a store as a text file, and back, exactly.
//!
//! Both formats start with a header holding the configuration and the next
//! id; then one record per memory, ascending by id, with its bookkeeping
//! (created, last access, access count, CRF), tags with their counts, key
//! and value. Numbers are written in the shortest form that reads back to
//! the same bits (Rust's float formatting) and read back with Rust's
//! correctly rounded parser, so `export`, `import`, `export` writes the same
//! file again.
//!
//! - JSONL: the header object on the first line (`"memstore_export": 1`),
//!   then one object per memory.
//! - CSV: `# memstore_export <header JSON>` on the first line, then a CSV
//!   table with columns `id,created,last_access,access_count,crf,tags,key,value`
//!   (tags as a JSON object, keys and values as space-separated numbers).
//!
//! `import` creates the store and writes the memories with change batches
//! ([`ChangeBatch`]), which keep ids and bookkeeping as given. Ids that the
//! exported store had deleted are filled by placeholder rows, inserted with
//! the lowest eviction priority and deleted again, so the new store's ids
//! and next id are the export's; its lifetime counters are its own (the
//! placeholders count as deleted or evicted).

use std::collections::BTreeMap;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use memstore::{
    AnyStore, ChangeBatch, DurableStore, EvictionPolicy, InsertMeta, Memory, MemoryConfig, MemoryId, MemoryStore,
    Metric, StoreUrl, Tick,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::Format;
use crate::error::CliError;

/// The export format's version, written in every header.
const VERSION: u32 = 1;
/// Memories read from the store per `get`, and written per change batch.
const CHUNK: usize = 4096;

/// The first line of an export: what the store was.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The format's version.
    pub memstore_export: u32,
    /// Key dimension.
    pub key_dim: usize,
    /// Value dimension.
    pub value_dim: usize,
    /// Metric name (`l2`, `cosine`, `ip`).
    pub metric: String,
    /// Capacity, if any.
    pub capacity: Option<usize>,
    /// LRFU decay rate.
    pub lrfu_lambda: f64,
    /// `learn`'s novelty threshold.
    pub novelty: f32,
    /// `learn`'s recombination threshold.
    pub recombine: f32,
    /// The id the store's next memory would get.
    pub next_id: MemoryId,
    /// Number of memories that follow.
    pub rows: u64,
}

impl Header {
    fn of(config: &MemoryConfig, next_id: MemoryId, rows: u64) -> Self {
        Header {
            memstore_export: VERSION,
            key_dim: config.key_dim,
            value_dim: config.value_dim,
            metric: config.metric.as_str().into(),
            capacity: config.capacity,
            lrfu_lambda: config.eviction.lambda(),
            novelty: config.novelty,
            recombine: config.recombine,
            next_id,
            rows,
        }
    }

    /// The store configuration the header describes, validated.
    pub fn config(&self) -> Result<MemoryConfig, CliError> {
        let metric = Metric::parse(&self.metric)
            .ok_or_else(|| CliError::Usage(format!("the export's metric {:?} is not l2, cosine or ip", self.metric)))?;
        let config = MemoryConfig {
            key_dim: self.key_dim,
            value_dim: self.value_dim,
            metric,
            capacity: self.capacity,
            eviction: EvictionPolicy::Lrfu {
                lambda: self.lrfu_lambda,
            },
            novelty: self.novelty,
            recombine: self.recombine,
        };
        config.validate()?;
        Ok(config)
    }
}

/// One memory as exported.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Record {
    /// Id.
    pub id: MemoryId,
    /// Creation tick.
    pub created: Tick,
    /// Tick of the last access.
    pub last_access: Tick,
    /// Accesses, the insertion included.
    pub access_count: u64,
    /// LRFU CRF at the last access.
    pub crf: f64,
    /// Tags with their counts.
    pub tags: BTreeMap<String, u64>,
    /// Key.
    pub key: Vec<f32>,
    /// Value.
    pub value: Vec<f32>,
}

impl From<&Memory> for Record {
    fn from(m: &Memory) -> Self {
        Record {
            id: m.id,
            created: m.created,
            last_access: m.last_access,
            access_count: m.access_count,
            crf: m.crf,
            tags: m.tags.clone(),
            key: m.key.clone(),
            value: m.value.clone(),
        }
    }
}

impl Record {
    /// The record as one line of JSON.
    pub fn to_json(&self) -> Result<String, CliError> {
        serde_json::to_string(self).map_err(|e| CliError::Usage(format!("encoding memory {}: {e}", self.id)))
    }
}

/// A JSONL record as read: the floats kept as text, parsed exactly below.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecord<'a> {
    id: MemoryId,
    created: Tick,
    last_access: Tick,
    access_count: u64,
    #[serde(borrow)]
    crf: &'a RawValue,
    tags: BTreeMap<String, u64>,
    #[serde(borrow)]
    key: &'a RawValue,
    #[serde(borrow)]
    value: &'a RawValue,
}

/// An export read back: the header and the memories.
#[derive(Debug)]
pub struct Export {
    /// The header.
    pub header: Header,
    /// The memories, ascending by id.
    pub memories: Vec<Record>,
    /// The line of the file each memory was read from.
    pub lines: Vec<usize>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes every memory of `store` in `format` to `out` (a new file) or stdout.
pub async fn export(store: &AnyStore, format: Format, out: Option<PathBuf>) -> Result<(), CliError> {
    let stdout = PathBuf::from("(stdout)");
    let (sink, path): (Box<dyn Write>, PathBuf) = match &out {
        Some(p) => (Box::new(std::fs::File::create_new(p).map_err(io(p))?), p.clone()),
        None => (Box::new(std::io::stdout().lock()), stdout),
    };
    let written = write_all(store, format, BufWriter::new(sink), &path).await;
    if written.is_err()
        && let Some(p) = &out
    {
        // A partial export is no export.
        let _ = std::fs::remove_file(p);
    }
    written
}

async fn write_all(store: &AnyStore, format: Format, mut w: impl Write, path: &Path) -> Result<(), CliError> {
    let stats = store.stats().await?;
    let ids = store.ids().await?;
    let header = Header::of(store.config(), stats.next_id, ids.len() as u64);
    let header = serde_json::to_string(&header).map_err(|e| CliError::Usage(format!("encoding the header: {e}")))?;
    match format {
        Format::Jsonl => writeln!(w, "{header}").map_err(io(path))?,
        Format::Csv => {
            writeln!(w, "# memstore_export {header}").map_err(io(path))?;
            writeln!(w, "id,created,last_access,access_count,crf,tags,key,value").map_err(io(path))?;
        }
    }
    for chunk in ids.chunks(CHUNK) {
        let memories = store.get(chunk).await?;
        match format {
            Format::Jsonl => {
                for m in &memories {
                    writeln!(w, "{}", Record::from(m).to_json()?).map_err(io(path))?;
                }
            }
            Format::Csv => {
                let mut csv = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
                for m in &memories {
                    let tags = serde_json::to_string(&m.tags)
                        .map_err(|e| CliError::Usage(format!("encoding memory {}: {e}", m.id)))?;
                    csv.write_record([
                        m.id.to_string(),
                        m.created.to_string(),
                        m.last_access.to_string(),
                        m.access_count.to_string(),
                        m.crf.to_string(),
                        tags,
                        numbers(&m.key),
                        numbers(&m.value),
                    ])
                    .map_err(|e| csv_io(path, e))?;
                }
                let rows = csv.into_inner().map_err(|e| csv_io(path, e.into_error().into()))?;
                w.write_all(&rows).map_err(io(path))?;
            }
        }
    }
    w.flush().map_err(io(path))?;
    Ok(())
}

fn csv_io(path: &Path, e: csv::Error) -> CliError {
    CliError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    }
}

fn numbers(v: &[f32]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(" ")
}

/// Reads an export from `input` (stdin when `None`), recognising its format,
/// and checks it whole: nothing is written from a file with a bad line.
pub fn read_export(input: Option<&Path>) -> Result<Export, CliError> {
    let (what, text) = match input {
        Some(p) => {
            let bytes = std::fs::read(p).map_err(io(p))?;
            (p.display().to_string(), utf8(bytes, &p.display().to_string())?)
        }
        None => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .lock()
                .read_to_end(&mut bytes)
                .map_err(io(Path::new("(stdin)")))?;
            ("(stdin)".to_string(), utf8(bytes, "(stdin)")?)
        }
    };
    let bad = |line: usize, why: String| CliError::Parse {
        what: what.clone(),
        line,
        why,
    };
    let first = text.lines().next().unwrap_or("");
    let (header, (memories, lines)) = if let Some(rest) = first.strip_prefix("# memstore_export ") {
        let header: Header = serde_json::from_str(rest).map_err(|e| bad(1, format!("header: {e}")))?;
        (header, read_csv(&text, &bad)?)
    } else if first.starts_with('{') {
        let header: Header = serde_json::from_str(first).map_err(|e| bad(1, format!("header: {e}")))?;
        (header, read_jsonl(&text, &bad)?)
    } else {
        return Err(bad(
            1,
            "not a memstore export (a JSONL export starts with '{', a CSV export with '# memstore_export')".into(),
        ));
    };
    if header.memstore_export != VERSION {
        return Err(bad(
            1,
            format!(
                "export format version {} (this tool reads version {VERSION})",
                header.memstore_export
            ),
        ));
    }
    let export = Export {
        header,
        memories,
        lines,
    };
    validate(&export).map_err(|(line, why)| bad(line, why))?;
    Ok(export)
}

fn utf8(bytes: Vec<u8>, what: &str) -> Result<String, CliError> {
    String::from_utf8(bytes).map_err(|e| CliError::Parse {
        what: what.into(),
        line: 1,
        why: format!("not UTF-8 text: {e}"),
    })
}

/// Parses a list of floats, exactly: `[a, b, …]` (JSON) or `a b …` (CSV).
fn floats(text: &str) -> Result<Vec<f32>, String> {
    let inner = text.trim();
    let inner = inner
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(inner);
    inner
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<f32>().map_err(|e| format!("{t:?} is not a number: {e}")))
        .collect()
}

type Records = (Vec<Record>, Vec<usize>);

fn read_jsonl(text: &str, bad: &dyn Fn(usize, String) -> CliError) -> Result<Records, CliError> {
    let mut out = Vec::new();
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let raw: RawRecord<'_> = serde_json::from_str(line).map_err(|e| bad(n, e.to_string()))?;
        lines.push(n);
        let crf = raw
            .crf
            .get()
            .parse::<f64>()
            .map_err(|e| bad(n, format!("crf {:?}: {e}", raw.crf.get())))?;
        out.push(Record {
            id: raw.id,
            created: raw.created,
            last_access: raw.last_access,
            access_count: raw.access_count,
            crf,
            tags: raw.tags,
            key: floats(raw.key.get()).map_err(|e| bad(n, format!("key: {e}")))?,
            value: floats(raw.value.get()).map_err(|e| bad(n, format!("value: {e}")))?,
        });
    }
    Ok((out, lines))
}

fn read_csv(text: &str, bad: &dyn Fn(usize, String) -> CliError) -> Result<Records, CliError> {
    let body = text.split_once('\n').map_or("", |(_, rest)| rest);
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(body.as_bytes());
    let want = [
        "id",
        "created",
        "last_access",
        "access_count",
        "crf",
        "tags",
        "key",
        "value",
    ];
    let headers = reader.headers().map_err(|e| bad(2, e.to_string()))?;
    if headers.iter().ne(want) {
        return Err(bad(2, format!("the columns must be {}", want.join(","))));
    }
    let mut out = Vec::new();
    let mut lines = Vec::new();
    for row in reader.records() {
        let row = row.map_err(|e| bad(e.position().map_or(0, |p| p.line() as usize + 1), e.to_string()))?;
        let n = row.position().map_or(0, |p| p.line() as usize + 1);
        lines.push(n);
        if row.len() != want.len() {
            return Err(bad(n, format!("{} fields, expected {}", row.len(), want.len())));
        }
        let int = |i: usize| -> Result<u64, CliError> {
            row[i]
                .parse::<u64>()
                .map_err(|e| bad(n, format!("{} {:?}: {e}", want[i], &row[i])))
        };
        out.push(Record {
            id: int(0)?,
            created: int(1)?,
            last_access: int(2)?,
            access_count: int(3)?,
            crf: row[4]
                .parse::<f64>()
                .map_err(|e| bad(n, format!("crf {:?}: {e}", &row[4])))?,
            tags: serde_json::from_str(&row[5]).map_err(|e| bad(n, format!("tags: {e}")))?,
            key: floats(&row[6]).map_err(|e| bad(n, format!("key: {e}")))?,
            value: floats(&row[7]).map_err(|e| bad(n, format!("value: {e}")))?,
        });
    }
    Ok((out, lines))
}

/// Checks what a store would check, before anything is written; the error
/// names the line and what is wrong.
fn validate(ex: &Export) -> Result<(), (usize, String)> {
    let h = &ex.header;
    let config = h.config().map_err(|e| (1, e.to_string()))?;
    if ex.memories.len() as u64 != h.rows {
        return Err((
            1,
            format!(
                "the header promises {} memories, the file holds {}",
                h.rows,
                ex.memories.len()
            ),
        ));
    }
    if let Some(cap) = config.capacity
        && ex.memories.len() > cap
    {
        return Err((1, format!("{} memories exceed the capacity {cap}", ex.memories.len())));
    }
    let mut last = 0;
    for (i, m) in ex.memories.iter().enumerate() {
        let line = ex.lines[i];
        let fail = |why: String| Err((line, format!("memory {}: {why}", m.id)));
        if m.id <= last {
            return fail(format!("ids must ascend from 1 (after {last})"));
        }
        last = m.id;
        if m.id >= h.next_id {
            return fail(format!("the header's next id is {}", h.next_id));
        }
        if m.key.len() != config.key_dim || m.value.len() != config.value_dim {
            return fail(format!(
                "key and value have {} and {} numbers, the store {} and {}",
                m.key.len(),
                m.value.len(),
                config.key_dim,
                config.value_dim
            ));
        }
        if m.key.iter().chain(&m.value).any(|x| !x.is_finite()) {
            return fail("a number is not finite".into());
        }
        if m.access_count == 0 || m.created > m.last_access || !(m.crf.is_finite() && m.crf > 0.0) {
            return fail("impossible bookkeeping (accesses ≥ 1, created ≤ last access, CRF > 0)".into());
        }
        if m.tags.iter().any(|(t, &n)| t.is_empty() || n == 0) {
            return fail("an empty tag name or a tag counted 0 times".into());
        }
    }
    Ok(())
}

/// Creates the store `url` names (a file that does not exist yet, or a
/// daemon's empty store) and writes the export into it. On failure a file
/// store that was created is removed again.
pub async fn import(url: &StoreUrl, ex: &Export) -> Result<(), CliError> {
    let config = ex.header.config()?;
    if let Some(file) = url.file()
        && file.exists()
    {
        return Err(CliError::Exists(file.to_path_buf()));
    }
    let store = url.open(Some(config)).await?;
    let filled = fill(&store, url, ex).await;
    let closed = store.close().await;
    if (filled.is_err() || closed.is_err())
        && let Some(file) = url.file()
    {
        let _ = std::fs::remove_file(file);
        memstore_engine::driver::remove_side_files(file);
    }
    filled?;
    closed?;
    Ok(())
}

async fn fill(store: &AnyStore, url: &StoreUrl, ex: &Export) -> Result<(), CliError> {
    let stats = store.stats().await?;
    if stats.len != 0 || stats.next_id != 1 || stats.counters.last_batch != 0 {
        return Err(CliError::NotEmpty(url.to_string()));
    }
    let config = store.config().clone();
    let tick = ex.memories.iter().map(|m| m.last_access).max().unwrap_or(0);
    let tagged = ex.memories.iter().any(|m| !m.tags.is_empty());
    // Placeholders for deleted ids: a valid key, and the lowest eviction
    // priority, so that a capacity evicts them before any memory.
    let filler_key = ex.memories.first().map_or_else(
        || {
            let mut k = vec![0.0; config.key_dim];
            k[0] = 1.0;
            k
        },
        |m| m.key.clone(),
    );
    let filler_value = vec![0.0f32; config.value_dim];
    let filler_meta = InsertMeta {
        created: 0,
        last_access: 0,
        access_count: 1,
        crf: f64::MIN_POSITIVE,
    };
    let mut seq = 0u64;
    let mut next: MemoryId = 1;
    let mut fillers: Vec<MemoryId> = Vec::new();
    let mut batch = ChangeBatch {
        first_id: 1,
        ..Default::default()
    };
    let push = |batch: &mut ChangeBatch, key: &[f32], value: &[f32], meta: InsertMeta, tags: Vec<String>| {
        batch.insert_keys.extend_from_slice(key);
        batch.insert_values.extend_from_slice(value);
        batch.insert_meta.push(meta);
        if tagged {
            batch.insert_tags.push(tags);
        }
    };
    let mut memories = ex.memories.iter().peekable();
    while next < ex.header.next_id {
        match memories.peek() {
            Some(m) if m.id == next => {
                let meta = InsertMeta {
                    created: m.created,
                    last_access: m.last_access,
                    access_count: m.access_count,
                    crf: m.crf,
                };
                push(&mut batch, &m.key, &m.value, meta, m.tags.keys().cloned().collect());
                memories.next();
            }
            _ => {
                push(&mut batch, &filler_key, &filler_value, filler_meta, Vec::new());
                fillers.push(next);
            }
        }
        next += 1;
        if batch.insert_meta.len() == CHUNK {
            seq += 1;
            let full = std::mem::replace(
                &mut batch,
                ChangeBatch {
                    first_id: next,
                    ..Default::default()
                },
            );
            store.apply(&ChangeBatch { seq, tick, ..full }).await?;
        }
    }
    if !batch.insert_meta.is_empty() {
        seq += 1;
        store.apply(&ChangeBatch { seq, tick, ..batch }).await?;
    }
    // Second pass: the placeholders that a capacity did not evict go, and
    // tags counted more than once (merges) get their counts.
    let present: std::collections::BTreeSet<MemoryId> = store.ids().await?.into_iter().collect();
    let last = ChangeBatch {
        seq: seq + 1,
        tick,
        delete: fillers.into_iter().filter(|id| present.contains(id)).collect(),
        tag_counts: ex
            .memories
            .iter()
            .flat_map(|m| {
                m.tags
                    .iter()
                    .filter(|&(_, &n)| n != 1)
                    .map(|(t, &n)| (m.id, t.clone(), n))
            })
            .collect(),
        ..Default::default()
    };
    if !last.delete.is_empty() || !last.tag_counts.is_empty() {
        store.apply(&last).await?;
    }
    let len = store.len().await?;
    if len != ex.memories.len() {
        return Err(CliError::Usage(format!(
            "the store holds {len} memories after the import, the export {}",
            ex.memories.len()
        )));
    }
    Ok(())
}

/// Reads query keys: a JSON array of arrays, or one key per line (numbers
/// separated by commas or whitespace; `#` starts a comment).
pub fn read_keys(path: &Path) -> Result<Vec<Vec<f32>>, CliError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let what = path.display().to_string();
    let text = utf8(bytes, &what)?;
    let bad = |line: usize, why: String| CliError::Parse {
        what: what.clone(),
        line,
        why,
    };
    if text.trim_start().starts_with('[') {
        return serde_json::from_str(&text).map_err(|e| bad(e.line(), e.to_string()));
    }
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("");
        if line.trim().is_empty() {
            continue;
        }
        keys.push(floats(line).map_err(|e| bad(i + 1, e))?);
    }
    if keys.is_empty() {
        return Err(bad(1, "no query keys in the file".into()));
    }
    Ok(keys)
}
