//! Crash-consistency rounds shared by the durable backends' tests, in the
//! manner of redb's crash tests: a writer process (the backend's
//! `memstore-<backend>-writer`, which commits batches tagged `b<i>` and
//! prints `committed <i>` after each returns) is killed with SIGKILL at
//! random moments, and the store is reopened after every kill.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::util::Rng;
use crate::{DurableStore, MemoryStore, Result};

/// Runs `rounds` rounds of: start `exe` with `args` followed by
/// `FIRST_BATCH 100000 ROWS`, wait for 1 to 6 acknowledged batches, kill it
/// with SIGKILL a random few milliseconds later, and reopen the store with
/// `reopen`. Panics unless, after every round, the store opens, every
/// acknowledged batch is there with all `rows` rows, no batch is there in
/// part, and at most one unacknowledged batch (the one in flight) appeared.
pub async fn kill_rounds<S, F, Fut>(exe: &str, args: &[&str], rounds: usize, rows: usize, reopen: F)
where
    S: MemoryStore + DurableStore,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<S>>,
{
    let mut rng = Rng::new(2026);
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    let mut next_batch = 0u64;
    let mut before: BTreeSet<u64> = BTreeSet::new();
    for round in 0..rounds {
        let mut child = Command::new(exe)
            .args(args)
            .args([next_batch.to_string(), "100000".to_string(), rows.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the writer");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let wait_for = 1 + rng.below(6);
        for _ in 0..wait_for {
            let line = lines.next().expect("the writer ended early").expect("a line");
            let i: u64 = line
                .strip_prefix("committed ")
                .and_then(|i| i.parse().ok())
                .unwrap_or_else(|| panic!("unexpected writer output {line:?}"));
            acked.insert(i);
        }
        std::thread::sleep(Duration::from_micros(rng.below(4000)));
        child.kill().expect("kill the writer");
        child.wait().expect("reap the writer");
        for line in lines.map_while(|l| l.ok()) {
            if let Some(i) = line.strip_prefix("committed ").and_then(|i| i.parse().ok()) {
                acked.insert(i);
            }
        }
        let s = reopen()
            .await
            .unwrap_or_else(|e| panic!("round {round}: the store does not open after SIGKILL: {e}"));
        let st = s.stats().await.expect("stats");
        let mut present = BTreeSet::new();
        for (tag, count) in &st.tag_counts {
            let i: u64 = tag[1..].parse().expect("a batch tag");
            assert_eq!(*count as usize, rows, "round {round}: batch {i} is there in part");
            present.insert(i);
        }
        assert!(
            acked.is_subset(&present),
            "round {round}: acknowledged {acked:?}, present {present:?}"
        );
        let unacked_new = present.difference(&before).filter(|i| !acked.contains(i)).count();
        assert!(
            unacked_new <= 1,
            "round {round}: {unacked_new} unacknowledged batches appeared"
        );
        assert_eq!(st.len as usize, present.len() * rows);
        next_batch = present.iter().max().map_or(0, |m| m + 1);
        before = present;
        s.close().await.expect("close");
    }
    assert!(acked.len() >= rounds);
}
