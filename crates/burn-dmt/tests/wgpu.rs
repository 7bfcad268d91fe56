//! The wgpu backend reproduces `transformers` too (built with the `wgpu`
//! feature, which the root package turns on by default; needs a
//! Vulkan/Metal/DX12 adapter — CI installs Mesa's lavapipe, a CPU Vulkan
//! driver, so this runs without a GPU).
//!
//! They need an adapter, so they are `#[ignore]`d in a plain `cargo test`
//! (a skip shows as a skip); `.ci/run` installs lavapipe and runs them with
//! `cargo test --workspace --test wgpu -- --ignored`, where a missing adapter
//! fails them.

#![cfg(feature = "wgpu")]

mod common;

use burn_dmt::Gpt2;
use burn_dmt::device::{DeviceChoice, Selected, select};
use burn_dmt::generate::{Sampling, generate};
use common::*;

/// The wgpu adapter (these tests fail without one).
fn adapter() -> Selected {
    select(DeviceChoice::Wgpu).unwrap_or_else(|e| panic!("these tests need a Vulkan/Metal/DX12 adapter: {e}"))
}

#[test]
#[ignore = "needs a Vulkan/Metal/DX12 adapter: .ci/run runs it with --ignored on lavapipe"]
fn wgpu_matches_transformers_on_both_layouts() {
    let selected = adapter();
    eprintln!("device: {}", selected.description);
    for dir in ["tiny-gpt2", "tiny-gpt2-legacy"] {
        let model = Gpt2::from_pretrained(fixture(dir), &selected.device).unwrap();
        let r = reference(dir);
        let out = model
            .forward_full(ids(&r["input_ids"], &selected.device), None, true)
            .unwrap();
        let d = max_abs_diff(&values(out.logits), &r["logits"].f32s);
        assert!(d <= 1e-4, "{dir}: wgpu logits differ by {d}");
        for (i, h) in out.hidden_states.into_iter().enumerate() {
            let d = max_abs_diff(&values(h), &r[&format!("hidden_states.{i}")].f32s);
            assert!(d <= 1e-4, "{dir}: wgpu hidden state {i} differs by {d}");
        }
        let prompt: Vec<u32> = r["greedy_prompt"].i64s.iter().map(|&x| x as u32).collect();
        let want: Vec<u32> = r["greedy_output"].i64s.iter().map(|&x| x as u32).collect();
        let got = generate(&model, &prompt, want.len() - prompt.len(), &Sampling::default(), true).unwrap();
        assert_eq!(got, want, "{dir}: wgpu greedy decoding");
    }
}

#[test]
#[ignore = "needs a Vulkan/Metal/DX12 adapter: .ci/run runs it with --ignored on lavapipe"]
fn auto_prefers_a_real_gpu_and_limits_are_known() {
    let wgpu = adapter();
    let auto = select(DeviceChoice::Auto).unwrap();
    eprintln!("wgpu: {} / auto: {}", wgpu.description, auto.description);
    if wgpu.description.ends_with("Cpu)") {
        // Only a software adapter (lavapipe): auto keeps the faster CPU backend.
        assert!(auto.description.starts_with("cpu"), "{}", auto.description);
    } else {
        assert!(auto.description.starts_with("wgpu"), "{}", auto.description);
    }
    let max = wgpu.max_binding_bytes.expect("wgpu reports its binding limit");
    assert!(wgpu.check_fits("a tensor", max).is_ok());
    assert!(matches!(
        wgpu.check_fits("a tensor", max + 1),
        Err(burn_dmt::DmtError::Device(_))
    ));
}

/// `partitioned_topk` on `device` of host queries against host keys (rows
/// of `d` floats).
#[allow(clippy::too_many_arguments)]
fn topk_on(
    device: &burn_dmt::burn::tensor::Device,
    queries: &[f32],
    keys: &[f32],
    d: usize,
    valid: &[bool],
    k: usize,
    metric: memstore_api::Metric,
    parts: usize,
) -> burn_dmt::memory::device::TopK {
    use burn_dmt::burn::tensor::{Tensor, TensorData};
    burn_dmt::memory::device::partitioned_topk(
        Tensor::from_data(TensorData::new(queries.to_vec(), [queries.len() / d, d]), device),
        Tensor::from_data(TensorData::new(keys.to_vec(), [keys.len() / d, d]), device),
        Some(valid),
        k,
        metric,
        parts,
    )
    .unwrap()
}

/// An index tensor's entries.
fn ints(t: burn_dmt::burn::tensor::Tensor<2, burn_dmt::burn::tensor::Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().try_to_vec::<i64>().unwrap()
}

/// The device top-k on wgpu (distances by one matrix product, the inner
/// backend's top-k) finds the CPU path's neighbours for every metric, in one
/// table and within head partitions (one batched product), skips invalid
/// slots, and keeps its result off the autodiff graph when the
/// queries come from a training step (Burn's autodiff decorator has no top-k
/// of its own and would sort the whole distance matrix on the host).
#[test]
#[ignore = "needs a Vulkan/Metal/DX12 adapter: .ci/run runs it with --ignored on lavapipe"]
fn device_topk_on_wgpu_finds_the_cpu_neighbours() {
    use memstore_api::Metric;
    use memstore_api::testkit::util::Rng;

    let selected = adapter();
    let (n, d, m, k) = (500usize, 16usize, 64usize, 8usize);
    for (metric, parts) in [
        (Metric::L2, 1),
        (Metric::Cosine, 1),
        (Metric::InnerProduct, 1),
        (Metric::L2, 4),
        (Metric::Cosine, 4),
    ] {
        let mut rng = Rng::new(23);
        let keys = rng.vecs(n, d);
        let queries = rng.vecs(m, d);
        let valid: Vec<bool> = (0..n).map(|i| i % 7 != 0).collect();
        let search =
            |device: &burn_dmt::burn::tensor::Device| topk_on(device, &queries, &keys, d, &valid, k, metric, parts);
        let want: Vec<f32> = values(search(&burn_dmt::burn::tensor::Device::flex()).distances);
        for device in [selected.device.clone(), selected.device.clone().autodiff()] {
            let top = search(&device);
            assert_eq!(top.distances.is_autodiff(), device.is_autodiff());
            assert!(!top.distances.is_tracked(), "the search is not differentiated");
            let idx = ints(top.indices);
            let got: Vec<f32> = values(top.distances);
            for q in 0..m {
                for j in 0..k {
                    let slot = idx[q * k + j] as usize;
                    assert!(valid[slot], "{metric:?}: query {q} found the invalid slot {slot}");
                    assert_eq!(
                        slot / (n / parts),
                        q % parts,
                        "{metric:?}: query {q} left its partition"
                    );
                    // Ties may order differently; the key found at each rank
                    // must be exactly as near as the CPU path's at that rank.
                    let exact = memstore_api::math::distance(
                        metric,
                        &queries[q * d..(q + 1) * d],
                        &keys[slot * d..(slot + 1) * d],
                    );
                    let w = want[q * k + j];
                    assert!(
                        (exact - w).abs() <= 1e-4 * w.abs().max(1.0),
                        "{metric:?} q {q} rank {j}: {exact} vs {w}"
                    );
                    assert!(
                        (got[q * k + j] - w).abs() <= 1e-3 * w.abs().max(1.0),
                        "{metric:?} q {q} rank {j}"
                    );
                }
            }
        }
    }
}

/// Partitions with fewer valid keys than `k` (one with 3, one with none):
/// every padding entry is what the CPU path answers (the partition's first
/// row at +∞) on the device too, and every real entry is a valid key at the
/// CPU's distance; the memory commit counts only finite distances as
/// accesses.
#[test]
#[ignore = "needs a Vulkan/Metal/DX12 adapter: .ci/run runs it with --ignored on lavapipe"]
fn device_topk_on_wgpu_pads_short_partitions_like_the_cpu() {
    use memstore_api::Metric;
    use memstore_api::testkit::util::Rng;

    let selected = adapter();
    let (parts, per, d, k) = (4usize, 10usize, 8usize, 8usize);
    let n = parts * per;
    let m = parts * 6;
    // Valid keys per partition: 10, 3, 0, 8.
    let valid: Vec<bool> = (0..n)
        .map(|i| {
            let (p, r) = (i / per, i % per);
            r < [10, 3, 0, 8][p]
        })
        .collect();
    for metric in [Metric::L2, Metric::Cosine] {
        let mut rng = Rng::new(5);
        let keys = rng.vecs(n, d);
        let queries = rng.vecs(m, d);
        let search =
            |device: &burn_dmt::burn::tensor::Device| topk_on(device, &queries, &keys, d, &valid, k, metric, parts);
        let cpu = search(&burn_dmt::burn::tensor::Device::flex());
        let want_idx = ints(cpu.indices);
        let want: Vec<f32> = values(cpu.distances);
        for device in [selected.device.clone(), selected.device.clone().autodiff()] {
            let top = search(&device);
            let idx = ints(top.indices);
            let got: Vec<f32> = values(top.distances);
            let mut padded = 0;
            for q in 0..m {
                let p = q % parts;
                for j in 0..k {
                    let (slot, w, g) = (idx[q * k + j] as usize, want[q * k + j], got[q * k + j]);
                    if w.is_infinite() {
                        padded += 1;
                        assert_eq!(want_idx[q * k + j] as usize, p * per, "the CPU pads with the first row");
                        assert!(g == f32::INFINITY, "{metric:?} q {q} rank {j}: padding at {g}, not +∞");
                        assert_eq!(slot, p * per, "{metric:?} q {q} rank {j}: padding names slot {slot}");
                    } else {
                        assert!(valid[slot] && slot / per == p, "{metric:?} q {q} rank {j}: slot {slot}");
                        assert!(
                            (g - w).abs() <= 1e-3 * w.abs().max(1.0),
                            "{metric:?} q {q} rank {j}: {g} vs {w}"
                        );
                    }
                }
            }
            // Per query group of 6: partition 1 pads 5 ranks, partition 2 all 8.
            assert_eq!(padded, 6 * (5 + 8), "{metric:?}");
        }
    }
}

/// On a GPU the tier takes trainable values with a gather (its gradient, a
/// scatter-add, runs in parallel there) instead of the CPU's select: the
/// retrieved values and the gradient reaching the value table are the CPU's,
/// with many queries retrieving the same memory (summed by atomic adds).
#[test]
#[ignore = "needs a Vulkan/Metal/DX12 adapter: .ci/run runs it with --ignored on lavapipe"]
fn value_gradients_on_wgpu_equal_the_cpus() {
    use burn_dmt::burn::tensor::{Device, Tensor, TensorData};
    use burn_dmt::memory::tier::DeviceMemory;
    use memstore_api::MemoryConfig;
    use memstore_api::testkit::util::Rng;

    let selected = adapter();
    let (cap, d, m, k) = (64usize, 8usize, 400usize, 4usize);
    let mut rng = Rng::new(31);
    let (keys, vals) = (rng.vecs(cap, d), rng.vecs(cap, d));
    let (queries, weights) = (rng.vecs(m, d), rng.vecs(m * k * d, 1));
    let run = |device: &Device| {
        let ad = device.clone().autodiff();
        let mut tier = DeviceMemory::new(MemoryConfig::new(d, d), cap, &ad).unwrap();
        tier.fill(&keys, &vals, 1).unwrap();
        tier.set_trainable_values(true);
        let found = tier
            .search(Tensor::from_data(TensorData::new(queries.clone(), [m, d]), &ad), k)
            .unwrap();
        let w = Tensor::<3>::from_data(TensorData::new(weights.clone(), [m, k, d]), &ad);
        let mut grads = (found.values.clone() * w).sum().backward();
        let grad = tier.take_value_grad(&mut grads).expect("a value gradient");
        (values(found.values.reshape([m * k, d])), values(grad.dense(cap)))
    };
    let (want_rows, want_grad) = run(&Device::flex());
    let (rows, grad) = run(&selected.device);
    assert_eq!(rows, want_rows, "the retrieved values");
    let diff = max_abs_diff(&grad, &want_grad);
    assert!(diff <= 1e-4, "value gradients differ by {diff}");
    assert!(want_grad.iter().filter(|g| g.abs() > 0.0).count() > cap * d / 2);
}

#[test]
#[ignore = "needs a Vulkan/Metal/DX12 adapter: .ci/run runs it with --ignored on lavapipe"]
fn the_loss_on_wgpu_equals_the_cpus() {
    use burn_dmt::burn::tensor::{Device, Int, Tensor, TensorData};
    use burn_dmt::loss::distill_loss;
    use memstore_api::testkit::util::Rng;

    let selected = adapter();
    let (b, t, v) = (2usize, 70usize, 301usize);
    let mut rng = Rng::new(5);
    let (s, te) = (rng.vecs(b * t * v, 1), rng.vecs(b * t * v, 1));
    let y: Vec<i64> = (0..b * t).map(|i| ((i * 37) % v) as i64).collect();
    // The CPU takes the host kernel, wgpu the chunked tensor path.
    let run = |device: &Device| {
        let ad = device.clone().autodiff();
        let z = Tensor::<3>::from_data(TensorData::new(s.clone(), [b, t, v]), &ad)
            .mul_scalar(6.0)
            .require_grad();
        let teacher = Tensor::<3>::from_data(TensorData::new(te.clone(), [b, t, v]), device).mul_scalar(6.0);
        let targets = Tensor::<2, Int>::from_data(TensorData::new(y.clone(), [b, t]), device);
        let l = distill_loss(z.clone(), teacher, targets, 2.0, 0.5).unwrap();
        let objective = values(l.objective())[0];
        let grads = l.surrogate.backward();
        (objective, values(z.grad(&grads).expect("a gradient")))
    };
    let (want, want_grad) = run(&Device::flex());
    let (got, grad) = run(&selected.device);
    assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{got} against {want}");
    let peak = want_grad.iter().fold(0f32, |m, g| m.max(g.abs()));
    let diff = max_abs_diff(&grad, &want_grad);
    assert!(
        peak > 0.0 && diff <= 1e-4 * peak,
        "gradients differ by {diff} (largest {peak})"
    );
}

/// A step's shared read ([`burn_dmt::memory::readback::HostReads`]) returns
/// on wgpu what reading each tensor apart returns: the searches'
/// distances and slots (strided views of the top-k, with padding slots
/// where a partition holds fewer valid keys than k), and float rows.
#[test]
#[ignore = "needs a Vulkan/Metal/DX12 adapter: .ci/run runs it with --ignored on lavapipe"]
fn one_shared_read_on_wgpu_returns_what_separate_reads_do() {
    use burn_dmt::burn::tensor::{Tensor, TensorData};
    use burn_dmt::memory::device::partitioned_topk;
    use burn_dmt::memory::readback::HostReads;
    use memstore_api::Metric;
    use memstore_api::testkit::util::Rng;

    let selected = adapter();
    let (n, d, m, k, parts) = (64usize, 8usize, 12usize, 5usize, 4usize);
    let mut rng = Rng::new(5);
    let (keys, queries) = (rng.vecs(n, d), rng.vecs(m, d));
    // Partition 1 holds 3 valid keys, fewer than k.
    let valid: Vec<bool> = (0..n).map(|i| i / 16 != 1 || i % 16 < 3).collect();
    for device in [selected.device.clone(), selected.device.clone().autodiff()] {
        let top = partitioned_topk(
            Tensor::from_data(TensorData::new(queries.clone(), [m, d]), &device),
            Tensor::from_data(TensorData::new(keys.clone(), [n, d]), &device),
            Some(&valid),
            k,
            Metric::L2,
            parts,
        )
        .unwrap();
        let rows = Tensor::<2>::from_data(TensorData::new(rng.vecs(7, 3), [7, 3]), &device);
        let mut reads = HostReads::new();
        let spans = (
            reads.push(top.distances.clone()).unwrap(),
            reads.push_int(top.indices.clone()).unwrap(),
            reads.push(rows.clone()).unwrap(),
        );
        let got = reads.read().unwrap();
        let slots: Vec<f32> = top
            .indices
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap()
            .into_iter()
            .map(|s| s as f32)
            .collect();
        let distances = values(top.distances);
        assert_eq!(got.get(spans.0), &distances[..]);
        assert_eq!(got.get(spans.1), &slots[..]);
        assert_eq!(got.get(spans.2), &values(rows)[..]);
        // Every finite distance names a valid slot of its query's partition.
        for (i, (dist, slot)) in distances.iter().zip(&slots).enumerate() {
            if dist.is_finite() {
                let s = *slot as usize;
                assert!(
                    valid[s] && s / (n / parts) == (i / k) % parts,
                    "row {} slot {s} at {dist}",
                    i / k
                );
            }
        }
    }
}

/// Product-key search on wgpu (the tensor path) finds the cells the CPU's
/// host kernel finds, on a full grid and with a cell and a whole sub-key
/// row emptied (padding included: a partition left with fewer than `k`
/// memories among the candidates).
#[test]
#[ignore = "needs a Vulkan/Metal/DX12 adapter: .ci/run runs it with --ignored on lavapipe"]
fn product_key_search_on_wgpu_finds_the_cpu_cells() {
    use burn_dmt::burn::tensor::{Device, Tensor, TensorData};
    use burn_dmt::memory::product::ProductKeys;
    use memstore_api::Metric;
    use memstore_api::testkit::util::Rng;

    let selected = adapter();
    let (n, d, parts, m, k) = (6usize, 10usize, 2usize, 40usize, 8usize);
    for metric in [Metric::L2, Metric::InnerProduct] {
        let mut rng = Rng::new(29);
        let mut grid = ProductKeys::new(metric, d, parts, n * n).unwrap();
        for p in 0..parts {
            let (a, b) = (rng.vecs(n, d / 2), rng.vecs(n, d - d / 2));
            for i in 0..n {
                for j in 0..n {
                    let key = [&a[i * (d / 2)..(i + 1) * (d / 2)], &b[j * (d / 2)..(j + 1) * (d / 2)]].concat();
                    grid.place(p, &key, p * n * n + i * n + j).unwrap();
                }
            }
        }
        let queries = rng.vecs(m, d);
        let q = |device: &Device| Tensor::<2>::from_data(TensorData::new(queries.clone(), [m, d]), device);
        for emptied in [
            vec![],
            vec![3],
            (0..n).map(|j| n * n + 2 * n + j).chain([n * n + 1]).collect(),
        ] {
            for &s in &emptied {
                grid.remove(s);
            }
            let want = grid.topk(q(&Device::flex()), k).unwrap();
            let (want_d, want_i): (Vec<f32>, Vec<i64>) = (
                values(want.distances),
                want.indices.into_data().convert::<i64>().try_to_vec::<i64>().unwrap(),
            );
            for device in [selected.device.clone(), selected.device.clone().autodiff()] {
                let top = grid.topk(q(&device), k).unwrap();
                assert_eq!(top.distances.is_autodiff(), device.is_autodiff());
                let idx: Vec<i64> = top.indices.into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
                let got = values(top.distances);
                for e in 0..m * k {
                    let w = want_d[e];
                    if w.is_finite() {
                        assert_eq!(idx[e], want_i[e], "{metric:?} emptied {emptied:?} entry {e}");
                        assert!((got[e] - w).abs() <= 1e-3 * w.abs().max(1.0), "{got:?} vs {w}");
                    } else {
                        assert!(got[e].is_infinite(), "{metric:?} entry {e}: {}", got[e]);
                        assert_eq!(idx[e], want_i[e], "padding is the partition's first slot");
                    }
                }
            }
        }
    }
}

/// f16 products on wgpu (lavapipe computes in f16): the tiny GPT-2's
/// logits stay within a stated tolerance of f32's and differ from them
/// (the products did run at half width); the tied head's gradient from
/// f16 products of the scaled loss, unscaled, stays near the f32 one; a
/// distillation run in f16 trains, its weights stay f32, and its losses
/// follow the f32 run's.
#[test]
#[ignore = "needs a Vulkan/Metal/DX12 adapter: .ci/run runs it with --ignored on lavapipe"]
fn f16_products_on_wgpu_stay_near_f32_and_train() {
    use burn_dmt::burn::tensor::{FloatDType, Int, Tensor, TensorData};
    use burn_dmt::loss::{LossKernel, TiedHead, tied_loss};
    use burn_dmt::precision::{LOSS_SCALE, Precision};
    use memstore_api::testkit::util::Rng;

    let selected = adapter();
    let device = selected.device.clone();
    assert!(device.supports_dtype(FloatDType::F16), "lavapipe computes in f16");

    // Logits of the reference model.
    let r = reference("tiny-gpt2");
    let mut model = Gpt2::from_pretrained(fixture("tiny-gpt2"), &device).unwrap();
    let want = values(model.forward(ids(&r["input_ids"], &device), None).unwrap());
    model.set_precision(Precision::F16).unwrap();
    let got = values(model.forward(ids(&r["input_ids"], &device), None).unwrap());
    let peak = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = max_abs_diff(&got, &want);
    eprintln!("f16 logits: max abs diff {diff} (largest logit {peak})");
    assert!(diff > 0.0, "the f16 products did not run");
    assert!(
        diff <= 1e-2 * peak.max(1.0),
        "f16 logits differ by {diff} (largest {peak})"
    );

    // The tied head's gradient with respect to the hidden states (at 512
    // positions and 2,000 tokens most of the logits' gradients are about
    // 1e-6, f16 subnormals unless scaled).
    let (b, t, c, v) = (4usize, 128usize, 64usize, 2000usize);
    let mut rng = Rng::new(8);
    let (h, e) = (rng.vecs(b * t, c), rng.vecs(v, c));
    let y: Vec<i64> = (0..b * t).map(|i| ((i * 13) % v) as i64).collect();
    let grad = |p: Precision, scale: f32| {
        let ad = device.clone().autodiff();
        let hidden = Tensor::<3>::from_data(TensorData::new(h.clone(), [b, t, c]), &ad).require_grad();
        let emb = Tensor::<2>::from_data(TensorData::new(e.clone(), [v, c]), &ad);
        let targets = Tensor::<2, Int>::from_data(TensorData::new(y.clone(), [b, t]), &device);
        let head = TiedHead::with_precision(hidden.clone(), emb, p).unwrap();
        let l = tied_loss(head, None, targets, 2.0, 0.5, LossKernel::Auto).unwrap();
        let grads = l.into_scaled_loss(scale).surrogate.backward();
        values(hidden.grad(&grads).unwrap().div_scalar(scale))
    };
    let exact = grad(Precision::F32, 1.0);
    let peak = exact.iter().fold(0f32, |m, g| m.max(g.abs()));
    let scaled = max_abs_diff(&grad(Precision::F16, LOSS_SCALE), &exact);
    eprintln!("head gradient: largest {peak}, f16 (scaled loss) off by {scaled}");
    assert!(
        scaled > 0.0 && scaled <= 1e-2 * peak,
        "f16 gradient off by {scaled} (largest {peak})"
    );

    // A short distillation in f16 against f32, same seeds.
    let dir = tempfile::tempdir().unwrap();
    let (train, eval) = tiny_setup(dir.path());
    let mut o = options(dir.path(), train, &eval);
    o.device = device.clone();
    o.steps = 3;
    o.attention_baseline = false;
    o.eval_windows = 2;
    let f32_run = burn_dmt::distill::run(&o).unwrap();
    o.run_dir = dir.path().join("f16");
    o.precision = Precision::F16;
    let f16_run = burn_dmt::distill::run(&o).unwrap();
    for (a, w) in f16_run.steps.iter().zip(&f32_run.steps) {
        assert!(a.loss.is_finite());
        assert!((a.loss - w.loss).abs() <= 2e-2 * w.loss.abs(), "{a:?} vs {w:?}");
    }
    assert!((f16_run.student.nll - f32_run.student.nll).abs() <= 2e-2 * f32_run.student.nll);
    // The saved student's weights are f32 (the master weights): its
    // safetensors header names no other dtype.
    let bytes = std::fs::read(o.run_dir.join("student.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    assert!(header.contains("\"F32\"") && !header.contains("\"F16\""), "{header}");
}
