//! A tier's commit is the store's `learn` on the device tier — record the
//! accesses of what the searches found, apply the sparse value update to
//! those rows, recombine close observations with their neighbours, insert
//! novel ones — and several tiers' commits share two reads from the
//! device, whether their second stages gather into one batch or each into
//! its own ([`HostReads::read_all`]). This file holds one test so that the
//! process-wide read counter sees no other test's reads.

use burn_dmt::burn::tensor::{Device, Tensor, TensorData};
use burn_dmt::memory::readback::HostReads;
use burn_dmt::memory::tier::{CommitCounts, CommitRequest, DeviceMemory, Observation};
use memstore_api::testkit::util::Rng;
use memstore_api::{EvictionPolicy, MemoryConfig, MemoryId, Metric, math};

const DK: usize = 4;
const DV: usize = 3;
const CAP: usize = 24;
const K: usize = 3;
const RECOMBINE: f32 = 0.3;
const NOVELTY: f32 = 0.9;

fn config() -> MemoryConfig {
    MemoryConfig::new(DK, DV)
        .with_metric(Metric::L2)
        .with_eviction(EvictionPolicy::Lrfu { lambda: 0.3 })
        .with_thresholds(RECOMBINE, NOVELTY)
}

fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn rows(t: Vec<f32>, d: usize, device: &Device) -> Tensor<2> {
    let n = t.len() / d;
    Tensor::from_data(TensorData::new(t, [n, d]), device)
}

/// Every memory of the tier, by id: key and value.
fn tier_rows(tier: &DeviceMemory) -> Vec<(MemoryId, Vec<f32>, Vec<f32>)> {
    let (k, v) = tier.tensors();
    let (k, v) = (floats(k), floats(v));
    let mut out: Vec<_> = (0..tier.capacity())
        .filter_map(|s| {
            tier.id(s)
                .map(|id| (id, k[s * DK..(s + 1) * DK].to_vec(), v[s * DV..(s + 1) * DV].to_vec()))
        })
        .collect();
    out.sort_by_key(|r| r.0);
    out
}

/// One step's observation: near copies of stored keys (close), far points
/// (novel, two of them near-duplicates of each other) and points between.
struct Step {
    queries: Vec<f32>,
    values: Vec<f32>,
    grad: Vec<f32>,
}

fn step(tier: &DeviceMemory, rng: &mut Rng) -> Step {
    let stored = tier_rows(tier);
    let mut queries = Vec::new();
    for (_, key, _) in stored.iter().step_by(4).take(4) {
        queries.extend(key.iter().map(|x| x + 0.01 * rng.unit()));
    }
    let far: Vec<f32> = rng.vecs(1, DK).iter().map(|x| 4.0 + x).collect();
    queries.extend(&far);
    queries.extend(far.iter().map(|x| x + 0.01));
    queries.extend(rng.vecs(2, DK).iter().map(|x| -4.0 * x));
    queries.extend(rng.vecs(2, DK));
    let n = queries.len() / DK;
    Step {
        values: rng.vecs(n, DV),
        grad: rng.vecs(CAP, DV),
        queries,
    }
}

fn request(tier: &DeviceMemory, s: &Step, tick: u64, max_inserts: usize) -> CommitRequest {
    let device = tier.device().clone();
    let q = rows(s.queries.clone(), DK, &device);
    let found = tier.search(q.clone(), K).unwrap();
    CommitRequest {
        observed: vec![Observation {
            keys: q,
            values: Some(rows(s.values.clone(), DV, &device)),
            distances: found.distances,
            slots: found.slots,
        }],
        tick,
        max_inserts,
        value_grad: Some((rows(s.grad.clone(), DV, &device).into(), 0.25)),
    }
}

/// The commit spelled out with the tier's single-purpose operations, each
/// reading from the device on its own: the reference.
fn by_steps(tier: &mut DeviceMemory, s: &Step, tick: u64, max_inserts: usize) -> CommitCounts {
    let device = tier.device().clone();
    let found = tier.search(rows(s.queries.clone(), DK, &device), K).unwrap();
    let d = floats(found.distances);
    let slots: Vec<i64> = found.slots.into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
    let touched: Vec<usize> = slots
        .iter()
        .zip(&d)
        .filter(|(_, d)| d.is_finite())
        .map(|(&s, _)| s as usize)
        .collect();
    tier.touch(&touched, tick).unwrap();
    tier.apply_value_grad(rows(s.grad.clone(), DV, &device), 0.25, &touched)
        .unwrap();
    let n = s.queries.len() / DK;
    let key = |i: usize| s.queries[i * DK..(i + 1) * DK].to_vec();
    let value = |i: usize| s.values[i * DV..(i + 1) * DV].to_vec();
    let items: Vec<_> = (0..n)
        .filter(|&i| d[i * K] < RECOMBINE)
        .map(|i| {
            let sources = (0..K)
                .filter(|&j| d[i * K + j] < RECOMBINE)
                .filter_map(|j| tier.id(slots[i * K + j] as usize))
                .collect();
            (key(i), value(i), sources)
        })
        .collect();
    let merged = tier.merge_many(&items, tick, max_inserts).unwrap().len();
    let parts = tier.parts();
    let (mut keys, mut values, mut kept) = (Vec::new(), Vec::new(), Vec::new());
    for i in (0..n).filter(|&i| d[i * K] > NOVELTY) {
        if merged + kept.len() >= max_inserts {
            break;
        }
        let k = key(i);
        let far = keys
            .chunks(DK)
            .zip(&kept)
            .filter(|(_, p)| **p == i % parts)
            .all(|(o, _): (&[f32], _)| math::distance(Metric::L2, &k, o) > NOVELTY);
        if far {
            keys.extend_from_slice(&k);
            values.extend(value(i));
            kept.push(i % parts);
        }
    }
    let inserted = tier.insert_parts(&keys, &values, &kept, tick).unwrap().len();
    CommitCounts {
        accessed: touched.len(),
        merged,
        inserted,
    }
}

#[test]
fn tiers_commit_together_in_two_reads_as_each_would_alone() {
    let device = Device::flex();
    let mut rng = Rng::new(17);
    let mut tiers: Vec<DeviceMemory> = [1usize, 2, 1]
        .iter()
        .map(|&parts| {
            let mut t = DeviceMemory::new(config(), CAP, &device)
                .unwrap()
                .with_parts(parts)
                .unwrap();
            t.fill(&rng.vecs(18, DK), &rng.vecs(18, DV), 1).unwrap();
            t.take_changes().unwrap();
            t
        })
        .collect();
    let mut reference = tiers.clone();
    let (mut merged, mut inserted, mut evicted) = (0, 0, 0);
    for tick in 2..6u64 {
        let steps: Vec<Step> = tiers.iter().map(|t| step(t, &mut rng)).collect();
        let limit = 1 + tick as usize;
        let expected: Vec<CommitCounts> = reference
            .iter_mut()
            .zip(&steps)
            .map(|(t, s)| by_steps(t, s, tick, limit))
            .collect();

        let requests: Vec<CommitRequest> = tiers
            .iter()
            .zip(&steps)
            .map(|(t, s)| request(t, s, tick, limit))
            .collect();
        let before = burn_dmt::host_reads();
        let mut batch = HostReads::new();
        let gathered: Vec<_> = tiers
            .iter()
            .zip(requests)
            .map(|(t, r)| t.commit_gather(r, &mut batch).unwrap())
            .collect();
        let found = batch.read().unwrap();
        let counts: Vec<CommitCounts> = if tick % 2 == 0 {
            // One batch for every tier's second stage.
            let mut batch = HostReads::new();
            let planned: Vec<_> = tiers
                .iter_mut()
                .zip(gathered)
                .map(|(t, g)| t.commit_plan(g, &found, &mut batch).unwrap())
                .collect();
            let rows_read = batch.read().unwrap();
            tiers
                .iter_mut()
                .zip(planned)
                .map(|(t, p)| t.commit_finish(p, &rows_read).unwrap())
                .collect()
        } else {
            // A batch per tier (as tiers that plan side by side gather),
            // read together, with an empty batch among them.
            let (mut planned, mut batches) = (Vec::new(), Vec::new());
            for (t, g) in tiers.iter_mut().zip(gathered) {
                let mut batch = HostReads::new();
                planned.push(t.commit_plan(g, &found, &mut batch).unwrap());
                batches.push(batch);
            }
            batches.insert(1, HostReads::new());
            let mut rows_read = HostReads::read_all(batches).unwrap();
            assert_eq!(rows_read.len(), 4);
            rows_read.remove(1);
            tiers
                .iter_mut()
                .zip(planned)
                .zip(&rows_read)
                .map(|((t, p), r)| t.commit_finish(p, r).unwrap())
                .collect()
        };
        assert_eq!(burn_dmt::host_reads() - before, 2, "three tiers, two reads");

        assert_eq!(counts, expected, "step {tick}");
        for (a, b) in tiers.iter_mut().zip(reference.iter_mut()) {
            assert_eq!(tier_rows(a), tier_rows(b), "step {tick}");
            assert_eq!(a.layout(), b.layout());
            let (ba, bb) = (a.take_changes(), b.take_changes());
            evicted += ba.as_ref().map_or(0, |b| b.delete.len());
            assert_eq!(ba, bb, "step {tick}");
        }
        merged += counts.iter().map(|c| c.merged).sum::<usize>();
        inserted += counts.iter().map(|c| c.inserted).sum::<usize>();
    }
    assert!(
        merged > 0 && inserted > 0 && evicted > 0,
        "{merged} {inserted} {evicted}"
    );

    // A non-finite value gradient is refused at the last stage, with every
    // key and value as it was.
    let t = &mut tiers[0];
    let s = step(t, &mut rng);
    let mut r = request(t, &s, 9, 4);
    let nan = vec![f32::NAN; CAP * DV];
    r.value_grad = Some((rows(nan, DV, &device).into(), 0.25));
    let held = tier_rows(t);
    assert!(t.commit_request(r).is_err());
    assert_eq!(tier_rows(t), held);
}
