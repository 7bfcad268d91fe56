//! The device top-k returns the reference store's top-k on the same contents,
//! for every metric, with invalid slots skipped.

use burn_dmt::burn::tensor::{Device, Tensor, TensorData};
use burn_dmt::memory::device::exact_topk;
use memstore_api::testkit::util::Rng;
use memstore_api::{Batch, InMemoryStore, MemoryConfig, MemoryStore, Metric, Vectors};

#[tokio::test]
async fn device_topk_equals_the_reference_store() {
    let device = Device::flex();
    let (n, d, m, k) = (300usize, 16usize, 40usize, 8usize);
    for metric in [Metric::L2, Metric::Cosine, Metric::InnerProduct] {
        let mut rng = Rng::new(17);
        let keys = rng.vecs(n, d);
        let queries = rng.vecs(m, d);
        // Every fifth slot is empty on the device and absent from the store.
        let valid: Vec<bool> = (0..n).map(|i| i % 5 != 0).collect();
        let store = InMemoryStore::new(MemoryConfig::new(d, 1).with_metric(metric)).unwrap();
        let mut slot_of_id = Vec::new();
        for (i, _) in valid.iter().enumerate().filter(|(_, v)| **v) {
            let id = store
                .insert(
                    Batch::new(
                        Vectors::new(&keys[i * d..(i + 1) * d], d).unwrap(),
                        Vectors::new(&[0.0], 1).unwrap(),
                    ),
                    0,
                )
                .await
                .unwrap()[0];
            slot_of_id.push((id, i));
        }
        let want = store.search(Vectors::new(&queries, d).unwrap(), k, None).await.unwrap();
        let top = exact_topk(
            Tensor::from_data(TensorData::new(queries.clone(), [m, d]), &device),
            Tensor::from_data(TensorData::new(keys.clone(), [n, d]), &device),
            Some(&valid),
            k,
            metric,
        )
        .unwrap();
        let idx: Vec<i64> = top.indices.into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
        let dist: Vec<f32> = top.distances.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        for q in 0..m {
            for j in 0..k {
                let id = want.id(q, j).unwrap();
                let slot = slot_of_id.iter().find(|(i, _)| *i == id).unwrap().1;
                assert_eq!(idx[q * k + j] as usize, slot, "{metric:?} query {q} rank {j}");
                let dd = (dist[q * k + j] - want.distance(q, j)).abs();
                assert!(dd < 1e-4, "{metric:?} distance off by {dd}");
            }
        }
    }
}

#[test]
fn padding_slots_are_infinite_and_bad_k_is_refused() {
    let device = Device::flex();
    let keys = Tensor::<2>::from_data(TensorData::new(vec![0.0f32, 0.0, 1.0, 0.0, 5.0, 5.0], [3, 2]), &device);
    let valid = [true, false, true];
    let q = Tensor::<2>::from_data(TensorData::new(vec![0.9f32, 0.0], [1, 2]), &device);
    let top = exact_topk(q.clone(), keys.clone(), Some(&valid), 3, Metric::L2).unwrap();
    let dist: Vec<f32> = top.distances.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let idx: Vec<i64> = top.indices.into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
    assert_eq!(idx[..2], [0, 2]);
    assert!((dist[0] - 0.9).abs() < 1e-6 && dist[2] == f32::INFINITY, "{dist:?}");
    assert!(exact_topk(q.clone(), keys.clone(), None, 0, Metric::L2).is_err());
    assert!(exact_topk(q, keys, None, 4, Metric::L2).is_err());
}

/// A tier loaded from the reference store answers like the store:
/// same ids, keys and values; a store larger than the tier is refused.
#[tokio::test]
async fn device_tier_loaded_from_a_store_searches_like_it() {
    use burn_dmt::memory::tier::DeviceMemory;
    let device = Device::flex();
    let (n, dk, dv, m, k) = (200usize, 8usize, 3usize, 25usize, 5usize);
    let mut rng = Rng::new(5);
    let store = InMemoryStore::new(MemoryConfig::new(dk, dv).with_metric(Metric::Cosine)).unwrap();
    let keys = rng.vecs(n, dk);
    let vals = rng.vecs(n, dv);
    store
        .insert(
            Batch::new(Vectors::new(&keys, dk).unwrap(), Vectors::new(&vals, dv).unwrap()),
            0,
        )
        .await
        .unwrap();
    store.delete(&[3, 50, 199]).await.unwrap();
    let tier = DeviceMemory::load(&store, 256, &device).await.unwrap();
    assert_eq!(tier.len(), n - 3);
    let queries = rng.vecs(m, dk);
    let want = store
        .search(Vectors::new(&queries, dk).unwrap(), k, None)
        .await
        .unwrap();
    let got = tier
        .search(Tensor::from_data(TensorData::new(queries.clone(), [m, dk]), &device), k)
        .unwrap();
    let slots: Vec<i64> = got.slots.into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
    let gk: Vec<f32> = got.keys.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let gv: Vec<f32> = got.values.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    for q in 0..m {
        for j in 0..k {
            let s = slots[q * k + j] as usize;
            assert_eq!(tier.id(s), want.id(q, j), "query {q} rank {j}");
            assert_eq!(&gk[(q * k + j) * dk..(q * k + j + 1) * dk], want.key(q, j));
            assert_eq!(&gv[(q * k + j) * dv..(q * k + j + 1) * dv], want.value(q, j));
        }
    }
    assert!(
        DeviceMemory::load(&store, 100, &device).await.is_err(),
        "a tier never grows past its capacity"
    );
}
