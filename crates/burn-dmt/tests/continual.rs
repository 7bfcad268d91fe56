//! `memorize` and `forget` at a tiny size: the text is learnt with every
//! weight unchanged, every row written carries its source's tag (after a
//! reload, in SQL, through a daemon; feed-forward memories and the output
//! memory), forgetting gives the store back row for row, one source's
//! forgetting leaves another's memories and gain, and bad input is refused
//! before anything changes.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn_dmt::DmtError;
use burn_dmt::burn::tensor::Device;
use burn_dmt::continual::{Mechanism, MemorizeOptions, MemorizeReport, forget, memorize, read_source, sources};
use burn_dmt::distill::{load_student, run};
use burn_dmt::storage::StoreLocation;
use burn_dmt::train::eval_batches;
use common::{Daemon, assets, options, tiny_setup};
use memstore_api::MemoryStore;

/// A distilled tiny student in `dir/run` (blocks: featural, associative).
fn student(dir: &Path, store: Option<StoreLocation>) -> PathBuf {
    let (train, eval) = tiny_setup(dir);
    let mut o = options(dir, train, &eval);
    o.attention_baseline = false;
    if let Some(s) = store {
        o.store = s;
    }
    run(&o).unwrap();
    o.run_dir
}

/// A text the tiny teacher never saw (KJV verses), `chars` long, at `skip`.
fn new_text(dir: &Path, name: &str, skip: usize, chars: usize) -> PathBuf {
    let kjv = std::fs::read_to_string(assets().join("data/kjv-genesis-deuteronomy.txt")).unwrap();
    let t: String = kjv.chars().skip(skip).take(chars).collect();
    let p = dir.join(name);
    std::fs::write(&p, t).unwrap();
    p
}

fn opts(mechanism: Mechanism) -> MemorizeOptions {
    {
        let mut o = MemorizeOptions::default();
        o.mechanism = mechanism;
        o.steps = Some(10);
        o.batch = 2;
        o.seq = 16;
        o.lr = 50.0;
        o.sparse_rows = 16;
        o.room = 32;
        o.max_inserts = 8;
        o.background_windows = 8;
        o
    }
}

/// `memorize` with the tiny options, quietly.
fn mem(run_dir: &Path, files: &[PathBuf], mechanism: Mechanism) -> burn_dmt::Result<Vec<MemorizeReport>> {
    memorize(run_dir, files, &opts(mechanism), None)
}

/// One stored row: key bits, value bits, tags with their counts.
type Row = (Vec<u32>, Vec<u32>, Vec<(String, u64)>);

/// Every row of every memory store of a run, by (block, id).
type Rows = BTreeMap<(usize, u64), Row>;

/// Asserts that two dumps are equal, naming the first row that differs.
#[track_caller]
fn same(got: &Rows, want: &Rows, what: &str) {
    if got == want {
        return;
    }
    let k = got
        .keys()
        .chain(want.keys())
        .find(|k| got.get(k) != want.get(k))
        .expect("dumps differ");
    let show = |r: Option<&Row>| r.map(|r| format!("tags {:?}, value[..2] {:?}", r.2, &r.1[..2.min(r.1.len())]));
    panic!(
        "{what}: {} rows against {}; first difference at {k:?}: {:?} against {:?}",
        got.len(),
        want.len(),
        show(got.get(k)),
        show(want.get(k))
    );
}

fn dump(run_dir: &Path) -> Rows {
    let spec = burn_dmt::distill::read_spec(run_dir).unwrap();
    let mut out = Rows::new();
    for (i, kind) in spec.layers.iter().enumerate() {
        if kind == "mlp" || kind == "none" {
            continue;
        }
        for (id, row) in store_rows(run_dir, i) {
            out.insert((i, id), row);
        }
    }
    out
}

/// Every row of block `block`'s store of a run, by id.
fn store_rows(run_dir: &Path, block: usize) -> BTreeMap<u64, Row> {
    let loc = burn_dmt::distill::read_spec(run_dir).unwrap().store_location().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(loc.open_existing(run_dir, block)).unwrap();
    let st = s.shared();
    let ids = rt.block_on(st.ids()).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let out = rt
        .block_on(st.get(&ids))
        .unwrap()
        .into_iter()
        .map(|m| (m.id, (bits(&m.key), bits(&m.value), m.tags.into_iter().collect())))
        .collect();
    drop(st);
    rt.block_on(s.close()).unwrap();
    out
}

/// How many memories of the SQLite store file `db` carry `tag`, by SQL.
fn sql_tag_count(db: &Path, tag: &str) -> usize {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let n: i64 = rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}?mode=ro", db.display()))
            .await
            .unwrap();
        let n =
            sqlx::query_scalar("SELECT count(*) FROM memory_tags mt JOIN tags t ON t.id = mt.tag_id WHERE t.name = ?")
                .bind(tag)
                .fetch_one(&pool)
                .await
                .unwrap();
        pool.close().await;
        n
    });
    n as usize
}

/// Every weight of the student of `run_dir` as loaded, by tensor name (its
/// tensors written out again as safetensors and read back).
fn weights(run_dir: &Path) -> BTreeMap<String, Vec<u8>> {
    use burn_dmt::burn::store::{ModuleSnapshot, SafetensorsStore};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_, m) = load_student(run_dir, &Device::flex().autodiff(), &rt).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("w.safetensors");
    m.save_into(&mut SafetensorsStore::from_file(&path)).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let out: BTreeMap<String, Vec<u8>> = st.tensors().into_iter().map(|(n, v)| (n, v.data().to_vec())).collect();
    assert!(out.len() > 10, "{} tensors", out.len());
    out
}

/// Cross-entropy of the student of `run_dir` on the first windows of `text`.
fn ce_on(run_dir: &Path, text: &Path) -> f64 {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (spec, m) = load_student(run_dir, &Device::flex().autodiff(), &rt).unwrap();
    let codec = burn_dmt::tokenizer::TextCodec::for_model(&spec.teacher, None).unwrap();
    let tokens = codec.encode(&std::fs::read_to_string(text).unwrap()).unwrap();
    burn_dmt::continual::ce(&m, &eval_batches(&tokens, 2, 16, 16)).unwrap()
}

#[test]
fn memorize_learns_with_frozen_weights_and_forget_restores_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = student(dir.path(), None);
    let text = new_text(dir.path(), "genesis.txt", 0, 4000);
    let (before_rows, before_weights) = (dump(&run_dir), weights(&run_dir));
    let safetensors = std::fs::read(run_dir.join("student.safetensors")).unwrap();
    let ce_before = ce_on(&run_dir, &text);

    let reports = mem(&run_dir, std::slice::from_ref(&text), Mechanism::Both).unwrap();
    let r = &reports[0];
    assert!(r.ce_after < r.ce_before - 0.05, "{} -> {}", r.ce_before, r.ce_after);
    let ce_after = ce_on(&run_dir, &text);
    assert!(ce_after < ce_before - 0.05, "reloaded: {ce_before} -> {ce_after}");
    // No weight changed, in the file or as loaded.
    assert_eq!(std::fs::read(run_dir.join("student.safetensors")).unwrap(), safetensors);
    assert_eq!(weights(&run_dir), before_weights);

    // Provenance, after a reload: every row memorize inserted or changed has
    // the tag; no other row has it.
    let (src, _) = read_source(&text).unwrap();
    let after = dump(&run_dir);
    let (mut inserted, mut changed) = (0, 0);
    for (k, (key, value, tags)) in &after {
        let tagged = tags.iter().any(|(t, _)| *t == src.tag);
        match before_rows.get(k) {
            None => {
                inserted += 1;
                assert!(tagged, "inserted row {k:?} lacks the tag: {tags:?}");
            }
            Some((k0, v0, _)) => {
                assert_eq!(key, k0, "a key of row {k:?} changed");
                assert_eq!(
                    tagged,
                    value != v0,
                    "row {k:?}: tag {tagged}, value changed {}",
                    value != v0
                );
                changed += usize::from(value != v0);
            }
        }
    }
    assert!(inserted > 0 && changed > 0, "{inserted} inserted, {changed} changed");
    assert!(
        before_rows.keys().all(|k| after.contains_key(k)),
        "memorize removed an older row"
    );
    // And in SQL, on the store file.
    let db = run_dir.join("memory/block1.db");
    let n = sql_tag_count(&db, &src.tag);
    let in_block1 = after
        .iter()
        .filter(|((b, _), r)| *b == 1 && r.2.iter().any(|(t, _)| *t == src.tag))
        .count();
    assert_eq!(n, in_block1);
    assert_eq!(sources(&run_dir).unwrap().len(), 1);

    let f = forget(&run_dir, &src.tag).unwrap();
    assert_eq!((f.deleted, f.restored, f.overlapped), (inserted, changed, 0));
    same(&dump(&run_dir), &before_rows, "forget did not give the store back");
    assert_eq!(ce_on(&run_dir, &text), ce_before);
    assert!(sources(&run_dir).unwrap().is_empty());
    assert_eq!(weights(&run_dir), before_weights);
}

/// Two sources. Forgetting the later one gives back exactly the memory the
/// earlier one left, with its gain. Forgetting the earlier one keeps every
/// memory of the later one (a source never trains, evicts or recombines
/// another's) and undoes the earlier one's own changes; the later one's
/// gain on its text then changes, since its memories were learnt beside
/// the earlier one's.
#[test]
fn forgetting_one_source_keeps_the_others_memories_and_gain() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = student(dir.path(), None);
    let a = new_text(dir.path(), "a.txt", 0, 3000);
    let b = new_text(dir.path(), "b.txt", 200_000, 3000);
    let original = dump(&run_dir);
    let b_before = ce_on(&run_dir, &b);
    let (tag_a, tag_b) = (read_source(&a).unwrap().0.tag, read_source(&b).unwrap().0.tag);

    // B, then A; forgetting A gives back B's memory exactly.
    mem(&run_dir, std::slice::from_ref(&b), Mechanism::Both).unwrap();
    let only_b = dump(&run_dir);
    let b_alone = ce_on(&run_dir, &b);
    assert!(b_alone < b_before - 0.05, "{b_before} -> {b_alone}");
    mem(&run_dir, std::slice::from_ref(&a), Mechanism::Both).unwrap();
    let f = forget(&run_dir, &tag_a).unwrap();
    assert!(f.deleted > 0 && f.overlapped == 0, "{f:?}");
    same(&dump(&run_dir), &only_b, "forgetting the later source");
    assert_eq!(ce_on(&run_dir, &b), b_alone);
    forget(&run_dir, &tag_b).unwrap();
    same(&dump(&run_dir), &original, "forgetting both");

    // A, then B; forgetting A (by its file name) keeps all of B's memories.
    mem(&run_dir, &[a.clone(), b.clone()], Mechanism::Both).unwrap();
    let both = dump(&run_dir);
    let f = forget(&run_dir, "a.txt").unwrap();
    assert!(f.deleted > 0, "{f:?}");
    let left = dump(&run_dir);
    let has = |r: &Row, t: &str| r.2.iter().any(|(x, _)| x == t);
    for (k, r) in &both {
        // B never trains A's memories.
        assert!(
            !(has(r, &tag_a) && has(r, &tag_b) && !original.contains_key(k)),
            "{k:?}: {:?}",
            r.2
        );
        if has(r, &tag_b) {
            let l = left.get(k).unwrap_or_else(|| panic!("B's row {k:?} was removed"));
            assert!(has(l, &tag_b) && !has(l, &tag_a), "{k:?}: {:?}", l.2);
            if !has(r, &tag_a) {
                assert_eq!(l, r, "B's row {k:?} changed");
            }
        } else if has(r, &tag_a) {
            match original.get(k) {
                Some(o) => assert_eq!(left.get(k), Some(o), "A's change to {k:?} was not undone"),
                None => assert!(!left.contains_key(k), "A's row {k:?} is still there"),
            }
        }
    }
    assert!(ce_on(&run_dir, &b) < b_before, "B's text lost all of B's gain");
    forget(&run_dir, &tag_b).unwrap();
    same(&dump(&run_dir), &original, "forgetting both");
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = student(dir.path(), None);
    let text = new_text(dir.path(), "t.txt", 0, 2000);
    mem(&run_dir, std::slice::from_ref(&text), Mechanism::Sparse).unwrap();
    let rows = dump(&run_dir);
    let spec = std::fs::read(run_dir.join("student.json")).unwrap();
    let ledgers = sources(&run_dir).unwrap();
    let unchanged = |why: &str| {
        same(&dump(&run_dir), &rows, why);
        assert_eq!(std::fs::read(run_dir.join("student.json")).unwrap(), spec, "{why}");
        assert_eq!(sources(&run_dir).unwrap(), ledgers, "{why}");
    };

    let e = forget(&run_dir, "source:nothing@00").unwrap_err();
    assert!(
        matches!(e, DmtError::UnknownSource { .. }) && e.to_string().contains("t.txt"),
        "{e}"
    );
    unchanged("an unknown source tag");

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, " \n").unwrap();
    let binary = dir.path().join("binary.txt");
    std::fs::write(&binary, [0x66, 0x6f, 0xff, 0xfe, 0x00, 0x80]).unwrap();
    for (f, what) in [(&empty, "empty"), (&binary, "UTF-8")] {
        // Given with a good file, so that nothing is written for that one either.
        let e = mem(
            &run_dir,
            &[new_text(dir.path(), "ok.txt", 9000, 2000), f.clone()],
            Mechanism::Both,
        )
        .unwrap_err();
        assert!(
            matches!(e, DmtError::Text { .. }) && e.to_string().contains(what),
            "{e}"
        );
        unchanged(what);
    }
    let e = mem(&run_dir, std::slice::from_ref(&text), Mechanism::Both).unwrap_err();
    assert!(e.to_string().contains("memorised already"), "{e}");
    unchanged("the same text again");

    // A run directory of another model: the student description names a
    // layer plan its weights do not have.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["student.safetensors", "student.json"] {
        std::fs::copy(run_dir.join(f), other.join(f)).unwrap();
    }
    let json = std::fs::read_to_string(other.join("student.json")).unwrap();
    std::fs::write(
        other.join("student.json"),
        json.replace("\"featural\"", "\"mlp\"")
            .replace("\"associative\"", "\"mlp\""),
    )
    .unwrap();
    let e = mem(&other, std::slice::from_ref(&text), Mechanism::Both).unwrap_err();
    assert!(e.to_string().contains("no memory layers"), "{e}");
    std::fs::write(
        other.join("student.json"),
        json.replace("\"featural\"", "\"associative\""),
    )
    .unwrap();
    let e = mem(&other, std::slice::from_ref(&text), Mechanism::Both).unwrap_err();
    assert!(
        matches!(e, DmtError::Checkpoint { .. } | DmtError::InvalidArgument(_)),
        "{e}"
    );
    assert!(!other.join("sources").exists());
    let e = mem(dir.path(), std::slice::from_ref(&text), Mechanism::Both).unwrap_err();
    assert!(e.to_string().contains("not a run directory"), "{e}");
    unchanged("other run directories");
}

/// Memorises a text into a student whose memories live at `loc`, checks
/// after a reload that every new row carries the source's tag, and that
/// `forget` gives the stores back.
fn provenance_at(dir: &Path, loc: StoreLocation) {
    let run_dir = student(dir, Some(loc));
    let text = new_text(dir, "exodus.txt", 100_000, 3000);
    let before = dump(&run_dir);
    mem(&run_dir, std::slice::from_ref(&text), Mechanism::Both).unwrap();
    let tag = read_source(&text).unwrap().0.tag;
    let after = dump(&run_dir);
    let new: Vec<_> = after.keys().filter(|k| !before.contains_key(k)).collect();
    assert!(!new.is_empty());
    for k in new {
        assert!(after[k].2.iter().any(|(t, _)| *t == tag), "{k:?}: {:?}", after[k].2);
    }
    let changed = before.iter().filter(|(k, r)| after[*k].1 != r.1).count();
    let tagged_old = before
        .keys()
        .filter(|k| after[*k].2.iter().any(|(t, _)| *t == tag))
        .count();
    assert!(
        changed > 0 && changed == tagged_old,
        "{changed} changed, {tagged_old} tagged"
    );
    forget(&run_dir, &tag).unwrap();
    same(&dump(&run_dir), &before, "forget");
    // The output memory's rows, in the same store backend.
    let r = mem(&run_dir, std::slice::from_ref(&text), Mechanism::Output).unwrap();
    let rows = output_rows(&run_dir);
    assert_eq!(rows.len(), r[0].layers[0].1);
    assert!(
        rows.values().all(|r| r.2 == vec![(tag.clone(), 1)]),
        "an output row lacks the tag"
    );
    forget(&run_dir, &tag).unwrap();
    assert!(output_rows(&run_dir).is_empty());
    same(&dump(&run_dir), &before, "forgetting the output memory");
}

/// The tags live in the store itself: through a memstored daemon serving
/// the layers' stores.
#[test]
fn provenance_through_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("daemon"));
    let loc: StoreLocation = format!("ipc:{}", daemon.socket.display()).parse().unwrap();
    provenance_at(dir.path(), loc);
}

/// And in DuckDB files (feature `duckdb`:
/// `cargo test -p burn-dmt --features duckdb --test continual`).
#[cfg(feature = "duckdb")]
#[test]
fn provenance_in_duckdb() {
    let dir = tempfile::tempdir().unwrap();
    provenance_at(dir.path(), "duckdb".parse().unwrap());
}

/// And on a PostgreSQL server with pgvector, one schema per layer's store
/// (feature `postgres`; .ci/run starts a throwaway server and runs it with
/// `--ignored`).
#[cfg(feature = "postgres")]
#[test]
#[ignore = "needs PostgreSQL with pgvector: MEMSTORE_POSTGRES_URL (scripts/postgres.sh start)"]
fn provenance_in_postgres() {
    let url = std::env::var("MEMSTORE_POSTGRES_URL").expect("MEMSTORE_POSTGRES_URL");
    let dir = tempfile::tempdir().unwrap();
    let loc: StoreLocation = format!("{url}#dmt_provenance_{}", std::process::id()).parse().unwrap();
    provenance_at(dir.path(), loc);
}

/// A `memorize` stopped half-way (here by its step hook failing) leaves a
/// ledger marked interrupted, from which `forget` still gives the store back.
#[test]
fn an_interrupted_memorize_can_be_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = student(dir.path(), None);
    let text = new_text(dir.path(), "cut.txt", 50_000, 3000);
    let before = dump(&run_dir);
    let mut hook = |step: usize, _: &mut burn_dmt::Gpt2| -> burn_dmt::Result<()> {
        if step == 5 {
            return Err(DmtError::InvalidArgument("stopped".into()));
        }
        Ok(())
    };
    let e = memorize(
        &run_dir,
        std::slice::from_ref(&text),
        &opts(Mechanism::Both),
        Some(&mut hook),
    );
    assert!(e.is_err());
    let ledgers = sources(&run_dir).unwrap();
    assert_eq!(ledgers.len(), 1);
    assert!(!ledgers[0].complete && ledgers[0].layers.iter().all(|l| l.next_id.is_none()));
    assert!(dump(&run_dir).len() > before.len(), "the first steps wrote nothing");
    forget(&run_dir, "cut.txt").unwrap();
    same(&dump(&run_dir), &before, "forgetting an interrupted source");
}

/// Key-value layers grow too: insertion adds units where no unit answers
/// the new text strongly, each tagged, silent until its zero value trains;
/// the text is learnt with the weights unchanged, and `forget` gives the
/// store back row for row.
#[test]
fn key_value_layers_take_new_units_and_forget_gives_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let (train, eval) = tiny_setup(dir.path());
    let mut o = options(dir.path(), train, &eval);
    o.attention_baseline = false;
    o.layers = Some("0-1:keyvalue".into());
    o.kv_k = 8;
    run(&o).unwrap();
    let run_dir = o.run_dir;
    let text = new_text(dir.path(), "exodus.txt", 100_000, 4000);
    let (before_rows, before_weights) = (dump(&run_dir), weights(&run_dir));
    let ce_before = ce_on(&run_dir, &text);

    let mut mo = opts(Mechanism::Insert);
    mo.novelty_quantile = 0.5;
    let r = memorize(&run_dir, std::slice::from_ref(&text), &mo, None).unwrap();
    assert!(
        r[0].ce_after < r[0].ce_before - 0.05,
        "{} -> {} ({:?})",
        r[0].ce_before,
        r[0].ce_after,
        r[0].layers
    );
    assert!(ce_on(&run_dir, &text) < ce_before - 0.05);
    assert_eq!(weights(&run_dir), before_weights);

    let (src, _) = read_source(&text).unwrap();
    let after = dump(&run_dir);
    let new: Vec<_> = after.iter().filter(|(k, _)| !before_rows.contains_key(k)).collect();
    for b in 0..2 {
        assert!(new.iter().any(|((blk, _), _)| *blk == b), "block {b} took no new unit");
    }
    for (k, (key, value, tags)) in &new {
        assert!(
            tags.iter().any(|(t, _)| *t == src.tag),
            "new unit {k:?} lacks the tag: {tags:?}"
        );
        // A unit's key ends with its bias, negative: silent away from its input.
        let bias = f32::from_bits(*key.last().unwrap());
        assert!(bias < 0.0, "unit {k:?} has bias {bias}");
        assert!(
            value.iter().all(|v| f32::from_bits(*v).is_finite()),
            "unit {k:?}: {value:?}"
        );
    }
    // Units start silent (zero values); those retrieved since have trained.
    let trained = new
        .iter()
        .filter(|(_, (_, v, _))| v.iter().any(|x| f32::from_bits(*x) != 0.0))
        .count();
    assert!(trained > 0, "none of {} new units trained", new.len());
    // Insertion alone changes no distilled row.
    for (k, row) in &before_rows {
        assert_eq!(after.get(k), Some(row), "distilled row {k:?} changed");
    }

    let f = forget(&run_dir, &src.tag).unwrap();
    assert_eq!((f.deleted, f.restored), (new.len(), 0));
    same(&dump(&run_dir), &before_rows, "forget did not give the store back");
    assert_eq!(ce_on(&run_dir, &text), ce_before);
}

/// Every row of a run's output memory store, by id.
fn output_rows(run_dir: &Path) -> BTreeMap<u64, Row> {
    let spec = burn_dmt::distill::read_spec(run_dir).unwrap();
    store_rows(run_dir, burn_dmt::continual::output_block(&spec))
}

/// The output memory (kNN-LM rows at the LM head): memorising a text
/// changes no weight and no memory layer's row, lowers the cross-entropy
/// on the text after a reload, gives every row the source's tag (in SQL
/// too); forgetting one of two sources deletes exactly its rows and leaves
/// the other's rows and gain; forgetting both gives the model's answers
/// back exactly.
#[test]
fn output_memory_learns_tags_its_rows_and_forgets_them() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = student(dir.path(), None);
    let a = new_text(dir.path(), "genesis.txt", 0, 4000);
    let b = new_text(dir.path(), "numbers.txt", 600_000, 4000);
    let (before_rows, before_weights) = (dump(&run_dir), weights(&run_dir));
    let safetensors = std::fs::read(run_dir.join("student.safetensors")).unwrap();
    let (a_before, b_before) = (ce_on(&run_dir, &a), ce_on(&run_dir, &b));
    let (tag_a, tag_b) = (read_source(&a).unwrap().0.tag, read_source(&b).unwrap().0.tag);

    let r = mem(&run_dir, std::slice::from_ref(&a), Mechanism::Output).unwrap();
    let rows = 10 * 2 * 16;
    assert_eq!(r[0].layers, vec![(2, rows, 0)]);
    assert!(
        r[0].ce_after < r[0].ce_before - 0.05,
        "{} -> {}",
        r[0].ce_before,
        r[0].ce_after
    );
    let a_after = ce_on(&run_dir, &a);
    assert!(a_after < a_before - 0.05, "reloaded: {a_before} -> {a_after}");
    assert_eq!(std::fs::read(run_dir.join("student.safetensors")).unwrap(), safetensors);
    assert_eq!(weights(&run_dir), before_weights);
    same(
        &dump(&run_dir),
        &before_rows,
        "the output memory changed a memory layer",
    );
    let only_a = output_rows(&run_dir);
    assert_eq!(only_a.len(), rows);
    let vocab = burn_dmt::distill::read_spec(&run_dir).unwrap().config.vocab_size;
    for (id, (key, value, tags)) in &only_a {
        assert_eq!(tags, &vec![(tag_a.clone(), 1)], "row {id}");
        assert_eq!(key.len(), 32, "row {id}");
        let t = f32::from_bits(value[0]);
        assert!(
            value.len() == 1 && t.fract() == 0.0 && (t as usize) < vocab,
            "row {id}: {t}"
        );
    }
    let db = run_dir.join("memory/block2.db");
    let n = sql_tag_count(&db, &tag_a);
    assert_eq!(n, rows);

    // A second source; forgetting the first leaves the second's rows as
    // they were and its gain.
    mem(&run_dir, std::slice::from_ref(&b), Mechanism::Output).unwrap();
    let b_both = ce_on(&run_dir, &b);
    assert!(b_both < b_before - 0.05, "{b_before} -> {b_both}");
    let both = output_rows(&run_dir);
    assert_eq!(both.len(), 2 * rows);
    let f = forget(&run_dir, "genesis.txt").unwrap();
    assert_eq!((f.deleted, f.restored, f.overlapped), (rows, 0, 0));
    let left = output_rows(&run_dir);
    let want: BTreeMap<u64, Row> = both.into_iter().filter(|(id, _)| !only_a.contains_key(id)).collect();
    assert_eq!(left, want, "forgetting A changed B's rows");
    assert!(left.values().all(|r| r.2 == vec![(tag_b.clone(), 1)]));
    let b_left = ce_on(&run_dir, &b);
    assert!(b_left < b_before - 0.05, "B's gain went with A: {b_before} -> {b_left}");

    forget(&run_dir, &tag_b).unwrap();
    assert!(output_rows(&run_dir).is_empty());
    assert!(!run_dir.join(burn_dmt::continual::OUTPUT_MEMORY_FILE).exists());
    assert_eq!(ce_on(&run_dir, &a), a_before);
    assert_eq!(ce_on(&run_dir, &b), b_before);
    assert_eq!(weights(&run_dir), before_weights);
    same(&dump(&run_dir), &before_rows, "forgetting both");
    assert!(sources(&run_dir).unwrap().is_empty());
}
