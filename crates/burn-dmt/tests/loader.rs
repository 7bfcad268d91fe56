//! Loader errors name the file or the tensor (with both shapes); extra
//! buffers and a tied `lm_head` are accepted; `save_pretrained` round-trips.

mod common;

use std::collections::HashMap;
use std::path::Path;

use burn_dmt::burn::tensor::Device;
use burn_dmt::{DmtError, Gpt2, Gpt2Config};
use common::*;
use safetensors::tensor::TensorView;

/// Copies a fixture into `dst`, rewriting its weights through `edit`
/// (name → (dtype, shape, bytes)).
fn edited(src: &str, dst: &Path, edit: impl FnOnce(&mut HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>)) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(fixture(src).join("config.json"), dst.join("config.json")).unwrap();
    let bytes = std::fs::read(fixture(src).join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut m: HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut m);
    let views: Vec<(String, TensorView<'_>)> = m
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(
        dst.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
}

fn load(dir: &Path) -> Result<Gpt2, DmtError> {
    Gpt2::from_pretrained(dir, &Device::flex())
}

#[test]
fn missing_files_name_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    match load(tmp.path()) {
        Err(DmtError::Io { path, .. }) => assert!(path.ends_with("config.json"), "{path:?}"),
        other => panic!("expected Io for config.json, got {:?}", other.err()),
    }
    std::fs::copy(fixture("tiny-gpt2").join("config.json"), tmp.path().join("config.json")).unwrap();
    match load(tmp.path()) {
        Err(DmtError::Io { path, .. }) => assert!(path.ends_with("model.safetensors"), "{path:?}"),
        other => panic!("expected Io for model.safetensors, got {:?}", other.err()),
    }
}

#[test]
fn missing_tensor_is_named_with_its_shape() {
    let tmp = tempfile::tempdir().unwrap();
    edited("tiny-gpt2", tmp.path(), |m| {
        m.remove("transformer.h.1.mlp.c_fc.bias");
    });
    match load(tmp.path()) {
        Err(DmtError::MissingTensor { name, expected }) => {
            assert_eq!((name.as_str(), expected), ("transformer.h.1.mlp.c_fc.bias", vec![256]))
        }
        other => panic!("expected MissingTensor, got {:?}", other.err()),
    }
}

#[test]
fn misshapen_tensor_reports_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    edited("tiny-gpt2-legacy", tmp.path(), |m| {
        let t = m.get_mut("h.2.mlp.c_fc.weight").unwrap();
        t.1 = vec![192, 48];
    });
    match load(tmp.path()) {
        Err(DmtError::TensorShape { name, expected, found }) => {
            assert_eq!(name, "h.2.mlp.c_fc.weight");
            assert_eq!((expected, found), (vec![48, 192], vec![192, 48]));
        }
        other => panic!("expected TensorShape, got {:?}", other.err()),
    }
}

#[test]
fn unexpected_tensor_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    edited("tiny-gpt2", tmp.path(), |m| {
        m.insert(
            "transformer.h.0.mlp.gate.weight".into(),
            (safetensors::Dtype::F32, vec![2], vec![0; 8]),
        );
    });
    match load(tmp.path()) {
        Err(DmtError::UnexpectedTensor { name, shape }) => {
            assert_eq!((name.as_str(), shape), ("transformer.h.0.mlp.gate.weight", vec![2]))
        }
        other => panic!("expected UnexpectedTensor, got {:?}", other.err()),
    }
}

#[test]
fn a_tied_lm_head_is_accepted_and_a_wrong_one_refused() {
    let tmp = tempfile::tempdir().unwrap();
    edited("tiny-gpt2", tmp.path(), |m| {
        let wte = m["transformer.wte.weight"].clone();
        m.insert("lm_head.weight".into(), wte);
    });
    let model = load(tmp.path()).expect("a tied lm_head loads");
    assert_eq!(model.config().vocab_size, 1000);
    let bad = tmp.path().join("bad");
    edited("tiny-gpt2", &bad, |m| {
        m.insert(
            "lm_head.weight".into(),
            (safetensors::Dtype::F32, vec![3, 64], vec![0; 3 * 64 * 4]),
        );
    });
    assert!(matches!(load(&bad), Err(DmtError::TensorShape { name, .. }) if name == "lm_head.weight"));
}

#[test]
fn half_precision_checkpoints_are_converted() {
    let tmp = tempfile::tempdir().unwrap();
    edited("tiny-gpt2", tmp.path(), |m| {
        for (d, _, b) in m.values_mut() {
            let halves: Vec<u8> = b
                .chunks_exact(4)
                .flat_map(|c| half::bf16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes())
                .collect();
            *d = safetensors::Dtype::BF16;
            *b = halves;
        }
    });
    let model = load(tmp.path()).expect("bf16 loads");
    let full = load(&fixture("tiny-gpt2")).unwrap();
    let (a, b) = (values(model.wte.weight.val()), values(full.wte.weight.val()));
    let d = max_abs_diff(&a, &b);
    assert!(d > 0.0 && d < 1e-2, "bf16 rounding should be small but present: {d}");
}

#[test]
fn bad_config_is_a_typed_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-gpt2").join("config.json")).unwrap()).unwrap();
    c["n_head"] = 5.into();
    std::fs::write(tmp.path().join("config.json"), c.to_string()).unwrap();
    match Gpt2Config::from_file(&tmp.path().join("config.json")) {
        Err(DmtError::Config { path, message }) => {
            assert!(
                path.ends_with("config.json") && message.contains("divisible"),
                "{message}"
            )
        }
        other => panic!("expected Config, got {other:?}"),
    }
    std::fs::write(tmp.path().join("config.json"), "{ not json").unwrap();
    assert!(matches!(
        Gpt2Config::from_file(&tmp.path().join("config.json")),
        Err(DmtError::Config { .. })
    ));
}

#[test]
fn save_pretrained_round_trips_exactly() {
    let device = Device::flex();
    let model = Gpt2::from_pretrained(fixture("tiny-gpt2-legacy"), &device).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    model.save_pretrained(tmp.path()).unwrap();
    let again = Gpt2::from_pretrained(tmp.path(), &device).unwrap();
    assert_eq!(again.config(), model.config());
    let r = reference("tiny-gpt2-legacy");
    let a = values(model.forward(ids(&r["input_ids"], &device), None).unwrap());
    let b = values(again.forward(ids(&r["input_ids"], &device), None).unwrap());
    assert_eq!(a, b);
    let st = std::fs::read(tmp.path().join("model.safetensors")).unwrap();
    let names = safetensors::SafeTensors::deserialize(&st).unwrap().names().len();
    assert_eq!(names, 4 + 12 * 3, "save_pretrained layout: every weight, no buffers");
}
