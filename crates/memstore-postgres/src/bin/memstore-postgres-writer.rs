//! The write load of the crash-consistency tests on a PostgresStore
//! (`memstore_engine::crash`): commits batches tagged `b<i>`, alternating
//! `insert` and `learn`, printing `committed <i>` after each one returns.
//! The tests kill it with SIGKILL at random moments and check the store.
//!
//! Usage: `memstore-postgres-writer URL#STORE FIRST_BATCH BATCHES ROWS`

use memstore_engine::crash;
use memstore_postgres::{PostgresLocation, PostgresStore};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (at, first, batches, rows) = crash::args("memstore-postgres-writer")?;
    let store = PostgresStore::open(PostgresLocation::parse(&at), crash::config()).await?;
    crash::write_batches(&store, first, batches, rows, &mut std::io::stdout().lock()).await?;
    store.close().await?;
    Ok(())
}
