//! Serving one negotiated NBD connection on the volume's core.
//!
//! The reader takes each request header (28 bytes, or 32 once extended
//! headers are negotiated), checks it with the protocol crate, reads a write's payload straight into pool buffers (`READ_FIXED`
//! into registered memory: no copy), and spawns the request. Requests run
//! concurrently, bounded per connection; their replies go to one writer task
//! that sends everything queued in one vectored write, so replies leave as
//! they complete, out of order, with few syscalls.
//!
//! A connection runs on the volume's home core, or on another core as a
//! *satellite* ([`satellite`]): the same reader and writer, with reads
//! served from the store there when nothing is pending and every other
//! request forwarded to the home core.

pub mod satellite;

use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::buffer::PoolBuf;
use nbd::reply::{ReplyStyle, ReplyTo};
use nbd::request::{check_request_at, decode_header, header_len};
use nbd::{Command, CommandFlags, ErrorCode, Negotiated, Request, Verdict};
use tokio::sync::{mpsc, Semaphore};

use crate::buffer::{BufPool, OutBuf, Payload};
use crate::engine::{ReadData, Snapshot};
use crate::sockio::{self, write_all, ReadFail, SockBuf, Socket};
use crate::store::Allocation;
use crate::telemetry::VolumeMetrics;
use crate::volume::Volume;
use satellite::{Ask, Satellite};

/// Most requests in flight on one connection; the reader stops reading
/// while this many are outstanding (backpressure to the client).
pub const MAX_INFLIGHT: usize = 256;

/// How long a client may leave its replies unread before it is dropped:
/// the replies it does not take hold pool buffers (read data) the other
/// clients of the core need.
pub const REPLY_STALL: Duration = Duration::from_secs(10);

/// Bytes per second a reading client is assumed to take at least (a large
/// reply gets this much more time).
const SLOWEST_READER: usize = 1 << 20;

/// Most iovecs in one `writev` (the kernel's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

impl From<ReadFail> for End {
    fn from(e: ReadFail) -> End {
        match e {
            ReadFail::Eof => End::Eof,
            ReadFail::Truncated { what, got, want } => End::Truncated { what, got, want },
            ReadFail::Io(e) => End::Io(e),
        }
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("client disconnected")]
    Eof,
    #[error("client disconnected in the middle of a {what} ({got} of {want} bytes)")]
    Truncated {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("protocol violation: {0}")]
    Protocol(#[from] nbd::ProtocolError),
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    #[error("client sent NBD_CMD_DISC")]
    Disc,
    /// Stopped at a request boundary for a hand-over to a new daemon
    /// process; the bytes read past the last served request.
    #[error("handed over to a new daemon process")]
    HandOver(Vec<u8>),
}

/// A connection stopped at a request boundary, every reply written, ready
/// to move to a new daemon process (live restart).
#[derive(Debug)]
pub struct Quiesced {
    /// A duplicate of the client socket.
    pub fd: std::os::fd::OwnedFd,
    /// Whether it is a Unix-domain socket (else TCP).
    pub unix: bool,
    /// What was negotiated.
    pub neg: Negotiated,
    /// Bytes read from the client past the last request served (a partial
    /// header, or what the handshake read ahead).
    pub leftover: Vec<u8>,
    /// Peer address, for logs.
    pub peer: String,
}

/// Reads exactly `buf[from..to]`, with the connection's end reasons.
async fn read_exact<T: SockBuf>(
    sock: &Socket,
    buf: T,
    from: usize,
    to: usize,
    what: &'static str,
    fixed: bool,
) -> (Result<(), End>, T) {
    let (r, b) = sockio::read_exact(sock, buf, from, to, what, fixed).await;
    (r.map_err(End::from), b)
}

/// Reads a single-chunk write payload and, in the same `readv`, as much of
/// the next request header as has arrived: one round trip per pipelined
/// write instead of two, still straight into pool memory. Returns the
/// filled chunk, the header buffer and how many header bytes it holds.
async fn read_payload_and_header(
    conn: &Conn,
    chunk: PoolBuf,
    want: usize,
    hdr: Vec<u8>,
    fixed: bool,
) -> (Result<usize, End>, PoolBuf, Vec<u8>) {
    debug_assert_eq!(hdr.len(), header_len(conn.neg.extended_headers));
    let (res, chunk, hdr) =
        sockio::readv_payload_and_tail(&conn.sock_file, chunk, want, hdr, &conn.bypass).await;
    let n = match res {
        Ok(0) => {
            return (
                Err(End::Truncated {
                    what: "write payload",
                    got: 0,
                    want,
                }),
                chunk,
                hdr,
            )
        }
        Ok(n) => n,
        Err(e) => return (Err(End::Io(e)), chunk, hdr),
    };
    if n >= want {
        return (Ok(n - want), chunk, hdr);
    }
    let (res, chunk) = read_exact(&conn.sock, chunk, n, want, "write payload", fixed).await;
    let res = match res {
        Ok(()) => Ok(0),
        Err(End::Eof) => Err(End::Truncated {
            what: "write payload",
            got: n,
            want,
        }),
        Err(e) => Err(e),
    };
    (res, chunk, hdr)
}

type Reply = Vec<OutBuf>;

/// What the writer task receives: replies, and the in-flight permits of the
/// requests they answer, released only once everything before them was
/// written. A client that never reads its replies thus stops the reader at
/// [`MAX_INFLIGHT`] unwritten requests (backpressure), instead of growing
/// the queue.
enum Queued {
    Reply(Reply),
    Release(tokio::sync::OwnedSemaphorePermit),
}

struct Conn {
    sock: Rc<Socket>,
    /// The socket's readiness, so the reader waits for a request header
    /// where a hand-over may stop it without losing a byte.
    ready: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    /// The same socket as a file, for `readv` (tokio-uring has no socket readv).
    sock_file: tokio_uring::fs::File,
    /// Write payloads received without the ring (`sockio::MAX_BYPASS`).
    bypass: sockio::Bypass,
    /// What serves the requests: the volume on its home core, or a satellite.
    target: Target,
    /// This core's pool (write payloads; a satellite's reads).
    pool: Rc<BufPool>,
    metrics: VolumeMetrics,
    /// The export's volume.
    name: String,
    neg: Negotiated,
    /// How replies are framed (from `neg`).
    style: ReplyStyle,
    replies: mpsc::UnboundedSender<Queued>,
    inflight: Arc<Semaphore>,
    peer: String,
}

impl Conn {
    fn reply(&self, r: Reply) {
        // The writer is gone only when the socket failed; the reader sees that too.
        let _ = self.replies.send(Queued::Reply(r));
    }

    /// Frees a request's in-flight slot once its replies are written.
    fn release(&self, permit: tokio::sync::OwnedSemaphorePermit) {
        // A gone writer dropped its queue: the permit drops here too.
        let _ = self.replies.send(Queued::Release(permit));
    }

    fn error(&self, req: &Request, code: ErrorCode, msg: &str) {
        self.metrics.error(req.command, code);
        let b = nbd::reply::failure(self.style, reply_to(req), req.command, code, msg);
        self.reply(vec![OutBuf::Bytes(b, 0)]);
    }

    fn done(&self, req: &Request, res: Result<(), ErrorCode>) {
        match res {
            Ok(()) => {
                let b = nbd::reply::success(self.style, reply_to(req));
                self.reply(vec![OutBuf::Bytes(b, 0)]);
            }
            Err(code) => self.error(req, code, "request failed"),
        }
    }
}

/// What serves a connection's requests.
pub enum Target {
    /// The volume, on its home core; with `snap`, a snapshot export
    /// (`VOLUME@NAME`) of it, read-only.
    Home {
        /// The volume.
        vol: Rc<Volume>,
        /// The snapshot a snapshot export serves.
        snap: Option<Rc<Snapshot>>,
    },
    /// A plain export's connection on another core.
    Satellite(Box<Satellite>),
}

impl Target {
    /// This core's pool, the volume's metrics and name.
    fn parts(&self) -> (Rc<BufPool>, VolumeMetrics, String) {
        match self {
            Target::Home { vol, .. } => (
                vol.pool().clone(),
                vol.metrics().clone(),
                vol.info().name.clone(),
            ),
            Target::Satellite(s) => (s.pool.clone(), s.metrics.clone(), s.name.clone()),
        }
    }

    /// The size requests are checked against.
    fn size(&self) -> u64 {
        match self {
            Target::Home {
                snap: Some(snap), ..
            } => snap.size(),
            Target::Home { vol, snap: None } => vol.info().size.get(),
            Target::Satellite(s) => s.size(),
        }
    }
}

/// The request a reply answers.
fn reply_to(req: &Request) -> ReplyTo {
    ReplyTo {
        cookie: req.cookie,
        offset: req.offset,
    }
}

/// Records in the event log that the client attached (`end` None) or
/// detached.
fn client_event(conn: &Conn, end: Option<&End>) {
    let (volume, client) = (conn.name.clone(), conn.peer.clone());
    crate::events::emit(match end {
        None => crate::events::EventKind::ClientAttach { volume, client },
        Some(end) => crate::events::EventKind::ClientDetach {
            volume,
            client,
            reason: end.to_string(),
        },
    });
}

/// The connection's extra handles on its socket: a file for `readv` and a
/// readiness registration.
fn socket_handles(
    sock: &Socket,
) -> io::Result<(
    tokio_uring::fs::File,
    tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
)> {
    let file = sock.dup_as_file()?;
    // SAFETY: the AsyncFd owns this duplicate and nothing else closes or
    // replaces it while registered (it deregisters before closing).
    let ready = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            sock.dup_fd()?,
            tokio::io::Interest::READABLE,
        )?
    };
    Ok((file, ready))
}

/// Serves a negotiated connection until the client leaves or breaks the
/// protocol, or `quiesce` turns true: then it stops at the next request
/// boundary, lets what is in flight finish and its replies go out, and
/// answers the socket and its state for a new daemon process instead of
/// closing it. `leftover` holds bytes read past the handshake (or, for a
/// handed-over connection, past the last request the old process served).
/// `attach` records the client's attach in the event log (not for a
/// connection handed over: it attached before). `target` serves the
/// requests (a snapshot export's refuses every write).
pub async fn serve(
    sock: Socket,
    neg: Negotiated,
    target: Target,
    leftover: Vec<u8>,
    peer: String,
    (quiesce, attach): (tokio::sync::watch::Receiver<bool>, bool),
) -> Option<Quiesced> {
    let sock = Rc::new(sock);
    let open = crate::telemetry::connections();
    open.increment(1.0);
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio_uring::spawn(run_writer(sock.clone(), rx));
    let (sock_file, ready) = match socket_handles(&sock) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(%peer, "cannot duplicate the client socket: {e}; closing");
            sock.shutdown();
            open.decrement(1.0);
            return None;
        }
    };
    let unix = matches!(*sock, Socket::Unix(_));
    let (neg_kept, peer_kept) = (neg.clone(), peer.clone());
    let (pool, metrics, name) = target.parts();
    let conn = Rc::new(Conn {
        sock: sock.clone(),
        ready,
        sock_file,
        bypass: sockio::Bypass::default(),
        target,
        pool,
        metrics,
        name,
        style: ReplyStyle::of(&neg),
        neg,
        replies: tx,
        inflight: Arc::new(Semaphore::new(MAX_INFLIGHT)),
        peer,
    });
    if attach {
        client_event(&conn, None);
    }
    let end = read_loop(&conn, leftover, quiesce).await;
    if let End::HandOver(rest) = end {
        finish_inflight(conn, writer).await;
        open.decrement(1.0);
        return match sock.dup_fd() {
            Ok(fd) => Some(Quiesced {
                fd,
                unix,
                neg: neg_kept,
                leftover: rest,
                peer: peer_kept,
            }),
            Err(e) => {
                tracing::warn!(peer = %peer_kept, "cannot keep the client socket for the hand-over: {e}; closing");
                sock.shutdown();
                None
            }
        };
    }
    client_event(&conn, Some(&end));
    log_end(&conn, &end);
    finish_inflight(conn, writer).await;
    sock.shutdown();
    open.decrement(1.0);
    None
}

/// Logs why a connection ends: a client's own goodbye quietly, anything
/// else as a warning.
fn log_end(conn: &Conn, end: &End) {
    match end {
        End::Eof | End::Disc => tracing::debug!(peer = %conn.peer, "connection closed: {end}"),
        _ => {
            tracing::warn!(peer = %conn.peer, export = %conn.name, "closing connection: {end}")
        }
    }
}

/// Lets in-flight requests finish and their replies go out.
async fn finish_inflight(conn: Rc<Conn>, writer: tokio::task::JoinHandle<()>) {
    let all = conn.inflight.acquire_many(MAX_INFLIGHT as u32).await;
    drop(all);
    // The writer ends once every reply sender (each request's `Conn`) is gone.
    drop(conn);
    let _ = writer.await;
}

async fn run_writer(sock: Rc<Socket>, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let mut written = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut bufs = Vec::new();
        let mut next = Some(first);
        while let Some(q) = next.take() {
            match q {
                Queued::Reply(r) => bufs.extend(r),
                Queued::Release(p) => written.push(p),
            }
            if bufs.len() < MAX_IOVECS {
                next = rx.try_recv().ok();
            }
        }
        if bufs.is_empty() {
            written.clear();
            continue;
        }
        let bytes: usize = bufs.iter().map(OutBuf::remaining).sum();
        let limit = REPLY_STALL + Duration::from_secs((bytes / SLOWEST_READER) as u64);
        let res = match tokio::time::timeout(limit, write_all(&sock, bufs)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading its replies",
            )),
        };
        if let Err(e) = res {
            tracing::info!("closing the connection: reply write failed: {e}");
            sock.shutdown();
            drop(written);
            // Drain so senders never block; replies and permits are dropped.
            while rx.recv().await.is_some() {}
            return;
        }
        // Everything queued before these permits is on the wire.
        written.clear();
    }
}

/// Bytes read past the handshake, consumed before the socket.
struct Prefix {
    bytes: Vec<u8>,
    at: usize,
}

impl Prefix {
    fn is_empty(&self) -> bool {
        self.at >= self.bytes.len()
    }

    /// What is left unconsumed.
    fn rest(&self) -> &[u8] {
        &self.bytes[self.at.min(self.bytes.len())..]
    }

    fn take(&mut self, dst: &mut [u8]) -> usize {
        let n = (self.bytes.len() - self.at).min(dst.len());
        dst[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
        self.at += n;
        n
    }
}

/// Fills `hdr[have..]` with the next request header without ever leaving a
/// read pending on the socket: it receives what has arrived and otherwise
/// waits for readiness, which a hand-over may cancel. Stops (with the bytes
/// read so far) when `quiesce` is set: a request boundary, since every
/// earlier request was read whole.
async fn read_header(
    conn: &Conn,
    hdr: &mut [u8],
    mut have: usize,
    quiesce: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), End> {
    use std::os::fd::AsFd;
    loop {
        if *quiesce.borrow() {
            return Err(End::HandOver(hdr[..have].to_vec()));
        }
        if have == hdr.len() {
            return Ok(());
        }
        match sockio::recv_now(conn.ready.get_ref().as_fd(), &mut hdr[have..]) {
            Ok(0) if have == 0 => return Err(End::Eof),
            Ok(0) => {
                return Err(End::Truncated {
                    what: "request header",
                    got: have,
                    want: hdr.len(),
                })
            }
            Ok(n) => {
                have += n;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(End::Io(e)),
        }
        tokio::select! {
            _ = quiesce_signalled(quiesce) => {}
            r = conn.ready.readable() => match r {
                Ok(mut g) => g.clear_ready(),
                Err(e) => return Err(End::Io(e)),
            },
        }
    }
}

/// Resolves once `quiesce` is true; never, when its sender is gone.
async fn quiesce_signalled(quiesce: &mut tokio::sync::watch::Receiver<bool>) {
    if quiesce.wait_for(|q| *q).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Reads requests until the connection ends, and runs each served one as
/// its own task (at most the in-flight limit at once).
async fn read_loop(
    conn: &Rc<Conn>,
    leftover: Vec<u8>,
    mut quiesce: tokio::sync::watch::Receiver<bool>,
) -> End {
    let mut prefix = Prefix {
        bytes: leftover,
        at: 0,
    };
    let extended = conn.neg.extended_headers;
    let mut hdr = vec![0u8; header_len(extended)];
    let fixed = conn.pool.registered();
    // Bytes of the next header already read along with a write's payload.
    let mut hdr_have = 0usize;
    loop {
        hdr_have += prefix.take(&mut hdr[hdr_have..]);
        let res = read_header(conn, &mut hdr, hdr_have, &mut quiesce).await;
        hdr_have = 0;
        match res {
            Ok(()) => {}
            Err(End::HandOver(mut rest)) => {
                rest.extend_from_slice(prefix.rest());
                return End::HandOver(rest);
            }
            Err(e) => return e,
        }
        let started = Instant::now();
        let req = match decode_header(&hdr, extended) {
            Ok(r) => r,
            Err(e) => return End::Protocol(e),
        };
        // From here, also while its payload is received.
        let in_flight = crate::busy_poll::request_started(req.length);
        // Taken before the request is read further, returned once its reply
        // is written: at most MAX_INFLIGHT requests unanswered on the wire.
        let Ok(permit) = conn.inflight.clone().acquire_owned().await else {
            return End::Eof;
        };
        match admit(conn, &req, &mut prefix).await {
            Ok(true) => {}
            Ok(false) => {
                conn.release(permit);
                continue;
            }
            Err(e) => return e,
        }
        if req.command == Command::Disc {
            return End::Disc;
        }
        let payload = if req.command == Command::Write && req.length > 0 {
            let (res, h) = read_write_payload(conn, &req, &mut prefix, hdr, fixed).await;
            hdr = h;
            match res {
                Ok((p, have)) => {
                    hdr_have = have;
                    Some(p)
                }
                Err(e) => return e,
            }
        } else {
            None
        };
        spawn_request(conn.clone(), req, payload, (permit, in_flight), started);
    }
}

/// Runs a request as its own task, then hands its in-flight permit to the
/// writer (released once its reply is written) and records its latency.
fn spawn_request(
    conn: Rc<Conn>,
    req: Request,
    payload: Option<Payload>,
    (permit, in_flight): (
        tokio::sync::OwnedSemaphorePermit,
        crate::busy_poll::InFlight,
    ),
    started: Instant,
) {
    tokio_uring::spawn(async move {
        handle(&conn, req, payload).await;
        drop(in_flight);
        if let Some(m) = conn.metrics.op(req.command) {
            let bytes = match req.command {
                Command::Read | Command::Write => req.length,
                _ => 0,
            };
            m.record(bytes, started.elapsed());
        }
        conn.release(permit);
    });
}

/// Applies the protocol's validity rules to a request: `Ok(true)` serves
/// it; `Ok(false)` means it was answered with an error (a rejected write's
/// payload drained) and the next request follows.
async fn admit(conn: &Conn, req: &Request, prefix: &mut Prefix) -> Result<bool, End> {
    match check_request_at(req, &conn.neg, conn.target.size()) {
        Verdict::Close(e) => Err(End::Protocol(e)),
        Verdict::Reject(code) => {
            // Bounded by the maximum payload: check_request closes longer.
            let payload = req.payload_len(conn.neg.extended_headers) as usize;
            if payload > 0 {
                discard(&conn.sock, prefix, payload).await?;
            }
            tracing::debug!(peer = %conn.peer, "rejected {:?} at {}+{}: {:?}", req.command, req.offset, req.length, code);
            conn.error(req, code, "invalid request");
            Ok(false)
        }
        Verdict::Serve => Ok(true),
    }
}

/// Reads a write's payload into pool buffers. A one-chunk payload with
/// nothing buffered ahead is read together with the header behind it (into
/// `hdr`); the answer then says how many header bytes came along.
async fn read_write_payload(
    conn: &Conn,
    req: &Request,
    prefix: &mut Prefix,
    hdr: Vec<u8>,
    fixed: bool,
) -> (Result<(Payload, usize), End>, Vec<u8>) {
    let mut p = conn.pool.payload(req.length as usize).await;
    if p.chunk_count() == 1 && prefix.is_empty() {
        let mut chunks = p.take_chunks();
        let chunk = chunks.pop().expect("one chunk");
        let (res, chunk, hdr) =
            read_payload_and_header(conn, chunk, req.length as usize, hdr, fixed).await;
        p.put_chunks(vec![chunk]);
        return (res.map(|have| (p, have)), hdr);
    }
    let res = fill_payload(conn, &mut p, prefix, fixed).await;
    (res.map(|()| (p, 0)), hdr)
}

async fn discard(sock: &Socket, prefix: &mut Prefix, want: usize) -> Result<(), End> {
    let mut scratch = vec![0u8; want.clamp(1, 64 << 10)];
    let first = want.min(scratch.len());
    let mut done = prefix.take(&mut scratch[..first]);
    while done < want {
        let n = (want - done).min(scratch.len());
        let (res, s) = read_exact(sock, scratch, 0, n, "rejected write payload", false).await;
        scratch = s;
        if let Err(e) = res {
            let got = match e {
                End::Truncated { got, .. } => got,
                End::Eof => 0,
                e => return Err(e),
            };
            return Err(End::Truncated {
                what: "rejected write payload",
                got: done + got,
                want,
            });
        }
        done += n;
    }
    Ok(())
}

async fn fill_payload(
    conn: &Conn,
    p: &mut Payload,
    prefix: &mut Prefix,
    fixed: bool,
) -> Result<(), End> {
    let chunks = p.take_chunks();
    let total = p.len();
    let mut filled = Vec::with_capacity(chunks.len());
    let mut done = 0;
    for (i, mut chunk) in chunks.into_iter().enumerate() {
        let want = p.chunk_len(i);
        // Bytes already read with the handshake are copied (rare: only when a
        // client pipelines a write right behind its final option).
        let pre = prefix.take(&mut chunk[..want]);
        if pre > 0 {
            conn.metrics.payload_copies.increment(pre as u64);
        }
        let (res, chunk) = read_exact(&conn.sock, chunk, pre, want, "write payload", fixed).await;
        if let Err(e) = res {
            let got = match e {
                End::Truncated { got, .. } => got,
                End::Eof => 0,
                e => return Err(e),
            };
            return Err(End::Truncated {
                what: "write payload",
                got: done + got,
                want: total,
            });
        }
        filled.push(chunk);
        done += want;
    }
    p.put_chunks(filled);
    Ok(())
}

async fn handle(conn: &Conn, req: Request, payload: Option<Payload>) {
    tracing::trace!("request {:?}", req);
    let vol = match &conn.target {
        Target::Home {
            vol,
            snap: Some(snap),
        } => return handle_snapshot(conn, vol, snap, req).await,
        Target::Home { vol, snap: None } => vol,
        Target::Satellite(s) => return handle_satellite(conn, s, req, payload).await,
    };
    match req.command {
        Command::Write => {
            let res = match payload {
                Some(p) => {
                    vol.write(req.offset, p, req.flags.contains(CommandFlags::FUA))
                        .await
                }
                None => Ok(()),
            };
            conn.done(&req, res);
        }
        Command::Read if req.length == 0 => reply_read(conn, &req, ReadData { parts: Vec::new() }),
        Command::Read => match vol.read(req.offset, req.length).await {
            Ok(data) => reply_read(conn, &req, data),
            Err(code) => conn.error(&req, code, "read failed"),
        },
        Command::Flush => conn.done(&req, vol.flush().await),
        Command::Trim => {
            let fua = req.flags.contains(CommandFlags::FUA);
            conn.done(&req, vol.trim(req.offset, req.length, fua).await)
        }
        Command::WriteZeroes => {
            let no_hole = req.flags.contains(CommandFlags::NO_HOLE);
            let fua = req.flags.contains(CommandFlags::FUA);
            conn.done(
                &req,
                vol.write_zeroes(req.offset, req.length, no_hole, fua).await,
            )
        }
        // O_DIRECT keeps no page cache to warm; prefetch is advisory.
        Command::Cache => conn.done(&req, Ok(())),
        Command::BlockStatus => reply_block_status(conn, &req).await,
        Command::Disc | Command::Unknown(_) => {
            conn.error(&req, ErrorCode::Inval, "unsupported command")
        }
    }
}

/// A request on a satellite connection: a read from the store here when
/// the gate allows; everything else answered by the home core.
async fn handle_satellite(conn: &Conn, sat: &Satellite, req: Request, payload: Option<Payload>) {
    let fua = req.flags.contains(CommandFlags::FUA);
    let (offset, len) = (req.offset, req.length);
    match req.command {
        Command::Read if len == 0 => reply_read(conn, &req, ReadData { parts: Vec::new() }),
        Command::Read => match sat.read(offset, len).await {
            Ok(data) => reply_read(conn, &req, data),
            Err(code) => conn.error(&req, code, "read failed"),
        },
        Command::Write => {
            let res = match &payload {
                Some(p) => sat.write(offset, p, fua).await,
                None => Ok(()),
            };
            conn.done(&req, res);
        }
        Command::Flush => conn.done(&req, sat.done(Ask::Flush).await),
        Command::Trim => conn.done(&req, sat.done(Ask::Trim { offset, len, fua }).await),
        Command::WriteZeroes => {
            let no_hole = req.flags.contains(CommandFlags::NO_HOLE);
            let ask = Ask::Zeroes {
                offset,
                len,
                no_hole,
                fua,
            };
            conn.done(&req, sat.done(ask).await)
        }
        Command::Cache => conn.done(&req, Ok(())),
        Command::BlockStatus => reply_block_status(conn, &req).await,
        Command::Disc | Command::Unknown(_) => {
            conn.error(&req, ErrorCode::Inval, "unsupported command")
        }
    }
}

/// A request on a snapshot export: reads of the snapshot; writes of any
/// kind refused with EPERM (the export is read-only, so `check_request`
/// refuses them first); BLOCK_STATUS answers the snapshot's allocation.
async fn handle_snapshot(conn: &Conn, vol: &Volume, snap: &Snapshot, req: Request) {
    match req.command {
        Command::Read if req.length == 0 => reply_read(conn, &req, ReadData { parts: Vec::new() }),
        Command::Read => match vol
            .engine()
            .read_snapshot(snap, req.offset, req.length)
            .await
        {
            Ok(data) => reply_read(conn, &req, data),
            Err(code) => conn.error(&req, code, "snapshot read failed"),
        },
        Command::Write | Command::Trim | Command::WriteZeroes => {
            conn.error(&req, ErrorCode::Perm, "a snapshot is read-only")
        }
        Command::Flush | Command::Cache => conn.done(&req, Ok(())),
        Command::BlockStatus => reply_block_status(conn, &req).await,
        Command::Disc | Command::Unknown(_) => {
            conn.error(&req, ErrorCode::Inval, "unsupported command")
        }
    }
}

/// Answers a READ with the data read, behind a header of the negotiated
/// reply style (a zero-length READ gets a complete reply with no data).
fn reply_read(conn: &Conn, req: &Request, data: ReadData) {
    let mut out = Vec::with_capacity(data.parts.len() + 1);
    // READ lengths are bounded by the maximum payload (check_request).
    let len = u32::try_from(req.length).unwrap_or(u32::MAX);
    let head = nbd::reply::read_header(conn.style, reply_to(req), len);
    out.push(OutBuf::Bytes(head, 0));
    out.extend(
        data.parts
            .into_iter()
            .map(|(b, s, e)| OutBuf::Pooled(b, s, e)),
    );
    conn.reply(out);
}

/// The `base:allocation` flags of a run: a hole reads as zeroes too.
fn allocation_flags(a: &Allocation) -> u32 {
    let hole = if a.hole { nbd::consts::STATE_HOLE } else { 0 };
    let zero = if a.zero || a.hole {
        nbd::consts::STATE_ZERO
    } else {
        0
    };
    hole | zero
}

/// Answers a BLOCK_STATUS with one chunk per selected context:
/// `base:allocation`, then `qemu:dirty-bitmap:since-LSN`.
async fn reply_block_status(conn: &Conn, req: &Request) {
    let mut parts = match block_status_parts(conn, req).await {
        Ok(p) => p,
        Err(code) => return conn.error(req, code, "block status failed"),
    };
    if parts.is_empty() {
        conn.error(req, ErrorCode::Inval, "no metadata context was negotiated");
        return;
    }
    for (_, extents) in &mut parts {
        if req.flags.contains(CommandFlags::REQ_ONE) {
            extents.truncate(1);
        }
    }
    if parts.iter().any(|(_, e)| e.is_empty()) {
        // check_request refuses empty ranges, so each map has at least one
        // extent; an empty chunk would be a protocol violation.
        conn.error(req, ErrorCode::Io, "no block status extents for the range");
        return;
    }
    let (min_block, _, _) = conn.neg.export.block_sizes();
    let last = parts.len() - 1;
    let chunks = parts
        .iter()
        .enumerate()
        .map(|(i, (id, extents))| {
            let chunk = nbd::reply::block_status_part(
                conn.style,
                reply_to(req),
                *id,
                extents,
                min_block,
                i == last,
            );
            OutBuf::Bytes(chunk, 0)
        })
        .collect();
    conn.reply(chunks);
}

/// The extents of each context the connection negotiated, with its id:
/// `base:allocation`, then `qemu:dirty-bitmap:since-LSN` (a satellite asks
/// the home core for them).
async fn block_status_parts(
    conn: &Conn,
    req: &Request,
) -> Result<Vec<(u32, Vec<nbd::reply::ExtentExt>)>, ErrorCode> {
    let (offset, len) = (req.offset, req.length);
    let bitmap = conn.neg.dirty_bitmap;
    let (alloc, dirty) = match &conn.target {
        Target::Home { vol, snap } => {
            let alloc = conn
                .neg
                .base_allocation
                .map(|_| allocation_runs(vol, snap.as_deref(), offset, len));
            let dirty = bitmap.map(|b| dirty_runs(vol, b.since, offset, len));
            (alloc, dirty)
        }
        Target::Satellite(sat) => {
            let allocation = conn.neg.base_allocation.is_some();
            let since = bitmap.map(|b| b.since);
            let (a, d) = sat.extents(offset, len, allocation, since).await?;
            (Some(a), Some(d))
        }
    };
    let mut parts = Vec::with_capacity(2);
    if let (Some(id), Some(a)) = (conn.neg.base_allocation, alloc) {
        parts.push((id, a));
    }
    if let (Some(b), Some(d)) = (bitmap, dirty) {
        parts.push((b.id, d));
    }
    Ok(parts)
}

/// The `base:allocation` extents of `[offset, offset + len)` of `vol` (of
/// its snapshot `snap`).
fn allocation_runs(
    vol: &Volume,
    snap: Option<&Snapshot>,
    offset: u64,
    len: u64,
) -> Vec<nbd::reply::ExtentExt> {
    let runs = match snap {
        Some(snap) => vol.engine().snapshot_allocation(snap, offset, len),
        None => vol.allocation(offset, len),
    };
    runs.into_iter()
        .filter(|a| a.length > 0)
        .map(|a| nbd::reply::ExtentExt {
            length: a.length,
            flags: u64::from(allocation_flags(&a)),
        })
        .collect()
}

/// The range's `qemu:dirty-bitmap:since-LSN` extents: dirty where a record
/// after `since` changed a region (everywhere when the table does not
/// reach back to `since`), at most [`MAX_DIRTY_RUNS`] of them (a reply may
/// cover a prefix of the range).
fn dirty_runs(vol: &Volume, since: u64, offset: u64, len: u64) -> Vec<nbd::reply::ExtentExt> {
    let mut out: Vec<nbd::reply::ExtentExt> = Vec::new();
    vol.engine()
        .changed_extents(since, offset, len, |_, length, dirty| {
            if out.len() < MAX_DIRTY_RUNS {
                let flags = if dirty { nbd::consts::STATE_DIRTY } else { 0 };
                out.push(nbd::reply::ExtentExt {
                    length,
                    flags: u64::from(flags),
                });
            }
        });
    out
}

/// Most dirty-bitmap runs one reply carries.
const MAX_DIRTY_RUNS: usize = 1024;
