//! The journal under damage, exhaustively: every truncation, every bit of
//! every record header, 10,000 random payload bits, and zero tails of 8 to
//! 4,096 bytes. `open` must return either an error (leaving the file as it
//! was) or exactly the records written whole before the damage, and must
//! never cut off a record that follows a damaged one.

use std::path::Path;

use burn_dmt::memory::journal::{Journal, encode};
use memstore_api::testkit::util::Rng;
use memstore_api::{ChangeBatch, InsertMeta};

/// Bytes before the first record (the file's magic).
const MAGIC_LEN: usize = 8;
/// Bytes of a record header (length, payload CRC, header CRC).
const HEADER: usize = 12;

fn batches() -> Vec<ChangeBatch> {
    (1..=3u64)
        .map(|seq| ChangeBatch {
            seq,
            tick: seq * 10,
            first_id: seq * 100,
            delete: vec![seq],
            update_ids: vec![seq + 1],
            deltas: vec![0.5 * seq as f32, -1.0],
            touch: vec![seq, seq, seq + 7],
            insert_keys: vec![seq as f32; 4],
            insert_values: vec![1.0; 2],
            insert_meta: vec![InsertMeta {
                created: seq,
                last_access: seq,
                access_count: 1,
                crf: 1.0,
            }],
            insert_tags: vec![vec![format!("source:{seq}")]],
            ..ChangeBatch::default()
        })
        .collect()
}

/// Where each record starts, given where each ends.
fn starts(ends: &[usize]) -> Vec<usize> {
    std::iter::once(MAGIC_LEN)
        .chain(ends[..ends.len() - 1].iter().copied())
        .collect()
}

/// Writes the three batches to a journal at `path`; returns its bytes and
/// where each record ends.
fn write_journal(path: &Path) -> (Vec<u8>, Vec<usize>) {
    let bs = batches();
    {
        let (mut j, old) = Journal::open(path).unwrap();
        assert!(old.is_empty());
        for b in &bs {
            j.append(b).unwrap();
        }
    }
    let bytes = std::fs::read(path).unwrap();
    let mut ends = Vec::new();
    let mut at = MAGIC_LEN;
    for b in &bs {
        at += HEADER + encode(b).len();
        ends.push(at);
    }
    assert_eq!(*ends.last().unwrap(), bytes.len());
    (bytes, ends)
}

/// Opens `damaged` (written to `path`) where the damage starts at byte
/// `at`: an error must leave the file unchanged and may only be reported
/// when a whole record follows the damage; a success must return exactly
/// the records that end at or before `at`, and keep exactly their bytes.
fn check(path: &Path, damaged: &[u8], at: usize, ends: &[usize], what: &str) {
    std::fs::write(path, damaged).unwrap();
    let before: Vec<ChangeBatch> = batches()
        .into_iter()
        .zip(ends)
        .filter(|(_, e)| **e <= at)
        .map(|(b, _)| b)
        .collect();
    match Journal::open(path) {
        Ok((_, got)) => {
            assert_eq!(got, before, "{what}: the records before the damage");
            let after = ends.iter().filter(|&&e| e > at).count();
            assert!(after <= 1, "{what}: a record after the damaged one was cut off");
            let kept = ends.iter().copied().filter(|&e| e <= at).max().unwrap_or(MAGIC_LEN);
            let file = std::fs::read(path).unwrap();
            assert_eq!(file.len(), kept, "{what}: cut at the end of the last whole record");
            assert_eq!(&file[..], &damaged[..kept], "{what}");
        }
        Err(e) => {
            assert_eq!(
                std::fs::read(path).unwrap(),
                damaged,
                "{what}: an error changes nothing"
            );
            let followed = ends.iter().any(|&e| e > at && e <= damaged.len());
            assert!(
                followed,
                "{what}: an error without a whole record after the damage: {e}"
            );
        }
    }
}

/// Truncation at every byte offset: a torn tail, always recovered.
#[test]
fn every_truncation_keeps_the_whole_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let (bytes, ends) = write_journal(&path);
    for t in MAGIC_LEN..=bytes.len() {
        let what = format!("truncated at {t}");
        std::fs::write(&path, &bytes[..t]).unwrap();
        let (_, got) = Journal::open(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
        let whole = ends.iter().filter(|&&e| e <= t).count();
        assert_eq!(got, batches()[..whole].to_vec(), "{what}");
    }
}

/// Every bit of every record header (3 records × 96 bits = 288 trials).
#[test]
fn every_header_bit_flip_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let (bytes, ends) = write_journal(&path);
    let starts = starts(&ends);
    for (r, &start) in starts.iter().enumerate() {
        for bit in 0..HEADER * 8 {
            let mut damaged = bytes.clone();
            damaged[start + bit / 8] ^= 1 << (bit % 8);
            check(&path, &damaged, start, &ends, &format!("record {r}, header bit {bit}"));
        }
    }
}

/// 10,000 random payload bits.
#[test]
fn ten_thousand_payload_bit_flips_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let (bytes, ends) = write_journal(&path);
    let starts = starts(&ends);
    let mut rng = Rng::new(26);
    for trial in 0..10_000 {
        let r = rng.below(3) as usize;
        let (first, end) = (starts[r] + HEADER, ends[r]);
        let byte = first + rng.below((end - first) as u64) as usize;
        let bit = rng.below(8);
        let mut damaged = bytes.clone();
        damaged[byte] ^= 1 << bit;
        check(
            &path,
            &damaged,
            starts[r],
            &ends,
            &format!("trial {trial}: byte {byte} bit {bit}"),
        );
    }
}

/// Zero tails of 8 to 4,096 bytes (a size extended before the data reached
/// the disk): every record is kept and the zeros are cut off.
#[test]
fn zero_tails_of_8_to_4096_bytes_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let (bytes, ends) = write_journal(&path);
    for n in (8..=64).chain([100, 511, 512, 1000, 4095, 4096]) {
        let damaged = [bytes.clone(), vec![0u8; n]].concat();
        check(&path, &damaged, bytes.len(), &ends, &format!("{n} zero bytes"));
        assert_eq!(Journal::open(&path).unwrap().1, batches(), "{n} zero bytes");
    }
}
