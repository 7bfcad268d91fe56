//! `IpcStore` runs the conformance suite for approximate stores against a
//! `memstored --index hnsw` process started by the test, through a named store
//! of a daemon serving a directory of them (`--stores DIR`, as
//! `distill_gpt2 --store ipc:SOCKET` uses it). "Close" stops the daemon
//! gracefully (SIGTERM, which must exit 0; it saves the graph) and "open"
//! starts it again (which loads the graph or rebuilds it from the rows).

mod common;

use std::sync::Mutex;

use async_trait::async_trait;
use common::Daemon;
use memstore_api::testkit::Harness;
use memstore_api::{MemoryConfig, Result};
use memstore_ipc::{ClientOptions, IpcStore};

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
                let stores = self.dir.path().join("stores");
                Daemon::start_args(
                    &self.dir.path().join("d.sock"),
                    &[
                        "--stores".as_ref(),
                        stores.as_os_str(),
                        "--index".as_ref(),
                        "hnsw".as_ref(),
                    ],
                )
            });
            d.endpoint()
        };
        let options = ClientOptions {
            store: Some("block0".into()),
            ..ClientOptions::default()
        };
        IpcStore::connect_with(&endpoint, Some(config), options).await
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

memstore_api::conformance_suite!(approximate: DaemonHarness::new());
