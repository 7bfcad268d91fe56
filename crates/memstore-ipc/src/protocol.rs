//! The wire protocol between `memstored` and [`crate::IpcStore`].
//!
//! **Frames.** Every message is one frame: a 4-byte little-endian payload
//! length, then the payload (tokio-util's `LengthDelimitedCodec` reads them,
//! with a maximum frame length, 256 MiB by default). A payload is a
//! [postcard](https://docs.rs/postcard) encoding of `(request id, body)`.
//!
//! **Vectors** travel as raw little-endian f32 bytes ([`F32s`]): postcard
//! writes a byte string with one `memcpy`, so a batch of 4096 × 64 keys is
//! copied once into the frame on the sending side and once out of it on the
//! receiving side (on little-endian hosts the f32 slice is viewed as bytes
//! without a copy). Ids, counts and tags are postcard varints and strings.
//!
//! **Handshake.** The first frame a client sends is [`Request::Hello`] with
//! id 0: magic, protocol version, an optional shared token (required on TCP)
//! and optionally the store configuration the client expects and the name of
//! the store (a daemon may serve several named stores). The daemon
//! answers [`Response::Welcome`] with the store's configuration, or an error
//! (wrong version, wrong token, configuration mismatch) and closes.
//!
//! **Requests** carry ids chosen by the client; replies carry the id of their
//! request, so many requests can be in flight on one connection (pipelining)
//! and replies may come back in any order.

use std::borrow::Cow;

use memstore_api::{
    ChangeBatch, Counters, Error, EvictionPolicy, InsertMeta, Memory, MemoryConfig, Metric, Neighbors, Stats, TagFilter,
};
use serde::{Deserialize, Serialize};

/// The four bytes a [`Request::Hello`] starts with.
pub const MAGIC: [u8; 4] = *b"MSTD";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 6;
/// Default largest frame (payload bytes) either side accepts.
pub const DEFAULT_MAX_FRAME: usize = 256 << 20;
/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// Raw little-endian f32 bytes: borrowed from the caller's slice when
/// sending, borrowed from the frame when receiving.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct F32s<'a>(#[serde(borrow, with = "serde_bytes")] pub Cow<'a, [u8]>);

impl<'a> F32s<'a> {
    /// Views floats as little-endian bytes (no copy on little-endian hosts).
    pub fn from_slice(v: &'a [f32]) -> Self {
        #[cfg(target_endian = "little")]
        {
            F32s(Cow::Borrowed(bytemuck::cast_slice(v)))
        }
        #[cfg(not(target_endian = "little"))]
        {
            F32s(Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        }
    }

    /// Copies the bytes out as floats (the one copy on the receiving side).
    pub fn to_vec(&self, what: &str) -> Result<Vec<f32>, WireError> {
        let b: &[u8] = &self.0;
        if !b.len().is_multiple_of(4) {
            return Err(WireError::protocol(
                ProtocolError::Malformed,
                format!("{what}: {} bytes is not a whole number of f32s", b.len()),
            ));
        }
        #[cfg(target_endian = "little")]
        {
            Ok(bytemuck::pod_collect_to_vec(b))
        }
        #[cfg(not(target_endian = "little"))]
        {
            Ok(b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        }
    }
}

/// The store configuration on the wire.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WireConfig {
    /// Key dimension.
    pub key_dim: u64,
    /// Value dimension.
    pub value_dim: u64,
    /// Metric name (`l2`, `cosine`, `ip`).
    pub metric: String,
    /// Capacity.
    pub capacity: Option<u64>,
    /// LRFU λ.
    pub lambda: f64,
    /// Novelty threshold.
    pub novelty: f32,
    /// Recombination threshold.
    pub recombine: f32,
}

impl From<&MemoryConfig> for WireConfig {
    fn from(c: &MemoryConfig) -> Self {
        WireConfig {
            key_dim: c.key_dim as u64,
            value_dim: c.value_dim as u64,
            metric: c.metric.as_str().to_string(),
            capacity: c.capacity.map(|x| x as u64),
            lambda: c.eviction.lambda(),
            novelty: c.novelty,
            recombine: c.recombine,
        }
    }
}

impl WireConfig {
    /// The configuration this describes.
    pub fn to_config(&self) -> Result<MemoryConfig, WireError> {
        let metric = Metric::parse(&self.metric).ok_or_else(|| {
            WireError::protocol(ProtocolError::Malformed, format!("unknown metric {:?}", self.metric))
        })?;
        Ok(MemoryConfig {
            key_dim: usize_of(self.key_dim)?,
            value_dim: usize_of(self.value_dim)?,
            metric,
            capacity: self.capacity.map(usize_of).transpose()?,
            eviction: EvictionPolicy::Lrfu { lambda: self.lambda },
            novelty: self.novelty,
            recombine: self.recombine,
        })
    }
}

/// Longest store name a handshake may carry.
pub const MAX_STORE_NAME: usize = 64;

/// Checks a store name: 1 to [`MAX_STORE_NAME`] ASCII letters, digits, `_`,
/// `-` or `.`, not starting with `.`, so that `DIR/NAME.db` never leaves
/// `DIR` and never names a hidden file.
pub fn check_store_name(name: &str) -> Result<(), WireError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_STORE_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(WireError::protocol(
            ProtocolError::StoreName,
            format!(
                "store name {name:?}: expected 1 to {MAX_STORE_NAME} ASCII letters, digits, '_', '-' or '.', not starting with '.'"
            ),
        ))
    }
}

/// A u64 from the wire as a usize.
pub fn usize_of(x: u64) -> Result<usize, WireError> {
    usize::try_from(x).map_err(|_| WireError::protocol(ProtocolError::Malformed, format!("{x} does not fit in usize")))
}

/// Tags of a batch on the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum WireTags<'a> {
    /// No tags.
    None,
    /// The same tags on every row.
    Same(Cow<'a, [String]>),
    /// One tag set per row.
    PerRow(Cow<'a, [Vec<String>]>),
}

/// A batch of keys, values and tags on the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireBatch<'a> {
    /// Keys, row-major.
    #[serde(borrow)]
    pub keys: F32s<'a>,
    /// Key dimension as the client gave it.
    pub key_dim: u64,
    /// Values, row-major.
    #[serde(borrow)]
    pub values: F32s<'a>,
    /// Value dimension as the client gave it.
    pub value_dim: u64,
    /// Tags.
    #[serde(borrow)]
    pub tags: WireTags<'a>,
}

/// A tag filter on the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum WireFilter {
    /// At least one of these tags.
    Any(Vec<String>),
    /// All of these tags.
    All(Vec<String>),
}

impl From<&TagFilter> for WireFilter {
    fn from(f: &TagFilter) -> Self {
        match f {
            TagFilter::Any(t) => WireFilter::Any(t.clone()),
            TagFilter::All(t) => WireFilter::All(t.clone()),
        }
    }
}

impl From<WireFilter> for TagFilter {
    fn from(f: WireFilter) -> Self {
        match f {
            WireFilter::Any(t) => TagFilter::Any(t),
            WireFilter::All(t) => TagFilter::All(t),
        }
    }
}

/// Bookkeeping of an inserted row of a change batch.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct WireInsertMeta {
    /// Creation tick.
    pub created: u64,
    /// Last access tick.
    pub last_access: u64,
    /// Accesses.
    pub access_count: u64,
    /// LRFU CRF.
    pub crf: f64,
}

/// A [`ChangeBatch`] on the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireChangeBatch<'a> {
    /// Sequence number.
    pub seq: u64,
    /// Tick.
    pub tick: u64,
    /// Deletes.
    pub delete: Cow<'a, [u64]>,
    /// Updated ids.
    pub update_ids: Cow<'a, [u64]>,
    /// Value deltas.
    #[serde(borrow)]
    pub deltas: F32s<'a>,
    /// Touches.
    pub touch: Cow<'a, [u64]>,
    /// First inserted id.
    pub first_id: u64,
    /// Inserted keys.
    #[serde(borrow)]
    pub insert_keys: F32s<'a>,
    /// Inserted values.
    #[serde(borrow)]
    pub insert_values: F32s<'a>,
    /// Inserted rows' bookkeeping.
    pub insert_meta: Vec<WireInsertMeta>,
    /// Inserted rows' tags (empty: none).
    pub insert_tags: Cow<'a, [Vec<String>]>,
    /// Ids whose values are assigned.
    pub assign_ids: Cow<'a, [u64]>,
    /// Assigned values.
    #[serde(borrow)]
    pub assign_values: F32s<'a>,
    /// Tag counts of existing memories.
    pub tag_counts: Cow<'a, [(u64, String, u64)]>,
}

impl<'a> WireChangeBatch<'a> {
    /// Borrows a change batch for sending.
    pub fn from_batch(b: &'a ChangeBatch) -> Self {
        WireChangeBatch {
            seq: b.seq,
            tick: b.tick,
            delete: Cow::Borrowed(&b.delete),
            update_ids: Cow::Borrowed(&b.update_ids),
            deltas: F32s::from_slice(&b.deltas),
            touch: Cow::Borrowed(&b.touch),
            first_id: b.first_id,
            insert_keys: F32s::from_slice(&b.insert_keys),
            insert_values: F32s::from_slice(&b.insert_values),
            insert_meta: b
                .insert_meta
                .iter()
                .map(|m| WireInsertMeta {
                    created: m.created,
                    last_access: m.last_access,
                    access_count: m.access_count,
                    crf: m.crf,
                })
                .collect(),
            insert_tags: Cow::Borrowed(&b.insert_tags),
            assign_ids: Cow::Borrowed(&b.assign_ids),
            assign_values: F32s::from_slice(&b.assign_values),
            tag_counts: Cow::Borrowed(&b.tag_counts),
        }
    }

    /// The change batch this describes.
    pub fn to_batch(&self) -> Result<ChangeBatch, WireError> {
        Ok(ChangeBatch {
            seq: self.seq,
            tick: self.tick,
            delete: self.delete.to_vec(),
            update_ids: self.update_ids.to_vec(),
            deltas: self.deltas.to_vec("deltas")?,
            touch: self.touch.to_vec(),
            first_id: self.first_id,
            insert_keys: self.insert_keys.to_vec("insert keys")?,
            insert_values: self.insert_values.to_vec("insert values")?,
            insert_meta: self
                .insert_meta
                .iter()
                .map(|m| InsertMeta {
                    created: m.created,
                    last_access: m.last_access,
                    access_count: m.access_count,
                    crf: m.crf,
                })
                .collect(),
            insert_tags: self.insert_tags.to_vec(),
            assign_ids: self.assign_ids.to_vec(),
            assign_values: self.assign_values.to_vec("assigned values")?,
            tag_counts: self.tag_counts.to_vec(),
        })
    }
}

/// The opening message of a connection.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// [`MAGIC`].
    pub magic: [u8; 4],
    /// The client's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The shared token (required on TCP, optional on the Unix socket).
    pub token: Option<String>,
    /// The configuration the client expects; `None` takes the store's.
    pub config: Option<WireConfig>,
    /// The named store to use (a daemon started with `--stores DIR` serves
    /// `DIR/NAME.db`); `None` is the daemon's own store (`--db`).
    pub store: Option<String>,
}

/// A client's request. Variant order is the wire's request type number:
/// append, never reorder.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request<'a> {
    /// Handshake (first frame only).
    Hello(Hello),
    /// `MemoryStore::search`.
    Search {
        /// Queries.
        #[serde(borrow)]
        queries: F32s<'a>,
        /// Query dimension.
        dim: u64,
        /// Slots per query.
        k: u64,
        /// Tag filter.
        filter: Option<WireFilter>,
    },
    /// `MemoryStore::insert`.
    Insert {
        /// Rows.
        #[serde(borrow)]
        batch: WireBatch<'a>,
        /// Tick.
        tick: u64,
    },
    /// `MemoryStore::get`.
    Get(Cow<'a, [u64]>),
    /// `MemoryStore::delete`.
    Delete(Cow<'a, [u64]>),
    /// `MemoryStore::update_values`.
    UpdateValues {
        /// Ids.
        ids: Cow<'a, [u64]>,
        /// Deltas.
        #[serde(borrow)]
        deltas: F32s<'a>,
        /// Delta dimension.
        dim: u64,
    },
    /// `MemoryStore::touch`.
    Touch {
        /// Ids.
        ids: Cow<'a, [u64]>,
        /// Tick.
        tick: u64,
    },
    /// `MemoryStore::learn`.
    Learn {
        /// Rows.
        #[serde(borrow)]
        batch: WireBatch<'a>,
        /// Tick.
        tick: u64,
        /// Neighbours per row.
        k: u64,
    },
    /// `MemoryStore::evict`.
    Evict {
        /// Target length.
        target_len: u64,
    },
    /// `MemoryStore::apply`.
    Apply(#[serde(borrow)] WireChangeBatch<'a>),
    /// `MemoryStore::ids`.
    Ids,
    /// `MemoryStore::len`.
    Len,
    /// `MemoryStore::stats`.
    Stats,
    /// `MemoryStore::flush`.
    Flush,
    /// The client leaves: the daemon finishes its requests, answers, closes.
    Goodbye,
    /// A consistent copy of the store written by the daemon to a new file
    /// at this absolute path on its machine (a checkpoint).
    Backup {
        /// Where the copy goes; it must not exist.
        path: String,
    },
    /// Replaces the store with a copy written by `Backup` (a checkpoint to
    /// resume from). Only the sole connected session may ask.
    Restore {
        /// The backup file, absolute, on the daemon's machine.
        path: String,
    },
    /// `MemoryStore::apply_all`: consecutive batches, in order.
    ApplyAll(#[serde(borrow)] Vec<WireChangeBatch<'a>>),
}

/// Number of request types ([`Request`]'s variants).
pub const REQUEST_TYPES: u32 = 18;

/// A stored memory on the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireMemory<'a> {
    /// Id.
    pub id: u64,
    /// Key.
    #[serde(borrow)]
    pub key: F32s<'a>,
    /// Value.
    #[serde(borrow)]
    pub value: F32s<'a>,
    /// Creation tick.
    pub created: u64,
    /// Last access tick.
    pub last_access: u64,
    /// Accesses.
    pub access_count: u64,
    /// LRFU CRF.
    pub crf: f64,
    /// Tags and counts.
    pub tags: Vec<(String, u64)>,
}

impl<'a> WireMemory<'a> {
    /// Borrows a memory for sending.
    pub fn from_memory(m: &'a Memory) -> Self {
        WireMemory {
            id: m.id,
            key: F32s::from_slice(&m.key),
            value: F32s::from_slice(&m.value),
            created: m.created,
            last_access: m.last_access,
            access_count: m.access_count,
            crf: m.crf,
            tags: m.tags.iter().map(|(t, c)| (t.clone(), *c)).collect(),
        }
    }

    /// The memory this describes.
    pub fn to_memory(&self) -> Result<Memory, WireError> {
        Ok(Memory {
            id: self.id,
            key: self.key.to_vec("key")?,
            value: self.value.to_vec("value")?,
            created: self.created,
            last_access: self.last_access,
            access_count: self.access_count,
            crf: self.crf,
            tags: self.tags.iter().cloned().collect(),
        })
    }
}

/// Search results on the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireNeighbors<'a> {
    /// Queries.
    pub n: u64,
    /// Slots per query.
    pub k: u64,
    /// Key dimension.
    pub key_dim: u64,
    /// Value dimension.
    pub value_dim: u64,
    /// Ids, `n × k`.
    pub ids: Cow<'a, [Option<u64>]>,
    /// Distances.
    #[serde(borrow)]
    pub distances: F32s<'a>,
    /// Keys.
    #[serde(borrow)]
    pub keys: F32s<'a>,
    /// Values.
    #[serde(borrow)]
    pub values: F32s<'a>,
}

impl<'a> WireNeighbors<'a> {
    /// Borrows results for sending.
    pub fn from_neighbors(r: &'a Neighbors) -> Self {
        WireNeighbors {
            n: r.n as u64,
            k: r.k as u64,
            key_dim: r.key_dim as u64,
            value_dim: r.value_dim as u64,
            ids: Cow::Borrowed(&r.ids),
            distances: F32s::from_slice(&r.distances),
            keys: F32s::from_slice(&r.keys),
            values: F32s::from_slice(&r.values),
        }
    }

    /// The results this describes, with their shapes checked.
    pub fn to_neighbors(&self) -> Result<Neighbors, WireError> {
        let r = Neighbors {
            n: usize_of(self.n)?,
            k: usize_of(self.k)?,
            key_dim: usize_of(self.key_dim)?,
            value_dim: usize_of(self.value_dim)?,
            ids: self.ids.to_vec(),
            distances: self.distances.to_vec("distances")?,
            keys: self.keys.to_vec("keys")?,
            values: self.values.to_vec("values")?,
        };
        let slots = r.n.checked_mul(r.k);
        let ok = slots == Some(r.ids.len())
            && r.distances.len() == r.ids.len()
            && Some(r.keys.len()) == r.ids.len().checked_mul(r.key_dim)
            && Some(r.values.len()) == r.ids.len().checked_mul(r.value_dim);
        if !ok {
            return Err(WireError::protocol(
                ProtocolError::Malformed,
                "search results with inconsistent shapes",
            ));
        }
        Ok(r)
    }
}

/// Statistics on the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireStats {
    /// Memories.
    pub len: u64,
    /// Next id.
    pub next_id: u64,
    /// Total accesses.
    pub access_count_total: u64,
    /// Tag counts.
    pub tag_counts: Vec<(String, u64)>,
    /// Counters: inserted, merged, evicted, deleted, last batch.
    pub counters: [u64; 5],
}

impl From<&Stats> for WireStats {
    fn from(s: &Stats) -> Self {
        let c = s.counters;
        WireStats {
            len: s.len,
            next_id: s.next_id,
            access_count_total: s.access_count_total,
            tag_counts: s.tag_counts.iter().map(|(t, n)| (t.clone(), *n)).collect(),
            counters: [c.inserted, c.merged, c.evicted, c.deleted, c.last_batch],
        }
    }
}

impl From<WireStats> for Stats {
    fn from(s: WireStats) -> Self {
        let [inserted, merged, evicted, deleted, last_batch] = s.counters;
        Stats {
            len: s.len,
            next_id: s.next_id,
            access_count_total: s.access_count_total,
            tag_counts: s.tag_counts.into_iter().collect(),
            counters: Counters {
                inserted,
                merged,
                evicted,
                deleted,
                last_batch,
            },
        }
    }
}

/// The daemon's reply.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response<'a> {
    /// Handshake accepted.
    Welcome {
        /// The daemon's protocol version.
        version: u32,
        /// The store's configuration.
        config: WireConfig,
        /// The largest frame the daemon accepts.
        max_frame: u64,
    },
    /// Search or learn results.
    Neighbors(#[serde(borrow)] WireNeighbors<'a>),
    /// Ids (insert, ids).
    Ids(Cow<'a, [u64]>),
    /// Memories (get).
    Memories(#[serde(borrow)] Vec<WireMemory<'a>>),
    /// A count (delete, evict, len).
    Count(u64),
    /// Done, nothing to return.
    Done,
    /// Statistics.
    Stats(WireStats),
    /// The request failed.
    Error(WireError),
}

/// Protocol-level failures (as opposed to the store's own errors).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ProtocolError {
    /// A frame that does not decode.
    Malformed,
    /// A frame over the size limit.
    TooLarge,
    /// A protocol version or magic the peer does not speak.
    Version,
    /// A request type number the daemon does not know.
    UnknownRequest,
    /// Missing or wrong token.
    Unauthorized,
    /// No store is open yet and the client sent no configuration.
    NoStore,
    /// The configuration's tunable fields differ from the open store's while
    /// other sessions use it.
    ConfigInUse,
    /// A request before the handshake, or a second handshake.
    Sequence,
    /// The daemon is shutting down.
    ShuttingDown,
    /// A store name that is not a plain name, or a named store asked of a
    /// daemon that serves none (or the default store of one that has none).
    StoreName,
    /// The daemon serves as many connections as it allows (`--max-connections`).
    Busy,
    /// A frame stopped arriving halfway (`--frame-timeout`), or the session
    /// sent no request for too long (`--idle-timeout`).
    Timeout,
}

/// An error on the wire: one variant per [`memstore_api::Error`] variant,
/// plus protocol failures.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum WireError {
    /// [`Error::DimensionMismatch`].
    DimensionMismatch {
        /// Which input.
        what: String,
        /// Expected.
        expected: u64,
        /// Given.
        got: u64,
    },
    /// [`Error::Shape`].
    Shape(String),
    /// [`Error::NonFinite`].
    NonFinite {
        /// Which input.
        what: String,
        /// Row.
        row: u64,
        /// Column.
        col: u64,
    },
    /// [`Error::ZeroK`].
    ZeroK,
    /// [`Error::UnknownId`].
    UnknownId(u64),
    /// [`Error::TagCount`].
    TagCount {
        /// Tag sets.
        got: u64,
        /// Rows.
        rows: u64,
    },
    /// [`Error::InvalidConfig`].
    InvalidConfig(String),
    /// [`Error::ConfigMismatch`].
    ConfigMismatch {
        /// Field.
        field: String,
        /// Persisted.
        stored: String,
        /// Asked.
        requested: String,
    },
    /// [`Error::OutOfOrder`].
    OutOfOrder {
        /// Expected sequence number.
        expected: u64,
        /// Given.
        got: u64,
    },
    /// [`Error::IdConflict`].
    IdConflict {
        /// Store's next id.
        expected: u64,
        /// Batch's first id.
        got: u64,
    },
    /// [`Error::Corrupt`].
    Corrupt(String),
    /// [`Error::Storage`], as its message.
    Storage(String),
    /// A protocol failure.
    Protocol {
        /// What kind.
        kind: ProtocolError,
        /// Details.
        message: String,
    },
}

impl WireError {
    /// A protocol error.
    pub fn protocol(kind: ProtocolError, message: impl Into<String>) -> Self {
        WireError::Protocol {
            kind,
            message: message.into(),
        }
    }
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> Self {
        match e {
            Error::DimensionMismatch { what, expected, got } => WireError::DimensionMismatch {
                what: what.to_string(),
                expected: *expected as u64,
                got: *got as u64,
            },
            Error::Shape(m) => WireError::Shape(m.clone()),
            Error::NonFinite { what, row, col } => WireError::NonFinite {
                what: what.to_string(),
                row: *row as u64,
                col: *col as u64,
            },
            Error::ZeroK => WireError::ZeroK,
            Error::UnknownId(id) => WireError::UnknownId(*id),
            Error::TagCount { got, rows } => WireError::TagCount {
                got: *got as u64,
                rows: *rows as u64,
            },
            Error::InvalidConfig(m) => WireError::InvalidConfig(m.clone()),
            Error::ConfigMismatch {
                field,
                stored,
                requested,
            } => WireError::ConfigMismatch {
                field: field.to_string(),
                stored: stored.clone(),
                requested: requested.clone(),
            },
            Error::OutOfOrder { expected, got } => WireError::OutOfOrder {
                expected: *expected,
                got: *got,
            },
            Error::IdConflict { expected, got } => WireError::IdConflict {
                expected: *expected,
                got: *got,
            },
            Error::Corrupt(m) => WireError::Corrupt(m.clone()),
            Error::Storage(e) => WireError::Storage(error_chain(e.as_ref())),
            // A kind the wire format does not name yet travels with its message.
            other => WireError::Storage(error_chain(other)),
        }
    }
}

/// An error and its sources, joined with ": ".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The API's static names of inputs and configuration fields, so that an
/// error decoded from the wire names the same input as the daemon's.
const NAMES: &[&str] = &[
    "keys",
    "values",
    "queries",
    "deltas",
    "values after update",
    "key_dim",
    "value_dim",
    "metric",
    "capacity",
    "eviction",
    "novelty",
    "recombine",
];

fn static_name(s: &str) -> &'static str {
    NAMES.iter().copied().find(|n| *n == s).unwrap_or("input")
}

impl WireError {
    /// The API error this describes; protocol and storage failures become
    /// [`Error::Storage`] with a [`crate::IpcError::Remote`] source.
    pub fn into_error(self) -> Error {
        match self {
            WireError::DimensionMismatch { what, expected, got } => Error::DimensionMismatch {
                what: static_name(&what),
                expected: expected as usize,
                got: got as usize,
            },
            WireError::Shape(m) => Error::Shape(m),
            WireError::NonFinite { what, row, col } => Error::NonFinite {
                what: static_name(&what),
                row: row as usize,
                col: col as usize,
            },
            WireError::ZeroK => Error::ZeroK,
            WireError::UnknownId(id) => Error::UnknownId(id),
            WireError::TagCount { got, rows } => Error::TagCount {
                got: got as usize,
                rows: rows as usize,
            },
            WireError::InvalidConfig(m) => Error::InvalidConfig(m),
            WireError::ConfigMismatch {
                field,
                stored,
                requested,
            } => Error::ConfigMismatch {
                field: static_name(&field),
                stored,
                requested,
            },
            WireError::OutOfOrder { expected, got } => Error::OutOfOrder { expected, got },
            WireError::IdConflict { expected, got } => Error::IdConflict { expected, got },
            WireError::Corrupt(m) => Error::Corrupt(m),
            WireError::Storage(m) => Error::storage(crate::IpcError::Remote(m)),
            WireError::Protocol { kind, message } => Error::storage(crate::IpcError::Protocol { kind, message }),
        }
    }
}

/// Encodes `(id, body)` as one frame (length prefix included), checking it
/// against `max_frame`.
pub fn encode_frame<T: Serialize>(id: u64, body: &T, max_frame: usize) -> Result<Vec<u8>, WireError> {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(&[0; LENGTH_PREFIX]);
    let mut buf = postcard::to_io(&(id, body), buf)
        .map_err(|e| WireError::protocol(ProtocolError::Malformed, format!("encoding a frame: {e}")))?;
    let len = buf.len() - LENGTH_PREFIX;
    buf[..LENGTH_PREFIX].copy_from_slice(&length_prefix(len, max_frame)?);
    Ok(buf)
}

/// The length prefix of a `len`-byte payload, checked against `max_frame`.
fn length_prefix(len: usize, max_frame: usize) -> Result<[u8; LENGTH_PREFIX], WireError> {
    if len > max_frame {
        return Err(WireError::protocol(
            ProtocolError::TooLarge,
            format!("a {len}-byte frame exceeds the {max_frame}-byte limit"),
        ));
    }
    let prefix = u32::try_from(len)
        .map_err(|_| WireError::protocol(ProtocolError::TooLarge, format!("a {len}-byte frame exceeds 4 GiB")))?;
    Ok(prefix.to_le_bytes())
}

/// A search or learn reply ready to be written without copying its keys and
/// values into one buffer: the frame [`encode_frame`] would make of
/// `Response::Neighbors`, byte for byte, as four parts (the head, the keys'
/// bytes, the values' length, the values' bytes). At batch 4096 the keys and
/// values are 16 MB: encoding them into a fresh buffer took ~5 ms (most of
/// it first-touch page faults), more than the socket's own copy.
pub struct NeighborsFrame {
    head: Vec<u8>,
    mid: Vec<u8>,
    body: Neighbors,
}

/// Appends `x` as postcard's varint (LEB128, 7 bits a byte, low first).
fn push_varint(out: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        out.push((x as u8) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

impl NeighborsFrame {
    /// The frame of `Response::Neighbors` for `body` as request `id`, checked
    /// against `max_frame`.
    pub fn new(id: u64, body: Neighbors, max_frame: usize) -> Result<NeighborsFrame, WireError> {
        // Everything before the keys, as postcard writes it: the same
        // reply with empty keys and values ends in their two zero lengths.
        let mut wire = WireNeighbors::from_neighbors(&body);
        wire.keys = F32s(Cow::Borrowed(&[]));
        wire.values = F32s(Cow::Borrowed(&[]));
        let bare = postcard::to_allocvec(&(id, Response::Neighbors(wire)))
            .map_err(|e| WireError::protocol(ProtocolError::Malformed, format!("encoding a frame: {e}")))?;
        let Some(before) = bare.strip_suffix(&[0, 0]) else {
            return Err(WireError::protocol(
                ProtocolError::Malformed,
                "encoding a frame: the reply's layout is not the expected one",
            ));
        };
        let (keys, values) = (4 * body.keys.len(), 4 * body.values.len());
        let mut head = Vec::with_capacity(LENGTH_PREFIX + before.len() + 10);
        head.extend_from_slice(&[0; LENGTH_PREFIX]);
        head.extend_from_slice(before);
        push_varint(&mut head, keys as u64);
        let mut mid = Vec::with_capacity(10);
        push_varint(&mut mid, values as u64);
        let len = head.len() - LENGTH_PREFIX + keys + mid.len() + values;
        head[..LENGTH_PREFIX].copy_from_slice(&length_prefix(len, max_frame)?);
        Ok(NeighborsFrame { head, mid, body })
    }

    /// Bytes on the wire, length prefix included.
    pub fn len(&self) -> usize {
        self.head.len() + 4 * self.body.keys.len() + self.mid.len() + 4 * self.body.values.len()
    }

    /// Whether the frame is empty (never: a frame has at least its prefix).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame's bytes in order, length prefix first.
    pub fn parts(&self) -> [Cow<'_, [u8]>; 4] {
        [
            Cow::Borrowed(&self.head),
            F32s::from_slice(&self.body.keys).0,
            Cow::Borrowed(&self.mid),
            F32s::from_slice(&self.body.values).0,
        ]
    }
}

/// Decodes a frame's payload into `(id, body)`.
pub fn decode_frame<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<(u64, T), WireError> {
    postcard::from_bytes(payload).map_err(|e| {
        let (id, kind) = peek(payload);
        match kind {
            Some(t) if t >= REQUEST_TYPES => WireError::protocol(
                ProtocolError::UnknownRequest,
                format!("request {id}: unknown request type {t}"),
            ),
            _ => WireError::protocol(ProtocolError::Malformed, format!("malformed frame: {e}")),
        }
    })
}

/// The request id and type number at the start of a payload, as far as they decode.
pub fn peek(payload: &[u8]) -> (u64, Option<u32>) {
    match postcard::take_from_bytes::<u64>(payload) {
        Ok((id, rest)) => (id, postcard::take_from_bytes::<u32>(rest).ok().map(|(t, _)| t)),
        Err(_) => (0, None),
    }
}

/// The frame codec for reading: 4-byte little-endian lengths, `max_frame` limit.
pub fn codec(max_frame: usize) -> tokio_util::codec::LengthDelimitedCodec {
    tokio_util::codec::LengthDelimitedCodec::builder()
        .length_field_length(LENGTH_PREFIX)
        .little_endian()
        .max_frame_length(max_frame)
        .new_codec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamed reply is byte for byte what `encode_frame` writes, for
    /// shapes from empty to multi-byte lengths, and refuses what is too large.
    #[test]
    fn neighbors_frame_matches_encode_frame() {
        for (n, k, dk, dv, id) in [
            (0, 1, 1, 1, 0u64),
            (1, 1, 1, 1, 1),
            (3, 2, 5, 7, 300),
            (64, 8, 64, 16, u64::MAX),
        ] {
            let mut r = Neighbors::empty(n, k, dk, dv);
            for (i, x) in r.keys.iter_mut().enumerate() {
                *x = i as f32 * 0.5 - 3.0;
            }
            for (i, x) in r.values.iter_mut().enumerate() {
                *x = -(i as f32);
            }
            for (i, slot) in r.ids.iter_mut().enumerate() {
                *slot = (i % 3 != 0).then_some(i as u64 * 1000);
            }
            for (i, d) in r.distances.iter_mut().enumerate() {
                *d = i as f32;
            }
            let want = encode_frame(id, &Response::Neighbors(WireNeighbors::from_neighbors(&r)), 1 << 30).unwrap();
            let f = NeighborsFrame::new(id, r.clone(), 1 << 30).unwrap();
            let got: Vec<u8> = f.parts().iter().flat_map(|p| p.iter().copied()).collect();
            assert_eq!(got, want, "{n} x {k}, dims {dk}/{dv}");
            let too_small = want.len() - LENGTH_PREFIX - 1;
            assert!(matches!(
                NeighborsFrame::new(id, r, too_small),
                Err(WireError::Protocol {
                    kind: ProtocolError::TooLarge,
                    ..
                })
            ));
        }
    }

    #[test]
    fn f32s_round_trip_bit_exact() {
        let v = [0.0f32, -0.0, 1.5, f32::MIN_POSITIVE, -3.25e7, f32::MAX];
        let frame = encode_frame(
            7,
            &Request::Search {
                queries: F32s::from_slice(&v),
                dim: 3,
                k: 2,
                filter: None,
            },
            DEFAULT_MAX_FRAME,
        )
        .unwrap();
        let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        let (id, req): (u64, Request) = decode_frame(&frame[4..]).unwrap();
        assert_eq!(id, 7);
        let Request::Search { queries, dim, k, .. } = req else {
            panic!("wrong request type")
        };
        assert!(
            matches!(queries.0, Cow::Borrowed(_)),
            "vectors are borrowed from the frame"
        );
        let got = queries.to_vec("q").unwrap();
        assert_eq!((dim, k), (3, 2));
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            v.map(|x| x.to_bits())
        );
    }

    #[test]
    fn vectors_cost_four_bytes_per_float() {
        let v = vec![1.0f32; 4096 * 64];
        let frame = encode_frame(
            1,
            &Request::Search {
                queries: F32s::from_slice(&v),
                dim: 64,
                k: 8,
                filter: None,
            },
            DEFAULT_MAX_FRAME,
        )
        .unwrap();
        assert!(
            frame.len() >= v.len() * 4 && frame.len() < v.len() * 4 + 32,
            "{}",
            frame.len()
        );
    }

    #[test]
    fn unknown_request_type_is_named() {
        let mut payload = postcard::to_stdvec(&(9u64,)).unwrap();
        payload.extend(postcard::to_stdvec(&(REQUEST_TYPES + 3)).unwrap());
        match decode_frame::<Request>(&payload) {
            Err(WireError::Protocol {
                kind: ProtocolError::UnknownRequest,
                message,
            }) => assert!(message.contains("request 9"), "{message}"),
            other => panic!("{other:?}"),
        }
        match decode_frame::<Request>(&[0x80]) {
            Err(WireError::Protocol {
                kind: ProtocolError::Malformed,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn oversized_frames_are_refused_when_encoding() {
        let v = vec![0.0f32; 1024];
        let r = encode_frame(
            1,
            &Request::Search {
                queries: F32s::from_slice(&v),
                dim: 1,
                k: 1,
                filter: None,
            },
            1000,
        );
        assert!(matches!(
            r,
            Err(WireError::Protocol {
                kind: ProtocolError::TooLarge,
                ..
            })
        ));
    }

    #[test]
    fn every_api_error_survives_the_wire() {
        let errors = vec![
            Error::DimensionMismatch {
                what: "queries",
                expected: 4,
                got: 3,
            },
            Error::Shape("x".into()),
            Error::NonFinite {
                what: "values after update",
                row: 1,
                col: 2,
            },
            Error::ZeroK,
            Error::UnknownId(5),
            Error::TagCount { got: 2, rows: 3 },
            Error::InvalidConfig("c".into()),
            Error::ConfigMismatch {
                field: "metric",
                stored: "l2".into(),
                requested: "ip".into(),
            },
            Error::OutOfOrder { expected: 3, got: 5 },
            Error::IdConflict { expected: 9, got: 8 },
            Error::Corrupt("blob".into()),
        ];
        for e in errors {
            let wire = WireError::from(&e);
            let bytes = postcard::to_stdvec(&wire).unwrap();
            let back: WireError = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(back.into_error().to_string(), e.to_string());
        }
        let storage = Error::storage(std::io::Error::other("disk on fire"));
        let back = WireError::from(&storage).into_error();
        assert!(matches!(back, Error::Storage(_)));
        assert!(back.to_string().contains("disk on fire"), "{back}");
    }
}
