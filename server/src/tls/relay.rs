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

/// Starts the relay thread for `conn` over `sock`; returns the core's end.
pub fn spawn<S: Transport>(
    mut conn: rustls::Connection,
    sock: S,
    peer: &str,
) -> io::Result<UnixStream> {
    let (core_end, relay_end) = UnixStream::pair()?;
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
                down: Vec::new(),
                down_at: 0,
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
    /// Decrypted bytes not yet written to `plain`, from `down_at` on.
    down: Vec<u8>,
    down_at: usize,
    buf: Vec<u8>,
    /// The TLS side closed (close_notify or EOF).
    sock_done: bool,
    /// The core closed its end.
    plain_done: bool,
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
            let pending_down = self.down.len() - self.down_at;
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

    /// Waits until a socket can move what is pending.
    fn wait(&self, pending_down: usize) -> io::Result<()> {
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

    /// Reads records from the peer and decrypts them into `down`.
    fn pull_peer(&mut self) -> io::Result<()> {
        if self.sock_done || self.down.len() - self.down_at >= HIGH_WATER {
            return Ok(());
        }
        // read_tls takes about a record at a time: read a batch before
        // going round the poll loop again.
        for _ in 0..READS_PER_ROUND {
            match nonblocking(self.conn.read_tls(&mut self.sock))? {
                Some(n) => {
                    if n == 0 {
                        self.sock_done = true;
                    }
                    self.conn
                        .process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    self.decrypted()?;
                }
                None => break,
            }
            if self.sock_done || self.down.len() - self.down_at >= HIGH_WATER {
                break;
            }
        }
        // Clear text rustls held from an earlier read (the handshake's).
        self.decrypted()
    }

    /// Moves what rustls decrypted into `down`.
    fn decrypted(&mut self) -> io::Result<()> {
        loop {
            match self.conn.reader().read(&mut self.buf) {
                Ok(0) => {
                    self.sock_done = true;
                    break;
                }
                Ok(n) => self.down.extend_from_slice(&self.buf[..n]),
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
        while self.down_at < self.down.len() {
            match nonblocking(self.plain.write(&self.down[self.down_at..]))? {
                Some(n) => self.down_at += n,
                None => break,
            }
        }
        if self.down_at == self.down.len() {
            self.down.clear();
            self.down_at = 0;
        }
        if self.sock_done && self.down.is_empty() {
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
