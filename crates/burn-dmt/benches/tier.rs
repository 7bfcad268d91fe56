//! Per-step cost of a memory layer's device tier on the CPU backend (burn
//! flex), at the embedded default's shape: 16 × 64 tokens × 4 heads = 4096
//! queries of dimension 32 against 4096 memories, k = 8. Compared in the same
//! run with the MLP it replaces (128 → 512 → 128, forward and backward).
//! Product keys against exact search at 4,096 and 65,536 rows:
//! `cargo bench -p burn-dmt --bench tier -- product_keys`.
//! `cargo bench -p burn-dmt --bench tier`.

use rand_core::{RngCore as _, SeedableRng as _};
use std::time::Duration;

use burn_dmt::burn::nn::LinearConfig;
use burn_dmt::burn::tensor::{Device, Int, Tensor, TensorData};
use burn_dmt::memory::featural::FeaturalMemory;
use burn_dmt::memory::journal::Journal;
use burn_dmt::memory::tier::DeviceMemory;
use burn_dmt::train::SplitMix64;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use memstore_api::MemoryConfig;

fn data(n: usize, rng: &mut SplitMix64) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect()
}

fn tier_step(c: &mut Criterion) {
    let (b, t, heads, dh, cap, k) = (16usize, 64usize, 4usize, 32usize, 4096usize, 8usize);
    let width = heads * dh;
    let mut rng = SplitMix64::seed_from_u64(3);
    let mut g = c.benchmark_group("memory_layer_step_cpu");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements((b * t) as u64));
    let device = Device::flex();
    let ad = device.clone().autodiff();
    let mut tier = DeviceMemory::new(MemoryConfig::new(dh, dh), cap, &ad).expect("tier");
    let mut keys = data(cap * dh, &mut rng);
    for row in keys.chunks_mut(dh) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= n);
    }
    tier.fill(&keys, &data(cap * dh, &mut rng), 0).expect("fill");
    tier.take_changes();
    tier.set_trainable_values(true);
    let queries = Tensor::<2>::from_data(
        TensorData::new(data(b * t * heads * dh, &mut rng), [b * t * heads, dh]),
        &ad,
    );
    g.bench_function("device top-k search (4096 x 4096 x 32, k 8)", |bench| {
        bench.iter(|| {
            let found = tier.search(queries.clone(), k).expect("search");
            found.distances.sum().into_scalar::<f32>()
        })
    });

    let mut layer = FeaturalMemory::new(width, heads, k, tier, &ad).expect("layer");
    layer.set_learning(true);
    let x = Tensor::<3>::from_data(TensorData::new(data(b * t * width, &mut rng), [b, t, width]), &ad);
    let mut tick = 1;
    g.bench_function(
        "featural layer: forward + backward + commit (touch, sparse value update)",
        |bench| {
            bench.iter(|| {
                let y = layer.forward(x.clone()).expect("forward");
                let mut grads = y.powf_scalar(2.0).mean().backward();
                let vg = layer.memory().take_value_grad(&mut grads).expect("value gradient");
                layer.commit(tick, Some((vg, 0.01)), None).expect("commit");
                let batch = layer.memory_mut().take_changes();
                tick += 1;
                batch.map(|b| b.touch.len())
            })
        },
    );

    let fc = LinearConfig::new(width, 4 * width).init(&ad);
    let proj = LinearConfig::new(4 * width, width).init(&ad);
    g.bench_function("baseline: the MLP it replaces, forward + backward", |bench| {
        bench.iter(|| {
            let y = proj.forward(burn_dmt::burn::tensor::activation::gelu(fc.forward(x.clone())));
            let grads = y.powf_scalar(2.0).mean().backward();
            fc.weight.val().grad(&grads).map(|g| g.dims())
        })
    });
    g.finish();
}

/// The gradient of the retrieved values reaching the tier's value table, at a
/// GPU-sized step (8 × 256 tokens × 12 heads × k 8 = 196,608 rows of 64 from
/// 4096 memories): rows taken by `select` (backward: a select-assign) against
/// `gather` with the row index repeated per column (backward: a scatter-add),
/// on the CPU and, with the `wgpu` feature, on the wgpu adapter.
fn value_gradient(c: &mut Criterion) {
    let (rows, cap, dv) = (196_608usize, 4096usize, 64usize);
    let mut rng = SplitMix64::seed_from_u64(5);
    let table = data(cap * dv, &mut rng);
    let weights = data(rows * dv, &mut rng);
    let slots: Vec<i64> = (0..rows).map(|_| (rng.next_u64() % cap as u64) as i64).collect();
    #[cfg_attr(not(feature = "wgpu"), allow(unused_mut))]
    let mut devices = vec![("cpu", Device::flex())];
    #[cfg(feature = "wgpu")]
    match burn_dmt::device::select(burn_dmt::device::DeviceChoice::Wgpu) {
        Ok(s) => devices.push(("wgpu", s.device)),
        Err(e) => eprintln!("no wgpu rows: {e}"),
    }
    let mut g = c.benchmark_group("value_gradient");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(rows as u64));
    for (name, device) in devices {
        let ad = device.autodiff();
        let values = Tensor::<2>::from_data(TensorData::new(table.clone(), [cap, dv]), &ad).require_grad();
        let w = Tensor::<2>::from_data(TensorData::new(weights.clone(), [rows, dv]), &ad);
        let idx = Tensor::<1, Int>::from_data(TensorData::new(slots.clone(), [rows]), &ad);
        let by_column = idx.clone().reshape([rows, 1]).expand([rows, dv]);
        type Take<'a> = Box<dyn Fn(Tensor<2>) -> Tensor<2> + 'a>;
        let variants: [(&str, Take<'_>); 2] = [
            ("select", Box::new(|v: Tensor<2>| v.select(0, idx.clone()))),
            ("gather", Box::new(|v: Tensor<2>| v.gather(0, by_column.clone()))),
        ];
        for (variant, take) in variants {
            g.bench_function(format!("{name}: {variant}, forward + backward"), |bench| {
                bench.iter(|| {
                    let loss = (take(values.clone()) * w.clone()).sum();
                    let grads = loss.backward();
                    let grad = values.grad(&grads).expect("a value gradient");
                    grad.slice([0..1, 0..1]).into_scalar::<f32>()
                })
            });
        }
    }
    g.finish();
}

/// The host side of a memory layer's commit at a GPU-sized step on a full
/// tier (4096 memories of 64; 8 × 256 tokens × 12 heads × k 8 = 196,608
/// accesses): LRFU accesses, the sparse value update of the accessed rows,
/// 64 inserts that evict 64 memories, the change batch taken and journalled
/// (encoded, checksummed, written and synced).
fn tier_commit(c: &mut Criterion) {
    let (cap, dh, accesses, inserts) = (4096usize, 64usize, 196_608usize, 64usize);
    let mut rng = SplitMix64::seed_from_u64(9);
    let device = Device::flex();
    let mut tier = DeviceMemory::new(MemoryConfig::new(dh, dh), cap, &device).expect("tier");
    tier.fill(&data(cap * dh, &mut rng), &data(cap * dh, &mut rng), 1)
        .expect("fill");
    tier.take_changes();
    let slots: Vec<usize> = (0..accesses).map(|_| (rng.next_u64() % cap as u64) as usize).collect();
    let grad = Tensor::<2>::from_data(TensorData::new(data(cap * dh, &mut rng), [cap, dh]), &device);
    let (keys, values) = (data(inserts * dh, &mut rng), data(inserts * dh, &mut rng));
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut journal, _) = Journal::open(dir.path().join("journal")).expect("journal");
    let mut tick = 1;
    let mut g = c.benchmark_group("tier_commit");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(accesses as u64));
    g.bench_function("196608 accesses, value update, 64 evicting inserts, journal", |bench| {
        bench.iter(|| {
            tick += 1;
            tier.touch(&slots, tick).expect("touch");
            tier.apply_value_grad(grad.clone(), 0.01, &slots).expect("value update");
            tier.insert(&keys, &values, tick).expect("insert");
            let batch = tier.take_changes().expect("a batch");
            journal.append(&batch).expect("append");
            batch.touch.len()
        })
    });
    g.finish();
}

/// A featural layer's training step (forward, backward, commit with the
/// sparse value update, the change batch taken) at the embedded default's
/// shape with one table per head (16 × 64 tokens, 4 heads of 32, k 8):
/// exact search at 4,096 and 65,536 rows against product keys
/// ([`burn_dmt::memory::product`]) at the same rows and at 1,048,576, where
/// any part of the step that grows with the table's rows would show.
fn product_keys(c: &mut Criterion) {
    let (b, t, heads, dh, k) = (16usize, 64usize, 4usize, 32usize, 8usize);
    let width = heads * dh;
    let mut g = c.benchmark_group("product_keys");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements((b * t) as u64));
    let ad = Device::flex().autodiff();
    for (rows, product) in [
        (4096usize, false),
        (4096, true),
        (65_536, true),
        (65_536, false),
        (1_048_576, true),
    ] {
        let mut rng = SplitMix64::seed_from_u64(5);
        let tier = DeviceMemory::new(MemoryConfig::new(dh, dh), rows, &ad)
            .and_then(|t| t.with_parts(heads))
            .expect("tier");
        let per = rows / heads;
        let n = per.isqrt();
        let unit = |v: &mut [f32], scale: f32| {
            for row in v.chunks_mut(dh / 2) {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                row.iter_mut().for_each(|x| *x *= scale / norm);
            }
        };
        // Exact tables hold random unit keys; product tables their grids of
        // unit halves scaled by 1/√2 (unit keys too), row r · heads + h
        // being head h's cell r.
        let mut keys = data(rows * dh, &mut rng);
        let mut tier = if product {
            let mut halves = data(2 * heads * n * dh / 2, &mut rng);
            unit(&mut halves, std::f32::consts::FRAC_1_SQRT_2);
            let half = |h: usize, p: usize, i: usize| {
                let at = ((h * heads + p) * n + i) * (dh / 2);
                &halves[at..at + dh / 2]
            };
            keys.clear();
            for cell in 0..per {
                for p in 0..heads {
                    keys.extend_from_slice(half(0, p, cell / n));
                    keys.extend_from_slice(half(1, p, cell % n));
                }
            }
            tier.with_product_keys().expect("a square partition")
        } else {
            unit(&mut keys, std::f32::consts::FRAC_1_SQRT_2);
            tier
        };
        tier.fill(&keys, &data(rows * dh, &mut rng), 0).expect("fill");
        tier.take_changes();
        let kind = if product { "product-key" } else { "exact" };
        // The tier's search alone (top-k, keys and values gathered), on the
        // layer's shape of queries.
        let queries = Tensor::<2>::from_data(
            TensorData::new(data(b * t * heads * dh, &mut rng), [b * t * heads, dh]),
            &ad,
        );
        g.bench_function(format!("{kind} search only, {rows} rows"), |bench| {
            bench.iter(|| tier.search(queries.clone(), k).map(|t| t.distances.dims()))
        });
        tier.set_trainable_values(true);
        let mut layer = FeaturalMemory::new(width, heads, k, tier, &ad).expect("layer");
        layer.set_learning(true);
        let x = Tensor::<3>::from_data(TensorData::new(data(b * t * width, &mut rng), [b, t, width]), &ad);
        let mut tick = 1;
        let name = format!("{kind} search, {rows} rows");
        g.bench_function(name, |bench| {
            bench.iter(|| {
                let y = layer.forward(x.clone()).expect("forward");
                let mut grads = y.powf_scalar(2.0).mean().backward();
                let vg = layer.memory().take_value_grad(&mut grads).expect("value gradient");
                layer.commit(tick, Some((vg, 0.01)), None).expect("commit");
                let batch = layer.memory_mut().take_changes();
                tick += 1;
                batch.map(|b| b.touch.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, tier_step, value_gradient, tier_commit, product_keys);
criterion_main!(benches);
