//! The client's frame reader: length-prefixed frames as [`protocol::codec`]
//! reads them, except that search and learn replies (`Response::Neighbors`)
//! are decoded as they arrive, their keys and values read from the socket
//! straight into the result's vectors.
//!
//! A reply to a search of 4096 queries carries 16 MB of neighbours' keys and
//! values. Read into one frame buffer and then copied out as floats, every
//! byte is written twice into freshly mapped memory; read in place, once.
//! The head of the reply (ids and distances, ~14 bytes a slot against the
//! keys' and values' `4 × (dk + dv)`) is read first, parsed with postcard as
//! the whole frame would be, and the rest follows into the vectors. The
//! result is the same [`Neighbors`] that decoding the whole frame gives
//! (unit tests compare the two on every shape, and on malformed replies).
//!
//! A malformed reply is an error for its request only: the frame's length is
//! known, so the rest of it is skipped and the connection goes on, as with
//! the codec. An oversized length or an I/O failure ends the connection.

use std::borrow::Cow;

use bytes::Bytes;
use memstore_api::Neighbors;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};

use crate::protocol::{self, F32s, LENGTH_PREFIX, ProtocolError, WireError, usize_of};

/// Postcard's variant index of `Response::Neighbors` (checked by a unit test).
const NEIGHBORS: u32 = 1;

/// What the reader hands on: a whole frame's payload, or a search or learn
/// reply decoded as it was read.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// Any other reply, to be decoded by the caller.
    Frame(Bytes),
    /// Search or learn results for request `id` (or why they did not decode).
    Neighbors(u64, Result<Neighbors, WireError>),
}

/// Reads frames from a byte stream.
pub(crate) struct FrameReader<R> {
    r: BufReader<R>,
    max_frame: usize,
}

/// The part of a `Response::Neighbors` frame before the keys.
#[derive(Deserialize)]
struct Head<'a> {
    _id: u64,
    _tag: u32,
    n: u64,
    k: u64,
    key_dim: u64,
    value_dim: u64,
    ids: Cow<'a, [Option<u64>]>,
    #[serde(borrow)]
    distances: F32s<'a>,
    keys_len: u64,
}

/// Id, tag and the four shape fields, to size the head before reading it.
#[derive(Deserialize)]
struct Shape {
    _id: u64,
    _tag: u32,
    n: u64,
    k: u64,
}

/// Longest LEB128 encoding of a `u64`.
const VARINT_MAX: usize = 10;

fn malformed(what: impl Into<String>) -> WireError {
    WireError::protocol(ProtocolError::Malformed, what.into())
}

/// The rest of one frame: bytes already read (`buf[pos..]`) and then the
/// stream's next `unread` bytes.
struct FrameSrc<'a, R> {
    buf: Vec<u8>,
    pos: usize,
    r: &'a mut BufReader<R>,
    unread: usize,
}

impl<R: AsyncRead + Unpin> FrameSrc<'_, R> {
    /// Bytes of the frame not yet consumed.
    fn left(&self) -> usize {
        self.buf.len() - self.pos + self.unread
    }

    /// Fills `out` with the frame's next bytes (the caller checked that the
    /// frame holds them).
    async fn read_into(&mut self, out: &mut [u8]) -> std::io::Result<()> {
        let from_buf = out.len().min(self.buf.len() - self.pos);
        out[..from_buf].copy_from_slice(&self.buf[self.pos..self.pos + from_buf]);
        self.pos += from_buf;
        let rest = &mut out[from_buf..];
        self.r.read_exact(rest).await?;
        self.unread -= rest.len();
        Ok(())
    }

    /// The frame's next LEB128 varint, `None` if malformed or past its end.
    async fn varint(&mut self) -> std::io::Result<Option<u64>> {
        let mut x = 0u64;
        for i in 0..VARINT_MAX {
            if self.left() == 0 {
                return Ok(None);
            }
            let mut b = [0u8];
            self.read_into(&mut b).await?;
            let bits = u64::from(b[0] & 0x7f);
            if i == VARINT_MAX - 1 && b[0] > 1 {
                return Ok(None);
            }
            x |= bits << (7 * i);
            if b[0] & 0x80 == 0 {
                return Ok(Some(x));
            }
        }
        Ok(None)
    }

    /// Consumes the rest of the frame.
    async fn skip(&mut self) -> std::io::Result<()> {
        self.pos = self.buf.len();
        let mut sink = tokio::io::sink();
        let copied = tokio::io::copy(&mut (&mut *self.r).take(self.unread as u64), &mut sink).await?;
        if copied != self.unread as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the connection ended inside a frame",
            ));
        }
        self.unread = 0;
        Ok(())
    }

    /// A vector of `bytes / 4` floats read from the frame.
    async fn floats(&mut self, bytes: usize) -> std::io::Result<Vec<f32>> {
        let mut v = vec![0f32; bytes / 4];
        self.read_into(bytemuck::cast_slice_mut(&mut v)).await?;
        #[cfg(not(target_endian = "little"))]
        for x in v.iter_mut() {
            *x = f32::from_bits(u32::from_le(x.to_bits()));
        }
        Ok(v)
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader of frames of at most `max_frame` bytes.
    pub(crate) fn new(r: R, max_frame: usize) -> Self {
        FrameReader {
            r: BufReader::with_capacity(64 << 10, r),
            max_frame,
        }
    }

    /// The next frame; `None` at a clean end of the stream (between frames).
    pub(crate) async fn next(&mut self) -> Option<std::io::Result<Incoming>> {
        let mut prefix = [0u8; LENGTH_PREFIX];
        match self.r.read(&mut prefix[..1]).await {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => return Some(Err(e)),
        }
        if let Err(e) = self.r.read_exact(&mut prefix[1..]).await {
            return Some(Err(e));
        }
        let len = u32::from_le_bytes(prefix) as usize;
        if len > self.max_frame {
            return Some(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a {len}-byte frame exceeds the {}-byte limit", self.max_frame),
            )));
        }
        Some(self.frame(len).await)
    }

    async fn frame(&mut self, len: usize) -> std::io::Result<Incoming> {
        // Enough for the id, the tag and the shape (or all of a short frame).
        let first = len.min(5 * VARINT_MAX);
        let mut buf = vec![0u8; first];
        self.r.read_exact(&mut buf).await?;
        let (id, tag) = protocol::peek(&buf);
        if tag != Some(NEIGHBORS) {
            buf.resize(len, 0);
            self.r.read_exact(&mut buf[first..]).await?;
            return Ok(Incoming::Frame(Bytes::from(buf)));
        }
        let mut src = FrameSrc {
            buf,
            pos: 0,
            r: &mut self.r,
            unread: len - first,
        };
        let r = neighbors(&mut src).await?;
        if r.is_err() {
            src.skip().await?;
        }
        Ok(Incoming::Neighbors(id, r))
    }
}

/// Decodes a `Response::Neighbors` frame from `src` (positioned at its
/// start); a malformed one is `Ok(Err(..))` with the frame partly consumed.
async fn neighbors<R: AsyncRead + Unpin>(src: &mut FrameSrc<'_, R>) -> std::io::Result<Result<Neighbors, WireError>> {
    let Ok((shape, _)) = postcard::take_from_bytes::<Shape>(&src.buf) else {
        return Ok(Err(malformed("search results: a truncated head")));
    };
    // An upper bound on the head through the keys' length: the fields'
    // varints, each id as a tag and a varint, the distances' bytes.
    let slots = shape.n.saturating_mul(shape.k);
    let head_max = slots
        .saturating_mul((1 + VARINT_MAX + 4) as u64)
        .saturating_add((9 * VARINT_MAX) as u64);
    let want = usize::try_from(head_max).unwrap_or(usize::MAX).min(src.left());
    let have = src.buf.len();
    if want > have {
        src.buf.resize(want, 0);
        src.r.read_exact(&mut src.buf[have..]).await?;
        src.unread -= want - have;
    }
    let (head, rest) = match postcard::take_from_bytes::<Head>(&src.buf) {
        Ok(x) => x,
        Err(e) => return Ok(Err(malformed(format!("search results: {e}")))),
    };
    let shape = (|| {
        let n = usize_of(head.n)?;
        let k = usize_of(head.k)?;
        let key_dim = usize_of(head.key_dim)?;
        let value_dim = usize_of(head.value_dim)?;
        let keys_len = usize_of(head.keys_len)?;
        Ok::<_, WireError>((n, k, key_dim, value_dim, keys_len))
    })();
    let (n, k, key_dim, value_dim, keys_len) = match shape {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    let slots = n.checked_mul(k);
    let inconsistent = || Ok(Err(malformed("search results with inconsistent shapes")));
    if slots != Some(head.ids.len())
        || head.distances.0.len() != 4 * head.ids.len()
        || Some(keys_len) != head.ids.len().checked_mul(key_dim).and_then(|x| x.checked_mul(4))
    {
        return inconsistent();
    }
    let ids = head.ids.into_owned();
    let distances = match head.distances.to_vec("distances") {
        Ok(d) => d,
        Err(e) => return Ok(Err(e)),
    };
    src.pos = src.buf.len() - rest.len();
    if keys_len > src.left() {
        return inconsistent();
    }
    let keys = src.floats(keys_len).await?;
    let Some(values_len) = src.varint().await? else {
        return Ok(Err(malformed("search results: a truncated values length")));
    };
    let values_len = match usize_of(values_len) {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    if Some(values_len) != ids.len().checked_mul(value_dim).and_then(|x| x.checked_mul(4)) || values_len > src.left() {
        return inconsistent();
    }
    let values = src.floats(values_len).await?;
    // Stricter than `postcard::from_bytes`, which ignores trailing bytes.
    if src.left() != 0 {
        return Ok(Err(malformed(format!(
            "search results: {} bytes after the reply",
            src.left()
        ))));
    }
    Ok(Ok(Neighbors {
        n,
        k,
        key_dim,
        value_dim,
        ids,
        distances,
        keys,
        values,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Response, WireNeighbors, encode_frame};

    fn results(n: usize, k: usize, dk: usize, dv: usize) -> Neighbors {
        let mut r = Neighbors::empty(n, k, dk, dv);
        for (i, x) in r.keys.iter_mut().enumerate() {
            *x = i as f32 * 0.25 - 1.0;
        }
        for (i, x) in r.values.iter_mut().enumerate() {
            *x = (i as f32).sqrt();
        }
        for (i, slot) in r.ids.iter_mut().enumerate() {
            *slot = (i % 4 != 1).then_some((i as u64) << (i % 60));
        }
        for (i, d) in r.distances.iter_mut().enumerate() {
            *d = -(i as f32);
        }
        r
    }

    async fn read_all(stream: &[u8], max_frame: usize) -> Vec<std::io::Result<Incoming>> {
        let mut r = FrameReader::new(stream, max_frame);
        let mut out = Vec::new();
        while let Some(x) = r.next().await {
            let stop = x.is_err();
            out.push(x);
            if stop {
                break;
            }
        }
        out
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().build().unwrap()
    }

    /// Every shape decodes as the whole frame does, with frames around it
    /// left intact, and the tag constant is postcard's.
    #[test]
    fn neighbors_read_in_place_match_the_decoded_frame() {
        let shapes = [
            (0, 1, 1, 1),
            (1, 1, 1, 1),
            (3, 2, 5, 7),
            (2, 3, 1, 0),
            (64, 8, 64, 16),
            (700, 8, 3, 2),
            (300, 4, 200, 300),
        ];
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for (i, &(n, k, dk, dv)) in shapes.iter().enumerate() {
            let r = results(n, k, dk, dv);
            let id = (i as u64) * 1_000_003;
            stream.extend(encode_frame(id, &Response::Neighbors(WireNeighbors::from_neighbors(&r)), 1 << 30).unwrap());
            stream.extend(encode_frame(id + 1, &Response::Count(i as u64), 1 << 30).unwrap());
            want.push((id, r));
        }
        let got = rt().block_on(read_all(&stream, 1 << 30));
        assert_eq!(got.len(), 2 * shapes.len());
        for (pair, (id, r)) in got.chunks(2).zip(&want) {
            match &pair[0] {
                Ok(Incoming::Neighbors(got_id, Ok(n))) => {
                    assert_eq!(got_id, id);
                    assert_eq!(n, r, "{} x {}, dims {}/{}", r.n, r.k, r.key_dim, r.value_dim);
                }
                other => panic!("expected neighbours, got {other:?}"),
            }
            match &pair[1] {
                Ok(Incoming::Frame(f)) => {
                    let (got_id, resp): (u64, Response) = protocol::decode_frame(f).unwrap();
                    assert_eq!(got_id, id + 1);
                    assert!(matches!(resp, Response::Count(_)));
                }
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    /// A reply whose lengths disagree with its shape, or that is cut short
    /// inside its frame, is an error for its request; the next frame is read.
    #[test]
    fn malformed_neighbors_are_an_error_and_the_stream_goes_on() {
        let r = results(5, 3, 4, 2);
        let good = encode_frame(9, &Response::Neighbors(WireNeighbors::from_neighbors(&r)), 1 << 20).unwrap();
        let after = encode_frame(10, &Response::Done, 1 << 20).unwrap();
        // (frame, whether decoding the whole frame refuses it too)
        let mut bad_cases = Vec::new();
        // A shape field that disagrees with the arrays (n is the third byte
        // of the payload: id 9, tag 1, n 5).
        let mut f = good.clone();
        f[LENGTH_PREFIX + 2] = 6;
        bad_cases.push((f, true));
        // The frame ends inside the values (length prefix shortened).
        let mut f = good[..good.len() - 3].to_vec();
        let len = (f.len() - LENGTH_PREFIX) as u32;
        f[..LENGTH_PREFIX].copy_from_slice(&len.to_le_bytes());
        bad_cases.push((f, true));
        // Trailing bytes inside the frame.
        let mut f = good.clone();
        f.extend([0, 0]);
        let len = (f.len() - LENGTH_PREFIX) as u32;
        f[..LENGTH_PREFIX].copy_from_slice(&len.to_le_bytes());
        bad_cases.push((f, false));
        // Only the id and the tag.
        bad_cases.push((vec![2, 0, 0, 0, 9, 1], true));
        for (i, (bad, whole_refuses)) in bad_cases.into_iter().enumerate() {
            let mut stream = bad.clone();
            stream.extend(&after);
            let got = rt().block_on(read_all(&stream, 1 << 20));
            assert_eq!(got.len(), 2, "case {i}");
            match &got[0] {
                Ok(Incoming::Neighbors(9, Err(e))) => {
                    assert!(
                        matches!(
                            e,
                            WireError::Protocol {
                                kind: ProtocolError::Malformed,
                                ..
                            }
                        ),
                        "case {i}: {e:?}"
                    );
                    // What decoding the whole frame makes of it.
                    let whole: Result<(u64, Response), _> = protocol::decode_frame(&bad[LENGTH_PREFIX..]);
                    let refused = match whole {
                        Err(_) => true,
                        Ok((_, Response::Neighbors(w))) => w.to_neighbors().is_err(),
                        Ok(_) => false,
                    };
                    assert_eq!(refused, whole_refuses, "case {i}");
                }
                other => panic!("case {i}: expected an error for request 9, got {other:?}"),
            }
            assert!(matches!(&got[1], Ok(Incoming::Frame(_))), "case {i}");
        }
    }

    /// A frame over the limit and a stream cut inside a frame end the
    /// connection; the end of the stream between frames is a clean end.
    #[test]
    fn oversized_and_truncated_frames_end_the_stream() {
        let r = results(4, 2, 3, 3);
        let good = encode_frame(3, &Response::Neighbors(WireNeighbors::from_neighbors(&r)), 1 << 20).unwrap();
        let got = rt().block_on(read_all(&good, good.len() - LENGTH_PREFIX - 1));
        assert!(matches!(&got[..], [Err(e)] if e.kind() == std::io::ErrorKind::InvalidData));
        for cut in [1, LENGTH_PREFIX + 1, LENGTH_PREFIX + 8, good.len() / 2, good.len() - 1] {
            let got = rt().block_on(read_all(&good[..cut], 1 << 20));
            assert!(
                matches!(&got[..], [Err(e)] if e.kind() == std::io::ErrorKind::UnexpectedEof),
                "cut at {cut}: {got:?}"
            );
        }
        let got = rt().block_on(read_all(&good, 1 << 20));
        assert!(matches!(&got[..], [Ok(Incoming::Neighbors(3, Ok(_)))]));
        assert!(rt().block_on(read_all(&[], 1 << 20)).is_empty());
    }
}
