//! Layerwise feedback ([`burn_dmt::gpt2::Feedback`]): off, the model is
//! GPT-2 as before; on, the KV cache's position-by-position computation is
//! the exact sequential one, teacher-forced parallel passes converge to it,
//! and no gradient flows through what is fed back.

mod common;

use burn_dmt::burn::module::Param;
use burn_dmt::burn::tensor::{Device, Int, Tensor, TensorData};
use burn_dmt::generate::{Sampling, generate};
use burn_dmt::train::{SplitMix64, seeded_normal};
use burn_dmt::{Gpt2, KvCache};
use common::{fixture, ids, max_abs_diff, reference, values};
use rand_core::SeedableRng as _;

/// The tiny fixture with feedback whose projections are large random
/// matrices (not the zero start), so that what is fed back changes the
/// output clearly.
fn with_random_feedback(device: &Device, passes: usize) -> Gpt2 {
    let mut model = Gpt2::from_pretrained(fixture("tiny-gpt2"), device)
        .unwrap()
        .with_feedback(passes)
        .unwrap();
    let c = model.config().n_embd;
    let mut rng = SplitMix64::seed_from_u64(7);
    for p in model.feedback.as_mut().unwrap().proj.iter_mut() {
        // N(0, 0.02²) · 25: a projection of norm about 1 per feature.
        p.weight = Param::from_tensor(seeded_normal(c, c, &mut rng, device).mul_scalar(25.0));
    }
    model
}

fn tokens(device: &Device) -> Tensor<2, Int> {
    ids(&reference("tiny-gpt2")["input_ids"], device)
}

#[test]
fn without_feedback_or_at_its_zero_start_the_outputs_are_bit_identical() {
    let device = Device::flex();
    let plain = Gpt2::from_pretrained(fixture("tiny-gpt2"), &device).unwrap();
    let a = tokens(&device);
    let want = values(plain.forward(a.clone(), None).unwrap());
    // The same model through every teacher-forced entry point.
    assert_eq!(values(plain.forward_parallel(a.clone(), 3).unwrap()), want);
    assert_eq!(values(plain.forward_train(a.clone()).unwrap()), want);
    assert_eq!(values(plain.forward_with_ff(a.clone()).unwrap().0), want);
    assert_eq!(plain.train_passes(), 1);
    // Feedback at its zero start adds exact zeros.
    let fed = plain.clone().with_feedback(2).unwrap();
    assert_eq!(values(fed.forward_train(a.clone()).unwrap()), want);
    assert_eq!(values(fed.forward_with_ff(a.clone()).unwrap().0), want);
    // Position by position (the KV cache's order of operations) it is
    // the plain model's cached computation, bit for bit.
    let mut cache = KvCache::new();
    let [_, t] = a.dims();
    let plain_cached: Vec<_> = (0..t)
        .map(|j| plain.forward(a.clone().narrow(1, j, 1), Some(&mut cache)).unwrap())
        .collect();
    assert_eq!(
        values(fed.forward(a.clone(), None).unwrap()),
        values(Tensor::cat(plain_cached, 1))
    );
    // And the plain model still matches transformers' logits.
    let r = reference("tiny-gpt2");
    let d = max_abs_diff(&want, &r["logits"].f32s);
    assert!(d < 1e-4, "logits differ from the reference by {d}");
}

#[test]
fn cached_decoding_is_the_sequential_computation_and_parallel_passes_converge_to_it() {
    let device = Device::flex();
    let model = with_random_feedback(&device, 2);
    let a = tokens(&device);
    let [b, t] = a.dims();
    let v = model.config().vocab_size;
    let exact = values(model.forward(a.clone(), None).unwrap());
    // t parallel passes: pass j is exact for positions ≤ j.
    let iterated = values(model.forward_parallel(a.clone(), t).unwrap());
    let d = max_abs_diff(&exact, &iterated);
    assert!(
        d < 1e-4,
        "{t} parallel passes differ from the sequential computation by {d}"
    );
    // Two passes (training's approximation) are exact at positions 0 and 1
    // only, and the feedback is strong enough here to show it.
    let two = values(model.forward_parallel(a.clone(), 2).unwrap());
    let at = |x: &[f32], j: usize| -> Vec<f32> {
        (0..b)
            .flat_map(|r| x[(r * t + j) * v..(r * t + j + 1) * v].to_vec())
            .collect()
    };
    for j in 0..2 {
        let d = max_abs_diff(&at(&exact, j), &at(&two, j));
        assert!(d < 1e-4, "position {j}: two passes differ from exact by {d}");
    }
    let late = max_abs_diff(&at(&exact, t - 1), &at(&two, t - 1));
    assert!(
        late > 1e-3,
        "the last position should differ under two passes (by {late})"
    );
    let one = values(model.forward_parallel(a.clone(), 1).unwrap());
    assert!(max_abs_diff(&exact, &one) > 1e-3, "feedback should change the output");
    // Chunks through one cache give the same as one call.
    let mut cache = KvCache::new();
    let parts: Vec<_> = [(0, 3), (3, 1), (4, t - 4)]
        .into_iter()
        .map(|(s, n)| model.forward(a.clone().narrow(1, s, n), Some(&mut cache)).unwrap())
        .collect();
    assert_eq!(cache.len(), t);
    let d = max_abs_diff(&exact, &values(Tensor::cat(parts, 1)));
    assert!(d < 1e-5, "chunked cached logits differ by {d}");
}

#[test]
fn generation_with_the_cache_equals_recomputing_the_whole_sequence() {
    let device = Device::flex();
    let model = with_random_feedback(&device, 2);
    let prompt = [11u32, 402, 7, 93, 250];
    let sampling = Sampling::default();
    let cached = generate(&model, &prompt, 12, &sampling, true).unwrap();
    let recomputed = generate(&model, &prompt, 12, &sampling, false).unwrap();
    assert_eq!(cached, recomputed);
    // The feedback matters to what is generated.
    let plain = Gpt2::from_pretrained(fixture("tiny-gpt2"), &device).unwrap();
    let without = generate(&plain, &prompt, 12, &sampling, true).unwrap();
    assert_ne!(cached, without, "feedback this strong should change greedy generation");
    // Teacher-forced with as many passes as positions, the generated
    // sequence's greedy choices are the same.
    let n = cached.len();
    let all = Tensor::<2, Int>::from_data(
        TensorData::new(cached.iter().map(|&x| x as i64).collect::<Vec<_>>(), [1, n]),
        &device,
    );
    let logits = values(model.forward_parallel(all, n).unwrap());
    let v = model.config().vocab_size;
    for j in prompt.len() - 1..n - 1 {
        let row = &logits[j * v..(j + 1) * v];
        let best = (0..v).fold(0, |m, i| if row[i] > row[m] { i } else { m });
        assert_eq!(best as u32, cached[j + 1], "position {j}");
    }
}

#[test]
fn no_gradient_flows_through_what_is_fed_back() {
    let device = Device::flex().autodiff();
    let model = with_random_feedback(&device, 2);
    let a = tokens(&device).narrow(1, 0, 2);
    let [b, t] = a.dims();
    // Block 0's output depends on block 1 only through feedback (block 1's
    // output at position 0 fed to block 0 at position 1).
    let out = model.forward_full(a.clone(), None, true).unwrap();
    let grads = out.hidden_states[1].clone().sum().backward();
    let fb = model.feedback.as_ref().unwrap();
    let g0 = fb.proj[0].weight.grad(&grads).expect("feedback projection gradient");
    assert!(values(g0).iter().any(|x| x.abs() > 0.0), "the projection must learn");
    assert!(model.h[0].attn.c_attn.weight.grad(&grads).is_some());
    for (name, g) in [
        ("h.1.attn.c_attn", model.h[1].attn.c_attn.weight.grad(&grads)),
        ("h.1.mlp.c_fc", mlp_weight_grad(&model, &grads)),
    ] {
        let zero = g.is_none_or(|g| values(g).iter().all(|&x| x == 0.0));
        assert!(zero, "{name} got a gradient through the feedback");
    }
    // The same through the parallel passes of training.
    let grads = model.forward_parallel(a.clone(), 2).unwrap().sum().backward();
    assert!(fb.proj[0].weight.grad(&grads).is_some());
    // An external signal to the top block is an input too.
    let c = model.config().n_embd;
    let mut rng = SplitMix64::seed_from_u64(3);
    let external = seeded_normal(b * t, c, &mut rng, &device)
        .reshape([b, t, c])
        .require_grad();
    let with = model
        .forward_external(a.clone(), None, Some(external.clone()), false)
        .unwrap()
        .logits;
    let without = model.forward(a.clone(), None).unwrap();
    assert!(max_abs_diff(&values(with.clone()), &values(without)) > 0.0);
    let grads = with.sum().backward();
    assert!(external.grad(&grads).is_none(), "the external signal got a gradient");
    // A signal of the wrong shape is refused.
    let wrong = Tensor::zeros([b, t + 1, c], &device);
    assert!(model.forward_external(a, None, Some(wrong), false).is_err());
}

/// The gradient of block 1's MLP up-projection.
fn mlp_weight_grad(model: &Gpt2, grads: &burn_dmt::burn::tensor::Gradients) -> Option<Tensor<2>> {
    match &model.h[1].mlp {
        burn_dmt::FeedForward::Mlp(m) => m.c_fc.weight.grad(grads),
        _ => panic!("the fixture's blocks are MLPs"),
    }
}

#[test]
fn feedback_needs_two_passes() {
    let device = Device::flex();
    let plain = Gpt2::from_pretrained(fixture("tiny-gpt2"), &device).unwrap();
    assert!(plain.clone().with_feedback(1).is_err());
    let a = tokens(&device);
    let e = Tensor::zeros([a.dims()[0], a.dims()[1], plain.config().n_embd], &device);
    assert!(
        plain.forward_external(a, None, Some(e), false).is_err(),
        "an external signal needs feedback"
    );
}
