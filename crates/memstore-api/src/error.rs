//! The one error type of the memstore API. Backends convert their own errors
//! into [`Error::Storage`], keeping the cause as the error's source.

use crate::MemoryId;

/// Everything a memory-store operation can fail with.
///
/// Input errors (dimension mismatch, non-finite numbers, `k = 0`, unknown ids,
/// bad tag counts) are detected before anything is written: a rejected batch
/// changes nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A vector's dimension differs from the store's configured dimension.
    #[error("dimension mismatch: {what} have dimension {got}, the store expects {expected}")]
    DimensionMismatch {
        /// Which input ("keys", "values", "queries", "deltas").
        what: &'static str,
        /// The store's dimension.
        expected: usize,
        /// The dimension given.
        got: usize,
    },
    /// A flat buffer is not a whole number of rows, or two inputs disagree on the row count.
    #[error("shape error: {0}")]
    Shape(String),
    /// A NaN or infinite number was passed in.
    #[error("non-finite number in {what}, row {row}, column {col}")]
    NonFinite {
        /// Which input.
        what: &'static str,
        /// Row of the offending number.
        row: usize,
        /// Column of the offending number.
        col: usize,
    },
    /// `k` was zero.
    #[error("k must be at least 1")]
    ZeroK,
    /// An id that is not (or no longer) in the store.
    #[error("unknown memory id {0}")]
    UnknownId(MemoryId),
    /// The tag sets given do not match the number of rows.
    #[error("{got} tag sets given for {rows} rows (give none, one for all rows, or one per row)")]
    TagCount {
        /// Number of tag sets.
        got: usize,
        /// Number of rows.
        rows: usize,
    },
    /// A configuration that cannot work (zero dimension, thresholds out of order, ...).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The store on disk was created with a different dimension or metric.
    #[error("config mismatch: the store has {field} = {stored}, but was opened with {requested}")]
    ConfigMismatch {
        /// The field that differs.
        field: &'static str,
        /// The persisted value.
        stored: String,
        /// The value asked for.
        requested: String,
    },
    /// A change batch whose sequence number does not follow the store's last.
    #[error("change batch {got} is out of order: the store expects batch {expected}")]
    OutOfOrder {
        /// The sequence number the store accepts next.
        expected: u64,
        /// The batch's sequence number.
        got: u64,
    },
    /// A change batch's inserts do not start at the store's next id (another
    /// writer changed the store since the batch was planned).
    #[error("the batch's inserts start at id {got}, but the store's next id is {expected}")]
    IdConflict {
        /// The store's next id.
        expected: MemoryId,
        /// The batch's first id.
        got: MemoryId,
    },
    /// Stored data that cannot be decoded (wrong blob length, impossible values).
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// The backend failed (I/O, SQL, network); the cause is kept as the source.
    #[error("storage error: {0}")]
    Storage(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl Error {
    /// Wraps any backend error as [`Error::Storage`].
    pub fn storage<E: std::error::Error + Send + Sync + 'static>(e: E) -> Self {
        Error::Storage(Box::new(e))
    }
}

/// Result alias used throughout the API.
pub type Result<T, E = Error> = std::result::Result<T, E>;
