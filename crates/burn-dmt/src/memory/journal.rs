//! Write-behind from a device tier to the durable store, through a journal.
//!
//! The training loop must not wait for the database, and a crash must not
//! lose what the model learnt. Each [`ChangeBatch`] a tier produces is first
//! appended to a journal file (per record: length, CRC-32 of the payload,
//! CRC-32 of those two fields, payload; then `fsync`) and then applied to the
//! store by a background thread, in order.
//! The store records each batch's sequence number in the same transaction as
//! its changes ([`MemoryStore::apply`]), so replaying the journal after a
//! crash of the writer — at any point, even between the commit and the
//! journal's truncation — applies exactly the batches the store has not seen
//! and ends in the same state as an uninterrupted run. This is the classic
//! write-ahead log (ARIES-style redo with a persisted LSN), with the store's
//! transactions as the pages.
//!
//! On open, a record that fails its checks is a torn tail (a crash during
//! its append) only when no valid record follows it: the file is cut there.
//! Damage followed by a valid record (a flipped bit in a length or payload
//! of a record that was made durable) is reported as corruption and the file
//! is left as it is, so no durable batch is ever dropped silently. The
//! header's own checksum is what lets a damaged length be told from a torn
//! one, and a tail of zero bytes (a size extended before the data reached the
//! disk) from a record.
//!
//! A caller whose own checkpoints are what it recovers from (distillation:
//! the stores are copied with the weights, and a resumed run restores the
//! copies) starts the writer without a journal ([`WriteBehind::unjournaled`]):
//! the group transactions stay, the per-step `fsync` of megabytes goes.
//! Such a caller takes its checkpoint's store copies on the writers' threads
//! ([`WriteBehind::after`]): each copy runs once its store holds every batch
//! submitted before it, while the training loop goes on with later steps.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError, channel, sync_channel};
use std::thread::JoinHandle;

use memstore_api::{ChangeBatch, InsertMeta, MemoryStore};

use crate::{DmtError, Result};

/// First bytes of a journal file.
const MAGIC: &[u8; 8] = b"DMTJRNL6";

/// Format of the journal [`MAGIC`] starts.
const FORMAT: u8 = 6;

/// First bytes of the journals of earlier formats, read and rewritten in the
/// current format on open: 2 lists accesses one by one, 3 has no insert tags,
/// 4 no value assignments or tag counts, and every format up to 5 has
/// records without a header checksum.
const OLDER: [(&[u8; 8], u8); 4] = [(b"DMTJRNL2", 2), (b"DMTJRNL3", 3), (b"DMTJRNL4", 4), (b"DMTJRNL5", 5)];

/// Bytes before a record's payload: length and payload CRC-32, and from
/// format 6 the CRC-32 of those eight bytes.
fn header_len(format: u8) -> usize {
    if format >= 6 { 12 } else { 8 }
}

/// CRC-32 (IEEE 802.3, reflected, as zlib's) of `bytes`. Table-free bitwise
/// CRC cost ~10 ms per MB here, and a GPU-sized step journals megabytes per
/// layer; crc32fast uses the CPU's carry-less multiply.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

fn put_u64s(out: &mut Vec<u8>, xs: &[u64]) {
    out.extend_from_slice(&(xs.len() as u64).to_le_bytes());
    for x in xs {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

fn put_f32s(out: &mut Vec<u8>, xs: &[f32]) {
    out.extend_from_slice(&(xs.len() as u64).to_le_bytes());
    for x in xs {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// Accesses as runs of one id: `(id, count)` pairs (a tier lists a memory's
/// accesses together, so a GPU-sized step's hundreds of thousands of
/// accesses take a few thousand pairs).
fn put_runs(out: &mut Vec<u8>, ids: &[u64]) {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &id in ids {
        match runs.last_mut() {
            Some((last, n)) if *last == id => *n += 1,
            _ => runs.push((id, 1)),
        }
    }
    out.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    for (id, n) in runs {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
    }
}

/// Encodes a batch as a journal payload (little-endian).
pub fn encode(b: &ChangeBatch) -> Vec<u8> {
    let mut out = Vec::new();
    for x in [b.seq, b.tick, b.first_id] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    put_u64s(&mut out, &b.delete);
    put_u64s(&mut out, &b.update_ids);
    put_f32s(&mut out, &b.deltas);
    put_runs(&mut out, &b.touch);
    put_f32s(&mut out, &b.insert_keys);
    put_f32s(&mut out, &b.insert_values);
    out.extend_from_slice(&(b.insert_meta.len() as u64).to_le_bytes());
    for m in &b.insert_meta {
        for x in [m.created, m.last_access, m.access_count, m.crf.to_bits()] {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out.extend_from_slice(&(b.insert_tags.len() as u64).to_le_bytes());
    for row in &b.insert_tags {
        out.extend_from_slice(&(row.len() as u64).to_le_bytes());
        for tag in row {
            out.extend_from_slice(&(tag.len() as u64).to_le_bytes());
            out.extend_from_slice(tag.as_bytes());
        }
    }
    put_u64s(&mut out, &b.assign_ids);
    put_f32s(&mut out, &b.assign_values);
    out.extend_from_slice(&(b.tag_counts.len() as u64).to_le_bytes());
    for (id, tag, count) in &b.tag_counts {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&(tag.len() as u64).to_le_bytes());
        out.extend_from_slice(tag.as_bytes());
        out.extend_from_slice(&count.to_le_bytes());
    }
    out
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_le_bytes(*head))
    }
    fn len(&mut self, width: usize) -> Option<usize> {
        let n = usize::try_from(self.u64()?).ok()?;
        (n.checked_mul(width)? <= self.0.len()).then_some(n)
    }
    fn u64s(&mut self) -> Option<Vec<u64>> {
        let n = self.len(8)?;
        (0..n).map(|_| self.u64()).collect()
    }
    fn runs(&mut self) -> Option<Vec<u64>> {
        let n = self.len(16)?;
        let mut ids = Vec::new();
        for _ in 0..n {
            let (id, count) = (self.u64()?, self.u64()?);
            // A run is at least one access; absurd totals (only a
            // hand-made record could hold them) are refused before allocating.
            let count = usize::try_from(count).ok().filter(|&c| c >= 1)?;
            if ids.len().checked_add(count)? > u32::MAX as usize {
                return None;
            }
            ids.extend(std::iter::repeat_n(id, count));
        }
        Some(ids)
    }
    fn string(&mut self) -> Option<String> {
        let n = self.len(1)?;
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        String::from_utf8(head.to_vec()).ok()
    }
    fn tags(&mut self) -> Option<Vec<Vec<String>>> {
        // Each row and each tag takes at least its 8-byte length.
        let rows = self.len(8)?;
        (0..rows)
            .map(|_| {
                let n = self.len(8)?;
                (0..n).map(|_| self.string()).collect::<Option<Vec<_>>>()
            })
            .collect()
    }
    fn f32s(&mut self) -> Option<Vec<f32>> {
        let n = self.len(4)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let (head, rest) = self.0.split_first_chunk::<4>()?;
            self.0 = rest;
            v.push(f32::from_le_bytes(*head));
        }
        Some(v)
    }
}

/// Decodes a journal payload; `None` when it is malformed.
pub fn decode(payload: &[u8]) -> Option<ChangeBatch> {
    decode_format(payload, FORMAT)
}

fn decode_format(payload: &[u8], format: u8) -> Option<ChangeBatch> {
    let mut r = Reader(payload);
    let b = ChangeBatch {
        seq: r.u64()?,
        tick: r.u64()?,
        first_id: r.u64()?,
        delete: r.u64s()?,
        update_ids: r.u64s()?,
        deltas: r.f32s()?,
        touch: if format == 2 { r.u64s()? } else { r.runs()? },
        insert_keys: r.f32s()?,
        insert_values: r.f32s()?,
        insert_meta: {
            let n = r.len(32)?;
            (0..n)
                .map(|_| {
                    Some(InsertMeta {
                        created: r.u64()?,
                        last_access: r.u64()?,
                        access_count: r.u64()?,
                        crf: f64::from_bits(r.u64()?),
                    })
                })
                .collect::<Option<Vec<_>>>()?
        },
        insert_tags: if format >= 4 { r.tags()? } else { Vec::new() },
        assign_ids: if format >= 5 { r.u64s()? } else { Vec::new() },
        assign_values: if format >= 5 { r.f32s()? } else { Vec::new() },
        tag_counts: if format >= 5 {
            // Each entry takes at least its id, tag length and count.
            let n = r.len(24)?;
            (0..n)
                .map(|_| Some((r.u64()?, r.string()?, r.u64()?)))
                .collect::<Option<Vec<_>>>()?
        } else {
            Vec::new()
        },
    };
    r.0.is_empty().then_some(b)
}

/// A journal record: payload length, CRC-32 of the payload, CRC-32 of the
/// two fields before it, payload.
fn record(batch: &ChangeBatch) -> Result<Vec<u8>> {
    let payload = encode(batch);
    let len = u32::try_from(payload.len())
        .map_err(|_| DmtError::InvalidArgument(format!("change batch {} is over 4 GiB", batch.seq)))?;
    let mut record = Vec::with_capacity(payload.len() + header_len(FORMAT));
    record.extend_from_slice(&len.to_le_bytes());
    record.extend_from_slice(&crc32(&payload).to_le_bytes());
    let header_crc = crc32(&record);
    record.extend_from_slice(&header_crc.to_le_bytes());
    record.extend_from_slice(&payload);
    Ok(record)
}

/// The record at the start of `bytes` in `format`, with its length in
/// bytes, if it passes every check (header checksum where the format has
/// one, payload checksum, a payload that decodes).
fn record_at(bytes: &[u8], format: u8) -> Option<(ChangeBatch, usize)> {
    let header = header_len(format);
    let head = bytes.get(..header)?;
    let field = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    if format >= 6 && crc32(&head[..8]) != field(8) {
        return None;
    }
    let len = usize::try_from(field(0)).ok()?;
    let payload = bytes.get(header..header.checked_add(len)?)?;
    if crc32(payload) != field(4) {
        return None;
    }
    decode_format(payload, format).map(|b| (b, header + len))
}

/// Where a valid record starts after `from`, if one does: what tells damage
/// inside the journal from a torn tail. Only formats with a header checksum
/// can be searched (a candidate costs a checksum of eight bytes); in older
/// formats, damage that leaves more than zero bytes after a record whose
/// length fits in the file counts as followed by one.
fn valid_record_after(bytes: &[u8], from: usize, format: u8) -> Option<usize> {
    if format >= 6 {
        return (from + 1..bytes.len()).find(|&p| record_at(&bytes[p..], format).is_some());
    }
    let rest = &bytes[from..];
    if rest.iter().all(|&b| b == 0) {
        return None;
    }
    let header = header_len(format);
    let len = rest
        .get(..4)
        .map(|h| u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize)?;
    let end = from.checked_add(header)?.checked_add(len)?;
    (end < bytes.len()).then_some(end)
}

/// Makes a directory entry (a file created or renamed there) durable.
fn sync_dir(file: &Path) -> Result<()> {
    memstore_engine::driver::sync_parent(file).map_err(io(file))
}

/// An append-only file of change batches.
pub struct Journal {
    path: PathBuf,
    file: File,
}

use crate::io_error as io;

impl Journal {
    /// Opens (or creates) the journal at `path` and returns the batches it
    /// holds. A torn tail (a crash during an append, before the batch could
    /// reach the store: damage that no valid record follows, including a
    /// tail of zero bytes) is cut off; damage that a valid record follows is
    /// reported as corruption, and the file is left unchanged.
    pub fn open(path: impl AsRef<Path>) -> Result<(Journal, Vec<ChangeBatch>)> {
        let path = path.as_ref().to_path_buf();
        let err = io(&path);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(&err)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(&err)?;
        let corrupt = |m: String| DmtError::Checkpoint {
            path: path.clone(),
            message: format!("journal: {m}"),
        };
        let mut batches = Vec::new();
        let mut good = MAGIC.len();
        let format = OLDER
            .iter()
            .find(|(magic, _)| bytes.starts_with(*magic))
            .map_or(FORMAT, |&(_, f)| f);
        if bytes.len() < MAGIC.len() {
            if !MAGIC.starts_with(&bytes) {
                return Err(corrupt("not a journal file".into()));
            }
            file.set_len(0).map_err(&err)?;
            file.seek(SeekFrom::Start(0)).map_err(&err)?;
            file.write_all(MAGIC).map_err(&err)?;
            file.sync_all().map_err(&err)?;
            sync_dir(&path)?;
        } else if format == FORMAT && &bytes[..MAGIC.len()] != MAGIC {
            return Err(corrupt("not a journal file".into()));
        } else {
            let mut at = MAGIC.len();
            while at < bytes.len() {
                if let Some((b, n)) = record_at(&bytes[at..], format) {
                    batches.push(b);
                    at += n;
                    good = at;
                    continue;
                }
                if let Some(next) = valid_record_after(&bytes, at, format) {
                    return Err(corrupt(format!(
                        "damaged record at byte {at}, followed by more records (at byte {next})"
                    )));
                }
                // A torn tail: cut off below.
                break;
            }
            if format != FORMAT {
                // Rewritten in the current format (atomically: the old file
                // stays whole until the new one is durable).
                let mut tmp = path.clone();
                tmp.as_mut_os_string().push(".tmp");
                let mut new = MAGIC.to_vec();
                for b in &batches {
                    new.extend_from_slice(&record(b)?);
                }
                let mut f = File::create(&tmp).map_err(io(&tmp))?;
                f.write_all(&new).map_err(io(&tmp))?;
                f.sync_all().map_err(io(&tmp))?;
                std::fs::rename(&tmp, &path).map_err(&err)?;
                sync_dir(&path)?;
                file = OpenOptions::new().read(true).write(true).open(&path).map_err(&err)?;
            } else if good < bytes.len() {
                file.set_len(good as u64).map_err(&err)?;
                file.sync_all().map_err(&err)?;
            }
        }
        file.seek(SeekFrom::End(0)).map_err(&err)?;
        Ok((
            Journal {
                path: path.clone(),
                file,
            },
            batches,
        ))
    }

    /// Appends a batch and makes it durable before returning.
    pub fn append(&mut self, batch: &ChangeBatch) -> Result<()> {
        let record = record(batch)?;
        let err = io(&self.path);
        self.file.write_all(&record).map_err(&err)?;
        self.file.sync_data().map_err(&err)
    }

    /// Empties the journal (once the store holds every batch).
    pub fn clear(&mut self) -> Result<()> {
        let err = io(&self.path);
        self.file.set_len(MAGIC.len() as u64).map_err(&err)?;
        self.file.seek(SeekFrom::End(0)).map_err(&err)?;
        self.file.sync_all().map_err(&err)
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Batches per [`MemoryStore::apply_all`] call when [`replay`] recovers.
const REPLAY_GROUP: usize = 32;

/// Applies, in order, the batches the store has not seen (sequence numbers
/// above its last), [`REPLAY_GROUP`] at a time; returns how many were
/// applied.
pub async fn replay<S: MemoryStore + ?Sized>(store: &S, batches: &[ChangeBatch]) -> Result<usize> {
    let last = store.stats().await?.counters.last_batch;
    // A journal holds consecutive batches: from the first the store has not
    // seen on (the store refuses any that does not follow its last).
    let first = batches.iter().position(|b| b.seq > last).unwrap_or(batches.len());
    let unseen = &batches[first..];
    for group in unseen.chunks(REPLAY_GROUP) {
        store.apply_all(group).await?;
    }
    Ok(unseen.len())
}

/// Bytes of batches a [`WriteBehind`] holds for its next group by default
/// ([`Group::of`]): 24–32 steps of a 65,536-row product-key layer of the
/// main job (2–2.7 MB a step), and a bound on the host memory that long
/// groups of larger batches take.
pub const GROUP_BYTES: usize = 64 << 20;

/// When a [`WriteBehind`] applies what it holds: at `batches` batches, or
/// earlier once they hold `bytes` (whichever comes first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    /// Batches per group (at least 1).
    pub batches: usize,
    /// Bytes of batches that close a group early ([`GROUP_BYTES`] by default).
    pub bytes: usize,
}

impl Group {
    /// Groups of up to `batches`, closed early at [`GROUP_BYTES`].
    pub fn of(batches: usize) -> Group {
        Group {
            batches,
            bytes: GROUP_BYTES,
        }
    }
}

/// The bytes `batch`'s vectors hold (ids, floats and tag names).
fn held_bytes(b: &ChangeBatch) -> usize {
    let ids = b.delete.len() + b.update_ids.len() + b.touch.len() + b.assign_ids.len() + b.tag_counts.len();
    let floats = b.deltas.len() + b.insert_keys.len() + b.insert_values.len() + b.assign_values.len();
    let names: usize = b.insert_tags.iter().flatten().map(String::len).sum::<usize>()
        + b.tag_counts.iter().map(|(_, t, _)| t.len() + 8).sum::<usize>();
    8 * ids + 4 * floats + names
}

/// Work for a writer's thread, in submission order.
#[expect(
    clippy::large_enum_variant,
    reason = "batches are nearly every message; boxing them would allocate per step to shrink a queue slot"
)]
enum Msg {
    /// A batch for the store.
    Batch(ChangeBatch),
    /// A task to run once the store holds every batch before it, and where
    /// its result goes.
    After(Task, Sender<Result<()>>),
}

/// A task a writer runs on its thread ([`WriteBehind::after`]).
pub type Task = Pin<Box<dyn Future<Output = Result<()>> + Send + 'static>>;

/// The result of a task handed to a writer ([`WriteBehind::after`]).
pub struct AfterDone {
    rx: Receiver<Result<()>>,
    result: Option<Result<()>>,
}

impl AfterDone {
    /// Whether the task has run (or its writer stopped without running
    /// it), without waiting.
    pub fn is_done(&mut self) -> bool {
        if self.result.is_none() {
            match self.rx.try_recv() {
                Ok(r) => self.result = Some(r),
                Err(TryRecvError::Disconnected) => self.result = Some(Err(stopped())),
                Err(TryRecvError::Empty) => {}
            }
        }
        self.result.is_some()
    }

    /// Waits for the task's result. A writer that stopped on an error
    /// before running it gives an error saying so (the writer's own error
    /// comes from [`WriteBehind::finish`]).
    pub fn wait(mut self) -> Result<()> {
        match self.result.take() {
            Some(r) => r,
            None => self.rx.recv().unwrap_or_else(|_| Err(stopped())),
        }
    }
}

/// What a task's result is when its writer stopped before running it.
fn stopped() -> DmtError {
    DmtError::InvalidArgument(
        "the write-behind thread stopped before running the task queued behind its batches".into(),
    )
}

/// A background writer: journals each batch in the caller's thread (unless
/// started [`WriteBehind::unjournaled`]), then applies it to the store on
/// its own thread (with its own Tokio runtime).
///
/// The thread applies the batches in groups ([`Group`]: up to a number of
/// batches, fewer once they hold a number of bytes;
/// [`MemoryStore::apply_all`]: the SQL stores write a group in one
/// transaction, a memory that several of its batches change once), so the
/// store may lag the journal by a group less one batch;
/// [`WriteBehind::finish`] applies the rest. Up to a group's batches more
/// wait in the writer's queue while it applies one: [`WriteBehind::submit`]
/// blocks while the queue is full. A training step of a large
/// table changes thousands of memories, largely the same ones step after
/// step; writing them once per group instead of once per step cuts the
/// store's page writes, which compete with the training loop for the CPU.
pub struct WriteBehind {
    /// `None` for a writer whose caller recovers from its own checkpoints
    /// ([`WriteBehind::unjournaled`]).
    journal: Option<Journal>,
    tx: Option<SyncSender<Msg>>,
    thread: Option<JoinHandle<Result<u64>>>,
}

impl WriteBehind {
    /// Recovers (replays the journal at `journal_path` onto `store`, then
    /// empties it) and starts the writer thread. Returns the writer and the
    /// number of batches the recovery applied.
    /// The writer applies batches in groups as `group` says.
    pub async fn start(
        store: Arc<dyn MemoryStore>,
        journal_path: impl AsRef<Path>,
        group: Group,
    ) -> Result<(WriteBehind, usize)> {
        let (mut journal, pending) = Journal::open(journal_path)?;
        let recovered = replay(store.as_ref(), &pending).await?;
        if !pending.is_empty() {
            store.flush().await?;
            journal.clear()?;
        }
        let (tx, thread) = spawn_writer(store, group, journal.path())?;
        Ok((
            WriteBehind {
                journal: Some(journal),
                tx: Some(tx),
                thread: Some(thread),
            },
            recovered,
        ))
    }

    /// Starts the writer thread without a journal, for a caller whose own
    /// checkpoints are what it recovers from after a crash: distillation
    /// restores the stores' copies taken with the model's weights, and a
    /// journal's batches past a checkpoint would be discarded unread.
    /// Batches reach the store only through the writer, so a crash loses
    /// those it had not committed; the store stays at its last committed
    /// group (each group is one transaction). `path` names the store in
    /// errors (the thread's start).
    pub fn unjournaled(store: Arc<dyn MemoryStore>, group: Group, path: impl AsRef<Path>) -> Result<WriteBehind> {
        let (tx, thread) = spawn_writer(store, group, path.as_ref())?;
        Ok(WriteBehind {
            journal: None,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Journals `batch` durably (where the writer has a journal) and queues
    /// it for the store (waiting while the queue is full).
    pub fn submit(&mut self, batch: ChangeBatch) -> Result<()> {
        if let Some(journal) = &mut self.journal {
            journal.append(&batch)?;
        }
        self.send(Msg::Batch(batch))
    }

    /// Runs `task` on the writer's thread (on its runtime) once the store
    /// holds every batch submitted before it, flushed: the batches it holds
    /// for a group are applied first, then the store is flushed. Batches
    /// submitted later wait for the task. The result comes through the
    /// returned [`AfterDone`]; the training loop does not wait for it (a
    /// checkpoint's store copies).
    pub fn after(&mut self, task: Task) -> Result<AfterDone> {
        let (done, result) = channel();
        self.send(Msg::After(task, done))?;
        Ok(AfterDone {
            rx: result,
            result: None,
        })
    }

    fn send(&mut self, msg: Msg) -> Result<()> {
        let sent = self.tx.as_ref().map(|tx| tx.send(msg).is_ok()).unwrap_or(false);
        if !sent {
            // The writer stopped on an error: finish() reports it; the batch is
            // safe in the journal (where there is one) for the next recovery.
            return self.stop().and(Err(DmtError::InvalidArgument(
                "the write-behind thread has stopped".into(),
            )));
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<u64> {
        self.tx = None;
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| DmtError::InvalidArgument("the write-behind thread panicked".into()))?,
            None => Ok(0),
        }
    }

    /// Waits until the store holds every submitted batch, flushes it, and
    /// empties the journal (where there is one). Returns the number of
    /// batches applied.
    pub fn finish(mut self) -> Result<u64> {
        let n = self.stop()?;
        if let Some(journal) = &mut self.journal {
            journal.clear()?;
        }
        Ok(n)
    }

    /// [`WriteBehind::finish`] of several writers (one per store) at once:
    /// every writer is told that no batch follows before any is waited for,
    /// so their last groups reach their stores side by side instead of one
    /// store after another. Returns the batches applied in all, or the
    /// first error once every writer has stopped (a writer that failed
    /// keeps its journal for the next recovery, as with `finish`).
    pub fn finish_all(writers: impl IntoIterator<Item = WriteBehind>) -> Result<u64> {
        let mut writers: Vec<WriteBehind> = writers.into_iter().collect();
        for w in &mut writers {
            w.tx = None;
        }
        let mut applied = 0;
        let mut first_error = None;
        for w in writers {
            match w.finish() {
                Ok(n) => applied += n,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(applied), Err)
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        // Let the writer drain; errors surface through finish(), and whatever
        // did not reach the store stays in the journal.
        let _ = self.stop();
    }
}

/// Starts the thread that applies a writer's batches to `store` (on its
/// own Tokio runtime); `path` names it in the error if the thread cannot
/// start.
fn spawn_writer(
    store: Arc<dyn MemoryStore>,
    group: Group,
    path: &Path,
) -> Result<(SyncSender<Msg>, JoinHandle<Result<u64>>)> {
    let runtime = crate::runtime()?;
    // At most a group's batches (and no more than `QUEUE_MAX`) wait besides
    // the group being applied: a writer that falls behind holds the caller
    // back instead of letting the queue grow without bound.
    let (tx, rx) = sync_channel::<Msg>(group.batches.clamp(1, QUEUE_MAX));
    let thread = std::thread::Builder::new()
        .name("memstore-write-behind".into())
        .spawn(move || {
            lower_priority();
            writer(runtime, store, rx, group)
        })
        .map_err(io(path))?;
    Ok((tx, thread))
}

/// The most batches a writer's queue holds (the channel allocates its
/// slots up front).
const QUEUE_MAX: usize = 256;

/// The nice value a writer thread takes, the lowest priority: under
/// contention the scheduler gives it about 1.5% of a default thread's
/// share of the CPU (weights 15 against 1024).
#[cfg(target_os = "linux")]
const WRITER_NICE: libc::c_int = 19;

/// Lowers the calling thread's scheduling priority (on Linux a nice value
/// is per thread: `setpriority` of a thread id changes that thread only),
/// so that a writer fills the CPU time the training loop leaves idle
/// instead of delaying its step: on two cores, renicing the writers of a
/// 65,536-row product-key run from 0 to 10 trained it 1.02× faster, and
/// from 10 to 19 another 1.01× (300 steps, two runs each). A writer has
/// the time it needs where cores idle, and whenever the loop waits for it
/// (a full queue, `finish`). Where this fails, or on other systems, the
/// priority stays as it was; the writer works either way.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid has no preconditions; setpriority only reads its
    // integer arguments.
    unsafe {
        let tid = libc::gettid();
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, WRITER_NICE);
    }
}

fn writer(
    runtime: tokio::runtime::Runtime,
    store: Arc<dyn MemoryStore>,
    rx: Receiver<Msg>,
    group: Group,
) -> Result<u64> {
    let mut n = 0u64;
    let mut batches = Vec::new();
    loop {
        // A group is full (by count or bytes), a task waits for the batches
        // before it, or the sender is gone (finish): apply what came.
        let mut bytes = 0;
        let mut after = None;
        let open = loop {
            match rx.recv() {
                Ok(Msg::Batch(b)) => {
                    bytes += held_bytes(&b);
                    batches.push(b);
                    if batches.len() >= group.batches || bytes >= group.bytes {
                        break true;
                    }
                }
                Ok(Msg::After(task, done)) => {
                    after = Some((task, done));
                    break true;
                }
                Err(_) => break false,
            }
        };
        // On an error the thread stops here: a task waiting is dropped
        // unrun, and its `AfterDone` says so.
        runtime.block_on(store.apply_all(&batches))?;
        n += batches.len() as u64;
        batches.clear();
        if let Some((task, done)) = after {
            runtime.block_on(store.flush())?;
            // The task's failure is its caller's to report; the store is
            // as the batches left it, and the writer goes on.
            let _ = done.send(runtime.block_on(task));
        }
        if !open {
            break;
        }
    }
    runtime.block_on(store.flush())?;
    Ok(n)
}
