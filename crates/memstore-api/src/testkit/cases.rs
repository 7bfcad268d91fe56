//! The conformance cases. Each takes a maker of fresh harnesses; see
//! [`crate::conformance_suite!`] for how a backend runs them all.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::{Just, Strategy, any, prop_oneof};
use proptest::test_runner::{Config as PropConfig, TestRunner};

use super::Harness;
use super::util::*;
use crate::{
    Batch, ChangeBatch, Error, EvictionPolicy, InMemoryStore, MemoryConfig, MemoryId, MemoryStore, Metric, Neighbors,
    TagFilter, Tags,
};

/// A maker of fresh harnesses (each one an empty location).
pub type Make<'a, H> = &'a (dyn Fn() -> H + Sync);

async fn fresh<H: Harness>(make: Make<'_, H>, config: MemoryConfig) -> (H, H::Store) {
    let h = make();
    let s = h.open(config).await.expect("open a fresh store");
    (h, s)
}

async fn reopen<H: Harness>(h: &H, s: H::Store, config: MemoryConfig) -> H::Store {
    h.close(s).await.expect("close");
    h.open(config).await.expect("reopen")
}

fn lambda_cfg(dk: usize, dv: usize, lambda: f64) -> MemoryConfig {
    cfg(dk, dv).with_eviction(EvictionPolicy::Lrfu { lambda })
}

/// The configuration survives and is reported unchanged.
pub async fn config_is_kept<H: Harness>(make: Make<'_, H>) {
    let c = cfg(3, 2)
        .with_metric(Metric::Cosine)
        .with_capacity(100)
        .with_eviction(EvictionPolicy::Lrfu { lambda: 0.25 })
        .with_thresholds(0.1, 0.4);
    let (h, s) = fresh(make, c.clone()).await;
    assert_eq!(s.config(), &c);
    ins(&s, &[1.0, 0.0, 0.0], &[1.0, 2.0], 1).await;
    let s = reopen(&h, s, c.clone()).await;
    assert_eq!(s.config(), &c);
    assert_eq!(s.len().await.unwrap(), 1);
}

/// Impossible configurations are refused with `InvalidConfig`.
pub async fn invalid_config_is_rejected<H: Harness>(make: Make<'_, H>) {
    let bad = [
        cfg(0, 2),
        cfg(2, 0),
        cfg(2, 2).with_thresholds(0.5, 0.1),
        cfg(2, 2).with_thresholds(0.0, f32::NAN),
        cfg(2, 2).with_capacity(0),
        cfg(2, 2).with_eviction(EvictionPolicy::Lrfu { lambda: -1.0 }),
        cfg(2, 2).with_eviction(EvictionPolicy::Lrfu { lambda: f64::INFINITY }),
    ];
    for c in bad {
        let h = make();
        match h.open(c.clone()).await {
            Err(Error::InvalidConfig(_)) => {}
            Err(e) => panic!("{c:?}: expected InvalidConfig, got {e}"),
            Ok(_) => panic!("{c:?}: accepted an invalid configuration"),
        }
    }
}

async fn reopen_mismatch<H: Harness>(make: Make<'_, H>, other: MemoryConfig, field: &str) {
    let c = cfg(4, 2);
    let (h, s) = fresh(make, c.clone()).await;
    let ids = ins(&s, &[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0], 3).await;
    let before = s.get(&ids).await.unwrap();
    h.close(s).await.unwrap();
    match h.open(other).await {
        Err(Error::ConfigMismatch { field: f, .. }) => assert_eq!(f, field),
        Err(e) => panic!("expected ConfigMismatch on {field}, got {e}"),
        Ok(_) => panic!("reopened with a different {field}"),
    }
    let s = h.open(c).await.expect("the original config still opens");
    assert_eq!(s.get(&ids).await.unwrap(), before);
}

/// Reopening with another key dimension is a typed error and changes nothing.
pub async fn reopen_with_other_key_dim_fails<H: Harness>(make: Make<'_, H>) {
    reopen_mismatch(make, cfg(8, 2), "key_dim").await;
}

/// Reopening with another value dimension is a typed error.
pub async fn reopen_with_other_value_dim_fails<H: Harness>(make: Make<'_, H>) {
    reopen_mismatch(make, cfg(4, 3), "value_dim").await;
}

/// Reopening with another metric is a typed error.
pub async fn reopen_with_other_metric_fails<H: Harness>(make: Make<'_, H>) {
    reopen_mismatch(make, cfg(4, 2).with_metric(Metric::Cosine), "metric").await;
}

/// After a mix of every write, reopening returns exactly what was committed,
/// and ids keep increasing.
pub async fn reopen_keeps_everything<H: Harness>(make: Make<'_, H>) {
    let c = cfg(2, 2).with_thresholds(0.3, 1.0).with_capacity(50);
    let (h, s) = fresh(make, c.clone()).await;
    let mut rng = Rng::new(7);
    let keys: Vec<f32> = rng.vecs(30, 2).iter().map(|x| x * 10.0).collect();
    let vals = rng.vecs(30, 2);
    let t: Vec<Vec<String>> = (0..30)
        .map(|i| tags(&[if i % 2 == 0 { "even" } else { "odd" }]))
        .collect();
    let ids = ins_tagged(&s, &keys, &vals, &t, 1).await;
    s.touch(&ids[..5], 2).await.unwrap();
    s.update_values(&ids[5..7], v(&[0.5, 0.5, -1.0, 2.0], 2)).await.unwrap();
    s.delete(&ids[7..9]).await.unwrap();
    let lk = [keys[20] + 0.1, keys[21], 100.0, 100.0, keys[30] + 0.5, keys[31]];
    s.learn(
        Batch::new(v(&lk, 2), v(&[1.0; 6], 2)).with_tags(Tags::Same(&tags(&["l"]))),
        3,
        4,
    )
    .await
    .unwrap();
    s.evict(25).await.unwrap();
    let q = rng.vecs(5, 2);
    let res_before = s.search(v(&q, 2), 4, None).await.unwrap();
    let (mems, stats) = dump(&s).await;
    s.flush().await.unwrap();
    let s = reopen(&h, s, c).await;
    let (mems2, stats2) = dump(&s).await;
    assert_eq!(mems, mems2);
    assert_eq!(stats, stats2);
    assert_eq!(s.search(v(&q, 2), 4, None).await.unwrap(), res_before);
    let new = ins(&s, &[0.0, 0.0], &[0.0, 0.0], 4).await;
    assert_eq!(new, vec![stats.next_id], "ids are never reused across a reopen");
}

/// Tunable fields may change on reopen; a new LRFU λ reorders eviction.
pub async fn reopen_with_new_tunables<H: Harness>(make: Make<'_, H>) {
    let c = lambda_cfg(1, 1, 0.0);
    let (h, s) = fresh(make, c.clone()).await;
    let a = ins(&s, &[0.0], &[0.0], 1).await[0];
    let b = ins(&s, &[1.0], &[0.0], 1).await[0];
    s.touch(&[a, a, a], 1).await.unwrap();
    s.touch(&[b], 10).await.unwrap();
    // Under LFU (λ = 0) `b` (2 accesses) would go before `a` (4); under LRU `a` goes.
    let c2 = lambda_cfg(1, 1, 1.0).with_thresholds(0.0, 5.0).with_capacity(10);
    let s = reopen(&h, s, c2.clone()).await;
    assert_eq!(s.config(), &c2);
    assert_eq!(s.evict(1).await.unwrap(), 1);
    assert!(
        s.get(&[a]).await.is_err(),
        "the least recent memory is evicted under the new λ"
    );
    assert!(s.get(&[b]).await.is_ok());
}

/// Ids are assigned in row order, increase across batches and are never reused.
pub async fn insert_assigns_increasing_ids<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 1)).await;
    assert_eq!(ins(&s, &[1.0, 2.0, 3.0], &[0.0; 3], 1).await, vec![1, 2, 3]);
    assert_eq!(ins(&s, &[4.0, 5.0], &[0.0; 2], 1).await, vec![4, 5]);
    assert_eq!(s.delete(&[5]).await.unwrap(), 1);
    assert_eq!(ins(&s, &[6.0], &[0.0], 2).await, vec![6]);
}

/// `get` returns keys, values, bookkeeping and tag counts, in the order asked.
pub async fn get_returns_what_was_inserted<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(2, 3)).await;
    let t = vec![tags(&["a", "a", "b"]), vec![]];
    let ids = ins_tagged(&s, &[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0, 9.0, 10.0], &t, 42).await;
    let got = s.get(&[ids[1], ids[0]]).await.unwrap();
    assert_eq!(got[0].id, ids[1]);
    assert_eq!(got[0].key, vec![3.0, 4.0]);
    assert_eq!(got[0].value, vec![8.0, 9.0, 10.0]);
    assert!(got[0].tags.is_empty());
    let m = &got[1];
    assert_eq!(
        (m.id, m.created, m.last_access, m.access_count, m.crf),
        (ids[0], 42, 42, 1, 1.0)
    );
    assert_eq!(m.key, vec![1.0, 2.0]);
    assert_eq!(m.value, vec![5.0, 6.0, 7.0]);
    assert_eq!(m.tags, BTreeMap::from([("a".to_string(), 2), ("b".to_string(), 1)]));
}

/// Unknown ids are a typed error naming the id.
pub async fn get_unknown_id_fails<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 1)).await;
    ins(&s, &[1.0], &[1.0], 1).await;
    assert!(matches!(s.get(&[1, 999]).await, Err(Error::UnknownId(999))));
    assert!(matches!(s.get(&[0]).await, Err(Error::UnknownId(0))));
}

/// An empty batch is accepted and changes nothing.
pub async fn insert_empty_batch<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(2, 2)).await;
    assert!(ins(&s, &[], &[], 1).await.is_empty());
    assert_eq!(s.len().await.unwrap(), 0);
    assert_eq!(s.stats().await.unwrap().next_id, 1);
    assert_eq!(ins(&s, &[1.0, 1.0], &[1.0, 1.0], 1).await, vec![1]);
}

/// Keys of the wrong dimension are refused.
pub async fn insert_rejects_key_dim_mismatch<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(4, 2)).await;
    let r = s.insert(Batch::new(v(&[1.0; 3], 3), v(&[1.0; 2], 2)), 1).await;
    assert!(
        matches!(
            r,
            Err(Error::DimensionMismatch {
                what: "keys",
                expected: 4,
                got: 3
            })
        ),
        "{r:?}"
    );
    assert_eq!(s.len().await.unwrap(), 0);
}

/// Values of the wrong dimension are refused.
pub async fn insert_rejects_value_dim_mismatch<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(4, 2)).await;
    let r = s.insert(Batch::new(v(&[1.0; 4], 4), v(&[1.0; 3], 3)), 1).await;
    assert!(
        matches!(
            r,
            Err(Error::DimensionMismatch {
                what: "values",
                expected: 2,
                got: 3
            })
        ),
        "{r:?}"
    );
    assert!(matches!(crate::Vectors::new(&[1.0; 5], 2), Err(Error::Shape(_))));
}

/// Keys and values must have the same number of rows.
pub async fn insert_rejects_row_count_mismatch<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 1)).await;
    let r = s.insert(Batch::new(v(&[1.0, 2.0], 1), v(&[1.0], 1)), 1).await;
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    assert_eq!(s.len().await.unwrap(), 0);
}

/// NaN and infinities are refused, naming where they are.
pub async fn insert_rejects_non_finite<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(2, 1)).await;
    let keys = [0.0, 0.0, 1.0, 1.0, 2.0, f32::NAN];
    let r = s.insert(Batch::new(v(&keys, 2), v(&[0.0; 3], 1)), 1).await;
    assert!(
        matches!(
            r,
            Err(Error::NonFinite {
                what: "keys",
                row: 2,
                col: 1
            })
        ),
        "{r:?}"
    );
    let r = s.insert(Batch::new(v(&[0.0; 2], 2), v(&[f32::INFINITY], 1)), 1).await;
    assert!(
        matches!(
            r,
            Err(Error::NonFinite {
                what: "values",
                row: 0,
                col: 0
            })
        ),
        "{r:?}"
    );
    assert_eq!(s.len().await.unwrap(), 0);
}

/// Per-row tags must match the row count.
pub async fn insert_rejects_bad_tag_count<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 1)).await;
    let t = vec![tags(&["a"])];
    let r = s
        .insert(
            Batch::new(v(&[1.0, 2.0], 1), v(&[1.0, 2.0], 1)).with_tags(Tags::PerRow(&t)),
            1,
        )
        .await;
    assert!(matches!(r, Err(Error::TagCount { got: 1, rows: 2 })), "{r:?}");
    assert_eq!(s.len().await.unwrap(), 0);
}

/// A rejected batch leaves every memory, counter and the id sequence untouched.
pub async fn rejected_batches_change_nothing<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(2, 1).with_thresholds(0.5, 1.0).with_capacity(3)).await;
    ins(&s, &[0.0, 0.0, 5.0, 5.0], &[1.0, 2.0], 1).await;
    let before = dump(&s).await;
    let nan = [1.0, 1.0, f32::NAN, 0.0];
    assert!(s.insert(Batch::new(v(&nan, 2), v(&[0.0, 0.0], 1)), 2).await.is_err());
    assert!(s.learn(Batch::new(v(&nan, 2), v(&[0.0, 0.0], 1)), 2, 2).await.is_err());
    assert!(
        s.learn(Batch::new(v(&[0.0, 0.1], 2), v(&[0.0], 1)), 2, 0)
            .await
            .is_err()
    );
    assert!(s.delete(&[1, 77]).await.is_err());
    assert!(s.touch(&[2, 77], 3).await.is_err());
    assert!(s.update_values(&[1, 77], v(&[1.0, 1.0], 1)).await.is_err());
    assert!(s.update_values(&[1, 2], v(&[1.0, f32::NAN], 1)).await.is_err());
    assert_eq!(dump(&s).await, before);
    assert_eq!(ins(&s, &[9.0, 9.0], &[0.0], 4).await, vec![3]);
}

fn check_against_oracle(
    metric: Metric,
    mems: &[(MemoryId, Vec<f32>)],
    q: &[f32],
    dk: usize,
    k: usize,
    got: &Neighbors,
) {
    let n = q.len() / dk;
    for i in 0..n {
        let qi = &q[i * dk..(i + 1) * dk];
        let want = oracle_topk(metric, mems, qi, k);
        for j in 0..k {
            match want.get(j) {
                None => assert_eq!(got.id(i, j), None, "query {i} slot {j} should be empty"),
                Some(&(_, wd)) => {
                    let id = got.id(i, j).unwrap_or_else(|| panic!("query {i} slot {j} is empty"));
                    let key = &mems.iter().find(|(m, _)| *m == id).expect("a stored id").1;
                    let d = oracle_distance(metric, qi, key);
                    assert!(
                        (d - wd).abs() < 1e-4,
                        "query {i} slot {j}: id {id} at {d}, expected distance {wd}"
                    );
                    assert!((got.distance(i, j) as f64 - d).abs() < 1e-4, "reported distance is off");
                    assert_eq!(got.key(i, j), key.as_slice());
                }
            }
        }
    }
}

async fn search_matches<H: Harness>(make: Make<'_, H>, metric: Metric, n: usize, dk: usize, q: usize, k: usize) {
    let (_h, s) = fresh(make, cfg(dk, 1).with_metric(metric)).await;
    let mut rng = Rng::new(n as u64 * 31 + dk as u64);
    let keys = rng.vecs(n, dk);
    let mut ids = Vec::new();
    for chunk in keys.chunks(4096 * dk) {
        ids.extend(ins(&s, chunk, &vec![0.0; chunk.len() / dk], 1).await);
    }
    let mems: Vec<(MemoryId, Vec<f32>)> = ids.iter().zip(keys.chunks(dk)).map(|(i, k)| (*i, k.to_vec())).collect();
    let queries = rng.vecs(q, dk);
    let got = s.search(v(&queries, dk), k, None).await.unwrap();
    assert_eq!((got.n, got.k), (q, k));
    check_against_oracle(metric, &mems, &queries, dk, k, &got);
}

/// L2 search returns the exact top-k.
pub async fn search_l2_matches_brute_force<H: Harness>(make: Make<'_, H>) {
    search_matches(make, Metric::L2, 300, 8, 20, 5).await;
}

/// Cosine search returns the exact top-k.
pub async fn search_cosine_matches_brute_force<H: Harness>(make: Make<'_, H>) {
    search_matches(make, Metric::Cosine, 300, 8, 20, 5).await;
}

/// Inner-product search returns the exact top-k.
pub async fn search_inner_product_matches_brute_force<H: Harness>(make: Make<'_, H>) {
    search_matches(make, Metric::InnerProduct, 300, 8, 20, 5).await;
}

/// A batch of many queries (the parallel path) is exact.
pub async fn search_large_batch_matches_brute_force<H: Harness>(make: Make<'_, H>) {
    search_matches(make, Metric::L2, 2000, 16, 300, 8).await;
}

/// Large batches (the blocked-GEMM path) agree exactly with the reference on
/// every metric, with many duplicate keys (ties at the cut are ordered by id,
/// whatever the row order) and with a tag filter.
pub async fn search_large_batch_with_ties_and_filters<H: Harness>(make: Make<'_, H>) {
    for metric in [Metric::L2, Metric::Cosine, Metric::InnerProduct] {
        let c = cfg(16, 1).with_metric(metric);
        let (_h, s) = fresh(make, c.clone()).await;
        let r = InMemoryStore::new(c).unwrap();
        let mut rng = Rng::new(77);
        let base = rng.vecs(125, 16);
        // 2000 keys, each distinct key 16 times: ties run past any candidate
        // slack, and deletes reorder the rows against the ids.
        let keys: Vec<f32> = (0..16).flat_map(|_| base.iter().copied()).collect();
        let tagsets: Vec<Vec<String>> = (0..2000)
            .map(|i| tags(if i % 3 == 0 { &["a"] } else { &["b"] }))
            .collect();
        let vals = vec![0.5; 2000];
        assert_eq!(
            ins_tagged(&s, &keys, &vals, &tagsets, 1).await,
            ins_tagged(&r, &keys, &vals, &tagsets, 1).await
        );
        let gone: Vec<MemoryId> = (1..=60).collect();
        s.delete(&gone).await.unwrap();
        r.delete(&gone).await.unwrap();
        let again = ins_tagged(&s, &keys[..60 * 16], &vals[..60], &tagsets[..60], 2).await;
        assert_eq!(
            again,
            ins_tagged(&r, &keys[..60 * 16], &vals[..60], &tagsets[..60], 2).await
        );
        let mut queries = rng.vecs(200, 16);
        queries[..16].copy_from_slice(&base[..16]); // a query equal to a stored key
        let filter = TagFilter::Any(tags(&["a"]));
        for f in [None, Some(&filter)] {
            let got = s.search(v(&queries, 16), 6, f).await.unwrap();
            let want = r.search(v(&queries, 16), 6, f).await.unwrap();
            for i in 0..200 {
                for j in 0..6 {
                    assert_eq!(
                        (got.id(i, j), got.distance(i, j).to_bits()),
                        (want.id(i, j), want.distance(i, j).to_bits()),
                        "{metric:?} filter {} query {i} rank {j}",
                        f.is_some()
                    );
                }
            }
        }
    }
}

/// Large batches see every change since the previous search: the batched
/// path may keep derived data about the keys (the 8-bit quantisation that
/// memstore-engine's `KeyCache` keeps), which must never answer for keys that
/// changed. Searches, deletes the nearest answers, inserts copies of some
/// queries, and searches again, each answer against the reference.
pub async fn search_large_batch_sees_changes<H: Harness>(make: Make<'_, H>) {
    for metric in [Metric::L2, Metric::Cosine] {
        let c = cfg(16, 1).with_metric(metric);
        let (_h, s) = fresh(make, c.clone()).await;
        let r = InMemoryStore::new(c).unwrap();
        let mut rng = Rng::new(91);
        let keys = rng.vecs(3000, 16);
        let vals = vec![0.25; 3000];
        assert_eq!(ins(&s, &keys, &vals, 1).await, ins(&r, &keys, &vals, 1).await);
        let queries = rng.vecs(256, 16);
        let same = |got: &Neighbors, want: &Neighbors, step: &str| {
            for i in 0..256 {
                for j in 0..4 {
                    assert_eq!(
                        (got.id(i, j), got.distance(i, j).to_bits()),
                        (want.id(i, j), want.distance(i, j).to_bits()),
                        "{metric:?} {step}: query {i} rank {j}"
                    );
                }
            }
        };
        let first = s.search(v(&queries, 16), 4, None).await.unwrap();
        same(&first, &r.search(v(&queries, 16), 4, None).await.unwrap(), "before");
        // Delete every query's nearest memory, then store as many copies of
        // queries: the next answers all change, while the number of keys
        // stays the same (derived data must notice more than a count).
        let nearest: BTreeSet<MemoryId> = (0..256).filter_map(|i| first.id(i, 0)).collect();
        let nearest: Vec<MemoryId> = nearest.into_iter().collect();
        let d = nearest.len();
        assert_eq!(s.delete(&nearest).await.unwrap(), r.delete(&nearest).await.unwrap());
        let copies = &queries[..d * 16];
        assert_eq!(
            ins(&s, copies, &vals[..d], 2).await,
            ins(&r, copies, &vals[..d], 2).await
        );
        assert_eq!(s.stats().await.unwrap().len, 3000);
        let second = s.search(v(&queries, 16), 4, None).await.unwrap();
        same(&second, &r.search(v(&queries, 16), 4, None).await.unwrap(), "after");
        for i in 0..256 {
            assert!(
                !nearest.contains(&second.id(i, 1).unwrap()),
                "{metric:?}: a deleted id came back"
            );
        }
        assert!(
            (0..d).all(|i| second.distance(i, 0) <= 1e-6),
            "{metric:?}: a stored copy was missed"
        );
    }
}

/// One query against a large store (the row-parallel path) is exact.
pub async fn search_large_store_single_query<H: Harness>(make: Make<'_, H>) {
    search_matches(make, Metric::L2, 20_000, 16, 1, 8).await;
}

/// Fewer memories than `k`: rows are padded with empty slots, never short.
pub async fn search_pads_missing_slots<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 2)).await;
    ins(&s, &[1.0, 2.0, 3.0], &[1.0; 6], 1).await;
    let r = s.search(v(&[0.0, 10.0], 1), 5, None).await.unwrap();
    assert_eq!(
        (r.n, r.k, r.ids.len(), r.distances.len(), r.keys.len(), r.values.len()),
        (2, 5, 10, 10, 10, 20)
    );
    assert_eq!(r.row_ids(0), &[Some(1), Some(2), Some(3), None, None]);
    assert_eq!(r.row_ids(1), &[Some(3), Some(2), Some(1), None, None]);
    for i in 0..2 {
        for j in 3..5 {
            assert_eq!(r.distance(i, j), f32::INFINITY);
            assert_eq!(r.key(i, j), &[0.0]);
            assert_eq!(r.value(i, j), &[0.0, 0.0]);
        }
    }
    assert_eq!(r.distance(1, 0), 7.0);
}

/// An empty store answers with empty slots.
pub async fn search_empty_store<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(2, 1)).await;
    let r = s.search(v(&[0.0, 0.0], 2), 3, None).await.unwrap();
    assert_eq!(r.row_ids(0), &[None, None, None]);
    assert!(r.distances.iter().all(|d| *d == f32::INFINITY));
}

/// `k = 0` is a typed error.
pub async fn search_rejects_k_zero<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(2, 1)).await;
    assert!(matches!(s.search(v(&[0.0, 0.0], 2), 0, None).await, Err(Error::ZeroK)));
}

/// A `k` whose answer could not be addressed (rows × k slots overflow) is a
/// typed error for `search` and `learn`, not a panic, and changes nothing.
pub async fn unaddressable_k_is_refused<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(2, 1)).await;
    ins(&s, &[0.0, 0.0], &[0.0], 1).await;
    let before = dump(&s).await;
    for k in [usize::MAX, usize::MAX / 4] {
        let r = s.search(v(&[0.0, 0.0, 1.0, 1.0], 2), k, None).await;
        assert!(matches!(r, Err(Error::Shape(_))), "search, k = {k}: {r:?}");
        let r = s
            .learn(Batch::new(v(&[0.0, 0.1, 5.0, 5.0], 2), v(&[1.0, 2.0], 1)), 2, k)
            .await;
        assert!(matches!(r, Err(Error::Shape(_))), "learn, k = {k}: {r:?}");
    }
    assert_eq!(dump(&s).await, before);
}

/// Queries of the wrong dimension or with NaN are refused.
pub async fn search_rejects_bad_queries<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(2, 1)).await;
    ins(&s, &[0.0, 0.0], &[0.0], 1).await;
    let r = s.search(v(&[0.0, 0.0, 0.0], 3), 1, None).await;
    assert!(
        matches!(
            r,
            Err(Error::DimensionMismatch {
                what: "queries",
                expected: 2,
                got: 3
            })
        ),
        "{r:?}"
    );
    let r = s.search(v(&[0.0, f32::NAN], 2), 1, None).await;
    assert!(
        matches!(
            r,
            Err(Error::NonFinite {
                what: "queries",
                row: 0,
                col: 1
            })
        ),
        "{r:?}"
    );
}

/// Results carry each memory's key and current value.
pub async fn search_returns_keys_and_values<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(2, 3)).await;
    let mut rng = Rng::new(3);
    let keys = rng.vecs(50, 2);
    let vals = rng.vecs(50, 3);
    let ids = ins(&s, &keys, &vals, 1).await;
    s.update_values(&ids[..10], v(&[1.0; 30], 3)).await.unwrap();
    let q = rng.vecs(10, 2);
    let r = s.search(v(&q, 2), 6, None).await.unwrap();
    for i in 0..10 {
        for j in 0..6 {
            let id = r.id(i, j).unwrap();
            let m = &s.get(&[id]).await.unwrap()[0];
            assert_eq!(r.key(i, j), m.key.as_slice());
            assert_eq!(r.value(i, j), m.value.as_slice());
        }
    }
}

/// A tag filter is applied during the search: k matches come back even when
/// many nearer memories do not match.
pub async fn search_filter_any_returns_k<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 1)).await;
    let near: Vec<f32> = (0..200).map(|i| i as f32 * 0.01).collect();
    ins(&s, &near, &vec![0.0; 200], 1).await;
    let far: Vec<f32> = (0..10).map(|i| 100.0 + i as f32).collect();
    let t: Vec<Vec<String>> = (0..10).map(|_| tags(&["far"])).collect();
    let far_ids = ins_tagged(&s, &far, &[1.0; 10], &t, 1).await;
    let r = s
        .search(v(&[0.0], 1), 5, Some(&TagFilter::Any(tags(&["far", "nope"]))))
        .await
        .unwrap();
    assert_eq!(
        r.row_ids(0),
        far_ids[..5].iter().map(|i| Some(*i)).collect::<Vec<_>>().as_slice()
    );
    assert_eq!(r.distance(0, 0), 100.0);
    let r = s
        .search(v(&[0.0], 1), 12, Some(&TagFilter::Any(tags(&["far"]))))
        .await
        .unwrap();
    assert_eq!(r.row_ids(0).iter().flatten().count(), 10);
    assert_eq!(r.id(0, 10), None);
}

/// `All` requires every tag; `Any` one of them.
pub async fn search_filter_all<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 1)).await;
    let t = vec![tags(&["a"]), tags(&["b"]), tags(&["a", "b"]), vec![]];
    let ids = ins_tagged(&s, &[1.0, 2.0, 3.0, 4.0], &[0.0; 4], &t, 1).await;
    let all = s
        .search(v(&[0.0], 1), 4, Some(&TagFilter::All(tags(&["a", "b"]))))
        .await
        .unwrap();
    assert_eq!(all.row_ids(0), &[Some(ids[2]), None, None, None]);
    let any = s
        .search(v(&[0.0], 1), 4, Some(&TagFilter::Any(tags(&["a", "b"]))))
        .await
        .unwrap();
    assert_eq!(any.row_ids(0), &[Some(ids[0]), Some(ids[1]), Some(ids[2]), None]);
}

/// A tag nobody carries matches nothing (not an error).
pub async fn search_filter_unknown_tag_is_empty<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 1)).await;
    ins_tagged(&s, &[1.0], &[0.0], &[tags(&["a"])], 1).await;
    let r = s
        .search(v(&[0.0], 1), 2, Some(&TagFilter::Any(tags(&["zzz"]))))
        .await
        .unwrap();
    assert_eq!(r.row_ids(0), &[None, None]);
}

/// Searching does not change access bookkeeping.
pub async fn search_does_not_touch<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 1)).await;
    let ids = ins(&s, &[1.0, 2.0], &[0.0, 0.0], 5).await;
    let before = s.get(&ids).await.unwrap();
    for _ in 0..3 {
        s.search(v(&[1.0], 1), 2, None).await.unwrap();
    }
    assert_eq!(s.get(&ids).await.unwrap(), before);
}

/// Equal distances are ordered by id.
pub async fn search_breaks_ties_by_id<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(2, 1)).await;
    let ids = ins(&s, &[1.0, 1.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0], &[0.0; 4], 1).await;
    let r = s.search(v(&[1.0, 1.0], 2), 4, None).await.unwrap();
    assert_eq!(r.row_ids(0), &[Some(ids[0]), Some(ids[2]), Some(ids[3]), Some(ids[1])]);
}

/// Deleted memories are gone from get, search and len; repeated ids count once.
pub async fn delete_removes_memories<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 1)).await;
    let ids = ins(&s, &[1.0, 2.0, 3.0, 4.0], &[0.0; 4], 1).await;
    assert_eq!(s.delete(&[ids[1], ids[1], ids[2]]).await.unwrap(), 2);
    assert_eq!(s.len().await.unwrap(), 2);
    assert!(matches!(s.get(&[ids[1]]).await, Err(Error::UnknownId(_))));
    let r = s.search(v(&[2.5], 1), 4, None).await.unwrap();
    assert_eq!(r.row_ids(0), &[Some(ids[0]), Some(ids[3]), None, None]);
    assert_eq!(s.stats().await.unwrap().counters.deleted, 2);
    assert_eq!(s.delete(&[]).await.unwrap(), 0);
}

/// A delete naming an unknown id fails whole.
pub async fn delete_unknown_id_changes_nothing<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 1)).await;
    let ids = ins(&s, &[1.0, 2.0], &[0.0; 2], 1).await;
    assert!(matches!(s.delete(&[ids[0], 999]).await, Err(Error::UnknownId(999))));
    assert_eq!(s.len().await.unwrap(), 2);
    s.delete(&[ids[0]]).await.unwrap();
    assert!(
        matches!(s.delete(&[ids[0]]).await, Err(Error::UnknownId(_))),
        "deleting twice fails"
    );
}

/// Deltas are added to stored values; a repeated id gets every delta.
pub async fn update_values_adds_deltas<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 2)).await;
    let ids = ins(&s, &[1.0, 2.0], &[1.0, 2.0, 3.0, 4.0], 1).await;
    s.update_values(&[ids[0], ids[1], ids[0]], v(&[0.5, 0.5, -3.0, 1.0, 0.25, -1.0], 2))
        .await
        .unwrap();
    let got = s.get(&ids).await.unwrap();
    assert_eq!(got[0].value, vec![1.75, 1.5]);
    assert_eq!(got[1].value, vec![0.0, 5.0]);
    assert_eq!(got[0].access_count, 1, "a value update is not an access");
    let r = s.search(v(&[2.0], 1), 1, None).await.unwrap();
    assert_eq!(r.value(0, 0), &[0.0, 5.0]);
}

/// Bad value updates are refused whole.
pub async fn update_values_rejects_bad_input<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 2)).await;
    let ids = ins(&s, &[1.0, 2.0], &[1.0, 2.0, 3.0e38, 4.0], 1).await;
    let before = dump(&s).await;
    let r = s.update_values(&[ids[0], 9], v(&[1.0; 4], 2)).await;
    assert!(matches!(r, Err(Error::UnknownId(9))), "{r:?}");
    let r = s.update_values(&[ids[0]], v(&[1.0; 3], 3)).await;
    assert!(
        matches!(r, Err(Error::DimensionMismatch { what: "deltas", .. })),
        "{r:?}"
    );
    let r = s.update_values(&[ids[0], ids[1]], v(&[1.0; 2], 2)).await;
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    let r = s.update_values(&[ids[0]], v(&[f32::NAN, 0.0], 2)).await;
    assert!(matches!(r, Err(Error::NonFinite { what: "deltas", .. })), "{r:?}");
    let r = s.update_values(&[ids[0], ids[1]], v(&[1.0, 1.0, 3.0e38, 0.0], 2)).await;
    assert!(matches!(r, Err(Error::NonFinite { .. })), "overflow to infinity: {r:?}");
    assert_eq!(dump(&s).await, before);
}

/// `touch` applies `crf = 1 + 2^(−λ·Δt)·crf` and counts the access.
pub async fn touch_updates_lrfu_bookkeeping<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, lambda_cfg(1, 1, 0.5)).await;
    let id = ins(&s, &[1.0], &[1.0], 0).await[0];
    s.touch(&[id], 2).await.unwrap();
    let m = &s.get(&[id]).await.unwrap()[0];
    assert_eq!((m.crf, m.last_access, m.access_count, m.created), (1.5, 2, 2, 0));
    s.touch(&[id, id], 4).await.unwrap();
    let m = &s.get(&[id]).await.unwrap()[0];
    assert_eq!((m.crf, m.last_access, m.access_count), (2.75, 4, 4));
    s.touch(&[], 9).await.unwrap();
}

/// A touch naming an unknown id fails whole.
pub async fn touch_unknown_id_changes_nothing<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 1)).await;
    let ids = ins(&s, &[1.0], &[1.0], 1).await;
    assert!(matches!(s.touch(&[ids[0], 5], 3).await, Err(Error::UnknownId(5))));
    assert_eq!(s.get(&ids).await.unwrap()[0].access_count, 1);
}

/// On an empty store every observation is inserted and no neighbours are found.
pub async fn learn_into_empty_store_inserts<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 1).with_thresholds(0.1, 0.5)).await;
    let r = s
        .learn(Batch::new(v(&[0.0, 10.0, 20.0], 1), v(&[1.0, 2.0, 3.0], 1)), 1, 2)
        .await
        .unwrap();
    assert_eq!(r.row_ids(0), &[None, None]);
    assert_eq!(r.row_ids(2), &[Some(2), Some(1)], "row 2 sees rows 0 and 1");
    assert_eq!(s.len().await.unwrap(), 3);
    assert_eq!(s.stats().await.unwrap().counters.inserted, 3);
}

/// An observation farther than `novelty` from every neighbour is inserted;
/// the neighbours are not touched.
pub async fn learn_inserts_novel_observations<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(2, 1).with_thresholds(0.1, 1.0)).await;
    let a = ins(&s, &[0.0, 0.0], &[1.0], 1).await[0];
    let r = s
        .learn(Batch::new(v(&[3.0, 4.0], 2), v(&[2.0], 1)), 5, 3)
        .await
        .unwrap();
    assert_eq!(r.row_ids(0), &[Some(a), None, None]);
    assert_eq!(r.distance(0, 0), 5.0);
    assert_eq!(r.value(0, 0), &[1.0]);
    assert_eq!(s.len().await.unwrap(), 2);
    let m = &s.get(&[a]).await.unwrap()[0];
    assert_eq!(m.access_count, 1, "a far neighbour is not touched");
    let new = &s.get(&[a + 1]).await.unwrap()[0];
    assert_eq!(
        (new.key.as_slice(), new.value.as_slice(), new.created),
        (&[3.0, 4.0][..], &[2.0][..], 5)
    );
}

/// Neighbours between the thresholds are touched; nothing is inserted.
pub async fn learn_touches_neighbours_between_thresholds<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, lambda_cfg(1, 1, 1.0).with_thresholds(0.5, 2.0)).await;
    let ids = ins(&s, &[0.0, 1.5, 10.0], &[1.0, 1.0, 1.0], 1).await;
    s.learn(Batch::new(v(&[1.0], 1), v(&[7.0], 1)), 3, 3).await.unwrap();
    assert_eq!(s.len().await.unwrap(), 3, "no insert: a neighbour is within novelty");
    let got = s.get(&ids).await.unwrap();
    assert_eq!((got[0].access_count, got[0].last_access, got[0].crf), (2, 3, 1.25));
    assert_eq!((got[1].access_count, got[1].last_access, got[1].crf), (2, 3, 1.25));
    assert_eq!(got[2].access_count, 1, "beyond novelty: not touched");
}

/// Near-duplicates merge with the observation: exp(−d)-weighted means of keys
/// and values (observation weighing 1), oldest creation, summed counts,
/// combined CRF, tag union with counts; originals deleted; the neighbours as
/// found before the update are returned.
pub async fn learn_merges_near_duplicates<H: Harness>(make: Make<'_, H>) {
    let lambda = 0.5;
    let (_h, s) = fresh(make, lambda_cfg(2, 2, lambda).with_thresholds(0.5, 1.0)).await;
    let a = ins_tagged(&s, &[0.0, 0.0], &[1.0, 1.0], &[tags(&["x", "x"])], 1).await[0];
    let b = ins_tagged(&s, &[0.2, 0.0], &[3.0, 3.0], &[tags(&["y"])], 2).await[0];
    let far = ins(&s, &[50.0, 0.0], &[0.0, 0.0], 2).await[0];
    let obs_tags = tags(&["x"]);
    let r = s
        .learn(
            Batch::new(v(&[0.1, 0.0], 2), v(&[5.0, 5.0], 2)).with_tags(Tags::Same(&obs_tags)),
            10,
            4,
        )
        .await
        .unwrap();
    assert_eq!(r.row_ids(0), &[Some(a), Some(b), Some(far), None]);
    assert_eq!(r.value(0, 0), &[1.0, 1.0]);
    assert_eq!(r.value(0, 1), &[3.0, 3.0]);
    assert!(matches!(s.get(&[a]).await, Err(Error::UnknownId(_))));
    assert!(matches!(s.get(&[b]).await, Err(Error::UnknownId(_))));
    assert_eq!(s.len().await.unwrap(), 2);
    let st = s.stats().await.unwrap();
    assert_eq!(st.counters.merged, 1);
    let m = &s.get(&[st.next_id - 1]).await.unwrap()[0];
    let (da, db) = (0.1f64, 0.1f64);
    let (wa, wb) = ((-da).exp(), (-db).exp());
    let tot = 1.0 + wa + wb;
    let want_key = [(0.1 + wb * 0.2) / tot, 0.0];
    let want_val = [(5.0 + wa + 3.0 * wb) / tot; 2];
    for (g, w) in m.key.iter().zip(want_key).chain(m.value.iter().zip(want_val)) {
        assert!((*g as f64 - w).abs() < 1e-5, "merged {g} vs {w}");
    }
    assert_eq!((m.created, m.last_access, m.access_count), (1, 10, 3));
    let want_crf = 1.0 + 2f64.powf(-lambda * 9.0) + 2f64.powf(-lambda * 8.0);
    assert!((m.crf - want_crf).abs() < 1e-12, "crf {} vs {want_crf}", m.crf);
    assert_eq!(m.tags, BTreeMap::from([("x".to_string(), 3), ("y".to_string(), 1)]));
    let f = &s.get(&[far]).await.unwrap()[0];
    assert_eq!(f.access_count, 1);
}

/// Within one batch, later rows see the effects of earlier rows.
pub async fn learn_rows_see_earlier_rows<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 1).with_thresholds(0.5, 1.0)).await;
    let r = s
        .learn(Batch::new(v(&[2.0, 2.0, 2.2], 1), v(&[1.0, 3.0, 5.0], 1)), 1, 2)
        .await
        .unwrap();
    assert_eq!(r.row_ids(0), &[None, None]);
    assert_eq!(r.row_ids(1), &[Some(1), None]);
    assert_eq!(r.row_ids(2), &[Some(2), None], "row 2 sees the memory row 1 merged");
    let (mems, st) = dump(&s).await;
    assert_eq!(st.len, 1);
    assert_eq!(st.counters.merged, 2);
    assert_eq!(mems.values().next().map(|m| m.access_count), Some(3));
}

/// `learn` refuses bad input whole.
pub async fn learn_rejects_bad_input<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(2, 1).with_thresholds(0.5, 1.0)).await;
    ins(&s, &[0.0, 0.0], &[0.0], 1).await;
    let before = dump(&s).await;
    let r = s.learn(Batch::new(v(&[0.0, 0.1], 2), v(&[1.0], 1)), 2, 0).await;
    assert!(matches!(r, Err(Error::ZeroK)), "{r:?}");
    let r = s.learn(Batch::new(v(&[0.0], 1), v(&[1.0], 1)), 2, 1).await;
    assert!(matches!(r, Err(Error::DimensionMismatch { what: "keys", .. })), "{r:?}");
    let r = s
        .learn(Batch::new(v(&[0.0, 0.1, 9.0, 9.0], 2), v(&[1.0, f32::NAN], 1)), 2, 1)
        .await;
    assert!(
        matches!(
            r,
            Err(Error::NonFinite {
                what: "values",
                row: 1,
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(dump(&s).await, before);
}

/// `learn` evicts down to the capacity at the end of the batch.
pub async fn learn_respects_capacity<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, lambda_cfg(1, 1, 1.0).with_thresholds(0.1, 0.5).with_capacity(5)).await;
    let keys: Vec<f32> = (0..10).map(|i| i as f32 * 10.0).collect();
    s.learn(Batch::new(v(&keys, 1), v(&[0.0; 10], 1)), 1, 3).await.unwrap();
    let (mems, st) = dump(&s).await;
    assert_eq!(st.len, 5);
    assert_eq!(st.counters.evicted, 5);
    assert_eq!(mems.keys().copied().collect::<Vec<_>>(), vec![6, 7, 8, 9, 10]);
}

fn clustered(rng: &mut Rng, n: usize, centres: &[f32], dk: usize, noise: f32) -> Vec<f32> {
    let nc = centres.len() / dk;
    let mut out = Vec::with_capacity(n * dk);
    for _ in 0..n {
        let c = rng.below(nc as u64) as usize;
        for d in 0..dk {
            out.push(centres[c * dk + d] + noise * rng.unit());
        }
    }
    out
}

/// Asserts that `s` holds exactly the reference model's memories and stats;
/// returns the counters (for the scenario's coverage check).
async fn same_state_as_reference<S: MemoryStore>(s: &S, r: &InMemoryStore) -> crate::Counters {
    let (got, gst) = dump(s).await;
    let (want, wst) = dump(r).await;
    assert_eq!(gst, wst);
    assert_eq!(got, want);
    wst.counters
}

/// A long clustered `learn` stream (merges, touches, inserts and eviction)
/// leaves exactly the reference model's state and returns its neighbours.
pub async fn learn_matches_reference_on_clusters<H: Harness>(make: Make<'_, H>) {
    let c = lambda_cfg(4, 2, 0.3).with_thresholds(0.35, 0.7).with_capacity(40);
    let (_h, s) = fresh(make, c.clone()).await;
    let r = InMemoryStore::new(c).unwrap();
    let mut rng = Rng::new(99);
    let centres: Vec<f32> = rng.vecs(60, 4).iter().map(|x| x * 3.0).collect();
    for step in 0..12u64 {
        let keys = clustered(&mut rng, 40, &centres, 4, 0.3);
        let vals = rng.vecs(40, 2);
        let t: Vec<Vec<String>> = (0..40).map(|i| tags(&[["p", "q", "r"][i % 3]])).collect();
        let b = Batch::new(v(&keys, 4), v(&vals, 2)).with_tags(Tags::PerRow(&t));
        let got = s.learn(b, step, 5).await.unwrap();
        let want = r.learn(b, step, 5).await.unwrap();
        assert_eq!(got, want, "neighbours differ at step {step}");
    }
    let c = same_state_as_reference(&s, &r).await;
    assert!(
        c.merged > 20 && c.inserted > 20 && c.evicted > 20,
        "the scenario must exercise every path: {c:?}"
    );
}

/// Batches larger than the block of `learn`'s in-batch matrix product (512
/// rows): every row sees the memories that earlier rows of the batch created
/// or merged away, exactly as the reference model applies the batch row by
/// row: neighbours, merges and the final state agree, with exact duplicates
/// of earlier rows (merges of memories created blocks before, ties) included.
pub async fn learn_large_batches_match_reference<H: Harness>(make: Make<'_, H>) {
    let c = lambda_cfg(4, 2, 0.3).with_thresholds(0.02, 0.25).with_capacity(1500);
    let (_h, s) = fresh(make, c.clone()).await;
    let r = InMemoryStore::new(c).unwrap();
    let mut rng = Rng::new(1234);
    let centres: Vec<f32> = rng.vecs(400, 4).iter().map(|x| x * 4.0).collect();
    let n = 1300;
    for step in 0..3u64 {
        let mut keys = clustered(&mut rng, n, &centres, 4, 0.2);
        copy_earlier_rows(&mut rng, &mut keys, 4, 600, 5);
        let vals = rng.vecs(n, 2);
        let b = Batch::new(v(&keys, 4), v(&vals, 2));
        let got = s.learn(b, step, 5).await.unwrap();
        let want = r.learn(b, step, 5).await.unwrap();
        assert_eq!(got, want, "neighbours differ at step {step}");
    }
    let c = same_state_as_reference(&s, &r).await;
    assert!(
        c.merged > 150 && c.inserted > 1000 && c.evicted > 100,
        "the scenario must exercise every path: {c:?}"
    );
}

/// A batch whose returned neighbours are large (2048 rows × 8 neighbours ×
/// (16 + 16) floats, above the size from which a backend may prepare its
/// output on a second thread while it writes): neighbours, including
/// memories the batch later merges away or evicts, and the final state
/// equal the reference's.
pub async fn learn_large_output_matches_reference<H: Harness>(make: Make<'_, H>) {
    let c = lambda_cfg(16, 16, 0.3).with_thresholds(0.02, 0.5).with_capacity(2500);
    let (_h, s) = fresh(make, c.clone()).await;
    let r = InMemoryStore::new(c).unwrap();
    let mut rng = Rng::new(2048);
    let centres: Vec<f32> = rng.vecs(200, 16).iter().map(|x| x * 4.0).collect();
    let stored = clustered(&mut rng, 1000, &centres, 16, 0.3);
    let vals = rng.vecs(1000, 16);
    ins(&s, &stored, &vals, 0).await;
    ins(&r, &stored, &vals, 0).await;
    let n = 2048;
    for step in 1..=2u64 {
        let mut keys = clustered(&mut rng, n, &centres, 16, 0.3);
        copy_stored_rows(&mut rng, &mut keys, 16, &stored, 9);
        copy_earlier_rows(&mut rng, &mut keys, 16, 800, 5);
        let vals = rng.vecs(n, 16);
        let b = Batch::new(v(&keys, 16), v(&vals, 16));
        let got = s.learn(b, step, 8).await.unwrap();
        let want = r.learn(b, step, 8).await.unwrap();
        assert_eq!(got, want, "neighbours differ at step {step}");
    }
    let c = same_state_as_reference(&s, &r).await;
    assert!(
        c.merged > 300 && c.inserted > 1500 && c.evicted > 500,
        "the scenario must exercise every path: {c:?}"
    );
}

/// `learn` with recombination off (threshold 0) and the novelty gate on,
/// in large batches (the blocked-GEMM path) over a store of 2000 keys, with
/// exact duplicates of stored keys and of earlier rows, and eviction at
/// capacity: neighbours and final state equal the reference's. Under L2
/// nothing can merge (the store's search then asks for exactly k); under
/// cosine a duplicate's distance can round below 0 and merge, so both run.
pub async fn learn_without_recombination_matches_reference<H: Harness>(make: Make<'_, H>) {
    for (metric, novelty) in [(Metric::L2, 0.05), (Metric::Cosine, 0.001)] {
        let c = lambda_cfg(8, 2, 0.3)
            .with_metric(metric)
            .with_thresholds(0.0, novelty)
            .with_capacity(3500);
        let (_h, s) = fresh(make, c.clone()).await;
        let r = InMemoryStore::new(c).unwrap();
        let mut rng = Rng::new(4321);
        let centres: Vec<f32> = rng.vecs(300, 8).iter().map(|x| x * 4.0 + 0.5).collect();
        let stored = clustered(&mut rng, 2000, &centres, 8, 0.3);
        let vals = rng.vecs(2000, 2);
        for (keys, values) in stored.chunks(1000 * 8).zip(vals.chunks(1000 * 2)) {
            ins(&s, keys, values, 0).await;
            ins(&r, keys, values, 0).await;
        }
        let n = 1300;
        let mut learned = 0u64;
        for step in 1..=3u64 {
            let mut keys = clustered(&mut rng, n, &centres, 8, 0.3);
            copy_stored_rows(&mut rng, &mut keys, 8, &stored, 7);
            copy_earlier_rows(&mut rng, &mut keys, 8, 600, 11);
            let vals = rng.vecs(n, 2);
            let b = Batch::new(v(&keys, 8), v(&vals, 2));
            let got = s.learn(b, step, 6).await.unwrap();
            let want = r.learn(b, step, 6).await.unwrap();
            assert_eq!(got, want, "{metric:?}: neighbours differ at step {step}");
            learned += n as u64;
        }
        let c = same_state_as_reference(&s, &r).await;
        let created = c.inserted + c.merged - 2000;
        assert!(
            created > 1000 && created < learned && c.evicted > 0,
            "{metric:?}: the scenario must gate rows, insert others and evict: {c:?}"
        );
        if metric == Metric::L2 {
            assert_eq!(c.merged, 0, "L2 distances are never below a threshold of 0");
        }
    }
}

/// λ = 1 evicts the least recently used.
pub async fn evict_lru_order<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, lambda_cfg(1, 1, 1.0)).await;
    for t in 1..=5u64 {
        ins(&s, &[t as f32], &[0.0], t).await;
    }
    s.touch(&[1], 6).await.unwrap();
    assert_eq!(s.evict(3).await.unwrap(), 2);
    let (mems, st) = dump(&s).await;
    assert_eq!(mems.keys().copied().collect::<Vec<_>>(), vec![1, 4, 5]);
    assert_eq!(st.counters.evicted, 2);
}

/// λ = 0 evicts the least frequently used (ties: lowest id).
pub async fn evict_lfu_order<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, lambda_cfg(1, 1, 0.0)).await;
    ins(&s, &[1.0, 2.0, 3.0, 4.0, 5.0], &[0.0; 5], 1).await;
    s.touch(&[5, 5, 5, 4, 4, 3], 100).await.unwrap();
    assert_eq!(s.evict(2).await.unwrap(), 3);
    let (mems, _) = dump(&s).await;
    assert_eq!(mems.keys().copied().collect::<Vec<_>>(), vec![4, 5]);
}

/// Eviction removes exactly the memories with the lowest decayed CRF, computed
/// by a brute-force model from the full access history:
/// `CRF(now) = Σ 2^(−λ·(now − tᵢ))` over every access time `tᵢ`.
pub async fn evict_matches_lrfu_model<H: Harness>(make: Make<'_, H>) {
    let lambda = 0.3;
    let (_h, s) = fresh(make, lambda_cfg(1, 1, lambda)).await;
    let mut rng = Rng::new(5);
    let mut history: BTreeMap<MemoryId, Vec<u64>> = BTreeMap::new();
    for i in 0..40u64 {
        let t = 1 + i * 2;
        let id = ins(&s, &[i as f32], &[0.0], t).await[0];
        history.insert(id, vec![t]);
    }
    for t in 81..=140u64 {
        let id = 1 + rng.below(40);
        s.touch(&[id], t).await.unwrap();
        history.get_mut(&id).expect("known").push(t);
    }
    let now = 140;
    let mut model: Vec<(f64, MemoryId)> = history
        .iter()
        .map(|(id, ts)| (ts.iter().map(|t| 2f64.powf(-lambda * (now - t) as f64)).sum(), *id))
        .collect();
    model.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    assert_eq!(s.evict(25).await.unwrap(), 15);
    let (mems, _) = dump(&s).await;
    let want: BTreeSet<MemoryId> = model[15..].iter().map(|(_, id)| *id).collect();
    assert_eq!(mems.keys().copied().collect::<BTreeSet<_>>(), want);
    for (id, m) in &mems {
        assert_eq!(m.access_count as usize, history[id].len());
    }
}

/// Evicting to a target at or above the size does nothing.
pub async fn evict_below_target_is_noop<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 1)).await;
    ins(&s, &[1.0, 2.0], &[0.0; 2], 1).await;
    assert_eq!(s.evict(2).await.unwrap(), 0);
    assert_eq!(s.evict(10).await.unwrap(), 0);
    assert_eq!(s.len().await.unwrap(), 2);
    assert_eq!(s.evict(0).await.unwrap(), 2);
    assert_eq!(s.len().await.unwrap(), 0);
}

/// With a capacity, an insert evicts the lowest-priority memory.
pub async fn capacity_evicts_on_insert<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, lambda_cfg(1, 1, 1.0).with_capacity(3)).await;
    for t in 1..=3u64 {
        ins(&s, &[t as f32], &[0.0], t).await;
    }
    s.touch(&[1], 4).await.unwrap();
    let new = ins(&s, &[9.0], &[0.0], 5).await;
    let (mems, st) = dump(&s).await;
    assert_eq!(mems.keys().copied().collect::<Vec<_>>(), vec![1, 3, new[0]]);
    assert_eq!((st.len, st.counters.evicted, st.counters.inserted), (3, 1, 4));
}

fn change_batch(seq: u64, tick: u64, first_id: MemoryId) -> ChangeBatch {
    ChangeBatch {
        seq,
        tick,
        first_id,
        ..ChangeBatch::default()
    }
}

/// `apply` does in one transaction what delete, update_values, insert and
/// touch do one after another (touching a memory it inserts too; repeated
/// accesses in runs and apart; value updates by ids in any order and
/// ascending), and records the batch's sequence number durably.
pub async fn apply_equals_the_separate_operations<H: Harness>(make: Make<'_, H>) {
    let c = lambda_cfg(2, 2, 0.5);
    let (h, s) = fresh(make, c.clone()).await;
    let r = InMemoryStore::new(c.clone()).unwrap();
    let keys = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
    let vals = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0];
    let ids = ins(&s, &keys, &vals, 1).await;
    assert_eq!(ins(&r, &keys, &vals, 1).await, ids);
    let mut b = change_batch(1, 5, ids[3] + 1);
    b.delete = vec![ids[0]];
    b.update_ids = vec![ids[1], ids[2], ids[1]];
    b.deltas = vec![0.5, -0.25, 1.0, 2.0, 0.125, 0.0];
    b.touch = vec![ids[1], ids[1], ids[3], ids[3] + 2, ids[3] + 2, ids[1]];
    b.insert_keys = vec![5.0, 5.0, 6.0, 6.0];
    b.insert_values = vec![7.0, 7.5, 8.0, 8.5];
    s.apply(&b).await.unwrap();
    r.delete(&b.delete).await.unwrap();
    r.update_values(&b.update_ids, v(&b.deltas, 2)).await.unwrap();
    assert_eq!(
        ins(&r, &b.insert_keys, &b.insert_values, 5).await,
        vec![ids[3] + 1, ids[3] + 2]
    );
    r.touch(&b.touch, 5).await.unwrap();
    let (got, st) = dump(&s).await;
    let (want, mut want_st) = dump(&r).await;
    assert_eq!(got, want);
    want_st.counters.last_batch = 1;
    assert_eq!(st, want_st);
    let s = reopen(&h, s, c).await;
    let (again, st2) = dump(&s).await;
    assert_eq!(
        (again, st2.counters.last_batch),
        (got, 1),
        "the batch and its number are durable"
    );
    let mut b2 = change_batch(2, 6, ids[3] + 3);
    b2.touch = vec![ids[2], ids[3] + 1, ids[3] + 1, ids[3] + 1];
    b2.update_ids = vec![ids[1], ids[2], ids[3] + 1];
    b2.deltas = vec![0.25, 0.5, -1.0, 0.75, 2.0, -2.0];
    s.apply(&b2).await.unwrap();
    r.update_values(&b2.update_ids, v(&b2.deltas, 2)).await.unwrap();
    r.touch(&b2.touch, 6).await.unwrap();
    assert_eq!(s.stats().await.unwrap().counters.last_batch, 2);
    assert_eq!(s.get(&[ids[2]]).await.unwrap()[0].access_count, 2);
    assert_eq!(dump(&s).await.0, dump(&r).await.0);
}

/// A change batch out of order, with a wrong first id, an unknown id, an
/// update of a memory it deletes, or bad numbers changes nothing; replaying an
/// applied batch is refused as out of order.
pub async fn apply_rejects_bad_batches<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 2)).await;
    let ids = ins(&s, &[1.0, 2.0], &[1.0, 2.0, 3.0, 4.0], 1).await;
    let before = dump(&s).await;
    let next = ids[1] + 1;
    let r = s.apply(&change_batch(2, 3, next)).await;
    assert!(matches!(r, Err(Error::OutOfOrder { expected: 1, got: 2 })), "{r:?}");
    let mut b = change_batch(1, 3, next + 4);
    b.insert_keys = vec![3.0];
    b.insert_values = vec![0.0, 0.0];
    let r = s.apply(&b).await;
    assert!(
        matches!(r, Err(Error::IdConflict { got, .. }) if got == next + 4),
        "{r:?}"
    );
    let mut b = change_batch(1, 3, next);
    b.delete = vec![ids[0], 77];
    assert!(matches!(s.apply(&b).await, Err(Error::UnknownId(77))));
    let mut b = change_batch(1, 3, next);
    b.delete = vec![ids[0]];
    b.update_ids = vec![ids[0]];
    b.deltas = vec![1.0, 1.0];
    assert!(matches!(s.apply(&b).await, Err(Error::UnknownId(id)) if id == ids[0]));
    let mut b = change_batch(1, 3, next);
    b.delete = vec![ids[0]];
    b.touch = vec![ids[0]];
    assert!(matches!(s.apply(&b).await, Err(Error::UnknownId(id)) if id == ids[0]));
    let mut b = change_batch(1, 3, next);
    b.touch = vec![next];
    assert!(
        matches!(s.apply(&b).await, Err(Error::UnknownId(id)) if id == next),
        "touch of an id not inserted"
    );
    let mut b = change_batch(1, 3, next);
    b.update_ids = vec![ids[1]];
    b.deltas = vec![f32::NAN, 0.0];
    assert!(matches!(
        s.apply(&b).await,
        Err(Error::NonFinite { what: "deltas", .. })
    ));
    let mut b = change_batch(1, 3, next);
    b.update_ids = vec![ids[1]];
    b.deltas = vec![1.0, 0.0, 0.0];
    assert!(matches!(s.apply(&b).await, Err(Error::Shape(_))));
    let mut b = change_batch(1, 3, next);
    b.insert_keys = vec![1.0, 2.0];
    b.insert_values = vec![0.0, 0.0];
    assert!(matches!(s.apply(&b).await, Err(Error::Shape(_))));
    let mut b = change_batch(1, 3, next);
    b.delete = vec![ids[0]];
    b.insert_keys = vec![f32::INFINITY];
    b.insert_values = vec![0.0, 0.0];
    assert!(matches!(s.apply(&b).await, Err(Error::NonFinite { what: "keys", .. })));
    assert_eq!(dump(&s).await, before, "rejected batches changed the store");
    let mut b = change_batch(1, 3, next);
    b.delete = vec![ids[0]];
    s.apply(&b).await.unwrap();
    let after = dump(&s).await;
    let r = s.apply(&b).await;
    assert!(matches!(r, Err(Error::OutOfOrder { expected: 2, got: 1 })), "{r:?}");
    assert_eq!(dump(&s).await, after);
}

/// Rows a change batch inserts with bookkeeping keep it (a recombined memory
/// keeps its sources' history), durably; impossible bookkeeping is refused.
pub async fn apply_keeps_insert_bookkeeping<H: Harness>(make: Make<'_, H>) {
    let c = lambda_cfg(1, 1, 0.5);
    let (h, s) = fresh(make, c.clone()).await;
    let meta = crate::InsertMeta {
        created: 2,
        last_access: 7,
        access_count: 5,
        crf: 2.75,
    };
    let mut b = change_batch(1, 7, 1);
    b.insert_keys = vec![1.0, 2.0];
    b.insert_values = vec![3.0, 4.0];
    b.insert_meta = vec![meta, meta];
    let mut bad = b.clone();
    bad.insert_meta = vec![meta];
    assert!(matches!(s.apply(&bad).await, Err(Error::Shape(_))));
    bad.insert_meta = vec![meta, crate::InsertMeta { crf: f64::NAN, ..meta }];
    assert!(matches!(s.apply(&bad).await, Err(Error::Shape(_))));
    bad.insert_meta = vec![
        meta,
        crate::InsertMeta {
            access_count: 0,
            ..meta
        },
    ];
    assert!(matches!(s.apply(&bad).await, Err(Error::Shape(_))));
    assert_eq!(s.len().await.unwrap(), 0);
    s.apply(&b).await.unwrap();
    let s = reopen(&h, s, c).await;
    let m = &s.get(&[2]).await.unwrap()[0];
    assert_eq!((m.created, m.last_access, m.access_count, m.crf), (2, 7, 5, 2.75));
    assert_eq!(s.stats().await.unwrap().access_count_total, 10);
}

/// Rows a change batch inserts carry its tags, durably, and searches filter
/// on them; a tag list per row that does not match the rows is refused.
pub async fn apply_keeps_insert_tags<H: Harness>(make: Make<'_, H>) {
    let c = lambda_cfg(1, 1, 0.5);
    let (h, s) = fresh(make, c.clone()).await;
    let mut b = change_batch(1, 3, 1);
    b.insert_keys = vec![1.0, 2.0, 3.0];
    b.insert_values = vec![0.5, 0.25, 0.125];
    b.insert_tags = vec![vec!["head:0".into()], vec![], vec!["head:1".into(), "src".into()]];
    let mut bad = b.clone();
    bad.insert_tags.pop();
    assert!(matches!(s.apply(&bad).await, Err(Error::TagCount { got: 2, rows: 3 })));
    assert_eq!(s.len().await.unwrap(), 0);
    s.apply(&b).await.unwrap();
    let s = reopen(&h, s, c).await;
    let got = s.get(&[1, 2, 3]).await.unwrap();
    let tags: Vec<Vec<&str>> = got
        .iter()
        .map(|m| m.tags.keys().map(String::as_str).collect())
        .collect();
    assert_eq!(tags, vec![vec!["head:0"], vec![], vec!["head:1", "src"]]);
    let filter = TagFilter::Any(vec!["head:1".into()]);
    let hits = s
        .search(crate::Vectors::new(&[1.0], 1).unwrap(), 1, Some(&filter))
        .await
        .unwrap();
    assert_eq!(hits.id(0, 0), Some(3));
}

/// A change batch assigns values exactly (after its deltas) and sets tag
/// counts of existing memories (0 removes a tag), durably, as the reference
/// model does; an assignment or tag count naming a memory that is not
/// there (or that the batch deletes), a value of the wrong width and an
/// empty tag name are refused and change nothing.
pub async fn apply_assigns_values_and_tag_counts<H: Harness>(make: Make<'_, H>) {
    let c = lambda_cfg(1, 2, 0.5);
    let (h, s) = fresh(make, c.clone()).await;
    let r = InMemoryStore::new(c.clone()).unwrap();
    let mut first = change_batch(1, 1, 1);
    first.insert_keys = vec![1.0, 2.0, 3.0];
    first.insert_values = vec![0.5, 0.5, 1.0, 1.0, 2.0, 2.0];
    first.insert_tags = vec![vec!["head:0".into()], vec!["head:0".into()], vec![]];
    for st in [&s as &dyn MemoryStore, &r] {
        st.apply(&first).await.unwrap();
    }
    let mut b = change_batch(2, 2, 4);
    b.update_ids = vec![1];
    b.deltas = vec![0.1, 0.1];
    // An assignment wins over a delta to the same memory, bit for bit.
    b.assign_ids = vec![1, 2];
    b.assign_values = vec![0.3, f32::MIN_POSITIVE, -7.0, 1e-30];
    b.tag_counts = vec![
        (1, "source:a@01".into(), 1),
        (2, "head:0".into(), 0),
        (3, "source:a@01".into(), 2),
        (3, "x".into(), 1),
    ];
    for (why, bad) in [
        ("unknown id", {
            let mut x = b.clone();
            x.assign_ids[1] = 9;
            x
        }),
        ("deleted id", {
            let mut x = b.clone();
            x.delete = vec![3];
            x
        }),
        ("value width", {
            let mut x = b.clone();
            x.assign_values.pop();
            x
        }),
        ("empty tag", {
            let mut x = b.clone();
            x.tag_counts[0].1.clear();
            x
        }),
    ] {
        assert!(s.apply(&bad).await.is_err(), "{why} was accepted");
        assert!(r.apply(&bad).await.is_err(), "{why} was accepted by the reference");
    }
    for st in [&s as &dyn MemoryStore, &r] {
        assert_eq!(
            st.stats().await.unwrap().counters.last_batch,
            1,
            "a refused batch changed the store"
        );
        st.apply(&b).await.unwrap();
    }
    let s = reopen(&h, s, c).await;
    let (got, want) = (s.get(&[1, 2, 3]).await.unwrap(), r.get(&[1, 2, 3]).await.unwrap());
    assert_eq!(got, want);
    let bits = |m: &crate::Memory| m.value.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got[0]), [0.3f32, f32::MIN_POSITIVE].map(f32::to_bits));
    assert_eq!(bits(&got[1]), [-7.0f32, 1e-30].map(f32::to_bits));
    let tags = |m: &crate::Memory| m.tags.clone().into_iter().collect::<Vec<_>>();
    assert_eq!(tags(&got[0]), vec![("head:0".into(), 1), ("source:a@01".into(), 1)]);
    assert_eq!(tags(&got[1]), vec![]);
    assert_eq!(tags(&got[2]), vec![("source:a@01".into(), 2), ("x".into(), 1)]);
    let filter = TagFilter::Any(vec!["source:a@01".into()]);
    let hits = s
        .search(crate::Vectors::new(&[2.0], 1).unwrap(), 3, Some(&filter))
        .await
        .unwrap();
    let mut found: Vec<_> = (0..3).filter_map(|j| hits.id(0, j)).collect();
    found.sort_unstable();
    assert_eq!(found, vec![1, 3]);
    assert_eq!(s.stats().await.unwrap().tag_counts.get("source:a@01"), Some(&3));
}

/// `apply_all` of consecutive batches ends where applying them one by one
/// ends (the reference model), durably: memories a batch inserts and later
/// ones update, assign, retag, touch, delete or evict included. A failing
/// group leaves the store holding exactly the batches up to its
/// `last_batch`; an empty group changes nothing.
pub async fn apply_all_equals_applying_in_order<H: Harness>(make: Make<'_, H>) {
    let c = lambda_cfg(1, 2, 0.5).with_capacity(6);
    let (h, s) = fresh(make, c.clone()).await;
    let r = InMemoryStore::new(c.clone()).unwrap();
    let ids = ins(&s, &[1.0, 2.0, 3.0, 4.0], &[0.5; 8], 1).await;
    assert_eq!(ins(&r, &[1.0, 2.0, 3.0, 4.0], &[0.5; 8], 1).await, ids);
    let next = ids[3] + 1;
    let mut b1 = change_batch(1, 2, next);
    b1.update_ids = vec![ids[0], ids[1], ids[0]];
    b1.deltas = vec![0.25, -0.5, 1.0, 2.0, 0.125, 0.0];
    b1.touch = vec![ids[2], next];
    b1.insert_keys = vec![5.0, 6.0];
    b1.insert_values = vec![1.0, 1.5, 2.0, 2.5];
    b1.insert_tags = vec![vec!["head:0".into()], vec!["x".into()]];
    b1.tag_counts = vec![(ids[0], "src".into(), 1)];
    let mut b2 = change_batch(2, 3, next + 2);
    b2.update_ids = vec![next, ids[0]];
    b2.deltas = vec![0.5, 0.5, -1.0, 0.25];
    b2.assign_ids = vec![next + 1];
    b2.assign_values = vec![-3.0, 3.0];
    b2.tag_counts = vec![(next, "src".into(), 2), (next, "head:0".into(), 0)];
    b2.touch = vec![next, next, next + 1, ids[1]];
    b2.delete = vec![ids[3]];
    b2.insert_keys = vec![7.0];
    b2.insert_values = vec![7.0, 7.5];
    b2.insert_tags = vec![vec![]];
    let mut b3 = change_batch(3, 4, next + 3);
    b3.delete = vec![next + 1];
    b3.update_ids = vec![next + 2];
    b3.deltas = vec![0.0625, 0.0];
    b3.touch = vec![ids[0], next + 2, next + 3];
    // Seven live memories for a capacity of six: one is evicted.
    b3.insert_keys = vec![8.0, 9.0];
    b3.insert_values = vec![8.0, 8.5, 9.0, 9.5];
    b3.insert_tags = vec![vec!["y".into()], vec![]];
    let group = [b1, b2, b3];
    s.apply_all(&group).await.unwrap();
    for b in &group {
        r.apply(b).await.unwrap();
    }
    let want = dump(&r).await;
    assert_eq!(want.1.counters.evicted, 1, "the group evicts");
    assert_eq!(dump(&s).await, want);
    let s = reopen(&h, s, c).await;
    assert_eq!(dump(&s).await, want, "the group is durable");

    s.apply_all(&[]).await.unwrap();
    assert_eq!(dump(&s).await, want, "an empty group changed the store");
    let mut b4 = change_batch(4, 5, next + 5);
    b4.touch = vec![ids[0]];
    b4.update_ids = vec![ids[1]];
    b4.deltas = vec![1.0, 1.0];
    let mut b5 = change_batch(5, 6, next + 5);
    b5.update_ids = vec![ids[3]];
    b5.deltas = vec![1.0, 1.0];
    assert!(
        s.apply_all(&[b4.clone(), b5]).await.is_err(),
        "an update of a deleted memory was accepted"
    );
    let last = s.stats().await.unwrap().counters.last_batch;
    assert!(last == 3 || last == 4, "last batch {last} after a failed group");
    if last == 4 {
        r.apply(&b4).await.unwrap();
    }
    assert_eq!(dump(&s).await, dump(&r).await, "a failed group left a partial batch");
}

/// A group of training steps (value deltas and accesses only, ids
/// repeated and in any order, a memory inserted by the group's first batch
/// among them) ends where applying its batches one by one ends, bit for
/// bit; a step whose update leaves a value non-finite, or that names an
/// unknown memory, fails the group with the reference's error and leaves
/// the store holding exactly the batches up to its `last_batch`.
pub async fn apply_all_of_training_steps_equals_applying_in_order<H: Harness>(make: Make<'_, H>) {
    let c = lambda_cfg(1, 2, 0.25);
    let (h, s) = fresh(make, c.clone()).await;
    let r = InMemoryStore::new(c.clone()).unwrap();
    let ids = ins(&s, &[1.0, 2.0, 3.0], &[0.5, -0.5, 1.0, 2.0, 3.0, 4.0], 1).await;
    assert_eq!(
        ins(&r, &[1.0, 2.0, 3.0], &[0.5, -0.5, 1.0, 2.0, 3.0, 4.0], 1).await,
        ids
    );
    let new = ids[2] + 1;
    let mut b1 = change_batch(1, 2, new);
    b1.insert_keys = vec![4.0];
    b1.insert_values = vec![0.75, 0.25];
    let mut b2 = change_batch(2, 3, new + 1);
    b2.update_ids = vec![ids[2], ids[0], new, ids[2]];
    b2.deltas = vec![0.1, 0.2, 1e-7, -3.0, 0.5, 0.5, 0.3, 0.4];
    b2.touch = vec![ids[1], ids[1], new, ids[1], ids[0]];
    let mut b3 = change_batch(3, 5, new + 1);
    b3.update_ids = vec![ids[0], ids[1], new];
    b3.deltas = vec![1.0 / 3.0, 0.7, -0.1, 0.9, 0.25, 0.125];
    b3.touch = vec![ids[0], ids[0], ids[2], new, new];
    let group = [b1, b2, b3];
    s.apply_all(&group).await.unwrap();
    r.apply_all(&group).await.unwrap();
    let want = dump(&r).await;
    assert_eq!(dump(&s).await, want);
    let bits = |d: &(BTreeMap<MemoryId, crate::Memory>, crate::Stats)| {
        d.0.values()
            .map(|m| (m.value.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), m.crf.to_bits()))
            .collect::<Vec<_>>()
    };
    let s = reopen(&h, s, c).await;
    assert_eq!(
        bits(&dump(&s).await),
        bits(&want),
        "values or CRFs differ in their bits"
    );

    for unknown in [false, true] {
        let seq = r.stats().await.unwrap().counters.last_batch + 1;
        let before = dump(&s).await;
        let mut ok = change_batch(seq, 6, new + 1);
        ok.update_ids = vec![ids[0]];
        ok.deltas = vec![0.5, 0.5];
        ok.touch = vec![ids[0]];
        let mut b = change_batch(seq + 1, 7, new + 1);
        if unknown {
            b.update_ids = vec![ids[0], u64::MAX];
            b.deltas = vec![0.0; 4];
        } else {
            // Repeated and unordered: the second delta of `ids[1]` overflows.
            b.update_ids = vec![ids[1], ids[0], ids[1]];
            b.deltas = vec![f32::MAX, 0.0, 0.0, 0.0, f32::MAX, 0.0];
        }
        b.touch = vec![ids[2]];
        let got = s.apply_all(&[ok.clone(), b.clone()]).await;
        let want_err = r.apply_all(&[ok.clone(), b]).await;
        match (&got, &want_err) {
            (Err(g), Err(w)) => assert_eq!(g.to_string(), w.to_string(), "the group failed differently"),
            _ => panic!("a bad step was accepted: store {got:?}, reference {want_err:?}"),
        }
        let last = s.stats().await.unwrap().counters.last_batch;
        assert!(last + 1 == seq || last == seq, "last batch {last} after a failed group");
        if last + 1 == seq {
            assert_eq!(dump(&s).await, before, "a failed group changed the store");
            // The reference applied `ok` before it failed.
            s.apply(&ok).await.unwrap();
        }
        assert_eq!(dump(&s).await, dump(&r).await, "a failed group left a partial batch");
    }
}

/// A change batch's inserts past the capacity evict in LRFU order, as
/// `insert` does, and agree with the reference model.
pub async fn apply_respects_capacity<H: Harness>(make: Make<'_, H>) {
    let c = lambda_cfg(1, 1, 1.0).with_capacity(3);
    let (_h, s) = fresh(make, c.clone()).await;
    let r = InMemoryStore::new(c).unwrap();
    for st in [&s as &dyn MemoryStore, &r] {
        for t in 1..=3u64 {
            ins(st, &[t as f32], &[0.0], t).await;
        }
        let mut b = change_batch(1, 5, 4);
        b.touch = vec![1];
        b.insert_keys = vec![7.0, 8.0];
        b.insert_values = vec![0.5, 0.25];
        st.apply(&b).await.unwrap();
    }
    let (got, st) = dump(&s).await;
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![1, 4, 5]);
    assert_eq!((st.counters.evicted, st.counters.last_batch), (2, 1));
    assert_eq!((got, st), dump(&r).await);
}

/// `stats` sums access counts and tag counts.
pub async fn stats_report_totals<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 1)).await;
    let t = vec![tags(&["a", "b"]), tags(&["a"]), vec![]];
    let ids = ins_tagged(&s, &[1.0, 2.0, 3.0], &[0.0; 3], &t, 1).await;
    s.touch(&[ids[0], ids[2]], 2).await.unwrap();
    s.delete(&[ids[2]]).await.unwrap();
    let st = s.stats().await.unwrap();
    assert_eq!(st.len, 2);
    assert_eq!(st.next_id, 4);
    assert_eq!(st.access_count_total, 3);
    assert_eq!(
        st.tag_counts,
        BTreeMap::from([("a".to_string(), 2), ("b".to_string(), 1)])
    );
    assert_eq!((st.counters.inserted, st.counters.deleted), (3, 1));
}

/// `ids` lists exactly the memories `get` knows, ascending, after inserts,
/// deletes, merges and evictions.
pub async fn ids_lists_every_memory<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 1).with_thresholds(0.5, 1.0).with_capacity(6)).await;
    assert!(s.ids().await.unwrap().is_empty());
    ins(&s, &[0.0, 10.0, 20.0, 30.0, 40.0], &[0.0; 5], 1).await;
    s.delete(&[2]).await.unwrap();
    s.learn(Batch::new(v(&[0.1, 50.0, 60.0, 70.0], 1), v(&[0.0; 4], 1)), 2, 2)
        .await
        .unwrap();
    let ids = s.ids().await.unwrap();
    let st = s.stats().await.unwrap();
    let mut walked = Vec::new();
    for id in 1..st.next_id {
        if s.get(&[id]).await.is_ok() {
            walked.push(id);
        }
    }
    assert_eq!(ids, walked);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ascending");
    assert_eq!(ids.len(), 6);
    assert!(
        !ids.contains(&1) && !ids.contains(&2),
        "merged and deleted ids are gone: {ids:?}"
    );
}

/// `flush` succeeds and changes nothing visible.
pub async fn flush_keeps_state<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(1, 1)).await;
    ins(&s, &[1.0, 2.0], &[0.0; 2], 1).await;
    let before = dump(&s).await;
    s.flush().await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(dump(&s).await, before);
}

/// Writers and readers at once: every write lands, ids are unique, and a
/// search never returns an id that `get` does not know.
pub async fn concurrent_readers_and_writers<H: Harness>(make: Make<'_, H>) {
    let (_h, s) = fresh(make, cfg(2, 1)).await;
    let s = Arc::new(s);
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(w);
            let mut ids = Vec::new();
            for b in 0..20u64 {
                ids.extend(ins(&*s, &rng.vecs(10, 2), &[w as f32; 10], b).await);
            }
            ids
        }));
    }
    let mut readers = Vec::new();
    for r in 0..4u64 {
        let s = s.clone();
        readers.push(tokio::spawn(async move {
            let mut rng = Rng::new(100 + r);
            let mut seen = Vec::new();
            for _ in 0..30 {
                let res = s.search(v(&rng.vecs(4, 2), 2), 3, None).await.expect("search");
                seen.extend(res.ids.iter().flatten().copied());
            }
            seen
        }));
    }
    let mut all = BTreeSet::new();
    for t in tasks {
        for id in t.await.expect("writer") {
            assert!(all.insert(id), "id {id} assigned twice");
        }
    }
    for r in readers {
        for id in r.await.expect("reader") {
            assert!(all.contains(&id), "search returned {id}, which no writer inserted");
        }
    }
    assert_eq!(all.len(), 800);
    assert_eq!(s.len().await.unwrap(), 800);
    let ids: Vec<MemoryId> = all.into_iter().collect();
    assert_eq!(s.get(&ids).await.unwrap().len(), 800);
}

/// One random operation of the property tests.
#[derive(Clone, Debug)]
pub enum Op {
    /// Insert `n` rows from a seed, tagged from a small alphabet.
    Insert { n: usize, seed: u64, tick: u64 },
    /// Learn `n` rows.
    Learn { n: usize, seed: u64, tick: u64, k: usize },
    /// Search `n` queries, optionally filtered.
    Search {
        n: usize,
        seed: u64,
        k: usize,
        tag: Option<u8>,
    },
    /// Delete ids (possibly unknown).
    Delete(Vec<u64>),
    /// Touch ids (possibly unknown).
    Touch(Vec<u64>, u64),
    /// Add deltas to values.
    Update(Vec<u64>, u64),
    /// Evict down to a target.
    Evict(usize),
    /// Close and reopen.
    Reopen,
    /// `apply_all` of a group shaped like a training run's steps: an
    /// optional first batch inserting `insert` rows, then batches that only
    /// add deltas to values and access memories (`(updates, touches, seed)`,
    /// picks among the live memories, repeated and unordered).
    Group {
        insert: usize,
        steps: Vec<(Vec<u8>, Vec<u8>, u64)>,
        tick: u64,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..6, any::<u64>(), 0u64..40).prop_map(|(n, seed, tick)| Op::Insert { n, seed, tick }),
        4 => (0usize..6, any::<u64>(), 0u64..40, 0usize..5).prop_map(|(n, seed, tick, k)| Op::Learn { n, seed, tick, k }),
        2 => (1usize..4, any::<u64>(), 0usize..6, proptest::option::of(0u8..3))
            .prop_map(|(n, seed, k, tag)| Op::Search { n, seed, k, tag }),
        1 => proptest::collection::vec(0u64..30, 0..4).prop_map(Op::Delete),
        1 => (proptest::collection::vec(0u64..30, 0..4), 0u64..40).prop_map(|(ids, t)| Op::Touch(ids, t)),
        1 => (proptest::collection::vec(0u64..30, 0..3), any::<u64>()).prop_map(|(ids, s)| Op::Update(ids, s)),
        1 => (0usize..10).prop_map(Op::Evict),
        1 => Just(Op::Reopen),
        2 => (
            0usize..3,
            proptest::collection::vec(
                (
                    proptest::collection::vec(any::<u8>(), 0..6),
                    proptest::collection::vec(any::<u8>(), 0..8),
                    any::<u64>()
                ),
                1..5
            ),
            0u64..40
        )
            .prop_map(|(insert, steps, tick)| Op::Group { insert, steps, tick }),
    ]
}

/// Keys on a coarse grid, so that ties, duplicates and merges happen.
fn grid(rng: &mut Rng, n: usize, d: usize) -> Vec<f32> {
    (0..n * d)
        .map(|_| [-1.0, -0.5, 0.0, 0.25, 0.5, 1.0][rng.below(6) as usize])
        .collect()
}

fn same_outcome<T: PartialEq + std::fmt::Debug>(what: &str, got: &crate::Result<T>, want: &crate::Result<T>) {
    match (got, want) {
        (Ok(g), Ok(w)) => assert_eq!(g, w, "{what}: results differ"),
        (Err(g), Err(w)) => assert_eq!(
            std::mem::discriminant(g),
            std::mem::discriminant(w),
            "{what}: errors differ: {g} vs {w}"
        ),
        _ => panic!("{what}: backend {got:?} but reference {want:?}"),
    }
}

async fn run_ops<H: Harness>(h: H, config: MemoryConfig, ops: Vec<Op>) {
    let mut s = h.open(config.clone()).await.expect("open");
    let r = InMemoryStore::new(config.clone()).expect("reference");
    let (dk, dv) = (config.key_dim, config.value_dim);
    let alphabet = ["t0", "t1", "t2"];
    for (step, op) in ops.into_iter().enumerate() {
        let what = format!("step {step} {op:?}");
        match op {
            Op::Insert { n, seed, tick } | Op::Learn { n, seed, tick, .. } => {
                let mut rng = Rng::new(seed);
                let keys = grid(&mut rng, n, dk);
                let vals = rng.vecs(n, dv);
                let t: Vec<Vec<String>> = (0..n)
                    .map(|i| vec![alphabet[(seed as usize + i) % 3].to_string()])
                    .collect();
                let b = Batch::new(v(&keys, dk), v(&vals, dv)).with_tags(Tags::PerRow(&t));
                if let Op::Learn { k, .. } = op {
                    same_outcome(&what, &s.learn(b, tick, k).await, &r.learn(b, tick, k).await);
                } else {
                    same_outcome(&what, &s.insert(b, tick).await, &r.insert(b, tick).await);
                }
            }
            Op::Search { n, seed, k, tag } => {
                let mut rng = Rng::new(seed);
                let q = grid(&mut rng, n, dk);
                let f = tag.map(|t| TagFilter::Any(vec![alphabet[t as usize].to_string()]));
                same_outcome(
                    &what,
                    &s.search(v(&q, dk), k, f.as_ref()).await,
                    &r.search(v(&q, dk), k, f.as_ref()).await,
                );
            }
            Op::Delete(ids) => same_outcome(&what, &s.delete(&ids).await, &r.delete(&ids).await),
            Op::Touch(ids, t) => same_outcome(&what, &s.touch(&ids, t).await, &r.touch(&ids, t).await),
            Op::Update(ids, seed) => {
                let d = Rng::new(seed).vecs(ids.len(), dv);
                same_outcome(
                    &what,
                    &s.update_values(&ids, v(&d, dv)).await,
                    &r.update_values(&ids, v(&d, dv)).await,
                );
            }
            Op::Evict(t) => same_outcome(&what, &s.evict(t).await, &r.evict(t).await),
            Op::Group { insert, steps, tick } => {
                let group = training_group(&r, &config, insert, &steps, tick).await;
                same_outcome(&what, &s.apply_all(&group).await, &r.apply_all(&group).await);
            }
            Op::Reopen => {
                h.close(s).await.expect("close");
                s = h.open(config.clone()).await.expect("reopen");
            }
        }
        let (got, gst) = dump(&s).await;
        let (want, wst) = dump(&r).await;
        assert_eq!(gst, wst, "{what}: stats differ");
        assert_eq!(got, want, "{what}: contents differ");
    }
}

/// The batches of an [`Op::Group`] on the reference's current state: valid
/// whenever the store agrees with the reference (ids picked among its live
/// memories; inserts only where they cannot evict one of those).
async fn training_group(
    r: &InMemoryStore,
    config: &MemoryConfig,
    insert: usize,
    steps: &[(Vec<u8>, Vec<u8>, u64)],
    tick: u64,
) -> Vec<ChangeBatch> {
    let stats = r.stats().await.expect("reference stats");
    let mut live = r.ids().await.expect("reference ids");
    let (dk, dv) = (config.key_dim, config.value_dim);
    let mut seq = stats.counters.last_batch + 1;
    let mut group = Vec::new();
    let room = config.capacity.is_none_or(|cap| live.len() + insert <= cap);
    if insert > 0 && room {
        let mut rng = Rng::new(tick ^ 0x5eed);
        let mut b = change_batch(seq, tick, stats.next_id);
        b.insert_keys = grid(&mut rng, insert, dk);
        b.insert_values = rng.vecs(insert, dv);
        live.extend(stats.next_id..stats.next_id + insert as u64);
        group.push(b);
        seq += 1;
    }
    if live.is_empty() {
        return group;
    }
    let pick = |p: &u8| live[*p as usize % live.len()];
    for (j, (updates, touches, seed)) in steps.iter().enumerate() {
        let mut b = change_batch(seq, tick + j as u64, stats.next_id + insert as u64);
        b.update_ids = updates.iter().map(pick).collect();
        b.deltas = Rng::new(*seed).vecs(b.update_ids.len(), dv);
        b.touch = touches.iter().map(pick).collect();
        group.push(b);
        seq += 1;
    }
    group
}

fn run_prop<H: Harness>(make: Make<'_, H>, configs: Vec<MemoryConfig>, cases: u32) {
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        let mut runner = TestRunner::new(PropConfig {
            cases,
            failure_persistence: None,
            ..PropConfig::default()
        });
        let strategy = (0..configs.len(), proptest::collection::vec(op_strategy(), 1..25));
        let result = runner.run(&strategy, |(c, ops)| {
            handle.block_on(run_ops(make(), configs[c].clone(), ops));
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    });
}

/// Random sequences of every operation (with reopens) give the same results,
/// errors and contents as the reference model, under L2 with capacity and
/// three LRFU settings.
pub async fn prop_random_ops_match_reference<H: Harness>(make: Make<'_, H>) {
    let configs = [0.0, 0.5, 1.0]
        .into_iter()
        .map(|l| lambda_cfg(3, 2, l).with_thresholds(0.3, 0.9).with_capacity(12))
        .collect();
    run_prop(make, configs, 48);
}

/// The same comparison under the cosine and inner-product metrics.
pub async fn prop_metrics_match_reference<H: Harness>(make: Make<'_, H>) {
    let configs = vec![
        cfg(3, 2).with_metric(Metric::Cosine).with_thresholds(0.05, 0.3),
        cfg(3, 2).with_metric(Metric::InnerProduct).with_thresholds(-0.5, 0.5),
    ];
    run_prop(make, configs, 32);
}

/// Checks an approximate answer against brute force over `mems` (the rows a
/// query may return): every returned id is one of them, reported distances
/// and keys are exact, rows are sorted by (distance, id) without duplicates,
/// and each row holds `min(k, mems.len())` results. Returns the recall: the
/// share of the true top-k distances that the answer matches.
fn approximate_recall(
    metric: Metric,
    mems: &[(MemoryId, Vec<f32>)],
    q: &[f32],
    dk: usize,
    k: usize,
    got: &Neighbors,
) -> f64 {
    let by_id: BTreeMap<MemoryId, &Vec<f32>> = mems.iter().map(|(id, key)| (*id, key)).collect();
    let (mut hit, mut total) = (0usize, 0usize);
    for i in 0..q.len() / dk {
        let qi = &q[i * dk..(i + 1) * dk];
        let want = oracle_topk(metric, mems, qi, k);
        let mut seen = BTreeSet::new();
        let mut prev = f32::NEG_INFINITY;
        for j in 0..k {
            let Some(id) = got.id(i, j) else {
                assert!(
                    j >= want.len(),
                    "query {i}: slot {j} empty although {} rows match",
                    mems.len()
                );
                continue;
            };
            let key = by_id
                .get(&id)
                .unwrap_or_else(|| panic!("query {i} slot {j}: id {id} is not a live, matching memory"));
            assert!(seen.insert(id), "query {i}: id {id} returned twice");
            let d = oracle_distance(metric, qi, key);
            assert!(
                (got.distance(i, j) as f64 - d).abs() < 1e-4,
                "query {i} slot {j}: distance is not exact"
            );
            assert_eq!(got.key(i, j), key.as_slice());
            assert!(got.distance(i, j) >= prev, "query {i}: row not sorted by distance");
            prev = got.distance(i, j);
        }
        if let Some(&(_, kth)) = want.last() {
            let within = (0..k)
                .filter(|&j| got.id(i, j).is_some() && (got.distance(i, j) as f64) <= kth + 1e-4)
                .count();
            hit += within.min(want.len());
            total += want.len();
        }
    }
    if total == 0 { 1.0 } else { hit as f64 / total as f64 }
}

/// Approximate search kinds: recall@8 against brute force on every metric
/// (2000 random 16-d keys after deletes, 200 queries), with everything an
/// approximate answer must still get right (see `approximate_recall`).
/// Floor 0.9 on every metric (the figures are printed; HNSW with its default
/// settings gave 0.998–1.0 here).
pub async fn search_approximate_recall<H: Harness>(make: Make<'_, H>) {
    for metric in [Metric::L2, Metric::Cosine, Metric::InnerProduct] {
        let (n, dk, q, k) = (2000usize, 16usize, 200usize, 8usize);
        let (_h, s) = fresh(make, cfg(dk, 1).with_metric(metric)).await;
        let mut rng = Rng::new(4242);
        let keys = rng.vecs(n, dk);
        let ids = ins(&s, &keys, &vec![0.0; n], 1).await;
        let gone: Vec<MemoryId> = ids.iter().copied().filter(|id| id % 10 == 3).collect();
        s.delete(&gone).await.unwrap();
        let mems: Vec<(MemoryId, Vec<f32>)> = ids
            .iter()
            .zip(keys.chunks(dk))
            .filter(|(id, _)| *id % 10 != 3)
            .map(|(i, k)| (*i, k.to_vec()))
            .collect();
        let queries = rng.vecs(q, dk);
        let got = s.search(v(&queries, dk), k, None).await.unwrap();
        let recall = approximate_recall(metric, &mems, &queries, dk, k, &got);
        let single = s.search(v(&queries[..dk], dk), k, None).await.unwrap();
        approximate_recall(metric, &mems, &queries[..dk], dk, k, &single);
        eprintln!("{metric:?}: recall@{k} {recall:.3}");
        assert!(recall >= 0.9, "{metric:?}: recall@{k} {recall:.3} below 0.9");
    }
}

/// Approximate search kinds with many duplicate keys and a tag filter (the
/// data of `search_large_batch_with_ties_and_filters`): filtered answers hold
/// only matching rows and k of them, a query equal to a stored key finds it at
/// distance 0 first, and recall against brute force is at least 0.9.
pub async fn search_approximate_ties_and_filters<H: Harness>(make: Make<'_, H>) {
    for metric in [Metric::L2, Metric::Cosine] {
        let (_h, s) = fresh(make, cfg(16, 1).with_metric(metric)).await;
        let mut rng = Rng::new(77);
        let base = rng.vecs(125, 16);
        let keys: Vec<f32> = (0..16).flat_map(|_| base.iter().copied()).collect();
        let tagsets: Vec<Vec<String>> = (0..2000)
            .map(|i| tags(if i % 3 == 0 { &["a"] } else { &["b"] }))
            .collect();
        let ids = ins_tagged(&s, &keys, &vec![0.5; 2000], &tagsets, 1).await;
        let mems: Vec<(MemoryId, Vec<f32>)> = ids.iter().zip(keys.chunks(16)).map(|(i, k)| (*i, k.to_vec())).collect();
        let tagged_a: Vec<(MemoryId, Vec<f32>)> = mems
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 == 0)
            .map(|(_, m)| m.clone())
            .collect();
        let mut queries = rng.vecs(200, 16);
        queries[..16].copy_from_slice(&base[..16]);
        let filter = TagFilter::Any(tags(&["a"]));
        for (f, rows) in [(None, &mems), (Some(&filter), &tagged_a)] {
            let got = s.search(v(&queries, 16), 6, f).await.unwrap();
            let recall = approximate_recall(metric, rows, &queries, 16, 6, &got);
            eprintln!("{metric:?} filter {}: recall@6 {recall:.3}", f.is_some());
            assert!(recall >= 0.9, "{metric:?} filter {}: recall {recall:.3}", f.is_some());
            assert_eq!(got.distance(0, 0), 0.0, "a stored key finds itself");
        }
    }
}
