//! The write load of the crash-consistency tests on a SqliteStore
//! (`memstore_engine::crash`): commits batches tagged `b<i>`, alternating
//! `insert` and `learn`, printing `committed <i>` after each one returns.
//! The tests kill it with SIGKILL at random moments and check the file.
//!
//! Usage: `memstore-sqlite-writer PATH FIRST_BATCH BATCHES ROWS`

use memstore_engine::crash;
use memstore_sqlite::SqliteStore;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (path, first, batches, rows) = crash::args("memstore-sqlite-writer")?;
    let store = SqliteStore::open(&path, crash::config()).await?;
    crash::write_batches(&store, first, batches, rows, &mut std::io::stdout().lock()).await?;
    store.close().await?;
    Ok(())
}
