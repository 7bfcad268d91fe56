//! Key generators shared by the benches (the root's and memstore-index's).

/// `n` deterministic pseudo-random floats in [−1, 1) (SplitMix64).
pub fn data(seed: u64, n: usize) -> Vec<f32> {
    memstore_api::testkit::util::uniform(seed, n)
}

/// Clusters of [`clustered`] keys (fixed: the same centroids for every seed).
pub const CLUSTERS: usize = 1024;
/// Intrinsic dimension of the spread inside a cluster.
pub const INTRINSIC: usize = 16;

/// `n` keys of dimension `dim` that cluster the way embeddings do, unlike
/// [`data`]'s uniform cube (HNSW's hardest case): each key is one of
/// [`CLUSTERS`] fixed centroids (uniform in [−1, 1)^dim) plus a Gaussian
/// offset in a shared random subspace of dimension [`INTRINSIC`] (per
/// coordinate standard deviation 0.29: neighbours within a cluster sit at
/// about half the distance between centroids) plus isotropic noise of
/// standard deviation 0.05. Keys and queries drawn with different seeds come
/// from the same distribution.
pub fn clustered(seed: u64, n: usize, dim: usize) -> Vec<f32> {
    let centroids = data(0xC1u64 << 32, CLUSTERS * dim);
    // Basis rows with unit variance per coordinate: u in [-1, 1) has
    // variance 1/3, so scale by sqrt(3 / INTRINSIC) to make the sum of
    // INTRINSIC unit Gaussians times a basis column have variance 1.
    let scale = (3.0 / INTRINSIC as f32).sqrt();
    let basis: Vec<f32> = data(0xB5u64 << 32, INTRINSIC * dim).iter().map(|x| x * scale).collect();
    let pick = data(seed ^ 0x5EED, n);
    let gauss = gaussian(seed ^ 0x6A55, n * (INTRINSIC + dim));
    let mut out = Vec::with_capacity(n * dim);
    for i in 0..n {
        let c = ((pick[i] + 1.0) * 0.5 * CLUSTERS as f32) as usize % CLUSTERS;
        let z = &gauss[i * (INTRINSIC + dim)..(i + 1) * (INTRINSIC + dim)];
        for j in 0..dim {
            let mut x = centroids[c * dim + j] + 0.05 * z[INTRINSIC + j];
            for (r, zr) in z[..INTRINSIC].iter().enumerate() {
                x += 0.29 * zr * basis[r * dim + j];
            }
            out.push(x);
        }
    }
    out
}

/// `n` standard normal floats (Box–Muller over [`data`]).
fn gaussian(seed: u64, n: usize) -> Vec<f32> {
    let u = data(seed, n + 1);
    let mut out = Vec::with_capacity(n + 1);
    for p in u.chunks(2) {
        let (a, b) = (p[0], *p.get(1).unwrap_or(&0.5));
        let u1 = ((a + 1.0) * 0.5).max(1e-7);
        let u2 = (b + 1.0) * 0.5;
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f32::consts::TAU * u2;
        out.push(r * t.cos());
        out.push(r * t.sin());
    }
    out.truncate(n);
    out
}

/// Keys for a bench: [`clustered`] when `MEMSTORE_BENCH_KEYS=clustered`,
/// else [`data`]'s uniform random keys.
#[allow(dead_code)]
pub fn keys(seed: u64, n: usize, dim: usize) -> Vec<f32> {
    if clustered_keys() {
        clustered(seed, n, dim)
    } else {
        data(seed, n * dim)
    }
}

/// Whether `MEMSTORE_BENCH_KEYS=clustered` asks for clustered keys.
#[allow(dead_code)]
pub fn clustered_keys() -> bool {
    std::env::var("MEMSTORE_BENCH_KEYS").is_ok_and(|v| v == "clustered")
}
