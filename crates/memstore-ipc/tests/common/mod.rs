//! A `memstored` process started by a test, and helpers shared by the tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use memstore_ipc::Endpoint;

/// The daemon binary cargo built for these tests.
pub const MEMSTORED: &str = env!("CARGO_BIN_EXE_memstored");
/// The load client binary.
pub const LOAD: &str = env!("CARGO_BIN_EXE_memstore-ipc-load");

/// A running `memstored`, killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts `memstored --db DB --socket SOCKET EXTRA...` with the backend
    /// the tests run against and waits until it accepts connections.
    pub fn start(db: &Path, socket: &Path, extra: &[&str]) -> Daemon {
        let mut args = vec!["--db".as_ref(), db.as_os_str()];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        Self::start_args(socket, &args)
    }

    /// Starts `memstored --socket SOCKET ARGS...` with the backend the tests
    /// run against and waits until it accepts connections.
    pub fn start_args(socket: &Path, args: &[&std::ffi::OsStr]) -> Daemon {
        let mut cmd = Command::new(MEMSTORED);
        cmd.arg("--socket")
            .arg(socket)
            .args(["--log", "warn"])
            .args(["--backend", &backend()])
            .args(args);
        // Backups go to the tests' directory (the socket's), unless a test
        // names another.
        if !args.iter().any(|a| *a == "--backup-dir") {
            cmd.arg("--backup-dir").arg(socket.parent().unwrap_or(Path::new(".")));
        }
        let child = cmd.stdin(Stdio::null()).spawn().expect("spawn memstored");
        let mut d = Daemon {
            child,
            socket: socket.to_path_buf(),
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let t0 = Instant::now();
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("memstored exited before listening: {status}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "memstored did not start listening"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the process is still running.
    pub fn child_alive(&self) -> bool {
        // SAFETY: kill(pid, 0) only checks that the process exists.
        unsafe { libc::kill(self.child.id() as libc::pid_t, 0) == 0 }
    }

    /// Its endpoint.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.socket.clone())
    }

    /// Sends `signal` and waits for the exit.
    pub fn signal_and_wait(mut self, signal: i32) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        self.child.wait().expect("wait for memstored")
    }

    /// SIGTERM, then the exit status.
    pub fn stop(self) -> ExitStatus {
        self.signal_and_wait(libc::SIGTERM)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The backend the daemon tests run against: `$MEMSTORE_IPC_BACKEND`
/// (`sqlite` unless set; CI also runs the conformance suite with `duckdb`).
pub fn backend() -> String {
    std::env::var("MEMSTORE_IPC_BACKEND").unwrap_or_else(|_| "sqlite".into())
}

/// The conformance suite's harness: a `memstored` process per store, started
/// at the first open and stopped gracefully (SIGTERM, which must exit 0) at
/// close, so every reopen in the suite also checks that a restart loses
/// nothing.
pub struct DaemonHarness {
    dir: tempfile::TempDir,
    daemon: std::sync::Mutex<Option<Daemon>>,
    /// Serve a named store of `memstored --stores DIR --index hnsw` instead of `--db`.
    named_hnsw: bool,
}

impl DaemonHarness {
    /// The daemon's own store (`--db`), exact search.
    pub fn plain() -> Self {
        Self::new(false)
    }

    /// The store `block0` of a daemon serving named stores with the HNSW index.
    pub fn named_hnsw() -> Self {
        Self::new(true)
    }

    fn new(named_hnsw: bool) -> Self {
        DaemonHarness {
            dir: tempfile::tempdir().expect("temporary directory"),
            daemon: std::sync::Mutex::new(None),
            named_hnsw,
        }
    }

    fn start(&self) -> Daemon {
        let socket = self.dir.path().join("d.sock");
        if self.named_hnsw {
            let stores = self.dir.path().join("stores");
            let args: [&std::ffi::OsStr; 4] = [
                "--stores".as_ref(),
                stores.as_os_str(),
                "--index".as_ref(),
                "hnsw".as_ref(),
            ];
            Daemon::start_args(&socket, &args)
        } else {
            Daemon::start(&self.dir.path().join("store.db"), &socket, &[])
        }
    }
}

#[async_trait::async_trait]
impl memstore_api::testkit::Harness for DaemonHarness {
    type Store = memstore_ipc::IpcStore;

    async fn open(&self, config: memstore_api::MemoryConfig) -> memstore_api::Result<Self::Store> {
        let endpoint = {
            let mut d = self.daemon.lock().unwrap();
            d.get_or_insert_with(|| self.start()).endpoint()
        };
        let options = {
            let mut o = memstore_ipc::ClientOptions::default();
            o.store = self.named_hnsw.then(|| "block0".to_string());
            o
        };
        memstore_ipc::IpcStore::connect_with(&endpoint, Some(config), options).await
    }

    async fn close(&self, store: Self::Store) -> memstore_api::Result<()> {
        store.close().await?;
        let d = self.daemon.lock().unwrap().take();
        if let Some(d) = d {
            let status = d.stop();
            assert!(status.success(), "memstored exited with {status} on SIGTERM");
        }
        Ok(())
    }
}
