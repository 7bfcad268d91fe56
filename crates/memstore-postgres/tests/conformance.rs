//! The PostgreSQL backend runs the whole conformance suite against a real
//! server: `MEMSTORE_POSTGRES_URL` (`scripts/postgres.sh start` prints one).
//! Each case gets a store of its own (a fresh schema); "reopen" closes the
//! store and opens the schema again. Ignored in a plain `cargo test`, which
//! has no server; `.ci/run` starts one and runs them with `--ignored`.

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use memstore_api::testkit::Harness;
use memstore_api::{MemoryConfig, Result};
use memstore_postgres::{IndexOptions, PostgresLocation, PostgresOptions, PostgresStore};

/// The server's URL; the suite needs one.
fn url() -> String {
    std::env::var("MEMSTORE_POSTGRES_URL")
        .expect("MEMSTORE_POSTGRES_URL names the server (scripts/postgres.sh start prints it)")
}

/// A schema name no other case (of this or another test process) uses.
fn fresh_store() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "t{}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

struct PostgresHarness {
    location: PostgresLocation,
    options: PostgresOptions,
}

impl PostgresHarness {
    fn new(options: PostgresOptions) -> Self {
        PostgresHarness {
            location: PostgresLocation::new(url(), fresh_store()),
            options,
        }
    }
}

#[async_trait]
impl Harness for PostgresHarness {
    type Store = PostgresStore;

    async fn open(&self, config: MemoryConfig) -> Result<PostgresStore> {
        PostgresStore::open_with(self.location.clone(), config, self.options.clone()).await
    }

    async fn close(&self, store: PostgresStore) -> Result<()> {
        store.close().await
    }
}

memstore_api::conformance_suite!(
    ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)",
    PostgresHarness::new(PostgresOptions::default())
);

/// The suite again with values read from the database instead of kept in
/// the index (`resident_values` off): the store's other read path.
mod values_from_the_database {
    use super::*;

    memstore_api::conformance_suite!(
        ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)",
        PostgresHarness::new(
            PostgresOptions::default().with_index(IndexOptions::default().with_resident_values(false))
        )
    );
}

/// The suite again on two clients of one store, each with its own index:
/// writes alternate between them and every read goes to the client that did
/// not write last, so each case checks that a client's reads see the other
/// client's commits and that its writes are planned on them.
mod two_clients {
    use std::sync::atomic::AtomicBool;

    use memstore_api::{Batch, ChangeBatch, Memory, MemoryId, MemoryStore, Neighbors, Stats, TagFilter, Tick, Vectors};

    use super::*;

    /// Two clients of one store behind one store's interface.
    struct TwoClients {
        clients: [PostgresStore; 2],
        /// Which client wrote last (`true`: the second).
        last: AtomicBool,
    }

    impl TwoClients {
        /// The client for the next write (the other one than last time).
        fn writer(&self) -> &PostgresStore {
            let second = !self.last.fetch_xor(true, Ordering::AcqRel);
            &self.clients[usize::from(second)]
        }

        /// The client for a read: the one that did not write last.
        fn reader(&self) -> &PostgresStore {
            &self.clients[usize::from(!self.last.load(Ordering::Acquire))]
        }
    }

    #[async_trait]
    impl MemoryStore for TwoClients {
        fn config(&self) -> &MemoryConfig {
            self.clients[0].config()
        }
        async fn search(&self, queries: Vectors<'_>, k: usize, filter: Option<&TagFilter>) -> Result<Neighbors> {
            self.reader().search(queries, k, filter).await
        }
        async fn insert(&self, batch: Batch<'_>, tick: Tick) -> Result<Vec<MemoryId>> {
            self.writer().insert(batch, tick).await
        }
        async fn get(&self, ids: &[MemoryId]) -> Result<Vec<Memory>> {
            self.reader().get(ids).await
        }
        async fn delete(&self, ids: &[MemoryId]) -> Result<usize> {
            self.writer().delete(ids).await
        }
        async fn update_values(&self, ids: &[MemoryId], deltas: Vectors<'_>) -> Result<()> {
            self.writer().update_values(ids, deltas).await
        }
        async fn touch(&self, ids: &[MemoryId], tick: Tick) -> Result<()> {
            self.writer().touch(ids, tick).await
        }
        async fn learn(&self, batch: Batch<'_>, tick: Tick, k: usize) -> Result<Neighbors> {
            self.writer().learn(batch, tick, k).await
        }
        async fn evict(&self, target_len: usize) -> Result<usize> {
            self.writer().evict(target_len).await
        }
        async fn ids(&self) -> Result<Vec<MemoryId>> {
            self.reader().ids().await
        }
        async fn len(&self) -> Result<usize> {
            self.reader().len().await
        }
        async fn apply(&self, batch: &ChangeBatch) -> Result<()> {
            self.writer().apply(batch).await
        }
        async fn stats(&self) -> Result<Stats> {
            self.reader().stats().await
        }
        async fn flush(&self) -> Result<()> {
            self.writer().flush().await
        }
    }

    struct TwoClientsHarness(PostgresHarness);

    #[async_trait]
    impl Harness for TwoClientsHarness {
        type Store = TwoClients;

        async fn open(&self, config: MemoryConfig) -> Result<TwoClients> {
            let first = self.0.open(config.clone()).await?;
            let second = match self.0.open(config).await {
                Ok(s) => s,
                Err(e) => {
                    first.close().await?;
                    return Err(e);
                }
            };
            Ok(TwoClients {
                clients: [first, second],
                last: AtomicBool::new(false),
            })
        }

        async fn close(&self, store: TwoClients) -> Result<()> {
            let [a, b] = store.clients;
            a.close().await?;
            b.close().await
        }
    }

    memstore_api::conformance_suite!(
        ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)",
        TwoClientsHarness(PostgresHarness::new(PostgresOptions::default()))
    );
}
