//! Reads of a volume on a core other than its home (a *satellite*).
//!
//! The home core owns the volume: its overlay of unapplied extents is
//! single-threaded and cannot be read from another thread. What another core
//! can read safely is the data store itself, once nothing newer is waiting
//! to reach it. The [`ReadGate`] says when: the home core counts every
//! mutation from its reservation (the moment its extent enters the overlay
//! and a read on the home core would see it) until the applier's store
//! write of it completed. While the count is zero the store holds every
//! acknowledged write, so a satellite reads it directly; otherwise the read
//! goes to the home core, which overlays the pending extents.
//!
//! Why that is enough: a write acknowledged before a read was sent was
//! reserved before the read arrived. If the read then finds the count at
//! zero, that write's decrement came before the load (every increment has
//! its decrement after it, on one atomic), and the decrement is made only
//! after the store write completed; the store read that follows sees it.
//! A write still in flight when the read arrives may or may not be seen,
//! as NBD allows for a read that overlaps an unacknowledged write.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::buffer::PoolBuf;
use nbd::ErrorCode;
use tokio_uring::buf::BoundedBuf;

use super::nbd_error;
use super::read::{pieces, ReadData};
use crate::buffer::BufPool;
use crate::units::{align_down, align_up, SharedSize};

/// The home core's count of mutations not yet in the store, shared with
/// the satellites.
#[derive(Debug, Default)]
pub struct ReadGate {
    /// Mutations reserved and not yet applied to the store.
    unapplied: AtomicU64,
    /// Set when the home core no longer lets satellites read on their own
    /// (the volume stops, or this node is no longer its primary): every
    /// read goes home, which decides.
    closed: AtomicBool,
}

/// What a satellite sees of the gate when a read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateState {
    /// Mutations reserved and not yet applied.
    pub unapplied: u64,
    /// Satellites must forward every read.
    pub closed: bool,
}

/// Where a satellite's read is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadRoute {
    /// From the store, on the satellite.
    Local,
    /// On the home core (overlay and store).
    Forward,
    /// Nowhere: the range is past the volume's end (refused as the home
    /// core refuses it).
    OutOfRange,
}

/// Where a read of `[offset, offset + len)` goes, given the gate's state
/// and the volume's size read after it. With mutations pending (a resize
/// among them, perhaps) the home core decides, range check included: it
/// knows the size their order gives.
pub fn route_read(gate: GateState, size: u64, offset: u64, len: u64) -> ReadRoute {
    if gate.closed || gate.unapplied > 0 {
        return ReadRoute::Forward;
    }
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return ReadRoute::OutOfRange;
    }
    ReadRoute::Local
}

impl ReadGate {
    /// A mutation was reserved (on the home core, in the reservation step).
    pub(super) fn reserved(&self) {
        self.unapplied.fetch_add(1, Ordering::AcqRel);
    }

    /// A mutation's store write completed (on the home core, in LSN order).
    pub(super) fn applied(&self) {
        let before = self.unapplied.fetch_sub(1, Ordering::AcqRel);
        assert!(before > 0, "a mutation applied that was never counted");
    }

    /// From now on satellites forward every read (never reopened: the
    /// volume stops, or the node restarts into a new role).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// The state now. Read the volume's size after this (a resize sets it
    /// at reservation, before the count drops).
    pub fn state(&self) -> GateState {
        GateState {
            unapplied: self.unapplied.load(Ordering::Acquire),
            closed: self.closed.load(Ordering::Acquire),
        }
    }
}

/// What a satellite core needs to read a volume's store: the gate, the
/// size, and its own descriptor of the store (the same page-cache policy as
/// the home core's plain-export reads). Sent to the satellite's thread.
#[derive(Debug)]
pub struct ReadShare {
    /// The home core's gate.
    pub gate: Arc<ReadGate>,
    /// The volume's size now.
    pub size: SharedSize,
    /// A duplicate of the descriptor the home core reads the store with.
    pub fd: OwnedFd,
    /// The volume's name, for logs.
    pub volume: String,
}

/// A volume's store as a satellite reads it, on the satellite's core.
pub struct StoreReader {
    gate: Arc<ReadGate>,
    size: SharedSize,
    file: tokio_uring::fs::File,
    volume: String,
}

impl StoreReader {
    /// Binds a share to the current core's ring.
    pub fn new(share: ReadShare) -> StoreReader {
        StoreReader {
            gate: share.gate,
            size: share.size,
            file: tokio_uring::fs::File::from_std(std::fs::File::from(share.fd)),
            volume: share.volume,
        }
    }

    /// Where a read of `[offset, offset + len)` is served now.
    pub fn route(&self, offset: u64, len: u64) -> ReadRoute {
        let gate = self.gate.state();
        route_read(gate, self.size.get(), offset, len)
    }

    /// Reads `[offset, offset + len)` from the store into `bufs` (taken
    /// for that range). Only after [`StoreReader::route`] said `Local`.
    pub async fn read(&self, bufs: PieceBuffers) -> Result<ReadData, ErrorCode> {
        let reads = bufs.pieces.into_iter().map(|p| async move {
            let span = p.buf.slice(0..p.aligned_len);
            let (res, slice) = self.file.read_exact_at(span, p.aligned).await;
            (res, slice.into_inner(), p.start, p.end, p.aligned)
        });
        let mut parts = Vec::new();
        for (res, buf, s, e, at) in futures_util::future::join_all(reads).await {
            if let Err(err) = res {
                tracing::error!(volume = %self.volume, "a satellite core's read of the data store at {at} failed: {err}");
                return Err(nbd_error(&err));
            }
            parts.push((buf, s, e));
        }
        Ok(ReadData { parts })
    }
}

/// One piece of a read: a pool buffer for its aligned span.
struct PieceBuffer {
    buf: PoolBuf,
    /// The volume offset of the aligned span.
    aligned: u64,
    /// The aligned span's length.
    aligned_len: usize,
    /// Where the range's bytes are in `buf`.
    start: usize,
    end: usize,
}

/// Pool buffers for a read of a range, one per piece (see
/// `read::pieces`), taken before the read starts: a forwarded read takes
/// them before it asks, so the bytes coming back stay bounded by the pool.
pub struct PieceBuffers {
    pieces: Vec<PieceBuffer>,
}

impl PieceBuffers {
    /// Takes buffers of `pool` for `[offset, offset + len)` (`len` > 0).
    pub async fn take(pool: &BufPool, offset: u64, len: u64) -> PieceBuffers {
        let spans: Vec<(u64, u64, u64, u64)> = pieces(offset, offset + len)
            .into_iter()
            .map(|(p0, p1)| (p0, p1, align_down(p0), align_up(p1)))
            .collect();
        let sizes: Vec<usize> = spans
            .iter()
            .map(|&(_, _, a0, a1)| (a1 - a0) as usize)
            .collect();
        let bufs = pool.take_many(&sizes).await;
        let pieces = spans
            .into_iter()
            .zip(bufs)
            .map(|((p0, p1, a0, a1), buf)| PieceBuffer {
                buf,
                aligned: a0,
                aligned_len: (a1 - a0) as usize,
                start: (p0 - a0) as usize,
                end: (p1 - a0) as usize,
            })
            .collect();
        PieceBuffers { pieces }
    }

    /// The read data `bytes` (the whole range, in order), copied into the
    /// buffers. `bytes` must be exactly the range's length.
    pub fn fill(self, bytes: &[u8]) -> ReadData {
        let want: usize = self.pieces.iter().map(|p| p.end - p.start).sum();
        assert_eq!(
            bytes.len(),
            want,
            "read data of another length than the range"
        );
        let mut at = 0;
        let parts = self
            .pieces
            .into_iter()
            .map(|mut p| {
                let n = p.end - p.start;
                p.buf[p.start..p.end].copy_from_slice(&bytes[at..at + n]);
                at += n;
                (p.buf, p.start, p.end)
            })
            .collect();
        ReadData { parts }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_satellite_reads_locally_only_with_nothing_pending_and_the_gate_open() {
        let g = |unapplied, closed| GateState { unapplied, closed };
        let size = 1 << 20;
        // (gate, offset, len, route)
        let cases = [
            (g(0, false), 0, 4096, ReadRoute::Local),
            (g(0, false), size - 4096, 4096, ReadRoute::Local),
            // Anything pending: the home core overlays it.
            (g(1, false), 0, 4096, ReadRoute::Forward),
            (g(7, false), 0, 4096, ReadRoute::Forward),
            // Closed: home decides, even with nothing pending.
            (g(0, true), 0, 4096, ReadRoute::Forward),
            // Past the end (a shrink applied): refused here as at home.
            (g(0, false), size, 4096, ReadRoute::OutOfRange),
            (g(0, false), size - 4096, 8192, ReadRoute::OutOfRange),
            (g(0, false), u64::MAX - 10, 4096, ReadRoute::OutOfRange),
            // Past the end with a resize perhaps pending: home decides.
            (g(1, false), size, 4096, ReadRoute::Forward),
        ];
        for (gate, offset, len, want) in cases {
            assert_eq!(
                route_read(gate, size, offset, len),
                want,
                "{gate:?} at {offset}+{len}"
            );
        }
    }

    #[test]
    fn the_gate_counts_from_reservation_to_application() {
        let gate = ReadGate::default();
        assert_eq!(gate.state().unapplied, 0);
        gate.reserved();
        gate.reserved();
        gate.applied();
        assert_eq!(gate.state().unapplied, 1);
        gate.applied();
        assert_eq!(
            gate.state(),
            GateState {
                unapplied: 0,
                closed: false
            }
        );
        gate.close();
        assert!(gate.state().closed);
    }

    /// The engine counts a write from its reservation until the applier
    /// wrote it to the store; a satellite's reader then reads it there.
    #[test]
    fn the_engine_counts_a_write_until_applied_and_a_reader_then_sees_it() {
        use crate::buffer::{BufPool, PoolConfig};
        use crate::engine::write::Change;
        use std::rc::Rc;
        use std::time::Duration;
        let dir = tempfile::tempdir().expect("tempdir");
        tokio_uring::start(async {
            let pool = Rc::new(BufPool::new(&PoolConfig::from_budget(48 << 20)));
            // Flush durability: the applier waits for a sync (a flush, or
            // 100 ms), so the write is acknowledged and still unapplied.
            let e = super::super::tests::open_with(
                dir.path(),
                &pool,
                crate::journal::Durability::Flush,
            );
            let share = e.read_share().expect("share");
            let gate = share.gate.clone();
            let reader = StoreReader::new(share);
            assert_eq!(
                reader.route(4096, 8192),
                ReadRoute::Local,
                "nothing written yet"
            );
            let mut p = pool.payload(8192).await;
            let mut chunks = p.take_chunks();
            chunks[0].iter_mut().for_each(|b| *b = 0x5a);
            p.put_chunks(chunks);
            e.mutate(Change::write(4096, p)).await.expect("write");
            assert_eq!(gate.state().unapplied, 1, "acknowledged, not yet applied");
            assert_eq!(reader.route(4096, 8192), ReadRoute::Forward);
            assert_eq!(
                reader.route(0, 4096),
                ReadRoute::Forward,
                "anything pending sends every read home"
            );
            e.flush().await.expect("flush");
            e.wait_applied(e.journal().next_lsn(), Duration::from_secs(10))
                .await
                .expect("applied");
            assert_eq!(gate.state().unapplied, 0);
            assert_eq!(reader.route(4096 + 100, 1000), ReadRoute::Local);
            let bufs = PieceBuffers::take(&pool, 4096 + 100, 1000).await;
            let got = reader.read(bufs).await.expect("read");
            assert_eq!(bytes(&got), vec![0x5a; 1000]);
            // Bytes from the home core land in the same layout.
            let bufs = PieceBuffers::take(&pool, 4096 + 100, 1000).await;
            assert_eq!(bytes(&bufs.fill(&[7; 1000])), vec![7; 1000]);
            assert!(e.shutdown(Duration::from_secs(10)).await, "drained");
            assert_eq!(
                reader.route(4096, 4096),
                ReadRoute::Forward,
                "closed at a stop"
            );
        });
    }

    fn bytes(d: &ReadData) -> Vec<u8> {
        d.parts
            .iter()
            .flat_map(|(b, s, e)| b[*s..*e].to_vec())
            .collect()
    }

    /// Pieces past a chunk boundary fill in order.
    #[test]
    fn bytes_from_home_fill_every_piece_in_order() {
        use crate::buffer::{BufPool, PoolConfig, MAX_CHUNK};
        tokio_uring::start(async {
            let pool = BufPool::new(&PoolConfig::from_budget(48 << 20));
            let (offset, len) = (MAX_CHUNK as u64 - 1000, 3000u64);
            let want: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let bufs = PieceBuffers::take(&pool, offset, len).await;
            let got = bufs.fill(&want);
            assert_eq!(got.parts.len(), 2, "two pieces across the chunk boundary");
            assert_eq!(bytes(&got), want);
        });
    }

    #[test]
    #[should_panic(expected = "never counted")]
    fn applying_more_than_was_reserved_is_a_bug() {
        ReadGate::default().applied();
    }
}
