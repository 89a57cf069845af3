//! Reads: the store, overlaid with the extents not yet applied, so a read
//! always sees the newest acknowledged write; and the allocation map.

use crate::buffer::PoolBuf;
use nbd::ErrorCode;

use super::snapshot::Snapshot;
use super::{nbd_error, Engine};
use crate::buffer::MAX_CHUNK;
use crate::overlay::{Piece, Source};
use crate::store::Allocation;
use crate::units::{align_down, align_up};

/// Read data ready to send: pool buffers with the `[start, end)` to send of each.
pub struct ReadData {
    /// Buffers in order.
    pub parts: Vec<(PoolBuf, usize, usize)>,
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

/// Pool buffers taken for one read (see [`Engine::try_read_buffers`]);
/// they go back to the pool when dropped.
pub struct ReadBuffers {
    /// The most bytes they hold, from a chunk boundary.
    len: u64,
    bufs: Vec<PoolBuf>,
}

/// `[offset, end)` cut at MAX_CHUNK-aligned volume offsets, so each piece's
/// aligned span fits one buffer.
pub(super) fn pieces(offset: u64, end: u64) -> Vec<(u64, u64)> {
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
    /// One aligned buffer per piece, taken at once (the pool serialises
    /// large takes, so two big requests never hold half each and wait for
    /// each other).
    pub(super) async fn piece_buffers(&self, pieces: &[(u64, u64)]) -> Vec<PoolBuf> {
        let sizes: Vec<usize> = pieces
            .iter()
            .map(|&(a, b)| (align_up(b) - align_down(a)) as usize)
            .collect();
        self.pool.take_many(&sizes).await
    }

    /// Reads `[offset, offset+len)`: the store, overlaid with unapplied extents.
    pub async fn read(&self, offset: u64, len: u64) -> Result<ReadData, ErrorCode> {
        if len == 0 {
            return Ok(ReadData { parts: Vec::new() });
        }
        self.check_read_range(offset, len)?;
        let pieces = pieces(offset, offset + len);
        let bufs = self.piece_buffers(&pieces).await;
        self.read_pieces(pieces, bufs).await
    }

    /// A connection negotiated before a shrink may still ask for bytes past
    /// the new end: they are gone.
    fn check_read_range(&self, offset: u64, len: u64) -> Result<(), ErrorCode> {
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(ErrorCode::Inval);
        }
        Ok(())
    }

    async fn read_pieces(
        &self,
        pieces: Vec<(u64, u64)>,
        bufs: Vec<PoolBuf>,
    ) -> Result<ReadData, ErrorCode> {
        let reads = pieces
            .into_iter()
            .zip(bufs)
            .map(|((p0, p1), buf)| self.read_piece(p0, p1, buf));
        let mut parts = Vec::new();
        for r in futures_util::future::join_all(reads).await {
            parts.push(r?);
        }
        Ok(ReadData { parts })
    }

    /// Buffers for one later [`Engine::read_with`] of up to `len` bytes at
    /// an offset aligned to [`MAX_CHUNK`], if the pool has them free now;
    /// None otherwise (never waits).
    pub fn try_read_buffers(&self, len: u64) -> Option<ReadBuffers> {
        let sizes: Vec<usize> = pieces(0, len)
            .iter()
            .map(|&(a, b)| (align_up(b) - align_down(a)) as usize)
            .collect();
        self.pool
            .try_take_many(&sizes)
            .map(|bufs| ReadBuffers { len, bufs })
    }

    /// [`Engine::read`] into buffers taken beforehand with
    /// [`Engine::try_read_buffers`]: `offset` aligned to [`MAX_CHUNK`] and
    /// `len` at most theirs.
    pub async fn read_with(
        &self,
        offset: u64,
        len: u64,
        bufs: ReadBuffers,
    ) -> Result<ReadData, ErrorCode> {
        assert!(
            offset % MAX_CHUNK as u64 == 0 && len <= bufs.len,
            "a read of {len} bytes at {offset} in buffers taken for {} bytes at a chunk boundary",
            bufs.len
        );
        if len == 0 {
            return Ok(ReadData { parts: Vec::new() });
        }
        self.check_read_range(offset, len)?;
        self.read_pieces(pieces(offset, offset + len), bufs.bufs)
            .await
    }

    async fn read_piece(
        &self,
        p0: u64,
        p1: u64,
        mut buf: PoolBuf,
    ) -> Result<(PoolBuf, usize, usize), ErrorCode> {
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

    /// Allocation of `[offset, offset+len)` (or of a prefix of it): the
    /// store's holes and data, with each unapplied extent reported by itself
    /// (a pending write as data, a pending trim or write-zeroes as zero).
    pub fn allocation(&self, offset: u64, len: u64) -> Vec<Allocation> {
        let end = offset.saturating_add(len).min(self.size());
        let pending: Vec<Pending> = self
            .overlay
            .borrow()
            .lookup(offset, end)
            .iter()
            .map(|p| Pending {
                start: p.start,
                end: p.end,
                zero: matches!(p.src, Source::Zero),
            })
            .collect();
        merge_allocation(offset, end, &pending, |o, l| self.settled_allocation(o, l))
    }

    /// Allocation of `[offset, offset+len)` of `snap` (or of a prefix of
    /// it): a region no record after the snapshot changed is as the volume
    /// is now (its holes and zeroes are the snapshot's); a changed region is
    /// reported as data, since its old bytes sit in the snapshot's side file
    /// or are still being saved. Synchronous, so no write lands between the
    /// two looks; marks come at LSN reservation, before the bytes change.
    pub fn snapshot_allocation(&self, snap: &Snapshot, offset: u64, len: u64) -> Vec<Allocation> {
        let end = offset.saturating_add(len).min(snap.size());
        if offset >= end {
            return Vec::new();
        }
        let mut changed: Vec<Pending> = Vec::new();
        self.changed_extents(snap.start().last(), offset, end - offset, |o, l, dirty| {
            if dirty {
                changed.push(Pending {
                    start: o,
                    end: o + l,
                    zero: false,
                });
            }
        });
        merge_allocation(offset, end, &changed, |o, l| self.allocation(o, l))
    }

    /// Allocation of applied bytes: regions no record ever changed on a
    /// store born zero are holes (a preallocated store has no holes of its
    /// own); the rest as the store's `SEEK_HOLE` says (trims punch holes).
    fn settled_allocation(&self, offset: u64, len: u64) -> Vec<Allocation> {
        let mut out = Vec::new();
        self.changes
            .borrow()
            .walk_never_written(offset, len, |o, l, never| {
                if never {
                    out.push(Allocation::hole(l));
                } else {
                    out.extend(self.store.allocation(o, l));
                }
            });
        out
    }
}

/// Most runs one allocation answer holds; the rest of the range is left to
/// the client's next BLOCK_STATUS (the spec lets a reply cover a prefix).
pub const MAX_ALLOCATION_RUNS: usize = 1024;

/// An unapplied extent, as the allocation map sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    start: u64,
    end: u64,
    /// It reads as zeroes (a trim or write-zeroes not yet applied).
    zero: bool,
}

/// Appends `a`, joining it to the last run when both describe bytes alike.
fn push_run(out: &mut Vec<Allocation>, a: Allocation) {
    if a.length == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.same_state(&a) => last.length += a.length,
        _ => out.push(a),
    }
}

/// The allocation runs of `[offset, end)`: `pending` (sorted, disjoint,
/// inside the range) each by itself, the gaps between them as `store`
/// says. At most [`MAX_ALLOCATION_RUNS`] runs, covering a prefix of the
/// range from `offset`.
fn merge_allocation(
    offset: u64,
    end: u64,
    pending: &[Pending],
    mut store: impl FnMut(u64, u64) -> Vec<Allocation>,
) -> Vec<Allocation> {
    let mut out: Vec<Allocation> = Vec::new();
    let mut pos = offset;
    let mut next = pending.iter().peekable();
    while pos < end && out.len() < MAX_ALLOCATION_RUNS {
        match next.peek() {
            Some(p) if p.start <= pos => {
                assert!(
                    p.start == pos && p.end > pos && p.end <= end,
                    "pending extents are disjoint, sorted and inside the range"
                );
                let length = p.end - pos;
                push_run(
                    &mut out,
                    if p.zero {
                        Allocation::zero(length)
                    } else {
                        Allocation::data(length)
                    },
                );
                pos = p.end;
                next.next();
            }
            p => {
                let gap_end = p.map_or(end, |p| p.start);
                let mut covered = 0;
                for a in store(pos, gap_end - pos) {
                    let a = Allocation {
                        length: a.length.min(gap_end - pos - covered),
                        ..a
                    };
                    covered += a.length;
                    push_run(&mut out, a);
                }
                // A store answer short of the gap leaves the rest unknown: data.
                push_run(&mut out, Allocation::data(gap_end - pos - covered));
                pos = gap_end;
            }
        }
    }
    out.truncate(MAX_ALLOCATION_RUNS);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(length: u64, hole: bool, zero: bool) -> Allocation {
        Allocation { length, hole, zero }
    }

    /// A store of 4 KiB blocks: `H` hole, `D` data.
    fn store_of(map: &'static str) -> impl FnMut(u64, u64) -> Vec<Allocation> {
        move |off, len| {
            let mut out = Vec::new();
            for i in off / 4096..(off + len).div_ceil(4096) {
                let a = (i * 4096).max(off);
                let b = ((i + 1) * 4096).min(off + len);
                let hole = map.as_bytes()[i as usize] == b'H';
                push_run(
                    &mut out,
                    if hole {
                        Allocation::hole(b - a)
                    } else {
                        Allocation::data(b - a)
                    },
                );
            }
            out
        }
    }

    #[test]
    fn pending_extents_are_reported_each_by_itself() {
        let p = |start, end, zero| Pending { start, end, zero };
        let k = 4096;
        // (store, range, pending, expected runs)
        type Case = (&'static str, (u64, u64), Vec<Pending>, Vec<Allocation>);
        let cases: Vec<Case> = vec![
            ("HHHH", (0, 4 * k), vec![], vec![run(4 * k, true, true)]),
            (
                "HDDH",
                (0, 4 * k),
                vec![],
                vec![
                    run(k, true, true),
                    run(2 * k, false, false),
                    run(k, true, true),
                ],
            ),
            // A pending write in a hole is data; the hole after it stays a hole.
            (
                "HHHH",
                (0, 4 * k),
                vec![p(k, 2 * k, false)],
                vec![
                    run(k, true, true),
                    run(k, false, false),
                    run(2 * k, true, true),
                ],
            ),
            // A pending trim over data reads as zero (not yet a hole).
            (
                "DDDD",
                (0, 4 * k),
                vec![p(k, 3 * k, true)],
                vec![
                    run(k, false, false),
                    run(2 * k, false, true),
                    run(k, false, false),
                ],
            ),
            // Two pending extents, clipped range, partial blocks.
            (
                "HHHH",
                (100, 4 * k - 100),
                vec![p(100, 200, false), p(3 * k, 4 * k - 100, true)],
                vec![
                    run(100, false, false),
                    run(3 * k - 200, true, true),
                    run(k - 100, false, true),
                ],
            ),
        ];
        for (map, (a, b), pending, want) in cases {
            let got = merge_allocation(a, b, &pending, store_of(map));
            assert_eq!(got, want, "store {map} range {a}..{b} pending {pending:?}");
            assert_eq!(got.iter().map(|r| r.length).sum::<u64>(), b - a);
        }
    }

    #[test]
    fn many_pending_extents_answer_a_prefix() {
        let k = 4096;
        let n = MAX_ALLOCATION_RUNS as u64 + 10;
        // Alternating pending writes and holes: every run differs.
        let pending: Vec<Pending> = (0..n)
            .map(|i| Pending {
                start: 2 * i * k,
                end: (2 * i + 1) * k,
                zero: false,
            })
            .collect();
        let got = merge_allocation(0, 2 * n * k, &pending, |_, l| vec![Allocation::hole(l)]);
        assert_eq!(got.len(), MAX_ALLOCATION_RUNS);
        assert!(got.iter().all(|r| r.length == k));
    }

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
