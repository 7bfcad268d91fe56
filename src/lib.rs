#![doc = include_str!("../README.md")]
//!
//! ---
//!
//! This facade re-exports [`memstore_api`] (the trait, types, errors and the
//! reference [`InMemoryStore`]) and, behind features, the backends:
//! `sqlite` (default) gives [`SqliteStore`].

pub use memstore_api::*;

#[cfg(feature = "sqlite")]
pub use memstore_sqlite::{SqliteError, SqliteOptions, SqliteStore, SqliteSynchronous};
