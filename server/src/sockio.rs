//! Socket I/O on a core's io_uring shared by the NBD export and replication:
//! exact reads into plain or registered memory, and vectored writes that
//! survive partial sends.

use std::io;

use tokio_uring::buf::fixed::FixedBuf;
use tokio_uring::buf::{BoundedBuf, BoundedBufMut, Slice};

use crate::buffer::{OutBuf, PoolBuf};

/// Most iovecs in one `writev` (the kernel's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// Why an exact read stopped short.
#[derive(Debug, thiserror::Error)]
pub enum ReadFail {
    /// The peer closed before the first byte.
    #[error("peer disconnected")]
    Eof,
    /// The peer closed part-way.
    #[error("peer disconnected in the middle of a {what} ({got} of {want} bytes)")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes read.
        got: usize,
        /// Bytes wanted.
        want: usize,
    },
    /// A socket error.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// A connected client socket on the core's ring.
pub enum Socket {
    /// TCP.
    Tcp(tokio_uring::net::TcpStream),
    /// Unix domain.
    Unix(tokio_uring::net::UnixStream),
}

impl Socket {
    /// Reads into `buf`.
    pub async fn read<T: BoundedBufMut>(&self, buf: T) -> tokio_uring::BufResult<usize, T> {
        match self {
            Socket::Tcp(s) => s.read(buf).await,
            Socket::Unix(s) => s.read(buf).await,
        }
    }

    /// Reads into registered memory.
    pub async fn read_fixed<T>(&self, buf: T) -> tokio_uring::BufResult<usize, T>
    where
        T: BoundedBufMut<BufMut = FixedBuf>,
    {
        match self {
            Socket::Tcp(s) => s.read_fixed(buf).await,
            Socket::Unix(s) => s.read_fixed(buf).await,
        }
    }

    /// Vectored write.
    pub async fn writev(&self, bufs: Vec<OutBuf>) -> tokio_uring::BufResult<usize, Vec<OutBuf>> {
        match self {
            Socket::Tcp(s) => s.writev(bufs).await,
            Socket::Unix(s) => s.writev(bufs).await,
        }
    }

    /// The same socket as a tokio-uring file (for `readv`).
    pub fn dup_as_file(&self) -> io::Result<tokio_uring::fs::File> {
        use std::os::fd::{AsRawFd, BorrowedFd};
        let raw = match self {
            Socket::Tcp(s) => s.as_raw_fd(),
            Socket::Unix(s) => s.as_raw_fd(),
        };
        // SAFETY: the socket outlives this call; we only duplicate it.
        let owned = unsafe { BorrowedFd::borrow_raw(raw) }.try_clone_to_owned()?;
        Ok(tokio_uring::fs::File::from_std(std::fs::File::from(owned)))
    }

    /// A duplicate of the socket's descriptor: it outlives this `Socket`
    /// (readiness waits, and the hand-over to a new daemon process).
    pub fn dup_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::{AsRawFd, BorrowedFd};
        let raw = match self {
            Socket::Tcp(s) => s.as_raw_fd(),
            Socket::Unix(s) => s.as_raw_fd(),
        };
        // SAFETY: the socket outlives this call; we only duplicate it.
        unsafe { BorrowedFd::borrow_raw(raw) }.try_clone_to_owned()
    }

    /// The socket's descriptor, for calls made directly (not through the
    /// ring).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::{AsRawFd, BorrowedFd};
        let raw = match self {
            Socket::Tcp(s) => s.as_raw_fd(),
            Socket::Unix(s) => s.as_raw_fd(),
        };
        // SAFETY: the socket owns the descriptor and outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(raw) }
    }

    /// Shuts both directions down.
    pub fn shutdown(&self) {
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Socket::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

/// A buffer the reader can fill from the socket: plain memory with `read`,
/// registered pool memory with `READ_FIXED`.
#[allow(async_fn_in_trait)] // used on one core only; no Send bound wanted
pub trait SockBuf: tokio_uring::buf::IoBufMut + Sized {
    /// Reads into `s`.
    async fn read_from(
        sock: &Socket,
        s: Slice<Self>,
        fixed: bool,
    ) -> tokio_uring::BufResult<usize, Slice<Self>>;
}

impl SockBuf for Vec<u8> {
    /// Reads into `s`.
    async fn read_from(
        sock: &Socket,
        s: Slice<Self>,
        _fixed: bool,
    ) -> tokio_uring::BufResult<usize, Slice<Self>> {
        sock.read(s).await
    }
}

impl SockBuf for PoolBuf {
    /// Reads into `s`: with `READ_FIXED` when `fixed` (the pool's
    /// registration took) and the buffer is of a registered class.
    async fn read_from(
        sock: &Socket,
        s: Slice<Self>,
        fixed: bool,
    ) -> tokio_uring::BufResult<usize, Slice<Self>> {
        if !fixed {
            return sock.read(s).await;
        }
        let (begin, end) = (s.begin(), s.end());
        let read = |b: FixedBuf| async move {
            let (res, slice) = sock.read_fixed(b.slice(begin..end)).await;
            (res, slice.into_inner())
        };
        match s.into_inner().with_registered(read).await {
            Ok((res, b)) => (res, b.slice(begin..end)),
            Err(plain) => sock.read(plain.slice(begin..end)).await,
        }
    }
}

/// Reads exactly `buf[from..to]` from the socket. A clean end of stream
/// before the first byte is `Eof`; anywhere else it is `Truncated`.
pub async fn read_exact<T: SockBuf>(
    sock: &Socket,
    mut buf: T,
    from: usize,
    to: usize,
    what: &'static str,
    fixed: bool,
) -> (Result<(), ReadFail>, T) {
    let mut got = from;
    while got < to {
        let (res, slice) = T::read_from(sock, buf.slice(got..to), fixed).await;
        buf = slice.into_inner();
        match res {
            Ok(0) if got == 0 => return (Err(ReadFail::Eof), buf),
            Ok(0) => {
                return (
                    Err(ReadFail::Truncated {
                        what,
                        got,
                        want: to,
                    }),
                    buf,
                )
            }
            Ok(n) => got += n,
            Err(e) => return (Err(ReadFail::Io(e)), buf),
        }
    }
    (Ok(()), buf)
}

/// Either kind of receive buffer, so one `readv` can fill a write's payload
/// (pool memory) and the next request header (a small vector) together.
pub enum InBuf {
    /// Pool memory.
    Pooled(PoolBuf),
    /// A small vector.
    Vec(Vec<u8>),
}

// SAFETY: both variants own stable heap memory that does not move with the enum.
unsafe impl tokio_uring::buf::IoBuf for InBuf {
    fn stable_ptr(&self) -> *const u8 {
        match self {
            InBuf::Pooled(b) => tokio_uring::buf::IoBuf::stable_ptr(b),
            InBuf::Vec(v) => tokio_uring::buf::IoBuf::stable_ptr(v),
        }
    }
    // A receive buffer: nothing in it counts as initialized, because
    // tokio-uring's readv fills only the part past `bytes_init`.
    fn bytes_init(&self) -> usize {
        0
    }
    fn bytes_total(&self) -> usize {
        match self {
            InBuf::Pooled(b) => tokio_uring::buf::IoBuf::bytes_total(b),
            InBuf::Vec(v) => tokio_uring::buf::IoBuf::bytes_total(v),
        }
    }
}

// SAFETY: as above; `set_init` is forwarded to the owner.
unsafe impl tokio_uring::buf::IoBufMut for InBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        match self {
            InBuf::Pooled(b) => tokio_uring::buf::IoBufMut::stable_mut_ptr(b),
            InBuf::Vec(v) => tokio_uring::buf::IoBufMut::stable_mut_ptr(v),
        }
    }
    unsafe fn set_init(&mut self, _pos: usize) {
        // The owners' lengths already cover the whole buffer.
    }
}

/// Most receives in a row that a reader serves straight from the socket
/// instead of through the ring.
///
/// tokio-uring submits queued operations only when the core's thread parks.
/// A receive through the ring therefore costs a park, an `io_uring_enter`
/// and a completion before its task runs again: one scheduler round per
/// write received, while most of the time the bytes are already in the
/// socket (a pipelined client, a primary streaming records). Received
/// directly (`recvmsg` with `MSG_DONTWAIT`), a reader takes every request
/// that has arrived in one round, and what those requests queue (journal
/// writes, record sends) goes to the kernel in one submission. After this
/// many direct receives the next goes through the ring anyway, so the
/// thread parks and submits what other tasks queued meanwhile: a client
/// that never pauses cannot hold back the core's submissions.
pub const MAX_BYPASS: u32 = 32;

/// Whether a receive may skip the ring after `run` direct ones in a row.
pub fn may_bypass(run: u32) -> bool {
    run < MAX_BYPASS
}

/// One reader's count of receives served without the ring (see
/// [`MAX_BYPASS`]), with totals for tests and diagnosis.
#[derive(Debug, Default)]
pub struct Bypass {
    /// Direct receives since the last one through the ring.
    run: std::cell::Cell<u32>,
    /// Receives served directly, in all.
    pub direct: std::cell::Cell<u64>,
    /// Receives that went through the ring, in all.
    pub ring: std::cell::Cell<u64>,
}

impl Bypass {
    /// Whether the next receive may try the socket directly.
    fn try_direct(&self) -> bool {
        may_bypass(self.run.get())
    }

    fn served_direct(&self) {
        self.run.set(self.run.get() + 1);
        self.direct.set(self.direct.get() + 1);
    }

    fn through_ring(&self) {
        self.run.set(0);
        self.ring.set(self.ring.get() + 1);
    }
}

/// Receives into `bufs` without blocking (`MSG_DONTWAIT`), in one
/// `recvmsg`: `WouldBlock` when nothing has arrived.
pub fn recv_vectored_now(
    fd: std::os::fd::BorrowedFd<'_>,
    bufs: &mut [io::IoSliceMut<'_>],
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    loop {
        match nix::sys::socket::recvmsg::<()>(
            fd.as_raw_fd(),
            bufs,
            None,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
            Ok(m) => return Ok(m.bytes),
        }
    }
}

/// Receives into `buf` directly if `bypass` allows and something has
/// arrived: `None` when the receive must go through the ring.
pub fn recv_direct(
    fd: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
    bypass: &Bypass,
) -> Option<io::Result<usize>> {
    recv_vectored_direct(fd, &mut [io::IoSliceMut::new(buf)], bypass)
}

fn recv_vectored_direct(
    fd: std::os::fd::BorrowedFd<'_>,
    bufs: &mut [io::IoSliceMut<'_>],
    bypass: &Bypass,
) -> Option<io::Result<usize>> {
    if !bypass.try_direct() {
        return None;
    }
    match recv_vectored_now(fd, bufs) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        res => {
            bypass.served_direct();
            Some(res)
        }
    }
}

/// Receives into `chunk[..want]` (pool memory) and, in the same `readv`,
/// into `tail` whatever has arrived after it: a payload and the next
/// headers in one trip into the kernel. `file` is the socket as a file
/// ([`Socket::dup_as_file`]). Returns the bytes received (0 at the end of
/// the stream) and both buffers; `tail` holds the bytes past `want`.
/// Bytes already in the socket are received directly (one `recvmsg`, no
/// ring round), as `bypass` allows; otherwise the `readv` goes through
/// the ring.
pub async fn readv_payload_and_tail(
    file: &tokio_uring::fs::File,
    mut chunk: PoolBuf,
    want: usize,
    mut tail: Vec<u8>,
    bypass: &Bypass,
) -> (io::Result<usize>, PoolBuf, Vec<u8>) {
    use std::os::fd::{AsRawFd, BorrowedFd};
    assert!(want <= chunk.len(), "payload larger than its chunk");
    // SAFETY: `file` owns the descriptor and outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(file.as_raw_fd()) };
    let direct = {
        let mut bufs = [
            io::IoSliceMut::new(&mut chunk[..want]),
            io::IoSliceMut::new(&mut tail[..]),
        ];
        recv_vectored_direct(fd, &mut bufs, bypass)
    };
    if let Some(res) = direct {
        return (res, chunk, tail);
    }
    bypass.through_ring();
    let tail_len = tail.len();
    let bufs = vec![
        InBuf::Pooled(chunk).slice(0..want),
        InBuf::Vec(tail).slice(0..tail_len),
    ];
    let (res, mut bufs) = file.readv_at(bufs, 0).await;
    let (InBuf::Vec(tail), InBuf::Pooled(chunk)) = (
        bufs.pop().expect("two buffers").into_inner(),
        bufs.pop().expect("two buffers").into_inner(),
    ) else {
        unreachable!("buffers come back in order");
    };
    (res, chunk, tail)
}

/// Sends as much of `bufs` as the socket takes now, in one `sendmsg` with
/// `MSG_DONTWAIT` (and `MSG_NOSIGNAL`): the bytes sent, 0 when it would
/// block.
fn send_now(fd: std::os::fd::BorrowedFd<'_>, bufs: &[OutBuf]) -> io::Result<usize> {
    use nix::sys::socket::MsgFlags;
    use std::os::fd::AsRawFd;
    use tokio_uring::buf::IoBuf;
    let iov: Vec<io::IoSlice<'_>> = bufs
        .iter()
        .map(|b| {
            // SAFETY: an `IoBuf`'s stable pointer is valid for its
            // initialised bytes while the buffer lives; `bufs` is borrowed
            // for the whole call.
            io::IoSlice::new(unsafe {
                std::slice::from_raw_parts(IoBuf::stable_ptr(b), IoBuf::bytes_init(b))
            })
        })
        .collect();
    loop {
        match nix::sys::socket::sendmsg::<()>(
            fd.as_raw_fd(),
            &iov,
            &[],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return Ok(0),
            Err(e) => return Err(io::Error::from(e)),
            Ok(n) => return Ok(n),
        }
    }
}

/// Drops the buffers the first `n` bytes of `bufs` sent whole, and advances
/// the one they end in.
fn consume(bufs: &mut Vec<OutBuf>, mut n: usize) {
    let mut done = 0;
    for b in bufs.iter_mut() {
        let r = b.remaining();
        if n >= r {
            n -= r;
            done += 1;
        } else {
            b.advance(n);
            break;
        }
    }
    bufs.drain(..done);
}

/// Sends all of `bufs`, however the kernel splits the writes. What the
/// socket takes at once is sent directly (one `sendmsg`, no ring round:
/// tokio-uring would submit a ring write only when the thread next parks,
/// holding a reply or a record back behind whatever the core runs before
/// that); the rest goes through the ring.
pub async fn write_all(sock: &Socket, mut bufs: Vec<OutBuf>) -> io::Result<()> {
    if !bufs.is_empty() {
        let first = bufs.len().min(MAX_IOVECS);
        let n = send_now(sock.fd(), &bufs[..first])?;
        consume(&mut bufs, n);
    }
    while !bufs.is_empty() {
        let rest = if bufs.len() > MAX_IOVECS {
            bufs.split_off(MAX_IOVECS)
        } else {
            Vec::new()
        };
        let mut chunk = bufs;
        while !chunk.is_empty() {
            let (res, mut back) = sock.writev(chunk).await;
            let n = res?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "socket accepted no bytes",
                ));
            }
            consume(&mut back, n);
            chunk = back;
        }
        bufs = rest;
    }
    Ok(())
}

/// Receives into `buf` without blocking (`MSG_DONTWAIT`): `WouldBlock` when
/// nothing has arrived. Lets a reader wait for readiness (cancellable) rather
/// than for a read (whose bytes a cancellation could lose).
pub fn recv_now(fd: std::os::fd::BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    loop {
        match nix::sys::socket::recv(
            fd.as_raw_fd(),
            buf,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
            Ok(n) => return Ok(n),
        }
    }
}

/// Waits until `listener` has a connection to accept (true) or `stop` is
/// set (false), checking `stop` every 100 ms. Accept loops use it so that a
/// hand-over can stop them without closing the listener it passes on.
pub fn wait_acceptable(
    listener: std::os::fd::BorrowedFd<'_>,
    stop: &std::sync::atomic::AtomicBool,
) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    loop {
        if stop.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        let mut fds = [PollFd::new(listener, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(n) if n > 0 => return !stop.load(std::sync::atomic::Ordering::Acquire),
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::warn!("poll on a listener failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receive_skips_the_ring_only_within_a_run_of_max_bypass() {
        // (direct receives in a row so far, may the next one skip the ring)
        let table = [
            (0, true),
            (1, true),
            (MAX_BYPASS - 1, true),
            (MAX_BYPASS, false),
            (MAX_BYPASS + 1, false),
        ];
        for (run, want) in table {
            assert_eq!(may_bypass(run), want, "run {run}");
        }
    }

    /// A send larger than the socket buffer: the direct `sendmsg` takes
    /// part of it (ending inside a buffer), the ring the rest; the reader
    /// must get every byte once, in order.
    #[test]
    fn a_send_split_between_direct_and_ring_arrives_whole() {
        use std::io::Read;
        let pieces: Vec<Vec<u8>> = (0..300u32)
            .map(|i| {
                let len = 1 + (i as usize * 7919) % 40_000;
                (0..len).map(|j| (i as usize * 31 + j) as u8).collect()
            })
            .collect();
        let want: Vec<u8> = pieces.concat();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        let total = want.len();
        let reader = std::thread::spawn(move || {
            // Start late, so the first direct send fills the buffer.
            std::thread::sleep(std::time::Duration::from_millis(50));
            let mut got = vec![0u8; total];
            b.read_exact(&mut got).expect("read");
            got
        });
        tokio_uring::start(async {
            let sock = Socket::Unix(tokio_uring::net::UnixStream::from_std(a));
            let bufs = pieces.into_iter().map(|p| OutBuf::Bytes(p, 0)).collect();
            write_all(&sock, bufs).await.expect("write_all");
        });
        let got = reader.join().expect("reader thread");
        assert!(got == want, "bytes arrived out of order or twice");
    }
}
