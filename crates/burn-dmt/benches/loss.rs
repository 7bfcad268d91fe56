//! The distillation loss and its gradient with respect to the student's
//! logits, at the main job's shape (8 × 128 positions, the bundled
//! teacher's 11,266-token vocabulary) on the CPU backend: recorded by
//! autodiff (`distill_kl` + `cross_entropy`, then `backward`) against the
//! hand-written gradient of `burn_dmt::loss` (host kernel and chunked
//! tensor path), in one run. `cargo bench -p burn-dmt --bench loss`.

use std::time::Duration;

use burn_dmt::burn::tensor::{Device, Int, Tensor, TensorData};
use burn_dmt::loss::{LossKernel, loss_with};
use burn_dmt::train::{cross_entropy, distill_kl};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn logits(b: usize, t: usize, v: usize, seed: usize, device: &Device) -> Tensor<3> {
    let data: Vec<f32> = (0..b * t * v)
        .map(|i| (((i * 2654435761 + seed) % 10007) as f32 / 10007.0 - 0.5) * 8.0)
        .collect();
    Tensor::from_data(TensorData::new(data, [b, t, v]), device)
}

fn loss(c: &mut Criterion) {
    let (b, t, v) = (8, 128, 11_266);
    let (temperature, alpha) = (2.0, 0.5);
    let device = Device::flex();
    let ad = device.clone().autodiff();
    let s = logits(b, t, v, 1, &device);
    let te = logits(b, t, v, 2, &device);
    let y: Vec<i64> = (0..b * t).map(|i| ((i * 7919) % v) as i64).collect();
    let y = Tensor::<2, Int>::from_data(TensorData::new(y, [b, t]), &device);
    let y_ad = Tensor::<2, Int>::from_data(y.to_data(), &ad);
    let mut g = c.benchmark_group("distill_loss_and_gradient_cpu");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements((b * t) as u64));
    let shape = format!("{b}x{t}x{v}");
    g.bench_function(BenchmarkId::new("recorded", &shape), |bench| {
        bench.iter(|| {
            let z = Tensor::<3>::from_inner(s.clone()).require_grad();
            let l = distill_kl(z.clone(), te.clone(), temperature).mul_scalar(alpha)
                + cross_entropy(z.clone(), y_ad.clone()).mul_scalar(1.0 - alpha);
            let grads = l.backward();
            z.grad(&grads).expect("gradient").sum().into_scalar::<f32>()
        })
    });
    for (name, kernel) in [("host", LossKernel::Host), ("chunked", LossKernel::Chunked)] {
        g.bench_function(BenchmarkId::new(name, &shape), |bench| {
            bench.iter(|| {
                let z = Tensor::<3>::from_inner(s.clone()).require_grad();
                let l = loss_with(z.clone(), Some(te.clone()), y.clone(), temperature, alpha, kernel).expect("loss");
                let grads = l.surrogate.backward();
                z.grad(&grads).expect("gradient").sum().into_scalar::<f32>()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, loss);
criterion_main!(benches);
