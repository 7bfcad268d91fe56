//! `memstore`: inspect and maintain any store a URL names, from a shell.
//!
//! Every subcommand opens the store through the facade's [`memstore::open`]
//! (`sqlite:PATH`, `duckdb:PATH`, `ipc:ENDPOINT[#NAME]`, `postgres://…[#NAME]`),
//! does one thing and closes it. Reading commands open an existing store
//! only: a missing file is an error, never created. Output is a table for
//! people, or JSON with `--json` for scripts; errors go to stderr with a
//! non-zero exit status. `export` and `import` move a store between
//! backends (or into a file) and back exactly; `check` verifies a store's
//! rows against themselves and against the index data derived from them.

mod check;
mod dump;
mod error;
mod show;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use memstore::{AnyStore, DurableStore, MemoryId, MemoryStore, StoreUrl, TagFilter, Vectors};
use serde_json::json;

use crate::error::CliError;
use crate::show::Table;

/// `memstore`: look inside a memory store, and maintain it.
#[derive(Parser, Debug)]
#[command(
    name = "memstore",
    version,
    about = "Inspect and maintain a memstore: any store a URL names \
             (sqlite:PATH, duckdb:PATH, ipc:ENDPOINT[#NAME], postgres://…[#NAME])."
)]
struct Cli {
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// The file formats of `export` and `import`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per line: a header, then one memory per line.
    Jsonl,
    /// A `#` header line, then CSV with a column per field (keys and values
    /// as space-separated numbers, tags as a JSON object).
    Csv,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Rows, dimensions, metric, thresholds, capacity, counters and size on disk.
    Stats {
        /// The store's URL.
        store: String,
    },
    /// Memories by id: bookkeeping, tags, key and value.
    Get {
        /// The store's URL.
        store: String,
        /// Ids of the memories.
        #[arg(required = true)]
        ids: Vec<MemoryId>,
        /// Print every number of the keys and values (tables show the first few).
        #[arg(long)]
        full: bool,
    },
    /// The nearest memories of query keys, or of a stored memory's key.
    Search {
        /// The store's URL.
        store: String,
        /// A file of query keys: one per line, numbers separated by commas or
        /// spaces (`#` starts a comment), or a JSON array of arrays.
        #[arg(long, required_unless_present = "like", conflicts_with = "like")]
        key_file: Option<PathBuf>,
        /// The memory whose key is the query (it is left out of its own answer).
        #[arg(long)]
        like: Option<MemoryId>,
        /// Neighbours per query.
        #[arg(short, default_value_t = 10)]
        k: usize,
        /// Only memories carrying this tag (repeat for any of several).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// With several `--tag`s: only memories carrying all of them.
        #[arg(long, requires = "tags")]
        all_tags: bool,
    },
    /// Every tag with the sum of its counts over the memories.
    Tags {
        /// The store's URL.
        store: String,
    },
    /// Evicts the lowest-priority memories (LRFU) down to a number of rows.
    Evict {
        /// The store's URL.
        store: String,
        /// Rows to keep at most.
        #[arg(long)]
        to: usize,
    },
    /// Deletes memories by id (all of them, or none if one is unknown).
    Delete {
        /// The store's URL.
        store: String,
        /// Ids of the memories.
        #[arg(required = true)]
        ids: Vec<MemoryId>,
    },
    /// Writes every memory, with the configuration, to a file (or stdout).
    Export {
        /// The store's URL.
        store: String,
        /// The file format.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: Format,
        /// The file to write (must not exist); stdout when absent.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Creates a store from an export: the same memories, ids and bookkeeping.
    Import {
        /// The URL of the store to create (a new file, or a daemon's empty store).
        store: String,
        /// The export to read; stdin when absent. Its format is recognised.
        #[arg(long, short)]
        input: Option<PathBuf>,
    },
    /// Writes a consistent copy of the store, which opens as a store of its own.
    Backup {
        /// The store's URL.
        store: String,
        /// Where the copy goes (must not exist; for a daemon's store, a path
        /// on the daemon's machine).
        dest: PathBuf,
    },
    /// Verifies the store: its rows, its counters, and the index data derived from them.
    Check {
        /// The store's URL.
        store: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut said = e.to_string();
            eprintln!("error: {said}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                // Storage errors repeat their cause in their own message.
                let text = s.to_string();
                if !said.contains(&text) {
                    eprintln!("  caused by: {text}");
                }
                said = text;
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let json = cli.json;
    match cli.command {
        Command::Stats { store } => with_store(&store, |s, url| Box::pin(stats(s, url, json))).await,
        Command::Get { store, ids, full } => with_store(&store, |s, _| Box::pin(get(s, ids, full, json))).await,
        Command::Search {
            store,
            key_file,
            like,
            k,
            tags,
            all_tags,
        } => {
            let filter = match (tags.is_empty(), all_tags) {
                (true, _) => None,
                (false, false) => Some(TagFilter::Any(tags)),
                (false, true) => Some(TagFilter::All(tags)),
            };
            let queries = match &key_file {
                Some(path) => Some(dump::read_keys(path)?),
                None => None,
            };
            with_store(&store, |s, _| Box::pin(search(s, queries, like, k, filter, json))).await
        }
        Command::Tags { store } => with_store(&store, |s, _| Box::pin(tags(s, json))).await,
        Command::Evict { store, to } => {
            with_store(&store, |s, _| {
                Box::pin(async move {
                    let evicted = s.evict(to).await?;
                    let len = s.len().await?;
                    report(json, json!({"evicted": evicted, "rows": len}), || {
                        println!("evicted {evicted} memories; {len} remain")
                    });
                    Ok(())
                })
            })
            .await
        }
        Command::Delete { store, ids } => {
            with_store(&store, |s, _| {
                Box::pin(async move {
                    // Unknown ids are an error before anything is deleted.
                    s.get(&ids).await?;
                    let deleted = s.delete(&ids).await?;
                    report(json, json!({"deleted": deleted}), || {
                        println!("deleted {deleted} memories")
                    });
                    Ok(())
                })
            })
            .await
        }
        Command::Export { store, format, out } => {
            if let Some(path) = &out
                && path.exists()
            {
                return Err(CliError::Exists(path.clone()));
            }
            with_store(&store, |s, _| Box::pin(dump::export(s, format, out))).await
        }
        Command::Import { store, input } => {
            let url: StoreUrl = store.parse()?;
            let export = dump::read_export(input.as_deref())?;
            let rows = export.memories.len();
            dump::import(&url, &export).await?;
            report(json, json!({"imported": rows, "store": url.to_string()}), || {
                println!("imported {rows} memories into {url}")
            });
            Ok(())
        }
        Command::Backup { store, dest } => {
            if dest.exists() {
                return Err(CliError::Exists(dest));
            }
            with_store(&store, |s, _| {
                Box::pin(async move {
                    s.backup_to(&dest).await?;
                    report(json, json!({"backup": dest}), || {
                        println!("backed up to {}", dest.display())
                    });
                    Ok(())
                })
            })
            .await
        }
        Command::Check { store } => {
            let url: StoreUrl = store.parse()?;
            let s = url.open(None).await?;
            let found = check::check(&s, &url).await;
            let closed = s.close().await;
            let problems = found?;
            closed?;
            report(json, json!({"problems": problems}), || {
                if problems.is_empty() {
                    println!("{url}: no problems found");
                }
                for p in &problems {
                    println!("problem: {p}");
                }
            });
            if problems.is_empty() {
                Ok(())
            } else {
                Err(CliError::Check(problems.len()))
            }
        }
    }
}

type Pinned<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), CliError>> + 'a>>;

/// Opens the existing store `url` names, runs `f` on it and closes it; the
/// first error wins, and the store is closed either way.
async fn with_store<F>(url: &str, f: F) -> Result<(), CliError>
where
    F: for<'a> FnOnce(&'a AnyStore, &'a StoreUrl) -> Pinned<'a>,
{
    let url: StoreUrl = url.parse()?;
    let store = url.open(None).await?;
    let done = f(&store, &url).await;
    let closed = store.close().await;
    done?;
    closed?;
    Ok(())
}

/// Prints `value` as JSON, or calls `human` to print the table.
fn report(json: bool, value: serde_json::Value, human: impl FnOnce()) {
    if json {
        println!("{value}");
    } else {
        human();
    }
}

/// Bytes a file store takes: the database and the files beside it (logs,
/// derived index files).
fn size_on_disk(file: &Path) -> u64 {
    let mut total = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    for suffix in ["-wal", "-shm", ".wal", ".hnsw"] {
        let mut p = file.as_os_str().to_owned();
        p.push(suffix);
        total += std::fs::metadata(PathBuf::from(p)).map(|m| m.len()).unwrap_or(0);
    }
    total
}

async fn stats(s: &AnyStore, url: &StoreUrl, json: bool) -> Result<(), CliError> {
    let st = s.stats().await?;
    let c = s.config();
    let size = url.file().map(size_on_disk);
    let value = json!({
        "store": url.to_string(),
        "backend": s.kind(),
        "rows": st.len,
        "next_id": st.next_id,
        "key_dim": c.key_dim,
        "value_dim": c.value_dim,
        "metric": c.metric.as_str(),
        "capacity": c.capacity,
        "lrfu_lambda": c.eviction.lambda(),
        "novelty": c.novelty,
        "recombine": c.recombine,
        "accesses": st.access_count_total,
        "tags": st.tag_counts.len(),
        "inserted": st.counters.inserted,
        "merged": st.counters.merged,
        "evicted": st.counters.evicted,
        "deleted": st.counters.deleted,
        "last_batch": st.counters.last_batch,
        "size_on_disk": size,
    });
    report(json, value, || {
        let mut t = Table::new(&["", ""]);
        t.row(["store".to_string(), format!("{url} ({})", s.kind())]);
        t.row(["rows".into(), st.len.to_string()]);
        t.row(["next id".into(), st.next_id.to_string()]);
        t.row(["key / value dims".into(), format!("{} / {}", c.key_dim, c.value_dim)]);
        t.row(["metric".into(), c.metric.as_str().into()]);
        t.row(["capacity".into(), c.capacity.map_or("none".into(), |n| n.to_string())]);
        t.row(["eviction".into(), format!("LRFU, lambda {}", c.eviction.lambda())]);
        t.row([
            "thresholds".into(),
            format!("recombine below {}, insert beyond {}", c.recombine, c.novelty),
        ]);
        t.row(["accesses".into(), st.access_count_total.to_string()]);
        t.row(["tags".into(), st.tag_counts.len().to_string()]);
        t.row([
            "lifetime".into(),
            format!(
                "{} inserted, {} merged, {} evicted, {} deleted; last change batch {}",
                st.counters.inserted,
                st.counters.merged,
                st.counters.evicted,
                st.counters.deleted,
                st.counters.last_batch
            ),
        ]);
        t.row([
            "size on disk".into(),
            size.map_or("(not a file store)".into(), show::bytes),
        ]);
        t.print_headless();
    });
    Ok(())
}

async fn get(s: &AnyStore, ids: Vec<MemoryId>, full: bool, json: bool) -> Result<(), CliError> {
    let memories = s.get(&ids).await?;
    if json {
        for m in &memories {
            println!("{}", dump::Record::from(m).to_json()?);
        }
        return Ok(());
    }
    let mut t = Table::new(&[
        "id",
        "created",
        "last access",
        "accesses",
        "crf",
        "tags",
        "key",
        "value",
    ]);
    for m in &memories {
        t.row([
            m.id.to_string(),
            m.created.to_string(),
            m.last_access.to_string(),
            m.access_count.to_string(),
            format!("{:.4}", m.crf),
            show::tags(&m.tags),
            show::vector(&m.key, full),
            show::vector(&m.value, full),
        ]);
    }
    t.print();
    Ok(())
}

async fn search(
    s: &AnyStore,
    queries: Option<Vec<Vec<f32>>>,
    like: Option<MemoryId>,
    k: usize,
    filter: Option<TagFilter>,
    json: bool,
) -> Result<(), CliError> {
    let dim = s.config().key_dim;
    // With `--like`, one more neighbour is asked for: the memory itself is
    // dropped from its own answer.
    let (rows, ask) = match (queries, like) {
        (Some(q), _) => (q, k),
        (None, Some(id)) => {
            let m = s.get(&[id]).await?;
            (m.into_iter().map(|m| m.key).collect(), k + 1)
        }
        (None, None) => return Err(CliError::Usage("give --key-file or --like".into())),
    };
    if let Some(bad) = rows.iter().position(|r| r.len() != dim) {
        return Err(CliError::Usage(format!(
            "query {} has {} numbers; the store's keys have {dim}",
            bad + 1,
            rows[bad].len()
        )));
    }
    let flat: Vec<f32> = rows.concat();
    let found = s.search(Vectors::new(&flat, dim)?, ask, filter.as_ref()).await?;
    let mut hits: Vec<(usize, MemoryId, f32)> = Vec::new();
    for q in 0..found.n {
        let mut rank = 0;
        for j in 0..found.k {
            let Some(id) = found.id(q, j) else { continue };
            if Some(id) == like || rank == k {
                continue;
            }
            rank += 1;
            hits.push((q, id, found.distance(q, j)));
        }
    }
    let ids: Vec<MemoryId> = hits.iter().map(|h| h.1).collect();
    let memories = s.get(&ids).await?;
    if json {
        for ((q, id, d), m) in hits.iter().zip(&memories) {
            println!(
                "{}",
                json!({"query": q, "id": id, "distance": d, "tags": m.tags, "access_count": m.access_count})
            );
        }
        return Ok(());
    }
    let mut t = Table::new(&["query", "id", "distance", "accesses", "tags"]);
    for ((q, id, d), m) in hits.iter().zip(&memories) {
        t.row([
            (q + 1).to_string(),
            id.to_string(),
            format!("{d:.6}"),
            m.access_count.to_string(),
            show::tags(&m.tags),
        ]);
    }
    t.print();
    Ok(())
}

async fn tags(s: &AnyStore, json: bool) -> Result<(), CliError> {
    let st = s.stats().await?;
    report(json, json!(st.tag_counts), || {
        let mut t = Table::new(&["tag", "count"]);
        for (tag, n) in &st.tag_counts {
            t.row([tag.clone(), n.to_string()]);
        }
        t.print();
    });
    Ok(())
}
