//! The errors of the `memstore` command line.

use std::path::PathBuf;

/// Everything a `memstore` subcommand can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The store refused or failed (a bad URL, a missing store, an unknown id, ...).
    #[error(transparent)]
    Store(#[from] memstore::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file that must not exist does (an export, a backup, an import's new store).
    #[error("{0} exists already (this command writes a new file)")]
    Exists(PathBuf),
    /// An input file that is not what the command reads.
    #[error("{what}, line {line}: {why}")]
    Parse {
        /// The input (a file name, or stdin).
        what: String,
        /// The line (1-based).
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// Arguments that do not fit together or do not fit the store.
    #[error("{0}")]
    Usage(String),
    /// The store to import into holds memories already.
    #[error("{0} is not empty: import creates a store, it does not merge into one")]
    NotEmpty(String),
    /// `check` found problems (listed on stdout).
    #[error("check found {0} problem(s)")]
    Check(usize),
}
