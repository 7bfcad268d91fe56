//! The daemon's core: one store (or several named stores), many connections.
//!
//! - **Store.** A [`StoreOpener`] opens the store: at start-up when the file
//!   exists or a configuration is given, otherwise at the first handshake that
//!   carries a configuration.
//! - **Named stores.** With [`ServerOptions::stores_dir`] the daemon also
//!   serves stores by name: a handshake naming `NAME` gets the store in
//!   `DIR/NAME.<ext>` (opened by [`StoreOpener::named`]), created at the first
//!   handshake that carries a configuration. Each named store has its own
//!   sessions, configuration, backup and restore, exactly as the default one;
//!   this is how one socket serves every memory layer of a model. A later handshake with another dimension or
//!   metric is refused with [`memstore_api::Error::ConfigMismatch`]; one with
//!   other tunable fields (capacity, thresholds, λ) reopens the store with
//!   them when no other session is connected, and is refused
//!   ([`ProtocolError::ConfigInUse`]) otherwise.
//! - **Concurrency.** Each connection reads frames in order and runs each
//!   request as its own task (at most `max_in_flight` per connection), so a
//!   client may pipeline; reads from all connections run in parallel and
//!   writes are serialised by the store's transactions.
//! - **Faults.** A frame that does not decode gets a typed error and the
//!   connection goes on (its boundaries are intact); an oversized frame, a
//!   truncated one, a wrong version or token, or a request before the
//!   handshake gets a typed error and the connection is closed. No such
//!   frame reaches the store.
//! - **Shutdown.** [`Server::serve`] stops accepting when its shutdown future
//!   completes, lets every connection finish the requests it has read, then
//!   flushes and closes the store.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use memstore_api::{Batch, Memory, MemoryConfig, MemoryStore, Neighbors, Result, Stats, Tags, Vectors};
use memstore_sqlite::{SqliteOptions, SqliteStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, OwnedSemaphorePermit, RwLock, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::IpcError;
use crate::protocol::{
    self, DEFAULT_MAX_FRAME, MAGIC, NeighborsFrame, PROTOCOL_VERSION, ProtocolError, Request, Response, WireBatch,
    WireConfig, WireError, WireMemory, WireStats, WireTags, usize_of,
};

/// Wire type number of [`Request::Goodbye`] (checked by a unit test).
const GOODBYE: u32 = 14;

/// Opens and closes the store a daemon serves.
#[async_trait]
pub trait StoreOpener: Clone + Send + Sync + 'static {
    /// The store type.
    type Store: MemoryStore + 'static;

    /// A description for logs (the path).
    fn describe(&self) -> String;

    /// Opens the store with `config`, creating it if absent.
    async fn open(&self, config: &MemoryConfig) -> Result<Self::Store>;

    /// Opens the store with its persisted configuration; `None` if there is none yet.
    async fn open_existing(&self) -> Result<Option<Self::Store>>;

    /// Flushes and closes a store opened here.
    async fn close(&self, store: Self::Store) -> Result<()>;

    /// Writes a consistent copy of the store to a new file at `path`.
    async fn backup(&self, store: &Self::Store, path: &Path) -> Result<()>;

    /// Replaces the (closed) store's file with a copy of the backup at `from`
    /// and opens it. A backup that does not open leaves the file unchanged.
    async fn restore(&self, from: &Path) -> Result<Self::Store>;

    /// An opener of the same kind and options for the store named `name` in
    /// `dir` (the name has passed [`protocol::check_store_name`]).
    fn named(&self, dir: &Path, name: &str) -> Self;
}

/// Serves a SQLite store file.
#[derive(Clone, Debug)]
pub struct SqliteOpener {
    /// The database file.
    pub path: PathBuf,
    /// Backend options.
    pub options: SqliteOptions,
}

#[async_trait]
impl StoreOpener for SqliteOpener {
    type Store = SqliteStore;

    fn describe(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    async fn open(&self, config: &MemoryConfig) -> Result<SqliteStore> {
        SqliteStore::open_with(&self.path, config.clone(), self.options.clone()).await
    }

    async fn open_existing(&self) -> Result<Option<SqliteStore>> {
        if !self.path.exists() {
            return Ok(None);
        }
        SqliteStore::open_existing_with(&self.path, self.options.clone())
            .await
            .map(Some)
    }

    async fn close(&self, store: SqliteStore) -> Result<()> {
        store.flush().await?;
        store.close().await
    }

    async fn backup(&self, store: &SqliteStore, path: &Path) -> Result<()> {
        store.backup_to(path).await
    }

    async fn restore(&self, from: &Path) -> Result<SqliteStore> {
        restore_file(
            &self.path,
            from,
            |p| {
                let options = self.options.clone();
                async move { SqliteStore::open_existing_with(p, options).await }
            },
            |s| async move { s.close().await },
        )
        .await
    }

    fn named(&self, dir: &Path, name: &str) -> Self {
        SqliteOpener {
            path: dir.join(format!("{name}.db")),
            options: self.options.clone(),
        }
    }
}

/// Serves a DuckDB store file (feature `duckdb`).
#[cfg(feature = "duckdb")]
#[derive(Clone, Debug)]
pub struct DuckdbOpener {
    /// The database file.
    pub path: PathBuf,
    /// Backend options.
    pub options: memstore_duckdb::DuckdbOptions,
}

#[cfg(feature = "duckdb")]
#[async_trait]
impl StoreOpener for DuckdbOpener {
    type Store = memstore_duckdb::DuckdbStore;

    fn describe(&self) -> String {
        format!("duckdb:{}", self.path.display())
    }

    async fn open(&self, config: &MemoryConfig) -> Result<Self::Store> {
        memstore_duckdb::DuckdbStore::open_with(&self.path, config.clone(), self.options.clone()).await
    }

    async fn open_existing(&self) -> Result<Option<Self::Store>> {
        if !self.path.exists() {
            return Ok(None);
        }
        memstore_duckdb::DuckdbStore::open_existing_with(&self.path, self.options.clone())
            .await
            .map(Some)
    }

    async fn close(&self, store: Self::Store) -> Result<()> {
        store.close().await
    }

    async fn backup(&self, store: &Self::Store, path: &Path) -> Result<()> {
        store.backup_to(path).await
    }

    async fn restore(&self, from: &Path) -> Result<Self::Store> {
        restore_file(
            &self.path,
            from,
            |p| {
                let options = self.options.clone();
                async move { memstore_duckdb::DuckdbStore::open_existing_with(p, options).await }
            },
            |s| async move { s.close().await },
        )
        .await
    }

    fn named(&self, dir: &Path, name: &str) -> Self {
        DuckdbOpener {
            path: dir.join(format!("{name}.duckdb")),
            options: self.options.clone(),
        }
    }
}

/// Copies `from` beside `path`, checks that the copy opens as a store, then
/// moves it over `path` (dropping `path`'s WAL files) and opens it.
async fn restore_file<S, Open, OpenFut, Close, CloseFut>(
    path: &Path,
    from: &Path,
    open: Open,
    close: Close,
) -> Result<S>
where
    Open: Fn(PathBuf) -> OpenFut,
    OpenFut: std::future::Future<Output = Result<S>>,
    Close: Fn(S) -> CloseFut,
    CloseFut: std::future::Future<Output = Result<()>>,
{
    let clean = |p: &Path| {
        let _ = std::fs::remove_file(p);
        memstore_engine::driver::remove_side_files(p);
    };
    let tmp = memstore_engine::driver::copy_beside(from, path)?;
    match open(tmp.clone()).await {
        Ok(s) => close(s).await?,
        Err(e) => {
            clean(&tmp);
            return Err(e);
        }
    }
    // The copy is durable in place of the store before the restore is
    // acknowledged.
    memstore_engine::driver::install_copy(&tmp, path)?;
    clean(&tmp);
    open(path.to_path_buf()).await
}

/// The shortest shared token the daemon accepts (bytes): 16 random bytes
/// in hex (`openssl rand -hex 16`) are 32.
pub const MIN_TOKEN_LEN: usize = 16;

/// The largest frame a connection may send before its handshake is
/// accepted: a handshake is a few hundred bytes, and a client that has not
/// authenticated must not make the daemon reserve a full frame.
pub const HANDSHAKE_MAX_FRAME: usize = 64 * 1024;

/// Daemon settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Largest frame accepted (and sent) once a session is established
    /// (before it, [`HANDSHAKE_MAX_FRAME`]).
    pub max_frame: usize,
    /// Connections served at once, authenticated or not; one more is
    /// refused with [`ProtocolError::Busy`] and closed.
    pub max_connections: usize,
    /// The shared token. TCP connections must present it; Unix-socket
    /// connections are protected by the socket's mode and need none.
    pub token: Option<String>,
    /// A second token for read-only TCP sessions: they may search, get and
    /// read counts and statistics, and every other request is refused.
    pub read_token: Option<String>,
    /// Requests one connection may have running at once.
    pub max_in_flight: usize,
    /// How long a new connection has to complete its handshake.
    pub handshake_timeout: Duration,
    /// How long one reply may take to be written; a client that reads none
    /// for that long is disconnected.
    pub write_timeout: Duration,
    /// How long a frame may take to arrive once its first bytes have: a
    /// client that stops in the middle of a frame is disconnected, with a
    /// typed error, after this long.
    pub frame_timeout: Duration,
    /// How long a session may send no request while none of its requests
    /// is running before it is closed (`None`, the default: sessions may
    /// idle for ever, as a model's stores do between phases).
    pub idle_timeout: Option<Duration>,
    /// How long a read (search, get, ids, len, stats) may take, from the
    /// moment it starts to run, before it is cancelled and answered with
    /// [`ProtocolError::Timeout`] (`None`, the default: no limit). Writes
    /// always run to completion once started: cancelling one between its
    /// commit and the update of the in-process index would leave the two
    /// apart.
    pub request_timeout: Option<Duration>,
    /// Bytes of replies one connection may have computed and not yet
    /// written: a request reserves its reply's bound before it runs, so a
    /// client that reads slowly makes the daemon hold at most this much
    /// (one reply larger than it takes all of it).
    pub reply_budget: usize,
    /// Serve named stores from this directory (`DIR/NAME.<ext>`); `None`
    /// serves only the default store.
    pub stores_dir: Option<PathBuf>,
    /// Backups are written to and restored from this directory (and below
    /// it) only; `None` refuses backup and restore requests.
    pub backup_dir: Option<PathBuf>,
    /// How long a TCP address that presented [`AUTH_ATTEMPTS`] wrong tokens
    /// in a row is refused without its token being checked.
    pub auth_lockout: Duration,
    /// Named stores open at once; to open one more, the least recently used
    /// store without a session is closed (none: the handshake is refused
    /// with [`ProtocolError::Busy`]).
    pub max_open_stores: usize,
    /// Users (uids) besides the daemon's own whose processes may connect
    /// through the Unix socket (the kernel's peer credentials are checked).
    pub allow_uids: Vec<u32>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_frame: DEFAULT_MAX_FRAME,
            max_connections: 256,
            token: None,
            read_token: None,
            max_in_flight: 64,
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(60),
            frame_timeout: Duration::from_secs(30),
            idle_timeout: None,
            request_timeout: None,
            reply_budget: 64 << 20,
            stores_dir: None,
            backup_dir: None,
            max_open_stores: 64,
            auth_lockout: Duration::from_secs(60),
            allow_uids: Vec::new(),
        }
    }
}

/// A bound listener.
pub enum Listener {
    /// A Unix socket and its path (removed at shutdown).
    Unix(tokio::net::UnixListener, PathBuf),
    /// A TCP listener.
    Tcp(tokio::net::TcpListener),
    /// A TCP listener whose connections speak TLS first.
    Tls(tokio::net::TcpListener, tokio_rustls::TlsAcceptor),
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Listener {
    /// Where it listens.
    pub fn describe(&self) -> String {
        match self {
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp:?".into(),
            },
            Listener::Tls(l, _) => match l.local_addr() {
                Ok(a) => format!("tls:{a}"),
                Err(_) => "tls:?".into(),
            },
        }
    }
}

/// Binds a Unix socket at `path` with permission bits `mode` (e.g. `0o600`).
///
/// The directory must exist, belong to this user or root, and not be writable
/// by others unless it has the sticky bit (like `/tmp`). A stale socket left
/// by a dead daemon is replaced; a live one (another daemon answers) or a
/// file that is not a socket is an error.
pub fn bind_unix(path: &Path, mode: u32) -> Result<Listener, IpcError> {
    let setup = |m: String| IpcError::Setup(m);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let meta = std::fs::metadata(&dir).map_err(|e| setup(format!("socket directory {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(setup(format!("{} is not a directory", dir.display())));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(setup(format!(
            "socket directory {} belongs to uid {}, not to this user ({me}) or root",
            dir.display(),
            meta.uid()
        )));
    }
    let bits = meta.permissions().mode();
    if bits & 0o022 != 0 && bits & 0o1000 == 0 {
        return Err(setup(format!(
            "socket directory {} is writable by others (mode {:o}) without the sticky bit",
            dir.display(),
            bits & 0o7777
        )));
    }
    if mode & !0o777 != 0 {
        return Err(setup(format!("socket mode {mode:o} has bits beyond 0777")));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(setup(format!("another daemon is listening on {}", path.display())));
            }
            std::fs::remove_file(path).map_err(|e| setup(format!("removing stale socket {}: {e}", path.display())))?;
        }
        Ok(_) => {
            return Err(setup(format!("{} exists and is not a socket", path.display())));
        }
        Err(_) => {}
    }
    // The socket is created with the mode already in place: no window in
    // which another user could connect.
    // SAFETY: umask only swaps the process's file-creation mask.
    let old = unsafe { libc::umask((!mode & 0o777) as libc::mode_t) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let l = bound.map_err(|e| setup(format!("binding {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| setup(format!("chmod {}: {e}", path.display())))?;
    l.set_nonblocking(true).map_err(IpcError::Io)?;
    let l = tokio::net::UnixListener::from_std(l).map_err(IpcError::Io)?;
    Ok(Listener::Unix(l, path.to_path_buf()))
}

/// Binds plain TCP at `addr`, which must be a loopback address: beyond this
/// machine the token and the memories would travel in cleartext, so a
/// non-loopback address needs TLS ([`bind_tls`]).
pub async fn bind_tcp(addr: &str) -> Result<Listener, IpcError> {
    let l = bind_addr(
        addr,
        false,
        "plain TCP listens on loopback only; beyond this machine use TLS (--tls-cert and --tls-key)",
    )
    .await?;
    Ok(Listener::Tcp(l))
}

/// Binds TCP at `addr` for TLS connections with `acceptor` (see
/// [`crate::tls::acceptor`]). Anything but a loopback address needs
/// `allow_remote`.
pub async fn bind_tls(
    addr: &str,
    allow_remote: bool,
    acceptor: tokio_rustls::TlsAcceptor,
) -> Result<Listener, IpcError> {
    let l = bind_addr(addr, allow_remote, "pass --allow-remote to listen beyond this machine").await?;
    Ok(Listener::Tls(l, acceptor))
}

async fn bind_addr(addr: &str, remote: bool, hint: &str) -> Result<tokio::net::TcpListener, IpcError> {
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| IpcError::Setup(format!("resolving {addr}: {e}")))?
        .collect();
    let Some(first) = addrs.first().copied() else {
        return Err(IpcError::Setup(format!("{addr} resolves to nothing")));
    };
    if !remote && addrs.iter().any(|a| !a.ip().is_loopback()) {
        return Err(IpcError::Setup(format!("{addr} is not a loopback address; {hint}")));
    }
    tokio::net::TcpListener::bind(first)
        .await
        .map_err(|e| IpcError::Setup(format!("binding {first}: {e}")))
}

/// One store the daemon serves (the default one or a named one).
struct Slot<O: StoreOpener> {
    opener: O,
    store: RwLock<Option<Arc<O::Store>>>,
    sessions: AtomicUsize,
}

impl<O: StoreOpener> Slot<O> {
    fn new(opener: O) -> Arc<Self> {
        Arc::new(Slot {
            opener,
            store: RwLock::new(None),
            sessions: AtomicUsize::new(0),
        })
    }

    /// Flushes and closes the store if one is open.
    async fn shut(&self) -> Result<(), IpcError> {
        let store = self.store.write().await.take();
        if let Some(s) = store {
            let what = self.opener.describe();
            match Arc::try_unwrap(s) {
                Ok(s) => self
                    .opener
                    .close(s)
                    .await
                    .map_err(|e| IpcError::Remote(format!("closing {what}: {e}")))?,
                Err(s) => s
                    .flush()
                    .await
                    .map_err(|e| IpcError::Remote(format!("flushing {what}: {e}")))?,
            }
        }
        Ok(())
    }
}

/// The named stores of a daemon started with a stores directory, most
/// recently attached first: when more would be open than the daemon allows,
/// the least recently used stores without a session are closed.
struct Named<O: StoreOpener> {
    dir: PathBuf,
    template: O,
    slots: Mutex<lru::LruCache<String, Arc<Slot<O>>>>,
}

struct Shared<O: StoreOpener> {
    default: Option<Arc<Slot<O>>>,
    named: Option<Named<O>>,
    handshakes: Mutex<()>,
    /// The SHA-256 digest of the shared token, what a presented token's
    /// digest is compared with.
    token_digest: Option<[u8; 32]>,
    /// The SHA-256 digest of the read-only token.
    read_token_digest: Option<[u8; 32]>,
    /// One permit per connection being served.
    connections: Arc<Semaphore>,
    /// Wrong tokens per TCP address, and the addresses locked out.
    failures: AuthFailures,
    options: ServerOptions,
    shutdown: CancellationToken,
}

/// The daemon: its stores and the connections that use them.
pub struct Server<O: StoreOpener> {
    shared: Arc<Shared<O>>,
}

impl<O: StoreOpener> Server<O> {
    /// A server for the store `opener` opens (and for named stores when
    /// `options.stores_dir` is set, opened like `opener`); nothing is opened yet.
    pub fn new(opener: O, options: ServerOptions) -> Self {
        let named = Self::named_part(&opener, &options);
        let default = Some(Slot::new(opener));
        Self::build(default, named, options)
    }

    /// A server of named stores only (in `options.stores_dir`, opened like
    /// `template`): a handshake must name its store.
    pub fn named_only(template: O, options: ServerOptions) -> Result<Self, IpcError> {
        let Some(named) = Self::named_part(&template, &options) else {
            return Err(IpcError::Setup(
                "a server of named stores needs a stores directory".into(),
            ));
        };
        Ok(Self::build(None, Some(named), options))
    }

    fn named_part(template: &O, options: &ServerOptions) -> Option<Named<O>> {
        options.stores_dir.as_ref().map(|dir| Named {
            dir: dir.clone(),
            template: template.clone(),
            slots: Mutex::new(lru::LruCache::unbounded()),
        })
    }

    fn build(default: Option<Arc<Slot<O>>>, named: Option<Named<O>>, options: ServerOptions) -> Self {
        Server {
            shared: Arc::new(Shared {
                default,
                named,
                handshakes: Mutex::new(()),
                token_digest: options.token.as_deref().map(token_digest),
                read_token_digest: options.read_token.as_deref().map(token_digest),
                connections: Arc::new(Semaphore::new(options.max_connections.max(1))),
                failures: AuthFailures::new(options.auth_lockout),
                options,
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// Opens the default store now: with `config` (creating it if absent), or
    /// the existing one. Returns whether a store is open (`false` also when
    /// this server has no default store).
    pub async fn open_store(&self, config: Option<&MemoryConfig>) -> Result<bool> {
        let Some(slot) = &self.shared.default else {
            return Ok(false);
        };
        let mut store = slot.store.write().await;
        let opened = match config {
            Some(c) => {
                c.validate()?;
                Some(slot.opener.open(c).await?)
            }
            None => slot.opener.open_existing().await?,
        };
        let open = opened.is_some();
        if let Some(s) = opened {
            info!(store = %slot.opener.describe(), config = ?s.config(), "store open");
            *store = Some(Arc::new(s));
        }
        Ok(open)
    }

    /// The configuration of the open default store, if one is open.
    pub async fn config(&self) -> Option<MemoryConfig> {
        let slot = self.shared.default.as_ref()?;
        slot.store.read().await.as_ref().map(|s| s.config().clone())
    }

    /// The names of the named stores open now, sorted.
    pub async fn named_stores(&self) -> Vec<String> {
        let Some(named) = &self.shared.named else {
            return Vec::new();
        };
        let mut names: Vec<String> = named.slots.lock().await.iter().map(|(k, _)| k.clone()).collect();
        names.sort();
        names
    }

    /// Connections that have completed their handshake and not left (all stores).
    pub async fn sessions(&self) -> usize {
        let mut n = self
            .shared
            .default
            .as_ref()
            .map_or(0, |s| s.sessions.load(Ordering::SeqCst));
        if let Some(named) = &self.shared.named {
            for (_, slot) in named.slots.lock().await.iter() {
                n += slot.sessions.load(Ordering::SeqCst);
            }
        }
        n
    }

    /// Serves `listeners` until `shutdown` completes, then stops accepting,
    /// lets connections finish the requests they have read, flushes and
    /// closes the store, and removes the Unix socket files.
    pub async fn serve(
        &self,
        listeners: Vec<Listener>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), IpcError> {
        if self.shared.options.token.is_none()
            && listeners
                .iter()
                .any(|l| matches!(l, Listener::Tcp(_) | Listener::Tls(..)))
        {
            return Err(IpcError::Setup(
                "TCP needs a shared token (--token-file or $MEMSTORED_TOKEN)".into(),
            ));
        }
        let tokens = [
            ("shared", &self.shared.options.token),
            ("read-only", &self.shared.options.read_token),
        ];
        for (what, t) in tokens {
            if let Some(t) = t
                && t.len() < MIN_TOKEN_LEN
            {
                return Err(IpcError::Setup(format!(
                    "the {what} token has {} bytes, fewer than {MIN_TOKEN_LEN}: use a random one \
                     (e.g. `openssl rand -hex 16`)",
                    t.len()
                )));
            }
        }
        if self.shared.options.read_token.is_some() && self.shared.options.read_token == self.shared.options.token {
            return Err(IpcError::Setup(
                "the read-only token must differ from the shared token".into(),
            ));
        }
        let tracker = TaskTracker::new();
        let mut sockets = Vec::new();
        for l in listeners {
            info!(listen = %l.describe(), "listening");
            if let Listener::Unix(_, p) = &l {
                sockets.push(p.clone());
            }
            tracker.spawn(accept_loop(self.shared.clone(), l, tracker.clone()));
        }
        shutdown.await;
        info!("shutting down: no new connections; finishing requests in flight");
        self.shared.shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        for p in sockets {
            let _ = std::fs::remove_file(p);
        }
        let mut slots: Vec<Arc<Slot<O>>> = self.shared.default.iter().cloned().collect();
        if let Some(named) = &self.shared.named {
            let mut open = named.slots.lock().await;
            while let Some((_, s)) = open.pop_lru() {
                slots.push(s);
            }
        }
        // Close every store even when one fails; report the first failure.
        let mut first = None;
        for slot in slots {
            if let Err(e) = slot.shut().await {
                warn!(error = %e, "closing a store failed");
                first.get_or_insert(e);
            }
        }
        if let Some(e) = first {
            return Err(e);
        }
        info!("stores flushed and closed");
        Ok(())
    }

    /// Serves one already-connected stream (for tests and embedding).
    pub async fn serve_stream<R, W>(&self, r: R, w: W, needs_token: bool)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        match self.shared.connections.clone().try_acquire_owned() {
            Ok(p) => connection(self.shared.clone(), r, w, needs_token, ("stream".into(), None), p).await,
            Err(_) => refuse_busy(r, w, "stream".into(), self.shared.options.max_connections).await,
        }
    }
}

async fn accept_loop<O: StoreOpener>(shared: Arc<Shared<O>>, listener: Listener, tracker: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            a = accept(&listener) => a,
        };
        let permit = shared.connections.clone().try_acquire_owned();
        match accepted {
            Ok(Accepted::Unix(s)) => {
                let uid = s.peer_cred().map(|c| c.uid());
                let (r, w) = s.into_split();
                let own = own_uid();
                match (permit, uid) {
                    (_, Ok(uid)) if !peer_allowed(uid, own, &shared.options.allow_uids) => {
                        let e = WireError::protocol(
                            ProtocolError::Unauthorized,
                            format!("uid {uid} may not use this daemon (it serves uid {own}; see --allow-uid)"),
                        );
                        tracker.spawn(refuse(r, w, format!("unix uid {uid}"), e))
                    }
                    (_, Err(e)) => {
                        let e = WireError::protocol(
                            ProtocolError::Unauthorized,
                            format!("the peer's credentials could not be read: {e}"),
                        );
                        tracker.spawn(refuse(r, w, "unix".into(), e))
                    }
                    (Ok(p), Ok(uid)) => tracker.spawn(connection(
                        shared.clone(),
                        r,
                        w,
                        false,
                        (format!("unix uid {uid}"), None),
                        p,
                    )),
                    (Err(_), Ok(_)) => tracker.spawn(refuse_busy(r, w, "unix".into(), shared.options.max_connections)),
                };
            }
            Ok(Accepted::Tcp(s, peer)) => {
                let _ = s.set_nodelay(true);
                if let Err(e) = keepalive(&s) {
                    warn!(peer = %peer, error = %e, "could not turn TCP keepalive on");
                }
                let (r, w) = s.into_split();
                match permit {
                    Ok(p) => tracker.spawn(connection(
                        shared.clone(),
                        r,
                        w,
                        true,
                        (peer.to_string(), Some(peer.ip())),
                        p,
                    )),
                    Err(_) => tracker.spawn(refuse_busy(r, w, peer.to_string(), shared.options.max_connections)),
                };
            }
            Ok(Accepted::Tls(s, peer, acceptor)) => {
                let _ = s.set_nodelay(true);
                if let Err(e) = keepalive(&s) {
                    warn!(peer = %peer, error = %e, "could not turn TCP keepalive on");
                }
                let shared = shared.clone();
                tracker.spawn(async move {
                    // The handshake is bounded like a frame: a peer that
                    // starts it and stalls holds nothing for long.
                    let handshake = tokio::time::timeout(shared.options.frame_timeout, acceptor.accept(s)).await;
                    let s = match handshake {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            warn!(peer = %peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            warn!(peer = %peer, "no TLS handshake within the frame timeout: closed");
                            return;
                        }
                    };
                    let (r, w) = tokio::io::split(s);
                    let limit = shared.options.max_connections;
                    match permit {
                        Ok(p) => connection(shared, r, w, true, (format!("tls {peer}"), Some(peer.ip())), p).await,
                        Err(_) => refuse_busy(r, w, format!("tls {peer}"), limit).await,
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
    Tls(tokio::net::TcpStream, std::net::SocketAddr, tokio_rustls::TlsAcceptor),
}

async fn accept(l: &Listener) -> std::io::Result<Accepted> {
    match l {
        Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
        Listener::Tls(l, acceptor) => l.accept().await.map(|(s, a)| Accepted::Tls(s, a, acceptor.clone())),
    }
}

/// Tells a connection over the limit why it is refused, and closes it.
async fn refuse_busy<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(r: R, w: W, peer: String, limit: usize) {
    warn!(peer = %peer, limit, "connection limit reached: refusing a connection");
    let e = WireError::protocol(
        ProtocolError::Busy,
        format!("the daemon serves {limit} connections at most (--max-connections); try again later"),
    );
    refuse(r, w, peer, e).await
}

/// Wrong tokens in a row after which a TCP address is locked out.
pub const AUTH_ATTEMPTS: u32 = 5;

/// Addresses tracked at most; beyond it, entries whose lockout has passed
/// are forgotten first, then the oldest.
const AUTH_TRACKED: usize = 4096;

/// Failed token attempts per TCP address: after [`AUTH_ATTEMPTS`] in a row,
/// the address is refused for the lockout without its token being checked,
/// so a guesser gets a handful of tries a minute.
struct AuthFailures {
    lockout: Duration,
    by_ip: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (u32, std::time::Instant)>>,
}

impl AuthFailures {
    fn new(lockout: Duration) -> Self {
        AuthFailures {
            lockout,
            by_ip: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// How long `ip` stays refused, if it is locked out now.
    fn locked_out(&self, ip: std::net::IpAddr) -> Option<Duration> {
        let map = self.by_ip.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let &(count, last) = map.get(&ip)?;
        let left = self.lockout.checked_sub(last.elapsed())?;
        (count >= AUTH_ATTEMPTS && !left.is_zero()).then_some(left)
    }

    /// Records an attempt: a success forgets the address, a failure counts
    /// (starting afresh once an earlier lockout has passed).
    fn record(&self, ip: std::net::IpAddr, ok: bool) {
        let mut map = self.by_ip.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if ok {
            map.remove(&ip);
            return;
        }
        let now = std::time::Instant::now();
        let entry = map.entry(ip).or_insert((0, now));
        if entry.1.elapsed() >= self.lockout {
            // Failures (and a lockout) older than the lockout are forgotten.
            *entry = (0, now);
        }
        *entry = (entry.0 + 1, now);
        if map.len() > AUTH_TRACKED {
            let lockout = self.lockout;
            map.retain(|_, (_, last)| last.elapsed() < lockout);
            while map.len() > AUTH_TRACKED {
                let Some(oldest) = map.iter().min_by_key(|(_, (_, last))| *last).map(|(k, _)| *k) else {
                    break;
                };
                map.remove(&oldest);
            }
        }
    }
}

/// How often a session checks its frame and idle timeouts.
const CLOCK_TICK: Duration = Duration::from_millis(250);

/// Idle time before a TCP connection's first keepalive probe.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Time between keepalive probes (the kernel gives up after its count).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Turns TCP keepalive on: a peer that vanished without closing (a machine
/// gone, a cable pulled) is detected within minutes and its session ends,
/// instead of holding the store for ever.
fn keepalive(s: &tokio::net::TcpStream) -> std::io::Result<()> {
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    socket2::SockRef::from(s).set_tcp_keepalive(&ka)
}

/// The daemon's effective uid.
fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether a Unix-socket peer running as `uid` may connect to a daemon
/// running as `own`: the same user, or one allowed by `--allow-uid`.
fn peer_allowed(uid: u32, own: u32, allow: &[u32]) -> bool {
    uid == own || allow.contains(&uid)
}

/// Sends `e` to a connection that is refused before its handshake, and
/// closes it. What the client sends meanwhile (its handshake) is read and
/// dropped for a moment, so that its write succeeds and it reads the
/// refusal instead of meeting a broken pipe.
async fn refuse<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(mut r: R, mut w: W, peer: String, e: WireError) {
    info!(peer = %peer, error = ?e, "connection refused");
    let Ok(frame) = protocol::encode_frame(0, &Response::Error(e), HANDSHAKE_MAX_FRAME) else {
        return;
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = w.write_all(&frame).await;
        let _ = w.shutdown().await;
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut sink = [0u8; 4096];
        let mut read = 0;
        while read < HANDSHAKE_MAX_FRAME {
            match r.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

/// Decrements the session count when a session ends.
struct Session<'a>(&'a AtomicUsize);

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A reply on its way to the connection's writer.
enum Outgoing {
    /// An encoded frame.
    Frame(Vec<u8>),
    /// Search or learn results, written from their own buffers.
    Neighbors(NeighborsFrame),
}

impl Outgoing {
    /// Bytes on the wire.
    fn len(&self) -> usize {
        match self {
            Outgoing::Frame(f) => f.len(),
            Outgoing::Neighbors(f) => f.len(),
        }
    }
}

/// The replies of one connection on their way to its writer, with the bytes
/// held for them bounded by the reply budget: each reply holds permits (one
/// per byte, up to the budget) until it is written, taken when it is queued
/// or, for requests whose replies grow with their arguments, reserved before
/// the request runs ([`Replies::reserve`]).
#[derive(Clone)]
struct Replies {
    tx: mpsc::Sender<(Outgoing, Option<OwnedSemaphorePermit>)>,
    room: Arc<Semaphore>,
    budget: usize,
}

impl Replies {
    fn new(budget: usize) -> (Replies, mpsc::Receiver<(Outgoing, Option<OwnedSemaphorePermit>)>) {
        let budget = budget.clamp(1, u32::MAX as usize);
        let (tx, rx) = mpsc::channel(64);
        let room = Arc::new(Semaphore::new(budget));
        (Replies { tx, room, budget }, rx)
    }

    /// Waits until `bytes` (at most the whole budget) are free and holds them.
    async fn reserve(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let n = bytes.clamp(1, self.budget) as u32;
        self.room.clone().acquire_many_owned(n).await.ok()
    }

    /// Queues a reply, with the bytes reserved for it or, without a
    /// reservation, once its own size is free.
    async fn queue(&self, out: Outgoing, reserved: Option<OwnedSemaphorePermit>) {
        let permit = match reserved {
            Some(p) => Some(p),
            None => self.reserve(out.len()).await,
        };
        let _ = self.tx.send((out, permit)).await;
    }
}

async fn send(tx: &Replies, id: u64, r: &Response<'_>, max_frame: usize) {
    send_reserved(tx, id, r, max_frame, None).await
}

async fn send_reserved(
    tx: &Replies,
    id: u64,
    r: &Response<'_>,
    max_frame: usize,
    reserved: Option<OwnedSemaphorePermit>,
) {
    let frame = match protocol::encode_frame(id, r, max_frame) {
        Ok(f) => f,
        Err(e) => match protocol::encode_frame(id, &Response::Error(e), max_frame) {
            Ok(f) => f,
            Err(_) => return,
        },
    };
    tx.queue(Outgoing::Frame(frame), reserved).await;
}

/// Sends search or learn results without encoding them into one buffer
/// (an error frame if they do not fit the frame limit).
async fn send_neighbors(tx: &Replies, id: u64, n: Neighbors, max_frame: usize, reserved: Option<OwnedSemaphorePermit>) {
    match NeighborsFrame::new(id, n, max_frame) {
        Ok(f) => tx.queue(Outgoing::Neighbors(f), reserved).await,
        Err(e) => send_reserved(tx, id, &Response::Error(e), max_frame, reserved).await,
    }
}

/// Serves one connection: the handshake (frames up to
/// [`HANDSHAKE_MAX_FRAME`], within the handshake timeout), then requests
/// (frames up to the daemon's limit), each in its own task. `_permit` is
/// the connection's place under `--max-connections`, held until it closes.
async fn connection<O, R, W>(
    shared: Arc<Shared<O>>,
    r: R,
    mut w: W,
    needs_token: bool,
    peer: (String, Option<std::net::IpAddr>),
    _permit: OwnedSemaphorePermit,
) where
    O: StoreOpener,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (peer, peer_ip) = peer;
    let max_frame = shared.options.max_frame;
    let handshake_frame = max_frame.min(HANDSHAKE_MAX_FRAME);
    let mut frames = FramedRead::new(r, protocol::codec(handshake_frame));
    let (tx, mut rx) = Replies::new(shared.options.reply_budget);
    // A client that stops reading its replies is cut off after the write
    // timeout: its session must not hold the store (or block a restore or a
    // reconfiguration) for ever.
    let stalled = CancellationToken::new();
    let write_timeout = shared.options.write_timeout;
    let writer = {
        let stalled = stalled.clone();
        tokio::spawn(async move {
            while let Some((out, _held)) = rx.recv().await {
                let write = async {
                    match &out {
                        Outgoing::Frame(frame) => w.write_all(frame).await,
                        Outgoing::Neighbors(f) => {
                            for part in f.parts() {
                                w.write_all(&part).await?;
                            }
                            Ok(())
                        }
                    }
                };
                match tokio::time::timeout(write_timeout, write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        stalled.cancel();
                        return;
                    }
                }
            }
            let _ = w.flush().await;
            let _ = w.shutdown().await;
        })
    };

    // The handshake.
    let first = tokio::select! {
        _ = shared.shutdown.cancelled() => None,
        f = tokio::time::timeout(shared.options.handshake_timeout, frames.next()) => Some(f),
    };
    let first = match first {
        None => Err(WireError::protocol(
            ProtocolError::ShuttingDown,
            "the daemon is shutting down",
        )),
        Some(Err(_)) => Err(WireError::protocol(ProtocolError::Sequence, "no handshake in time")),
        Some(Ok(None)) => {
            drop(tx);
            let _ = writer.await;
            return;
        }
        Some(Ok(Some(Err(e)))) => Err(frame_error(&e, handshake_frame)),
        Some(Ok(Some(Ok(f)))) => Ok(f.freeze()),
    };
    let accepted = match first {
        Ok(f) => handshake(&shared, &f, needs_token, peer_ip).await,
        Err(e) => Err(e),
    };
    let (config, slot, read_only) = match accepted {
        Ok(c) => c,
        Err(e) => {
            info!(peer = %peer, error = ?e, "handshake refused");
            send(&tx, 0, &Response::Error(e), max_frame).await;
            drop(tx);
            let _ = writer.await;
            return;
        }
    };
    let session = Session(&slot.sessions);
    frames.decoder_mut().set_max_frame_length(max_frame);
    debug!(peer = %peer, "session started");
    send(
        &tx,
        0,
        &Response::Welcome {
            version: PROTOCOL_VERSION,
            config: WireConfig::from(&config),
            max_frame: max_frame as u64,
        },
        max_frame,
    )
    .await;

    let permits = Arc::new(Semaphore::new(shared.options.max_in_flight.max(1)));
    let mut in_flight = JoinSet::new();
    let mut goodbye = None;
    // What the clock watches: since when the read buffer has held part of a
    // frame, and since when the session has had nothing to do.
    let (frame_timeout, idle_timeout) = (shared.options.frame_timeout, shared.options.idle_timeout);
    let mut partial_since: Option<tokio::time::Instant> = None;
    let mut idle_since = tokio::time::Instant::now();
    let mut clock = tokio::time::interval(CLOCK_TICK.min(frame_timeout));
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => break,
            _ = stalled.cancelled() => {
                info!(peer = %peer, "the client stopped reading its replies: closing the connection");
                break;
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {
                idle_since = tokio::time::Instant::now();
                continue;
            }
            f = frames.next() => f,
            now = clock.tick() => {
                match (frames.read_buffer().is_empty(), partial_since) {
                    (true, _) => partial_since = None,
                    (false, None) => partial_since = Some(now),
                    (false, Some(since)) if now.duration_since(since) >= frame_timeout => {
                        info!(peer = %peer, "a frame stopped arriving: closing the connection");
                        let e = WireError::protocol(
                            ProtocolError::Timeout,
                            format!("no complete frame within {frame_timeout:?} of its first bytes"),
                        );
                        send(&tx, 0, &Response::Error(e), max_frame).await;
                        break;
                    }
                    (false, Some(_)) => {}
                }
                if let Some(idle) = idle_timeout
                    && in_flight.is_empty()
                    && partial_since.is_none()
                    && now.duration_since(idle_since) >= idle
                {
                    info!(peer = %peer, "the session was idle: closing the connection");
                    let e = WireError::protocol(
                        ProtocolError::Timeout,
                        format!("no request for {idle:?}: the daemon closed the session"),
                    );
                    send(&tx, 0, &Response::Error(e), max_frame).await;
                    break;
                }
                continue;
            }
        };
        partial_since = None;
        idle_since = tokio::time::Instant::now();
        match next {
            None => break,
            Some(Err(e)) => {
                let e = frame_error(&e, max_frame);
                info!(peer = %peer, error = ?e, "closing the connection");
                send(&tx, 0, &Response::Error(e), max_frame).await;
                break;
            }
            Some(Ok(frame)) => {
                let frame = frame.freeze();
                let (id, kind) = protocol::peek(&frame);
                if kind == Some(GOODBYE) {
                    goodbye = Some(id);
                    break;
                }
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let (shared, slot, tx) = (shared.clone(), slot.clone(), tx.clone());
                in_flight.spawn(async move {
                    let _permit = permit;
                    // A request that panics gets an error reply, so its
                    // caller never waits for an answer that cannot come.
                    let run = std::panic::AssertUnwindSafe(handle(&shared, &slot, frame, &tx, read_only));
                    if run.catch_unwind().await.is_err() {
                        warn!(request = id, "a request panicked");
                        let e = WireError::Storage(format!("request {id} failed inside the daemon (a panic)"));
                        send(&tx, id, &Response::Error(e), shared.options.max_frame).await;
                    }
                });
            }
        }
    }
    while in_flight.join_next().await.is_some() {}
    drop(session);
    if let Some(id) = goodbye {
        send(&tx, id, &Response::Done, max_frame).await;
    }
    debug!(peer = %peer, "session ended");
    drop(tx);
    let _ = writer.await;
}

fn frame_error(e: &std::io::Error, max_frame: usize) -> WireError {
    let msg = e.to_string();
    if msg.contains("frame size too big") {
        WireError::protocol(
            ProtocolError::TooLarge,
            format!("frame over the {max_frame}-byte limit"),
        )
    } else {
        WireError::protocol(ProtocolError::Malformed, format!("reading a frame: {msg}"))
    }
}

async fn handshake<O: StoreOpener>(
    shared: &Shared<O>,
    frame: &Bytes,
    needs_token: bool,
    peer_ip: Option<std::net::IpAddr>,
) -> Result<(MemoryConfig, Arc<Slot<O>>, bool), WireError> {
    let (_, req): (u64, Request) = match protocol::decode_frame(frame) {
        Ok(r) => r,
        Err(e) => {
            // A client of another version may not decode; say so when it is one.
            if let Ok((_, (_kind, magic, version))) = postcard::from_bytes::<(u64, (u32, [u8; 4], u32))>(frame)
                && magic == MAGIC
                && version != PROTOCOL_VERSION
            {
                return Err(version_error(version));
            }
            let detail = match e {
                WireError::Protocol { message, .. } => message,
                other => format!("{other:?}"),
            };
            return Err(WireError::protocol(
                ProtocolError::Malformed,
                format!("not a memstore handshake ({detail})"),
            ));
        }
    };
    let Request::Hello(hello) = req else {
        return Err(WireError::protocol(
            ProtocolError::Sequence,
            "the first frame must be the handshake",
        ));
    };
    if hello.magic != MAGIC {
        return Err(WireError::protocol(
            ProtocolError::Version,
            "not a memstore client (bad magic)",
        ));
    }
    if hello.version != PROTOCOL_VERSION {
        return Err(version_error(hello.version));
    }
    let mut read_only = false;
    if needs_token {
        if let Some(ip) = peer_ip
            && let Some(left) = shared.failures.locked_out(ip)
        {
            return Err(WireError::protocol(
                ProtocolError::Unauthorized,
                format!(
                    "too many wrong tokens from {ip}: refused for {} s more",
                    left.as_secs() + 1
                ),
            ));
        }
        let got = hello.token.as_deref().map(token_digest);
        let matches = |want: &Option<[u8; 32]>| match (want, &got) {
            (Some(want), Some(got)) => constant_time_eq(want, got),
            _ => false,
        };
        let (full, read) = (matches(&shared.token_digest), matches(&shared.read_token_digest));
        if let Some(ip) = peer_ip {
            shared.failures.record(ip, full || read);
        }
        if !full && !read {
            return Err(WireError::protocol(
                ProtocolError::Unauthorized,
                "missing or wrong token",
            ));
        }
        read_only = !full;
    }
    let requested = hello.config.map(|c| c.to_config()).transpose()?;
    if let Some(c) = &requested {
        c.validate().map_err(|e| WireError::from(&e))?;
    }
    if let Some(name) = &hello.store {
        protocol::check_store_name(name)?;
    }
    let _one_at_a_time = shared.handshakes.lock().await;
    if shared.shutdown.is_cancelled() {
        return Err(WireError::protocol(
            ProtocolError::ShuttingDown,
            "the daemon is shutting down",
        ));
    }
    match &hello.store {
        None => {
            let Some(slot) = &shared.default else {
                return Err(WireError::protocol(
                    ProtocolError::StoreName,
                    "this daemon serves named stores only: the handshake must name one",
                ));
            };
            let config = attach(slot, requested).await?;
            Ok((config, slot.clone(), read_only))
        }
        Some(name) => {
            let Some(named) = &shared.named else {
                return Err(WireError::protocol(
                    ProtocolError::StoreName,
                    format!(
                        "store {name:?}: this daemon serves one store and no named ones (start it with --stores DIR)"
                    ),
                ));
            };
            let known = named.slots.lock().await.get(name).cloned();
            let slot = match known {
                Some(slot) => slot,
                None => {
                    make_room(named, shared.options.max_open_stores).await?;
                    Slot::new(named.template.named(&named.dir, name))
                }
            };
            let config = attach(&slot, requested).await?;
            // Kept once its store is open (a refused handshake adds nothing).
            named.slots.lock().await.put(name.clone(), slot.clone());
            Ok((config, slot, read_only))
        }
    }
}

/// Closes the least recently used named stores that no session uses until
/// one more may open under `max` (the caller holds the handshake lock, so
/// no session attaches meanwhile); refuses with [`ProtocolError::Busy`]
/// when every open store is in use.
async fn make_room<O: StoreOpener>(named: &Named<O>, max: usize) -> Result<(), WireError> {
    loop {
        let victim = {
            let slots = named.slots.lock().await;
            if slots.len() < max.max(1) {
                return Ok(());
            }
            // `iter` goes from the most to the least recently used.
            slots
                .iter()
                .rev()
                .find(|(_, s)| s.sessions.load(Ordering::SeqCst) == 0)
                .map(|(k, s)| (k.clone(), s.clone()))
        };
        let Some((name, slot)) = victim else {
            return Err(WireError::protocol(
                ProtocolError::Busy,
                format!("{max} named stores are open, each with a session (--max-open-stores); try again later"),
            ));
        };
        named.slots.lock().await.pop(&name);
        slot.shut()
            .await
            .map_err(|e| WireError::Storage(format!("closing the idle store {name:?}: {e}")))?;
        info!(store = %name, "closed an idle named store to make room");
    }
}

/// Opens, checks or reconfigures `slot`'s store for a new session and counts
/// the session (the caller holds the handshake lock).
async fn attach<O: StoreOpener>(slot: &Slot<O>, requested: Option<MemoryConfig>) -> Result<MemoryConfig, WireError> {
    let mut store = slot.store.write().await;
    let wire = |e: memstore_api::Error| WireError::from(&e);
    match (store.as_ref(), requested) {
        (None, None) => match slot.opener.open_existing().await.map_err(wire)? {
            Some(s) => *store = Some(Arc::new(s)),
            None => {
                return Err(WireError::protocol(
                    ProtocolError::NoStore,
                    format!(
                        "no store exists yet at {}: connect with a configuration to create it",
                        slot.opener.describe()
                    ),
                ));
            }
        },
        (None, Some(c)) => {
            *store = Some(Arc::new(slot.opener.open(&c).await.map_err(wire)?));
            info!(store = %slot.opener.describe(), config = ?c, "store open");
        }
        (Some(s), Some(c)) => {
            c.check_compatible(s.config()).map_err(wire)?;
            if s.config() != &c {
                let others = slot.sessions.load(Ordering::SeqCst);
                if others > 0 {
                    return Err(WireError::protocol(
                        ProtocolError::ConfigInUse,
                        format!(
                            "the store runs with {:?}; its tunable fields change only when no other session is connected ({others} are)",
                            s.config()
                        ),
                    ));
                }
                let Some(old) = store.take() else {
                    return Err(WireError::protocol(ProtocolError::NoStore, "no store"));
                };
                let old = Arc::try_unwrap(old).map_err(|old| {
                    // Still referenced by a finishing request: keep it.
                    *store = Some(old);
                    WireError::protocol(ProtocolError::ConfigInUse, "the store is still busy; try again")
                })?;
                slot.opener.close(old).await.map_err(wire)?;
                let reopened = match slot.opener.open(&c).await {
                    Ok(s) => s,
                    Err(e) => {
                        // Keep serving the store as it was.
                        if let Ok(Some(s)) = slot.opener.open_existing().await {
                            *store = Some(Arc::new(s));
                        }
                        return Err(wire(e));
                    }
                };
                info!(store = %slot.opener.describe(), config = ?c, "store reopened with new tunables");
                *store = Some(Arc::new(reopened));
            }
        }
        (Some(_), None) => {}
    }
    let config = store
        .as_ref()
        .map(|s| s.config().clone())
        .ok_or_else(|| WireError::protocol(ProtocolError::NoStore, "no store"))?;
    slot.sessions.fetch_add(1, Ordering::SeqCst);
    Ok(config)
}

fn version_error(v: u32) -> WireError {
    WireError::protocol(
        ProtocolError::Version,
        format!("client speaks protocol version {v}, this daemon speaks {PROTOCOL_VERSION}"),
    )
}

/// The SHA-256 digest of a token: tokens are compared by digest, so the
/// comparison takes the same time whatever their lengths.
fn token_digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// Whether two digests are equal, in time that does not depend on where
/// they differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// What a request produced, owned so that its reply can borrow it.
enum Outcome {
    Neighbors(Neighbors),
    Ids(Vec<u64>),
    Memories(Vec<Memory>),
    Count(u64),
    Done,
    Stats(Stats),
}

async fn handle<O: StoreOpener>(shared: &Shared<O>, slot: &Slot<O>, frame: Bytes, tx: &Replies, read_only: bool) {
    let max_frame = shared.options.max_frame;
    let (id, req): (u64, Request) = match protocol::decode_frame(&frame) {
        Ok(r) => r,
        Err(e) => {
            debug!(error = ?e, "undecodable request");
            send(tx, protocol::peek(&frame).0, &Response::Error(e), max_frame).await;
            return;
        }
    };
    let reads = matches!(
        req,
        Request::Search { .. } | Request::Get(_) | Request::Ids | Request::Len | Request::Stats | Request::Goodbye
    );
    if read_only && !reads {
        let e = WireError::protocol(
            ProtocolError::Unauthorized,
            "this connection's token is read-only: it may search, get and read counts and statistics",
        );
        send(tx, id, &Response::Error(e), max_frame).await;
        return;
    }
    let store = slot.store.read().await.clone();
    // The reply's bytes are reserved before the request runs, so that the
    // requests of a client that reads slowly wait instead of piling up
    // replies in memory.
    let reserved = match &store {
        Some(s) => tx.reserve(reply_bound(s.config(), &req)).await,
        None => None,
    };
    let outcome = match (store, req) {
        (Some(s), Request::Backup { path }) => backup(&shared.options, &slot.opener, s.as_ref(), &path).await,
        (Some(s), Request::Restore { path }) => {
            drop(s);
            restore(shared, slot, &path).await
        }
        (Some(s), req) => match (reads, shared.options.request_timeout) {
            (true, Some(limit)) => match tokio::time::timeout(limit, execute(s.as_ref(), req, max_frame)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(WireError::protocol(
                    ProtocolError::Timeout,
                    format!("the read was not answered within {limit:?} (--request-timeout) and was cancelled"),
                )),
            },
            _ => execute(s.as_ref(), req, max_frame).await,
        },
        (None, _) => Err(WireError::protocol(ProtocolError::NoStore, "no store is open")),
    };
    let r = reserved;
    match outcome {
        Ok(Outcome::Neighbors(n)) => send_neighbors(tx, id, n, max_frame, r).await,
        Ok(Outcome::Ids(ids)) => send_reserved(tx, id, &Response::Ids(ids.as_slice().into()), max_frame, r).await,
        Ok(Outcome::Memories(ms)) => {
            let ms = ms.iter().map(WireMemory::from_memory).collect();
            send_reserved(tx, id, &Response::Memories(ms), max_frame, r).await
        }
        Ok(Outcome::Count(n)) => send_reserved(tx, id, &Response::Count(n), max_frame, r).await,
        Ok(Outcome::Done) => send_reserved(tx, id, &Response::Done, max_frame, r).await,
        Ok(Outcome::Stats(s)) => send_reserved(tx, id, &Response::Stats(WireStats::from(&s)), max_frame, r).await,
        Err(e) => send_reserved(tx, id, &Response::Error(e), max_frame, r).await,
    }
}

/// A bound of the bytes of a request's reply where it grows with the
/// request's arguments (search and learn: rows × k neighbours; get: the
/// memories named), and a small constant for the rest. Tags can make a
/// reply larger than its bound; the reply then holds only its bound.
fn reply_bound(config: &MemoryConfig, req: &Request<'_>) -> usize {
    let rows = |floats: &protocol::F32s<'_>, dim: u64| (floats.0.len() / 4) / usize_of(dim).unwrap_or(1).max(1);
    let bound = match req {
        Request::Search { queries, dim, k, .. } => slots_bytes(config, rows(queries, *dim), *k),
        Request::Learn { batch, k, .. } => slots_bytes(config, rows(&batch.keys, batch.key_dim), *k),
        Request::Get(ids) => slots_bytes(config, ids.len(), 1),
        _ => 0,
    };
    usize::try_from(bound).unwrap_or(usize::MAX).saturating_add(64)
}

/// Bytes of `rows` × `k` memories in a reply (key and value floats and a
/// little bookkeeping each): the bound that both the frame check and the
/// reply budget use.
fn slots_bytes(config: &MemoryConfig, rows: usize, k: u64) -> u128 {
    let per_slot = 4 * (config.key_dim + config.value_dim) + 10;
    (rows as u128) * (k as u128) * (per_slot as u128)
}

/// The file `path` names, resolved (links followed) and checked to lie in
/// the backup directory: a client may make the daemon write or read store
/// files there and nowhere else. `exists`: the file must exist (a restore's
/// source); otherwise its directory must (a backup's destination).
fn confine(options: &ServerOptions, path: &str, what: &str, exists: bool) -> Result<PathBuf, WireError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(WireError::Shape(format!("{what} path {path:?} must be absolute")));
    }
    let Some(dir) = &options.backup_dir else {
        return Err(WireError::protocol(
            ProtocolError::Unauthorized,
            format!("{what} is off: start memstored with --backup-dir DIR"),
        ));
    };
    let shape = |m: String| WireError::Shape(format!("{what} path {path:?}: {m}"));
    let dir = std::fs::canonicalize(dir).map_err(|e| shape(format!("the backup directory: {e}")))?;
    let resolved = if exists {
        std::fs::canonicalize(p).map_err(|e| shape(e.to_string()))?
    } else {
        let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
            return Err(shape("names no file".into()));
        };
        std::fs::canonicalize(parent)
            .map_err(|e| shape(e.to_string()))?
            .join(name)
    };
    if !resolved.starts_with(&dir) {
        return Err(WireError::protocol(
            ProtocolError::Unauthorized,
            format!("{what} path {path:?} is outside the backup directory {}", dir.display()),
        ));
    }
    Ok(resolved)
}

/// Writes a copy of the store to `path` (absolute, new, in an existing
/// directory inside the backup directory).
async fn backup<O: StoreOpener>(
    options: &ServerOptions,
    opener: &O,
    store: &O::Store,
    path: &str,
) -> Result<Outcome, WireError> {
    let p = confine(options, path, "backup", false)?;
    let p = p.as_path();
    opener.backup(store, p).await.map_err(|e| WireError::from(&e))?;
    info!(path = %p.display(), "backup written");
    Ok(Outcome::Done)
}

/// Replaces the store with the backup at `path`, when the asking session is
/// the only one of that store and no other request holds the store.
async fn restore<O: StoreOpener>(shared: &Shared<O>, slot: &Slot<O>, path: &str) -> Result<Outcome, WireError> {
    let p = confine(&shared.options, path, "restore", true)?;
    let p = p.as_path();
    let wire = |e: memstore_api::Error| WireError::from(&e);
    let _one_at_a_time = shared.handshakes.lock().await;
    let sessions = slot.sessions.load(Ordering::SeqCst);
    if sessions > 1 {
        return Err(WireError::protocol(
            ProtocolError::ConfigInUse,
            format!("a restore replaces the store: it needs the only session ({sessions} are connected)"),
        ));
    }
    let mut store = slot.store.write().await;
    let Some(old) = store.take() else {
        return Err(WireError::protocol(ProtocolError::NoStore, "no store is open"));
    };
    let old = Arc::try_unwrap(old).map_err(|old| {
        *store = Some(old);
        WireError::protocol(ProtocolError::ConfigInUse, "the store is still busy; try again")
    })?;
    slot.opener.close(old).await.map_err(wire)?;
    match slot.opener.restore(p).await {
        Ok(s) => {
            info!(store = %slot.opener.describe(), from = %p.display(), "store restored from a backup");
            *store = Some(Arc::new(s));
            Ok(Outcome::Done)
        }
        Err(e) => {
            // Keep serving the store as it was.
            if let Ok(Some(s)) = slot.opener.open_existing().await {
                *store = Some(Arc::new(s));
            }
            Err(wire(e))
        }
    }
}

/// Owned rows of a batch from the wire.
struct Rows {
    keys: Vec<f32>,
    key_dim: usize,
    values: Vec<f32>,
    value_dim: usize,
}

impl Rows {
    fn of(b: &WireBatch<'_>) -> Result<Rows, WireError> {
        Ok(Rows {
            keys: b.keys.to_vec("keys")?,
            key_dim: usize_of(b.key_dim)?,
            values: b.values.to_vec("values")?,
            value_dim: usize_of(b.value_dim)?,
        })
    }

    fn batch<'a>(&'a self, tags: &'a WireTags<'_>) -> Result<Batch<'a>> {
        let tags = match tags {
            WireTags::None => Tags::None,
            WireTags::Same(t) => Tags::Same(t.as_ref()),
            WireTags::PerRow(t) => Tags::PerRow(t.as_ref()),
        };
        Ok(Batch::new(
            Vectors::new(&self.keys, self.key_dim)?,
            Vectors::new(&self.values, self.value_dim)?,
        )
        .with_tags(tags))
    }
}

/// Refuses a search, learn or get whose reply could not fit in a frame,
/// before the store allocates it.
fn check_reply_size(config: &MemoryConfig, rows: usize, k: u64, max_frame: usize) -> Result<(), WireError> {
    let bytes = slots_bytes(config, rows, k);
    if bytes > max_frame as u128 {
        return Err(WireError::protocol(
            ProtocolError::TooLarge,
            format!("{rows} rows x k = {k} would need a reply of {bytes} bytes, over the {max_frame}-byte frame limit"),
        ));
    }
    Ok(())
}

async fn execute<S: MemoryStore + ?Sized>(s: &S, req: Request<'_>, max_frame: usize) -> Result<Outcome, WireError> {
    let api = |e: memstore_api::Error| WireError::from(&e);
    let out = match req {
        Request::Hello(_) => {
            return Err(WireError::protocol(ProtocolError::Sequence, "a second handshake"));
        }
        Request::Goodbye => Outcome::Done,
        Request::Backup { .. } | Request::Restore { .. } => {
            return Err(WireError::protocol(
                ProtocolError::Sequence,
                "backup and restore are handled by the daemon",
            ));
        }
        Request::Search {
            queries,
            dim,
            k,
            filter,
        } => {
            let q = queries.to_vec("queries")?;
            let q = Vectors::new(&q, usize_of(dim)?).map_err(api)?;
            check_reply_size(s.config(), q.len(), k, max_frame)?;
            let filter = filter.map(Into::into);
            Outcome::Neighbors(s.search(q, usize_of(k)?, filter.as_ref()).await.map_err(api)?)
        }
        Request::Insert { batch, tick } => {
            let rows = Rows::of(&batch)?;
            let b = rows.batch(&batch.tags).map_err(api)?;
            Outcome::Ids(s.insert(b, tick).await.map_err(api)?)
        }
        Request::Learn { batch, tick, k } => {
            let rows = Rows::of(&batch)?;
            let b = rows.batch(&batch.tags).map_err(api)?;
            check_reply_size(s.config(), b.len(), k, max_frame)?;
            Outcome::Neighbors(s.learn(b, tick, usize_of(k)?).await.map_err(api)?)
        }
        Request::Get(ids) => {
            // A repeated id is answered repeatedly: the reply is bounded
            // before the store reads it (tags can only add to it).
            check_reply_size(s.config(), ids.len(), 1, max_frame)?;
            Outcome::Memories(s.get(&ids).await.map_err(api)?)
        }
        Request::Delete(ids) => Outcome::Count(s.delete(&ids).await.map_err(api)? as u64),
        Request::UpdateValues { ids, deltas, dim } => {
            let d = deltas.to_vec("deltas")?;
            let d = Vectors::new(&d, usize_of(dim)?).map_err(api)?;
            s.update_values(&ids, d).await.map_err(api)?;
            Outcome::Done
        }
        Request::Touch { ids, tick } => {
            s.touch(&ids, tick).await.map_err(api)?;
            Outcome::Done
        }
        Request::Evict { target_len } => Outcome::Count(s.evict(usize_of(target_len)?).await.map_err(api)? as u64),
        Request::Apply(b) => {
            s.apply(&b.to_batch()?).await.map_err(api)?;
            Outcome::Done
        }
        Request::ApplyAll(wire) => {
            let batches = wire
                .iter()
                .map(protocol::WireChangeBatch::to_batch)
                .collect::<Result<Vec<_>, _>>()?;
            s.apply_all(&batches).await.map_err(api)?;
            Outcome::Done
        }
        Request::Ids => Outcome::Ids(s.ids().await.map_err(api)?),
        Request::Len => Outcome::Count(s.len().await.map_err(api)? as u64),
        Request::Stats => Outcome::Stats(s.stats().await.map_err(api)?),
        Request::Flush => {
            s.flush().await.map_err(api)?;
            Outcome::Done
        }
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Hello;

    #[test]
    fn goodbye_has_its_wire_number() {
        let f = protocol::encode_frame(5, &Request::Goodbye, 1 << 20).unwrap();
        assert_eq!(protocol::peek(&f[4..]), (5, Some(GOODBYE)));
        let f = protocol::encode_frame(5, &Request::Len, 1 << 20).unwrap();
        assert_ne!(protocol::peek(&f[4..]).1, Some(GOODBYE));
    }

    /// A store whose `len` panics: everything else is the reference store's.
    struct PanicStore(memstore_api::InMemoryStore);

    #[async_trait]
    impl MemoryStore for PanicStore {
        fn config(&self) -> &MemoryConfig {
            self.0.config()
        }
        async fn search(&self, q: Vectors<'_>, k: usize, f: Option<&memstore_api::TagFilter>) -> Result<Neighbors> {
            self.0.search(q, k, f).await
        }
        async fn insert(&self, b: Batch<'_>, t: memstore_api::Tick) -> Result<Vec<u64>> {
            self.0.insert(b, t).await
        }
        async fn get(&self, ids: &[u64]) -> Result<Vec<Memory>> {
            self.0.get(ids).await
        }
        async fn delete(&self, ids: &[u64]) -> Result<usize> {
            self.0.delete(ids).await
        }
        async fn update_values(&self, ids: &[u64], d: Vectors<'_>) -> Result<()> {
            self.0.update_values(ids, d).await
        }
        async fn touch(&self, ids: &[u64], t: memstore_api::Tick) -> Result<()> {
            self.0.touch(ids, t).await
        }
        async fn learn(&self, b: Batch<'_>, t: memstore_api::Tick, k: usize) -> Result<Neighbors> {
            self.0.learn(b, t, k).await
        }
        async fn evict(&self, n: usize) -> Result<usize> {
            self.0.evict(n).await
        }
        async fn apply(&self, b: &memstore_api::ChangeBatch) -> Result<()> {
            self.0.apply(b).await
        }
        async fn ids(&self) -> Result<Vec<u64>> {
            self.0.ids().await
        }
        async fn len(&self) -> Result<usize> {
            panic!("a bug in the store")
        }
        async fn stats(&self) -> Result<Stats> {
            // A read that takes far too long.
            tokio::time::sleep(Duration::from_secs(30)).await;
            self.0.stats().await
        }
        async fn flush(&self) -> Result<()> {
            self.0.flush().await
        }
    }

    #[derive(Clone)]
    struct PanicOpener;

    #[async_trait]
    impl StoreOpener for PanicOpener {
        type Store = PanicStore;
        fn describe(&self) -> String {
            "a store that panics".into()
        }
        async fn open(&self, config: &MemoryConfig) -> Result<PanicStore> {
            Ok(PanicStore(memstore_api::InMemoryStore::new(config.clone())?))
        }
        async fn open_existing(&self) -> Result<Option<PanicStore>> {
            Ok(None)
        }
        async fn close(&self, _store: PanicStore) -> Result<()> {
            Ok(())
        }
        async fn backup(&self, _store: &PanicStore, _path: &Path) -> Result<()> {
            Ok(())
        }
        async fn restore(&self, _from: &Path) -> Result<PanicStore> {
            Err(memstore_api::Error::Corrupt("no restore here".into()))
        }
        fn named(&self, _dir: &Path, _name: &str) -> Self {
            PanicOpener
        }
    }

    /// What a reply frame said.
    #[derive(Debug)]
    enum Got {
        Welcome,
        Ids,
        Error(WireError),
        Other,
    }

    /// Reads one frame: its request id and what it said.
    async fn reply<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> (u64, Got) {
        use tokio::io::AsyncReadExt;
        let mut len = [0u8; 4];
        r.read_exact(&mut len).await.unwrap();
        let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
        r.read_exact(&mut payload).await.unwrap();
        let (id, resp): (u64, Response) = protocol::decode_frame(&payload).unwrap();
        let got = match resp {
            Response::Welcome { .. } => Got::Welcome,
            Response::Ids(_) => Got::Ids,
            Response::Error(e) => Got::Error(e),
            _ => Got::Other,
        };
        (id, got)
    }

    /// A session with a daemon serving [`PanicOpener`] with `options`, its
    /// handshake done: the client's read and write halves and the serving
    /// task.
    async fn session(
        options: ServerOptions,
    ) -> (
        tokio::io::ReadHalf<tokio::io::DuplexStream>,
        tokio::io::WriteHalf<tokio::io::DuplexStream>,
        tokio::task::JoinHandle<()>,
    ) {
        let server = Arc::new(Server::new(PanicOpener, options));
        let (client, daemon) = tokio::io::duplex(1 << 16);
        let (dr, dw) = tokio::io::split(daemon);
        let s = server.clone();
        let serving = tokio::spawn(async move { s.serve_stream(dr, dw, false).await });
        let (mut cr, mut cw) = tokio::io::split(client);
        let config = MemoryConfig::new(4, 2);
        let hello = Request::Hello(Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            token: None,
            config: Some(WireConfig::from(&config)),
            store: None,
        });
        cw.write_all(&protocol::encode_frame(0, &hello, 1 << 16).unwrap())
            .await
            .unwrap();
        assert!(matches!(reply(&mut cr).await, (0, Got::Welcome)));
        (cr, cw, serving)
    }

    /// A read that runs past `request_timeout` is cancelled with a typed
    /// timeout, and the session goes on serving.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_past_the_request_timeout_is_cancelled() {
        let options = ServerOptions {
            request_timeout: Some(Duration::from_millis(200)),
            ..ServerOptions::default()
        };
        let (mut cr, mut cw, serving) = session(options).await;
        let t = std::time::Instant::now();
        cw.write_all(&protocol::encode_frame(5, &Request::Stats, 1 << 16).unwrap())
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(10), reply(&mut cr)).await {
            Ok((5, Got::Error(WireError::Protocol { kind, .. }))) => assert_eq!(kind, ProtocolError::Timeout),
            Ok((id, r)) => panic!("request {id}: {r:?}"),
            Err(_) => panic!("no reply to the slow read"),
        }
        assert!(t.elapsed() < Duration::from_secs(5), "answered after {:?}", t.elapsed());
        cw.write_all(&protocol::encode_frame(6, &Request::Ids, 1 << 16).unwrap())
            .await
            .unwrap();
        assert!(matches!(reply(&mut cr).await, (6, Got::Ids)));
        drop(cw);
        drop(cr);
        tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .expect("the session ends")
            .unwrap();
    }

    /// A request whose handler panics gets an error reply (its caller does
    /// not wait forever), and the session goes on serving.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_request_gets_an_error_reply() {
        let (mut cr, mut cw, serving) = session(ServerOptions::default()).await;
        cw.write_all(&protocol::encode_frame(7, &Request::Len, 1 << 16).unwrap())
            .await
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), reply(&mut cr)).await;
        match answer {
            Ok((7, Got::Error(WireError::Storage(m)))) => assert!(m.contains("panic"), "{m}"),
            Ok((id, r)) => panic!("request {id}: {r:?}"),
            Err(_) => panic!("no reply to the request that panicked"),
        }
        cw.write_all(&protocol::encode_frame(8, &Request::Ids, 1 << 16).unwrap())
            .await
            .unwrap();
        assert!(matches!(reply(&mut cr).await, (8, Got::Ids)));
        drop(cw);
        drop(cr);
        tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .unwrap()
            .unwrap();
    }

    /// Backup and restore paths must lie in the backup directory (links
    /// followed), and are refused when there is none.
    #[test]
    fn backup_paths_are_confined() {
        let root = tempfile::tempdir().unwrap();
        let inside = root.path().join("backups");
        let outside = root.path().join("elsewhere");
        std::fs::create_dir_all(inside.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(inside.join("a.db"), b"x").unwrap();
        std::fs::write(outside.join("b.db"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, inside.join("link")).unwrap();
        let off = ServerOptions::default();
        let on = ServerOptions {
            backup_dir: Some(inside.clone()),
            ..ServerOptions::default()
        };
        let s = |p: &Path| p.to_str().unwrap().to_string();
        let kind = |r: Result<PathBuf, WireError>| match r {
            Ok(_) => "ok",
            Err(WireError::Protocol {
                kind: ProtocolError::Unauthorized,
                ..
            }) => "refused",
            Err(WireError::Shape(_)) => "bad path",
            Err(e) => panic!("{e:?}"),
        };
        let (backup, restore) = (("backup", false), ("restore", true));
        let cases = [
            (&off, s(&inside.join("new.db")), backup, "refused"),
            (&on, s(&inside.join("new.db")), backup, "ok"),
            (&on, s(&inside.join("sub/new.db")), backup, "ok"),
            (&on, s(&inside.join("a.db")), restore, "ok"),
            (&on, s(&outside.join("new.db")), backup, "refused"),
            (&on, s(&outside.join("b.db")), restore, "refused"),
            (&on, s(&inside.join("../elsewhere/new.db")), backup, "refused"),
            (&on, s(&inside.join("link/b.db")), restore, "refused"),
            (&on, s(&inside.join("link/new.db")), backup, "refused"),
            (&on, "rel.db".to_string(), backup, "bad path"),
            (&on, s(&inside.join("missing.db")), restore, "bad path"),
        ];
        for (options, path, (what, exists), want) in cases {
            assert_eq!(kind(confine(options, &path, what, exists)), want, "{what} {path}");
        }
    }

    #[test]
    fn peers_of_other_users_are_refused_unless_allowed() {
        assert!(peer_allowed(1000, 1000, &[]));
        assert!(!peer_allowed(1001, 1000, &[]));
        assert!(!peer_allowed(0, 1000, &[]), "root is another user too");
        assert!(peer_allowed(1001, 1000, &[7, 1001]));
    }

    #[test]
    fn wrong_tokens_lock_an_address_out() {
        let f = AuthFailures::new(Duration::from_millis(300));
        let (a, b): (std::net::IpAddr, std::net::IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..AUTH_ATTEMPTS - 1 {
            f.record(a, false);
        }
        assert!(f.locked_out(a).is_none(), "under the limit");
        f.record(a, true);
        for _ in 0..AUTH_ATTEMPTS - 1 {
            f.record(a, false);
        }
        assert!(f.locked_out(a).is_none(), "a success starts the count afresh");
        f.record(a, false);
        assert!(f.locked_out(a).is_some(), "the fifth wrong token in a row");
        assert!(f.locked_out(b).is_none(), "per address");
        std::thread::sleep(Duration::from_millis(350));
        assert!(f.locked_out(a).is_none(), "the lockout passes");
        f.record(a, false);
        assert!(f.locked_out(a).is_none(), "and the count starts afresh");
    }

    #[tokio::test]
    async fn tcp_connections_get_keepalive() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        let (s, _) = accepted.unwrap();
        let r = socket2::SockRef::from(&s);
        assert!(!r.keepalive().unwrap());
        keepalive(&s).unwrap();
        assert!(r.keepalive().unwrap());
        assert_eq!(r.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(r.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        drop(client);
    }

    #[test]
    fn token_comparison() {
        let d = |t: &str| token_digest(t);
        assert!(constant_time_eq(&d("secret"), &d("secret")));
        assert!(!constant_time_eq(&d("secret"), &d("secreT")));
        assert!(!constant_time_eq(&d("secret"), &d("secret2")));
        assert!(!constant_time_eq(&d(""), &d("x")));
        // SHA-256 of "abc" (FIPS 180-2's example).
        assert_eq!(d("abc")[..4], [0xba, 0x78, 0x16, 0xbf]);
    }
}
