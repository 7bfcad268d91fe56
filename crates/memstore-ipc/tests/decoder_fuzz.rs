//! Property tests over random and mutated byte strings for everything that
//! decodes untrusted input: the frame codec, the request and reply decoders
//! and the conversions the daemon applies to decoded requests. None may
//! panic; every failure must be a typed error. (Bounded: a fixed number of
//! cases, a few seconds.)

use bytes::BytesMut;
use memstore_api::{ChangeBatch, MemoryConfig};
use memstore_ipc::protocol::{self, F32s, Request, Response, WireBatch, WireChangeBatch, WireConfig, WireTags};
use proptest::prelude::*;
use tokio_util::codec::Decoder;

fn exercise_request(payload: &[u8]) {
    if let Ok((_, req)) = protocol::decode_frame::<Request>(payload) {
        match req {
            Request::Hello(h) => {
                if let Some(c) = h.config
                    && let Ok(c) = c.to_config()
                {
                    let _ = c.validate();
                }
            }
            Request::Search { queries, .. } => {
                let _ = queries.to_vec("queries");
            }
            Request::Insert { batch, .. } | Request::Learn { batch, .. } => {
                let _ = batch.keys.to_vec("keys");
                let _ = batch.values.to_vec("values");
            }
            Request::UpdateValues { deltas, .. } => {
                let _ = deltas.to_vec("deltas");
            }
            Request::Apply(b) => {
                if let Ok(b) = b.to_batch() {
                    let _ = b.check(&MemoryConfig::new(4, 2), 0, 1);
                }
            }
            _ => {}
        }
    }
    if let Ok((_, Response::Neighbors(n))) = protocol::decode_frame::<Response>(payload) {
        let _ = n.to_neighbors();
    }
    if let Ok((_, Response::Memories(ms))) = protocol::decode_frame::<Response>(payload) {
        for m in ms {
            let _ = m.to_memory();
        }
    }
    if let Ok((_, Response::Welcome { config, .. })) = protocol::decode_frame::<Response>(payload) {
        let _ = config.to_config();
    }
}

fn valid_frames() -> Vec<Vec<u8>> {
    let k = [0.5f32; 8];
    let v = [1.0f32; 4];
    let tags = vec!["a".to_string(), "b".to_string()];
    let cb = ChangeBatch {
        seq: 1,
        tick: 2,
        delete: vec![3],
        update_ids: vec![4],
        deltas: vec![0.5, 0.5],
        touch: vec![5, 6],
        first_id: 7,
        insert_keys: k.to_vec(),
        insert_values: v.to_vec(),
        insert_meta: vec![],
        insert_tags: vec![tags.clone(), vec![]],
        assign_ids: vec![4],
        assign_values: vec![0.25, -0.25],
        tag_counts: vec![(4, "src".into(), 2)],
    };
    let reqs = [
        Request::Hello(protocol::Hello {
            magic: protocol::MAGIC,
            version: protocol::PROTOCOL_VERSION,
            token: Some("t".into()),
            config: Some(WireConfig::from(&MemoryConfig::new(4, 2))),
            store: Some("block0".into()),
        }),
        Request::Learn {
            batch: WireBatch {
                keys: F32s::from_slice(&k),
                key_dim: 4,
                values: F32s::from_slice(&v),
                value_dim: 2,
                tags: WireTags::Same(tags.as_slice().into()),
            },
            tick: 3,
            k: 2,
        },
        Request::Apply(WireChangeBatch::from_batch(&cb)),
        Request::Get(vec![1u64, 2, 3].into()),
    ];
    reqs.iter()
        .map(|r| protocol::encode_frame(9, r, usize::MAX).unwrap()[4..].to_vec())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_payloads_decode_or_fail_cleanly(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
        exercise_request(&payload);
    }

    #[test]
    fn mutated_frames_decode_or_fail_cleanly(which in 0usize..4, flips in proptest::collection::vec((any::<usize>(), 0u8..8), 1..6), cut in any::<usize>()) {
        let mut p = valid_frames()[which].clone();
        for (i, bit) in flips {
            let n = p.len();
            p[i % n] ^= 1 << bit;
        }
        exercise_request(&p);
        let n = p.len();
        exercise_request(&p[..cut % (n + 1)]);
    }

    #[test]
    fn the_codec_splits_any_byte_stream(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
        let mut codec = protocol::codec(1 << 10);
        let mut buf = BytesMut::new();
        for c in chunks {
            buf.extend_from_slice(&c);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(frame)) => {
                        prop_assert!(frame.len() <= 1 << 10);
                        exercise_request(&frame);
                    }
                    Ok(None) => break,
                    Err(_) => return Ok(()),
                }
            }
        }
    }
}
