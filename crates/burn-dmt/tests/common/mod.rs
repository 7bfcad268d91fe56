//! Shared helpers of the burn-dmt tests: fixture paths, reference tensors,
//! a tiny distillation setup (`tiny`, shared with the root's tests).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::tensor::{Int, Tensor, TensorData};
use burn_dmt::burn;
use burn_dmt::burn::tensor::Device;

/// A fixture directory under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

mod tiny;
#[allow(unused_imports)] // not every test uses the tiny setup
pub use tiny::{TEACHER_SEED, assets, options, tiny_setup};

/// One reference tensor: shape and values (ints as f64 too).
pub struct Ref {
    pub shape: Vec<usize>,
    pub f32s: Vec<f32>,
    pub i64s: Vec<i64>,
}

/// Every tensor of a fixture's `reference.safetensors`.
pub fn reference(dir: &str) -> BTreeMap<String, Ref> {
    let bytes = std::fs::read(fixture(dir).join("reference.safetensors")).expect("reference file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let (f32s, i64s) = match view.dtype() {
            safetensors::Dtype::F32 => (
                d.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                vec![],
            ),
            safetensors::Dtype::I64 => (
                vec![],
                d.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            other => panic!("unexpected dtype {other:?}"),
        };
        out.insert(
            name,
            Ref {
                shape: view.shape().to_vec(),
                f32s,
                i64s,
            },
        );
    }
    out
}

/// Ids as a `[b, t]` tensor.
pub fn ids(r: &Ref, device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(r.i64s.clone(), [r.shape[0], r.shape[1]]), device)
}

/// Values of a tensor.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Serves named SQLite stores from `dir` on `dir/memstored.sock` with
/// memstore-ipc's daemon core (what `memstored --stores DIR` runs), until dropped.
pub struct Daemon {
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The daemon's socket.
    pub socket: std::path::PathBuf,
}

impl Daemon {
    /// Starts serving `dir`.
    pub fn start(dir: &std::path::Path) -> Daemon {
        use memstore_ipc::{Server, ServerOptions, SqliteOpener, server};
        std::fs::create_dir_all(dir).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let socket = dir.join("memstored.sock");
        let guard = rt.enter();
        let template = SqliteOpener {
            path: std::path::PathBuf::new(),
            options: Default::default(),
        };
        // Checkpoints go to run directories beside the stores' directory.
        let options = {
            let mut o = ServerOptions::default();
            o.stores_dir = Some(dir.to_path_buf());
            o.backup_dir = dir.parent().map(std::path::Path::to_path_buf);
            o
        };
        let s = Server::named_only(template, options).unwrap();
        let listener = server::bind_unix(&socket, 0o600).unwrap();
        let task = rt.spawn(async move {
            s.serve(vec![listener], async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
            .unwrap()
        });
        drop(guard);
        let thread = std::thread::spawn(move || rt.block_on(task).unwrap());
        Daemon {
            stop,
            thread: Some(thread),
            socket,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A writer into a shared buffer, for [`logged`].
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `f` with a subscriber on this thread that formats the `tracing`
/// events it emits (info and above, one line each, as the examples print
/// them) and returns `f`'s result with those lines.
pub fn logged<R>(f: impl FnOnce() -> R) -> (R, Vec<String>) {
    let buf = Captured::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .without_time()
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let r = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    (r, text.lines().map(str::to_string).collect())
}
