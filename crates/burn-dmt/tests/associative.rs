//! The associative layer: the straight-through estimator gives the stated
//! gradients (checked against autodiff of the plain attention and against
//! finite differences of the surrogate), the layer runs forward and backward
//! inside GPT-2, inserts novel keys within the tier's capacity, and a student
//! with both layer types persists to SQLite and reloads with the same outputs.

mod common;

use burn_dmt::burn::tensor::{Device, Tensor, TensorData};
use burn_dmt::memory::associative::{AssociativeMemory, attend, straight_through, straight_through_values};
use burn_dmt::memory::featural::FeaturalMemory;
use burn_dmt::memory::tier::{CommitCounts, DeviceMemory};
use burn_dmt::{FeedForward, Gpt2};
use common::*;
use memstore_api::testkit::util::Rng;
use memstore_api::{MemoryConfig, MemoryStore, Metric};

fn tensor<const D: usize>(data: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(data, shape), device)
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
    }
}

fn unit(v: &mut [f32], d: usize) {
    for row in v.chunks_mut(d) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= n);
    }
}

fn tier(n: usize, dh: usize, cap: usize, novelty: f32, seed: u64, device: &Device) -> DeviceMemory {
    let mut rng = Rng::new(seed);
    let mut keys = rng.vecs(n, dh);
    unit(&mut keys, dh);
    let values = rng.vecs(n, dh);
    let config = MemoryConfig::new(dh, dh)
        .with_metric(Metric::L2)
        .with_thresholds(novelty / 4.0, novelty);
    let mut t = DeviceMemory::new(config, cap, device).unwrap();
    t.fill(&keys, &values, 0).unwrap();
    t
}

/// A tier whose fill has been taken as the store's first batch.
fn synced(mut t: DeviceMemory) -> DeviceMemory {
    assert_eq!(t.take_changes().unwrap().seq, 1);
    t
}

/// d key inserted = Σ d key returned, d value inserted = Σ d value returned,
/// and the forward value is exactly that of the stored rows.
#[test]
fn straight_through_gives_the_returned_gradients_to_the_inserted_rows() {
    let device = Device::flex().autodiff();
    let (n, k, dh) = (5, 3, 4);
    let mut rng = Rng::new(1);
    let q = tensor(rng.vecs(n, dh), [n, dh], &device).require_grad();
    let kx = tensor(rng.vecs(n, dh), [n, dh], &device).require_grad();
    let vx = tensor(rng.vecs(n, dh), [n, dh], &device).require_grad();
    let stored_k = rng.vecs(n * k, dh);
    let stored_v = rng.vecs(n * k, dh);
    let r = tensor(rng.vecs(n, dh), [n, dh], &device);
    let scale = tensor(vec![1.7], [1], &device);

    let y = attend(
        q.clone(),
        straight_through(kx.clone(), tensor(stored_k.clone(), [n, k, dh], &device)),
        straight_through_values(vx.clone(), tensor(stored_v.clone(), [n, k, dh], &device)),
        scale.clone(),
        None,
    );
    let grads = (y.clone() * r.clone()).sum().backward();
    let (gk, gv) = (values(kx.grad(&grads).unwrap()), values(vx.grad(&grads).unwrap()));

    let rk = tensor(stored_k, [n, k, dh], &device).require_grad();
    let rv = tensor(stored_v, [n, k, dh], &device).require_grad();
    let y2 = attend(q, rk.clone(), rv.clone(), scale, None);
    assert_eq!(values(y), values(y2.clone()), "the forward value is the stored rows'");
    let grads2 = (y2 * r).sum().backward();
    let sum_k = values(rk.grad(&grads2).unwrap().sum_dim(1));
    let sum_v = values(rv.grad(&grads2).unwrap().sum_dim(1));
    close(&gk, &sum_k, 1e-6, "d key");
    close(&gv, &sum_v, 1e-6, "d value");
    assert!(gk.iter().any(|x| x.abs() > 1e-4), "the key gradient is not trivial");
}

/// The layer's gradient with respect to its input equals central finite
/// differences of the surrogate (retrieved = projection + fixed offset).
#[test]
fn associative_gradient_matches_finite_differences_of_the_surrogate() {
    let device = Device::flex().autodiff();
    let (c, h, t, k) = (8, 2, 3, 3);
    let dh = c / h;
    let layer = AssociativeMemory::new(c, h, k, tier(20, dh, 20, 0.5, 2, &device), &device).unwrap();
    let mut rng = Rng::new(3);
    let x0 = rng.vecs(t, c);
    let r = tensor(rng.vecs(t, c), [1, t, c], &device);

    let x = tensor(x0.clone(), [1, t, c], &device).require_grad();
    let y = layer.forward(x.clone()).unwrap();
    let grads = (y * r.clone()).sum().backward();
    let g = values(x.grad(&grads).unwrap());

    // The surrogate: retrieval frozen at x0, as offsets from the projections.
    let (_, k0, v0) = layer.project(tensor(x0.clone(), [1, t, c], &device));
    let found = layer.retrieve(k0.clone()).unwrap();
    let ko = (found.keys.clone() - k0.unsqueeze_dim::<3>(1)).detach();
    let vo = (found.values.clone() - v0.unsqueeze_dim::<3>(1)).detach();
    let surrogate = |xs: Vec<f32>| -> f64 {
        let (q, kx, vx) = layer.project(tensor(xs, [1, t, c], &device));
        let keys = kx.unsqueeze_dim::<3>(1) + ko.clone();
        let vals = vx.unsqueeze_dim::<3>(1) + vo.clone();
        let y = attend(q, keys, vals, layer.log_scale.val().exp(), None);
        let y = layer.out.forward(y.reshape([1, t, c]));
        values((y * r.clone()).sum()).iter().map(|v| *v as f64).sum()
    };
    let eps = 1e-2f32;
    let mut checked = 0;
    for i in 0..t * c {
        let (mut a, mut b) = (x0.clone(), x0.clone());
        a[i] += eps;
        b[i] -= eps;
        let fd = ((surrogate(a) - surrogate(b)) / (2.0 * eps as f64)) as f32;
        assert!(
            (fd - g[i]).abs() <= 2e-3 + 2e-2 * g[i].abs(),
            "x[{i}]: autodiff {} vs fd {fd}",
            g[i]
        );
        checked += 1;
    }
    assert_eq!(checked, t * c);
    assert!(g.iter().any(|v| v.abs() > 1e-5));
}

/// A tiny GPT-2 whose block 0 is featural and block 1 associative.
fn student(device: &Device, cap: usize) -> Gpt2 {
    let mut s = Gpt2::from_pretrained(fixture("tiny-gpt2"), device).unwrap();
    let (c, h) = (s.config().n_embd, s.config().n_head);
    let dh = c / h;
    let f = FeaturalMemory::new(c, h, 4, tier(48, dh, cap, 0.3, 4, device), device).unwrap();
    let a = AssociativeMemory::new(c, h, 4, tier(48, dh, cap, 0.3, 5, device), device).unwrap();
    s.set_feed_forward(0, FeedForward::Featural(f)).unwrap();
    s.set_feed_forward(1, FeedForward::Associative(a)).unwrap();
    s
}

#[test]
fn associative_layers_run_forward_and_backward_in_gpt2() {
    let device = Device::flex().autodiff();
    let s = student(&device, 64);
    let r = reference("tiny-gpt2");
    let logits = s.forward(ids(&r["input_ids"], &device), None).unwrap();
    let grads = logits.powf_scalar(2.0).mean().backward();
    let FeedForward::Associative(a) = &s.h[1].mlp else {
        panic!("block 1 is associative")
    };
    for (name, g) in [
        ("query", a.query.weight.val().grad(&grads).map(values)),
        ("key", a.key.weight.val().grad(&grads).map(values)),
        ("value", a.value.weight.val().grad(&grads).map(values)),
        ("out", a.out.weight.val().grad(&grads).map(values)),
        ("log_scale", a.log_scale.val().grad(&grads).map(values)),
    ] {
        let g = g.unwrap_or_else(|| panic!("no gradient for {name}"));
        assert!(g.iter().all(|x| x.is_finite()), "{name}");
        assert!(g.iter().any(|x| *x != 0.0), "{name} gradient is zero");
    }
}

#[test]
fn novel_keys_are_inserted_within_capacity_and_only_once() {
    let device = Device::flex();
    let (c, h, t) = (8, 2, 3);
    let dh = c / h;
    let mut layer = AssociativeMemory::new(c, h, 2, synced(tier(4, dh, 10, 0.05, 6, &device)), &device).unwrap();
    layer.set_learning(true);
    let x = tensor(Rng::new(8).vecs(t, c), [1, t, c], &device);
    layer.forward(x.clone()).unwrap();
    let done = layer.commit(1, 6, None).unwrap();
    let inserted = done.inserted;
    assert!(
        inserted > 0 && inserted <= 6 && done.merged == 0,
        "random keys are novel against 4 memories: {done:?}"
    );
    assert_eq!(layer.memory().len(), 4 + inserted);
    assert!(layer.memory().len() <= 10, "capacity");
    let batch = layer.memory_mut().take_changes().unwrap();
    assert_eq!(batch.insert_keys.len(), inserted * dh);
    assert_eq!(batch.touch.len(), t * h * 2, "every retrieved slot is accessed");
    // Each inserted key is one of the layer's projected keys.
    let (_, k, _) = layer.project(x.clone());
    let k = values(k);
    for row in batch.insert_keys.chunks(dh) {
        assert!(k.chunks(dh).any(|r| r == row), "inserted key {row:?} was not proposed");
    }
    let before = layer.memory().len();
    layer.forward(x).unwrap();
    let again = layer.commit(2, 100, None).unwrap().merged;
    // Keys already stored are not novel: each merges with its stored copy.
    let batch = layer.memory_mut().take_changes().unwrap();
    assert_eq!(batch.delete.len(), again);
    assert!(
        batch.insert_meta.iter().all(|m| m.created == 1 && m.access_count >= 2),
        "{batch:?}"
    );
    assert_eq!(layer.memory().len(), before);
    layer.set_learning(false);
    layer
        .forward(tensor(Rng::new(9).vecs(t, c), [1, t, c], &device))
        .unwrap();
    assert_eq!(
        layer.commit(3, 100, None).unwrap(),
        CommitCounts::default(),
        "evaluation records and inserts nothing"
    );
}

/// Train-time changes of both layer types reach SQLite through change
/// batches; tiers reloaded from the store give the same logits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_student_persists_to_sqlite_and_reloads_with_identical_outputs() {
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let mut s = student(&device, 64);
    let r = reference("tiny-gpt2");
    let input = ids(&r["input_ids"], &device);
    let mut stores = Vec::new();
    for (i, name) in ["featural", "associative"].iter().enumerate() {
        let ff = s.feed_forward_mut(i).unwrap();
        let tier = match ff {
            FeedForward::Featural(f) => {
                f.set_learning(true);
                f.memory_mut()
            }
            FeedForward::Associative(a) => {
                a.set_learning(true);
                a.memory_mut()
            }
            _ => unreachable!(),
        };
        tier.set_trainable_values(true);
        let store = memstore_any::StoreUrl::Sqlite(dir.path().join(format!("{name}.db")))
            .open(Some(tier.config().clone()))
            .await
            .unwrap();
        store.apply(&tier.take_changes().unwrap()).await.unwrap();
        stores.push(store);
    }
    for tick in 1..=3u64 {
        let logits = s.forward(input.clone(), None).unwrap();
        let mut grads = logits.powf_scalar(2.0).mean().backward();
        for (i, store) in stores.iter().enumerate() {
            let batch = match s.feed_forward_mut(i).unwrap() {
                FeedForward::Featural(f) => {
                    let g = f.memory().take_value_grad(&mut grads).expect("value gradient");
                    f.commit(tick, Some((g, 0.5)), None).unwrap();
                    f.memory_mut().take_changes()
                }
                FeedForward::Associative(a) => {
                    let g = a.memory().take_value_grad(&mut grads).expect("value gradient");
                    a.commit(tick, 8, Some((g, 0.5))).unwrap();
                    a.memory_mut().take_changes()
                }
                _ => unreachable!(),
            };
            store.apply(&batch.expect("changes every step")).await.unwrap();
        }
    }
    let want = values(s.forward(input.clone(), None).unwrap());
    let mut reloaded = s.clone();
    for (i, store) in stores.iter().enumerate() {
        let tier = DeviceMemory::load(store, 64, &device).await.unwrap();
        assert_eq!(tier.len(), store.len().await.unwrap());
        match reloaded.feed_forward_mut(i).unwrap() {
            FeedForward::Featural(f) => *f.memory_mut() = tier,
            FeedForward::Associative(a) => *a.memory_mut() = tier,
            _ => unreachable!(),
        }
    }
    let got = values(reloaded.forward(input, None).unwrap());
    close(&got, &want, 1e-6, "logits after reload");
}

/// Observations closer than the recombination threshold to stored memories
/// are merged with them on the device tier, with the store's arithmetic; the
/// change batches leave the store holding the tier's memories and the merged
/// history (summed access counts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_duplicates_are_recombined_on_the_device_and_in_the_store() {
    use memstore_api::InMemoryStore;
    let device = Device::flex();
    let (c, h, t) = (8, 2, 3);
    let dh = c / h;
    let mut tier0 = tier(4, dh, 20, 0.4, 11, &device);
    let store = InMemoryStore::new(tier0.config().clone()).unwrap();
    store.apply(&tier0.take_changes().unwrap()).await.unwrap();
    let mut layer = AssociativeMemory::new(c, h, 2, tier0, &device).unwrap();
    layer.set_learning(true);
    let x1 = Rng::new(12).vecs(t, c);
    layer.forward(tensor(x1.clone(), [1, t, c], &device)).unwrap();
    let inserted = layer.commit(1, 100, None).unwrap().inserted;
    assert!(inserted > 0);
    let b1 = layer.memory_mut().take_changes().unwrap();
    store.apply(&b1).await.unwrap();

    // The same text again, slightly perturbed: its keys fall within the
    // recombination threshold of the memories the first pass inserted.
    let x2: Vec<f32> = x1
        .iter()
        .enumerate()
        .map(|(i, v)| v + 1e-4 * ((i % 3) as f32 - 1.0))
        .collect();
    let before = store.stats().await.unwrap();
    layer.forward(tensor(x2, [1, t, c], &device)).unwrap();
    let merged = layer.commit(2, 100, None).unwrap().merged;
    assert!(merged > 0, "near-duplicates were merged");
    let b2 = layer.memory_mut().take_changes().unwrap();
    assert!(!b2.delete.is_empty(), "the merged sources are deleted");
    assert!(b2.insert_meta.iter().any(|m| m.access_count >= 3 && m.created == 1));
    let sources: Vec<u64> = b2.delete.clone();
    let counts: u64 = store.get(&sources).await.unwrap().iter().map(|m| m.access_count).sum();
    store.apply(&b2).await.unwrap();
    let after = store.stats().await.unwrap();
    assert_eq!(
        after.len,
        before.len - b2.delete.len() as u64 + (b2.insert_keys.len() / dh) as u64
    );
    // A merged memory's count is its sources' counts (with this step's
    // retrievals of them, at most t·h·k) plus one: the merged rows carry
    // every access (no eviction here: the tier has room).
    let merged_rows: Vec<_> = b2.insert_meta.iter().filter(|m| m.created < 2).collect();
    assert!(!merged_rows.is_empty());
    let carried: u64 = merged_rows.iter().map(|m| m.access_count).sum();
    let floor = counts + merged_rows.len() as u64;
    assert!(
        carried >= floor && carried <= floor + (t * h * 2) as u64,
        "{carried} vs {floor}"
    );
    // The store holds exactly the tier's memories.
    let (keys, vals) = layer.memory().tensors();
    let (keys, vals) = (values(keys), values(vals));
    let mut rows: Vec<(u64, Vec<f32>, Vec<f32>)> = (0..20)
        .filter_map(|s| {
            layer.memory().id(s).map(|id| {
                (
                    id,
                    keys[s * dh..(s + 1) * dh].to_vec(),
                    vals[s * dh..(s + 1) * dh].to_vec(),
                )
            })
        })
        .collect();
    rows.sort_by_key(|r| r.0);
    let ids = store.ids().await.unwrap();
    let stored: Vec<(u64, Vec<f32>, Vec<f32>)> = store
        .get(&ids)
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.id, m.key, m.value))
        .collect();
    assert_eq!(stored, rows);
}

/// With trainable stored values (sparse value updates), the value
/// projection still receives a gradient through the straight-through
/// estimator, the stored values receive theirs, and the values a layer
/// inserts change once its value projection has trained.
#[test]
fn the_value_projection_learns_and_its_inserts_follow_it() {
    let device = Device::flex().autodiff();
    let (c, h, t) = (8, 2, 4);
    let dh = c / h;
    let mut layer = AssociativeMemory::new(c, h, 2, synced(tier(6, dh, 40, 0.05, 21, &device)), &device).unwrap();
    layer.memory_mut().set_trainable_values(true);
    layer.set_learning(true);
    let x = tensor(Rng::new(22).vecs(t, c), [1, t, c], &device);
    let r = tensor(Rng::new(23).vecs(t, c), [1, t, c], &device);
    let y = layer.forward(x.clone()).unwrap();
    let mut grads = (y * r).sum().backward();
    let gw = values(
        layer
            .value
            .weight
            .val()
            .grad(&grads)
            .expect("a value-projection gradient"),
    );
    assert!(
        gw.iter().all(|g| g.is_finite()) && gw.iter().any(|g| g.abs() > 1e-6),
        "{gw:?}"
    );
    let gv = layer
        .memory()
        .take_value_grad(&mut grads)
        .expect("a gradient for the stored values");
    let capacity = layer.memory().capacity();
    assert!(values(gv.dense(capacity)).iter().any(|g| g.abs() > 1e-6));
    let before = layer.clone();
    let first = layer.commit(1, 100, None).unwrap();
    assert!(first.inserted > 0, "random keys are novel: {first:?}");
    let inserted_before = layer.memory_mut().take_changes().unwrap().insert_values;

    // One gradient step on the value projection alone, then the same input
    // into the same (untouched) memory.
    let mut trained = before;
    let w = trained.value.weight.val().inner();
    let g = tensor(gw, [c, c], &device.clone().inner());
    trained.value.weight = burn_dmt::burn::module::Param::from_tensor((w - g.mul_scalar(0.5)).autodiff());
    trained.set_learning(true);
    trained.forward(x).unwrap();
    let second = trained.commit(1, 100, None).unwrap();
    assert_eq!(second.inserted, first.inserted, "the same keys are novel");
    let inserted_after = trained.memory_mut().take_changes().unwrap().insert_values;
    assert_eq!(inserted_after.len(), inserted_before.len());
    let moved = inserted_after
        .iter()
        .zip(&inserted_before)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        moved > 1e-4,
        "inserted values did not follow the value projection ({moved})"
    );
}

/// Evaluation's copy of a student records no autodiff graph (parameters and
/// trainable memory values untracked), while the training student does.
#[test]
fn evaluation_copies_record_no_graph() {
    let device = Device::flex().autodiff();
    let mut s = student(&device, 64);
    for i in 0..2 {
        s.feed_forward_mut(i)
            .and_then(FeedForward::memory_mut)
            .unwrap()
            .set_trainable_values(true);
    }
    let r = reference("tiny-gpt2");
    let input = ids(&r["input_ids"], &device);
    assert!(s.forward(input.clone(), None).unwrap().is_tracked());
    let frozen = burn_dmt::train::untracked(&s);
    let y = frozen.forward(input.clone(), None).unwrap();
    assert!(!y.is_tracked(), "an evaluation pass builds no graph");
    close(
        &values(y),
        &values(s.forward(input, None).unwrap()),
        1e-6,
        "same logits",
    );
    assert!(
        s.h[0].mlp.memory().unwrap().values_trainable(),
        "the original keeps training"
    );
}
