//! What is specific to the PostgreSQL driver: store names, many clients of
//! one store (each sees the others' writes; concurrent learners end with
//! exact totals; a client too far behind reloads; rows written behind
//! memstore's back are refused), opening a store that is not there, SQL kNN
//! on the key column, backups to a file and their restore. The cases that need a
//! server are ignored in a plain `cargo test`; `.ci/run` starts one
//! (`scripts/postgres.sh`) and runs them with `--ignored`.

use memstore_api::{Batch, MemoryConfig, MemoryStore, Metric, Vectors};
use memstore_postgres::{PostgresError, PostgresLocation, PostgresOptions, PostgresStore};

fn url() -> String {
    std::env::var("MEMSTORE_POSTGRES_URL")
        .expect("MEMSTORE_POSTGRES_URL names the server (scripts/postgres.sh start prints it)")
}

fn fresh(tag: &str) -> PostgresLocation {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    PostgresLocation::new(url(), format!("{tag}_{}_{}", std::process::id(), nanos % 1_000_000_000))
}

/// The driver's typed error behind a store error.
fn driver_error(e: &memstore_api::Error) -> &PostgresError {
    let memstore_api::Error::Storage(source) = e else {
        panic!("expected a storage error, got {e}");
    };
    source
        .downcast_ref::<PostgresError>()
        .unwrap_or_else(|| panic!("expected a PostgresError, got {source}"))
}

#[tokio::test]
async fn a_store_name_that_is_not_an_identifier_is_refused_before_connecting() {
    // No server is needed: the name is checked first (the URL goes nowhere).
    let at = PostgresLocation::new("postgres://nobody@127.0.0.1:1/none", "Robert'); DROP TABLE x;--");
    let e = PostgresStore::open(at, MemoryConfig::new(4, 2))
        .await
        .err()
        .expect("refused");
    assert!(matches!(driver_error(&e), PostgresError::BadName(_)), "{e}");
}

fn batch<'a>(keys: &'a [f32], values: &'a [f32], kd: usize) -> Batch<'a> {
    Batch::new(
        Vectors::new(keys, kd).unwrap(),
        Vectors::new(values, values.len() / (keys.len() / kd)).unwrap(),
    )
}

/// Every memory of a store, by id, as `get` returns it.
async fn contents(s: &PostgresStore) -> Vec<memstore_api::Memory> {
    let ids = s.ids().await.unwrap();
    s.get(&ids).await.unwrap()
}

#[tokio::test]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
async fn clients_see_each_others_writes_at_their_next_read() {
    let at = fresh("shared");
    let config = MemoryConfig::new(2, 1).with_thresholds(0.01, 0.5);
    let a = PostgresStore::open(at.clone(), config.clone()).await.unwrap();
    let b = PostgresStore::open(at.clone(), config.clone()).await.unwrap();
    let ids_a = a
        .insert(batch(&[0.0, 0.0, 10.0, 0.0], &[1.0, 2.0], 2), 1)
        .await
        .unwrap();
    // B's next read sees A's commit: search, get, len and stats.
    let hits = b.search(Vectors::new(&[10.0, 0.1], 2).unwrap(), 1, None).await.unwrap();
    assert_eq!(hits.row_ids(0)[0], Some(ids_a[1]));
    assert_eq!(b.len().await.unwrap(), 2);
    assert_eq!(b.stats().await.unwrap().counters.inserted, 2);
    // B's write is planned on A's rows: no id reused, and its learn merges
    // with A's memory.
    let ids_b = b.insert(batch(&[20.0, 0.0], &[3.0], 2), 2).await.unwrap();
    assert!(ids_b[0] > ids_a[1], "{ids_b:?} after {ids_a:?}");
    b.learn(
        batch(&[0.0, 0.0], &[5.0], 2).with_tags(memstore_api::Tags::Same(&["b".to_string()])),
        3,
        2,
    )
    .await
    .unwrap();
    assert_eq!(a.len().await.unwrap(), 3, "the merge replaced A's memory");
    b.delete(&ids_b).await.unwrap();
    let e = a.get(&ids_b).await.expect_err("deleted by B");
    assert!(matches!(e, memstore_api::Error::UnknownId(_)), "{e}");
    // Value updates and retagging (apply) travel too.
    let merged = *a.ids().await.unwrap().iter().max().unwrap();
    a.update_values(&[merged], Vectors::new(&[1.0], 1).unwrap())
        .await
        .unwrap();
    assert_eq!(contents(&a).await, contents(&b).await);
    let merged_b = b.get(&[merged]).await.unwrap();
    assert_eq!(merged_b[0].tags.get("b"), Some(&1));
    // Both agree with a third client that loads the store from scratch.
    let c = PostgresStore::open_existing(at).await.unwrap();
    assert_eq!(contents(&c).await, contents(&a).await);
    assert_eq!(c.stats().await.unwrap(), b.stats().await.unwrap());
    for s in [a, b, c] {
        s.close().await.unwrap();
    }
}

#[tokio::test]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
async fn a_client_behind_the_deletion_log_reloads_the_store_whole() {
    let at = fresh("behind");
    let options = PostgresOptions::default().with_deletion_log(8);
    let config = MemoryConfig::new(2, 1);
    let a = PostgresStore::open_with(at.clone(), config.clone(), options.clone())
        .await
        .unwrap();
    let b = PostgresStore::open_with(at.clone(), config.clone(), options)
        .await
        .unwrap();
    assert_eq!(b.len().await.unwrap(), 0);
    // 40 versions of inserts and deletes while B reads nothing.
    for i in 0..20 {
        let x = i as f32;
        let ids = a.insert(batch(&[x, 0.0, x, 1.0], &[x, x], 2), i).await.unwrap();
        a.delete(&ids[..1]).await.unwrap();
    }
    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM memstore_deleted")
        .fetch_one(a.driver().pool())
        .await
        .unwrap();
    assert!(logged < 20, "the log was pruned: {logged} of 20 deletions kept");
    assert_eq!(contents(&b).await, contents(&a).await);
    assert_eq!(b.len().await.unwrap(), 20);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
async fn rows_written_behind_memstore_are_refused() {
    let at = fresh("behind_back");
    let s = PostgresStore::open(at, MemoryConfig::new(2, 1)).await.unwrap();
    s.insert(batch(&[1.0, 2.0], &[3.0], 2), 1).await.unwrap();
    for statement in [
        "INSERT INTO memories (id, key, value, created, last_access, access_count, crf, priority) \
         VALUES (99, '[0,0]', '{0}', 0, 0, 1, 1, 0)",
        "UPDATE memories SET value = '{7}'",
    ] {
        let e = sqlx::query(statement)
            .execute(s.driver().pool())
            .await
            .expect_err("no client would see it");
        assert!(e.to_string().contains("written through memstore"), "{e}");
    }
    assert_eq!(s.get(&[1]).await.unwrap()[0].value, vec![3.0]);
    s.close().await.unwrap();
}

/// Four processes learn into one store at once for 60 seconds
/// (`MEMSTORE_SHARED_SECONDS` to change it), each with its own index; the
/// store ends with exactly the totals of running their batches one after
/// another: every anchor copy merged once into its anchor (access counts
/// and per-client tag counts), every new key inserted once, no id twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
async fn four_processes_learning_at_once_end_with_exact_totals() {
    use memstore_engine::crash::shared;
    let seconds: f64 = std::env::var("MEMSTORE_SHARED_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.0);
    let at = fresh("learners");
    let s = PostgresStore::open(at.clone(), shared::config()).await.unwrap();
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    for a in 0..shared::ANCHORS {
        keys.extend(shared::anchor_key(a));
        values.extend(shared::anchor_value(a));
    }
    let anchor_tag = ["anchor".to_string()];
    let anchors = s
        .insert(
            batch(&keys, &values, 4).with_tags(memstore_api::Tags::Same(&anchor_tag)),
            0,
        )
        .await
        .unwrap();
    let arg = format!("{}#{}", at.url, at.store);
    let exe = env!("CARGO_BIN_EXE_memstore-postgres-learner");
    let children: Vec<_> = (0..4u64)
        .map(|c| {
            std::process::Command::new(exe)
                .args([arg.as_str(), &c.to_string(), &seconds.to_string()])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut copies = vec![vec![0u64; shared::ANCHORS]; 4];
    let mut novel = [0u64; 4];
    for (c, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "client {c}: {:?}", out.status);
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let w: Vec<&str> = line.split(' ').collect();
            match w.as_slice() {
                ["anchor", a, n] => copies[c][a.parse::<usize>().unwrap()] = n.parse().unwrap(),
                ["novel", n] => novel[c] = n.parse().unwrap(),
                _ => panic!("client {c} said {line:?}"),
            }
        }
        assert!(novel[c] > 0, "client {c} learned nothing");
    }
    let all = contents(&s).await;
    let total_novel: u64 = novel.iter().sum();
    let total_copies: u64 = copies.iter().flatten().sum();
    assert_eq!(all.len() as u64, shared::ANCHORS as u64 + total_novel);
    let st = s.stats().await.unwrap();
    assert_eq!(st.counters.inserted, shared::ANCHORS as u64 + total_novel);
    assert_eq!(st.counters.merged, total_copies);
    for a in 0..shared::ANCHORS {
        let key = shared::anchor_key(a);
        let m = all
            .iter()
            .find(|m| m.key == key)
            .expect("the anchor survives its merges");
        assert_eq!(m.value, shared::anchor_value(a));
        let sent: u64 = copies.iter().map(|mine| mine[a]).sum();
        assert_eq!(m.access_count, 1 + sent, "anchor {a}: one access per copy");
        assert_eq!(m.tags.get("anchor"), Some(&1));
        for (c, mine) in copies.iter().enumerate() {
            assert_eq!(
                m.tags.get(&shared::tag(c as u64)).copied().unwrap_or(0),
                mine[a],
                "anchor {a}, client {c}"
            );
        }
        assert!(!anchors.contains(&m.id) || sent == 0, "a merged anchor is a new memory");
    }
    for c in 0..4u64 {
        let mine = all
            .iter()
            .filter(|m| m.tags.len() == 1 && m.tags.get(&shared::tag(c)) == Some(&1))
            .count() as u64;
        assert_eq!(mine, novel[c as usize], "client {c}'s new keys");
    }
    let mut ids: Vec<u64> = all.iter().map(|m| m.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), all.len(), "no id twice");
    assert!(ids.iter().all(|&id| id < st.next_id));
    s.close().await.unwrap();
}

#[tokio::test]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
async fn opening_a_missing_store_is_a_typed_error_and_creates_nothing() {
    let at = fresh("missing");
    let e = PostgresStore::open_existing(at.clone())
        .await
        .err()
        .expect("no such store");
    assert!(matches!(driver_error(&e), PostgresError::NoStore(_)), "{e}");
    // Still missing: the failed open created no schema.
    let e = PostgresStore::open_existing(at)
        .await
        .err()
        .expect("still no such store");
    assert!(matches!(driver_error(&e), PostgresError::NoStore(_)), "{e}");
}

#[tokio::test]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
async fn keys_are_pgvector_vectors_that_sql_knn_orders() {
    let at = fresh("knn");
    let s = PostgresStore::open(at, MemoryConfig::new(3, 1).with_metric(Metric::L2))
        .await
        .unwrap();
    let keys = [0.0f32, 0.0, 0.0, 1.0, 0.0, 0.0, 5.0, 5.0, 5.0];
    let values = [1.0f32, 2.0, 3.0];
    let ids = s
        .insert(
            Batch::new(Vectors::new(&keys, 3).unwrap(), Vectors::new(&values, 1).unwrap()),
            1,
        )
        .await
        .unwrap();
    let typ: String = sqlx::query_scalar("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'memories'::regclass AND attname = 'key'")
        .fetch_one(s.driver().pool())
        .await
        .unwrap();
    assert_eq!(typ, "vector(3)");
    let near: Vec<i64> = sqlx::query_scalar("SELECT id FROM memories ORDER BY key <-> '[0.9,0,0]'::vector, id LIMIT 2")
        .fetch_all(s.driver().pool())
        .await
        .unwrap();
    assert_eq!(near, vec![ids[1] as i64, ids[0] as i64]);
    s.close().await.unwrap();
}

/// Kills a writer process with SIGKILL at random moments, 20 times, reopening
/// the store after each kill: every acknowledged batch is there whole and no
/// batch in part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
async fn sigkill_mid_stream_loses_no_acknowledged_batch() {
    let at = fresh("crash");
    let arg = format!("{}#{}", at.url, at.store);
    let exe = env!("CARGO_BIN_EXE_memstore-postgres-writer");
    let reopen = || PostgresStore::open(at.clone(), MemoryConfig::new(8, 4));
    memstore_api::testkit::crash::kill_rounds(exe, &[arg.as_str()], 20, 64, reopen).await;
}

/// A private cluster of `scripts/postgres.sh` (password-protected) in its
/// own directory, sharing the binaries of the default one; stopped and
/// removed when dropped.
struct PrivateCluster {
    dir: std::path::PathBuf,
    url: String,
}

impl PrivateCluster {
    const PASSWORD: &str = "s3cret";

    fn script(&self, command: &str) -> std::process::Output {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/postgres.sh");
        let dist = std::env::var("MEMSTORE_PG_DIST").unwrap_or_else(|_| {
            let base = std::env::var("MEMSTORE_PG_DIR").unwrap_or_else(|_| "/tmp/memstore-postgres".into());
            format!("{base}/dist")
        });
        let out = std::process::Command::new("bash")
            .args([script, command])
            .env("MEMSTORE_PG_DIR", &self.dir)
            .env("MEMSTORE_PG_DIST", dist)
            .env("MEMSTORE_PG_PASSWORD", Self::PASSWORD)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "postgres.sh {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("memstore-pg-{name}-{}", std::process::id()));
        let mut cluster = PrivateCluster {
            dir,
            url: String::new(),
        };
        let out = cluster.script("start");
        cluster.url = String::from_utf8(out.stdout).unwrap().trim().to_string();
        cluster
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = self.script("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server restart while a client writes: the writes that reach no server
/// fail with a typed error, the client reconnects by itself, and every
/// acknowledged batch is in the store afterwards (read by a new client).
/// The cluster asks for a password: a wrong one is a typed error too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs scripts/postgres.sh's PostgreSQL binaries (scripts/postgres.sh start installs them)"]
async fn a_server_restart_mid_stream_gives_typed_errors_and_loses_nothing_acknowledged() {
    let cluster = PrivateCluster::start("restart");
    let wrong = cluster.url.replace(PrivateCluster::PASSWORD, "wrong");
    let e = PostgresStore::open(PostgresLocation::new(wrong, "s"), MemoryConfig::new(2, 1))
        .await
        .err()
        .expect("wrong password");
    match driver_error(&e) {
        PostgresError::Sql(sqlx::Error::Database(d)) => assert_eq!(d.code().as_deref(), Some("28P01"), "{d}"),
        other => panic!("expected an authentication failure, got {other}"),
    }
    let at = PostgresLocation::new(cluster.url.clone(), "s");
    let options = PostgresOptions::default().with_acquire_timeout(std::time::Duration::from_secs(1));
    let s = PostgresStore::open_with(at.clone(), MemoryConfig::new(2, 1), options)
        .await
        .unwrap();
    let write = |i: u64| {
        let s = &s;
        async move {
            let tags = [format!("b{i}")];
            let keys = [i as f32, 0.0, i as f32, 1.0];
            s.insert(
                batch(&keys, &[1.0, 2.0], 2).with_tags(memstore_api::Tags::Same(&tags)),
                i,
            )
            .await
        }
    };
    let mut acknowledged = Vec::new();
    for i in 0..10 {
        write(i).await.unwrap();
        acknowledged.push(i);
    }
    // The server stays down longer than the pool's acquire timeout (1 s),
    // so a write that waits for a connection meets the outage even on a
    // loaded machine (a restart that is quicker than the timeout can be
    // waited out without an error, which is no failure of the store).
    let restart = {
        let dir = cluster.dir.clone();
        std::thread::spawn(move || {
            let c = PrivateCluster {
                dir,
                url: String::new(),
            };
            c.script("halt");
            std::thread::sleep(std::time::Duration::from_secs(3));
            c.script("start");
            std::mem::forget(c);
        })
    };
    let (mut failed, mut after) = (0, 0);
    let mut i = 10;
    while after < 5 {
        match write(i).await {
            Ok(_) => {
                acknowledged.push(i);
                if restart.is_finished() {
                    after += 1;
                }
            }
            Err(e) => {
                assert!(matches!(driver_error(&e), PostgresError::Sql(_)), "{e}");
                failed += 1;
                // A client backs off (a refused connection fails at once).
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        assert!(i < 100_000, "the client never came back");
        i += 1;
    }
    restart.join().unwrap();
    assert!(failed > 0, "no write met the restart");
    let fresh = PostgresStore::open_existing(at).await.unwrap();
    let counts = fresh.stats().await.unwrap().tag_counts;
    for i in &acknowledged {
        assert_eq!(counts.get(&format!("b{i}")), Some(&2), "batch {i}");
    }
    assert_eq!(contents(&s).await, contents(&fresh).await);
    s.close().await.unwrap();
    fresh.close().await.unwrap();
}

#[tokio::test]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
async fn a_database_without_pgvector_is_a_typed_error() {
    // A role that may not create the extension (pgvector is not a trusted
    // extension), in a database of its own that does not have it.
    let admin = sqlx::PgPool::connect(&url()).await.unwrap();
    let name = format!("memstore_plain_{}", std::process::id());
    for statement in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("DROP ROLE IF EXISTS {name}"),
        format!("CREATE ROLE {name} LOGIN"),
        format!("CREATE DATABASE {name} OWNER {name}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&admin)
            .await
            .unwrap();
    }
    let plain_url = url()
        .replacen("postgres@", &format!("{name}@"), 1)
        .replacen("/postgres?", &format!("/{name}?"), 1);
    assert!(
        plain_url.contains(&format!("{name}@")) && plain_url.contains(&format!("/{name}")),
        "{plain_url}"
    );
    let e = PostgresStore::open(PostgresLocation::new(plain_url, "s"), MemoryConfig::new(2, 1))
        .await
        .err()
        .expect("no pgvector");
    assert!(matches!(driver_error(&e), PostgresError::NoVector(_)), "{e}");
    for statement in [format!("DROP DATABASE {name}"), format!("DROP ROLE {name}")] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&admin)
            .await
            .unwrap();
    }
}

/// A backup taken while two clients write, then more writes, then a restore:
/// the store is as it was at the backup, row by row, for a new client and
/// for a client that stayed open throughout; new tags after the restore get
/// fresh ids; a file that is not a backup changes nothing.
#[tokio::test]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
async fn a_backup_restores_the_store_exactly_for_every_client() {
    let at = fresh("backup");
    let config = MemoryConfig::new(3, 2).with_thresholds(0.01, 0.5);
    let a = PostgresStore::open(at.clone(), config.clone()).await.unwrap();
    let b = PostgresStore::open(at.clone(), config.clone()).await.unwrap();
    let tags = |t: &str| vec![t.to_string()];
    let (t1, t2) = (tags("one"), tags("two"));
    a.insert(
        batch(&[0.0, 0.0, 0.0, 1.0, 1.0, 1.0], &[1.0, 2.0, 3.0, 4.0], 3).with_tags(memstore_api::Tags::Same(&t1)),
        1,
    )
    .await
    .unwrap();
    b.learn(
        batch(&[0.0, 0.0, 0.0, 5.0, 5.0, 5.0], &[9.0, 9.0, 8.0, 8.0], 3).with_tags(memstore_api::Tags::Same(&t2)),
        2,
        2,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("store.backup");
    a.backup_to(&file).await.unwrap();
    let saved = contents(&b).await;
    let saved_stats = b.stats().await.unwrap();
    assert!(
        a.backup_to(&file).await.is_err(),
        "an existing file is never overwritten"
    );
    // Later writes, then the restore.
    let ids = a.ids().await.unwrap();
    a.delete(&ids[..1]).await.unwrap();
    b.insert(batch(&[7.0, 7.0, 7.0], &[0.0, 0.0], 3), 3).await.unwrap();
    memstore_postgres::restore(at.clone(), &file).await.unwrap();
    for client in [&a, &b] {
        assert_eq!(contents(client).await, saved);
        assert_eq!(client.stats().await.unwrap(), saved_stats);
    }
    let c = PostgresStore::open_existing(at.clone()).await.unwrap();
    assert_eq!(contents(&c).await, saved);
    let t3 = tags("three");
    let new = c
        .insert(
            batch(&[8.0, 8.0, 8.0], &[0.0, 0.0], 3).with_tags(memstore_api::Tags::Same(&t3)),
            4,
        )
        .await
        .unwrap();
    assert_eq!(a.get(&new).await.unwrap()[0].tags.get("three"), Some(&1));
    // Not a backup: refused, nothing changed.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"memstore-postgres backup 1\nmemstore_config\n\x05").unwrap();
    let before = contents(&c).await;
    assert!(matches!(
        memstore_postgres::restore(at.clone(), &junk).await,
        Err(memstore_api::Error::Corrupt(_))
    ));
    std::fs::write(&junk, b"something else").unwrap();
    assert!(memstore_postgres::restore(at, &junk).await.is_err());
    assert_eq!(contents(&c).await, before);
    for s in [a, b, c] {
        s.close().await.unwrap();
    }
}

/// Asserts that `got` (server-side) is the store's own answer `want`, up to
/// float rounding: the same distances to 1e-4 and, where two rows' order
/// differs, distances too close to tell apart.
fn assert_same_answer(got: &memstore_api::Neighbors, want: &memstore_api::Neighbors, what: &str) {
    assert_eq!((got.n, got.k), (want.n, want.k), "{what}: shape");
    for slot in 0..want.ids.len() {
        let (g, w) = (got.distances[slot], want.distances[slot]);
        assert!(
            (g - w).abs() <= 1e-4 * (1.0 + w.abs()) || (g.is_infinite() && w.is_infinite()),
            "{what}: slot {slot}: distance {g} against the store's {w}"
        );
        if got.ids[slot] != want.ids[slot] {
            // A swap of two rows is allowed only between equal distances.
            let i = slot / want.k;
            let other = (0..want.k).find(|&j| want.ids[i * want.k + j] == got.ids[slot]);
            let other =
                other.unwrap_or_else(|| panic!("{what}: slot {slot}: {:?} not in the store's answer", got.ids[slot]));
            assert!(
                (want.distances[i * want.k + other] - w).abs() < 1e-4,
                "{what}: slot {slot}: order differs"
            );
        }
    }
    // Keys and values come with the ids.
    for slot in 0..want.ids.len() {
        if let Some(pos) = (0..want.ids.len()).find(|&s| want.ids[s] == got.ids[slot] && got.ids[slot].is_some()) {
            let (kd, vd) = (want.key_dim, want.value_dim);
            assert_eq!(
                got.keys[slot * kd..(slot + 1) * kd],
                want.keys[pos * kd..(pos + 1) * kd],
                "{what}: key"
            );
            assert_eq!(
                got.values[slot * vd..(slot + 1) * vd],
                want.values[pos * vd..(pos + 1) * vd],
                "{what}: value"
            );
        }
    }
}

/// Inserts `n` random rows of `kd`-d keys into `store`, one in three tagged
/// `a`, one in five tagged `b`, in batches of 500.
async fn fill(store: &PostgresStore, n: usize, kd: usize, seed: u64) -> Vec<f32> {
    let mut rng = memstore_api::testkit::util::Rng::new(seed);
    let keys = rng.vecs(n, kd);
    let values = rng.vecs(n, 2);
    let tags: Vec<Vec<String>> = (0..n)
        .map(|i| {
            let mut t = Vec::new();
            if i % 3 == 0 {
                t.push("a".to_string());
            }
            if i % 5 == 0 {
                t.push("b".to_string());
            }
            t
        })
        .collect();
    for start in (0..n).step_by(500) {
        let end = (start + 500).min(n);
        let b = batch(&keys[start * kd..end * kd], &values[start * 2..end * 2], kd)
            .with_tags(memstore_api::Tags::PerRow(&tags[start..end]));
        store.insert(b, 1).await.unwrap();
    }
    keys
}

#[tokio::test]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
async fn server_side_exact_search_is_the_stores_own_answer_for_every_metric() {
    use memstore_api::TagFilter;
    use memstore_postgres::{ServerSearch, ServerSearchOptions};
    let kd = 16;
    for metric in [Metric::L2, Metric::Cosine, Metric::InnerProduct] {
        let at = fresh("server_exact");
        let config = MemoryConfig::new(kd, 2).with_metric(metric);
        let store = PostgresStore::open(at.clone(), config).await.unwrap();
        fill(&store, 1500, kd, 7).await;
        if metric == Metric::Cosine {
            // A zero key: the store's cosine distance to it is 1, pgvector's NaN.
            store.insert(batch(&vec![0.0; kd], &[9.0, 9.0], kd), 2).await.unwrap();
        }
        let server = ServerSearch::open(at.clone(), ServerSearchOptions::default())
            .await
            .unwrap();
        assert_eq!(server.config(), store.config());
        assert_eq!(server.len().await.unwrap(), store.len().await.unwrap());
        let queries = memstore_api::testkit::util::Rng::new(99).vecs(40, kd);
        let q = Vectors::new(&queries, kd).unwrap();
        let filters = [
            None,
            Some(TagFilter::Any(vec!["a".into(), "b".into()])),
            Some(TagFilter::All(vec!["a".into(), "b".into()])),
            Some(TagFilter::Any(vec!["nobody".into()])),
        ];
        for filter in &filters {
            for k in [1, 8] {
                let want = store.search(q, k, filter.as_ref()).await.unwrap();
                let got = server.search(q, k, filter.as_ref()).await.unwrap();
                assert_same_answer(&got, &want, &format!("{metric:?} k={k} {filter:?}"));
            }
        }
        if metric == Metric::Cosine {
            // The zero key is at distance 1 from every query, as in the store.
            let zero = vec![0.0; kd];
            let want = store.search(Vectors::new(&zero, kd).unwrap(), 3, None).await.unwrap();
            let got = server.search(Vectors::new(&zero, kd).unwrap(), 3, None).await.unwrap();
            assert!(
                got.distances.iter().all(|d| (d - 1.0).abs() < 1e-6),
                "{:?}",
                got.distances
            );
            assert_eq!(got.distances, want.distances);
        }
        // More slots than rows: the rest are empty, as in the store.
        let small = fresh("server_small");
        let s2 = PostgresStore::open(small.clone(), MemoryConfig::new(kd, 2).with_metric(metric))
            .await
            .unwrap();
        fill(&s2, 3, kd, 8).await;
        let server2 = ServerSearch::open(small, ServerSearchOptions::default()).await.unwrap();
        let want = s2.search(q, 5, None).await.unwrap();
        let got = server2.search(q, 5, None).await.unwrap();
        assert_same_answer(&got, &want, "k past the rows");
        assert_eq!(got.ids.iter().filter(|i| i.is_none()).count(), 40 * 2);
        // Bad input is refused as the store refuses it.
        assert!(matches!(
            server.search(q, 0, None).await,
            Err(memstore_api::Error::ZeroK)
        ));
        let short = vec![0.0; kd - 1];
        assert!(matches!(
            server.search(Vectors::new(&short, kd - 1).unwrap(), 1, None).await,
            Err(memstore_api::Error::DimensionMismatch { .. })
        ));
        server.close().await;
        server2.close().await;
    }
}

#[tokio::test]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
async fn server_side_hnsw_search_recalls_the_exact_neighbours() {
    use memstore_api::TagFilter;
    use memstore_postgres::server_search::{create_hnsw_index, drop_hnsw_index};
    use memstore_postgres::{ServerKnn, ServerSearch, ServerSearchOptions};
    let kd = 16;
    let at = fresh("server_hnsw");
    let store = PostgresStore::open(at.clone(), MemoryConfig::new(kd, 2)).await.unwrap();
    fill(&store, 3000, kd, 11).await;
    let hnsw = ServerSearchOptions::default().with_knn(ServerKnn::Hnsw { ef_search: 64 });
    // No index, no HNSW search (never a silent scan).
    let e = ServerSearch::open(at.clone(), hnsw.clone())
        .await
        .err()
        .expect("refused");
    assert!(matches!(driver_error(&e), PostgresError::NoHnswIndex(_)), "{e}");
    create_hnsw_index(&at, 16, 64).await.unwrap();
    create_hnsw_index(&at, 16, 64).await.unwrap(); // idempotent
    let server = ServerSearch::open(at.clone(), hnsw).await.unwrap();
    let queries = memstore_api::testkit::util::Rng::new(5).vecs(100, kd);
    let q = Vectors::new(&queries, kd).unwrap();
    let k = 8;
    let want = store.search(q, k, None).await.unwrap();
    let got = server.search(q, k, None).await.unwrap();
    let mut hits = 0;
    for i in 0..100 {
        let exact: Vec<_> = want.row_ids(i).to_vec();
        hits += got
            .row_ids(i)
            .iter()
            .filter(|id| id.is_some() && exact.contains(id))
            .count();
    }
    let recall = hits as f64 / (100 * k) as f64;
    assert!(recall >= 0.9, "HNSW recall@8 {recall}");
    // The store's own writes keep the index current.
    let far = vec![50.0; kd];
    let id = store.insert(batch(&far, &[1.0, 1.0], kd), 3).await.unwrap()[0];
    let hit = server.search(Vectors::new(&far, kd).unwrap(), 1, None).await.unwrap();
    assert_eq!(hit.row_ids(0)[0], Some(id));
    // k above ef_search still fills k slots.
    let wide = server.search(q, 100, None).await.unwrap();
    assert!(wide.ids.iter().filter(|i| i.is_some()).count() >= 100 * 95);
    // A filter keeps only matching rows, and (pgvector ≥ 0.8) k of them.
    let only_b = TagFilter::All(vec!["b".into()]);
    let got = server.search(q, k, Some(&only_b)).await.unwrap();
    let ids: Vec<_> = got.ids.iter().flatten().copied().collect();
    for m in store.get(&ids).await.unwrap() {
        assert!(m.tags.contains_key("b"), "memory {} has no tag b", m.id);
    }
    if server.iterative_scan() {
        assert_eq!(ids.len(), 100 * k);
    }
    server.close().await;
    drop_hnsw_index(&at).await.unwrap();
    let e = ServerSearch::open(
        at.clone(),
        ServerSearchOptions::default().with_knn(ServerKnn::Hnsw { ef_search: 40 }),
    )
    .await
    .err()
    .expect("refused after the drop");
    assert!(matches!(driver_error(&e), PostgresError::NoHnswIndex(_)), "{e}");
}

/// `url` with its user and password replaced.
fn as_user(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let rest = rest.split_once('@').map_or(rest, |(_, r)| r);
    format!("{scheme}://{user}:{password}@{rest}")
}

#[tokio::test]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
async fn server_side_search_only_reads_and_sees_every_commit() {
    use memstore_postgres::{ServerSearch, ServerSearchOptions};
    let at = fresh("server_reader");
    let missing = ServerSearch::open(fresh("server_missing"), ServerSearchOptions::default())
        .await
        .err()
        .expect("no store");
    assert!(matches!(driver_error(&missing), PostgresError::NoStore(_)), "{missing}");
    let store = PostgresStore::open(at.clone(), MemoryConfig::new(2, 1)).await.unwrap();
    store.insert(batch(&[0.0, 0.0], &[1.0], 2), 1).await.unwrap();
    // A role that may only read the store's tables, as on a hot standby.
    let role = format!("reader_{}", at.store);
    sqlx::Executor::execute(
        store.driver().pool(),
        sqlx::AssertSqlSafe(format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'readonly'; GRANT USAGE ON SCHEMA \"{0}\" TO {role}; \
             GRANT SELECT ON ALL TABLES IN SCHEMA \"{0}\" TO {role}",
            at.store
        )),
    )
    .await
    .unwrap();
    let reader_at = PostgresLocation::new(as_user(&at.url, &role, "readonly"), at.store.clone());
    let server = ServerSearch::open(reader_at, ServerSearchOptions::default())
        .await
        .unwrap();
    let q = [10.0, 0.0];
    let before = server.search(Vectors::new(&q, 2).unwrap(), 2, None).await.unwrap();
    assert_eq!(before.ids.iter().flatten().count(), 1);
    // A commit is seen by the next search, with nothing to catch up.
    let id = store.insert(batch(&[10.0, 0.0], &[2.0], 2), 2).await.unwrap()[0];
    let untouched = store.get(&[id]).await.unwrap();
    let after = server.search(Vectors::new(&q, 2).unwrap(), 2, None).await.unwrap();
    assert_eq!(after.row_ids(0)[0], Some(id));
    assert_eq!(after.distances[0], 0.0);
    assert_eq!(after.value(0, 0), &[2.0]);
    // Searching wrote nothing: the access bookkeeping is the store's own.
    let m = store.get(&[id]).await.unwrap();
    assert_eq!(
        (m[0].access_count, m[0].last_access),
        (untouched[0].access_count, untouched[0].last_access)
    );
    server.close().await;
}

/// Polls `f` every 50 ms until it returns `Some`, for at most 20 s.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(start.elapsed().as_secs() < 20, "{what}: not within 20 s");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
#[ignore = "needs a hot standby of MEMSTORE_POSTGRES_URL's server: MEMSTORE_POSTGRES_STANDBY_URL (scripts/postgres.sh standby)"]
async fn server_side_search_answers_on_a_hot_standby() {
    use memstore_postgres::{ServerSearch, ServerSearchOptions};
    let standby_url = std::env::var("MEMSTORE_POSTGRES_STANDBY_URL")
        .expect("MEMSTORE_POSTGRES_STANDBY_URL names a standby (scripts/postgres.sh standby prints it)");
    let at = fresh("standby");
    let kd = 8;
    let store = PostgresStore::open(at.clone(), MemoryConfig::new(kd, 2)).await.unwrap();
    fill(&store, 600, kd, 3).await;
    let replica = PostgresLocation::new(standby_url, at.store.clone());
    // The store's own open writes (migrations, the open lock): a standby
    // refuses it with a typed error, and nothing changes.
    let e = eventually("the store's schema on the standby", || async {
        match PostgresStore::open_existing(replica.clone()).await {
            Err(e) if matches!(driver_error(&e), PostgresError::NoStore(_)) => None,
            other => Some(other),
        }
    })
    .await
    .err()
    .expect("a standby cannot take the store's open");
    assert!(
        matches!(driver_error(&e), PostgresError::Sql(_) | PostgresError::Migrate(_)),
        "{e}"
    );
    // Server-side search opens there and answers as the primary's store.
    let server = eventually("the replicated rows", || async {
        let s = ServerSearch::open(replica.clone(), ServerSearchOptions::default())
            .await
            .ok()?;
        (s.len().await.ok()? == 600).then_some(s)
    })
    .await;
    let queries = memstore_api::testkit::util::Rng::new(4).vecs(20, kd);
    let q = Vectors::new(&queries, kd).unwrap();
    let want = store.search(q, 5, None).await.unwrap();
    assert_same_answer(&server.search(q, 5, None).await.unwrap(), &want, "on the standby");
    // A later commit on the primary reaches the standby's searches.
    let far = vec![40.0; kd];
    let id = store.insert(batch(&far, &[1.0, 1.0], kd), 2).await.unwrap()[0];
    eventually("the new row on the standby", || async {
        let hit = server.search(Vectors::new(&far, kd).unwrap(), 1, None).await.ok()?;
        (hit.row_ids(0)[0] == Some(id)).then_some(())
    })
    .await;
    server.close().await;
}
