//! The distillation pipeline end to end at a tiny size: a few steps with
//! both memory layer types, a report whose numbers are finite and consistent,
//! a self-contained run directory, and `--eval-only` reproducing the final
//! evaluation from it.

mod common;

use std::path::Path;

use burn_dmt::burn::tensor::Device;
use burn_dmt::distill::{DistillOptions, eval_only, run};
use burn_dmt::tokenizer::{Gpt2Tokenizer, VocabMap};
use burn_dmt::{Gpt2, Gpt2Config};
use common::assets;

/// A random GPT-2 teacher with a compact vocabulary over a slice of the
/// corpus; returns (training text, held-out text) files.
fn tiny_setup(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let text = std::fs::read_to_string(assets().join("data/tinyshakespeare.txt")).unwrap();
    let text: String = text.chars().take(24_000).collect();
    let (train, eval) = text.split_at(20_000);
    let tok = Gpt2Tokenizer::from_dir(assets().join("gpt2-tokenizer")).unwrap();
    let map = VocabMap::from_corpus(&tok.encode(train).unwrap(), 50256);
    let teacher = dir.join("teacher");
    let config = Gpt2Config::new(2, 32, 2, 32, map.len());
    Gpt2::init(&config, &Device::flex())
        .unwrap()
        .save_pretrained(&teacher)
        .unwrap();
    map.save(&teacher).unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(assets().join("gpt2-tokenizer").join(f), teacher.join(f)).unwrap();
    }
    let (a, b) = (dir.join("train.txt"), dir.join("eval.txt"));
    std::fs::write(&a, train).unwrap();
    std::fs::write(&b, eval).unwrap();
    (a, b)
}

fn options(dir: &Path, train: std::path::PathBuf, eval: &Path) -> DistillOptions {
    let mut o = DistillOptions::embedded(Path::new(env!("CARGO_MANIFEST_DIR")));
    o.teacher = dir.join("teacher");
    o.corpus = train;
    o.eval_corpus = Some(eval.to_path_buf());
    o.run_dir = dir.join("run");
    o.layers = Some("0:featural,1:associative".into());
    o.steps = 4;
    o.batch = 2;
    o.seq = 16;
    o.capacity = 64;
    o.k = 4;
    o.eval_windows = 6;
    o.max_inserts = 8;
    o
}

#[test]
fn distillation_runs_end_to_end_and_eval_only_reproduces_it() {
    let dir = tempfile::tempdir().unwrap();
    let (train, eval) = tiny_setup(dir.path());
    let o = options(dir.path(), train, &eval);
    let mut lines = Vec::new();
    let started = std::time::Instant::now();
    let r = run(&o, &mut |l| lines.push(l.to_string())).unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    assert!(lines.iter().any(|l| l.contains("step     4/4")), "{lines:?}");
    // Without --profile no phase line is logged, and the phases are timed anyway.
    assert!(!lines.iter().any(|l| l.contains("ms/step")), "{lines:?}");
    let phases = r.phases.clone().expect("a training run times its phases");
    assert_eq!(phases.steps, 4);
    assert!(!phases.synchronised);
    assert!(phases.seconds.iter().all(|s| s.is_finite() && *s >= 0.0), "{phases:?}");
    let timed: f64 = phases.seconds.iter().sum();
    assert!(timed > 0.0 && timed <= elapsed, "{timed} s timed of {elapsed} s");
    // Forward passes, the loss and checkpoints (steps 4: the final one) took time.
    assert_eq!(burn_dmt::distill::PhaseTimes::NAMES[7], "checkpoint");
    assert!((0..3).chain([7]).all(|i| phases.seconds[i] > 0.0), "{phases:?}");

    // Finite, consistent numbers.
    assert_eq!(r.steps.len(), 4);
    for m in &r.steps {
        assert!(m.loss.is_finite() && m.kd >= 0.0 && m.ce > 0.0, "{m:?}");
        assert!((m.loss - (0.5 * m.kd + 0.5 * m.ce)).abs() < 1e-4 * m.loss.abs().max(1.0));
    }
    for e in [&r.teacher, &r.student, &r.ablated] {
        assert!(e.perplexity().is_finite() && e.perplexity() > 1.0, "{e:?}");
        assert_eq!(e.tokens, 6 * 16);
    }
    assert!(r.teacher.kl.is_none());
    for e in [&r.student, &r.ablated] {
        let (kl, agree) = (e.kl.unwrap(), e.agreement.unwrap());
        assert!(kl >= 0.0 && kl.is_finite(), "{kl}");
        assert!((0.0..=1.0).contains(&agree), "{agree}");
    }
    assert!(r.gap_closed().is_finite());
    assert!(
        r.student_params.1 < r.teacher_params.1,
        "{:?} vs {:?}",
        r.student_params,
        r.teacher_params
    );
    assert!(matches!(r.memory_rows.as_slice(), [Some(a), Some(b)] if *a >= 4 && *b >= 4 && *a <= 64 && *b <= 64));
    assert!(r.store_bytes > 0);

    // The run directory is self-contained.
    let run_dir = dir.path().join("run");
    for f in [
        "student.json",
        "student.safetensors",
        "report.md",
        "metrics.csv",
        "memory/block0.db",
        "memory/block1.db",
    ] {
        assert!(run_dir.join(f).exists(), "{f} is missing");
    }
    let md = std::fs::read_to_string(run_dir.join("report.md")).unwrap();
    assert!(md.contains("Gap closed") && md.contains("loss.png"), "{md}");
    for name in burn_dmt::distill::PhaseTimes::NAMES {
        assert!(md.contains(&format!("| {name} |")), "{name} missing from {md}");
    }
    assert!(md.contains("4 steps timed"), "{md}");
    let png = std::fs::read(run_dir.join("loss.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert_eq!(
        std::fs::read_to_string(run_dir.join("metrics.csv"))
            .unwrap()
            .lines()
            .count(),
        5
    );

    // --eval-only rebuilds the student from the run directory.
    let again = eval_only(&run_dir, &eval, &o).unwrap();
    assert_eq!(again.teacher.nll, r.teacher.nll);
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
    assert!(
        rel(again.student.perplexity(), r.student.perplexity()) < 1e-3,
        "{} vs {}",
        again.student.perplexity(),
        r.student.perplexity()
    );
    assert!(rel(again.student.kl.unwrap(), r.student.kl.unwrap()) < 1e-3);
    assert_eq!(again.memory_rows, r.memory_rows);
    assert!(run_dir.join("eval-report.md").exists());

    // A second run into the same directory is refused instead of mixing runs.
    assert!(run(&o, &mut |_| {}).is_err());
}

/// A run interrupted after step 3 (checkpoints every 2 steps, so its stores
/// went on past the last checkpoint) and resumed gives the uninterrupted
/// run's losses and evaluation, step for step.
#[test]
fn a_resumed_run_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let (train, eval) = tiny_setup(dir.path());
    let mut o = options(dir.path(), train, &eval);
    o.steps = 5;
    o.checkpoint_every = 2;
    o.value_lr = 0.1;
    o.max_inserts = 4;
    let whole = run(&o, &mut |_| {}).unwrap();

    o.run_dir = dir.path().join("interrupted");
    o.halt_after = Some(3);
    let err = run(&o, &mut |_| {}).unwrap_err();
    assert!(matches!(err, burn_dmt::DmtError::Halted { step: 3 }), "{err}");
    assert!(!o.run_dir.join("report.md").exists());
    o.halt_after = None;
    o.resume = true;
    let mut lines = Vec::new();
    let resumed = run(&o, &mut |l| lines.push(l.to_string())).unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("resuming") && l.contains("after step 2")),
        "{lines:?}"
    );
    // Equal up to float rounding: the CPU backend's parallel reductions are
    // not bit-for-bit repeatable when other work competes for its threads
    // (two fresh runs differ in the last bits too).
    let near = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1e-3);
    assert_eq!(resumed.steps.len(), whole.steps.len());
    for (r, w) in resumed.steps.iter().zip(&whole.steps) {
        assert_eq!((r.step, r.lr, r.inserted), (w.step, w.lr, w.inserted));
        assert!(
            near(r.loss, w.loss) && near(r.kd, w.kd) && near(r.ce, w.ce),
            "{r:?} vs {w:?}"
        );
    }
    assert!(
        whole.steps.iter().any(|m| m.inserted > 0),
        "the associative layer inserted"
    );
    assert!(near(resumed.student.nll, whole.student.nll));
    assert!(near(resumed.student.kl.unwrap(), whole.student.kl.unwrap()));
    assert_eq!(resumed.memory_rows, whole.memory_rows);
}

/// The optional hidden-state loss adds the memory layers' MSE to the teacher
/// MLPs' outputs on the same inputs; `forward_with_ff` gives the same logits
/// as `forward` and the MLP outputs on the recorded inputs.
#[test]
fn the_hidden_state_loss_adds_its_term() {
    let dir = tempfile::tempdir().unwrap();
    let (train, eval) = tiny_setup(dir.path());
    let device = Device::flex();
    let teacher = Gpt2::from_pretrained(dir.path().join("teacher"), &device).unwrap();
    let ids = burn_dmt::burn::tensor::Tensor::<2, burn_dmt::burn::tensor::Int>::from_data(
        burn_dmt::burn::tensor::TensorData::new((0..32i64).collect::<Vec<_>>(), [2, 16]),
        &device,
    );
    let (logits, ff) = teacher.forward_with_ff(ids.clone()).unwrap();
    let plain = teacher.forward(ids, None).unwrap();
    let diff: f32 = (logits - plain).abs().max().into_scalar();
    assert!(diff < 1e-5, "{diff}");
    assert_eq!(ff.len(), 2);
    let (x, y) = ff[1].clone();
    let again: f32 = (teacher.h[1].mlp.forward(x).unwrap() - y).abs().max().into_scalar();
    assert_eq!(again, 0.0);

    let mut o = options(dir.path(), train, &eval);
    o.steps = 2;
    o.hidden_loss = 1.0;
    // With --profile the phases are logged with each progress line.
    o.profile = true;
    o.log_every = 1;
    let mut lines = Vec::new();
    let r = run(&o, &mut |l| lines.push(l.to_string())).unwrap();
    assert_eq!(
        lines.iter().filter(|l| l.contains("ms/step: teacher forward")).count(),
        2,
        "{lines:?}"
    );
    let phases = r.phases.clone().unwrap();
    assert!(phases.synchronised && phases.steps == 2, "{phases:?}");
    assert!(r.markdown().contains("device synchronised at each phase"));
    for m in &r.steps {
        let plain = 0.5 * m.kd + 0.5 * m.ce;
        assert!(m.loss.is_finite() && m.loss > plain, "{m:?}");
    }
}

/// Serves named SQLite stores from `dir` on `dir/memstored.sock` with
/// memstore-ipc's daemon core (what `memstored --stores DIR` runs), until dropped.
struct Daemon {
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
    socket: std::path::PathBuf,
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
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
        let options = ServerOptions {
            stores_dir: Some(dir.to_path_buf()),
            ..ServerOptions::default()
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

/// `--store ipc:SOCKET`: the memory layers live in one memstored serving a
/// named store per layer. An interrupted run resumes through the daemon's
/// Restore request and
/// equals a run with local SQLite stores in another directory
/// (`--store sqlite:DIR`); `--eval-only` reads the memories back from the
/// daemons.
#[test]
fn memory_in_daemons_and_external_directories() {
    let dir = tempfile::tempdir().unwrap();
    let (train, eval) = tiny_setup(dir.path());
    let mut o = options(dir.path(), train, &eval);
    o.steps = 5;
    o.checkpoint_every = 2;
    o.value_lr = 0.1;
    o.max_inserts = 4;
    o.store = format!("sqlite:{}", dir.path().join("elsewhere").display())
        .parse()
        .unwrap();
    let local = run(&o, &mut |_| {}).unwrap();
    assert!(dir.path().join("elsewhere/block0.db").exists());
    assert!(!o.run_dir.join("memory/block0.db").exists());
    // --eval-only finds the stores through student.json.
    let again = eval_only(&o.run_dir, &eval, &o).unwrap();
    assert!((again.student.nll - local.student.nll).abs() < 1e-3 * local.student.nll);

    let stores = dir.path().join("daemon");
    let daemon = Daemon::start(&stores);
    o.run_dir = dir.path().join("shared");
    o.store = format!("ipc:{}", daemon.socket.display()).parse().unwrap();
    o.halt_after = Some(3);
    assert!(matches!(
        run(&o, &mut |_| {}).unwrap_err(),
        burn_dmt::DmtError::Halted { step: 3 }
    ));
    o.halt_after = None;
    o.resume = true;
    let resumed = run(&o, &mut |_| {}).unwrap();
    let near = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1e-3);
    for (r, w) in resumed.steps.iter().zip(&local.steps) {
        assert_eq!((r.step, r.inserted), (w.step, w.inserted));
        assert!(near(r.loss, w.loss) && near(r.kd, w.kd), "{r:?} vs {w:?}");
    }
    assert!(near(resumed.student.nll, local.student.nll));
    assert_eq!(resumed.memory_rows, local.memory_rows);
    assert!(stores.join("block0.db").exists() && stores.join("block1.db").exists());
    let again = eval_only(&o.run_dir, &eval, &o).unwrap();
    assert!((again.student.nll - resumed.student.nll).abs() < 1e-3 * resumed.student.nll);
    drop(daemon);
    // Without the daemon the run says what to start.
    let err = eval_only(&o.run_dir, &eval, &o).unwrap_err().to_string();
    assert!(err.contains("memstored --stores"), "{err}");
}

/// `--store duckdb` (feature `duckdb`; CI runs it): an interrupted run resumes
/// from DuckDB checkpoint copies and equals the SQLite run step for step.
#[cfg(feature = "duckdb")]
#[test]
fn memory_in_duckdb_resumes_like_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let (train, eval) = tiny_setup(dir.path());
    let mut o = options(dir.path(), train, &eval);
    o.steps = 5;
    o.checkpoint_every = 2;
    o.value_lr = 0.1;
    o.max_inserts = 4;
    let sqlite = run(&o, &mut |_| {}).unwrap();
    o.run_dir = dir.path().join("duck");
    o.store = "duckdb".parse().unwrap();
    o.halt_after = Some(3);
    assert!(run(&o, &mut |_| {}).is_err());
    o.halt_after = None;
    o.resume = true;
    let duck = run(&o, &mut |_| {}).unwrap();
    assert!(o.run_dir.join("memory/block1.duckdb").exists());
    assert!(o.run_dir.join("checkpoints/step-0000005/block1.duckdb").exists());
    let near = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1e-3);
    for (r, w) in duck.steps.iter().zip(&sqlite.steps) {
        assert_eq!((r.step, r.inserted), (w.step, w.inserted));
        assert!(near(r.loss, w.loss) && near(r.kd, w.kd), "{r:?} vs {w:?}");
    }
    assert_eq!(duck.memory_rows, sqlite.memory_rows);
    let again = eval_only(&o.run_dir, &eval, &o).unwrap();
    assert!((again.student.nll - duck.student.nll).abs() < 1e-3 * duck.student.nll);
}
