//! `inspect::explain` and `inspect::promoted_tokens` on a distilled tiny
//! student (featural block 0, associative block 1): every memory reported
//! is the stored one at the reported distance from the layer's own search
//! key, with the weight the layer gives it; tracing changes no output; the
//! store-backed memory reads the same memories; promoted tokens are the
//! value's direct path to the logits; bad input is refused.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn_dmt::burn::tensor::activation::softmax;
use burn_dmt::burn::tensor::{Device, Int, Tensor, TensorData};
use burn_dmt::continual::serve_from_stores;
use burn_dmt::distill::{load_student, run};
use burn_dmt::inspect::{Explanation, explain, promoted_tokens, top_scores};
use burn_dmt::memory::featural::unit_rows;
use burn_dmt::{DmtError, FeedForward, Gpt2};
use common::{options, tiny_setup};
use memstore_api::{MemoryId, MemoryStore, Metric, math};

fn student(dir: &Path) -> PathBuf {
    let (train, eval) = tiny_setup(dir);
    let mut o = options(dir, train, &eval);
    o.attention_baseline = false;
    run(&o).unwrap();
    o.run_dir
}

fn host(t: Tensor<2>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

const TOKENS: [u32; 9] = [5, 17, 3, 40, 2, 9, 11, 3, 27];

/// Every stored key of `block` and the head whose table holds it, by id.
fn keys(run_dir: &Path, block: usize, rt: &tokio::runtime::Runtime) -> BTreeMap<MemoryId, (Vec<f32>, Option<usize>)> {
    let spec = burn_dmt::distill::read_spec(run_dir).unwrap();
    let s = rt
        .block_on(spec.store_location().unwrap().open_existing(run_dir, block))
        .unwrap()
        .shared();
    let ids = rt.block_on(s.ids()).unwrap();
    rt.block_on(s.get(&ids))
        .unwrap()
        .into_iter()
        .map(|m| {
            let head = m.tags.keys().find_map(|t| t.strip_prefix("head:")?.parse().ok());
            (m.id, (m.key, head))
        })
        .collect()
}

#[test]
fn explain_reports_the_stored_memories_each_layer_reads_with_their_weights() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = student(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let device = Device::flex();
    let (spec, model) = load_student(&run_dir, &device, &rt).unwrap();
    let (h, k) = (spec.config.n_head, spec.k);
    let dh = spec.config.n_embd / h;
    let t = TOKENS.len();

    let e = explain(&model, &TOKENS, 4).unwrap();
    assert_eq!(e.tokens, TOKENS);
    assert_eq!(
        e.layers.iter().map(|l| (l.block, l.kind)).collect::<Vec<_>>(),
        [(0, "featural"), (1, "associative")]
    );

    // The output is the model's: the same next-token distribution as a plain forward pass.
    let ids = Tensor::<2, Int>::from_data(TensorData::new(TOKENS.map(i64::from).to_vec(), [1, t]), &device);
    let logits = model.forward(ids.clone(), None).unwrap();
    let vocab = spec.config.vocab_size;
    let probs = host(softmax(logits.reshape([t, vocab]), 1));
    for (p, next) in e.next.iter().enumerate() {
        assert_eq!(next, &top_scores(&probs[p * vocab..(p + 1) * vocab], 4), "position {p}");
    }
    for b in &model.h {
        assert!(
            b.mlp.tracer().is_none_or(|tr| !tr.is_open()),
            "traces are closed afterwards"
        );
    }

    // Each layer's own search keys, recomputed from its input.
    let (_, ff) = model.forward_with_ff(ids).unwrap();
    for l in &e.layers {
        assert_eq!((l.heads, l.k, l.positions.len()), (h, k, t));
        let stored = keys(&run_dir, l.block, &rt);
        let x = ff[l.block].0.clone();
        let (search, query, scale): (Vec<f32>, Vec<f32>, f32) = match &model.h[l.block].mlp {
            FeedForward::Featural(f) => {
                let q = host(unit_rows(f.query.forward(x).reshape([t * h, dh])));
                (q.clone(), q, host(f.log_tau.val().exp().reshape([1, 1]))[0])
            }
            FeedForward::Associative(a) => {
                let (q, key, _) = a.project(x);
                (host(key), host(q), host(a.log_scale.val().exp().reshape([1, 1]))[0])
            }
            other => panic!("block {} is {}", l.block, other.kind()),
        };
        for (p, read) in l.positions.iter().enumerate() {
            assert_eq!(read.len(), h * k, "every head reads k memories");
            assert!(
                read.windows(2).all(|w| w[0].weight.abs() >= w[1].weight.abs()),
                "heaviest first"
            );
            for head in 0..h {
                let row = p * h + head;
                let mine: Vec<_> = read.iter().filter(|r| r.head == head).collect();
                let mut scores = Vec::new();
                for r in &mine {
                    let key = &stored[&r.id].0;
                    let s = &search[row * dh..(row + 1) * dh];
                    let d = math::distance(Metric::L2, s, key);
                    assert!(
                        (d - r.distance).abs() < 1e-4,
                        "block {} pos {p} head {head} #{}: {d} vs {}",
                        l.block,
                        r.id,
                        r.distance
                    );
                    // The weight the layer gives it.
                    scores.push(match l.kind {
                        "featural" => -d / scale,
                        _ => {
                            let q = &query[row * dh..(row + 1) * dh];
                            -scale * q.iter().zip(key).map(|(a, b)| (a - b) * (a - b)).sum::<f32>()
                        }
                    });
                }
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let total: f32 = scores.iter().map(|s| (s - max).exp()).sum();
                for (r, s) in mine.iter().zip(&scores) {
                    let w = (s - max).exp() / total;
                    assert!(
                        (w - r.weight).abs() < 1e-4,
                        "block {} pos {p} head {head}: weight {} vs {w}",
                        l.block,
                        r.weight
                    );
                }
                // The k nearest of the head's table: nothing nearer is left out.
                let farthest = mine.iter().map(|r| r.distance).fold(0.0f32, f32::max);
                let s = &search[row * dh..(row + 1) * dh];
                for (id, (key, part)) in &stored {
                    let in_table = spec.memory_parts == 1 || *part == Some(head);
                    if in_table && math::distance(Metric::L2, s, key) < farthest - 1e-4 {
                        assert!(
                            mine.iter().any(|r| r.id == *id),
                            "block {} pos {p} head {head}: #{id} is nearer",
                            l.block
                        );
                    }
                }
            }
        }
    }

    // The store's own index reads the same memories.
    same_reads(&e, &served_explain(&run_dir, &device, &rt));
    drop(model);

    // A head's table with fewer than k memories: both read the ones it has,
    // with the same weights, summing to 1, and the same outputs.
    let spec = burn_dmt::distill::read_spec(&run_dir).unwrap();
    {
        let s = rt
            .block_on(spec.store_location().unwrap().open_existing(&run_dir, 0))
            .unwrap()
            .shared();
        let ids = rt.block_on(s.ids()).unwrap();
        let head0: Vec<MemoryId> = rt
            .block_on(s.get(&ids))
            .unwrap()
            .into_iter()
            .filter(|m| m.tags.contains_key("head:0"))
            .map(|m| m.id)
            .collect();
        assert!(head0.len() > k);
        rt.block_on(s.delete(&head0[2..])).unwrap();
    }
    let (_, model) = load_student(&run_dir, &device, &rt).unwrap();
    let device_reads = explain(&model, &TOKENS, 4).unwrap();
    let store_reads = served_explain(&run_dir, &device, &rt);
    for e in [&device_reads, &store_reads] {
        for p in &e.layers[0].positions {
            assert_eq!(p.iter().filter(|r| r.head == 0).count(), 2, "head 0 reads the 2 it has");
            for head in 0..h {
                let w: f32 = p.iter().filter(|r| r.head == head).map(|r| r.weight).sum();
                assert!((w - 1.0).abs() < 1e-4, "head {head}'s weights sum to {w}");
            }
        }
    }
    same_reads(&device_reads, &store_reads);
    for (a, b) in device_reads.next.iter().zip(&store_reads.next) {
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.0, y.0);
            assert!((x.1 - y.1).abs() < 1e-4, "{x:?} vs {y:?}");
        }
    }
}

/// `TOKENS` explained by the student of `run_dir` answering from its stores.
fn served_explain(run_dir: &Path, device: &Device, rt: &tokio::runtime::Runtime) -> Explanation {
    let (_, mut served) = load_student(run_dir, device, rt).unwrap();
    let _stores = serve_from_stores(run_dir, &mut served, rt).unwrap();
    explain(&served, &TOKENS, 4).unwrap()
}

/// Asserts that two explanations read the same memories with the same weights.
fn same_reads(a: &Explanation, b: &Explanation) {
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        for (p, (ra, rb)) in la.positions.iter().zip(&lb.positions).enumerate() {
            let mut ia: Vec<_> = ra.iter().map(|r| (r.head, r.id, r.weight)).collect();
            let mut ib: Vec<_> = rb.iter().map(|r| (r.head, r.id, r.weight)).collect();
            ia.sort_unstable_by_key(|x| (x.0, x.1));
            ib.sort_unstable_by_key(|x| (x.0, x.1));
            assert_eq!(ia.len(), ib.len(), "block {} position {p}", la.block);
            for (x, y) in ia.iter().zip(&ib) {
                assert_eq!((x.0, x.1), (y.0, y.1), "block {} position {p}", la.block);
                assert!(
                    (x.2 - y.2).abs() < 1e-4,
                    "block {} position {p}: weights {} vs {}",
                    la.block,
                    x.2,
                    y.2
                );
            }
        }
    }
}

#[test]
fn promoted_tokens_follow_the_value_to_the_logits() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = student(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let device = Device::flex();
    let (spec, model): (_, Gpt2) = load_student(&run_dir, &device, &rt).unwrap();
    let (n, h) = (spec.config.n_embd, spec.config.n_head);
    let dh = n / h;
    let value: Vec<f32> = (0..dh).map(|i| ((i * 7 % 5) as f32 - 2.0) / 3.0).collect();
    let head = 1;
    let got = promoted_tokens(&model, 0, head, &value, 6).unwrap();
    // By hand: value · W_out[head rows] ⊙ γ · wteᵀ.
    let FeedForward::Featural(f) = &model.h[0].mlp else {
        panic!("block 0 is featural")
    };
    let w = host(f.out.weight.val()); // [n (in), n (out)]
    let gamma = host(model.ln_f.gamma.val().reshape([1, n]));
    let wte = host(model.wte.weight.val()); // [vocab, n]
    let mut r = vec![0.0f32; n];
    for (j, out) in r.iter_mut().enumerate() {
        *out = (0..dh).map(|i| value[i] * w[(head * dh + i) * n + j]).sum::<f32>() * gamma[j];
    }
    let scores: Vec<f32> = wte
        .chunks(n)
        .map(|row| row.iter().zip(&r).map(|(a, b)| a * b).sum())
        .collect();
    let want = top_scores(&scores, 6);
    assert_eq!(
        got.iter().map(|x| x.0).collect::<Vec<_>>(),
        want.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    for (a, b) in got.iter().zip(&want) {
        assert!((a.1 - b.1).abs() < 1e-4, "{a:?} vs {b:?}");
    }

    // Bad input is refused.
    assert!(matches!(
        promoted_tokens(&model, 0, 0, &value[1..], 3),
        Err(DmtError::InvalidArgument(_))
    ));
    assert!(matches!(
        promoted_tokens(&model, 0, h, &value, 3),
        Err(DmtError::InvalidArgument(_))
    ));
    assert!(matches!(
        promoted_tokens(&model, 9, 0, &value, 3),
        Err(DmtError::InvalidArgument(_))
    ));
    assert!(matches!(explain(&model, &[], 3), Err(DmtError::InvalidArgument(_))));
    assert!(matches!(
        explain(&model, &[spec.config.vocab_size as u32], 3),
        Err(DmtError::TokenOutOfRange { .. })
    ));
    let long = vec![1u32; spec.config.n_positions + 1];
    assert!(matches!(
        explain(&model, &long, 3),
        Err(DmtError::SequenceTooLong { .. })
    ));
}
