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
        let child = Command::new(MEMSTORED)
            .arg("--socket")
            .arg(socket)
            .args(["--log", "warn"])
            .args(["--backend", &backend()])
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn memstored");
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
