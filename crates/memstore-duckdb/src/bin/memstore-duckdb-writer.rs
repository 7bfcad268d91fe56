//! The write load of the crash-consistency tests on a DuckdbStore
//! (`memstore_engine::crash`): commits batches tagged `b<i>`, alternating
//! `insert` and `learn`, printing `committed <i>` after each one returns.
//! The tests kill it with SIGKILL at random moments and check the file.
//!
//! Usage: `memstore-duckdb-writer PATH FIRST_BATCH BATCHES ROWS`

use memstore_duckdb::DuckdbStore;
use memstore_engine::crash;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (path, first, batches, rows) = crash::args("memstore-duckdb-writer")?;
    let store = DuckdbStore::open(&path, crash::config()).await?;
    crash::write_batches(&store, first, batches, rows, &mut std::io::stdout().lock()).await?;
    store.close().await?;
    Ok(())
}
