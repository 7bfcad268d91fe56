//! The `memstore` command line against real stores: a SQLite file, and a
//! store served by a `memstored` server (the daemon's core, in a thread of
//! this test, on a Unix socket that the CLI process connects to).

#![cfg(feature = "cli")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use memstore::{Batch, DurableStore, Memory, MemoryConfig, MemoryStore, Metric, SqliteStore, Tags, Vectors, open};
use memstore_ipc::{Server, ServerOptions, SqliteOpener, server};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_memstore");

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `memstore ARGS...`.
fn cli(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run memstore")
}

/// Runs `memstore ARGS...`, which must succeed; returns its stdout.
fn ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "memstore {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `memstore ARGS...`, which must fail; returns its stderr.
fn fails(args: &[&str]) -> String {
    let out = cli(args);
    assert!(!out.status.success(), "memstore {args:?} succeeded but should not");
    String::from_utf8(out.stderr).unwrap()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn config() -> MemoryConfig {
    MemoryConfig::new(4, 3)
        .with_metric(Metric::L2)
        .with_capacity(100)
        .with_thresholds(0.05, 0.2)
}

fn key(i: usize) -> Vec<f32> {
    (0..4).map(|j| ((i * 7 + j * 3) as f32 * 0.731).sin()).collect()
}

/// Fills a store: 20 memories tagged `a` or `b`; five near-copies of the
/// first five learnt (merged: new ids, gaps, tag counts of 2); a few
/// accesses; the last id deleted (the next id is above every memory).
async fn fill(s: &impl MemoryStore) {
    let keys: Vec<f32> = (0..20).flat_map(key).collect();
    let values: Vec<f32> = (0..60).map(|i| i as f32 / 7.0).collect();
    let tags: Vec<Vec<String>> = (0..20).map(|i| vec![if i < 10 { "a" } else { "b" }.into()]).collect();
    let batch =
        Batch::new(Vectors::new(&keys, 4).unwrap(), Vectors::new(&values, 3).unwrap()).with_tags(Tags::PerRow(&tags));
    s.insert(batch, 1).await.unwrap();
    let near: Vec<f32> = (0..5).flat_map(|i| key(i).into_iter().map(|x| x + 0.001)).collect();
    let nv = vec![1.5f32; 15];
    let a = vec!["a".to_string()];
    let learn = Batch::new(Vectors::new(&near, 4).unwrap(), Vectors::new(&nv, 3).unwrap()).with_tags(Tags::Same(&a));
    s.learn(learn, 2, 4).await.unwrap();
    s.touch(&[8, 9, 9], 3).await.unwrap();
    let last = *s.ids().await.unwrap().last().unwrap();
    s.delete(&[last]).await.unwrap();
}

async fn all(s: &impl MemoryStore) -> Vec<Memory> {
    let ids = s.ids().await.unwrap();
    s.get(&ids).await.unwrap()
}

/// Creates the fixture store at `db` (see [`fill`]) and returns its
/// memories and next id.
fn fixture(rt: &tokio::runtime::Runtime, db: &Path) -> (Vec<Memory>, u64) {
    rt.block_on(async {
        let s = SqliteStore::open(db, config()).await.unwrap();
        fill(&s).await;
        let m = all(&s).await;
        let next = s.stats().await.unwrap().next_id;
        s.close().await.unwrap();
        (m, next)
    })
}

fn url_of(path: &Path) -> String {
    format!("sqlite:{}", path.display())
}

#[test]
fn every_subcommand_on_a_sqlite_file() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let url = url_of(&db);
    let (before, next_id) = fixture(&rt, &db);
    assert!(
        before.iter().any(|m| m.tags.values().any(|&n| n > 1)),
        "the fixture has merged memories with tag counts above 1"
    );
    assert!(
        next_id > before.last().unwrap().id + 1,
        "the fixture has a gap at the end"
    );

    // stats
    let st = json(&ok(&["stats", &url, "--json"]));
    assert_eq!(st["rows"], before.len());
    assert_eq!(st["key_dim"], 4);
    assert_eq!(st["value_dim"], 3);
    assert_eq!(st["metric"], "l2");
    assert_eq!(st["capacity"], 100);
    assert_eq!(st["next_id"], next_id);
    assert_eq!(st["merged"], 5);
    assert!(st["size_on_disk"].as_u64().unwrap() > 0);
    let human = ok(&["stats", &url]);
    assert!(
        human.contains("rows") && human.contains(&before.len().to_string()),
        "{human}"
    );

    // get
    let (x, y) = (&before[3], &before[7]);
    let got = ok(&["get", &url, &x.id.to_string(), &y.id.to_string(), "--json"]);
    let got: Vec<Value> = got.lines().map(json).collect();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["id"], x.id);
    let k: Vec<f32> = serde_json::from_value(got[1]["key"].clone()).unwrap();
    assert_eq!(k, y.key);
    assert!(ok(&["get", &url, &x.id.to_string()]).contains(&x.id.to_string()));

    // search by a stored memory, by a key file, with a tag filter
    let near = ok(&["search", &url, "--like", &x.id.to_string(), "-k", "3", "--json"]);
    let near: Vec<Value> = near.lines().map(json).collect();
    assert_eq!(near.len(), 3);
    assert!(near.iter().all(|h| h["id"] != x.id), "the memory itself is left out");
    let d: Vec<f64> = near.iter().map(|h| h["distance"].as_f64().unwrap()).collect();
    assert!(d.windows(2).all(|w| w[0] <= w[1]), "nearest first: {d:?}");
    let expect = rt.block_on(async {
        let s = SqliteStore::open_existing(&db).await.unwrap();
        let n = s.search(Vectors::new(&x.key, 4).unwrap(), 4, None).await.unwrap();
        s.close().await.unwrap();
        n.ids
            .iter()
            .flatten()
            .copied()
            .filter(|&i| i != x.id)
            .collect::<Vec<_>>()
    });
    let ids: Vec<u64> = near.iter().map(|h| h["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, expect[..3]);
    let keys = dir.path().join("q.txt");
    let line = y.key.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ");
    std::fs::write(&keys, format!("# one query\n{line}\n")).unwrap();
    let hit = json(
        ok(&[
            "search",
            &url,
            "--key-file",
            keys.to_str().unwrap(),
            "-k",
            "1",
            "--json",
        ])
        .trim(),
    );
    assert_eq!(hit["id"], y.id);
    assert_eq!(hit["distance"], 0.0);
    let tagged = ok(&[
        "search",
        &url,
        "--key-file",
        keys.to_str().unwrap(),
        "-k",
        "5",
        "--tag",
        "b",
        "--json",
    ]);
    let tagged: Vec<Value> = tagged.lines().map(json).collect();
    assert_eq!(tagged.len(), 5);
    assert!(tagged.iter().all(|h| h["tags"]["b"].as_u64() >= Some(1)), "{tagged:?}");

    // tags
    let tags = json(&ok(&["tags", &url, "--json"]));
    let mut want = std::collections::BTreeMap::<String, u64>::new();
    for m in &before {
        for (t, n) in &m.tags {
            *want.entry(t.clone()).or_default() += n;
        }
    }
    assert_eq!(tags, serde_json::to_value(&want).unwrap());

    // export, import, export: the same file, the same memories, both formats
    for format in ["jsonl", "csv"] {
        let first = dir.path().join(format!("first.{format}"));
        let copy = dir.path().join(format!("copy-{format}.db"));
        let second = dir.path().join(format!("second.{format}"));
        ok(&["export", &url, "--format", format, "--out", first.to_str().unwrap()]);
        ok(&["import", &url_of(&copy), "--input", first.to_str().unwrap()]);
        ok(&[
            "export",
            &url_of(&copy),
            "--format",
            format,
            "--out",
            second.to_str().unwrap(),
        ]);
        assert_eq!(
            std::fs::read_to_string(&first).unwrap(),
            std::fs::read_to_string(&second).unwrap(),
            "{format}: export, import, export writes the same file"
        );
        let (after, next) = rt.block_on(async {
            let s = SqliteStore::open_existing(&copy).await.unwrap();
            let m = all(&s).await;
            let next = s.stats().await.unwrap().next_id;
            assert_eq!(s.config(), &config());
            s.close().await.unwrap();
            (m, next)
        });
        assert_eq!(after, before, "{format}: every memory, bit for bit");
        assert_eq!(next, next_id, "{format}: the next id");
    }
    // stdout and stdin
    let exported = ok(&["export", &url]);
    let piped = dir.path().join("piped.db");
    let mut child = Command::new(BIN)
        .args(["import", &url_of(&piped)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), exported.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(ok(&["export", &url_of(&piped)]), exported);

    // check: sound, then with the SQL kNN mirror damaged behind the store's back
    assert!(ok(&["check", &url]).contains("no problems"));
    assert_eq!(json(&ok(&["check", &url, "--json"]))["problems"], Value::Array(vec![]));

    // backup
    let backup = dir.path().join("backup.db");
    ok(&["backup", &url, backup.to_str().unwrap()]);
    assert_eq!(json(&ok(&["stats", &url_of(&backup), "--json"]))["rows"], before.len());
    fails(&["backup", &url, backup.to_str().unwrap()]);

    // delete: all or nothing
    let err = fails(&["delete", &url, &x.id.to_string(), "999"]);
    assert!(err.contains("999"), "{err}");
    assert_eq!(json(&ok(&["stats", &url, "--json"]))["rows"], before.len());
    let del = json(&ok(&["delete", &url, &x.id.to_string(), &y.id.to_string(), "--json"]));
    assert_eq!(del["deleted"], 2);
    fails(&["get", &url, &x.id.to_string()]);

    // evict
    let ev = json(&ok(&["evict", &url, "--to", "5", "--json"]));
    assert_eq!(ev["rows"], 5);
    assert_eq!(ev["evicted"], before.len() - 2 - 5);

    let damaged = rt.block_on(async {
        let s = SqliteStore::open_existing(&db).await.unwrap();
        let victim = s.ids().await.unwrap()[0];
        s.close().await.unwrap();
        let pool = sqlx::sqlite::SqlitePool::connect(&format!("sqlite:{}", db.display()))
            .await
            .unwrap();
        // The vec0 table needs sqlite-vec, which the store registers with
        // every connection of this process once opened.
        sqlx::query("DELETE FROM memory_keys WHERE rowid = ?")
            .bind(victim as i64)
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        victim
    });
    let out = cli(&["check", &url]);
    assert!(!out.status.success(), "check fails on a damaged store");
    let report = String::from_utf8(out.stdout).unwrap();
    assert!(report.contains("memory_keys"), "{report} (memory {damaged})");
}

#[test]
fn bad_input_is_an_error_that_changes_nothing() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let url = url_of(&db);
    fixture(&rt, &db);
    let snapshot = ok(&["export", &url]);

    // A read command does not create a missing store.
    let missing = dir.path().join("none.db");
    let err = fails(&["stats", &url_of(&missing)]);
    assert!(!missing.exists(), "{err}");
    fails(&["check", &url_of(&missing)]);
    let err = fails(&["stats", "mysql:/x"]);
    assert!(err.contains("unknown scheme"), "{err}");
    // Unknown ids, a key file of the wrong dimension or none at all.
    let err = fails(&["get", &url, "424242"]);
    assert!(err.contains("424242"), "{err}");
    let keys = dir.path().join("q.txt");
    std::fs::write(&keys, "1 2 3\n").unwrap();
    let err = fails(&["search", &url, "--key-file", keys.to_str().unwrap()]);
    assert!(err.contains("3 numbers"), "{err}");
    std::fs::write(&keys, "1 2 x 4\n").unwrap();
    let err = fails(&["search", &url, "--key-file", keys.to_str().unwrap()]);
    assert!(err.contains("line 1"), "{err}");
    fails(&["search", &url]);
    // Writes that must not overwrite.
    let out = dir.path().join("out.jsonl");
    std::fs::write(&out, "keep").unwrap();
    fails(&["export", &url, "--out", out.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "keep");
    let good = dir.path().join("good.jsonl");
    std::fs::write(&good, &snapshot).unwrap();
    let err = fails(&["import", &url, "--input", good.to_str().unwrap()]);
    assert!(err.contains("exists"), "{err}");

    // Imports of broken exports: an error naming the line, and no store.
    let mut lines: Vec<String> = snapshot.lines().map(String::from).collect();
    let target = dir.path().join("new.db");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("not UTF-8", vec![0xff, 0xfe, b'{']),
        ("not an export", b"hello\n".to_vec()),
        ("truncated", lines[..lines.len() - 1].join("\n").into_bytes()),
        ("wrong dimension", {
            let mut l = lines.clone();
            l[2] = l[2].replacen("\"key\":[", "\"key\":[1.0,", 1);
            l.join("\n").into_bytes()
        }),
        ("not a number", {
            let mut l = lines.clone();
            l[3] = l[3].replacen("\"value\":[", "\"value\":[\"x\",", 1);
            l.join("\n").into_bytes()
        }),
        ("ids out of order", {
            let mut l = lines.clone();
            l.swap(1, 2);
            l.join("\n").into_bytes()
        }),
    ];
    for (what, bytes) in cases {
        let file = dir.path().join("bad.jsonl");
        std::fs::write(&file, bytes).unwrap();
        let err = fails(&["import", &url_of(&target), "--input", file.to_str().unwrap()]);
        assert!(!target.exists(), "{what}: no store is created ({err})");
        assert!(err.starts_with("error: "), "{what}: {err}");
    }
    lines[0] = lines[0].replace("\"metric\":\"l2\"", "\"metric\":\"manhattan\"");
    let file = dir.path().join("bad.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let err = fails(&["import", &url_of(&target), "--input", file.to_str().unwrap()]);
    assert!(err.contains("manhattan"), "{err}");
    // The store itself is as it was.
    assert_eq!(ok(&["export", &url]), snapshot);
}

/// A `memstored` server of named stores in a thread of its own, on a socket.
struct Daemon {
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
        let stores = dir.join("stores");
        std::fs::create_dir_all(&stores).unwrap();
        let socket = dir.join("d.sock");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, is_ready) = std::sync::mpsc::channel();
        let (s, b) = (socket.clone(), dir.to_path_buf());
        let thread = std::thread::spawn(move || {
            runtime().block_on(async move {
                let template = SqliteOpener {
                    path: Default::default(),
                    options: Default::default(),
                };
                let mut options = ServerOptions::default();
                options.stores_dir = Some(stores);
                options.backup_dir = Some(b);
                let daemon = Server::named_only(template, options).unwrap();
                let listener = server::bind_unix(&s, 0o600).unwrap();
                ready.send(()).unwrap();
                daemon
                    .serve(vec![listener], async move {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            })
        });
        is_ready.recv().unwrap();
        Daemon {
            socket,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn every_subcommand_through_memstored() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let (before, _) = fixture(&rt, &db);
    let exported = dir.path().join("m.jsonl");
    ok(&["export", &url_of(&db), "--out", exported.to_str().unwrap()]);

    let daemon = Daemon::start(dir.path());
    let url = format!("ipc:{}#layer0", daemon.socket.display());
    ok(&["import", &url, "--input", exported.to_str().unwrap()]);
    let err = fails(&["import", &url, "--input", exported.to_str().unwrap()]);
    assert!(err.contains("not empty"), "{err}");
    let after = rt.block_on(async {
        let s = open(&url, None).await.unwrap();
        let m = all(&s).await;
        s.close().await.unwrap();
        m
    });
    assert_eq!(after, before, "the daemon's store holds the same memories");
    let again = dir.path().join("again.jsonl");
    ok(&["export", &url, "--out", again.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(&exported).unwrap(),
        std::fs::read_to_string(&again).unwrap()
    );

    let st = json(&ok(&["stats", &url, "--json"]));
    assert_eq!(st["backend"], "ipc");
    assert_eq!(st["rows"], before.len());
    assert_eq!(st["size_on_disk"], Value::Null);
    let x = &before[2];
    let got = json(&ok(&["get", &url, &x.id.to_string(), "--json"]));
    assert_eq!(got["id"], x.id);
    let near: Vec<Value> = ok(&["search", &url, "--like", &x.id.to_string(), "-k", "2", "--json"])
        .lines()
        .map(json)
        .collect();
    assert_eq!(near.len(), 2);
    assert_eq!(json(&ok(&["tags", &url, "--json"]))["b"], 10);
    assert!(ok(&["check", &url]).contains("no problems"));
    let backup = dir.path().join("ipc-backup.db");
    ok(&["backup", &url, backup.to_str().unwrap()]);
    assert_eq!(json(&ok(&["stats", &url_of(&backup), "--json"]))["rows"], before.len());
    fails(&["delete", &url, "999"]);
    assert_eq!(json(&ok(&["delete", &url, &x.id.to_string(), "--json"]))["deleted"], 1);
    assert_eq!(json(&ok(&["evict", &url, "--to", "3", "--json"]))["rows"], 3);
    fails(&["stats", &format!("ipc:{}#missing", daemon.socket.display())]);
    drop(daemon);
}
