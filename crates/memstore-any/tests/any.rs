//! Every URL scheme opens, backs up, restores and reopens a store the same way.

use std::path::Path;

use memstore_any::{AnyStore, StoreUrl};
use memstore_api::{Batch, DurableStore, Error, MemoryConfig, MemoryStore, Vectors};
use memstore_ipc::{Server, ServerOptions, SqliteOpener, server};

fn cfg() -> MemoryConfig {
    MemoryConfig::new(4, 2)
}

async fn add(s: &AnyStore, n: usize, tick: u64) {
    let keys: Vec<f32> = (0..n * 4).map(|i| (i as f32 * 0.37 + tick as f32).sin()).collect();
    let values = vec![0.5f32; n * 2];
    let b = Batch::new(Vectors::new(&keys, 4).unwrap(), Vectors::new(&values, 2).unwrap());
    s.insert(b, tick).await.unwrap();
}

/// Opens `url` new, keeps 5 memories, backs up, adds 3 and closes; restores
/// the backup and reopens: the 5 are back, with the configuration stored.
async fn round_trip(url: &StoreUrl, backup: &Path) {
    let s = url.open(Some(cfg())).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    add(&s, 5, 1).await;
    s.backup_to(backup).await.unwrap();
    add(&s, 3, 2).await;
    assert_eq!(s.len().await.unwrap(), 8);
    s.close().await.unwrap();
    url.restore(backup)
        .await
        .unwrap_or_else(|e| panic!("{url}: restore: {e}"));
    let s = url.open(None).await.unwrap();
    assert_eq!(s.len().await.unwrap(), 5, "{url}");
    assert_eq!(s.config(), &cfg(), "{url}");
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scheme_opens_backs_up_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite: StoreUrl = format!("sqlite:{}", dir.path().join("a.db").display()).parse().unwrap();
    round_trip(&sqlite, &dir.path().join("a-backup.db")).await;
    let s = memstore_any::open(&sqlite.to_string(), None).await.unwrap();
    assert_eq!(s.kind(), "sqlite");
    s.close().await.unwrap();

    #[cfg(feature = "duckdb")]
    {
        let duck: StoreUrl = format!("duckdb:{}", dir.path().join("a.duckdb").display())
            .parse()
            .unwrap();
        round_trip(&duck, &dir.path().join("a-backup.duckdb")).await;
    }

    // A daemon serving named stores, in this process.
    let stores = dir.path().join("stores");
    std::fs::create_dir_all(&stores).unwrap();
    let template = SqliteOpener {
        path: Default::default(),
        options: Default::default(),
    };
    let options = {
        let mut o = ServerOptions::default();
        o.stores_dir = Some(stores.clone());
        o.backup_dir = Some(dir.path().to_path_buf());
        o
    };
    let daemon = Server::named_only(template, options).unwrap();
    let socket = stores.join("d.sock");
    let listener = server::bind_unix(&socket, 0o600).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        daemon
            .serve(vec![listener], async move {
                let _ = stopped.await;
            })
            .await
    });
    let ipc: StoreUrl = format!("ipc:{}#layer0", socket.display()).parse().unwrap();
    round_trip(&ipc, &dir.path().join("ipc-backup.db")).await;
    assert!(
        stores.join("layer0.db").exists(),
        "the named store is the daemon's file"
    );
    let _ = stop.send(());
    serving.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_missing_stores_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("sqlite:{}", dir.path().join("none.db").display());
    assert!(memstore_any::open(&missing, None).await.is_err());
    assert!(
        !dir.path().join("none.db").exists(),
        "opening an existing store creates none"
    );
    for bad in ["none", "mysql:/x", "ipc:", "postgres://h/db#"] {
        assert!(
            matches!(memstore_any::open(bad, Some(cfg())).await, Err(Error::InvalidConfig(_))),
            "{bad}"
        );
    }
    let url: StoreUrl = missing.parse().unwrap();
    assert!(matches!(
        url.restore(&dir.path().join("no-backup.db")).await,
        Err(Error::Shape(_))
    ));
    assert!(!dir.path().join("none.db").exists(), "a failed restore writes nothing");
    // A daemon that is not there.
    let gone: StoreUrl = format!("ipc:{}", dir.path().join("no.sock").display()).parse().unwrap();
    assert!(gone.open(Some(cfg())).await.is_err());
}

/// A `postgres://…#NAME` URL opens a store in that schema, which reopens
/// with its memories and configuration; a backup file restores through the
/// URL; `holds_memories` tells a schema with rows from one without.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
async fn postgres_urls_open_stores_in_their_schema() {
    let base = std::env::var("MEMSTORE_POSTGRES_URL").expect("MEMSTORE_POSTGRES_URL names the server");
    let name = format!("any_{}", std::process::id());
    let url: StoreUrl = format!("{base}#{name}").parse().unwrap();
    assert_eq!(url.to_string(), format!("{base}#{name}"));
    assert!(!url.holds_memories().await.unwrap(), "no schema yet");
    let s = url.open(Some(cfg())).await.unwrap();
    assert_eq!(s.kind(), "postgres");
    assert!(!url.holds_memories().await.unwrap(), "a schema without rows");
    s.close().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    round_trip(&url, &dir.path().join("b")).await;
    assert!(url.holds_memories().await.unwrap());
    assert!(url.restore(&dir.path().join("no-backup")).await.is_err());
}
