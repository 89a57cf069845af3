//! Socket I/O on a core's io_uring shared by the NBD export and replication:
//! exact reads into plain or registered memory, and vectored writes that
//! survive partial sends.

use std::io;

use tokio_uring::buf::fixed::FixedBuf;
use tokio_uring::buf::{BoundedBuf, BoundedBufMut, Slice};

use crate::buffer::OutBuf;

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

impl SockBuf for FixedBuf {
    /// Reads into `s`.
    async fn read_from(
        sock: &Socket,
        s: Slice<Self>,
        fixed: bool,
    ) -> tokio_uring::BufResult<usize, Slice<Self>> {
        if fixed {
            sock.read_fixed(s).await
        } else {
            sock.read(s).await
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
    Fixed(FixedBuf),
    /// A small vector.
    Vec(Vec<u8>),
}

// SAFETY: both variants own stable heap memory that does not move with the enum.
unsafe impl tokio_uring::buf::IoBuf for InBuf {
    fn stable_ptr(&self) -> *const u8 {
        match self {
            InBuf::Fixed(b) => tokio_uring::buf::IoBuf::stable_ptr(b),
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
            InBuf::Fixed(b) => tokio_uring::buf::IoBuf::bytes_total(b),
            InBuf::Vec(v) => tokio_uring::buf::IoBuf::bytes_total(v),
        }
    }
}

// SAFETY: as above; `set_init` is forwarded to the owner.
unsafe impl tokio_uring::buf::IoBufMut for InBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        match self {
            InBuf::Fixed(b) => tokio_uring::buf::IoBufMut::stable_mut_ptr(b),
            InBuf::Vec(v) => tokio_uring::buf::IoBufMut::stable_mut_ptr(v),
        }
    }
    unsafe fn set_init(&mut self, _pos: usize) {
        // The owners' lengths already cover the whole buffer.
    }
}

/// Receives into `chunk[..want]` (pool memory) and, in the same `readv`,
/// into `tail` whatever has arrived after it: a payload and the next
/// headers in one trip into the kernel. `file` is the socket as a file
/// ([`Socket::dup_as_file`]). Returns the bytes received (0 at the end of
/// the stream) and both buffers; `tail` holds the bytes past `want`.
pub async fn readv_payload_and_tail(
    file: &tokio_uring::fs::File,
    chunk: FixedBuf,
    want: usize,
    tail: Vec<u8>,
) -> (io::Result<usize>, FixedBuf, Vec<u8>) {
    let tail_len = tail.len();
    let bufs = vec![
        InBuf::Fixed(chunk).slice(0..want),
        InBuf::Vec(tail).slice(0..tail_len),
    ];
    let (res, mut bufs) = file.readv_at(bufs, 0).await;
    let (InBuf::Vec(tail), InBuf::Fixed(chunk)) = (
        bufs.pop().expect("two buffers").into_inner(),
        bufs.pop().expect("two buffers").into_inner(),
    ) else {
        unreachable!("buffers come back in order");
    };
    (res, chunk, tail)
}

/// Sends all of `bufs`, however the kernel splits the writes.
pub async fn write_all(sock: &Socket, mut bufs: Vec<OutBuf>) -> io::Result<()> {
    while !bufs.is_empty() {
        let rest = if bufs.len() > MAX_IOVECS {
            bufs.split_off(MAX_IOVECS)
        } else {
            Vec::new()
        };
        let mut chunk = bufs;
        while !chunk.is_empty() {
            let (res, mut back) = sock.writev(chunk).await;
            let mut n = res?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "socket accepted no bytes",
                ));
            }
            let mut done = 0;
            for b in back.iter_mut() {
                let r = b.remaining();
                if n >= r {
                    n -= r;
                    done += 1;
                } else {
                    b.advance(n);
                    break;
                }
            }
            back.drain(..done);
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
