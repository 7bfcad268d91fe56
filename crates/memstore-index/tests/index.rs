//! The HNSW index against brute force: its recall is measured (and printed)
//! and must reach the documented floor; filters, removals and calibration
//! behave; persistence refuses stale, corrupt and truncated files.

use memstore_api::{MemoryId, Metric, math};
use memstore_index::{HnswIndex, HnswOptions, IndexError, Opened, Quantization};

/// Recall@8 of `h` (built from `ids`/`keys`, L2) on 200 fresh random queries.
fn recall_of(h: &HnswIndex, ids: &[MemoryId], keys: &[f32], d: usize) -> f64 {
    recall_for(h, ids, keys, d, &rand_vecs(40, 200 * d))
}

/// Recall@8 of `h` for these queries against brute force.
fn recall_for(h: &HnswIndex, ids: &[MemoryId], keys: &[f32], d: usize, q: &[f32]) -> f64 {
    let got = h.search(q, 8, None).unwrap();
    let mut hit = 0;
    for (i, row) in got.iter().enumerate() {
        let want = brute(Metric::L2, &q[i * d..(i + 1) * d], ids, keys, d, 8, &|_| true);
        hit += row.iter().filter(|(_, id)| want.iter().any(|w| w.1 == *id)).count();
    }
    hit as f64 / (8 * got.len()) as f64
}

/// `n` points of a random 3-d subspace of R^d (easy for a graph: its
/// neighbourhoods are those of 3-d space).
fn flat_vecs(seed: u64, n: usize, d: usize) -> Vec<f32> {
    let basis = rand_vecs(7, 3 * d);
    let z = rand_vecs(seed, 3 * n);
    (0..n)
        .flat_map(|i| {
            let z = &z[i * 3..i * 3 + 3];
            let basis = &basis;
            (0..d).map(move |j| z[0] * basis[j] + z[1] * basis[d + j] + z[2] * basis[2 * d + j])
        })
        .collect()
}

fn rand_vecs(seed: u64, n: usize) -> Vec<f32> {
    memstore_api::testkit::util::uniform(seed, n)
}

fn brute(
    metric: Metric,
    q: &[f32],
    ids: &[MemoryId],
    keys: &[f32],
    d: usize,
    k: usize,
    pass: &dyn Fn(MemoryId) -> bool,
) -> Vec<(f32, MemoryId)> {
    let mut all: Vec<(f32, MemoryId)> = ids
        .iter()
        .enumerate()
        .filter(|(_, id)| pass(**id))
        .map(|(i, &id)| (math::distance(metric, q, &keys[i * d..(i + 1) * d]), id))
        .collect();
    all.sort_by(|a, b| math::neighbour_order(*a, *b));
    all.truncate(k);
    all
}

fn recall(metric: Metric, options: HnswOptions, n: usize, d: usize) -> f64 {
    let ids: Vec<MemoryId> = (1..=n as u64).collect();
    let keys = rand_vecs(3, n * d);
    let h = HnswIndex::build(metric, d, options, &ids, &keys).unwrap();
    let q = rand_vecs(4, RECALL_QUERIES * d);
    let got = h.search(&q, 8, None).unwrap();
    let mut hit = 0;
    for (i, row) in got.iter().enumerate() {
        let want = brute(metric, &q[i * d..(i + 1) * d], &ids, &keys, d, 8, &|_| true);
        hit += row.iter().filter(|(_, id)| want.iter().any(|w| w.1 == *id)).count();
        // Distances are in memstore's metric (L2 not squared).
        if options.quantization == Quantization::F32 {
            for &(dist, id) in row {
                let exact = math::distance(
                    metric,
                    &q[i * d..(i + 1) * d],
                    &keys[(id as usize - 1) * d..id as usize * d],
                );
                assert!((dist - exact).abs() <= 1e-3 * exact.abs().max(1.0), "{dist} vs {exact}");
            }
        }
    }
    hit as f64 / (RECALL_QUERIES as f64 * 8.0)
}

/// Fresh queries of a recall measurement.
const RECALL_QUERIES: usize = 400;

/// The lowest recall a fresh sample may show for a calibrated `target`:
/// calibration meets the target on its own sample of held-out keys, so a
/// fresh sample of `RECALL_QUERIES · 8` neighbours scatters around it; three
/// standard errors of that sample below the target still passes.
fn floor(target: f64) -> f64 {
    let n = RECALL_QUERIES as f64 * 8.0;
    target - 3.0 * (target * (1.0 - target) / n).sqrt()
}

#[test]
fn hnsw_recall_meets_the_default_floor() {
    let r = recall(Metric::L2, HnswOptions::default(), 10_000, 64);
    println!(
        "HNSW recall@8, 10k random 64-d keys, L2, defaults {:?}: {r:.3}",
        HnswOptions::default()
    );
    assert!(r >= floor(0.95), "recall@8 {r} < {}", floor(0.95));
    let low = {
        let mut o = HnswOptions::default();
        o.expansion_search = 16;
        o.target_recall = None;
        o
    };
    let r16 = recall(Metric::L2, low, 10_000, 64);
    println!("  with expansion_search 16: {r16:.3}");
    assert!(r16 < r, "a smaller search expansion loses recall ({r16} vs {r})");
    let cos = recall(Metric::Cosine, HnswOptions::default(), 5_000, 32);
    println!("  cosine, 5k × 32: {cos:.3}");
    assert!(cos >= floor(0.95), "cosine recall@8 {cos} < {}", floor(0.95));
    let f16 = recall(
        Metric::L2,
        {
            let mut o = HnswOptions::default();
            o.quantization = Quantization::F16;
            o
        },
        5_000,
        32,
    );
    println!("  f16 storage, 5k × 32: {f16:.3}");
    assert!(f16 >= 0.9);
    let i8 = recall(
        Metric::Cosine,
        {
            let mut o = HnswOptions::default();
            o.quantization = Quantization::I8;
            o
        },
        5_000,
        32,
    );
    println!("  i8 storage, cosine, 5k × 32: {i8:.3}");
    assert!(i8 >= 0.7);
}

#[test]
fn hnsw_filters_inside_the_search_and_forgets_removed_keys() {
    let (n, d) = (4000usize, 16usize);
    let ids: Vec<MemoryId> = (1..=n as u64).collect();
    let keys = rand_vecs(5, n * d);
    let mut h = HnswIndex::build(Metric::L2, d, HnswOptions::default(), &ids, &keys).unwrap();
    let q = rand_vecs(6, 50 * d);
    // A filter that passes one key in 10: k results still come back.
    let rare = |id: MemoryId| id % 10 == 3;
    for row in h.search(&q, 8, Some(&rare)).unwrap() {
        assert_eq!(row.len(), 8);
        assert!(row.iter().all(|(_, id)| rare(*id)));
    }
    // Remove 40% (the graph then asks to be rebuilt): removed ids never come back.
    let gone: Vec<MemoryId> = ids.iter().copied().filter(|i| i % 5 < 2).collect();
    assert_eq!(h.remove(&gone).unwrap(), gone.len());
    assert_eq!(h.len(), n - gone.len());
    assert_eq!(h.tombstones(), gone.len());
    assert!(h.fragmented());
    for row in h.search(&q, 8, None).unwrap() {
        assert_eq!(row.len(), 8);
        assert!(row.iter().all(|(_, id)| id % 5 >= 2));
    }
    // Bad input is a typed error.
    assert!(matches!(h.search(&q, 0, None), Err(IndexError::ZeroK)));
    assert!(matches!(h.search(&q[..d + 1], 1, None), Err(IndexError::Shape(_))));
    assert!(matches!(
        h.add(&[99_999], &[f32::NAN; 16]),
        Err(IndexError::NonFinite { .. })
    ));
    assert!(matches!(h.add(&[8], &[0.0; 16]), Err(IndexError::Duplicate(8))));
    assert!(matches!(h.add(&[7, 7], &[0.0; 32]), Err(IndexError::Duplicate(7))));
    assert!(
        HnswIndex::new(Metric::L2, 4, {
            let mut o = HnswOptions::default();
            o.connectivity = 1;
            o
        })
        .is_err()
    );
}

#[test]
fn saved_index_is_used_only_when_it_matches_the_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.hnsw");
    let (n, d) = (2000usize, 8usize);
    let ids: Vec<MemoryId> = (1..=n as u64).collect();
    let keys = rand_vecs(7, n * d);
    let o = HnswOptions::default();
    let (h, how) = HnswIndex::open_or_build(&path, Metric::L2, d, o, &ids, &keys).unwrap();
    assert_eq!(how, Opened::Built);
    let q = rand_vecs(8, 20 * d);
    let before = h.search(&q, 5, None).unwrap();
    drop(h);
    assert!(!path.with_extension("tmp").exists(), "no temporary file is left behind");

    let (h, how) = HnswIndex::open_or_build(&path, Metric::L2, d, o, &ids, &keys).unwrap();
    assert_eq!(how, Opened::Loaded);
    assert_eq!(h.search(&q, 5, None).unwrap(), before);
    drop(h);

    // Rows that changed since the save: rebuilt.
    let mut moved = keys.clone();
    moved[17] += 0.5;
    let (_, how) = HnswIndex::open_or_build(&path, Metric::L2, d, o, &ids, &moved).unwrap();
    assert!(
        matches!(how, Opened::Rebuilt(ref r) if r.contains("other rows")),
        "{how:?}"
    );
    // (the file now matches `moved`)
    let (_, how) = HnswIndex::open_or_build(&path, Metric::L2, d, o, &ids[..n - 1], &moved[..(n - 1) * d]).unwrap();
    assert!(matches!(how, Opened::Rebuilt(_)), "{how:?}");

    // A flipped byte or a truncated file: rebuilt, never loaded.
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    std::fs::write(&path, &bad).unwrap();
    let (h, how) = HnswIndex::open_or_build(&path, Metric::L2, d, o, &ids[..n - 1], &moved[..(n - 1) * d]).unwrap();
    assert!(
        matches!(how, Opened::Rebuilt(ref r) if r.contains("checksum")),
        "{how:?}"
    );
    assert_eq!(h.len(), n - 1);
    std::fs::write(&path, &good[..good.len() / 3]).unwrap();
    let (_, how) = HnswIndex::open_or_build(&path, Metric::L2, d, o, &ids[..n - 1], &moved[..(n - 1) * d]).unwrap();
    assert!(matches!(how, Opened::Rebuilt(_)), "{how:?}");
    // Another metric or dimension: rebuilt.
    let (_, how) = HnswIndex::open_or_build(&path, Metric::Cosine, d, o, &ids[..n - 1], &moved[..(n - 1) * d]).unwrap();
    assert!(matches!(how, Opened::Rebuilt(ref r) if r.contains("metric")), "{how:?}");
}

/// Insert/remove churn at a small dimension (a memory layer's life): freed
/// slots are reused, removed ids never come back, every live id stays
/// findable by its own key. (usearch's `compact` corrupted the heap in this
/// scenario; the index no longer calls it.)
#[test]
fn hnsw_survives_insert_remove_churn() {
    let d = 4;
    let mut h = HnswIndex::new(Metric::L2, d, HnswOptions::default()).unwrap();
    let mut live: Vec<(MemoryId, Vec<f32>)> = Vec::new();
    let mut next = 1u64;
    for step in 0..200u64 {
        let ids: Vec<MemoryId> = (next..next + 20).collect();
        next += 20;
        let keys = rand_vecs(1000 + step, 20 * d);
        h.add(&ids, &keys).unwrap();
        live.extend(
            ids.iter()
                .enumerate()
                .map(|(i, &id)| (id, keys[i * d..(i + 1) * d].to_vec())),
        );
        let gone: Vec<MemoryId> = live
            .iter()
            .map(|x| x.0)
            .filter(|id| id % 10 != step % 10)
            .take(18)
            .collect();
        assert_eq!(h.remove(&gone).unwrap(), gone.len());
        live.retain(|x| !gone.contains(&x.0));
        assert_eq!(h.len(), live.len());
        assert!(
            h.tombstones() <= 18,
            "freed slots are reused: {} tombstones",
            h.tombstones()
        );
    }
    let queries: Vec<f32> = live.iter().flat_map(|x| x.1.clone()).collect();
    let rows = h.search(&queries, 1, None).unwrap();
    let found = rows
        .iter()
        .zip(&live)
        .filter(|(row, x)| row.first().is_some_and(|r| r.0 == 0.0 && r.1 == x.0))
        .count();
    assert!(
        found * 100 >= live.len() * 99,
        "{found} of {} live keys found by themselves",
        live.len()
    );
    let all: std::collections::HashSet<MemoryId> = live.iter().map(|x| x.0).collect();
    assert!(rows.iter().flatten().all(|(_, id)| all.contains(id)));
}

#[test]
fn small_graphs_answer_exactly_with_filters_and_removals() {
    // 200 near keys that fail the filter and 10 far ones that pass: a graph
    // walk on so small a graph could stop short; an index no larger than
    // the search expansion is scanned instead. Repeated, because graph
    // construction is multi-threaded (each build differs).
    let near: Vec<f32> = (0..200).map(|i| i as f32 * 0.01).collect();
    let far: Vec<f32> = (0..10).map(|i| 100.0 + i as f32).collect();
    let ids: Vec<MemoryId> = (1..=210).collect();
    let passes = |id: MemoryId| id > 200;
    for _ in 0..100 {
        // Two batches, as a store adds them (near keys first).
        let mut h = HnswIndex::build(Metric::L2, 1, HnswOptions::default(), &ids[..200], &near).unwrap();
        h.add(&ids[200..], &far).unwrap();
        let rows = h.search(&[0.0, 50.0], 5, Some(&passes)).unwrap();
        for row in &rows {
            assert_eq!(
                row.iter().map(|r| r.1).collect::<Vec<_>>(),
                vec![201, 202, 203, 204, 205]
            );
        }
        assert_eq!(rows[0][0].0, 100.0);
        // More wanted than pass: all that pass, no more.
        assert_eq!(h.search(&[0.0], 12, Some(&passes)).unwrap()[0].len(), 10);
        // Removed keys never come back from the scan either.
        assert_eq!(h.remove(&[201, 1, 2]).unwrap(), 3);
        let row = &h.search(&[0.0], 5, Some(&passes)).unwrap()[0];
        assert_eq!(
            row.iter().map(|r| r.1).collect::<Vec<_>>(),
            vec![202, 203, 204, 205, 206]
        );
        let row = &h.search(&[0.0], 3, None).unwrap()[0];
        assert_eq!(row.iter().map(|r| r.1).collect::<Vec<_>>(), vec![3, 4, 5]);
    }
    // Past the expansion the graph answers (and still finds the far keys).
    let small_ef = {
        let mut o = HnswOptions::default();
        o.expansion_search = 16;
        o
    };
    let keys: Vec<f32> = near.iter().chain(&far).copied().collect();
    let h = HnswIndex::build(Metric::L2, 1, small_ef, &ids, &keys).unwrap();
    let row = &h.search(&[0.0], 3, None).unwrap()[0];
    assert_eq!(row.len(), 3);
    // An empty index answers empty rows.
    let e = HnswIndex::new(Metric::L2, 1, HnswOptions::default()).unwrap();
    assert_eq!(e.search(&[0.0], 3, None).unwrap(), vec![Vec::<(f32, MemoryId)>::new()]);
}

#[test]
fn calibration_raises_ef_until_the_target_recall() {
    // A sparse graph (M 6) searched with ef 8: far below 0.95 as it stands.
    let (n, d) = (6000usize, 32usize);
    let ids: Vec<MemoryId> = (1..=n as u64).collect();
    let keys = rand_vecs(41, n * d);
    let fixed = {
        let mut o = HnswOptions::default();
        o.connectivity = 6;
        o.expansion_add = 32;
        o.expansion_search = 8;
        o.target_recall = None;
        o
    };
    let h = HnswIndex::build(Metric::L2, d, fixed, &ids, &keys).unwrap();
    assert_eq!(h.expansion_search(), 8);
    assert!(h.calibration().is_none());
    let r_fixed = recall_of(&h, &ids, &keys, d);
    let tuned = {
        let mut o = fixed;
        o.target_recall = Some(0.95);
        o
    };
    let mut h = HnswIndex::build(Metric::L2, d, tuned, &ids, &keys).unwrap();
    let c = h.calibration().expect("calibrated on build");
    let r_tuned = recall_of(&h, &ids, &keys, d);
    println!("fixed ef 8: recall {r_fixed:.3}; calibrated: {c:?}, fresh-query recall {r_tuned:.3}");
    assert!(r_fixed < 0.9, "the fixed ef should be too small here ({r_fixed})");
    // Measured with 128 held-out keys of the batch, on the rest of it.
    assert_eq!((c.size, c.queries), (n - 128, 128));
    assert_eq!(c.expansion_search, h.expansion_search());
    assert!(c.expansion_search > 8 && c.recall >= 0.95, "{c:?}");
    assert_eq!(h.len(), n, "held-out keys are inserted too");
    // Held-out keys are fresh queries: new ones get about the same.
    assert!(r_tuned >= 0.93, "fresh-query recall {r_tuned}");
    // A quarter of the chosen ef would not do.
    h.set_expansion_search(c.expansion_search / 4);
    assert_eq!(h.expansion_search(), c.expansion_search / 4);
    assert!(recall_of(&h, &ids, &keys, d) < r_tuned);

    // Growing: calibration runs again once the index has grown by a
    // quarter, on batches of at least 64 keys.
    let mut g = HnswIndex::build(Metric::L2, d, tuned, &ids[..1000], &keys[..1000 * d]).unwrap();
    assert_eq!(g.calibration().expect("calibrated").size, 1000 - 128);
    g.add(&ids[1000..1080], &keys[1000 * d..1080 * d]).unwrap();
    assert_eq!(g.calibration().unwrap().size, 872, "not grown by 1.25 yet");
    // Due, but a batch of 40 is too small to hold 32 out of: it waits.
    g.add(&ids[1080..1120], &keys[1080 * d..1120 * d]).unwrap();
    assert_eq!(g.calibration().unwrap().size, 872);
    g.add(&ids[1120..1320], &keys[1120 * d..1320 * d]).unwrap();
    let c = g.calibration().unwrap();
    assert_eq!((c.size, c.queries), (1320 - 100, 100), "half of a 200-key batch");
    // Explicit queries (the application's own) work on any state.
    let gone: Vec<MemoryId> = (1..1320).filter(|i| i % 2 == 0).collect();
    g.remove(&gone).unwrap();
    let q = rand_vecs(42, 64 * d);
    let c = g.calibrate_with(&q).unwrap().expect("target set");
    assert!(c.queries == 64 && c.recall >= 0.95, "{c:?}");
    assert!(matches!(g.calibrate_with(&q[..d + 1]), Err(IndexError::Shape(_))));
    assert!(matches!(g.calibrate_with(&[]), Err(IndexError::Shape(_))));
    // No target: nothing to calibrate.
    let mut f = HnswIndex::build(Metric::L2, d, fixed, &ids[..500], &keys[..500 * d]).unwrap();
    assert_eq!(f.calibrate_with(&q).unwrap(), None);
    // Saved and loaded with the index; a different target recalibrates later.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.hnsw");
    let (gi, gk) = (&ids[..1000], &keys[..1000 * d]);
    let (g, _) = HnswIndex::open_or_build(&path, Metric::L2, d, tuned, gi, gk).unwrap();
    let (back, how) = HnswIndex::open_or_build(&path, Metric::L2, d, tuned, gi, gk).unwrap();
    assert_eq!(how, Opened::Loaded);
    assert_eq!(back.calibration(), g.calibration());
    assert_eq!(back.expansion_search(), g.expansion_search());
    let other = {
        let mut o = tuned;
        o.target_recall = Some(0.99);
        o
    };
    let (back, how) = HnswIndex::open_or_build(&path, Metric::L2, d, other, gi, gk).unwrap();
    assert_eq!(how, Opened::Loaded);
    assert_eq!((back.calibration(), back.expansion_search()), (None, 8));
    // Bad targets are typed errors.
    for bad in [0.0, 1.5, f32::NAN] {
        let o = {
            let mut o = HnswOptions::default();
            o.target_recall = Some(bad);
            o
        };
        assert!(matches!(
            HnswIndex::new(Metric::L2, d, o),
            Err(IndexError::InvalidOptions(_))
        ));
    }
}

#[test]
fn calibration_lowers_ef_on_easy_data() {
    // Keys on a 3-d subspace: the default start (ef 256) is far more than
    // the target needs; calibration halves it while the target holds.
    let (n, d) = (6000usize, 32usize);
    let ids: Vec<MemoryId> = (1..=n as u64).collect();
    let keys = flat_vecs(51, n, d);
    let q = flat_vecs(52, 200, d);
    let mut h = HnswIndex::build(Metric::L2, d, HnswOptions::default(), &ids, &keys).unwrap();
    let c = h.calibration().expect("calibrated on build");
    let fresh = recall_for(&h, &ids, &keys, d, &q);
    println!("calibrated: {c:?}, fresh-query recall {fresh:.3}");
    assert!(c.expansion_search < 256 && c.expansion_search >= 16, "{c:?}");
    assert!(c.recall >= 0.95, "{c:?}");
    assert!(fresh >= 0.93, "fresh-query recall {fresh}");
    // The fixed default (no target) keeps 256.
    h.set_expansion_search(256);
    assert!(recall_for(&h, &ids, &keys, d, &q) >= fresh);

    // Calibration measures unfiltered searches: filtered walks at a lowered
    // ef must hold up too. Random keys and a low target (0.5) give a low ef
    // (16 here, unfiltered recall 0.87); a tag held by 1 key in 50 still
    // gets k matches, nearly all right (1.0 measured: usearch's filtered walk
    // goes on through the keys that fail the filter).
    let keys = rand_vecs(53, n * d);
    let q = rand_vecs(54, 200 * d);
    let low = {
        let mut o = HnswOptions::default();
        o.target_recall = Some(0.5);
        o
    };
    let h = HnswIndex::build(Metric::L2, d, low, &ids, &keys).unwrap();
    let ef = h.expansion_search();
    let unfiltered = recall_for(&h, &ids, &keys, d, &q);
    let tagged = |id: MemoryId| id.is_multiple_of(50);
    let got = h.search(&q, 8, Some(&tagged)).unwrap();
    let mut hit = 0;
    for (i, row) in got.iter().enumerate() {
        assert_eq!(row.len(), 8, "query {i}: {row:?}");
        assert!(row.iter().all(|(_, id)| tagged(*id)));
        let want = brute(Metric::L2, &q[i * d..(i + 1) * d], &ids, &keys, d, 8, &tagged);
        hit += row.iter().filter(|(_, id)| want.iter().any(|w| w.1 == *id)).count();
    }
    let filtered = hit as f64 / (8 * got.len()) as f64;
    println!("target 0.5: ef {ef}, unfiltered recall {unfiltered:.3}, filtered (1 in 50) {filtered:.3}");
    assert!(ef < 256, "ef {ef}");
    assert!(filtered >= 0.9, "filtered recall {filtered}");
}
