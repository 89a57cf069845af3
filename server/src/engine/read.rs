//! Reads: the store, overlaid with the extents not yet applied, so a read
//! always sees the newest acknowledged write; and the allocation map.

use nbd::ErrorCode;
use tokio_uring::buf::fixed::FixedBuf;

use super::{nbd_error, Engine};
use crate::buffer::MAX_CHUNK;
use crate::overlay::{Piece, Source};
use crate::store::Allocation;
use crate::units::{align_down, align_up};

/// Read data ready to send: pool buffers with the `[start, end)` to send of each.
pub struct ReadData {
    /// Buffers in order.
    pub parts: Vec<(FixedBuf, usize, usize)>,
}

impl ReadData {
    /// xxh3-64 of the bytes, in order.
    pub fn xxh3(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for (b, s, e) in &self.parts {
            h.update(&b[*s..*e]);
        }
        h.digest()
    }
}

/// `[offset, end)` cut at MAX_CHUNK-aligned volume offsets, so each piece's
/// aligned span fits one buffer.
fn pieces(offset: u64, end: u64) -> Vec<(u64, u64)> {
    let chunk = MAX_CHUNK as u64;
    let mut out = Vec::new();
    let mut p0 = offset;
    while p0 < end {
        let p1 = (align_down(p0 / chunk * chunk) + chunk).min(end);
        out.push((p0, p1));
        p0 = p1;
    }
    out
}

impl Engine {
    /// Reads `[offset, offset+len)`: the store, overlaid with unapplied extents.
    pub async fn read(&self, offset: u64, len: u64) -> Result<ReadData, ErrorCode> {
        let mut parts = Vec::new();
        if len == 0 {
            return Ok(ReadData { parts });
        }
        // A connection negotiated before a shrink may still ask for bytes
        // past the new end: they are gone.
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(ErrorCode::Inval);
        }
        let pieces = pieces(offset, offset + len);
        // Buffers for a multi-piece read are taken at once (the pool
        // serialises large takes, so two big requests never hold half each
        // and wait for each other).
        let sizes: Vec<usize> = pieces
            .iter()
            .map(|&(a, b)| (align_up(b) - align_down(a)) as usize)
            .collect();
        let bufs = self.pool.take_many(&sizes).await;
        let reads = pieces
            .into_iter()
            .zip(bufs)
            .map(|((p0, p1), buf)| self.read_piece(p0, p1, buf));
        for r in futures_util::future::join_all(reads).await {
            parts.push(r?);
        }
        Ok(ReadData { parts })
    }

    async fn read_piece(
        &self,
        p0: u64,
        p1: u64,
        mut buf: FixedBuf,
    ) -> Result<(FixedBuf, usize, usize), ErrorCode> {
        let a0 = align_down(p0);
        let a1 = align_up(p1);
        let overlay: Vec<Piece> = self.overlay.borrow().lookup(p0, p1);
        let covered: u64 = overlay.iter().map(|p| p.end - p.start).sum();
        if covered < p1 - p0 {
            let (res, b) = self.store.read_into(buf, a0, (a1 - a0) as usize).await;
            buf = b;
            res.map_err(|e| {
                tracing::error!(volume = %self.info.name, "read of the data store at {a0} failed: {e}");
                nbd_error(&e)
            })?;
        }
        for piece in overlay {
            let dst = &mut buf[(piece.start - a0) as usize..(piece.end - a0) as usize];
            match &piece.src {
                Source::Data { payload, at } => payload.copy_out(*at, dst),
                Source::Zero => dst.fill(0),
            }
        }
        Ok((buf, (p0 - a0) as usize, (p1 - a0) as usize))
    }

    /// Allocation of `[offset, offset+len)`: (length, hole) runs. Unapplied
    /// extents count as data (always a safe answer).
    pub fn allocation(&self, offset: u64, len: u64) -> Vec<Allocation> {
        let end = offset + len;
        let pending = self.overlay.borrow().lookup(offset, end);
        if pending.is_empty() {
            return self.store.allocation(offset, len);
        }
        // Conservative: the first extent up to the first pending byte from
        // the store, the rest as data.
        let first = pending[0].start;
        let mut out = if first > offset {
            self.store.allocation(offset, first - offset)
        } else {
            Vec::new()
        };
        out.push(Allocation {
            length: end - first,
            hole: false,
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range_and_each_fits_one_buffer() {
        let chunk = MAX_CHUNK as u64;
        for (offset, len) in [
            (0, 1),
            (0, chunk),
            (1, chunk),
            (chunk - 1, 2),
            (4095, 3 * chunk + 7),
        ] {
            let ps = pieces(offset, offset + len);
            assert_eq!(ps.first().map(|p| p.0), Some(offset));
            assert_eq!(ps.last().map(|p| p.1), Some(offset + len));
            for w in ps.windows(2) {
                assert_eq!(w[0].1, w[1].0, "pieces are contiguous");
            }
            for &(a, b) in &ps {
                assert!(a < b);
                assert!(
                    align_up(b) - align_down(a) <= chunk,
                    "{a}..{b} overflows a buffer"
                );
            }
        }
    }
}
