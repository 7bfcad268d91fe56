//! Forward throughput (tokens/s) on the CPU backend (burn flex): the tiny
//! fixture's configuration and a GPT-2-small-shaped random model (12 layers,
//! 768 wide, 12 heads) at batch 1 × seq 128. `cargo bench -p burn-dmt`.

use std::time::Duration;

use burn_dmt::burn::tensor::{Device, Int, Tensor, TensorData};
use burn_dmt::{Gpt2, Gpt2Config};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn ids(batch: usize, seq: usize, vocab: usize, device: &Device) -> Tensor<2, Int> {
    let data: Vec<i64> = (0..batch * seq).map(|i| ((i * 7919) % vocab) as i64).collect();
    Tensor::from_data(TensorData::new(data, [batch, seq]), device)
}

fn forward(c: &mut Criterion) {
    let device = Device::flex();
    let mut g = c.benchmark_group("gpt2_forward_cpu");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    let fixture = Gpt2Config::new(2, 64, 4, 128, 1000);
    for (name, config, batch, seq) in [
        ("tiny-fixture", fixture, 8, 128),
        ("gpt2-small-shape", Gpt2Config::gpt2_small(), 1, 128),
    ] {
        let model = Gpt2::init(&config, &device).expect("model");
        let x = ids(batch, seq, config.vocab_size, &device);
        g.throughput(Throughput::Elements((batch * seq) as u64));
        g.bench_with_input(BenchmarkId::new(name, format!("b{batch}xs{seq}")), &x, |b, x| {
            b.iter(|| {
                let logits = model.forward(x.clone(), None).expect("forward");
                // Reading the result forces the computation.
                logits.narrow(1, seq - 1, 1).sum().into_scalar::<f32>()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
