//! The device tier writes behind to the store: its change batches leave the
//! store holding exactly the tier's memory (bit for bit, LRFU included), the
//! tier never grows past its capacity, and the journal replays to the
//! identical store state after the writer crashes at any point.

use std::io::Write;
use std::sync::Arc;

use burn_dmt::burn::tensor::{Device, Int, Tensor, TensorData};
use burn_dmt::memory::journal::{Group, Journal, WriteBehind, crc32, decode, encode, replay};
use burn_dmt::memory::tier::DeviceMemory;
use memstore_api::testkit::util::{Rng, dump};
use memstore_api::{
    ChangeBatch, DurableStore, EvictionPolicy, InMemoryStore, Memory, MemoryConfig, MemoryId, MemoryStore, Metric,
    Stats,
};
use std::collections::BTreeMap;

/// A SQLite store at `path`, opened by URL as the model opens its stores.
async fn sqlite_store(path: std::path::PathBuf, config: MemoryConfig) -> memstore_api::Result<memstore_any::AnyStore> {
    memstore_any::StoreUrl::Sqlite(path).open(Some(config)).await
}

const DK: usize = 4;
const DV: usize = 3;
const CAP: usize = 24;

fn config() -> MemoryConfig {
    MemoryConfig::new(DK, DV)
        .with_metric(Metric::L2)
        .with_eviction(EvictionPolicy::Lrfu { lambda: 0.3 })
}

fn floats(t: Tensor<2>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// A search's slots, row-major.
fn slots_of(t: Tensor<2, Int>) -> Vec<usize> {
    t.into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap()
        .into_iter()
        .map(|s| s as usize)
        .collect()
}

/// Drives a tier the way a training loop does — search, touch what was
/// found, sparse value updates, novelty inserts that overflow the capacity —
/// and returns the batches it produced, checking the capacity all along.
fn run_tier(tier: &mut DeviceMemory, steps: u64, seed: u64) -> Vec<ChangeBatch> {
    let device = tier.device().clone();
    let mut rng = Rng::new(seed);
    let mut batches = Vec::new();
    let keys = rng.vecs(16, DK);
    let values = rng.vecs(16, DV);
    tier.fill(&keys, &values, 1).unwrap();
    batches.extend(tier.take_changes());
    for tick in 2..2 + steps {
        let q = rng.vecs(5, DK);
        let found = tier
            .search(Tensor::from_data(TensorData::new(q, [5, DK]), &device), 3)
            .unwrap();
        let slots = slots_of(found.slots);
        tier.touch(&slots, tick).unwrap();
        let grad = Tensor::<2>::from_data(TensorData::new(rng.vecs(CAP, DV), [CAP, DV]), &device);
        tier.apply_value_grad(grad, 0.1, &slots[..6]).unwrap();
        let n_new = 1 + (tick % 4) as usize;
        let got = tier.insert(&rng.vecs(n_new, DK), &rng.vecs(n_new, DV), tick).unwrap();
        assert_eq!(got.len(), n_new, "room is made by eviction");
        // A memory inserted this step is updated and touched in the same batch.
        let grad = Tensor::<2>::from_data(TensorData::new(rng.vecs(CAP, DV), [CAP, DV]), &device);
        tier.apply_value_grad(grad, 0.05, &got[..1]).unwrap();
        tier.touch(&got[..1], tick).unwrap();
        assert!(tier.len() <= CAP, "the tier grew past its capacity");
        batches.extend(tier.take_changes());
    }
    batches
}

/// Every memory of the tier, by id: key, value, and nothing else.
fn tier_rows(tier: &DeviceMemory) -> Vec<(u64, Vec<f32>, Vec<f32>)> {
    let (k, v) = tier.tensors();
    let (k, v) = (floats(k), floats(v));
    let mut rows: Vec<_> = (0..tier.capacity())
        .filter_map(|s| {
            tier.id(s)
                .map(|id| (id, k[s * DK..(s + 1) * DK].to_vec(), v[s * DV..(s + 1) * DV].to_vec()))
        })
        .collect();
    rows.sort_by_key(|r| r.0);
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_batches_leave_the_store_holding_the_tiers_memory() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path().join("m.db"), config()).await.unwrap();
    let reference = InMemoryStore::new(config()).unwrap();
    let mut tier = DeviceMemory::load(&store, CAP, &device).await.unwrap();
    let batches = run_tier(&mut tier, 12, 7);
    assert!(batches.iter().any(|b| !b.delete.is_empty()), "the run evicted");
    for b in &batches {
        store.apply(b).await.unwrap();
        reference.apply(b).await.unwrap();
    }
    let (mems, stats) = dump(&store).await;
    assert_eq!((mems.clone(), stats.clone()), dump(&reference).await);
    assert_eq!(stats.counters.last_batch, batches.len() as u64);
    let stored: Vec<_> = mems.values().map(|m| (m.id, m.key.clone(), m.value.clone())).collect();
    assert_eq!(stored, tier_rows(&tier), "store and tier differ");
    assert_eq!(mems.len(), CAP);

    // The store's LRFU bookkeeping is the tier's: a tier reloaded from it
    // evicts the same memories as the tier that kept running.
    let mut reloaded = DeviceMemory::load(&store, CAP, &device).await.unwrap();
    let mut a = tier.clone();
    let mut rng = Rng::new(99);
    let (k, v) = (rng.vecs(5, DK), rng.vecs(5, DV));
    a.insert(&k, &v, 40).unwrap();
    reloaded.insert(&k, &v, 40).unwrap();
    let (ba, bb) = (a.take_changes().unwrap(), reloaded.take_changes().unwrap());
    assert_eq!(ba, bb);
    assert_eq!(ba.delete.len(), 5);
    assert_eq!(tier_rows(&a), tier_rows(&reloaded));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_replays_to_the_same_store_after_a_writer_crash() {
    let device = Device::flex();
    let mut tier = DeviceMemory::new(config(), CAP, &device).unwrap();
    let batches = run_tier(&mut tier, 10, 3);
    let n = batches.len();
    let uninterrupted = InMemoryStore::new(config()).unwrap();
    for b in &batches {
        uninterrupted.apply(b).await.unwrap();
    }
    let want = dump(&uninterrupted).await;

    for crashed_after in [0, 1, n / 2, n - 1, n] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let store = Arc::new(sqlite_store(dir.path().join("m.db"), config()).await.unwrap());
        {
            // The writer journaled every batch, committed `crashed_after` of
            // them, and died while appending one more (a torn record).
            let (mut j, old) = Journal::open(&path).unwrap();
            assert!(old.is_empty());
            for b in &batches {
                j.append(b).unwrap();
            }
            for b in &batches[..crashed_after] {
                store.apply(b).await.unwrap();
            }
        }
        let mut torn = encode(&batches[0]);
        torn.truncate(11);
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&(64u32).to_le_bytes()).unwrap();
        f.write_all(&torn).unwrap();
        drop(f);

        let (w, recovered) = WriteBehind::start(store.clone(), &path, Group::of(1)).await.unwrap();
        assert_eq!(recovered, n - crashed_after, "crash after {crashed_after}");
        assert_eq!(w.finish().unwrap(), 0);
        assert_eq!(dump(store.as_ref()).await, want, "crash after {crashed_after}");
        // Recovery is idempotent: the journal is empty now, and replaying the
        // whole history again applies nothing.
        assert_eq!(replay(store.as_ref(), &batches).await.unwrap(), 0);
        let (_, left) = Journal::open(&path).unwrap();
        assert!(left.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_applies_batches_in_the_background() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(sqlite_store(dir.path().join("m.db"), config()).await.unwrap());
    let (mut w, recovered) = WriteBehind::start(store.clone(), dir.path().join("journal"), Group::of(1))
        .await
        .unwrap();
    assert_eq!(recovered, 0);
    let mut tier = DeviceMemory::load(store.as_ref(), CAP, &device).await.unwrap();
    let batches = run_tier(&mut tier, 8, 11);
    for b in batches.clone() {
        w.submit(b).unwrap();
    }
    assert_eq!(w.finish().unwrap(), batches.len() as u64);
    let stored: Vec<_> = dump(store.as_ref())
        .await
        .0
        .values()
        .map(|m| (m.id, m.key.clone(), m.value.clone()))
        .collect();
    assert_eq!(stored, tier_rows(&tier));

    // A batch the store refuses (out of order) stops the writer with the
    // store's error, and the batch stays journaled.
    let (mut w, _) = WriteBehind::start(store.clone(), dir.path().join("journal"), Group::of(1))
        .await
        .unwrap();
    let mut stale = batches[0].clone();
    stale.seq = 1;
    w.submit(stale).unwrap();
    let err = w.finish().unwrap_err().to_string();
    assert!(err.contains("out of order"), "{err}");
}

/// A fresh tier's batches over `steps` training steps, and the state of the
/// reference store after applying them one by one.
async fn batches_applied_one_by_one(steps: u64, seed: u64) -> (Vec<ChangeBatch>, (BTreeMap<MemoryId, Memory>, Stats)) {
    let mut tier = DeviceMemory::new(config(), CAP, &Device::flex()).unwrap();
    let batches = run_tier(&mut tier, steps, seed);
    let one_by_one = InMemoryStore::new(config()).unwrap();
    for b in &batches {
        one_by_one.apply(b).await.unwrap();
    }
    let want = dump(&one_by_one).await;
    (batches, want)
}

/// A writer that applies batches in groups (one transaction each on SQLite)
/// ends where one applying them one by one ends; a group that is not full waits for
/// `finish`, and the batches wait in the journal meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_in_groups_ends_where_batch_by_batch_ends() {
    let (batches, want) = batches_applied_one_by_one(13, 5).await;
    assert!(want.1.counters.deleted > 0, "the tier evicts (deletes in its batches)");
    for group in [4, 3] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(sqlite_store(dir.path().join("m.db"), config()).await.unwrap());
        let journal = dir.path().join("journal");
        let (mut w, _) = WriteBehind::start(store.clone(), &journal, Group::of(group))
            .await
            .unwrap();
        for b in batches[..group - 1].iter().cloned() {
            w.submit(b).unwrap();
        }
        assert_eq!(
            store.stats().await.unwrap().counters.last_batch,
            0,
            "a group that is not full was applied"
        );
        let (_, journaled) = Journal::open(&journal).unwrap();
        assert_eq!(journaled.len(), group - 1, "the waiting batches are journaled");
        for b in batches[group - 1..].iter().cloned() {
            w.submit(b).unwrap();
        }
        assert_eq!(w.finish().unwrap(), batches.len() as u64);
        assert_eq!(dump(store.as_ref()).await, want, "groups of {group}");
    }
}

/// A writer without a journal ends where one applying the batches one by
/// one ends, in groups, and writes no file besides the store's; a batch the
/// store refuses stops it with the store's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unjournaled_write_behind_ends_where_batch_by_batch_ends() {
    let (batches, want) = batches_applied_one_by_one(13, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(sqlite_store(dir.path().join("m.db"), config()).await.unwrap());
    let files = |dir: &std::path::Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = files(dir.path());
    let mut w = WriteBehind::unjournaled(store.clone(), Group::of(4), dir.path()).unwrap();
    for b in batches.iter().cloned() {
        w.submit(b).unwrap();
    }
    assert_eq!(w.finish().unwrap(), batches.len() as u64);
    assert_eq!(dump(store.as_ref()).await, want);
    assert_eq!(files(dir.path()), before, "a file besides the store's was written");

    let mut w = WriteBehind::unjournaled(store.clone(), Group::of(1), dir.path()).unwrap();
    let mut stale = batches[0].clone();
    stale.seq = 1;
    w.submit(stale).unwrap();
    let err = w.finish().unwrap_err().to_string();
    assert!(err.contains("out of order"), "{err}");
    assert_eq!(dump(store.as_ref()).await, want, "a refused batch changed the store");
}

/// A task queued after some batches ([`WriteBehind::after`]) runs on the
/// writer's thread once the store holds exactly those batches: a backup it
/// takes opens as the store after them (the group they began is closed
/// early), while the batches submitted after the task reach the store
/// afterwards. A failing task reports its error and the writer goes on; a
/// task behind a batch the store refuses reports that its writer stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_runs_a_task_after_the_batches_before_it() {
    let (batches, want) = batches_applied_one_by_one(13, 9).await;
    let at = 6;
    let reference = InMemoryStore::new(config()).unwrap();
    for b in &batches[..at] {
        reference.apply(b).await.unwrap();
    }
    let want_at = dump(&reference).await;
    assert_ne!(want_at, want, "the later batches change the store");

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(sqlite_store(dir.path().join("m.db"), config()).await.unwrap());
    let mut w = WriteBehind::unjournaled(store.clone(), Group::of(4), dir.path()).unwrap();
    for b in batches[..at].iter().cloned() {
        w.submit(b).unwrap();
    }
    let copy = dir.path().join("copy.db");
    let (st, dest) = (store.clone(), copy.clone());
    let mut done = w
        .after(Box::pin(async move { Ok(st.backup_to(&dest).await?) }))
        .unwrap();
    let failing = w
        .after(Box::pin(async {
            Err(burn_dmt::DmtError::InvalidArgument("a task that fails".into()))
        }))
        .unwrap();
    for b in batches[at..].iter().cloned() {
        w.submit(b).unwrap();
    }
    assert_eq!(w.finish().unwrap(), batches.len() as u64);
    assert!(done.is_done(), "a finished writer ran its task");
    done.wait().unwrap();
    let err = failing.wait().unwrap_err().to_string();
    assert!(err.contains("a task that fails"), "{err}");
    assert_eq!(dump(store.as_ref()).await, want);
    let copied = sqlite_store(copy, config()).await.unwrap();
    assert_eq!(
        dump(&copied).await,
        want_at,
        "the copy is not the store after the batches before it"
    );

    // A writer stopped by a refused batch does not run the task behind it.
    let mut w = WriteBehind::unjournaled(store.clone(), Group::of(1), dir.path()).unwrap();
    let mut stale = batches[0].clone();
    stale.seq = 1;
    w.submit(stale).unwrap();
    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ran.clone();
    let behind = w.after(Box::pin(async move {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }));
    match behind {
        // Queued before the writer stopped: `finish` reports the store's
        // error, the task that it was not run.
        Ok(behind) => {
            let err = w.finish().unwrap_err().to_string();
            assert!(err.contains("out of order"), "{err}");
            let stopped = behind.wait().unwrap_err().to_string();
            assert!(stopped.contains("stopped"), "{stopped}");
        }
        // The writer had stopped: queueing reports the store's error.
        Err(e) => assert!(e.to_string().contains("out of order"), "{e}"),
    }
    assert!(
        !ran.load(std::sync::atomic::Ordering::SeqCst),
        "a stopped writer ran a task"
    );
}

/// A group closes early once its batches hold the group's byte bound: with
/// a bound of one byte, every batch reaches the store before `finish`,
/// though the group could hold a hundred.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_closes_a_group_at_its_byte_bound() {
    let (batches, want) = batches_applied_one_by_one(6, 7).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(sqlite_store(dir.path().join("m.db"), config()).await.unwrap());
    let group = Group { batches: 100, bytes: 1 };
    let (mut w, _) = WriteBehind::start(store.clone(), dir.path().join("journal"), group)
        .await
        .unwrap();
    for b in batches.iter().cloned() {
        w.submit(b).unwrap();
    }
    let n = batches.len() as u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while store.stats().await.unwrap().counters.last_batch < n {
        assert!(
            std::time::Instant::now() < deadline,
            "batches over the byte bound waited for a full group"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(w.finish().unwrap(), n);
    assert_eq!(dump(store.as_ref()).await, want);
}

/// `n` SQLite stores in `dir` (`m{i}.db`), each with a writer (journal
/// `j{i}`, groups of 100, so nothing is applied before `finish`) that has
/// been given `batches`, and the first writer a stale batch after them
/// when `stale_first`.
async fn stores_with_writers(
    dir: &std::path::Path,
    n: usize,
    batches: &[ChangeBatch],
    stale_first: bool,
) -> (Vec<Arc<memstore_any::AnyStore>>, Vec<WriteBehind>) {
    let (mut stores, mut writers) = (Vec::new(), Vec::new());
    for i in 0..n {
        let store = Arc::new(sqlite_store(dir.join(format!("m{i}.db")), config()).await.unwrap());
        let (mut w, _) = WriteBehind::start(store.clone(), dir.join(format!("j{i}")), Group::of(100))
            .await
            .unwrap();
        for b in batches.iter().cloned() {
            w.submit(b).unwrap();
        }
        if stale_first && i == 0 {
            let mut stale = batches[0].clone();
            stale.seq = 1;
            w.submit(stale).unwrap();
        }
        stores.push(store);
        writers.push(w);
    }
    (stores, writers)
}

/// `finish_all` stops every writer before waiting for any: each store gets
/// the rest of its batches and its journal is emptied, and a writer that
/// fails (here a stale batch) is reported without keeping the others from
/// finishing; its batches stay in its journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finish_all_finishes_every_writer_and_reports_a_failure() {
    let (batches, want) = batches_applied_one_by_one(5, 9).await;
    let dir = tempfile::tempdir().unwrap();
    let (stores, writers) = stores_with_writers(dir.path(), 3, &batches, false).await;
    let n = batches.len() as u64;
    assert_eq!(WriteBehind::finish_all(writers).unwrap(), 3 * n);
    for (i, store) in stores.iter().enumerate() {
        assert_eq!(dump(store.as_ref()).await, want, "store {i}");
        let (_, left) = Journal::open(dir.path().join(format!("j{i}"))).unwrap();
        assert!(left.is_empty(), "journal {i} emptied");
    }

    let dir = tempfile::tempdir().unwrap();
    let (stores, writers) = stores_with_writers(dir.path(), 2, &batches, true).await;
    let err = WriteBehind::finish_all(writers).unwrap_err().to_string();
    assert!(err.contains("out of order"), "{err}");
    assert_eq!(dump(stores[1].as_ref()).await, want, "the other writer finished");
    let (_, left) = Journal::open(dir.path().join("j1")).unwrap();
    assert!(left.is_empty(), "the other writer's journal emptied");
    let (_, left) = Journal::open(dir.path().join("j0")).unwrap();
    assert_eq!(
        left.len(),
        batches.len() + 1,
        "the failed writer's batches stay journaled"
    );
}

#[test]
fn journal_records_round_trip_and_damage_is_reported() {
    // The records' checksum is zlib's CRC-32 (its standard check value).
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32(b""), 0);
    let b = ChangeBatch {
        seq: 7,
        tick: 9,
        first_id: 100,
        delete: vec![1, 2],
        update_ids: vec![3],
        deltas: vec![0.5, -0.0, f32::MIN_POSITIVE],
        touch: vec![3, 3, 100],
        insert_keys: vec![1.0; 4],
        insert_values: vec![2.0; 3],
        insert_meta: vec![memstore_api::InsertMeta {
            created: 1,
            last_access: 9,
            access_count: 3,
            crf: 1.5,
        }],
        insert_tags: vec![vec!["head:1".into(), "source é".into()]],
        assign_ids: vec![4],
        assign_values: vec![-1.0, 0.25, f32::MAX],
        tag_counts: vec![(4, "source:a.txt@00ff".into(), 1), (5, "gone".into(), 0)],
    };
    let bytes = encode(&b);
    assert_eq!(decode(&bytes), Some(b.clone()));
    assert_eq!(decode(&bytes[..bytes.len() - 1]), None);
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(decode(&long), None);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    {
        let (mut j, _) = Journal::open(&path).unwrap();
        j.append(&b).unwrap();
        j.append(&b).unwrap();
    }
    let intact = std::fs::read(&path).unwrap();
    let first_len = 12 + encode(&b).len();
    // A damaged payload, length or header checksum of the first record, with
    // a valid record after it, is corruption: reported, and the file is
    // left as it was (a durable batch is never cut off).
    for (at, what) in [(8 + 12 + 3, "payload"), (8 + 1, "length"), (8 + 9, "header checksum")] {
        let mut raw = intact.clone();
        raw[at] ^= 0xFF;
        std::fs::write(&path, &raw).unwrap();
        let err = Journal::open(&path).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("damaged record at byte 8")),
            "damaged {what}: {err:?}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            raw,
            "damaged {what}: the file is unchanged"
        );
    }
    // A torn tail is cut off: a record cut short (header or payload), a tail
    // of zero bytes (a size extended before the data reached the disk), and
    // a torn record followed by zeros.
    let torn_cases: [(&str, Vec<u8>); 4] = [
        ("cut in the header", intact[..8 + first_len + 5].to_vec()),
        ("cut in the payload", intact[..intact.len() - 3].to_vec()),
        ("zero tail", [intact.clone(), vec![0; 64]].concat()),
        (
            "torn then zeros",
            [intact[..8 + first_len + 20].to_vec(), vec![0; 4096]].concat(),
        ),
    ];
    for (what, raw) in torn_cases {
        std::fs::write(&path, &raw).unwrap();
        let whole = raw.starts_with(&intact);
        let (mut j, got) = Journal::open(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got.len(), if whole { 2 } else { 1 }, "{what}");
        let kept = if whole { intact.len() } else { 8 + first_len };
        assert_eq!(
            std::fs::read(&path).unwrap(),
            intact[..kept].to_vec(),
            "{what}: cut at the last good record"
        );
        j.append(&b).unwrap();
        drop(j);
        assert_eq!(
            Journal::open(&path).unwrap().1.len(),
            got.len() + 1,
            "{what}: appends after the cut"
        );
    }
    std::fs::write(dir.path().join("other"), b"not a journal").unwrap();
    assert!(Journal::open(dir.path().join("other")).is_err());

    // Accesses are stored as runs of one id: a GPU-sized step's (a few
    // thousand memories, each retrieved dozens of times) take 16 bytes a
    // memory; any order round-trips.
    let mut many = b.clone();
    many.touch = (1..=4096u64).flat_map(|id| std::iter::repeat_n(id, 48)).collect();
    let bytes = encode(&many);
    assert!(bytes.len() < 4096 * 16 + 512, "{} bytes", bytes.len());
    assert_eq!(decode(&bytes), Some(many.clone()));
    many.touch = vec![3, 100, 3, 3, 7, 100];
    assert_eq!(decode(&encode(&many)), Some(many.clone()));
    // A run of zero accesses is malformed.
    let mut zero = b.clone();
    zero.touch = vec![5];
    let mut bytes = encode(&zero);
    let at = 24 + (8 + 8 * 2) + (8 + 8) + (8 + 4 * 3); // seq..first_id, delete, update_ids, deltas
    assert_eq!(
        &bytes[at..at + 24],
        [1u64, 5, 1].map(u64::to_le_bytes).concat().as_slice()
    );
    bytes[at + 16] = 0;
    assert_eq!(decode(&bytes), None);

    // Journals of format 2 (accesses one by one, no tags), 3 (no tags), 4
    // (no value assignments or tag counts) and 5 (no header checksums) are
    // read and rewritten in the current format.
    let mut b = b;
    b.insert_tags.clear();
    b.assign_ids.clear();
    b.assign_values.clear();
    b.tag_counts.clear();
    let record = |p: Vec<u8>| {
        let mut r = (p.len() as u32).to_le_bytes().to_vec();
        r.extend_from_slice(&crc32(&p).to_le_bytes());
        r.extend_from_slice(&p);
        r
    };
    // A format-4 payload is today's without the (empty) assignments and tag
    // counts at its end; a format-3 one also without the insert tags.
    let v4 = |b: &ChangeBatch| {
        let mut p = encode(b);
        p.truncate(p.len() - 24);
        p
    };
    let v3 = |b: &ChangeBatch| {
        let mut p = v4(b);
        p.truncate(p.len() - 8);
        p
    };
    let v2 = |b: &ChangeBatch| {
        let mut without = b.clone();
        without.touch.clear();
        let mut p = v3(&without);
        let mut list = (b.touch.len() as u64).to_le_bytes().to_vec();
        for id in &b.touch {
            list.extend_from_slice(&id.to_le_bytes());
        }
        p.splice(at..at + 8, list);
        p
    };
    let mut c = b.clone();
    c.seq = 8;
    for (name, magic, old) in [
        ("v2", b"DMTJRNL2", [v2(&b), v2(&c)]),
        ("v3", b"DMTJRNL3", [v3(&b), v3(&c)]),
        ("v4", b"DMTJRNL4", [v4(&b), v4(&c)]),
        ("v5", b"DMTJRNL5", [encode(&b), encode(&c)]),
    ] {
        let path = dir.path().join(name);
        let [x, y] = old.map(record);
        std::fs::write(&path, [magic.to_vec(), x, y].concat()).unwrap();
        let (mut j, got) = Journal::open(&path).unwrap();
        assert_eq!(got, vec![b.clone(), c.clone()], "{name}");
        let mut d = b.clone();
        d.seq = 9;
        d.insert_tags = vec![vec!["head:0".into()]];
        j.append(&d).unwrap();
        drop(j);
        assert_eq!(&std::fs::read(&path).unwrap()[..8], b"DMTJRNL6");
        assert_eq!(Journal::open(&path).unwrap().1, vec![b.clone(), c.clone(), d], "{name}");
    }
}

#[test]
fn tier_refuses_bad_input_without_changing() {
    let device = Device::flex();
    let mut tier = DeviceMemory::new(config(), 4, &device).unwrap();
    assert!(DeviceMemory::new(config().with_capacity(2), 4, &device).is_err());
    assert!(tier.insert(&[1.0; 5], &[1.0; 3], 1).is_err());
    assert!(tier.insert(&[f32::NAN; 4], &[1.0; 3], 1).is_err());
    assert!(tier.is_empty() && !tier.has_changes());
    tier.fill(&[0.0; 8], &[0.0; 6], 1).unwrap();
    assert!(tier.touch(&[3], 1).is_err(), "empty slot");
    assert!(tier.touch(&[0, 0, 9, 1], 1).is_err(), "a slot out of range");
    assert!(tier.touch(&[1, 3, 0], 1).is_err(), "an empty slot after full ones");
    assert!(tier.touch(&[0], 2).is_err(), "a batch carries one tick");
    let b = tier.take_changes().unwrap();
    assert_eq!((b.seq, b.first_id, b.insert_keys.len()), (1, 1, 8));
    tier.touch(&[0], 2).unwrap();
    let grad = Tensor::<2>::from_data(TensorData::new(vec![f32::INFINITY; 12], [4, DV]), &device);
    assert!(tier.apply_value_grad(grad, 1.0, &[0]).is_err());
    let b = tier.take_changes().unwrap();
    assert_eq!((b.seq, b.touch.clone(), b.deltas.len()), (2, vec![1], 0));
}

/// Recombining a commit's near-duplicates in one batch (one device read of
/// the sources, one write of the merged rows) gives what merging them one by
/// one gives: the same slots, rows, bookkeeping and change batch, including
/// an item whose source an earlier item merged away (skipped), the limit,
/// and an error part-way (the rows merged before it are on the device).
#[test]
fn merging_in_one_batch_equals_merging_one_by_one() {
    let device = Device::flex();
    let mut tier = DeviceMemory::new(config(), CAP, &device).unwrap();
    let mut rng = Rng::new(5);
    tier.fill(&rng.vecs(16, DK), &rng.vecs(16, DV), 1).unwrap();
    tier.take_changes().unwrap();
    tier.touch(&[0, 1, 1, 5], 2).unwrap();
    let mut item = |sources: &[u64]| (rng.vecs(1, DK), rng.vecs(1, DV), sources.to_vec());
    let items = vec![
        item(&[1, 2]),
        item(&[2, 3]), // 2 is merged away by the first item: skipped
        item(&[4]),
        item(&[40]), // unknown: skipped
        item(&[5, 6, 7]),
        item(&[8]), // over the limit of 3
    ];
    let one_by_one = |tier: &mut DeviceMemory, items: &[(Vec<f32>, Vec<f32>, Vec<u64>)], limit: usize| {
        let mut slots = Vec::new();
        for (k, v, s) in items {
            if slots.len() >= limit {
                break;
            }
            if let Some(slot) = tier.merge(s, k, v, 2)? {
                slots.push(slot);
            }
        }
        Ok::<_, burn_dmt::DmtError>(slots)
    };
    let (mut a, mut b) = (tier.clone(), tier.clone());
    let sa = one_by_one(&mut a, &items, 3).unwrap();
    let sb = b.merge_many(&items, 2, 3).unwrap();
    assert_eq!(sa.len(), 3);
    assert_eq!(sa, sb);
    assert_eq!(tier_rows(&a), tier_rows(&b));
    assert_eq!(a.layout(), b.layout());
    let (ba, bb) = (a.take_changes().unwrap(), b.take_changes().unwrap());
    assert_eq!(ba, bb);
    assert_eq!(ba.delete, vec![1, 2, 4, 5, 6, 7]);
    assert_eq!(ba.insert_meta.len(), 3);
    // A merged memory carries its sources' accesses (memory 1: its insert
    // and one touch; memory 2: its insert and two) and the observation's.
    assert_eq!(ba.insert_meta[0].access_count, 2 + 3 + 1);

    // An observation that makes a non-finite merge stops both at the same
    // point, with the first item's merge on the device and in the batch.
    let bad = vec![item(&[9]), (vec![f32::NAN; DK], vec![0.5; DV], vec![10]), item(&[11])];
    let (mut a, mut b) = (tier.clone(), tier.clone());
    assert!(one_by_one(&mut a, &bad, 10).is_err());
    assert!(b.merge_many(&bad, 2, 10).is_err());
    assert_eq!(tier_rows(&a), tier_rows(&b));
    assert_eq!(a.take_changes(), b.take_changes());
    assert!(
        tier_rows(&b)
            .iter()
            .any(|(id, k, _)| *id == 17 && k.iter().all(|x| x.is_finite()))
    );
    assert!(!tier_rows(&b).iter().any(|(id, _, _)| *id == 9));
}

/// Inference from the store alone: a memory larger than the device tier's
/// capacity is searched through the store's index and gives the device
/// path's top-k (same keys and values; distances to rounding), and the same
/// featural-layer output; such a tier refuses to learn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_backed_memory_matches_the_device_tier() {
    use burn_dmt::memory::featural::FeaturalMemory;
    let device = Device::flex();
    let (n, dh, heads, k) = (300usize, 8usize, 2usize, 5usize);
    let dir = tempfile::tempdir().unwrap();
    let config = MemoryConfig::new(dh, dh).with_metric(Metric::L2);
    let store = Arc::new(sqlite_store(dir.path().join("m.db"), config).await.unwrap());
    let mut rng = Rng::new(21);
    let (keys, values) = (rng.vecs(n, dh), rng.vecs(n, dh));
    store
        .insert(
            memstore_api::Batch::new(
                memstore_api::Vectors::new(&keys, dh).unwrap(),
                memstore_api::Vectors::new(&values, dh).unwrap(),
            ),
            1,
        )
        .await
        .unwrap();
    assert!(
        DeviceMemory::load(store.as_ref(), 100, &device).await.is_err(),
        "too big for 100 slots"
    );
    let on_disk = DeviceMemory::from_store(store.clone(), 1, &device).await.unwrap();
    let on_device = DeviceMemory::load(store.as_ref(), 512, &device).await.unwrap();
    assert_eq!(on_disk.len(), n);
    let q = Tensor::<2>::from_data(TensorData::new(rng.vecs(20, dh), [20, dh]), &device);
    let (a, b) = (
        on_disk.search(q.clone(), k).unwrap(),
        on_device.search(q.clone(), k).unwrap(),
    );
    assert_eq!(
        floats(a.keys.reshape([20 * k, dh])),
        floats(b.keys.reshape([20 * k, dh]))
    );
    assert_eq!(
        floats(a.values.reshape([20 * k, dh])),
        floats(b.values.reshape([20 * k, dh]))
    );
    for (x, y) in floats(a.distances).iter().zip(floats(b.distances)) {
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }

    let x = Tensor::<3>::from_data(TensorData::new(rng.vecs(6, dh * heads), [1, 6, dh * heads]), &device);
    let f_device = FeaturalMemory::new(dh * heads, heads, k, on_device, &device).unwrap();
    let mut f_disk = f_device.clone();
    *f_disk.memory_mut() = on_disk.clone();
    let (ya, yb) = (
        f_disk.forward(x.clone()).unwrap().reshape([6, dh * heads]),
        f_device.forward(x).unwrap().reshape([6, dh * heads]),
    );
    for (p, r) in floats(ya).iter().zip(floats(yb)) {
        assert!((p - r).abs() < 1e-5, "{p} vs {r}");
    }
    let mut ro = on_disk;
    assert!(ro.insert(&[0.0; 8], &[0.0; 8], 2).is_err());
    assert!(ro.touch(&[0], 2).is_err());
}

/// The rows of `t` (host) as a `[rows, d]` tensor.
fn rows_tensor(t: &[f32], d: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(t.to_vec(), [t.len() / d, d]), device)
}

/// The ids a search found, row by row (`None`: no neighbour).
fn found_ids(tier: &DeviceMemory, q: &[f32], k: usize) -> Vec<Vec<Option<u64>>> {
    let found = tier.search(rows_tensor(q, DK, tier.device()), k).unwrap();
    let d = floats(found.distances);
    let slots = slots_of(found.slots);
    slots
        .chunks(k)
        .zip(d.chunks(k))
        .map(|(s, d)| {
            s.iter()
                .zip(d)
                .map(|(&s, d)| d.is_finite().then(|| tier.id(s)).flatten())
                .collect()
        })
        .collect()
}

/// A tier split into head partitions: query row `i` gets the brute-force
/// top-k of partition `i % parts` alone (fewer than `k` where the partition
/// holds fewer: the rest are `+∞`); new rows go to their partition and evict
/// within it by LRFU; the store receives every row tagged with its head; a
/// tier loaded from the store (into slots, or searching the store itself)
/// puts every memory back in its partition and finds the same neighbours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_partitions_search_insert_and_evict_apart_and_survive_a_reload() {
    const P: usize = 3;
    const PER: usize = CAP / P;
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(sqlite_store(dir.path().join("m.db"), config()).await.unwrap());
    assert!(
        DeviceMemory::new(config(), CAP, &device)
            .unwrap()
            .with_parts(5)
            .is_err()
    );
    let mut tier = DeviceMemory::new(config(), CAP, &device)
        .unwrap()
        .with_parts(P)
        .unwrap();
    let mut rng = Rng::new(31);
    // Four memories in partition 0, two in 1, one in 2.
    let parts = [0, 0, 1, 0, 2, 1, 0];
    tier.insert_parts(&rng.vecs(7, DK), &rng.vecs(7, DV), &parts, 1)
        .unwrap();
    assert_eq!(tier.part_lens(), vec![4, 2, 1]);
    let b = tier.take_changes().unwrap();
    let tags: Vec<String> = b.insert_tags.iter().map(|t| t.join(",")).collect();
    let want: Vec<String> = parts.iter().map(|p| format!("head:{p}")).collect();
    assert_eq!(tags, want);
    store.apply(&b).await.unwrap();

    // Search: each row within its partition, padded where it holds fewer than k.
    let q = rng.vecs(6, DK);
    let got = found_ids(&tier, &q, 3);
    let (keys, _) = tier.tensors();
    let keys = floats(keys);
    for (i, row) in got.iter().enumerate() {
        let part = i % P;
        let mut cands: Vec<(f32, u64)> = (part * PER..(part + 1) * PER)
            .filter_map(|s| tier.id(s).map(|id| (s, id)))
            .map(|(s, id)| {
                let d: f32 = (0..DK)
                    .map(|j| (q[i * DK + j] - keys[s * DK + j]).powi(2))
                    .sum::<f32>()
                    .sqrt();
                (d, id)
            })
            .collect();
        cands.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut want: Vec<Option<u64>> = cands.iter().take(3).map(|c| Some(c.1)).collect();
        want.resize(3, None);
        assert_eq!(row, &want, "query {i} (partition {part})");
    }

    // Fill partition 0 and give its memories distinct histories, synced.
    tier.insert_parts(&rng.vecs(4, DK), &rng.vecs(4, DV), &[0; 4], 2)
        .unwrap();
    store.apply(&tier.take_changes().unwrap()).await.unwrap();
    let part0: Vec<usize> = (0..PER).collect();
    for (t, s) in (3..).zip(&part0) {
        tier.touch(&vec![*s; 1 + (*s % 3)], t).unwrap();
        store.apply(&tier.take_changes().unwrap()).await.unwrap();
    }
    assert_eq!(tier.part_lens(), vec![PER, 2, 1]);
    // One more memory for partition 0 evicts its lowest LRFU priority, and
    // nothing elsewhere; partition 1 has room.
    let ids0: Vec<u64> = part0.iter().filter_map(|&s| tier.id(s)).collect();
    let lambda = config().eviction.lambda();
    let victim = store
        .get(&ids0)
        .await
        .unwrap()
        .into_iter()
        .min_by(|a, b| {
            memstore_api::math::priority(lambda, a.crf, a.last_access)
                .total_cmp(&memstore_api::math::priority(lambda, b.crf, b.last_access))
                .then(a.id.cmp(&b.id))
        })
        .unwrap()
        .id;
    tier.insert_parts(&rng.vecs(2, DK), &rng.vecs(2, DV), &[0, 1], 20)
        .unwrap();
    let b = tier.take_changes().unwrap();
    assert_eq!(b.delete, vec![victim], "LRFU order within the partition");
    assert_eq!(tier.part_lens(), vec![PER, 3, 1]);
    assert_eq!(tier.counters().evicted, 1);
    store.apply(&b).await.unwrap();

    // The store knows each memory's head; reloads put them back.
    let (mems, _) = dump(store.as_ref()).await;
    for m in mems.values() {
        let s = tier.slot(m.id).unwrap();
        assert!(m.tags.contains_key(&format!("head:{}", s / PER)), "{m:?}");
    }
    let q = rng.vecs(9, DK);
    let want = found_ids(&tier, &q, 3);
    let loaded = DeviceMemory::load_parts(store.as_ref(), CAP, P, &device).await.unwrap();
    assert_eq!(loaded.part_lens(), tier.part_lens());
    assert_eq!(found_ids(&loaded, &q, 3), want);
    let laid = DeviceMemory::load_with_layout(store.as_ref(), &tier.layout(), P, &device)
        .await
        .unwrap();
    assert_eq!(laid.layout(), tier.layout());
    // Searching the store itself, each head among its own memories (both
    // pad partition 2, which holds one memory, with infinite distances).
    let on_disk = DeviceMemory::from_store(store.clone(), P, &device).await.unwrap();
    let found = on_disk.search(rows_tensor(&q, DK, &device), 3).unwrap();
    let (dk, ld) = (
        floats(found.distances),
        floats(loaded.search(rows_tensor(&q, DK, &device), 3).unwrap().distances),
    );
    assert_eq!(
        dk.iter().filter(|d| d.is_infinite()).count(),
        3 * 2,
        "three rows of partition 2, two neighbours missing each"
    );
    for (a, b) in dk.iter().zip(&ld) {
        assert!(a == b || (a - b).abs() < 1e-5, "{a} vs {b}");
    }
    // A shared table cannot load a partitioned store's rows into a layout
    // that puts them in the wrong partition.
    let mut wrong = tier.layout();
    wrong.swap(0, PER);
    assert!(
        DeviceMemory::load_with_layout(store.as_ref(), &wrong, P, &device)
            .await
            .is_err()
    );
}

/// A memory that starts empty grows by novelty-gated insertion (the
/// store's `learn` semantics, [`DeviceMemory::commit`]): its rows rise from
/// zero, never pass the capacity, and once full it evicts by LRFU within each
/// head's partition; the store follows it batch by batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_growing_memory_rises_to_its_capacity_and_then_evicts() {
    use burn_dmt::memory::tier::Observation;
    const P: usize = 2;
    let device = Device::flex();
    let lambda = 0.3;
    // No recombination (L2 distances are never below 0): every change is an
    // insert or an eviction.
    let cfg = MemoryConfig::new(DK, DV)
        .with_metric(Metric::L2)
        .with_eviction(EvictionPolicy::Lrfu { lambda })
        .with_thresholds(0.0, 0.05);
    let store = InMemoryStore::new(cfg.clone()).unwrap();
    let mut tier = DeviceMemory::new(cfg, CAP, &device).unwrap().with_parts(P).unwrap();
    let mut rng = Rng::new(41);
    let mut rows = vec![tier.len()];
    for tick in 1..=12u64 {
        let q = rows_tensor(&rng.vecs(6, DK), DK, &device);
        let found = tier.search(q.clone(), 2).unwrap();
        let obs = Observation {
            keys: q,
            values: Some(rows_tensor(&rng.vecs(6, DV), DV, &device)),
            distances: found.distances,
            slots: found.slots,
        };
        let held = store.get(&store.ids().await.unwrap()).await.unwrap();
        let done = tier.commit(vec![obs], tick, 4, None).unwrap();
        assert!(done.inserted <= 4 && done.merged == 0, "{done:?}");
        let b = tier.take_changes().unwrap();
        // An evicted memory's priority before this step is at most that of
        // every memory of its partition that stays and was not accessed in
        // this step (accesses only raise a priority).
        let prio = |m: &memstore_api::Memory| memstore_api::math::priority(lambda, m.crf, m.last_access);
        for gone in held.iter().filter(|m| b.delete.contains(&m.id)) {
            for other in held
                .iter()
                .filter(|o| o.tags == gone.tags && !b.delete.contains(&o.id) && !b.touch.contains(&o.id))
            {
                assert!(
                    prio(gone) <= prio(other) + 1e-12,
                    "step {tick}: evicted {} before {}",
                    gone.id,
                    other.id
                );
            }
        }
        store.apply(&b).await.unwrap();
        assert!(tier.part_lens().iter().all(|&n| n <= CAP / P), "{:?}", tier.part_lens());
        assert_eq!(store.len().await.unwrap(), tier.len());
        rows.push(tier.len());
    }
    assert_eq!(rows[0], 0);
    assert!(
        rows.windows(2).take(4).all(|w| w[1] > w[0]),
        "it grows from empty: {rows:?}"
    );
    assert_eq!(*rows.last().unwrap(), CAP, "it fills: {rows:?}");
    let c = tier.counters();
    assert!(c.evicted > 0, "and then evicts: {c:?}");
    assert_eq!(c.inserted - c.evicted, CAP as u64);
}

/// While a source is written: its inserts carry its tag, an older memory
/// whose value changes gains the tag once (a tag count), older memories are
/// never evicted, recombined or accessed, and a full tier makes room among
/// the source's own memories only; the store agrees.
#[test]
fn a_source_tags_its_changes_and_protects_older_memories() {
    let device = Device::flex();
    let mut tier = DeviceMemory::new(config().with_thresholds(0.01, 0.5), 8, &device).unwrap();
    let store = InMemoryStore::new(config().with_thresholds(0.01, 0.5)).unwrap();
    let mut rng = Rng::new(3);
    tier.fill(&rng.vecs(4, DK), &rng.vecs(4, DV), 1).unwrap();
    futures_apply(&store, tier.take_changes().unwrap());
    assert!(tier.begin_source("").is_err());
    tier.begin_source("source:x@01").unwrap();
    // Older memories: accesses dropped, a value change tags them once.
    tier.touch(&[0, 1], 2).unwrap();
    let grad = Tensor::<2>::from_data(TensorData::new(vec![1.0; 8 * DV], [8, DV]), &device);
    tier.apply_value_grad(grad.clone(), 0.5, &[0, 1]).unwrap();
    tier.apply_value_grad(grad.clone(), 0.5, &[0]).unwrap();
    tier.insert(&rng.vecs(4, DK), &rng.vecs(4, DV), 2).unwrap();
    let b = tier.take_changes().unwrap();
    assert!(b.touch.is_empty(), "older memories were accessed: {:?}", b.touch);
    assert_eq!(
        b.tag_counts,
        vec![(1, "source:x@01".to_string(), 1), (2, "source:x@01".to_string(), 1)]
    );
    assert!(b.insert_tags.iter().all(|t| t == &vec!["source:x@01".to_string()]));
    futures_apply(&store, b);
    // Full: new memories replace the source's own, never older ones.
    for tick in 3..6 {
        let got = tier.insert(&rng.vecs(2, DK), &rng.vecs(2, DV), tick).unwrap();
        assert_eq!(got.len(), 2);
        let b = tier.take_changes().unwrap();
        assert!(
            b.delete.iter().all(|&id| id > 4),
            "an older memory was evicted: {:?}",
            b.delete
        );
        futures_apply(&store, b);
    }
    assert!((1..=4).all(|id| tier.slot(id).is_some()));
    // Recombining with an older memory is refused (nothing changes).
    let (k, v) = (vec![0.0; DK], vec![0.0; DV]);
    assert_eq!(tier.merge(&[1], &k, &v, 6).unwrap(), None);
    tier.end_source().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = rt.block_on(store.get(&[1, 2, 3])).unwrap();
    assert_eq!(
        m.iter().map(|m| m.tags.contains_key("source:x@01")).collect::<Vec<_>>(),
        [true, true, false]
    );
    // The tier's own novelty gate can be raised, not put below recombination.
    assert!(tier.set_novelty(0.001).is_err());
    tier.set_novelty(0.9).unwrap();
    assert_eq!(tier.config().novelty, 0.9);
}

fn futures_apply(store: &InMemoryStore, b: ChangeBatch) {
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(store.apply(&b))
        .unwrap();
}

/// On the CPU backend a trainable tier's searches make the rows they
/// retrieved gradient leaves of their own: the gradient covers exactly
/// those rows (over several searches, their union), equals the gradient
/// of the whole table (zero elsewhere), and updates the values and the
/// store's batch as the whole table's gradient does. Past the limit of
/// searches awaiting their gradient, they gather from the table, and the
/// gradient (then over the whole table) is the same.
#[test]
fn a_value_gradient_covers_the_retrieved_rows_and_updates_as_the_whole_tables() {
    let ad = Device::flex().autodiff();
    let k = 3;
    for searches in [&[5usize, 4][..], &[5, 4, 3, 2, 1, 2, 3, 4, 5, 6]] {
        let mut rng = Rng::new(41);
        let mut tier = DeviceMemory::new(config(), CAP, &ad).unwrap();
        tier.fill(&rng.vecs(16, DK), &rng.vecs(16, DV), 1).unwrap();
        tier.take_changes();
        tier.set_trainable_values(true);
        let before = tier.clone();
        let (mut loss, mut want, mut rows) = (None, vec![0.0f32; CAP * DV], Vec::new());
        for &m in searches {
            let found = tier.search(rows_tensor(&rng.vecs(m, DK), DK, &ad), k).unwrap();
            let w = rng.vecs(m * k, DV);
            let slots = slots_of(found.slots.clone());
            for (i, &s) in slots.iter().enumerate() {
                for c in 0..DV {
                    want[s * DV + c] += w[i * DV + c];
                }
            }
            rows.extend(&slots);
            let term = (found.values * Tensor::<3>::from_data(TensorData::new(w, [m, k, DV]), &ad)).sum();
            loss = Some(match loss {
                None => term,
                Some(l) => l + term,
            });
        }
        let mut grads = loss.unwrap().backward();
        let grad = tier.take_value_grad(&mut grads).expect("a value gradient");
        rows.sort_unstable();
        rows.dedup();
        if searches.len() == 2 {
            assert!(rows.len() < 16, "two searches retrieve some rows, not all: {rows:?}");
            assert_eq!(grad.rows(), Some(&rows[..]));
        } else {
            assert_eq!(grad.rows(), None, "{} searches reach the whole table", searches.len());
        }
        let got = floats(grad.clone().dense(CAP));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5, "{got:?} vs {want:?}");
        }
        assert!(tier.take_value_grad(&mut grads).is_none(), "a gradient is taken once");

        // The update from the gradient equals the whole table's, for slots
        // the searches did not retrieve too (a zero gradient: no delta).
        let mut named = rows.clone();
        named.extend((0..16).find(|s| !rows.contains(s)));
        let mut dense = before;
        tier.apply_value_grad(grad, 0.5, &named).unwrap();
        let want = Tensor::<2>::from_data(TensorData::new(got, [CAP, DV]), &ad);
        dense.apply_value_grad(want, 0.5, &named).unwrap();
        assert_eq!(floats(tier.tensors().1), floats(dense.tensors().1));
        let (a, b) = (tier.take_changes().unwrap(), dense.take_changes().unwrap());
        assert_eq!(
            (a.update_ids.len(), &a.update_ids, &a.deltas),
            (rows.len(), &b.update_ids, &b.deltas)
        );
    }
}
