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
//!
//! Checkpoints copy each store (`backup_to`: SQLite `VACUUM INTO`, DuckDB
//! `COPY FROM DATABASE`, or the daemon's own copy); `--resume` puts the copies
//! back (file copies, or the daemon's `Restore` request) before reloading.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use memstore_api::{MemoryConfig, MemoryStore};
use memstore_ipc::{ClientOptions, Endpoint, IpcStore};
use memstore_sqlite::SqliteStore;

use crate::{DmtError, Result, io_error};

/// Where the memory layers' stores live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    /// SQLite files in a directory (`None`: the run directory's `memory/`).
    Sqlite(Option<PathBuf>),
    /// DuckDB files in a directory (`None`: the run directory's `memory/`).
    Duckdb(Option<PathBuf>),
    /// The socket of a `memstored` serving named stores (`--stores DIR`).
    Ipc(PathBuf),
}

impl Default for StoreLocation {
    fn default() -> Self {
        StoreLocation::Sqlite(None)
    }
}

impl FromStr for StoreLocation {
    type Err = DmtError;

    fn from_str(s: &str) -> Result<Self> {
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
                "--store {s}: expected sqlite[:DIR], duckdb[:DIR] or ipc:SOCKET"
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
            StoreLocation::Sqlite(None) | StoreLocation::Duckdb(None) => run_dir.join("memory"),
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
        match self {
            StoreLocation::Ipc(_) => None,
            _ => Some(self.dir(run_dir).join(self.name(block))),
        }
    }

    /// The name of block `i`'s copy in a checkpoint directory.
    pub fn checkpoint_name(&self, block: usize) -> String {
        match self {
            StoreLocation::Duckdb(_) => format!("block{block}.duckdb"),
            _ => format!("block{block}.db"),
        }
    }

    /// Opens block `i`'s store, creating it with `config` if absent.
    pub async fn open(&self, run_dir: &Path, block: usize, config: MemoryConfig) -> Result<LayerStore> {
        match self {
            StoreLocation::Sqlite(_) => {
                let path = self.file(run_dir, block).unwrap_or_default();
                Ok(LayerStore::Sqlite(Arc::new(SqliteStore::open(path, config).await?)))
            }
            StoreLocation::Duckdb(_) => open_duckdb(self.file(run_dir, block).unwrap_or_default(), Some(config)).await,
            StoreLocation::Ipc(_) => self.connect(run_dir, block, Some(config)).await,
        }
    }

    /// Opens block `i`'s existing store with its persisted configuration.
    pub async fn open_existing(&self, run_dir: &Path, block: usize) -> Result<LayerStore> {
        match self {
            StoreLocation::Sqlite(_) => {
                let path = self.file(run_dir, block).unwrap_or_default();
                Ok(LayerStore::Sqlite(Arc::new(SqliteStore::open_existing(path).await?)))
            }
            StoreLocation::Duckdb(_) => open_duckdb(self.file(run_dir, block).unwrap_or_default(), None).await,
            StoreLocation::Ipc(_) => self.connect(run_dir, block, None).await,
        }
    }

    async fn connect(&self, run_dir: &Path, block: usize, config: Option<MemoryConfig>) -> Result<LayerStore> {
        let StoreLocation::Ipc(socket) = self else {
            return Err(DmtError::InvalidArgument(format!("{self} is not a daemon")));
        };
        let name = Self::store_name(block);
        let options = ClientOptions {
            store: Some(name.clone()),
            ..ClientOptions::default()
        };
        match IpcStore::connect_with(&Endpoint::Unix(socket.clone()), config, options).await {
            Ok(s) => Ok(LayerStore::Ipc(Arc::new(s))),
            Err(e) => Err(DmtError::InvalidArgument(format!(
                "memory layer {block}: no usable store {name:?} at memstored {} ({e}); start one serving named \
                 stores, e.g. `memstored --stores {} --socket {}`",
                socket.display(),
                self.dir(run_dir).display(),
                socket.display()
            ))),
        }
    }

    /// Whether a store of block `i` exists already (a run is there).
    pub fn exists(&self, run_dir: &Path, block: usize) -> bool {
        self.file(run_dir, block).is_some_and(|f| f.exists())
    }

    /// Puts back block `i`'s store as it is in the checkpoint copy `from`
    /// (the store must not be open here).
    pub async fn restore(&self, run_dir: &Path, block: usize, from: &Path) -> Result<()> {
        match self.file(run_dir, block) {
            Some(file) => {
                remove_files(&file)?;
                std::fs::copy(from, &file).map_err(io_error(from))?;
                Ok(())
            }
            None => {
                let store = self.connect(run_dir, block, None).await?;
                let from = std::fs::canonicalize(from).map_err(io_error(from))?;
                if let LayerStore::Ipc(s) = &store {
                    s.restore_from(&from).await?;
                }
                store.close().await
            }
        }
    }
}

/// Removes a store file and its write-ahead-log and lock companions.
fn remove_files(file: &Path) -> Result<()> {
    for suffix in ["", "-wal", "-shm", ".wal"] {
        let p = PathBuf::from(format!("{}{suffix}", file.display()));
        if p.exists() {
            std::fs::remove_file(&p).map_err(io_error(&p))?;
        }
    }
    Ok(())
}

#[cfg(feature = "duckdb")]
async fn open_duckdb(path: PathBuf, config: Option<MemoryConfig>) -> Result<LayerStore> {
    let s = match config {
        Some(c) => memstore_duckdb::DuckdbStore::open(path, c).await?,
        None => memstore_duckdb::DuckdbStore::open_existing(path).await?,
    };
    Ok(LayerStore::Duckdb(Arc::new(s)))
}

#[cfg(not(feature = "duckdb"))]
async fn open_duckdb(_path: PathBuf, _config: Option<MemoryConfig>) -> Result<LayerStore> {
    Err(DmtError::InvalidArgument(
        "--store duckdb needs a build with DuckDB: add `--features duckdb` (after scripts/fetch-libduckdb.sh)".into(),
    ))
}

/// One memory layer's open store.
pub enum LayerStore {
    /// A SQLite file.
    Sqlite(Arc<SqliteStore>),
    /// A DuckDB file.
    #[cfg(feature = "duckdb")]
    Duckdb(Arc<memstore_duckdb::DuckdbStore>),
    /// A `memstored` daemon.
    Ipc(Arc<IpcStore>),
}

impl LayerStore {
    /// The store as a shared trait object (for the write-behind and tier loads).
    pub fn shared(&self) -> Arc<dyn MemoryStore> {
        match self {
            LayerStore::Sqlite(s) => s.clone(),
            #[cfg(feature = "duckdb")]
            LayerStore::Duckdb(s) => s.clone(),
            LayerStore::Ipc(s) => s.clone(),
        }
    }

    /// Writes a consistent copy of the store to the new file `dest`.
    pub async fn backup_to(&self, dest: &Path) -> Result<()> {
        match self {
            LayerStore::Sqlite(s) => s.backup_to(dest).await?,
            #[cfg(feature = "duckdb")]
            LayerStore::Duckdb(s) => s.backup_to(dest).await?,
            LayerStore::Ipc(s) => {
                // The daemon writes the copy: it needs an absolute path.
                let parent = dest.parent().unwrap_or(Path::new("."));
                let parent = std::fs::canonicalize(parent).map_err(io_error(parent))?;
                let name = dest.file_name().unwrap_or_default();
                s.backup_to(&parent.join(name)).await?
            }
        }
        Ok(())
    }

    /// Flushes and closes the store (or leaves the daemon).
    pub async fn close(self) -> Result<()> {
        match self {
            LayerStore::Sqlite(s) => {
                s.flush().await?;
                if let Ok(s) = Arc::try_unwrap(s) {
                    s.close().await?;
                }
            }
            #[cfg(feature = "duckdb")]
            LayerStore::Duckdb(s) => {
                s.flush().await?;
                if let Ok(s) = Arc::try_unwrap(s) {
                    s.close().await?;
                }
            }
            LayerStore::Ipc(s) => {
                s.flush().await?;
                if let Ok(s) = Arc::try_unwrap(s) {
                    s.close().await?;
                }
            }
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
