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
