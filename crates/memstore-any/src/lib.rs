//! # memstore-any
//!
//! A memstore backend chosen at run time from a store URL, in the manner of
//! sqlx's `Any` driver: code that keeps memories (a model's layers, a
//! command-line tool) names a [`StoreUrl`] and gets an [`AnyStore`], and
//! never depends on a backend crate itself. A new backend is a new URL
//! scheme and a new arm here.
//!
//! | URL | store |
//! | --- | --- |
//! | `sqlite:PATH` | a SQLite file (memstore-sqlite) |
//! | `duckdb:PATH` | a DuckDB file (memstore-duckdb, feature `duckdb`) |
//! | `ipc:ENDPOINT` | the store a `memstored` serves; `ENDPOINT` is a Unix socket path, `unix:PATH`, `tcp:HOST:PORT` or `tls:HOST:PORT` (CA file in `$MEMSTORED_TLS_CA`) |
//! | `ipc:ENDPOINT#NAME` | the named store `NAME` of a `memstored --stores DIR` |
//! | `postgres://…#NAME` | the store in schema `NAME` (default `memstore`) of a PostgreSQL database with pgvector (memstore-postgres, feature `postgres`) |
//!
//! Every store implements [`MemoryStore`] and [`DurableStore`] the same way
//! whatever the URL; [`StoreUrl::restore`] puts a backup back in place (a
//! file copy while the store is closed, or the daemon's own restore).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use async_trait::async_trait;
use memstore_api::{
    Batch, ChangeBatch, DurableStore, Error, Memory, MemoryConfig, MemoryId, MemoryStore, Neighbors, Result, Stats,
    TagFilter, Tick, Vectors,
};
use memstore_ipc::{ClientOptions, IpcStore};
use memstore_sqlite::SqliteStore;

pub use memstore_ipc::Endpoint;

#[cfg(feature = "duckdb")]
use memstore_duckdb::DuckdbStore;
#[cfg(feature = "postgres")]
use memstore_postgres::{PostgresLocation, PostgresStore};

/// Where a store lives, parsed from a store URL (module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreUrl {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A DuckDB file.
    Duckdb(PathBuf),
    /// A store served by `memstored`: its endpoint, and the named store
    /// (`None`: the daemon's own store).
    Ipc {
        /// The daemon's socket.
        endpoint: Endpoint,
        /// The named store, for a daemon serving several.
        store: Option<String>,
    },
    /// A store in a PostgreSQL database.
    Postgres {
        /// The connection URL (`postgres://…`, `postgresql://…`).
        url: String,
        /// The store's schema.
        store: String,
    },
}

/// The schemes a store URL may start with, for error messages.
const SCHEMES: &str = "sqlite:PATH, duckdb:PATH, ipc:ENDPOINT[#NAME] or postgres://…[#NAME]";

impl FromStr for StoreUrl {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::InvalidConfig(format!("store URL {s:?}: {why} (expected {SCHEMES})"));
        let (scheme, rest) = s.split_once(':').ok_or_else(|| bad("no scheme"))?;
        if rest.is_empty() {
            return Err(bad("nothing after the scheme"));
        }
        match scheme {
            "sqlite" => Ok(StoreUrl::Sqlite(PathBuf::from(rest))),
            "duckdb" if cfg!(feature = "duckdb") => Ok(StoreUrl::Duckdb(PathBuf::from(rest))),
            "duckdb" => Err(bad("this build has no DuckDB (feature `duckdb`)")),
            "ipc" => {
                let (endpoint, store) = match rest.rsplit_once('#') {
                    Some((e, "")) => return Err(bad(&format!("an empty store name after {e:?}"))),
                    Some((e, name)) => (e, Some(name.to_string())),
                    None => (rest, None),
                };
                let endpoint = Endpoint::parse(endpoint).map_err(|e| bad(&e.to_string()))?;
                Ok(StoreUrl::Ipc { endpoint, store })
            }
            "postgres" | "postgresql" if cfg!(feature = "postgres") => {
                let (url, store) = match s.rsplit_once('#') {
                    Some((_, "")) => return Err(bad("an empty store name after '#'")),
                    Some((url, name)) => (url, name),
                    None => (s, "memstore"),
                };
                Ok(StoreUrl::Postgres {
                    url: url.to_string(),
                    store: store.to_string(),
                })
            }
            "postgres" | "postgresql" => Err(bad("this build has no PostgreSQL (feature `postgres`)")),
            _ => Err(bad(&format!("unknown scheme {scheme:?}"))),
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            StoreUrl::Duckdb(p) => write!(f, "duckdb:{}", p.display()),
            StoreUrl::Ipc { endpoint, store } => {
                match endpoint {
                    Endpoint::Unix(p) => write!(f, "ipc:{}", p.display())?,
                    other => write!(f, "ipc:{other}")?,
                }
                match store {
                    Some(name) => write!(f, "#{name}"),
                    None => Ok(()),
                }
            }
            StoreUrl::Postgres { url, store } => write!(f, "{url}#{store}"),
        }
    }
}

impl StoreUrl {
    /// The store's file, for the backends kept in one (`None` for a daemon's).
    pub fn file(&self) -> Option<&Path> {
        match self {
            StoreUrl::Sqlite(p) | StoreUrl::Duckdb(p) => Some(p),
            StoreUrl::Ipc { .. } | StoreUrl::Postgres { .. } => None,
        }
    }

    /// Opens the store. With `config`, creates it if it does not exist (an
    /// existing one must have the same dimensions and metric, and takes the
    /// tunable fields); without, opens an existing store with its own.
    pub async fn open(&self, config: Option<MemoryConfig>) -> Result<AnyStore> {
        match self {
            StoreUrl::Sqlite(p) => Ok(AnyStore::Sqlite(match config {
                Some(c) => SqliteStore::open(p, c).await?,
                None => SqliteStore::open_existing(p).await?,
            })),
            #[cfg(feature = "duckdb")]
            StoreUrl::Duckdb(p) => Ok(AnyStore::Duckdb(match config {
                Some(c) => DuckdbStore::open(p, c).await?,
                None => DuckdbStore::open_existing(p).await?,
            })),
            #[cfg(not(feature = "duckdb"))]
            StoreUrl::Duckdb(_) => Err(Error::InvalidConfig(format!(
                "{self}: this build has no DuckDB (feature `duckdb`)"
            ))),
            StoreUrl::Ipc { endpoint, store } => {
                let options = {
                    let mut o = ClientOptions::default();
                    o.store = store.clone();
                    o
                };
                Ok(AnyStore::Ipc(IpcStore::connect_with(endpoint, config, options).await?))
            }
            #[cfg(feature = "postgres")]
            StoreUrl::Postgres { url, store } => {
                let at = PostgresLocation::new(url.clone(), store.clone());
                Ok(AnyStore::Postgres(match config {
                    Some(c) => PostgresStore::open(at, c).await?,
                    None => PostgresStore::open_existing(at).await?,
                }))
            }
            #[cfg(not(feature = "postgres"))]
            StoreUrl::Postgres { .. } => Err(Error::InvalidConfig(format!(
                "{self}: this build has no PostgreSQL (feature `postgres`)"
            ))),
        }
    }

    /// Whether a store is there already with memories in it: a file store's
    /// file exists, a PostgreSQL store's schema holds rows; a daemon's named
    /// store is not checked (`false`).
    pub async fn holds_memories(&self) -> Result<bool> {
        match self {
            StoreUrl::Sqlite(file) | StoreUrl::Duckdb(file) => Ok(file.exists()),
            StoreUrl::Ipc { .. } => Ok(false),
            #[cfg(feature = "postgres")]
            StoreUrl::Postgres { url, store } => {
                memstore_postgres::holds_memories(&PostgresLocation::new(url.clone(), store.clone())).await
            }
            #[cfg(not(feature = "postgres"))]
            StoreUrl::Postgres { .. } => Err(Error::InvalidConfig(format!(
                "{self}: this build has no PostgreSQL (feature `postgres`)"
            ))),
        }
    }

    /// Puts the backup at `from` (written by [`DurableStore::backup_to`])
    /// back as this store, which must not be open here: a file store is
    /// replaced by a copy of the backup (its write-ahead log dropped, the copy
    /// made durable before this returns); a daemon replaces the store it
    /// serves (refused while other clients use it); a PostgreSQL store's rows
    /// are replaced in one transaction (clients open meanwhile reload it
    /// whole). The backup is left as it is.
    pub async fn restore(&self, from: &Path) -> Result<()> {
        match self {
            StoreUrl::Sqlite(file) => restore_file(file, from, StoreUrl::Sqlite).await,
            StoreUrl::Duckdb(file) => restore_file(file, from, StoreUrl::Duckdb).await,
            StoreUrl::Ipc { .. } => {
                // The daemon reads the backup: it needs an absolute path.
                let from = std::fs::canonicalize(from).map_err(|e| io(from, e))?;
                let store = match self.open(None).await? {
                    AnyStore::Ipc(s) => s,
                    _ => return Err(Error::InvalidConfig(format!("{self} is not a daemon's store"))),
                };
                let restored = store.restore_from(&from).await;
                let closed = store.close().await;
                restored.and(closed)
            }
            #[cfg(feature = "postgres")]
            StoreUrl::Postgres { url, store } => {
                memstore_postgres::restore(PostgresLocation::new(url.clone(), store.clone()), from).await
            }
            #[cfg(not(feature = "postgres"))]
            StoreUrl::Postgres { .. } => Err(Error::InvalidConfig(format!(
                "{self}: this build has no PostgreSQL (feature `postgres`)"
            ))),
        }
    }
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::storage(std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Replaces the closed store file `file` with a durable copy of `from`,
/// after checking that the copy opens as a store of the same kind (`kind`
/// makes its URL): a file that is not a backup changes nothing.
async fn restore_file(file: &Path, from: &Path, kind: fn(PathBuf) -> StoreUrl) -> Result<()> {
    let tmp = memstore_engine::driver::copy_beside(from, file)?;
    let checked = match kind(tmp.clone()).open(None).await {
        Ok(store) => store.close().await,
        Err(e) => Err(e),
    };
    memstore_engine::driver::remove_side_files(&tmp);
    if let Err(e) = checked {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    memstore_engine::driver::install_copy(&tmp, file)
}

/// Opens the store at `url` (module docs): [`StoreUrl::open`] of the parsed URL.
pub async fn open(url: &str, config: Option<MemoryConfig>) -> Result<AnyStore> {
    url.parse::<StoreUrl>()?.open(config).await
}

/// A store of any backend, opened from a [`StoreUrl`].
// One value per open store, long-lived: the size of the largest variant
// costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[non_exhaustive]
pub enum AnyStore {
    /// A SQLite file.
    Sqlite(SqliteStore),
    /// A DuckDB file.
    #[cfg(feature = "duckdb")]
    Duckdb(DuckdbStore),
    /// A store served by `memstored`.
    Ipc(IpcStore),
    /// A store in a PostgreSQL database.
    #[cfg(feature = "postgres")]
    Postgres(PostgresStore),
}

/// Runs `$body` with `$s` bound to the store inside `$store`, whatever its backend.
macro_rules! each {
    ($store:expr, $s:ident => $body:expr) => {
        match $store {
            AnyStore::Sqlite($s) => $body,
            #[cfg(feature = "duckdb")]
            AnyStore::Duckdb($s) => $body,
            AnyStore::Ipc($s) => $body,
            #[cfg(feature = "postgres")]
            AnyStore::Postgres($s) => $body,
        }
    };
}

impl AnyStore {
    /// The backend's name (`sqlite`, `duckdb`, `ipc`, `postgres`).
    pub fn kind(&self) -> &'static str {
        match self {
            AnyStore::Sqlite(_) => "sqlite",
            #[cfg(feature = "duckdb")]
            AnyStore::Duckdb(_) => "duckdb",
            AnyStore::Ipc(_) => "ipc",
            #[cfg(feature = "postgres")]
            AnyStore::Postgres(_) => "postgres",
        }
    }
}

#[async_trait]
impl DurableStore for AnyStore {
    /// For a daemon's store, `dest` is made absolute here: the daemon writes it.
    async fn backup_to(&self, dest: &Path) -> Result<()> {
        match self {
            AnyStore::Ipc(s) => {
                let parent = match dest.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                let parent = std::fs::canonicalize(parent).map_err(|e| io(parent, e))?;
                let name = dest
                    .file_name()
                    .ok_or_else(|| Error::Shape(format!("backup path {} names no file", dest.display())))?;
                s.backup_to(&parent.join(name)).await
            }
            other => each!(other, s => DurableStore::backup_to(s, dest).await),
        }
    }

    async fn close(self) -> Result<()> {
        each!(self, s => DurableStore::close(s).await)
    }
}

#[async_trait]
impl MemoryStore for AnyStore {
    fn config(&self) -> &MemoryConfig {
        each!(self, s => s.config())
    }
    async fn search(&self, queries: Vectors<'_>, k: usize, filter: Option<&TagFilter>) -> Result<Neighbors> {
        each!(self, s => s.search(queries, k, filter).await)
    }
    async fn insert(&self, batch: Batch<'_>, tick: Tick) -> Result<Vec<MemoryId>> {
        each!(self, s => s.insert(batch, tick).await)
    }
    async fn get(&self, ids: &[MemoryId]) -> Result<Vec<Memory>> {
        each!(self, s => s.get(ids).await)
    }
    async fn delete(&self, ids: &[MemoryId]) -> Result<usize> {
        each!(self, s => s.delete(ids).await)
    }
    async fn update_values(&self, ids: &[MemoryId], deltas: Vectors<'_>) -> Result<()> {
        each!(self, s => s.update_values(ids, deltas).await)
    }
    async fn touch(&self, ids: &[MemoryId], tick: Tick) -> Result<()> {
        each!(self, s => s.touch(ids, tick).await)
    }
    async fn learn(&self, batch: Batch<'_>, tick: Tick, k: usize) -> Result<Neighbors> {
        each!(self, s => s.learn(batch, tick, k).await)
    }
    async fn evict(&self, target_len: usize) -> Result<usize> {
        each!(self, s => s.evict(target_len).await)
    }
    async fn apply(&self, batch: &ChangeBatch) -> Result<()> {
        each!(self, s => s.apply(batch).await)
    }
    async fn apply_all(&self, batches: &[ChangeBatch]) -> Result<()> {
        each!(self, s => s.apply_all(batches).await)
    }
    async fn ids(&self) -> Result<Vec<MemoryId>> {
        each!(self, s => s.ids().await)
    }
    async fn len(&self) -> Result<usize> {
        each!(self, s => s.len().await)
    }
    async fn stats(&self) -> Result<Stats> {
        each!(self, s => s.stats().await)
    }
    async fn flush(&self) -> Result<()> {
        each!(self, s => s.flush().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_print() {
        for s in [
            "sqlite:/tmp/m.db",
            "sqlite:rel/m.db",
            "ipc:/run/d.sock",
            "ipc:/run/d.sock#block0",
            "ipc:tcp:127.0.0.1:7878#layers",
            "ipc:tls:memory.example:7878#layers",
        ] {
            let u: StoreUrl = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(u.to_string(), s);
        }
        assert_eq!(
            "ipc:unix:/s#n".parse::<StoreUrl>().unwrap(),
            StoreUrl::Ipc {
                endpoint: Endpoint::Unix("/s".into()),
                store: Some("n".into())
            }
        );
        assert_eq!("sqlite:/a".parse::<StoreUrl>().unwrap().file(), Some(Path::new("/a")));
        assert_eq!("ipc:/a".parse::<StoreUrl>().unwrap().file(), None);
        match "duckdb:/x.duckdb".parse::<StoreUrl>() {
            Ok(u) => assert!(cfg!(feature = "duckdb") && u.to_string() == "duckdb:/x.duckdb"),
            Err(e) => assert!(
                !cfg!(feature = "duckdb") && e.to_string().contains("feature `duckdb`"),
                "{e}"
            ),
        }
        match "postgres://u@h/db#layer_1".parse::<StoreUrl>() {
            Ok(u) => {
                assert!(cfg!(feature = "postgres") && u.file().is_none(), "{u}");
                assert_eq!(
                    u,
                    StoreUrl::Postgres {
                        url: "postgres://u@h/db".into(),
                        store: "layer_1".into()
                    }
                );
                assert_eq!(u.to_string(), "postgres://u@h/db#layer_1");
            }
            Err(e) => assert!(
                !cfg!(feature = "postgres") && e.to_string().contains("feature `postgres`"),
                "{e}"
            ),
        }
        for bad in [
            "",
            "sqlite:",
            "sqlite",
            "postgres://h/db#",
            "ipc:",
            "ipc:/s#",
            "ipc:tcp:nohost",
            "x:/y",
        ] {
            let e = bad.parse::<StoreUrl>().unwrap_err();
            assert!(matches!(e, Error::InvalidConfig(_)), "{bad}: {e:?}");
        }
    }
}
