//! [`IpcStore`]: a [`MemoryStore`] served by `memstored`.
//!
//! One connection carries many requests at once: each call encodes its frame
//! in the caller's task (the one copy of its vectors), hands it to a writer
//! task, and waits for the reply with its request id, which a reader task
//! routes back (search and learn replies decoded as they are read, see
//! the `reader` module). Calls from many tasks on one `IpcStore` (behind an `Arc`)
//! therefore pipeline. A dropped call leaves the connection intact: frames
//! are written whole by the writer task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use memstore_api::{
    Batch, ChangeBatch, DurableStore, Error, Memory, MemoryConfig, MemoryId, MemoryStore, Neighbors, Result, Stats,
    TagFilter, Tags, Tick, Vectors,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::task::AbortOnDropHandle;

use crate::protocol::{
    self, DEFAULT_MAX_FRAME, F32s, Hello, MAGIC, PROTOCOL_VERSION, ProtocolError, Request, Response, WireBatch,
    WireChangeBatch, WireConfig, WireError, WireTags,
};
use crate::reader::{FrameReader, Incoming};
use crate::{Endpoint, IpcError, TOKEN_ENV};

/// How a client connects.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientOptions {
    /// The shared token (TCP requires one; defaults to `$MEMSTORED_TOKEN`).
    pub token: Option<String>,
    /// Largest frame the client sends or accepts.
    pub max_frame: usize,
    /// How long to wait for the connection and the handshake.
    pub connect_timeout: Duration,
    /// The named store to use, for a daemon serving several (`memstored
    /// --stores DIR`); `None` is the daemon's own store.
    pub store: Option<String>,
    /// For `tls:` endpoints: a PEM file of the CA certificates to trust
    /// (defaults to `$MEMSTORED_TLS_CA`; without one, the public web roots).
    pub tls_ca: Option<std::path::PathBuf>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            token: std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()),
            max_frame: DEFAULT_MAX_FRAME,
            connect_timeout: Duration::from_secs(10),
            store: None,
            tls_ca: std::env::var_os(crate::tls::TLS_CA_ENV)
                .filter(|v| !v.is_empty())
                .map(std::path::PathBuf::from),
        }
    }
}

/// A reply routed to its caller.
enum Reply {
    /// A frame's payload, decoded by the caller.
    Frame(Bytes),
    /// Search or learn results, decoded by the reader as they arrived.
    Neighbors(std::result::Result<Neighbors, WireError>),
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Reply>>>;

struct Conn {
    writer: mpsc::Sender<Vec<u8>>,
    pending: Arc<Pending>,
    /// Why the connection ended, once it has.
    closed: Arc<Mutex<Option<String>>>,
    next_id: AtomicU64,
    max_frame: usize,
}

/// A [`MemoryStore`] whose store lives in a `memstored` daemon.
pub struct IpcStore {
    config: MemoryConfig,
    endpoint: Endpoint,
    conn: Conn,
    /// Routes replies; aborted when the store is dropped.
    _reader: AbortOnDropHandle<()>,
    writer: JoinHandle<()>,
}

impl std::fmt::Debug for IpcStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpcStore")
            .field("endpoint", &self.endpoint)
            .field("config", &self.config)
            .finish()
    }
}

impl IpcStore {
    /// Connects to the daemon at `endpoint`. With `config`, the daemon opens
    /// (or creates) its store with it, or checks it against the open store:
    /// another dimension or metric is [`Error::ConfigMismatch`]. Without, the
    /// client takes the store's configuration.
    pub async fn connect(endpoint: &Endpoint, config: Option<MemoryConfig>) -> Result<IpcStore> {
        Self::connect_with(endpoint, config, ClientOptions::default()).await
    }

    /// [`IpcStore::connect`] with options.
    pub async fn connect_with(
        endpoint: &Endpoint,
        config: Option<MemoryConfig>,
        options: ClientOptions,
    ) -> Result<IpcStore> {
        if let Some(c) = &config {
            c.validate()?;
        }
        if let Some(name) = &options.store {
            protocol::check_store_name(name).map_err(WireError::into_error)?;
        }
        let timeout = options.connect_timeout;
        let fut = Self::connect_inner(endpoint, config, options);
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(IpcError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no handshake from {endpoint} within {timeout:?}"),
            ))
            .into()),
        }
    }

    async fn connect_inner(
        endpoint: &Endpoint,
        config: Option<MemoryConfig>,
        options: ClientOptions,
    ) -> Result<IpcStore> {
        match endpoint {
            Endpoint::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                    IpcError::Io(std::io::Error::new(
                        e.kind(),
                        format!("connecting to {}: {e}", path.display()),
                    ))
                })?;
                let (r, w) = s.into_split();
                Self::start(endpoint.clone(), r, w, config, options).await
            }
            Endpoint::Tcp(addr) => {
                let s = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| IpcError::Io(std::io::Error::new(e.kind(), format!("connecting to {addr}: {e}"))))?;
                s.set_nodelay(true).map_err(IpcError::Io)?;
                let (r, w) = s.into_split();
                Self::start(endpoint.clone(), r, w, config, options).await
            }
            Endpoint::Tls(addr) => {
                let connector = crate::tls::connector(options.tls_ca.as_deref())?;
                let name = crate::tls::server_name(addr)?;
                let s = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| IpcError::Io(std::io::Error::new(e.kind(), format!("connecting to {addr}: {e}"))))?;
                s.set_nodelay(true).map_err(IpcError::Io)?;
                let s = connector
                    .connect(name, s)
                    .await
                    .map_err(|e| IpcError::Tls(format!("handshake with {addr}: {e}")))?;
                let (r, w) = tokio::io::split(s);
                Self::start(endpoint.clone(), r, w, config, options).await
            }
        }
    }

    async fn start<R, W>(
        endpoint: Endpoint,
        r: R,
        mut w: W,
        config: Option<MemoryConfig>,
        options: ClientOptions,
    ) -> Result<IpcStore>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let hello = Request::Hello(Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            token: options.token.clone(),
            config: config.as_ref().map(WireConfig::from),
            store: options.store.clone(),
        });
        let frame = protocol::encode_frame(0, &hello, options.max_frame).map_err(WireError::into_error)?;
        w.write_all(&frame).await.map_err(IpcError::Io)?;
        w.flush().await.map_err(IpcError::Io)?;
        let mut frames = FrameReader::new(r, options.max_frame);
        let first = match frames.next().await {
            Some(Ok(Incoming::Frame(f))) => f,
            Some(Ok(Incoming::Neighbors(..))) => {
                return Err(IpcError::Protocol {
                    kind: ProtocolError::Sequence,
                    message: "expected a handshake reply, got search results".into(),
                }
                .into());
            }
            Some(Err(e)) => return Err(IpcError::Disconnected(format!("during the handshake: {e}")).into()),
            None => {
                return Err(
                    IpcError::Disconnected("the daemon closed the connection during the handshake".into()).into(),
                );
            }
        };
        let (_, reply): (u64, Response) = protocol::decode_frame(&first).map_err(WireError::into_error)?;
        let store_config = match reply {
            Response::Welcome { version, config, .. } => {
                if version != PROTOCOL_VERSION {
                    return Err(IpcError::Protocol {
                        kind: ProtocolError::Version,
                        message: format!("daemon speaks version {version}, this client {PROTOCOL_VERSION}"),
                    }
                    .into());
                }
                config.to_config().map_err(WireError::into_error)?
            }
            Response::Error(e) => return Err(e.into_error()),
            other => {
                return Err(IpcError::Protocol {
                    kind: ProtocolError::Sequence,
                    message: format!("expected a handshake reply, got {other:?}"),
                }
                .into());
            }
        };

        let pending: Arc<Pending> = Arc::default();
        let closed: Arc<Mutex<Option<String>>> = Arc::default();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(256);
        let writer_closed = closed.clone();
        let writer = tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if let Err(e) = w.write_all(&frame).await {
                    set_closed(&writer_closed, format!("writing: {e}"));
                    return;
                }
            }
            let _ = w.shutdown().await;
        });
        let reader_pending = pending.clone();
        let reader_closed = closed.clone();
        let reader = tokio::spawn(async move {
            let why = loop {
                match frames.next().await {
                    Some(Ok(Incoming::Neighbors(id, r))) => {
                        if let Some(tx) = lock(&reader_pending).remove(&id) {
                            let _ = tx.send(Reply::Neighbors(r));
                        }
                    }
                    Some(Ok(Incoming::Frame(frame))) => {
                        let (id, _) = protocol::peek(&frame);
                        let waiter = lock(&reader_pending).remove(&id);
                        match waiter {
                            Some(tx) => {
                                let _ = tx.send(Reply::Frame(frame));
                            }
                            None => {
                                // An error the daemon could not tie to a request
                                // (id 0) precedes it closing the connection.
                                if let Ok((_, Response::Error(e))) = protocol::decode_frame::<Response>(&frame) {
                                    break format!("the daemon reported {e:?}");
                                }
                            }
                        }
                    }
                    Some(Err(e)) => break format!("reading: {e}"),
                    None => break "the daemon closed the connection".to_string(),
                }
            };
            set_closed(&reader_closed, why);
            // Wake every waiter: their senders drop.
            lock(&reader_pending).clear();
        });
        Ok(IpcStore {
            config: store_config,
            endpoint,
            conn: Conn {
                writer: tx,
                pending,
                closed,
                next_id: AtomicU64::new(1),
                max_frame: options.max_frame,
            },
            _reader: AbortOnDropHandle::new(reader),
            writer,
        })
    }

    /// The daemon's endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Leaves politely: the daemon finishes this connection's requests,
    /// answers, and ends the session before this returns (so a following
    /// connection may reconfigure the store).
    pub async fn close(self) -> Result<()> {
        let r = self.ask(&Request::Goodbye).await;
        let out = match r {
            Ok(reply) => match decode(&reply)? {
                Response::Done => Ok(()),
                other => Err(unexpected(other)),
            },
            Err(e) => Err(e),
        };
        let IpcStore { conn, writer, .. } = self;
        drop(conn);
        let _ = writer.await;
        out
    }

    /// Has the daemon write a consistent copy of the store to a new file at
    /// `path` (absolute, on the daemon's machine): a checkpoint of a shared
    /// memory. The copy opens as a store of its own (`SqliteStore::open_existing`).
    pub async fn backup_to(&self, path: &std::path::Path) -> Result<()> {
        let path = path
            .to_str()
            .ok_or_else(|| Error::Shape(format!("backup path {} is not UTF-8", path.display())))?;
        done(decode(&self.ask(&Request::Backup { path: path.into() }).await?)?)
    }

    /// Has the daemon replace its store with the backup at `path` (absolute,
    /// on the daemon's machine, written by [`IpcStore::backup_to`]): how a
    /// training run resumes from a checkpoint. The backup itself is left as it
    /// is (the store continues from a copy). Refused with
    /// [`crate::ProtocolError::ConfigInUse`] while other sessions are connected;
    /// a backup that does not open leaves the store unchanged.
    pub async fn restore_from(&self, path: &std::path::Path) -> Result<()> {
        let path = path
            .to_str()
            .ok_or_else(|| Error::Shape(format!("restore path {} is not UTF-8", path.display())))?;
        done(decode(&self.ask(&Request::Restore { path: path.into() }).await?)?)
    }

    /// Sends one request and waits for its reply frame (search results are
    /// a sequence error here).
    async fn ask(&self, req: &Request<'_>) -> Result<Bytes> {
        match self.call(req).await? {
            Reply::Frame(f) => Ok(f),
            Reply::Neighbors(_) => Err(sequence("Neighbors")),
        }
    }

    /// Sends a search or learn request and waits for its results.
    async fn ask_neighbors(&self, req: &Request<'_>) -> Result<Neighbors> {
        match self.call(req).await? {
            Reply::Frame(f) => neighbors(decode(&f)?),
            Reply::Neighbors(r) => r.map_err(WireError::into_error),
        }
    }

    /// Sends one request and waits for its reply.
    async fn call(&self, req: &Request<'_>) -> Result<Reply> {
        let id = self.conn.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = protocol::encode_frame(id, req, self.conn.max_frame).map_err(WireError::into_error)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut p = lock(&self.conn.pending);
            if let Some(why) = lock(&self.conn.closed).clone() {
                return Err(IpcError::Disconnected(why).into());
            }
            p.insert(id, tx);
        }
        if self.conn.writer.send(frame).await.is_err() {
            lock(&self.conn.pending).remove(&id);
            return Err(self.disconnected());
        }
        rx.await.map_err(|_| self.disconnected())
    }

    fn disconnected(&self) -> Error {
        let why = lock(&self.conn.closed)
            .clone()
            .unwrap_or_else(|| "the connection ended".into());
        IpcError::Disconnected(why).into()
    }
}

fn set_closed(closed: &Mutex<Option<String>>, why: String) {
    let mut c = lock(closed);
    if c.is_none() {
        *c = Some(why);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn decode(frame: &Bytes) -> Result<Response<'_>> {
    let (_, r): (u64, Response) = protocol::decode_frame(frame).map_err(WireError::into_error)?;
    match r {
        Response::Error(e) => Err(e.into_error()),
        r => Ok(r),
    }
}

fn unexpected(r: Response<'_>) -> Error {
    sequence(match r {
        Response::Welcome { .. } => "Welcome",
        Response::Neighbors(_) => "Neighbors",
        Response::Ids(_) => "Ids",
        Response::Memories(_) => "Memories",
        Response::Count(_) => "Count",
        Response::Done => "Done",
        Response::Stats(_) => "Stats",
        Response::Error(_) => "Error",
    })
}

fn sequence(name: &str) -> Error {
    IpcError::Protocol {
        kind: ProtocolError::Sequence,
        message: format!("unexpected reply {name}"),
    }
    .into()
}

fn wire_batch<'a>(b: &Batch<'a>) -> WireBatch<'a> {
    WireBatch {
        keys: F32s::from_slice(b.keys.data()),
        key_dim: b.keys.dim() as u64,
        values: F32s::from_slice(b.values.data()),
        value_dim: b.values.dim() as u64,
        tags: match b.tags {
            Tags::None => WireTags::None,
            Tags::Same(t) => WireTags::Same(t.into()),
            Tags::PerRow(t) => WireTags::PerRow(t.into()),
        },
    }
}

fn count(r: Response<'_>) -> Result<usize> {
    match r {
        Response::Count(n) => protocol::usize_of(n).map_err(WireError::into_error),
        other => Err(unexpected(other)),
    }
}

fn done(r: Response<'_>) -> Result<()> {
    match r {
        Response::Done => Ok(()),
        other => Err(unexpected(other)),
    }
}

fn neighbors(r: Response<'_>) -> Result<Neighbors> {
    match r {
        Response::Neighbors(n) => n.to_neighbors().map_err(WireError::into_error),
        other => Err(unexpected(other)),
    }
}

fn ids(r: Response<'_>) -> Result<Vec<MemoryId>> {
    match r {
        Response::Ids(ids) => Ok(ids.into_owned()),
        other => Err(unexpected(other)),
    }
}

#[async_trait]
impl DurableStore for IpcStore {
    async fn backup_to(&self, dest: &std::path::Path) -> Result<()> {
        IpcStore::backup_to(self, dest).await
    }

    async fn close(self) -> Result<()> {
        IpcStore::close(self).await
    }
}

/// An upper bound of a change batch's bytes on the wire (postcard: at most
/// ten bytes a varint, four a float, a string's bytes and its length).
fn wire_bound(b: &ChangeBatch) -> usize {
    let ids = b.delete.len() + b.update_ids.len() + b.touch.len() + b.assign_ids.len();
    let floats = b.deltas.len() + b.insert_keys.len() + b.insert_values.len() + b.assign_values.len();
    let tags: usize = b.insert_tags.iter().flatten().map(|t| t.len() + 10).sum::<usize>()
        + b.insert_tags.len() * 10
        + b.tag_counts.iter().map(|(_, t, _)| t.len() + 30).sum::<usize>();
    200 + 10 * ids + 4 * floats + 40 * b.insert_meta.len() + tags
}

#[async_trait]
impl MemoryStore for IpcStore {
    fn config(&self) -> &MemoryConfig {
        &self.config
    }

    async fn search(&self, queries: Vectors<'_>, k: usize, filter: Option<&TagFilter>) -> Result<Neighbors> {
        // An answer too large to address is refused before it is asked
        // for (the daemon checks everything else, and this again).
        self.config().check_answer(queries.len(), k)?;
        let req = Request::Search {
            queries: F32s::from_slice(queries.data()),
            dim: queries.dim() as u64,
            k: k as u64,
            filter: filter.map(Into::into),
        };
        self.ask_neighbors(&req).await
    }

    async fn insert(&self, batch: Batch<'_>, tick: Tick) -> Result<Vec<MemoryId>> {
        let req = Request::Insert {
            batch: wire_batch(&batch),
            tick,
        };
        ids(decode(&self.ask(&req).await?)?)
    }

    async fn get(&self, ids: &[MemoryId]) -> Result<Vec<Memory>> {
        let reply = self.ask(&Request::Get(ids.into())).await?;
        match decode(&reply)? {
            Response::Memories(ms) => ms
                .iter()
                .map(|m| m.to_memory().map_err(WireError::into_error))
                .collect(),
            other => Err(unexpected(other)),
        }
    }

    async fn delete(&self, ids: &[MemoryId]) -> Result<usize> {
        count(decode(&self.ask(&Request::Delete(ids.into())).await?)?)
    }

    async fn update_values(&self, ids: &[MemoryId], deltas: Vectors<'_>) -> Result<()> {
        let req = Request::UpdateValues {
            ids: ids.into(),
            deltas: F32s::from_slice(deltas.data()),
            dim: deltas.dim() as u64,
        };
        done(decode(&self.ask(&req).await?)?)
    }

    async fn touch(&self, ids: &[MemoryId], tick: Tick) -> Result<()> {
        let req = Request::Touch { ids: ids.into(), tick };
        done(decode(&self.ask(&req).await?)?)
    }

    async fn learn(&self, batch: Batch<'_>, tick: Tick, k: usize) -> Result<Neighbors> {
        self.config().check_answer(batch.len(), k)?;
        let req = Request::Learn {
            batch: wire_batch(&batch),
            tick,
            k: k as u64,
        };
        self.ask_neighbors(&req).await
    }

    async fn evict(&self, target_len: usize) -> Result<usize> {
        let req = Request::Evict {
            target_len: target_len as u64,
        };
        count(decode(&self.ask(&req).await?)?)
    }

    async fn apply(&self, batch: &ChangeBatch) -> Result<()> {
        let req = Request::Apply(WireChangeBatch::from_batch(batch));
        done(decode(&self.ask(&req).await?)?)
    }

    /// One request for the whole group, so that the daemon's store writes
    /// it in one transaction; a group that could pass the frame limit goes
    /// as smaller groups, a lone batch as `Apply`.
    async fn apply_all(&self, batches: &[ChangeBatch]) -> Result<()> {
        let mut todo = vec![batches];
        while let Some(group) = todo.pop() {
            match group {
                [] => {}
                [one] => self.apply(one).await?,
                _ if group.iter().map(wire_bound).sum::<usize>() > self.conn.max_frame => {
                    let (a, b) = group.split_at(group.len() / 2);
                    todo.push(b);
                    todo.push(a);
                }
                _ => {
                    let req = Request::ApplyAll(group.iter().map(WireChangeBatch::from_batch).collect());
                    done(decode(&self.ask(&req).await?)?)?;
                }
            }
        }
        Ok(())
    }

    async fn ids(&self) -> Result<Vec<MemoryId>> {
        ids(decode(&self.ask(&Request::Ids).await?)?)
    }

    async fn len(&self) -> Result<usize> {
        count(decode(&self.ask(&Request::Len).await?)?)
    }

    async fn stats(&self) -> Result<Stats> {
        match decode(&self.ask(&Request::Stats).await?)? {
            Response::Stats(s) => Ok(s.into()),
            other => Err(unexpected(other)),
        }
    }

    async fn flush(&self) -> Result<()> {
        done(decode(&self.ask(&Request::Flush).await?)?)
    }
}
