//! The bounded buffer pool of one core, and how a memory budget is split
//! over its capacity classes.
//!
//! Every buffer is allocated once, at start-up, aligned to 4 KiB (so it can
//! be used with `O_DIRECT`). tokio-uring 0.5 registers at most
//! [`MAX_REGISTERED`] buffers with a ring (its pool keeps the first
//! `UIO_MAXIOV` it is given and silently drops the rest), while a budget
//! spent on 4 KiB writes wants thousands of buffers. So the pool registers
//! whole classes, largest first, as far as the ring takes them (their
//! socket reads may use `READ_FIXED`), and carves the other classes from one
//! plain aligned allocation each (their reads use plain `READ`; a direct
//! `recvmsg`, the common case, is the same for both). A 4 KiB write then
//! costs 4 KiB of the budget, not one of 1,024 slots.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;

use tokio_uring::buf::fixed::{FixedBuf, FixedBufPool};
use tokio_uring::buf::{IoBuf, IoBufMut};

use super::{AlignedBuf, MAX_CHUNK};

/// Capacity classes of the pool, smallest first.
pub const CLASSES: [usize; 5] = [4 << 10, 16 << 10, 64 << 10, 256 << 10, MAX_CHUNK];

/// Most buffers tokio-uring 0.5 registers with one ring (`UIO_MAXIOV`).
pub const MAX_REGISTERED: usize = 1024;

/// 1 MiB buffers a pool keeps when its budget holds them: one 32 MiB
/// request (the largest payload) plus headroom.
pub const MIN_CHUNKS: usize = 40;

/// What the 4K, 16K, 64K and 256K classes get, in 32nds of the budget
/// (less when the budget leaves [`MIN_CHUNKS`] 1 MiB buffers no room).
/// 4K gets the most: at the default 128 MiB that is 4,096 buffers, so
/// thousands of small writes can wait unapplied in `--durability flush`
/// without the pool asking for a journal sync; the 1 MiB class gets the
/// rest (92 at 128 MiB).
const SMALL_SHARES: [u64; 4] = [4, 1, 2, 2];

/// How many buffers of each class a pool holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Count per entry of [`CLASSES`].
    pub counts: [usize; 5],
}

impl PoolConfig {
    /// Splits a memory budget over the classes: the 4K, 16K, 64K and 256K
    /// classes 4, 1, 2 and 2 32nds of it, the rest to 1 MiB chunks. The pool never exceeds
    /// the budget; it keeps at least [`MIN_CHUNKS`] 1 MiB chunks when the
    /// budget holds them (every budget the configuration accepts does).
    pub fn from_budget(bytes: u64) -> PoolConfig {
        let shares: u64 = SMALL_SHARES.iter().sum();
        let chunk = MAX_CHUNK as u64;
        let small = (bytes / 32 * shares).min(bytes.saturating_sub(MIN_CHUNKS as u64 * chunk));
        let mut counts = [0usize; 5];
        for (i, share) in SMALL_SHARES.iter().enumerate() {
            counts[i] = (small / shares * share / CLASSES[i] as u64) as usize;
        }
        let small_used = PoolConfig { counts }.total_bytes();
        counts[4] = ((bytes - small_used) / chunk) as usize;
        let cfg = PoolConfig { counts };
        assert!(
            cfg.total_bytes() <= bytes,
            "pool {cfg:?} over its budget {bytes}"
        );
        cfg
    }

    /// Total bytes the pool allocates.
    pub fn total_bytes(&self) -> u64 {
        self.counts
            .iter()
            .zip(CLASSES)
            .map(|(n, c)| (*n * c) as u64)
            .sum()
    }

    /// Which classes are registered with the ring: whole classes, largest
    /// first (registration saves the most per byte on large transfers),
    /// each that still fits under [`MAX_REGISTERED`]. A class with no
    /// buffers counts as registered (there is nothing to carve).
    pub fn registered_classes(&self) -> [bool; 5] {
        let mut out = [false; 5];
        let mut room = MAX_REGISTERED;
        for i in (0..CLASSES.len()).rev() {
            if self.counts[i] <= room {
                room -= self.counts[i];
                out[i] = true;
            }
        }
        out
    }
}

/// The buffers of one unregistered class: one aligned allocation cut into
/// equal buffers, and the free ones.
struct Shelf {
    /// `count * cap` bytes; only ever accessed through [`PlainBuf`]s, each
    /// its own `cap`-byte piece.
    slab: AlignedBuf,
    cap: usize,
    free: RefCell<Vec<u32>>,
    /// Which buffers are out (the invariant a return checks).
    out: RefCell<Vec<bool>>,
    /// Wakes one task waiting in [`Shelf::take`] per buffer returned.
    returned: tokio::sync::Notify,
}

impl Shelf {
    fn new(cap: usize, count: usize) -> Rc<Shelf> {
        assert!(
            count > 0 && u32::try_from(count).is_ok(),
            "shelf of {count} buffers"
        );
        Rc::new(Shelf {
            slab: AlignedBuf::new(cap * count),
            cap,
            // Reversed, so buffers go out from the start of the slab.
            free: RefCell::new((0..count as u32).rev().collect()),
            out: RefCell::new(vec![false; count]),
            returned: tokio::sync::Notify::new(),
        })
    }

    fn try_take(self: &Rc<Self>) -> Option<PlainBuf> {
        let index = self.free.borrow_mut().pop()?;
        let mut out = self.out.borrow_mut();
        assert!(
            !out[index as usize],
            "plain buffer {index} handed out twice"
        );
        out[index as usize] = true;
        Some(PlainBuf {
            shelf: self.clone(),
            index,
        })
    }

    async fn take(self: &Rc<Self>) -> PlainBuf {
        loop {
            // Created before the check: a return in between is not missed.
            let returned = self.returned.notified();
            if let Some(b) = self.try_take() {
                return b;
            }
            returned.await;
        }
    }

    fn give_back(&self, index: u32) {
        let mut out = self.out.borrow_mut();
        assert!(out[index as usize], "plain buffer {index} returned twice");
        out[index as usize] = false;
        self.free.borrow_mut().push(index);
        self.returned.notify_one();
    }
}

/// One buffer of a [`Shelf`], returned to it when dropped.
struct PlainBuf {
    shelf: Rc<Shelf>,
    index: u32,
}

impl PlainBuf {
    fn ptr(&self) -> *mut u8 {
        // SAFETY: index < count, so the piece lies inside the slab.
        unsafe {
            self.shelf
                .slab
                .base()
                .add(self.index as usize * self.shelf.cap)
        }
    }
}

impl Drop for PlainBuf {
    fn drop(&mut self) {
        self.shelf.give_back(self.index);
    }
}

/// Buffers out of a pool, per class.
#[derive(Default)]
struct InUse([Cell<usize>; 5]);

/// Counts a buffer as out of its pool while it lives.
struct Held {
    class: usize,
    in_use: Rc<InUse>,
}

impl Held {
    fn new(class: usize, in_use: &Rc<InUse>) -> Held {
        let c = &in_use.0[class];
        c.set(c.get() + 1);
        Held {
            class,
            in_use: in_use.clone(),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let c = &self.in_use.0[self.class];
        assert!(
            c.get() > 0,
            "more buffers of class {} back than out",
            self.class
        );
        c.set(c.get() - 1);
    }
}

enum Mem {
    Registered(FixedBuf),
    Plain(PlainBuf),
}

/// A buffer from a [`BufPool`], registered with the ring or plain memory;
/// it goes back to the pool when dropped. Always fully initialised (the
/// pool zeroes everything once, at start).
pub struct PoolBuf {
    mem: Mem,
    _held: Held,
}

impl PoolBuf {
    /// Runs `op` (a `READ_FIXED`, say) on the registered buffer inside and
    /// gives it back whole; `Err(self)` when the buffer is plain memory.
    pub async fn with_registered<R, F, Fut>(self, op: F) -> Result<(R, PoolBuf), PoolBuf>
    where
        F: FnOnce(FixedBuf) -> Fut,
        Fut: Future<Output = (R, FixedBuf)>,
    {
        let PoolBuf { mem, _held } = self;
        match mem {
            Mem::Registered(b) => {
                let (r, b) = op(b).await;
                Ok((
                    r,
                    PoolBuf {
                        mem: Mem::Registered(b),
                        _held,
                    },
                ))
            }
            mem => Err(PoolBuf { mem, _held }),
        }
    }
}

// SAFETY: both kinds point at memory the pool allocated once and keeps
// alive (the `Rc`s inside), owned by this handle until it is dropped.
unsafe impl IoBuf for PoolBuf {
    fn stable_ptr(&self) -> *const u8 {
        match &self.mem {
            Mem::Registered(b) => b.stable_ptr(),
            Mem::Plain(p) => p.ptr(),
        }
    }
    fn bytes_init(&self) -> usize {
        match &self.mem {
            Mem::Registered(b) => b.bytes_init(),
            Mem::Plain(p) => p.shelf.cap,
        }
    }
    fn bytes_total(&self) -> usize {
        match &self.mem {
            Mem::Registered(b) => b.bytes_total(),
            Mem::Plain(p) => p.shelf.cap,
        }
    }
}

// SAFETY: as above; plain buffers are initialised (zeroed) from the start.
unsafe impl IoBufMut for PoolBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        match &mut self.mem {
            Mem::Registered(b) => b.stable_mut_ptr(),
            Mem::Plain(p) => p.ptr(),
        }
    }
    unsafe fn set_init(&mut self, pos: usize) {
        if let Mem::Registered(b) = &mut self.mem {
            // SAFETY: forwarded; the caller vouches for `pos`.
            unsafe { b.set_init(pos) }
        }
    }
}

impl std::ops::Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the buffer's initialised bytes, owned by this handle.
        unsafe { std::slice::from_raw_parts(self.stable_ptr(), self.bytes_init()) }
    }
}

impl std::ops::DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.bytes_init();
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.stable_mut_ptr(), len) }
    }
}

/// Where a class's buffers come from.
enum Source {
    /// tokio-uring's registered pool (it keeps the free lists).
    Registered,
    /// A shelf of plain memory.
    Plain(Rc<Shelf>),
}

/// The bounded buffer pool of one core: the memory bound of the data path.
/// A request that finds no free buffer waits, which is the backpressure
/// that keeps memory use fixed whatever clients do.
pub struct BufPool {
    fixed: FixedBufPool<AlignedBuf>,
    sources: [Source; 5],
    registered: bool,
    counts: [usize; 5],
    in_use: Rc<InUse>,
    /// Held while taking several buffers for one request, so two large
    /// requests never each hold part of what they need and wait forever.
    multi: tokio::sync::Mutex<()>,
    /// Requests waiting for a buffer now.
    waiting: Rc<Cell<usize>>,
    /// Woken whenever a request finds the pool empty and starts to wait
    /// (the flush-mode applier then releases the buffers it holds).
    starved: tokio::sync::Notify,
}

/// Counts a request as waiting for a buffer while it lives (a cancelled
/// wait counts down too).
struct Waiting(Rc<Cell<usize>>);

impl Waiting {
    fn new(n: &Rc<Cell<usize>>) -> Waiting {
        n.set(n.get() + 1);
        Waiting(n.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// The index in [`CLASSES`] of the smallest class that holds `len` bytes
/// (the largest for more).
fn class_index(len: usize) -> usize {
    CLASSES
        .iter()
        .position(|c| *c >= len)
        .unwrap_or(CLASSES.len() - 1)
}

impl BufPool {
    /// Allocates the pool and registers its registered classes with the
    /// current core's ring. Must run inside a tokio-uring runtime. If
    /// registration is refused (e.g. `RLIMIT_MEMLOCK` too low), the pool
    /// still works with plain reads.
    pub fn new(cfg: &PoolConfig) -> BufPool {
        let reg = cfg.registered_classes();
        let registered_count: usize = (0..CLASSES.len())
            .filter(|&i| reg[i])
            .map(|i| cfg.counts[i])
            .sum();
        assert!(
            registered_count <= MAX_REGISTERED,
            "{registered_count} buffers to register, more than a ring takes"
        );
        let bufs = (0..CLASSES.len())
            .filter(|&i| reg[i])
            .flat_map(|i| (0..cfg.counts[i]).map(move |_| AlignedBuf::new(CLASSES[i])));
        let fixed = FixedBufPool::new(bufs);
        let registered = registered_count > 0 && Self::register(&fixed, cfg, registered_count);
        let sources = std::array::from_fn(|i| {
            if reg[i] {
                Source::Registered
            } else {
                Source::Plain(Shelf::new(CLASSES[i], cfg.counts[i]))
            }
        });
        BufPool {
            fixed,
            sources,
            registered,
            counts: cfg.counts,
            in_use: Rc::new(InUse::default()),
            multi: tokio::sync::Mutex::new(()),
            waiting: Rc::new(Cell::new(0)),
            starved: tokio::sync::Notify::new(),
        }
    }

    fn register(fixed: &FixedBufPool<AlignedBuf>, cfg: &PoolConfig, count: usize) -> bool {
        match fixed.register() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    "could not register {count} I/O buffers of the {} pool with io_uring ({e}); using unregistered buffers (raise LimitMEMLOCK to fix)",
                    crate::units::ByteSize(cfg.total_bytes())
                );
                false
            }
        }
    }

    /// Whether the registered classes are registered (so `READ_FIXED` may
    /// be used on their buffers).
    pub fn registered(&self) -> bool {
        self.registered
    }

    /// The smallest class that holds `len` bytes (at most [`MAX_CHUNK`]).
    pub fn class_for(len: usize) -> usize {
        CLASSES[class_index(len)]
    }

    /// A free buffer of class `i` now, if there is one.
    fn try_class(&self, i: usize) -> Option<PoolBuf> {
        let mem = match &self.sources[i] {
            Source::Registered => Mem::Registered(self.fixed.try_next(CLASSES[i])?),
            Source::Plain(shelf) => Mem::Plain(shelf.try_take()?),
        };
        Some(PoolBuf {
            mem,
            _held: Held::new(i, &self.in_use),
        })
    }

    /// A buffer of class `i`, waiting for one to come back.
    async fn wait_class(&self, i: usize) -> PoolBuf {
        let mem = match &self.sources[i] {
            Source::Registered => Mem::Registered(self.fixed.next(CLASSES[i]).await),
            Source::Plain(shelf) => Mem::Plain(shelf.take().await),
        };
        PoolBuf {
            mem,
            _held: Held::new(i, &self.in_use),
        }
    }

    /// A free buffer of class `i` or, rather than wait, a larger one.
    fn try_borrowing(&self, i: usize) -> Option<PoolBuf> {
        (i..CLASSES.len()).find_map(|c| self.try_class(c))
    }

    /// A buffer of at least `len` bytes (`len` ≤ [`MAX_CHUNK`]), waiting for
    /// one to be released if the class is exhausted.
    pub async fn get(&self, len: usize) -> PoolBuf {
        debug_assert!(len <= MAX_CHUNK);
        let i = class_index(len);
        if let Some(b) = self.try_borrowing(i) {
            return b;
        }
        let _waiting = Waiting::new(&self.waiting);
        self.starved.notify_waiters();
        self.wait_class(i).await
    }

    /// Buffers in the pool, of every class.
    pub fn buffers(&self) -> usize {
        self.counts.iter().sum()
    }

    /// Buffers out of the pool now, of every class.
    pub fn in_use(&self) -> usize {
        self.in_use.0.iter().map(Cell::get).sum()
    }

    /// Whether some request is waiting for a buffer now.
    pub fn starved(&self) -> bool {
        self.waiting.get() > 0
    }

    /// Resolves once a request finds the pool empty and starts to wait.
    pub fn wait_starved(&self) -> tokio::sync::futures::Notified<'_> {
        self.starved.notified()
    }

    /// Buffers for several sizes at once (each ≤ [`MAX_CHUNK`]).
    pub async fn take_many(&self, sizes: &[usize]) -> Vec<PoolBuf> {
        let _guard = if sizes.len() > 1 {
            Some(self.multi.lock().await)
        } else {
            None
        };
        let mut out = Vec::with_capacity(sizes.len());
        for &s in sizes {
            out.push(self.get(s.max(1)).await);
        }
        out
    }

    /// Buffers for several sizes (each ≤ [`MAX_CHUNK`]) if the pool has them
    /// all free now, else None (what was taken goes back at once). Never
    /// waits: for a task whose own progress is what frees buffers (a
    /// replication link's position pins records in its window), which
    /// must never wait for them.
    pub fn try_take_many(&self, sizes: &[usize]) -> Option<Vec<PoolBuf>> {
        // A multi-buffer request in progress gets them first.
        let _guard = match self.multi.try_lock() {
            Ok(g) => g,
            Err(_) => return None,
        };
        sizes
            .iter()
            .map(|&s| self.try_borrowing(class_index(s.max(1))))
            .collect()
    }
}

#[cfg(test)]
mod tests;
