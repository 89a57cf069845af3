//! Moves bytes between a TLS session and a Unix socket pair, one thread per
//! connection, so the cores keep serving clear text.
//!
//! One thread drives both directions with `poll`, never blocking on either
//! socket while the other could move: a peer that stops reading cannot
//! wedge the other direction. Each direction holds at most `HIGH_WATER`
//! bytes, so a stalled side pushes back on the other through TCP.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::Transport;

/// Most clear text held for the core, and most read from the core before
/// what rustls made of it is on the wire.
const HIGH_WATER: usize = 1 << 20;
/// One read from either socket.
const CHUNK: usize = 256 << 10;
/// Most `read_tls` calls between two polls.
const READS_PER_ROUND: usize = 64;
/// Socket buffer of each end of the clear-text pair: a whole 1 MiB request
/// fits, so the relay hands it to the core in one write and one wake-up
/// rather than a handful at the default (~200 KiB). The kernel caps it at
/// `net.core.wmem_max`/`rmem_max`; a smaller buffer only costs wake-ups.
const PAIR_BUFFER: usize = 2 << 20;

/// Starts the relay thread for `conn` over `sock`; returns the core's end.
pub fn spawn<S: Transport>(
    mut conn: rustls::Connection,
    sock: S,
    peer: &str,
) -> io::Result<UnixStream> {
    let (core_end, relay_end) = UnixStream::pair()?;
    for end in [&core_end, &relay_end] {
        use nix::sys::socket::{setsockopt, sockopt};
        setsockopt(end, sockopt::SndBuf, &PAIR_BUFFER)?;
        setsockopt(end, sockopt::RcvBuf, &PAIR_BUFFER)?;
    }
    // The relay bounds what it hands rustls itself (one read from the core
    // while nothing is pending), so one read is always taken whole.
    conn.set_buffer_limit(None);
    sock.set_blocking(false, None)?;
    relay_end.set_nonblocking(true)?;
    let peer = peer.to_string();
    std::thread::Builder::new()
        .name("tls-relay".into())
        .spawn(move || {
            let mut r = Relay {
                conn,
                sock,
                plain: relay_end,
                down: Pending::default(),
                wire: Pending::default(),
                buf: vec![0u8; CHUNK],
                sock_done: false,
                plain_done: false,
            };
            match r.run() {
                Ok(()) => tracing::debug!(%peer, "TLS connection closed"),
                Err(e) => tracing::info!(%peer, "TLS connection ended: {e}"),
            }
            r.sock.shutdown_both();
            let _ = r.plain.shutdown(std::net::Shutdown::Both);
        })?;
    Ok(core_end)
}

struct Relay<S: Transport> {
    conn: rustls::Connection,
    sock: S,
    /// The clear-text side (the core's socket pair end).
    plain: UnixStream,
    /// Decrypted bytes not yet written to `plain`.
    down: Pending,
    /// Bytes read from the peer's socket not yet handed to rustls.
    wire: Pending,
    buf: Vec<u8>,
    /// The TLS side closed (close_notify or EOF).
    sock_done: bool,
    /// The core closed its end.
    plain_done: bool,
}

/// Bytes waiting to be written, in a buffer that is zeroed only when it
/// grows (at most to `HIGH_WATER` + `CHUNK`), so decrypting into it costs
/// no memset per record.
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    /// The unsent bytes are `buf[at..end]`.
    at: usize,
    end: usize,
}

impl Pending {
    /// Bytes not yet sent.
    fn len(&self) -> usize {
        self.end - self.at
    }

    /// At least `min` bytes of room after the pending ones: moves them to
    /// the front or grows the buffer when there is less.
    fn spare(&mut self, min: usize) -> &mut [u8] {
        if self.buf.len() - self.end < min {
            self.buf.copy_within(self.at..self.end, 0);
            self.end -= self.at;
            self.at = 0;
            if self.buf.len() - self.end < min {
                self.buf.resize(self.end + min, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were written into [`Pending::spare`].
    fn filled(&mut self, n: usize) {
        assert!(self.end + n <= self.buf.len(), "filled past the buffer");
        self.end += n;
    }

    fn unsent(&self) -> &[u8] {
        &self.buf[self.at..self.end]
    }

    /// `n` pending bytes were sent.
    fn sent(&mut self, n: usize) {
        assert!(n <= self.len(), "sent more than was pending");
        self.at += n;
        if self.at == self.end {
            self.at = 0;
            self.end = 0;
        }
    }
}

/// `Ok(None)` for an operation that would block.
fn nonblocking<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(e),
    }
}

impl<S: Transport> Relay<S> {
    fn run(&mut self) -> io::Result<()> {
        loop {
            self.pull_peer()?;
            self.push_core()?;
            self.pull_core()?;
            self.push_peer()?;
            let pending_down = self.down.len();
            if self.sock_done && pending_down == 0 {
                // The client left: the core sees EOF once the rest is in.
                return Ok(());
            }
            if self.plain_done && !self.conn.wants_write() {
                return Ok(());
            }
            self.wait(pending_down)?;
        }
    }

    /// Waits until a socket can move what is pending (not at all while
    /// bytes already read from the peer can be decrypted).
    fn wait(&self, pending_down: usize) -> io::Result<()> {
        if self.wire.len() > 0 && pending_down < HIGH_WATER {
            return Ok(());
        }
        let mut sock_ev = PollFlags::empty();
        if !self.sock_done && pending_down < HIGH_WATER {
            sock_ev |= PollFlags::POLLIN;
        }
        if self.conn.wants_write() {
            sock_ev |= PollFlags::POLLOUT;
        }
        let mut plain_ev = PollFlags::empty();
        if !self.plain_done && !self.conn.wants_write() {
            plain_ev |= PollFlags::POLLIN;
        }
        if pending_down > 0 {
            plain_ev |= PollFlags::POLLOUT;
        }
        let mut fds = [
            PollFd::new(self.sock.as_fd(), sock_ev),
            PollFd::new(self.plain.as_fd(), plain_ev),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads records from the peer and decrypts them into `down`. The
    /// socket is read in `CHUNK`s into `wire` and rustls is fed from
    /// memory: its own `read_tls` reads at most 4 KiB per system call,
    /// 256 calls per 1 MiB request.
    fn pull_peer(&mut self) -> io::Result<()> {
        self.feed()?;
        for _ in 0..READS_PER_ROUND {
            if self.sock_done || self.down.len() >= HIGH_WATER || self.wire.len() > 0 {
                break;
            }
            match nonblocking(self.sock.read(self.wire.spare(CHUNK)))? {
                Some(0) => {
                    // Tells rustls the peer closed (an empty read is EOF),
                    // so a missing close_notify reads as such.
                    self.sock_done = true;
                    self.conn.read_tls(&mut io::empty())?;
                    self.process()?;
                }
                Some(n) => {
                    self.wire.filled(n);
                    self.feed()?;
                }
                None => break,
            }
        }
        // Clear text rustls held from an earlier read (the handshake's).
        self.decrypted()
    }

    /// Hands rustls the bytes read from the socket, record by record, and
    /// takes out what it decrypts, until `wire` is empty or `down` full.
    fn feed(&mut self) -> io::Result<()> {
        while self.wire.len() > 0 && self.down.len() < HIGH_WATER {
            let mut unread = self.wire.unsent();
            let n = self.conn.read_tls(&mut unread)?;
            self.wire.sent(n);
            self.process()?;
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Decrypts what rustls holds into `down`.
    fn process(&mut self) -> io::Result<()> {
        self.conn
            .process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.decrypted()
    }

    /// Moves what rustls decrypted into `down`, straight into its spare
    /// room (no copy through `buf`).
    fn decrypted(&mut self) -> io::Result<()> {
        loop {
            let got = self.conn.reader().read(self.down.spare(CHUNK));
            match got {
                Ok(0) => {
                    self.sock_done = true;
                    break;
                }
                Ok(n) => self.down.filled(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // The peer closed TCP without close_notify: the same as
                // a disconnect for NBD (it stops at a request boundary
                // or not, as over clear text).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.sock_done = true;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes decrypted bytes to the core.
    fn push_core(&mut self) -> io::Result<()> {
        while self.down.len() > 0 {
            match nonblocking(self.plain.write(self.down.unsent()))? {
                Some(n) => self.down.sent(n),
                None => break,
            }
        }
        if self.sock_done && self.down.len() == 0 {
            let _ = self.plain.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Reads the core's replies and encrypts them, once the previous ones
    /// are on the wire.
    fn pull_core(&mut self) -> io::Result<()> {
        if self.plain_done || self.conn.wants_write() {
            return Ok(());
        }
        match nonblocking(self.plain.read(&mut self.buf))? {
            Some(0) => {
                self.plain_done = true;
                self.conn.send_close_notify();
            }
            Some(n) => self.conn.writer().write_all(&self.buf[..n])?,
            None => {}
        }
        Ok(())
    }

    /// Writes pending records to the peer.
    fn push_peer(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            if nonblocking(self.conn.write_tls(&mut self.sock))?.is_none() {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Pending;

    #[test]
    fn pending_keeps_order_and_reuses_its_room() {
        let mut p = Pending::default();
        let mut sent = Vec::new();
        let mut next = 0u8;
        for round in 0..50usize {
            let room = p.spare(64);
            assert!(room.len() >= 64);
            let n = 1 + round % 64;
            for b in &mut room[..n] {
                *b = next;
                next = next.wrapping_add(1);
            }
            p.filled(n);
            let take = (round * 7) % (p.len() + 1);
            sent.extend_from_slice(&p.unsent()[..take]);
            p.sent(take);
            // Compacting instead of growing: never more than pending + room.
            assert!(
                p.buf.len() <= p.len() + 2 * 64,
                "{} {}",
                p.buf.len(),
                p.len()
            );
        }
        sent.extend_from_slice(p.unsent());
        p.sent(p.len());
        assert_eq!(p.len(), 0);
        let want: Vec<u8> = (0..sent.len()).map(|i| i as u8).collect();
        assert_eq!(sent, want, "bytes come out in the order they went in");
    }
}
