//! Page-aligned I/O buffers, the bounded per-core pool they come from, and the
//! shared views that let one payload go to the journal, the store, the
//! replicas and readers without being copied.
//!
//! Every buffer is allocated once, at start-up, aligned to 4 KiB (so it can be
//! used with `O_DIRECT`); the large classes are registered with the core's
//! io_uring (so socket reads can use `READ_FIXED`), see [`BufPool`]. The pool is
//! the memory bound of the data path: a request that finds no free buffer
//! waits, which is the backpressure that keeps memory use fixed whatever
//! clients do.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::rc::Rc;

use tokio_uring::buf::{IoBuf, IoBufMut};

use crate::units::BLOCK;

/// A heap buffer aligned to [`BLOCK`], with a fixed capacity.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

impl AlignedBuf {
    /// Allocates a zeroed buffer of `cap` bytes; `cap` must be a non-zero
    /// multiple of [`BLOCK`].
    pub fn new(cap: usize) -> AlignedBuf {
        assert!(
            cap > 0 && cap as u64 % BLOCK == 0,
            "buffer capacity {cap} not block aligned"
        );
        let layout = Self::layout(cap);
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, cap, len: cap }
    }

    fn layout(cap: usize) -> Layout {
        // Infallible for the capacities `new` accepts.
        Layout::from_size_align(cap, BLOCK as usize).expect("valid aligned layout")
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The whole buffer as a slice.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap bytes, initialised (zeroed) at allocation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap) }
    }

    /// The whole buffer as a mutable slice.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }

    /// The start of the memory, for the pool's shelves, which hand out
    /// disjoint pieces of one allocation (never the whole as a slice).
    fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

// SAFETY: the pointer is owned and stable for the buffer's life; moving the
// struct does not move the heap allocation.
unsafe impl IoBuf for AlignedBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len
    }
    fn bytes_total(&self) -> usize {
        self.cap
    }
}

// SAFETY: as above; `set_init` only records how much the kernel filled.
unsafe impl IoBufMut for AlignedBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    unsafe fn set_init(&mut self, pos: usize) {
        if pos > self.len {
            self.len = pos;
        }
    }
}

/// The largest buffer class. Payloads above it are split into several chunks
/// of this size (the last one may be a smaller class).
pub const MAX_CHUNK: usize = 1 << 20;

mod pool;
pub use pool::{BufPool, PoolBuf, PoolConfig, CLASSES, MAX_REGISTERED, MIN_CHUNKS};

impl BufPool {
    /// Takes chunks for a `len`-byte payload: full [`MAX_CHUNK`]s, then the
    /// smallest class for the remainder.
    pub async fn payload(&self, len: usize) -> Payload {
        let mut sizes = Vec::with_capacity(len.div_ceil(MAX_CHUNK).max(1));
        let mut left = len;
        loop {
            let take = left.min(MAX_CHUNK);
            sizes.push(take);
            left -= take;
            if left == 0 {
                break;
            }
        }
        Payload {
            chunks: self.take_many(&sizes).await,
            len,
            hash: std::cell::Cell::new(None),
        }
    }
}

/// A request's data: one or more pool buffers, chunk `i` holding bytes
/// `[i * MAX_CHUNK, ...)`. Once filled it is immutable and shared through
/// `Rc` by the journal, the applier, the overlay and readers.
pub struct Payload {
    chunks: Vec<PoolBuf>,
    len: usize,
    /// The xxh3 once computed: a replica verifies the wire checksum and the
    /// journal then stamps the same value into the record header.
    hash: std::cell::Cell<Option<u64>>,
}

impl Payload {
    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// The used length of chunk `i`.
    pub fn chunk_len(&self, i: usize) -> usize {
        let start = i * MAX_CHUNK;
        (self.len - start).min(MAX_CHUNK)
    }

    /// Takes the chunks out for filling by I/O operations; give them back
    /// with [`Payload::put_chunks`].
    pub fn take_chunks(&mut self) -> Vec<PoolBuf> {
        self.hash.set(None);
        std::mem::take(&mut self.chunks)
    }

    /// Puts back chunks taken with [`Payload::take_chunks`].
    pub fn put_chunks(&mut self, chunks: Vec<PoolBuf>) {
        self.hash.set(None);
        self.chunks = chunks;
    }

    /// The payload bytes of chunk `i`.
    pub fn chunk(&self, i: usize) -> &[u8] {
        &self.chunks[i][..self.chunk_len(i)]
    }

    /// Copies payload bytes `[at, at + dst.len())` into `dst`.
    pub fn copy_out(&self, mut at: usize, dst: &mut [u8]) {
        assert!(at + dst.len() <= self.len, "copy beyond payload");
        let mut done = 0;
        while done < dst.len() {
            let ci = at / MAX_CHUNK;
            let co = at % MAX_CHUNK;
            let n = (self.chunk_len(ci) - co).min(dst.len() - done);
            dst[done..done + n].copy_from_slice(&self.chunks[ci][co..co + n]);
            done += n;
            at += n;
        }
    }

    /// xxh3-64 of the payload bytes (computed once: the payload is
    /// immutable while shared).
    pub fn xxh3(&self) -> u64 {
        if let Some(h) = self.hash.get() {
            return h;
        }
        let h = if self.chunks.len() == 1 {
            // One-shot is much cheaper than the streaming state for one slice.
            xxhash_rust::xxh3::xxh3_64(self.chunk(0))
        } else {
            let mut st = xxhash_rust::xxh3::Xxh3::new();
            for i in 0..self.chunks.len() {
                st.update(self.chunk(i));
            }
            st.digest()
        };
        self.hash.set(Some(h));
        h
    }
}

/// A read-only view of `[start, end)` of one chunk of a shared payload,
/// usable as an io_uring buffer (e.g. in a vectored journal write or a
/// socket send) while other holders keep reading it.
pub struct SharedSlice {
    payload: Rc<Payload>,
    chunk: usize,
    start: usize,
    end: usize,
}

impl SharedSlice {
    /// A view of bytes `[start, end)` of chunk `chunk`, where `end` may run
    /// into the chunk's slack up to its capacity (used to pad to a block).
    pub fn new(payload: Rc<Payload>, chunk: usize, start: usize, end: usize) -> SharedSlice {
        let cap = payload.chunks[chunk].bytes_total();
        assert!(start <= end && end <= cap, "shared slice out of range");
        SharedSlice {
            payload,
            chunk,
            start,
            end,
        }
    }

    /// Views covering the whole payload, each chunk padded up to a block
    /// multiple (the journal writes whole blocks; slack bytes are ignored).
    pub fn padded_chunks(payload: &Rc<Payload>) -> impl Iterator<Item = SharedSlice> + '_ {
        (0..payload.chunk_count()).map(move |i| {
            let len = crate::units::align_up(payload.chunk_len(i) as u64) as usize;
            SharedSlice::new(payload.clone(), i, 0, len)
        })
    }
}

// SAFETY: the chunk memory is owned by the payload, which this view keeps
// alive through the Rc; nobody writes to a payload once it is shared.
unsafe impl IoBuf for SharedSlice {
    fn stable_ptr(&self) -> *const u8 {
        // SAFETY: start <= capacity, checked in `new`.
        unsafe { self.payload.chunks[self.chunk].stable_ptr().add(self.start) }
    }
    fn bytes_init(&self) -> usize {
        self.end - self.start
    }
    fn bytes_total(&self) -> usize {
        self.end - self.start
    }
}

/// One piece of an outgoing vectored write: owned bytes (headers) or a view
/// of pool memory. Everything a reply or a journal batch sends is one of these,
/// so a single `writev` can mix them.
pub enum OutBuf {
    /// Small owned bytes, e.g. a reply header; `.1` is how much was already sent.
    Bytes(Vec<u8>, usize),
    /// A view of shared payload memory.
    Shared(SharedSlice),
    /// A pool buffer owned by this reply (read data): `[start, end)`.
    Pooled(PoolBuf, usize, usize),
    /// An aligned block owned by this write (journal record header).
    Block(AlignedBuf),
}

impl OutBuf {
    /// Advances past `n` bytes already sent (`n` ≤ remaining length).
    pub fn advance(&mut self, n: usize) {
        match self {
            OutBuf::Bytes(_, sent) => *sent += n,
            OutBuf::Shared(s) => s.start += n,
            OutBuf::Pooled(_, start, _) => *start += n,
            OutBuf::Block(_) => unreachable!("blocks are written whole"),
        }
    }

    /// Bytes left to send.
    pub fn remaining(&self) -> usize {
        self.bytes_init()
    }
}

// SAFETY: each variant points into memory it owns (or keeps alive via Rc),
// which does not move when the enum moves.
unsafe impl IoBuf for OutBuf {
    fn stable_ptr(&self) -> *const u8 {
        match self {
            // SAFETY: sent <= len.
            OutBuf::Bytes(v, sent) => unsafe { v.as_ptr().add(*sent) },
            OutBuf::Shared(s) => s.stable_ptr(),
            // SAFETY: start <= end <= capacity.
            OutBuf::Pooled(b, start, _) => unsafe { b.stable_ptr().add(*start) },
            OutBuf::Block(b) => b.stable_ptr(),
        }
    }
    fn bytes_init(&self) -> usize {
        match self {
            OutBuf::Bytes(v, sent) => v.len() - *sent,
            OutBuf::Shared(s) => s.bytes_init(),
            OutBuf::Pooled(_, start, end) => end - start,
            OutBuf::Block(b) => b.capacity(),
        }
    }
    fn bytes_total(&self) -> usize {
        self.bytes_init()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_and_zeroed() {
        for cap in CLASSES {
            let b = AlignedBuf::new(cap);
            assert_eq!(b.stable_ptr() as usize % BLOCK as usize, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn payload_chunks_copy_and_hash() {
        tokio_uring::start(async {
            let pool = BufPool::new(&PoolConfig {
                counts: [4, 1, 1, 1, 4],
            });
            let len = MAX_CHUNK * 2 + 100;
            let mut p = pool.payload(len).await;
            assert_eq!(p.chunk_count(), 3);
            let mut chunks = p.take_chunks();
            let mut i = 0u8;
            for c in chunks.iter_mut() {
                for b in c.iter_mut() {
                    *b = i;
                    i = i.wrapping_add(1);
                }
            }
            p.put_chunks(chunks);
            let mut out = vec![0u8; 300];
            p.copy_out(MAX_CHUNK - 100, &mut out);
            let mut flat = Vec::new();
            for ci in 0..p.chunk_count() {
                flat.extend_from_slice(p.chunk(ci));
            }
            assert_eq!(flat.len(), len);
            assert_eq!(&out[..], &flat[MAX_CHUNK - 100..MAX_CHUNK + 200]);
            assert_eq!(p.xxh3(), xxhash_rust::xxh3::xxh3_64(&flat));
            // Refilled: the remembered hash is dropped with the old bytes.
            let mut chunks = p.take_chunks();
            chunks[2][0] ^= 0xff;
            p.put_chunks(chunks);
            flat[2 * MAX_CHUNK] ^= 0xff;
            assert_eq!(p.xxh3(), xxhash_rust::xxh3::xxh3_64(&flat));
            // One chunk (the one-shot path) hashes the same as streaming.
            let mut one = pool.payload(4096).await;
            let mut chunks = one.take_chunks();
            chunks[0]
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = i as u8);
            one.put_chunks(chunks);
            let mut st = xxhash_rust::xxh3::Xxh3::new();
            st.update(one.chunk(0));
            assert_eq!(one.xxh3(), st.digest());
            assert_eq!(one.xxh3(), st.digest());
        });
    }
}
