//! `IpcStore` runs the whole conformance suite against a `memstored` process
//! started by the test. "Close" stops the daemon gracefully (SIGTERM, which
//! must exit 0) and "open" starts it again, so every reopen in the suite also
//! checks that a daemon restart loses nothing.

mod common;

use std::sync::Mutex;

use async_trait::async_trait;
use common::Daemon;
use memstore_api::testkit::Harness;
use memstore_api::{MemoryConfig, Result};
use memstore_ipc::IpcStore;

struct DaemonHarness {
    dir: tempfile::TempDir,
    daemon: Mutex<Option<Daemon>>,
}

impl DaemonHarness {
    fn new() -> Self {
        DaemonHarness {
            dir: tempfile::tempdir().expect("temporary directory"),
            daemon: Mutex::new(None),
        }
    }
}

#[async_trait]
impl Harness for DaemonHarness {
    type Store = IpcStore;

    async fn open(&self, config: MemoryConfig) -> Result<IpcStore> {
        let endpoint = {
            let mut d = self.daemon.lock().unwrap();
            let d = d.get_or_insert_with(|| {
                Daemon::start(&self.dir.path().join("store.db"), &self.dir.path().join("d.sock"), &[])
            });
            d.endpoint()
        };
        IpcStore::connect(&endpoint, Some(config)).await
    }

    async fn close(&self, store: IpcStore) -> Result<()> {
        store.close().await?;
        let d = self.daemon.lock().unwrap().take();
        if let Some(d) = d {
            let status = d.stop();
            assert!(status.success(), "memstored exited with {status} on SIGTERM");
        }
        Ok(())
    }
}

memstore_api::conformance_suite!(DaemonHarness::new());
