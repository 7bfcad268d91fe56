//! The chunked distillation loss with its hand-written gradient against the
//! recorded one it replaces: `α · distill_kl + (1 − α) · cross_entropy`
//! differentiated by autodiff.

mod common;

use rand_core::{RngCore as _, SeedableRng as _};

use burn_dmt::burn::tensor::{Device, Int, Tensor, TensorData};
use burn_dmt::loss::{LossKernel, TiedHead, cross_entropy_loss, distill_loss, loss_with, tied_loss};
use burn_dmt::train::{SplitMix64, cross_entropy, distill_kl};
use common::{max_abs_diff, values};

fn scalar(t: Tensor<1>) -> f64 {
    f64::from(values(t)[0])
}

/// `[b, t, v]` logits of scale `scale` and `[b, t]` targets, from `seed`.
fn batch(
    b: usize,
    t: usize,
    v: usize,
    scale: f32,
    seed: u64,
    device: &Device,
) -> (Tensor<3>, Tensor<3>, Tensor<2, Int>) {
    let mut rng = SplitMix64::seed_from_u64(seed);
    let mut draw = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale)
            .collect()
    };
    let s = Tensor::from_data(TensorData::new(draw(b * t * v), [b, t, v]), device);
    let te = Tensor::from_data(TensorData::new(draw(b * t * v), [b, t, v]), device);
    let y: Vec<i64> = (0..b * t).map(|i| ((i * 7919 + seed as usize) % v) as i64).collect();
    (s, te, Tensor::from_data(TensorData::new(y, [b, t]), device))
}

#[test]
fn chunked_loss_and_its_gradient_equal_the_recorded_ones() {
    let ad = Device::flex().autodiff();
    let inner = Device::flex();
    // Chunks that divide the positions, that do not, of one row and of all.
    // Positions more than a chunk and not a multiple of it; a vocabulary
    // not a multiple of the host kernel's 8 lanes.
    for (seed, scale, temperature, alpha, kernel) in [
        (1, 1.0, 2.0, 0.5, LossKernel::Host),
        (1, 1.0, 2.0, 0.5, LossKernel::Chunked),
        (2, 8.0, 2.0, 0.9, LossKernel::Host),
        (3, 4.0, 1.0, 0.0, LossKernel::Chunked),
        (4, 3.0, 3.0, 1.0, LossKernel::Host),
        (5, 30.0, 2.0, 0.3, LossKernel::Chunked),
        (5, 30.0, 2.0, 0.3, LossKernel::Host),
        (6, 2.0, 2.0, 0.5, LossKernel::Auto),
    ] {
        let (s, te, y) = batch(3, 37, 53, scale, seed, &inner);
        let z_ref = Tensor::<3>::from_inner(s.clone()).require_grad();
        let reference = distill_kl(z_ref.clone(), te.clone(), temperature).mul_scalar(alpha)
            + cross_entropy(z_ref.clone(), Tensor::from_data(y.to_data(), &ad)).mul_scalar(1.0 - alpha);
        let want = scalar(reference.clone().inner());
        let want_grad = values(z_ref.grad(&reference.backward()).expect("recorded gradient"));

        let z = Tensor::<3>::from_inner(s).require_grad();
        let dl = loss_with(z.clone(), Some(te), y, temperature, alpha, kernel).unwrap();
        let got = scalar(dl.objective());
        let got_grad = values(z.grad(&dl.surrogate.backward()).expect("hand-written gradient"));

        let case = format!("seed {seed} scale {scale} T {temperature} α {alpha} {kernel:?}");
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{case}: objective {got} against {want}"
        );
        let peak = want_grad.iter().fold(0f32, |m, g| m.max(g.abs()));
        assert!(peak > 0.0, "{case}: a loss with a gradient");
        let worst = max_abs_diff(&got_grad, &want_grad);
        assert!(worst <= 1e-5 * peak, "{case}: gradient off by {worst} (largest {peak})");
    }
}

#[test]
fn chunked_loss_parts_are_the_distillation_and_cross_entropy_terms() {
    let inner = Device::flex();
    let (s, te, y) = batch(3, 11, 29, 5.0, 9, &inner);
    let ad_s = Tensor::<3>::from_inner(s.clone());
    let dl = distill_loss(ad_s, te.clone(), y.clone(), 2.0, 0.25).unwrap();
    let kd = scalar(dl.kd.clone());
    let ce = scalar(dl.ce.clone());
    let want_kd = scalar(distill_kl(s.clone(), te, 2.0));
    let want_ce = scalar(cross_entropy(s, y));
    assert!(
        (kd - want_kd).abs() <= 1e-5 * want_kd.abs().max(1.0),
        "KD {kd} against {want_kd}"
    );
    assert!(
        (ce - want_ce).abs() <= 1e-5 * want_ce.abs().max(1.0),
        "CE {ce} against {want_ce}"
    );
    let objective = scalar(dl.objective());
    assert!((objective - (0.25 * kd + 0.75 * ce)).abs() < 1e-5, "{objective}");
}

#[test]
fn chunked_cross_entropy_and_its_gradient_equal_the_recorded_ones() {
    let ad = Device::flex().autodiff();
    let inner = Device::flex();
    let (s, _, y) = batch(4, 9, 31, 6.0, 11, &inner);
    let z_ref = Tensor::<3>::from_inner(s.clone()).require_grad();
    let reference = cross_entropy(z_ref.clone(), Tensor::from_data(y.to_data(), &ad));
    let want = scalar(reference.clone().inner());
    let want_grad = values(z_ref.grad(&reference.backward()).expect("recorded gradient"));
    for kernel in [LossKernel::Host, LossKernel::Chunked] {
        let z = Tensor::<3>::from_inner(s.clone()).require_grad();
        let dl = loss_with(z.clone(), None, y.clone(), 1.0, 0.0, kernel).unwrap();
        assert_eq!(scalar(dl.kd.clone()), 0.0);
        let got = scalar(dl.objective());
        assert!(
            (got - want).abs() <= 1e-5 * want.max(1.0),
            "{kernel:?}: {got} against {want}"
        );
        let got_grad = values(z.grad(&dl.surrogate.backward()).expect("hand-written gradient"));
        let peak = want_grad.iter().fold(0f32, |m, g| m.max(g.abs()));
        let worst = max_abs_diff(&got_grad, &want_grad);
        assert!(
            peak > 0.0 && worst <= 1e-5 * peak,
            "{kernel:?}: gradient off by {worst} (largest {peak})"
        );
    }
    let z = Tensor::<3>::from_inner(s);
    let auto = scalar(cross_entropy_loss(z, y).unwrap().ce);
    assert!((auto - want).abs() <= 1e-5 * want.max(1.0), "{auto} against {want}");
}

#[test]
fn bad_loss_input_is_an_error() {
    let inner = Device::flex();
    let (s, te, y) = batch(1, 4, 9, 1.0, 3, &inner);
    let z = || Tensor::<3>::from_inner(s.clone());
    assert!(
        distill_loss(z(), te.clone(), y.clone(), 0.0, 0.5).is_err(),
        "temperature 0"
    );
    assert!(
        distill_loss(z(), te.clone(), y.clone(), f64::NAN, 0.5).is_err(),
        "temperature NaN"
    );
    let (_, narrow, _) = batch(1, 4, 8, 1.0, 3, &inner);
    assert!(
        distill_loss(z(), narrow, y.clone(), 2.0, 0.5).is_err(),
        "teacher of another vocabulary"
    );
    let outside = Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 1, 9, 2], [1, 4]), &inner);
    let err = loss_with(z(), Some(te.clone()), outside, 2.0, 0.5, LossKernel::Host).unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
    let (_, _, short) = batch(1, 3, 9, 1.0, 3, &inner);
    assert!(
        distill_loss(z(), te.clone(), short.clone(), 2.0, 0.5).is_err(),
        "targets of another shape"
    );
    let (h, e, _) = batch(1, 4, 5, 1.0, 4, &inner);
    let e = e.reshape([4, 5]);
    let head = |h: Tensor<3>| TiedHead::new(h, e.clone().narrow(0, 0, 4)).unwrap();
    assert!(
        TiedHead::new(h.clone(), e.clone().narrow(1, 0, 4)).is_err(),
        "embedding of another width"
    );
    assert!(
        tied_loss(head(h.clone()), Some(te.clone()), y.clone(), 2.0, 0.5, LossKernel::Auto).is_err(),
        "teacher of another vocabulary"
    );
    assert!(
        tied_loss(head(h.clone()), None, short, 2.0, 0.5, LossKernel::Auto).is_err(),
        "targets of another shape"
    );
    assert!(
        tied_loss(head(h), None, y, -1.0, 0.5, LossKernel::Auto).is_err(),
        "negative temperature"
    );
}

/// The loss of a tied head (the logits off the graph) against the same loss
/// of its logits recorded through the head's product: values, and the
/// gradients with respect to the hidden states and the embedding.
#[test]
fn tied_head_loss_and_its_gradients_equal_the_recorded_ones() {
    let inner = Device::flex();
    for (seed, temperature, alpha, kernel, teacher) in [
        (7, 2.0, 0.5, LossKernel::Host, true),
        (8, 2.0, 0.5, LossKernel::Chunked, true),
        (9, 1.0, 0.0, LossKernel::Auto, false),
    ] {
        let (b, t, c, v) = (2, 19, 12, 41);
        let (h, _, y) = batch(b, t, c, 1.5, seed, &inner);
        let (e, _, _) = batch(1, v, c, 1.5, seed + 100, &inner);
        let e = e.reshape([v, c]);
        let (_, te, _) = batch(b, t, v, 3.0, seed + 200, &inner);
        let te = teacher.then_some(te);

        let (h_ref, e_ref) = (
            Tensor::<3>::from_inner(h.clone()).require_grad(),
            Tensor::<2>::from_inner(e.clone()).require_grad(),
        );
        let logits = h_ref
            .clone()
            .reshape([b * t, c])
            .matmul(e_ref.clone().transpose())
            .reshape([b, t, v]);
        let reference = loss_with(logits, te.clone(), y.clone(), temperature, alpha, kernel).unwrap();
        let want = scalar(reference.objective());
        let grads = reference.surrogate.backward();
        let (want_h, want_e) = (values(h_ref.grad(&grads).unwrap()), values(e_ref.grad(&grads).unwrap()));

        let (h_got, e_got) = (
            Tensor::<3>::from_inner(h).require_grad(),
            Tensor::<2>::from_inner(e).require_grad(),
        );
        let (te_kept, y_kept) = (te.clone(), y.clone());
        let tied = tied_loss(
            TiedHead::new(h_got.clone(), e_got.clone()).unwrap(),
            te,
            y,
            temperature,
            alpha,
            kernel,
        )
        .unwrap();
        let got = scalar(tied.objective());
        let grads = tied.into_loss().surrogate.backward();
        let (got_h, got_e) = (values(h_got.grad(&grads).unwrap()), values(e_got.grad(&grads).unwrap()));

        // A frozen embedding: the hidden states' gradient alone.
        let h_only = Tensor::<3>::from_inner(h_got.clone().inner()).require_grad();
        let frozen = Tensor::<2>::from_inner(e_got.clone().inner());
        let grads = tied_loss(
            TiedHead::new(h_only.clone(), frozen.clone()).unwrap(),
            te_kept,
            y_kept,
            temperature,
            alpha,
            kernel,
        )
        .unwrap()
        .into_loss()
        .surrogate
        .backward();
        assert!(frozen.grad(&grads).is_none());
        let only_h = values(h_only.grad(&grads).unwrap());

        let case = format!("seed {seed} T {temperature} α {alpha} {kernel:?} teacher {teacher}");
        assert!(
            max_abs_diff(&only_h, &got_h) <= 1e-6,
            "{case}: a frozen embedding changed the hidden gradient"
        );
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{case}: {got} against {want}"
        );
        for (what, g, w) in [("hidden", &got_h, &want_h), ("embedding", &got_e, &want_e)] {
            let peak = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(peak > 0.0, "{case}: a {what} gradient");
            let worst = max_abs_diff(g, w);
            assert!(
                worst <= 1e-5 * peak,
                "{case}: {what} gradient off by {worst} (largest {peak})"
            );
        }
    }
}
