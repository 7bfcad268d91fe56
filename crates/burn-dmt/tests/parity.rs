//! The acceptance test: both Hugging Face layouts load and reproduce PyTorch
//! `transformers` on the CPU backend in f32 — logits and every hidden state
//! within 1e-4, and greedy decoding token for token, with and without the KV
//! cache.

mod common;

use burn_dmt::burn::tensor::Device;
use burn_dmt::generate::{Sampling, generate};
use burn_dmt::{Gpt2, KvCache};
use common::*;

fn parity(dir: &str) {
    let device = Device::flex();
    let model = Gpt2::from_pretrained(fixture(dir), &device).expect("load the fixture");
    let r = reference(dir);
    let out = model
        .forward_full(ids(&r["input_ids"], &device), None, true)
        .expect("forward");
    assert_eq!(out.logits.dims().to_vec(), r["logits"].shape);
    let d = max_abs_diff(&values(out.logits), &r["logits"].f32s);
    assert!(d <= 1e-4, "{dir}: logits differ by {d}");
    let n = model.config().n_layer;
    assert_eq!(out.hidden_states.len(), n + 1);
    for (i, h) in out.hidden_states.into_iter().enumerate() {
        let want = &r[&format!("hidden_states.{i}")];
        assert_eq!(h.dims().to_vec(), want.shape);
        let d = max_abs_diff(&values(h), &want.f32s);
        assert!(d <= 1e-4, "{dir}: hidden state {i} differs by {d}");
    }
}

#[test]
fn save_pretrained_layout_matches_transformers() {
    parity("tiny-gpt2");
}

#[test]
fn original_gpt2_layout_matches_transformers() {
    parity("tiny-gpt2-legacy");
}

fn greedy(dir: &str) {
    let device = Device::flex();
    let model = Gpt2::from_pretrained(fixture(dir), &device).unwrap();
    let r = reference(dir);
    let prompt: Vec<u32> = r["greedy_prompt"].i64s.iter().map(|&x| x as u32).collect();
    let want: Vec<u32> = r["greedy_output"].i64s.iter().map(|&x| x as u32).collect();
    let new = want.len() - prompt.len();
    let cached = generate(&model, &prompt, new, &Sampling::default(), true).unwrap();
    assert_eq!(cached, want, "{dir}: greedy decoding with the KV cache");
    let uncached = generate(&model, &prompt, new, &Sampling::default(), false).unwrap();
    assert_eq!(uncached, cached, "{dir}: decoding without the cache differs");
}

#[test]
fn greedy_generation_matches_transformers_with_and_without_cache() {
    greedy("tiny-gpt2");
    greedy("tiny-gpt2-legacy");
}

#[test]
fn kv_cache_chunks_give_the_full_forward_logits() {
    let device = Device::flex();
    let model = Gpt2::from_pretrained(fixture("tiny-gpt2"), &device).unwrap();
    let r = reference("tiny-gpt2");
    let all = ids(&r["input_ids"], &device);
    let full = values(model.forward(all.clone(), None).unwrap());
    let [b, t] = all.dims();
    let mut cache = KvCache::new();
    let mut parts = Vec::new();
    for (start, len) in [(0, 5), (5, 1), (6, t - 6)] {
        let logits = model
            .forward(all.clone().narrow(1, start, len), Some(&mut cache))
            .unwrap();
        parts.push(logits);
    }
    assert_eq!(cache.len(), t);
    let chunked = values(burn_dmt::burn::tensor::Tensor::cat(parts, 1));
    assert_eq!(chunked.len(), b * t * model.config().vocab_size);
    let d = max_abs_diff(&full, &chunked);
    assert!(d <= 1e-4, "cached logits differ by {d}");
}

#[test]
fn attention_is_causal() {
    let device = Device::flex();
    let model = Gpt2::from_pretrained(fixture("tiny-gpt2"), &device).unwrap();
    let r = reference("tiny-gpt2");
    let a = ids(&r["input_ids"], &device);
    let [b, t] = a.dims();
    // Change the last token only: no earlier position may notice.
    let mut changed = r["input_ids"].i64s.clone();
    for row in 0..b {
        changed[row * t + t - 1] = (changed[row * t + t - 1] + 1) % 1000;
    }
    let a2 =
        burn_dmt::burn::tensor::Tensor::from_data(burn_dmt::burn::tensor::TensorData::new(changed, [b, t]), &device);
    let la = model.forward(a, None).unwrap();
    let lb = model.forward(a2, None).unwrap();
    let early = max_abs_diff(
        &values(la.clone().narrow(1, 0, t - 1)),
        &values(lb.clone().narrow(1, 0, t - 1)),
    );
    let last = max_abs_diff(&values(la.narrow(1, t - 1, 1)), &values(lb.narrow(1, t - 1, 1)));
    assert!(early < 1e-6, "earlier positions changed by {early}");
    assert!(last > 1e-3, "the changed position itself must change ({last})");
}
