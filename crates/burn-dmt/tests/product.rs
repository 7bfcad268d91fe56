//! Product keys: on a full grid the search answers what an exact search of
//! the same rows answers; empty cells are never answered; off-grid keys,
//! shared cells and recombination are refused without a change; a grid
//! survives its store; `fit_grid` finds a grid it is given.

use std::sync::Arc;

use burn_dmt::burn::tensor::{Device, Tensor, TensorData};
use burn_dmt::memory::product::{ProductKeys, fit_grid};
use burn_dmt::memory::tier::DeviceMemory;
use memstore_api::testkit::util::Rng;
use memstore_api::{InMemoryStore, MemoryConfig, MemoryStore, Metric, math};
use rand_core::SeedableRng as _;

fn floats(t: Tensor<2>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn ints(t: Tensor<2, burn_dmt::burn::tensor::Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().try_to_vec::<i64>().unwrap()
}

fn rows_tensor(t: &[f32], d: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(t.to_vec(), [t.len() / d, d]), device)
}

/// The keys of `parts` random `n × n` grids of `dim`-wide keys, in the row
/// order a tier's fill takes (row `r · parts + p`: partition `p`'s cell `r`).
fn grid_keys(rng: &mut Rng, parts: usize, n: usize, dim: usize) -> Vec<f32> {
    let split = dim / 2;
    let subs: Vec<(Vec<f32>, Vec<f32>)> = (0..parts)
        .map(|_| (rng.vecs(n, split), rng.vecs(n, dim - split)))
        .collect();
    let mut keys = Vec::new();
    for i in 0..n {
        for j in 0..n {
            for (a, b) in &subs {
                keys.extend_from_slice(&a[i * split..(i + 1) * split]);
                keys.extend_from_slice(&b[j * (dim - split)..(j + 1) * (dim - split)]);
            }
        }
    }
    keys
}

fn tier(metric: Metric, dim: usize, parts: usize, n: usize, product: bool) -> DeviceMemory {
    let t = DeviceMemory::new(
        MemoryConfig::new(dim, 3).with_metric(metric),
        parts * n * n,
        &Device::flex(),
    )
    .unwrap()
    .with_parts(parts)
    .unwrap();
    if product { t.with_product_keys().unwrap() } else { t }
}

/// Each query's (id, distance) answers of a tier's search.
fn answers(t: &DeviceMemory, q: &[f32], k: usize) -> Vec<Vec<(Option<u64>, f32)>> {
    let dim = t.config().key_dim;
    let found = t.search(rows_tensor(q, dim, t.device()), k).unwrap();
    let (d, s) = (floats(found.distances), ints(found.slots));
    s.chunks(k)
        .zip(d.chunks(k))
        .map(|(s, d)| {
            s.iter()
                .zip(d)
                .map(|(&s, &d)| (d.is_finite().then(|| t.id(s as usize)).flatten(), d))
                .collect()
        })
        .collect()
}

#[test]
fn on_a_full_grid_product_search_answers_what_exact_search_does() {
    let mut rng = Rng::new(7);
    for metric in [Metric::L2, Metric::InnerProduct] {
        for dim in [6, 7] {
            let (parts, n) = (2, 6);
            let keys = grid_keys(&mut rng, parts, n, dim);
            let values = rng.vecs(parts * n * n, 3);
            let (mut p, mut e) = (tier(metric, dim, parts, n, true), tier(metric, dim, parts, n, false));
            p.fill(&keys, &values, 0).unwrap();
            e.fill(&keys, &values, 0).unwrap();
            assert_eq!(p.product_keys().unwrap().len(), parts * n * n);
            // More queries than the CPU search scores in one block (64 per
            // partition), the last block partial.
            let q = rng.vecs(parts * 150, dim);
            for k in [1, 5, 8] {
                let (got, want) = (answers(&p, &q, k), answers(&e, &q, k));
                for (g, w) in got.iter().zip(&want) {
                    for (a, b) in g.iter().zip(w) {
                        assert_eq!(a.0, b.0, "{metric:?} dim {dim} k {k}: {g:?} vs {w:?}");
                        assert!((a.1 - b.1).abs() <= 1e-5 * b.1.abs().max(1.0), "{g:?} vs {w:?}");
                    }
                }
                // The tensor path (the GPUs') answers the same on the CPU.
                let grid = p.product_keys().unwrap();
                let t = grid.tensor_topk(rows_tensor(&q, dim, &Device::flex()), k).unwrap();
                let h = grid.topk(rows_tensor(&q, dim, &Device::flex()), k).unwrap();
                assert_eq!(ints(t.indices), ints(h.indices), "{metric:?} dim {dim} k {k}");
                for (a, b) in floats(t.distances).iter().zip(floats(h.distances)) {
                    assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
                }
            }
            // The keys (put together from the sub-keys) and the values travel
            // with the slots the grid answers, bit for bit the table's rows.
            let found = p.search(rows_tensor(&q, dim, p.device()), 3).unwrap();
            let (key_table, table) = p.tensors();
            let (key_table, table, slots) = (floats(key_table), floats(table), ints(found.slots));
            let got = found.values.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
            let got_keys = found.keys.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
            for (i, &s) in slots.iter().enumerate() {
                let s = s as usize;
                assert_eq!(got[i * 3..(i + 1) * 3], table[s * 3..(s + 1) * 3]);
                let (g, w) = (&got_keys[i * dim..(i + 1) * dim], &key_table[s * dim..(s + 1) * dim]);
                assert_eq!(
                    g.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    w.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }
}

#[test]
fn empty_cells_are_never_answered_and_an_emptied_sub_key_is_not_searched() {
    let mut rng = Rng::new(11);
    let (dim, n, parts) = (6, 5, 1);
    let keys = grid_keys(&mut rng, parts, n, dim);
    let mut grid = ProductKeys::new(Metric::L2, dim, parts, n * n).unwrap();
    for c in 0..n * n {
        assert_eq!(grid.place(0, &keys[c * dim..(c + 1) * dim], c).unwrap(), c);
    }
    let q = rng.vecs(20, dim);
    let qt = || rows_tensor(&q, dim, &Device::flex());
    // One cell emptied: never answered; every answer is its cell's exact distance.
    grid.remove(7);
    assert_eq!(grid.cell_of(7), None);
    let k = 4;
    for topk in [grid.topk(qt(), k).unwrap(), grid.tensor_topk(qt(), k).unwrap()] {
        let (d, s) = (floats(topk.distances), ints(topk.indices));
        for i in 0..20 {
            for j in 0..k {
                let (dj, sj) = (d[i * k + j], s[i * k + j] as usize);
                if j > 0 {
                    assert!(d[i * k + j - 1] <= dj);
                }
                if dj.is_finite() {
                    assert_ne!(sj, 7);
                    let want = math::distance(Metric::L2, &q[i * dim..(i + 1) * dim], &grid.cell_key(sj));
                    assert!((dj - want).abs() <= 1e-4, "{dj} vs {want}");
                }
            }
        }
    }
    // Every cell of first-half sub-key 2 emptied: the rest is a full 4 × 5
    // grid, searched exactly again.
    for j in 0..n {
        grid.remove(2 * n + j);
    }
    grid.remove(7); // already empty: nothing happens
    let mut left: Vec<usize> = (0..n * n).filter(|&c| c / n != 2 && c != 7).collect();
    // Cell 7 back on the grid (its sub-keys still in use).
    grid.place(0, &keys[7 * dim..8 * dim], 7).unwrap();
    left.push(7);
    let found = grid.topk(qt(), k).unwrap();
    let (d, s) = (floats(found.distances), ints(found.indices));
    for i in 0..20 {
        let mut want: Vec<(f32, usize)> = left
            .iter()
            .map(|&c| {
                (
                    math::distance(Metric::L2, &q[i * dim..(i + 1) * dim], &keys[c * dim..(c + 1) * dim]),
                    c,
                )
            })
            .collect();
        want.sort_by(|a, b| a.0.total_cmp(&b.0));
        let got: Vec<usize> = s[i * k..(i + 1) * k].iter().map(|&x| x as usize).collect();
        assert_eq!(got, want[..k].iter().map(|w| w.1).collect::<Vec<_>>());
        assert!((d[i * k] - want[0].0).abs() < 1e-6);
    }
    // The freed sub-key row takes a new half.
    let mut other = keys[2 * n * dim..(2 * n + 1) * dim].to_vec();
    other[0] += 10.0;
    assert_eq!(grid.place(0, &other, 100).unwrap(), 2 * n);
}

#[test]
fn a_product_tier_refuses_what_its_grid_cannot_hold_without_changing() {
    let mut rng = Rng::new(5);
    let (dim, n, parts) = (4, 3, 2);
    let cap = parts * n * n;
    let config = MemoryConfig::new(dim, 3).with_metric(Metric::L2);
    let device = Device::flex();
    // Shapes and metrics the grid cannot be.
    let new = |c: MemoryConfig, cap: usize, parts: usize| {
        DeviceMemory::new(c, cap, &device)
            .unwrap()
            .with_parts(parts)
            .unwrap()
            .with_product_keys()
    };
    assert!(
        new(config.clone(), 2 * 8, 2).is_err(),
        "8 slots per partition is not n²"
    );
    assert!(new(config.clone().with_metric(Metric::Cosine), cap, parts).is_err());
    assert!(
        new(MemoryConfig::new(1, 3), 4, 1).is_err(),
        "1-wide keys have no halves"
    );

    // Random keys are not a 3 × 3 grid: refused, nothing inserted or pending.
    let mut t = tier(Metric::L2, dim, parts, n, true);
    assert!(t.fill(&rng.vecs(cap, dim), &rng.vecs(cap, 3), 0).is_err());
    assert!(t.is_empty() && !t.has_changes());
    assert!(t.product_keys().unwrap().is_empty());

    // A grid half full, then a second memory for a cell: refused.
    let keys = grid_keys(&mut rng, parts, n, dim);
    t.fill(&keys[..8 * dim], &rng.vecs(8, 3), 0).unwrap();
    assert_eq!(t.len(), 8);
    let before = answers(&t, &keys[..2 * dim], 2);
    let taken = t.take_changes().unwrap();
    assert_eq!(taken.insert_keys.len(), 8 * dim);
    // A batch whose last row repeats a cell: refused as a whole.
    let batch = [&keys[8 * dim..10 * dim], &keys[..dim]].concat();
    assert!(t.insert_parts(&batch, &rng.vecs(3, 3), &[0, 1, 0], 1).is_err());
    assert_eq!(t.len(), 8);
    assert!(!t.has_changes());
    assert_eq!(answers(&t, &keys[..2 * dim], 2), before);
    // The same rows without the repeat go on the grid.
    assert_eq!(
        t.insert_parts(&batch[..2 * dim], &rng.vecs(2, 3), &[0, 1], 1)
            .unwrap()
            .len(),
        2
    );
    assert_eq!(t.product_keys().unwrap().len(), 10);

    // No recombination, no learning of new queries.
    let id = t.id(0).unwrap();
    assert!(t.merge(&[id], &keys[..dim], &[0.0; 3], 1).is_err());
    let q = rows_tensor(&keys[..2 * dim], dim, &device);
    let found = t.search(q.clone(), 2).unwrap();
    let observed = vec![burn_dmt::memory::tier::Observation {
        keys: q.clone(),
        values: Some(Tensor::zeros([2, 3], &device)),
        distances: found.distances,
        slots: found.slots,
    }];
    assert!(t.commit(observed, 1, 4, None).is_err());
    assert_eq!(t.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grid_survives_its_store() {
    let mut rng = Rng::new(3);
    let (dim, n, parts) = (6, 4, 2);
    let mut t = tier(Metric::InnerProduct, dim, parts, n, true);
    let keys = grid_keys(&mut rng, parts, n, dim);
    // All but the last four cells (two per partition).
    let rows = parts * n * n - 4;
    t.fill(&keys[..rows * dim], &rng.vecs(rows, 3), 0).unwrap();
    let store = Arc::new(InMemoryStore::new(t.config().clone()).unwrap());
    store.apply(&t.take_changes().unwrap()).await.unwrap();
    let loaded = DeviceMemory::load_parts(&*store, parts * n * n, parts, &Device::flex())
        .await
        .unwrap()
        .with_product_keys()
        .unwrap();
    assert_eq!(loaded.product_keys().unwrap().len(), rows);
    let q = rng.vecs(parts * 6, dim);
    let (a, b) = (answers(&t, &q, 5), answers(&loaded, &q, 5));
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        assert_eq!(x.0, y.0);
        assert!((x.1 - y.1).abs() < 1e-6);
    }
}

#[test]
fn fit_grid_finds_a_grid_it_is_given_and_averages_its_cells() {
    let mut rng = Rng::new(9);
    let (dim, n, dv) = (5, 4, 2);
    let keys = grid_keys(&mut rng, 1, n, dim);
    // Every cell twice, shuffled, with outputs o and o + 2: the cell's value is o + 1.
    let mut order: Vec<usize> = (0..2 * n * n).collect();
    let mut seed = rand_xoshiro::SplitMix64::seed_from_u64(4);
    use rand_core::RngCore as _;
    for i in (1..order.len()).rev() {
        order.swap(i, (seed.next_u64() % (i as u64 + 1)) as usize);
    }
    let out = |c: usize| [c as f32, -(c as f32)];
    let (mut points, mut outputs) = (Vec::new(), Vec::new());
    for &o in &order {
        let c = o % (n * n);
        points.extend_from_slice(&keys[c * dim..(c + 1) * dim]);
        let extra = if o >= n * n { 2.0 } else { 0.0 };
        outputs.extend(out(c).iter().map(|v| v + extra));
    }
    let mut fit_rng = rand_xoshiro::SplitMix64::seed_from_u64(1);
    let (gk, gv) = fit_grid(&points, &outputs, dim, dv, n, &mut fit_rng).unwrap();
    assert_eq!(gk.len(), n * n * dim);
    // The fitted grid is the given one, cell for cell up to the order of sub-keys.
    let mut seen = vec![false; n * n];
    for cell in 0..n * n {
        let key = &gk[cell * dim..(cell + 1) * dim];
        let c = (0..n * n)
            .find(|&c| &keys[c * dim..(c + 1) * dim] == key)
            .expect("a fitted key is one of the grid's");
        assert!(!seen[c]);
        seen[c] = true;
        assert_eq!(&gv[cell * dv..(cell + 1) * dv], &out(c).map(|v| v + 1.0)[..]);
    }
    // A grid needs n distinct halves.
    let few = keys[..dim].repeat(n * n);
    assert!(fit_grid(&few, &vec![0.0; n * n * dv], dim, dv, n, &mut fit_rng).is_err());
    assert!(fit_grid(&points, &outputs[1..], dim, dv, n, &mut fit_rng).is_err());
}
