//! One client of the shared-store test (`memstore_engine::crash::shared`):
//! opens an existing PostgresStore, learns for a while beside other
//! clients, and prints what it sent.
//!
//! Usage: `memstore-postgres-learner URL#STORE CLIENT SECONDS`

use memstore_engine::crash::shared;
use memstore_postgres::{PostgresLocation, PostgresStore};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [at, client, seconds] = args.as_slice() else {
        return Err("usage: memstore-postgres-learner URL#STORE CLIENT SECONDS".into());
    };
    let store = PostgresStore::open_existing(PostgresLocation::parse(at)).await?;
    shared::learn_for(&store, client.parse()?, seconds.parse()?, &mut std::io::stdout().lock()).await?;
    store.close().await?;
    Ok(())
}
