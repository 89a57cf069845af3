//! A core's io_uring runtime, which lives as long as the process.
//!
//! tokio-uring 0.5 cannot be dropped safely while operations are in flight.
//! Dropping its runtime first drops the tasks, which leaves each pending
//! operation's buffer with the driver (as it should, until the completion
//! arrives); then the driver's own `Drop` replaces every such entry before it
//! submits the cancellations, which frees those buffers while the kernel may
//! still write into them. A socket receive that gets bytes in that window
//! writes into freed heap memory: a replica that was handed over while its
//! primary streamed records aborted with "corrupted double-linked list"
//! (tokio-rs/tokio-uring#328 reports the same abort; the test
//! `tokio_uring_gives_up_an_in_flight_receive_buffer_before_cancelling_it`
//! shows the window, and fails once tokio-uring closes it). A core ends only when
//! its process ends (a stop, a hand-over, a role change's re-execution), so
//! its runtime, with its ring, tasks and buffers, is left for the exit to
//! reclaim: the kernel then cancels what is in flight before the memory goes.

use std::future::Future;
use std::os::fd::RawFd;
use std::time::Duration;

/// Runs `future` to completion on a new tokio-uring runtime with `entries`
/// submission queue entries, and never drops that runtime (see the module
/// documentation). Only for threads that end with their process. With
/// `busy_poll`, the thread polls for that long after each request
/// ([`crate::busy_poll`]).
pub fn run_to_process_end<F: Future>(
    entries: u32,
    busy_poll: Option<Duration>,
    future: F,
) -> std::io::Result<F::Output> {
    let (rt, ring) = match busy_poll {
        Some(_) => {
            let (rt, fd) = new_runtime_and_ring(entries)?;
            (rt, fd.map(|fd| crate::busy_poll::Ring { fd, entries }))
        }
        None => (
            tokio_uring::Runtime::new(tokio_uring::builder().entries(entries))?,
            None,
        ),
    };
    let out = rt.block_on(async move {
        match (ring, busy_poll) {
            (Some(ring), Some(window)) => {
                tokio_uring::spawn(crate::busy_poll::run(ring, window));
            }
            (None, Some(_)) => tracing::warn!(
                "busy polling is off on this core: its io_uring descriptor could not be told apart from another thread's"
            ),
            _ => {}
        }
        future.await
    });
    std::mem::forget(rt);
    Ok(out)
}

/// Serializes the runtimes made by [`new_runtime_and_ring`].
static RING_MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Makes a runtime and finds its ring's descriptor: the one io_uring
/// descriptor that appeared in the process meanwhile (tokio-uring does not
/// expose it). `None` when that is not exactly one, e.g. when a thread made
/// a ring some other way at the same moment.
fn new_runtime_and_ring(entries: u32) -> std::io::Result<(tokio_uring::Runtime, Option<RawFd>)> {
    let _one_at_a_time = RING_MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let before = ring_fds()?;
    let rt = tokio_uring::Runtime::new(tokio_uring::builder().entries(entries))?;
    let new: Vec<RawFd> = ring_fds()?
        .into_iter()
        .filter(|fd| !before.contains(fd))
        .collect();
    // A ring of another size would be another thread's.
    let mask = entries.next_power_of_two() - 1;
    let ours = match new[..] {
        [fd] => (sq_mask(fd) == Some(mask)).then_some(fd),
        _ => None,
    };
    Ok((rt, ours))
}

/// Ring `fd`'s submission queue mask (its entries less one), as the
/// kernel describes it.
fn sq_mask(fd: RawFd) -> Option<u32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    let line = info.lines().find_map(|l| l.strip_prefix("SqMask:"))?;
    u32::from_str_radix(line.trim().trim_start_matches("0x"), 16).ok()
}

/// The process's io_uring descriptors.
fn ring_fds() -> std::io::Result<Vec<RawFd>> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue; // closed meanwhile (read_dir's own descriptor, say)
        };
        if target.as_os_str() != "anon_inode:[io_uring]" {
            continue;
        }
        if let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            fds.push(fd);
        }
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio_uring::buf::{IoBuf, IoBufMut};

    /// How many [`Tracked`] buffers were dropped.
    static DROPPED: AtomicUsize = AtomicUsize::new(0);

    /// A receive buffer that counts its drop.
    struct Tracked(Vec<u8>);

    impl Drop for Tracked {
        fn drop(&mut self) {
            DROPPED.fetch_add(1, Ordering::SeqCst);
        }
    }

    // SAFETY: forwards to the Vec, whose heap memory does not move.
    unsafe impl IoBuf for Tracked {
        fn stable_ptr(&self) -> *const u8 {
            self.0.stable_ptr()
        }
        fn bytes_init(&self) -> usize {
            self.0.bytes_init()
        }
        fn bytes_total(&self) -> usize {
            self.0.bytes_total()
        }
    }

    // SAFETY: as above.
    unsafe impl IoBufMut for Tracked {
        fn stable_mut_ptr(&mut self) -> *mut u8 {
            self.0.stable_mut_ptr()
        }
        unsafe fn set_init(&mut self, pos: usize) {
            // SAFETY: forwarded.
            unsafe { self.0.set_init(pos) }
        }
    }

    /// Where [`Leaked`]'s drop sends a byte (-1: nowhere).
    static PEER: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

    /// A receive buffer of memory that is never freed, whose drop sends a
    /// byte to [`PEER`]: if the receive is still live when the driver drops
    /// the buffer, that byte lands in it.
    struct Leaked(&'static mut [u8]);

    impl Drop for Leaked {
        fn drop(&mut self) {
            let fd = PEER.load(Ordering::SeqCst);
            if fd >= 0 {
                // SAFETY: a one-byte write from a live array to a descriptor
                // the test owns.
                let _ = unsafe { libc::write(fd, [0xABu8].as_ptr().cast(), 1) };
            }
        }
    }

    // SAFETY: the slice is 'static (leaked) and never moves.
    unsafe impl IoBuf for Leaked {
        fn stable_ptr(&self) -> *const u8 {
            self.0.as_ptr()
        }
        fn bytes_init(&self) -> usize {
            0
        }
        fn bytes_total(&self) -> usize {
            self.0.len()
        }
    }

    // SAFETY: as above.
    unsafe impl IoBufMut for Leaked {
        fn stable_mut_ptr(&mut self) -> *mut u8 {
            self.0.as_mut_ptr()
        }
        unsafe fn set_init(&mut self, _pos: usize) {}
    }

    /// Why [`run_to_process_end`] exists: tokio-uring 0.5, dropping its
    /// runtime, gives up the buffer of a receive still in flight before it
    /// cancels the receive, so bytes arriving then are written into memory
    /// the program no longer owns (here a leaked buffer, so nothing is
    /// corrupted). When this fails, tokio-uring waits for the cancellation
    /// first, and a core's runtime could be dropped again.
    #[test]
    fn tokio_uring_gives_up_an_in_flight_receive_buffer_before_cancelling_it() {
        use std::os::fd::AsRawFd;
        let (ours, peer) = UnixStream::pair().expect("socket pair");
        let mem: &'static mut [u8] = Box::leak(vec![0u8; 64].into_boxed_slice());
        let first = mem.as_ptr();
        let rt = tokio_uring::Runtime::new(&tokio_uring::builder()).expect("runtime");
        rt.block_on(async move {
            let sock = tokio_uring::net::UnixStream::from_std(ours);
            tokio_uring::spawn(async move {
                let _ = sock.read(Leaked(mem)).await;
            });
            // Parks the thread: the receive is submitted and waits.
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        PEER.store(peer.as_raw_fd(), Ordering::SeqCst);
        drop(rt);
        PEER.store(-1, Ordering::SeqCst);
        // SAFETY: the leaked buffer lives for the whole process.
        let got = unsafe { std::ptr::read_volatile(first) };
        assert_eq!(
            got, 0xAB,
            "the byte sent when the driver dropped the buffer did not reach it: tokio-uring now cancels before it frees"
        );
    }

    /// Busy polling submits on the descriptor found here: it must be the
    /// ring just made, not another one. Other tests make rings meanwhile,
    /// which makes a try come back empty (ambiguous), never wrong.
    #[test]
    fn the_ring_found_is_the_one_made() {
        for entries in [8u32, 32] {
            let found = (0..100).find_map(|_| {
                let (rt, fd) = new_runtime_and_ring(entries).expect("runtime");
                Some((rt, fd?))
            });
            let (_rt, fd) = found.expect("a ring found in 100 tries");
            assert_eq!(sq_mask(fd).expect("fdinfo"), entries - 1, "fd {fd}");
        }
    }

    #[test]
    fn a_receive_in_flight_when_the_core_ends_keeps_its_buffer() {
        let (ours, peer) = UnixStream::pair().expect("socket pair");
        let done = run_to_process_end(8, None, async move {
            let sock = tokio_uring::net::UnixStream::from_std(ours);
            // The receive waits in the ring: nothing is sent yet.
            tokio_uring::spawn(async move {
                let _ = sock.read(Tracked(Vec::with_capacity(4096))).await;
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            "ended"
        })
        .expect("runtime");
        assert_eq!(done, "ended");
        // Bytes arriving now would land in that buffer: it must still be
        // owned by the (never dropped) runtime. (Had the runtime been
        // dropped, the socket would be closed and the send would fail.)
        let _ = std::io::Write::write_all(&mut &peer, &[0xAB; 4096]);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            DROPPED.load(Ordering::SeqCst),
            0,
            "the buffer of a receive in flight was freed when the core ended"
        );
    }
}
