//! `memstored` as a process: bad input on the wire, security, many client
//! processes, graceful shutdown, reconfiguration and `kill -9` recovery.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Daemon, LOAD, MEMSTORED};
use memstore_api::testkit::util::backup_and_close;
use memstore_api::{Batch, Error, Memory, MemoryConfig, MemoryStore, Stats, Tags, Vectors};
use memstore_ipc::protocol::{
    self, F32s, Hello, MAGIC, PROTOCOL_VERSION, ProtocolError, REQUEST_TYPES, Request, Response, WireConfig, WireError,
};
use memstore_ipc::{ClientOptions, Endpoint, IpcStore, protocol_error};

fn cfg() -> MemoryConfig {
    MemoryConfig::new(4, 2)
}

fn cfg_args() -> [&'static str; 4] {
    ["--key-dim", "4", "--value-dim", "2"]
}

use memstore_api::testkit::util::Rng;

async fn snapshot(s: &IpcStore) -> (Vec<Memory>, Stats) {
    let ids = s.ids().await.unwrap();
    (s.get(&ids).await.unwrap(), s.stats().await.unwrap())
}

async fn fill(s: &IpcStore, n: usize, seed: u64) -> Vec<u64> {
    let mut rng = Rng::new(seed);
    let k = rng.vecs(n * 4, 1);
    let v = rng.vecs(n * 2, 1);
    let t = vec!["seed".to_string()];
    s.insert(
        Batch::new(Vectors::new(&k, 4).unwrap(), Vectors::new(&v, 2).unwrap()).with_tags(Tags::Same(&t)),
        1,
    )
    .await
    .unwrap()
}

/// A client speaking raw frames over a blocking socket.
struct Raw(UnixStream);

enum Reply {
    Ok(u64, String),
    Err(u64, WireError),
    Closed,
}

impl Raw {
    fn connect(socket: &Path) -> Raw {
        let s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Raw(s)
    }

    fn hello(socket: &Path) -> Raw {
        let mut r = Raw::connect(socket);
        r.send(0, &hello(PROTOCOL_VERSION, MAGIC, None, None));
        match r.recv() {
            Reply::Ok(0, kind) => assert_eq!(kind, "Welcome"),
            _ => panic!("handshake refused"),
        }
        r
    }

    fn send(&mut self, id: u64, req: &Request<'_>) {
        let f = protocol::encode_frame(id, req, usize::MAX).unwrap();
        self.0.write_all(&f).unwrap();
    }

    /// Sends a request to a daemon that may already have closed the
    /// connection (a write error is allowed).
    fn try_send(&mut self, id: u64, req: &Request<'_>) {
        let f = protocol::encode_frame(id, req, usize::MAX).unwrap();
        let _ = self.0.write_all(&f);
    }

    fn send_payload(&mut self, payload: &[u8]) {
        let mut f = (payload.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(payload);
        // The daemon may already have closed the connection: that is allowed.
        let _ = self.0.write_all(&f);
    }

    fn recv(&mut self) -> Reply {
        let mut len = [0u8; 4];
        if self.0.read_exact(&mut len).is_err() {
            return Reply::Closed;
        }
        let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
        if self.0.read_exact(&mut payload).is_err() {
            return Reply::Closed;
        }
        let (id, r): (u64, Response) = protocol::decode_frame(&payload).expect("the daemon's frames decode");
        match r {
            Response::Error(e) => Reply::Err(id, e),
            Response::Welcome { .. } => Reply::Ok(id, "Welcome".into()),
            Response::Count(n) => Reply::Ok(id, format!("Count({n})")),
            other => Reply::Ok(id, format!("{other:?}").chars().take(40).collect()),
        }
    }

    /// The typed error the daemon sent, then the connection must close.
    fn expect_error_then_close(&mut self, kind: ProtocolError) {
        match self.recv() {
            Reply::Err(_, WireError::Protocol { kind: k, message }) => assert_eq!(k, kind, "{message}"),
            Reply::Err(_, e) => panic!("expected {kind:?}, got {e:?}"),
            Reply::Ok(_, r) => panic!("expected {kind:?}, got {r}"),
            Reply::Closed => panic!("expected {kind:?}, the connection closed first"),
        }
        assert!(matches!(self.recv(), Reply::Closed), "the daemon closes the connection");
    }
}

fn hello(version: u32, magic: [u8; 4], token: Option<&str>, config: Option<&MemoryConfig>) -> Request<'static> {
    Request::Hello(Hello {
        magic,
        version,
        token: token.map(String::from),
        config: config.map(WireConfig::from),
        store: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_typed_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let mut extra = cfg_args().to_vec();
    extra.extend(["--max-frame", "1048576"]);
    let d = Daemon::start(&dir.path().join("s.db"), &socket, &extra);
    let good = IpcStore::connect(&d.endpoint(), None).await.unwrap();
    fill(&good, 50, 3).await;
    let before = snapshot(&good).await;

    // A payload that does not decode: a typed error, and the connection goes on.
    let mut r = Raw::hello(&socket);
    r.send_payload(&[0x07, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    match r.recv() {
        Reply::Err(_, WireError::Protocol { kind, .. }) => assert_eq!(kind, ProtocolError::Malformed),
        _ => panic!("expected a Malformed error"),
    }
    // Truncated vectors (not a whole number of f32s) are malformed too.
    let bad_vec = Request::Search {
        queries: F32s(vec![0u8; 7].into()),
        dim: 4,
        k: 1,
        filter: None,
    };
    r.send(8, &bad_vec);
    match r.recv() {
        Reply::Err(8, WireError::Protocol { kind, .. }) => assert_eq!(kind, ProtocolError::Malformed),
        _ => panic!("expected a Malformed error for request 8"),
    }
    r.send(9, &Request::Len);
    match r.recv() {
        Reply::Ok(9, s) => assert_eq!(s, "Count(50)"),
        _ => panic!("the connection keeps working after a malformed frame"),
    }

    // An unknown request type is named as such, with its request id.
    let mut payload = postcard::to_stdvec(&11u64).unwrap();
    payload.extend(postcard::to_stdvec(&(REQUEST_TYPES + 40)).unwrap());
    r.send_payload(&payload);
    match r.recv() {
        Reply::Err(11, WireError::Protocol { kind, .. }) => assert_eq!(kind, ProtocolError::UnknownRequest),
        _ => panic!("expected UnknownRequest for request 11"),
    }

    // A request whose reply could not fit in a frame is refused before the store allocates it.
    let q = [0.0f32; 4];
    r.send(
        12,
        &Request::Search {
            queries: F32s::from_slice(&q),
            dim: 4,
            k: u64::MAX / 2,
            filter: None,
        },
    );
    match r.recv() {
        Reply::Err(12, WireError::Protocol { kind, .. }) => assert_eq!(kind, ProtocolError::TooLarge),
        _ => panic!("expected TooLarge for request 12"),
    }
    // So is a get whose reply could not fit (a small request naming one id
    // many times), before the store reads a row.
    r.send(13, &Request::Get(vec![1u64; 40_000].into()));
    match r.recv() {
        Reply::Err(13, WireError::Protocol { kind, message }) => {
            assert_eq!(kind, ProtocolError::TooLarge);
            assert!(message.contains("would need a reply"), "{message}");
        }
        _ => panic!("expected TooLarge for request 13"),
    }

    // An oversized frame: a typed error, then the connection is closed.
    let mut r = Raw::hello(&socket);
    let mut oversized = (2u32 << 20).to_le_bytes().to_vec();
    oversized.extend_from_slice(&[0u8; 64]);
    // The daemon may refuse and close before all of it is written.
    let _ = r.0.write_all(&oversized);
    r.expect_error_then_close(ProtocolError::TooLarge);

    // A wrong protocol version, a wrong magic, a request before the handshake,
    // a handshake that does not decode.
    let mut r = Raw::connect(&socket);
    r.send(0, &hello(PROTOCOL_VERSION + 98, MAGIC, None, None));
    r.expect_error_then_close(ProtocolError::Version);
    let mut r = Raw::connect(&socket);
    r.send(0, &hello(PROTOCOL_VERSION, *b"HTTP", None, None));
    r.expect_error_then_close(ProtocolError::Version);
    let mut r = Raw::connect(&socket);
    r.send(1, &Request::Len);
    r.expect_error_then_close(ProtocolError::Sequence);
    let mut r = Raw::connect(&socket);
    r.send_payload(b"GET / HTTP/1.1\r\n\r\n");
    r.expect_error_then_close(ProtocolError::Malformed);

    // A second handshake on a live session.
    let mut r = Raw::hello(&socket);
    r.send(5, &hello(PROTOCOL_VERSION, MAGIC, None, None));
    match r.recv() {
        Reply::Err(5, WireError::Protocol { kind, .. }) => assert_eq!(kind, ProtocolError::Sequence),
        _ => panic!("expected Sequence"),
    }

    // Clients that vanish mid-frame, before and after the handshake.
    let mut r = Raw::connect(&socket);
    r.0.write_all(&1000u32.to_le_bytes()).unwrap();
    r.0.write_all(&[1u8; 10]).unwrap();
    drop(r);
    let mut r = Raw::hello(&socket);
    let big = vec![1.0f32; 4000];
    let f = protocol::encode_frame(
        3,
        &Request::Insert {
            batch: protocol::WireBatch {
                keys: F32s::from_slice(&big),
                key_dim: 4,
                values: F32s::from_slice(&big[..2000]),
                value_dim: 2,
                tags: protocol::WireTags::None,
            },
            tick: 5,
        },
        usize::MAX,
    )
    .unwrap();
    r.0.write_all(&f[..f.len() / 2]).unwrap();
    drop(r);

    // Every other client is still served, and the store is as it was.
    assert_eq!(snapshot(&good).await, before);
    let late = IpcStore::connect(&d.endpoint(), None).await.unwrap();
    assert_eq!(snapshot(&late).await, before);
    let status = d.stop();
    assert!(status.success(), "{status}");
}

/// Before its handshake is accepted, a connection cannot make the daemon
/// reserve more than a handshake's frame limit; at the connection limit, one
/// more connection is refused with a typed error, and served again once a
/// place is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_frames_and_connections_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let mut extra = cfg_args().to_vec();
    extra.extend(["--max-frame", "1048576", "--max-connections", "3"]);
    let d = Daemon::start(&dir.path().join("s.db"), &socket, &extra);

    // A header announcing a frame under the daemon's limit but over the
    // handshake's is refused at once (not after the handshake timeout).
    let mut r = Raw::connect(&socket);
    let started = std::time::Instant::now();
    let _ =
        r.0.write_all(&((memstore_ipc::server::HANDSHAKE_MAX_FRAME as u32) + 1).to_le_bytes());
    r.expect_error_then_close(ProtocolError::TooLarge);
    assert!(started.elapsed() < Duration::from_secs(5), "refused at once");
    // After the handshake, frames up to the daemon's limit are accepted.
    let mut r = Raw::hello(&socket);
    let big = vec![0.5f32; 100_000];
    r.send(
        1,
        &Request::Insert {
            batch: protocol::WireBatch {
                keys: F32s::from_slice(&big[..80_000]),
                key_dim: 4,
                values: F32s::from_slice(&big[..40_000]),
                value_dim: 2,
                tags: protocol::WireTags::None,
            },
            tick: 1,
        },
    );
    match r.recv() {
        Reply::Ok(id, _) => assert_eq!(id, 1),
        Reply::Err(_, e) => panic!("a 480 KB request after the handshake: {e:?}"),
        Reply::Closed => panic!("a 480 KB request after the handshake closed the connection"),
    }

    // Three connections are served (r is one); the fourth is refused, with
    // or without a handshake of its own.
    let a = Raw::hello(&socket);
    let b = Raw::connect(&socket);
    let mut c = Raw::connect(&socket);
    c.try_send(0, &hello(PROTOCOL_VERSION, MAGIC, None, None));
    c.expect_error_then_close(ProtocolError::Busy);
    drop(b);
    // Once a place is free, a new connection is served (the daemon notices
    // the closed one within moments).
    let mut served = false;
    for _ in 0..50 {
        let mut c = Raw::connect(&socket);
        c.try_send(0, &hello(PROTOCOL_VERSION, MAGIC, None, None));
        if let Reply::Ok(0, kind) = c.recv() {
            assert_eq!(kind, "Welcome");
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(served, "a freed place is served again");
    drop((a, r));
    let status = d.stop();
    assert!(status.success(), "{status}");
}

/// A client that stops in the middle of a frame after its handshake is
/// disconnected with a typed error after `--frame-timeout`; with
/// `--idle-timeout`, a session that sends nothing is closed, while one that
/// keeps asking is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_frames_and_idle_sessions_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let mut extra = cfg_args().to_vec();
    extra.extend(["--frame-timeout", "1", "--idle-timeout", "2"]);
    let d = Daemon::start(&dir.path().join("s.db"), &socket, &extra);

    let mut half = Raw::hello(&socket);
    let started = std::time::Instant::now();
    let f = protocol::encode_frame(1, &Request::Len, usize::MAX).unwrap();
    half.0.write_all(&f[..f.len() - 1]).unwrap();
    half.expect_error_then_close(ProtocolError::Timeout);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(2),
        "{waited:?}"
    );

    let mut idle = Raw::hello(&socket);
    let mut busy = Raw::hello(&socket);
    let started = std::time::Instant::now();
    let mut id = 1;
    while started.elapsed() < Duration::from_secs(3) {
        busy.send(id, &Request::Len);
        match busy.recv() {
            Reply::Ok(i, kind) => assert_eq!((i, kind.as_str()), (id, "Count(0)")),
            _ => panic!("a session that keeps asking is served"),
        }
        id += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    idle.expect_error_then_close(ProtocolError::Timeout);
    drop(busy);
    let status = d.stop();
    assert!(status.success(), "{status}");
}

/// Sends searches 1..=n of 64 queries × 300 neighbours (replies of about
/// 650 KB each against a store of 300 memories of 4 + 2 floats).
fn send_big_searches(r: &mut Raw, n: u64) {
    let q = vec![0.25f32; 64 * 4];
    for id in 1..=n {
        r.try_send(
            id,
            &Request::Search {
                queries: F32s::from_slice(&q),
                dim: 4,
                k: 300,
                filter: None,
            },
        );
    }
}

/// A client that sends requests and never reads the replies is cut off
/// after the write timeout, instead of holding its session for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let mut extra = cfg_args().to_vec();
    extra.extend(["--write-timeout", "1"]);
    let d = Daemon::start(&dir.path().join("s.db"), &socket, &extra);
    let s = IpcStore::connect(&d.endpoint(), None).await.unwrap();
    fill(&s, 300, 5).await;
    let mut r = Raw::hello(&socket);
    // A few replies fill the socket's buffers, and the client reads none.
    send_big_searches(&mut r, 16);
    std::thread::sleep(Duration::from_secs(4));
    // The daemon gave up on the connection: reading now drains what it had
    // written and then meets the end of the stream.
    r.0.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        match r.0.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("the connection is still open after {total} bytes: {e}"),
        }
    }
    assert!(total < 16 * 650_000, "not every reply was written ({total} bytes)");
    // The other client is served as before.
    assert_eq!(s.len().await.unwrap(), 300);
    drop(s);
    assert!(d.stop().success());
}

/// Raises this process's open-file limit to `n` (children inherit it); the
/// hard limit must allow it.
fn raise_open_files(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        assert!(
            lim.rlim_max >= n as libc::rlim_t,
            "this test needs {n} open files; the hard limit is {}",
            lim.rlim_max
        );
        if lim.rlim_cur < n as libc::rlim_t {
            lim.rlim_cur = n as libc::rlim_t;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
}

/// Resource exhaustion (1 trial), against a daemon with a 1 MiB frame limit
/// and room for 1,000 connections: 2,000 connections that each declare a
/// 1 MiB frame and then send one byte a second for 5 s; 64 pipelined gets of
/// 100,000 copies of one id and 64 searches of 300 neighbours, none of
/// whose replies is read; a frame left half-sent after a handshake; then
/// 1,500 connections that send nothing. Throughout, a well-behaved client's
/// `len()` answers within 1 s and the daemon's resident memory stays under
/// 1 GiB; every slow connection gets a typed refusal (`TooLarge`: before
/// the handshake no frame over 64 KiB), the silent ones beyond the limit
/// `Busy`, the half-sent frame a `Timeout`; the daemon stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_leave_the_daemon_serving() {
    raise_open_files(4096);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let mut extra = cfg_args().to_vec();
    extra.extend([
        "--max-frame",
        "1048576",
        "--max-connections",
        "1000",
        "--frame-timeout",
        "2",
    ]);
    let d = Daemon::start(&dir.path().join("s.db"), &socket, &extra);
    let pid = d.child.id();
    let good = IpcStore::connect(&d.endpoint(), None).await.unwrap();
    let ids = fill(&good, 300, 9).await;

    let hostile = {
        let (socket, id) = (socket.clone(), ids[0]);
        std::thread::spawn(move || {
            let mut slow: Vec<Raw> = (0..2000)
                .map(|_| {
                    let mut r = Raw::connect(&socket);
                    let _ = r.0.write_all(&(1u32 << 20).to_le_bytes());
                    r
                })
                .collect();
            let mut gets = Raw::hello(&socket);
            let many = vec![id; 100_000];
            for i in 1..=64 {
                gets.try_send(i, &Request::Get(many.as_slice().into()));
            }
            let mut searches = Raw::hello(&socket);
            send_big_searches(&mut searches, 64);
            let mut half = Raw::hello(&socket);
            let f = protocol::encode_frame(1, &Request::Len, usize::MAX).unwrap();
            half.0.write_all(&f[..f.len() / 2]).unwrap();
            for _ in 0..5 {
                std::thread::sleep(Duration::from_secs(1));
                for r in &mut slow {
                    let _ = r.0.write_all(&[0]);
                }
            }
            half.expect_error_then_close(ProtocolError::Timeout);
            // 1,500 connections that send nothing: those beyond the
            // daemon's limit are refused at once, the others wait for
            // their handshake's timeout.
            let mut silent: Vec<Raw> = (0..1500).map(|_| Raw::connect(&socket)).collect();
            std::thread::sleep(Duration::from_millis(500));
            let (mut busy, mut waiting) = (0, 0);
            for r in &mut silent {
                r.0.set_nonblocking(true).unwrap();
                let mut len = [0u8; 4];
                let first = r.0.read_exact(&mut len);
                r.0.set_nonblocking(false).unwrap();
                match first {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => waiting += 1,
                    _ => {
                        let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
                        r.0.read_exact(&mut payload).unwrap();
                        let (_, reply): (u64, Response) = protocol::decode_frame(&payload).unwrap();
                        match reply {
                            Response::Error(WireError::Protocol {
                                kind: ProtocolError::Busy,
                                ..
                            }) => busy += 1,
                            other => panic!("a silent connection got {other:?}"),
                        }
                    }
                }
            }
            assert!(
                busy >= 500 && busy + waiting == 1500,
                "{busy} refused, {waiting} waiting"
            );
            let mut refused = BTreeMap::new();
            refused.insert("Busy (silent)".to_string(), busy);
            for r in &mut slow {
                r.0.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let kind = match r.recv() {
                    Reply::Err(_, WireError::Protocol { kind, .. }) => format!("{kind:?}"),
                    Reply::Err(_, e) => format!("{e:?}"),
                    Reply::Ok(_, r) => r,
                    Reply::Closed => "closed without an error".into(),
                };
                *refused.entry(kind).or_insert(0) += 1;
            }
            drop((gets, searches, silent));
            refused
        })
    };
    let started = std::time::Instant::now();
    let mut slowest = Duration::ZERO;
    let mut peak_kib = 0;
    while !hostile.is_finished() {
        let t = std::time::Instant::now();
        assert_eq!(good.len().await.unwrap(), 300);
        slowest = slowest.max(t.elapsed());
        peak_kib = peak_kib.max(rss_kib(pid));
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the hostile clients never finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = hostile.join().unwrap();
    assert!(slowest < Duration::from_secs(1), "len() took {slowest:?}");
    assert!(
        peak_kib < 1 << 20,
        "the daemon's resident memory reached {peak_kib} KiB"
    );
    let typed: usize = ["TooLarge", "Busy"].iter().filter_map(|k| refused.get(*k)).sum();
    assert_eq!(typed, 2000, "every slow connection refused, typed: {refused:?}");
    assert_eq!(good.len().await.unwrap(), 300);
    drop(good);
    let status = d.stop();
    assert!(status.success(), "{status}");
    eprintln!("refusals {refused:?}; slowest len() {slowest:?}; peak RSS {peak_kib} KiB");
}

/// A process of another user is refused on the Unix socket even where the
/// socket's mode lets it connect (the kernel's peer credentials are
/// checked); `--allow-uid` lets it in. Running a client as another user
/// needs root: `.ci/run` runs this where it is root.
#[test]
#[ignore = "needs root, to run a client as another user (.ci/run runs it where it is root)"]
fn peers_of_another_user_are_refused_unless_allowed() {
    use std::os::unix::process::CommandExt;
    const NOBODY: u32 = 65534;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The client, where the other user can run it.
    let load = dir.path().join("memstore-ipc-load");
    std::fs::copy(LOAD, &load).unwrap();
    std::fs::set_permissions(&load, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("d.sock");
    let run_as_nobody = || {
        Command::new(&load)
            .arg(&socket)
            .args(["nobody", "1", "2"])
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .unwrap()
    };
    let mut args = cfg_args().to_vec();
    args.extend(["--socket-mode", "0666"]);
    let d = Daemon::start(&dir.path().join("s.db"), &socket, &args);
    let out = run_as_nobody();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a peer of another user was served");
    assert!(err.contains(&format!("uid {NOBODY} may not use this daemon")), "{err}");
    assert!(d.stop().success());

    let nobody = NOBODY.to_string();
    args.extend(["--allow-uid", nobody.as_str()]);
    let d = Daemon::start(&dir.path().join("s.db"), &socket, &args);
    let out = run_as_nobody();
    assert!(
        out.status.success(),
        "an allowed uid: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.stop().success());
}

/// With `--max-open-stores 2`, a third named store closes the least recently
/// used one without a session (which reopens whole later); when both open
/// stores have sessions, a third is refused with a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_named_stores_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let stores = dir.path().join("stores");
    let socket = dir.path().join("d.sock");
    let s = stores.to_str().unwrap();
    let d = Daemon::start_args(
        &socket,
        &["--stores", s, "--max-open-stores", "2"].map(std::ffi::OsStr::new),
    );
    let named = |name: &str| {
        let mut o = ClientOptions::default();
        o.store = Some(name.to_string());
        o
    };
    let open = |name: &'static str| {
        let (e, o) = (d.endpoint(), named(name));
        async move { IpcStore::connect_with(&e, Some(cfg()), o).await }
    };
    let a = open("a").await.unwrap();
    fill(&a, 7, 1).await;
    a.close().await.unwrap();
    let b = open("b").await.unwrap();
    // a has no session: opening c closes it.
    let c = open("c").await.unwrap();
    fill(&c, 2, 2).await;
    // b and c are in use: d is refused.
    let e = open("d").await.unwrap_err();
    assert_eq!(protocol_error(&e), Some(ProtocolError::Busy), "{e}");
    c.close().await.unwrap();
    // a reopens (closing c, now idle) with its memories.
    let a = open("a").await.unwrap();
    assert_eq!(a.len().await.unwrap(), 7);
    a.close().await.unwrap();
    b.close().await.unwrap();
    assert!(d.stop().success());
}

/// The daemon's resident memory in KiB (`VmRSS` in /proc).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A client that sends 48 searches (about 650 KB of reply each) and reads
/// none makes the daemon hold about its reply budget (2 MB here), not 31 MB
/// of replies: the requests wait for room before they run. Reading then
/// gets every reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_replies_are_bounded_by_the_reply_budget() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let mut extra = cfg_args().to_vec();
    extra.extend(["--reply-budget", "2000000"]);
    let d = Daemon::start(&dir.path().join("s.db"), &socket, &extra);
    let s = IpcStore::connect(&d.endpoint(), None).await.unwrap();
    fill(&s, 300, 5).await;
    let mut r = Raw::hello(&socket);
    let before = rss_kib(d.child.id());
    send_big_searches(&mut r, 48);
    std::thread::sleep(Duration::from_secs(2));
    let grown = rss_kib(d.child.id()).saturating_sub(before);
    assert!(
        grown < 12 * 1024,
        "the daemon grew by {grown} KiB holding unread replies"
    );
    // The client is served as it reads.
    for _ in 1..=48 {
        match r.recv() {
            Reply::Ok(_, kind) => assert!(kind.starts_with("Neighbors"), "{kind}"),
            Reply::Err(id, e) => panic!("request {id}: {e:?}"),
            Reply::Closed => panic!("closed before every reply"),
        }
    }
    drop(r);
    assert_eq!(s.len().await.unwrap(), 300);
    drop(s);
    assert!(d.stop().success());
}

/// Random bytes as frames never bring the daemon down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_frames_do_not_hurt_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let d = Daemon::start(&dir.path().join("s.db"), &socket, &cfg_args());
    let good = IpcStore::connect(&d.endpoint(), None).await.unwrap();
    fill(&good, 20, 5).await;
    let mut rng = Rng::new(0xDEAD_BEEF);
    let valid = protocol::encode_frame(1, &Request::Get(vec![1u64, 2, 3].into()), usize::MAX).unwrap();
    for round in 0..300 {
        let mut r = if round % 3 == 0 {
            Raw::connect(&socket)
        } else {
            Raw::hello(&socket)
        };
        let payload: Vec<u8> = if round % 2 == 0 {
            (0..rng.below(200)).map(|_| rng.below(256) as u8).collect()
        } else {
            // A valid request with a few bytes flipped.
            let mut p = valid[4..].to_vec();
            for _ in 0..1 + rng.below(3) {
                let i = rng.below(p.len() as u64) as usize;
                p[i] ^= 1 << rng.below(8);
            }
            p
        };
        r.send_payload(&payload);
        let _ = r.recv();
    }
    assert!(d.child_alive(), "the daemon survived");
    assert_eq!(good.len().await.unwrap(), 20);
    assert!(d.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_private_and_its_directory_checked() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let d = Daemon::start(&dir.path().join("s.db"), &socket, &cfg_args());
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A second daemon on the same socket is refused; the first keeps it.
    let out = Command::new(MEMSTORED)
        .args(["--db"])
        .arg(dir.path().join("other.db"))
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another daemon"));
    assert!(d.stop().success());
    assert!(!socket.exists(), "the socket is removed at shutdown");

    let d = Daemon::start(&dir.path().join("s.db"), &socket, &["--socket-mode", "660"]);
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o660);
    assert!(d.stop().success());

    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new(MEMSTORED)
        .arg("--db")
        .arg(dir.path().join("s.db"))
        .arg("--socket")
        .arg(open.join("d.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a world-writable socket directory is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("writable by others"));
    assert!(!open.join("d.sock").exists());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_is_loopback_and_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let socket = dir.path().join("d.sock");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");

    // Without a token, or on a non-loopback address, TCP does not start.
    let run = |extra: &[&str]| {
        Command::new(MEMSTORED)
            .arg("--db")
            .arg(&db)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .env_remove(memstore_ipc::TOKEN_ENV)
            .output()
            .unwrap()
    };
    let out = run(&["--tcp", &addr]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token"));
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let tf = token_file.to_str().unwrap();
    let out = run(&["--tcp", &addr, "--token-file", tf]);
    assert!(!out.status.success(), "a 6-byte token is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("fewer than 16"));
    std::fs::write(&token_file, "s3cret-token-0123\n").unwrap();
    let out = run(&["--tcp", &format!("0.0.0.0:{port}"), "--token-file", tf]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));

    // With a token file: a wrong or missing token is refused before the store
    // is touched (no store exists, and none is created).
    let read_file = dir.path().join("read-token");
    std::fs::write(&read_file, "reader-token-4567\n").unwrap();
    let rf = read_file.to_str().unwrap();
    let d = Daemon::start(
        &db,
        &socket,
        &[
            "--tcp",
            &addr,
            "--token-file",
            tf,
            "--auth-lockout",
            "2",
            "--read-token-file",
            rf,
        ],
    );
    let tcp = Endpoint::Tcp(addr.clone());
    let opts = |t: Option<&str>| {
        let mut o = ClientOptions::default();
        o.token = t.map(String::from);
        o
    };
    for t in [
        None,
        Some("wrong"),
        Some("s3cret-token-01234"),
        Some("s3cret-token-012"),
    ] {
        let e = IpcStore::connect_with(&tcp, Some(cfg()), opts(t)).await.unwrap_err();
        assert_eq!(protocol_error(&e), Some(ProtocolError::Unauthorized), "{t:?}: {e}");
    }
    assert!(!db.exists(), "a refused client created no store");
    let s = IpcStore::connect_with(&tcp, Some(cfg()), opts(Some("s3cret-token-0123")))
        .await
        .unwrap();
    fill(&s, 3, 1).await;
    assert_eq!(s.len().await.unwrap(), 3);
    // The Unix socket needs no token (its mode protects it).
    let u = IpcStore::connect(&d.endpoint(), None).await.unwrap();
    assert_eq!(u.len().await.unwrap(), 3);
    // Five wrong tokens in a row lock the address out: even the right token
    // is refused until the lockout (2 s here) has passed.
    for _ in 0..5 {
        let e = IpcStore::connect_with(&tcp, None, opts(Some("guess-guess-guess")))
            .await
            .unwrap_err();
        assert_eq!(protocol_error(&e), Some(ProtocolError::Unauthorized), "{e}");
    }
    let e = IpcStore::connect_with(&tcp, None, opts(Some("s3cret-token-0123")))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("too many wrong tokens"), "{e}");
    std::thread::sleep(Duration::from_millis(2200));
    let s2 = IpcStore::connect_with(&tcp, None, opts(Some("s3cret-token-0123")))
        .await
        .unwrap();
    assert_eq!(s2.len().await.unwrap(), 3);
    s2.close().await.unwrap();
    // The read-only token searches and reads; every write is refused and
    // changes nothing.
    let r = IpcStore::connect_with(&tcp, None, opts(Some("reader-token-4567")))
        .await
        .unwrap();
    assert_eq!(r.len().await.unwrap(), 3);
    let hits = r.search(Vectors::new(&[0.0; 4], 4).unwrap(), 2, None).await.unwrap();
    let found = hits.id(0, 0).unwrap();
    assert_eq!(r.get(&[found]).await.unwrap().len(), 1);
    let b = Batch::new(Vectors::new(&[0.0; 4], 4).unwrap(), Vectors::new(&[0.0; 2], 2).unwrap());
    let e = r.insert(b, 9).await.unwrap_err();
    assert_eq!(protocol_error(&e), Some(ProtocolError::Unauthorized), "{e}");
    let e = r.delete(&[found]).await.unwrap_err();
    assert_eq!(protocol_error(&e), Some(ProtocolError::Unauthorized), "{e}");
    assert_eq!(r.len().await.unwrap(), 3);
    r.close().await.unwrap();
    assert!(d.stop().success());
}

/// The IPC error behind a client error, if it is one.
fn ipc_error(e: &Error) -> Option<&memstore_ipc::IpcError> {
    match e {
        Error::Storage(source) => source.downcast_ref::<memstore_ipc::IpcError>(),
        _ => None,
    }
}

/// A self-signed certificate for `localhost` and its key, as PEM files in
/// `dir` named `NAME.crt` and `NAME.key`.
fn self_signed(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_carries_tcp_and_remote_listening_needs_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let socket = dir.path().join("d.sock");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token-0123\n").unwrap();
    let tf = token_file.to_str().unwrap();
    let (cert, key) = self_signed(dir.path(), "daemon");
    let (other_cert, _) = self_signed(dir.path(), "other");
    let port = free_port();

    // Beyond loopback without TLS: refused at start, nothing created.
    let out = Command::new(MEMSTORED)
        .arg("--db")
        .arg(&db)
        .arg("--socket")
        .arg(&socket)
        .args([
            "--tcp",
            &format!("0.0.0.0:{port}"),
            "--allow-remote",
            "--token-file",
            tf,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--allow-remote needs TLS"), "{stderr}");
    assert!(!db.exists());
    // A key that is not a key: a clear error at start.
    let out = Command::new(MEMSTORED)
        .arg("--db")
        .arg(&db)
        .arg("--socket")
        .arg(&socket)
        .args(["--tcp", &format!("127.0.0.1:{port}"), "--token-file", tf])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("private key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // With TLS, on every interface: a client that trusts the certificate
    // works as over plain TCP, token included.
    let d = Daemon::start(
        &db,
        &socket,
        &[
            "--tcp",
            &format!("0.0.0.0:{port}"),
            "--allow-remote",
            "--token-file",
            tf,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--frame-timeout",
            "1",
        ],
    );
    let tls = Endpoint::parse(&format!("tls:localhost:{port}")).unwrap();
    let opts = |token: &str, ca: Option<&Path>| {
        let mut o = ClientOptions::default();
        o.token = Some(token.to_string());
        o.tls_ca = ca.map(Path::to_path_buf);
        o
    };
    let mut tries = 0;
    let s = loop {
        match IpcStore::connect_with(&tls, Some(cfg()), opts("s3cret-token-0123", Some(&cert))).await {
            Ok(s) => break s,
            Err(e) if tries < 100 && matches!(ipc_error(&e), Some(memstore_ipc::IpcError::Io(_))) => {
                // The TCP listener comes up just after the Unix socket.
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("TLS client: {e}"),
        }
    };
    fill(&s, 3, 1).await;
    let hits = s.search(Vectors::new(&[0.0; 4], 4).unwrap(), 2, None).await.unwrap();
    assert!(hits.id(0, 0).is_some());
    // The token is still checked inside TLS.
    let e = IpcStore::connect_with(&tls, None, opts("guess-guess-guess", Some(&cert)))
        .await
        .unwrap_err();
    assert_eq!(protocol_error(&e), Some(ProtocolError::Unauthorized), "{e}");
    // A certificate the client does not trust: a TLS error, before any token
    // is sent (another self-signed CA, then the public roots).
    for ca in [Some(other_cert.as_path()), None] {
        let e = IpcStore::connect_with(&tls, None, opts("s3cret-token-0123", ca))
            .await
            .unwrap_err();
        assert!(
            matches!(ipc_error(&e), Some(memstore_ipc::IpcError::Tls(_))),
            "{ca:?}: {e}"
        );
    }
    // The certificate names localhost, not 127.0.0.1.
    let by_ip = Endpoint::parse(&format!("tls:127.0.0.1:{port}")).unwrap();
    let e = IpcStore::connect_with(&by_ip, None, opts("s3cret-token-0123", Some(&cert)))
        .await
        .unwrap_err();
    assert!(matches!(ipc_error(&e), Some(memstore_ipc::IpcError::Tls(_))), "{e}");
    // A plain-TCP client gets no session, and its handshake bytes reach no
    // store.
    let plain = Endpoint::Tcp(format!("127.0.0.1:{port}"));
    let mut o = opts("s3cret-token-0123", None);
    o.connect_timeout = Duration::from_secs(3);
    assert!(IpcStore::connect_with(&plain, None, o).await.is_err());
    // A peer that opens TCP and never starts the TLS handshake is closed
    // after the frame timeout (1 s here).
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = idle.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the daemon sent bytes to a peer that never spoke TLS");
    assert!(t.elapsed() < Duration::from_secs(5), "closed after {:?}", t.elapsed());
    // The daemon served on throughout.
    assert_eq!(s.len().await.unwrap(), 3);
    s.close().await.unwrap();
    assert!(d.stop().success());
}

/// Eight client processes, 500 `learn` batches each with their own tags: the
/// counts afterwards are exactly what they sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_processes_share_one_store() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let d = Daemon::start(
        &dir.path().join("s.db"),
        &socket,
        &["--key-dim", "8", "--value-dim", "4", "--synchronous", "normal"],
    );
    let (procs, batches, rows) = (8usize, 500u64, 4u64);
    let endpoint = d.endpoint().to_string();
    let children: Vec<_> = (0..procs)
        .map(|p| {
            Command::new(LOAD)
                .args([
                    endpoint.as_str(),
                    &format!("p{p}"),
                    &batches.to_string(),
                    &rows.to_string(),
                    "learn",
                ])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "a client failed: {}", out.status);
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count() as u64, batches);
    }
    let s = IpcStore::connect(&d.endpoint(), None).await.unwrap();
    let st = s.stats().await.unwrap();
    let total = procs as u64 * batches * rows;
    assert_eq!(st.len, total);
    assert_eq!(st.counters.inserted, total);
    assert_eq!(st.access_count_total, total);
    for p in 0..procs {
        assert_eq!(
            st.tag_counts.get(&format!("p{p}")),
            Some(&(batches * rows)),
            "process {p}"
        );
        for i in 0..batches {
            assert_eq!(
                st.tag_counts.get(&format!("p{p}-{i}")),
                Some(&rows),
                "process {p} batch {i}"
            );
        }
    }
    let ids = s.ids().await.unwrap();
    assert_eq!(ids, (1..=total).collect::<Vec<_>>(), "ids are unique and dense");
    assert!(d.stop().success());
}

/// `kill -9` of the daemon in the middle of a stream of writes, 20 times:
/// every acknowledged batch is there after a restart, no batch is half
/// there, and the file opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_loses_no_acknowledged_batch() {
    kill_nine("normal", &[], 20).await;
}

/// The same with `--synchronous full` (every commit synced), 10 times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_with_full_sync_loses_no_acknowledged_batch() {
    kill_nine("full", &[], 10).await;
}

/// The same with the HNSW index kind (`--index hnsw`), 10 times: the graph
/// file is written only at a clean shutdown, so after each kill it is stale
/// or absent and is rebuilt from the rows; nothing acknowledged is lost and
/// every stored key finds itself through the rebuilt graph.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_with_hnsw_loses_no_acknowledged_batch() {
    let dir = kill_nine("normal", &["--index", "hnsw"], 10).await;
    let graph = dir.path().join("s.db.hnsw");
    let d = Daemon::start(
        &dir.path().join("s.db"),
        &dir.path().join("d.sock"),
        &["--index", "hnsw"],
    );
    let s = IpcStore::connect(&d.endpoint(), None).await.unwrap();
    let ids = s.ids().await.unwrap();
    let mems = s.get(&ids).await.unwrap();
    let keys: Vec<f32> = mems.iter().flat_map(|m| m.key.iter().copied()).collect();
    let found = s.search(Vectors::new(&keys, 8).unwrap(), 1, None).await.unwrap();
    let hits = (0..mems.len())
        .filter(|&i| found.row_ids(i)[0] == Some(mems[i].id))
        .count();
    assert!(
        hits * 100 >= mems.len() * 97,
        "{hits} of {} stored keys find themselves",
        mems.len()
    );
    drop(s);
    assert!(d.stop().success());
    assert!(graph.exists(), "a clean shutdown saves the graph");
}

/// Kills the daemon (started with `extra` arguments) `rounds` times in the
/// middle of a stream of writes, then checks every acknowledged batch.
async fn kill_nine(synchronous: &str, extra: &[&str], rounds: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let socket = dir.path().join("d.sock");
    let mut args = vec!["--key-dim", "8", "--value-dim", "4", "--synchronous", synchronous];
    args.extend_from_slice(extra);
    let rows = 16u64;
    let mut rng = Rng::new(0x5EED_1234_5678_9ABC);
    let mut acked: Vec<u64> = Vec::new();
    for round in 0..rounds {
        let d = Daemon::start(&db, &socket, &args);
        let mut load = Command::new(LOAD)
            .args([
                d.endpoint().to_string().as_str(),
                &format!("r{round}"),
                "1000000",
                &rows.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(load.stdout.take().unwrap()).lines();
        // Let a random number of batches commit, then kill the daemon.
        let wait_for = 1 + rng.below(40);
        let mut last = None;
        for _ in 0..wait_for {
            let l = lines.next().unwrap().unwrap();
            last = Some(l.strip_prefix("ack ").unwrap().parse::<u64>().unwrap());
        }
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        let status = d.signal_and_wait(libc::SIGKILL);
        assert!(!status.success());
        for l in lines {
            let l = l.unwrap();
            last = Some(l.strip_prefix("ack ").unwrap().parse::<u64>().unwrap());
        }
        let _ = load.wait();
        acked.push(last.unwrap() + 1);
    }
    let d = Daemon::start(&db, &socket, &args);
    let s = IpcStore::connect(&d.endpoint(), None).await.unwrap();
    let st = s.stats().await.unwrap();
    let mut expected_len = 0;
    for (round, &n) in acked.iter().enumerate() {
        for i in 0..n {
            assert_eq!(
                st.tag_counts.get(&format!("r{round}-{i}")),
                Some(&rows),
                "round {round}: acknowledged batch {i} is whole"
            );
        }
        // The batch in flight at the kill is either whole or absent.
        let extra = st.tag_counts.get(&format!("r{round}-{n}")).copied();
        assert!(
            extra.is_none() || extra == Some(rows),
            "round {round}: batch {n} is half there"
        );
        let total = st.tag_counts.get(&format!("r{round}")).copied().unwrap_or(0);
        assert_eq!(
            total,
            (n + u64::from(extra.is_some())) * rows,
            "round {round}: nothing else"
        );
        assert!(!st.tag_counts.contains_key(&format!("r{round}-{}", n + 1)));
        expected_len += total;
    }
    assert_eq!(st.len, expected_len);
    drop(s);
    assert!(d.stop().success());
    // The file opens directly too.
    if common::backend() == "sqlite" {
        let direct = memstore_sqlite::SqliteStore::open_existing(&db).await.unwrap();
        assert_eq!(direct.len().await.unwrap() as u64, expected_len);
        direct.close().await.unwrap();
    }
    dir
}

/// SIGINT (SIGTERM is exercised by every reopen of the conformance suite):
/// requests the daemon has read are finished and answered, then it flushes
/// and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_finishes_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let socket = dir.path().join("d.sock");
    let d = Daemon::start(&db, &socket, &["--key-dim", "32", "--value-dim", "8"]);
    let s = Arc::new(IpcStore::connect(&d.endpoint(), None).await.unwrap());
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(t * 77 + 1);
            let k = rng.vecs(2000 * 32, 1);
            let v = rng.vecs(2000 * 8, 1);
            let tag = vec![format!("t{t}")];
            let b = Batch::new(Vectors::new(&k, 32).unwrap(), Vectors::new(&v, 8).unwrap()).with_tags(Tags::Same(&tag));
            s.learn(b, 1, 8).await.map(|_| t)
        }));
    }
    // Signal as soon as the first batch has committed: the others are queued
    // or running in the daemon.
    let watcher = IpcStore::connect(&d.endpoint(), None).await.unwrap();
    while watcher.len().await.unwrap() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let status = tokio::task::spawn_blocking(move || d.signal_and_wait(libc::SIGINT))
        .await
        .unwrap();
    assert!(status.success(), "SIGINT exits 0: {status}");
    let mut outcomes = Vec::new();
    for (t, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(_) => outcomes.push((t, true)),
            Err(e) => {
                assert!(matches!(e, Error::Storage(_)), "{e}");
                outcomes.push((t, false));
            }
        }
    }
    assert!(outcomes.iter().any(|(_, ok)| *ok), "the committed batch was answered");
    // Every batch that committed was answered, and every answered one is durable.
    let direct = memstore_sqlite::SqliteStore::open_existing(&db).await.unwrap();
    let st = direct.stats().await.unwrap();
    for (t, answered) in outcomes {
        let stored = st.tag_counts.get(&format!("t{t}")).copied();
        if answered {
            assert_eq!(stored, Some(2000), "answered batch t{t} is durable");
        } else {
            assert_eq!(stored, None, "batch t{t} was committed but never answered");
        }
    }
    direct.close().await.unwrap();
}

/// Tunable fields change only when a client is alone; dimensions never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconfiguration_waits_for_other_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("s.db"), &dir.path().join("d.sock"), &[]);
    let e = d.endpoint();
    let none = IpcStore::connect(&e, None).await.unwrap_err();
    assert_eq!(protocol_error(&none), Some(ProtocolError::NoStore));
    let a = IpcStore::connect(&e, Some(cfg())).await.unwrap();
    fill(&a, 10, 9).await;
    let c2 = cfg().with_capacity(100).with_thresholds(0.1, 0.2);
    let busy = IpcStore::connect(&e, Some(c2.clone())).await.unwrap_err();
    assert_eq!(protocol_error(&busy), Some(ProtocolError::ConfigInUse), "{busy}");
    match IpcStore::connect(&e, Some(MemoryConfig::new(5, 2))).await {
        Err(Error::ConfigMismatch { field, .. }) => assert_eq!(field, "key_dim"),
        other => panic!("{other:?}"),
    }
    a.close().await.unwrap();
    let b = IpcStore::connect(&e, Some(c2.clone())).await.unwrap();
    assert_eq!(b.config(), &c2);
    assert_eq!(b.len().await.unwrap(), 10);
    let c = IpcStore::connect(&e, None).await.unwrap();
    assert_eq!(c.config(), &c2, "a client without a configuration takes the store's");
    drop((b, c));
    assert!(d.stop().success());
}

/// Calls from many tasks pipeline on one connection and each gets its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_calls_get_their_own_replies() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("s.db"), &dir.path().join("d.sock"), &cfg_args());
    let s = Arc::new(IpcStore::connect(&d.endpoint(), None).await.unwrap());
    fill(&s, 500, 11).await;
    let mut rng = Rng::new(99);
    let queries: Vec<Vec<f32>> = (0..64).map(|i| rng.vecs(4 * (1 + i % 7), 1)).collect();
    let mut sequential = Vec::new();
    for q in &queries {
        sequential.push(s.search(Vectors::new(q, 4).unwrap(), 5, None).await.unwrap());
    }
    let mut tasks = Vec::new();
    for q in queries.clone() {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.search(Vectors::new(&q, 4).unwrap(), 5, None).await
        }));
    }
    let mut by_task = BTreeMap::new();
    for (i, t) in tasks.into_iter().enumerate() {
        by_task.insert(i, t.await.unwrap().unwrap());
    }
    for (i, want) in sequential.iter().enumerate() {
        assert_eq!(&by_task[&i], want, "query set {i}");
    }
    drop(s);
    assert!(d.stop().success());
}

/// `--values-on-disk` serves the same store with values read from the
/// database instead of kept in memory: what one daemon wrote, value updates
/// included, the other reads back identically, and the other way round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_on_disk_and_in_memory_serve_the_same_values() {
    let dir = tempfile::tempdir().unwrap();
    let (db, socket) = (dir.path().join("v.db"), dir.path().join("v.sock"));
    let mut expected: Vec<Memory> = Vec::new();
    for (round, flags) in [&["--values-on-disk"][..], &[][..], &["--values-on-disk"][..]]
        .iter()
        .enumerate()
    {
        let mut args: Vec<&str> = cfg_args().to_vec();
        args.extend_from_slice(flags);
        let d = Daemon::start(&db, &socket, &args);
        let s = IpcStore::connect(&d.endpoint(), Some(cfg())).await.unwrap();
        let ids = s.ids().await.unwrap();
        assert_eq!(
            s.get(&ids).await.unwrap(),
            expected,
            "round {round} ({flags:?}) reads what was written"
        );
        let new = fill(&s, 5, 2 * round as u64 + 11).await;
        let delta = vec![0.5f32; 2 * new.len()];
        s.update_values(&new, Vectors::new(&delta, 2).unwrap()).await.unwrap();
        let ids = s.ids().await.unwrap();
        expected = s.get(&ids).await.unwrap();
        // A search returns the stored values of what it finds.
        let q: Vec<f32> = expected.iter().flat_map(|m| m.key.clone()).collect();
        let found = s.search(Vectors::new(&q, 4).unwrap(), 1, None).await.unwrap();
        for (i, m) in expected.iter().enumerate() {
            assert_eq!(found.id(i, 0), Some(m.id), "round {round}");
            assert_eq!(found.value(i, 0), &m.value[..], "round {round}");
        }
        assert!(d.stop().success());
    }
    assert_eq!(expected.len(), 15);
}

/// `memstored --help` documents every flag.
#[test]
fn help_documents_every_flag() {
    let out = Command::new(MEMSTORED).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--db",
        "--stores",
        "--backend",
        "--socket",
        "--socket-mode",
        "--tcp",
        "--allow-remote",
        "--tls-cert",
        "--tls-key",
        "--token-file",
        "--read-token-file",
        "--max-frame",
        "--max-in-flight",
        "--max-connections",
        "--write-timeout",
        "--frame-timeout",
        "--idle-timeout",
        "--request-timeout",
        "--reply-budget",
        "--backup-dir",
        "--allow-uid",
        "--max-open-stores",
        "--auth-lockout",
        "--synchronous",
        "--values-on-disk",
        "--index",
        "--hnsw-connectivity",
        "--hnsw-expansion-add",
        "--hnsw-expansion-search",
        "--key-dim",
        "--value-dim",
        "--metric",
        "--capacity",
        "--lambda",
        "--novelty",
        "--recombine",
        "--log",
    ] {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{flag} ")) || l.trim_start() == flag)
            .unwrap_or_else(|| panic!("{flag} is not in --help:\n{help}"));
        let documented = line.len() > flag.len() + 12
            || help
                .lines()
                .skip_while(|l| l != &line)
                .nth(1)
                .is_some_and(|next| !next.trim().is_empty() && !next.trim_start().starts_with("--"));
        assert!(documented, "{flag} has no description");
    }
}

/// A backup through the daemon is a consistent copy that opens on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_through_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("s.db"), &dir.path().join("d.sock"), &cfg_args());
    let s = IpcStore::connect(&d.endpoint(), None).await.unwrap();
    let ids = fill(&s, 300, 21).await;
    s.touch(&ids[..10], 5).await.unwrap();
    let before = snapshot(&s).await;
    let copy = dir.path().join("copy.db");
    s.backup_to(&copy).await.unwrap();
    // Refused: an existing file, a relative path.
    assert!(s.backup_to(&copy).await.is_err());
    assert!(matches!(s.backup_to(Path::new("rel.db")).await, Err(Error::Shape(_))));
    // Refused: a path outside the daemon's --backup-dir (here, the test's directory).
    let elsewhere = tempfile::tempdir().unwrap();
    let e = s.backup_to(&elsewhere.path().join("x.db")).await.unwrap_err();
    assert_eq!(protocol_error(&e), Some(ProtocolError::Unauthorized), "{e}");
    assert!(!elsewhere.path().join("x.db").exists());
    // The store, its companions and the copy are private to the daemon's user.
    for f in ["s.db", "s.db-wal", "s.db.lock", "copy.db"] {
        let mode = std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{f} has mode {mode:o}");
    }
    // The store goes on; the copy is the state at the backup.
    fill(&s, 5, 22).await;
    let direct = memstore_sqlite::SqliteStore::open_existing(&copy).await.unwrap();
    let ids = direct.ids().await.unwrap();
    assert_eq!((direct.get(&ids).await.unwrap(), direct.stats().await.unwrap()), before);
    direct.close().await.unwrap();
    drop(s);
    assert!(d.stop().success());
}

/// The lifecycle trait through the daemon's client: a refused backup onto
/// an existing file, a backup, a goodbye; the store (a new session) and the
/// copy (restored into it) hold the memories as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backs_up_and_closes_through_the_lifecycle_trait() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let d = Daemon::start(&db, &dir.path().join("d.sock"), &cfg_args());
    let s = IpcStore::connect(&d.endpoint(), None).await.unwrap();
    let copy = dir.path().join("copy.db");
    // Reopened: the store through a new session, the copy restored into it.
    let reopen = |p: std::path::PathBuf| {
        let (endpoint, db) = (d.endpoint(), db.clone());
        async move {
            let s = IpcStore::connect(&endpoint, None).await?;
            if p != db {
                s.restore_from(&p).await?;
            }
            Ok(s)
        }
    };
    backup_and_close(s, &db, &copy, reopen).await;
    assert!(d.stop().success());
}

/// A restore puts back the store as it was at a backup (the resume of a
/// training run from a checkpoint); it needs the only session, and a bad
/// backup leaves the store as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_through_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("s.db"), &dir.path().join("d.sock"), &cfg_args());
    let s = IpcStore::connect(&d.endpoint(), None).await.unwrap();
    let ids = fill(&s, 200, 31).await;
    s.touch(&ids[..10], 5).await.unwrap();
    let at_backup = snapshot(&s).await;
    let copy = dir.path().join("copy.db");
    s.backup_to(&copy).await.unwrap();
    fill(&s, 50, 32).await;
    s.delete(&ids[..20]).await.unwrap();
    let moved_on = snapshot(&s).await;
    assert_ne!(moved_on, at_backup);
    // Refused while another session is connected; nothing changes.
    let other = IpcStore::connect(&d.endpoint(), None).await.unwrap();
    match s.restore_from(&copy).await {
        Err(e) => assert_eq!(
            memstore_ipc::protocol_error(&e),
            Some(memstore_ipc::ProtocolError::ConfigInUse),
            "{e}"
        ),
        Ok(()) => panic!("restored under another session"),
    }
    other.close().await.unwrap();
    // Refused: a relative path, a missing file, a file that is not a store.
    assert!(matches!(
        s.restore_from(Path::new("rel.db")).await,
        Err(Error::Shape(_))
    ));
    assert!(s.restore_from(&dir.path().join("missing.db")).await.is_err());
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    assert!(s.restore_from(&junk).await.is_err());
    assert_eq!(snapshot(&s).await, moved_on);
    // Restored: the state at the backup, which goes on from there.
    s.restore_from(&copy).await.unwrap();
    assert_eq!(snapshot(&s).await, at_backup);
    fill(&s, 3, 33).await;
    assert_eq!(s.len().await.unwrap(), 203);
    // The backup itself is untouched, and the restored store survives a restart.
    if common::backend() == "sqlite" {
        let direct = memstore_sqlite::SqliteStore::open_existing(&copy).await.unwrap();
        assert_eq!(direct.len().await.unwrap(), 200);
        direct.close().await.unwrap();
    }
    let after = snapshot(&s).await;
    s.close().await.unwrap();
    assert!(d.stop().success());
    let d = Daemon::start(&dir.path().join("s.db"), &dir.path().join("d.sock"), &cfg_args());
    let s = IpcStore::connect(&d.endpoint(), None).await.unwrap();
    assert_eq!(snapshot(&s).await, after);
    drop(s);
    assert!(d.stop().success());
}

/// `memstored --stores DIR`: one socket serves many named stores (one per
/// memory layer of a model), each with its own configuration, data, sessions
/// and restore; names are checked on both sides; a restart finds them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_stores_share_one_socket() {
    let dir = tempfile::tempdir().unwrap();
    let stores = dir.path().join("layers");
    let socket = dir.path().join("d.sock");
    let start = || Daemon::start_args(&socket, &["--stores".as_ref(), stores.as_os_str()]);
    let d = start();
    let named = |n: &str| {
        let mut o = ClientOptions::default();
        o.store = Some(n.into());
        o
    };
    let e = d.endpoint();
    // No default store: a handshake must name one.
    let err = IpcStore::connect(&e, Some(cfg())).await.unwrap_err();
    assert_eq!(protocol_error(&err), Some(ProtocolError::StoreName), "{err}");
    // A name not yet created needs a configuration.
    let err = IpcStore::connect_with(&e, None, named("block0")).await.unwrap_err();
    assert_eq!(protocol_error(&err), Some(ProtocolError::NoStore), "{err}");
    // Bad names: refused by the client, and by the daemon from a raw client.
    for bad in ["", "../x", ".hidden", "a/b", "x y", &"n".repeat(65)] {
        let err = IpcStore::connect_with(&e, Some(cfg()), named(bad)).await.unwrap_err();
        assert_eq!(protocol_error(&err), Some(ProtocolError::StoreName), "{bad:?}: {err}");
        let mut raw = Raw::connect(&socket);
        raw.send(
            0,
            &Request::Hello(Hello {
                magic: MAGIC,
                version: PROTOCOL_VERSION,
                token: None,
                config: Some(WireConfig::from(&cfg())),
                store: Some(bad.to_string()),
            }),
        );
        raw.expect_error_then_close(ProtocolError::StoreName);
    }
    assert!(!dir.path().join("x.db").exists());
    // Two stores with different shapes behind one socket.
    let c1 = MemoryConfig::new(8, 3);
    let a = IpcStore::connect_with(&e, Some(cfg()), named("block0")).await.unwrap();
    let b = IpcStore::connect_with(&e, Some(c1.clone()), named("block1"))
        .await
        .unwrap();
    fill(&a, 40, 41).await;
    let mut rng = Rng::new(43);
    let (k, v) = (rng.vecs(7 * 8, 1), rng.vecs(7 * 3, 1));
    b.insert(
        Batch::new(Vectors::new(&k, 8).unwrap(), Vectors::new(&v, 3).unwrap()),
        1,
    )
    .await
    .unwrap();
    assert_eq!((a.len().await.unwrap(), b.len().await.unwrap()), (40, 7));
    assert!(stores.join("block0.db").exists() || stores.join("block0.duckdb").exists());
    // A second client of block0 takes its configuration; block1's shape is its own.
    let a2 = IpcStore::connect_with(&e, None, named("block0")).await.unwrap();
    assert_eq!(a2.config(), &cfg());
    match IpcStore::connect_with(&e, Some(cfg()), named("block1")).await {
        Err(Error::ConfigMismatch { field, .. }) => assert_eq!(field, "key_dim"),
        other => panic!("{other:?}"),
    }
    // Sessions are per store: block1 restores while block0 has two sessions.
    let copy = dir.path().join("block1.copy");
    b.backup_to(&copy).await.unwrap();
    let at_backup = snapshot(&b).await;
    b.delete(&b.ids().await.unwrap()[..3]).await.unwrap();
    b.restore_from(&copy).await.unwrap();
    assert_eq!(snapshot(&b).await, at_backup);
    // ...and block0 refuses while it has another session.
    let copy0 = dir.path().join("block0.copy");
    a.backup_to(&copy0).await.unwrap();
    let err = a.restore_from(&copy0).await.unwrap_err();
    assert_eq!(protocol_error(&err), Some(ProtocolError::ConfigInUse), "{err}");
    let (snap_a, snap_b) = (snapshot(&a).await, snapshot(&b).await);
    for s in [a, a2, b] {
        s.close().await.unwrap();
    }
    assert!(d.stop().success());
    // After a restart both stores are found by name with their own configurations.
    let d = start();
    let e = d.endpoint();
    let a = IpcStore::connect_with(&e, None, named("block0")).await.unwrap();
    let b = IpcStore::connect_with(&e, None, named("block1")).await.unwrap();
    assert_eq!((a.config(), b.config()), (&cfg(), &c1));
    assert_eq!((snapshot(&a).await, snapshot(&b).await), (snap_a, snap_b));
    drop((a, b));
    assert!(d.stop().success());
    // A daemon of one store refuses names; with --db and --stores it serves both.
    let one = Daemon::start(&dir.path().join("s.db"), &dir.path().join("one.sock"), &cfg_args());
    let err = IpcStore::connect_with(&one.endpoint(), None, named("block0"))
        .await
        .unwrap_err();
    assert_eq!(protocol_error(&err), Some(ProtocolError::StoreName), "{err}");
    assert!(one.stop().success());
    let both = Daemon::start(
        &dir.path().join("s.db"),
        &dir.path().join("both.sock"),
        &["--stores", stores.to_str().unwrap()],
    );
    let dflt = IpcStore::connect(&both.endpoint(), None).await.unwrap();
    let b = IpcStore::connect_with(&both.endpoint(), None, named("block1"))
        .await
        .unwrap();
    assert_eq!((dflt.config(), b.config()), (&cfg(), &c1));
    drop((dflt, b));
    assert!(both.stop().success());
}

/// A daemon built without DuckDB says so for `--backend duckdb`.
#[cfg(not(feature = "duckdb"))]
#[test]
fn duckdb_backend_needs_the_feature() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(MEMSTORED)
        .args(["--backend", "duckdb", "--db"])
        .arg(dir.path().join("x.duckdb"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--features duckdb"), "{err}");
    assert!(!dir.path().join("x.duckdb").exists());
}

/// `apply_all` sends a group as one request when it fits the client's frame
/// limit and in smaller groups (down to single batches) when it does not;
/// either way the daemon's store ends where applying the batches one by one
/// ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_all_splits_groups_over_the_frame_limit() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let d = Daemon::start(&dir.path().join("s.db"), &socket, &cfg_args());
    let mut o = ClientOptions::default();
    o.max_frame = 4096;
    let s = IpcStore::connect_with(&d.endpoint(), Some(cfg()), o).await.unwrap();
    let reference = memstore_api::InMemoryStore::new(cfg()).unwrap();
    let mut rng = Rng::new(3);
    let mut batches = Vec::new();
    let mut next = 1;
    // Six small batches (one frame together), then six of 100 rows each
    // (2.4 KB of floats each: only one fits a frame).
    for (i, rows) in [10usize, 10, 10, 10, 10, 10, 100, 100, 100, 100, 100, 100]
        .into_iter()
        .enumerate()
    {
        let mut b = memstore_api::ChangeBatch {
            seq: i as u64 + 1,
            tick: i as u64 + 1,
            first_id: next,
            insert_keys: rng.vecs(rows, 4),
            insert_values: rng.vecs(rows, 2),
            ..Default::default()
        };
        if next > 1 {
            b.touch = vec![1, next - 1];
            b.update_ids = vec![next - 1];
            b.deltas = vec![0.5, -0.5];
        }
        next += rows as u64;
        batches.push(b);
    }
    s.apply_all(&batches[..6]).await.unwrap();
    s.apply_all(&batches[6..]).await.unwrap();
    for b in &batches {
        reference.apply(b).await.unwrap();
    }
    // Read back through a client whose frames hold the whole store.
    let reader = IpcStore::connect(&d.endpoint(), None).await.unwrap();
    assert_eq!(snapshot(&reader).await, {
        let ids = reference.ids().await.unwrap();
        (reference.get(&ids).await.unwrap(), reference.stats().await.unwrap())
    });
    reader.close().await.unwrap();
    s.close().await.unwrap();
    assert!(d.stop().success());
}
