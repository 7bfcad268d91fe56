//! Featural memory layers run forward and backward inside GPT-2 on the CPU
//! backend, and the student is far smaller than the teacher.

mod common;

use burn_dmt::burn::module::Module;
use burn_dmt::burn::tensor::Device;
use burn_dmt::memory::featural::FeaturalMemory;
use burn_dmt::memory::tier::DeviceMemory;
use burn_dmt::{FeedForward, Gpt2};
use common::*;
use memstore_api::MemoryConfig;
use memstore_api::testkit::util::Rng;

fn unit(v: &mut [f32], d: usize) {
    for row in v.chunks_mut(d) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= n);
    }
}

fn student(device: &Device) -> (Gpt2, Gpt2) {
    let teacher = Gpt2::from_pretrained(fixture("tiny-gpt2"), device).unwrap();
    let mut s = Gpt2::from_pretrained(fixture("tiny-gpt2"), device).unwrap();
    let (c, h) = (s.config().n_embd, s.config().n_head);
    let dh = c / h;
    let mut rng = Rng::new(9);
    let n = 64;
    let mut keys = rng.vecs(n, dh);
    unit(&mut keys, dh);
    let values = rng.vecs(n, dh);
    for i in 0..s.config().n_layer {
        let mut mem = DeviceMemory::new(MemoryConfig::new(dh, dh), n, device).unwrap();
        mem.fill(&keys, &values, 0).unwrap();
        let f = FeaturalMemory::new(c, h, 4, mem, device).unwrap();
        s.set_feed_forward(i, FeedForward::Featural(f)).unwrap();
    }
    (teacher, s)
}

#[test]
fn featural_layers_run_forward_and_backward_in_gpt2() {
    let device = Device::flex().autodiff();
    let (_, s) = student(&device);
    let r = reference("tiny-gpt2");
    let logits = s.forward(ids(&r["input_ids"], &device), None).unwrap();
    let loss = logits.powf_scalar(2.0).mean();
    let grads = loss.backward();
    for (i, b) in s.h.iter().enumerate() {
        let FeedForward::Featural(f) = &b.mlp else {
            panic!("block {i} was replaced")
        };
        for (name, g) in [
            ("query.weight", f.query.weight.val().grad(&grads).map(values)),
            ("out.weight", f.out.weight.val().grad(&grads).map(values)),
            ("log_tau", f.log_tau.val().grad(&grads).map(values)),
        ] {
            let g = g.unwrap_or_else(|| panic!("block {i}: no gradient for {name}"));
            assert!(g.iter().all(|x| x.is_finite()), "block {i}: {name} gradient not finite");
            assert!(g.iter().any(|x| *x != 0.0), "block {i}: {name} gradient is zero");
        }
    }
    let wte = s.wte.weight.val().grad(&grads).map(values).expect("embedding gradient");
    assert!(wte.iter().all(|x| x.is_finite()));
}

#[test]
fn a_featural_student_has_under_60_percent_of_the_non_embedding_weights() {
    let device = Device::flex();
    let (t, s) = student(&device);
    let emb = |m: &Gpt2| {
        m.wte.weight.val().dims().iter().product::<usize>() + m.wpe.weight.val().dims().iter().product::<usize>()
    };
    let (tn, sn) = (t.num_params() - emb(&t), s.num_params() - emb(&s));
    eprintln!(
        "non-embedding weights: teacher {tn}, featural student {sn} ({:.1}%)",
        100.0 * sn as f64 / tn as f64
    );
    assert!((sn as f64) < 0.6 * tn as f64, "student {sn} vs teacher {tn}");
}
