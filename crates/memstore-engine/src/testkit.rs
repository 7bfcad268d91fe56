//! What every file driver (one store per file: SQLite, DuckDB) passes beyond
//! the conformance suite, written once and generic over the driver, as
//! burn's backend tests are: each file backend's tests call these cases and
//! run the conformance suite with [`FileHarness`]. Behind the `testkit`
//! feature.

use std::marker::PhantomData;
use std::path::PathBuf;

use async_trait::async_trait;
use memstore_api::testkit::Harness;
use memstore_api::testkit::util::{backup_and_close, dump, ins};
use memstore_api::{Batch, ChangeBatch, Error, MemoryConfig, MemoryStore, Metric, Result, Tags, Vectors};

use crate::driver::FileError;
use crate::{Driver, SqlStore};

/// The [`FileError`] behind a store error, if it is one.
fn file_error(e: &Error) -> Option<&FileError> {
    match e {
        Error::Storage(source) => source.downcast_ref::<FileError>(),
        _ => None,
    }
}

/// `open_existing` of a missing file is [`FileError::NotFound`] and creates
/// nothing; a store created with a configuration reopens with it.
pub async fn open_existing_uses_the_stored_config_and_never_creates<D: Driver<Location = PathBuf>>(ext: &str) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join(format!("e.{ext}"));
    match SqlStore::<D>::open_existing(path.clone()).await {
        Err(e) => assert!(matches!(file_error(&e), Some(FileError::NotFound(_))), "{e}"),
        Ok(_) => panic!("opened a store that does not exist"),
    }
    assert!(!path.exists(), "a failed open created {}", path.display());
    let c = MemoryConfig::new(3, 5)
        .with_metric(Metric::InnerProduct)
        .with_capacity(9);
    SqlStore::<D>::open(path.clone(), c.clone())
        .await
        .expect("create")
        .close()
        .await
        .expect("close");
    let s = SqlStore::<D>::open_existing(path).await.expect("reopen");
    assert_eq!(s.config(), &c);
    s.close().await.expect("close");
}

/// A second open of a file that a store holds is [`FileError::Locked`];
/// once the first closes, the file opens with its memories.
pub async fn a_second_open_of_the_same_file_is_refused_until_the_first_closes<D: Driver<Location = PathBuf>>(
    ext: &str,
) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join(format!("l.{ext}"));
    let s = SqlStore::<D>::open(path.clone(), MemoryConfig::new(2, 2))
        .await
        .expect("open");
    ins(&s, &[1.0, 2.0], &[3.0, 4.0], 1).await;
    match SqlStore::<D>::open(path.clone(), MemoryConfig::new(2, 2)).await {
        Err(e) => assert!(matches!(file_error(&e), Some(FileError::Locked(_))), "{e}"),
        Ok(_) => panic!("a second store opened a file the first holds"),
    }
    s.close().await.expect("close");
    let s = SqlStore::<D>::open(path, MemoryConfig::new(2, 2))
        .await
        .expect("reopen");
    assert_eq!(s.len().await.expect("len"), 1);
    s.close().await.expect("close");
}

/// A backup reopens as the store was at the time of the copy (tags and
/// sequence number included); later writes do not reach it; an existing
/// target is refused; a second backup works after the first.
pub async fn backup_is_a_consistent_copy<D: Driver<Location = PathBuf>>(ext: &str) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = |name: &str| dir.path().join(format!("{name}.{ext}"));
    let store = SqlStore::<D>::open(file("a"), MemoryConfig::new(2, 1))
        .await
        .expect("open");
    let keys = [0.0, 1.0, 2.0, 3.0];
    let tags = vec!["t".to_string()];
    store
        .insert(
            Batch::new(
                Vectors::new(&keys, 2).expect("keys"),
                Vectors::new(&[5.0, 6.0], 1).expect("values"),
            )
            .with_tags(Tags::Same(&tags)),
            1,
        )
        .await
        .expect("insert");
    store
        .apply(&ChangeBatch {
            seq: 1,
            tick: 2,
            touch: vec![1],
            ..Default::default()
        })
        .await
        .expect("apply");
    let before = dump(&store).await;
    store.backup_to(file("b")).await.expect("backup");
    assert!(
        store.backup_to(file("b")).await.is_err(),
        "an existing target is refused"
    );
    store.delete(&[2]).await.expect("delete");
    let copy = SqlStore::<D>::open_existing(file("b")).await.expect("open the copy");
    assert_eq!(dump(&copy).await, before);
    assert_eq!(copy.stats().await.expect("stats").counters.last_batch, 1);
    assert_eq!(store.len().await.expect("len"), 1);
    store.backup_to(file("c")).await.expect("a second backup");
    copy.close().await.expect("close");
    store.close().await.expect("close");
}

/// The lifecycle trait: a refused backup onto an existing file, a backup, a
/// close; the store and its copy reopen with the same memories.
pub async fn backs_up_and_closes_through_the_lifecycle_trait<D: Driver<Location = PathBuf>>(ext: &str) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (path, copy) = (
        dir.path().join(format!("a.{ext}")),
        dir.path().join(format!("copy.{ext}")),
    );
    let s = SqlStore::<D>::open(path.clone(), MemoryConfig::new(4, 2))
        .await
        .expect("open");
    backup_and_close(s, &path, &copy, SqlStore::<D>::open_existing).await;
}

/// The conformance suite's harness for a file driver: the store in
/// `store.<ext>` of a temporary directory, opened with `options`; "reopen"
/// closes the store and opens the file again.
pub struct FileHarness<D: Driver> {
    dir: tempfile::TempDir,
    file: String,
    options: D::Options,
    driver: PhantomData<fn() -> D>,
}

impl<D: Driver> FileHarness<D> {
    /// A harness for stores in `store.<ext>` opened with `options`.
    pub fn new(ext: &str, options: D::Options) -> Self {
        FileHarness {
            dir: tempfile::tempdir().expect("temporary directory"),
            file: format!("store.{ext}"),
            options,
            driver: PhantomData,
        }
    }
}

#[async_trait]
impl<D: Driver<Location = PathBuf>> Harness for FileHarness<D> {
    type Store = SqlStore<D>;

    async fn open(&self, config: MemoryConfig) -> Result<SqlStore<D>> {
        SqlStore::open_with(self.dir.path().join(&self.file), config, self.options.clone()).await
    }

    async fn close(&self, store: SqlStore<D>) -> Result<()> {
        store.close().await
    }
}
