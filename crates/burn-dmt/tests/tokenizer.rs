//! GPT-2's tokenizer from vocab.json + merges.txt.

mod common;

use burn_dmt::DmtError;
use burn_dmt::tokenizer::Gpt2Tokenizer;

#[test]
fn hello_world_encodes_as_gpt2_does() {
    let tok = Gpt2Tokenizer::from_dir(common::assets().join("gpt2-tokenizer")).unwrap();
    assert_eq!(tok.encode("Hello world").unwrap(), vec![15496, 995]);
    assert_eq!(tok.vocab_size(), 50257);
    let text = "First Citizen:\nBefore we proceed any further, hear me speak.";
    let ids = tok.encode(text).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), text);
}

#[test]
fn missing_tokenizer_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    match Gpt2Tokenizer::from_dir(tmp.path()) {
        Err(DmtError::Tokenizer(m)) => assert!(m.contains("vocab.json"), "{m}"),
        other => panic!("expected a tokenizer error, got {:?}", other.err()),
    }
}
