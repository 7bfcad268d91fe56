//! The Mindset inspector (`examples/mindset`) on a trained tiny student:
//! `explain` names memories that exist in the run's stores, the JSON API
//! deletes through the store and refuses bad requests without changing
//! anything, a deletion made elsewhere shows in the next answer, and, in
//! headless Chromium (ignored without it; `.ci/run` installs it), a prompt
//! typed into the page lists memories that exist and a memory deleted on
//! the page is gone from the store.

#[path = "../examples/mindset/inspector.rs"]
#[allow(dead_code)]
mod inspector;
#[path = "../examples/mindset/server.rs"]
#[allow(dead_code)]
mod server;
#[path = "../crates/burn-dmt/tests/common/tiny.rs"]
mod tiny;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn_dmt::continual::{MemorizeOptions, memorize};
use burn_dmt::distill::{read_spec, run};
use inspector::Inspector;
use memstore::{MemoryId, MemoryStore};
use serde_json::{Value, json};

const PROMPT: &str = "First Citizen:\nBefore we proceed any further, hear me speak.";

/// A distilled tiny student (featural block 0, associative block 1) in
/// `dir/run`, with a KJV passage memorised (so some memories carry a
/// `source:` tag).
fn tiny_run(dir: &Path) -> PathBuf {
    let (train, eval) = tiny::tiny_setup(dir);
    let mut o = tiny::options(dir, train, &eval);
    o.attention_baseline = false;
    run(&o).unwrap();
    let kjv = std::fs::read_to_string(tiny::assets().join("data/kjv-genesis-deuteronomy.txt")).unwrap();
    let passage: String = kjv.chars().take(3_000).collect();
    let file = dir.join("genesis.txt");
    std::fs::write(&file, passage).unwrap();
    let mut m = MemorizeOptions::default();
    m.steps = Some(6);
    m.batch = 2;
    m.seq = 16;
    m.lr = 50.0;
    m.sparse_rows = 16;
    m.room = 32;
    m.max_inserts = 8;
    m.background_windows = 8;
    memorize(&o.run_dir, &[file], &m, None).unwrap();
    o.run_dir
}

/// The run's stores, opened afresh through the facade for every question
/// (as another process would see them).
struct Stores {
    rt: tokio::runtime::Runtime,
    run_dir: PathBuf,
}

impl Stores {
    fn new(run_dir: &Path) -> Stores {
        Stores {
            rt: tokio::runtime::Runtime::new().unwrap(),
            run_dir: run_dir.to_path_buf(),
        }
    }

    fn open(&self, block: usize) -> Arc<dyn MemoryStore> {
        let loc = read_spec(&self.run_dir).unwrap().store_location().unwrap();
        self.rt
            .block_on(loc.open_existing(&self.run_dir, block))
            .unwrap()
            .shared()
    }

    /// Which of `ids` exist in `block`'s store.
    fn existing(&self, block: usize, ids: &[MemoryId]) -> BTreeSet<MemoryId> {
        let s = self.open(block);
        let all: BTreeSet<MemoryId> = self.rt.block_on(s.ids()).unwrap().into_iter().collect();
        let found: BTreeSet<MemoryId> = ids.iter().copied().filter(|id| all.contains(id)).collect();
        let read = self
            .rt
            .block_on(s.get(&found.iter().copied().collect::<Vec<_>>()))
            .unwrap();
        assert_eq!(read.len(), found.len(), "get reads every id the store lists");
        found
    }

    fn len(&self, block: usize) -> usize {
        let s = self.open(block);
        self.rt.block_on(s.len()).unwrap()
    }

    fn delete(&self, block: usize, ids: &[MemoryId]) -> usize {
        let s = self.open(block);
        self.rt.block_on(s.delete(ids)).unwrap()
    }
}

/// Every (block, id) an explanation lists.
fn listed(explained: &Value) -> BTreeSet<(usize, MemoryId)> {
    let mut out = BTreeSet::new();
    for l in explained["layers"].as_array().unwrap() {
        let block = l["block"].as_u64().unwrap() as usize;
        for p in l["positions"].as_array().unwrap() {
            for r in p.as_array().unwrap() {
                out.insert((block, r["id"].as_u64().unwrap()));
            }
        }
    }
    out
}

/// A running inspector server on a free loopback port, until dropped.
struct Serving {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Serving {
    fn start(run_dir: &Path) -> Serving {
        let handle = server::Handle::spawn(run_dir.to_path_buf(), |_| Ok(())).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, server::router(handle))
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Serving {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// One HTTP/1.1 request; the status and the body as JSON (or text).
    fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut s = TcpStream::connect(self.addr).unwrap();
        let body = body.unwrap_or("");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8(raw).unwrap();
        let (head, payload) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (
            status,
            serde_json::from_str(payload).unwrap_or(Value::String(payload.into())),
        )
    }
}

impl Drop for Serving {
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
fn explain_lists_memories_of_the_stores_and_the_api_deletes_through_them() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = tiny_run(dir.path());
    let srv = Serving::start(&run_dir);
    let stores = Stores::new(&run_dir);

    let (status, model) = srv.request("GET", "/api/model", None);
    assert_eq!(status, 200, "{model}");
    let kinds: Vec<&str> = model["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["featural", "associative"]);
    for l in model["layers"].as_array().unwrap() {
        let block = l["block"].as_u64().unwrap() as usize;
        assert_eq!(
            l["memory"]["rows"].as_u64().unwrap() as usize,
            stores.len(block),
            "block {block}'s rows"
        );
        assert!(!l["memory"]["rows_over_training"].as_array().unwrap().is_empty());
    }
    assert_eq!(model["sources"].as_array().unwrap().len(), 1, "{model}");
    let source = model["sources"][0]["tag"].as_str().unwrap().to_owned();
    assert!(source.starts_with("source:genesis.txt@"), "{source}");

    let body = json!({ "prompt": PROMPT, "top": 3 }).to_string();
    let (status, explained) = srv.request("POST", "/api/explain", Some(&body));
    assert_eq!(status, 200, "{explained}");
    let n = explained["tokens"].as_array().unwrap().len();
    assert!(n > 5, "{explained}");
    for p in explained["next"].as_array().unwrap() {
        let probs: Vec<f64> = p.as_array().unwrap().iter().map(|x| x["p"].as_f64().unwrap()).collect();
        assert_eq!(probs.len(), 3);
        assert!(
            probs.windows(2).all(|w| w[0] >= w[1]) && probs[0] > 0.0 && probs[0] <= 1.0,
            "{probs:?}"
        );
    }
    for l in explained["layers"].as_array().unwrap() {
        let (heads, k) = (l["heads"].as_u64().unwrap(), l["k"].as_u64().unwrap());
        assert_eq!((heads, k), (2, 4), "{l}");
        assert_eq!(l["positions"].as_array().unwrap().len(), n);
        for p in l["positions"].as_array().unwrap() {
            for head in 0..heads {
                let w: Vec<f64> = p
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|r| r["head"].as_u64() == Some(head))
                    .map(|r| r["weight"].as_f64().unwrap())
                    .collect();
                // Softmax weights over the k memories a head reads (fewer
                // where its table holds fewer) sum to 1.
                assert!(!w.is_empty() && w.len() as u64 <= k, "{w:?}");
                assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-3, "{w:?}");
            }
        }
    }
    let all = listed(&explained);
    for block in [0, 1] {
        let ids: Vec<MemoryId> = all.iter().filter(|(b, _)| *b == block).map(|(_, id)| *id).collect();
        assert!(!ids.is_empty());
        assert_eq!(
            stores.existing(block, &ids).len(),
            ids.len(),
            "block {block}: every id listed exists"
        );
    }

    // One memory: what it promotes, the contexts (the prompt above).
    let &(block, id) = all.iter().next().unwrap();
    let (status, m) = srv.request("GET", &format!("/api/memory/{block}/{id}"), None);
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["promoted"].as_array().unwrap().len(), 10);
    assert!(!m["contexts"].as_array().unwrap().is_empty(), "the prompt used it: {m}");
    let (status, near) = srv.request("GET", &format!("/api/nearest/{block}/{id}?k=3"), None);
    assert_eq!(status, 200, "{near}");
    assert_eq!(
        near["memories"][0]["id"].as_u64(),
        Some(id),
        "a memory is nearest itself: {near}"
    );
    let (status, page) = srv.request("GET", &format!("/api/memories/{block}?limit=5"), None);
    assert_eq!(status, 200);
    assert_eq!(page["memories"].as_array().unwrap().len(), 5);
    let (status, tagged) = srv.request(
        "GET",
        &format!("/api/memories/1?tag={}", source.replace(':', "%3A")),
        None,
    );
    assert_eq!(status, 200, "{tagged}");
    for r in tagged["memories"].as_array().unwrap() {
        assert_eq!(r["source"].as_str(), Some(source.as_str()), "{r}");
    }

    // Bad requests: a clear error, nothing changed.
    let before: Vec<usize> = [0, 1].map(|b| stores.len(b)).to_vec();
    for (method, path, body, needle) in [
        ("POST", "/api/explain", Some(r#"{"prompt": "   "}"#), "empty"),
        ("GET", "/api/memory/7/1", None, "block 7"),
        ("GET", "/api/memory/0/999999", None, "no memory 999999"),
        ("DELETE", "/api/memory/0/999999", None, "no memory 999999"),
        (
            "POST",
            "/api/forget",
            Some(r#"{"source": "source:nothing@0"}"#),
            "nothing",
        ),
    ] {
        let (status, e) = srv.request(method, path, body);
        assert_eq!(status, 400, "{method} {path}: {e}");
        assert!(e["error"].as_str().unwrap().contains(needle), "{method} {path}: {e}");
    }
    let (status, _) = srv.request("POST", "/api/explain", Some("not json"));
    assert!((400..500).contains(&status));
    let after: Vec<usize> = [0, 1].map(|b| stores.len(b)).to_vec();
    assert_eq!(before, after);

    // A store another opener holds: a conflict, answered again once released
    // (the inspector holds no store between requests).
    let held = stores.open(block);
    let (status, e) = srv.request("GET", &format!("/api/memory/{block}/{id}"), None);
    assert_eq!(status, 409, "{e}");
    drop(held);
    let (status, _) = srv.request("GET", &format!("/api/memory/{block}/{id}"), None);
    assert_eq!(status, 200);

    // Delete through the API: gone from the store and from the next answer.
    let (status, d) = srv.request("DELETE", &format!("/api/memory/{block}/{id}"), None);
    assert_eq!(status, 200, "{d}");
    assert!(stores.existing(block, &[id]).is_empty());
    let (_, again) = srv.request("POST", "/api/explain", Some(&body));
    assert!(!listed(&again).contains(&(block, id)));

    // Deleted by another process's handle on the store: gone too (nothing cached).
    let &(b2, id2) = listed(&again).iter().next().unwrap();
    assert_eq!(stores.delete(b2, &[id2]), 1);
    let (_, third) = srv.request("POST", "/api/explain", Some(&body));
    assert!(!listed(&third).contains(&(b2, id2)));

    // Forget the memorised source through the API.
    let (status, f) = srv.request("POST", "/api/forget", Some(&json!({ "source": source }).to_string()));
    assert_eq!(status, 200, "{f}");
    let (_, model) = srv.request("GET", "/api/model", None);
    assert!(model["sources"].as_array().unwrap().is_empty(), "{model}");
}

#[test]
fn explain_prints_each_token_with_its_memories() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = tiny_run(dir.path());
    let mut i = Inspector::open(&run_dir).unwrap();
    let text = i.explain_text("Before we proceed", 2, 2).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let tokens = lines.iter().filter(|l| l.contains("-> next:")).count();
    assert!(tokens >= 3, "{text}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.trim_start().starts_with("block 0 featural:"))
            .count(),
        tokens
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.trim_start().starts_with("block 1 associative:"))
            .count(),
        tokens
    );
    assert!(lines.iter().any(|l| l.contains('#') && l.contains(" w=")), "{text}");
    assert!(i.explain_text("", 2, 2).is_err());
    assert!(Inspector::open(&dir.path().join("no-such-run")).is_err());
}

/// The Chrome DevTools protocol over one WebSocket, with a page session.
struct Cdp {
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next: u64,
    session: Option<String>,
}

impl Cdp {
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let mut msg = json!({ "id": self.next, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(tungstenite::Message::text(msg.to_string())).unwrap();
        loop {
            let m = self.ws.read().unwrap();
            let tungstenite::Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"].as_u64() == Some(self.next) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `js` in the page (awaiting a promise) and returns its value.
    fn eval(&mut self, js: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": js, "awaitPromise": true, "returnByValue": true }),
        );
        assert!(r.get("exceptionDetails").is_none(), "{js}: {r}");
        r["result"]["value"].clone()
    }

    /// Waits until `js` is truthy (30 s at most).
    fn wait(&mut self, js: &str) -> Value {
        let t0 = std::time::Instant::now();
        loop {
            let v = self.eval(js);
            if !(v.is_null() || v == json!(false) || v == json!(0) || v == json!("")) {
                return v;
            }
            assert!(t0.elapsed().as_secs() < 30, "timed out waiting for {js}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Scrolls `selector`'s first match into view, moves the mouse to its
    /// centre, and clicks there when `click`.
    fn mouse(&mut self, selector: &str, click: bool) {
        let c = self.eval(&format!(
            "(() => {{ const e = document.querySelector({selector:?}); e.scrollIntoView({{block: 'nearest'}}); \
             const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        let (x, y) = (c[0].as_f64().unwrap(), c[1].as_f64().unwrap());
        self.call(
            "Input.dispatchMouseEvent",
            json!({ "type": "mouseMoved", "x": x, "y": y }),
        );
        if click {
            for t in ["mousePressed", "mouseReleased"] {
                self.call(
                    "Input.dispatchMouseEvent",
                    json!({ "type": t, "x": x, "y": y, "button": "left", "clickCount": 1 }),
                );
            }
        }
    }
}

/// Headless Chromium (Debian's `chromium`, or `MINDSET_CHROMIUM`) with a
/// DevTools endpoint, killed when dropped.
struct Chromium {
    child: std::process::Child,
    _profile: tempfile::TempDir,
}

impl Chromium {
    fn start() -> (Chromium, Cdp) {
        let exe = std::env::var("MINDSET_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let profile = tempfile::tempdir().unwrap();
        let child = std::process::Command::new(&exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--window-size=1500,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{exe}: {e} (install Debian's chromium, or set MINDSET_CHROMIUM)"));
        let chromium = Chromium {
            child,
            _profile: profile,
        };
        // Chromium writes its DevTools port and path here once listening.
        let file = chromium._profile.path().join("DevToolsActivePort");
        let t0 = std::time::Instant::now();
        let endpoint = loop {
            if let Ok(s) = std::fs::read_to_string(&file)
                && let Some((port, path)) = s.split_once('\n')
                && !path.trim().is_empty()
            {
                break format!("ws://127.0.0.1:{}{}", port.trim(), path.trim());
            }
            assert!(t0.elapsed().as_secs() < 30, "chromium did not open its DevTools port");
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        let (ws, _) = tungstenite::connect(endpoint).unwrap();
        let mut cdp = Cdp {
            ws,
            next: 0,
            session: None,
        };
        let target = cdp.call("Target.createTarget", json!({ "url": "about:blank" }));
        let session = cdp.call(
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        cdp.session = Some(session["sessionId"].as_str().unwrap().to_owned());
        cdp.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1500, "height": 1000, "deviceScaleFactor": 1, "mobile": false }),
        );
        (chromium, cdp)
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (block, id) of every memory the page's per-token table shows.
fn shown(cdp: &mut Cdp) -> BTreeSet<(usize, MemoryId)> {
    let v = cdp.eval(
        "JSON.stringify([...document.querySelectorAll('#explain-body .mem')].map(e => [+e.dataset.block, +e.dataset.id]))",
    );
    let pairs: Vec<(usize, MemoryId)> = serde_json::from_str(v.as_str().unwrap()).unwrap();
    pairs.into_iter().collect()
}

#[test]
#[ignore = "needs Debian's chromium (headless; .ci/run installs it and runs this test)"]
fn the_page_lists_stored_memories_and_deletes_one() {
    let dir = tempfile::tempdir().unwrap();
    // MINDSET_RUN_DIR: inspect that run directory instead (a memory of it is
    // deleted), e.g. to take the README's screenshot of a full-size student.
    let run_dir = match std::env::var_os("MINDSET_RUN_DIR") {
        Some(d) => PathBuf::from(d),
        None => tiny_run(dir.path()),
    };
    let srv = Serving::start(&run_dir);
    let stores = Stores::new(&run_dir);
    let (_chromium, mut cdp) = Chromium::start();
    cdp.call("Page.navigate", json!({ "url": format!("http://{}/", srv.addr) }));
    cdp.wait("document.readyState === 'complete' && document.querySelectorAll('#layers tr.memory-layer').length");

    // Type the prompt and run it.
    cdp.eval("(() => { const p = document.getElementById('prompt'); p.value = ''; p.focus(); return true; })()");
    let prompt = std::env::var("MINDSET_PROMPT").unwrap_or_else(|_| PROMPT.into());
    cdp.call("Input.insertText", json!({ "text": prompt }));
    assert_eq!(
        cdp.eval("document.getElementById('prompt').value").as_str(),
        Some(prompt.as_str())
    );
    cdp.mouse("#run-prompt", true);
    cdp.wait("/ tokens$/.test(document.getElementById('status').textContent)");
    let rows = cdp.eval("document.querySelectorAll('#explain-body tr.token').length");
    assert!(rows.as_u64().unwrap() > 3, "{rows}");
    let seen = shown(&mut cdp);
    assert!(!seen.is_empty());
    let blocks: BTreeSet<usize> = seen.iter().map(|(b, _)| *b).collect();
    for &block in &blocks {
        let ids: Vec<MemoryId> = seen.iter().filter(|(b, _)| *b == block).map(|(_, id)| *id).collect();
        assert_eq!(
            stores.existing(block, &ids).len(),
            ids.len(),
            "block {block}: the page's ids exist"
        );
    }

    // Open a memory (click), hover another for its promoted tokens.
    let target = cdp.eval(
        "(() => { const e = document.querySelectorAll('#explain-body .mem')[0]; \
         e.id = 'target-memory'; return [+e.dataset.block, +e.dataset.id]; })()",
    );
    let (block, id) = (target[0].as_u64().unwrap() as usize, target[1].as_u64().unwrap());
    cdp.mouse("#target-memory", true);
    cdp.wait(&format!(
        "document.getElementById('detail-id')?.textContent === '#{id}'"
    ));
    cdp.eval(
        "(() => { const all = document.querySelectorAll('#explain-body tr.token'); \
         const row = all[Math.min(2, all.length - 1)]; row.querySelector('.mem').id = 'hover-memory'; return true; })()",
    );
    cdp.mouse("#hover-memory", false);
    cdp.wait("document.getElementById('tip').textContent.includes('promotes')");
    if let Some(path) = std::env::var_os("MINDSET_SCREENSHOT") {
        let shot = cdp.call("Page.captureScreenshot", json!({ "format": "png" }));
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(&path, png).unwrap();
    }

    // Delete it on the page (the button asks for a second click).
    cdp.mouse("#delete", true);
    cdp.wait("document.getElementById('delete').classList.contains('armed')");
    assert_eq!(stores.existing(block, &[id]).len(), 1, "one click deletes nothing");
    cdp.mouse("#delete", true);
    cdp.wait("document.getElementById('deleted')");
    assert!(
        stores.existing(block, &[id]).is_empty(),
        "memory {id} of block {block} is gone from the store"
    );

    // Run again: the deleted memory is no longer read.
    cdp.eval("document.getElementById('status').textContent = ''");
    cdp.mouse("#run-prompt", true);
    cdp.wait("/ tokens$/.test(document.getElementById('status').textContent)");
    assert!(!shown(&mut cdp).contains(&(block, id)));
}
