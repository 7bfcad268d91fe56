//! Helpers that every [`crate::Driver`] shares when it opens a store and
//! writes rows, so that a driver holds only its SQL.
//!
//! - [`lock_file`]: one store owns a file at a time (the index is per
//!   process), through an exclusive advisory lock on `<path>.lock`;
//!   [`FileError`] says why a file could not be opened.
//! - [`resolve_config`]: the stored configuration against the caller's.
//! - [`StoredConfig`]: the configuration row as SQL columns hold it.
//! - [`Loader`]: builds the index from the rows read on open, checking each.
//! - [`expect_rows`]: a statement changed exactly the rows the plan named.
//! - [`reprioritised`]: the access rows to rewrite when λ changes.
//! - [`changes_between`]: what other clients of a shared store committed,
//!   as changes the index applies.
//! - [`sync_parent`] and [`install_copy`]: durable file replacement (a
//!   restored backup put in place of a closed store file).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memstore_api::{Counters, Error, EvictionPolicy, Memory, MemoryConfig, MemoryId, Metric, Result};

use crate::MemoryIndex;
use crate::index::{AccessUpdate, Changes, Meta};

/// Why a store kept in a file could not be opened; converted into
/// [`memstore_api::Error::Storage`] with this error as the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// The file to open does not exist.
    #[error("no memstore database at {0}")]
    NotFound(PathBuf),
    /// Another store (in this or another process) has the file open.
    #[error("{0} is open in another store (lock file held); share a store between processes with memstored")]
    Locked(PathBuf),
    /// The lock file could not be created or locked.
    #[error("lock file {0}: {1}")]
    LockFile(PathBuf, #[source] std::io::Error),
}

impl From<FileError> for Error {
    fn from(e: FileError) -> Self {
        Error::storage(e)
    }
}

/// `path` exists: an existing store is opened, never created.
pub fn require_file(path: &Path) -> Result<()> {
    if path.exists() {
        Ok(())
    } else {
        Err(FileError::NotFound(path.to_path_buf()).into())
    }
}

/// How long an open waits for a lock held by someone else before failing.
const LOCK_GRACE: Duration = Duration::from_millis(300);

/// Takes the exclusive advisory lock on `<path>.lock` that makes one store
/// the only owner of `path`; the lock lasts as long as the returned file
/// (the kernel releases it if the process dies).
pub fn lock_file(path: &Path) -> Result<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| FileError::LockFile(lock_path.clone(), e))?;
    // A lock just released can still be held for a moment by a child
    // process forked between our open and its exec (the descriptor is shared
    // until exec closes it): retry briefly before calling the file locked.
    let deadline = Instant::now() + LOCK_GRACE;
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(std::fs::TryLockError::WouldBlock) => return Err(FileError::Locked(path.to_path_buf()).into()),
            Err(std::fs::TryLockError::Error(e)) => return Err(FileError::LockFile(lock_path, e).into()),
        }
    }
}

/// What to do with the stored configuration row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigWrite {
    /// The store is new: create its schema and insert the row.
    Create,
    /// The caller changed a tunable field: update the row.
    Update,
    /// Nothing changed.
    Keep,
}

/// The configuration a store opens with, and what that means for its rows.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The configuration in force.
    pub config: MemoryConfig,
    /// What to do with the stored row.
    pub write: ConfigWrite,
    /// λ changed: the stored priorities must be recomputed ([`reprioritised`]).
    pub lambda_changed: bool,
}

/// Reconciles the configuration stored in a store (`None` for a new one)
/// with the caller's (`None` to open with the stored one): a new store takes
/// the caller's; an existing one must match its dimensions and metric and
/// takes the caller's tunable fields. `place` names the store in errors.
pub fn resolve_config(stored: Option<MemoryConfig>, given: Option<MemoryConfig>, place: &str) -> Result<Resolved> {
    match (stored, given) {
        (None, None) => Err(Error::Corrupt(format!("{place} has no memstore configuration"))),
        (None, Some(config)) => Ok(Resolved {
            config,
            write: ConfigWrite::Create,
            lambda_changed: false,
        }),
        (Some(config), None) => Ok(Resolved {
            config,
            write: ConfigWrite::Keep,
            lambda_changed: false,
        }),
        (Some(stored), Some(config)) => {
            config.check_compatible(&stored)?;
            Ok(Resolved {
                lambda_changed: stored.eviction.lambda() != config.eviction.lambda(),
                write: if stored == config {
                    ConfigWrite::Keep
                } else {
                    ConfigWrite::Update
                },
                config,
            })
        }
    }
}

/// The configuration row as every SQL schema of memstore stores it.
#[derive(Clone, Debug)]
pub struct StoredConfig {
    /// `key_dim`.
    pub key_dim: i64,
    /// `value_dim`.
    pub value_dim: i64,
    /// `metric`, as [`Metric::as_str`] writes it.
    pub metric: String,
    /// `capacity` (NULL for none).
    pub capacity: Option<i64>,
    /// `lrfu_lambda`.
    pub lrfu_lambda: f64,
    /// `novelty`.
    pub novelty: f64,
    /// `recombine`.
    pub recombine: f64,
}

impl StoredConfig {
    /// The row of `c`.
    pub fn new(c: &MemoryConfig) -> Self {
        StoredConfig {
            key_dim: c.key_dim as i64,
            value_dim: c.value_dim as i64,
            metric: c.metric.as_str().to_owned(),
            capacity: c.capacity.map(|x| x as i64),
            lrfu_lambda: c.eviction.lambda(),
            novelty: c.novelty as f64,
            recombine: c.recombine as f64,
        }
    }

    /// The configuration the row holds, checked as a caller's would be; a
    /// row that does not make a valid configuration is corruption.
    pub fn decode(&self) -> Result<MemoryConfig> {
        let metric =
            Metric::parse(&self.metric).ok_or_else(|| Error::Corrupt(format!("unknown metric {:?}", self.metric)))?;
        let dim = |v: i64, what: &str| usize::try_from(v).map_err(|_| Error::Corrupt(format!("{what} = {v}")));
        let config = MemoryConfig {
            key_dim: dim(self.key_dim, "key_dim")?,
            value_dim: dim(self.value_dim, "value_dim")?,
            metric,
            capacity: self.capacity.map(|c| dim(c, "capacity")).transpose()?,
            eviction: EvictionPolicy::Lrfu {
                lambda: self.lrfu_lambda,
            },
            novelty: self.novelty as f32,
            recombine: self.recombine as f32,
        };
        config
            .validate()
            .map_err(|e| Error::Corrupt(format!("stored configuration: {e}")))?;
        Ok(config)
    }
}

/// Builds a [`MemoryIndex`] from the rows a driver reads on open: tags
/// first, then memories in any order, then the store's counters. Every row
/// is checked (a finite key of the right shape, a positive finite CRF, no id
/// twice, a value of the right shape where values are kept), and a failed
/// check is [`Error::Corrupt`].
pub struct Loader {
    index: MemoryIndex,
    tags: HashMap<i64, BTreeMap<String, u64>>,
}

impl Loader {
    /// An empty index for `config`, keeping values when `values`.
    pub fn new(config: &MemoryConfig, values: bool) -> Self {
        let mut index = MemoryIndex::new(config.clone());
        if values {
            index = index.with_values();
        }
        Loader {
            index,
            tags: HashMap::new(),
        }
    }

    /// Memory `id` carries tag `name` `count` times.
    pub fn tag(&mut self, id: i64, name: String, count: i64) {
        self.tags.entry(id).or_default().insert(name, count as u64);
    }

    /// Adds memory `id` (its tags must have been given already).
    #[allow(clippy::too_many_arguments)]
    pub fn memory(
        &mut self,
        id: i64,
        key: &[f32],
        value: Option<&[f32]>,
        created: i64,
        last_access: i64,
        access_count: i64,
        crf: f64,
    ) -> Result<()> {
        if key.iter().any(|x| !x.is_finite()) {
            return Err(Error::Corrupt(format!("memory {id} has a non-finite key")));
        }
        if !(crf.is_finite() && crf > 0.0) {
            return Err(Error::Corrupt(format!("memory {id} has crf {crf}")));
        }
        let meta = Meta {
            created: created as u64,
            last_access: last_access as u64,
            access_count: access_count as u64,
            crf,
            tags: self.tags.remove(&id).unwrap_or_default(),
        };
        self.index.load(id as MemoryId, key, value, meta)
    }

    /// The index, with the store's next id and counters; `next_id` must be
    /// above every loaded id.
    pub fn finish(mut self, next_id: i64, counters: Counters) -> Result<MemoryIndex> {
        let next_id = next_id as MemoryId;
        if self.index.next_id() > next_id {
            return Err(Error::Corrupt(format!(
                "next_id {next_id} is not above every stored id ({})",
                self.index.next_id() - 1
            )));
        }
        self.index.set_state(next_id, counters);
        Ok(self.index)
    }
}

/// Checks that a statement changed exactly the rows the plan expects; a
/// difference means the store was changed behind its back.
pub fn expect_rows(done: u64, what: &str, want: usize) -> Result<()> {
    if done != want as u64 {
        return Err(Error::Corrupt(format!(
            "{what} changed {done} rows where the index expected {want}"
        )));
    }
    Ok(())
}

/// Every memory's access row with its priority under the index's λ: what a
/// driver rewrites when the caller changes λ (the stored priority column
/// depends on it).
pub fn reprioritised(index: &MemoryIndex) -> Vec<AccessUpdate> {
    let lambda = index.config().eviction.lambda();
    index
        .ids()
        .iter()
        .filter_map(|&id| {
            index.meta(id).map(|m| AccessUpdate {
                id,
                last_access: m.last_access,
                access_count: m.access_count,
                crf: m.crf,
                priority: memstore_api::math::priority(lambda, m.crf, m.last_access),
            })
        })
        .collect()
}

/// The changes that bring `index` to a state of a shared store read from
/// its database: `rows` are the memories written since the version the
/// index reflects (complete; values may be empty where the index keeps
/// none), `deleted` the ids deleted since, and `next_id` and `counters`
/// the store's. With `whole`, `rows` are every memory of the store and any
/// other memory of the index is removed (a client too far behind to read
/// the deletions). A memory the index holds becomes access, value and tag
/// updates; one it does not, an insertion; one whose key differs is
/// removed and inserted again.
pub fn changes_between(
    index: &MemoryIndex,
    mut rows: Vec<Memory>,
    deleted: &[MemoryId],
    whole: bool,
    next_id: MemoryId,
    counters: Counters,
) -> Changes {
    let lambda = index.config().eviction.lambda();
    rows.sort_unstable_by_key(|m| m.id);
    let written: HashSet<MemoryId> = rows.iter().map(|m| m.id).collect();
    let mut removed: BTreeSet<MemoryId> = deleted
        .iter()
        .copied()
        .filter(|id| index.contains(*id) && !written.contains(id))
        .collect();
    if whole {
        removed.extend(index.ids().iter().copied().filter(|id| !written.contains(id)));
    }
    let mut changes = Changes {
        next_id,
        counters,
        ..Changes::default()
    };
    for m in rows {
        let same_key = index.key(m.id).map(|k| k == m.key.as_slice());
        match (same_key, index.meta(m.id)) {
            (Some(true), Some(meta)) => {
                if (meta.last_access, meta.access_count, meta.crf) != (m.last_access, m.access_count, m.crf) {
                    changes.accessed.push(AccessUpdate {
                        id: m.id,
                        last_access: m.last_access,
                        access_count: m.access_count,
                        crf: m.crf,
                        priority: memstore_api::math::priority(lambda, m.crf, m.last_access),
                    });
                }
                if meta.tags != m.tags {
                    changes.retagged.push((m.id, m.tags));
                }
                if index.holds_values() && index.value(m.id) != Some(m.value.as_slice()) {
                    changes.values.push((m.id, m.value));
                }
            }
            (Some(_), _) => {
                removed.insert(m.id);
                changes.inserted.push(m);
            }
            (None, _) => changes.inserted.push(m),
        }
    }
    changes.removed = removed.into_iter().collect();
    changes
}

/// Makes `file`'s entry in its directory durable (after the file was
/// created or renamed there).
pub fn sync_parent(file: &Path) -> std::io::Result<()> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// A named file step of a restore, which a test can make fail with an I/O
/// error (`fail::cfg(NAME, "return")`); a lookup in `fail`'s registry
/// otherwise.
macro_rules! failpoint {
    ($name:literal) => {{
        // `fail_point!` returns from its function: a closure of its own.
        #[allow(clippy::redundant_closure_call)]
        (|| -> std::io::Result<()> {
            fail::fail_point!($name, |_| Err(std::io::Error::other(concat!(
                "injected failure at ",
                $name
            ))));
            Ok(())
        })()
    }};
}

/// The restore's file steps, each of which a failpoint can fail.
pub const RESTORE_STEPS: [&str; 5] = [
    "restore::copy",
    "restore::sync_copy",
    "restore::remove_wal",
    "restore::rename",
    "restore::sync_dir",
];

fn with_path(what: &Path, e: std::io::Error) -> Error {
    Error::storage(std::io::Error::new(e.kind(), format!("{}: {e}", what.display())))
}

/// Removes the files a store keeps beside `file` (its write-ahead logs and
/// lock file), where there are any.
pub fn remove_side_files(file: &Path) {
    for suffix in ["-wal", "-shm", ".wal", ".lock"] {
        let mut p = file.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// Copies the backup `from` beside the store file `file` (as
/// `<file>.restoring`, replacing a copy a failed restore left, and its
/// logs, which would otherwise be replayed into the new copy) and returns
/// the copy's path. The store file is not touched.
pub fn copy_beside(from: &Path, file: &Path) -> Result<PathBuf> {
    if !from.is_file() {
        return Err(Error::Shape(format!("no backup at {}", from.display())));
    }
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(".restoring");
    let tmp = PathBuf::from(tmp);
    remove_side_files(&tmp);
    failpoint!("restore::copy")
        .and_then(|()| std::fs::copy(from, &tmp))
        .map_err(|e| with_path(&tmp, e))?;
    Ok(tmp)
}

/// Puts `copy` (a file beside it) in place of the closed store file `file`:
/// the copy is synced, the old store's write-ahead logs (`-wal`, `-shm`,
/// `.wal`) are removed, the copy is renamed over `file`, and the directory
/// is synced, so the replacement is durable when this returns. A failure
/// before the rename leaves `file` as it was (a closed store's logs hold
/// nothing: closing checkpoints them); after it, the copy is in place.
pub fn install_copy(copy: &Path, file: &Path) -> Result<()> {
    failpoint!("restore::sync_copy")
        .and_then(|()| std::fs::File::open(copy))
        .and_then(|f| f.sync_all())
        .map_err(|e| with_path(copy, e))?;
    for suffix in ["-wal", "-shm", ".wal"] {
        let mut p = file.as_os_str().to_owned();
        p.push(suffix);
        let p = PathBuf::from(p);
        if p.exists() {
            failpoint!("restore::remove_wal")
                .and_then(|()| std::fs::remove_file(&p))
                .map_err(|e| with_path(&p, e))?;
        }
    }
    failpoint!("restore::rename")
        .and_then(|()| std::fs::rename(copy, file))
        .map_err(|e| with_path(file, e))?;
    failpoint!("restore::sync_dir")
        .and_then(|()| sync_parent(file))
        .map_err(|e| with_path(file, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MemoryConfig {
        MemoryConfig::new(4, 2)
    }

    #[test]
    fn stored_config_round_trips_and_rejects_nonsense() {
        let c = cfg().with_capacity(10);
        assert_eq!(StoredConfig::new(&c).decode().unwrap(), c);
        let mut row = StoredConfig::new(&c);
        row.metric = "manhattan".into();
        assert!(matches!(row.decode(), Err(Error::Corrupt(_))));
        let mut row = StoredConfig::new(&c);
        row.key_dim = -1;
        assert!(matches!(row.decode(), Err(Error::Corrupt(_))));
        let mut row = StoredConfig::new(&c);
        row.key_dim = 0;
        assert!(matches!(row.decode(), Err(Error::Corrupt(_))));
    }

    #[test]
    fn resolve_config_creates_keeps_updates_and_refuses() {
        let c = cfg();
        assert!(matches!(resolve_config(None, None, "x"), Err(Error::Corrupt(_))));
        assert_eq!(
            resolve_config(None, Some(c.clone()), "x").unwrap().write,
            ConfigWrite::Create
        );
        assert_eq!(
            resolve_config(Some(c.clone()), None, "x").unwrap().write,
            ConfigWrite::Keep
        );
        assert_eq!(
            resolve_config(Some(c.clone()), Some(c.clone()), "x").unwrap().write,
            ConfigWrite::Keep
        );
        let bigger = c.clone().with_capacity(5);
        let r = resolve_config(Some(c.clone()), Some(bigger.clone()), "x").unwrap();
        assert_eq!(
            (r.write, r.lambda_changed, r.config),
            (ConfigWrite::Update, false, bigger)
        );
        let other_lambda = c.clone().with_eviction(EvictionPolicy::Lrfu { lambda: 0.1 });
        assert!(
            resolve_config(Some(c.clone()), Some(other_lambda), "x")
                .unwrap()
                .lambda_changed
        );
        assert!(resolve_config(Some(c), Some(MemoryConfig::new(5, 2)), "x").is_err());
    }

    #[test]
    fn install_copy_replaces_the_file_and_drops_its_logs() {
        let dir = tempfile::tempdir().unwrap();
        let (file, copy) = (dir.path().join("s.db"), dir.path().join("s.db.restoring"));
        std::fs::write(&file, b"old").unwrap();
        std::fs::write(dir.path().join("s.db-wal"), b"log").unwrap();
        std::fs::write(&copy, b"new").unwrap();
        install_copy(&copy, &file).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        assert!(!copy.exists() && !dir.path().join("s.db-wal").exists());
        assert!(install_copy(&copy, &file).is_err(), "no copy: an error, the file kept");
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
    }

    #[test]
    fn changes_between_bring_an_index_to_the_rows_read() {
        let c = cfg();
        let mem = |id: MemoryId, x: f32, count: u64, tag: Option<&str>| Memory {
            id,
            key: vec![x; 4],
            value: vec![x, -x],
            created: 1,
            last_access: count,
            access_count: count,
            crf: 1.0,
            tags: tag.map(|t| BTreeMap::from([(t.to_string(), 1)])).unwrap_or_default(),
        };
        let build = |rows: &[Memory]| {
            let mut l = Loader::new(&c, true);
            for m in rows {
                for (t, n) in &m.tags {
                    l.tag(m.id as i64, t.clone(), *n as i64);
                }
                l.memory(
                    m.id as i64,
                    &m.key,
                    Some(&m.value),
                    1,
                    m.last_access as i64,
                    m.access_count as i64,
                    m.crf,
                )
                .unwrap();
            }
            l.finish(10, Counters::default()).unwrap()
        };
        let before = [
            mem(1, 1.0, 1, None),
            mem(2, 2.0, 1, None),
            mem(3, 3.0, 1, None),
            mem(4, 4.0, 1, None),
        ];
        // 1 unchanged, 2 accessed and tagged, 3 deleted, 4 with another key
        // (removed and inserted again), 5 new.
        let mut two = mem(2, 2.0, 3, Some("t"));
        two.value = vec![9.0, 9.0];
        let after = [mem(1, 1.0, 1, None), two, mem(4, 40.0, 1, None), mem(5, 5.0, 1, None)];
        let counters = Counters {
            inserted: 5,
            deleted: 1,
            ..Counters::default()
        };
        let mut index = build(&before);
        let changes = changes_between(&index, after[1..].to_vec(), &[3], false, 6, counters);
        assert_eq!(changes.removed, vec![3, 4]);
        assert_eq!(changes.inserted.iter().map(|m| m.id).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(changes.accessed.len(), 1);
        index.apply(&changes).unwrap();
        let want = build(&after);
        let all = |i: &MemoryIndex| {
            let mut ids = i.ids().to_vec();
            ids.sort_unstable();
            i.memories(&ids, &HashMap::new()).unwrap()
        };
        assert_eq!(all(&index), all(&want));
        assert_eq!((index.next_id(), index.counters()), (6, counters));
        // A whole reload removes what the rows do not name.
        let mut index = build(&before);
        let changes = changes_between(&index, after.to_vec(), &[], true, 6, counters);
        index.apply(&changes).unwrap();
        assert_eq!(all(&index), all(&want));
    }

    #[test]
    fn loader_checks_every_row() {
        let c = cfg();
        let mut l = Loader::new(&c, false);
        assert!(l.memory(1, &[f32::NAN, 0.0, 0.0, 0.0], None, 0, 0, 1, 1.0).is_err());
        let mut l = Loader::new(&c, false);
        assert!(l.memory(1, &[0.0; 4], None, 0, 0, 1, 0.0).is_err());
        let mut l = Loader::new(&c, false);
        assert!(l.memory(1, &[0.0; 3], None, 0, 0, 1, 1.0).is_err());
        let mut l = Loader::new(&c, true);
        assert!(l.memory(1, &[0.0; 4], None, 0, 0, 1, 1.0).is_err());
        let mut l = Loader::new(&c, false);
        l.tag(7, "a".into(), 2);
        l.memory(7, &[0.0; 4], None, 1, 2, 3, 1.0).unwrap();
        assert!(l.memory(7, &[0.0; 4], None, 1, 2, 3, 1.0).is_err());
        let mut l = Loader::new(&c, false);
        l.memory(7, &[0.0; 4], None, 1, 2, 3, 1.0).unwrap();
        assert!(matches!(l.finish(7, Counters::default()), Err(Error::Corrupt(_))));
        let mut l = Loader::new(&c, false);
        l.tag(7, "a".into(), 2);
        l.memory(7, &[0.0; 4], None, 1, 2, 3, 1.0).unwrap();
        let index = l.finish(8, Counters::default()).unwrap();
        assert_eq!(index.next_id(), 8);
        assert_eq!(index.meta(7).unwrap().tags.get("a"), Some(&2));
    }
}
