//! Where a distillation run keeps the durable stores of its memory layers
//! (`--store`): one memstore per memory layer, named after its block.
//!
//! - `sqlite[:DIR]`: SQLite files `DIR/block{i}.db` (default `DIR` = `RUN_DIR/memory`).
//! - `duckdb[:DIR]`: DuckDB files `DIR/block{i}.duckdb` (burn-dmt feature `duckdb`).
//! - `ipc:SOCKET`: a `memstored` serving named stores, started beforehand
//!   (`memstored --stores DIR`, whose socket is `DIR/memstored.sock`): block
//!   `i` uses its store `block{i}` (`DIR/block{i}.db`), so one socket serves
//!   every memory layer and the memory is shared with other processes. The
//!   first connection creates each store with the layer's configuration.
//! - `postgres://…[#PREFIX]`: stores in a PostgreSQL database with pgvector
//!   (burn-dmt feature `postgres`): block `i` uses the schema
//!   `PREFIX_block{i}` (`PREFIX` defaults to `dmt`), so other processes and
//!   machines can open the same memory. Checkpoints are backup files of
//!   each schema; `--resume` restores them.
//!
//! Each block's store is opened through memstore-any from its URL
//! ([`StoreLocation::url`]), so this crate names no backend. Checkpoints copy
//! each store (`backup_to`: SQLite copies its database file once a
//! checkpoint has moved the WAL into it, else `VACUUM INTO`; DuckDB `COPY
//! FROM DATABASE`; or the daemon's own copy); `--resume` puts the copies back
//! (durable file copies, or the daemon's `Restore` request) before reloading.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use memstore_any::{AnyStore, Endpoint, StoreUrl};
use memstore_api::{DurableStore, MemoryConfig, MemoryStore};

use crate::{DmtError, Result};

/// Where the memory layers' stores live.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreLocation {
    /// SQLite files in a directory (`None`: the run directory's `memory/`).
    Sqlite(Option<PathBuf>),
    /// DuckDB files in a directory (`None`: the run directory's `memory/`).
    Duckdb(Option<PathBuf>),
    /// The socket of a `memstored` serving named stores (`--stores DIR`).
    Ipc(PathBuf),
    /// A PostgreSQL database: block `i` in the schema `{prefix}_block{i}`.
    Postgres {
        /// The connection URL (`postgres://…`).
        url: String,
        /// The schemas' prefix.
        prefix: String,
    },
}

/// The schema prefix of `postgres://…` without `#PREFIX`.
pub const DEFAULT_POSTGRES_PREFIX: &str = "dmt";

impl Default for StoreLocation {
    fn default() -> Self {
        StoreLocation::Sqlite(None)
    }
}

impl FromStr for StoreLocation {
    type Err = DmtError;

    fn from_str(s: &str) -> Result<Self> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            if !cfg!(feature = "postgres") {
                return Err(DmtError::InvalidArgument(
                    "--store postgres://… needs a build with PostgreSQL: add `--features postgres`".into(),
                ));
            }
            let (url, prefix) = s.rsplit_once('#').unwrap_or((s, DEFAULT_POSTGRES_PREFIX));
            return Ok(StoreLocation::Postgres {
                url: url.to_string(),
                prefix: prefix.to_string(),
            });
        }
        let (kind, dir) = match s.split_once(':') {
            Some((k, d)) => (k, Some(PathBuf::from(d))),
            None => (s, None),
        };
        if dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
            return Err(DmtError::InvalidArgument(format!(
                "--store {s}: the directory is empty"
            )));
        }
        match (kind, dir) {
            ("sqlite", d) => Ok(StoreLocation::Sqlite(d)),
            ("duckdb", _) if !cfg!(feature = "duckdb") => Err(DmtError::InvalidArgument(
                "--store duckdb needs a build with DuckDB: add `--features duckdb` (after scripts/fetch-libduckdb.sh)"
                    .into(),
            )),
            ("duckdb", d) => Ok(StoreLocation::Duckdb(d)),
            ("ipc", Some(d)) => Ok(StoreLocation::Ipc(d)),
            ("ipc", None) => Err(DmtError::InvalidArgument(
                "--store ipc:SOCKET needs the socket of a memstored serving named stores (memstored --stores DIR)"
                    .into(),
            )),
            _ => Err(DmtError::InvalidArgument(format!(
                "--store {s}: expected sqlite[:DIR], duckdb[:DIR], ipc:SOCKET or postgres://…[#PREFIX]"
            ))),
        }
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, dir) = match self {
            StoreLocation::Sqlite(d) => ("sqlite", d.as_deref()),
            StoreLocation::Duckdb(d) => ("duckdb", d.as_deref()),
            StoreLocation::Ipc(d) => ("ipc", Some(d.as_path())),
            StoreLocation::Postgres { url, prefix } => return write!(f, "{url}#{prefix}"),
        };
        match dir {
            Some(d) => write!(f, "{kind}:{}", d.display()),
            None => f.write_str(kind),
        }
    }
}

impl StoreLocation {
    /// The directory that holds the stores (for a daemon, its socket's
    /// directory: `memstored --stores DIR` puts its socket in `DIR`).
    pub fn dir(&self, run_dir: &Path) -> PathBuf {
        match self {
            StoreLocation::Sqlite(Some(d)) | StoreLocation::Duckdb(Some(d)) => d.clone(),
            StoreLocation::Ipc(socket) => match socket.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            },
            StoreLocation::Sqlite(None) | StoreLocation::Duckdb(None) | StoreLocation::Postgres { .. } => {
                run_dir.join("memory")
            }
        }
    }

    /// The name of block `i`'s store (a daemon's named store).
    pub fn store_name(block: usize) -> String {
        format!("block{block}")
    }

    /// The file name of block `i`'s store.
    fn name(&self, block: usize) -> String {
        match self {
            StoreLocation::Duckdb(_) => format!("block{block}.duckdb"),
            _ => format!("block{block}.db"),
        }
    }

    /// The local store file of block `i` (`None` for daemons).
    pub fn file(&self, run_dir: &Path, block: usize) -> Option<PathBuf> {
        self.url(run_dir, block).file().map(Path::to_path_buf)
    }

    /// The name of block `i`'s copy in a checkpoint directory.
    pub fn checkpoint_name(&self, block: usize) -> String {
        match self {
            StoreLocation::Duckdb(_) => format!("block{block}.duckdb"),
            StoreLocation::Postgres { .. } => format!("block{block}.pgbackup"),
            _ => format!("block{block}.db"),
        }
    }

    /// The URL of block `i`'s store (memstore-any opens it).
    pub fn url(&self, run_dir: &Path, block: usize) -> StoreUrl {
        match self {
            StoreLocation::Sqlite(_) => StoreUrl::Sqlite(self.dir(run_dir).join(self.name(block))),
            StoreLocation::Duckdb(_) => StoreUrl::Duckdb(self.dir(run_dir).join(self.name(block))),
            StoreLocation::Ipc(socket) => StoreUrl::Ipc {
                endpoint: Endpoint::Unix(socket.clone()),
                store: Some(Self::store_name(block)),
            },
            StoreLocation::Postgres { url, prefix } => StoreUrl::Postgres {
                url: url.clone(),
                store: format!("{prefix}_{}", Self::store_name(block)),
            },
        }
    }

    /// Opens block `i`'s store, creating it with `config` if absent.
    pub async fn open(&self, run_dir: &Path, block: usize, config: MemoryConfig) -> Result<LayerStore> {
        self.open_url(run_dir, block, Some(config)).await
    }

    /// Opens block `i`'s existing store with its persisted configuration.
    pub async fn open_existing(&self, run_dir: &Path, block: usize) -> Result<LayerStore> {
        self.open_url(run_dir, block, None).await
    }

    async fn open_url(&self, run_dir: &Path, block: usize, config: Option<MemoryConfig>) -> Result<LayerStore> {
        let url = self.url(run_dir, block);
        match url.open(config).await {
            Ok(s) => Ok(LayerStore(Arc::new(s))),
            Err(e) => match self {
                StoreLocation::Ipc(socket) => Err(DmtError::InvalidArgument(format!(
                    "memory layer {block}: no usable store at {url} ({e}); start a memstored serving named \
                     stores, e.g. `memstored --stores {} --socket {}`",
                    self.dir(run_dir).display(),
                    socket.display()
                ))),
                _ => Err(e.into()),
            },
        }
    }

    /// Whether a store of block `i` exists already (a run is there).
    pub fn exists(&self, run_dir: &Path, block: usize) -> bool {
        self.file(run_dir, block).is_some_and(|f| f.exists())
    }

    /// Whether block `i`'s store is there already with memories in it (a
    /// run is there): its file, or for PostgreSQL a schema holding rows.
    pub async fn occupied(&self, run_dir: &Path, block: usize) -> Result<bool> {
        match self {
            StoreLocation::Postgres { .. } => Ok(self.url(run_dir, block).holds_memories().await?),
            _ => Ok(self.exists(run_dir, block)),
        }
    }

    /// Puts back block `i`'s store as it is in the checkpoint copy `from`
    /// (the store must not be open here): a durable file copy, or the
    /// daemon's restore.
    pub async fn restore(&self, run_dir: &Path, block: usize, from: &Path) -> Result<()> {
        Ok(self.url(run_dir, block).restore(from).await?)
    }
}

/// One memory layer's open store, shared by the layer's tier loads and its
/// write-behind thread.
pub struct LayerStore(Arc<AnyStore>);

impl LayerStore {
    /// The store as a shared trait object (for the write-behind and tier loads).
    pub fn shared(&self) -> Arc<dyn MemoryStore> {
        self.0.clone()
    }

    /// Writes a consistent copy of the store to the new file `dest`.
    pub async fn backup_to(&self, dest: &Path) -> Result<()> {
        self.backup_task(dest.to_path_buf()).await
    }

    /// [`LayerStore::backup_to`] as a task that owns what it needs, so that
    /// the copies of several stores can run at once (each SQLite or DuckDB
    /// store copies on its own connection's thread).
    pub fn backup_task(&self, dest: PathBuf) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        let store = self.0.clone();
        async move { Ok(store.backup_to(&dest).await?) }
    }

    /// Flushes and closes the store (or leaves the daemon).
    pub async fn close(self) -> Result<()> {
        self.0.flush().await?;
        if let Ok(s) = Arc::try_unwrap(self.0) {
            s.close().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_locations() {
        for s in [
            "sqlite",
            "sqlite:/tmp/m",
            "duckdb",
            "duckdb:rel/dir",
            "ipc:/run/dmt/memstored.sock",
        ] {
            match s.parse::<StoreLocation>() {
                Ok(l) => assert_eq!(l.to_string(), s),
                Err(e) => {
                    assert!(s.starts_with("duckdb") && !cfg!(feature = "duckdb"), "{s}: {e}");
                    assert!(e.to_string().contains("--features duckdb"), "{e}");
                }
            }
        }
        assert_eq!("sqlite".parse::<StoreLocation>().unwrap(), StoreLocation::default());
        match "postgres://u@h/db?host=/s#run7".parse::<StoreLocation>() {
            Ok(l) => {
                assert_eq!(l.to_string(), "postgres://u@h/db?host=/s#run7");
                assert_eq!(
                    l.url(Path::new("/r"), 2).to_string(),
                    "postgres://u@h/db?host=/s#run7_block2"
                );
                assert_eq!(l.file(Path::new("/r"), 2), None);
            }
            Err(e) => assert!(
                !cfg!(feature = "postgres") && e.to_string().contains("--features postgres"),
                "{e}"
            ),
        }
        for bad in ["ipc", "sqlite:", "postgres:/x", ""] {
            assert!(bad.parse::<StoreLocation>().is_err(), "{bad}");
        }
        let run = Path::new("/r");
        let l = StoreLocation::Duckdb(None);
        assert_eq!(l.file(run, 2), Some(PathBuf::from("/r/memory/block2.duckdb")));
        let l: StoreLocation = "ipc:/s/d.sock".parse().unwrap();
        assert_eq!(l.file(run, 2), None);
        assert_eq!(l.dir(run), PathBuf::from("/s"));
        let l: StoreLocation = "ipc:d.sock".parse().unwrap();
        assert_eq!(l.dir(run), PathBuf::from("."));
        assert_eq!(StoreLocation::store_name(3), "block3");
    }
}
