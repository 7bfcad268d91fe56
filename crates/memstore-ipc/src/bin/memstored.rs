//! `memstored`: serves a memstore (a SQLite file, or a DuckDB file when built
//! with the `duckdb` feature), and optionally a directory of named stores, to
//! many processes on a Unix domain socket and, optionally, on loopback TCP
//! with a shared token.
//!
//! ```text
//! memstored --db /var/lib/dmt/memory.db --socket /run/user/1000/memstored.sock
//! memstored --db mem.db --key-dim 64 --value-dim 64 --capacity 1000000 --tcp 127.0.0.1:7878 --token-file token
//! memstored --db mem.db --tcp 0.0.0.0:7878 --allow-remote --tls-cert cert.pem --tls-key key.pem --token-file token
//! memstored --stores /var/lib/dmt/layers --socket /run/user/1000/dmt.sock   # block0.db, block1.db, ...
//! ```
//!
//! SIGTERM or SIGINT: stop accepting, finish the requests in flight, flush,
//! exit 0.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use std::sync::Arc;

use memstore_api::{EvictionPolicy, MemoryConfig, Metric};
use memstore_engine::ann::AnnBuilder;
use memstore_index::{Hnsw, HnswOptions};
use memstore_ipc::server;
use memstore_ipc::{Server, ServerOptions, SqliteOpener, StoreOpener, TOKEN_ENV};
use memstore_sqlite::{IndexOptions, SqliteOptions, SqliteSynchronous};
use tracing::{error, info};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MetricArg {
    L2,
    Cosine,
    Ip,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendArg {
    /// A SQLite file (memstore-sqlite).
    Sqlite,
    /// A DuckDB file (memstore-duckdb; needs a memstored built with --features duckdb).
    Duckdb,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum IndexArg {
    /// Exact search by blocked matrix products (the default; up to ~1M keys).
    Exact,
    /// An HNSW graph (usearch), approximate, saved beside each store file as
    /// <file>.hnsw at shutdown and rebuilt from the rows when stale.
    Hnsw,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SyncArg {
    /// Every commit durable against power loss.
    Full,
    /// Durable against process crashes (WAL); faster.
    Normal,
}

/// Serve a memstore (and optionally a directory of named stores) to many processes.
#[derive(Parser, Debug)]
#[command(name = "memstored", version, about, long_about = None)]
struct Args {
    /// The store file (created at the first configured connection or
    /// with --key-dim/--value-dim if absent).
    #[arg(long, required_unless_present = "stores")]
    db: Option<PathBuf>,
    /// Also serve named stores from this directory (created if absent): a
    /// client naming store NAME gets DIR/NAME.db (DuckDB: DIR/NAME.duckdb),
    /// created at its first configured connection.
    #[arg(long)]
    stores: Option<PathBuf>,
    /// The database engine of the store file.
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: BackendArg,
    /// The Unix socket to listen on [default: <db>.sock, else <stores>/memstored.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Permission bits of the Unix socket, octal.
    #[arg(long, default_value = "600")]
    socket_mode: String,
    /// Also listen on TCP at this address (loopback unless --allow-remote,
    /// which needs TLS); TCP clients must present the shared token.
    #[arg(long)]
    tcp: Option<String>,
    /// Allow a non-loopback --tcp address (only with --tls-cert and
    /// --tls-key: the token would otherwise travel in cleartext).
    #[arg(long)]
    allow_remote: bool,
    /// PEM certificate chain (leaf first): --tcp then speaks TLS
    /// (clients connect to tls:HOST:PORT).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// File holding the shared token (else $MEMSTORED_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// File holding a second token for read-only TCP sessions (search, get,
    /// counts and statistics; every other request is refused).
    #[arg(long)]
    read_token_file: Option<PathBuf>,
    /// Largest frame accepted, in bytes.
    #[arg(long, default_value_t = memstore_ipc::protocol::DEFAULT_MAX_FRAME)]
    max_frame: usize,
    /// Requests one connection may have running at once.
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
    /// Directory that backups are written to and restored from (nowhere
    /// else); without it, backup and restore requests are refused.
    #[arg(long)]
    backup_dir: Option<PathBuf>,
    /// Seconds a TCP address is refused after 5 wrong tokens in a row.
    #[arg(long, default_value_t = ServerOptions::default().auth_lockout.as_secs())]
    auth_lockout: u64,
    /// Named stores open at once (--stores); beyond it the least recently used
    /// idle store is closed, or the connection refused when all are in use.
    #[arg(long, default_value_t = ServerOptions::default().max_open_stores)]
    max_open_stores: usize,
    /// A user id, besides the daemon's own, whose processes may connect
    /// through the Unix socket (repeat for several).
    #[arg(long = "allow-uid")]
    allow_uid: Vec<u32>,
    /// Connections served at once (authenticated or not); more are refused.
    #[arg(long, default_value_t = ServerOptions::default().max_connections)]
    max_connections: usize,
    /// Bytes of replies one connection may have computed and not yet
    /// written (a slow reader's requests wait beyond it).
    #[arg(long, default_value_t = ServerOptions::default().reply_budget)]
    reply_budget: usize,
    /// Seconds one reply may take to be written; a client that reads none for
    /// that long is disconnected.
    #[arg(long, default_value_t = ServerOptions::default().write_timeout.as_secs())]
    write_timeout: u64,
    /// Seconds a frame may take to arrive once its first bytes have; a
    /// client that stops halfway is disconnected.
    #[arg(long, default_value_t = ServerOptions::default().frame_timeout.as_secs())]
    frame_timeout: u64,
    /// Close sessions that send no request for this many seconds while none
    /// of theirs runs (default: never).
    #[arg(long)]
    idle_timeout: Option<u64>,
    /// Cancel a read (search, get, ids, len, stats) that runs longer than
    /// this many seconds, with a timeout error (default: no limit; writes
    /// always run to completion).
    #[arg(long)]
    request_timeout: Option<u64>,
    /// The stores' search index.
    #[arg(long, value_enum, default_value = "exact")]
    index: IndexArg,
    /// HNSW edges per node (M).
    #[arg(long, default_value_t = HnswOptions::default().connectivity)]
    hnsw_connectivity: usize,
    /// HNSW candidate list size while inserting (efConstruction).
    #[arg(long, default_value_t = HnswOptions::default().expansion_add)]
    hnsw_expansion_add: usize,
    /// HNSW candidate list size while searching (ef): the recall/speed knob
    /// (where the calibration below starts; it goes up or down from there).
    #[arg(long, default_value_t = HnswOptions::default().expansion_search)]
    hnsw_expansion_search: usize,
    /// Recall@8 that HNSW's ef is calibrated to on the data as it grows
    /// (held-out keys of insert batches); 0 keeps ef fixed.
    #[arg(long, default_value_t = HnswOptions::default().target_recall.unwrap_or(0.0))]
    hnsw_target_recall: f32,
    /// SQLite durability (DuckDB commits are always synced).
    #[arg(long, value_enum, default_value = "full")]
    synchronous: SyncArg,
    /// Read neighbours' values from the database instead of keeping every
    /// value in memory beside its key (less memory, slower searches).
    #[arg(long)]
    values_on_disk: bool,
    /// Key dimension: open (or create) the --db store at start-up with this configuration.
    #[arg(long, requires_all = ["value_dim", "db"])]
    key_dim: Option<usize>,
    /// Value dimension.
    #[arg(long, requires = "key_dim")]
    value_dim: Option<usize>,
    /// Distance between keys.
    #[arg(long, value_enum, default_value = "l2", requires = "key_dim")]
    metric: MetricArg,
    /// Capacity (LRFU eviction beyond it).
    #[arg(long, requires = "key_dim")]
    capacity: Option<usize>,
    /// LRFU λ.
    #[arg(long, default_value_t = 0.5, requires = "key_dim")]
    lambda: f64,
    /// `learn` inserts only when every neighbour is farther than this.
    #[arg(long, default_value_t = 0.0, requires = "key_dim")]
    novelty: f32,
    /// `learn` merges with neighbours closer than this.
    #[arg(long, default_value_t = 0.0, requires = "key_dim")]
    recombine: f32,
    /// Log filter (tracing's env-filter syntax; $RUST_LOG wins).
    #[arg(long, default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Everything the daemon creates (store files, their WAL and lock files,
    // backups, the stores directory) is private to its user, like its socket.
    // SAFETY: umask only sets the process's file-creation mask, before any
    // other thread exists.
    unsafe { libc::umask(0o077) };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // A token file's contents, trimmed; an empty token is none.
    let read = |f: &std::path::Path, what: &str| -> Result<String, String> {
        std::fs::read_to_string(f)
            .map(|t| t.trim().to_string())
            .map_err(|e| format!("{what} {}: {e}", f.display()))
    };
    let token = match &args.token_file {
        Some(f) => Some(read(f, "token file")?),
        None => std::env::var(TOKEN_ENV).ok().map(|t| t.trim().to_string()),
    }
    .filter(|t| !t.is_empty());
    let read_token = match &args.read_token_file {
        Some(f) => Some(read(f, "read-only token file")?),
        None => None,
    }
    .filter(|t| !t.is_empty());
    let mode =
        u32::from_str_radix(&args.socket_mode, 8).map_err(|e| format!("--socket-mode {}: {e}", args.socket_mode))?;
    let config = match (args.key_dim, args.value_dim) {
        (Some(k), Some(v)) => Some(MemoryConfig {
            key_dim: k,
            value_dim: v,
            metric: match args.metric {
                MetricArg::L2 => Metric::L2,
                MetricArg::Cosine => Metric::Cosine,
                MetricArg::Ip => Metric::InnerProduct,
            },
            capacity: args.capacity,
            eviction: EvictionPolicy::Lrfu { lambda: args.lambda },
            novelty: args.novelty,
            recombine: args.recombine,
        }),
        _ => None,
    };
    if let Some(dir) = &args.stores {
        std::fs::create_dir_all(dir).map_err(|e| format!("--stores {}: {e}", dir.display()))?;
    }
    let options = {
        let mut o = ServerOptions::default();
        o.max_frame = args.max_frame;
        o.token = token.clone();
        o.read_token = read_token;
        o.max_in_flight = args.max_in_flight;
        o.max_connections = args.max_connections;
        o.write_timeout = std::time::Duration::from_secs(args.write_timeout.max(1));
        o.frame_timeout = std::time::Duration::from_secs(args.frame_timeout.max(1));
        o.idle_timeout = args.idle_timeout.map(|s| std::time::Duration::from_secs(s.max(1)));
        o.request_timeout = args.request_timeout.map(|s| std::time::Duration::from_secs(s.max(1)));
        o.reply_budget = args.reply_budget;
        o.stores_dir = args.stores.clone();
        o.backup_dir = args.backup_dir.clone();
        o.allow_uids = args.allow_uid.clone();
        o.max_open_stores = args.max_open_stores;
        o.auth_lockout = std::time::Duration::from_secs(args.auth_lockout);
        o
    };
    // The template of named stores when there is no --db.
    let db = args.db.clone().unwrap_or_default();
    let ann: Option<Arc<dyn AnnBuilder>> = match args.index {
        IndexArg::Exact => None,
        IndexArg::Hnsw => Some(Arc::new(Hnsw::new({
            let mut o = HnswOptions::default();
            o.connectivity = args.hnsw_connectivity;
            o.expansion_add = args.hnsw_expansion_add;
            o.expansion_search = args.hnsw_expansion_search;
            o.target_recall = (args.hnsw_target_recall != 0.0).then_some(args.hnsw_target_recall);
            o
        }))),
    };
    let mut index = IndexOptions::default().with_resident_values(!args.values_on_disk);
    index.ann = ann;
    match args.backend {
        BackendArg::Sqlite => {
            let opener = SqliteOpener {
                path: db,
                options: SqliteOptions::default()
                    .with_synchronous(match args.synchronous {
                        SyncArg::Full => SqliteSynchronous::Full,
                        SyncArg::Normal => SqliteSynchronous::Normal,
                    })
                    .with_index(index),
            };
            serve(server(opener, options, &args)?, &args, config, token, mode).await
        }
        #[cfg(feature = "duckdb")]
        BackendArg::Duckdb => {
            let opener = memstore_ipc::DuckdbOpener {
                path: db,
                options: memstore_duckdb::DuckdbOptions::default().with_index(index),
            };
            serve(server(opener, options, &args)?, &args, config, token, mode).await
        }
        #[cfg(not(feature = "duckdb"))]
        BackendArg::Duckdb => Err(
            "this memstored was built without DuckDB: build it with `--features duckdb` (see crates/memstore-duckdb)"
                .into(),
        ),
    }
}

/// A server of the --db store (and named stores with --stores), or of named stores only.
fn server<O: StoreOpener>(
    opener: O,
    options: ServerOptions,
    args: &Args,
) -> Result<Server<O>, Box<dyn std::error::Error>> {
    Ok(match args.db {
        Some(_) => Server::new(opener, options),
        None => Server::named_only(opener, options)?,
    })
}

async fn serve<O: StoreOpener>(
    server: Server<O>,
    args: &Args,
    config: Option<MemoryConfig>,
    token: Option<String>,
    mode: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(db) = &args.db
        && !server.open_store(config.as_ref()).await?
    {
        info!(db = %db.display(), "no store yet: the first client that sends a configuration creates it");
    }
    if let Some(dir) = &args.stores {
        info!(dir = %dir.display(), "serving named stores");
    }
    let socket = match (&args.socket, &args.db, &args.stores) {
        (Some(s), _, _) => s.clone(),
        (None, Some(db), _) => {
            let mut p = db.clone().into_os_string();
            p.push(".sock");
            PathBuf::from(p)
        }
        (None, None, Some(dir)) => dir.join("memstored.sock"),
        (None, None, None) => return Err("--db or --stores is required".into()),
    };
    // Signal handlers go in before the socket appears: a SIGTERM sent as
    // soon as a client can connect must stop the daemon cleanly (flushing
    // its stores), not kill it with the default action.
    let shutdown = shutdown_signal();
    let mut listeners = vec![server::bind_unix(&socket, mode)?];
    if let Some(addr) = &args.tcp {
        if token.is_none() {
            return Err(format!("--tcp needs a shared token: --token-file or ${TOKEN_ENV}").into());
        }
        let listener = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => {
                let acceptor = memstore_ipc::tls::acceptor(cert, key)?;
                server::bind_tls(addr, args.allow_remote, acceptor).await?
            }
            _ if args.allow_remote => {
                return Err(
                    "--allow-remote needs TLS (--tls-cert and --tls-key): without it the token \
                            and the memories would cross the network in cleartext"
                        .into(),
                );
            }
            _ => server::bind_tcp(addr).await?,
        };
        listeners.push(listener);
    }
    server.serve(listeners, shutdown).await?;
    info!("bye");
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now (`signal` registers them
/// when called, not when the future is first polled) and returns the future
/// that resolves on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM"),
            _ = int.recv() => info!("SIGINT"),
        }
    }
}
