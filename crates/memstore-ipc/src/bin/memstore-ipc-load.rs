//! A write-load client for `memstored`: connects, commits batches tagged
//! `<tag>-<i>` (alternating `insert` and `learn`, or `learn` only), and
//! prints `ack <i>` after each reply arrives. The many-process and crash
//! tests run several of these against one daemon; it is also a quick way to
//! load a daemon by hand.
//!
//! Usage: `memstore-ipc-load ENDPOINT TAG BATCHES ROWS [mixed|learn]`

use std::hash::{Hash, Hasher};

use rand_core::{RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;
use std::io::Write;

use memstore_api::{Batch, MemoryStore, Tags, Vectors};
use memstore_ipc::{Endpoint, IpcStore};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 && args.len() != 6 {
        return Err("usage: memstore-ipc-load ENDPOINT TAG BATCHES ROWS [mixed|learn]".into());
    }
    let endpoint = Endpoint::parse(&args[1])?;
    let tag = &args[2];
    let (batches, rows): (u64, usize) = (args[3].parse()?, args[4].parse()?);
    let learn_only = match args.get(5).map(String::as_str) {
        None | Some("mixed") => false,
        Some("learn") => true,
        Some(other) => return Err(format!("unknown mode {other:?}").into()),
    };
    let store = IpcStore::connect(&endpoint, None).await?;
    let (dk, dv) = (store.config().key_dim, store.config().value_dim);
    // Each tag draws its own data.
    let mut hasher = std::hash::DefaultHasher::new();
    tag.hash(&mut hasher);
    let mut rng = SplitMix64::seed_from_u64(hasher.finish());
    let mut next = move || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
    let mut out = std::io::stdout().lock();
    for i in 0..batches {
        let keys: Vec<f32> = (0..rows * dk).map(|_| next() * 1000.0).collect();
        let values: Vec<f32> = (0..rows * dv).map(|_| next()).collect();
        let t = vec![format!("{tag}-{i}"), tag.clone()];
        let b = Batch::new(Vectors::new(&keys, dk)?, Vectors::new(&values, dv)?).with_tags(Tags::Same(&t));
        if learn_only || i % 2 == 1 {
            store.learn(b, i + 1, 4).await?;
        } else {
            store.insert(b, i + 1).await?;
        }
        writeln!(out, "ack {i}")?;
        out.flush()?;
    }
    store.close().await?;
    Ok(())
}
